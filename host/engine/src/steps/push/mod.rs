//! Push: deliver one bundle to the routed services, verify it, and undo it
//! everywhere if it did not land everywhere (DESIGN §7, protocol in §8).
//!
//! Everything here is per policy (push protocol v2): a service runs many
//! policies at once, and a push of policy 43 reads, verifies and compensates
//! only 43's activation on each service (`/active/43`, `POST /rollback
//! {"policy_id": "43", …}`). A service that speaks only protocol v1, with a
//! single active slot, is refused before anything is sent to it: pushing 43
//! there would silently replace 42.
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
//! - **Compensation carries the release key's authority.** Each `POST
//!   /rollback` holds a `proof` signed by the workspace's `[signing]` key for
//!   this policy, target and environment (push protocol v3), signed afresh
//!   for every attempt: a receiver accepts each nonce once, so a retry of the
//!   same bytes would be refused as a replay.
//!
//! - **Every request is fenced** (push protocol v4). `POST /deploy` carries
//!   the fencing number of the deploy lock the push runs under, with the
//!   release key's signature over it (`fence`, `fence_proof`), and every
//!   compensating rollback carries the same number in its signed statement.
//!   A receiver that has since accepted a newer lock's number refuses them
//!   (409 `fence_stale`): a permanent 4xx like any other, reported on the
//!   target with its `error_code`.
//!
//! Tokens are attached with `bearer_auth`, which marks the header sensitive;
//! `Target`'s `Debug` redacts them, and no message here contains one.

/// Step 5 for `delivery = { kind = "oci" }`: the same step, another transport.
pub mod publish;
#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicBool, Ordering};

use ed25519_dalek::SigningKey;
use futures::stream::{self, StreamExt};
use reqwest::StatusCode;
use serde::{Deserialize, Serialize};

use pde_core::retry::RetryPolicy;
use pde_core::{ExitCode, HasExitCode};

use crate::bundle::Bundle;
use crate::config::PushConfig;
use crate::http::{self, Hooks, HttpError};
pub use crate::http::{Target, client};

/// Why talking to a target, or preparing to, failed.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    /// A request failed: no answer, or a final error status.
    #[error(transparent)]
    Http(#[from] HttpError),
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
    /// The service speaks only push protocol v1, which holds one active bundle
    /// per service: pushing to it would replace whatever other policy it runs.
    #[error(
        "service {service:?} speaks push protocol v1 (one active bundle per service), so a deploy of \
         policy {policy_id} would replace the policy it runs now; nothing was pushed to it. Upgrade its \
         receiver to protocol v2 (per-policy activation, docs/agent.md \"Migrating from protocol v1\"). \
         It answered GET /active with: {answer}"
    )]
    OldProtocol {
        /// The service.
        service: String,
        /// The policy being pushed.
        policy_id: String,
        /// The start of what it answered.
        answer: String,
    },
    /// After a rollback, `/active/{policy_id}` does not show the digest asked for.
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

impl HasExitCode for PushError {
    fn exit_code(&self) -> ExitCode {
        ExitCode::DeployFailed
    }
}

pub use pde_core::wire::ActiveRecord;

/// What `policy_id` runs on the service, read once per the `[push]` settings
/// (no retry): `None` when the policy is not active there. Used by
/// `pde plan`; the push itself reads with retries. A service that speaks
/// only protocol v1 is an error ([`PushError::OldProtocol`]), because its
/// single slot says nothing about this policy.
pub async fn get_active(
    client: &reqwest::Client,
    t: &Target,
    policy_id: &str,
    cfg: &PushConfig,
) -> Result<Option<ActiveRecord>, PushError> {
    let policy = RetryPolicy {
        retries: 0,
        ..cfg.retry_policy()
    };
    read_previous(client, t, policy_id, policy).await
}

/// `GET {url}/active/{policy_id}`: `None` on 404.
async fn read_active(
    client: &reqwest::Client,
    t: &Target,
    policy_id: &str,
    policy: RetryPolicy,
) -> Result<Option<ActiveRecord>, PushError> {
    let what = format!("GET /active/{policy_id}");
    let url = t.endpoint(&format!("/active/{policy_id}"));
    let (attempts, answer) = http::exchange(t, &what, policy, &(), || client.get(&url)).await;
    let answer = answer?;
    if answer.status == StatusCode::NOT_FOUND {
        return Ok(None);
    }
    if !answer.status.is_success() {
        return Err(HttpError::status(t, &what, &answer, attempts).into());
    }
    serde_json::from_slice::<ActiveRecord>(&answer.body)
        .map(Some)
        .map_err(|e| PushError::Protocol {
            service: t.service.clone(),
            what,
            reason: format!("expected {{\"digest\", \"version\"}}: {e}"),
        })
}

/// What `policy_id` runs on the service before a push, and proof that the
/// service holds policies apart (protocol v2).
///
/// A 200 from `/active/{policy_id}` is that proof. A 404 is ambiguous: a v2
/// receiver says "this policy is not active", but a v1 receiver says "no such
/// endpoint". Only then is `GET /active` asked, which a v2 receiver answers
/// with `{"policies": {…}}` and a v1 receiver with one bundle or a 404.
async fn read_previous(
    client: &reqwest::Client,
    t: &Target,
    policy_id: &str,
    policy: RetryPolicy,
) -> Result<Option<ActiveRecord>, PushError> {
    if let Some(active) = read_active(client, t, policy_id, policy).await? {
        return Ok(Some(active));
    }
    const WHAT: &str = "GET /active";
    let url = t.endpoint("/active");
    let (attempts, answer) = http::exchange(t, WHAT, policy, &(), || client.get(&url)).await;
    let answer = answer?;
    let speaks_v2 = answer.status.is_success()
        && serde_json::from_slice::<serde_json::Value>(&answer.body)
            .is_ok_and(|v| v.get("policies").is_some_and(serde_json::Value::is_object));
    if speaks_v2 {
        return Ok(None);
    }
    if answer.status.is_success() || answer.status == StatusCode::NOT_FOUND {
        return Err(PushError::OldProtocol {
            service: t.service.clone(),
            policy_id: policy_id.to_string(),
            answer: format!("HTTP {} {}", answer.status.as_u16(), answer.excerpt()),
        });
    }
    Err(HttpError::status(t, WHAT, &answer, attempts).into())
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

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(match self {
            Outcome::Deployed => "deployed",
            Outcome::RolledBack => "rolled-back",
            Outcome::NeedsAttention => "needs-attention",
        })
    }
}

impl std::fmt::Display for TargetState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(match self {
            TargetState::Delivered => "delivered",
            TargetState::Unchanged => "unchanged",
            TargetState::Failed => "failed",
            TargetState::RolledBack => "rolled-back",
            TargetState::RollbackFailed => "rollback-failed",
            TargetState::NotAttempted => "not-attempted",
        })
    }
}

impl From<Outcome> for crate::state::RecordOutcome {
    fn from(o: Outcome) -> Self {
        match o {
            Outcome::Deployed => crate::state::RecordOutcome::Deployed,
            Outcome::RolledBack => crate::state::RecordOutcome::RolledBack,
            Outcome::NeedsAttention => crate::state::RecordOutcome::NeedsAttention,
        }
    }
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
    /// OCI delivery only: the tag moved and the manifests (`steps::push::publish::RegistryReport`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry: Option<serde_json::Value>,
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
    /// The HTTP status of a refused `POST /deploy` (a 4xx, or a 5xx after
    /// the last retry), for scripts: no need to parse `detail`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_status: Option<u16>,
    /// The agent's `error` code of that refusal (`approvals_insufficient`,
    /// `untrusted_signature`, …), when it answered push protocol v2's
    /// `{"error", "reason"}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_code: Option<String>,
}

/// Each target's result, as the state records it.
pub fn target_records(pushed: &PushReport) -> Vec<crate::state::TargetRecord> {
    pushed
        .targets
        .iter()
        .map(|t| crate::state::TargetRecord {
            service: t.service.clone(),
            outcome: t.state.to_string(),
            previous_digest: t.previous_digest.clone(),
            detail: t.detail.clone(),
        })
        .collect()
}

/// What each target runs for the pushed policy now, where the push changed
/// or confirmed it: `Some((version, digest))`, or `None` where it is unknown
/// (a compensation failed). Targets the push left where they were (failed,
/// not attempted, rolled back) are not listed: their record still holds.
pub fn holdings<'a>(
    pushed: &'a PushReport,
    version: &'a str,
) -> impl Iterator<Item = (String, Option<(&'a str, &'a str)>)> + 'a {
    pushed.targets.iter().filter_map(move |t| match t.state {
        TargetState::Delivered | TargetState::Unchanged => {
            Some((t.service.clone(), Some((version, pushed.digest.as_str()))))
        }
        TargetState::RollbackFailed => Some((t.service.clone(), None)),
        TargetState::Failed | TargetState::RolledBack | TargetState::NotAttempted => None,
    })
}

/// The authority a push carries: the release key, which signs the fence of
/// each deploy and every compensating rollback, and the fencing number of
/// the deploy lock it runs under (push protocol v4). The default carries
/// neither (receivers that trust a key then refuse compensations).
#[derive(Debug, Clone, Copy, Default)]
pub struct Fenced<'a> {
    /// The release key; `None` signs nothing.
    pub signer: Option<&'a SigningKey>,
    /// The fencing number; `None` sends none (a protocol-v3 request).
    pub fence: Option<u64>,
}

/// The body of `POST /deploy`: `{bundle, env}`, with the `fence` and, when
/// the release key is at hand, its `fence_proof` (push protocol v4).
fn deploy_body(bundle: &Bundle, env: &str, fenced: Fenced<'_>) -> Vec<u8> {
    let mut body = serde_json::json!({"bundle": bundle, "env": env});
    if let Some(fence) = fenced.fence {
        body["fence"] = fence.into();
        if let Some(key) = fenced.signer {
            let policy_id = &bundle.payload.manifest.policy_id;
            match pde_core::fence::sign_deploy(key, policy_id, &bundle.digest, env, fence) {
                Ok(proof) => body["fence_proof"] = serde_json::to_value(proof).unwrap_or_default(),
                // Strings and an integer always have a canonical form;
                // should they not, the receiver refuses the unsigned fence.
                Err(e) => tracing::error!(error = %e, "cannot sign the fence; sending it unsigned"),
            }
        }
    }
    crate::bundle::canonical_json(&body)
}

/// Pushes `bundle` for `env` to every target: records what each has active,
/// delivers concurrently with retries, verifies through `/active`, and
/// compensates everywhere if any target failed. Never fails as a whole; the
/// report says what happened where. Every request carries `fenced.fence`;
/// compensating rollbacks are signed with `fenced.signer` (the release key;
/// unsigned when `None`, which receivers with a trusted key refuse).
pub async fn push(
    client: &reqwest::Client,
    bundle: &Bundle,
    env: &str,
    targets: &[Target],
    cfg: &PushConfig,
    fenced: Fenced<'_>,
    observer: &dyn Observer,
) -> PushReport {
    let policy = cfg.retry_policy();
    let width = cfg.concurrency.max(1);
    let digest = bundle.digest.as_str();
    let policy_id = bundle.payload.manifest.policy_id.as_str();
    tracing::info!(%digest, policy_id, env, targets = targets.len(), concurrency = width, "push starting");

    // Phase 1: what is active now, so that compensation knows where to go back.
    // (Futures are collected before they go into a stream, here and below,
    // so that the whole push stays `Send`: a stream holding the closures
    // trips the compiler's higher-ranked lifetime check.)
    let reads: Vec<_> = targets
        .iter()
        .map(|t| read_previous(client, t, policy_id, policy))
        .collect();
    let previous: Vec<Result<Option<ActiveRecord>, PushError>> =
        stream::iter(reads).buffered(width).collect().await;
    if previous.iter().any(Result::is_err) {
        return abort_before_sending(digest, targets, previous, observer);
    }
    let previous: Vec<Option<String>> = previous
        .into_iter()
        .map(|p| p.ok().flatten().map(|a| a.digest))
        .collect();

    // Phase 2: deliver and verify, concurrently, bounded.
    let body = deploy_body(bundle, env, fenced);
    let job = Delivery {
        client,
        body: &body,
        idempotency_key: format!("{digest}:{env}"),
        digest,
        env,
        signer: fenced.signer,
        fence: fenced.fence,
        policy_id,
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
        if let Some(mut fix) = fix {
            // What the service said when it refused stays on the record.
            fix.http_status = fix.http_status.or(runs[i].http_status);
            fix.error_code = fix.error_code.or(runs[i].error_code.take());
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

/// What a `POST /rollback` is for, and the key that signs its proof.
#[derive(Clone, Copy)]
pub struct RollbackRequest<'a> {
    /// The policy to roll back.
    pub policy_id: &'a str,
    /// The digest to return to; `None`: the one before the current one.
    pub to: Option<&'a str>,
    /// The environment, named in the signed statement.
    pub env: &'a str,
    /// The release key; `None` sends no proof (refused by receivers that
    /// trust a key).
    pub signer: Option<&'a SigningKey>,
    /// The fencing number of the lock it is made under (push protocol v4).
    pub fence: Option<u64>,
}

/// `POST {url}/rollback {"policy_id", "to", "proof"}`, retried on 5xx,
/// timeouts and connection errors as the workspace's `[push]` settings say.
/// When `to` is a digest, `/active/{policy_id}` must show it afterwards; with
/// `None` the policy goes back to whatever it had before, which is not
/// checked here.
pub async fn rollback(
    client: &reqwest::Client,
    t: &Target,
    request: RollbackRequest<'_>,
    cfg: &PushConfig,
) -> Result<(), PushError> {
    let policy = cfg.retry_policy();
    let RollbackRequest { policy_id, to, .. } = request;
    post_rollback(client, t, request, policy, &()).await?;
    if let Some(expected) = to {
        verify_active(client, t, policy_id, Some(expected), policy).await?;
    }
    Ok(())
}

async fn post_rollback(
    client: &reqwest::Client,
    t: &Target,
    request: RollbackRequest<'_>,
    policy: RetryPolicy,
    hooks: &dyn Hooks,
) -> Result<(), PushError> {
    const WHAT: &str = "POST /rollback";
    let url = t.endpoint("/rollback");
    let RollbackRequest {
        policy_id,
        to,
        env,
        signer,
        fence,
    } = request;
    // Built for each attempt: every attempt needs a fresh nonce and time.
    let body = || {
        pde_core::rollback::request_body(policy_id, to, env, fence, signer).unwrap_or_else(|e| {
            // A statement of strings always has a canonical form; should it
            // ever not, the receiver refuses the unsigned body by name.
            tracing::error!(error = %e, "cannot sign the rollback proof; sending it unsigned");
            serde_json::json!({ "policy_id": policy_id, "to": to })
        })
    };
    let (attempts, answer) =
        http::exchange(t, WHAT, policy, hooks, || client.post(&url).json(&body())).await;
    let answer = answer?;
    if !answer.status.is_success() {
        return Err(HttpError::status(t, WHAT, &answer, attempts).into());
    }
    Ok(())
}

/// Checks that `/active/{policy_id}` shows `expected` (`None`: not active).
async fn verify_active(
    client: &reqwest::Client,
    t: &Target,
    policy_id: &str,
    expected: Option<&str>,
    policy: RetryPolicy,
) -> Result<(), PushError> {
    let active = read_active(client, t, policy_id, policy).await?;
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
    /// The refusal's HTTP status and agent error code, if it was refused.
    http_status: Option<u16>,
    error_code: Option<String>,
}

impl Run {
    fn new(state: TargetState, attempts: u32, sent: bool, detail: String) -> Run {
        Run {
            state,
            attempts,
            detail,
            sent,
            http_status: None,
            error_code: None,
        }
    }
}

/// What every delivery of one push shares.
struct Delivery<'a> {
    client: &'a reqwest::Client,
    body: &'a [u8],
    idempotency_key: String,
    digest: &'a str,
    /// The environment pushed to, named in compensation proofs.
    env: &'a str,
    /// The release key that signs compensation proofs.
    signer: Option<&'a SigningKey>,
    /// The fencing number compensations carry, as the deploy did.
    fence: Option<u64>,
    policy_id: &'a str,
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
        let (attempts, answer) = http::exchange(t, WHAT, self.policy, &hooks, || {
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
                let (code, text) = a.refusal();
                let detail = format!(
                    "rejected: HTTP {} (permanent, not retried): {text}",
                    a.status
                );
                let mut run = self.fail(t, attempts, true, detail);
                run.http_status = Some(a.status.as_u16());
                run.error_code = code;
                return run;
            }
            Err(e) => return self.fail(t, attempts, true, e.to_string()),
        };
        tracing::debug!(service = %t.service, status = %answer.status, attempts, "delivered");
        self.event(t, PushEvent::Delivered);

        match read_active(self.client, t, self.policy_id, self.policy).await {
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
            Ok(None) => self.fail(
                t,
                attempts,
                true,
                format!("verify failed: policy {} is not active", self.policy_id),
            ),
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
                match read_active(self.client, t, self.policy_id, self.policy).await {
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
        let request = RollbackRequest {
            policy_id: self.policy_id,
            to: previous,
            env: self.env,
            signer: self.signer,
            fence: self.fence,
        };
        let result = match post_rollback(self.client, t, request, self.policy, &()).await {
            Ok(()) => verify_active(self.client, t, self.policy_id, previous, self.policy).await,
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
    previous: Vec<Result<Option<ActiveRecord>, PushError>>,
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
                http_status: run.http_status,
                error_code: run.error_code,
            })
            .collect(),
        registry: None,
    }
}
