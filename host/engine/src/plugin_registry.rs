//! `pde plugin push FILE.wasm oci://…` and `pde plugin pull oci://…@sha256:…
//! --out DIR` (issue 23): plugins through an OCI registry, in the CNCF Wasm
//! OCI artifact layout that `wkg` uses (`pde_core::oci`), so an agency ships
//! its validator once and every workspace pulls the exact signed bytes.
//!
//! A pull is **pinned by digest**: the reference must name the manifest
//! digest, the manifest's bytes must hash to it, the component's bytes to
//! its layer digest and to the `sha256` its pde manifest pins. The three
//! files are written to a staging directory beside the destination and
//! admitted there exactly as a deploy loads a plugin (manifest, pin,
//! component, signature by a `[trust] plugin_keys` key over the manifest as
//! it is); only then are they moved into the plugin directory.

use std::path::{Path, PathBuf};

use pde_core::oci::{OciError, Registry, RegistryOptions, Repository};
use pde_core::{ExitCode, HasExitCode};
use pde_plugin_host::{PluginHost, SignatureStatus};

use crate::keys::TrustedKeys;

/// Largest component pulled.
const MAX_COMPONENT_BYTES: usize = 64 * 1024 * 1024;

/// Why a plugin could not be pushed or pulled.
#[derive(Debug, thiserror::Error)]
pub enum PluginRegistryError {
    /// A reference that is not `oci://HOST[:PORT]/REPO[:TAG|@sha256:HEX]`.
    #[error(
        "{0:?} is not a plugin reference: oci://HOST[:PORT]/REPOSITORY[:TAG] to push, oci://HOST[:PORT]/REPOSITORY@sha256:<hex> to pull"
    )]
    BadReference(String),
    /// A pull without a digest.
    #[error(
        "{0}: a plugin is pulled pinned by digest; use the oci://…@sha256:<hex> that `pde plugin push` printed"
    )]
    NotPinned(String),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// The registry failed or served something else than what was asked.
    #[error(transparent)]
    Registry(#[from] OciError),
    /// The artifact is not a pde plugin (no manifest), or its parts disagree.
    #[error("{reference}: {reason}")]
    Artifact {
        /// The reference pulled.
        reference: String,
        /// What is wrong.
        reason: String,
    },
    /// The plugin does not pass the checks of a deploy.
    #[error(transparent)]
    Plugin(#[from] pde_plugin_host::PluginError),
}

impl HasExitCode for PluginRegistryError {
    fn exit_code(&self) -> ExitCode {
        match self {
            PluginRegistryError::BadReference(_)
            | PluginRegistryError::NotPinned(_)
            | PluginRegistryError::Io { .. } => ExitCode::Usage,
            PluginRegistryError::Registry(OciError::Unexpected { .. })
            | PluginRegistryError::Artifact { .. } => ExitCode::Integrity,
            PluginRegistryError::Registry(OciError::BadCredentials(_))
            | PluginRegistryError::Registry(OciError::BadReference(_))
            | PluginRegistryError::Registry(OciError::BadTag(_)) => ExitCode::Usage,
            PluginRegistryError::Registry(_) => ExitCode::DeployFailed,
            PluginRegistryError::Plugin(e) => e.exit_code(),
        }
    }
}

/// `oci://HOST[:PORT]/REPOSITORY[:TAG][@sha256:HEX]`.
#[derive(Debug, Clone)]
pub struct PluginRef {
    /// The repository.
    pub repository: Repository,
    /// The tag, if given.
    pub tag: Option<String>,
    /// The manifest digest, if given.
    pub digest: Option<String>,
}

impl std::str::FromStr for PluginRef {
    type Err = PluginRegistryError;

    fn from_str(s: &str) -> Result<PluginRef, PluginRegistryError> {
        let bad = || PluginRegistryError::BadReference(s.to_string());
        let rest = s.strip_prefix("oci://").ok_or_else(bad)?;
        let (rest, digest) = match rest.split_once('@') {
            Some((r, d)) => {
                let hex = d.strip_prefix("sha256:").ok_or_else(bad)?;
                if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(bad());
                }
                (r, Some(d.to_ascii_lowercase()))
            }
            None => (rest, None),
        };
        let slash = rest.find('/').ok_or_else(bad)?;
        let (path, tag) = match rest[slash..].rfind(':') {
            Some(i) => (&rest[..slash + i], Some(rest[slash + i + 1..].to_string())),
            None => (rest, None),
        };
        if let Some(t) = &tag {
            pde_core::oci::check_tag(t).map_err(|_| bad())?;
        }
        Ok(PluginRef {
            repository: path.parse().map_err(|_| bad())?,
            tag,
            digest,
        })
    }
}

impl std::fmt::Display for PluginRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "oci://{}", self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

/// What a push did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Pushed {
    /// The tag moved.
    pub tag: String,
    /// The manifest digest.
    pub digest: String,
    /// The pinned reference to pull it with.
    pub reference: String,
    /// Whether a signature went with it.
    pub signed: bool,
}

/// What a pull wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Pulled {
    /// The plugin's name (its manifest's).
    pub name: String,
    /// The manifest digest it was pulled by.
    pub digest: String,
    /// The component's sha256.
    pub sha256: String,
    /// The files written.
    pub files: Vec<PathBuf>,
    /// Who signed it.
    pub signer: String,
}

fn runtime() -> Result<tokio::runtime::Runtime, PluginRegistryError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| PluginRegistryError::Io {
            path: PathBuf::from("(runtime)"),
            source,
        })
}

fn read(path: &Path) -> Result<Vec<u8>, PluginRegistryError> {
    std::fs::read(path).map_err(|source| PluginRegistryError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Pushes `wasm` with its manifest (`manifest`, default `wasm` with
/// `.toml`) and its signature (`<wasm>.sig`, when present) under the
/// reference's tag (default: the manifest's version).
pub fn push(
    reference: &PluginRef,
    wasm: &Path,
    manifest: Option<&Path>,
    opts: RegistryOptions,
) -> Result<Pushed, PluginRegistryError> {
    let bytes = read(wasm)?;
    let manifest_path = manifest.map_or_else(|| wasm.with_extension("toml"), Path::to_path_buf);
    let manifest_text = String::from_utf8_lossy(&read(&manifest_path)?).into_owned();
    let sig_path = pde_plugin_host::signature::sig_path(wasm);
    let signature = sig_path
        .is_file()
        .then(|| read(&sig_path))
        .transpose()?
        .map(|b| String::from_utf8_lossy(&b).into_owned());
    let tag = match &reference.tag {
        Some(t) => t.clone(),
        None => {
            let parsed: toml::Value =
                toml::from_str(&manifest_text).map_err(|e| PluginRegistryError::Artifact {
                    reference: manifest_path.display().to_string(),
                    reason: e.to_string(),
                })?;
            parsed
                .get("version")
                .and_then(|v| v.as_str())
                .map(str::to_string)
                .ok_or_else(|| PluginRegistryError::Artifact {
                    reference: manifest_path.display().to_string(),
                    reason: "the manifest has no version to tag with; give oci://…:TAG".into(),
                })?
        }
    };
    let registry = Registry::new(reference.repository.clone(), opts)?;
    let (imports, exports) = pde_plugin_host::inspect::component_interface(&bytes);
    let digest = runtime()?.block_on(registry.push_plugin(
        &tag,
        &bytes,
        (&imports, &exports),
        Some(&manifest_text),
        signature.as_deref(),
    ))?;
    Ok(Pushed {
        reference: format!("oci://{}@{digest}", reference.repository),
        tag,
        digest,
        signed: signature.is_some(),
    })
}

/// Pulls the plugin pinned by `reference`'s digest into `out`, after it
/// passed every check of a deploy and a signature by a key of `trusted`.
pub fn pull(
    host: &PluginHost,
    reference: &PluginRef,
    out: &Path,
    trusted: &TrustedKeys,
    opts: RegistryOptions,
) -> Result<Pulled, PluginRegistryError> {
    let Some(digest) = &reference.digest else {
        return Err(PluginRegistryError::NotPinned(reference.to_string()));
    };
    let registry = Registry::new(reference.repository.clone(), opts)?;
    let fetched = runtime()?.block_on(registry.fetch_plugin(digest, MAX_COMPONENT_BYTES))?;
    let artifact = |reason: &str| PluginRegistryError::Artifact {
        reference: reference.to_string(),
        reason: reason.to_string(),
    };
    let manifest_text = fetched.manifest_toml.as_deref().ok_or_else(|| {
        artifact("the artifact carries no pde plugin manifest (annotation dev.pde.plugin.manifest)")
    })?;
    let signature = fetched.signature.as_deref().ok_or_else(|| {
        artifact("the artifact carries no signature; a pulled plugin must be signed by a [trust] plugin_keys key")
    })?;
    let parsed: toml::Value =
        toml::from_str(manifest_text).map_err(|e| artifact(&format!("its manifest: {e}")))?;
    let name = parsed
        .get("name")
        .and_then(|v| v.as_str())
        .filter(|n| {
            !n.is_empty()
                && n.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
                && !n.starts_with('.')
        })
        .ok_or_else(|| artifact("its manifest has no valid `name`"))?
        .to_string();
    std::fs::create_dir_all(out).map_err(|source| PluginRegistryError::Io {
        path: out.to_path_buf(),
        source,
    })?;
    let staging = tempfile::Builder::new()
        .prefix(".pde-pull-")
        .tempdir_in(out)
        .map_err(|source| PluginRegistryError::Io {
            path: out.to_path_buf(),
            source,
        })?;
    let write = |file: &str, bytes: &[u8]| -> Result<PathBuf, PluginRegistryError> {
        let path = staging.path().join(file);
        std::fs::write(&path, bytes).map_err(|source| PluginRegistryError::Io {
            path: path.clone(),
            source,
        })?;
        Ok(path)
    };
    let wasm = write(&format!("{name}.wasm"), &fetched.wasm)?;
    write(&format!("{name}.toml"), manifest_text.as_bytes())?;
    write(&format!("{name}.wasm.sig"), signature.as_bytes())?;
    // The same admission as a deploy's: pin, component, world, signature.
    let plugin = host.admit(&wasm, trusted)?;
    let signer = match plugin.signature {
        SignatureStatus::Valid { signer, .. } => signer,
        SignatureStatus::Unsigned => return Err(artifact("it is not signed")),
        SignatureStatus::Invalid { reason } => {
            return Err(pde_plugin_host::PluginError::BadSignature {
                plugin: name.clone(),
                reason,
            }
            .into());
        }
    };
    let mut files = Vec::new();
    for file in [
        format!("{name}.wasm"),
        format!("{name}.toml"),
        format!("{name}.wasm.sig"),
    ] {
        let dest = out.join(&file);
        std::fs::rename(staging.path().join(&file), &dest).map_err(|source| {
            PluginRegistryError::Io {
                path: dest.clone(),
                source,
            }
        })?;
        files.push(dest);
    }
    Ok(Pulled {
        name,
        digest: digest.clone(),
        sha256: plugin.sha256,
        files,
        signer,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references() {
        let r: PluginRef = "oci://127.0.0.1:5000/plugins/bounds:1.0.0".parse().unwrap();
        assert_eq!(r.repository.registry, "127.0.0.1:5000");
        assert_eq!(r.repository.repository, "plugins/bounds");
        assert_eq!(r.tag.as_deref(), Some("1.0.0"));
        let d = format!("sha256:{}", "a".repeat(64));
        let r: PluginRef = format!("oci://reg.example.gov/p@{d}").parse().unwrap();
        assert_eq!(r.digest.as_deref(), Some(d.as_str()));
        assert!(r.tag.is_none());
        for bad in ["reg/p", "oci://reg", "oci://reg/p@sha256:12", "oci://reg/P"] {
            assert!(bad.parse::<PluginRef>().is_err(), "{bad}");
        }
    }
}
