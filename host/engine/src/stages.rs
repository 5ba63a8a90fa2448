//! Each step bound to the engine: the one entry point per step.
//!
//! A step in [`crate::steps`] takes only what it uses and knows nothing of
//! the [`Engine`]. This file hands each step the engine's parts — the
//! policy store, the state, the plugins, the keys, the HTTP client — once,
//! so that the deploy pipeline, the single-step commands (`pde validate`,
//! `pde package`, `pde env check`), `pde plan` and `pde rollback` all run
//! the same composition. A gate added here holds for every one of them.
//!
//! Audit records are not written here: which event a step ends with depends
//! on the command (a `pde validate` writes none), so the caller records it.

use std::path::Path;
use std::sync::Arc;

use tracing::Instrument as _;

use crate::config::{Environment, Service};
use crate::engine::{Engine, off_runtime};
use crate::error::Error;
use crate::http::Target;
use crate::plugin::{ActivePolicy, PluginSet as Plugins};
use crate::policy::Policy;
use crate::report::Packaged;
use crate::state::DeployLock;
use crate::steps::envcheck::{self, HealthReport};
use crate::steps::package::{self, Artifact};
use crate::steps::push::{self, PushReport};
use crate::steps::route::{self, Routing};
use crate::steps::tag;
use crate::steps::validate::{self, ValidationReport};
use crate::vcs::Repo;

/// An environment, by name and configuration.
pub(crate) type EnvRef<'a> = (&'a str, &'a Environment);

impl Engine {
    /// A service as an HTTP target, its token read now.
    pub(crate) fn target(&self, service: &Service) -> Result<Target, Error> {
        Ok(Target::new(&service.name, &service.url, service.token()?))
    }

    /// The services of `env` as HTTP targets.
    pub(crate) fn targets(&self, env: &Environment) -> Result<Vec<Target>, Error> {
        env.services.iter().map(|s| self.target(s)).collect()
    }

    /// Before step 1: the workspace's plugins, through the environment's
    /// gates (a required plugin missing, an unsigned plugin where signatures
    /// are required). A refusal here is a workspace problem, not a finding.
    pub(crate) fn plugin_gates(&self, env: Option<EnvRef<'_>>) -> Result<Arc<Plugins>, Error> {
        if let (Some(floor), Some((name, environment))) = (&self.floor, env) {
            floor.check(name, environment)?;
        }
        let plugins = self.plugins()?;
        if let Some((name, environment)) = env {
            crate::provenance::check_required(&plugins, name, environment, &self.plugins_dir())?;
            validate::check_signed_plugins(&plugins, name, environment)?;
        }
        Ok(plugins)
    }

    /// Step 1: schema, rule ownership, version, approvals and every
    /// validator plugin, against the environment when one is given.
    pub(crate) fn validate_stage(
        &self,
        plugins: &Plugins,
        policy_id: &str,
        env: Option<EnvRef<'_>>,
    ) -> Result<(Policy, ValidationReport), Error> {
        let approvers = self.approvers()?;
        off_runtime(|| {
            let policy = validate::load(&self.policies, policy_id)?;
            let report =
                validate::validate(self.validate_inputs(plugins, &approvers), &policy, env)?
                    .into_result()?;
            Ok((policy, report))
        })
    }

    /// Step 2: the bundle, built from committed files and signed. For an
    /// environment, the artifact it must ship ([`package::admit`]) and a
    /// free release tag; written (and kept in the state) into `out`.
    pub(crate) fn package_stage(
        &self,
        policy: &Policy,
        validation: &ValidationReport,
        env: Option<EnvRef<'_>>,
        out: Option<&Path>,
    ) -> Result<Packaged, Error> {
        let repo = Repo::discover(&self.root)?;
        crate::provenance::check(&repo, &self.root, &policy.path, &self.plugins_dir())?;
        let key = self.signing_key()?;
        let built = package::seal(
            &repo,
            policy,
            validation.validator_records(),
            &validation.approvals.carried,
            key.as_ref(),
        )?;
        let admitted = match env {
            Some((env_name, environment)) => {
                let admitted = package::admit(
                    &self.state,
                    &self.dist_dir(),
                    policy,
                    env_name,
                    environment,
                    built,
                    key.as_ref(),
                )?;
                let version = policy.version.to_string();
                tag::check_free(
                    &repo,
                    &tag::Release::new(&policy.id, &version, env_name, &admitted.bundle.digest),
                )?;
                admitted
            }
            None => package::Admitted {
                artifact: Artifact {
                    reused_from: None,
                    source_commit: built.payload.manifest.source_commit.clone(),
                },
                bundle: built,
                already_active: false,
            },
        };
        let mut admitted = admitted;
        // Attested over the bundle actually shipped (a promoted one has the
        // earlier build's digest), so agents can check what ran on it.
        if let Some(key) = key.as_ref() {
            admitted.bundle.attestation = Some(pde_core::attestation::attest(
                &admitted.bundle,
                env!("CARGO_PKG_VERSION"),
                validation.attested_validators(),
                key,
            ));
        }
        let path = match out {
            None => None,
            Some(dir) => {
                if env.is_some() {
                    // Kept in the state before anything is pushed, so
                    // whoever shares it can show this version to the
                    // validators of the next deploy once it is active.
                    self.state.put_bundle(
                        &admitted.bundle.digest,
                        &admitted.bundle.to_canonical_bytes(),
                    )?;
                }
                Some(package::write(&admitted.bundle, dir)?)
            }
        };
        Ok(Packaged {
            repo,
            bundle: admitted.bundle,
            artifact: admitted.artifact,
            already_active: admitted.already_active,
            path,
        })
    }

    /// Step 3: every service's health and every readiness check, at once.
    pub(crate) async fn envcheck_stage(
        &self,
        env: &Environment,
        override_freeze: Option<&str>,
    ) -> Result<(Vec<Target>, HealthReport), Error> {
        let targets = self.targets(env)?;
        let mut health = envcheck::check_all(
            &self.http,
            &targets,
            &env.checks,
            self.config.push.timeout(),
            jiff::Timestamp::now(),
            override_freeze,
        )
        .await?;
        // OCI delivery: the registry is where the bundle goes first.
        if let Some((name, oci)) = self.oci_env(env) {
            health.checks.push(self.registry_check(name, oci).await);
        }
        Ok((targets, health))
    }

    /// Step 5: concurrent delivery to the routed targets, verified, and
    /// compensated if any fails; only while `lock` is still held, and with
    /// its fencing number on every request (push protocol v4).
    pub(crate) async fn push_stage(
        &self,
        bundle: &pde_core::bundle::Bundle,
        env_name: &str,
        routed: &[Target],
        observer: &dyn push::Observer,
        lock: Option<&DeployLock>,
    ) -> Result<PushReport, Error> {
        if let Some(lock) = lock {
            lock.check("pushing")?;
        }
        if let Some(oci) = self.environment(env_name)?.oci() {
            let span = tracing::info_span!("publish", targets = routed.len());
            return self
                .publish_stage(bundle, env_name, oci, routed, observer)
                .instrument(span)
                .await;
        }
        // Signs the fence of each deploy and the rollbacks of a
        // compensation (push protocol v3, v4).
        let signer = self.rollback_signer()?;
        let span = tracing::info_span!("push", targets = routed.len());
        let fenced = push::Fenced {
            signer: signer.as_ref(),
            fence: lock.map(DeployLock::fence),
        };
        Ok(push::push(
            &self.http,
            bundle,
            env_name,
            routed,
            &self.config.push,
            fenced,
            observer,
        )
        .instrument(span)
        .await)
    }

    /// Step 6: the annotated release tag, recording the audit log's head as
    /// it stands, so `pde audit verify` can anchor the log to it; only while
    /// `lock` is still held.
    pub(crate) fn tag_stage(
        &self,
        repo: &Repo,
        release: tag::Release<'_>,
        services: &[String],
        lock: Option<&DeployLock>,
    ) -> Result<tag::TagReport, Error> {
        let _span = tracing::info_span!("tag").entered();
        if let Some(lock) = lock {
            lock.check("tagging")?;
        }
        let head = self.audit.last()?;
        let release = tag::Release {
            audit_head: head.as_ref().map(|(seq, hash)| (*seq, hash.as_str())),
            ..release
        };
        Ok(tag::ensure(repo, &release, services)?)
    }

    /// Step 4: every router plugin's choice among the environment's services.
    pub(crate) fn route_stage(
        &self,
        policy: &Policy,
        (env_name, env): EnvRef<'_>,
        active: Option<&ActivePolicy>,
    ) -> Result<Routing, Error> {
        let plugins = self.plugins()?;
        off_runtime(|| Ok(route::route(&plugins, policy, env_name, env, active)?))
    }
}

impl Engine {
    /// The committed `pde.toml` a deploy or rollback runs under (its gates:
    /// freezes, approvals, signatures, promotion), refused when the work
    /// tree's copy differs from the commit.
    pub(crate) fn config_in_force(&self) -> Result<crate::provenance::ConfigInForce, Error> {
        let repo = Repo::discover(&self.root)?;
        let mut in_force = crate::provenance::config_in_force(&repo, &self.root)?;
        in_force.floor = self
            .floor
            .as_ref()
            .map(|f| crate::provenance::FloorInForce {
                path: f.path.clone(),
                sha256: f.sha256.clone(),
                trust_file: f.signed.clone(),
            });
        Ok(in_force)
    }
}
