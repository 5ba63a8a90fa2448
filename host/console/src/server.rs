//! `pde serve`: the read-only console over HTTP (axum).
//!
//! Every page is rendered on the server from the engine's own queries and
//! works with scripts off; every page answers JSON too (`Accept:
//! application/json`, or the same path under `/api`). Nothing is written:
//! the engine is opened read-only by the caller.
//!
//! The live view asks the agents in the background, every
//! [`ServeConfig::live_interval`], each read bounded by
//! [`ServeConfig::live_timeout`]; a page shows the last read and when it was
//! made, so a slow agent never holds a page up.

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use askama::Template;
use axum::Router;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use pde::Engine;
use serde::Deserialize;
use serde_json::Value;

use crate::docs::{self, AuditFilter, LiveSnapshot};
use crate::policy;
use crate::views::{self, VERSION};

/// How `pde serve` runs.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Where to listen; loopback unless a token is set.
    pub listen: SocketAddr,
    /// The token every request must carry (`Authorization: Bearer …`, or
    /// once as `?token=…`, which sets a cookie). Required off loopback.
    pub token: Option<String>,
    /// How often the agents are read for the live view (`None`: never).
    pub live_interval: Option<Duration>,
    /// How long one live read may take.
    pub live_timeout: Duration,
}

/// Why the console could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Bound off loopback without a token.
    #[error(
        "{0} is not a loopback address: set a token (--token-env VAR or --token-file FILE) \
         before serving the console to other machines"
    )]
    TokenRequired(SocketAddr),
    /// An empty token.
    #[error("the console token is empty")]
    EmptyToken,
    /// The address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The server failed.
    #[error("console server: {0}")]
    Io(#[from] std::io::Error),
}

impl pde::error::HasExitCode for ServeError {
    fn exit_code(&self) -> pde::ExitCode {
        pde::ExitCode::Usage
    }
}

struct App {
    engine: Engine,
    token: Option<String>,
    live: RwLock<Option<LiveSnapshot>>,
}

type Shared = Arc<App>;

/// Checks the configuration: a token is required off loopback.
pub fn check(config: &ServeConfig) -> Result<(), ServeError> {
    if config.token.as_deref().is_some_and(|t| t.trim().is_empty()) {
        return Err(ServeError::EmptyToken);
    }
    if !config.listen.ip().is_loopback() && config.token.is_none() {
        return Err(ServeError::TokenRequired(config.listen));
    }
    Ok(())
}

/// Serves the console until the process ends; `on_listen` is told the
/// bound address (port 0 resolved) before the first request is taken.
pub async fn serve(
    engine: Engine,
    config: ServeConfig,
    on_listen: impl FnOnce(SocketAddr),
) -> Result<(), ServeError> {
    check(&config)?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServeError::Bind {
            addr: config.listen,
            source,
        })?;
    let app = Arc::new(App {
        engine,
        token: config.token.clone(),
        live: RwLock::new(None),
    });
    if let Some(every) = config.live_interval {
        tokio::spawn(read_live(app.clone(), every, config.live_timeout));
    }
    on_listen(listener.local_addr()?);
    axum::serve(listener, router(app)).await?;
    Ok(())
}

/// [`serve`] on a runtime of its own, for callers that are not async.
pub fn serve_blocking(
    engine: Engine,
    config: ServeConfig,
    on_listen: impl FnOnce(SocketAddr),
) -> Result<(), ServeError> {
    check(&config)?;
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(serve(engine, config, on_listen))
}

/// Reads the agents every `every`, each read bounded by `timeout`.
async fn read_live(app: Shared, every: Duration, timeout: Duration) {
    loop {
        let started = Instant::now();
        let read = tokio::time::timeout(timeout, app.engine.live_status(None)).await;
        let (report, error) = match read {
            Ok(Ok(r)) => (Some(r), None),
            Ok(Err(e)) => (None, Some(e.to_string())),
            Err(_) => (
                None,
                Some(format!(
                    "the agents did not all answer within {} ms",
                    timeout.as_millis()
                )),
            ),
        };
        let snapshot = LiveSnapshot {
            read_at: pde_core::clock::now_rfc3339(),
            took_ms: started.elapsed().as_millis() as u64,
            report,
            error,
        };
        if let Ok(mut live) = app.live.write() {
            *live = Some(snapshot);
        }
        tokio::time::sleep(every).await;
    }
}

fn router(app: Shared) -> Router {
    Router::new()
        .route("/", get(overview))
        .route("/api/overview", get(overview_json))
        .route("/api/status", get(status_json))
        .route("/api/status/live", get(live_json))
        .route("/audit", get(audit))
        .route("/api/audit", get(audit_json))
        .route("/api/audit/verify", get(verify_json))
        .route("/policies/{id}", get(policy_page))
        .route("/api/policies/{id}", get(policy_json))
        .route("/api/history/{id}", get(history_json))
        .route("/plugins", get(plugins))
        .route("/api/plugins", get(plugins_json))
        .route("/timeline", get(timeline))
        .route("/api/timeline", get(timeline_json))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(app.clone(), guard))
        .with_state(app)
}

/// The cookie a `?token=` visit sets, so a browser without scripts can use
/// a console bound off loopback.
const COOKIE: &str = "pde_console_token";

/// Token check (when a token is set) and the security headers of every answer.
async fn guard(State(app): State<Shared>, req: Request, next: Next) -> Response {
    if let Some(token) = &app.token {
        let given = bearer(req.headers()).or_else(|| cookie(req.headers()));
        let query_token = req.uri().query().and_then(|q| {
            q.split('&')
                .find_map(|kv| kv.strip_prefix("token="))
                .map(str::to_string)
        });
        let ok = |t: &str| subtle::ConstantTimeEq::ct_eq(t.as_bytes(), token.as_bytes()).into();
        match (given, query_token) {
            (Some(t), _) if ok(&t) => {}
            (_, Some(t)) if ok(&t) => {
                let mut r = Redirect::to(req.uri().path()).into_response();
                if let Ok(v) = HeaderValue::from_str(&format!(
                    "{COOKIE}={t}; HttpOnly; SameSite=Strict; Path=/"
                )) {
                    r.headers_mut().insert(header::SET_COOKIE, v);
                }
                return secure(r);
            }
            _ => {
                return secure(error(
                    wants_json(req.headers()),
                    StatusCode::UNAUTHORIZED,
                    "this console needs its token: send `Authorization: Bearer TOKEN`, or open \
                     the page once with ?token=TOKEN"
                        .into(),
                ));
            }
        }
    }
    secure(next.run(req).await)
}

fn secure(mut r: Response) -> Response {
    let h = r.headers_mut();
    // Pages load nothing but themselves: inline styles and inline SVG.
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; img-src data:; form-action 'self'; \
             frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    r
}

fn bearer(h: &HeaderMap) -> Option<String> {
    h.get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(|t| t.trim().to_string())
}

fn cookie(h: &HeaderMap) -> Option<String> {
    h.get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| {
            c.trim()
                .strip_prefix(&format!("{COOKIE}="))
                .map(str::to_string)
        })
}

fn wants_json(h: &HeaderMap) -> bool {
    h.get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/json"))
}

fn json(value: impl serde::Serialize) -> Response {
    axum::Json(value).into_response()
}

fn html(t: impl Template) -> Response {
    match t.render() {
        Ok(body) => ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], body).into_response(),
        Err(e) => error(false, StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

fn error(as_json: bool, status: StatusCode, message: String) -> Response {
    if as_json {
        return (
            status,
            axum::Json(serde_json::json!({"error": message, "status": status.as_u16()})),
        )
            .into_response();
    }
    let page = views::ErrorHtml {
        status: status.as_u16(),
        message,
        version: VERSION,
    };
    let body = page.render().unwrap_or_default();
    (
        status,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        body,
    )
        .into_response()
}

/// Runs a blocking read of the engine off the async workers.
async fn read<T: Send + 'static>(
    app: &Shared,
    f: impl FnOnce(&App) -> Result<T, pde::Error> + Send + 'static,
) -> Result<T, Response> {
    let app = app.clone();
    match tokio::task::spawn_blocking(move || f(&app)).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => {
            let status = match e {
                pde::Error::Config(_) => StatusCode::NOT_FOUND,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            };
            Err(error(false, status, e.to_string()))
        }
        Err(e) => Err(error(
            false,
            StatusCode::INTERNAL_SERVER_ERROR,
            e.to_string(),
        )),
    }
}

fn json_err(r: Response, headers: &HeaderMap) -> Response {
    let _ = headers;
    r
}

#[derive(Debug, Default, Deserialize)]
struct EnvQuery {
    env: Option<String>,
}

fn live_snapshot(app: &App) -> Option<LiveSnapshot> {
    app.live.read().ok().and_then(|l| l.clone())
}

async fn overview_doc(app: &Shared, env: Option<String>) -> Result<docs::Overview, Response> {
    read(app, move |a| {
        if let Some(e) = &env {
            a.engine.environment(e)?;
        }
        docs::overview(&a.engine, env.as_deref(), live_snapshot(a))
    })
    .await
}

async fn overview(
    State(app): State<Shared>,
    headers: HeaderMap,
    Query(q): Query<EnvQuery>,
) -> Response {
    match overview_doc(&app, q.env).await {
        Ok(o) if wants_json(&headers) => json(o),
        Ok(o) => html(views::OverviewHtml {
            o: &o,
            in_report: false,
            version: VERSION,
        }),
        Err(r) => json_err(r, &headers),
    }
}

async fn overview_json(State(app): State<Shared>, Query(q): Query<EnvQuery>) -> Response {
    match overview_doc(&app, q.env).await {
        Ok(o) => json(o),
        Err(r) => r,
    }
}

async fn status_json(State(app): State<Shared>, Query(q): Query<EnvQuery>) -> Response {
    match read(&app, move |a| {
        Ok(docs::status_json(
            &a.engine.state().status(q.env.as_deref())?,
        ))
    })
    .await
    {
        Ok(v) => json(v),
        Err(r) => r,
    }
}

async fn live_json(State(app): State<Shared>) -> Response {
    match live_snapshot(&app) {
        Some(LiveSnapshot {
            report: Some(r),
            read_at,
            ..
        }) => {
            let mut v = docs::live_json(&r);
            v["read_at"] = Value::String(read_at);
            json(v)
        }
        Some(LiveSnapshot { error: Some(e), .. }) => {
            error(true, StatusCode::SERVICE_UNAVAILABLE, e)
        }
        _ => error(
            true,
            StatusCode::SERVICE_UNAVAILABLE,
            "the agents have not been read yet".into(),
        ),
    }
}

async fn audit_doc(app: &Shared, filter: AuditFilter) -> Result<docs::AuditPage, Response> {
    read(app, move |a| Ok(docs::audit(&a.engine, filter))).await
}

async fn audit(
    State(app): State<Shared>,
    headers: HeaderMap,
    Query(filter): Query<AuditFilter>,
) -> Response {
    match audit_doc(&app, filter).await {
        Ok(a) if wants_json(&headers) => json(a),
        Ok(a) => html(views::AuditHtml {
            a: &a,
            version: VERSION,
        }),
        Err(r) => r,
    }
}

async fn audit_json(State(app): State<Shared>, Query(filter): Query<AuditFilter>) -> Response {
    match audit_doc(&app, filter).await {
        Ok(a) => json(a),
        Err(r) => r,
    }
}

/// `pde audit verify --output json` when intact; its failure otherwise
/// (409, with the first bad record).
async fn verify_json(State(app): State<Shared>) -> Response {
    match read(&app, |a| Ok(docs::verification(&a.engine))).await {
        Ok(v) => match &v.report {
            Some(r) => json(r),
            None => (StatusCode::CONFLICT, axum::Json(v)).into_response(),
        },
        Err(r) => r,
    }
}

#[derive(Debug, Default, Deserialize)]
struct DiffQuery {
    from: Option<String>,
    to: Option<String>,
}

async fn policy_doc(
    app: &Shared,
    id: String,
    q: DiffQuery,
) -> Result<policy::PolicyPage, Response> {
    read(app, move |a| {
        let records = a.engine.audit().records().unwrap_or_default();
        policy::page(&a.engine, &id, &records, q.from.as_deref(), q.to.as_deref())
    })
    .await
}

async fn policy_page(
    State(app): State<Shared>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<DiffQuery>,
) -> Response {
    match policy_doc(&app, id, q).await {
        Ok(p) if wants_json(&headers) => json(p),
        Ok(p) => html(views::PolicyHtml {
            p: &p,
            version: VERSION,
        }),
        Err(r) => r,
    }
}

async fn policy_json(
    State(app): State<Shared>,
    Path(id): Path<String>,
    Query(q): Query<DiffQuery>,
) -> Response {
    match policy_doc(&app, id, q).await {
        Ok(p) => json(p),
        Err(r) => r,
    }
}

/// `pde history ID --output json`.
async fn history_json(State(app): State<Shared>, Path(id): Path<String>) -> Response {
    match read(&app, move |a| {
        let records = a.engine.audit().records()?;
        Ok(docs::history_json(&docs::history(
            &a.engine, &id, &records,
        )?))
    })
    .await
    {
        Ok(v) => json(v),
        Err(r) => r,
    }
}

async fn plugins(State(app): State<Shared>, headers: HeaderMap) -> Response {
    let listed = read(&app, |a| Ok(docs::plugins(&a.engine))).await;
    let (rows, err) = match listed {
        Ok(Ok(rows)) => (rows, None),
        Ok(Err(e)) => (Vec::new(), Some(e.to_string())),
        Err(r) => return r,
    };
    if wants_json(&headers) {
        return match err {
            Some(e) => error(true, StatusCode::INTERNAL_SERVER_ERROR, e),
            None => json(rows),
        };
    }
    html(views::PluginsHtml {
        plugins: &rows,
        error: err,
        version: VERSION,
    })
}

/// `pde plugin list --output json`.
async fn plugins_json(State(app): State<Shared>) -> Response {
    match read(&app, |a| Ok(docs::plugins(&a.engine))).await {
        Ok(Ok(rows)) => json(rows.into_iter().map(|p| p.listed).collect::<Vec<_>>()),
        Ok(Err(e)) => error(true, StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(r) => r,
    }
}

async fn timeline_doc(app: &Shared) -> Result<policy::Timeline, Response> {
    read(app, |a| {
        let records = a.engine.audit().records()?;
        policy::timeline(&a.engine, &records)
    })
    .await
}

async fn timeline(State(app): State<Shared>, headers: HeaderMap) -> Response {
    match timeline_doc(&app).await {
        Ok(t) if wants_json(&headers) => json(t),
        Ok(t) => {
            let svg = policy::timeline_svg(&t);
            html(views::TimelineHtml {
                t: &t,
                svg,
                version: VERSION,
            })
        }
        Err(r) => r,
    }
}

async fn timeline_json(State(app): State<Shared>) -> Response {
    match timeline_doc(&app).await {
        Ok(t) => json(t),
        Err(r) => r,
    }
}

async fn not_found(headers: HeaderMap) -> Response {
    error(
        wants_json(&headers),
        StatusCode::NOT_FOUND,
        "no such page".into(),
    )
}
