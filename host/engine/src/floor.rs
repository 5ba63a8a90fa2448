//! The security team's floor: the gates and trusted keys of each
//! environment, held **outside** the policy repository.
//!
//! `pde.toml` lives where policy authors commit every day, so anyone who can
//! commit could otherwise add their own plugin key, lower `min_approvals` or
//! drop `promote_from` for production. The floor is read from a file the
//! deploying machine (or team) owns: `$PDE_TRUST`, else
//! `/etc/pde/trust.toml` when it exists. With a floor:
//!
//! - `pde.toml` may only **tighten** it: a deploy, plan or validate against
//!   an environment whose `pde.toml` asks for less refuses with exit 6 and
//!   names each gate it tried to lower;
//! - the keys that count are the floor's: a plugin or approver key listed
//!   only in `pde.toml` does not count (a warning names it), and `[trust]
//!   revoked` in `pde.toml` still removes keys, since revoking only tightens;
//! - each key entry names a person or team and may carry an `expires` date,
//!   after which it no longer counts.
//!
//! Without a floor, `pde.toml` is the only source, as before.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use pde_core::approval::Approvers;
use pde_core::keys::{KeyError, TrustedKeys};
use pde_core::{ExitCode, HasExitCode};
use serde::{Deserialize, Serialize};

use crate::config::Environment;

/// The variable that names the floor file.
pub const ENV_VAR: &str = "PDE_TRUST";
/// Where the floor is read from when [`ENV_VAR`] is not set.
pub const DEFAULT_PATH: &str = "/etc/pde/trust.toml";

/// Why the floor cannot be used, or a workspace asks for less than it.
#[derive(Debug, thiserror::Error)]
pub enum FloorError {
    /// The file named by `$PDE_TRUST` (or the default) cannot be read.
    #[error("cannot read the trust floor {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not a floor.
    #[error("trust floor {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong, with line and column.
        message: String,
    },
    /// A key file the floor names cannot be read.
    #[error("trust floor {path}: {source}")]
    Key {
        /// The floor file.
        path: PathBuf,
        /// What is wrong with the key.
        source: KeyError,
    },
    /// `pde.toml` lowers gates the floor sets for an environment.
    #[error(
        "pde.toml lowers the trust floor {path} for environment {env}: {}; pde.toml may only \
         tighten the floor (ask the security team to change the floor instead)",
        .gates.join("; ")
    )]
    Lowered {
        /// The floor file.
        path: PathBuf,
        /// The environment.
        env: String,
        /// Each gate lowered, with both values.
        gates: Vec<String>,
    },
}

impl HasExitCode for FloorError {
    fn exit_code(&self) -> ExitCode {
        match self {
            FloorError::Lowered { .. } => ExitCode::Integrity,
            FloorError::Read { .. } | FloorError::Parse { .. } | FloorError::Key { .. } => {
                ExitCode::Usage
            }
        }
    }
}

/// One trusted key of the floor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyEntry {
    /// Public key file (hex), relative to the floor file's directory.
    pub file: PathBuf,
    /// The person or team the key belongs to.
    pub name: String,
    /// Roles an approver key is trusted for (approver keys only).
    #[serde(default)]
    pub roles: Vec<String>,
    /// The last day (UTC) the key counts, `YYYY-MM-DD`; none: no expiry.
    #[serde(default)]
    pub expires: Option<String>,
}

impl KeyEntry {
    /// Whether the key still counts on `today` (an unreadable expiry is
    /// refused when the floor is read, and never counts).
    pub fn valid_on(&self, today: jiff::civil::Date) -> bool {
        crate::config::valid_on(self.expires.as_deref(), today).unwrap_or(false)
    }
}

/// The floor of one environment: the least any workspace may ask for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvFloor {
    /// Distinct trusted approvals required at least.
    #[serde(default)]
    pub min_approvals: u32,
    /// Roles that must each have approved.
    #[serde(default)]
    pub required_roles: Vec<String>,
    /// Every plugin must carry a valid signature.
    #[serde(default)]
    pub require_signed_plugins: bool,
    /// Only signed approvals count.
    #[serde(default)]
    pub require_signed_approvals: bool,
    /// Plugins that must be installed.
    #[serde(default)]
    pub required_plugins: Vec<String>,
    /// The environment a bundle must have run in first.
    #[serde(default)]
    pub promote_from: Option<String>,
}

/// The floor file: trusted keys and per-environment gates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Floor {
    /// Where it was read from.
    #[serde(skip)]
    pub path: PathBuf,
    /// sha256 (hex) of its bytes, for the audit record.
    #[serde(skip)]
    pub sha256: String,
    /// Keys whose plugin signatures count.
    #[serde(default)]
    pub plugin_keys: Vec<KeyEntry>,
    /// Keys whose approvals count, with their roles.
    #[serde(default)]
    pub approver_keys: Vec<KeyEntry>,
    /// Gates per environment name.
    #[serde(default)]
    pub environments: BTreeMap<String, EnvFloor>,
}

/// Which floor file applies here, and whether it is there.
pub fn locate() -> Option<(PathBuf, bool)> {
    match std::env::var_os(ENV_VAR).filter(|v| !v.is_empty()) {
        // Named explicitly: it must exist.
        Some(path) => Some((PathBuf::from(path), true)),
        None => Path::new(DEFAULT_PATH)
            .is_file()
            .then(|| (PathBuf::from(DEFAULT_PATH), false)),
    }
}

impl Floor {
    /// Reads the floor that applies to this process, if any.
    pub fn load() -> Result<Option<Floor>, FloorError> {
        match locate() {
            Some((path, _)) => Floor::read(&path).map(Some),
            None => Ok(None),
        }
    }

    /// Reads a floor file.
    pub fn read(path: &Path) -> Result<Floor, FloorError> {
        use sha2::Digest as _;
        let bytes = std::fs::read(path).map_err(|source| FloorError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let text = String::from_utf8(bytes.clone()).map_err(|e| FloorError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let mut floor: Floor = toml::from_str(&text).map_err(|e| FloorError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        for entry in floor.plugin_keys.iter().chain(&floor.approver_keys) {
            crate::config::valid_on(entry.expires.as_deref(), today()).map_err(|message| {
                FloorError::Parse {
                    path: path.to_path_buf(),
                    message: format!("key {} of {}: {message}", entry.file.display(), entry.name),
                }
            })?;
        }
        floor.path = path.to_path_buf();
        floor.sha256 = hex::encode(sha2::Sha256::digest(&bytes));
        Ok(floor)
    }

    /// Refuses an environment of `pde.toml` that asks for less than the
    /// floor, naming every gate it lowers.
    pub fn check(&self, env_name: &str, env: &Environment) -> Result<(), FloorError> {
        let Some(floor) = self.environments.get(env_name) else {
            return Ok(());
        };
        let mut gates = Vec::new();
        if env.min_approvals < floor.min_approvals {
            gates.push(format!(
                "min_approvals = {} is below the floor's {}",
                env.min_approvals, floor.min_approvals
            ));
        }
        let missing_roles = missing(&floor.required_roles, &env.required_roles);
        if !missing_roles.is_empty() {
            gates.push(format!("required_roles lacks {}", missing_roles.join(", ")));
        }
        if floor.require_signed_plugins && !env.require_signed_plugins {
            gates.push("require_signed_plugins is off, the floor requires it".into());
        }
        if floor.require_signed_approvals && !env.require_signed_approvals {
            gates.push("require_signed_approvals is off, the floor requires it".into());
        }
        let missing_plugins = missing(&floor.required_plugins, &env.required_plugins);
        if !missing_plugins.is_empty() {
            gates.push(format!(
                "required_plugins lacks {}",
                missing_plugins.join(", ")
            ));
        }
        if let Some(from) = &floor.promote_from
            && env.promote_from.as_ref() != Some(from)
        {
            gates.push(format!(
                "promote_from is {}, the floor requires {from:?}",
                env.promote_from
                    .as_deref()
                    .map_or("not set".to_string(), |f| format!("{f:?}"))
            ));
        }
        if gates.is_empty() {
            return Ok(());
        }
        Err(FloorError::Lowered {
            path: self.path.clone(),
            env: env_name.to_string(),
            gates,
        })
    }

    /// Warns about each key of `listed` (trusted by pde.toml) that the
    /// floor does not list (`floor_keys`): it counts for nothing, and
    /// saying so, naming it, spares anyone wondering why a signature was
    /// ignored.
    pub fn warn_ignored(&self, what: &str, listed: &[String], floor_keys: &[String]) {
        for keyid in listed.iter().filter(|k| !floor_keys.contains(k)) {
            tracing::warn!(
                keyid,
                floor = %self.path.display(),
                "{what} key {keyid} is trusted in pde.toml but not by the trust floor; it does not count"
            );
        }
    }

    /// The floor's plugin keys that count on `today`.
    pub fn plugin_trust(&self, today: jiff::civil::Date) -> Result<TrustedKeys, FloorError> {
        let mut trusted = TrustedKeys::new();
        for entry in self.plugin_keys.iter().filter(|e| e.valid_on(today)) {
            trusted.add(self.key(entry)?);
        }
        Ok(trusted)
    }

    /// The floor's approver keys that count on `today`, with their roles.
    pub fn approvers(&self, today: jiff::civil::Date) -> Result<Approvers, FloorError> {
        let mut approvers = Approvers::new();
        for entry in self.approver_keys.iter().filter(|e| e.valid_on(today)) {
            approvers.add(self.key(entry)?, &entry.roles);
        }
        Ok(approvers)
    }

    fn key(&self, entry: &KeyEntry) -> Result<ed25519_dalek::VerifyingKey, FloorError> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        pde_core::keys::load_public_key(&dir.join(&entry.file)).map_err(|source| FloorError::Key {
            path: self.path.clone(),
            source,
        })
    }
}

/// The entries of `wanted` that `given` lacks.
fn missing(wanted: &[String], given: &[String]) -> Vec<String> {
    wanted
        .iter()
        .filter(|w| !given.contains(w))
        .cloned()
        .collect()
}

/// Today's date in UTC, for key expiry.
pub fn today() -> jiff::civil::Date {
    jiff::Timestamp::now()
        .to_zoned(jiff::tz::TimeZone::UTC)
        .date()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_expired_key_no_longer_counts_and_a_lowered_gate_is_named() {
        let entry = KeyEntry {
            file: "k.pub".into(),
            name: "Security team".into(),
            roles: vec![],
            expires: Some("2026-12-31".into()),
        };
        assert!(entry.valid_on(jiff::civil::date(2026, 12, 31)));
        assert!(!entry.valid_on(jiff::civil::date(2027, 1, 1)));
        let floor = Floor {
            path: "/etc/pde/trust.toml".into(),
            sha256: String::new(),
            plugin_keys: vec![],
            approver_keys: vec![],
            environments: [(
                "production".to_string(),
                EnvFloor {
                    min_approvals: 2,
                    required_roles: vec!["legal".into()],
                    require_signed_plugins: true,
                    promote_from: Some("staging".into()),
                    ..EnvFloor::default()
                },
            )]
            .into(),
        };
        let env: Environment = toml::from_str("min_approvals = 1\n").unwrap();
        let err = floor.check("production", &env).unwrap_err();
        assert_eq!(err.exit_code(), ExitCode::Integrity);
        let msg = err.to_string();
        for gate in [
            "min_approvals",
            "required_roles",
            "require_signed_plugins",
            "promote_from",
        ] {
            assert!(msg.contains(gate), "{gate} not named: {msg}");
        }
        floor.check("dev", &env).unwrap();
    }
}
