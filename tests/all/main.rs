//! pde's integration tests, one binary with a module per area, as wasmtime
//! and ripgrep do. Sixteen binaries each linked wasmtime, cranelift and the
//! engine: about 100 MB and a link step apiece, on every change (see
//! BENCHMARKS.md, "Cold CI and the size of the code"). Run one area with
//! `cargo test --test all pipeline::`.

#![allow(clippy::unwrap_used, dead_code)]

mod support;

mod agent;
mod approvals;
mod architecture;
mod cli;
mod console;
mod day2;
mod day_one;
mod fencing;
mod first_workspace;
mod fuzz;
mod gate_plugin;
mod hardening;
mod jcs;
mod oci;
mod pipeline;
mod plugin_authoring;
mod plugin_runtime;
mod plugin_security;
mod plugin_ux;
mod python_plugin;
mod rego_parity;
mod rollout;
mod team;
mod trust;
