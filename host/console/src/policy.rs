//! A policy's page (history per environment, approvals, per-target results,
//! the diff of two versions' rules) and the deployment timeline.

use std::collections::{BTreeMap, BTreeSet};

use pde::Engine;
use pde::audit::AuditRecord;
use pde::state::TargetRecord;
use serde::Serialize;
use serde_json::Value;

use crate::docs::{self, HistoryEntry, POLICY_SCHEMA, RolloutView, TIMELINE_SCHEMA, seconds};

/// One approval of the version deployed.
#[derive(Debug, Clone, Serialize)]
pub struct ApprovalView {
    /// Who approved.
    pub by: String,
    /// In which role.
    pub role: Option<String>,
    /// The key that signed it; `None` for an unsigned entry of the document.
    pub key: Option<String>,
    /// When.
    pub at: Option<String>,
}

/// One line of a policy's history.
#[derive(Debug, Clone, Serialize)]
pub struct HistoryView {
    /// The environment.
    pub env: String,
    /// The version (`?` when a refusal came before validation read it).
    pub version: String,
    /// The bundle digest, when packaged.
    pub digest: Option<String>,
    /// `deployed`, `rolled-back`, `refused`, …
    pub outcome: String,
    /// Whether it took effect (for the colour; the word says it too).
    pub good: bool,
    /// Who ran it.
    pub actor: String,
    /// When it ended.
    pub finished_at: String,
    /// The approvals the bundle carried.
    pub approvals: Vec<ApprovalView>,
    /// The release tag, when there is one.
    pub tag: Option<String>,
    /// Per-target results.
    pub targets: Vec<TargetRecord>,
    /// Why it was refused.
    pub reason: Option<String>,
    /// The id of the progressive rollout that delivered it, whose waves
    /// and gate results are in [`PolicyPage::rollouts`].
    pub rollout: Option<i64>,
}

/// A version that can be compared.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct VersionRef {
    /// Semver version.
    pub version: String,
    /// Bundle digest.
    pub digest: String,
}

/// What changed between two versions' documents.
#[derive(Debug, Clone, Serialize)]
pub struct PolicyDiff {
    /// The older side.
    pub from: VersionRef,
    /// The newer side.
    pub to: VersionRef,
    /// Rules only in `to`.
    pub added: Vec<Value>,
    /// Rules only in `from`.
    pub removed: Vec<Value>,
    /// Rules in both whose content differs, field by field.
    pub changed: Vec<RuleChange>,
    /// Top-level fields (title, effective date, …) that differ.
    pub fields: Vec<FieldChange>,
    /// Why a side could not be read, if one could not.
    pub error: Option<String>,
}

/// One rule present on both sides with different content.
#[derive(Debug, Clone, Serialize)]
pub struct RuleChange {
    /// The rule's key.
    pub key: String,
    /// Each field that differs.
    pub fields: Vec<FieldChange>,
}

/// One field that differs.
#[derive(Debug, Clone, Serialize)]
pub struct FieldChange {
    /// The field's name.
    pub field: String,
    /// Its old value (JSON text; empty when absent).
    pub old: String,
    /// Its new value (JSON text; empty when absent).
    pub new: String,
}

/// A policy's page.
#[derive(Debug, Clone, Serialize)]
pub struct PolicyPage {
    /// [`POLICY_SCHEMA`].
    pub schema: &'static str,
    /// The policy.
    pub policy_id: String,
    /// History per environment, newest first.
    pub envs: BTreeMap<String, Vec<HistoryView>>,
    /// Every version deployed or packaged, newest first.
    pub versions: Vec<VersionRef>,
    /// The diff shown (the two newest versions unless asked otherwise).
    pub diff: Option<PolicyDiff>,
    /// What `pde history ID --output json` prints.
    pub history: Vec<Value>,
    /// Its progressive rollouts, newest first: waves and gate results (what
    /// `pde history ID` lists wave by wave).
    pub rollouts: Vec<RolloutView>,
}

impl PolicyPage {
    /// The rollouts in `env`, newest first.
    pub fn rollouts_in(&self, env: &str) -> Vec<&RolloutView> {
        self.rollouts.iter().filter(|r| r.env == env).collect()
    }
}

/// Builds a policy's page; `from`/`to` pick the versions to compare (by
/// version or digest).
pub fn page(
    engine: &Engine,
    policy_id: &str,
    records: &[AuditRecord],
    from: Option<&str>,
    to: Option<&str>,
) -> Result<PolicyPage, pde::Error> {
    let entries = docs::history(engine, policy_id, records)?;
    let rollouts = docs::rollouts(engine, policy_id, None)?;
    let tags: BTreeSet<String> = engine
        .audit_anchors()
        .unwrap_or_default()
        .into_iter()
        .filter_map(|a| a.source.strip_prefix("tag ").map(str::to_string))
        .collect();
    let mut bundles = BTreeMap::new();
    let mut versions: Vec<VersionRef> = Vec::new();
    let mut envs: BTreeMap<String, Vec<HistoryView>> = BTreeMap::new();
    for e in &entries {
        let view = match e {
            HistoryEntry::Deployment(d) => {
                let bundle = bundle_of(engine, &mut bundles, policy_id, &d.version, &d.digest);
                let v = VersionRef {
                    version: d.version.clone(),
                    digest: d.digest.clone(),
                };
                if !versions.contains(&v) {
                    versions.push(v);
                }
                let tag = pde::tag::tag_name(policy_id, &d.version, &d.env);
                HistoryView {
                    env: d.env.clone(),
                    version: d.version.clone(),
                    digest: Some(d.digest.clone()),
                    outcome: d.outcome.as_str().to_string(),
                    good: d.outcome.took_effect(),
                    actor: d.actor.clone(),
                    finished_at: seconds(&d.finished_at),
                    approvals: bundle.map(approvals).unwrap_or_default(),
                    tag: tags.contains(&tag).then_some(tag),
                    targets: d.targets.clone(),
                    reason: None,
                    rollout: rollout_of(&rollouts, d),
                }
            }
            HistoryEntry::Refused(r) => HistoryView {
                env: r.env.clone(),
                version: r.version.clone().unwrap_or_else(|| "?".into()),
                digest: r.digest.clone(),
                outcome: "refused".into(),
                good: false,
                actor: r.actor.clone(),
                finished_at: seconds(&r.finished_at),
                approvals: Vec::new(),
                tag: None,
                targets: Vec::new(),
                reason: Some(r.reason.clone()),
                rollout: None,
            },
        };
        envs.entry(e.env().to_string()).or_default().push(view);
    }
    // A rollout still running has no finished deployment yet: its
    // environment is shown all the same.
    for r in &rollouts {
        envs.entry(r.env.clone()).or_default();
    }
    let pick = |want: Option<&str>, default: Option<&VersionRef>| match want {
        Some(w) => versions
            .iter()
            .find(|v| v.version == w || v.digest == w)
            .cloned(),
        None => default.cloned(),
    };
    let to_v = pick(to, versions.first());
    let from_v = pick(
        from,
        to_v.as_ref()
            .and_then(|t| versions.iter().find(|v| v.digest != t.digest)),
    );
    let diff = match (from_v, to_v) {
        (Some(f), Some(t)) => Some(diff(engine, &mut bundles, policy_id, f, t)),
        _ => None,
    };
    Ok(PolicyPage {
        schema: POLICY_SCHEMA,
        policy_id: policy_id.to_string(),
        envs,
        versions,
        diff,
        history: docs::history_json(&entries),
        rollouts,
    })
}

/// The rollout that delivered deployment `d`: same environment, version
/// and digest, started while `d` ran (the deployment is begun just before
/// its first wave); the latest such, should there be several.
fn rollout_of(rollouts: &[RolloutView], d: &pde::state::DeploymentRecord) -> Option<i64> {
    rollouts
        .iter()
        .filter(|r| r.env == d.env && r.version == d.version && r.digest == d.digest)
        .filter(|r| {
            seconds(&r.started_at) >= seconds(&d.started_at)
                && seconds(&r.started_at) <= seconds(&d.finished_at)
        })
        .max_by(|a, b| a.started_at.cmp(&b.started_at))
        .and_then(|r| r.id)
}

type Bundles = BTreeMap<String, Result<pde::bundle::Bundle, String>>;

fn bundle_of<'a>(
    engine: &Engine,
    cache: &'a mut Bundles,
    policy_id: &str,
    version: &str,
    digest: &str,
) -> Option<&'a pde::bundle::Bundle> {
    cache
        .entry(digest.to_string())
        .or_insert_with(|| {
            pde::state::stored_bundle(
                &**engine.state(),
                &engine.dist_dir(),
                policy_id,
                version,
                digest,
            )
            .map_err(|e| e.to_string())
            .and_then(|r| r)
        })
        .as_ref()
        .ok()
}

fn approvals(b: &pde::bundle::Bundle) -> Vec<ApprovalView> {
    let mut out: Vec<ApprovalView> = b
        .approvals
        .iter()
        .map(|a| ApprovalView {
            by: a.statement.by.clone(),
            role: a.statement.role.clone(),
            key: Some(a.signature.keyid.clone()),
            at: Some(a.statement.at.clone()),
        })
        .collect();
    for a in b.payload.policy["approvals"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let text = |k: &str| a.get(k).and_then(Value::as_str).map(str::to_string);
        out.push(ApprovalView {
            by: text("by").unwrap_or_default(),
            role: text("role"),
            key: None,
            at: text("at"),
        });
    }
    out
}

fn diff(
    engine: &Engine,
    bundles: &mut Bundles,
    policy_id: &str,
    from: VersionRef,
    to: VersionRef,
) -> PolicyDiff {
    let old = bundle_of(engine, bundles, policy_id, &from.version, &from.digest)
        .map(|b| b.payload.policy.clone());
    let new = bundle_of(engine, bundles, policy_id, &to.version, &to.digest)
        .map(|b| b.payload.policy.clone());
    let mut d = PolicyDiff {
        from,
        to,
        added: Vec::new(),
        removed: Vec::new(),
        changed: Vec::new(),
        fields: Vec::new(),
        error: None,
    };
    let (Some(old), Some(new)) = (old, new) else {
        d.error = Some("a bundle of one side is not stored in the state or in .pde/dist".into());
        return d;
    };
    let (changes, added, removed) = compare_documents(&old, &new);
    d.fields = changes.0;
    d.changed = changes.1;
    d.added = added;
    d.removed = removed;
    d
}

type Changes = (Vec<FieldChange>, Vec<RuleChange>);

/// Top-level field changes and rule changes (rules matched by `key`), plus
/// rules added and removed.
pub fn compare_documents(old: &Value, new: &Value) -> (Changes, Vec<Value>, Vec<Value>) {
    let rules = |doc: &Value| -> BTreeMap<String, Value> {
        doc["rules"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| {
                let key = r["key"]
                    .as_str()
                    .map_or_else(|| r.to_string(), str::to_string);
                (key, r.clone())
            })
            .collect()
    };
    let (a, b) = (rules(old), rules(new));
    let added = b
        .iter()
        .filter(|(k, _)| !a.contains_key(*k))
        .map(|(_, r)| r.clone())
        .collect();
    let removed = a
        .iter()
        .filter(|(k, _)| !b.contains_key(*k))
        .map(|(_, r)| r.clone())
        .collect();
    let changed = a
        .iter()
        .filter_map(|(k, ra)| {
            let rb = b.get(k)?;
            let fields = field_changes(ra, rb, &[]);
            (!fields.is_empty()).then(|| RuleChange {
                key: k.clone(),
                fields,
            })
        })
        .collect();
    let fields = field_changes(old, new, &["rules", "approvals"]);
    ((fields, changed), added, removed)
}

fn field_changes(old: &Value, new: &Value, skip: &[&str]) -> Vec<FieldChange> {
    let empty = serde_json::Map::new();
    let a = old.as_object().unwrap_or(&empty);
    let b = new.as_object().unwrap_or(&empty);
    let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    let text = |v: Option<&Value>| v.map(Value::to_string).unwrap_or_default();
    keys.into_iter()
        .filter(|k| !skip.contains(&k.as_str()))
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| FieldChange {
            field: k.clone(),
            old: text(a.get(k)),
            new: text(b.get(k)),
        })
        .collect()
}

/// Deployments of one day in one environment.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DayCount {
    /// The day, `YYYY-MM-DD` (UTC).
    pub day: String,
    /// Deploys and rollbacks that took effect.
    pub successes: u32,
    /// Deploys that were rolled back (compensated), and `pde rollback`s.
    pub rollbacks: u32,
    /// Deploys that failed, were refused or interrupted.
    pub failures: u32,
}

/// Deployments over time per environment.
#[derive(Debug, Clone, Serialize)]
pub struct Timeline {
    /// [`TIMELINE_SCHEMA`].
    pub schema: &'static str,
    /// Per environment, one entry per day with any deployment, oldest first.
    pub envs: BTreeMap<String, Vec<DayCount>>,
}

/// Counts every deployment of every policy by environment and day.
pub fn timeline(engine: &Engine, records: &[AuditRecord]) -> Result<Timeline, pde::Error> {
    let mut ids: BTreeSet<String> = engine
        .state()
        .status(None)?
        .into_iter()
        .map(|e| e.policy_id)
        .collect();
    ids.extend(engine.policies().ids().unwrap_or_default());
    let mut envs: BTreeMap<String, BTreeMap<String, DayCount>> = BTreeMap::new();
    for id in &ids {
        for e in docs::history(engine, id, records)? {
            let day: String = e.finished_at().chars().take(10).collect();
            let c = envs
                .entry(e.env().to_string())
                .or_default()
                .entry(day.clone())
                .or_insert_with(|| DayCount {
                    day,
                    ..DayCount::default()
                });
            match &e {
                HistoryEntry::Deployment(d) => match d.outcome {
                    pde::state::RecordOutcome::Deployed => c.successes += 1,
                    pde::state::RecordOutcome::Rollback | pde::state::RecordOutcome::RolledBack => {
                        c.rollbacks += 1
                    }
                    _ => c.failures += 1,
                },
                HistoryEntry::Refused(_) => c.failures += 1,
            }
        }
    }
    Ok(Timeline {
        schema: TIMELINE_SCHEMA,
        envs: envs
            .into_iter()
            .map(|(env, days)| (env, days.into_values().collect()))
            .collect(),
    })
}

/// The timeline's bar colours: successes, rollbacks, failures. Each stands
/// out from the page at 3:1 at least (WCAG 1.4.11), and rollbacks and
/// failures are hatched too, so colour is never the only sign.
pub const BAR_FILLS: [(&str, &str); 3] = [
    ("succeeded", "#1b7f3b"),
    ("rolled back", "#a87400"),
    ("failed", "#b3261e"),
];

/// The timeline as an inline SVG: one lane per environment, one stacked
/// bar per day (successes, rollbacks, failures), each with a `<title>` in
/// words and the counts in text beside the chart.
pub fn timeline_svg(t: &Timeline) -> String {
    let days: BTreeSet<&str> = t.envs.values().flatten().map(|d| d.day.as_str()).collect();
    let days: Vec<&str> = days.into_iter().collect();
    let max = t
        .envs
        .values()
        .flatten()
        .map(|d| d.successes + d.rollbacks + d.failures)
        .max()
        .unwrap_or(1)
        .max(1);
    let (lane, label, bar) = (70u32, 110u32, 22u32);
    let width = label + bar * days.len().max(1) as u32 + 20;
    let height = lane * t.envs.len().max(1) as u32 + 30;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" role=\"img\" aria-labelledby=\"tl-title\" \
         width=\"{width}\" height=\"{height}\" viewBox=\"0 0 {width} {height}\">\
         <title id=\"tl-title\">Deployments per day and environment: successes (green), \
         rollbacks (amber, hatched), failures (red, cross-hatched)</title>\
         <defs><pattern id=\"hatch\" width=\"4\" height=\"4\" patternUnits=\"userSpaceOnUse\">\
         <path d=\"M0,4 l4,-4\" stroke=\"#000\" stroke-width=\"1\"/></pattern>\
         <pattern id=\"cross\" width=\"4\" height=\"4\" patternUnits=\"userSpaceOnUse\">\
         <path d=\"M0,4 l4,-4 M0,0 l4,4\" stroke=\"#fff\" stroke-width=\"1\"/></pattern></defs>"
    );
    for (i, (env, counts)) in t.envs.iter().enumerate() {
        let top = 10 + lane * i as u32;
        let base = top + lane - 16;
        s.push_str(&format!(
            "<text x=\"4\" y=\"{}\" class=\"tl-env\">{}</text>\
             <line x1=\"{label}\" y1=\"{base}\" x2=\"{}\" y2=\"{base}\" stroke=\"#555\"/>",
            top + lane / 2,
            escape(env),
            width - 10
        ));
        for c in counts {
            let Some(x) = days.iter().position(|d| *d == c.day) else {
                continue;
            };
            let x = label + bar * x as u32 + 2;
            let mut y = base;
            let scale = |n: u32| n * (lane - 24) / max;
            for ((n, overlay), (what, fill)) in [
                (c.successes, None),
                (c.rollbacks, Some("hatch")),
                (c.failures, Some("cross")),
            ]
            .into_iter()
            .zip(BAR_FILLS)
            {
                if n == 0 {
                    continue;
                }
                let h = scale(n).max(3);
                y -= h;
                let title = format!("{env} {}: {n} {what}", c.day);
                s.push_str(&format!(
                    "<rect x=\"{x}\" y=\"{y}\" width=\"{}\" height=\"{h}\" fill=\"{fill}\">\
                     <title>{}</title></rect>",
                    bar - 4,
                    escape(&title)
                ));
                if let Some(p) = overlay {
                    s.push_str(&format!(
                        "<rect x=\"{x}\" y=\"{y}\" width=\"{}\" height=\"{h}\" fill=\"url(#{p})\"/>",
                        bar - 4
                    ));
                }
            }
        }
    }
    for (i, d) in days.iter().enumerate() {
        if i % 7 == 0 || i + 1 == days.len() {
            s.push_str(&format!(
                "<text x=\"{}\" y=\"{}\" class=\"tl-day\">{}</text>",
                label + bar * i as u32,
                height - 4,
                escape(d)
            ));
        }
    }
    s.push_str("</svg>");
    s
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_changed_rule_is_listed_with_its_fields() {
        let old = json!({"title": "A", "rules": [
            {"key": "k1", "value": 1}, {"key": "gone", "value": 2}]});
        let new = json!({"title": "B", "rules": [
            {"key": "k1", "value": 5}, {"key": "new", "value": 3}]});
        let ((fields, changed), added, removed) = compare_documents(&old, &new);
        assert_eq!(fields.len(), 1);
        assert_eq!(fields[0].field, "title");
        assert_eq!(changed.len(), 1);
        assert_eq!(changed[0].key, "k1");
        assert_eq!(
            (
                changed[0].fields[0].old.as_str(),
                changed[0].fields[0].new.as_str()
            ),
            ("1", "5")
        );
        assert_eq!(added[0]["key"], "new");
        assert_eq!(removed[0]["key"], "gone");
    }
}
