//! The report's cost against `pde audit verify`, side by side on the same
//! 100,000-record audit chain (issue 25: at most 1.5×).
//!
//! The chain is written by the engine's own audit writer
//! (`AuditLog::append_all`, hashing and linking every record as a deploy
//! does), 1,000 records per durable append: 50 policies × 3 environments
//! deployed over and over, each deploy the records a real one leaves
//! (`deploy_start` … `deployed`, one `pushed` per service).
//!
//! - `audit-verify`: what `pde audit verify --output json` does: open the
//!   engine read-only, verify the chain and its anchors, print the JSON;
//! - `report-html`: what `pde report --html FILE` does: open the engine
//!   read-only, build the report (which verifies the chain), write the file.
//!
//! Run: `cargo bench --workspace --bench report` (not `-p pde-console`,
//! which builds shared dependencies with other features). Under `cargo test
//! --benches` (criterion's test mode, scripts/test.sh) the chain has 2,000
//! records, so the smoke run stays short.
// Test code: a failed unwrap is a failed test, with its location.
#![allow(clippy::unwrap_used, missing_docs)]

use std::path::Path;

mod common;

use criterion::Criterion;
use pde::audit::{AuditEntry, AuditLog, Event};
use serde_json::json;

const POLICIES: usize = 50;
const ENVS: [&str; 3] = ["dev", "staging", "production"];
const SERVICES: usize = 2;
const BATCH: usize = 1000;

fn workspace(records: usize) -> tempfile::TempDir {
    let dir = common::workspace(&ENVS, SERVICES);
    let root = dir.path();
    let state_dir = root.join(".pde");
    let state = pde::state::StateStore::open(&state_dir).unwrap();
    for p in 0..POLICIES {
        for env in ENVS {
            state
                .set_active(&format!("{p}"), env, "1.0.0", &digest(p, 0))
                .unwrap();
        }
    }
    drop(state);
    write_chain(&state_dir, records);
    dir
}

fn digest(policy: usize, run: usize) -> String {
    format!("sha256:{:032x}{:032x}", policy, run)
}

/// One deploy's records, as the pipeline writes them.
fn deploy(policy: usize, env: &str, run: usize) -> Vec<AuditEntry> {
    let id = format!("{policy}");
    let version = format!("1.0.{run}");
    let digest = digest(policy, run);
    let entry = |event, data| AuditEntry {
        event,
        policy_id: id.clone(),
        env: env.to_string(),
        data,
    };
    let mut out = vec![
        entry(Event::DeployStart, json!({"version": version})),
        entry(
            Event::Validated,
            json!({"version": version, "findings": 0, "plugins": ["pii-guard", "effective-date"]}),
        ),
        entry(
            Event::Packaged,
            json!({"version": version, "digest": digest, "signed_by": "release"}),
        ),
        entry(Event::EnvCheckOk, json!({"services": SERVICES})),
        entry(
            Event::Routed,
            json!({"services": (0..SERVICES).map(|s| format!("SVC-{s}")).collect::<Vec<_>>()}),
        ),
    ];
    for s in 0..SERVICES {
        out.push(entry(
            Event::Pushed,
            json!({"service": format!("SVC-{s}"), "digest": digest, "status": 200}),
        ));
    }
    out.push(entry(
        Event::Deployed,
        json!({"version": version, "digest": digest}),
    ));
    out
}

/// Appends `records` records through the engine's audit writer.
fn write_chain(state_dir: &Path, records: usize) {
    let log = AuditLog::open_with_actor(state_dir, "release-engineer@hms.example.gov").unwrap();
    let mut pending = Vec::with_capacity(BATCH);
    let mut written = 0;
    let mut run = 0;
    'outer: loop {
        run += 1;
        for p in 0..POLICIES {
            for env in ENVS {
                for e in deploy(p, env, run) {
                    pending.push(e);
                    if pending.len() == BATCH || written + pending.len() == records {
                        written += pending.len();
                        log.append_all(std::mem::take(&mut pending)).unwrap();
                        if written == records {
                            break 'outer;
                        }
                    }
                }
            }
        }
    }
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let records = if full { 100_000 } else { 2_000 };
    let ws = workspace(records);
    let root = ws.path().to_path_buf();
    let out = root.join("report.html");
    let mut c = Criterion::default().configure_from_args().sample_size(10);
    let mut g = c.benchmark_group(format!("report-{records}-records"));
    g.bench_function("audit-verify", |b| {
        b.iter(|| {
            let engine = pde::Engine::open_read_only(&root).unwrap();
            let report = engine.verify_audit().unwrap();
            assert_eq!(report.records as usize, records);
            serde_json::to_string_pretty(&report).unwrap()
        })
    });
    let options = pde_console::ReportOptions {
        pde_version: env!("CARGO_PKG_VERSION").into(),
        pde_commit: "bench".into(),
        ..Default::default()
    };
    g.bench_function("report-html", |b| {
        b.iter(|| {
            let engine = pde::Engine::open_read_only(&root).unwrap();
            let (report, html) = pde_console::report::render(&engine, &options).unwrap();
            assert_eq!(report.audit_status, "intact");
            pde_core::fsutil::atomic_write(&out, html.as_bytes()).unwrap();
        })
    });
    g.finish();
    c.final_summary();
}
