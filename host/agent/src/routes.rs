//! HTTP handlers of the agent: request parsing, verification, and the mapping
//! of every outcome onto a status code and a JSON body.
//!
//! Verification (digest, signature) happens before the state lock is taken,
//! so a flood of bad bundles cannot hold up good ones. Every state change runs
//! under one `tokio::sync::Mutex`, on a blocking thread (the store does
//! synchronous file I/O with fsyncs), so deploys and rollbacks are applied one
//! at a time, in lock order. Activation hooks run on their own worker, in
//! activation order, outside the lock (see [`after_activation`]).

use std::sync::Arc;
use std::time::Instant;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::sync::{Mutex, OwnedMutexGuard};
use tracing::{Instrument, error, info, info_span, warn};

use super::hook;
use super::store::{
    ActiveRecord, DeployOutcome, Incoming, NonceCheck, RollbackOutcome, Store, StoreError,
    is_valid_policy_id, is_well_formed_digest, probe_writable,
};
use pde_core::bundle::{Bundle, BundleError, canonical_bytes};
use pde_core::keys::TrustedKeys;

/// The header that makes a deploy idempotent.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
/// The header on every answer that carries the agent's own request id (the
/// `request_id` of its log lines), whatever id the client sent.
pub const AGENT_REQUEST_ID: &str = "pde-request-id";
/// The header on every answer that names the push protocol versions spoken.
pub const PROTOCOL_HEADER: &str = "pde-protocol";
/// The push protocol versions this agent speaks (also in `GET /healthz`).
pub use pde_core::wire::{PROTOCOL_VERSION, PROTOCOL_VERSIONS};
/// Longest idempotency key accepted.
pub const MAX_KEY_LEN: usize = 512;
/// Longest bundle version accepted: it is kept in the policy's document for
/// each stored bundle and activation (semver strings are far shorter).
pub const MAX_VERSION_LEN: usize = 128;

/// How long a deploy body may take to arrive once its slot is granted.
const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Everything a handler needs.
#[derive(Clone)]
pub struct AppState {
    /// The data dir, behind the lock that serialises state changes.
    pub store: Arc<Mutex<Store>>,
    /// Immutable settings.
    pub settings: Arc<Settings>,
    /// Counters and gauges for `GET /metrics`.
    pub metrics: super::metrics::Shared,
    /// Deploy bodies read and verified at once (`--max-concurrent-deploys`).
    pub deploy_slots: Arc<tokio::sync::Semaphore>,
    /// The queue of the activation-hook worker, started on first use.
    pub hooks: Arc<std::sync::OnceLock<tokio::sync::mpsc::UnboundedSender<HookJob>>>,
    /// Pull mode's state (`--pull`), for `/healthz` and `/metrics`.
    pub pull: Option<Arc<super::pull::PullState>>,
}

/// The agent's settings, fixed at start.
pub struct Settings {
    /// Keys whose signatures are accepted.
    pub trusted: TrustedKeys,
    /// `false` only with `--insecure-accept-unsigned` and no trusted key.
    pub check_signatures: bool,
    /// Keys whose signed approvals count.
    pub approvers: pde_core::approval::Approvers,
    /// Approvals by distinct approver keys a bundle must carry.
    pub min_approvals: u32,
    /// What the validation attestation must show.
    pub validation: pde_core::attestation::Requirement,
    /// Largest request body accepted.
    pub max_body_bytes: usize,
    /// Command run after each activation.
    pub on_activate: Option<String>,
    /// The data dir (for the readiness probe, which does not take the lock).
    pub data_dir: std::path::PathBuf,
    /// Active bundles refused at start because they no longer verified,
    /// until a deploy or rollback of their policy replaces them; `GET
    /// /healthz` lists them, without taking the state lock.
    pub integrity: super::store::IntegrityView,
}

/// An error answer: a status and `{"error": <code>, "reason": <text>}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    reason: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, reason: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            reason: reason.into(),
        }
    }

    /// The error code (`signature_rejected`, `digest_mismatch`, …).
    pub fn code(&self) -> &'static str {
        self.code
    }

    /// The sentence that explains it.
    pub fn reason(&self) -> &str {
        &self.reason
    }

    /// 400: the request is malformed.
    pub fn bad_request(code: &'static str, reason: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, reason)
    }

    /// 401: missing or wrong bearer token.
    pub fn unauthorized(reason: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", reason)
    }

    /// 413: the body is over the configured limit.
    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("request body is over the agent's limit of {limit} bytes (--max-body-bytes)"),
        )
    }

    fn internal(what: &str, e: impl std::fmt::Display) -> Self {
        error!(error = %e, "{what}");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "storage_failed",
            format!("{what}: {e}"),
        )
    }
}

/// The error code of a refused request, left on the response so that the
/// request middleware can count it.
#[derive(Debug, Clone, Copy)]
pub struct Refused(pub &'static str);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (
            self.status,
            Json(json!({"error": self.code, "reason": self.reason})),
        )
            .into_response();
        response.extensions_mut().insert(Refused(self.code));
        response
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        ApiError::internal("the data dir could not be updated", e)
    }
}

fn bundle_error(e: &BundleError) -> ApiError {
    let (status, code) = match e {
        BundleError::Malformed(_) => (StatusCode::BAD_REQUEST, "malformed_bundle"),
        BundleError::Format(_) => (StatusCode::BAD_REQUEST, "unsupported_format"),
        BundleError::Canonical(_) => (StatusCode::BAD_REQUEST, "malformed_bundle"),
        BundleError::Digest { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "digest_mismatch"),
        BundleError::Signature { .. } => (StatusCode::FORBIDDEN, "signature_rejected"),
    };
    ApiError::new(status, code, e.to_string())
}

/// Middleware: one span per request (with a request id, taken from an
/// `X-Request-Id` header or made up), one line with its status and time, and
/// the count of refusals by reason.
pub async fn log_requests(State(app): State<AppState>, request: Request, next: Next) -> Response {
    static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    // The agent's own id is always made here, so no client can make two
    // requests share one; the client's id, when it sends one, is logged
    // beside it (and echoed) but never takes its place.
    let request_id = format!(
        "agent-{:x}",
        NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let client_id = request
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_string);
    let span = info_span!(
        "request",
        request_id = %request_id,
        client_request_id = client_id.as_deref(),
        method = %request.method(),
        path = %request.uri().path(),
    );
    let started = Instant::now();
    async move {
        let mut response = next.run(request).await;
        if let Some(Refused(code)) = response.extensions().get::<Refused>().copied() {
            app.metrics.rejected(code);
        }
        response.headers_mut().insert(
            PROTOCOL_HEADER,
            axum::http::HeaderValue::from(PROTOCOL_VERSION),
        );
        let echoed = client_id.as_deref().unwrap_or(&request_id);
        if let Ok(id) = axum::http::HeaderValue::from_str(echoed) {
            response.headers_mut().insert("x-request-id", id);
        }
        if let Ok(id) = axum::http::HeaderValue::from_str(&request_id) {
            response.headers_mut().insert(AGENT_REQUEST_ID, id);
        }
        info!(
            status = response.status().as_u16(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "handled"
        );
        response
    }
    .instrument(span)
    .await
}

/// Middleware: refuses a body announced as too large before reading any of it.
pub async fn check_content_length(
    State(limit): State<usize>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let announced = request
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if announced.is_some_and(|n| n > limit as u64) {
        warn!(
            content_length = announced,
            limit, "rejected request: body over the limit"
        );
        return Err(ApiError::too_large(limit));
    }
    Ok(next.run(request).await)
}

/// Answers for unknown paths.
pub async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
}

/// Answers for a known path with the wrong method.
pub async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this endpoint does not accept that method (see docs/agent.md)",
    )
}

fn body_bytes(body: Result<Bytes, BytesRejection>, limit: usize) -> Result<Bytes, ApiError> {
    body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            warn!(limit, "rejected request: body over the limit");
            ApiError::too_large(limit)
        } else {
            ApiError::bad_request("unreadable_body", rejection.body_text())
        }
    })
}

/// Runs `f` on the store, on a blocking thread, while holding the lock.
pub(crate) async fn with_store<T, F>(
    guard: OwnedMutexGuard<Store>,
    f: F,
) -> Result<(OwnedMutexGuard<Store>, T), ApiError>
where
    T: Send + 'static,
    F: FnOnce(&mut Store) -> T + Send + 'static,
{
    tokio::task::spawn_blocking(move || {
        let mut guard = guard;
        let out = f(&mut guard);
        (guard, out)
    })
    .await
    .map_err(|e| ApiError::internal("a state update panicked", e))
}

/// Parses and verifies a deploy body: `{bundle, env}`.
///
/// Cheap checks come first and allocate next to nothing, so a flood of large
/// bodies from someone without a trusted key costs a scan, not a parse:
/// 1. the envelope and the bundle's head (`format`, `digest`, `signatures`)
///    are read as borrowed slices of the body; the payload is not parsed;
/// 2. the signatures are checked against the *claimed* digest string, which
///    is what they sign;
/// 3. only then is the payload parsed and its canonical digest recomputed,
///    which must equal the claimed one.
///
/// The payload is stored as received, unknown fields included, so the stored
/// file still hashes to its digest.
pub(crate) fn parse_deploy(
    body: &[u8],
    settings: &Settings,
) -> Result<(Incoming, String), ApiError> {
    use std::borrow::Cow;

    use serde_json::value::RawValue;

    #[derive(serde::Deserialize)]
    struct Envelope<'a> {
        #[serde(borrow, default)]
        env: Option<Cow<'a, str>>,
        #[serde(borrow, default)]
        bundle: Option<&'a RawValue>,
        /// Push protocol v4: the fencing number of the pusher's lock.
        #[serde(default)]
        fence: Option<u64>,
        /// The release key's signature over the fence, policy, digest and env.
        #[serde(default)]
        fence_proof: Option<pde_core::keys::Signature>,
    }
    #[derive(serde::Deserialize)]
    struct Head<'a> {
        #[serde(borrow, default)]
        format: Option<Cow<'a, str>>,
        #[serde(borrow, default)]
        digest: Option<Cow<'a, str>>,
        #[serde(default)]
        signatures: Option<Vec<pde_core::keys::Signature>>,
        #[serde(default)]
        approvals: Option<Vec<pde_core::approval::SignedApproval>>,
        #[serde(default)]
        attestation: Option<pde_core::attestation::Envelope>,
        #[serde(borrow, default)]
        payload: Option<&'a RawValue>,
    }

    let envelope: Envelope<'_> = serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(
            "malformed_request",
            format!("body is not a JSON object of the deploy request: {e}"),
        )
    })?;
    let env = match envelope.env {
        // Bounded like a policy id: it is stored with every idempotency key
        // and activation, so an unbounded one would grow the policy's
        // document with each replay (the red team's 12 MiB `env`).
        Some(env) if pde_core::wire::valid_env(&env) => env.into_owned(),
        Some(_) => {
            return Err(ApiError::bad_request(
                "bad_env",
                "`env` must be 1 to 128 of A-Z a-z 0-9 . _ - starting with a letter or digit",
            ));
        }
        None => {
            return Err(ApiError::bad_request(
                "malformed_request",
                "`env` must be a string naming the environment",
            ));
        }
    };
    let raw = envelope
        .bundle
        .filter(|b| b.get().trim_start().starts_with('{'))
        .ok_or_else(|| {
            ApiError::bad_request(
                "malformed_request",
                "`bundle` must be a pde.bundle/v2 (or v1) object",
            )
        })?;
    let head: Head<'_> = serde_json::from_str(raw.get())
        .map_err(|e| bundle_error(&BundleError::Malformed(e.to_string())))?;
    let format = head.format.as_deref().unwrap_or_default();
    if !pde_core::bundle::FORMATS.contains(&format) {
        return Err(bundle_error(&BundleError::Format(format.to_string())));
    }
    let (Some(digest), Some(payload)) = (head.digest, head.payload) else {
        return Err(bundle_error(&BundleError::Malformed(
            "a bundle needs `digest` and `payload`".into(),
        )));
    };
    let signatures = head.signatures.unwrap_or_default();
    if settings.check_signatures {
        settings
            .trusted
            .verify_any(digest.as_bytes(), &signatures)
            .map_err(|source| {
                bundle_error(&BundleError::Signature {
                    digest: digest.to_string(),
                    source,
                })
            })?;
    } else {
        warn!(%digest, "accepting bundle WITHOUT checking its signature (--insecure-accept-unsigned)");
    }
    // Signed by a trusted key (or explicitly unchecked): now the real work.
    let payload: Value = serde_json::from_str(payload.get())
        .map_err(|e| bundle_error(&BundleError::Malformed(e.to_string())))?;
    let mut kept = serde_json::Map::new();
    kept.insert("format".into(), Value::String(format.to_string()));
    kept.insert("digest".into(), Value::String(digest.into_owned()));
    kept.insert(
        "signatures".into(),
        serde_json::to_value(&signatures).unwrap_or_default(),
    );
    let approvals = head.approvals.unwrap_or_default();
    if !approvals.is_empty() {
        kept.insert(
            "approvals".into(),
            serde_json::to_value(&approvals).unwrap_or_default(),
        );
    }
    if let Some(attestation) = head.attestation {
        kept.insert(
            "attestation".into(),
            serde_json::to_value(&attestation).unwrap_or_default(),
        );
    }
    kept.insert("payload".into(), payload);
    let kept = Value::Object(kept);
    // Stored in its own format's canonical form, so the file hashes back to
    // its digest with the algorithm its format tag names.
    let bytes = canonical_bytes(format, &kept).map_err(|e| bundle_error(&e))?;
    let bundle = Bundle::from_value(kept).map_err(|e| bundle_error(&e))?;
    check_approvals(&bundle, settings)?;
    check_attestation(&bundle, settings)?;
    let version = &bundle.payload.manifest.version;
    if version.is_empty() || version.len() > MAX_VERSION_LEN {
        return Err(ApiError::bad_request(
            "malformed_bundle",
            format!("the bundle's version must be 1 to {MAX_VERSION_LEN} bytes"),
        ));
    }
    let policy_id = &bundle.payload.manifest.policy_id;
    if !is_valid_policy_id(policy_id) {
        return Err(ApiError::bad_request(
            "malformed_bundle",
            format!(
                "policy id {policy_id:?} must be 1 to 128 of A-Z a-z 0-9 . _ - and start with a letter or digit"
            ),
        ));
    }
    let fence = check_deploy_fence(
        envelope.fence,
        envelope.fence_proof.as_ref(),
        (policy_id, &bundle.digest, &env),
        settings,
    )?;
    Ok((
        Incoming {
            digest: bundle.digest.clone(),
            version: bundle.payload.manifest.version.clone(),
            policy_id: bundle.payload.manifest.policy_id.clone(),
            bytes,
            fence,
        },
        env,
    ))
}

/// The fence of a deploy (push protocol v4), if it carries one: at most
/// [`pde_core::fence::MAX_FENCE`], signed by a trusted release key over the
/// policy, digest and environment when the agent trusts keys (a fence only
/// ever raises what the agent remembers, so an unsigned one would let a
/// replayer lock every later deploy out), and not from further in the
/// future than [`pde_core::fence::MAX_AHEAD_SECS`]. Whether it is lower
/// than what the agent has seen is decided under the state lock.
fn check_deploy_fence(
    fence: Option<u64>,
    proof: Option<&pde_core::keys::Signature>,
    (policy_id, digest, env): (&str, &str, &str),
    settings: &Settings,
) -> Result<Option<u64>, ApiError> {
    use pde_core::fence::{MAX_AHEAD_SECS, MAX_FENCE, now_micros, too_far_ahead, verify_deploy};
    let Some(fence) = fence else {
        return Ok(None);
    };
    if fence > MAX_FENCE {
        return Err(ApiError::bad_request(
            "malformed_request",
            format!("`fence` must be an integer from 0 to {MAX_FENCE}"),
        ));
    }
    if settings.check_signatures {
        let Some(proof) = proof else {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "fence_signature_rejected",
                "a deploy's `fence` must come with a `fence_proof` signed by a trusted release key \
                 (push protocol v4, docs/agent.md \"Fencing\")",
            ));
        };
        verify_deploy(&settings.trusted, policy_id, digest, env, fence, proof).map_err(|e| {
            ApiError::new(
                StatusCode::FORBIDDEN,
                "fence_signature_rejected",
                format!("fence proof rejected: {e}"),
            )
        })?;
    }
    if too_far_ahead(fence, now_micros()) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "fence_ahead",
            format!(
                "fence {fence} lies more than {MAX_AHEAD_SECS} s ahead of this agent's clock; \
                 fences are microseconds since 1970 on the pusher's (or its database's) clock, \
                 so check both clocks"
            ),
        ));
    }
    Ok(Some(fence))
}

/// The 409 answer to a request whose fence is stale.
fn fence_stale(refusal: &super::store::FenceRefusal) -> ApiError {
    ApiError::new(StatusCode::CONFLICT, "fence_stale", refusal.reason.clone())
}

/// With `--min-approvals N`, the bundle must carry N valid approvals of the
/// policy in its payload by distinct `--approver-key` keys. Counted by the
/// same function as the pusher's, over the content digest recomputed here.
fn check_approvals(bundle: &Bundle, settings: &Settings) -> Result<(), ApiError> {
    match approvals_shortfall(bundle, &settings.approvers, settings.min_approvals) {
        None => Ok(()),
        Some(reason) => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "approvals_insufficient",
            reason,
        )),
    }
}

/// Why `bundle` does not carry `min_approvals` valid approvals by distinct
/// `approvers`, or `None` when it does (or none are required). The one
/// count used on deploy, on rollback and when the agent starts.
pub(crate) fn approvals_shortfall(
    bundle: &Bundle,
    approvers: &pde_core::approval::Approvers,
    min_approvals: u32,
) -> Option<String> {
    if min_approvals == 0 {
        return None;
    }
    let policy = &bundle.payload.policy;
    let digest = match pde_core::approval::policy_digest(policy) {
        Ok(d) => d,
        Err(e) => return Some(format!("bundle {}: {e}", bundle.digest)),
    };
    let tally = pde_core::approval::tally(
        &bundle.approvals,
        &bundle.payload.manifest.policy_id,
        &digest,
        approvers,
    );
    let have = tally.counted.len();
    if have >= min_approvals as usize {
        return None;
    }
    let mut reason = format!(
        "bundle {} carries {have} valid approval(s) of policy content {digest} by distinct \
         trusted approver keys; this agent requires {min_approvals}",
        bundle.digest
    );
    for r in &tally.rejected {
        reason.push_str(&format!("; {r}"));
    }
    Some(reason)
}

/// With `--plugin-key` or `--require-plugin`, the bundle's validation
/// attestation must be signed by a trusted release key, be about this
/// bundle, name only validators signed by a `--plugin-key` key, and show
/// each required validator ran and passed ([`pde_core::attestation::check`]).
fn check_attestation(bundle: &Bundle, settings: &Settings) -> Result<(), ApiError> {
    if settings.validation.is_empty() {
        return Ok(());
    }
    pde_core::attestation::check(bundle, &settings.trusted, &settings.validation)
        .map(drop)
        .map_err(|e| ApiError::new(StatusCode::FORBIDDEN, "attestation_rejected", e.to_string()))
}

fn idempotency_key(headers: &HeaderMap) -> Result<String, ApiError> {
    let Some(value) = headers.get(IDEMPOTENCY_KEY) else {
        return Err(ApiError::bad_request(
            "missing_idempotency_key",
            "an `Idempotency-Key` header is required (by convention `<digest>:<env>`)",
        ));
    };
    // Visible ASCII only: a header value may also hold spaces and tabs
    // (HTTP strips them only at its ends), and a key that differs from
    // another by inner whitespace would look like it in every log line.
    let key = value.to_str().unwrap_or("").trim();
    if key.is_empty() || key.len() > MAX_KEY_LEN || !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ApiError::bad_request(
            "bad_idempotency_key",
            format!("`Idempotency-Key` must be 1 to {MAX_KEY_LEN} visible ASCII characters"),
        ));
    }
    Ok(key.to_string())
}

/// One activation waiting for its hook.
pub struct HookJob {
    record: ActiveRecord,
    bundle: std::path::PathBuf,
    done: tokio::sync::oneshot::Sender<Result<ActiveRecord, ApiError>>,
}

/// Hands the activation to the hook worker and waits for its verdict.
///
/// Called with the state lock held, so jobs are queued in activation order;
/// the worker runs them one at a time in that order, so the service is
/// reloaded with the bundles in the order they became active, and the last
/// reload is always of the active one. The lock is released before the hook
/// runs: a slow hook holds up neither `GET /active` nor the next deploy.
/// The worker is its own task, so a client that hangs up does not cut a hook
/// short or lose its result.
pub(crate) async fn after_activation(
    app: &AppState,
    guard: OwnedMutexGuard<Store>,
    record: ActiveRecord,
) -> Result<ActiveRecord, ApiError> {
    let Some(cmd) = app.settings.on_activate.clone() else {
        return Ok(record);
    };
    let queue = app.hooks.get_or_init(|| {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(hook_worker(cmd, app.store.clone(), app.metrics.clone(), rx));
        tx
    });
    let (done, verdict) = tokio::sync::oneshot::channel();
    let job = HookJob {
        bundle: guard.bundle_path(&record.digest),
        record,
        done,
    };
    queue
        .send(job)
        .map_err(|e| ApiError::internal("the activation hook worker stopped", e))?;
    drop(guard);
    verdict
        .await
        .map_err(|e| ApiError::internal("the activation hook worker stopped", e))?
}

async fn hook_worker(
    cmd: String,
    store: Arc<Mutex<Store>>,
    metrics: super::metrics::Shared,
    mut jobs: tokio::sync::mpsc::UnboundedReceiver<HookJob>,
) {
    while let Some(HookJob {
        mut record,
        bundle,
        done,
    }) = jobs.recv().await
    {
        let failed = match hook::run(&cmd, &bundle, &record).await {
            Ok(()) => false,
            Err(e) => {
                warn!(digest = %record.digest, error = %e, "activation hook failed; the bundle stays active");
                metrics.hook_failed();
                true
            }
        };
        let digest = record.digest.clone();
        let policy_id = record.policy_id.clone();
        let guard = store.clone().lock_owned().await;
        let result = match with_store(guard, move |s| {
            s.set_hook_failed(&policy_id, &digest, failed)
        })
        .await
        {
            Ok((_guard, Ok(()))) => {
                record.hook_failed = Some(failed);
                Ok(record)
            }
            Ok((_guard, Err(e))) => Err(ApiError::from(e)),
            Err(e) => Err(e),
        };
        let _ = done.send(result);
    }
}

/// `POST /deploy`.
pub async fn deploy(State(app): State<AppState>, request: Request) -> Result<Response, ApiError> {
    let key = idempotency_key(request.headers()).inspect_err(|e| {
        warn!(outcome = "rejected", error = e.code, "deploy rejected");
    })?;
    // Bodies are read only with a slot: at most `deploy_slots` of them are
    // in memory at once, whoever sends them. A slow sender gives its slot up
    // after BODY_TIMEOUT.
    let _slot = app
        .deploy_slots
        .clone()
        .acquire_owned()
        .await
        .map_err(|e| ApiError::internal("the deploy queue closed", e))?;
    let read = tokio::time::timeout(BODY_TIMEOUT, Bytes::from_request(request, &())).await;
    let Ok(body) = read else {
        warn!(
            outcome = "rejected",
            error = "request_timeout",
            "deploy body too slow"
        );
        return Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            format!(
                "the request body did not arrive within {} s",
                BODY_TIMEOUT.as_secs()
            ),
        ));
    };
    let body = body_bytes(body, app.settings.max_body_bytes)?;
    let settings = app.settings.clone();
    let parsed = tokio::task::spawn_blocking(move || parse_deploy(&body, &settings))
        .await
        .map_err(|e| ApiError::internal("bundle verification panicked", e))?;
    let (incoming, env) = match parsed {
        Ok(ok) => ok,
        Err(e) => {
            warn!(outcome = "rejected", error = e.code, reason = %e.reason, "deploy rejected");
            return Err(e);
        }
    };
    let digest = incoming.digest.clone();
    let hook = app.settings.on_activate.is_some();
    let guard = app.store.clone().lock_owned().await;
    let (guard, outcome) = {
        let key = key.clone();
        let env = env.clone();
        with_store(guard, move |s| s.deploy(&key, &env, &incoming, hook)).await?
    };
    match outcome? {
        DeployOutcome::Repeat(active) => {
            app.metrics.deploy("unchanged");
            info!(%digest, %env, policy_id = %active.policy_id, outcome = "repeat", "deploy is a repeat of an earlier request; nothing to do");
            Ok(
                Json(json!({"outcome": "unchanged", "digest": digest, "active": active}))
                    .into_response(),
            )
        }
        DeployOutcome::AlreadyActive(active) => {
            app.metrics.deploy("already-active");
            info!(%digest, %env, policy_id = %active.policy_id, outcome = "already-active", "deployed bundle is already active");
            Ok(
                Json(json!({"outcome": "already-active", "digest": digest, "active": active}))
                    .into_response(),
            )
        }
        DeployOutcome::FenceStale(refusal) => {
            warn!(%digest, %env, highest = refusal.highest, outcome = "fence-stale", reason = %refusal.reason, "deploy refused: stale fence");
            Err(fence_stale(&refusal))
        }
        DeployOutcome::KeyConflict { previous } => {
            warn!(%digest, %env, %previous, outcome = "key-conflict", "idempotency key reused with another digest");
            Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_conflict",
                format!(
                    "Idempotency-Key {key:?} was already used with {previous}; the key binds the policy, \
                     digest and environment of a request, so use a new key for a different one"
                ),
            ))
        }
        DeployOutcome::Activated(record) => {
            app.metrics.deploy("activated");
            info!(%digest, %env, policy_id = %record.policy_id, version = %record.version, outcome = "activated", "bundle activated");
            let record = after_activation(&app, guard, record).await?;
            Ok(
                Json(json!({"outcome": "activated", "digest": digest, "active": record}))
                    .into_response(),
            )
        }
    }
}

/// `GET /active`: every active policy, `{"policies": {"<id>": {…}}}`.
pub async fn active(State(app): State<AppState>) -> Json<Value> {
    let store = app.store.lock().await;
    Json(json!({"policies": store.active_all()}))
}

/// `GET /active/{policy_id}`: one policy's active bundle, 404 when it has none.
pub async fn active_one(
    State(app): State<AppState>,
    Path(policy_id): Path<String>,
) -> Result<Json<ActiveRecord>, ApiError> {
    let store = app.store.lock().await;
    store.active(&policy_id).cloned().map(Json).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "policy_not_active",
            format!("policy {policy_id:?} is not active on this agent"),
        )
    })
}

/// Query of `GET /bundles`.
#[derive(Debug, serde::Deserialize)]
pub struct BundlesQuery {
    /// Only this policy's bundles.
    policy_id: Option<String>,
}

/// `GET /bundles[?policy_id=ID]`.
pub async fn bundles(State(app): State<AppState>, Query(q): Query<BundlesQuery>) -> Json<Value> {
    let store = app.store.lock().await;
    Json(json!({"bundles": store.list(q.policy_id.as_deref())}))
}

/// `POST /rollback` with `{"policy_id": "<id>", "to": "<digest>" | null}`.
pub async fn rollback(
    State(app): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body_bytes(body, app.settings.max_body_bytes)?;
    let value: Value = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request("malformed_request", format!("body is not JSON: {e}"))
    })?;
    let policy_id = match value.get("policy_id") {
        Some(Value::String(id)) if is_valid_policy_id(id) => id.clone(),
        _ => {
            return Err(ApiError::bad_request(
                "malformed_request",
                "`policy_id` must name the policy to roll back (push protocol v3: \
                 {\"policy_id\": \"<id>\", \"to\": \"<digest>\" | null, \"proof\": {…}})",
            ));
        }
    };
    let to = match value.get("to") {
        None | Some(Value::Null) => None,
        Some(Value::String(d)) if is_well_formed_digest(d) => Some(d.clone()),
        Some(_) => {
            return Err(ApiError::bad_request(
                "malformed_request",
                "`to` must be null or a digest of the form sha256:<64 lowercase hex digits>",
            ));
        }
    };
    let proof = authorize_rollback(&value, &policy_id, to.as_deref(), &app.settings)
        .inspect_err(|e| {
            warn!(%policy_id, outcome = "rejected", error = e.code, reason = %e.reason, "rollback refused");
        })?;
    let fence = rollback_fence(&value, proof.as_ref()).inspect_err(|e| {
        warn!(%policy_id, outcome = "rejected", error = e.code, reason = %e.reason, "rollback refused");
    })?;
    let hook = app.settings.on_activate.is_some();
    let settings = app.settings.clone();
    let guard = app.store.clone().lock_owned().await;
    let (guard, outcome) = with_store(guard, move |s| -> Result<RollbackOutcome, ApiError> {
        if let Some(statement) = &proof {
            spend_proof(s, statement, &policy_id)?;
        }
        // Re-check what is about to become active: the file may have been
        // damaged on disk, or the trusted keys changed since it was stored.
        let target = match &to {
            Some(d) if s.owner(d) == Some(policy_id.as_str()) => Some(d.clone()),
            Some(_) => None,
            None => s.previous(&policy_id).map(str::to_string),
        };
        if let Some(target) = &target
            && s.active(&policy_id).is_none_or(|a| &a.digest != target)
        {
            let bundle = s.load_bundle(target).map_err(|e| {
                ApiError::new(StatusCode::CONFLICT, "stored_bundle_damaged", e.to_string())
            })?;
            if settings.check_signatures {
                bundle
                    .verify_signature(&settings.trusted)
                    .map_err(|e| bundle_error(&e))?;
            }
            // A bundle stored before approvals were required must not come
            // back through the side door.
            check_approvals(&bundle, &settings)?;
            check_attestation(&bundle, &settings)?;
        }
        Ok(s.rollback(&policy_id, to.as_deref(), fence, hook)?)
    })
    .await?;
    match outcome {
        Err(e) => {
            warn!(outcome = "rejected", error = e.code, reason = %e.reason, "rollback rejected");
            Err(e)
        }
        Ok(RollbackOutcome::FenceStale(refusal)) => {
            warn!(highest = refusal.highest, outcome = "fence-stale", reason = %refusal.reason, "rollback refused: stale fence");
            Err(fence_stale(&refusal))
        }
        Ok(RollbackOutcome::Unknown) => {
            warn!(
                outcome = "unknown-digest",
                "rollback to a digest that is not stored"
            );
            Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "unknown_digest",
                "no bundle with that digest is stored on this agent (see GET /bundles)",
            ))
        }
        Ok(RollbackOutcome::OtherPolicy { owner }) => {
            warn!(
                outcome = "other-policy",
                %owner, "rollback to a digest of another policy"
            );
            Err(ApiError::new(
                StatusCode::CONFLICT,
                "digest_of_other_policy",
                format!("that digest is a bundle of policy {owner:?}, not of the policy named"),
            ))
        }
        Ok(RollbackOutcome::NothingToRollBack) => {
            warn!(
                outcome = "nothing-to-roll-back",
                "rollback with no earlier activation"
            );
            Err(ApiError::new(
                StatusCode::CONFLICT,
                "nothing_to_roll_back",
                "this policy has no earlier activation to return to",
            ))
        }
        Ok(RollbackOutcome::Deactivated { digest }) => {
            app.metrics.rollback("deactivated");
            info!(%digest, outcome = "deactivated", "rolled back to the policy not being active");
            Ok(
                Json(json!({"outcome": "deactivated", "digest": digest, "active": null}))
                    .into_response(),
            )
        }
        Ok(RollbackOutcome::AlreadyActive(record)) => {
            info!(digest = %record.digest, outcome = "already-active", "rollback target is already active");
            Ok(Json(
                json!({"outcome": "already-active", "digest": record.digest, "active": record}),
            )
            .into_response())
        }
        Ok(RollbackOutcome::Activated(record)) => {
            app.metrics.rollback("rolled-back");
            info!(digest = %record.digest, version = %record.version, outcome = "rolled-back", "rolled back");
            let record = after_activation(&app, guard, record).await?;
            Ok(
                Json(json!({"outcome": "rolled-back", "digest": record.digest, "active": record}))
                    .into_response(),
            )
        }
    }
}

/// The authority of a rollback (push protocol v3): with trusted keys, the
/// body must carry a `proof` signed by one of them for exactly this policy
/// and target, signed within the allowed clock skew. Returns the verified
/// statement, whose nonce and environment are checked under the state lock
/// ([`spend_proof`]); `None` when no key is trusted (then the bearer token,
/// which the agent requires in that case, is the only authority).
fn authorize_rollback(
    body: &Value,
    policy_id: &str,
    to: Option<&str>,
    settings: &Settings,
) -> Result<Option<pde_core::rollback::Statement>, ApiError> {
    use pde_core::rollback::{ProofError, SignedRollback};

    let proof = body.get("proof").filter(|p| !p.is_null());
    if !settings.check_signatures {
        if proof.is_some() {
            warn!(
                "rollback proof NOT checked: no trusted key is configured (--insecure-accept-unsigned); \
                 the bearer token alone authorises this rollback"
            );
        }
        return Ok(None);
    }
    let Some(proof) = proof else {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "rollback_unsigned",
            "this agent accepts only rollbacks signed by a trusted release key: the body needs a \
             `proof` {statement, signature} (push protocol v3, docs/agent.md \"Signed rollbacks\")",
        ));
    };
    let now = pde_core::clock::now_unix();
    let statement =
        SignedRollback::verify(proof, &settings.trusted, now).map_err(|e| match &e {
            ProofError::Malformed(_) => ApiError::bad_request("malformed_proof", e.to_string()),
            ProofError::Signature(_) => ApiError::new(
                StatusCode::FORBIDDEN,
                "rollback_signature_rejected",
                e.to_string(),
            ),
            ProofError::Expired { .. } => {
                ApiError::new(StatusCode::FORBIDDEN, "proof_expired", e.to_string())
            }
        })?;
    if statement.policy_id != policy_id || statement.to.as_deref() != to {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "proof_mismatch",
            format!(
                "the proof authorises rolling policy {:?} back to {}, not policy {policy_id:?} to {}",
                statement.policy_id,
                statement.to.as_deref().unwrap_or("null"),
                to.unwrap_or("null"),
            ),
        ));
    }
    Ok(Some(statement))
}

/// The fence of a rollback (push protocol v4): the signed statement's when
/// a proof was verified (the body's must then agree), else the body's
/// `fence` (an agent that trusts no key, where the token is the authority).
fn rollback_fence(
    body: &Value,
    statement: Option<&pde_core::rollback::Statement>,
) -> Result<Option<u64>, ApiError> {
    use pde_core::fence::{MAX_AHEAD_SECS, MAX_FENCE, now_micros, too_far_ahead};
    let plain = match body.get("fence") {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_u64().filter(|f| *f <= MAX_FENCE) {
            Some(f) => Some(f),
            None => {
                return Err(ApiError::bad_request(
                    "malformed_request",
                    format!("`fence` must be an integer from 0 to {MAX_FENCE}"),
                ));
            }
        },
    };
    let fence = match statement {
        Some(st) => {
            if plain.is_some() && plain != st.fence {
                return Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    "proof_mismatch",
                    "the body's `fence` differs from the one the proof signs",
                ));
            }
            st.fence
        }
        None => plain,
    };
    if let Some(f) = fence
        && too_far_ahead(f, now_micros())
    {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "fence_ahead",
            format!(
                "fence {f} lies more than {MAX_AHEAD_SECS} s ahead of this agent's clock; check both clocks"
            ),
        ));
    }
    Ok(fence)
}

/// Under the state lock: spends the proof's nonce (once, durably, even if
/// the rollback is then refused for another reason), then checks that the
/// proof was signed for the environment the policy is active in here.
fn spend_proof(
    s: &mut Store,
    statement: &pde_core::rollback::Statement,
    policy_id: &str,
) -> Result<(), ApiError> {
    use pde_core::rollback::MAX_SKEW_SECS;

    let now = pde_core::clock::now_unix();
    let forget_after = statement.at_unix().unwrap_or(now) + MAX_SKEW_SECS;
    match s.spend_nonce(&statement.nonce, forget_after, now)? {
        NonceCheck::Fresh => {}
        NonceCheck::Replayed => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "proof_replayed",
                format!(
                    "this proof's nonce was already used (signed at {}); every rollback needs a freshly signed proof",
                    statement.at
                ),
            ));
        }
        NonceCheck::Full => {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "nonce_store_full",
                format!(
                    "{} signed rollbacks were accepted within the last {} s; try again later",
                    super::store::MAX_NONCES,
                    2 * MAX_SKEW_SECS
                ),
            ));
        }
    }
    if let Some(active_env) = s.active(policy_id).and_then(|a| a.env.as_deref())
        && active_env != statement.env
    {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "proof_mismatch",
            format!(
                "the proof was signed for environment {:?}, but policy {policy_id:?} is active here for {active_env:?}",
                statement.env
            ),
        ));
    }
    Ok(())
}

/// `GET /metrics`: Prometheus text format.
pub async fn metrics(State(app): State<AppState>) -> Response {
    let store = app.store.lock().await;
    let mut body = app.metrics.render(&store);
    if let Some(pull) = &app.pull {
        body = pull.append_metrics(body);
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

/// `GET /healthz`: the process is up and serving. Also announces the push
/// protocol versions spoken, and what the agent refused to serve at start
/// and still does not serve. Still 200 with `integrity`: the process is up,
/// and pushers that know the field (pde's env check) treat it as unhealthy.
pub async fn healthz(State(app): State<AppState>) -> Json<Value> {
    let mut body = json!({"status": "ok", "protocols": PROTOCOL_VERSIONS});
    let integrity = app.settings.integrity.snapshot();
    if !integrity.is_empty() {
        body["integrity"] = json!(integrity);
    }
    if let Some(pull) = &app.pull {
        body["pull"] = pull.health();
    }
    Json(body)
}

/// `GET /readyz`: the data dir (and its bundle store) can be written.
pub async fn readyz(State(app): State<AppState>) -> Result<Json<Value>, ApiError> {
    let dir = app.settings.data_dir.clone();
    let probe = tokio::task::spawn_blocking(move || {
        probe_writable(&dir)?;
        probe_writable(&dir.join(super::store::BUNDLES_DIR))
    })
    .await
    .map_err(|e| ApiError::internal("readiness probe panicked", e))?;
    match probe {
        Ok(()) => Ok(Json(json!({"status": "ready"}))),
        Err(e) => {
            warn!(error = %e, "not ready: data dir is not writable");
            Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "not_ready",
                format!("data dir is not writable: {e}"),
            ))
        }
    }
}
