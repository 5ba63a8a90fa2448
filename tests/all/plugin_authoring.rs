//! An outside author's loop, through the real `pde` binary and the real
//! example components, in temp directories that hold no `pde.toml`:
//! `pde plugin test` with `--settings`, `--env` and `--services`, and the
//! per-user compile cache that keeps a second run from recompiling.
// Test code: a failed unwrap is a failed test, with its location.

use crate::support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::{Value, json};
use support::{code, json};

/// `pde -C dir` from `dir` with the per-user cache in `cache` (never the
/// runner's real home) and no `RUST_LOG`; the caller adds the arguments.
pub(crate) fn pde_command(dir: &Path, cache: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pde"));
    cmd.current_dir(dir)
        .arg("-C")
        .arg(dir)
        .env_remove("RUST_LOG")
        .env_remove("XDG_CACHE_HOME")
        .env("PDE_CACHE_DIR", cache);
    cmd
}

/// Runs `pde -C dir ARGS` as [`pde_command`] sets it up.
fn pde(dir: &Path, cache: &Path, args: &[&str]) -> Output {
    pde_command(dir, cache)
        .args(args)
        .output()
        .expect("pde runs")
}

/// Copies a built example component into `dir` as `<stem>.wasm`, alone
/// (no manifest beside it), as an author's fresh build would be.
fn bare(dir: &Path, artifact: &str, stem: &str) -> PathBuf {
    let to = dir.join(format!("{stem}.wasm"));
    std::fs::copy(artifact, &to).unwrap();
    to
}

fn write_policy(dir: &Path, rules: Value) -> PathBuf {
    let path = dir.join("policy.json");
    let doc = json!({
        "id": "42", "version": "1.0.0", "title": "t", "agency": "a",
        "effective": "2030-01-01", "approvals": [], "rules": rules, "config": {}
    });
    std::fs::write(&path, doc.to_string()).unwrap();
    path
}

fn codes(report: &Value) -> Vec<String> {
    report["diagnostics"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["code"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn plugin_test_outside_a_workspace_takes_settings_from_json_or_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let root = dir.path();
    let wasm = bare(root, pde_plugin_artifacts::ELIGIBILITY_BOUNDS, "bounds");
    let wasm = wasm.to_str().unwrap();
    let policy = write_policy(
        root,
        json!([{"key": "min_age", "category": "eligibility", "value": 70, "description": "senior"}]),
    );
    let policy = policy.to_str().unwrap();
    let run = |extra: &[&str]| {
        let mut args = vec![
            "plugin", "test", wasm, "--policy", policy, "--output", "json",
        ];
        args.extend_from_slice(extra);
        pde(root, cache.path(), &args)
    };

    // The plugin's defaults (age up to 120): 70 passes.
    let o = run(&[]);
    assert_eq!(code(&o), 0, "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(json(&o)["verdict"], "pass");

    // Inline JSON settings make 70 too old.
    let o = run(&["--settings", r#"{"age": {"min": 0, "max": 60}}"#]);
    assert_eq!(code(&o), 3, "{}", String::from_utf8_lossy(&o.stderr));
    let report = json(&o);
    assert_eq!(report["verdict"], "fail");
    assert_eq!(codes(&report), vec!["eligibility.age-range"]);
    assert_eq!(report["settings"]["age"]["max"], 60);

    // The same from a TOML file, and from a JSON file.
    let toml_file = root.join("settings.toml");
    std::fs::write(&toml_file, "age = { min = 0, max = 60 }\n").unwrap();
    let o = run(&["--settings", toml_file.to_str().unwrap()]);
    assert_eq!(code(&o), 3, "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(codes(&json(&o)), vec!["eligibility.age-range"]);
    let json_file = root.join("settings.json");
    std::fs::write(&json_file, r#"{"age": {"min": 75, "max": 120}}"#).unwrap();
    let o = run(&["--settings", json_file.to_str().unwrap()]);
    assert_eq!(code(&o), 3, "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(codes(&json(&o)), vec!["eligibility.age-range"]);

    // Settings that are not a table, or not there, are usage errors.
    for bad in ["[1, 2]", "{not json", "no-such-file.toml"] {
        let o = run(&["--settings", bad]);
        assert_eq!(code(&o), 2, "{bad}: {}", String::from_utf8_lossy(&o.stdout));
    }

    // With a manifest beside the component, --settings replaces its [settings].
    let bytes = std::fs::read(wasm).unwrap();
    let sha = pde::plugin::sha256_hex(&bytes);
    std::fs::write(
        root.join("bounds.toml"),
        format!(
            "name = \"bounds\"\nkind = \"validator\"\nversion = \"0.1.0\"\nsha256 = \"{sha}\"\n\
             description = \"d\"\n[settings]\nage = {{ min = 0, max = 60 }}\n"
        ),
    )
    .unwrap();
    let o = run(&[]);
    assert_eq!(code(&o), 3, "the manifest's settings apply");
    let o = run(&["--settings", "{}"]);
    assert_eq!(code(&o), 0, "{}", String::from_utf8_lossy(&o.stdout));
    // ... for this run only: the manifest is untouched.
    let manifest = std::fs::read_to_string(root.join("bounds.toml")).unwrap();
    assert!(manifest.contains("max = 60"), "{manifest}");
}

#[test]
fn plugin_test_passes_env_into_the_call_context() {
    let dir = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let root = dir.path();
    let wasm = bare(root, pde_plugin_artifacts::MISBEHAVE, "echo");
    let policy = write_policy(root, json!([]));
    let o = pde(
        root,
        cache.path(),
        &[
            "plugin",
            "test",
            wasm.to_str().unwrap(),
            "--policy",
            policy.to_str().unwrap(),
            "--settings",
            r#"{"mode": "context", "extra": 7}"#,
            "--env",
            "staging",
            "--output",
            "json",
        ],
    );
    assert_eq!(code(&o), 0, "{}", String::from_utf8_lossy(&o.stderr));
    let report = json(&o);
    let message = report["diagnostics"][0]["message"].as_str().unwrap();
    assert!(
        message.starts_with(r#"environment="staging" settings={"#),
        "what the plugin saw: {message}"
    );
    assert!(message.contains(r#""extra":7"#), "{message}");
}

#[test]
fn plugin_test_shows_a_0_2_0_plugin_the_active_version_of_a_bundle_or_document() {
    let dir = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let root = dir.path();
    let change = bare(root, pde_plugin_artifacts::BENEFIT_CHANGE, "change");
    let legacy = bare(root, pde_plugin_artifacts::LEGACY_VALIDATOR, "legacy");
    let rule = |amount: u32| {
        json!([{"key": "heating.amount", "category": "benefits", "value": amount,
                "description": "monthly"}])
    };
    let policy = write_policy(root, rule(100)); // effective 2030-01-01
    let v1 = json!({
        "id": "42", "version": "0.9.0", "title": "t", "agency": "a",
        "effective": "2029-01-01", "approvals": [], "rules": rule(200), "config": {}
    });
    std::fs::write(root.join("v1.json"), v1.to_string()).unwrap();
    // The same document as a sealed bundle: its digest is checked and shown.
    let bundle = pde::bundle::Bundle::seal(
        pde::bundle::Payload {
            manifest: pde::bundle::Manifest {
                policy_id: "42".into(),
                version: "0.9.0".into(),
                source_commit: "0".repeat(40),
                validators: Vec::new(),
            },
            policy: v1,
        },
        &[],
    )
    .unwrap();
    std::fs::write(root.join("v1.bundle.json"), bundle.to_canonical_bytes()).unwrap();
    let run = |wasm: &Path, active: &str| {
        let o = pde(
            root,
            cache.path(),
            &[
                "plugin",
                "test",
                wasm.to_str().unwrap(),
                "--policy",
                policy.to_str().unwrap(),
                "--env",
                "prod",
                "--settings",
                r#"{"today": "2029-12-01"}"#,
                "--active",
                active,
                "--output",
                "json",
            ],
        );
        (code(&o), json(&o))
    };
    // A 50% cut a month ahead: blocked, against the document's version.
    let (c, report) = run(&change, "v1.json");
    assert_eq!(c, 3, "{report}");
    assert_eq!(
        codes(&report),
        ["benefit-change.short-notice", "benefit-change.compared"]
    );
    assert_eq!(report["active"]["version"], "0.9.0");
    assert_eq!(report["active"]["digest"], "");
    let (c, report) = run(&change, "v1.bundle.json");
    assert_eq!(c, 3, "{report}");
    assert_eq!(report["active"]["digest"], bundle.digest.as_str());
    assert!(
        report["diagnostics"][1]["message"]
            .as_str()
            .unwrap()
            .contains(&bundle.digest),
        "{report}"
    );
    // A bundle that does not hash to its digest is refused (exit 2).
    let mut edited: Value = serde_json::from_slice(&bundle.to_canonical_bytes()).unwrap();
    edited["payload"]["policy"]["rules"][0]["value"] = json!(101);
    std::fs::write(root.join("edited.bundle.json"), edited.to_string()).unwrap();
    let o = pde(
        root,
        cache.path(),
        &[
            "plugin",
            "test",
            change.to_str().unwrap(),
            "--policy",
            policy.to_str().unwrap(),
            "--active",
            "edited.bundle.json",
        ],
    );
    assert_eq!(code(&o), 2, "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("not a usable bundle"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // A 0.1.0 plugin is not told: its report says so and it runs as before.
    let (c, report) = run(&legacy, "v1.json");
    assert_eq!(c, 0, "{report}");
    assert_eq!(report["wit_version"], "0.1.0");
    assert_eq!(report["active"], Value::Null);
    assert_eq!(codes(&report), ["legacy.seen"]);
    // And inspect says which version each was built against.
    for (wasm, says) in [
        (
            &change,
            "0.2.0 supported (bound by the 0.2.0 module; its context carries the active policy)",
        ),
        (
            &legacy,
            "0.1.0 supported (bound by the 0.1.0 module; not told the active policy",
        ),
    ] {
        let o = pde(
            root,
            cache.path(),
            &["plugin", "inspect", wasm.to_str().unwrap()],
        );
        assert_eq!(code(&o), 0);
        let text = String::from_utf8_lossy(&o.stdout);
        assert!(
            text.contains(&format!("pde:plugin version: {says}")),
            "{text}"
        );
    }
}

#[test]
fn plugin_test_offers_a_router_the_services_of_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let root = dir.path();
    let wasm = bare(root, pde_plugin_artifacts::CATEGORY_ROUTER, "router");
    let policy = write_policy(
        root,
        json!([
            {"key": "min_age", "category": "eligibility", "value": 18, "description": "adult"},
            {"key": "intake.form", "category": "forms", "value": {}, "description": "form"}
        ]),
    );
    let toml_services = root.join("services.toml");
    std::fs::write(
        &toml_services,
        "[[services]]\nname = \"HMS-API\"\nurl = \"https://api.example.gov\"\ntags = [\"api\"]\n\
         [[services]]\nname = \"Portal\"\nurl = \"https://portal.example.gov\"\ntags = [\"portal\"]\n\
         labels = { team = \"web\" }\n\
         [[services]]\nname = \"Mailer\"\nurl = \"https://mail.example.gov\"\ntags = [\"mail\"]\n",
    )
    .unwrap();
    let json_services = root.join("services.json");
    std::fs::write(
        &json_services,
        r#"[{"name": "HMS-API", "url": "https://api.example.gov", "tags": ["api"]},
            {"name": "Mailer", "url": "https://mail.example.gov", "tags": ["mail"]}]"#,
    )
    .unwrap();
    let route = |services: &Path| {
        pde(
            root,
            cache.path(),
            &[
                "plugin",
                "test",
                wasm.to_str().unwrap(),
                "--policy",
                policy.to_str().unwrap(),
                "--services",
                services.to_str().unwrap(),
                "--env",
                "production",
                "--output",
                "json",
            ],
        )
    };
    let routed = |o: &Output| -> Vec<String> {
        assert_eq!(code(o), 0, "{}", String::from_utf8_lossy(&o.stderr));
        let mut names: Vec<String> = json(o)["routes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["service"].as_str().unwrap().to_string())
            .collect();
        names.sort();
        names
    };
    assert_eq!(routed(&route(&toml_services)), vec!["HMS-API", "Portal"]);
    assert_eq!(routed(&route(&json_services)), vec!["HMS-API"]);

    // Checked as strictly as pde.toml: an unknown field or a duplicate name is refused.
    let typo = root.join("typo.toml");
    std::fs::write(
        &typo,
        "[[services]]\nname = \"A\"\nurl = \"https://a\"\ntagz = [\"api\"]\n",
    )
    .unwrap();
    let o = route(&typo);
    assert_eq!(code(&o), 2, "{}", String::from_utf8_lossy(&o.stdout));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("tagz")
            || String::from_utf8_lossy(&o.stderr).contains("tagz")
    );
    let twice = root.join("twice.json");
    std::fs::write(
        &twice,
        r#"[{"name": "A", "url": "https://a"}, {"name": "A", "url": "https://b"}]"#,
    )
    .unwrap();
    assert_eq!(code(&route(&twice)), 2);
}

fn entries(dir: &Path) -> Vec<PathBuf> {
    match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "cwasm"))
            .collect(),
        Err(_) => Vec::new(),
    }
}

#[test]
fn a_second_plugin_test_outside_a_workspace_hits_the_per_user_cache() {
    let dir = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let root = dir.path();
    let wasm = bare(root, pde_plugin_artifacts::ELIGIBILITY_BOUNDS, "bounds");
    let wasm = wasm.to_str().unwrap();
    let policy = write_policy(root, json!([]));
    let policy = policy.to_str().unwrap();
    let test = || {
        let o = pde(
            root,
            cache.path(),
            &[
                "plugin", "test", wasm, "--policy", policy, "--output", "json",
            ],
        );
        assert_eq!(code(&o), 0, "{}", String::from_utf8_lossy(&o.stderr));
        json(&o)["loaded_from_cache"].clone()
    };

    assert_eq!(test(), json!(false), "a cold cache compiles");
    let stored = entries(&cache.path().join("plugins"));
    assert_eq!(stored.len(), 1, "one entry under $PDE_CACHE_DIR/plugins");
    let sha = pde::plugin::sha256_hex(&std::fs::read(wasm).unwrap());
    assert!(
        stored[0]
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with(&sha),
        "keyed by the wasm's digest: {stored:?}"
    );
    assert_eq!(
        test(),
        json!(true),
        "the second run loads the compiled form"
    );

    // inspect uses the same cache.
    let o = pde(
        root,
        cache.path(),
        &["plugin", "inspect", wasm, "--output", "json"],
    );
    assert_eq!(code(&o), 0, "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(json(&o)["loaded_from_cache"], json!(true));

    // A corrupted entry is never trusted: it is discarded and recompiled.
    let mut bytes = std::fs::read(&stored[0]).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&stored[0], &bytes).unwrap();
    assert_eq!(test(), json!(false), "a corrupt entry is a miss");
    assert_eq!(test(), json!(true), "and was rewritten");
    // A foreign file under the entry's name is a miss too.
    std::fs::write(&stored[0], b"\0asm not a pde cache entry").unwrap();
    assert_eq!(test(), json!(false));

    // Without $PDE_CACHE_DIR, $XDG_CACHE_HOME/pde is used.
    let xdg = tempfile::tempdir().unwrap();
    let run_xdg = || {
        let o = Command::new(env!("CARGO_BIN_EXE_pde"))
            .arg("-C")
            .arg(root)
            .args([
                "plugin", "test", wasm, "--policy", policy, "--output", "json",
            ])
            .env_remove("RUST_LOG")
            .env_remove("PDE_CACHE_DIR")
            .env("XDG_CACHE_HOME", xdg.path())
            .output()
            .unwrap();
        assert_eq!(code(&o), 0, "{}", String::from_utf8_lossy(&o.stderr));
        json(&o)["loaded_from_cache"].clone()
    };
    assert_eq!(run_xdg(), json!(false));
    assert_eq!(entries(&xdg.path().join("pde").join("plugins")).len(), 1);
    assert_eq!(run_xdg(), json!(true));
}

// ------------------------------------------------------------ the SDK crate

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Every file under `a`, relative, with its bytes.
fn tree(a: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<(PathBuf, Vec<u8>)>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(root, &path, out);
            } else if path.extension().is_some_and(|e| e == "wit") {
                let rel = path.strip_prefix(root).unwrap().to_path_buf();
                out.push((rel, std::fs::read(&path).unwrap()));
            }
        }
    }
    let mut out = Vec::new();
    walk(a, a, &mut out);
    out.sort();
    out
}

#[test]
fn the_sdk_carries_an_exact_copy_of_the_wit() {
    // One source of truth: `wit/` is the contract; the SDK's copy exists only
    // so the crate can be packaged. Fix a failure with
    // `rm -r plugins/sdk/wit && cp -r wit plugins/sdk/wit` (minus README.md).
    let root = repo();
    let contract = tree(&root.join("wit"));
    let copy = tree(&root.join("plugins/sdk/wit"));
    assert!(!contract.is_empty());
    let names = |t: &[(PathBuf, Vec<u8>)]| t.iter().map(|(p, _)| p.clone()).collect::<Vec<_>>();
    assert_eq!(names(&copy), names(&contract), "the same .wit files");
    for ((path, a), (_, b)) in contract.iter().zip(&copy) {
        assert!(
            a == b,
            "plugins/sdk/wit/{} differs from wit/",
            path.display()
        );
    }
}

fn cargo() -> Command {
    let mut cmd = Command::new(option_env!("CARGO").unwrap_or("cargo"));
    for var in pde_plugin_artifacts::OUTER_CARGO_VARS {
        cmd.env_remove(var);
    }
    cmd
}

#[test]
fn the_sdk_packages_with_no_file_outside_its_crate() {
    let o = cargo()
        .current_dir(repo())
        .args([
            "package",
            "--list",
            "-p",
            "pde-plugin",
            "--allow-dirty",
            "--offline",
        ])
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{listed}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let files: Vec<&str> = listed.lines().collect();
    for needed in [
        "Cargo.toml",
        "src/lib.rs",
        "src/bindings.rs",
        "wit/v0.1.0/plugin.wit",
        "wit/v0.2.0/plugin.wit",
        "wit/v0.3.0/plugin.wit",
    ] {
        assert!(files.contains(&needed), "{needed} not packaged: {files:?}");
    }
    for f in &files {
        assert!(
            !f.starts_with("..") && !f.starts_with('/') && !f.contains("/../"),
            "{f} lies outside the crate"
        );
    }
    // Nothing inherited from the pde workspace.
    let manifest = std::fs::read_to_string(repo().join("plugins/sdk/Cargo.toml")).unwrap();
    assert!(!manifest.contains("workspace = true"), "{manifest}");
    assert!(!manifest.contains(".workspace"), "{manifest}");
}

// ------------------------------------------------------------ plugin new

/// A target dir kept between runs, so only the first run compiles the
/// scaffold's dependencies.
fn scaffold_target() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("plugin-new")
}

/// Builds the scaffold at `project` for wasm32-wasip2 as its README says,
/// returning the component.
fn build_scaffold(project: &Path, crate_name: &str) -> PathBuf {
    // The workspace's lock file pins the versions already downloaded, so the
    // build can run offline.
    std::fs::copy(repo().join("Cargo.lock"), project.join("Cargo.lock")).unwrap();
    let o = cargo()
        .current_dir(project)
        .args([
            "build",
            "--target",
            "wasm32-wasip2",
            "--release",
            "--offline",
        ])
        .env("CARGO_TARGET_DIR", scaffold_target())
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "the generated project does not build:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let wasm = scaffold_target().join(format!("wasm32-wasip2/release/{crate_name}.wasm"));
    assert!(wasm.is_file(), "{} not built", wasm.display());
    wasm
}

#[test]
fn plugin_new_scaffolds_a_validator_and_a_router_that_build_and_pass_plugin_test() {
    let dir = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let root = dir.path();
    let sdk = repo().join("plugins/sdk");
    let sdk = sdk.to_str().unwrap();

    let o = pde(
        root,
        cache.path(),
        &[
            "plugin",
            "new",
            "desc-check",
            "--kind",
            "validator",
            "--sdk-path",
            sdk,
            "--output",
            "json",
        ],
    );
    assert_eq!(code(&o), 0, "{}", String::from_utf8_lossy(&o.stderr));
    let made = json(&o);
    assert_eq!(made["wasm"], "target/wasm32-wasip2/release/desc_check.wasm");
    let project = root.join("desc-check");
    for f in [
        "Cargo.toml",
        "src/lib.rs",
        "desc-check.toml",
        "README.md",
        "policy.json",
    ] {
        assert!(project.join(f).is_file(), "{f} not generated");
    }
    let readme = std::fs::read_to_string(project.join("README.md")).unwrap();
    assert!(readme.contains("cargo build --target wasm32-wasip2 --release"));
    assert!(!readme.contains("{{"), "a placeholder left: {readme}");

    // A second `new` over it, and a bad name, are refused.
    let again = pde(
        root,
        cache.path(),
        &[
            "plugin",
            "new",
            "desc-check",
            "--kind",
            "validator",
            "--sdk-path",
            sdk,
        ],
    );
    assert_eq!(code(&again), 2);
    let bad = pde(
        root,
        cache.path(),
        &["plugin", "new", "Bad_Name", "--kind", "router"],
    );
    assert_eq!(code(&bad), 2);

    let wasm = build_scaffold(&project, "desc_check");
    let wasm = wasm.to_str().unwrap();
    let test = |policy: &Path, extra: &[&str]| {
        let mut args = vec![
            "plugin",
            "test",
            wasm,
            "--policy",
            policy.to_str().unwrap(),
            "--output",
            "json",
        ];
        args.extend_from_slice(extra);
        let o = pde(&project, cache.path(), &args);
        (code(&o), json(&o))
    };
    // As generated: its sample policy passes, in production too.
    let (c, report) = test(&project.join("policy.json"), &["--env", "production"]);
    assert_eq!(c, 0, "{report}");
    assert_eq!(report["verdict"], "pass");
    assert!(
        report["log"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l.as_str().unwrap().contains("checked 2 rule(s)")),
        "{report}"
    );
    // Its example check bites: a rule without a description fails in
    // production, warns in dev, and fails in dev once the settings say so.
    let mut doc: Value =
        serde_json::from_str(&std::fs::read_to_string(project.join("policy.json")).unwrap())
            .unwrap();
    doc["rules"][1]["description"] = json!("");
    let undescribed = project.join("undescribed.json");
    std::fs::write(&undescribed, doc.to_string()).unwrap();
    let (c, report) = test(&undescribed, &["--env", "production"]);
    assert_eq!(c, 3, "{report}");
    assert_eq!(codes(&report), vec!["desc-check.description-missing"]);
    assert_eq!(report["diagnostics"][0]["path"], "/rules/1/description");
    let (c, report) = test(&undescribed, &["--env", "dev"]);
    assert_eq!(c, 0, "{report}");
    assert_eq!(report["diagnostics"][0]["severity"], "warning");
    let (c, _) = test(
        &undescribed,
        &[
            "--env",
            "dev",
            "--settings",
            r#"{"strict_environments": ["dev"]}"#,
        ],
    );
    assert_eq!(c, 3);
    // Built with the SDK against pde:plugin@0.2.0, it is shown the active
    // version given with --active: a rule that version had and the policy
    // dropped is a warning of the template's second check.
    let mut older: Value =
        serde_json::from_str(&std::fs::read_to_string(project.join("policy.json")).unwrap())
            .unwrap();
    older["version"] = json!("0.9.0");
    older["rules"].as_array_mut().unwrap().push(json!(
        {"key": "retired.rule", "category": "forms", "value": 1, "description": "d"}
    ));
    let active = project.join("active.json");
    std::fs::write(&active, older.to_string()).unwrap();
    let (c, report) = test(
        &project.join("policy.json"),
        &["--env", "production", "--active", active.to_str().unwrap()],
    );
    assert_eq!(c, 0, "{report}");
    assert_eq!(codes(&report), vec!["desc-check.rule-removed"]);
    assert!(
        report["diagnostics"][0]["message"]
            .as_str()
            .unwrap()
            .contains("\"retired.rule\" was removed since the active version 0.9.0"),
        "{report}"
    );
    assert_eq!(report["wit_version"], "0.2.0");
    assert_eq!(report["active"]["version"], "0.9.0");
    assert_eq!(report["active"]["digest"], "");
    // Its manifest template is a manifest pde reads, once sha256 is filled in.
    let manifest = std::fs::read_to_string(project.join("desc-check.toml")).unwrap();
    let sha = pde::plugin::sha256_hex(&std::fs::read(wasm).unwrap());
    let installed = root.join("installed");
    std::fs::create_dir_all(&installed).unwrap();
    std::fs::copy(wasm, installed.join("desc-check.wasm")).unwrap();
    std::fs::write(
        installed.join("desc-check.toml"),
        manifest.replace("sha256 = \"\"", &format!("sha256 = \"{sha}\"")),
    )
    .unwrap();
    let installed_wasm = installed.join("desc-check.wasm");
    let mut args = vec!["plugin", "test", installed_wasm.to_str().unwrap()];
    args.extend([
        "--policy",
        undescribed.to_str().unwrap(),
        "--env",
        "production",
    ]);
    args.extend(["--output", "json"]);
    let o = pde(root, cache.path(), &args);
    assert_eq!(code(&o), 3, "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(json(&o)["plugin"], "desc-check");

    // The rest of the author's path: into a workspace made by `pde init`,
    // signed with the author's own key (outside the workspace's keys/) and
    // trusted in [trust], as the README's install steps say.
    let ws = root.join("policy-repo");
    support::init_workspace(&ws, cache.path());
    std::fs::copy(
        installed.join("desc-check.wasm"),
        ws.join("plugins/desc-check.wasm"),
    )
    .unwrap();
    std::fs::copy(
        installed.join("desc-check.toml"),
        ws.join("plugins/desc-check.toml"),
    )
    .unwrap();
    let author_keys = root.join("author-keys");
    let author_keys = author_keys.to_str().unwrap();
    let o = pde(
        &ws,
        cache.path(),
        &["keygen", "--out", author_keys, "--name", "security.ed25519"],
    );
    assert_eq!(code(&o), 0, "{}", String::from_utf8_lossy(&o.stderr));
    let key = format!("{author_keys}/security.ed25519");
    let o = pde(
        &ws,
        cache.path(),
        &[
            "plugin",
            "sign",
            "plugins/desc-check.wasm",
            "--key",
            &key,
            "--signer",
            "Security team",
        ],
    );
    assert_eq!(code(&o), 0, "{}", String::from_utf8_lossy(&o.stderr));
    let validate = |ws: &Path| {
        let o = pde(
            ws,
            cache.path(),
            &["validate", "42", "--env", "production", "--output", "json"],
        );
        (code(&o), String::from_utf8_lossy(&o.stdout).into_owned())
    };
    // Signed but not trusted: production refuses it.
    let (c, out) = validate(&ws);
    assert_eq!(c, 6, "{out}");
    std::fs::copy(format!("{key}.pub"), ws.join("keys/security.ed25519.pub")).unwrap();
    let config = std::fs::read_to_string(ws.join("pde.toml")).unwrap();
    std::fs::write(
        ws.join("pde.toml"),
        config.replace(
            "plugin_keys = []",
            "plugin_keys = [\"keys/security.ed25519.pub\"]",
        ),
    )
    .unwrap();
    let (c, out) = validate(&ws);
    assert_eq!(c, 0, "{out}");
    assert!(out.contains("desc-check"), "the plugin ran: {out}");

    // The router template, with the sample services it ships.
    let o = pde(
        root,
        cache.path(),
        &[
            "plugin",
            "new",
            "tag-router",
            "--kind",
            "router",
            "--sdk-path",
            sdk,
        ],
    );
    assert_eq!(code(&o), 0, "{}", String::from_utf8_lossy(&o.stderr));
    let project = root.join("tag-router");
    let wasm = build_scaffold(&project, "tag_router");
    let o = pde(
        &project,
        cache.path(),
        &[
            "plugin",
            "test",
            wasm.to_str().unwrap(),
            "--policy",
            "policy.json",
            "--services",
            "services.toml",
            "--output",
            "json",
        ],
    );
    assert_eq!(code(&o), 0, "{}", String::from_utf8_lossy(&o.stderr));
    let routes: Vec<String> = json(&o)["routes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["service"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(routes, vec!["HMS-API", "Portal"]);
}

#[test]
fn plugin_new_honours_dir_and_picks_the_sdk_source() {
    let dir = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let root = dir.path();
    // Without --sdk-path the manifest names the published SDK and no local
    // path, although this binary was built from a checkout whose
    // plugins/sdk exists (issue 21 gap: it used to point there).
    assert!(repo().join("plugins/sdk/Cargo.toml").is_file());
    let o = pde(
        root,
        cache.path(),
        &[
            "plugin",
            "new",
            "by-default",
            "--kind",
            "router",
            "--dir",
            "sub/proj",
        ],
    );
    assert_eq!(code(&o), 0, "{}", String::from_utf8_lossy(&o.stderr));
    let cargo_toml = std::fs::read_to_string(root.join("sub/proj/Cargo.toml")).unwrap();
    assert!(
        cargo_toml.contains(r#"pde-plugin = "0.2""#),
        "the published SDK: {cargo_toml}"
    );
    assert!(
        !cargo_toml.contains("path =") && !cargo_toml.contains("plugins/sdk"),
        "a local path in a scaffold made without --sdk-path: {cargo_toml}"
    );
    assert!(cargo_toml.contains("name = \"by-default\""), "{cargo_toml}");
    assert!(root.join("sub/proj/services.toml").is_file());
    assert!(!root.join("by-default").exists());

    // With --sdk-path, that path.
    let o = pde(
        root,
        cache.path(),
        &[
            "plugin",
            "new",
            "by-path",
            "--kind",
            "router",
            "--sdk-path",
            repo().join("plugins/sdk").to_str().unwrap(),
        ],
    );
    assert_eq!(code(&o), 0, "{}", String::from_utf8_lossy(&o.stderr));
    let cargo_toml = std::fs::read_to_string(root.join("by-path/Cargo.toml")).unwrap();
    let sdk = repo().join("plugins/sdk").canonicalize().unwrap();
    assert!(
        cargo_toml.contains(&format!(
            "pde-plugin = {{ path = {:?} }}",
            sdk.display().to_string()
        )),
        "{cargo_toml}"
    );

    let o = pde(
        root,
        cache.path(),
        &[
            "plugin",
            "new",
            "by-git",
            "--kind",
            "validator",
            "--sdk-git",
            "https://git.example.gov/pde.git",
        ],
    );
    assert_eq!(code(&o), 0, "{}", String::from_utf8_lossy(&o.stderr));
    let cargo_toml = std::fs::read_to_string(root.join("by-git/Cargo.toml")).unwrap();
    assert!(
        cargo_toml.contains(r#"pde-plugin = { git = "https://git.example.gov/pde.git" }"#),
        "{cargo_toml}"
    );
    // Both at once is a usage error, and so is an SDK path without a crate.
    let o = pde(
        root,
        cache.path(),
        &[
            "plugin",
            "new",
            "both",
            "--kind",
            "router",
            "--sdk-git",
            "u",
            "--sdk-path",
            ".",
        ],
    );
    assert_eq!(code(&o), 2);
    let o = pde(
        root,
        cache.path(),
        &[
            "plugin",
            "new",
            "nowhere",
            "--kind",
            "router",
            "--sdk-path",
            ".",
        ],
    );
    assert_eq!(code(&o), 2);
    assert!(!root.join("nowhere").exists(), "nothing written on failure");
}

/// A scaffold's README ran `pde keygen` without `--name`, which writes the
/// workspace's own key name `release.ed25519` (issue 24 §4); and the Python
/// guide and the scaffold disagreed on how long a first compile takes.
#[test]
fn scaffold_readmes_name_their_keys_and_agree_with_the_guide() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let guide = std::fs::read_to_string(root.join("docs/plugin-authoring.md")).unwrap();
    for lang in ["plugin-rust", "plugin-python"] {
        let path = root
            .join("host/cli/templates")
            .join(lang)
            .join("README.md.tmpl");
        let readme = std::fs::read_to_string(&path).unwrap();
        let keygens: Vec<&str> = readme
            .lines()
            .filter(|l| l.contains("pde keygen"))
            .collect();
        assert!(!keygens.is_empty(), "{}: no keygen step", path.display());
        for line in keygens {
            assert!(line.contains("--name "), "{}: {line}", path.display());
        }
        if lang == "plugin-python" {
            let readme = readme.split_whitespace().collect::<Vec<_>>().join(" ");
            let guide = guide.split_whitespace().collect::<Vec<_>>().join(" ");
            for figure in ["about 20 s", "up to a minute"] {
                assert!(
                    readme.contains(figure) && guide.contains(figure),
                    "{figure}"
                );
            }
        }
    }
}
