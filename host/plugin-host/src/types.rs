//! The values the facade takes and gives: a loaded [`Plugin`], a call's
//! input ([`PolicyInput`], [`CallContext`], [`ServiceInfo`]) and its
//! [`CallReport`].

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::world::PluginKind;
use crate::{Limits, PluginError, PluginHost, wit};

/// The plugins of a workspace with the sandbox they run in, loaded once.
pub struct PluginSet {
    /// The sandbox they run in.
    pub host: PluginHost,
    /// Every plugin of the plugin directory, in name order.
    pub plugins: Vec<Plugin>,
}

impl PluginSet {
    /// The plugins of one kind, in name order.
    pub fn of_kind(&self, kind: PluginKind) -> impl Iterator<Item = &Plugin> {
        self.plugins.iter().filter(move |p| p.kind == kind)
    }
}

/// Whether a plugin carries a signature from a trusted key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum SignatureStatus {
    /// No `<name>.wasm.sig`.
    Unsigned,
    /// Signed by a trusted key, over the manifest as it is now.
    Valid {
        /// The signing key's id.
        keyid: String,
        /// Who signed (recorded in, and covered by, the signature).
        signer: String,
        /// When, RFC 3339 UTC.
        signed_at: String,
        /// The signer's note, if any.
        note: Option<String>,
        /// What the workspace calls the signing key: the public key file
        /// `[trust] plugin_keys` lists, or the trust file's name for it;
        /// `None` when the keys were given without names.
        #[serde(skip_serializing_if = "Option::is_none")]
        key_name: Option<String>,
    },
    /// A signature is present but not accepted.
    Invalid {
        /// Why.
        reason: String,
    },
}

impl SignatureStatus {
    /// The signing key in words, for a valid signature: `key
    /// keys/security-team.ed25519.pub (033ba3f506958083)` when the key has
    /// a name here, else `key 033ba3f506958083`.
    pub fn key_text(&self) -> Option<String> {
        match self {
            SignatureStatus::Valid {
                keyid,
                key_name: Some(name),
                ..
            } => Some(format!("key {} ({keyid})", pde_core::term::Escaped(name))),
            SignatureStatus::Valid { keyid, .. } => Some(format!("key {keyid}")),
            _ => None,
        }
    }

    /// What is wrong with the signature, in words (`None`: valid by a
    /// trusted key): for the warning given where signatures are not
    /// required, so that a broken one is never silent.
    pub fn problem(&self) -> Option<String> {
        match self {
            SignatureStatus::Valid { .. } => None,
            SignatureStatus::Unsigned => Some("unsigned".to_string()),
            SignatureStatus::Invalid { reason } => Some(format!("signature INVALID: {reason}")),
        }
    }
}

/// A loaded, checked, pre-instantiated plugin. Cheap to clone.
#[derive(Clone, Serialize)]
pub struct Plugin {
    /// Name from the manifest (or the file stem without one).
    pub name: String,
    /// Its world.
    pub kind: PluginKind,
    /// Its own version from the manifest (`""` without one).
    pub version: String,
    /// Lowercase hex sha256 of the component.
    pub sha256: String,
    /// The `pde:plugin` version it was built against.
    pub wit_version: semver::Version,
    /// Its signature status against the trusted keys given at load.
    pub signature: SignatureStatus,
    /// Its `[settings]`, as JSON.
    pub settings: serde_json::Value,
    /// Effective per-call limits.
    pub limits: Limits,
    /// The component file.
    pub path: PathBuf,
    /// The manifest's description.
    pub description: String,
    /// True when the compiled component came from the on-disk cache.
    pub loaded_from_cache: bool,
    /// False when its manifest declares `uses_environment = false`: every
    /// call then gets the environment-neutral context, whatever the caller
    /// passes, so its result cannot depend on the environment.
    pub uses_environment: bool,
    /// True when its manifest declares `deny_attempts = true`: an attempt
    /// at a denied capability fails the call ([`PluginError::DeniedAttempt`])
    /// instead of only being reported. [`PluginHost::deny_attempts`] turns
    /// it on for every plugin.
    pub deny_attempts: bool,
    #[serde(skip)]
    pub(crate) prepared: Arc<wit::Prepared>,
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("version", &self.version)
            .field("sha256", &self.sha256)
            .field("wit_version", &self.wit_version)
            .field("signature", &self.signature)
            .field("limits", &self.limits)
            .field("path", &self.path)
            .field("loaded_from_cache", &self.loaded_from_cache)
            .field("uses_environment", &self.uses_environment)
            .field("deny_attempts", &self.deny_attempts)
            .finish_non_exhaustive()
    }
}

impl Plugin {
    /// True when this plugin's contract carries the active policy in its
    /// context (`pde:plugin@0.2.0` and later).
    pub fn sees_active_policy(&self) -> bool {
        wit::carries_active_policy(&self.wit_version)
    }

    /// Ok when the plugin carries a valid signature by a trusted key;
    /// [`PluginError::BadSignature`] otherwise (for `require_signed_plugins`).
    pub fn require_signature(&self) -> Result<(), PluginError> {
        match &self.signature {
            SignatureStatus::Valid { .. } => Ok(()),
            SignatureStatus::Unsigned => Err(PluginError::BadSignature {
                plugin: self.name.clone(),
                reason: format!(
                    "unsigned; the environment requires signed plugins (sign it with `pde plugin sign {} --key FILE`)",
                    self.path.display()
                ),
            }),
            SignatureStatus::Invalid { reason } => Err(PluginError::BadSignature {
                plugin: self.name.clone(),
                reason: reason.clone(),
            }),
        }
    }
}

/// The policy handed to a plugin.
#[derive(Debug, Clone)]
pub struct PolicyInput {
    /// Policy id.
    pub id: String,
    /// Policy version.
    pub version: String,
    /// The whole document.
    pub document: serde_json::Value,
}

/// Where a call happens; the plugin's settings come from the [`Plugin`].
/// The default is the environment-neutral context.
#[derive(Debug, Clone, Default)]
pub struct CallContext {
    /// Target environment, `""` when none.
    pub environment: String,
    /// The version of the policy active in `environment`, if any. Plugins
    /// built against `pde:plugin@0.2.0` or later are told it
    /// (`context.active`); older ones are not (see [`wit`]).
    pub active: Option<ActivePolicy>,
}

impl CallContext {
    /// A context for `environment` with nothing active there.
    pub fn env(environment: impl Into<String>) -> Self {
        CallContext {
            environment: environment.into(),
            active: None,
        }
    }
}

/// The version of a policy that is active in an environment: what a deploy
/// would replace. Read from the bundle that made it active, digest checked.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ActivePolicy {
    /// Its semver version.
    pub version: String,
    /// Its bundle digest, `sha256:<hex>`; `""` when it was given without a
    /// bundle (`pde plugin test --active` with a plain document).
    pub digest: String,
    /// When it became active, RFC 3339 UTC; `""` when unknown.
    pub deployed_at: String,
    /// The active policy document (not serialised: reports name the
    /// version and digest, the document is in the bundle).
    #[serde(skip_serializing)]
    pub document: serde_json::Value,
}

/// A service of the target environment, as a router sees it.
#[derive(Debug, Clone, Serialize)]
pub struct ServiceInfo {
    /// Unique name.
    pub name: String,
    /// Tags.
    pub tags: Vec<String>,
    /// Labels.
    pub labels: BTreeMap<String, String>,
}

/// A router's decision for one service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Route {
    /// A name from the services given.
    pub service: String,
    /// Why.
    pub reason: String,
}

/// A line a plugin logged at warning or error level (`host.log`): part of
/// what the step that ran it reports, in its output and its JSON, not a
/// log line of pde's own (issue 24). `tracing` still carries every line
/// for `-v`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct PluginNotice {
    /// The plugin that logged it.
    pub plugin: String,
    /// `warning` or `error`.
    pub level: String,
    /// What it said, without its level tag, nor its own name when it
    /// starts with it (plugins often prefix their lines with it). Raw: a
    /// printer escapes it.
    pub message: String,
}

impl PluginNotice {
    /// The warning and error lines of a call's `log`, for `plugin`.
    pub fn from_log(plugin: &str, log: &[String]) -> Vec<PluginNotice> {
        log.iter()
            .filter_map(|line| {
                let (tag, message) = line.split_once(": ")?;
                let level = match tag {
                    "warn" => "warning",
                    "error" => "error",
                    _ => return None,
                };
                let own = format!("{plugin}: ");
                Some(PluginNotice {
                    plugin: plugin.to_string(),
                    level: level.to_string(),
                    message: message.strip_prefix(&own).unwrap_or(message).to_string(),
                })
            })
            .collect()
    }
}

/// A call's value with what it cost.
#[derive(Debug, Clone, Serialize)]
pub struct CallReport<T> {
    /// What the plugin returned, checked and bounded.
    pub value: T,
    /// Fuel consumed.
    pub fuel_used: u64,
    /// Peak linear memory, bytes.
    pub peak_memory_bytes: u64,
    /// Wall time of instantiation plus the call.
    pub elapsed: Duration,
    /// `host.log` lines and stdout and stderr lines, in the order written.
    pub log: Vec<String>,
    /// Denied capabilities the plugin tried to use, each once, e.g.
    /// "tried wasi:sockets: create a TCP socket: denied".
    pub denied: Vec<String>,
}

/// What one range query returned, as a gate plugin is given it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct Samples {
    /// The query as sent, templated (`""` when the samples came from a file).
    #[serde(default)]
    pub query: String,
    /// Every series returned; empty means no data.
    #[serde(default)]
    pub series: Vec<Series>,
}

impl Samples {
    /// Every value of every series, series after series.
    pub fn values(&self) -> impl Iterator<Item = f64> + '_ {
        self.series
            .iter()
            .flat_map(|s| s.samples.iter().map(|&(_, v)| v))
    }

    /// How many points there are in all.
    pub fn len(&self) -> usize {
        self.series.iter().map(|s| s.samples.len()).sum()
    }

    /// True when no series holds a point.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One series of a range query.
#[derive(Debug, Clone, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct Series {
    /// Its labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Its points as `(unix seconds, value)`, oldest first.
    pub samples: Vec<(f64, f64)>,
}

/// What a gate plugin judges: one wave after its bake (`pde:plugin@0.3.0`,
/// world `gate`). The policy and context come with the call.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct GateInput {
    /// The gate's name in pde.toml.
    pub gate: String,
    /// The wave's name.
    pub wave: String,
    /// The wave's services.
    pub services: Vec<String>,
    /// The digest of the bundle rolled out, `sha256:<hex>`.
    pub digest: String,
    /// Start of the window queried, RFC 3339.
    pub start: String,
    /// End of the window queried, RFC 3339.
    pub end: String,
    /// The resolution asked for, in seconds.
    pub step_seconds: f64,
    /// The query's samples for the wave's services.
    pub wave_samples: Samples,
    /// The same for the routed services not pushed yet; `None` when none
    /// are left.
    pub baseline_samples: Option<Samples>,
}

/// A gate plugin's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GateVerdict {
    /// Healthy.
    Pass,
    /// Worse: the rollout stops.
    Fail,
    /// Cannot tell.
    Inconclusive,
}

/// A gate plugin's judgement, checked and bounded by the host.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Judgement {
    /// The verdict.
    pub verdict: GateVerdict,
    /// Why, in words.
    pub reason: String,
    /// Named numbers it computed, in its order.
    pub statistics: Vec<(String, f64)>,
}

/// A samples file for `pde plugin test` on a gate plugin (JSON):
/// `{"wave": [...], "baseline": [...], "policy": {...}}`, documented in
/// docs/plugin-authoring.md. Each list is plain values (`[0.1, 0.2]`),
/// `[unix seconds, value]` pairs, or series objects
/// (`{"labels": {...}, "samples": [[t, v], ...]}`).
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SamplesFile {
    /// The wave's samples.
    pub wave: SampleList,
    /// The baseline's; absent or `null` for "no baseline left".
    #[serde(default)]
    pub baseline: Option<SampleList>,
    /// The policy document to pass (absent: `pde plugin test --policy`, or
    /// a stand-in `{"id": "test", "version": "0.0.0"}`).
    #[serde(default)]
    pub policy: Option<serde_json::Value>,
    /// The bundle digest to pass (default `""`).
    #[serde(default)]
    pub digest: String,
    /// The wave's name (default `wave-1`).
    #[serde(default)]
    pub wave_name: Option<String>,
    /// The wave's services (default none).
    #[serde(default)]
    pub services: Vec<String>,
}

/// One list of a [`SamplesFile`].
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(untagged)]
pub enum SampleList {
    /// Plain values: one series, timestamps 0, 1, 2, ….
    Values(Vec<f64>),
    /// `[unix seconds, value]` pairs: one series.
    Points(Vec<(f64, f64)>),
    /// Whole series.
    Series(Vec<Series>),
}

impl From<SampleList> for Samples {
    fn from(list: SampleList) -> Samples {
        let series = match list {
            SampleList::Values(v) => vec![Series {
                labels: BTreeMap::new(),
                samples: v
                    .into_iter()
                    .enumerate()
                    .map(|(i, v)| (i as f64, v))
                    .collect(),
            }],
            SampleList::Points(p) => vec![Series {
                labels: BTreeMap::new(),
                samples: p,
            }],
            SampleList::Series(s) => s,
        };
        Samples {
            query: String::new(),
            series: series
                .into_iter()
                .filter(|s| !s.samples.is_empty())
                .collect(),
        }
    }
}

impl SamplesFile {
    /// The gate input it describes.
    pub fn input(&self) -> GateInput {
        GateInput {
            gate: "test".into(),
            wave: self.wave_name.clone().unwrap_or_else(|| "wave-1".into()),
            services: self.services.clone(),
            digest: self.digest.clone(),
            start: String::new(),
            end: String::new(),
            step_seconds: 0.0,
            wave_samples: self.wave.clone().into(),
            baseline_samples: self.baseline.clone().map(Samples::from),
        }
    }
}
