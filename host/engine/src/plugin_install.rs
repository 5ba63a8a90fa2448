//! `pde plugin install`: put a built component into a workspace the way a
//! deploy will accept it.
//!
//! Installing by hand takes four steps that are each easy to get wrong
//! (issue 26): rename `eligibility_bounds.wasm` to the manifest's hyphenated
//! name, pin its sha256 in the manifest, sign it, and commit both (a deploy
//! refuses uncommitted plugins, because the bundle names the commit that
//! holds them). This module does the first three and says exactly what to
//! commit; committing stays the engineer's act.
//!
//! The component is checked exactly as a deploy will load it (compiled, its
//! world matched against the manifest's `kind`, its imports against the
//! sandbox) from a staging directory first, so a component the runtime would
//! refuse never lands in `plugins/`, and an earlier good install is kept.

use std::path::{Path, PathBuf};

use pde_core::keys::TrustedKeys;
use pde_core::{ExitCode, HasExitCode};
use pde_plugin_host::manifest::Manifest;
use pde_plugin_host::signature::{self, Signer};
use pde_plugin_host::{PluginError, PluginHost, PluginKind, SignatureStatus};

/// Why an install was refused.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// No manifest was given and none sits beside the component.
    #[error(
        "no manifest for {wasm}: pass --manifest FILE (the plugin's `<name>.toml`, e.g. \
         plugins/eligibility-bounds/eligibility-bounds.toml in the pde repository)"
    )]
    NoManifest {
        /// The component.
        wasm: PathBuf,
    },
    /// A file could not be read or written.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The component or its manifest is one the runtime would refuse.
    #[error(transparent)]
    Plugin(#[from] PluginError),
}

impl HasExitCode for InstallError {
    fn exit_code(&self) -> ExitCode {
        match self {
            InstallError::NoManifest { .. } | InstallError::Io { .. } => ExitCode::Usage,
            InstallError::Plugin(e) => e.exit_code(),
        }
    }
}

/// What to install.
#[derive(Debug)]
pub struct InstallRequest<'a> {
    /// The built component.
    pub wasm: &'a Path,
    /// Its manifest (default: the component's path with `.toml`).
    pub manifest: Option<&'a Path>,
    /// The workspace's plugin directory.
    pub plugins_dir: &'a Path,
    /// Sign the installed component with this key, as this signer.
    pub sign: Option<(&'a ed25519_dalek::SigningKey, Signer)>,
    /// The workspace's trusted plugin keys, to say whether the signature
    /// will count.
    pub trusted: &'a TrustedKeys,
}

/// What an install did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Installed {
    /// The manifest's name, and the installed files' stem.
    pub name: String,
    /// `validator`, `router` or `gate`.
    pub kind: PluginKind,
    /// The manifest's version.
    pub version: String,
    /// The pinned sha256 of the component.
    pub sha256: String,
    /// The WIT version the component was built against.
    pub wit_version: String,
    /// `<plugins>/<name>.wasm`.
    pub wasm: PathBuf,
    /// `<plugins>/<name>.toml`, with `sha256` pinned.
    pub manifest: PathBuf,
    /// `<plugins>/<name>.wasm.sig`, when signed now.
    pub signature_file: Option<PathBuf>,
    /// The installed plugin's signature as a deploy will see it.
    pub signature: SignatureStatus,
    /// The sha256 of the component this install replaced, if any.
    pub replaced_sha256: Option<String>,
    /// A signature of the replaced component that was removed (it no
    /// longer matched, and would fail a deploy that requires signatures).
    pub removed_stale_signature: Option<PathBuf>,
}

impl Installed {
    /// The files to `git add`: everything this install wrote or removed.
    pub fn files(&self) -> Vec<PathBuf> {
        let mut files = vec![self.wasm.clone(), self.manifest.clone()];
        files.extend(self.signature_file.clone());
        files.extend(self.removed_stale_signature.clone());
        files
    }
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> InstallError {
    let path = path.to_path_buf();
    move |source| InstallError::Io { what, path, source }
}

/// Sets the top-level `sha256 = "…"` of manifest `text`, keeping every other
/// line (comments included) as written. A key inside a table (after the
/// first `[header]`) is a setting, not the pin, and is left alone.
pub fn pin_sha256(text: &str, sha256: &str) -> String {
    let pin = format!("sha256 = \"{sha256}\"");
    let mut out = Vec::new();
    let mut pinned = false;
    let mut in_table = false;
    for line in text.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with('[') {
            if !pinned {
                out.push(pin.clone());
                pinned = true;
            }
            in_table = true;
        }
        let is_pin = !in_table
            && trimmed
                .strip_prefix("sha256")
                .is_some_and(|rest| rest.trim_start().starts_with('='));
        if is_pin {
            if !pinned {
                out.push(pin.clone());
                pinned = true;
            }
            continue;
        }
        out.push(line.to_string());
    }
    if !pinned {
        out.push(pin);
    }
    let mut joined = out.join("\n");
    joined.push('\n');
    joined
}

/// Installs `req.wasm` into `req.plugins_dir` under the manifest's name,
/// pins its sha256, and signs it if asked. Refuses (and leaves `plugins/`
/// untouched) a manifest or component a deploy would refuse.
pub fn install(host: &PluginHost, req: &InstallRequest<'_>) -> Result<Installed, InstallError> {
    let manifest_src = match req.manifest {
        Some(m) => m.to_path_buf(),
        None => {
            let beside = req.wasm.with_extension("toml");
            if !beside.is_file() {
                return Err(InstallError::NoManifest {
                    wasm: req.wasm.to_path_buf(),
                });
            }
            beside
        }
    };
    let bytes = std::fs::read(req.wasm).map_err(io("cannot read", req.wasm))?;
    let sha256 = pde_plugin_host::sha256_hex(&bytes);
    let text = std::fs::read_to_string(&manifest_src).map_err(io("cannot read", &manifest_src))?;
    let pinned = pin_sha256(&text, &sha256);
    let manifest = Manifest::parse(&pinned, &manifest_src)?;
    let name = manifest.name.clone();

    // Stage beside the plugin directory's parent, never inside it: a crash
    // must not leave a half-installed plugin that discovery would pick up.
    std::fs::create_dir_all(req.plugins_dir).map_err(io("cannot create", req.plugins_dir))?;
    let staging = std::env::temp_dir().join(format!(
        "pde-plugin-install-{}-{}",
        std::process::id(),
        name
    ));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).map_err(io("cannot create", &staging))?;
    let checked = (|| {
        let staged = staging.join(format!("{name}.wasm"));
        std::fs::write(&staged, &bytes).map_err(io("cannot write", &staged))?;
        let staged_manifest = staging.join(format!("{name}.toml"));
        std::fs::write(&staged_manifest, &pinned).map_err(io("cannot write", &staged_manifest))?;
        // The same load as a deploy's: compile, world vs kind, imports, limits.
        Ok::<_, InstallError>(host.load_file(&staged, req.trusted)?)
    })();
    let _ = std::fs::remove_dir_all(&staging);
    let checked = checked?;

    let wasm = req.plugins_dir.join(format!("{name}.wasm"));
    let manifest_path = req.plugins_dir.join(format!("{name}.toml"));
    let replaced_sha256 = std::fs::read(&wasm)
        .ok()
        .map(|old| pde_plugin_host::sha256_hex(&old))
        .filter(|old| *old != sha256);
    std::fs::write(&wasm, &bytes).map_err(io("cannot write", &wasm))?;
    std::fs::write(&manifest_path, &pinned).map_err(io("cannot write", &manifest_path))?;

    let sig = signature::sig_path(&wasm);
    let mut removed_stale_signature = None;
    let signature_file = match &req.sign {
        Some((key, signer)) => Some(host.sign_file(&wasm, key, signer)?.0),
        None => {
            // A signature that no longer covers the manifest (new bytes, new
            // pin) would fail every deploy that requires signatures, with a
            // message about tampering; it goes, and the output says so.
            if sig.is_file()
                && !matches!(
                    signature::status(&wasm, Some(&manifest), &sha256, req.trusted),
                    SignatureStatus::Valid { .. }
                )
            {
                std::fs::remove_file(&sig).map_err(io("cannot remove", &sig))?;
                removed_stale_signature = Some(sig.clone());
            }
            None
        }
    };
    let status = signature::status(&wasm, Some(&manifest), &sha256, req.trusted);
    tracing::info!(plugin = %name, %sha256, "installed plugin");
    Ok(Installed {
        name,
        kind: checked.kind,
        version: manifest.version.clone(),
        sha256,
        wit_version: checked.wit_version.to_string(),
        wasm,
        manifest: manifest_path,
        signature_file,
        signature: status,
        replaced_sha256,
        removed_stale_signature,
    })
}

#[cfg(test)]
mod tests {
    use super::pin_sha256;

    #[test]
    fn pins_the_top_level_key_only_and_keeps_comments() {
        let text = "# a comment\nname = \"x\"\nsha256 = \"\"\n\n[settings]\nsha256 = \"keep\"\n";
        let out = pin_sha256(text, "ab");
        assert_eq!(
            out,
            "# a comment\nname = \"x\"\nsha256 = \"ab\"\n\n[settings]\nsha256 = \"keep\"\n"
        );
        // No key yet: written before the first table.
        let out = pin_sha256("name = \"x\"\n[limits]\nfuel = 1\n", "cd");
        assert_eq!(out, "name = \"x\"\nsha256 = \"cd\"\n[limits]\nfuel = 1\n");
        assert_eq!(
            pin_sha256("name = \"x\"", "ef"),
            "name = \"x\"\nsha256 = \"ef\"\n"
        );
    }
}
