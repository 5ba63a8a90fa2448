//! One HTTP exchange with a target, retried the way DESIGN §7 says.
//!
//! The deploy, the read of `/active` that verifies it and the compensating
//! rollback all share this single policy, so that "what is transient" is
//! decided in one place:
//! - 5xx, timeouts, connection failures and broken bodies are transient and
//!   retried, with exponential backoff and *full* jitter (a delay drawn
//!   uniformly from `0..=base·2^(n-1)`, capped), so that a hundred targets
//!   that failed together do not come back together;
//! - every other status is final and handed back to the caller, which decides
//!   what a 404 or a 4xx means for its request (no retry on 4xx).

use std::time::Duration;

use reqwest::StatusCode;

use super::{PushError, Target};
use crate::config::PushConfig;

/// The longest single wait between two attempts, whatever the settings say.
pub(crate) const MAX_BACKOFF_MS: u64 = 30_000;

/// At most this many bytes of a response body are read; answers of the push
/// protocol are small, and an error page does not need to be kept whole.
const MAX_BODY: usize = 64 * 1024;

/// How often and how patiently one request is tried.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RetryPolicy {
    /// Retries after the first attempt.
    pub retries: u32,
    /// The first backoff ceiling, in milliseconds.
    pub backoff_ms: u64,
    /// Timeout of each attempt, connection to last body byte.
    pub timeout: Duration,
}

impl From<&PushConfig> for RetryPolicy {
    fn from(cfg: &PushConfig) -> Self {
        RetryPolicy {
            retries: cfg.retries,
            backoff_ms: cfg.backoff_ms,
            timeout: Duration::from_millis(cfg.timeout_ms.max(1)),
        }
    }
}

/// The upper bound of the wait before retry `n` (1-based): `base·2^(n-1)`, capped.
pub(crate) fn backoff_ceiling(base_ms: u64, n: u32) -> u64 {
    let shift = n.saturating_sub(1).min(32);
    base_ms.saturating_mul(1u64 << shift).min(MAX_BACKOFF_MS)
}

/// A delay drawn uniformly from `0..=ceiling` ("full jitter").
pub(crate) fn full_jitter(ceiling_ms: u64) -> u64 {
    rand::random_range(0..=ceiling_ms)
}

/// A final (non-5xx) answer: its status and the start of its body.
#[derive(Debug)]
pub(crate) struct Answer {
    /// The HTTP status.
    pub status: StatusCode,
    /// Up to [`MAX_BODY`] bytes of the body.
    pub body: Vec<u8>,
}

impl Answer {
    /// The body as text, shortened for an error message.
    pub fn excerpt(&self) -> String {
        excerpt(&self.body)
    }
}

/// Up to 200 characters of a body, on one line.
pub(crate) fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let one_line: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(200)
        .collect();
    one_line.trim().to_string()
}

/// A transport failure in words: what kind, and the innermost cause.
pub(crate) fn describe(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        return "timed out".to_string();
    }
    let kind = if e.is_connect() {
        "connection failed"
    } else if e.is_body() || e.is_decode() {
        "broken response body"
    } else {
        "request failed"
    };
    let mut cause = std::error::Error::source(e);
    let mut innermost = None;
    while let Some(c) = cause {
        innermost = Some(c.to_string());
        cause = c.source();
    }
    match innermost {
        Some(c) => format!("{kind}: {c}"),
        None => kind.to_string(),
    }
}

/// What a refused redirect says: where it pointed.
pub(crate) fn redirect_refused(resp: &reqwest::Response) -> String {
    let location = resp
        .headers()
        .get(reqwest::header::LOCATION)
        .map_or("(no Location)".into(), |v| {
            String::from_utf8_lossy(v.as_bytes()).into_owned()
        });
    format!("redirect to {location} refused: pde never follows redirects; fix the service url")
}

/// Reads at most [`MAX_BODY`] bytes of a response.
async fn read_body(mut resp: reqwest::Response) -> Result<Vec<u8>, reqwest::Error> {
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await? {
        let room = MAX_BODY - body.len();
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if body.len() >= MAX_BODY {
            break;
        }
    }
    Ok(body)
}

/// Called around each attempt, so that progress can be shown.
pub(crate) trait Hooks: Sync {
    /// Attempt `n` (1-based) is about to be sent.
    fn attempt(&self, _n: u32) {}
    /// Attempt `n` failed for `reason`; the next one follows after `delay_ms`.
    fn retrying(&self, _n: u32, _reason: &str, _delay_ms: u64) {}
}

impl Hooks for () {}

/// Sends the request that `build` makes until it gets a final answer or the
/// retries run out. Returns the number of attempts made, and either the final
/// answer (any status but 5xx, or a 5xx on the last attempt as an error) or
/// the last transport failure.
///
/// `what` names the request in messages, e.g. `POST /deploy`.
pub(crate) async fn exchange(
    target: &Target,
    what: &str,
    policy: RetryPolicy,
    hooks: &dyn Hooks,
    build: impl Fn() -> reqwest::RequestBuilder,
) -> (u32, Result<Answer, PushError>) {
    let mut n = 0;
    loop {
        n += 1;
        hooks.attempt(n);
        let mut request = build().timeout(policy.timeout);
        if let Some(token) = &target.token {
            // `bearer_auth` marks the header sensitive, so it is never logged.
            request = request.bearer_auth(token);
        }
        let reason = match request.send().await {
            Ok(resp) => {
                let status = resp.status();
                if status.is_redirection() {
                    // Redirects are never followed (the body and token would go
                    // elsewhere); a 3xx is final, and the answer names where it pointed.
                    let body = redirect_refused(&resp).into_bytes();
                    return (n, Ok(Answer { status, body }));
                }
                match read_body(resp).await {
                    Ok(body) if !status.is_server_error() => {
                        return (n, Ok(Answer { status, body }));
                    }
                    Ok(body) => {
                        let answer = Answer { status, body };
                        if n > policy.retries {
                            return (n, Err(PushError::status(target, what, &answer, n)));
                        }
                        format!("HTTP {status}: {}", answer.excerpt())
                    }
                    Err(e) => describe(&e),
                }
            }
            Err(e) if e.is_builder() => {
                // A request that cannot even be built will not build next time.
                return (
                    n,
                    Err(PushError::Transport {
                        service: target.service.clone(),
                        what: what.to_string(),
                        reason: describe(&e),
                        attempts: n,
                    }),
                );
            }
            Err(e) => describe(&e),
        };
        if n > policy.retries {
            return (
                n,
                Err(PushError::Transport {
                    service: target.service.clone(),
                    what: what.to_string(),
                    reason,
                    attempts: n,
                }),
            );
        }
        let delay = full_jitter(backoff_ceiling(policy.backoff_ms, n));
        tracing::debug!(service = %target.service, %what, attempt = n, %reason, delay_ms = delay, "retrying");
        hooks.retrying(n, &reason, delay);
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_is_capped() {
        assert_eq!(backoff_ceiling(100, 1), 100);
        assert_eq!(backoff_ceiling(100, 2), 200);
        assert_eq!(backoff_ceiling(100, 4), 800);
        assert_eq!(backoff_ceiling(100, 60), MAX_BACKOFF_MS);
        assert_eq!(backoff_ceiling(u64::MAX, 3), MAX_BACKOFF_MS);
    }

    #[test]
    fn jitter_stays_within_the_ceiling() {
        for _ in 0..1000 {
            assert!(full_jitter(50) <= 50);
        }
        assert_eq!(full_jitter(0), 0);
    }

    #[test]
    fn excerpts_are_short_and_on_one_line() {
        let long = format!("line one\nline two {}", "x".repeat(500));
        let e = excerpt(long.as_bytes());
        assert!(!e.contains('\n'));
        assert_eq!(e.chars().count(), 200);
    }
}
