//! The [`Engine`]: one opened policy workspace and the handles every step needs.
//!
//! Opening is cheap and does no network or plugin work: plugins are compiled
//! (or loaded from the on-disk cache) the first time a step needs them, so
//! `pde status` never pays for wasmtime.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::audit::{AuditLog, AuditRecord, AuditSink, Event};
use crate::config::{Config, ConfigError, Environment};
use crate::error::Error;
use crate::keys::{self, TrustedKeys};
use crate::plugin::{Plugin, PluginHost, PluginKind};
use crate::policy::PolicyStore;
use crate::state::StateStore;

/// The plugins of a workspace, loaded once per engine.
pub(crate) struct LoadedPlugins {
    pub(crate) host: PluginHost,
    pub(crate) plugins: Vec<Plugin>,
}

impl LoadedPlugins {
    /// The plugins of one kind, in name order.
    pub(crate) fn of_kind(&self, kind: PluginKind) -> impl Iterator<Item = &Plugin> {
        self.plugins.iter().filter(move |p| p.kind == kind)
    }
}

/// An opened policy workspace: `pde.toml`, the policy store, state, audit log
/// and plugins. All pde operations are methods of the engine.
pub struct Engine {
    pub(crate) root: PathBuf,
    pub(crate) config: Config,
    pub(crate) policies: PolicyStore,
    pub(crate) state: StateStore,
    pub(crate) audit: AuditLog,
    pub(crate) http: reqwest::Client,
    pub(crate) runtime: tokio::runtime::Runtime,
    plugins: Mutex<Option<Arc<LoadedPlugins>>>,
    sink: Option<AuditSink>,
}

impl Engine {
    /// Opens the workspace whose `pde.toml` is in `dir`.
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
        let http = crate::push::client(Duration::from_millis(config.push.timeout_ms))?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|source| Error::Io {
                path: root.clone(),
                source,
            })?;
        let sink = match &config.audit.sink_url {
            Some(url) => {
                let token = match &config.audit.sink_token_env {
                    Some(var) => Some(std::env::var(var).map_err(|_| ConfigError::Invalid {
                        path: root.join(crate::config::FILE_NAME),
                        message: format!("[audit] sink_token_env names {var}, which is not set"),
                    })?),
                    None => None,
                };
                Some(AuditSink::new(url.clone(), token, http.clone()))
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
            runtime,
            plugins: Mutex::new(None),
            sink,
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
        let mut trusted = TrustedKeys::from_files(&paths)?;
        trusted.revoke(&self.config.trust.revoked);
        Ok(trusted)
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
    pub(crate) fn plugins(&self) -> Result<Arc<LoadedPlugins>, Error> {
        let mut slot = self.plugins.lock().expect("plugin slot poisoned");
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
        let loaded = Arc::new(LoadedPlugins { host, plugins });
        *slot = Some(loaded.clone());
        Ok(loaded)
    }

    /// Appends one audit record and forwards it to the sink, if any. The local
    /// log is the source of truth: a sink failure is logged, never fatal.
    pub(crate) fn record(
        &self,
        event: Event,
        policy_id: &str,
        env: &str,
        data: serde_json::Value,
    ) -> Result<AuditRecord, Error> {
        let record = self.audit.append(event, policy_id, env, data)?;
        if let Some(sink) = &self.sink
            && let Err(e) = self.runtime.block_on(sink.forward(&record))
        {
            tracing::warn!(seq = record.seq, error = %e, "audit sink did not take the record; the local log keeps it");
        }
        Ok(record)
    }
}
