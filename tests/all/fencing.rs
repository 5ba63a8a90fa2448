//! Fencing (issue 21 item 3, push protocol v4), with real parts: a real
//! PostgreSQL whose session of a paused lock holder is terminated, real
//! `pde` processes in two checkouts, real agents (`pde agent` and the
//! agent library the small `pde-agent` binary runs) on loopback.

use crate::support;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use pde::bundle::{Bundle, Manifest, Payload};
use serde_json::{Value, json};
use support::pg::{pde, spawn};
use support::{AgentProcess, Svc, Workspace, code, git, pg, stderr};

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A loopback HTTP endpoint for a readiness check whose first request is
/// held until [`Gate::open`]: a deploy that reaches its environment check
/// pauses there, holding its lock, for as long as the test wants.
struct Gate {
    url: String,
    requests: Arc<AtomicU32>,
    open: Arc<AtomicBool>,
}

impl Gate {
    fn start() -> Gate {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let requests = Arc::new(AtomicU32::new(0));
        let open = Arc::new(AtomicBool::new(false));
        let (r, o) = (requests.clone(), open.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let (r, o) = (r.clone(), o.clone());
                std::thread::spawn(move || {
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        match stream.read(&mut byte) {
                            Ok(1) => head.push(byte[0]),
                            _ => return,
                        }
                    }
                    if r.fetch_add(1, Ordering::SeqCst) == 0 {
                        while !o.load(Ordering::SeqCst) {
                            std::thread::sleep(Duration::from_millis(20));
                        }
                    }
                    let _ = stream.write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                    );
                });
            }
        });
        Gate {
            url,
            requests,
            open,
        }
    }

    fn open(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.open();
    }
}

fn get_json(url: &str) -> (u16, Value) {
    support::runtime().block_on(async {
        let r = reqwest::get(url).await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    })
}

fn post_json(url: &str, headers: &[(&str, String)], body: &Value) -> (u16, Value) {
    support::runtime().block_on(async {
        let mut req = reqwest::Client::new().post(url).json(body);
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    })
}

/// The fence an agent remembers for policy 42 (its document in the data dir).
fn agent_fence(data_dir: &Path) -> Option<u64> {
    let doc: Value =
        serde_json::from_slice(&std::fs::read(data_dir.join("policies/42.json")).ok()?).ok()?;
    doc["fence"].as_u64()
}

/// The red team's case: A holds the PostgreSQL deploy lock and pauses (at
/// its environment check); its database session is terminated, as a
/// failover or a dropped connection would; B takes the lock and deploys.
/// When A wakes it must stop with exit 7, pushing and tagging nothing. It
/// went on (exit 0, its older build replacing B's) before fencing.
#[test]
fn a_holder_whose_session_was_terminated_stops_with_exit_7_and_pushes_nothing() {
    let db = pg::fresh_database();
    let gate = Gate::start();
    let ws = Workspace::new("");
    let data = ws.root().join("agents/prod");
    let agent = AgentProcess::start(&data, &ws.release_pub());
    let envs = Workspace::env_toml(
        "production",
        "",
        &[Svc {
            name: "HMS-API",
            url: agent.url.clone(),
            tags: &["api"],
        }],
    ) + &format!(
        "[[environments.production.checks]]\nkind = \"http\"\nname = \"gate\"\nurl = \"{}\"\n",
        gate.url
    );
    let toml = std::fs::read_to_string(ws.root().join("pde.toml")).unwrap() + &envs;
    let toml = toml
        .replace(
            "state = \".pde\"\n",
            &format!(
                "state = {{ dir = \".pde\", url = \"{db}\", password_env = \"{}\" }}\n",
                pg::PASSWORD_ENV
            ),
        )
        // The paused check must outlast B's whole deploy.
        .replace("timeout_ms = 1500", "timeout_ms = 120000");
    std::fs::write(ws.root().join("pde.toml"), toml).unwrap();
    ws.commit("init");
    // B: a clone at 1.0.0. A: 1.1.0, so what A would push is visible.
    let b_dir = tempfile::tempdir().unwrap();
    git(
        b_dir.path(),
        &["clone", "-q", &ws.root().display().to_string(), "b"],
    );
    let b = b_dir.path().join("b");
    ws.write_policy("42.json", &support::policy_42("1.1.0").to_string());
    ws.commit("1.1.0");

    let a = spawn(ws.root(), &["deploy", "42", "--env", "production"]);
    wait_until("A to reach its environment check", || {
        gate.requests.load(Ordering::SeqCst) >= 1
    });
    // A holds the lock on its own session; the server ends that session.
    let terminated = pg::psql(
        pg::database_of(&db),
        "SELECT pg_terminate_backend(pid) FROM pg_locks
         WHERE locktype = 'advisory' AND granted
           AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
    );
    assert_eq!(
        terminated.trim(),
        "t",
        "one lock session ended: {terminated:?}"
    );

    // B takes the lock and deploys 1.0.0.
    let mut o = pde(&b, &["deploy", "42", "--env", "production"]);
    // The server may take a moment to forget the ended session's lock.
    wait_until("B to get the lock", || {
        if code(&o) == 7 {
            o = pde(&b, &["deploy", "42", "--env", "production"]);
        }
        code(&o) != 7
    });
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let b_digest = support::active_digest(&agent.url).expect("B's deploy is active");

    // A wakes.
    gate.open();
    let a = a.wait_with_output().unwrap();
    assert_eq!(code(&a), 7, "A must stop: {}", stderr(&a));
    let message = stderr(&a);
    assert!(
        message.contains("no longer held") && message.contains("session"),
        "says the lock is gone and why: {message}"
    );
    // Nothing of A's reached the agent, and A made no tag.
    assert_eq!(
        support::active_digest(&agent.url).as_deref(),
        Some(b_digest.as_str())
    );
    let (_, listed) = get_json(&format!("{}/bundles?policy_id=42", agent.url));
    let versions: Vec<&str> = listed["bundles"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["version"].as_str().unwrap())
        .collect();
    assert_eq!(versions, vec!["1.0.0"], "{listed}");
    assert!(
        !ws.tags().iter().any(|t| t.contains("v1.1.0")),
        "A tagged: {:?}",
        ws.tags()
    );
    // B's deploy carried a fence from the database server's clock.
    let fence = agent_fence(&data).expect("the agent remembers B's fence");
    assert!(fence > 1_700_000_000_000_000, "{fence}");
    // The shared chain is intact.
    let o = pde(&b, &["audit", "verify"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
}

fn seal(key: &SigningKey, version: &str) -> Bundle {
    Bundle::seal(
        Payload {
            manifest: Manifest {
                policy_id: "42".into(),
                version: version.into(),
                source_commit: "0".repeat(40),
                validators: vec![],
            },
            policy: support::policy_42(version),
        },
        &[key],
    )
    .unwrap()
}

/// `POST /deploy` of `bundle` for `env`, with `fence` signed by `signer`.
fn deploy(
    url: &str,
    bundle: &Bundle,
    env: &str,
    fence: Option<u64>,
    signer: Option<&SigningKey>,
) -> (u16, Value) {
    let mut body = json!({"bundle": bundle, "env": env});
    if let Some(f) = fence {
        body["fence"] = f.into();
        if let Some(k) = signer {
            let proof = pde_core::fence::sign_deploy(k, "42", &bundle.digest, env, f).unwrap();
            body["fence_proof"] = serde_json::to_value(proof).unwrap();
        }
    }
    post_json(
        &format!("{url}/deploy"),
        &[("Idempotency-Key", format!("{}:{env}", bundle.digest))],
        &body,
    )
}

fn rollback_body(to: Option<&str>, fence: Option<u64>, key: &SigningKey) -> Value {
    pde_core::rollback::request_body("42", to, "prod", fence, Some(key)).unwrap()
}

/// What every agent (`pde agent` and the library the small `pde-agent`
/// binary runs) does with fences, over loopback.
fn refuses_lower_fences(url: &str, key: &SigningKey, restart: &mut dyn FnMut() -> String) {
    let now = pde_core::fence::now_micros();
    let (b1, b2, b3) = (seal(key, "1.0.0"), seal(key, "1.1.0"), seal(key, "1.2.0"));
    // An unfenced (protocol v3) deploy is taken while no fence was seen.
    assert_eq!(deploy(url, &b1, "prod", None, None).0, 200);
    let (status, body) = deploy(url, &b2, "prod", Some(now), Some(key));
    assert_eq!(status, 200, "{body}");

    // Lower than the highest seen, or none: 409 fence_stale, nothing changes.
    for (fence, what) in [(Some(now - 1), "a lower fence"), (None, "no fence")] {
        let (status, body) = deploy(url, &b3, "prod", fence, Some(key));
        assert_eq!(status, 409, "{what}: {body}");
        assert_eq!(body["error"], "fence_stale", "{what}: {body}");
        assert_eq!(
            support::active_digest(url),
            Some(b2.digest.clone()),
            "{what}"
        );
    }
    // A fence must be signed, for this bundle and environment, and not
    // from the future.
    let (status, body) = deploy(url, &b3, "prod", Some(now + 5), None);
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("fence_signature_rejected")),
        "{body}"
    );
    let mut moved = json!({"bundle": b3, "env": "prod", "fence": now + 5});
    moved["fence_proof"] = serde_json::to_value(
        pde_core::fence::sign_deploy(key, "42", &b3.digest, "dev", now + 5).unwrap(),
    )
    .unwrap();
    let (status, body) = post_json(
        &format!("{url}/deploy"),
        &[("Idempotency-Key", format!("{}:prod", b3.digest))],
        &moved,
    );
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("fence_signature_rejected")),
        "{body}"
    );
    let ahead = now + 3_600_000_000;
    let (status, body) = deploy(url, &b3, "prod", Some(ahead), Some(key));
    assert_eq!(
        (status, body["error"].as_str()),
        (409, Some("fence_ahead")),
        "{body}"
    );
    assert_eq!(support::active_digest(url), Some(b2.digest.clone()));

    // A signed rollback with a lower fence is refused too.
    let (status, body) = post_json(
        &format!("{url}/rollback"),
        &[],
        &rollback_body(Some(&b1.digest), Some(now - 1), key),
    );
    assert_eq!(
        (status, body["error"].as_str()),
        (409, Some("fence_stale")),
        "{body}"
    );
    assert_eq!(support::active_digest(url), Some(b2.digest.clone()));

    // Durable: after a restart, still refused; the same fence repeats.
    let url = restart();
    let (status, body) = deploy(&url, &b3, "prod", Some(now - 1), Some(key));
    assert_eq!(
        (status, body["error"].as_str()),
        (409, Some("fence_stale")),
        "{body}"
    );
    let (status, body) = deploy(&url, &b2, "prod", Some(now), Some(key));
    assert_eq!(status, 200, "a retry under the same lock: {body}");
    // A newer lock deploys.
    let (status, body) = deploy(&url, &b3, "prod", Some(now + 1), Some(key));
    assert_eq!(status, 200, "{body}");
    assert_eq!(support::active_digest(&url), Some(b3.digest.clone()));
    let metrics = support::runtime().block_on(async {
        reqwest::get(format!("{url}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    });
    assert!(
        metrics.contains("reason=\"fence\""),
        "refusals are counted: {metrics}"
    );
}

#[test]
fn the_pde_agent_process_refuses_a_lower_fence_with_409_even_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let key = SigningKey::from_bytes(&[9; 32]);
    let public = dir.path().join("release.pub");
    std::fs::write(&public, hex::encode(key.verifying_key().to_bytes())).unwrap();
    let data = dir.path().join("data");
    let mut agent = AgentProcess::start(&data, &public);
    let url = agent.url.clone();
    let mut restart = || {
        agent.stop();
        agent = AgentProcess::start(&data, &public);
        agent.url.clone()
    };
    refuses_lower_fences(&url, &key, &mut restart);
}

#[test]
fn the_agent_library_of_pde_agent_refuses_a_lower_fence_with_409() {
    let dir = tempfile::tempdir().unwrap();
    let key = SigningKey::from_bytes(&[9; 32]);
    let public = dir.path().join("release.pub");
    std::fs::write(&public, hex::encode(key.verifying_key().to_bytes())).unwrap();
    let url = support::start_agent(&dir.path().join("data"), &public);
    // The in-process agent cannot be restarted here; a second one on the
    // same data dir would be refused while the first runs.
    let mut same = || url.clone();
    refuses_lower_fences(&url, &key, &mut same);
}

/// The replay the signed rollback left open (SECURITY.md): a proof sent to
/// agent X, replayed to agent Y of the same environment within the
/// freshness window. Y's own rollback under the same lock spent the fence,
/// so the replay is refused (before fencing it was a fresh nonce to Y and
/// walked `to: null` one step further back).
#[test]
fn a_rollback_replayed_to_another_agent_of_the_environment_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let key = SigningKey::from_bytes(&[9; 32]);
    let public = dir.path().join("release.pub");
    std::fs::write(&public, hex::encode(key.verifying_key().to_bytes())).unwrap();
    let x = AgentProcess::start(&dir.path().join("x"), &public);
    let y = AgentProcess::start(&dir.path().join("y"), &public);
    let (b1, b2, b3) = (
        seal(&key, "1.0.0"),
        seal(&key, "1.1.0"),
        seal(&key, "1.2.0"),
    );
    let deployed = pde_core::fence::now_micros();
    for agent in [&x, &y] {
        for (b, f) in [(&b1, deployed - 2), (&b2, deployed - 1), (&b3, deployed)] {
            let (status, body) = deploy(&agent.url, b, "prod", Some(f), Some(&key));
            assert_eq!(status, 200, "{body}");
        }
    }
    // pde rolls both back one step under a new lock: one proof per agent.
    let fence = deployed + 1;
    let to_x = rollback_body(None, Some(fence), &key);
    let to_y = rollback_body(None, Some(fence), &key);
    for (agent, body) in [(&x, &to_x), (&y, &to_y)] {
        let (status, answer) = post_json(&format!("{}/rollback", agent.url), &[], body);
        assert_eq!(status, 200, "{answer}");
        assert_eq!(support::active_digest(&agent.url), Some(b2.digest.clone()));
    }
    // X's proof, replayed to Y: fresh nonce there, same fence, refused.
    let (status, answer) = post_json(&format!("{}/rollback", y.url), &[], &to_x);
    assert_eq!(
        (status, answer["error"].as_str()),
        (409, Some("fence_stale")),
        "{answer}"
    );
    assert_eq!(
        support::active_digest(&y.url),
        Some(b2.digest.clone()),
        "not walked back to 1.0.0"
    );
}

/// Two engineers with separate SQLite states, or a fresh clone, push the
/// same policy to the same agent: fences come from the clock, so the fresh
/// state's first fence is above what the long-lived one sent. (With a
/// counter per state, the clone's fence 1 would be refused forever.)
#[test]
fn a_fresh_clone_with_its_own_sqlite_state_is_not_refused() {
    let ws = Workspace::new("");
    let data = ws.root().join("agents/prod");
    let agent = AgentProcess::start(&data, &ws.release_pub());
    let envs = Workspace::env_toml(
        "prod",
        "",
        &[Svc {
            name: "HMS-API",
            url: agent.url.clone(),
            tags: &["api"],
        }],
    );
    let toml = std::fs::read_to_string(ws.root().join("pde.toml")).unwrap() + &envs;
    std::fs::write(ws.root().join("pde.toml"), toml).unwrap();
    ws.commit("init");
    // Engineer A deploys three versions (three fences).
    for v in ["1.0.0", "1.1.0", "1.2.0"] {
        ws.write_policy("42.json", &support::policy_42(v).to_string());
        ws.commit(v);
        let o = pde(ws.root(), &["deploy", "42", "--env", "prod"]);
        assert_eq!(code(&o), 0, "{v}: {}", stderr(&o));
    }
    let a_fence = agent_fence(&data).expect("fenced");
    // Engineer B: a fresh clone, its own (empty) SQLite state.
    let b_dir = tempfile::tempdir().unwrap();
    git(
        b_dir.path(),
        &["clone", "-q", &ws.root().display().to_string(), "b"],
    );
    let b = b_dir.path().join("b");
    let o = pde(&b, &["deploy", "42", "--env", "prod"]);
    assert_eq!(code(&o), 0, "B's first deploy: {}", stderr(&o));
    std::fs::write(
        b.join("policies/42.json"),
        support::policy_42("1.3.0").to_string(),
    )
    .unwrap();
    git(&b, &["commit", "-qam", "1.3.0"]);
    let o = pde(&b, &["deploy", "42", "--env", "prod"]);
    assert_eq!(code(&o), 0, "B deploys a new version: {}", stderr(&o));
    let b_fence = agent_fence(&data).unwrap();
    assert!(b_fence > a_fence, "{b_fence} > {a_fence}");
    // And A, after B, is not refused either.
    let o = pde(ws.root(), &["rollback", "42", "--env", "prod", "--yes"]);
    assert_eq!(code(&o), 0, "A rolls back after B: {}", stderr(&o));
}
