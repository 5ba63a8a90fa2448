//! Command-line layer: parse arguments, call the library, print the result.
//!
//! Every command takes `-C DIR` (like git) and `--output json`. Each
//! subcommand lives in its own file and returns the [`ExitCode`] to end with;
//! failures carry theirs in [`Failure`], so the mapping from library error to
//! exit code is decided once, by the error type, never by a message.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};
use pde::ExitCode;
use pde::error::HasExitCode;

mod agent;
mod plugin;

/// pde: the Policy Deployment Engine.
#[derive(Debug, Parser)]
#[command(name = "pde", version, about, propagate_version = true)]
pub struct Cli {
    /// Run as if pde was started in DIR.
    #[arg(short = 'C', global = true, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Output format.
    #[arg(long, global = true, value_enum, default_value_t = Output::Human)]
    output: Output,
    /// More log output (-v info, -vv debug, -vvv trace); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Readable text.
    Human,
    /// One JSON document on stdout.
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Inspect, test, sign and verify WebAssembly plugins.
    #[command(subcommand)]
    Plugin(plugin::PluginCmd),
    /// Run the receiving service that targets push bundles to.
    Agent(agent::AgentArgs),
}

/// What every command gets besides its own arguments.
pub struct Ctx {
    /// The workspace directory (`-C`, default the current directory).
    pub dir: PathBuf,
    /// `--output json`.
    pub json: bool,
}

impl Ctx {
    /// Prints `value` as pretty JSON on stdout.
    pub fn print_json<T: serde::Serialize>(&self, value: &T) {
        println!(
            "{}",
            serde_json::to_string_pretty(value).expect("output serialises")
        );
    }
}

/// A command that failed, with the exit code its error means.
pub struct Failure {
    /// The exit code to end with.
    pub code: ExitCode,
    /// What went wrong, with context.
    pub error: anyhow::Error,
}

impl Failure {
    /// A usage or configuration error (exit 2).
    pub fn usage(message: impl std::fmt::Display) -> Self {
        Failure {
            code: ExitCode::Usage,
            error: anyhow::anyhow!("{message}"),
        }
    }
}

impl<E> From<E> for Failure
where
    E: HasExitCode + std::error::Error + Send + Sync + 'static,
{
    fn from(e: E) -> Self {
        Failure {
            code: e.exit_code(),
            error: e.into(),
        }
    }
}

/// What a subcommand returns.
pub type CmdResult = Result<ExitCode, Failure>;

fn init_tracing(verbose: u8) {
    use tracing_subscriber::EnvFilter;
    let default = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// Entry point of the binary.
pub fn main() -> std::process::ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let usage = e.use_stderr();
            let _ = e.print();
            return std::process::ExitCode::from(if usage { ExitCode::Usage.code() } else { 0 });
        }
    };
    init_tracing(cli.verbose);
    let dir = match &cli.dir {
        Some(d) => d.clone(),
        None => PathBuf::from("."),
    };
    let ctx = Ctx {
        dir,
        json: cli.output == Output::Json,
    };
    let result = match cli.command {
        Command::Plugin(cmd) => plugin::run(&ctx, cmd),
        Command::Agent(args) => agent::run(&ctx, args),
    };
    match result {
        Ok(code) => std::process::ExitCode::from(code.code()),
        Err(f) => {
            if ctx.json {
                ctx.print_json(&serde_json::json!({
                    "error": format!("{:#}", f.error),
                    "exit_code": f.code.code(),
                    "kind": f.code,
                }));
            }
            eprintln!("error: {:#}", f.error);
            std::process::ExitCode::from(f.code.code())
        }
    }
}
