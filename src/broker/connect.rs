//! Connecting an account: BeginAuth remembers a PKCE verifier under a fresh state; CompleteAuth
//! claims the state, exchanges the code and stores the token set before anyone is told.

use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use tracing::Instrument;

use super::{Authorization, Broker, slot::Health};
use crate::{
    account::AccountId,
    error::Error,
    grant::{AuthCode, AuthState},
    oauth::{Pkce, UpstreamError, random_token},
    store::{Expected, StoreError},
    tokens::{AccountRecord, PendingAuth, TokenSet},
};

/// The waits before each further try at storing a new grant the store refused: a lock timeout
/// or a database failing over often passes within seconds, and the code cannot be exchanged again.
const GRANT_WRITE_RETRIES: &[Duration] = &[
    Duration::from_millis(100),
    Duration::from_millis(500),
    Duration::from_secs(2),
];

impl Broker {
    /// Starts connecting `account`: remembers a fresh PKCE verifier under a fresh state (durably)
    /// and returns the provider's authorize URL.
    pub async fn begin(&self, account: AccountId) -> Result<Authorization, Error> {
        let pkce = Pkce::generate();
        let state = random_token();
        let expires_at = self.inner.clock.now() + self.inner.config.state_ttl;
        let pending = PendingAuth {
            account,
            verifier: pkce.verifier,
            expires_at,
        };
        self.inner.store.put_pending(&state, &pending).await?;
        let authorize_url = self.inner.provider.authorize_url(&state, &pkce.challenge);
        Ok(Authorization {
            authorize_url,
            state,
            expires_at,
        })
    }

    /// Finishes connecting an account: claims the state (at most one caller wins), exchanges the
    /// code, stores the token set durably and only then returns.
    ///
    /// A state whose exchange did not succeed is put back until it expires: after a transient
    /// failure or rejected client credentials (a retry may work), and after EdgeTag rejected the
    /// code, so that a stranger who sends a made-up code with a state cannot cancel the person's
    /// pending approval. Only one exchange can ever succeed: success consumes the state for good.
    ///
    /// The work runs to its end even if the caller goes away (a closed browser tab, a cancelled
    /// RPC): dropped halfway, it would leave the claimed state neither put back nor used, or a
    /// token set EdgeTag issued for a single-use code unstored.
    pub async fn complete(
        &self,
        code: &str,
        state: &str,
    ) -> Result<(AccountId, Arc<TokenSet>), Error> {
        let code = AuthCode::parse(code)?;
        let state = AuthState::parse(state)?;
        let broker = self.clone();
        let work = async move { broker.claim_and_exchange(code, state).await }
            .instrument(tracing::Span::current());
        tokio::spawn(work)
            .await
            .map_err(|_| Error::Internal("the authorization exchange did not finish"))?
    }

    async fn claim_and_exchange(
        &self,
        code: AuthCode,
        state: AuthState,
    ) -> Result<(AccountId, Arc<TokenSet>), Error> {
        let inner = &self.inner;
        let pending = inner
            .store
            .take_pending(state.as_str())
            .await?
            .ok_or(Error::UnknownState)?;
        let requested_at = inner.clock.now();
        if pending.expires_at <= requested_at {
            return Err(Error::UnknownState);
        }
        tracing::Span::current().record("account", tracing::field::display(&pending.account));

        let exchanged = {
            let _permit = inner
                .operator_upstream
                .acquire()
                .await
                .map_err(|_| Error::Internal("upstream limiter closed"))?;
            inner
                .provider
                .exchange_code(code.secret(), &pending.verifier)
                .await
        };
        let response = match exchanged {
            Ok(response) => response,
            Err(e) => {
                inner.store.put_pending(state.as_str(), &pending).await?;
                return Err(match e {
                    UpstreamError::InvalidClient { status } => {
                        super::refresh::log_client_rejected(status);
                        Error::ClientCredentialsRejected
                    }
                    e if e.is_transient() => Error::ProviderUnavailable(e),
                    e => Error::CodeRejected(e),
                });
            }
        };
        if response.refresh_token.is_none() {
            tracing::warn!(account = %pending.account, "EdgeTag issued no refresh token; the account cannot be refreshed");
        }
        let tokens = response.into_token_set(
            requested_at,
            inner.provider.config().default_token_lifetime,
            None,
        );
        let record = Arc::new(AccountRecord::connected(tokens));
        self.install(&pending.account, &record, true)
            .await
            .map_err(|e| match e {
                NotInstalled::Store(cause) => Error::GrantNotStored {
                    account: pending.account.clone(),
                    cause,
                },
                NotInstalled::Exists => Error::Internal("an account replaced was refused"),
            })?;
        tracing::info!(account = %pending.account, "account connected");
        // After the grant is stored: a failure here loses nothing, the scheduler asks again.
        self.learn_team_after_connect(&pending.account).await;
        Ok((pending.account, record.tokens.clone()))
    }
}

/// Why [`Broker::install`] stored nothing.
#[derive(Debug)]
pub(super) enum NotInstalled {
    /// The account is connected, and was not to be replaced.
    Exists,
    Store(StoreError),
}

impl Broker {
    /// Stores a new grant for `account` durably, then serves it: a known account is replaced under
    /// its write lock (or, without `replace`, left alone); a new one is stored first and only then
    /// becomes visible. A write that lost a race to another writer (a concurrent CompleteAuth,
    /// another replica) reloads and tries again; a store that may recover gets a few more chances,
    /// since the grant may be the only one a person's approval gives.
    pub(super) async fn install(
        &self,
        account: &AccountId,
        record: &Arc<AccountRecord>,
        replace: bool,
    ) -> Result<(), NotInstalled> {
        let inner = &self.inner;
        let mut write_retries = GRANT_WRITE_RETRIES;
        loop {
            let existing = inner.accounts.get(account).map(|s| s.value().clone());
            let written = match existing {
                Some(_) if !replace => return Err(NotInstalled::Exists),
                Some(slot) => {
                    let _write = slot.write.lock().await;
                    if slot.removed.load(Ordering::Acquire) {
                        continue; // removed while we waited: store it as a new account
                    }
                    match inner
                        .store
                        .put_account(account, record, slot.expected())
                        .await
                    {
                        Ok(version) => {
                            // A new grant supersedes any failure, back-off or held-back refresh.
                            *slot.health() = Health::default();
                            inner.publish(&slot, record.clone(), version);
                            Ok(())
                        }
                        Err(e) => Err(e),
                    }
                }
                None => match inner
                    .store
                    .put_account(account, record, Expected::Absent)
                    .await
                {
                    Ok(version) => match inner.accounts.entry(account.clone()) {
                        dashmap::Entry::Vacant(vacant) => {
                            let slot = inner.new_slot(account, (**record).clone(), version);
                            vacant.insert(slot.clone());
                            slot.touch(); // a new account, for WatchAccounts
                            Ok(())
                        }
                        // Only a reload can have created it meanwhile, from what was just stored
                        // (or newer): replace it under its lock, or keep it when not replacing.
                        dashmap::Entry::Occupied(_) if !replace => Ok(()),
                        dashmap::Entry::Occupied(_) => continue,
                    },
                    Err(e) => Err(e),
                },
            };
            match written {
                Ok(()) => return Ok(()),
                Err(StoreError::Conflict(_)) => {
                    self.reload(account).await.map_err(NotInstalled::Store)?;
                }
                Err(cause) if cause.may_pass_on_retry() && !write_retries.is_empty() => {
                    let wait = write_retries[0];
                    write_retries = &write_retries[1..];
                    tracing::warn!(account = %account, error = %cause, retry_in = ?wait, "cannot store the new grant yet; retrying");
                    tokio::time::sleep(wait).await;
                }
                Err(cause) => return Err(NotInstalled::Store(cause)),
            }
        }
    }
}
