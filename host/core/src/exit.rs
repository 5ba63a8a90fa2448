//! Exit codes: the part of every error that scripts depend on (DESIGN §8).
//!
//! Each crate and module has its own typed error; each of those maps itself
//! onto one of these codes, so the CLI never has to guess from a message.
//! This module imports nothing, so anything can depend on it.

/// The process exit codes of `pde`, as fixed by the external contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
#[repr(u8)]
pub enum ExitCode {
    /// Everything asked for was done.
    Ok = 0,
    /// Push, verification or compensation failed.
    DeployFailed = 1,
    /// Bad command line or bad configuration.
    Usage = 2,
    /// The policy did not pass validation.
    ValidationFailed = 3,
    /// A target service is unhealthy; nothing was pushed.
    EnvUnhealthy = 4,
    /// A plugin trapped, hit a limit, or is not a valid plugin component.
    PluginFault = 5,
    /// A digest, signature or the audit chain does not check out.
    Integrity = 6,
    /// Another deploy of the same policy and environment holds the lock.
    Locked = 7,
    /// A rollout stopped: a gate failed (or a person aborted it), and every
    /// wave it had pushed was sent back; nothing was tagged.
    RolloutHalted = 8,
}

impl ExitCode {
    /// The numeric process exit code.
    pub fn code(self) -> u8 {
        self as u8
    }
}

/// Implemented by every error type of the library: which exit code it means.
pub trait HasExitCode {
    /// The exit code a CLI run ending in this error must return.
    fn exit_code(&self) -> ExitCode;
}
