//! Step 4, route: router plugins decide which services get the bundle.
//!
//! The result is the union of every router's picks, each service keeping all
//! the reasons given for it. With no router plugin, every service of the
//! environment is a target: routers narrow delivery, they are not required.

use std::collections::BTreeMap;

use serde::Serialize;

use pde_core::{ExitCode, HasExitCode};

use crate::config::{Environment, Service};
use crate::plugin::PluginSet as Plugins;
use crate::plugin::{
    ActivePolicy, CallContext, PluginError, PluginKind, PluginNotice, PolicyInput, ServiceInfo,
};
use crate::policy::Policy;

/// Why routing produced no targets.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    /// A router plugin could not run.
    #[error(transparent)]
    Plugin(#[from] PluginError),
    /// Routing selected no service.
    #[error(
        "no service of environment {env} was routed policy {policy_id}; check the router plugins' rules and the services' tags"
    )]
    NoRoutes {
        /// The environment.
        env: String,
        /// The policy.
        policy_id: String,
    },
}

impl HasExitCode for RouteError {
    fn exit_code(&self) -> ExitCode {
        match self {
            RouteError::Plugin(e) => e.exit_code(),
            RouteError::NoRoutes { .. } => ExitCode::Usage,
        }
    }
}

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

/// What routing decided, and what the routers logged at warning or error
/// level while deciding it (shown in the route step's output, issue 24).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Routing {
    /// The routed services, in `pde.toml`'s order.
    pub routes: Vec<RouteDecision>,
    /// The routers' warning and error lines, in the order they ran.
    pub log: Vec<PluginNotice>,
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

/// Asks every router plugin where `policy` goes in `env_name`. Routers get
/// the context validators get in that environment: `active` is the version
/// active there, as validation found it (routers built against
/// `pde:plugin@0.2.0` see it). Routing to no service at all is an error: a
/// deploy that reaches nobody is a mistake.
pub fn route(
    plugins: &Plugins,
    policy: &Policy,
    env_name: &str,
    env: &Environment,
    active: Option<&ActivePolicy>,
) -> Result<Routing, RouteError> {
    let routing = pick(plugins, policy, env_name, env, active)?;
    if routing.routes.is_empty() {
        return Err(RouteError::NoRoutes {
            env: env_name.to_string(),
            policy_id: policy.id.clone(),
        });
    }
    Ok(routing)
}

fn pick(
    loaded: &Plugins,
    policy: &Policy,
    env_name: &str,
    env: &Environment,
    active: Option<&ActivePolicy>,
) -> Result<Routing, RouteError> {
    let routers: Vec<_> = loaded.of_kind(PluginKind::Router).collect();
    if routers.is_empty() {
        let routes = env
            .services
            .iter()
            .map(|s| RouteDecision {
                service: s.name.clone(),
                url: s.url.clone(),
                reasons: vec!["no router plugin: every service of the environment".into()],
            })
            .collect();
        return Ok(Routing {
            routes,
            log: Vec::new(),
        });
    }
    let services: Vec<ServiceInfo> = env.services.iter().map(ServiceInfo::from).collect();
    let input = PolicyInput {
        id: policy.id.clone(),
        version: policy.version.to_string(),
        document: policy.document.clone(),
    };
    let ctx = CallContext {
        environment: env_name.to_string(),
        active: active.cloned(),
    };
    let mut picked: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut log = Vec::new();
    for router in routers {
        let report = loaded.host.route(router, &input, &ctx, &services)?;
        log.extend(PluginNotice::from_log(&router.name, &report.log));
        for r in report.value {
            picked
                .entry(r.service)
                .or_default()
                .push(format!("{}: {}", router.name, r.reason));
        }
    }
    // Keep the order of pde.toml so output and pushes are predictable.
    let routes = env
        .services
        .iter()
        .filter_map(|s| {
            picked.remove(&s.name).map(|reasons| RouteDecision {
                service: s.name.clone(),
                url: s.url.clone(),
                reasons,
            })
        })
        .collect();
    Ok(Routing { routes, log })
}
