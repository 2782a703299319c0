//! Following other processes: when a shared store reports that another process changed an account
//! (a refresh, a new CompleteAuth, a removal), the slot is reloaded from the store, so memory
//! follows the database. A record replaces the one in memory only when its version is newer; a
//! resync reloads everything. A record that does not open with the keys this process holds
//! leaves memory as it was (see [`unopened`](super::unopened)). On sled no change ever arrives.

use std::sync::{Arc, atomic::Ordering};

use futures::StreamExt;

use super::{Broker, slot::Health};
use crate::{
    account::AccountId,
    store::{Change, StoreError, Versioned},
};

impl Broker {
    /// Applies the store's change notifications until the stream ends (or the task is aborted).
    /// Subscribes when called, not when first polled, so no change announced after this call is
    /// missed while the returned future waits to be scheduled.
    pub(super) fn follow_changes(self) -> impl std::future::Future<Output = ()> + Send {
        let mut changes = self.inner.store.changes();
        async move {
            while let Some(change) = changes.next().await {
                let applied = match &change {
                    Change::Account { account, .. } => self.reload(account).await,
                    Change::Resync => self.resync().await,
                    Change::Recovered => {
                        self.inner.end_outage_backoffs_here();
                        Ok(())
                    }
                };
                match applied {
                    Ok(()) | Err(StoreError::KeyNotHeld { .. }) => {} // noted once, by key
                    Err(e) => {
                        tracing::warn!(error = %e, change = ?change, "could not apply a change from the store; the next resync will")
                    }
                }
            }
        }
    }

    /// Makes memory match the store for one account. A record sealed with a key this process
    /// does not hold is noted, and memory kept.
    pub(super) async fn reload(&self, account: &AccountId) -> Result<(), StoreError> {
        let stored = self.inner.store.load_account(account).await;
        if self.inner.noted_if_key_missing(account, &stored) {
            return stored.map(drop);
        }
        let stored = stored?;
        self.inner.opened(account);
        self.apply(account, stored).await;
        Ok(())
    }

    /// Makes memory match the store for every account. An account whose record does not open is
    /// kept as memory has it (never taken for removed).
    async fn resync(&self) -> Result<(), StoreError> {
        let stored = self.inner.store.scan_accounts().await?;
        let mut gone: std::collections::HashSet<AccountId> = self
            .inner
            .accounts
            .iter()
            .map(|e| e.key().clone())
            .collect();
        for (account, opened) in stored {
            gone.remove(&account);
            if self.inner.noted_if_key_missing(&account, &opened) {
                continue;
            }
            match opened {
                Ok(versioned) => {
                    self.inner.opened(&account);
                    self.apply(&account, Some(versioned)).await;
                }
                Err(e) => {
                    tracing::warn!(account = %account, error = %e, "a stored account does not open; keeping what memory has");
                }
            }
        }
        for account in gone {
            self.inner.opened(&account);
            self.apply(&account, None).await;
        }
        Ok(())
    }

    /// Takes `stored` (or its absence) as the truth for `account` unless memory is already as new.
    async fn apply(&self, account: &AccountId, stored: Option<Versioned>) {
        let inner = &self.inner;
        let slot = inner.accounts.get(account).map(|s| s.value().clone());
        match (slot, stored) {
            (None, None) => {}
            (None, Some(v)) => {
                let slot = inner
                    .accounts
                    .entry(account.clone())
                    .or_insert_with(|| inner.new_slot(account, v.record, v.version))
                    .clone();
                slot.touch(); // a new account, for WatchAccounts
            }
            (Some(slot), stored) => {
                let _write = slot.write.lock().await;
                if slot.removed.load(Ordering::Acquire) {
                    return;
                }
                match stored {
                    Some(v) if v.version > slot.version.load(Ordering::Acquire) => {
                        // Another process wrote it: its state replaces ours, back-off included.
                        *slot.health() = Health::default();
                        inner.publish(&slot, Arc::new(v.record), v.version);
                    }
                    Some(_) => {}
                    None => {
                        slot.removed.store(true, Ordering::Release);
                        slot.touch();
                        inner
                            .accounts
                            .remove_if(account, |_, s| Arc::ptr_eq(s, &slot));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use secrecy::ExposeSecret;

    use super::*;
    use crate::{
        broker::BrokerConfig,
        clock::Clock,
        sealing::Keyring,
        store::{Expected, Faults, Faulty, SledStore, Store, contract::record},
    };

    /// What another replica does to a shared store, seen by this broker only through the change
    /// stream: a new account, a refresh, a removal.
    #[tokio::test]
    async fn memory_follows_changes_made_by_another_process() {
        let dir = tempfile::tempdir().unwrap();
        let shared: Arc<dyn Store> =
            Arc::new(SledStore::open(dir.path(), Keyring::ephemeral()).unwrap());
        let faults = Faults::default();
        let store = Arc::new(Faulty::new(shared.clone(), faults.clone()));
        let broker = Broker::new(
            store,
            crate::oauth::unreachable_provider(),
            Clock::manual(),
            BrokerConfig::default(),
        )
        .await
        .unwrap();
        tokio::spawn(broker.clone().follow_changes());
        let acme = AccountId::parse("acme").unwrap();
        let served = |b: &Broker| {
            b.describe(&acme)
                .map(|r| r.tokens.access_token.expose_secret().to_owned())
                .ok()
        };
        let until = async |b: &Broker, want: Option<&str>| {
            tokio::time::timeout(Duration::from_secs(10), async {
                while served(b).as_deref() != want {
                    tokio::task::yield_now().await;
                }
            })
            .await
            .expect("the change is applied");
        };

        let v1 = shared
            .put_account(&acme, &record("at-1", Some("rt")), Expected::Absent)
            .await
            .unwrap();
        assert_eq!(
            served(&broker),
            None,
            "nothing is known before the change arrives"
        );
        faults.announce(Change::Account {
            account: acme.clone(),
            version: Some(v1),
        });
        until(&broker, Some("at-1")).await;

        let v2 = shared
            .put_account(&acme, &record("at-2", Some("rt")), Expected::Version(v1))
            .await
            .unwrap();
        faults.announce(Change::Account {
            account: acme.clone(),
            version: Some(v2),
        });
        until(&broker, Some("at-2")).await;

        shared.delete_account(&acme, v2).await.unwrap();
        faults.announce(Change::Resync);
        until(&broker, None).await;
        assert_eq!(broker.account_count(), 0);
    }
}
