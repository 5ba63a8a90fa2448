//! Python as a plugin language, end to end with the real `pde` binary and
//! componentize-py from the test venv (`PDE_TEST_PYTHON`, made by
//! scripts/lib.sh `ensure_pyenv` from scripts/requirements-test.txt):
//! - the Python example `plugins/python/eligibility-bounds-py` finds exactly
//!   what the Rust `eligibility-bounds` finds on the same policies;
//! - the guide's Python section (docs/plugin-authoring.md), run as written
//!   from an empty home directory to a signed plugin that `pde validate`
//!   runs in a workspace;
//! - `pde plugin new --lang python --kind router` builds and routes as
//!   generated.
//!
//! Every `pde` run shares one per-user compile cache, so each Python
//! component (18 MB) is compiled once per run of this binary.
// Test code: a failed unwrap is a failed test, with its location.

use crate::support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use serde_json::{Value, json};
use support::{both, code, json, pde_env, policy_42};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The venv's bin directory (its python, pip and componentize-py). Unset is
/// a failure, not a skip: these tests are the evidence that Python plugins
/// work.
fn venv_bin() -> PathBuf {
    let python = std::env::var_os("PDE_TEST_PYTHON").unwrap_or_else(|| {
        panic!(
            "PDE_TEST_PYTHON is not set: these tests need componentize-py from the test venv. \
             Run `bash scripts/test.sh`, or first: `. scripts/lib.sh; export PDE_TEST_PYTHON=$(ensure_pyenv target)/bin/python`."
        )
    });
    let bin = Path::new(&python).parent().unwrap().to_path_buf();
    assert!(
        bin.join("componentize-py").is_file(),
        "{} has no componentize-py; the venv predates scripts/requirements-test.txt's pin",
        bin.display()
    );
    bin
}

/// The compile cache every `pde` run of this binary shares, emptied once
/// per run (each build of a Python component is a new 18 MB digest, and
/// old entries would pile up).
fn cache() -> PathBuf {
    static CACHE: OnceLock<PathBuf> = OnceLock::new();
    CACHE
        .get_or_init(|| {
            let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("python-plugin-cache");
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            dir
        })
        .clone()
}

/// The key that authenticates the shared cache's entries, outside it. One
/// for every run: `sh` gives each author a `HOME` of their own, and entries
/// written under one home's key would be discarded (and the 18 MB component
/// recompiled) under another's.
fn cache_key() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("python-plugin-cache.key")
}

/// Runs `pde -C dir ARGS` with the shared cache.
fn pde(dir: &Path, args: &[&str]) -> Output {
    pde_env(
        dir,
        args,
        &[
            ("PDE_CACHE_DIR", cache().to_str().unwrap()),
            ("PDE_CACHE_KEY_FILE", cache_key().to_str().unwrap()),
        ],
    )
}

/// Runs a shell block as an author would type it: `bash -eu` in `dir`,
/// with `HOME` at `home`, the venv and pde first on PATH.
fn sh(dir: &Path, home: &Path, script: &str) -> Output {
    let pde_dir = Path::new(env!("CARGO_BIN_EXE_pde")).parent().unwrap();
    let path = std::env::join_paths(
        [venv_bin(), pde_dir.to_path_buf()]
            .into_iter()
            .chain(std::env::split_paths(&std::env::var_os("PATH").unwrap())),
    )
    .unwrap();
    Command::new("bash")
        .args(["-euo", "pipefail", "-c", script])
        .current_dir(dir)
        .env("HOME", home)
        .env("PATH", path)
        .env("PDE_CACHE_DIR", cache())
        .env("PDE_CACHE_KEY_FILE", cache_key())
        .env_remove("RUST_LOG")
        .env_remove("XDG_CACHE_HOME")
        .env_remove("VIRTUAL_ENV")
        .output()
        .expect("bash runs")
}

fn componentize(project: &Path, world: &str, wit: &Path, out: &Path) {
    let o = Command::new(venv_bin().join("componentize-py"))
        .current_dir(project)
        .arg("--wit-path")
        .arg(wit)
        .args(["--world", world, "componentize", "app", "-o"])
        .arg(out)
        .output()
        .unwrap();
    assert!(o.status.success(), "componentize-py: {}", both(&o));
}

/// The componentize-py release scripts/requirements-test.txt pins.
fn pinned_componentize_py() -> String {
    let reqs = std::fs::read_to_string(repo().join("scripts/requirements-test.txt")).unwrap();
    reqs.lines()
        .find_map(|l| l.strip_prefix("componentize-py=="))
        .expect("requirements-test.txt pins componentize-py")
        .trim()
        .to_string()
}

// ------------------------------------------------- the example, against Rust

/// `pde plugin test WASM --policy … --settings … --output json`: exit
/// code and report.
fn plugin_test(dir: &Path, wasm: &Path, policy: &Value, settings: &Value) -> (i32, Value) {
    let file = dir.join("policy.json");
    std::fs::write(&file, policy.to_string()).unwrap();
    let settings = settings.to_string();
    let o = pde(
        dir,
        &[
            "plugin",
            "test",
            wasm.to_str().unwrap(),
            "--policy",
            file.to_str().unwrap(),
            "--settings",
            &settings,
            "--output",
            "json",
        ],
    );
    let c = code(&o);
    (c, if c == 5 { json!(null) } else { json(&o) })
}

/// The diagnostics without `source` (the plugin's file name).
fn findings(report: &Value) -> Vec<Value> {
    report["diagnostics"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            let mut d = d.clone();
            d.as_object_mut().unwrap().remove("source");
            d
        })
        .collect()
}

fn with_rules(rules: Value) -> Value {
    let mut p = policy_42("1.0.0");
    p["rules"] = rules;
    p
}

#[test]
fn the_python_example_finds_exactly_what_the_rust_plugin_finds() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let example = repo().join("plugins/python/eligibility-bounds-py");
    // Built from a copy, so Python's __pycache__ stays out of the checkout.
    let src = root.join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::copy(example.join("app.py"), src.join("app.py")).unwrap();
    let py = root.join("eligibility-bounds-py.wasm");
    componentize(&src, "validator", &repo().join("wit/v0.1.0"), &py);
    let rust = PathBuf::from(pde_plugin_artifacts::ELIGIBILITY_BOUNDS);

    // Both manifests ship the same settings.
    let settings_of = |manifest: &Path| {
        let text = std::fs::read_to_string(manifest).unwrap();
        text.split_once("[settings]").unwrap().1.to_string()
    };
    assert_eq!(
        settings_of(&example.join("eligibility-bounds-py.toml")),
        settings_of(&repo().join("plugins/eligibility-bounds/eligibility-bounds.toml"))
    );
    let shipped = json!({"categories": ["eligibility"], "age": {"min": 0, "max": 120},
                         "income": {"min": 0, "max": 1000000}, "percent": {"min": 0, "max": 100}});

    let awkward = with_rules(json!([
        {"key": "snap.max_age", "category": "eligibility", "value": 650, "description": "d"},
        {"key": "snap.max_income", "category": "eligibility", "value": -1, "description": "d"},
        {"key": "Copay-PCT", "category": "eligibility", "value": 250.5, "description": "d"},
        {"key": "copay_pct", "category": "eligibility", "value": 0.2, "description": "d"},
        {"key": "age_band", "category": "eligibility", "value": {"min": 70, "max": 20}},
        {"key": "age_cap", "category": "eligibility", "value": {"min": "0", "max": 200}},
        {"key": "income_cap", "category": "eligibility", "value": "lots"},
        {"key": "wages", "category": "eligibility", "value": true},
        {"key": "salary", "category": "eligibility", "value": null},
        {"key": "earnings", "category": "eligibility"},
        {"key": "ages", "category": "eligibility", "value": {"lo": 1, "hi": [2, {"b": 1, "a": "é"}]}},
        {"key": "pct", "category": "eligibility", "value": 1e300},
        {"key": "pct", "category": "eligibility", "value": 0.000_000_1},
        {"key": "age", "category": "eligibility", "value": -0.0},
        "not a rule",
        {"key": "page_limit", "category": "eligibility", "value": 999},
        {"key": "max_age", "category": "payments", "value": 999},
        {"key": 7, "category": "eligibility", "value": 999}
    ]));
    let mut no_rules = policy_42("1.0.0");
    no_rules["rules"] = json!({"not": "a list"});
    let county = {
        let mut p = with_rules(json!([
            {"key": "max_income", "category": "eligibility", "value": 60000},
            {"key": "min_age", "category": "benefits", "value": 10}
        ]));
        p["agency"] = json!("County");
        p
    };
    let per_agency = json!({
        "income": {"max": 100000},
        "agencies": {"County": {"income": {"max": 50000}}, "HMS": {"income": {"min": 5}}}
    });
    let cases = [
        ("policy 42", policy_42("1.0.0"), shipped.clone(), 0),
        ("awkward values", awkward, shipped.clone(), 3),
        (
            "no settings",
            with_rules(json!([{"key": "age", "category": "eligibility", "value": 121}])),
            json!({}),
            3,
        ),
        ("rules not a list", no_rules, shipped.clone(), 0),
        ("agency override", county.clone(), per_agency, 3),
        (
            "custom categories",
            county,
            json!({"categories": ["benefits"], "age": {"min": 18}}),
            3,
        ),
    ];
    for (what, policy, settings, expected) in &cases {
        let (rc, r) = plugin_test(root, &rust, policy, settings);
        let (pc, p) = plugin_test(root, &py, policy, settings);
        assert_eq!(
            (rc, pc),
            (*expected, *expected),
            "{what}: exit codes\nrust: {r}\npython: {p}"
        );
        assert_eq!(p["verdict"], r["verdict"], "{what}");
        assert_eq!(findings(&p), findings(&r), "{what}: findings differ");
        if *expected == 3 {
            assert!(
                !findings(&r).is_empty(),
                "{what}: a case that finds nothing proves little"
            );
        }
    }
    // The awkward case covers every code the Rust plugin has.
    let (_, r) = plugin_test(root, &py, &cases[1].1, &shipped);
    let mut codes: Vec<&str> = r["diagnostics"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["code"].as_str().unwrap())
        .collect();
    codes.sort_unstable();
    codes.dedup();
    assert_eq!(
        codes,
        [
            "eligibility.age-range",
            "eligibility.income-range",
            "eligibility.inverted-range",
            "eligibility.not-a-number",
            "eligibility.percent-as-fraction",
            "eligibility.percent-range"
        ]
    );
    assert_eq!(r["loaded_from_cache"], true, "compiled once, then cached");

    // Unusable settings are a plugin fault (exit 5) in both languages.
    for bad in [
        json!({"agee": {"max": 1}}),
        json!({"age": {"min": 10, "max": 1}}),
        json!({"age": {"max": "old"}}),
        json!({"categories": "eligibility"}),
    ] {
        let (rc, _) = plugin_test(root, &rust, &policy_42("1.0.0"), &bad);
        let (pc, _) = plugin_test(root, &py, &policy_42("1.0.0"), &bad);
        assert_eq!((rc, pc), (5, 5), "{bad}");
    }
}

// ------------------------------------------------------ the guide, as written

fn guide() -> String {
    std::fs::read_to_string(repo().join("docs/plugin-authoring.md")).unwrap()
}

/// The first ```LANG block after the marker `<!-- NAME` in the guide.
fn guide_block(name: &str, lang: &str) -> String {
    let doc = guide();
    let after = doc
        .split_once(&format!("<!-- {name}"))
        .unwrap_or_else(|| panic!("docs/plugin-authoring.md has the {name} marker"))
        .1;
    let block = after
        .split_once(&format!("```{lang}\n"))
        .unwrap_or_else(|| panic!("a {lang} block follows the {name} marker"))
        .1;
    block
        .split_once("```")
        .expect("the block ends")
        .0
        .to_string()
}

#[test]
fn the_guides_python_section_runs_as_written_to_a_signed_plugin_in_a_workspace() {
    let home = tempfile::tempdir().unwrap();
    let home = home.path();

    // The release the guide installs is the one tested here.
    let pin = format!("componentize-py=={}", pinned_componentize_py());
    assert!(guide().contains(&pin), "the guide must install {pin}");

    // 1. pde plugin new, from an empty home directory.
    let o = sh(home, home, &guide_block("python-new", "sh"));
    assert!(o.status.success(), "{}", both(&o));
    let project = home.join("rules-described");
    // 2. The app.py the guide shows is the one generated.
    assert_eq!(
        std::fs::read_to_string(project.join("app.py")).unwrap(),
        guide_block("python-app", "python"),
        "docs/plugin-authoring.md shows a different app.py than `pde plugin new` writes"
    );
    // 3. Bindings, unit test, build, plugin test.
    let o = sh(&project, home, &guide_block("python-build", "sh"));
    assert!(o.status.success(), "{}", both(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("verdict: pass"), "{out}");
    assert!(out.contains("rules-described: checked 2 rule(s)"), "{out}");
    let wasm = project.join("build/rules-described.wasm");
    assert!(std::fs::metadata(&wasm).unwrap().len() > 1_000_000);
    // `exports` is tolerated, and shown as such.
    let o = pde(
        &project,
        &[
            "plugin",
            "inspect",
            wasm.to_str().unwrap(),
            "--output",
            "json",
        ],
    );
    assert_eq!(code(&o), 0, "{}", both(&o));
    assert_eq!(json(&o)["tolerated_exports"], json!(["exports"]));

    // 4. Install, sign, trust, validate in a workspace made by `pde init`.
    let ws = home.join("policy-repo");
    support::init_workspace(&ws, &cache());
    let o = sh(home, home, &guide_block("python-install", "sh"));
    assert!(o.status.success(), "{}", both(&o));
    assert!(
        !ws.join("keys/release.ed25519.pub").exists()
            || std::fs::read(ws.join("keys/release.ed25519.pub")).unwrap()
                != std::fs::read(ws.join("keys/security.ed25519.pub")).unwrap(),
        "the plugin key is not the bundle key"
    );
    let validate = |env: &str| {
        let o = pde(&ws, &["validate", "42", "--env", env, "--output", "json"]);
        (
            code(&o),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            both(&o),
        )
    };
    let (c, out, all) = validate("production");
    assert_eq!(c, 0, "{all}");
    assert!(out.contains("rules-described"), "the plugin ran: {out}");
    // The plugin's check bites in the workspace.
    let mut undescribed = policy_42("1.0.0");
    undescribed["rules"][2]["description"] = json!(" ");
    std::fs::write(ws.join("policies/42.json"), undescribed.to_string()).unwrap();
    let (c, out, all) = validate("production");
    assert_eq!(c, 3, "{all}");
    assert!(out.contains("rules-described.description-missing"), "{out}");
    assert!(out.contains("/rules/2/description"), "{out}");
    std::fs::write(ws.join("policies/42.json"), policy_42("1.0.0").to_string()).unwrap();
    // Without the guide's [trust] step, production refuses the signature.
    let config = std::fs::read_to_string(ws.join("pde.toml")).unwrap();
    std::fs::write(
        ws.join("pde.toml"),
        config.replace(
            "plugin_keys = [\"keys/security.ed25519.pub\"]",
            "plugin_keys = []",
        ),
    )
    .unwrap();
    let (c, _, all) = validate("production");
    assert_eq!(c, 6, "an untrusted signer is refused: {all}");
}

// ------------------------------------------------------------ plugin new

/// The README's build block without the one-time venv and pip lines (the
/// test venv already has the pinned componentize-py).
fn readme_build_steps(readme: &str) -> String {
    let build = readme.split_once("## Build").unwrap().1;
    let block = build.split_once("```sh\n").unwrap().1;
    block
        .split_once("```")
        .unwrap()
        .0
        .lines()
        .filter(|l| !l.starts_with("python3 -m venv") && !l.starts_with("pip install"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn plugin_new_python_router_builds_and_routes_as_generated() {
    let home = tempfile::tempdir().unwrap();
    let home = home.path();
    let o = pde(
        home,
        &[
            "plugin",
            "new",
            "tag-router",
            "--kind",
            "router",
            "--lang",
            "python",
            "--output",
            "json",
        ],
    );
    assert_eq!(code(&o), 0, "{}", both(&o));
    let made = json(&o);
    assert_eq!(made["lang"], "python");
    assert_eq!(made["wasm"], "build/tag-router.wasm");
    let project = home.join("tag-router");
    for f in [
        "app.py",
        "test_app.py",
        "wit/plugin.wit",
        "tag-router.toml",
        "policy.json",
        "services.toml",
        "README.md",
        ".gitignore",
    ] {
        assert!(project.join(f).is_file(), "{f} not generated");
    }
    // The WIT it carries is the repository's 0.1.0 contract.
    assert_eq!(
        std::fs::read_to_string(project.join("wit/plugin.wit")).unwrap(),
        std::fs::read_to_string(repo().join("wit/v0.1.0/plugin.wit")).unwrap()
    );
    let readme = std::fs::read_to_string(project.join("README.md")).unwrap();
    assert!(!readme.contains("{{"), "a placeholder left: {readme}");
    let pin = format!("componentize-py=={}", pinned_componentize_py());
    assert!(readme.contains(&pin), "the README must install {pin}");

    // The README's build steps: bindings, unit test, component.
    let o = sh(&project, home, &readme_build_steps(&readme));
    assert!(o.status.success(), "{}", both(&o));
    let wasm = project.join("build/tag-router.wasm");
    let wasm = wasm.to_str().unwrap();
    let policy = project.join("policy.json");
    let policy = policy.to_str().unwrap();
    let services = project.join("services.toml");
    let services = services.to_str().unwrap();
    let o = pde(
        &project,
        &[
            "plugin",
            "test",
            wasm,
            "--policy",
            policy,
            "--services",
            services,
            "--output",
            "json",
        ],
    );
    assert_eq!(code(&o), 0, "{}", both(&o));
    let report = json(&o);
    let routes: Vec<&str> = report["routes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["service"].as_str().unwrap())
        .collect();
    assert_eq!(routes, ["HMS-API", "Portal"], "{report}");
    // A typo in its settings is a plugin fault.
    let o = pde(
        &project,
        &[
            "plugin",
            "test",
            wasm,
            "--policy",
            policy,
            "--services",
            services,
            "--settings",
            r#"{"tagz": ["api"]}"#,
        ],
    );
    assert_eq!(code(&o), 5, "{}", both(&o));
}
