//! Records the wasmtime version this build links, from `Cargo.lock`, for
//! `pde plugin review`'s report (wasmtime exports no version constant).

fn main() {
    let lock = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../Cargo.lock");
    println!("cargo:rerun-if-changed={}", lock.display());
    let text = std::fs::read_to_string(&lock).unwrap_or_default();
    let mut version = "unknown".to_string();
    let mut in_wasmtime = false;
    for line in text.lines() {
        if line.starts_with("[[package]]") {
            in_wasmtime = false;
        } else if line == "name = \"wasmtime\"" {
            in_wasmtime = true;
        } else if in_wasmtime && let Some(v) = line.strip_prefix("version = ") {
            version = v.trim_matches('"').to_string();
            break;
        }
    }
    println!("cargo:rustc-env=PDE_WASMTIME_VERSION={version}");
}
