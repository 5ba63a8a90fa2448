//! Findings and the JSON pointers that locate them.
//!
//! Every diagnostic points into the policy document with an RFC 6901 JSON
//! pointer so the CLI can show the exact rule at fault. Rule keys are free
//! text, so pointer segments must be escaped (`~` → `~0`, `/` → `~1`);
//! [`json_pointer`] does that, so plugins never build pointers by hand.

use std::fmt::Display;

/// How serious a finding is.
///
/// It reads from settings as `"error"`, `"warning"` or `"info"`, so a plugin
/// can let the workspace choose how loud a check is:
///
/// ```
/// use pde_plugin::Severity;
///
/// #[derive(serde::Deserialize)]
/// struct Settings {
///     #[serde(default = "loud")]
///     severity: Severity,
/// }
/// fn loud() -> Severity {
///     Severity::Error
/// }
///
/// let s: Settings = serde_json::from_str(r#"{"severity": "warning"}"#).unwrap();
/// assert_eq!(s.severity, Severity::Warning);
/// assert!(serde_json::from_str::<Settings>(r#"{"severity": "fatal"}"#).is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Blocks the deploy.
    Error,
    /// Recorded in the bundle manifest; does not block.
    Warning,
    /// Shown to the release engineer only.
    Info,
}

/// One finding about the policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// How serious it is.
    pub severity: Severity,
    /// An RFC 6901 JSON pointer into the policy document, e.g.
    /// `/rules/3/value`; `""` means the whole document.
    pub path: String,
    /// A stable, machine-readable code, e.g. `eligibility.age-range`.
    pub code: String,
    /// What is wrong, written for a release engineer.
    pub message: String,
}

impl Diagnostic {
    /// Builds a diagnostic from its parts.
    pub fn new(
        severity: Severity,
        path: impl Into<String>,
        code: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Diagnostic {
            severity,
            path: path.into(),
            code: code.into(),
            message: message.into(),
        }
    }
}

/// Collects diagnostics; the usual way to build a validator's result.
///
/// ```
/// use pde_plugin::{Diagnostics, Severity, json_pointer};
/// let mut out = Diagnostics::new();
/// out.error(json_pointer(["rules", "0", "value"]), "demo.bad", "value out of range")
///    .warning("", "demo.note", "policy has no description");
/// assert_eq!(out.len(), 2);
/// assert!(out.has_errors());
/// assert_eq!(out.into_vec()[0].severity, Severity::Error);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Diagnostics {
    items: Vec<Diagnostic>,
}

impl Diagnostics {
    /// An empty collection.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a diagnostic of any severity.
    pub fn push(&mut self, diagnostic: Diagnostic) -> &mut Self {
        self.items.push(diagnostic);
        self
    }

    /// Adds an error (blocks the deploy).
    pub fn error(
        &mut self,
        path: impl Into<String>,
        code: impl Into<String>,
        message: impl Into<String>,
    ) -> &mut Self {
        self.push(Diagnostic::new(Severity::Error, path, code, message))
    }

    /// Adds a warning (recorded, does not block).
    pub fn warning(
        &mut self,
        path: impl Into<String>,
        code: impl Into<String>,
        message: impl Into<String>,
    ) -> &mut Self {
        self.push(Diagnostic::new(Severity::Warning, path, code, message))
    }

    /// Adds an informational note.
    pub fn info(
        &mut self,
        path: impl Into<String>,
        code: impl Into<String>,
        message: impl Into<String>,
    ) -> &mut Self {
        self.push(Diagnostic::new(Severity::Info, path, code, message))
    }

    /// Number of diagnostics collected.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// True when nothing was reported.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// True when at least one error was reported.
    pub fn has_errors(&self) -> bool {
        self.items.iter().any(|d| d.severity == Severity::Error)
    }

    /// The diagnostics collected so far.
    pub fn iter(&self) -> std::slice::Iter<'_, Diagnostic> {
        self.items.iter()
    }

    /// Consumes the collection, for returning from [`crate::Validator::validate`].
    pub fn into_vec(self) -> Vec<Diagnostic> {
        self.items
    }
}

impl From<Diagnostics> for Vec<Diagnostic> {
    fn from(d: Diagnostics) -> Self {
        d.items
    }
}

impl Extend<Diagnostic> for Diagnostics {
    fn extend<I: IntoIterator<Item = Diagnostic>>(&mut self, iter: I) {
        self.items.extend(iter);
    }
}

impl IntoIterator for Diagnostics {
    type Item = Diagnostic;
    type IntoIter = std::vec::IntoIter<Diagnostic>;
    fn into_iter(self) -> Self::IntoIter {
        self.items.into_iter()
    }
}

/// Escapes one reference token per RFC 6901: `~` becomes `~0`, `/` becomes `~1`.
///
/// ```
/// assert_eq!(pde_plugin::pointer_escape("a/b~c"), "a~1b~0c");
/// ```
pub fn pointer_escape(segment: &str) -> String {
    if !segment.contains(['~', '/']) {
        return segment.to_string();
    }
    segment.replace('~', "~0").replace('/', "~1")
}

/// Builds a JSON pointer from its segments, escaping each one.
///
/// ```
/// use pde_plugin::json_pointer;
/// assert_eq!(json_pointer(["rules", "3", "value"]), "/rules/3/value");
/// assert_eq!(json_pointer(["config", "a/b"]), "/config/a~1b");
/// assert_eq!(json_pointer(Vec::<String>::new()), "");
/// ```
pub fn json_pointer<I>(segments: I) -> String
where
    I: IntoIterator,
    I::Item: Display,
{
    use std::fmt::Write as _;
    let mut out = String::new();
    let mut buf = String::new();
    for segment in segments {
        buf.clear();
        // Writing to a String cannot fail.
        let _ = write!(buf, "{segment}");
        out.push('/');
        if buf.contains(['~', '/']) {
            out.push_str(&pointer_escape(&buf));
        } else {
            out.push_str(&buf);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn escaped_pointers_resolve_with_serde_json() {
        let doc = json!({"config": {"a/b": {"c~d": 7}}, "rules": [{"value": 1}]});
        let p = json_pointer(["config", "a/b", "c~d"]);
        assert_eq!(p, "/config/a~1b/c~0d");
        assert_eq!(doc.pointer(&p), Some(&json!(7)));
        assert_eq!(
            doc.pointer(&json_pointer(["rules", "0", "value"])),
            Some(&json!(1))
        );
    }

    #[test]
    fn tilde_one_is_not_double_unescaped() {
        // "~1" literally in a key must become "~01", not "~1" (which means "/").
        assert_eq!(pointer_escape("~1"), "~01");
    }

    #[test]
    fn builder_counts_and_orders() {
        let mut d = Diagnostics::new();
        assert!(d.is_empty());
        d.info("", "c.i", "i").warning("/x", "c.w", "w");
        assert!(!d.has_errors());
        d.error("/y", "c.e", "e");
        assert!(d.has_errors());
        let v: Vec<Diagnostic> = d.into();
        let codes: Vec<&str> = v.iter().map(|d| d.code.as_str()).collect();
        assert_eq!(codes, ["c.i", "c.w", "c.e"]);
        assert_eq!(v[2].path, "/y");
    }
}
