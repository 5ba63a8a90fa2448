//! Step 5 for an environment with `delivery = { kind = "oci", … }` (issue
//! 23): publish the signed bundle to the registry, move the policy's tag,
//! and wait until the listed services' agents, which pull, report it.
//!
//! It reports in the push step's own shape ([`PushReport`]), so the
//! pipeline, the state's per-service records, the audit records and the
//! CLI treat both deliveries alike:
//! - each routed service is a target; `delivered` means its `GET
//!   /active/{id}` showed the new digest within `converge_timeout_ms`
//!   (`unchanged` when it already did before the tag moved);
//! - a service that did not converge is `failed`, named with what it runs;
//!   then the tag is **re-pointed** to the manifest it held before, and the
//!   services that had taken the new bundle are waited for until they are
//!   back (`rolled-back`) or the timeout passes (`rollback-failed`).
//!
//! A registry cannot un-point a tag that had no earlier target: a failed
//! first publish ends `needs-attention`, with the tag named.
//!
//! A fleet too large to list is waited for through a [`FleetCheck`]
//! (`converge_gates`: typically Prometheus counting the agents on the new
//! digest), after the listed services, within the same timeout; when it does
//! not pass, the tag goes back exactly as for a lagging service.

use std::time::{Duration, Instant};

use futures::future::BoxFuture;

use serde::{Deserialize, Serialize};

use pde_core::oci::Registry;

use crate::bundle::Bundle;
use crate::config::PushConfig;
use crate::steps::push::{
    self, Observer, Outcome, PushEvent, PushReport, Target, TargetReport, TargetState,
};

/// A registry problem, before anything was changed in it.
#[derive(Debug, thiserror::Error)]
#[error("environment {env}: OCI delivery: {source}")]
pub struct DeliveryError {
    /// The environment.
    pub env: String,
    /// What failed.
    pub source: pde_core::oci::OciError,
}

impl pde_core::HasExitCode for DeliveryError {
    fn exit_code(&self) -> pde_core::ExitCode {
        use pde_core::oci::OciError;
        match self.source {
            OciError::BadReference(_) | OciError::BadTag(_) | OciError::BadCredentials(_) => {
                pde_core::ExitCode::Usage
            }
            _ => pde_core::ExitCode::DeployFailed,
        }
    }
}

/// How often the services' `/active/{id}` is read while waiting.
const POLL: Duration = Duration::from_millis(250);

/// What was done in the registry, for the report, the audit log and status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistryReport {
    /// `HOST[:PORT]/REPOSITORY`.
    pub repository: String,
    /// The tag moved, `<policy_id>.<env>`.
    pub tag: String,
    /// The manifest digest published (what the tag was pointed at).
    pub manifest_digest: Option<String>,
    /// What the tag pointed at before (`None`: it did not exist).
    pub previous_manifest_digest: Option<String>,
    /// What the tag points at now, as far as pde knows.
    pub tag_now: Option<String>,
    /// Whether the tag was re-pointed back to `previous_manifest_digest`.
    pub repointed_back: bool,
    /// The fleet's convergence gates as last evaluated (`{"passed", "gates":
    /// [...]}`), when the environment has any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet: Option<serde_json::Value>,
}

/// The fleet beyond the listed services: what must hold before a publish
/// counts as converged. The engine implements it with the environment's
/// `converge_gates`; this step only decides when to ask and what a refusal
/// means (the tag goes back).
pub trait FleetCheck: Sync {
    /// Evaluates for `bundle` until it passes (`Ok`) or `deadline` passes
    /// (`Err`); either way, what was seen last, as JSON for the report.
    fn converged<'a>(
        &'a self,
        bundle: &'a Bundle,
        deadline: Instant,
    ) -> BoxFuture<'a, Result<serde_json::Value, serde_json::Value>>;
}

/// The inputs of a publish.
pub struct Publish<'a> {
    /// The registry client (its repository is the environment's).
    pub registry: &'a Registry,
    /// The HTTP client for the services' `/active`.
    pub http: &'a reqwest::Client,
    /// Timeouts of single reads.
    pub push: &'a PushConfig,
    /// How long services get to converge.
    pub converge_timeout: Duration,
    /// The fleet beyond the listed services, if the environment watches it.
    pub fleet: Option<&'a dyn FleetCheck>,
}

/// Publishes `bundle` for `env` and waits for `routed` to converge.
pub async fn publish(
    p: &Publish<'_>,
    bundle: &Bundle,
    env: &str,
    routed: &[Target],
    observer: &dyn Observer,
) -> (PushReport, RegistryReport) {
    let policy_id = &bundle.payload.manifest.policy_id;
    let mut reg = RegistryReport {
        repository: p.registry.repository().to_string(),
        tag: String::new(),
        manifest_digest: None,
        previous_manifest_digest: None,
        tag_now: None,
        repointed_back: false,
        fleet: None,
    };
    let mut runs: Vec<TargetReport> = routed
        .iter()
        .map(|t| TargetReport {
            service: t.service.clone(),
            url: t.url.clone(),
            previous_digest: None,
            state: TargetState::NotAttempted,
            attempts: 0,
            detail: String::new(),
            http_status: None,
            error_code: None,
        })
        .collect();
    let stop = |runs: Vec<TargetReport>, why: String, reg: RegistryReport| {
        let targets = runs
            .into_iter()
            .map(|mut t| {
                t.detail = format!("not published: {why}");
                observer.on_event(
                    &t.service,
                    &PushEvent::Failed {
                        reason: t.detail.clone(),
                    },
                );
                t
            })
            .collect();
        (
            report(Outcome::RolledBack, &bundle.digest, targets, &reg),
            reg,
        )
    };
    let tag = match pde_core::oci::policy_tag(policy_id, env) {
        Ok(t) => t,
        Err(e) => return stop(runs, e.to_string(), reg),
    };
    reg.tag = tag.clone();
    let previous = match p.registry.resolve(&tag).await {
        Ok(d) => d,
        Err(e) => return stop(runs, e.to_string(), reg),
    };
    reg.previous_manifest_digest = previous.clone();
    reg.tag_now = previous.clone();
    // What each service runs before the tag moves: compensation waits for
    // it, and a service that already runs the digest is `unchanged`.
    let before = futures::future::join_all(
        routed
            .iter()
            .map(|t| push::get_active(p.http, t, policy_id, p.push)),
    )
    .await;
    for (run, b) in runs.iter_mut().zip(before) {
        observer.on_event(&run.service, &PushEvent::Started);
        match b {
            Ok(a) => run.previous_digest = a.map(|a| a.digest),
            Err(e) => run.detail = format!("could not read what it ran before: {e}"),
        }
    }
    let published = p
        .registry
        .push_bundle(
            &tag,
            &bundle.to_canonical_bytes(),
            policy_id,
            &bundle.payload.manifest.version,
            &bundle.digest,
            &bundle.format,
        )
        .await;
    let manifest = match published {
        Ok(m) => m,
        Err(e) => {
            // The manifest PUT is the last request of a push: if it failed,
            // the tag did not move, unless it did and the answer was lost.
            let now = p.registry.resolve(&tag).await.ok().flatten();
            if now == previous {
                return stop(runs, e.to_string(), reg);
            }
            reg.tag_now = now;
            for r in &mut runs {
                r.state = TargetState::Failed;
                r.detail = format!("publishing failed: {e}");
            }
            return compensate(p, bundle, &mut reg, routed, runs, observer).await;
        }
    };
    tracing::info!(%tag, %manifest, previous = ?previous, "published");
    reg.manifest_digest = Some(manifest.clone());
    reg.tag_now = Some(manifest);
    let deadline = Instant::now() + p.converge_timeout;
    for r in &mut runs {
        r.attempts = 1;
        observer.on_event(&r.service, &PushEvent::Delivered);
    }
    let converged = wait_for(p, policy_id, routed, &bundle.digest, p.converge_timeout).await;
    let mut lagging = false;
    for (r, c) in runs.iter_mut().zip(converged) {
        match c {
            Ok(()) => {
                r.state = if r.previous_digest.as_deref() == Some(bundle.digest.as_str()) {
                    TargetState::Unchanged
                } else {
                    TargetState::Delivered
                };
                r.detail = format!("reports {} on GET /active/{policy_id}", bundle.digest);
                observer.on_event(&r.service, &PushEvent::Verified);
            }
            Err(actual) => {
                lagging = true;
                r.state = TargetState::Failed;
                r.detail = format!(
                    "did not converge within {} ms: GET /active/{policy_id} reports {actual}",
                    p.converge_timeout.as_millis()
                );
                observer.on_event(
                    &r.service,
                    &PushEvent::Failed {
                        reason: r.detail.clone(),
                    },
                );
            }
        }
    }
    if lagging {
        return compensate(p, bundle, &mut reg, routed, runs, observer).await;
    }
    let Some(fleet) = p.fleet else {
        return (report(Outcome::Deployed, &bundle.digest, runs, &reg), reg);
    };
    // The listed services are there; now the fleet, within the same time.
    let verdict = fleet.converged(bundle, deadline).await;
    let passed = verdict.is_ok();
    let seen = verdict.unwrap_or_else(|seen| seen);
    reg.fleet = Some(seen.clone());
    if passed {
        tracing::info!(fleet = %seen, "the fleet converged");
        return (report(Outcome::Deployed, &bundle.digest, runs, &reg), reg);
    }
    tracing::warn!(fleet = %seen, "the fleet did not converge; re-pointing the tag");
    let why = format!(
        "the fleet did not converge within {} ms: {}",
        p.converge_timeout.as_millis(),
        fleet_failure(&seen)
    );
    let (mut pushed, reg) = compensate(p, bundle, &mut reg, routed, runs, observer).await;
    for t in &mut pushed.targets {
        t.detail = format!("{} ({why})", t.detail);
    }
    (pushed, reg)
}

/// The first failing gate of a fleet verdict, in words.
fn fleet_failure(seen: &serde_json::Value) -> String {
    if let Some(e) = seen["error"].as_str() {
        return e.to_string();
    }
    seen["gates"]
        .as_array()
        .and_then(|g| g.iter().find(|r| r["passed"] == false))
        .map_or_else(
            || seen.to_string(),
            |r| {
                format!(
                    "gate {} ({}): {}",
                    r["gate"].as_str().unwrap_or("?"),
                    r["query"].as_str().unwrap_or(""),
                    r["detail"].as_str().unwrap_or("")
                )
            },
        )
}

/// Re-points the tag to what it held before and waits for the services that
/// took the new bundle to return to what they ran.
async fn compensate(
    p: &Publish<'_>,
    bundle: &Bundle,
    reg: &mut RegistryReport,
    routed: &[Target],
    mut runs: Vec<TargetReport>,
    observer: &dyn Observer,
) -> (PushReport, RegistryReport) {
    let policy_id = &bundle.payload.manifest.policy_id;
    let repointed = match &reg.previous_manifest_digest {
        None => Err(format!(
            "tag {} had no earlier artifact, and a registry cannot un-point a tag; \
             agents keep the new bundle until the tag is pointed at another release",
            reg.tag
        )),
        Some(prev) => p
            .registry
            .retag(&reg.tag, prev)
            .await
            .map_err(|e| format!("re-pointing tag {} to {prev} failed: {e}", reg.tag)),
    };
    if repointed.is_ok() {
        reg.repointed_back = true;
        reg.tag_now = reg.previous_manifest_digest.clone();
    }
    // Only services that took the new bundle must go back.
    let took: Vec<usize> = runs
        .iter()
        .enumerate()
        .filter(|(_, r)| r.state == TargetState::Delivered)
        .map(|(i, _)| i)
        .collect();
    let mut all_back = repointed.is_ok();
    if !took.is_empty() {
        match &repointed {
            Err(why) => {
                for &i in &took {
                    runs[i].state = TargetState::RollbackFailed;
                    runs[i].detail = why.clone();
                    observer.on_event(
                        &runs[i].service,
                        &PushEvent::RollbackFailed {
                            reason: why.clone(),
                        },
                    );
                }
            }
            Ok(()) => {
                let waits = took.iter().map(|&i| {
                    let want = runs[i].previous_digest.clone();
                    let t = &routed[i];
                    async move {
                        let back = wait_one(p, policy_id, t, want.as_deref()).await;
                        (i, want, back)
                    }
                });
                for &i in &took {
                    observer.on_event(&runs[i].service, &PushEvent::RollingBack);
                }
                for (i, want, back) in futures::future::join_all(waits).await {
                    let r = &mut runs[i];
                    match back {
                        Ok(()) => {
                            r.state = TargetState::RolledBack;
                            r.detail = format!(
                                "followed the tag back to {}",
                                want.as_deref().unwrap_or("nothing")
                            );
                            observer.on_event(&r.service, &PushEvent::RolledBack);
                        }
                        Err(actual) => {
                            all_back = false;
                            r.state = TargetState::RollbackFailed;
                            r.detail =
                                format!("the tag was re-pointed, but it still reports {actual}");
                            observer.on_event(
                                &r.service,
                                &PushEvent::RollbackFailed {
                                    reason: r.detail.clone(),
                                },
                            );
                        }
                    }
                }
            }
        }
    }
    let outcome = if all_back {
        Outcome::RolledBack
    } else {
        Outcome::NeedsAttention
    };
    (report(outcome, &bundle.digest, runs, reg), reg.clone())
}

/// Waits until every target reports `digest`; per target, `Err(what it
/// reports)` for those that did not by the deadline.
async fn wait_for(
    p: &Publish<'_>,
    policy_id: &str,
    targets: &[Target],
    digest: &str,
    timeout: Duration,
) -> Vec<Result<(), String>> {
    let waits = targets
        .iter()
        .map(|t| wait_until(p, policy_id, t, Some(digest), timeout));
    futures::future::join_all(waits).await
}

async fn wait_one(
    p: &Publish<'_>,
    policy_id: &str,
    t: &Target,
    want: Option<&str>,
) -> Result<(), String> {
    wait_until(p, policy_id, t, want, p.converge_timeout).await
}

/// Reads `GET /active/{policy_id}` until it shows `want` (`None`: nothing)
/// or `timeout` passes.
async fn wait_until(
    p: &Publish<'_>,
    policy_id: &str,
    t: &Target,
    want: Option<&str>,
    timeout: Duration,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        let seen = match push::get_active(p.http, t, policy_id, p.push).await {
            Ok(a) => {
                let digest = a.map(|a| a.digest);
                if digest.as_deref() == want {
                    return Ok(());
                }
                digest.unwrap_or_else(|| "nothing active".into())
            }
            Err(e) => format!("an error: {e}"),
        };
        if Instant::now() >= deadline {
            return Err(seen);
        }
        tokio::time::sleep(POLL).await;
    }
}

fn report(
    outcome: Outcome,
    digest: &str,
    targets: Vec<TargetReport>,
    reg: &RegistryReport,
) -> PushReport {
    PushReport {
        outcome,
        digest: digest.to_string(),
        targets,
        registry: serde_json::to_value(reg).ok(),
    }
}
