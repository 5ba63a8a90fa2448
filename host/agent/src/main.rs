//! `pde-agent`: the receiving service as a small binary of its own, for
//! hosts that run a target service and should not carry the plugin runtime.
//! It takes exactly the flags of `pde agent`.

use clap::Parser;
use pde_core::HasExitCode;

/// pde-agent: the policy agent as a small binary of its own.
#[derive(Debug, Parser)]
#[command(
    name = "pde-agent",
    version,
    about = "Run a policy agent beside a service: receive, verify and serve the signed bundles `pde deploy` pushes (docs/agent.md)"
)]
struct Cli {
    /// More log output (-v info, -vv debug, -vvv trace); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(flatten)]
    agent: pde_agent::cli::AgentArgs,
}

fn main() -> std::process::ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let usage = e.use_stderr();
            let _ = e.print();
            return std::process::ExitCode::from(if usage { 2 } else { 0 });
        }
    };
    let level = match cli.verbose {
        0 | 1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    pde_agent::cli::init_logging(filter, cli.agent.log_format);
    // The first line on stdout is where it listens, so scripts and tests can
    // start it on port 0 without racing for a port.
    let listening = |addr| {
        println!("listening on {addr}");
        let _ = std::io::Write::flush(&mut std::io::stdout());
    };
    match pde_agent::cli::run(cli.agent, std::path::Path::new("."), listening) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::from(e.exit_code().code())
        }
    }
}
