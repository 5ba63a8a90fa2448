//! The HTML pages: askama templates compiled into the binary, with the
//! stylesheet inlined in each page (no asset is fetched, and pages need no
//! script).

use askama::Template;

use crate::docs::{AuditPage, Cell, Flag, Overview, PluginView, ServiceCell};
use crate::policy::{PolicyPage, Timeline};
use crate::report::Report;

/// pde's version, shown in every footer.
pub(crate) const VERSION: &str = env!("CARGO_PKG_VERSION");

#[derive(Template)]
#[template(path = "overview.html")]
pub(crate) struct OverviewHtml<'a> {
    pub o: &'a Overview,
    pub in_report: bool,
    pub version: &'static str,
}

#[derive(Template)]
#[template(path = "audit.html")]
pub(crate) struct AuditHtml<'a> {
    pub a: &'a AuditPage,
    pub version: &'static str,
}

#[derive(Template)]
#[template(path = "policy.html")]
pub(crate) struct PolicyHtml<'a> {
    pub p: &'a PolicyPage,
    pub version: &'static str,
}

#[derive(Template)]
#[template(path = "plugins.html")]
pub(crate) struct PluginsHtml<'a> {
    pub plugins: &'a [PluginView],
    pub error: Option<String>,
    pub version: &'static str,
}

#[derive(Template)]
#[template(path = "timeline.html")]
pub(crate) struct TimelineHtml<'a> {
    pub t: &'a Timeline,
    pub svg: String,
    pub version: &'static str,
}

#[derive(Template)]
#[template(path = "report.html")]
pub(crate) struct ReportHtml<'a> {
    pub r: &'a Report,
    pub o: &'a Overview,
    pub a: &'a AuditPage,
    pub in_report: bool,
}

#[derive(Template)]
#[template(path = "error.html")]
pub(crate) struct ErrorHtml {
    pub status: u16,
    pub message: String,
    pub version: &'static str,
}

impl Cell {
    /// The cell's background: red for drift, amber for anything else flagged.
    pub fn css(&self) -> &'static str {
        if self
            .flags
            .iter()
            .any(|f| matches!(f.kind, "drift" | "missing" | "interrupted"))
        {
            "cell-bad"
        } else if self.flags.is_empty() {
            ""
        } else {
            "cell-warn"
        }
    }
}

impl Flag {
    /// The flag's text colour; the text itself always says what it is.
    pub fn css(&self) -> &'static str {
        match self.kind {
            "drift" | "missing" | "interrupted" | "no-answer" => "bad",
            _ => "warn",
        }
    }
}

impl ServiceCell {
    /// `1.2.0 (in sync); live: in-sync`, in words.
    pub fn text(&self) -> String {
        let recorded = match (self.state, &self.version) {
            ("not-routed", _) => "not routed here".to_string(),
            ("unknown", _) => "UNKNOWN (a rollback failed there)".to_string(),
            ("differs", Some(v)) => format!("{v} (DIFFERS from the release)"),
            (_, Some(v)) => format!("{v} (in sync)"),
            (_, None) => "?".to_string(),
        };
        match self.live {
            None => recorded,
            Some(s) => {
                let word = serde_json::to_value(s)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default();
                let upper = if s.is_drift() {
                    format!("{} DRIFT", word.to_uppercase())
                } else {
                    word
                };
                match &self.live_version {
                    Some(v) => format!("{recorded}; live: {v} {upper}"),
                    None => format!("{recorded}; live: {upper}"),
                }
            }
        }
    }
}

impl AuditPage {
    /// The head's hash, if the log has records.
    pub fn head_hash(&self) -> Option<&str> {
        self.head.as_ref().map(|h| h.1.as_str())
    }

    /// The head's seq (0 for an empty log).
    pub fn head_seq(&self) -> u64 {
        self.head.as_ref().map_or(0, |h| h.0)
    }

    /// Whether `r` is the first record the verification found bad.
    pub fn is_first_bad(&self, r: &pde::audit::AuditRecord) -> bool {
        match &self.verification.first_bad {
            Some(b) => b.seq == Some(r.seq) || (b.seq.is_none() && b.line == r.seq),
            None => false,
        }
    }
}

impl PluginView {
    /// The plugin's name.
    pub fn name(&self) -> String {
        self.field("name")
    }

    /// A text field of its listing.
    pub fn field(&self, name: &str) -> String {
        match &self.listed[name] {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Null => String::new(),
            other => other.to_string(),
        }
    }
}

/// A serde unit enum (a wave's status, a gate's verdict) as its
/// kebab-case name.
pub(crate) fn label<T: serde::Serialize>(v: T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// A wave status's colour; the word is always shown beside it.
pub(crate) fn wave_css(s: &pde::steps::waves::WaveStatus) -> &'static str {
    use pde::steps::waves::WaveStatus;
    match s {
        WaveStatus::Passed => "ok",
        WaveStatus::Pending | WaveStatus::Baking | WaveStatus::Paused => "warn",
        WaveStatus::Failed | WaveStatus::RolledBack => "bad",
    }
}

/// The overview page's HTML (what `GET /` answers), for callers that
/// render without the server (the rendering benchmark).
pub fn overview_html(o: &Overview) -> Result<String, askama::Error> {
    OverviewHtml {
        o,
        in_report: false,
        version: VERSION,
    }
    .render()
}
