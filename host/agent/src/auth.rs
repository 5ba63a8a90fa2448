//! Bearer-token check for the agent's state-changing and state-revealing routes.
//!
//! Both sides are hashed with sha256 before the constant-time comparison, so
//! neither the content nor the length of the expected token leaks through
//! timing. The token never appears in a log line or an error body: a failure
//! says only whether the header was missing or wrong.

use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::Response;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tracing::warn;

use super::routes::ApiError;

/// The sha256 of the expected token; the token itself is not kept.
#[derive(Clone)]
pub struct TokenCheck {
    expected: [u8; 32],
}

impl std::fmt::Debug for TokenCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenCheck(<redacted>)")
    }
}

impl TokenCheck {
    /// Remembers the hash of `token`.
    pub fn new(token: &str) -> Self {
        TokenCheck {
            expected: Sha256::digest(token.as_bytes()).into(),
        }
    }

    /// `true` when `presented` is the expected token (constant time).
    pub fn accepts(&self, presented: &str) -> bool {
        let got: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        got.ct_eq(&self.expected).into()
    }
}

/// Middleware: lets the request through only with `Authorization: Bearer <token>`.
pub async fn require_token(
    State(check): State<TokenCheck>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let presented = request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match presented {
        Some(token) if check.accepts(token.trim()) => Ok(next.run(request).await),
        Some(_) => {
            warn!(path = %request.uri().path(), "rejected request: wrong bearer token");
            Err(ApiError::unauthorized(
                "the bearer token is not the one this agent expects",
            ))
        }
        None => {
            warn!(path = %request.uri().path(), "rejected request: no bearer token");
            Err(ApiError::unauthorized(
                "missing `Authorization: Bearer <token>` header",
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_only_the_exact_token() {
        let check = TokenCheck::new("s3cret");
        assert!(check.accepts("s3cret"));
        assert!(!check.accepts("s3cre"));
        assert!(!check.accepts("s3cret "));
        assert!(!check.accepts(""));
        assert!(!format!("{check:?}").contains("s3cret"));
    }
}
