//! Team operations on shared state (issue 12): clearing a stale deploy
//! lease, and moving one checkout's SQLite state and file audit chain into
//! the team's PostgreSQL database.

use serde::Serialize;
use serde_json::json;

use crate::audit::{AuditLog, Event};
use crate::engine::Engine;
use crate::error::Error;
use crate::state::{Lease, SqliteState, StateBackend as _, StateError, StateStore, stored_bundle};

/// What `pde state migrate --from sqlite` moved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MigrateReport {
    /// The database it went to (no password).
    pub to: String,
    /// Deployments copied, with their targets.
    pub deployments: usize,
    /// Active (policy, environment) entries copied.
    pub active: usize,
    /// Bundles copied (from the SQLite state, or this checkout's `dist/`),
    /// so every machine can show the active versions to validators.
    pub bundles: usize,
    /// Audit records copied; the chain verified afterwards.
    pub audit_records: u64,
    /// The last audit record's hash, the same before and after.
    pub audit_head: String,
}

impl Engine {
    /// `pde unlock ID --env ENV`: clears the lease of a deploy that died
    /// holding it, with an `unlocked` audit record. A live holder is refused
    /// ([`StateError::Locked`], exit 7). `None`: there was no lease.
    pub fn unlock(&self, policy_id: &str, env: &str) -> Result<Option<Lease>, Error> {
        self.environment(env)?;
        let cleared = self.state.unlock(policy_id, env)?;
        if let Some(lease) = &cleared {
            self.key_audit_head()?;
            self.audit.append(
                Event::Unlocked,
                policy_id,
                env,
                json!({"holder": lease.holder, "host": lease.host, "pid": lease.pid,
                       "since": lease.since}),
            )?;
            tracing::info!(policy_id, env, lease = %lease.describe(), "stale lease cleared");
        }
        Ok(cleared)
    }

    /// `pde state migrate --from sqlite`: copies `<state>/state.db` and the
    /// file audit chain of this checkout into the PostgreSQL database named
    /// by `[state] url`, which must hold no deployments and no audit
    /// records yet. The chain is verified before and after, and keeps every
    /// seq and hash.
    pub fn migrate_from_sqlite(&self) -> Result<MigrateReport, Error> {
        let Some(url) = &self.config.state.url else {
            return Err(StateError::Config {
                location: "pde.toml".into(),
                message: "[state] url is not set: name the PostgreSQL database to migrate into"
                    .into(),
            }
            .into());
        };
        let state_dir = self.state_dir();
        if !state_dir.join("state.db").is_file() {
            return Err(StateError::Config {
                location: url.clone(),
                message: format!("no SQLite state to migrate at {}", state_dir.display()),
            }
            .into());
        }
        let sqlite = SqliteState::open(&state_dir)?;
        // The stored rows, table by table: not `status`, which shows a first
        // deploy killed mid-push as an entry with an empty version and
        // digest (it has no active version, only an in-progress record).
        let dump = sqlite.dump()?;
        let file_log = AuditLog::open_read_only(&state_dir)?;
        let before = file_log.verify()?;
        let (lines, head) = file_log.export_chain()?;
        let shared = StateStore::connect(url, self.config.state.password_env.as_deref())?;
        shared.import(&dump)?;
        // Every bundle this checkout still has of what it deployed: the
        // active ones are what validators compare a change against, the
        // older ones what a rollback makes active.
        let mut bundles = 0;
        let mut seen = std::collections::BTreeSet::new();
        let deployed = dump
            .deployments
            .iter()
            .map(|d| (&d.policy_id, &d.version, &d.digest))
            .chain(
                dump.active
                    .iter()
                    .map(|e| (&e.policy_id, &e.version, &e.digest)),
            );
        for (policy_id, version, digest) in deployed {
            if digest.is_empty() || !seen.insert(digest.as_str()) {
                continue;
            }
            if let Ok(bundle) =
                stored_bundle(&sqlite, &self.dist_dir(), policy_id, version, digest)?
            {
                shared.put_bundle(digest, &bundle.to_canonical_bytes())?;
                bundles += 1;
            }
        }
        self.audit.import_chain(lines, head)?;
        let after = self.audit.verify()?;
        if (after.records, &after.last_hash) != (before.records, &before.last_hash) {
            return Err(crate::audit::AuditError::Anchor {
                reason: format!(
                    "the migrated chain ends at seq {} ({}), the file chain at seq {} ({})",
                    after.records, after.last_hash, before.records, before.last_hash
                ),
            }
            .into());
        }
        Ok(MigrateReport {
            to: url.clone(),
            deployments: dump.deployments.len(),
            active: dump.active.len(),
            bundles,
            audit_records: after.records,
            audit_head: after.last_hash,
        })
    }
}

impl Engine {
    /// Under the deploy lock of `policy_id` in `env`: deploys and rollbacks
    /// of that pair still recorded in progress died mid-way (their lock was
    /// free), so they are marked interrupted. The deploy or rollback about
    /// to run then pushes to and verifies every target, which is the
    /// stated outcome that settles them.
    pub(crate) fn settle_interrupted(&self, policy_id: &str, env: &str) -> Result<(), Error> {
        for id in self.state.settle_interrupted(policy_id, env)? {
            tracing::warn!(
                policy_id,
                env,
                deployment = id,
                "an earlier deploy of this policy and environment was interrupted; this one \
                 settles it"
            );
        }
        Ok(())
    }
}
