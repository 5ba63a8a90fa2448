//! Where and why the plugin is being called.
//!
//! Settings arrive as JSON text (the manifest's `[settings]` table); the SDK
//! parses them once and lets plugins read them either loosely as a
//! [`Value`] or strictly into their own `serde` type, so a typo in a
//! manifest can be turned into a clear error instead of a silent default.

use serde::de::DeserializeOwned;
use serde_json::Value;

/// The call's context: target environment and this plugin's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Context {
    environment: String,
    settings: Value,
}

impl Default for Context {
    fn default() -> Self {
        Context {
            environment: String::new(),
            settings: Value::Object(Default::default()),
        }
    }
}

impl Context {
    /// Builds a context from parsed settings (use in unit tests).
    pub fn new(environment: impl Into<String>, settings: Value) -> Self {
        Context {
            environment: environment.into(),
            settings,
        }
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
    fn empty_settings_mean_empty_object() {
        let c = Context::from_json("", "").unwrap();
        assert_eq!(c.settings(), &json!({}));
        assert!(Context::from_json("", "{").is_err());
    }
}
