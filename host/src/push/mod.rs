//! Push: deliver one bundle to the routed services, verify it, and undo it
//! everywhere if it did not land everywhere (DESIGN §7, protocol in §8).
//!
//! Why it is shaped this way:
//! - **Three phases, not one loop.** First every target's active digest is
//!   read, so that compensation knows where to send each service back *before*
//!   anything changes; a target whose state cannot be read stops the push with
//!   nothing sent. Then the deliveries run concurrently, bounded by
//!   `[push] concurrency`. Then, only if something failed, compensation.
//! - **A 2xx is not enough.** After the agent accepts the bundle, `GET /active`
//!   must show the new digest; an agent that says yes and serves something
//!   else counts as failed.
//! - **Compensation is best effort, and the report says so.** Every target that
//!   took the bundle gets `POST /rollback {"to": <its previous digest>}` (`null`
//!   when it had nothing, which sends it back to empty), and the rollback is
//!   itself verified through `/active`. The outcome is `deployed`,
//!   `rolled-back` or `needs-attention`; pde never claims the push was atomic.
//! - **Fail fast.** Once one target has failed, targets whose turn has not
//!   come yet are not sent the bundle at all: they would only be rolled back.
//! - **Re-deploying what is active is a no-op.** A target whose `/active`
//!   already shows the digest is not sent it again (state `unchanged`) and is
//!   never rolled back: it is where it was. Re-posting would be harmless to an
//!   idempotent agent, but skipping it keeps the agent's own "previous bundle"
//!   history free of a self-reference that `POST /rollback` would then follow.
//!
//! Tokens are attached with `bearer_auth`, which marks the header sensitive;
//! `Target`'s `Debug` redacts them, and no message here contains one.

mod retry;
#[cfg(test)]
pub(crate) mod test_receiver;
#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::stream::{self, StreamExt};
use reqwest::StatusCode;
use serde::{Deserialize, Serialize};

use crate::bundle::Bundle;
use crate::config::{PushConfig, Service};
use crate::error::{ExitCode, HasExitCode};
use retry::{Answer, Hooks, RetryPolicy};
pub(crate) use retry::{describe, excerpt, redirect_refused};

/// Why talking to a target, or preparing to, failed.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    /// `token_env` names a variable that is not set (or is empty).
    #[error(
        "service {service:?}: token variable {var} is not set; export it, or remove `token_env` from the service in pde.toml"
    )]
    MissingToken {
        /// The service.
        service: String,
        /// The environment variable pde.toml names.
        var: String,
    },
    /// The HTTP client could not be built (TLS backend).
    #[error("cannot set up the HTTP client: {reason}")]
    Client {
        /// What reqwest said.
        reason: String,
    },
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
    /// The service answered with an error status: a 4xx (never retried) or a
    /// 5xx on the last attempt.
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
        /// The start of the response body.
        body: String,
        /// Attempts made.
        attempts: u32,
    },
    /// A 2xx answer that does not follow the protocol (e.g. `/active` without a digest).
    #[error(
        "service {service:?}: {what} gave an answer that does not follow the pde push protocol: {reason}"
    )]
    Protocol {
        /// The service.
        service: String,
        /// The request.
        what: String,
        /// What is wrong with the answer.
        reason: String,
    },
    /// After a rollback, `/active` does not show the digest asked for.
    #[error("service {service:?}: rollback verify failed: active is {actual}, expected {expected}")]
    Verify {
        /// The service.
        service: String,
        /// The digest asked for, or `nothing`.
        expected: String,
        /// The digest reported, or `nothing`.
        actual: String,
    },
}

impl PushError {
    fn status(t: &Target, what: &str, answer: &Answer, attempts: u32) -> PushError {
        PushError::Status {
            service: t.service.clone(),
            what: what.to_string(),
            status: answer.status.as_u16(),
            body: answer.excerpt(),
            attempts,
        }
    }
}

impl HasExitCode for PushError {
    fn exit_code(&self) -> ExitCode {
        match self {
            PushError::MissingToken { .. } => ExitCode::Usage,
            _ => ExitCode::DeployFailed,
        }
    }
}

/// One service to push to: its name, base URL and bearer token.
#[derive(Clone, PartialEq, Eq)]
pub struct Target {
    /// The service name from pde.toml.
    pub service: String,
    /// Base URL, without a trailing slash.
    pub url: String,
    /// Bearer token, if the service has `token_env`. Never printed.
    pub token: Option<String>,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("service", &self.service)
            .field("url", &self.url)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl Target {
    /// A target from its parts; a trailing slash on `url` is dropped.
    pub fn new(service: impl Into<String>, url: &str, token: Option<String>) -> Target {
        Target {
            service: service.into(),
            url: url.trim_end_matches('/').to_string(),
            token,
        }
    }

    /// The target for a configured service, reading its token from
    /// `token_env`. An unset or empty variable is an error naming it.
    pub fn from_service(s: &Service) -> Result<Target, PushError> {
        let token = match &s.token_env {
            None => None,
            Some(var) => match std::env::var(var) {
                Ok(v) if !v.is_empty() => Some(v),
                _ => {
                    return Err(PushError::MissingToken {
                        service: s.name.clone(),
                        var: var.clone(),
                    });
                }
            },
        };
        Ok(Target::new(s.name.clone(), &s.url, token))
    }

    fn endpoint(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }
}

/// The HTTP client every push, health check and plan uses: rustls, no proxy
/// taken from the environment (services are addressed directly), user agent
/// `pde/<version>`, and `timeout` as the default per-request timeout.
pub fn client(timeout: Duration) -> Result<reqwest::Client, PushError> {
    reqwest::Client::builder()
        .use_rustls_tls()
        .no_proxy()
        .user_agent(concat!("pde/", env!("CARGO_PKG_VERSION")))
        .timeout(timeout)
        .connect_timeout(timeout)
        .tcp_nodelay(true)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| PushError::Client {
            reason: retry::describe(&e),
        })
}

/// What a service reports as active (`GET /active`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActiveInfo {
    /// `sha256:<hex>` of the active bundle.
    pub digest: String,
    /// The policy version it carries.
    pub version: String,
}

/// `GET {url}/active`, once (no retry): `None` on 404, when nothing is active.
/// Used by `pde plan`; the push itself reads `/active` with retries.
pub async fn get_active(
    client: &reqwest::Client,
    t: &Target,
) -> Result<Option<ActiveInfo>, PushError> {
    let policy = RetryPolicy {
        retries: 0,
        backoff_ms: 0,
        timeout: DEFAULT_SINGLE_TIMEOUT,
    };
    read_active(client, t, policy).await
}

/// Timeout of the single requests made by [`get_active`] and [`rollback`].
const DEFAULT_SINGLE_TIMEOUT: Duration = Duration::from_secs(5);

async fn read_active(
    client: &reqwest::Client,
    t: &Target,
    policy: RetryPolicy,
) -> Result<Option<ActiveInfo>, PushError> {
    const WHAT: &str = "GET /active";
    let url = t.endpoint("/active");
    let (attempts, answer) = retry::exchange(t, WHAT, policy, &(), || client.get(&url)).await;
    let answer = answer?;
    if answer.status == StatusCode::NOT_FOUND {
        return Ok(None);
    }
    if !answer.status.is_success() {
        return Err(PushError::status(t, WHAT, &answer, attempts));
    }
    serde_json::from_slice::<ActiveInfo>(&answer.body)
        .map(Some)
        .map_err(|e| PushError::Protocol {
            service: t.service.clone(),
            what: WHAT.to_string(),
            reason: format!("expected {{\"digest\", \"version\"}}: {e}"),
        })
}

/// Receives the progress of a push, e.g. to draw one progress bar per target.
/// Called from the push's tasks, so it must be cheap and must not block.
pub trait Observer: Send + Sync {
    /// `event` happened to `service`.
    fn on_event(&self, service: &str, event: &PushEvent);
}

/// The observer that ignores everything.
impl Observer for () {
    fn on_event(&self, _service: &str, _event: &PushEvent) {}
}

/// A step in one target's push. Each target ends with `Verified` (delivered
/// or unchanged), `Failed`, `RolledBack` or `RollbackFailed`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "event")]
pub enum PushEvent {
    /// The target's turn has come.
    Started,
    /// Attempt `n` (1-based) of `POST /deploy` is being sent.
    Attempt {
        /// Attempt number.
        n: u32,
    },
    /// Attempt `n` failed transiently; another follows after `delay_ms`.
    Retrying {
        /// The attempt that failed.
        n: u32,
        /// Why it failed.
        reason: String,
        /// The backoff before the next attempt.
        delay_ms: u64,
    },
    /// The service accepted the bundle (2xx).
    Delivered,
    /// `/active` shows the new digest (also sent for a target that already had it).
    Verified,
    /// The target did not take the bundle (also sent, with a reason starting
    /// "not sent", for a target skipped because another one failed first).
    Failed {
        /// Why.
        reason: String,
    },
    /// The target is being sent back to its previous bundle.
    RollingBack,
    /// The target is back on its previous bundle, verified.
    RolledBack,
    /// The target could not be sent back; someone must look at it.
    RollbackFailed {
        /// Why.
        reason: String,
    },
}

/// The overall result of a push.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// Every target runs the new bundle (or already did).
    Deployed,
    /// Some target failed, and every target that took the bundle was sent
    /// back and verified: all services run what they ran before (including
    /// the case where the push stopped before sending anything).
    RolledBack,
    /// Some target failed and at least one compensation failed too: services
    /// may run different bundles. Read the per-target states.
    NeedsAttention,
}

impl Outcome {
    /// The exit code of a deploy ending this way.
    pub fn exit_code(self) -> ExitCode {
        match self {
            Outcome::Deployed => ExitCode::Ok,
            Outcome::RolledBack | Outcome::NeedsAttention => ExitCode::DeployFailed,
        }
    }
}

/// Where one target ended up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TargetState {
    /// Delivered and verified: `/active` shows the new digest.
    Delivered,
    /// The digest was already active before; nothing was sent.
    Unchanged,
    /// The target did not take the bundle (or its verification failed).
    Failed,
    /// It took the bundle and was sent back to its previous one, verified.
    RolledBack,
    /// It took (or may have taken) the bundle and could not be sent back.
    RollbackFailed,
    /// Nothing was sent, because the push stopped before this target's turn.
    NotAttempted,
}

/// The result of a push, overall and per target (`--output json` prints it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushReport {
    /// The overall outcome.
    pub outcome: Outcome,
    /// The digest that was pushed.
    pub digest: String,
    /// One entry per target, in the order they were given.
    pub targets: Vec<TargetReport>,
}

impl PushReport {
    /// The targets in `state`.
    pub fn in_state(&self, state: TargetState) -> impl Iterator<Item = &TargetReport> {
        self.targets.iter().filter(move |t| t.state == state)
    }
}

/// What happened to one target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetReport {
    /// The service name.
    pub service: String,
    /// Its base URL.
    pub url: String,
    /// The digest it had active before the push (`None`: nothing, or unknown
    /// when it could not be read; `detail` says which).
    pub previous_digest: Option<String>,
    /// Where it ended up.
    pub state: TargetState,
    /// Attempts of `POST /deploy` made (0 if not sent).
    pub attempts: u32,
    /// A sentence for humans: what happened, and why.
    pub detail: String,
}

/// Pushes `bundle` for `env` to every target: records what each has active,
/// delivers concurrently with retries, verifies through `/active`, and
/// compensates everywhere if any target failed. Never fails as a whole; the
/// report says what happened where.
pub async fn push(
    client: &reqwest::Client,
    bundle: &Bundle,
    env: &str,
    targets: &[Target],
    cfg: &PushConfig,
    observer: &dyn Observer,
) -> PushReport {
    let policy = RetryPolicy::from(cfg);
    let width = cfg.concurrency.max(1);
    let digest = bundle.digest.as_str();
    tracing::info!(%digest, env, targets = targets.len(), concurrency = width, "push starting");

    // Phase 1: what is active now, so that compensation knows where to go back.
    // (Futures are collected before they go into a stream, here and below,
    // so that the whole push stays `Send`: a stream holding the closures
    // trips the compiler's higher-ranked lifetime check.)
    let reads: Vec<_> = targets
        .iter()
        .map(|t| read_active(client, t, policy))
        .collect();
    let previous: Vec<Result<Option<ActiveInfo>, PushError>> =
        stream::iter(reads).buffered(width).collect().await;
    if previous.iter().any(Result::is_err) {
        return abort_before_sending(digest, targets, previous, observer);
    }
    let previous: Vec<Option<String>> = previous
        .into_iter()
        .map(|p| p.ok().flatten().map(|a| a.digest))
        .collect();

    // Phase 2: deliver and verify, concurrently, bounded.
    let body = crate::bundle::canonical_json(&serde_json::json!({"bundle": bundle, "env": env}));
    let job = Delivery {
        client,
        body: &body,
        idempotency_key: format!("{digest}:{env}"),
        digest,
        policy,
        observer,
        failed: AtomicBool::new(false),
    };
    let deliveries: Vec<_> = targets
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let job = &job;
            let prev = previous[i].as_deref();
            async move { (i, job.deliver(t, prev).await) }
        })
        .collect();
    let mut runs: Vec<(usize, Run)> = stream::iter(deliveries)
        .buffer_unordered(width)
        .collect()
        .await;
    runs.sort_by_key(|(i, _)| *i);
    let mut runs: Vec<Run> = runs.into_iter().map(|(_, r)| r).collect();

    if !runs.iter().any(|r| r.state == TargetState::Failed) {
        tracing::info!(%digest, env, "push deployed");
        return report(Outcome::Deployed, digest, targets, &previous, runs);
    }

    // Phase 3: send back every target that took the bundle.
    let culprits: Vec<&str> = targets
        .iter()
        .zip(&runs)
        .filter(|(_, r)| r.state == TargetState::Failed)
        .map(|(t, _)| t.service.as_str())
        .collect();
    let because = format!("because {} failed", culprits.join(", "));
    tracing::warn!(%digest, env, failed = ?culprits, "push failed; compensating");
    let compensations: Vec<_> = targets
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let job = &job;
            let run = &runs[i];
            let prev = previous[i].as_deref();
            let because = because.as_str();
            async move { (i, job.compensate(t, run, prev, because).await) }
        })
        .collect();
    let fixes: Vec<(usize, Option<Run>)> = stream::iter(compensations)
        .buffer_unordered(width)
        .collect()
        .await;
    for (i, fix) in fixes {
        if let Some(fix) = fix {
            runs[i] = fix;
        }
    }
    let outcome = if runs.iter().any(|r| r.state == TargetState::RollbackFailed) {
        Outcome::NeedsAttention
    } else {
        Outcome::RolledBack
    };
    tracing::warn!(%digest, env, ?outcome, "push ended");
    report(outcome, digest, targets, &previous, runs)
}

/// `POST {url}/rollback {"to": to}`, retried on 5xx, timeouts and connection
/// errors with the default `[push]` settings. When `to` is a digest, `/active`
/// must show it afterwards; with `None` the service goes back to whatever it
/// had before, which is not checked here.
pub async fn rollback(
    client: &reqwest::Client,
    t: &Target,
    to: Option<&str>,
) -> Result<(), PushError> {
    let policy = RetryPolicy {
        timeout: DEFAULT_SINGLE_TIMEOUT,
        ..RetryPolicy::from(&PushConfig::default())
    };
    post_rollback(client, t, to, policy, &()).await?;
    if let Some(expected) = to {
        verify_active(client, t, Some(expected), policy).await?;
    }
    Ok(())
}

async fn post_rollback(
    client: &reqwest::Client,
    t: &Target,
    to: Option<&str>,
    policy: RetryPolicy,
    hooks: &dyn Hooks,
) -> Result<(), PushError> {
    const WHAT: &str = "POST /rollback";
    let url = t.endpoint("/rollback");
    let body = serde_json::json!({ "to": to });
    let (attempts, answer) =
        retry::exchange(t, WHAT, policy, hooks, || client.post(&url).json(&body)).await;
    let answer = answer?;
    if !answer.status.is_success() {
        return Err(PushError::status(t, WHAT, &answer, attempts));
    }
    Ok(())
}

/// Checks that `/active` shows `expected` (`None`: nothing active).
async fn verify_active(
    client: &reqwest::Client,
    t: &Target,
    expected: Option<&str>,
    policy: RetryPolicy,
) -> Result<(), PushError> {
    let active = read_active(client, t, policy).await?;
    let actual = active.as_ref().map(|a| a.digest.as_str());
    if actual == expected {
        Ok(())
    } else {
        Err(PushError::Verify {
            service: t.service.clone(),
            expected: expected.unwrap_or("nothing").to_string(),
            actual: actual.unwrap_or("nothing").to_string(),
        })
    }
}

/// One target's state during the push.
struct Run {
    state: TargetState,
    attempts: u32,
    detail: String,
    /// A `POST /deploy` was sent, so the service may have taken the bundle
    /// even if no 2xx came back (e.g. the answer timed out).
    sent: bool,
}

impl Run {
    fn new(state: TargetState, attempts: u32, sent: bool, detail: String) -> Run {
        Run {
            state,
            attempts,
            detail,
            sent,
        }
    }
}

/// What every delivery of one push shares.
struct Delivery<'a> {
    client: &'a reqwest::Client,
    body: &'a [u8],
    idempotency_key: String,
    digest: &'a str,
    policy: RetryPolicy,
    observer: &'a dyn Observer,
    /// Set by the first failure; later targets are then not sent the bundle.
    failed: AtomicBool,
}

/// Forwards the retry helper's hooks to the observer as push events.
struct DeployHooks<'a> {
    observer: &'a dyn Observer,
    service: &'a str,
}

impl Hooks for DeployHooks<'_> {
    fn attempt(&self, n: u32) {
        self.observer
            .on_event(self.service, &PushEvent::Attempt { n });
    }
    fn retrying(&self, n: u32, reason: &str, delay_ms: u64) {
        self.observer.on_event(
            self.service,
            &PushEvent::Retrying {
                n,
                reason: reason.to_string(),
                delay_ms,
            },
        );
    }
}

impl Delivery<'_> {
    fn event(&self, t: &Target, event: PushEvent) {
        self.observer.on_event(&t.service, &event);
    }

    fn fail(&self, t: &Target, attempts: u32, sent: bool, detail: String) -> Run {
        self.failed.store(true, Ordering::SeqCst);
        tracing::warn!(service = %t.service, url = %t.url, %detail, "target failed");
        self.event(
            t,
            PushEvent::Failed {
                reason: detail.clone(),
            },
        );
        Run::new(TargetState::Failed, attempts, sent, detail)
    }

    /// Phase 2 for one target: POST /deploy with retries, then verify.
    async fn deliver(&self, t: &Target, previous: Option<&str>) -> Run {
        if self.failed.load(Ordering::SeqCst) {
            let detail = "not sent: another target had already failed".to_string();
            self.event(
                t,
                PushEvent::Failed {
                    reason: detail.clone(),
                },
            );
            return Run::new(TargetState::NotAttempted, 0, false, detail);
        }
        self.event(t, PushEvent::Started);
        if previous == Some(self.digest) {
            self.event(t, PushEvent::Verified);
            return Run::new(
                TargetState::Unchanged,
                0,
                false,
                "already active; not sent again".into(),
            );
        }

        const WHAT: &str = "POST /deploy";
        let url = t.endpoint("/deploy");
        let hooks = DeployHooks {
            observer: self.observer,
            service: &t.service,
        };
        let (attempts, answer) = retry::exchange(t, WHAT, self.policy, &hooks, || {
            self.client
                .post(&url)
                .header("Idempotency-Key", &self.idempotency_key)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(self.body.to_vec())
        })
        .await;
        let answer = match answer {
            Ok(a) if a.status.is_success() => a,
            Ok(a) => {
                let detail = format!(
                    "rejected: HTTP {} (permanent, not retried): {}",
                    a.status,
                    a.excerpt()
                );
                return self.fail(t, attempts, true, detail);
            }
            Err(e) => return self.fail(t, attempts, true, e.to_string()),
        };
        tracing::debug!(service = %t.service, status = %answer.status, attempts, "delivered");
        self.event(t, PushEvent::Delivered);

        match read_active(self.client, t, self.policy).await {
            Ok(Some(a)) if a.digest == self.digest => {
                self.event(t, PushEvent::Verified);
                let detail = if attempts == 1 {
                    "delivered and verified".to_string()
                } else {
                    format!("delivered and verified after {attempts} attempts")
                };
                Run::new(TargetState::Delivered, attempts, true, detail)
            }
            Ok(Some(a)) => {
                let detail = format!("verify failed: active is {}", a.digest);
                self.fail(t, attempts, true, detail)
            }
            Ok(None) => self.fail(t, attempts, true, "verify failed: nothing is active".into()),
            Err(e) => self.fail(t, attempts, true, format!("verify failed: {e}")),
        }
    }

    /// Phase 3 for one target: send it back if it took the bundle. `None`
    /// when there is nothing to do.
    async fn compensate(
        &self,
        t: &Target,
        run: &Run,
        previous: Option<&str>,
        because: &str,
    ) -> Option<Run> {
        if previous == Some(self.digest) {
            return None; // it had this digest before the push: nothing to undo
        }
        match run.state {
            TargetState::Delivered => {}
            // A failed target may still have taken the bundle: the answer
            // timed out after the service activated it, or verification read
            // an error. Look before deciding.
            TargetState::Failed if run.sent => {
                match read_active(self.client, t, self.policy).await {
                    Ok(Some(a)) if a.digest == self.digest => {}
                    Ok(_) => return None,
                    // Unknown. Sending it to an explicit previous digest is
                    // harmless if it never left it; `null` ("go back one") is not.
                    Err(_) if previous.is_some() => {}
                    Err(e) => {
                        let detail = format!(
                            "{}; then could not tell whether it took the bundle ({e}), so it was not rolled back",
                            run.detail
                        );
                        self.event(
                            t,
                            PushEvent::RollbackFailed {
                                reason: detail.clone(),
                            },
                        );
                        return Some(Run::new(
                            TargetState::RollbackFailed,
                            run.attempts,
                            run.sent,
                            detail,
                        ));
                    }
                }
            }
            _ => return None,
        }

        self.event(t, PushEvent::RollingBack);
        let to = previous.unwrap_or("nothing");
        let result = match post_rollback(self.client, t, previous, self.policy, &()).await {
            Ok(()) => verify_active(self.client, t, previous, self.policy).await,
            Err(e) => Err(e),
        };
        let first = if run.state == TargetState::Delivered {
            "delivered and verified".to_string()
        } else {
            format!("{} (but it had taken the bundle)", run.detail)
        };
        Some(match result {
            Ok(()) => {
                tracing::info!(service = %t.service, to, "rolled back");
                self.event(t, PushEvent::RolledBack);
                Run::new(
                    TargetState::RolledBack,
                    run.attempts,
                    run.sent,
                    format!("{first}, then rolled back to {to} {because}"),
                )
            }
            Err(e) => {
                tracing::error!(service = %t.service, to, error = %e, "rollback failed");
                let detail = format!("{first}, then rollback to {to} failed: {e}");
                self.event(
                    t,
                    PushEvent::RollbackFailed {
                        reason: e.to_string(),
                    },
                );
                Run::new(TargetState::RollbackFailed, run.attempts, run.sent, detail)
            }
        })
    }
}

/// The report when phase 1 could not read every target: nothing was sent.
fn abort_before_sending(
    digest: &str,
    targets: &[Target],
    previous: Vec<Result<Option<ActiveInfo>, PushError>>,
    observer: &dyn Observer,
) -> PushReport {
    let unreadable: Vec<&str> = targets
        .iter()
        .zip(&previous)
        .filter(|(_, p)| p.is_err())
        .map(|(t, _)| t.service.as_str())
        .collect();
    tracing::warn!(%digest, unreadable = ?unreadable, "cannot read the active digest; nothing pushed");
    let runs: Vec<Run> = targets
        .iter()
        .zip(&previous)
        .map(|(t, p)| {
            let run = match p {
                Err(e) => Run::new(
                    TargetState::Failed,
                    0,
                    false,
                    format!("could not read the active digest before pushing, so nothing was pushed anywhere: {e}"),
                ),
                Ok(_) => Run::new(
                    TargetState::NotAttempted,
                    0,
                    false,
                    format!(
                        "not sent: the active digest of {} could not be read",
                        unreadable.join(", ")
                    ),
                ),
            };
            observer.on_event(
                &t.service,
                &PushEvent::Failed {
                    reason: run.detail.clone(),
                },
            );
            run
        })
        .collect();
    let previous: Vec<Option<String>> = previous
        .into_iter()
        .map(|p| p.ok().flatten().map(|a| a.digest))
        .collect();
    report(Outcome::RolledBack, digest, targets, &previous, runs)
}

fn report(
    outcome: Outcome,
    digest: &str,
    targets: &[Target],
    previous: &[Option<String>],
    runs: Vec<Run>,
) -> PushReport {
    PushReport {
        outcome,
        digest: digest.to_string(),
        targets: targets
            .iter()
            .zip(previous)
            .zip(runs)
            .map(|((t, prev), run)| TargetReport {
                service: t.service.clone(),
                url: t.url.clone(),
                previous_digest: prev.clone(),
                state: run.state,
                attempts: run.attempts,
                detail: run.detail,
            })
            .collect(),
    }
}
