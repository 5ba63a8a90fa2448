//! The state of one checkout, in SQLite: `<state>/state.db`.
//!
//! SQLite because it needs no server, survives crashes (WAL journal,
//! transactions), and is one file engineers can inspect with `sqlite3`.
//! This file owns only the connection, its transactions, how values cross
//! the driver, and the locks; the statements are shared
//! ([`super::query`]), as is the schema ([`super::schema`]; the version is
//! `PRAGMA user_version`).
//!
//! **Transactions begin `IMMEDIATE`.** A deferred transaction that reads
//! first and writes later cannot wait for another writer: SQLite skips the
//! busy handler on that upgrade and fails at once with "database is
//! locked". Taking the write lock at `BEGIN` makes concurrent deploys in one
//! workspace queue instead.
//!
//! **Locks are not in the database:** a deploy holds an OS file lock on
//! `<state>/locks/<policy>@<env>.lock` (`File::try_lock`). The OS releases
//! it when the process dies, so a crashed deploy never leaves a stale lock
//! that someone must clear by hand, which a lock row in a table would. The
//! file holds a note of who holds it, which `pde unlock` reads.
//!
//! The connection sits behind a `Mutex` so the state can be shared across
//! the pipeline's tasks; every call is short.

use std::fs;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use rusqlite::Connection;
use rusqlite::types::{ToSqlOutput, ValueRef};

use pde_core::clock::now_rfc3339;

use super::lock::{HeldLock, check_name, host_name};
use super::query::{Cell, Row, Sql, Value};
use super::schema::{self, Dialect, VersionStore};
use super::{Backend, BackendError, DeployLock, Lease, StateError};

/// How SQLite spells what differs.
static DIALECT: Dialect = Dialect {
    name: "sqlite",
    auto_id: "INTEGER PRIMARY KEY AUTOINCREMENT",
    bytes: "BLOB",
    version: VersionStore {
        prepare: "",
        read: "PRAGMA user_version",
        write: |v| format!("PRAGMA user_version = {v}"),
        offset: 0,
    },
    own_tables: &[],
    after_explicit_ids: "",
};

/// The deployment database of one checkout, in SQLite.
#[derive(Debug)]
pub struct SqliteState {
    dir: PathBuf,
    db_path: PathBuf,
    conn: Mutex<Connection>,
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
            let location = db_path.display().to_string();
            move |source: rusqlite::Error| StateError::Backend {
                backend: DIALECT.name,
                location,
                action,
                source: source.into(),
            }
        };
        let conn = Connection::open(&db_path).map_err(db("open"))?;
        conn.busy_timeout(Duration::from_secs(10))
            .map_err(db("set busy timeout"))?;
        // See the module docs: every write transaction begins IMMEDIATE.
        let mut conn = conn;
        conn.set_transaction_behavior(rusqlite::TransactionBehavior::Immediate);
        enable_wal(&conn).map_err(db("enable WAL"))?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(db("set synchronous"))?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(db("enable foreign keys"))?;
        let state = SqliteState {
            dir: state_dir.to_path_buf(),
            db_path,
            conn: Mutex::new(conn),
        };
        let location = Backend::location(&state);
        state.transaction("migrate schema", |db| {
            schema::migrate(db, &DIALECT, &location)
        })??;
        Ok(state)
    }

    fn with_conn<T>(
        &self,
        action: &'static str,
        f: impl FnOnce(&mut Connection) -> Result<T, BackendError>,
    ) -> Result<T, StateError> {
        // A panic while holding the lock cannot leave SQLite inconsistent
        // (transactions roll back on drop), so a poisoned mutex is usable.
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut conn).map_err(|source| StateError::Backend {
            backend: DIALECT.name,
            location: self.db_path.display().to_string(),
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

/// A connection (or an open transaction, through `Deref`) as [`Sql`].
struct Executor<'a>(&'a Connection);

/// A [`Value`] as SQLite takes it.
struct Bind<'a>(Value<'a>);

impl rusqlite::ToSql for Bind<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(match self.0 {
            Value::Null => ValueRef::Null,
            Value::Int(i) => ValueRef::Integer(i),
            Value::Text(s) => ValueRef::Text(s.as_bytes()),
            Value::Bytes(b) => ValueRef::Blob(b),
        }))
    }
}

impl Sql for Executor<'_> {
    fn execute(&mut self, sql: &str, params: &[Value<'_>]) -> Result<u64, BackendError> {
        let changed = self
            .0
            .prepare_cached(sql)?
            .execute(rusqlite::params_from_iter(params.iter().map(|v| Bind(*v))))?;
        Ok(changed as u64)
    }

    fn query(&mut self, sql: &str, params: &[Value<'_>]) -> Result<Vec<Row>, BackendError> {
        let mut statement = self.0.prepare_cached(sql)?;
        let columns = statement.column_count();
        let mut rows =
            statement.query(rusqlite::params_from_iter(params.iter().map(|v| Bind(*v))))?;
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            let cells = (0..columns)
                .map(|i| {
                    Ok(match r.get_ref(i)? {
                        ValueRef::Null => Cell::Null,
                        ValueRef::Integer(i) => Cell::Int(i),
                        ValueRef::Text(t) => Cell::Text(String::from_utf8(t.to_vec())?),
                        ValueRef::Blob(b) => Cell::Bytes(b.to_vec()),
                        ValueRef::Real(f) => return Err(format!("unexpected real {f}").into()),
                    })
                })
                .collect::<Result<_, BackendError>>()?;
            out.push(Row(cells));
        }
        Ok(out)
    }

    fn batch(&mut self, sql: &str) -> Result<(), BackendError> {
        Ok(self.0.execute_batch(sql)?)
    }
}

impl Backend for SqliteState {
    fn location(&self) -> String {
        self.db_path.display().to_string()
    }

    fn dialect(&self) -> &'static Dialect {
        &DIALECT
    }

    fn run<T: Send>(
        &self,
        action: &'static str,
        f: impl FnOnce(&mut dyn Sql) -> Result<T, BackendError> + Send,
    ) -> Result<T, StateError> {
        self.with_conn(action, |c| f(&mut Executor(c)))
    }

    fn transaction<T: Send>(
        &self,
        action: &'static str,
        f: impl FnOnce(&mut dyn Sql) -> Result<T, BackendError> + Send,
    ) -> Result<T, StateError> {
        self.with_conn(action, |c| {
            // IMMEDIATE, set on the connection at open.
            let tx = c.transaction()?;
            let out = f(&mut Executor(&tx))?;
            tx.commit()?;
            Ok(out)
        })
    }

    /// Takes the deploy lock of `policy_id` in `env` without waiting.
    /// Held by another deploy (any process, or another handle in this one) →
    /// [`StateError::Locked`]. Released when the returned guard drops, or by
    /// the OS if the process dies.
    fn lock(&self, policy_id: &str, env: &str) -> Result<DeployLock, StateError> {
        let path = self.lock_path(policy_id, env)?;
        let dir = self.dir.join("locks");
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| StateError::Io { path, source }
        };
        fs::create_dir_all(&dir).map_err(io(&dir))?;
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
        let held = FileLock { file, path };
        // Taken while the file lock is held, so no other deploy of this
        // checkout draws a fence for the same lock at the same time.
        let now = i64::try_from(pde_core::fence::now_micros()).unwrap_or(i64::MAX);
        let fence = self.with_conn("take fencing number", |c| {
            let fence: i64 = c.query_row(
                "INSERT INTO fences (policy_id, env, fence) VALUES (?1, ?2, ?3)
                 ON CONFLICT (policy_id, env) DO UPDATE
                   SET fence = max(excluded.fence, fences.fence + 1)
                 RETURNING fence",
                rusqlite::params![policy_id, env, now],
                |row| row.get(0),
            )?;
            Ok(fence)
        })?;
        Ok(DeployLock::new(
            held,
            policy_id,
            env,
            u64::try_from(fence).unwrap_or(0),
        ))
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

/// A held lock file.
#[derive(Debug)]
struct FileLock {
    file: fs::File,
    path: PathBuf,
}

impl HeldLock for FileLock {
    fn path(&self) -> Option<&Path> {
        Some(&self.path)
    }

    /// The OS keeps the file locked while this process lives; what can go
    /// is the file itself: removed, or replaced by one another deploy may
    /// lock. So the lock holds while the path still names the locked file.
    fn still_held(&self, _fence: u64) -> Result<(), String> {
        use std::os::unix::fs::MetadataExt as _;
        let mine = self
            .file
            .metadata()
            .map_err(|e| format!("cannot read the lock file's metadata: {e}"))?;
        match fs::metadata(&self.path) {
            Ok(now) if (now.dev(), now.ino()) == (mine.dev(), mine.ino()) => Ok(()),
            Ok(_) => Err(format!(
                "the lock file {} was replaced by another",
                self.path.display()
            )),
            Err(e) => Err(format!(
                "the lock file {} is gone ({e})",
                self.path.display()
            )),
        }
    }
}

impl Drop for FileLock {
    fn drop(&mut self) {
        // Closing the file releases the lock too; unlocking first makes the
        // release immediate even if the handle were duplicated. An emptied
        // note means "released"; a note left behind by a holder that died
        // is what `pde unlock` reports as stale.
        let _ = self.file.set_len(0);
        if let Err(e) = self.file.unlock() {
            tracing::warn!(path = %self.path.display(), error = %e, "releasing deploy lock");
        }
    }
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

/// What only SQLite does: files, `user_version`, WAL, `IMMEDIATE`. Every
/// behaviour both backends share is checked against both by the
/// conformance test (`tests/all/team.rs`, `behaves_as_state`).
#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{DeploymentRecord, RecordOutcome, StateBackend, StateStore, TargetRecord};
    use pde_core::{ExitCode, HasExitCode};

    #[test]
    fn each_lock_gets_a_growing_fence_and_a_replaced_lock_file_is_a_lost_lock() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateStore::open(dir.path()).unwrap();
        let first = state.lock("42", "prod").unwrap();
        let f1 = first.fence();
        assert!(f1 > 1_700_000_000_000_000, "from the clock: {f1}");
        first.check("pushing").unwrap();
        drop(first);
        let second = state.lock("42", "prod").unwrap();
        assert!(second.fence() > f1);
        // Someone removes the lock file; another deploy could now lock a
        // new one, so the holder must stop (exit 7).
        let path = second.path().unwrap().to_path_buf();
        std::fs::remove_file(&path).unwrap();
        let err = second.check("tagging").unwrap_err();
        assert!(matches!(err, StateError::LockLost { .. }), "{err}");
        assert_eq!(err.exit_code(), ExitCode::Locked);
        assert!(err.to_string().contains("before tagging"), "{err}");
        let third = state.lock("42", "prod").unwrap();
        assert!(second.check("tagging").is_err(), "replaced by another");
        assert!(third.fence() > second.fence());
        third.check("pushing").unwrap();
    }

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
        // every write transaction must start IMMEDIATE. Settling is now one
        // `UPDATE … RETURNING`, which takes the write lock at once, so the
        // loop also runs a transaction that reads first: without IMMEDIATE
        // it fails here with "database is locked".
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
                        let id = state.begin(&record(&policy, RecordOutcome::InProgress))?;
                        state.finish(id, &record(&policy, RecordOutcome::Deployed))?;
                        // A write transaction that reads first (as `import`
                        // and the migrations do): the upgrade that failed.
                        for _ in 0..2 {
                            state.transaction("read, then write", |db| {
                                db.query("SELECT count(*) FROM deployments", &[])?;
                                // Another writer commits in between.
                                std::thread::sleep(Duration::from_millis(1));
                                db.execute(
                                    "UPDATE deployments SET actor = actor WHERE id = ?1",
                                    &[Value::Int(id)],
                                )
                            })?;
                        }
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
            let mine = state.history(&policy).unwrap();
            assert_eq!(mine.len(), 60, "deploys of {policy}");
            assert!(mine.iter().all(|d| d.outcome == RecordOutcome::Deployed));
        }
    }

    fn record(policy: &str, outcome: RecordOutcome) -> DeploymentRecord {
        DeploymentRecord {
            id: None,
            policy_id: policy.into(),
            env: "prod".into(),
            version: "1.0.0".into(),
            digest: "sha256:aa".into(),
            outcome,
            started_at: now_rfc3339(),
            finished_at: now_rfc3339(),
            actor: "ana".into(),
            targets: vec![TargetRecord {
                service: "HMS-API".into(),
                outcome: "deployed".into(),
                previous_digest: Some("sha256:00".into()),
                detail: "200".into(),
            }],
        }
    }

    #[test]
    fn schema_version_is_recorded_and_newer_databases_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        drop(StateStore::open(dir.path()).unwrap());
        let conn = Connection::open(dir.path().join("state.db")).unwrap();
        let v: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        // SQLite stores the step number of the one migration list.
        assert_eq!(v, schema::MIGRATIONS.len() as i64);
        let mode: String = conn
            .pragma_query_value(None, "journal_mode", |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        conn.pragma_update(None, "user_version", 99).unwrap();
        drop(conn);
        let e = StateStore::open(dir.path()).unwrap_err();
        assert!(matches!(e, StateError::TooNew { found: 99, .. }), "{e}");
        assert_eq!(e.exit_code(), ExitCode::Usage);
    }

    #[test]
    fn a_database_of_an_older_pde_is_migrated_from_where_it_stopped() {
        // A state.db written by the pde of issue 12 (three steps, no
        // bundles): opening it adds the steps from 4 on, and keeps its history.
        let dir = tempfile::tempdir().unwrap();
        {
            let conn = Connection::open(dir.path().join("state.db")).unwrap();
            for ddl in &schema::MIGRATIONS[..3] {
                conn.execute_batch(&DIALECT.render(ddl)).unwrap();
            }
            conn.pragma_update(None, "user_version", 3).unwrap();
            conn.execute(
                "INSERT INTO deployments (policy_id, env, version, digest, outcome, started_at,
                 finished_at, actor) VALUES ('42', 'dev', '1.0.0', 'sha256:aa', 'deployed',
                 't0', 't1', 'ana')",
                [],
            )
            .unwrap();
        }
        let s = SqliteState::open(dir.path()).unwrap();
        assert_eq!(s.history("42").unwrap().len(), 1);
        s.put_bundle("sha256:aa", b"{}").unwrap();
        let conn = Connection::open(dir.path().join("state.db")).unwrap();
        let v: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(
            v,
            schema::MIGRATIONS.len() as i64,
            "every later step (5: fences, 6: rollouts)"
        );
    }

    /// Another process holding `path`'s lock: util-linux flock(1) takes the
    /// same flock(2) lock, then execs sleep (--no-fork), so the lock lives
    /// exactly as long as that process.
    fn flock(path: &Path) -> std::process::Child {
        std::process::Command::new("flock")
            .args(["--exclusive", "--no-fork"])
            .arg(path)
            .args(["sleep", "600"])
            .spawn()
            .expect("flock(1) from util-linux is installed")
    }

    #[test]
    fn a_lock_held_by_another_process_is_refused_and_freed_when_it_dies() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateStore::open(dir.path()).unwrap();
        let held = s.lock("42", "production").unwrap();
        assert!(held.path().unwrap().ends_with("locks/42@production.lock"));
        drop(held); // creates locks/
        let path = dir.path().join("locks/42@production.lock");
        let mut child = flock(&path);
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
        let mut child = flock(&path);
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
}
