//! Where and why the plugin is being called.
//!
//! Settings arrive as JSON text (the manifest's `[settings]` table); the SDK
//! parses them once and lets plugins read them either loosely as a
//! [`Value`] or strictly into their own `serde` type, so a typo in a
//! manifest can be turned into a clear error instead of a silent default.
//!
//! The context also carries the version of the policy active in the target
//! environment, when there is one ([`Context::active`], `pde:plugin@0.2.0`).

use std::sync::OnceLock;

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::active::ActivePolicy;
use crate::policy::Policy;

/// The call's context: target environment, this plugin's settings, and the
/// version of the policy active in that environment.
#[derive(Debug, Clone)]
pub struct Context {
    environment: String,
    settings: Value,
    active: Option<ActiveSlot>,
}

/// The active version as the host passed it, parsed on first use: a plugin
/// that never calls [`Context::active`] does not pay for parsing a second
/// policy document (which roughly doubled a small check's fuel).
#[derive(Debug, Clone)]
struct ActiveSlot {
    raw: Option<RawActive>,
    parsed: OnceLock<Option<ActivePolicy>>,
}

/// `context.active` of the WIT, unparsed.
#[derive(Debug, Clone)]
pub(crate) struct RawActive {
    pub(crate) policy_id: String,
    pub(crate) version: String,
    pub(crate) digest: String,
    pub(crate) deployed_at: String,
    pub(crate) document: String,
}

impl ActiveSlot {
    fn get(&self) -> Option<&ActivePolicy> {
        self.parsed
            .get_or_init(|| {
                let raw = self.raw.as_ref()?;
                match Policy::from_json(&raw.policy_id, &raw.version, &raw.document) {
                    Ok(policy) => Some(ActivePolicy::new(
                        policy,
                        raw.digest.clone(),
                        raw.deployed_at.clone(),
                    )),
                    // The host sends a JSON object; anything else is its bug.
                    Err(e) => {
                        crate::log(crate::Level::Error, &format!("the active policy: {e}"));
                        None
                    }
                }
            })
            .as_ref()
    }
}

impl PartialEq for Context {
    fn eq(&self, other: &Self) -> bool {
        self.environment == other.environment
            && self.settings == other.settings
            && self.active() == other.active()
    }
}

impl Default for Context {
    fn default() -> Self {
        Context {
            environment: String::new(),
            settings: Value::Object(Default::default()),
            active: None,
        }
    }
}

impl Context {
    /// Builds a context from parsed settings, with nothing active (use in
    /// unit tests; add an active version with [`Context::with_active`]).
    pub fn new(environment: impl Into<String>, settings: Value) -> Self {
        Context {
            environment: environment.into(),
            settings,
            active: None,
        }
    }

    /// This context with `active` as the version active in the environment.
    pub fn with_active(mut self, active: ActivePolicy) -> Self {
        self.active = Some(ActiveSlot {
            raw: None,
            parsed: OnceLock::from(Some(active)),
        });
        self
    }

    /// This context with the active version as the host passed it, parsed
    /// when first asked for.
    pub(crate) fn with_raw_active(mut self, raw: RawActive) -> Self {
        self.active = Some(ActiveSlot {
            raw: Some(raw),
            parsed: OnceLock::new(),
        });
        self
    }

    /// Parses the settings JSON the host passed; an empty string means `{}`.
    pub fn from_json(environment: impl Into<String>, settings: &str) -> Result<Self, String> {
        let settings = if settings.trim().is_empty() {
            Value::Object(Default::default())
        } else {
            serde_json::from_str(settings)
                .map_err(|e| format!("the plugin settings from the host are not valid JSON: {e}"))?
        };
        Ok(Context::new(environment, settings))
    }

    /// The target environment, e.g. `"production"`; empty for
    /// `pde validate` without `--env` and for `pde plugin test`.
    pub fn environment(&self) -> &str {
        &self.environment
    }

    /// The version of this policy active in the target environment: what
    /// the policy being validated (or routed) would replace.
    ///
    /// `None` on a first deploy (nothing active there yet), without an
    /// environment, and in the environment-neutral run pde records in the
    /// bundle. So a check of the change blocks a deploy without entering the
    /// bundle, and a plugin must not read `None` as "no change": it means
    /// there is nothing to compare with.
    pub fn active(&self) -> Option<&ActivePolicy> {
        self.active.as_ref().and_then(ActiveSlot::get)
    }

    /// The plugin's `[settings]` table as JSON (an object, possibly empty).
    pub fn settings(&self) -> &Value {
        &self.settings
    }

    /// One setting by top-level key, if present.
    pub fn setting(&self, key: &str) -> Option<&Value> {
        self.settings.get(key)
    }

    /// Deserializes the whole settings table into `T`.
    ///
    /// The error names the problem, ready to return from `validate`/`route`.
    /// Put `#[serde(deny_unknown_fields)]` on `T` to reject typos.
    pub fn settings_as<T: DeserializeOwned>(&self) -> Result<T, String> {
        T::deserialize(&self.settings).map_err(|e| format!("invalid plugin [settings]: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use serde_json::json;

    #[derive(Deserialize, Debug, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct S {
        max: u32,
    }

    #[test]
    fn settings_parse_typed_and_reject_typos() {
        let c = Context::from_json("staging", r#"{"max": 3}"#).unwrap();
        assert_eq!(c.environment(), "staging");
        assert_eq!(c.setting("max"), Some(&json!(3)));
        assert_eq!(c.settings_as::<S>().unwrap(), S { max: 3 });
        let bad = Context::new("", json!({"maks": 3}));
        let err = bad.settings_as::<S>().unwrap_err();
        assert!(err.contains("maks"), "{err}");
    }

    #[test]
    fn active_is_none_unless_given() {
        let c = Context::new("prod", json!({}));
        assert!(c.active().is_none());
        let c = c.with_active(ActivePolicy::from_value(json!({"version": "1.0.0"})));
        assert_eq!(c.active().map(ActivePolicy::version), Some("1.0.0"));
        assert!(Context::default().active().is_none());
    }

    #[test]
    fn an_active_version_from_the_host_is_parsed_when_first_asked_for() {
        let raw = |document: &str| RawActive {
            policy_id: "42".into(),
            version: "1.0.0".into(),
            digest: "sha256:ab".into(),
            deployed_at: "2031-01-01T00:00:00Z".into(),
            document: document.into(),
        };
        let c = Context::new("prod", json!({}))
            .with_raw_active(raw(r#"{"rules": [{"key": "k", "value": 1}]}"#));
        let a = c.active().expect("parsed");
        assert_eq!((a.version(), a.digest()), ("1.0.0", "sha256:ab"));
        assert_eq!(a.policy().id(), "42");
        assert_eq!(a.policy().rule("k").and_then(|r| r.number()), Some(1.0));
        assert!(std::ptr::eq(a, c.active().unwrap()), "parsed once");
        let same = Context::new("prod", json!({})).with_active(a.clone());
        assert_eq!(c, same);
        // A document that is not a JSON object is the host's bug: none, logged.
        crate::take_native_logs();
        let broken = Context::new("prod", json!({})).with_raw_active(raw("[1]"));
        assert!(broken.active().is_none());
        assert_eq!(crate::take_native_logs().len(), 1);
    }

    #[test]
    fn empty_settings_mean_empty_object() {
        let c = Context::from_json("", "").unwrap();
        assert_eq!(c.settings(), &json!({}));
        assert!(Context::from_json("", "{").is_err());
    }
}
