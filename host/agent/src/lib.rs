//! pde-agent: the reference receiving service (DESIGN §6, §8 "Push protocol"),
//! run as `pde agent` or as its own small binary `pde-agent`, which links
//! neither wasmtime nor a database.
//!
//! A service runs this beside itself; `pde deploy` pushes bundles to it. It
//! exists so that the push side always has a real, strict counterpart, and so
//! that teams implementing the protocol in their own service have a reference
//! (`docs/agent.md`).
//!
//! The parts:
//! - [`store`]: the data dir, atomic writes and crash recovery;
//! - `routes`: the HTTP handlers and their status codes;
//! - `auth`: the optional bearer token;
//! - `hook`: the optional `--on-activate` command.
//!
//! What it guarantees: a bundle becomes active only after its digest was
//! recomputed and its signature checked against the trusted keys; the active
//! pointer only ever names a completely written bundle, whatever moment the
//! process is killed at; state changes are applied one at a time.

mod auth;
pub mod cli;
mod hook;
mod metrics;
pub mod pull;
mod routes;
mod server;
pub mod store;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::middleware;
use axum::routing::{get, post};
use tokio::sync::Mutex;
use tracing::{info, warn};

use pde_core::keys::TrustedKeys;
use pde_core::secret::{ExposeSecret, Secret};
use pde_core::{ExitCode, HasExitCode};

pub use store::ActiveRecord;

/// Default `--max-body-bytes`: 16 MiB.
pub const DEFAULT_MAX_BODY_BYTES: usize = 16 * 1024 * 1024;
/// Default `--max-concurrent-deploys`.
pub const DEFAULT_MAX_CONCURRENT_DEPLOYS: usize = 4;
/// Default `--keep`: stored bundles kept.
pub const DEFAULT_KEEP: usize = 10;
/// Default `--max-connections`: well below the common default limit of
/// 1,024 file descriptors, which the agent also needs for its data dir.
pub const DEFAULT_MAX_CONNECTIONS: usize = 512;
/// Default `--header-timeout-secs`: a client has this long to send a
/// request's headers (a pusher sends them at once).
pub const DEFAULT_HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// How an agent is set up. Its `Debug` output never shows the token.
#[derive(Clone)]
pub struct AgentConfig {
    /// Where bundles and state live (created if missing).
    pub data_dir: PathBuf,
    /// Public keys whose signatures are accepted.
    pub trusted: TrustedKeys,
    /// Accept unsigned bundles when no key is trusted. Never in production.
    pub insecure_accept_unsigned: bool,
    /// Bearer token required on every route but the health checks.
    pub token: Option<Secret>,
    /// Largest request body accepted; larger ones get 413.
    pub max_body_bytes: usize,
    /// How many stored bundles to keep (the active one is never pruned).
    pub keep: usize,
    /// Shell command run after each activation, with the bundle path appended.
    pub on_activate: Option<String>,
    /// Deploy bodies read and verified at once; the rest wait before their
    /// body is read, so memory stays bounded whatever is sent.
    pub max_concurrent_deploys: usize,
    /// Keys whose signed approvals count (`--approver-key`).
    pub approvers: pde_core::approval::Approvers,
    /// Approvals by distinct `approvers` a bundle must carry to be activated
    /// (`--min-approvals`; 0: none needed).
    pub min_approvals: u32,
    /// What a bundle's validation attestation must show (`--plugin-key`,
    /// `--require-plugin`); empty: attestations are not checked.
    pub validation: pde_core::attestation::Requirement,
    /// Connections open at once (`--max-connections`); more are closed at once.
    pub max_connections: usize,
    /// How long a client has to send a request's headers (`--header-timeout-secs`).
    pub header_read_timeout: std::time::Duration,
}

impl std::fmt::Debug for AgentConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentConfig")
            .field("data_dir", &self.data_dir)
            .field("trusted", &self.trusted.key_ids())
            .field("insecure_accept_unsigned", &self.insecure_accept_unsigned)
            .field("token", &self.token)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("keep", &self.keep)
            .field("on_activate", &self.on_activate)
            .field("max_concurrent_deploys", &self.max_concurrent_deploys)
            .field("approvers", &self.approvers.key_ids())
            .field("min_approvals", &self.min_approvals)
            .field("plugin_keys", &self.validation.plugin_keys.key_ids())
            .field("required_plugins", &self.validation.required)
            .field("max_connections", &self.max_connections)
            .field("header_read_timeout", &self.header_read_timeout)
            .finish()
    }
}

impl AgentConfig {
    /// A configuration with the defaults: no trusted key (so it will refuse to
    /// start until one is added), no token, 16 MiB bodies, keep 10, no hook.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        AgentConfig {
            data_dir: data_dir.into(),
            trusted: TrustedKeys::new(),
            insecure_accept_unsigned: false,
            token: None,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            keep: DEFAULT_KEEP,
            on_activate: None,
            max_concurrent_deploys: DEFAULT_MAX_CONCURRENT_DEPLOYS,
            approvers: pde_core::approval::Approvers::new(),
            min_approvals: 0,
            validation: pde_core::attestation::Requirement::default(),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            header_read_timeout: DEFAULT_HEADER_TIMEOUT,
        }
    }
}

/// Why the agent could not start or keep serving.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// No trusted key, and unsigned bundles were not explicitly allowed.
    #[error(
        "no trusted key configured: pass --trusted-key FILE (a public key written by `pde keygen`), \
         or --insecure-accept-unsigned to accept bundles without checking signatures (never in production)"
    )]
    NoTrustedKeys,
    /// No trusted key and no bearer token: nothing would authorise a
    /// rollback, so anyone who reaches the port could switch policies off.
    #[error(
        "--insecure-accept-unsigned without a bearer token: with no trusted key, rollbacks cannot be \
         checked for a release-key signature, so the token is their only authority; add --token-env NAME \
         or --token-file FILE, or better, give --trusted-key FILE"
    )]
    NoAuthority,
    /// A setting is out of range.
    #[error("invalid agent setting: {0}")]
    Config(String),
    /// The data dir could not be opened or recovered.
    #[error(
        "cannot open the agent data dir {dir}: {source}; check that it exists and is writable by this user"
    )]
    DataDir {
        /// The data dir.
        dir: PathBuf,
        /// What failed.
        source: store::StoreError,
    },
    /// Another agent runs on the same data dir.
    #[error(
        "data dir {0} is in use by another running `pde agent`; stop that one, or give this one its own --data-dir"
    )]
    InUse(PathBuf),
    /// The state file is damaged (it is only ever replaced atomically, so
    /// something outside the agent changed it).
    #[error(
        "agent state in {dir} is damaged: {source}; restore the data dir from a backup, \
         or move it away to start empty and redeploy"
    )]
    CorruptState {
        /// The data dir.
        dir: PathBuf,
        /// What is wrong.
        source: store::StoreError,
    },
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}; pick a free port or another address")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The server stopped with an I/O error.
    #[error("the agent's HTTP server failed: {0}")]
    Serve(std::io::Error),
}

impl HasExitCode for AgentError {
    fn exit_code(&self) -> ExitCode {
        match self {
            AgentError::CorruptState { .. } => ExitCode::Integrity,
            AgentError::NoTrustedKeys
            | AgentError::NoAuthority
            | AgentError::Config(_)
            | AgentError::DataDir { .. }
            | AgentError::InUse(_)
            | AgentError::Bind { .. }
            | AgentError::Serve(_) => ExitCode::Usage,
        }
    }
}

/// A ready-to-serve agent: configuration checked, data dir recovered.
pub struct Agent {
    state: routes::AppState,
    token: Option<auth::TokenCheck>,
    limits: server::ConnLimits,
}

impl Agent {
    /// Checks the configuration and opens (and, after a crash, recovers) the
    /// data dir. Refuses to start without a trusted key unless unsigned
    /// bundles were explicitly allowed, and then only with a bearer token
    /// (something must authorise rollbacks).
    pub fn open(cfg: AgentConfig) -> Result<Agent, AgentError> {
        if cfg.keep == 0 {
            return Err(AgentError::Config(
                "--keep must be at least 1 (the active bundle is always kept)".into(),
            ));
        }
        if cfg.max_concurrent_deploys == 0 {
            return Err(AgentError::Config(
                "--max-concurrent-deploys must be at least 1".into(),
            ));
        }
        if cfg.max_connections == 0 {
            return Err(AgentError::Config(
                "--max-connections must be at least 1".into(),
            ));
        }
        if cfg.header_read_timeout.is_zero() {
            return Err(AgentError::Config(
                "--header-timeout-secs must be at least 1".into(),
            ));
        }
        if cfg.max_body_bytes == 0 {
            return Err(AgentError::Config(
                "--max-body-bytes must be at least 1".into(),
            ));
        }
        if cfg
            .token
            .as_ref()
            .is_some_and(|t| t.expose_secret().trim().is_empty())
        {
            return Err(AgentError::Config(
                "the bearer token is empty; set the variable named by --token-env to a secret"
                    .into(),
            ));
        }
        let check_signatures = !cfg.trusted.is_empty();
        if !cfg.validation.required.is_empty() && cfg.validation.plugin_keys.is_empty() {
            return Err(AgentError::Config(
                "--require-plugin needs at least one --plugin-key: a required validator counts only \
                 when a trusted plugin key signed it"
                    .into(),
            ));
        }
        if !cfg.validation.is_empty() && !check_signatures {
            return Err(AgentError::Config(
                "--plugin-key and --require-plugin need --trusted-key: the validation attestation \
                 is believed only when a trusted release key signed it"
                    .into(),
            ));
        }
        if !check_signatures {
            if !cfg.insecure_accept_unsigned {
                return Err(AgentError::NoTrustedKeys);
            }
            // Bundles may go unchecked by explicit choice, but a rollback
            // still needs some authority: without a key, that is the token.
            if cfg.token.is_none() {
                return Err(AgentError::NoAuthority);
            }
            warn!(
                "INSECURE: no trusted key configured and --insecure-accept-unsigned is set; \
                 this agent will activate bundles WITHOUT checking any signature"
            );
        } else if cfg.insecure_accept_unsigned {
            warn!(
                "--insecure-accept-unsigned is ignored: trusted keys are configured, so every bundle must be signed by one"
            );
        }
        // What was active before a restart is served again only if it still
        // verifies: digest, signature against the keys trusted now, and the
        // approvals the agent requires now (an agent restarted with another
        // approver set or a higher --min-approvals re-checks them as it
        // re-checks signatures, with the same fall-back).
        let verify = |bundle: &pde_core::bundle::Bundle| -> Result<(), String> {
            bundle.verify_digest().map_err(|e| e.to_string())?;
            if check_signatures {
                bundle
                    .verify_signature(&cfg.trusted)
                    .map_err(|e| e.to_string())?;
            }
            if let Some(reason) =
                routes::approvals_shortfall(bundle, &cfg.approvers, cfg.min_approvals)
            {
                return Err(format!("approvals: {reason}"));
            }
            Ok(())
        };
        let store =
            store::Store::open(&cfg.data_dir, cfg.keep, &verify).map_err(
                |source| match source {
                    store::StoreError::InUse(dir) => AgentError::InUse(dir),
                    store::StoreError::CorruptState { .. } => AgentError::CorruptState {
                        dir: cfg.data_dir.clone(),
                        source,
                    },
                    source => AgentError::DataDir {
                        dir: cfg.data_dir.clone(),
                        source,
                    },
                },
            )?;
        let active = store.active_all();
        if active.is_empty() {
            info!("no active policy yet");
        }
        for (policy_id, a) in active {
            info!(%policy_id, digest = %a.digest, version = %a.version, "recovered active bundle");
        }
        let integrity = store.integrity_view();
        info!(
            data_dir = %cfg.data_dir.display(),
            trusted_keys = ?cfg.trusted.key_ids(),
            token_required = cfg.token.is_some(),
            max_body_bytes = cfg.max_body_bytes,
            keep = cfg.keep,
            approvers = ?cfg.approvers.key_ids(),
            min_approvals = cfg.min_approvals,
            plugin_keys = ?cfg.validation.plugin_keys.key_ids(),
            required_plugins = ?cfg.validation.required,
            max_connections = cfg.max_connections,
            header_timeout_ms = cfg.header_read_timeout.as_millis() as u64,
            "agent ready"
        );
        Ok(Agent {
            limits: server::ConnLimits {
                max_connections: cfg.max_connections,
                header_read_timeout: cfg.header_read_timeout,
            },
            token: cfg
                .token
                .as_ref()
                .map(|t| auth::TokenCheck::new(t.expose_secret())),
            state: routes::AppState {
                store: Arc::new(Mutex::new(store)),
                metrics: Arc::default(),
                deploy_slots: Arc::new(tokio::sync::Semaphore::new(cfg.max_concurrent_deploys)),
                hooks: Arc::default(),
                pull: None,
                settings: Arc::new(routes::Settings {
                    trusted: cfg.trusted,
                    check_signatures,
                    approvers: cfg.approvers,
                    min_approvals: cfg.min_approvals,
                    validation: cfg.validation,
                    max_body_bytes: cfg.max_body_bytes,
                    on_activate: cfg.on_activate,
                    data_dir: cfg.data_dir,
                    integrity,
                }),
            },
        })
    }

    /// Pull mode: follow `cfg`'s tags in an OCI registry. The loop starts
    /// with [`Agent::serve`]; `/healthz` and `/metrics` report on it.
    pub fn with_pull(mut self, cfg: pull::PullConfig) -> Result<Agent, AgentError> {
        if cfg.interval.is_zero() {
            return Err(AgentError::Config("--interval must be above zero".into()));
        }
        if !pde_core::wire::valid_env(&cfg.env) {
            return Err(AgentError::Config(format!(
                "--env {:?} must be 1 to 128 of A-Z a-z 0-9 . _ - starting with a letter or digit",
                cfg.env
            )));
        }
        for p in &cfg.policies {
            if !store::is_valid_policy_id(p) {
                return Err(AgentError::Config(format!(
                    "--policy {p:?} is not a policy id"
                )));
            }
            pde_core::oci::policy_tag(p, &cfg.env)
                .map_err(|e| AgentError::Config(e.to_string()))?;
        }
        self.state.pull = Some(Arc::new(pull::PullState::new(cfg)));
        Ok(self)
    }

    /// The HTTP routes. Health checks are open; everything else requires the
    /// bearer token when one is configured.
    pub fn router(&self) -> Router {
        let limit = self.state.settings.max_body_bytes;
        let mut protected = Router::new()
            .route("/deploy", post(routes::deploy))
            .route("/rollback", post(routes::rollback))
            .route("/active", get(routes::active))
            .route("/active/{policy_id}", get(routes::active_one))
            .route("/bundles", get(routes::bundles))
            .route("/metrics", get(routes::metrics));
        if let Some(check) = &self.token {
            protected = protected.layer(middleware::from_fn_with_state(
                check.clone(),
                auth::require_token,
            ));
        }
        Router::new()
            .route("/healthz", get(routes::healthz))
            .route("/readyz", get(routes::readyz))
            .merge(protected)
            .fallback(routes::not_found)
            .method_not_allowed_fallback(routes::method_not_allowed)
            .layer(DefaultBodyLimit::max(limit))
            .layer(middleware::from_fn_with_state(
                limit,
                routes::check_content_length,
            ))
            .layer(middleware::from_fn_with_state(
                self.state.clone(),
                routes::log_requests,
            ))
            .with_state(self.state.clone())
    }

    /// Serves on `listener` until `shutdown` completes, then finishes the
    /// requests in flight. Each connection must send its request headers
    /// within the header timeout, and at most `max_connections` are open.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), AgentError> {
        if let Ok(addr) = listener.local_addr() {
            info!(%addr, "agent listening");
        }
        if let Some(pull) = &self.state.pull {
            pull::spawn(self.state.clone(), pull.clone()).map_err(AgentError::Config)?;
        }
        server::serve(listener, self.router(), self.limits, shutdown)
            .await
            .map_err(AgentError::Serve)
    }
}

/// Completes on ctrl-c or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    info!("shutting down");
}
