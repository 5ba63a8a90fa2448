//! Step 6, tag: the release is tagged in the policy repository.
//!
//! A release tag is an annotated `policy/<id>/v<version>/<env>` tag whose
//! message records the bundle digest and the routed services (DESIGN §8). A
//! tag is never moved: tagging the same digest again is an idempotent
//! success, and a tag of that name over another digest is an integrity
//! error. The conflict is also checked *before* anything is pushed
//! ([`check_free`]), so a deploy never pushes a release it cannot tag.

use pde_core::{ExitCode, HasExitCode};
use serde::Serialize;

use crate::vcs::{Repo, VcsError};

/// Why a release could not be tagged.
#[derive(Debug, thiserror::Error)]
pub enum TagError {
    /// Git failed.
    #[error(transparent)]
    Vcs(#[from] VcsError),
    /// A tag of that name exists and records another digest.
    #[error(
        "tag {name} already exists for digest {existing}, not {new}: a release tag is never moved; bump the policy version"
    )]
    Conflict {
        /// The tag name.
        name: String,
        /// The digest the existing tag records (`none` if it records none).
        existing: String,
        /// The digest being released.
        new: String,
    },
}

impl HasExitCode for TagError {
    fn exit_code(&self) -> ExitCode {
        match self {
            TagError::Vcs(e) => e.exit_code(),
            TagError::Conflict { .. } => ExitCode::Integrity,
        }
    }
}

/// Whether [`ensure`] made the tag or found it already there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TagOutcome {
    /// The tag was created now.
    Created,
    /// The tag existed with the same digest; nothing was changed.
    AlreadyPresent,
}

/// The release tag of a deploy, as reported.
#[derive(Debug, Clone, Serialize)]
pub struct TagReport {
    /// `policy/<id>/v<version>/<env>`.
    pub name: String,
    /// False when the tag already existed for this same digest.
    pub created: bool,
}

/// One release: what the tag is named after and what it records.
#[derive(Debug, Clone, Copy)]
pub struct Release<'a> {
    /// The policy id.
    pub policy_id: &'a str,
    /// The policy version.
    pub version: &'a str,
    /// The environment.
    pub env: &'a str,
    /// The bundle digest.
    pub digest: &'a str,
    /// The audit log's last `(seq, hash)` when the tag is made: an anchor
    /// outside the state directory that `pde audit verify` checks the log
    /// against.
    pub audit_head: Option<(u64, &'a str)>,
}

impl<'a> Release<'a> {
    /// A release with no audit head recorded yet.
    pub fn new(policy_id: &'a str, version: &'a str, env: &'a str, digest: &'a str) -> Self {
        Release {
            policy_id,
            version,
            env,
            digest,
            audit_head: None,
        }
    }
}

/// The release tag name: `policy/<id>/v<version>/<env>`.
pub fn tag_name(policy_id: &str, version: &str, env: &str) -> String {
    format!("policy/{policy_id}/v{version}/{env}")
}

/// The message of a release tag.
pub fn tag_message(release: &Release<'_>, services: &[String]) -> String {
    let Release {
        policy_id,
        version,
        env,
        digest,
        audit_head,
    } = release;
    let mut message = format!(
        "pde release of policy {policy_id} v{version} to {env}\n\ndigest: {digest}\nservices: {}\n",
        services.join(", ")
    );
    if let Some((seq, hash)) = audit_head {
        message.push_str(&format!("audit-seq: {seq}\naudit-hash: {hash}\n"));
    }
    message
}

/// The audit head `(seq, hash)` a release tag message records, if any.
pub fn audit_head_in_message(message: &str) -> Option<(u64, String)> {
    let field = |name: &str| {
        message
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
    };
    let seq = field("audit-seq: ")?.parse().ok()?;
    Some((seq, field("audit-hash: ")?.to_string()))
}

/// The digest a release tag message records, if any.
pub fn digest_in_message(message: &str) -> Option<&str> {
    message
        .lines()
        .find_map(|l| l.strip_prefix("digest: "))
        .map(str::trim)
}

/// Fails if the release tag exists for other bytes (checked before pushing).
pub fn check_free(repo: &Repo, release: &Release<'_>) -> Result<(), TagError> {
    let name = tag_name(release.policy_id, release.version, release.env);
    match repo.tag_message(&name)? {
        None => Ok(()),
        Some(message) => compare(&name, &message, release.digest).map(drop),
    }
}

/// Tags `HEAD` as `release`, unless that exact release tag is already there.
/// Never moves a tag: an existing tag over another digest is
/// [`TagError::Conflict`].
pub fn ensure(
    repo: &Repo,
    release: &Release<'_>,
    services: &[String],
) -> Result<TagReport, TagError> {
    let name = tag_name(release.policy_id, release.version, release.env);
    let outcome = match repo.tag_message(&name)? {
        Some(message) => compare(&name, &message, release.digest)?,
        None => match repo.create_annotated_tag(&name, &tag_message(release, services)) {
            Ok(()) => {
                tracing::info!(tag = %name, digest = %release.digest, "release tag created");
                TagOutcome::Created
            }
            // Another deploy may have created it between our look and our write.
            Err(e) => match repo.tag_message(&name)? {
                Some(message) => compare(&name, &message, release.digest)?,
                None => return Err(e.into()),
            },
        },
    };
    Ok(TagReport {
        name,
        created: outcome == TagOutcome::Created,
    })
}

fn compare(name: &str, message: &str, digest: &str) -> Result<TagOutcome, TagError> {
    let existing = digest_in_message(message).unwrap_or("none");
    if existing == digest {
        Ok(TagOutcome::AlreadyPresent)
    } else {
        Err(TagError::Conflict {
            name: name.to_string(),
            existing: existing.to_string(),
            new: digest.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;
    use crate::vcs::tests::{git, repo_with_commit};

    fn release<'a>(digest: &'a str) -> Release<'a> {
        Release {
            policy_id: "42",
            version: "1.3.0",
            env: "production",
            digest,
            audit_head: None,
        }
    }

    #[test]
    fn release_tags_are_annotated_idempotent_and_never_moved() {
        let (dir, repo) = repo_with_commit();
        let services = vec!["HMS-API".to_string(), "HMS-BATCH".to_string()];
        let name = tag_name("42", "1.3.0", "production");
        assert_eq!(name, "policy/42/v1.3.0/production");
        assert_eq!(repo.tag_message(&name).unwrap(), None);
        check_free(&repo, &release("sha256:aa")).unwrap();

        let first = ensure(&repo, &release("sha256:aa"), &services).unwrap();
        assert!(first.created);
        let message = repo.tag_message(&name).unwrap().unwrap();
        assert!(
            message.lines().any(|l| l == "digest: sha256:aa"),
            "{message}"
        );
        assert!(
            message.lines().any(|l| l == "services: HMS-API, HMS-BATCH"),
            "{message}"
        );
        let out = Command::new("git")
            .arg("-C")
            .arg(dir.path())
            .args(["cat-file", "-t", &format!("refs/tags/{name}")])
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "tag");

        let again = ensure(&repo, &release("sha256:aa"), &services).unwrap();
        assert!(!again.created);

        let e = ensure(&repo, &release("sha256:bb"), &services).unwrap_err();
        assert!(
            matches!(&e, TagError::Conflict { existing, new, .. } if existing == "sha256:aa" && new == "sha256:bb")
        );
        assert_eq!(e.exit_code(), ExitCode::Integrity);
        assert!(check_free(&repo, &release("sha256:bb")).is_err());
        // The tag still records the first digest.
        let message = repo.tag_message(&name).unwrap().unwrap();
        assert_eq!(digest_in_message(&message), Some("sha256:aa"));

        // A release records the audit head it was made at.
        let anchored = Release {
            version: "1.4.0",
            audit_head: Some((7, "ab12")),
            ..release("sha256:cc")
        };
        ensure(&repo, &anchored, &services).unwrap();
        let m = repo
            .tag_message(&tag_name("42", "1.4.0", "production"))
            .unwrap()
            .unwrap();
        assert_eq!(audit_head_in_message(&m), Some((7, "ab12".to_string())));
        assert_eq!(digest_in_message(&m), Some("sha256:cc"));
        let all = repo.release_tags().unwrap();
        assert_eq!(all.len(), 2, "{all:?}");
        assert_eq!(audit_head_in_message(&all[0].1), None);
    }

    #[test]
    fn a_lightweight_tag_in_the_way_is_a_conflict() {
        let (dir, repo) = repo_with_commit();
        git(dir.path(), &["tag", "policy/42/v1.3.0/production"]);
        let e = ensure(&repo, &release("sha256:aa"), &[]).unwrap_err();
        assert!(matches!(e, TagError::Conflict { ref existing, .. } if existing == "none"));
    }
}
