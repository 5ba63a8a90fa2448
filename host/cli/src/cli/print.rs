//! Human-readable rendering of the engine's reports. JSON output is the
//! reports themselves, serialised; this file is only for people.

use pde::diagnostic::{Diagnostic, Severity};
use pde::envcheck::HealthReport;
use pde::pipeline::DeployReport;
use pde::push::PushReport;
use pde::validate::ValidationReport;

use super::Ctx;

/// Prints the report a failed engine call carries (for people), and returns
/// it as JSON (for `--output json`) with the part of the deploy report it
/// is (`validation`, `health`, or `None` for a whole report).
pub fn error_report(
    ctx: &Ctx,
    e: &pde::Error,
) -> Option<(Option<&'static str>, serde_json::Value)> {
    match e {
        pde::Error::ValidationFailed { report, .. } => {
            if !ctx.json {
                validation(report);
            }
            Some((Some("validation"), json(report.as_ref())))
        }
        pde::Error::Unhealthy { report, .. } => {
            if !ctx.json {
                health(report);
            }
            Some((Some("health"), json(report)))
        }
        pde::Error::DeployFailed { report, .. } => {
            if !ctx.json {
                deploy(report, None);
            }
            Some((None, json(report.as_ref())))
        }
        pde::Error::Rollback(pde::rollback::RollbackError::Failed { report, .. }) => {
            Some((None, json(report.as_ref())))
        }
        pde::Error::RolloutHalted { report, .. } => {
            if !ctx.json
                && let Some(r) = report
                    .get("rollout")
                    .and_then(|r| serde_json::from_value(r.clone()).ok())
            {
                waves(&r);
            }
            Some((None, report.as_ref().clone()))
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
        for n in &p.log {
            plugin_notice(n);
        }
    }
    approvals(r);
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

/// A plugin's warning or error line, under the step that ran it:
/// `  category-router warning: no service … is tagged `scheduler``.
pub fn plugin_notice(n: &pde::plugin::PluginNotice) {
    println!(
        "  {} {}: {}",
        n.plugin,
        n.level,
        pde::term::Escaped(&n.message)
    );
}

/// The approvals pde counted: who, as which role, with which key. Shown
/// whenever there are any, and for an environment even when there are none
/// (a person should see the gate, not only the JSON).
fn approvals(r: &ValidationReport) {
    let v = &r.approvals;
    if v.approvers == 0 && r.environment.is_none() {
        return;
    }
    let signed = v.counted.len();
    let unsigned = v.approvers.saturating_sub(signed);
    let for_env = r
        .environment
        .as_deref()
        .map(|e| format!(" for {e}"))
        .unwrap_or_default();
    let mut line = format!("  approvals counted{for_env}: {}", v.approvers);
    if unsigned > 0 {
        line.push_str(&format!(
            " ({signed} signed, {unsigned} unsigned entr(ies) of the document)"
        ));
    }
    println!("{line}");
    for c in &v.counted {
        let role = c
            .role
            .as_deref()
            .map(|r| format!("as {}", pde::term::Escaped(r)))
            .unwrap_or_else(|| "with no role credited".to_string());
        println!(
            "    {} {role}, key {}, signed {}",
            pde::term::Escaped(&c.by),
            c.keyid,
            pde::term::Escaped(&seconds(&c.at))
        );
    }
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

/// Which build ships: this run's, or the bundle an environment already
/// runs; and, when another environment's bundle is promoted to `env`, that
/// the promotion gate passed.
pub fn artifact(a: &pde::package::Artifact, digest: &str, promote_from: Option<&str>) {
    let commit = a.source_commit.get(..12).unwrap_or(&a.source_commit);
    match &a.reused_from {
        Some(from) => println!(
            "artifact  shipping the bundle {from} runs, {digest} (built from commit {commit}; \
             same content, plugins and findings as this checkout)"
        ),
        None => println!("artifact  built from commit {commit}"),
    }
    // Packaging refuses a version the source environment never ran, so a
    // report that got here passed the gate; say so, not only in JSON.
    if let Some(from) = promote_from {
        println!("  ✓ promotion gate passed: {from} already runs this bundle ({digest})");
    }
}

pub use pde_core::clock::whole_seconds as seconds;

/// What a deploy that did not end `deployed` left behind, and what to do.
fn next_step(r: &DeployReport) {
    use pde::pipeline::DeployOutcome;
    if !matches!(
        r.outcome,
        DeployOutcome::RolledBack | DeployOutcome::NeedsAttention
    ) {
        return;
    }
    let Some(p) = &r.push else { return };
    let names = |state: pde::push::TargetState| -> Vec<&str> {
        p.targets
            .iter()
            .filter(|t| t.state == state)
            .map(|t| t.service.as_str())
            .collect()
    };
    let failed = names(pde::push::TargetState::Failed);
    let sent_back = names(pde::push::TargetState::RolledBack);
    let stuck = names(pde::push::TargetState::RollbackFailed);
    let failed_text = if failed.is_empty() {
        "a target".to_string()
    } else {
        failed.join(", ")
    };
    println!();
    if r.outcome == pde::pipeline::DeployOutcome::RolledBack {
        if sent_back.is_empty() {
            println!(
                "  {failed_text} refused or failed v{}; no service had taken it, so nothing \
                 needed rolling back: {} runs what it ran before for policy {}.",
                r.version, r.env, r.policy_id
            );
        } else {
            println!(
                "  {failed_text} failed, so {} {} sent back to the bundle {} ran before for \
                 policy {} (verified); {} runs what it ran before.",
                sent_back.join(", "),
                if sent_back.len() == 1 { "was" } else { "were" },
                if sent_back.len() == 1 { "it" } else { "each" },
                r.policy_id,
                r.env
            );
        }
    } else {
        println!(
            "  {failed_text} failed, and {} could not be sent back: see what each runs above.",
            stuck.join(", ")
        );
    }
    println!(
        "  next: check {failed_text} (the detail above; `pde env check {}`), fix it, then \
         deploy again: pde deploy {} --env {}",
        r.env, r.policy_id, r.env
    );
}

/// A whole deploy, step by step.
pub fn deploy(r: &DeployReport, promote_from: Option<&str>) {
    validation(&r.validation);
    match &r.bundle_path {
        Some(p) => println!("package   {} -> {}", r.digest, p.display()),
        None => println!("package   {} (dry run: not written)", r.digest),
    }
    artifact(&r.artifact, &r.digest, promote_from);
    health(&r.health);
    println!("route");
    for route in &r.routes {
        // Reasons are a router plugin's own text.
        let reasons = route.reasons.join("; ");
        println!("  {:<20} {}", route.service, pde::term::Escaped(&reasons));
    }
    for n in &r.route_log {
        plugin_notice(n);
    }
    if let Some(w) = &r.rollout {
        waves(w);
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
    next_step(r);
    let note = if r.already_active {
        " (this bundle was already active)"
    } else {
        ""
    };
    use pde::pipeline::DeployOutcome;
    let (mark, outcome) = match r.outcome {
        DeployOutcome::Deployed => ("✓", label(&r.outcome)),
        // A dry run that got here passed every step it runs.
        DeployOutcome::DryRun => (
            "✓",
            "dry run passed (validate, package, check, route); nothing pushed".to_string(),
        ),
        _ => ("✗", label(&r.outcome)),
    };
    println!(
        "{mark} policy {} v{} to {}: {outcome}{note}",
        r.policy_id, r.version, r.env
    );
}

/// A serde unit enum as its label-case name.
pub fn label<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// A rollout's waves: services, bake, pause, gates and what each gate saw.
pub fn waves(r: &pde::report::RolloutReport) {
    let id = r.id.map(|i| format!(" {i}")).unwrap_or_default();
    println!("rollout{id}   {}", r.status);
    for w in &r.waves {
        let pause = if w.pause { ", then pause" } else { "" };
        println!(
            "  wave {} {:<12} {:<11} bake {} ms{pause}: {}",
            w.number,
            w.name,
            label(&w.status),
            w.bake_ms,
            w.services.join(", ")
        );
        if w.results.is_empty() && !w.gates.is_empty() {
            println!("    gates: {}", w.gates.join(", "));
        }
        for g in &w.results {
            let on = g
                .service
                .as_deref()
                .map(|s| format!(" [{s}]"))
                .unwrap_or_default();
            println!(
                "    gate {}{on}: {} {}  {}",
                g.gate,
                label(&g.verdict),
                match (g.passed, r.status == "dry-run") {
                    (true, _) => "(ok)",
                    // Evaluated before anything was pushed: a gate on what
                    // the wave will serve cannot pass yet.
                    (false, true) => "(would fail if judged now)",
                    (false, false) => "(FAILS THE WAVE)",
                },
                pde::term::Escaped(&g.detail)
            );
            println!("      query {}", pde::term::Escaped(&g.query));
            if !g.statistics.is_empty() {
                let stats: Vec<String> = g
                    .statistics
                    .iter()
                    .map(|s| format!("{} = {}", pde::term::Escaped(&s.name), s.value))
                    .collect();
                println!("      statistics {}", stats.join(", "));
            }
        }
    }
    if let Some(h) = &r.halted {
        println!("  halted: {h}");
    }
}

/// Wave and gate progress on stderr, for a person at a terminal.
pub struct RolloutProgress {
    /// `--output json`: nothing is printed.
    pub json: bool,
}

impl pde::steps::waves::RolloutObserver for RolloutProgress {
    fn on_rollout(&self, event: &str, detail: &serde_json::Value) {
        if self.json {
            return;
        }
        let wave = detail["wave"].as_str().unwrap_or("");
        let line = match event {
            "wave-started" => format!("wave {wave}: pushing to {}", detail["services"]),
            "baking" => format!(
                "wave {wave}: baking until {}",
                detail["until"].as_str().unwrap_or("now")
            ),
            "gate" => format!(
                "wave gate {}: {} ({})",
                detail["gate"].as_str().unwrap_or(""),
                detail["verdict"].as_str().unwrap_or(""),
                detail["detail"].as_str().unwrap_or("")
            ),
            "paused" => format!(
                "wave {wave}: paused; continue with `pde rollout promote`, stop with `pde rollout abort`"
            ),
            "wave-passed" => format!("wave {wave}: passed"),
            "wave-pushed" => format!(
                "wave {wave}: pushed and verified; baking {} ms",
                detail["bake_ms"]
            ),
            "promoted" => format!("wave {wave}: promoted"),
            "rolled-back" => format!(
                "rollout: every wave pushed was sent back ({})",
                detail["outcome"].as_str().unwrap_or("")
            ),
            "halted" => format!("rollout halted: {}", detail["why"].as_str().unwrap_or("")),
            other => format!("{other} {detail}"),
        };
        eprintln!("{}", pde::term::Escaped(&line));
    }
}
