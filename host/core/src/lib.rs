//! pde-core: the leaves every other pde crate shares.
//!
//! Nothing here knows about the engine, the plugin sandbox or the agent;
//! they all depend on this crate and never the other way round:
//! - [`exit`]: exit codes (DESIGN §8), imported by every error type;
//! - [`canonical`], [`bundle`], [`keys`], [`approval`]: canonical JSON, the
//!   signed bundle, ed25519 key files and trust sets, signed approvals;
//! - [`attestation`]: the signed statement of which validators ran on a bundle;
//! - [`wire`]: types of the push protocol shared by pusher and agent;
//! - [`rollback`]: the signed statement that authorises a `POST /rollback`;
//! - [`fsutil`], [`clock`], [`retry`], [`secret`]: atomic durable writes,
//!   RFC 3339 time, the HTTP retry policy, secret strings;
//! - [`term`]: escaping untrusted text before a person sees it.

pub mod approval;
pub mod attestation;
pub mod bundle;
pub mod canonical;
pub mod clock;
pub mod exit;
pub mod fence;
pub mod fsutil;
pub mod keys;
#[cfg(feature = "oci")]
pub mod oci;
pub mod retry;
pub mod rollback;
pub mod secret;
pub mod term;
pub mod wire;

pub use exit::{ExitCode, HasExitCode};
