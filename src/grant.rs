//! What EdgeTag's redirect hands back after a person approves: the authorization code and the
//! state, obtainable only by parsing, so nothing downstream checks them again.
//!
//! Both are secrets of a kind (the code is a one-time credential, the state a CSRF token): neither
//! `Debug` prints them.

use std::fmt;

use secrecy::{ExposeSecret, SecretString};

/// Longest code and state accepted; real ones are far shorter, these only bound the work.
pub const MAX_CODE_LEN: usize = 2048;
pub const MAX_STATE_LEN: usize = 256;

/// A request field that breaks its rule; the message names the field and the rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidInput(pub &'static str);

/// The `code` of EdgeTag's redirect: 1–2048 printable ASCII characters.
pub struct AuthCode(SecretString);

impl AuthCode {
    pub fn parse(code: &str) -> Result<Self, InvalidInput> {
        if code.is_empty() {
            return Err(InvalidInput(
                "code is required: the `code` parameter of EdgeTag's redirect",
            ));
        }
        if code.len() > MAX_CODE_LEN || !code.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(InvalidInput(
                "code is malformed: expected at most 2048 printable ASCII characters",
            ));
        }
        Ok(Self(SecretString::from(code)))
    }

    /// The code as sent to the token endpoint.
    pub fn secret(&self) -> &SecretString {
        &self.0
    }
}

impl fmt::Debug for AuthCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AuthCode(<redacted>)")
    }
}

/// The `state` BeginAuth issued: 1–256 characters.
pub struct AuthState(SecretString);

impl AuthState {
    pub fn parse(state: &str) -> Result<Self, InvalidInput> {
        if state.is_empty() {
            return Err(InvalidInput(
                "state is required: the `state` returned by BeginAuth",
            ));
        }
        if state.len() > MAX_STATE_LEN {
            return Err(InvalidInput(
                "state is malformed: expected at most 256 characters",
            ));
        }
        Ok(Self(SecretString::from(state)))
    }

    /// The state as the store keys it (it stores only a hash).
    pub fn as_str(&self) -> &str {
        self.0.expose_secret()
    }
}

impl fmt::Debug for AuthState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AuthState(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_states_are_bounded_and_redacted() {
        assert!(AuthCode::parse("").is_err());
        assert!(AuthCode::parse("has space").is_err());
        assert!(AuthCode::parse(&"c".repeat(MAX_CODE_LEN + 1)).is_err());
        let code = AuthCode::parse(&"c".repeat(MAX_CODE_LEN)).unwrap();
        assert!(!format!("{code:?}").contains("ccc"));
        assert!(AuthState::parse("").is_err());
        assert!(AuthState::parse(&"s".repeat(MAX_STATE_LEN + 1)).is_err());
        let state = AuthState::parse("st-secret").unwrap();
        assert_eq!(state.as_str(), "st-secret");
        assert!(!format!("{state:?}").contains("st-secret"));
    }
}
