//! `pde serve` and `pde report --html`: parse, call pde-console, print.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use pde::ExitCode;

use super::{CmdResult, Ctx, Failure};

/// `pde serve [--listen ADDR] [--token-env VAR | --token-file FILE]`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Where to listen. Anything but loopback needs a token.
    #[arg(long, default_value = "127.0.0.1:8470", value_name = "ADDR")]
    pub listen: SocketAddr,
    /// The environment variable holding the token every request must carry.
    #[arg(long, value_name = "VAR", conflicts_with = "token_file")]
    pub token_env: Option<String>,
    /// A file holding that token (its first line).
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// How often the agents are asked what they run (0: never).
    #[arg(long, default_value_t = 15, value_name = "SECONDS")]
    pub live_every: u64,
    /// How long one live read of the agents may take.
    #[arg(long, default_value_t = 3000, value_name = "MS")]
    pub live_timeout_ms: u64,
}

/// `pde report --html FILE [--env ENV] [--since DATE]`.
#[derive(Debug, clap::Args)]
pub struct ReportArgs {
    /// The HTML file to write (self-contained: it loads nothing).
    #[arg(long, value_name = "FILE")]
    pub html: PathBuf,
    /// Only this environment.
    #[arg(long)]
    pub env: Option<String>,
    /// Only what happened on or after this date (YYYY-MM-DD or RFC 3339).
    #[arg(long, value_name = "DATE")]
    pub since: Option<String>,
}

fn token(ctx: &Ctx, args: &ServeArgs) -> Result<Option<String>, Failure> {
    if let Some(var) = &args.token_env {
        return std::env::var(var)
            .map(|t| Some(t.trim().to_string()))
            .map_err(|_| Failure::usage(format!("--token-env {var}: the variable is not set")));
    }
    if let Some(file) = &args.token_file {
        let path = ctx.dir.join(file);
        let text = std::fs::read_to_string(&path)
            .map_err(|e| Failure::usage(format!("--token-file {}: {e}", path.display())))?;
        return Ok(Some(
            text.lines().next().unwrap_or_default().trim().to_string(),
        ));
    }
    Ok(None)
}

pub fn serve(ctx: &Ctx, args: ServeArgs) -> CmdResult {
    let config = pde_console::ServeConfig {
        listen: args.listen,
        token: token(ctx, &args)?,
        live_interval: (args.live_every > 0).then(|| Duration::from_secs(args.live_every)),
        live_timeout: Duration::from_millis(args.live_timeout_ms),
    };
    pde_console::server::check(&config)?;
    let engine = pde::Engine::open_read_only(&ctx.dir).map_err(|e| Failure::engine(ctx, e))?;
    pde_console::serve_blocking(engine, config, |addr| {
        // The first line on stdout: where it listens (port 0 included).
        println!("console on http://{addr}/");
        let _ = std::io::Write::flush(&mut std::io::stdout());
    })?;
    Ok(ExitCode::Ok)
}

pub fn report(ctx: &Ctx, args: ReportArgs) -> CmdResult {
    let engine = pde::Engine::open_read_only(&ctx.dir).map_err(|e| Failure::engine(ctx, e))?;
    let options = pde_console::ReportOptions {
        env: args.env,
        since: args.since,
        pde_version: env!("CARGO_PKG_VERSION").to_string(),
        pde_commit: env!("PDE_GIT_COMMIT").to_string(),
    };
    let (report, html) = pde_console::report::render(&engine, &options)?;
    let out = ctx.dir.join(&args.html);
    pde_core::fsutil::atomic_write(&out, html.as_bytes())
        .map_err(|e| Failure::usage(format!("cannot write {}: {e}", out.display())))?;
    if ctx.json {
        let mut v = serde_json::to_value(&report).unwrap_or_default();
        v["file"] = out.display().to_string().into();
        ctx.print_json(&v);
    } else {
        println!(
            "report written to {}: audit chain {}{}",
            out.display(),
            report.audit_status,
            report
                .audit_head
                .as_ref()
                .map(|(s, h)| format!(", head seq {s} {h}"))
                .unwrap_or_default()
        );
    }
    Ok(ExitCode::Ok)
}
