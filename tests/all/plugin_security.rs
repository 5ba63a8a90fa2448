//! Hostile plugins through the `pde` binary (issue 9): what a reviewer or a
//! release engineer sees, with the exit codes of DESIGN §8. Real components
//! built from `plugins/fixtures/misbehave`, real workspaces, real processes.
// Test code: a failed unwrap is a failed test, with its location.

use crate::support;

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use support::Workspace;

fn pde(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pde"))
        .arg("-C")
        .arg(dir)
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("pde runs")
}

fn code(o: &Output) -> i32 {
    o.status.code().expect("exited normally")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {}\nstderr: {}",
            text(&o.stdout),
            text(&o.stderr)
        )
    })
}

fn misbehave() -> &'static Path {
    Path::new(pde_plugin_artifacts::MISBEHAVE)
}

/// A workspace whose only plugin is `misbehave` named `name`, with `extra`
/// manifest text (settings, limits).
fn workspace_with(name: &str, extra: &str, envs: &str) -> Workspace {
    let ws = Workspace::new(envs);
    ws.install_plugin(name, "validator", misbehave(), extra, false);
    ws.commit("init");
    ws
}

#[test]
fn a_sleeping_plugin_is_a_plugin_fault_at_its_timeout() {
    let ws = workspace_with(
        "sleepy",
        "[settings]\nmode = \"sleep\"\nseconds = 60\n[limits]\ntimeout_ms = 500\n",
        "",
    );
    let start = Instant::now();
    let o = pde(ws.root(), &["validate", "42"]);
    let took = start.elapsed();
    assert_eq!(code(&o), 5, "{}", text(&o.stderr));
    let err = text(&o.stderr);
    assert!(err.contains("sleepy timed out after 500 ms"), "{err}");
    // Process start, compile and two calls (neutral run) fit well within this.
    assert!(took < Duration::from_secs(10), "took {took:?}");
}

/// Control characters a terminal would act on, other than the newlines
/// that end output lines.
fn unsafe_chars(s: &str) -> Vec<char> {
    s.chars()
        .filter(|&c| c != '\n' && pde::term::is_unsafe(c))
        .collect()
}

#[test]
fn plugin_text_reaches_a_terminal_escaped_and_json_exact() {
    let ws = workspace_with("ansi", "[settings]\nmode = \"ansi\"\n", "");
    let policy = ws.root().join("policies/42.json");
    let policy = policy.to_str().unwrap();

    let o = pde(
        ws.root(),
        &["-v", "plugin", "test", "ansi", "--policy", policy],
    );
    assert_eq!(code(&o), 3, "{}", text(&o.stderr));
    let (out, err) = (text(&o.stdout), text(&o.stderr));
    assert_eq!(unsafe_chars(&out), Vec::<char>::new(), "{out}");
    assert_eq!(unsafe_chars(&err), Vec::<char>::new(), "{err}");
    assert!(out.contains("\\u{1b}]52;c;"), "{out}");
    // The forged line is not a line of its own, and the real verdict stands.
    assert!(!out.lines().any(|l| l.starts_with("forged line")), "{out}");
    assert!(
        !out.lines().any(|l| l.starts_with("verdict: pass")),
        "{out}"
    );
    assert!(out.contains("verdict: fail"), "{out}");

    // `pde validate` prints the same diagnostic for people, escaped.
    let o = pde(ws.root(), &["-v", "validate", "42"]);
    assert_eq!(code(&o), 3, "{}", text(&o.stderr));
    assert_eq!(unsafe_chars(&text(&o.stdout)), Vec::<char>::new());
    assert_eq!(unsafe_chars(&text(&o.stderr)), Vec::<char>::new());

    // JSON keeps the exact bytes.
    let o = pde(
        ws.root(),
        &[
            "plugin", "test", "ansi", "--policy", policy, "--output", "json",
        ],
    );
    let report = json(&o);
    let ansi =
        "\x1b[2K\rverdict: pass\x1b]0;owned\x07\x1b]52;c;ZXZpbA==\x07\u{9b}1A\nforged line\x7f";
    assert_eq!(
        report["diagnostics"][0]["message"],
        format!("message {ansi}")
    );
}

#[test]
fn each_log_line_is_printed_once() {
    let ws = workspace_with("chatty", "[settings]\nmode = \"chatty\"\nlines = 50\n", "");
    let policy = ws.root().join("policies/42.json");
    let o = pde(
        ws.root(),
        &[
            "-v",
            "plugin",
            "test",
            "chatty",
            "--policy",
            policy.to_str().unwrap(),
        ],
    );
    assert_eq!(code(&o), 0, "{}", text(&o.stderr));
    let all = text(&o.stdout) + &text(&o.stderr);
    assert_eq!(all.matches("log 00000007 ").count(), 1, "{all}");
    assert_eq!(all.matches("out 00000007 ").count(), 1, "{all}");
}

const PRODUCTION: &str = "[environments.production]\nrequire_signed_plugins = true\n";

#[test]
fn validate_in_production_refuses_an_unsigned_plugin_with_exit_6() {
    let ws = workspace_with("unsigned", "[settings]\nmode = \"ok\"\n", PRODUCTION);
    let o = pde(ws.root(), &["validate", "42", "--env", "production"]);
    assert_eq!(code(&o), 6, "{}", text(&o.stderr));
    assert!(text(&o.stderr).contains("unsigned"), "{}", text(&o.stderr));
    // Without an environment there is no gate to apply.
    assert_eq!(code(&pde(ws.root(), &["validate", "42"])), 0);
}

#[test]
fn a_manifest_edited_after_signing_fails_verify_and_the_production_gate() {
    let ws = Workspace::new(PRODUCTION);
    ws.install_plugin(
        "bounds",
        "validator",
        misbehave(),
        "[settings]\nmode = \"ok\"\nmax = 5000\n",
        false,
    );
    let wasm = ws.root().join("plugins/bounds.wasm");
    let wasm = wasm.to_str().unwrap();
    let key = ws.root().join("keys/security.ed25519");
    let o = pde(
        ws.root(),
        &[
            "plugin",
            "sign",
            wasm,
            "--key",
            key.to_str().unwrap(),
            "--signer",
            "Sec Team",
            "--note",
            "SEC-42",
        ],
    );
    assert_eq!(code(&o), 0, "{}", text(&o.stderr));
    ws.commit("signed");

    let o = pde(ws.root(), &["plugin", "verify", wasm]);
    assert_eq!(code(&o), 0, "{}", text(&o.stderr));
    let out = text(&o.stdout);
    assert!(
        out.contains("signed by Sec Team") && out.contains("SEC-42"),
        "{out}"
    );
    let list = json(&pde(ws.root(), &["plugin", "list", "--output", "json"]));
    assert_eq!(list[0]["signature"]["signer"], "Sec Team", "{list}");
    assert_eq!(list[0]["signature"]["note"], "SEC-42", "{list}");
    let o = pde(ws.root(), &["validate", "42", "--env", "production"]);
    assert_eq!(code(&o), 0, "{}", text(&o.stderr));

    // Raise a setting after the review.
    let toml = ws.root().join("plugins/bounds.toml");
    let edited = std::fs::read_to_string(&toml)
        .unwrap()
        .replace("max = 5000", "max = 999999999");
    std::fs::write(&toml, edited).unwrap();
    ws.commit("raise max");
    let o = pde(ws.root(), &["plugin", "verify", wasm]);
    assert_eq!(code(&o), 6, "{}", text(&o.stdout));
    assert!(
        text(&o.stderr).contains("manifest changed"),
        "{}",
        text(&o.stderr)
    );
    let list = pde(ws.root(), &["plugin", "list"]);
    assert!(
        text(&list.stdout).contains("INVALID"),
        "{}",
        text(&list.stdout)
    );
    let o = pde(ws.root(), &["validate", "42", "--env", "production"]);
    assert_eq!(code(&o), 6, "{}", text(&o.stderr));
    let o = pde(ws.root(), &["plan", "42", "--env", "production"]);
    assert_eq!(code(&o), 6, "{}", text(&o.stderr));
}

#[test]
fn a_revoked_key_fails_verify() {
    let ws = Workspace::new("");
    ws.install_plugin("p", "validator", misbehave(), "", true);
    let wasm = ws.root().join("plugins/p.wasm");
    let wasm = wasm.to_str().unwrap();
    assert_eq!(code(&pde(ws.root(), &["plugin", "verify", wasm])), 0);
    let keyid = pde::keys::key_id(
        &pde::keys::load_public_key(&ws.root().join("keys/security.ed25519.pub")).unwrap(),
    );
    let config = std::fs::read_to_string(ws.root().join("pde.toml"))
        .unwrap()
        .replace(
            "plugin_keys = [\"keys/security.ed25519.pub\"]",
            &format!("plugin_keys = [\"keys/security.ed25519.pub\"]\nrevoked = [\"{keyid}\"]"),
        );
    std::fs::write(ws.root().join("pde.toml"), config).unwrap();
    let o = pde(ws.root(), &["plugin", "verify", wasm]);
    assert_eq!(code(&o), 6);
    assert!(text(&o.stderr).contains("revoked"), "{}", text(&o.stderr));
}

#[test]
fn sign_refuses_bytes_that_are_not_a_component() {
    let ws = Workspace::new("");
    let wasm = ws.root().join("plugins/junk.wasm");
    std::fs::write(&wasm, b"definitely not wasm").unwrap();
    let sum = pde::plugin::sha256_hex(b"definitely not wasm");
    std::fs::write(
        ws.root().join("plugins/junk.toml"),
        format!("name = \"junk\"\nkind = \"validator\"\nversion = \"1\"\nsha256 = \"{sum}\"\n"),
    )
    .unwrap();
    let key = ws.root().join("keys/security.ed25519");
    let o = pde(
        ws.root(),
        &[
            "plugin",
            "sign",
            wasm.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
        ],
    );
    assert_eq!(code(&o), 5, "{}", text(&o.stderr));
    assert!(
        text(&o.stderr).contains("not WebAssembly"),
        "{}",
        text(&o.stderr)
    );
    assert!(!ws.root().join("plugins/junk.wasm.sig").exists());
}

/// Writes `<wasm>.sig` the way a pde before issue 27 signed anything that
/// compiled: the manifest as it is, by the workspace's trusted key, with no
/// check of world, kind or limits. What the reviewer signed and verified.
fn sign_unchecked(wasm: &Path, key: &Path) {
    let manifest =
        pde::plugin::manifest::Manifest::load(&pde::plugin::signature::manifest_path(wasm))
            .unwrap();
    let key = pde::keys::load_signing_key(key).unwrap();
    let mut file = serde_json::json!({
        "format": pde::plugin::signature::FORMAT,
        "manifest": manifest.signed_fields(),
        "signer": "Security team (reviewer)",
        "signed_at": "2026-12-01T00:00:00Z",
        "note": null,
        "keyid": pde::keys::key_id(&key.verifying_key()),
        "alg": "ed25519",
    });
    let message = pde::bundle::canonical_json(&file);
    file["sig"] = pde::keys::sign(&key, &message).sig.into();
    std::fs::write(
        pde::plugin::signature::sig_path(wasm),
        serde_json::to_string(&file).unwrap(),
    )
    .unwrap();
}

/// The three plugins the reviewer signed although pde refuses to run them
/// (issue 27), each with the exit code and words of the runtime's refusal.
fn refused_by_the_runtime() -> [(
    &'static str,
    &'static str,
    &'static Path,
    &'static str,
    i32,
    &'static str,
); 3] {
    [
        (
            "plus",
            "validator",
            Path::new(pde_plugin_artifacts::wasm("extra-exports").unwrap()),
            "",
            5,
            "which world validator does not have",
        ),
        (
            "router",
            "validator",
            Path::new(pde_plugin_artifacts::CATEGORY_ROUTER),
            "",
            5,
            "should be a validator but it is a router",
        ),
        (
            "greedy",
            "validator",
            misbehave(),
            "[limits]\nfuel = 9000000000\n[settings]\nmode = \"ok\"\n",
            2,
            "fuel = 9000000000 exceeds the workspace limit",
        ),
    ]
}

#[test]
fn sign_verify_and_inspect_refuse_what_validate_refuses_with_its_exit_code() {
    for (name, kind, wasm, extra, exit, why) in refused_by_the_runtime() {
        let ws = Workspace::new("");
        ws.install_plugin(name, kind, wasm, extra, false);
        ws.commit("init");
        let root = ws.root();
        let wasm = root.join(format!("plugins/{name}.wasm"));
        let key = root.join("keys/security.ed25519");
        let (wasm_arg, key_arg) = (wasm.to_str().unwrap(), key.to_str().unwrap());
        let sig = pde::plugin::signature::sig_path(&wasm);

        // The runtime's verdict, which every reviewing command must repeat.
        let o = pde(root, &["validate", "42"]);
        assert_eq!(code(&o), exit, "{name}: validate: {}", text(&o.stderr));
        assert!(text(&o.stderr).contains(why), "{name}: {}", text(&o.stderr));

        let o = pde(root, &["plugin", "sign", wasm_arg, "--key", key_arg]);
        assert_eq!(code(&o), exit, "{name}: sign: {}", text(&o.stderr));
        assert!(text(&o.stderr).contains(why), "{name}: {}", text(&o.stderr));
        assert!(!sig.exists(), "{name}: sign wrote {}", sig.display());

        // Signed by a trusted key all the same (as an older pde did): still
        // not "valid".
        sign_unchecked(&wasm, &key);
        let o = pde(root, &["plugin", "verify", wasm_arg]);
        assert_eq!(code(&o), exit, "{name}: verify: {}", text(&o.stdout));
        assert!(text(&o.stderr).contains(why), "{name}: {}", text(&o.stderr));
        assert!(
            !text(&o.stdout).contains("valid"),
            "{name}: {}",
            text(&o.stdout)
        );

        // inspect shows the whole picture, then refuses with the same code.
        let o = pde(root, &["plugin", "inspect", name]);
        assert_eq!(code(&o), exit, "{name}: inspect: {}", text(&o.stdout));
        let out = text(&o.stdout);
        assert!(
            out.contains(&format!("verdict:  REFUSED (exit {exit})")),
            "{name}: {out}"
        );
        assert!(out.contains(why), "{name}: {out}");
        let o = pde(root, &["plugin", "inspect", name, "--output", "json"]);
        assert_eq!(code(&o), exit, "{name}: inspect json");
        let r = json(&o);
        assert_eq!(r["refused"]["exit_code"], exit, "{name}: {r}");
    }
}

#[test]
fn inspect_labels_a_loosened_limit_as_loosening() {
    let ws = workspace_with(
        "greedy",
        "[limits]\nfuel = 9000000000\ntimeout_ms = 500\n[settings]\nmode = \"ok\"\n",
        "",
    );
    let o = pde(ws.root(), &["plugin", "inspect", "greedy"]);
    let out = text(&o.stdout);
    assert_eq!(code(&o), 2, "{out}{}", text(&o.stderr));
    let limits = out.lines().find(|l| l.contains("limits:")).unwrap();
    assert!(
        limits.contains("LOOSENING the workspace [limits] (fuel 9000000000 > 2000000000)"),
        "{limits}"
    );
    assert!(!limits.contains("tightening"), "{limits}");
    let r = json(&pde(
        ws.root(),
        &["plugin", "inspect", "greedy", "--output", "json"],
    ));
    assert_eq!(
        r["loosened_limits"],
        serde_json::json!([{"field": "fuel", "manifest": 9000000000u64, "workspace": 2000000000u64}]),
        "{r}"
    );
}

#[test]
fn plugin_test_shows_what_the_sandbox_denied() {
    let ws = workspace_with("snoop", "[settings]\nmode = \"read-file\"\n", "");
    let policy = ws.root().join("policies/42.json");
    let o = pde(
        ws.root(),
        &[
            "plugin",
            "test",
            "snoop",
            "--policy",
            policy.to_str().unwrap(),
        ],
    );
    assert_eq!(code(&o), 0, "{}", text(&o.stderr));
    let out = text(&o.stdout);
    assert!(
        out.lines()
            .any(|l| l.starts_with("tried wasi:filesystem") && l.ends_with("denied")),
        "{out}"
    );
    // And `-v validate` logs it.
    let o = pde(ws.root(), &["-v", "validate", "42"]);
    assert_eq!(code(&o), 0, "{}", text(&o.stderr));
    assert!(
        text(&o.stderr).contains("tried wasi:filesystem"),
        "{}",
        text(&o.stderr)
    );
}

#[test]
fn deny_attempts_fails_a_plugin_that_tries_denied_capabilities() {
    for (mode, attempt) in [
        ("read-file", "tried wasi:filesystem"),
        ("socket", "tried wasi:sockets"),
        ("env", "tried wasi:cli/environment"),
    ] {
        let ws = workspace_with("snoop", &format!("[settings]\nmode = \"{mode}\"\n"), "");
        let policy = ws.root().join("policies/42.json");
        let test = [
            "plugin",
            "test",
            "snoop",
            "--policy",
            policy.to_str().unwrap(),
        ];
        // Without it, the attempt is reported and the plugin passes.
        let o = pde(ws.root(), &test);
        assert_eq!(code(&o), 0, "{mode}: {}", text(&o.stderr));
        assert!(
            text(&o.stdout).contains(attempt),
            "{mode}: {}",
            text(&o.stdout)
        );
        assert_eq!(code(&pde(ws.root(), &["validate", "42"])), 0, "{mode}");

        // With it, the attempt fails the plugin (exit 5), named.
        let o = pde(ws.root(), &[&test[..], &["--deny-attempts"]].concat());
        assert_eq!(code(&o), 5, "{mode}: {}", text(&o.stdout));
        let err = text(&o.stderr);
        assert!(
            err.contains("snoop tried a denied capability"),
            "{mode}: {err}"
        );
        assert!(err.contains(attempt), "{mode}: {err}");
        let o = pde(ws.root(), &["validate", "42", "--deny-attempts"]);
        assert_eq!(code(&o), 5, "{mode}: {}", text(&o.stderr));
        assert!(
            text(&o.stderr).contains(attempt),
            "{mode}: {}",
            text(&o.stderr)
        );
    }

    // The manifest setting does the same for every run, and is signed.
    let ws = workspace_with(
        "snoop",
        "deny_attempts = true\n[settings]\nmode = \"read-file\"\n",
        "",
    );
    let o = pde(ws.root(), &["validate", "42"]);
    assert_eq!(code(&o), 5, "{}", text(&o.stderr));
    assert!(
        text(&o.stderr).contains("tried wasi:filesystem"),
        "{}",
        text(&o.stderr)
    );
    // A plugin that tries nothing is not affected.
    let ws = workspace_with("quiet", "[settings]\nmode = \"ok\"\n", "");
    let o = pde(ws.root(), &["validate", "42", "--deny-attempts"]);
    assert_eq!(code(&o), 0, "{}", text(&o.stderr));
}

#[test]
fn dev_warns_about_a_broken_or_missing_signature() {
    let ws = Workspace::new(&format!("[environments.dev]\n{PRODUCTION}"));
    ws.install_plugin(
        "bounds",
        "validator",
        misbehave(),
        "[settings]\nmode = \"ok\"\nmax = 5000\n",
        true,
    );
    ws.install_plugin(
        "fresh",
        "validator",
        misbehave(),
        "[settings]\nmode = \"ok\"\n",
        false,
    );
    // Tampered after signing: a raised setting breaks the signature.
    let toml = ws.root().join("plugins/bounds.toml");
    let edited = std::fs::read_to_string(&toml)
        .unwrap()
        .replace("max = 5000", "max = 999999999");
    std::fs::write(&toml, edited).unwrap();
    ws.commit("tampered");

    // Production refuses it; dev runs it, but not silently.
    let o = pde(ws.root(), &["validate", "42", "--env", "production"]);
    assert_eq!(code(&o), 6, "{}", text(&o.stderr));
    for args in [&["validate", "42", "--env", "dev"][..], &["validate", "42"]] {
        let o = pde(ws.root(), args);
        assert_eq!(code(&o), 0, "{args:?}: {}", text(&o.stderr));
        let out = text(&o.stdout);
        assert!(
            out.contains("! bounds: signature INVALID: the manifest changed"),
            "{args:?}: {out}"
        );
        assert!(out.contains("! fresh: unsigned"), "{args:?}: {out}");
        // The report says it at the default log level (errors only); the
        // log says it too, from -v.
        let o = pde(ws.root(), &[&["-v"], args].concat());
        let err = text(&o.stderr);
        assert!(
            err.contains("plugin bounds: signature INVALID"),
            "{args:?}: {err}"
        );
        let o = pde(ws.root(), &[args, &["--output", "json"]].concat());
        let r = json(&o);
        let bounds = r["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "bounds")
            .unwrap();
        assert_eq!(bounds["signature"]["status"], "invalid", "{r}");
    }
}

#[test]
fn inspect_shows_manifest_pin_signature_world_and_capabilities() {
    let ws = Workspace::new("");
    ws.install_plugin(
        "bounds",
        "validator",
        misbehave(),
        "[limits]\ntimeout_ms = 700\n[settings]\nmode = \"ok\"\n",
        true,
    );
    let o = pde(
        ws.root(),
        &["plugin", "inspect", "bounds", "--output", "json"],
    );
    assert_eq!(code(&o), 0, "{}", text(&o.stderr));
    let r = json(&o);
    assert_eq!(r["manifest"]["version"], "1.0.0", "{r}");
    assert_eq!(r["manifest"]["limits"]["timeout_ms"], 700, "{r}");
    assert_eq!(r["manifest"]["settings"]["mode"], "ok", "{r}");
    assert_eq!(r["sha256_matches_manifest"], true, "{r}");
    assert_eq!(r["signature"]["status"], "valid", "{r}");
    assert_eq!(r["signature"]["signer"], "security team", "{r}");
    assert_eq!(r["kind"], "validator", "{r}");
    assert_eq!(r["exports"], serde_json::json!(["validate"]), "{r}");
    let caps = r["capabilities"].as_array().unwrap();
    assert!(
        caps.iter().any(|c| c["import"]
            .as_str()
            .unwrap()
            .starts_with("wasi:filesystem/")
            && c["granted"] == false),
        "{r}"
    );

    // Human output says the same, and a changed file shows in the pin.
    let wasm = ws.root().join("plugins/bounds.wasm");
    let mut bytes = std::fs::read(&wasm).unwrap();
    // A custom section: still a valid component, other bytes.
    bytes.extend_from_slice(b"\0\x05\x04nope");
    std::fs::write(&wasm, bytes).unwrap();
    let o = pde(ws.root(), &["plugin", "inspect", wasm.to_str().unwrap()]);
    let out = text(&o.stdout);
    // pde refuses a file its manifest does not pin (exit 6): so does inspect,
    // after showing it.
    assert_eq!(code(&o), 6, "{}", text(&o.stderr));
    assert!(out.contains("verdict:  REFUSED (exit 6)"), "{out}");
    assert!(out.contains("pinned sha256: DOES NOT MATCH"), "{out}");
    assert!(out.contains("signature: INVALID"), "{out}");
    assert!(out.contains("limits:   {\"timeout_ms\":700}"), "{out}");
    assert!(out.contains("DENIED  wasi:sockets/tcp"), "{out}");
}

#[test]
fn diff_shows_what_a_reviewer_approves() {
    let ws = Workspace::new("");
    let dirs = ["old", "new"].map(|d| ws.root().join(d));
    for (dir, extra) in dirs.iter().zip([
        "[limits]\ntimeout_ms = 500\n[settings]\nmode = \"ok\"\nmax = 5000\n",
        "[limits]\ntimeout_ms = 1500\n[settings]\nmode = \"ok\"\nmax = 999999999\n",
    ]) {
        std::fs::create_dir_all(dir).unwrap();
        let wasm = dir.join("misbehave.wasm");
        std::fs::copy(misbehave(), &wasm).unwrap();
        let sum = pde::plugin::sha256_hex(&std::fs::read(&wasm).unwrap());
        std::fs::write(
            dir.join("misbehave.toml"),
            format!("name = \"misbehave\"\nkind = \"validator\"\nversion = \"1.0.0\"\nsha256 = \"{sum}\"\n{extra}"),
        )
        .unwrap();
    }
    let (old, new) = (
        dirs[0].join("misbehave.wasm"),
        dirs[1].join("misbehave.wasm"),
    );
    let policy = ws.root().join("policies/42.json");
    let o = pde(
        ws.root(),
        &[
            "plugin",
            "diff",
            old.to_str().unwrap(),
            new.to_str().unwrap(),
            "--policy",
            policy.to_str().unwrap(),
            "--output",
            "json",
        ],
    );
    assert_eq!(code(&o), 0, "{}", text(&o.stderr));
    let r = json(&o);
    let changes: Vec<(String, String, String)> = r["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let s = |k: &str| c[k].as_str().unwrap().to_string();
            (s("what"), s("old"), s("new"))
        })
        .collect();
    assert_eq!(
        changes,
        vec![
            ("limits.timeout_ms".into(), "500".into(), "1500".into()),
            ("settings.max".into(), "5000".into(), "999999999".into()),
        ]
    );
    assert!(r["costs"]["old"]["fuel_used"].as_u64().unwrap() > 0, "{r}");
    assert!(r["costs"]["new"]["fuel_used"].as_u64().unwrap() > 0, "{r}");

    // Another component: world, exports, size and producers all show.
    let o = pde(
        ws.root(),
        &[
            "plugin",
            "diff",
            pde_plugin_artifacts::ELIGIBILITY_BOUNDS,
            pde_plugin_artifacts::CATEGORY_ROUTER,
        ],
    );
    assert_eq!(code(&o), 0, "{}", text(&o.stderr));
    let out = text(&o.stdout);
    assert!(out.contains("~ world: validator -> router"), "{out}");
    assert!(out.contains("- export removed: validate"), "{out}");
    assert!(out.contains("+ export added: route"), "{out}");
    assert!(out.contains("~ size:"), "{out}");
}

// ---------------------------------------------------------------- compile cache

/// A workspace with the example plugins, all signed, production requiring
/// signatures, policy 42 exposing an SSN on the portal, and a state directory
/// (so that `pde validate` keeps its compile cache in the workspace). The
/// cache key and the per-user cache live in `home`.
fn ssn_workspace(home: &Path) -> (Workspace, Vec<(&'static str, String)>) {
    let ws = Workspace::new(PRODUCTION);
    ws.install_examples();
    let mut policy = support::policy_42("1.0.0");
    policy["config"] = serde_json::json!({"portal_fields": ["name", "ssn", "email"]});
    ws.write_policy("42.json", &policy.to_string());
    ws.commit("init");
    std::fs::create_dir(ws.root().join(".pde")).unwrap();
    let env = vec![
        (
            "PDE_CACHE_KEY_FILE",
            home.join("config/pde/cache.key").display().to_string(),
        ),
        ("PDE_CACHE_DIR", home.join("cache").display().to_string()),
    ];
    (ws, env)
}

fn pde_with(dir: &Path, args: &[&str], env: &[(&'static str, String)]) -> Output {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    support::pde_env(dir, args, &env)
}

/// The compiled entries of the installed plugin `name`: in the workspace
/// cache and in the per-user cache under `home` (a compile fills both).
fn cache_entries_of(ws: &Workspace, home: &Path, name: &str) -> Vec<std::path::PathBuf> {
    vec![
        cache_entry_in(ws, &ws.root().join(".pde/cache/plugins"), name),
        cache_entry_in(ws, &home.join("cache/plugins"), name),
    ]
}

/// The compiled entry of the installed plugin `name` in the cache `dir`.
fn cache_entry_in(ws: &Workspace, dir: &Path, name: &str) -> std::path::PathBuf {
    let manifest =
        std::fs::read_to_string(ws.root().join("plugins").join(format!("{name}.toml"))).unwrap();
    let sha = manifest
        .lines()
        .find_map(|l| l.strip_prefix("sha256 = \""))
        .and_then(|l| l.strip_suffix('"'))
        .unwrap();
    let found: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_str().unwrap();
            n.starts_with(sha) && n.ends_with(".cwasm")
        })
        .collect();
    assert_eq!(found.len(), 1, "one entry for {name} in {}", dir.display());
    found[0].clone()
}

fn sum_of(path: &Path) -> std::path::PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".sum");
    name.into()
}

/// Issue 21 item 2: another valid plugin's compiled code copied over
/// pii-guard's cache entry, with the record rewritten to match it (or
/// replaced by that plugin's own record, which this machine did write), must
/// not run under pii-guard's signed name: the entry is discarded and
/// pii-guard is compiled again from its verified `.wasm`, so the exposed SSN
/// is still caught in production.
#[test]
fn a_poisoned_compile_cache_entry_is_recompiled_not_run_under_a_signed_name() {
    let home = tempfile::tempdir().unwrap();
    let (ws, env) = ssn_workspace(home.path());
    // -v: the cache's warnings are log lines, shown only when asked for.
    let validate = || {
        pde_with(
            ws.root(),
            &["-v", "validate", "42", "--env", "production"],
            &env,
        )
    };
    let o = validate();
    assert_eq!(code(&o), 3, "{}", text(&o.stderr));
    assert!(
        text(&o.stdout).contains("pii.ssn-exposed"),
        "{}",
        text(&o.stdout)
    );
    // Whoever can write one cache can write the other: every copy of
    // pii-guard's entry is poisoned, so only a recompile can serve it.
    let piis = cache_entries_of(&ws, home.path(), "pii-guard");
    let hostile = cache_entries_of(&ws, home.path(), "eligibility-bounds").remove(0);
    assert!(
        !home
            .path()
            .join("config/pde/cache.key")
            .starts_with(ws.root()),
        "the key lives outside the workspace"
    );
    let replaced = |code_bytes: &[u8]| {
        for pii in &piis {
            assert_ne!(
                std::fs::read(pii).unwrap(),
                code_bytes,
                "entry not replaced: {}",
                pii.display()
            );
        }
    };

    // 1. The hostile code under pii-guard's name, the record's digest
    //    rewritten to match it (and no stamp, so the digest is what counts).
    let code_bytes = std::fs::read(&hostile).unwrap();
    for pii in &piis {
        std::fs::write(pii, &code_bytes).unwrap();
        let record = std::fs::read_to_string(sum_of(pii)).unwrap();
        let mut lines: Vec<String> = record.lines().map(str::to_string).collect();
        lines[1] = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&code_bytes));
        lines[2] = String::new();
        std::fs::write(sum_of(pii), lines.join("\n") + "\n").unwrap();
    }
    let o = validate();
    assert_eq!(
        code(&o),
        3,
        "the poisoned entry ran in pii-guard's place: {}{}",
        text(&o.stdout),
        text(&o.stderr)
    );
    assert!(
        text(&o.stdout).contains("pii.ssn-exposed"),
        "{}",
        text(&o.stdout)
    );
    assert!(
        text(&o.stderr).contains("discarding cache entry"),
        "{}",
        text(&o.stderr)
    );
    replaced(&code_bytes);

    // 2. The hostile code with its own record, which this machine's pde
    //    wrote: authentic, but for another plugin's wasm.
    for pii in &piis {
        std::fs::copy(&hostile, pii).unwrap();
        std::fs::copy(sum_of(&hostile), sum_of(pii)).unwrap();
    }
    let o = validate();
    assert_eq!(code(&o), 3, "{}{}", text(&o.stdout), text(&o.stderr));
    assert!(
        text(&o.stdout).contains("pii.ssn-exposed"),
        "{}",
        text(&o.stdout)
    );
    replaced(&code_bytes);

    // The rebuilt entry is trusted again: a third run is served by the cache.
    let o = pde_with(
        ws.root(),
        &["-vv", "validate", "42", "--env", "production"],
        &env,
    );
    assert_eq!(code(&o), 3, "{}", text(&o.stderr));
    assert!(
        text(&o.stderr).contains("compiled plugin loaded from cache"),
        "{}",
        text(&o.stderr)
    );
    assert!(
        !text(&o.stderr).contains("discarding"),
        "{}",
        text(&o.stderr)
    );
}

/// A workspace cache restored from elsewhere (another machine's key, as a CI
/// cache from another branch would be) is recompiled, never trusted.
#[test]
fn a_compile_cache_written_under_another_key_costs_a_recompile() {
    let home = tempfile::tempdir().unwrap();
    let (ws, env) = ssn_workspace(home.path());
    let validate = |env: &[(&'static str, String)]| {
        pde_with(
            ws.root(),
            &["-v", "validate", "42", "--env", "production"],
            env,
        )
    };
    assert_eq!(code(&validate(&env)), 3);
    let pii = cache_entries_of(&ws, home.path(), "pii-guard").remove(0);
    let before = std::fs::read_to_string(sum_of(&pii)).unwrap();

    let other = tempfile::tempdir().unwrap();
    let mut elsewhere = env.clone();
    elsewhere[0].1 = other.path().join("cache.key").display().to_string();
    let o = validate(&elsewhere);
    assert_eq!(code(&o), 3, "{}", text(&o.stderr));
    assert!(
        text(&o.stdout).contains("pii.ssn-exposed"),
        "{}",
        text(&o.stdout)
    );
    assert!(
        text(&o.stderr).contains("not authenticated by this machine's cache key"),
        "{}",
        text(&o.stderr)
    );
    assert_ne!(
        std::fs::read_to_string(sum_of(&pii)).unwrap(),
        before,
        "the entry was rewritten under the new key"
    );
}

/// The key is the user's secret: one others can read turns the cache off
/// (with a warning), it is never used.
#[cfg(unix)]
#[test]
fn a_cache_key_others_can_read_turns_the_cache_off() {
    use std::os::unix::fs::PermissionsExt;
    let home = tempfile::tempdir().unwrap();
    let (ws, env) = ssn_workspace(home.path());
    let o = pde_with(ws.root(), &["validate", "42", "--env", "production"], &env);
    assert_eq!(code(&o), 3, "{}", text(&o.stderr));
    let key = home.path().join("config/pde/cache.key");
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&key), 0o600);
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let o = pde_with(
        ws.root(),
        &["-vv", "validate", "42", "--env", "production"],
        &env,
    );
    assert_eq!(code(&o), 3, "{}", text(&o.stderr));
    let err = text(&o.stderr);
    assert!(
        err.contains("compile cache off") && err.contains("chmod 600"),
        "{err}"
    );
    assert!(!err.contains("loaded from cache"), "{err}");
}

/// The compiled entries (`.cwasm`) in a cache directory.
fn cwasm_in(dir: &Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .map(|e| e.unwrap().path())
                .filter(|p| p.extension().is_some_and(|e| e == "cwasm"))
                .collect()
        })
        .unwrap_or_default()
}

/// Issue 24 §1: in a fresh clone (no state directory) a read-only command
/// used to compile every plugin on every run. Its compile cache is now the
/// per-user one: the second `pde validate` compiles nothing, and nothing is
/// created in the workspace. `pde plugin sign` goes through the same cache.
/// Once a state directory exists, the workspace cache and the per-user one
/// serve each other: a compile fills both, a lookup tries both.
#[test]
fn a_fresh_clones_second_validate_is_served_by_the_per_user_cache() {
    let home = tempfile::tempdir().unwrap();
    let origin = Workspace::new(PRODUCTION);
    origin.install_examples();
    origin.commit("init");
    let clone = home.path().join("clone");
    support::git(
        home.path(),
        &["clone", "-q", origin.root().to_str().unwrap(), "clone"],
    );
    let env = vec![
        (
            "PDE_CACHE_KEY_FILE",
            home.path()
                .join("config/pde/cache.key")
                .display()
                .to_string(),
        ),
        (
            "PDE_CACHE_DIR",
            home.path().join("cache").display().to_string(),
        ),
    ];
    let user_cache = home.path().join("cache/plugins");
    let state = clone.join(".pde");
    let plugins = support::example_plugins().len();
    let validate = || {
        pde_with(
            &clone,
            &["-vv", "validate", "42", "--env", "production"],
            &env,
        )
    };

    let o = validate();
    assert_eq!(code(&o), 0, "{}", text(&o.stderr));
    let err = text(&o.stderr);
    assert_eq!(err.matches("compiling plugin").count(), plugins, "{err}");
    assert!(!state.exists(), "a read-only command created the state dir");
    assert_eq!(
        cwasm_in(&user_cache).len(),
        plugins,
        "entries in $PDE_CACHE_DIR"
    );

    let o = validate();
    assert_eq!(code(&o), 0, "{}", text(&o.stderr));
    let err = text(&o.stderr);
    assert!(
        !err.contains("compiling plugin"),
        "second run compiled: {err}"
    );
    assert_eq!(
        err.matches("compiled plugin loaded from cache").count(),
        plugins,
        "{err}"
    );
    assert!(!state.exists(), "a read-only command created the state dir");
    let names: Vec<_> = std::fs::read_dir(&clone)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        names.iter().all(|n| n != ".pde"),
        "nothing new in the clone: {names:?}"
    );

    // Signing a build that validate compiled compiles nothing.
    let o = pde_with(
        &clone,
        &[
            "-vv",
            "plugin",
            "sign",
            clone.join("plugins/pii-guard.wasm").to_str().unwrap(),
            "--key",
            clone.join("keys/security.ed25519").to_str().unwrap(),
            "--signer",
            "Sec Team",
        ],
        &env,
    );
    assert_eq!(code(&o), 0, "{}", text(&o.stderr));
    let err = text(&o.stderr);
    assert!(!err.contains("compiling plugin"), "sign compiled: {err}");
    assert!(err.contains("compiled plugin loaded from cache"), "{err}");
    assert!(!state.exists());

    // With a state directory: the per-user cache serves the workspace...
    std::fs::create_dir(&state).unwrap();
    let o = validate();
    assert_eq!(code(&o), 0, "{}", text(&o.stderr));
    assert!(!text(&o.stderr).contains("compiling plugin"));
    // ...a compile fills both...
    std::fs::remove_dir_all(&user_cache).unwrap();
    let o = validate();
    assert_eq!(code(&o), 0, "{}", text(&o.stderr));
    assert_eq!(text(&o.stderr).matches("compiling plugin").count(), plugins);
    assert_eq!(cwasm_in(&state.join("cache/plugins")).len(), plugins);
    assert_eq!(cwasm_in(&user_cache).len(), plugins);
    // ...and the workspace cache serves when the per-user one is gone.
    std::fs::remove_dir_all(&user_cache).unwrap();
    let o = validate();
    assert_eq!(code(&o), 0, "{}", text(&o.stderr));
    assert!(!text(&o.stderr).contains("compiling plugin"));
}
