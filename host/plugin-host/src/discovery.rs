//! Finding plugins: `<name>.wasm` + `<name>.toml` (+ `<name>.wasm.sig`).
//!
//! Every mismatch is an error rather than a skip: a component without a
//! manifest would run with no pinned digest, and a manifest without a
//! component means the operator believes a check runs that does not.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::PluginError;
use super::manifest::Manifest;

/// A plugin found on disk, manifest parsed, nothing loaded yet.
#[derive(Debug, Clone)]
pub struct Found {
    /// The component file.
    pub wasm: PathBuf,
    /// The manifest file.
    pub manifest_path: PathBuf,
    /// The parsed manifest.
    pub manifest: Manifest,
}

/// Lists the plugins of `dir`, sorted by name. A missing directory has none.
pub fn discover(dir: &Path) -> Result<Vec<Found>, PluginError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(PluginError::Io {
                path: dir.to_path_buf(),
                source,
            });
        }
    };
    let mut wasm: BTreeMap<String, PathBuf> = BTreeMap::new();
    let mut toml: BTreeMap<String, PathBuf> = BTreeMap::new();
    for entry in entries {
        let entry = entry.map_err(|source| PluginError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let path = entry.path();
        if !path.is_file() {
            continue;
        }
        let (Some(stem), Some(ext)) = (
            path.file_stem().and_then(|s| s.to_str()),
            path.extension().and_then(|s| s.to_str()),
        ) else {
            continue;
        };
        match ext {
            "wasm" => {
                wasm.insert(stem.to_string(), path.clone());
            }
            "toml" => {
                toml.insert(stem.to_string(), path.clone());
            }
            _ => {}
        }
    }
    for (stem, path) in &wasm {
        if !toml.contains_key(stem) {
            return Err(PluginError::MissingManifest {
                wasm: path.clone(),
                expected: dir.join(format!("{stem}.toml")),
            });
        }
    }
    let mut found: Vec<Found> = Vec::new();
    let mut by_name: BTreeMap<String, PathBuf> = BTreeMap::new();
    for (stem, manifest_path) in toml {
        let Some(wasm_path) = wasm.get(&stem) else {
            return Err(PluginError::OrphanManifest {
                expected: dir.join(format!("{stem}.wasm")),
                manifest: manifest_path,
            });
        };
        let manifest = Manifest::load(&manifest_path)?;
        if let Some(first) = by_name.insert(manifest.name.clone(), manifest_path.clone()) {
            return Err(PluginError::DuplicateName {
                name: manifest.name,
                first,
                second: manifest_path,
            });
        }
        found.push(Found {
            wasm: wasm_path.clone(),
            manifest_path,
            manifest,
        });
    }
    found.sort_by(|a, b| a.manifest.name.cmp(&b.manifest.name));
    Ok(found)
}
