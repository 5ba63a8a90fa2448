//! `GET /metrics`: the agent's counters in the Prometheus text format, for
//! the monitoring that watches the services the agent sits beside.
//!
//! Counters move as requests are handled (deploys by outcome, rollbacks,
//! rejections by reason, hook failures). What is active is not counted but
//! read from the store at scrape time, so the gauges can never drift from the
//! state on disk.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::store::Store;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Active {
    policy_id: String,
    version: String,
    /// The bundle's digest: "N agents on this release" is a count over it
    /// (docs/agent.md, "Watching a large fleet converge in Prometheus").
    digest: String,
    /// The environment of the deploy that activated it (empty when none
    /// was named, after a rollback to a bundle deployed without one).
    env: String,
}

/// The agent's metrics, shared by the handlers.
pub struct Metrics {
    registry: Registry,
    deploys: Family<Outcome, Counter>,
    rollbacks: Family<Outcome, Counter>,
    rejected: Family<Reason, Counter>,
    hook_failures: Counter,
    active: Family<Active, Gauge>,
    last_activation: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("pde_agent");
        let deploys = Family::<Outcome, Counter>::default();
        let rollbacks = Family::<Outcome, Counter>::default();
        let rejected = Family::<Reason, Counter>::default();
        let hook_failures = Counter::default();
        let active = Family::<Active, Gauge>::default();
        let last_activation = Gauge::default();
        registry.register(
            "deploys",
            "Accepted deploy requests by outcome (activated, unchanged, already-active)",
            deploys.clone(),
        );
        registry.register(
            "rollbacks",
            "Rollback requests that changed what is active, by outcome",
            rollbacks.clone(),
        );
        registry.register(
            "rejected_requests",
            "Requests refused, by reason (signature, digest, idempotency_conflict, size, auth, malformed, rollback_proof, fence, other)",
            rejected.clone(),
        );
        registry.register(
            "hook_failures",
            "Activation hooks that failed",
            hook_failures.clone(),
        );
        registry.register(
            "active_policy",
            "1 for each active policy, labelled with its id, version, bundle digest and environment",
            active.clone(),
        );
        registry.register(
            "last_activation_timestamp_seconds",
            "Unix time of the newest activation of any policy",
            last_activation.clone(),
        );
        Metrics {
            registry,
            deploys,
            rollbacks,
            rejected,
            hook_failures,
            active,
            last_activation,
        }
    }
}

impl Metrics {
    /// A deploy request ended with `outcome`.
    pub fn deploy(&self, outcome: &str) {
        self.deploys
            .get_or_create(&Outcome {
                outcome: outcome.to_string(),
            })
            .inc();
    }

    /// A rollback request ended with `outcome`.
    pub fn rollback(&self, outcome: &str) {
        self.rollbacks
            .get_or_create(&Outcome {
                outcome: outcome.to_string(),
            })
            .inc();
    }

    /// A request was refused with the error code `code`.
    pub fn rejected(&self, code: &str) {
        let reason = match code {
            "signature_rejected"
            | "rollback_unsigned"
            | "rollback_signature_rejected"
            | "fence_signature_rejected" => "signature",
            "fence_stale" | "fence_ahead" => "fence",
            "proof_expired" | "proof_replayed" | "proof_mismatch" => "rollback_proof",
            "digest_mismatch" => "digest",
            "attestation_rejected" => "attestation",
            "idempotency_conflict" => "idempotency_conflict",
            "payload_too_large" => "size",
            "unauthorized" => "auth",
            "malformed_request"
            | "malformed_bundle"
            | "unsupported_format"
            | "unreadable_body"
            | "missing_idempotency_key"
            | "bad_idempotency_key"
            | "bad_env"
            | "malformed_proof" => "malformed",
            _ => "other",
        };
        self.rejected
            .get_or_create(&Reason {
                reason: reason.to_string(),
            })
            .inc();
    }

    /// An activation hook failed.
    pub fn hook_failed(&self) {
        self.hook_failures.inc();
    }

    /// The text exposition, with the active-policy gauges read from `store`.
    pub fn render(&self, store: &Store) -> String {
        self.active.clear();
        let mut newest: Option<time::OffsetDateTime> = None;
        for (policy_id, record) in store.active_all() {
            self.active
                .get_or_create(&Active {
                    policy_id: policy_id.to_string(),
                    version: record.version.clone(),
                    digest: record.digest.clone(),
                    env: record.env.clone().unwrap_or_default(),
                })
                .set(1);
            let at = time::OffsetDateTime::parse(
                &record.activated_at,
                &time::format_description::well_known::Rfc3339,
            );
            if let Ok(at) = at {
                newest = Some(newest.map_or(at, |n| n.max(at)));
            }
        }
        self.last_activation
            .set(newest.map_or(0, |t| t.unix_timestamp()));
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Shared handle.
pub type Shared = Arc<Metrics>;
