//! What the engine's operations report: the deploy report, step by step,
//! and the rollback report. Plain data, below everything that produces or
//! carries it (the pipeline, the errors, the CLI's printer).

use std::path::PathBuf;

use serde::Serialize;

use crate::steps::envcheck::HealthReport;
use crate::steps::push::{Observer, Outcome, PushReport};
use crate::steps::route::RouteDecision;
use crate::steps::tag::TagReport;
use crate::steps::validate::ValidationReport;

/// How a deploy is run.
pub struct DeployOptions<'a> {
    /// Stop after routing: nothing is written, pushed, tagged or audited.
    pub dry_run: bool,
    /// Told about every target's progress (the CLI draws progress bars).
    pub observer: &'a dyn Observer,
    /// `--override-freeze REASON`: an active change freeze lets this deploy
    /// through, and the reason goes into the audit log.
    pub override_freeze: Option<&'a str>,
}

impl Default for DeployOptions<'_> {
    fn default() -> Self {
        DeployOptions {
            dry_run: false,
            observer: &(),
            override_freeze: None,
        }
    }
}

/// How a deploy ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeployOutcome {
    /// Every routed service runs the new bundle, verified; the release is tagged.
    Deployed,
    /// A target failed; every target that took the bundle was sent back.
    RolledBack,
    /// A target failed and sending some target back failed too.
    NeedsAttention,
    /// `--dry-run`: validated, packaged, checked and routed; nothing pushed.
    DryRun,
}

impl std::fmt::Display for DeployOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(match self {
            DeployOutcome::Deployed => "deployed",
            DeployOutcome::RolledBack => "rolled-back",
            DeployOutcome::NeedsAttention => "needs-attention",
            DeployOutcome::DryRun => "dry-run",
        })
    }
}

/// Everything a deploy did, step by step.
#[derive(Debug, Clone, Serialize)]
pub struct DeployReport {
    /// The policy id.
    pub policy_id: String,
    /// The policy version.
    pub version: String,
    /// The target environment.
    pub env: String,
    /// The bundle digest.
    pub digest: String,
    /// How it ended.
    pub outcome: DeployOutcome,
    /// True when this exact bundle was already active in the environment.
    pub already_active: bool,
    /// Which build is shipped: this run's, or the one the promotion source
    /// (or this environment) already runs.
    pub artifact: crate::steps::package::Artifact,
    /// The bundle file under `dist/` (none for a dry run).
    pub bundle_path: Option<PathBuf>,
    /// Step 1.
    pub validation: ValidationReport,
    /// Step 3.
    pub health: HealthReport,
    /// Step 4.
    pub routes: Vec<RouteDecision>,
    /// Step 5 (none for a dry run).
    pub push: Option<PushReport>,
    /// Step 6: the release tag (none unless deployed).
    pub tag: Option<TagReport>,
}

impl From<Outcome> for DeployOutcome {
    fn from(o: Outcome) -> Self {
        match o {
            Outcome::Deployed => DeployOutcome::Deployed,
            Outcome::RolledBack => DeployOutcome::RolledBack,
            Outcome::NeedsAttention => DeployOutcome::NeedsAttention,
        }
    }
}

/// What a rollback did.
#[derive(Debug, Clone, Serialize)]
pub struct RollbackReport {
    /// The policy.
    pub policy_id: String,
    /// The environment.
    pub env: String,
    /// The version that was active.
    pub from_version: String,
    /// The digest that was active.
    pub from_digest: String,
    /// The version now active.
    pub to_version: String,
    /// The digest now active.
    pub to_digest: String,
    /// Per service: `rolled-back` or the error.
    pub targets: Vec<RollbackTarget>,
}

/// One service's part in a rollback.
#[derive(Debug, Clone, Serialize)]
pub struct RollbackTarget {
    /// The service.
    pub service: String,
    /// True when it now reports the earlier digest as active.
    pub ok: bool,
    /// What happened.
    pub detail: String,
}
