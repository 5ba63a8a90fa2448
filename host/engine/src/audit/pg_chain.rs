//! The team's audit chain in PostgreSQL (issue 12): `audit_log` holds the
//! JSON lines of the file log, byte for byte (one row a line, without the
//! `\n`), `audit_head` the head record and `audit_sink_cursor` the sink's
//! cursor, in the team's state database (whose schema creates the tables).
//! An append locks the head row (`SELECT … FOR UPDATE`), so appenders on
//! every machine take turns and the chain stays gap-free.

use std::sync::{Arc, Mutex};

use postgres::{Client, NoTls};

use super::error::AuditError;
use super::store::{ChainStore, Extend, Tail};
use crate::runtime::{DropOffRuntime, off_runtime};

/// The shared audit chain, on a connection of its own so that an append
/// never waits behind the state connection's caller.
pub struct PgChain {
    /// The database URL (never holds a password).
    url: String,
    config: postgres::Config,
    conn: Mutex<Option<DropOffRuntime<Client>>>,
}

impl std::fmt::Debug for PgChain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgChain").field("url", &self.url).finish()
    }
}

impl PgChain {
    /// The chain in the database at `url`, reached with `config` (which may
    /// hold the password); it connects on first use.
    pub(crate) fn new(url: String, config: postgres::Config) -> PgChain {
        PgChain {
            url,
            config,
            conn: Mutex::new(None),
        }
    }

    /// A connection of the chain's own, reported as the state's connection
    /// failure was.
    fn connect(&self) -> Result<DropOffRuntime<Client>, AuditError> {
        let config = self.config.clone();
        off_runtime(move || config.connect(NoTls))
            .map(DropOffRuntime::new)
            .map_err(|e| self.err(&format!("state database {}: connect failed: {e}", self.url)))
    }

    fn with<T: Send>(
        &self,
        f: impl FnOnce(&mut Client) -> Result<T, AuditError> + Send,
    ) -> Result<T, AuditError> {
        let mut slot = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(self.connect()?);
        }
        let conn = slot.as_mut().unwrap_or_else(|| unreachable!("just set"));
        let client = conn.get();
        off_runtime(move || f(client))
    }

    fn err(&self, e: &dyn std::fmt::Display) -> AuditError {
        AuditError::Shared {
            location: self.url.clone(),
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

/// The chain's head row (`FOR UPDATE` when `lock`). pde creates it with the
/// chain and never deletes it, so a missing row is tampering, named as
/// such (exit 6), not a failed query.
fn read_head(
    c: &mut impl postgres::GenericClient,
    url: &str,
    lock: bool,
) -> Result<Option<Vec<u8>>, AuditError> {
    let sql = match lock {
        true => "SELECT head FROM audit_head WHERE id = 1 FOR UPDATE",
        false => "SELECT head FROM audit_head WHERE id = 1",
    };
    match c.query_opt(sql, &[]).map_err(shared_err(url))? {
        Some(row) => Ok(row.get::<_, Option<String>>(0).map(String::into_bytes)),
        None => Err(AuditError::Anchor {
            reason: format!(
                "the shared audit chain {url} has no audit_head row: the chain's signed head \
                 was deleted; restore the row from a backup (or ask who deleted it)"
            ),
        }),
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
        self.url.clone()
    }

    fn head_location(&self) -> String {
        "the shared chain's head".into()
    }

    fn snapshot(&self) -> Result<(Vec<u8>, Option<Vec<u8>>), AuditError> {
        let url = self.url.clone();
        self.with(move |c| {
            let db = shared_err(&url);
            // One REPEATABLE READ snapshot: no append can fall between the
            // lines and the head.
            let mut tx = snapshot(c).map_err(db)?;
            let mut bytes = Vec::new();
            for row in tx
                .query("SELECT line FROM audit_log ORDER BY seq", &[])
                .map_err(db)?
            {
                bytes.extend(row.get::<_, String>(0).into_bytes());
                bytes.push(b'\n');
            }
            let head = read_head(&mut tx, &url, false)?;
            tx.commit().map_err(db)?;
            Ok((bytes, head))
        })
    }

    fn head(&self) -> Result<Option<Vec<u8>>, AuditError> {
        let url = self.url.clone();
        self.with(move |c| read_head(c, &url, false))
    }

    fn tail(&self) -> Result<Tail, AuditError> {
        let url = self.url.clone();
        self.with(move |c| {
            let db = shared_err(&url);
            let mut tx = snapshot(c).map_err(db)?;
            let line = last_line(&mut tx, &url)?;
            let head = read_head(&mut tx, &url, false)?;
            tx.commit().map_err(db)?;
            Ok(Tail {
                line,
                head,
                db_role: None,
            })
        })
    }

    fn with_sink_cursor(
        &self,
        forward: &mut (dyn FnMut(u64) -> u64 + Send),
    ) -> Result<Option<u64>, AuditError> {
        let url = self.url.clone();
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

    fn append(&self, extend: Extend<'_>) -> Result<(), AuditError> {
        let url = self.url.clone();
        self.with(move |c| {
            let db = shared_err(&url);
            let bad = |e: &dyn std::fmt::Display| AuditError::Shared {
                location: url.clone(),
                reason: e.to_string(),
            };
            let mut tx = c.transaction().map_err(db)?;
            // The head row lock serialises appenders on every machine: the
            // next one reads the tail this one commits.
            let head = read_head(&mut tx, &url, true)?;
            let line = last_line(&mut tx, &url)?;
            // Who the database says is writing: a shared `PDE_ACTOR` or a
            // CI job's `$USER` names a person loosely, the role does not.
            let db_role: String = tx
                .query_one("SELECT current_user::text", &[])
                .map_err(db)?
                .get(0);
            let extension = extend(Tail {
                line,
                head,
                db_role: Some(db_role),
            })?;
            for (seq, line) in extension.lines {
                let seq = i64::try_from(seq).map_err(|e| bad(&e))?;
                let line = String::from_utf8(line).map_err(|e| bad(&e))?;
                tx.execute(
                    "INSERT INTO audit_log (seq, line) VALUES ($1, $2)",
                    &[&seq, &line],
                )
                .map_err(db)?;
            }
            let head = String::from_utf8(extension.head).map_err(|e| bad(&e))?;
            tx.execute("UPDATE audit_head SET head = $1 WHERE id = 1", &[&head])
                .map_err(db)?;
            tx.commit().map_err(db)
        })
    }

    fn reopen(&self) -> Result<Arc<dyn ChainStore>, AuditError> {
        Ok(Arc::new(PgChain::new(
            self.url.clone(),
            self.config.clone(),
        )))
    }
}

/// The last row's line, with the `\n` a stored row always stands for.
fn last_line(
    c: &mut impl postgres::GenericClient,
    url: &str,
) -> Result<Option<Vec<u8>>, AuditError> {
    Ok(
        c.query_opt("SELECT line FROM audit_log ORDER BY seq DESC LIMIT 1", &[])
            .map_err(shared_err(url))?
            .map(|r| {
                let mut line = r.get::<_, String>(0).into_bytes();
                line.push(b'\n');
                line
            }),
    )
}
