//! The wit-bindgen output for both worlds, kept out of the public API.
//!
//! Why two `generate!` calls with `pub_export_macro`: wit-bindgen then embeds
//! in this library only an *imports-only* copy of each world, and the full
//! world (with its single export) is embedded by the export macro in the
//! plugin crate that invokes it. A validator component therefore exports
//! `validate` and nothing else, a router exports `route` and nothing else,
//! even though both worlds live in this one crate. The router bindings reuse
//! the validator's `types` and `host` modules so there is one Rust type per
//! WIT type.
//!
//! The SDK builds against the newest contract it carries, `wit/v0.2.0`
//! (whose context holds the policy active in the target environment). Hosts
//! that support 0.2.0 load these components; plugins built with an earlier
//! SDK against `wit/v0.1.0` keep loading too (see the repository's
//! `wit/README.md`).

/// Bindings for `world validator` (generated code: the canonical ABI
/// flattens records into many parameters, hence the lint allowance).
#[allow(clippy::too_many_arguments)]
pub mod validator {
    wit_bindgen::generate!({
        path: "wit/v0.2.0/plugin.wit",
        world: "pde:plugin/validator@0.2.0",
        pub_export_macro: true,
        default_bindings_module: "::pde_plugin::__private::validator",
        runtime_path: "::pde_plugin::__private::wit_bindgen::rt",
        generate_all,
    });
}

/// Bindings for `world router`.
#[allow(clippy::too_many_arguments)]
pub mod router {
    wit_bindgen::generate!({
        path: "wit/v0.2.0/plugin.wit",
        world: "pde:plugin/router@0.2.0",
        pub_export_macro: true,
        default_bindings_module: "::pde_plugin::__private::router",
        runtime_path: "::pde_plugin::__private::wit_bindgen::rt",
        with: {
            "pde:plugin/types@0.2.0": crate::bindings::validator::pde::plugin::types,
            "pde:plugin/host@0.2.0": crate::bindings::validator::pde::plugin::host,
        },
    });
}
