//! Bindings for `pde:plugin@0.3.0` (wit/v0.3.0/plugin.wit), the newest
//! contract: 0.2.0's validators and routers, plus the `gate` world, which
//! judges a wave of a progressive rollout from a metric's samples.
//!
//! This is the one implementation of the contract. It translates between the
//! 0.3.0 types and the version-independent ones of [`super`], and older
//! shims (`since_v0_1_0`, `since_v0_2_0`) translate their types onto these
//! and call the functions here, as Zed's extension host forwards `since_v0_X` to `latest`.
//! Nothing in this module checks anything: limits, capability denial, result
//! bounds and attribution live once, below every shim, in
//! [`crate::sandbox`] and the [`crate::PluginHost`] facade (Zed's
//! issue #55533 is what happens when a shim keeps its own copy).

use semver::Version;
use wasmtime::Engine;
use wasmtime::component::{Component, HasSelf, Linker};

use super::{
    CallInput, Gate, Prepared, RawDiagnostic, RawRoute, RawService, RawSeverity, Route, Validate,
    VersionModule,
};
use crate::PluginError;
use crate::sandbox::{HostState, LogLevel};
use crate::types::{GateInput, GateVerdict, Judgement, Samples};
use crate::world::PluginKind;

/// The oldest plugin WIT version this module binds.
pub const MIN_VERSION: Version = Version::new(0, 3, 0);

/// This module's row of [`super::VERSIONS`]: its worlds and their shims.
pub const MODULE: VersionModule = VersionModule {
    min: MIN_VERSION,
    linker,
    worlds: &[
        (PluginKind::Validator, validator),
        (PluginKind::Router, router),
        (PluginKind::Gate, gate),
    ],
};

mod validator_world {
    wasmtime::component::bindgen!({
        path: "../../wit/v0.3.0",
        world: "validator",
        // Async exports: the call runs on a fiber, so a guest waiting in a
        // host call yields to the host's timeout (see `sandbox`).
        exports: { default: async },
    });
}

mod router_world {
    wasmtime::component::bindgen!({
        path: "../../wit/v0.3.0",
        world: "router",
        exports: { default: async },
        with: {
            "pde:plugin/types": super::validator_world::pde::plugin::types,
            "pde:plugin/host": super::validator_world::pde::plugin::host,
        },
    });
}

mod gate_world {
    wasmtime::component::bindgen!({
        path: "../../wit/v0.3.0",
        world: "gate",
        exports: { default: async },
        with: {
            "pde:plugin/types": super::validator_world::pde::plugin::types,
            "pde:plugin/host": super::validator_world::pde::plugin::host,
        },
    });
}

// Crate-visible: the older shims convert to these types.
pub(crate) use validator_world::pde::plugin::{host, types};

impl types::Host for HostState {}

impl host::Host for HostState {
    /// `host.log` of every version ends here, then in [`HostState::log`].
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

/// The linker for 0.3.0 plugins: WASI p2 (async, so waits yield to the
/// call's timeout; nothing behind it) + `host`.
fn linker(engine: &Engine) -> Result<Linker<HostState>, PluginError> {
    super::linker_with(engine, &MIN_VERSION, |linker| {
        validator_world::Validator::add_to_linker::<HostState, HasSelf<HostState>>(linker, |s| s)
    })
}

/// The call's policy as this version passes it.
pub(crate) fn policy(input: &CallInput) -> types::Policy {
    types::Policy {
        id: input.id.clone(),
        version: input.version.clone(),
        document: input.document.clone(),
    }
}

/// The call's context as this version passes it, active policy included.
pub(crate) fn context(input: &CallInput) -> types::Context {
    types::Context {
        environment: input.environment.clone(),
        settings: input.settings.clone(),
        active: input.active.as_ref().map(|a| types::ActivePolicy {
            version: a.version.clone(),
            digest: a.digest.clone(),
            deployed_at: a.deployed_at.clone(),
            document: a.document.clone(),
        }),
    }
}

/// A service as this version passes it.
pub(crate) fn service(s: &RawService) -> types::Service {
    types::Service {
        name: s.name.clone(),
        tags: s.tags.clone(),
        labels: s.labels.clone(),
    }
}

/// A diagnostic of this version, before the host checks and attributes it.
pub(crate) fn raw_diagnostic(d: types::Diagnostic) -> RawDiagnostic {
    RawDiagnostic {
        severity: match d.severity {
            types::Severity::Error => RawSeverity::Error,
            types::Severity::Warning => RawSeverity::Warning,
            types::Severity::Info => RawSeverity::Info,
        },
        path: d.path,
        code: d.code,
        message: d.message,
    }
}

/// A route of this version, before the host checks it.
pub(crate) fn raw_route(r: types::Route) -> RawRoute {
    RawRoute {
        service: r.service,
        reason: r.reason,
    }
}

/// World `validator`: `validate`, called in a fresh instance each time.
fn validator(linker: &Linker<HostState>, component: &Component) -> Result<Prepared, String> {
    let pre = super::prepare_as(linker, component, validator_world::ValidatorPre::new)?;
    Ok(Prepared::new::<Validate>(move |sandbox, input, &()| {
        let (p, c) = (policy(input), context(input));
        let (out, stats) = sandbox.run(async |store| {
            let instance = pre.instantiate_async(&mut *store).await?;
            instance.call_validate(&mut *store, &p, &c).await
        })?;
        Ok((
            out.map(|list| list.into_iter().map(raw_diagnostic).collect()),
            stats,
        ))
    }))
}

/// World `router`: `route`, called in a fresh instance each time.
fn router(linker: &Linker<HostState>, component: &Component) -> Result<Prepared, String> {
    let pre = super::prepare_as(linker, component, router_world::RouterPre::new)?;
    Ok(Prepared::new::<Route>(move |sandbox, input, services| {
        let (p, c) = (policy(input), context(input));
        let services: Vec<types::Service> = services.iter().map(service).collect();
        let (out, stats) = sandbox.run(async |store| {
            let instance = pre.instantiate_async(&mut *store).await?;
            instance.call_route(&mut *store, &p, &c, &services).await
        })?;
        Ok((
            out.map(|list| list.into_iter().map(raw_route).collect()),
            stats,
        ))
    }))
}

/// Samples as this version passes them.
fn samples(s: &Samples) -> types::Samples {
    types::Samples {
        query: s.query.clone(),
        series: s
            .series
            .iter()
            .map(|x| types::Series {
                labels: x
                    .labels
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
                times: x.samples.iter().map(|&(at, _)| at).collect(),
                values: x.samples.iter().map(|&(_, value)| value).collect(),
            })
            .collect(),
    }
}

/// The gate's input as this version passes it.
fn gate_input(g: &GateInput) -> types::GateInput {
    types::GateInput {
        gate: g.gate.clone(),
        wave: g.wave.clone(),
        services: g.services.clone(),
        digest: g.digest.clone(),
        start: g.start.clone(),
        end: g.end.clone(),
        step_seconds: g.step_seconds,
        wave_samples: samples(&g.wave_samples),
        baseline_samples: g.baseline_samples.as_ref().map(samples),
    }
}

/// A judgement of this version, before the host checks it.
fn judgement(j: types::Judgement) -> Judgement {
    Judgement {
        verdict: match j.verdict {
            types::Verdict::Pass => GateVerdict::Pass,
            types::Verdict::Fail => GateVerdict::Fail,
            types::Verdict::Inconclusive => GateVerdict::Inconclusive,
        },
        reason: j.reason,
        statistics: j.statistics,
    }
}

/// World `gate`: `gate`, called in a fresh instance each time.
fn gate(linker: &Linker<HostState>, component: &Component) -> Result<Prepared, String> {
    let pre = super::prepare_as(linker, component, gate_world::GatePre::new)?;
    Ok(Prepared::new::<Gate>(move |sandbox, input, args| {
        let (p, c) = (policy(input), context(input));
        let g = gate_input(args);
        let (out, stats) = sandbox.run(async |store| {
            let instance = pre.instantiate_async(&mut *store).await?;
            instance.call_gate(&mut *store, &p, &c, &g).await
        })?;
        Ok((out.map(judgement), stats))
    }))
}
