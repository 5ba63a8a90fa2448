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
}

/// One line of the audit log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Position in the log, from 1.
    pub seq: u64,
    /// RFC 3339 UTC time of the append.
    pub ts: String,
    /// Who ran pde (`$PDE_ACTOR`, else `$USER`, else `unknown`).
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

/// The actor recorded in audit records: `$PDE_ACTOR`, else `$USER`, else `unknown`.
pub fn default_actor() -> String {
    ["PDE_ACTOR", "USER"]
        .iter()
        .filter_map(|v| std::env::var(v).ok())
        .find(|v| !v.trim().is_empty())
        .unwrap_or_else(|| "unknown".to_string())
}

/// Chains `entries` after `last`: the records and their canonical lines
/// (without `\n`). The one place a record is built and hashed.
pub(super) fn chain(
    last: Option<AuditRecord>,
    actor: &str,
    entries: Vec<AuditEntry>,
) -> (Vec<AuditRecord>, Vec<Vec<u8>>) {
    let (mut seq, mut prev) = last.map_or((1, String::new()), |r| (r.seq + 1, r.hash));
    let ts = pde_core::clock::now_rfc3339();
    let mut lines = Vec::with_capacity(entries.len());
    let mut written = Vec::with_capacity(entries.len());
    for mut entry in entries {
        redact(&mut entry.data);
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
