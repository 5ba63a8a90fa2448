//! The state's domain types: what a deployment, an active version, a
//! service's holding and a lease are, whichever backend stores them.

use serde::{Deserialize, Serialize};

/// How a recorded deployment (or rollback) ended. Stored as its kebab-case
/// name, the same word `--output json` shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RecordOutcome {
    /// Every routed service runs the bundle.
    Deployed,
    /// A push failed and every target was sent back.
    RolledBack,
    /// A push failed and some compensation failed too.
    NeedsAttention,
    /// `pde rollback` returned every holder to this bundle.
    Rollback,
    /// `pde rollback` failed on some holder.
    RollbackFailed,
    /// Recorded when a push (or rollback) starts; replaced by its outcome
    /// when it ends. Still there while nobody holds the lock: the process
    /// died mid-push, which reads as [`RecordOutcome::Interrupted`].
    InProgress,
    /// The deploy or rollback was killed mid-way; the next one of that
    /// policy and environment settles it.
    Interrupted,
}

impl RecordOutcome {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            RecordOutcome::Deployed => "deployed",
            RecordOutcome::RolledBack => "rolled-back",
            RecordOutcome::NeedsAttention => "needs-attention",
            RecordOutcome::Rollback => "rollback",
            RecordOutcome::RollbackFailed => "rollback-failed",
            RecordOutcome::InProgress => "in-progress",
            RecordOutcome::Interrupted => "interrupted",
        }
    }

    /// Whether the environment ran this bundle afterwards (a deploy or a
    /// rollback that completed).
    pub fn took_effect(self) -> bool {
        matches!(self, RecordOutcome::Deployed | RecordOutcome::Rollback)
    }
}

impl std::fmt::Display for RecordOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

impl RecordOutcome {
    /// The outcome stored as `text`, if it names one.
    pub fn parse(text: &str) -> Option<RecordOutcome> {
        [
            RecordOutcome::Deployed,
            RecordOutcome::RolledBack,
            RecordOutcome::NeedsAttention,
            RecordOutcome::Rollback,
            RecordOutcome::RollbackFailed,
            RecordOutcome::InProgress,
            RecordOutcome::Interrupted,
        ]
        .into_iter()
        .find(|o| o.as_str() == text)
    }
}

/// The version active for one policy in one environment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Active {
    /// Semver version.
    pub version: String,
    /// Bundle digest, `sha256:<hex>`.
    pub digest: String,
    /// When it became active (RFC 3339 UTC).
    pub deployed_at: String,
}

/// One row of `pde status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActiveEntry {
    /// The policy.
    pub policy_id: String,
    /// The environment.
    pub env: String,
    /// Semver version.
    pub version: String,
    /// Bundle digest.
    pub digest: String,
    /// When it became active (RFC 3339 UTC).
    pub deployed_at: String,
    /// What each service of the environment that took part runs for this
    /// policy, by service name.
    #[serde(default)]
    pub services: Vec<ServiceHolding>,
    /// A deploy or rollback of this policy here that was killed mid-way;
    /// `services` is what each target was last known to run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interrupted: Option<Box<DeploymentRecord>>,
}

/// What one service runs for one policy in one environment, as pde last saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceHolding {
    /// Service name.
    pub service: String,
    /// The version it runs; `None` when unknown (see `digest`).
    pub version: Option<String>,
    /// The digest it runs; `None` when unknown: a compensation or rollback
    /// failed there, and someone must look.
    pub digest: Option<String>,
    /// When pde last changed or confirmed it (RFC 3339 UTC).
    pub updated_at: String,
}

/// One deployment attempt, as recorded after it finished.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeploymentRecord {
    /// Row id; `None` before [`StateStore::record`].
    pub id: Option<i64>,
    /// The policy.
    pub policy_id: String,
    /// The environment.
    pub env: String,
    /// Semver version deployed.
    pub version: String,
    /// Bundle digest.
    pub digest: String,
    /// `deployed`, `rolled-back`, `needs-attention` or `failed`.
    pub outcome: RecordOutcome,
    /// RFC 3339 UTC.
    pub started_at: String,
    /// RFC 3339 UTC.
    pub finished_at: String,
    /// Who ran it.
    pub actor: String,
    /// Per-service results, in the order given.
    pub targets: Vec<TargetRecord>,
}

/// What happened at one service during a deployment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetRecord {
    /// Service name.
    pub service: String,
    /// Per-target outcome.
    pub outcome: String,
    /// The digest the service had before, if any.
    pub previous_digest: Option<String>,
    /// Human detail (status code, error), never a secret.
    pub detail: String,
}

/// Who holds (or last held) the deploy lock of a policy and environment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The policy.
    pub policy_id: String,
    /// The environment.
    pub env: String,
    /// Who ran the deploy ([`crate::audit::default_actor`]); with
    /// PostgreSQL followed by the database role that took the lock:
    /// `ana (database role pde_ci)`.
    pub holder: String,
    /// The machine it ran on.
    pub host: String,
    /// Its process id there.
    pub pid: i64,
    /// When it took the lock (RFC 3339 UTC).
    pub since: String,
    /// True when no live process holds the lock any more: the holder died
    /// and left its lease behind.
    pub stale: bool,
}

impl Lease {
    /// `ana on host-1 (pid 42) since 2026-…`, for messages.
    pub fn describe(&self) -> String {
        format!(
            "held by {} on {} (pid {}) since {}",
            self.holder, self.host, self.pid, self.since
        )
    }
}

/// Everything a state holds, table by table, as it is stored: what
/// `pde state migrate` copies from one backend into another
/// ([`super::StateBackend::dump`], [`super::StateBackend::import`]).
///
/// The `active` rows are the stored ones, not [`super::StateBackend::status`]:
/// a deploy killed before anything was active leaves no `active` row, only
/// an in-progress record, and must not become an active version with no
/// digest on the other side.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Dump {
    /// Every deployment with its targets, oldest first, with their ids.
    pub deployments: Vec<DeploymentRecord>,
    /// The `active` rows (their `services` and `interrupted` left empty).
    pub active: Vec<ActiveEntry>,
    /// The `service_active` rows: policy, environment and what the service
    /// holds there, including services of a policy with no active row.
    pub services: Vec<(String, String, ServiceHolding)>,
    /// Every progressive rollout, oldest first, with its id: a paused or
    /// interrupted one is promoted or resumed by the id people were shown.
    pub rollouts: Vec<RolloutRecord>,
}

/// A progressive rollout as the state keeps it (issue 22).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutRecord {
    /// Its id (`None` before it is stored).
    pub id: Option<i64>,
    /// The policy.
    pub policy_id: String,
    /// The environment.
    pub env: String,
    /// The version rolled out.
    pub version: String,
    /// The bundle's digest.
    pub digest: String,
    /// `running`, `paused`, `deployed`, `rolled-back`, `aborted` or
    /// `needs-attention`.
    pub status: String,
    /// A person's pending request to the process running it: `promote` or
    /// `abort`.
    pub control: Option<String>,
    /// The rollout's report: waves, gate results, what each service held.
    pub doc: serde_json::Value,
    /// RFC 3339 start.
    pub started_at: String,
    /// RFC 3339 time of the last change.
    pub updated_at: String,
    /// Who started it.
    pub actor: String,
}

impl RolloutRecord {
    /// Whether it has not ended: `running` or `paused`.
    pub fn open(&self) -> bool {
        matches!(self.status.as_str(), "running" | "paused")
    }
}
