//! pde-plugin-host: the WebAssembly sandbox that runs validator and router
//! plugins (DESIGN §3, §4).
//!
//! [`PluginHost`] is the facade the pipeline and the CLI use. Loading a plugin
//! checks, in order and before anything runs: manifest (typos are errors,
//! limits may only tighten), the pinned sha256, the signature status, that
//! the file is a component (not a core module), then compiles it (or loads
//! it from the on-disk cache), reads the `pde:plugin` version it was built
//! against, and pre-instantiates it against that version's world. Each call
//! then runs in a fresh store (see [`sandbox`]) and its result is bounded and
//! checked against the contract here, below every WIT version shim.
//!
//! Those load checks are the one rule for what is acceptable
//! ([`PluginHost::admit`]): `pde plugin sign`, `verify` and `inspect` ask
//! the same function the loader uses, so a reviewer is never told "valid"
//! about a plugin pde will not run (issue 27).
//!
//! Module map: [`manifest`], [`discovery`], [`signature`], [`cache`],
//! [`sandbox`] (limits and WASI denial), [`wit`] (one module per WIT
//! version), [`inspect`].

pub mod cache;
pub mod diagnostic;
pub mod discovery;
pub mod inspect;
pub mod limits;
pub mod manifest;
pub mod sandbox;
pub mod signature;
pub mod wit;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

use crate::diagnostic::{Diagnostic, Severity};
pub use crate::limits::Limits;
use pde_core::keys::TrustedKeys;
use pde_core::{ExitCode, HasExitCode};

/// The plugins of a workspace with the sandbox they run in, loaded once.
pub struct PluginSet {
    /// The sandbox they run in.
    pub host: PluginHost,
    /// Every plugin of the plugin directory, in name order.
    pub plugins: Vec<Plugin>,
}

impl PluginSet {
    /// The plugins of one kind, in name order.
    pub fn of_kind(&self, kind: PluginKind) -> impl Iterator<Item = &Plugin> {
        self.plugins.iter().filter(move |p| p.kind == kind)
    }
}

/// At most this many diagnostics (or routes) per call.
pub const MAX_RESULT_ITEMS: usize = 1000;
/// At most this many bytes of strings in one call's result.
pub const MAX_RESULT_BYTES: usize = 1024 * 1024;

/// Everything that can go wrong loading or calling a plugin. Each variant
/// names the plugin (or file) and says what to do.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// A plugin file or directory could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The wasm engine could not be set up.
    #[error("plugin engine: {0}")]
    Engine(String),
    /// The manifest is not valid TOML of the documented shape.
    #[error("plugin manifest {path}: {message}")]
    BadManifest {
        /// The manifest.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The manifest's `kind` is neither `validator` nor `router`.
    #[error(
        "plugin manifest {path}: unknown kind {kind:?}; use kind = \"validator\" or kind = \"router\""
    )]
    UnknownKind {
        /// The manifest.
        path: PathBuf,
        /// The kind found.
        kind: String,
    },
    /// A `.wasm` has no manifest beside it.
    #[error("plugin {wasm} has no manifest; create {expected} with name, kind, version and sha256")]
    MissingManifest {
        /// The component.
        wasm: PathBuf,
        /// Where its manifest should be.
        expected: PathBuf,
    },
    /// A manifest has no `.wasm` beside it.
    #[error(
        "plugin manifest {manifest} has no component; expected {expected} (remove the manifest or add the component)"
    )]
    OrphanManifest {
        /// The manifest.
        manifest: PathBuf,
        /// Where the component should be.
        expected: PathBuf,
    },
    /// Two manifests declare the same plugin name.
    #[error("plugin name {name:?} is declared by both {first} and {second}; names must be unique")]
    DuplicateName {
        /// The name.
        name: String,
        /// The first manifest.
        first: PathBuf,
        /// The second manifest.
        second: PathBuf,
    },
    /// A manifest asks for more than the workspace's `[limits]`.
    #[error(
        "plugin manifest {path}: [limits] {field} = {asked} exceeds the workspace limit {allowed}; a manifest may only tighten limits (raise it in pde.toml if intended)"
    )]
    LimitLoosened {
        /// The manifest.
        path: PathBuf,
        /// Which limit.
        field: &'static str,
        /// The manifest's value.
        asked: u64,
        /// The workspace value.
        allowed: u64,
    },
    /// No plugin of that name in the plugin directory.
    #[error("no plugin named {name:?} in {dir}")]
    NotFound {
        /// The name asked for.
        name: String,
        /// The plugin directory.
        dir: PathBuf,
    },
    /// The component's sha256 differs from the manifest's.
    #[error(
        "plugin {plugin}: {path} has sha256 {actual} but its manifest pins {expected}; the file changed since it was approved"
    )]
    DigestMismatch {
        /// The plugin.
        plugin: String,
        /// The component.
        path: PathBuf,
        /// From the manifest.
        expected: String,
        /// Of the file.
        actual: String,
    },
    /// A signature is missing, untrusted or invalid where one is required.
    #[error("plugin {plugin}: signature not accepted: {}", pde_core::term::Escaped(.reason))]
    BadSignature {
        /// The plugin.
        plugin: String,
        /// Why.
        reason: String,
    },
    /// Not a loadable component (core module, garbage, missing imports).
    #[error("plugin {plugin} is not a usable component: {message}")]
    BadComponent {
        /// The plugin.
        plugin: String,
        /// What is wrong and what to do.
        message: String,
    },
    /// The component implements a different world than declared.
    #[error("plugin {plugin} should be a {expected} but {found}; {hint}")]
    WrongWorld {
        /// The plugin.
        plugin: String,
        /// The world the manifest declares.
        expected: PluginKind,
        /// What the component is instead.
        found: String,
        /// What to do.
        hint: String,
    },
    /// The component was built against a `pde:plugin` version this pde lacks.
    #[error(
        "plugin {plugin} was built against pde:plugin@{found}, which this pde does not support (supported: {supported}); rebuild it against a supported wit/ version or upgrade pde"
    )]
    UnsupportedWitVersion {
        /// The plugin.
        plugin: String,
        /// The version it names.
        found: String,
        /// Versions this host binds.
        supported: String,
    },
    /// The guest trapped (panic, unreachable, stack overflow, bad access).
    #[error("plugin {plugin} trapped: {}", pde_core::term::Escaped(.message))]
    Trap {
        /// The plugin.
        plugin: String,
        /// The trap, with the guest's panic message when it printed one.
        message: String,
    },
    /// The call used up its fuel.
    #[error(
        "plugin {plugin} ran out of fuel ({fuel} units); it is looping or the policy is too large (raise [limits] fuel if legitimate)"
    )]
    OutOfFuel {
        /// The plugin.
        plugin: String,
        /// The fuel it had.
        fuel: u64,
    },
    /// The call tried to grow memory past its limit.
    #[error("plugin {plugin} hit its memory limit of {limit_mib} MiB")]
    MemoryLimit {
        /// The plugin.
        plugin: String,
        /// The limit.
        limit_mib: u64,
    },
    /// The call ran past its wall-time limit.
    #[error("plugin {plugin} timed out after {timeout_ms} ms")]
    Timeout {
        /// The plugin.
        plugin: String,
        /// The limit.
        timeout_ms: u64,
    },
    /// The call returned more than the host accepts.
    #[error("plugin {plugin} returned too large a result: {what}")]
    ResultTooLarge {
        /// The plugin.
        plugin: String,
        /// Which bound and by how much.
        what: String,
    },
    /// The plugin returned `err(message)`: it could not do its job.
    #[error("plugin {plugin} failed: {}", pde_core::term::Escaped(.message))]
    PluginFailed {
        /// The plugin.
        plugin: String,
        /// Its own message.
        message: String,
    },
    /// The plugin tried a capability the sandbox denies (a file, a socket,
    /// the environment) while attempts are refused: `deny_attempts = true`
    /// in its manifest, or `--deny-attempts`.
    #[error(
        "plugin {plugin} tried a denied capability, and denied attempts fail it (deny_attempts): {}",
        pde_core::term::Escaped(.attempts)
    )]
    DeniedAttempt {
        /// The plugin.
        plugin: String,
        /// Each attempt, e.g. "tried wasi:filesystem: open a file …: denied", joined by "; ".
        attempts: String,
    },
    /// A router named a service that it was not given.
    #[error(
        "router {plugin} routed to {service:?}, which is not a service of this environment (known: {})",
        pde_core::term::Escaped(.known)
    )]
    UnknownService {
        /// The plugin.
        plugin: String,
        /// The name it returned.
        service: String,
        /// The names it was given.
        known: String,
    },
}

impl HasExitCode for PluginError {
    fn exit_code(&self) -> ExitCode {
        use PluginError::*;
        match self {
            DigestMismatch { .. } | BadSignature { .. } => ExitCode::Integrity,
            Io { .. }
            | BadManifest { .. }
            | UnknownKind { .. }
            | MissingManifest { .. }
            | OrphanManifest { .. }
            | DuplicateName { .. }
            | LimitLoosened { .. }
            | NotFound { .. } => ExitCode::Usage,
            Engine(_)
            | BadComponent { .. }
            | WrongWorld { .. }
            | UnsupportedWitVersion { .. }
            | Trap { .. }
            | OutOfFuel { .. }
            | MemoryLimit { .. }
            | Timeout { .. }
            | ResultTooLarge { .. }
            | PluginFailed { .. }
            | DeniedAttempt { .. }
            | UnknownService { .. } => ExitCode::PluginFault,
        }
    }
}

/// Which world a plugin implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PluginKind {
    /// Exports `validate`.
    Validator,
    /// Exports `route`.
    Router,
}

impl std::fmt::Display for PluginKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PluginKind::Validator => "validator",
            PluginKind::Router => "router",
        })
    }
}

/// Whether a plugin carries a signature from a trusted key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum SignatureStatus {
    /// No `<name>.wasm.sig`.
    Unsigned,
    /// Signed by a trusted key, over the manifest as it is now.
    Valid {
        /// The signing key's id.
        keyid: String,
        /// Who signed (recorded in, and covered by, the signature).
        signer: String,
        /// When, RFC 3339 UTC.
        signed_at: String,
        /// The signer's note, if any.
        note: Option<String>,
    },
    /// A signature is present but not accepted.
    Invalid {
        /// Why.
        reason: String,
    },
}

impl SignatureStatus {
    /// What is wrong with the signature, in words (`None`: valid by a
    /// trusted key): for the warning given where signatures are not
    /// required, so that a broken one is never silent.
    pub fn problem(&self) -> Option<String> {
        match self {
            SignatureStatus::Valid { .. } => None,
            SignatureStatus::Unsigned => Some("unsigned".to_string()),
            SignatureStatus::Invalid { reason } => Some(format!("signature INVALID: {reason}")),
        }
    }
}

/// A loaded, checked, pre-instantiated plugin. Cheap to clone.
#[derive(Clone, Serialize)]
pub struct Plugin {
    /// Name from the manifest (or the file stem without one).
    pub name: String,
    /// Its world.
    pub kind: PluginKind,
    /// Its own version from the manifest (`""` without one).
    pub version: String,
    /// Lowercase hex sha256 of the component.
    pub sha256: String,
    /// The `pde:plugin` version it was built against.
    pub wit_version: semver::Version,
    /// Its signature status against the trusted keys given at load.
    pub signature: SignatureStatus,
    /// Its `[settings]`, as JSON.
    pub settings: serde_json::Value,
    /// Effective per-call limits.
    pub limits: Limits,
    /// The component file.
    pub path: PathBuf,
    /// The manifest's description.
    pub description: String,
    /// True when the compiled component came from the on-disk cache.
    pub loaded_from_cache: bool,
    /// False when its manifest declares `uses_environment = false`: every
    /// call then gets the environment-neutral context, whatever the caller
    /// passes, so its result cannot depend on the environment.
    pub uses_environment: bool,
    /// True when its manifest declares `deny_attempts = true`: an attempt
    /// at a denied capability fails the call ([`PluginError::DeniedAttempt`])
    /// instead of only being reported. [`PluginHost::deny_attempts`] turns
    /// it on for every plugin.
    pub deny_attempts: bool,
    #[serde(skip)]
    prepared: Arc<wit::Prepared>,
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("version", &self.version)
            .field("sha256", &self.sha256)
            .field("wit_version", &self.wit_version)
            .field("signature", &self.signature)
            .field("limits", &self.limits)
            .field("path", &self.path)
            .field("loaded_from_cache", &self.loaded_from_cache)
            .field("uses_environment", &self.uses_environment)
            .field("deny_attempts", &self.deny_attempts)
            .finish_non_exhaustive()
    }
}

impl Plugin {
    /// True when this plugin's contract carries the active policy in its
    /// context (`pde:plugin@0.2.0` and later).
    pub fn sees_active_policy(&self) -> bool {
        wit::carries_active_policy(&self.wit_version)
    }

    /// Ok when the plugin carries a valid signature by a trusted key;
    /// [`PluginError::BadSignature`] otherwise (for `require_signed_plugins`).
    pub fn require_signature(&self) -> Result<(), PluginError> {
        match &self.signature {
            SignatureStatus::Valid { .. } => Ok(()),
            SignatureStatus::Unsigned => Err(PluginError::BadSignature {
                plugin: self.name.clone(),
                reason: format!(
                    "unsigned; the environment requires signed plugins (sign it with `pde plugin sign {} --key FILE`)",
                    self.path.display()
                ),
            }),
            SignatureStatus::Invalid { reason } => Err(PluginError::BadSignature {
                plugin: self.name.clone(),
                reason: reason.clone(),
            }),
        }
    }
}

/// The policy handed to a plugin.
#[derive(Debug, Clone)]
pub struct PolicyInput {
    /// Policy id.
    pub id: String,
    /// Policy version.
    pub version: String,
    /// The whole document.
    pub document: serde_json::Value,
}

/// Where a call happens; the plugin's settings come from the [`Plugin`].
/// The default is the environment-neutral context.
#[derive(Debug, Clone, Default)]
pub struct CallContext {
    /// Target environment, `""` when none.
    pub environment: String,
    /// The version of the policy active in `environment`, if any. Plugins
    /// built against `pde:plugin@0.2.0` or later are told it
    /// (`context.active`); older ones are not (see [`wit`]).
    pub active: Option<ActivePolicy>,
}

impl CallContext {
    /// A context for `environment` with nothing active there.
    pub fn env(environment: impl Into<String>) -> Self {
        CallContext {
            environment: environment.into(),
            active: None,
        }
    }
}

/// The version of a policy that is active in an environment: what a deploy
/// would replace. Read from the bundle that made it active, digest checked.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ActivePolicy {
    /// Its semver version.
    pub version: String,
    /// Its bundle digest, `sha256:<hex>`; `""` when it was given without a
    /// bundle (`pde plugin test --active` with a plain document).
    pub digest: String,
    /// When it became active, RFC 3339 UTC; `""` when unknown.
    pub deployed_at: String,
    /// The active policy document (not serialised: reports name the
    /// version and digest, the document is in the bundle).
    #[serde(skip_serializing)]
    pub document: serde_json::Value,
}

/// A service of the target environment, as a router sees it.
#[derive(Debug, Clone, Serialize)]
pub struct ServiceInfo {
    /// Unique name.
    pub name: String,
    /// Tags.
    pub tags: Vec<String>,
    /// Labels.
    pub labels: BTreeMap<String, String>,
}

/// A router's decision for one service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Route {
    /// A name from the services given.
    pub service: String,
    /// Why.
    pub reason: String,
}

/// A call's value with what it cost.
#[derive(Debug, Clone, Serialize)]
pub struct CallReport<T> {
    /// What the plugin returned, checked and bounded.
    pub value: T,
    /// Fuel consumed.
    pub fuel_used: u64,
    /// Peak linear memory, bytes.
    pub peak_memory_bytes: u64,
    /// Wall time of instantiation plus the call.
    pub elapsed: Duration,
    /// `host.log` lines and stdout and stderr lines, in the order written.
    pub log: Vec<String>,
    /// Denied capabilities the plugin tried to use, each once, e.g.
    /// "tried wasi:sockets: create a TCP socket: denied".
    pub denied: Vec<String>,
}

/// What `pde plugin list` shows of a plugin: everything checked before a
/// load compiles anything (manifest, pinned digest, signature), and the
/// `pde:plugin` version read from the component's import names.
#[derive(Debug, Clone, Serialize)]
pub struct Listing {
    /// Name from the manifest.
    pub name: String,
    /// Its declared world.
    pub kind: PluginKind,
    /// Its own version from the manifest.
    pub version: String,
    /// Lowercase hex sha256 of the component (equal to the pinned one).
    pub sha256: String,
    /// The `pde:plugin` version its imports and exports name.
    pub wit_version: semver::Version,
    /// Its signature status against the trusted keys given.
    pub signature: SignatureStatus,
    /// The manifest's description.
    pub description: String,
}

/// Lists the plugins of `dir`, sorted by name, without compiling or
/// instantiating any: the manifest, limit, digest and signature checks of a
/// load, and the WIT version from the component's own import and export
/// names. Whether a plugin links and has the world it declares is only
/// known when it is loaded (`pde plugin verify`, `pde validate`).
pub fn list_dir(
    dir: &Path,
    limits: &Limits,
    trusted: &TrustedKeys,
) -> Result<Vec<Listing>, PluginError> {
    discovery::discover(dir)?
        .into_iter()
        .map(|found| {
            let m = &found.manifest;
            let kind = m.kind(&found.manifest_path)?;
            m.effective_limits(limits, &found.manifest_path)?;
            let bytes = read(&found.wasm)?;
            let sha256 = sha256_hex(&bytes);
            if sha256 != m.sha256 {
                return Err(PluginError::DigestMismatch {
                    plugin: m.name.clone(),
                    path: found.wasm.clone(),
                    expected: m.sha256.clone(),
                    actual: sha256,
                });
            }
            precheck(&m.name, &bytes)?;
            let signature = signature::status(&found.wasm, Some(m), &sha256, trusted);
            let names = top_level_names(&bytes);
            let versions = wit::versions_named(names.iter().map(String::as_str));
            let wit_version = versions
                .last()
                .cloned()
                .unwrap_or_else(|| wit::SUPPORTED[wit::SUPPORTED.len() - 1].clone());
            Ok(Listing {
                name: m.name.clone(),
                kind,
                version: m.version.clone(),
                sha256,
                wit_version,
                signature,
                description: m.description.clone(),
            })
        })
        .collect()
}

/// The import and export names of the outer component (not of the modules
/// and components nested in it), read without compiling it.
fn top_level_names(bytes: &[u8]) -> Vec<String> {
    use wasmparser::Payload;
    let mut names = Vec::new();
    let mut depth = 0usize;
    for payload in wasmparser::Parser::new(0).parse_all(bytes) {
        let Ok(payload) = payload else { break };
        match payload {
            Payload::ModuleSection { .. } | Payload::ComponentSection { .. } => depth += 1,
            Payload::End(_) => depth = depth.saturating_sub(1),
            Payload::ComponentImportSection(reader) if depth == 0 => {
                names.extend(
                    reader
                        .into_iter()
                        .flatten()
                        .map(|i| i.name.name.to_string()),
                );
            }
            Payload::ComponentExportSection(reader) if depth == 0 => {
                names.extend(
                    reader
                        .into_iter()
                        .flatten()
                        .map(|e| e.name.name.to_string()),
                );
            }
            _ => {}
        }
    }
    names
}

/// Runs plugins. `Send + Sync`; share it through an `Arc`.
pub struct PluginHost {
    engine: Engine,
    linkers: wit::Linkers,
    cache: cache::Cache,
    limits: Limits,
    gate: sandbox::CallGate,
    run_options: sandbox::RunOptions,
    /// Every plugin's denied attempts fail it (`--deny-attempts`).
    deny_attempts: bool,
    // Declared last: dropped after the engine handles above.
    _ticker: sandbox::EpochTicker,
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

fn precheck(plugin: &str, bytes: &[u8]) -> Result<(), PluginError> {
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
        let ticker = sandbox::EpochTicker::start(&engine)?;
        Ok(PluginHost {
            engine,
            linkers,
            cache,
            limits,
            gate: sandbox::CallGate::default(),
            run_options: sandbox::RunOptions::default(),
            deny_attempts: false,
            _ticker: ticker,
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
    fn check_attempts(&self, plugin: &Plugin, denied: &[String]) -> Result<(), PluginError> {
        if denied.is_empty() || !(self.deny_attempts || plugin.deny_attempts) {
            return Ok(());
        }
        Err(PluginError::DeniedAttempt {
            plugin: plugin.name.clone(),
            attempts: denied.join("; "),
        })
    }

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

    /// Discovers, checks and loads every plugin of `dir`, sorted by name.
    pub fn load_dir(&self, dir: &Path, trusted: &TrustedKeys) -> Result<Vec<Plugin>, PluginError> {
        discovery::discover(dir)?
            .into_iter()
            .map(|found| self.load_found(&found, trusted))
            .collect()
    }

    /// Loads one `.wasm`; uses the manifest beside it when there is one,
    /// otherwise infers the kind from its exports (for `pde plugin test`).
    /// The same as [`PluginHost::admit`].
    pub fn load_file(&self, wasm: &Path, trusted: &TrustedKeys) -> Result<Plugin, PluginError> {
        self.admit(wasm, trusted)
    }

    /// The one rule for what is acceptable: loads the plugin at `wasm`
    /// with every check pde applies before it runs a plugin, and refuses
    /// what any of them refuses, with that check's error (and so its exit
    /// code). `pde validate` and `deploy` load through it ([`Self::load_dir`]),
    /// and `pde plugin sign`, `verify` and `inspect` ask it, so a reviewer
    /// is never told "valid" about a plugin pde will not run.
    ///
    /// With the manifest beside it: the manifest (kind, `[limits]` only
    /// tightening this host's, exit 2), the pinned sha256 (exit 6), then the
    /// component (a component, one supported `pde:plugin` version, the
    /// world its manifest declares, exactly that world's exports, every
    /// import linkable; exit 5). Without one, the kind is read from its
    /// exports. The signature status is recorded, not judged: whether it
    /// must be valid depends on the environment
    /// ([`Plugin::require_signature`]).
    pub fn admit(&self, wasm: &Path, trusted: &TrustedKeys) -> Result<Plugin, PluginError> {
        let manifest_path = wasm.with_extension("toml");
        if manifest_path.is_file() {
            let manifest = manifest::Manifest::load(&manifest_path)?;
            return self.load_found(
                &discovery::Found {
                    wasm: wasm.to_path_buf(),
                    manifest_path,
                    manifest,
                },
                trusted,
            );
        }
        let name = wasm
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("plugin")
            .to_string();
        let cache::FileDigest { sha256, bytes } = self.file_digest(wasm)?;
        let signature = signature::status(wasm, None, &sha256, trusted);
        self.finish(LoadSpec {
            name,
            kind: None,
            version: String::new(),
            description: String::new(),
            settings: serde_json::json!({}),
            uses_environment: true,
            deny_attempts: false,
            limits: self.limits,
            path: wasm.to_path_buf(),
            bytes,
            sha256,
            signature,
        })
    }

    fn load_found(
        &self,
        found: &discovery::Found,
        trusted: &TrustedKeys,
    ) -> Result<Plugin, PluginError> {
        let m = &found.manifest;
        let kind = m.kind(&found.manifest_path)?;
        let limits = m.effective_limits(&self.limits, &found.manifest_path)?;
        let cache::FileDigest { sha256, bytes } = self.file_digest(&found.wasm)?;
        if sha256 != m.sha256 {
            return Err(PluginError::DigestMismatch {
                plugin: m.name.clone(),
                path: found.wasm.clone(),
                expected: m.sha256.clone(),
                actual: sha256,
            });
        }
        let signature = signature::status(&found.wasm, Some(m), &sha256, trusted);
        self.finish(LoadSpec {
            name: m.name.clone(),
            kind: Some(kind),
            version: m.version.clone(),
            description: m.description.clone(),
            settings: m.settings_json(),
            uses_environment: m.uses_environment,
            deny_attempts: m.deny_attempts,
            limits,
            path: found.wasm.clone(),
            bytes,
            sha256,
            signature,
        })
    }

    /// The sha256 of a plugin file, through the cache's digest index.
    fn file_digest(&self, path: &Path) -> Result<cache::FileDigest, PluginError> {
        self.cache
            .file_digest(path)
            .map_err(|source| PluginError::Io {
                path: path.to_path_buf(),
                source,
            })
    }

    /// The compiled component of `spec`: from the cache, else compiled from
    /// its bytes (read now when the digest index vouched for the file, and
    /// refused unless they still have the digest that was checked).
    fn component(&self, name: &str, spec: &LoadSpec) -> Result<(Component, bool), PluginError> {
        if let Some(bytes) = &spec.bytes {
            precheck(name, bytes)?;
        }
        if let Some(component) = self.cache.lookup(&self.engine, name, &spec.sha256) {
            return Ok((component, true));
        }
        let read_now;
        let bytes = match &spec.bytes {
            Some(bytes) => bytes,
            None => {
                read_now = read(&spec.path)?;
                let actual = sha256_hex(&read_now);
                if actual != spec.sha256 {
                    return Err(PluginError::DigestMismatch {
                        plugin: name.to_string(),
                        path: spec.path.clone(),
                        expected: spec.sha256.clone(),
                        actual,
                    });
                }
                precheck(name, &read_now)?;
                &read_now
            }
        };
        let component = self
            .cache
            .compile(&self.engine, name, &spec.sha256, bytes)?;
        Ok((component, false))
    }

    fn finish(&self, spec: LoadSpec) -> Result<Plugin, PluginError> {
        let (component, loaded_from_cache) = self.component(&spec.name, &spec)?;
        let name = spec.name;
        let (imports, exports) = inspect::world(&self.engine, &component);
        let versions = wit::versions_named(imports.iter().chain(&exports).map(String::as_str));
        let wit_version = match versions.as_slice() {
            [] => wit::latest::MIN_VERSION.clone(),
            [one] => one.clone(),
            many => {
                return Err(PluginError::BadComponent {
                    plugin: name,
                    message: format!(
                        "it mixes pde:plugin versions {}; build it against one wit/ version",
                        many.iter()
                            .map(|v| v.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                });
            }
        };
        let exported = inspect::kind_from_exports(&exports);
        let kind = match (spec.kind, exported) {
            (Some(declared), Some(actual)) if declared != actual => {
                return Err(PluginError::WrongWorld {
                    plugin: name.clone(),
                    expected: declared,
                    found: format!(
                        "it is a {actual} (it exports `{}`)",
                        if actual == PluginKind::Router {
                            "route"
                        } else {
                            "validate"
                        }
                    ),
                    hint: format!(
                        "set kind = \"{actual}\" in {name}.toml, or rebuild it with the {declared} world"
                    ),
                });
            }
            (Some(k), Some(_)) | (None, Some(k)) => k,
            (declared, None) => {
                return Err(PluginError::WrongWorld {
                    plugin: name.clone(),
                    expected: declared.unwrap_or(PluginKind::Validator),
                    found: format!(
                        "it exports neither `validate` nor `route` (exports: {})",
                        if exports.is_empty() {
                            "none".to_string()
                        } else {
                            exports.join(", ")
                        }
                    ),
                    hint: format!(
                        "implement world `validator` or `router` of wit/v{}/plugin.wit (see docs/plugin-authoring.md)",
                        wit::latest::MIN_VERSION
                    ),
                });
            }
        };
        // A plugin exports exactly its world (see `inspect::TOLERATED_EXPORTS`).
        let (_, unexpected) = inspect::extra_exports(Some(kind), &exports);
        if !unexpected.is_empty() {
            return Err(PluginError::WrongWorld {
                plugin: name.clone(),
                expected: kind,
                found: format!(
                    "it also exports {}, which world {kind} does not have",
                    unexpected
                        .iter()
                        .map(|e| format!("`{e}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                hint: format!(
                    "a plugin exports exactly `{}` (only componentize-py's `exports` runtime interface is tolerated); remove the other exports (see docs/plugin-authoring.md)",
                    inspect::world_export(kind)
                ),
            });
        }
        let prepared = wit::prepare(&self.linkers, &component, &name, &wit_version, kind)?;
        tracing::debug!(plugin = name.as_str(), %kind, %wit_version, loaded_from_cache, "plugin loaded");
        Ok(Plugin {
            name,
            kind,
            version: spec.version,
            sha256: spec.sha256,
            wit_version,
            signature: spec.signature,
            settings: spec.settings,
            limits: spec.limits,
            path: spec.path,
            description: spec.description,
            loaded_from_cache,
            uses_environment: spec.uses_environment,
            deny_attempts: spec.deny_attempts,
            prepared: Arc::new(prepared),
        })
    }

    fn input(plugin: &Plugin, policy: &PolicyInput, ctx: &CallContext) -> wit::CallInput {
        // Enforced here, below every WIT shim: a plugin that declared it
        // ignores the environment is given none (nor anything else that
        // comes with one), so reusing its environment-neutral result for an
        // environment is exact, not a promise.
        let neutral = CallContext::default();
        let ctx = if plugin.uses_environment {
            ctx
        } else {
            &neutral
        };
        wit::CallInput {
            id: policy.id.clone(),
            version: policy.version.clone(),
            document: policy.document.to_string(),
            environment: ctx.environment.clone(),
            settings: if plugin.settings.is_null() {
                "{}".to_string()
            } else {
                plugin.settings.to_string()
            },
            // Serialised only for a plugin whose contract carries it.
            active: ctx
                .active
                .as_ref()
                .filter(|_| wit::carries_active_policy(&plugin.wit_version))
                .map(|a| wit::ActiveInput {
                    version: a.version.clone(),
                    digest: a.digest.clone(),
                    deployed_at: a.deployed_at.clone(),
                    document: a.document.to_string(),
                }),
        }
    }

    fn wrong_world(plugin: &Plugin, expected: PluginKind) -> PluginError {
        PluginError::WrongWorld {
            plugin: plugin.name.clone(),
            expected,
            found: format!("it is a {}", plugin.kind),
            hint: format!("call it as a {}", plugin.kind),
        }
    }

    /// Runs a validator over `policy`. Diagnostics carry `source = plugin name`.
    pub fn validate(
        &self,
        plugin: &Plugin,
        policy: &PolicyInput,
        ctx: &CallContext,
    ) -> Result<CallReport<Vec<Diagnostic>>, PluginError> {
        let input = Self::input(plugin, policy, ctx);
        let slot = self.gate.enter();
        let (out, stats) = plugin
            .prepared
            .validate(
                &self.engine,
                &plugin.name,
                &plugin.limits,
                self.run_options,
                &input,
            )
            .ok_or_else(|| Self::wrong_world(plugin, PluginKind::Validator))??;
        // The store, and with it the pool slot, is gone once the call returns.
        drop(slot);
        self.check_attempts(plugin, &stats.denied)?;
        let raw = out.map_err(|message| PluginError::PluginFailed {
            plugin: plugin.name.clone(),
            message,
        })?;
        let bytes: usize = raw
            .iter()
            .map(|d| d.path.len() + d.code.len() + d.message.len())
            .sum();
        check_bounds(&plugin.name, "diagnostics", raw.len(), bytes)?;
        let value = raw
            .into_iter()
            .map(|d| {
                let severity = match d.severity {
                    wit::RawSeverity::Error => Severity::Error,
                    wit::RawSeverity::Warning => Severity::Warning,
                    wit::RawSeverity::Info => Severity::Info,
                };
                Diagnostic::new(severity, &plugin.name, &d.code, &d.path, d.message)
            })
            .collect();
        Ok(report(value, stats))
    }

    /// Runs a router; every route must name one of `services`.
    pub fn route(
        &self,
        plugin: &Plugin,
        policy: &PolicyInput,
        ctx: &CallContext,
        services: &[ServiceInfo],
    ) -> Result<CallReport<Vec<Route>>, PluginError> {
        let input = Self::input(plugin, policy, ctx);
        let raw_services: Vec<wit::RawService> = services
            .iter()
            .map(|s| wit::RawService {
                name: s.name.clone(),
                tags: s.tags.clone(),
                labels: s
                    .labels
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            })
            .collect();
        let slot = self.gate.enter();
        let (out, stats) = plugin
            .prepared
            .route(
                &self.engine,
                &plugin.name,
                &plugin.limits,
                self.run_options,
                &input,
                &raw_services,
            )
            .ok_or_else(|| Self::wrong_world(plugin, PluginKind::Router))??;
        drop(slot);
        self.check_attempts(plugin, &stats.denied)?;
        let raw = out.map_err(|message| PluginError::PluginFailed {
            plugin: plugin.name.clone(),
            message,
        })?;
        let bytes: usize = raw.iter().map(|r| r.service.len() + r.reason.len()).sum();
        check_bounds(&plugin.name, "routes", raw.len(), bytes)?;
        for r in &raw {
            if !services.iter().any(|s| s.name == r.service) {
                return Err(PluginError::UnknownService {
                    plugin: plugin.name.clone(),
                    service: r.service.clone(),
                    known: services
                        .iter()
                        .map(|s| s.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                });
            }
        }
        let value = raw
            .into_iter()
            .map(|r| Route {
                service: r.service,
                reason: r.reason,
            })
            .collect();
        Ok(report(value, stats))
    }
}

struct LoadSpec {
    name: String,
    kind: Option<PluginKind>,
    version: String,
    description: String,
    settings: serde_json::Value,
    uses_environment: bool,
    deny_attempts: bool,
    limits: Limits,
    path: PathBuf,
    /// The file's bytes, when they were read for its digest (not when the
    /// digest index vouched for it).
    bytes: Option<Vec<u8>>,
    sha256: String,
    signature: SignatureStatus,
}

fn check_bounds(plugin: &str, what: &str, count: usize, bytes: usize) -> Result<(), PluginError> {
    if count > MAX_RESULT_ITEMS {
        return Err(PluginError::ResultTooLarge {
            plugin: plugin.to_string(),
            what: format!("{count} {what}, at most {MAX_RESULT_ITEMS} are accepted"),
        });
    }
    if bytes > MAX_RESULT_BYTES {
        return Err(PluginError::ResultTooLarge {
            plugin: plugin.to_string(),
            what: format!("{bytes} bytes of {what}, at most {MAX_RESULT_BYTES} are accepted"),
        });
    }
    Ok(())
}

fn report<T>(value: T, stats: sandbox::CallStats) -> CallReport<T> {
    CallReport {
        value,
        fuel_used: stats.fuel_used,
        peak_memory_bytes: stats.peak_memory_bytes,
        elapsed: stats.elapsed,
        log: stats.log,
        denied: stats.denied,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_and_plugins_can_be_shared_across_threads() {
        fn shareable<T: Send + Sync + 'static>() {}
        shareable::<PluginHost>();
        shareable::<Plugin>();
    }

    #[test]
    fn exit_codes_follow_the_contract() {
        let plugin = "p".to_string();
        let fault = PluginError::Timeout {
            plugin: plugin.clone(),
            timeout_ms: 1,
        };
        assert_eq!(fault.exit_code(), ExitCode::PluginFault);
        let integrity = PluginError::BadSignature {
            plugin,
            reason: "x".into(),
        };
        assert_eq!(integrity.exit_code(), ExitCode::Integrity);
    }

    #[test]
    fn results_are_bounded_by_count_and_bytes() {
        assert!(check_bounds("p", "diagnostics", MAX_RESULT_ITEMS, 10).is_ok());
        assert!(matches!(
            check_bounds("p", "diagnostics", MAX_RESULT_ITEMS + 1, 10),
            Err(PluginError::ResultTooLarge { .. })
        ));
        assert!(matches!(
            check_bounds("p", "routes", 1, MAX_RESULT_BYTES + 1),
            Err(PluginError::ResultTooLarge { .. })
        ));
    }
}
