//! Canonical JSON: the byte forms every digest in pde is computed over.
//!
//! Two forms live here, because digests already out in the world must keep
//! verifying:
//!
//! - [`jcs`] is RFC 8785 (JSON Canonicalization Scheme) proper, delegated to
//!   `serde_json_canonicalizer` so that numbers are written the way every other
//!   JCS implementation writes them (`1.0` → `1`, `1e21` → `1e+21`,
//!   `2.5e-7` → `2.5e-7`). Bundles `pde.bundle/v2` are hashed over this form,
//!   so anyone can recompute a digest with a stock JCS library.
//! - [`canonical_json`] is pde's older form: RFC 8785's key order and no
//!   whitespace, but numbers as `serde_json` writes them. Bundles
//!   `pde.bundle/v1`, the audit chain and plugin signatures were hashed over it,
//!   and changing it would invalidate every one of them, so it stays as is.
//!
//! JCS writes every number as an IEEE 754 double. An integer beyond
//! ±(2^53−1) would be silently rounded, so [`jcs`] refuses it
//! ([`unrepresentable_numbers`] names each one by its JSON pointer).
//!
//! A leaf: it imports nothing from pde, so the bundle, the audit log and the
//! agent share one definition.

use serde_json::Value;
use sha2::{Digest, Sha256};

/// The largest integer magnitude an IEEE 754 double (and so JCS) holds exactly: 2^53 − 1.
pub const MAX_SAFE_INTEGER: u64 = (1 << 53) - 1;

/// Why a value has no RFC 8785 canonical form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CanonicalError {
    /// A number that a double cannot hold exactly.
    #[error(
        "number {number} at {pointer:?} cannot be written exactly in RFC 8785 canonical JSON: integers (and doubles from 2^53 up to 1e21, which it writes as integers) must lie within ±(2^53−1) (write it as a string instead)"
    )]
    Number {
        /// JSON pointer (RFC 6901) to the number; `""` is the whole document.
        pointer: String,
        /// The number as parsed.
        number: String,
    },
    /// The canonicaliser refused the value (not expected for a parsed [`Value`]).
    #[error("cannot canonicalise: {0}")]
    Serialize(String),
}

/// Writes `value` in pde's v1 canonical form: keys sorted by their UTF-16
/// code units (RFC 8785), no whitespace, numbers as `serde_json` writes them.
///
/// Not RFC 8785 for non-integral numbers; use [`jcs`] for anything new that
/// an outsider must be able to recompute.
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

/// `sha256:<hex>` of the v1 canonical form of `value` (see [`canonical_json`]).
pub fn digest_of(value: &Value) -> String {
    format!(
        "sha256:{}",
        hex::encode(Sha256::digest(canonical_json(value)))
    )
}

/// Writes `value` as RFC 8785 canonical JSON, refusing numbers it would round.
pub fn jcs(value: &Value) -> Result<Vec<u8>, CanonicalError> {
    if let Some(first) = unrepresentable_numbers(value).into_iter().next() {
        return Err(first);
    }
    serde_json_canonicalizer::to_vec(value).map_err(|e| CanonicalError::Serialize(e.to_string()))
}

/// `sha256:<hex>` of the RFC 8785 form of `value` (see [`jcs`]).
pub fn jcs_digest(value: &Value) -> Result<String, CanonicalError> {
    Ok(format!(
        "sha256:{}",
        hex::encode(Sha256::digest(jcs(value)?))
    ))
}

/// Every number in `value` that RFC 8785 cannot write exactly, in document
/// order, each with its JSON pointer.
///
/// Only integers can be affected: a parsed float already is a double, and
/// NaN or ±Infinity cannot be held by a [`Value`] at all (parsers that meet
/// them must refuse them, as pde's policy reader does).
pub fn unrepresentable_numbers(value: &Value) -> Vec<CanonicalError> {
    let mut out = Vec::new();
    let mut pointer = String::new();
    walk(value, &mut pointer, &mut out);
    out
}

fn walk(value: &Value, pointer: &mut String, out: &mut Vec<CanonicalError>) {
    match value {
        Value::Number(n) => {
            let too_big = match (n.as_u64(), n.as_i64()) {
                (Some(u), _) => u > MAX_SAFE_INTEGER,
                (None, Some(i)) => i.unsigned_abs() > MAX_SAFE_INTEGER,
                // A double from 2^53 up to 1e21 is written by RFC 8785 as
                // plain integer digits ("4.8e17" → "480000000000000000"),
                // which every reader then sees as an integer beyond
                // ±(2^53−1): stock JCS libraries refuse to canonicalise it
                // again, so a verifier could not recompute the digest.
                (None, None) => n
                    .as_f64()
                    .is_some_and(|f| f.abs() > MAX_SAFE_INTEGER as f64 && f.abs() < 1e21),
            };
            if too_big {
                out.push(CanonicalError::Number {
                    pointer: pointer.clone(),
                    number: n.to_string(),
                });
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                let len = pointer.len();
                pointer.push('/');
                pointer.push_str(&i.to_string());
                walk(v, pointer, out);
                pointer.truncate(len);
            }
        }
        Value::Object(map) => {
            for (k, v) in map {
                let len = pointer.len();
                pointer.push('/');
                pointer.push_str(&k.replace('~', "~0").replace('/', "~1"));
                walk(v, pointer, out);
                pointer.truncate(len);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn jcs_writes_numbers_as_rfc_8785_does() {
        // Vectors from RFC 8785 §3.2.2.3 and appendix B.
        let v: Value = serde_json::from_str(
            r#"{"numbers":[333333333.33333329,1E30,4.50,2e-3,0.000000000000000000000000001,1.0,-0.0,1e21,1e-7,2.5e-7,9007199254740991]}"#,
        )
        .unwrap();
        assert_eq!(
            String::from_utf8(jcs(&v).unwrap()).unwrap(),
            r#"{"numbers":[333333333.3333333,1e+30,4.5,0.002,1e-27,1,0,1e+21,1e-7,2.5e-7,9007199254740991]}"#
        );
    }

    #[test]
    fn jcs_refuses_integers_a_double_would_round_and_names_them() {
        let v = json!({"rules": [{"value": 9_007_199_254_740_992_u64}], "ok": -9_007_199_254_740_991_i64, "a/b": -9_007_199_254_740_993_i64});
        let found = unrepresentable_numbers(&v);
        let pointers: Vec<_> = found
            .iter()
            .map(|e| match e {
                CanonicalError::Number { pointer, .. } => pointer.as_str(),
                other => panic!("{other}"),
            })
            .collect();
        assert_eq!(pointers, ["/a~1b", "/rules/0/value"]);
        assert!(jcs(&v).is_err());
        assert!(jcs(&json!({"max": 9_007_199_254_740_991_u64})).is_ok());
    }

    #[test]
    fn doubles_that_jcs_writes_as_unsafe_integers_are_refused() {
        // Found by tests/all/fuzz.rs: 4.876967313192871e17 canonicalised to
        // "487696731319287100", which no JCS implementation reads back.
        let v: Value = serde_json::from_str(
            r#"{"a": 4.876967313192871e17, "b": -9007199254740992.0, "ok": [9007199254740991.0, 1e21, 1.5e300, 0.5]}"#,
        )
        .unwrap();
        let pointers: Vec<String> = unrepresentable_numbers(&v)
            .into_iter()
            .map(|e| match e {
                CanonicalError::Number { pointer, .. } => pointer,
                other => panic!("{other}"),
            })
            .collect();
        assert_eq!(pointers, ["/a", "/b"]);
        let ok = jcs(&v["ok"]).unwrap();
        assert_eq!(
            String::from_utf8(ok.clone()).unwrap(),
            "[9007199254740991,1e+21,1.5e+300,0.5]"
        );
        // What it writes, it reads back and writes identically.
        let back: Value = serde_json::from_slice(&ok).unwrap();
        assert_eq!(jcs(&back).unwrap(), ok);
    }

    #[test]
    fn v1_form_is_unchanged_for_floats() {
        // Digests of v1 bundles and of the audit chain depend on this staying put.
        let v = json!({"b": 1.0, "a": 1e21, "c": 4.5e-7});
        assert_eq!(canonical_json(&v), br#"{"a":1e+21,"b":1.0,"c":4.5e-7}"#);
        assert_eq!(jcs(&v).unwrap(), br#"{"a":1e+21,"b":1,"c":4.5e-7}"#);
    }
}
