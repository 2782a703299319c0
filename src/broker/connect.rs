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
        let mut write_retries = GRANT_WRITE_RETRIES;
        // Nothing is served before it is stored: a known account is replaced under its write lock;
        // a new one is stored first and only then becomes visible. A write that lost a race to
        // another writer (a concurrent CompleteAuth, another replica) reloads and tries again.
        loop {
            let existing = inner
                .accounts
                .get(&pending.account)
                .map(|s| s.value().clone());
            let written = match existing {
                Some(slot) => {
                    let _write = slot.write.lock().await;
                    if slot.removed.load(Ordering::Acquire) {
                        continue; // removed while we waited: store it as a new account
                    }
                    match inner
                        .store
                        .put_account(&pending.account, &record, slot.expected())
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
                    .put_account(&pending.account, &record, Expected::Absent)
                    .await
                {
                    Ok(version) => match inner.accounts.entry(pending.account.clone()) {
                        dashmap::Entry::Vacant(vacant) => {
                            let slot = inner.new_slot(&pending.account, (*record).clone(), version);
                            vacant.insert(slot.clone());
                            slot.touch(); // a new account, for WatchAccounts
                            Ok(())
                        }
                        // Only a reload can have created it meanwhile; replace it under its lock.
                        dashmap::Entry::Occupied(_) => continue,
                    },
                    Err(e) => Err(e),
                },
            };
            let not_stored = |cause| Error::GrantNotStored {
                account: pending.account.clone(),
                cause,
            };
            match written {
                Ok(()) => break,
                Err(StoreError::Conflict(_)) => {
                    self.reload(&pending.account).await.map_err(not_stored)?;
                }
                // EdgeTag has used the code up: this token set is the only one the person's
                // approval will give, so a store that may recover gets a few more chances.
                Err(cause) if cause.may_pass_on_retry() && !write_retries.is_empty() => {
                    let wait = write_retries[0];
                    write_retries = &write_retries[1..];
                    tracing::warn!(account = %pending.account, error = %cause, retry_in = ?wait, "cannot store the new grant yet; retrying");
                    tokio::time::sleep(wait).await;
                }
                Err(cause) => return Err(not_stored(cause)),
            }
        }
        tracing::info!(account = %pending.account, "account connected");
        Ok((pending.account, record.tokens.clone()))
    }
}
