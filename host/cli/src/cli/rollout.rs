//! `pde rollout status|promote|abort|resume ID --env ENV`.

use pde::ExitCode;

use super::{CmdResult, Ctx, Failure, print};

/// `pde rollout …`.
#[derive(Debug, clap::Subcommand)]
pub enum RolloutCmd {
    /// Show the latest rollout: its wave, gate results, time left in the bake.
    Status(RolloutArgs),
    /// Let a paused rollout go on to its next wave.
    Promote(RolloutArgs),
    /// Stop a rollout and send back every service it pushed to.
    Abort(RolloutArgs),
    /// Continue a rollout whose process died, from its first unfinished wave.
    Resume(RolloutArgs),
}

/// The rollout of a policy in an environment.
#[derive(Debug, clap::Args)]
pub struct RolloutArgs {
    /// The policy id.
    pub id: String,
    /// The environment.
    #[arg(long)]
    pub env: String,
}

pub fn run(ctx: &Ctx, cmd: RolloutCmd) -> CmdResult {
    let (args, read_only) = match &cmd {
        RolloutCmd::Status(a) => (a, true),
        RolloutCmd::Promote(a) | RolloutCmd::Abort(a) | RolloutCmd::Resume(a) => (a, false),
    };
    let engine = match read_only {
        true => super::deploy::open_read_only(ctx),
        false => super::deploy::open(ctx),
    }
    .map_err(|f| f.about(&args.id, Some(&args.env)))?;
    let (id, env) = (args.id.as_str(), args.env.as_str());
    let status = match &cmd {
        RolloutCmd::Status(_) => engine.rollout_status(id, env),
        RolloutCmd::Promote(_) => engine.rollout_promote(id, env),
        RolloutCmd::Abort(_) => engine.rollout_abort(id, env),
        RolloutCmd::Resume(_) => engine.rollout_resume(id, env),
    }
    .map_err(|e| Failure::engine(ctx, e).about(id, Some(env)))?;
    if ctx.json {
        ctx.print_json(&status);
    } else {
        println!(
            "policy {} v{} in {} ({}), started by {} at {}{}",
            status.policy_id,
            status.version,
            status.env,
            status.digest,
            status.actor,
            status.started_at,
            if status.live {
                "; its process is running"
            } else {
                ""
            }
        );
        if let Some(left) = status.bake_left_ms {
            println!(
                "bake: {} s left in wave {}",
                left / 1000,
                status.wave.unwrap_or(0)
            );
        }
        if let Some(c) = &status.control {
            println!("requested: {c}");
        }
        print::waves(&status.report);
    }
    Ok(ExitCode::Ok)
}
