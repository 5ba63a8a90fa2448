//! `pde plan ID --env ENV`: what a deploy would do, without doing it.
//!
//! Validation, the bundle digest and the routes are computed exactly as a
//! deploy computes them; each routed service is then asked which digest it
//! runs now. Nothing is written, pushed, tagged or audited.

use serde::Serialize;

use crate::engine::Engine;
use crate::error::Error;
use crate::pipeline::{DeployOptions, DeployReport};
use crate::push;

/// What a deploy would change on one service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Change {
    /// Nothing active there yet.
    Install,
    /// Another digest is active and would be replaced.
    Update,
    /// The new digest is already active.
    Unchanged,
    /// The service could not tell (see `error`).
    Unknown,
}

/// One routed service in a plan.
#[derive(Debug, Clone, Serialize)]
pub struct PlannedTarget {
    /// The service.
    pub service: String,
    /// Its base URL.
    pub url: String,
    /// Why it is routed.
    pub reasons: Vec<String>,
    /// The digest it runs now.
    pub active_digest: Option<String>,
    /// The version it runs now.
    pub active_version: Option<String>,
    /// The digest a deploy would activate.
    pub new_digest: String,
    /// What would change.
    pub change: Change,
    /// Why the active digest could not be read.
    pub error: Option<String>,
}

/// The plan for one deploy.
#[derive(Debug, Clone, Serialize)]
pub struct PlanReport {
    /// Validation, digest, health and routes, as a deploy would find them.
    #[serde(flatten)]
    pub deploy: DeployReport,
    /// Per routed service: what runs now and what would run.
    pub targets: Vec<PlannedTarget>,
}

impl Engine {
    /// Computes the plan for deploying `policy_id` to `env_name`.
    pub async fn plan(&self, policy_id: &str, env_name: &str) -> Result<PlanReport, Error> {
        let deploy = self
            .deploy(
                policy_id,
                env_name,
                &DeployOptions {
                    dry_run: true,
                    ..DeployOptions::default()
                },
            )
            .await?;
        let env = self.environment(env_name)?;
        let mut targets = Vec::new();
        for route in &deploy.routes {
            let service = env
                .services
                .iter()
                .find(|s| s.name == route.service)
                .expect("routes only name services of the environment");
            let target = self.target(service)?;
            let active = push::get_active(&self.http, &target, policy_id, &self.config.push).await;
            let (active_digest, active_version, change, error) = match active {
                Ok(None) => (None, None, Change::Install, None),
                Ok(Some(a)) => {
                    let change = if a.digest == deploy.digest {
                        Change::Unchanged
                    } else {
                        Change::Update
                    };
                    (Some(a.digest), Some(a.version), change, None)
                }
                Err(e) => (None, None, Change::Unknown, Some(e.to_string())),
            };
            targets.push(PlannedTarget {
                service: route.service.clone(),
                url: route.url.clone(),
                reasons: route.reasons.clone(),
                active_digest,
                active_version,
                new_digest: deploy.digest.clone(),
                change,
                error,
            });
        }
        Ok(PlanReport { deploy, targets })
    }
}
