//! A real HTTP receiver for the push and envcheck tests: an axum server on
//! 127.0.0.1 (port 0) that honours push protocol v2 of DESIGN §8, keeps an
//! active digest and history per policy, counts what it receives, and can be told to
//! misbehave in the ways a real service does (5xx, 4xx, slowness, lying about
//! what is active, failing rollbacks, being unhealthy).
//!
//! It is not `pde agent`: it checks the bundle's digest and the
//! Idempotency-Key but not signatures, because push does not depend on them.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

use crate::bundle::{Bundle, Manifest, Payload};

/// How a receiver behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Follows the protocol.
    Ok,
    /// Every `POST /deploy` gets 500.
    Always500,
    /// The first `POST /deploy` gets 500, the rest are handled.
    Fail500Once,
    /// Every `POST /deploy` waits this long before being handled.
    Slow(Duration),
    /// Accepts deploys, but `/active` reports another digest.
    WrongActive,
    /// Every `POST /deploy` gets 400 (a permanent rejection).
    Reject400,
    /// Deploys work; every `POST /rollback` gets 500.
    RollbackFails,
    /// `GET /healthz` answers 503.
    Unhealthy,
    /// Speaks protocol v1: one active slot, `GET /active` answers that one
    /// bundle (or 404), and `/active/{policy_id}` does not exist.
    V1,
}

/// The digest `/active` reports in [`Mode::WrongActive`].
pub(crate) const OTHER_DIGEST: &str =
    "sha256:0000000000000000000000000000000000000000000000000000000000000000";

/// Counts deploys in flight across receivers, and the most seen at once.
#[derive(Debug, Default)]
pub(crate) struct Gauge {
    now: AtomicUsize,
    /// The highest number in flight at the same time.
    pub max: AtomicUsize,
}

#[derive(Debug, Default)]
struct Inner {
    /// policy id → (digest, version) served by `/active/{policy_id}`.
    active: BTreeMap<String, (String, String)>,
    /// policy id → previously active bundles, most recent last.
    history: BTreeMap<String, Vec<(String, String)>>,
    /// Every bundle it has held: digest → (policy id, version).
    known: BTreeMap<String, (String, String)>,
    /// Idempotency keys seen → digest.
    keys: BTreeMap<String, String>,
    last_authorization: Option<String>,
    last_idempotency_key: Option<String>,
    last_content_type: Option<String>,
}

/// What a receiver saw and holds; shared with its handlers.
#[derive(Debug)]
pub(crate) struct Shared {
    mode: Mode,
    gauge: Option<Arc<Gauge>>,
    inner: Mutex<Inner>,
    /// `POST /deploy` requests received.
    pub deploys: AtomicU32,
    /// `POST /rollback` requests received.
    pub rollbacks: AtomicU32,
    /// `GET /healthz` requests received.
    pub healthz: AtomicU32,
}

/// A running receiver; stops when dropped.
pub(crate) struct Receiver {
    /// Its base URL, `http://127.0.0.1:<port>`.
    pub url: String,
    /// Its state and counters.
    pub shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Receiver {
    /// A receiver with nothing active.
    pub async fn start(mode: Mode) -> Receiver {
        Self::start_full(mode, None, None).await
    }

    /// A receiver with `(digest, version)` of policy 42 active already.
    pub async fn with_active(mode: Mode, digest: &str, version: &str) -> Receiver {
        Self::start_full(mode, Some((digest, version)), None).await
    }

    /// A receiver with every option.
    pub async fn start_full(
        mode: Mode,
        active: Option<(&str, &str)>,
        gauge: Option<Arc<Gauge>>,
    ) -> Receiver {
        let mut inner = Inner::default();
        if let Some((d, v)) = active {
            inner
                .active
                .insert("42".into(), (d.to_string(), v.to_string()));
            inner
                .known
                .insert(d.to_string(), ("42".into(), v.to_string()));
        }
        let shared = Arc::new(Shared {
            mode,
            gauge,
            inner: Mutex::new(inner),
            deploys: AtomicU32::new(0),
            rollbacks: AtomicU32::new(0),
            healthz: AtomicU32::new(0),
        });
        let app = Router::new()
            .route("/deploy", post(deploy))
            .route("/active", get(active_all))
            .route("/active/{policy_id}", get(active_handler))
            .route("/rollback", post(rollback))
            .route("/healthz", get(healthz))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Receiver { url, shared, task }
    }

    /// The digest it really holds active for policy 42 (whatever `/active`
    /// reports).
    pub fn active(&self) -> Option<String> {
        self.active_of("42")
    }

    /// The digest it really holds active for `policy_id`.
    pub fn active_of(&self, policy_id: &str) -> Option<String> {
        self.lock().active.get(policy_id).map(|(d, _)| d.clone())
    }

    /// The `Authorization` header of the last deploy.
    pub fn last_authorization(&self) -> Option<String> {
        self.lock().last_authorization.clone()
    }

    /// The `Idempotency-Key` header of the last deploy.
    pub fn last_idempotency_key(&self) -> Option<String> {
        self.lock().last_idempotency_key.clone()
    }

    /// The `Content-Type` header of the last deploy.
    pub fn last_content_type(&self) -> Option<String> {
        self.lock().last_content_type.clone()
    }

    /// `POST /deploy` requests received.
    pub fn deploys(&self) -> u32 {
        self.shared.deploys.load(Ordering::SeqCst)
    }

    /// `POST /rollback` requests received.
    pub fn rollbacks(&self) -> u32 {
        self.shared.rollbacks.load(Ordering::SeqCst)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.shared.inner.lock().unwrap()
    }
}

fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, axum::Json(json!({"error": message.into()}))).into_response()
}

async fn deploy(State(s): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    let n = s.deploys.fetch_add(1, Ordering::SeqCst) + 1;
    {
        let mut inner = s.inner.lock().unwrap();
        inner.last_authorization = header(&headers, "authorization");
        inner.last_idempotency_key = header(&headers, "idempotency-key");
        inner.last_content_type = header(&headers, "content-type");
    }
    match s.mode {
        Mode::Always500 => return error(StatusCode::INTERNAL_SERVER_ERROR, "disk on fire"),
        Mode::Fail500Once if n == 1 => {
            return error(StatusCode::INTERNAL_SERVER_ERROR, "warming up");
        }
        Mode::Reject400 => return error(StatusCode::BAD_REQUEST, "signature not trusted"),
        Mode::Slow(d) => tokio::time::sleep(d).await,
        _ => {}
    }
    if let Some(g) = &s.gauge {
        let now = g.now.fetch_add(1, Ordering::SeqCst) + 1;
        g.max.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(100)).await;
        g.now.fetch_sub(1, Ordering::SeqCst);
    }
    if header(&headers, "content-type").as_deref() != Some("application/json") {
        return error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "expected application/json",
        );
    }
    let request: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("malformed JSON: {e}")),
    };
    let env = request
        .get("env")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let bundle = match Bundle::from_value(request.get("bundle").cloned().unwrap_or(Value::Null)) {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
    };
    let key = format!("{}:{env}", bundle.digest);
    if header(&headers, "idempotency-key").as_deref() != Some(key.as_str()) {
        return error(
            StatusCode::BAD_REQUEST,
            format!("Idempotency-Key must be {key}"),
        );
    }
    let mut inner = s.inner.lock().unwrap();
    let policy_id = &bundle.payload.manifest.policy_id;
    let active_now = inner.active.get(policy_id).map(|(d, _)| d.as_str());
    match inner.keys.get(&key) {
        // A repeat is a no-op only while its bundle is active (DESIGN §6).
        Some(d) if *d == bundle.digest && active_now == Some(d.as_str()) => {
            return axum::Json(json!({"status": "unchanged"})).into_response();
        }
        Some(d) if *d == bundle.digest => {}
        Some(_) => return error(StatusCode::UNPROCESSABLE_ENTITY, "key reused"),
        None => {}
    }
    let version = bundle.payload.manifest.version.clone();
    let policy = if s.mode == Mode::V1 {
        "42".to_string() // one slot, whatever the policy
    } else {
        bundle.payload.manifest.policy_id.clone()
    };
    if let Some(old) = inner.active.remove(&policy) {
        inner.history.entry(policy.clone()).or_default().push(old);
    }
    inner
        .active
        .insert(policy.clone(), (bundle.digest.clone(), version.clone()));
    inner.known.insert(bundle.digest.clone(), (policy, version));
    inner.keys.insert(key, bundle.digest.clone());
    axum::Json(json!({"status": "activated", "digest": bundle.digest})).into_response()
}

async fn active_all(State(s): State<Arc<Shared>>) -> Response {
    let inner = s.inner.lock().unwrap();
    if s.mode == Mode::V1 {
        return match inner.active.values().next() {
            Some((digest, version)) => {
                axum::Json(json!({"digest": digest, "version": version})).into_response()
            }
            None => error(StatusCode::NOT_FOUND, "no_active_bundle"),
        };
    }
    let policies: serde_json::Map<String, Value> = inner
        .active
        .iter()
        .map(|(p, (d, v))| (p.clone(), json!({"digest": d, "version": v})))
        .collect();
    axum::Json(json!({ "policies": policies })).into_response()
}

async fn active_handler(
    State(s): State<Arc<Shared>>,
    axum::extract::Path(policy_id): axum::extract::Path<String>,
) -> Response {
    match s.mode {
        Mode::WrongActive => {
            return axum::Json(json!({"digest": OTHER_DIGEST, "version": "0.0.1"})).into_response();
        }
        Mode::V1 => return error(StatusCode::NOT_FOUND, "not_found"),
        _ => {}
    }
    match s.inner.lock().unwrap().active.get(&policy_id) {
        Some((digest, version)) => {
            axum::Json(json!({"digest": digest, "version": version})).into_response()
        }
        None => error(StatusCode::NOT_FOUND, "policy_not_active"),
    }
}

async fn rollback(State(s): State<Arc<Shared>>, body: Bytes) -> Response {
    s.rollbacks.fetch_add(1, Ordering::SeqCst);
    if s.mode == Mode::RollbackFails {
        return error(StatusCode::INTERNAL_SERVER_ERROR, "cannot roll back");
    }
    let (policy, to) = match serde_json::from_slice::<Value>(&body) {
        Ok(v) => match v.get("policy_id").and_then(Value::as_str) {
            Some(p) => (p.to_string(), v.get("to").cloned().unwrap_or(Value::Null)),
            None => return error(StatusCode::BAD_REQUEST, "`policy_id` is required"),
        },
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("malformed JSON: {e}")),
    };
    let mut inner = s.inner.lock().unwrap();
    match to {
        Value::String(digest) => {
            let Some((owner, version)) = inner.known.get(&digest).cloned() else {
                return error(StatusCode::NOT_FOUND, format!("unknown bundle {digest}"));
            };
            if owner != policy {
                return error(StatusCode::CONFLICT, "digest of another policy");
            }
            if let Some(old) = inner.active.remove(&policy) {
                inner.history.entry(policy.clone()).or_default().push(old);
            }
            inner.active.insert(policy, (digest, version));
        }
        Value::Null => {
            let previous = inner.history.get_mut(&policy).and_then(Vec::pop);
            match previous {
                Some(p) => inner.active.insert(policy, p),
                None => inner.active.remove(&policy),
            };
        }
        _ => return error(StatusCode::BAD_REQUEST, "`to` must be a digest or null"),
    }
    axum::Json(json!({"status": "rolled-back"})).into_response()
}

async fn healthz(State(s): State<Arc<Shared>>) -> Response {
    s.healthz.fetch_add(1, Ordering::SeqCst);
    if s.mode == Mode::Unhealthy {
        return error(StatusCode::SERVICE_UNAVAILABLE, "database unreachable");
    }
    "ok".into_response()
}

/// A signed bundle of policy 42 at `version`.
pub(crate) fn bundle(version: &str) -> Bundle {
    let key = ed25519_dalek::SigningKey::from_bytes(&[42; 32]);
    let payload = Payload {
        manifest: Manifest {
            policy_id: "42".into(),
            version: version.into(),
            source_commit: "0123456789abcdef0123456789abcdef01234567".into(),
            validators: vec![],
        },
        policy: json!({"id": "42", "version": version, "rules": [{"key": "income.max", "value": 1}]}),
    };
    Bundle::seal(payload, &[&key]).expect("test payload has a canonical form")
}

/// A loopback URL where nothing listens (connections are refused).
pub(crate) async fn closed_port_url() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{addr}")
}
