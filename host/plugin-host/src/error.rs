//! [`PluginError`]: everything that can go wrong loading or calling a
//! plugin, each with the exit code it means (DESIGN §8).

use std::path::PathBuf;

use crate::world::{self, PluginKind};
use pde_core::{ExitCode, HasExitCode};

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
    /// The manifest's `kind` names no world of [`world::WORLDS`].
    #[error(
        "plugin manifest {path}: unknown kind {kind:?}; use {}",
        world::manifest_kinds()
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
