//! A §8 receiver with injectable faults, for the failure paths a real
//! `pde agent` will not produce on demand (a 500, a hang, a lying `/active`).
//! It keeps the real bookkeeping (active digest, previous digests, rollback),
//! and counts every request so tests can prove what did or did not arrive.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use serde_json::{Value, json};

/// How the receiver misbehaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Behaves.
    None,
    /// Every `POST /deploy` answers 500.
    Always500,
    /// The first `POST /deploy` answers 500, then it behaves.
    Once500,
    /// `POST /deploy` answers 400 (permanent).
    Reject400,
    /// `POST /deploy` never answers within any sane timeout.
    Hang,
    /// Takes the bundle but `/active` keeps reporting the old digest.
    LyingActive,
    /// `/healthz` answers 503.
    Unhealthy,
    /// `POST /rollback` answers 500.
    RollbackFails,
    /// Speaks push protocol v1: one active slot for the whole service,
    /// `GET /active` answers that bundle (or 404), no `/active/{policy_id}`.
    V1,
}

/// Everything the receiver saw and holds.
#[derive(Debug, Default)]
pub struct Seen {
    pub deploys: u32,
    pub rollbacks: u32,
    pub health_checks: u32,
    /// policy id → (digest, version) active.
    pub active: BTreeMap<String, (String, String)>,
    /// policy id → earlier activations, most recent last.
    pub history: BTreeMap<String, Vec<(String, String)>>,
    pub idempotency_keys: Vec<String>,
    pub authorization: Vec<String>,
}

/// A running receiver.
#[derive(Clone)]
pub struct Receiver {
    pub url: String,
    pub seen: Arc<Mutex<Seen>>,
    fault: Arc<Mutex<Fault>>,
}

type Shared = (Arc<Mutex<Seen>>, Arc<Mutex<Fault>>);

impl Receiver {
    /// Starts a receiver on 127.0.0.1:0.
    pub fn start(fault: Fault) -> Receiver {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let fault = Arc::new(Mutex::new(fault));
        let shared: Shared = (seen.clone(), fault.clone());
        let app = axum::Router::new()
            .route("/healthz", get(healthz))
            .route("/active", get(active_all))
            .route("/active/{policy_id}", get(active))
            .route("/deploy", post(deploy))
            .route("/rollback", post(rollback))
            .with_state(shared);
        let rt = super::runtime();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        rt.spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Receiver {
            url: format!("http://{addr}"),
            seen,
            fault,
        }
    }

    /// Changes the fault from now on.
    pub fn set_fault(&self, f: Fault) {
        *self.fault.lock().unwrap() = f;
    }

    pub fn deploys(&self) -> u32 {
        self.seen.lock().unwrap().deploys
    }

    /// The digest active for policy 42.
    pub fn active_digest(&self) -> Option<String> {
        self.active_digest_of("42")
    }

    /// The digest active for `policy_id`.
    pub fn active_digest_of(&self, policy_id: &str) -> Option<String> {
        let seen = self.seen.lock().unwrap();
        seen.active.get(policy_id).map(|a| a.0.clone())
    }

    /// Pretends a bundle of policy 42 with `digest` is already active.
    pub fn preload(&self, digest: &str, version: &str) {
        self.seen
            .lock()
            .unwrap()
            .active
            .insert("42".into(), (digest.into(), version.into()));
    }
}

async fn healthz(State((seen, fault)): State<Shared>) -> (StatusCode, Json<Value>) {
    seen.lock().unwrap().health_checks += 1;
    if *fault.lock().unwrap() == Fault::Unhealthy {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "down"})),
        );
    }
    (StatusCode::OK, Json(json!({"status": "ok"})))
}

async fn active_all(State((seen, fault)): State<Shared>) -> (StatusCode, Json<Value>) {
    let seen = seen.lock().unwrap();
    if *fault.lock().unwrap() == Fault::V1 {
        return match seen.active.values().next() {
            Some((d, v)) => (StatusCode::OK, Json(json!({"digest": d, "version": v}))),
            None => (
                StatusCode::NOT_FOUND,
                Json(json!({"error": "no_active_bundle"})),
            ),
        };
    }
    let policies: serde_json::Map<String, Value> = seen
        .active
        .iter()
        .map(|(p, (d, v))| (p.clone(), json!({"digest": d, "version": v})))
        .collect();
    (StatusCode::OK, Json(json!({ "policies": policies })))
}

async fn active(
    State((seen, fault)): State<Shared>,
    Path(policy_id): Path<String>,
) -> (StatusCode, Json<Value>) {
    if *fault.lock().unwrap() == Fault::V1 {
        return (StatusCode::NOT_FOUND, Json(json!({"error": "not_found"})));
    }
    match seen.lock().unwrap().active.get(&policy_id) {
        Some((d, v)) => (StatusCode::OK, Json(json!({"digest": d, "version": v}))),
        None => (
            StatusCode::NOT_FOUND,
            Json(json!({"error": "policy_not_active"})),
        ),
    }
}

async fn deploy(
    State((seen, fault)): State<Shared>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> (StatusCode, Json<Value>) {
    let f = *fault.lock().unwrap();
    let first = {
        let mut s = seen.lock().unwrap();
        s.deploys += 1;
        if let Some(k) = headers.get("idempotency-key") {
            s.idempotency_keys
                .push(k.to_str().unwrap_or("").to_string());
        }
        if let Some(a) = headers.get("authorization") {
            s.authorization.push(a.to_str().unwrap_or("").to_string());
        }
        s.deploys == 1
    };
    match f {
        Fault::Always500 => return (StatusCode::INTERNAL_SERVER_ERROR, Json(json!({}))),
        Fault::Once500 if first => return (StatusCode::INTERNAL_SERVER_ERROR, Json(json!({}))),
        Fault::Reject400 => return (StatusCode::BAD_REQUEST, Json(json!({"error": "no"}))),
        Fault::Hang => {
            tokio::time::sleep(Duration::from_secs(30)).await;
        }
        _ => {}
    }
    let digest = body["bundle"]["digest"].as_str().unwrap_or("").to_string();
    let policy = if f == Fault::V1 {
        "42".to_string() // one slot for everything
    } else {
        body["bundle"]["payload"]["manifest"]["policy_id"]
            .as_str()
            .unwrap_or("")
            .to_string()
    };
    let version = body["bundle"]["payload"]["manifest"]["version"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let mut s = seen.lock().unwrap();
    if f != Fault::LyingActive {
        if let Some(prev) = s.active.remove(&policy) {
            s.history.entry(policy.clone()).or_default().push(prev);
        }
        s.active.insert(policy, (digest.clone(), version));
    }
    (StatusCode::OK, Json(json!({"digest": digest})))
}

async fn rollback(
    State((seen, fault)): State<Shared>,
    Json(body): Json<Value>,
) -> (StatusCode, Json<Value>) {
    let mut s = seen.lock().unwrap();
    s.rollbacks += 1;
    if *fault.lock().unwrap() == Fault::RollbackFails {
        return (StatusCode::INTERNAL_SERVER_ERROR, Json(json!({})));
    }
    let Some(policy) = body["policy_id"].as_str().map(str::to_string) else {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "policy_id is required"})),
        );
    };
    let history = s.history.entry(policy.clone()).or_default();
    let back = match body["to"].as_str() {
        Some(to) => {
            let Some(pos) = history.iter().rposition(|(d, _)| d == to) else {
                return (
                    StatusCode::NOT_FOUND,
                    Json(json!({"error": "unknown digest"})),
                );
            };
            Some(history.remove(pos))
        }
        None => history.pop(),
    };
    match back {
        Some(entry) => s.active.insert(policy, entry),
        None => s.active.remove(&policy),
    };
    (StatusCode::OK, Json(json!({})))
}
