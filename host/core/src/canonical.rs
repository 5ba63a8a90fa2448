//! Canonical JSON: the byte form every digest in pde is computed over.
//!
//! Object keys are sorted by their UTF-16 code units and no insignificant
//! whitespace is written (RFC 8785's structure). A leaf: it imports nothing
//! from pde, so the bundle, the audit log and the agent share one definition.

use serde_json::Value;
use sha2::{Digest, Sha256};

/// Writes `value` as canonical JSON: keys sorted by their UTF-16 code units
/// (RFC 8785), no whitespace.
pub fn canonical_json(value: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    write_canonical(value, &mut out);
    out
}

fn write_canonical(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.encode_utf16().cmp(b.0.encode_utf16()));
            out.push(b'{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                // Serialising a string or number cannot fail.
                serde_json::to_writer(&mut *out, k).expect("string serialises");
                out.push(b':');
                write_canonical(v, out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(v, out);
            }
            out.push(b']');
        }
        scalar => serde_json::to_writer(&mut *out, scalar).expect("scalar serialises"),
    }
}

/// `sha256:<hex>` of the canonical form of `value`.
pub fn digest_of(value: &Value) -> String {
    format!(
        "sha256:{}",
        hex::encode(Sha256::digest(canonical_json(value)))
    )
}
