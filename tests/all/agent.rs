//! `pde agent` over real HTTP on loopback.
//!
//! Two kinds of agent are exercised: one served in-process on 127.0.0.1:0 (for
//! the protocol cases), and the real `pde` binary spawned as a process (for
//! start-up refusal, restarts and `kill -9`). Bundles are sealed with real
//! ed25519 keys generated into temp dirs; nothing is mocked.
// Test code: a failed unwrap is a failed test, with its location.

use crate::support;

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use ed25519_dalek::SigningKey;
use pde::bundle::{Bundle, Manifest, Payload};
use pde::error::{ExitCode, HasExitCode};
use pde::keys::{self, TrustedKeys};
use pde_agent::{Agent, AgentConfig, AgentError};
use pde_core::rollback::{MAX_SKEW_SECS, SignedRollback, Statement};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ENV: &str = "staging";

/// A signing key and the public key file an agent trusts.
struct Signer {
    key: SigningKey,
    public: PathBuf,
    _dir: tempfile::TempDir,
}

fn signer() -> Signer {
    let dir = tempfile::tempdir().unwrap();
    let generated = keys::generate(dir.path(), "release").unwrap();
    Signer {
        key: keys::load_signing_key(&generated.secret_path).unwrap(),
        public: generated.public_path,
        _dir: dir,
    }
}

fn trusted(signer: &Signer) -> TrustedKeys {
    TrustedKeys::from_files(&[&signer.public]).unwrap()
}

fn payload(policy_id: &str, version: &str) -> Payload {
    Payload {
        manifest: Manifest {
            policy_id: policy_id.into(),
            version: version.into(),
            source_commit: "0123456789abcdef".into(),
            validators: vec![],
        },
        policy: json!({
            "id": policy_id,
            "version": version,
            "title": "Income threshold",
            "agency": "HMS",
            "effective": "2027-01-01",
            "approvals": [{"by": "a", "role": "director", "at": "2026-11-01"}],
            "rules": [{"key": "income.max", "category": "eligibility", "value": 32000, "description": "cap"}],
            "config": {}
        }),
    }
}

/// A bundle of policy 42.
fn sealed(signer: &Signer, version: &str) -> Bundle {
    sealed_for(signer, "42", version)
}

fn sealed_for(signer: &Signer, policy_id: &str, version: &str) -> Bundle {
    Bundle::seal(payload(policy_id, version), &[&signer.key]).unwrap()
}

fn to_json(bundle: &Bundle) -> Value {
    serde_json::to_value(bundle).unwrap()
}

fn key_for(bundle: &Bundle) -> String {
    format!("{}:{ENV}", bundle.digest)
}

fn policy_file(data_dir: &Path, policy_id: &str) -> PathBuf {
    data_dir.join("policies").join(format!("{policy_id}.json"))
}

fn bundle_file(data_dir: &Path, digest: &str) -> PathBuf {
    data_dir
        .join("bundles")
        .join(format!("{}.json", digest.strip_prefix("sha256:").unwrap()))
}

/// An in-process agent serving on 127.0.0.1:0.
struct Running {
    base: String,
    data_dir: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    _dir: tempfile::TempDir,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

fn config(dir: &Path, trusted: TrustedKeys) -> AgentConfig {
    let mut cfg = AgentConfig::new(dir.join("data"));
    cfg.trusted = trusted;
    cfg
}

async fn start_with(mut cfg: AgentConfig, dir: tempfile::TempDir) -> Running {
    let data_dir = dir.path().join("data");
    cfg.data_dir = data_dir.clone();
    let agent = Agent::open(cfg).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(agent.serve(listener, async move {
        let _ = rx.await;
    }));
    Running {
        base: format!("http://{addr}"),
        data_dir,
        stop: Some(tx),
        _dir: dir,
    }
}

async fn start(signer: &Signer) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), trusted(signer));
    start_with(cfg, dir).await
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

async fn send_deploy(
    c: &reqwest::Client,
    base: &str,
    bundle: &Value,
    key: Option<&str>,
    token: Option<&str>,
) -> (StatusCode, Value) {
    send_deploy_to(c, base, bundle, ENV, key, token).await
}

async fn send_deploy_to(
    c: &reqwest::Client,
    base: &str,
    bundle: &Value,
    env: &str,
    key: Option<&str>,
    token: Option<&str>,
) -> (StatusCode, Value) {
    let mut req = c
        .post(format!("{base}/deploy"))
        .json(&json!({"bundle": bundle, "env": env}));
    if let Some(key) = key {
        req = req.header("Idempotency-Key", key);
    }
    if let Some(token) = token {
        req = req.bearer_auth(token);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status();
    (status, resp.json().await.unwrap_or(Value::Null))
}

async fn deploy(c: &reqwest::Client, base: &str, bundle: &Bundle) -> (StatusCode, Value) {
    send_deploy(c, base, &to_json(bundle), Some(&key_for(bundle)), None).await
}

async fn get(c: &reqwest::Client, url: String) -> (StatusCode, Value) {
    let resp = c.get(url).send().await.unwrap();
    let status = resp.status();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// A `POST /rollback` with a fresh proof signed by `s` for [`ENV`].
async fn rollback(
    c: &reqwest::Client,
    base: &str,
    s: &Signer,
    policy_id: &str,
    to: Value,
) -> (StatusCode, Value) {
    let statement = Statement::new(policy_id, to.as_str(), ENV);
    rollback_raw(c, base, rollback_body(&statement, &s.key, &to)).await
}

/// A rollback body for `to` carrying `statement` signed by `key`.
fn rollback_body(statement: &Statement, key: &SigningKey, to: &Value) -> Value {
    let proof = SignedRollback::sign(statement.clone(), key).unwrap();
    json!({ "policy_id": statement.policy_id, "to": to, "proof": proof })
}

async fn rollback_raw(c: &reqwest::Client, base: &str, body: Value) -> (StatusCode, Value) {
    let resp = c
        .post(format!("{base}/rollback"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = resp.status();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// The digest active for `policy_id` (`GET /active/{policy_id}`), `None` on 404.
async fn active_digest(c: &reqwest::Client, base: &str, policy_id: &str) -> Option<String> {
    let (status, body) = get(c, format!("{base}/active/{policy_id}")).await;
    match status {
        StatusCode::OK => {
            assert_eq!(body["policy_id"], policy_id, "{body}");
            Some(body["digest"].as_str().unwrap().to_string())
        }
        StatusCode::NOT_FOUND => {
            assert_eq!(body["error"], "policy_not_active", "{body}");
            None
        }
        other => panic!("GET /active/{policy_id} answered {other}: {body}"),
    }
}

/// `GET /active` as policy id → active digest. It is never a 404.
async fn active_all(c: &reqwest::Client, base: &str) -> BTreeMap<String, String> {
    let (status, body) = get(c, format!("{base}/active")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["policies"]
        .as_object()
        .unwrap_or_else(|| panic!("no `policies` object: {body}"))
        .iter()
        .map(|(id, record)| {
            assert_eq!(record["policy_id"], id.as_str(), "{body}");
            (id.clone(), record["digest"].as_str().unwrap().to_string())
        })
        .collect()
}

fn actives(pairs: &[(&str, &Bundle)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(id, b)| (id.to_string(), b.digest.clone()))
        .collect()
}

async fn stored(c: &reqwest::Client, base: &str) -> Vec<String> {
    list_bundles(c, format!("{base}/bundles")).await
}

async fn stored_for(c: &reqwest::Client, base: &str, policy_id: &str) -> Vec<String> {
    list_bundles(c, format!("{base}/bundles?policy_id={policy_id}")).await
}

async fn list_bundles(c: &reqwest::Client, url: String) -> Vec<String> {
    let (status, body) = get(c, url).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["bundles"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["digest"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn happy_path_stores_activates_and_reports() {
    let s = signer();
    let agent = start(&s).await;
    let c = client();
    let (status, health) = get(&c, format!("{}/healthz", agent.base)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(health, json!({"status": "ok", "protocols": [3, 4]}));
    assert_eq!(
        get(&c, format!("{}/readyz", agent.base)).await.0,
        StatusCode::OK
    );
    // Nothing active: `/active` is an empty map (never a 404), and one
    // policy's record is a 404 naming why.
    let (status, body) = get(&c, format!("{}/active", agent.base)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, json!({"policies": {}}));
    assert_eq!(active_digest(&c, &agent.base, "42").await, None);
    // Errors are JSON everywhere, unknown paths and methods included.
    let (status, body) = get(&c, format!("{}/nope", agent.base)).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::NOT_FOUND, Some("not_found"))
    );
    // Every answer, errors included, names the protocol version spoken.
    for path in ["/healthz", "/active", "/active/42", "/bundles", "/nope"] {
        let resp = c.get(format!("{}{path}", agent.base)).send().await.unwrap();
        assert_eq!(
            resp.headers()
                .get("pde-protocol")
                .and_then(|v| v.to_str().ok()),
            Some("4"),
            "GET {path}"
        );
    }
    let (status, body) = get(&c, format!("{}/deploy", agent.base)).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(body["error"], "method_not_allowed");

    let b = sealed(&s, "1.0.0");
    let (status, body) = deploy(&c, &agent.base, &b).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["outcome"], "activated");

    let (status, active) = get(&c, format!("{}/active/42", agent.base)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(active["digest"], b.digest.as_str());
    assert_eq!(active["version"], "1.0.0");
    assert_eq!(active["policy_id"], "42");
    assert_eq!(active["env"], ENV);
    assert!(active["activated_at"].as_str().unwrap().contains('T'));
    assert!(
        active.get("hook_failed").is_none(),
        "no hook configured: {active}"
    );
    // `/active` holds the same record under the policy id, and nothing else.
    let (status, all) = get(&c, format!("{}/active", agent.base)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(all, json!({"policies": {"42": active}}));
    assert_eq!(active_digest(&c, &agent.base, "43").await, None);

    let (_, listed) = get(&c, format!("{}/bundles", agent.base)).await;
    assert_eq!(listed["bundles"][0]["digest"], b.digest.as_str());
    assert_eq!(listed["bundles"][0]["version"], "1.0.0");
    assert_eq!(listed["bundles"][0]["policy_id"], "42");
    assert_eq!(listed["bundles"][0]["active"], true);

    // The policy's state is its own file; the v1 single state file is gone.
    assert!(policy_file(&agent.data_dir, "42").exists());
    assert!(!agent.data_dir.join("state.json").exists());

    // The stored file is the bundle, byte for byte canonical, and verifies.
    let bytes = std::fs::read(bundle_file(&agent.data_dir, &b.digest)).unwrap();
    assert_eq!(bytes, b.to_canonical_bytes());
    Bundle::from_slice(&bytes)
        .unwrap()
        .verify_signature(&trusted(&s))
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn same_key_same_digest_is_a_no_op() {
    let s = signer();
    let agent = start(&s).await;
    let c = client();
    let b = sealed(&s, "1.0.0");
    let (status, _) = deploy(&c, &agent.base, &b).await;
    assert_eq!(status, StatusCode::OK);
    let (_, first) = get(&c, format!("{}/active", agent.base)).await;
    assert_eq!(
        first["policies"]["42"]["digest"],
        b.digest.as_str(),
        "{first}"
    );

    let (status, body) = deploy(&c, &agent.base, &b).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["outcome"], "unchanged");
    let (_, second) = get(&c, format!("{}/active", agent.base)).await;
    assert_eq!(first, second, "a repeat must not re-activate");
    assert_eq!(stored(&c, &agent.base).await, vec![b.digest.clone()]);
}

#[tokio::test(flavor = "multi_thread")]
async fn same_key_other_digest_is_422_and_changes_nothing() {
    let s = signer();
    let agent = start(&s).await;
    let c = client();
    let a = sealed(&s, "1.0.0");
    let b = sealed(&s, "1.1.0");
    assert_eq!(deploy(&c, &agent.base, &a).await.0, StatusCode::OK);
    let (status, body) = send_deploy(&c, &agent.base, &to_json(&b), Some(&key_for(&a)), None).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["error"], "idempotency_conflict");
    assert!(body["reason"].as_str().unwrap().contains(&a.digest));
    assert_eq!(
        active_digest(&c, &agent.base, "42").await,
        Some(a.digest.clone())
    );
    assert_eq!(stored(&c, &agent.base).await, vec![a.digest.clone()]);
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_idempotency_key_is_400() {
    let s = signer();
    let agent = start(&s).await;
    let c = client();
    let b = sealed(&s, "1.0.0");
    let (status, body) = send_deploy(&c, &agent.base, &to_json(&b), None, None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"], "missing_idempotency_key");
    assert!(body["reason"].as_str().unwrap().contains("Idempotency-Key"));
    assert_eq!(active_digest(&c, &agent.base, "42").await, None);
}

#[tokio::test(flavor = "multi_thread")]
async fn tampered_payload_is_rejected_and_active_untouched() {
    let s = signer();
    let agent = start(&s).await;
    let c = client();
    let good = sealed(&s, "1.0.0");
    assert_eq!(deploy(&c, &agent.base, &good).await.0, StatusCode::OK);

    let evil = sealed(&s, "1.1.0");
    let mut tampered = to_json(&evil);
    tampered["payload"]["policy"]["rules"][0]["value"] = json!(9_999_999);
    let (status, body) = send_deploy(&c, &agent.base, &tampered, Some(&key_for(&evil)), None).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["error"], "digest_mismatch");
    assert!(body["reason"].as_str().unwrap().contains(&evil.digest));
    assert_eq!(
        active_digest(&c, &agent.base, "42").await,
        Some(good.digest.clone())
    );
    assert_eq!(stored(&c, &agent.base).await, vec![good.digest.clone()]);
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_signatures_are_rejected_and_active_untouched() {
    let s = signer();
    let stranger = signer();
    let agent = start(&s).await;
    let c = client();
    let good = sealed(&s, "1.0.0");
    assert_eq!(deploy(&c, &agent.base, &good).await.0, StatusCode::OK);

    // Signed by a key the agent does not trust.
    let foreign = sealed(&stranger, "1.1.0");
    let (status, body) = deploy(&c, &agent.base, &foreign).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["error"], "signature_rejected");
    assert!(body["reason"].as_str().unwrap().contains("untrusted key"));

    // Claims the trusted key id, but the signature is another message's.
    let mut forged = sealed(&s, "1.2.0");
    forged.signatures = vec![keys::sign(&s.key, good.digest.as_bytes())];
    let (status, body) = deploy(&c, &agent.base, &forged).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(body["reason"].as_str().unwrap().contains("does not match"));

    // No signature at all.
    let mut unsigned = sealed(&s, "1.3.0");
    unsigned.signatures.clear();
    let (status, body) = deploy(&c, &agent.base, &unsigned).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");

    assert_eq!(
        active_digest(&c, &agent.base, "42").await,
        Some(good.digest.clone())
    );
    assert_eq!(stored(&c, &agent.base).await, vec![good.digest.clone()]);
}

#[tokio::test(flavor = "multi_thread")]
async fn unsigned_bundles_need_the_explicit_insecure_flag() {
    let dir = tempfile::tempdir().unwrap();
    // The library refuses, as a usage error.
    let mut cfg = AgentConfig::new(dir.path().join("data"));
    cfg.token = Some("hunter2-secret".into());
    assert!(
        !format!("{cfg:?}").contains("hunter2"),
        "Debug must redact the token"
    );
    let err = Agent::open(cfg).err().unwrap();
    assert!(matches!(err, AgentError::NoTrustedKeys));
    assert_eq!(err.exit_code(), ExitCode::Usage);

    // The binary refuses to start: exit 2 and a message naming both ways out.
    let out = Command::new(env!("CARGO_BIN_EXE_pde"))
        .args(["agent", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no trusted key"), "{stderr}");
    assert!(stderr.contains("--insecure-accept-unsigned"), "{stderr}");
    assert!(stderr.contains("--trusted-key"), "{stderr}");
    assert!(out.stdout.is_empty(), "it must not have started listening");

    // The flag alone is not enough: with neither a trusted key nor a token,
    // nothing would authorise a rollback, so it refuses to start.
    let mut cfg = AgentConfig::new(dir.path().join("data"));
    cfg.insecure_accept_unsigned = true;
    let err = Agent::open(cfg).err().unwrap();
    assert!(matches!(err, AgentError::NoAuthority), "{err}");
    assert_eq!(err.exit_code(), ExitCode::Usage);
    let out = Command::new(env!("CARGO_BIN_EXE_pde"))
        .args([
            "agent",
            "--listen",
            "127.0.0.1:0",
            "--insecure-accept-unsigned",
            "--data-dir",
        ])
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("without a bearer token"), "{stderr}");
    assert!(out.stdout.is_empty(), "it must not have started listening");

    // With the flag and a token, an unsigned bundle is accepted, and the
    // token alone authorises a rollback.
    let mut cfg = AgentConfig::new(dir.path().join("data"));
    cfg.insecure_accept_unsigned = true;
    cfg.token = Some("tok".into());
    let agent = start_with(cfg, dir).await;
    let s = signer();
    let mut unsigned = sealed(&s, "1.0.0");
    unsigned.signatures.clear();
    let c = client();
    let (status, body) = send_deploy(
        &c,
        &agent.base,
        &to_json(&unsigned),
        Some(&key_for(&unsigned)),
        Some("tok"),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = get(&c, format!("{}/active/42", agent.base)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    let resp = c
        .get(format!("{}/active/42", agent.base))
        .bearer_auth("tok")
        .send()
        .await
        .unwrap();
    let active: Value = resp.json().await.unwrap();
    assert_eq!(active["digest"], unsigned.digest.as_str());
    let resp = c
        .post(format!("{}/rollback", agent.base))
        .bearer_auth("tok")
        .json(&json!({"policy_id": "42", "to": null}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
}

/// Sends raw bytes and returns what the server answered until it closed.
async fn raw_exchange(base: &str, head: &str, body: &[u8]) -> String {
    let addr = base.strip_prefix("http://").unwrap();
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    // The server may answer and close before taking all of this; that is the point.
    let _ = stream.write_all(body).await;
    let mut answer = Vec::new();
    // A generous bound: an agent that waited for the announced body would hang here.
    let read = tokio::time::timeout(Duration::from_secs(30), async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    answer.extend_from_slice(&buf[..n]);
                    if answer.windows(4).any(|w| w == b"\r\n\r\n")
                        && String::from_utf8_lossy(&answer).contains("\"reason\"")
                    {
                        break;
                    }
                }
            }
        }
    })
    .await;
    assert!(
        read.is_ok(),
        "no answer: the agent is waiting for the whole body"
    );
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_bodies_get_413_without_being_read() {
    let s = signer();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), trusted(&s));
    cfg.max_body_bytes = 64 * 1024;
    let agent = start_with(cfg, dir).await;
    let c = client();

    // A real client sending a real oversized deploy.
    let mut big = to_json(&sealed(&s, "1.0.0"));
    big["payload"]["policy"]["config"]["blob"] = json!("x".repeat(256 * 1024));
    let (status, body) = send_deploy(&c, &agent.base, &big, Some("k"), None).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert_eq!(body["error"], "payload_too_large");

    // Announces 1 GiB and sends 1 KiB: the answer must come anyway.
    let head = format!(
        "POST /deploy HTTP/1.1\r\nHost: agent\r\nIdempotency-Key: k\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        1u64 << 30
    );
    let answer = raw_exchange(&agent.base, &head, &[b' '; 1024]).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("payload_too_large"), "{answer}");

    // Chunked, with no length announced: cut off at the limit.
    let head = "POST /deploy HTTP/1.1\r\nHost: agent\r\nIdempotency-Key: k\r\n\
                Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
    let mut chunks = Vec::new();
    for _ in 0..20 {
        chunks.extend_from_slice(format!("{:x}\r\n", 8192).as_bytes());
        chunks.extend_from_slice(&[b' '; 8192]);
        chunks.extend_from_slice(b"\r\n");
    }
    let answer = raw_exchange(&agent.base, head, &chunks).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");

    assert_eq!(active_digest(&c, &agent.base, "42").await, None);
}

#[tokio::test(flavor = "multi_thread")]
async fn rollback_to_previous_and_to_named_digest() {
    let s = signer();
    let agent = start(&s).await;
    let c = client();
    let (status, body) = rollback(&c, &agent.base, &s, "42", Value::Null).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"], "nothing_to_roll_back");

    // Protocol v2: a rollback names its policy; without one (a v1 request) or
    // with an id that cannot name a policy, it is malformed.
    for bad in [
        json!({"to": null}),
        json!({"policy_id": null, "to": null}),
        json!({"policy_id": 42, "to": null}),
        json!({"policy_id": "../42", "to": null}),
    ] {
        let (status, body) = rollback_raw(&c, &agent.base, bad.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad} -> {body}");
        assert_eq!(body["error"], "malformed_request", "{bad} -> {body}");
    }

    // Rolling back the first activation ever returns to nothing active, and
    // the same deploy request then activates it again (not a no-op).
    let first = sealed(&s, "0.9.0");
    assert_eq!(deploy(&c, &agent.base, &first).await.0, StatusCode::OK);
    let (status, body) = rollback(&c, &agent.base, &s, "42", Value::Null).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["outcome"], "deactivated");
    assert_eq!(body["digest"], first.digest.as_str());
    assert_eq!(active_digest(&c, &agent.base, "42").await, None);
    assert_eq!(active_all(&c, &agent.base).await, BTreeMap::new());
    assert_eq!(deploy(&c, &agent.base, &first).await.0, StatusCode::OK);
    assert_eq!(
        active_digest(&c, &agent.base, "42").await,
        Some(first.digest.clone())
    );

    let [a, b, d] = ["1.0.0", "1.1.0", "1.2.0"].map(|v| sealed(&s, v));
    for x in [&a, &b, &d] {
        assert_eq!(deploy(&c, &agent.base, x).await.0, StatusCode::OK);
    }
    assert_eq!(
        active_digest(&c, &agent.base, "42").await,
        Some(d.digest.clone())
    );

    let (status, body) = rollback(&c, &agent.base, &s, "42", Value::Null).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["outcome"], "rolled-back");
    assert_eq!(
        active_digest(&c, &agent.base, "42").await,
        Some(b.digest.clone())
    );

    let (status, body) = rollback(&c, &agent.base, &s, "42", json!(a.digest)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (_, active) = get(&c, format!("{}/active/42", agent.base)).await;
    assert_eq!(active["digest"], a.digest.as_str());
    assert_eq!(active["version"], "1.0.0");

    // Rolling back to what is active is a no-op success.
    let (status, body) = rollback(&c, &agent.base, &s, "42", json!(a.digest)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["outcome"], "already-active");

    let unknown = format!("sha256:{}", "0".repeat(64));
    let (status, body) = rollback(&c, &agent.base, &s, "42", json!(unknown)).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(body["error"], "unknown_digest");
    let (status, _) = rollback(&c, &agent.base, &s, "42", json!("sha256:../../etc/passwd")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // A stored digest of another policy is refused by name, both ways, and
    // a policy never deployed here has nothing to roll back.
    let other = sealed_for(&s, "43", "7.0.0");
    assert_eq!(deploy(&c, &agent.base, &other).await.0, StatusCode::OK);
    let (status, body) = rollback(&c, &agent.base, &s, "42", json!(other.digest)).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"], "digest_of_other_policy");
    let (status, body) = rollback(&c, &agent.base, &s, "43", json!(a.digest)).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"], "digest_of_other_policy");
    let (status, body) = rollback(&c, &agent.base, &s, "99", Value::Null).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"], "nothing_to_roll_back");
    let (status, body) = rollback(&c, &agent.base, &s, "99", json!(a.digest)).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"], "digest_of_other_policy");

    assert_eq!(
        active_all(&c, &agent.base).await,
        actives(&[("42", &a), ("43", &other)])
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bundles_are_listed_newest_first_and_pruned_but_never_the_active() {
    let s = signer();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), trusted(&s));
    cfg.keep = 3;
    let agent = start_with(cfg, dir).await;
    let c = client();
    // Policy 43's only bundle, older than all of 42's: `--keep` counts per
    // policy, so 42's deploys never prune it.
    let other = sealed_for(&s, "43", "1.0.0");
    assert_eq!(deploy(&c, &agent.base, &other).await.0, StatusCode::OK);
    let bundles: Vec<Bundle> = (0..5).map(|i| sealed(&s, &format!("1.{i}.0"))).collect();
    for b in &bundles {
        assert_eq!(deploy(&c, &agent.base, b).await.0, StatusCode::OK);
    }
    let expected: Vec<String> = bundles
        .iter()
        .rev()
        .take(3)
        .map(|b| b.digest.clone())
        .collect();
    assert_eq!(stored_for(&c, &agent.base, "42").await, expected);
    let mut everything = expected.clone();
    everything.push(other.digest.clone());
    assert_eq!(stored(&c, &agent.base).await, everything);
    assert_eq!(
        stored_for(&c, &agent.base, "43").await,
        vec![other.digest.clone()]
    );
    assert!(stored_for(&c, &agent.base, "44").await.is_empty());
    assert!(!bundle_file(&agent.data_dir, &bundles[0].digest).exists());
    // Each entry names its policy, and is active for its own policy.
    let (_, listed) = get(&c, format!("{}/bundles", agent.base)).await;
    let flags: Vec<(&str, bool)> = listed["bundles"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["policy_id"].as_str().unwrap(),
                b["active"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        flags,
        vec![("42", true), ("42", false), ("42", false), ("43", true)]
    );

    // Roll back to the oldest kept, then deploy two more: it is active, so it stays.
    assert_eq!(
        rollback(&c, &agent.base, &s, "42", json!(bundles[2].digest))
            .await
            .0,
        StatusCode::OK
    );
    for i in 5..7 {
        let b = sealed(&s, &format!("1.{i}.0"));
        assert_eq!(deploy(&c, &agent.base, &b).await.0, StatusCode::OK);
    }
    let listed = stored_for(&c, &agent.base, "42").await;
    assert_eq!(listed.len(), 3, "{listed:?}");
    let active = active_digest(&c, &agent.base, "42").await.unwrap();
    assert!(listed.contains(&active));
    for digest in &listed {
        assert!(bundle_file(&agent.data_dir, digest).exists());
    }
    assert_eq!(
        stored_for(&c, &agent.base, "43").await,
        vec![other.digest.clone()]
    );
    assert!(bundle_file(&agent.data_dir, &other.digest).exists());
    assert_eq!(
        active_digest(&c, &agent.base, "43").await,
        Some(other.digest.clone())
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_deploys_of_two_digests_end_with_one_active_and_both_stored() {
    let s = signer();
    let c = client();
    for round in 0..8 {
        let agent = start(&s).await;
        let a = sealed(&s, &format!("2.{round}.0"));
        let b = sealed(&s, &format!("3.{round}.0"));
        let (ra, rb) = tokio::join!(deploy(&c, &agent.base, &a), deploy(&c, &agent.base, &b));
        assert_eq!(ra.0, StatusCode::OK, "{}", ra.1);
        assert_eq!(rb.0, StatusCode::OK, "{}", rb.1);
        let active = active_digest(&c, &agent.base, "42").await.unwrap();
        assert!(active == a.digest || active == b.digest);
        let listed: HashSet<String> = stored(&c, &agent.base).await.into_iter().collect();
        assert_eq!(listed, HashSet::from([a.digest.clone(), b.digest.clone()]));
        // Both activations happened, one after the other: the other is the previous one.
        let (status, _) = rollback(&c, &agent.base, &s, "42", Value::Null).await;
        assert_eq!(status, StatusCode::OK);
        let back = active_digest(&c, &agent.base, "42").await.unwrap();
        assert_ne!(back, active);
        assert!(back == a.digest || back == b.digest);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bearer_token_is_required_when_configured() {
    let s = signer();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), trusted(&s));
    cfg.token = Some("correct horse battery staple".into());
    let agent = start_with(cfg, dir).await;
    let c = client();
    let b = sealed(&s, "1.0.0");
    let key = key_for(&b);

    let (status, body) = send_deploy(&c, &agent.base, &to_json(&b), Some(&key), None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(body["error"], "unauthorized");
    let (status, body) =
        send_deploy(&c, &agent.base, &to_json(&b), Some(&key), Some("wrong")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert!(!body.to_string().contains("correct horse"));
    for path in ["/active", "/active/42", "/bundles"] {
        assert_eq!(
            get(&c, format!("{}{path}", agent.base)).await.0,
            StatusCode::UNAUTHORIZED,
            "GET {path}"
        );
    }
    let (status, _) = rollback(&c, &agent.base, &s, "42", Value::Null).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // Health checks stay open for load balancers.
    assert_eq!(
        get(&c, format!("{}/healthz", agent.base)).await.0,
        StatusCode::OK
    );

    let (status, body) = send_deploy(
        &c,
        &agent.base,
        &to_json(&b),
        Some(&key),
        Some("correct horse battery staple"),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    for path in ["/active", "/active/42"] {
        let resp = c
            .get(format!("{}{path}", agent.base))
            .bearer_auth("correct horse battery staple")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "GET {path}");
        let body: Value = resp.json().await.unwrap();
        let record = if path == "/active" {
            &body["policies"]["42"]
        } else {
            &body
        };
        assert_eq!(record["digest"], b.digest.as_str(), "{body}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn readiness_fails_while_the_data_dir_is_unwritable() {
    let s = signer();
    let agent = start(&s).await;
    let c = client();
    let ready =
        |c: reqwest::Client, base: String| async move { get(&c, format!("{base}/readyz")).await };
    assert_eq!(ready(c.clone(), agent.base.clone()).await.0, StatusCode::OK);

    // Works as any user, root included: the bundle store is not a directory.
    let bundles = agent.data_dir.join("bundles");
    let moved = agent.data_dir.join("bundles.moved");
    std::fs::rename(&bundles, &moved).unwrap();
    std::fs::write(&bundles, b"not a directory").unwrap();
    let (status, body) = ready(c.clone(), agent.base.clone()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"], "not_ready");
    std::fs::remove_file(&bundles).unwrap();
    std::fs::rename(&moved, &bundles).unwrap();
    assert_eq!(ready(c.clone(), agent.base.clone()).await.0, StatusCode::OK);

    // Read-only permissions; root ignores them, which the check below detects.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&agent.data_dir, std::fs::Permissions::from_mode(0o555)).unwrap();
        let privileged = std::fs::write(agent.data_dir.join("probe-by-test"), b"x").is_ok();
        let (status, _) = ready(c.clone(), agent.base.clone()).await;
        std::fs::set_permissions(&agent.data_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        if privileged {
            std::fs::remove_file(agent.data_dir.join("probe-by-test")).unwrap();
            eprintln!("running with privileges that ignore file modes: chmod case not checked");
        } else {
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        }
        assert_eq!(ready(c.clone(), agent.base.clone()).await.0, StatusCode::OK);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn activation_hook_gets_the_bundle_path_and_failure_is_reported() {
    let s = signer();
    let dir = tempfile::tempdir().unwrap();
    let seen = dir.path().join("hook-saw");
    let mut cfg = config(dir.path(), trusted(&s));
    // Writes the argument the hook received.
    cfg.on_activate = Some(format!("printf '%s\\n' >> '{}'", seen.display()));
    let agent = start_with(cfg, dir).await;
    let c = client();
    let b = sealed(&s, "1.0.0");
    let (status, body) = deploy(&c, &agent.base, &b).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (_, active) = get(&c, format!("{}/active/42", agent.base)).await;
    assert_eq!(active["hook_failed"], false, "{active}");
    let written = std::fs::read_to_string(&seen).unwrap();
    assert_eq!(
        PathBuf::from(written.trim()),
        bundle_file(&agent.data_dir, &b.digest)
    );

    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), trusted(&s));
    cfg.on_activate = Some("exit 3 #".into());
    let agent = start_with(cfg, dir).await;
    let (status, body) = deploy(&c, &agent.base, &b).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["active"]["hook_failed"], true, "{body}");
    let (_, active) = get(&c, format!("{}/active/42", agent.base)).await;
    assert_eq!(
        active["digest"],
        b.digest.as_str(),
        "a failed hook does not undo activation"
    );
    assert_eq!(active["hook_failed"], true);
}

/// The real `pde agent` binary, killed with SIGKILL when dropped.
struct Proc {
    child: Child,
    base: String,
}

impl Proc {
    /// Kills the agent now (as a crash would) and reaps it, so that its
    /// address is free for the next one.
    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

fn spawn_agent(data_dir: &Path, public: &Path, log: &Path) -> Proc {
    spawn_agent_with(data_dir, public, log, &[])
}

/// [`spawn_agent`] with `extra` flags.
fn spawn_agent_with(data_dir: &Path, public: &Path, log: &Path, extra: &[&str]) -> Proc {
    spawn_agent_at(data_dir, public, log, "127.0.0.1:0", extra)
}

/// [`spawn_agent_with`] listening on `listen`: a restart on the address a
/// workspace's `pde.toml` names.
fn spawn_agent_at(
    data_dir: &Path,
    public: &Path,
    log: &Path,
    listen: &str,
    extra: &[&str],
) -> Proc {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_pde"))
        .args(["-v", "agent", "--listen", listen, "--data-dir"])
        .arg(data_dir)
        .arg("--trusted-key")
        .arg(public)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log))
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    Proc {
        child,
        base: format!("http://{addr}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn restart_keeps_the_active_bundle_history_and_keys() {
    let s = signer();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let log = dir.path().join("agent.log");
    let c = client();
    let a = sealed(&s, "1.0.0");
    let b = sealed(&s, "1.1.0");
    let x = sealed_for(&s, "43", "5.0.0");
    {
        let mut agent = spawn_agent(&data, &s.public, &log);
        assert_eq!(deploy(&c, &agent.base, &a).await.0, StatusCode::OK);
        assert_eq!(deploy(&c, &agent.base, &b).await.0, StatusCode::OK);
        assert_eq!(deploy(&c, &agent.base, &x).await.0, StatusCode::OK);
        // SIGTERM is a clean stop.
        let term = Command::new("kill")
            .args(["-TERM", &agent.child.id().to_string()])
            .status()
            .unwrap();
        assert!(term.success());
        assert!(agent.child.wait().unwrap().success());
    }
    // The data dir holds one state file per policy, and no v1 state file.
    for id in ["42", "43"] {
        assert!(policy_file(&data, id).exists(), "policies/{id}.json");
    }
    assert!(!data.join("state.json").exists());
    let agent = spawn_agent(&data, &s.public, &log);
    assert_eq!(
        active_all(&c, &agent.base).await,
        actives(&[("42", &b), ("43", &x)])
    );
    let (_, health) = get(&c, format!("{}/healthz", agent.base)).await;
    assert!(health.get("integrity").is_none(), "{health}");
    // A second agent on the same data dir refuses to start.
    let out = Command::new(env!("CARGO_BIN_EXE_pde"))
        .args(["agent", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .arg("--trusted-key")
        .arg(&s.public)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("in use by another running"), "{stderr}");
    assert_eq!(
        stored(&c, &agent.base).await,
        vec![x.digest.clone(), b.digest.clone(), a.digest.clone()]
    );
    // Idempotency keys survived: a repeat is a no-op, a reuse is a conflict.
    let (status, body) = deploy(&c, &agent.base, &b).await;
    assert_eq!(
        (status, body["outcome"].as_str()),
        (StatusCode::OK, Some("unchanged"))
    );
    let (status, _) = send_deploy(&c, &agent.base, &to_json(&b), Some(&key_for(&a)), None).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    // History survived: rollback returns to a.
    assert_eq!(
        rollback(&c, &agent.base, &s, "42", Value::Null).await.0,
        StatusCode::OK
    );
    assert_eq!(
        active_all(&c, &agent.base).await,
        actives(&[("42", &a), ("43", &x)])
    );
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(log.contains("recovered active bundle"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_during_activation_leaves_a_valid_active_bundle() {
    let s = signer();
    let trust = trusted(&s);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let log = dir.path().join("agent.log");
    let c = client();
    let mut sent: HashSet<String> = HashSet::new();
    for round in 0..4 {
        let mut agent = spawn_agent(&data, &s.public, &log);
        let first = sealed(&s, &format!("{round}.0.0"));
        assert_eq!(deploy(&c, &agent.base, &first).await.0, StatusCode::OK);
        sent.insert(first.digest.clone());

        let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
        let mut tasks = Vec::new();
        for i in 1..=120 {
            let b = sealed(&s, &format!("{round}.{i}.0"));
            sent.insert(b.digest.clone());
            let (c, base, done_tx) = (c.clone(), agent.base.clone(), done_tx.clone());
            tasks.push(tokio::spawn(async move {
                let resp = c
                    .post(format!("{base}/deploy"))
                    .header("Idempotency-Key", key_for(&b))
                    .json(&json!({"bundle": b, "env": ENV}))
                    .send()
                    .await;
                let _ = done_tx.send(resp.map(|r| r.status()).ok());
            }));
        }
        // Kill once some deploys have landed and many are still in flight.
        for _ in 0..(10 + round * 15) {
            let status = done_rx.recv().await.unwrap();
            assert_eq!(status, Some(StatusCode::OK));
        }
        agent.child.kill().unwrap();
        agent.child.wait().unwrap();
        for t in tasks {
            t.await.unwrap();
        }

        let agent = spawn_agent(&data, &s.public, &log);
        let active = active_digest(&c, &agent.base, "42")
            .await
            .expect("an active bundle survives kill -9");
        assert_eq!(active_all(&c, &agent.base).await.len(), 1);
        assert!(sent.contains(&active), "active {active} was never sent");
        let bytes = std::fs::read(bundle_file(&data, &active)).unwrap();
        let bundle = Bundle::from_slice(&bytes).unwrap();
        assert_eq!(bundle.digest, active);
        bundle.verify_signature(&trust).unwrap();
        // Every listed bundle is complete, and no temp file survived recovery.
        for digest in stored(&c, &agent.base).await {
            Bundle::from_slice(&std::fs::read(bundle_file(&data, &digest)).unwrap()).unwrap();
        }
        for d in [data.clone(), data.join("bundles"), data.join("policies")] {
            for entry in std::fs::read_dir(d).unwrap() {
                let name = entry.unwrap().file_name().to_string_lossy().into_owned();
                assert!(!name.starts_with(".tmp-"), "temp file {name} left behind");
            }
        }
        assert_eq!(
            get(&c, format!("{}/readyz", agent.base)).await.0,
            StatusCode::OK
        );
    }
}

/// Polls `GET /active/{policy_id}` until it shows `digest` (a generous bound,
/// no timing claim).
async fn wait_until_active(c: &reqwest::Client, base: &str, policy_id: &str, digest: &str) {
    for _ in 0..1500 {
        if active_digest(c, base, policy_id).await.as_deref() == Some(digest) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{digest} never became active for {policy_id}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_hook_blocks_nobody_and_hooks_run_in_activation_order() {
    let s = signer();
    let dir = tempfile::tempdir().unwrap();
    let gate = dir.path().join("gate");
    let seen = dir.path().join("hook-saw");
    let mut cfg = config(dir.path(), trusted(&s));
    // Waits until the test opens the gate, then records its argument.
    cfg.on_activate = Some(format!(
        "while [ ! -e '{}' ]; do sleep 0.02; done; printf '%s\\n' >> '{}'",
        gate.display(),
        seen.display()
    ));
    let agent = start_with(cfg, dir).await;
    let c = client();
    let a = sealed(&s, "1.0.0");
    let b = sealed(&s, "1.1.0");

    let first = tokio::spawn({
        let (c, base, a) = (c.clone(), agent.base.clone(), a.clone());
        async move { deploy(&c, &base, &a).await }
    });
    // While a's hook is stuck, the state is readable and shows a active.
    wait_until_active(&c, &agent.base, "42", &a.digest).await;
    // And another deploy goes through to activation.
    let second = tokio::spawn({
        let (c, base, b) = (c.clone(), agent.base.clone(), b.clone());
        async move { deploy(&c, &base, &b).await }
    });
    wait_until_active(&c, &agent.base, "42", &b.digest).await;
    assert!(
        !seen.exists(),
        "no hook may have finished before the gate opened"
    );
    std::fs::write(&gate, b"open").unwrap();
    let (ra, rb) = (first.await.unwrap(), second.await.unwrap());
    assert_eq!(ra.0, StatusCode::OK, "{}", ra.1);
    assert_eq!(rb.0, StatusCode::OK, "{}", rb.1);
    let order: Vec<PathBuf> = std::fs::read_to_string(&seen)
        .unwrap()
        .lines()
        .map(PathBuf::from)
        .collect();
    assert_eq!(
        order,
        vec![
            bundle_file(&agent.data_dir, &a.digest),
            bundle_file(&agent.data_dir, &b.digest)
        ]
    );
    let (_, active) = get(&c, format!("{}/active/42", agent.base)).await;
    assert_eq!(active["digest"], b.digest.as_str());
    assert_eq!(active["hook_failed"], false);
}

#[test]
fn token_env_must_name_a_set_variable() {
    let s = signer();
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_pde"))
        .args(["agent", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("data"))
        .arg("--trusted-key")
        .arg(&s.public)
        .args(["--token-env", "PDE_AGENT_TEST_TOKEN_NOT_SET"])
        .env_remove("PDE_AGENT_TEST_TOKEN_NOT_SET")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("PDE_AGENT_TEST_TOKEN_NOT_SET"), "{stderr}");
    assert!(out.stdout.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn three_policies_are_active_side_by_side() {
    let s = signer();
    let agent = start(&s).await;
    let c = client();
    let [p42, p43, p44] =
        [("42", "1.0.0"), ("43", "2.0.0"), ("44", "3.0.0")].map(|(id, v)| sealed_for(&s, id, v));
    for b in [&p42, &p43, &p44] {
        let (status, body) = deploy(&c, &agent.base, b).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["outcome"], "activated");
        assert_eq!(
            body["active"]["policy_id"],
            b.payload.manifest.policy_id.as_str()
        );
    }
    assert_eq!(
        active_all(&c, &agent.base).await,
        actives(&[("42", &p42), ("43", &p43), ("44", &p44)])
    );
    let (status, one) = get(&c, format!("{}/active/43", agent.base)).await;
    assert_eq!(status, StatusCode::OK, "{one}");
    assert_eq!(one["digest"], p43.digest.as_str());
    assert_eq!(one["version"], "2.0.0");
    assert_eq!(one["policy_id"], "43");
    assert_eq!(one["env"], ENV);
    let (_, all) = get(&c, format!("{}/active", agent.base)).await;
    assert_eq!(all["policies"]["43"], one, "the map holds the same record");
    assert_eq!(active_digest(&c, &agent.base, "45").await, None);

    // Each stored bundle is the active one of its own policy.
    let (_, listed) = get(&c, format!("{}/bundles", agent.base)).await;
    let flags: Vec<(&str, &str, bool)> = listed["bundles"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["policy_id"].as_str().unwrap(),
                b["digest"].as_str().unwrap(),
                b["active"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        flags,
        vec![
            ("44", p44.digest.as_str(), true),
            ("43", p43.digest.as_str(), true),
            ("42", p42.digest.as_str(), true)
        ]
    );
    for id in ["42", "43", "44"] {
        assert!(policy_file(&agent.data_dir, id).exists(), "{id}");
    }

    // A new version of 43 replaces 43's bundle and nothing else.
    let p43b = sealed_for(&s, "43", "2.1.0");
    assert_eq!(deploy(&c, &agent.base, &p43b).await.0, StatusCode::OK);
    assert_eq!(
        active_all(&c, &agent.base).await,
        actives(&[("42", &p42), ("43", &p43b), ("44", &p44)])
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn rollback_of_one_policy_leaves_the_others_alone() {
    let s = signer();
    let agent = start(&s).await;
    let c = client();
    let a42 = sealed_for(&s, "42", "1.0.0");
    let a43 = sealed_for(&s, "43", "1.0.0");
    let b43 = sealed_for(&s, "43", "2.0.0");
    let a44 = sealed_for(&s, "44", "1.0.0");
    for b in [&a42, &a43, &b43, &a44] {
        let (status, body) = deploy(&c, &agent.base, b).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    assert_eq!(
        active_all(&c, &agent.base).await,
        actives(&[("42", &a42), ("43", &b43), ("44", &a44)])
    );
    let read = |id: &str| std::fs::read(policy_file(&agent.data_dir, id)).unwrap();
    let (f42, f44) = (read("42"), read("44"));
    let (_, record42) = get(&c, format!("{}/active/42", agent.base)).await;

    // 43 goes back one step, to its own previous bundle.
    let (status, body) = rollback(&c, &agent.base, &s, "43", Value::Null).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["outcome"], "rolled-back");
    assert_eq!(body["active"]["digest"], a43.digest.as_str());
    assert_eq!(
        active_all(&c, &agent.base).await,
        actives(&[("42", &a42), ("43", &a43), ("44", &a44)])
    );
    assert_eq!(read("42"), f42, "42's state was rewritten by 43's rollback");
    assert_eq!(read("44"), f44, "44's state was rewritten by 43's rollback");
    let f43 = read("43");

    // 44 is at its first activation: going back deactivates 44 alone.
    let (status, body) = rollback(&c, &agent.base, &s, "44", Value::Null).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["outcome"], "deactivated");
    assert_eq!(body["digest"], a44.digest.as_str());
    assert_eq!(active_digest(&c, &agent.base, "44").await, None);
    let (status, body) = get(&c, format!("{}/active/44", agent.base)).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(body["error"], "policy_not_active");
    assert_eq!(
        active_all(&c, &agent.base).await,
        actives(&[("42", &a42), ("43", &a43)])
    );
    assert_eq!(read("42"), f42, "42's state was rewritten by 44's rollback");
    assert_eq!(read("43"), f43, "43's state was rewritten by 44's rollback");
    let (_, again42) = get(&c, format!("{}/active/42", agent.base)).await;
    assert_eq!(again42, record42, "42 was re-activated");

    // 44 has nothing left to go back to, but its bundle is still stored, not
    // active, and can be named to come back.
    let (status, body) = rollback(&c, &agent.base, &s, "44", Value::Null).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"], "nothing_to_roll_back");
    let (_, listed) = get(&c, format!("{}/bundles?policy_id=44", agent.base)).await;
    assert_eq!(
        listed["bundles"],
        json!([{
            "digest": a44.digest,
            "version": "1.0.0",
            "policy_id": "44",
            "stored_at": listed["bundles"][0]["stored_at"],
            "active": false
        }])
    );
    let (status, body) = rollback(&c, &agent.base, &s, "44", json!(a44.digest)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        active_all(&c, &agent.base).await,
        actives(&[("42", &a42), ("43", &a43), ("44", &a44)])
    );
    assert_eq!(read("42"), f42);
    assert_eq!(read("43"), f43);
}

#[tokio::test(flavor = "multi_thread")]
async fn idempotency_key_binds_env_and_policy() {
    let s = signer();
    let agent = start(&s).await;
    let c = client();
    let a = sealed(&s, "1.0.0");
    let x = sealed_for(&s, "43", "1.0.0");
    assert_eq!(deploy(&c, &agent.base, &a).await.0, StatusCode::OK);
    let (_, before) = get(&c, format!("{}/active", agent.base)).await;
    let state42 = std::fs::read(policy_file(&agent.data_dir, "42")).unwrap();

    // The same key and digest, for another environment.
    let (status, body) = send_deploy_to(
        &c,
        &agent.base,
        &to_json(&a),
        "production",
        Some(&key_for(&a)),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["error"], "idempotency_conflict");
    let reason = body["reason"].as_str().unwrap();
    assert!(reason.contains(&a.digest), "{reason}");
    assert!(reason.contains(ENV), "{reason}");

    // 42's key with 43's bundle, in the same and in another environment.
    for env in [ENV, "production"] {
        let (status, body) =
            send_deploy_to(&c, &agent.base, &to_json(&x), env, Some(&key_for(&a)), None).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{env}: {body}");
        assert_eq!(body["error"], "idempotency_conflict");
    }

    // Nothing changed: not the active records, not 42's state, and 43's
    // bundle was not even stored.
    let (_, after) = get(&c, format!("{}/active", agent.base)).await;
    assert_eq!(after, before);
    assert_eq!(
        std::fs::read(policy_file(&agent.data_dir, "42")).unwrap(),
        state42
    );
    assert_eq!(active_digest(&c, &agent.base, "43").await, None);
    assert_eq!(stored(&c, &agent.base).await, vec![a.digest.clone()]);
    assert!(!bundle_file(&agent.data_dir, &x.digest).exists());
    assert!(!policy_file(&agent.data_dir, "43").exists());

    // The original request is still a no-op, and the refused ones go through
    // under their own keys.
    let (status, body) = deploy(&c, &agent.base, &a).await;
    assert_eq!(
        (status, body["outcome"].as_str()),
        (StatusCode::OK, Some("unchanged"))
    );
    let prod_key = format!("{}:production", a.digest);
    let (status, body) = send_deploy_to(
        &c,
        &agent.base,
        &to_json(&a),
        "production",
        Some(&prod_key),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["outcome"], "already-active");
    let (status, body) = deploy(&c, &agent.base, &x).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["outcome"], "activated");
    assert_eq!(
        active_all(&c, &agent.base).await,
        actives(&[("42", &a), ("43", &x)])
    );
}

/// Every file a stored bundle lives in parses, matches its digest and
/// carries a trusted signature.
fn assert_stored_bundle_verifies(data: &Path, digest: &str, trust: &TrustedKeys) -> Bundle {
    let bytes = std::fs::read(bundle_file(data, digest)).unwrap();
    let bundle = Bundle::from_slice(&bytes).unwrap();
    assert_eq!(bundle.digest, digest);
    bundle.verify_signature(trust).unwrap();
    bundle
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_deploys_of_two_policies_both_end_active() {
    let s = signer();
    let trust = trusted(&s);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let log = dir.path().join("agent.log");
    let c = client();
    let agent = spawn_agent(&data, &s.public, &log);

    // 20 deploys at once, alternating between 42 and 43 and among three
    // versions of each; every request has its own key.
    let mut sent: BTreeMap<&str, HashSet<String>> = BTreeMap::new();
    let mut tasks = Vec::new();
    for i in 0..20 {
        let id = if i % 2 == 0 { "42" } else { "43" };
        let b = sealed_for(&s, id, &format!("1.{}.0", (i / 2) % 3));
        sent.entry(id).or_default().insert(b.digest.clone());
        let key = format!("{}:{ENV}:{i}", b.digest);
        let (c, base) = (c.clone(), agent.base.clone());
        tasks.push(tokio::spawn(async move {
            send_deploy(&c, &base, &to_json(&b), Some(&key), None).await
        }));
    }
    for t in tasks {
        let (status, body) = t.await.unwrap();
        assert_eq!(status, StatusCode::OK, "{body}");
        let outcome = body["outcome"].as_str().unwrap();
        assert!(
            outcome == "activated" || outcome == "already-active",
            "{body}"
        );
    }

    let check = |active: &BTreeMap<String, String>| {
        assert_eq!(
            active.keys().map(String::as_str).collect::<Vec<_>>(),
            vec!["42", "43"],
            "{active:?}"
        );
        for (id, digest) in active {
            assert!(
                sent[id.as_str()].contains(digest),
                "{id} is active with {digest}, which was never sent for it"
            );
            let bundle = assert_stored_bundle_verifies(&data, digest, &trust);
            assert_eq!(bundle.payload.manifest.policy_id, *id);
        }
    };
    let before = active_all(&c, &agent.base).await;
    check(&before);
    for (id, digests) in &sent {
        let listed: HashSet<String> = stored_for(&c, &agent.base, id).await.into_iter().collect();
        assert_eq!(&listed, digests, "bundles stored for {id}");
    }

    // Every answer came after its write was durable: a restart (after kill -9,
    // even) finds exactly the same state, for both policies.
    drop(agent);
    let agent = spawn_agent(&data, &s.public, &log);
    let after = active_all(&c, &agent.base).await;
    check(&after);
    assert_eq!(after, before, "an update was lost on disk");
    for (id, digests) in &sent {
        let listed: HashSet<String> = stored_for(&c, &agent.base, id).await.into_iter().collect();
        assert_eq!(&listed, digests, "bundles stored for {id} after restart");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_during_a_43_deploy_leaves_42_intact() {
    let s = signer();
    let trust = trusted(&s);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let log = dir.path().join("agent.log");
    let c = client();
    let p42 = sealed_for(&s, "42", "1.0.0");
    let mut agent = spawn_agent(&data, &s.public, &log);
    assert_eq!(deploy(&c, &agent.base, &p42).await.0, StatusCode::OK);
    let state42 = std::fs::read(policy_file(&data, "42")).unwrap();
    let (_, record42) = get(&c, format!("{}/active/42", agent.base)).await;

    let mut sent43: HashSet<String> = HashSet::new();
    for round in 0..3 {
        let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
        let mut tasks = Vec::new();
        for i in 0..80 {
            let b = sealed_for(&s, "43", &format!("{round}.{i}.0"));
            sent43.insert(b.digest.clone());
            let (c, base, done_tx) = (c.clone(), agent.base.clone(), done_tx.clone());
            tasks.push(tokio::spawn(async move {
                let resp = c
                    .post(format!("{base}/deploy"))
                    .header("Idempotency-Key", key_for(&b))
                    .json(&json!({"bundle": b, "env": ENV}))
                    .send()
                    .await;
                let _ = done_tx.send(resp.map(|r| r.status()).ok());
            }));
        }
        // Kill once some 43 deploys have landed and many are still in flight.
        for _ in 0..(5 + round * 10) {
            let status = done_rx.recv().await.unwrap();
            assert_eq!(status, Some(StatusCode::OK));
        }
        agent.child.kill().unwrap();
        agent.child.wait().unwrap();
        for t in tasks {
            t.await.unwrap();
        }

        agent = spawn_agent(&data, &s.public, &log);
        // 42 is exactly what it was: same digest, same record, same file.
        assert_eq!(
            active_digest(&c, &agent.base, "42").await,
            Some(p42.digest.clone())
        );
        let (_, now42) = get(&c, format!("{}/active/42", agent.base)).await;
        assert_eq!(now42, record42, "round {round}");
        assert_eq!(
            std::fs::read(policy_file(&data, "42")).unwrap(),
            state42,
            "round {round}: 42's state file was touched by 43's deploys"
        );
        assert_stored_bundle_verifies(&data, &p42.digest, &trust);
        assert_eq!(
            stored_for(&c, &agent.base, "42").await,
            vec![p42.digest.clone()]
        );
        // 43, if active, is one that was sent, and verifies.
        let all = active_all(&c, &agent.base).await;
        assert!(
            all.keys().all(|id| id == "42" || id == "43"),
            "round {round}: {all:?}"
        );
        if let Some(d43) = active_digest(&c, &agent.base, "43").await {
            assert!(sent43.contains(&d43), "active {d43} was never sent");
            let bundle = assert_stored_bundle_verifies(&data, &d43, &trust);
            assert_eq!(bundle.payload.manifest.policy_id, "43");
        }
        for digest in stored(&c, &agent.base).await {
            Bundle::from_slice(&std::fs::read(bundle_file(&data, &digest)).unwrap()).unwrap();
        }
        let (_, health) = get(&c, format!("{}/healthz", agent.base)).await;
        assert!(health.get("integrity").is_none(), "{health}");
        assert_eq!(
            get(&c, format!("{}/readyz", agent.base)).await.0,
            StatusCode::OK
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tampered_active_bundle_is_not_served_after_restart() {
    let s = signer();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let log = dir.path().join("agent.log");
    let c = client();
    let v1 = sealed(&s, "1.0.0");
    let v2 = sealed(&s, "1.1.0");
    let other = sealed_for(&s, "43", "1.1.0");
    {
        let mut agent = spawn_agent(&data, &s.public, &log);
        for b in [&v1, &v2, &other] {
            assert_eq!(deploy(&c, &agent.base, b).await.0, StatusCode::OK);
        }
        let term = Command::new("kill")
            .args(["-TERM", &agent.child.id().to_string()])
            .status()
            .unwrap();
        assert!(term.success());
        assert!(agent.child.wait().unwrap().success());
    }
    // Someone edits 42's active bundle on disk.
    let path = bundle_file(&data, &v2.digest);
    let original = std::fs::read_to_string(&path).unwrap();
    let edited = original.replace("1.1.0", "9.9.9");
    assert_ne!(edited, original);
    std::fs::write(&path, edited).unwrap();

    let agent = spawn_agent(&data, &s.public, &log);
    // 42 falls back to the newest earlier activation that verifies; 43,
    // whose bundle carries the same version string, is untouched.
    assert_eq!(
        active_all(&c, &agent.base).await,
        actives(&[("42", &v1), ("43", &other)])
    );
    let (status, health) = get(&c, format!("{}/healthz", agent.base)).await;
    assert_eq!(status, StatusCode::OK, "{health}");
    assert_eq!(health["status"], "ok");
    let integrity = health["integrity"]
        .as_array()
        .unwrap_or_else(|| panic!("no integrity entry: {health}"));
    assert_eq!(integrity.len(), 1, "{health}");
    let entry = integrity[0].as_str().unwrap();
    assert!(entry.contains(&v2.digest), "{entry}");
    assert!(entry.contains("42"), "{entry}");

    // It cannot be brought back by rollback either...
    let (status, body) = rollback(&c, &agent.base, &s, "42", json!(v2.digest)).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"], "stored_bundle_damaged");
    assert_eq!(
        active_digest(&c, &agent.base, "42").await,
        Some(v1.digest.clone())
    );
    // ...but a genuine redeploy of it replaces the damaged file and activates it.
    let (status, body) = deploy(&c, &agent.base, &v2).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["outcome"], "activated");
    assert_eq!(std::fs::read(&path).unwrap(), v2.to_canonical_bytes());
    assert_eq!(
        active_all(&c, &agent.base).await,
        actives(&[("42", &v2), ("43", &other)])
    );
    // That resolves the problem: /healthz stops listing it at once.
    let (_, health) = get(&c, format!("{}/healthz", agent.base)).await;
    assert!(health.get("integrity").is_none(), "{health}");
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(log.contains("no longer verifies"), "{log}");
}

/// Issue 26 §3: an agent restarted by mistake with the wrong
/// `--trusted-key` refuses its active bundle (correct), is reported
/// unhealthy by `pde env check` and stops a deploy, for as long as it runs
/// so; restarted with the right key, it serves the policy again.
#[test]
fn an_agent_restarted_with_the_wrong_key_is_unhealthy_and_the_right_key_brings_its_policy_back() {
    use support::{Svc, Workspace, both, code, pde};
    let ws = Workspace::new("");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let log = dir.path().join("agent.log");
    let wrong = signer();
    let right = ws.release_pub();
    let mut agent = spawn_agent(&data, &right, &log);
    let url = agent.base.clone();
    let listen = url.strip_prefix("http://").unwrap().to_string();
    let mut config = std::fs::read_to_string(ws.root().join("pde.toml")).unwrap();
    config.push_str(&Workspace::env_toml(
        "staging",
        "",
        &[Svc {
            name: "HMS-API",
            url: url.clone(),
            tags: &["eligibility"],
        }],
    ));
    std::fs::write(ws.root().join("pde.toml"), config).unwrap();
    ws.commit("staging");
    let o = pde(
        ws.root(),
        &["--output", "json", "deploy", "42", "--env", "staging"],
    );
    assert_eq!(code(&o), 0, "{}", both(&o));
    let digest = support::json(&o)["digest"].as_str().unwrap().to_string();
    assert_eq!(support::active_digest_of(&url, "42"), Some(digest.clone()));
    let env_check = || pde(ws.root(), &["env", "check", "staging"]);
    assert_eq!(code(&env_check()), 0, "{}", both(&env_check()));

    // Twice with the wrong key: the refusal is reported each time, not only
    // on the start that first made it.
    for restart in 1..=2 {
        agent.stop();
        agent = spawn_agent_at(&data, wrong.public.as_path(), &log, &listen, &[]);
        assert_eq!(agent.base, url);
        assert_eq!(
            support::active_digest_of(&url, "42"),
            None,
            "restart {restart}: a bundle the agent cannot verify is not served"
        );
        let o = env_check();
        let out = both(&o);
        assert_eq!(code(&o), 4, "restart {restart}: {out}");
        assert!(
            out.contains("UNHEALTHY") && out.contains("integrity") && out.contains(&digest),
            "restart {restart}: the problem is named: {out}"
        );
    }
    // A deploy stops at the health step: nothing is pushed on top of it.
    ws.write_policy("42.json", &support::policy_42("1.1.0").to_string());
    ws.commit("42 v1.1.0");
    let o = pde(ws.root(), &["deploy", "42", "--env", "staging"]);
    let out = both(&o);
    assert_eq!(code(&o), 4, "{out}");
    assert!(out.contains("integrity") && out.contains(&digest), "{out}");
    let stored = support::runtime().block_on(list_bundles(&client(), format!("{url}/bundles")));
    assert_eq!(stored, vec![digest.clone()], "nothing was pushed");

    // The right key again: the recorded activation is served, and healthy.
    agent.stop();
    agent = spawn_agent_at(&data, &right, &log, &listen, &[]);
    assert_eq!(
        support::active_digest_of(&agent.base, "42"),
        Some(digest.clone()),
        "the policy is active again"
    );
    let o = env_check();
    assert_eq!(code(&o), 0, "{}", both(&o));
    let health: Value = support::runtime().block_on(async {
        client()
            .get(format!("{url}/healthz"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    });
    assert!(health.get("integrity").is_none(), "{health}");
}

#[tokio::test(flavor = "multi_thread")]
async fn v1_state_is_migrated() {
    let s = signer();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(data.join("bundles")).unwrap();
    let a42 = sealed_for(&s, "42", "1.0.0");
    let a43 = sealed_for(&s, "43", "1.0.0");
    for b in [&a42, &a43] {
        std::fs::write(bundle_file(&data, &b.digest), b.to_canonical_bytes()).unwrap();
    }
    // What a protocol-v1 agent left: one active slot (43 displaced 42).
    let v1 = json!({
        "format": "pde.agent-state/v1", "seq": 2,
        "active": {"digest": a43.digest, "version": "1.0.0", "policy_id": "43",
                   "env": ENV, "activated_at": "2026-01-01T00:00:00Z"},
        "history": [a42.digest, a43.digest],
        "bundles": {
            a42.digest.clone(): {"version": "1.0.0", "policy_id": "42", "stored_at": "2026-01-01T00:00:00Z", "seq": 1},
            a43.digest.clone(): {"version": "1.0.0", "policy_id": "43", "stored_at": "2026-01-01T00:00:00Z", "seq": 2}},
        "idempotency": {
            key_for(&a42): {"digest": a42.digest, "seq": 1},
            key_for(&a43): {"digest": a43.digest, "seq": 2}}
    });
    std::fs::write(data.join("state.json"), v1.to_string()).unwrap();
    let cfg = config(dir.path(), trusted(&s));
    let agent = start_with(cfg, dir).await;
    let c = client();

    assert!(!agent.data_dir.join("state.json").exists());
    assert!(agent.data_dir.join("state.v1.json").exists());
    for id in ["42", "43"] {
        assert!(policy_file(&agent.data_dir, id).exists(), "{id}");
    }
    let (_, record) = get(&c, format!("{}/active/43", agent.base)).await;
    assert_eq!(record["digest"], a43.digest.as_str());
    assert_eq!(record["activated_at"], "2026-01-01T00:00:00Z");
    assert_eq!(active_all(&c, &agent.base).await, actives(&[("43", &a43)]));
    assert_eq!(
        stored(&c, &agent.base).await,
        vec![a43.digest.clone(), a42.digest.clone()]
    );
    // The keys came along: a repeat is a no-op, a reuse a conflict.
    let (status, body) = deploy(&c, &agent.base, &a43).await;
    assert_eq!(
        (status, body["outcome"].as_str()),
        (StatusCode::OK, Some("unchanged")),
        "{body}"
    );
    let (status, _) =
        send_deploy(&c, &agent.base, &to_json(&a43), Some(&key_for(&a42)), None).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    // 42's displaced bundle deploys again beside 43 (its key's bundle is no
    // longer active, so the same request re-activates it).
    let (status, body) = deploy(&c, &agent.base, &a42).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["outcome"], "activated");
    assert_eq!(
        active_all(&c, &agent.base).await,
        actives(&[("42", &a42), ("43", &a43)])
    );
    // 43's own history starts at its migrated activation.
    let (status, body) = rollback(&c, &agent.base, &s, "43", Value::Null).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["outcome"], "deactivated");
    assert_eq!(active_all(&c, &agent.base).await, actives(&[("42", &a42)]));
}

/// Peak resident memory of a process, from `/proc/<pid>/status`.
fn peak_rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb * 1024
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flood_of_large_unsigned_bodies_stays_within_a_memory_bound() {
    // 16 parallel 16 MiB bodies from someone with no trusted key, shaped to
    // cost the most to parse (a million tiny objects). The agent must stay
    // under 256 MiB and still serve a real deploy afterwards.
    const BOUND: u64 = 256 << 20;
    let s = signer();
    let dir = tempfile::tempdir().unwrap();
    let agent = spawn_agent(&dir.path().join("data"), &s.public, &dir.path().join("log"));
    let head = format!(
        "{{\"env\":\"prod\",\"bundle\":{{\"format\":\"pde.bundle/v1\",\"digest\":\"sha256:{}\",\"signatures\":[],\"payload\":{{\"manifest\":{{}},\"policy\":{{\"rules\":[",
        "0".repeat(64)
    );
    let tail = "{}]}}}}";
    let room = (16 << 20) - 1024 - head.len() - tail.len();
    let body = format!("{head}{}{tail}", "{\"k\":1},".repeat(room / 8));
    assert!(body.len() < 16 << 20);
    let body = std::sync::Arc::new(body);
    let c = client();
    let floods: Vec<_> = (0..16)
        .map(|i| {
            let c = c.clone();
            let body = body.clone();
            let url = format!("{}/deploy", agent.base);
            tokio::spawn(async move {
                c.post(url)
                    .header("Idempotency-Key", format!("flood-{i}"))
                    .header("Content-Type", "application/json")
                    .body(body.as_str().to_owned())
                    .send()
                    .await
                    .map(|r| r.status())
            })
        })
        .collect();
    // Each is refused. On a starved machine (CI runs this beside whole
    // builds) a waiting connection may instead be cut by the kernel before
    // its turn; that is a refusal too. What must never happen is an accept.
    let mut refused = 0;
    for f in floods {
        match f.await.unwrap() {
            Ok(status) => {
                assert_eq!(
                    status,
                    StatusCode::FORBIDDEN,
                    "an unsigned bundle is refused"
                );
                refused += 1;
            }
            Err(e) => assert!(
                e.is_request() || e.is_timeout() || e.is_connect(),
                "unexpected client error: {e}"
            ),
        }
    }
    assert!(refused > 0, "no flood request got an answer at all");
    let peak = peak_rss_bytes(agent.child.id());
    assert!(
        peak < BOUND,
        "agent peaked at {} MiB for 16 parallel 16 MiB bodies (bound {} MiB)",
        peak >> 20,
        BOUND >> 20
    );
    // Still serving, and a real deploy goes through.
    let a = sealed(&s, "1.0.0");
    assert_eq!(deploy(&c, &agent.base, &a).await.0, StatusCode::OK);
    assert_eq!(
        active_digest(&c, &agent.base, "42").await.as_deref(),
        Some(a.digest.as_str())
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_what_happens_in_the_prometheus_text_format() {
    let s = signer();
    let agent = start(&s).await;
    let c = client();
    let scrape = || async {
        let r = c
            .get(format!("{}/metrics", agent.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let text = r.text().await.unwrap();
        // An independent parser: the `prometheus-parse` crate.
        let lines = text.lines().map(|l| Ok(l.to_string()));
        let parsed = prometheus_parse::Scrape::parse(lines).unwrap();
        parsed
            .samples
            .into_iter()
            .map(|s| {
                let mut labels: Vec<String> =
                    s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                labels.sort();
                let value = match s.value {
                    prometheus_parse::Value::Counter(v)
                    | prometheus_parse::Value::Gauge(v)
                    | prometheus_parse::Value::Untyped(v) => v,
                    _ => f64::NAN,
                };
                (format!("{}{{{}}}", s.metric, labels.join(",")), value)
            })
            .collect::<std::collections::BTreeMap<String, f64>>()
    };
    let before = scrape().await;
    assert_eq!(
        before.get("pde_agent_last_activation_timestamp_seconds{}"),
        Some(&0.0)
    );

    let a = sealed(&s, "1.0.0");
    let b = sealed(&s, "1.1.0");
    assert_eq!(deploy(&c, &agent.base, &a).await.0, StatusCode::OK);
    assert_eq!(deploy(&c, &agent.base, &a).await.0, StatusCode::OK); // a repeat
    assert_eq!(deploy(&c, &agent.base, &b).await.0, StatusCode::OK);
    // Signed by nobody we trust: refused, and counted by reason.
    let stranger = signer();
    let forged = sealed(&stranger, "9.9.9");
    assert_eq!(
        deploy(&c, &agent.base, &forged).await.0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        rollback(&c, &agent.base, &s, "42", Value::Null).await.0,
        StatusCode::OK
    );

    let after = scrape().await;
    let get = |k: &str| {
        after
            .get(k)
            .copied()
            .unwrap_or_else(|| panic!("no {k} in {after:?}"))
    };
    assert_eq!(get("pde_agent_deploys_total{outcome=activated}"), 2.0);
    assert_eq!(get("pde_agent_deploys_total{outcome=unchanged}"), 1.0);
    assert_eq!(
        get("pde_agent_rejected_requests_total{reason=signature}"),
        1.0
    );
    assert_eq!(get("pde_agent_rollbacks_total{outcome=rolled-back}"), 1.0);
    // One series per active policy, labelled with its digest too (what a
    // Prometheus "N agents on this release" count selects on).
    let active: Vec<(&String, &f64)> = after
        .iter()
        .filter(|(k, _)| k.starts_with("pde_agent_active_policy{"))
        .collect();
    assert_eq!(active.len(), 1, "{after:?}");
    let (series, value) = active[0];
    assert_eq!(*value, 1.0);
    assert!(
        series.contains(&format!("digest={}", a.digest))
            && series.contains("policy_id=42,version=1.0.0"),
        "{series}"
    );
    assert!(
        !after.keys().any(|k| k.contains("version=1.1.0")),
        "{after:?}"
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let last = get("pde_agent_last_activation_timestamp_seconds{}");
    assert!(
        (now - last).abs() < 600.0,
        "last activation {last}, now {now}"
    );
    assert_eq!(get("pde_agent_hook_failures_total{}"), 0.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn v1_and_v2_bundles_are_accepted_each_verified_with_its_own_digest_algorithm() {
    use pde::bundle::{FORMAT, FORMAT_V1};
    let signer = signer();
    let agent = start(&signer).await;
    let c = client();
    let v1 = Bundle::seal_as(FORMAT_V1, float_payload("42", "1.0.0"), &[&signer.key]).unwrap();
    let v2 = Bundle::seal(float_payload("43", "1.0.0"), &[&signer.key]).unwrap();
    assert_eq!(v2.format, FORMAT);
    // Same content, different canonical bytes: the format tag picks the algorithm.
    let v2_of_42 = Bundle::seal(float_payload("42", "1.0.0"), &[&signer.key]).unwrap();
    assert_ne!(v1.digest, v2_of_42.digest);

    for b in [&v1, &v2] {
        let (status, body) = deploy(&c, &agent.base, b).await;
        assert_eq!(status, StatusCode::OK, "{}: {body}", b.format);
        assert_eq!(
            active_digest(&c, &agent.base, &b.payload.manifest.policy_id)
                .await
                .as_deref(),
            Some(b.digest.as_str())
        );
        // What was stored still hashes to its digest with its own algorithm.
        let stored = std::fs::read(bundle_file(&agent.data_dir, &b.digest)).unwrap();
        Bundle::from_slice(&stored)
            .unwrap()
            .verify_digest()
            .unwrap();
    }

    // A v1 digest relabelled as v2 is signed but does not hash: 422, nothing changes.
    let relabelled =
        Bundle::seal_as(FORMAT_V1, float_payload("42", "1.1.0"), &[&signer.key]).unwrap();
    let mut v = to_json(&relabelled);
    v["format"] = json!(FORMAT);
    let (status, body) = send_deploy(&c, &agent.base, &v, Some(&key_for(&relabelled)), None).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["error"], "digest_mismatch", "{body}");
    // An unknown format is refused before anything else.
    let mut v = to_json(&relabelled);
    v["format"] = json!("pde.bundle/v3");
    let (status, body) = send_deploy(&c, &agent.base, &v, Some(&key_for(&relabelled)), None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"], "unsupported_format", "{body}");
    assert_eq!(
        active_digest(&c, &agent.base, "42").await.as_deref(),
        Some(v1.digest.as_str())
    );
}

/// A payload of `policy_id` whose rule values are floats, where the v1 and
/// the RFC 8785 (v2) canonical forms write different bytes.
fn float_payload(policy_id: &str, version: &str) -> Payload {
    let mut p = payload(policy_id, version);
    p.policy["rules"][0]["value"] = json!(1.0);
    p.policy["config"] = json!({"rate": 2.5e-7, "ceiling": 1e21, "naïve": "grüße"});
    p
}

// ---- signed rollbacks (issue 21, item 1; push protocol v3) ----------------

/// A statement for `policy_id`/`to` in [`ENV`], signed `secs_ago` seconds ago.
fn statement_at(policy_id: &str, to: Option<&str>, secs_ago: i64) -> Statement {
    let mut st = Statement::new(policy_id, to, ENV);
    st.at = pde_core::clock::rfc3339_from_unix(pde_core::clock::now_unix() - secs_ago);
    st
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unsigned_forged_stale_or_misdirected_rollback_is_refused_and_the_policy_stays_active() {
    let s = signer();
    let agent = start(&s).await;
    let c = client();
    let a = sealed(&s, "1.0.0");
    assert_eq!(deploy(&c, &agent.base, &a).await.0, StatusCode::OK);
    let refused = |status: StatusCode, body: &Value, want: (StatusCode, &str)| {
        assert_eq!(
            (status, body["error"].as_str().unwrap_or("")),
            (want.0, want.1),
            "{body}"
        );
    };

    // The red team's exact case: four unsigned `to: null` requests used to
    // walk 42 back to `deactivated`.
    for _ in 0..4 {
        let (status, body) =
            rollback_raw(&c, &agent.base, json!({"policy_id": "42", "to": null})).await;
        refused(status, &body, (StatusCode::FORBIDDEN, "rollback_unsigned"));
    }
    assert_eq!(
        active_digest(&c, &agent.base, "42").await,
        Some(a.digest.clone())
    );

    // Signed by a key the agent does not trust.
    let stranger = signer();
    let (status, body) = rollback(&c, &agent.base, &stranger, "42", Value::Null).await;
    refused(
        status,
        &body,
        (StatusCode::FORBIDDEN, "rollback_signature_rejected"),
    );

    // Stale, and too far in the future.
    for secs_ago in [MAX_SKEW_SECS + 60, -(MAX_SKEW_SECS + 60)] {
        let body = rollback_body(&statement_at("42", None, secs_ago), &s.key, &Value::Null);
        let (status, body) = rollback_raw(&c, &agent.base, body).await;
        refused(status, &body, (StatusCode::FORBIDDEN, "proof_expired"));
    }

    // A proof for another policy, or another environment, than asked.
    let other = Statement::new("43", None, ENV);
    let mut body = rollback_body(&other, &s.key, &Value::Null);
    body["policy_id"] = "42".into();
    let (status, body) = rollback_raw(&c, &agent.base, body).await;
    refused(status, &body, (StatusCode::FORBIDDEN, "proof_mismatch"));
    let prod = Statement::new("42", None, "production");
    let (status, body) =
        rollback_raw(&c, &agent.base, rollback_body(&prod, &s.key, &Value::Null)).await;
    refused(status, &body, (StatusCode::FORBIDDEN, "proof_mismatch"));
    assert!(
        body["reason"].as_str().unwrap().contains("production"),
        "{body}"
    );

    // A proof whose signature was moved onto an altered statement.
    let mut body = rollback_body(&statement_at("42", None, 0), &s.key, &Value::Null);
    body["proof"]["statement"]["nonce"] = "f".repeat(32).into();
    let (status, body) = rollback_raw(&c, &agent.base, body).await;
    refused(
        status,
        &body,
        (StatusCode::FORBIDDEN, "rollback_signature_rejected"),
    );

    // Not a proof at all.
    let (status, body) = rollback_raw(
        &c,
        &agent.base,
        json!({"policy_id": "42", "to": null, "proof": {"statement": "please"}}),
    )
    .await;
    refused(status, &body, (StatusCode::BAD_REQUEST, "malformed_proof"));

    assert_eq!(
        active_digest(&c, &agent.base, "42").await,
        Some(a.digest.clone())
    );
    let (_, bundles) = get(&c, format!("{}/bundles", agent.base)).await;
    assert_eq!(bundles["bundles"][0]["active"], true, "{bundles}");

    // A fresh proof by the trusted key is obeyed.
    let (status, body) = rollback(&c, &agent.base, &s, "42", Value::Null).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["outcome"], "deactivated");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replayed_signed_rollback_is_refused_even_after_a_restart() {
    let s = signer();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let log = dir.path().join("agent.log");
    let c = client();
    let a = sealed(&s, "1.0.0");
    let b = sealed(&s, "1.1.0");
    let captured = rollback_body(&Statement::new("42", None, ENV), &s.key, &Value::Null);
    {
        let mut agent = spawn_agent(&data, &s.public, &log);
        assert_eq!(deploy(&c, &agent.base, &a).await.0, StatusCode::OK);
        assert_eq!(deploy(&c, &agent.base, &b).await.0, StatusCode::OK);
        let (status, body) = rollback_raw(&c, &agent.base, captured.clone()).await;
        assert_eq!(
            (status, body["outcome"].as_str()),
            (StatusCode::OK, Some("rolled-back")),
            "{body}"
        );
        // Deployed again; the captured request, sent again, changes nothing.
        assert_eq!(deploy(&c, &agent.base, &b).await.0, StatusCode::OK);
        let (status, body) = rollback_raw(&c, &agent.base, captured.clone()).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (StatusCode::CONFLICT, Some("proof_replayed")),
            "{body}"
        );
        assert_eq!(
            active_digest(&c, &agent.base, "42").await,
            Some(b.digest.clone())
        );
        // A restart does not reopen the window, even after kill -9.
        agent.child.kill().unwrap();
        agent.child.wait().unwrap();
    }
    let agent = spawn_agent(&data, &s.public, &log);
    let (status, body) = rollback_raw(&c, &agent.base, captured).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::CONFLICT, Some("proof_replayed")),
        "{body}"
    );
    assert_eq!(
        active_digest(&c, &agent.base, "42").await,
        Some(b.digest.clone())
    );
    // The nonce file is what remembers it.
    let nonces = std::fs::read_to_string(data.join("rollback-nonces.json")).unwrap();
    assert!(nonces.contains("pde.agent-nonces/v1"), "{nonces}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_token_is_a_second_factor_and_without_a_key_the_only_one() {
    let s = signer();
    // With a trusted key and a token, a rollback needs both.
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), trusted(&s));
    cfg.token = Some("correct horse battery staple".into());
    let agent = start_with(cfg, dir).await;
    let c = client();
    let a = sealed(&s, "1.0.0");
    let (status, _) = send_deploy(
        &c,
        &agent.base,
        &to_json(&a),
        Some(&key_for(&a)),
        Some("correct horse battery staple"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let signed = rollback_body(&Statement::new("42", None, ENV), &s.key, &Value::Null);
    let (status, _) = rollback_raw(&c, &agent.base, signed.clone()).await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "a proof does not replace the token"
    );
    let resp = c
        .post(format!("{}/rollback", agent.base))
        .bearer_auth("correct horse battery staple")
        .json(&json!({"policy_id": "42", "to": null}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        StatusCode::FORBIDDEN,
        "the token does not replace a proof"
    );
    let resp = c
        .post(format!("{}/rollback", agent.base))
        .bearer_auth("correct horse battery staple")
        .json(&signed)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
}

// ---- bounded input (issue 21, items 7 and 9) --------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn replays_cannot_bloat_a_policys_document() {
    let s = signer();
    let agent = start(&s).await;
    let c = client();
    let a = sealed(&s, "1.0.0");
    assert_eq!(deploy(&c, &agent.base, &a).await.0, StatusCode::OK);
    let doc = policy_file(&agent.data_dir, "42");
    let before = std::fs::metadata(&doc).unwrap().len();
    // The red team's replay: the captured bundle again, a fresh key each
    // time, and a huge `env` (1 MiB here; 12 MiB in the report).
    let huge = "e".repeat(1 << 20);
    for (i, env) in [huge.as_str(), "prod uction", "../prod", "", "é"]
        .iter()
        .enumerate()
    {
        let (status, body) = send_deploy_to(
            &c,
            &agent.base,
            &to_json(&a),
            env,
            Some(&format!("k{i}")),
            None,
        )
        .await;
        assert_eq!(
            (status, body["error"].as_str()),
            (StatusCode::BAD_REQUEST, Some("bad_env")),
            "{body}"
        );
    }
    assert_eq!(
        std::fs::metadata(&doc).unwrap().len(),
        before,
        "refused replays wrote nothing"
    );
    // At every field's limit, replayed as often as anyone likes, the
    // document stays under its documented bound.
    let env = "e".repeat(128);
    for i in 0..300 {
        let key = format!("{i:0>512}");
        let (status, body) =
            send_deploy_to(&c, &agent.base, &to_json(&a), &env, Some(&key), None).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let size = std::fs::metadata(&doc).unwrap().len();
    assert!(
        size < pde_agent::store::MAX_POLICY_DOC_BYTES,
        "policies/42.json is {size} bytes"
    );
    // A key over 512 characters is refused, not stored.
    let (status, body) =
        send_deploy(&c, &agent.base, &to_json(&a), Some(&"k".repeat(513)), None).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("bad_idempotency_key"))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn idempotency_keys_with_spaces_or_tabs_are_400() {
    let s = signer();
    let agent = start(&s).await;
    let c = client();
    let a = sealed(&s, "1.0.0");
    for key in [
        format!("{} {ENV}", a.digest),
        format!("{}\t:{ENV}", a.digest),
        "a b".to_string(),
    ] {
        let (status, body) = send_deploy(&c, &agent.base, &to_json(&a), Some(&key), None).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (StatusCode::BAD_REQUEST, Some("bad_idempotency_key")),
            "{key:?}: {body}"
        );
    }
    assert_eq!(active_digest(&c, &agent.base, "42").await, None);
    assert_eq!(deploy(&c, &agent.base, &a).await.0, StatusCode::OK);
}

// ---- half-open connections (issue 21, item 6) -------------------------------

/// Opens `n` loopback connections that each send a request line and a header
/// but never the blank line that ends the headers.
async fn half_open(addr: &str, n: usize) -> Vec<tokio::net::TcpStream> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        // The server may already have closed it (over the cap): fine.
        let _ = s
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: flood\r\n")
            .await;
        out.push(s);
    }
    out
}

/// Waits (until `deadline`) for the server to close `s`; `true` if it did.
async fn closed_by_server(s: &mut tokio::net::TcpStream, deadline: tokio::time::Instant) -> bool {
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            // An error answer before the close (e.g. 408) is fine too.
            Ok(Ok(_)) => continue,
        }
    }
}

async fn healthz_answers(c: &reqwest::Client, base: &str) -> bool {
    let req = c
        .get(format!("{base}/healthz"))
        .timeout(Duration::from_secs(2))
        .send();
    matches!(req.await, Ok(r) if r.status() == StatusCode::OK)
}

#[tokio::test(flavor = "multi_thread")]
async fn half_open_connections_are_closed_and_healthz_answers_throughout_a_flood() {
    let s = signer();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), trusted(&s));
    cfg.header_read_timeout = Duration::from_secs(1);
    let agent = start_with(cfg, dir).await;
    let addr = agent.base.strip_prefix("http://").unwrap().to_string();
    let c = client();
    let started = tokio::time::Instant::now();
    let mut flood = half_open(&addr, 300).await;
    // Throughout the flood (a fresh client each time: no pooled connection).
    for _ in 0..5 {
        assert!(
            healthz_answers(&client(), &agent.base).await,
            "healthz during the flood"
        );
    }
    // Each half-open connection is closed by the agent once its headers are
    // late; none is still open 10 s after the flood began.
    let deadline = started + Duration::from_secs(10);
    for (i, conn) in flood.iter_mut().enumerate() {
        assert!(
            closed_by_server(conn, deadline).await,
            "connection {i} still open"
        );
    }
    assert!(healthz_answers(&c, &agent.base).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn over_the_connection_cap_idle_connections_make_room_and_healthz_still_answers() {
    let s = signer();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("agent.log");
    let mut agent = spawn_agent_with(
        &dir.path().join("data"),
        &s.public,
        &log,
        &["--max-connections", "40", "--header-timeout-secs", "2"],
    );
    let addr = agent.base.strip_prefix("http://").unwrap().to_string();
    let started = tokio::time::Instant::now();
    // Half again as many half-open connections as the cap allows: each one
    // over the cap displaces the oldest of the flood's own.
    let mut flood = half_open(&addr, 60).await;
    for _ in 0..5 {
        assert!(
            healthz_answers(&client(), &agent.base).await,
            "healthz while the cap is full of half-open connections"
        );
    }
    let deadline = started + Duration::from_secs(10);
    for (i, conn) in flood.iter_mut().enumerate() {
        assert!(
            closed_by_server(conn, deadline).await,
            "connection {i} still open"
        );
    }
    assert!(healthz_answers(&client(), &agent.base).await);
    agent.child.kill().unwrap();
    agent.child.wait().unwrap();
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(log.contains("connection cap reached"), "{log}");
    assert!(log.contains("max_connections=40"), "{log}");
}
