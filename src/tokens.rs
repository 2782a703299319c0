//! What the service knows about an account and a pending authorization, in domain terms.
//!
//! These are the values the broker keeps in memory and the store persists. Every secret is a
//! [`SecretString`] and every `Debug` impl redacts, so a stray `{:?}` cannot leak a token.

use std::{
    fmt,
    sync::Arc,
    time::{Duration, SystemTime},
};

use secrecy::SecretString;

use crate::{account::AccountId, oauth::TokenResponse};

/// The token type reported when the provider names none (EdgeTag never does).
pub const DEFAULT_TOKEN_TYPE: &str = "Bearer";

/// One access token with what is needed to renew it. Immutable: a refresh makes a new one, so
/// readers share it behind an `Arc` without locks.
#[derive(Clone)]
pub struct TokenSet {
    pub access_token: SecretString,
    pub refresh_token: Option<SecretString>,
    pub token_type: String,
    /// When the request that produced this token was sent (conservative start of its lifetime).
    pub issued_at: SystemTime,
    pub expires_at: SystemTime,
}

impl TokenSet {
    /// Builds the token set from a token response. `requested_at` is when the request left, so the
    /// computed expiry errs early; `previous_refresh` is kept when the response carries none.
    pub fn from_response(
        response: TokenResponse,
        requested_at: SystemTime,
        default_lifetime: Duration,
        previous_refresh: Option<&SecretString>,
    ) -> Self {
        let lifetime = response.expires_in.unwrap_or(default_lifetime);
        Self {
            access_token: response.access_token,
            refresh_token: response.refresh_token.or_else(|| previous_refresh.cloned()),
            token_type: response
                .token_type
                .unwrap_or_else(|| DEFAULT_TOKEN_TYPE.to_owned()),
            issued_at: requested_at,
            expires_at: requested_at + lifetime,
        }
    }

    /// How long the token is valid from `now` (zero when expired).
    pub fn remaining(&self, now: SystemTime) -> Duration {
        self.expires_at
            .duration_since(now)
            .unwrap_or(Duration::ZERO)
    }

    /// The lifetime the provider granted this token.
    pub fn lifetime(&self) -> Duration {
        self.expires_at
            .duration_since(self.issued_at)
            .unwrap_or(Duration::ZERO)
    }
}

impl fmt::Debug for TokenSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenSet")
            .field("access_token", &"<redacted>")
            .field(
                "refresh_token",
                &self.refresh_token.as_ref().map(|_| "<redacted>"),
            )
            .field("token_type", &self.token_type)
            .field("issued_at", &self.issued_at)
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// Whether an account can be served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccountStatus {
    Active,
    /// The provider rejected the refresh token; only a new BeginAuth/CompleteAuth helps.
    NeedsReauth,
}

/// How the most recent refresh attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefreshOutcome {
    Succeeded,
    Failed,
}

/// The last refresh attempt, for operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LastRefresh {
    pub at: SystemTime,
    pub outcome: RefreshOutcome,
}

/// Everything stored for one account.
#[derive(Debug, Clone)]
pub struct AccountRecord {
    pub tokens: Arc<TokenSet>,
    pub status: AccountStatus,
    pub last_refresh: Option<LastRefresh>,
}

impl AccountRecord {
    /// Still served, but its latest refresh failed: worth an operator's look before the token
    /// expires (shown as `refreshing_failed` in ListAccounts and metrics).
    pub fn refresh_failing(&self) -> bool {
        self.status == AccountStatus::Active
            && self
                .last_refresh
                .is_some_and(|r| r.outcome == RefreshOutcome::Failed)
    }

    /// A freshly connected account.
    pub fn connected(tokens: TokenSet) -> Self {
        Self {
            tokens: Arc::new(tokens),
            status: AccountStatus::Active,
            last_refresh: None,
        }
    }
}

/// A BeginAuth waiting for its CompleteAuth.
pub struct PendingAuth {
    pub account: AccountId,
    pub verifier: SecretString,
    pub expires_at: SystemTime,
}

impl fmt::Debug for PendingAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PendingAuth")
            .field("account", &self.account)
            .field("verifier", &"<redacted>")
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use secrecy::ExposeSecret;

    use super::*;

    fn response(refresh: Option<&str>, expires_in: Option<u64>) -> TokenResponse {
        TokenResponse {
            access_token: "at-secret".into(),
            refresh_token: refresh.map(SecretString::from),
            token_type: None,
            expires_in: expires_in.map(Duration::from_secs),
        }
    }

    #[test]
    fn keeps_the_previous_refresh_token_unless_a_new_one_arrives() {
        let t0 = SystemTime::UNIX_EPOCH;
        let old = SecretString::from("rt-old");
        let kept = TokenSet::from_response(
            response(None, Some(60)),
            t0,
            Duration::from_secs(1),
            Some(&old),
        );
        assert_eq!(kept.refresh_token.unwrap().expose_secret(), "rt-old");
        let rotated = TokenSet::from_response(
            response(Some("rt-new"), Some(60)),
            t0,
            Duration::from_secs(1),
            Some(&old),
        );
        assert_eq!(rotated.refresh_token.unwrap().expose_secret(), "rt-new");
    }

    #[test]
    fn expiry_counts_from_the_request_and_defaults_when_absent() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let t = TokenSet::from_response(
            response(None, Some(7200)),
            t0,
            Duration::from_secs(60),
            None,
        );
        assert_eq!(t.expires_at, t0 + Duration::from_secs(7200));
        assert_eq!(t.token_type, "Bearer");
        assert_eq!(t.lifetime(), Duration::from_secs(7200));
        let d = TokenSet::from_response(response(None, None), t0, Duration::from_secs(60), None);
        assert_eq!(d.expires_at, t0 + Duration::from_secs(60));
        assert_eq!(d.remaining(t0 + Duration::from_secs(90)), Duration::ZERO);
    }

    #[test]
    fn debug_redacts() {
        let t = TokenSet::from_response(
            response(Some("rt-secret"), None),
            SystemTime::UNIX_EPOCH,
            Duration::from_secs(1),
            None,
        );
        let s = format!("{t:?}");
        assert!(!s.contains("at-secret") && !s.contains("rt-secret"), "{s}");
    }
}
