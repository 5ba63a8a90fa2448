//! Step 1, validate: built-in checks, then every validator plugin.
//!
//! Validators run twice when an environment is given: once with no
//! environment, whose findings go into the bundle manifest, and once with the
//! target environment, which only gates. The bundle must not depend on the
//! environment (the artifact checked in staging is the one promoted to
//! production, byte for byte), yet plugins are promised the environment in
//! their context. Calls cost micro- to milliseconds, so the second run is cheap.

use serde::Serialize;

use crate::bundle::ValidatorRecord;
use crate::diagnostic::{Diagnostic, Severity};
use crate::engine::Engine;
use crate::error::Error;
use crate::plugin::{CallContext, PluginKind, PolicyInput};
use crate::policy::{self, Policy};

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
    /// A report made of built-in findings only (e.g. a schema failure).
    pub fn builtin(policy_id: &str, version: &str, diagnostics: Vec<Diagnostic>) -> Self {
        ValidationReport {
            policy_id: policy_id.to_string(),
            version: version.to_string(),
            environment: None,
            diagnostics,
            plugins: Vec::new(),
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

    /// Turns a failed report into [`Error::ValidationFailed`].
    pub fn into_result(self) -> Result<ValidationReport, Error> {
        if self.passed() {
            return Ok(self);
        }
        Err(Error::ValidationFailed {
            policy_id: self.policy_id.clone(),
            errors: self.errors(),
            report: Box::new(self),
        })
    }
}

/// Loads a policy, turning schema and parse findings into a validation failure.
pub fn load(engine: &Engine, policy_id: &str) -> Result<Policy, Error> {
    match engine.policies().load(policy_id) {
        Ok(p) => Ok(p),
        Err(policy::PolicyError::Invalid { diagnostics, .. }) => {
            let report = ValidationReport::builtin(policy_id, "", diagnostics);
            Err(Error::ValidationFailed {
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
    engine: &Engine,
    policy: &Policy,
    env: Option<&str>,
) -> Result<ValidationReport, Error> {
    let mut diagnostics = policy::check_rules_unique(policy);
    diagnostics.extend(policy::check_conflicts(policy, engine.policies()));
    if let Some(env_name) = env {
        let environment = engine.environment(env_name)?;
        let active = engine.state().active(&policy.id, env_name)?;
        let active_version = active
            .as_ref()
            .and_then(|a| semver::Version::parse(&a.version).ok());
        // Re-deploying the version that is already active is judged later,
        // by digest: the same bytes are an idempotent no-op, other bytes are
        // refused (see `pipeline::check_redeploy`).
        if active_version.as_ref() != Some(&policy.version) {
            diagnostics.extend(policy::check_version(policy, active_version.as_ref()));
        }
        diagnostics.extend(policy::check_approvals(policy, environment.min_approvals));
    }

    let loaded = engine.plugins()?;
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
        if let Some(env_name) = env {
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
        environment: env.map(str::to_string),
        diagnostics,
        plugins: runs,
    })
}
