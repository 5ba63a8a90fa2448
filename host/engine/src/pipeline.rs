//! The deploy pipeline: the seven steps, top-down, and nothing else.
//!
//! ```text
//! validate → package → check environment → route → push → tag → audit
//! ```
//!
//! Each step is a function of [`crate::steps`] that takes only what it uses;
//! this file decides their order, hands each the parts of the [`Engine`] it
//! needs, and appends the audit record each step ends with, so the log tells
//! what happened even when a later step fails. Nothing is pushed before
//! validation, packaging, every gate and the health check have passed; once
//! a push starts, a failure is compensated by the push step and reported as
//! `rolled-back` or `needs-attention`, never as a success.

use serde_json::json;
use tracing::Instrument as _;

use crate::audit::Event;
use crate::engine::Engine;
use crate::error::{Error, HasExitCode};
use crate::http::Target;
use crate::provenance;
use crate::steps::audit::Recorder;
use crate::steps::push::{self, Outcome};
use crate::steps::tag::{self, Release};
use crate::steps::{envcheck, package, route, validate};
use crate::vcs::Repo;

pub use crate::report::{DeployOptions, DeployOutcome, DeployReport};

impl Engine {
    /// Deploys policy `policy_id` to environment `env`: the library form of
    /// `pde deploy ID --env ENV`.
    pub async fn deploy_policy(&self, policy_id: &str, env: &str) -> Result<DeployReport, Error> {
        self.deploy(policy_id, env, &DeployOptions::default()).await
    }

    /// Runs the seven steps under the deploy lock of the policy and
    /// environment. A deploy that pushed but did not end `deployed` is an
    /// [`Error::DeployFailed`] carrying the full report.
    pub async fn deploy(
        &self,
        policy_id: &str,
        env_name: &str,
        opts: &DeployOptions<'_>,
    ) -> Result<DeployReport, Error> {
        let span = tracing::info_span!("deploy", policy_id, env = env_name, dry_run = opts.dry_run);
        async {
            let audit = Recorder::new(
                &self.audit,
                self.outbox.as_ref(),
                policy_id,
                env_name,
                !opts.dry_run,
            );
            let _lock = match opts.dry_run {
                true => None,
                false => Some(self.state.lock(policy_id, env_name)?),
            };
            if !opts.dry_run {
                self.key_audit_head()?;
                self.settle_interrupted(policy_id, env_name)?;
            }
            // The gates come from pde.toml, so a deploy runs under the
            // committed one and its record names it (commit and digest).
            let config = match opts.dry_run {
                true => Ok(None),
                false => Repo::discover(&self.root)
                    .map_err(Error::from)
                    .and_then(|repo| Ok(provenance::config_in_force(&repo, &self.root)?))
                    .map(Some),
            };
            let in_force = config.as_ref().ok().cloned().flatten();
            audit.record(Event::DeployStart, json!({"config": in_force}))?;
            let result = match config {
                Ok(_) => self.steps(policy_id, env_name, opts, audit).await,
                Err(e) => Err(e),
            };
            match &result {
                Ok(r) => audit.record(
                    Event::Deployed,
                    json!({"digest": r.digest, "version": r.version,
                           "already_active": r.already_active}),
                )?,
                Err(e) => audit.record(
                    Event::DeployFailed,
                    json!({"error": e.to_string(), "exit_code": e.exit_code().code()}),
                )?,
            };
            result
        }
        .instrument(span)
        .await
    }

    async fn steps(
        &self,
        policy_id: &str,
        env_name: &str,
        opts: &DeployOptions<'_>,
        audit: Recorder<'_>,
    ) -> Result<DeployReport, Error> {
        let note = |f: &dyn Fn(&mut crate::report::PartialReport)| {
            if let Some(so_far) = opts.so_far {
                so_far.note(f);
            }
        };
        note(&|p| {
            p.policy_id = Some(policy_id.to_string());
            p.env = Some(env_name.to_string());
        });
        let env = self.environment(env_name)?;

        // 1. validate: the environment's plugin gates first (a missing or
        // unsigned plugin is a workspace problem, not a finding), then the
        // policy.
        let plugins = self.plugins()?;
        provenance::check_required(&plugins, env_name, env, &self.plugins_dir())?;
        validate::check_signed_plugins(&plugins, env_name, env)?;
        let approvers = self.approvers()?;
        let span = tracing::info_span!("validate");
        let validated = crate::engine::off_runtime(|| {
            let _span = span.enter();
            let policy = validate::load(&self.policies, policy_id)?;
            let report = validate::validate(
                self.validate_inputs(&plugins, &approvers),
                &policy,
                Some((env_name, env)),
            )?
            .into_result()?;
            Ok::<_, Error>((policy, report))
        });
        let (policy, validation) = match validated {
            Ok(v) => v,
            Err(e) => {
                let mut data = json!({"error": e.to_string(), "exit_code": e.exit_code().code()});
                // The version refused, for `pde history` (an added field).
                if let Error::ValidationFailed { report, .. } = &e {
                    data["version"] = report.version.clone().into();
                }
                audit.record(Event::ValidationFailed, data)?;
                return Err(e);
            }
        };
        note(&|p| {
            p.version = Some(validation.version.clone());
            p.validation = Some(validation.clone());
        });
        audit.record(
            Event::Validated,
            json!({"version": validation.version, "warnings": validation.warnings(),
                   "validators": validation.validator_records(),
                   "policy_digest": validation.approvals.policy_digest,
                   "approvals": validation.approvals.counted}),
        )?;

        // 2. package
        let version = policy.version.to_string();
        let (repo, admitted, bundle_path) = tracing::info_span!("package").in_scope(|| {
            let repo = Repo::discover(&self.root)?;
            provenance::check(&repo, &self.root, &policy.path, &self.plugins_dir())?;
            let key = self.signing_key()?;
            let built = package::seal(&repo, &policy, &validation, key.as_ref())?;
            let admitted = package::admit(
                &self.state,
                &self.dist_dir(),
                &policy,
                env_name,
                env,
                built,
                key.as_ref(),
            )?;
            let bundle = &admitted.bundle;
            tag::check_free(
                &repo,
                &release(policy_id, &version, env_name, &bundle.digest),
            )?;
            let bundle_path = match opts.dry_run {
                true => None,
                false => {
                    // Kept in the state before anything is pushed, so
                    // whoever shares it can show this version to the
                    // validators of the next deploy once it is active.
                    self.state
                        .put_bundle(&bundle.digest, &bundle.to_canonical_bytes())?;
                    Some(package::write(bundle, &self.dist_dir())?)
                }
            };
            Ok::<_, Error>((repo, admitted, bundle_path))
        })?;
        let package::Admitted {
            bundle,
            artifact,
            already_active,
        } = admitted;
        note(&|p| {
            p.digest = Some(bundle.digest.clone());
            p.artifact = Some(artifact.clone());
            p.already_active = Some(already_active);
            p.bundle_path = bundle_path.clone();
        });
        audit.record(
            Event::Packaged,
            json!({"digest": bundle.digest, "version": version,
                   "source_commit": artifact.source_commit,
                   "reused_from": artifact.reused_from}),
        )?;

        // 3. check the environment
        let targets = env
            .services
            .iter()
            .map(push::target_of)
            .collect::<Result<Vec<Target>, _>>()?;
        let health = envcheck::check_all(
            &self.http,
            &targets,
            &env.checks,
            self.config.push.timeout(),
            jiff::Timestamp::now(),
            opts.override_freeze,
        )
        .instrument(tracing::info_span!("envcheck"))
        .await?;
        note(&|p| p.health = Some(health.clone()));
        if !health.healthy() {
            let failing = health.failing_services();
            audit.record(
                Event::EnvCheckFailed,
                json!({"failing": failing, "checks": health.checks}),
            )?;
            return Err(Error::Unhealthy {
                env: env_name.to_string(),
                failing,
                report: health,
            });
        }
        // An override is recorded where the check it bypassed is: on the
        // `env_check_ok` record, with who (the record's actor) and why.
        let mut ok = json!({"services": targets.len(), "checks": health.checks});
        let overridden = health.overridden_freezes();
        if !overridden.is_empty() {
            ok["freeze_override"] = json!({
                "reason": overridden[0].1,
                "checks": overridden.iter().map(|(name, _)| *name).collect::<Vec<_>>(),
            });
        }
        audit.record(Event::EnvCheckOk, ok)?;

        // 4. route
        let span = tracing::info_span!("route");
        let routes = crate::engine::off_runtime(|| {
            let _span = span.enter();
            route::route(
                &*self.plugins()?,
                &policy,
                env_name,
                env,
                validation.active.as_ref(),
            )
            .map_err(Error::from)
        })?;
        note(&|p| p.routes = Some(routes.clone()));
        audit.record(Event::Routed, json!({"routes": routes}))?;

        let mut report = DeployReport {
            policy_id: policy_id.to_string(),
            version: version.clone(),
            env: env_name.to_string(),
            digest: bundle.digest.clone(),
            outcome: DeployOutcome::DryRun,
            already_active,
            artifact,
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
        let started_at = pde_core::clock::now_rfc3339();
        // Recorded before the first byte leaves, so a deploy killed mid-push
        // shows as interrupted rather than not at all.
        let in_progress = self.state.begin(&crate::state::DeploymentRecord {
            id: None,
            policy_id: policy_id.to_string(),
            env: env_name.to_string(),
            version: version.clone(),
            digest: bundle.digest.clone(),
            outcome: crate::state::RecordOutcome::InProgress,
            started_at: started_at.clone(),
            finished_at: started_at.clone(),
            actor: crate::audit::default_actor(),
            targets: routed
                .iter()
                .map(|t| crate::state::TargetRecord {
                    service: t.service.clone(),
                    outcome: "pending".into(),
                    previous_digest: None,
                    detail: String::new(),
                })
                .collect(),
        })?;
        let pushed = push::push(
            &self.http,
            &bundle,
            env_name,
            &routed,
            &self.config.push,
            opts.observer,
        )
        .instrument(tracing::info_span!("push", targets = routed.len()))
        .await;
        let event = match pushed.outcome {
            Outcome::Deployed => Event::Pushed,
            Outcome::RolledBack | Outcome::NeedsAttention => Event::PushFailed,
        };
        audit.record(
            event,
            json!({"digest": report.digest, "targets": pushed.targets}),
        )?;
        // `needs-attention` is not a rollback: `push_failed` carries it.
        if pushed.outcome == Outcome::RolledBack {
            audit.record(
                Event::RolledBack,
                json!({"digest": report.digest, "outcome": pushed.outcome}),
            )?;
        }
        self.state.finish(
            in_progress,
            &push::deployment_record(&report.policy_id, env_name, &version, &pushed, &started_at),
        )?;
        for (service, holds) in push::holdings(&pushed, &version) {
            self.state
                .set_service_active(policy_id, env_name, &service, holds)?;
        }
        report.outcome = pushed.outcome.into();
        report.push = Some(pushed);
        note(&|p| *p = (&report).into());
        if report.outcome != DeployOutcome::Deployed {
            return Err(Error::DeployFailed {
                policy_id: policy_id.to_string(),
                env: env_name.to_string(),
                outcome: report.outcome,
                report: Box::new(report),
            });
        }
        self.state
            .set_active(policy_id, env_name, &version, &report.digest)?;

        // 6. tag
        let services: Vec<String> = report.routes.iter().map(|r| r.service.clone()).collect();
        let audit_head = self.audit.last()?;
        let release = Release {
            audit_head: audit_head.as_ref().map(|(seq, hash)| (*seq, hash.as_str())),
            ..release(policy_id, &version, env_name, &report.digest)
        };
        let tagged =
            tracing::info_span!("tag").in_scope(|| tag::ensure(&repo, &release, &services))?;
        audit.record(
            Event::Tagged,
            json!({"tag": tagged.name, "created": tagged.created}),
        )?;
        report.tag = Some(tagged);

        // 7. audit: `deploy` appends `deployed` once this returns.
        Ok(report)
    }
}

fn release<'a>(policy_id: &'a str, version: &'a str, env: &'a str, digest: &'a str) -> Release<'a> {
    Release {
        policy_id,
        version,
        env,
        digest,
        audit_head: None,
    }
}
