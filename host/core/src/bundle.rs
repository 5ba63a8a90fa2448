//! Bundles (`pde.bundle/v1`): the canonical, content-addressed, signed artifact
//! that goes to every service.
//!
//! The digest is the sha256 of the canonical JSON of the payload: object keys
//! sorted, no insignificant whitespace, UTF-8. The payload carries no timestamp
//! and no environment name, so building twice from the same commit gives the
//! same bytes, and the artifact checked in staging is the one promoted to
//! production. Canonicalisation is done here, explicitly, rather than relying
//! on `serde_json`'s map ordering, because a dependency turning on its
//! `preserve_order` feature would silently change every digest.

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use crate::canonical::{canonical_json, digest_of};
use crate::exit::{ExitCode, HasExitCode};
use crate::keys::{Signature, SignatureError, TrustedKeys};

/// The format tag of this bundle version.
pub const FORMAT: &str = "pde.bundle/v1";

/// A signed bundle, exactly as it is written to `dist/` and sent to services.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Bundle {
    /// Always [`FORMAT`].
    pub format: String,
    /// `sha256:<hex>` of the canonical payload.
    pub digest: String,
    /// Ed25519 signatures over the digest string.
    pub signatures: Vec<Signature>,
    /// What the digest covers.
    pub payload: Payload,
}

/// The content of a bundle: what was approved, and how it was checked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Payload {
    /// Provenance and validation results.
    pub manifest: Manifest,
    /// The policy document, as loaded from the store.
    pub policy: Value,
}

/// The bundle manifest. Who deployed it belongs to the audit log, not here.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// The policy id.
    pub policy_id: String,
    /// The policy's semver version.
    pub version: String,
    /// The Git commit of the policy store the policy was read from.
    pub source_commit: String,
    /// Every validator plugin that passed the policy, with its findings.
    pub validators: Vec<ValidatorRecord>,
}

/// One validator's verdict as recorded in the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ValidatorRecord {
    /// Plugin name.
    pub name: String,
    /// sha256 (hex) of the plugin's `.wasm`.
    pub sha256: String,
    /// Error diagnostics it reported (0 in any bundle that was built).
    pub errors: u32,
    /// Warning diagnostics it reported.
    pub warnings: u32,
}

/// Why a bundle was rejected.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// Not JSON of the bundle's shape.
    #[error("malformed bundle: {0}")]
    Malformed(String),
    /// The format tag is not one this build understands.
    #[error("unsupported bundle format {0:?} (expected {FORMAT:?})")]
    Format(String),
    /// The digest does not match the payload.
    #[error("digest mismatch: bundle says {claimed}, payload hashes to {actual}")]
    Digest {
        /// The digest the bundle carries.
        claimed: String,
        /// The digest of its payload.
        actual: String,
    },
    /// No valid signature by a trusted key.
    #[error("bundle {digest}: {source}")]
    Signature {
        /// The bundle's digest.
        digest: String,
        /// What was wrong with its signatures.
        source: SignatureError,
    },
}

impl HasExitCode for BundleError {
    fn exit_code(&self) -> ExitCode {
        match self {
            BundleError::Malformed(_) | BundleError::Format(_) => ExitCode::Usage,
            BundleError::Digest { .. } | BundleError::Signature { .. } => ExitCode::Integrity,
        }
    }
}

impl Payload {
    /// The payload as a JSON value (the form the digest is computed over).
    pub fn to_value(&self) -> Value {
        serde_json::to_value(self).expect("payload serialises")
    }

    /// `sha256:<hex>` of the canonical payload.
    pub fn digest(&self) -> String {
        digest_of(&self.to_value())
    }
}

impl Bundle {
    /// Seals a payload: computes its digest and signs the digest with each key.
    pub fn seal(payload: Payload, keys: &[&ed25519_dalek::SigningKey]) -> Bundle {
        let digest = payload.digest();
        let signatures = keys
            .iter()
            .map(|k| crate::keys::sign(k, digest.as_bytes()))
            .collect();
        Bundle {
            format: FORMAT.to_string(),
            digest,
            signatures,
            payload,
        }
    }

    /// Parses a bundle received from elsewhere and checks its format and digest.
    ///
    /// The digest is recomputed over the payload *as received*, so a field that
    /// this build does not know about still counts and cannot be smuggled in.
    pub fn from_value(value: Value) -> Result<Bundle, BundleError> {
        let format = value
            .get("format")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if format != FORMAT {
            return Err(BundleError::Format(format.to_string()));
        }
        let payload = value
            .get("payload")
            .ok_or_else(|| BundleError::Malformed("missing payload".into()))?;
        let actual = digest_of(payload);
        let bundle: Bundle =
            serde_json::from_value(value).map_err(|e| BundleError::Malformed(e.to_string()))?;
        if bundle.digest != actual {
            return Err(BundleError::Digest {
                claimed: bundle.digest,
                actual,
            });
        }
        Ok(bundle)
    }

    /// Parses and digest-checks a bundle from JSON bytes.
    pub fn from_slice(bytes: &[u8]) -> Result<Bundle, BundleError> {
        let value =
            serde_json::from_slice(bytes).map_err(|e| BundleError::Malformed(e.to_string()))?;
        Self::from_value(value)
    }

    /// Checks that the digest matches the payload.
    pub fn verify_digest(&self) -> Result<(), BundleError> {
        let actual = self.payload.digest();
        if actual != self.digest {
            return Err(BundleError::Digest {
                claimed: self.digest.clone(),
                actual,
            });
        }
        Ok(())
    }

    /// Checks that a trusted key signed the digest.
    pub fn verify_signature(&self, trusted: &TrustedKeys) -> Result<(), BundleError> {
        trusted
            .verify_any(self.digest.as_bytes(), &self.signatures)
            .map_err(|source| BundleError::Signature {
                digest: self.digest.clone(),
                source,
            })
    }

    /// The bundle's canonical bytes, as written to disk and sent over the wire.
    pub fn to_canonical_bytes(&self) -> Vec<u8> {
        canonical_json(&serde_json::to_value(self).expect("bundle serialises"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn payload() -> Payload {
        Payload {
            manifest: Manifest {
                policy_id: "42".into(),
                version: "1.0.0".into(),
                source_commit: "abc".into(),
                validators: vec![],
            },
            policy: json!({"z": 1, "a": {"y": [1, "é"], "b": null}}),
        }
    }

    #[test]
    fn canonical_form_is_sorted_and_compact() {
        let v = json!({"b": 1, "a": [true, {"d": "x", "c": 2.5}], "\u{e9}": 0, "Z": null});
        assert_eq!(
            String::from_utf8(canonical_json(&v)).unwrap(),
            r#"{"Z":null,"a":[true,{"c":2.5,"d":"x"}],"b":1,"é":0}"#
        );
    }

    #[test]
    fn seal_is_deterministic_and_verifies() {
        let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
        let a = Bundle::seal(payload(), &[&key]);
        let b = Bundle::seal(payload(), &[&key]);
        assert_eq!(a.to_canonical_bytes(), b.to_canonical_bytes());
        let mut trusted = TrustedKeys::new();
        trusted.add(key.verifying_key());
        a.verify_signature(&trusted).unwrap();
        let parsed = Bundle::from_slice(&a.to_canonical_bytes()).unwrap();
        assert_eq!(parsed, a);
    }

    #[test]
    fn tampering_is_detected() {
        let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
        let bundle = Bundle::seal(payload(), &[&key]);
        let mut v = serde_json::to_value(&bundle).unwrap();
        v["payload"]["policy"]["z"] = json!(2);
        assert!(matches!(
            Bundle::from_value(v.clone()),
            Err(BundleError::Digest { .. })
        ));
        // An unknown extra field is part of what was hashed, so it cannot be added silently.
        let mut v2 = serde_json::to_value(&bundle).unwrap();
        v2["payload"]["extra"] = json!(1);
        assert!(matches!(
            Bundle::from_value(v2),
            Err(BundleError::Digest { .. })
        ));
        let other = ed25519_dalek::SigningKey::from_bytes(&[8; 32]);
        let mut trusted = TrustedKeys::new();
        trusted.add(other.verifying_key());
        assert!(bundle.verify_signature(&trusted).is_err());
    }
}
