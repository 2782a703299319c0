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

use crate::account::AccountId;

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

/// One EdgeTag team a grant reaches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Team {
    pub id: String,
    /// Empty when EdgeTag gave none.
    pub name: String,
}

/// The EdgeTag team a grant reaches, as `GET /v1/user/me` said: callers need its id beside the
/// token (`Team-Id`) on every EdgeTag API call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Teams {
    /// The team API calls go to.
    pub team_id: String,
    /// Every team the grant reaches, as listed.
    pub teams: Vec<Team>,
    /// When EdgeTag last said so: it is asked again a day later, not on every refresh.
    pub learned_at: SystemTime,
}

/// Everything stored for one account.
#[derive(Debug, Clone)]
pub struct AccountRecord {
    pub tokens: Arc<TokenSet>,
    pub status: AccountStatus,
    pub last_refresh: Option<LastRefresh>,
    /// `None` until EdgeTag's `/v1/user/me` answered for this grant.
    pub teams: Option<Arc<Teams>>,
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

    /// A freshly connected account (its team not known yet).
    pub fn connected(tokens: TokenSet) -> Self {
        Self {
            tokens: Arc::new(tokens),
            status: AccountStatus::Active,
            last_refresh: None,
            teams: None,
        }
    }

    /// The team callers send as `Team-Id`; empty while not known.
    pub fn team_id(&self) -> &str {
        self.teams.as_ref().map_or("", |t| t.team_id.as_str())
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
    use super::*;

    #[test]
    fn debug_redacts() {
        let t = TokenSet {
            access_token: "at-secret".into(),
            refresh_token: Some("rt-secret".into()),
            token_type: DEFAULT_TOKEN_TYPE.into(),
            issued_at: SystemTime::UNIX_EPOCH,
            expires_at: SystemTime::UNIX_EPOCH + Duration::from_secs(60),
        };
        let s = format!("{t:?}");
        assert!(!s.contains("at-secret") && !s.contains("rt-secret"), "{s}");
        assert_eq!(t.lifetime(), Duration::from_secs(60));
        assert_eq!(
            t.remaining(SystemTime::UNIX_EPOCH + Duration::from_secs(90)),
            Duration::ZERO
        );
    }
}
