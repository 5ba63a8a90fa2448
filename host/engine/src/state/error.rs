//! Why the state store failed: one variant per kind of failure, one for
//! every driver ([`StateError::Backend`]), each mapping to an exit code.

use std::path::PathBuf;

use pde_core::{ExitCode, HasExitCode};

/// A driver's error, boxed so that the state's error names no driver.
pub type BackendError = Box<dyn std::error::Error + Send + Sync>;

/// Why the state store failed.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The state directory or a lock file could not be created or opened.
    #[error(
        "cannot use state path {path}: {source} (check that the `state` directory in pde.toml is writable)"
    )]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A database operation failed, in whichever backend.
    #[error("state database {location}: {action} failed: {source}")]
    Backend {
        /// The backend's name (`sqlite`, `postgres`).
        backend: &'static str,
        /// The database file or URL (a URL never holds a password).
        location: String,
        /// What was being done.
        action: &'static str,
        /// The driver's error.
        #[source]
        source: BackendError,
    },
    /// The state database cannot be used as configured.
    #[error("state database {location}: {message}")]
    Config {
        /// The database file or URL (never holds a password).
        location: String,
        /// What is wrong and how to fix it.
        message: String,
    },
    /// The database was written by a newer pde.
    #[error(
        "state database {path} has schema version {found}, this pde knows up to {supported}; upgrade pde"
    )]
    TooNew {
        /// The database file or URL.
        path: PathBuf,
        /// Its stored schema version (see [`super::schema`]).
        found: i64,
        /// The newest stored version this build knows.
        supported: i64,
    },
    /// Another deploy of the same policy and environment is running.
    #[error("policy {policy_id:?} is being deployed to {env:?} by another process{}; wait for it to finish", holder_suffix(.holder))]
    Locked {
        /// The policy.
        policy_id: String,
        /// The environment.
        env: String,
        /// What the holder wrote into the lock file (pid, start time), if readable.
        holder: String,
    },
    /// The deploy lock this process held is gone (its database session
    /// ended, its lock file was replaced) or was taken again since, so
    /// another deploy may be running: this one stops before its next side
    /// effect (push protocol v4 fencing, issue 21 item 3).
    #[error(
        "the deploy lock of policy {policy_id:?} in {env:?} (fence {fence}) is no longer held: {reason}; \
         another deploy may hold it now, so this one stopped before {before}. Check `pde status` and \
         `pde history {policy_id}`, then run it again if it is still wanted"
    )]
    LockLost {
        /// The policy.
        policy_id: String,
        /// The environment.
        env: String,
        /// The fencing number this holder was given.
        fence: u64,
        /// What showed the lock to be gone.
        reason: String,
        /// The side effect it was about to make (`pushing`, `tagging`, …).
        before: &'static str,
    },
    /// A policy id or environment name that cannot name a lock file.
    #[error(
        "{what} {value:?} cannot be used in a lock file name: use letters, digits, '.', '_' and '-'"
    )]
    BadName {
        /// `policy id` or `environment`.
        what: &'static str,
        /// The value.
        value: String,
    },
}

fn holder_suffix(holder: &str) -> String {
    if holder.is_empty() {
        String::new()
    } else {
        format!(" ({holder})")
    }
}

impl HasExitCode for StateError {
    fn exit_code(&self) -> ExitCode {
        match self {
            StateError::Locked { .. } | StateError::LockLost { .. } => ExitCode::Locked,
            StateError::Io { .. }
            | StateError::Backend { .. }
            | StateError::Config { .. }
            | StateError::TooNew { .. }
            | StateError::BadName { .. } => ExitCode::Usage,
        }
    }
}
