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
use crate::steps::waves::{RolloutObserver, WaveReport};

/// How a deploy is run.
pub struct DeployOptions<'a> {
    /// Stop after routing: nothing is written, pushed, tagged or audited.
    pub dry_run: bool,
    /// Told about every target's progress (the CLI draws progress bars).
    pub observer: &'a dyn Observer,
    /// `--override-freeze REASON`: an active change freeze lets this deploy
    /// through, and the reason goes into the audit log.
    pub override_freeze: Option<&'a str>,
    /// Filled step by step, so a caller can show everything a deploy that
    /// failed had done (the CLI's `--output json` failure document).
    pub so_far: Option<&'a ReportSoFar>,
    /// Told about a rollout's waves and gates.
    pub rollout_observer: &'a dyn RolloutObserver,
}

impl DeployOptions<'_> {
    /// Adds what a step just learnt to the report so far, if anyone keeps one.
    pub fn note(&self, f: impl FnOnce(&mut PartialReport)) {
        if let Some(so_far) = self.so_far {
            so_far.note(f);
        }
    }
}

impl Default for DeployOptions<'_> {
    fn default() -> Self {
        DeployOptions {
            dry_run: false,
            observer: &(),
            override_freeze: None,
            so_far: None,
            rollout_observer: &(),
        }
    }
}

/// The deploy report as far as a deploy got: [`DeployReport`]'s fields,
/// each `None` until its step has run. A failure (exit 2 to 7) carries its
/// own step's part in the error; this holds the steps before it too.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PartialReport {
    /// The policy id.
    pub policy_id: Option<String>,
    /// The policy version (known once validation has read it).
    pub version: Option<String>,
    /// The target environment.
    pub env: Option<String>,
    /// The bundle digest (known once packaged).
    pub digest: Option<String>,
    /// How it ended (only once pushed).
    pub outcome: Option<DeployOutcome>,
    /// True when this exact bundle was already active in the environment.
    pub already_active: Option<bool>,
    /// Which build is shipped.
    pub artifact: Option<crate::steps::package::Artifact>,
    /// The bundle file under `dist/`.
    pub bundle_path: Option<PathBuf>,
    /// Step 1.
    pub validation: Option<ValidationReport>,
    /// Step 3.
    pub health: Option<HealthReport>,
    /// Step 4.
    pub routes: Option<Vec<RouteDecision>>,
    /// Step 5.
    pub push: Option<PushReport>,
    /// Step 6.
    pub tag: Option<TagReport>,
}

impl From<&DeployReport> for PartialReport {
    fn from(r: &DeployReport) -> Self {
        PartialReport {
            policy_id: Some(r.policy_id.clone()),
            version: Some(r.version.clone()),
            env: Some(r.env.clone()),
            digest: Some(r.digest.clone()),
            outcome: Some(r.outcome),
            already_active: Some(r.already_active),
            artifact: Some(r.artifact.clone()),
            bundle_path: r.bundle_path.clone(),
            validation: Some(r.validation.clone()),
            health: Some(r.health.clone()),
            routes: Some(r.routes.clone()),
            push: r.push.clone(),
            tag: r.tag.clone(),
        }
    }
}

/// Where a deploy leaves its [`PartialReport`] as it goes.
#[derive(Debug, Default)]
pub struct ReportSoFar(std::sync::Mutex<PartialReport>);

/// What step 2 made for a deploy.
pub struct Packaged {
    /// The policy repository.
    pub repo: crate::vcs::Repo,
    /// The bundle to ship.
    pub bundle: pde_core::bundle::Bundle,
    /// Which build it is.
    pub artifact: crate::steps::package::Artifact,
    /// It is already the active bundle of the target environment.
    pub already_active: bool,
    /// Where it was written, if it was.
    pub path: Option<PathBuf>,
}

impl PartialReport {
    /// What step 1 found.
    pub fn validated(&mut self, validation: &ValidationReport) {
        self.version = Some(validation.version.clone());
        self.validation = Some(validation.clone());
    }

    /// What step 2 made.
    pub fn packaged(&mut self, packaged: &Packaged) {
        self.digest = Some(packaged.bundle.digest.clone());
        self.artifact = Some(packaged.artifact.clone());
        self.already_active = Some(packaged.already_active);
        self.bundle_path.clone_from(&packaged.path);
    }
}

impl ReportSoFar {
    /// Changes the report so far.
    pub fn note(&self, f: impl FnOnce(&mut PartialReport)) {
        // A poisoned lock only means a panic elsewhere; the data is still the
        // best account of the deploy there is.
        let mut guard = self.0.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut guard);
    }

    /// The report so far.
    pub fn get(&self) -> PartialReport {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// A bundle written by `pde package`.
#[derive(Debug, Clone, Serialize)]
pub struct PackageReport {
    /// The bundle digest.
    pub digest: String,
    /// Where it was written.
    pub path: PathBuf,
    /// The validation it passed.
    pub validation: ValidationReport,
    /// The bundle itself.
    #[serde(skip)]
    pub bundle: pde_core::bundle::Bundle,
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
    /// Step 4: what the routers logged at warning or error level.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub route_log: Vec<crate::plugin::PluginNotice>,
    /// Step 5 (none for a dry run).
    pub push: Option<PushReport>,
    /// Step 6: the release tag (none unless deployed).
    pub tag: Option<TagReport>,
    /// Step 5 in waves, when the environment has a rollout (a dry run
    /// shows the waves and each gate evaluated once).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutReport>,
}

/// A progressive rollout: its waves and how it ended (issue 22).
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct RolloutReport {
    /// The rollout's id in the state (none for a dry run).
    pub id: Option<i64>,
    /// `running`, `paused`, `deployed`, `rolled-back`, `aborted`,
    /// `needs-attention`, or `dry-run`.
    pub status: String,
    /// Every wave, in order.
    pub waves: Vec<WaveReport>,
    /// What each service of the rollout held before it (`None`: nothing),
    /// where it goes back to on a rollback.
    #[serde(default)]
    pub previous: std::collections::BTreeMap<String, Option<String>>,
    /// Why it stopped: the wave, the gate, the query and the value seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub halted: Option<serde_json::Value>,
    /// Promotions, aborts and resumptions: `{action, by, at}`.
    #[serde(default)]
    pub log: Vec<serde_json::Value>,
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
    /// OCI delivery: what was done in the registry (the tag re-pointed, the
    /// manifest digests before and after), as a deploy's `push.registry`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub registry: Option<serde_json::Value>,
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
