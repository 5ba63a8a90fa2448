//! `pde report --html FILE`: the overview, every policy's history and the
//! audit verification as one self-contained HTML file (styles inline, no
//! script, no external URL), for an auditor to archive and open offline.

use askama::Template;
use pde::Engine;
use pde::error::HasExitCode;
use serde::Serialize;

use crate::docs::{self, AuditFilter};
use crate::policy::{self, PolicyPage};
use crate::views::ReportHtml;

/// What the report is about and who made it.
#[derive(Debug, Clone, Default)]
pub struct ReportOptions {
    /// Only this environment.
    pub env: Option<String>,
    /// Only what happened on or after this date (`YYYY-MM-DD` or RFC 3339).
    pub since: Option<String>,
    /// The pde version that writes the report.
    pub pde_version: String,
    /// The commit pde was built from.
    pub pde_commit: String,
}

/// The facts of a report, also its `--output json` summary.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// When it was written (RFC 3339 UTC).
    pub generated_at: String,
    /// The pde version that wrote it.
    pub pde_version: String,
    /// The commit pde was built from.
    pub pde_commit: String,
    /// The workspace's Git `HEAD` when it was written.
    pub workspace_commit: Option<String>,
    /// The environment it covers (`None`: all).
    pub env: Option<String>,
    /// The first day it covers (`None`: from the beginning).
    pub since: Option<String>,
    /// `intact` or `broken`.
    pub audit_status: &'static str,
    /// The chain's head `(seq, hash)`.
    pub audit_head: Option<(u64, String)>,
    /// Each policy's history.
    #[serde(skip)]
    pub policies: Vec<PolicyPage>,
}

/// Why a report could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// `--since` is not a date.
    #[error("--since {0:?} is not a date (YYYY-MM-DD) or an RFC 3339 time")]
    BadSince(String),
    /// The engine failed to read the state.
    #[error(transparent)]
    Engine(#[from] pde::Error),
    /// A template failed to render.
    #[error("cannot render the report: {0}")]
    Render(String),
}

impl HasExitCode for ReportError {
    fn exit_code(&self) -> pde::ExitCode {
        match self {
            ReportError::BadSince(_) | ReportError::Render(_) => pde::ExitCode::Usage,
            ReportError::Engine(e) => e.exit_code(),
        }
    }
}

/// Checks `--since`: a date or an RFC 3339 time; returns it as given.
pub fn parse_since(s: &str) -> Result<String, ReportError> {
    let date = time::macros::format_description!("[year]-[month]-[day]");
    let ok = time::Date::parse(s, &date).is_ok()
        || time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).is_ok();
    if ok {
        Ok(s.to_string())
    } else {
        Err(ReportError::BadSince(s.to_string()))
    }
}

/// Builds the report and its HTML.
pub fn render(engine: &Engine, opts: &ReportOptions) -> Result<(Report, String), ReportError> {
    if let Some(env) = &opts.env {
        engine.environment(env)?;
    }
    let since = opts.since.as_deref().map(parse_since).transpose()?;
    let overview = docs::overview(engine, opts.env.as_deref(), None)?;
    let filter = AuditFilter {
        env: opts.env.clone(),
        since: since.clone(),
        ..AuditFilter::default()
    };
    // The log is read and parsed once, by the verification: the histories
    // need every record, the audit section those the filter keeps.
    let (verified, records) = engine.verify_audit_reading();
    let all_records = records.as_deref().unwrap_or_default();
    let mut policies = Vec::new();
    for row in &overview.policies {
        let mut page = policy::page(engine, &row.policy_id, all_records, None, None)?;
        page.envs
            .retain(|env, _| opts.env.as_ref().is_none_or(|e| e == env));
        page.rollouts
            .retain(|r| opts.env.as_ref().is_none_or(|e| *e == r.env));
        if let Some(s) = &since {
            for rows in page.envs.values_mut() {
                rows.retain(|h| h.finished_at.as_str() >= s.as_str());
            }
            page.envs.retain(|_, rows| !rows.is_empty());
            page.rollouts
                .retain(|r| docs::seconds(&r.updated_at).as_str() >= s.as_str());
        }
        policies.push(page);
    }
    let audit = docs::audit_of(engine, filter, verified, records);
    let workspace_commit = pde::vcs::Repo::discover(engine.root())
        .ok()
        .and_then(|r| r.head_commit().ok());
    let report = Report {
        generated_at: pde_core::clock::now_rfc3339(),
        pde_version: opts.pde_version.clone(),
        pde_commit: opts.pde_commit.clone(),
        workspace_commit,
        env: opts.env.clone(),
        since,
        audit_status: audit.verification.status,
        audit_head: audit.head.clone(),
        policies,
    };
    let html = ReportHtml {
        r: &report,
        o: &overview,
        a: &audit,
        in_report: true,
    }
    .render()
    .map_err(|e| ReportError::Render(e.to_string()))?;
    Ok((report, html))
}
