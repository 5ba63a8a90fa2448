//! Approvals: signed ones from `<id>.approvals/`, and the legacy unsigned
//! `approvals` entries of the policy document.
//!
//! `pde approve` writes one file per approver key into the policy's
//! approvals directory, beside the policy and committed with it. What makes
//! an approval count is decided in [`pde_core::approval::tally`], the same
//! function the agent uses; this module reads the files (hostile input:
//! bounded in size and number) and turns the verdict into diagnostics an
//! author can act on.
//!
//! Unsigned entries still count in environments that do not set
//! `require_signed_approvals`, so old workspaces keep deploying. They are
//! compared by name, and a name that also signed is counted once.

use std::collections::BTreeSet;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Serialize;

use pde_core::approval::{self, Approvers, Counted, Rejection, SignedApproval};

use super::Policy;
use crate::diagnostic::{Diagnostic, Severity};

/// The most approval files read for one policy.
pub const MAX_APPROVALS: usize = 256;
/// The largest approval file read.
pub const MAX_APPROVAL_BYTES: u64 = 64 * 1024;

/// One file of a policy's approvals directory: parsed, or why not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApprovalFile {
    /// The file.
    pub path: PathBuf,
    /// The approval, or what is wrong with the file.
    pub approval: Result<SignedApproval, String>,
}

/// The approvals directory of the policy stored at `policy_path`
/// (`policies/42.json` → `policies/42.approvals`).
pub fn dir_of(policy_path: &Path) -> PathBuf {
    policy_path.with_extension("approvals")
}

/// Reads every `*.json` in `dir`, sorted by name. A missing directory is no
/// approvals; an unreadable or malformed file is reported, not fatal, so one
/// bad file cannot hide the others.
pub fn read_dir(dir: &Path) -> Result<Vec<ApprovalFile>, std::io::Error> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    paths.sort();
    if paths.len() > MAX_APPROVALS {
        return Err(std::io::Error::other(format!(
            "{} holds {} approval files; at most {MAX_APPROVALS} are read",
            dir.display(),
            paths.len()
        )));
    }
    Ok(paths
        .into_iter()
        .map(|path| {
            let approval = read_one(&path);
            ApprovalFile { path, approval }
        })
        .collect())
}

fn read_one(path: &Path) -> Result<SignedApproval, String> {
    let meta = fs::symlink_metadata(path).map_err(|e| e.to_string())?;
    if !meta.file_type().is_file() {
        return Err("not a regular file (links are not followed)".into());
    }
    let mut bytes = Vec::new();
    fs::File::open(path)
        .and_then(|f| f.take(MAX_APPROVAL_BYTES + 1).read_to_end(&mut bytes))
        .map_err(|e| e.to_string())?;
    if bytes.len() as u64 > MAX_APPROVAL_BYTES {
        return Err(format!("larger than {MAX_APPROVAL_BYTES} bytes"));
    }
    serde_json::from_slice(&bytes).map_err(|e| format!("not a signed approval: {e}"))
}

/// What an environment asks of approvals (`min_approvals`,
/// `required_roles`, `require_signed_approvals`).
#[derive(Debug, Clone, Default)]
pub struct Requirement {
    /// Distinct approvers needed.
    pub min: u32,
    /// Roles that must each be credited.
    pub roles: Vec<String>,
    /// Only signed approvals count.
    pub signed_only: bool,
}

/// The approvals of one policy as judged: the signed ones that count (which
/// the bundle carries) and the findings about the rest.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Verdict {
    /// Valid signed approvals of this content by distinct trusted keys.
    pub counted: Vec<Counted>,
    /// The same approvals, as they travel in the bundle.
    #[serde(skip)]
    pub carried: Vec<SignedApproval>,
    /// Distinct approvers counted, signed and (where allowed) unsigned.
    pub approvers: usize,
    /// The content digest approvals must name.
    pub policy_digest: String,
    /// Why each uncounted approval does not count, and whether the
    /// requirement is met.
    #[serde(skip)]
    pub diagnostics: Vec<Diagnostic>,
}

/// Judges `policy`'s approvals. With `requirement`, also checks that it is
/// met; without one (no environment), only reports approvals that do not count.
pub fn judge(policy: &Policy, approvers: &Approvers, requirement: Option<&Requirement>) -> Verdict {
    let mut diagnostics = Vec::new();
    let digest = match approval::policy_digest(&policy.document) {
        Ok(d) => d,
        // Validation already refuses such numbers (check_canonical_numbers);
        // nothing can have approved a document without a digest.
        Err(_) => return Verdict::default(),
    };
    let mut signed = Vec::new();
    for file in &policy.signed_approvals {
        match &file.approval {
            Ok(a) => signed.push(a.clone()),
            Err(reason) => diagnostics.push(Diagnostic::warning(
                "approvals",
                "approvals.malformed",
                "",
                format!("{}: {reason}; it does not count", file.path.display()),
            )),
        }
    }
    let tally = approval::tally(&signed, &policy.id, &digest, approvers);
    // Where nothing is required, approvals of an earlier content are no
    // reason to warn: said once, as information (issue 26: dev was noisy).
    let none_required = requirement.is_none_or(|r| r.min == 0 && r.roles.is_empty());
    let stale = tally
        .rejected
        .iter()
        .filter(|r| matches!(r, Rejection::Stale { .. }))
        .count();
    if none_required && stale > 0 {
        diagnostics.push(Diagnostic::new(
            Severity::Info,
            "approvals",
            "approvals.stale",
            "",
            format!(
                "{stale} approval(s) were signed over an earlier content of this policy (it is \
                 now {digest}); no approval is required here, but an environment that requires \
                 them will ask each approver to run `pde approve {} --key FILE` again",
                policy.id
            ),
        ));
    }
    for rejection in &tally.rejected {
        if none_required && matches!(rejection, Rejection::Stale { .. }) {
            continue;
        }
        let code = match rejection {
            Rejection::Stale { .. } => "approvals.stale",
            Rejection::Signature { .. } => "approvals.untrusted",
            Rejection::Duplicate { .. } => "approvals.duplicate",
            Rejection::OtherPolicy { .. } => "approvals.other-policy",
            Rejection::Malformed { .. } => "approvals.malformed",
        };
        diagnostics.push(Diagnostic::warning(
            "approvals",
            code,
            "",
            format!("{rejection}; it does not count"),
        ));
    }
    for c in tally.counted.iter().filter(|c| c.uncredited_role.is_some()) {
        diagnostics.push(Diagnostic::warning(
            "approvals",
            "approvals.role-not-trusted",
            "",
            format!(
                "approval by {} claims role {:?}, but key {} is not trusted for it in \
                 [trust] approver_keys; it counts as an approval without that role",
                c.by,
                c.uncredited_role.as_deref().unwrap_or_default(),
                c.keyid
            ),
        ));
    }
    let carried = tally
        .counted
        .iter()
        .filter_map(|c| signed.iter().find(|a| a.keyid() == c.keyid).cloned())
        .collect();

    let signed_names: BTreeSet<String> = tally.counted.iter().map(|c| norm(&c.by)).collect();
    let mut roles: BTreeSet<String> = tally.roles().into_iter().map(str::to_string).collect();
    let mut unsigned_names = BTreeSet::new();
    if let Some(req) = requirement {
        if req.signed_only {
            if !policy.doc.approvals.is_empty() && (req.min > 0 || !req.roles.is_empty()) {
                diagnostics.push(Diagnostic::warning(
                    "approvals",
                    "approvals.unsigned-ignored",
                    "/approvals",
                    "this environment counts only signed approvals (`pde approve`); the \
                     unsigned entries in `approvals` do not count here",
                ));
            }
        } else {
            for a in &policy.doc.approvals {
                let name = norm(&a.by);
                if !name.is_empty() && !signed_names.contains(&name) {
                    unsigned_names.insert(name);
                    roles.insert(a.role.trim().to_string());
                }
            }
        }
    }
    let approvers_counted = tally.counted.len() + unsigned_names.len();

    if let Some(req) = requirement {
        if (approvers_counted as u64) < u64::from(req.min) {
            let mut message = format!(
                "policy {:?} has {approvers_counted} valid approval(s) from distinct approvers; \
                 this environment requires {}",
                policy.id, req.min
            );
            if tally.has_stale() {
                message.push_str(&format!(
                    ". The policy was edited after it was approved (it is now {digest}), which \
                     invalidates every earlier approval: each approver must run \
                     `pde approve {} --key FILE` again",
                    policy.id
                ));
            } else {
                message.push_str(&format!(
                    "; approvers sign with `pde approve {} --key FILE` and commit the file",
                    policy.id
                ));
            }
            diagnostics.push(Diagnostic::error(
                "approvals",
                "approvals.insufficient",
                "/approvals",
                message,
            ));
        }
        for role in &req.roles {
            if !roles.contains(role.trim()) {
                diagnostics.push(Diagnostic::error(
                    "approvals",
                    "approvals.role-missing",
                    "/approvals",
                    format!(
                        "this environment requires a {role:?} approval of policy {:?}; none of \
                         its valid approvals is by a key trusted for that role",
                        policy.id
                    ),
                ));
            }
        }
    }
    Verdict {
        counted: tally.counted,
        carried,
        approvers: approvers_counted,
        policy_digest: digest,
        diagnostics,
    }
}

fn norm(name: &str) -> String {
    name.trim().to_lowercase()
}

/// What `pde approve` wrote.
#[derive(Debug, Clone, Serialize)]
pub struct Approved {
    /// The approval file.
    pub path: PathBuf,
    /// The approver's key id.
    pub keyid: String,
    /// The content digest signed.
    pub policy_digest: String,
    /// The policy version approved.
    pub version: String,
    /// Whether `[trust] approver_keys` lists the key (an approval by an
    /// unlisted key is written, but counts nowhere until it is listed).
    pub trusted: bool,
    /// The role claimed, if any.
    pub role: Option<String>,
}

/// What an approver says about themselves when signing.
#[derive(Debug, Clone, Default)]
pub struct Signoff {
    /// Their name.
    pub by: String,
    /// The role they approve in.
    pub role: Option<String>,
    /// A note for the record.
    pub note: Option<String>,
}

/// Signs `policy`'s content digest with `key` and writes the approval to
/// `<id>.approvals/<keyid>.json`, replacing that key's earlier approval
/// (one key, one approval: re-approving after an edit overwrites).
pub fn approve(
    policy: &Policy,
    key: &ed25519_dalek::SigningKey,
    signoff: Signoff,
    approvers: &Approvers,
) -> Result<Approved, ApproveError> {
    let policy_digest =
        approval::policy_digest(&policy.document).map_err(ApproveError::Canonical)?;
    let statement = approval::Statement {
        format: approval::FORMAT.to_string(),
        policy_id: policy.id.clone(),
        version: policy.version.to_string(),
        policy_digest: policy_digest.clone(),
        by: signoff.by,
        role: signoff.role.clone(),
        note: signoff.note,
        at: pde_core::clock::now_rfc3339(),
    };
    let signed = SignedApproval::sign(statement, key).map_err(ApproveError::Canonical)?;
    let keyid = signed.keyid().to_string();
    let dir = dir_of(&policy.path);
    let path = dir.join(format!("{keyid}.json"));
    let mut text = serde_json::to_string_pretty(&signed).unwrap_or_default();
    text.push('\n');
    std::fs::create_dir_all(&dir)
        .and_then(|()| pde_core::fsutil::atomic_write(&path, text.as_bytes()))
        .map_err(|source| ApproveError::Write {
            path: path.clone(),
            source,
        })?;
    Ok(Approved {
        path,
        trusted: approvers.key_ids().contains(&keyid),
        keyid,
        policy_digest,
        version: policy.version.to_string(),
        role: signoff.role,
    })
}

/// Why `pde approve` could not write an approval.
#[derive(Debug, thiserror::Error)]
pub enum ApproveError {
    /// The policy has no canonical form (it would not validate either).
    #[error("the policy cannot be canonicalised: {0}")]
    Canonical(pde_core::canonical::CanonicalError),
    /// The approval file could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

impl pde_core::HasExitCode for ApproveError {
    fn exit_code(&self) -> pde_core::ExitCode {
        match self {
            ApproveError::Canonical(_) => pde_core::ExitCode::ValidationFailed,
            ApproveError::Write { .. } => pde_core::ExitCode::Usage,
        }
    }
}
