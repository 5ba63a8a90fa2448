//! `pde agent` over real HTTP on loopback.
//!
//! Two kinds of agent are exercised: one served in-process on 127.0.0.1:0 (for
//! the protocol cases), and the real `pde` binary spawned as a process (for
//! start-up refusal, restarts and `kill -9`). Bundles are sealed with real
//! ed25519 keys generated into temp dirs; nothing is mocked.

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use ed25519_dalek::SigningKey;
use pde::agent::{Agent, AgentConfig, AgentError};
use pde::bundle::{Bundle, Manifest, Payload};
use pde::error::{ExitCode, HasExitCode};
use pde::keys::{self, TrustedKeys};
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

fn payload(version: &str) -> Payload {
    Payload {
        manifest: Manifest {
            policy_id: "42".into(),
            version: version.into(),
            source_commit: "0123456789abcdef".into(),
            validators: vec![],
        },
        policy: json!({
            "id": "42",
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

fn sealed(signer: &Signer, version: &str) -> Bundle {
    Bundle::seal(payload(version), &[&signer.key])
}

fn to_json(bundle: &Bundle) -> Value {
    serde_json::to_value(bundle).unwrap()
}

fn key_for(bundle: &Bundle) -> String {
    format!("{}:{ENV}", bundle.digest)
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
    let mut req = c
        .post(format!("{base}/deploy"))
        .json(&json!({"bundle": bundle, "env": ENV}));
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

async fn rollback(c: &reqwest::Client, base: &str, to: Value) -> (StatusCode, Value) {
    let resp = c
        .post(format!("{base}/rollback"))
        .json(&json!({ "to": to }))
        .send()
        .await
        .unwrap();
    let status = resp.status();
    (status, resp.json().await.unwrap_or(Value::Null))
}

async fn active_digest(c: &reqwest::Client, base: &str) -> Option<String> {
    let (status, body) = get(c, format!("{base}/active")).await;
    match status {
        StatusCode::OK => Some(body["digest"].as_str().unwrap().to_string()),
        StatusCode::NOT_FOUND => None,
        other => panic!("GET /active answered {other}: {body}"),
    }
}

async fn stored(c: &reqwest::Client, base: &str) -> Vec<String> {
    let (status, body) = get(c, format!("{base}/bundles")).await;
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
    assert_eq!(
        get(&c, format!("{}/healthz", agent.base)).await.0,
        StatusCode::OK
    );
    assert_eq!(
        get(&c, format!("{}/readyz", agent.base)).await.0,
        StatusCode::OK
    );
    assert_eq!(active_digest(&c, &agent.base).await, None);
    // Errors are JSON everywhere, unknown paths and methods included.
    let (status, body) = get(&c, format!("{}/nope", agent.base)).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::NOT_FOUND, Some("not_found"))
    );
    let (status, body) = get(&c, format!("{}/deploy", agent.base)).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(body["error"], "method_not_allowed");

    let b = sealed(&s, "1.0.0");
    let (status, body) = deploy(&c, &agent.base, &b).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["outcome"], "activated");

    let (status, active) = get(&c, format!("{}/active", agent.base)).await;
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

    let (_, listed) = get(&c, format!("{}/bundles", agent.base)).await;
    assert_eq!(listed["bundles"][0]["digest"], b.digest.as_str());
    assert_eq!(listed["bundles"][0]["version"], "1.0.0");
    assert_eq!(listed["bundles"][0]["active"], true);

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
    assert_eq!(active_digest(&c, &agent.base).await, Some(a.digest.clone()));
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
    assert_eq!(active_digest(&c, &agent.base).await, None);
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
        active_digest(&c, &agent.base).await,
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
        active_digest(&c, &agent.base).await,
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

    // With the flag, an unsigned bundle is accepted.
    let mut cfg = AgentConfig::new(dir.path().join("data"));
    cfg.insecure_accept_unsigned = true;
    let agent = start_with(cfg, dir).await;
    let s = signer();
    let mut unsigned = sealed(&s, "1.0.0");
    unsigned.signatures.clear();
    let c = client();
    let (status, body) = deploy(&c, &agent.base, &unsigned).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(active_digest(&c, &agent.base).await, Some(unsigned.digest));
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

    assert_eq!(active_digest(&c, &agent.base).await, None);
}

#[tokio::test(flavor = "multi_thread")]
async fn rollback_to_previous_and_to_named_digest() {
    let s = signer();
    let agent = start(&s).await;
    let c = client();
    let (status, body) = rollback(&c, &agent.base, Value::Null).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"], "nothing_to_roll_back");

    // Rolling back the first activation ever returns to nothing active, and
    // the same deploy request then activates it again (not a no-op).
    let first = sealed(&s, "0.9.0");
    assert_eq!(deploy(&c, &agent.base, &first).await.0, StatusCode::OK);
    let (status, body) = rollback(&c, &agent.base, Value::Null).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["outcome"], "deactivated");
    assert_eq!(active_digest(&c, &agent.base).await, None);
    assert_eq!(deploy(&c, &agent.base, &first).await.0, StatusCode::OK);
    assert_eq!(
        active_digest(&c, &agent.base).await,
        Some(first.digest.clone())
    );

    let [a, b, d] = ["1.0.0", "1.1.0", "1.2.0"].map(|v| sealed(&s, v));
    for x in [&a, &b, &d] {
        assert_eq!(deploy(&c, &agent.base, x).await.0, StatusCode::OK);
    }
    assert_eq!(active_digest(&c, &agent.base).await, Some(d.digest.clone()));

    let (status, body) = rollback(&c, &agent.base, Value::Null).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["outcome"], "rolled-back");
    assert_eq!(active_digest(&c, &agent.base).await, Some(b.digest.clone()));

    let (status, body) = rollback(&c, &agent.base, json!(a.digest)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (_, active) = get(&c, format!("{}/active", agent.base)).await;
    assert_eq!(active["digest"], a.digest.as_str());
    assert_eq!(active["version"], "1.0.0");

    // Rolling back to what is active is a no-op success.
    let (status, body) = rollback(&c, &agent.base, json!(a.digest)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["outcome"], "already-active");

    let unknown = format!("sha256:{}", "0".repeat(64));
    let (status, body) = rollback(&c, &agent.base, json!(unknown)).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(body["error"], "unknown_digest");
    let (status, _) = rollback(&c, &agent.base, json!("sha256:../../etc/passwd")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(active_digest(&c, &agent.base).await, Some(a.digest.clone()));
}

#[tokio::test(flavor = "multi_thread")]
async fn bundles_are_listed_newest_first_and_pruned_but_never_the_active() {
    let s = signer();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), trusted(&s));
    cfg.keep = 3;
    let agent = start_with(cfg, dir).await;
    let c = client();
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
    assert_eq!(stored(&c, &agent.base).await, expected);
    assert!(!bundle_file(&agent.data_dir, &bundles[0].digest).exists());

    // Roll back to the oldest kept, then deploy two more: it is active, so it stays.
    assert_eq!(
        rollback(&c, &agent.base, json!(bundles[2].digest)).await.0,
        StatusCode::OK
    );
    for i in 5..7 {
        let b = sealed(&s, &format!("1.{i}.0"));
        assert_eq!(deploy(&c, &agent.base, &b).await.0, StatusCode::OK);
    }
    let listed = stored(&c, &agent.base).await;
    assert_eq!(listed.len(), 3, "{listed:?}");
    let active = active_digest(&c, &agent.base).await.unwrap();
    assert!(listed.contains(&active));
    for digest in &listed {
        assert!(bundle_file(&agent.data_dir, digest).exists());
    }
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
        let active = active_digest(&c, &agent.base).await.unwrap();
        assert!(active == a.digest || active == b.digest);
        let listed: HashSet<String> = stored(&c, &agent.base).await.into_iter().collect();
        assert_eq!(listed, HashSet::from([a.digest.clone(), b.digest.clone()]));
        // Both activations happened, one after the other: the other is the previous one.
        let (status, _) = rollback(&c, &agent.base, Value::Null).await;
        assert_eq!(status, StatusCode::OK);
        let back = active_digest(&c, &agent.base).await.unwrap();
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
    assert_eq!(
        get(&c, format!("{}/active", agent.base)).await.0,
        StatusCode::UNAUTHORIZED
    );
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
    let resp = c
        .get(format!("{}/active", agent.base))
        .bearer_auth("correct horse battery staple")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
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
    let (_, active) = get(&c, format!("{}/active", agent.base)).await;
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
    let (_, active) = get(&c, format!("{}/active", agent.base)).await;
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

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_agent(data_dir: &Path, public: &Path, log: &Path) -> Proc {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_pde"))
        .args(["-v", "agent", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir)
        .arg("--trusted-key")
        .arg(public)
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
    {
        let mut agent = spawn_agent(&data, &s.public, &log);
        assert_eq!(deploy(&c, &agent.base, &a).await.0, StatusCode::OK);
        assert_eq!(deploy(&c, &agent.base, &b).await.0, StatusCode::OK);
        // SIGTERM is a clean stop.
        let term = Command::new("kill")
            .args(["-TERM", &agent.child.id().to_string()])
            .status()
            .unwrap();
        assert!(term.success());
        assert!(agent.child.wait().unwrap().success());
    }
    let agent = spawn_agent(&data, &s.public, &log);
    assert_eq!(active_digest(&c, &agent.base).await, Some(b.digest.clone()));
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
        vec![b.digest.clone(), a.digest.clone()]
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
        rollback(&c, &agent.base, Value::Null).await.0,
        StatusCode::OK
    );
    assert_eq!(active_digest(&c, &agent.base).await, Some(a.digest.clone()));
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
        let active = active_digest(&c, &agent.base)
            .await
            .expect("an active bundle survives kill -9");
        assert!(sent.contains(&active), "active {active} was never sent");
        let bytes = std::fs::read(bundle_file(&data, &active)).unwrap();
        let bundle = Bundle::from_slice(&bytes).unwrap();
        assert_eq!(bundle.digest, active);
        bundle.verify_signature(&trust).unwrap();
        // Every listed bundle is complete, and no temp file survived recovery.
        for digest in stored(&c, &agent.base).await {
            Bundle::from_slice(&std::fs::read(bundle_file(&data, &digest)).unwrap()).unwrap();
        }
        for d in [data.clone(), data.join("bundles")] {
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

/// Polls `GET /active` until it shows `digest` (a generous bound, no timing claim).
async fn wait_until_active(c: &reqwest::Client, base: &str, digest: &str) {
    for _ in 0..1500 {
        if active_digest(c, base).await.as_deref() == Some(digest) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{digest} never became active");
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
    wait_until_active(&c, &agent.base, &a.digest).await;
    // And another deploy goes through to activation.
    let second = tokio::spawn({
        let (c, base, b) = (c.clone(), agent.base.clone(), b.clone());
        async move { deploy(&c, &base, &b).await }
    });
    wait_until_active(&c, &agent.base, &b.digest).await;
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
    let (_, active) = get(&c, format!("{}/active", agent.base)).await;
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
