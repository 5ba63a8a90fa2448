//! `pde plugin review FILE.wasm [--policy P …] [--against OLD.wasm]`: one
//! report a security team can attach to a ticket (issue 27 §4).
//!
//! It gathers what `inspect`, `test`, `diff` and `verify` show separately:
//! the plugin's identity, its capabilities (each import granted or DENIED,
//! and the host functions with their limits), the limits in force and
//! where each comes from, a run over every policy given (verdict, findings
//! or routes, fuel, memory, time, denied attempts), the changes against an
//! older version (findings and routes that changed, imports added), who
//! signed it and until when their key counts, and the pde and wasmtime
//! versions that produced the report.
//!
//! It is also a gate: a **risky change** — an import the old version did
//! not have, a limit loosened (above the workspace's, or above the old
//! version's), fewer findings on the same policy — is listed under `risks`,
//! and the command exits 3, as would a policy that failed validation. A
//! plugin pde refuses to run is refused here with the runtime's exit code.

use std::path::{Path, PathBuf};

use pde_core::keys::TrustedKeys;
use pde_core::{ExitCode, HasExitCode};
use serde::Serialize;

use crate::config::Limits;
use crate::diagnostic::{Diagnostic, Severity};
use crate::floor::Floor;
use crate::plugin::inspect::{Capability, Change, Inspection};
use crate::plugin::{
    CallContext, Plugin, PluginError, PluginHost, PluginKind, PolicyInput, ServiceInfo,
    SignatureStatus,
};

/// The wasmtime this pde links (from `Cargo.lock`, at build time).
pub const WASMTIME_VERSION: &str = env!("PDE_WASMTIME_VERSION");

/// Why a review could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    /// A plugin could not be read or inspected.
    #[error(transparent)]
    Plugin(#[from] PluginError),
    /// A policy file could not be read.
    #[error("cannot read policy {path}: {why}")]
    Policy {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
}

impl HasExitCode for ReviewError {
    fn exit_code(&self) -> ExitCode {
        match self {
            ReviewError::Plugin(e) => e.exit_code(),
            ReviewError::Policy { .. } => ExitCode::Usage,
        }
    }
}

/// What to review, and against what.
pub struct ReviewRequest<'a> {
    /// The plugin under review.
    pub wasm: &'a Path,
    /// The approved version to compare with.
    pub against: Option<&'a Path>,
    /// Policy files to run both over.
    pub policies: &'a [PathBuf],
    /// The keys whose plugin signatures count.
    pub trusted: &'a TrustedKeys,
    /// The floor, for the expiry of the signer's key.
    pub floor: Option<&'a Floor>,
    /// Whether the workspace's `pde.toml` sets `[limits]` (else pde's defaults).
    pub workspace_limits: bool,
    /// The environment to name in the call context, and the services a
    /// router is offered.
    pub env: Option<(String, Vec<ServiceInfo>)>,
}

/// The report.
#[derive(Debug, Clone, Serialize)]
pub struct Review {
    /// Who the plugin is.
    pub identity: Identity,
    /// Each import, granted or DENIED.
    pub capabilities: Vec<Capability>,
    /// The host functions a plugin may call, with their limits.
    pub host_functions: Vec<HostFunction>,
    /// Each limit in force, and where it comes from.
    pub limits: Vec<LimitInForce>,
    /// One run per policy given.
    pub runs: Vec<PolicyRun>,
    /// Against the old version, when given.
    pub against: Option<Comparison>,
    /// Who signed it.
    pub signature: SignatureReport,
    /// The pde and wasmtime that made this report.
    pub versions: Versions,
    /// Why pde refuses to run it, if it does.
    pub refused: Option<crate::plugin::inspect::Refusal>,
    /// Every risky change; non-empty fails the review (exit 3).
    pub risks: Vec<String>,
}

/// The plugin's identity.
#[derive(Debug, Clone, Serialize)]
pub struct Identity {
    /// The file.
    pub path: PathBuf,
    /// sha256 (hex) of its bytes.
    pub sha256: String,
    /// Its size in bytes.
    pub size: u64,
    /// The name in its manifest, if any.
    pub name: Option<String>,
    /// The world its exports make it (`validator`, `router`).
    pub world: Option<PluginKind>,
    /// The kind its manifest declares.
    pub kind: Option<String>,
    /// The `pde:plugin` WIT version(s) it imports.
    pub wit_versions: Vec<String>,
}

/// A host function and its bounds.
#[derive(Debug, Clone, Serialize)]
pub struct HostFunction {
    /// The function.
    pub name: String,
    /// What bounds it.
    pub limit: String,
}

/// One limit in force.
#[derive(Debug, Clone, Serialize)]
pub struct LimitInForce {
    /// `fuel`, `memory_mib` or `timeout_ms`.
    pub field: String,
    /// The value each call gets.
    pub value: u64,
    /// `manifest`, `workspace` or `default`.
    pub source: String,
    /// The manifest asks for more than the workspace allows.
    pub loosening: bool,
}

/// One policy's run.
#[derive(Debug, Clone, Serialize)]
pub struct PolicyRun {
    /// The policy file.
    pub policy: PathBuf,
    /// `pass`, `fail` (error findings), `routed`, or `fault`.
    pub verdict: String,
    /// A validator's findings.
    pub findings: Vec<Diagnostic>,
    /// A router's picks, `service: reason`.
    pub routes: Vec<String>,
    /// Fuel used.
    pub fuel_used: u64,
    /// Peak linear memory, bytes.
    pub peak_memory_bytes: u64,
    /// Wall time, milliseconds.
    pub elapsed_ms: f64,
    /// Denied capabilities it tried.
    pub denied: Vec<String>,
    /// Why it faulted.
    pub fault: Option<String>,
}

/// Changes against the old version.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    /// The old file.
    pub path: PathBuf,
    /// Its sha256.
    pub sha256: String,
    /// Its signature.
    pub signature: SignatureReport,
    /// World, exports, imports, bytes, producers, manifest.
    pub changes: Vec<Change>,
    /// Imports the new version has and the old did not, granted or DENIED.
    pub imports_added: Vec<Capability>,
    /// Per policy, what the runs say differently.
    pub runs: Vec<RunChange>,
}

/// How one policy's run changed.
#[derive(Debug, Clone, Serialize)]
pub struct RunChange {
    /// The policy file.
    pub policy: PathBuf,
    /// Verdict, old then new.
    pub verdict: (String, String),
    /// Findings (or routes), old count then new.
    pub count: (usize, usize),
    /// Findings or routes only the new version gives.
    pub added: Vec<String>,
    /// Findings or routes only the old version gave.
    pub removed: Vec<String>,
}

/// Who signed a plugin.
#[derive(Debug, Clone, Serialize)]
pub struct SignatureReport {
    /// Valid, invalid or unsigned, with signer, key and time.
    pub status: Option<SignatureStatus>,
    /// The floor's name for the signing key, when it lists it.
    pub key_name: Option<String>,
    /// The last day the signing key counts (the floor's `expires`).
    pub key_expires: Option<String>,
}

/// Versions.
#[derive(Debug, Clone, Serialize)]
pub struct Versions {
    /// pde.
    pub pde: String,
    /// wasmtime.
    pub wasmtime: String,
}

impl Review {
    /// The exit code the review ends with: the runtime's refusal, else 3
    /// on a risky change, else 0.
    pub fn exit_code(&self) -> ExitCode {
        match (&self.refused, self.risks.is_empty()) {
            (Some(r), _) => r.exit,
            (None, false) => ExitCode::ValidationFailed,
            (None, true) => ExitCode::Ok,
        }
    }
}

/// Makes the review.
pub fn review(host: &PluginHost, req: &ReviewRequest<'_>) -> Result<Review, ReviewError> {
    let policies = req
        .policies
        .iter()
        .map(|p| Ok((p.clone(), read_policy(p)?)))
        .collect::<Result<Vec<_>, ReviewError>>()?;
    let new = host.inspect_file(req.wasm, req.trusted)?;
    let mut risks = Vec::new();
    let plugin = host.admit(req.wasm, req.trusted).ok();
    let limits = limits_in_force(&new, host.limits(), req.workspace_limits);
    for l in limits.iter().filter(|l| l.loosening) {
        risks.push(format!(
            "limit {} = {} loosens the workspace's {}",
            l.field,
            l.value,
            field(host.limits(), &l.field)
        ));
    }
    let runs: Vec<PolicyRun> = match &plugin {
        Some(p) => policies
            .iter()
            .map(|(path, input)| run(host, p, path, input, req.env.as_ref()))
            .collect(),
        None => Vec::new(),
    };
    let against = match req.against {
        None => None,
        Some(old_path) => {
            let old = host.inspect_file(old_path, req.trusted)?;
            let imports_added: Vec<Capability> = new
                .capabilities
                .iter()
                .filter(|c| !old.imports.contains(&c.import))
                .cloned()
                .collect();
            for c in &imports_added {
                risks.push(format!(
                    "new import {} ({})",
                    c.import,
                    if c.granted { "granted" } else { "DENIED" }
                ));
            }
            let old_plugin = host.admit(old_path, req.trusted).ok();
            if let (Some(o), Some(n)) = (&old_plugin, &plugin) {
                for (name, old_v, new_v) in [
                    ("fuel", o.limits.fuel, n.limits.fuel),
                    ("memory_mib", o.limits.memory_mib, n.limits.memory_mib),
                    ("timeout_ms", o.limits.timeout_ms, n.limits.timeout_ms),
                ] {
                    if new_v > old_v {
                        risks.push(format!("limit {name} raised from {old_v} to {new_v}"));
                    }
                }
            }
            let mut changed = Vec::new();
            if let Some(o) = &old_plugin {
                for ((path, input), new_run) in policies.iter().zip(&runs) {
                    let old_run = run(host, o, path, input, req.env.as_ref());
                    let change = compare(&old_run, new_run);
                    if change.count.1 < change.count.0 {
                        risks.push(format!(
                            "fewer findings on {}: {} -> {}",
                            path.display(),
                            change.count.0,
                            change.count.1
                        ));
                    }
                    changed.push(change);
                }
            }
            Some(Comparison {
                path: old_path.to_path_buf(),
                sha256: old.sha256.clone(),
                signature: signature_report(old.signature.clone(), req.floor),
                changes: crate::plugin::inspect::diff(&old, &new),
                imports_added,
                runs: changed,
            })
        }
    };
    Ok(Review {
        identity: Identity {
            path: req.wasm.to_path_buf(),
            sha256: new.sha256.clone(),
            size: new.size,
            name: manifest_text(&new, "name"),
            world: new.kind,
            kind: manifest_text(&new, "kind"),
            wit_versions: new.wit_versions.clone(),
        },
        capabilities: new.capabilities.clone(),
        host_functions: host_functions(),
        limits,
        runs,
        against,
        signature: signature_report(new.signature.clone(), req.floor),
        versions: Versions {
            pde: env!("CARGO_PKG_VERSION").to_string(),
            wasmtime: WASMTIME_VERSION.to_string(),
        },
        refused: new.refused.clone(),
        risks,
    })
}

fn manifest_text(i: &Inspection, key: &str) -> Option<String> {
    i.manifest
        .as_ref()
        .and_then(|m| m.get(key))
        .and_then(|v| v.as_str())
        .map(str::to_string)
}

fn field(limits: &Limits, name: &str) -> u64 {
    match name {
        "fuel" => limits.fuel,
        "memory_mib" => limits.memory_mib,
        _ => limits.timeout_ms,
    }
}

/// Each limit a call gets, and whose it is: the manifest's where it sets
/// one, else the workspace's `[limits]`, else pde's default.
fn limits_in_force(i: &Inspection, workspace: &Limits, workspace_set: bool) -> Vec<LimitInForce> {
    let manifest = i
        .manifest
        .as_ref()
        .and_then(|m| m.get("limits"))
        .cloned()
        .unwrap_or_default();
    ["fuel", "memory_mib", "timeout_ms"]
        .into_iter()
        .map(|name| {
            let ws = field(workspace, name);
            match manifest.get(name).and_then(serde_json::Value::as_u64) {
                Some(v) => LimitInForce {
                    field: name.to_string(),
                    value: v,
                    source: "manifest".into(),
                    loosening: v > ws,
                },
                None => LimitInForce {
                    field: name.to_string(),
                    value: ws,
                    source: if workspace_set && field(&Limits::default(), name) != ws {
                        "workspace"
                    } else {
                        "default"
                    }
                    .into(),
                    loosening: false,
                },
            }
        })
        .collect()
}

/// What a plugin may call on the host, and what bounds it.
fn host_functions() -> Vec<HostFunction> {
    use crate::plugin::sandbox::{MAX_LOG_BYTES, MAX_LOG_LINE_BYTES};
    vec![
        HostFunction {
            name: "host.log".into(),
            limit: format!(
                "{MAX_LOG_LINE_BYTES} bytes a line, {MAX_LOG_BYTES} bytes a call (stdout and stderr share it)"
            ),
        },
        HostFunction {
            name: "wasi:clocks, wasi:random".into(),
            limit: "granted: a plugin may read the wall clock and randomness, so its verdict \
                    may change with the date"
                .into(),
        },
        HostFunction {
            name: "results".into(),
            limit: format!(
                "at most {} findings or routes, {} bytes",
                crate::plugin::MAX_RESULT_ITEMS,
                crate::plugin::MAX_RESULT_BYTES
            ),
        },
    ]
}

fn run(
    host: &PluginHost,
    plugin: &Plugin,
    path: &Path,
    input: &PolicyInput,
    env: Option<&(String, Vec<ServiceInfo>)>,
) -> PolicyRun {
    let call = CallContext {
        environment: env.map(|(e, _)| e.clone()).unwrap_or_default(),
        active: None,
    };
    let mut out = PolicyRun {
        policy: path.to_path_buf(),
        verdict: String::new(),
        findings: Vec::new(),
        routes: Vec::new(),
        fuel_used: 0,
        peak_memory_bytes: 0,
        elapsed_ms: 0.0,
        denied: Vec::new(),
        fault: None,
    };
    let result = match plugin.kind {
        PluginKind::Validator => host.validate(plugin, input, &call).map(|r| {
            out.verdict = if r.value.iter().any(|d| d.severity == Severity::Error) {
                "fail"
            } else {
                "pass"
            }
            .into();
            out.findings = r.value;
            (r.fuel_used, r.peak_memory_bytes, r.elapsed, r.denied)
        }),
        PluginKind::Router => {
            let services = env.map(|(_, s)| s.as_slice()).unwrap_or_default();
            host.route(plugin, input, &call, services).map(|r| {
                out.verdict = "routed".into();
                out.routes = r
                    .value
                    .iter()
                    .map(|p| format!("{}: {}", p.service, p.reason))
                    .collect();
                (r.fuel_used, r.peak_memory_bytes, r.elapsed, r.denied)
            })
        }
        // A review has no metric: the gate is shown judging a wave with no
        // data, which is what it sees when a query matches nothing.
        PluginKind::Gate => {
            let wave = crate::plugin::GateInput {
                gate: "review".into(),
                wave: "review".into(),
                ..Default::default()
            };
            host.gate(plugin, input, &call, &wave).map(|r| {
                out.verdict = serde_json::to_value(r.value.verdict)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default();
                out.findings = Vec::new();
                out.routes = vec![format!("no data: {}", r.value.reason)];
                (r.fuel_used, r.peak_memory_bytes, r.elapsed, r.denied)
            })
        }
    };
    match result {
        Ok((fuel, memory, elapsed, denied)) => {
            out.fuel_used = fuel;
            out.peak_memory_bytes = memory;
            out.elapsed_ms = elapsed.as_secs_f64() * 1000.0;
            out.denied = denied;
        }
        Err(e) => {
            out.verdict = "fault".into();
            out.fault = Some(e.to_string());
        }
    }
    out
}

/// What two builds of a plugin say differently about one policy (`pde
/// plugin diff --policy`): findings for a validator, routes for a router.
#[derive(Debug, Clone, Serialize)]
pub struct RunsDiff {
    /// Verdict, old then new (`pass`, `fail`, `routed` or `fault`).
    pub verdict: (String, String),
    /// Why a build faulted, old then new.
    pub fault: (Option<String>, Option<String>),
    /// Validator findings.
    pub findings: ItemsDiff<Diagnostic>,
    /// Router picks, `service: reason`.
    pub routes: ItemsDiff<String>,
}

/// Items only the new build gives, only the old gave, given by both but
/// different, and the number given alike.
#[derive(Debug, Clone, Serialize)]
pub struct ItemsDiff<T> {
    /// Only the new build gives these.
    pub added: Vec<T>,
    /// Only the old build gave these.
    pub removed: Vec<T>,
    /// The same finding (code and path; for a route, the service) with
    /// another severity, message or reason.
    pub changed: Vec<ItemChange<T>>,
    /// How many both give exactly alike.
    pub unchanged: usize,
}

/// One item as the old and the new build give it.
#[derive(Debug, Clone, Serialize)]
pub struct ItemChange<T> {
    /// The old build's.
    pub old: T,
    /// The new build's.
    pub new: T,
}

impl<T> ItemsDiff<T> {
    /// True when the two builds agree.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }
}

/// Pairs `old` with `new`: alike first, then by `key` (a change), the rest
/// added or removed. Each item is paired at most once, in order, so two
/// findings with one code and path are two findings.
fn diff_items<T: Clone, K: PartialEq>(
    old: &[T],
    new: &[T],
    key: impl Fn(&T) -> K,
    alike: impl Fn(&T, &T) -> bool,
) -> ItemsDiff<T> {
    let mut old_left: Vec<Option<&T>> = old.iter().map(Some).collect();
    let mut new_left: Vec<Option<&T>> = new.iter().map(Some).collect();
    let mut unchanged = 0;
    for n in new_left.iter_mut() {
        let Some(item) = *n else { continue };
        if let Some(o) = old_left
            .iter_mut()
            .find(|o| o.is_some_and(|o| alike(o, item)))
        {
            *o = None;
            *n = None;
            unchanged += 1;
        }
    }
    let mut changed = Vec::new();
    for n in new_left.iter_mut() {
        let Some(item) = *n else { continue };
        if let Some(o) = old_left
            .iter_mut()
            .find(|o| o.is_some_and(|o| key(o) == key(item)))
        {
            changed.push(ItemChange {
                old: o.take().expect("found as Some").clone(),
                new: item.clone(),
            });
            *n = None;
        }
    }
    ItemsDiff {
        added: new_left.into_iter().flatten().cloned().collect(),
        removed: old_left.into_iter().flatten().cloned().collect(),
        changed,
        unchanged,
    }
}

/// Runs `old` and `new` over `input` (as `pde plugin review` runs a
/// plugin) and says what they find differently; the runs are returned for
/// their costs.
pub fn diff_runs(
    host: &PluginHost,
    (old, new): (&Plugin, &Plugin),
    path: &Path,
    input: &PolicyInput,
) -> (RunsDiff, PolicyRun, PolicyRun) {
    let (a, b) = (
        run(host, old, path, input, None),
        run(host, new, path, input, None),
    );
    // A finding is the same finding whoever reports it: the source is the
    // plugin's name, which two builds may not share.
    let alike = |x: &Diagnostic, y: &Diagnostic| {
        (x.severity, &x.code, &x.path, &x.message) == (y.severity, &y.code, &y.path, &y.message)
    };
    let service = |r: &String| r.split_once(": ").map_or(r.clone(), |(s, _)| s.to_string());
    let diff = RunsDiff {
        verdict: (a.verdict.clone(), b.verdict.clone()),
        fault: (a.fault.clone(), b.fault.clone()),
        findings: diff_items(
            &a.findings,
            &b.findings,
            |d| (d.code.clone(), d.path.clone()),
            alike,
        ),
        routes: diff_items(&a.routes, &b.routes, service, |x, y| x == y),
    };
    (diff, a, b)
}

fn finding_text(d: &Diagnostic) -> String {
    let severity = match d.severity {
        Severity::Error => "error",
        Severity::Warning => "warning",
        Severity::Info => "info",
    };
    format!("{severity} {} at {:?}: {}", d.code, d.path, d.message)
}

fn compare(old: &PolicyRun, new: &PolicyRun) -> RunChange {
    let items = |r: &PolicyRun| -> Vec<String> {
        r.findings
            .iter()
            .map(finding_text)
            .chain(r.routes.iter().cloned())
            .collect()
    };
    let (o, n) = (items(old), items(new));
    RunChange {
        policy: new.policy.clone(),
        verdict: (old.verdict.clone(), new.verdict.clone()),
        count: (o.len(), n.len()),
        added: n.iter().filter(|x| !o.contains(x)).cloned().collect(),
        removed: o.iter().filter(|x| !n.contains(x)).cloned().collect(),
    }
}

fn signature_report(status: Option<SignatureStatus>, floor: Option<&Floor>) -> SignatureReport {
    let entry = match (&status, floor) {
        (Some(SignatureStatus::Valid { keyid, .. }), Some(floor)) => {
            floor.plugin_keys.iter().find(|e| {
                floor
                    .key(e)
                    .is_ok_and(|k| pde_core::keys::key_id(&k) == *keyid)
            })
        }
        _ => None,
    };
    SignatureReport {
        key_name: entry.map(|e| e.name.clone()),
        key_expires: entry.and_then(|e| e.expires.clone()),
        status,
    }
}

/// A policy document from a JSON or YAML file, as a plugin is given it:
/// `pde plugin test` and `pde plugin review` read policies the same way.
/// The id defaults to the file's stem.
pub fn read_policy(path: &Path) -> Result<PolicyInput, ReviewError> {
    let fail = |why: String| ReviewError::Policy {
        path: path.to_path_buf(),
        why,
    };
    let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
    let document: serde_json::Value = match serde_json::from_str(&text) {
        Ok(v) => v,
        Err(json_err) => serde_saphyr::from_str(&text)
            .map_err(|yaml_err| fail(format!("neither JSON ({json_err}) nor YAML ({yaml_err})")))?,
    };
    if !document.is_object() {
        return Err(fail("it must hold a policy object".into()));
    }
    let text_of = |k: &str| {
        document
            .get(k)
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_string()
    };
    let mut id = text_of("id");
    if id.is_empty() {
        id = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default()
            .to_string();
    }
    Ok(PolicyInput {
        id,
        version: text_of("version"),
        document,
    })
}
