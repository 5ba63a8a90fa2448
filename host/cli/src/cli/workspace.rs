//! `pde status`, `history`, `rollback`, `keygen` and `init`.

use std::path::PathBuf;

use pde::ExitCode;

use super::deploy::{open, open_read_only};
use super::{CmdResult, Ctx, Failure, print};

/// `pde status [--env ENV]`.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// Only this environment.
    #[arg(long)]
    pub env: Option<String>,
    /// Ask every service's `GET /active` and compare with the state; exit 4
    /// when anything drifted.
    #[arg(long)]
    pub live: bool,
    /// For environments delivered through an OCI registry: what each
    /// policy's tag points at, read from the registry (`--output json`
    /// prints only these).
    #[arg(long, conflicts_with = "live")]
    pub registry: bool,
}

/// `pde history ID`.
#[derive(Debug, clap::Args)]
pub struct HistoryArgs {
    /// The policy id.
    pub id: String,
}

/// `pde rollback ID --env ENV [--to VERSION]`.
#[derive(Debug, clap::Args)]
pub struct RollbackArgs {
    /// The policy id.
    pub id: String,
    /// The environment.
    #[arg(long)]
    pub env: String,
    /// The version to return to (default: the one deployed before the active one).
    #[arg(long)]
    pub to: Option<String>,
    /// Why: recorded in the audit log's `rolled_back` record (`data.reason`).
    #[arg(long, value_name = "TEXT")]
    pub reason: Option<String>,
    /// Do not ask for confirmation (a terminal is asked; scripts, whose
    /// stdin is not a terminal, never are).
    #[arg(long, short = 'y')]
    pub yes: bool,
}

/// `pde unlock ID --env ENV`.
#[derive(Debug, clap::Args)]
pub struct UnlockArgs {
    /// The policy id.
    pub id: String,
    /// The environment.
    #[arg(long)]
    pub env: String,
}

/// `pde state …`.
#[derive(Debug, clap::Subcommand)]
pub enum StateCmd {
    /// Copy this checkout's SQLite history and file audit chain into the
    /// PostgreSQL database of `[state] url`, then verify the chain there.
    Migrate {
        /// Where the state comes from.
        #[arg(long, value_enum)]
        from: MigrateFrom,
    },
}

/// The source of `pde state migrate`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum MigrateFrom {
    /// `<state>/state.db` and `<state>/audit.jsonl`.
    Sqlite,
}

/// `pde keygen --out DIR [--for release|approver|plugin] [--name FILE]`.
#[derive(Debug, clap::Args)]
pub struct KeygenArgs {
    /// Directory for `<name>` (secret, mode 0600) and `<name>.pub`.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// What the key signs; it picks the default file name, so an approver's
    /// key is never written under the bundle-signing key's name.
    #[arg(long = "for", value_enum, default_value = "release")]
    pub purpose: KeyPurpose,
    /// File name of the key (default: `release.ed25519`, `approver.ed25519`
    /// or `plugin.ed25519`, after `--for`).
    #[arg(long)]
    pub name: Option<String>,
}

/// What a key made by `pde keygen` is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KeyPurpose {
    /// Signs the workspace's bundles (`[signing] key_file`).
    Release,
    /// A person's key for `pde approve` (`[trust] approver_keys`).
    Approver,
    /// Signs plugins (`pde plugin sign`, `[trust] plugin_keys`).
    Plugin,
}

impl KeyPurpose {
    fn default_name(self) -> &'static str {
        match self {
            KeyPurpose::Release => "release.ed25519",
            KeyPurpose::Approver => "approver.ed25519",
            KeyPurpose::Plugin => "plugin.ed25519",
        }
    }

    /// What to do with the key pair next, for people.
    fn next_step(self, public: &std::path::Path, secret: &std::path::Path) -> String {
        match self {
            KeyPurpose::Release => format!(
                "next: name it in pde.toml's [signing] key_file; agents trust {} (--trusted-key)",
                public.display()
            ),
            KeyPurpose::Approver => format!(
                "next: give {} to the workspace's owner for [trust] approver_keys; approve with \
                 `pde approve ID --key {} --role ROLE`",
                public.display(),
                secret.display()
            ),
            KeyPurpose::Plugin => format!(
                "next: sign with `pde plugin sign FILE.wasm --key {}` (or `pde plugin install … \
                 --sign {}`); workspaces list {} in [trust] plugin_keys",
                secret.display(),
                secret.display(),
                public.display()
            ),
        }
    }
}

/// `pde init`.
#[derive(Debug, clap::Args)]
pub struct InitArgs {}

pub fn status(ctx: &Ctx, args: StatusArgs) -> CmdResult {
    let engine = open_read_only(ctx)?;
    if let Some(env) = &args.env {
        engine
            .environment(env)
            .map_err(|e| Failure::engine(ctx, e))?;
    }
    if args.live {
        let report = engine
            .live_status(args.env.as_deref())
            .map_err(|e| Failure::engine(ctx, e))?;
        if ctx.json {
            ctx.print_json(&pde_console::docs::live_json(&report));
        } else {
            print_live(&report);
        }
        // Drift is an environment that is not as pde left it: exit 4, the
        // code scripts already read as "environment unhealthy".
        return Ok(if report.in_sync() {
            ExitCode::Ok
        } else {
            ExitCode::EnvUnhealthy
        });
    }
    let entries = engine.state().status(args.env.as_deref())?;
    if args.registry {
        return super::oci::print_tags(ctx, &engine, args.env.as_deref(), &entries);
    }
    if ctx.json {
        // The same document as the console's `/api/status`.
        ctx.print_json(&pde_console::docs::status_json(&entries));
        return Ok(ExitCode::Ok);
    }
    if entries.is_empty() {
        println!("nothing deployed yet");
    } else {
        print_status_matrices(&entries);
        super::oci::print_tags(ctx, &engine, args.env.as_deref(), &entries)?;
    }
    // Who is deploying right now, and leases left by deploys that died.
    for lease in engine.state().leases()? {
        if args.env.as_ref().is_some_and(|e| *e != lease.env) {
            continue;
        }
        if lease.stale {
            println!(
                "STALE LEASE: policy {} in {}: {}, which is no longer running; clear it with \
                 `pde unlock {} --env {}`",
                lease.policy_id,
                lease.env,
                lease.describe(),
                lease.policy_id,
                lease.env
            );
        } else {
            println!(
                "DEPLOYING: policy {} in {}: {}",
                lease.policy_id,
                lease.env,
                lease.describe()
            );
        }
    }
    Ok(ExitCode::Ok)
}

/// One line per service and policy: expected, actual, verdict.
fn print_live(r: &pde::live::LiveReport) {
    let short = |d: &Option<pde::live::Running>| match d {
        None => "-".to_string(),
        Some(run) => match (&run.version, &run.digest) {
            (Some(v), Some(d)) => format!("{v} {}", d.get(..19).unwrap_or(d)),
            _ => "UNKNOWN".to_string(),
        },
    };
    println!(
        "{:<12} {:<20} {:<10} {:<30} {:<30} state",
        "env", "service", "policy", "expected (pde)", "actual (service)"
    );
    for s in &r.services {
        if let Some(e) = &s.error {
            // The error may quote the service's own answer.
            println!(
                "{:<12} {:<20} {:<10} {:<30} {:<30} NO ANSWER: {}",
                s.env,
                s.service,
                "*",
                "",
                "",
                pde::term::escape(e)
            );
        }
        if s.policies.is_empty() && s.error.is_none() {
            println!(
                "{:<12} {:<20} {:<10} {:<30} {:<30} in-sync (nothing active)",
                s.env, s.service, "-", "-", "-"
            );
        }
        for p in &s.policies {
            let state = print::label(&p.state);
            let state = if p.state.is_drift() {
                format!("{} DRIFT", state.to_uppercase())
            } else {
                state
            };
            println!(
                "{:<12} {:<20} {:<10} {:<30} {:<30} {state}",
                s.env,
                s.service,
                // A policy id the service reports is its text, not ours.
                pde::term::escape(&p.policy_id),
                short(&p.expected),
                short(&p.actual)
            );
        }
    }
    println!();
    if r.in_sync() {
        println!("✓ every service runs what pde deployed there");
    } else {
        println!("✗ {} finding(s) of drift", r.drift);
    }
}

/// One policy × service table per environment: what each service runs for
/// each policy, as pde last pushed or confirmed it.
fn print_status_matrices(entries: &[pde::state::ActiveEntry]) {
    let mut envs: Vec<&str> = entries.iter().map(|e| e.env.as_str()).collect();
    envs.dedup();
    for (i, env) in envs.into_iter().enumerate() {
        if i > 0 {
            println!();
        }
        let rows: Vec<&pde::state::ActiveEntry> = entries.iter().filter(|e| e.env == env).collect();
        let mut services: Vec<&str> = rows
            .iter()
            .flat_map(|e| e.services.iter().map(|s| s.service.as_str()))
            .collect();
        services.sort_unstable();
        services.dedup();
        let width = services.iter().map(|s| s.len()).max().unwrap_or(0).max(9);
        print!("{:<12} {:<10}", env, "version");
        for s in &services {
            print!(" {s:<width$}");
        }
        println!(" since");
        for e in rows {
            let version = if e.version.is_empty() {
                "(none)"
            } else {
                &e.version
            };
            print!("{:<12} {:<10}", e.policy_id, version);
            for s in &services {
                let cell = match e.services.iter().find(|h| h.service == *s) {
                    None => "-".to_string(),
                    Some(h) => match (&h.version, &h.digest) {
                        (Some(v), Some(d)) if *d == e.digest => v.clone(),
                        (Some(v), Some(_)) => format!("{v}*"),
                        _ => "UNKNOWN".to_string(),
                    },
                };
                print!(" {cell:<width$}");
            }
            println!(" {}", print::seconds(&e.deployed_at));
            if let Some(d) = &e.interrupted {
                println!(
                    "{:<12} INTERRUPTED: v{} ({}) started {} by {} was killed mid-way; the \
                     services show what each was last known to run. The next deploy or \
                     rollback settles it.",
                    "",
                    d.version,
                    d.digest,
                    print::seconds(&d.started_at),
                    d.actor
                );
            }
        }
    }
    println!();
    println!(
        "- not routed there · * differs from the environment's release · UNKNOWN: a rollback failed there"
    );
}

pub fn history(ctx: &Ctx, args: HistoryArgs) -> CmdResult {
    use pde_console::docs::{self, HistoryEntry as Entry};
    let engine = open_read_only(ctx)?;
    // Deployments from the state, and deploys refused before any push,
    // which leave only audit records; newest first.
    let records = engine.audit().records()?;
    let entries =
        docs::history(engine.inner(), &args.id, &records).map_err(|e| Failure::engine(ctx, e))?;
    if ctx.json {
        // The same document as the console's `/api/history/ID`.
        ctx.print_json(&docs::history_json(&entries));
        return Ok(ExitCode::Ok);
    }
    if entries.is_empty() {
        println!("policy {} has never been deployed", args.id);
    }
    // Rollouts, wave by wave (issue 22), newest first.
    // The same rows as the console's policy page.
    let rollouts =
        docs::rollouts(engine.inner(), &args.id, None).map_err(|e| Failure::engine(ctx, e))?;
    for r in rollouts {
        println!(
            "{}  {:<12} v{:<9} rollout {:<8} {} by {}",
            print::seconds(&r.updated_at),
            r.env,
            r.version,
            r.status,
            r.digest,
            r.actor
        );
        if let Some(report) = &r.report {
            print::waves(report);
        }
    }
    for e in entries {
        match e {
            Entry::Deployment(r) => {
                println!(
                    "{}  {:<12} v{:<9} {:<16} {} by {}",
                    print::seconds(&r.finished_at),
                    r.env,
                    r.version,
                    r.outcome,
                    r.digest,
                    r.actor
                );
                for t in r.targets {
                    println!("    {:<20} {:<14} {}", t.service, t.outcome, t.detail);
                }
            }
            Entry::Refused(r) => {
                let version = r.version.as_deref().unwrap_or("?");
                let code = r
                    .exit_code
                    .map(|c| format!(" (exit {c})"))
                    .unwrap_or_default();
                println!(
                    "{}  {:<12} v{:<9} {:<16} {} by {}",
                    print::seconds(&r.finished_at),
                    r.env,
                    version,
                    "refused",
                    r.digest.as_deref().unwrap_or("(not packaged)"),
                    r.actor
                );
                println!(
                    "    refused before any push{code}: {}",
                    pde::term::escape(&r.reason)
                );
            }
        }
    }
    Ok(ExitCode::Ok)
}

/// Asks a person at a terminal to confirm; `true` to go on.
fn confirm(question: &str) -> bool {
    use std::io::Write as _;
    eprint!("{question} [y/N] ");
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    if std::io::stdin().read_line(&mut answer).is_err() {
        return false;
    }
    matches!(answer.trim().to_lowercase().as_str(), "y" | "yes")
}

pub fn rollback(ctx: &Ctx, args: RollbackArgs) -> CmdResult {
    let about = |f: Failure| f.about(&args.id, Some(&args.env));
    if args.reason.as_deref().is_some_and(|r| r.trim().is_empty()) {
        return Err(about(Failure::usage(
            "--reason needs a text (it goes into the audit log)",
        )));
    }
    let engine = open(ctx).map_err(about)?;
    // A rollback pushes to every service of the environment: a person at a
    // terminal confirms it. Scripts (stdin not a terminal) go on as before,
    // so existing automation keeps working; `--yes` skips the question.
    if !args.yes && !ctx.json && std::io::IsTerminal::is_terminal(&std::io::stdin()) {
        let active = engine
            .state()
            .active(&args.id, &args.env)
            .map_err(|e| about(e.into()))?;
        let from = active
            .map(|a| format!(" from v{}", a.version))
            .unwrap_or_default();
        let to = args
            .to
            .as_deref()
            .map(|v| format!("v{v}"))
            .unwrap_or_else(|| "the version deployed before".to_string());
        let question = format!(
            "Roll back policy {} in {}{from} to {to}? Every service holding it is asked to switch.",
            args.id, args.env
        );
        if !confirm(&question) {
            return Err(about(Failure::usage(
                "rollback not confirmed; nothing was changed (pass --yes to skip the question)",
            )));
        }
    }
    let report = engine
        .rollback_with_reason(
            &args.id,
            &args.env,
            args.to.as_deref(),
            args.reason.as_deref(),
        )
        .map_err(|e| about(Failure::engine(ctx, e)))?;
    if ctx.json {
        ctx.print_json(&report);
    } else {
        for t in &report.targets {
            println!("  {:<20} {}", t.service, t.detail);
        }
        println!(
            "✓ policy {} in {}: v{} -> v{} ({})",
            report.policy_id, report.env, report.from_version, report.to_version, report.to_digest
        );
        if let Some(reason) = &args.reason {
            println!(
                "  reason recorded in the audit log: {}",
                pde::term::escape(reason)
            );
        }
    }
    Ok(ExitCode::Ok)
}

pub fn unlock(ctx: &Ctx, args: UnlockArgs) -> CmdResult {
    let engine = open(ctx)?;
    let cleared = engine
        .unlock(&args.id, &args.env)
        .map_err(|e| Failure::engine(ctx, e))?;
    if ctx.json {
        ctx.print_json(&serde_json::json!({ "cleared": cleared }));
    } else {
        match cleared {
            Some(lease) => println!(
                "cleared the stale lease of policy {} in {} ({}); audited",
                args.id,
                args.env,
                lease.describe()
            ),
            None => println!("policy {} in {} has no lease", args.id, args.env),
        }
    }
    Ok(ExitCode::Ok)
}

pub fn state(ctx: &Ctx, cmd: StateCmd) -> CmdResult {
    match cmd {
        StateCmd::Migrate {
            from: MigrateFrom::Sqlite,
        } => {
            let engine = open(ctx)?;
            let report = engine
                .migrate_from_sqlite()
                .map_err(|e| Failure::engine(ctx, e))?;
            if ctx.json {
                ctx.print_json(&report);
            } else {
                println!(
                    "migrated {} deployment(s), {} active entr(ies), {} bundle(s) and {} audit record(s) to {}\n  audit chain verified, head {}",
                    report.deployments,
                    report.active,
                    report.bundles,
                    report.audit_records,
                    report.to,
                    report.audit_head
                );
            }
            Ok(ExitCode::Ok)
        }
    }
}

pub fn keygen(ctx: &Ctx, args: KeygenArgs) -> CmdResult {
    let out = ctx.dir.join(&args.out);
    let name = args.name.as_deref().unwrap_or(args.purpose.default_name());
    let key = pde::keys::generate(&out, name)?;
    if ctx.json {
        ctx.print_json(&key);
    } else {
        println!("secret key  {} (keep it secret)", key.secret_path.display());
        println!("public key  {}", key.public_path.display());
        println!("key id      {}", key.key_id);
        println!(
            "{}",
            args.purpose.next_step(&key.public_path, &key.secret_path)
        );
    }
    Ok(ExitCode::Ok)
}

const INIT_TOML: &str = r#"# pde workspace: see docs/release-engineer.md
policies = "policies"
plugins  = "plugins"
state    = ".pde"

[signing]
key_file = "keys/release.ed25519"

[trust]
plugin_keys = []

[limits]
fuel = 2_000_000_000
memory_mib = 64
timeout_ms = 2000

[push]
timeout_ms = 5000
retries = 3

[environments.dev]

[[environments.dev.services]]
name = "local"
url = "http://127.0.0.1:8700"
tags = ["api"]

# Production, once you have one: signed plugins, the validators a deploy
# must never run without, promotion from staging and approvals.
# [environments.production]
# require_signed_plugins = true
# required_plugins = ["pii-guard"]     # refused (exit 2) when one is missing
# promote_from = "staging"
# min_approvals = 2
# require_signed_approvals = true
"#;

pub fn init(ctx: &Ctx, _args: InitArgs) -> CmdResult {
    let toml = ctx.dir.join(pde::config::FILE_NAME);
    if toml.exists() {
        return Err(Failure::usage(format!("{} already exists", toml.display())));
    }
    let io = |e: std::io::Error| Failure::usage(e);
    for d in ["policies", "plugins", "keys"] {
        std::fs::create_dir_all(ctx.dir.join(d)).map_err(io)?;
    }
    std::fs::write(&toml, INIT_TOML).map_err(io)?;
    let ignore = ctx.dir.join(".gitignore");
    if !ignore.exists() {
        std::fs::write(&ignore, ".pde/\nkeys/*.ed25519\n").map_err(io)?;
    }
    // Every deploy needs a Git work tree (the bundle names its commit).
    let git_init = match pde::vcs::Repo::discover(&ctx.dir) {
        Ok(_) => None,
        Err(pde::vcs::VcsError::NotARepo { .. }) => {
            Some(pde::vcs::Repo::init(&ctx.dir)?.root().to_path_buf())
        }
        Err(e) => return Err(e.into()),
    };
    let key = if ctx.dir.join("keys/release.ed25519").exists() {
        None
    } else {
        Some(pde::keys::generate(
            &ctx.dir.join("keys"),
            "release.ed25519",
        )?)
    };
    if ctx.json {
        ctx.print_json(&serde_json::json!({"config": toml, "key": key, "git_init": git_init}));
    } else {
        if let Some(root) = &git_init {
            println!(
                "ran `git init` in {} (it was not in a Git work tree; deploys need one)",
                root.display()
            );
        }
        println!("created {}", toml.display());
        if let Some(k) = key {
            println!(
                "created signing key {} (id {})",
                k.secret_path.display(),
                k.key_id
            );
        }
        println!(
            "next: declare your services under [[environments.dev.services]] in pde.toml, add \
             policies/<id>.json, commit (`git add -A && git commit`), then `pde validate <id>` \
             (docs/release-engineer.md, \"Your first workspace\")"
        );
    }
    Ok(ExitCode::Ok)
}
