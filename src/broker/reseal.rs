//! Key rotation while serving. [`Broker::reload_keys`] takes up the key files again (on SIGHUP,
//! and first thing in every re-seal, so an operator's `credctl reseal` right after the signal
//! cannot race it): new writes then seal with the new key, and accounts another replica wrote
//! with it are loaded. [`Broker::reseal`] then re-seals every stored record in place (see
//! [`Store::reseal_all`](crate::store::Store::reseal_all) for the fence on each record), and
//! says how many remain on other keys.

use super::Broker;
use crate::{
    error::Error,
    sealing::{KeyError, Reload},
    store::Resealed,
};

impl Broker {
    /// Reads the encryption key files again and puts them in force (see
    /// [`LiveKeyring::reload`](crate::sealing::LiveKeyring::reload)); logs one line either way.
    /// After a change, loads the accounts whose records needed the new key.
    pub async fn reload_keys(&self) -> Result<Reload, KeyError> {
        let reloaded = self.inner.store.keyring().reload();
        match &reloaded {
            Ok(Reload::Unchanged { current }) => {
                tracing::info!(key_id = %current, "encryption key files re-read: unchanged");
            }
            Ok(Reload::Changed { current, previous }) => {
                tracing::info!(
                    key_id = %current,
                    previous_key_ids = %previous.join(","),
                    "encryption keys reloaded: new records are sealed with key {current}; the \
                     previous keys still open older records until `credctl reseal` re-seals them"
                );
                self.take_up_unopened().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "the encryption key files did not load; the keys in force stay");
            }
        }
        reloaded
    }

    /// ResealRecords: takes up the key files, then re-seals every stored record with the
    /// current key while serving. One re-seal at a time; a second call waits for the first.
    pub async fn reseal(&self) -> Result<Resealed, Error> {
        let _one = self.inner.resealing.lock().await;
        self.reload_keys().await.map_err(Error::KeysNotLoaded)?;
        let done = self.inner.store.reseal_all().await?;
        let remaining: usize = done.remaining.values().sum();
        tracing::info!(
            key_id = %done.key_id,
            resealed = done.resealed,
            already_current = done.current,
            remaining,
            remaining_by_key_id = ?done.remaining,
            "records re-sealed with the current encryption key"
        );
        Ok(done)
    }
}
