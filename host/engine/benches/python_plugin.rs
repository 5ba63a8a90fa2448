//! The Python example validator (`plugins/python/eligibility-bounds-py`,
//! built here with componentize-py) beside the Rust `eligibility-bounds`
//! doing the same check: component size, cold compile, load from the
//! on-disk compile cache, and fuel and wall time per `validate` call.
//!
//! A bench binary rather than criterion: one cold compile of the 18 MB
//! Python component takes tens of seconds, so it is timed a few times, not
//! sampled hundreds of times. Every figure of both plugins comes from the
//! same run, back to back. componentize-py comes from the test venv:
//! `PDE_TEST_PYTHON` (see scripts/lib.sh `ensure_pyenv`). Results and the
//! command are recorded in BENCHMARKS.md.
//!
//! `-- --calls-only` measures only the per-call rows (issue 24 §2: the
//! Python call against its Rust twin), loading both through a compile cache
//! that persists between runs in the target dir, so a rerun compiles
//! nothing: quick enough to compare engine settings.
// Bench code: a failed unwrap is a failed run, with its location.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use pde::config::Limits;
use pde::keys::TrustedKeys;
use pde::plugin::{CallContext, Plugin, PluginHost};
use serde_json::{Value, json};

mod common;
use common::policy;

const COLD_RUNS: usize = 2;
const CACHED_RUNS: usize = 10;
const CALLS: usize = 20;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Builds the Python example with the venv's componentize-py.
fn build_python(out: &Path) -> PathBuf {
    let python = std::env::var_os("PDE_TEST_PYTHON").expect(
        "PDE_TEST_PYTHON is not set: `. scripts/lib.sh; export PDE_TEST_PYTHON=$(ensure_pyenv target)/bin/python`",
    );
    let bin = Path::new(&python).parent().unwrap().join("componentize-py");
    let wasm = out.join("eligibility-bounds-py.wasm");
    // Built from a copy, so Python's __pycache__ stays out of the checkout.
    std::fs::copy(
        repo().join("plugins/python/eligibility-bounds-py/app.py"),
        out.join("app.py"),
    )
    .unwrap();
    let o = Command::new(&bin)
        .current_dir(out)
        .arg("--wit-path")
        .arg(repo().join("wit/v0.1.0"))
        .args(["--world", "validator", "componentize", "app", "-o"])
        .arg(&wasm)
        .output()
        .unwrap_or_else(|e| panic!("{} runs: {e}", bin.display()));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    wasm
}

/// The settings of both manifests (the plugins' shipped defaults).
fn settings() -> Value {
    json!({"categories": ["eligibility"], "age": {"min": 0, "max": 120},
           "income": {"min": 0, "max": 1000000}, "percent": {"min": 0, "max": 100}})
}

fn load(host: &PluginHost, wasm: &Path) -> (Plugin, Duration) {
    let start = Instant::now();
    let mut plugin = host.load_file(wasm, &TrustedKeys::new()).unwrap();
    let took = start.elapsed();
    plugin.settings = settings();
    (plugin, took)
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

struct Figures {
    size: u64,
    cold_ms: f64,
    cached_ms: f64,
    hash_ms: f64,
    entry_bytes: u64,
    entry_hash_ms: f64,
    /// (rules, fuel, median wall ms) per policy size.
    calls: Vec<(usize, u64, f64)>,
    findings: Vec<Vec<(String, String, String)>>,
}

fn measure(wasm: &Path, cache: &Path, calls_only: bool) -> Figures {
    let size = std::fs::metadata(wasm).unwrap().len();
    let uncached = PluginHost::new(Limits::default(), None).unwrap();
    let cold: Vec<f64> = if calls_only {
        vec![f64::NAN]
    } else {
        (0..COLD_RUNS)
            .map(|_| ms(load(&uncached, wasm).1))
            .collect()
    };
    let cached_host = PluginHost::new(Limits::default(), Some(cache.to_path_buf())).unwrap();
    let (first, _) = load(&cached_host, wasm);
    assert!(
        calls_only || !first.loaded_from_cache,
        "the cache dir starts empty"
    );
    let cached = (0..CACHED_RUNS)
        .map(|_| {
            let (p, took) = load(&cached_host, wasm);
            assert!(p.loaded_from_cache);
            ms(took)
        })
        .collect();
    // What a cached load spends on reading and hashing the .wasm alone.
    let hash = (0..CACHED_RUNS)
        .map(|_| {
            let start = Instant::now();
            let bytes = std::fs::read(wasm).unwrap();
            let _ = pde::plugin::sha256_hex(&bytes);
            ms(start.elapsed())
        })
        .collect();
    // And on reading and checksumming the compiled entry in the cache.
    let entry = walk(cache)
        .into_iter()
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .expect("the cache holds the compiled component");
    let entry_bytes = std::fs::metadata(&entry).unwrap().len();
    let entry_hash = (0..CACHED_RUNS)
        .map(|_| {
            let start = Instant::now();
            let bytes = std::fs::read(&entry).unwrap();
            let _ = pde::plugin::sha256_hex(&bytes);
            ms(start.elapsed())
        })
        .collect();
    let call = CallContext::default();
    let mut calls = Vec::new();
    let mut findings = Vec::new();
    for n in [0usize, 50, 1000] {
        let p = policy(n);
        let mut fuel = 0;
        let walls = (0..CALLS)
            .map(|_| {
                let r = cached_host.validate(&first, &p, &call).unwrap();
                fuel = r.fuel_used;
                if findings.len() == calls.len() {
                    findings.push(
                        r.value
                            .iter()
                            .map(|d| (d.path.clone(), d.code.clone(), d.message.clone()))
                            .collect(),
                    );
                }
                ms(r.elapsed)
            })
            .collect();
        calls.push((n, fuel, median(walls)));
    }
    Figures {
        size,
        // The fastest cold compile: the ratio to a cached load is then the
        // least flattering one.
        cold_ms: cold.into_iter().fold(f64::INFINITY, f64::min),
        cached_ms: median(cached),
        hash_ms: median(hash),
        entry_bytes,
        entry_hash_ms: median(entry_hash),
        calls,
        findings,
    }
}

fn main() {
    let calls_only = std::env::args().any(|a| a == "--calls-only");
    let dir = tempfile::tempdir().unwrap();
    let py_wasm = build_python(dir.path());
    let rust_wasm = PathBuf::from(pde_plugin_artifacts::wasm("eligibility-bounds").unwrap());
    // Calls only: a cache kept between runs (componentize-py builds the
    // same bytes each time, so the entry is found again).
    let caches = if calls_only {
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("python-plugin-bench-cache")
    } else {
        dir.path().to_path_buf()
    };
    let rust = measure(&rust_wasm, &caches.join("cache-rust"), calls_only);
    let py = measure(&py_wasm, &caches.join("cache-python"), calls_only);
    assert_eq!(rust.findings, py.findings, "both plugins find the same");
    if calls_only {
        println!(
            "| | Rust `eligibility-bounds` | Python `eligibility-bounds-py` | Python / Rust |"
        );
        println!("|---|---:|---:|---:|");
        print_calls(&rust, &py);
        return;
    }

    println!("| | Rust `eligibility-bounds` | Python `eligibility-bounds-py` | Python / Rust |");
    println!("|---|---:|---:|---:|");
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    println!(
        "| component size | {:.2} MiB | {:.1} MiB | {:.0}x |",
        mib(rust.size),
        mib(py.size),
        py.size as f64 / rust.size as f64
    );
    println!(
        "| cold compile (fastest of {COLD_RUNS}) | {:.0} ms | {:.0} ms | {:.0}x |",
        rust.cold_ms,
        py.cold_ms,
        py.cold_ms / rust.cold_ms
    );
    println!(
        "| load from the compile cache (median of {CACHED_RUNS}) | {:.1} ms | {:.1} ms | {:.0}x |",
        rust.cached_ms,
        py.cached_ms,
        py.cached_ms / rust.cached_ms
    );
    println!(
        "| of which: read + sha256 of the .wasm | {:.1} ms | {:.1} ms | |",
        rust.hash_ms, py.hash_ms
    );
    println!(
        "| compiled cache entry | {:.1} MiB | {:.1} MiB | |",
        mib(rust.entry_bytes),
        mib(py.entry_bytes)
    );
    println!(
        "| of which: read + sha256 of the cache entry | {:.1} ms | {:.1} ms | |",
        rust.entry_hash_ms, py.entry_hash_ms
    );
    println!(
        "| **cold compile / cached load** | **{:.0}x** | **{:.0}x** | |",
        rust.cold_ms / rust.cached_ms,
        py.cold_ms / py.cached_ms
    );
    print_calls(&rust, &py);
}

/// The per-call rows: fuel and median wall time, Python beside Rust.
fn print_calls(rust: &Figures, py: &Figures) {
    for ((n, rf, rw), (_, pf, pw)) in rust.calls.iter().zip(&py.calls) {
        println!(
            "| `validate`, {n} rules: fuel | {rf} | {pf} | {:.0}x |",
            *pf as f64 / *rf as f64
        );
        println!(
            "| `validate`, {n} rules: wall (median of {CALLS}) | {rw:.2} ms | {pw:.2} ms | {:.0}x |",
            pw / rw
        );
    }
}
