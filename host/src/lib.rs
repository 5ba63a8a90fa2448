//! pde, the Policy Deployment Engine.
//!
//! An approved policy change goes from a policy repository to the services that
//! enforce it in seven steps: validate, package, check the environment, route,
//! push, tag and audit. [`Engine::deploy_policy`] runs them; the `pde` binary
//! is a thin command-line layer over this library.
//!
//! Module map, in pipeline order:
//! - [`config`]: `pde.toml`, the workspace description;
//! - [`diagnostic`]: findings shared by built-in checks and plugins;
//! - [`policy`]: the policy store, schema, version and conflict checks;
//! - [`plugin`]: the WebAssembly sandbox that runs validator and router plugins;
//! - [`bundle`] and [`keys`]: canonical, content-addressed, signed bundles;
//! - [`envcheck`]: health of the target services;
//! - [`push`]: concurrent delivery, verification and compensation;
//! - [`vcs`]: release tags in the policy Git repository;
//! - [`audit`]: the hash-chained audit log;
//! - [`state`]: deployment history and locks;
//! - [`pipeline`]: the seven steps, top-down;
//! - [`agent`]: the receiving service that targets run;
//! - [`term`]: escaping untrusted text before a person sees it.

pub mod agent;
pub mod audit;
pub mod bundle;
pub mod config;
pub mod diagnostic;
mod engine;
pub mod envcheck;
pub mod error;
pub mod keys;
pub mod pipeline;
pub mod plan;
pub mod plugin;
pub mod policy;
pub mod push;
pub mod rollback;
pub mod route;
pub mod state;
pub mod term;
pub mod validate;
pub mod vcs;

pub use engine::Engine;
pub use error::{Error, ExitCode};
