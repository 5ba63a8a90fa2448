//! Paths of the plugin components built from this workspace's source.
//!
//! Tests and benchmarks depend on this crate (usually as a dev-dependency)
//! to get real `wasm32-wasip2` components of every plugin under `plugins/`;
//! its build script compiles them (see `build.rs` for why and how). Nothing
//! here is shipped.

include!(concat!(env!("OUT_DIR"), "/artifacts.rs"));

/// Every built plugin as `(name, kind, wasm path)`, where `kind` is
/// `"validator"` or `"router"` (the world the component implements).
///
/// `misbehave` is a test fixture, listed here too; it is never shipped.
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

    #[test]
    fn every_artifact_is_a_component_on_disk() {
        assert_eq!(all().len(), 5);
        for &(name, kind, path) in all() {
            let bytes = std::fs::read(path).unwrap();
            assert_eq!(
                &bytes[..8],
                b"\0asm\x0d\x00\x01\x00",
                "{name} is not a component"
            );
            assert!(kind == "validator" || kind == "router", "{name}: {kind}");
        }
        assert_eq!(wasm("category-router"), Some(CATEGORY_ROUTER));
        assert_eq!(wasm("nope"), None);
        assert!(MISBEHAVE.starts_with(WASM_DIR));
        assert!(manifest_template("eligibility-bounds").is_some());
    }
}
