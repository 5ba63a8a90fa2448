//! `pde agent`: parse the flags, open the agent, print where it listens, serve.
//!
//! The first line on stdout is always `listening on <addr>` with the bound
//! address (the real port when `--listen` asks for port 0), so scripts and
//! tests can find the agent without racing for a port.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use pde::ExitCode;
use pde::agent::{Agent, AgentConfig, AgentError, DEFAULT_KEEP, DEFAULT_MAX_BODY_BYTES};
use pde::keys::TrustedKeys;

use super::{CmdResult, Ctx, Failure};

/// Run the receiving service that `pde deploy` pushes bundles to.
#[derive(Debug, clap::Args)]
pub struct AgentArgs {
    /// Address to listen on, e.g. 127.0.0.1:8700 (port 0 picks a free port).
    #[arg(long, value_name = "ADDR")]
    listen: SocketAddr,
    /// Directory for stored bundles and the active pointer (created if missing).
    #[arg(long, value_name = "DIR")]
    data_dir: PathBuf,
    /// Public key whose signatures are accepted (repeatable).
    #[arg(long = "trusted-key", value_name = "FILE")]
    trusted_keys: Vec<PathBuf>,
    /// Require `Authorization: Bearer <token>`, the token read from this variable.
    #[arg(long, value_name = "NAME")]
    token_env: Option<String>,
    /// With no --trusted-key, accept bundles without checking signatures.
    #[arg(long)]
    insecure_accept_unsigned: bool,
    /// Largest request body accepted, in bytes.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_BODY_BYTES)]
    max_body_bytes: usize,
    /// Stored bundles to keep (the active one is never pruned).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_KEEP)]
    keep: usize,
    /// Shell command run after each activation, with the bundle path appended.
    #[arg(long, value_name = "CMD")]
    on_activate: Option<String>,
}

/// Runs `pde agent` until ctrl-c or SIGTERM.
pub fn run(ctx: &Ctx, args: AgentArgs) -> CmdResult {
    let trusted = TrustedKeys::from_files(&args.trusted_keys)?;
    let token = match &args.token_env {
        None => None,
        Some(name) => Some(std::env::var(name).map_err(|_| {
            Failure::usage(format!(
                "--token-env {name}: the variable is not set; export it with the bearer token"
            ))
        })?),
    };
    let data_dir = if args.data_dir.is_absolute() {
        args.data_dir
    } else {
        ctx.dir.join(args.data_dir)
    };
    let cfg = AgentConfig {
        data_dir,
        trusted,
        insecure_accept_unsigned: args.insecure_accept_unsigned,
        token,
        max_body_bytes: args.max_body_bytes,
        keep: args.keep,
        on_activate: args.on_activate,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
        .map_err(Failure::usage_error)?;
    runtime.block_on(async move {
        let agent = Agent::open(cfg)?;
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .map_err(|source| AgentError::Bind {
                addr: args.listen,
                source,
            })?;
        let addr = listener.local_addr().map_err(AgentError::Serve)?;
        println!("listening on {addr}");
        let _ = std::io::stdout().flush();
        agent.serve(listener, pde::agent::shutdown_signal()).await?;
        Ok(ExitCode::Ok)
    })
}
