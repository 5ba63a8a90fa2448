//! Environment check: is every service of the environment up before anything
//! is pushed (DESIGN §1, §8 `GET {url}/healthz`)?
//!
//! All services are asked at once, each with the same timeout, so the check
//! costs one round trip to the slowest service rather than the sum. There is
//! deliberately no retry: this is a snapshot taken right before a push, and a
//! service that needs a second try to look healthy is not one to push to
//! without a human looking. The report lists every service, healthy or not,
//! so the CLI and the audit record can name each failure.
//!
//! A 2xx answer whose JSON body lists problems under `integrity` (what a
//! `pde agent` refused to serve at start, for example an active bundle
//! signed by a key it no longer trusts) is unhealthy too: the service is up,
//! but it does not run what the state says it runs, and pushing on top of
//! that would bury the problem. A body that is not JSON, or has no such
//! field, is judged by its status alone, as every service was before.
//!
//! The environment's readiness checks ([`readiness`]) run beside the
//! services' health, and their results are part of the same report: a
//! failing check stops a deploy exactly as an unhealthy service does.

pub mod readiness;

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::config::Check;
use crate::http::Target;

pub use readiness::{CheckResult, ReadinessError};

/// The health of every checked service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HealthReport {
    /// One entry per target, in the order given.
    pub services: Vec<ServiceHealth>,
    /// One entry per readiness check of the environment, in pde.toml's order.
    pub checks: Vec<CheckResult>,
}

impl HealthReport {
    /// True when every service answered 2xx in time and every readiness
    /// check passed (vacuously for none).
    pub fn healthy(&self) -> bool {
        self.services.iter().all(|s| s.healthy) && self.checks.iter().all(|c| c.passed)
    }

    /// The readiness checks that failed.
    pub fn failed_checks(&self) -> Vec<&CheckResult> {
        self.checks.iter().filter(|c| !c.passed).collect()
    }

    /// The freeze checks that an override let through: (check, reason).
    pub fn overridden_freezes(&self) -> Vec<(&str, &str)> {
        self.checks
            .iter()
            .filter_map(|c| c.overridden.as_deref().map(|r| (c.name.as_str(), r)))
            .collect()
    }

    /// `{"reason", "checks"}` of the freezes an override let through, for
    /// the audit record of the check; `None` when none was overridden.
    pub fn freeze_override(&self) -> Option<serde_json::Value> {
        let overridden = self.overridden_freezes();
        let (_, reason) = overridden.first()?;
        let checks: Vec<&str> = overridden.iter().map(|(name, _)| *name).collect();
        Some(serde_json::json!({"reason": reason, "checks": checks}))
    }

    /// The services that are not healthy.
    pub fn failures(&self) -> Vec<&ServiceHealth> {
        self.services.iter().filter(|s| !s.healthy).collect()
    }

    /// `name (why)` of each unhealthy service and `check name (why)` of
    /// each failed readiness check, comma separated.
    pub fn failing_services(&self) -> String {
        self.failures()
            .iter()
            .map(|s| {
                let why = match (&s.status, &s.error) {
                    (_, Some(e)) => e.clone(),
                    (Some(code), None) => format!("HTTP {code}"),
                    (None, None) => "unhealthy".into(),
                };
                format!("{} ({why})", s.service)
            })
            .chain(
                self.failed_checks()
                    .iter()
                    .map(|c| format!("check {} ({})", c.name, c.detail)),
            )
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// One service's answer to `GET /healthz`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServiceHealth {
    /// The service name.
    pub service: String,
    /// Its base URL.
    pub url: String,
    /// It answered 2xx within the timeout.
    pub healthy: bool,
    /// The HTTP status, when it answered at all.
    pub status: Option<u16>,
    /// Why it is not healthy: the status and start of the body, or the
    /// transport failure (`timed out`, `connection failed: …`).
    pub error: Option<String>,
    /// How long the check took, in milliseconds.
    pub elapsed_ms: u64,
    /// The integrity problems the service reported in its `/healthz` body,
    /// one sentence each; any makes it unhealthy. Omitted when none.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub integrity: Vec<String>,
}

/// Most of a `/healthz` body read for its `integrity` field; a body longer
/// than this is judged by its status alone.
const MAX_HEALTH_BODY: usize = 64 * 1024;

/// The `integrity` entries of a `/healthz` body, if it is a JSON object that
/// has any. Entries that are not strings are shown as JSON.
fn integrity_of(body: &[u8]) -> Vec<String> {
    let Ok(serde_json::Value::Object(doc)) = serde_json::from_slice(body) else {
        return Vec::new();
    };
    match doc.get("integrity") {
        Some(serde_json::Value::Array(items)) => items
            .iter()
            .map(|i| match i {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            })
            .collect(),
        Some(serde_json::Value::String(s)) if !s.is_empty() => vec![s.clone()],
        _ => Vec::new(),
    }
}

/// Reads at most [`MAX_HEALTH_BODY`] bytes; `None` if it is longer or
/// cannot be read (the status has already said the service is up).
async fn bounded_body(mut resp: reqwest::Response) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.ok()? {
        if body.len() + chunk.len() > MAX_HEALTH_BODY {
            return None;
        }
        body.extend_from_slice(&chunk);
    }
    Some(body)
}

/// `GET {url}/healthz` on every target concurrently; 2xx within `timeout` is
/// healthy. Tokens are sent as on every other request to the service.
pub async fn check(
    client: &reqwest::Client,
    targets: &[Target],
    timeout: Duration,
) -> HealthReport {
    let services = futures::future::join_all(targets.iter().map(|t| one(client, t, timeout))).await;
    let report = HealthReport {
        services,
        checks: Vec::new(),
    };
    for s in report.failures() {
        tracing::warn!(service = %s.service, url = %s.url, error = ?s.error, "unhealthy");
    }
    report
}

/// [`check`] and the environment's readiness `checks`, all at once: the
/// whole of step 3. `now` decides change freezes; `override_freeze` (a
/// reason) lets an active one through.
pub async fn check_all(
    client: &reqwest::Client,
    targets: &[Target],
    checks: &[Check],
    timeout: Duration,
    now: jiff::Timestamp,
    override_freeze: Option<&str>,
) -> Result<HealthReport, ReadinessError> {
    let (mut report, checks) = futures::future::join(
        check(client, targets, timeout),
        readiness::run(client, checks, timeout, now, override_freeze),
    )
    .await;
    report.checks = checks?;
    Ok(report)
}

async fn one(client: &reqwest::Client, t: &Target, timeout: Duration) -> ServiceHealth {
    let started = Instant::now();
    let mut request = client.get(format!("{}/healthz", t.url)).timeout(timeout);
    if let Some(token) = &t.token {
        request = request.bearer_auth(pde_core::secret::ExposeSecret::expose_secret(token));
    }
    let mut integrity = Vec::new();
    let (status, error) = match request.send().await {
        Ok(resp) => {
            let status = resp.status();
            if status.is_success() {
                integrity = bounded_body(resp)
                    .await
                    .map(|b| integrity_of(&b))
                    .unwrap_or_default();
                let error = (!integrity.is_empty()).then(|| {
                    format!(
                        "up, but reports {} integrity problem(s): {}",
                        integrity.len(),
                        integrity.join("; ")
                    )
                });
                (Some(status.as_u16()), error)
            } else if status.is_redirection() {
                let why = crate::http::redirect_refused(&resp);
                (Some(status.as_u16()), Some(format!("HTTP {status}: {why}")))
            } else {
                let body = resp.bytes().await.unwrap_or_default();
                let excerpt = crate::http::excerpt(&body);
                (
                    Some(status.as_u16()),
                    Some(format!("HTTP {status}: {excerpt}")),
                )
            }
        }
        Err(e) => (None, Some(crate::http::describe(&e))),
    };
    ServiceHealth {
        service: t.service.clone(),
        url: t.url.clone(),
        healthy: error.is_none(),
        status,
        error,
        elapsed_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        integrity,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_receiver::{Mode, Receiver, closed_port_url};

    fn http() -> reqwest::Client {
        crate::http::client(Duration::from_secs(10)).unwrap()
    }

    #[test]
    fn the_check_future_is_send() {
        // The CLI may spawn it; a `!Send` check would only show up there.
        fn assert_send<T: Send>(_: &T) {}
        let c = http();
        assert_send(&check(&c, &[], Duration::from_secs(1)));
    }

    #[tokio::test]
    async fn all_healthy() {
        let a = Receiver::start(Mode::Ok).await;
        let b = Receiver::start(Mode::Ok).await;
        let targets = [
            Target::new("A", &a.url, None),
            Target::new("B", &b.url, None),
        ];
        let report = check(&http(), &targets, Duration::from_secs(2)).await;
        assert!(report.healthy(), "{report:#?}");
        assert!(report.failures().is_empty());
        assert_eq!(report.services[1].status, Some(200));
        assert_eq!(
            a.shared.healthz.load(std::sync::atomic::Ordering::SeqCst),
            1
        );
        // Checking is not deploying.
        assert_eq!(a.deploys() + b.deploys(), 0);
    }

    #[tokio::test]
    async fn each_unhealthy_service_is_named_with_its_reason() {
        let ok = Receiver::start(Mode::Ok).await;
        let sick = Receiver::start(Mode::Unhealthy).await;
        let gone = closed_port_url().await;
        // Accepts connections (the kernel's backlog) but never answers.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let silent_url = format!("http://{}", silent.local_addr().unwrap());
        let targets = [
            Target::new("ok", &ok.url, None),
            Target::new("sick", &sick.url, None),
            Target::new("gone", &gone, None),
            Target::new("silent", &silent_url, None),
        ];

        let report = check(&http(), &targets, Duration::from_millis(300)).await;

        assert!(!report.healthy());
        let names: Vec<&str> = report
            .failures()
            .iter()
            .map(|s| s.service.as_str())
            .collect();
        assert_eq!(names, ["sick", "gone", "silent"]);
        let sick = &report.services[1];
        assert_eq!(sick.status, Some(503));
        let e = sick.error.as_deref().unwrap();
        assert!(
            e.contains("503") && e.contains("database unreachable"),
            "{e}"
        );
        let gone = &report.services[2];
        assert_eq!(gone.status, None);
        assert!(
            gone.error.as_deref().unwrap().contains("connection failed"),
            "{gone:?}"
        );
        let silent = &report.services[3];
        assert_eq!(silent.error.as_deref(), Some("timed out"));
        // Generous bound: the timeout applies, it is not waited out forever.
        assert!(silent.elapsed_ms < 5_000, "{silent:?}");
        assert!(report.services[0].healthy);
    }

    /// A real server answering `/healthz` 200 with `body`; its base URL.
    async fn healthz_answering(body: &'static str) -> (String, tokio::task::JoinHandle<()>) {
        use axum::{Router, routing::get};
        let app = Router::new().route("/healthz", get(move || async move { body }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let server = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (url, server)
    }

    #[tokio::test]
    async fn integrity_problems_in_a_2xx_healthz_make_a_service_unhealthy() {
        let problem =
            "policy 42: active bundle sha256:ab no longer verifies (untrusted); not served";
        let (sick, s1) = healthz_answering(
            r#"{"status": "ok", "protocols": [3], "integrity": ["policy 42: active bundle sha256:ab no longer verifies (untrusted); not served"]}"#,
        )
        .await;
        // Services without the field, or without JSON at all, are judged
        // by their status as before.
        let (plain, s2) = healthz_answering(r#"{"status": "ok", "protocols": [3]}"#).await;
        let (text, s3) = healthz_answering("ok").await;
        let (empty, s4) = healthz_answering(r#"{"status": "ok", "integrity": []}"#).await;
        let targets = [
            Target::new("sick", &sick, None),
            Target::new("plain", &plain, None),
            Target::new("text", &text, None),
            Target::new("empty", &empty, None),
        ];
        let report = check(&http(), &targets, Duration::from_secs(2)).await;
        for s in [s1, s2, s3, s4] {
            s.abort();
        }
        let names: Vec<&str> = report
            .failures()
            .iter()
            .map(|s| s.service.as_str())
            .collect();
        assert_eq!(names, ["sick"], "{report:#?}");
        let sick = &report.services[0];
        assert_eq!(sick.status, Some(200));
        assert_eq!(sick.integrity, [problem]);
        let failing = report.failing_services();
        assert!(
            failing.contains("integrity") && failing.contains(problem),
            "{failing}"
        );
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["services"][0]["integrity"][0], problem);
        assert!(json["services"][1].get("integrity").is_none(), "{json}");
    }

    #[tokio::test]
    async fn the_token_is_sent_to_healthz() {
        // A real server that records the Authorization header of /healthz.
        use axum::{Router, http::HeaderMap, routing::get};
        let seen = std::sync::Arc::new(std::sync::Mutex::new(None::<String>));
        let s2 = seen.clone();
        let app = Router::new().route(
            "/healthz",
            get(move |h: HeaderMap| async move {
                *s2.lock().unwrap() = h
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                "ok"
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let server = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let t = Target::new("A", &url, Some("tok".into()));
        let report = check(&http(), &[t], Duration::from_secs(2)).await;
        server.abort();
        assert!(report.healthy());
        assert_eq!(seen.lock().unwrap().as_deref(), Some("Bearer tok"));
    }
}
