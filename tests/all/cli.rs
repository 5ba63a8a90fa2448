//! The `pde` binary as scripts and release engineers see it: arguments,
//! `--output json`, and the exit codes of DESIGN §8, over real agent
//! processes on loopback.
// Test code: a failed unwrap is a failed test, with its location.

use crate::support;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};

use support::{AgentProcess, Workspace};

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

fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {}\nstderr: {}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    })
}

#[test]
fn usage_errors_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(code(&pde(dir.path(), &["frobnicate"])), 2);
    let o = pde(dir.path(), &["status"]);
    assert_eq!(code(&o), 2);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(stderr.contains("pde.toml"), "{stderr}");
    // Printed once: the cause is part of the message, not repeated after it.
    assert_eq!(stderr.matches("os error 2").count(), 1, "{stderr}");
    let o = pde(dir.path(), &["status", "--output", "json"]);
    assert_eq!(code(&o), 2);
    assert_eq!(json(&o)["exit_code"], 2);
}

#[test]
fn keygen_writes_a_pair_and_never_overwrites() {
    let dir = tempfile::tempdir().unwrap();
    let o = pde(dir.path(), &["keygen", "--out", "k", "--output", "json"]);
    assert_eq!(code(&o), 0);
    assert_eq!(json(&o)["key_id"].as_str().unwrap().len(), 16);
    assert!(dir.path().join("k/release.ed25519.pub").exists());
    assert_eq!(code(&pde(dir.path(), &["keygen", "--out", "k"])), 2);
}

#[test]
fn validate_reports_findings_with_exit_3_and_unknown_policies_with_exit_2() {
    let ws = Workspace::new("");
    ws.commit("init");
    let ok = pde(ws.root(), &["validate", "42", "--output", "json"]);
    assert_eq!(code(&ok), 0, "{}", String::from_utf8_lossy(&ok.stderr));
    assert_eq!(json(&ok)["policy_id"], "42");

    assert_eq!(code(&pde(ws.root(), &["validate", "99"])), 2);

    let mut bad = support::policy_42("1.0.0");
    bad["effective"] = "next week".into();
    ws.write_policy("42.json", &bad.to_string());
    let o = pde(ws.root(), &["validate", "42", "--output", "json"]);
    assert_eq!(code(&o), 3);
    let report = &json(&o)["report"];
    assert!(
        report["diagnostics"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["path"] == "/effective"),
        "{report}"
    );
}

#[test]
fn a_runaway_plugin_is_a_plugin_fault_exit_5() {
    let ws = Workspace::new("");
    ws.install_plugin(
        "runaway",
        "validator",
        Path::new(pde_plugin_artifacts::MISBEHAVE),
        "[settings]\nmode = \"loop\"\n",
        false,
    );
    ws.commit("init");
    let o = pde(ws.root(), &["validate", "42"]);
    assert_eq!(code(&o), 5, "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("runaway"));
}

#[test]
fn an_unreachable_environment_exits_4() {
    let ws = Workspace::new(&Workspace::env_toml(
        "dev",
        "",
        &[support::Svc {
            name: "gone",
            url: "http://127.0.0.1:9".into(),
            tags: &["api"],
        }],
    ));
    ws.commit("init");
    assert_eq!(code(&pde(ws.root(), &["env", "check", "dev"])), 4);
    let o = pde(
        ws.root(),
        &["deploy", "42", "--env", "dev", "--output", "json"],
    );
    assert_eq!(code(&o), 4);
    assert_eq!(json(&o)["exit_code"], 4);
}

#[test]
fn deploy_plan_status_history_and_audit_through_the_binary() {
    let ws = Workspace::new("");
    let agent = AgentProcess::start(&ws.root().join("agents/api"), &ws.release_pub());
    let env = Workspace::env_toml(
        "dev",
        "",
        &[support::Svc {
            name: "HMS-API",
            url: agent.url.clone(),
            tags: &["api"],
        }],
    );
    let toml = std::fs::read_to_string(ws.root().join("pde.toml")).unwrap() + &env;
    std::fs::write(ws.root().join("pde.toml"), toml).unwrap();
    ws.commit("init");

    let plan = pde(
        ws.root(),
        &["plan", "42", "--env", "dev", "--output", "json"],
    );
    assert_eq!(code(&plan), 0, "{}", String::from_utf8_lossy(&plan.stderr));
    let plan = json(&plan);
    assert_eq!(plan["targets"][0]["change"], "install");
    assert!(
        support::active_digest(&agent.url).is_none(),
        "plan pushes nothing"
    );

    let o = pde(
        ws.root(),
        &["deploy", "42", "--env", "dev", "--output", "json"],
    );
    assert_eq!(code(&o), 0, "{}", String::from_utf8_lossy(&o.stderr));
    let report = json(&o);
    assert_eq!(report["outcome"], "deployed");
    assert_eq!(report["digest"], plan["digest"], "plan and deploy agree");
    assert_eq!(
        support::active_digest(&agent.url).as_deref(),
        report["digest"].as_str()
    );

    let status = json(&pde(ws.root(), &["status", "--output", "json"]));
    assert_eq!(status[0]["version"], "1.0.0");
    assert_eq!(status[0]["services"][0]["service"], "HMS-API");
    assert_eq!(status[0]["services"][0]["digest"], report["digest"]);
    // The human form is a policy × service matrix.
    let text = String::from_utf8(pde(ws.root(), &["status"]).stdout).unwrap();
    let header = text.lines().next().unwrap_or_default();
    assert!(
        header.starts_with("dev") && header.contains("HMS-API"),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("42 ") && l.matches("1.0.0").count() == 2),
        "{text}"
    );
    let history = json(&pde(ws.root(), &["history", "42", "--output", "json"]));
    assert_eq!(history[0]["outcome"], "deployed");

    assert_eq!(code(&pde(ws.root(), &["audit", "verify"])), 0);
    let shown = json(&pde(
        ws.root(),
        &["audit", "show", "--policy", "42", "--output", "json"],
    ));
    assert_eq!(
        shown.as_array().unwrap().last().unwrap()["event"],
        "deployed"
    );

    // Tampering with one record is caught, naming it.
    let log = ws.root().join(".pde/audit.jsonl");
    let text = std::fs::read_to_string(&log).unwrap();
    std::fs::write(&log, text.replacen("\"42\"", "\"43\"", 1)).unwrap();
    let o = pde(ws.root(), &["audit", "verify"]);
    assert_eq!(code(&o), 6);
}

/// An audit sink on loopback that records what it takes, or hangs.
struct Sink {
    got: std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
    url: String,
}

fn start_sink(hang: bool) -> Sink {
    use axum::routing::post;
    let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let store = got.clone();
    let app = axum::Router::new().route(
        "/audit",
        post(move |axum::Json(v): axum::Json<serde_json::Value>| {
            let store = store.clone();
            async move {
                if hang {
                    tokio::time::sleep(std::time::Duration::from_secs(600)).await;
                }
                store.lock().unwrap().push(v);
                axum::http::StatusCode::ACCEPTED
            }
        }),
    );
    let rt = support::runtime();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    rt.spawn(async move { axum::serve(listener, app).await });
    Sink {
        got,
        url: format!("http://{addr}/audit"),
    }
}

fn with_sink(ws: &Workspace, url: &str) {
    let toml = std::fs::read_to_string(ws.root().join("pde.toml")).unwrap();
    // The [audit] table is always the last one written here; replace it.
    let toml = toml.split("\n[audit]").next().unwrap().to_string();
    let toml = format!("{toml}\n[audit]\nsink_url = \"{url}\"\nsink_flush_ms = 300\n");
    std::fs::write(ws.root().join("pde.toml"), toml).unwrap();
}

#[test]
fn a_hung_audit_sink_is_bounded_and_a_killed_run_loses_nothing() {
    let ws = Workspace::new("");
    let agent = AgentProcess::start(&ws.root().join("agents/api"), &ws.release_pub());
    let env = Workspace::env_toml(
        "dev",
        "",
        &[support::Svc {
            name: "HMS-API",
            url: agent.url.clone(),
            tags: &["api"],
        }],
    );
    let toml = std::fs::read_to_string(ws.root().join("pde.toml")).unwrap() + &env;
    std::fs::write(ws.root().join("pde.toml"), toml).unwrap();
    let hung = start_sink(true);
    with_sink(&ws, &hung.url);
    ws.commit("init");

    // A deploy with a sink that never answers still ends, and promptly.
    let started = std::time::Instant::now();
    let o = pde(ws.root(), &["deploy", "42", "--env", "dev"]);
    assert_eq!(code(&o), 0, "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        started.elapsed() < std::time::Duration::from_secs(20),
        "a hung sink held the deploy for {:?}",
        started.elapsed()
    );
    // A second run is killed outright while the sink hangs.
    let mut child = Command::new(env!("CARGO_BIN_EXE_pde"))
        .arg("-C")
        .arg(ws.root())
        .args(["validate", "42", "--env", "dev"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(100));
    let _ = child.kill();
    let _ = child.wait();
    let logged = std::fs::read_to_string(ws.root().join(".pde/audit.jsonl")).unwrap();
    let records: Vec<serde_json::Value> = logged
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(records.len() >= 8, "{logged}");
    assert!(hung.got.lock().unwrap().is_empty());

    // The next run, with a working sink, forwards every pending record, in order.
    let good = start_sink(false);
    with_sink(&ws, &good.url);
    let o = pde(ws.root(), &["status"]);
    assert_eq!(code(&o), 0, "{}", String::from_utf8_lossy(&o.stderr));
    let got = good.got.lock().unwrap().clone();
    assert_eq!(got, records, "every record, in order, byte for byte");
}

/// Every command and subcommand of the CLI, as a user types them.
const COMMANDS: &[&str] = &[
    "deploy",
    "validate",
    "package",
    "plan",
    "env",
    "status",
    "history",
    "rollback",
    "audit",
    "keygen",
    "init",
    "plugin",
    "agent",
    "completions",
    "man",
];
const SUBCOMMANDS: &[&str] = &[
    "check", "verify", "show", "export", "list", "inspect", "test", "sign", "diff", "new",
];

#[test]
fn completions_and_man_pages_cover_every_command() {
    let dir = tempfile::tempdir().unwrap();
    for shell in ["bash", "zsh", "fish"] {
        let o = pde(dir.path(), &["completions", shell]);
        assert_eq!(code(&o), 0, "{}", String::from_utf8_lossy(&o.stderr));
        let script = String::from_utf8(o.stdout).unwrap();
        for name in COMMANDS.iter().chain(SUBCOMMANDS) {
            assert!(script.contains(name), "{shell} completion lacks {name}");
        }
    }
    assert_eq!(code(&pde(dir.path(), &["completions", "tcsh"])), 2);

    let o = pde(dir.path(), &["man", "--out", "man"]);
    assert_eq!(code(&o), 0, "{}", String::from_utf8_lossy(&o.stderr));
    let page = |name: &str| dir.path().join("man").join(format!("{name}.1"));
    let top = std::fs::read_to_string(page("pde")).unwrap();
    assert!(top.starts_with(".ie") || top.contains(".TH pde"), "{top}");
    for name in COMMANDS {
        assert!(
            page(&format!("pde-{name}")).is_file(),
            "no man page for {name}"
        );
        assert!(top.contains(name), "pde.1 does not list {name}");
    }
    for name in [
        "plugin-inspect",
        "plugin-diff",
        "plugin-new",
        "audit-verify",
        "env-check",
    ] {
        assert!(
            page(&format!("pde-{name}")).is_file(),
            "no man page for {name}"
        );
    }
}

#[test]
fn version_says_what_a_bug_report_needs() {
    let dir = tempfile::tempdir().unwrap();
    let o = pde(dir.path(), &["--version"]);
    assert_eq!(code(&o), 0);
    let text = String::from_utf8(o.stdout).unwrap();
    assert!(
        text.starts_with(&format!("pde {}", env!("CARGO_PKG_VERSION"))),
        "{text}"
    );
    for needed in [
        "commit: ",
        "wasmtime: 48.",
        "plugin WIT: pde:plugin@0.1.0, pde:plugin@0.2.0",
        "bundle formats: pde.bundle/",
        "push protocol: v3",
    ] {
        assert!(text.contains(needed), "--version lacks {needed:?}:\n{text}");
    }
    assert!(
        !text.contains("commit: unknown"),
        "built from a git checkout:\n{text}"
    );
}

#[test]
fn the_systemd_unit_is_hardened_and_verifies() {
    let unit_path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/systemd/pde-agent.service");
    let unit = std::fs::read_to_string(&unit_path).unwrap();
    for key in [
        "DynamicUser=yes",
        "ProtectSystem=strict",
        "ReadWritePaths=/var/lib/pde-agent",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        "LoadCredential=agent-token:",
        "--token-file %d/agent-token",
        "MemoryDenyWriteExecute=yes",
        "CapabilityBoundingSet=\n",
        "LimitNOFILE=8192",
        "--max-connections 4096",
        "--header-timeout-secs 10",
    ] {
        assert!(unit.contains(key), "the unit lacks {key:?}");
    }
    // The agent it starts takes exactly these flags.
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart=/usr/local/bin/pde-agent "))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let o = pde(dir.path(), &["agent", "--help"]);
    let help = String::from_utf8(o.stdout).unwrap();
    for flag in exec.split_whitespace().filter(|w| w.starts_with("--")) {
        assert!(help.contains(flag), "pde agent has no {flag}");
    }
    // systemd's own checker, with the binary path pointed at a real one.
    if let Ok(out) = Command::new("systemd-analyze").arg("--version").output()
        && out.status.success()
    {
        let copy = dir.path().join("pde-agent.service");
        let real = format!("ExecStart={} agent ", env!("CARGO_BIN_EXE_pde"));
        std::fs::write(
            &copy,
            unit.replace("ExecStart=/usr/local/bin/pde-agent ", &real),
        )
        .unwrap();
        let o = Command::new("systemd-analyze")
            .args(["verify"])
            .arg(&copy)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "systemd-analyze verify: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

#[test]
fn agent_logs_can_be_json_lines_with_request_ids() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("k");
    assert_eq!(code(&pde(dir.path(), &["keygen", "--out", "k"])), 0);
    let log = dir.path().join("agent.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_pde"))
        .args([
            "agent",
            "--log-format",
            "json",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(dir.path().join("data"))
        .arg("--trusted-key")
        .arg(keys.join("release.ed25519.pub"))
        .stdout(Stdio::piped())
        .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let base = format!(
        "http://{}",
        line.trim().strip_prefix("listening on ").unwrap()
    );
    let answered = support::runtime().block_on(async {
        let c = reqwest::Client::new();
        let r = c
            .get(format!("{base}/active/42"))
            .header("X-Request-Id", "req-7f3a")
            .send()
            .await
            .unwrap();
        (
            r.status().as_u16(),
            r.headers().get("x-request-id").cloned(),
        )
    });
    assert_eq!(answered.0, 404);
    assert_eq!(answered.1.unwrap(), "req-7f3a");
    // Clients that send ids shaped like the agent's own (old: sequential
    // hex; now `agent-<hex>`), and clients that send none.
    support::runtime().block_on(async {
        let c = reqwest::Client::new();
        for id in ["1", "2", "3", "agent-1", "agent-2", "agent-3", "", "", ""] {
            let mut r = c.get(format!("{base}/healthz"));
            if !id.is_empty() {
                r = r.header("X-Request-Id", id);
            }
            let r = r.send().await.unwrap();
            let own = r.headers().get("pde-request-id").unwrap().to_str().unwrap();
            assert!(own.starts_with("agent-"), "{own}");
        }
    });
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(!lines.is_empty());
    let handled = lines
        .iter()
        .find(|l| l["span"]["client_request_id"] == "req-7f3a")
        .unwrap_or_else(|| panic!("no line carries the client's request id:\n{text}"));
    assert_eq!(handled["span"]["path"], "/active/42");
    assert_eq!(handled["fields"]["status"], 404);
    // Both ids are logged, and the agent's own ids never collide, whatever
    // the clients sent.
    let handled: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l["fields"]["message"] == "handled")
        .collect();
    assert_eq!(handled.len(), 10, "{text}");
    let own: std::collections::HashSet<&str> = handled
        .iter()
        .map(|l| l["span"]["request_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        own.len(),
        handled.len(),
        "agent request ids collide:\n{text}"
    );
    assert!(own.iter().all(|id| id.starts_with("agent-")), "{own:?}");
    assert!(
        handled
            .iter()
            .any(|l| l["span"]["client_request_id"] == "agent-1")
    );
}

/// `pde plugin inspect FILE | head -1` panicked ("failed printing to stdout:
/// Broken pipe") and exited 101 (issue 24 §4). The reader here is gone
/// before pde writes its first line, so every write fails.
#[test]
fn a_closed_output_pipe_ends_pde_quietly() {
    let (_, wasm) = support::example_plugins()
        .into_iter()
        .next()
        .expect("an example plugin");
    for args in [
        vec!["plugin", "inspect", wasm.to_str().unwrap()],
        vec![
            "plugin",
            "inspect",
            "--output",
            "json",
            wasm.to_str().unwrap(),
        ],
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_pde"))
            .arg("-C")
            .arg(dir.path())
            .args(&args)
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert_eq!(out.status.code(), Some(141), "{args:?}: {stderr}");
    }
}
