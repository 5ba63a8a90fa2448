//! The deploy pipeline: the seven steps, top-down, and nothing else.
//!
//! ```text
//! validate → package → check environment → route → push → tag → audit
//! ```
//!
//! Each step runs through its one entry point in [`crate::stages`], the same
//! one `pde validate`, `pde package`, `pde env check` and `pde plan` use.
//! This file decides their order and appends the audit record each step ends
//! with, so the log tells what happened even when a later step fails: the
//! audit is cross-cutting, and step 7 is the `deployed` (or `deploy_failed`)
//! record that closes the chain of this deploy. Nothing is pushed before
//! validation, packaging, every gate and the health check have passed; once
//! a push starts, a failure is compensated by the push step and reported as
//! `rolled-back` or `needs-attention`, never as a success.

use serde_json::json;
use tracing::Instrument as _;

use crate::audit::Event;
use crate::engine::Engine;
use crate::error::Error;
use crate::rollout::Delivery;
use crate::steps::audit::Recorder;
use crate::steps::route::Routing;
use crate::steps::tag::Release;

pub use crate::report::{DeployOptions, DeployOutcome, DeployReport};

impl Engine {
    /// Deploys policy `policy_id` to environment `env`: the library form of
    /// `pde deploy ID --env ENV`.
    pub async fn deploy_policy(&self, policy_id: &str, env: &str) -> Result<DeployReport, Error> {
        self.deploy(policy_id, env, &DeployOptions::default()).await
    }

    /// Runs the seven steps under the deploy lock of the policy and
    /// environment (re-checked before each push, tag and record; its fence
    /// rides on every request), under the committed `pde.toml`. A deploy that pushed but
    /// did not end `deployed` is an [`Error::DeployFailed`] carrying the
    /// full report.
    pub async fn deploy(
        &self,
        policy_id: &str,
        env_name: &str,
        opts: &DeployOptions<'_>,
    ) -> Result<DeployReport, Error> {
        let span = tracing::info_span!("deploy", policy_id, env = env_name, dry_run = opts.dry_run);
        async {
            if !opts.dry_run {
                // A rollout under way is driven by `pde rollout`, not redeployed.
                self.refuse_open_rollout(policy_id, env_name)?;
            }
            let lock = match opts.dry_run {
                true => None,
                false => Some(self.state.lock(policy_id, env_name)?),
            };
            let audit = Recorder::new(
                &self.audit,
                self.outbox.as_ref(),
                policy_id,
                env_name,
                lock.as_ref(),
            );
            let config = match opts.dry_run {
                true => Ok(None),
                false => {
                    self.key_audit_head()?;
                    self.settle_interrupted(policy_id, env_name)?;
                    self.config_in_force().map(Some)
                }
            };
            let in_force = config.as_ref().ok().cloned().flatten();
            audit.record(Event::DeployStart, json!({"config": in_force}))?;
            let result = match config {
                Ok(_) => self.steps(policy_id, env_name, opts, &audit).await,
                Err(e) => Err(e),
            };
            // 7. audit: the record that closes this deploy.
            match &result {
                Ok(r) => audit.record(
                    Event::Deployed,
                    json!({"digest": r.digest, "version": r.version,
                           "already_active": r.already_active}),
                )?,
                Err(e) => audit.record(Event::DeployFailed, e.audit_data())?,
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
        audit: &Recorder<'_>,
    ) -> Result<DeployReport, Error> {
        opts.note(|p| (p.policy_id, p.env) = (Some(policy_id.into()), Some(env_name.into())));
        let env = self.environment(env_name)?;
        let target = Some((env_name, env));

        // 1. validate
        let plugins = self.plugin_gates(target)?;
        let validated = tracing::info_span!("validate")
            .in_scope(|| self.validate_stage(&plugins, policy_id, target));
        let (policy, validation) = match validated {
            Ok(v) => v,
            Err(e) => {
                audit.record(Event::ValidationFailed, e.audit_data())?;
                return Err(e);
            }
        };
        opts.note(|p| p.validated(&validation));
        audit.record(Event::Validated, validation.audit_data())?;

        // 2. package
        let dist = self.dist_dir();
        let out = (!opts.dry_run).then_some(dist.as_path());
        let packaged = tracing::info_span!("package")
            .in_scope(|| self.package_stage(&policy, &validation, target, out))?;
        let (bundle, version) = (&packaged.bundle, policy.version.to_string());
        opts.note(|p| p.packaged(&packaged));
        audit.record(
            Event::Packaged,
            json!({"digest": bundle.digest, "version": version,
                   "source_commit": packaged.artifact.source_commit,
                   "reused_from": packaged.artifact.reused_from}),
        )?;

        // 3. check the environment
        let (targets, health) = self
            .envcheck_stage(env, opts.override_freeze)
            .instrument(tracing::info_span!("envcheck"))
            .await?;
        opts.note(|p| p.health = Some(health.clone()));
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
        if let Some(overridden) = health.freeze_override() {
            ok["freeze_override"] = overridden;
        }
        audit.record(Event::EnvCheckOk, ok)?;

        // 4. route
        let Routing { routes, log } = tracing::info_span!("route")
            .in_scope(|| self.route_stage(&policy, (env_name, env), validation.active.as_ref()))?;
        opts.note(|p| p.routes = Some(routes.clone()));
        audit.record(Event::Routed, json!({"routes": routes}))?;

        let mut report = DeployReport {
            policy_id: policy_id.to_string(),
            version: version.clone(),
            env: env_name.to_string(),
            digest: bundle.digest.clone(),
            outcome: DeployOutcome::DryRun,
            already_active: packaged.already_active,
            artifact: packaged.artifact.clone(),
            bundle_path: packaged.path.clone(),
            validation,
            health,
            routes,
            route_log: log,
            push: None,
            tag: None,
            rollout: None,
        };
        if opts.dry_run {
            // A rollout's waves, each gate evaluated once: nothing is pushed.
            report.rollout = self
                .preview_waves(env, &report, &bundle.payload.policy)
                .await?;
            return Ok(report);
        }

        // 5. push: to every routed service at once, or wave by wave when the
        // environment has a rollout (each wave verified, baked and judged).
        let routed: Vec<_> = targets
            .into_iter()
            .filter(|t| report.routes.iter().any(|r| r.service == t.service))
            .collect();
        let delivery = Delivery {
            policy_id,
            env_name,
            env,
            version: &version,
            bundle,
            routed,
            audit,
            opts,
        };
        let (pushed, rollout) = self.push_waves(delivery).await?;
        report.outcome = pushed.outcome.into();
        report.push = Some(pushed);
        report.rollout = rollout;
        opts.note(|p| *p = (&report).into());
        if report.outcome != DeployOutcome::Deployed {
            return Err(crate::rollout::failure(report));
        }

        // 6. tag
        let services: Vec<String> = report.routes.iter().map(|r| r.service.clone()).collect();
        let release = Release::new(policy_id, &version, env_name, &report.digest);
        let tagged = self.tag_stage(&packaged.repo, release, &services, audit.lock())?;
        audit.record(
            Event::Tagged,
            json!({"tag": tagged.name, "created": tagged.created}),
        )?;
        report.tag = Some(tagged);
        Ok(report)
    }
}
