//! Deploys that were refused before anything was pushed, read back from
//! the audit log, so `pde history` shows them beside the deployments.
//!
//! The state database only gets a deployment row once a push begins; a
//! deploy refused by validation, packaging, the environment check or the
//! lock leaves only its audit records (`deploy_start` … `deploy_failed`).
//! A person asking "what happened to 42 in production?" needs both.

use serde::Serialize;

use crate::audit::{AuditRecord, Event};

/// A deploy refused before any push.
#[derive(Debug, Clone, Serialize)]
pub struct Refused {
    /// The policy.
    pub policy_id: String,
    /// The environment.
    pub env: String,
    /// The version, when validation got far enough to read it.
    pub version: Option<String>,
    /// The bundle digest, when it was packaged.
    pub digest: Option<String>,
    /// When the deploy started (its `deploy_start`).
    pub started_at: String,
    /// When it was refused (its `deploy_failed`).
    pub finished_at: String,
    /// Who ran it.
    pub actor: String,
    /// The database role that wrote its records, for a team's PostgreSQL
    /// chain (`data.actor_db_role`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub actor_db_role: Option<String>,
    /// The refusal, as pde said it.
    pub reason: String,
    /// The exit code it ended with.
    pub exit_code: Option<i64>,
}

/// The refused deploys of `policy_id` in `records` (the audit log, oldest
/// first), oldest first. A deploy counts as refused when it ended
/// `deploy_failed` with no `pushed` or `push_failed` record since its
/// `deploy_start`: a deploy that pushed has a deployment row already.
pub fn refused(records: &[AuditRecord], policy_id: &str) -> Vec<Refused> {
    // One deploy of a policy and environment at a time (the lock), so the
    // records of each pair read as a sequence of runs.
    let mut open: std::collections::BTreeMap<&str, Refused> = Default::default();
    let mut pushed: std::collections::BTreeSet<&str> = Default::default();
    let mut out = Vec::new();
    for r in records.iter().filter(|r| r.policy_id == policy_id) {
        let env = r.env.as_str();
        match r.event {
            Event::DeployStart => {
                pushed.remove(env);
                open.insert(
                    env,
                    Refused {
                        policy_id: r.policy_id.clone(),
                        env: r.env.clone(),
                        version: None,
                        digest: None,
                        started_at: r.ts.clone(),
                        finished_at: r.ts.clone(),
                        actor: r.actor.clone(),
                        actor_db_role: r
                            .data
                            .get(crate::audit::record::DB_ROLE_FIELD)
                            .and_then(|v| v.as_str())
                            .map(str::to_string),
                        reason: String::new(),
                        exit_code: None,
                    },
                );
            }
            Event::Validated | Event::ValidationFailed | Event::Packaged => {
                if let Some(run) = open.get_mut(env) {
                    if let Some(v) = r.data.get("version").and_then(|v| v.as_str()) {
                        run.version = Some(v.to_string());
                    }
                    if let Some(d) = r.data.get("digest").and_then(|v| v.as_str()) {
                        run.digest = Some(d.to_string());
                    }
                }
            }
            Event::Pushed | Event::PushFailed => {
                pushed.insert(env);
            }
            Event::Deployed => {
                open.remove(env);
            }
            Event::DeployFailed => {
                if let Some(mut run) = open.remove(env)
                    && !pushed.contains(env)
                {
                    run.finished_at = r.ts.clone();
                    run.reason = r
                        .data
                        .get("error")
                        .and_then(|v| v.as_str())
                        .unwrap_or_default()
                        .to_string();
                    run.exit_code = r.data.get("exit_code").and_then(|v| v.as_i64());
                    out.push(run);
                }
            }
            _ => {}
        }
    }
    out
}
