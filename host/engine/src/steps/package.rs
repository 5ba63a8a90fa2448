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

use crate::bundle::{Bundle, Manifest, Payload};
use crate::config::Environment;
use crate::policy::Policy;
use crate::state::{StateError, StateStore};
use crate::steps::validate::ValidationReport;
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
    /// The version is active with other content.
    #[error(
        "version {version} of policy {policy_id} is already active in {env} as {active}, \
         but this build is {digest}; bump the version"
    )]
    VersionReused {
        /// The policy.
        policy_id: String,
        /// The version.
        version: String,
        /// The environment.
        env: String,
        /// The active digest.
        active: String,
        /// The new digest.
        digest: String,
    },
    /// `promote_from` and the digest was never deployed there.
    #[error(
        "environment {env} only takes bundles already deployed to {from}, and {digest} \
         has not been: deploy it to {from} first"
    )]
    NotPromoted {
        /// The environment.
        env: String,
        /// Where it must have been deployed.
        from: String,
        /// The new bundle's digest.
        digest: String,
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

impl HasExitCode for PackageError {
    fn exit_code(&self) -> ExitCode {
        match self {
            PackageError::Vcs(e) => e.exit_code(),
            PackageError::State(e) => e.exit_code(),
            PackageError::Bundle(e) => e.exit_code(),
            // Not eligible for that environment yet, like a validation failure.
            PackageError::NotPromoted { .. } | PackageError::VersionReused { .. } => {
                ExitCode::ValidationFailed
            }
            PackageError::DirtyPolicy { .. } | PackageError::Write { .. } => ExitCode::Usage,
        }
    }
}

/// A bundle written by `pde package`.
#[derive(Debug, Clone, Serialize)]
pub struct PackageReport {
    /// The bundle digest.
    pub digest: String,
    /// Where it was written.
    pub path: PathBuf,
    /// The validation it passed.
    pub validation: ValidationReport,
    /// The bundle itself.
    #[serde(skip)]
    pub bundle: Bundle,
}

/// Builds and signs the bundle. Refuses a policy file with uncommitted
/// changes: the manifest names the commit, and that must not be a lie.
pub fn seal(
    repo: &Repo,
    policy: &Policy,
    validation: &ValidationReport,
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
            validators: validation.validator_records(),
        },
        policy: policy.document.clone(),
    };
    let mut bundle = Bundle::seal(payload, &key.into_iter().collect::<Vec<_>>())?;
    bundle.approvals = validation.approvals.carried.clone();
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

/// The same version may only be deployed again with the same bytes. `true`
/// when this exact bundle is already the active one.
pub fn check_redeploy(
    state: &StateStore,
    policy: &Policy,
    env: &str,
    digest: &str,
) -> Result<bool, PackageError> {
    let Some(active) = state.active(&policy.id, env)? else {
        return Ok(false);
    };
    if active.digest == digest {
        return Ok(true);
    }
    if active.version == policy.version.to_string() {
        return Err(PackageError::VersionReused {
            policy_id: policy.id.clone(),
            version: active.version,
            env: env.to_string(),
            active: active.digest,
            digest: digest.to_string(),
        });
    }
    Ok(false)
}

/// `promote_from`: only a digest already deployed there may come here.
pub fn check_promotion(
    state: &StateStore,
    policy: &Policy,
    env_name: &str,
    env: &Environment,
    digest: &str,
) -> Result<(), PackageError> {
    let Some(from) = &env.promote_from else {
        return Ok(());
    };
    if state.was_deployed(from, &policy.id, digest)? {
        return Ok(());
    }
    Err(PackageError::NotPromoted {
        env: env_name.to_string(),
        from: from.clone(),
        digest: digest.to_string(),
    })
}
