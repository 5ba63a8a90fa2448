//! [`PluginHost`]: the sandbox plugins run in, its engine, linkers, compile
//! cache and settings, and the file-level commands built on the loader
//! (`sign_file`, `inspect_file`). Loading is in `load.rs`, calling in
//! `call.rs`.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

use crate::{Limits, PluginError, cache, discovery, inspect, sandbox, signature, wit};
use pde_core::keys::TrustedKeys;

/// Runs plugins. `Send + Sync`; share it through an `Arc`.
///
/// ```no_run
/// # fn main() -> Result<(), pde_plugin_host::PluginError> {
/// use pde_plugin_host::{CallContext, Limits, PluginHost, PolicyInput};
/// use pde_core::keys::TrustedKeys;
///
/// // The workspace's limits, and where compiled components are cached.
/// let mut host = PluginHost::with_cache_dirs(Limits::default(), vec!["/tmp/pde-cache".into()])?;
/// // Optional settings, before the first call.
/// host.deny_attempts(true);
/// // Every check pde applies, then compiled (or mapped from the cache)
/// // and pre-instantiated once.
/// let plugin = host.admit("plugins/pii-guard.wasm".as_ref(), &TrustedKeys::new())?;
/// let policy = PolicyInput {
///     id: "42".into(),
///     version: "1.0.0".into(),
///     document: serde_json::json!({"id": "42"}),
/// };
/// // Each call runs in a fresh instance, within the plugin's limits.
/// let report = host.validate(&plugin, &policy, &CallContext::env("production"))?;
/// tracing::info!(findings = report.value.len(), fuel = report.fuel_used, "pii-guard ran");
/// # Ok(())
/// # }
/// ```
pub struct PluginHost {
    pub(crate) engine: Engine,
    pub(crate) linkers: wit::Linkers,
    pub(crate) cache: cache::Cache,
    pub(crate) limits: Limits,
    pub(crate) gate: sandbox::CallGate,
    pub(crate) run_options: sandbox::RunOptions,
    /// Every plugin's denied attempts fail it (`--deny-attempts`).
    pub(crate) deny_attempts: bool,
}

/// Lowercase hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

pub(crate) fn read(path: &Path) -> Result<Vec<u8>, PluginError> {
    std::fs::read(path).map_err(|source| PluginError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Refuses core modules and non-wasm before compiling; compiles otherwise.
pub(crate) fn compile_checked(
    engine: &Engine,
    plugin: &str,
    bytes: &[u8],
) -> Result<Component, PluginError> {
    precheck(plugin, bytes)?;
    Component::new(engine, bytes).map_err(|e| PluginError::BadComponent {
        plugin: plugin.to_string(),
        message: format!("it does not compile as a WebAssembly component: {e:#}"),
    })
}

pub(crate) fn precheck(plugin: &str, bytes: &[u8]) -> Result<(), PluginError> {
    if wasmparser::Parser::is_core_wasm(bytes) {
        return Err(PluginError::BadComponent {
            plugin: plugin.to_string(),
            message: "it is a core WebAssembly module, not a component; build it for \
                      --target wasm32-wasip2 (or wrap it with `wasm-tools component new`)"
                .to_string(),
        });
    }
    if !wasmparser::Parser::is_component(bytes) {
        return Err(PluginError::BadComponent {
            plugin: plugin.to_string(),
            message: "it is not WebAssembly at all (no component header)".to_string(),
        });
    }
    Ok(())
}

impl PluginHost {
    /// A host with the workspace's `limits`, caching compiled components in
    /// `cache_dir` (`None`: no cache).
    pub fn new(limits: Limits, cache_dir: Option<PathBuf>) -> Result<Self, PluginError> {
        PluginHost::with_cache_dirs(limits, cache_dir.into_iter().collect())
    }

    /// A host caching compiled components in every directory of
    /// `cache_dirs`, in lookup order (the workspace's, then the per-user
    /// one): a lookup tries each, a compile fills them all, so the two
    /// caches serve each other (see [`cache`]). Empty: no cache.
    pub fn with_cache_dirs(limits: Limits, cache_dirs: Vec<PathBuf>) -> Result<Self, PluginError> {
        let engine = sandbox::engine(&limits)?;
        let linkers = wit::Linkers::new(&engine)?;
        let cache = cache::Cache::with_dirs(&engine, cache_dirs, cache::cache_key_path());
        Ok(PluginHost {
            engine,
            linkers,
            cache,
            limits,
            gate: sandbox::CallGate::default(),
            run_options: sandbox::RunOptions::default(),
            deny_attempts: false,
        })
    }

    /// Whether the log of a successful call goes to `tracing` (the default)
    /// or only into its [`CallReport`], for a caller that prints it itself
    /// (`pde plugin test`), so that each line is shown once.
    pub fn trace_call_logs(&mut self, on: bool) {
        self.run_options.trace_log = on;
    }

    /// Whether an attempt at a denied capability fails every plugin, as
    /// `deny_attempts = true` in each manifest would (`--deny-attempts`):
    /// running on is right for production, but a reviewer needs a way to
    /// fail a plugin that tries to open a file or a socket.
    pub fn deny_attempts(&mut self, on: bool) {
        self.deny_attempts = on;
    }

    /// Fails the call when `plugin` tried a denied capability and attempts
    /// are refused for it; checked before its result is looked at.
    /// The workspace limits this host enforces.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The shared engine (for inspection).
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Where the compiled form of a wasm with `sha256` is cached (in the
    /// first cache directory), if caching.
    pub fn cache_entry(&self, sha256: &str) -> Option<PathBuf> {
        self.cache.entry_path(sha256)
    }

    /// Where the compiled form of a wasm with `sha256` is on disk now, in
    /// every cache directory that holds it (empty: not cached).
    pub fn cached_at(&self, sha256: &str) -> Vec<PathBuf> {
        self.cache.entries_on_disk(sha256)
    }

    /// The directories compiled components are cached in, in lookup order
    /// (empty when nothing is cached).
    pub fn cache_dirs(&self) -> &[PathBuf] {
        self.cache.dirs()
    }

    /// Signs the plugin at `wasm` and its manifest, writing `<wasm>.sig`.
    ///
    /// Only what [`PluginHost::admit`] admits is signed, with the manifest
    /// that is signed: a signature must never vouch for something pde would
    /// refuse to run (issue 27). Its signature status plays no part (a new
    /// signature replaces it).
    pub fn sign_file(
        &self,
        wasm: &Path,
        key: &ed25519_dalek::SigningKey,
        signer: &signature::Signer,
    ) -> Result<(PathBuf, signature::PluginSignature), PluginError> {
        signature::sign_file_with(wasm, key, signer, |manifest, manifest_path| {
            let found = discovery::Found {
                wasm: wasm.to_path_buf(),
                manifest_path: manifest_path.to_path_buf(),
                manifest: manifest.clone(),
            };
            self.load_found(&found, &TrustedKeys::new()).map(|_| ())
        })
    }

    /// [`inspect::inspect_plugin`] through this host's compile cache, so a
    /// large component is not recompiled for every `pde plugin inspect`,
    /// with this host's verdict: [`inspect::Inspection::refused`] says why
    /// [`PluginHost::admit`] refuses the plugin, if it does, and
    /// [`inspect::Inspection::loosened_limits`] lists every manifest limit
    /// above this host's.
    pub fn inspect_file(
        &self,
        wasm: &Path,
        trusted: &TrustedKeys,
    ) -> Result<inspect::Inspection, PluginError> {
        let mut report =
            inspect::inspect_plugin_with(wasm, trusted, &self.limits, |name, bytes| {
                precheck(name, bytes)?;
                let (component, cached) =
                    self.cache
                        .load_or_compile(&self.engine, name, &sha256_hex(bytes), bytes)?;
                let mut report = inspect::inspect_compiled(&self.engine, &component, bytes);
                report.loaded_from_cache = self.cache.enabled().then_some(cached);
                Ok(report)
            })?;
        // The compiled component is in the cache now (when there is one),
        // so admitting it costs no second compile.
        report.refused = self
            .admit(wasm, trusted)
            .err()
            .map(|e| inspect::Refusal::from(&e));
        Ok(report)
    }
}
