//! The engine's error: one variant per step or part that can fail.
//!
//! Each part has its own typed error, which maps itself onto an exit code
//! ([`pde_core::ExitCode`]); this enum only gathers them for callers of the
//! [`Engine`](crate::Engine). Parts import exit codes from `pde_core`, never
//! from here, so this module sits above every part and no cycle runs
//! through it.

pub use pde_core::{ExitCode, HasExitCode};

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
    /// An approval could not be signed or written.
    #[error(transparent)]
    Approve(#[from] crate::policy::approvals::ApproveError),
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
    /// A request to a target service failed.
    #[error(transparent)]
    Http(#[from] crate::http::HttpError),
    /// Pushing could not even start (e.g. a token variable is unset).
    #[error(transparent)]
    Push(#[from] crate::steps::push::PushError),
    /// A policy or plugin file is not what the commit holds.
    #[error(transparent)]
    Provenance(#[from] crate::provenance::ProvenanceError),
    /// The trust floor cannot be read, or `pde.toml` lowers it.
    #[error(transparent)]
    Floor(#[from] crate::floor::FloorError),
    /// A rollback could not start or did not complete.
    #[error(transparent)]
    Rollback(#[from] RollbackError),
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
        report: Box<crate::steps::validate::ValidationReport>,
    },
    /// An environment gate of step 1 refused (unsigned plugins).
    #[error(transparent)]
    Validate(crate::steps::validate::ValidateError),
    /// The bundle could not be built or is not admitted (step 2).
    #[error(transparent)]
    Package(#[from] crate::steps::package::PackageError),
    /// The readiness checks could not start (a token variable is unset).
    #[error(transparent)]
    Readiness(#[from] crate::steps::envcheck::ReadinessError),
    /// Routing failed or reached no service (step 4).
    #[error(transparent)]
    Route(#[from] crate::steps::route::RouteError),
    /// The release could not be tagged (step 6).
    #[error(transparent)]
    Tag(#[from] crate::steps::tag::TagError),
    /// An OCI environment's registry could not be set up or used (step 5).
    #[error(transparent)]
    Delivery(#[from] crate::steps::push::publish::DeliveryError),
    /// A service of the environment is unhealthy, or a readiness check
    /// failed; nothing was pushed.
    #[error("environment {env} is unhealthy: {failing}; nothing was pushed")]
    Unhealthy {
        /// The environment.
        env: String,
        /// The failing services, comma separated.
        failing: String,
        /// The full health report.
        report: crate::steps::envcheck::HealthReport,
    },
    /// The push failed; the report says what was compensated.
    #[error("deploy of {policy_id} to {env} ended {outcome}")]
    DeployFailed {
        /// The policy.
        policy_id: String,
        /// The environment.
        env: String,
        /// `rolled-back` or `needs-attention`.
        outcome: crate::report::DeployOutcome,
        /// The full report.
        report: Box<crate::report::DeployReport>,
    },
    /// A rollout command could not run, or a rollout is in the way.
    #[error(transparent)]
    Rollout(#[from] crate::steps::waves::RolloutError),
    /// A rollout stopped at a gate (or was aborted); every wave it pushed
    /// was sent back, and nothing was tagged.
    #[error("rollout of {policy_id} to {env} halted and {outcome}: {why}")]
    RolloutHalted {
        /// The policy.
        policy_id: String,
        /// The environment.
        env: String,
        /// The wave, the gate, the query and the value seen (or who aborted).
        why: String,
        /// `rolled-back` or `needs-attention`.
        outcome: crate::report::DeployOutcome,
        /// The full deploy report as JSON (for `pde rollout resume` and
        /// `abort`, the rollout's push and waves).
        report: Box<serde_json::Value>,
    },
}

impl Error {
    /// The `data` of a `validation_failed` or `deploy_failed` audit record:
    /// the error, its exit code, and the version refused when validation
    /// knew it (`pde history` shows refused deploys from these records).
    pub fn audit_data(&self) -> serde_json::Value {
        let mut data =
            serde_json::json!({"error": self.to_string(), "exit_code": self.exit_code().code()});
        if let Error::ValidationFailed { report, .. } = self {
            data["version"] = report.version.clone().into();
        }
        data
    }
}

impl From<crate::steps::audit::RecordError> for Error {
    fn from(e: crate::steps::audit::RecordError) -> Self {
        match e {
            crate::steps::audit::RecordError::Audit(e) => Error::Audit(e),
            crate::steps::audit::RecordError::Lock(e) => Error::State(e),
        }
    }
}

impl HasExitCode for Error {
    fn exit_code(&self) -> ExitCode {
        match self {
            Error::Config(e) => e.exit_code(),
            Error::Policy(e) => e.exit_code(),
            Error::Plugin(e) => e.exit_code(),
            Error::Key(e) => e.exit_code(),
            Error::Approve(e) => e.exit_code(),
            Error::Bundle(e) => e.exit_code(),
            Error::State(e) => e.exit_code(),
            Error::Audit(e) => e.exit_code(),
            Error::Vcs(e) => e.exit_code(),
            Error::Push(e) => e.exit_code(),
            Error::Http(e) => e.exit_code(),
            Error::Rollback(e) => e.exit_code(),
            Error::Provenance(e) => e.exit_code(),
            Error::Floor(e) => e.exit_code(),
            Error::Io { .. } => ExitCode::Usage,
            Error::ValidationFailed { .. } => ExitCode::ValidationFailed,
            Error::Validate(e) => e.exit_code(),
            Error::Package(e) => e.exit_code(),
            Error::Readiness(e) => e.exit_code(),
            Error::Route(e) => e.exit_code(),
            Error::Tag(e) => e.exit_code(),
            Error::Delivery(e) => e.exit_code(),
            Error::Unhealthy { .. } => ExitCode::EnvUnhealthy,
            Error::DeployFailed { .. } => ExitCode::DeployFailed,
            Error::Rollout(e) => e.exit_code(),
            Error::RolloutHalted { .. } => ExitCode::RolloutHalted,
        }
    }
}

/// Step 1's error, as callers of the engine have always seen it: a failed
/// validation carries its report, and a plugin, policy or state failure is
/// that failure, whatever step met it.
impl From<crate::steps::validate::ValidateError> for Error {
    fn from(e: crate::steps::validate::ValidateError) -> Self {
        use crate::steps::validate::ValidateError as V;
        match e {
            V::Failed {
                policy_id,
                errors,
                report,
            } => Error::ValidationFailed {
                policy_id,
                errors,
                report,
            },
            V::Policy(e) => Error::Policy(e),
            V::Plugin(e) => Error::Plugin(e),
            V::State(e) => Error::State(e),
            e @ V::UnsignedPlugins { .. } => Error::Validate(e),
        }
    }
}

/// Why a rollback could not be started.
#[derive(Debug, thiserror::Error)]
pub enum RollbackError {
    /// Nothing has been deployed there.
    #[error("policy {policy_id} has no active version in {env}; nothing to roll back")]
    NothingActive {
        /// The policy.
        policy_id: String,
        /// The environment.
        env: String,
    },
    /// No earlier deployed version to go back to (or not the one asked for).
    #[error("policy {policy_id} has no deployed version {wanted} in {env} to roll back to")]
    NoSuchVersion {
        /// The policy.
        policy_id: String,
        /// The environment.
        env: String,
        /// What was asked for (`previous` when no `--to`).
        wanted: String,
    },
    /// Some service did not take the earlier bundle.
    #[error("rollback of {policy_id} in {env} failed on: {failed}")]
    Failed {
        /// The policy.
        policy_id: String,
        /// The environment.
        env: String,
        /// The services that failed, with why.
        failed: String,
        /// The full report.
        report: Box<crate::report::RollbackReport>,
    },
}

impl HasExitCode for RollbackError {
    fn exit_code(&self) -> ExitCode {
        match self {
            RollbackError::NothingActive { .. } | RollbackError::NoSuchVersion { .. } => {
                ExitCode::Usage
            }
            RollbackError::Failed { .. } => ExitCode::DeployFailed,
        }
    }
}

impl Error {
    /// The report an error carries, as `--output json` shows it: the
    /// validation findings, the health of every service, the per-target
    /// results of a push or a rollback. `None` for errors without one.
    pub fn report(&self) -> Option<serde_json::Value> {
        let value = match self {
            Error::ValidationFailed { report, .. } => serde_json::to_value(report.as_ref()),
            Error::Unhealthy { report, .. } => serde_json::to_value(report),
            Error::DeployFailed { report, .. } => serde_json::to_value(report.as_ref()),
            Error::RolloutHalted { report, .. } => Ok(report.as_ref().clone()),
            Error::Rollback(RollbackError::Failed { report, .. }) => {
                serde_json::to_value(report.as_ref())
            }
            _ => return None,
        };
        value.ok()
    }
}
