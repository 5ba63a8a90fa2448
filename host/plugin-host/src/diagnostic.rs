//! Findings about a policy, from the built-in checks and from validator plugins alike.

use serde::{Deserialize, Serialize};

/// How serious a finding is. Errors block a deploy; warnings are recorded in
/// the bundle manifest; info is shown only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Shown, nothing more.
    Info,
    /// Recorded in the bundle manifest; does not block.
    Warning,
    /// Blocks the deploy.
    Error,
}

/// One finding about a policy document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Diagnostic {
    /// How serious it is.
    pub severity: Severity,
    /// JSON pointer (RFC 6901) into the policy document, `""` for the whole document.
    pub path: String,
    /// A stable, machine-readable code such as `schema.required` or `eligibility.age-range`.
    pub code: String,
    /// What is wrong, for a person.
    pub message: String,
    /// Who found it: `schema`, `version`, `conflict`, `approvals`, or a plugin name.
    pub source: String,
}

impl Diagnostic {
    /// An error finding.
    pub fn error(source: &str, code: &str, path: &str, message: impl Into<String>) -> Self {
        Self::new(Severity::Error, source, code, path, message)
    }

    /// A warning finding.
    pub fn warning(source: &str, code: &str, path: &str, message: impl Into<String>) -> Self {
        Self::new(Severity::Warning, source, code, path, message)
    }

    /// A finding of any severity.
    pub fn new(
        severity: Severity,
        source: &str,
        code: &str,
        path: &str,
        message: impl Into<String>,
    ) -> Self {
        Diagnostic {
            severity,
            path: path.to_string(),
            code: code.to_string(),
            message: message.into(),
            source: source.to_string(),
        }
    }

    /// True for [`Severity::Error`].
    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

impl std::fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sev = match self.severity {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Error => "error",
        };
        let path = if self.path.is_empty() {
            "/"
        } else {
            &self.path
        };
        // Every field may come from a plugin or a policy file: hostile text
        // that must not reach a terminal raw (see `pde_core::term`).
        use pde_core::term::Escaped;
        write!(
            f,
            "{sev}[{}] {}: {} ({})",
            Escaped(&self.code),
            Escaped(path),
            Escaped(&self.message),
            Escaped(&self.source)
        )
    }
}
