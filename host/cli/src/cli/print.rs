//! Human-readable rendering of the engine's reports. JSON output is the
//! reports themselves, serialised; this file is only for people.

use pde::diagnostic::{Diagnostic, Severity};
use pde::envcheck::HealthReport;
use pde::pipeline::DeployReport;
use pde::push::PushReport;
use pde::validate::ValidationReport;

use super::Ctx;

/// Prints the report a failed engine call carries (for people), and returns
/// it as JSON (for `--output json`).
pub fn error_report(ctx: &Ctx, e: &pde::Error) -> Option<serde_json::Value> {
    match e {
        pde::Error::ValidationFailed { report, .. } => {
            if !ctx.json {
                validation(report);
            }
            Some(json(report.as_ref()))
        }
        pde::Error::Unhealthy { report, .. } => {
            if !ctx.json {
                health(report);
            }
            Some(json(report))
        }
        pde::Error::DeployFailed { report, .. } => {
            if !ctx.json {
                deploy(report);
            }
            Some(json(report.as_ref()))
        }
        pde::Error::Rollback(pde::rollback::RollbackError::Failed { report, .. }) => {
            Some(json(report.as_ref()))
        }
        _ => None,
    }
}

fn json<T: serde::Serialize + ?Sized>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).unwrap_or_default()
}

fn diagnostic(d: &Diagnostic) {
    let mark = match d.severity {
        Severity::Error => "✗",
        Severity::Warning => "!",
        Severity::Info => "·",
    };
    println!("  {mark} {d}");
}

/// Validation findings and plugin runs.
pub fn validation(r: &ValidationReport) {
    let env = r
        .environment
        .as_deref()
        .map(|e| format!(" for {e}"))
        .unwrap_or_default();
    println!("validate  policy {} v{}{env}", r.policy_id, r.version);
    if let Some(a) = &r.active {
        println!(
            "  against the active version {} ({}, since {})",
            pde::term::Escaped(&a.version),
            a.digest,
            a.deployed_at
        );
    }
    for p in &r.plugins {
        println!(
            "  plugin {:<22} {} error(s), {} warning(s), {} fuel, {} µs",
            p.name, p.errors, p.warnings, p.fuel_used, p.elapsed_us
        );
        if let Some(problem) = p.signature.problem() {
            println!("    ! {}: {}", p.name, pde::term::Escaped(&problem));
        }
    }
    for d in &r.diagnostics {
        diagnostic(d);
    }
    let verdict = if r.passed() { "passed" } else { "FAILED" };
    println!(
        "  {verdict}: {} error(s), {} finding(s) in all",
        r.errors(),
        r.diagnostics.len()
    );
}

/// Health of each service.
pub fn health(r: &HealthReport) {
    println!("envcheck");
    for s in &r.services {
        let state = if s.healthy { "healthy" } else { "UNHEALTHY" };
        let why = s
            .error
            .clone()
            .or_else(|| s.status.map(|c| format!("HTTP {c}")))
            .unwrap_or_default();
        // `why` may quote a target's own response: hostile text too.
        let why = pde::term::escape(&why);
        println!(
            "  {:<20} {state:<10} {why} ({} ms) {}",
            s.service, s.elapsed_ms, s.url
        );
    }
    for c in &r.checks {
        let state = match (c.passed, &c.overridden) {
            (true, Some(_)) => "OVERRIDDEN",
            (true, None) => "passed",
            (false, _) => "FAILED",
        };
        // A check's detail quotes what an endpoint or Prometheus said.
        let detail = pde::term::escape(&c.detail);
        println!(
            "  check {:<14} {state:<10} {:<10} {detail} ({} ms)",
            c.name, c.kind, c.elapsed_ms
        );
    }
}

/// Per-target push results.
pub fn push(r: &PushReport) {
    println!("push      outcome {}", label(&r.outcome));
    for t in &r.targets {
        println!(
            "  {:<20} {:<16} attempts {}  {}",
            t.service,
            label(&t.state),
            t.attempts,
            pde::term::Escaped(&t.detail)
        );
    }
}

/// A whole deploy, step by step.
/// Which build ships: this run's, or the bundle an environment already runs.
pub fn artifact(a: &pde::package::Artifact, digest: &str) {
    let commit = a.source_commit.get(..12).unwrap_or(&a.source_commit);
    match &a.reused_from {
        Some(env) => println!(
            "artifact  shipping the bundle {env} runs, {digest} (built from commit {commit}; \
             same content, plugins and findings as this checkout)"
        ),
        None => println!("artifact  built from commit {commit}"),
    }
}

pub fn deploy(r: &DeployReport) {
    validation(&r.validation);
    match &r.bundle_path {
        Some(p) => println!("package   {} -> {}", r.digest, p.display()),
        None => println!("package   {} (dry run: not written)", r.digest),
    }
    artifact(&r.artifact, &r.digest);
    health(&r.health);
    println!("route");
    for route in &r.routes {
        // Reasons are a router plugin's own text.
        let reasons = route.reasons.join("; ");
        println!("  {:<20} {}", route.service, pde::term::Escaped(&reasons));
    }
    if let Some(p) = &r.push {
        push(p);
    }
    if let Some(t) = &r.tag {
        let how = if t.created {
            "created"
        } else {
            "already present"
        };
        println!("tag       {} ({how})", t.name);
    }
    let note = if r.already_active {
        " (this bundle was already active)"
    } else {
        ""
    };
    println!(
        "{} policy {} v{} to {}: {}{note}",
        if r.outcome == pde::pipeline::DeployOutcome::Deployed {
            "✓"
        } else {
            "✗"
        },
        r.policy_id,
        r.version,
        r.env,
        label(&r.outcome)
    );
}

/// A serde unit enum as its label-case name.
pub fn label<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}
