//! The validation attestation: which validators ran on a bundle, who signed
//! each of them, and what each said (issue 27 §2).
//!
//! A bundle's signature says who released it; it does not say what checked
//! it. An agent that must only run policies checked by the security team's
//! pii-guard needs the second, so every bundle pde signs carries an
//! **in-toto statement** (`https://in-toto.io/Statement/v1`) about it, in a
//! **DSSE envelope** signed with the release key:
//!
//! ```json
//! {"payloadType": "application/vnd.in-toto+json",
//!  "payload": "<base64 of the statement's RFC 8785 bytes>",
//!  "signatures": [{"keyid": "…", "alg": "ed25519", "sig": "<base64>"}]}
//! ```
//!
//! The signature is over DSSE's pre-authentication encoding,
//! `"DSSEv1" SP len(payloadType) SP payloadType SP len(payload) SP payload`
//! (lengths in ASCII decimal, `payload` the raw statement bytes). The
//! statement's subject is the bundle (`name` `policy/<id>@<version>`,
//! `digest.sha256` the bundle digest's hex), its `predicateType` is
//! [`PREDICATE_TYPE`] and its predicate a [`Predicate`]: the pde version
//! and, per validator, its name, sha256, verdict, finding counts and
//! **the plugin's own signature file** (`pde.plugin-signature/v2`), so an
//! agent checks the plugin signer against the security team's keys itself
//! rather than taking the release key's word for it.
//!
//! Like approvals, the envelope travels beside the digest: attaching it
//! never changes what was promoted, and a bundle promoted to production is
//! attested again by the deploy that ships it.

use std::collections::BTreeSet;

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::bundle::Bundle;
use crate::canonical::{canonical_json, jcs};
use crate::keys::{Signature, SignatureError, TrustedKeys};

/// DSSE `payloadType` of the envelope.
pub const PAYLOAD_TYPE: &str = "application/vnd.in-toto+json";
/// in-toto statement `_type`.
pub const STATEMENT_TYPE: &str = "https://in-toto.io/Statement/v1";
/// The predicate type of a pde validation attestation.
pub const PREDICATE_TYPE: &str = "https://pde.dev/attestation/validation/v1";
/// The plugin signature format whose files are carried (the plugin host's
/// `signature::FORMAT`).
pub const PLUGIN_SIGNATURE_FORMAT: &str = "pde.plugin-signature/v2";

/// A DSSE envelope holding the statement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Envelope {
    /// Always [`PAYLOAD_TYPE`].
    pub payload_type: String,
    /// The statement's RFC 8785 bytes, standard base64.
    pub payload: String,
    /// ed25519 signatures over [`pae`] of the payload.
    pub signatures: Vec<Signature>,
}

/// The in-toto statement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Statement {
    /// Always [`STATEMENT_TYPE`].
    #[serde(rename = "_type")]
    pub statement_type: String,
    /// The bundle attested.
    pub subject: Vec<Subject>,
    /// Always [`PREDICATE_TYPE`].
    #[serde(rename = "predicateType")]
    pub predicate_type: String,
    /// What ran.
    pub predicate: Predicate,
}

/// An in-toto subject: the bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subject {
    /// `policy/<id>@<version>`.
    pub name: String,
    /// `{"sha256": "<hex>"}` of the bundle digest.
    pub digest: std::collections::BTreeMap<String, String>,
}

/// What pde attests about a bundle.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Predicate {
    /// The pde that ran the validators.
    pub pde_version: String,
    /// Every validator that ran, in the order they ran.
    pub validators: Vec<Validator>,
}

/// One validator that ran.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Validator {
    /// Plugin name.
    pub name: String,
    /// sha256 (hex) of its `.wasm`.
    pub sha256: String,
    /// `pass` (no error finding) or `fail`.
    pub verdict: String,
    /// Error findings of its environment-neutral run.
    pub errors: u32,
    /// Warning findings of its environment-neutral run.
    pub warnings: u32,
    /// The signing key's id, when a trusted key signed it at validation.
    pub signer_keyid: Option<String>,
    /// The signer's name as its signature records it.
    pub signer: Option<String>,
    /// The plugin's signature file, as it was beside the plugin.
    pub plugin_signature: Option<Value>,
}

/// Why an attestation is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttestationError {
    /// The bundle carries none.
    #[error(
        "bundle {0} carries no validation attestation (built by a pde without attestations, or without a signing key)"
    )]
    Missing(String),
    /// Not an envelope or statement of this format.
    #[error("malformed validation attestation: {0}")]
    Malformed(String),
    /// The release key did not sign it.
    #[error("validation attestation not signed by a trusted release key: {0}")]
    Signature(SignatureError),
    /// It is about another bundle.
    #[error("validation attestation is about {found}, not this bundle {expected}")]
    OtherBundle {
        /// The subject digest it names.
        found: String,
        /// The bundle's digest.
        expected: String,
    },
    /// A validator it names is not one the bundle's manifest records.
    #[error(
        "validation attestation names validator {name} (sha256 {sha256}), which the bundle's manifest does not record"
    )]
    NotInManifest {
        /// Plugin name.
        name: String,
        /// Its sha256.
        sha256: String,
    },
    /// A required validator did not run.
    #[error("required validator {0} did not run on this bundle (its attestation lists: {1})")]
    RequiredMissing(String, String),
    /// A required validator ran and failed.
    #[error("required validator {0} ran with verdict {1:?}")]
    RequiredFailed(String, String),
    /// A validator it names is not signed by a trusted plugin key.
    #[error("validator {name} (sha256 {sha256}) is not signed by a trusted plugin key: {why}")]
    UntrustedPlugin {
        /// Plugin name.
        name: String,
        /// Its sha256.
        sha256: String,
        /// Why its signature does not count.
        why: String,
    },
}

/// DSSE's pre-authentication encoding of `payload`.
pub fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "DSSEv1 {} {payload_type} {} ",
        payload_type.len(),
        payload.len()
    )
    .into_bytes();
    out.extend_from_slice(payload);
    out
}

/// The statement about `bundle` for `validators`, signed with `key`.
pub fn attest(
    bundle: &Bundle,
    pde_version: &str,
    validators: Vec<Validator>,
    key: &ed25519_dalek::SigningKey,
) -> Envelope {
    let manifest = &bundle.payload.manifest;
    let statement = Statement {
        statement_type: STATEMENT_TYPE.to_string(),
        subject: vec![Subject {
            name: format!("policy/{}@{}", manifest.policy_id, manifest.version),
            digest: [(
                "sha256".to_string(),
                bundle.digest.trim_start_matches("sha256:").to_string(),
            )]
            .into(),
        }],
        predicate_type: PREDICATE_TYPE.to_string(),
        predicate: Predicate {
            pde_version: pde_version.to_string(),
            validators,
        },
    };
    let value = serde_json::to_value(&statement).expect("a statement serialises");
    // Names, hex digests, counts and signature files: nothing JCS refuses.
    let bytes = jcs(&value).unwrap_or_else(|_| canonical_json(&value));
    Envelope {
        payload_type: PAYLOAD_TYPE.to_string(),
        signatures: vec![crate::keys::sign(key, &pae(PAYLOAD_TYPE, &bytes))],
        payload: base64::engine::general_purpose::STANDARD.encode(&bytes),
    }
}

impl Envelope {
    /// The statement, once a `release` key's signature over it verifies.
    pub fn open(&self, release: &TrustedKeys) -> Result<Statement, AttestationError> {
        if self.payload_type != PAYLOAD_TYPE {
            return Err(AttestationError::Malformed(format!(
                "payloadType {:?}, expected {PAYLOAD_TYPE:?}",
                self.payload_type
            )));
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(&self.payload)
            .map_err(|e| AttestationError::Malformed(format!("payload is not base64: {e}")))?;
        release
            .verify_any(&pae(&self.payload_type, &bytes), &self.signatures)
            .map_err(AttestationError::Signature)?;
        let statement: Statement = serde_json::from_slice(&bytes)
            .map_err(|e| AttestationError::Malformed(e.to_string()))?;
        if statement.statement_type != STATEMENT_TYPE || statement.predicate_type != PREDICATE_TYPE
        {
            return Err(AttestationError::Malformed(format!(
                "a {} statement of {}, expected {STATEMENT_TYPE} of {PREDICATE_TYPE}",
                statement.statement_type, statement.predicate_type
            )));
        }
        Ok(statement)
    }
}

/// What an agent requires of the validators that ran.
#[derive(Debug, Clone, Default)]
pub struct Requirement {
    /// Keys whose plugin signatures count (`--plugin-key`).
    pub plugin_keys: TrustedKeys,
    /// Validators that must have run and passed (`--require-plugin`).
    pub required: Vec<String>,
}

impl Requirement {
    /// Nothing is required.
    pub fn is_empty(&self) -> bool {
        self.plugin_keys.is_empty() && self.required.is_empty()
    }
}

/// Checks `bundle`'s attestation: signed by a `release` key, about this
/// bundle, naming only validators its manifest records, each signed by one
/// of `req.plugin_keys` (when any is given), and including every required
/// validator with verdict `pass`.
pub fn check(
    bundle: &Bundle,
    release: &TrustedKeys,
    req: &Requirement,
) -> Result<Statement, AttestationError> {
    let envelope = bundle
        .attestation
        .as_ref()
        .ok_or_else(|| AttestationError::Missing(bundle.digest.clone()))?;
    let statement = envelope.open(release)?;
    let expected = bundle.digest.trim_start_matches("sha256:");
    let about_this = statement
        .subject
        .iter()
        .any(|s| s.digest.get("sha256").map(String::as_str) == Some(expected));
    if !about_this {
        return Err(AttestationError::OtherBundle {
            found: statement
                .subject
                .iter()
                .filter_map(|s| s.digest.get("sha256"))
                .map(|d| format!("sha256:{d}"))
                .collect::<Vec<_>>()
                .join(", "),
            expected: bundle.digest.clone(),
        });
    }
    let recorded = &bundle.payload.manifest.validators;
    for v in &statement.predicate.validators {
        if !recorded
            .iter()
            .any(|r| r.name == v.name && r.sha256 == v.sha256)
        {
            return Err(AttestationError::NotInManifest {
                name: v.name.clone(),
                sha256: v.sha256.clone(),
            });
        }
        if !req.plugin_keys.is_empty() {
            plugin_signed(v, &req.plugin_keys).map_err(|why| {
                AttestationError::UntrustedPlugin {
                    name: v.name.clone(),
                    sha256: v.sha256.clone(),
                    why,
                }
            })?;
        }
    }
    for name in &req.required {
        let ran: BTreeSet<&str> = statement
            .predicate
            .validators
            .iter()
            .map(|v| v.name.as_str())
            .collect();
        let Some(v) = statement
            .predicate
            .validators
            .iter()
            .find(|v| &v.name == name)
        else {
            let list = ran.into_iter().collect::<Vec<_>>().join(", ");
            return Err(AttestationError::RequiredMissing(
                name.clone(),
                if list.is_empty() { "none".into() } else { list },
            ));
        };
        if v.verdict != "pass" {
            return Err(AttestationError::RequiredFailed(
                name.clone(),
                v.verdict.clone(),
            ));
        }
    }
    Ok(statement)
}

/// Checks that the plugin signature file carried for `v` is a valid
/// signature by one of `keys` over a manifest naming `v`'s name and sha256.
///
/// The signed message is the plugin host's: the canonical JSON (pde's
/// older form) of the file without `sig`. It is rebuilt here, over the
/// manifest copy the file carries, because the agent has no manifest of its
/// own; the copy's name and sha256 are what bind it to the validator.
fn plugin_signed(v: &Validator, keys: &TrustedKeys) -> Result<(), String> {
    let file = v
        .plugin_signature
        .as_ref()
        .ok_or_else(|| "it ran unsigned".to_string())?;
    let field = |k: &str| file.get(k).cloned().unwrap_or(Value::Null);
    if field("format") != Value::String(PLUGIN_SIGNATURE_FORMAT.into()) {
        return Err(format!(
            "its signature is not of format {PLUGIN_SIGNATURE_FORMAT}"
        ));
    }
    let manifest = field("manifest");
    if manifest.get("sha256").and_then(Value::as_str) != Some(v.sha256.as_str())
        || manifest.get("name").and_then(Value::as_str) != Some(v.name.as_str())
    {
        return Err("its signature covers another plugin".into());
    }
    let message = canonical_json(&serde_json::json!({
        "format": field("format"),
        "manifest": manifest,
        "signer": field("signer"),
        "signed_at": field("signed_at"),
        "note": field("note"),
        "keyid": field("keyid"),
        "alg": field("alg"),
    }));
    let text = |k: &str| file.get(k).and_then(Value::as_str).unwrap_or_default();
    let sig = Signature {
        keyid: text("keyid").to_string(),
        alg: text("alg").to_string(),
        sig: text("sig").to_string(),
    };
    let signer = text("signer");
    keys.verify(&message, &sig)
        .map_err(|e| format!("signed by {signer:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bundle::{Manifest, Payload, ValidatorRecord};

    fn bundle() -> Bundle {
        let key = ed25519_dalek::SigningKey::from_bytes(&[3; 32]);
        Bundle::seal(
            Payload {
                manifest: Manifest {
                    policy_id: "42".into(),
                    version: "1.0.0".into(),
                    source_commit: "c".into(),
                    validators: vec![ValidatorRecord {
                        name: "pii-guard".into(),
                        sha256: "ab".into(),
                        errors: 0,
                        warnings: 0,
                    }],
                },
                policy: serde_json::json!({"id": "42"}),
            },
            &[&key],
        )
        .unwrap()
    }

    fn signed_plugin(key: &ed25519_dalek::SigningKey) -> Value {
        let mut file = serde_json::json!({
            "format": PLUGIN_SIGNATURE_FORMAT,
            "manifest": {"name": "pii-guard", "sha256": "ab", "kind": "validator"},
            "signer": "Security team", "signed_at": "2026-12-01T00:00:00Z", "note": null,
            "keyid": crate::keys::key_id(&key.verifying_key()), "alg": "ed25519",
        });
        let sig = crate::keys::sign(key, &canonical_json(&file)).sig;
        file["sig"] = Value::String(sig);
        file
    }

    #[test]
    fn an_attestation_binds_the_bundle_and_names_signed_validators() {
        let release = ed25519_dalek::SigningKey::from_bytes(&[3; 32]);
        let team = ed25519_dalek::SigningKey::from_bytes(&[4; 32]);
        let other = ed25519_dalek::SigningKey::from_bytes(&[5; 32]);
        let mut trusted_release = TrustedKeys::new();
        trusted_release.add(release.verifying_key());
        let mut team_keys = TrustedKeys::new();
        team_keys.add(team.verifying_key());
        let req = Requirement {
            plugin_keys: team_keys,
            required: vec!["pii-guard".into()],
        };
        let ran = |file: Value| Validator {
            name: "pii-guard".into(),
            sha256: "ab".into(),
            verdict: "pass".into(),
            errors: 0,
            warnings: 0,
            signer_keyid: None,
            signer: None,
            plugin_signature: Some(file),
        };
        let mut b = bundle();
        assert!(matches!(
            check(&b, &trusted_release, &req),
            Err(AttestationError::Missing(_))
        ));
        b.attestation = Some(attest(
            &b,
            "0.1.0",
            vec![ran(signed_plugin(&team))],
            &release,
        ));
        check(&b, &trusted_release, &req).unwrap();
        // The envelope's signature is DSSE's over the raw statement bytes.
        let env = b.attestation.clone().unwrap();
        let raw = base64::engine::general_purpose::STANDARD
            .decode(&env.payload)
            .unwrap();
        trusted_release
            .verify(&pae(PAYLOAD_TYPE, &raw), &env.signatures[0])
            .unwrap();

        b.attestation = Some(attest(
            &b,
            "0.1.0",
            vec![ran(signed_plugin(&other))],
            &release,
        ));
        assert!(matches!(
            check(&b, &trusted_release, &req),
            Err(AttestationError::UntrustedPlugin { .. })
        ));
        b.attestation = Some(attest(&b, "0.1.0", vec![], &release));
        assert!(matches!(
            check(&b, &trusted_release, &req),
            Err(AttestationError::RequiredMissing(..))
        ));
        // Signed by someone else than the release key.
        b.attestation = Some(attest(&b, "0.1.0", vec![ran(signed_plugin(&team))], &other));
        assert!(matches!(
            check(&b, &trusted_release, &req),
            Err(AttestationError::Signature(_))
        ));
        // Moved onto another bundle.
        let mut moved = bundle();
        moved.payload.policy = serde_json::json!({"id": "42", "x": 1});
        moved.digest = moved.payload.digest(&moved.format).unwrap();
        moved.attestation = Some(attest(
            &b,
            "0.1.0",
            vec![ran(signed_plugin(&team))],
            &release,
        ));
        assert!(matches!(
            check(&moved, &trusted_release, &req),
            Err(AttestationError::OtherBundle { .. })
        ));
    }
}
