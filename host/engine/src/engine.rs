//! The [`Engine`]: one opened policy workspace and the parts the steps use.
//!
//! Opening is cheap and does no network or plugin work: plugins are compiled
//! (or loaded from the on-disk cache) the first time a step needs them, so
//! `pde status` never pays for wasmtime.
//!
//! The engine is async: its network steps are `async fn`s that run on the
//! caller's runtime, so it can be used from async code (a service, a
//! notebook kernel). [`crate::blocking::Engine`] wraps it with a runtime of
//! its own for callers that are not async, as the CLI is.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::audit::AuditLog;
use crate::audit::outbox::{Outbox, SinkConfig};
use crate::config::{Config, ConfigError, Environment};
use crate::error::Error;
use crate::keys::{self, TrustedKeys};
use crate::plugin::PluginSet as Plugins;
use crate::policy::PolicyStore;
use crate::report::PackageReport;
use crate::state::StateStore;
use crate::steps::envcheck::HealthReport;
use crate::steps::validate::{self, ValidationReport};

/// An opened policy workspace: `pde.toml`, the policy store, state, audit log
/// and plugins. All pde operations are methods of the engine.
pub struct Engine {
    pub(crate) root: PathBuf,
    pub(crate) config: Config,
    pub(crate) policies: PolicyStore,
    pub(crate) state: StateStore,
    pub(crate) audit: AuditLog,
    pub(crate) http: reqwest::Client,
    pub(crate) outbox: Option<Outbox>,
    /// `<state>/dist`, where deploys write their bundles.
    dist: PathBuf,
    plugins: Mutex<Option<Arc<Plugins>>>,
    /// False for [`Engine::open_read_only`]: nothing under the state
    /// directory is created.
    writable: bool,
    /// The security team's floor (`$PDE_TRUST`, `/etc/pde/trust.toml`), if
    /// this machine has one.
    pub(crate) floor: Option<crate::floor::Floor>,
    /// Set once the audit head is being signed with the workspace key.
    head_keyed: std::sync::OnceLock<()>,
    /// Denied attempts fail every plugin (`--deny-attempts`).
    deny_attempts: std::sync::atomic::AtomicBool,
    /// The empty, throwaway state a read-only engine reads when the
    /// workspace has none yet; removed on drop.
    _scratch: Option<tempfile::TempDir>,
}

impl Engine {
    /// Opens the workspace whose `pde.toml` is in `dir`. With an audit sink
    /// configured, starts its forwarder, which first sends whatever earlier
    /// runs left pending.
    pub fn open(dir: &Path) -> Result<Engine, Error> {
        Self::open_with(dir, true)
    }

    /// Opens the workspace for reading only (`status`, `history`, `audit`,
    /// `plan`, `validate`, `env check`): the state directory, database and
    /// audit log are never created. A workspace with no state yet reads as
    /// one where nothing was deployed.
    pub fn open_read_only(dir: &Path) -> Result<Engine, Error> {
        Self::open_with(dir, false)
    }

    fn open_with(dir: &Path, writable: bool) -> Result<Engine, Error> {
        let root = dir.to_path_buf();
        crate::audit::set_actor_repository(&root);
        let config = Config::load(&root)?;
        let floor = crate::floor::Floor::load_for(&root)?;
        let state_dir = root.join(&config.state);
        check_state_inside(&root, &config)?;
        let policies = PolicyStore::open(&root.join(&config.policies));
        let mut scratch = None;
        let (state, audit) = if let Some(url) = &config.state.url {
            // A team's shared database: state and audit chain both live
            // there; the directory keeps only the plugin cache and `dist/`.
            if writable {
                std::fs::create_dir_all(&state_dir).map_err(|source| Error::Io {
                    path: state_dir.clone(),
                    source,
                })?;
            }
            let state = StateStore::connect(url, config.state.password_env.as_deref())?;
            let chain = state.audit_chain().ok_or_else(|| ConfigError::Invalid {
                path: root.join(crate::config::FILE_NAME),
                message: "the [state] backend keeps no audit chain".into(),
            })?;
            (state, AuditLog::with_store(chain, writable))
        } else if writable {
            std::fs::create_dir_all(&state_dir).map_err(|source| Error::Io {
                path: state_dir.clone(),
                source,
            })?;
            (StateStore::open(&state_dir)?, AuditLog::open(&state_dir)?)
        } else {
            let state = if state_dir.join("state.db").is_file() {
                StateStore::open(&state_dir)?
            } else {
                let tmp = tempfile::tempdir().map_err(|source| Error::Io {
                    path: std::env::temp_dir(),
                    source,
                })?;
                let empty = StateStore::open(tmp.path())?;
                scratch = Some(tmp);
                empty
            };
            (state, AuditLog::open_read_only(&state_dir)?)
        };
        let http = crate::http::client(config.push.timeout())?;
        // Any run forwards what earlier runs left pending, as long as there
        // is a state directory to keep the cursor in.
        let sink_url = config
            .audit
            .sink_url
            .as_ref()
            .filter(|_| state_dir.is_dir());
        let outbox = match sink_url {
            Some(url) => {
                let token = match &config.audit.sink_token_env {
                    Some(var) => Some(pde_core::secret::from_env(var).ok_or_else(|| {
                        ConfigError::Invalid {
                            path: root.join(crate::config::FILE_NAME),
                            message: format!(
                                "[audit] sink_token_env names {var}, which is not set"
                            ),
                        }
                    })?),
                    None => None,
                };
                let sink = SinkConfig {
                    url: url.clone(),
                    token,
                    retry: config.push.retry_policy(),
                    flush: Duration::from_millis(config.audit.sink_flush_ms.unwrap_or(2000)),
                    rest: Duration::from_millis(500),
                };
                Some(Outbox::start(&audit, sink)?)
            }
            None => None,
        };
        Ok(Engine {
            dist: state_dir.join("dist"),
            root,
            config,
            policies,
            state,
            audit,
            http,
            outbox,
            plugins: Mutex::new(None),
            writable,
            floor,
            head_keyed: std::sync::OnceLock::new(),
            deny_attempts: Default::default(),
            _scratch: scratch,
        })
    }

    /// The workspace root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The parsed `pde.toml`.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The state directory (`.pde/` by default).
    pub fn state_dir(&self) -> PathBuf {
        self.root.join(&self.config.state)
    }

    /// The plugin directory.
    pub fn plugins_dir(&self) -> PathBuf {
        self.root.join(&self.config.plugins)
    }

    /// Where deploys write their bundles (`<state>/dist`).
    pub fn dist_dir(&self) -> PathBuf {
        self.dist.clone()
    }

    /// The policy store.
    pub fn policies(&self) -> &PolicyStore {
        &self.policies
    }

    /// The deployment state database.
    pub fn state(&self) -> &StateStore {
        &self.state
    }

    /// The audit log.
    pub fn audit(&self) -> &AuditLog {
        &self.audit
    }

    /// The named environment of `pde.toml`.
    pub fn environment(&self, name: &str) -> Result<&Environment, Error> {
        Ok(self.config.environment(name)?)
    }

    /// The public keys whose plugin signatures this workspace trusts: the
    /// floor's unexpired keys when there is a floor, else `[trust]
    /// plugin_keys`; minus `[trust] revoked` either way.
    pub fn plugin_trust(&self) -> Result<TrustedKeys, Error> {
        crate::plugin_workspace::trust(&self.root, &self.config, self.floor.as_ref())
    }

    /// The keys whose signed approvals count: the floor's unexpired
    /// approver keys when there is a floor, else `[trust] approver_keys`
    /// (unexpired); minus `[trust] revoked` either way.
    pub fn approvers(&self) -> Result<pde_core::approval::Approvers, Error> {
        let today = crate::floor::today();
        let mut approvers = pde_core::approval::Approvers::new();
        let mut listed = Vec::new();
        for entry in &self.config.trust.approver_keys {
            let key = pde_core::keys::load_public_key(&self.root.join(&entry.file))?;
            listed.push(keys::key_id(&key));
            if entry.valid_on(today) {
                approvers.add(key, &entry.roles);
            }
        }
        if let Some(floor) = &self.floor {
            approvers = floor.approvers(today)?;
            let counted: Vec<String> = floor
                .approver_keys
                .iter()
                .filter_map(|e| floor.key(e).ok())
                .map(|k| keys::key_id(&k))
                .collect();
            floor.warn_ignored("approver", &listed, &counted);
        }
        approvers.revoke(&self.config.trust.revoked);
        Ok(approvers)
    }

    /// The bundle signing key named by `[signing]`, or none when the
    /// workspace has no `[signing]` table.
    ///
    /// Unsigned bundles are allowed so that a new workspace works before keys
    /// are handed out, but they are refused where it matters: `pde agent`
    /// rejects them unless started with `--insecure-accept-unsigned`. A key
    /// that is configured but cannot be read is always an error.
    pub fn signing_key(&self) -> Result<Option<ed25519_dalek::SigningKey>, Error> {
        let signing = &self.config.signing;
        if let Some(file) = &signing.key_file {
            return Ok(Some(keys::load_signing_key(&self.root.join(file))?));
        }
        if let Some(var) = &signing.key_env {
            return Ok(Some(keys::load_signing_key_env(var)?));
        }
        tracing::warn!(
            "no [signing] key in pde.toml: the bundle is unsigned and agents will refuse it; \
             create a key with `pde keygen --out keys` and add `[signing] key_file = \"keys/release.ed25519\"`"
        );
        Ok(None)
    }

    /// The release key that signs rollback requests (`pde rollback` and a
    /// push's compensation): the `[signing]` key, read without the
    /// unsigned-bundle warning (the bundle step gives that one). `None`
    /// without `[signing]`: rollbacks then go unsigned, and only agents
    /// without a trusted key (which require a bearer token) accept them.
    pub fn rollback_signer(&self) -> Result<Option<ed25519_dalek::SigningKey>, Error> {
        let signing = &self.config.signing;
        if signing.key_file.is_none() && signing.key_env.is_none() {
            return Ok(None);
        }
        self.signing_key()
    }

    /// Makes an attempt at a denied capability (a file, a socket, the
    /// environment) fail every plugin of this engine, as `deny_attempts =
    /// true` in each manifest would (`pde validate --deny-attempts`). Set it
    /// before the plugins are first used.
    pub fn deny_attempts(&self, on: bool) {
        self.deny_attempts
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// The workspace plugins, compiled or loaded from the cache on first use.
    pub fn plugins(&self) -> Result<Arc<Plugins>, Error> {
        let mut slot = self.plugins.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(loaded) = slot.as_ref() {
            return Ok(loaded.clone());
        }
        // The workspace's cache where this engine may create the state
        // directory (a read-only one creates nothing), and the per-user one.
        let mut host = crate::plugin_workspace::host(&self.root, &self.config, self.writable)?;
        host.deny_attempts(
            self.deny_attempts
                .load(std::sync::atomic::Ordering::Relaxed),
        );
        let dir = self.root.join(&self.config.plugins);
        let plugins = if dir.exists() {
            host.load_dir(&dir, &self.plugin_trust()?)?
        } else {
            tracing::info!(dir = %dir.display(), "no plugin directory; running built-in checks only");
            Vec::new()
        };
        let loaded = Arc::new(Plugins { host, plugins });
        *slot = Some(loaded.clone());
        Ok(loaded)
    }

    /// Before the first append: the head file is signed with the workspace
    /// signing key from now on. A head the key does not verify (unsigned by
    /// an older pde, or signed by a previous key) is only adopted when the
    /// whole log matches every release tag; otherwise signing it would
    /// launder a rewrite.
    pub(crate) fn key_audit_head(&self) -> Result<(), Error> {
        if self.head_keyed.get().is_some() {
            return Ok(());
        }
        if let Some(key) = self.signing_key()? {
            let vk = key.verifying_key();
            let adopt = match self.audit.check_head_key(&vk) {
                Ok(()) => false,
                // Our own key id with a bad signature: forged, never adopted.
                Err(e) if self.audit.head_keyid()? == Some(keys::key_id(&vk)) => {
                    return Err(e.into());
                }
                Err(_) => {
                    self.audit.verify_anchored(&self.audit_anchors()?, None)?;
                    tracing::warn!(
                        "the audit head was not signed by the workspace key (older pde, or a new key); \
                         the log matches every release tag, so it is signed with this key from now on"
                    );
                    true
                }
            };
            self.audit.set_head_key(key, adopt);
        }
        let _ = self.head_keyed.set(());
        Ok(())
    }

    /// Every release tag of the policy repository, as an audit anchor. None
    /// when the workspace is not in a Git work tree.
    pub fn audit_anchors(&self) -> Result<Vec<crate::audit::Anchor>, Error> {
        let repo = match crate::vcs::Repo::discover(&self.root) {
            Ok(r) => r,
            Err(crate::vcs::VcsError::NotARepo { .. }) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        Ok(repo
            .release_tags()?
            .into_iter()
            .map(|(name, message)| crate::audit::Anchor {
                source: format!("tag {name}"),
                head: crate::steps::tag::audit_head_in_message(&message),
            })
            .collect())
    }

    /// `pde audit verify`: the chain, the head, every release tag's recorded
    /// audit head, and the head's signature by the workspace key.
    pub fn verify_audit(&self) -> Result<crate::audit::VerifyReport, Error> {
        self.verify_audit_reading().0
    }

    /// [`Engine::verify_audit`], handing back the records it read too: a
    /// caller that also shows them (the console's report) then reads and
    /// parses a long log once for both.
    pub fn verify_audit_reading(
        &self,
    ) -> (
        Result<crate::audit::VerifyReport, Error>,
        Result<Vec<crate::audit::AuditRecord>, crate::audit::AuditError>,
    ) {
        let records = self.audit.records();
        let verified = match &records {
            Ok(all) => self.verify_audit_of(all),
            // The chain check names the first bad line; it cannot pass a
            // log whose lines are not records.
            Err(_) => self
                .audit_verifying_key()
                .and_then(|key| {
                    Ok(self
                        .audit
                        .verify_anchored(&self.audit_anchors()?, key.as_ref())?)
                })
                .and_then(|_| {
                    Err(crate::audit::AuditError::Anchor {
                        reason: "the log's records cannot be read".into(),
                    }
                    .into())
                }),
        };
        (verified, records)
    }

    fn verify_audit_of(
        &self,
        records: &[crate::audit::AuditRecord],
    ) -> Result<crate::audit::VerifyReport, Error> {
        let key = self.audit_verifying_key()?;
        let report = self
            .audit
            .verify_anchored(&self.audit_anchors()?, key.as_ref())?;
        // The state is a second witness: what it says happened must be in
        // the chain, or a cut tail hides behind a restored head.
        let mut policies: std::collections::BTreeSet<String> =
            records.iter().map(|r| r.policy_id.clone()).collect();
        policies.extend(self.state.status(None)?.into_iter().map(|e| e.policy_id));
        policies.extend(self.policies.ids().unwrap_or_default());
        let mut missing = Vec::new();
        for policy_id in policies.iter().filter(|p| !p.is_empty()) {
            let history = self.state.history(policy_id)?;
            missing.extend(crate::bookkeeping::unrecorded(&history, records));
        }
        if let Some(first) = missing.first() {
            return Err(crate::audit::AuditError::Anchor {
                reason: format!(
                    "{first}{}: records were cut from the log, or the state belongs to another log",
                    match missing.len() {
                        1 => String::new(),
                        n => format!(" (and {} more)", n - 1),
                    }
                ),
            }
            .into());
        }
        Ok(report)
    }

    /// The public half of the signing key: from `<key_file>.pub` when there
    /// is one (an auditor needs no secret), else derived from the secret.
    fn audit_verifying_key(&self) -> Result<Option<ed25519_dalek::VerifyingKey>, Error> {
        let signing = &self.config.signing;
        if let Some(file) = &signing.key_file {
            let mut public = self.root.join(file).into_os_string();
            public.push(".pub");
            let public = PathBuf::from(public);
            if public.is_file() {
                return Ok(Some(keys::load_public_key(&public)?));
            }
        }
        if signing.key_file.is_none() && signing.key_env.is_none() {
            return Ok(None);
        }
        Ok(self.signing_key()?.map(|k| k.verifying_key()))
    }

    /// What step 1 reads.
    pub(crate) fn validate_inputs<'a>(
        &'a self,
        plugins: &'a Plugins,
        approvers: &'a pde_core::approval::Approvers,
    ) -> validate::Inputs<'a> {
        validate::Inputs {
            policies: &self.policies,
            state: &self.state,
            plugins,
            approvers,
            dist: &self.dist,
        }
    }

    /// `pde validate ID [--env ENV]`: step 1 alone. With an environment, its
    /// gates apply as in a deploy: versions, approvals, signed plugins.
    pub fn validate_policy(
        &self,
        policy_id: &str,
        env: Option<&str>,
    ) -> Result<ValidationReport, Error> {
        let _span = tracing::info_span!("validate", policy_id, env).entered();
        let env = match env {
            Some(name) => Some((name, self.environment(name)?)),
            None => None,
        };
        let plugins = self.plugin_gates(env)?;
        Ok(self.validate_stage(&plugins, policy_id, env)?.1)
    }

    /// `pde approve ID --key FILE`: signs the policy's content digest and
    /// writes the approval beside the policy, to be committed with it.
    ///
    /// The policy must load (schema-valid): an approval of a document that
    /// cannot be deployed would be a signature over nothing anyone can use.
    pub fn approve(
        &self,
        policy_id: &str,
        key_file: &Path,
        signoff: crate::policy::approvals::Signoff,
    ) -> Result<crate::policy::approvals::Approved, Error> {
        let policy = validate::load(&self.policies, policy_id)?;
        let key = pde_core::keys::load_signing_key(key_file)?;
        let approvers = self.approvers()?;
        let approved = crate::policy::approvals::approve(&policy, &key, signoff, &approvers)?;
        tracing::info!(policy_id, keyid = %approved.keyid, digest = %approved.policy_digest,
            "approval written");
        Ok(approved)
    }

    /// `pde package ID [-o DIR]`: steps 1 and 2, writing the bundle.
    pub fn package(&self, policy_id: &str, out: Option<&Path>) -> Result<PackageReport, Error> {
        let _span = tracing::info_span!("package", policy_id).entered();
        let plugins = self.plugin_gates(None)?;
        let (policy, validation) = self.validate_stage(&plugins, policy_id, None)?;
        let out = out.map_or_else(|| self.dist_dir(), Path::to_path_buf);
        let packaged = self.package_stage(&policy, &validation, None, Some(&out))?;
        Ok(PackageReport {
            digest: packaged.bundle.digest.clone(),
            path: packaged.path.unwrap_or(out),
            validation,
            bundle: packaged.bundle,
        })
    }

    /// `pde env check ENV`: step 3 alone, every service's health and every
    /// readiness check. An active freeze shows as failing: nothing here
    /// overrides it.
    pub async fn env_check(&self, env_name: &str) -> Result<HealthReport, Error> {
        let env = self.environment(env_name)?;
        Ok(self.envcheck_stage(env, None).await?.1)
    }
}

/// The state directory must be inside the workspace unless pde.toml says
/// `allow_state_outside_workspace = true`: `state = "/"` would otherwise
/// scatter a database and an audit log over whatever directory it names.
/// `pde.toml` checks the setting as written; this also catches a symbolic
/// link that leads out.
fn check_state_inside(root: &Path, config: &Config) -> Result<(), ConfigError> {
    if config.allow_state_outside_workspace {
        return Ok(());
    }
    let state_dir = root.join(&config.state);
    let (Ok(root_c), Ok(state_c)) = (root.canonicalize(), state_dir.canonicalize()) else {
        return Ok(());
    };
    if state_c.starts_with(&root_c) && state_c != root_c {
        return Ok(());
    }
    Err(ConfigError::Invalid {
        path: root.join(crate::config::FILE_NAME),
        message: crate::config::state_outside_message(&config.state),
    })
}

pub(crate) use crate::runtime::off_runtime;
