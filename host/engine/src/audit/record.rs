//! What one audit record is, and how records are built, hashed and chained
//! (DESIGN §8). The one place a record's bytes are made, whatever stores them.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::error::AuditError;
use crate::bundle::canonical_json;

/// What happened. Serialized in snake_case exactly as DESIGN §8 lists them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Event {
    /// A deploy began.
    DeployStart,
    /// The policy passed validation.
    Validated,
    /// The policy failed validation.
    ValidationFailed,
    /// The bundle was built and signed.
    Packaged,
    /// Every target service is healthy.
    EnvCheckOk,
    /// A target service is unhealthy; nothing was pushed.
    EnvCheckFailed,
    /// Routers picked the target services.
    Routed,
    /// One service took the bundle.
    Pushed,
    /// One service did not take the bundle.
    PushFailed,
    /// A service was sent back to its previous bundle.
    RolledBack,
    /// The release tag was created (or already present).
    Tagged,
    /// The deploy ended `deployed`.
    Deployed,
    /// The deploy ended in any other way.
    DeployFailed,
    /// `pde unlock` cleared a deploy lease left by a holder that died
    /// (an addition of issue 12).
    Unlocked,
    /// A progressive rollout began (issue 22): its waves.
    RolloutStarted,
    /// One wave of a rollout was pushed and verified.
    WavePushed,
    /// A rollout gate was evaluated: query, values, verdict.
    GateEvaluated,
    /// A rollout stopped at a `pause` for a person.
    RolloutPaused,
    /// A person promoted a paused rollout (the record's actor).
    RolloutPromoted,
    /// A person aborted a rollout (the record's actor).
    RolloutAborted,
    /// A rollout whose process died was resumed.
    RolloutResumed,
    /// A rollout ended: its outcome.
    RolloutFinished,
}

/// One line of the audit log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Position in the log, from 1.
    pub seq: u64,
    /// RFC 3339 UTC time of the append.
    pub ts: String,
    /// Who ran pde ([`default_actor`]).
    pub actor: String,
    /// What happened.
    pub event: Event,
    /// The policy concerned.
    pub policy_id: String,
    /// The environment concerned.
    pub env: String,
    /// Step details. Never secrets.
    pub data: Value,
    /// `hash` of the previous record, `""` for the first.
    pub prev: String,
    /// sha256 (lowercase hex) of the canonical JSON of this record without `hash`.
    pub hash: String,
}

/// One record to append with [`AuditLog::append_all`](super::AuditLog::append_all).
#[derive(Debug, Clone, PartialEq)]
pub struct AuditEntry {
    /// What happened.
    pub event: Event,
    /// The policy concerned.
    pub policy_id: String,
    /// The environment concerned.
    pub env: String,
    /// Step details. Never secrets.
    pub data: Value,
}

/// The head record: `{seq, hash}` of the last record, signed once a
/// workspace key is set. Stored as JSON beside the chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Head {
    pub(super) seq: u64,
    pub(super) hash: String,
    /// Signature by the workspace signing key over [`head_message`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) sig: Option<crate::keys::Signature>,
}

impl Head {
    /// The head naming `last`, signed with `key` when there is one.
    pub(super) fn of(last: &AuditRecord, key: Option<&ed25519_dalek::SigningKey>) -> Head {
        Head {
            seq: last.seq,
            hash: last.hash.clone(),
            sig: key.map(|k| crate::keys::sign(k, &head_message(last.seq, &last.hash))),
        }
    }

    /// The stored head `json`, parsed; `location` names it in the error.
    pub(super) fn parse(json: Option<&[u8]>, location: &str) -> Result<Option<Head>, AuditError> {
        json.map(|j| {
            serde_json::from_slice(j).map_err(|e| AuditError::Tampered {
                line: 0,
                seq: None,
                reason: format!("{location} is not a valid head record: {e}"),
            })
        })
        .transpose()
    }

    /// The head's stored JSON.
    pub(super) fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a head record serialises")
    }
}

/// What the head signature covers.
pub(super) fn head_message(seq: u64, hash: &str) -> Vec<u8> {
    format!("pde.audit.head/v1\nseq: {seq}\nhash: {hash}\n").into_bytes()
}

/// The policy repository whose Git identity names the actor when the
/// environment does not; the last workspace an engine opened.
static ACTOR_REPOSITORY: std::sync::Mutex<Option<std::path::PathBuf>> = std::sync::Mutex::new(None);

/// Tells [`default_actor`] which policy repository's Git identity to fall
/// back on (called when an engine opens a workspace).
pub fn set_actor_repository(root: &std::path::Path) {
    if let Ok(mut repo) = ACTOR_REPOSITORY.lock() {
        *repo = Some(root.to_path_buf());
    }
}

/// The actor recorded in audit records, history and locks: `$PDE_ACTOR`,
/// else `$USER`, else the policy repository's Git `user.email`, else the
/// name of the OS user running pde (looked up from the uid, not the
/// environment). Containers and CI jobs often set neither variable, and
/// "unknown" there would make every record anonymous; if even the uid has
/// no name, the actor says why it is unknown.
pub fn default_actor() -> String {
    let repo = ACTOR_REPOSITORY.lock().ok().and_then(|r| r.clone());
    resolve_actor(|name| std::env::var(name).ok(), repo.as_deref())
}

fn resolve_actor(env: impl Fn(&str) -> Option<String>, repo: Option<&std::path::Path>) -> String {
    if let Some(name) = ["PDE_ACTOR", "USER"]
        .into_iter()
        .filter_map(&env)
        .find(|v| !v.trim().is_empty())
    {
        return name;
    }
    if let Some(email) = repo
        .and_then(|r| crate::vcs::Repo::discover(r).ok())
        .and_then(|r| r.user_email())
    {
        return email;
    }
    match whoami::username() {
        Ok(user) if !user.trim().is_empty() => user,
        _ => "unknown (no $PDE_ACTOR or $USER, no Git user.email, no user name for this uid)"
            .to_string(),
    }
}

/// The member of a record's `data` naming the database role that wrote
/// it, for a chain kept in PostgreSQL. DESIGN §8 fixes the record's
/// top-level members, and `data` is the step's details, so this is where
/// it goes: one more member of `data`, covered by the hash like the rest.
pub const DB_ROLE_FIELD: &str = "actor_db_role";

/// Chains `entries` after `last`: the records and their canonical lines
/// (without `\n`). The one place a record is built and hashed. `db_role`,
/// the database role appending (a PostgreSQL chain), goes into each
/// record's `data` as [`DB_ROLE_FIELD`].
pub(super) fn chain(
    last: Option<AuditRecord>,
    actor: &str,
    db_role: Option<&str>,
    entries: Vec<AuditEntry>,
) -> (Vec<AuditRecord>, Vec<Vec<u8>>) {
    let (mut seq, mut prev) = last.map_or((1, String::new()), |r| (r.seq + 1, r.hash));
    let ts = pde_core::clock::now_rfc3339();
    let mut lines = Vec::with_capacity(entries.len());
    let mut written = Vec::with_capacity(entries.len());
    for mut entry in entries {
        redact(&mut entry.data);
        // Every step records an object; anything else is kept as it is.
        if let (Some(role), Value::Object(map)) = (db_role, &mut entry.data) {
            map.insert(DB_ROLE_FIELD.into(), Value::String(role.to_string()));
        }
        let mut record = AuditRecord {
            seq,
            ts: ts.clone(),
            actor: actor.to_string(),
            event: entry.event,
            policy_id: entry.policy_id,
            env: entry.env,
            data: entry.data,
            prev,
            hash: String::new(),
        };
        let mut value = serde_json::to_value(&record).expect("audit record serialises");
        record.hash = hash_of(&mut value);
        value["hash"] = Value::String(record.hash.clone());
        lines.push(canonical_json(&value));
        seq += 1;
        prev = record.hash.clone();
        written.push(record);
    }
    (written, lines)
}

/// Hash of a record value, computed without its `hash` field.
pub(super) fn hash_of(value: &mut Value) -> String {
    let obj = value.as_object_mut().expect("records are objects");
    let saved = obj.remove("hash");
    let hash = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(canonical_json(
        value,
    )));
    if let Some(saved) = saved {
        value["hash"] = saved;
    }
    hash
}

/// Lines of the log without their `\n`; a torn last line is included.
pub(super) fn lines(bytes: &[u8]) -> impl Iterator<Item = &[u8]> {
    let trimmed = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    trimmed
        .split(|b| *b == b'\n')
        .filter(move |_| !bytes.is_empty())
}

const SECRET_FIELDS: [&str; 6] = [
    "token",
    "authorization",
    "password",
    "secret",
    "private_key",
    "signing_key",
];

/// Replaces the values of secret-looking fields, at any depth.
fn redact(value: &mut Value) {
    match value {
        Value::Object(map) => {
            for (k, v) in map.iter_mut() {
                let k = k.to_ascii_lowercase();
                if SECRET_FIELDS
                    .iter()
                    .any(|s| k == *s || k.ends_with(&format!("_{s}")))
                {
                    *v = Value::String("[redacted]".into());
                } else {
                    redact(v);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(redact),
        _ => {}
    }
}

#[cfg(test)]
mod actor_tests {
    use super::resolve_actor;

    #[test]
    fn the_actor_falls_back_to_git_then_to_the_os_user_never_to_a_bare_unknown() {
        let none = |_: &str| None;
        let dir = tempfile::tempdir().unwrap();
        let git = |args: &[&str]| {
            let ok = std::process::Command::new("git")
                .arg("-C")
                .arg(dir.path())
                .args(args)
                .status()
                .unwrap()
                .success();
            assert!(ok, "git {args:?}");
        };
        git(&["init", "-q"]);
        git(&["config", "user.email", "rel.eng@agency.example"]);
        assert_eq!(
            resolve_actor(none, Some(dir.path())),
            "rel.eng@agency.example"
        );
        let env = |name: &str| (name == "USER").then(|| "alice".to_string());
        assert_eq!(resolve_actor(env, Some(dir.path())), "alice");
        let blank = |name: &str| (name == "PDE_ACTOR").then(|| "  ".to_string());
        assert_eq!(
            resolve_actor(blank, Some(dir.path())),
            "rel.eng@agency.example"
        );
        // Outside any repository: the OS user of this uid (root in CI).
        let os_user = resolve_actor(none, None);
        assert_eq!(os_user, whoami::username().unwrap());
        assert_ne!(os_user, "unknown");
    }
}
