//! The HTTP retry policy, decided once for every caller (DESIGN §7).
//!
//! Push, rollback, the verification reads and the audit sink all ask the
//! same questions: is this answer final, and how long to wait before the
//! next attempt? The answers live here, free of any HTTP client:
//! - 2xx is done; 5xx, timeouts and connection failures are transient;
//! - **429 Too Many Requests is transient too**: the receiver says "later",
//!   not "never", and a deploy that gives up on a busy receiver would only be
//!   compensated. Every other 4xx is permanent;
//! - waits grow exponentially with *full* jitter (uniform in `0..=base·2^(n-1)`,
//!   capped), so a hundred targets that failed together do not return
//!   together; a `Retry-After` (seconds) from the receiver is honoured, up to
//!   the same cap.

use std::time::Duration;

/// The longest single wait between two attempts, whatever the settings say.
pub const MAX_BACKOFF_MS: u64 = 30_000;

/// How often and how patiently one request is tried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries after the first attempt.
    pub retries: u32,
    /// The first backoff ceiling, in milliseconds.
    pub backoff_ms: u64,
    /// Timeout of each attempt, connection to last body byte.
    pub timeout: Duration,
}

/// What an answer means for the request that got it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// 2xx: delivered.
    Done,
    /// Worth another attempt (5xx, 429).
    Transient,
    /// Final: another attempt of the same request cannot succeed.
    Permanent,
}

/// The verdict on an HTTP status code.
pub fn verdict(status: u16) -> Verdict {
    match status {
        200..=299 => Verdict::Done,
        429 | 500..=599 => Verdict::Transient,
        _ => Verdict::Permanent,
    }
}

/// The upper bound of the wait before retry `n` (1-based): `base·2^(n-1)`, capped.
pub fn backoff_ceiling(base_ms: u64, n: u32) -> u64 {
    let shift = n.saturating_sub(1).min(32);
    base_ms.saturating_mul(1u64 << shift).min(MAX_BACKOFF_MS)
}

/// A delay drawn uniformly from `0..=ceiling` ("full jitter").
pub fn full_jitter(ceiling_ms: u64) -> u64 {
    rand::random_range(0..=ceiling_ms)
}

/// The wait before retry `n`: the receiver's `Retry-After` (in seconds) when it
/// gave one, else full jitter; never more than [`MAX_BACKOFF_MS`].
pub fn delay(policy: &RetryPolicy, n: u32, retry_after: Option<&str>) -> Duration {
    let asked = retry_after
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|s| s.saturating_mul(1000));
    let ms = match asked {
        Some(ms) => ms.min(MAX_BACKOFF_MS),
        None => full_jitter(backoff_ceiling(policy.backoff_ms, n)),
    };
    Duration::from_millis(ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_is_capped() {
        assert_eq!(backoff_ceiling(100, 1), 100);
        assert_eq!(backoff_ceiling(100, 2), 200);
        assert_eq!(backoff_ceiling(100, 4), 800);
        assert_eq!(backoff_ceiling(100, 60), MAX_BACKOFF_MS);
        assert_eq!(backoff_ceiling(u64::MAX, 3), MAX_BACKOFF_MS);
    }

    #[test]
    fn jitter_stays_within_the_ceiling() {
        for _ in 0..1000 {
            assert!(full_jitter(50) <= 50);
        }
        assert_eq!(full_jitter(0), 0);
    }

    #[test]
    fn verdicts_follow_design_7_with_429_transient() {
        assert_eq!(verdict(200), Verdict::Done);
        assert_eq!(verdict(204), Verdict::Done);
        assert_eq!(verdict(500), Verdict::Transient);
        assert_eq!(verdict(503), Verdict::Transient);
        assert_eq!(verdict(429), Verdict::Transient);
        assert_eq!(verdict(400), Verdict::Permanent);
        assert_eq!(verdict(404), Verdict::Permanent);
        assert_eq!(verdict(422), Verdict::Permanent);
        assert_eq!(verdict(307), Verdict::Permanent);
    }

    #[test]
    fn retry_after_is_honoured_and_capped() {
        let p = RetryPolicy {
            retries: 3,
            backoff_ms: 10,
            timeout: Duration::from_secs(1),
        };
        assert_eq!(delay(&p, 1, Some("2")), Duration::from_secs(2));
        assert_eq!(
            delay(&p, 1, Some("86400")),
            Duration::from_millis(MAX_BACKOFF_MS)
        );
        assert!(delay(&p, 1, Some("soon")) <= Duration::from_millis(10));
        assert!(delay(&p, 2, None) <= Duration::from_millis(20));
    }
}
