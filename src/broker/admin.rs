//! What operators do and see: list, describe, refresh now, remove, and the gauges a metrics scrape
//! reads. Everything is answered from memory except a removal, which revokes and deletes durably.

use std::sync::{Arc, atomic::Ordering};

use super::{Broker, refresh::Trigger};
use crate::{
    account::AccountId,
    error::Error,
    metrics::AccountGauges,
    oauth::UpstreamError,
    store::RawAccount,
    tokens::{AccountRecord, AccountStatus, TokenSet},
};

/// How RemoveAccount ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    /// Revoked at the provider (or unknown there), then deleted here.
    Revoked,
    /// Deleted here although the provider could not be told (forced).
    RemovedWithoutRevocation,
    /// There was no such account.
    NotFound,
}

impl Broker {
    /// Every account with its current record, sorted by name (for operators; no disk reads).
    pub fn list(&self) -> Vec<(AccountId, Arc<AccountRecord>)> {
        let mut all: Vec<_> = self
            .inner
            .accounts
            .iter()
            .map(|e| (e.key().clone(), e.value().record.load_full()))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// Every account record as stored, sealed, sorted by name (an online backup). Read from the
    /// store, not the cache: GetToken never waits for it.
    pub async fn export_accounts(&self) -> Result<Vec<RawAccount>, Error> {
        Ok(self.inner.store.export_accounts().await?)
    }

    /// The store's kind (`sled`, `postgres`), for a backup's header.
    pub fn store_kind(&self) -> &'static str {
        self.inner.store.kind()
    }

    /// One account's current record.
    pub fn describe(&self, account: &AccountId) -> Result<Arc<AccountRecord>, Error> {
        self.slot(account).map(|s| s.record.load_full())
    }

    /// Whether a refresh of `account` is running now.
    pub fn is_refreshing(&self, account: &AccountId) -> bool {
        self.slot(account).is_ok_and(|s| s.inflight().is_some())
    }

    /// Accounts whose refreshed tokens could not be stored yet: unhealthy until the write lands,
    /// because their old refresh token may already be dead at the provider.
    pub fn unpersisted_accounts(&self) -> Vec<AccountId> {
        let mut v: Vec<_> = self
            .inner
            .accounts
            .iter()
            .filter(|e| e.value().health().unpersisted.is_some())
            .map(|e| e.key().clone())
            .collect();
        v.sort();
        v
    }

    /// Accounts by status right now, for a metrics scrape.
    pub fn account_gauges(&self) -> AccountGauges {
        let mut gauges = AccountGauges::default();
        for slot in self.inner.accounts.iter() {
            let record = slot.value().record.load();
            match record.status {
                AccountStatus::NeedsReauth => gauges.needs_reauth += 1,
                AccountStatus::Active if record.refresh_failing() => gauges.refreshing_failed += 1,
                AccountStatus::Active => gauges.active += 1,
            }
            if slot.value().health().unpersisted.is_some() {
                gauges.unpersisted += 1;
            }
        }
        gauges
    }

    /// Refreshes now, however fresh the token is (an operator's "refresh"). Joins a refresh
    /// already in flight instead of starting a second one.
    pub async fn refresh_now(&self, account: &AccountId) -> Result<Arc<TokenSet>, Error> {
        let slot = self.slot(account)?;
        let current = slot.record.load_full();
        if current.status == AccountStatus::NeedsReauth {
            return Err(Error::NeedsReauth(account.clone()));
        }
        let refresh = self
            .inner
            .start_refresh(account, &slot, current.tokens.clone(), Trigger::Operator)
            .ok_or(Error::Internal("an operator's refresh was refused"))?;
        let _waiting = crate::metrics::single_flight_waiter();
        match refresh.await {
            Ok(record) => Ok(record.tokens.clone()),
            // The token may be fine: the operator learns that EdgeTag failed, not that it expired.
            Err(super::RefreshFailure::Upstream(cause)) => Err(Error::ProviderUnavailable(cause)),
            Err(failure) => Err(failure.into_error(account)),
        }
    }

    /// Revokes the account's grant at the provider, then forgets the account (durably).
    /// Idempotent: an unknown account is already removed. A grant the provider refuses to revoke
    /// as invalid counts as revoked; with `force`, the local deletion happens even when the
    /// provider cannot be reached.
    pub async fn remove(&self, account: &AccountId, force: bool) -> Result<Removal, Error> {
        let Ok(slot) = self.slot(account) else {
            return Ok(Removal::NotFound);
        };
        let _write = slot.write.lock().await;
        if slot.removed.load(Ordering::Acquire) {
            return Ok(Removal::NotFound);
        }
        let current = slot.record.load_full();
        let revoked = {
            let _permit = self
                .inner
                .operator_upstream
                .acquire()
                .await
                .map_err(|_| Error::Internal("upstream limiter closed"))?;
            self.inner
                .provider
                .revoke(&current.tokens.access_token)
                .await
        };
        let removal = match revoked {
            Ok(()) | Err(UpstreamError::InvalidGrant | UpstreamError::Rejected { .. }) => {
                Removal::Revoked
            }
            Err(UpstreamError::InvalidClient { status }) if !force => {
                super::refresh::log_client_rejected(status);
                return Err(Error::ClientCredentialsRejected);
            }
            Err(e) if !force => return Err(Error::ProviderUnavailable(e)),
            Err(e) => {
                tracing::warn!(account = %account, error = %e, "revocation failed; removing locally as forced");
                Removal::RemovedWithoutRevocation
            }
        };
        self.inner
            .store
            .delete_account(account, slot.version.load(Ordering::Acquire))
            .await?;
        slot.removed.store(true, Ordering::Release);
        slot.touch();
        self.inner
            .accounts
            .remove_if(account, |_, s| Arc::ptr_eq(s, &slot));
        tracing::info!(account = %account, outcome = ?removal, "account removed");
        Ok(removal)
    }
}
