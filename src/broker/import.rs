//! Importing a grant obtained elsewhere (another token broker, a home-grown table): stored as
//! CompleteAuth would have stored it, after EdgeTag has been asked for a new access token, so that
//! a dead grant shows at import time rather than at a caller's first GetToken.

use std::{sync::Arc, time::SystemTime};

use secrecy::SecretString;

use super::{Broker, connect::NotInstalled};
use crate::{
    account::AccountId,
    clock::{from_unix_ms, to_unix_ms},
    error::Error,
    oauth::UpstreamError,
    tokens::{
        AccountRecord, AccountStatus, DEFAULT_TOKEN_TYPE, LastRefresh, RefreshOutcome, TokenSet,
    },
};

/// A grant as an import hands it over; no `Debug`, it is mostly secrets.
pub struct Grant {
    pub refresh_token: SecretString,
    /// An access token of the same grant, with its expiry.
    pub access: Option<(SecretString, SystemTime)>,
}

/// How an import that stored a usable grant ended.
#[derive(Debug)]
pub enum Imported {
    /// EdgeTag issued a new access token for the grant.
    Refreshed(Arc<TokenSet>),
    /// The access token it came with is valid beyond the refresh margin: stored as it is.
    Stored(Arc<TokenSet>),
}

impl Broker {
    /// Imports `grant` as `account`. An account already connected is refused unless `replace`.
    /// A refresh token EdgeTag rejects is answered with [`Error::ImportedGrantRejected`], stored
    /// marked as needing re-authorization (listed, so an operator sees it) unless the account is
    /// connected already; when EdgeTag cannot be asked, nothing is stored.
    pub async fn import(
        &self,
        account: &AccountId,
        grant: Grant,
        replace: bool,
    ) -> Result<Imported, Error> {
        let inner = &self.inner;
        if !replace && inner.accounts.contains_key(account) {
            return Err(Error::AlreadyConnected(account.clone()));
        }
        let now = from_unix_ms(to_unix_ms(inner.clock.now()));
        let lifetime = inner.provider.config().default_token_lifetime;
        let install = async |record: AccountRecord| {
            self.install(account, &Arc::new(record), replace)
                .await
                .map_err(|e| match e {
                    NotInstalled::Exists => Error::AlreadyConnected(account.clone()),
                    NotInstalled::Store(cause) => Error::Store(cause),
                })
        };
        if let Some((access_token, expires_at)) = grant.access {
            let expires_at = from_unix_ms(to_unix_ms(expires_at));
            if expires_at > now + inner.config.refresh_margin {
                // Its issue time is unknown: assume EdgeTag's usual lifetime, never the future.
                let issued_at = expires_at.checked_sub(lifetime).unwrap_or(now).min(now);
                let tokens = TokenSet {
                    access_token,
                    refresh_token: Some(grant.refresh_token),
                    token_type: DEFAULT_TOKEN_TYPE.to_owned(),
                    issued_at,
                    expires_at,
                };
                let record = AccountRecord::connected(tokens);
                let tokens = record.tokens.clone();
                install(record).await?;
                tracing::info!(account = %account, "grant imported with its access token");
                return Ok(Imported::Stored(tokens));
            }
        }
        let refreshed = {
            let _permit = inner
                .operator_upstream
                .acquire()
                .await
                .map_err(|_| Error::Internal("upstream limiter closed"))?;
            inner.provider.refresh(&grant.refresh_token).await
        };
        match refreshed {
            Ok(response) => {
                let tokens = response.into_token_set(now, lifetime, Some(&grant.refresh_token));
                let record = AccountRecord::connected(tokens);
                let tokens = record.tokens.clone();
                install(record).await?;
                tracing::info!(account = %account, "grant imported and refreshed");
                Ok(Imported::Refreshed(tokens))
            }
            // As a refresh does: only invalid_grant says the grant itself is dead.
            Err(UpstreamError::InvalidGrant) => {
                let record = AccountRecord {
                    tokens: Arc::new(TokenSet {
                        access_token: SecretString::from(String::new()),
                        refresh_token: None,
                        token_type: DEFAULT_TOKEN_TYPE.to_owned(),
                        issued_at: now,
                        expires_at: now,
                    }),
                    status: AccountStatus::NeedsReauth,
                    last_refresh: Some(LastRefresh {
                        at: now,
                        outcome: RefreshOutcome::Failed,
                    }),
                    teams: None,
                };
                // Never over a connected account, even when replacing: a dead grant would
                // replace a live one.
                let stored = match self.install(account, &Arc::new(record), false).await {
                    Ok(()) => true,
                    Err(NotInstalled::Exists) => false,
                    Err(NotInstalled::Store(cause)) => return Err(Error::Store(cause)),
                };
                tracing::warn!(account = %account, stored, "imported grant rejected by EdgeTag");
                Err(Error::ImportedGrantRejected {
                    account: account.clone(),
                    stored,
                })
            }
            Err(UpstreamError::InvalidClient { status }) => {
                super::refresh::log_client_rejected(status);
                Err(Error::ClientCredentialsRejected)
            }
            Err(e) => Err(Error::ProviderUnavailable(e)),
        }
    }
}
