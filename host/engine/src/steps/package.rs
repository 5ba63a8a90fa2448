//! Step 2, package: the reproducible, content-addressed, signed bundle.
//!
//! The payload holds the manifest (policy id, version, source commit,
//! validator digests and findings) and the policy, nothing else: no
//! timestamp, no environment, so the same commit always gives the same bytes
//! and the artifact checked in staging is the one promoted to production.
//! The deploy gates that depend on the digest live here too: the same
//! version may only come back with the same bytes, and `promote_from`.

use std::path::{Path, PathBuf};

use pde_core::{ExitCode, HasExitCode};
use serde::Serialize;

use crate::approval::SignedApproval;
use crate::bundle::{Bundle, Manifest, Payload, ValidatorRecord};
use crate::config::Environment;
use crate::policy::Policy;
use crate::state::{StateError, StateStore};
use crate::vcs::{Repo, VcsError};

/// Why the bundle could not be built, written or admitted.
#[derive(Debug, thiserror::Error)]
pub enum PackageError {
    /// Git failed.
    #[error(transparent)]
    Vcs(#[from] VcsError),
    /// The policy has no canonical form (validation refuses this first).
    #[error(transparent)]
    Bundle(#[from] pde_core::bundle::BundleError),
    /// The state database failed.
    #[error(transparent)]
    State(#[from] StateError),
    /// The policy file differs from the commit, so the bundle could not name its source.
    #[error(
        "{path} has uncommitted changes; commit it so the bundle names the commit it came from"
    )]
    DirtyPolicy {
        /// The policy file.
        path: PathBuf,
    },
    /// `promote_from` and this version never ran there.
    #[error(
        "environment {env} only takes bundles already deployed to {from}, and version \
         {version} of policy {policy_id} has not been: deploy it to {from} first"
    )]
    NotPromoted {
        /// The environment.
        env: String,
        /// Where it must have been deployed.
        from: String,
        /// The policy.
        policy_id: String,
        /// The version that never ran there.
        version: String,
    },
    /// This version was built before, and the rebuild differs in content,
    /// plugins or their findings (not merely in the commit it was built from).
    #[error("{earlier}, and this build differs: {}; bump the version", .changes.join("; "))]
    Changed {
        /// The earlier build.
        earlier: Box<Earlier>,
        /// What differs, one sentence each.
        changes: Vec<String>,
    },
    /// The earlier build that must be shipped cannot be read back.
    #[error("{earlier}, but it cannot be read: {why}")]
    ArtifactMissing {
        /// The earlier build.
        earlier: Box<Earlier>,
        /// Where it was looked for.
        why: String,
    },
    /// The bundle file could not be written.
    #[error("cannot write the bundle {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// An earlier build of a version, which a deploy must ship again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Earlier {
    /// The policy.
    pub policy_id: String,
    /// The version.
    pub version: String,
    /// The earlier build's digest.
    pub digest: String,
    /// Where it runs (`the bundle staging runs`, `active in staging`).
    pub origin: String,
}

impl std::fmt::Display for Earlier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "version {} of policy {} was built as {} ({})",
            self.version, self.policy_id, self.digest, self.origin
        )
    }
}

impl HasExitCode for PackageError {
    fn exit_code(&self) -> ExitCode {
        match self {
            PackageError::Vcs(e) => e.exit_code(),
            PackageError::State(e) => e.exit_code(),
            PackageError::Bundle(e) => e.exit_code(),
            // Not eligible for that environment yet, like a validation failure.
            PackageError::NotPromoted { .. } | PackageError::Changed { .. } => {
                ExitCode::ValidationFailed
            }
            PackageError::DirtyPolicy { .. }
            | PackageError::Write { .. }
            | PackageError::ArtifactMissing { .. } => ExitCode::Usage,
        }
    }
}

/// Builds and signs the bundle, recording what validation vouched for:
/// `validators`, the environment-neutral run of each validator plugin, and
/// `approvals`, the counted signed approvals the bundle carries. Refuses a
/// policy file with uncommitted changes: the manifest names the commit, and
/// that must not be a lie.
pub fn seal(
    repo: &Repo,
    policy: &Policy,
    validators: Vec<ValidatorRecord>,
    approvals: &[SignedApproval],
    key: Option<&ed25519_dalek::SigningKey>,
) -> Result<Bundle, PackageError> {
    if !repo.is_clean(&policy.path)? {
        return Err(PackageError::DirtyPolicy {
            path: policy.path.clone(),
        });
    }
    let payload = Payload {
        manifest: Manifest {
            policy_id: policy.id.clone(),
            version: policy.version.to_string(),
            source_commit: repo.head_commit()?,
            validators,
        },
        policy: policy.document.clone(),
    };
    let mut bundle = Bundle::seal(payload, &key.into_iter().collect::<Vec<_>>())?;
    bundle.approvals = approvals.to_vec();
    Ok(bundle)
}

/// Writes `bundle` atomically into `dir` as
/// `<policy>-<version>-<digest prefix>.bundle.json`.
pub fn write(bundle: &Bundle, dir: &Path) -> Result<PathBuf, PackageError> {
    let path = dir.join(pde_core::bundle::file_name(
        &bundle.payload.manifest.policy_id,
        &bundle.payload.manifest.version,
        &bundle.digest,
    ));
    let written = std::fs::create_dir_all(dir)
        .and_then(|()| pde_core::fsutil::atomic_write(&path, &bundle.to_canonical_bytes()));
    written.map_err(|source| PackageError::Write {
        path: path.clone(),
        source,
    })?;
    Ok(path)
}

/// Which build a deploy ships, and where it came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Artifact {
    /// The environment whose bundle is shipped again (the `promote_from`
    /// source, or the target itself when its version is redeployed); `None`
    /// when this run's build is shipped.
    pub reused_from: Option<String>,
    /// The commit the shipped bundle was built from (its manifest's
    /// `source_commit`), which may be older than the work tree's HEAD.
    pub source_commit: String,
}

/// The bundle a deploy to one environment ships.
#[derive(Debug)]
pub struct Admitted {
    /// The bundle, with this run's approvals attached.
    pub bundle: Bundle,
    /// Where it came from.
    pub artifact: Artifact,
    /// This exact bundle is already the active one in the environment.
    pub already_active: bool,
}

/// Build once, promote the artifact.
///
/// A version of a policy is built once. Where an earlier build of this
/// version exists — the one the `promote_from` environment runs, or the one
/// active in this environment — that bundle is shipped, byte for byte, as
/// long as this run's rebuild has the same content: the same policy
/// document, the same validators (by sha256) and the same findings. Only the
/// commit the rebuild was made from may differ, so a commit of an unrelated
/// file or of new approvals between staging and production changes nothing.
/// Approvals travel beside the digest, so the ones counted now are attached
/// to the reused bundle; this run's signing key adds its signature if the
/// bundle lacks one by that key.
///
/// A rebuild that differs is refused naming what changed; `promote_from`
/// without this version having run there is refused too.
pub fn admit(
    state: &StateStore,
    dist: &Path,
    policy: &Policy,
    env_name: &str,
    env: &Environment,
    built: Bundle,
    key: Option<&ed25519_dalek::SigningKey>,
) -> Result<Admitted, PackageError> {
    let version = policy.version.to_string();
    let active = state.active(&policy.id, env_name)?;
    let earlier = match &env.promote_from {
        Some(from) => {
            let digest = source_digest(state, &policy.id, from, &version)?.ok_or_else(|| {
                PackageError::NotPromoted {
                    env: env_name.to_string(),
                    from: from.clone(),
                    policy_id: policy.id.clone(),
                    version: version.clone(),
                }
            })?;
            Some((format!("the bundle {from} runs"), from.clone(), digest))
        }
        None => active.as_ref().filter(|a| a.version == version).map(|a| {
            (
                format!("active in {env_name}"),
                env_name.to_string(),
                a.digest.clone(),
            )
        }),
    };
    let (bundle, reused_from) = match earlier {
        Some((_, _, digest)) if digest == built.digest => (built, None),
        Some((origin, from, digest)) => {
            let reused = reuse(state, dist, policy, &origin, &digest, &built, key)?;
            (reused, Some(from))
        }
        None => (built, None),
    };
    // The same version active here with other bytes: only a rebuild of the
    // same content may replace it (a promotion source that was rolled back
    // and redeployed must not change what production enforces under one
    // version).
    if let Some(active) = active.as_ref().filter(|a| a.version == version)
        && active.digest != bundle.digest
    {
        let origin = format!("active in {env_name}");
        reuse(state, dist, policy, &origin, &active.digest, &bundle, None)?;
    }
    Ok(Admitted {
        already_active: active.is_some_and(|a| a.digest == bundle.digest),
        artifact: Artifact {
            reused_from,
            source_commit: bundle.payload.manifest.source_commit.clone(),
        },
        bundle,
    })
}

/// The digest of `version` of `policy_id` that `env` runs, or else the one
/// it last ran (a deploy or rollback that took effect), newest first.
fn source_digest(
    state: &StateStore,
    policy_id: &str,
    env: &str,
    version: &str,
) -> Result<Option<String>, PackageError> {
    if let Some(a) = state.active(policy_id, env)?
        && a.version == version
    {
        return Ok(Some(a.digest));
    }
    Ok(state
        .history(policy_id)?
        .into_iter()
        .find(|d| d.env == env && d.version == version && d.outcome.took_effect())
        .map(|d| d.digest))
}

/// The earlier bundle `digest`, checked to hold what `built` holds, with
/// `built`'s approvals attached and signed by `key` too.
fn reuse(
    state: &StateStore,
    dist: &Path,
    policy: &Policy,
    origin: &str,
    digest: &str,
    built: &Bundle,
    key: Option<&ed25519_dalek::SigningKey>,
) -> Result<Bundle, PackageError> {
    let version = policy.version.to_string();
    let about = || {
        Box::new(Earlier {
            policy_id: policy.id.clone(),
            version: version.clone(),
            digest: digest.to_string(),
            origin: origin.to_string(),
        })
    };
    let mut earlier = crate::state::stored_bundle(&**state, dist, &policy.id, &version, digest)?
        .map_err(|why| PackageError::ArtifactMissing {
            earlier: about(),
            why,
        })?;
    let changes = changes(&earlier.payload, &built.payload);
    if !changes.is_empty() {
        return Err(PackageError::Changed {
            earlier: about(),
            changes,
        });
    }
    earlier.approvals = built.approvals.clone();
    if let Some(key) = key {
        let signature = pde_core::keys::sign(key, earlier.digest.as_bytes());
        if !earlier
            .signatures
            .iter()
            .any(|s| s.keyid == signature.keyid)
        {
            earlier.signatures.push(signature);
        }
    }
    Ok(earlier)
}

/// What differs between two builds of one version, apart from the commit
/// they were built from; empty when they hold the same thing.
pub fn changes(earlier: &Payload, now: &Payload) -> Vec<String> {
    let mut changes = Vec::new();
    if earlier.policy != now.policy {
        let fields = changed_fields(&earlier.policy, &now.policy);
        changes.push(format!(
            "the policy's content changed ({})",
            fields.join(", ")
        ));
    }
    let (old, new) = (&earlier.manifest.validators, &now.manifest.validators);
    for o in old {
        match new.iter().find(|n| n.name == o.name) {
            None => changes.push(format!("validator {} no longer runs", o.name)),
            Some(n) if n.sha256 != o.sha256 => changes.push(format!(
                "validator {}'s plugin changed (sha256 {} -> {})",
                o.name,
                short(&o.sha256),
                short(&n.sha256)
            )),
            Some(n) if (n.errors, n.warnings) != (o.errors, o.warnings) => changes.push(format!(
                "validator {}'s findings changed (warnings {} -> {}), so its settings \
                     in pde.toml changed",
                o.name, o.warnings, n.warnings
            )),
            Some(_) => {}
        }
    }
    for n in new.iter().filter(|n| !old.iter().any(|o| o.name == n.name)) {
        changes.push(format!("validator {} now runs", n.name));
    }
    if changes.is_empty() {
        let mut same = earlier.clone();
        same.manifest
            .source_commit
            .clone_from(&now.manifest.source_commit);
        if same != *now {
            changes.push("the bundle's manifest changed".to_string());
        }
    }
    changes
}

/// The top-level fields of a policy document that differ.
fn changed_fields(a: &serde_json::Value, b: &serde_json::Value) -> Vec<String> {
    let (Some(a), Some(b)) = (a.as_object(), b.as_object()) else {
        return vec!["document".to_string()];
    };
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| k.to_string())
        .collect()
}

fn short(hex: &str) -> &str {
    hex.get(..12).unwrap_or(hex)
}
