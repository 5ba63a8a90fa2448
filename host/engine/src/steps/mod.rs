//! The seven steps of a deploy, one file each, in the order they run:
//!
//! 1. [`validate`]: schema, rule ownership, version, approvals, validator plugins;
//! 2. [`package`]: the canonical, content-addressed, signed bundle;
//! 3. [`envcheck`]: every target service is healthy, or nothing is pushed;
//! 4. [`route`]: router plugins pick the services;
//! 5. [`push`]: concurrent delivery, verification, compensation (or, for an
//!    environment delivered through an OCI registry, [`publish`]);
//!    [`waves`]: in waves when the environment has a rollout, judged by gates;
//! 6. [`tag`]: the annotated release tag;
//! 7. [`audit`]: every step's record in the hash-chained log.
//!
//! Each step takes only what it uses (a store, the plugins, an HTTP client)
//! and has its own typed error; none of them knows about the others or about
//! the [`Engine`](crate::Engine). [`crate::pipeline`] strings them together.

pub mod audit;
pub mod envcheck;
pub mod package;
pub mod push;
pub mod route;
pub mod tag;
pub mod validate;
pub mod waves;
