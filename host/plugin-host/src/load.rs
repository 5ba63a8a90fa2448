//! Loading: the one rule for what is acceptable ([`PluginHost::admit`]),
//! from the manifest to a component pre-instantiated as its world.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use wasmtime::component::Component;

use crate::host::{precheck, read, sha256_hex};
use crate::world::{self, PluginKind};
use crate::{
    Limits, Plugin, PluginError, PluginHost, SignatureStatus, cache, discovery, inspect, manifest,
    signature, wit,
};
use pde_core::keys::TrustedKeys;

impl PluginHost {
    /// Discovers, checks and loads every plugin of `dir`, sorted by name.
    pub fn load_dir(&self, dir: &Path, trusted: &TrustedKeys) -> Result<Vec<Plugin>, PluginError> {
        discovery::discover(dir)?
            .into_iter()
            .map(|found| self.load_found(&found, trusted))
            .collect()
    }

    /// Loads one `.wasm`; uses the manifest beside it when there is one,
    /// otherwise infers the kind from its exports (for `pde plugin test`).
    /// The same as [`PluginHost::admit`].
    pub fn load_file(&self, wasm: &Path, trusted: &TrustedKeys) -> Result<Plugin, PluginError> {
        self.admit(wasm, trusted)
    }

    /// The one rule for what is acceptable: loads the plugin at `wasm`
    /// with every check pde applies before it runs a plugin, and refuses
    /// what any of them refuses, with that check's error (and so its exit
    /// code). `pde validate` and `deploy` load through it ([`Self::load_dir`]),
    /// and `pde plugin sign`, `verify` and `inspect` ask it, so a reviewer
    /// is never told "valid" about a plugin pde will not run.
    ///
    /// With the manifest beside it: the manifest (kind, `[limits]` only
    /// tightening this host's, exit 2), the pinned sha256 (exit 6), then the
    /// component (a component, one supported `pde:plugin` version, the
    /// world its manifest declares, exactly that world's exports, every
    /// import linkable; exit 5). Without one, the kind is read from its
    /// exports. The signature status is recorded, not judged: whether it
    /// must be valid depends on the environment
    /// ([`Plugin::require_signature`]).
    pub fn admit(&self, wasm: &Path, trusted: &TrustedKeys) -> Result<Plugin, PluginError> {
        let manifest_path = wasm.with_extension("toml");
        if manifest_path.is_file() {
            let manifest = manifest::Manifest::load(&manifest_path)?;
            return self.load_found(
                &discovery::Found {
                    wasm: wasm.to_path_buf(),
                    manifest_path,
                    manifest,
                },
                trusted,
            );
        }
        let name = wasm
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("plugin")
            .to_string();
        let cache::FileDigest { sha256, bytes } = self.file_digest(wasm)?;
        let signature = signature::status(wasm, None, &sha256, trusted);
        self.finish(LoadSpec {
            name,
            kind: None,
            version: String::new(),
            description: String::new(),
            settings: serde_json::json!({}),
            uses_environment: true,
            deny_attempts: false,
            limits: self.limits,
            path: wasm.to_path_buf(),
            bytes,
            sha256,
            signature,
        })
    }

    /// Loads the plugin at `wasm` under the manifest at `manifest_path`,
    /// which need not sit beside it: an author's project keeps `NAME.toml`
    /// at its root and the build in `target/` (`pde plugin test
    /// --manifest`). Every check of [`PluginHost::admit`] applies, except
    /// that an empty `sha256` (the scaffold's placeholder: nothing is
    /// pinned before the first build) is taken from the file for this load;
    /// the flag says so. A non-empty one must match, as always.
    pub fn admit_with_manifest(
        &self,
        wasm: &Path,
        manifest_path: &Path,
        trusted: &TrustedKeys,
    ) -> Result<(Plugin, bool), PluginError> {
        let text = std::fs::read_to_string(manifest_path).map_err(|source| PluginError::Io {
            path: manifest_path.to_path_buf(),
            source,
        })?;
        let mut table: toml::Table =
            toml::from_str(&text).map_err(|e| PluginError::BadManifest {
                path: manifest_path.to_path_buf(),
                message: e.to_string(),
            })?;
        let unpinned = table
            .get("sha256")
            .and_then(|v| v.as_str())
            .is_some_and(str::is_empty);
        if unpinned {
            let digest = self.file_digest(wasm)?.sha256;
            table.insert("sha256".into(), toml::Value::String(digest));
        }
        let text = toml::to_string(&table).map_err(|e| PluginError::BadManifest {
            path: manifest_path.to_path_buf(),
            message: e.to_string(),
        })?;
        let manifest = manifest::Manifest::parse(&text, manifest_path)?;
        let found = discovery::Found {
            wasm: wasm.to_path_buf(),
            manifest_path: manifest_path.to_path_buf(),
            manifest,
        };
        Ok((self.load_found(&found, trusted)?, unpinned))
    }

    pub(crate) fn load_found(
        &self,
        found: &discovery::Found,
        trusted: &TrustedKeys,
    ) -> Result<Plugin, PluginError> {
        let m = &found.manifest;
        let kind = m.kind(&found.manifest_path)?;
        let limits = m.effective_limits(&self.limits, &found.manifest_path)?;
        let cache::FileDigest { sha256, bytes } = self.file_digest(&found.wasm)?;
        if sha256 != m.sha256 {
            return Err(PluginError::DigestMismatch {
                plugin: m.name.clone(),
                path: found.wasm.clone(),
                expected: m.sha256.clone(),
                actual: sha256,
            });
        }
        let signature = signature::status(&found.wasm, Some(m), &sha256, trusted);
        self.finish(LoadSpec {
            name: m.name.clone(),
            kind: Some(kind),
            version: m.version.clone(),
            description: m.description.clone(),
            settings: m.settings_json(),
            uses_environment: m.uses_environment,
            deny_attempts: m.deny_attempts,
            limits,
            path: found.wasm.clone(),
            bytes,
            sha256,
            signature,
        })
    }

    /// The sha256 of a plugin file, through the cache's digest index.
    fn file_digest(&self, path: &Path) -> Result<cache::FileDigest, PluginError> {
        self.cache
            .file_digest(path)
            .map_err(|source| PluginError::Io {
                path: path.to_path_buf(),
                source,
            })
    }

    /// The compiled component of `spec`: from the cache, else compiled from
    /// its bytes (read now when the digest index vouched for the file, and
    /// refused unless they still have the digest that was checked).
    fn component(&self, name: &str, spec: &LoadSpec) -> Result<(Component, bool), PluginError> {
        if let Some(bytes) = &spec.bytes {
            precheck(name, bytes)?;
        }
        if let Some(component) = self.cache.lookup(&self.engine, name, &spec.sha256) {
            return Ok((component, true));
        }
        let read_now;
        let bytes = match &spec.bytes {
            Some(bytes) => bytes,
            None => {
                read_now = read(&spec.path)?;
                let actual = sha256_hex(&read_now);
                if actual != spec.sha256 {
                    return Err(PluginError::DigestMismatch {
                        plugin: name.to_string(),
                        path: spec.path.clone(),
                        expected: spec.sha256.clone(),
                        actual,
                    });
                }
                precheck(name, &read_now)?;
                &read_now
            }
        };
        let component = self
            .cache
            .compile(&self.engine, name, &spec.sha256, bytes)?;
        Ok((component, false))
    }

    fn finish(&self, spec: LoadSpec) -> Result<Plugin, PluginError> {
        let (component, loaded_from_cache) = self.component(&spec.name, &spec)?;
        let name = spec.name;
        let (imports, exports) = inspect::world(&self.engine, &component);
        let versions = wit::versions_named(imports.iter().chain(&exports).map(String::as_str));
        let wit_version = match versions.as_slice() {
            [] => wit::latest::MIN_VERSION.clone(),
            [one] => one.clone(),
            many => {
                return Err(PluginError::BadComponent {
                    plugin: name,
                    message: format!(
                        "it mixes pde:plugin versions {}; build it against one wit/ version",
                        many.iter()
                            .map(|v| v.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                });
            }
        };
        let exported = world::kind_from_exports(&exports);
        let kind = match (spec.kind, exported) {
            (Some(declared), Some(actual)) if declared != actual => {
                return Err(PluginError::WrongWorld {
                    plugin: name.clone(),
                    expected: declared,
                    found: format!("it is a {actual} (it exports `{}`)", actual.world().export),
                    hint: format!(
                        "set kind = \"{actual}\" in {name}.toml, or rebuild it with the {declared} world"
                    ),
                });
            }
            (Some(k), Some(_)) | (None, Some(k)) => k,
            (declared, None) => {
                return Err(PluginError::WrongWorld {
                    plugin: name.clone(),
                    expected: declared.unwrap_or(world::WORLDS[0].kind),
                    found: format!(
                        "it exports {} (exports: {})",
                        world::no_export_in_words(),
                        if exports.is_empty() {
                            "none".to_string()
                        } else {
                            exports.join(", ")
                        }
                    ),
                    hint: format!(
                        "implement world {} of wit/v{}/plugin.wit (see docs/plugin-authoring.md)",
                        world::names_in_words(),
                        wit::latest::MIN_VERSION
                    ),
                });
            }
        };
        // A plugin exports exactly its world (see `inspect::TOLERATED_EXPORTS`).
        let (_, unexpected) = inspect::extra_exports(Some(kind), &exports);
        if !unexpected.is_empty() {
            return Err(PluginError::WrongWorld {
                plugin: name.clone(),
                expected: kind,
                found: format!(
                    "it also exports {}, which world {kind} does not have",
                    unexpected
                        .iter()
                        .map(|e| format!("`{e}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                hint: format!(
                    "a plugin exports exactly `{}` (only componentize-py's `exports` runtime interface is tolerated); remove the other exports (see docs/plugin-authoring.md)",
                    kind.world().export
                ),
            });
        }
        let prepared = wit::prepare(&self.linkers, &component, &name, &wit_version, kind)?;
        tracing::debug!(plugin = name.as_str(), %kind, %wit_version, loaded_from_cache, "plugin loaded");
        Ok(Plugin {
            name,
            kind,
            version: spec.version,
            sha256: spec.sha256,
            wit_version,
            signature: spec.signature,
            settings: spec.settings,
            limits: spec.limits,
            path: spec.path,
            description: spec.description,
            loaded_from_cache,
            uses_environment: spec.uses_environment,
            deny_attempts: spec.deny_attempts,
            prepared: Arc::new(prepared),
        })
    }
}

struct LoadSpec {
    name: String,
    kind: Option<PluginKind>,
    version: String,
    description: String,
    settings: serde_json::Value,
    uses_environment: bool,
    deny_attempts: bool,
    limits: Limits,
    path: PathBuf,
    /// The file's bytes, when they were read for its digest (not when the
    /// digest index vouched for it).
    bytes: Option<Vec<u8>>,
    sha256: String,
    signature: SignatureStatus,
}
