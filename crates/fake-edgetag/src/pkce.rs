//! RFC 7636 PKCE, checked with the fake's own code: a mistake in the client's PKCE code cannot be
//! mirrored here and pass unnoticed.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use sha2::{Digest, Sha256};

/// RFC 7636 §4.2: `BASE64URL-NOPAD(SHA256(verifier))`.
pub(crate) fn s256_challenge(verifier: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()))
}

/// RFC 7636 S256 challenge: base64url (no padding) of a SHA-256 digest, hence 43 characters.
pub(crate) fn is_s256_challenge(s: &str) -> bool {
    s.len() == 43
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// RFC 7636 §4.1: 43–128 characters from the unreserved set.
pub(crate) fn is_code_verifier(s: &str) -> bool {
    (43..=128).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pkce_checks_follow_rfc_7636() {
        // RFC 7636 appendix B.
        let verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
        let challenge = s256_challenge(verifier);
        assert_eq!(challenge, "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM");
        assert!(is_code_verifier(verifier) && is_s256_challenge(&challenge));
        assert!(is_code_verifier(&"~._-".repeat(32)));
        assert!(!is_code_verifier(&"a".repeat(42)));
        assert!(!is_code_verifier(&format!("{}+", "a".repeat(42))));
        assert!(!is_s256_challenge(&format!("{}=", &challenge[..42])));
    }
}
