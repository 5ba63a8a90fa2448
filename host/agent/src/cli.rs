//! The agent's command line, shared by `pde agent` and the `pde-agent`
//! binary: the flags, the logging set-up, and the run. Nothing here prints:
//! [`run`] hands the bound address to its caller, and each binary prints its
//! `listening on <addr>` line.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use pde_core::keys::TrustedKeys;
use pde_core::secret;

use crate::{
    Agent, AgentConfig, AgentError, DEFAULT_HEADER_TIMEOUT, DEFAULT_KEEP, DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_CONCURRENT_DEPLOYS, DEFAULT_MAX_CONNECTIONS,
};

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Readable lines (coloured on a terminal).
    #[default]
    Human,
    /// One JSON object per line, with the request's span fields
    /// (`request_id`, `method`, `path`), for log shippers.
    Json,
}

/// Run the receiving service that `pde deploy` pushes bundles to.
#[derive(Debug, clap::Args)]
pub struct AgentArgs {
    /// Log line format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,
    /// Address to listen on, e.g. 127.0.0.1:8700 (port 0 picks a free port).
    #[arg(long, value_name = "ADDR")]
    pub listen: SocketAddr,
    /// Directory for stored bundles and the active pointers (created if missing).
    #[arg(long, value_name = "DIR")]
    pub data_dir: PathBuf,
    /// Public key whose signatures are accepted (repeatable).
    #[arg(long = "trusted-key", value_name = "FILE")]
    pub trusted_keys: Vec<PathBuf>,
    /// Require `Authorization: Bearer <token>`, the token read from this variable.
    #[arg(long, value_name = "NAME", conflicts_with = "token_file")]
    pub token_env: Option<String>,
    /// Require `Authorization: Bearer <token>`, the token read from this file
    /// (e.g. a systemd credential, `%d/agent-token`); surrounding whitespace
    /// is ignored.
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Refuse bundles that do not carry at least N signed approvals of their
    /// policy by distinct --approver-key keys (defence in depth: a
    /// compromised pusher cannot skip the sign-off).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub min_approvals: u32,
    /// Public key whose signed approvals count (repeatable).
    #[arg(long = "approver-key", value_name = "FILE")]
    pub approver_keys: Vec<PathBuf>,
    /// Public key whose plugin signatures count (repeatable): every
    /// validator a bundle's validation attestation names must be signed by
    /// one (the security team's keys).
    #[arg(long = "plugin-key", value_name = "FILE")]
    pub plugin_keys: Vec<PathBuf>,
    /// Refuse bundles whose validation attestation does not show this
    /// validator plugin ran and passed (repeatable; needs --plugin-key).
    #[arg(long = "require-plugin", value_name = "NAME")]
    pub require_plugins: Vec<String>,
    /// With no --trusted-key, accept bundles without checking signatures.
    #[arg(long)]
    pub insecure_accept_unsigned: bool,
    /// Largest request body accepted, in bytes.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_BODY_BYTES)]
    pub max_body_bytes: usize,
    /// Stored bundles to keep per policy (the active one is never pruned).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_KEEP)]
    pub keep: usize,
    /// Shell command run after each activation, with the bundle path appended.
    #[arg(long, value_name = "CMD")]
    pub on_activate: Option<String>,
    /// Deploy bodies read and verified at once; others wait before their
    /// body is read (bounds memory under a flood).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_CONCURRENT_DEPLOYS)]
    pub max_concurrent_deploys: usize,
    /// Connections open at once; more are closed as soon as they arrive
    /// (keep it below the file-descriptor limit, LimitNOFILE).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_CONNECTIONS)]
    pub max_connections: usize,
    /// Seconds a client has to send a request's headers before its
    /// connection is closed (also closes idle keep-alive connections).
    #[arg(long, value_name = "SECS", default_value_t = DEFAULT_HEADER_TIMEOUT.as_secs())]
    pub header_timeout_secs: u64,
    /// Pull mode: follow this OCI repository (HOST[:PORT]/REPOSITORY) for
    /// the tags `<policy>.<env>`, verifying each bundle as a push would be.
    #[arg(long, value_name = "REFERENCE", requires = "env")]
    pub pull: Option<String>,
    /// Pull mode: the environment whose tags to follow.
    #[arg(long, value_name = "ENV", requires = "pull")]
    pub env: Option<String>,
    /// Pull mode: a policy to follow (repeatable); none: every tag of --env.
    #[arg(long = "policy", value_name = "ID", requires = "pull")]
    pub policies: Vec<String>,
    /// Pull mode: time between polls (e.g. 30s, 500ms), jittered by ±20%;
    /// failures back off exponentially up to 5 minutes.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration,
          default_value = "30s", requires = "pull")]
    pub interval: std::time::Duration,
    /// Pull mode: talk plain HTTP to the registry (loopback or test registries only).
    #[arg(long, requires = "pull")]
    pub registry_plain_http: bool,
    /// Pull mode: registry credentials, `USER:PASSWORD`, read from this variable.
    #[arg(long, value_name = "NAME", requires = "pull")]
    pub registry_credentials_env: Option<String>,
}

impl AgentArgs {
    /// The pull mode these flags ask for, if any.
    pub fn pull_config(&self) -> Result<Option<crate::pull::PullConfig>, AgentError> {
        let Some(reference) = &self.pull else {
            return Ok(None);
        };
        let repository = reference
            .parse::<pde_core::oci::Repository>()
            .map_err(|e| AgentError::Config(format!("--pull: {e}")))?;
        let credentials = match &self.registry_credentials_env {
            None => None,
            Some(var) => Some(
                pde_core::oci::Credentials::from_env(var)
                    .map_err(|e| AgentError::Config(format!("--registry-credentials-env: {e}")))?,
            ),
        };
        Ok(Some(crate::pull::PullConfig {
            repository,
            env: self.env.clone().unwrap_or_default(),
            policies: self.policies.clone(),
            interval: self.interval,
            options: pde_core::oci::RegistryOptions {
                plain_http: self.registry_plain_http,
                credentials,
                ..Default::default()
            },
        }))
    }

    /// The configuration these flags describe; a relative `--data-dir` is
    /// taken from `base` (`-C`).
    pub fn config(self, base: &Path) -> Result<AgentConfig, AgentError> {
        let trusted = TrustedKeys::from_files(&self.trusted_keys)
            .map_err(|e| AgentError::Config(e.to_string()))?;
        let token = match (&self.token_env, &self.token_file) {
            (Some(name), _) => Some(secret::from_env(name).ok_or_else(|| {
                AgentError::Config(format!(
                    "--token-env {name}: the variable is not set (or empty); export it with the bearer token"
                ))
            })?),
            (None, Some(file)) => {
                let text = std::fs::read_to_string(file).map_err(|e| {
                    AgentError::Config(format!("--token-file {}: {e}", file.display()))
                })?;
                Some(secret::Secret::from(text.trim().to_string()))
            }
            (None, None) => None,
        };
        let mut approvers = pde_core::approval::Approvers::new();
        for file in &self.approver_keys {
            let key = pde_core::keys::load_public_key(file)
                .map_err(|e| AgentError::Config(format!("--approver-key: {e}")))?;
            approvers.add(key, &[]);
        }
        if self.min_approvals > 0 && approvers.key_ids().len() < self.min_approvals as usize {
            return Err(AgentError::Config(format!(
                "--min-approvals {} needs at least that many distinct --approver-key files                  ({} given); no bundle could ever be accepted",
                self.min_approvals,
                approvers.key_ids().len()
            )));
        }
        let plugin_keys = TrustedKeys::from_files(&self.plugin_keys)
            .map_err(|e| AgentError::Config(format!("--plugin-key: {e}")))?;
        let data_dir = if self.data_dir.is_absolute() {
            self.data_dir
        } else {
            base.join(self.data_dir)
        };
        Ok(AgentConfig {
            data_dir,
            trusted,
            insecure_accept_unsigned: self.insecure_accept_unsigned,
            token,
            max_body_bytes: self.max_body_bytes,
            keep: self.keep,
            on_activate: self.on_activate,
            max_concurrent_deploys: self.max_concurrent_deploys,
            approvers,
            min_approvals: self.min_approvals,
            validation: pde_core::attestation::Requirement {
                plugin_keys,
                required: self.require_plugins,
            },
            max_connections: self.max_connections,
            header_read_timeout: std::time::Duration::from_secs(self.header_timeout_secs),
        })
    }
}

/// Installs the `tracing` subscriber for an agent process: `filter` as the
/// level filter, lines in `format` on stderr.
pub fn init_logging(filter: tracing_subscriber::EnvFilter, format: LogFormat) {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .init(),
    }
}

/// Opens the agent, binds, tells `listening` the bound address (the real
/// port when `--listen` asks for port 0), and serves until ctrl-c or
/// SIGTERM. Runs its own tokio runtime.
pub fn run(
    args: AgentArgs,
    base: &Path,
    listening: impl FnOnce(SocketAddr) + Send,
) -> Result<(), AgentError> {
    let listen = args.listen;
    let pull = args.pull_config()?;
    let cfg = args.config(base)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(AgentError::Serve)?;
    runtime.block_on(async move {
        let mut agent = Agent::open(cfg)?;
        if let Some(pull) = pull {
            agent = agent.with_pull(pull)?;
        }
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|source| AgentError::Bind {
                addr: listen,
                source,
            })?;
        listening(listener.local_addr().map_err(AgentError::Serve)?);
        agent.serve(listener, crate::shutdown_signal()).await
    })
}
