//! Pull mode (issue 23): the agent polls an OCI registry for its policies'
//! tags instead of waiting for pushes (`pde agent --pull REFERENCE --env ENV`).
//!
//! For each policy the tag `<policy_id>.<env>` is a pointer, never trusted
//! for content (DESIGN §11): each poll resolves it to a manifest digest and,
//! when that differs from what this agent last took from it, fetches the
//! artifact by digest (oci-client checks every blob against its digest) and
//! hands the bundle to **the push path's own verification**,
//! `routes::parse_deploy`: signature by a trusted key before the payload is
//! parsed, digest recomputed, `--min-approvals`. It then activates through
//! the same store transition as `POST /deploy`, with the pusher's
//! idempotency key `<digest>:<env>`, so a tag re-pointed to an earlier
//! release (a rollback) activates that release again.
//!
//! Nothing here ever deactivates a policy: when the registry is unreachable,
//! or serves something that does not verify, the last good bundle stays
//! active, the reason is kept for `GET /healthz` and `GET /metrics`, and the
//! next poll waits longer (exponential backoff, capped), always with jitter
//! so that a fleet does not poll in step.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry as MetricsRegistry;
use rand::Rng as _;
use serde_json::{Value, json};
use tracing::{info, warn};

use pde_core::oci::{Registry, RegistryOptions, Repository};

use crate::routes::{self, AppState};
use crate::store::DeployOutcome;

/// Default `--interval`.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(30);
/// The longest wait between polls after failures.
const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// What to pull, and from where.
#[derive(Debug, Clone)]
pub struct PullConfig {
    /// `HOST[:PORT]/REPOSITORY`.
    pub repository: Repository,
    /// The environment whose tags (`<policy>.<env>`) this agent follows.
    pub env: String,
    /// The policies to follow; empty: every tag of the environment.
    pub policies: Vec<String>,
    /// Time between polls when all is well (jittered by ±20%).
    pub interval: Duration,
    /// TLS or plain HTTP, credentials, timeouts.
    pub options: RegistryOptions,
}

/// What one tag points at, as this agent last saw it.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct TagStatus {
    /// The manifest digest the tag pointed at on the last successful resolve.
    pub digest: Option<String>,
    /// The manifest digest whose bundle this agent last verified and activated.
    pub taken: Option<String>,
    /// Why the digest the tag points at was not taken, if it was not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Default)]
struct Inner {
    last_success: Option<time::OffsetDateTime>,
    last_error: Option<String>,
    last_error_at: Option<time::OffsetDateTime>,
    failures: u32,
    polls: u64,
    tags: BTreeMap<String, TagStatus>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TagLabel {
    tag: String,
    digest: String,
}

/// The pull loop's state, read by `/healthz` and `/metrics`.
pub struct PullState {
    cfg: PullConfig,
    inner: StdMutex<Inner>,
    registry: MetricsRegistry,
    last_success: Gauge,
    failing: Gauge,
    failures: Gauge,
    tag_digest: Family<TagLabel, Gauge>,
}

impl std::fmt::Debug for PullState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PullState").field("cfg", &self.cfg).finish()
    }
}

fn rfc3339(t: Option<time::OffsetDateTime>) -> Option<String> {
    t.and_then(|t| {
        t.format(&time::format_description::well_known::Rfc3339)
            .ok()
    })
}

impl PullState {
    /// A fresh state for `cfg`: nothing polled yet.
    pub fn new(cfg: PullConfig) -> PullState {
        let mut registry = MetricsRegistry::with_prefix("pde_agent_pull");
        let last_success = Gauge::default();
        let failing = Gauge::default();
        let failures = Gauge::default();
        let tag_digest = Family::<TagLabel, Gauge>::default();
        registry.register(
            "last_success_timestamp_seconds",
            "Unix time of the last poll of the registry that succeeded (0: none yet)",
            last_success.clone(),
        );
        registry.register(
            "failing",
            "1 while the last poll failed (registry unreachable, or an artifact that does not verify)",
            failing.clone(),
        );
        registry.register(
            "consecutive_failures",
            "Polls failed in a row",
            failures.clone(),
        );
        registry.register(
            "tag",
            "1 for each followed tag, labelled with the manifest digest it points at",
            tag_digest.clone(),
        );
        PullState {
            cfg,
            inner: StdMutex::default(),
            registry,
            last_success,
            failing,
            failures,
            tag_digest,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The `pull` member of `GET /healthz`.
    pub fn health(&self) -> Value {
        let inner = self.lock();
        json!({
            "registry": self.cfg.repository.to_string(),
            "env": self.cfg.env,
            "status": if inner.last_error.is_some() { "failing" } else if inner.polls == 0 { "starting" } else { "ok" },
            "last_success": rfc3339(inner.last_success),
            "last_error": inner.last_error,
            "last_error_at": rfc3339(inner.last_error_at),
            "consecutive_failures": inner.failures,
            "tags": inner.tags,
        })
    }

    /// Appends the pull metrics to the agent's exposition (before its `# EOF`).
    pub fn append_metrics(&self, exposition: String) -> String {
        {
            let inner = self.lock();
            self.last_success
                .set(inner.last_success.map_or(0, |t| t.unix_timestamp()));
            self.failing.set(i64::from(inner.last_error.is_some()));
            self.failures.set(i64::from(inner.failures));
            self.tag_digest.clear();
            for (tag, status) in &inner.tags {
                if let Some(digest) = &status.digest {
                    self.tag_digest
                        .get_or_create(&TagLabel {
                            tag: tag.clone(),
                            digest: digest.clone(),
                        })
                        .set(1);
                }
            }
        }
        let mut out = exposition
            .strip_suffix("# EOF\n")
            .unwrap_or(&exposition)
            .to_string();
        let _ = prometheus_client::encoding::text::encode_registry(&mut out, &self.registry);
        let _ = prometheus_client::encoding::text::encode_eof(&mut out);
        out
    }
}

/// Starts the pull loop on the current runtime. It runs until the process ends.
pub fn spawn(app: AppState, state: Arc<PullState>) -> Result<(), String> {
    let registry = Registry::new(state.cfg.repository.clone(), state.cfg.options.clone())
        .map_err(|e| e.to_string())?;
    info!(
        registry = %state.cfg.repository,
        env = %state.cfg.env,
        policies = ?state.cfg.policies,
        interval_ms = state.cfg.interval.as_millis() as u64,
        "pulling policies from the registry"
    );
    tokio::spawn(async move {
        loop {
            let failed = poll(&app, &state, &registry).await;
            let wait = next_wait(state.cfg.interval, failed);
            tokio::time::sleep(wait).await;
        }
    });
    Ok(())
}

/// The wait before the next poll: the interval, doubled per failure in a
/// row up to 16 intervals, and never over [`MAX_BACKOFF`] (unless the
/// interval itself is longer), ±20% jitter. A registry that comes back is
/// thus noticed within 16 intervals at most.
fn next_wait(interval: Duration, failures: u32) -> Duration {
    let base = if failures == 0 {
        interval
    } else {
        let cap = interval.saturating_mul(16).min(MAX_BACKOFF).max(interval);
        interval.saturating_mul(1u32 << failures.min(16)).min(cap)
    };
    let jitter = rand::rng().random_range(0.8..1.2);
    base.mul_f64(jitter)
}

/// One poll of every followed tag. Returns the failures in a row so far.
async fn poll(app: &AppState, state: &PullState, registry: &Registry) -> u32 {
    let env = &state.cfg.env;
    let suffix = format!(".{env}");
    let tags: Result<Vec<(String, String)>, String> = if state.cfg.policies.is_empty() {
        registry
            .tags()
            .await
            .map(|tags| {
                tags.into_iter()
                    .filter_map(|t| {
                        let policy = t.strip_suffix(&suffix)?.to_string();
                        Some((policy, t))
                    })
                    .collect()
            })
            .map_err(|e| e.to_string())
    } else {
        state
            .cfg
            .policies
            .iter()
            .map(|p| {
                pde_core::oci::policy_tag(p, env)
                    .map(|t| (p.clone(), t))
                    .map_err(|e| e.to_string())
            })
            .collect()
    };
    let mut errors = Vec::new();
    match tags {
        Err(e) => errors.push(e),
        Ok(tags) => {
            for (policy_id, tag) in tags {
                if let Err(e) = follow(app, state, registry, &policy_id, &tag).await {
                    warn!(%tag, error = %e, "pull: kept the last good bundle");
                    errors.push(format!("{tag}: {e}"));
                }
            }
        }
    }
    let mut inner = state.lock();
    inner.polls += 1;
    if errors.is_empty() {
        inner.last_success = Some(time::OffsetDateTime::now_utc());
        inner.last_error = None;
        inner.failures = 0;
    } else {
        inner.last_error = Some(errors.join("; "));
        inner.last_error_at = Some(time::OffsetDateTime::now_utc());
        inner.failures += 1;
    }
    inner.failures
}

/// Resolves one tag and, if it moved, fetches, verifies and activates.
async fn follow(
    app: &AppState,
    state: &PullState,
    registry: &Registry,
    policy_id: &str,
    tag: &str,
) -> Result<(), String> {
    let resolved = registry.resolve(tag).await.map_err(|e| e.to_string());
    let digest = match resolved {
        Ok(Some(d)) => d,
        // Not published yet (or never for this environment): nothing to do,
        // and nothing to take away.
        Ok(None) => {
            state
                .lock()
                .tags
                .insert(tag.to_string(), TagStatus::default());
            return Ok(());
        }
        Err(e) => {
            state.lock().tags.entry(tag.to_string()).or_default().error = Some(e.clone());
            return Err(e);
        }
    };
    let taken = {
        let mut inner = state.lock();
        let entry = inner.tags.entry(tag.to_string()).or_default();
        entry.digest = Some(digest.clone());
        entry.taken.clone()
    };
    if taken.as_deref() == Some(digest.as_str()) {
        return Ok(());
    }
    let result = take(app, state, registry, policy_id, &digest).await;
    let mut inner = state.lock();
    let entry = inner.tags.entry(tag.to_string()).or_default();
    match &result {
        Ok(()) => {
            entry.taken = Some(digest);
            entry.error = None;
        }
        Err(e) => entry.error = Some(e.clone()),
    }
    result
}

/// Fetches the artifact `digest` and activates its bundle if, and only if,
/// it verifies exactly as a pushed one would.
async fn take(
    app: &AppState,
    state: &PullState,
    registry: &Registry,
    policy_id: &str,
    digest: &str,
) -> Result<(), String> {
    let env = state.cfg.env.clone();
    let max = app.settings.max_body_bytes;
    let fetched = registry
        .fetch_bundle(digest, max)
        .await
        .map_err(|e| e.to_string())?;
    // The deploy request a pusher would have sent, so that the bytes go
    // through the one verification a push goes through.
    let env_json = serde_json::to_string(&env).map_err(|e| e.to_string())?;
    let mut body = Vec::with_capacity(fetched.bundle.len() + env_json.len() + 24);
    body.extend_from_slice(b"{\"env\":");
    body.extend_from_slice(env_json.as_bytes());
    body.extend_from_slice(b",\"bundle\":");
    body.extend_from_slice(&fetched.bundle);
    body.push(b'}');
    let settings = app.settings.clone();
    let parsed = tokio::task::spawn_blocking(move || routes::parse_deploy(&body, &settings))
        .await
        .map_err(|e| format!("bundle verification panicked: {e}"))?;
    let (incoming, env) = match parsed {
        Ok(ok) => ok,
        Err(e) => {
            app.metrics.rejected(e.code());
            return Err(format!(
                "refused artifact {digest}: {} ({})",
                e.reason(),
                e.code()
            ));
        }
    };
    if incoming.policy_id != policy_id {
        app.metrics.rejected("malformed_bundle");
        return Err(format!(
            "refused artifact {digest}: its bundle is of policy {:?}, but the tag is policy {policy_id:?}'s",
            incoming.policy_id
        ));
    }
    let key = format!("{}:{env}", incoming.digest);
    let bundle_digest = incoming.digest.clone();
    let (outcome, record) = activate(app, key, env, incoming)
        .await
        .map_err(|e| format!("could not activate {bundle_digest}: {e}"))?;
    app.metrics.deploy(match outcome {
        DeployOutcome::Activated(_) => "activated",
        DeployOutcome::Repeat(_) => "unchanged",
        DeployOutcome::AlreadyActive(_) => "already-active",
        DeployOutcome::KeyConflict { .. } => "conflict",
        DeployOutcome::FenceStale(_) => "fence_stale",
    });
    match outcome {
        DeployOutcome::KeyConflict { previous } => {
            return Err(format!(
                "could not activate {bundle_digest}: its idempotency key was used with {previous}"
            ));
        }
        // A registry artifact carries no fence (a pusher's lock does not
        // reach the agents that pull); an agent that also took fenced
        // pushes for this policy keeps what the pusher gave it.
        DeployOutcome::FenceStale(refusal) => {
            return Err(format!(
                "could not activate {bundle_digest}: {} (pulled artifacts carry no fence; this agent also took fenced pushes for the policy)",
                refusal.reason
            ));
        }
        _ => {}
    }
    info!(%policy_id, artifact = %digest, bundle = %bundle_digest,
          version = ?record.as_ref().map(|r| r.version.clone()), "pull: bundle active");
    Ok(())
}

/// The store transition of `POST /deploy`, under the same lock, followed
/// by the activation hook as for a push.
async fn activate(
    app: &AppState,
    key: String,
    env: String,
    incoming: crate::store::Incoming,
) -> Result<(DeployOutcome, Option<crate::store::ActiveRecord>), String> {
    let hook = app.settings.on_activate.is_some();
    let guard = app.store.clone().lock_owned().await;
    let (guard, outcome) =
        routes::with_store(guard, move |s| s.deploy(&key, &env, &incoming, hook))
            .await
            .map_err(|e| e.reason().to_string())?;
    let outcome = outcome.map_err(|e| e.to_string())?;
    match outcome {
        DeployOutcome::Activated(record) => {
            let record = routes::after_activation(app, guard, record.clone())
                .await
                .map_err(|e| e.reason().to_string())?;
            Ok((DeployOutcome::Activated(record.clone()), Some(record)))
        }
        DeployOutcome::Repeat(ref r) | DeployOutcome::AlreadyActive(ref r) => {
            let r = r.clone();
            Ok((outcome, Some(r)))
        }
        other => Ok((other, None)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_grow_with_failures_and_stay_jittered_and_capped() {
        let i = Duration::from_secs(10);
        for _ in 0..50 {
            let w = next_wait(i, 0);
            assert!(w >= Duration::from_secs(8) && w <= Duration::from_secs(12));
            let w = next_wait(i, 2);
            assert!(w >= Duration::from_secs(32) && w <= Duration::from_secs(48));
            assert!(next_wait(i, 30) <= Duration::from_secs(160).mul_f64(1.2));
            let slow = Duration::from_secs(60);
            assert!(next_wait(slow, 30) <= MAX_BACKOFF.mul_f64(1.2));
        }
    }
}
