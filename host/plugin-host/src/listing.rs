//! `pde plugin list`: what can be said of a plugin directory without
//! compiling anything.

use std::path::Path;

use serde::Serialize;

use crate::host::{precheck, read, sha256_hex};
use crate::inspect::{Capability, capability};
use crate::world::PluginKind;
use crate::{Limits, PluginError, SignatureStatus, discovery, signature, wit};
use pde_core::keys::TrustedKeys;

/// What `pde plugin list` shows of a plugin: everything checked before a
/// load compiles anything (manifest, pinned digest, signature), and the
/// `pde:plugin` version read from the component's import names.
#[derive(Debug, Clone, Serialize)]
pub struct Listing {
    /// Name from the manifest.
    pub name: String,
    /// Its declared world.
    pub kind: PluginKind,
    /// Its own version from the manifest.
    pub version: String,
    /// Lowercase hex sha256 of the component (equal to the pinned one).
    pub sha256: String,
    /// The `pde:plugin` version its imports and exports name.
    pub wit_version: semver::Version,
    /// Its signature status against the trusted keys given.
    pub signature: SignatureStatus,
    /// The manifest's description.
    pub description: String,
    /// Every interface the component imports and what the host does with
    /// it (granted, or denied and why), as `pde plugin inspect` says it;
    /// read from the component's import names, nothing compiled.
    pub imports: Vec<Capability>,
}

/// Lists the plugins of `dir`, sorted by name, without compiling or
/// instantiating any: the manifest, limit, digest and signature checks of a
/// load, and the WIT version from the component's own import and export
/// names. Whether a plugin links and has the world it declares is only
/// known when it is loaded (`pde plugin verify`, `pde validate`).
pub fn list_dir(
    dir: &Path,
    limits: &Limits,
    trusted: &TrustedKeys,
) -> Result<Vec<Listing>, PluginError> {
    discovery::discover(dir)?
        .into_iter()
        .map(|found| {
            let m = &found.manifest;
            let kind = m.kind(&found.manifest_path)?;
            m.effective_limits(limits, &found.manifest_path)?;
            let bytes = read(&found.wasm)?;
            let sha256 = sha256_hex(&bytes);
            if sha256 != m.sha256 {
                return Err(PluginError::DigestMismatch {
                    plugin: m.name.clone(),
                    path: found.wasm.clone(),
                    expected: m.sha256.clone(),
                    actual: sha256,
                });
            }
            precheck(&m.name, &bytes)?;
            let signature = signature::status(&found.wasm, Some(m), &sha256, trusted);
            let (imports, exports) = crate::inspect::capability_names(&bytes);
            let versions = wit::versions_named(imports.iter().chain(&exports).map(String::as_str));
            let wit_version = versions
                .last()
                .cloned()
                .unwrap_or_else(|| wit::latest::MIN_VERSION.clone());
            Ok(Listing {
                name: m.name.clone(),
                kind,
                version: m.version.clone(),
                sha256,
                wit_version,
                signature,
                description: m.description.clone(),
                imports: imports.iter().map(|i| capability(i)).collect(),
            })
        })
        .collect()
}
