//! `[limits]` of `pde.toml`: what one plugin call may use.

use serde::{Deserialize, Serialize};

/// `[limits]`: what one plugin call may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Wasmtime fuel units (roughly one per wasm instruction).
    pub fuel: u64,
    /// Linear memory plus tables, in MiB.
    pub memory_mib: u64,
    /// Wall-clock time, in milliseconds.
    pub timeout_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            fuel: 2_000_000_000,
            memory_mib: 64,
            timeout_ms: 2000,
        }
    }
}
