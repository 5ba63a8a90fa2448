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
//! which forwards in the background. A dry run records nothing. Each append
//! first re-checks the deploy lock the records are made under (fencing, see
//! [`crate::state::lock`]): a holder whose lock is gone records nothing
//! more in its name.

use serde_json::Value;

use crate::audit::outbox::Outbox;
use crate::audit::{AuditEntry, AuditError, AuditLog, AuditRecord, Event};
use crate::state::{DeployLock, StateError};

/// Why a record was not appended.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The audit log refused or failed the append.
    #[error(transparent)]
    Audit(#[from] AuditError),
    /// The deploy lock is gone, so nothing more is recorded in its name.
    #[error(transparent)]
    Lock(#[from] StateError),
}

/// Appends the records of one policy and environment, each only while the
/// deploy lock it runs under is still held.
#[derive(Clone, Copy)]
pub struct Recorder<'a> {
    log: &'a AuditLog,
    outbox: Option<&'a Outbox>,
    policy_id: &'a str,
    env: &'a str,
    /// `None`: a dry run, which records nothing, unless `unlocked`.
    lock: Option<&'a DeployLock>,
    /// Records without a lock: a person's request about a rollout that
    /// another process runs under its lock (`pde rollout promote|abort`).
    unlocked: bool,
}

impl<'a> Recorder<'a> {
    /// A recorder for `policy_id` in `env` under `lock`; `None` records
    /// nothing (a dry run holds no lock).
    pub fn new(
        log: &'a AuditLog,
        outbox: Option<&'a Outbox>,
        policy_id: &'a str,
        env: &'a str,
        lock: Option<&'a DeployLock>,
    ) -> Self {
        Recorder {
            log,
            outbox,
            policy_id,
            env,
            lock,
            unlocked: false,
        }
    }

    /// A recorder that appends without holding the deploy lock, for what a
    /// person asks of a rollout another process holds the lock for
    /// (promote, abort): the request is not a side effect under that lock,
    /// and the record's actor names who asked.
    pub fn unlocked(
        log: &'a AuditLog,
        outbox: Option<&'a Outbox>,
        policy_id: &'a str,
        env: &'a str,
    ) -> Self {
        Recorder {
            log,
            outbox,
            policy_id,
            env,
            lock: None,
            unlocked: true,
        }
    }

    /// The deploy lock the records are made under (`None` in a dry run).
    pub fn lock(&self) -> Option<&'a DeployLock> {
        self.lock
    }

    /// Appends one record (nothing in a dry run), after checking that the
    /// deploy lock is still held ([`DeployLock::check`]).
    pub fn record(&self, event: Event, data: Value) -> Result<Option<AuditRecord>, RecordError> {
        Ok(self.record_all(event, vec![data])?.pop())
    }

    /// Appends one record per item of `data`, all of `event`, in one durable
    /// step (one fsync, or one transaction): what one action produced at
    /// once, such as every gate result of a wave. Nothing in a dry run.
    pub fn record_all(
        &self,
        event: Event,
        data: Vec<Value>,
    ) -> Result<Vec<AuditRecord>, RecordError> {
        self.record_each(data.into_iter().map(|d| (event, d)).collect())
    }

    /// Appends one record per `(event, data)`, in order, in one durable
    /// step. Nothing in a dry run.
    pub fn record_each(&self, items: Vec<(Event, Value)>) -> Result<Vec<AuditRecord>, RecordError> {
        match self.lock {
            Some(lock) => lock.check("recording to the audit log")?,
            None if self.unlocked => {}
            None => return Ok(Vec::new()),
        }
        let entries = items
            .into_iter()
            .map(|(event, data)| AuditEntry {
                event,
                policy_id: self.policy_id.to_string(),
                env: self.env.to_string(),
                data,
            })
            .collect();
        let records = self.log.append_all(entries)?;
        if let Some(outbox) = self.outbox {
            outbox.wake();
        }
        Ok(records)
    }
}
