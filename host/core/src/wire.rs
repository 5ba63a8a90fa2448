//! Wire types of the push protocol (DESIGN §8) that both sides share: the
//! pusher in the engine and the receiving agent.

use serde::{Deserialize, Serialize};

/// The current push protocol version: 4 adds fencing numbers
/// ([`crate::fence`]) to version 3 (signed rollbacks, [`crate::rollback`]),
/// which added them to version 2 (per-policy activation).
pub const PROTOCOL_VERSION: u32 = 4;

/// The push protocol versions this build speaks: what an agent announces in
/// `GET /healthz` and `pde --version` prints. A version-4 receiver still
/// takes a version-3 request (no fence) for a policy it has never seen a
/// fence for, so it lists 3; it refuses the unsigned rollbacks of version
/// 2, so it does not list 2. A version-4 pusher still delivers to version-3
/// receivers, which ignore the fence, and to version-2 ones, which also
/// ignore the proof.
pub const PROTOCOL_VERSIONS: &[u32] = &[3, PROTOCOL_VERSION];

/// One policy's active bundle on a service: the body of
/// `GET /active/{policy_id}` and each entry of `GET /active`.
///
/// The pusher needs only `digest` and `version`; the other fields are what
/// `pde agent` reports and are optional so that any conforming receiver
/// parses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActiveRecord {
    /// `sha256:<hex>` of the active bundle.
    pub digest: String,
    /// The policy version it carries.
    pub version: String,
    /// The policy id it carries.
    #[serde(default)]
    pub policy_id: String,
    /// The environment named by the deploy that activated it (absent after a
    /// rollback to a bundle that was never deployed with an env).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<String>,
    /// When it became active (RFC 3339, UTC).
    #[serde(default)]
    pub activated_at: String,
    /// Whether the receiver's activation hook failed for this activation;
    /// absent when no hook is configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hook_failed: Option<bool>,
}

/// `true` when `id` can be a policy id: 1 to 128 of `A-Z a-z 0-9 . _ -`,
/// starting with a letter or digit. Ids name files (policies, locks, the
/// agent's per-policy state) and URL path segments, so nothing else is let in.
pub fn valid_policy_id(id: &str) -> bool {
    let mut chars = id.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        && id.len() <= 128
}

/// `true` when `env` can name an environment on the wire (the `env` of a
/// deploy, a rollback proof): the same alphabet and length as a policy id.
/// Receivers store it with every idempotency key and activation, so an
/// unbounded one would let a sender grow their state without bound.
pub fn valid_env(env: &str) -> bool {
    valid_policy_id(env)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_ids_cannot_escape_a_directory_or_a_path_segment() {
        assert!(valid_policy_id("42"));
        assert!(valid_policy_id("hms.heating-2027_v2"));
        for bad in ["", "../42", ".hidden", "a/b", "a b", "é", &"x".repeat(129)] {
            assert!(!valid_policy_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn a_minimal_receiver_answer_parses() {
        let a: ActiveRecord =
            serde_json::from_str(r#"{"digest":"sha256:ab","version":"1.0.0"}"#).unwrap();
        assert_eq!(a.version, "1.0.0");
        assert_eq!(a.env, None);
    }
}
