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
        let record = DeploymentRecord {
            id: None,
            policy_id: policy_id.to_string(),
            env: env.to_string(),
            version: version.to_string(),
            digest: digest.to_string(),
            outcome: RecordOutcome::InProgress,
            started_at: now.clone(),
            finished_at: now,
            actor: crate::audit::default_actor(),
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
