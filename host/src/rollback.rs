//! `pde rollback ID --env ENV [--to VERSION]`: return an environment to a
//! version it ran before.
//!
//! This is the one path allowed to lower a version. The services that hold
//! the current release are asked to reactivate the earlier bundle, which they
//! still store (agents keep their last N bundles), and each is verified with
//! `GET /active` afterwards. The release tags are left alone: tags record what
//! was released, and a tag is never moved.

use serde::Serialize;
use serde_json::json;

use crate::audit::Event;
use crate::engine::Engine;
use crate::error::{Error, ExitCode, HasExitCode};
use crate::push::{self, Target};
use crate::state::{DeploymentRecord, TargetRecord};

/// Why a rollback could not be started.
#[derive(Debug, thiserror::Error)]
pub enum RollbackError {
    /// Nothing has been deployed there.
    #[error("policy {policy_id} has no active version in {env}; nothing to roll back")]
    NothingActive {
        /// The policy.
        policy_id: String,
        /// The environment.
        env: String,
    },
    /// No earlier deployed version to go back to (or not the one asked for).
    #[error("policy {policy_id} has no deployed version {wanted} in {env} to roll back to")]
    NoSuchVersion {
        /// The policy.
        policy_id: String,
        /// The environment.
        env: String,
        /// What was asked for (`previous` when no `--to`).
        wanted: String,
    },
    /// Some service did not take the earlier bundle.
    #[error("rollback of {policy_id} in {env} failed on: {failed}")]
    Failed {
        /// The policy.
        policy_id: String,
        /// The environment.
        env: String,
        /// The services that failed, with why.
        failed: String,
        /// The full report.
        report: Box<RollbackReport>,
    },
}

impl HasExitCode for RollbackError {
    fn exit_code(&self) -> ExitCode {
        match self {
            RollbackError::NothingActive { .. } | RollbackError::NoSuchVersion { .. } => {
                ExitCode::Usage
            }
            RollbackError::Failed { .. } => ExitCode::DeployFailed,
        }
    }
}

/// What a rollback did.
#[derive(Debug, Clone, Serialize)]
pub struct RollbackReport {
    /// The policy.
    pub policy_id: String,
    /// The environment.
    pub env: String,
    /// The version that was active.
    pub from_version: String,
    /// The digest that was active.
    pub from_digest: String,
    /// The version now active.
    pub to_version: String,
    /// The digest now active.
    pub to_digest: String,
    /// Per service: `rolled-back` or the error.
    pub targets: Vec<RollbackTarget>,
}

/// One service's part in a rollback.
#[derive(Debug, Clone, Serialize)]
pub struct RollbackTarget {
    /// The service.
    pub service: String,
    /// True when it now reports the earlier digest as active.
    pub ok: bool,
    /// What happened.
    pub detail: String,
}

impl Engine {
    /// Rolls `policy_id` in `env_name` back to `to` (a version), or to the
    /// version deployed before the active one.
    pub fn rollback(
        &self,
        policy_id: &str,
        env_name: &str,
        to: Option<&str>,
    ) -> Result<RollbackReport, Error> {
        let env = self.environment(env_name)?;
        let _lock = self.state.lock(policy_id, env_name)?;
        let active = self.state.active(policy_id, env_name)?.ok_or_else(|| {
            RollbackError::NothingActive {
                policy_id: policy_id.to_string(),
                env: env_name.to_string(),
            }
        })?;
        let history = self.state.history(policy_id)?;
        let deployed = |d: &&DeploymentRecord| {
            d.env == env_name && (d.outcome == "deployed" || d.outcome == "rollback")
        };
        let target = history
            .iter()
            .filter(deployed)
            .find(|d| match to {
                Some(v) => d.version == v && d.digest != active.digest,
                None => d.digest != active.digest,
            })
            .ok_or_else(|| RollbackError::NoSuchVersion {
                policy_id: policy_id.to_string(),
                env: env_name.to_string(),
                wanted: to.unwrap_or("previous").to_string(),
            })?
            .clone();
        // The services that hold the active release are the ones to send back.
        let holders: Vec<String> = history
            .iter()
            .filter(deployed)
            .find(|d| d.digest == active.digest)
            .map(|d| d.targets.iter().map(|t| t.service.clone()).collect())
            .unwrap_or_else(|| env.services.iter().map(|s| s.name.clone()).collect());
        let targets = env
            .services
            .iter()
            .filter(|s| holders.contains(&s.name))
            .map(Target::from_service)
            .collect::<Result<Vec<_>, _>>()?;

        let started_at = crate::state::now_rfc3339();
        let results = self.runtime.block_on(async {
            let calls = targets.iter().map(|t| async {
                let result = match push::rollback(
                    &self.http,
                    t,
                    policy_id,
                    Some(&target.digest),
                    &self.config.push,
                )
                .await
                {
                    Ok(()) => {
                        match push::get_active(&self.http, t, policy_id, &self.config.push).await {
                            Ok(Some(a)) if a.digest == target.digest => Ok(()),
                            Ok(other) => Err(format!(
                                "verify failed: active is {}",
                                other.map_or("nothing".to_string(), |a| a.digest)
                            )),
                            Err(e) => Err(e.to_string()),
                        }
                    }
                    Err(e) => Err(e.to_string()),
                };
                RollbackTarget {
                    service: t.service.clone(),
                    ok: result.is_ok(),
                    detail: result.err().unwrap_or_else(|| "rolled-back".into()),
                }
            });
            futures::future::join_all(calls).await
        });
        let report = RollbackReport {
            policy_id: policy_id.to_string(),
            env: env_name.to_string(),
            from_version: active.version.clone(),
            from_digest: active.digest.clone(),
            to_version: target.version.clone(),
            to_digest: target.digest.clone(),
            targets: results,
        };
        self.record(
            Event::RolledBack,
            policy_id,
            env_name,
            serde_json::to_value(&report).unwrap_or_else(|_| json!({})),
        )?;
        for t in &report.targets {
            let holds =
                t.ok.then_some((target.version.as_str(), target.digest.as_str()));
            self.state
                .set_service_active(policy_id, env_name, &t.service, holds)?;
        }
        let failed: Vec<String> = report
            .targets
            .iter()
            .filter(|t| !t.ok)
            .map(|t| format!("{} ({})", t.service, t.detail))
            .collect();
        self.state.record(&DeploymentRecord {
            id: None,
            policy_id: policy_id.to_string(),
            env: env_name.to_string(),
            version: target.version.clone(),
            digest: target.digest.clone(),
            outcome: if failed.is_empty() {
                "rollback"
            } else {
                "rollback-failed"
            }
            .into(),
            started_at,
            finished_at: crate::state::now_rfc3339(),
            actor: crate::audit::default_actor(),
            targets: report
                .targets
                .iter()
                .map(|t| TargetRecord {
                    service: t.service.clone(),
                    outcome: if t.ok { "rolled-back" } else { "failed" }.into(),
                    previous_digest: Some(active.digest.clone()),
                    detail: t.detail.clone(),
                })
                .collect(),
        })?;
        if !failed.is_empty() {
            return Err(Error::Rollback(RollbackError::Failed {
                policy_id: policy_id.to_string(),
                env: env_name.to_string(),
                failed: failed.join(", "),
                report: Box::new(report),
            }));
        }
        self.state
            .set_active(policy_id, env_name, &target.version, &target.digest)?;
        Ok(report)
    }
}
