//! Signed approvals: who signed off on exactly which policy content.
//!
//! An approval is an ed25519 signature over a small JSON statement that names
//! the policy, its version and its *content digest*: the sha256 of the RFC 8785
//! form of the policy document without its `approvals` field. Binding the
//! digest (not the file, not the version) is what makes an edit after approval
//! visible: change one rule and every approval stops matching.
//!
//! Approvals travel beside the bundle's signatures, outside the payload, for
//! the same reason signatures do: adding an approval must not change the
//! bundle digest, or a bundle deployed to staging could not be promoted to a
//! production that needs one more sign-off. Each approval stands on its own:
//! whoever holds the bundle and the approver's public key can check it.
//!
//! The pusher ([`tally`] in the engine's validate step) and the agent
//! (`--min-approvals`) count approvals with the same function, so the two can
//! never disagree on what counts.

use std::collections::{BTreeMap, BTreeSet};

use ed25519_dalek::{SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::canonical::{CanonicalError, jcs, jcs_digest};
use crate::keys::{Signature, SignatureError, TrustedKeys, key_id};

/// The format tag of an approval statement. It is part of what is signed,
/// so an approval signature can never be mistaken for a bundle or plugin one.
pub const FORMAT: &str = "pde.approval/v1";

/// What an approver signs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Statement {
    /// Always [`FORMAT`].
    pub format: String,
    /// The policy approved.
    pub policy_id: String,
    /// Its version, for people; the digest is what binds.
    pub version: String,
    /// [`policy_digest`] of the approved document.
    pub policy_digest: String,
    /// Who approved, as they named themselves.
    pub by: String,
    /// The role they approved in (`legal`, `program`…); credited only if the
    /// workspace trusts their key for that role.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// Free text for the record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// When, RFC 3339 UTC.
    pub at: String,
}

/// A statement with its signature, as stored in
/// `policies/<id>.approvals/<keyid>.json` and carried in bundles.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedApproval {
    /// What was approved.
    pub statement: Statement,
    /// ed25519 over the RFC 8785 bytes of `statement`.
    pub signature: Signature,
}

/// The content digest approvals bind: `sha256:<hex>` of the RFC 8785 form
/// of `policy` without its `approvals` field (unsigned entries there may be
/// added or removed without touching what was approved).
pub fn policy_digest(policy: &Value) -> Result<String, CanonicalError> {
    let mut content = policy.clone();
    if let Some(object) = content.as_object_mut() {
        object.remove("approvals");
    }
    jcs_digest(&content)
}

impl SignedApproval {
    /// Signs `statement` with `key`.
    pub fn sign(statement: Statement, key: &SigningKey) -> Result<SignedApproval, CanonicalError> {
        let message = statement_bytes(&statement)?;
        Ok(SignedApproval {
            signature: crate::keys::sign(key, &message),
            statement,
        })
    }

    /// The key id of the signer, as the approval claims it.
    pub fn keyid(&self) -> &str {
        &self.signature.keyid
    }
}

fn statement_bytes(statement: &Statement) -> Result<Vec<u8>, CanonicalError> {
    let value = serde_json::to_value(statement).unwrap_or(Value::Null);
    jcs(&value)
}

/// One key allowed to approve, and the roles it is trusted for.
#[derive(Debug, Clone)]
struct Approver {
    trust: TrustedKeys,
    roles: BTreeSet<String>,
}

/// The keys whose approvals count (`[trust] approver_keys`, or the agent's
/// `--approver-key`), each with the roles it may approve in.
#[derive(Debug, Clone, Default)]
pub struct Approvers {
    by_keyid: BTreeMap<String, Approver>,
}

impl Approvers {
    /// Nobody may approve.
    pub fn new() -> Approvers {
        Approvers::default()
    }

    /// Trusts `key` to approve, in each of `roles` (none: it counts towards
    /// `min_approvals` but is credited with no role).
    pub fn add(&mut self, key: VerifyingKey, roles: &[String]) -> &mut Self {
        let mut trust = TrustedKeys::new();
        trust.add(key);
        self.by_keyid.insert(
            key_id(&key),
            Approver {
                trust,
                roles: roles.iter().map(|r| r.trim().to_string()).collect(),
            },
        );
        self
    }

    /// Stops counting approvals by these key ids (a stolen or retired
    /// approver key); they are reported as revoked, not as unknown.
    pub fn revoke<S: AsRef<str>>(&mut self, key_ids: &[S]) -> &mut Self {
        for approver in self.by_keyid.values_mut() {
            approver.trust.revoke(key_ids);
        }
        self
    }

    /// True when no key may approve.
    pub fn is_empty(&self) -> bool {
        self.by_keyid.is_empty()
    }

    /// The trusted approver key ids.
    pub fn key_ids(&self) -> Vec<String> {
        self.by_keyid.keys().cloned().collect()
    }
}

/// Why one approval does not count.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// The statement is for another policy.
    #[error("approval by {by} is for policy {found:?}, not {expected:?}")]
    OtherPolicy {
        /// Who signed it.
        by: String,
        /// The policy it names.
        found: String,
        /// The policy being checked.
        expected: String,
    },
    /// The policy changed after it was approved.
    #[error(
        "approval by {by} (key {keyid}) covers {approved}, but the policy is now {current}: it was edited after approval"
    )]
    Stale {
        /// Who signed it.
        by: String,
        /// The signer's key id.
        keyid: String,
        /// The digest that was approved.
        approved: String,
        /// The digest of the policy as it is now.
        current: String,
    },
    /// Not signed by a trusted approver key, or the signature is bad.
    #[error("approval by {by}: {source}")]
    Signature {
        /// Who it claims to be by.
        by: String,
        /// What is wrong with the signature.
        source: SignatureError,
    },
    /// The same key approved more than once; it counts once.
    #[error("approval by {by}: key {keyid} already approved; one key counts once")]
    Duplicate {
        /// Who signed it.
        by: String,
        /// The key that signed twice.
        keyid: String,
    },
    /// The statement is of an unknown format, or cannot be canonicalised.
    #[error("approval by {by}: {reason}")]
    Malformed {
        /// Who it claims to be by.
        by: String,
        /// What is wrong.
        reason: String,
    },
}

/// An approval that counts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Counted {
    /// The approver's key id.
    pub keyid: String,
    /// Who they say they are.
    pub by: String,
    /// The role they are credited with, when their key is trusted for it.
    pub role: Option<String>,
    /// A role they claimed but their key is not trusted for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uncredited_role: Option<String>,
    /// The digest they approved.
    pub policy_digest: String,
    /// When.
    pub at: String,
}

/// The verdict over a set of approvals.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tally {
    /// One entry per distinct trusted key with a valid approval of this content.
    pub counted: Vec<Counted>,
    /// Every approval that does not count, with why, in input order.
    pub rejected: Vec<Rejection>,
}

impl Tally {
    /// The roles credited by the counted approvals.
    pub fn roles(&self) -> BTreeSet<&str> {
        self.counted
            .iter()
            .filter_map(|c| c.role.as_deref())
            .collect()
    }

    /// True when any approval was signed over an earlier edit of the policy.
    pub fn has_stale(&self) -> bool {
        self.rejected
            .iter()
            .any(|r| matches!(r, Rejection::Stale { .. }))
    }
}

/// Counts `approvals` of policy `policy_id` whose content digest is now
/// `current_digest`: each must name this policy and digest, be signed by a
/// key in `approvers`, and come from a key not already counted.
pub fn tally(
    approvals: &[SignedApproval],
    policy_id: &str,
    current_digest: &str,
    approvers: &Approvers,
) -> Tally {
    let mut out = Tally::default();
    let mut seen = BTreeSet::new();
    for approval in approvals {
        match check_one(approval, policy_id, current_digest, approvers) {
            Err(rejection) => out.rejected.push(rejection),
            Ok(counted) if !seen.insert(counted.keyid.clone()) => {
                out.rejected.push(Rejection::Duplicate {
                    by: counted.by,
                    keyid: counted.keyid,
                })
            }
            Ok(counted) => out.counted.push(counted),
        }
    }
    out
}

fn check_one(
    approval: &SignedApproval,
    policy_id: &str,
    current_digest: &str,
    approvers: &Approvers,
) -> Result<Counted, Rejection> {
    let statement = &approval.statement;
    let by = crate::term::escape(&statement.by).into_owned();
    if statement.format != FORMAT {
        return Err(Rejection::Malformed {
            by,
            reason: format!(
                "unknown approval format {:?} (expected {FORMAT:?})",
                crate::term::escape(&statement.format).into_owned()
            ),
        });
    }
    if statement.policy_id != policy_id {
        return Err(Rejection::OtherPolicy {
            by,
            found: crate::term::escape(&statement.policy_id).into_owned(),
            expected: policy_id.to_string(),
        });
    }
    // The signature first: a stale *forged* approval is a forgery, and the
    // message must not credit its claims with an identity.
    let keyid = approval.keyid();
    let approver = approvers
        .by_keyid
        .get(keyid)
        .ok_or_else(|| Rejection::Signature {
            by: by.clone(),
            source: SignatureError::UntrustedKey(crate::term::escape(keyid).into_owned()),
        })?;
    let message = statement_bytes(statement).map_err(|e| Rejection::Malformed {
        by: by.clone(),
        reason: e.to_string(),
    })?;
    approver
        .trust
        .verify(&message, &approval.signature)
        .map_err(|source| Rejection::Signature {
            by: by.clone(),
            source,
        })?;
    if statement.policy_digest != current_digest {
        return Err(Rejection::Stale {
            by,
            keyid: keyid.to_string(),
            approved: crate::term::escape(&statement.policy_digest).into_owned(),
            current: current_digest.to_string(),
        });
    }
    let claimed = statement.role.as_ref().map(|r| r.trim().to_string());
    let (role, uncredited_role) = match claimed {
        Some(r) if approver.roles.contains(&r) => (Some(r), None),
        other => (None, other),
    };
    Ok(Counted {
        keyid: keyid.to_string(),
        by: statement.by.clone(),
        role,
        uncredited_role,
        policy_digest: statement.policy_digest.clone(),
        at: statement.at.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn key(n: u8) -> SigningKey {
        SigningKey::from_bytes(&[n; 32])
    }

    fn approve(k: &SigningKey, policy: &Value, role: Option<&str>) -> SignedApproval {
        SignedApproval::sign(
            Statement {
                format: FORMAT.into(),
                policy_id: "42".into(),
                version: "1.0.0".into(),
                policy_digest: policy_digest(policy).unwrap(),
                by: format!("approver-{}", key_id(&k.verifying_key())),
                role: role.map(str::to_string),
                note: None,
                at: "2026-11-29T00:00:00Z".into(),
            },
            k,
        )
        .unwrap()
    }

    fn policy() -> Value {
        json!({"id": "42", "version": "1.0.0", "rules": [{"key": "a", "value": 1.5}],
               "approvals": [{"by": "x", "role": "y", "at": "z"}]})
    }

    #[test]
    fn digest_ignores_unsigned_approvals_but_nothing_else() {
        let p = policy();
        let mut q = p.clone();
        q["approvals"] = json!([]);
        assert_eq!(policy_digest(&p).unwrap(), policy_digest(&q).unwrap());
        q["rules"][0]["value"] = json!(1.25);
        assert_ne!(policy_digest(&p).unwrap(), policy_digest(&q).unwrap());
    }

    #[test]
    fn counts_distinct_trusted_keys_over_this_digest_only() {
        let (a, b, c) = (key(1), key(2), key(3));
        let mut approvers = Approvers::new();
        approvers
            .add(a.verifying_key(), &["legal".into()])
            .add(b.verifying_key(), &[]);
        let p = policy();
        let digest = policy_digest(&p).unwrap();
        let mut edited = p.clone();
        edited["rules"][0]["value"] = json!(2);

        let approvals = vec![
            approve(&a, &p, Some("legal")),
            approve(&a, &p, Some("legal")),  // duplicate key
            approve(&b, &p, Some("legal")),  // counts, but not as legal
            approve(&c, &p, None),           // untrusted
            approve(&b, &edited, Some("x")), // stale (and duplicate key)
        ];
        let t = tally(&approvals, "42", &digest, &approvers);
        assert_eq!(t.counted.len(), 2, "{t:?}");
        assert_eq!(t.roles(), BTreeSet::from(["legal"]));
        assert_eq!(t.counted[1].uncredited_role.as_deref(), Some("legal"));
        assert!(matches!(t.rejected[0], Rejection::Duplicate { .. }));
        assert!(matches!(
            t.rejected[1],
            Rejection::Signature {
                source: SignatureError::UntrustedKey(_),
                ..
            }
        ));
        assert!(matches!(t.rejected[2], Rejection::Stale { .. }));
        assert!(t.has_stale());

        // The same approvals over the edited policy: only b's stale one matches now.
        let t = tally(
            &approvals,
            "42",
            &policy_digest(&edited).unwrap(),
            &approvers,
        );
        assert_eq!(t.counted.len(), 1);
        assert_eq!(t.counted[0].keyid, key_id(&b.verifying_key()));
    }

    #[test]
    fn forged_and_altered_statements_are_refused() {
        let a = key(1);
        let mut approvers = Approvers::new();
        approvers.add(a.verifying_key(), &["legal".into()]);
        let p = policy();
        let digest = policy_digest(&p).unwrap();

        // A statement whose role was changed after signing.
        let mut altered = approve(&a, &p, Some("program"));
        altered.statement.role = Some("legal".into());
        // Signed by another key but claiming a's key id.
        let mut forged = approve(&key(9), &p, Some("legal"));
        forged.signature.keyid = key_id(&a.verifying_key());
        // Another policy's approval moved over.
        let mut moved = approve(&a, &p, None);
        moved.statement.policy_id = "43".into();

        let t = tally(&[altered, forged, moved], "42", &digest, &approvers);
        assert!(t.counted.is_empty());
        assert!(matches!(
            t.rejected[0],
            Rejection::Signature {
                source: SignatureError::Invalid(_),
                ..
            }
        ));
        assert!(matches!(
            t.rejected[1],
            Rejection::Signature {
                source: SignatureError::Invalid(_),
                ..
            }
        ));
        assert!(matches!(t.rejected[2], Rejection::OtherPolicy { .. }));
    }

    #[test]
    fn a_revoked_approver_key_no_longer_counts() {
        let (a, b) = (key(1), key(2));
        let mut approvers = Approvers::new();
        approvers
            .add(a.verifying_key(), &[])
            .add(b.verifying_key(), &[]);
        let p = policy();
        let digest = policy_digest(&p).unwrap();
        let both = [approve(&a, &p, None), approve(&b, &p, None)];
        assert_eq!(tally(&both, "42", &digest, &approvers).counted.len(), 2);
        approvers.revoke(&[key_id(&a.verifying_key())]);
        let t = tally(&both, "42", &digest, &approvers);
        assert_eq!(t.counted.len(), 1);
        assert!(matches!(
            t.rejected[0],
            Rejection::Signature {
                source: SignatureError::Revoked(_),
                ..
            }
        ));
    }

    #[test]
    fn statements_reject_unknown_fields() {
        let a = approve(&key(1), &policy(), None);
        let mut v = serde_json::to_value(&a).unwrap();
        v["statement"]["extra"] = json!(true);
        assert!(serde_json::from_value::<SignedApproval>(v).is_err());
    }
}
