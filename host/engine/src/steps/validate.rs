//! Step 1, validate: built-in checks, then every validator plugin.
//!
//! Validators run twice when an environment is given: once with no
//! environment, whose findings go into the bundle manifest, and once with the
//! target environment, which only gates. The bundle must not depend on the
//! environment (the artifact checked in staging is the one promoted to
//! production, byte for byte), yet plugins are promised the environment in
//! their context. Calls cost micro- to milliseconds, so the second run is cheap.
//!
//! The second run is skipped where it cannot differ: a plugin whose manifest
//! declares `uses_environment = false` is never handed an environment (nor
//! the active version) by the host (`PluginHost` gives it the neutral context
//! whatever it is asked), so its run for the environment would be the very
//! same call as the neutral one, and the neutral result is used for both. See
//! docs/ARCHITECTURE.md "Decisions".
//!
//! The environment's run also carries the version of the policy active there
//! (plugins built against `pde:plugin@0.2.0` see it as `context.active`), so a
//! validator can judge the change and not only the new document. It is read
//! from the bundle that made it active, which the deploy stored in the state
//! ([`stored_bundle`]), digest checked. The environment-neutral run never
//! gets it, for the same reason it gets no environment: what goes into the
//! bundle must not depend on where the bundle goes.

use std::path::Path;

use serde::Serialize;

use pde_core::{ExitCode, HasExitCode};

use crate::bundle::ValidatorRecord;
use crate::config::Environment;
use crate::diagnostic::{Diagnostic, Severity};
use crate::plugin::PluginSet as Plugins;
use crate::plugin::{
    ActivePolicy, CallContext, PluginKind, PluginNotice, PolicyInput, SignatureStatus,
};
use crate::policy::approvals::{self, Requirement, Verdict};
use crate::policy::{self, Policy, PolicyStore};
use crate::state::{Active, StateStore, stored_bundle};

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
    /// This checkout's `<state>/dist`, where bundles deployed before the
    /// state kept them can still be found.
    pub dist: &'a Path,
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
    /// The version active in the environment that the environment's run
    /// was judged against (its document is not serialised); `None` without
    /// an environment, when nothing is active there, or when its bundle
    /// could not be read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub active: Option<ActivePolicy>,
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
    /// Its signature status against the trusted plugin keys. Where the
    /// environment does not require signed plugins a broken or missing
    /// signature does not stop it, but is reported here (and logged).
    pub signature: SignatureStatus,
    /// The plugin's signature file as read when it ran (a valid signature
    /// only), carried in the bundle's validation attestation so that an
    /// agent checks the signer itself.
    #[serde(skip)]
    pub signature_file: Option<serde_json::Value>,
    /// What it logged at warning or error level, each line once over
    /// both runs: the step's output shows it (issue 24).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub log: Vec<PluginNotice>,
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
            active: None,
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

    /// The `data` of the `validated` audit record: version, warnings,
    /// validators, the content digest and the approvals counted.
    pub fn audit_data(&self) -> serde_json::Value {
        serde_json::json!({"version": self.version, "warnings": self.warnings(),
                           "validators": self.validator_records(),
                           "policy_digest": self.approvals.policy_digest,
                           "approvals": self.approvals.counted})
    }

    /// Each validator's verdict, as the bundle's manifest records it.
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

    /// What the bundle's validation attestation says of each validator
    /// ([`pde_core::attestation`]).
    pub fn attested_validators(&self) -> Vec<pde_core::attestation::Validator> {
        self.plugins
            .iter()
            .map(|p| {
                let (signer_keyid, signer) = match &p.signature {
                    SignatureStatus::Valid { keyid, signer, .. } => {
                        (Some(keyid.clone()), Some(signer.clone()))
                    }
                    _ => (None, None),
                };
                pde_core::attestation::Validator {
                    name: p.name.clone(),
                    sha256: p.sha256.clone(),
                    verdict: if p.errors == 0 { "pass" } else { "fail" }.to_string(),
                    errors: p.errors,
                    warnings: p.warnings,
                    signer_keyid,
                    signer,
                    plugin_signature: p.signature_file.clone(),
                }
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
    let mut active_policy = None;
    if let Some((env_name, _)) = env {
        let active = inputs.state.active(&policy.id, env_name)?;
        let active_version = active
            .as_ref()
            .and_then(|a| semver::Version::parse(&a.version).ok());
        // Re-deploying the version that is already active is judged later,
        // by digest: the same bytes are an idempotent no-op, other bytes are
        // refused (see `package::admit`).
        let same_version = active_version.as_ref() == Some(&policy.version);
        if !same_version {
            diagnostics.extend(policy::check_version(policy, active_version.as_ref()));
        }
        if let Some(active) = &active {
            match read_active(inputs, &policy.id, active)? {
                Ok(found) => active_policy = Some(found),
                // The same version again changes nothing to judge, and its
                // deploy stores the bundle that is missing.
                Err(_) if same_version => {}
                Err(why) => diagnostics.extend(unreadable_active(
                    inputs, &policy.id, env_name, active, &why,
                )),
            }
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
    // The run recorded in the bundle: no environment, nothing active.
    let neutral_ctx = CallContext::default();
    let env_ctx = env.map(|(env_name, _)| CallContext {
        environment: env_name.to_string(),
        active: active_policy.clone(),
    });
    let mut runs = Vec::new();
    for plugin in loaded.of_kind(PluginKind::Validator) {
        let neutral = loaded.host.validate(plugin, &input, &neutral_ctx)?;
        let count = |sev| neutral.value.iter().filter(|d| d.severity == sev).count() as u32;
        let mut run = PluginRun {
            name: plugin.name.clone(),
            sha256: plugin.sha256.clone(),
            errors: count(Severity::Error),
            warnings: count(Severity::Warning),
            fuel_used: neutral.fuel_used,
            elapsed_us: neutral.elapsed.as_micros() as u64,
            signature: plugin.signature.clone(),
            signature_file: signature_file(plugin),
            log: PluginNotice::from_log(&plugin.name, &neutral.log),
        };
        // Where signatures are required, `check_signed_plugins` refused an
        // unsigned or broken one already; elsewhere it runs, but a tampered
        // plugin must not run silently (issue 27).
        if let Some(problem) = plugin.signature.problem() {
            tracing::warn!(
                plugin = %plugin.name,
                "plugin {}: {problem}; it runs here, but an environment that requires signed plugins refuses it",
                plugin.name
            );
        }
        let mut found = neutral.value;
        // Same input, same call: see the module docs.
        if let Some(env_ctx) = env_ctx.as_ref().filter(|_| plugin.uses_environment) {
            let specific = loaded.host.validate(plugin, &input, env_ctx)?;
            run.fuel_used += specific.fuel_used;
            run.elapsed_us += specific.elapsed.as_micros() as u64;
            for notice in PluginNotice::from_log(&plugin.name, &specific.log) {
                if !run.log.contains(&notice) {
                    run.log.push(notice);
                }
            }
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
        active: active_policy,
    })
}

/// The signature file of a validly signed plugin, as JSON (`None` when it
/// is not validly signed, or is gone since it was checked).
fn signature_file(plugin: &crate::plugin::Plugin) -> Option<serde_json::Value> {
    if !matches!(plugin.signature, SignatureStatus::Valid { .. }) {
        return None;
    }
    let text = std::fs::read_to_string(crate::plugin::signature::sig_path(&plugin.path)).ok()?;
    serde_json::from_str(&text).ok()
}

/// The policy `active` names, from the bundle the deploy stored
/// ([`stored_bundle`]); `Ok(Err(why))` when it cannot be read.
fn read_active(
    inputs: Inputs<'_>,
    policy_id: &str,
    active: &Active,
) -> Result<Result<ActivePolicy, String>, ValidateError> {
    let found = stored_bundle(
        &**inputs.state,
        inputs.dist,
        policy_id,
        &active.version,
        &active.digest,
    )?;
    Ok(found.map(|bundle| ActivePolicy {
        version: bundle.payload.manifest.version,
        digest: bundle.digest,
        deployed_at: active.deployed_at.clone(),
        document: bundle.payload.policy,
    }))
}

/// A version is active but its bundle cannot be read. Plugins built against
/// `pde:plugin@0.2.0` judge changes against it, and telling them "nothing
/// is active" would pass a change unjudged, so that is an error; when no
/// plugin would be told, nothing is lost and nothing is said.
fn unreadable_active(
    inputs: Inputs<'_>,
    policy_id: &str,
    env: &str,
    active: &Active,
    why: &str,
) -> Option<Diagnostic> {
    let told: Vec<&str> = inputs
        .plugins
        .plugins
        .iter()
        .filter(|p| p.sees_active_policy())
        .map(|p| p.name.as_str())
        .collect();
    if told.is_empty() {
        return None;
    }
    let file = pde_core::bundle::file_name(policy_id, &active.version, &active.digest);
    Some(Diagnostic::error(
        "active",
        "active.unavailable",
        "",
        format!(
            "version {} of policy {policy_id} is active in {env} ({}), but its bundle cannot be \
             read ({why}). Plugins built against pde:plugin@0.2.0 ({}) judge a change against \
             the active version and cannot do so without it. Copy {file} into {} from the \
             checkout that deployed it, or \
             deploy version {} again from its release tag policy/{policy_id}/v{}/{env} (a no-op \
             for the services, which stores its bundle)",
            active.version,
            active.digest,
            told.join(", "),
            inputs.dist.display(),
            active.version,
            active.version,
        ),
    ))
}
