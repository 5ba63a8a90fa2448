//! A release engineer's first day (issue 26 §2 and §4): `pde init`,
//! `pde keygen --for`, `pde plugin install`, and output a person can act on,
//! through the real binary, real Git repositories and real agents on loopback.
// Test code: a failed unwrap is a failed test, with its location.

use crate::support;

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
    // Not a workspace: exit 2, and the failure still names what was asked.
    let o = pde(
        dir.path(),
        &["deploy", "42", "--env", "dev", "--output", "json"],
    );
    assert_eq!(code(&o), 2, "{}", both(&o));
    let out = json(&o);
    assert_eq!(
        (&out["policy_id"], &out["env"]),
        (&"42".into(), &"dev".into())
    );
    assert_eq!(out["report"]["policy_id"], "42", "{out:#}");
    assert!(out["report"]["validation"].is_null(), "{out:#}");
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

// ------------------------------------------------------------------ §4 output

use support::{AgentProcess, Svc, Workspace};

fn stderr_text(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn a_refusal_is_kept_whole_with_its_status_and_code_and_the_next_step_is_said() {
    let ws = Workspace::new("");
    // HMS-B's agent re-checks approvals and wants three: its 403 names
    // two digests before the clause that matters ("this agent requires 3").
    let mut extra: Vec<std::ffi::OsString> = vec!["--min-approvals".into(), "3".into()];
    for who in ["ana", "bo", "cy"] {
        let key = pde::keys::generate(&ws.root().join("keys"), &format!("{who}.ed25519")).unwrap();
        extra.push("--approver-key".into());
        extra.push(key.public_path.into_os_string());
    }
    let extra: Vec<&std::ffi::OsStr> = extra.iter().map(|s| s.as_os_str()).collect();
    let a = AgentProcess::start(&ws.root().join("agents/a"), &ws.release_pub());
    let b = AgentProcess::start_with(&ws.root().join("agents/b"), &ws.release_pub(), &extra);
    let envs = Workspace::env_toml(
        "prod",
        "",
        &[
            Svc {
                name: "HMS-A",
                url: a.url.clone(),
                tags: &["api"],
            },
            Svc {
                name: "HMS-B",
                url: b.url.clone(),
                tags: &["api"],
            },
        ],
    );
    // One target at a time, in order: HMS-A takes the bundle before HMS-B
    // refuses it, so there is something to roll back.
    let toml = std::fs::read_to_string(ws.root().join("pde.toml"))
        .unwrap()
        .replace("retries = 2\n", "retries = 2\nconcurrency = 1\n");
    std::fs::write(ws.root().join("pde.toml"), format!("{toml}{envs}")).unwrap();
    ws.write_policy("42.json", &support::policy_42("1.0.0").to_string());
    ws.commit("policy 42");

    let o = pde(
        ws.root(),
        &["deploy", "42", "--env", "prod", "--output", "json"],
    );
    assert_eq!(code(&o), 1, "{}", both(&o));
    let out = json(&o);
    // One failure shape: the subject, and the whole report so far.
    assert_eq!(out["policy_id"], "42");
    assert_eq!(out["env"], "prod");
    assert_eq!(out["version"], "1.0.0");
    assert!(
        out["digest"].as_str().unwrap().starts_with("sha256:"),
        "{out:#}"
    );
    assert!(out["report"]["validation"].is_object(), "{out:#}");
    assert!(out["report"]["health"].is_object(), "{out:#}");
    let targets = out["report"]["push"]["targets"].as_array().unwrap();
    let refused = targets.iter().find(|t| t["service"] == "HMS-B").unwrap();
    assert_eq!(refused["http_status"], 403, "{refused:#}");
    assert_eq!(
        refused["error_code"], "approvals_insufficient",
        "{refused:#}"
    );
    let detail = refused["detail"].as_str().unwrap();
    assert!(detail.ends_with("this agent requires 3"), "{detail}");
    assert!(detail.chars().count() > 255, "{detail}");

    // The same for a person: whole, in pde's words, with the next step, and
    // no raw log lines.
    let o = pde(ws.root(), &["deploy", "42", "--env", "prod"]);
    assert_eq!(code(&o), 1, "{}", both(&o));
    let out = text(&o);
    assert!(out.contains("this agent requires 3"), "{out}");
    assert!(
        out.contains("HMS-B failed, so HMS-A was sent back"),
        "says what was rolled back: {out}"
    );
    assert!(
        out.contains("next: check HMS-B") && out.contains("pde deploy 42 --env prod"),
        "{out}"
    );
    let err = stderr_text(&o);
    assert!(
        !err.contains("WARN") && !err.contains("outcome="),
        "no tracing lines by default: {err}"
    );
    // They are there for -v.
    let o = pde(ws.root(), &["-v", "deploy", "42", "--env", "prod"]);
    assert_eq!(code(&o), 1, "{}", both(&o));
    assert!(stderr_text(&o).contains("WARN"), "{}", stderr_text(&o));
}

/// Runs `pde` in `dir` behind a pseudo-terminal (`script`), typing `input`.
fn pde_on_a_terminal(dir: &Path, args: &str, input: &str) -> std::process::Output {
    use std::io::Write as _;
    let command = format!("{} -C {} {args}", env!("CARGO_BIN_EXE_pde"), dir.display());
    let mut child = std::process::Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .env_remove("RUST_LOG")
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn what_was_checked_is_shown_and_history_shows_refusals() {
    let ws = Workspace::new("");
    let root = ws.root();
    let dev = AgentProcess::start(&root.join("agents/dev"), &ws.release_pub());
    let stg = AgentProcess::start(&root.join("agents/stg"), &ws.release_pub());
    let prd = AgentProcess::start(&root.join("agents/prd"), &ws.release_pub());
    let svc = |url: &str| {
        vec![Svc {
            name: "HMS-API",
            url: url.to_string(),
            tags: &["api"],
        }]
    };
    let envs = [
        Workspace::env_toml("dev", "", &svc(&dev.url)),
        Workspace::env_toml("staging", "min_approvals = 1", &svc(&stg.url)),
        Workspace::env_toml(
            "production",
            "min_approvals = 1\npromote_from = \"staging\"",
            &svc(&prd.url),
        ),
    ]
    .concat();
    let toml = std::fs::read_to_string(root.join("pde.toml"))
        .unwrap()
        .replace(
            "plugin_keys = [\"keys/security.ed25519.pub\"]\n",
            "plugin_keys = [\"keys/security.ed25519.pub\"]\n\
             approver_keys = [{ file = \"approvers/ana.ed25519.pub\", roles = [\"legal\"] }]\n",
        );
    std::fs::write(root.join("pde.toml"), format!("{toml}{envs}")).unwrap();
    let mut policy = support::policy_42("1.0.0");
    policy["approvals"] = serde_json::json!([]);
    ws.write_policy("42.json", &policy.to_string());
    let o = pde(
        root,
        &[
            "keygen",
            "--for",
            "approver",
            "--out",
            "approvers",
            "--name",
            "ana.ed25519",
            "--output",
            "json",
        ],
    );
    assert_eq!(code(&o), 0, "{}", both(&o));
    let keyid = json(&o)["key_id"].as_str().unwrap().to_string();
    std::fs::write(root.join(".gitignore"), "approvers/*.ed25519\n").unwrap();
    ws.commit("policy 42");
    let key = root.join("approvers/ana.ed25519");
    let o = pde(
        root,
        &[
            "approve",
            "42",
            "--key",
            key.to_str().unwrap(),
            "--role",
            "legal",
            "--by",
            "ana",
        ],
    );
    assert_eq!(code(&o), 0, "{}", both(&o));
    ws.commit("ana approves 42");

    // A dry run that passed ends with a success mark.
    let o = pde(root, &["deploy", "42", "--env", "dev", "--dry-run"]);
    assert_eq!(code(&o), 0, "{}", both(&o));
    let last = text(&o).lines().last().unwrap().to_string();
    assert!(
        last.starts_with('✓') && last.contains("dry run passed"),
        "{last}"
    );

    for env in ["dev", "staging"] {
        let o = pde(root, &["deploy", "42", "--env", env]);
        assert_eq!(code(&o), 0, "{}", both(&o));
    }
    // Production: the approvals counted and the promotion gate, in words.
    let o = pde(root, &["deploy", "42", "--env", "production"]);
    assert_eq!(code(&o), 0, "{}", both(&o));
    let out = text(&o);
    assert!(out.contains("approvals counted for production: 1"), "{out}");
    assert!(out.contains(&format!("ana as legal, key {keyid}")), "{out}");
    assert!(
        out.contains("promotion gate passed: staging already runs this bundle"),
        "{out}"
    );

    // An edit makes ana's approval stale. Dev requires none: said once, as information.
    let mut edited = policy.clone();
    edited["version"] = "1.1.0".into();
    edited["rules"][1]["value"] = 50000.into();
    ws.write_policy("42.json", &edited.to_string());
    ws.commit("raise the income limit");
    let o = pde(
        root,
        &["validate", "42", "--env", "dev", "--output", "json"],
    );
    assert_eq!(code(&o), 0, "{}", both(&o));
    let stale: Vec<serde_json::Value> = json(&o)["diagnostics"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["code"] == "approvals.stale")
        .cloned()
        .collect();
    assert_eq!(stale.len(), 1, "{stale:#?}");
    assert_eq!(stale[0]["severity"], "info", "{stale:#?}");
    let o = pde(root, &["deploy", "42", "--env", "dev"]);
    assert_eq!(code(&o), 0, "{}", both(&o));
    assert_eq!(
        text(&o).matches("approvals.stale").count(),
        1,
        "{}",
        text(&o)
    );
    assert!(!text(&o).contains("! approvals.stale"), "{}", text(&o));

    // Staging requires an approval: refused. The failure names its subject.
    let o = pde(
        root,
        &["deploy", "42", "--env", "staging", "--output", "json"],
    );
    assert_eq!(code(&o), 3, "{}", both(&o));
    let out = json(&o);
    assert_eq!(
        (&out["policy_id"], &out["env"], &out["version"]),
        (&"42".into(), &"staging".into(), &"1.1.0".into()),
        "{out:#}"
    );
    assert_eq!(out["failed_step"], "validation");
    assert!(
        out["report"]["validation"]["diagnostics"].is_array(),
        "{out:#}"
    );
    assert_eq!(out["report"]["policy_id"], "42");
    // Exit 2 where something is known: not a null report.
    let o = pde(
        root,
        &["deploy", "42", "--env", "nowhere", "--output", "json"],
    );
    assert_eq!(code(&o), 2, "{}", both(&o));
    let out = json(&o);
    assert_eq!(
        (&out["policy_id"], &out["env"]),
        (&"42".into(), &"nowhere".into())
    );
    assert_eq!(out["report"]["policy_id"], "42", "{out:#}");

    // History shows the refusal, with its reason, at whole seconds.
    let o = pde(root, &["history", "42"]);
    assert_eq!(code(&o), 0, "{}", both(&o));
    let out = text(&o);
    // An entry's first line (its reason, indented below it, may name
    // staging too: "pde.toml defines: dev, production, staging").
    let refused = out
        .lines()
        .find(|l| !l.starts_with(' ') && l.contains("refused") && l.contains("staging"))
        .unwrap_or_else(|| panic!("no refused line: {out}"));
    assert!(refused.contains("v1.1.0"), "{refused}");
    assert!(
        out.contains("refused before any push (exit 3): policy 42 failed validation"),
        "{out}"
    );
    for line in out.lines().filter(|l| !l.starts_with(' ')) {
        let ts = &line[..20];
        assert!(
            ts.ends_with('Z') && !ts.contains('.') && line[20..].starts_with("  "),
            "whole seconds: {line:?}"
        );
    }
    let o = pde(root, &["history", "42", "--output", "json"]);
    let list = json(&o);
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .any(|e| e["outcome"] == "refused"
                && e["env"] == "staging"
                && e["reason"].as_str().unwrap().contains("failed validation")),
        "{list:#}"
    );
    // Status: whole seconds, and JSON entries that say their schema.
    let o = pde(root, &["status"]);
    for line in text(&o).lines().filter(|l| l.starts_with("42 ")) {
        let ts = line.rsplit(' ').next().unwrap();
        assert!(ts.len() == 20 && ts.ends_with('Z'), "{line:?}");
    }
    let o = pde(root, &["status", "--output", "json"]);
    assert_eq!(json(&o)[0]["schema"], "pde.status/v1");

    // Rollback: a person at a terminal is asked; "n" changes nothing.
    let before = support::active_digest_of(&dev.url, "42");
    let o = pde_on_a_terminal(root, "rollback 42 --env dev", "n\n");
    assert_eq!(o.status.code(), Some(2), "{}", both(&o));
    assert!(both(&o).contains("not confirmed"), "{}", both(&o));
    assert_eq!(support::active_digest_of(&dev.url, "42"), before);
    // A script (stdin not a terminal) goes on as before; the reason is audited.
    let o = pde(
        root,
        &[
            "rollback",
            "42",
            "--env",
            "dev",
            "--reason",
            "INC-7: wrong limit",
        ],
    );
    assert_eq!(code(&o), 0, "{}", both(&o));
    let o = pde(
        root,
        &["audit", "show", "--policy", "42", "--output", "json"],
    );
    let records = json(&o);
    let rolled = records
        .as_array()
        .unwrap()
        .iter()
        .rfind(|r| r["event"] == "rolled_back" && r["env"] == "dev")
        .unwrap();
    assert_eq!(rolled["data"]["reason"], "INC-7: wrong limit", "{rolled:#}");
}

/// Issue 21 (gap): the safe setting is the one people copy. The example
/// workspace's production names the validators it must never run without,
/// and `pde init`'s template shows where that goes.
#[test]
fn the_templates_people_copy_require_the_production_validators() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/workspace");
    let config = pde::config::Config::load(&root).unwrap();
    let production = config.environment("production").unwrap();
    for name in ["pii-guard", "eligibility-bounds", "effective-date"] {
        assert!(
            production.required_plugins.iter().any(|p| p == name),
            "{name} missing from {:?}",
            production.required_plugins
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let o = pde(dir.path(), &["init"]);
    assert_eq!(code(&o), 0, "{}", both(&o));
    let toml = std::fs::read_to_string(dir.path().join("pde.toml")).unwrap();
    assert!(
        toml.contains("# [environments.production]") && toml.contains("# required_plugins = ["),
        "{toml}"
    );
}
