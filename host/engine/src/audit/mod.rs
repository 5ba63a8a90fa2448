//! The audit log: an append-only, hash-chained record of every deploy step.
//!
//! Auditors must be able to trust that the log says what happened, so each
//! record is chained to the one before it (DESIGN §5, §8):
//!
//! - the log is JSON lines at `<state>/audit.jsonl`, one record per line, each
//!   line the canonical JSON of `{seq, ts, actor, event, policy_id, env,
//!   data, prev, hash}`;
//! - `seq` starts at 1 and grows by one;
//! - `hash` is the sha256, in lowercase hex, of the canonical JSON of the
//!   record *without* its `hash` field (bare hex, as DESIGN §8 words it, so
//!   an auditor's `sha256sum`-style check compares directly);
//! - `prev` is the previous record's `hash`, and `""` for the first record.
//!
//! A chain alone cannot show that records were cut off the *end*, so pde
//! also keeps `<state>/audit.head` (`{"seq", "hash"}` of the last record),
//! replaced atomically (temp file, fsync, rename) after each append.
//! `verify` checks the whole chain, that the log reaches the head's seq, and
//! that the record there has the head's hash. The log may run *ahead* of the
//! head: a crash between fsyncing a record and renaming the head leaves an
//! older, still valid anchor, so the head's directory entry is not fsynced
//! (one fsync fewer per append).
//!
//! The chain and the head alone prove nothing against someone who rewrites
//! both, or deletes both. So the log is anchored (issue 10):
//! - the head file is signed with the workspace signing key
//!   ([`AuditLog::set_head_key`]), and an append refuses a head whose
//!   signature does not verify, so a forged head is never re-signed;
//! - each release tag records the head `(seq, hash)` at the time of the
//!   deploy, outside the state directory, in Git;
//! - [`AuditLog::verify_anchored`] checks the chain against every such tag and
//!   the head's signature, and an empty log while tags show deploys fails.
//!
//! Someone holding the signing key *and* able to rewrite tags can still
//! rewrite history; the optional HTTP sink copy, forwarded by the [`outbox`], is the defence there.
//!
//! Each append fsyncs the record before returning. Appends
//! are serialized within a process by a mutex and across processes by an
//! exclusive OS lock on the log file, and each append re-reads the tail
//! under that lock, so two `pde` runs never interleave or fork the chain.
//! `append` refuses to extend a log whose tail is torn or does not match
//! the head: the damage must be looked at (`pde audit verify`), not buried.
//!
//! **No secrets in `data`.** Callers must never pass tokens, keys or
//! passwords. As a second line of defence, object fields whose names look
//! like secrets (`token`, `authorization`, `password`, `secret`,
//! `private_key`, `signing_key`, any depth) are replaced by `"[redacted]"`
//! before the record is hashed.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub mod outbox;
pub mod pg_chain;

use pde_core::{ExitCode, HasExitCode};

use crate::bundle::canonical_json;

/// The log file name under the state directory.
pub const LOG_FILE: &str = "audit.jsonl";
/// The head file name under the state directory.
pub const HEAD_FILE: &str = "audit.head";

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

/// One record to append with [`AuditLog::append_all`].
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

/// The result of a successful [`AuditLog::verify`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    /// How many records the log holds.
    pub records: u64,
    /// The hash of the last record, `""` for an empty log.
    pub last_hash: String,
    /// Release tags whose recorded audit head the log was checked against.
    pub anchors_checked: usize,
    /// The head file's signature: `valid`, or why it was not checked.
    pub head_signature: String,
}

/// An outside record of the log's head: a release tag's `audit-seq` and
/// `audit-hash` lines, or just the fact that a release was tagged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Anchor {
    /// Where it comes from, e.g. `tag policy/42/v1.0.0/prod`.
    pub source: String,
    /// The head `(seq, hash)` it records; `None` for a tag made before
    /// tags carried one (it still shows that a deploy happened).
    pub head: Option<(u64, String)>,
}

/// Why the audit log or the sink failed.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The log or head could not be read or written.
    #[error("audit log {path}: {source} (check that the state directory is writable)")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The log is not what pde wrote: edited, cut, reordered or torn.
    #[error("audit log tampered at line {line}{}: {reason}", seq.map(|s| format!(" (seq {s})")).unwrap_or_default())]
    Tampered {
        /// 1-based line of the first bad record (one past the end for a truncation).
        line: u64,
        /// Its sequence number, when known.
        seq: Option<u64>,
        /// What does not check out.
        reason: String,
    },
    /// The log was opened read-only (by a read-only command) and asked to append.
    #[error("audit log {path} is open read-only; this command must not write it")]
    ReadOnly {
        /// The log file.
        path: PathBuf,
    },
    /// The log does not match what is recorded outside it: a release tag's
    /// audit head, or the signature on the head file.
    #[error("audit log does not match its anchors: {reason}")]
    Anchor {
        /// What does not match, and what that means.
        reason: String,
    },
    /// The shared audit chain in the team database could not be read or
    /// written.
    #[error("shared audit chain {location}: {reason}")]
    Shared {
        /// The database URL (never holds a password).
        location: String,
        /// What failed.
        reason: String,
    },
    /// Forwarding to the HTTP sink failed (a warning for callers, never a deploy failure).
    #[error("audit sink {url}: gave up after {attempts} attempt(s): {reason}")]
    Sink {
        /// The sink URL.
        url: String,
        /// Requests made.
        attempts: u32,
        /// The last failure.
        reason: String,
    },
}

impl HasExitCode for AuditError {
    fn exit_code(&self) -> ExitCode {
        match self {
            AuditError::Tampered { .. } | AuditError::Anchor { .. } => ExitCode::Integrity,
            AuditError::Io { .. } | AuditError::ReadOnly { .. } | AuditError::Shared { .. } => {
                ExitCode::Usage
            }
            AuditError::Sink { .. } => ExitCode::DeployFailed,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Head {
    seq: u64,
    hash: String,
    /// Signature by the workspace signing key over [`head_message`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sig: Option<crate::keys::Signature>,
}

/// What the head signature covers.
fn head_message(seq: u64, hash: &str) -> Vec<u8> {
    format!("pde.audit.head/v1\nseq: {seq}\nhash: {hash}\n").into_bytes()
}

/// Where a shared audit chain keeps its lines and head: a team database
/// (issue 12). The lines are exactly the file log's lines and the head is
/// the head file's JSON, so chaining, hashing and verification are the file
/// log's own code.
pub trait ChainStore: Send + Sync + std::fmt::Debug {
    /// Where the chain lives, for messages (never holds a password).
    fn location(&self) -> String;
    /// Every line, in seq order, and the head, read in one snapshot.
    fn snapshot(&self) -> Result<(Vec<String>, Option<String>), AuditError>;
    /// The head alone.
    fn head(&self) -> Result<Option<String>, AuditError>;
    /// The last line and the head, read together (what an append checks),
    /// without reading the whole chain.
    fn tail(&self) -> Result<(Option<String>, Option<String>), AuditError>;
    /// Claims the audit sink's cursor (the seq of the last record the sink
    /// acknowledged) so that no other machine forwards at the same time:
    /// runs `forward` with it and stores what it returns, in one
    /// transaction. `None`: another machine holds the claim right now.
    fn with_sink_cursor(
        &self,
        forward: &mut (dyn FnMut(u64) -> u64 + Send),
    ) -> Result<Option<u64>, AuditError>;
    /// Appends under an exclusive lock on the whole chain: `extend` gets the
    /// last line and the head, and returns the new `(seq, line)`s and the new
    /// head, which are stored in the same transaction.
    #[allow(clippy::type_complexity)]
    fn append(
        &self,
        extend: &mut (
                 dyn FnMut(
            Option<&str>,
            Option<&str>,
        ) -> Result<(Vec<(u64, String)>, String), AuditError>
                     + Send
             ),
    ) -> Result<(), AuditError>;
}

/// The hash-chained audit log of one workspace.
#[derive(Debug)]
pub struct AuditLog {
    /// Set when the chain lives in a shared database instead of the files.
    shared: Option<std::sync::Arc<dyn ChainStore>>,
    path: PathBuf,
    head_path: PathBuf,
    actor: String,
    /// The log opened for read + append (read only for
    /// [`AuditLog::open_read_only`]; `None` when that found no log); the
    /// mutex serializes appends in-process.
    file: Mutex<Option<File>>,
    writable: bool,
    /// Signs the head file after each append, once set; with `true` the
    /// next append may replace a head the key does not verify (adoption,
    /// decided by the caller).
    head_key: Mutex<Option<(ed25519_dalek::SigningKey, bool)>>,
}

/// Releases the OS lock on the log when dropped.
struct FileLockGuard<'a>(&'a File);

impl Drop for FileLockGuard<'_> {
    fn drop(&mut self) {
        let _ = self.0.unlock();
    }
}

/// The actor recorded in audit records: `$PDE_ACTOR`, else `$USER`, else `unknown`.
pub fn default_actor() -> String {
    ["PDE_ACTOR", "USER"]
        .iter()
        .filter_map(|v| std::env::var(v).ok())
        .find(|v| !v.trim().is_empty())
        .unwrap_or_else(|| "unknown".to_string())
}

impl AuditLog {
    /// Opens (creating if needed) `<state_dir>/audit.jsonl`, with the actor
    /// from the environment ([`default_actor`]). Damage is not reported here
    /// but by [`AuditLog::append`] and [`AuditLog::verify`].
    pub fn open(state_dir: &Path) -> Result<AuditLog, AuditError> {
        Self::open_with_actor(state_dir, &default_actor())
    }

    /// Like [`AuditLog::open`] with an explicit actor.
    pub fn open_with_actor(state_dir: &Path, actor: &str) -> Result<AuditLog, AuditError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| AuditError::Io { path, source }
        };
        fs::create_dir_all(state_dir).map_err(io(state_dir))?;
        let path = state_dir.join(LOG_FILE);
        let created = !path.exists();
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .map_err(io(&path))?;
        if created {
            // Make the new file's directory entry durable once; later
            // appends only change its content.
            File::open(state_dir)
                .and_then(|d| d.sync_all())
                .map_err(io(state_dir))?;
        }
        let log = AuditLog {
            shared: None,
            head_path: state_dir.join(HEAD_FILE),
            path,
            actor: actor.to_string(),
            file: Mutex::new(Some(file)),
            writable: true,
            head_key: Mutex::new(None),
        };
        if let Err(e) = log.check_tail() {
            tracing::warn!(error = %e, "audit log is damaged; appends will be refused until it is repaired");
        }
        Ok(log)
    }

    /// Opens `<state_dir>/audit.jsonl` for reading only, creating nothing:
    /// a missing log reads as empty. Appends are refused.
    pub fn open_read_only(state_dir: &Path) -> Result<AuditLog, AuditError> {
        let path = state_dir.join(LOG_FILE);
        let file = match File::open(&path) {
            Ok(f) => Some(f),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(source) => return Err(AuditError::Io { path, source }),
        };
        Ok(AuditLog {
            shared: None,
            head_path: state_dir.join(HEAD_FILE),
            path,
            actor: default_actor(),
            file: Mutex::new(file),
            writable: false,
            head_key: Mutex::new(None),
        })
    }

    /// The chain kept in a shared database (`[state] url`), with the same
    /// records, hashing and checks as the file log. `writable` false refuses
    /// appends, as [`AuditLog::open_read_only`] does.
    pub fn open_shared(store: std::sync::Arc<dyn ChainStore>, writable: bool) -> AuditLog {
        let location = PathBuf::from(store.location());
        AuditLog {
            head_path: location.join(HEAD_FILE),
            path: location,
            actor: default_actor(),
            file: Mutex::new(None),
            writable,
            head_key: Mutex::new(None),
            shared: Some(store),
        }
    }

    /// Signs the head file with `key` from now on. An append then refuses
    /// to extend (and re-sign) a head that `key` does not verify, unless
    /// `adopt` is set: the caller has checked that log against outside
    /// anchors (an unsigned head from an older pde, or a rotated key).
    pub fn set_head_key(&self, key: ed25519_dalek::SigningKey, adopt: bool) {
        *self.head_key.lock().unwrap_or_else(|p| p.into_inner()) = Some((key, adopt));
    }

    /// Checks the head file's signature against `key`; no head is fine.
    pub fn check_head_key(&self, key: &ed25519_dalek::VerifyingKey) -> Result<(), AuditError> {
        match self.read_head()? {
            Some(head) => check_head_signature(&head, key),
            None => Ok(()),
        }
    }

    /// The key id that signed the head file, if it is signed.
    pub fn head_keyid(&self) -> Result<Option<String>, AuditError> {
        Ok(self.read_head()?.and_then(|h| h.sig).map(|s| s.keyid))
    }

    /// The last record's `(seq, hash)`, checked against the head file.
    pub fn last(&self) -> Result<Option<(u64, String)>, AuditError> {
        Ok(self.check_tail()?.map(|r| (r.seq, r.hash)))
    }

    /// The log file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io(&self, path: &Path) -> impl FnOnce(std::io::Error) -> AuditError {
        let path = path.to_path_buf();
        move |source| AuditError::Io { path, source }
    }

    fn check_tail(&self) -> Result<Option<AuditRecord>, AuditError> {
        if let Some(store) = &self.shared {
            let (last, head) = store.tail()?;
            return shared_tail(last.as_deref(), head.as_deref());
        }
        let file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        let Some(file) = file.as_ref() else {
            return self.tail(None);
        };
        file.lock_shared().map_err(self.io(&self.path))?;
        let _guard = FileLockGuard(file);
        self.tail(Some(file))
    }

    /// Appends a record and fsyncs it; returns the record as written.
    /// `data` must not contain secrets (see the module docs).
    pub fn append(
        &self,
        event: Event,
        policy_id: &str,
        env: &str,
        data: Value,
    ) -> Result<AuditRecord, AuditError> {
        let entry = AuditEntry {
            event,
            policy_id: policy_id.to_string(),
            env: env.to_string(),
            data,
        };
        let mut written = self.append_all(vec![entry])?;
        Ok(written.pop().expect("one record per entry"))
    }

    /// Appends several records with one write and one fsync (for example one
    /// `pushed` per target of a wide fan-out); returns them as written, in
    /// order. They are consecutive in the log: no other writer interleaves.
    pub fn append_all(&self, entries: Vec<AuditEntry>) -> Result<Vec<AuditRecord>, AuditError> {
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        if let Some(store) = &self.shared {
            return self.append_shared(store.as_ref(), entries);
        }
        let file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        let file = match file.as_ref() {
            Some(f) if self.writable => f,
            _ => {
                return Err(AuditError::ReadOnly {
                    path: self.path.clone(),
                });
            }
        };
        file.lock().map_err(self.io(&self.path))?;
        let _guard = FileLockGuard(file);
        let mut slot = self.head_key.lock().unwrap_or_else(|p| p.into_inner());
        if let (Some((key, false)), Some(head)) = (slot.as_ref(), self.read_head()?) {
            // Extending (and re-signing) a forged head would launder it.
            check_head_signature(&head, &key.verifying_key())?;
        }
        let key = slot.as_mut().map(|(k, adopt)| {
            *adopt = false;
            k.clone()
        });
        drop(slot);
        let last = self.tail(Some(file))?;
        let (written, lines) = self.chain(last, entries);
        let bytes: Vec<u8> = lines
            .into_iter()
            .flat_map(|mut l| {
                l.push(b'\n');
                l
            })
            .collect();
        // One write: a crash leaves at most a torn tail, which the next
        // append and `verify` detect.
        (&*file).write_all(&bytes).map_err(self.io(&self.path))?;
        file.sync_all().map_err(self.io(&self.path))?;
        let last = written.last().expect("entries is not empty");
        let sig = key.map(|k| crate::keys::sign(&k, &head_message(last.seq, &last.hash)));
        self.write_head(&Head {
            seq: last.seq,
            hash: last.hash.clone(),
            sig,
        })?;
        tracing::debug!(
            last_seq = last.seq,
            count = written.len(),
            "audit records appended"
        );
        Ok(written)
    }

    /// Chains `entries` after `last`: the records and their canonical lines
    /// (without `\n`). The one place a record is built and hashed, for the
    /// file log and the shared chain alike.
    fn chain(
        &self,
        last: Option<AuditRecord>,
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
                actor: self.actor.clone(),
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

    /// [`AuditLog::append_all`] on the shared chain: the same checks of the
    /// tail and the head's signature, inside the store's exclusive lock.
    fn append_shared(
        &self,
        store: &dyn ChainStore,
        entries: Vec<AuditEntry>,
    ) -> Result<Vec<AuditRecord>, AuditError> {
        if !self.writable {
            return Err(AuditError::ReadOnly {
                path: self.path.clone(),
            });
        }
        let mut slot = self.head_key.lock().unwrap_or_else(|p| p.into_inner());
        let mut entries = Some(entries);
        let mut written = Vec::new();
        store.append(&mut |last_line, head_json| {
            let head = parse_head(head_json)?;
            if let (Some((key, false)), Some(head)) = (slot.as_ref(), head.as_ref()) {
                check_head_signature(head, &key.verifying_key())?;
            }
            let key = slot.as_ref().map(|(k, _)| k.clone());
            let last = shared_tail(last_line, head_json)?;
            let (records, lines) = self.chain(last, entries.take().unwrap_or_default());
            let last = records.last().ok_or_else(|| AuditError::Shared {
                location: store.location(),
                reason: "append retried after a failure".into(),
            })?;
            let sig = key.map(|k| crate::keys::sign(&k, &head_message(last.seq, &last.hash)));
            let head = Head {
                seq: last.seq,
                hash: last.hash.clone(),
                sig,
            };
            let head = serde_json::to_string(&head).map_err(|e| AuditError::Shared {
                location: store.location(),
                reason: e.to_string(),
            })?;
            let rows = records
                .iter()
                .zip(lines)
                .map(|(r, l)| (r.seq, String::from_utf8_lossy(&l).into_owned()))
                .collect();
            written = records;
            Ok((rows, head))
        })?;
        if let Some((_, adopt)) = slot.as_mut() {
            *adopt = false;
        }
        tracing::debug!(count = written.len(), "shared audit records appended");
        Ok(written)
    }

    /// The log as stored, after checking it: the bytes `pde audit export`
    /// writes (the file's JSON lines, or the shared chain's, identically).
    pub fn export(&self) -> Result<Vec<u8>, AuditError> {
        self.verify()?;
        Ok(self.snapshot()?.0)
    }

    /// The verified lines (without `\n`) and the head record's JSON, for
    /// moving a chain into a shared database unchanged.
    pub fn export_chain(&self) -> Result<(Vec<String>, Option<String>), AuditError> {
        self.verify()?;
        let (bytes, head) = self.snapshot()?;
        let lines = lines(&bytes)
            .map(|l| String::from_utf8_lossy(l).into_owned())
            .collect();
        let head = head
            .map(|h| serde_json::to_string(&h))
            .transpose()
            .map_err(|e| AuditError::Io {
                path: self.head_path.clone(),
                source: std::io::Error::other(e),
            })?;
        Ok((lines, head))
    }

    /// Stores `lines` and `head` (from [`AuditLog::export_chain`]) as this
    /// shared chain, which must be empty; the records keep their seq,
    /// hashes and head signature, so the chain verifies as before.
    pub fn import_chain(&self, lines: Vec<String>, head: Option<String>) -> Result<(), AuditError> {
        let Some(store) = &self.shared else {
            return Err(AuditError::ReadOnly {
                path: self.path.clone(),
            });
        };
        let location = store.location();
        let Some(head) = head else {
            // An empty file log (no head yet) moves as nothing.
            return self.verify().map(drop);
        };
        let mut rows = Some(lines);
        store.append(&mut |last, current| {
            if last.is_some() || current.is_some() {
                return Err(AuditError::Shared {
                    location: location.clone(),
                    reason: "the shared audit chain is not empty; migrate into a new database"
                        .into(),
                });
            }
            let rows = rows
                .take()
                .unwrap_or_default()
                .into_iter()
                .enumerate()
                .map(|(i, l)| (i as u64 + 1, l))
                .collect();
            Ok((rows, head.clone()))
        })?;
        self.verify().map(drop)
    }

    /// Every record, in order, without checking the chain (see [`AuditLog::verify`]).
    pub fn records(&self) -> Result<Vec<AuditRecord>, AuditError> {
        let (bytes, _) = self.snapshot()?;
        let mut out = Vec::new();
        for (i, line) in lines(&bytes).enumerate() {
            let record = serde_json::from_slice(line).map_err(|e| AuditError::Tampered {
                line: i as u64 + 1,
                seq: None,
                reason: format!("not an audit record: {e}"),
            })?;
            out.push(record);
        }
        Ok(out)
    }

    /// Checks the whole log: every hash, every link, the sequence, a complete
    /// last line, and that the log ends where the head file says. The first
    /// bad record is named in [`AuditError::Tampered`].
    pub fn verify(&self) -> Result<VerifyReport, AuditError> {
        self.verify_chain().map(|(report, _, _)| report)
    }

    /// [`AuditLog::verify`], then the anchors outside the log:
    /// - every anchor's head must be a record of this log, byte for byte
    ///   (its hash covers the whole chain before it);
    /// - a log with no records while anchors show deploys is not intact;
    /// - with `key`, the head file must carry a valid signature by it.
    pub fn verify_anchored(
        &self,
        anchors: &[Anchor],
        key: Option<&ed25519_dalek::VerifyingKey>,
    ) -> Result<VerifyReport, AuditError> {
        let (mut report, hashes, head) = self.verify_chain()?;
        if report.records == 0
            && let Some(a) = anchors.first()
        {
            return Err(AuditError::Anchor {
                reason: format!(
                    "the log is empty, but {} (and {} other anchor(s)) show deploys: the log \
                     and its head were deleted or replaced",
                    a.source,
                    anchors.len() - 1
                ),
            });
        }
        for a in anchors {
            let Some((seq, hash)) = &a.head else { continue };
            match hashes.get(usize::try_from(*seq).unwrap_or(usize::MAX).wrapping_sub(1)) {
                Some(h) if h == hash => report.anchors_checked += 1,
                Some(h) => {
                    return Err(AuditError::Anchor {
                        reason: format!(
                            "{} records audit seq {seq} as {hash}, but the log has {h} there: \
                             the log was rewritten",
                            a.source
                        ),
                    });
                }
                None => {
                    return Err(AuditError::Anchor {
                        reason: format!(
                            "{} records audit seq {seq}, but the log ends at seq {}: records \
                             were deleted",
                            a.source, report.records
                        ),
                    });
                }
            }
        }
        report.head_signature = match (key, head) {
            (None, _) => "not checked: the workspace has no [signing] key".into(),
            (Some(_), None) => "no head yet".into(),
            (Some(key), Some(head)) => {
                check_head_signature(&head, key)?;
                "valid".into()
            }
        };
        Ok(report)
    }

    /// The chain check; also returns every record's hash (index = seq - 1)
    /// and the head file.
    fn verify_chain(&self) -> Result<(VerifyReport, Vec<String>, Option<Head>), AuditError> {
        let (bytes, head) = self.snapshot()?;
        let torn = !bytes.is_empty() && !bytes.ends_with(b"\n");
        let all: Vec<&[u8]> = lines(&bytes).collect();
        let mut last: Option<AuditRecord> = None;
        let mut at_head: Option<String> = None;
        let mut hashes = Vec::new();
        let mut line_no = 0u64;
        for (i, line) in all.iter().enumerate() {
            line_no += 1;
            let expected_seq = last.as_ref().map_or(1, |r| r.seq + 1);
            if torn && i + 1 == all.len() {
                return Err(AuditError::Tampered {
                    line: line_no,
                    seq: Some(expected_seq),
                    reason: "the last line is incomplete: a torn write or a truncated log".into(),
                });
            }
            let record = check_line(line, line_no, expected_seq, last.as_ref())?;
            if head.as_ref().is_some_and(|h| h.seq == record.seq) {
                at_head = Some(record.hash.clone());
            }
            hashes.push(record.hash.clone());
            last = Some(record);
        }
        check_head(last.as_ref(), head.as_ref(), at_head.as_deref(), line_no)?;
        let report = VerifyReport {
            records: last.as_ref().map_or(0, |r| r.seq),
            last_hash: last.map(|r| r.hash).unwrap_or_default(),
            anchors_checked: 0,
            head_signature: "not checked".into(),
        };
        Ok((report, hashes, head))
    }

    /// The log's bytes and the head, read together under a shared lock so
    /// that a concurrent append cannot fall between the two reads.
    fn snapshot(&self) -> Result<(Vec<u8>, Option<Head>), AuditError> {
        if let Some(store) = &self.shared {
            let (lines, head) = store.snapshot()?;
            let mut bytes = Vec::new();
            for line in lines {
                bytes.extend(line.into_bytes());
                bytes.push(b'\n');
            }
            return Ok((bytes, parse_head(head.as_deref())?));
        }
        let file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        let Some(file) = file.as_ref() else {
            return Ok((Vec::new(), self.read_head()?));
        };
        file.lock_shared().map_err(self.io(&self.path))?;
        let _guard = FileLockGuard(file);
        let mut bytes = Vec::new();
        (&*file)
            .seek(SeekFrom::Start(0))
            .and_then(|_| (&*file).read_to_end(&mut bytes))
            .map_err(self.io(&self.path))?;
        Ok((bytes, self.read_head()?))
    }

    /// The last record, checked: complete line, valid hash, consistent with the head.
    fn tail(&self, file: Option<&File>) -> Result<Option<AuditRecord>, AuditError> {
        let (line, start) = match file {
            Some(f) => last_line(f).map_err(self.io(&self.path))?,
            None => (None, 0),
        };
        let head = self.read_head()?;
        let has_line = line.is_some();
        // Errors below carry line numbers relative to the last line (0 = the
        // last line, 1 = one past it); they are made absolute at the end.
        let checked = match line {
            None => check_head(None, head.as_ref(), None, 0).map(|()| None),
            Some(line) => match line.strip_suffix(b"\n") {
                None => Err(AuditError::Tampered {
                    line: 0,
                    seq: None,
                    reason: "the last line is incomplete: a torn write or a truncated log; run `pde audit verify`".into(),
                }),
                Some(line) => check_line(line, 0, 0, None).and_then(|record| {
                    let at_head = head.as_ref().and_then(|h| match record.seq {
                        s if s == h.seq => Some(record.hash.as_str()),
                        s if s == h.seq + 1 => Some(record.prev.as_str()),
                        _ => None,
                    });
                    check_head(Some(&record), head.as_ref(), at_head, 0).map(|()| Some(record))
                }),
            },
        };
        // Line numbers cost a full read; only an error pays for one.
        checked.map_err(|e| match e {
            AuditError::Tampered { line, seq, reason } => {
                let last = if let (true, Some(file)) = (has_line, file) {
                    count_lines(file, start).unwrap_or(0) + 1
                } else {
                    0
                };
                AuditError::Tampered {
                    line: last + line,
                    seq,
                    reason,
                }
            }
            other => other,
        })
    }

    fn read_head(&self) -> Result<Option<Head>, AuditError> {
        if let Some(store) = &self.shared {
            return parse_head(store.head()?.as_deref());
        }
        match fs::read(&self.head_path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|e| AuditError::Tampered {
                        line: 0,
                        seq: None,
                        reason: format!(
                            "{} is not a valid head record: {e}",
                            self.head_path.display()
                        ),
                    })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(AuditError::Io {
                path: self.head_path.clone(),
                source: e,
            }),
        }
    }

    fn write_head(&self, head: &Head) -> Result<(), AuditError> {
        let bytes = serde_json::to_vec(head).map_err(|e| AuditError::Io {
            path: self.head_path.clone(),
            source: std::io::Error::other(e),
        })?;
        pde_core::fsutil::atomic_write(&self.head_path, &bytes).map_err(self.io(&self.head_path))
    }
}

/// The shared chain's head row, parsed.
fn parse_head(json: Option<&str>) -> Result<Option<Head>, AuditError> {
    json.map(|j| {
        serde_json::from_str(j).map_err(|e| AuditError::Tampered {
            line: 0,
            seq: None,
            reason: format!("the shared chain's head is not a valid head record: {e}"),
        })
    })
    .transpose()
}

/// The shared chain's last record, checked against its head as the file
/// log's tail is.
fn shared_tail(
    last_line: Option<&str>,
    head_json: Option<&str>,
) -> Result<Option<AuditRecord>, AuditError> {
    let head = parse_head(head_json)?;
    match last_line {
        None => check_head(None, head.as_ref(), None, 0).map(|()| None),
        Some(line) => {
            let record = check_line(line.as_bytes(), 0, 0, None)?;
            let at_head = head.as_ref().and_then(|h| match record.seq {
                s if s == h.seq => Some(record.hash.as_str()),
                _ => None,
            });
            check_head(Some(&record), head.as_ref(), at_head, 0)?;
            Ok(Some(record))
        }
    }
}

/// The head must carry a valid signature by `key` over its seq and hash.
fn check_head_signature(head: &Head, key: &ed25519_dalek::VerifyingKey) -> Result<(), AuditError> {
    let Some(sig) = &head.sig else {
        return Err(AuditError::Anchor {
            reason: format!(
                "{HEAD_FILE} is not signed by the workspace key: it was replaced, or written \
                 before heads were signed (the next deploy signs it)"
            ),
        });
    };
    let mut trusted = crate::keys::TrustedKeys::new();
    trusted.add(*key);
    trusted
        .verify(&head_message(head.seq, &head.hash), sig)
        .map_err(|e| AuditError::Anchor {
            reason: format!(
                "{HEAD_FILE} (seq {}) does not carry a valid signature by the workspace key \
                 ({e}): the head was forged or the log rewritten",
                head.seq
            ),
        })
}

/// Hash of a record value, computed without its `hash` field.
fn hash_of(value: &mut Value) -> String {
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
fn lines(bytes: &[u8]) -> impl Iterator<Item = &[u8]> {
    let trimmed = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    trimmed
        .split(|b| *b == b'\n')
        .filter(move |_| !bytes.is_empty())
}

/// Checks one line: JSON, self-hash, record shape, and, when `expected_seq`
/// is not 0, the sequence and the link to `prev`.
fn check_line(
    line: &[u8],
    line_no: u64,
    expected_seq: u64,
    prev: Option<&AuditRecord>,
) -> Result<AuditRecord, AuditError> {
    let bad = |seq, reason: String| AuditError::Tampered {
        line: line_no,
        seq,
        reason,
    };
    let mut value: Value = serde_json::from_slice(line).map_err(|e| {
        bad(
            Some(expected_seq).filter(|s| *s > 0),
            format!("not valid JSON ({e}): edited or torn"),
        )
    })?;
    let seq = value.get("seq").and_then(Value::as_u64);
    let claimed = value
        .get("hash")
        .and_then(Value::as_str)
        .map(str::to_string);
    if !value.is_object() || claimed.is_none() {
        return Err(bad(seq, "not an audit record (no hash)".into()));
    }
    let actual = hash_of(&mut value);
    if claimed.as_deref() != Some(actual.as_str()) {
        return Err(bad(
            seq,
            "the hash does not match the content: the record was edited".into(),
        ));
    }
    let record: AuditRecord =
        serde_json::from_value(value).map_err(|e| bad(seq, format!("not an audit record: {e}")))?;
    if expected_seq == 0 {
        return Ok(record);
    }
    if record.seq != expected_seq {
        let reason = if record.seq > expected_seq {
            format!("expected seq {expected_seq}: records before this one were deleted")
        } else {
            format!("expected seq {expected_seq}: records were reordered or duplicated")
        };
        return Err(bad(Some(record.seq), reason));
    }
    let prev_hash = prev.map_or("", |p| p.hash.as_str());
    if record.prev != prev_hash {
        return Err(bad(
            Some(record.seq),
            "prev does not match the hash of the record before it: that record was rewritten, or records were replaced".into(),
        ));
    }
    Ok(record)
}

/// The log must reach the head, and the record at the head's seq must be
/// the one the head names. `at_head` is that record's hash when known
/// (`None`: not visible from here, e.g. an append several records past a
/// head that a crash left behind; `verify` always knows it).
fn check_head(
    last: Option<&AuditRecord>,
    head: Option<&Head>,
    at_head: Option<&str>,
    lines: u64,
) -> Result<(), AuditError> {
    let (last, head) = match (last, head) {
        (None, None) => return Ok(()),
        (Some(last), None) => {
            return Err(AuditError::Tampered {
                line: lines,
                seq: Some(last.seq),
                reason: format!("{HEAD_FILE} is missing: the log's end cannot be confirmed"),
            });
        }
        (last, Some(head)) => (last, head),
    };
    let have = last.map_or(0, |r| r.seq);
    if have < head.seq {
        return Err(AuditError::Tampered {
            line: lines + 1,
            seq: Some(have + 1),
            reason: format!(
                "the log ends at seq {have} but the head records seq {}: records were cut off the end",
                head.seq
            ),
        });
    }
    match at_head {
        Some(hash) if hash != head.hash => Err(AuditError::Tampered {
            line: lines.saturating_sub(have - head.seq),
            seq: Some(head.seq),
            reason: format!(
                "record {} does not match the head ({}): the end of the log was rewritten",
                head.seq, head.hash
            ),
        }),
        _ => Ok(()),
    }
}

/// The last line of `file` including its `\n` (if it has one), and the
/// offset where it starts. Reads backwards in growing chunks.
fn last_line(file: &File) -> std::io::Result<(Option<Vec<u8>>, u64)> {
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok((None, 0));
    }
    let mut chunk = 8 * 1024u64;
    loop {
        let start = len.saturating_sub(chunk);
        let mut buf = vec![0u8; (len - start) as usize];
        let mut reader = file;
        reader.seek(SeekFrom::Start(start))?;
        reader.read_exact(&mut buf)?;
        let body = buf.strip_suffix(b"\n").unwrap_or(&buf);
        if let Some(pos) = body.iter().rposition(|b| *b == b'\n') {
            return Ok((Some(buf[pos + 1..].to_vec()), start + pos as u64 + 1));
        }
        if start == 0 {
            return Ok((Some(buf), 0));
        }
        chunk *= 4;
    }
}

/// Number of `\n` in the first `upto` bytes of `file` (for the line number
/// in error messages only; appends never need it on an intact log).
fn count_lines(file: &File, upto: u64) -> std::io::Result<u64> {
    let mut reader = file;
    reader.seek(SeekFrom::Start(0))?;
    let mut count = 0u64;
    let mut left = upto;
    let mut buf = vec![0u8; 64 * 1024];
    while left > 0 {
        let want = left.min(buf.len() as u64) as usize;
        let n = reader.read(&mut buf[..want])?;
        if n == 0 {
            break;
        }
        count += buf[..n].iter().filter(|b| **b == b'\n').count() as u64;
        left -= n as u64;
    }
    Ok(count)
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
mod tests {
    use super::*;
    use serde_json::json;
    use std::sync::Arc;

    fn log_with(n: u64) -> (tempfile::TempDir, AuditLog) {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open_with_actor(dir.path(), "ana").unwrap();
        for i in 0..n {
            log.append(
                Event::Pushed,
                "42",
                "staging",
                json!({"service": format!("svc-{i}")}),
            )
            .unwrap();
        }
        (dir, log)
    }

    fn read_lines(log: &AuditLog) -> Vec<String> {
        fs::read_to_string(log.path())
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn write_lines(log: &AuditLog, lines: &[String]) {
        fs::write(
            log.path(),
            lines.iter().map(|l| format!("{l}\n")).collect::<String>(),
        )
        .unwrap();
    }

    fn tampered(log: &AuditLog) -> (u64, Option<u64>, String) {
        match log.verify() {
            Err(AuditError::Tampered { line, seq, reason }) => (line, seq, reason),
            other => panic!("expected Tampered, got {other:?}"),
        }
    }

    #[test]
    fn events_serialize_exactly_as_the_contract_names_them() {
        let names: Vec<String> = [
            Event::DeployStart,
            Event::Validated,
            Event::ValidationFailed,
            Event::Packaged,
            Event::EnvCheckOk,
            Event::EnvCheckFailed,
            Event::Routed,
            Event::Pushed,
            Event::PushFailed,
            Event::RolledBack,
            Event::Tagged,
            Event::Deployed,
            Event::DeployFailed,
            Event::Unlocked,
        ]
        .iter()
        .map(|e| {
            serde_json::to_value(e)
                .unwrap()
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
        assert_eq!(
            names,
            [
                "deploy_start",
                "validated",
                "validation_failed",
                "packaged",
                "env_check_ok",
                "env_check_failed",
                "routed",
                "pushed",
                "push_failed",
                "rolled_back",
                "tagged",
                "deployed",
                "deploy_failed",
                "unlocked"
            ]
        );
    }

    #[test]
    fn records_chain_and_verify() {
        let (_dir, log) = log_with(3);
        let records = log.records().unwrap();
        assert_eq!(
            records.iter().map(|r| r.seq).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        assert_eq!(records[0].prev, "");
        assert_eq!(records[1].prev, records[0].hash);
        assert_eq!(records[2].prev, records[1].hash);
        assert!(
            records[0].hash.len() == 64 && records[0].hash.bytes().all(|b| b.is_ascii_hexdigit())
        );
        assert_eq!(records[0].actor, "ana");
        // The hash is the digest of the canonical record without `hash`.
        let mut v = serde_json::to_value(&records[1]).unwrap();
        v.as_object_mut().unwrap().remove("hash");
        assert_eq!(
            hex::encode(<sha2::Sha256 as sha2::Digest>::digest(canonical_json(&v))),
            records[1].hash
        );
        // Each line is the canonical JSON of the record.
        let line = read_lines(&log)[1].clone();
        assert_eq!(
            line.as_bytes(),
            canonical_json(&serde_json::to_value(&records[1]).unwrap())
        );
        let report = log.verify().unwrap();
        assert_eq!(
            report,
            VerifyReport {
                records: 3,
                last_hash: records[2].hash.clone(),
                anchors_checked: 0,
                head_signature: "not checked".into(),
            }
        );
    }

    #[test]
    fn an_empty_log_verifies() {
        let (_dir, log) = log_with(0);
        assert_eq!(
            log.verify().unwrap(),
            VerifyReport {
                records: 0,
                last_hash: String::new(),
                anchors_checked: 0,
                head_signature: "not checked".into(),
            }
        );
    }

    #[test]
    fn the_chain_continues_across_reopen() {
        let (dir, log) = log_with(2);
        drop(log);
        let log = AuditLog::open_with_actor(dir.path(), "bo").unwrap();
        let r = log
            .append(Event::Deployed, "42", "staging", json!({}))
            .unwrap();
        assert_eq!(r.seq, 3);
        assert_eq!(r.actor, "bo");
        assert_eq!(log.verify().unwrap().records, 3);
    }

    #[test]
    fn an_edit_names_the_edited_record() {
        let (_dir, log) = log_with(4);
        let mut lines = read_lines(&log);
        lines[1] = lines[1].replace("svc-1", "svc-X");
        write_lines(&log, &lines);
        let (line, seq, reason) = tampered(&log);
        assert_eq!((line, seq), (2, Some(2)));
        assert!(reason.contains("edited"), "{reason}");
        // And the damaged log is not extended.
        let e = log.append(Event::Deployed, "42", "staging", json!({}));
        assert!(e.is_ok(), "the tail is intact, so appends continue: {e:?}");
        assert_eq!(tampered(&log).0, 2);
    }

    #[test]
    fn an_edit_with_a_recomputed_hash_breaks_the_next_link() {
        let (_dir, log) = log_with(4);
        let mut lines = read_lines(&log);
        let mut v: Value = serde_json::from_str(&lines[1]).unwrap();
        v["data"]["service"] = json!("forged");
        let hash = hash_of(&mut v);
        v["hash"] = json!(hash);
        lines[1] = String::from_utf8(canonical_json(&v)).unwrap();
        write_lines(&log, &lines);
        let (line, seq, reason) = tampered(&log);
        assert_eq!((line, seq), (3, Some(3)));
        assert!(reason.contains("prev"), "{reason}");
    }

    #[test]
    fn a_deletion_names_the_record_after_the_gap() {
        let (_dir, log) = log_with(4);
        let mut lines = read_lines(&log);
        lines.remove(1);
        write_lines(&log, &lines);
        let (line, seq, reason) = tampered(&log);
        assert_eq!((line, seq), (2, Some(3)));
        assert!(reason.contains("deleted"), "{reason}");
    }

    #[test]
    fn a_reordering_is_detected() {
        let (_dir, log) = log_with(4);
        let mut lines = read_lines(&log);
        lines.swap(1, 2);
        write_lines(&log, &lines);
        let (line, seq, _) = tampered(&log);
        assert_eq!((line, seq), (2, Some(3)));
    }

    #[test]
    fn cutting_records_off_the_end_is_detected_by_the_head() {
        let (_dir, log) = log_with(4);
        let mut lines = read_lines(&log);
        lines.truncate(2);
        write_lines(&log, &lines);
        let (line, seq, reason) = tampered(&log);
        assert_eq!((line, seq), (3, Some(3)));
        assert!(reason.contains("cut off"), "{reason}");
        // Appending would hide the cut, so it is refused.
        let e = log
            .append(Event::Deployed, "42", "staging", json!({}))
            .unwrap_err();
        assert!(matches!(e, AuditError::Tampered { line: 3, .. }), "{e}");
        assert_eq!(e.exit_code(), ExitCode::Integrity);
        // Emptying the log is a truncation too.
        write_lines(&log, &[]);
        assert_eq!(tampered(&log).1, Some(1));
    }

    #[test]
    fn a_torn_tail_is_detected_and_blocks_appends() {
        let (_dir, log) = log_with(3);
        let bytes = fs::read(log.path()).unwrap();
        fs::write(log.path(), &bytes[..bytes.len() - 10]).unwrap();
        let (line, seq, reason) = tampered(&log);
        assert_eq!((line, seq), (3, Some(3)));
        assert!(reason.contains("incomplete"), "{reason}");
        let e = log
            .append(Event::Deployed, "42", "staging", json!({}))
            .unwrap_err();
        assert!(matches!(e, AuditError::Tampered { line: 3, .. }), "{e}");
    }

    #[test]
    fn truncation_in_the_middle_names_the_cut_line() {
        let (_dir, log) = log_with(5);
        let bytes = fs::read(log.path()).unwrap();
        let lines = read_lines(&log);
        let cut = lines[0].len() + 1 + lines[1].len() / 2;
        fs::write(log.path(), &bytes[..cut]).unwrap();
        let (line, seq, _) = tampered(&log);
        assert_eq!((line, seq), (2, Some(2)));
    }

    #[test]
    fn a_log_ahead_of_its_head_verifies_but_a_wrong_head_does_not() {
        let (dir, log) = log_with(2);
        let head = dir.path().join(HEAD_FILE);
        let old = fs::read(&head).unwrap();
        log.append(Event::Pushed, "42", "staging", json!({}))
            .unwrap();
        log.append(Event::Pushed, "42", "staging", json!({}))
            .unwrap();
        // As if a crash had lost the last head renames.
        fs::write(&head, &old).unwrap();
        assert_eq!(log.verify().unwrap().records, 4);
        let next = log
            .append(Event::Deployed, "42", "staging", json!({}))
            .unwrap();
        assert_eq!(next.seq, 5);
        // A head naming another record at its seq means the log was rewritten.
        let records = log.records().unwrap();
        let forged = json!({"seq": 3, "hash": records[1].hash});
        fs::write(&head, forged.to_string()).unwrap();
        let (line, seq, reason) = tampered(&log);
        assert_eq!((line, seq), (3, Some(3)));
        assert!(reason.contains("rewritten"), "{reason}");
    }

    #[test]
    fn a_batch_is_one_consecutive_chained_run() {
        let (_dir, log) = log_with(1);
        let entry = |svc: &str| AuditEntry {
            event: Event::Pushed,
            policy_id: "42".into(),
            env: "prod".into(),
            data: json!({"service": svc, "token": "t0k"}),
        };
        let written = log
            .append_all(vec![entry("a"), entry("b"), entry("c")])
            .unwrap();
        assert_eq!(
            written.iter().map(|r| r.seq).collect::<Vec<_>>(),
            vec![2, 3, 4]
        );
        assert_eq!(written[1].prev, written[0].hash);
        assert_eq!(written[2].data["token"], "[redacted]");
        assert_eq!(log.records().unwrap()[1..], written[..]);
        assert_eq!(log.verify().unwrap().last_hash, written[2].hash);
        assert!(log.append_all(vec![]).unwrap().is_empty());
    }

    #[test]
    fn anchors_and_a_signed_head_catch_deletion_and_rewrites() {
        let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
        let (dir, log) = log_with(0);
        log.set_head_key(key.clone(), false);
        for i in 0..4 {
            log.append(Event::Pushed, "42", "prod", json!({"i": i}))
                .unwrap();
        }
        let (seq, hash) = log.last().unwrap().unwrap();
        assert_eq!(seq, 4);
        let anchor = Anchor {
            source: "tag policy/42/v1.0.0/prod".into(),
            head: Some((3, log.records().unwrap()[2].hash.clone())),
        };
        let vk = key.verifying_key();
        let report = log
            .verify_anchored(std::slice::from_ref(&anchor), Some(&vk))
            .unwrap();
        assert_eq!(
            (report.anchors_checked, report.head_signature.as_str()),
            (1, "valid")
        );
        assert_eq!(report.last_hash, hash);

        // Both files deleted: the tag still shows a deploy.
        let saved = (
            fs::read(log.path()).unwrap(),
            fs::read(dir.path().join(HEAD_FILE)).unwrap(),
        );
        fs::write(log.path(), "").unwrap();
        fs::remove_file(dir.path().join(HEAD_FILE)).unwrap();
        let e = log
            .verify_anchored(std::slice::from_ref(&anchor), Some(&vk))
            .unwrap_err();
        assert!(matches!(e, AuditError::Anchor { .. }), "{e}");
        assert_eq!(e.exit_code(), ExitCode::Integrity);
        let old_tag = Anchor {
            head: None,
            ..anchor.clone()
        };
        assert!(log.verify_anchored(&[old_tag], None).is_err());
        assert!(
            log.verify_anchored(&[], None).is_ok(),
            "no anchors, nothing to contradict"
        );

        // A rewritten chain with a fresh head: consistent, but not the tagged one.
        let other = tempfile::tempdir().unwrap();
        let forged = AuditLog::open_with_actor(other.path(), "mallory").unwrap();
        for i in 0..4 {
            forged
                .append(Event::Pushed, "42", "prod", json!({"i": i}))
                .unwrap();
        }
        fs::write(log.path(), fs::read(forged.path()).unwrap()).unwrap();
        fs::write(
            dir.path().join(HEAD_FILE),
            fs::read(other.path().join(HEAD_FILE)).unwrap(),
        )
        .unwrap();
        assert!(log.verify().is_ok(), "the chain alone cannot tell");
        let e = log
            .verify_anchored(std::slice::from_ref(&anchor), None)
            .unwrap_err();
        assert!(e.to_string().contains("rewritten"), "{e}");
        // Past the last anchor only the signed head tells.
        let e = log.verify_anchored(&[], Some(&vk)).unwrap_err();
        assert!(e.to_string().contains("not signed"), "{e}");
        let mallory = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
        forged.set_head_key(mallory, true);
        forged
            .append(Event::Deployed, "42", "prod", json!({}))
            .unwrap();
        fs::write(log.path(), fs::read(forged.path()).unwrap()).unwrap();
        fs::write(
            dir.path().join(HEAD_FILE),
            fs::read(other.path().join(HEAD_FILE)).unwrap(),
        )
        .unwrap();
        let e = log.verify_anchored(&[], Some(&vk)).unwrap_err();
        assert!(e.to_string().contains("valid signature"), "{e}");
        // ... and an append refuses to re-sign the forged head.
        let e = log
            .append(Event::Deployed, "42", "prod", json!({}))
            .unwrap_err();
        assert!(matches!(e, AuditError::Anchor { .. }), "{e}");

        // Adoption is one append only: the next one checks the head again.
        let fresh = tempfile::tempdir().unwrap();
        let adopted = AuditLog::open_with_actor(fresh.path(), "ana").unwrap();
        adopted
            .append(Event::Pushed, "42", "prod", json!({}))
            .unwrap();
        adopted.set_head_key(key.clone(), true);
        adopted
            .append(Event::Pushed, "42", "prod", json!({}))
            .unwrap();
        adopted.check_head_key(&vk).unwrap();
        adopted
            .append(Event::Pushed, "42", "prod", json!({}))
            .unwrap();

        fs::write(log.path(), &saved.0).unwrap();
        fs::write(dir.path().join(HEAD_FILE), &saved.1).unwrap();
        log.verify_anchored(&[anchor], Some(&vk)).unwrap();
    }

    #[test]
    fn a_deleted_head_file_is_detected() {
        let (dir, log) = log_with(2);
        fs::remove_file(dir.path().join(HEAD_FILE)).unwrap();
        let (_, _, reason) = tampered(&log);
        assert!(reason.contains("missing"), "{reason}");
    }

    #[test]
    fn concurrent_appenders_never_fork_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        // Two handles stand in for two processes: each has its own open file,
        // so only the OS file lock keeps them apart.
        let a = Arc::new(AuditLog::open_with_actor(dir.path(), "a").unwrap());
        let b = Arc::new(AuditLog::open_with_actor(dir.path(), "b").unwrap());
        let handles: Vec<_> = (0..4)
            .map(|t| {
                let log = if t % 2 == 0 { a.clone() } else { b.clone() };
                std::thread::spawn(move || {
                    for i in 0..25 {
                        log.append(Event::Pushed, "42", "dev", json!({"t": t, "i": i}))
                            .unwrap();
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(a.verify().unwrap().records, 100);
    }

    #[test]
    fn secret_looking_fields_are_redacted() {
        let (_dir, log) = log_with(0);
        let r = log
            .append(
                Event::Pushed,
                "42",
                "dev",
                json!({"service": "api", "token": "s3cr3t", "headers": [{"Authorization": "Bearer x"}], "api_token": "y"}),
            )
            .unwrap();
        let text = fs::read_to_string(log.path()).unwrap();
        assert!(!text.contains("s3cr3t") && !text.contains("Bearer x") && !text.contains("\"y\""));
        assert_eq!(r.data["service"], "api");
        assert_eq!(r.data["token"], "[redacted]");
        assert!(log.verify().is_ok());
    }
}
