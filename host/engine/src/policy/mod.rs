//! Policies: the documents release engineers deploy, and the built-in checks
//! that run before any plugin sees them.
//!
//! The policy store is a directory of a Git work tree holding `<id>.json` or
//! `<id>.yaml` files (DESIGN §8). Files are hostile input: they are size
//! limited, parsed with budgets, and checked against a bundled JSON Schema
//! before any field is trusted. The checks that need more than one document
//! (rule ownership across the store, the version active in an environment,
//! approvals per environment) live in [`checks`], each returning
//! [`Diagnostic`]s so the pipeline can report all findings at once.
//!
//! - [`store`]: finding, reading and parsing policy files;
//! - [`schema`]: the bundled JSON Schema and its diagnostics;
//! - [`checks`]: uniqueness, ownership and version checks;
//! - [`approvals`]: signed approvals beside the policy, and what counts.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::diagnostic::Diagnostic;
use pde_core::{ExitCode, HasExitCode};

pub mod approvals;
pub mod checks;
pub mod schema;
pub mod store;

pub use checks::{check_conflicts, check_rules_unique, check_version};
pub use schema::{check_canonical_numbers, check_schema};
pub use store::{MAX_POLICY_BYTES, PolicyStore};

/// A policy loaded from the store and checked against the schema.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Policy {
    /// The policy id (equals the file name and `document.id`).
    pub id: String,
    /// The parsed semver version.
    pub version: semver::Version,
    /// The document exactly as parsed; this is what goes into the bundle and to plugins.
    pub document: Value,
    /// The file it was read from.
    pub path: PathBuf,
    /// The typed view of `document`.
    pub doc: PolicyDoc,
    /// The files of `<id>.approvals/`, as read (see [`approvals`]).
    #[serde(skip)]
    pub signed_approvals: Vec<approvals::ApprovalFile>,
}

/// The typed shape of a policy document (DESIGN §8).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyDoc {
    /// The policy id.
    pub id: String,
    /// Semver version string.
    pub version: String,
    /// Human title.
    pub title: String,
    /// The agency that owns the policy.
    pub agency: String,
    /// Effective date, `YYYY-MM-DD`.
    pub effective: String,
    /// Who approved this version.
    #[serde(default)]
    pub approvals: Vec<Approval>,
    /// The rules the policy sets; at least one.
    pub rules: Vec<Rule>,
    /// Free-form configuration for the services.
    #[serde(default)]
    pub config: serde_json::Map<String, Value>,
}

/// One sign-off on a policy version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Approval {
    /// Who approved.
    pub by: String,
    /// In which role.
    pub role: String,
    /// When (free text, usually a date or RFC 3339 timestamp).
    pub at: String,
}

/// One rule of a policy. Its key is owned by exactly one policy in the store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rule {
    /// Store-wide unique key, `^[a-z0-9][a-z0-9_.-]*$`.
    pub key: String,
    /// Category, used by routers to pick services.
    pub category: String,
    /// The rule's value, any JSON.
    pub value: Value,
    /// What the rule means, for people (optional; empty when absent).
    #[serde(default)]
    pub description: String,
}

/// Why a policy could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// No `<id>.json`, `<id>.yaml` or `<id>.yml` in the store.
    #[error(
        "policy {id:?} not found in {dir}: expected {id}.json or {id}.yaml there (run `pde validate` with the right -C DIR, or check `policies` in pde.toml)"
    )]
    NotFound {
        /// The id asked for.
        id: String,
        /// The store directory searched.
        dir: PathBuf,
    },
    /// More than one file claims the id.
    #[error("policy {id:?} is ambiguous: {} all exist; keep exactly one", display_paths(.paths))]
    Ambiguous {
        /// The id asked for.
        id: String,
        /// Every file that matched.
        paths: Vec<PathBuf>,
    },
    /// The id cannot name a file (path separators, leading dot, empty).
    #[error(
        "{id:?} is not a valid policy id: use letters, digits, '.', '_' and '-', not starting with '.' or '-'"
    )]
    BadId {
        /// The id given.
        id: String,
    },
    /// The file or directory could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// What was being read.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not well-formed JSON or YAML.
    #[error("cannot parse {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the parser said, with line and column when known.
        message: String,
    },
    /// The file is larger than [`MAX_POLICY_BYTES`].
    #[error("{path} is {size} bytes, over the {limit}-byte limit for a policy file")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size (or a lower bound).
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// The document does not match the schema.
    #[error("policy {id:?} is invalid:\n{}", display_diagnostics(.diagnostics))]
    Invalid {
        /// The policy id (from the file name).
        id: String,
        /// Every schema finding.
        diagnostics: Vec<Diagnostic>,
    },
    /// The document's `id` differs from its file name.
    #[error(
        "{path} declares id {found:?} but is named for policy {expected:?}; rename the file or fix the id"
    )]
    IdMismatch {
        /// The file.
        path: PathBuf,
        /// Id from the file name.
        expected: String,
        /// Id inside the document.
        found: String,
    },
}

fn display_paths(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn display_diagnostics(diagnostics: &[Diagnostic]) -> String {
    diagnostics
        .iter()
        .map(|d| format!("  {d}"))
        .collect::<Vec<_>>()
        .join("\n")
}

impl HasExitCode for PolicyError {
    fn exit_code(&self) -> ExitCode {
        match self {
            PolicyError::NotFound { .. }
            | PolicyError::Ambiguous { .. }
            | PolicyError::BadId { .. }
            | PolicyError::Read { .. } => ExitCode::Usage,
            PolicyError::Parse { .. }
            | PolicyError::TooLarge { .. }
            | PolicyError::Invalid { .. }
            | PolicyError::IdMismatch { .. } => ExitCode::ValidationFailed,
        }
    }
}
