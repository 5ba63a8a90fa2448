//! Exit codes: the part of every error that scripts depend on (DESIGN §8).
//!
//! Each module has its own typed error; each of those maps itself onto one of
//! these codes, so the CLI never has to guess from a message.

/// The process exit codes of `pde`, as fixed by the external contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
#[repr(u8)]
pub enum ExitCode {
    /// Everything asked for was done.
    Ok = 0,
    /// Push, verification or compensation failed.
    DeployFailed = 1,
    /// Bad command line or bad configuration.
    Usage = 2,
    /// The policy did not pass validation.
    ValidationFailed = 3,
    /// A target service is unhealthy; nothing was pushed.
    EnvUnhealthy = 4,
    /// A plugin trapped, hit a limit, or is not a valid plugin component.
    PluginFault = 5,
    /// A digest, signature or the audit chain does not check out.
    Integrity = 6,
    /// Another deploy of the same policy and environment holds the lock.
    Locked = 7,
}

impl ExitCode {
    /// The numeric process exit code.
    pub fn code(self) -> u8 {
        self as u8
    }
}

/// Implemented by every error type of the library: which exit code it means.
pub trait HasExitCode {
    /// The exit code a CLI run ending in this error must return.
    fn exit_code(&self) -> ExitCode;
}

/// Any error the [`Engine`](crate::Engine) can end with.
///
/// Each variant wraps the typed error of the step that failed; outcomes that
/// carry a report (validation failed, environment unhealthy, deploy failed)
/// keep it, so a caller can print every finding, not just the first.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `pde.toml` is missing, malformed or names something that does not exist.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// A policy could not be found, read or parsed.
    #[error(transparent)]
    Policy(#[from] crate::policy::PolicyError),
    /// A plugin could not be loaded or misbehaved.
    #[error(transparent)]
    Plugin(#[from] crate::plugin::PluginError),
    /// A key could not be read.
    #[error(transparent)]
    Key(#[from] crate::keys::KeyError),
    /// A bundle did not check out.
    #[error(transparent)]
    Bundle(#[from] crate::bundle::BundleError),
    /// The state database failed, or the deploy lock is held.
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    /// The audit log failed or was tampered with.
    #[error(transparent)]
    Audit(#[from] crate::audit::AuditError),
    /// A Git operation failed, or a release tag conflicts.
    #[error(transparent)]
    Vcs(#[from] crate::vcs::VcsError),
    /// Pushing could not even start (e.g. a token variable is unset).
    #[error(transparent)]
    Push(#[from] crate::push::PushError),
    /// A policy or plugin file is not what the commit holds.
    #[error(transparent)]
    Provenance(#[from] crate::provenance::ProvenanceError),
    /// A rollback could not start or did not complete.
    #[error(transparent)]
    Rollback(#[from] crate::rollback::RollbackError),
    /// A file of the workspace could not be written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The policy did not pass validation; the report holds every finding.
    #[error("policy {policy_id} failed validation with {errors} error(s)")]
    ValidationFailed {
        /// The policy.
        policy_id: String,
        /// How many error diagnostics.
        errors: usize,
        /// The full report.
        report: Box<crate::validate::ValidationReport>,
    },
    /// A deploy gate of the environment refused the bundle.
    #[error("{0}")]
    Gate(#[from] crate::pipeline::GateError),
    /// A service of the environment is unhealthy; nothing was pushed.
    #[error("environment {env} is unhealthy: {failing}; nothing was pushed")]
    Unhealthy {
        /// The environment.
        env: String,
        /// The failing services, comma separated.
        failing: String,
        /// The full health report.
        report: crate::envcheck::HealthReport,
    },
    /// The push failed; the report says what was compensated.
    #[error("deploy of {policy_id} to {env} ended {outcome}")]
    DeployFailed {
        /// The policy.
        policy_id: String,
        /// The environment.
        env: String,
        /// `rolled-back` or `needs-attention`.
        outcome: String,
        /// The full report.
        report: Box<crate::pipeline::DeployReport>,
    },
}

impl HasExitCode for Error {
    fn exit_code(&self) -> ExitCode {
        match self {
            Error::Config(e) => e.exit_code(),
            Error::Policy(e) => e.exit_code(),
            Error::Plugin(e) => e.exit_code(),
            Error::Key(e) => e.exit_code(),
            Error::Bundle(e) => e.exit_code(),
            Error::State(e) => e.exit_code(),
            Error::Audit(e) => e.exit_code(),
            Error::Vcs(e) => e.exit_code(),
            Error::Push(e) => e.exit_code(),
            Error::Rollback(e) => e.exit_code(),
            Error::Provenance(e) => e.exit_code(),
            Error::Io { .. } => ExitCode::Usage,
            Error::ValidationFailed { .. } => ExitCode::ValidationFailed,
            Error::Gate(e) => e.exit_code(),
            Error::Unhealthy { .. } => ExitCode::EnvUnhealthy,
            Error::DeployFailed { .. } => ExitCode::DeployFailed,
        }
    }
}
