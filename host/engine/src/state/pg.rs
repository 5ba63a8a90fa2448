//! Shared team state in PostgreSQL (issue 12): history, active versions,
//! deploy locks across machines, and one audit chain.
//!
//! **Crate and runtime.** The synchronous `postgres` client (a thin facade
//! over `tokio-postgres`) behind the synchronous [`StateBackend`] trait. That
//! client drives its own small runtime, and tokio refuses to block or drop a
//! runtime from inside another one, which is where the pipeline runs. So
//! every call (and every drop of a connection) goes through
//! `off_runtime`: on a runtime thread it runs on a scoped
//! thread of its own, elsewhere in place. One short query per call, so the
//! thread start is noise, and neither backend nor caller needs async.
//!
//! **Locks.** A deploy takes a session-level advisory lock per (policy,
//! environment) on a connection of its own, held until the deploy ends. If
//! the process dies, the server closes the connection and the lock goes with
//! it. A `leases` row says who holds it, from where, since when; a row whose
//! lock nobody holds is a stale lease, which `pde unlock` clears.
//!
//! **Audit chain.** `audit_log` holds the JSON lines of the file log, byte
//! for byte, and `audit_head` the head record. An append locks the head row
//! (`SELECT … FOR UPDATE`), so appenders on every machine take turns and the
//! chain stays gap-free.

use std::str::FromStr;
use std::sync::{Arc, Mutex};

use postgres::{Client, NoTls};

use super::{
    Active, ActiveEntry, DeployLock, DeploymentRecord, Lease, RecordOutcome, ServiceHolding,
    StateBackend, StateError, TargetRecord, check_name,
};
use crate::audit::{AuditError, ChainStore};
use crate::runtime::off_runtime;
use pde_core::clock::now_rfc3339;

/// Schema migrations; `pde_schema.version` = how many of them have run.
pub const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE deployments (
    id          BIGSERIAL PRIMARY KEY,
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
    id              BIGSERIAL PRIMARY KEY,
    deployment_id   BIGINT NOT NULL REFERENCES deployments (id) ON DELETE CASCADE,
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
CREATE TABLE service_active (
    policy_id   TEXT NOT NULL,
    env         TEXT NOT NULL,
    service     TEXT NOT NULL,
    version     TEXT,
    digest      TEXT,
    updated_at  TEXT NOT NULL,
    PRIMARY KEY (policy_id, env, service)
);
CREATE TABLE leases (
    policy_id   TEXT NOT NULL,
    env         TEXT NOT NULL,
    holder      TEXT NOT NULL,
    host        TEXT NOT NULL,
    pid         BIGINT NOT NULL,
    since       TEXT NOT NULL,
    PRIMARY KEY (policy_id, env)
);
CREATE TABLE audit_log (
    seq  BIGINT PRIMARY KEY,
    line TEXT NOT NULL
);
CREATE TABLE audit_head (
    id   INTEGER PRIMARY KEY CHECK (id = 1),
    head TEXT
);
INSERT INTO audit_head (id, head) VALUES (1, NULL);
CREATE TABLE audit_sink_cursor (
    id     INTEGER PRIMARY KEY CHECK (id = 1),
    cursor BIGINT NOT NULL
);
INSERT INTO audit_sink_cursor (id, cursor) VALUES (1, 0);
"#,
    r#"
-- Deploys are recorded `in-progress` when their push starts, so a killed
-- one is seen (the same step as SQLite's third migration).
CREATE INDEX deployments_in_progress ON deployments (outcome, policy_id, env);
"#,
    r#"
-- The bundles deploys pushed, by digest (issue 13; SQLite's fourth
-- migration): every machine of the team can read the active version's
-- policy, which pde:plugin@0.2.0 validators are shown.
CREATE TABLE bundles (
    digest    TEXT PRIMARY KEY,
    bytes     BYTEA NOT NULL,
    stored_at TEXT NOT NULL
);
"#,
];

/// Serialises first-time migration of one database across machines.
const MIGRATION_LOCK: i64 = 0x7064_655f_6d69_6772; // "pde_migr"

/// How to reach the shared database.
#[derive(Clone)]
pub struct PgTarget {
    /// The URL as configured (no password), for messages.
    pub url: String,
    config: postgres::Config,
}

impl std::fmt::Debug for PgTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // `postgres::Config`'s Debug redacts the password, but the URL says
        // everything a reader needs.
        f.debug_struct("PgTarget").field("url", &self.url).finish()
    }
}

impl PgTarget {
    /// `url` (`postgres://user@host:port/db`) with the password read from the
    /// environment variable `password_env`, if named.
    pub fn new(url: &str, password_env: Option<&str>) -> Result<PgTarget, StateError> {
        use pde_core::secret::ExposeSecret as _;
        let secret = match password_env {
            Some(var) => {
                Some(
                    pde_core::secret::from_env(var).ok_or_else(|| StateError::PgConfig {
                        location: url.to_string(),
                        message: format!(
                            "[state] password_env names {var}, which is not set; export the \
                         database password in it"
                        ),
                    })?,
                )
            }
            None => None,
        };
        Self::with_password(url, secret.as_ref().map(|s| s.expose_secret()))
    }

    /// `url` with an explicit password (tests, tools); [`PgTarget::new`]
    /// reads it from the environment instead.
    pub fn with_password(url: &str, password: Option<&str>) -> Result<PgTarget, StateError> {
        let mut config = postgres::Config::from_str(url).map_err(|e| StateError::PgConfig {
            location: url.to_string(),
            message: format!("not a valid URL: {e}"),
        })?;
        if let Some(password) = password {
            config.password(password);
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(std::time::Duration::from_secs(10));
        }
        config.application_name("pde");
        Ok(PgTarget {
            url: url.to_string(),
            config,
        })
    }

    fn connect(&self) -> Result<PgConn, StateError> {
        let config = self.config.clone();
        let client =
            off_runtime(move || config.connect(NoTls)).map_err(|source| StateError::Pg {
                location: self.url.clone(),
                action: "connect",
                source,
            })?;
        Ok(PgConn(Some(client)))
    }
}

/// A client that is always dropped off the async runtime (dropping it shuts
/// down the client's own runtime, which tokio forbids inside another one).
struct PgConn(Option<Client>);

impl PgConn {
    fn client(&mut self) -> &mut Client {
        // Only `drop` empties it.
        self.0
            .as_mut()
            .unwrap_or_else(|| unreachable!("used after drop"))
    }
}

impl Drop for PgConn {
    fn drop(&mut self) {
        if let Some(client) = self.0.take() {
            off_runtime(move || drop(client));
        }
    }
}

/// State in a PostgreSQL database shared by a team.
pub struct PgState {
    target: PgTarget,
    conn: Arc<Mutex<PgConn>>,
}

impl std::fmt::Debug for PgState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgState")
            .field("url", &self.target.url)
            .finish()
    }
}

/// Runs `f` with the client, off the async runtime, naming `action` in errors.
fn call<T: Send>(
    conn: &Mutex<PgConn>,
    location: &str,
    action: &'static str,
    f: impl FnOnce(&mut Client) -> Result<T, postgres::Error> + Send,
) -> Result<T, StateError> {
    // A panic mid-call leaves at most an aborted transaction, which the
    // server rolls back; the client is still usable.
    let mut guard = conn.lock().unwrap_or_else(|p| p.into_inner());
    let client = guard.client();
    off_runtime(move || f(client)).map_err(|source| StateError::Pg {
        location: location.to_string(),
        action,
        source,
    })
}

impl PgState {
    /// Connects to the database and applies pending migrations. A database
    /// whose schema is newer than this pde is refused.
    pub fn open(target: PgTarget) -> Result<PgState, StateError> {
        let conn = target.connect()?;
        let state = PgState {
            target,
            conn: Arc::new(Mutex::new(conn)),
        };
        state.migrate()?;
        Ok(state)
    }

    fn call<T: Send>(
        &self,
        action: &'static str,
        f: impl FnOnce(&mut Client) -> Result<T, postgres::Error> + Send,
    ) -> Result<T, StateError> {
        call(&self.conn, &self.target.url, action, f)
    }

    fn migrate(&self) -> Result<(), StateError> {
        let supported = MIGRATIONS.len() as i32;
        let found = self.call("migrate schema", |c| {
            let mut tx = c.transaction()?;
            // Two machines opening a new database at once take turns.
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
            tx.batch_execute(
                "CREATE TABLE IF NOT EXISTS pde_schema (
                     id INTEGER PRIMARY KEY CHECK (id = 1),
                     version INTEGER NOT NULL);
                 INSERT INTO pde_schema (id, version) VALUES (1, 0) ON CONFLICT DO NOTHING;",
            )?;
            let found: i32 = tx
                .query_one("SELECT version FROM pde_schema WHERE id = 1", &[])?
                .get(0);
            if found > supported {
                return Ok(found);
            }
            for (i, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
                tx.batch_execute(sql)?;
                tx.execute(
                    "UPDATE pde_schema SET version = $1 WHERE id = 1",
                    &[&(i as i32 + 1)],
                )?;
                tracing::info!(version = i + 1, "shared state database migrated");
            }
            tx.commit()?;
            Ok(found)
        })?;
        if found > supported {
            return Err(StateError::TooNew {
                path: self.target.url.clone().into(),
                found: found.into(),
                supported: supported.into(),
            });
        }
        Ok(())
    }

    /// Copies a whole history into this (empty) database, oldest first, with
    /// what is active where, in one transaction: `pde state migrate`.
    pub fn import(
        &self,
        history: &[DeploymentRecord],
        status: &[ActiveEntry],
    ) -> Result<(), StateError> {
        self.call("import state", |c| {
            let mut tx = c.transaction()?;
            let existing: i64 = tx
                .query_one("SELECT count(*) FROM deployments", &[])?
                .get(0);
            if existing > 0 {
                // Reported by the caller; nothing is written.
                return Ok(false);
            }
            for d in history {
                // Keeps the ids people have seen in `pde history`.
                insert_deployment(&mut tx, d.id, d)?;
            }
            tx.execute(
                "SELECT setval(pg_get_serial_sequence('deployments', 'id'),
                               GREATEST((SELECT max(id) FROM deployments), 1))",
                &[],
            )?;
            for e in status {
                tx.execute(
                    "INSERT INTO active (policy_id, env, version, digest, deployed_at)
                     VALUES ($1, $2, $3, $4, $5)",
                    &[&e.policy_id, &e.env, &e.version, &e.digest, &e.deployed_at],
                )?;
                for s in &e.services {
                    tx.execute(
                        "INSERT INTO service_active
                         (policy_id, env, service, version, digest, updated_at)
                         VALUES ($1, $2, $3, $4, $5, $6)",
                        &[
                            &e.policy_id,
                            &e.env,
                            &s.service,
                            &s.version,
                            &s.digest,
                            &s.updated_at,
                        ],
                    )?;
                }
            }
            tx.commit()?;
            Ok(true)
        })
        .and_then(|imported| {
            if imported {
                Ok(())
            } else {
                Err(StateError::PgConfig {
                    location: self.target.url.clone(),
                    message: "the database already holds deployments; migrate into an empty one"
                        .into(),
                })
            }
        })
    }

    /// The lease row of `policy_id` in `env`, without its `stale` flag.
    fn lease_row(
        c: &mut Client,
        policy_id: &str,
        env: &str,
    ) -> Result<Option<Lease>, postgres::Error> {
        Ok(c.query_opt(
            "SELECT holder, host, pid, since FROM leases WHERE policy_id = $1 AND env = $2",
            &[&policy_id, &env],
        )?
        .map(|r| Lease {
            policy_id: policy_id.to_string(),
            env: env.to_string(),
            holder: r.get(0),
            host: r.get(1),
            pid: r.get(2),
            since: r.get(3),
            stale: false,
        }))
    }
}

/// Inserts `d` with its targets, as row `keep_id` (a migrated history
/// keeps its ids) or, with `None`, the next one.
fn insert_deployment(
    tx: &mut postgres::Transaction<'_>,
    keep_id: Option<i64>,
    d: &DeploymentRecord,
) -> Result<i64, postgres::Error> {
    let id: i64 = tx
        .query_one(
            "INSERT INTO deployments
             (id, policy_id, env, version, digest, outcome, started_at, finished_at, actor)
             VALUES (COALESCE($1, nextval(pg_get_serial_sequence('deployments', 'id'))),
                     $2, $3, $4, $5, $6, $7, $8, $9) RETURNING id",
            &[
                &keep_id,
                &d.policy_id,
                &d.env,
                &d.version,
                &d.digest,
                &d.outcome.as_str(),
                &d.started_at,
                &d.finished_at,
                &d.actor,
            ],
        )?
        .get(0);
    insert_targets(tx, id, &d.targets)?;
    Ok(id)
}

/// The per-target rows of deployment `id`.
fn insert_targets(
    tx: &mut postgres::Transaction<'_>,
    id: i64,
    targets: &[TargetRecord],
) -> Result<(), postgres::Error> {
    for t in targets {
        tx.execute(
            "INSERT INTO targets (deployment_id, service, outcome, previous_digest, detail)
             VALUES ($1, $2, $3, $4, $5)",
            &[&id, &t.service, &t.outcome, &t.previous_digest, &t.detail],
        )?;
    }
    Ok(())
}

/// The advisory lock key of a policy and environment: 64 bits of a hash, so
/// distinct pairs practically never share a lock (and if two did, the cost
/// would be a spurious "locked", never a missed one).
fn lock_key(policy_id: &str, env: &str) -> i64 {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(format!("pde.lock/v1\n{policy_id}\n{env}\n"));
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(bytes)
}

/// A held advisory lock: its own connection, which releases the lock when
/// it closes, whether by [`Drop`] or by the process dying.
pub(crate) struct PgLock {
    conn: PgConn,
    key: i64,
    policy_id: String,
    env: String,
}

impl std::fmt::Debug for PgLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgLock")
            .field("policy_id", &self.policy_id)
            .field("env", &self.env)
            .finish()
    }
}

impl Drop for PgLock {
    fn drop(&mut self) {
        let key = self.key;
        let (policy_id, env) = (self.policy_id.clone(), self.env.clone());
        let client = self.conn.client();
        let released = off_runtime(move || {
            client.execute(
                "DELETE FROM leases WHERE policy_id = $1 AND env = $2",
                &[&policy_id, &env],
            )?;
            client.execute("SELECT pg_advisory_unlock($1)", &[&key])
        });
        if let Err(e) = released {
            // Closing the connection (next) releases the lock anyway.
            tracing::warn!(error = %e, "releasing the shared deploy lock");
        }
    }
}

impl StateBackend for PgState {
    fn location(&self) -> String {
        self.target.url.clone()
    }

    fn active(&self, policy_id: &str, env: &str) -> Result<Option<Active>, StateError> {
        self.call("read active version", |c| {
            Ok(c.query_opt(
                "SELECT version, digest, deployed_at FROM active WHERE policy_id = $1 AND env = $2",
                &[&policy_id, &env],
            )?
            .map(|r| Active {
                version: r.get(0),
                digest: r.get(1),
                deployed_at: r.get(2),
            }))
        })
    }

    fn set_active(
        &self,
        policy_id: &str,
        env: &str,
        version: &str,
        digest: &str,
    ) -> Result<(), StateError> {
        let now = now_rfc3339();
        self.call("set active version", |c| {
            c.execute(
                "INSERT INTO active (policy_id, env, version, digest, deployed_at)
                 VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (policy_id, env) DO UPDATE SET
                   version = excluded.version, digest = excluded.digest,
                   deployed_at = excluded.deployed_at",
                &[&policy_id, &env, &version, &digest, &now],
            )
            .map(drop)
        })
    }

    fn set_service_active(
        &self,
        policy_id: &str,
        env: &str,
        service: &str,
        holds: Option<(&str, &str)>,
    ) -> Result<(), StateError> {
        let now = now_rfc3339();
        let (version, digest) = holds.unzip();
        self.call("set service version", |c| {
            c.execute(
                "INSERT INTO service_active (policy_id, env, service, version, digest, updated_at)
                 VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (policy_id, env, service) DO UPDATE SET
                   version = excluded.version, digest = excluded.digest,
                   updated_at = excluded.updated_at",
                &[&policy_id, &env, &service, &version, &digest, &now],
            )
            .map(drop)
        })
    }

    fn was_deployed(&self, env: &str, policy_id: &str, digest: &str) -> Result<bool, StateError> {
        self.call("look up deployments", |c| {
            Ok(c.query_one(
                "SELECT EXISTS (SELECT 1 FROM deployments
                 WHERE env = $1 AND policy_id = $2 AND digest = $3 AND outcome = $4)",
                &[&env, &policy_id, &digest, &RecordOutcome::Deployed.as_str()],
            )?
            .get(0))
        })
    }

    fn put_bundle(&self, digest: &str, bytes: &[u8]) -> Result<(), StateError> {
        let now = now_rfc3339();
        self.call("store bundle", |c| {
            c.execute(
                "INSERT INTO bundles (digest, bytes, stored_at) VALUES ($1, $2, $3)
                 ON CONFLICT (digest) DO NOTHING",
                &[&digest, &bytes, &now],
            )
            .map(drop)
        })
    }

    fn bundle(&self, digest: &str) -> Result<Option<Vec<u8>>, StateError> {
        self.call("read bundle", |c| {
            Ok(
                c.query_opt("SELECT bytes FROM bundles WHERE digest = $1", &[&digest])?
                    .map(|r| r.get(0)),
            )
        })
    }

    fn record(&self, d: &DeploymentRecord) -> Result<i64, StateError> {
        self.call("record deployment", |c| {
            let mut tx = c.transaction()?;
            let id = insert_deployment(&mut tx, None, d)?;
            tx.commit()?;
            Ok(id)
        })
    }

    fn history(&self, policy_id: &str) -> Result<Vec<DeploymentRecord>, StateError> {
        let rows = self.call("read history", |c| {
            let deployments = c.query(
                "SELECT id, policy_id, env, version, digest, outcome, started_at, finished_at, actor
                 FROM deployments WHERE policy_id = $1 ORDER BY id DESC",
                &[&policy_id],
            )?;
            let mut out = Vec::with_capacity(deployments.len());
            for r in deployments {
                let id: i64 = r.get(0);
                let targets = c
                    .query(
                        "SELECT service, outcome, previous_digest, detail
                         FROM targets WHERE deployment_id = $1 ORDER BY id",
                        &[&id],
                    )?
                    .into_iter()
                    .map(|t| TargetRecord {
                        service: t.get(0),
                        outcome: t.get(1),
                        previous_digest: t.get(2),
                        detail: t.get(3),
                    })
                    .collect();
                out.push((r, targets));
            }
            Ok(out)
        })?;
        rows.into_iter()
            .map(|(r, targets)| {
                let outcome: String = r.get(5);
                Ok(DeploymentRecord {
                    id: Some(r.get(0)),
                    policy_id: r.get(1),
                    env: r.get(2),
                    version: r.get(3),
                    digest: r.get(4),
                    outcome: RecordOutcome::parse(&outcome).ok_or_else(|| {
                        StateError::PgConfig {
                            location: self.target.url.clone(),
                            message: format!("unknown deployment outcome {outcome:?}"),
                        }
                    })?,
                    started_at: r.get(6),
                    finished_at: r.get(7),
                    actor: r.get(8),
                    targets,
                })
            })
            .collect()
    }

    fn active_entries(&self, env: Option<&str>) -> Result<Vec<ActiveEntry>, StateError> {
        self.call("read status", |c| {
            let rows = c.query(
                "SELECT policy_id, env, version, digest, deployed_at FROM active
                 WHERE $1::TEXT IS NULL OR env = $1 ORDER BY env, policy_id",
                &[&env],
            )?;
            let mut entries = Vec::with_capacity(rows.len());
            for r in rows {
                let mut e = ActiveEntry {
                    policy_id: r.get(0),
                    env: r.get(1),
                    version: r.get(2),
                    digest: r.get(3),
                    deployed_at: r.get(4),
                    services: Vec::new(),
                    interrupted: None,
                };
                e.services = c
                    .query(
                        "SELECT service, version, digest, updated_at FROM service_active
                         WHERE policy_id = $1 AND env = $2 ORDER BY service",
                        &[&e.policy_id, &e.env],
                    )?
                    .into_iter()
                    .map(|s| ServiceHolding {
                        service: s.get(0),
                        version: s.get(1),
                        digest: s.get(2),
                        updated_at: s.get(3),
                    })
                    .collect();
                entries.push(e);
            }
            Ok(entries)
        })
    }

    fn lock(&self, policy_id: &str, env: &str) -> Result<DeployLock, StateError> {
        check_name("policy id", policy_id)?;
        check_name("environment", env)?;
        let key = lock_key(policy_id, env);
        let conn = Arc::new(Mutex::new(self.target.connect()?));
        let url = &self.target.url;
        let got: bool = call(&conn, url, "take deploy lock", |c| {
            Ok(c.query_one("SELECT pg_try_advisory_lock($1)", &[&key])?
                .get(0))
        })?;
        if !got {
            let lease = call(&conn, url, "read lease", |c| {
                PgState::lease_row(c, policy_id, env)
            })?;
            return Err(StateError::Locked {
                policy_id: policy_id.to_string(),
                env: env.to_string(),
                holder: lease.map_or_else(
                    || "held by a session that has not written its lease yet".to_string(),
                    |l| l.describe(),
                ),
            });
        }
        let holder = crate::audit::default_actor();
        let host = super::host_name();
        let pid = i64::from(std::process::id());
        let since = now_rfc3339();
        let previous = call(&conn, url, "write lease", |c| {
            let previous = PgState::lease_row(c, policy_id, env)?;
            c.execute(
                "INSERT INTO leases (policy_id, env, holder, host, pid, since)
                 VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (policy_id, env) DO UPDATE SET holder = excluded.holder,
                   host = excluded.host, pid = excluded.pid, since = excluded.since",
                &[&policy_id, &env, &holder, &host, &pid, &since],
            )?;
            Ok(previous)
        })?;
        if let Some(stale) = previous {
            // We hold the lock, so its previous holder is gone.
            tracing::warn!(
                policy_id,
                env,
                stale = %stale.describe(),
                "took over a stale lease left by a deploy that died"
            );
        }
        let conn = Arc::try_unwrap(conn)
            .map(|m| m.into_inner().unwrap_or_else(|p| p.into_inner()))
            .map_err(|_| StateError::PgConfig {
                location: url.clone(),
                message: "lock connection still shared".into(),
            })?;
        Ok(DeployLock::pg(PgLock {
            conn,
            key,
            policy_id: policy_id.to_string(),
            env: env.to_string(),
        }))
    }

    fn begin(&self, d: &DeploymentRecord) -> Result<i64, StateError> {
        self.record(&DeploymentRecord {
            outcome: RecordOutcome::InProgress,
            ..d.clone()
        })
    }

    fn finish(&self, id: i64, d: &DeploymentRecord) -> Result<(), StateError> {
        self.call("finish deployment", |c| {
            let mut tx = c.transaction()?;
            tx.execute(
                "UPDATE deployments SET version = $2, digest = $3, outcome = $4,
                   finished_at = $5 WHERE id = $1",
                &[
                    &id,
                    &d.version,
                    &d.digest,
                    &d.outcome.as_str(),
                    &d.finished_at,
                ],
            )?;
            tx.execute("DELETE FROM targets WHERE deployment_id = $1", &[&id])?;
            insert_targets(&mut tx, id, &d.targets)?;
            tx.commit()
        })
    }

    fn settle_interrupted(&self, policy_id: &str, env: &str) -> Result<Vec<i64>, StateError> {
        let now = now_rfc3339();
        self.call("settle interrupted deployments", |c| {
            Ok(c.query(
                "UPDATE deployments SET outcome = $4, finished_at = $5
                 WHERE policy_id = $1 AND env = $2 AND outcome = $3 RETURNING id",
                &[
                    &policy_id,
                    &env,
                    &RecordOutcome::InProgress.as_str(),
                    &RecordOutcome::Interrupted.as_str(),
                    &now,
                ],
            )?
            .into_iter()
            .map(|r| r.get(0))
            .collect())
        })
    }

    fn in_progress(&self, env: Option<&str>) -> Result<Vec<DeploymentRecord>, StateError> {
        let pairs: Vec<String> = self.call("read in-progress deployments", |c| {
            Ok(c.query(
                "SELECT DISTINCT policy_id FROM deployments
                 WHERE outcome = $1 AND ($2::TEXT IS NULL OR env = $2)",
                &[&RecordOutcome::InProgress.as_str(), &env],
            )?
            .into_iter()
            .map(|r| r.get(0))
            .collect())
        })?;
        let mut out = Vec::new();
        for policy_id in pairs {
            out.extend(self.history(&policy_id)?.into_iter().filter(|d| {
                d.outcome == RecordOutcome::InProgress && env.is_none_or(|e| d.env == e)
            }));
        }
        out.sort_by_key(|d| std::cmp::Reverse(d.id));
        Ok(out)
    }

    fn is_locked(&self, policy_id: &str, env: &str) -> Result<bool, StateError> {
        let key = lock_key(policy_id, env);
        self.call("probe deploy lock", |c| {
            // A lock this session can take is one nobody holds.
            let free: bool = c
                .query_one("SELECT pg_try_advisory_lock($1)", &[&key])?
                .get(0);
            if free {
                c.execute("SELECT pg_advisory_unlock($1)", &[&key])?;
            }
            Ok(!free)
        })
    }

    fn leases(&self) -> Result<Vec<Lease>, StateError> {
        self.call("read leases", |c| {
            let rows = c.query(
                "SELECT policy_id, env, holder, host, pid, since FROM leases ORDER BY env, policy_id",
                &[],
            )?;
            let mut out = Vec::with_capacity(rows.len());
            for r in rows {
                let (policy_id, env): (String, String) = (r.get(0), r.get(1));
                // A lock we can take is one nobody holds: the lease is stale.
                let key = lock_key(&policy_id, &env);
                let free: bool = c
                    .query_one("SELECT pg_try_advisory_lock($1)", &[&key])?
                    .get(0);
                if free {
                    c.execute("SELECT pg_advisory_unlock($1)", &[&key])?;
                }
                out.push(Lease {
                    policy_id,
                    env,
                    holder: r.get(2),
                    host: r.get(3),
                    pid: r.get(4),
                    since: r.get(5),
                    stale: free,
                });
            }
            Ok(out)
        })
    }

    fn unlock(&self, policy_id: &str, env: &str) -> Result<Option<Lease>, StateError> {
        check_name("policy id", policy_id)?;
        check_name("environment", env)?;
        let key = lock_key(policy_id, env);
        let outcome = self.call("clear lease", |c| {
            let free: bool = c
                .query_one("SELECT pg_try_advisory_lock($1)", &[&key])?
                .get(0);
            let lease = PgState::lease_row(c, policy_id, env)?;
            if free {
                c.execute(
                    "DELETE FROM leases WHERE policy_id = $1 AND env = $2",
                    &[&policy_id, &env],
                )?;
                c.execute("SELECT pg_advisory_unlock($1)", &[&key])?;
            }
            Ok((free, lease))
        })?;
        match outcome {
            (true, lease) => Ok(lease.map(|l| Lease { stale: true, ..l })),
            (false, lease) => Err(StateError::Locked {
                policy_id: policy_id.to_string(),
                env: env.to_string(),
                holder: lease
                    .map_or_else(|| "held by a live session".to_string(), |l| l.describe()),
            }),
        }
    }

    fn audit_chain(&self) -> Option<Arc<dyn ChainStore>> {
        Some(Arc::new(PgChain {
            target: self.target.clone(),
            conn: Mutex::new(None),
        }))
    }
}

/// The shared audit chain, on a connection of its own so that an append
/// never waits behind the state connection's caller.
pub struct PgChain {
    target: PgTarget,
    conn: Mutex<Option<PgConn>>,
}

impl std::fmt::Debug for PgChain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgChain")
            .field("url", &self.target.url)
            .finish()
    }
}

impl PgChain {
    fn with<T: Send>(
        &self,
        f: impl FnOnce(&mut Client) -> Result<T, AuditError> + Send,
    ) -> Result<T, AuditError> {
        let mut slot = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(self.target.connect().map_err(|e| self.err(&e))?);
        }
        let conn = slot.as_mut().unwrap_or_else(|| unreachable!("just set"));
        let client = conn.client();
        off_runtime(move || f(client))
    }

    fn err(&self, e: &dyn std::fmt::Display) -> AuditError {
        AuditError::Shared {
            location: self.target.url.clone(),
            reason: e.to_string(),
        }
    }
}

/// How a failed query on the shared chain at `url` is reported.
fn shared_err(url: &str) -> impl Fn(postgres::Error) -> AuditError + Copy + '_ {
    move |e| AuditError::Shared {
        location: url.to_string(),
        reason: e.to_string(),
    }
}

/// A read-only REPEATABLE READ transaction: every read in it sees one
/// snapshot, so no append can fall between the lines and the head.
fn snapshot(c: &mut Client) -> Result<postgres::Transaction<'_>, postgres::Error> {
    c.build_transaction()
        .isolation_level(postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
}

impl ChainStore for PgChain {
    fn location(&self) -> String {
        self.target.url.clone()
    }

    fn snapshot(&self) -> Result<(Vec<String>, Option<String>), AuditError> {
        let url = self.target.url.clone();
        self.with(move |c| {
            let db = shared_err(&url);
            // One REPEATABLE READ snapshot: no append can fall between the
            // lines and the head.
            let mut tx = snapshot(c).map_err(db)?;
            let lines = tx
                .query("SELECT line FROM audit_log ORDER BY seq", &[])
                .map_err(db)?
                .into_iter()
                .map(|r| r.get(0))
                .collect();
            let head: Option<String> = tx
                .query_one("SELECT head FROM audit_head WHERE id = 1", &[])
                .map_err(db)?
                .get(0);
            tx.commit().map_err(db)?;
            Ok((lines, head))
        })
    }

    fn head(&self) -> Result<Option<String>, AuditError> {
        let url = self.target.url.clone();
        self.with(move |c| {
            c.query_one("SELECT head FROM audit_head WHERE id = 1", &[])
                .map(|r| r.get(0))
                .map_err(|e| AuditError::Shared {
                    location: url,
                    reason: e.to_string(),
                })
        })
    }

    fn tail(&self) -> Result<(Option<String>, Option<String>), AuditError> {
        let url = self.target.url.clone();
        self.with(move |c| {
            let db = shared_err(&url);
            let mut tx = snapshot(c).map_err(db)?;
            let last: Option<String> = tx
                .query_opt("SELECT line FROM audit_log ORDER BY seq DESC LIMIT 1", &[])
                .map_err(db)?
                .map(|r| r.get(0));
            let head: Option<String> = tx
                .query_one("SELECT head FROM audit_head WHERE id = 1", &[])
                .map_err(db)?
                .get(0);
            tx.commit().map_err(db)?;
            Ok((last, head))
        })
    }

    fn with_sink_cursor(
        &self,
        forward: &mut (dyn FnMut(u64) -> u64 + Send),
    ) -> Result<Option<u64>, AuditError> {
        let url = self.target.url.clone();
        self.with(move |c| {
            let db = shared_err(&url);
            let mut tx = c.transaction().map_err(db)?;
            // SKIP LOCKED: a forwarder on another machine holds the row while
            // it sends one record; this one tries again later instead of
            // sending that record a second time.
            let row = tx
                .query_opt(
                    "SELECT cursor FROM audit_sink_cursor WHERE id = 1 FOR UPDATE SKIP LOCKED",
                    &[],
                )
                .map_err(db)?;
            let Some(row) = row else {
                return Ok(None);
            };
            let cursor: i64 = row.get(0);
            let moved = forward(u64::try_from(cursor).unwrap_or(0));
            let moved = i64::try_from(moved).unwrap_or(cursor);
            if moved != cursor {
                tx.execute(
                    "UPDATE audit_sink_cursor SET cursor = $1 WHERE id = 1",
                    &[&moved],
                )
                .map_err(db)?;
            }
            tx.commit().map_err(db)?;
            Ok(Some(u64::try_from(moved).unwrap_or(0)))
        })
    }

    fn append(
        &self,
        extend: &mut (
                 dyn FnMut(
            Option<&str>,
            Option<&str>,
        ) -> Result<(Vec<(u64, String)>, String), AuditError>
                     + Send
             ),
    ) -> Result<(), AuditError> {
        let url = self.target.url.clone();
        self.with(move |c| {
            let db = shared_err(&url);
            let mut tx = c.transaction().map_err(db)?;
            // The head row lock serialises appenders on every machine: the
            // next one reads the tail this one commits.
            let head: Option<String> = tx
                .query_one("SELECT head FROM audit_head WHERE id = 1 FOR UPDATE", &[])
                .map_err(db)?
                .get(0);
            let last: Option<String> = tx
                .query_opt("SELECT line FROM audit_log ORDER BY seq DESC LIMIT 1", &[])
                .map_err(db)?
                .map(|r| r.get(0));
            let (lines, new_head) = extend(last.as_deref(), head.as_deref())?;
            for (seq, line) in &lines {
                let seq = i64::try_from(*seq).map_err(|e| AuditError::Shared {
                    location: url.clone(),
                    reason: e.to_string(),
                })?;
                tx.execute(
                    "INSERT INTO audit_log (seq, line) VALUES ($1, $2)",
                    &[&seq, line],
                )
                .map_err(db)?;
            }
            tx.execute("UPDATE audit_head SET head = $1 WHERE id = 1", &[&new_head])
                .map_err(db)?;
            tx.commit().map_err(db)
        })
    }
}
