//! One module per supported WIT version, in the manner of Zed's extension host.
//!
//! A component names the contract it was built against in its import and
//! export names (`pde:plugin/host@0.1.0`). [`select`] reads that version and
//! picks the module that binds it (semver-compatible with the module's
//! `MIN_VERSION`); an unknown version is refused by name before anything runs.
//! Supporting 0.2.0 means adding `since_v0_2_0.rs`, a variant in
//! [`Prepared`] and a row in [`SUPPORTED`], nothing else. The shims translate
//! types only: every check sits below them, in `sandbox` and the facade.

pub mod since_v0_1_0;

use semver::Version;
use wasmtime::Engine;
use wasmtime::component::{Component, Linker};

use super::sandbox::{CallStats, HostState, RunOptions};
use super::{PluginError, PluginKind};
use crate::limits::Limits;

/// The WIT package every plugin implements.
pub const PACKAGE: &str = "pde:plugin";

/// The `MIN_VERSION` of every version module, oldest first.
pub const SUPPORTED: &[Version] = &[since_v0_1_0::MIN_VERSION];

/// What a shim's call returns: the plugin's own `result<list<T>, string>`
/// with its costs, or the named way the call failed.
pub type Called<T> = Result<(Result<Vec<T>, String>, CallStats), PluginError>;

/// Policy and context of one call, independent of the WIT version.
#[derive(Debug, Clone)]
pub struct CallInput {
    /// Policy id.
    pub id: String,
    /// Policy version.
    pub version: String,
    /// The policy document as JSON text.
    pub document: String,
    /// Target environment, `""` when none.
    pub environment: String,
    /// The plugin's settings as JSON text.
    pub settings: String,
}

/// Severity as returned by a plugin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawSeverity {
    /// error
    Error,
    /// warning
    Warning,
    /// info
    Info,
}

/// A diagnostic as returned by a plugin, before the host attributes it.
#[derive(Debug, Clone)]
pub struct RawDiagnostic {
    /// Severity.
    pub severity: RawSeverity,
    /// JSON pointer.
    pub path: String,
    /// Code.
    pub code: String,
    /// Message.
    pub message: String,
}

/// A service handed to a router.
#[derive(Debug, Clone)]
pub struct RawService {
    /// Name.
    pub name: String,
    /// Tags.
    pub tags: Vec<String>,
    /// Labels as pairs.
    pub labels: Vec<(String, String)>,
}

/// A route as returned by a router.
#[derive(Debug, Clone)]
pub struct RawRoute {
    /// Service name.
    pub service: String,
    /// Why.
    pub reason: String,
}

/// The version module able to run a given plugin, with its linker.
pub struct Linkers {
    v0_1_0: Linker<HostState>,
}

impl Linkers {
    /// Builds the linker of every supported version.
    pub fn new(engine: &Engine) -> Result<Linkers, PluginError> {
        Ok(Linkers {
            v0_1_0: since_v0_1_0::linker(engine)?,
        })
    }
}

/// A component bound to one version module and one world.
pub enum Prepared {
    /// Built against 0.1.x.
    V0_1(since_v0_1_0::Prepared),
}

/// The `pde:plugin` versions named by `names` (imports and exports).
pub fn versions_named<'a>(names: impl Iterator<Item = &'a str>) -> Vec<Version> {
    let prefix = format!("{PACKAGE}/");
    let mut found: Vec<Version> = names
        .filter_map(|n| n.strip_prefix(&prefix))
        .filter_map(|rest| rest.split_once('@'))
        .filter_map(|(_, v)| Version::parse(v).ok())
        .collect();
    found.sort();
    found.dedup();
    found
}

/// Picks the newest version module whose `MIN_VERSION` the plugin's version
/// is semver-compatible with.
pub fn select(found: &Version) -> Option<&'static Version> {
    SUPPORTED.iter().rev().find(|min| {
        let req = semver::VersionReq::parse(&format!("^{min}")).ok();
        req.is_some_and(|r| r.matches(found))
    })
}

/// Binds `component` (already known to be of WIT `version`) as `kind`.
pub fn prepare(
    linkers: &Linkers,
    component: &Component,
    plugin: &str,
    version: &Version,
    kind: PluginKind,
) -> Result<Prepared, PluginError> {
    let Some(min) = select(version) else {
        return Err(PluginError::UnsupportedWitVersion {
            plugin: plugin.to_string(),
            found: version.to_string(),
            supported: SUPPORTED
                .iter()
                .map(|v| v.to_string())
                .collect::<Vec<_>>()
                .join(", "),
        });
    };
    let router = kind == PluginKind::Router;
    let result = if *min == since_v0_1_0::MIN_VERSION {
        since_v0_1_0::prepare(&linkers.v0_1_0, component, router).map(Prepared::V0_1)
    } else {
        Err(format!("no module binds WIT {min}"))
    };
    result.map_err(|detail| PluginError::BadComponent {
        plugin: plugin.to_string(),
        message: format!(
            "it does not link as a WIT {version} {kind} ({detail}); rebuild it against wit/v{min}/plugin.wit with the pde-plugin SDK"
        ),
    })
}

impl Prepared {
    /// Runs `validate`; `None` if this is not a validator.
    pub fn validate(
        &self,
        engine: &Engine,
        plugin: &str,
        limits: &Limits,
        options: RunOptions,
        input: &CallInput,
    ) -> Option<Called<RawDiagnostic>> {
        match self {
            Prepared::V0_1(since_v0_1_0::Prepared::Validator(pre)) => Some(since_v0_1_0::validate(
                engine, pre, plugin, limits, options, input,
            )),
            Prepared::V0_1(since_v0_1_0::Prepared::Router(_)) => None,
        }
    }

    /// Runs `route`; `None` if this is not a router.
    pub fn route(
        &self,
        engine: &Engine,
        plugin: &str,
        limits: &Limits,
        options: RunOptions,
        input: &CallInput,
        services: &[RawService],
    ) -> Option<Called<RawRoute>> {
        match self {
            Prepared::V0_1(since_v0_1_0::Prepared::Router(pre)) => Some(since_v0_1_0::route(
                engine, pre, plugin, limits, options, input, services,
            )),
            Prepared::V0_1(since_v0_1_0::Prepared::Validator(_)) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_come_from_interface_names() {
        let names = [
            "wasi:cli/environment@0.2.6",
            "pde:plugin/host@0.1.0",
            "pde:plugin/types@0.1.0",
            "validate",
        ];
        assert_eq!(
            versions_named(names.into_iter()),
            vec![Version::new(0, 1, 0)]
        );
    }

    #[test]
    fn selection_is_semver_compatible_and_refuses_unknown() {
        assert_eq!(
            select(&Version::new(0, 1, 0)),
            Some(&since_v0_1_0::MIN_VERSION)
        );
        assert_eq!(
            select(&Version::new(0, 1, 3)),
            Some(&since_v0_1_0::MIN_VERSION)
        );
        assert_eq!(select(&Version::new(0, 2, 0)), None);
        assert_eq!(select(&Version::new(1, 0, 0)), None);
    }
}
