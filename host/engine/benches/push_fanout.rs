//! Push fan-out: how the time of a push grows with the number of targets.
//!
//! Every target is a real axum server on 127.0.0.1, in this process, that
//! speaks **push protocol v4** (docs/agent.md): `GET /healthz` lists
//! `"protocols": [3, 4]`, every answer carries `pde-protocol: 4`, `GET
//! /active` lists the active policies by id and `GET /active/{id}` gives one
//! (404 when not active), and `POST /deploy` is fenced: a deploy whose
//! `fence` is lower than the highest this receiver accepted for the policy,
//! or that carries none once one was accepted, gets 409 `fence_stale`; a
//! fence without its `fence_proof` gets 403 `fence_signature_rejected`.
//! (The receiver checks that the proof is there, not its ed25519 signature,
//! and takes the digest from the `Idempotency-Key` instead of re-hashing the
//! bundle: the receivers' CPU is not what is measured, and they share the
//! two cores with the pusher.) Each accepted deploy answers after 20 ms (a
//! service that does some work).
//!
//! Each measured push is the full protocol of `pde::push::push` under a
//! deploy lock's fence signed by the release key, as `pde deploy` sends it:
//! read `/active/{id}` everywhere, `POST /deploy` concurrently, read it again
//! to verify. Iterations alternate between two bundles, so every push really
//! changes every target, and every push takes a higher fence.
//!
//! Measured:
//! - `push/{1,10,100,1000}` with the shipped `[push] concurrency` (128);
//! - `push-concurrency-1000/1000`: 1,000 targets with `concurrency = 1000`;
//! - `serial/{1,10,100}`: the same three requests per target, one target
//!   after the other (the seed's design), for comparison; `serial/1000` is
//!   one timed run (about 20 s), printed, not a criterion sample;
//! - the peak RSS (`VmHWM`) of the process around one 100-target and one
//!   1,000-target push, printed before the criterion runs start.
//!
//! Before measuring, the bench checks that its receivers really refuse a
//! stale fence, so that a pusher or receiver that stopped fencing fails here.
//!
//! Run (release): `cargo bench --bench push_fanout` from the workspace, with
//! `ulimit -n` at 8192 or more (it says so otherwise). In criterion's test
//! mode (`cargo test --benches`, as `scripts/test.sh` runs it) every push
//! runs once, on fleets of 1, 10 and 100 only.
// Test code: a failed unwrap is a failed test, with its location.
#![allow(clippy::unwrap_used)]

#[path = "common/release.rs"]
mod release;

use std::cell::Cell;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use criterion::Criterion;
use pde::bundle::Bundle;
use pde::config::PushConfig;
use pde::push::{self, Fenced, Outcome, Target};
use serde_json::{Value, json};
use tokio::runtime::Runtime;

const ENV: &str = "production";
const POLICY: &str = "42";
const WORK: Duration = Duration::from_millis(20);
/// The fleet sizes measured.
const SIZES: [usize; 4] = [1, 10, 100, 1000];

/// What one loopback receiver holds for the bench's policy.
#[derive(Default)]
struct Held {
    /// `(digest, version)` active.
    active: Option<(String, String)>,
    /// The highest fence accepted (push protocol v4).
    fence: Option<u64>,
}

type Shared = Arc<Mutex<Held>>;

/// Every answer carries the protocol version it speaks.
fn v4(mut r: Response) -> Response {
    r.headers_mut()
        .insert("pde-protocol", HeaderValue::from_static("4"));
    r
}

fn refuse(status: StatusCode, error: &str, reason: &str) -> Response {
    v4((
        status,
        axum::Json(json!({"error": error, "reason": reason})),
    )
        .into_response())
}

async fn deploy(State(held): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let Ok(request) = serde_json::from_slice::<Value>(&body) else {
        return refuse(StatusCode::BAD_REQUEST, "malformed_request", "not JSON");
    };
    // The Idempotency-Key is `<digest>:<env>`; the receiver trusts it rather
    // than re-hashing the bundle: the agent's CPU is not what is measured.
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let Some((digest, _)) = key.rsplit_once(':') else {
        return refuse(StatusCode::BAD_REQUEST, "missing_idempotency_key", key);
    };
    let version = request["bundle"]["payload"]["manifest"]["version"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let fence = request.get("fence").and_then(Value::as_u64);
    if fence.is_some() && request.get("fence_proof").is_none() {
        return refuse(
            StatusCode::FORBIDDEN,
            "fence_signature_rejected",
            "a fence without its fence_proof",
        );
    }
    {
        let mut h = held.lock().unwrap();
        match (h.fence, fence) {
            (Some(highest), None) => {
                return refuse(
                    StatusCode::CONFLICT,
                    "fence_stale",
                    &format!("no fence, after fence {highest} was accepted"),
                );
            }
            (Some(highest), Some(f)) if f < highest => {
                return refuse(
                    StatusCode::CONFLICT,
                    "fence_stale",
                    &format!("fence {f} is lower than {highest}"),
                );
            }
            _ => {}
        }
        h.fence = h.fence.max(fence);
    }
    tokio::time::sleep(WORK).await;
    held.lock().unwrap().active = Some((digest.to_string(), version));
    v4(axum::Json(json!({"status": "activated", "digest": digest})).into_response())
}

/// `GET /active`: every active policy, by id (the bench pushes one).
async fn active_all(State(held): State<Shared>) -> Response {
    let policies = match &held.lock().unwrap().active {
        Some((digest, version)) => {
            json!({POLICY: {"digest": digest, "version": version, "env": ENV}})
        }
        None => json!({}),
    };
    v4(axum::Json(json!({"policies": policies})).into_response())
}

/// `GET /active/{policy_id}`: one policy's record, 404 when it is not active.
async fn active(State(held): State<Shared>, Path(id): Path<String>) -> Response {
    match (&held.lock().unwrap().active, id == POLICY) {
        (Some((digest, version)), true) => v4(axum::Json(
            json!({"digest": digest, "version": version, "env": ENV}),
        )
        .into_response()),
        _ => refuse(
            StatusCode::NOT_FOUND,
            "policy_not_active",
            "policy not active",
        ),
    }
}

async fn healthz() -> Response {
    v4(axum::Json(json!({"status": "ok", "protocols": [3, 4]})).into_response())
}

/// Starts `n` receivers on the runtime and returns them as targets.
fn fleet(rt: &Runtime, n: usize) -> Vec<Target> {
    rt.block_on(async {
        let mut targets = Vec::with_capacity(n);
        for i in 0..n {
            let app = Router::new()
                .route("/deploy", post(deploy))
                .route("/active", get(active_all))
                .route("/active/{policy_id}", get(active))
                .route("/healthz", get(healthz))
                .with_state(Shared::default());
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("http://{}", listener.local_addr().unwrap());
            tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
            targets.push(Target::new(format!("svc-{i}"), &url, None));
        }
        targets
    })
}

fn cfg(concurrency: usize) -> PushConfig {
    PushConfig {
        concurrency,
        ..PushConfig::default()
    }
}

/// What one push needs besides its targets: the bundles it alternates
/// between, the key, and the next fence (a new deploy lock per push).
struct Pusher {
    rt: Runtime,
    client: reqwest::Client,
    key: ed25519_dalek::SigningKey,
    bundles: [Bundle; 2],
    turn: Cell<usize>,
    fence: Cell<u64>,
}

impl Pusher {
    /// One fenced push of the next bundle, as `pde deploy` makes it.
    fn push(&self, targets: &[Target], cfg: &PushConfig) -> push::PushReport {
        self.turn.set(self.turn.get() + 1);
        self.fence.set(self.fence.get() + 1);
        self.push_at(targets, cfg, self.fence.get())
    }

    fn push_at(&self, targets: &[Target], cfg: &PushConfig, fence: u64) -> push::PushReport {
        let bundle = &self.bundles[self.turn.get() % 2];
        let fenced = Fenced {
            signer: Some(&self.key),
            fence: Some(fence),
        };
        self.rt.block_on(push::push(
            &self.client,
            bundle,
            ENV,
            targets,
            cfg,
            fenced,
            &(),
        ))
    }

    /// The seed's design: one target after the other, the same three
    /// requests (with the same fenced body).
    fn serial(&self, targets: &[Target]) {
        self.turn.set(self.turn.get() + 1);
        self.fence.set(self.fence.get() + 1);
        let bundle = &self.bundles[self.turn.get() % 2];
        let fence = self.fence.get();
        let proof =
            pde_core::fence::sign_deploy(&self.key, POLICY, &bundle.digest, ENV, fence).unwrap();
        let body = serde_json::to_vec(
            &json!({"bundle": bundle, "env": ENV, "fence": fence, "fence_proof": proof}),
        )
        .unwrap();
        let key = format!("{}:{ENV}", bundle.digest);
        let client = &self.client;
        self.rt.block_on(async {
            for t in targets {
                let before = client
                    .get(format!("{}/active/{POLICY}", t.url))
                    .send()
                    .await
                    .unwrap();
                let _ = before.bytes().await.unwrap();
                let resp = client
                    .post(format!("{}/deploy", t.url))
                    .header("Idempotency-Key", &key)
                    .header("Content-Type", "application/json")
                    .body(body.clone())
                    .send()
                    .await
                    .unwrap();
                assert!(resp.status().is_success(), "{}", resp.status());
                let _ = resp.bytes().await.unwrap();
                let after: Value = client
                    .get(format!("{}/active/{POLICY}", t.url))
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                assert_eq!(after["digest"], bundle.digest.as_str());
            }
        })
    }
}

/// A line of /proc/self/status, in KiB.
fn status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Peak RSS around one push to `n` targets of a fresh fleet, before
/// criterion allocates anything of its own.
fn peak_rss(p: &Pusher, n: usize) {
    let targets = fleet(&p.rt, n);
    // Reset the high-water mark where the kernel allows it (Linux >= 4.0).
    let reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
    let before_rss = status_kib("VmRSS:").unwrap_or(0);
    let before_hwm = status_kib("VmHWM:").unwrap_or(0);
    let started = Instant::now();
    let report = p.push(&targets, &PushConfig::default());
    let took = started.elapsed();
    assert_eq!(report.outcome, Outcome::Deployed, "{report:?}");
    let after_hwm = status_kib("VmHWM:").unwrap_or(0);
    println!(
        "push_fanout/peak_rss: {n} targets (receivers in-process) in {took:?}: \
         VmRSS before {:.1} MiB, VmHWM before {:.1} MiB, VmHWM after {:.1} MiB \
         (high-water mark reset before the push: {reset})",
        mib(before_rss),
        mib(before_hwm),
        mib(after_hwm)
    );
}

/// Fails, saying what to do, when this process may open fewer than `need`
/// files (`Max open files` of /proc/self/limits).
fn enough_open_files(need: u64) {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let soft = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(soft) = soft {
        assert!(
            soft >= need,
            "1,000 loopback receivers need about {need} open files, and `ulimit -n` is {soft}: \
             raise it (ulimit -n {need}) and run again"
        );
    }
}

/// The receivers speak v4: a push under an older fence is refused with
/// `fence_stale`, and nothing changes.
fn receivers_enforce_fences(p: &Pusher) {
    let targets = fleet(&p.rt, 1);
    let first = p.push(&targets, &PushConfig::default());
    assert_eq!(first.outcome, Outcome::Deployed, "{first:?}");
    p.turn.set(p.turn.get() + 1);
    let stale = p.push_at(&targets, &PushConfig::default(), p.fence.get() - 1);
    assert_eq!(stale.outcome, Outcome::RolledBack, "{stale:?}");
    assert_eq!(
        stale.targets[0].error_code.as_deref(),
        Some("fence_stale"),
        "{stale:?}"
    );
}

fn main() {
    // criterion's rule: without `--bench` (cargo test --benches), or with
    // `--test`, a bench only proves that it runs.
    let args: Vec<String> = std::env::args().collect();
    let test_mode = !args.iter().any(|a| a == "--bench") || args.iter().any(|a| a == "--test");
    let p = Pusher {
        rt: tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap(),
        client: push::client(Duration::from_secs(5)).unwrap(),
        key: release::release_key(),
        bundles: [
            release::bundle(POLICY, "1.0.0"),
            release::bundle(POLICY, "1.1.0"),
        ],
        turn: Cell::new(0),
        fence: Cell::new(pde_core::fence::now_micros()),
    };

    // A smoke run (CI) proves the bench runs; 1,000 in-process receivers
    // need some 6,000 file descriptors, more than a default `ulimit -n`.
    let sizes: &[usize] = if test_mode { &SIZES[..3] } else { &SIZES };
    if !test_mode {
        enough_open_files(8192);
    }
    receivers_enforce_fences(&p);
    peak_rss(&p, 100);
    if !test_mode {
        peak_rss(&p, 1000);
    }

    let mut c = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
        .configure_from_args();

    let fleets: Vec<(usize, Vec<Target>)> = sizes.iter().map(|&n| (n, fleet(&p.rt, n))).collect();
    let shipped = PushConfig::default();

    let mut group = c.benchmark_group("push");
    for (n, targets) in &fleets {
        if *n == 1000 {
            group.sample_size(10);
        }
        group.bench_function(n.to_string(), |b| {
            b.iter(|| {
                let report = p.push(targets, &shipped);
                assert_eq!(report.outcome, Outcome::Deployed);
            })
        });
    }
    group.finish();

    if let Some((_, thousand)) = fleets.iter().find(|(n, _)| *n == 1000) {
        let mut group = c.benchmark_group("push-concurrency-1000");
        group.sample_size(10);
        group.bench_function("1000", |b| {
            b.iter(|| {
                let report = p.push(thousand, &cfg(1000));
                assert_eq!(report.outcome, Outcome::Deployed);
            })
        });
        group.finish();
    }

    let mut group = c.benchmark_group("serial");
    group.sample_size(10);
    for (n, targets) in fleets.iter().filter(|(n, _)| *n <= 100) {
        if *n == 100 {
            group.measurement_time(Duration::from_secs(25));
        }
        group.bench_function(n.to_string(), |b| b.iter(|| p.serial(targets)));
    }
    group.finish();

    if let Some((_, thousand)) = fleets.iter().find(|(n, _)| *n == 1000) {
        let started = Instant::now();
        p.serial(thousand);
        println!(
            "push_fanout/serial/1000: one run in {:?} (not a criterion sample)",
            started.elapsed()
        );
    }

    c.final_summary();
}
