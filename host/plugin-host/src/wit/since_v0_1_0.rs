//! Bindings for `pde:plugin@0.1.0` (wit/v0.1.0/plugin.wit).
//!
//! This module only translates between the 0.1.0 types and the
//! version-independent ones of [`super`]; it never checks anything itself.
//! Limits, capability denial and result bounds live once, below every shim,
//! in [`crate::sandbox`] and [`crate::plugin`] (the lesson of Zed's
//! issue #55533, where an old shim's private copy of a host function skipped
//! a check). A future 0.2.0 is a new `since_v0_2_0.rs` beside this one.

use semver::Version;
use wasmtime::Engine;
use wasmtime::component::{Component, HasSelf, Linker};

use super::{CallInput, Called, RawDiagnostic, RawRoute, RawService, RawSeverity};
use crate::PluginError;
use crate::sandbox::{self, HostState, LogLevel, RunOptions};

/// The oldest plugin WIT version this module binds.
pub const MIN_VERSION: Version = Version::new(0, 1, 0);

mod validator_world {
    wasmtime::component::bindgen!({
        path: "../../wit/v0.1.0",
        world: "validator",
        // Async exports: the call runs on a fiber, so a guest waiting in a
        // host call yields to the host's timeout (see `sandbox`).
        exports: { default: async },
    });
}

mod router_world {
    wasmtime::component::bindgen!({
        path: "../../wit/v0.1.0",
        world: "router",
        exports: { default: async },
        with: {
            "pde:plugin/types": super::validator_world::pde::plugin::types,
            "pde:plugin/host": super::validator_world::pde::plugin::host,
        },
    });
}

use validator_world::pde::plugin::{host, types};

impl types::Host for HostState {}

impl host::Host for HostState {
    fn log(&mut self, level: host::Level, message: String) {
        let level = match level {
            host::Level::Error => LogLevel::Error,
            host::Level::Warn => LogLevel::Warn,
            host::Level::Info => LogLevel::Info,
            host::Level::Debug => LogLevel::Debug,
            host::Level::Trace => LogLevel::Trace,
        };
        HostState::log(self, level, &message);
    }
}

/// The linker for 0.1.0 plugins: WASI p2 (async, so waits yield to the
/// call's timeout; nothing behind it) + `host`.
pub fn linker(engine: &Engine) -> Result<Linker<HostState>, PluginError> {
    let mut linker = Linker::new(engine);
    let fail = |e: wasmtime::Error| PluginError::Engine(format!("linking WIT 0.1.0: {e:#}"));
    sandbox::link_wasi(&mut linker).map_err(fail)?;
    validator_world::Validator::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |s| s)
        .map_err(fail)?;
    Ok(linker)
}

/// A component pre-instantiated against the 0.1.0 linker, as one world.
pub enum Prepared {
    /// World `validator`.
    Validator(validator_world::ValidatorPre<HostState>),
    /// World `router`.
    Router(router_world::RouterPre<HostState>),
}

/// Links `component` and type-checks it against world `validator` or `router`.
/// Errors are returned as text; the caller turns them into a named error.
pub fn prepare(
    linker: &Linker<HostState>,
    component: &Component,
    router: bool,
) -> Result<Prepared, String> {
    let pre = linker
        .instantiate_pre(component)
        .map_err(|e| format!("{e:#}"))?;
    if router {
        router_world::RouterPre::new(pre)
            .map(Prepared::Router)
            .map_err(|e| format!("{e:#}"))
    } else {
        validator_world::ValidatorPre::new(pre)
            .map(Prepared::Validator)
            .map_err(|e| format!("{e:#}"))
    }
}

fn policy(input: &CallInput) -> (types::Policy, types::Context) {
    (
        types::Policy {
            id: input.id.clone(),
            version: input.version.clone(),
            document: input.document.clone(),
        },
        types::Context {
            environment: input.environment.clone(),
            settings: input.settings.clone(),
        },
    )
}

/// Calls `validate` in a fresh sandbox.
pub fn validate(
    engine: &Engine,
    pre: &validator_world::ValidatorPre<HostState>,
    plugin: &str,
    limits: &crate::limits::Limits,
    options: RunOptions,
    input: &CallInput,
) -> Called<RawDiagnostic> {
    let (p, c) = policy(input);
    let (out, stats) = sandbox::run(engine, plugin, limits, options, async |store| {
        let instance = pre.instantiate_async(&mut *store).await?;
        instance.call_validate(&mut *store, &p, &c).await
    })?;
    let out = out.map(|list| {
        list.into_iter()
            .map(|d| RawDiagnostic {
                severity: match d.severity {
                    types::Severity::Error => RawSeverity::Error,
                    types::Severity::Warning => RawSeverity::Warning,
                    types::Severity::Info => RawSeverity::Info,
                },
                path: d.path,
                code: d.code,
                message: d.message,
            })
            .collect()
    });
    Ok((out, stats))
}

/// Calls `route` in a fresh sandbox.
pub fn route(
    engine: &Engine,
    pre: &router_world::RouterPre<HostState>,
    plugin: &str,
    limits: &crate::limits::Limits,
    options: RunOptions,
    input: &CallInput,
    services: &[RawService],
) -> Called<RawRoute> {
    let (p, c) = policy(input);
    let services: Vec<types::Service> = services
        .iter()
        .map(|s| types::Service {
            name: s.name.clone(),
            tags: s.tags.clone(),
            labels: s.labels.clone(),
        })
        .collect();
    let (out, stats) = sandbox::run(engine, plugin, limits, options, async |store| {
        let instance = pre.instantiate_async(&mut *store).await?;
        instance.call_route(&mut *store, &p, &c, &services).await
    })?;
    let out = out.map(|list| {
        list.into_iter()
            .map(|r| RawRoute {
                service: r.service,
                reason: r.reason,
            })
            .collect()
    });
    Ok((out, stats))
}
