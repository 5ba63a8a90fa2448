//! `pde plugin …` (in progress).
use super::{CmdResult, Ctx};

/// Plugin commands.
#[derive(Debug, clap::Subcommand)]
pub enum PluginCmd {
    /// List the plugins of the workspace.
    List,
}

pub fn run(_ctx: &Ctx, _cmd: PluginCmd) -> CmdResult {
    Err(super::Failure::usage("not yet available"))
}
