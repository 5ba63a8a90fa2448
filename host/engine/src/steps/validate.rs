//! Step 1, validate: built-in checks, then every validator plugin.
//!
//! Validators run twice when an environment is given: once with no
//! environment, whose findings go into the bundle manifest, and once with the
//! target environment, which only gates. The bundle must not depend on the
//! environment (the artifact checked in staging is the one promoted to
//! production, byte for byte), yet plugins are promised the environment in
//! their context.
//!
//! The second run is skipped where it cannot differ: a plugin whose manifest
//! declares `uses_environment = false` is never handed an environment by the
//! host (`PluginHost` gives it the neutral context whatever it is asked), so
//! its run for the environment would be the very same call as the neutral
//! one, and the neutral result is used for both. See docs/ARCHITECTURE.md
//! "Decisions".

use serde::Serialize;

use pde_core::{ExitCode, HasExitCode};

use crate::bundle::ValidatorRecord;
use crate::config::Environment;
use crate::diagnostic::{Diagnostic, Severity};
use crate::plugin::PluginSet as Plugins;
use crate::plugin::{CallContext, PluginKind, PolicyInput, SignatureStatus};
use crate::policy::approvals::{self, Requirement, Verdict};
use crate::policy::{self, Policy, PolicyStore};
use crate::state::StateStore;

/// Why step 1 did not pass.
#[derive(Debug, thiserror::Error)]
pub enum ValidateError {
    /// The policy has error findings; the report holds every finding.
    #[error("policy {policy_id} failed validation with {errors} error(s)")]
    Failed {
        /// The policy.
        policy_id: String,
        /// How many error diagnostics.
        errors: usize,
        /// The full report.
        report: Box<ValidationReport>,
    },
    /// The policy could not be found or read.
    #[error(transparent)]
    Policy(#[from] policy::PolicyError),
    /// A plugin could not be loaded or misbehaved (exit 5): a validator that
    /// cannot run has not passed anything.
    #[error(transparent)]
    Plugin(#[from] crate::plugin::PluginError),
    /// The state database failed.
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    /// `require_signed_plugins` and a plugin is not validly signed.
    #[error(
        "environment {env} requires signed plugins; not validly signed: {plugins}. \
         Sign each after review with `pde plugin sign PATH --key FILE` and list the \
         public key under [trust] plugin_keys"
    )]
    UnsignedPlugins {
        /// The environment.
        env: String,
        /// `name (reason)` for each, comma separated.
        plugins: String,
    },
}

impl HasExitCode for ValidateError {
    fn exit_code(&self) -> ExitCode {
        match self {
            ValidateError::UnsignedPlugins { .. } => ExitCode::Integrity,
            ValidateError::Failed { .. } => ExitCode::ValidationFailed,
            ValidateError::Policy(e) => e.exit_code(),
            ValidateError::Plugin(e) => e.exit_code(),
            ValidateError::State(e) => e.exit_code(),
        }
    }
}

/// What step 1 reads: the policy store, the state (the active version),
/// the workspace plugins and the trusted approver keys.
#[derive(Clone, Copy)]
pub struct Inputs<'a> {
    /// Every policy, for rule ownership.
    pub policies: &'a PolicyStore,
    /// What is active where, for the version rule.
    pub state: &'a StateStore,
    /// The validator plugins.
    pub plugins: &'a Plugins,
    /// The keys whose signed approvals count.
    pub approvers: &'a pde_core::approval::Approvers,
}

/// Refuses to go on in an environment that requires signed plugins when one
/// is not validly signed. Every command that evaluates an environment
/// applies it.
pub fn check_signed_plugins(
    plugins: &Plugins,
    env_name: &str,
    env: &Environment,
) -> Result<(), ValidateError> {
    if !env.require_signed_plugins {
        return Ok(());
    }
    let bad: Vec<String> = plugins
        .plugins
        .iter()
        .filter_map(|p| match &p.signature {
            SignatureStatus::Valid { .. } => None,
            SignatureStatus::Unsigned => Some(format!("{} (unsigned)", p.name)),
            SignatureStatus::Invalid { reason } => Some(format!("{} ({reason})", p.name)),
        })
        .collect();
    if bad.is_empty() {
        return Ok(());
    }
    Err(ValidateError::UnsignedPlugins {
        env: env_name.to_string(),
        plugins: bad.join(", "),
    })
}

/// Everything validation found about one policy.
#[derive(Debug, Clone, Serialize)]
pub struct ValidationReport {
    /// The policy id.
    pub policy_id: String,
    /// Its version.
    pub version: String,
    /// The environment checked against, if any.
    pub environment: Option<String>,
    /// Every finding, built-in and from plugins.
    pub diagnostics: Vec<Diagnostic>,
    /// What each validator plugin did.
    pub plugins: Vec<PluginRun>,
    /// The policy's approvals as judged (the bundle carries the counted ones).
    pub approvals: Verdict,
}

/// One validator plugin's run.
#[derive(Debug, Clone, Serialize)]
pub struct PluginRun {
    /// Plugin name.
    pub name: String,
    /// sha256 (hex) of its `.wasm`.
    pub sha256: String,
    /// Error findings of the environment-neutral run (recorded in the bundle).
    pub errors: u32,
    /// Warning findings of the environment-neutral run (recorded in the bundle).
    pub warnings: u32,
    /// Fuel the calls used.
    pub fuel_used: u64,
    /// Wall time of the calls, in microseconds.
    pub elapsed_us: u64,
}

impl ValidationReport {
    /// How many warnings were found.
    pub fn warnings(&self) -> usize {
        self.diagnostics
            .iter()
            .filter(|d| d.severity == Severity::Warning)
            .count()
    }

    /// A report made of built-in findings only (e.g. a schema failure).
    pub fn builtin(policy_id: &str, version: &str, diagnostics: Vec<Diagnostic>) -> Self {
        ValidationReport {
            policy_id: policy_id.to_string(),
            version: version.to_string(),
            environment: None,
            diagnostics,
            plugins: Vec::new(),
            approvals: Verdict::default(),
        }
    }

    /// How many findings are errors.
    pub fn errors(&self) -> usize {
        self.diagnostics.iter().filter(|d| d.is_error()).count()
    }

    /// True when nothing blocks.
    pub fn passed(&self) -> bool {
        self.errors() == 0
    }

    /// The validator records that go into the bundle manifest.
    pub fn validator_records(&self) -> Vec<ValidatorRecord> {
        self.plugins
            .iter()
            .map(|p| ValidatorRecord {
                name: p.name.clone(),
                sha256: p.sha256.clone(),
                errors: p.errors,
                warnings: p.warnings,
            })
            .collect()
    }

    /// Turns a failed report into [`ValidateError::Failed`].
    pub fn into_result(self) -> Result<ValidationReport, ValidateError> {
        if self.passed() {
            return Ok(self);
        }
        Err(ValidateError::Failed {
            policy_id: self.policy_id.clone(),
            errors: self.errors(),
            report: Box::new(self),
        })
    }
}

/// Loads a policy, turning schema and parse findings into a validation failure.
pub fn load(policies: &PolicyStore, policy_id: &str) -> Result<Policy, ValidateError> {
    match policies.load(policy_id) {
        Ok(p) => Ok(p),
        Err(policy::PolicyError::Invalid { diagnostics, .. }) => {
            let report = ValidationReport::builtin(policy_id, "", diagnostics);
            Err(ValidateError::Failed {
                policy_id: policy_id.to_string(),
                errors: report.errors(),
                report: Box::new(report),
            })
        }
        Err(e) => Err(e.into()),
    }
}

/// Runs the built-in checks and every validator plugin over `policy`.
///
/// With `env`, the version is checked against the one active there and the
/// environment's `min_approvals` applies. A plugin fault is an error (exit 5),
/// not a finding: a validator that cannot run has not passed anything.
pub fn validate(
    inputs: Inputs<'_>,
    policy: &Policy,
    env: Option<(&str, &Environment)>,
) -> Result<ValidationReport, ValidateError> {
    let mut diagnostics = policy::check_rules_unique(policy);
    diagnostics.extend(policy::check_conflicts(policy, inputs.policies));
    if let Some((env_name, _)) = env {
        let active = inputs.state.active(&policy.id, env_name)?;
        let active_version = active
            .as_ref()
            .and_then(|a| semver::Version::parse(&a.version).ok());
        // Re-deploying the version that is already active is judged later,
        // by digest: the same bytes are an idempotent no-op, other bytes are
        // refused (see `package::check_redeploy`).
        if active_version.as_ref() != Some(&policy.version) {
            diagnostics.extend(policy::check_version(policy, active_version.as_ref()));
        }
    }
    let requirement = env.map(|(_, environment)| Requirement {
        min: environment.min_approvals,
        roles: environment.required_roles.clone(),
        signed_only: environment.require_signed_approvals,
    });
    let approvals = approvals::judge(policy, inputs.approvers, requirement.as_ref());
    diagnostics.extend(approvals.diagnostics.iter().cloned());

    let loaded = inputs.plugins;
    let input = PolicyInput {
        id: policy.id.clone(),
        version: policy.version.to_string(),
        document: policy.document.clone(),
    };
    let mut runs = Vec::new();
    for plugin in loaded.of_kind(PluginKind::Validator) {
        let neutral = loaded.host.validate(
            plugin,
            &input,
            &CallContext {
                environment: String::new(),
            },
        )?;
        let count = |sev| neutral.value.iter().filter(|d| d.severity == sev).count() as u32;
        let mut run = PluginRun {
            name: plugin.name.clone(),
            sha256: plugin.sha256.clone(),
            errors: count(Severity::Error),
            warnings: count(Severity::Warning),
            fuel_used: neutral.fuel_used,
            elapsed_us: neutral.elapsed.as_micros() as u64,
        };
        let mut found = neutral.value;
        // Same input, same call: see the module docs.
        if let Some((env_name, _)) = env.filter(|_| plugin.uses_environment) {
            let specific = loaded.host.validate(
                plugin,
                &input,
                &CallContext {
                    environment: env_name.to_string(),
                },
            )?;
            run.fuel_used += specific.fuel_used;
            run.elapsed_us += specific.elapsed.as_micros() as u64;
            for d in specific.value {
                if !found.contains(&d) {
                    found.push(d);
                }
            }
        }
        tracing::info!(plugin = %plugin.name, findings = found.len(), "validator ran");
        diagnostics.extend(found);
        runs.push(run);
    }

    Ok(ValidationReport {
        policy_id: policy.id.clone(),
        version: policy.version.to_string(),
        environment: env.map(|(name, _)| name.to_string()),
        diagnostics,
        plugins: runs,
        approvals,
    })
}
