//! The deploy lock a backend hands out, whatever holds it underneath (an
//! OS file lock, a PostgreSQL advisory lock), and what every backend's
//! locks check and note.

use std::path::Path;

use super::StateError;

/// What a backend's held lock is: released when dropped, and by the
/// backend's own means (the OS, the database server) when its holder dies.
pub trait HeldLock: Send + std::fmt::Debug {
    /// The lock file, for a backend that locks files.
    fn path(&self) -> Option<&Path> {
        None
    }
}

/// Holds the deploy lock of one policy and environment until dropped.
#[derive(Debug)]
pub struct DeployLock {
    /// Held for its `Drop`, which releases the lock.
    held: Box<dyn HeldLock>,
}

impl DeployLock {
    /// Wraps a backend's held lock.
    pub fn new(held: impl HeldLock + 'static) -> DeployLock {
        DeployLock {
            held: Box::new(held),
        }
    }

    /// The lock file, for a backend that locks files (SQLite).
    pub fn path(&self) -> Option<&Path> {
        self.held.path()
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
