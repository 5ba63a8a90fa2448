//! Why the audit log or the sink failed, and the exit code each failure
//! maps to.

use std::path::PathBuf;

use pde_core::{ExitCode, HasExitCode};

/// Why the audit log or the sink failed.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The log or head could not be read or written.
    #[error("audit log {path}: {source} (check that the state directory is writable)")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The log is not what pde wrote: edited, cut, reordered or torn.
    #[error("audit log tampered at line {line}{}: {reason}", seq.map(|s| format!(" (seq {s})")).unwrap_or_default())]
    Tampered {
        /// 1-based line of the first bad record (one past the end for a truncation).
        line: u64,
        /// Its sequence number, when known.
        seq: Option<u64>,
        /// What does not check out.
        reason: String,
    },
    /// The log was opened read-only (by a read-only command) and asked to append.
    #[error("audit log {path} is open read-only; this command must not write it")]
    ReadOnly {
        /// Where the chain lives: the log file, or the database URL.
        path: PathBuf,
    },
    /// The log does not match what is recorded outside it: a release tag's
    /// audit head, or the signature on the head file.
    #[error("audit log does not match its anchors: {reason}")]
    Anchor {
        /// What does not match, and what that means.
        reason: String,
    },
    /// The shared audit chain in the team database could not be read or
    /// written.
    #[error("shared audit chain {location}: {reason}")]
    Shared {
        /// The database URL (never holds a password).
        location: String,
        /// What failed.
        reason: String,
    },
    /// Forwarding to the HTTP sink failed (a warning for callers, never a deploy failure).
    #[error("audit sink {url}: gave up after {attempts} attempt(s): {reason}")]
    Sink {
        /// The sink URL.
        url: String,
        /// Requests made.
        attempts: u32,
        /// The last failure.
        reason: String,
    },
}

impl HasExitCode for AuditError {
    fn exit_code(&self) -> ExitCode {
        match self {
            AuditError::Tampered { .. } | AuditError::Anchor { .. } => ExitCode::Integrity,
            AuditError::Io { .. } | AuditError::ReadOnly { .. } | AuditError::Shared { .. } => {
                ExitCode::Usage
            }
            AuditError::Sink { .. } => ExitCode::DeployFailed,
        }
    }
}
