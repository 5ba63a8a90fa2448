//! `pde plugin inspect`: what a component is and what it asks for.
//!
//! Security reviewers need to see, before signing, which capabilities a
//! plugin imports and which of them pde actually grants. A Rust
//! `wasm32-wasip2` guest imports a dozen WASI interfaces it may never use, so
//! the list says plainly that filesystem, sockets and environment are linked
//! but empty, rather than leaving readers to guess.

use serde::Serialize;
use wasmtime::Engine;
use wasmtime::component::Component;

use super::{PluginError, PluginKind, wit};

/// One `producers` entry (language, processed-by, sdk).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Producer {
    /// `language`, `processed-by` or `sdk`.
    pub field: String,
    /// Tool or language name.
    pub name: String,
    /// Its version.
    pub version: String,
}

/// What the host does with one imported interface.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Capability {
    /// The imported name, e.g. `wasi:filesystem/preopens@0.2.6`.
    pub import: String,
    /// True when the plugin gets something real behind it.
    pub granted: bool,
    /// What it gets, in words.
    pub note: String,
}

/// The report of `pde plugin inspect`.
#[derive(Debug, Clone, Serialize)]
pub struct Inspection {
    /// Lowercase hex sha256 of the file.
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
    /// The world it exports, inferred from its exports.
    pub kind: Option<PluginKind>,
    /// `pde:plugin` versions it names.
    pub wit_versions: Vec<String>,
    /// Imported names.
    pub imports: Vec<String>,
    /// Exported names.
    pub exports: Vec<String>,
    /// `producers` custom-section entries, component and nested modules.
    pub producers: Vec<Producer>,
    /// Every import and what the host does with it.
    pub capabilities: Vec<Capability>,
}

/// The imported and exported names of a compiled component.
pub fn world(engine: &Engine, component: &Component) -> (Vec<String>, Vec<String>) {
    let ty = component.component_type();
    let imports = ty.imports(engine).map(|(n, _)| n.to_string()).collect();
    let exports = ty.exports(engine).map(|(n, _)| n.to_string()).collect();
    (imports, exports)
}

/// The kind a component's exports make it, if any.
pub fn kind_from_exports(exports: &[String]) -> Option<PluginKind> {
    if exports.iter().any(|e| e == "validate") {
        Some(PluginKind::Validator)
    } else if exports.iter().any(|e| e == "route") {
        Some(PluginKind::Router)
    } else {
        None
    }
}

/// What the host grants behind an imported interface name.
pub fn capability(import: &str) -> Capability {
    let base = import.split('@').next().unwrap_or(import);
    let (granted, note) = match base {
        "pde:plugin/host" => (true, "log lines into the plugin's log"),
        "pde:plugin/types" => (true, "type definitions only"),
        "wasi:cli/stdout" | "wasi:cli/stderr" => (
            true,
            "captured into the plugin's log, bounded; never reaches the terminal",
        ),
        "wasi:cli/stdin" => (true, "empty: reads end at once"),
        "wasi:cli/environment" => (
            false,
            "denied: no environment variables, no arguments, no cwd (attempts are reported at run time)",
        ),
        "wasi:cli/exit" => (true, "ends the call (reported as a trap)"),
        "wasi:cli/terminal-input"
        | "wasi:cli/terminal-output"
        | "wasi:cli/terminal-stdin"
        | "wasi:cli/terminal-stdout"
        | "wasi:cli/terminal-stderr" => (true, "always reports: not a terminal"),
        "wasi:filesystem/preopens" | "wasi:filesystem/types" => (
            false,
            "denied: no preopened directories, so no file can be opened (attempts are reported at run time)",
        ),
        "wasi:sockets/network"
        | "wasi:sockets/instance-network"
        | "wasi:sockets/tcp"
        | "wasi:sockets/tcp-create-socket"
        | "wasi:sockets/udp"
        | "wasi:sockets/udp-create-socket"
        | "wasi:sockets/ip-name-lookup" => (
            false,
            "denied: TCP, UDP and name lookup are off and every address is refused (attempts are reported at run time)",
        ),
        "wasi:clocks/wall-clock" | "wasi:clocks/monotonic-clock" => (
            true,
            "read-only clock; waiting on it counts against timeout_ms (the call is stopped at the limit)",
        ),
        "wasi:random/random" | "wasi:random/insecure" | "wasi:random/insecure-seed" => {
            (true, "random bytes")
        }
        "wasi:io/error" | "wasi:io/streams" | "wasi:io/poll" => {
            (true, "stream plumbing for the captured output")
        }
        _ => (
            false,
            "not provided by pde: the plugin cannot be instantiated while it imports this",
        ),
    };
    Capability {
        import: import.to_string(),
        granted,
        note: note.to_string(),
    }
}

/// `producers` entries of the component and every nested module.
pub fn producers(bytes: &[u8]) -> Vec<Producer> {
    let mut out = Vec::new();
    for payload in wasmparser::Parser::new(0).parse_all(bytes) {
        let Ok(wasmparser::Payload::CustomSection(section)) = payload else {
            continue;
        };
        let wasmparser::KnownCustom::Producers(reader) = section.as_known() else {
            continue;
        };
        for field in reader.into_iter().flatten() {
            for value in field.values.into_iter().flatten() {
                let p = Producer {
                    field: field.name.to_string(),
                    name: value.name.to_string(),
                    version: value.version.to_string(),
                };
                if !out.contains(&p) {
                    out.push(p);
                }
            }
        }
    }
    out
}

/// Inspects a component file's bytes. Core modules and non-components are
/// [`PluginError::BadComponent`].
pub fn inspect(engine: &Engine, name: &str, bytes: &[u8]) -> Result<Inspection, PluginError> {
    let component = super::compile_checked(engine, name, bytes)?;
    let (imports, exports) = world(engine, &component);
    let wit_versions = wit::versions_named(imports.iter().chain(&exports).map(String::as_str))
        .into_iter()
        .map(|v| v.to_string())
        .collect();
    Ok(Inspection {
        sha256: super::sha256_hex(bytes),
        size: bytes.len() as u64,
        kind: kind_from_exports(&exports),
        wit_versions,
        capabilities: imports.iter().map(|i| capability(i)).collect(),
        imports,
        exports,
        producers: producers(bytes),
    })
}
