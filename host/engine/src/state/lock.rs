//! The deploy lock a backend hands out, whatever holds it underneath (an
//! OS file lock, a PostgreSQL advisory lock), and what every backend's
//! locks check and note.
//!
//! **Fencing** (issue 21 item 3, push protocol v4). Each acquisition gets a
//! fencing number ([`DeployLock::fence`], see [`pde_core::fence`]) that the
//! holder sends with every deploy and rollback; receivers refuse a lower
//! one. Before each side effect (push, tag, audit record) the holder asks
//! its lock whether it still holds it ([`DeployLock::check`]), and stops
//! with [`StateError::LockLost`] (exit 7) if not. What each backend can
//! tell:
//! - PostgreSQL: the advisory lock lives in the holder's database session.
//!   The check asks, on that session, whether the server still lists the
//!   lock as granted to it and whether the lock's fence is still this
//!   holder's; a session the server ended (a failover, a dropped
//!   connection, `pg_terminate_backend`) fails the check. Fences come from
//!   the server's clock, so a team's are ordered whatever its machines'
//!   clocks say.
//! - SQLite: the OS holds the file lock for as long as the process lives,
//!   so the check can only find the lock file removed or replaced under it
//!   (another deploy could then lock a new file). Fences come from this
//!   machine's clock.
//!
//! A check narrows the window; it cannot close it (a holder can pause
//! right after a check). The receivers' fence check is what closes it.

use std::path::Path;

use super::StateError;

/// What a backend's held lock is: released when dropped, and by the
/// backend's own means (the OS, the database server) when its holder dies.
pub trait HeldLock: Send + Sync + std::fmt::Debug {
    /// The lock file, for a backend that locks files.
    fn path(&self) -> Option<&Path> {
        None
    }
    /// `Err(why)` when the lock is no longer held by this holder, or
    /// whether it is cannot be told (which counts as lost).
    fn still_held(&self, fence: u64) -> Result<(), String>;
}

/// Holds the deploy lock of one policy and environment until dropped.
#[derive(Debug)]
pub struct DeployLock {
    /// Held for its `Drop`, which releases the lock.
    held: Box<dyn HeldLock>,
    policy_id: String,
    env: String,
    fence: u64,
}

impl DeployLock {
    /// Wraps a backend's held lock of `policy_id` in `env`, acquired with
    /// fencing number `fence`.
    pub fn new(
        held: impl HeldLock + 'static,
        policy_id: &str,
        env: &str,
        fence: u64,
    ) -> DeployLock {
        DeployLock {
            held: Box::new(held),
            policy_id: policy_id.to_string(),
            env: env.to_string(),
            fence,
        }
    }

    /// The lock file, for a backend that locks files (SQLite).
    pub fn path(&self) -> Option<&Path> {
        self.held.path()
    }

    /// The fencing number of this acquisition.
    pub fn fence(&self) -> u64 {
        self.fence
    }

    /// Confirms the lock is still held before the side effect named by
    /// `before` (`pushing`, `tagging`, `recording …`); otherwise
    /// [`StateError::LockLost`].
    pub fn check(&self, before: &'static str) -> Result<(), StateError> {
        self.held.still_held(self.fence).map_err(|reason| {
            tracing::error!(policy_id = %self.policy_id, env = %self.env, fence = self.fence, %reason, before, "deploy lock lost");
            StateError::LockLost {
                policy_id: self.policy_id.clone(),
                env: self.env.clone(),
                fence: self.fence,
                reason,
                before,
            }
        })
    }
}

/// Refuses a policy id or environment that cannot name a lock (file).
pub(crate) fn check_name(what: &'static str, value: &str) -> Result<(), StateError> {
    if crate::policy::store::valid_id(value) {
        Ok(())
    } else {
        Err(StateError::BadName {
            what,
            value: value.to_string(),
        })
    }
}

/// This machine's name, for lease records.
pub(crate) fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".to_string())
}
