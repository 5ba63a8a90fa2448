//! Cost of a gate plugin (issue 22 §6): one `PluginHost::gate` call of the
//! `mann-whitney-gate` component on a wave and a baseline of 1,000 samples
//! each, against the same test run natively, side by side in one run.
//!
//! The native side is the plugin crate itself (`mann_whitney_gate::judge`
//! and `stats.rs`, linked as a normal Rust library: the component's export
//! exists only on wasm), so both sides run the very same statistics code;
//! it also does the guest's own share of the work (read the settings, pull
//! the values out of the series). What the sandboxed side adds is the
//! sandbox: a fresh store and instance, lowering 2 × 1,000 points into the
//! guest, the guest's wasm speed, and the host's checks of the judgement.
//!
//! Four figures:
//! - `sandboxed`: `PluginHost::gate` as a rollout calls it;
//! - `native_same_work`: `Settings::parse` + values + `judge`;
//! - `sandboxed_2x10`: the same call on 2 x 10 points, which is almost all
//!   the per-call cost of the sandbox (a fresh instance, the settings, the
//!   result's checks) with next to no statistics;
//! - `native_test_only`: `stats::mann_whitney` on ready value slices.
//!
//! Results and the command are recorded in BENCHMARKS.md.
// Test code: a failed unwrap is a failed test, with its location.
#![allow(clippy::unwrap_used)]

use std::path::Path;

use criterion::{Criterion, criterion_group};
use mann_whitney_gate::{Settings, Verdict, judge, stats};
use pde::config::Limits;
use pde::keys::TrustedKeys;
use pde::plugin::{CallContext, GateInput, GateVerdict, PluginHost, PolicyInput, Samples, Series};

const SETTINGS: &str = r#"{"alpha": 0.05, "min_samples": 10, "direction": "higher"}"#;

/// `n` points one second apart around `base`, with deterministic noise (a
/// rollout's error ratio, scraped every second).
fn samples(base: f64, n: usize) -> Samples {
    Samples {
        query: "rate(errors[1m])".into(),
        series: vec![Series {
            labels: [("service".to_string(), "S0".to_string())].into(),
            samples: (0..n)
                .map(|i| {
                    let t = 1_700_000_000.0 + i as f64;
                    (t, base + (i as f64 * 0.618_034).fract() * 0.01)
                })
                .collect(),
        }],
    }
}

fn input(n: usize) -> GateInput {
    GateInput {
        gate: "mann-whitney".into(),
        wave: "canary".into(),
        services: vec!["S0".into()],
        digest: "sha256:00".into(),
        start: "2031-01-01T00:00:00Z".into(),
        end: "2031-01-01T00:16:40Z".into(),
        step_seconds: 1.0,
        // Slightly higher than the baseline: the test has real work to do.
        wave_samples: samples(0.0105, n),
        baseline_samples: Some(samples(0.01, n)),
    }
}

fn native_same_work(input: &GateInput) -> Verdict {
    let settings = Settings::parse(SETTINGS).unwrap();
    let wave: Vec<f64> = input.wave_samples.values().collect();
    let baseline: Option<Vec<f64>> = input
        .baseline_samples
        .as_ref()
        .map(|b| b.values().collect());
    judge(&settings, &wave, baseline.as_deref()).0
}

fn calls(c: &mut Criterion) {
    let host = PluginHost::new(Limits::default(), None).unwrap();
    let wasm = pde_plugin_artifacts::wasm("mann-whitney-gate").expect("built");
    let mut plugin = host
        .load_file(Path::new(wasm), &TrustedKeys::new())
        .unwrap();
    plugin.settings = serde_json::from_str(SETTINGS).unwrap();
    let policy = PolicyInput {
        id: "42".into(),
        version: "1.0.0".into(),
        document: serde_json::json!({"id": "42", "version": "1.0.0"}),
    };
    let ctx = CallContext::env("production");
    let input = input(1000);
    // Both sides agree before anything is timed.
    let sandboxed = host.gate(&plugin, &policy, &ctx, &input).unwrap().value;
    let native = native_same_work(&input);
    let same = matches!(
        (sandboxed.verdict, native),
        (GateVerdict::Pass, Verdict::Pass)
            | (GateVerdict::Fail, Verdict::Fail)
            | (GateVerdict::Inconclusive, Verdict::Inconclusive)
    );
    assert!(same, "sandboxed {sandboxed:?} but native {native:?}");
    let wave: Vec<f64> = input.wave_samples.values().collect();
    let baseline: Vec<f64> = input.baseline_samples.as_ref().unwrap().values().collect();

    let call = |input: &GateInput| {
        host.gate(&plugin, &policy, &ctx, input)
            .unwrap()
            .value
            .verdict
    };
    let mut group = c.benchmark_group("gate_plugin/2x1000");
    group.bench_function("sandboxed", |b| b.iter(|| call(&input)));
    group.bench_function("native_same_work", |b| b.iter(|| native_same_work(&input)));
    let small = self::input(10);
    group.bench_function("sandboxed_2x10", |b| b.iter(|| call(&small)));
    group.bench_function("native_test_only", |b| {
        b.iter(|| stats::mann_whitney(&wave, &baseline).unwrap().p)
    });
    group.finish();
}

criterion_group!(benches, calls);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
}
