//! Signed rollback requests (push protocol v3): the proof that a
//! `POST /rollback` comes from whoever holds the release key.
//!
//! A rollback changes what a service enforces exactly as a deploy does
//! (DESIGN §11, "Authority on the wire"), so it carries the same authority: an
//! ed25519 signature by the release key (the one that signs bundles) over a
//! small JSON statement naming what is asked: the policy, the target digest
//! (or `null`, "the one before"), the environment, when, and a nonce.
//!
//! Why each field:
//! - `policy_id`, `to`: what is asked; the receiver refuses a statement that
//!   names another policy or target than the request it rides on.
//! - `env`: a statement signed for staging cannot roll back production; the
//!   receiver compares it with the environment the policy was activated for.
//! - `at`: a captured statement is useless after [`MAX_SKEW_SECS`] either way
//!   of the receiver's clock, so the receiver only has to remember nonces
//!   that long.
//! - `nonce`: within that window, the same statement is accepted once.
//! - `fence` (optional; sent by pde since push protocol v4): the fencing
//!   number of the deploy lock the rollback was made under
//!   ([`crate::fence`]). A v4 receiver refuses one lower than the highest it
//!   has seen for the policy, and a second rollback at the same fence; a v3
//!   receiver checks only that it is a non-negative integer. It is signed
//!   like the rest.
//!
//! The signature is over the RFC 8785 (JCS) bytes of the statement *as
//! received*, so anyone can check it with a stock JCS library, and the format
//! tag is part of what is signed, so a rollback signature can never pass for a
//! bundle, approval or plugin signature (those sign other strings).

use ed25519_dalek::SigningKey;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::canonical::{CanonicalError, jcs};
use crate::keys::{Signature, SignatureError, TrustedKeys};

/// The format tag of a rollback statement.
pub const FORMAT: &str = "pde.rollback/v1";

/// How far a statement's `at` may lie from the receiver's clock, either way,
/// in seconds. Five minutes: wide enough for ordinary clock skew between a
/// release machine and a service (NTP keeps both within a second), narrow
/// enough that a receiver remembers few nonces.
pub const MAX_SKEW_SECS: i64 = 300;

/// The shortest and longest nonce accepted. pde sends 32 hex digits (128
/// random bits); 16 characters is the floor below which a nonce is too
/// guessable to mean "once".
pub const NONCE_LEN: std::ops::RangeInclusive<usize> = 16..=64;

/// What the release key signs: one rollback of one policy, in one
/// environment, at one time, once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Statement {
    /// Always [`FORMAT`].
    pub format: String,
    /// The policy to roll back.
    pub policy_id: String,
    /// The digest to return to, or `None` (JSON `null`) for the bundle that
    /// was active before the current one. Always present on the wire.
    pub to: Option<String>,
    /// The environment the rollback is for.
    pub env: String,
    /// When it was signed, RFC 3339 UTC.
    pub at: String,
    /// Random, used once: 16 to 64 of `A-Z a-z 0-9 _ -`.
    pub nonce: String,
    /// The fencing number of the lock the rollback was made under (push
    /// protocol v4, [`crate::fence`]); at most [`crate::fence::MAX_FENCE`].
    /// Enforced by v4 receivers, accepted and ignored by v3 ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fence: Option<u64>,
}

/// A statement with the release key's signature: the `proof` member of a
/// `POST /rollback` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedRollback {
    /// What is asked.
    pub statement: Statement,
    /// ed25519 over the RFC 8785 bytes of `statement`.
    pub signature: Signature,
}

/// Why a rollback proof was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProofError {
    /// The proof is not a statement and a signature of the expected shape.
    #[error("malformed rollback proof: {0}")]
    Malformed(String),
    /// The signature is not by a trusted key, or does not verify.
    #[error("rollback proof signature rejected: {0}")]
    Signature(SignatureError),
    /// `at` is further than [`MAX_SKEW_SECS`] from the receiver's clock.
    #[error(
        "rollback proof signed at {at} is {skew_secs} s away from this receiver's clock; \
         statements are accepted within ±{MAX_SKEW_SECS} s (check both clocks, then send a freshly signed one)"
    )]
    Expired {
        /// The statement's `at`.
        at: String,
        /// Receiver's time minus `at`, in seconds.
        skew_secs: i64,
    },
}

/// `true` for a well-formed nonce: [`NONCE_LEN`] characters of
/// `A-Z a-z 0-9 _ -` (it is stored and compared as is).
pub fn valid_nonce(nonce: &str) -> bool {
    NONCE_LEN.contains(&nonce.len())
        && nonce
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// `true` for a well-formed target digest: `sha256:` and 64 lowercase hex digits.
pub fn valid_digest(digest: &str) -> bool {
    digest.strip_prefix("sha256:").is_some_and(|hex| {
        hex.len() == 64
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

impl Statement {
    /// A statement for now, with a fresh 128-bit nonce.
    pub fn new(policy_id: &str, to: Option<&str>, env: &str) -> Statement {
        Statement {
            format: FORMAT.to_string(),
            policy_id: policy_id.to_string(),
            to: to.map(str::to_string),
            env: env.to_string(),
            at: crate::clock::now_rfc3339(),
            nonce: format!("{:032x}", rand::random::<u128>()),
            fence: None,
        }
    }

    /// `at` as seconds since the Unix epoch.
    pub fn at_unix(&self) -> Result<i64, ProofError> {
        time::OffsetDateTime::parse(&self.at, &time::format_description::well_known::Rfc3339)
            .map(|t| t.unix_timestamp())
            .map_err(|e| ProofError::Malformed(format!("`at` {:?} is not RFC 3339: {e}", self.at)))
    }

    fn check_shape(&self) -> Result<(), ProofError> {
        let bad = |what: String| Err(ProofError::Malformed(what));
        if self.format != FORMAT {
            return bad(format!(
                "statement format {:?}, expected {FORMAT:?}",
                self.format
            ));
        }
        if !crate::wire::valid_policy_id(&self.policy_id) {
            return bad("`policy_id` is not a valid policy id".into());
        }
        if !crate::wire::valid_env(&self.env) {
            return bad(
                "`env` must be 1 to 128 of A-Z a-z 0-9 . _ - starting with a letter or digit"
                    .into(),
            );
        }
        if self.to.as_deref().is_some_and(|d| !valid_digest(d)) {
            return bad("`to` must be null or sha256:<64 lowercase hex digits>".into());
        }
        if self.fence.is_some_and(|f| f > crate::fence::MAX_FENCE) {
            return bad(format!(
                "`fence` must be at most {}",
                crate::fence::MAX_FENCE
            ));
        }
        if !valid_nonce(&self.nonce) {
            return bad(format!(
                "`nonce` must be {} to {} of A-Z a-z 0-9 _ -",
                NONCE_LEN.start(),
                NONCE_LEN.end()
            ));
        }
        self.at_unix().map(|_| ())
    }
}

impl SignedRollback {
    /// Signs `statement` with the release key.
    pub fn sign(statement: Statement, key: &SigningKey) -> Result<SignedRollback, CanonicalError> {
        let value = serde_json::to_value(&statement).unwrap_or(Value::Null);
        let message = jcs(&value)?;
        Ok(SignedRollback {
            signature: crate::keys::sign(key, &message),
            statement,
        })
    }

    /// Checks a proof as received (the `proof` member of the body): its
    /// shape, the signature over the JCS bytes of `statement` exactly as
    /// sent, by one of `trusted`, and that `at` lies within
    /// [`MAX_SKEW_SECS`] of `now_unix`. Returns the statement; comparing it
    /// with the request and spending its nonce is the receiver's part.
    pub fn verify(
        proof: &Value,
        trusted: &TrustedKeys,
        now_unix: i64,
    ) -> Result<Statement, ProofError> {
        let malformed = |e: String| ProofError::Malformed(e);
        let object = proof
            .as_object()
            .ok_or_else(|| malformed("`proof` must be an object {statement, signature}".into()))?;
        if let Some(extra) = object
            .keys()
            .find(|k| !matches!(k.as_str(), "statement" | "signature"))
        {
            return Err(malformed(format!("unknown member {extra:?} in `proof`")));
        }
        let raw = object
            .get("statement")
            .filter(|s| s.is_object())
            .ok_or_else(|| malformed("`proof.statement` must be an object".into()))?;
        if raw.get("to").is_none() {
            return Err(malformed(
                "`proof.statement.to` must be present (a digest, or null)".into(),
            ));
        }
        let statement: Statement =
            serde_json::from_value(raw.clone()).map_err(|e| malformed(e.to_string()))?;
        statement.check_shape()?;
        let signature: Signature = object
            .get("signature")
            .cloned()
            .ok_or_else(|| malformed("`proof.signature` is missing".into()))
            .and_then(|s| serde_json::from_value(s).map_err(|e| malformed(e.to_string())))?;
        let message = jcs(raw).map_err(|e| malformed(e.to_string()))?;
        trusted
            .verify(&message, &signature)
            .map_err(ProofError::Signature)?;
        // Checked after the signature, so a forger learns nothing about the
        // receiver's clock.
        let skew_secs = now_unix - statement.at_unix()?;
        if skew_secs.abs() > MAX_SKEW_SECS {
            return Err(ProofError::Expired {
                at: statement.at.clone(),
                skew_secs,
            });
        }
        Ok(statement)
    }
}

/// The body of a `POST /rollback`: `policy_id` and `to` (what a protocol-v2
/// receiver reads), the `fence` of the lock it is made under (v4; also read
/// by receivers that trust no key), and, when a release key is given, a
/// freshly signed `proof` of the same request for `env`, fence included.
pub fn request_body(
    policy_id: &str,
    to: Option<&str>,
    env: &str,
    fence: Option<u64>,
    key: Option<&SigningKey>,
) -> Result<Value, CanonicalError> {
    let mut body = serde_json::json!({"policy_id": policy_id, "to": to});
    if let Some(fence) = fence {
        body["fence"] = fence.into();
    }
    if let Some(key) = key {
        let statement = Statement {
            fence,
            ..Statement::new(policy_id, to, env)
        };
        let proof = SignedRollback::sign(statement, key)?;
        body["proof"] = serde_json::to_value(proof).unwrap_or(Value::Null);
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn trusting(k: &SigningKey) -> TrustedKeys {
        let mut t = TrustedKeys::new();
        t.add(k.verifying_key());
        t
    }

    fn now() -> i64 {
        time::OffsetDateTime::now_utc().unix_timestamp()
    }

    fn proof(st: Statement, k: &SigningKey) -> Value {
        serde_json::to_value(SignedRollback::sign(st, k).unwrap()).unwrap()
    }

    #[test]
    fn a_fresh_statement_by_a_trusted_key_verifies_and_round_trips() {
        let k = key(1);
        let st = Statement::new("42", None, "production");
        assert!(valid_nonce(&st.nonce));
        let p = proof(st.clone(), &k);
        assert_eq!(p["statement"]["to"], Value::Null, "`to` is always sent");
        assert!(p["statement"].get("fence").is_none());
        assert_eq!(SignedRollback::verify(&p, &trusting(&k), now()), Ok(st));
        // Two statements never share a nonce.
        assert_ne!(
            Statement::new("42", None, "p").nonce,
            Statement::new("42", None, "p").nonce
        );
    }

    #[test]
    fn any_altered_field_an_untrusted_key_or_a_stale_time_is_refused() {
        let k = key(1);
        let st = Statement::new("42", None, "production");
        let p = proof(st.clone(), &k);
        for (field, value) in [
            ("policy_id", Value::from("43")),
            ("env", Value::from("staging")),
            ("to", Value::from(format!("sha256:{}", "a".repeat(64)))),
            ("nonce", Value::from("b".repeat(32))),
            ("fence", Value::from(7)),
        ] {
            let mut altered = p.clone();
            altered["statement"][field] = value;
            assert!(
                matches!(
                    SignedRollback::verify(&altered, &trusting(&k), now()),
                    Err(ProofError::Signature(SignatureError::Invalid(_)))
                ),
                "{field}"
            );
        }
        assert!(matches!(
            SignedRollback::verify(&p, &trusting(&key(2)), now()),
            Err(ProofError::Signature(SignatureError::UntrustedKey(_)))
        ));
        // Relative to the statement's own second, not the clock now: a
        // second that ticks between signing and checking (a loaded CI
        // machine) must not move the boundary.
        let at = st.at_unix().unwrap();
        for skew in [MAX_SKEW_SECS + 1, -MAX_SKEW_SECS - 1] {
            assert!(matches!(
                SignedRollback::verify(&p, &trusting(&k), at + skew),
                Err(ProofError::Expired { .. })
            ));
        }
        for skew in [MAX_SKEW_SECS, -MAX_SKEW_SECS] {
            assert!(SignedRollback::verify(&p, &trusting(&k), at + skew).is_ok());
        }
    }

    #[test]
    fn shapes_outside_the_statement_format_are_malformed() {
        let k = key(1);
        let good = Statement::new("42", None, "production");
        let mut cases = Vec::new();
        let alterations: [fn(&mut Statement); 6] = [
            |s: &mut Statement| s.format = "pde.approval/v1".into(),
            |s: &mut Statement| s.policy_id = "../42".into(),
            |s: &mut Statement| s.env = "prod uction".into(),
            |s: &mut Statement| s.nonce = "short".into(),
            |s: &mut Statement| s.at = "yesterday".into(),
            |s: &mut Statement| s.to = Some("sha256:XYZ".into()),
        ];
        for f in alterations {
            let mut s = good.clone();
            f(&mut s);
            cases.push(proof(s, &k));
        }
        let mut extra = proof(good.clone(), &k);
        extra["statement"]["by"] = "mallory".into();
        cases.push(extra);
        let mut no_to = proof(good.clone(), &k);
        no_to["statement"].as_object_mut().unwrap().remove("to");
        cases.push(no_to);
        cases.push(serde_json::json!("not an object"));
        for p in cases {
            assert!(
                matches!(
                    SignedRollback::verify(&p, &trusting(&k), now()),
                    Err(ProofError::Malformed(_))
                ),
                "{p}"
            );
        }
    }

    #[test]
    fn a_fence_is_signed_and_accepted_up_to_its_bound() {
        let k = key(1);
        let mut st = Statement::new("42", None, "production");
        st.fence = Some(12);
        let p = proof(st.clone(), &k);
        assert_eq!(p["statement"]["fence"], 12);
        assert_eq!(SignedRollback::verify(&p, &trusting(&k), now()), Ok(st));
        let mut over = p.clone();
        over["statement"]["fence"] = (crate::fence::MAX_FENCE + 1).into();
        assert!(matches!(
            SignedRollback::verify(&over, &trusting(&k), now()),
            Err(ProofError::Malformed(_))
        ));
    }

    #[test]
    fn request_bodies_carry_a_proof_only_with_a_key() {
        let k = key(1);
        let plain = request_body("42", None, "prod", None, None).unwrap();
        assert_eq!(plain, serde_json::json!({"policy_id": "42", "to": null}));
        let signed = request_body("42", None, "prod", Some(9), Some(&k)).unwrap();
        assert_eq!(signed["fence"], 9);
        let st = SignedRollback::verify(&signed["proof"], &trusting(&k), now()).unwrap();
        assert_eq!((st.policy_id.as_str(), st.env.as_str()), ("42", "prod"));
        assert_eq!(st.fence, Some(9), "the fence is signed");
    }
}
