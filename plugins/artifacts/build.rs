//! Builds every plugin under `plugins/` to a `wasm32-wasip2` component.
//!
//! Why a build script (in the style of wasmtime's
//! `crates/test-programs/artifacts/build.rs`): the integration tests and the
//! benchmarks must run the real components built from this very source, and
//! no `.wasm` may be committed. A nested `cargo build` does the work; rustc's
//! `wasm32-wasip2` target links a component directly, so no extra tool is
//! needed.
//!
//! The nested build uses its own target dir, `<workspace>/target/wasm-plugins`
//! (derived from this crate's manifest dir, not `OUT_DIR`, so the README's
//! demo script can reuse the same files), and the `plugin` profile from the
//! root `Cargo.toml`. Environment variables that the outer cargo sets for
//! *this* build (flags, wrappers, target dir) are removed so they cannot leak
//! into a build for a different target.

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

include!("src/outer_cargo_env.rs");

/// (crate name, component kind, crate dir relative to the workspace root).
const PLUGINS: &[(&str, &str, &str)] = &[
    (
        "eligibility-bounds",
        "validator",
        "plugins/eligibility-bounds",
    ),
    ("pii-guard", "validator", "plugins/pii-guard"),
    ("effective-date", "validator", "plugins/effective-date"),
    ("category-router", "router", "plugins/category-router"),
    ("benefit-change", "validator", "plugins/benefit-change"),
    ("label-router", "router", "plugins/label-router"),
    ("misbehave", "validator", "plugins/fixtures/misbehave"),
    (
        "extra-exports",
        "validator",
        "plugins/fixtures/extra-exports",
    ),
    // pde:plugin@0.1.0 components, built with wit-bindgen directly: the
    // SDK builds against the newest contract, and these stand in for the
    // plugins agencies built before 0.2.0.
    (
        "legacy-validator",
        "validator",
        "plugins/fixtures/legacy-validator",
    ),
    ("legacy-router", "router", "plugins/fixtures/legacy-router"),
    // pde:plugin@0.3.0's gate world, built with wit-bindgen directly (the
    // SDK wraps validators and routers only).
    ("mann-whitney-gate", "gate", "plugins/mann-whitney-gate"),
];

/// Plugins built without `std` on wasm, by a nested build of their own:
/// in one build cargo unifies a dependency's features across packages, and
/// the std plugins turn on `std` in serde_json and wit-bindgen, which a
/// `no_std` plugin cannot link with.
const NO_STD: &[&str] = &["mann-whitney-gate"];

const TARGET: &str = "wasm32-wasip2";
const PROFILE: &str = "plugin";

fn main() {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let root = manifest_dir
        .parent()
        .and_then(Path::parent)
        .expect("plugins/artifacts sits two levels below the workspace root")
        .to_path_buf();
    let target_dir = root.join("target").join("wasm-plugins");

    // Relative to this package, so cargo checks the files of the checkout
    // being built. Cargo keys this script's fingerprint without the
    // checkout's path, so with a CARGO_TARGET_DIR shared between several
    // checkouts (git worktrees) a run in one would look fresh in another
    // and hand out the other's paths; `PWD` differs between checkouts and
    // forces a rerun there (a no-op nested build when nothing changed).
    for watched in ["wit", "plugins/sdk", "Cargo.toml", "Cargo.lock"] {
        println!("cargo:rerun-if-changed=../../{watched}");
    }
    for (_, _, dir) in PLUGINS {
        println!("cargo:rerun-if-changed=../../{dir}");
    }
    println!("cargo:rerun-if-env-changed=PWD");

    ensure_target_installed();

    for name in NO_STD {
        assert!(
            PLUGINS.iter().any(|(plugin, _, _)| plugin == name),
            "NO_STD names {name}, which PLUGINS does not list"
        );
    }
    let (bare, with_std): (Vec<&str>, Vec<&str>) = PLUGINS
        .iter()
        .map(|(name, _, _)| *name)
        .partition(|name| NO_STD.contains(name));
    nested_build(&root, &target_dir, &with_std);
    nested_build(&root, &target_dir, &bare);

    let out_dir = target_dir.join(TARGET).join(PROFILE);
    let mut src = String::new();
    let mut all = String::new();
    let mut manifests = String::new();
    for (name, kind, dir) in PLUGINS {
        let wasm = out_dir.join(format!("{}.wasm", name.replace('-', "_")));
        check_component(&wasm);
        let konst = name.replace('-', "_").to_uppercase();
        let manifest = root.join(dir).join(format!("{name}.toml"));
        writeln!(
            src,
            "/// Absolute path of the `{name}` {kind} component (`{}`).\npub const {konst}: &str = {:?};",
            wasm.display(),
            wasm.display().to_string()
        )
        .unwrap();
        writeln!(all, "    ({name:?}, {kind:?}, {konst}),").unwrap();
        writeln!(
            manifests,
            "    ({name:?}, {:?}),",
            manifest.exists().then(|| manifest.display().to_string())
        )
        .unwrap();
    }
    writeln!(
        src,
        "/// Directory the nested build writes components to.\npub const WASM_DIR: &str = {:?};",
        out_dir.display().to_string()
    )
    .unwrap();
    writeln!(src, "const ALL: &[(&str, &str, &str)] = &[\n{all}];").unwrap();
    writeln!(
        src,
        "const MANIFESTS: &[(&str, Option<&str>)] = &[\n{manifests}];"
    )
    .unwrap();
    let out =
        PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("artifacts.rs");
    fs::write(&out, src).unwrap_or_else(|e| panic!("cannot write {}: {e}", out.display()));
}

/// Fails early, with the fix, when the rustup target is missing.
fn ensure_target_installed() {
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let sysroot = Command::new(&rustc)
        .args(["--print", "sysroot"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    if let Some(sysroot) = sysroot
        && !sysroot.join("lib/rustlib").join(TARGET).exists()
    {
        panic!(
            "the Rust target `{TARGET}` is not installed (looked in {}); run `rustup target add {TARGET}` and build again",
            sysroot.join("lib/rustlib").display()
        );
    }
}

/// A component starts with `\0asm` and the component-layer version
/// `0d 00 01 00`; a core module would have `01 00 00 00`.
fn check_component(path: &Path) {
    let bytes = fs::read(path)
        .unwrap_or_else(|e| panic!("the nested build did not produce {}: {e}", path.display()));
    if bytes.len() < 8 || &bytes[0..4] != b"\0asm" || bytes[4..8] != [0x0d, 0x00, 0x01, 0x00] {
        panic!(
            "{} is not a WebAssembly component (header {:02x?}); is the `{TARGET}` target up to date?",
            path.display(),
            &bytes[..bytes.len().min(8)]
        );
    }
}

/// Builds `packages` for [`TARGET`] with one nested `cargo build`.
fn nested_build(root: &Path, target_dir: &Path, packages: &[&str]) {
    // With no `-p` cargo would build the workspace's default members.
    if packages.is_empty() {
        return;
    }
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(root)
        .arg("build")
        .arg("--target")
        .arg(TARGET)
        .arg("--profile")
        .arg(PROFILE)
        .arg("--target-dir")
        .arg(target_dir);
    for name in packages {
        cmd.arg("-p").arg(name);
    }
    for var in OUTER_CARGO_VARS {
        cmd.env_remove(var);
    }
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("could not run the nested `cargo build` for the plugins: {e}"));
    if !status.success() {
        panic!(
            "building {} for {TARGET} failed ({status}); run `cargo build --target {TARGET} --profile {PROFILE} -p <plugin>` in {} to see why (a no_std plugin must be built in a cargo invocation of its own)",
            packages.join(", "),
            root.display()
        );
    }
}
