//! `pde plugin inspect`: what a component is and what it asks for.
//!
//! Security reviewers need to see, before signing, which capabilities a
//! plugin imports and which of them pde actually grants. A Rust
//! `wasm32-wasip2` guest imports a dozen WASI interfaces it may never use, so
//! the list says plainly that filesystem, sockets and environment are linked
//! but empty, rather than leaving readers to guess.

use std::path::Path;

use serde::Serialize;
use wasmtime::Engine;
use wasmtime::component::Component;

use super::manifest::Manifest;
use super::{PluginError, PluginKind, SignatureStatus, signature, wit};
use crate::limits::Limits;
use pde_core::keys::TrustedKeys;
use pde_core::{ExitCode, HasExitCode};

/// Exports a plugin may have beside its world's function, and why.
///
/// A plugin exports exactly its world: `validate` for a validator, `route`
/// for a router. The one exception is what a supported toolchain adds to
/// every component whatever the world, which the plugin author cannot
/// remove: componentize-py exports an `exports` instance with its runtime's
/// `init`. pde never calls it; `inspect` lists it as tolerated. Anything else
/// is refused at load (a plugin fault), so a reviewer never signs a
/// component with entry points nobody reviewed.
pub const TOLERATED_EXPORTS: &[(&str, &str)] = &[(
    "exports",
    "componentize-py's runtime interface (init); tolerated, never called by pde",
)];

/// Exports beside the world's function: `(tolerated, unexpected)`. With no
/// world (`None`), every export that is not tolerated is unexpected.
pub fn extra_exports(kind: Option<PluginKind>, exports: &[String]) -> (Vec<String>, Vec<String>) {
    let world = kind.map(|k| k.world().export);
    let mut tolerated = Vec::new();
    let mut unexpected = Vec::new();
    for e in exports {
        if Some(e.as_str()) == world {
            continue;
        }
        if TOLERATED_EXPORTS.iter().any(|(name, _)| name == e) {
            tolerated.push(e.clone());
        } else {
            unexpected.push(e.clone());
        }
    }
    (tolerated, unexpected)
}

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

/// Why pde refuses a plugin ([`crate::PluginHost::admit`]'s error), as a
/// report carries it.
#[derive(Debug, Clone, Serialize)]
pub struct Refusal {
    /// The error, in words.
    pub reason: String,
    /// The exit code the refusal means (DESIGN §8): 2, 5 or 6.
    pub exit_code: u8,
    /// The same, typed.
    #[serde(skip)]
    pub exit: ExitCode,
}

impl From<&PluginError> for Refusal {
    fn from(e: &PluginError) -> Self {
        Refusal {
            reason: e.to_string(),
            exit_code: e.exit_code().code(),
            exit: e.exit_code(),
        }
    }
}

/// A manifest limit above the workspace's: pde refuses the plugin.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct LoosenedLimit {
    /// `fuel`, `memory_mib` or `timeout_ms`.
    pub field: String,
    /// The manifest's value.
    pub manifest: u64,
    /// The workspace's `[limits]` value it exceeds.
    pub workspace: u64,
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
    /// The version module of this pde that binds it (its `MIN_VERSION`,
    /// e.g. `0.2.0`); `None` when this pde supports none of `wit_versions`
    /// (or the component names none, or several), and will refuse to load it.
    pub wit_bound_by: Option<String>,
    /// The `pde:plugin` versions this pde supports, oldest first.
    pub wit_supported: Vec<String>,
    /// Whether a validator or router of that version is told the policy
    /// active in the target environment (`context.active`, since 0.2.0).
    pub sees_active_policy: bool,
    /// Imported names.
    pub imports: Vec<String>,
    /// Exported names.
    pub exports: Vec<String>,
    /// `producers` custom-section entries, component and nested modules.
    pub producers: Vec<Producer>,
    /// Every import and what the host does with it.
    pub capabilities: Vec<Capability>,
    /// Exports beside the world that pde tolerates (see [`TOLERATED_EXPORTS`]).
    pub tolerated_exports: Vec<String>,
    /// Exports that are not part of the world: pde refuses to load it.
    pub unexpected_exports: Vec<String>,
    /// The manifest beside the component, if any: the fields a signature
    /// covers plus the description.
    pub manifest: Option<serde_json::Value>,
    /// Whether the manifest's pinned sha256 is this file's (`None`: no manifest).
    pub sha256_matches_manifest: Option<bool>,
    /// The signature status against the trusted keys given (`None`: not asked).
    pub signature: Option<SignatureStatus>,
    /// Whether the compiled component came from the on-disk cache (`None`:
    /// no cache was used).
    pub loaded_from_cache: Option<bool>,
    /// Every manifest `[limits]` value above the workspace's (empty without
    /// a manifest): each one is a loosening, which pde refuses.
    pub loosened_limits: Vec<LoosenedLimit>,
    /// Why pde refuses to run this plugin (`None`: it would load it). Set
    /// by `PluginHost::inspect_file`; `pde plugin inspect` exits with its
    /// exit code.
    pub refused: Option<Refusal>,
}

/// The imported and exported names of a compiled component.
pub fn world(engine: &Engine, component: &Component) -> (Vec<String>, Vec<String>) {
    let ty = component.component_type();
    let imports = ty.imports(engine).map(|(n, _)| n.to_string()).collect();
    let exports = ty.exports(engine).map(|(n, _)| n.to_string()).collect();
    (imports, exports)
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

/// The names a component imports and exports at its top level (not those
/// of the modules and components nested in it), in the order they appear:
/// what the CNCF Wasm OCI artifact config lists under `component` (the
/// `wkg` layout). Nothing is compiled; a malformed section ends the list.
pub fn component_interface(bytes: &[u8]) -> (Vec<String>, Vec<String>) {
    top_level_names(bytes, true)
}

/// [`component_interface`] without the type imports (the world's `use`d
/// types): names, not capabilities, since the host links nothing behind
/// them, and `pde plugin inspect` does not list them either.
pub fn capability_names(bytes: &[u8]) -> (Vec<String>, Vec<String>) {
    top_level_names(bytes, false)
}

fn top_level_names(bytes: &[u8], type_imports: bool) -> (Vec<String>, Vec<String>) {
    use wasmparser::Payload;
    let (mut imports, mut exports) = (Vec::new(), Vec::new());
    let mut depth = 0usize;
    for payload in wasmparser::Parser::new(0).parse_all(bytes) {
        let Ok(payload) = payload else { break };
        match payload {
            Payload::ModuleSection { .. } | Payload::ComponentSection { .. } => depth += 1,
            Payload::End(_) => depth = depth.saturating_sub(1),
            Payload::ComponentImportSection(reader) if depth == 0 => {
                for i in reader.into_iter().flatten() {
                    if type_imports || !matches!(i.ty, wasmparser::ComponentTypeRef::Type(_)) {
                        imports.push(i.name.name.to_string());
                    }
                }
            }
            Payload::ComponentExportSection(reader) if depth == 0 => {
                exports.extend(
                    reader
                        .into_iter()
                        .flatten()
                        .map(|e| e.name.name.to_string()),
                );
            }
            _ => {}
        }
    }
    (imports, exports)
}

/// Inspects a component file's bytes. Core modules and non-components are
/// [`PluginError::BadComponent`].
pub fn inspect(engine: &Engine, name: &str, bytes: &[u8]) -> Result<Inspection, PluginError> {
    let component = super::compile_checked(engine, name, bytes)?;
    Ok(inspect_compiled(engine, &component, bytes))
}

/// [`inspect`] of a component already compiled from `bytes`.
pub(crate) fn inspect_compiled(engine: &Engine, component: &Component, bytes: &[u8]) -> Inspection {
    let (imports, exports) = world(engine, component);
    let named = wit::versions_named(imports.iter().chain(&exports).map(String::as_str));
    let bound_by = match named.as_slice() {
        [one] => wit::select(one),
        _ => None,
    };
    let wit_versions = named.iter().map(|v| v.to_string()).collect();
    let kind = crate::world::kind_from_exports(&exports);
    let (tolerated_exports, unexpected_exports) = extra_exports(kind, &exports);
    Inspection {
        sha256: super::sha256_hex(bytes),
        size: bytes.len() as u64,
        kind,
        wit_versions,
        wit_bound_by: bound_by.map(|v| v.to_string()),
        wit_supported: wit::SUPPORTED.iter().map(|v| v.to_string()).collect(),
        sees_active_policy: bound_by.is_some_and(|v| *v >= wit::ACTIVE_POLICY_SINCE),
        capabilities: imports.iter().map(|i| capability(i)).collect(),
        imports,
        exports,
        producers: producers(bytes),
        tolerated_exports,
        unexpected_exports,
        manifest: None,
        sha256_matches_manifest: None,
        signature: None,
        loaded_from_cache: None,
        loosened_limits: Vec::new(),
        refused: None,
    }
}

/// The whole picture of the plugin at `wasm`, for a reviewer: the component
/// ([`inspect`]), its manifest if one lies beside it, whether the manifest
/// pins these bytes, its limits against the workspace's `limits`, and its
/// signature status against `trusted`. Whether pde would run it is
/// `PluginHost::inspect_file`'s to say ([`Inspection::refused`]).
pub fn inspect_plugin(
    engine: &Engine,
    wasm: &Path,
    trusted: &TrustedKeys,
    limits: &Limits,
) -> Result<Inspection, PluginError> {
    inspect_plugin_with(wasm, trusted, limits, |name, bytes| {
        inspect(engine, name, bytes)
    })
}

/// [`inspect_plugin`] with the component inspected by `inspect_bytes(name, bytes)`
/// (e.g. through the compile cache).
pub(crate) fn inspect_plugin_with(
    wasm: &Path,
    trusted: &TrustedKeys,
    limits: &Limits,
    inspect_bytes: impl FnOnce(&str, &[u8]) -> Result<Inspection, PluginError>,
) -> Result<Inspection, PluginError> {
    let bytes = super::read(wasm)?;
    let manifest_path = signature::manifest_path(wasm);
    let manifest = if manifest_path.is_file() {
        Some(Manifest::load(&manifest_path)?)
    } else {
        None
    };
    let name = match &manifest {
        Some(m) => m.name.clone(),
        None => wasm
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("plugin")
            .to_string(),
    };
    let mut report = inspect_bytes(&name, &bytes)?;
    if let Some(m) = &manifest {
        let mut fields = m.signed_fields();
        fields["description"] = m.description.clone().into();
        report.manifest = Some(fields);
        report.sha256_matches_manifest = Some(m.sha256 == report.sha256);
        report.loosened_limits = m
            .loosened_limits(limits)
            .into_iter()
            .map(|(field, manifest, workspace)| LoosenedLimit {
                field: field.to_string(),
                manifest,
                workspace,
            })
            .collect();
    }
    report.signature = Some(signature::status(
        wasm,
        manifest.as_ref(),
        &report.sha256,
        trusted,
    ));
    Ok(report)
}

/// One difference between two plugins.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Change {
    /// What differs, e.g. `import added`, `settings.max`, `limits`.
    pub what: String,
    /// The old value (`""` when added).
    pub old: String,
    /// The new value (`""` when removed).
    pub new: String,
}

/// What changed from `old` to `new` (two [`inspect_plugin`] reports), in the
/// order a reviewer reads it: world, WIT version, exports, imports, size and
/// digest, producers, then the manifest (version, limits, settings).
pub fn diff(old: &Inspection, new: &Inspection) -> Vec<Change> {
    let mut out = Vec::new();
    let mut change = |what: &str, o: String, n: String| {
        if o != n {
            out.push(Change {
                what: what.to_string(),
                old: o,
                new: n,
            });
        }
    };
    let kind = |i: &Inspection| i.kind.map(|k| k.to_string()).unwrap_or_default();
    change("world", kind(old), kind(new));
    change(
        "pde:plugin version",
        old.wit_versions.join(", "),
        new.wit_versions.join(", "),
    );
    for (label, a, b) in [
        ("export", &old.exports, &new.exports),
        ("import", &old.imports, &new.imports),
    ] {
        for removed in a.iter().filter(|x| !b.contains(x)) {
            change(&format!("{label} removed"), removed.clone(), String::new());
        }
        for added in b.iter().filter(|x| !a.contains(x)) {
            change(&format!("{label} added"), String::new(), added.clone());
        }
    }
    change("size", old.size.to_string(), new.size.to_string());
    change("sha256", old.sha256.clone(), new.sha256.clone());
    let producer = |p: &Producer| format!("{}: {} {}", p.field, p.name, p.version);
    for p in old.producers.iter().filter(|p| !new.producers.contains(p)) {
        change("producer removed", producer(p), String::new());
    }
    for p in new.producers.iter().filter(|p| !old.producers.contains(p)) {
        change("producer added", String::new(), producer(p));
    }
    let null = serde_json::Value::Null;
    let field = |i: &Inspection, k: &str| -> serde_json::Value {
        i.manifest
            .as_ref()
            .and_then(|m| m.get(k))
            .cloned()
            .unwrap_or(serde_json::Value::Null)
    };
    let text = |v: &serde_json::Value| match v {
        serde_json::Value::Null => String::new(),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    for k in ["name", "version"] {
        change(
            &format!("manifest {k}"),
            text(&field(old, k)),
            text(&field(new, k)),
        );
    }
    for table in ["limits", "settings"] {
        let (a, b) = (field(old, table), field(new, table));
        let keys: std::collections::BTreeSet<&String> = a
            .as_object()
            .into_iter()
            .chain(b.as_object())
            .flat_map(|m| m.keys())
            .collect();
        for k in keys {
            change(
                &format!("{table}.{k}"),
                text(a.get(k).unwrap_or(&null)),
                text(b.get(k).unwrap_or(&null)),
            );
        }
    }
    out
}
