//! What a plugin author and a release engineer see (issue 24 §4), through
//! the real `pde` binary, real example components and real files:
//! `plugin diff` lists findings and signatures, `plugin test` finds and
//! reports the scaffold's manifest and its limits, errors say what to do
//! next, plugin warnings belong to the step that ran the plugin, keys are
//! named, and a team's PostgreSQL records the database role that wrote.
// Test code: a failed unwrap is a failed test, with its location.

use crate::support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::{Value, json};
use support::{Svc, Workspace, code, json};

/// `pde -C dir ARGS` from `dir`, with the per-user cache in `cache`, no
/// `RUST_LOG` and no actor variables (as in a container).
fn pde(dir: &Path, cache: &Path, args: &[&str]) -> Output {
    crate::plugin_authoring::pde_command(dir, cache)
        .env_remove("PDE_ACTOR")
        .env_remove("USER")
        .args(args)
        .output()
        .expect("pde runs")
}

fn out(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn all(o: &Output) -> String {
    format!(
        "{}\n--- stderr ---\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A policy with one rule of age 70: the example validator passes it by
/// default (ages up to 120) and fails it with `age.max` 60.
fn write_policy(dir: &Path) -> PathBuf {
    let path = dir.join("policy.json");
    let doc = json!({
        "id": "42", "version": "1.0.0", "title": "t", "agency": "a",
        "effective": "2030-01-01", "approvals": [],
        "rules": [{"key": "min_age", "category": "eligibility", "value": 70, "description": "senior"}],
        "config": {}
    });
    std::fs::write(&path, doc.to_string()).unwrap();
    path
}

/// The example validator as `dir/eb.wasm`, with a manifest pinning it
/// (version and settings as given).
fn build(dir: &Path, version: &str, settings: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let wasm = dir.join("eb.wasm");
    std::fs::copy(pde_plugin_artifacts::ELIGIBILITY_BOUNDS, &wasm).unwrap();
    let sha = pde::plugin::sha256_hex(&std::fs::read(&wasm).unwrap());
    std::fs::write(
        dir.join("eb.toml"),
        format!(
            "name = \"eb\"\nkind = \"validator\"\nversion = \"{version}\"\nsha256 = \"{sha}\"\n\
             description = \"d\"\n{settings}"
        ),
    )
    .unwrap();
    wasm
}

#[test]
fn plugin_diff_lists_findings_added_removed_and_changed_and_who_signed_each_side() {
    let ws = Workspace::new("");
    let root = ws.root();
    let cache = tempfile::tempdir().unwrap();
    write_policy(root);
    // The approved build finds nothing on the policy; the update (its
    // settings tightened) reports an error, and is signed by the
    // workspace's trusted plugin key.
    build(&root.join("old"), "0.1.0", "");
    build(
        &root.join("new"),
        "0.2.0",
        "[settings]\nage = { min = 0, max = 60 }\n",
    );
    build(
        &root.join("newer"),
        "0.3.0",
        "[settings]\nage = { min = 0, max = 65 }\n",
    );
    let o = pde(
        root,
        cache.path(),
        &[
            "plugin",
            "sign",
            "new/eb.wasm",
            "--key",
            "keys/security.ed25519",
        ],
    );
    assert_eq!(code(&o), 0, "{}", all(&o));

    let args = [
        "plugin",
        "diff",
        "old/eb.wasm",
        "new/eb.wasm",
        "--policy",
        "policy.json",
    ];
    let o = pde(root, cache.path(), &args);
    assert_eq!(code(&o), 0, "{}", all(&o));
    let text = out(&o);
    for line in [
        "signature (old): unsigned",
        "signature (new): signed by ",
        "with key keys/security.ed25519.pub (",
        "~ manifest version: 0.1.0 -> 0.2.0",
        "verdict pass -> fail",
        "+ finding error[eligibility.age-range] /rules/0/value",
        "fuel used:",
    ] {
        assert!(text.contains(line), "{line:?} missing:\n{}", all(&o));
    }
    assert!(!text.contains("manifest comparison skipped"), "{text}");

    let mut json_args = args.to_vec();
    json_args.extend(["--output", "json"]);
    let d = json(&pde(root, cache.path(), &json_args));
    let findings = &d["runs"]["findings"];
    assert_eq!(findings["added"].as_array().unwrap().len(), 1, "{d}");
    assert_eq!(findings["added"][0]["code"], "eligibility.age-range");
    assert_eq!(findings["added"][0]["severity"], "error");
    assert_eq!(findings["removed"], json!([]));
    assert_eq!(d["runs"]["verdict"], json!(["pass", "fail"]));
    assert_eq!(d["signatures"]["old"]["status"], "unsigned");
    assert_eq!(d["signatures"]["new"]["status"], "valid");
    assert_eq!(
        d["signatures"]["new"]["key_name"],
        "keys/security.ed25519.pub"
    );
    assert!(d["signatures"]["new"]["signer"].as_str().unwrap() != "unknown");
    assert_eq!(d["manifest_compared"], true);
    assert!(d["costs"]["old"]["fuel_used"].as_u64().unwrap() > 0);

    // Back again: the finding is removed. And between two tightened builds
    // the same finding (code and path) says something else: changed.
    let d = json(&pde(
        root,
        cache.path(),
        &[
            "plugin",
            "diff",
            "new/eb.wasm",
            "old/eb.wasm",
            "--policy",
            "policy.json",
            "--output",
            "json",
        ],
    ));
    assert_eq!(
        d["runs"]["findings"]["removed"].as_array().unwrap().len(),
        1
    );
    assert_eq!(d["runs"]["findings"]["added"], json!([]));
    let o = pde(
        root,
        cache.path(),
        &[
            "plugin",
            "diff",
            "new/eb.wasm",
            "newer/eb.wasm",
            "--policy",
            "policy.json",
        ],
    );
    assert_eq!(code(&o), 0, "{}", all(&o));
    assert!(
        out(&o).contains("~ finding error[eligibility.age-range]") && out(&o).contains("0 to 65"),
        "{}",
        all(&o)
    );
}

#[test]
fn plugin_diff_outside_a_workspace_says_the_manifest_comparison_was_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let root = dir.path();
    write_policy(root);
    for side in ["a", "b"] {
        std::fs::create_dir_all(root.join(side)).unwrap();
        std::fs::copy(
            pde_plugin_artifacts::ELIGIBILITY_BOUNDS,
            root.join(side).join("eb.wasm"),
        )
        .unwrap();
    }
    let o = pde(
        root,
        cache.path(),
        &["plugin", "diff", "a/eb.wasm", "b/eb.wasm"],
    );
    assert_eq!(code(&o), 0, "{}", all(&o));
    let text = out(&o);
    assert!(
        text.contains("manifest comparison skipped: a/eb.wasm has no manifest beside it")
            && text.contains("outside a workspace"),
        "{}",
        all(&o)
    );
    let d = json(&pde(
        root,
        cache.path(),
        &[
            "plugin",
            "diff",
            "a/eb.wasm",
            "b/eb.wasm",
            "--output",
            "json",
        ],
    ));
    assert_eq!(d["manifest_compared"], false);
    assert!(
        d["manifest_skipped"]
            .as_str()
            .unwrap()
            .contains("outside a workspace"),
        "{d}"
    );
}

/// The layout `pde plugin new` and `cargo build` leave: `NAME.toml` at the
/// project root, the build in `target/wasm32-wasip2/release/NAME_.wasm`.
fn scaffold_layout(root: &Path, manifest_sha: &str) -> PathBuf {
    let project = root.join("my-bounds");
    let release = project.join("target/wasm32-wasip2/release");
    std::fs::create_dir_all(&release).unwrap();
    std::fs::write(
        project.join("Cargo.toml"),
        "[package]\nname = \"my-bounds\"\nversion = \"0.1.0\"\n",
    )
    .unwrap();
    std::fs::write(
        project.join("my-bounds.toml"),
        format!(
            "name = \"my-bounds\"\nkind = \"validator\"\nversion = \"0.1.0\"\n\
             description = \"d\"\nsha256 = \"{manifest_sha}\"\n\
             [settings]\nage = {{ min = 0, max = 60 }}\n"
        ),
    )
    .unwrap();
    std::fs::copy(
        pde_plugin_artifacts::ELIGIBILITY_BOUNDS,
        release.join("my_bounds.wasm"),
    )
    .unwrap();
    write_policy(&project);
    project
}

#[test]
fn plugin_test_applies_the_scaffold_manifest_and_reports_what_it_used_against_the_limits() {
    let dir = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    // The scaffold's placeholder: nothing is pinned before the first build.
    let project = scaffold_layout(dir.path(), "");
    let wasm = "target/wasm32-wasip2/release/my_bounds.wasm";
    let run = |extra: &[&str]| {
        let mut args = vec!["plugin", "test", wasm, "--policy", "policy.json"];
        args.extend_from_slice(extra);
        pde(&project, cache.path(), &args)
    };

    // Found beside the project: its name and its [settings] apply (age 70
    // is over its max of 60), where before the build ran as `my_bounds`
    // with no settings and passed.
    let o = run(&["--output", "json"]);
    assert_eq!(code(&o), 3, "{}", all(&o));
    let r = json(&o);
    assert_eq!(r["plugin"], "my-bounds");
    assert_eq!(r["verdict"], "fail");
    assert_eq!(r["settings"]["age"]["max"], 60);
    assert_eq!(r["manifest"]["how"], "found in the project");
    assert_eq!(r["manifest"]["unpinned"], true);
    assert!(
        r["manifest"]["path"]
            .as_str()
            .unwrap()
            .ends_with("my-bounds/my-bounds.toml"),
        "{r}"
    );
    assert_eq!(r["limits"]["fuel"], 2_000_000_000u64);
    assert!(
        r["limits_from"].as_str().unwrap().contains("default"),
        "{r}"
    );
    // Compiled now, and where it was cached is said.
    assert_eq!(r["loaded_from_cache"], false);
    let cached_at = r["cached_at"][0].as_str().unwrap().to_string();
    assert!(
        cached_at.starts_with(cache.path().to_str().unwrap()),
        "{cached_at}"
    );
    assert!(r["compiled"].as_str().unwrap().contains(&cached_at), "{r}");

    // In words: which manifest, settings and limits, and the costs against them.
    let o = run(&[]);
    assert_eq!(code(&o), 3, "{}", all(&o));
    let text = out(&o);
    for line in [
        "manifest: ",
        "my-bounds.toml (found in the project; its sha256 is not pinned yet",
        "settings: {\"age\":{\"max\":60,\"min\":0}} (from the manifest",
        "limits:   2,000,000,000 fuel · 64 MiB · 2,000 ms per call",
        " of 2,000,000,000 fuel · ",
        " of 64 MiB peak memory · ",
        " of 2,000 ms",
        "compiled: loaded from the compile cache (",
    ] {
        assert!(text.contains(line), "{line:?} missing:\n{}", all(&o));
    }

    // --manifest names another one; --settings still wins for the run.
    std::fs::write(
        project.join("lenient.toml"),
        "name = \"lenient\"\nkind = \"validator\"\nversion = \"0.1.0\"\ndescription = \"d\"\n\
         sha256 = \"\"\n[settings]\nage = { min = 0, max = 100 }\n",
    )
    .unwrap();
    let r = json(&run(&["--manifest", "lenient.toml", "--output", "json"]));
    assert_eq!(r["plugin"], "lenient");
    assert_eq!(r["verdict"], "pass");
    assert_eq!(r["manifest"]["how"], "--manifest");
    let r = json(&run(&["--settings", "{}", "--output", "json"]));
    assert_eq!(r["verdict"], "pass");
    assert!(
        r["settings_from"].as_str().unwrap().contains("--settings"),
        "{r}"
    );

    // Two manifests naming this build: none is guessed, and it says so.
    std::fs::write(
        project.join("my_bounds.toml"),
        "name = \"my_bounds\"\nkind = \"validator\"\nversion = \"9\"\ndescription = \"d\"\n\
         sha256 = \"\"\n",
    )
    .unwrap();
    let o = run(&[]);
    assert_eq!(code(&o), 0, "{}", all(&o));
    assert!(
        out(&o).contains("manifest: none") && out(&o).contains("several manifests"),
        "{}",
        all(&o)
    );
    std::fs::remove_file(project.join("my_bounds.toml")).unwrap();

    // A pinned sha256 must still match the build.
    let project = scaffold_layout(&dir.path().join("pinned"), &"0".repeat(64));
    let o = pde(
        &project,
        cache.path(),
        &["plugin", "test", wasm, "--policy", "policy.json"],
    );
    assert_eq!(code(&o), 6, "{}", all(&o));
}

#[test]
fn errors_say_what_to_do_next() {
    let dir = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let root = dir.path();
    write_policy(root);

    // A plugin name outside a workspace: pass the .wasm path.
    let o = pde(
        root,
        cache.path(),
        &["plugin", "test", "no-test-keys", "--policy", "policy.json"],
    );
    assert_eq!(code(&o), 2, "{}", all(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("pass the built component's path")
            && err.contains("target/wasm32-wasip2/release/no_test_keys.wasm"),
        "{err}"
    );

    // No cache directory at all: compiled, and said not to be cached.
    let wasm = build(&root.join("p"), "1.0.0", "");
    let o = Command::new(env!("CARGO_BIN_EXE_pde"))
        .current_dir(root)
        .args(["plugin", "test"])
        .arg(&wasm)
        .args(["--policy", "policy.json"])
        .env_remove("PDE_CACHE_DIR")
        .env_remove("XDG_CACHE_HOME")
        .env_remove("HOME")
        .output()
        .unwrap();
    assert_eq!(code(&o), 0, "{}", all(&o));
    assert!(
        out(&o).contains("compiled: compiled now, not cached: there is no cache directory"),
        "{}",
        all(&o)
    );

    // A signature by a key the workspace does not list: name the setting.
    let ws = Workspace::new("");
    let other = pde::keys::generate(&ws.root().join("keys"), "other.ed25519").unwrap();
    let wasm = build(&ws.root().join("p"), "1.0.0", "");
    let o = pde(
        ws.root(),
        cache.path(),
        &[
            "plugin",
            "sign",
            wasm.to_str().unwrap(),
            "--key",
            other.secret_path.to_str().unwrap(),
        ],
    );
    assert_eq!(code(&o), 0, "{}", all(&o));
    let o = pde(
        ws.root(),
        cache.path(),
        &["plugin", "verify", wasm.to_str().unwrap()],
    );
    assert_eq!(code(&o), 6, "{}", all(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("untrusted key") && err.contains("[trust] plugin_keys"),
        "{err}"
    );
}

#[test]
fn plugin_list_names_the_signing_key_and_signing_never_records_a_bare_unknown() {
    let ws = Workspace::new("");
    ws.install_examples();
    let cache = tempfile::tempdir().unwrap();
    let o = pde(ws.root(), cache.path(), &["plugin", "list"]);
    assert_eq!(code(&o), 0, "{}", all(&o));
    let text = out(&o);
    assert!(
        text.contains("signed by security team with key keys/security.ed25519.pub ("),
        "{}",
        all(&o)
    );
    let o = pde(
        ws.root(),
        cache.path(),
        &["plugin", "list", "--output", "json"],
    );
    assert!(
        out(&o).contains("keys/security.ed25519.pub"),
        "the JSON names the key too: {}",
        all(&o)
    );

    // Signed in a container (no $USER, no $PDE_ACTOR) without --signer:
    // the signer is the actor pde would record, never "unknown".
    let wasm = ws.root().join("plugins/pii-guard.wasm");
    let o = pde(
        ws.root(),
        cache.path(),
        &[
            "plugin",
            "sign",
            wasm.to_str().unwrap(),
            "--key",
            "keys/security.ed25519",
            "--output",
            "json",
        ],
    );
    assert_eq!(code(&o), 0, "{}", all(&o));
    let signer = json(&o)["signer"].as_str().unwrap().to_string();
    assert!(
        !signer.is_empty() && !signer.starts_with("unknown"),
        "{signer}"
    );
}

#[test]
fn a_router_warning_is_part_of_the_route_step_not_a_raw_log_line() {
    let ws = Workspace::new("");
    let url = ws.agent("dev");
    // Only an `api` service: the example router wants `scheduling` and
    // `portal` for policy 42's other categories, and warns.
    let envs = Workspace::env_toml(
        "dev",
        "",
        &[Svc {
            name: "HMS-API",
            url,
            tags: &["api"],
        }],
    );
    let toml = std::fs::read_to_string(ws.root().join("pde.toml")).unwrap() + &envs;
    std::fs::write(ws.root().join("pde.toml"), toml).unwrap();
    ws.install_examples();
    ws.commit("init");
    let cache = tempfile::tempdir().unwrap();

    let args = ["deploy", "42", "--env", "dev", "--dry-run"];
    let o = pde(ws.root(), cache.path(), &args);
    assert_eq!(code(&o), 0, "{}", all(&o));
    let text = out(&o);
    let route = text.split("\nroute\n").nth(1).unwrap_or_default();
    assert!(
        route.contains(
            "  category-router warning: no service in this environment is tagged `portal`"
        ),
        "under the route step, in the CLI's style:\n{}",
        all(&o)
    );
    assert!(
        !route.contains("category-router warning: category-router:"),
        "{text}"
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !err.contains("WARN") && !err.contains("pde_plugin_host"),
        "no raw log line: {err}"
    );

    let mut json_args = args.to_vec();
    json_args.extend(["--output", "json"]);
    let r = json(&pde(ws.root(), cache.path(), &json_args));
    let log = r["route_log"].as_array().expect("route_log in the report");
    assert!(
        log.iter().any(|n| n["plugin"] == "category-router"
            && n["level"] == "warning"
            && n["message"].as_str().unwrap().contains("`portal`")),
        "{r}"
    );

    // -v still traces it.
    let mut verbose = args.to_vec();
    verbose.push("-v");
    let o = pde(ws.root(), cache.path(), &verbose);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("no service in this environment is tagged"),
        "{}",
        all(&o)
    );
}

#[test]
fn postgres_records_name_the_database_role_that_wrote_them() {
    use support::pg;
    let db = pg::fresh_database();
    let role = pg::psql(pg::database_of(&db), "SELECT current_user");
    let role = role.trim();
    use support::receiver::{Fault, Receiver};
    // A service that holds the push until told, so the lock is held.
    let slow = Receiver::start(Fault::Hang);
    let url = slow.url.clone();
    let ws = Workspace::new("");
    let envs = Workspace::env_toml(
        "production",
        "",
        &[Svc {
            name: "HMS-API",
            url,
            tags: &["api"],
        }],
    );
    let toml = std::fs::read_to_string(ws.root().join("pde.toml")).unwrap() + &envs;
    let toml = toml.replace(
        "state = \".pde\"\n",
        &format!(
            "state = {{ dir = \".pde\", url = \"{db}\", password_env = \"{}\" }}\n",
            pg::PASSWORD_ENV
        ),
    );
    std::fs::write(ws.root().join("pde.toml"), toml).unwrap();
    ws.commit("init");

    let deploy = pg::command(ws.root(), &["deploy", "42", "--env", "production"])
        .env_remove("PDE_ACTOR")
        .env_remove("USER")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while slow.deploys() == 0 {
        assert!(start.elapsed().as_secs() < 60, "the push never arrived");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // The deploy lock's lease names the role, while it is held.
    let holder = pg::psql(pg::database_of(&db), "SELECT holder FROM leases");
    assert!(
        holder.contains(&format!("(database role {role})")),
        "{holder}"
    );
    slow.set_fault(Fault::None);
    let o = deploy.wait_with_output().unwrap();
    assert_eq!(code(&o), 0, "{}", all(&o));

    let o = pg::pde(ws.root(), &["audit", "show", "--output", "json"]);
    assert_eq!(code(&o), 0, "{}", all(&o));
    let records: Vec<Value> = serde_json::from_slice(&o.stdout).unwrap();
    assert!(records.len() > 3, "{records:?}");
    for r in &records {
        assert_eq!(r["data"]["actor_db_role"], role, "{r}");
        assert!(!r["actor"].as_str().unwrap().starts_with("unknown"), "{r}");
        // DESIGN §8: the record's own members are unchanged.
        let keys: Vec<&str> = r.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "actor",
                "data",
                "env",
                "event",
                "hash",
                "policy_id",
                "prev",
                "seq",
                "ts"
            ],
            "{r}"
        );
    }
    // The role is covered by the chain's hashes.
    let o = pg::pde(ws.root(), &["audit", "verify"]);
    assert_eq!(code(&o), 0, "{}", all(&o));
    // The deployment's record in the state (`pde history`) names it too.
    let o = pg::pde(ws.root(), &["history", "42", "--output", "json"]);
    assert_eq!(code(&o), 0, "{}", all(&o));
    assert!(
        out(&o).contains(&format!("(database role {role})")),
        "{}",
        all(&o)
    );
}
