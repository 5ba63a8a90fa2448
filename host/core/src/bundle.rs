//! Bundles: the canonical, content-addressed, signed artifact that goes to
//! every service.
//!
//! The digest is the sha256 of the canonical JSON of the payload. In
//! `pde.bundle/v2` (what pde writes) that is RFC 8785 (JCS) proper, so a
//! service or an auditor can recompute it with any JCS library. In
//! `pde.bundle/v1` it is pde's older form ([`canonical_json`]: JCS key order,
//! but numbers as `serde_json` writes them); v1 bundles are still read and
//! verified with that algorithm so that bundles already deployed stay valid. The payload carries no timestamp
//! and no environment name, so building twice from the same commit gives the
//! same bytes, and the artifact checked in staging is the one promoted to
//! production. Canonicalisation is done here, explicitly, rather than relying
//! on `serde_json`'s map ordering, because a dependency turning on its
//! `preserve_order` feature would silently change every digest.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::approval::SignedApproval;
pub use crate::canonical::{CanonicalError, canonical_json, digest_of, jcs, jcs_digest};
use crate::exit::{ExitCode, HasExitCode};
use crate::keys::{Signature, SignatureError, TrustedKeys};

/// The format tag of the bundles pde writes: digest over RFC 8785 canonical JSON.
pub const FORMAT: &str = "pde.bundle/v2";
/// The older format tag, still accepted: digest over [`canonical_json`].
pub const FORMAT_V1: &str = "pde.bundle/v1";
/// Every format this build reads.
pub const FORMATS: [&str; 2] = [FORMAT_V1, FORMAT];

/// `sha256:<hex>` of `payload` as bundle format `format` hashes it.
pub fn payload_digest(format: &str, payload: &Value) -> Result<String, BundleError> {
    match format {
        FORMAT => jcs_digest(payload).map_err(BundleError::Canonical),
        FORMAT_V1 => Ok(digest_of(payload)),
        other => Err(BundleError::Format(other.to_string())),
    }
}

/// The file name a bundle of `policy_id` at `version` with `digest` is
/// written as under `dist/`: `<policy>-<version>-<first 12 hex digits>.bundle.json`.
pub fn file_name(policy_id: &str, version: &str, digest: &str) -> String {
    let hex = digest.trim_start_matches("sha256:");
    format!(
        "{policy_id}-{version}-{}.bundle.json",
        &hex[..12.min(hex.len())]
    )
}

/// The bytes a bundle (or any value) of format `format` is written as.
pub fn canonical_bytes(format: &str, value: &Value) -> Result<Vec<u8>, BundleError> {
    match format {
        FORMAT => jcs(value).map_err(BundleError::Canonical),
        FORMAT_V1 => Ok(canonical_json(value)),
        other => Err(BundleError::Format(other.to_string())),
    }
}

/// A signed bundle, exactly as it is written to `dist/` and sent to services.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Bundle {
    /// [`FORMAT`] for bundles pde writes; [`FORMAT_V1`] for older ones.
    pub format: String,
    /// `sha256:<hex>` of the canonical payload.
    pub digest: String,
    /// Ed25519 signatures over the digest string.
    pub signatures: Vec<Signature>,
    /// Signed approvals of the policy's content ([`crate::approval`]). Like
    /// the signatures they sit outside the digest: each is checked on its own
    /// against the policy in the payload, and adding one never changes what
    /// was promoted. Absent (not `[]`) when there are none, so bundles without
    /// approvals keep the exact bytes they always had.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub approvals: Vec<SignedApproval>,
    /// The validation attestation ([`crate::attestation`]): which validators
    /// ran, who signed each, what each said; signed with the release key and,
    /// like approvals, outside the digest. Absent in bundles made without a
    /// signing key and by older pde.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attestation: Option<crate::attestation::Envelope>,
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
    #[error("unsupported bundle format {0:?} (expected {FORMAT:?} or {FORMAT_V1:?})")]
    Format(String),
    /// The payload has no RFC 8785 form (a number a double would round).
    #[error("payload cannot be canonicalised: {0}")]
    Canonical(CanonicalError),
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
            // Validation refuses such numbers first; reaching here means the
            // policy itself is the problem.
            BundleError::Canonical(_) => ExitCode::ValidationFailed,
            BundleError::Digest { .. } | BundleError::Signature { .. } => ExitCode::Integrity,
        }
    }
}

impl Payload {
    /// The payload as a JSON value (the form the digest is computed over).
    pub fn to_value(&self) -> Value {
        serde_json::to_value(self).expect("payload serialises")
    }

    /// `sha256:<hex>` of the payload as bundle format `format` hashes it.
    pub fn digest(&self, format: &str) -> Result<String, BundleError> {
        payload_digest(format, &self.to_value())
    }
}

impl Bundle {
    /// Seals a payload as a [`FORMAT`] bundle: computes its digest and signs
    /// the digest with each key.
    pub fn seal(
        payload: Payload,
        keys: &[&ed25519_dalek::SigningKey],
    ) -> Result<Bundle, BundleError> {
        Self::seal_as(FORMAT, payload, keys)
    }

    /// Seals a payload in a given format; [`FORMAT_V1`] exists so that tests
    /// and tools can still make what older pushers made.
    pub fn seal_as(
        format: &str,
        payload: Payload,
        keys: &[&ed25519_dalek::SigningKey],
    ) -> Result<Bundle, BundleError> {
        let digest = payload.digest(format)?;
        let signatures = keys
            .iter()
            .map(|k| crate::keys::sign(k, digest.as_bytes()))
            .collect();
        Ok(Bundle {
            format: format.to_string(),
            digest,
            signatures,
            approvals: Vec::new(),
            attestation: None,
            payload,
        })
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
        if !FORMATS.contains(&format) {
            return Err(BundleError::Format(format.to_string()));
        }
        let payload = value
            .get("payload")
            .ok_or_else(|| BundleError::Malformed("missing payload".into()))?;
        let actual = payload_digest(format, payload)?;
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
        let actual = self.payload.digest(&self.format)?;
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

    /// The bundle's canonical bytes, as written to disk and sent over the
    /// wire: RFC 8785 for [`FORMAT`], the v1 form for [`FORMAT_V1`].
    ///
    /// A bundle made by [`Bundle::seal`] always has such bytes; one built by
    /// hand with an integer a double cannot hold falls back to the v1 form,
    /// whose digest check then fails where it is read rather than here.
    pub fn to_canonical_bytes(&self) -> Vec<u8> {
        let value = serde_json::to_value(self).expect("bundle serialises");
        canonical_bytes(&self.format, &value).unwrap_or_else(|_| canonical_json(&value))
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
        let a = Bundle::seal(payload(), &[&key]).unwrap();
        let b = Bundle::seal(payload(), &[&key]).unwrap();
        assert_eq!(a.to_canonical_bytes(), b.to_canonical_bytes());
        let mut trusted = TrustedKeys::new();
        trusted.add(key.verifying_key());
        a.verify_signature(&trusted).unwrap();
        let parsed = Bundle::from_slice(&a.to_canonical_bytes()).unwrap();
        assert_eq!(parsed, a);
    }

    #[test]
    fn v2_digest_is_jcs_and_v1_bundles_still_verify() {
        let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
        let mut p = payload();
        p.policy = json!({"value": 1.0, "big": 1e21, "tiny": 2.5e-7});
        let v2 = Bundle::seal(p.clone(), &[&key]).unwrap();
        assert_eq!(v2.format, FORMAT);
        assert_eq!(v2.digest, jcs_digest(&p.to_value()).unwrap());
        let v1 = Bundle::seal_as(FORMAT_V1, p.clone(), &[&key]).unwrap();
        assert_eq!(v1.digest, digest_of(&p.to_value()));
        // The two forms differ on floats, so the format tag decides.
        assert_ne!(v1.digest, v2.digest);
        for b in [&v1, &v2] {
            // Read back, `1` is an integer where `1.0` was a float: the same
            // number, the same digest, the same bytes.
            let parsed = Bundle::from_slice(&b.to_canonical_bytes()).unwrap();
            assert_eq!(parsed.digest, b.digest);
            assert_eq!(parsed.to_canonical_bytes(), b.to_canonical_bytes());
            parsed.verify_digest().unwrap();
        }
        // A v1 digest relabelled as v2 (or back) no longer matches.
        let mut relabelled = serde_json::to_value(&v1).unwrap();
        relabelled["format"] = json!(FORMAT);
        assert!(matches!(
            Bundle::from_value(relabelled),
            Err(BundleError::Digest { .. })
        ));
        p.policy = json!({"value": 9_007_199_254_740_993_u64});
        assert!(matches!(
            Bundle::seal(p, &[&key]),
            Err(BundleError::Canonical(_))
        ));
    }

    #[test]
    fn tampering_is_detected() {
        let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
        let bundle = Bundle::seal(payload(), &[&key]).unwrap();
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
