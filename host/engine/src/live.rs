//! `pde status --live`: what the services say they run, against what pde's
//! state says they should.
//!
//! `pde status` reads only the state database: what pde last pushed or
//! confirmed. Services change behind its back (a rollback by hand, a deploy
//! from another tool, a restored disk, a service that is down), so this asks
//! every service of the environment its `GET /active` (push protocol v2) at
//! once and compares, per service and policy. The expectation is the
//! per-service record (`service_active`), not the environment's release,
//! because a policy is only routed to some services.
//!
//! Drift is anything a person must look at: another digest, a policy
//! missing, a service not answering, or a record pde itself marked unknown
//! after a failed compensation. A policy a service runs that pde has no
//! record of there is shown as information only: services may run policies
//! from other workspaces.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::engine::Engine;
use crate::error::Error;
use crate::http::{self, Target};
use crate::state::ActiveEntry;
use crate::steps::push::ActiveRecord;

/// Everything `pde status --live` found.
#[derive(Debug, Clone, Serialize)]
pub struct LiveReport {
    /// The environments compared, sorted.
    pub envs: Vec<String>,
    /// One entry per service of those environments, by environment, then
    /// in pde.toml's order.
    pub services: Vec<LiveService>,
    /// How many findings are drift (see [`LiveState::is_drift`]).
    pub drift: usize,
}

impl LiveReport {
    /// True when nothing drifted.
    pub fn in_sync(&self) -> bool {
        self.drift == 0
    }
}

/// One service's answer and its comparison.
#[derive(Debug, Clone, Serialize)]
pub struct LiveService {
    /// The environment.
    pub env: String,
    /// The service name.
    pub service: String,
    /// Its base URL.
    pub url: String,
    /// Why `GET /active` got no usable answer; `None` when it did.
    pub error: Option<String>,
    /// Per policy pde expects there or the service runs, sorted by id.
    pub policies: Vec<LivePolicy>,
}

/// One policy on one service.
#[derive(Debug, Clone, Serialize)]
pub struct LivePolicy {
    /// The policy.
    pub policy_id: String,
    /// The verdict.
    pub state: LiveState,
    /// What pde's state says the service runs (none: no record there).
    pub expected: Option<Running>,
    /// What the service says it runs (none: not active there, or no answer).
    pub actual: Option<Running>,
}

/// A version and digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Running {
    /// Semver version; `None` when pde recorded the digest as unknown.
    pub version: Option<String>,
    /// `sha256:<hex>`; `None` when unknown.
    pub digest: Option<String>,
}

/// How one policy on one service compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LiveState {
    /// The service runs what pde expects.
    InSync,
    /// The service runs another digest of the policy.
    OtherDigest,
    /// pde expects the policy there; the service does not run it.
    Missing,
    /// The service did not answer, so what it runs is unknown.
    NoAnswer,
    /// pde's own record says "unknown" (a compensation failed there).
    UnknownRecord,
    /// The service runs a policy pde has no record of there (information).
    Unrecorded,
}

impl LiveState {
    /// True for findings that need a person; `in-sync` and `unrecorded`
    /// are not drift.
    pub fn is_drift(self) -> bool {
        !matches!(self, LiveState::InSync | LiveState::Unrecorded)
    }
}

/// The body of a v2 `GET /active`.
#[derive(Deserialize)]
struct ActiveList {
    policies: BTreeMap<String, ActiveRecord>,
}

impl Engine {
    /// `pde status --live [--env ENV]`: asks every service of `env` (or of
    /// every environment) for `GET /active` and compares it with the state.
    pub async fn live_status(&self, env: Option<&str>) -> Result<LiveReport, Error> {
        let envs: Vec<String> = match env {
            Some(name) => {
                self.environment(name)?;
                vec![name.to_string()]
            }
            None => self.config.environments.keys().cloned().collect(),
        };
        let entries = self.state.status(env)?;
        let mut asks = Vec::new();
        for name in &envs {
            for service in &self.environment(name)?.services {
                let target = self.target(service)?;
                let expected = expected_on(&entries, name, &service.name);
                asks.push(async move {
                    let answer =
                        read_all(&self.http, &target, self.config.push.retry_policy()).await;
                    compare(name, &target, expected, answer)
                });
            }
        }
        let services = futures::future::join_all(asks).await;
        let drift = services
            .iter()
            .map(|s| {
                let policies = s.policies.iter().filter(|p| p.state.is_drift()).count();
                // A silent service is drift even when pde expects nothing there.
                policies.max(usize::from(s.error.is_some()))
            })
            .sum();
        Ok(LiveReport {
            envs,
            services,
            drift,
        })
    }
}

/// What the state says `service` of `env` runs, by policy.
fn expected_on(entries: &[ActiveEntry], env: &str, service: &str) -> BTreeMap<String, Running> {
    entries
        .iter()
        .filter(|e| e.env == env)
        .filter_map(|e| {
            let h = e.services.iter().find(|h| h.service == service)?;
            Some((
                e.policy_id.clone(),
                Running {
                    version: h.version.clone(),
                    digest: h.digest.clone(),
                },
            ))
        })
        .collect()
}

/// `GET {url}/active`, retried as every request to a service is.
async fn read_all(
    client: &reqwest::Client,
    t: &Target,
    policy: pde_core::retry::RetryPolicy,
) -> Result<BTreeMap<String, ActiveRecord>, String> {
    const WHAT: &str = "GET /active";
    let url = t.endpoint("/active");
    let (_, answer) = http::exchange(t, WHAT, policy, &(), || client.get(&url)).await;
    let answer = answer.map_err(|e| match e {
        http::HttpError::Transport { reason, .. } => reason,
        http::HttpError::Status { status, body, .. } => format!("HTTP {status}: {body}"),
        other => other.to_string(),
    })?;
    if !answer.status.is_success() {
        return Err(format!("HTTP {}: {}", answer.status, answer.excerpt()));
    }
    serde_json::from_slice::<ActiveList>(&answer.body)
        .map(|l| l.policies)
        .map_err(|e| format!("not a push protocol v2 answer ({{\"policies\": {{…}}}}): {e}"))
}

fn compare(
    env: &str,
    t: &Target,
    expected: BTreeMap<String, Running>,
    answer: Result<BTreeMap<String, ActiveRecord>, String>,
) -> LiveService {
    let (actual, error) = match answer {
        Ok(a) => (Some(a), None),
        Err(e) => (None, Some(e)),
    };
    let ids: BTreeSet<&String> = expected
        .keys()
        .chain(actual.iter().flat_map(|a| a.keys()))
        .collect();
    let policies = ids
        .into_iter()
        .map(|id| {
            let want = expected.get(id);
            let have = actual.as_ref().and_then(|a| a.get(id)).map(|r| Running {
                version: Some(r.version.clone()),
                digest: Some(r.digest.clone()),
            });
            let state = match (want, &have) {
                (Some(_), _) if actual.is_none() => LiveState::NoAnswer,
                (Some(w), _) if w.digest.is_none() => LiveState::UnknownRecord,
                (Some(_), None) => LiveState::Missing,
                (Some(w), Some(h)) if w.digest == h.digest => LiveState::InSync,
                (Some(_), Some(_)) => LiveState::OtherDigest,
                (None, _) => LiveState::Unrecorded,
            };
            LivePolicy {
                policy_id: id.clone(),
                state,
                expected: want.cloned(),
                actual: have,
            }
        })
        .collect();
    LiveService {
        env: env.to_string(),
        service: t.service.clone(),
        url: t.url.clone(),
        error,
        policies,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn running(d: &str) -> Running {
        Running {
            version: Some("1.0.0".into()),
            digest: Some(d.into()),
        }
    }

    fn record(d: &str) -> ActiveRecord {
        ActiveRecord {
            digest: d.into(),
            version: "1.0.0".into(),
            policy_id: String::new(),
            env: None,
            activated_at: String::new(),
            hook_failed: None,
        }
    }

    #[test]
    fn each_kind_of_difference_has_its_verdict() {
        let t = Target::new("A", "http://127.0.0.1:1", None);
        let expected: BTreeMap<String, Running> = [
            ("same".to_string(), running("sha256:a")),
            ("moved".to_string(), running("sha256:b")),
            ("gone".to_string(), running("sha256:c")),
            (
                "lost".to_string(),
                Running {
                    version: None,
                    digest: None,
                },
            ),
        ]
        .into();
        let actual: BTreeMap<String, ActiveRecord> = [
            ("same".to_string(), record("sha256:a")),
            ("moved".to_string(), record("sha256:x")),
            ("lost".to_string(), record("sha256:d")),
            ("foreign".to_string(), record("sha256:e")),
        ]
        .into();
        let s = compare("prod", &t, expected.clone(), Ok(actual));
        let verdicts: Vec<(&str, LiveState)> = s
            .policies
            .iter()
            .map(|p| (p.policy_id.as_str(), p.state))
            .collect();
        assert_eq!(
            verdicts,
            [
                ("foreign", LiveState::Unrecorded),
                ("gone", LiveState::Missing),
                ("lost", LiveState::UnknownRecord),
                ("moved", LiveState::OtherDigest),
                ("same", LiveState::InSync),
            ]
        );
        assert!(!LiveState::Unrecorded.is_drift() && !LiveState::InSync.is_drift());

        let s = compare("prod", &t, expected, Err("connection failed".into()));
        assert!(s.policies.iter().all(|p| p.state == LiveState::NoAnswer));
        assert_eq!(s.error.as_deref(), Some("connection failed"));
    }
}
