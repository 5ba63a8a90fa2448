//! One way to open a workspace's plugins: which keys their signatures are
//! checked against and where their compiled forms are cached.
//!
//! [`crate::Engine`] opens its plugins through [`trust`] and [`host`], and
//! so do the `pde plugin` commands through [`PluginWorkspace`], which reads
//! only `pde.toml` and the trust floor: testing or signing one plugin must
//! not open (or create) the state database and audit log, and must work
//! outside any workspace. Deriving the keys or the cache anywhere else is
//! how a command ends up trusting keys that a deploy does not (the floor,
//! `[trust] revoked`) or missing the cache a deploy filled.

use std::path::{Path, PathBuf};

use crate::config::Config;
use crate::error::Error;
use crate::floor::Floor;
use crate::keys::TrustedKeys;
use crate::plugin::PluginHost;

/// The plugin side of a workspace (`pde.toml` and the trust floor), or of
/// none: a `.wasm` handled outside any workspace.
pub struct PluginWorkspace {
    root: PathBuf,
    /// `None`: no `pde.toml` in `root`.
    config: Option<Config>,
    floor: Option<Floor>,
}

impl PluginWorkspace {
    /// The workspace whose `pde.toml` is in `dir`. Without one, `required`
    /// makes that an error (the one `pde.toml` loading gives); otherwise the
    /// plugins are handled as outside any workspace: default limits, no
    /// trusted keys, the per-user cache only.
    pub fn open(dir: &Path, required: bool) -> Result<PluginWorkspace, Error> {
        let root = dir.to_path_buf();
        if !required && !root.join(crate::config::FILE_NAME).is_file() {
            return Ok(PluginWorkspace {
                root,
                config: None,
                floor: None,
            });
        }
        let config = Config::load(&root)?;
        let floor = Floor::load()?;
        Ok(PluginWorkspace {
            root,
            config: Some(config),
            floor,
        })
    }

    /// Its `pde.toml`, when there is a workspace.
    pub fn config(&self) -> Option<&Config> {
        self.config.as_ref()
    }

    /// The plugin directory, when there is a workspace.
    pub fn plugins_dir(&self) -> Option<PathBuf> {
        self.config.as_ref().map(|c| self.root.join(&c.plugins))
    }

    /// The keys whose plugin signatures count here ([`trust`]); none
    /// outside a workspace.
    pub fn trust(&self) -> Result<TrustedKeys, Error> {
        match &self.config {
            Some(config) => trust(&self.root, config, self.floor.as_ref()),
            None => Ok(TrustedKeys::new()),
        }
    }

    /// A plugin host with the workspace's limits over the compile cache of
    /// [`cache_dirs`]. It only reads the workspace: the state directory's
    /// cache is used when that directory exists, never created.
    pub fn host(&self) -> Result<PluginHost, Error> {
        match &self.config {
            Some(config) => host(&self.root, config, false),
            None => Ok(PluginHost::with_cache_dirs(
                Default::default(),
                crate::plugin::cache::user_cache_dir().into_iter().collect(),
            )?),
        }
    }
}

/// The public keys whose plugin signatures the workspace at `root` trusts:
/// the floor's unexpired keys when there is a floor, else `[trust]
/// plugin_keys`; minus `[trust] revoked` either way.
pub(crate) fn trust(
    root: &Path,
    config: &Config,
    floor: Option<&Floor>,
) -> Result<TrustedKeys, Error> {
    // Each key is named by its file as pde.toml lists it, so that `plugin
    // list` says "key keys/security-team.ed25519.pub", not only a hex id.
    let mut trusted = TrustedKeys::new();
    for listed in &config.trust.plugin_keys {
        let key = crate::keys::load_public_key(&root.join(listed))?;
        trusted.add_named(key, listed.display().to_string());
    }
    if let Some(floor) = floor {
        let floor_keys = floor.plugin_trust(crate::floor::today())?;
        floor.warn_ignored("plugin", &trusted.key_ids(), &floor_keys.key_ids());
        trusted = floor_keys;
    }
    trusted.revoke(&config.trust.revoked);
    Ok(trusted)
}

/// The compile cache directories of the workspace at `root`, in lookup
/// order: the workspace's (`<state>/cache/plugins`) where the state
/// directory exists or `may_create_state` (a read-only command creates
/// nothing in the workspace), then the per-user one. So a fresh clone's
/// read-only commands are warm from their second run, and what either
/// compiled serves the other (see `pde::plugin::cache`).
pub(crate) fn cache_dirs(root: &Path, config: &Config, may_create_state: bool) -> Vec<PathBuf> {
    let state = root.join(&config.state);
    let mut dirs = Vec::new();
    if may_create_state || state.is_dir() {
        dirs.push(state.join("cache").join("plugins"));
    }
    dirs.extend(crate::plugin::cache::user_cache_dir());
    dirs
}

/// A plugin host with the workspace's `[limits]` over [`cache_dirs`].
pub(crate) fn host(
    root: &Path,
    config: &Config,
    may_create_state: bool,
) -> Result<PluginHost, Error> {
    Ok(PluginHost::with_cache_dirs(
        config.limits,
        cache_dirs(root, config, may_create_state),
    )?)
}
