//! Readiness checks beyond `/healthz` (`[[environments.X.checks]]`): an HTTP
//! endpoint, a Prometheus query that must come back empty, a change freeze.
//!
//! They run beside the services' health checks and, like them, are a
//! snapshot taken right before a push: every check is asked once, all at
//! once, each bounded by the push timeout, with no retry. A check that cannot
//! get an answer fails: "could not tell" is not "ready". Tokens come from the
//! environment variable a check names and are sent as a bearer token; they
//! never appear in a result, a log line or the audit log.

use std::time::{Duration, Instant};

use serde::Serialize;

use pde_core::secret::Secret;
use pde_core::{ExitCode, HasExitCode};

use crate::config::{Check, FreezeWindow};
use crate::http::{self, Target};

/// At most this many series are named in a failing Prometheus check; the
/// rest are counted. An alert storm must not become a megabyte of audit data.
const MAX_SERIES_SHOWN: usize = 10;

/// Why the checks could not even start.
#[derive(Debug, thiserror::Error)]
pub enum ReadinessError {
    /// A check names a token variable that is not set.
    #[error(
        "check {check:?} names token_env {var}, which is not set; export it or remove token_env"
    )]
    MissingToken {
        /// The check.
        check: String,
        /// The variable.
        var: String,
    },
    /// A freeze window does not parse (pde.toml is checked on load, so this
    /// only happens to a configuration built by hand).
    #[error("check {check:?}: {message}")]
    BadWindow {
        /// The check.
        check: String,
        /// What is wrong.
        message: String,
    },
}

impl HasExitCode for ReadinessError {
    fn exit_code(&self) -> ExitCode {
        ExitCode::Usage
    }
}

/// One readiness check's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CheckResult {
    /// The check's name from pde.toml.
    pub name: String,
    /// `http`, `prometheus` or `freeze`.
    pub kind: String,
    /// True when the check lets a deploy through (an overridden freeze too).
    pub passed: bool,
    /// What was seen, or why it failed.
    pub detail: String,
    /// The reason given with `--override-freeze`, when it let this active
    /// freeze through.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub overridden: Option<String>,
    /// How long the check took, in milliseconds.
    pub elapsed_ms: u64,
}

/// Runs every check concurrently; `now` decides freezes, and
/// `override_freeze` (a non-empty reason) lets an active freeze through.
pub async fn run(
    client: &reqwest::Client,
    checks: &[Check],
    timeout: Duration,
    now: jiff::Timestamp,
    override_freeze: Option<&str>,
) -> Result<Vec<CheckResult>, ReadinessError> {
    let override_freeze = override_freeze.map(str::trim).filter(|r| !r.is_empty());
    // Tokens and windows first, so a configuration mistake is reported as
    // one before any request is sent.
    let mut prepared = Vec::with_capacity(checks.len());
    for c in checks {
        prepared.push(Prepared::of(c)?);
    }
    let results = futures::future::join_all(
        prepared
            .iter()
            .map(|p| p.run(client, timeout, now, override_freeze)),
    )
    .await;
    for r in results.iter().filter(|r| !r.passed) {
        tracing::warn!(check = %r.name, kind = %r.kind, detail = %r.detail, "readiness check failed");
    }
    Ok(results)
}

/// A check with its token read and its window parsed.
enum Prepared<'a> {
    Http {
        target: Target,
        json_field: Option<&'a str>,
        equals: Option<&'a serde_json::Value>,
    },
    Prometheus {
        target: Target,
        query: &'a str,
    },
    Freeze {
        name: &'a str,
        window: FreezeWindow,
    },
}

fn token(check: &str, var: Option<&String>) -> Result<Option<Secret>, ReadinessError> {
    var.map(|var| {
        pde_core::secret::from_env(var).ok_or_else(|| ReadinessError::MissingToken {
            check: check.to_string(),
            var: var.clone(),
        })
    })
    .transpose()
}

impl<'a> Prepared<'a> {
    fn of(c: &'a Check) -> Result<Prepared<'a>, ReadinessError> {
        Ok(match c {
            Check::Http {
                name,
                url,
                json_field,
                equals,
                token_env,
            } => Prepared::Http {
                // Not `Target::new`: this URL is the endpoint itself, kept
                // exactly as written (a trailing slash may matter to it).
                target: Target {
                    service: name.clone(),
                    url: url.clone(),
                    token: token(name, token_env.as_ref())?,
                },
                json_field: json_field.as_deref(),
                equals: equals.as_ref(),
            },
            Check::Prometheus {
                name,
                url,
                query,
                token_env,
            } => Prepared::Prometheus {
                target: Target::new(name.clone(), url, token(name, token_env.as_ref())?),
                query,
            },
            Check::Freeze {
                name,
                start,
                end,
                timezone,
            } => Prepared::Freeze {
                name,
                window: FreezeWindow::parse(start, end, timezone.as_deref()).map_err(
                    |message| ReadinessError::BadWindow {
                        check: name.clone(),
                        message,
                    },
                )?,
            },
        })
    }

    async fn run(
        &self,
        client: &reqwest::Client,
        timeout: Duration,
        now: jiff::Timestamp,
        override_freeze: Option<&str>,
    ) -> CheckResult {
        let started = Instant::now();
        let (name, kind, verdict, overridden) = match self {
            Prepared::Http {
                target,
                json_field,
                equals,
            } => (
                target.service.as_str(),
                "http",
                http_check(client, target, timeout, *json_field, *equals).await,
                None,
            ),
            Prepared::Prometheus { target, query } => (
                target.service.as_str(),
                "prometheus",
                prometheus_check(client, target, timeout, query).await,
                None,
            ),
            Prepared::Freeze { name, window } => {
                let (verdict, overridden) = freeze_check(window, now, override_freeze);
                (*name, "freeze", verdict, overridden)
            }
        };
        let (passed, detail) = match verdict {
            Ok(seen) => (true, seen),
            Err(why) => (false, why),
        };
        CheckResult {
            name: name.to_string(),
            kind: kind.to_string(),
            passed,
            detail,
            overridden,
            elapsed_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        }
    }
}

async fn http_check(
    client: &reqwest::Client,
    target: &Target,
    timeout: Duration,
    json_field: Option<&str>,
    equals: Option<&serde_json::Value>,
) -> Result<String, String> {
    let answer = http::get_once(client, target, &target.url, timeout).await?;
    if !answer.status.is_success() {
        return Err(format!("HTTP {}: {}", answer.status, answer.excerpt()));
    }
    let (Some(pointer), Some(want)) = (json_field, equals) else {
        return Ok(format!("HTTP {}", answer.status.as_u16()));
    };
    let body: serde_json::Value = serde_json::from_slice(&answer.body).map_err(|e| {
        format!(
            "HTTP {} but the body is not JSON ({e}): {}",
            answer.status.as_u16(),
            answer.excerpt()
        )
    })?;
    match body.pointer(pointer) {
        Some(got) if got == want => Ok(format!(
            "HTTP {}, {pointer} = {got}",
            answer.status.as_u16()
        )),
        Some(got) => Err(format!("{pointer} is {got}, expected {want}")),
        None => Err(format!("{pointer} is absent, expected {want}")),
    }
}

async fn prometheus_check(
    client: &reqwest::Client,
    target: &Target,
    timeout: Duration,
    query: &str,
) -> Result<String, String> {
    let base = format!("{}/api/v1/query", target.url);
    let url = reqwest::Url::parse_with_params(&base, [("query", query)])
        .map_err(|e| format!("bad url {base:?}: {e}"))?;
    let answer = http::get_once(client, target, url.as_str(), timeout).await?;
    // Prometheus answers errors (a bad query: 400, a timeout: 503) with the
    // same JSON envelope, so its own message is read before the status.
    let body: serde_json::Value = serde_json::from_slice(&answer.body).map_err(|_| {
        format!(
            "HTTP {}: not a Prometheus answer: {}",
            answer.status.as_u16(),
            answer.excerpt()
        )
    })?;
    if body["status"] != "success" || !answer.status.is_success() {
        let kind = body["errorType"].as_str().unwrap_or("error");
        let message = body["error"].as_str().unwrap_or("(no message)");
        return Err(format!(
            "Prometheus HTTP {}: {kind}: {message}",
            answer.status.as_u16()
        ));
    }
    let result = &body["data"]["result"];
    let series = match result {
        serde_json::Value::Array(series) => series,
        // A scalar or string result is not "no series": it is a query that
        // does not say what the check means.
        other => {
            return Err(format!(
                "expected a vector of series from {query:?}, got {}",
                http::excerpt(other.to_string().as_bytes())
            ));
        }
    };
    if series.is_empty() {
        return Ok(format!("{query}: no series"));
    }
    let mut names: Vec<String> = series
        .iter()
        .take(MAX_SERIES_SHOWN)
        .map(series_name)
        .collect();
    if series.len() > MAX_SERIES_SHOWN {
        names.push(format!("and {} more", series.len() - MAX_SERIES_SHOWN));
    }
    Err(format!(
        "{query} returned {} series: {}",
        series.len(),
        names.join(", ")
    ))
}

/// `name{label="value",…}` of one series, as Prometheus writes it.
fn series_name(s: &serde_json::Value) -> String {
    let Some(metric) = s["metric"].as_object() else {
        return "{}".into();
    };
    let name = metric
        .get("__name__")
        .and_then(|v| v.as_str())
        .unwrap_or_default();
    let labels: Vec<String> = metric
        .iter()
        .filter(|(k, _)| *k != "__name__")
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    format!("{name}{{{}}}", labels.join(","))
}

fn freeze_check(
    window: &FreezeWindow,
    now: jiff::Timestamp,
    override_freeze: Option<&str>,
) -> (Result<String, String>, Option<String>) {
    if !window.contains(now) {
        let when = if now < window.start {
            format!("next freeze {} to {}", window.start, window.end)
        } else {
            format!("freeze ended {}", window.end)
        };
        return (Ok(format!("not frozen ({when})")), None);
    }
    match override_freeze {
        Some(reason) => (
            Ok(format!("frozen until {}; overridden: {reason}", window.end)),
            Some(reason.to_string()),
        ),
        None => (
            Err(format!(
                "change freeze from {} until {}; deploy with --override-freeze REASON to go ahead",
                window.start, window.end
            )),
            None,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window() -> FreezeWindow {
        FreezeWindow::parse(
            "2026-12-24T00:00:00",
            "2026-12-26T00:00:00",
            Some("Europe/Berlin"),
        )
        .unwrap()
    }

    #[test]
    fn a_freeze_refuses_inside_its_window_only_and_yields_to_a_reason() {
        let at = |s: &str| s.parse::<jiff::Timestamp>().unwrap();
        let (v, o) = freeze_check(&window(), at("2026-12-24T12:00:00Z"), None);
        assert!(v.unwrap_err().contains("--override-freeze"));
        assert!(o.is_none());
        let (v, o) = freeze_check(&window(), at("2026-12-24T12:00:00Z"), Some("hotfix INC-7"));
        assert!(v.unwrap().contains("hotfix INC-7"));
        assert_eq!(o.as_deref(), Some("hotfix INC-7"));
        // Berlin is UTC+1 in December: the window ended at 23:00 UTC.
        let (v, o) = freeze_check(&window(), at("2026-12-25T23:00:00Z"), None);
        assert!(v.unwrap().contains("ended"));
        assert!(o.is_none());
    }

    #[test]
    fn series_are_named_as_prometheus_writes_them() {
        let s = serde_json::json!({"metric": {"__name__": "ALERTS", "alertname": "DiskFull",
                                              "severity": "critical"}, "value": [1, "1"]});
        assert_eq!(
            series_name(&s),
            r#"ALERTS{alertname="DiskFull",severity="critical"}"#
        );
    }

    #[tokio::test]
    async fn an_unset_token_is_a_configuration_error_before_any_request() {
        let checks = [Check::Prometheus {
            name: "alerts".into(),
            url: "http://127.0.0.1:9".into(),
            query: "up == 0".into(),
            token_env: Some("PDE_TEST_SURELY_UNSET_TOKEN".into()),
        }];
        let client = crate::http::client(Duration::from_secs(1)).unwrap();
        let err = run(
            &client,
            &checks,
            Duration::from_secs(1),
            jiff::Timestamp::now(),
            None,
        )
        .await
        .unwrap_err();
        assert_eq!(err.exit_code(), ExitCode::Usage);
        assert!(err.to_string().contains("PDE_TEST_SURELY_UNSET_TOKEN"));
    }
}
