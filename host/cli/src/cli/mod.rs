//! Command-line layer: parse arguments, call the library, print the result.
//!
//! Every command takes `-C DIR` (like git) and `--output json`. Each
//! subcommand lives in its own file and returns the [`ExitCode`] to end with;
//! failures carry theirs in [`Failure`], so the mapping from library error to
//! exit code is decided once, by the error type, never by a message.

use std::path::PathBuf;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use pde::ExitCode;
use pde::error::HasExitCode;

mod approve;
mod audit;
mod console;
mod deploy;
mod oci;
mod pipe;
mod plugin;
mod print;
mod review;
mod rollout;
mod scaffold;
mod trust;
mod workspace;

/// pde: the Policy Deployment Engine.
#[derive(Debug, Parser)]
#[command(
    name = "pde",
    version,
    about = "Ship approved policy changes: validate, package and sign, check the environment, route, push, tag the release and audit every step",
    propagate_version = true
)]
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

// Parsed once per process: boxing the agent's many flags would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Command {
    /// Validate, package, check, route, push, tag and audit a policy.
    Deploy(deploy::DeployArgs),
    /// Validate a policy: schema, versions, conflicts and every validator plugin.
    Validate(deploy::ValidateArgs),
    /// Sign off on a policy's current content with your approver key.
    Approve(approve::ApproveArgs),
    /// Build the signed bundle of a policy.
    Package(deploy::PackageArgs),
    /// Show what a deploy would do, without doing it.
    Plan(deploy::PlanArgs),
    /// Check an environment: the health of its services and its readiness checks.
    #[command(subcommand)]
    Env(deploy::EnvCmd),
    /// Show the active version of each policy per environment.
    Status(workspace::StatusArgs),
    /// Show the deployments of a policy, newest first.
    History(workspace::HistoryArgs),
    /// Return an environment to an earlier version of a policy.
    Rollback(workspace::RollbackArgs),
    /// Drive a progressive rollout: status, promote, abort, resume.
    #[command(subcommand)]
    Rollout(rollout::RolloutCmd),
    /// Check, show and export the audit log.
    #[command(subcommand)]
    Audit(audit::AuditCmd),
    /// Clear the deploy lease of a policy and environment left by a deploy that died.
    Unlock(workspace::UnlockArgs),
    /// Shared state: move a checkout's state into the team database.
    #[command(subcommand)]
    State(workspace::StateCmd),
    /// Create an ed25519 key pair for signing bundles or plugins.
    Keygen(workspace::KeygenArgs),
    /// Create a new policy workspace in the current directory.
    Init(workspace::InitArgs),
    /// Inspect, test, sign and verify WebAssembly plugins.
    #[command(subcommand)]
    Plugin(plugin::PluginCmd),
    /// Sign the workspace's trust file with the security team's key.
    #[command(subcommand)]
    Trust(trust::TrustCmd),
    /// Serve the read-only web console (overview, policies, audit, plugins, timeline).
    Serve(console::ServeArgs),
    /// Write the overview, histories and audit verification as one self-contained HTML file.
    Report(console::ReportArgs),
    /// Run a policy agent beside a service: receive, verify and serve the signed bundles `pde deploy` pushes.
    Agent(pde_agent::cli::AgentArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions(CompletionsArgs),
    /// Write man pages for pde and every subcommand.
    Man(ManArgs),
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
    /// The report the failure carries (validation findings, per-target
    /// results), for `--output json`; for a deploy, the whole report so far.
    pub report: Option<serde_json::Value>,
    /// What the failure is about, where known (`--output json` always
    /// carries these four keys, `null` when unknown).
    // Boxed: it is most often empty, and a large `Err` slows every `?`.
    pub subject: Box<Subject>,
    /// For a deploy: the part of the report of the step that failed
    /// (`validation`, `health`), by that name.
    pub failed_step: Option<&'static str>,
}

/// The policy, environment, version and digest a failure is about.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Subject {
    /// The policy id.
    pub policy_id: Option<String>,
    /// The environment.
    pub env: Option<String>,
    /// The policy version.
    pub version: Option<String>,
    /// The bundle digest.
    pub digest: Option<String>,
}

impl Failure {
    /// A usage or configuration error (exit 2).
    pub fn usage(message: impl std::fmt::Display) -> Self {
        Failure {
            code: ExitCode::Usage,
            error: anyhow::anyhow!("{message}"),
            report: None,
            subject: Box::default(),
            failed_step: None,
        }
    }

    /// A usage or configuration error (exit 2) that already has its context.
    pub fn usage_error(error: anyhow::Error) -> Self {
        Failure {
            code: ExitCode::Usage,
            error,
            report: None,
            subject: Box::default(),
            failed_step: None,
        }
    }

    /// A failure of the engine, keeping the report it carries.
    pub fn engine(ctx: &Ctx, e: pde::Error) -> Self {
        let mut subject = Box::<Subject>::default();
        match &e {
            pde::Error::ValidationFailed { report, .. } => {
                subject.policy_id = Some(report.policy_id.clone());
                subject.version = Some(report.version.clone());
                subject.env = report.environment.clone();
            }
            pde::Error::DeployFailed { report, .. } => {
                subject.policy_id = Some(report.policy_id.clone());
                subject.env = Some(report.env.clone());
                subject.version = Some(report.version.clone());
                subject.digest = Some(report.digest.clone());
            }
            pde::Error::RolloutHalted {
                policy_id,
                env,
                report,
                ..
            } => {
                subject.policy_id = Some(policy_id.clone());
                subject.env = Some(env.clone());
                subject.version = report["version"].as_str().map(str::to_string);
                subject.digest = report["digest"].as_str().map(str::to_string);
            }
            pde::Error::Rollback(pde::rollback::RollbackError::Failed { report, .. }) => {
                subject.policy_id = Some(report.policy_id.clone());
                subject.env = Some(report.env.clone());
                subject.version = Some(report.from_version.clone());
                subject.digest = Some(report.from_digest.clone());
            }
            _ => {}
        }
        let (failed_step, report) = match print::error_report(ctx, &e) {
            Some((step, report)) => (step, Some(report)),
            None => (None, None),
        };
        Failure {
            code: e.exit_code(),
            error: e.into(),
            report,
            subject,
            failed_step,
        }
    }

    /// Names the policy and environment the command was about, where the
    /// error itself did not.
    pub fn about(mut self, policy_id: &str, env: Option<&str>) -> Self {
        self.subject
            .policy_id
            .get_or_insert_with(|| policy_id.to_string());
        if self.subject.env.is_none() {
            self.subject.env = env.map(str::to_string);
        }
        self
    }

    /// A deploy's failure: `report` becomes the whole report so far (every
    /// step that ran), with the failing step's part in its place, and the
    /// subject is filled from it.
    pub fn so_far(mut self, partial: pde::report::PartialReport) -> Self {
        let s = &mut self.subject;
        s.policy_id = s.policy_id.take().or(partial.policy_id.clone());
        s.env = s.env.take().or(partial.env.clone());
        s.version = s.version.take().or(partial.version.clone());
        s.digest = s.digest.take().or(partial.digest.clone());
        let mut whole = serde_json::to_value(&partial).unwrap_or_default();
        match (self.failed_step, self.report.take()) {
            (Some(step), Some(part)) => whole[step] = part,
            // A whole deploy report already (the push failed): it is the report.
            (None, Some(full)) => whole = full,
            (_, None) => {}
        }
        self.report = Some(whole);
        self
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
            report: None,
            subject: Box::default(),
            failed_step: None,
        }
    }
}

/// An error's message, and the causes below it that add something. Library
/// errors often already say their cause in their own message (`cannot read
/// pde.toml: No such file…`); printing the chain blindly would say it twice.
fn explain(error: &anyhow::Error) -> (String, Vec<String>) {
    let message = error.to_string();
    let mut said = message.clone();
    let mut causes = Vec::new();
    for cause in error.chain().skip(1) {
        let text = cause.to_string();
        if !said.contains(&text) {
            said.push_str(&text);
            causes.push(text);
        }
    }
    (message, causes)
}

/// `pde completions SHELL`.
#[derive(Debug, clap::Args)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    shell: clap_complete::Shell,
}

/// `pde man --out DIR`.
#[derive(Debug, clap::Args)]
pub struct ManArgs {
    /// Directory for `pde.1` and one `pde-<command>.1` per subcommand.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
}

fn completions(args: CompletionsArgs) -> CmdResult {
    let mut cmd = Cli::command();
    let mut script = Vec::new();
    clap_complete::generate(args.shell, &mut cmd, "pde", &mut script);
    // A closed pipe (`pde completions bash | head`) is not an error.
    let _ = std::io::Write::write_all(&mut std::io::stdout(), &script);
    Ok(ExitCode::Ok)
}

fn man(ctx: &Ctx, args: ManArgs) -> CmdResult {
    let out = if args.out.is_absolute() {
        args.out
    } else {
        ctx.dir.join(args.out)
    };
    std::fs::create_dir_all(&out)
        .map_err(|e| Failure::usage(format!("cannot create {}: {e}", out.display())))?;
    clap_mangen::generate_to(Cli::command(), &out)
        .map_err(|e| Failure::usage(format!("cannot write man pages to {}: {e}", out.display())))?;
    if ctx.json {
        let mut pages: Vec<String> = std::fs::read_dir(&out)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        pages.sort();
        ctx.print_json(&serde_json::json!({"dir": out, "pages": pages}));
    } else {
        println!("man pages written to {}", out.display());
    }
    Ok(ExitCode::Ok)
}

/// What `pde --version` says: enough for a bug report.
fn long_version() -> String {
    let wit: Vec<String> = pde::plugin::wit::SUPPORTED
        .iter()
        .map(|v| format!("pde:plugin@{v}"))
        .collect();
    format!(
        "{}\ncommit: {}\nwasmtime: {}\nplugin WIT: {}\nbundle formats: {}\npush protocol: v{}",
        env!("CARGO_PKG_VERSION"),
        env!("PDE_GIT_COMMIT"),
        env!("PDE_WASMTIME_VERSION"),
        wit.join(", "),
        pde_core::bundle::FORMATS.join(", "),
        pde_core::wire::PROTOCOL_VERSIONS
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(", v"),
    )
}

/// What a subcommand returns.
pub type CmdResult = Result<ExitCode, Failure>;

fn init_tracing(verbose: u8, service: bool, format: pde_agent::cli::LogFormat) {
    use tracing_subscriber::EnvFilter;
    let default = match verbose {
        // A long-running service logs every request by default.
        0 if service => "info",
        // A person reads pde's own report, which says what matters in its
        // own words; log lines are for -v (issue 26).
        0 => "error",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let asked = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty());
    let filter = EnvFilter::new(log_directives(default, asked.as_deref()));
    pde_agent::cli::init_logging(filter, format);
}

/// Crates whose debug and trace output is a flood (cranelift logs every
/// instruction it lowers: gigabytes per `-vvv` run), kept at `warn` unless
/// `RUST_LOG` names them.
const NOISY_TARGETS: [&str; 5] = ["cranelift", "wasmtime", "regalloc2", "wasmparser", "pulley"];

/// The filter: `RUST_LOG` if set, else the level of `-v`; either way the
/// noisy crates stay at `warn` unless a `RUST_LOG` directive names them
/// (`RUST_LOG=cranelift=trace`, `RUST_LOG=wasmtime_environ=debug`).
fn log_directives(default: &str, rust_log: Option<&str>) -> String {
    let base = rust_log.unwrap_or(default);
    let named: Vec<&str> = base
        .split(',')
        .filter_map(|d| d.split_once('=').map(|(t, _)| t.trim()))
        .map(|t| t.split('[').next().unwrap_or(t))
        .collect();
    let mut directives = base.to_string();
    for noisy in NOISY_TARGETS {
        // The most specific directive wins, so `cranelift_codegen=trace` needs
        // no help; only a directive as broad as the quiet one would lose to it.
        if !named.iter().any(|t| !t.is_empty() && noisy.starts_with(t)) {
            directives.push_str(&format!(",{noisy}=warn"));
        }
    }
    directives
}

/// Entry point of the binary.
pub fn main() -> std::process::ExitCode {
    pipe::exit_quietly_on_closed_pipe();
    let parsed = Cli::command()
        .long_version(&*Box::leak(long_version().into_boxed_str()))
        .try_get_matches()
        .and_then(|m| Cli::from_arg_matches(&m));
    let cli = match parsed {
        Ok(cli) => cli,
        Err(e) => {
            let usage = e.use_stderr();
            let _ = e.print();
            return std::process::ExitCode::from(if usage { ExitCode::Usage.code() } else { 0 });
        }
    };
    let log_format = match &cli.command {
        Command::Agent(args) => args.log_format,
        _ => pde_agent::cli::LogFormat::Human,
    };
    init_tracing(
        cli.verbose,
        matches!(cli.command, Command::Agent(_)),
        log_format,
    );
    let dir = match &cli.dir {
        Some(d) => d.clone(),
        None => PathBuf::from("."),
    };
    let ctx = Ctx {
        dir,
        json: cli.output == Output::Json,
    };
    let result = match cli.command {
        Command::Deploy(args) => deploy::deploy(&ctx, args),
        Command::Validate(args) => deploy::validate(&ctx, args),
        Command::Approve(args) => approve::approve(&ctx, args),
        Command::Package(args) => deploy::package(&ctx, args),
        Command::Plan(args) => deploy::plan(&ctx, args),
        Command::Env(cmd) => deploy::env(&ctx, cmd),
        Command::Status(args) => workspace::status(&ctx, args),
        Command::History(args) => workspace::history(&ctx, args),
        Command::Rollback(args) => workspace::rollback(&ctx, args),
        Command::Rollout(cmd) => rollout::run(&ctx, cmd),
        Command::Audit(cmd) => audit::run(&ctx, cmd),
        Command::Unlock(args) => workspace::unlock(&ctx, args),
        Command::State(cmd) => workspace::state(&ctx, cmd),
        Command::Keygen(args) => workspace::keygen(&ctx, args),
        Command::Init(args) => workspace::init(&ctx, args),
        Command::Plugin(cmd) => plugin::run(&ctx, cmd),
        Command::Trust(cmd) => trust::run(&ctx, cmd),
        Command::Serve(args) => console::serve(&ctx, args),
        Command::Report(args) => console::report(&ctx, args),
        Command::Completions(args) => completions(args),
        Command::Man(args) => man(&ctx, args),
        Command::Agent(args) => pde_agent::cli::run(args, &ctx.dir, |addr| {
            // The first line on stdout: where it listens (port 0 included).
            println!("listening on {addr}");
            let _ = std::io::Write::flush(&mut std::io::stdout());
        })
        .map(|()| ExitCode::Ok)
        .map_err(Failure::from),
    };
    match result {
        Ok(code) => std::process::ExitCode::from(code.code()),
        Err(f) => {
            let (message, causes) = explain(&f.error);
            if ctx.json {
                ctx.print_json(&serde_json::json!({
                    "error": message,
                    "causes": causes,
                    "exit_code": f.code.code(),
                    "kind": f.code,
                    "policy_id": f.subject.policy_id,
                    "env": f.subject.env,
                    "version": f.subject.version,
                    "digest": f.subject.digest,
                    "failed_step": f.failed_step,
                    "report": f.report,
                }));
            }
            eprintln!("error: {message}");
            for cause in &causes {
                eprintln!("caused by: {cause}");
            }
            std::process::ExitCode::from(f.code.code())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::log_directives;

    #[test]
    fn noisy_crates_stay_at_warn_unless_named() {
        let d = log_directives("trace", None);
        assert!(
            d.starts_with("trace,") && d.contains("cranelift=warn"),
            "{d}"
        );
        let d = log_directives("warn", Some("debug,cranelift=trace"));
        assert!(
            !d.contains("cranelift=warn") && d.contains("wasmtime=warn"),
            "{d}"
        );
        let d = log_directives("warn", Some("wasmtime_environ=debug"));
        assert!(
            d.contains("wasmtime=warn") && d.contains("cranelift=warn"),
            "{d}"
        );
    }
}
