//! HTTP to target services, shared by every step that talks to them:
//! the environment check, push, verification, compensation, rollback, `plan`
//! and the audit sink.
//!
//! One client ([`client`]): rustls, no proxy from the environment (services
//! are addressed directly), **no redirects** (a 3xx is an answer like any
//! other 4xx: following it would re-send a bundle, and drop its token, to an
//! address pde.toml never named), user agent `pde/<version>`.
//!
//! One exchange ([`exchange`]): the request is retried the way
//! [`pde_core::retry`] decides, which is the single place that says what is
//! transient (5xx, 429, timeouts, connection failures) and how long to wait
//! (full jitter, or the receiver's `Retry-After`).

use std::time::Duration;

use pde_core::retry::{RetryPolicy, Verdict};
use pde_core::secret::{ExposeSecret, Secret};
use reqwest::StatusCode;

/// At most this many bytes of a response body are read. Answers of the push
/// protocol are small except `GET /active`, which lists every active policy
/// of a service (about 200 bytes each, so thousands fit); an error page does
/// not need to be kept whole. A Prometheus answer is read the same way
/// (a rollout gate's range query: about 30 bytes a point, so some 30,000
/// points), and one that goes past it is refused by name, not misread.
pub const MAX_BODY: usize = 1024 * 1024;

/// Why a request never got a good answer.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The request never got a final answer: timeouts, refused connections,
    /// broken bodies, after every retry.
    #[error("service {service:?}: {what} failed after {attempts} attempt(s): {reason}")]
    Transport {
        /// The service.
        service: String,
        /// The request, e.g. `POST /deploy`.
        what: String,
        /// The last failure.
        reason: String,
        /// Attempts made.
        attempts: u32,
    },
    /// The service answered with an error status: a permanent one (never
    /// retried), or a transient one on the last attempt.
    #[error(
        "service {service:?}: {what} answered HTTP {status} after {attempts} attempt(s): {body}"
    )]
    Status {
        /// The service.
        service: String,
        /// The request.
        what: String,
        /// The HTTP status code.
        status: u16,
        /// The start of the response body (and the `Location` of a redirect).
        body: String,
        /// Attempts made.
        attempts: u32,
    },
    /// The HTTP client could not be built (TLS backend).
    #[error("cannot set up the HTTP client: {reason}")]
    Client {
        /// What reqwest said.
        reason: String,
    },
}

impl HttpError {
    /// The error for a final `answer` to `what`.
    pub fn status(t: &Target, what: &str, answer: &Answer, attempts: u32) -> HttpError {
        HttpError::Status {
            service: t.service.clone(),
            what: what.to_string(),
            status: answer.status.as_u16(),
            body: answer.excerpt(),
            attempts,
        }
    }
}

impl pde_core::HasExitCode for HttpError {
    fn exit_code(&self) -> pde_core::ExitCode {
        match self {
            HttpError::Client { .. } => pde_core::ExitCode::Usage,
            _ => pde_core::ExitCode::DeployFailed,
        }
    }
}

/// One service to talk to: its name, base URL and bearer token.
#[derive(Debug, Clone)]
pub struct Target {
    /// The service name from pde.toml.
    pub service: String,
    /// Base URL, without a trailing slash.
    pub url: String,
    /// Bearer token, if the service has `token_env`. Never printed.
    pub token: Option<Secret>,
}

impl PartialEq for Target {
    fn eq(&self, other: &Self) -> bool {
        self.service == other.service
            && self.url == other.url
            && self.token.as_ref().map(|t| t.expose_secret())
                == other.token.as_ref().map(|t| t.expose_secret())
    }
}

impl Eq for Target {}

impl Target {
    /// A target from its parts; a trailing slash on `url` is dropped.
    pub fn new(service: impl Into<String>, url: &str, token: Option<Secret>) -> Target {
        Target {
            service: service.into(),
            url: url.trim_end_matches('/').to_string(),
            token,
        }
    }

    /// `url` + `path`.
    pub fn endpoint(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }
}

/// The HTTP client every step uses (see the module docs); `timeout` is the
/// default per-request timeout.
pub fn client(timeout: Duration) -> Result<reqwest::Client, HttpError> {
    reqwest::Client::builder()
        .use_rustls_tls()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("pde/", env!("CARGO_PKG_VERSION")))
        .timeout(timeout)
        .connect_timeout(timeout)
        .tcp_nodelay(true)
        // Agents close connections idle for their header timeout (10 s by
        // default); forgetting pooled ones sooner keeps a request from being
        // sent on a connection the agent is closing at that moment.
        .pool_idle_timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| HttpError::Client {
            reason: describe(&e),
        })
}

/// A final answer: its status and the start of its body.
#[derive(Debug)]
pub struct Answer {
    /// The HTTP status.
    pub status: StatusCode,
    /// Up to [`MAX_BODY`] bytes of the body.
    pub body: Vec<u8>,
    /// True when the body went on past [`MAX_BODY`] bytes and was cut there.
    pub truncated: bool,
}

impl Answer {
    /// The body as text, shortened for an error message.
    pub fn excerpt(&self) -> String {
        excerpt(&self.body)
    }

    /// A refusal in full: the agent's `error` code, if its body is the
    /// `{"error": <code>, "reason": <text>}` of push protocol v2, and the
    /// text to show. A refusal is the one answer a person must read to the
    /// end (a 403's last clause says which key or how many approvals), so
    /// the reason is kept whole, only put on one line; any other body is cut
    /// at [`REFUSAL_CHARS`].
    pub fn refusal(&self) -> (Option<String>, String) {
        #[derive(serde::Deserialize)]
        struct Body {
            error: String,
            #[serde(default)]
            reason: Option<String>,
        }
        match serde_json::from_slice::<Body>(&self.body) {
            Ok(b) => {
                let text = match &b.reason {
                    Some(r) => format!("{}: {}", b.error, one_line(r, usize::MAX)),
                    None => b.error.clone(),
                };
                (Some(b.error), text)
            }
            Err(_) => (
                None,
                one_line(&String::from_utf8_lossy(&self.body), REFUSAL_CHARS),
            ),
        }
    }
}

/// The most of a refusal body that is not the agent's own JSON shown to a
/// person (an HTML error page, say).
pub const REFUSAL_CHARS: usize = 2000;

fn one_line(text: &str, max: usize) -> String {
    let line: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(max)
        .collect();
    line.trim().to_string()
}

/// Up to 200 characters of a body, on one line.
pub fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let one_line: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(200)
        .collect();
    one_line.trim().to_string()
}

/// What a refused redirect says: where it pointed.
pub fn redirect_refused(resp: &reqwest::Response) -> String {
    let location = resp
        .headers()
        .get(reqwest::header::LOCATION)
        .map_or("(no Location)".into(), |v| {
            String::from_utf8_lossy(v.as_bytes()).into_owned()
        });
    format!("redirect to {location} refused: pde never follows redirects; fix the service url")
}

/// A transport failure in words: what kind, and the innermost cause.
pub fn describe(e: &reqwest::Error) -> String {
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

/// Reads at most [`MAX_BODY`] bytes of a response; true when more followed.
async fn read_body(mut resp: reqwest::Response) -> Result<(Vec<u8>, bool), reqwest::Error> {
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await? {
        let room = MAX_BODY - body.len();
        if chunk.len() > room {
            body.extend_from_slice(&chunk[..room]);
            return Ok((body, true));
        }
        body.extend_from_slice(&chunk);
    }
    Ok((body, false))
}

/// Called around each attempt, so that progress can be shown.
pub trait Hooks: Sync {
    /// Attempt `n` (1-based) is about to be sent.
    fn attempt(&self, _n: u32) {}
    /// Attempt `n` failed for `reason`; the next one follows after `delay_ms`.
    fn retrying(&self, _n: u32, _reason: &str, _delay_ms: u64) {}
}

impl Hooks for () {}

/// Sends the request that `build` makes until it gets a final answer or the
/// retries run out. Returns the number of attempts made, and either the final
/// answer (any status [`pde_core::retry::verdict`] does not call transient,
/// or a transient one on the last attempt as an error) or the last transport
/// failure.
///
/// `what` names the request in messages, e.g. `POST /deploy`.
pub async fn exchange(
    target: &Target,
    what: &str,
    policy: RetryPolicy,
    hooks: &dyn Hooks,
    build: impl Fn() -> reqwest::RequestBuilder,
) -> (u32, Result<Answer, HttpError>) {
    let mut n = 0;
    loop {
        n += 1;
        hooks.attempt(n);
        let mut request = build().timeout(policy.timeout);
        if let Some(token) = &target.token {
            // `bearer_auth` marks the header sensitive, so it is never logged.
            request = request.bearer_auth(token.expose_secret());
        }
        let mut retry_after = None;
        let reason = match request.send().await {
            Ok(resp) => {
                let status = resp.status();
                retry_after = resp
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                if status.is_redirection() {
                    // Redirects are never followed (the body and token would go
                    // elsewhere); a 3xx is final, and the answer names where it pointed.
                    let body = redirect_refused(&resp).into_bytes();
                    let answer = Answer {
                        status,
                        body,
                        truncated: false,
                    };
                    return (n, Ok(answer));
                }
                match read_body(resp).await {
                    Ok((body, truncated)) => {
                        let answer = Answer {
                            status,
                            body,
                            truncated,
                        };
                        if pde_core::retry::verdict(status.as_u16()) != Verdict::Transient {
                            return (n, Ok(answer));
                        }
                        if n > policy.retries {
                            return (n, Err(HttpError::status(target, what, &answer, n)));
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
                    Err(HttpError::Transport {
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
                Err(HttpError::Transport {
                    service: target.service.clone(),
                    what: what.to_string(),
                    reason,
                    attempts: n,
                }),
            );
        }
        let delay = pde_core::retry::delay(&policy, n, retry_after.as_deref());
        let delay_ms = delay.as_millis() as u64;
        tracing::debug!(service = %target.service, %what, attempt = n, %reason, delay_ms, "retrying");
        hooks.retrying(n, &reason, delay_ms);
        tokio::time::sleep(delay).await;
    }
}

/// One `GET` of `url` on `target`, no retry, bounded by `timeout`: the
/// final answer, or why none came. Readiness checks and rollout gates ask
/// once and judge what they see; retrying is theirs to decide.
pub async fn get_once(
    client: &reqwest::Client,
    target: &Target,
    url: &str,
    timeout: Duration,
) -> Result<Answer, String> {
    let policy = RetryPolicy {
        retries: 0,
        backoff_ms: 0,
        timeout,
    };
    let (_, answer) = exchange(target, "GET", policy, &(), || client.get(url)).await;
    answer.map_err(|e| match e {
        HttpError::Transport { reason, .. } => reason,
        HttpError::Status { status, body, .. } => format!("HTTP {status}: {body}"),
        other => other.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_keeps_the_agents_reason_whole_and_its_code_apart() {
        let reason = format!(
            "bundle carries 1 approval; {} this agent requires 3",
            "x".repeat(400)
        );
        let answer = Answer {
            status: StatusCode::FORBIDDEN,
            body: serde_json::to_vec(&serde_json::json!({
                "error": "approvals_insufficient", "reason": reason
            }))
            .unwrap_or_default(),
            truncated: false,
        };
        let (code, text) = answer.refusal();
        assert_eq!(code.as_deref(), Some("approvals_insufficient"));
        assert!(text.ends_with("this agent requires 3"), "{text}");
        let page = Answer {
            status: StatusCode::FORBIDDEN,
            body: b"<html>\nno</html>".to_vec(),
            truncated: false,
        };
        assert_eq!(page.refusal(), (None, "<html> no</html>".to_string()));
    }

    #[test]
    fn excerpts_are_short_and_on_one_line() {
        let long = format!("line one\nline two {}", "x".repeat(500));
        let e = excerpt(long.as_bytes());
        assert!(!e.contains('\n'));
        assert_eq!(e.chars().count(), 200);
    }

    #[test]
    fn a_target_never_shows_its_token() {
        let t = Target::new(
            "A",
            "http://127.0.0.1:1/",
            Some(Secret::from("tok-123".to_string())),
        );
        assert_eq!(t.url, "http://127.0.0.1:1");
        assert!(!format!("{t:?}").contains("tok-123"));
    }

    /// Serves one answer whose body is `len` bytes, on loopback.
    async fn serve_body(len: usize) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await.unwrap();
            let mut request = [0_u8; 4096];
            let _ = conn.read(&mut request).await;
            let head =
                format!("HTTP/1.1 200 OK\r\ncontent-length: {len}\r\nconnection: close\r\n\r\n");
            conn.write_all(head.as_bytes()).await.unwrap();
            conn.write_all(&vec![b' '; len]).await.unwrap();
        });
        url
    }

    #[tokio::test]
    async fn a_body_of_exactly_the_bound_is_whole_and_one_byte_more_is_cut() {
        let client = reqwest::Client::new();
        for (len, cut) in [(MAX_BODY, false), (MAX_BODY + 1, true)] {
            let url = serve_body(len).await;
            let target = Target::new("S", &url, None);
            let answer = get_once(&client, &target, &url, Duration::from_secs(5))
                .await
                .unwrap();
            assert_eq!(
                (answer.body.len(), answer.truncated),
                (MAX_BODY, cut),
                "{len}"
            );
        }
    }
}
