//! The agent's on-disk state, and the only code that writes it.
//!
//! Layout of the data dir:
//! - `bundles/<hex>.json`: every stored bundle, canonical JSON, named by the hex
//!   of its sha256 digest (content-addressed, so a file never changes once written);
//! - `policies/<policy_id>.json`: one document per policy: its active bundle,
//!   its activation history, the index of its stored bundles and the
//!   idempotency keys used to deploy it;
//! - `rollback-nonces.json`: the nonces of signed rollbacks accepted within
//!   the last [`pde_core::rollback::MAX_SKEW_SECS`] (either way), so that a
//!   restart does not reopen a replay window;
//! - `agent.lock`: locked (flock) while an agent has the dir open.
//!
//! Why one file per policy (protocol v2): a service enforces many policies at
//! once, and the unit of activation is the policy. Deploying or rolling back
//! policy 43 rewrites `policies/43.json` and nothing else, so no crash, bug or
//! race in a 43 deploy can touch what 42 runs, and the bytes written per
//! deploy depend on that policy's own bounded history, not on the agent's.
//!
//! Why the pointer, the history and the keys of a policy share one file: they
//! must move together. With several files, a crash between two renames could
//! leave an idempotency key recorded for a bundle that never became active, and
//! a retry would then be answered "no-op" wrongly. One file replaced by one
//! `rename` cannot be half-updated.
//!
//! Every write is atomic ([`atomic_write`]). A bundle file is made durable
//! *before* the policy file that names it, so after `kill -9` at any moment the
//! state on disk names only complete bundles. [`Store::open`] removes temp
//! files a crash left behind, indexes bundles stored just before a crash, and
//! re-verifies every active bundle: one that no longer verifies (edited on
//! disk, signed by a key no longer trusted, or no longer carrying the
//! approvals the agent now requires) is not served; the policy falls
//! back to the newest earlier activation that does, and the event is kept for
//! `GET /healthz`.
//!
//! Why a refusal at start does not touch `policies/<id>.json`: the usual cause
//! is an agent restarted with the wrong `--trusted-key`, a mistake that the
//! next restart corrects. Had the fallback been written, the recorded
//! activation would be gone and the right key could not bring it back. So the
//! fallback lives in memory only, the recorded history stays as it was, and
//! every start re-verifies it: the problem is reported for as long as it
//! persists, and the recorded bundle is served again once it verifies. The
//! first deliberate change of that policy (a deploy or rollback, each of
//! which verifies what it activates) builds on what is served and is written,
//! which resolves the problem for that policy.
//!
//! A data dir written by a protocol-v1 agent (one `state.json` with a single
//! active slot) is migrated on open into per-policy files; the old file is kept
//! as `state.v1.json` for reference.

use std::collections::{BTreeMap, HashMap};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use pde_core::bundle::Bundle;
use pde_core::clock::now_rfc3339;
use pde_core::fsutil::TMP_PREFIX;
use pde_core::wire::valid_policy_id as valid_id;

/// Directory of stored bundles in the data dir.
pub const BUNDLES_DIR: &str = "bundles";
/// Directory of per-policy state documents in the data dir.
pub const POLICIES_DIR: &str = "policies";
/// Lock file held while an agent has the data dir open.
pub const LOCK_FILE: &str = "agent.lock";
/// The single state document of a protocol-v1 agent, migrated on open.
const V1_STATE_FILE: &str = "state.json";
/// Where the v1 document is kept after migration.
const V1_STATE_KEPT: &str = "state.v1.json";
/// Format tag of the v1 state document.
const V1_STATE_FORMAT: &str = "pde.agent-state/v1";
/// Format tag of a per-policy state document.
const POLICY_FORMAT: &str = "pde.agent-policy/v2";
/// Idempotency keys remembered per policy; the oldest are forgotten first.
/// Pushers retry within seconds, so the last 256 deploys of a policy are
/// far more than a retry can reach back to, and the file stays small.
pub const MAX_KEYS_PER_POLICY: usize = 256;
/// Activations kept per policy for rollback.
const MAX_HISTORY: usize = 100;
/// What one policy's document (`policies/<id>.json`) stays under with the
/// default `--keep 10`, whatever senders do: every field in it is bounded
/// (256 keys of at most 512 visible ASCII characters, each with a digest,
/// an `env` of at most 128 characters and a counter; 100 history entries;
/// `--keep` bundle entries with versions of at most 128 bytes). Each bundle
/// kept beyond 10 adds under [`POLICY_DOC_BYTES_PER_KEPT`].
pub const MAX_POLICY_DOC_BYTES: u64 = 256 * 1024;
/// What each stored-bundle entry adds to a policy's document, at most.
pub const POLICY_DOC_BYTES_PER_KEPT: u64 = 512;
/// The nonces of accepted rollback proofs, in the data dir.
pub const NONCES_FILE: &str = "rollback-nonces.json";
/// Format tag of the nonce file.
const NONCES_FORMAT: &str = "pde.agent-nonces/v1";
/// Rollback nonces remembered at once. Only statements signed by a trusted
/// release key are recorded, and each is forgotten ten minutes after it was
/// signed, so this bounds the file (about 100 bytes a nonce) against a key
/// holder gone mad rather than against strangers.
pub const MAX_NONCES: usize = 4096;

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
    /// A state document is not what the agent writes. They are only ever
    /// replaced atomically, so this means one was edited or damaged outside
    /// the agent.
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

/// Reads a JSON file of the data dir that carries a `format` tag: `None`
/// when it does not exist; a file that does not parse, or carries another
/// format, is [`StoreError::CorruptState`] naming it.
fn read_tagged<T: serde::de::DeserializeOwned>(
    path: &Path,
    expected: &str,
    format_of: impl Fn(&T) -> &str,
) -> Result<Option<T>, StoreError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(path)(e)),
    };
    let corrupt = |reason: String| StoreError::CorruptState {
        path: path.to_path_buf(),
        reason,
    };
    let value: T = serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
    let format = format_of(&value);
    if format != expected {
        return Err(corrupt(format!("format {format:?}, expected {expected:?}")));
    }
    Ok(Some(value))
}

pub use pde_core::wire::ActiveRecord;

/// What the index knows about one stored bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct StoredInfo {
    version: String,
    /// When it was last received by `POST /deploy` (RFC 3339, UTC).
    stored_at: String,
    /// Orders bundles newest first across policies; larger is newer.
    seq: u64,
}

/// What an idempotency key was first used with. The key binds the whole
/// request: policy (the file it lives in), digest and environment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct KeyRecord {
    digest: String,
    /// `None` only for keys migrated from a v1 agent, which did not record it.
    #[serde(default)]
    env: Option<String>,
    seq: u64,
}

/// One policy's state document, `policies/<policy_id>.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyState {
    format: String,
    policy_id: String,
    active: Option<ActiveRecord>,
    /// Activation stack: the last entry is the active digest.
    history: Vec<String>,
    bundles: BTreeMap<String, StoredInfo>,
    idempotency: BTreeMap<String, KeyRecord>,
    /// The highest fencing number of an accepted deploy or rollback of this
    /// policy (push protocol v4); absent until the first fenced request.
    /// One integer per policy, whatever is sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    fence: Option<u64>,
    /// The fence of the last accepted rollback: a second rollback, or a
    /// deploy, at that same fence is refused (only a newer lock may change
    /// the policy again), which is what makes a replayed statement useless.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rollback_fence: Option<u64>,
}

impl PolicyState {
    fn new(policy_id: &str) -> Self {
        PolicyState {
            format: POLICY_FORMAT.to_string(),
            policy_id: policy_id.to_string(),
            active: None,
            history: Vec::new(),
            bundles: BTreeMap::new(),
            idempotency: BTreeMap::new(),
            fence: None,
            rollback_fence: None,
        }
    }

    /// Why a request carrying `fence` may not change this policy, if it may
    /// not: lower than the highest fence accepted (a request without one
    /// counts as 0), or equal to the fence of the last accepted rollback.
    fn fence_refusal(&self, fence: Option<u64>) -> Option<FenceRefusal> {
        let highest = self.fence?;
        let f = fence.unwrap_or(0);
        let reason = if fence.is_none() {
            format!(
                "the request carries no fencing number, and this agent has accepted fence {highest} \
                 for policy {}: only a pusher of push protocol v4 may change it now",
                self.policy_id
            )
        } else if f < highest {
            format!(
                "fence {f} is lower than fence {highest}, the highest this agent has accepted for \
                 policy {}: a newer deploy lock was taken since this request's",
                self.policy_id
            )
        } else if f == highest && self.rollback_fence == Some(f) {
            format!(
                "policy {} was already rolled back under fence {f}; only a newer deploy lock may \
                 change it again",
                self.policy_id
            )
        } else {
            return None;
        };
        Some(FenceRefusal { highest, reason })
    }

    /// Records an accepted request's fence.
    fn accept_fence(&mut self, fence: Option<u64>) {
        if let Some(f) = fence {
            self.fence = Some(self.fence.map_or(f, |h| h.max(f)));
        }
    }

    fn max_seq(&self) -> u64 {
        let b = self.bundles.values().map(|i| i.seq);
        let k = self.idempotency.values().map(|r| r.seq);
        b.chain(k).max().unwrap_or(0)
    }

    fn record_for(&self, digest: &str, env: Option<String>, hook: bool) -> ActiveRecord {
        ActiveRecord {
            digest: digest.to_string(),
            version: self
                .bundles
                .get(digest)
                .map(|i| i.version.clone())
                .unwrap_or_default(),
            policy_id: self.policy_id.clone(),
            env,
            activated_at: now_rfc3339(),
            hook_failed: hook.then_some(false),
        }
    }
}

/// Why a fenced request was refused (push protocol v4): answered 409
/// `fence_stale`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FenceRefusal {
    /// The highest fence accepted for the policy.
    pub highest: u64,
    /// A sentence saying why.
    pub reason: String,
}

/// A bundle accepted by the routes, ready to be stored.
#[derive(Debug, Clone)]
pub struct Incoming {
    /// Its verified digest.
    pub digest: String,
    /// Its policy version.
    pub version: String,
    /// Its policy id (already checked to be a valid id).
    pub policy_id: String,
    /// The canonical bytes to store.
    pub bytes: Vec<u8>,
    /// Its fencing number, verified (push protocol v4); `None` for a v3
    /// request.
    pub fence: Option<u64>,
}

/// What a deploy did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeployOutcome {
    /// The bundle is stored and now active for its policy.
    Activated(ActiveRecord),
    /// The same key came with the same request before: nothing was done.
    Repeat(ActiveRecord),
    /// A new key, but the digest was already active: the key was recorded.
    AlreadyActive(ActiveRecord),
    /// The key was used before for another policy, digest or environment.
    KeyConflict {
        /// What the key was first used with, for the error message.
        previous: String,
    },
    /// The request's fence is stale; nothing was done.
    FenceStale(FenceRefusal),
}

/// What a rollback did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RollbackOutcome {
    /// The target is now active for the policy.
    Activated(ActiveRecord),
    /// The target was already active.
    AlreadyActive(ActiveRecord),
    /// The digest named is not stored here at all.
    Unknown,
    /// The digest named is stored, but carries another policy.
    OtherPolicy {
        /// The policy the digest belongs to.
        owner: String,
    },
    /// `to: null` with no earlier activation of this policy to return to.
    NothingToRollBack,
    /// `to: null` when the policy's active bundle was the first one it ever
    /// had: the policy returns to being not active at all, which is the state
    /// the pusher's compensation of a first deploy must restore. Other
    /// policies are untouched.
    Deactivated {
        /// The digest that was active.
        digest: String,
    },
    /// The request's fence is stale; nothing was done.
    FenceStale(FenceRefusal),
}

/// Whether a rollback proof's nonce may be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NonceCheck {
    /// Not seen within the window: now recorded.
    Fresh,
    /// Already used by an accepted proof within the window.
    Replayed,
    /// [`MAX_NONCES`] unexpired nonces are already recorded.
    Full,
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
    /// Whether it is the active bundle of its policy.
    pub active: bool,
}

/// Checks a stored bundle before it is served again (on open): digest and
/// signature against the keys trusted now. `Err` says why it is refused.
pub type Verifier<'a> = &'a dyn Fn(&Bundle) -> Result<(), String>;

/// The data dir and the state it holds. Not synchronised: the agent wraps it
/// in a mutex, so every mutation sees the result of the one before.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    keep: usize,
    policies: BTreeMap<String, PolicyState>,
    /// Idempotency key → the policy whose file records it.
    keys: HashMap<String, String>,
    seq: u64,
    /// Policy id → what [`Store::open`] refused to serve for it. A policy
    /// listed here is served from a fallback held in memory only; its file
    /// still records what was refused (see the module docs).
    integrity: BTreeMap<String, Vec<String>>,
    /// The same problems, flattened, for `GET /healthz` to read without
    /// waiting for the store's lock.
    integrity_view: IntegrityView,
    /// Nonce of each accepted rollback proof → the Unix time after which
    /// its statement is expired anyway and the nonce can be forgotten.
    nonces: BTreeMap<String, i64>,
    /// Held (an OS file lock) for as long as the store is open; the OS
    /// releases it when the process dies, even by `kill -9`.
    _lock: std::fs::File,
}

/// The unresolved integrity problems of a store, shared with `GET /healthz`
/// so that a health check never waits behind a deploy holding the store.
#[derive(Debug, Clone, Default)]
pub struct IntegrityView(Arc<RwLock<Vec<String>>>);

impl IntegrityView {
    /// The problems as they are now, one sentence each; empty when none.
    pub fn snapshot(&self) -> Vec<String> {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set(&self, problems: Vec<String>) {
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = problems;
    }
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

/// `true` when `id` can name a policy (and so a file in `policies/`).
pub fn is_valid_policy_id(id: &str) -> bool {
    valid_id(id)
}

/// [`pde_core::fsutil::atomic_write`], with the store's error.
fn atomic_write(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    pde_core::fsutil::atomic_write(path, bytes).map_err(io(path))
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
    /// migrates a v1 state document, removes crash debris, drops index entries
    /// whose bundle file is gone, indexes complete bundle files no policy names
    /// yet, and makes sure every active pointer names a stored bundle that
    /// `verify` accepts.
    pub fn open(dir: &Path, keep: usize, verify: Verifier<'_>) -> Result<Store, StoreError> {
        let bundles = dir.join(BUNDLES_DIR);
        let policies = dir.join(POLICIES_DIR);
        for d in [&bundles, &policies] {
            std::fs::create_dir_all(d).map_err(io(d))?;
        }
        let lock = lock_dir(dir)?;
        for d in [dir, bundles.as_path(), policies.as_path()] {
            remove_debris(d)?;
        }
        let mut store = Store {
            dir: dir.to_path_buf(),
            keep,
            policies: BTreeMap::new(),
            keys: HashMap::new(),
            seq: 0,
            integrity: BTreeMap::new(),
            integrity_view: IntegrityView::default(),
            nonces: BTreeMap::new(),
            _lock: lock,
        };
        store.nonces = store.load_nonces()?;
        store.migrate_v1()?;
        let loaded = store.load_policies()?;
        store.policies = loaded.clone();
        // Repairs (missing files, orphans, a pointer absent from its history)
        // are written; a refusal by `verify` is not (see the module docs).
        store.repair()?;
        for (id, state) in &store.policies {
            if loaded.get(id) != Some(state) {
                store.write_policy(state)?;
            }
        }
        store.reverify(verify);
        for state in store.policies.values() {
            for key in state.idempotency.keys() {
                store.keys.insert(key.clone(), state.policy_id.clone());
            }
        }
        store.seq = store
            .policies
            .values()
            .map(PolicyState::max_seq)
            .max()
            .unwrap_or(0);
        Ok(store)
    }

    fn load_policies(&self) -> Result<BTreeMap<String, PolicyState>, StoreError> {
        let dir = self.dir.join(POLICIES_DIR);
        let mut out = BTreeMap::new();
        for entry in std::fs::read_dir(&dir).map_err(io(&dir))? {
            let entry = entry.map_err(io(&dir))?;
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(id) = name.strip_suffix(".json").filter(|id| valid_id(id)) else {
                warn!(file = %path.display(), "ignoring a file that does not name a policy");
                continue;
            };
            let corrupt = |reason: String| StoreError::CorruptState {
                path: path.clone(),
                reason,
            };
            let Some(state) =
                read_tagged(&path, POLICY_FORMAT, |s: &PolicyState| s.format.as_str())?
            else {
                // Removed between the listing and the read.
                continue;
            };
            if state.policy_id != id {
                return Err(corrupt(format!(
                    "holds policy {:?}, not {id:?}",
                    state.policy_id
                )));
            }
            out.insert(id.to_string(), state);
        }
        Ok(out)
    }

    /// Turns a v1 agent's single `state.json` into per-policy files. The v1
    /// activation stack interleaves policies; each policy's own history is its
    /// entries in the same order. Idempotent: a crash half-way leaves
    /// `state.json` in place, and the next open migrates again.
    fn migrate_v1(&mut self) -> Result<(), StoreError> {
        #[derive(Deserialize)]
        struct V1Active {
            digest: String,
            #[serde(default)]
            env: Option<String>,
            activated_at: String,
        }
        #[derive(Deserialize)]
        struct V1Stored {
            version: String,
            policy_id: String,
            stored_at: String,
            seq: u64,
        }
        #[derive(Deserialize)]
        struct V1Key {
            digest: String,
            seq: u64,
        }
        #[derive(Deserialize)]
        struct V1State {
            format: String,
            active: Option<V1Active>,
            history: Vec<String>,
            bundles: BTreeMap<String, V1Stored>,
            idempotency: BTreeMap<String, V1Key>,
        }
        let path = self.dir.join(V1_STATE_FILE);
        let Some(v1) = read_tagged(&path, V1_STATE_FORMAT, |v: &V1State| v.format.as_str())? else {
            return Ok(());
        };
        let mut policies: BTreeMap<String, PolicyState> = BTreeMap::new();
        for (digest, info) in &v1.bundles {
            if !valid_id(&info.policy_id) {
                warn!(%digest, policy_id = %info.policy_id, "v1 bundle with an unusable policy id; not migrated");
                continue;
            }
            policies
                .entry(info.policy_id.clone())
                .or_insert_with(|| PolicyState::new(&info.policy_id))
                .bundles
                .insert(
                    digest.clone(),
                    StoredInfo {
                        version: info.version.clone(),
                        stored_at: info.stored_at.clone(),
                        seq: info.seq,
                    },
                );
        }
        let owner = |d: &str| v1.bundles.get(d).map(|i| i.policy_id.clone());
        for digest in &v1.history {
            if let Some(p) = owner(digest).and_then(|id| policies.get_mut(&id)) {
                p.history.push(digest.clone());
            }
        }
        for (key, rec) in &v1.idempotency {
            if let Some(p) = owner(&rec.digest).and_then(|id| policies.get_mut(&id)) {
                let env = key
                    .strip_prefix(rec.digest.as_str())
                    .and_then(|rest| rest.strip_prefix(':'))
                    .map(str::to_string);
                p.idempotency.insert(
                    key.clone(),
                    KeyRecord {
                        digest: rec.digest.clone(),
                        env,
                        seq: rec.seq,
                    },
                );
            }
        }
        if let Some(a) = &v1.active
            && let Some(p) = owner(&a.digest).and_then(|id| policies.get_mut(&id))
        {
            // Drop entries that only sat below it in the shared stack so the
            // policy's own history ends with its active bundle.
            while p.history.last().is_some_and(|d| d != &a.digest) {
                p.history.pop();
            }
            let mut record = p.record_for(&a.digest, a.env.clone(), false);
            record.activated_at = a.activated_at.clone();
            p.active = Some(record);
        }
        for p in policies.values_mut() {
            if p.active.is_none() {
                p.history.clear();
            }
            trim_keys(p);
        }
        for p in policies.values() {
            self.write_policy(p)?;
        }
        let kept = self.dir.join(V1_STATE_KEPT);
        std::fs::rename(&path, &kept).map_err(io(&path))?;
        sync_dir(&self.dir)?;
        info!(policies = policies.len(), kept = %kept.display(), "migrated a protocol-v1 data dir to per-policy state");
        Ok(())
    }

    /// Brings the index in line with the bundle files on disk and makes
    /// every history end with its active pointer.
    fn repair(&mut self) -> Result<(), StoreError> {
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
        for p in self.policies.values_mut() {
            p.bundles.retain(|digest, _| {
                let present = on_disk.contains_key(digest);
                if !present {
                    warn!(%digest, "indexed bundle file is missing; dropping it from the index");
                }
                present
            });
        }
        for (digest, path) in &on_disk {
            if self.owner(digest).is_some() {
                continue;
            }
            // A bundle stored just before a crash, before its policy file named it.
            match load_bundle_file(path, digest) {
                Ok(bundle) if valid_id(&bundle.payload.manifest.policy_id) => {
                    info!(%digest, "indexing bundle stored before an interrupted deploy");
                    let id = bundle.payload.manifest.policy_id.clone();
                    self.policies
                        .entry(id.clone())
                        .or_insert_with(|| PolicyState::new(&id))
                        .bundles
                        .insert(
                            digest.clone(),
                            StoredInfo {
                                version: bundle.payload.manifest.version.clone(),
                                stored_at: now_rfc3339(),
                                seq: 0,
                            },
                        );
                }
                Ok(_) => warn!(%digest, "ignoring bundle file with an unusable policy id"),
                Err(e) => warn!(%digest, error = %e, "ignoring unreadable bundle file"),
            }
        }
        for p in self.policies.values_mut() {
            p.history.retain(|d| p.bundles.contains_key(d));
            if let Some(a) = &p.active
                && p.history.last() != Some(&a.digest)
            {
                p.history.push(a.digest.clone());
            }
        }
        Ok(())
    }

    /// Serves only what still verifies: walks down each active policy's
    /// activation stack until an entry does. Changes the in-memory state
    /// only, and records each refusal in [`Store::integrity_events`].
    fn reverify(&mut self, verify: Verifier<'_>) {
        let dir = self.dir.clone();
        for p in self.policies.values_mut() {
            let env = p.active.as_ref().and_then(|a| a.env.clone());
            let hook = p.active.as_ref().and_then(|a| a.hook_failed).is_some();
            let mut fell_back = false;
            while let Some(top) = p.history.last().cloned() {
                if p.active.is_none() && !fell_back {
                    break;
                }
                let path = dir.join(BUNDLES_DIR).join(bundle_file_name(&top));
                let checked = load_bundle_file(&path, &top)
                    .map_err(|e| e.to_string())
                    .and_then(|b| verify(&b));
                match checked {
                    Ok(()) => {
                        if fell_back {
                            p.active = Some(p.record_for(&top, env.clone(), hook));
                        }
                        break;
                    }
                    Err(reason) => {
                        let event = format!(
                            "policy {}: active bundle {top} no longer verifies ({reason}); not served",
                            p.policy_id
                        );
                        warn!("{event}");
                        self.integrity
                            .entry(p.policy_id.clone())
                            .or_default()
                            .push(event);
                        p.history.pop();
                        p.active = None;
                        fell_back = true;
                    }
                }
            }
            if fell_back {
                match &p.active {
                    Some(a) => {
                        warn!(policy_id = %p.policy_id, digest = %a.digest, "fell back to the newest earlier activation that verifies")
                    }
                    None => {
                        warn!(policy_id = %p.policy_id, "no earlier activation verifies; the policy is not active")
                    }
                }
            }
        }
        self.publish_integrity();
    }

    /// Copies the unresolved problems to the view `GET /healthz` reads.
    fn publish_integrity(&self) {
        self.integrity_view
            .set(self.integrity.values().flatten().cloned().collect());
    }

    fn load_nonces(&self) -> Result<BTreeMap<String, i64>, StoreError> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct NonceLog {
            format: String,
            nonces: BTreeMap<String, i64>,
        }
        let path = self.dir.join(NONCES_FILE);
        let Some(log) = read_tagged(&path, NONCES_FORMAT, |l: &NonceLog| l.format.as_str())? else {
            return Ok(BTreeMap::new());
        };
        Ok(log.nonces)
    }

    /// Spends the nonce of a verified rollback proof: forgets nonces whose
    /// statements have expired by `now`, then records `nonce` (until
    /// `forget_after`) durably, before the rollback it authorises is applied,
    /// so a crash cannot make it usable twice.
    pub fn spend_nonce(
        &mut self,
        nonce: &str,
        forget_after: i64,
        now: i64,
    ) -> Result<NonceCheck, StoreError> {
        let mut next = self.nonces.clone();
        next.retain(|_, until| *until >= now);
        if next.contains_key(nonce) {
            return Ok(NonceCheck::Replayed);
        }
        if next.len() >= MAX_NONCES {
            return Ok(NonceCheck::Full);
        }
        next.insert(nonce.to_string(), forget_after);
        let bytes = serde_json::to_vec(&serde_json::json!({
            "format": NONCES_FORMAT,
            "nonces": next,
        }))
        .map_err(|e| StoreError::CorruptState {
            path: self.dir.join(NONCES_FILE),
            reason: format!("cannot serialise: {e}"),
        })?;
        atomic_write(&self.dir.join(NONCES_FILE), &bytes)?;
        self.nonces = next;
        Ok(NonceCheck::Fresh)
    }

    /// The data dir.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The path a bundle with this digest is stored at.
    pub fn bundle_path(&self, digest: &str) -> PathBuf {
        self.dir.join(BUNDLES_DIR).join(bundle_file_name(digest))
    }

    /// The bundle active for `policy_id`, if any.
    pub fn active(&self, policy_id: &str) -> Option<&ActiveRecord> {
        self.policies.get(policy_id)?.active.as_ref()
    }

    /// Every active policy, by id.
    pub fn active_all(&self) -> BTreeMap<&str, &ActiveRecord> {
        self.policies
            .iter()
            .filter_map(|(id, p)| p.active.as_ref().map(|a| (id.as_str(), a)))
            .collect()
    }

    /// What [`Store::open`] refused to serve because it no longer verified,
    /// and that no deploy or rollback of its policy has replaced since.
    pub fn integrity_events(&self) -> Vec<String> {
        self.integrity_view.snapshot()
    }

    /// A handle on [`Store::integrity_events`] that stays current and can be
    /// read without the store.
    pub fn integrity_view(&self) -> IntegrityView {
        self.integrity_view.clone()
    }

    /// Stored bundles, newest first; only `policy_id`'s when given.
    pub fn list(&self, policy_id: Option<&str>) -> Vec<Listed> {
        let mut items: Vec<(u64, Listed)> = self
            .policies
            .values()
            .filter(|p| policy_id.is_none_or(|id| id == p.policy_id))
            .flat_map(|p| {
                let active = p.active.as_ref().map(|a| a.digest.as_str());
                p.bundles.iter().map(move |(digest, info)| {
                    (
                        info.seq,
                        Listed {
                            digest: digest.clone(),
                            version: info.version.clone(),
                            policy_id: p.policy_id.clone(),
                            stored_at: info.stored_at.clone(),
                            active: Some(digest.as_str()) == active,
                        },
                    )
                })
            })
            .collect();
        items.sort_by(|a, b| {
            b.0.cmp(&a.0)
                .then_with(|| b.1.stored_at.cmp(&a.1.stored_at))
        });
        items.into_iter().map(|(_, l)| l).collect()
    }

    /// Reads a stored bundle back and re-checks its digest.
    pub fn load_bundle(&self, digest: &str) -> Result<Bundle, StoreError> {
        load_bundle_file(&self.bundle_path(digest), digest)
    }

    /// The policy a stored bundle belongs to, if it is stored.
    pub fn owner(&self, digest: &str) -> Option<&str> {
        self.policies
            .values()
            .find(|p| p.bundles.contains_key(digest))
            .map(|p| p.policy_id.as_str())
    }

    /// The `POST /deploy` transition for the bundle's policy: checks the
    /// idempotency key, stores the bundle, activates it and prunes that
    /// policy's old bundles, in that order. No other policy is read or written.
    pub fn deploy(
        &mut self,
        key: &str,
        env: &str,
        incoming: &Incoming,
        hook_configured: bool,
    ) -> Result<DeployOutcome, StoreError> {
        let pid = incoming.policy_id.as_str();
        // Fenced first: a stale holder learns it is stale whatever else
        // its request would have been (a repeat included).
        if let Some(refusal) = self
            .policies
            .get(pid)
            .and_then(|p| p.fence_refusal(incoming.fence))
        {
            return Ok(DeployOutcome::FenceStale(refusal));
        }
        if let Some(owner) = self.keys.get(key) {
            let p = &self.policies[owner];
            let seen = &p.idempotency[key];
            let same = owner == pid
                && seen.digest == incoming.digest
                && seen.env.as_deref().is_none_or(|e| e == env);
            if !same {
                return Ok(DeployOutcome::KeyConflict {
                    previous: format!(
                        "policy {owner}, {} for env {}",
                        seen.digest,
                        seen.env.as_deref().unwrap_or("(unknown)")
                    ),
                });
            }
            // A repeat is a no-op only while its bundle is still active. Once
            // it was rolled back, the same request is a deliberate re-deploy
            // (the key is `<digest>:<env>`, so it cannot differ) and must
            // activate the bundle again, or the pusher's verification fails.
            if let Some(a) = p.active.as_ref().filter(|a| a.digest == incoming.digest) {
                let a = a.clone();
                if incoming.fence > p.fence {
                    // A newer lock repeated it: older holders are now stale.
                    let mut next = p.clone();
                    next.accept_fence(incoming.fence);
                    self.commit(next)?;
                }
                return Ok(DeployOutcome::Repeat(a));
            }
        }
        self.put_bundle_file(incoming)?;
        let mut next = self
            .policies
            .get(pid)
            .cloned()
            .unwrap_or_else(|| PolicyState::new(pid));
        let seq = self.seq + 1;
        next.bundles.insert(
            incoming.digest.clone(),
            StoredInfo {
                version: incoming.version.clone(),
                stored_at: now_rfc3339(),
                seq,
            },
        );
        next.idempotency.insert(
            key.to_string(),
            KeyRecord {
                digest: incoming.digest.clone(),
                env: Some(env.to_string()),
                seq,
            },
        );
        let forgotten = trim_keys(&mut next);
        next.accept_fence(incoming.fence);
        let outcome = match next.active.as_ref().filter(|a| a.digest == incoming.digest) {
            Some(a) => DeployOutcome::AlreadyActive(a.clone()),
            None => {
                let record =
                    next.record_for(&incoming.digest, Some(env.to_string()), hook_configured);
                push_history(&mut next, &record.digest);
                next.active = Some(record.clone());
                DeployOutcome::Activated(record)
            }
        };
        let pruned = prune(&mut next, self.keep);
        self.commit(next)?;
        self.seq = seq;
        for k in forgotten {
            self.keys.remove(&k);
        }
        self.keys.insert(key.to_string(), pid.to_string());
        self.delete_files(&pruned);
        Ok(outcome)
    }

    /// The digest `rollback(policy_id, None)` would return to, if any.
    pub fn previous(&self, policy_id: &str) -> Option<&str> {
        let h = &self.policies.get(policy_id)?.history;
        (h.len() >= 2).then(|| h[h.len() - 2].as_str())
    }

    /// The `POST /rollback` transition for one policy: `Some(digest)`
    /// activates that stored bundle of the policy; `None` returns the policy
    /// to the activation before its current one. A `fence` (push protocol
    /// v4) lower than the policy's highest, or one a rollback was already
    /// accepted at, is refused; a rollback to the digest already active is
    /// answered as such first, so a retry of an applied rollback succeeds.
    pub fn rollback(
        &mut self,
        policy_id: &str,
        to: Option<&str>,
        fence: Option<u64>,
        hook_configured: bool,
    ) -> Result<RollbackOutcome, StoreError> {
        if let Some(p) = self.policies.get(policy_id)
            && let Some(refusal) = p.fence_refusal(fence)
        {
            let lower = fence.unwrap_or(0) < refusal.highest;
            let active = p
                .active
                .as_ref()
                .filter(|a| !lower && to.is_some_and(|d| d == a.digest));
            return Ok(match active {
                Some(a) => RollbackOutcome::AlreadyActive(a.clone()),
                None => RollbackOutcome::FenceStale(refusal),
            });
        }
        if let Some(digest) = to
            && let Some(owner) = self.owner(digest)
            && owner != policy_id
        {
            return Ok(RollbackOutcome::OtherPolicy {
                owner: owner.to_string(),
            });
        }
        let Some(current) = self.policies.get(policy_id) else {
            return Ok(match to {
                Some(_) => RollbackOutcome::Unknown,
                None => RollbackOutcome::NothingToRollBack,
            });
        };
        let mut next = current.clone();
        let env = next.active.as_ref().and_then(|a| a.env.clone());
        next.accept_fence(fence);
        if fence.is_some() {
            next.rollback_fence = fence;
        }
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
                    let was = next.active.take().map(|a| a.digest).unwrap_or_default();
                    self.commit(next)?;
                    return Ok(RollbackOutcome::Deactivated { digest: was });
                }
                if next.history.len() < 2 || next.active.is_none() {
                    return Ok(RollbackOutcome::NothingToRollBack);
                }
                next.history.pop();
                match next.history.last() {
                    Some(d) => d.clone(),
                    None => return Ok(RollbackOutcome::NothingToRollBack),
                }
            }
        };
        let record = next.record_for(&target, env, hook_configured);
        next.active = Some(record.clone());
        self.commit(next)?;
        Ok(RollbackOutcome::Activated(record))
    }

    /// Records whether the activation hook failed, if `digest` is still the
    /// active bundle of `policy_id`.
    pub fn set_hook_failed(
        &mut self,
        policy_id: &str,
        digest: &str,
        failed: bool,
    ) -> Result<(), StoreError> {
        let Some(mut next) = self.policies.get(policy_id).cloned() else {
            return Ok(());
        };
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

    fn commit(&mut self, next: PolicyState) -> Result<(), StoreError> {
        self.write_policy(&next)?;
        // Writing what is served replaces the refused record on disk: the
        // policy's state is now a deliberate one, and nothing is left to
        // report for it.
        if self.integrity.remove(&next.policy_id).is_some() {
            info!(policy_id = %next.policy_id, "integrity problem resolved: the policy's state was replaced by a verified deploy or rollback");
            self.publish_integrity();
        }
        self.policies.insert(next.policy_id.clone(), next);
        Ok(())
    }

    fn write_policy(&self, state: &PolicyState) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec_pretty(state).map_err(|e| StoreError::CorruptState {
            path: self.policy_path(&state.policy_id),
            reason: format!("cannot serialise: {e}"),
        })?;
        atomic_write(&self.policy_path(&state.policy_id), &bytes)
    }

    fn policy_path(&self, policy_id: &str) -> PathBuf {
        self.dir
            .join(POLICIES_DIR)
            .join(format!("{policy_id}.json"))
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

fn bundle_file_name(digest: &str) -> String {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    format!("{hex}.json")
}

fn push_history(state: &mut PolicyState, digest: &str) {
    state.history.push(digest.to_string());
    if state.history.len() > MAX_HISTORY {
        let excess = state.history.len() - MAX_HISTORY;
        state.history.drain(..excess);
    }
}

/// Forgets the oldest keys of a policy beyond [`MAX_KEYS_PER_POLICY`] and
/// returns them.
fn trim_keys(state: &mut PolicyState) -> Vec<String> {
    let excess = state.idempotency.len().saturating_sub(MAX_KEYS_PER_POLICY);
    if excess == 0 {
        return Vec::new();
    }
    let mut by_age: Vec<(u64, String)> = state
        .idempotency
        .iter()
        .map(|(k, r)| (r.seq, k.clone()))
        .collect();
    by_age.sort();
    let forgotten: Vec<String> = by_age.into_iter().take(excess).map(|(_, k)| k).collect();
    for k in &forgotten {
        state.idempotency.remove(k);
    }
    forgotten
}

/// Drops all but the `keep` newest bundles of one policy from its index and
/// returns the digests dropped (their files go after the commit). The active
/// bundle and the one a rollback would return to are never dropped; they
/// count towards `keep`.
fn prune(state: &mut PolicyState, keep: usize) -> Vec<String> {
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
    use pde_core::bundle::{Manifest, Payload};

    fn accept_all(_: &Bundle) -> Result<(), String> {
        Ok(())
    }

    fn open(dir: &Path, keep: usize) -> Store {
        Store::open(dir, keep, &accept_all).unwrap()
    }

    fn incoming_for(policy_id: &str, version: &str) -> Incoming {
        let key = ed25519_dalek::SigningKey::from_bytes(&[3; 32]);
        let bundle = Bundle::seal(
            Payload {
                manifest: Manifest {
                    policy_id: policy_id.into(),
                    version: version.into(),
                    source_commit: "c".into(),
                    validators: vec![],
                },
                policy: serde_json::json!({"id": policy_id, "version": version}),
            },
            &[&key],
        )
        .unwrap();
        Incoming {
            digest: bundle.digest.clone(),
            version: version.into(),
            policy_id: policy_id.into(),
            bytes: bundle.to_canonical_bytes(),
            fence: None,
        }
    }

    fn incoming(version: &str) -> Incoming {
        incoming_for("42", version)
    }

    fn key(i: &Incoming, env: &str) -> String {
        format!("{}:{env}", i.digest)
    }

    #[test]
    fn policies_are_activated_and_rolled_back_independently() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(dir.path(), 10);
        let a42 = incoming_for("42", "1.0.0");
        let b42 = incoming_for("42", "1.1.0");
        let a43 = incoming_for("43", "2.0.0");
        store.deploy(&key(&a42, "dev"), "dev", &a42, false).unwrap();
        store.deploy(&key(&a43, "dev"), "dev", &a43, false).unwrap();
        store.deploy(&key(&b42, "dev"), "dev", &b42, false).unwrap();
        assert_eq!(store.active("42").unwrap().digest, b42.digest);
        assert_eq!(store.active("43").unwrap().digest, a43.digest);
        // Going back one for 42 returns to 42's previous, not to 43's bundle.
        store.rollback("42", None, None, false).unwrap();
        assert_eq!(store.active("42").unwrap().digest, a42.digest);
        assert_eq!(store.active("43").unwrap().digest, a43.digest);
        // Going back one from 43's first activation deactivates 43 alone.
        assert!(matches!(
            store.rollback("43", None, None, false).unwrap(),
            RollbackOutcome::Deactivated { .. }
        ));
        assert!(store.active("43").is_none());
        assert_eq!(store.active("42").unwrap().digest, a42.digest);
        // A digest of another policy is refused by name.
        assert_eq!(
            store
                .rollback("43", Some(&b42.digest), None, false)
                .unwrap(),
            RollbackOutcome::OtherPolicy { owner: "42".into() }
        );
        drop(store);
        let store = open(dir.path(), 10);
        assert_eq!(store.active_all().len(), 1);
        assert_eq!(store.active("42").unwrap().digest, a42.digest);
    }

    #[test]
    fn a_key_binds_policy_digest_and_env() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(dir.path(), 10);
        let a = incoming("1.0.0");
        let other = incoming_for("43", "1.0.0");
        let k = key(&a, "dev");
        assert!(matches!(
            store.deploy(&k, "dev", &a, false).unwrap(),
            DeployOutcome::Activated(_)
        ));
        assert!(matches!(
            store.deploy(&k, "dev", &a, false).unwrap(),
            DeployOutcome::Repeat(_)
        ));
        for (env, inc) in [("staging", &a), ("dev", &other)] {
            assert!(
                matches!(
                    store.deploy(&k, env, inc, false).unwrap(),
                    DeployOutcome::KeyConflict { .. }
                ),
                "key reused with env {env} / policy {}",
                inc.policy_id
            );
        }
        assert!(
            store.active("43").is_none(),
            "a refused deploy stores nothing"
        );
    }

    #[test]
    fn fences_only_grow_and_a_rollback_spends_its_fence() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(dir.path(), 10);
        let at = |i: &Incoming, f: Option<u64>| Incoming {
            fence: f,
            ..i.clone()
        };
        let (a, b, c) = (incoming("1.0.0"), incoming("1.1.0"), incoming("1.2.0"));
        // Unfenced (protocol v3) requests work until a fence is seen.
        assert!(matches!(
            store.deploy(&key(&a, "p"), "p", &a, false).unwrap(),
            DeployOutcome::Activated(_)
        ));
        assert!(matches!(
            store
                .deploy(&key(&b, "p"), "p", &at(&b, Some(20)), false)
                .unwrap(),
            DeployOutcome::Activated(_)
        ));
        // Lower, or none at all, is refused; the same fence repeats.
        for f in [None, Some(19)] {
            assert!(
                matches!(
                    store.deploy(&key(&c, "p"), "p", &at(&c, f), false).unwrap(),
                    DeployOutcome::FenceStale(FenceRefusal { highest: 20, .. })
                ),
                "{f:?}"
            );
            assert!(matches!(
                store.rollback("42", Some(&a.digest), f, false).unwrap(),
                RollbackOutcome::FenceStale(_)
            ));
        }
        assert!(matches!(
            store
                .deploy(&key(&b, "p"), "p", &at(&b, Some(20)), false)
                .unwrap(),
            DeployOutcome::Repeat(_)
        ));
        // A rollback at 20 (the compensation of that deploy) is taken once;
        // its retry to the same digest is answered, another is refused,
        // and so is the deploy it undid.
        assert!(matches!(
            store
                .rollback("42", Some(&a.digest), Some(20), false)
                .unwrap(),
            RollbackOutcome::Activated(_)
        ));
        assert!(matches!(
            store
                .rollback("42", Some(&a.digest), Some(20), false)
                .unwrap(),
            RollbackOutcome::AlreadyActive(_)
        ));
        assert!(matches!(
            store.rollback("42", None, Some(20), false).unwrap(),
            RollbackOutcome::FenceStale(_)
        ));
        assert!(matches!(
            store
                .deploy(&key(&b, "p"), "p", &at(&b, Some(20)), false)
                .unwrap(),
            DeployOutcome::FenceStale(_)
        ));
        // A newer lock may do anything again; and it all survives a restart.
        assert!(matches!(
            store
                .deploy(&key(&c, "p"), "p", &at(&c, Some(30)), false)
                .unwrap(),
            DeployOutcome::Activated(_)
        ));
        drop(store);
        let mut store = open(dir.path(), 10);
        assert!(matches!(
            store
                .deploy(&key(&b, "p"), "p", &at(&b, Some(29)), false)
                .unwrap(),
            DeployOutcome::FenceStale(FenceRefusal { highest: 30, .. })
        ));
    }

    #[test]
    fn keys_are_bounded_per_policy() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(dir.path(), 2);
        let a = incoming("1.0.0");
        for i in 0..1000 {
            store.deploy(&format!("k{i}"), "dev", &a, false).unwrap();
        }
        let p = &store.policies["42"];
        assert_eq!(p.idempotency.len(), MAX_KEYS_PER_POLICY);
        assert!(!p.idempotency.contains_key("k0"));
        assert_eq!(store.keys.len(), MAX_KEYS_PER_POLICY);
        // What a deploy rewrites stays small however long the history is.
        let size = std::fs::metadata(dir.path().join("policies/42.json"))
            .unwrap()
            .len();
        assert!(size < 64 * 1024, "policies/42.json is {size} bytes");
    }

    #[test]
    fn a_policys_document_stays_under_its_bound_at_every_field_s_limit() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(dir.path(), 10);
        // Versions, keys and env at the longest the routes accept.
        let bundles: Vec<Incoming> = (0..12)
            .map(|i| incoming(&format!("1.0.{i}-{}", "x".repeat(120))))
            .inspect(|b| assert!(b.version.len() <= 128))
            .collect();
        let env = "e".repeat(128);
        // Every bundle stored, then the two newest in turn: a full history.
        for i in 0..300 {
            let key = format!("{i:0>512}");
            let b = if i < 12 {
                &bundles[i]
            } else {
                &bundles[10 + i % 2]
            };
            store.deploy(&key, &env, b, false).unwrap();
        }
        let p = &store.policies["42"];
        assert_eq!(p.idempotency.len(), MAX_KEYS_PER_POLICY);
        assert_eq!(p.history.len(), MAX_HISTORY);
        let size = std::fs::metadata(dir.path().join("policies/42.json"))
            .unwrap()
            .len();
        assert!(
            size < MAX_POLICY_DOC_BYTES,
            "policies/42.json is {size} bytes, over {MAX_POLICY_DOC_BYTES}"
        );
        // Each further bundle kept costs at most its documented share.
        let entry = serde_json::to_vec_pretty(&p.bundles).unwrap().len() / p.bundles.len();
        assert!((entry as u64) < POLICY_DOC_BYTES_PER_KEPT, "{entry}");
    }

    #[test]
    fn prune_keeps_the_newest_and_the_active() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(dir.path(), 2);
        let a = incoming("1.0.0");
        let b = incoming("1.1.0");
        let c = incoming("1.2.0");
        let other = incoming_for("43", "1.0.0");
        store.deploy("o", "dev", &other, false).unwrap();
        for (i, x) in [&a, &b, &c].into_iter().enumerate() {
            store.deploy(&format!("k{i}"), "dev", x, false).unwrap();
        }
        let listed: Vec<String> = store
            .list(Some("42"))
            .into_iter()
            .map(|l| l.digest)
            .collect();
        assert_eq!(listed, vec![c.digest.clone(), b.digest.clone()]);
        assert!(!store.bundle_path(&a.digest).exists());
        // Keep counts per policy: 43's only bundle is not pruned by 42's.
        assert!(store.bundle_path(&other.digest).exists());
        // Roll back to b, then deploy a again: b is what a rollback would
        // return to, so c goes although it is newer.
        store.rollback("42", None, None, false).unwrap();
        assert_eq!(store.active("42").unwrap().digest, b.digest);
        store.deploy("k3", "dev", &a, false).unwrap();
        let listed: Vec<String> = store
            .list(Some("42"))
            .into_iter()
            .map(|l| l.digest)
            .collect();
        assert_eq!(listed, vec![a.digest.clone(), b.digest.clone()]);
        assert_eq!(store.list(None).len(), 3);
    }

    #[test]
    fn reopen_removes_debris_and_indexes_orphans() {
        let dir = tempfile::tempdir().unwrap();
        let a = incoming("1.0.0");
        {
            let mut store = open(dir.path(), 10);
            store.deploy("k", "dev", &a, false).unwrap();
        }
        // A crash after storing b's file but before the state named it,
        // plus a torn temp file.
        let b = incoming_for("43", "2.0.0");
        let hex = b.digest.strip_prefix("sha256:").unwrap();
        std::fs::write(
            dir.path().join("bundles").join(format!("{hex}.json")),
            &b.bytes,
        )
        .unwrap();
        let torn = dir.path().join("policies").join(".tmp-42.json-1");
        std::fs::write(&torn, b"{\"torn").unwrap();
        let store = open(dir.path(), 10);
        assert_eq!(store.active("42").unwrap().digest, a.digest);
        assert_eq!(store.owner(&b.digest), Some("43"));
        assert!(store.active("43").is_none());
        assert!(!torn.exists());
    }

    #[test]
    fn an_active_bundle_that_no_longer_verifies_is_not_served() {
        let dir = tempfile::tempdir().unwrap();
        let a = incoming("1.0.0");
        let b = incoming("1.1.0");
        {
            let mut store = open(dir.path(), 10);
            store.deploy("ka", "dev", &a, false).unwrap();
            store.deploy("kb", "dev", &b, false).unwrap();
        }
        // Edit the active bundle on disk.
        let path = dir.path().join("bundles").join(bundle_file_name(&b.digest));
        let edited = String::from_utf8(b.bytes.clone())
            .unwrap()
            .replace("1.1.0", "9.9.9");
        std::fs::write(&path, edited).unwrap();
        let store = open(dir.path(), 10);
        assert_eq!(store.active("42").unwrap().digest, a.digest);
        assert_eq!(store.integrity_events().len(), 1);
        assert!(store.integrity_events()[0].contains(&b.digest));
        drop(store);
        // And a verifier that refuses everything leaves nothing active.
        let refuse = |_: &Bundle| Err("untrusted".to_string());
        let store = Store::open(dir.path(), 10, &refuse).unwrap();
        assert!(store.active("42").is_none());
    }

    #[test]
    fn a_refusal_at_start_is_not_written_and_restored_trust_serves_the_bundle_again() {
        let dir = tempfile::tempdir().unwrap();
        let a = incoming("1.0.0");
        let b = incoming("1.1.0");
        {
            let mut store = open(dir.path(), 10);
            store.deploy("ka", "dev", &a, false).unwrap();
            store.deploy("kb", "dev", &b, false).unwrap();
        }
        let doc = dir.path().join("policies/42.json");
        let recorded = std::fs::read(&doc).unwrap();
        // The key that signed b is not trusted (twice: the problem persists).
        let b_digest = b.digest.clone();
        let refuse_b = move |bundle: &Bundle| {
            if bundle.digest == b_digest {
                Err("signed by an untrusted key".to_string())
            } else {
                Ok(())
            }
        };
        for _ in 0..2 {
            let store = Store::open(dir.path(), 10, &refuse_b).unwrap();
            assert_eq!(store.active("42").unwrap().digest, a.digest);
            let events = store.integrity_events();
            assert_eq!(events.len(), 1, "{events:?}");
            assert!(events[0].contains(&b.digest), "{events:?}");
            assert_eq!(store.integrity_view().snapshot(), events);
            assert_eq!(std::fs::read(&doc).unwrap(), recorded, "history rewritten");
        }
        // Trusted again: b is served, with its history, and nothing is reported.
        let store = open(dir.path(), 10);
        assert_eq!(store.active("42").unwrap().digest, b.digest);
        assert_eq!(store.previous("42"), Some(a.digest.as_str()));
        assert!(store.integrity_events().is_empty());
        drop(store);
        // A deliberate deploy while refused builds on what is served, is
        // written, and resolves the problem.
        let refuse = |_: &Bundle| Err("untrusted".to_string());
        let mut store = Store::open(dir.path(), 10, &refuse).unwrap();
        assert!(store.active("42").is_none());
        let view = store.integrity_view();
        assert_eq!(view.snapshot().len(), 2, "{:?}", view.snapshot());
        let c = incoming("1.2.0");
        store.deploy("kc", "dev", &c, false).unwrap();
        assert!(view.snapshot().is_empty());
        drop(store);
        let store = open(dir.path(), 10);
        assert_eq!(store.active("42").unwrap().digest, c.digest);
        assert_eq!(store.previous("42"), None);
    }

    #[test]
    fn a_v1_data_dir_is_migrated_per_policy() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("bundles")).unwrap();
        let a42 = incoming_for("42", "1.0.0");
        let a43 = incoming_for("43", "1.0.0");
        for i in [&a42, &a43] {
            std::fs::write(
                dir.path().join("bundles").join(bundle_file_name(&i.digest)),
                &i.bytes,
            )
            .unwrap();
        }
        let v1 = serde_json::json!({
            "format": "pde.agent-state/v1", "seq": 2,
            "active": {"digest": a43.digest, "version": "1.0.0", "policy_id": "43",
                       "env": "dev", "activated_at": "2026-01-01T00:00:00Z"},
            "history": [a42.digest, a43.digest],
            "bundles": {
                a42.digest.clone(): {"version": "1.0.0", "policy_id": "42", "stored_at": "t", "seq": 1},
                a43.digest.clone(): {"version": "1.0.0", "policy_id": "43", "stored_at": "t", "seq": 2}},
            "idempotency": {format!("{}:dev", a43.digest): {"digest": a43.digest, "seq": 2}}
        });
        std::fs::write(dir.path().join("state.json"), v1.to_string()).unwrap();
        let mut store = open(dir.path(), 10);
        assert!(!dir.path().join("state.json").exists());
        assert!(dir.path().join("state.v1.json").exists());
        assert_eq!(store.active("43").unwrap().digest, a43.digest);
        // The v1 slot held one bundle: 42 had been displaced, so it is not active.
        assert!(store.active("42").is_none());
        assert_eq!(store.owner(&a42.digest), Some("42"));
        assert!(matches!(
            store.deploy(&key(&a43, "dev"), "dev", &a43, false).unwrap(),
            DeployOutcome::Repeat(_)
        ));
    }

    #[test]
    fn a_data_dir_is_opened_by_one_store_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let first = open(dir.path(), 10);
        assert!(matches!(
            Store::open(dir.path(), 10, &accept_all),
            Err(StoreError::InUse(_))
        ));
        drop(first);
        open(dir.path(), 10);
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
        assert!(!is_valid_policy_id("../42"));
        assert!(is_valid_policy_id("42"));
    }
}
