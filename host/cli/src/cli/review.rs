//! `pde plugin review FILE.wasm [--policy P …] [--against OLD.wasm] [--env ENV]`:
//! prints the engine's [`pde::review::Review`] and ends with its exit code.

use std::path::PathBuf;

use pde::config::Config;
use pde::keys::TrustedKeys;
use pde::plugin::{PluginHost, ServiceInfo, SignatureStatus};
use pde::review::{Review, ReviewRequest, SignatureReport};
use pde::term::Escaped;

use super::{CmdResult, Ctx, Failure};

/// `pde plugin review`.
#[derive(Debug, clap::Args)]
pub struct ReviewArgs {
    /// The `.wasm` under review (its manifest beside it).
    pub wasm: PathBuf,
    /// A policy file (JSON or YAML) to run it over; repeatable.
    #[arg(long = "policy", value_name = "FILE")]
    pub policies: Vec<PathBuf>,
    /// The approved version to compare with (its manifest beside it).
    #[arg(long, value_name = "OLD.wasm")]
    pub against: Option<PathBuf>,
    /// The environment named in the call context; a router is offered its
    /// services from pde.toml.
    #[arg(long, value_name = "ENV")]
    pub env: Option<String>,
}

/// Runs `pde plugin review`.
pub fn run(ctx: &Ctx, args: ReviewArgs) -> CmdResult {
    let config = if ctx.dir.join(pde::config::FILE_NAME).is_file() {
        Some(Config::load(&ctx.dir)?)
    } else {
        None
    };
    let floor = pde::floor::Floor::load_for(&ctx.dir)?;
    let trusted = trusted_keys(ctx, config.as_ref(), floor.as_ref())?;
    let limits = config.as_ref().map(|c| c.limits).unwrap_or_default();
    let mut cache_dirs = Vec::new();
    if let Some(c) = &config
        && ctx.dir.join(&c.state).is_dir()
    {
        cache_dirs.push(ctx.dir.join(&c.state).join("cache").join("plugins"));
    }
    cache_dirs.extend(pde::plugin::cache::user_cache_dir());
    let mut host = PluginHost::with_cache_dirs(limits, cache_dirs)?;
    host.trace_call_logs(false);
    let env = match (&args.env, &config) {
        (Some(name), Some(c)) => Some((
            name.clone(),
            c.environments
                .get(name)
                .map(|e| e.services.iter().map(service_info).collect())
                .unwrap_or_default(),
        )),
        (Some(name), None) => Some((name.clone(), Vec::new())),
        (None, _) => None,
    };
    let resolve = |p: &PathBuf| ctx.dir.join(p);
    let (wasm, against) = (resolve(&args.wasm), args.against.as_ref().map(resolve));
    let policies: Vec<PathBuf> = args.policies.iter().map(resolve).collect();
    let review = pde::review::review(
        &host,
        &ReviewRequest {
            wasm: &wasm,
            against: against.as_deref(),
            policies: &policies,
            trusted: &trusted,
            floor: floor.as_ref(),
            workspace_limits: config.is_some(),
            env,
        },
    )?;
    let code = review.exit_code();
    if ctx.json {
        ctx.print_json(&review);
    } else {
        print(&review);
    }
    Ok(code)
}

fn service_info(s: &pde::config::Service) -> ServiceInfo {
    ServiceInfo {
        name: s.name.clone(),
        tags: s.tags.clone(),
        labels: s.labels.clone(),
    }
}

/// The floor's unexpired plugin keys where there is a floor, else the
/// workspace's `[trust] plugin_keys`; minus `[trust] revoked`.
fn trusted_keys(
    ctx: &Ctx,
    config: Option<&Config>,
    floor: Option<&pde::floor::Floor>,
) -> Result<TrustedKeys, Failure> {
    let mut trusted = match (floor, config) {
        (Some(f), _) => f.plugin_trust(pde::floor::today())?,
        (None, Some(c)) => {
            let paths: Vec<PathBuf> = c
                .trust
                .plugin_keys
                .iter()
                .map(|p| ctx.dir.join(p))
                .collect();
            TrustedKeys::from_files(&paths)?
        }
        (None, None) => TrustedKeys::new(),
    };
    if let Some(c) = config {
        trusted.revoke(&c.trust.revoked);
    }
    Ok(trusted)
}

fn signature_line(s: &SignatureReport) -> String {
    let key = match (&s.key_name, &s.key_expires) {
        (Some(n), Some(e)) => format!("; key of {} until {e}", Escaped(n)),
        (Some(n), None) => format!("; key of {}, no expiry", Escaped(n)),
        _ => String::new(),
    };
    match &s.status {
        None => "none".into(),
        Some(SignatureStatus::Unsigned) => "unsigned".into(),
        Some(
            status @ SignatureStatus::Valid {
                signer, signed_at, ..
            },
        ) => format!(
            "valid: signed by {} with {} at {signed_at}{key}",
            Escaped(signer),
            status.key_text().unwrap_or_default()
        ),
        Some(SignatureStatus::Invalid { reason }) => format!("INVALID: {}", Escaped(reason)),
    }
}

fn print(r: &Review) {
    let id = &r.identity;
    println!("plugin review: {}", id.path.display());
    println!("identity");
    println!("  sha256:   {}", id.sha256);
    println!("  size:     {} bytes", id.size);
    println!(
        "  name:     {}  kind: {}  world: {}  wit: {}",
        Escaped(id.name.as_deref().unwrap_or("(no manifest)")),
        Escaped(id.kind.as_deref().unwrap_or("-")),
        id.world.map_or("none".to_string(), |k| k.to_string()),
        id.wit_versions.join(", ")
    );
    println!("capabilities");
    for c in &r.capabilities {
        println!(
            "  {} {:<40} {}",
            if c.granted { "granted" } else { "DENIED " },
            c.import,
            c.note
        );
    }
    println!("host functions");
    for h in &r.host_functions {
        println!("  {}: {}", h.name, h.limit);
    }
    println!("limits in force");
    for l in &r.limits {
        println!(
            "  {:<11} {:>12}  from {}{}",
            l.field,
            l.value,
            l.source,
            if l.loosening {
                "  LOOSENING the workspace [limits]"
            } else {
                ""
            }
        );
    }
    for run in &r.runs {
        println!("policy {}", run.policy.display());
        println!(
            "  verdict: {}  fuel: {}  memory: {:.1} MiB  time: {:.2} ms",
            run.verdict,
            run.fuel_used,
            run.peak_memory_bytes as f64 / (1024.0 * 1024.0),
            run.elapsed_ms
        );
        if let Some(f) = &run.fault {
            println!("  fault: {}", Escaped(f));
        }
        for d in &run.findings {
            println!(
                "  {} {} at \"{}\": {}",
                serde_json::to_value(d.severity)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default(),
                Escaped(&d.code),
                Escaped(&d.path),
                Escaped(&d.message)
            );
        }
        for route in &run.routes {
            println!("  route {}", Escaped(route));
        }
        for d in &run.denied {
            println!("  {}", Escaped(d));
        }
    }
    if let Some(a) = &r.against {
        println!("against {} (sha256 {})", a.path.display(), a.sha256);
        println!("  old signature: {}", signature_line(&a.signature));
        for c in &a.changes {
            println!("  ~ {}: {} -> {}", c.what, Escaped(&c.old), Escaped(&c.new));
        }
        for c in &a.imports_added {
            println!(
                "  + import {} ({})",
                c.import,
                if c.granted { "granted" } else { "DENIED" }
            );
        }
        for run in &a.runs {
            println!(
                "  policy {}: {} -> {} ({} -> {} findings)",
                run.policy.display(),
                run.verdict.0,
                run.verdict.1,
                run.count.0,
                run.count.1
            );
            for x in &run.removed {
                println!("    - {}", Escaped(x));
            }
            for x in &run.added {
                println!("    + {}", Escaped(x));
            }
        }
    }
    println!("signature: {}", signature_line(&r.signature));
    println!(
        "versions: pde {}, wasmtime {}",
        r.versions.pde, r.versions.wasmtime
    );
    if let Some(refused) = &r.refused {
        println!(
            "verdict: REFUSED (exit {}): {}",
            refused.exit_code,
            Escaped(&refused.reason)
        );
    } else if r.risks.is_empty() {
        println!("verdict: no risky change");
    } else {
        println!("verdict: RISKY");
        for risk in &r.risks {
            println!("  ! {}", Escaped(risk));
        }
    }
}
