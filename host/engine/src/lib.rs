//! pde, the Policy Deployment Engine.
//!
//! An approved policy change goes from a policy repository to the services that
//! enforce it in seven steps: validate, package, check the environment, route,
//! push, tag and audit. [`Engine::deploy_policy`] runs them; the `pde` binary
//! (`host/cli`) parses arguments, calls this library and prints.
//!
//! Module map, in pipeline order (`docs/ARCHITECTURE.md` lists every module
//! with its layer):
//! - [`config`]: `pde.toml`, the workspace description;
//! - [`diagnostic`]: findings shared by built-in checks and plugins;
//! - [`policy`]: the policy store, schema, version and conflict checks;
//! - [`plugin`]: the WebAssembly sandbox that runs validator and router plugins;
//! - [`bundle`] and [`keys`]: canonical, content-addressed, signed bundles;
//! - [`envcheck`]: health of the target services;
//! - [`push`]: concurrent delivery, verification and compensation;
//! - [`provenance`]: the files a bundle vouches for are what its commit holds;
//! - [`vcs`]: release tags in the policy Git repository;
//! - [`audit`]: the hash-chained audit log, over a file or a team database;
//! - [`state`]: deployment history and locks, in SQLite or a team's PostgreSQL;
//! - [`team`]: unlocking stale leases and migrating state into PostgreSQL;
//! - [`pipeline`]: the seven steps, top-down;
//! - [`rollout`]: step 5 in waves, baked and judged by gates; `pde rollout`;
//! - [`live`]: `pde status --live`, what services run against the state;
//! - [`history`]: deploys refused before any push, from the audit log;
//! - [`plugin_install`]: `pde plugin install`, a built component into a workspace;
//! - [`plugin_workspace`]: one way to open a workspace's plugins (trusted keys, compile cache);
//! - [`term`]: escaping untrusted text before a person sees it.
//!
//! The receiving service that targets run is not here: it is the
//! `pde-agent` crate (`host/agent`), which links none of this library.

pub mod audit;
pub mod blocking;
mod bookkeeping;
pub mod config;
pub mod delivery;
mod engine;
pub mod error;
pub mod floor;
pub mod history;
pub mod http;
pub mod live;
pub mod pipeline;
pub mod plan;
pub mod plugin_install;
pub mod plugin_registry;
pub mod plugin_workspace;
pub mod policy;
pub mod provenance;
pub mod report;
pub mod review;
pub mod rollback;
pub mod rollout;
mod runtime;
mod stages;
pub mod state;
pub mod steps;
pub mod team;
#[cfg(test)]
mod test_receiver;
pub mod vcs;

pub use engine::Engine;
pub use error::{Error, ExitCode};
pub use pde_core::{approval, bundle, keys, term};
pub use pde_plugin_host as plugin;
pub use pde_plugin_host::diagnostic;
/// The steps under their own names, as callers know them (`pde::push::…`).
pub use steps::{envcheck, package, push, route, tag, validate};
