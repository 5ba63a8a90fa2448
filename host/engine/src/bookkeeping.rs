//! The deployment bookkeeping a deploy and a rollback share: one record in
//! the state that says a change is under way before any byte leaves, and
//! then how it ended, what each service holds, and what is active.
//!
//! Recorded `in-progress` first so that a process killed mid-push shows as
//! interrupted rather than not at all; the next deploy or rollback of that
//! policy and environment settles it.

use crate::state::{DeploymentRecord, RecordOutcome, StateError, StateStore, TargetRecord};

/// A deploy or rollback under way, recorded in the state.
pub struct Deployment<'a> {
    state: &'a StateStore,
    id: i64,
    record: DeploymentRecord,
}

impl<'a> Deployment<'a> {
    /// Records that `version`/`digest` of `policy_id` is being sent to
    /// `targets` of `env`: `(service, digest it held before, if known)`.
    pub fn begin(
        state: &'a StateStore,
        policy_id: &str,
        env: &str,
        version: &str,
        digest: &str,
        targets: impl IntoIterator<Item = (String, Option<String>)>,
    ) -> Result<Deployment<'a>, StateError> {
        let now = pde_core::clock::now_rfc3339();
        // On a team's database, who ran it and the role it wrote as, as
        // the audit records and the lease say it (issue 24).
        let actor = match state.db_role()? {
            Some(role) => format!("{} (database role {role})", crate::audit::default_actor()),
            None => crate::audit::default_actor(),
        };
        let record = DeploymentRecord {
            id: None,
            policy_id: policy_id.to_string(),
            env: env.to_string(),
            version: version.to_string(),
            digest: digest.to_string(),
            outcome: RecordOutcome::InProgress,
            started_at: now.clone(),
            finished_at: now,
            actor,
            targets: targets
                .into_iter()
                .map(|(service, previous_digest)| TargetRecord {
                    service,
                    outcome: "pending".into(),
                    previous_digest,
                    detail: String::new(),
                })
                .collect(),
        };
        let id = state.begin(&record)?;
        Ok(Deployment { state, id, record })
    }

    /// Records how it ended: the outcome, each target's result, and what
    /// each service now holds (`None`: unknown, someone must look). An
    /// outcome that took effect makes the version the active one.
    pub fn finish<'h>(
        self,
        outcome: RecordOutcome,
        targets: Vec<TargetRecord>,
        holdings: impl IntoIterator<Item = (String, Option<(&'h str, &'h str)>)>,
    ) -> Result<(), StateError> {
        let Deployment { state, id, record } = self;
        let done = DeploymentRecord {
            outcome,
            targets,
            finished_at: pde_core::clock::now_rfc3339(),
            ..record
        };
        state.finish(id, &done)?;
        for (service, holds) in holdings {
            state.set_service_active(&done.policy_id, &done.env, &service, holds)?;
        }
        if outcome.took_effect() {
            state.set_active(&done.policy_id, &done.env, &done.version, &done.digest)?;
        }
        Ok(())
    }
}

/// The deployments and rollbacks the state records that the audit chain
/// has no record of, one sentence each.
///
/// The chain alone proves only that it was not edited after its signed
/// head; a head saved before a rollback and put back after its records were
/// cut off still verifies. The state is a second witness written by the
/// same deploy: every push appends `pushed` or `push_failed`, and every
/// rollback `rolled_back`, to the chain before the state records its
/// outcome, so a state entry without its record means the chain lost it.
pub fn unrecorded(
    history: &[DeploymentRecord],
    records: &[crate::audit::AuditRecord],
) -> Vec<String> {
    use crate::audit::Event;
    use std::collections::HashMap;
    // (event, policy, env, digest) → how many the chain holds.
    let mut held: HashMap<(Event, &str, &str, &str), usize> = HashMap::new();
    for r in records {
        let digest = match r.event {
            Event::Pushed | Event::PushFailed => r.data["digest"].as_str(),
            Event::RolledBack => r.data["to_digest"].as_str(),
            _ => None,
        };
        if let Some(digest) = digest {
            *held
                .entry((r.event, &r.policy_id, &r.env, digest))
                .or_default() += 1;
        }
    }
    let mut missing = Vec::new();
    for d in history {
        let event = match d.outcome {
            RecordOutcome::Deployed => Event::Pushed,
            RecordOutcome::RolledBack | RecordOutcome::NeedsAttention => Event::PushFailed,
            RecordOutcome::Rollback | RecordOutcome::RollbackFailed => Event::RolledBack,
            RecordOutcome::InProgress | RecordOutcome::Interrupted => continue,
        };
        let key = (
            event,
            d.policy_id.as_str(),
            d.env.as_str(),
            d.digest.as_str(),
        );
        match held.get_mut(&key) {
            Some(n) if *n > 0 => *n -= 1,
            _ => missing.push(format!(
                "the state records a {} of policy {} in {} ({}, {}) that the audit log has no \
                 `{}` record of",
                d.outcome,
                d.policy_id,
                d.env,
                d.digest,
                d.finished_at,
                serde_json::to_value(event)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default()
            )),
        }
    }
    missing
}
