//! The signed release both fan-out benches deliver: `push_fanout` (engine)
//! and `fanout_oci` (cli, which includes this file by path), so that push
//! and publish are measured with the same bundle.
// Bench code: a failed seal is a failed bench.
#![allow(clippy::expect_used)]

use pde::bundle::{Bundle, Manifest, Payload};
use serde_json::json;

/// The release key that signs the bundle (and each push's fence).
pub fn release_key() -> ed25519_dalek::SigningKey {
    ed25519_dalek::SigningKey::from_bytes(&[7; 32])
}

/// A signed bundle of `policy_id` at `version`, a policy of realistic size
/// (40 rules).
pub fn bundle(policy_id: &str, version: &str) -> Bundle {
    let rules: Vec<_> = (0..40)
        .map(|i| {
            json!({"key": format!("eligibility.rule_{i}"), "category": "eligibility",
                   "value": i * 100, "description": "Household income ceiling for the programme"})
        })
        .collect();
    let payload = Payload {
        manifest: Manifest {
            policy_id: policy_id.into(),
            version: version.into(),
            source_commit: "0123456789abcdef0123456789abcdef01234567".into(),
            validators: vec![],
        },
        policy: json!({"id": policy_id, "version": version, "title": "Benefit eligibility",
                       "agency": "HMS", "effective": "2026-01-01", "rules": rules}),
    };
    Bundle::seal(payload, &[&release_key()]).expect("seals")
}
