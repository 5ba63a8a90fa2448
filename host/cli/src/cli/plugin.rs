//! `pde plugin …`: list, inspect, test, sign and verify WebAssembly plugins.
//!
//! Parsing and printing only; loading, sandboxing and checking are the
//! library's `pde::plugin`.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use pde::ExitCode;
use pde::config::Config;
use pde::keys::TrustedKeys;
use pde::plugin::{
    ActivePolicy, CallContext, GateVerdict, Plugin, PluginHost, PluginKind, PolicyInput,
    SamplesFile, ServiceInfo, SignatureStatus,
};
use pde::plugin_workspace::PluginWorkspace;
use pde::term::Escaped;

use super::{CmdResult, Ctx, Failure};

/// Plugin commands.
#[derive(Debug, clap::Subcommand)]
pub enum PluginCmd {
    /// List the plugins of the workspace: name, kind, version, digest, WIT version, signature.
    List,
    /// Show the whole picture: manifest, pinned digest, signature, world,
    /// exports, imports and what is granted or denied.
    Inspect {
        /// A `.wasm` file, or the name of a workspace plugin.
        target: String,
    },
    /// What changed between two plugins: world, exports, imports, size,
    /// producers, manifest version, limits and settings (and, with
    /// `--policy`, fuel, memory and time on that policy).
    Diff {
        /// The approved plugin: a `.wasm` file or a workspace plugin name.
        old: String,
        /// The update under review: a `.wasm` file or a workspace plugin name.
        new: String,
        /// Run both over this policy file and compare their costs.
        #[arg(long, value_name = "FILE")]
        policy: Option<PathBuf>,
    },
    /// Run one plugin alone over one policy file; works outside a workspace.
    Test {
        /// A `.wasm` file, or the name of a workspace plugin.
        target: String,
        /// The policy document (JSON or YAML). Required for validators and
        /// routers; a gate takes it from `--samples` when not given.
        #[arg(long, value_name = "FILE")]
        policy: Option<PathBuf>,
        /// For a gate plugin: the samples to judge, a JSON file
        /// `{"wave": [...], "baseline": [...], "policy": {...}}`
        /// (docs/plugin-authoring.md). Exit 0 on pass, 8 on fail or
        /// inconclusive (what would halt a rollout).
        #[arg(long, value_name = "FILE")]
        samples: Option<PathBuf>,
        /// The environment to pass (and, for routers in a workspace, whose
        /// services to offer).
        #[arg(long, value_name = "ENV")]
        env: Option<String>,
        /// Settings replacing the manifest's `[settings]`: inline JSON
        /// (`'{"max": 3}'`) or a TOML or JSON file.
        #[arg(long, value_name = "FILE|JSON")]
        settings: Option<String>,
        /// Services to offer a router, replacing the workspace's: a TOML file
        /// of `[[services]]` tables or a JSON list, with pde.toml's fields
        /// (name, url, tags, labels).
        #[arg(long, value_name = "FILE")]
        services: Option<PathBuf>,
        /// The version to present as active in the environment
        /// (`context.active`, seen by plugins built against
        /// pde:plugin@0.2.0): a bundle file (`*.bundle.json`, digest
        /// checked) or a policy document (JSON or YAML). Default: none.
        #[arg(long, value_name = "FILE")]
        active: Option<PathBuf>,
        /// Fail the plugin (exit 5) if it tries a denied capability (a file,
        /// a socket, the environment), as `deny_attempts = true` in its
        /// manifest would; without it such attempts are only reported.
        #[arg(long)]
        deny_attempts: bool,
        /// The manifest to run a `.wasm` under (name, kind, `[settings]`,
        /// `[limits]`) when it is not beside it, e.g. the scaffold's
        /// `NAME.toml` at the project root; an empty `sha256` is taken from
        /// the build. Default: beside the build, else the project's.
        #[arg(long, value_name = "FILE")]
        manifest: Option<PathBuf>,
    },
    /// Sign a component and its manifest (`PATH` with `.toml`): writes `PATH.sig`.
    Sign {
        /// The `.wasm` file.
        path: PathBuf,
        /// The signing key file (hex seed).
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        /// Who signs, recorded in the signature (default: the actor pde
        /// records: $PDE_ACTOR, $USER, the repository's Git user.email, the
        /// OS user).
        #[arg(long, value_name = "NAME")]
        signer: Option<String>,
        /// A note recorded in the signature, e.g. the review ticket.
        #[arg(long, value_name = "TEXT")]
        note: Option<String>,
    },
    /// Install a built component into the workspace: copy it to
    /// `<plugins>/<name>.wasm` under its manifest's name, write the manifest
    /// beside it with `sha256` pinned, optionally sign it, and print what to
    /// commit. Refuses a component a deploy would refuse (wrong world for
    /// the manifest's kind, not a component, a bad manifest).
    Install {
        /// The built `.wasm` (any file name, e.g. `eligibility_bounds.wasm`).
        file: PathBuf,
        /// The plugin's manifest (default: FILE with `.toml`). Its `sha256`
        /// may be empty: it is pinned to FILE's.
        #[arg(long, value_name = "M")]
        manifest: Option<PathBuf>,
        /// Sign the installed plugin with this key file (hex seed).
        #[arg(long, value_name = "KEY")]
        sign: Option<PathBuf>,
        /// Who signs, recorded in the signature (default: the actor pde
        /// records: $PDE_ACTOR, $USER, the repository's Git user.email, the
        /// OS user).
        #[arg(long, value_name = "NAME", requires = "sign")]
        signer: Option<String>,
        /// A note recorded in the signature, e.g. the review ticket.
        #[arg(long, value_name = "TEXT", requires = "sign")]
        note: Option<String>,
    },
    /// Scaffold a plugin project (Cargo.toml, src/lib.rs, manifest, sample
    /// policy, README) in a new directory; works outside a workspace.
    New(super::scaffold::NewArgs),
    /// One report for a review ticket: identity, capabilities, limits and
    /// where they come from, runs over policies, changes against an old
    /// version, signatures and versions; exits non-zero on a risky change.
    Review(super::review::ReviewArgs),
    /// Verify a component's signature (default keys: the workspace's [trust] plugin_keys).
    Verify {
        /// The `.wasm` file.
        path: PathBuf,
        /// Trusted public key files; repeatable.
        #[arg(long = "key", value_name = "PUBFILE")]
        keys: Vec<PathBuf>,
    },
    /// Publish a plugin to an OCI registry (CNCF Wasm layout, as `wkg`).
    Push(super::oci::PluginPushArgs),
    /// Fetch a plugin pinned by digest from an OCI registry, verified
    /// against `[trust] plugin_keys` before it is written.
    Pull(super::oci::PluginPullArgs),
}

/// Runs a plugin subcommand.
pub fn run(ctx: &Ctx, cmd: PluginCmd) -> CmdResult {
    match cmd {
        PluginCmd::List => list(ctx),
        PluginCmd::Inspect { target } => inspect(ctx, &target),
        PluginCmd::Diff { old, new, policy } => diff(ctx, &old, &new, policy.as_deref()),
        PluginCmd::Test {
            target,
            policy,
            samples,
            env,
            settings,
            services,
            active,
            deny_attempts,
            manifest,
        } => test(
            ctx,
            &target,
            policy.as_deref(),
            &TestOptions {
                samples: samples.as_deref(),
                env: env.as_deref(),
                settings: settings.as_deref(),
                services: services.as_deref(),
                active: active.as_deref(),
                deny_attempts,
                manifest: manifest.as_deref(),
            },
        ),
        PluginCmd::Sign {
            path,
            key,
            signer,
            note,
        } => sign(ctx, &path, &key, signer, note),
        PluginCmd::Verify { path, keys } => verify(ctx, &path, &keys),
        PluginCmd::Install {
            file,
            manifest,
            sign,
            signer,
            note,
        } => install(
            ctx,
            &file,
            manifest.as_deref(),
            sign.as_deref(),
            signer,
            note,
        ),
        PluginCmd::New(args) => super::scaffold::new(ctx, args),
        PluginCmd::Push(args) => super::oci::plugin_push(ctx, args),
        PluginCmd::Pull(args) => super::oci::plugin_pull(ctx, args, |ctx, required| {
            let ws = workspace(ctx, required)?;
            Ok((ws.trust()?, ws.host()?))
        }),
        PluginCmd::Review(args) => super::review::run(ctx, args),
    }
}

/// The plugin side of the workspace in `-C DIR`: its trusted keys and
/// compile cache, derived as the engine derives them
/// (`pde::plugin_workspace`). These commands only read: they never create
/// the state directory. `required` makes a missing `pde.toml` an error.
fn workspace(ctx: &Ctx, required: bool) -> Result<PluginWorkspace, Failure> {
    Ok(PluginWorkspace::open(&ctx.dir, required)?)
}

/// The workspace TARGETS need: a name needs `pde.toml` (and says what to
/// pass instead when there is none), paths alone need none.
fn workspace_for(ctx: &Ctx, targets: &[&str]) -> Result<PluginWorkspace, Failure> {
    let name = targets.iter().find(|t| !is_path(t));
    if let Some(name) = name
        && !ctx.dir.join(pde::config::FILE_NAME).is_file()
    {
        return Err(not_a_workspace(ctx, name));
    }
    workspace(ctx, name.is_some())
}

/// TARGET names a workspace plugin, but there is no workspace: say what
/// to pass instead (issue 24).
fn not_a_workspace(ctx: &Ctx, target: &str) -> Failure {
    Failure::usage(format!(
        "{target:?} is not a .wasm file and there is no {} in {} to look the name up in; \
         outside a workspace, pass the built component's path instead (a Rust plugin \
         builds to target/wasm32-wasip2/release/{}.wasm), or -C WORKSPACE to name one of \
         its plugins",
        pde::config::FILE_NAME,
        ctx.dir.display(),
        target.replace('-', "_")
    ))
}

fn is_path(target: &str) -> bool {
    target.ends_with(".wasm") || target.contains('/') || Path::new(target).is_file()
}

/// Loads TARGET: a `.wasm` path, or a plugin of the workspace by name.
fn load_target(
    ctx: &Ctx,
    host: &PluginHost,
    config: Option<&Config>,
    trusted: &TrustedKeys,
    target: &str,
) -> Result<Plugin, Failure> {
    if is_path(target) {
        return Ok(host.load_file(Path::new(target), trusted)?);
    }
    let Some(config) = config else {
        return Err(not_a_workspace(ctx, target));
    };
    let dir = ctx.dir.join(&config.plugins);
    let plugins = host.load_dir(&dir, trusted)?;
    plugins
        .into_iter()
        .find(|p| p.name == target)
        .ok_or_else(|| {
            pde::plugin::PluginError::NotFound {
                name: target.to_string(),
                dir,
            }
            .into()
        })
}

fn signed_text(s: &SignatureStatus) -> String {
    match s {
        SignatureStatus::Unsigned => "unsigned".into(),
        SignatureStatus::Valid {
            signer,
            signed_at,
            note,
            ..
        } => format!(
            "signed by {} with {} at {signed_at}{}",
            Escaped(signer),
            s.key_text().unwrap_or_default(),
            note.as_deref()
                .map(|n| format!(": {}", Escaped(n)))
                .unwrap_or_default()
        ),
        SignatureStatus::Invalid { reason } => format!("INVALID ({})", Escaped(reason)),
    }
}

fn list(ctx: &Ctx) -> CmdResult {
    let ws = workspace(ctx, true)?;
    let trusted = ws.trust()?;
    let config = ws.config().expect("required");
    let dir = ctx.dir.join(&config.plugins);
    // Listing compiles nothing: no engine, no cache (issue 15).
    let plugins = pde::plugin::list_dir(&dir, &config.limits, &trusted)?;
    if ctx.json {
        // The same document as the console's `/api/plugins`.
        ctx.print_json(&pde_console::docs::plugins_json(&plugins));
        return Ok(ExitCode::Ok);
    }
    if plugins.is_empty() {
        println!("no plugins in {}", dir.display());
        return Ok(ExitCode::Ok);
    }
    println!(
        "{:<20} {:<9} {:<9} {:<14} {:<5} SIGNATURE",
        "NAME", "KIND", "VERSION", "SHA256", "WIT"
    );
    for p in &plugins {
        println!(
            "{:<20} {:<9} {:<9} {:<14} {:<5} {}",
            p.name,
            p.kind.to_string(),
            Escaped(&p.version).to_string(),
            &p.sha256[..12],
            p.wit_version.to_string(),
            signed_text(&p.signature)
        );
    }
    Ok(ExitCode::Ok)
}

/// The `.wasm` path of TARGET: a path, or a workspace plugin by name
/// (found by its manifest, without loading it, so that inspect and diff
/// can show a plugin that would not load).
fn target_path(ctx: &Ctx, config: Option<&Config>, target: &str) -> Result<PathBuf, Failure> {
    if is_path(target) {
        return Ok(PathBuf::from(target));
    }
    let Some(config) = config else {
        return Err(not_a_workspace(ctx, target));
    };
    let dir = ctx.dir.join(&config.plugins);
    pde::plugin::discovery::discover(&dir)?
        .into_iter()
        .find(|f| f.manifest.name == target)
        .map(|f| f.wasm)
        .ok_or_else(|| {
            pde::plugin::PluginError::NotFound {
                name: target.to_string(),
                dir,
            }
            .into()
        })
}

fn inspect(ctx: &Ctx, target: &str) -> CmdResult {
    let ws = workspace_for(ctx, &[target])?;
    let config = ws.config();
    let trusted = ws.trust()?;
    let path = target_path(ctx, config, target)?;
    let host = ws.host()?;
    let report = host.inspect_file(&path, &trusted)?;
    // What pde refuses to run, inspect refuses too, with the same exit code
    // (after showing the whole picture, so the reviewer sees why).
    let verdict = report.refused.as_ref().map_or(ExitCode::Ok, |r| r.exit);
    if ctx.json {
        ctx.print_json(&report);
        return Ok(verdict);
    }
    println!("{}", path.display());
    println!("  sha256:   {}", report.sha256);
    println!("  size:     {} bytes", report.size);
    if let Some(cached) = report.loaded_from_cache {
        println!("  compiled: {}", cache_text(&host, &report.sha256, cached));
    }
    match &report.manifest {
        None => {
            println!("  manifest: none beside it (pde will not load it from a plugin directory)")
        }
        Some(m) => {
            let text = |k: &str| match m.get(k) {
                Some(serde_json::Value::String(s)) => Escaped(s).to_string(),
                Some(v) => v.to_string(),
                None => String::new(),
            };
            println!(
                "  manifest: {} {} v{}: {}",
                text("name"),
                text("kind"),
                text("version"),
                text("description")
            );
            let pinned = if report.sha256_matches_manifest == Some(true) {
                "matches the file".to_string()
            } else {
                format!("DOES NOT MATCH the file (pins {})", text("sha256"))
            };
            println!("    pinned sha256: {pinned}");
            let limits = m.get("limits").cloned().unwrap_or_default();
            let limits = if limits.as_object().is_none_or(|o| o.is_empty()) {
                "workspace [limits]".to_string()
            } else if report.loosened_limits.is_empty() {
                format!("{limits} (tightening the workspace [limits])")
            } else {
                let over: Vec<String> = report
                    .loosened_limits
                    .iter()
                    .map(|l| format!("{} {} > {}", l.field, l.manifest, l.workspace))
                    .collect();
                format!(
                    "{limits} LOOSENING the workspace [limits] ({}): pde refuses it",
                    over.join(", ")
                )
            };
            println!("    limits:   {limits}");
            println!(
                "    settings: {}",
                m.get("settings").cloned().unwrap_or_default()
            );
        }
    }
    if let Some(sig) = &report.signature {
        println!("  signature: {}", signed_text(sig));
    }
    println!(
        "  world:    {}",
        report
            .kind
            .map(|k| k.to_string())
            .unwrap_or_else(|| format!(
                "none (exports {})",
                pde::plugin::world::no_export_in_words()
            ))
    );
    let supported = report.wit_supported.join(", ");
    let binding = match &report.wit_bound_by {
        Some(module) if report.sees_active_policy => format!(
            "supported (bound by the {module} module; its context carries the active policy)"
        ),
        Some(module) => format!(
            "supported (bound by the {module} module; not told the active policy, which needs 0.2.0)"
        ),
        None => format!("NOT SUPPORTED by this pde (it binds {supported}): it will not load"),
    };
    println!(
        "  pde:plugin version: {} {binding}",
        if report.wit_versions.is_empty() {
            "none named".to_string()
        } else {
            report.wit_versions.join(", ")
        }
    );
    println!("  exports:  {}", report.exports.join(", "));
    for e in &report.tolerated_exports {
        let why = pde::plugin::inspect::TOLERATED_EXPORTS
            .iter()
            .find(|(name, _)| name == e)
            .map(|(_, why)| *why)
            .unwrap_or_default();
        println!("    tolerated  {e}: {why}");
    }
    for e in &report.unexpected_exports {
        println!("    NOT IN THE WORLD  {e}: pde refuses to load a plugin that exports it");
    }
    println!("  producers:");
    for p in &report.producers {
        println!(
            "    {}: {} {}",
            Escaped(&p.field),
            Escaped(&p.name),
            Escaped(&p.version)
        );
    }
    println!("  imports (capabilities asked for):");
    for c in &report.capabilities {
        println!(
            "    {} {:<40} {}",
            if c.granted { "granted" } else { "DENIED " },
            c.import,
            c.note
        );
    }
    match &report.refused {
        None => println!("  verdict:  acceptable: pde would load it"),
        Some(r) => println!(
            "  verdict:  REFUSED (exit {}): {}",
            r.exit_code,
            Escaped(&r.reason)
        ),
    }
    Ok(verdict)
}

fn diff(ctx: &Ctx, old: &str, new: &str, policy: Option<&Path>) -> CmdResult {
    let ws = workspace_for(ctx, &[old, new])?;
    let config = ws.config();
    let trusted = ws.trust()?;
    let (old_path, new_path) = (
        target_path(ctx, config, old)?,
        target_path(ctx, config, new)?,
    );
    let mut host = ws.host()?;
    host.trace_call_logs(false);
    let a = host.inspect_file(&old_path, &trusted)?;
    let b = host.inspect_file(&new_path, &trusted)?;
    let changes = pde::plugin::inspect::diff(&a, &b);
    // Without a manifest on both sides there is nothing to compare the
    // manifests by; say so rather than print "no changes" (issue 24).
    let missing: Vec<String> = [(&old_path, &a), (&new_path, &b)]
        .into_iter()
        .filter(|(_, i)| i.manifest.is_none())
        .map(|(p, _)| {
            format!(
                "{} has no manifest beside it ({})",
                p.display(),
                pde::plugin::signature::manifest_path(p).display()
            )
        })
        .collect();
    let manifest_skipped = (!missing.is_empty()).then(|| {
        let mut why = missing.join("; ");
        if config.is_none() {
            why.push_str(&format!(
                "; outside a workspace (no {} in {}) a .wasm's manifest is only read from \
                 beside it: name workspace plugins with -C DIR, or put NAME.toml beside NAME.wasm",
                pde::config::FILE_NAME,
                ctx.dir.display()
            ));
        }
        why
    });
    let runs = match policy {
        None => None,
        Some(file) => {
            let input = read_policy(file)?;
            let old_plugin = host.load_file(&old_path, &trusted)?;
            let new_plugin = host.load_file(&new_path, &trusted)?;
            Some(pde::review::diff_runs(
                &host,
                (&old_plugin, &new_plugin),
                file,
                &input,
            ))
        }
    };
    let verdict = match &runs {
        Some((d, _, _)) if d.fault.0.is_some() || d.fault.1.is_some() => ExitCode::PluginFault,
        _ => ExitCode::Ok,
    };
    if ctx.json {
        let cost = |r: &pde::review::PolicyRun| {
            serde_json::json!({
                "fuel_used": r.fuel_used,
                "peak_memory_bytes": r.peak_memory_bytes,
                "elapsed_ms": r.elapsed_ms,
            })
        };
        ctx.print_json(&serde_json::json!({
            "old": old_path,
            "new": new_path,
            "changes": changes,
            "manifest_compared": manifest_skipped.is_none(),
            "manifest_skipped": manifest_skipped,
            "signatures": {"old": a.signature, "new": b.signature},
            "costs": runs.as_ref().map(|(_, o, n)| serde_json::json!({"old": cost(o), "new": cost(n)})),
            "runs": runs.as_ref().map(|(d, _, _)| d),
        }));
        return Ok(verdict);
    }
    println!("{} -> {}", old_path.display(), new_path.display());
    let sig = |s: &Option<SignatureStatus>| {
        s.as_ref()
            .map(signed_text)
            .unwrap_or_else(|| "unsigned".into())
    };
    println!("  signature (old): {}", sig(&a.signature));
    println!("  signature (new): {}", sig(&b.signature));
    if changes.is_empty() {
        println!("  no changes in world, exports, imports, bytes, producers or manifest");
    }
    for c in &changes {
        match (c.old.is_empty(), c.new.is_empty()) {
            (true, _) => println!("  + {}: {}", c.what, Escaped(&c.new)),
            (_, true) => println!("  - {}: {}", c.what, Escaped(&c.old)),
            _ => println!("  ~ {}: {} -> {}", c.what, Escaped(&c.old), Escaped(&c.new)),
        }
    }
    if let Some(why) = &manifest_skipped {
        println!("  manifest comparison skipped: {}", Escaped(why));
    }
    if let (Some((d, o, n)), Some(file)) = (&runs, policy) {
        print_runs_diff(file, d);
        println!(
            "  fuel used:   {} -> {}\n  peak memory: {:.1} MiB -> {:.1} MiB\n  time:        {:.2} ms -> {:.2} ms",
            o.fuel_used,
            n.fuel_used,
            o.peak_memory_bytes as f64 / (1024.0 * 1024.0),
            n.peak_memory_bytes as f64 / (1024.0 * 1024.0),
            o.elapsed_ms,
            n.elapsed_ms
        );
    }
    Ok(verdict)
}

/// The findings (or routes) two builds give on one policy, as `+`, `-`
/// and `~` lines like the rest of `plugin diff`.
fn print_runs_diff(file: &Path, d: &pde::review::RunsDiff) {
    println!(
        "  on {}: verdict {} -> {}",
        file.display(),
        d.verdict.0,
        d.verdict.1
    );
    for (side, fault) in [("old", &d.fault.0), ("new", &d.fault.1)] {
        if let Some(why) = fault {
            println!("    {side} build FAULTED: {}", Escaped(why));
        }
    }
    let f = &d.findings;
    for x in &f.added {
        println!("    + finding {x}");
    }
    for x in &f.removed {
        println!("    - finding {x}");
    }
    for c in &f.changed {
        println!("    ~ finding {}\n        now {}", c.old, c.new);
    }
    let r = &d.routes;
    for x in &r.added {
        println!("    + route {}", Escaped(x));
    }
    for x in &r.removed {
        println!("    - route {}", Escaped(x));
    }
    for c in &r.changed {
        println!("    ~ route {} -> {}", Escaped(&c.old), Escaped(&c.new));
    }
    if f.is_empty() && r.is_empty() {
        println!(
            "    same findings and routes ({} alike)",
            f.unchanged + r.unchanged
        );
    } else if f.unchanged + r.unchanged > 0 {
        println!("    ({} alike)", f.unchanged + r.unchanged);
    }
}

fn read_policy(path: &Path) -> Result<PolicyInput, Failure> {
    pde::review::read_policy(path).map_err(|e| Failure::usage(e.to_string()))
}

/// `--active`: a bundle (digest checked; its policy, version and digest),
/// or a plain policy document (no digest, no deploy time).
fn read_active(path: &Path) -> Result<ActivePolicy, Failure> {
    let value = read_document(path)?;
    if value.get("format").is_some() && value.get("payload").is_some() {
        let bundle = pde::bundle::Bundle::from_value(value).map_err(|e| {
            Failure::usage(format!(
                "--active {}: not a usable bundle: {e}",
                path.display()
            ))
        })?;
        return Ok(ActivePolicy {
            version: bundle.payload.manifest.version,
            digest: bundle.digest,
            deployed_at: String::new(),
            document: bundle.payload.policy,
        });
    }
    let version = value
        .get("version")
        .and_then(|v| v.as_str())
        .unwrap_or_default()
        .to_string();
    Ok(ActivePolicy {
        version,
        digest: String::new(),
        deployed_at: String::new(),
        document: value,
    })
}

/// A JSON or YAML object from `path`.
fn read_document(path: &Path) -> Result<serde_json::Value, Failure> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading policy {}", path.display()))
        .map_err(Failure::usage_error)?;
    let document: serde_json::Value = match serde_json::from_str(&text) {
        Ok(v) => v,
        Err(json_err) => serde_saphyr::from_str(&text).map_err(|yaml_err| {
            Failure::usage(format!(
                "{} is neither JSON ({json_err}) nor YAML ({yaml_err})",
                path.display()
            ))
        })?,
    };
    if !document.is_object() {
        return Err(Failure::usage(format!(
            "{} must hold a policy object",
            path.display()
        )));
    }
    Ok(document)
}

/// `pde plugin test`'s options beside the target and policy.
struct TestOptions<'a> {
    samples: Option<&'a Path>,
    env: Option<&'a str>,
    settings: Option<&'a str>,
    services: Option<&'a Path>,
    active: Option<&'a Path>,
    deny_attempts: bool,
    manifest: Option<&'a Path>,
}

/// Whether the build came from the compile cache or was compiled now, and
/// where it is cached (issue 24: "cached when a cache directory is
/// available" left the reader to guess).
fn compile_text(host: &PluginHost, plugin: &Plugin) -> String {
    cache_text(host, &plugin.sha256, plugin.loaded_from_cache)
}

fn cache_text(host: &PluginHost, sha256: &str, from_cache: bool) -> String {
    let at = host.cached_at(sha256);
    let places = at
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    match (from_cache, at.is_empty(), host.cache_dirs().is_empty()) {
        (true, _, _) => format!("loaded from the compile cache ({places})"),
        (false, false, _) => format!("compiled now, and cached in {places}"),
        (false, true, true) => "compiled now, not cached: there is no cache directory (set \
                                $PDE_CACHE_DIR, or $XDG_CACHE_HOME or $HOME for the per-user one)"
            .to_string(),
        (false, true, false) => format!(
            "compiled now, NOT cached: nothing could be written to {} (-v says why)",
            host.cache_dirs()
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Reads `text` as JSON or, failing that, TOML; `what` names it in errors.
fn json_or_toml(text: &str, what: &str) -> Result<serde_json::Value, Failure> {
    match serde_json::from_str(text) {
        Ok(v) => Ok(v),
        Err(json_err) => toml::from_str::<serde_json::Value>(text).map_err(|toml_err| {
            Failure::usage(format!(
                "{what} is neither JSON ({json_err}) nor TOML ({})",
                toml_err.message()
            ))
        }),
    }
}

/// `--settings`: inline JSON when it looks like an object, else a file.
fn read_settings(arg: &str) -> Result<serde_json::Value, Failure> {
    let trimmed = arg.trim_start();
    let value = if trimmed.starts_with('{') {
        serde_json::from_str(trimmed)
            .map_err(|e| Failure::usage(format!("--settings is not valid JSON: {e}")))?
    } else {
        let text = std::fs::read_to_string(arg)
            .with_context(|| format!("reading settings {arg}"))
            .map_err(Failure::usage_error)?;
        json_or_toml(&text, arg)?
    };
    if !value.is_object() {
        return Err(Failure::usage(format!(
            "--settings must be a table (a JSON object), not {value}"
        )));
    }
    Ok(value)
}

/// `--services`: a TOML file of `[[services]]`, or a JSON list (or a JSON
/// object with a `services` list), checked as strictly as pde.toml's.
fn read_services(path: &Path) -> Result<Vec<ServiceInfo>, Failure> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading services {}", path.display()))
        .map_err(Failure::usage_error)?;
    let value = json_or_toml(&text, &path.display().to_string())?;
    let list = match value {
        serde_json::Value::Array(_) => value,
        serde_json::Value::Object(mut table) if table.len() == 1 => {
            table.remove("services").ok_or_else(|| {
                Failure::usage(format!(
                    "{} must hold [[services]] tables or a JSON list of services",
                    path.display()
                ))
            })?
        }
        _ => {
            return Err(Failure::usage(format!(
                "{} must hold [[services]] tables or a JSON list of services",
                path.display()
            )));
        }
    };
    let services: Vec<pde::config::Service> = serde_json::from_value(list)
        .map_err(|e| Failure::usage(format!("{}: {e}", path.display())))?;
    let mut seen = std::collections::BTreeSet::new();
    for s in &services {
        if !seen.insert(s.name.as_str()) {
            return Err(Failure::usage(format!(
                "{}: service {:?} is listed twice",
                path.display(),
                s.name
            )));
        }
    }
    Ok(services.iter().map(ServiceInfo::from).collect())
}

/// Which manifest `plugin test` ran the build under, and how it was found.
#[derive(serde::Serialize)]
struct ManifestUsed {
    /// The manifest file; `None`: none, the kind was read from the exports.
    path: Option<PathBuf>,
    /// `beside the build`, `--manifest`, `found in the project`, `the
    /// workspace's plugin directory` or `none`.
    how: &'static str,
    /// Its sha256 was the scaffold's empty placeholder: taken from the build.
    unpinned: bool,
    /// Why a project manifest was not used, when one was looked for.
    note: Option<String>,
}

/// Loads TARGET for `plugin test` under the manifest that applies: the
/// one given, the one beside the build, or the one its project keeps at
/// its root (issue 24: the Rust scaffold's `NAME.toml` is never beside
/// `target/.../NAME_WITH_UNDERSCORES.wasm`).
fn load_for_test(
    ctx: &Ctx,
    host: &PluginHost,
    config: Option<&Config>,
    trusted: &TrustedKeys,
    target: &str,
    manifest: Option<&Path>,
) -> Result<(Plugin, ManifestUsed), Failure> {
    let used = |path: Option<PathBuf>, how, unpinned, note| ManifestUsed {
        path,
        how,
        unpinned,
        note,
    };
    if !is_path(target) {
        if manifest.is_some() {
            return Err(Failure::usage(format!(
                "--manifest applies to a .wasm path; {target:?} is a workspace plugin, whose \
                 manifest is the one beside it in the plugin directory"
            )));
        }
        let plugin = load_target(ctx, host, config, trusted, target)?;
        let path = pde::plugin::signature::manifest_path(&plugin.path);
        return Ok((
            plugin,
            used(Some(path), "the workspace's plugin directory", false, None),
        ));
    }
    let wasm = Path::new(target);
    let beside = pde::plugin::signature::manifest_path(wasm);
    let (path, how, note) = match manifest {
        Some(m) => (Some(m.to_path_buf()), "--manifest", None),
        None if beside.is_file() => (Some(beside), "beside the build", None),
        None => match pde::plugin::discovery::project_manifest(wasm) {
            pde::plugin::discovery::ProjectManifest::Found(m) => {
                (Some(m), "found in the project", None)
            }
            pde::plugin::discovery::ProjectManifest::Ambiguous(all) => (
                None,
                "none",
                Some(format!(
                    "several manifests in the project name this build ({}); pass the one to \
                     use with --manifest FILE",
                    all.iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )),
            ),
            pde::plugin::discovery::ProjectManifest::None => (
                None,
                "none",
                Some(
                    "no manifest beside the build or in its project: the kind is read from \
                     its exports, with no settings (pass --manifest FILE to use one)"
                        .to_string(),
                ),
            ),
        },
    };
    match path {
        Some(m) => {
            let (plugin, unpinned) = host.admit_with_manifest(wasm, &m, trusted)?;
            Ok((plugin, used(Some(m), how, unpinned, note)))
        }
        None => Ok((host.load_file(wasm, trusted)?, used(None, how, false, note))),
    }
}

/// `n` with thousands separated: `2,000,000,000`.
fn grouped(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn test(ctx: &Ctx, target: &str, policy_path: Option<&Path>, opts: &TestOptions<'_>) -> CmdResult {
    let env = opts.env;
    let ws = workspace_for(ctx, &[target])?;
    let config = ws.config();
    let trusted = ws.trust()?;
    let mut host = ws.host()?;
    // The report's log is printed below (or is in the JSON): once is enough.
    host.trace_call_logs(false);
    host.deny_attempts(opts.deny_attempts);
    let (mut plugin, manifest) =
        load_for_test(ctx, &host, config, &trusted, target, opts.manifest)?;
    let settings_from = match (opts.settings, &manifest.path) {
        (Some(_), _) => "--settings (for this run only)".to_string(),
        (None, Some(m)) => format!("the manifest {}", m.display()),
        (None, None) => "none".to_string(),
    };
    if let Some(arg) = opts.settings {
        // Only this run sees them: the manifest (and its signature) stay as they are.
        plugin.settings = read_settings(arg)?;
    }
    let limits_from = if plugin.limits != *host.limits() {
        "the manifest's [limits], within the workspace's"
    } else if config.is_some() {
        "the workspace's [limits]"
    } else {
        "pde's defaults, as there is no workspace"
    };
    let offered = opts.services.map(read_services).transpose()?;
    let samples = match (plugin.kind, opts.samples) {
        (PluginKind::Gate, Some(path)) => Some(read_samples(path)?),
        (PluginKind::Gate, None) => {
            return Err(Failure::usage(format!(
                "{} is a gate plugin: give it samples to judge with --samples FILE (see docs/plugin-authoring.md)",
                plugin.name
            )));
        }
        (kind, Some(_)) => {
            return Err(Failure::usage(format!(
                "--samples is for gate plugins; {} is a {kind}",
                plugin.name
            )));
        }
        (_, None) => None,
    };
    let policy = match (policy_path, &samples) {
        (Some(path), _) => read_policy(path)?,
        (None, Some(file)) => samples_policy(file)?,
        (None, None) => {
            return Err(Failure::usage(format!(
                "{} is a {}: give it a policy with --policy FILE",
                plugin.name, plugin.kind
            )));
        }
    };
    let call = CallContext {
        environment: env.unwrap_or_default().to_string(),
        active: opts.active.map(read_active).transpose()?,
    };
    if call.active.is_some() && !plugin.sees_active_policy() {
        tracing::warn!(
            plugin = plugin.name.as_str(),
            wit = %plugin.wit_version,
            "--active is not passed on: the plugin is built against pde:plugin@{}, and only 0.2.0 and later are told the active policy",
            plugin.wit_version
        );
    }
    let cache = (!host.cache_dirs().is_empty()).then_some(plugin.loaded_from_cache);
    tracing::info!(plugin = plugin.name.as_str(), loaded_from_cache = ?cache, "plugin ready");
    let compiled = compile_text(&host, &plugin);
    let (result, stats, exit) = match plugin.kind {
        PluginKind::Validator => {
            let report = host.validate(&plugin, &policy, &call)?;
            let errors = report.value.iter().filter(|d| d.is_error()).count();
            let verdict = if errors > 0 { "fail" } else { "pass" };
            if !ctx.json {
                for d in &report.value {
                    println!("{d}");
                }
            }
            let exit = if errors > 0 {
                ExitCode::ValidationFailed
            } else {
                ExitCode::Ok
            };
            let summary = format!(
                "verdict: {verdict} ({} diagnostics, {errors} errors)",
                report.value.len()
            );
            (
                serde_json::json!({"verdict": verdict, "diagnostics": report.value, "summary": summary}),
                (
                    report.fuel_used,
                    report.peak_memory_bytes,
                    report.elapsed,
                    report.log,
                    report.denied,
                ),
                exit,
            )
        }
        PluginKind::Router => {
            let services: Vec<ServiceInfo> = match (offered, env, config) {
                (Some(services), _, _) => services,
                (None, Some(name), Some(config)) => config
                    .environment(name)?
                    .services
                    .iter()
                    .map(ServiceInfo::from)
                    .collect(),
                _ => Vec::new(),
            };
            let report = host.route(&plugin, &policy, &call, &services)?;
            if !ctx.json {
                if services.is_empty() {
                    println!(
                        "(no services offered: pass --services FILE, or --env ENV in a workspace \
                         to offer that environment's services)"
                    );
                }
                for r in &report.value {
                    println!("route -> {}: {}", Escaped(&r.service), Escaped(&r.reason));
                }
            }
            let summary = format!("verdict: routed to {} services", report.value.len());
            (
                serde_json::json!({"verdict": "routed", "routes": report.value, "summary": summary}),
                (
                    report.fuel_used,
                    report.peak_memory_bytes,
                    report.elapsed,
                    report.log,
                    report.denied,
                ),
                ExitCode::Ok,
            )
        }
        PluginKind::Gate => {
            let input = samples.as_ref().map(|f| f.input()).unwrap_or_default();
            let report = host.gate(&plugin, &policy, &call, &input)?;
            let j = &report.value;
            let verdict = serde_json::to_value(j.verdict)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            if !ctx.json {
                println!(
                    "samples: wave {}, baseline {}",
                    input.wave_samples.len(),
                    input
                        .baseline_samples
                        .as_ref()
                        .map_or("none".to_string(), |b| b.len().to_string())
                );
                for (name, value) in &j.statistics {
                    println!("  {}: {value}", Escaped(name));
                }
            }
            let exit = match j.verdict {
                GateVerdict::Pass => ExitCode::Ok,
                GateVerdict::Fail | GateVerdict::Inconclusive => ExitCode::RolloutHalted,
            };
            let summary = format!("verdict: {verdict}: {}", Escaped(&j.reason));
            (
                serde_json::json!({
                    "verdict": j.verdict,
                    "reason": j.reason,
                    "statistics": j.statistics.iter()
                        .map(|(k, v)| serde_json::json!({"name": k, "value": v}))
                        .collect::<Vec<_>>(),
                    "wave_samples": input.wave_samples.len(),
                    "baseline_samples": input.baseline_samples.as_ref().map(|b| b.len()),
                    "summary": summary,
                }),
                (
                    report.fuel_used,
                    report.peak_memory_bytes,
                    report.elapsed,
                    report.log.clone(),
                    report.denied.clone(),
                ),
                exit,
            )
        }
    };
    let (fuel_used, peak, elapsed, log, denied) = stats;
    let limits = plugin.limits;
    if ctx.json {
        let mut doc = serde_json::json!({
            "plugin": plugin.name,
            "kind": plugin.kind,
            "fuel_used": fuel_used,
            "peak_memory_bytes": peak,
            "elapsed_ms": elapsed.as_secs_f64() * 1000.0,
            "log": log,
            "denied": denied,
            "loaded_from_cache": cache,
            "compiled": compiled,
            "cached_at": host.cached_at(&plugin.sha256),
            "manifest": manifest,
            "settings": plugin.settings,
            "settings_from": settings_from,
            "limits": limits,
            "limits_from": limits_from,
            "wit_version": plugin.wit_version.to_string(),
            "active": call.active.as_ref().filter(|_| plugin.sees_active_policy()),
        });
        for key in [
            "verdict",
            "diagnostics",
            "routes",
            "reason",
            "statistics",
            "wave_samples",
            "baseline_samples",
        ] {
            if let Some(v) = result.get(key) {
                doc[key] = v.clone();
            }
        }
        ctx.print_json(&doc);
        return Ok(exit);
    }
    println!("compiled: {compiled}");
    match &manifest.path {
        Some(m) => println!(
            "manifest: {} ({}{})",
            m.display(),
            manifest.how,
            if manifest.unpinned {
                "; its sha256 is not pinned yet: taken from this build"
            } else {
                ""
            }
        ),
        None => println!("manifest: none"),
    }
    if let Some(note) = &manifest.note {
        println!("  {}", Escaped(note));
    }
    println!(
        "settings: {} (from {})",
        Escaped(&plugin.settings.to_string()),
        Escaped(&settings_from)
    );
    println!(
        "limits:   {} fuel · {} MiB · {} ms per call (from {limits_from})",
        grouped(limits.fuel),
        grouped(limits.memory_mib),
        grouped(limits.timeout_ms)
    );
    print_active(&plugin, call.active.as_ref());
    for line in &log {
        println!("log: {}", Escaped(line));
    }
    // What the sandbox refused, as the host saw it.
    for what in &denied {
        println!("{}", Escaped(what));
    }
    println!(
        "used:     {} of {} fuel · {:.1} of {} MiB peak memory · {:.2} of {} ms",
        grouped(fuel_used),
        grouped(limits.fuel),
        peak as f64 / (1024.0 * 1024.0),
        grouped(limits.memory_mib),
        elapsed.as_secs_f64() * 1000.0,
        grouped(limits.timeout_ms)
    );
    println!("{}", result["summary"].as_str().unwrap_or_default());
    Ok(exit)
}

/// `--samples`: a gate's samples file (JSON), strictly read.
fn read_samples(path: &Path) -> Result<SamplesFile, Failure> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading samples {}", path.display()))
        .map_err(Failure::usage_error)?;
    serde_json::from_str(&text).map_err(|e| {
        Failure::usage(format!(
            "{}: not a samples file ({e}); expected {{\"wave\": [...], \"baseline\": [...], \"policy\": {{...}}}}",
            path.display()
        ))
    })
}

/// The policy of a samples file, or a stand-in when it has none.
fn samples_policy(file: &SamplesFile) -> Result<PolicyInput, Failure> {
    let document = file
        .policy
        .clone()
        .unwrap_or_else(|| serde_json::json!({"id": "test", "version": "0.0.0"}));
    let text = |k: &str| document.get(k).and_then(|v| v.as_str()).map(str::to_string);
    match (text("id"), text("version")) {
        (Some(id), Some(version)) => Ok(PolicyInput {
            id,
            version,
            document,
        }),
        _ => Err(Failure::usage(
            "the samples file's \"policy\" must be a policy object with \"id\" and \"version\"",
        )),
    }
}

/// Which active version the plugin was shown, if `--active` gave one.
fn print_active(plugin: &Plugin, active: Option<&ActivePolicy>) {
    let Some(active) = active else {
        return;
    };
    if plugin.sees_active_policy() {
        let digest = if active.digest.is_empty() {
            "a plain document, no bundle digest".to_string()
        } else {
            active.digest.clone()
        };
        println!("active: version {} ({digest})", Escaped(&active.version));
    } else {
        println!(
            "active: not shown to the plugin (built against pde:plugin@{}; 0.2.0 and later are told the active policy)",
            plugin.wit_version
        );
    }
}

/// Who signs when `--signer` is not given: the actor pde records in audit
/// records, never a bare "unknown" (containers and CI set no `$USER`).
fn default_signer(ctx: &Ctx) -> String {
    pde::audit::set_actor_repository(&ctx.dir);
    pde::audit::default_actor()
}

fn sign(
    ctx: &Ctx,
    path: &Path,
    key: &Path,
    signer: Option<String>,
    note: Option<String>,
) -> CmdResult {
    let key = pde::keys::load_signing_key(key)?;
    let signer = pde::plugin::signature::Signer {
        name: signer.unwrap_or_else(|| default_signer(ctx)),
        note,
    };
    // Admits the plugin as `validate` would, so nothing pde refuses to run
    // is signed, through the same cache and engine settings as `plugin
    // inspect` and `validate` (a build they compiled is not compiled
    // again). A pde.toml beside it must load: its [limits] are what the
    // manifest is held against, and guessing them would sign a loosening.
    let host = workspace(ctx, false)?.host()?;
    let (sig_path, sig) = host.sign_file(path, &key, &signer)?;
    if ctx.json {
        ctx.print_json(&serde_json::json!({
            "signature_file": sig_path,
            "keyid": sig.keyid,
            "signer": sig.signer,
            "signed_at": sig.signed_at,
            "note": sig.note,
            "manifest": sig.manifest,
        }));
    } else {
        println!(
            "signed {} and its manifest with key {} as {} -> {}",
            path.display(),
            sig.keyid,
            Escaped(&sig.signer),
            sig_path.display()
        );
    }
    Ok(ExitCode::Ok)
}

fn install(
    ctx: &Ctx,
    file: &Path,
    manifest: Option<&Path>,
    sign: Option<&Path>,
    signer: Option<String>,
    note: Option<String>,
) -> CmdResult {
    let ws = workspace(ctx, true)?;
    let config = ws.config().expect("required");
    let trusted = ws.trust()?;
    let host = ws.host()?;
    // Paths are read as if pde was started in -C DIR (an absolute one as is).
    let file = ctx.dir.join(file);
    let manifest = manifest.map(|m| ctx.dir.join(m));
    let key = match sign {
        Some(k) => Some(pde::keys::load_signing_key(&ctx.dir.join(k))?),
        None => None,
    };
    let plugins_dir = ctx.dir.join(&config.plugins);
    let request = pde::plugin_install::InstallRequest {
        wasm: &file,
        manifest: manifest.as_deref(),
        plugins_dir: &plugins_dir,
        sign: key.as_ref().map(|k| {
            (
                k,
                pde::plugin::signature::Signer {
                    name: signer.unwrap_or_else(|| default_signer(ctx)),
                    note,
                },
            )
        }),
        trusted: &trusted,
    };
    let installed = pde::plugin_install::install(&host, &request)?;
    // Paths as the engineer types them at the workspace root.
    let rel = |p: &Path| -> String { p.strip_prefix(&ctx.dir).unwrap_or(p).display().to_string() };
    let files: Vec<String> = installed.files().iter().map(|p| rel(p)).collect();
    let commit = format!(
        "git add {} && git commit -m \"Install plugin {} {}\"",
        files.join(" "),
        installed.name,
        installed.version
    );
    if ctx.json {
        ctx.print_json(&serde_json::json!({
            "installed": installed,
            "git_add": files,
            "commit": commit,
        }));
        return Ok(ExitCode::Ok);
    }
    println!(
        "installed {} {} ({}, pde:plugin@{}) as {}",
        installed.name,
        Escaped(&installed.version),
        super::print::label(&installed.kind),
        installed.wit_version,
        rel(&installed.wasm)
    );
    println!(
        "  pinned sha256 {} in {}",
        installed.sha256,
        rel(&installed.manifest)
    );
    if let Some(old) = &installed.replaced_sha256 {
        println!("  replaced the installed build {old}");
    }
    if let Some(sig) = &installed.removed_stale_signature {
        println!(
            "  removed {}: it signed the replaced build; sign this one with --sign KEY",
            rel(sig)
        );
    }
    match (&installed.signature_file, &installed.signature) {
        (Some(_), SignatureStatus::Valid { .. }) => {
            println!("  {}", signed_text(&installed.signature));
        }
        (Some(sig), status) => println!(
            "  signed -> {}, but this workspace does not trust the key yet ({}): add its .pub to \
             [trust] plugin_keys",
            rel(sig),
            signed_text(status)
        ),
        (None, _) => println!(
            "  unsigned: environments with require_signed_plugins refuse it until it is signed \
             (pde plugin sign {} --key KEY)",
            rel(&installed.wasm)
        ),
    }
    println!("next: commit it (a deploy refuses uncommitted plugins):");
    println!("  {commit}");
    Ok(ExitCode::Ok)
}

fn verify(ctx: &Ctx, path: &Path, keys: &[PathBuf]) -> CmdResult {
    // The workspace also sets the limits the manifest is held against.
    let ws = workspace(ctx, false)?;
    let trusted = if keys.is_empty() {
        ws.trust()?
    } else {
        TrustedKeys::from_files(keys)?
    };
    if trusted.is_empty() {
        return Err(Failure::usage(
            "no trusted keys: pass --key PUBFILE or list [trust] plugin_keys in pde.toml",
        ));
    }
    // Every check pde applies before it runs the plugin comes first: a
    // signature over something pde refuses is no reason to call it valid.
    let plugin = ws.host()?.admit(path, &trusted)?;
    let digest = plugin.sha256;
    let status = plugin.signature;
    match status {
        SignatureStatus::Valid { .. } => {
            // On failure the CLI prints the error document instead (one JSON document).
            if ctx.json {
                ctx.print_json(&serde_json::json!({
                    "path": path,
                    "sha256": digest,
                    "signature": status,
                }));
            } else {
                println!("{}: valid, {}", path.display(), signed_text(&status));
            }
            Ok(ExitCode::Ok)
        }
        SignatureStatus::Unsigned => Err(pde::plugin::PluginError::BadSignature {
            plugin: path.display().to_string(),
            reason: format!(
                "no signature file {}",
                pde::plugin::signature::sig_path(path).display()
            ),
        }
        .into()),
        SignatureStatus::Invalid { reason } => Err(pde::plugin::PluginError::BadSignature {
            plugin: path.display().to_string(),
            reason,
        }
        .into()),
    }
}
