//! Fencing numbers (push protocol v4): what makes a deploy or rollback from
//! a holder that lost its lock harmless.
//!
//! Each acquisition of the deploy lock of a policy and environment gets a
//! number that only grows, and every `POST /deploy` and `POST /rollback`
//! made under that lock carries it. A receiver remembers, per policy, the
//! highest number it has accepted and refuses a lower one, so a deployer
//! that paused, lost its lock (a dropped database session, a failover) and
//! woke after someone else deployed cannot overwrite the newer deploy.
//!
//! **Why a clock, not a counter.** A counter kept by one state backend
//! starts at 1 in every new database: a second engineer with their own
//! SQLite state, or a fresh clone, would be refused by every agent that a
//! long-lived workspace ever pushed to, forever. A fence is therefore the
//! lock's acquisition time in microseconds since the Unix epoch, raised to
//! one more than the previous fence of the same lock when the clock has not
//! moved past it ([`next`]). Every deployer's numbers then live on one
//! scale: a fresh clone starts where the clock is, and is refused only for
//! as long as its clock lags behind the newest fence an agent has seen.
//! A shared PostgreSQL state reads the database server's clock, so a team's
//! fences are strictly ordered whatever the machines' clocks say; a SQLite
//! state reads its machine's clock and is strictly ordered on that machine.
//!
//! **Why it is signed.** The body of `POST /deploy` is not covered by the
//! bundle's signature, and a fence only ever raises what a receiver
//! remembers: anyone able to replay a captured bundle with a huge fence
//! would lock every later deploy out. So the release key signs the fence
//! with the policy, digest and environment ([`deploy_message`]), and a
//! receiver that trusts keys takes a fence only with that signature. A
//! rollback's fence is a member of its signed statement
//! ([`crate::rollback::Statement::fence`]). A receiver also refuses a fence
//! from more than [`MAX_AHEAD_SECS`] in its future, so even a key holder
//! with a wrong clock cannot lock others out for longer than that.

use ed25519_dalek::SigningKey;
use serde_json::json;

use crate::canonical::{CanonicalError, jcs};
use crate::keys::{Signature, SignatureError, TrustedKeys};

/// The format tag of the statement a deploy's fence proof signs.
pub const DEPLOY_FORMAT: &str = "pde.deploy-fence/v1";

/// The largest fence: 2^53 − 1, so that every JSON implementation reads it
/// exactly (RFC 8785 writes numbers as doubles). Microseconds since 1970
/// reach it in the year 2255.
pub const MAX_FENCE: u64 = (1 << 53) - 1;

/// How far past the receiver's clock a fence may lie, in seconds: the same
/// skew a signed rollback is allowed ([`crate::rollback::MAX_SKEW_SECS`]).
pub const MAX_AHEAD_SECS: i64 = crate::rollback::MAX_SKEW_SECS;

/// The fence for a new acquisition: `now_micros`, or one more than the
/// previous fence of the same lock if the clock has not passed it.
pub fn next(previous: Option<u64>, now_micros: u64) -> u64 {
    let next = match previous {
        Some(p) => now_micros.max(p.saturating_add(1)),
        None => now_micros,
    };
    next.min(MAX_FENCE)
}

/// Microseconds since the Unix epoch, now, on this machine's clock.
pub fn now_micros() -> u64 {
    let nanos = time::OffsetDateTime::now_utc().unix_timestamp_nanos();
    u64::try_from(nanos / 1_000).unwrap_or(0)
}

/// `true` when `fence` lies more than [`MAX_AHEAD_SECS`] past `now_micros`.
pub fn too_far_ahead(fence: u64, now_micros: u64) -> bool {
    let allowed = now_micros.saturating_add(MAX_AHEAD_SECS as u64 * 1_000_000);
    fence > allowed
}

/// The bytes a deploy's fence proof signs: the RFC 8785 form of
/// `{"format": "pde.deploy-fence/v1", "policy_id", "digest", "env", "fence"}`.
/// A receiver rebuilds them from the request itself (the bundle's policy
/// id and digest, the body's `env` and `fence`), so nothing signed travels
/// twice and a proof cannot be moved to another bundle or environment.
pub fn deploy_message(
    policy_id: &str,
    digest: &str,
    env: &str,
    fence: u64,
) -> Result<Vec<u8>, CanonicalError> {
    jcs(&json!({
        "format": DEPLOY_FORMAT,
        "policy_id": policy_id,
        "digest": digest,
        "env": env,
        "fence": fence,
    }))
}

/// The release key's signature over [`deploy_message`].
pub fn sign_deploy(
    key: &SigningKey,
    policy_id: &str,
    digest: &str,
    env: &str,
    fence: u64,
) -> Result<Signature, CanonicalError> {
    Ok(crate::keys::sign(
        key,
        &deploy_message(policy_id, digest, env, fence)?,
    ))
}

/// Checks a deploy's fence proof against `trusted`.
pub fn verify_deploy(
    trusted: &TrustedKeys,
    policy_id: &str,
    digest: &str,
    env: &str,
    fence: u64,
    proof: &Signature,
) -> Result<(), SignatureError> {
    let message =
        deploy_message(policy_id, digest, env, fence).map_err(|_| SignatureError::Malformed)?;
    trusted.verify(&message, proof)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fences_follow_the_clock_and_never_repeat() {
        assert_eq!(next(None, 1_000), 1_000);
        assert_eq!(next(Some(900), 1_000), 1_000);
        // The clock did not move (or went back): one more than before.
        assert_eq!(next(Some(1_000), 1_000), 1_001);
        assert_eq!(next(Some(5_000), 1_000), 5_001);
        assert_eq!(next(Some(MAX_FENCE), 1_000), MAX_FENCE);
        // Today's clock is far below the bound and far above a counter.
        let now = now_micros();
        assert!(now > 1_700_000_000_000_000 && now < MAX_FENCE);
        assert!(!too_far_ahead(now + 60_000_000, now));
        assert!(too_far_ahead(now + 301_000_000, now));
    }

    #[test]
    fn a_deploy_proof_binds_policy_digest_env_and_fence() {
        let k = SigningKey::from_bytes(&[5; 32]);
        let mut trusted = TrustedKeys::new();
        trusted.add(k.verifying_key());
        let d = format!("sha256:{}", "a".repeat(64));
        let proof = sign_deploy(&k, "42", &d, "production", 77).unwrap();
        assert!(verify_deploy(&trusted, "42", &d, "production", 77, &proof).is_ok());
        for (p, e, f) in [
            ("43", "production", 77),
            ("42", "staging", 77),
            ("42", "production", 78),
        ] {
            assert!(
                verify_deploy(&trusted, p, &d, e, f, &proof).is_err(),
                "{p} {e} {f}"
            );
        }
        let other = format!("sha256:{}", "b".repeat(64));
        assert!(verify_deploy(&trusted, "42", &other, "production", 77, &proof).is_err());
    }
}
