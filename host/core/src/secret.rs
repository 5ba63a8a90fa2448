//! Secrets (bearer tokens, sink tokens): one type, never printed.
//!
//! [`Secret`] is `secrecy`'s `SecretString`: its `Debug` prints
//! `[REDACTED]`, it has no `Display`, and its memory is zeroed on drop. The
//! value is only reachable through [`ExposeSecret::expose_secret`], so every
//! place a token leaves the process is one grep away.

pub use secrecy::{ExposeSecret, SecretString as Secret};

/// Reads a secret from the environment variable `var`: `None` when it is
/// unset or empty (an empty token is never a valid one).
pub fn from_env(var: &str) -> Option<Secret> {
    match std::env::var(var) {
        Ok(v) if !v.is_empty() => Some(Secret::from(v)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_value() {
        let s = Secret::from("hunter2".to_string());
        assert!(!format!("{s:?}").contains("hunter2"));
        assert_eq!(s.expose_secret(), "hunter2");
    }
}
