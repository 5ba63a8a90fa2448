//! Paths of the plugin components built from this workspace's source.
//!
//! Tests and benchmarks depend on this crate (usually as a dev-dependency)
//! to get real `wasm32-wasip2` components of every plugin under `plugins/`;
//! its build script compiles them (see `build.rs` for why and how). Nothing
//! here is shipped.

include!(concat!(env!("OUT_DIR"), "/artifacts.rs"));
include!("outer_cargo_env.rs");

/// Every built plugin as `(name, kind, wasm path)`, where `kind` is
/// `"validator"`, `"router"` or `"gate"` (the world the component
/// implements).
///
/// `misbehave`, `extra-exports`, `legacy-validator` and `legacy-router`
/// are test fixtures, listed here too; they are never shipped. The two
/// `legacy-*` ones are built against `pde:plugin@0.1.0`, the
/// `mann-whitney-gate` example against 0.3.0 (wit-bindgen directly: the
/// SDK does not wrap the gate world), every other one (through the SDK)
/// against 0.2.0.
pub fn all() -> &'static [(&'static str, &'static str, &'static str)] {
    ALL
}

/// The wasm path of plugin `name` (crate name, e.g. `"pii-guard"`).
pub fn wasm(name: &str) -> Option<&'static str> {
    ALL.iter().find(|(n, ..)| *n == name).map(|&(_, _, p)| p)
}

/// The manifest template (`<name>.toml`, with an empty `sha256`) that ships
/// beside plugin `name`'s `Cargo.toml`, if it has one.
pub fn manifest_template(name: &str) -> Option<&'static str> {
    MANIFESTS
        .iter()
        .find(|(n, _)| *n == name)
        .and_then(|&(_, m)| m)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The top-level names of a component (not those of the core modules
    /// and components nested inside it): its exports, or its imports.
    fn top_level_names(bytes: &[u8], imports: bool) -> Vec<String> {
        use wasmparser::{Parser, Payload};
        let mut depth = 0usize;
        let mut names = Vec::new();
        for payload in Parser::new(0).parse_all(bytes) {
            match payload.expect("the component parses") {
                Payload::ModuleSection { .. } | Payload::ComponentSection { .. } => depth += 1,
                Payload::End(_) => depth = depth.saturating_sub(1),
                Payload::ComponentExportSection(reader) if depth == 0 && !imports => {
                    for export in reader {
                        names.push(export.expect("export entry").name.name.to_string());
                    }
                }
                Payload::ComponentImportSection(reader) if depth == 0 && imports => {
                    for import in reader {
                        names.push(import.expect("import entry").name.name.to_string());
                    }
                }
                _ => {}
            }
        }
        names.sort();
        names
    }

    /// The `pde:plugin` interfaces a component imports at its top level.
    fn pde_imports(bytes: &[u8]) -> Vec<String> {
        let mut names = top_level_names(bytes, true);
        names.retain(|n| n.starts_with("pde:plugin/"));
        names
    }

    #[test]
    fn the_sdk_builds_against_0_2_0_and_the_legacy_fixtures_against_0_1_0() {
        for &(name, kind, path) in all() {
            let bytes = std::fs::read(path).unwrap();
            let version = if name.starts_with("legacy-") || name == "extra-exports" {
                "0.1.0"
            } else if kind == "gate" {
                "0.3.0"
            } else {
                "0.2.0"
            };
            // `host` is only imported by a plugin that logs.
            let imports = pde_imports(&bytes);
            assert!(
                imports.contains(&format!("pde:plugin/types@{version}"))
                    && imports.iter().all(|i| i.ends_with(&format!("@{version}"))),
                "{name}: {imports:?}"
            );
        }
    }

    #[test]
    fn each_component_exports_only_its_world_function() {
        // Both worlds are generated in one SDK crate; this proves a
        // validator does not also export `route` (and vice versa).
        for &(name, kind, path) in all() {
            if name == "extra-exports" {
                // Exports more than its world on purpose (the host refuses it).
                continue;
            }
            let bytes = std::fs::read(path).unwrap();
            let want = match kind {
                "router" => "route",
                "gate" => "gate",
                _ => "validate",
            };
            assert_eq!(top_level_names(&bytes, false), [want], "{name} ({kind})");
        }
    }

    #[test]
    fn every_artifact_is_a_component_on_disk() {
        assert_eq!(all().len(), 11);
        for &(name, kind, path) in all() {
            let bytes = std::fs::read(path).unwrap();
            assert_eq!(
                &bytes[..8],
                b"\0asm\x0d\x00\x01\x00",
                "{name} is not a component"
            );
            assert!(
                ["validator", "router", "gate"].contains(&kind),
                "{name}: {kind}"
            );
        }
        assert_eq!(wasm("category-router"), Some(CATEGORY_ROUTER));
        assert_eq!(wasm("nope"), None);
        assert!(MISBEHAVE.starts_with(WASM_DIR));
        assert!(manifest_template("eligibility-bounds").is_some());
        assert!(manifest_template("benefit-change").is_some());
        assert!(manifest_template("label-router").is_some());
        assert!(manifest_template("legacy-router").is_none());
        assert!(manifest_template("mann-whitney-gate").is_some());
    }
}
