//! The `plugin` gate (issue 22 §6): a sandboxed judge.
//!
//! The gate's PromQL query is asked as a range query over the wave's bake
//! twice, once with `${services_regex}` bound to the wave's services and
//! once to the baseline's (the routed services not pushed yet), and both
//! sets of samples go to a gate plugin (`pde:plugin@0.3.0`, world `gate`),
//! which returns pass, fail or inconclusive with a reason and a few named
//! statistics. The plugin runs in the same sandbox, limits and signature
//! rules as validators and routers, since it is loaded with them.
//!
//! Why the verdicts map as they do:
//! - a query that fails (Prometheus down, a bad query) is `inconclusive`,
//!   as for the `prometheus` gate: "could not tell" fails the wave unless
//!   the gate says `on_no_data = "pass"`;
//! - a plugin fault (a trap, a limit, its own `err`) is `fail`, never
//!   `inconclusive`: `on_no_data = "pass"` must not let a broken judge wave
//!   a rollout through.

use std::time::Duration;

use crate::config::{Gate, parse_duration};
use crate::http::Target;
use crate::plugin::{CallContext, GateInput, PluginKind, PluginSet, PolicyInput, Samples, Series};

use super::{GateResult, Statistic, Vars, Verdict, render, result};

/// What a plugin gate needs beside the wave's variables: the plugins, the
/// policy rolled out, the environment, and the wave's bake (the default
/// window).
pub struct PluginJudge<'a> {
    /// The workspace's plugins, loaded and checked.
    pub plugins: &'a PluginSet,
    /// The policy rolled out.
    pub policy: PolicyInput,
    /// The environment.
    pub environment: &'a str,
    /// The wave's bake: the window queried unless the gate sets `window`.
    pub bake: Duration,
}

/// Evaluates a `plugin` gate for the wave described by `vars`.
pub(super) async fn plugin_gate(
    client: &reqwest::Client,
    gate: &Gate,
    vars: &Vars<'_>,
    timeout: Duration,
    target: &Target,
    judge: Option<&PluginJudge<'_>>,
) -> GateResult {
    let Gate::Plugin {
        plugin,
        query,
        step,
        window,
        ..
    } = gate
    else {
        return result(
            gate,
            String::new(),
            Vec::new(),
            None,
            Verdict::Fail,
            "not a plugin gate".into(),
        );
    };
    let wave: Vec<&str> = vars.services.iter().map(|(n, _)| *n).collect();
    let q = render(query, vars, None, &wave);
    let Some(judge) = judge else {
        return result(
            gate,
            q,
            Vec::new(),
            None,
            Verdict::Fail,
            "the plugins were not loaded for this rollout".into(),
        );
    };
    let step = parse_duration(step).unwrap_or(Duration::from_secs(1));
    let window = window
        .as_deref()
        .and_then(|w| parse_duration(w).ok())
        .unwrap_or(judge.bake);
    let end = jiff::Timestamp::now();
    let start = end - jiff::SignedDuration::try_from(window).unwrap_or_default();
    let range = Range { start, end, step };
    let wave_samples = match query_range(client, target, timeout, &q, &range).await {
        Ok(s) => s,
        Err(why) => return result(gate, q, Vec::new(), None, Verdict::Inconclusive, why),
    };
    let baseline_samples = if vars.baseline.is_empty() {
        None
    } else {
        let bq = render(query, vars, None, &vars.baseline);
        match query_range(client, target, timeout, &bq, &range).await {
            Ok(s) => Some(s),
            Err(why) => {
                return result(
                    gate,
                    q,
                    Vec::new(),
                    None,
                    Verdict::Inconclusive,
                    format!("baseline: {why}"),
                );
            }
        }
    };
    let Some(found) = judge
        .plugins
        .plugins
        .iter()
        .find(|p| p.name == *plugin && p.kind == PluginKind::Gate)
    else {
        return result(
            gate,
            q,
            Vec::new(),
            None,
            Verdict::Fail,
            format!("gate plugin {plugin:?} is not among the workspace's plugins"),
        );
    };
    let counts = format!(
        "wave: {} samples in {} series; baseline: {}",
        wave_samples.len(),
        wave_samples.series.len(),
        baseline_samples
            .as_ref()
            .map_or("none left".to_string(), |b| format!(
                "{} samples in {} series",
                b.len(),
                b.series.len()
            ))
    );
    let input = GateInput {
        gate: gate.name().to_string(),
        wave: vars.wave.to_string(),
        services: wave.iter().map(|s| s.to_string()).collect(),
        digest: vars.digest.to_string(),
        start: start.to_string(),
        end: end.to_string(),
        step_seconds: step.as_secs_f64(),
        wave_samples,
        baseline_samples,
    };
    let ctx = CallContext::env(judge.environment);
    let host = &judge.plugins.host;
    let called = crate::runtime::off_runtime(|| host.gate(found, &judge.policy, &ctx, &input));
    let (verdict, detail, statistics) = match called {
        Err(e) => (
            Verdict::Fail,
            format!("gate plugin {plugin:?} failed: {e} ({counts})"),
            Vec::new(),
        ),
        Ok(report) => {
            let j = report.value;
            let verdict = match j.verdict {
                crate::plugin::GateVerdict::Pass => Verdict::Pass,
                crate::plugin::GateVerdict::Fail => Verdict::Fail,
                crate::plugin::GateVerdict::Inconclusive => Verdict::Inconclusive,
            };
            // JSON has no NaN or infinity, and the report is stored as JSON.
            let statistics = j
                .statistics
                .into_iter()
                .filter(|(_, v)| v.is_finite())
                .map(|(name, value)| Statistic { name, value })
                .collect();
            (
                verdict,
                format!("{plugin}: {} ({counts})", j.reason),
                statistics,
            )
        }
    };
    let mut r = result(gate, q, Vec::new(), None, verdict, detail);
    r.statistics = statistics;
    r
}

/// The window and resolution of a range query.
struct Range {
    start: jiff::Timestamp,
    end: jiff::Timestamp,
    step: Duration,
}

/// Every series of a range query (`/api/v1/query_range`), each with its
/// labels and points. No series is `Ok` with none: the plugin decides what
/// no data means.
async fn query_range(
    client: &reqwest::Client,
    target: &Target,
    timeout: Duration,
    query: &str,
    range: &Range,
) -> Result<Samples, String> {
    let base = format!("{}/api/v1/query_range", target.url);
    let seconds = |t: jiff::Timestamp| format!("{:.3}", t.as_millisecond() as f64 / 1000.0);
    let url = reqwest::Url::parse_with_params(
        &base,
        [
            ("query", query),
            ("start", &seconds(range.start)),
            ("end", &seconds(range.end)),
            ("step", &format!("{}", range.step.as_secs_f64())),
        ],
    )
    .map_err(|e| format!("bad url {base:?}: {e}"))?;
    let body = super::prometheus_answer(client, target, &url, timeout).await?;
    let data = &body["data"];
    if data["resultType"] != "matrix" {
        return Err(format!(
            "expected a range (matrix) result, got {}",
            data["resultType"]
        ));
    }
    let series = data["result"]
        .as_array()
        .map(|all| all.iter().map(series_of).collect())
        .unwrap_or_default();
    Ok(Samples {
        query: query.to_string(),
        series,
    })
}

/// One series of a matrix: `{"metric": {...}, "values": [[t, "v"], ...]}`.
fn series_of(s: &serde_json::Value) -> Series {
    let labels = s["metric"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect()
        })
        .unwrap_or_default();
    let samples = s["values"]
        .as_array()
        .map(|points| {
            points
                .iter()
                .map(|p| {
                    let at = p[0].as_f64().unwrap_or(f64::NAN);
                    let value = p[1]
                        .as_str()
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(f64::NAN);
                    (at, value)
                })
                .collect()
        })
        .unwrap_or_default();
    Series { labels, samples }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matrix_series_keep_labels_and_points() {
        let s = series_of(&serde_json::json!({
            "metric": {"service": "S0"},
            "values": [[1700000000.5, "0.5"], [1700000001.5, "NaN"]]
        }));
        assert_eq!(s.labels["service"], "S0");
        assert_eq!(s.samples[0], (1_700_000_000.5, 0.5));
        assert!(s.samples[1].1.is_nan());
    }
}
