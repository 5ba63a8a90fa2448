//! docs/release-engineer.md's "Your first workspace", run as written: every
//! `sh` block between its `first-workspace: begin` and `end` markers, in
//! order, as one `bash -euo pipefail` script in an empty home directory,
//! with real `pde agent` processes on loopback as the services.
//!
//! The test provides only what the walk-through says a security team hands
//! over: `~/pde-plugins/effective_date.wasm` (the example validator, built)
//! and its manifest template `effective-date.toml`. Git gets an author
//! through the environment, as a configured Git would have one.
// Test code: a failed unwrap is a failed test, with its location.

use crate::support;

use std::path::{Path, PathBuf};
use std::process::Command;

use support::both;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The `sh` blocks of the walk-through, in order, joined into one script.
fn walkthrough() -> String {
    let script = support::doc_script("docs/release-engineer.md", "first-workspace");
    assert!(script.contains("pde init"), "{script}");
    script
}

/// Stops the agents the walk-through started (their pids are in the file
/// it writes), also when the script failed half-way.
struct Agents(PathBuf);

impl Drop for Agents {
    fn drop(&mut self) {
        if let Ok(pids) = std::fs::read_to_string(&self.0) {
            for pid in pids.split_whitespace() {
                let _ = Command::new("kill").arg(pid).status();
            }
        }
    }
}

#[test]
fn the_first_workspace_walkthrough_runs_as_written() {
    let home = tempfile::tempdir().unwrap();
    let home = home.path();
    let plugins = home.join("pde-plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    std::fs::copy(
        pde_plugin_artifacts::EFFECTIVE_DATE,
        plugins.join("effective_date.wasm"),
    )
    .unwrap();
    std::fs::copy(
        repo().join("plugins/effective-date/effective-date.toml"),
        plugins.join("effective-date.toml"),
    )
    .unwrap();
    let _agents = Agents(home.join("pde-agents/pids"));

    let pde_dir = Path::new(env!("CARGO_BIN_EXE_pde")).parent().unwrap();
    let path = std::env::join_paths(
        std::iter::once(pde_dir.to_path_buf())
            .chain(std::env::split_paths(&std::env::var_os("PATH").unwrap())),
    )
    .unwrap();
    let o = Command::new("bash")
        .args(["-euo", "pipefail", "-c", &walkthrough()])
        .current_dir(home)
        .env("HOME", home)
        .env("PATH", path)
        .env("PDE_CACHE_DIR", home.join("cache"))
        .env("GIT_AUTHOR_NAME", "Release Engineer")
        .env("GIT_AUTHOR_EMAIL", "release@hms.example.gov")
        .env("GIT_COMMITTER_NAME", "Release Engineer")
        .env("GIT_COMMITTER_EMAIL", "release@hms.example.gov")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env_remove("RUST_LOG")
        .env_remove("XDG_CACHE_HOME")
        .env_remove("GIT_DIR")
        .env_remove("GIT_WORK_TREE")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let all = both(&o);
    assert!(o.status.success(), "{all}");
    let out = String::from_utf8_lossy(&o.stdout);

    // What each step is there to show.
    assert!(out.contains("ran `git init`"), "{all}");
    assert!(out.contains("installed effective-date"), "{all}");
    assert!(out.contains("✓ policy 42 v1.0.0 to dev: deployed"), "{all}");
    assert!(out.contains("production refused it (exit 3)"), "{all}");
    assert!(out.contains("approvals counted for production: 1"), "{all}");
    assert!(
        out.contains("promotion gate passed: dev already runs this bundle"),
        "{all}"
    );
    assert!(
        out.contains("✓ policy 42 v1.0.0 to production: deployed"),
        "{all}"
    );

    // Production runs the very bundle dev runs, as each agent says itself.
    let url = |svc: &str| {
        let line = std::fs::read_to_string(home.join(format!("pde-agents/{svc}.out"))).unwrap();
        format!(
            "http://{}",
            line.lines()
                .next()
                .unwrap()
                .strip_prefix("listening on ")
                .unwrap()
        )
    };
    let dev = support::active_digest_of(&url("dev-api"), "42").expect("dev runs 42");
    let prod = support::active_digest_of(&url("prod-api"), "42").expect("production runs 42");
    assert_eq!(dev, prod);
}
