//! Provenance: the files a bundle vouches for must be what its commit holds.
//!
//! A bundle names the commit it came from. That is only true if the policy
//! file and every plugin that judged it are the committed bytes, so before
//! packaging pde checks that:
//! - the policy file and each file of the plugins directory is a regular
//!   file inside the workspace, reached without following a symbolic link.
//!   Git records a symlink's *target path*, not the content behind it, so a
//!   committed `policies/45.json -> /tmp/x.json` is "clean" while its
//!   content changes freely;
//! - the plugins directory has no uncommitted change: a validator deleted,
//!   added or edited in the work tree would run (or not run) while the bundle
//!   names a commit that says otherwise;
//! - an environment's `required_plugins` are all present, so a deploy never
//!   quietly runs without the checks an environment depends on.
//!
//! Each refusal is a workspace problem (exit 2), not a failed validation.

use std::path::{Component, Path, PathBuf};

use pde_core::{ExitCode, HasExitCode};

use crate::config::Environment;
use crate::plugin::PluginSet;
use crate::vcs::{Repo, VcsError};

/// Why the workspace's files cannot be vouched for by its commit.
#[derive(Debug, thiserror::Error)]
pub enum ProvenanceError {
    /// Git failed.
    #[error(transparent)]
    Vcs(#[from] VcsError),
    /// A symbolic link on the way to a policy or plugin file.
    #[error(
        "{path} is a symbolic link: policy and plugin files must be regular files in the \
         repository (git records a link's target, not the content behind it); replace the \
         link with the file and commit it"
    )]
    Symlink {
        /// The link.
        path: PathBuf,
    },
    /// The file is not a regular file (a directory, a device, a FIFO).
    #[error("{path} is not a regular file; policy and plugin files must be regular files")]
    NotRegular {
        /// The path.
        path: PathBuf,
    },
    /// The path leaves the workspace (`..` or an absolute setting).
    #[error(
        "{path} is outside the workspace {root}; policies and plugins must live in the repository"
    )]
    Outside {
        /// The path.
        path: PathBuf,
        /// The workspace root.
        root: PathBuf,
    },
    /// The plugins directory differs from the commit.
    #[error(
        "the plugins directory {dir} has uncommitted changes ({changes}); commit or restore \
         them so the bundle's commit names the plugins that ran"
    )]
    DirtyPlugins {
        /// The plugins directory.
        dir: PathBuf,
        /// `git status --short` lines, `; `-joined.
        changes: String,
    },
    /// The policy's approvals directory differs from the commit.
    #[error(
        "the approvals in {dir} have uncommitted changes ({changes}); commit them with the \
         policy (`git add {dir} && git commit`) so the bundle's commit holds what it carries"
    )]
    DirtyApprovals {
        /// The approvals directory.
        dir: PathBuf,
        /// `git status --short` lines, `; `-joined.
        changes: String,
    },
    /// `pde.toml` differs from the commit: its gates (freezes, approvals,
    /// signed plugins, promotion) would be the work tree's, not the record's.
    #[error(
        "{path} has uncommitted changes ({changes}); commit or restore it: a deploy or \
         rollback runs under the configuration its commit holds, so a gate cannot be \
         dropped by an edit nobody committed"
    )]
    DirtyConfig {
        /// The configuration file.
        path: PathBuf,
        /// `git status --short` lines, `; `-joined.
        changes: String,
    },
    /// An environment's `required_plugins` names a plugin that is not installed.
    #[error(
        "environment {env} requires plugin(s) {missing}, not found in {dir}; restore them \
         (`git checkout -- {dir}`) or change `required_plugins` in pde.toml"
    )]
    MissingRequired {
        /// The environment.
        env: String,
        /// The missing names, comma separated.
        missing: String,
        /// The plugins directory.
        dir: PathBuf,
    },
}

impl HasExitCode for ProvenanceError {
    fn exit_code(&self) -> ExitCode {
        match self {
            ProvenanceError::Vcs(e) => e.exit_code(),
            _ => ExitCode::Usage,
        }
    }
}

/// Checks that `path` is a regular file under `root`, reached through no
/// symbolic link from `root` down.
pub fn check_regular_file(root: &Path, path: &Path) -> Result<(), ProvenanceError> {
    walk_inside(root, path)?;
    let meta = std::fs::symlink_metadata(path).map_err(|_| ProvenanceError::NotRegular {
        path: path.to_path_buf(),
    })?;
    if !meta.file_type().is_file() {
        return Err(ProvenanceError::NotRegular {
            path: path.to_path_buf(),
        });
    }
    Ok(())
}

/// Every component of `path` below `root` exists-or-not without being a
/// symlink, and none climbs out.
fn walk_inside(root: &Path, path: &Path) -> Result<(), ProvenanceError> {
    let outside = || ProvenanceError::Outside {
        path: path.to_path_buf(),
        root: root.to_path_buf(),
    };
    let rel = path.strip_prefix(root).map_err(|_| outside())?;
    let mut at = root.to_path_buf();
    for part in rel.components() {
        match part {
            Component::Normal(name) => at.push(name),
            Component::CurDir => continue,
            _ => return Err(outside()),
        }
        if std::fs::symlink_metadata(&at).is_ok_and(|m| m.file_type().is_symlink()) {
            return Err(ProvenanceError::Symlink { path: at });
        }
    }
    Ok(())
}

/// The plugins directory: no link on the way to it, no link in it, and no
/// uncommitted change under it (a deleted validator included).
pub fn check_plugins_dir(repo: &Repo, root: &Path, dir: &Path) -> Result<(), ProvenanceError> {
    let changes = uncommitted_in(repo, root, dir)?;
    if changes.is_empty() {
        return Ok(());
    }
    Err(ProvenanceError::DirtyPlugins {
        dir: dir.to_path_buf(),
        changes: changes.join("; "),
    })
}

/// A policy's signed approvals (`<id>.approvals/`): like the plugins, they
/// must be what the commit holds, since the bundle carries them.
pub fn check_approvals_dir(repo: &Repo, root: &Path, dir: &Path) -> Result<(), ProvenanceError> {
    let changes = uncommitted_in(repo, root, dir)?;
    if changes.is_empty() {
        return Ok(());
    }
    Err(ProvenanceError::DirtyApprovals {
        dir: dir.to_path_buf(),
        changes: changes.join("; "),
    })
}

/// `git status` lines under `dir`, after refusing links on the way to it
/// and in it.
fn uncommitted_in(repo: &Repo, root: &Path, dir: &Path) -> Result<Vec<String>, ProvenanceError> {
    walk_inside(root, dir)?;
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_symlink()) {
                return Err(ProvenanceError::Symlink { path: entry.path() });
            }
        }
    }
    // git matches absolute pathspecs against its symlink-resolved top level.
    let abs = match root.canonicalize() {
        Ok(r) => r.join(dir.strip_prefix(root).unwrap_or(dir)),
        Err(_) => dir.to_path_buf(),
    };
    Ok(repo.changes_under(&abs)?)
}

/// `required_plugins` of the environment: each must be installed. Runs
/// before any plugin does.
pub fn check_required(
    plugins: &PluginSet,
    env_name: &str,
    env: &Environment,
    dir: &Path,
) -> Result<(), ProvenanceError> {
    let missing: Vec<&str> = env
        .required_plugins
        .iter()
        .filter(|name| !plugins.plugins.iter().any(|p| &p.name == *name))
        .map(String::as_str)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(ProvenanceError::MissingRequired {
        env: env_name.to_string(),
        missing: missing.join(", "),
        dir: dir.to_path_buf(),
    })
}

/// The configuration a deploy or rollback ran under, for its audit record.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ConfigInForce {
    /// The work tree's HEAD commit.
    pub commit: String,
    /// sha256 (hex) of `pde.toml`'s bytes, which are the committed ones.
    pub sha256: String,
    /// The trust floor in force on this machine, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub floor: Option<FloorInForce>,
}

/// The trust floor a deploy or rollback ran under.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FloorInForce {
    /// The floor file.
    pub path: PathBuf,
    /// sha256 (hex) of its bytes.
    pub sha256: String,
    /// The workspace's signed trust file merged into it, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trust_file: Option<crate::floor::SignedTrustFile>,
}

/// `pde.toml` is a regular file that the commit holds unchanged; returns
/// the commit and the file's digest.
pub fn config_in_force(repo: &Repo, root: &Path) -> Result<ConfigInForce, ProvenanceError> {
    use sha2::Digest as _;
    let path = root.join(crate::config::FILE_NAME);
    check_regular_file(root, &path)?;
    let abs = root
        .canonicalize()
        .map_or_else(|_| path.clone(), |r| r.join(crate::config::FILE_NAME));
    let changes = repo.changes_under(&abs)?;
    if !changes.is_empty() {
        return Err(ProvenanceError::DirtyConfig {
            path,
            changes: changes.join("; "),
        });
    }
    let bytes = std::fs::read(&path).map_err(|_| ProvenanceError::NotRegular { path })?;
    Ok(ConfigInForce {
        commit: repo.head_commit()?,
        sha256: hex::encode(sha2::Sha256::digest(&bytes)),
        floor: None,
    })
}

/// The policy file and the plugins directory are what the commit holds.
pub fn check(
    repo: &Repo,
    root: &Path,
    policy_path: &Path,
    plugins_dir: &Path,
) -> Result<(), ProvenanceError> {
    check_regular_file(root, policy_path)?;
    check_approvals_dir(repo, root, &policy_path.with_extension("approvals"))?;
    check_plugins_dir(repo, root, plugins_dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_and_escapes_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("x.json"), "{}").unwrap();
        std::fs::create_dir(root.join("policies")).unwrap();
        std::fs::write(root.join("policies/1.json"), "{}").unwrap();
        check_regular_file(root, &root.join("policies/1.json")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("x.json"), root.join("policies/2.json"))
            .unwrap();
        let e = check_regular_file(root, &root.join("policies/2.json")).unwrap_err();
        assert!(matches!(e, ProvenanceError::Symlink { .. }), "{e}");
        assert_eq!(e.exit_code(), ExitCode::Usage);
        std::os::unix::fs::symlink(outside.path(), root.join("linked")).unwrap();
        let e = check_regular_file(root, &root.join("linked/x.json")).unwrap_err();
        assert!(matches!(e, ProvenanceError::Symlink { ref path } if path.ends_with("linked")));
        let e = check_regular_file(root, &root.join("policies/../../x.json")).unwrap_err();
        assert!(matches!(e, ProvenanceError::Outside { .. }), "{e}");
        let e = check_regular_file(root, &root.join("policies")).unwrap_err();
        assert!(matches!(e, ProvenanceError::NotRegular { .. }), "{e}");
    }
}
