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

/// Where a build's manifest was looked for in its project
/// ([`project_manifest`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProjectManifest {
    /// Exactly one manifest names this build.
    Found(PathBuf),
    /// Several do; none is picked.
    Ambiguous(Vec<PathBuf>),
    /// None does.
    None,
}

/// How far up from a build a project's root is looked for:
/// `target/wasm32-wasip2/release/x.wasm` is three levels below it.
const PROJECT_DEPTH: usize = 4;

/// The manifest of the project `wasm` was built in, when it is not beside
/// the build: `pde plugin new` writes `NAME.toml` at the project root, and
/// the build lands in `target/wasm32-wasip2/release/NAME_WITH_UNDERSCORES.wasm`
/// (Rust) or `build/NAME.wasm` (Python). Each directory above the build,
/// up to the project root (the first holding `Cargo.toml`, or four levels
/// up), is searched for a `*.toml` that parses as a manifest (a `name` and
/// a `kind`) whose name, with `-` read as `_`, is the build's file stem. The
/// nearest directory with a match decides; two matches there are
/// [`ProjectManifest::Ambiguous`]: guessing would test the build under the
/// wrong settings.
pub fn project_manifest(wasm: &Path) -> ProjectManifest {
    let Some(stem) = wasm.file_stem().and_then(|s| s.to_str()) else {
        return ProjectManifest::None;
    };
    let stem = stem.replace('-', "_");
    let start = std::path::absolute(wasm).unwrap_or_else(|_| wasm.to_path_buf());
    for dir in start.ancestors().skip(1).take(PROJECT_DEPTH) {
        let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "toml") && p.is_file())
            .filter(|p| names_build(p, &stem))
            .collect();
        found.sort();
        match found.len() {
            0 => {}
            1 => return ProjectManifest::Found(found.remove(0)),
            _ => return ProjectManifest::Ambiguous(found),
        }
        if dir.join("Cargo.toml").is_file() {
            break;
        }
    }
    ProjectManifest::None
}

/// Whether the TOML file at `path` is a plugin manifest named `stem`.
fn names_build(path: &Path, stem: &str) -> bool {
    let Ok(text) = std::fs::read_to_string(path) else {
        return false;
    };
    let Ok(table) = toml::from_str::<toml::Table>(&text) else {
        return false;
    };
    table.contains_key("kind")
        && table
            .get("name")
            .and_then(|n| n.as_str())
            .is_some_and(|n| n.replace('-', "_") == stem)
}
