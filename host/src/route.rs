//! Step 4, route: router plugins decide which services get the bundle.
//!
//! The result is the union of every router's picks, each service keeping all
//! the reasons given for it. With no router plugin, every service of the
//! environment is a target: routers narrow delivery, they are not required.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::config::{Environment, Service};
use crate::engine::Engine;
use crate::error::Error;
use crate::plugin::{CallContext, PluginKind, PolicyInput, ServiceInfo};
use crate::policy::Policy;

/// One service that will receive the bundle, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RouteDecision {
    /// The service name from `pde.toml`.
    pub service: String,
    /// Its base URL.
    pub url: String,
    /// Every reason given, prefixed with the router that gave it.
    pub reasons: Vec<String>,
}

/// What a router is told about a service: its name, tags and labels, never
/// its URL or token.
impl From<&Service> for ServiceInfo {
    fn from(s: &Service) -> Self {
        ServiceInfo {
            name: s.name.clone(),
            tags: s.tags.clone(),
            labels: s.labels.clone(),
        }
    }
}

/// Asks every router plugin where `policy` goes in `env_name`.
pub fn route(
    engine: &Engine,
    policy: &Policy,
    env_name: &str,
    env: &Environment,
) -> Result<Vec<RouteDecision>, Error> {
    let loaded = engine.plugins()?;
    let routers: Vec<_> = loaded.of_kind(PluginKind::Router).collect();
    if routers.is_empty() {
        return Ok(env
            .services
            .iter()
            .map(|s| RouteDecision {
                service: s.name.clone(),
                url: s.url.clone(),
                reasons: vec!["no router plugin: every service of the environment".into()],
            })
            .collect());
    }
    let services: Vec<ServiceInfo> = env.services.iter().map(ServiceInfo::from).collect();
    let input = PolicyInput {
        id: policy.id.clone(),
        version: policy.version.to_string(),
        document: policy.document.clone(),
    };
    let ctx = CallContext {
        environment: env_name.to_string(),
    };
    let mut picked: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for router in routers {
        let report = loaded.host.route(router, &input, &ctx, &services)?;
        for r in report.value {
            picked
                .entry(r.service)
                .or_default()
                .push(format!("{}: {}", router.name, r.reason));
        }
    }
    // Keep the order of pde.toml so output and pushes are predictable.
    Ok(env
        .services
        .iter()
        .filter_map(|s| {
            picked.remove(&s.name).map(|reasons| RouteDecision {
                service: s.name.clone(),
                url: s.url.clone(),
                reasons,
            })
        })
        .collect())
}
