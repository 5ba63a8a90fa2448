//! Cost of the sandbox: a fresh-instance `validate` call of the
//! `eligibility-bounds` component against the same Rust logic called
//! natively, on 50- and 1,000-rule policies; plus compiling a component
//! against loading it from the on-disk cache.
//!
//! Three figures per policy size:
//! - `sandboxed`: `PluginHost::validate`, i.e. new store + WASI context,
//!   instantiate from the cached `InstancePre`, serialise the document,
//!   lift/lower across the component boundary, the guest parses the JSON and
//!   runs the check, the host bounds and attributes the diagnostics;
//! - `native_same_work`: the same JSON work natively (serialise the document,
//!   parse it back as the guest must, parse settings, run `check`), so the
//!   gap to `sandboxed` is the sandbox alone;
//! - `native_logic`: `check` on an already parsed policy (the floor).
//!
//! `call_overhead/*` uses a policy with no rules, where the gap between
//! sandboxed and native is almost pure per-call overhead.
//!
//! `active_policy/*` is the price of `pde:plugin@0.2.0`'s `context.active`
//! for a plugin that never looks at it: the same call with and without an
//! active version as large as the policy (the host serialises and passes
//! it, the SDK parses it).
//!
//! `rego/*` puts the sandboxed plugin beside the same check ported to Rego
//! (benches/rego/eligibility.rego) on regorus, the Rust OPA engine, at 0, 50
//! and 1,000 rules: each iteration hands regorus the policy and settings as
//! JSON and evaluates the findings. tests/all/rego_parity.rs checks that both
//! give the same findings.
//! Results and the command are recorded in BENCHMARKS.md.
// Test code: a failed unwrap is a failed test, with its location.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group};
use pde::config::Limits;
use pde::keys::TrustedKeys;
use pde::plugin::{CallContext, Plugin, PluginHost, PolicyInput};
use pde_plugin::{Context, Policy};
use serde_json::{Value, json};

mod common;
use common::policy;

fn settings() -> Value {
    json!({"age": {"min": 16, "max": 120}, "income": {"min": 0, "max": 250000}})
}

fn wasm() -> PathBuf {
    PathBuf::from(pde_plugin_artifacts::wasm("eligibility-bounds").expect("artifact"))
}

fn load(host: &PluginHost) -> Plugin {
    let mut plugin = host.load_file(&wasm(), &TrustedKeys::new()).expect("loads");
    plugin.settings = settings();
    plugin
}

fn native_same_work(p: &PolicyInput, settings_text: &str) -> usize {
    let text = p.document.to_string();
    let policy = Policy::from_json(p.id.clone(), p.version.clone(), &text).unwrap();
    let ctx = Context::from_json("", settings_text).unwrap();
    eligibility_bounds::check(&policy, &ctx).unwrap().len()
}

fn calls(c: &mut Criterion) {
    let host = PluginHost::new(Limits::default(), None).unwrap();
    let plugin = load(&host);
    let call = CallContext::default();
    let settings_text = settings().to_string();
    let ctx = Context::new("", settings());

    let mut group = c.benchmark_group("call_overhead");
    let empty = policy(0);
    group.bench_function("sandboxed", |b| {
        b.iter(|| host.validate(&plugin, &empty, &call).unwrap().value.len())
    });
    group.bench_function("native_same_work", |b| {
        b.iter(|| native_same_work(&empty, &settings_text))
    });
    group.finish();

    let mut group = c.benchmark_group("validate");
    for n in [50usize, 1000] {
        let p = policy(n);
        let expected = host.validate(&plugin, &p, &call).unwrap().value.len();
        assert_eq!(
            expected,
            native_same_work(&p, &settings_text),
            "same findings"
        );
        assert!(expected > 0);
        let parsed = Policy::from_value(p.document.clone());
        group.bench_with_input(BenchmarkId::new("sandboxed", n), &p, |b, p| {
            b.iter(|| host.validate(&plugin, p, &call).unwrap().value.len())
        });
        group.bench_with_input(BenchmarkId::new("native_same_work", n), &p, |b, p| {
            b.iter(|| native_same_work(p, &settings_text))
        });
        group.bench_with_input(BenchmarkId::new("native_logic", n), &parsed, |b, parsed| {
            b.iter(|| eligibility_bounds::check(parsed, &ctx).unwrap().len())
        });
    }
    group.finish();

    let mut group = c.benchmark_group("active_policy");
    for n in [50usize, 1000] {
        let p = policy(n);
        let with = CallContext {
            environment: "production".into(),
            active: Some(pde::plugin::ActivePolicy {
                version: "1.2.0".into(),
                digest: format!("sha256:{}", "0".repeat(64)),
                deployed_at: "2031-01-01T00:00:00Z".into(),
                document: p.document.clone(),
            }),
        };
        let without = CallContext::env("production");
        assert!(plugin.sees_active_policy());
        group.bench_with_input(BenchmarkId::new("none", n), &p, |b, p| {
            b.iter(|| host.validate(&plugin, p, &without).unwrap().value.len())
        });
        group.bench_with_input(BenchmarkId::new("same_size", n), &p, |b, p| {
            b.iter(|| host.validate(&plugin, p, &with).unwrap().value.len())
        });
    }
    group.finish();
}

fn loading(c: &mut Criterion) {
    let cache = tempfile::tempdir().unwrap();
    let uncached = PluginHost::new(Limits::default(), None).unwrap();
    let cached = PluginHost::new(Limits::default(), Some(cache.path().join("plugins"))).unwrap();
    assert!(!load(&cached).loaded_from_cache);
    assert!(load(&cached).loaded_from_cache);
    let mut group = c.benchmark_group("load");
    group.sample_size(10);
    group.bench_function("compile", |b| b.iter(|| load(&uncached).sha256.len()));
    group.bench_function("cached", |b| {
        b.iter(|| {
            let p = load(&cached);
            assert!(p.loaded_from_cache);
            p.sha256.len()
        })
    });
    group.finish();
}

const REGO: &str = include_str!("rego/eligibility.rego");

fn rego_findings(engine: &mut regorus::Engine, p: &PolicyInput, settings: &Value) -> usize {
    let input = json!({"policy": &p.document, "settings": settings}).to_string();
    engine.set_input(regorus::Value::from_json_str(&input).unwrap());
    let out = engine
        .eval_rule("data.eligibility.findings".into())
        .unwrap();
    out.as_set().unwrap().len()
}

fn rego(c: &mut Criterion) {
    let host = PluginHost::new(Limits::default(), None).unwrap();
    let plugin = load(&host);
    let call = CallContext::default();
    let mut engine = regorus::Engine::new();
    engine
        .add_policy("eligibility.rego".into(), REGO.into())
        .unwrap();
    let mut group = c.benchmark_group("rego");
    // regorus takes tens of milliseconds at 50 rules and more at 1,000.
    group.sample_size(10);
    for n in [0usize, 50, 1000] {
        let p = policy(n);
        let expected = host.validate(&plugin, &p, &call).unwrap().value.len();
        assert_eq!(
            rego_findings(&mut engine, &p, &settings()),
            expected,
            "same findings"
        );
        group.bench_with_input(BenchmarkId::new("sandboxed", n), &p, |b, p| {
            b.iter(|| host.validate(&plugin, p, &call).unwrap().value.len())
        });
        group.bench_with_input(BenchmarkId::new("regorus", n), &p, |b, p| {
            let settings = settings();
            b.iter(|| rego_findings(&mut engine, p, &settings))
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = calls, loading, rego
}
/// Instruction-count mode (`PDE_BENCH_COUNT=N`): N calls of each kind, each
/// kind inside its own never-inlined function, so that
/// `valgrind --tool=callgrind` and `callgrind_annotate --inclusive=yes` give
/// instructions per call, a figure that does not drift with the machine's
/// load. The component is loaded from a cache (compiling under valgrind takes
/// minutes): run it once natively first to fill the cache.
fn count(calls: usize) {
    let cache = std::env::temp_dir().join("pde-plugin-call-count-cache");
    let host = PluginHost::new(Limits::default(), Some(cache)).unwrap();
    let plugin = load(&host);
    let call = CallContext::default();
    let settings_text = settings().to_string();
    let empty = policy(0);
    let large = policy(1000);
    // Warm: the first call of each kind pays for lazy set-up.
    host.validate(&plugin, &empty, &call).unwrap();
    native_same_work(&empty, &settings_text);
    #[inline(always)]
    fn sandboxed(host: &PluginHost, plugin: &Plugin, p: &PolicyInput, calls: usize) {
        for _ in 0..calls {
            std::hint::black_box(host.validate(plugin, p, &CallContext::default()).unwrap());
        }
    }
    #[inline(always)]
    fn native(p: &PolicyInput, settings_text: &str, calls: usize) {
        for _ in 0..calls {
            std::hint::black_box(native_same_work(p, settings_text));
        }
    }
    #[inline(never)]
    fn pde_count_sandboxed(host: &PluginHost, plugin: &Plugin, p: &PolicyInput, calls: usize) {
        sandboxed(host, plugin, p, calls)
    }
    #[inline(never)]
    fn pde_count_native(p: &PolicyInput, settings_text: &str, calls: usize) {
        native(p, settings_text, calls)
    }
    #[inline(never)]
    fn pde_count_sandboxed_1000(host: &PluginHost, plugin: &Plugin, p: &PolicyInput, calls: usize) {
        sandboxed(host, plugin, p, calls)
    }
    #[inline(never)]
    fn pde_count_native_1000(p: &PolicyInput, settings_text: &str, calls: usize) {
        native(p, settings_text, calls)
    }
    pde_count_sandboxed(&host, &plugin, &empty, calls);
    pde_count_native(&empty, &settings_text, calls);
    pde_count_sandboxed_1000(&host, &plugin, &large, calls.div_ceil(10));
    pde_count_native_1000(&large, &settings_text, calls.div_ceil(10));
    let _ = call;
}

fn main() {
    if let Some(n) = std::env::var("PDE_BENCH_COUNT")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        count(n);
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
