//! `pde-plugin`: write pde validator and router plugins in plain Rust.
//!
//! pde plugins are WebAssembly components built for `wasm32-wasip2` against
//! the WIT contract in `wit/v0.2.0/plugin.wit` (this crate carries every
//! version; it builds against the newest). This crate hides the generated
//! bindings: a plugin implements [`Validator`] or [`Router`] over ordinary
//! Rust types ([`Policy`], [`Context`], [`Diagnostic`], [`Service`],
//! [`Route`]) and exports itself with [`export_validator!`] or
//! [`export_router!`]. The same logic compiles natively, so it can be unit
//! tested with `cargo test` without any wasm tooling.
//!
//! Since 0.2 (contract `pde:plugin@0.2.0`) the context carries the version
//! of the policy active in the target environment, [`Context::active`], so
//! a validator can judge the change: see [`ActivePolicy::rule_changes`].
//! Components built with it need a pde that supports `pde:plugin@0.2.0`;
//! components built with SDK 0.1 (contract 0.1.0) keep loading in pde
//! alongside them.
//!
//! ```
//! use pde_plugin::{Context, Diagnostic, Diagnostics, Policy, Validator};
//!
//! struct HasTitle;
//!
//! impl Validator for HasTitle {
//!     fn validate(policy: &Policy, _ctx: &Context) -> Result<Vec<Diagnostic>, String> {
//!         let mut out = Diagnostics::new();
//!         if policy.title().is_none_or(str::is_empty) {
//!             out.error("/title", "example.title-missing", "the policy has no title");
//!         }
//!         Ok(out.into_vec())
//!     }
//! }
//!
//! pde_plugin::export_validator!(HasTitle);
//! # fn main() {}
//! ```

// The generated bindings and the export macros name this crate by its
// absolute path so they work from plugin crates; this makes the same path
// resolve inside the crate itself.
extern crate self as pde_plugin;

mod active;
mod bindings;
mod context;
mod date;
mod diagnostic;
mod log;
mod policy;
mod route;

pub use active::{ActivePolicy, RuleChange};
pub use context::Context;
pub use date::Date;
pub use diagnostic::{Diagnostic, Diagnostics, Severity, json_pointer, pointer_escape};
#[cfg(not(target_arch = "wasm32"))]
pub use log::take_native_logs;
pub use log::{Level, log};
pub use policy::{Approval, Policy, Rule};
pub use route::{Route, Service};

// The plugin's global allocator (see `heap.rs`), on wasm only.
#[cfg(all(
    feature = "heap",
    target_arch = "wasm32",
    not(target_feature = "atomics")
))]
mod heap;

/// Re-exported so plugins can use the same JSON type as the SDK without
/// pinning a `serde_json` version of their own.
pub use serde_json;

/// A validator plugin: looks at one policy and reports findings.
///
/// Implement it on a unit struct and export it with [`export_validator!`].
/// The host creates a fresh instance for every call, so there is no state to
/// keep between calls.
pub trait Validator {
    /// Returns the findings about `policy`; an empty list means it passes.
    ///
    /// Return `Err` only when the plugin cannot do its job at all (for
    /// example its settings are unusable): the host then fails the deploy as
    /// a plugin fault, not as a validation failure.
    fn validate(policy: &Policy, ctx: &Context) -> Result<Vec<Diagnostic>, String>;
}

/// A router plugin: picks which services of the environment get a policy.
///
/// Implement it on a unit struct and export it with [`export_router!`].
pub trait Router {
    /// Returns the services (by name, from `services`) that must receive
    /// `policy`, each with a reason. Naming a service that is not in
    /// `services` is a plugin fault.
    fn route(policy: &Policy, ctx: &Context, services: &[Service]) -> Result<Vec<Route>, String>;
}

/// Exports a [`Validator`] implementation as the component's `validate`
/// function. Use it exactly once, in the plugin crate's `lib.rs`.
///
/// The resulting component exports `validate` only (world `validator`).
#[macro_export]
macro_rules! export_validator {
    ($ty:ty) => {
        const _: () = {
            struct __PdeValidatorExport;
            impl $crate::__private::validator::Guest for __PdeValidatorExport {
                fn validate(
                    policy: $crate::__private::types::Policy,
                    context: $crate::__private::types::Context,
                ) -> ::core::result::Result<
                    $crate::__private::Vec<$crate::__private::types::Diagnostic>,
                    $crate::__private::String,
                > {
                    $crate::__private::run_validator::<$ty>(policy, context)
                }
            }
            $crate::__private::validator::export!(
                __PdeValidatorExport with_types_in $crate::__private::validator
            );
        };
    };
}

/// Exports a [`Router`] implementation as the component's `route` function.
/// Use it exactly once, in the plugin crate's `lib.rs`.
///
/// The resulting component exports `route` only (world `router`).
#[macro_export]
macro_rules! export_router {
    ($ty:ty) => {
        const _: () = {
            struct __PdeRouterExport;
            impl $crate::__private::router::Guest for __PdeRouterExport {
                fn route(
                    policy: $crate::__private::types::Policy,
                    context: $crate::__private::types::Context,
                    services: $crate::__private::Vec<$crate::__private::types::Service>,
                ) -> ::core::result::Result<
                    $crate::__private::Vec<$crate::__private::types::Route>,
                    $crate::__private::String,
                > {
                    $crate::__private::run_router::<$ty>(policy, context, services)
                }
            }
            $crate::__private::router::export!(
                __PdeRouterExport with_types_in $crate::__private::router
            );
        };
    };
}

/// Implementation details of the export macros. Not part of the API.
#[doc(hidden)]
pub mod __private {
    pub use crate::bindings::validator::pde::plugin::types;
    pub use crate::bindings::{router, validator};
    pub use std::string::String;
    pub use std::vec::Vec;
    pub use wit_bindgen;

    use crate::{Context, Diagnostic, Policy, Route, Router, Service, Severity, Validator};

    fn policy_from_wit(policy: types::Policy) -> Result<Policy, String> {
        Policy::from_json(policy.id, policy.version, &policy.document)
    }

    /// The context, with the active version (under the policy's own id)
    /// left unparsed until the plugin asks for it.
    fn context_from_wit(context: types::Context, policy: &Policy) -> Result<Context, String> {
        let ctx = Context::from_json(context.environment, &context.settings)?;
        let Some(active) = context.active else {
            return Ok(ctx);
        };
        Ok(ctx.with_raw_active(crate::context::RawActive {
            policy_id: policy.id().to_string(),
            version: active.version,
            digest: active.digest,
            deployed_at: active.deployed_at,
            document: active.document,
        }))
    }

    fn diagnostic_to_wit(d: Diagnostic) -> types::Diagnostic {
        types::Diagnostic {
            severity: match d.severity {
                Severity::Error => types::Severity::Error,
                Severity::Warning => types::Severity::Warning,
                Severity::Info => types::Severity::Info,
            },
            path: d.path,
            code: d.code,
            message: d.message,
        }
    }

    /// Leaves the parsed policy and context to the end of the instance
    /// instead of freeing them node by node: pde runs every call in a fresh
    /// instance and throws its memory away afterwards, and tearing down a
    /// 1,000-rule document tree was about a twentieth of such a call.
    fn skip_teardown(policy: Policy, context: Context) {
        if cfg!(target_family = "wasm") {
            std::mem::forget(policy);
            std::mem::forget(context);
        }
    }

    /// Converts the WIT arguments, runs `V`, converts the result back.
    pub fn run_validator<V: Validator>(
        policy: types::Policy,
        context: types::Context,
    ) -> Result<Vec<types::Diagnostic>, String> {
        let policy = policy_from_wit(policy)?;
        let context = context_from_wit(context, &policy)?;
        let found = V::validate(&policy, &context)?;
        skip_teardown(policy, context);
        Ok(found.into_iter().map(diagnostic_to_wit).collect())
    }

    /// Converts the WIT arguments, runs `R`, converts the result back.
    pub fn run_router<R: Router>(
        policy: types::Policy,
        context: types::Context,
        services: Vec<types::Service>,
    ) -> Result<Vec<types::Route>, String> {
        let policy = policy_from_wit(policy)?;
        let context = context_from_wit(context, &policy)?;
        let services: Vec<Service> = services
            .into_iter()
            .map(|s| Service {
                name: s.name,
                tags: s.tags,
                labels: s.labels,
            })
            .collect();
        let routes = R::route(&policy, &context, &services)?;
        skip_teardown(policy, context);
        Ok(routes
            .into_iter()
            .map(|r: Route| types::Route {
                service: r.service,
                reason: r.reason,
            })
            .collect())
    }
}
