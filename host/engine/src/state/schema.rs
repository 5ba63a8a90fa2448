//! The schema: one list of migrations, one numbering, for every backend.
//!
//! Step `n` of [`MIGRATIONS`] is the same change on every backend. The DDL
//! is written once; the few column types SQL does not spell alike are
//! tokens that each backend's [`Dialect`] fills in (`{auto_id}`, `{bytes}`).
//! A backend may add tables of its own at a step (PostgreSQL: the leases
//! of its locks and the team's audit chain), which the other backends
//! never see.
//!
//! **Stored versions.** Each backend keeps how far it has migrated where it
//! always has (SQLite: `PRAGMA user_version`; PostgreSQL: the `pde_schema`
//! table), in the numbers that pde versions already in the field wrote and
//! read: a teammate still on an older pde keeps working against a database
//! this one opened, since renumbering changed no table. SQLite's stored
//! number is the step number. PostgreSQL's first migration created what
//! steps 1 and 2 create, so its stored number is one less
//! ([`VersionStore::offset`] = 1): stored 1 = step 2, stored 3 = step 4. A
//! stored number past what this build knows is refused ([`StateError::TooNew`]),
//! in the stored numbers, as before.
//!
//! All steps up to the newest run in one transaction, so a half-migrated
//! database is never committed.

use super::query::{Sql, query_one};
use super::{BackendError, StateError};

/// The schema changes, oldest first. Never edit a step that has shipped:
/// add one.
pub const MIGRATIONS: &[&str] = &[
    // 1: history, per-target results, the active version.
    r#"
CREATE TABLE deployments (
    id          {auto_id},
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
    id              {auto_id},
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
"#,
    // 2: what each service runs, per policy and environment (push protocol
    // v2): a service holds many policies, and each is activated on its own.
    // `digest` NULL means unknown: a compensation failed there.
    r#"
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
    // 3: deploys are recorded `in-progress` when their push starts (issue
    // 12), so a killed one is seen; older pde could not read that outcome.
    r#"
CREATE INDEX deployments_in_progress ON deployments (outcome, policy_id, env);
"#,
    // 4: the bundles deploys pushed, by digest (issue 13): validators built
    // against pde:plugin@0.2.0 are shown the policy active in the target
    // environment, read from its bundle here, on every machine of a team.
    r#"
CREATE TABLE bundles (
    digest    TEXT PRIMARY KEY,
    bytes     {bytes} NOT NULL,
    stored_at TEXT NOT NULL
);
"#,
    // 5: the fencing number of the last acquisition of each deploy lock
    // (issue 21 item 3, push protocol v4): the next one is the clock in
    // microseconds, or one more than this if the clock has not passed it
    // (`pde_core::fence`). Not copied by `state migrate`: a new database's
    // fences start at the clock, which is where the old one's were.
    r#"
CREATE TABLE fences (
    policy_id TEXT NOT NULL,
    env       TEXT NOT NULL,
    fence     BIGINT NOT NULL,
    PRIMARY KEY (policy_id, env)
);
"#,
    // 6: progressive rollouts (issue 22): where each rollout is, wave by
    // wave, so another engineer or a resumed process sees the same one.
    // `doc` is its report as JSON; `control` a person's request to the
    // process running it (`promote`, `abort`).
    r#"
CREATE TABLE rollouts (
    id          {auto_id},
    policy_id   TEXT NOT NULL,
    env         TEXT NOT NULL,
    version     TEXT NOT NULL,
    digest      TEXT NOT NULL,
    status      TEXT NOT NULL,
    control     TEXT,
    doc         TEXT NOT NULL,
    started_at  TEXT NOT NULL,
    updated_at  TEXT NOT NULL,
    actor       TEXT NOT NULL
);
CREATE INDEX rollouts_by_policy ON rollouts (policy_id, env, id);
"#,
];

/// What differs between backends in the schema and its bookkeeping.
#[derive(Debug)]
pub struct Dialect {
    /// The backend's name, for errors (`sqlite`, `postgres`).
    pub name: &'static str,
    /// Column definition of an auto-numbered 64-bit primary key.
    pub auto_id: &'static str,
    /// Column type of a byte string.
    pub bytes: &'static str,
    /// Where the migrated version is stored.
    pub version: VersionStore,
    /// The backend's own tables, created with the given step.
    pub own_tables: &'static [(usize, &'static str)],
    /// Run after rows were inserted with explicit ids (an imported
    /// history), so that the next id is past them; empty where the database
    /// keeps track itself (SQLite's `AUTOINCREMENT`).
    pub after_explicit_ids: &'static str,
}

/// Where and how a backend stores how far its database has migrated.
#[derive(Debug)]
pub struct VersionStore {
    /// Run first in the migration's transaction: serialise migrators, make
    /// sure the version has a home.
    pub prepare: &'static str,
    /// A query giving the stored version (0 for a new database).
    pub read: &'static str,
    /// The statement that stores a version.
    pub write: fn(i64) -> String,
    /// Stored version `v > 0` means steps `1..=v + offset` have run.
    pub offset: i64,
}

impl VersionStore {
    /// Steps applied according to a stored version.
    fn steps(&self, stored: i64) -> i64 {
        if stored == 0 { 0 } else { stored + self.offset }
    }

    /// The stored version after `steps` steps.
    pub fn stored(&self, steps: usize) -> i64 {
        (steps as i64 - self.offset).max(0)
    }
}

impl Dialect {
    /// The stored version of a database this build has fully migrated.
    pub fn newest_stored(&self) -> i64 {
        self.version.stored(MIGRATIONS.len())
    }

    /// `ddl` with this dialect's column types.
    pub(crate) fn render(&self, ddl: &str) -> String {
        ddl.replace("{auto_id}", self.auto_id)
            .replace("{bytes}", self.bytes)
    }
}

/// Applies the pending steps; run by each backend when it opens, inside
/// one write transaction. `Ok(Err(..))`: the database is newer than this
/// build (nothing was changed).
pub(crate) fn migrate(
    db: &mut dyn Sql,
    d: &Dialect,
    location: &str,
) -> Result<Result<(), StateError>, BackendError> {
    db.batch(d.version.prepare)?;
    let found = query_one(db, d.version.read, &[])?.int(0)?;
    let supported = d.newest_stored();
    if found > supported {
        return Ok(Err(StateError::TooNew {
            path: location.into(),
            found,
            supported,
        }));
    }
    let done = usize::try_from(d.version.steps(found)).unwrap_or(0);
    for (i, ddl) in MIGRATIONS.iter().enumerate().skip(done) {
        let step = i + 1;
        db.batch(&d.render(ddl))?;
        for (_, own) in d.own_tables.iter().filter(|(at, _)| *at == step) {
            db.batch(own)?;
        }
        db.batch(&(d.version.write)(d.version.stored(step)))?;
        tracing::info!(location, backend = d.name, step, "state database migrated");
    }
    Ok(Ok(()))
}
