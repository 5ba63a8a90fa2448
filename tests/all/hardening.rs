//! Cases a hostile black-box run found open (issue 10, items 1–7 and 12),
//! each over real parts: temp Git repositories, the `pde` binary, and HTTP
//! servers on 127.0.0.1.
// Test code: a failed unwrap is a failed test, with its location.

use crate::support;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use axum::http::{HeaderMap, StatusCode, header};
use axum::routing::{any, get};
use support::{Svc, Workspace, code, pde, pde_env, stderr};

fn serve(app: axum::Router) -> String {
    let rt = support::runtime();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    rt.spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    format!("http://{addr}")
}

/// A server that counts every request it gets, whatever the path, and answers 200.
fn counting_server() -> (String, Arc<AtomicU32>) {
    let hits = Arc::new(AtomicU32::new(0));
    let h = hits.clone();
    let app = axum::Router::new().fallback(any(move || {
        let h = h.clone();
        async move {
            h.fetch_add(1, Ordering::SeqCst);
            (
                StatusCode::OK,
                "{\"digest\": \"sha256:x\", \"version\": \"1.0.0\"}",
            )
        }
    }));
    (serve(app), hits)
}

fn one_service_workspace(url: &str) -> Workspace {
    let ws = Workspace::new(&Workspace::env_toml(
        "prod",
        "",
        &[Svc {
            name: "HMS-API",
            url: url.to_string(),
            tags: &["api"],
        }],
    ));
    ws.commit("policies");
    ws
}

// ---- item 6: redirects are never followed -------------------------------

#[test]
fn a_307_on_deploy_is_a_permanent_failure_naming_the_location() {
    let (elsewhere, hits) = counting_server();
    let target = format!("{elsewhere}/deploy");
    let app = axum::Router::new()
        .route("/healthz", get(|| async { StatusCode::OK }))
        .route("/active", get(|| async { StatusCode::NOT_FOUND }))
        .fallback(any(move || {
            let target = target.clone();
            async move {
                let mut h = HeaderMap::new();
                h.insert(header::LOCATION, target.parse().unwrap());
                (StatusCode::TEMPORARY_REDIRECT, h)
            }
        }));
    let url = serve(app);
    let ws = one_service_workspace(&url);
    let o = pde(ws.root(), &["deploy", "42", "--env", "prod"]);
    let err = stderr(&o);
    assert_eq!(code(&o), 1, "{err}");
    assert_eq!(
        hits.load(Ordering::SeqCst),
        0,
        "the bundle was re-posted elsewhere"
    );
    let report = ws.engine().state().history("42").unwrap();
    let detail = &report[0].targets[0].detail;
    assert!(detail.contains("307"), "{detail}");
    assert!(detail.contains(&elsewhere), "{detail}");
}

#[test]
fn a_redirecting_health_check_is_unhealthy_and_names_the_location() {
    let (elsewhere, hits) = counting_server();
    let target = format!("{elsewhere}/healthz");
    let app = axum::Router::new().fallback(any(move || {
        let target = target.clone();
        async move {
            let mut h = HeaderMap::new();
            h.insert(header::LOCATION, target.parse().unwrap());
            (StatusCode::FOUND, h)
        }
    }));
    let ws = one_service_workspace(&serve(app));
    let o = pde(ws.root(), &["env", "check", "prod"]);
    assert_eq!(code(&o), 4, "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains(&elsewhere), "{out}");
    assert_eq!(hits.load(Ordering::SeqCst), 0);
}

// ---- item 7: -vvv stays readable ----------------------------------------

#[test]
fn trace_verbosity_keeps_the_compiler_quiet_unless_asked_by_target() {
    let ws = Workspace::new("[environments.prod]\n");
    let (name, wasm) = support::example_plugins().remove(0);
    ws.install_plugin(name, "validator", &wasm, "", false);
    ws.commit("policies and a plugin");
    let cold = |args: &[&str], env: &[(&str, &str)]| {
        // No compiled-plugin cache, in the workspace or per user (a fresh
        // one each run), so every run compiles with cranelift.
        let _ = std::fs::remove_dir_all(ws.root().join(".pde"));
        let user = tempfile::tempdir().unwrap();
        let cache = user.path().join("cache").display().to_string();
        let key = user.path().join("cache.key").display().to_string();
        let mut env = env.to_vec();
        env.extend([
            ("PDE_CACHE_DIR", cache.as_str()),
            ("PDE_CACHE_KEY_FILE", key.as_str()),
        ]);
        let o = pde_env(ws.root(), args, &env);
        assert_eq!(code(&o), 0, "{}", stderr(&o));
        stderr(&o)
    };
    let from_compiler = |log: &str| {
        log.lines()
            .filter(|l| l.contains("cranelift") || l.contains("regalloc"))
            .count()
    };
    let quiet = cold(&["-vvv", "validate", "42"], &[]);
    assert_eq!(from_compiler(&quiet), 0, "{} bytes of log", quiet.len());
    assert!(
        quiet.contains("TRACE") || quiet.contains("DEBUG"),
        "-vvv still logs pde"
    );
    let quiet = cold(&["validate", "42"], &[("RUST_LOG", "trace")]);
    assert_eq!(from_compiler(&quiet), 0, "{} bytes of log", quiet.len());
    // Asked for by target, it is there.
    let loud = cold(&["validate", "42"], &[("RUST_LOG", "warn,cranelift=trace")]);
    assert!(from_compiler(&loud) > 0, "{loud}");
}

// ---- items 1 and 2: the commit vouches for every file that ran -----------

fn agent_workspace(extra: &str) -> (Workspace, String) {
    let ws = Workspace::new("");
    let url = ws.agent("api");
    let env = Workspace::env_toml(
        "prod",
        extra,
        &[Svc {
            name: "HMS-API",
            url: url.clone(),
            tags: &["api", "eligibility"],
        }],
    );
    let toml = std::fs::read_to_string(ws.root().join("pde.toml")).unwrap() + &env;
    std::fs::write(ws.root().join("pde.toml"), toml).unwrap();
    (ws, url)
}

#[test]
fn a_committed_symlinked_policy_is_refused_with_exit_2() {
    let (ws, url) = agent_workspace("");
    let outside = tempfile::tempdir().unwrap();
    let target = outside.path().join("42.json");
    std::fs::write(&target, support::policy_42("1.0.0").to_string()).unwrap();
    let link = ws.root().join("policies/42.json");
    std::fs::remove_file(&link).unwrap();
    std::os::unix::fs::symlink(&target, &link).unwrap();
    ws.commit("policy 42 as a link");
    assert!(support::git(ws.root(), &["status", "--porcelain"]).is_empty());

    let o = pde(ws.root(), &["deploy", "42", "--env", "prod"]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(stderr(&o).contains("symbolic link"), "{}", stderr(&o));
    assert_eq!(support::active_digest(&url), None, "nothing was pushed");
    let o = pde(ws.root(), &["package", "42"]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
}

#[test]
fn a_committed_symlinked_plugin_is_refused_with_exit_2() {
    let (ws, url) = agent_workspace("");
    ws.install_examples();
    let wasm = ws.root().join("plugins/pii-guard.wasm");
    std::fs::remove_file(&wasm).unwrap();
    std::os::unix::fs::symlink(pde_plugin_artifacts::PII_GUARD, &wasm).unwrap();
    ws.commit("pii-guard as a link");
    let o = pde(ws.root(), &["deploy", "42", "--env", "prod"]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(stderr(&o).contains("pii-guard.wasm"), "{}", stderr(&o));
    assert_eq!(support::active_digest(&url), None);
}

fn delete_plugin(ws: &Workspace, name: &str) {
    for ext in ["wasm", "toml", "wasm.sig"] {
        std::fs::remove_file(ws.root().join(format!("plugins/{name}.{ext}"))).unwrap();
    }
}

#[test]
fn a_validator_deleted_from_the_work_tree_is_not_silently_skipped() {
    let (ws, url) = agent_workspace("");
    ws.install_examples();
    ws.commit("policies and plugins");
    delete_plugin(&ws, "pii-guard");
    let o = pde(ws.root(), &["deploy", "42", "--env", "prod"]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(stderr(&o).contains("uncommitted"), "{}", stderr(&o));
    assert!(stderr(&o).contains("pii-guard"), "{}", stderr(&o));
    assert_eq!(support::active_digest(&url), None);
    // Restored, it deploys.
    support::git(ws.root(), &["checkout", "--", "plugins"]);
    let o = pde(ws.root(), &["deploy", "42", "--env", "prod"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
}

#[test]
fn a_missing_required_plugin_stops_the_deploy_before_anything_runs() {
    let (ws, url) = agent_workspace("required_plugins = [\"pii-guard\", \"effective-date\"]");
    ws.install_examples();
    ws.commit("policies and plugins");
    delete_plugin(&ws, "pii-guard");
    support::git(ws.root(), &["commit", "-qam", "drop pii-guard"]);
    let o = pde(ws.root(), &["deploy", "42", "--env", "prod"]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("pii-guard") && !err.contains("effective-date"),
        "{err}"
    );
    assert!(err.contains("required"), "{err}");
    assert_eq!(support::active_digest(&url), None);
    let events: Vec<String> = ws
        .engine()
        .audit()
        .records()
        .unwrap()
        .iter()
        .map(|r| {
            serde_json::to_value(r.event)
                .unwrap()
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(events, ["deploy_start", "deploy_failed"]);
    let o = pde(ws.root(), &["validate", "42", "--env", "prod"]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    // Other environments do not require it.
    let o = pde(ws.root(), &["validate", "42"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
}

// ---- item 5: read-only commands create no state --------------------------

fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn read_only_commands_create_no_state_directory() {
    let (ws, _url) = agent_workspace("");
    ws.install_examples();
    ws.commit("policies and plugins");
    let before = listing(ws.root());
    for args in [
        &["status"][..],
        &["status", "--env", "prod"],
        &["history", "42"],
        &["audit", "verify"],
        &["audit", "show"],
        &["audit", "export"],
        &["validate", "42"],
        &["validate", "42", "--env", "prod"],
        &["plan", "42", "--env", "prod"],
        &["env", "check", "prod"],
    ] {
        let o = pde(ws.root(), args);
        assert_eq!(code(&o), 0, "{args:?}: {}", stderr(&o));
        assert_eq!(listing(ws.root()), before, "{args:?} created state");
    }
    // A deploy creates it, and the read-only commands then read it.
    let o = pde(ws.root(), &["deploy", "42", "--env", "prod"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let o = pde(ws.root(), &["status", "--output", "json"]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("\"42\""));
}

#[test]
fn a_state_directory_outside_the_workspace_needs_an_explicit_setting() {
    let ws = Workspace::new("[environments.prod]\n");
    ws.commit("policies");
    let outside = tempfile::tempdir().unwrap();
    let toml = std::fs::read_to_string(ws.root().join("pde.toml")).unwrap();
    let with_state = |line: &str| {
        let t = toml.replace("state = \".pde\"", line);
        std::fs::write(ws.root().join("pde.toml"), t).unwrap();
    };
    for state in [
        format!("{}", outside.path().display()),
        "../elsewhere".into(),
        "/".into(),
    ] {
        with_state(&format!("state = {state:?}"));
        for args in [&["status"][..], &["deploy", "42", "--env", "prod"]] {
            let o = pde(ws.root(), args);
            assert_eq!(code(&o), 2, "{state} {args:?}: {}", stderr(&o));
            assert!(
                stderr(&o).contains("allow_state_outside_workspace"),
                "{}",
                stderr(&o)
            );
        }
    }
    assert!(listing(outside.path()).is_empty());
    // A link out of the workspace is outside too.
    std::os::unix::fs::symlink(outside.path(), ws.root().join("linked")).unwrap();
    with_state("state = \"linked\"");
    let o = pde(ws.root(), &["status"]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    // Allowed explicitly, it is used; read-only commands still create nothing.
    with_state(&format!(
        "state = {:?}\nallow_state_outside_workspace = true",
        outside.path().display().to_string()
    ));
    let o = pde(ws.root(), &["status"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(listing(outside.path()).is_empty());
    let o = pde(ws.root(), &["package", "42"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(listing(outside.path()).contains(&"dist".to_string()));
}

// ---- item 12: the audit log is anchored outside the state directory ------

fn rewrite_chain(log: &Path, edit: impl Fn(&mut serde_json::Value)) -> (u64, String) {
    let text = std::fs::read_to_string(log).unwrap();
    let mut prev = String::new();
    let mut out = String::new();
    let mut seq = 0;
    for line in text.lines() {
        let mut v: serde_json::Value = serde_json::from_str(line).unwrap();
        edit(&mut v);
        v["prev"] = prev.clone().into();
        v.as_object_mut().unwrap().remove("hash");
        let hash = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(
            pde::bundle::canonical_json(&v),
        ));
        v["hash"] = hash.clone().into();
        out.push_str(&String::from_utf8(pde::bundle::canonical_json(&v)).unwrap());
        out.push('\n');
        prev = hash;
        seq = v["seq"].as_u64().unwrap();
    }
    std::fs::write(log, out).unwrap();
    (seq, prev)
}

#[test]
fn the_audit_log_is_anchored_by_release_tags_and_a_signed_head() {
    let (ws, _url) = agent_workspace("");
    ws.commit("policies");
    let o = pde(ws.root(), &["deploy", "42", "--env", "prod"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let tag = support::git(ws.root(), &["tag", "-l", "-n99", "policy/42/v1.0.0/prod"]);
    assert!(
        tag.contains("audit-seq: ") && tag.contains("audit-hash: "),
        "{tag}"
    );
    let o = pde(ws.root(), &["audit", "verify", "--output", "json"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["anchors_checked"], 1, "{report}");
    assert_eq!(report["head_signature"], "valid", "{report}");

    let state = ws.root().join(".pde");
    let log = state.join("audit.jsonl");
    let head = state.join("audit.head");
    let saved = (std::fs::read(&log).unwrap(), std::fs::read(&head).unwrap());
    let restore = || {
        std::fs::write(&log, &saved.0).unwrap();
        std::fs::write(&head, &saved.1).unwrap();
    };

    // Deleting both files is not "intact: 0 records" while a tag shows a deploy.
    std::fs::remove_file(&log).unwrap();
    std::fs::remove_file(&head).unwrap();
    let o = pde(ws.root(), &["audit", "verify"]);
    assert_eq!(code(&o), 6, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("policy/42/v1.0.0/prod"),
        "{}",
        stderr(&o)
    );
    restore();

    // A rewritten chain with a matching new head: the tag's head is not in it.
    let (seq, hash) = rewrite_chain(&log, |v| v["actor"] = "mallory".into());
    std::fs::write(&head, format!("{{\"seq\":{seq},\"hash\":\"{hash}\"}}")).unwrap();
    let o = pde(ws.root(), &["audit", "verify"]);
    assert_eq!(code(&o), 6, "{}", stderr(&o));
    assert!(stderr(&o).contains("rewritten"), "{}", stderr(&o));
    // And a deploy does not adopt (and sign) that head.
    let o = pde(ws.root(), &["deploy", "42", "--env", "prod"]);
    assert_eq!(code(&o), 6, "{}", stderr(&o));
    restore();

    // Rewriting only what came after the tag: the head's signature tells.
    let n = saved.0.iter().filter(|b| **b == b'\n').count() as u64;
    let (seq, hash) = rewrite_chain(&log, |v| {
        if v["seq"].as_u64() == Some(n) {
            v["actor"] = "mallory".into();
        }
    });
    std::fs::write(&head, format!("{{\"seq\":{seq},\"hash\":\"{hash}\"}}")).unwrap();
    let o = pde(ws.root(), &["audit", "verify"]);
    assert_eq!(code(&o), 6, "{}", stderr(&o));
    assert!(stderr(&o).contains("audit.head"), "{}", stderr(&o));
    restore();
    let o = pde(ws.root(), &["audit", "verify"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));

    // A new signing key: the old head no longer verifies, until a deploy
    // whose log matches every tag adopts and re-signs it.
    pde::keys::generate(&ws.root().join("keys2"), "release.ed25519").unwrap();
    let toml = std::fs::read_to_string(ws.root().join("pde.toml")).unwrap();
    let toml = toml.replace("keys/release.ed25519", "keys2/release.ed25519");
    std::fs::write(ws.root().join("pde.toml"), toml).unwrap();
    let o = pde(ws.root(), &["audit", "verify"]);
    assert_eq!(code(&o), 6, "{}", stderr(&o));
    // A deploy runs under the committed pde.toml only.
    ws.commit("rotate the release key");
    let o = pde(ws.root(), &["deploy", "42", "--env", "prod"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let o = pde(ws.root(), &["audit", "verify"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
}

/// Issue 27 §1: the security team's floor, held outside the repository
/// (`$PDE_TRUST`). A committed pde.toml that lowers a gate is refused (exit
/// 6) naming it; a plugin key trusted only by pde.toml does not count; an
/// expired floor key does not count either.
#[test]
fn the_trust_floor_outside_the_repository_cannot_be_lowered_by_a_commit() {
    let gates =
        "require_signed_plugins = true\nmin_approvals = 1\nrequired_plugins = [\"pii-guard\"]";
    let (ws, _url) = agent_workspace(gates);
    ws.install_examples();
    ws.commit("signed plugins, gates as the security team wants them");
    let floor_dir = tempfile::tempdir().unwrap();
    // The security team's own key, and the workspace's plugin-signing key
    // (keys/security.ed25519) copied in with an expiry the test sets.
    pde::keys::generate(floor_dir.path(), "team.ed25519").unwrap();
    std::fs::copy(
        ws.root().join("keys/security.ed25519.pub"),
        floor_dir.path().join("reviewer.pub"),
    )
    .unwrap();
    let floor = floor_dir.path().join("trust.toml");
    let write_floor = |reviewer_expires: &str| {
        std::fs::write(
            &floor,
            format!(
                "[[plugin_keys]]\nfile = \"team.ed25519.pub\"\nname = \"Security team\"\n\
                 [[plugin_keys]]\nfile = \"reviewer.pub\"\nname = \"Rae (reviewer)\"\n\
                 expires = \"{reviewer_expires}\"\n\
                 [environments.prod]\nmin_approvals = 1\nrequire_signed_plugins = true\n\
                 required_plugins = [\"pii-guard\"]\n"
            ),
        )
        .unwrap();
    };
    let with_floor = [("PDE_TRUST", floor.to_str().unwrap())];
    let validate = || pde_env(ws.root(), &["validate", "42", "--env", "prod"], &with_floor);

    // The reviewer's key is valid: the workspace meets the floor.
    write_floor("2999-12-31");
    let o = validate();
    assert_eq!(code(&o), 0, "{}", stderr(&o));

    // Expired yesterday: the plugins it signed are no longer trusted.
    write_floor("2001-01-01");
    let o = validate();
    assert_eq!(code(&o), 6, "{}", stderr(&o));
    assert!(stderr(&o).contains("pii-guard"), "{}", stderr(&o));
    // Without the floor, pde.toml's own [trust] would have let them run:
    // that is exactly the key a committer controls.
    let o = pde(ws.root(), &["validate", "42", "--env", "prod"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    // `pde plugin verify` counts the keys validate counts (issue 20 §4: one
    // derivation of a workspace's plugin trust); it used to read pde.toml's
    // [trust] alone and call the signature valid.
    let wasm = ws.root().join("plugins/pii-guard.wasm");
    let verify = |env: &[(&str, &str)]| {
        pde_env(
            ws.root(),
            &["plugin", "verify", wasm.to_str().unwrap()],
            env,
        )
    };
    let o = verify(&with_floor);
    assert_eq!(code(&o), 6, "{}", stderr(&o));
    assert_eq!(code(&verify(&[])), 0);

    // A commit that lowers gates: refused, each gate named.
    write_floor("2999-12-31");
    let toml = std::fs::read_to_string(ws.root().join("pde.toml")).unwrap();
    let lowered = toml.replace(gates, "min_approvals = 0");
    std::fs::write(ws.root().join("pde.toml"), lowered).unwrap();
    ws.commit("relax production");
    for args in [
        &["validate", "42", "--env", "prod"][..],
        &["deploy", "42", "--env", "prod"][..],
    ] {
        let o = pde_env(ws.root(), args, &with_floor);
        assert_eq!(code(&o), 6, "{args:?}: {}", stderr(&o));
        let err = stderr(&o);
        for gate in [
            "min_approvals = 0 is below the floor's 1",
            "require_signed_plugins",
            "required_plugins lacks pii-guard",
        ] {
            assert!(err.contains(gate), "{gate} not named: {err}");
        }
    }
}

/// Issue 21 item 4: cutting a rollback's records off the audit log and
/// putting back the signed head saved before it verified as intact, while
/// `pde history` still showed the rollback. The state is now a second
/// witness: `audit verify` fails (exit 6) naming what the chain lacks.
#[test]
fn a_cut_audit_tail_behind_a_restored_head_is_caught_by_the_state() {
    let (ws, _url) = agent_workspace("");
    ws.commit("workspace");
    let o = pde(ws.root(), &["deploy", "42", "--env", "prod"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    ws.write_policy("42.json", &support::policy_42("1.1.0").to_string());
    ws.commit("1.1.0");
    let o = pde(ws.root(), &["deploy", "42", "--env", "prod"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let state = ws.root().join(".pde");
    let (log, head) = (state.join("audit.jsonl"), state.join("audit.head"));
    let saved = (std::fs::read(&log).unwrap(), std::fs::read(&head).unwrap());

    let o = pde(ws.root(), &["rollback", "42", "--env", "prod"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(code(&pde(ws.root(), &["audit", "verify"])), 0);
    std::fs::write(&log, &saved.0).unwrap();
    std::fs::write(&head, &saved.1).unwrap();
    let o = pde(ws.root(), &["audit", "verify"]);
    assert_eq!(code(&o), 6, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("rollback of policy 42 in prod"),
        "{}",
        stderr(&o)
    );
}

// ---- issue 21, item 1: a rollback carries the release key's authority ------

/// How many rollback proofs an agent has accepted (its nonce file).
fn nonces_spent(data_dir: &Path) -> usize {
    match std::fs::read_to_string(data_dir.join("rollback-nonces.json")) {
        Ok(text) => {
            let v: serde_json::Value = serde_json::from_str(&text).unwrap();
            v["nonces"].as_object().unwrap().len()
        }
        Err(_) => 0,
    }
}

#[test]
fn pde_rollback_and_a_pushs_compensation_sign_their_rollbacks_and_real_agents_obey() {
    let ws = Workspace::new("");
    let (prod_dir, stage_dir) = (
        ws.root().join("agents/prod"),
        ws.root().join("agents/stage"),
    );
    let prod = support::AgentProcess::start(&prod_dir, &ws.release_pub());
    let stage = support::AgentProcess::start(&stage_dir, &ws.release_pub());
    let refuses = support::receiver::Receiver::start(support::receiver::Fault::Reject400);
    let svc = |name: &'static str, url: &str| Svc {
        name,
        url: url.to_string(),
        tags: &["api"],
    };
    let envs = Workspace::env_toml("prod", "", &[svc("A", &prod.url), svc("B", &refuses.url)])
        + &Workspace::env_toml("stage", "", &[svc("S", &stage.url)]);
    let toml = std::fs::read_to_string(ws.root().join("pde.toml")).unwrap() + &envs;
    std::fs::write(ws.root().join("pde.toml"), toml).unwrap();
    ws.commit("two environments");

    // Compensation: A takes 42, B refuses it, and A is sent back to nothing
    // with a signed `to: null` that the agent accepts.
    let o = pde(
        ws.root(),
        &["deploy", "42", "--env", "prod", "--output", "json"],
    );
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let a = &report["report"]["push"]["targets"][0];
    assert_eq!(a["state"], "rolled-back", "{report:#}");
    assert_eq!(support::active_digest(&prod.url), None);
    assert_eq!(nonces_spent(&prod_dir), 1, "the compensation was signed");

    // `pde rollback`: 1.0.0 then 1.1.0 to stage, and back, signed.
    let o = pde(
        ws.root(),
        &["deploy", "42", "--env", "stage", "--output", "json"],
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let first: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    ws.write_policy("42.json", &support::policy_42("1.1.0").to_string());
    ws.commit("1.1.0");
    let o = pde(ws.root(), &["deploy", "42", "--env", "stage"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let o = pde(ws.root(), &["rollback", "42", "--env", "stage"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(
        support::active_digest(&stage.url).as_deref(),
        first["digest"].as_str()
    );
    assert_eq!(nonces_spent(&stage_dir), 1, "the rollback was signed");
}

#[test]
fn an_environment_name_agents_would_refuse_is_a_config_error() {
    let ws = Workspace::new(&Workspace::env_toml("\"prod eu\"", "", &[]));
    ws.commit("policies");
    let o = pde(ws.root(), &["validate", "42"]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("environment name \"prod eu\""),
        "{}",
        stderr(&o)
    );
}
