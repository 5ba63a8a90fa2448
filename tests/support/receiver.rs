//! A §8 receiver with injectable faults, for the failure paths a real
//! `pde agent` will not produce on demand (a 500, a hang, a lying `/active`).
//! It keeps the real bookkeeping (active digest, previous digests, rollback),
//! and counts every request so tests can prove what did or did not arrive.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::extract::State;
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
}

/// Everything the receiver saw and holds.
#[derive(Debug, Default)]
pub struct Seen {
    pub deploys: u32,
    pub rollbacks: u32,
    pub health_checks: u32,
    pub active: Option<(String, String)>,
    pub history: Vec<(String, String)>,
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
            .route("/active", get(active))
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

    pub fn active_digest(&self) -> Option<String> {
        self.seen.lock().unwrap().active.clone().map(|a| a.0)
    }

    /// Pretends a bundle with `digest` is already active.
    pub fn preload(&self, digest: &str, version: &str) {
        self.seen.lock().unwrap().active = Some((digest.into(), version.into()));
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

async fn active(State((seen, _)): State<Shared>) -> (StatusCode, Json<Value>) {
    match &seen.lock().unwrap().active {
        Some((d, v)) => (StatusCode::OK, Json(json!({"digest": d, "version": v}))),
        None => (
            StatusCode::NOT_FOUND,
            Json(json!({"error": "nothing active"})),
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
    let version = body["bundle"]["payload"]["manifest"]["version"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let mut s = seen.lock().unwrap();
    if f != Fault::LyingActive {
        if let Some(prev) = s.active.take() {
            s.history.push(prev);
        }
        s.active = Some((digest.clone(), version));
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
    match body["to"].as_str() {
        Some(to) => {
            let Some(pos) = s.history.iter().rposition(|(d, _)| d == to) else {
                return (
                    StatusCode::NOT_FOUND,
                    Json(json!({"error": "unknown digest"})),
                );
            };
            let entry = s.history.remove(pos);
            s.active = Some(entry);
        }
        None => {
            s.active = s.history.pop();
        }
    }
    (StatusCode::OK, Json(json!({})))
}
