//! Deployment state: history, the active version per environment, and locks.
//!
//! State lives in an embedded SQLite database at `<state>/state.db` (DESIGN
//! §5). SQLite because it needs no server, survives crashes (WAL journal,
//! transactions), and is one file engineers can inspect with `sqlite3`. The
//! schema is versioned through `PRAGMA user_version`: each entry of
//! [`MIGRATIONS`] runs once, in order, inside a transaction, and a database
//! written by a newer pde is refused rather than misread.
//!
//! Locks are *not* in the database: a deploy holds an OS file lock on
//! `<state>/locks/<policy>@<env>.lock` (`File::try_lock`). The OS releases it
//! when the process dies, so a crashed deploy never leaves a stale lock that
//! someone must clear by hand, which a lock row in a table would.
//!
//! The connection sits behind a `Mutex` so a [`StateStore`] can be shared
//! across the pipeline's tasks; every call is short.
//!
//! A team shares its state instead (issue 12): `[state] url = "postgres://…"`
//! selects [`pg::PgState`]. Both backends implement [`StateBackend`], the one
//! interface the engine uses, and one set of behaviour tests runs against
//! both (`host/engine/src/state/tests.rs` for SQLite, `tests/team.rs` for
//! PostgreSQL through the same functions).

pub mod pg;

use std::fs;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};

use pde_core::{ExitCode, HasExitCode};

/// Schema migrations; `user_version` = how many of them have run.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE deployments (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    policy_id   TEXT NOT NULL,
    env         TEXT NOT NULL,
    version     TEXT NOT NULL,
    digest      TEXT NOT NULL,
    outcome     TEXT NOT NULL,
    started_at  TEXT NOT NULL,
    finished_at TEXT NOT NULL,
    actor       TEXT NOT NULL
);
CREATE INDEX deployments_by_policy ON deployments (policy_id, id);
CREATE INDEX deployments_by_digest ON deployments (env, policy_id, digest, outcome);
CREATE TABLE targets (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    deployment_id   INTEGER NOT NULL REFERENCES deployments (id) ON DELETE CASCADE,
    service         TEXT NOT NULL,
    outcome         TEXT NOT NULL,
    previous_digest TEXT,
    detail          TEXT NOT NULL
);
CREATE INDEX targets_by_deployment ON targets (deployment_id, id);
CREATE TABLE active (
    policy_id   TEXT NOT NULL,
    env         TEXT NOT NULL,
    version     TEXT NOT NULL,
    digest      TEXT NOT NULL,
    deployed_at TEXT NOT NULL,
    PRIMARY KEY (policy_id, env)
);
"#,
    r#"
-- What each service runs, per policy and environment (push protocol v2):
-- a service holds many policies, and each is activated on its own.
-- `digest` NULL means unknown: a compensation failed there.
CREATE TABLE service_active (
    policy_id   TEXT NOT NULL,
    env         TEXT NOT NULL,
    service     TEXT NOT NULL,
    version     TEXT,
    digest      TEXT,
    updated_at  TEXT NOT NULL,
    PRIMARY KEY (policy_id, env, service)
);
"#,
    r#"
-- Deploys are recorded `in-progress` when their push starts (issue 12), so
-- a killed one is seen; older pde could not read that outcome.
CREATE INDEX deployments_in_progress ON deployments (outcome, policy_id, env);
"#,
    r#"
-- The bundles deploys pushed, by digest (issue 13): validators built
-- against pde:plugin@0.2.0 are shown the policy active in the target
-- environment, read from its bundle here.
CREATE TABLE bundles (
    digest    TEXT PRIMARY KEY,
    bytes     BLOB NOT NULL,
    stored_at TEXT NOT NULL
);
"#,
];

/// How a recorded deployment (or rollback) ended. Stored as its kebab-case
/// name, the same word `--output json` shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RecordOutcome {
    /// Every routed service runs the bundle.
    Deployed,
    /// A push failed and every target was sent back.
    RolledBack,
    /// A push failed and some compensation failed too.
    NeedsAttention,
    /// `pde rollback` returned every holder to this bundle.
    Rollback,
    /// `pde rollback` failed on some holder.
    RollbackFailed,
    /// Recorded when a push (or rollback) starts; replaced by its outcome
    /// when it ends. Still there while nobody holds the lock: the process
    /// died mid-push, which reads as [`RecordOutcome::Interrupted`].
    InProgress,
    /// The deploy or rollback was killed mid-way; the next one of that
    /// policy and environment settles it.
    Interrupted,
}

impl RecordOutcome {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            RecordOutcome::Deployed => "deployed",
            RecordOutcome::RolledBack => "rolled-back",
            RecordOutcome::NeedsAttention => "needs-attention",
            RecordOutcome::Rollback => "rollback",
            RecordOutcome::RollbackFailed => "rollback-failed",
            RecordOutcome::InProgress => "in-progress",
            RecordOutcome::Interrupted => "interrupted",
        }
    }

    /// Whether the environment ran this bundle afterwards (a deploy or a
    /// rollback that completed).
    pub fn took_effect(self) -> bool {
        matches!(self, RecordOutcome::Deployed | RecordOutcome::Rollback)
    }
}

impl std::fmt::Display for RecordOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

impl rusqlite::types::ToSql for RecordOutcome {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        Ok(self.as_str().into())
    }
}

impl RecordOutcome {
    /// The outcome stored as `text`, if it names one.
    pub fn parse(text: &str) -> Option<RecordOutcome> {
        [
            RecordOutcome::Deployed,
            RecordOutcome::RolledBack,
            RecordOutcome::NeedsAttention,
            RecordOutcome::Rollback,
            RecordOutcome::RollbackFailed,
            RecordOutcome::InProgress,
            RecordOutcome::Interrupted,
        ]
        .into_iter()
        .find(|o| o.as_str() == text)
    }
}

impl rusqlite::types::FromSql for RecordOutcome {
    fn column_result(value: rusqlite::types::ValueRef<'_>) -> rusqlite::types::FromSqlResult<Self> {
        let text = value.as_str()?;
        RecordOutcome::parse(text).ok_or_else(|| {
            rusqlite::types::FromSqlError::Other(
                format!("unknown deployment outcome {text:?}").into(),
            )
        })
    }
}

use pde_core::clock::now_rfc3339;

/// Why the state store failed.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The state directory or a lock file could not be created or opened.
    #[error(
        "cannot use state path {path}: {source} (check that the `state` directory in pde.toml is writable)"
    )]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A database operation failed.
    #[error("state database {path}: {action} failed: {source}")]
    Db {
        /// The database file.
        path: PathBuf,
        /// What was being done.
        action: &'static str,
        /// SQLite's error.
        #[source]
        source: rusqlite::Error,
    },
    /// A PostgreSQL operation failed.
    #[error("state database {location}: {action} failed: {source}")]
    Pg {
        /// The database URL (it never holds a password).
        location: String,
        /// What was being done.
        action: &'static str,
        /// The client's error.
        #[source]
        source: postgres::Error,
    },
    /// The shared database cannot be used as configured.
    #[error("state database {location}: {message}")]
    PgConfig {
        /// The database URL (it never holds a password).
        location: String,
        /// What is wrong and how to fix it.
        message: String,
    },
    /// The database was written by a newer pde.
    #[error(
        "state database {path} has schema version {found}, this pde knows up to {supported}; upgrade pde"
    )]
    TooNew {
        /// The database file or URL.
        path: PathBuf,
        /// Its `user_version`.
        found: i64,
        /// The newest this build knows.
        supported: i64,
    },
    /// Another deploy of the same policy and environment is running.
    #[error("policy {policy_id:?} is being deployed to {env:?} by another process{}; wait for it to finish", holder_suffix(.holder))]
    Locked {
        /// The policy.
        policy_id: String,
        /// The environment.
        env: String,
        /// What the holder wrote into the lock file (pid, start time), if readable.
        holder: String,
    },
    /// A policy id or environment name that cannot name a lock file.
    #[error(
        "{what} {value:?} cannot be used in a lock file name: use letters, digits, '.', '_' and '-'"
    )]
    BadName {
        /// `policy id` or `environment`.
        what: &'static str,
        /// The value.
        value: String,
    },
}

fn holder_suffix(holder: &str) -> String {
    if holder.is_empty() {
        String::new()
    } else {
        format!(" ({holder})")
    }
}

impl HasExitCode for StateError {
    fn exit_code(&self) -> ExitCode {
        match self {
            StateError::Locked { .. } => ExitCode::Locked,
            StateError::Io { .. }
            | StateError::Db { .. }
            | StateError::Pg { .. }
            | StateError::PgConfig { .. }
            | StateError::TooNew { .. }
            | StateError::BadName { .. } => ExitCode::Usage,
        }
    }
}

/// The version active for one policy in one environment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Active {
    /// Semver version.
    pub version: String,
    /// Bundle digest, `sha256:<hex>`.
    pub digest: String,
    /// When it became active (RFC 3339 UTC).
    pub deployed_at: String,
}

/// One row of `pde status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActiveEntry {
    /// The policy.
    pub policy_id: String,
    /// The environment.
    pub env: String,
    /// Semver version.
    pub version: String,
    /// Bundle digest.
    pub digest: String,
    /// When it became active (RFC 3339 UTC).
    pub deployed_at: String,
    /// What each service of the environment that took part runs for this
    /// policy, by service name.
    #[serde(default)]
    pub services: Vec<ServiceHolding>,
    /// A deploy or rollback of this policy here that was killed mid-way;
    /// `services` is what each target was last known to run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interrupted: Option<Box<DeploymentRecord>>,
}

/// What one service runs for one policy in one environment, as pde last saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceHolding {
    /// Service name.
    pub service: String,
    /// The version it runs; `None` when unknown (see `digest`).
    pub version: Option<String>,
    /// The digest it runs; `None` when unknown: a compensation or rollback
    /// failed there, and someone must look.
    pub digest: Option<String>,
    /// When pde last changed or confirmed it (RFC 3339 UTC).
    pub updated_at: String,
}

/// One deployment attempt, as recorded after it finished.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeploymentRecord {
    /// Row id; `None` before [`StateStore::record`].
    pub id: Option<i64>,
    /// The policy.
    pub policy_id: String,
    /// The environment.
    pub env: String,
    /// Semver version deployed.
    pub version: String,
    /// Bundle digest.
    pub digest: String,
    /// `deployed`, `rolled-back`, `needs-attention` or `failed`.
    pub outcome: RecordOutcome,
    /// RFC 3339 UTC.
    pub started_at: String,
    /// RFC 3339 UTC.
    pub finished_at: String,
    /// Who ran it.
    pub actor: String,
    /// Per-service results, in the order given.
    pub targets: Vec<TargetRecord>,
}

/// What happened at one service during a deployment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetRecord {
    /// Service name.
    pub service: String,
    /// Per-target outcome.
    pub outcome: String,
    /// The digest the service had before, if any.
    pub previous_digest: Option<String>,
    /// Human detail (status code, error), never a secret.
    pub detail: String,
}

/// Who holds (or last held) the deploy lock of a policy and environment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The policy.
    pub policy_id: String,
    /// The environment.
    pub env: String,
    /// Who ran the deploy ([`crate::audit::default_actor`]).
    pub holder: String,
    /// The machine it ran on.
    pub host: String,
    /// Its process id there.
    pub pid: i64,
    /// When it took the lock (RFC 3339 UTC).
    pub since: String,
    /// True when no live process holds the lock any more: the holder died
    /// and left its lease behind.
    pub stale: bool,
}

impl Lease {
    /// `ana on host-1 (pid 42) since 2026-…`, for messages.
    pub fn describe(&self) -> String {
        format!(
            "held by {} on {} (pid {}) since {}",
            self.holder, self.host, self.pid, self.since
        )
    }
}

/// The operations pde needs from a deployment state store. Implemented by
/// [`SqliteState`] (one checkout) and [`pg::PgState`] (a team).
///
/// Synchronous on purpose: every call is one short query, callers are both
/// sync (validation runs on plugin threads) and async (the pipeline), and a
/// sync interface keeps the two backends and their callers simple. The
/// PostgreSQL backend moves each call off the async runtime itself.
pub trait StateBackend: Send + Sync + std::fmt::Debug {
    /// Where the state lives, for messages (never holds a password).
    fn location(&self) -> String;
    /// The version active for `policy_id` in `env`, if any.
    fn active(&self, policy_id: &str, env: &str) -> Result<Option<Active>, StateError>;
    /// Marks `version`/`digest` as active for `policy_id` in `env`, now.
    fn set_active(
        &self,
        policy_id: &str,
        env: &str,
        version: &str,
        digest: &str,
    ) -> Result<(), StateError>;
    /// Records what `service` runs for `policy_id` in `env`: `Some((version,
    /// digest))`, or `None` when it is unknown.
    fn set_service_active(
        &self,
        policy_id: &str,
        env: &str,
        service: &str,
        holds: Option<(&str, &str)>,
    ) -> Result<(), StateError>;
    /// Whether `digest` of `policy_id` was ever deployed successfully to `env`
    /// (the `promote_from` gate).
    fn was_deployed(&self, env: &str, policy_id: &str, digest: &str) -> Result<bool, StateError>;
    /// Keeps a bundle's bytes under its digest before it is pushed, so that
    /// whoever shares this state can later read the version that is active
    /// (validators compare a change against it). Storing the same digest
    /// again is a no-op: the bytes of a digest never change.
    fn put_bundle(&self, digest: &str, bytes: &[u8]) -> Result<(), StateError>;
    /// The bytes stored under `digest` by [`StateBackend::put_bundle`], if
    /// any. The caller checks them against the digest.
    fn bundle(&self, digest: &str) -> Result<Option<Vec<u8>>, StateError>;
    /// Stores a finished deployment with its targets; returns its id.
    fn record(&self, d: &DeploymentRecord) -> Result<i64, StateError>;
    /// Every recorded deployment of `policy_id`, newest first.
    fn history(&self, policy_id: &str) -> Result<Vec<DeploymentRecord>, StateError>;
    /// What the `active` table says is active where, optionally for one
    /// environment; sorted by environment, then policy. See
    /// [`StateBackend::status`].
    fn active_entries(&self, env: Option<&str>) -> Result<Vec<ActiveEntry>, StateError>;
    /// Records `d` as [`RecordOutcome::InProgress`] before anything is
    /// pushed; returns its id for [`StateBackend::finish`].
    fn begin(&self, d: &DeploymentRecord) -> Result<i64, StateError>;
    /// Replaces the in-progress record `id` with how it ended.
    fn finish(&self, id: i64, d: &DeploymentRecord) -> Result<(), StateError>;
    /// Marks the in-progress records of `policy_id` in `env` as
    /// interrupted; the caller holds the lock, so their deploys are dead.
    /// Returns their ids.
    fn settle_interrupted(&self, policy_id: &str, env: &str) -> Result<Vec<i64>, StateError>;
    /// In-progress records (any policy, optionally one environment),
    /// newest first, live or not.
    fn in_progress(&self, env: Option<&str>) -> Result<Vec<DeploymentRecord>, StateError>;
    /// Whether a live deploy holds the lock of `policy_id` in `env` now.
    fn is_locked(&self, policy_id: &str, env: &str) -> Result<bool, StateError>;
    /// What is active where, optionally for one environment; sorted by
    /// environment, then policy. A deploy killed mid-way shows on its
    /// entry (one is added if it was the first) as `interrupted`.
    fn status(&self, env: Option<&str>) -> Result<Vec<ActiveEntry>, StateError> {
        let mut entries = self.active_entries(env)?;
        for d in self.in_progress(env)? {
            if self.is_locked(&d.policy_id, &d.env)? {
                continue;
            }
            let at = entries
                .iter()
                .position(|e| e.policy_id == d.policy_id && e.env == d.env);
            let entry = match at {
                Some(i) => &mut entries[i],
                None => {
                    let services = self
                        .active_entries(Some(&d.env))
                        .ok()
                        .into_iter()
                        .flatten()
                        .find(|e| e.policy_id == d.policy_id)
                        .map(|e| e.services)
                        .unwrap_or_default();
                    entries.push(ActiveEntry {
                        policy_id: d.policy_id.clone(),
                        env: d.env.clone(),
                        version: String::new(),
                        digest: String::new(),
                        deployed_at: String::new(),
                        services,
                        interrupted: None,
                    });
                    entries
                        .last_mut()
                        .unwrap_or_else(|| unreachable!("just pushed"))
                }
            };
            if entry.interrupted.is_none() {
                entry.interrupted = Some(Box::new(DeploymentRecord {
                    outcome: RecordOutcome::Interrupted,
                    ..d
                }));
            }
        }
        entries.sort_by(|a, b| (&a.env, &a.policy_id).cmp(&(&b.env, &b.policy_id)));
        Ok(entries)
    }
    /// Every recorded deployment of `policy_id`, newest first, with an
    /// in-progress record whose lock nobody holds shown as interrupted.
    fn history_checked(&self, policy_id: &str) -> Result<Vec<DeploymentRecord>, StateError> {
        let mut records = self.history(policy_id)?;
        for d in &mut records {
            if d.outcome == RecordOutcome::InProgress && !self.is_locked(&d.policy_id, &d.env)? {
                d.outcome = RecordOutcome::Interrupted;
            }
        }
        Ok(records)
    }
    /// Takes the deploy lock of `policy_id` in `env` without waiting. Held by
    /// another deploy → [`StateError::Locked`] naming the holder. Released
    /// when the guard drops, or when the holder dies.
    fn lock(&self, policy_id: &str, env: &str) -> Result<DeployLock, StateError>;
    /// Every recorded lease, live or stale.
    fn leases(&self) -> Result<Vec<Lease>, StateError>;
    /// Clears the lease of `policy_id` in `env` left by a holder that died;
    /// returns it (`None`: there was none). A live holder →
    /// [`StateError::Locked`].
    fn unlock(&self, policy_id: &str, env: &str) -> Result<Option<Lease>, StateError>;
    /// The shared audit chain kept in the same database, if this backend
    /// keeps one (PostgreSQL does; SQLite leaves the audit log in files).
    fn audit_chain(&self) -> Option<std::sync::Arc<dyn crate::audit::ChainStore>> {
        None
    }
}

/// The deployment state of one workspace: a [`StateBackend`] chosen by
/// `pde.toml`. Dereferences to the backend.
#[derive(Debug)]
pub struct StateStore {
    backend: Box<dyn StateBackend>,
}

impl StateStore {
    /// Opens (creating if needed) the SQLite database `<state_dir>/state.db`.
    pub fn open(state_dir: &Path) -> Result<StateStore, StateError> {
        Ok(StateStore {
            backend: Box::new(SqliteState::open(state_dir)?),
        })
    }

    /// Wraps any backend.
    pub fn from_backend(backend: Box<dyn StateBackend>) -> StateStore {
        StateStore { backend }
    }
}

impl std::ops::Deref for StateStore {
    type Target = dyn StateBackend;

    fn deref(&self) -> &(dyn StateBackend + 'static) {
        &*self.backend
    }
}

/// The bundle with `digest` (policy `policy_id` at `version`), as a deploy
/// stored it: from the state ([`StateBackend::put_bundle`]), or, for a
/// deploy made before the state kept bundles, from this checkout's `dist`
/// directory. Either copy must hash to `digest`; a copy that does not is
/// passed over (and named in the reason if nothing else is found).
///
/// `Ok(Err(why))` when neither holds it.
pub fn stored_bundle(
    state: &dyn StateBackend,
    dist: &Path,
    policy_id: &str,
    version: &str,
    digest: &str,
) -> Result<Result<pde_core::bundle::Bundle, String>, StateError> {
    use pde_core::bundle::{Bundle, file_name};
    let check = |bytes: &[u8], from: &str| match Bundle::from_slice(bytes) {
        Ok(b) if b.digest == digest => Ok(b),
        Ok(b) => Err(format!("{from} holds {} instead", b.digest)),
        Err(e) => Err(format!("{from} is damaged: {e}")),
    };
    let mut why = Vec::new();
    match state.bundle(digest)? {
        Some(bytes) => match check(&bytes, "the state") {
            Ok(b) => return Ok(Ok(b)),
            Err(e) => why.push(e),
        },
        None => why.push(format!("the state ({}) does not hold it", state.location())),
    }
    let path = dist.join(file_name(policy_id, version, digest));
    match fs::read(&path) {
        Ok(bytes) => match check(&bytes, &path.display().to_string()) {
            Ok(b) => return Ok(Ok(b)),
            Err(e) => why.push(e),
        },
        Err(_) => why.push(format!("there is no {}", path.display())),
    }
    Ok(Err(why.join("; ")))
}

/// The deployment database of one checkout, in SQLite.
#[derive(Debug)]
pub struct SqliteState {
    dir: PathBuf,
    db_path: PathBuf,
    conn: Mutex<Connection>,
}

/// Holds the deploy lock of one policy and environment until dropped.
#[derive(Debug)]
pub struct DeployLock {
    holder: LockHolder,
}

#[derive(Debug)]
enum LockHolder {
    File {
        file: fs::File,
        path: PathBuf,
    },
    /// Held for its `Drop`, which releases the advisory lock.
    Pg {
        _lock: Box<pg::PgLock>,
    },
}

impl DeployLock {
    /// The lock file, for the SQLite backend's file lock.
    pub fn path(&self) -> Option<&Path> {
        match &self.holder {
            LockHolder::File { path, .. } => Some(path),
            LockHolder::Pg { .. } => None,
        }
    }

    pub(crate) fn pg(lock: pg::PgLock) -> DeployLock {
        DeployLock {
            holder: LockHolder::Pg {
                _lock: Box::new(lock),
            },
        }
    }
}

impl Drop for DeployLock {
    fn drop(&mut self) {
        // Closing the file releases the lock too; unlocking first makes the
        // release immediate even if the handle were duplicated. The
        // PostgreSQL guard releases itself when dropped.
        if let LockHolder::File { file, path } = &self.holder {
            // An emptied note means "released"; a note left behind by a
            // holder that died is what `pde unlock` reports as stale.
            let _ = file.set_len(0);
            if let Err(e) = file.unlock() {
                tracing::warn!(path = %path.display(), error = %e, "releasing deploy lock");
            }
        }
    }
}

impl SqliteState {
    /// Opens (creating if needed) `<state_dir>/state.db` and migrates it.
    pub fn open(state_dir: &Path) -> Result<SqliteState, StateError> {
        fs::create_dir_all(state_dir).map_err(|source| StateError::Io {
            path: state_dir.to_path_buf(),
            source,
        })?;
        let db_path = state_dir.join("state.db");
        let db = |action| {
            let path = db_path.clone();
            move |source| StateError::Db {
                path,
                action,
                source,
            }
        };
        let mut conn = Connection::open(&db_path).map_err(db("open"))?;
        conn.busy_timeout(Duration::from_secs(10))
            .map_err(db("set busy timeout"))?;
        // A deferred transaction that reads first and writes later cannot
        // wait for another writer: SQLite skips the busy handler on that
        // upgrade and fails at once with "database is locked". Taking the
        // write lock at BEGIN makes concurrent deploys queue instead.
        conn.set_transaction_behavior(rusqlite::TransactionBehavior::Immediate);
        enable_wal(&conn).map_err(db("enable WAL"))?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(db("set synchronous"))?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(db("enable foreign keys"))?;
        migrate(&mut conn, &db_path)?;
        Ok(SqliteState {
            dir: state_dir.to_path_buf(),
            db_path,
            conn: Mutex::new(conn),
        })
    }

    fn with_conn<T>(
        &self,
        action: &'static str,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>,
    ) -> Result<T, StateError> {
        // A panic while holding the lock cannot leave SQLite inconsistent
        // (transactions roll back on drop), so a poisoned mutex is usable.
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut conn).map_err(|source| StateError::Db {
            path: self.db_path.clone(),
            action,
            source,
        })
    }

    fn lock_path(&self, policy_id: &str, env: &str) -> Result<PathBuf, StateError> {
        check_name("policy id", policy_id)?;
        check_name("environment", env)?;
        Ok(self
            .dir
            .join("locks")
            .join(format!("{policy_id}@{env}.lock")))
    }
}

impl StateBackend for SqliteState {
    fn location(&self) -> String {
        self.db_path.display().to_string()
    }

    fn active(&self, policy_id: &str, env: &str) -> Result<Option<Active>, StateError> {
        self.with_conn("read active version", |c| {
            c.query_row(
                "SELECT version, digest, deployed_at FROM active WHERE policy_id = ?1 AND env = ?2",
                params![policy_id, env],
                |r| {
                    Ok(Active {
                        version: r.get(0)?,
                        digest: r.get(1)?,
                        deployed_at: r.get(2)?,
                    })
                },
            )
            .optional()
        })
    }

    /// Marks `version`/`digest` as active for `policy_id` in `env`, now.
    fn set_active(
        &self,
        policy_id: &str,
        env: &str,
        version: &str,
        digest: &str,
    ) -> Result<(), StateError> {
        let now = now_rfc3339();
        self.with_conn("set active version", |c| {
            c.execute(
                "INSERT INTO active (policy_id, env, version, digest, deployed_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (policy_id, env) DO UPDATE SET
                   version = excluded.version, digest = excluded.digest,
                   deployed_at = excluded.deployed_at",
                params![policy_id, env, version, digest, now],
            )
            .map(drop)
        })
    }

    /// Records what `service` runs for `policy_id` in `env`: `Some((version,
    /// digest))`, or `None` when it is unknown.
    fn set_service_active(
        &self,
        policy_id: &str,
        env: &str,
        service: &str,
        holds: Option<(&str, &str)>,
    ) -> Result<(), StateError> {
        let now = now_rfc3339();
        let (version, digest) = holds.unzip();
        self.with_conn("set service version", |c| {
            c.execute(
                "INSERT INTO service_active (policy_id, env, service, version, digest, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (policy_id, env, service) DO UPDATE SET
                   version = excluded.version, digest = excluded.digest,
                   updated_at = excluded.updated_at",
                params![policy_id, env, service, version, digest, now],
            )
            .map(drop)
        })
    }

    /// Whether `digest` of `policy_id` was ever deployed successfully to `env`
    /// (the `promote_from` gate).
    fn was_deployed(&self, env: &str, policy_id: &str, digest: &str) -> Result<bool, StateError> {
        self.with_conn("look up deployments", |c| {
            c.query_row(
                "SELECT EXISTS (SELECT 1 FROM deployments
                 WHERE env = ?1 AND policy_id = ?2 AND digest = ?3 AND outcome = ?4)",
                params![env, policy_id, digest, RecordOutcome::Deployed],
                |r| r.get(0),
            )
        })
    }

    /// Stores a finished deployment with its targets; returns its id.
    fn put_bundle(&self, digest: &str, bytes: &[u8]) -> Result<(), StateError> {
        let now = now_rfc3339();
        self.with_conn("store bundle", |c| {
            c.execute(
                "INSERT INTO bundles (digest, bytes, stored_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (digest) DO NOTHING",
                params![digest, bytes, now],
            )
            .map(drop)
        })
    }

    fn bundle(&self, digest: &str) -> Result<Option<Vec<u8>>, StateError> {
        self.with_conn("read bundle", |c| {
            c.query_row(
                "SELECT bytes FROM bundles WHERE digest = ?1",
                params![digest],
                |r| r.get(0),
            )
            .optional()
        })
    }

    fn record(&self, d: &DeploymentRecord) -> Result<i64, StateError> {
        self.with_conn("record deployment", |c| {
            let tx = c.transaction()?;
            tx.execute(
                "INSERT INTO deployments
                 (policy_id, env, version, digest, outcome, started_at, finished_at, actor)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    d.policy_id,
                    d.env,
                    d.version,
                    d.digest,
                    d.outcome,
                    d.started_at,
                    d.finished_at,
                    d.actor
                ],
            )?;
            let id = tx.last_insert_rowid();
            insert_targets(&tx, id, &d.targets)?;
            tx.commit()?;
            Ok(id)
        })
    }

    /// Every recorded deployment of `policy_id`, newest first.
    fn history(&self, policy_id: &str) -> Result<Vec<DeploymentRecord>, StateError> {
        self.deployments(Some(policy_id), "DESC")
    }

    /// What is active where, optionally for one environment; sorted by
    /// environment, then policy.
    fn active_entries(&self, env: Option<&str>) -> Result<Vec<ActiveEntry>, StateError> {
        self.with_conn("read status", |c| {
            let mut q = c.prepare(
                "SELECT policy_id, env, version, digest, deployed_at FROM active
                 WHERE ?1 IS NULL OR env = ?1 ORDER BY env, policy_id",
            )?;
            let mut entries = q
                .query_map(params![env], |r| {
                    Ok(ActiveEntry {
                        policy_id: r.get(0)?,
                        env: r.get(1)?,
                        version: r.get(2)?,
                        digest: r.get(3)?,
                        deployed_at: r.get(4)?,
                        services: Vec::new(),
                        interrupted: None,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let mut q = c.prepare(
                "SELECT service, version, digest, updated_at FROM service_active
                 WHERE policy_id = ?1 AND env = ?2 ORDER BY service",
            )?;
            for e in &mut entries {
                e.services = q
                    .query_map(params![e.policy_id, e.env], |r| {
                        Ok(ServiceHolding {
                            service: r.get(0)?,
                            version: r.get(1)?,
                            digest: r.get(2)?,
                            updated_at: r.get(3)?,
                        })
                    })?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
            }
            Ok(entries)
        })
    }

    /// Takes the deploy lock of `policy_id` in `env` without waiting.
    /// Held by another deploy (any process, or another handle in this one) →
    /// [`StateError::Locked`]. Released when the returned guard drops, or by
    /// the OS if the process dies.
    fn lock(&self, policy_id: &str, env: &str) -> Result<DeployLock, StateError> {
        check_name("policy id", policy_id)?;
        check_name("environment", env)?;
        let dir = self.dir.join("locks");
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| StateError::Io { path, source }
        };
        fs::create_dir_all(&dir).map_err(io(&dir))?;
        let path = dir.join(format!("{policy_id}@{env}.lock"));
        let mut file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io(&path))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                // Best effort: the holder's note is only for the message.
                let _ = file.read_to_string(&mut holder);
                return Err(StateError::Locked {
                    policy_id: policy_id.to_string(),
                    env: env.to_string(),
                    holder: holder.trim().to_string(),
                });
            }
            Err(fs::TryLockError::Error(source)) => return Err(StateError::Io { path, source }),
        }
        let note = format!(
            "{} on {} pid {} since {}",
            crate::audit::default_actor().replace(char::is_whitespace, "_"),
            host_name(),
            std::process::id(),
            now_rfc3339()
        );
        let written = file
            .set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| file.write_all(note.as_bytes()));
        if let Err(e) = written {
            tracing::debug!(path = %path.display(), error = %e, "could not note lock holder");
        }
        Ok(DeployLock {
            holder: LockHolder::File { file, path },
        })
    }

    fn begin(&self, d: &DeploymentRecord) -> Result<i64, StateError> {
        self.record(&DeploymentRecord {
            outcome: RecordOutcome::InProgress,
            ..d.clone()
        })
    }

    fn finish(&self, id: i64, d: &DeploymentRecord) -> Result<(), StateError> {
        self.with_conn("finish deployment", |c| {
            let tx = c.transaction()?;
            tx.execute(
                "UPDATE deployments SET version = ?2, digest = ?3, outcome = ?4,
                   finished_at = ?5 WHERE id = ?1",
                params![id, d.version, d.digest, d.outcome, d.finished_at],
            )?;
            tx.execute("DELETE FROM targets WHERE deployment_id = ?1", params![id])?;
            insert_targets(&tx, id, &d.targets)?;
            tx.commit()
        })
    }

    fn settle_interrupted(&self, policy_id: &str, env: &str) -> Result<Vec<i64>, StateError> {
        let now = now_rfc3339();
        self.with_conn("settle interrupted deployments", |c| {
            let tx = c.transaction()?;
            let ids = tx
                .prepare(
                    "SELECT id FROM deployments
                     WHERE policy_id = ?1 AND env = ?2 AND outcome = ?3 ORDER BY id",
                )?
                .query_map(params![policy_id, env, RecordOutcome::InProgress], |r| {
                    r.get(0)
                })?
                .collect::<rusqlite::Result<Vec<i64>>>()?;
            tx.execute(
                "UPDATE deployments SET outcome = ?4, finished_at = ?5
                 WHERE policy_id = ?1 AND env = ?2 AND outcome = ?3",
                params![
                    policy_id,
                    env,
                    RecordOutcome::InProgress,
                    RecordOutcome::Interrupted,
                    now
                ],
            )?;
            tx.commit()?;
            Ok(ids)
        })
    }

    fn in_progress(&self, env: Option<&str>) -> Result<Vec<DeploymentRecord>, StateError> {
        Ok(self
            .deployments(None, "DESC")?
            .into_iter()
            .filter(|d| d.outcome == RecordOutcome::InProgress && env.is_none_or(|e| d.env == e))
            .collect())
    }

    fn is_locked(&self, policy_id: &str, env: &str) -> Result<bool, StateError> {
        let path = self.lock_path(policy_id, env)?;
        let file = match fs::OpenOptions::new().read(true).write(true).open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(source) => return Err(StateError::Io { path, source }),
        };
        match file.try_lock() {
            Ok(()) => {
                let _ = file.unlock();
                Ok(false)
            }
            Err(fs::TryLockError::WouldBlock) => Ok(true),
            Err(fs::TryLockError::Error(source)) => Err(StateError::Io { path, source }),
        }
    }

    fn leases(&self) -> Result<Vec<Lease>, StateError> {
        // The OS releases a dead holder's file lock, so a file lease is never
        // stale in the sense that blocks anyone; a note left by a dead
        // holder is shown as stale so that `pde unlock` can clear it.
        let dir = self.dir.join("locks");
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(StateError::Io { path: dir, source }),
        };
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some((policy_id, env)) = name.strip_suffix(".lock").and_then(|n| n.split_once('@'))
            else {
                continue;
            };
            if let Some(lease) = self.file_lease(policy_id, env)? {
                out.push(lease);
            }
        }
        out.sort_by(|a, b| (&a.env, &a.policy_id).cmp(&(&b.env, &b.policy_id)));
        Ok(out)
    }

    fn unlock(&self, policy_id: &str, env: &str) -> Result<Option<Lease>, StateError> {
        let Some(lease) = self.file_lease(policy_id, env)? else {
            return Ok(None);
        };
        if !lease.stale {
            return Err(StateError::Locked {
                policy_id: policy_id.to_string(),
                env: env.to_string(),
                holder: lease.describe(),
            });
        }
        let path = self.lock_path(policy_id, env)?;
        fs::remove_file(&path).map_err(|source| StateError::Io { path, source })?;
        Ok(Some(lease))
    }
}

impl SqliteState {
    /// Recorded deployments, of one policy or all, by id in `order`.
    fn deployments(
        &self,
        policy_id: Option<&str>,
        order: &'static str,
    ) -> Result<Vec<DeploymentRecord>, StateError> {
        self.with_conn("read history", |c| {
            let mut deployments = c.prepare(&format!(
                "SELECT id, policy_id, env, version, digest, outcome, started_at, finished_at, actor
                 FROM deployments WHERE ?1 IS NULL OR policy_id = ?1 ORDER BY id {order}"
            ))?;

            let mut targets = c.prepare(
                "SELECT service, outcome, previous_digest, detail
                 FROM targets WHERE deployment_id = ?1 ORDER BY id",
            )?;
            let rows = deployments.query_map(params![policy_id], |r| {
                Ok(DeploymentRecord {
                    id: Some(r.get(0)?),
                    policy_id: r.get(1)?,
                    env: r.get(2)?,
                    version: r.get(3)?,
                    digest: r.get(4)?,
                    outcome: r.get(5)?,
                    started_at: r.get(6)?,
                    finished_at: r.get(7)?,
                    actor: r.get(8)?,
                    targets: Vec::new(),
                })
            })?;
            let mut out = rows.collect::<rusqlite::Result<Vec<_>>>()?;
            for d in &mut out {
                d.targets = targets
                    .query_map(params![d.id], |r| {
                        Ok(TargetRecord {
                            service: r.get(0)?,
                            outcome: r.get(1)?,
                            previous_digest: r.get(2)?,
                            detail: r.get(3)?,
                        })
                    })?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
            }
            Ok(out)
        })
    }

    /// Every recorded deployment, oldest first (`pde state migrate`).
    pub fn all_history(&self) -> Result<Vec<DeploymentRecord>, StateError> {
        self.deployments(None, "ASC")
    }
}

impl SqliteState {
    /// The note in a lock file, and whether a live process holds it.
    fn file_lease(&self, policy_id: &str, env: &str) -> Result<Option<Lease>, StateError> {
        let path = self.lock_path(policy_id, env)?;
        let mut file = match fs::OpenOptions::new().read(true).write(true).open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StateError::Io { path, source }),
        };
        let mut note = String::new();
        // Best effort: the note is only for people.
        let _ = file.read_to_string(&mut note);
        let stale = match file.try_lock() {
            Ok(()) => {
                let _ = file.unlock();
                true
            }
            Err(fs::TryLockError::WouldBlock) => false,
            Err(fs::TryLockError::Error(source)) => return Err(StateError::Io { path, source }),
        };
        if note.trim().is_empty() {
            return Ok(None);
        }
        // "<actor> on <host> pid <pid> since <time>", as `lock` writes it.
        let field = |key: &str| {
            note.split_whitespace()
                .skip_while(|w| *w != key)
                .nth(1)
                .unwrap_or("")
                .to_string()
        };
        Ok(Some(Lease {
            policy_id: policy_id.to_string(),
            env: env.to_string(),
            holder: note.split_whitespace().next().unwrap_or("").to_string(),
            host: field("on"),
            pid: field("pid").parse().unwrap_or(0),
            since: field("since"),
            stale,
        }))
    }
}

/// This machine's name, for lease records.
pub(crate) fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".to_string())
}

fn check_name(what: &'static str, value: &str) -> Result<(), StateError> {
    if crate::policy::store::valid_id(value) {
        Ok(())
    } else {
        Err(StateError::BadName {
            what,
            value: value.to_string(),
        })
    }
}

/// The per-target rows of deployment `id`, in one prepared statement.
fn insert_targets(
    tx: &rusqlite::Transaction<'_>,
    id: i64,
    targets: &[TargetRecord],
) -> rusqlite::Result<()> {
    let mut insert = tx.prepare(
        "INSERT INTO targets (deployment_id, service, outcome, previous_digest, detail)
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )?;
    for t in targets {
        insert.execute(params![
            id,
            t.service,
            t.outcome,
            t.previous_digest,
            t.detail
        ])?;
    }
    Ok(())
}

/// Switches the database to WAL, tolerating other processes doing the same.
///
/// Changing the journal mode needs an exclusive lock, and SQLite reports
/// `SQLITE_BUSY` for it *without* consulting the busy handler when another
/// connection is creating or migrating the same file at that moment (two
/// deploys of different policies started together). WAL is persistent, so
/// once any opener has switched, the others only need to see it.
fn enable_wal(conn: &Connection) -> rusqlite::Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut pause = Duration::from_millis(2);
    loop {
        let attempt = conn
            .pragma_query_value(None, "journal_mode", |r| r.get::<_, String>(0))
            .and_then(|mode| {
                if mode.eq_ignore_ascii_case("wal") {
                    Ok(())
                } else {
                    conn.pragma_update(None, "journal_mode", "WAL")
                }
            });
        match attempt {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DatabaseBusy
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(100));
            }
            other => return other,
        }
    }
}

fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StateError> {
    let db = |action| {
        let path = path.to_path_buf();
        move |source| StateError::Db {
            path,
            action,
            source,
        }
    };
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(db("begin migration"))?;
    let found: i64 = tx
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(db("read schema version"))?;
    let supported = MIGRATIONS.len() as i64;
    if found > supported {
        return Err(StateError::TooNew {
            path: path.to_path_buf(),
            found,
            supported,
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        tx.execute_batch(sql).map_err(db("migrate schema"))?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)
            .map_err(db("write schema version"))?;
        tracing::info!(path = %path.display(), version = i + 1, "state database migrated");
    }
    tx.commit().map_err(db("commit migration"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn many_processes_may_create_the_same_database_at_once() {
        // Regression: two deploys started together failed with "enable WAL
        // failed: database is locked" because the journal-mode switch
        // bypasses SQLite's busy handler.
        for _round in 0..20 {
            let dir = tempfile::tempdir().unwrap();
            let barrier = std::sync::Arc::new(std::sync::Barrier::new(8));
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    let dir = dir.path().to_path_buf();
                    let barrier = barrier.clone();
                    std::thread::spawn(move || {
                        barrier.wait();
                        StateStore::open(&dir).map(|_| ())
                    })
                })
                .collect();
            for h in handles {
                h.join().unwrap().unwrap();
            }
        }
    }

    #[test]
    fn concurrent_deploys_settling_and_recording_wait_for_each_other() {
        // Regression: two deploys of different policies in one workspace
        // failed with "settle interrupted deployments: database is locked".
        // A deferred transaction that reads and then writes cannot wait for
        // the write lock (SQLite skips the busy handler on that upgrade), so
        // every write transaction must start IMMEDIATE.
        let dir = tempfile::tempdir().unwrap();
        StateStore::open(dir.path()).unwrap();
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(4));
        let handles: Vec<_> = (0..4)
            .map(|i| {
                let dir = dir.path().to_path_buf();
                let barrier = barrier.clone();
                std::thread::spawn(move || -> Result<(), StateError> {
                    let state = SqliteState::open(&dir)?;
                    let policy = format!("4{i}");
                    barrier.wait();
                    for _ in 0..60 {
                        state.settle_interrupted(&policy, "prod")?;
                        let id =
                            state.begin(&record(&policy, "prod", "sha256:aa", "in-progress"))?;
                        state.finish(id, &record(&policy, "prod", "sha256:aa", "deployed"))?;
                    }
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap().unwrap();
        }
        let state = SqliteState::open(dir.path()).unwrap();
        for i in 0..4 {
            let policy = format!("4{i}");
            let mine = state.deployments(Some(&policy), "ASC").unwrap();
            assert_eq!(mine.len(), 60, "deploys of {policy}");
            assert!(mine.iter().all(|d| d.outcome == RecordOutcome::Deployed));
        }
    }

    fn record(policy: &str, env: &str, digest: &str, outcome: &str) -> DeploymentRecord {
        let outcome: RecordOutcome = serde_json::from_value(serde_json::json!(outcome)).unwrap();
        DeploymentRecord {
            id: None,
            policy_id: policy.into(),
            env: env.into(),
            version: "1.0.0".into(),
            digest: digest.into(),
            outcome,
            started_at: now_rfc3339(),
            finished_at: now_rfc3339(),
            actor: "ana".into(),
            targets: vec![
                TargetRecord {
                    service: "HMS-API".into(),
                    outcome: "deployed".into(),
                    previous_digest: Some("sha256:00".into()),
                    detail: "200".into(),
                },
                TargetRecord {
                    service: "HMS-BATCH".into(),
                    outcome: "rolled-back".into(),
                    previous_digest: None,
                    detail: "500 then rollback".into(),
                },
            ],
        }
    }

    #[test]
    fn history_round_trips_newest_first_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let first = record("42", "staging", "sha256:aa", "rolled-back");
        let second = record("42", "staging", "sha256:bb", "deployed");
        {
            let s = StateStore::open(dir.path()).unwrap();
            assert_eq!(s.record(&first).unwrap(), 1);
            assert_eq!(s.record(&second).unwrap(), 2);
            s.record(&record("7", "staging", "sha256:cc", "deployed"))
                .unwrap();
        }
        let s = StateStore::open(dir.path()).unwrap();
        let h = s.history("42").unwrap();
        assert_eq!(h.len(), 2);
        assert_eq!(
            h[0],
            DeploymentRecord {
                id: Some(2),
                ..second
            }
        );
        assert_eq!(
            h[1],
            DeploymentRecord {
                id: Some(1),
                ..first
            }
        );
        assert_eq!(h[1].targets[1].previous_digest, None);
        assert!(s.history("nope").unwrap().is_empty());
    }

    #[test]
    fn was_deployed_counts_only_successful_deployments_in_that_env() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateStore::open(dir.path()).unwrap();
        s.record(&record("42", "staging", "sha256:aa", "deployed"))
            .unwrap();
        s.record(&record("42", "staging", "sha256:bb", "rolled-back"))
            .unwrap();
        assert!(s.was_deployed("staging", "42", "sha256:aa").unwrap());
        assert!(!s.was_deployed("staging", "42", "sha256:bb").unwrap());
        assert!(!s.was_deployed("production", "42", "sha256:aa").unwrap());
        assert!(!s.was_deployed("staging", "7", "sha256:aa").unwrap());
    }

    #[test]
    fn active_versions_are_upserted_and_listed() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateStore::open(dir.path()).unwrap();
        assert_eq!(s.active("42", "staging").unwrap(), None);
        s.set_active("42", "staging", "1.0.0", "sha256:aa").unwrap();
        s.set_active("42", "staging", "1.1.0", "sha256:bb").unwrap();
        s.set_active("42", "production", "1.0.0", "sha256:aa")
            .unwrap();
        s.set_active("7", "dev", "0.1.0", "sha256:cc").unwrap();
        let a = s.active("42", "staging").unwrap().unwrap();
        assert_eq!(
            (a.version.as_str(), a.digest.as_str()),
            ("1.1.0", "sha256:bb")
        );
        assert!(
            time::OffsetDateTime::parse(
                &a.deployed_at,
                &time::format_description::well_known::Rfc3339
            )
            .is_ok()
        );
        let all = s.status(None).unwrap();
        let keys: Vec<_> = all
            .iter()
            .map(|e| (e.env.as_str(), e.policy_id.as_str()))
            .collect();
        assert_eq!(
            keys,
            vec![("dev", "7"), ("production", "42"), ("staging", "42")]
        );
        let staging = s.status(Some("staging")).unwrap();
        assert_eq!(staging.len(), 1);
        assert_eq!(staging[0].version, "1.1.0");
    }

    #[test]
    fn schema_version_is_recorded_and_newer_databases_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        drop(StateStore::open(dir.path()).unwrap());
        let conn = Connection::open(dir.path().join("state.db")).unwrap();
        let v: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(v, MIGRATIONS.len() as i64);
        let mode: String = conn
            .pragma_query_value(None, "journal_mode", |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        conn.pragma_update(None, "user_version", 99).unwrap();
        drop(conn);
        let e = StateStore::open(dir.path()).unwrap_err();
        assert!(matches!(e, StateError::TooNew { found: 99, .. }), "{e}");
    }

    #[test]
    fn a_second_lock_on_the_same_policy_and_env_is_refused_until_released() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateStore::open(dir.path()).unwrap();
        let held = s.lock("42", "production").unwrap();
        assert!(held.path().unwrap().ends_with("locks/42@production.lock"));
        let other = StateStore::open(dir.path()).unwrap();
        let e = other.lock("42", "production").unwrap_err();
        assert_eq!(e.exit_code(), ExitCode::Locked);
        let StateError::Locked { holder, .. } = &e else {
            panic!("expected Locked, got {e}")
        };
        assert!(holder.contains(&std::process::id().to_string()), "{holder}");
        // Other pairs are independent.
        let _staging = other.lock("42", "staging").unwrap();
        let _seven = other.lock("7", "production").unwrap();
        drop(held);
        let _again = other.lock("42", "production").unwrap();
    }

    #[test]
    fn a_lock_held_by_another_process_is_refused_and_freed_when_it_dies() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateStore::open(dir.path()).unwrap();
        drop(s.lock("42", "production").unwrap()); // creates locks/
        let path = dir.path().join("locks/42@production.lock");
        // util-linux flock(1) takes the same flock(2) lock, then execs sleep
        // (--no-fork), so the lock lives exactly as long as that process.
        let mut child = std::process::Command::new("flock")
            .args(["--exclusive", "--no-fork"])
            .arg(&path)
            .args(["sleep", "600"])
            .spawn()
            .expect("flock(1) from util-linux is installed");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let refused = loop {
            match s.lock("42", "production") {
                Err(e @ StateError::Locked { .. }) => break e,
                Ok(probe) => drop(probe),
                Err(e) => panic!("{e}"),
            }
            assert!(
                std::time::Instant::now() < deadline,
                "flock never took the lock"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(refused.exit_code(), ExitCode::Locked);
        child.kill().unwrap();
        child.wait().unwrap();
        // The OS released the dead process's lock; no manual cleanup.
        let _lock = s.lock("42", "production").unwrap();
    }

    #[test]
    fn a_dead_holders_note_is_a_stale_lease_that_unlock_clears() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateStore::open(dir.path()).unwrap();
        drop(s.lock("42", "production").unwrap());
        assert!(
            s.leases().unwrap().is_empty(),
            "a released lock leaves no lease"
        );
        let path = dir.path().join("locks/42@production.lock");
        fs::write(&path, "ana on host-1 pid 999 since 2026-11-29T10:00:00Z").unwrap();
        let mut child = std::process::Command::new("flock")
            .args(["--exclusive", "--no-fork"])
            .arg(&path)
            .args(["sleep", "600"])
            .spawn()
            .expect("flock(1) from util-linux is installed");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !s.is_locked("42", "production").unwrap() {
            assert!(
                std::time::Instant::now() < deadline,
                "flock never took the lock"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let live = s.leases().unwrap();
        assert_eq!(live.len(), 1);
        assert!(!live[0].stale);
        assert_eq!(
            (live[0].holder.as_str(), live[0].host.as_str()),
            ("ana", "host-1")
        );
        assert_eq!(
            s.unlock("42", "production").unwrap_err().exit_code(),
            ExitCode::Locked
        );
        child.kill().unwrap();
        child.wait().unwrap();
        let stale = s.leases().unwrap();
        assert!(stale[0].stale, "{stale:?}");
        let cleared = s.unlock("42", "production").unwrap().unwrap();
        assert_eq!(cleared.pid, 999);
        assert!(s.leases().unwrap().is_empty());
        assert_eq!(s.unlock("42", "production").unwrap(), None);
    }

    #[test]
    fn lock_names_cannot_escape_the_lock_directory() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateStore::open(dir.path()).unwrap();
        assert!(matches!(
            s.lock("../x", "prod"),
            Err(StateError::BadName { .. })
        ));
        assert!(matches!(
            s.lock("42", "a/b"),
            Err(StateError::BadName { .. })
        ));
    }

    #[test]
    fn the_store_is_shareable_across_threads() {
        let dir = tempfile::tempdir().unwrap();
        let s = std::sync::Arc::new(StateStore::open(dir.path()).unwrap());
        let handles: Vec<_> = (0..4)
            .map(|i| {
                let s = s.clone();
                std::thread::spawn(move || {
                    for j in 0..5 {
                        s.record(&record("42", "dev", &format!("sha256:{i}{j}"), "deployed"))
                            .unwrap();
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(s.history("42").unwrap().len(), 20);
    }
}
