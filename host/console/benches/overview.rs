//! Rendering cost of the console's overview against `pde status --output
//! json`, side by side on the same state: 1,000 policies × 3 environments ×
//! 10 services (issue 25). Neither asks the agents.
//!
//! - `status-json`: what `pde status --output json` does after opening the
//!   engine: `state.status(None)`, the status documents, pretty JSON;
//! - `overview-html`: what `GET /` does: the overview document (status,
//!   leases, freezes, the matrix) rendered by the askama template.
//!
//! Run: `cargo bench --workspace --bench overview` (the workspace form:
//! `-p pde-console` alone builds tokio, hyper-util and others with other
//! features, so it rebuilds most of the tree).
// Test code: a failed unwrap is a failed test, with its location.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use criterion::Criterion;

const POLICIES: usize = 1000;
const ENVS: [&str; 3] = ["dev", "staging", "production"];
const SERVICES: usize = 10;

fn workspace() -> tempfile::TempDir {
    let dir = common::workspace(&ENVS, SERVICES);
    let root = dir.path();
    let state = pde::state::StateStore::open(&root.join(".pde")).unwrap();
    for p in 0..POLICIES {
        let id = format!("{p}");
        let digest = format!("sha256:{:064x}", p);
        for env in ENVS {
            state.set_active(&id, env, "1.0.0", &digest).unwrap();
            for s in 0..SERVICES {
                state
                    .set_service_active(&id, env, &format!("SVC-{s}"), Some(("1.0.0", &digest)))
                    .unwrap();
            }
        }
    }
    dir
}

fn main() {
    let ws = workspace();
    let engine = pde::Engine::open_read_only(ws.path()).unwrap();
    let mut c = Criterion::default().configure_from_args().sample_size(10);
    let mut g = c.benchmark_group("overview-1000x3x10");
    g.bench_function("status-json", |b| {
        b.iter(|| {
            let entries = engine.state().status(None).unwrap();
            serde_json::to_string_pretty(&pde_console::docs::status_json(&entries)).unwrap()
        })
    });
    g.bench_function("overview-html", |b| {
        b.iter(|| {
            let o = pde_console::docs::overview(&engine, None, None).unwrap();
            pde_console::overview_html(&o).unwrap()
        })
    });
    g.finish();
    c.final_summary();
}
