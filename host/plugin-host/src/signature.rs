//! Plugin signatures: `<name>.wasm.sig` beside the component.
//!
//! A security team signs a plugin after auditing it. The file holds one JSON
//! [`pde_core::keys::Signature`] over the text `sha256:<hex of the wasm>`, the
//! same shape and message convention as bundle signatures, so one key set
//! and one verification routine serve both.

use std::path::{Path, PathBuf};

use ed25519_dalek::SigningKey;

use super::{PluginError, SignatureStatus};
use pde_core::keys::{self, Signature, TrustedKeys};

/// The signed message for a wasm whose sha256 is `sha256_hex`.
pub fn message(sha256_hex: &str) -> String {
    format!("sha256:{sha256_hex}")
}

/// Where the signature of `wasm` lives.
pub fn sig_path(wasm: &Path) -> PathBuf {
    let mut name = wasm.as_os_str().to_owned();
    name.push(".sig");
    PathBuf::from(name)
}

/// Signs the wasm at `wasm` and writes `<wasm>.sig`; returns its path.
pub fn sign_file(wasm: &Path, key: &SigningKey) -> Result<(PathBuf, Signature), PluginError> {
    let bytes = super::read(wasm)?;
    let sig = keys::sign(key, message(&super::sha256_hex(&bytes)).as_bytes());
    let path = sig_path(wasm);
    let text = serde_json::to_string_pretty(&sig).expect("a signature serialises");
    std::fs::write(&path, text + "\n").map_err(|source| PluginError::Io {
        path: path.clone(),
        source,
    })?;
    Ok((path, sig))
}

/// The signature status of a wasm with digest `sha256_hex` at `wasm`.
pub fn status(wasm: &Path, sha256_hex: &str, trusted: &TrustedKeys) -> SignatureStatus {
    let path = sig_path(wasm);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return SignatureStatus::Unsigned,
        Err(e) => {
            return SignatureStatus::Invalid {
                reason: format!("cannot read {}: {e}", path.display()),
            };
        }
    };
    let sig: Signature = match serde_json::from_str(&text) {
        Ok(s) => s,
        Err(e) => {
            return SignatureStatus::Invalid {
                reason: format!("{} is not a signature: {e}", path.display()),
            };
        }
    };
    match trusted.verify(message(sha256_hex).as_bytes(), &sig) {
        Ok(()) => SignatureStatus::Valid { keyid: sig.keyid },
        Err(e) => SignatureStatus::Invalid {
            reason: e.to_string(),
        },
    }
}
