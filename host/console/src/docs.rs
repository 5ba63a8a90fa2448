//! The documents behind every page: what the console shows, as data.
//!
//! Each is read through the engine's own queries (`status`, `history`,
//! `live_status`, `verify_audit`, the plugin listing), never through SQL of
//! its own, so the console says what `pde status`, `pde history`, `pde audit
//! verify` and `pde plugin list` say. The JSON the CLI prints with `--output
//! json` is built here too ([`status_json`], [`history_json`],
//! [`plugins_json`]), so the console's `/api/...` and the CLI cannot drift
//! apart.

use std::collections::{BTreeMap, BTreeSet};

use pde::Engine;
use pde::audit::{AuditError, AuditRecord, VerifyReport};
use pde::live::{LiveReport, LiveState};
use pde::state::{ActiveEntry, DeploymentRecord, Lease};
use serde::Serialize;
use serde_json::{Value, json};

/// The schema of each entry of `pde status --output json`.
pub const STATUS_SCHEMA: &str = "pde.status/v1";
/// The schema of `pde status --live --output json`.
pub const LIVE_SCHEMA: &str = "pde.status-live/v1";
/// The schema of the overview document (`GET /api/overview`).
pub const OVERVIEW_SCHEMA: &str = "pde.console.overview/v1";
/// The schema of the audit page's document (`GET /api/audit`).
pub const AUDIT_SCHEMA: &str = "pde.console.audit/v1";
/// The schema of a policy page's document (`GET /api/policies/{id}`).
pub const POLICY_SCHEMA: &str = "pde.console.policy/v1";
/// The schema of the timeline document (`GET /api/timeline`).
pub const TIMELINE_SCHEMA: &str = "pde.console.timeline/v1";

/// `pde status --output json`: the list scripts read, each entry tagged
/// with its schema (added beside the fields, which are never renamed).
pub fn status_json(entries: &[ActiveEntry]) -> Vec<Value> {
    entries
        .iter()
        .map(|e| {
            let mut v = serde_json::to_value(e).unwrap_or_default();
            v["schema"] = STATUS_SCHEMA.into();
            v
        })
        .collect()
}

/// `pde status --live --output json`.
pub fn live_json(report: &LiveReport) -> Value {
    let mut v = serde_json::to_value(report).unwrap_or_default();
    v["schema"] = LIVE_SCHEMA.into();
    v
}

/// One entry of `pde history`: a deployment, or a deploy refused before any
/// push (which leaves only audit records).
#[derive(Debug, Clone)]
pub enum HistoryEntry {
    /// A recorded deployment or rollback.
    Deployment(DeploymentRecord),
    /// A deploy refused before anything was pushed.
    Refused(pde::history::Refused),
}

impl HistoryEntry {
    /// When it ended (RFC 3339).
    pub fn finished_at(&self) -> &str {
        match self {
            HistoryEntry::Deployment(d) => &d.finished_at,
            HistoryEntry::Refused(r) => &r.finished_at,
        }
    }

    /// The environment.
    pub fn env(&self) -> &str {
        match self {
            HistoryEntry::Deployment(d) => &d.env,
            HistoryEntry::Refused(r) => &r.env,
        }
    }

    /// Its `pde history --output json` form: the deployment fields, so one
    /// list reads the same, plus why for a refusal.
    pub fn json(&self) -> Value {
        match self {
            HistoryEntry::Deployment(d) => serde_json::to_value(d).unwrap_or_default(),
            HistoryEntry::Refused(r) => json!({
                "id": null,
                "policy_id": r.policy_id,
                "env": r.env,
                "version": r.version,
                "digest": r.digest,
                "outcome": "refused",
                "started_at": r.started_at,
                "finished_at": r.finished_at,
                "actor": r.actor,
                "targets": [],
                "reason": r.reason,
                "exit_code": r.exit_code,
            }),
        }
    }
}

/// `pde history ID`: the deployments from the state and the refused
/// deploys from the audit log (`records`, oldest first), newest first.
pub fn history(
    engine: &Engine,
    policy_id: &str,
    records: &[AuditRecord],
) -> Result<Vec<HistoryEntry>, pde::Error> {
    let deployments = engine.state().history_checked(policy_id)?;
    let refused = pde::history::refused(records, policy_id);
    let mut entries: Vec<HistoryEntry> = deployments
        .into_iter()
        .map(HistoryEntry::Deployment)
        .collect();
    entries.extend(refused.into_iter().map(HistoryEntry::Refused));
    // Newest first, as the deployments already were; a stable sort keeps
    // their order among equal times.
    entries.sort_by_key(|e| std::cmp::Reverse(seconds(e.finished_at())));
    Ok(entries)
}

/// `pde history ID --output json`.
pub fn history_json(entries: &[HistoryEntry]) -> Vec<Value> {
    entries.iter().map(HistoryEntry::json).collect()
}

/// One progressive rollout of a policy (issue 22): what `pde history`
/// lists wave by wave, and the policy page shows beside its deployments.
#[derive(Debug, Clone, Serialize)]
pub struct RolloutView {
    /// Its id in the state.
    pub id: Option<i64>,
    /// The environment.
    pub env: String,
    /// The version rolled out.
    pub version: String,
    /// The bundle's digest.
    pub digest: String,
    /// `running`, `paused`, `deployed`, `rolled-back`, `aborted` or
    /// `needs-attention`.
    pub status: String,
    /// Who started it.
    pub actor: String,
    /// When it started (RFC 3339).
    pub started_at: String,
    /// When it last changed (RFC 3339).
    pub updated_at: String,
    /// Its waves and every gate result; `None` when the stored report
    /// cannot be read (then `error` says why).
    pub report: Option<pde::report::RolloutReport>,
    /// Why the stored report could not be read.
    pub error: Option<String>,
}

/// The rollouts of a policy (in `env`, or every environment), newest
/// first, as the state keeps them.
pub fn rollouts(
    engine: &Engine,
    policy_id: &str,
    env: Option<&str>,
) -> Result<Vec<RolloutView>, pde::Error> {
    Ok(engine
        .state()
        .rollouts(policy_id, env)?
        .into_iter()
        .map(|r| {
            let (report, error) = match serde_json::from_value(r.doc) {
                Ok(report) => (Some(report), None),
                Err(e) => (
                    None,
                    Some(format!("the stored rollout report is unreadable: {e}")),
                ),
            };
            RolloutView {
                id: r.id,
                env: r.env,
                version: r.version,
                digest: r.digest,
                status: r.status,
                actor: r.actor,
                started_at: r.started_at,
                updated_at: r.updated_at,
                report,
                error,
            }
        })
        .collect())
}

pub use pde_core::clock::whole_seconds as seconds;

/// What the live read of the agents last found, and when.
#[derive(Debug, Clone, Serialize)]
pub struct LiveSnapshot {
    /// When the read finished (RFC 3339 UTC).
    pub read_at: String,
    /// How long it took, in milliseconds.
    pub took_ms: u64,
    /// The comparison, in `pde status --live --output json` form.
    pub report: Option<LiveReport>,
    /// Why there is none (the read timed out or failed).
    pub error: Option<String>,
}

/// The overview: environments × policies.
#[derive(Debug, Clone, Serialize)]
pub struct Overview {
    /// [`OVERVIEW_SCHEMA`].
    pub schema: &'static str,
    /// When the state was read.
    pub read_at: String,
    /// The environments of `pde.toml` (or the one asked for).
    pub envs: Vec<String>,
    /// One row per policy.
    pub policies: Vec<PolicyRow>,
    /// Deploy locks held now, and leases left by deploys that died.
    pub leases: Vec<Lease>,
    /// Change freezes in force now, by environment.
    pub freezes: BTreeMap<String, Vec<String>>,
    /// The last live read of the agents, if one was made.
    pub live: Option<LiveSnapshot>,
    /// The same entries `pde status --output json` prints.
    pub status: Vec<Value>,
}

/// One policy across the environments.
#[derive(Debug, Clone, Serialize)]
pub struct PolicyRow {
    /// The policy.
    pub policy_id: String,
    /// One cell per environment of [`Overview::envs`], in that order.
    pub cells: Vec<Cell>,
}

/// One policy in one environment.
#[derive(Debug, Clone, Serialize)]
pub struct Cell {
    /// The environment.
    pub env: String,
    /// The version pde released there; `None`: never deployed.
    pub version: Option<String>,
    /// Its bundle digest.
    pub digest: Option<String>,
    /// When it became active.
    pub deployed_at: Option<String>,
    /// What each service of the environment runs for this policy.
    pub services: Vec<ServiceCell>,
    /// What a person must look at here, in words.
    pub flags: Vec<Flag>,
}

/// What one service runs for one policy.
#[derive(Debug, Clone, Serialize)]
pub struct ServiceCell {
    /// The service.
    pub service: String,
    /// The version pde last pushed or confirmed there.
    pub version: Option<String>,
    /// Its digest.
    pub digest: Option<String>,
    /// `in-sync`, `differs` (another digest than the release), `unknown`
    /// (a rollback failed there) or `not-routed`.
    pub state: &'static str,
    /// The live verdict (`in-sync`, `other-digest`, `missing`, …), when the
    /// agents were read.
    pub live: Option<LiveState>,
    /// The version the service said it runs, when read.
    pub live_version: Option<String>,
}

/// A condition flagged in place.
#[derive(Debug, Clone, Serialize)]
pub struct Flag {
    /// `drift`, `missing`, `no-answer`, `interrupted`, `locked`,
    /// `stale-lease` or `freeze`.
    pub kind: &'static str,
    /// What it means, for people.
    pub text: String,
}

/// Builds the overview from the state (and the last live read, if any).
pub fn overview(
    engine: &Engine,
    env: Option<&str>,
    live: Option<LiveSnapshot>,
) -> Result<Overview, pde::Error> {
    let entries = engine.state().status(env)?;
    let leases = engine.state().leases()?;
    let config = engine.config();
    let envs: Vec<String> = match env {
        Some(e) => vec![e.to_string()],
        None => config.environments.keys().cloned().collect(),
    };
    let now = jiff_now();
    let mut freezes = BTreeMap::new();
    for name in &envs {
        if let Ok(e) = engine.environment(name) {
            let f = e.freezes_in_force(now);
            if !f.is_empty() {
                freezes.insert(name.clone(), f);
            }
        }
    }
    let mut ids: BTreeSet<String> = entries.iter().map(|e| e.policy_id.clone()).collect();
    ids.extend(engine.policies().ids().unwrap_or_default());
    let by_key: BTreeMap<(&str, &str), &ActiveEntry> = entries
        .iter()
        .map(|e| ((e.policy_id.as_str(), e.env.as_str()), e))
        .collect();
    let live_index = live
        .as_ref()
        .and_then(|l| l.report.as_ref())
        .map(live_by_key)
        .unwrap_or_default();
    let mut policies = Vec::with_capacity(ids.len());
    for id in &ids {
        let mut cells = Vec::with_capacity(envs.len());
        for env in &envs {
            let entry = by_key.get(&(id.as_str(), env.as_str())).copied();
            let services: Vec<String> = engine
                .environment(env)
                .map(|e| e.services.iter().map(|s| s.name.clone()).collect())
                .unwrap_or_default();
            cells.push(cell(
                id,
                env,
                entry,
                &services,
                &live_index,
                &leases,
                freezes.get(env),
            ));
        }
        policies.push(PolicyRow {
            policy_id: id.clone(),
            cells,
        });
    }
    Ok(Overview {
        schema: OVERVIEW_SCHEMA,
        read_at: pde_core::clock::now_rfc3339(),
        envs,
        policies,
        leases,
        freezes,
        live,
        status: status_json(&entries),
    })
}

type LiveIndex = BTreeMap<(String, String, String), (LiveState, Option<String>)>;

/// `(env, service, policy) → (verdict, version the service runs)`, and
/// `(env, service, "")` for a service that did not answer.
fn live_by_key(r: &LiveReport) -> LiveIndex {
    let mut out = BTreeMap::new();
    for s in &r.services {
        if s.error.is_some() {
            out.insert(
                (s.env.clone(), s.service.clone(), String::new()),
                (LiveState::NoAnswer, None),
            );
        }
        for p in &s.policies {
            out.insert(
                (s.env.clone(), s.service.clone(), p.policy_id.clone()),
                (p.state, p.actual.as_ref().and_then(|a| a.version.clone())),
            );
        }
    }
    out
}

fn cell(
    id: &str,
    env: &str,
    entry: Option<&ActiveEntry>,
    services: &[String],
    live: &LiveIndex,
    leases: &[Lease],
    freezes: Option<&Vec<String>>,
) -> Cell {
    let mut flags = Vec::new();
    let release = entry.map(|e| e.digest.as_str()).filter(|d| !d.is_empty());
    let mut cells = Vec::new();
    for name in services {
        let holding = entry.and_then(|e| e.services.iter().find(|h| &h.service == name));
        let state = match holding {
            None => "not-routed",
            Some(h) => match &h.digest {
                None => "unknown",
                Some(d) if Some(d.as_str()) == release => "in-sync",
                Some(_) => "differs",
            },
        };
        let key = (env.to_string(), name.clone(), id.to_string());
        let (live_state, live_version) = match live.get(&key) {
            Some((s, v)) => (Some(*s), v.clone()),
            None if live.contains_key(&(env.to_string(), name.clone(), String::new()))
                && holding.is_some() =>
            {
                (Some(LiveState::NoAnswer), None)
            }
            None => (None, None),
        };
        match state {
            "differs" => flags.push(Flag {
                kind: "drift",
                text: format!("{name} runs another version than the release (pde's record)"),
            }),
            "unknown" => flags.push(Flag {
                kind: "drift",
                text: format!("{name}: unknown; a rollback or compensation failed there"),
            }),
            _ => {}
        }
        match live_state {
            Some(LiveState::OtherDigest) => flags.push(Flag {
                kind: "drift",
                text: format!(
                    "DRIFT: {name} says it runs {} instead",
                    live_version.as_deref().unwrap_or("another digest")
                ),
            }),
            Some(LiveState::Missing) => flags.push(Flag {
                kind: "missing",
                text: format!("MISSING: {name} does not run this policy"),
            }),
            Some(LiveState::NoAnswer) => flags.push(Flag {
                kind: "no-answer",
                text: format!("NO ANSWER: {name} did not answer GET /active"),
            }),
            _ => {}
        }
        cells.push(ServiceCell {
            service: name.clone(),
            version: holding.and_then(|h| h.version.clone()),
            digest: holding.and_then(|h| h.digest.clone()),
            state,
            live: live_state,
            live_version,
        });
    }
    if let Some(d) = entry.and_then(|e| e.interrupted.as_ref()) {
        flags.push(Flag {
            kind: "interrupted",
            text: format!(
                "INTERRUPTED: v{} started {} by {} was killed mid-way",
                d.version,
                seconds(&d.started_at),
                d.actor
            ),
        });
    }
    for l in leases.iter().filter(|l| l.policy_id == id && l.env == env) {
        flags.push(if l.stale {
            Flag {
                kind: "stale-lease",
                text: format!("STALE LEASE: {}; clear it with `pde unlock`", l.describe()),
            }
        } else {
            Flag {
                kind: "locked",
                text: format!("DEPLOYING: lock {}", l.describe()),
            }
        });
    }
    for f in freezes.into_iter().flatten() {
        flags.push(Flag {
            kind: "freeze",
            text: format!("FREEZE: {f} is in force"),
        });
    }
    Cell {
        env: env.to_string(),
        version: entry.map(|e| e.version.clone()).filter(|v| !v.is_empty()),
        digest: release.map(str::to_string),
        deployed_at: entry
            .map(|e| seconds(&e.deployed_at))
            .filter(|t| !t.is_empty()),
        services: cells,
        flags,
    }
}

fn jiff_now() -> jiff::Timestamp {
    jiff::Timestamp::now()
}

/// The audit chain's verification, as a page states it.
#[derive(Debug, Clone, Serialize)]
pub struct Verification {
    /// `intact` or `broken`.
    pub status: &'static str,
    /// What `pde audit verify --output json` prints, when intact.
    pub report: Option<VerifyReport>,
    /// The first bad record, when the chain itself is broken.
    pub first_bad: Option<FirstBad>,
    /// Why it is not intact, as `pde audit verify` says it.
    pub error: Option<String>,
    /// The exit code `pde audit verify` ends with.
    pub exit_code: u8,
}

/// Where the chain first fails.
#[derive(Debug, Clone, Serialize)]
pub struct FirstBad {
    /// 1-based line of the log (one past the end for a cut log).
    pub line: u64,
    /// Its sequence number, when known.
    pub seq: Option<u64>,
    /// What does not check out.
    pub reason: String,
}

/// Runs `pde audit verify` and states the result.
pub fn verification(engine: &Engine) -> Verification {
    verification_of(engine.verify_audit())
}

/// States the result of `pde audit verify`.
fn verification_of(verified: Result<pde::audit::VerifyReport, pde::Error>) -> Verification {
    match verified {
        Ok(report) => Verification {
            status: "intact",
            report: Some(report),
            first_bad: None,
            error: None,
            exit_code: 0,
        },
        Err(e) => {
            let first_bad = match &e {
                pde::Error::Audit(AuditError::Tampered { line, seq, reason }) => Some(FirstBad {
                    line: *line,
                    seq: *seq,
                    reason: reason.clone(),
                }),
                _ => None,
            };
            Verification {
                status: "broken",
                report: None,
                first_bad,
                error: Some(e.to_string()),
                exit_code: pde::error::HasExitCode::exit_code(&e).code(),
            }
        }
    }
}

/// Which audit records to show.
#[derive(Debug, Clone, Default, serde::Deserialize, Serialize)]
pub struct AuditFilter {
    /// Only this policy.
    pub policy: Option<String>,
    /// Only this environment.
    pub env: Option<String>,
    /// Only this event (`deployed`, `push_failed`, …).
    pub event: Option<String>,
    /// Only this actor.
    pub actor: Option<String>,
    /// Only records at or after this time (RFC 3339 or a date).
    pub since: Option<String>,
    /// Only records before this time (RFC 3339 or a date).
    pub until: Option<String>,
}

impl AuditFilter {
    fn keeps(&self, r: &AuditRecord) -> bool {
        fn some(f: &Option<String>) -> Option<&str> {
            f.as_deref().filter(|s| !s.is_empty())
        }
        let event = serde_json::to_value(r.event).unwrap_or_default();
        some(&self.policy).is_none_or(|p| r.policy_id == p)
            && some(&self.env).is_none_or(|e| r.env == e)
            && some(&self.event).is_none_or(|e| event == e)
            && some(&self.actor).is_none_or(|a| r.actor == a)
            && some(&self.since).is_none_or(|s| seconds(&r.ts).as_str() >= s)
            && some(&self.until).is_none_or(|u| seconds(&r.ts).as_str() < u)
    }
}

/// An anchor of the chain outside itself.
#[derive(Debug, Clone, Serialize)]
pub struct AnchorView {
    /// Where it is recorded (`tag policy/42/v1.0.0/prod`, `head file`).
    pub source: String,
    /// The head `seq` it records.
    pub seq: Option<u64>,
    /// The head hash it records.
    pub hash: Option<String>,
}

/// The audit page.
#[derive(Debug, Clone, Serialize)]
pub struct AuditPage {
    /// [`AUDIT_SCHEMA`].
    pub schema: &'static str,
    /// The verification.
    pub verification: Verification,
    /// The chain's head: the last record's `(seq, hash)`.
    pub head: Option<(u64, String)>,
    /// Who signs the head file (key id), if anyone.
    pub head_keyid: Option<String>,
    /// Release tags and the signed head.
    pub anchors: Vec<AnchorView>,
    /// The filter applied.
    pub filter: AuditFilter,
    /// How many records the log holds.
    pub total: usize,
    /// The records that pass the filter, oldest first.
    pub records: Vec<AuditRecord>,
    /// Why the records could not be read, if they could not.
    pub records_error: Option<String>,
}

/// Builds the audit page.
pub fn audit(engine: &Engine, filter: AuditFilter) -> AuditPage {
    let (verified, records) = engine.verify_audit_reading();
    audit_of(engine, filter, verified, records)
}

/// [`audit`] over a verification and the records it read
/// ([`Engine::verify_audit_reading`]), so a caller that needs the records
/// too reads and parses the log once.
pub fn audit_of(
    engine: &Engine,
    filter: AuditFilter,
    verified: Result<pde::audit::VerifyReport, pde::Error>,
    records: Result<Vec<AuditRecord>, AuditError>,
) -> AuditPage {
    let verification = verification_of(verified);
    let (records, records_error) = match records {
        Ok(r) => (r, None),
        Err(e) => (Vec::new(), Some(e.to_string())),
    };
    let total = records.len();
    let head = engine.audit().last().ok().flatten();
    let head_keyid = engine.audit().head_keyid().ok().flatten();
    let mut anchors: Vec<AnchorView> = engine
        .audit_anchors()
        .unwrap_or_default()
        .into_iter()
        .map(|a| AnchorView {
            source: a.source,
            seq: a.head.as_ref().map(|h| h.0),
            hash: a.head.map(|h| h.1),
        })
        .collect();
    if let Some((seq, hash)) = &head {
        anchors.push(AnchorView {
            source: match &head_keyid {
                Some(k) => format!("head file, signed by key {k}"),
                None => "head file (unsigned)".to_string(),
            },
            seq: Some(*seq),
            hash: Some(hash.clone()),
        });
    }
    let records = records.into_iter().filter(|r| filter.keeps(r)).collect();
    AuditPage {
        schema: AUDIT_SCHEMA,
        verification,
        head,
        head_keyid,
        anchors,
        filter,
        total,
        records,
        records_error,
    }
}

/// `pde plugin list --output json` for the workspace's plugins directory.
pub fn plugins_json(listing: &[pde::plugin::Listing]) -> Vec<Value> {
    listing
        .iter()
        .map(|p| {
            json!({
                "name": p.name,
                "kind": p.kind,
                "version": p.version,
                "sha256": p.sha256,
                "wit_version": p.wit_version.to_string(),
                "signed": matches!(p.signature, pde::plugin::SignatureStatus::Valid { .. }),
                "signature": p.signature,
                "description": p.description,
                "imports": p.imports,
            })
        })
        .collect()
}

/// One installed plugin, as the plugins page shows it.
#[derive(Debug, Clone, Serialize)]
pub struct PluginView {
    /// What `pde plugin list --output json` says of it.
    #[serde(flatten)]
    pub listed: Value,
    /// Signature status in words: `signed by NAME with key FILE (…)`, `UNSIGNED`,
    /// `INVALID: why`.
    pub signature_text: String,
    /// Whether the signature holds against the workspace's trusted keys.
    pub signed: bool,
    /// The limits it runs under (the workspace's, tightened by its manifest).
    pub limits: Option<Value>,
    /// Its settings from the manifest.
    pub settings: Value,
    /// The imports pde denies it (empty files, no sockets, no
    /// environment), by name: what `pde plugin inspect` lists as not granted.
    pub denied: Vec<String>,
    /// Every import and what pde does with it (also in `listed`).
    #[serde(skip)]
    pub imports: Vec<pde::plugin::inspect::Capability>,
}

/// The plugins page: every installed plugin with its signature status.
pub fn plugins(engine: &Engine) -> Result<Vec<PluginView>, pde::Error> {
    let dir = engine.plugins_dir();
    if !dir.is_dir() {
        return Ok(Vec::new());
    }
    let trusted = engine.plugin_trust()?;
    let listing = pde::plugin::list_dir(&dir, &engine.config().limits, &trusted)?;
    let rows = plugins_json(&listing);
    Ok(listing
        .iter()
        .zip(rows)
        .map(|(p, listed)| {
            use pde::plugin::SignatureStatus;
            let (signed, signature_text) = match &p.signature {
                SignatureStatus::Valid { signer, .. } => (
                    true,
                    format!(
                        "signed by {signer} with {}",
                        p.signature.key_text().unwrap_or_default()
                    ),
                ),
                SignatureStatus::Unsigned => (false, "UNSIGNED".to_string()),
                SignatureStatus::Invalid { reason } => (false, format!("UNSIGNED: {reason}")),
            };
            let manifest =
                pde::plugin::manifest::Manifest::load(&dir.join(format!("{}.toml", p.name))).ok();
            let limits = manifest.as_ref().and_then(|m| {
                m.effective_limits(&engine.config().limits, &dir)
                    .ok()
                    .and_then(|l| serde_json::to_value(l).ok())
            });
            let settings = manifest.map(|m| m.settings_json()).unwrap_or(Value::Null);
            let denied = p
                .imports
                .iter()
                .filter(|c| !c.granted)
                .map(|c| c.import.clone())
                .collect();
            PluginView {
                listed,
                signature_text,
                signed,
                limits,
                settings,
                denied,
                imports: p.imports.clone(),
            }
        })
        .collect())
}

/// The first 19 characters of a digest (`sha256:` and 12 hex), for tables;
/// the whole digest goes in the element's title.
pub fn short(digest: &str) -> &str {
    digest.get(..19).unwrap_or(digest)
}

/// An audit event's name as stored (`deploy_start`, `deployed`, …).
pub fn event_name(event: &pde::audit::Event) -> String {
    serde_json::to_value(event)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}
