//! Plugin signatures: `<name>.wasm.sig` beside the component.
//!
//! A security team signs a plugin after reviewing it, and what they approve
//! is not only the code but how it runs: its kind, its limits, its settings.
//! So a signature covers the **manifest** ([`Manifest::signed_fields`]: name,
//! kind, version, the pinned sha256 of the `.wasm`, `[limits]`,
//! `[settings]`), and through the pinned sha256 the component's bytes.
//! Raising a setting or a limit, or changing the kind, after signing makes
//! the signature invalid, and an environment that requires signed plugins
//! refuses the plugin (exit 6).
//!
//! The file (format [`FORMAT`]) is JSON: the signed fields plus who signed,
//! when, and an optional note, then the key id, algorithm and signature. The
//! signed message is the canonical JSON (RFC 8785 key order, no whitespace)
//! of the whole file without `sig`, so the signer, time and note cannot be
//! altered either. Verification rebuilds that message from the manifest *as
//! it is now*; the copy of the manifest in the file only serves to say which
//! fields changed.
//!
//! **Migration.** Before this format, `.sig` files held only
//! `{keyid, alg, sig}` over `sha256:<hex of the wasm>`. Such a file is
//! reported as a legacy signature that must be re-signed; it never satisfies
//! `require_signed_plugins`. Re-run `pde plugin sign` after re-reviewing the
//! manifest (docs/security-review.md).

use std::path::{Path, PathBuf};

use ed25519_dalek::SigningKey;
use serde::{Deserialize, Serialize};

use super::manifest::Manifest;
use super::{PluginError, SignatureStatus};
use pde_core::keys::{self, Signature, TrustedKeys};

/// The `format` of a plugin signature file.
pub const FORMAT: &str = "pde.plugin-signature/v2";

/// A `<name>.wasm.sig` file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginSignature {
    /// Always [`FORMAT`].
    pub format: String,
    /// The manifest fields signed ([`Manifest::signed_fields`]).
    pub manifest: serde_json::Value,
    /// Who signed, in words (a person or team).
    pub signer: String,
    /// When, RFC 3339 UTC.
    pub signed_at: String,
    /// Why, or what was reviewed; optional.
    pub note: Option<String>,
    /// The signing key's id.
    pub keyid: String,
    /// Always `ed25519`.
    pub alg: String,
    /// The signature over [`PluginSignature::message`], standard base64.
    pub sig: String,
}

/// Who signs, and why: recorded in the signature and covered by it.
#[derive(Debug, Clone, Default)]
pub struct Signer {
    /// A person or team.
    pub name: String,
    /// Optional note, e.g. the review ticket.
    pub note: Option<String>,
}

impl PluginSignature {
    /// The signed message for `manifest` (signed fields) and this file's
    /// signer, time, note and key: canonical JSON of everything but `sig`.
    fn message(&self, manifest: &serde_json::Value) -> Vec<u8> {
        pde_core::bundle::canonical_json(&serde_json::json!({
            "format": self.format,
            "manifest": manifest,
            "signer": self.signer,
            "signed_at": self.signed_at,
            "note": self.note,
            "keyid": self.keyid,
            "alg": self.alg,
        }))
    }
}

/// Where the signature of `wasm` lives.
pub fn sig_path(wasm: &Path) -> PathBuf {
    let mut name = wasm.as_os_str().to_owned();
    name.push(".sig");
    PathBuf::from(name)
}

/// Where the manifest of `wasm` lives.
pub fn manifest_path(wasm: &Path) -> PathBuf {
    wasm.with_extension("toml")
}

/// Signs the plugin at `wasm` (its manifest beside it) and writes
/// `<wasm>.sig`; returns its path and contents. `PluginHost::sign_file` is
/// the public entry point.
///
/// Refuses a plugin without a manifest or with an invalid one, a manifest
/// that does not pin these bytes ([`PluginError::DigestMismatch`]), and
/// whatever `admit` (the manifest as read here, and the path) refuses: the
/// host passes the checks its loader applies (`PluginHost::admit`), so a
/// signature never vouches for something pde would refuse to run.
pub(crate) fn sign_file_with(
    wasm: &Path,
    key: &SigningKey,
    signer: &Signer,
    admit: impl FnOnce(&Manifest, &Path) -> Result<(), PluginError>,
) -> Result<(PathBuf, PluginSignature), PluginError> {
    let bytes = super::read(wasm)?;
    let manifest_path = manifest_path(wasm);
    if !manifest_path.is_file() {
        return Err(PluginError::MissingManifest {
            wasm: wasm.to_path_buf(),
            expected: manifest_path,
        });
    }
    let manifest = Manifest::load(&manifest_path)?;
    // The manifest signed below is the one admitted here.
    admit(&manifest, &manifest_path)?;
    let actual = super::sha256_hex(&bytes);
    if actual != manifest.sha256 {
        return Err(PluginError::DigestMismatch {
            plugin: manifest.name.clone(),
            path: wasm.to_path_buf(),
            expected: manifest.sha256.clone(),
            actual,
        });
    }
    let signed_at = time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .unwrap_or_else(|_| time::OffsetDateTime::now_utc())
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let fields = manifest.signed_fields();
    let mut file = PluginSignature {
        format: FORMAT.to_string(),
        manifest: fields.clone(),
        signer: signer.name.clone(),
        signed_at,
        note: signer.note.clone().filter(|n| !n.is_empty()),
        keyid: keys::key_id(&key.verifying_key()),
        alg: "ed25519".to_string(),
        sig: String::new(),
    };
    file.sig = keys::sign(key, &file.message(&fields)).sig;
    let path = sig_path(wasm);
    let text = serde_json::to_string_pretty(&file).expect("a signature serialises");
    std::fs::write(&path, text + "\n").map_err(|source| PluginError::Io {
        path: path.clone(),
        source,
    })?;
    Ok((path, file))
}

/// The signature status of the plugin at `wasm`, whose bytes have sha256
/// `actual_sha256` and whose manifest, as it is now, is `manifest` (`None`:
/// the component has no manifest, so nothing a signature could cover).
pub fn status(
    wasm: &Path,
    manifest: Option<&Manifest>,
    actual_sha256: &str,
    trusted: &TrustedKeys,
) -> SignatureStatus {
    let path = sig_path(wasm);
    let invalid = |reason: String| SignatureStatus::Invalid { reason };
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return SignatureStatus::Unsigned,
        Err(e) => return invalid(format!("cannot read {}: {e}", path.display())),
    };
    let value: serde_json::Value = match serde_json::from_str(&text) {
        Ok(v) => v,
        Err(e) => return invalid(format!("{} is not a signature: {e}", path.display())),
    };
    if value.get("format").is_none() && serde_json::from_value::<Signature>(value.clone()).is_ok() {
        return invalid(format!(
            "legacy signature, re-sign required: {} covers only the .wasm digest, not the \
             manifest (review the manifest, then `pde plugin sign {} --key FILE`)",
            path.display(),
            wasm.display()
        ));
    }
    let file: PluginSignature = match serde_json::from_value(value) {
        Ok(f) => f,
        Err(e) => return invalid(format!("{} is not a signature: {e}", path.display())),
    };
    if file.format != FORMAT {
        return invalid(format!(
            "{} has format {:?}; this pde reads {FORMAT}",
            path.display(),
            file.format
        ));
    }
    let Some(manifest) = manifest else {
        return invalid(format!(
            "{} has no manifest beside it; a signature covers the manifest",
            wasm.display()
        ));
    };
    // The signature covers the bytes only through the manifest's pin.
    if manifest.sha256 != actual_sha256 {
        return invalid(format!(
            "{} is not the component its signed manifest pins (sha256 {actual_sha256}, pinned {})",
            wasm.display(),
            manifest.sha256
        ));
    }
    let now = manifest.signed_fields();
    if now != file.manifest {
        let changed: Vec<&str> = [
            "name",
            "kind",
            "version",
            "sha256",
            "limits",
            "settings",
            "uses_environment",
            "deny_attempts",
        ]
        .into_iter()
        .filter(|k| now.get(k) != file.manifest.get(k))
        .collect();
        return invalid(format!(
            "the manifest changed since it was signed by {} ({}): {} differ; re-review and re-sign",
            file.signer,
            file.keyid,
            changed.join(", ")
        ));
    }
    let sig = Signature {
        keyid: file.keyid.clone(),
        alg: file.alg.clone(),
        sig: file.sig.clone(),
    };
    match trusted.verify(&file.message(&now), &sig) {
        Ok(()) => SignatureStatus::Valid {
            key_name: trusted.name_of(&file.keyid).map(str::to_string),
            keyid: file.keyid,
            signer: file.signer,
            signed_at: file.signed_at,
            note: file.note,
        },
        // What to do next: the key is fine, this workspace only does not
        // list it (issue 24).
        Err(e @ pde_core::keys::SignatureError::UntrustedKey(_)) => invalid(format!(
            "{e} (signer {:?}): to trust it, list its public key file under [trust] \
             plugin_keys in pde.toml",
            file.signer
        )),
        Err(e) => invalid(e.to_string()),
    }
}
