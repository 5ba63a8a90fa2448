//! The agent's on-disk state, and the only code that writes it.
//!
//! Layout of the data dir:
//! - `bundles/<hex>.json`: every stored bundle, canonical JSON, named by the hex
//!   of its sha256 digest (content-addressed, so a file never changes once written);
//! - `agent.lock`: locked (flock) while an agent has the dir open;
//! - `state.json`: the active pointer, the activation history, the index of stored
//!   bundles and the idempotency keys seen, in one document.
//!
//! Why one state file: the active pointer, the history and the idempotency keys
//! must move together. With several files, a crash between two renames could
//! leave an idempotency key recorded for a bundle that never became active, and
//! a retry would then be answered "no-op" wrongly. One file replaced by one
//! `rename` cannot be half-updated.
//!
//! Every write is atomic: write a temp file in the same directory, fsync it,
//! rename it over the target, fsync the directory. A bundle file is fsynced and
//! renamed *before* the state that names it, so after `kill -9` at any moment
//! the state on disk names only complete bundles. Temp files a crash leaves
//! behind are removed by [`Store::open`], which also reconciles the index with
//! the files present.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::bundle::Bundle;

/// Name of the state document in the data dir.
pub const STATE_FILE: &str = "state.json";
/// Directory of stored bundles in the data dir.
pub const BUNDLES_DIR: &str = "bundles";
/// Lock file held while an agent has the data dir open.
pub const LOCK_FILE: &str = "agent.lock";
/// Format tag of the state document.
const STATE_FORMAT: &str = "pde.agent-state/v1";
/// Prefix of temp files; anything with it is debris from a crash.
const TMP_PREFIX: &str = ".tmp-";
/// How many idempotency keys are remembered (the oldest are forgotten first).
const MAX_IDEMPOTENCY_KEYS: usize = 10_000;
/// How many activations the history keeps for rollback.
const MAX_HISTORY: usize = 100;

/// Why the store could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file or directory of the data dir could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// `state.json` is not a state document. It is only ever replaced
    /// atomically, so this means it was edited or damaged outside the agent.
    #[error("state file {path} is not a valid agent state ({reason})")]
    CorruptState {
        /// The state file.
        path: PathBuf,
        /// What the parser said.
        reason: String,
    },
    /// Another agent has this data dir open.
    #[error("data dir {0} is in use by another running agent")]
    InUse(PathBuf),
    /// A stored bundle file no longer matches its digest.
    #[error("stored bundle {path} is damaged: {reason}")]
    CorruptBundle {
        /// The bundle file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The bundle that is active now, as `GET /active` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActiveRecord {
    /// `sha256:<hex>` of the active bundle.
    pub digest: String,
    /// The policy version it carries.
    pub version: String,
    /// The policy id it carries.
    pub policy_id: String,
    /// The environment named by the deploy that activated it (absent after a
    /// rollback to a bundle that was never deployed with an env).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<String>,
    /// When it became active (RFC 3339, UTC).
    pub activated_at: String,
    /// Whether the `--on-activate` hook failed for this activation; absent
    /// when no hook is configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hook_failed: Option<bool>,
}

/// What the index knows about one stored bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredInfo {
    /// The policy version it carries.
    pub version: String,
    /// The policy id it carries.
    pub policy_id: String,
    /// When it was last received by `POST /deploy` (RFC 3339, UTC).
    pub stored_at: String,
    /// Orders bundles newest first; larger is newer.
    pub seq: u64,
}

/// The digest an idempotency key was first used with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct IdempotencyRecord {
    digest: String,
    seq: u64,
}

/// The whole state document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct State {
    format: String,
    seq: u64,
    active: Option<ActiveRecord>,
    /// Activation stack: the last entry is the active digest.
    history: Vec<String>,
    bundles: BTreeMap<String, StoredInfo>,
    idempotency: BTreeMap<String, IdempotencyRecord>,
}

impl Default for State {
    fn default() -> Self {
        State {
            format: STATE_FORMAT.to_string(),
            seq: 0,
            active: None,
            history: Vec::new(),
            bundles: BTreeMap::new(),
            idempotency: BTreeMap::new(),
        }
    }
}

/// A bundle accepted by the routes, ready to be stored.
#[derive(Debug, Clone)]
pub struct Incoming {
    /// Its verified digest.
    pub digest: String,
    /// Its policy version.
    pub version: String,
    /// Its policy id.
    pub policy_id: String,
    /// The canonical bytes to store.
    pub bytes: Vec<u8>,
}

/// What a deploy did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeployOutcome {
    /// The bundle is stored and now active.
    Activated(ActiveRecord),
    /// The same key came with the same digest before: nothing was done.
    Repeat,
    /// A new key, but the digest was already active: the key was recorded.
    AlreadyActive,
    /// The key was used before with another digest.
    KeyConflict {
        /// The digest the key was first used with.
        previous: String,
    },
}

/// What a rollback did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RollbackOutcome {
    /// The target is now active.
    Activated(ActiveRecord),
    /// The target was already active.
    AlreadyActive(ActiveRecord),
    /// The digest named is not stored here.
    Unknown,
    /// `to: null` with no earlier activation to return to.
    NothingToRollBack,
    /// `to: null` when the active bundle was the first one ever activated:
    /// the agent returns to having nothing active, which is the state the
    /// pusher's compensation of a first deploy must restore.
    Deactivated {
        /// The digest that was active.
        digest: String,
    },
}

/// One entry of `GET /bundles`.
#[derive(Debug, Clone, Serialize)]
pub struct Listed {
    /// `sha256:<hex>`.
    pub digest: String,
    /// The policy version.
    pub version: String,
    /// The policy id.
    pub policy_id: String,
    /// When it was last received.
    pub stored_at: String,
    /// Whether it is the active bundle.
    pub active: bool,
}

/// The data dir and the state it holds. Not synchronised: the agent wraps it
/// in a mutex, so every mutation sees the result of the one before.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    keep: usize,
    state: State,
    /// Held (an OS file lock) for as long as the store is open; the OS
    /// releases it when the process dies, even by `kill -9`.
    _lock: std::fs::File,
}

/// `true` when `digest` is `sha256:` followed by 64 lowercase hex digits, the
/// only form that may become a file name.
pub fn is_well_formed_digest(digest: &str) -> bool {
    digest.strip_prefix("sha256:").is_some_and(|hex| {
        hex.len() == 64
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// Current time as RFC 3339 UTC.
pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .expect("a current UTC time formats as RFC 3339")
}

/// Writes `bytes` to `path` so that `path` holds either the old or the new
/// content after a crash, never a mix: temp file, fsync, rename, fsync dir.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!("{TMP_PREFIX}{name}-{:016x}", rand::random::<u64>()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(io(&tmp))?;
        f.write_all(bytes).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(io(path))?;
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))
}

/// Creates and removes a probe file in `dir`: the readiness check.
pub fn probe_writable(dir: &Path) -> Result<(), StoreError> {
    let probe = dir.join(format!("{TMP_PREFIX}readyz-{:016x}", rand::random::<u64>()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
        .map_err(io(&probe))?;
    let written = f.write_all(b"probe").map_err(io(&probe));
    drop(f);
    let removed = std::fs::remove_file(&probe).map_err(io(&probe));
    written.and(removed)
}

impl Store {
    /// Opens (creating if needed) the data dir and recovers a consistent state:
    /// removes crash debris, drops index entries whose bundle file is gone,
    /// indexes complete bundle files the state does not name yet, and makes sure
    /// the active pointer names a stored bundle.
    pub fn open(dir: &Path, keep: usize) -> Result<Store, StoreError> {
        let bundles = dir.join(BUNDLES_DIR);
        std::fs::create_dir_all(&bundles).map_err(io(&bundles))?;
        let lock = lock_dir(dir)?;
        for d in [dir, bundles.as_path()] {
            remove_debris(d)?;
        }
        let state_path = dir.join(STATE_FILE);
        let loaded = match std::fs::read(&state_path) {
            Ok(bytes) => {
                let state: State =
                    serde_json::from_slice(&bytes).map_err(|e| StoreError::CorruptState {
                        path: state_path.clone(),
                        reason: e.to_string(),
                    })?;
                if state.format != STATE_FORMAT {
                    return Err(StoreError::CorruptState {
                        path: state_path,
                        reason: format!("format {:?}, expected {STATE_FORMAT:?}", state.format),
                    });
                }
                state
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => State::default(),
            Err(e) => return Err(io(&state_path)(e)),
        };
        let mut store = Store {
            dir: dir.to_path_buf(),
            keep,
            state: loaded.clone(),
            _lock: lock,
        };
        store.reconcile()?;
        if store.state != loaded {
            store.write_state(&store.state)?;
        }
        Ok(store)
    }

    fn reconcile(&mut self) -> Result<(), StoreError> {
        let bundles = self.dir.join(BUNDLES_DIR);
        let mut on_disk = BTreeMap::new();
        for entry in std::fs::read_dir(&bundles).map_err(io(&bundles))? {
            let entry = entry.map_err(io(&bundles))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(hex) = name.strip_suffix(".json") else {
                continue;
            };
            let digest = format!("sha256:{hex}");
            if is_well_formed_digest(&digest) {
                on_disk.insert(digest, entry.path());
            }
        }
        let state = &mut self.state;
        state.bundles.retain(|digest, _| {
            let present = on_disk.contains_key(digest);
            if !present {
                warn!(%digest, "indexed bundle file is missing; dropping it from the index");
            }
            present
        });
        for (digest, path) in &on_disk {
            if state.bundles.contains_key(digest) {
                continue;
            }
            // A bundle stored just before a crash, before the state named it.
            match load_bundle_file(path, digest) {
                Ok(bundle) => {
                    info!(%digest, "indexing bundle stored before an interrupted deploy");
                    state.bundles.insert(
                        digest.clone(),
                        StoredInfo {
                            version: bundle.payload.manifest.version.clone(),
                            policy_id: bundle.payload.manifest.policy_id.clone(),
                            stored_at: now_rfc3339(),
                            seq: 0,
                        },
                    );
                }
                Err(e) => warn!(%digest, error = %e, "ignoring unreadable bundle file"),
            }
        }
        state.history.retain(|d| state.bundles.contains_key(d));
        let active_ok = state
            .active
            .as_ref()
            .is_none_or(|a| state.bundles.contains_key(&a.digest));
        if !active_ok {
            let lost = state.active.take().map(|a| a.digest).unwrap_or_default();
            warn!(digest = %lost, "active bundle file is missing; falling back to the previous activation");
            if let Some(prev) = state.history.last().cloned() {
                let info = &state.bundles[&prev];
                state.active = Some(ActiveRecord {
                    digest: prev,
                    version: info.version.clone(),
                    policy_id: info.policy_id.clone(),
                    env: None,
                    activated_at: now_rfc3339(),
                    hook_failed: None,
                });
            }
        }
        if let Some(active) = &state.active
            && state.history.last() != Some(&active.digest)
        {
            state.history.push(active.digest.clone());
        }
        Ok(())
    }

    /// The data dir.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The path a bundle with this digest is stored at.
    pub fn bundle_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
        self.dir.join(BUNDLES_DIR).join(format!("{hex}.json"))
    }

    /// The active bundle, if any.
    pub fn active(&self) -> Option<&ActiveRecord> {
        self.state.active.as_ref()
    }

    /// Stored bundles, newest first.
    pub fn list(&self) -> Vec<Listed> {
        let active = self.state.active.as_ref().map(|a| a.digest.as_str());
        let mut items: Vec<(&String, &StoredInfo)> = self.state.bundles.iter().collect();
        items.sort_by(|a, b| {
            b.1.seq
                .cmp(&a.1.seq)
                .then_with(|| b.1.stored_at.cmp(&a.1.stored_at))
        });
        items
            .into_iter()
            .map(|(digest, info)| Listed {
                digest: digest.clone(),
                version: info.version.clone(),
                policy_id: info.policy_id.clone(),
                stored_at: info.stored_at.clone(),
                active: Some(digest.as_str()) == active,
            })
            .collect()
    }

    /// Reads a stored bundle back and re-checks its digest.
    pub fn load_bundle(&self, digest: &str) -> Result<Bundle, StoreError> {
        load_bundle_file(&self.bundle_path(digest), digest)
    }

    /// `true` when a bundle with this digest is stored.
    pub fn contains(&self, digest: &str) -> bool {
        self.state.bundles.contains_key(digest)
    }

    /// The `POST /deploy` transition: checks the idempotency key, stores the
    /// bundle, activates it and prunes old bundles, in that order.
    pub fn deploy(
        &mut self,
        key: &str,
        env: &str,
        incoming: &Incoming,
        hook_configured: bool,
    ) -> Result<DeployOutcome, StoreError> {
        if let Some(seen) = self.state.idempotency.get(key) {
            if seen.digest != incoming.digest {
                return Ok(DeployOutcome::KeyConflict {
                    previous: seen.digest.clone(),
                });
            }
            // A repeat is a no-op only while its bundle is still active. Once
            // it was rolled back, the same request is a deliberate re-deploy
            // (the key is `<digest>:<env>`, so it cannot differ) and must
            // activate the bundle again, or the pusher's verification fails.
            if self
                .state
                .active
                .as_ref()
                .is_some_and(|a| a.digest == incoming.digest)
            {
                return Ok(DeployOutcome::Repeat);
            }
        }
        self.put_bundle_file(incoming)?;
        let mut next = self.state.clone();
        next.seq += 1;
        let seq = next.seq;
        next.bundles.insert(
            incoming.digest.clone(),
            StoredInfo {
                version: incoming.version.clone(),
                policy_id: incoming.policy_id.clone(),
                stored_at: now_rfc3339(),
                seq,
            },
        );
        next.idempotency.insert(
            key.to_string(),
            IdempotencyRecord {
                digest: incoming.digest.clone(),
                seq,
            },
        );
        if next.idempotency.len() > MAX_IDEMPOTENCY_KEYS {
            let mut by_age: Vec<(u64, String)> = next
                .idempotency
                .iter()
                .map(|(k, r)| (r.seq, k.clone()))
                .collect();
            by_age.sort();
            let excess = next.idempotency.len() - MAX_IDEMPOTENCY_KEYS;
            for (_, k) in by_age.into_iter().take(excess) {
                next.idempotency.remove(&k);
            }
        }
        let already = next
            .active
            .as_ref()
            .is_some_and(|a| a.digest == incoming.digest);
        let outcome = if already {
            DeployOutcome::AlreadyActive
        } else {
            let record = ActiveRecord {
                digest: incoming.digest.clone(),
                version: incoming.version.clone(),
                policy_id: incoming.policy_id.clone(),
                env: Some(env.to_string()),
                activated_at: now_rfc3339(),
                hook_failed: hook_configured.then_some(false),
            };
            push_history(&mut next, &record.digest);
            next.active = Some(record.clone());
            DeployOutcome::Activated(record)
        };
        let pruned = prune(&mut next, self.keep);
        self.commit(next)?;
        self.delete_files(&pruned);
        Ok(outcome)
    }

    /// The `POST /rollback` transition: `Some(digest)` activates that stored
    /// bundle; `None` returns to the activation before the current one.
    pub fn rollback(
        &mut self,
        to: Option<&str>,
        hook_configured: bool,
    ) -> Result<RollbackOutcome, StoreError> {
        let mut next = self.state.clone();
        let target = match to {
            Some(digest) => {
                if !next.bundles.contains_key(digest) {
                    return Ok(RollbackOutcome::Unknown);
                }
                if let Some(active) = next.active.as_ref().filter(|a| a.digest == digest) {
                    return Ok(RollbackOutcome::AlreadyActive(active.clone()));
                }
                push_history(&mut next, digest);
                digest.to_string()
            }
            None => {
                if next.history.len() == 1 && next.active.is_some() {
                    next.history.pop();
                    let was = next.active.take().expect("checked above");
                    self.commit(next)?;
                    return Ok(RollbackOutcome::Deactivated { digest: was.digest });
                }
                if next.history.len() < 2 {
                    return Ok(RollbackOutcome::NothingToRollBack);
                }
                next.history.pop();
                next.history
                    .last()
                    .cloned()
                    .expect("two entries, one popped")
            }
        };
        let info = &next.bundles[&target];
        let record = ActiveRecord {
            digest: target.clone(),
            version: info.version.clone(),
            policy_id: info.policy_id.clone(),
            env: next.active.as_ref().and_then(|a| a.env.clone()),
            activated_at: now_rfc3339(),
            hook_failed: hook_configured.then_some(false),
        };
        next.active = Some(record.clone());
        self.commit(next)?;
        Ok(RollbackOutcome::Activated(record))
    }

    /// The digest `rollback(None)` would return to, if any.
    pub fn previous(&self) -> Option<&str> {
        let h = &self.state.history;
        (h.len() >= 2).then(|| h[h.len() - 2].as_str())
    }

    /// Records whether the activation hook failed, if `digest` is still active.
    pub fn set_hook_failed(&mut self, digest: &str, failed: bool) -> Result<(), StoreError> {
        let mut next = self.state.clone();
        match next.active.as_mut() {
            Some(a) if a.digest == digest => a.hook_failed = Some(failed),
            _ => return Ok(()),
        }
        self.commit(next)
    }

    fn put_bundle_file(&self, incoming: &Incoming) -> Result<(), StoreError> {
        let path = self.bundle_path(&incoming.digest);
        match std::fs::read(&path) {
            Ok(existing) if existing == incoming.bytes => Ok(()),
            _ => atomic_write(&path, &incoming.bytes),
        }
    }

    fn commit(&mut self, next: State) -> Result<(), StoreError> {
        self.write_state(&next)?;
        self.state = next;
        Ok(())
    }

    fn write_state(&self, state: &State) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec_pretty(state).expect("state serialises");
        atomic_write(&self.dir.join(STATE_FILE), &bytes)
    }

    fn delete_files(&self, digests: &[String]) {
        for digest in digests {
            let path = self.bundle_path(digest);
            match std::fs::remove_file(&path) {
                Ok(()) => info!(%digest, "pruned old bundle"),
                Err(e) => warn!(%digest, error = %e, "could not delete pruned bundle file"),
            }
        }
    }
}

fn push_history(state: &mut State, digest: &str) {
    state.history.push(digest.to_string());
    if state.history.len() > MAX_HISTORY {
        let excess = state.history.len() - MAX_HISTORY;
        state.history.drain(..excess);
    }
}

/// Drops all but the `keep` newest bundles from the index and returns the
/// digests dropped (their files go after the commit). The active bundle and
/// the one a rollback would return to are never dropped; they count towards
/// `keep`.
fn prune(state: &mut State, keep: usize) -> Vec<String> {
    let mut protected: Vec<String> = state.active.iter().map(|a| a.digest.clone()).collect();
    if state.history.len() >= 2 {
        protected.push(state.history[state.history.len() - 2].clone());
    }
    protected.dedup();
    let mut by_age: Vec<(u64, String)> = state
        .bundles
        .iter()
        .filter(|(d, _)| !protected.contains(d))
        .map(|(d, i)| (i.seq, d.clone()))
        .collect();
    by_age.sort_by(|a, b| b.cmp(a));
    let room = keep.saturating_sub(protected.len());
    let dropped: Vec<String> = by_age.into_iter().skip(room).map(|(_, d)| d).collect();
    for d in &dropped {
        state.bundles.remove(d);
    }
    state.history.retain(|d| state.bundles.contains_key(d));
    dropped
}

fn load_bundle_file(path: &Path, digest: &str) -> Result<Bundle, StoreError> {
    let bytes = std::fs::read(path).map_err(io(path))?;
    let bundle = Bundle::from_slice(&bytes).map_err(|e| StoreError::CorruptBundle {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    if bundle.digest != digest {
        return Err(StoreError::CorruptBundle {
            path: path.to_path_buf(),
            reason: format!("holds {} instead", bundle.digest),
        });
    }
    Ok(bundle)
}

/// Takes the data dir's lock file, so two agents never share one data dir
/// (their writes would not be serialised by either one's mutex).
fn lock_dir(dir: &Path) -> Result<std::fs::File, StoreError> {
    let path = dir.join(LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io(&path))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(StoreError::InUse(dir.to_path_buf())),
        Err(std::fs::TryLockError::Error(e)) => Err(io(&path)(e)),
    }
}

fn remove_debris(dir: &Path) -> Result<(), StoreError> {
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let entry = entry.map_err(io(dir))?;
        if entry.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
            info!(file = %entry.path().display(), "removing temp file left by an interrupted write");
            std::fs::remove_file(entry.path()).map_err(io(&entry.path()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bundle::{Manifest, Payload};

    fn incoming(version: &str) -> Incoming {
        let key = ed25519_dalek::SigningKey::from_bytes(&[3; 32]);
        let bundle = Bundle::seal(
            Payload {
                manifest: Manifest {
                    policy_id: "42".into(),
                    version: version.into(),
                    source_commit: "c".into(),
                    validators: vec![],
                },
                policy: serde_json::json!({"id": "42", "version": version}),
            },
            &[&key],
        );
        Incoming {
            digest: bundle.digest.clone(),
            version: version.into(),
            policy_id: "42".into(),
            bytes: bundle.to_canonical_bytes(),
        }
    }

    #[test]
    fn prune_keeps_the_newest_and_the_active() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path(), 2).unwrap();
        let a = incoming("1.0.0");
        let b = incoming("1.1.0");
        let c = incoming("1.2.0");
        for (i, x) in [&a, &b, &c].into_iter().enumerate() {
            store.deploy(&format!("k{i}"), "dev", x, false).unwrap();
        }
        let listed: Vec<String> = store.list().into_iter().map(|l| l.digest).collect();
        assert_eq!(listed, vec![c.digest.clone(), b.digest.clone()]);
        assert!(!store.bundle_path(&a.digest).exists());
        // Roll back to b, then deploy a again: b is what a rollback would
        // return to, so c goes although it is newer.
        store.rollback(None, false).unwrap();
        assert_eq!(store.active().unwrap().digest, b.digest);
        store.deploy("k3", "dev", &a, false).unwrap();
        let listed: Vec<String> = store.list().into_iter().map(|l| l.digest).collect();
        assert_eq!(listed, vec![a.digest.clone(), b.digest.clone()]);
    }

    #[test]
    fn reopen_removes_debris_and_indexes_orphans() {
        let dir = tempfile::tempdir().unwrap();
        let a = incoming("1.0.0");
        {
            let mut store = Store::open(dir.path(), 10).unwrap();
            store.deploy("k", "dev", &a, false).unwrap();
        }
        // A crash after storing b's file but before the state named it,
        // plus a torn temp file.
        let b = incoming("2.0.0");
        let hex = b.digest.strip_prefix("sha256:").unwrap();
        std::fs::write(
            dir.path().join("bundles").join(format!("{hex}.json")),
            &b.bytes,
        )
        .unwrap();
        std::fs::write(dir.path().join(".tmp-state.json-1"), b"{\"torn").unwrap();
        let store = Store::open(dir.path(), 10).unwrap();
        assert_eq!(store.active().unwrap().digest, a.digest);
        assert!(store.contains(&b.digest));
        assert!(!dir.path().join(".tmp-state.json-1").exists());
    }

    #[test]
    fn a_data_dir_is_opened_by_one_store_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let first = Store::open(dir.path(), 10).unwrap();
        assert!(matches!(
            Store::open(dir.path(), 10),
            Err(StoreError::InUse(_))
        ));
        drop(first);
        Store::open(dir.path(), 10).unwrap();
    }

    #[test]
    fn digest_shape_guards_file_names() {
        assert!(is_well_formed_digest(&format!("sha256:{}", "a".repeat(64))));
        assert!(!is_well_formed_digest(&format!(
            "sha256:{}",
            "A".repeat(64)
        )));
        assert!(!is_well_formed_digest("sha256:../../etc/passwd"));
        assert!(!is_well_formed_digest(&"a".repeat(71)));
    }
}
