//! One module per supported WIT version, in the manner of Zed's extension host.
//!
//! A component names the contract it was built against in its import and
//! export names (`pde:plugin/host@0.1.0`). [`select`] reads that version and
//! picks the module that binds it (semver-compatible with the module's
//! `MIN_VERSION`); an unknown version is refused by name before anything runs.
//! Supporting a new version means adding `since_v0_X_Y.rs`, a variant in
//! [`Prepared`] and a row in [`SUPPORTED`], nothing else; 0.2.0 was added
//! that way. The newest module ([`latest`]) is the one implementation: the
//! older shims convert their types to its types and forward to it. The shims
//! translate types only: every check sits below them, in `sandbox` and the
//! facade.
//!
//! | module | binds | adds |
//! |---|---|---|
//! | [`since_v0_1_0`] | 0.1.x | validators, routers, `host.log` |
//! | [`since_v0_2_0`] | 0.2.x | `context.active`: the policy active in the target environment |

pub mod since_v0_1_0;
pub mod since_v0_2_0;

/// The newest version module, which older shims forward to.
pub use since_v0_2_0 as latest;

use semver::Version;
use wasmtime::Engine;
use wasmtime::component::{Component, Linker};

use super::sandbox::{CallStats, HostState, RunOptions};
use super::{PluginError, PluginKind};
use crate::limits::Limits;

/// The WIT package every plugin implements.
pub const PACKAGE: &str = "pde:plugin";

/// The `MIN_VERSION` of every version module, oldest first.
pub const SUPPORTED: &[Version] = &[since_v0_1_0::MIN_VERSION, since_v0_2_0::MIN_VERSION];

/// The first version whose context carries the active policy.
pub const ACTIVE_POLICY_SINCE: Version = since_v0_2_0::MIN_VERSION;

/// True when a plugin built against `version` is told the active policy
/// (`context.active`, since 0.2.0).
pub fn carries_active_policy(version: &Version) -> bool {
    select(version).is_some_and(|min| *min >= ACTIVE_POLICY_SINCE)
}

/// A linker for one version module: WASI deny-by-default (linked async, see
/// `sandbox`), then the module's own `host` bindings through `add_host`.
pub(crate) fn linker_with(
    engine: &Engine,
    version: &Version,
    add_host: impl FnOnce(&mut Linker<HostState>) -> wasmtime::Result<()>,
) -> Result<Linker<HostState>, PluginError> {
    let mut linker = Linker::new(engine);
    let fail = |e: wasmtime::Error| PluginError::Engine(format!("linking WIT {version}: {e:#}"));
    super::sandbox::link_wasi(&mut linker).map_err(fail)?;
    add_host(&mut linker).map_err(fail)?;
    Ok(linker)
}

/// Links `component` and type-checks it as one world with `world` (a
/// module's `ValidatorPre::new` or `RouterPre::new`). Errors are returned as
/// text; the caller turns them into a named error.
pub(crate) fn prepare_as<P>(
    linker: &Linker<HostState>,
    component: &Component,
    world: impl FnOnce(wasmtime::component::InstancePre<HostState>) -> wasmtime::Result<P>,
) -> Result<P, String> {
    let pre = linker
        .instantiate_pre(component)
        .map_err(|e| format!("{e:#}"))?;
    world(pre).map_err(|e| format!("{e:#}"))
}

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
    /// The version of the policy active in `environment`, if any. Only
    /// versions since [`ACTIVE_POLICY_SINCE`] pass it on.
    pub active: Option<ActiveInput>,
}

/// The policy active in the target environment, independent of the WIT version.
#[derive(Debug, Clone)]
pub struct ActiveInput {
    /// Its version.
    pub version: String,
    /// Its bundle digest, `sha256:<hex>` (`""` when unknown).
    pub digest: String,
    /// When it became active, RFC 3339 (`""` when unknown).
    pub deployed_at: String,
    /// Its document as JSON text.
    pub document: String,
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
    v0_2_0: Linker<HostState>,
}

impl Linkers {
    /// Builds the linker of every supported version.
    pub fn new(engine: &Engine) -> Result<Linkers, PluginError> {
        Ok(Linkers {
            v0_1_0: since_v0_1_0::linker(engine)?,
            v0_2_0: since_v0_2_0::linker(engine)?,
        })
    }
}

/// A component bound to one version module and one world.
pub enum Prepared {
    /// Built against 0.1.x.
    V0_1(since_v0_1_0::Prepared),
    /// Built against 0.2.x.
    V0_2(since_v0_2_0::Prepared),
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
    } else if *min == since_v0_2_0::MIN_VERSION {
        since_v0_2_0::prepare(&linkers.v0_2_0, component, router).map(Prepared::V0_2)
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
            Prepared::V0_2(since_v0_2_0::Prepared::Validator(pre)) => Some(since_v0_2_0::validate(
                engine, pre, plugin, limits, options, input,
            )),
            Prepared::V0_1(since_v0_1_0::Prepared::Router(_))
            | Prepared::V0_2(since_v0_2_0::Prepared::Router(_)) => None,
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
            Prepared::V0_2(since_v0_2_0::Prepared::Router(pre)) => Some(since_v0_2_0::route(
                engine, pre, plugin, limits, options, input, services,
            )),
            Prepared::V0_1(since_v0_1_0::Prepared::Validator(_))
            | Prepared::V0_2(since_v0_2_0::Prepared::Validator(_)) => None,
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
        assert_eq!(
            select(&Version::new(0, 2, 0)),
            Some(&since_v0_2_0::MIN_VERSION)
        );
        assert_eq!(
            select(&Version::new(0, 2, 7)),
            Some(&since_v0_2_0::MIN_VERSION)
        );
        // Unknown versions, older or newer, bind to nothing.
        assert_eq!(select(&Version::new(0, 3, 0)), None);
        assert_eq!(select(&Version::new(0, 0, 9)), None);
        assert_eq!(select(&Version::new(1, 0, 0)), None);
    }

    #[test]
    fn only_versions_since_0_2_0_are_told_the_active_policy() {
        assert!(!carries_active_policy(&Version::new(0, 1, 0)));
        assert!(!carries_active_policy(&Version::new(0, 1, 9)));
        assert!(carries_active_policy(&Version::new(0, 2, 0)));
        assert!(carries_active_policy(&Version::new(0, 2, 3)));
        assert!(!carries_active_policy(&Version::new(0, 3, 0)));
    }

    #[test]
    fn supported_versions_are_listed_oldest_first_and_latest_is_last() {
        assert!(SUPPORTED.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(SUPPORTED.last(), Some(&latest::MIN_VERSION));
    }

    fn input(active: bool) -> CallInput {
        CallInput {
            id: "42".into(),
            version: "2.0.0".into(),
            document: "{}".into(),
            environment: "prod".into(),
            settings: "{}".into(),
            active: active.then(|| ActiveInput {
                version: "1.0.0".into(),
                digest: "sha256:ab".into(),
                deployed_at: "2031-01-01T00:00:00Z".into(),
                document: r#"{"id":"42"}"#.into(),
            }),
        }
    }

    #[test]
    fn the_newest_context_carries_the_active_policy_and_0_1_0_drops_it() {
        let c = latest::context(&input(true));
        let a = c.active.clone().expect("0.2.0 passes it on");
        assert_eq!(
            (a.version.as_str(), a.digest.as_str()),
            ("1.0.0", "sha256:ab")
        );
        assert_eq!(a.document, r#"{"id":"42"}"#);
        assert!(latest::context(&input(false)).active.is_none());
        // The 0.1.0 shim converts the newest context, losing only `active`.
        let old = since_v0_1_0::context_of(c);
        assert_eq!((old.0.as_str(), old.1.as_str()), ("prod", "{}"));
    }
}
