//! The audit log: an append-only, hash-chained record of every deploy step.
//!
//! Auditors must be able to trust that the log says what happened, so each
//! record is chained to the one before it (DESIGN §5, §8):
//!
//! - the log is JSON lines, one record per line, each line the canonical
//!   JSON of `{seq, ts, actor, event, policy_id, env, data, prev, hash}`;
//! - `seq` starts at 1 and grows by one;
//! - `hash` is the sha256, in lowercase hex, of the canonical JSON of the
//!   record *without* its `hash` field (bare hex, as DESIGN §8 words it, so
//!   an auditor's `sha256sum`-style check compares directly);
//! - `prev` is the previous record's `hash`, and `""` for the first record.
//!
//! A chain alone cannot show that records were cut off the *end*, so pde
//! also keeps a head (`{"seq", "hash"}` of the last record), stored after
//! each append. `verify` checks the whole chain, that the log reaches the
//! head's seq, and that the record there has the head's hash. The log may
//! run *ahead* of the head: a crash between storing a record and its head
//! leaves an older, still valid anchor.
//!
//! The chain and the head alone prove nothing against someone who rewrites
//! both, or deletes both. So the log is anchored (issue 10):
//! - the head is signed with the workspace signing key
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
//! `append` refuses to extend a log whose tail is torn or does not match
//! the head: the damage must be looked at (`pde audit verify`), not buried.
//!
//! **No secrets in `data`.** Callers must never pass tokens, keys or
//! passwords. As a second line of defence, object fields whose names look
//! like secrets (`token`, `authorization`, `password`, `secret`,
//! `private_key`, `signing_key`, any depth) are replaced by `"[redacted]"`
//! before the record is hashed.
//!
//! The modules: [`record`] builds and hashes records, `verify` checks
//! chains and anchors, [`store`] is the narrow [`ChainStore`] trait that a
//! backend implements ([`file_chain`]: `<state>/audit.jsonl` and
//! `audit.head`; [`pg_chain`]: a team's PostgreSQL database), [`outbox`]
//! forwards any store to the HTTP sink, and [`AuditLog`] here is what the
//! rest of the engine uses. Every rule is written once, against the trait:
//! nothing here asks which store it has.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde_json::Value;

mod error;
pub mod file_chain;
pub mod outbox;
pub mod pg_chain;
pub mod record;
pub mod store;
#[cfg(test)]
mod tests;
mod verify;

pub use error::AuditError;
pub use file_chain::{CURSOR_FILE, FileChain, HEAD_FILE, LOG_FILE};
pub use pg_chain::PgChain;
pub use record::{AuditEntry, AuditRecord, Event, default_actor, set_actor_repository};
pub use store::ChainStore;
pub use verify::{Anchor, VerifyReport};

use record::{Head, lines};
use store::{Extension, Tail};

/// The hash-chained audit log of one workspace, over whichever
/// [`ChainStore`] keeps it.
#[derive(Debug)]
pub struct AuditLog {
    store: Arc<dyn ChainStore>,
    /// [`ChainStore::location`], for [`AuditLog::path`] and messages.
    location: PathBuf,
    actor: String,
    writable: bool,
    /// Signs the head after each append, once set; with `true` the next
    /// append may replace a head the key does not verify (adoption,
    /// decided by the caller).
    head_key: Mutex<Option<(ed25519_dalek::SigningKey, bool)>>,
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
        let mut log = AuditLog::with_store(Arc::new(FileChain::open(state_dir)?), true);
        log.actor = actor.to_string();
        if let Err(e) = log.check_tail() {
            tracing::warn!(error = %e, "audit log is damaged; appends will be refused until it is repaired");
        }
        Ok(log)
    }

    /// Opens `<state_dir>/audit.jsonl` for reading only, creating nothing:
    /// a missing log reads as empty. Appends are refused.
    pub fn open_read_only(state_dir: &Path) -> Result<AuditLog, AuditError> {
        Ok(AuditLog::with_store(
            Arc::new(FileChain::open_read_only(state_dir)?),
            false,
        ))
    }

    /// The chain kept in `store` (a team database's, for `[state] url`),
    /// with the actor from the environment. `writable` false refuses
    /// appends, as [`AuditLog::open_read_only`] does.
    pub fn with_store(store: Arc<dyn ChainStore>, writable: bool) -> AuditLog {
        AuditLog {
            location: PathBuf::from(store.location()),
            store,
            actor: default_actor(),
            writable,
            head_key: Mutex::new(None),
        }
    }

    /// The store, for the sink's [`outbox`].
    pub fn store(&self) -> &Arc<dyn ChainStore> {
        &self.store
    }

    /// Where the chain lives: the log file, or the database URL.
    pub fn path(&self) -> &Path {
        &self.location
    }

    /// Signs the head with `key` from now on. An append then refuses to
    /// extend (and re-sign) a head that `key` does not verify, unless
    /// `adopt` is set: the caller has checked that log against outside
    /// anchors (an unsigned head from an older pde, or a rotated key).
    pub fn set_head_key(&self, key: ed25519_dalek::SigningKey, adopt: bool) {
        *self.head_key.lock().unwrap_or_else(|p| p.into_inner()) = Some((key, adopt));
    }

    /// Checks the head's signature against `key`; no head is fine.
    pub fn check_head_key(&self, key: &ed25519_dalek::VerifyingKey) -> Result<(), AuditError> {
        match self.head(self.store.head()?)? {
            Some(head) => verify::check_head_signature(&head, key),
            None => Ok(()),
        }
    }

    /// The key id that signed the head, if it is signed.
    pub fn head_keyid(&self) -> Result<Option<String>, AuditError> {
        Ok(self
            .head(self.store.head()?)?
            .and_then(|h| h.sig)
            .map(|s| s.keyid))
    }

    /// The last record's `(seq, hash)`, checked against the head.
    pub fn last(&self) -> Result<Option<(u64, String)>, AuditError> {
        Ok(self.check_tail()?.map(|r| (r.seq, r.hash)))
    }

    /// Appends a record durably; returns the record as written.
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

    /// Appends several records in one durable step (one write and one
    /// fsync for the file log, one transaction for a database: for example
    /// one `pushed` per target of a wide fan-out); returns them as written,
    /// in order. They are consecutive in the log: no other writer
    /// interleaves.
    pub fn append_all(&self, entries: Vec<AuditEntry>) -> Result<Vec<AuditRecord>, AuditError> {
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        if !self.writable {
            return Err(AuditError::ReadOnly {
                path: self.location.clone(),
            });
        }
        let mut slot = self.head_key.lock().unwrap_or_else(|p| p.into_inner());
        let key = (*slot).clone();
        let mut written = Vec::new();
        // Set when the tail check failed, whose line numbers are relative.
        let mut tail_failed = None;
        let appended = self.store.append(Box::new(|tail: Tail| {
            let head = self.head(tail.head)?;
            if let (Some((key, false)), Some(head)) = (&key, &head) {
                // Extending (and re-signing) a forged head would launder it.
                verify::check_head_signature(head, &key.verifying_key())?;
            }
            let has_line = tail.line.is_some();
            let last = verify::check_tail(tail.line.as_deref(), head.as_ref())
                .inspect_err(|_| tail_failed = Some(has_line))?;
            let (records, lines) =
                record::chain(last, &self.actor, tail.db_role.as_deref(), entries);
            let last = records.last().expect("entries is not empty");
            let head = Head::of(last, key.as_ref().map(|(k, _)| k)).to_json();
            let lines = records.iter().map(|r| r.seq).zip(lines).collect();
            written = records;
            Ok(Extension { lines, head })
        }));
        match tail_failed {
            Some(has_line) => appended.map_err(|e| self.absolute(e, has_line))?,
            None => appended?,
        }
        if let Some((_, adopt)) = slot.as_mut() {
            *adopt = false;
        }
        tracing::debug!(
            last_seq = written.last().map(|r| r.seq),
            count = written.len(),
            "audit records appended"
        );
        Ok(written)
    }

    /// The log as stored, after checking it: the bytes `pde audit export`
    /// writes (the file's JSON lines, or the shared chain's, identically).
    pub fn export(&self) -> Result<Vec<u8>, AuditError> {
        self.verify()?;
        Ok(self.store.snapshot()?.0)
    }

    /// The verified lines (without `\n`) and the head record's JSON, for
    /// moving a chain into another store unchanged.
    pub fn export_chain(&self) -> Result<(Vec<String>, Option<String>), AuditError> {
        self.verify()?;
        let (bytes, head) = self.snapshot()?;
        let lines = lines(&bytes)
            .map(|l| String::from_utf8_lossy(l).into_owned())
            .collect();
        let head = head.map(|h| String::from_utf8_lossy(&h.to_json()).into_owned());
        Ok((lines, head))
    }

    /// Stores `lines` and `head` (from [`AuditLog::export_chain`]) as this
    /// chain, which must be empty (`pde state migrate` moves a file log
    /// into a team database this way); the records keep their seq, hashes
    /// and head signature, so the chain verifies as before.
    pub fn import_chain(&self, lines: Vec<String>, head: Option<String>) -> Result<(), AuditError> {
        if !self.writable {
            return Err(AuditError::ReadOnly {
                path: self.location.clone(),
            });
        }
        let Some(head) = head else {
            // An empty log (no head yet) moves as nothing.
            return self.verify().map(drop);
        };
        let location = self.store.location();
        self.store.append(Box::new(move |tail: Tail| {
            if tail.line.is_some() || tail.head.is_some() {
                return Err(AuditError::Shared {
                    location,
                    reason: "the shared audit chain is not empty; migrate into a new database"
                        .into(),
                });
            }
            let lines = lines
                .into_iter()
                .enumerate()
                .map(|(i, l)| (i as u64 + 1, l.into_bytes()))
                .collect();
            Ok(Extension {
                lines,
                head: head.into_bytes(),
            })
        }))?;
        self.verify().map(drop)
    }

    /// Every record, in order, without checking the chain (see [`AuditLog::verify`]).
    pub fn records(&self) -> Result<Vec<AuditRecord>, AuditError> {
        let (bytes, _) = self.store.snapshot()?;
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
    /// last line, and that the log ends where the head says. The first bad
    /// record is named in [`AuditError::Tampered`].
    pub fn verify(&self) -> Result<VerifyReport, AuditError> {
        let (bytes, head) = self.snapshot()?;
        Ok(verify::check_chain(&bytes, head.as_ref())?.0)
    }

    /// [`AuditLog::verify`], then the anchors outside the log:
    /// - every anchor's head must be a record of this log, byte for byte
    ///   (its hash covers the whole chain before it);
    /// - a log with no records while anchors show deploys is not intact;
    /// - with `key`, the head must carry a valid signature by it.
    pub fn verify_anchored(
        &self,
        anchors: &[Anchor],
        key: Option<&ed25519_dalek::VerifyingKey>,
    ) -> Result<VerifyReport, AuditError> {
        let (bytes, head) = self.snapshot()?;
        let (report, hashes) = verify::check_chain(&bytes, head.as_ref())?;
        verify::check_anchors(report, &hashes, head.as_ref(), anchors, key)
    }

    /// The log's bytes and its head, parsed, from one snapshot.
    fn snapshot(&self) -> Result<(Vec<u8>, Option<Head>), AuditError> {
        let (bytes, head) = self.store.snapshot()?;
        Ok((bytes, self.head(head)?))
    }

    /// The stored head, parsed.
    fn head(&self, json: Option<Vec<u8>>) -> Result<Option<Head>, AuditError> {
        Head::parse(json.as_deref(), &self.store.head_location())
    }

    /// The last record, checked against the head without reading the
    /// whole chain.
    fn check_tail(&self) -> Result<Option<AuditRecord>, AuditError> {
        let tail = self.store.tail()?;
        let head = self.head(tail.head)?;
        let has_line = tail.line.is_some();
        verify::check_tail(tail.line.as_deref(), head.as_ref())
            .map_err(|e| self.absolute(e, has_line))
    }

    /// Makes the line number of a tail check's error absolute. Counting
    /// lines costs a full read, so only an error pays for it.
    fn absolute(&self, e: AuditError, has_line: bool) -> AuditError {
        match e {
            AuditError::Tampered { line, seq, reason } => {
                let last = match has_line {
                    true => self
                        .store
                        .snapshot()
                        .map_or(0, |(bytes, _)| lines(&bytes).count() as u64),
                    false => 0,
                };
                AuditError::Tampered {
                    line: last + line,
                    seq,
                    reason,
                }
            }
            other => other,
        }
    }
}
