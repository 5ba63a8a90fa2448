//! `pde rollback ID --env ENV [--to VERSION]`: return an environment to a
//! version it ran before.
//!
//! This is the one path allowed to lower a version. The services that hold
//! the current release are asked to reactivate the earlier bundle, which they
//! still store (agents keep their last N bundles), and each is verified with
//! `GET /active` afterwards. The release tags are left alone: tags record what
//! was released, and a tag is never moved.

use serde_json::json;

use crate::audit::Event;
use crate::bookkeeping::Deployment;
use crate::engine::Engine;
use crate::error::Error;
use crate::push;
use crate::state::{DeploymentRecord, RecordOutcome, TargetRecord};

pub use crate::error::RollbackError;
pub use crate::report::{RollbackReport, RollbackTarget};

impl Engine {
    /// Rolls `policy_id` in `env_name` back to `to` (a version), or to the
    /// version deployed before the active one.
    pub async fn rollback(
        &self,
        policy_id: &str,
        env_name: &str,
        to: Option<&str>,
    ) -> Result<RollbackReport, Error> {
        self.rollback_with_reason(policy_id, env_name, to, None)
            .await
    }

    /// [`Engine::rollback`], recording `reason` (`pde rollback --reason`)
    /// on the audit log's `rolled_back` record as `data.reason`.
    pub async fn rollback_with_reason(
        &self,
        policy_id: &str,
        env_name: &str,
        to: Option<&str>,
        reason: Option<&str>,
    ) -> Result<RollbackReport, Error> {
        let env = self.environment(env_name)?;
        let lock = self.state.lock(policy_id, env_name)?;
        self.settle_interrupted(policy_id, env_name)?;
        let config = self.config_in_force()?;
        // A rollback is the emergency exit: a change freeze does not stop
        // it, but its record says which freezes were in force.
        let freezes = env.freezes_in_force(jiff::Timestamp::now());
        if !freezes.is_empty() {
            tracing::warn!(?freezes, "rolling back during a change freeze");
        }
        let active = self.state.active(policy_id, env_name)?.ok_or_else(|| {
            RollbackError::NothingActive {
                policy_id: policy_id.to_string(),
                env: env_name.to_string(),
            }
        })?;
        let history = self.state.history(policy_id)?;
        let deployed = |d: &&DeploymentRecord| d.env == env_name && d.outcome.took_effect();
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
            .map(|s| self.target(s))
            .collect::<Result<Vec<_>, _>>()?;

        self.key_audit_head()?;
        // A rollback carries the same authority as a deploy: the release key
        // signs each request (push protocol v3), or agents refuse it.
        let signer = self.rollback_signer()?;
        // Fenced like a deploy (push protocol v4): nothing is sent by a
        // holder whose lock is gone, and every request carries its fence.
        lock.check("rolling back")?;
        let in_progress = Deployment::begin(
            &self.state,
            policy_id,
            env_name,
            &target.version,
            &target.digest,
            targets
                .iter()
                .map(|t| (t.service.clone(), Some(active.digest.clone()))),
        )?;
        let mut registry = None;
        let results = if let Some(oci) = env.oci() {
            // OCI delivery: the tag is pointed at the earlier release, and
            // the holders' agents follow it.
            let release = (policy_id, target.version.as_str(), target.digest.as_str());
            let (results, moved) = self
                .oci_rollback((env_name, oci), release, &targets)
                .await?;
            registry = serde_json::to_value(&moved).ok();
            results
        } else {
            let calls = targets.iter().map(|t| async {
                let request = push::RollbackRequest {
                    policy_id,
                    to: Some(&target.digest),
                    env: env_name,
                    signer: signer.as_ref(),
                    fence: Some(lock.fence()),
                };
                let result = match push::rollback(&self.http, t, request, &self.config.push).await {
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
        };
        let report = RollbackReport {
            policy_id: policy_id.to_string(),
            env: env_name.to_string(),
            from_version: active.version.clone(),
            from_digest: active.digest.clone(),
            to_version: target.version.clone(),
            to_digest: target.digest.clone(),
            targets: results,
            registry,
        };
        crate::steps::audit::Recorder::new(
            &self.audit,
            self.outbox.as_ref(),
            policy_id,
            env_name,
            Some(&lock),
        )
        .record(Event::RolledBack, {
            let mut data = serde_json::to_value(&report).unwrap_or_else(|_| json!({}));
            data["config"] = json!(config);
            data["freezes_in_force"] = json!(freezes);
            if let Some(reason) = reason {
                data["reason"] = reason.into();
            }
            data
        })?;
        let failed: Vec<String> = report
            .targets
            .iter()
            .filter(|t| !t.ok)
            .map(|t| format!("{} ({})", t.service, t.detail))
            .collect();
        let outcome = match failed.is_empty() {
            true => RecordOutcome::Rollback,
            false => RecordOutcome::RollbackFailed,
        };
        let records = report
            .targets
            .iter()
            .map(|t| TargetRecord {
                service: t.service.clone(),
                outcome: if t.ok { "rolled-back" } else { "failed" }.into(),
                previous_digest: Some(active.digest.clone()),
                detail: t.detail.clone(),
            })
            .collect();
        let holdings = report.targets.iter().map(|t| {
            let holds =
                t.ok.then_some((target.version.as_str(), target.digest.as_str()));
            (t.service.clone(), holds)
        });
        in_progress.finish(outcome, records, holdings)?;
        if !failed.is_empty() {
            return Err(Error::Rollback(RollbackError::Failed {
                policy_id: policy_id.to_string(),
                env: env_name.to_string(),
                failed: failed.join(", "),
                report: Box::new(report),
            }));
        }
        Ok(report)
    }
}
