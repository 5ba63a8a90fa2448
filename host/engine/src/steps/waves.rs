//! Step 5 in waves (issue 22): which routed services each wave of a
//! rollout takes, and the gates that judge a wave after its bake.
//!
//! This file decides and measures; it pushes nothing. The rollout
//! ([`crate::rollout`]) pushes each wave through the push step, bakes it,
//! and asks [`evaluate`] for the verdict of every gate.
//!
//! Why it is shaped this way:
//! - **Waves only narrow the routers' choice.** A wave selects among the
//!   routed services not pushed yet; the last takes the rest. A service the
//!   routers did not pick is never in a wave.
//! - **"No data" is not "healthy".** A gate whose query returns no series,
//!   or whose endpoint does not answer, is `inconclusive`, which fails the
//!   wave unless the gate says `on_no_data = "pass"`.
//! - **The report names what was seen.** Every gate result carries the
//!   query as sent (templated), each value, the baseline's, and the bound.

mod judge;

use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use judge::PluginJudge;

use pde_core::{ExitCode, HasExitCode};

use crate::config::{Gate, OnNoData, Rollout, Service};
use crate::http::{self, Target};

/// Why a rollout command could not run.
#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    /// There is no rollout of that policy in that environment.
    #[error("no rollout of policy {policy_id} in {env} is recorded")]
    None {
        /// The policy.
        policy_id: String,
        /// The environment.
        env: String,
    },
    /// A rollout is under way, so a new deploy may not start.
    #[error(
        "rollout {id} of policy {policy_id} (version {version}) in {env} is {status} at wave \
         {wave}; see `pde rollout status {policy_id} --env {env}`, then `pde rollout promote`, \
         `pde rollout abort` or `pde rollout resume` it before deploying again"
    )]
    InProgress {
        /// The rollout id.
        id: i64,
        /// The policy.
        policy_id: String,
        /// The environment.
        env: String,
        /// Its version.
        version: String,
        /// `running` or `paused`.
        status: String,
        /// The wave it is at (1-based).
        wave: usize,
    },
    /// The command does not apply to the rollout as it stands.
    #[error("rollout {id} of policy {policy_id} in {env} is {status}: {why}")]
    NotApplicable {
        /// The rollout id.
        id: i64,
        /// The policy.
        policy_id: String,
        /// The environment.
        env: String,
        /// Its status.
        status: String,
        /// Why the command does not apply.
        why: String,
    },
    /// A gate's token variable is not set.
    #[error("gate {gate:?} names token_env {var}, which is not set")]
    MissingToken {
        /// The gate.
        gate: String,
        /// The variable.
        var: String,
    },
}

impl HasExitCode for RolloutError {
    fn exit_code(&self) -> ExitCode {
        match self {
            RolloutError::InProgress { .. } => ExitCode::Locked,
            _ => ExitCode::Usage,
        }
    }
}

/// A gate's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// The values are within the bound.
    Pass,
    /// A value is out of bounds (or the endpoint said no).
    Fail,
    /// No data: no series, no answer, no baseline.
    Inconclusive,
    /// Not evaluated (a dry run's baseline comparison on the last wave).
    Skipped,
}

/// One gate's result for one wave (and one service, for per-service gates).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GateResult {
    /// The gate's name.
    pub gate: String,
    /// `http` or `prometheus`.
    pub kind: String,
    /// The service, for a gate evaluated per service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// The query (Prometheus) or URL (http) as sent, templated.
    pub query: String,
    /// The value of each series (Prometheus), in the order returned.
    #[serde(default)]
    pub values: Vec<f64>,
    /// The baseline's value, for a baseline comparison.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<f64>,
    /// The verdict as seen.
    pub verdict: Verdict,
    /// Whether the verdict lets the rollout go on (`inconclusive` only with
    /// `on_no_data = "pass"`).
    pub passed: bool,
    /// What was seen, and the bound, in words.
    pub detail: String,
    /// What a gate plugin computed (a `plugin` gate), in its order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub statistics: Vec<Statistic>,
}

/// A named number a gate plugin computed, e.g. `p-value`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Statistic {
    /// Its name.
    pub name: String,
    /// Its value (finite: others are left out).
    pub value: f64,
}

/// Where a wave is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WaveStatus {
    /// Not pushed yet.
    Pending,
    /// Pushed and verified; baking until `bake_until`.
    Baking,
    /// Gates passed; waiting for `pde rollout promote`.
    Paused,
    /// Gates passed (and promoted, if it paused).
    Passed,
    /// The push or a gate failed.
    Failed,
    /// Pushed, then sent back with the rest of the rollout.
    RolledBack,
}

/// One wave: its services and what happened to it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WaveReport {
    /// 1-based.
    pub number: usize,
    /// Its name from pde.toml, or `wave-<n>`.
    pub name: String,
    /// The services it takes, in pde.toml order.
    pub services: Vec<String>,
    /// Bake time in milliseconds.
    pub bake_ms: u64,
    /// Whether it stops for `pde rollout promote` after its gates.
    pub pause: bool,
    /// The gates judging it, by name.
    pub gates: Vec<String>,
    /// Where it is.
    pub status: WaveStatus,
    /// RFC 3339 end of the bake, once pushed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bake_until: Option<String>,
    /// Every gate evaluation, in order.
    #[serde(default)]
    pub results: Vec<GateResult>,
}

impl WaveReport {
    /// A wave with no bake and no pause takes no time worth keeping: it is
    /// saved, and its records appended, with the rollout's next write; a
    /// process killed before that pushes (idempotent) and judges it again.
    pub fn is_quick(&self) -> bool {
        self.bake_ms == 0 && !self.pause
    }
}

/// Splits the routed services (`routed`, in pde.toml order) into the
/// rollout's waves. A wave that finds nothing left is kept, empty, so the
/// numbering matches pde.toml.
pub fn plan(rollout: &Rollout, services: &[Service], routed: &[String]) -> Vec<WaveReport> {
    let mut left: Vec<&Service> = services
        .iter()
        .filter(|s| routed.contains(&s.name))
        .collect();
    let common: Vec<String> = rollout.gates.iter().map(|g| g.name().to_string()).collect();
    let last = rollout.waves.len().saturating_sub(1);
    rollout
        .waves
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let take: Vec<&Service> = if i == last {
                std::mem::take(&mut left)
            } else if !w.services.is_empty() {
                left.iter()
                    .copied()
                    .filter(|s| w.services.contains(&s.name))
                    .collect()
            } else if !w.tags.is_empty() {
                left.iter()
                    .copied()
                    .filter(|s| s.tags.iter().any(|t| w.tags.contains(t)))
                    .collect()
            } else if let Some(n) = w.count {
                left.iter().copied().take(n).collect()
            } else {
                let pct = w.percent.unwrap_or(100) as usize;
                left.iter()
                    .copied()
                    .take((left.len() * pct).div_ceil(100))
                    .collect()
            };
            left.retain(|s| !take.iter().any(|t| t.name == s.name));
            let mut gates = common.clone();
            gates.extend(w.gates.iter().map(|g| g.name().to_string()));
            WaveReport {
                number: i + 1,
                name: w.name.clone().unwrap_or_else(|| format!("wave-{}", i + 1)),
                services: take.iter().map(|s| s.name.clone()).collect(),
                bake_ms: u64::try_from(w.bake().as_millis()).unwrap_or(u64::MAX),
                pause: w.pause,
                gates,
                status: WaveStatus::Pending,
                bake_until: None,
                results: Vec::new(),
            }
        })
        .collect()
}

/// The gates of wave `index` (0-based): the rollout's, then the wave's.
pub fn gates_of(rollout: &Rollout, index: usize) -> Vec<&Gate> {
    rollout
        .gates
        .iter()
        .chain(rollout.waves.get(index).into_iter().flat_map(|w| &w.gates))
        .collect()
}

/// What a gate's `${variables}` stand for.
#[derive(Debug, Clone)]
pub struct Vars<'a> {
    /// The policy.
    pub policy_id: &'a str,
    /// Its version.
    pub version: &'a str,
    /// The bundle's digest.
    pub digest: &'a str,
    /// The wave's name.
    pub wave: &'a str,
    /// The wave's services (name, base URL).
    pub services: Vec<(&'a str, &'a str)>,
    /// The routed services not pushed yet: the baseline.
    pub baseline: Vec<&'a str>,
}

/// `(A|B)`, each name escaped for a Prometheus (RE2) regular expression.
pub fn services_regex<'s>(names: impl IntoIterator<Item = &'s str>) -> String {
    let escaped: Vec<String> = names
        .into_iter()
        .map(|n| {
            n.chars()
                .flat_map(|c| {
                    let special = "\\.+*?()|[]{}^$-".contains(c);
                    special
                        .then_some('\\')
                        .into_iter()
                        .chain(std::iter::once(c))
                })
                .collect()
        })
        .collect();
    format!("({})", escaped.join("|"))
}

fn render(template: &str, vars: &Vars<'_>, service: Option<(&str, &str)>, set: &[&str]) -> String {
    let (name, url) = service.unwrap_or(("", ""));
    template
        .replace("${services_regex}", &services_regex(set.iter().copied()))
        .replace("${service_url}", url.trim_end_matches('/'))
        .replace("${service}", name)
        .replace("${policy_id}", vars.policy_id)
        .replace("${version}", vars.version)
        .replace("${digest}", vars.digest)
        .replace("${wave}", vars.wave)
}

/// Evaluates `gate` for the wave described by `vars`: once, or once per
/// service of the wave when the gate names `${service}`. Each request is
/// asked once, bounded by `timeout`. A `plugin` gate is judged by its
/// plugin through `judge`.
pub async fn evaluate(
    client: &reqwest::Client,
    gate: &Gate,
    vars: &Vars<'_>,
    timeout: Duration,
    judge: Option<&PluginJudge<'_>>,
) -> Result<Vec<GateResult>, RolloutError> {
    let token = match gate {
        Gate::Http { token_env, .. }
        | Gate::Prometheus { token_env, .. }
        | Gate::Plugin { token_env, .. } => token_env
            .as_ref()
            .map(|var| {
                pde_core::secret::from_env(var).ok_or_else(|| RolloutError::MissingToken {
                    gate: gate.name().to_string(),
                    var: var.clone(),
                })
            })
            .transpose()?,
    };
    let wave: Vec<&str> = vars.services.iter().map(|(n, _)| *n).collect();
    let each: Vec<Option<(&str, &str)>> = match gate.per_service() {
        true => vars.services.iter().map(|s| Some(*s)).collect(),
        false => vec![None],
    };
    let runs = each.into_iter().map(|service| {
        let token = token.clone();
        let wave = &wave;
        async move {
            let mut r = match gate {
                Gate::Http {
                    url,
                    json_field,
                    equals,
                    ..
                } => {
                    let url = render(url, vars, service, wave);
                    let equals = match equals {
                        Some(serde_json::Value::String(s)) => {
                            Some(serde_json::Value::String(render(s, vars, service, wave)))
                        }
                        other => other.clone(),
                    };
                    let target = Target::new(gate.name(), &url, token);
                    let (verdict, detail) =
                        http_gate(client, &target, timeout, json_field.as_deref(), equals).await;
                    result(gate, url, Vec::new(), None, verdict, detail)
                }
                Gate::Prometheus {
                    url,
                    query,
                    max,
                    min,
                    baseline,
                    ..
                } => {
                    let target = Target::new(gate.name(), url, token);
                    let q = render(query, vars, service, wave);
                    let values = match prometheus(client, &target, timeout, &q).await {
                        Ok(v) => v,
                        Err(why) => {
                            return result(gate, q, Vec::new(), None, Verdict::Inconclusive, why);
                        }
                    };
                    let (mut verdict, mut detail) = bounded(&values, *max, *min);
                    let mut base = None;
                    if verdict == Verdict::Pass
                        && let Some(b) = baseline
                    {
                        (verdict, detail, base) = if vars.baseline.is_empty() {
                            (
                                Verdict::Skipped,
                                "no baseline left: every routed service is in this or an \
                                 earlier wave; the comparison is skipped"
                                    .to_string(),
                                None,
                            )
                        } else {
                            let bq = render(query, vars, service, &vars.baseline);
                            match prometheus(client, &target, timeout, &bq).await {
                                Err(why) => {
                                    (Verdict::Inconclusive, format!("baseline: {why}"), None)
                                }
                                Ok(bv) => compare(&values, &bv, b.factor, b.offset),
                            }
                        };
                    }
                    result(gate, q, values, base, verdict, detail)
                }
                Gate::Plugin { url, .. } => {
                    let target = Target::new(gate.name(), url, token);
                    judge::plugin_gate(client, gate, vars, timeout, &target, judge).await
                }
            };
            r.service = service.map(|(n, _)| n.to_string());
            r
        }
    });
    Ok(futures::future::join_all(runs).await)
}

fn result(
    gate: &Gate,
    query: String,
    values: Vec<f64>,
    baseline: Option<f64>,
    verdict: Verdict,
    detail: String,
) -> GateResult {
    let passed = match verdict {
        Verdict::Pass | Verdict::Skipped => true,
        Verdict::Fail => false,
        Verdict::Inconclusive => gate.on_no_data() == OnNoData::Pass,
    };
    GateResult {
        gate: gate.name().to_string(),
        kind: gate.kind().to_string(),
        service: None,
        query,
        values,
        baseline,
        verdict,
        passed,
        detail,
        statistics: Vec::new(),
    }
}

fn bounded(values: &[f64], max: Option<f64>, min: Option<f64>) -> (Verdict, String) {
    if let Some(v) = values.iter().find(|v| v.is_nan()) {
        return (Verdict::Inconclusive, format!("value {v} is not a number"));
    }
    for v in values {
        if let Some(m) = max
            && *v > m
        {
            return (Verdict::Fail, format!("value {v} is above max {m}"));
        }
        if let Some(m) = min
            && *v < m
        {
            return (Verdict::Fail, format!("value {v} is below min {m}"));
        }
    }
    let bounds = [
        max.map(|m| format!("<= {m}")),
        min.map(|m| format!(">= {m}")),
    ]
    .into_iter()
    .flatten()
    .collect::<Vec<_>>()
    .join(" and ");
    (Verdict::Pass, format!("values {values:?} within {bounds}"))
}

fn compare(
    wave: &[f64],
    baseline: &[f64],
    factor: f64,
    offset: f64,
) -> (Verdict, String, Option<f64>) {
    let highest = |v: &[f64]| v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let (w, b) = (highest(wave), highest(baseline));
    if baseline.is_empty() || b.is_nan() || w.is_nan() {
        return (
            Verdict::Inconclusive,
            "the baseline's query returned no (numeric) series".into(),
            None,
        );
    }
    let bound = factor * b + offset;
    if w <= bound {
        (
            Verdict::Pass,
            format!("wave {w} <= {factor} x baseline {b} + {offset} = {bound}"),
            Some(b),
        )
    } else {
        (
            Verdict::Fail,
            format!("wave {w} is above {factor} x baseline {b} + {offset} = {bound}"),
            Some(b),
        )
    }
}

async fn http_gate(
    client: &reqwest::Client,
    target: &Target,
    timeout: Duration,
    json_field: Option<&str>,
    equals: Option<serde_json::Value>,
) -> (Verdict, String) {
    let answer = match http::get_once(client, target, &target.url, timeout).await {
        Ok(a) => a,
        Err(why) => return (Verdict::Inconclusive, format!("no answer: {why}")),
    };
    if !answer.status.is_success() {
        return (
            Verdict::Fail,
            format!("HTTP {}: {}", answer.status, answer.excerpt()),
        );
    }
    let (Some(pointer), Some(want)) = (json_field, equals) else {
        return (Verdict::Pass, format!("HTTP {}", answer.status.as_u16()));
    };
    let body: serde_json::Value = match serde_json::from_slice(&answer.body) {
        Ok(b) => b,
        Err(e) => return (Verdict::Fail, format!("the body is not JSON: {e}")),
    };
    match body.pointer(pointer) {
        Some(got) if *got == want => (Verdict::Pass, format!("{pointer} = {got}")),
        Some(got) => (
            Verdict::Fail,
            format!("{pointer} is {got}, expected {want}"),
        ),
        None => (
            Verdict::Fail,
            format!("{pointer} is absent, expected {want}"),
        ),
    }
}

/// Prometheus's answer to `url`, asked once: its JSON when `status` is
/// `success`, else what Prometheus said was wrong.
async fn prometheus_answer(
    client: &reqwest::Client,
    target: &Target,
    url: &reqwest::Url,
    timeout: Duration,
) -> Result<serde_json::Value, String> {
    let answer = http::get_once(client, target, url.as_str(), timeout).await?;
    // The body was cut at the bound: say so, rather than "not a Prometheus
    // answer" about JSON that merely ends early.
    if answer.truncated {
        return Err(format!(
            "Prometheus's answer is larger than the {} MiB pde reads: ask for fewer series \
             or, for a plugin gate, a coarser `step` or a shorter `window`",
            http::MAX_BODY / (1024 * 1024)
        ));
    }
    let body: serde_json::Value = serde_json::from_slice(&answer.body)
        .map_err(|_| format!("not a Prometheus answer: {}", answer.excerpt()))?;
    if body["status"] != "success" {
        return Err(format!(
            "Prometheus: {}: {}",
            body["errorType"].as_str().unwrap_or("error"),
            body["error"].as_str().unwrap_or("(no message)")
        ));
    }
    Ok(body)
}

/// The value of every series of an instant query (a scalar is one value);
/// an empty vector is `Ok(vec![])`, which the caller calls no data.
async fn prometheus(
    client: &reqwest::Client,
    target: &Target,
    timeout: Duration,
    query: &str,
) -> Result<Vec<f64>, String> {
    let base = format!("{}/api/v1/query", target.url);
    let url = reqwest::Url::parse_with_params(&base, [("query", query)])
        .map_err(|e| format!("bad url {base:?}: {e}"))?;
    let body = prometheus_answer(client, target, &url, timeout).await?;
    let value = |v: &serde_json::Value| -> f64 {
        v.get(1)
            .and_then(|s| s.as_str())
            .and_then(|s| s.parse().ok())
            .unwrap_or(f64::NAN)
    };
    let data = &body["data"];
    let values: Vec<f64> = match data["resultType"].as_str() {
        Some("scalar") => vec![value(&data["result"])],
        Some("vector") => data["result"]
            .as_array()
            .map(|s| s.iter().map(|s| value(&s["value"])).collect())
            .unwrap_or_default(),
        other => return Err(format!("expected a vector or scalar, got {other:?}")),
    };
    if values.is_empty() {
        return Err(format!("no data: {query} returned no series"));
    }
    Ok(values)
}

/// Receives a rollout's progress: waves pushed, baked, judged.
pub trait RolloutObserver: Send + Sync {
    /// `event` (`wave-started`, `wave-pushed`, `baking`, `gate`,
    /// `wave-passed`, `paused`, `promoted`, `halted`, `rolled-back`) with
    /// its details as JSON.
    fn on_rollout(&self, event: &str, detail: &serde_json::Value);
}

/// The observer that ignores everything.
impl RolloutObserver for () {
    fn on_rollout(&self, _event: &str, _detail: &serde_json::Value) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regexes_escape_names() {
        assert_eq!(services_regex(["HMS-API", "a.b"]), r"(HMS\-API|a\.b)");
    }

    #[test]
    fn bounds_and_baselines() {
        assert_eq!(bounded(&[0.1, 0.2], Some(0.5), None).0, Verdict::Pass);
        assert_eq!(bounded(&[0.1, 0.7], Some(0.5), None).0, Verdict::Fail);
        assert_eq!(bounded(&[0.1], None, Some(0.5)).0, Verdict::Fail);
        assert_eq!(compare(&[0.02], &[0.01], 1.5, 0.001).0, Verdict::Fail);
        assert_eq!(compare(&[0.015], &[0.01], 1.5, 0.001).0, Verdict::Pass);
        assert_eq!(compare(&[0.015], &[], 1.5, 0.001).0, Verdict::Inconclusive);
    }

    #[test]
    fn waves_narrow_the_routed_services_and_the_last_takes_the_rest() {
        let text = r#"
[environments.p.rollout]
[[environments.p.rollout.waves]]
tags = ["canary"]
[[environments.p.rollout.waves]]
percent = 50
[[environments.p.rollout.waves]]
"#;
        let mut toml = String::new();
        for (i, tag) in ["canary", "", "", "", ""].iter().enumerate() {
            toml.push_str(&format!(
                "[[environments.p.services]]\nname = \"S{i}\"\nurl = \"http://127.0.0.1:1\"\ntags = [\"{tag}\"]\n"
            ));
        }
        toml.push_str(text);
        let c = crate::config::Config::parse(&toml, std::path::Path::new("pde.toml")).unwrap();
        let env = c.environment("p").unwrap();
        let routed: Vec<String> = ["S0", "S1", "S2", "S4"].map(String::from).to_vec();
        let waves = plan(env.rollout.as_ref().unwrap(), &env.services, &routed);
        let names: Vec<Vec<String>> = waves.iter().map(|w| w.services.clone()).collect();
        assert_eq!(names, [vec!["S0"], vec!["S1", "S2"], vec!["S4"]]);
    }
}
