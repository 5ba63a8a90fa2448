//! Every statement of the state, written once, and the mapping of rows to
//! the state's types, over [`Sql`]: the small executor each backend
//! implements for its driver.
//!
//! Statements are portable SQL (`ON CONFLICT … DO UPDATE`, `RETURNING`,
//! `CAST(?n AS TEXT) IS NULL` for an optional filter) with SQLite's numbered
//! placeholders `?1`, `?2`, …; a driver that numbers them otherwise
//! rewrites them ([`dollar_placeholders`] for PostgreSQL). Values cross the
//! executor as [`Value`]s and rows come back as [`Row`]s of owned
//! [`Cell`]s, so no statement and no row mapping names a driver.
//!
//! [`StateBackend`] is implemented here for every [`Backend`]: a backend
//! supplies the connection, its transactions and its locks, and gets every
//! statement from this file.

use std::collections::HashMap;
use std::sync::Arc;

use pde_core::clock::now_rfc3339;

use super::{
    Active, ActiveEntry, Backend, BackendError, DeployLock, DeploymentRecord, Dump, Lease,
    RecordOutcome, RolloutRecord, ServiceHolding, StateBackend, StateError, TargetRecord,
};

/// A value bound to a placeholder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Value<'a> {
    /// SQL `NULL`.
    Null,
    /// A 64-bit integer.
    Int(i64),
    /// Text.
    Text(&'a str),
    /// A byte string.
    Bytes(&'a [u8]),
}

impl<'a> From<&'a str> for Value<'a> {
    fn from(s: &'a str) -> Self {
        Value::Text(s)
    }
}

impl<'a> From<&'a String> for Value<'a> {
    fn from(s: &'a String) -> Self {
        Value::Text(s)
    }
}

impl<'a> From<Option<&'a str>> for Value<'a> {
    fn from(s: Option<&'a str>) -> Self {
        s.map_or(Value::Null, Value::Text)
    }
}

impl<'a> From<&'a Option<String>> for Value<'a> {
    fn from(s: &'a Option<String>) -> Self {
        s.as_deref().into()
    }
}

impl From<i64> for Value<'_> {
    fn from(i: i64) -> Self {
        Value::Int(i)
    }
}

impl<'a> From<&'a [u8]> for Value<'a> {
    fn from(b: &'a [u8]) -> Self {
        Value::Bytes(b)
    }
}

impl From<RecordOutcome> for Value<'static> {
    fn from(o: RecordOutcome) -> Self {
        Value::Text(o.as_str())
    }
}

/// One column of a result row, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cell {
    /// SQL `NULL`.
    Null,
    /// An integer (a boolean is 0 or 1).
    Int(i64),
    /// Text.
    Text(String),
    /// A byte string.
    Bytes(Vec<u8>),
}

/// A result row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row(pub Vec<Cell>);

impl Row {
    fn cell(&self, i: usize) -> Result<&Cell, BackendError> {
        self.0
            .get(i)
            .ok_or_else(|| format!("the row has no column {i}").into())
    }

    fn mismatch(&self, i: usize, want: &str) -> BackendError {
        format!("column {i} is not {want}: {:?}", self.0.get(i)).into()
    }

    /// Column `i` as text.
    pub fn text(&self, i: usize) -> Result<String, BackendError> {
        self.opt_text(i)?.ok_or_else(|| self.mismatch(i, "text"))
    }

    /// Column `i` as text or `NULL`.
    pub fn opt_text(&self, i: usize) -> Result<Option<String>, BackendError> {
        match self.cell(i)? {
            Cell::Null => Ok(None),
            Cell::Text(s) => Ok(Some(s.clone())),
            _ => Err(self.mismatch(i, "text")),
        }
    }

    /// Column `i` as an integer.
    pub fn int(&self, i: usize) -> Result<i64, BackendError> {
        match self.cell(i)? {
            Cell::Int(n) => Ok(*n),
            _ => Err(self.mismatch(i, "an integer")),
        }
    }

    /// Column `i` as bytes.
    pub fn bytes(&self, i: usize) -> Result<Vec<u8>, BackendError> {
        match self.cell(i)? {
            Cell::Bytes(b) => Ok(b.clone()),
            _ => Err(self.mismatch(i, "bytes")),
        }
    }
}

/// What a backend's driver does with a statement. Statements come with
/// `?n` placeholders; see the module docs.
pub trait Sql {
    /// Runs one statement; returns how many rows it changed.
    fn execute(&mut self, sql: &str, params: &[Value<'_>]) -> Result<u64, BackendError>;
    /// Runs one statement; returns its rows.
    fn query(&mut self, sql: &str, params: &[Value<'_>]) -> Result<Vec<Row>, BackendError>;
    /// Runs statements without parameters, separated by `;` (DDL).
    fn batch(&mut self, sql: &str) -> Result<(), BackendError>;
}

/// `sql` with `?n` placeholders as `$n` (PostgreSQL's spelling), outside
/// quoted literals and identifiers.
pub fn dollar_placeholders(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut quote = None;
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (None, '\'' | '"') => quote = Some(c),
            (Some(q), _) if c == q => quote = None,
            (None, '?') if chars.peek().is_some_and(char::is_ascii_digit) => {
                out.push('$');
                continue;
            }
            _ => {}
        }
        out.push(c);
    }
    out
}

/// The first row of `sql`'s result, if any.
pub(crate) fn query_opt(
    db: &mut dyn Sql,
    sql: &str,
    params: &[Value<'_>],
) -> Result<Option<Row>, BackendError> {
    Ok(db.query(sql, params)?.into_iter().next())
}

/// The one row of `sql`'s result.
pub(crate) fn query_one(
    db: &mut dyn Sql,
    sql: &str,
    params: &[Value<'_>],
) -> Result<Row, BackendError> {
    query_opt(db, sql, params)?.ok_or_else(|| format!("no row from {sql}").into())
}

// ---------------------------------------------------------------------------
// Row mapping.

const DEPLOYMENTS: &str = "SELECT id, policy_id, env, version, digest, outcome, started_at, \
                           finished_at, actor FROM deployments";

fn deployment(r: &Row) -> Result<DeploymentRecord, BackendError> {
    let outcome = r.text(5)?;
    Ok(DeploymentRecord {
        id: Some(r.int(0)?),
        policy_id: r.text(1)?,
        env: r.text(2)?,
        version: r.text(3)?,
        digest: r.text(4)?,
        outcome: RecordOutcome::parse(&outcome)
            .ok_or_else(|| format!("unknown deployment outcome {outcome:?}"))?,
        started_at: r.text(6)?,
        finished_at: r.text(7)?,
        actor: r.text(8)?,
        targets: Vec::new(),
    })
}

/// Deployments chosen by `filter` (a `WHERE … ORDER BY …` over
/// [`DEPLOYMENTS`]), each with its targets in order.
fn deployments(
    db: &mut dyn Sql,
    filter: &str,
    params: &[Value<'_>],
) -> Result<Vec<DeploymentRecord>, BackendError> {
    let rows = db.query(&format!("{DEPLOYMENTS} {filter}"), params)?;
    let mut out = Vec::with_capacity(rows.len());
    for r in &rows {
        let mut d = deployment(r)?;
        d.targets = db
            .query(
                "SELECT service, outcome, previous_digest, detail
                 FROM targets WHERE deployment_id = ?1 ORDER BY id",
                &[Value::Int(r.int(0)?)],
            )?
            .iter()
            .map(|t| {
                Ok(TargetRecord {
                    service: t.text(0)?,
                    outcome: t.text(1)?,
                    previous_digest: t.opt_text(2)?,
                    detail: t.text(3)?,
                })
            })
            .collect::<Result<_, BackendError>>()?;
        out.push(d);
    }
    Ok(out)
}

/// The `active` rows (optionally of one environment), by environment, then
/// policy, without their services.
fn active_rows(db: &mut dyn Sql, env: Option<&str>) -> Result<Vec<ActiveEntry>, BackendError> {
    db.query(
        "SELECT policy_id, env, version, digest, deployed_at FROM active
         WHERE CAST(?1 AS TEXT) IS NULL OR env = ?1 ORDER BY env, policy_id",
        &[env.into()],
    )?
    .iter()
    .map(|r| {
        Ok(ActiveEntry {
            policy_id: r.text(0)?,
            env: r.text(1)?,
            version: r.text(2)?,
            digest: r.text(3)?,
            deployed_at: r.text(4)?,
            services: Vec::new(),
            interrupted: None,
        })
    })
    .collect()
}

/// The `service_active` rows (optionally of one environment), by
/// environment, policy and service: `(policy, env, holding)`.
fn service_rows(
    db: &mut dyn Sql,
    env: Option<&str>,
) -> Result<Vec<(String, String, ServiceHolding)>, BackendError> {
    db.query(
        "SELECT policy_id, env, service, version, digest, updated_at FROM service_active
         WHERE CAST(?1 AS TEXT) IS NULL OR env = ?1 ORDER BY env, policy_id, service",
        &[env.into()],
    )?
    .iter()
    .map(|r| {
        Ok((
            r.text(0)?,
            r.text(1)?,
            ServiceHolding {
                service: r.text(2)?,
                version: r.opt_text(3)?,
                digest: r.opt_text(4)?,
                updated_at: r.text(5)?,
            },
        ))
    })
    .collect()
}

// ---------------------------------------------------------------------------
// Writes.

/// Inserts `d` with its targets; as row `keep_id` (an imported history
/// keeps its ids) or, with `None`, the next one. Returns its id.
fn insert_deployment(
    db: &mut dyn Sql,
    d: &DeploymentRecord,
    keep_id: Option<i64>,
) -> Result<i64, BackendError> {
    let (id_column, id_value) = match keep_id {
        Some(_) => (", id", ", ?9"),
        None => ("", ""),
    };
    let mut params = vec![
        Value::from(&d.policy_id),
        (&d.env).into(),
        (&d.version).into(),
        (&d.digest).into(),
        d.outcome.into(),
        (&d.started_at).into(),
        (&d.finished_at).into(),
        (&d.actor).into(),
    ];
    params.extend(keep_id.map(Value::Int));
    let id = query_one(
        db,
        &format!(
            "INSERT INTO deployments
             (policy_id, env, version, digest, outcome, started_at, finished_at, actor{id_column})
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8{id_value}) RETURNING id"
        ),
        &params,
    )?
    .int(0)?;
    insert_targets(db, id, &d.targets)?;
    Ok(id)
}

/// The per-target rows of deployment `id`.
fn insert_targets(db: &mut dyn Sql, id: i64, targets: &[TargetRecord]) -> Result<(), BackendError> {
    for t in targets {
        db.execute(
            "INSERT INTO targets (deployment_id, service, outcome, previous_digest, detail)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            &[
                id.into(),
                (&t.service).into(),
                (&t.outcome).into(),
                (&t.previous_digest).into(),
                (&t.detail).into(),
            ],
        )?;
    }
    Ok(())
}

fn upsert_active(
    db: &mut dyn Sql,
    policy_id: &str,
    env: &str,
    version: &str,
    digest: &str,
    at: &str,
) -> Result<(), BackendError> {
    db.execute(
        "INSERT INTO active (policy_id, env, version, digest, deployed_at)
         VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (policy_id, env) DO UPDATE SET
           version = excluded.version, digest = excluded.digest,
           deployed_at = excluded.deployed_at",
        &[
            policy_id.into(),
            env.into(),
            version.into(),
            digest.into(),
            at.into(),
        ],
    )
    .map(drop)
}

fn upsert_service(
    db: &mut dyn Sql,
    policy_id: &str,
    env: &str,
    holding: &ServiceHolding,
) -> Result<(), BackendError> {
    db.execute(
        "INSERT INTO service_active (policy_id, env, service, version, digest, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (policy_id, env, service) DO UPDATE SET
           version = excluded.version, digest = excluded.digest,
           updated_at = excluded.updated_at",
        &[
            policy_id.into(),
            env.into(),
            (&holding.service).into(),
            (&holding.version).into(),
            (&holding.digest).into(),
            (&holding.updated_at).into(),
        ],
    )
    .map(drop)
}

fn rollout_rows(
    db: &mut dyn Sql,
    filter: &str,
    params: &[Value<'_>],
) -> Result<Vec<RolloutRecord>, BackendError> {
    let sql = format!(
        "SELECT id, policy_id, env, version, digest, status, control, doc, started_at, \
         updated_at, actor FROM rollouts {filter}"
    );
    db.query(&sql, params)?
        .iter()
        .map(|r| {
            Ok(RolloutRecord {
                id: Some(r.int(0)?),
                policy_id: r.text(1)?,
                env: r.text(2)?,
                version: r.text(3)?,
                digest: r.text(4)?,
                status: r.text(5)?,
                control: r.opt_text(6)?,
                doc: serde_json::from_str(&r.text(7)?)
                    .map_err(|e| -> BackendError { format!("rollout doc: {e}").into() })?,
                started_at: r.text(8)?,
                updated_at: r.text(9)?,
                actor: r.text(10)?,
            })
        })
        .collect()
}

/// Stores `r` as it was, with its id when it has one: `pde state migrate`
/// keeps the ids people were shown by `pde rollout status`.
fn insert_rollout(db: &mut dyn Sql, r: &RolloutRecord) -> Result<(), BackendError> {
    let doc = r.doc.to_string();
    let id =
        r.id.ok_or_else(|| -> BackendError { "a rollout to import has no id".into() })?;
    db.execute(
        "INSERT INTO rollouts (id, policy_id, env, version, digest, status, control, doc,
         started_at, updated_at, actor) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
        &[
            id.into(),
            (&r.policy_id).into(),
            (&r.env).into(),
            (&r.version).into(),
            (&r.digest).into(),
            (&r.status).into(),
            r.control.as_deref().into(),
            doc.as_str().into(),
            (&r.started_at).into(),
            (&r.updated_at).into(),
            (&r.actor).into(),
        ],
    )
    .map(drop)
}

// ---------------------------------------------------------------------------
// The state, for every backend.

impl<B: Backend> StateBackend for B {
    fn location(&self) -> String {
        Backend::location(self)
    }

    fn db_role(&self) -> Result<Option<String>, StateError> {
        Backend::db_role(self)
    }

    fn active(&self, policy_id: &str, env: &str) -> Result<Option<Active>, StateError> {
        self.run("read active version", |db| {
            query_opt(
                db,
                "SELECT version, digest, deployed_at FROM active WHERE policy_id = ?1 AND env = ?2",
                &[policy_id.into(), env.into()],
            )?
            .map(|r| {
                Ok(Active {
                    version: r.text(0)?,
                    digest: r.text(1)?,
                    deployed_at: r.text(2)?,
                })
            })
            .transpose()
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
        self.run("set active version", |db| {
            upsert_active(db, policy_id, env, version, digest, &now)
        })
    }

    fn set_service_active(
        &self,
        policy_id: &str,
        env: &str,
        service: &str,
        holds: Option<(&str, &str)>,
    ) -> Result<(), StateError> {
        let (version, digest) = holds.unzip();
        let holding = ServiceHolding {
            service: service.to_string(),
            version: version.map(str::to_string),
            digest: digest.map(str::to_string),
            updated_at: now_rfc3339(),
        };
        self.run("set service version", |db| {
            upsert_service(db, policy_id, env, &holding)
        })
    }

    fn was_deployed(&self, env: &str, policy_id: &str, digest: &str) -> Result<bool, StateError> {
        self.run("look up deployments", |db| {
            Ok(query_one(
                db,
                "SELECT EXISTS (SELECT 1 FROM deployments
                 WHERE env = ?1 AND policy_id = ?2 AND digest = ?3 AND outcome = ?4)",
                &[
                    env.into(),
                    policy_id.into(),
                    digest.into(),
                    RecordOutcome::Deployed.into(),
                ],
            )?
            .int(0)?
                != 0)
        })
    }

    fn put_bundle(&self, digest: &str, bytes: &[u8]) -> Result<(), StateError> {
        let now = now_rfc3339();
        self.run("store bundle", |db| {
            db.execute(
                "INSERT INTO bundles (digest, bytes, stored_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (digest) DO NOTHING",
                &[digest.into(), bytes.into(), (&now).into()],
            )
            .map(drop)
        })
    }

    fn rollout_begin(&self, r: &RolloutRecord) -> Result<i64, StateError> {
        let doc = r.doc.to_string();
        self.run("begin rollout", |db| {
            query_one(
                db,
                "INSERT INTO rollouts (policy_id, env, version, digest, status, control, doc,
                 started_at, updated_at, actor) VALUES (?1, ?2, ?3, ?4, ?5, NULL, ?6, ?7, ?7, ?8)
                 RETURNING id",
                &[
                    (&r.policy_id).into(),
                    (&r.env).into(),
                    (&r.version).into(),
                    (&r.digest).into(),
                    (&r.status).into(),
                    doc.as_str().into(),
                    (&r.started_at).into(),
                    (&r.actor).into(),
                ],
            )?
            .int(0)
        })
    }

    fn rollout_save(
        &self,
        id: i64,
        status: &str,
        doc: &serde_json::Value,
    ) -> Result<(), StateError> {
        let (doc, now) = (doc.to_string(), now_rfc3339());
        self.run("save rollout", |db| {
            db.execute(
                "UPDATE rollouts SET status = ?2, doc = ?3, updated_at = ?4 WHERE id = ?1",
                &[id.into(), status.into(), doc.as_str().into(), (&now).into()],
            )
            .map(drop)
        })
    }

    fn rollout_control(&self, id: i64, control: Option<&str>) -> Result<(), StateError> {
        let now = now_rfc3339();
        self.run("request rollout change", |db| {
            db.execute(
                "UPDATE rollouts SET control = ?2, updated_at = ?3 WHERE id = ?1",
                &[id.into(), control.into(), (&now).into()],
            )
            .map(drop)
        })
    }

    fn rollout(&self, id: i64) -> Result<Option<RolloutRecord>, StateError> {
        self.run("read rollout", |db| {
            Ok(rollout_rows(db, "WHERE id = ?1", &[id.into()])?
                .into_iter()
                .next())
        })
    }

    fn rollouts(
        &self,
        policy_id: &str,
        env: Option<&str>,
    ) -> Result<Vec<RolloutRecord>, StateError> {
        self.run("read rollouts", |db| {
            rollout_rows(
                db,
                "WHERE policy_id = ?1 AND (CAST(?2 AS TEXT) IS NULL OR env = ?2) ORDER BY id DESC",
                &[policy_id.into(), env.into()],
            )
        })
    }

    fn bundle(&self, digest: &str) -> Result<Option<Vec<u8>>, StateError> {
        self.run("read bundle", |db| {
            query_opt(
                db,
                "SELECT bytes FROM bundles WHERE digest = ?1",
                &[digest.into()],
            )?
            .map(|r| r.bytes(0))
            .transpose()
        })
    }

    fn record(&self, d: &DeploymentRecord) -> Result<i64, StateError> {
        self.transaction("record deployment", |db| insert_deployment(db, d, None))
    }

    fn history(&self, policy_id: &str) -> Result<Vec<DeploymentRecord>, StateError> {
        self.run("read history", |db| {
            deployments(
                db,
                "WHERE policy_id = ?1 ORDER BY id DESC",
                &[policy_id.into()],
            )
        })
    }

    fn active_entries(&self, env: Option<&str>) -> Result<Vec<ActiveEntry>, StateError> {
        self.run("read status", |db| {
            let mut entries = active_rows(db, env)?;
            // Grouped by key, not merged by order: the database's collation
            // need not sort as Rust compares.
            let mut services: HashMap<(String, String), Vec<ServiceHolding>> = HashMap::new();
            for (policy_id, env, holding) in service_rows(db, env)? {
                services.entry((policy_id, env)).or_default().push(holding);
            }
            for e in &mut entries {
                if let Some(held) = services.remove(&(e.policy_id.clone(), e.env.clone())) {
                    e.services = held;
                }
            }
            Ok(entries)
        })
    }

    fn begin(&self, d: &DeploymentRecord) -> Result<i64, StateError> {
        self.record(&DeploymentRecord {
            outcome: RecordOutcome::InProgress,
            ..d.clone()
        })
    }

    fn finish(&self, id: i64, d: &DeploymentRecord) -> Result<(), StateError> {
        self.transaction("finish deployment", |db| {
            db.execute(
                "UPDATE deployments SET version = ?2, digest = ?3, outcome = ?4,
                   finished_at = ?5 WHERE id = ?1",
                &[
                    id.into(),
                    (&d.version).into(),
                    (&d.digest).into(),
                    d.outcome.into(),
                    (&d.finished_at).into(),
                ],
            )?;
            db.execute("DELETE FROM targets WHERE deployment_id = ?1", &[id.into()])?;
            insert_targets(db, id, &d.targets)
        })
    }

    fn settle_interrupted(&self, policy_id: &str, env: &str) -> Result<Vec<i64>, StateError> {
        let now = now_rfc3339();
        self.transaction("settle interrupted deployments", |db| {
            let mut ids = db
                .query(
                    "UPDATE deployments SET outcome = ?4, finished_at = ?5
                     WHERE policy_id = ?1 AND env = ?2 AND outcome = ?3 RETURNING id",
                    &[
                        policy_id.into(),
                        env.into(),
                        RecordOutcome::InProgress.into(),
                        RecordOutcome::Interrupted.into(),
                        (&now).into(),
                    ],
                )?
                .iter()
                .map(|r| r.int(0))
                .collect::<Result<Vec<_>, _>>()?;
            ids.sort_unstable();
            Ok(ids)
        })
    }

    fn in_progress(&self, env: Option<&str>) -> Result<Vec<DeploymentRecord>, StateError> {
        self.run("read in-progress deployments", |db| {
            deployments(
                db,
                "WHERE outcome = ?1 AND (CAST(?2 AS TEXT) IS NULL OR env = ?2) ORDER BY id DESC",
                &[RecordOutcome::InProgress.into(), env.into()],
            )
        })
    }

    fn is_locked(&self, policy_id: &str, env: &str) -> Result<bool, StateError> {
        Backend::is_locked(self, policy_id, env)
    }

    fn lock(&self, policy_id: &str, env: &str) -> Result<DeployLock, StateError> {
        Backend::lock(self, policy_id, env)
    }

    fn leases(&self) -> Result<Vec<Lease>, StateError> {
        Backend::leases(self)
    }

    fn unlock(&self, policy_id: &str, env: &str) -> Result<Option<Lease>, StateError> {
        Backend::unlock(self, policy_id, env)
    }

    fn audit_chain(&self) -> Option<Arc<dyn crate::audit::ChainStore>> {
        Backend::audit_chain(self)
    }

    fn dump(&self) -> Result<Dump, StateError> {
        self.run("read state", |db| {
            Ok(Dump {
                deployments: deployments(db, "ORDER BY id ASC", &[])?,
                active: active_rows(db, None)?,
                services: service_rows(db, None)?,
                rollouts: rollout_rows(db, "ORDER BY id ASC", &[])?,
            })
        })
    }

    fn import(&self, dump: &Dump) -> Result<(), StateError> {
        let after_explicit_ids = self.dialect().after_explicit_ids;
        let imported = self.transaction("import state", |db| {
            if query_one(db, "SELECT count(*) FROM deployments", &[])?.int(0)? > 0 {
                // Reported below; nothing is written.
                return Ok(false);
            }
            for d in &dump.deployments {
                // Keeps the ids people have seen in `pde history`.
                insert_deployment(db, d, d.id)?;
            }
            for e in &dump.active {
                upsert_active(
                    db,
                    &e.policy_id,
                    &e.env,
                    &e.version,
                    &e.digest,
                    &e.deployed_at,
                )?;
            }
            for (policy_id, env, holding) in &dump.services {
                upsert_service(db, policy_id, env, holding)?;
            }
            for r in &dump.rollouts {
                insert_rollout(db, r)?;
            }
            db.batch(after_explicit_ids)?;
            Ok(true)
        })?;
        if imported {
            Ok(())
        } else {
            Err(StateError::Config {
                location: Backend::location(self),
                message: "the database already holds deployments; migrate into an empty one".into(),
            })
        }
    }
}
