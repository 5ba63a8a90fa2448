//! Shared team state in PostgreSQL (issue 12): history, active versions and
//! deploy locks across machines; the team's audit chain lives in the same
//! database ([`crate::audit::pg_chain`]).
//!
//! This file owns only the connection, its transactions, how values cross
//! the driver (`$n` placeholders, typed parameters) and the locks; the
//! statements are shared ([`super::query`]), as is the schema
//! ([`super::schema`]; the version is the `pde_schema` table, one behind
//! the list's step numbers, see there).
//!
//! **Crate and runtime.** The synchronous `postgres` client (a thin facade
//! over `tokio-postgres`) behind the synchronous [`super::StateBackend`]
//! trait. That client drives its own small runtime, and tokio refuses to
//! block or drop a runtime from inside another one, which is where the
//! pipeline runs. So every call (and every drop of a connection) goes
//! through `off_runtime`: on a runtime thread it runs on a scoped thread of
//! its own, elsewhere in place. One short query per call, so the thread
//! start is noise, and neither backend nor caller needs async.
//!
//! **Locks.** A deploy takes a session-level advisory lock per (policy,
//! environment) on a connection of its own, held until the deploy ends. If
//! the process dies, the server closes the connection and the lock goes with
//! it. A `leases` row says who holds it, from where, since when; a row whose
//! lock nobody holds is a stale lease, which `pde unlock` clears.

use std::str::FromStr;
use std::sync::{Arc, Mutex};

use postgres::types::{ToSql, Type};
use postgres::{Client, GenericClient, NoTls};

use pde_core::clock::now_rfc3339;

use super::lock::{HeldLock, check_name, host_name};
use super::query::{Cell, Row, Sql, Value, dollar_placeholders};
use super::schema::{self, Dialect, VersionStore};
use super::{Backend, BackendError, DeployLock, Lease, StateError};
use crate::audit::ChainStore;
use crate::audit::pg_chain::PgChain;
use crate::runtime::{DropOffRuntime, off_runtime};

/// The leases of the advisory locks, and the team's audit chain
/// ([`PgChain`]): tables of this backend alone, created with step 1.
const OWN_TABLES: &str = r#"
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
"#;

/// How PostgreSQL spells what differs.
static DIALECT: Dialect = Dialect {
    name: "postgres",
    auto_id: "BIGSERIAL PRIMARY KEY",
    bytes: "BYTEA",
    version: VersionStore {
        // Two machines opening a new database at once take turns (the
        // transaction-scoped advisory lock 0x7064_655f_6d69_6772, "pde_migr").
        prepare: "SELECT pg_advisory_xact_lock(8098709490450917234);
                  CREATE TABLE IF NOT EXISTS pde_schema (
                      id INTEGER PRIMARY KEY CHECK (id = 1),
                      version INTEGER NOT NULL);
                  INSERT INTO pde_schema (id, version) VALUES (1, 0) ON CONFLICT DO NOTHING;",
        read: "SELECT version FROM pde_schema WHERE id = 1",
        write: |v| format!("UPDATE pde_schema SET version = {v} WHERE id = 1"),
        // The first PostgreSQL migration created steps 1 and 2 at once.
        offset: 1,
    },
    own_tables: &[(1, OWN_TABLES)],
    after_explicit_ids: "SELECT setval(pg_get_serial_sequence('deployments', 'id'),
                                GREATEST((SELECT max(id) FROM deployments), 1));
                         SELECT setval(pg_get_serial_sequence('rollouts', 'id'),
                                GREATEST((SELECT max(id) FROM rollouts), 1))",
};

/// The `pde_schema.version` of a database this build has fully migrated.
pub fn schema_version() -> i64 {
    DIALECT.newest_stored()
}

/// Opens the state at `url` ([`super::SHARED_BACKENDS`]).
pub fn open(
    url: &str,
    password_env: Option<&str>,
) -> Result<Box<dyn super::StateBackend>, StateError> {
    Ok(Box::new(PgState::open(PgTarget::new(url, password_env)?)?))
}

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
                    pde_core::secret::from_env(var).ok_or_else(|| StateError::Config {
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
        let mut config = postgres::Config::from_str(url).map_err(|e| StateError::Config {
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
            off_runtime(move || config.connect(NoTls)).map_err(|source| StateError::Backend {
                backend: DIALECT.name,
                location: self.url.clone(),
                action: "connect",
                source: source.into(),
            })?;
        Ok(DropOffRuntime::new(client))
    }
}

/// A client, always dropped off the async runtime.
type PgConn = DropOffRuntime<Client>;

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
    f: impl FnOnce(&mut Client) -> Result<T, BackendError> + Send,
) -> Result<T, StateError> {
    // A panic mid-call leaves at most an aborted transaction, which the
    // server rolls back; the client is still usable.
    let mut guard = conn.lock().unwrap_or_else(|p| p.into_inner());
    let client = guard.get();
    off_runtime(move || f(client)).map_err(|source| StateError::Backend {
        backend: DIALECT.name,
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
        let location = state.target.url.clone();
        state.transaction("migrate schema", |db| {
            schema::migrate(db, &DIALECT, &location)
        })??;
        Ok(state)
    }

    fn call<T: Send>(
        &self,
        action: &'static str,
        f: impl FnOnce(&mut Client) -> Result<T, BackendError> + Send,
    ) -> Result<T, StateError> {
        call(&self.conn, &self.target.url, action, f)
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

/// A client or an open transaction as [`Sql`].
struct Executor<'a, C: GenericClient>(&'a mut C);

/// `value` as a parameter of type `ty` (from the prepared statement), so
/// that one [`Value::Int`] fills an `INTEGER` or a `BIGINT` and a
/// [`Value::Null`] any column.
fn bind<'a>(value: &Value<'a>, ty: &Type) -> Result<Box<dyn ToSql + Sync + 'a>, BackendError> {
    Ok(match (*value, ty) {
        (Value::Null, &Type::INT8) => Box::new(None::<i64>),
        (Value::Null, &Type::INT4) => Box::new(None::<i32>),
        (Value::Null, &Type::BYTEA) => Box::new(None::<&[u8]>),
        (Value::Null, _) => Box::new(None::<&str>),
        (Value::Int(i), &Type::INT4) => Box::new(i32::try_from(i)?),
        (Value::Int(i), &Type::INT2) => Box::new(i16::try_from(i)?),
        (Value::Int(i), _) => Box::new(i),
        (Value::Text(s), _) => Box::new(s),
        (Value::Bytes(b), _) => Box::new(b),
    })
}

/// Column `i` of `row`, by its type.
fn cell(row: &postgres::Row, i: usize) -> Result<Cell, BackendError> {
    let ty = row.columns()[i].type_();
    let cell = match *ty {
        Type::INT8 => row.try_get::<_, Option<i64>>(i)?.map(Cell::Int),
        Type::INT4 => row
            .try_get::<_, Option<i32>>(i)?
            .map(|n| Cell::Int(n.into())),
        Type::INT2 => row
            .try_get::<_, Option<i16>>(i)?
            .map(|n| Cell::Int(n.into())),
        Type::BOOL => row
            .try_get::<_, Option<bool>>(i)?
            .map(|b| Cell::Int(b.into())),
        Type::BYTEA => row.try_get::<_, Option<Vec<u8>>>(i)?.map(Cell::Bytes),
        _ => row.try_get::<_, Option<String>>(i)?.map(Cell::Text),
    };
    Ok(cell.unwrap_or(Cell::Null))
}

impl<C: GenericClient> Executor<'_, C> {
    /// Prepares `sql` (rewritten to `$n`), binds `params` to the types the
    /// server expects, and runs `f` with them.
    fn with_params<T>(
        &mut self,
        sql: &str,
        params: &[Value<'_>],
        f: impl FnOnce(
            &mut C,
            &postgres::Statement,
            &[&(dyn ToSql + Sync)],
        ) -> Result<T, postgres::Error>,
    ) -> Result<T, BackendError> {
        let statement = self.0.prepare(&dollar_placeholders(sql))?;
        let bound = params
            .iter()
            .zip(statement.params())
            .map(|(v, ty)| bind(v, ty))
            .collect::<Result<Vec<_>, _>>()?;
        let refs: Vec<&(dyn ToSql + Sync)> = bound.iter().map(|b| &**b).collect();
        Ok(f(self.0, &statement, &refs)?)
    }
}

impl<C: GenericClient> Sql for Executor<'_, C> {
    fn execute(&mut self, sql: &str, params: &[Value<'_>]) -> Result<u64, BackendError> {
        self.with_params(sql, params, |c, statement, params| {
            c.execute(statement, params)
        })
    }

    fn query(&mut self, sql: &str, params: &[Value<'_>]) -> Result<Vec<Row>, BackendError> {
        self.with_params(sql, params, |c, statement, params| {
            c.query(statement, params)
        })?
        .iter()
        .map(|r| {
            Ok(Row((0..r.len())
                .map(|i| cell(r, i))
                .collect::<Result<_, _>>()?))
        })
        .collect()
    }

    fn batch(&mut self, sql: &str) -> Result<(), BackendError> {
        if !sql.is_empty() {
            self.0.batch_execute(sql)?;
        }
        Ok(())
    }
}

impl Backend for PgState {
    fn location(&self) -> String {
        self.target.url.clone()
    }

    fn db_role(&self) -> Result<Option<String>, StateError> {
        self.call("read the database role", |c| {
            Ok(Some(c.query_one("SELECT current_user::text", &[])?.get(0)))
        })
    }

    fn dialect(&self) -> &'static Dialect {
        &DIALECT
    }

    fn run<T: Send>(
        &self,
        action: &'static str,
        f: impl FnOnce(&mut dyn Sql) -> Result<T, BackendError> + Send,
    ) -> Result<T, StateError> {
        self.call(action, |c| f(&mut Executor(c)))
    }

    fn transaction<T: Send>(
        &self,
        action: &'static str,
        f: impl FnOnce(&mut dyn Sql) -> Result<T, BackendError> + Send,
    ) -> Result<T, StateError> {
        self.call(action, |c| {
            let mut tx = c.transaction()?;
            let out = f(&mut Executor(&mut tx))?;
            tx.commit()?;
            Ok(out)
        })
    }

    fn lock(&self, policy_id: &str, env: &str) -> Result<DeployLock, StateError> {
        check_name("policy id", policy_id)?;
        check_name("environment", env)?;
        let key = lock_key(policy_id, env);
        let conn = Arc::new(Mutex::new(self.target.connect()?));
        let url = &self.target.url;
        let got = call(&conn, url, "take deploy lock", |c| {
            Ok(try_advisory_lock(c, key)?)
        })?;
        if !got {
            let lease = call(&conn, url, "read lease", |c| {
                Ok(PgState::lease_row(c, policy_id, env)?)
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
        let actor = crate::audit::default_actor();
        let host = host_name();
        let pid = i64::from(std::process::id());
        let since = now_rfc3339();
        let previous = call(&conn, url, "write lease", |c| {
            // The lease names the database role too, as the audit records
            // do: a team's shared CI user is one actor, its roles are not.
            let role: String = c.query_one("SELECT current_user::text", &[])?.get(0);
            let holder = format!("{actor} (database role {role})");
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
        // On the session that holds the lock, from the server's clock: one
        // scale for every machine of the team (see `pde_core::fence`).
        let fence = call(&conn, url, "take fencing number", |c| {
            let row = c.query_one(
                "INSERT INTO fences (policy_id, env, fence)
                 VALUES ($1, $2, (extract(epoch FROM clock_timestamp()) * 1000000)::bigint)
                 ON CONFLICT (policy_id, env) DO UPDATE
                   SET fence = GREATEST(excluded.fence, fences.fence + 1)
                 RETURNING fence",
                &[&policy_id, &env],
            )?;
            Ok(row.get::<_, i64>(0))
        })?;
        let conn = Arc::try_unwrap(conn).map_err(|_| StateError::Config {
            location: url.clone(),
            message: "lock connection still shared".into(),
        })?;
        Ok(DeployLock::new(
            PgLock {
                conn,
                key,
                policy_id: policy_id.to_string(),
                env: env.to_string(),
            },
            policy_id,
            env,
            u64::try_from(fence).unwrap_or(0),
        ))
    }

    fn is_locked(&self, policy_id: &str, env: &str) -> Result<bool, StateError> {
        let key = lock_key(policy_id, env);
        self.call("probe deploy lock", |c| Ok(!lock_is_free(c, key)?))
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
                // A lock nobody holds: the lease is stale.
                let free = lock_is_free(c, lock_key(&policy_id, &env))?;
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
            let free = try_advisory_lock(c, key)?;
            let lease = PgState::lease_row(c, policy_id, env)?;
            if free {
                delete_lease(c, policy_id, env)?;
                advisory_unlock(c, key)?;
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
        Some(Arc::new(PgChain::new(
            self.target.url.clone(),
            self.target.config.clone(),
        )))
    }
}

/// Takes `key`'s advisory lock for this session, if nobody holds it.
fn try_advisory_lock(c: &mut Client, key: i64) -> Result<bool, postgres::Error> {
    Ok(c.query_one("SELECT pg_try_advisory_lock($1)", &[&key])?
        .get(0))
}

/// Whether nobody holds `key`'s advisory lock: a lock this session can take
/// (and gives back at once) is one nobody holds.
fn lock_is_free(c: &mut Client, key: i64) -> Result<bool, postgres::Error> {
    let free = try_advisory_lock(c, key)?;
    if free {
        advisory_unlock(c, key)?;
    }
    Ok(free)
}

/// Gives back `key`'s advisory lock held by this session.
fn advisory_unlock(c: &mut Client, key: i64) -> Result<u64, postgres::Error> {
    c.execute("SELECT pg_advisory_unlock($1)", &[&key])
}

/// Removes the lease row of `policy_id` in `env`.
fn delete_lease(c: &mut Client, policy_id: &str, env: &str) -> Result<u64, postgres::Error> {
    c.execute(
        "DELETE FROM leases WHERE policy_id = $1 AND env = $2",
        &[&policy_id, &env],
    )
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
struct PgLock {
    conn: Mutex<PgConn>,
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

impl HeldLock for PgLock {
    /// Asks, on the session that took the lock, whether the server still
    /// lists it as granted to this session and whether the lock's fence is
    /// still ours. A session the server ended answers nothing: lost too.
    fn still_held(&self, fence: u64) -> Result<(), String> {
        // A bigint advisory key is listed as classid (high half), objid
        // (low half), objsubid 1.
        let bits = self.key as u64;
        let (high, low) = ((bits >> 32) as i64, (bits & 0xffff_ffff) as i64);
        let (policy_id, env) = (self.policy_id.as_str(), self.env.as_str());
        let mut guard = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let client = guard.get();
        let answer = off_runtime(move || {
            client.query_one(
                "SELECT (SELECT fence FROM fences WHERE policy_id = $1 AND env = $2),
                        EXISTS (SELECT 1 FROM pg_locks
                                WHERE locktype = 'advisory' AND granted
                                  AND pid = pg_backend_pid()
                                  AND classid::bigint = $3 AND objid::bigint = $4
                                  AND objsubid = 1)",
                &[&policy_id, &env, &high, &low],
            )
        });
        let row = answer.map_err(|e| format!("its database session is gone ({e})"))?;
        let (now, granted): (Option<i64>, bool) = (row.get(0), row.get(1));
        if !granted {
            return Err("the database no longer lists it as held by this session".into());
        }
        match now.and_then(|n| u64::try_from(n).ok()) {
            Some(n) if n == fence => Ok(()),
            other => Err(format!(
                "it was taken again since (its fence is now {})",
                other.map_or("unknown".to_string(), |n| n.to_string())
            )),
        }
    }
}

impl Drop for PgLock {
    fn drop(&mut self) {
        let key = self.key;
        let (policy_id, env) = (self.policy_id.clone(), self.env.clone());
        let client = self.conn.get_mut().unwrap_or_else(|p| p.into_inner()).get();
        let released = off_runtime(move || {
            delete_lease(client, &policy_id, &env)?;
            advisory_unlock(client, key)
        });
        if let Err(e) = released {
            // Closing the connection (next) releases the lock anyway.
            tracing::warn!(error = %e, "releasing the shared deploy lock");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_rewritten_outside_literals_only() {
        assert_eq!(
            dollar_placeholders("SELECT '?1', \"?2\" FROM t WHERE a = ?1 AND b = ?12"),
            "SELECT '?1', \"?2\" FROM t WHERE a = $1 AND b = $12"
        );
    }

    #[test]
    fn stored_versions_are_one_behind_the_steps() {
        // Databases in the field: pde_schema.version 1 was steps 1-2, 2 was
        // 1-3, 3 was 1-4 (see the schema module).
        assert_eq!(DIALECT.version.stored(4), 3);
        assert_eq!(schema_version(), schema::MIGRATIONS.len() as i64 - 1);
    }
}
