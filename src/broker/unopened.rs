//! Records this process cannot open yet. During a key rotation on a shared store, another replica
//! may take up the new key (and seal with it) before this one: a record it wrote then names a key
//! this process does not hold. Memory keeps what it had for that account, so callers are served
//! as before; the first such record of each key is logged (once per key, not per record or per
//! notification), and every one is loaded again after the next key reload
//! ([`Broker::take_up_unopened`]).

use std::collections::{BTreeMap, BTreeSet};

use super::{Broker, Inner};
use crate::{account::AccountId, store::StoreError};

/// The accounts whose stored record did not open, with the key each needs, and the keys already
/// logged.
#[derive(Default)]
pub(super) struct Unopened {
    accounts: BTreeMap<AccountId, String>,
    logged: BTreeSet<String>,
}

impl Inner {
    /// Notes that `account`'s stored record needs the key `key_id`; logs once per key.
    pub(super) fn note_unopened(&self, account: &AccountId, key_id: &str) {
        let mut unopened = self.unopened.lock().unwrap_or_else(|e| e.into_inner());
        unopened.accounts.insert(account.clone(), key_id.to_owned());
        if unopened.logged.insert(key_id.to_owned()) {
            tracing::warn!(
                account = %account,
                key_id,
                "a stored record is sealed with a key this replica does not hold (another replica \
                 took up a new key first); serving what it has until its key files hold that key \
                 and it gets SIGHUP"
            );
        }
    }

    /// `account`'s record opened (or is gone): nothing to take up for it any more.
    pub(super) fn opened(&self, account: &AccountId) {
        let mut unopened = self.unopened.lock().unwrap_or_else(|e| e.into_inner());
        if !unopened.accounts.is_empty() {
            unopened.accounts.remove(account);
        }
    }

    /// Notes a load that failed for want of a key; true when `result` was that.
    pub(super) fn noted_if_key_missing<T>(
        &self,
        account: &AccountId,
        result: &Result<T, StoreError>,
    ) -> bool {
        match result {
            Err(StoreError::KeyNotHeld { key_id, .. }) => {
                self.note_unopened(account, key_id);
                true
            }
            _ => false,
        }
    }
}

impl Broker {
    /// After the encryption keys were reloaded: loads again every account whose record did not
    /// open, and returns how many now do. Those that still do not are noted (and their key
    /// logged) again.
    pub async fn take_up_unopened(&self) -> usize {
        let accounts = {
            let mut unopened = self
                .inner
                .unopened
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            unopened.logged.clear();
            std::mem::take(&mut unopened.accounts)
        };
        let mut taken = 0;
        for account in accounts.into_keys() {
            match self.reload(&account).await {
                Ok(()) => taken += 1,
                Err(StoreError::KeyNotHeld { .. }) => {}
                Err(e) => {
                    tracing::warn!(account = %account, error = %e, "could not load an account after the key reload; the next resync will")
                }
            }
        }
        if taken > 0 {
            tracing::info!(
                accounts = taken,
                "took up the accounts written with a key this replica now holds"
            );
        }
        taken
    }

    /// How many accounts' stored records this process cannot open now.
    pub fn unopened_count(&self) -> usize {
        let unopened = self
            .inner
            .unopened
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        unopened.accounts.len()
    }
}
