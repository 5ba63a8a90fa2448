//! One module per supported WIT version, in the manner of Zed's extension host.
//!
//! A component names the contract it was built against in its import and
//! export names (`pde:plugin/host@0.1.0`). [`select`] reads that version and
//! picks the module that binds it (semver-compatible with the module's
//! `MIN_VERSION`); an unknown version is refused by name before anything runs.
//! The newest module ([`latest`]) is the one implementation: the older shims
//! convert their types to its types and forward to it. The shims translate
//! types only: every check sits below them, in `sandbox` and the facade.
//!
//! Two tables tie it together:
//! - [`VERSIONS`]: one row per version module (its `MIN_VERSION`, its linker,
//!   and the worlds it binds, each with its shim);
//! - [`crate::world::WORLDS`]: one row per world (its name and export), with
//!   the version-independent shape of its call here ([`WorldCall`]).
//!
//! What a change takes (docs/ARCHITECTURE.md "Plugin worlds"):
//! - **a new world** (say `gate`): its row in `WORLDS` and its variant of
//!   [`crate::PluginKind`], a [`WorldCall`] type, and in each version module
//!   that has it a `bindgen!` world and one shim (a row of its `WORLDS`
//!   list). A version whose WIT lacks the world simply has no row, and a
//!   plugin of that world built against it is refused by name. The facade
//!   then gets a method that calls it ([`Prepared::call`]) and checks its
//!   result, as `validate` and `route` do;
//! - **a new WIT version**: its module `since_vX_Y_Z.rs` (which becomes
//!   [`latest`]), its row in [`VERSIONS`], and the previous newest module
//!   turned into a shim that converts onto the new types (0.2.0 was added
//!   that way, turning 0.1.0 into a shim).
//!
//! | module | binds | adds |
//! |---|---|---|
//! | [`since_v0_1_0`] | 0.1.x | validators, routers, `host.log` |
//! | [`since_v0_2_0`] | 0.2.x | `context.active`: the policy active in the target environment |
//! | [`since_v0_3_0`] | 0.3.x | the `gate` world: judge a rollout's wave from a metric's samples |

pub mod since_v0_1_0;
pub mod since_v0_2_0;
pub mod since_v0_3_0;

/// The newest version module, which older shims forward to.
pub use since_v0_3_0 as latest;

use std::any::Any;
use std::sync::LazyLock;

use semver::Version;
use wasmtime::Engine;
use wasmtime::component::{Component, Linker};

use super::sandbox::{CallStats, HostState, Sandbox};
use crate::PluginError;
use crate::types::{GateInput, Judgement};
use crate::world::PluginKind;

/// The WIT package every plugin implements.
pub const PACKAGE: &str = "pde:plugin";

/// One supported WIT version: a row of [`VERSIONS`], defined by its module
/// as `MODULE`.
pub struct VersionModule {
    /// The oldest version it binds; it binds every semver-compatible one.
    pub min: Version,
    /// Builds its linker: WASI deny-by-default and its `host` interface.
    pub linker: fn(&Engine) -> Result<Linker<HostState>, PluginError>,
    /// The worlds its WIT has, each with its shim.
    pub worlds: &'static [(PluginKind, Bind)],
}

/// A shim of one world in one WIT version: links a component and
/// type-checks it as that world (wasmtime's `InstancePre`, made once and
/// reused by every call), returning how to call it. Errors are text; the
/// caller turns them into a named error.
pub type Bind = fn(&Linker<HostState>, &Component) -> Result<Prepared, String>;

/// Every version module, oldest first.
pub const VERSIONS: &[VersionModule] = &[
    since_v0_1_0::MODULE,
    since_v0_2_0::MODULE,
    since_v0_3_0::MODULE,
];

/// The `MIN_VERSION` of every version module, oldest first.
pub static SUPPORTED: LazyLock<Vec<Version>> =
    LazyLock::new(|| VERSIONS.iter().map(|m| m.min.clone()).collect());

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

/// What a shim's call returns: the plugin's own `result<T, string>` with
/// its costs, or the named way the call failed.
pub type Called<T> = Result<(Result<T, String>, CallStats), PluginError>;

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

/// The linker of every version module, in the order of [`VERSIONS`].
pub struct Linkers(Vec<Linker<HostState>>);

impl Linkers {
    /// Builds the linker of every supported version.
    pub fn new(engine: &Engine) -> Result<Linkers, PluginError> {
        VERSIONS
            .iter()
            .map(|m| (m.linker)(engine))
            .collect::<Result<_, _>>()
            .map(Linkers)
    }
}

/// The "call" of a world, independent of the WIT version: what its function
/// takes beyond the policy and its context, and what it returns.
/// Each shim converts these to and from its version's types.
pub trait WorldCall: 'static {
    /// The world.
    const KIND: PluginKind;
    /// What the function takes beyond the policy and its context.
    type Args: ?Sized + 'static;
    /// What it returns when it does not fail (`ok` of its `result`).
    type Output: 'static;
}

/// `validate(policy, context) -> result<list<diagnostic>, string>`.
pub enum Validate {}

impl WorldCall for Validate {
    const KIND: PluginKind = PluginKind::Validator;
    type Args = ();
    type Output = Vec<RawDiagnostic>;
}

/// `route(policy, context, services) -> result<list<route>, string>`.
pub enum Route {}

impl WorldCall for Route {
    const KIND: PluginKind = PluginKind::Router;
    type Args = [RawService];
    type Output = Vec<RawRoute>;
}

/// `gate(policy, context, gate-input) -> result<judgement, string>` (since 0.3.0).
pub enum Gate {}

impl WorldCall for Gate {
    const KIND: PluginKind = PluginKind::Gate;
    type Args = GateInput;
    type Output = Judgement;
}

/// How a shim calls its world: instantiate in a fresh sandbox, call, and
/// convert the result to the version-independent types.
type CallFn<C> = Box<
    dyn Fn(&Sandbox<'_>, &CallInput, &<C as WorldCall>::Args) -> Called<<C as WorldCall>::Output>
        + Send
        + Sync,
>;

/// A component bound to one world by one version module's shim: linked,
/// type-checked and pre-instantiated once, called any number of times (each
/// call in a fresh instance).
pub struct Prepared {
    kind: PluginKind,
    /// A `CallFn<C>` of the world's [`WorldCall`] `C`.
    call: Box<dyn Any + Send + Sync>,
}

impl Prepared {
    /// A component bound as world `C`, called by `call`.
    pub fn new<C: WorldCall>(
        call: impl Fn(&Sandbox<'_>, &CallInput, &C::Args) -> Called<C::Output> + Send + Sync + 'static,
    ) -> Prepared {
        let call: CallFn<C> = Box::new(call);
        Prepared {
            kind: C::KIND,
            call: Box::new(call),
        }
    }

    /// The world it was bound as.
    pub fn kind(&self) -> PluginKind {
        self.kind
    }

    /// Calls it as world `C`; `None` when it was bound as another world.
    pub fn call<C: WorldCall>(
        &self,
        sandbox: &Sandbox<'_>,
        input: &CallInput,
        args: &C::Args,
    ) -> Option<Called<C::Output>> {
        let call = self.call.downcast_ref::<CallFn<C>>()?;
        Some(call(sandbox, input, args))
    }
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
    module_for(found).map(|(_, m)| &m.min)
}

/// The row of [`VERSIONS`] that binds `found`, with its index.
fn module_for(found: &Version) -> Option<(usize, &'static VersionModule)> {
    VERSIONS.iter().enumerate().rev().find(|(_, m)| {
        let req = semver::VersionReq::parse(&format!("^{}", m.min)).ok();
        req.is_some_and(|r| r.matches(found))
    })
}

/// Binds `component` (already known to be of WIT `version`) as `kind`,
/// through the shim of that world in the version module that binds it.
pub fn prepare(
    linkers: &Linkers,
    component: &Component,
    plugin: &str,
    version: &Version,
    kind: PluginKind,
) -> Result<Prepared, PluginError> {
    let Some((index, module)) = module_for(version) else {
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
    let min = &module.min;
    let Some((_, bind)) = module.worlds.iter().find(|(k, _)| *k == kind) else {
        let having: Vec<String> = VERSIONS
            .iter()
            .filter(|m| m.worlds.iter().any(|(k, _)| *k == kind))
            .map(|m| m.min.to_string())
            .collect();
        return Err(PluginError::BadComponent {
            plugin: plugin.to_string(),
            message: format!(
                "world {kind} is not part of {}@{version} (it is in {}); rebuild it against one of those wit/ versions",
                PACKAGE,
                having.join(", ")
            ),
        });
    };
    let prepared = bind(&linkers.0[index], component).map_err(|detail| {
        PluginError::BadComponent {
            plugin: plugin.to_string(),
            message: format!(
                "it does not link as a WIT {version} {kind} ({detail}); rebuild it against wit/v{min}/plugin.wit (docs/plugin-authoring.md shows how, for every world)"
            ),
        }
    })?;
    debug_assert_eq!(prepared.kind(), kind, "a shim bound the wrong world");
    Ok(prepared)
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
        assert_eq!(
            select(&Version::new(0, 3, 1)),
            Some(&since_v0_3_0::MIN_VERSION)
        );
        assert_eq!(select(&Version::new(0, 4, 0)), None);
        assert_eq!(select(&Version::new(0, 0, 9)), None);
        assert_eq!(select(&Version::new(1, 0, 0)), None);
    }

    #[test]
    fn only_versions_since_0_2_0_are_told_the_active_policy() {
        assert!(!carries_active_policy(&Version::new(0, 1, 0)));
        assert!(!carries_active_policy(&Version::new(0, 1, 9)));
        assert!(carries_active_policy(&Version::new(0, 2, 0)));
        assert!(carries_active_policy(&Version::new(0, 2, 3)));
        assert!(carries_active_policy(&Version::new(0, 3, 0)));
        assert!(!carries_active_policy(&Version::new(0, 4, 0)));
    }

    #[test]
    fn every_version_module_binds_each_of_its_worlds_once_and_only_known_ones() {
        for module in VERSIONS {
            for world in crate::world::WORLDS {
                let shims = module.worlds.iter().filter(|(k, _)| *k == world.kind);
                assert!(
                    shims.count() <= 1,
                    "{} binds {} twice",
                    module.min,
                    world.name
                );
            }
            assert!(!module.worlds.is_empty(), "{} binds no world", module.min);
        }
        // Every world is bound by the newest version.
        let newest = VERSIONS.last().unwrap();
        assert_eq!(newest.min, latest::MIN_VERSION);
        assert_eq!(newest.worlds.len(), crate::world::WORLDS.len());
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
