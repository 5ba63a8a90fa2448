//! `pde deploy`, `validate`, `package`, `plan` and `env check`.

use std::path::PathBuf;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use pde::ExitCode;
use pde::blocking::Engine;
use pde::push::{Observer, PushEvent};

use super::{CmdResult, Ctx, Failure, print};

/// `pde deploy ID --env ENV [--dry-run]`.
#[derive(Debug, clap::Args)]
pub struct DeployArgs {
    /// The policy id (its file is `<policies>/<ID>.json` or `.yaml`).
    pub id: String,
    /// The target environment, as named in pde.toml.
    #[arg(long)]
    pub env: String,
    /// Validate, package, check and route, but push nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Deploy during an active change freeze; REASON goes into the audit log.
    #[arg(long, value_name = "REASON")]
    pub override_freeze: Option<String>,
}

/// `pde validate ID [--env ENV]`.
#[derive(Debug, clap::Args)]
pub struct ValidateArgs {
    /// The policy id.
    pub id: String,
    /// Also check versions and approvals against this environment.
    #[arg(long)]
    pub env: Option<String>,
    /// Fail a plugin that tries a denied capability (a file, a socket, the
    /// environment), as `deny_attempts = true` in its manifest would.
    #[arg(long)]
    pub deny_attempts: bool,
}

/// `pde package ID [-o DIR]`.
#[derive(Debug, clap::Args)]
pub struct PackageArgs {
    /// The policy id.
    pub id: String,
    /// Write the bundle here instead of `<state>/dist/`.
    #[arg(short = 'o', long = "out", value_name = "DIR")]
    pub out: Option<PathBuf>,
}

/// `pde plan ID --env ENV`.
#[derive(Debug, clap::Args)]
pub struct PlanArgs {
    /// The policy id.
    pub id: String,
    /// The target environment.
    #[arg(long)]
    pub env: String,
}

/// `pde env …`.
#[derive(Debug, clap::Subcommand)]
pub enum EnvCmd {
    /// Check every service's health and every readiness check of an environment.
    Check {
        /// The environment.
        env: String,
    },
}

pub(super) fn open(ctx: &Ctx) -> Result<Engine, Failure> {
    Engine::open(&ctx.dir).map_err(|e| Failure::engine(ctx, e))
}

/// For commands that only read: creates no state directory, database or log.
pub(super) fn open_read_only(ctx: &Ctx) -> Result<Engine, Failure> {
    Engine::open_read_only(&ctx.dir).map_err(|e| Failure::engine(ctx, e))
}

/// Progress bars, one per target, while pushing.
struct Progress {
    multi: MultiProgress,
    bars: std::sync::Mutex<std::collections::HashMap<String, ProgressBar>>,
}

impl Observer for Progress {
    fn on_event(&self, service: &str, event: &PushEvent) {
        let mut bars = self.bars.lock().expect("progress lock");
        let bar = bars.entry(service.to_string()).or_insert_with(|| {
            let bar = self.multi.add(ProgressBar::new_spinner());
            bar.set_style(
                ProgressStyle::with_template("  {spinner} {prefix:<20} {msg}")
                    .expect("valid template"),
            );
            bar.set_prefix(service.to_string());
            bar.enable_steady_tick(std::time::Duration::from_millis(120));
            bar
        });
        let msg = match event {
            PushEvent::Started => "pushing".to_string(),
            PushEvent::Attempt { n } => format!("attempt {n}"),
            PushEvent::Retrying {
                n,
                reason,
                delay_ms,
            } => {
                format!("retry {n} in {delay_ms} ms ({reason})")
            }
            PushEvent::Delivered => "delivered, verifying".to_string(),
            PushEvent::Verified => "verified".to_string(),
            PushEvent::Failed { reason } => format!("failed: {reason}"),
            PushEvent::RollingBack => "rolling back".to_string(),
            PushEvent::RolledBack => "rolled back".to_string(),
            PushEvent::RollbackFailed { reason } => format!("ROLLBACK FAILED: {reason}"),
        };
        match event {
            PushEvent::Verified
            | PushEvent::Failed { .. }
            | PushEvent::RolledBack
            | PushEvent::RollbackFailed { .. } => bar.finish_with_message(msg),
            _ => bar.set_message(msg),
        }
    }
}

/// The environment's `promote_from`, for saying that its gate passed.
fn promote_from(engine: &Engine, env: &str) -> Option<String> {
    engine.environment(env).ok()?.promote_from.clone()
}

pub fn deploy(ctx: &Ctx, args: DeployArgs) -> CmdResult {
    if args
        .override_freeze
        .as_deref()
        .is_some_and(|r| r.trim().is_empty())
    {
        return Err(Failure::usage(
            "--override-freeze needs a reason (it goes into the audit log)",
        ));
    }
    let about = |f: Failure| f.about(&args.id, Some(&args.env));
    // Known before any step runs: what was asked for.
    let asked = || pde::report::PartialReport {
        policy_id: Some(args.id.clone()),
        env: Some(args.env.clone()),
        ..Default::default()
    };
    let engine = open(ctx).map_err(|f| about(f).so_far(asked()))?;
    let progress = Progress {
        // Bars only for a person at a terminal; hidden otherwise.
        multi: if ctx.json || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            MultiProgress::with_draw_target(indicatif::ProgressDrawTarget::hidden())
        } else {
            MultiProgress::new()
        },
        bars: Default::default(),
    };
    let so_far = pde::report::ReportSoFar::default();
    let opts = pde::pipeline::DeployOptions {
        dry_run: args.dry_run,
        observer: &progress,
        override_freeze: args.override_freeze.as_deref(),
        so_far: Some(&so_far),
        rollout_observer: &print::RolloutProgress { json: ctx.json },
    };
    let report = engine.deploy(&args.id, &args.env, &opts).map_err(|e| {
        let mut partial = so_far.get();
        if partial.policy_id.is_none() {
            partial = asked();
        }
        about(Failure::engine(ctx, e)).so_far(partial)
    })?;
    if ctx.json {
        ctx.print_json(&report);
    } else {
        print::deploy(&report, promote_from(&engine, &args.env).as_deref());
    }
    Ok(ExitCode::Ok)
}

pub fn validate(ctx: &Ctx, args: ValidateArgs) -> CmdResult {
    let engine = open_read_only(ctx).map_err(|f| f.about(&args.id, args.env.as_deref()))?;
    engine.deny_attempts(args.deny_attempts);
    let report = engine
        .validate_policy(&args.id, args.env.as_deref())
        .map_err(|e| Failure::engine(ctx, e).about(&args.id, args.env.as_deref()))?;
    if ctx.json {
        ctx.print_json(&report);
    } else {
        print::validation(&report);
    }
    Ok(ExitCode::Ok)
}

pub fn package(ctx: &Ctx, args: PackageArgs) -> CmdResult {
    let engine = open(ctx).map_err(|f| f.about(&args.id, None))?;
    let report = engine
        .package(&args.id, args.out.as_deref())
        .map_err(|e| Failure::engine(ctx, e).about(&args.id, None))?;
    if ctx.json {
        ctx.print_json(&report);
    } else {
        print::validation(&report.validation);
        println!("package   {} -> {}", report.digest, report.path.display());
    }
    Ok(ExitCode::Ok)
}

pub fn plan(ctx: &Ctx, args: PlanArgs) -> CmdResult {
    let engine = open_read_only(ctx).map_err(|f| f.about(&args.id, Some(&args.env)))?;
    let report = engine
        .plan(&args.id, &args.env)
        .map_err(|e| Failure::engine(ctx, e).about(&args.id, Some(&args.env)))?;
    if ctx.json {
        ctx.print_json(&report);
        return Ok(ExitCode::Ok);
    }
    print::validation(&report.deploy.validation);
    println!("package   {} (not written)", report.deploy.digest);
    print::artifact(
        &report.deploy.artifact,
        &report.deploy.digest,
        promote_from(&engine, &args.env).as_deref(),
    );
    println!(
        "plan      {} service(s) would receive it",
        report.targets.len()
    );
    for t in &report.targets {
        let now = t.active_digest.as_deref().unwrap_or("(none)");
        let err = t
            .error
            .as_deref()
            .map(|e| format!(" [{e}]"))
            .unwrap_or_default();
        println!(
            "  {:<20} {:<9} {now} -> {}{err}\n  {:<20} {}",
            t.service,
            print::label(&t.change),
            t.new_digest,
            "",
            t.reasons.join("; ")
        );
    }
    for n in &report.deploy.route_log {
        print::plugin_notice(n);
    }
    if let Some(waves) = &report.deploy.rollout {
        print::waves(waves);
    }
    Ok(ExitCode::Ok)
}

pub fn env(ctx: &Ctx, cmd: EnvCmd) -> CmdResult {
    let EnvCmd::Check { env } = cmd;
    let engine = open_read_only(ctx)?;
    let report = engine
        .env_check(&env)
        .map_err(|e| Failure::engine(ctx, e))?;
    if ctx.json {
        ctx.print_json(&report);
    } else {
        print::health(&report);
    }
    Ok(if report.healthy() {
        ExitCode::Ok
    } else {
        ExitCode::EnvUnhealthy
    })
}
