//! OCI delivery bound to the engine (issue 23): the registry of an
//! environment with `delivery = { kind = "oci", … }`, its health check, its
//! publish step and the tag moves of `pde rollback` and `pde status`.
//!
//! The work is in [`crate::steps::push::publish`] and `pde_core::oci`; this file
//! only hands them the engine's parts, as `stages.rs` does for the other
//! steps, so that `pde deploy` and `pde rollback` move the tag the same way.

use std::time::{Duration, Instant};

use futures::future::BoxFuture;

use crate::config::{Environment, Gate, OciDelivery};
use crate::engine::Engine;
use crate::error::Error;
use crate::http::Target;
use crate::report::RollbackTarget;
use crate::steps::envcheck::readiness::CheckResult;
use crate::steps::push::publish::{self, DeliveryError, FleetCheck, Publish, RegistryReport};
use crate::steps::push::{self, Observer, PushReport};
use crate::steps::waves::{self, Vars};
use pde_core::oci::Registry;

/// One environment's tag, as `pde status --registry` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TagStatus {
    /// The environment.
    pub env: String,
    /// `HOST[:PORT]/REPOSITORY`.
    pub repository: String,
    /// `<policy>.<env>`.
    pub tag: String,
    /// The manifest digest it points at (`None`: no such tag).
    pub manifest_digest: Option<String>,
    /// Why it could not be read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Engine {
    /// `env` with its name, when it is delivered through a registry.
    pub(crate) fn oci_env<'a>(
        &'a self,
        env: &'a Environment,
    ) -> Option<(&'a str, &'a OciDelivery)> {
        let oci = env.oci()?;
        let name = self
            .config
            .environments
            .iter()
            .find(|(_, e)| std::ptr::eq(*e, env))
            .map_or("?", |(n, _)| n.as_str());
        Some((name, oci))
    }

    /// The registry client of an OCI environment, credentials read now.
    pub(crate) fn registry(&self, env_name: &str, oci: &OciDelivery) -> Result<Registry, Error> {
        let wrap = |source| DeliveryError {
            env: env_name.to_string(),
            source,
        };
        let mut options = oci.options().map_err(wrap)?;
        options.timeout = self
            .config
            .push
            .timeout()
            .max(std::time::Duration::from_secs(5));
        Ok(Registry::new(oci.repository().map_err(wrap)?, options).map_err(wrap)?)
    }

    /// Step 3's registry check: `GET /v2/` answers.
    pub(crate) async fn registry_check(&self, env_name: &str, oci: &OciDelivery) -> CheckResult {
        let started = Instant::now();
        let result = match self.registry(env_name, oci) {
            Ok(r) => r.ping().await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        CheckResult {
            name: "registry".into(),
            kind: "registry".into(),
            passed: result.is_ok(),
            detail: match result {
                Ok(()) => format!("{} answers GET /v2/", oci.reference),
                Err(e) => e,
            },
            overridden: None,
            elapsed_ms: started.elapsed().as_millis() as u64,
        }
    }

    /// Step 5 of an OCI environment: publish, move the tag, wait for the
    /// routed services to converge, re-point the tag back if they do not.
    pub(crate) async fn publish_stage(
        &self,
        bundle: &pde_core::bundle::Bundle,
        env_name: &str,
        oci: &OciDelivery,
        routed: &[Target],
        observer: &dyn Observer,
    ) -> Result<PushReport, Error> {
        let registry = self.registry(env_name, oci)?;
        let gates = FleetGates {
            http: &self.http,
            gates: &oci.converge_gates,
            timeout: self.config.push.timeout(),
        };
        let p = Publish {
            registry: &registry,
            http: &self.http,
            push: &self.config.push,
            converge_timeout: oci.converge_timeout(),
            fleet: (!oci.converge_gates.is_empty()).then_some(&gates as &dyn FleetCheck),
        };
        let (report, _) = publish::publish(&p, bundle, env_name, routed, observer).await;
        Ok(report)
    }

    /// `pde rollback` of an OCI environment: points the tag at the release
    /// `digest` (pushed again from the stored bundle, which gives the same
    /// manifest) and waits for `targets` to report it.
    pub(crate) async fn oci_rollback(
        &self,
        (env_name, oci): (&str, &OciDelivery),
        (policy_id, version, digest): (&str, &str, &str),
        targets: &[Target],
    ) -> Result<(Vec<RollbackTarget>, RegistryReport), Error> {
        let stored = crate::state::stored_bundle(
            &*self.state,
            &self.dist_dir(),
            policy_id,
            version,
            digest,
        )?;
        let bundle = stored.map_err(|why| crate::error::RollbackError::NoSuchVersion {
            policy_id: policy_id.to_string(),
            env: env_name.to_string(),
            wanted: format!(
                "{version} ({digest}: its bundle cannot be read to publish it again: {why})"
            ),
        })?;
        let bundle = &bundle;
        let registry = self.registry(env_name, oci)?;
        let p = Publish {
            registry: &registry,
            http: &self.http,
            push: &self.config.push,
            converge_timeout: oci.converge_timeout(),
            // A rollback waits for the listed services only: a fleet gate
            // that failed here would re-point the tag at the very release
            // being rolled back from.
            fleet: None,
        };
        let (report, reg) = publish::publish(&p, bundle, env_name, targets, &()).await;
        let ok = report.outcome == push::Outcome::Deployed;
        let results = report
            .targets
            .into_iter()
            .map(|t| RollbackTarget {
                service: t.service,
                ok: ok
                    && matches!(
                        t.state,
                        push::TargetState::Delivered | push::TargetState::Unchanged
                    ),
                detail: if ok {
                    format!("followed tag {} to {}", reg.tag, bundle.digest)
                } else {
                    t.detail
                },
            })
            .collect();
        Ok((results, reg))
    }

    /// What each policy's tag points at in every OCI environment (or `env`).
    pub async fn registry_tags(
        &self,
        env: Option<&str>,
        policies: &[String],
    ) -> Result<Vec<TagStatus>, Error> {
        let mut out = Vec::new();
        let envs: Vec<(&String, &Environment)> = self
            .config
            .environments
            .iter()
            .filter(|(name, _)| env.is_none_or(|e| e == name.as_str()))
            .collect();
        for (name, environment) in envs {
            let Some(oci) = environment.oci() else {
                continue;
            };
            let registry = self.registry(name, oci)?;
            for policy in policies {
                let tag = match pde_core::oci::policy_tag(policy, name) {
                    Ok(t) => t,
                    Err(_) => continue,
                };
                let (manifest_digest, error) = match registry.resolve(&tag).await {
                    Ok(d) => (d, None),
                    Err(e) => (None, Some(e.to_string())),
                };
                out.push(TagStatus {
                    env: name.clone(),
                    repository: oci.reference.clone(),
                    tag,
                    manifest_digest,
                    error,
                });
            }
        }
        Ok(out)
    }
}

/// How often the fleet's gates are asked again while they do not pass
/// (Prometheus scrapes every few seconds; asking faster learns nothing).
const FLEET_POLL: Duration = Duration::from_secs(1);

/// An environment's `converge_gates`, evaluated as a rollout's gates are
/// (`steps::waves::evaluate`), with the release's `${policy_id}`,
/// `${version}` and `${digest}`, until every one passes or the deadline.
struct FleetGates<'a> {
    http: &'a reqwest::Client,
    gates: &'a [Gate],
    timeout: Duration,
}

impl FleetCheck for FleetGates<'_> {
    fn converged<'a>(
        &'a self,
        bundle: &'a pde_core::bundle::Bundle,
        deadline: Instant,
    ) -> BoxFuture<'a, Result<serde_json::Value, serde_json::Value>> {
        Box::pin(async move {
            let manifest = &bundle.payload.manifest;
            let vars = Vars {
                policy_id: &manifest.policy_id,
                version: &manifest.version,
                digest: &bundle.digest,
                wave: "",
                services: Vec::new(),
                baseline: Vec::new(),
            };
            let mut rounds = 0u32;
            loop {
                rounds += 1;
                let mut results = Vec::new();
                for gate in self.gates {
                    // Plugin gates are refused here when pde.toml is read.
                    match waves::evaluate(self.http, gate, &vars, self.timeout, None).await {
                        Ok(r) => results.extend(r),
                        Err(e) => return Err(serde_json::json!({"error": e.to_string()})),
                    }
                }
                let passed = results.iter().all(|r| r.passed);
                let seen = serde_json::json!({
                    "passed": passed, "evaluations": rounds, "gates": results,
                });
                if passed {
                    return Ok(seen);
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(seen);
                }
                tokio::time::sleep(left.min(FLEET_POLL)).await;
            }
        })
    }
}
