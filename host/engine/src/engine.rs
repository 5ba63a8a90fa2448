//! The [`Engine`]: one opened policy workspace and the parts the steps use.
//!
//! Opening is cheap and does no network or plugin work: plugins are compiled
//! (or loaded from the on-disk cache) the first time a step needs them, so
//! `pde status` never pays for wasmtime.
//!
//! The engine is async: its network steps are `async fn`s that run on the
//! caller's runtime, so it can be used from async code (a service, a
//! notebook kernel). [`crate::blocking::Engine`] wraps it with a runtime of
//! its own for callers that are not async, as the CLI is.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::audit::AuditLog;
use crate::audit::outbox::{Outbox, SinkConfig};
use crate::config::{Config, ConfigError, Environment};
use crate::error::Error;
use crate::keys::{self, TrustedKeys};
use crate::plugin::{PluginHost, PluginSet as Plugins};
use crate::policy::PolicyStore;
use crate::state::StateStore;
use crate::steps::envcheck::{self, HealthReport};
use crate::steps::package::{self, PackageReport};
use crate::steps::validate::{self, ValidationReport};
use crate::vcs::Repo;

/// An opened policy workspace: `pde.toml`, the policy store, state, audit log
/// and plugins. All pde operations are methods of the engine.
pub struct Engine {
    pub(crate) root: PathBuf,
    pub(crate) config: Config,
    pub(crate) policies: PolicyStore,
    pub(crate) state: StateStore,
    pub(crate) audit: AuditLog,
    pub(crate) http: reqwest::Client,
    pub(crate) outbox: Option<Outbox>,
    plugins: Mutex<Option<Arc<Plugins>>>,
}

impl Engine {
    /// Opens the workspace whose `pde.toml` is in `dir`. With an audit sink
    /// configured, starts its forwarder, which first sends whatever earlier
    /// runs left pending.
    pub fn open(dir: &Path) -> Result<Engine, Error> {
        let root = dir.to_path_buf();
        let config = Config::load(&root)?;
        let state_dir = root.join(&config.state);
        std::fs::create_dir_all(&state_dir).map_err(|source| Error::Io {
            path: state_dir.clone(),
            source,
        })?;
        let policies = PolicyStore::open(&root.join(&config.policies));
        let state = StateStore::open(&state_dir)?;
        let audit = AuditLog::open(&state_dir)?;
        let http = crate::http::client(config.push.timeout())?;
        let outbox = match &config.audit.sink_url {
            Some(url) => {
                let token = match &config.audit.sink_token_env {
                    Some(var) => Some(pde_core::secret::from_env(var).ok_or_else(|| {
                        ConfigError::Invalid {
                            path: root.join(crate::config::FILE_NAME),
                            message: format!(
                                "[audit] sink_token_env names {var}, which is not set"
                            ),
                        }
                    })?),
                    None => None,
                };
                let sink = SinkConfig {
                    url: url.clone(),
                    token,
                    retry: config.push.retry_policy(),
                    flush: Duration::from_millis(config.audit.sink_flush_ms.unwrap_or(2000)),
                    rest: Duration::from_millis(500),
                };
                Some(Outbox::start(&state_dir, sink).map_err(|source| Error::Io {
                    path: state_dir.clone(),
                    source,
                })?)
            }
            None => None,
        };
        Ok(Engine {
            root,
            config,
            policies,
            state,
            audit,
            http,
            outbox,
            plugins: Mutex::new(None),
        })
    }

    /// The workspace root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The parsed `pde.toml`.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The state directory (`.pde/` by default).
    pub fn state_dir(&self) -> PathBuf {
        self.root.join(&self.config.state)
    }

    /// Where deploys write their bundles (`<state>/dist`).
    pub fn dist_dir(&self) -> PathBuf {
        self.state_dir().join("dist")
    }

    /// The policy store.
    pub fn policies(&self) -> &PolicyStore {
        &self.policies
    }

    /// The deployment state database.
    pub fn state(&self) -> &StateStore {
        &self.state
    }

    /// The audit log.
    pub fn audit(&self) -> &AuditLog {
        &self.audit
    }

    /// The named environment of `pde.toml`.
    pub fn environment(&self, name: &str) -> Result<&Environment, Error> {
        Ok(self.config.environment(name)?)
    }

    /// The public keys whose plugin signatures this workspace trusts.
    pub fn plugin_trust(&self) -> Result<TrustedKeys, Error> {
        let paths: Vec<PathBuf> = self
            .config
            .trust
            .plugin_keys
            .iter()
            .map(|p| self.root.join(p))
            .collect();
        Ok(TrustedKeys::from_files(&paths)?)
    }

    /// The bundle signing key named by `[signing]`, or none when the
    /// workspace has no `[signing]` table.
    ///
    /// Unsigned bundles are allowed so that a new workspace works before keys
    /// are handed out, but they are refused where it matters: `pde agent`
    /// rejects them unless started with `--insecure-accept-unsigned`. A key
    /// that is configured but cannot be read is always an error.
    pub fn signing_key(&self) -> Result<Option<ed25519_dalek::SigningKey>, Error> {
        let signing = &self.config.signing;
        if let Some(file) = &signing.key_file {
            return Ok(Some(keys::load_signing_key(&self.root.join(file))?));
        }
        if let Some(var) = &signing.key_env {
            return Ok(Some(keys::load_signing_key_env(var)?));
        }
        tracing::warn!(
            "no [signing] key in pde.toml: the bundle is unsigned and agents will refuse it; \
             create a key with `pde keygen --out keys` and add `[signing] key_file = \"keys/release.ed25519\"`"
        );
        Ok(None)
    }

    /// The workspace plugins, compiled or loaded from the cache on first use.
    pub fn plugins(&self) -> Result<Arc<Plugins>, Error> {
        let mut slot = self.plugins.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(loaded) = slot.as_ref() {
            return Ok(loaded.clone());
        }
        let host = PluginHost::new(
            self.config.limits,
            Some(self.state_dir().join("cache").join("plugins")),
        )?;
        let dir = self.root.join(&self.config.plugins);
        let plugins = if dir.exists() {
            host.load_dir(&dir, &self.plugin_trust()?)?
        } else {
            tracing::info!(dir = %dir.display(), "no plugin directory; running built-in checks only");
            Vec::new()
        };
        let loaded = Arc::new(Plugins { host, plugins });
        *slot = Some(loaded.clone());
        Ok(loaded)
    }

    /// What step 1 reads.
    pub(crate) fn validate_inputs<'a>(&'a self, plugins: &'a Plugins) -> validate::Inputs<'a> {
        validate::Inputs {
            policies: &self.policies,
            state: &self.state,
            plugins,
        }
    }

    /// `pde validate ID [--env ENV]`: step 1 alone. With an environment, its
    /// gates apply as in a deploy: versions, approvals, signed plugins.
    pub fn validate_policy(
        &self,
        policy_id: &str,
        env: Option<&str>,
    ) -> Result<ValidationReport, Error> {
        let _span = tracing::info_span!("validate", policy_id, env).entered();
        let env = match env {
            Some(name) => Some((name, self.environment(name)?)),
            None => None,
        };
        let plugins = self.plugins()?;
        if let Some((name, environment)) = env {
            validate::check_signed_plugins(&plugins, name, environment)?;
        }
        let policy = validate::load(&self.policies, policy_id)?;
        Ok(validate::validate(self.validate_inputs(&plugins), &policy, env)?.into_result()?)
    }

    /// `pde package ID [-o DIR]`: steps 1 and 2, writing the bundle.
    pub fn package(&self, policy_id: &str, out: Option<&Path>) -> Result<PackageReport, Error> {
        let _span = tracing::info_span!("package", policy_id).entered();
        let plugins = self.plugins()?;
        let policy = validate::load(&self.policies, policy_id)?;
        let validation =
            validate::validate(self.validate_inputs(&plugins), &policy, None)?.into_result()?;
        let repo = Repo::discover(&self.root)?;
        let key = self.signing_key()?;
        let bundle = package::seal(&repo, &policy, &validation, key.as_ref())?;
        let path = package::write(&bundle, out.unwrap_or(&self.dist_dir()))?;
        Ok(PackageReport {
            digest: bundle.digest.clone(),
            path,
            validation,
            bundle,
        })
    }

    /// `pde env check ENV`: step 3 alone.
    pub async fn env_check(&self, env_name: &str) -> Result<HealthReport, Error> {
        let env = self.environment(env_name)?;
        let targets = env
            .services
            .iter()
            .map(crate::steps::push::target_of)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(envcheck::check(&self.http, &targets, self.config.push.timeout()).await)
    }
}
