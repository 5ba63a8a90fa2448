//! Step 7, audit, is cross-cutting rather than a step that runs after the
//! others: `pipeline.rs` (and `rollback.rs`) append a record to the
//! hash-chained audit log as each step ends, so the log tells what happened
//! even when a later step fails. The steps themselves never see the
//! [`Recorder`]: which record a step ends with depends on the command
//! (`pde validate` writes none). The closing `deployed` or `deploy_failed`
//! record is the step's own.
//!
//! A [`Recorder`] is made by the pipeline for one deploy: it knows the
//! policy and environment, appends durably (the record is stored, fsynced
//! or committed, before `record` returns), and wakes the sink's outbox,
//! which forwards in the background. A dry run records nothing.

use serde_json::Value;

use crate::audit::outbox::Outbox;
use crate::audit::{AuditError, AuditLog, AuditRecord, Event};

/// Appends the records of one policy and environment.
#[derive(Clone, Copy)]
pub struct Recorder<'a> {
    log: &'a AuditLog,
    outbox: Option<&'a Outbox>,
    policy_id: &'a str,
    env: &'a str,
    enabled: bool,
}

impl<'a> Recorder<'a> {
    /// A recorder for `policy_id` in `env`; `enabled: false` records nothing
    /// (a dry run).
    pub fn new(
        log: &'a AuditLog,
        outbox: Option<&'a Outbox>,
        policy_id: &'a str,
        env: &'a str,
        enabled: bool,
    ) -> Self {
        Recorder {
            log,
            outbox,
            policy_id,
            env,
            enabled,
        }
    }

    /// Appends one record (nothing in a dry run).
    pub fn record(&self, event: Event, data: Value) -> Result<Option<AuditRecord>, AuditError> {
        if !self.enabled {
            return Ok(None);
        }
        let record = self.log.append(event, self.policy_id, self.env, data)?;
        if let Some(outbox) = self.outbox {
            outbox.wake();
        }
        Ok(Some(record))
    }
}
