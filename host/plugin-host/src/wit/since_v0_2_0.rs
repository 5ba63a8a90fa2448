//! Bindings for `pde:plugin@0.2.0` (wit/v0.2.0/plugin.wit).
//!
//! A shim, in the manner of Zed's `since_v0_X` modules: it converts the
//! 0.2.0 types to and from those of the newest version ([`latest`]) and
//! forwards to it, so there is one implementation of `host.log` and of the
//! translation into the version-independent types of [`super`]. It never
//! checks anything itself: limits, capability denial, result bounds and
//! attribution live once, below every shim, in [`crate::sandbox`] and the
//! [`crate::PluginHost`] facade.
//!
//! What 0.2.0 lacks: the `gate` world (0.3.0). Its validators and routers
//! see exactly what 0.3.0's do, the active policy included.

use semver::Version;
use wasmtime::Engine;
use wasmtime::component::{Component, HasSelf, Linker};

use super::latest;
use super::{Prepared, Route, Validate, VersionModule};
use crate::PluginError;
use crate::sandbox::HostState;
use crate::world::PluginKind;

/// The oldest plugin WIT version this module binds.
pub const MIN_VERSION: Version = Version::new(0, 2, 0);

/// This module's row of [`super::VERSIONS`]: its worlds and their shims.
pub const MODULE: VersionModule = VersionModule {
    min: MIN_VERSION,
    linker,
    worlds: &[
        (PluginKind::Validator, validator),
        (PluginKind::Router, router),
    ],
};

mod validator_world {
    wasmtime::component::bindgen!({
        path: "../../wit/v0.2.0",
        world: "validator",
        // Async exports: the call runs on a fiber, so a guest waiting in a
        // host call yields to the host's timeout (see `sandbox`).
        exports: { default: async },
    });
}

mod router_world {
    wasmtime::component::bindgen!({
        path: "../../wit/v0.2.0",
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
        latest::host::Host::log(self, level.into(), message);
    }
}

impl From<host::Level> for latest::host::Level {
    fn from(level: host::Level) -> Self {
        match level {
            host::Level::Error => latest::host::Level::Error,
            host::Level::Warn => latest::host::Level::Warn,
            host::Level::Info => latest::host::Level::Info,
            host::Level::Debug => latest::host::Level::Debug,
            host::Level::Trace => latest::host::Level::Trace,
        }
    }
}

impl From<latest::types::Policy> for types::Policy {
    fn from(p: latest::types::Policy) -> Self {
        types::Policy {
            id: p.id,
            version: p.version,
            document: p.document,
        }
    }
}

impl From<latest::types::Context> for types::Context {
    fn from(c: latest::types::Context) -> Self {
        types::Context {
            environment: c.environment,
            settings: c.settings,
            active: c.active.map(|a| types::ActivePolicy {
                version: a.version,
                digest: a.digest,
                deployed_at: a.deployed_at,
                document: a.document,
            }),
        }
    }
}

impl From<latest::types::Service> for types::Service {
    fn from(s: latest::types::Service) -> Self {
        types::Service {
            name: s.name,
            tags: s.tags,
            labels: s.labels,
        }
    }
}

impl From<types::Diagnostic> for latest::types::Diagnostic {
    fn from(d: types::Diagnostic) -> Self {
        latest::types::Diagnostic {
            severity: match d.severity {
                types::Severity::Error => latest::types::Severity::Error,
                types::Severity::Warning => latest::types::Severity::Warning,
                types::Severity::Info => latest::types::Severity::Info,
            },
            path: d.path,
            code: d.code,
            message: d.message,
        }
    }
}

impl From<types::Route> for latest::types::Route {
    fn from(r: types::Route) -> Self {
        latest::types::Route {
            service: r.service,
            reason: r.reason,
        }
    }
}

/// The linker for 0.2.0 plugins: WASI p2 (async, so waits yield to the
/// call's timeout; nothing behind it) + `host`.
fn linker(engine: &Engine) -> Result<Linker<HostState>, PluginError> {
    super::linker_with(engine, &MIN_VERSION, |linker| {
        validator_world::Validator::add_to_linker::<HostState, HasSelf<HostState>>(linker, |s| s)
    })
}

/// World `validator`: `validate`, called in a fresh instance each time.
fn validator(linker: &Linker<HostState>, component: &Component) -> Result<Prepared, String> {
    let pre = super::prepare_as(linker, component, validator_world::ValidatorPre::new)?;
    Ok(Prepared::new::<Validate>(move |sandbox, input, &()| {
        let p: types::Policy = latest::policy(input).into();
        let c: types::Context = latest::context(input).into();
        let (out, stats) = sandbox.run(async |store| {
            let instance = pre.instantiate_async(&mut *store).await?;
            instance.call_validate(&mut *store, &p, &c).await
        })?;
        let out = out.map(|list| {
            list.into_iter()
                .map(|d| latest::raw_diagnostic(d.into()))
                .collect()
        });
        Ok((out, stats))
    }))
}

/// World `router`: `route`, called in a fresh instance each time.
fn router(linker: &Linker<HostState>, component: &Component) -> Result<Prepared, String> {
    let pre = super::prepare_as(linker, component, router_world::RouterPre::new)?;
    Ok(Prepared::new::<Route>(move |sandbox, input, services| {
        let p: types::Policy = latest::policy(input).into();
        let c: types::Context = latest::context(input).into();
        let services: Vec<types::Service> =
            services.iter().map(|s| latest::service(s).into()).collect();
        let (out, stats) = sandbox.run(async |store| {
            let instance = pre.instantiate_async(&mut *store).await?;
            instance.call_route(&mut *store, &p, &c, &services).await
        })?;
        let out = out.map(|list| {
            list.into_iter()
                .map(|r| latest::raw_route(r.into()))
                .collect()
        });
        Ok((out, stats))
    }))
}
