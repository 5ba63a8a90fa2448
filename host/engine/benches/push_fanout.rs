//! Push fan-out: how the time of a push grows with the number of targets.
//!
//! Every target is a real axum server on 127.0.0.1, in this process, whose
//! `POST /deploy` answers after 20 ms (a service that does some work) and
//! whose `/active` reports the last digest deployed to it. Each measured push
//! is the full protocol of `pde::push::push`: read `/active` everywhere,
//! `POST /deploy` concurrently, read `/active` again to verify. Iterations
//! alternate between two bundles, so every push really changes every target.
//!
//! Measured:
//! - `push/{1,10,100}` with `[push] concurrency = 128` (enough for 100 at once);
//! - `push-default-concurrency/100` with the shipped default (32);
//! - `serial/{1,10,100}`: the same three requests per target, one target
//!   after the other (the seed's design), for comparison;
//! - the peak RSS (`VmHWM`) of the process around one 100-target push,
//!   printed before the criterion runs start.
//!
//! Run: `cargo bench -p pde --bench push_fanout`.
// Test code: a failed unwrap is a failed test, with its location.
#![allow(clippy::unwrap_used)]

use std::cell::Cell;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use criterion::Criterion;
use pde::bundle::{Bundle, Manifest, Payload};
use pde::config::PushConfig;
use pde::push::{self, Outcome, Target};
use serde_json::json;
use tokio::runtime::Runtime;

const ENV: &str = "production";
const POLICY: &str = "42";
const WORK: Duration = Duration::from_millis(20);

/// What one loopback receiver has active.
type Active = Arc<Mutex<Option<(String, String)>>>;

async fn deploy(State(active): State<Active>, headers: HeaderMap) -> Response {
    tokio::time::sleep(WORK).await;
    // The Idempotency-Key is `<digest>:<env>`; the bench's receiver trusts it
    // rather than re-hashing the bundle: the agent's CPU is not what is measured.
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let digest = key.rsplit_once(':').map(|(d, _)| d).unwrap_or_default();
    *active.lock().unwrap() = Some((digest.to_string(), "1.0.0".to_string()));
    axum::Json(json!({"status": "activated"})).into_response()
}

/// `GET /active` in push protocol v2: every active policy, by id (the bench
/// pushes one policy).
async fn active_all(State(active): State<Active>) -> Response {
    let policies = match &*active.lock().unwrap() {
        Some((digest, version)) => {
            json!({POLICY: {"digest": digest, "version": version, "env": ENV}})
        }
        None => json!({}),
    };
    axum::Json(json!({"policies": policies})).into_response()
}

/// `GET /active/{policy_id}`: one policy's record, 404 when it is not active.
async fn active(State(active): State<Active>, Path(id): Path<String>) -> Response {
    match (&*active.lock().unwrap(), id == POLICY) {
        (Some((digest, version)), true) => {
            axum::Json(json!({"digest": digest, "version": version, "env": ENV})).into_response()
        }
        _ => (StatusCode::NOT_FOUND, "policy not active").into_response(),
    }
}

/// Starts `n` receivers on the runtime and returns them as targets.
fn fleet(rt: &Runtime, n: usize) -> Vec<Target> {
    rt.block_on(async {
        let mut targets = Vec::with_capacity(n);
        for i in 0..n {
            let state: Active = Arc::default();
            let app = Router::new()
                .route("/deploy", post(deploy))
                .route("/active", get(active_all))
                .route("/active/{policy_id}", get(active))
                .with_state(state);
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("http://{}", listener.local_addr().unwrap());
            tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
            targets.push(Target::new(format!("svc-{i}"), &url, None));
        }
        targets
    })
}

/// A signed bundle with a policy of realistic size (40 rules).
fn bundle(version: &str) -> Bundle {
    let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
    let rules: Vec<_> = (0..40)
        .map(|i| {
            json!({"key": format!("eligibility.rule_{i}"), "category": "eligibility",
                   "value": i * 100, "description": "Household income ceiling for the programme"})
        })
        .collect();
    let payload = Payload {
        manifest: Manifest {
            policy_id: "42".into(),
            version: version.into(),
            source_commit: "0123456789abcdef0123456789abcdef01234567".into(),
            validators: vec![],
        },
        policy: json!({"id": "42", "version": version, "title": "Benefit eligibility",
                       "agency": "HMS", "effective": "2026-01-01", "rules": rules}),
    };
    Bundle::seal(payload, &[&key]).expect("seals")
}

fn cfg(concurrency: usize) -> PushConfig {
    PushConfig {
        timeout_ms: 5000,
        retries: 3,
        concurrency,
        backoff_ms: 100,
    }
}

/// The seed's design: one target after the other, the same three requests.
async fn serial(client: &reqwest::Client, bundle: &Bundle, targets: &[Target]) {
    let body = serde_json::to_vec(&json!({"bundle": bundle, "env": ENV})).unwrap();
    let key = format!("{}:{ENV}", bundle.digest);
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
        assert!(resp.status().is_success());
        let _ = resp.bytes().await.unwrap();
        let after: serde_json::Value = client
            .get(format!("{}/active/{POLICY}", t.url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(after["digest"], bundle.digest.as_str());
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

/// Peak RSS around one 100-target push, in a fresh fleet, before criterion
/// allocates anything of its own.
fn peak_rss(rt: &Runtime, client: &reqwest::Client, bundles: &[Bundle; 2]) {
    let targets = fleet(rt, 100);
    // Reset the high-water mark where the kernel allows it (Linux >= 4.0).
    let reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
    let before_rss = status_kib("VmRSS:").unwrap_or(0);
    let before_hwm = status_kib("VmHWM:").unwrap_or(0);
    let started = Instant::now();
    let report = rt.block_on(push::push(
        client,
        &bundles[0],
        ENV,
        &targets,
        &cfg(128),
        push::Fenced::default(),
        &(),
    ));
    let took = started.elapsed();
    assert_eq!(report.outcome, Outcome::Deployed, "{report:?}");
    let after_hwm = status_kib("VmHWM:").unwrap_or(0);
    println!(
        "push_fanout/peak_rss: 100 targets (receivers in-process) in {took:?}: \
         VmRSS before {:.1} MiB, VmHWM before {:.1} MiB, VmHWM after {:.1} MiB \
         (high-water mark reset before the push: {reset})",
        mib(before_rss),
        mib(before_hwm),
        mib(after_hwm)
    );
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = push::client(Duration::from_secs(5)).unwrap();
    let bundles = [bundle("1.0.0"), bundle("1.1.0")];

    peak_rss(&rt, &client, &bundles);

    let mut c = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
        .configure_from_args();

    let fleets: Vec<(usize, Vec<Target>)> = [1, 10, 100].map(|n| (n, fleet(&rt, n))).to_vec();
    let turn = Cell::new(0usize);
    let next = || {
        turn.set(turn.get() + 1);
        &bundles[turn.get() % 2]
    };

    let mut group = c.benchmark_group("push");
    for (n, targets) in &fleets {
        group.bench_function(n.to_string(), |b| {
            b.iter(|| {
                let report = rt.block_on(push::push(
                    &client,
                    next(),
                    ENV,
                    targets,
                    &cfg(128),
                    push::Fenced::default(),
                    &(),
                ));
                assert_eq!(report.outcome, Outcome::Deployed);
            })
        });
    }
    group.finish();

    let mut group = c.benchmark_group("push-default-concurrency");
    let default = PushConfig::default();
    group.bench_function("100", |b| {
        b.iter(|| {
            let report = rt.block_on(push::push(
                &client,
                next(),
                ENV,
                &fleets[2].1,
                &default,
                push::Fenced::default(),
                &(),
            ));
            assert_eq!(report.outcome, Outcome::Deployed);
        })
    });
    group.finish();

    let mut group = c.benchmark_group("serial");
    group.sample_size(10);
    for (n, targets) in &fleets {
        if *n == 100 {
            group.measurement_time(Duration::from_secs(25));
        }
        group.bench_function(n.to_string(), |b| {
            b.iter(|| rt.block_on(serial(&client, next(), targets)))
        });
    }
    group.finish();

    c.final_summary();
}
