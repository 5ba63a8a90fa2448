//! Deployment state: history, the active version per environment, and locks.
//!
//! One interface, [`StateBackend`], which the engine uses, and two backends:
//! SQLite for one checkout (`<state>/state.db`, DESIGN §5) and PostgreSQL
//! for a team (`[state] url = "postgres://…"`, issue 12).
//!
//! - [`types`]: what a deployment, an active version, a lease are;
//! - [`schema`]: one list of migrations with one numbering, and how each
//!   backend's stored schema version maps onto it;
//! - [`query`]: every statement and the row mapping, written once over the
//!   small [`query::Sql`] executor, and [`StateBackend`] for every [`Backend`];
//! - [`sqlite`], [`postgres`]: a backend each; they own only the connection,
//!   its transactions, how values cross the driver, and the locks;
//! - [`lock`]: the deploy lock a backend hands out;
//! - here: the two traits, the view logic every backend shares (`status`,
//!   `history_checked`), [`StateStore`] (where the backend is chosen) and
//!   [`stored_bundle`].
//!
//! A third backend is one file implementing [`Backend`] (with a [`Dialect`]
//! for the few column types SQL spells differently), declared here, and
//! one line in [`SHARED_BACKENDS`] where the backend is chosen. `tests/all/team.rs` runs one conformance test
//! against every backend.

mod error;
pub mod lock;
pub mod postgres;
pub mod query;
pub mod schema;
pub mod sqlite;
mod types;

use std::fs;
use std::path::Path;

pub use error::{BackendError, StateError};
pub use lock::DeployLock;
pub use schema::Dialect;
pub use sqlite::SqliteState;
pub use types::{
    Active, ActiveEntry, DeploymentRecord, Dump, Lease, RecordOutcome, RolloutRecord,
    ServiceHolding, TargetRecord,
};

use query::Sql;

/// The operations pde needs from a deployment state store: the one
/// interface the engine uses. Implemented for every [`Backend`] by the
/// shared query layer ([`query`]), so [`SqliteState`] (one checkout) and
/// [`postgres::PgState`] (a team) run the same statements.
///
/// Synchronous on purpose: every call is one short query, callers are both
/// sync (validation runs on plugin threads) and async (the pipeline), and a
/// sync interface keeps the two backends and their callers simple. The
/// PostgreSQL backend moves each call off the async runtime itself.
pub trait StateBackend: Send + Sync + std::fmt::Debug {
    /// Where the state lives, for messages (never holds a password).
    fn location(&self) -> String;
    /// The database role this state writes as (PostgreSQL's
    /// `current_user`), recorded beside the actor; `None` for a file.
    fn db_role(&self) -> Result<Option<String>, StateError>;
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
    /// Stores a new rollout; returns its id.
    fn rollout_begin(&self, r: &RolloutRecord) -> Result<i64, StateError>;
    /// Saves rollout `id`'s status and report (its `control` is kept).
    fn rollout_save(
        &self,
        id: i64,
        status: &str,
        doc: &serde_json::Value,
    ) -> Result<(), StateError>;
    /// Sets (or clears, with `None`) a person's request to rollout `id`.
    fn rollout_control(&self, id: i64, control: Option<&str>) -> Result<(), StateError>;
    /// Rollout `id`.
    fn rollout(&self, id: i64) -> Result<Option<RolloutRecord>, StateError>;
    /// The rollouts of `policy_id` (in `env`, when given), newest first.
    fn rollouts(
        &self,
        policy_id: &str,
        env: Option<&str>,
    ) -> Result<Vec<RolloutRecord>, StateError>;
    /// Everything this state holds, as stored (`pde state migrate`).
    fn dump(&self) -> Result<Dump, StateError>;
    /// Copies `dump` into this state, which must hold no deployments yet
    /// (else [`StateError::Config`], nothing written), in one transaction;
    /// deployment ids are kept.
    fn import(&self, dump: &Dump) -> Result<(), StateError>;
}

/// What a state backend provides: the connection, its transactions, its
/// dialect and its locks. Every statement comes from the shared query
/// layer, which implements [`StateBackend`] for each `Backend`.
pub trait Backend: Send + Sync + std::fmt::Debug {
    /// Where the state lives, for messages (never holds a password).
    fn location(&self) -> String;
    /// See [`StateBackend::db_role`]; a file has none.
    fn db_role(&self) -> Result<Option<String>, StateError> {
        Ok(None)
    }
    /// How this backend spells the schema and keeps its version.
    fn dialect(&self) -> &'static Dialect;
    /// Runs `f` on the connection, each statement on its own (reads, and
    /// writes of one statement); errors name `action`.
    fn run<T: Send>(
        &self,
        action: &'static str,
        f: impl FnOnce(&mut dyn Sql) -> Result<T, BackendError> + Send,
    ) -> Result<T, StateError>;
    /// Runs `f` in one write transaction, committed when it returns `Ok`
    /// and rolled back otherwise.
    fn transaction<T: Send>(
        &self,
        action: &'static str,
        f: impl FnOnce(&mut dyn Sql) -> Result<T, BackendError> + Send,
    ) -> Result<T, StateError>;
    /// See [`StateBackend::lock`].
    fn lock(&self, policy_id: &str, env: &str) -> Result<DeployLock, StateError>;
    /// See [`StateBackend::is_locked`].
    fn is_locked(&self, policy_id: &str, env: &str) -> Result<bool, StateError>;
    /// See [`StateBackend::leases`].
    fn leases(&self) -> Result<Vec<Lease>, StateError>;
    /// See [`StateBackend::unlock`].
    fn unlock(&self, policy_id: &str, env: &str) -> Result<Option<Lease>, StateError>;
    /// See [`StateBackend::audit_chain`].
    fn audit_chain(&self) -> Option<std::sync::Arc<dyn crate::audit::ChainStore>> {
        None
    }
}

/// Opens a shared backend from its URL and the name of the variable that
/// holds its password.
pub type OpenShared = fn(&str, Option<&str>) -> Result<Box<dyn StateBackend>, StateError>;

/// The backends a `[state] url` can name, by URL scheme: where the backend
/// is chosen. A new backend is its file (declared above) and one line here.
pub const SHARED_BACKENDS: &[(&[&str], OpenShared)] =
    &[(&["postgres", "postgresql"], postgres::open)];

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

    /// The team's shared state at `url` (`[state] url`), with the password
    /// from the environment variable `password_env`: the backend whose
    /// scheme the URL names ([`SHARED_BACKENDS`]).
    pub fn connect(url: &str, password_env: Option<&str>) -> Result<StateStore, StateError> {
        let scheme = url.split_once("://").map_or("", |(scheme, _)| scheme);
        let Some((_, open)) = SHARED_BACKENDS
            .iter()
            .find(|(schemes, _)| schemes.contains(&scheme))
        else {
            return Err(StateError::Config {
                location: url.to_string(),
                message: format!("no state backend for URLs of scheme {scheme:?}"),
            });
        };
        Ok(StateStore {
            backend: open(url, password_env)?,
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
