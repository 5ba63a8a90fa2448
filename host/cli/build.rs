//! Records what `pde --version` tells a bug report: the git commit of the
//! build and the wasmtime version in the lock file. Neither is required: a
//! build from a tarball says "unknown".

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=../../Cargo.lock");
    // A new commit moves HEAD's branch ref (or HEAD itself when detached).
    println!("cargo:rerun-if-changed=../../.git/HEAD");
    println!("cargo:rerun-if-changed=../../.git/refs/heads");
    println!("cargo:rerun-if-env-changed=PDE_GIT_COMMIT");
    let commit = std::env::var("PDE_GIT_COMMIT").ok().or_else(|| {
        let out = Command::new("git")
            .args(["rev-parse", "--short=12", "HEAD"])
            .output()
            .ok()?;
        let text = String::from_utf8(out.stdout).ok()?;
        out.status.success().then(|| text.trim().to_string())
    });
    println!(
        "cargo:rustc-env=PDE_GIT_COMMIT={}",
        commit.unwrap_or_else(|| "unknown".into())
    );
    let lock = std::fs::read_to_string("../../Cargo.lock").unwrap_or_default();
    let wasmtime = lock
        .split("[[package]]")
        .find(|p| p.contains("\nname = \"wasmtime\"\n"))
        .and_then(|p| p.lines().find_map(|l| l.strip_prefix("version = \"")))
        .map(|v| v.trim_end_matches('"').to_string())
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=PDE_WASMTIME_VERSION={wasmtime}");
}
