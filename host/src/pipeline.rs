//! The deploy pipeline: the seven steps, top-down, and nothing else.
//!
//! ```text
//! validate → package → check environment → route → push → tag → audit
//! ```
//!
//! Every step appends to the audit log as it ends, so the log tells what
//! happened even when a later step fails. Nothing is pushed before
//! validation, packaging, every gate and the health check have passed; once a
//! push starts, a failure is compensated by [`crate::push`] and reported as
//! `rolled-back` or `needs-attention`, never as a success.

use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::json;

use crate::audit::Event;
use crate::bundle::{Bundle, Manifest, Payload};
use crate::config::Environment;
use crate::engine::Engine;
use crate::envcheck::{self, HealthReport};
use crate::error::{Error, ExitCode, HasExitCode};
use crate::plugin::SignatureStatus;
use crate::policy::Policy;
use crate::push::{self, Observer, Outcome, PushReport, Target};
use crate::route::{self, RouteDecision};
use crate::state::{DeploymentRecord, TargetRecord};
use crate::validate::{self, ValidationReport};
use crate::vcs::{self, Repo, TagOutcome};

pub use crate::validate::PluginRun;

/// How a deploy is run.
pub struct DeployOptions<'a> {
    /// Stop after routing: nothing is written, pushed, tagged or audited.
    pub dry_run: bool,
    /// Told about every target's progress (the CLI draws progress bars).
    pub observer: &'a dyn Observer,
}

impl Default for DeployOptions<'_> {
    fn default() -> Self {
        DeployOptions {
            dry_run: false,
            observer: &(),
        }
    }
}

/// How a deploy ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeployOutcome {
    /// Every routed service runs the new bundle, verified; the release is tagged.
    Deployed,
    /// A target failed; every target that took the bundle was sent back.
    RolledBack,
    /// A target failed and sending some target back failed too.
    NeedsAttention,
    /// `--dry-run`: validated, packaged, checked and routed; nothing pushed.
    DryRun,
}

/// Everything a deploy did, step by step.
#[derive(Debug, Clone, Serialize)]
pub struct DeployReport {
    /// The policy id.
    pub policy_id: String,
    /// The policy version.
    pub version: String,
    /// The target environment.
    pub env: String,
    /// The bundle digest.
    pub digest: String,
    /// How it ended.
    pub outcome: DeployOutcome,
    /// True when this exact bundle was already active in the environment.
    pub already_active: bool,
    /// The bundle file under `dist/` (none for a dry run).
    pub bundle_path: Option<PathBuf>,
    /// Step 1.
    pub validation: ValidationReport,
    /// Step 3.
    pub health: HealthReport,
    /// Step 4.
    pub routes: Vec<RouteDecision>,
    /// Step 5 (none for a dry run).
    pub push: Option<PushReport>,
    /// Step 6: the release tag (none unless deployed).
    pub tag: Option<TagReport>,
}

/// The release tag of a deploy.
#[derive(Debug, Clone, Serialize)]
pub struct TagReport {
    /// `policy/<id>/v<version>/<env>`.
    pub name: String,
    /// False when the tag already existed for this same digest.
    pub created: bool,
}

/// A bundle written by `pde package`.
#[derive(Debug, Clone, Serialize)]
pub struct PackageReport {
    /// The bundle digest.
    pub digest: String,
    /// Where it was written.
    pub path: PathBuf,
    /// The validation it passed.
    pub validation: ValidationReport,
    /// The bundle itself.
    #[serde(skip)]
    pub bundle: Bundle,
}

/// A deploy gate of the environment said no.
#[derive(Debug, thiserror::Error)]
pub enum GateError {
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
    /// `promote_from` and the digest was never deployed there.
    #[error(
        "environment {env} only takes bundles already deployed to {from}, and {digest} \
         has not been: deploy it to {from} first"
    )]
    NotPromoted {
        /// The environment.
        env: String,
        /// Where it must have been deployed.
        from: String,
        /// The new bundle's digest.
        digest: String,
    },
    /// The policy file differs from the commit, so the bundle could not name its source.
    #[error(
        "{path} has uncommitted changes; commit it so the bundle names the commit it came from"
    )]
    DirtyPolicy {
        /// The policy file.
        path: PathBuf,
    },
    /// The version is active with other content.
    #[error(
        "version {version} of policy {policy_id} is already active in {env} as {active}, \
         but this build is {digest}; bump the version"
    )]
    VersionReused {
        /// The policy.
        policy_id: String,
        /// The version.
        version: String,
        /// The environment.
        env: String,
        /// The active digest.
        active: String,
        /// The new digest.
        digest: String,
    },
    /// Routing selected no service.
    #[error(
        "no service of environment {env} was routed policy {policy_id}; check the router plugins' rules and the services' tags"
    )]
    NoRoutes {
        /// The environment.
        env: String,
        /// The policy.
        policy_id: String,
    },
}

impl HasExitCode for GateError {
    fn exit_code(&self) -> ExitCode {
        match self {
            GateError::UnsignedPlugins { .. } => ExitCode::Integrity,
            GateError::NotPromoted { .. } | GateError::VersionReused { .. } => {
                ExitCode::ValidationFailed
            }
            GateError::DirtyPolicy { .. } | GateError::NoRoutes { .. } => ExitCode::Usage,
        }
    }
}

impl Engine {
    /// Deploys policy `policy_id` to environment `env`: the library form of
    /// `pde deploy ID --env ENV`.
    pub fn deploy_policy(&self, policy_id: &str, env: &str) -> Result<DeployReport, Error> {
        self.deploy(policy_id, env, &DeployOptions::default())
    }

    /// Runs the seven steps. A deploy that pushed but did not end `deployed`
    /// is an [`Error::DeployFailed`] carrying the full report.
    pub fn deploy(
        &self,
        policy_id: &str,
        env_name: &str,
        opts: &DeployOptions<'_>,
    ) -> Result<DeployReport, Error> {
        let env = self.environment(env_name)?;
        if opts.dry_run {
            return self.steps(policy_id, env_name, env, opts);
        }
        let _lock = self.state.lock(policy_id, env_name)?;
        self.record(Event::DeployStart, policy_id, env_name, json!({}))?;
        let result = self.steps(policy_id, env_name, env, opts);
        match &result {
            Ok(report) => {
                self.record(
                    Event::Deployed,
                    policy_id,
                    env_name,
                    json!({"digest": report.digest, "version": report.version,
                           "already_active": report.already_active}),
                )?;
            }
            Err(e) => {
                self.record(
                    Event::DeployFailed,
                    policy_id,
                    env_name,
                    json!({"error": e.to_string(), "exit_code": e.exit_code().code()}),
                )?;
            }
        }
        result
    }

    fn steps(
        &self,
        policy_id: &str,
        env_name: &str,
        env: &Environment,
        opts: &DeployOptions<'_>,
    ) -> Result<DeployReport, Error> {
        let audit = |event, data| -> Result<(), Error> {
            if !opts.dry_run {
                self.record(event, policy_id, env_name, data)?;
            }
            Ok(())
        };

        // 1. validate
        self.check_plugin_signatures(env_name, env)?;
        let validated = validate::load(self, policy_id).and_then(|policy| {
            let report = validate::validate(self, &policy, Some(env_name))?.into_result()?;
            Ok((policy, report))
        });
        let (policy, validation) = match validated {
            Ok(v) => v,
            Err(e) => {
                audit(
                    Event::ValidationFailed,
                    json!({"error": e.to_string(), "exit_code": e.exit_code().code()}),
                )?;
                return Err(e);
            }
        };
        let warnings = validation
            .diagnostics
            .iter()
            .filter(|d| d.severity == crate::diagnostic::Severity::Warning)
            .count();
        audit(
            Event::Validated,
            json!({"version": validation.version, "warnings": warnings,
                   "validators": validation.validator_records()}),
        )?;

        // 2. package
        let repo = Repo::discover(&self.root)?;
        let bundle = self.seal(&repo, &policy, &validation)?;
        let already_active = self.check_redeploy(&policy, env_name, &bundle.digest)?;
        self.check_promotion(&policy, env_name, env, &bundle.digest)?;
        self.check_tag_free(&repo, &policy, env_name, &bundle.digest)?;
        let bundle_path = if opts.dry_run {
            None
        } else {
            Some(self.write_bundle(&bundle, None)?)
        };
        audit(
            Event::Packaged,
            json!({"digest": bundle.digest, "version": policy.version.to_string()}),
        )?;

        // 3. check the environment
        let targets = env
            .services
            .iter()
            .map(Target::from_service)
            .collect::<Result<Vec<_>, _>>()?;
        let health = self.check_health(&targets);
        if !health.healthy() {
            let failing = failing_services(&health);
            audit(Event::EnvCheckFailed, json!({"failing": failing}))?;
            return Err(Error::Unhealthy {
                env: env_name.to_string(),
                failing,
                report: health,
            });
        }
        audit(Event::EnvCheckOk, json!({"services": targets.len()}))?;

        // 4. route
        let routes = route::route(self, &policy, env_name, env)?;
        if routes.is_empty() {
            return Err(GateError::NoRoutes {
                env: env_name.to_string(),
                policy_id: policy_id.to_string(),
            }
            .into());
        }
        audit(Event::Routed, json!({"routes": routes}))?;

        let mut report = DeployReport {
            policy_id: policy_id.to_string(),
            version: policy.version.to_string(),
            env: env_name.to_string(),
            digest: bundle.digest.clone(),
            outcome: DeployOutcome::DryRun,
            already_active,
            bundle_path,
            validation,
            health,
            routes,
            push: None,
            tag: None,
        };
        if opts.dry_run {
            return Ok(report);
        }

        // 5. push
        let routed: Vec<Target> = targets
            .into_iter()
            .filter(|t| report.routes.iter().any(|r| r.service == t.service))
            .collect();
        let started_at = crate::state::now_rfc3339();
        let pushed = self.runtime.block_on(push::push(
            &self.http,
            &bundle,
            env_name,
            &routed,
            &self.config.push,
            opts.observer,
        ));
        self.record_push(&report, &pushed, &started_at)?;
        report.outcome = match pushed.outcome {
            Outcome::Deployed => DeployOutcome::Deployed,
            Outcome::RolledBack => DeployOutcome::RolledBack,
            Outcome::NeedsAttention => DeployOutcome::NeedsAttention,
        };
        report.push = Some(pushed);
        if report.outcome != DeployOutcome::Deployed {
            return Err(Error::DeployFailed {
                policy_id: policy_id.to_string(),
                env: env_name.to_string(),
                outcome: wire_name(report.outcome),
                report: Box::new(report),
            });
        }
        self.state
            .set_active(policy_id, env_name, &report.version, &report.digest)?;

        // 6. tag
        let services: Vec<String> = report.routes.iter().map(|r| r.service.clone()).collect();
        let tag = vcs::ensure_release_tag(
            &repo,
            policy_id,
            &report.version,
            env_name,
            &report.digest,
            &services,
        )?;
        let name = vcs::policy_tag_name(policy_id, &report.version, env_name);
        audit(
            Event::Tagged,
            json!({"tag": name, "created": matches!(tag, TagOutcome::Created)}),
        )?;
        report.tag = Some(TagReport {
            name,
            created: matches!(tag, TagOutcome::Created),
        });

        // 7. audit: `deploy` appends `deployed` once this returns.
        Ok(report)
    }

    /// `pde validate ID [--env ENV]`: step 1 alone.
    pub fn validate_policy(
        &self,
        policy_id: &str,
        env: Option<&str>,
    ) -> Result<ValidationReport, Error> {
        if let Some(name) = env {
            // One signature gate for every command that evaluates an
            // environment: validate must not pass what plan and deploy refuse.
            let environment = self.environment(name)?;
            self.check_plugin_signatures(name, environment)?;
        }
        let policy = validate::load(self, policy_id)?;
        validate::validate(self, &policy, env)?.into_result()
    }

    /// `pde package ID [-o DIR]`: steps 1 and 2, writing the bundle.
    pub fn package(&self, policy_id: &str, out: Option<&Path>) -> Result<PackageReport, Error> {
        let policy = validate::load(self, policy_id)?;
        let validation = validate::validate(self, &policy, None)?.into_result()?;
        let repo = Repo::discover(&self.root)?;
        let bundle = self.seal(&repo, &policy, &validation)?;
        let path = self.write_bundle(&bundle, out)?;
        Ok(PackageReport {
            digest: bundle.digest.clone(),
            path,
            validation,
            bundle,
        })
    }

    fn check_plugin_signatures(&self, env_name: &str, env: &Environment) -> Result<(), Error> {
        if !env.require_signed_plugins {
            return Ok(());
        }
        let loaded = self.plugins()?;
        let bad: Vec<String> = loaded
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
        Err(GateError::UnsignedPlugins {
            env: env_name.to_string(),
            plugins: bad.join(", "),
        }
        .into())
    }

    /// Builds and signs the bundle. Refuses a policy file with uncommitted
    /// changes: the manifest names the commit, and that must not be a lie.
    fn seal(
        &self,
        repo: &Repo,
        policy: &Policy,
        validation: &ValidationReport,
    ) -> Result<Bundle, Error> {
        if !repo.is_clean(&policy.path)? {
            return Err(GateError::DirtyPolicy {
                path: policy.path.clone(),
            }
            .into());
        }
        let payload = Payload {
            manifest: Manifest {
                policy_id: policy.id.clone(),
                version: policy.version.to_string(),
                source_commit: repo.head_commit()?,
                validators: validation.validator_records(),
            },
            policy: policy.document.clone(),
        };
        let key = self.signing_key()?;
        Ok(Bundle::seal(payload, &key.iter().collect::<Vec<_>>()))
    }

    /// Writes `bundle` atomically into `out` (default `<state>/dist/`).
    pub(crate) fn write_bundle(
        &self,
        bundle: &Bundle,
        out: Option<&Path>,
    ) -> Result<PathBuf, Error> {
        let dir = out.map_or_else(|| self.state_dir().join("dist"), Path::to_path_buf);
        let hex = bundle.digest.trim_start_matches("sha256:");
        let name = format!(
            "{}-{}-{}.bundle.json",
            bundle.payload.manifest.policy_id,
            bundle.payload.manifest.version,
            &hex[..12.min(hex.len())]
        );
        let path = dir.join(name);
        let io = |source| Error::Io {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(&dir).map_err(io)?;
        let tmp = dir.join(format!(".{hex}.tmp"));
        std::fs::write(&tmp, bundle.to_canonical_bytes()).map_err(io)?;
        std::fs::rename(&tmp, &path).map_err(io)?;
        Ok(path)
    }

    /// The same version may only be deployed again with the same bytes.
    fn check_redeploy(&self, policy: &Policy, env: &str, digest: &str) -> Result<bool, Error> {
        let Some(active) = self.state.active(&policy.id, env)? else {
            return Ok(false);
        };
        if active.digest == digest {
            return Ok(true);
        }
        if active.version == policy.version.to_string() {
            return Err(GateError::VersionReused {
                policy_id: policy.id.clone(),
                version: active.version,
                env: env.to_string(),
                active: active.digest,
                digest: digest.to_string(),
            }
            .into());
        }
        Ok(false)
    }

    fn check_promotion(
        &self,
        policy: &Policy,
        env_name: &str,
        env: &Environment,
        digest: &str,
    ) -> Result<(), Error> {
        let Some(from) = &env.promote_from else {
            return Ok(());
        };
        if self.state.was_deployed(from, &policy.id, digest)? {
            return Ok(());
        }
        Err(GateError::NotPromoted {
            env: env_name.to_string(),
            from: from.clone(),
            digest: digest.to_string(),
        }
        .into())
    }

    /// Fails before anything is pushed if the release tag exists for other bytes.
    fn check_tag_free(
        &self,
        repo: &Repo,
        policy: &Policy,
        env: &str,
        digest: &str,
    ) -> Result<(), Error> {
        let name = vcs::policy_tag_name(&policy.id, &policy.version.to_string(), env);
        let Some(message) = repo.tag_message(&name)? else {
            return Ok(());
        };
        match vcs::digest_in_message(&message) {
            Some(existing) if existing == digest => Ok(()),
            existing => Err(vcs::VcsError::TagConflict {
                name,
                existing: existing.unwrap_or("(no digest)").to_string(),
                new: digest.to_string(),
            }
            .into()),
        }
    }

    pub(crate) fn check_health(&self, targets: &[Target]) -> HealthReport {
        let timeout = std::time::Duration::from_millis(self.config.push.timeout_ms);
        self.runtime
            .block_on(envcheck::check(&self.http, targets, timeout))
    }

    /// `pde env check ENV`.
    pub fn env_check(&self, env_name: &str) -> Result<HealthReport, Error> {
        let env = self.environment(env_name)?;
        let targets = env
            .services
            .iter()
            .map(Target::from_service)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(self.check_health(&targets))
    }

    fn record_push(
        &self,
        report: &DeployReport,
        pushed: &PushReport,
        started_at: &str,
    ) -> Result<(), Error> {
        let (policy_id, env) = (report.policy_id.as_str(), report.env.as_str());
        let summary = serde_json::to_value(&pushed.targets).unwrap_or_default();
        let event = if pushed.outcome == Outcome::Deployed {
            Event::Pushed
        } else {
            Event::PushFailed
        };
        self.record(
            event,
            policy_id,
            env,
            json!({"digest": report.digest, "targets": summary}),
        )?;
        // `needs-attention` is not a rollback: `push_failed` carries it.
        if pushed.outcome == Outcome::RolledBack {
            self.record(
                Event::RolledBack,
                policy_id,
                env,
                json!({"digest": report.digest, "outcome": pushed.outcome}),
            )?;
        }
        let outcome = wire_name(pushed.outcome);
        self.state.record(&DeploymentRecord {
            id: None,
            policy_id: policy_id.to_string(),
            env: env.to_string(),
            version: report.version.clone(),
            digest: report.digest.clone(),
            outcome,
            started_at: started_at.to_string(),
            finished_at: crate::state::now_rfc3339(),
            actor: crate::audit::default_actor(),
            targets: pushed
                .targets
                .iter()
                .map(|t| TargetRecord {
                    service: t.service.clone(),
                    outcome: wire_name(t.state),
                    previous_digest: t.previous_digest.clone(),
                    detail: t.detail.clone(),
                })
                .collect(),
        })?;
        Ok(())
    }
}

/// The name a unit enum has on the wire (`rolled-back`, `delivered`, …).
fn wire_name<T: Serialize>(value: T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(s)) => s,
        _ => String::new(),
    }
}

fn failing_services(health: &HealthReport) -> String {
    health
        .failures()
        .iter()
        .map(|s| {
            let why = match (&s.status, &s.error) {
                (_, Some(e)) => e.clone(),
                (Some(code), None) => format!("HTTP {code}"),
                (None, None) => "unhealthy".into(),
            };
            format!("{} ({why})", s.service)
        })
        .collect::<Vec<_>>()
        .join(", ")
}
