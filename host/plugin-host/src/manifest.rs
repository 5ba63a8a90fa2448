//! `<name>.toml`: the manifest that ships beside every plugin (DESIGN §8).
//!
//! The manifest is its own serde type with `deny_unknown_fields` (as Extism
//! does), so a typo such as `timout_ms` is an error rather than a silently
//! looser sandbox. Its `[limits]` may only tighten the workspace's: a plugin
//! author cannot grant their own plugin more CPU, memory or time than the
//! operator allows, and trying to is reported, not clamped, so nobody believes
//! a limit is in force when it is not.

use std::path::Path;

use serde::Deserialize;

use super::{PluginError, PluginKind};
use crate::limits::Limits;

/// The parsed manifest of one plugin.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The plugin's name, unique within the plugin directory.
    pub name: String,
    /// A world's name (`validator`, `router`), checked by [`Manifest::kind`].
    kind: String,
    /// The plugin's own version (free text, usually semver).
    pub version: String,
    /// Lowercase hex sha256 of the `.wasm` file.
    pub sha256: String,
    /// What the plugin checks or decides, for people.
    #[serde(default)]
    pub description: String,
    /// Optional tighter limits for this plugin.
    #[serde(default)]
    pub limits: ManifestLimits,
    /// Settings handed to the plugin in its call context.
    #[serde(default)]
    pub settings: Option<toml::Table>,
    /// `false` declares that the plugin's result does not depend on the
    /// target environment. The host then never hands it one (its context's
    /// environment is always `""`), so a validator's environment-neutral
    /// run and its run for an environment are the same call and run once.
    #[serde(default = "yes")]
    pub uses_environment: bool,
    /// `true` makes an attempt at a denied capability (a file, a socket,
    /// the environment) fail the call as a plugin fault, instead of only
    /// being reported (`tried …: denied`). For plugins a reviewer has
    /// decided must never even try.
    #[serde(default)]
    pub deny_attempts: bool,
}

fn yes() -> bool {
    true
}

/// `[limits]` of a manifest: each field optional, each at most the global value.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestLimits {
    /// Fuel per call.
    pub fuel: Option<u64>,
    /// Memory per call, MiB.
    pub memory_mib: Option<u64>,
    /// Wall time per call, ms.
    pub timeout_ms: Option<u64>,
}

impl Manifest {
    /// Reads and parses a manifest file.
    pub fn load(path: &Path) -> Result<Manifest, PluginError> {
        let text = std::fs::read_to_string(path).map_err(|source| PluginError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses manifest text; `path` is used in messages only.
    pub fn parse(text: &str, path: &Path) -> Result<Manifest, PluginError> {
        let manifest: Manifest = toml::from_str(text).map_err(|e| PluginError::BadManifest {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        if manifest.name.is_empty()
            || !manifest
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(PluginError::BadManifest {
                path: path.to_path_buf(),
                message: format!(
                    "name {:?} must be non-empty ASCII letters, digits, '-' or '_'",
                    manifest.name
                ),
            });
        }
        let hex_ok = manifest.sha256.len() == 64
            && manifest
                .sha256
                .chars()
                .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c));
        if !hex_ok {
            return Err(PluginError::BadManifest {
                path: path.to_path_buf(),
                message: format!(
                    "sha256 {:?} must be 64 lowercase hex digits (run `sha256sum {}.wasm`)",
                    manifest.sha256, manifest.name
                ),
            });
        }
        manifest.kind(path)?;
        Ok(manifest)
    }

    /// The declared kind, or [`PluginError::UnknownKind`].
    pub fn kind(&self, path: &Path) -> Result<PluginKind, PluginError> {
        PluginKind::from_name(&self.kind).ok_or_else(|| PluginError::UnknownKind {
            path: path.to_path_buf(),
            kind: self.kind.clone(),
        })
    }

    /// The settings as JSON (`{}` when the manifest has none).
    pub fn settings_json(&self) -> serde_json::Value {
        match &self.settings {
            Some(table) => serde_json::to_value(table).unwrap_or_else(|_| serde_json::json!({})),
            None => serde_json::json!({}),
        }
    }

    /// What a plugin signature covers: name, kind, version, the pinned
    /// sha256 of the `.wasm`, the manifest's own `[limits]` and its
    /// `[settings]`, `uses_environment` when it is `false` and
    /// `deny_attempts` when it is `true`, as one JSON
    /// value (signed as canonical JSON). The description is left out: it is
    /// prose, and changes nothing at run time. `uses_environment = false` is
    /// covered because it withholds the environment from the plugin; it is
    /// left out when absent so signatures made before it existed still hold.
    pub fn signed_fields(&self) -> serde_json::Value {
        let mut limits = serde_json::Map::new();
        for (field, value) in [
            ("fuel", self.limits.fuel),
            ("memory_mib", self.limits.memory_mib),
            ("timeout_ms", self.limits.timeout_ms),
        ] {
            if let Some(v) = value {
                limits.insert(field.to_string(), v.into());
            }
        }
        let mut fields = serde_json::json!({
            "name": self.name,
            "kind": self.kind,
            "version": self.version,
            "sha256": self.sha256,
            "limits": limits,
            "settings": self.settings_json(),
        });
        if !self.uses_environment {
            fields["uses_environment"] = false.into();
        }
        // Covered when set, so dropping it after a review breaks the
        // signature; left out when absent, so older signatures still hold.
        if self.deny_attempts {
            fields["deny_attempts"] = true.into();
        }
        fields
    }

    /// Each manifest limit with the workspace value it is held against:
    /// `(field, manifest value, workspace value)`.
    fn limit_pairs(&self, global: &Limits) -> [(&'static str, Option<u64>, u64); 3] {
        [
            ("fuel", self.limits.fuel, global.fuel),
            ("memory_mib", self.limits.memory_mib, global.memory_mib),
            ("timeout_ms", self.limits.timeout_ms, global.timeout_ms),
        ]
    }

    /// The manifest limits above the workspace's, as `(field, manifest
    /// value, workspace value)`: what [`Manifest::effective_limits`] refuses,
    /// listed in full so that `pde plugin inspect` can label each one.
    pub fn loosened_limits(&self, global: &Limits) -> Vec<(&'static str, u64, u64)> {
        self.limit_pairs(global)
            .into_iter()
            .filter_map(|(field, asked, allowed)| {
                asked.filter(|&v| v > allowed).map(|v| (field, v, allowed))
            })
            .collect()
    }

    /// The limits in force for this plugin: the global ones, tightened by the
    /// manifest. A manifest value above the global one is an error.
    pub fn effective_limits(&self, global: &Limits, path: &Path) -> Result<Limits, PluginError> {
        if let Some(&(field, asked, allowed)) = self.loosened_limits(global).first() {
            return Err(PluginError::LimitLoosened {
                path: path.to_path_buf(),
                field,
                asked,
                allowed,
            });
        }
        let [fuel, memory_mib, timeout_ms] =
            self.limit_pairs(global)
                .map(|(field, asked, global)| match asked {
                    None => Ok(global),
                    Some(0) => Err(PluginError::BadManifest {
                        path: path.to_path_buf(),
                        message: format!("[limits] {field} must be greater than zero"),
                    }),
                    Some(v) => Ok(v),
                });
        Ok(Limits {
            fuel: fuel?,
            memory_mib: memory_mib?,
            timeout_ms: timeout_ms?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn text(extra: &str) -> String {
        format!(
            "name = \"x\"\nkind = \"validator\"\nversion = \"1.0.0\"\nsha256 = \"{HEX}\"\n{extra}"
        )
    }

    #[test]
    fn typo_is_an_error() {
        let err = Manifest::parse(&text("descripton = \"oops\""), Path::new("x.toml")).unwrap_err();
        assert!(matches!(err, PluginError::BadManifest { .. }), "{err}");
        assert!(err.to_string().contains("descripton"), "{err}");
    }

    #[test]
    fn limits_only_tighten() {
        let global = Limits::default();
        let m = Manifest::parse(&text("[limits]\nfuel = 1000"), Path::new("x.toml")).unwrap();
        let eff = m.effective_limits(&global, Path::new("x.toml")).unwrap();
        assert_eq!(eff.fuel, 1000);
        assert_eq!(eff.memory_mib, global.memory_mib);
        let m = Manifest::parse(&text("[limits]\nmemory_mib = 4096"), Path::new("x.toml")).unwrap();
        let err = m
            .effective_limits(&global, Path::new("x.toml"))
            .unwrap_err();
        assert!(
            matches!(
                err,
                PluginError::LimitLoosened {
                    field: "memory_mib",
                    asked: 4096,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn ignoring_the_environment_is_declared_and_signed() {
        let plain = Manifest::parse(&text(""), Path::new("x.toml")).unwrap();
        assert!(plain.uses_environment);
        assert!(plain.signed_fields().get("uses_environment").is_none());
        let m = Manifest::parse(&text("uses_environment = false"), Path::new("x.toml")).unwrap();
        assert!(!m.uses_environment);
        assert_eq!(m.signed_fields()["uses_environment"], false);
    }

    #[test]
    fn deny_attempts_is_declared_and_signed() {
        let plain = Manifest::parse(&text(""), Path::new("x.toml")).unwrap();
        assert!(!plain.deny_attempts);
        assert!(plain.signed_fields().get("deny_attempts").is_none());
        let m = Manifest::parse(&text("deny_attempts = true"), Path::new("x.toml")).unwrap();
        assert!(m.deny_attempts);
        assert_eq!(m.signed_fields()["deny_attempts"], true);
    }

    #[test]
    fn every_loosened_limit_is_listed() {
        let global = Limits::default();
        let m = Manifest::parse(
            &text("[limits]\nfuel = 9000000000\nmemory_mib = 8\ntimeout_ms = 9000"),
            Path::new("x.toml"),
        )
        .unwrap();
        assert_eq!(
            m.loosened_limits(&global),
            vec![
                ("fuel", 9_000_000_000, global.fuel),
                ("timeout_ms", 9000, global.timeout_ms)
            ]
        );
    }

    #[test]
    fn settings_become_json() {
        let m = Manifest::parse(&text("[settings]\nmax_age = 120"), Path::new("x.toml")).unwrap();
        assert_eq!(m.settings_json(), serde_json::json!({"max_age": 120}));
    }
}
