//! `pde.toml`: the description of a policy workspace (DESIGN §8).
//!
//! Every table denies unknown fields: a typo such as `require_signed_plugin`
//! must be an error, not a silently weaker production gate.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use pde_core::{ExitCode, HasExitCode};

mod rollout;
pub use rollout::{
    Baseline, GATE_VARIABLES, Gate, OnNoData, Rollout, Wave, parse_duration, variables,
};

/// The file name looked for at the root of a workspace.
pub const FILE_NAME: &str = "pde.toml";

/// Why a workspace configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file is missing or unreadable.
    #[error("cannot read {path}: {source} (run `pde init` to create a workspace)")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML of the expected shape.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the parser said, with line and column.
        message: String,
    },
    /// The file parses but does not make sense.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong and how to fix it.
        message: String,
    },
    /// A service's `token_env` names a variable that is not set (or is empty).
    #[error(
        "service {service:?}: token variable {var} is not set; export it, or remove `token_env` from the service in pde.toml"
    )]
    MissingToken {
        /// The service.
        service: String,
        /// The environment variable pde.toml names.
        var: String,
    },
    /// An environment was asked for that the file does not define.
    #[error("unknown environment {name:?}; pde.toml defines: {known}")]
    UnknownEnv {
        /// The name asked for.
        name: String,
        /// The defined names, comma separated.
        known: String,
    },
}

impl HasExitCode for ConfigError {
    fn exit_code(&self) -> ExitCode {
        ExitCode::Usage
    }
}

/// The whole `pde.toml`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Directory of policy documents, relative to the workspace root.
    #[serde(default = "default_policies")]
    pub policies: PathBuf,
    /// Directory of plugins (`<name>.wasm` + `<name>.toml`).
    #[serde(default = "default_plugins")]
    pub plugins: PathBuf,
    /// Directory of local state: database, audit log, plugin cache, `dist/`;
    /// as a `[state]` table it may also name a shared PostgreSQL database.
    #[serde(default)]
    pub state: StateSetting,
    /// Allow `state` to name a directory outside the workspace (an absolute
    /// path, or one climbing out with `..`). Off by default.
    #[serde(default)]
    pub allow_state_outside_workspace: bool,
    /// Where the bundle signing key comes from.
    #[serde(default)]
    pub signing: SigningConfig,
    /// Plugins' trust roots.
    #[serde(default)]
    pub trust: TrustConfig,
    /// Per-call sandbox limits for plugins.
    #[serde(default)]
    pub limits: Limits,
    /// HTTP delivery settings.
    #[serde(default)]
    pub push: PushConfig,
    /// Audit log settings.
    #[serde(default)]
    pub audit: AuditConfig,
    /// Target environments by name.
    #[serde(default)]
    pub environments: BTreeMap<String, Environment>,
}

fn default_policies() -> PathBuf {
    "policies".into()
}
fn default_plugins() -> PathBuf {
    "plugins".into()
}
fn default_state() -> PathBuf {
    ".pde".into()
}

/// `state`: either a directory (`state = ".pde"`, the default) or a table
/// `[state]` with `dir`, and `url` + `password_env` for a team's shared
/// PostgreSQL database (issue 12). It dereferences to the directory, which
/// keeps the plugin cache and `dist/` even when the state is shared.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StateSetting {
    /// The local state directory, relative to the workspace root.
    pub dir: PathBuf,
    /// `postgres://user@host:port/db`: shared state instead of SQLite.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// The environment variable holding the database password.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password_env: Option<String>,
}

impl Default for StateSetting {
    fn default() -> StateSetting {
        StateSetting {
            dir: default_state(),
            url: None,
            password_env: None,
        }
    }
}

impl std::ops::Deref for StateSetting {
    type Target = Path;

    fn deref(&self) -> &Path {
        &self.dir
    }
}

impl AsRef<Path> for StateSetting {
    fn as_ref(&self) -> &Path {
        &self.dir
    }
}

impl<'de> Deserialize<'de> for StateSetting {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<StateSetting, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Table {
            #[serde(default = "default_state")]
            dir: PathBuf,
            url: Option<String>,
            password_env: Option<String>,
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Dir(PathBuf),
            Table(Table),
        }
        Ok(match Raw::deserialize(d)? {
            Raw::Dir(dir) => StateSetting {
                dir,
                url: None,
                password_env: None,
            },
            Raw::Table(t) => StateSetting {
                dir: t.dir,
                url: t.url,
                password_env: t.password_env,
            },
        })
    }
}

/// `[signing]`: exactly one of `key_file` or `key_env`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SigningConfig {
    /// A file holding the hex ed25519 seed, relative to the workspace root.
    pub key_file: Option<PathBuf>,
    /// An environment variable holding the hex ed25519 seed.
    pub key_env: Option<String>,
}

/// `[trust]`: public keys whose plugin signatures are accepted.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustConfig {
    /// Public key files (hex), relative to the workspace root.
    #[serde(default)]
    pub plugin_keys: Vec<PathBuf>,
    /// Key ids whose plugin signatures no longer count (a lost or retired
    /// key), even if the key is still listed in `plugin_keys`.
    #[serde(default)]
    pub revoked: Vec<String>,
    /// Keys whose signed approvals (`pde approve`) count, with the roles
    /// each is trusted for.
    #[serde(default)]
    pub approver_keys: Vec<ApproverKey>,
}

/// One entry of `[trust] approver_keys`:
/// `{ file = "keys/ana.pub", roles = ["legal"] }`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApproverKey {
    /// Public key file (hex), relative to the workspace root.
    pub file: PathBuf,
    /// Roles this key may approve in; an approval claiming another role
    /// still counts towards `min_approvals`, but not towards `required_roles`.
    #[serde(default)]
    pub roles: Vec<String>,
    /// The person or team the key belongs to, for messages and reviews.
    #[serde(default)]
    pub name: Option<String>,
    /// The last day (UTC) the key counts, `YYYY-MM-DD`; after it, its
    /// approvals do not.
    #[serde(default)]
    pub expires: Option<String>,
}

impl ApproverKey {
    /// Whether the key still counts on `today` (an unreadable expiry never
    /// counts; `pde.toml`'s check names it).
    pub fn valid_on(&self, today: jiff::civil::Date) -> bool {
        valid_on(self.expires.as_deref(), today).unwrap_or(false)
    }
}

/// Whether a key with expiry `expires` (the last day it counts,
/// `YYYY-MM-DD`, UTC) still counts on `today`; an error says what is wrong
/// with the date.
pub fn valid_on(expires: Option<&str>, today: jiff::civil::Date) -> Result<bool, String> {
    let Some(text) = expires else {
        return Ok(true);
    };
    let last: jiff::civil::Date = text
        .parse()
        .map_err(|e| format!("expires = {text:?} is not a date (YYYY-MM-DD): {e}"))?;
    Ok(today <= last)
}

pub use pde_plugin_host::Limits;

/// `[push]`: HTTP delivery.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PushConfig {
    /// Per-request timeout, in milliseconds.
    pub timeout_ms: u64,
    /// Retries after the first attempt, for 5xx, timeouts and connection errors.
    pub retries: u32,
    /// At most this many targets are pushed to at once.
    pub concurrency: usize,
    /// First backoff delay in milliseconds; doubles each retry, with jitter.
    pub backoff_ms: u64,
}

impl PushConfig {
    /// The per-request timeout.
    pub fn timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.timeout_ms.max(1))
    }

    /// The retry policy these settings describe, for every request to a
    /// target (push, verification, compensation, rollback, plan).
    pub fn retry_policy(&self) -> pde_core::retry::RetryPolicy {
        pde_core::retry::RetryPolicy {
            retries: self.retries,
            backoff_ms: self.backoff_ms,
            timeout: std::time::Duration::from_millis(self.timeout_ms.max(1)),
        }
    }
}

impl Default for PushConfig {
    fn default() -> Self {
        PushConfig {
            timeout_ms: 5000,
            retries: 3,
            concurrency: 128,
            backoff_ms: 100,
        }
    }
}

/// `[audit]`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// Optional HTTP endpoint that receives a copy of every record.
    pub sink_url: Option<String>,
    /// Bearer token for the sink, read from this environment variable.
    pub sink_token_env: Option<String>,
    /// How long a finishing command waits for the sink to take pending
    /// records, in milliseconds (default 2000). Whatever is left is sent by
    /// the next run; a deploy itself never waits for the sink.
    pub sink_flush_ms: Option<u64>,
}

/// `[environments.<name>]`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Environment {
    /// Every plugin must carry a valid signature by a `[trust]` key.
    #[serde(default)]
    pub require_signed_plugins: bool,
    /// Only a digest already deployed in this environment may come here.
    pub promote_from: Option<String>,
    /// Distinct approvers a policy needs before it may come here.
    #[serde(default)]
    pub min_approvals: u32,
    /// Roles that must each be credited by a valid approval, e.g. `["legal"]`.
    #[serde(default)]
    pub required_roles: Vec<String>,
    /// Only signed approvals by `[trust] approver_keys` count here; the
    /// unsigned `approvals` entries of the policy document do not.
    #[serde(default)]
    pub require_signed_approvals: bool,
    /// Plugins (by manifest name) that must be installed for a deploy here.
    #[serde(default)]
    pub required_plugins: Vec<String>,
    /// The services of this environment.
    #[serde(default)]
    pub services: Vec<Service>,
    /// Readiness checks beyond each service's `/healthz`, run with them
    /// before anything is pushed.
    #[serde(default)]
    pub checks: Vec<Check>,
    /// How bundles reach this environment's services: pushed to each
    /// (the default) or published to an OCI registry that agents pull from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery: Option<Delivery>,
    /// A progressive rollout: waves, bakes and gates (issue 22).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<Rollout>,
}

/// `delivery = { kind = "push" }` or `delivery = { kind = "oci", reference = "HOST[:PORT]/REPO", … }`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum Delivery {
    /// `POST /deploy` to every routed service (DESIGN §7).
    Push,
    /// Publish to an OCI registry; the services' agents pull (issue 23).
    Oci(OciDelivery),
}

/// The OCI delivery of an environment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OciDelivery {
    /// `HOST[:PORT]/REPOSITORY`; the tag of policy P is `P.<env>`.
    pub reference: String,
    /// Plain HTTP instead of TLS: an explicit opt-in for loopback and test registries.
    #[serde(default)]
    pub plain_http: bool,
    /// Environment variable holding `USER:PASSWORD` for the registry.
    pub credentials_env: Option<String>,
    /// How long a deploy waits for the listed services to report the new
    /// digest on `GET /active/{id}` before it re-points the tag back.
    #[serde(default = "default_converge_timeout_ms")]
    pub converge_timeout_ms: u64,
    /// The fleet beyond the listed services (too large to list): gates a
    /// deploy waits on after the listed services converged, re-evaluated
    /// until they all pass or `converge_timeout_ms` (counted from the
    /// publish) ends; then the tag goes back. Typically a Prometheus count
    /// of the agents' `pde_agent_active_policy{digest="${digest}"}` with
    /// `min = N`. Only `${policy_id}`, `${version}` and `${digest}` apply.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub converge_gates: Vec<Gate>,
}

/// The `${variables}` a `converge_gates` entry may name: the release, not a
/// wave or a service (a publish has neither).
pub const CONVERGE_GATE_VARIABLES: &[&str] = &["policy_id", "version", "digest"];

fn default_converge_timeout_ms() -> u64 {
    120_000
}

impl OciDelivery {
    /// The repository, parsed (checked at load).
    pub fn repository(&self) -> Result<pde_core::oci::Repository, pde_core::oci::OciError> {
        self.reference.parse()
    }

    /// The registry client options, credentials read now.
    pub fn options(&self) -> Result<pde_core::oci::RegistryOptions, pde_core::oci::OciError> {
        let credentials = match &self.credentials_env {
            None => None,
            Some(var) => Some(pde_core::oci::Credentials::from_env(var)?),
        };
        Ok(pde_core::oci::RegistryOptions {
            plain_http: self.plain_http,
            credentials,
            ..Default::default()
        })
    }

    /// The convergence timeout.
    pub fn converge_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.converge_timeout_ms)
    }
}

impl Environment {
    /// The OCI delivery of this environment, if it publishes to a registry.
    pub fn oci(&self) -> Option<&OciDelivery> {
        match &self.delivery {
            Some(Delivery::Oci(o)) => Some(o),
            _ => None,
        }
    }
}

/// `[[environments.<name>.checks]]`: one readiness check, chosen by `kind`.
///
/// A failing check stops a deploy exactly as an unhealthy service does
/// (exit 4, nothing pushed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum Check {
    /// `url` must answer 2xx; with `json_field`, the JSON body's value at
    /// that pointer must equal `equals`.
    Http {
        /// Unique name within the environment, shown in reports.
        name: String,
        /// The URL to `GET`.
        url: String,
        /// A JSON pointer into the body, e.g. `/status`.
        json_field: Option<String>,
        /// The value `json_field` must hold (any JSON value).
        equals: Option<serde_json::Value>,
        /// Environment variable holding a bearer token for `url`.
        token_env: Option<String>,
    },
    /// A Prometheus instant query that must return no series.
    Prometheus {
        /// Unique name within the environment.
        name: String,
        /// The Prometheus base URL; `/api/v1/query` is appended.
        url: String,
        /// The PromQL query, e.g. `ALERTS{severity="critical"}`.
        query: String,
        /// Environment variable holding a bearer token for Prometheus.
        token_env: Option<String>,
    },
    /// A change freeze: deploys are refused between `start` and `end`
    /// unless overridden with a reason.
    Freeze {
        /// Unique name within the environment.
        name: String,
        /// Start of the window: a local date-time (`2026-12-20T18:00:00`)
        /// read in `timezone`, or RFC 3339 with an offset.
        start: String,
        /// End of the window (exclusive), in the same forms as `start`.
        end: String,
        /// IANA time zone of local `start`/`end`, e.g. `America/New_York`.
        timezone: Option<String>,
    },
}

impl Check {
    /// The check's name.
    pub fn name(&self) -> &str {
        match self {
            Check::Http { name, .. }
            | Check::Prometheus { name, .. }
            | Check::Freeze { name, .. } => name,
        }
    }

    /// `http`, `prometheus` or `freeze`.
    pub fn kind(&self) -> &'static str {
        match self {
            Check::Http { .. } => "http",
            Check::Prometheus { .. } => "prometheus",
            Check::Freeze { .. } => "freeze",
        }
    }
}

/// A change-freeze window as instants: `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FreezeWindow {
    /// First instant of the freeze.
    pub start: jiff::Timestamp,
    /// First instant after the freeze.
    pub end: jiff::Timestamp,
}

impl Environment {
    /// The names of this environment's freeze checks whose window holds
    /// `now` (a window that does not parse counts as in force: pde.toml's
    /// check refuses it anyway, and a freeze must never be read as lifted).
    pub fn freezes_in_force(&self, now: jiff::Timestamp) -> Vec<String> {
        self.checks
            .iter()
            .filter_map(|c| match c {
                Check::Freeze {
                    name,
                    start,
                    end,
                    timezone,
                } => FreezeWindow::parse(start, end, timezone.as_deref())
                    .map_or(true, |w| w.contains(now))
                    .then(|| name.clone()),
                _ => None,
            })
            .collect()
    }
}

impl FreezeWindow {
    /// Reads `start`/`end` of a freeze check. Local date-times need
    /// `timezone`; RFC 3339 instants carry their own offset. The error says
    /// what is wrong in words fit for pde.toml's reader.
    pub fn parse(start: &str, end: &str, timezone: Option<&str>) -> Result<FreezeWindow, String> {
        let zone = match timezone {
            Some(name) => Some(
                jiff::tz::TimeZone::get(name)
                    .map_err(|e| format!("unknown time zone {name:?} (use an IANA name such as \"America/New_York\"): {e}"))?,
            ),
            None => None,
        };
        let at = |text: &str, which: &str| -> Result<jiff::Timestamp, String> {
            if let Ok(ts) = text.parse::<jiff::Timestamp>() {
                return Ok(ts);
            }
            let civil: jiff::civil::DateTime = text.parse().map_err(|e| {
                format!("{which} = {text:?} is neither a local date-time (2026-12-20T18:00:00) nor RFC 3339 with an offset: {e}")
            })?;
            let zone = zone.as_ref().ok_or_else(|| {
                format!("{which} = {text:?} is a local date-time: add `timezone = \"Area/City\"`, or give an RFC 3339 offset")
            })?;
            // A local time that a DST change skips or repeats is resolved
            // the way `jiff` (and RFC 9557) does by default: "compatible".
            civil
                .to_zoned(zone.clone())
                .map(|z| z.timestamp())
                .map_err(|e| {
                    format!(
                        "{which} = {text:?} in {}: {e}",
                        timezone.unwrap_or_default()
                    )
                })
        };
        let window = FreezeWindow {
            start: at(start, "start")?,
            end: at(end, "end")?,
        };
        if window.end <= window.start {
            return Err(format!("end {end:?} is not after start {start:?}"));
        }
        Ok(window)
    }

    /// Whether `now` falls inside the window.
    pub fn contains(&self, now: jiff::Timestamp) -> bool {
        self.start <= now && now < self.end
    }
}

/// `[[environments.<name>.services]]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    /// Unique name within the environment, e.g. `HMS-API`.
    pub name: String,
    /// Base URL of the service's pde endpoint.
    pub url: String,
    /// Tags that routers match on, e.g. `api`, `portal`.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Free-form labels passed to routers.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Environment variable holding the bearer token for this service.
    pub token_env: Option<String>,
}

impl Service {
    /// The bearer token named by `token_env`, read now; `None` without one.
    pub fn token(&self) -> Result<Option<pde_core::secret::Secret>, ConfigError> {
        let Some(var) = &self.token_env else {
            return Ok(None);
        };
        pde_core::secret::from_env(var)
            .map(Some)
            .ok_or_else(|| ConfigError::MissingToken {
                service: self.name.clone(),
                var: var.clone(),
            })
    }
}

impl Config {
    /// Reads and checks `<root>/pde.toml`.
    pub fn load(root: &Path) -> Result<Config, ConfigError> {
        let path = root.join(FILE_NAME);
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        let config = Self::parse(&text, &path)?;
        config.check_gate_plugins(root, &path)?;
        Ok(config)
    }

    /// Every rollout gate of kind `plugin` names a plugin of the plugin
    /// directory whose manifest says `kind = "gate"`. Only manifests are
    /// read: whether the component loads is checked where it is loaded.
    fn check_gate_plugins(&self, root: &Path, path: &Path) -> Result<(), ConfigError> {
        let wanted: Vec<(&String, &Gate)> = self
            .environments
            .iter()
            .filter_map(|(name, env)| env.rollout.as_ref().map(|r| (name, r)))
            .flat_map(|(name, r)| r.all_gates().map(move |g| (name, g)))
            .filter(|(_, g)| g.plugin().is_some())
            .collect();
        if wanted.is_empty() {
            return Ok(());
        }
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        let dir = root.join(&self.plugins);
        let found = crate::plugin::discovery::discover(&dir).map_err(|e| {
            invalid(format!(
                "a rollout gate calls a plugin, but the plugin directory cannot be read: {e}"
            ))
        })?;
        let gates: Vec<&str> = found
            .iter()
            .filter(|f| {
                f.manifest.kind(&f.manifest_path).ok() == Some(crate::plugin::PluginKind::Gate)
            })
            .map(|f| f.manifest.name.as_str())
            .collect();
        for (env, gate) in wanted {
            let plugin = gate.plugin().unwrap_or_default();
            let what = format!(
                "environment {env:?} rollout gate {:?} names plugin {plugin:?}",
                gate.name()
            );
            let Some(f) = found.iter().find(|f| f.manifest.name == plugin) else {
                return Err(invalid(format!(
                    "{what}, which is not in {} (its gate plugins: {})",
                    dir.display(),
                    if gates.is_empty() {
                        "none".to_string()
                    } else {
                        gates.join(", ")
                    }
                )));
            };
            match f.manifest.kind(&f.manifest_path) {
                Ok(crate::plugin::PluginKind::Gate) => {}
                Ok(kind) => {
                    return Err(invalid(format!(
                        "{what}, which is a {kind}, not a gate plugin (its manifest must say \
                         kind = \"gate\")"
                    )));
                }
                Err(e) => return Err(invalid(format!("{what}: {e}"))),
            }
        }
        Ok(())
    }

    /// Parses and checks configuration text; `path` is only used in messages.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        config.check(path)?;
        Ok(config)
    }

    fn check(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        if self.signing.key_file.is_some() && self.signing.key_env.is_some() {
            return Err(invalid(
                "[signing] sets both key_file and key_env; keep one".into(),
            ));
        }
        if self.limits.fuel == 0 || self.limits.memory_mib == 0 || self.limits.timeout_ms == 0 {
            return Err(invalid("[limits] values must be greater than zero".into()));
        }
        for (name, env) in &self.environments {
            if let Some(oci) = env.oci() {
                oci.repository()
                    .map_err(|e| invalid(format!("[environments.{name}] delivery: {e}")))?;
                if oci.converge_timeout_ms == 0 {
                    return Err(invalid(format!(
                        "[environments.{name}] delivery: converge_timeout_ms must be above zero"
                    )));
                }
                let here = format!("[environments.{name}] delivery: converge_gates");
                let mut names = std::collections::BTreeSet::new();
                for g in &oci.converge_gates {
                    rollout::check_gate(&here, g, &mut names).map_err(&invalid)?;
                    if let Gate::Plugin { .. } = g {
                        return Err(invalid(format!(
                            "{here} gate {:?} is judged by a plugin, which compares a wave \
                             with its baseline; a publish has neither (every agent follows \
                             the tag): use a prometheus gate with min or max",
                            g.name()
                        )));
                    }
                    for t in g.templates() {
                        for v in variables(t).map_err(&invalid)? {
                            if !CONVERGE_GATE_VARIABLES.contains(&v) {
                                return Err(invalid(format!(
                                    "{here} gate {:?} uses ${{{v}}}, which a publish does not \
                                     have (it has no wave and no one service); use \
                                     ${{policy_id}}, ${{version}} or ${{digest}}",
                                    g.name()
                                )));
                            }
                        }
                    }
                    if let Gate::Prometheus {
                        baseline: Some(_), ..
                    } = g
                    {
                        return Err(invalid(format!(
                            "{here} gate {:?} compares with a baseline, which a publish does \
                             not have (every agent follows the tag); use min or max",
                            g.name()
                        )));
                    }
                }
            }
        }
        for key in &self.trust.approver_keys {
            valid_on(key.expires.as_deref(), jiff::civil::Date::MIN).map_err(|e| {
                invalid(format!("[trust] approver key {}: {e}", key.file.display()))
            })?;
        }
        if self.audit.sink_url.as_deref().is_some_and(has_userinfo) {
            return Err(invalid(
                "[audit] sink_url carries credentials (user:password@); remove them and name \
                 the token's environment variable with `sink_token_env = \"VAR\"`"
                    .into(),
            ));
        }
        if let Some(url) = &self.state.url {
            if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                // Not echoed: a URL of another kind may carry a password.
                return Err(invalid(
                    "[state] url must be a postgres://user@host:port/database URL".into(),
                ));
            }
            // Only the password is a secret; `user@` alone is fine.
            if url
                .split_once("://")
                .and_then(|(_, rest)| rest.split(['/', '?']).next())
                .and_then(|authority| authority.rsplit_once('@'))
                .is_some_and(|(userinfo, _)| userinfo.contains(':'))
                || url
                    .split_once('?')
                    .is_some_and(|(_, query)| query.to_ascii_lowercase().contains("password"))
            {
                return Err(invalid(
                    "[state] url carries a password (user:password@); remove it and name the \
                     variable that holds it with `password_env = \"PDE_PG_PASSWORD\"`"
                        .into(),
                ));
            }
        } else if self.state.password_env.is_some() {
            return Err(invalid("[state] password_env is set but url is not".into()));
        }
        let lexically_inside = self.state.components().all(|c| {
            matches!(
                c,
                std::path::Component::Normal(_) | std::path::Component::CurDir
            )
        }) && self
            .state
            .components()
            .any(|c| matches!(c, std::path::Component::Normal(_)));
        if !lexically_inside && !self.allow_state_outside_workspace {
            return Err(invalid(state_outside_message(&self.state)));
        }
        if self.push.concurrency == 0 {
            return Err(invalid("[push] concurrency must be at least 1".into()));
        }
        for (name, env) in &self.environments {
            // Receivers refuse any other `env` on the wire (400 `bad_env`),
            // so a name they would refuse is caught here, before a deploy.
            if !pde_core::wire::valid_env(name) {
                return Err(invalid(format!(
                    "environment name {name:?} must be 1 to 128 of A-Z a-z 0-9 . _ - starting \
                     with a letter or digit (agents refuse any other environment name)"
                )));
            }
            // Such a gate could never pass; say so now rather than at the
            // first deploy, with the line to add.
            let needs_signed = env.require_signed_approvals
                && (env.min_approvals > 0 || !env.required_roles.is_empty());
            if needs_signed && self.trust.approver_keys.is_empty() {
                return Err(invalid(format!(
                    "environment {name:?} requires signed approvals but [trust] lists no approver \
                     keys; add `approver_keys = [{{ file = \"keys/<name>.pub\", roles = [...] }}]`"
                )));
            }
            if let Some(role) = env.required_roles.iter().find(|r| {
                !self.trust.approver_keys.iter().any(|k| k.roles.contains(r))
                    && env.require_signed_approvals
            }) {
                return Err(invalid(format!(
                    "environment {name:?} requires a {role:?} approval, but no key in \
                     [trust] approver_keys is trusted for that role"
                )));
            }
            let mut seen = std::collections::BTreeSet::new();
            for s in &env.services {
                if !seen.insert(&s.name) {
                    return Err(invalid(format!(
                        "environment {name:?} lists service {:?} twice",
                        s.name
                    )));
                }
                // Credentials in a URL end up in every message and audit
                // record that names the service; tokens belong in `token_env`.
                if has_userinfo(&s.url) {
                    return Err(invalid(format!(
                        "service {:?} in {name:?}: the url carries credentials (user:password@); \
                         remove them and put the token in an environment variable named by \
                         `token_env = \"VAR\"` (sent as `Authorization: Bearer`)",
                        s.name
                    )));
                }
                if !(s.url.starts_with("http://") || s.url.starts_with("https://")) {
                    return Err(invalid(format!(
                        "service {:?} in {name:?}: url {:?} must start with http:// or https://",
                        s.name, s.url
                    )));
                }
            }
            let mut names = std::collections::BTreeSet::new();
            for c in &env.checks {
                let what = format!("check {:?} in {name:?}", c.name());
                if !names.insert(c.name()) {
                    return Err(invalid(format!(
                        "{what} is listed twice; names must be unique"
                    )));
                }
                match c {
                    Check::Http {
                        url,
                        json_field,
                        equals,
                        ..
                    } => {
                        check_url(&what, url).map_err(&invalid)?;
                        if json_field.is_some() != equals.is_some() {
                            return Err(invalid(format!(
                                "{what}: json_field and equals go together; set both or neither"
                            )));
                        }
                        if json_field
                            .as_deref()
                            .is_some_and(|p| !p.is_empty() && !p.starts_with('/'))
                        {
                            return Err(invalid(format!(
                                "{what}: json_field must be a JSON pointer such as \"/status\""
                            )));
                        }
                    }
                    Check::Prometheus { url, query, .. } => {
                        check_url(&what, url).map_err(&invalid)?;
                        if query.trim().is_empty() {
                            return Err(invalid(format!("{what}: query is empty")));
                        }
                    }
                    Check::Freeze {
                        start,
                        end,
                        timezone,
                        ..
                    } => {
                        FreezeWindow::parse(start, end, timezone.as_deref())
                            .map_err(|e| invalid(format!("{what}: {e}")))?;
                    }
                }
            }
            if let Some(rollout) = &env.rollout {
                rollout.check(name, &env.services).map_err(&invalid)?;
                // One tag per policy and environment moves the whole fleet at
                // once: there is no wave to hold back, and a halted rollout
                // could not send back the agents nobody lists.
                if env.oci().is_some() {
                    return Err(invalid(format!(
                        "environment {name:?} has both a rollout and delivery = \"oci\": a registry tag \
                         moves every pulling agent at once, so waves cannot be rolled out through it; \
                         watch the fleet with delivery.converge_gates instead, or deliver by push"
                    )));
                }
            }
            if let Some(from) = &env.promote_from
                && !self.environments.contains_key(from)
            {
                return Err(invalid(format!(
                    "environment {name:?} promotes from {from:?}, which is not defined"
                )));
            }
        }
        Ok(())
    }

    /// The named environment, or an error listing the defined ones.
    pub fn environment(&self, name: &str) -> Result<&Environment, ConfigError> {
        self.environments
            .get(name)
            .ok_or_else(|| ConfigError::UnknownEnv {
                name: name.to_string(),
                known: self
                    .environments
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }
}

/// Why a `state` outside the workspace is refused, and how to allow it.
pub(crate) fn state_outside_message(state: &Path) -> String {
    format!(
        "state = {:?} is not a directory inside the workspace; use a relative path such as \
         \".pde\", or set `allow_state_outside_workspace = true` at the top of pde.toml if \
         the state really belongs elsewhere",
        state.display().to_string()
    )
}

/// A check's URL: http(s), and no credentials in it (tokens go in
/// `token_env`, so they never reach a message or the audit log).
fn check_url(what: &str, url: &str) -> Result<(), String> {
    if has_userinfo(url) {
        return Err(format!(
            "{what}: the url carries credentials (user:password@); remove them and name the \
             token's environment variable with `token_env = \"VAR\"`"
        ));
    }
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(format!(
            "{what}: url {url:?} must start with http:// or https://"
        ));
    }
    Ok(())
}

/// True when `url` has a `user[:password]@` part. Judged on the authority
/// alone, without a URL parser, so that no malformed URL slips past it.
fn has_userinfo(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    authority.contains('@')
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"
policies = "policies"
[signing]
key_file = "keys/release.ed25519"
[limits]
fuel = 1_000
[environments.staging]
[environments.production]
require_signed_plugins = true
promote_from = "staging"
min_approvals = 2
[[environments.production.services]]
name = "HMS-API"
url = "http://127.0.0.1:1"
tags = ["api"]
token_env = "HMS_API_TOKEN"
"#;

    #[test]
    fn converge_gates_name_only_the_release_and_need_a_bound() {
        let parse = |gate: &str| {
            let text = format!(
                "[environments.production.delivery]\nkind = \"oci\"\nreference = \"127.0.0.1:5000/pde/p\"\n\
                 [[environments.production.delivery.converge_gates]]\nkind = \"prometheus\"\n\
                 name = \"fleet\"\nurl = \"http://127.0.0.1:9090\"\n{gate}"
            );
            Config::parse(&text, Path::new("pde.toml")).map_err(|e| e.to_string())
        };
        let ok = parse("query = 'count(pde_agent_active_policy{digest=\"${digest}\"})'\nmin = 3\n")
            .unwrap();
        let oci = ok.environment("production").unwrap().oci().unwrap();
        assert_eq!(oci.converge_gates.len(), 1);
        for (gate, says) in [
            (
                "query = 'up{instance=\"${service}\"}'\nmin = 1\n",
                "${service}",
            ),
            ("query = 'up{w=\"${wave}\"}'\nmin = 1\n", "${wave}"),
            ("query = 'up'\n", "no bound"),
            (
                "query = 'up{s=~\"${services_regex}\"}'\nbaseline = { factor = 1.5 }\n",
                "${services_regex}",
            ),
        ] {
            let e = parse(gate).unwrap_err();
            assert!(e.contains(says), "{gate}: {e}");
        }
    }

    #[test]
    fn state_is_a_directory_or_a_table_naming_a_shared_database() {
        let parse = |text: &str| Config::parse(text, Path::new("pde.toml"));
        let c = parse("state = \".pde-local\"\n").unwrap();
        assert_eq!(
            (c.state.dir.as_path(), c.state.url.as_deref()),
            (Path::new(".pde-local"), None)
        );
        assert_eq!(parse("").unwrap().state, StateSetting::default());
        let url = "postgres://release@db.example.gov:5432/pde";
        let table = parse(&format!(
            "[state]\nurl = \"{url}\"\npassword_env = \"PDE_PG_PASSWORD\"\n"
        ))
        .unwrap();
        assert_eq!(table.state.dir, PathBuf::from(".pde"));
        assert_eq!(table.state.url.as_deref(), Some(url));
        assert_eq!(table.state.password_env.as_deref(), Some("PDE_PG_PASSWORD"));
        let inline = parse(&format!("state = {{ dir = \".team\", url = \"{url}\" }}\n")).unwrap();
        assert_eq!(inline.state.dir, PathBuf::from(".team"));
        // A password in the file, a non-postgres URL, a stray key: refused.
        for bad in [
            "[state]\nurl = \"postgres://release:hunter2@db/pde\"\n",
            "[state]\nurl = \"mysql://release:hunter2@db/pde\"\n",
            "[state]\nurl = \"postgres://release@db/pde?password=hunter2\"\n",
            "[state]\npassword_env = \"X\"\n",
            "[state]\nurl = \"postgres://db/pde\"\npasword_env = \"X\"\n",
        ] {
            let e = parse(bad).unwrap_err();
            assert_eq!(e.exit_code(), ExitCode::Usage, "{bad}");
            assert!(!e.to_string().contains("hunter2"), "{e}");
        }
    }

    #[test]
    fn parses_the_documented_shape() {
        let c = Config::parse(SAMPLE, Path::new("pde.toml")).unwrap();
        assert_eq!(c.limits.fuel, 1_000);
        assert_eq!(c.limits.memory_mib, 64);
        let prod = c.environment("production").unwrap();
        assert!(prod.require_signed_plugins);
        assert_eq!(prod.services[0].tags, vec!["api"]);
        assert!(matches!(
            c.environment("prod"),
            Err(ConfigError::UnknownEnv { .. })
        ));
    }

    #[test]
    fn credentials_in_urls_are_refused_without_echoing_them() {
        for url in [
            "http://user:hunter2@127.0.0.1:1",
            "https://hunter2@api.example.gov/x",
            "http://user:hunter2@host?q=1",
        ] {
            let bad = SAMPLE.replace("http://127.0.0.1:1", url);
            let err = Config::parse(&bad, Path::new("pde.toml")).unwrap_err();
            assert_eq!(err.exit_code(), ExitCode::Usage);
            let err = err.to_string();
            assert!(err.contains("token_env"), "{err}");
            assert!(!err.contains("hunter2"), "{err}");
        }
        let sink =
            format!("{SAMPLE}\n[audit]\nsink_url = \"https://u:hunter2@audit.example.gov\"\n");
        let err = Config::parse(&sink, Path::new("pde.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("sink_token_env") && !err.contains("hunter2"),
            "{err}"
        );
        // An `@` in the path or query is not a credential.
        let ok = SAMPLE.replace("http://127.0.0.1:1", "http://127.0.0.1:1/a@b?c=@");
        Config::parse(&ok, Path::new("pde.toml")).unwrap();
    }

    const CHECKS: &str = r#"
[[environments.production.checks]]
kind = "http"
name = "gateway"
url = "http://127.0.0.1:1/status"
json_field = "/status"
equals = "green"
[[environments.production.checks]]
kind = "prometheus"
name = "no-critical-alerts"
url = "http://127.0.0.1:1"
query = 'ALERTS{severity="critical"}'
[[environments.production.checks]]
kind = "freeze"
name = "holidays"
start = "2026-12-24T00:00:00"
end = "2026-12-26T00:00:00"
timezone = "America/New_York"
"#;

    #[test]
    fn checks_parse_by_kind() {
        let c = Config::parse(&format!("{SAMPLE}{CHECKS}"), Path::new("pde.toml")).unwrap();
        let checks = &c.environment("production").unwrap().checks;
        let kinds: Vec<(&str, &str)> = checks.iter().map(|c| (c.kind(), c.name())).collect();
        assert_eq!(
            kinds,
            [
                ("http", "gateway"),
                ("prometheus", "no-critical-alerts"),
                ("freeze", "holidays")
            ]
        );
        assert!(matches!(&checks[0], Check::Http { equals: Some(v), .. } if v == "green"));
    }

    #[test]
    fn bad_checks_are_refused_by_name() {
        for (from, to, says) in [
            (
                "json_field = \"/status\"",
                "json_feld = \"/status\"",
                "json_feld",
            ),
            ("kind = \"freeze\"", "kind = \"frost\"", "frost"),
            ("America/New_York", "America/Gotham", "America/Gotham"),
            ("timezone = \"America/New_York\"", "", "timezone"),
            ("2026-12-26T00:00:00", "2026-12-23T00:00:00", "not after"),
            ("equals = \"green\"", "", "together"),
            ("name = \"holidays\"", "name = \"gateway\"", "twice"),
        ] {
            let bad = format!("{SAMPLE}{CHECKS}").replace(from, to);
            let err = Config::parse(&bad, Path::new("pde.toml")).unwrap_err();
            assert_eq!(err.exit_code(), ExitCode::Usage);
            let err = err.to_string();
            assert!(err.contains(says), "{from} -> {to}: {err}");
        }
    }

    #[test]
    fn freeze_windows_are_read_in_their_time_zone() {
        let w = FreezeWindow::parse(
            "2026-12-24T00:00:00",
            "2026-12-26T00:00:00",
            Some("America/New_York"),
        )
        .unwrap();
        // New York is UTC-5 in December: the window opens at 05:00 UTC.
        let at = |s: &str| s.parse::<jiff::Timestamp>().unwrap();
        assert!(!w.contains(at("2026-12-24T04:59:59Z")));
        assert!(w.contains(at("2026-12-24T05:00:00Z")));
        assert!(w.contains(at("2026-12-26T04:59:59Z")));
        assert!(!w.contains(at("2026-12-26T05:00:00Z")));
        // RFC 3339 with an offset needs no zone.
        let w = FreezeWindow::parse(
            "2026-07-01T09:00:00+02:00",
            "2026-07-01T10:00:00+02:00",
            None,
        )
        .unwrap();
        assert!(w.contains(at("2026-07-01T07:30:00Z")));
        assert!(!w.contains(at("2026-07-01T08:00:00Z")));
    }

    #[test]
    fn typos_are_errors() {
        let bad = SAMPLE.replace("require_signed_plugins", "require_signed_plugin");
        let err = Config::parse(&bad, Path::new("pde.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("require_signed_plugin"), "{err}");
    }
}
