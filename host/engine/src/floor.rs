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
//!
//! **A signed trust file in the repository.** The security team may keep
//! its gates and keys where policy authors can read and propose changes to
//! them, as `pde-trust.toml` in the workspace, signed with its key
//! (`pde trust sign`, `pde-trust.toml.sig`). The key that verifies it comes
//! from outside the repository: the machine floor's `[trust_file] keys`.
//! When the machine floor names it, the file must be there and verify, or
//! every command that evaluates an environment refuses (exit 6); editing it
//! breaks the signature. Its gates and keys are added to the machine floor's
//! (the tighter of each gate holds). Keys in it are written inline (`key =
//! "<hex>"`), since a key file beside it would not be covered by the
//! signature.

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
    /// The repository's signed trust file is missing, or its signature
    /// does not verify with the machine floor's `[trust_file] keys`.
    #[error(
        "trust file {path}: {why}; the trust floor {floor} requires it signed by the security \
         team (`pde trust sign {path} --key FILE`)"
    )]
    TrustFile {
        /// The workspace's trust file.
        path: PathBuf,
        /// The machine floor that requires it.
        floor: PathBuf,
        /// What is wrong.
        why: String,
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
            FloorError::Lowered { .. } | FloorError::TrustFile { .. } => ExitCode::Integrity,
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
    /// The public key itself (64 hex digits), instead of `file`; the only
    /// form a signed trust file accepts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
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
    /// The workspace's signed trust file, and the keys that may sign it
    /// (machine floor only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust_file: Option<TrustFileSetting>,
    /// The signed trust file merged in, if any.
    #[serde(skip)]
    pub signed: Option<SignedTrustFile>,
}

/// `[trust_file]` of a machine floor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustFileSetting {
    /// Where the file is, relative to the workspace root.
    #[serde(default = "default_trust_file")]
    pub path: PathBuf,
    /// The security team's keys whose signature makes it count.
    pub keys: Vec<KeyEntry>,
}

fn default_trust_file() -> PathBuf {
    PathBuf::from(TRUST_FILE)
}

/// The default name of the workspace's signed trust file.
pub const TRUST_FILE: &str = "pde-trust.toml";
/// The format of a trust file's signature.
pub const TRUST_SIGNATURE_FORMAT: &str = "pde.trust-signature/v1";

/// A signed trust file that was merged into the floor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SignedTrustFile {
    /// The file.
    pub path: PathBuf,
    /// sha256 (hex) of its bytes.
    pub sha256: String,
    /// Who signed it, as the signature records.
    pub signer: String,
    /// The key that signed it.
    pub keyid: String,
}

/// `<file>.sig`: who signed a trust file, over its sha256.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustSignature {
    /// Always [`TRUST_SIGNATURE_FORMAT`].
    pub format: String,
    /// sha256 (hex) of the trust file's bytes.
    pub sha256: String,
    /// Who signed (a person or team).
    pub signer: String,
    /// When, RFC 3339 UTC.
    pub signed_at: String,
    /// The signing key's id.
    pub keyid: String,
    /// Always `ed25519`.
    pub alg: String,
    /// Standard base64 ed25519 signature over the canonical JSON of every
    /// other field.
    pub sig: String,
}

impl TrustSignature {
    fn message(&self) -> Vec<u8> {
        pde_core::canonical::canonical_json(&serde_json::json!({
            "format": self.format, "sha256": self.sha256, "signer": self.signer,
            "signed_at": self.signed_at, "keyid": self.keyid, "alg": self.alg,
        }))
    }
}

/// Where the signature of trust file `path` lives.
pub fn trust_sig_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".sig");
    PathBuf::from(name)
}

/// Signs the trust file at `path` with `key` as `signer`; writes and
/// returns `<path>.sig`. The file must parse as a trust file whose keys are
/// inline.
pub fn sign_trust_file(
    path: &Path,
    key: &ed25519_dalek::SigningKey,
    signer: &str,
) -> Result<(PathBuf, TrustSignature), FloorError> {
    use sha2::Digest as _;
    let (bytes, _) = read_trust_file(path)?;
    let mut sig = TrustSignature {
        format: TRUST_SIGNATURE_FORMAT.to_string(),
        sha256: hex::encode(sha2::Sha256::digest(&bytes)),
        signer: signer.to_string(),
        signed_at: pde_core::clock::now_rfc3339(),
        keyid: pde_core::keys::key_id(&key.verifying_key()),
        alg: "ed25519".to_string(),
        sig: String::new(),
    };
    sig.sig = pde_core::keys::sign(key, &sig.message()).sig;
    let out = trust_sig_path(path);
    let text = serde_json::to_string_pretty(&sig).unwrap_or_default() + "\n";
    std::fs::write(&out, text).map_err(|source| FloorError::Read {
        path: out.clone(),
        source,
    })?;
    Ok((out, sig))
}

/// Reads a trust file meant for signing: a floor whose keys are all inline
/// and which names no `[trust_file]` of its own.
fn read_trust_file(path: &Path) -> Result<(Vec<u8>, Floor), FloorError> {
    let bytes = std::fs::read(path).map_err(|source| FloorError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let parse = |message: String| FloorError::Parse {
        path: path.to_path_buf(),
        message,
    };
    let text = std::str::from_utf8(&bytes).map_err(|e| parse(e.to_string()))?;
    let floor: Floor = toml::from_str(text).map_err(|e| parse(e.to_string()))?;
    if floor.trust_file.is_some() {
        return Err(parse(
            "a trust file cannot name another [trust_file]".into(),
        ));
    }
    for e in floor.plugin_keys.iter().chain(&floor.approver_keys) {
        if e.key.is_none() || e.file.is_some() {
            return Err(parse(format!(
                "key of {} must be written inline (key = \"<64 hex digits>\"), not as a file: \
                 a key file beside a signed trust file is not covered by its signature",
                e.name
            )));
        }
        crate::config::valid_on(e.expires.as_deref(), today())
            .map_err(|m| parse(format!("key of {}: {m}", e.name)))?;
    }
    Ok((bytes, floor))
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

    /// The floor for the workspace at `root`: the machine's, with the
    /// workspace's signed trust file merged in when the machine floor
    /// names one.
    pub fn load_for(root: &Path) -> Result<Option<Floor>, FloorError> {
        let Some(mut floor) = Floor::load()? else {
            return Ok(None);
        };
        if let Some(setting) = floor.trust_file.clone() {
            floor.merge_signed(&root.join(&setting.path), &setting.keys)?;
        }
        Ok(Some(floor))
    }

    /// Verifies the trust file at `path` with `keys` (unexpired, resolved
    /// from this floor's directory) and adds its gates and keys.
    fn merge_signed(&mut self, path: &Path, keys: &[KeyEntry]) -> Result<(), FloorError> {
        use sha2::Digest as _;
        let refuse = |why: String| FloorError::TrustFile {
            path: path.to_path_buf(),
            floor: self.path.clone(),
            why,
        };
        if !path.is_file() {
            return Err(refuse("missing".into()));
        }
        let (bytes, signed) = read_trust_file(path)?;
        let sig_path = trust_sig_path(path);
        let text = std::fs::read_to_string(&sig_path)
            .map_err(|e| refuse(format!("no signature {}: {e}", sig_path.display())))?;
        let sig: TrustSignature = serde_json::from_str(&text)
            .map_err(|e| refuse(format!("{} is not a signature: {e}", sig_path.display())))?;
        let actual = hex::encode(sha2::Sha256::digest(&bytes));
        if sig.format != TRUST_SIGNATURE_FORMAT || sig.sha256 != actual {
            return Err(refuse(format!(
                "edited after {} signed it (sha256 {actual}, signed {})",
                sig.signer, sig.sha256
            )));
        }
        let mut trusted = TrustedKeys::new();
        for entry in keys.iter().filter(|e| e.valid_on(today())) {
            trusted.add(self.key(entry)?);
        }
        let signature = pde_core::keys::Signature {
            keyid: sig.keyid.clone(),
            alg: sig.alg.clone(),
            sig: sig.sig.clone(),
        };
        trusted
            .verify(&sig.message(), &signature)
            .map_err(|e| refuse(format!("signature by {:?}: {e}", sig.signer)))?;
        self.plugin_keys.extend(signed.plugin_keys);
        self.approver_keys.extend(signed.approver_keys);
        for (name, gates) in signed.environments {
            let mine = self.environments.entry(name.clone()).or_default();
            mine.min_approvals = mine.min_approvals.max(gates.min_approvals);
            union(&mut mine.required_roles, gates.required_roles);
            union(&mut mine.required_plugins, gates.required_plugins);
            mine.require_signed_plugins |= gates.require_signed_plugins;
            mine.require_signed_approvals |= gates.require_signed_approvals;
            match (&mine.promote_from, gates.promote_from) {
                (_, None) => {}
                (None, Some(from)) => mine.promote_from = Some(from),
                (Some(a), Some(b)) if *a == b => {}
                (Some(a), Some(b)) => {
                    return Err(refuse(format!(
                        "environment {name}: promote_from {b:?} disagrees with the machine \
                         floor's {a:?}"
                    )));
                }
            }
        }
        self.signed = Some(SignedTrustFile {
            path: path.to_path_buf(),
            sha256: actual,
            signer: sig.signer,
            keyid: sig.keyid,
        });
        Ok(())
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
        let trust_file_keys = floor.trust_file.iter().flat_map(|t| &t.keys);
        for entry in floor
            .plugin_keys
            .iter()
            .chain(&floor.approver_keys)
            .chain(trust_file_keys)
        {
            let parse = |message: String| FloorError::Parse {
                path: path.to_path_buf(),
                message: format!("key of {}: {message}", entry.name),
            };
            if entry.file.is_some() == entry.key.is_some() {
                return Err(parse("give exactly one of `file` and `key`".into()));
            }
            crate::config::valid_on(entry.expires.as_deref(), today()).map_err(parse)?;
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
            trusted.add_named(self.key(entry)?, entry.name.clone());
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

    /// The public key of `entry`: inline, or its file beside the floor.
    pub fn key(&self, entry: &KeyEntry) -> Result<ed25519_dalek::VerifyingKey, FloorError> {
        let malformed = || FloorError::Parse {
            path: self.path.clone(),
            message: format!("key of {} is not an ed25519 public key", entry.name),
        };
        if let Some(text) = &entry.key {
            let bytes: [u8; 32] = hex::decode(text.trim())
                .ok()
                .and_then(|b| b.try_into().ok())
                .ok_or_else(malformed)?;
            return ed25519_dalek::VerifyingKey::from_bytes(&bytes).map_err(|_| malformed());
        }
        let Some(file) = &entry.file else {
            return Err(malformed());
        };
        let dir = self.path.parent().unwrap_or(Path::new("."));
        pde_core::keys::load_public_key(&dir.join(file)).map_err(|source| FloorError::Key {
            path: self.path.clone(),
            source,
        })
    }
}

/// Adds to `mine` each of `more` it lacks.
fn union(mine: &mut Vec<String>, more: Vec<String>) {
    for m in more {
        if !mine.contains(&m) {
            mine.push(m);
        }
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
            file: Some("k.pub".into()),
            key: None,
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
            trust_file: None,
            signed: None,
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
