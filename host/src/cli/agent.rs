//! `pde agent` (in progress).
use super::{CmdResult, Ctx};

/// Agent arguments.
#[derive(Debug, clap::Args)]
pub struct AgentArgs {}

pub fn run(_ctx: &Ctx, _args: AgentArgs) -> CmdResult {
    Err(super::Failure::usage("not yet available"))
}
