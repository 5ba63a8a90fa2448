//! A blocking facade over the async [`crate::Engine`], as `reqwest::blocking`
//! is over `reqwest`: for callers that are not async (the CLI, scripts,
//! the Python binding).
//!
//! Each [`Engine`] owns a small current-thread runtime and drives the async
//! engine's futures on it. Do not call it from inside an async runtime (the
//! nested `block_on` would panic); use [`crate::Engine`] there.

use std::path::Path;

use crate::error::Error;
use crate::live::LiveReport;
use crate::pipeline::{DeployOptions, DeployReport};
use crate::plan::PlanReport;
use crate::rollback::RollbackReport;
use crate::rollout::RolloutStatus;
use crate::steps::envcheck::HealthReport;

/// The engine, with blocking methods for the steps that do network work.
/// Everything else is reached through `Deref` to [`crate::Engine`].
pub struct Engine {
    inner: crate::Engine,
    runtime: tokio::runtime::Runtime,
}

impl Engine {
    /// Opens the workspace whose `pde.toml` is in `dir`
    /// ([`crate::Engine::open`]).
    pub fn open(dir: &Path) -> Result<Engine, Error> {
        Self::wrap(dir, crate::Engine::open(dir)?)
    }

    /// Opens the workspace for reading only
    /// ([`crate::Engine::open_read_only`]).
    pub fn open_read_only(dir: &Path) -> Result<Engine, Error> {
        Self::wrap(dir, crate::Engine::open_read_only(dir)?)
    }

    fn wrap(dir: &Path, inner: crate::Engine) -> Result<Engine, Error> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|source| Error::Io {
                path: dir.to_path_buf(),
                source,
            })?;
        Ok(Engine { inner, runtime })
    }

    /// The async engine inside.
    pub fn inner(&self) -> &crate::Engine {
        &self.inner
    }

    /// [`crate::Engine::deploy_policy`], blocking.
    pub fn deploy_policy(&self, policy_id: &str, env: &str) -> Result<DeployReport, Error> {
        self.runtime
            .block_on(self.inner.deploy_policy(policy_id, env))
    }

    /// [`crate::Engine::deploy`], blocking.
    pub fn deploy(
        &self,
        policy_id: &str,
        env: &str,
        opts: &DeployOptions<'_>,
    ) -> Result<DeployReport, Error> {
        self.runtime
            .block_on(self.inner.deploy(policy_id, env, opts))
    }

    /// [`crate::Engine::plan`], blocking.
    pub fn plan(&self, policy_id: &str, env: &str) -> Result<PlanReport, Error> {
        self.runtime.block_on(self.inner.plan(policy_id, env))
    }

    /// [`crate::Engine::rollback`], blocking.
    pub fn rollback(
        &self,
        policy_id: &str,
        env: &str,
        to: Option<&str>,
    ) -> Result<RollbackReport, Error> {
        self.runtime
            .block_on(self.inner.rollback(policy_id, env, to))
    }

    /// [`crate::Engine::rollback_with_reason`], blocking.
    pub fn rollback_with_reason(
        &self,
        policy_id: &str,
        env: &str,
        to: Option<&str>,
        reason: Option<&str>,
    ) -> Result<RollbackReport, Error> {
        self.runtime
            .block_on(self.inner.rollback_with_reason(policy_id, env, to, reason))
    }

    /// [`crate::Engine::rollout_promote`], blocking.
    pub fn rollout_promote(&self, policy_id: &str, env: &str) -> Result<RolloutStatus, Error> {
        self.runtime
            .block_on(self.inner.rollout_promote(policy_id, env))
    }

    /// [`crate::Engine::rollout_abort`], blocking.
    pub fn rollout_abort(&self, policy_id: &str, env: &str) -> Result<RolloutStatus, Error> {
        self.runtime
            .block_on(self.inner.rollout_abort(policy_id, env))
    }

    /// [`crate::Engine::rollout_resume`], blocking.
    pub fn rollout_resume(&self, policy_id: &str, env: &str) -> Result<RolloutStatus, Error> {
        self.runtime
            .block_on(self.inner.rollout_resume(policy_id, env))
    }

    /// [`crate::Engine::live_status`], blocking.
    pub fn live_status(&self, env: Option<&str>) -> Result<LiveReport, Error> {
        self.runtime.block_on(self.inner.live_status(env))
    }

    /// [`crate::Engine::registry_tags`], blocking.
    pub fn registry_tags(
        &self,
        env: Option<&str>,
        policies: &[String],
    ) -> Result<Vec<crate::delivery::TagStatus>, Error> {
        self.runtime
            .block_on(self.inner.registry_tags(env, policies))
    }

    /// [`crate::Engine::env_check`], blocking.
    pub fn env_check(&self, env: &str) -> Result<HealthReport, Error> {
        self.runtime.block_on(self.inner.env_check(env))
    }
}

impl std::ops::Deref for Engine {
    type Target = crate::Engine;

    fn deref(&self) -> &crate::Engine {
        &self.inner
    }
}
