//! pde-plugin-host: the WebAssembly sandbox that runs validator, router and
//! gate plugins (DESIGN §3, §4).
//!
//! [`PluginHost`] is the facade the pipeline and the CLI use. Loading a plugin
//! checks, in order and before anything runs: manifest (typos are errors,
//! limits may only tighten), the pinned sha256, the signature status, that
//! the file is a component (not a core module), then compiles it (or loads
//! it from the on-disk cache), reads the `pde:plugin` version it was built
//! against, and pre-instantiates it against that version's world. Each call
//! then runs in a fresh store (see [`sandbox`]) and its result is bounded and
//! checked against the contract here, below every WIT version shim.
//!
//! Those load checks are the one rule for what is acceptable
//! ([`PluginHost::admit`]): `pde plugin sign`, `verify` and `inspect` ask
//! the same function the loader uses, so a reviewer is never told "valid"
//! about a plugin pde will not run (issue 27).
//!
//! Module map:
//! - the facade: `host.rs` ([`PluginHost`], its engine, cache and settings),
//!   `load.rs` (the checks of [`PluginHost::admit`]), `call.rs` (a call in a
//!   fresh sandbox, its result bounded and checked), `types.rs` (what the
//!   facade takes and gives), `error.rs` ([`PluginError`]) and `listing.rs`
//!   ([`list_dir`], nothing compiled);
//! - [`world`]: the plugin worlds, one table row each; [`wit`]: one module
//!   per WIT version, each binding its worlds with one shim per world;
//! - [`sandbox`] (limits and WASI denial), [`cache`] (compiled components on
//!   disk, authenticated), [`manifest`], [`discovery`], [`signature`],
//!   [`inspect`].

pub mod cache;
mod call;
pub mod diagnostic;
pub mod discovery;
mod error;
mod host;
pub mod inspect;
pub mod limits;
mod listing;
mod load;
pub mod manifest;
pub mod sandbox;
pub mod signature;
mod types;
pub mod wit;
pub mod world;

pub use crate::call::{MAX_GATE_STATISTICS, MAX_RESULT_BYTES, MAX_RESULT_ITEMS};
pub use crate::error::PluginError;
pub use crate::host::{PluginHost, sha256_hex};
pub(crate) use crate::host::{compile_checked, read};
pub use crate::limits::Limits;
pub use crate::listing::{Listing, list_dir};
pub use crate::types::{
    ActivePolicy, CallContext, CallReport, GateInput, GateVerdict, Judgement, Plugin, PluginNotice,
    PluginSet, PolicyInput, Route, SampleList, Samples, SamplesFile, Series, ServiceInfo,
    SignatureStatus,
};
pub use crate::world::PluginKind;
