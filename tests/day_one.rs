//! A release engineer's first day (issue 26 §2 and §4): `pde init`,
//! `pde keygen --for`, `pde plugin install`, and output a person can act on,
//! through the real binary, real Git repositories and real agents on loopback.
// Test code: a failed unwrap is a failed test, with its location.
#![allow(clippy::unwrap_used)]

mod support;

use std::path::{Path, PathBuf};

use support::{both, code, git, json, pde};

/// The shipped manifest template of an example plugin (`sha256 = ""`).
fn template(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../plugins")
        .join(name)
        .join(format!("{name}.toml"))
}

fn text(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn init_runs_git_init_outside_a_work_tree_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let o = pde(dir.path(), &["init"]);
    assert_eq!(code(&o), 0, "{}", both(&o));
    assert!(dir.path().join(".git").is_dir());
    assert!(text(&o).contains("ran `git init`"), "{}", text(&o));
    // Inside a work tree (a subdirectory of one), nothing is initialised.
    let sub = dir.path().join("team-b");
    std::fs::create_dir(&sub).unwrap();
    let o = pde(&sub, &["init", "--output", "json"]);
    assert_eq!(code(&o), 0, "{}", both(&o));
    assert!(json(&o)["git_init"].is_null());
    assert!(!sub.join(".git").exists());
}

#[test]
fn keygen_for_an_approver_never_takes_the_release_keys_name() {
    let dir = tempfile::tempdir().unwrap();
    let o = pde(dir.path(), &["keygen", "--for", "approver", "--out", "k"]);
    assert_eq!(code(&o), 0, "{}", both(&o));
    assert!(dir.path().join("k/approver.ed25519").is_file());
    assert!(!dir.path().join("k/release.ed25519").exists());
    assert!(text(&o).contains("approver_keys"), "{}", text(&o));
    let o = pde(
        dir.path(),
        &[
            "keygen",
            "--for",
            "approver",
            "--out",
            "k",
            "--name",
            "ana.ed25519",
        ],
    );
    assert_eq!(code(&o), 0, "{}", both(&o));
    assert!(dir.path().join("k/ana.ed25519.pub").is_file());
    // The default stays the release key, as before.
    assert_eq!(code(&pde(dir.path(), &["keygen", "--out", "k"])), 0);
    assert!(dir.path().join("k/release.ed25519").is_file());
}

/// An initialised, committed workspace (pde init; its dev service unused).
fn workspace() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(code(&pde(dir.path(), &["init"])), 0);
    git(dir.path(), &["add", "-A"]);
    git(dir.path(), &["commit", "-qm", "init"]);
    dir
}

#[test]
fn plugin_install_copies_pins_signs_and_says_what_to_commit() {
    let ws = workspace();
    let root = ws.path();
    // A plugin-signing key the workspace trusts.
    let o = pde(root, &["keygen", "--for", "plugin", "--out", "sec"]);
    assert_eq!(code(&o), 0, "{}", both(&o));
    let toml = std::fs::read_to_string(root.join("pde.toml")).unwrap();
    std::fs::write(
        root.join("pde.toml"),
        toml.replace(
            "plugin_keys = []",
            "plugin_keys = [\"sec/plugin.ed25519.pub\"]",
        ),
    )
    .unwrap();

    let wasm = pde_plugin_artifacts::EFFECTIVE_DATE;
    assert!(wasm.ends_with("effective_date.wasm"), "{wasm}");
    let manifest = template("effective-date");
    let o = pde(
        root,
        &[
            "plugin",
            "install",
            wasm,
            "--manifest",
            manifest.to_str().unwrap(),
            "--sign",
            "sec/plugin.ed25519",
            "--signer",
            "security team",
        ],
    );
    assert_eq!(code(&o), 0, "{}", both(&o));
    let out = text(&o);
    // Under the manifest's hyphenated name, pinned, signed, and the commit to make.
    let installed = root.join("plugins/effective-date.wasm");
    assert_eq!(
        std::fs::read(&installed).unwrap(),
        std::fs::read(wasm).unwrap()
    );
    let sum = pde::plugin::sha256_hex(&std::fs::read(wasm).unwrap());
    let pinned = std::fs::read_to_string(root.join("plugins/effective-date.toml")).unwrap();
    assert!(pinned.contains(&format!("sha256 = \"{sum}\"")), "{pinned}");
    assert!(
        pinned.contains("# Manifest template"),
        "comments kept: {pinned}"
    );
    assert!(root.join("plugins/effective-date.wasm.sig").is_file());
    assert!(out.contains("signed by security team"), "{out}");
    let add = "git add plugins/effective-date.wasm plugins/effective-date.toml \
               plugins/effective-date.wasm.sig";
    assert!(out.contains(add), "{out}");

    // Before the commit, validation (like deploy) refuses the uncommitted plugin.
    std::fs::write(
        root.join("policies/7.json"),
        serde_json::to_string_pretty(&support::policy_42("1.0.0"))
            .unwrap()
            .replace("\"42\"", "\"7\""),
    )
    .unwrap();
    git(
        root,
        &["add", "policies", "pde.toml", "sec/plugin.ed25519.pub"],
    );
    git(root, &["commit", "-qm", "policy 7"]);
    let o = pde(root, &["package", "7"]);
    assert_eq!(code(&o), 2, "{}", both(&o));
    // The printed command, as printed, makes it deployable.
    let line = out
        .lines()
        .find(|l| l.trim().starts_with("git add"))
        .unwrap();
    let o = std::process::Command::new("sh")
        .current_dir(root)
        .env("GIT_AUTHOR_NAME", "T")
        .env("GIT_AUTHOR_EMAIL", "t@example.gov")
        .env("GIT_COMMITTER_NAME", "T")
        .env("GIT_COMMITTER_EMAIL", "t@example.gov")
        .args(["-c", line.trim()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", both(&o));
    let o = pde(root, &["plugin", "list", "--output", "json"]);
    assert_eq!(code(&o), 0, "{}", both(&o));
    assert_eq!(json(&o)[0]["signed"], true, "{}", text(&o));
    let o = pde(root, &["package", "7"]);
    assert_eq!(code(&o), 0, "{}", both(&o));

    // A new build replaces the old one; the old signature no longer fits and goes.
    let o = pde(
        root,
        &[
            "plugin",
            "install",
            pde_plugin_artifacts::EFFECTIVE_DATE,
            "--manifest",
            manifest.to_str().unwrap(),
            "--output",
            "json",
        ],
    );
    assert_eq!(code(&o), 0, "{}", both(&o));
    // Same bytes: nothing replaced, and the signature still covers them.
    assert!(json(&o)["installed"]["replaced_sha256"].is_null());
    assert!(root.join("plugins/effective-date.wasm.sig").is_file());
}

#[test]
fn plugin_install_refuses_what_the_runtime_would_refuse_and_leaves_plugins_alone() {
    let ws = workspace();
    let root = ws.path();
    // A router component under a validator's manifest: the wrong world.
    let manifest = root.join("wrong.toml");
    std::fs::write(
        &manifest,
        std::fs::read_to_string(template("effective-date"))
            .unwrap()
            .replace("name = \"effective-date\"", "name = \"wrong\""),
    )
    .unwrap();
    let o = pde(
        root,
        &[
            "plugin",
            "install",
            pde_plugin_artifacts::CATEGORY_ROUTER,
            "--manifest",
            "wrong.toml",
        ],
    );
    assert_eq!(code(&o), 5, "{}", both(&o));
    assert!(both(&o).contains("router"), "{}", both(&o));
    assert!(!root.join("plugins/wrong.wasm").exists());
    assert!(!root.join("plugins/wrong.toml").exists());
    // Not a component at all.
    std::fs::write(root.join("junk.wasm"), b"\0asm junk").unwrap();
    let o = pde(
        root,
        &["plugin", "install", "junk.wasm", "--manifest", "wrong.toml"],
    );
    assert_eq!(code(&o), 5, "{}", both(&o));
    assert!(!root.join("plugins/wrong.wasm").exists());
    // No manifest given and none beside the file: say how to give one.
    let o = pde(
        root,
        &["plugin", "install", pde_plugin_artifacts::PII_GUARD],
    );
    assert_eq!(code(&o), 2, "{}", both(&o));
    assert!(both(&o).contains("--manifest"), "{}", both(&o));
}
