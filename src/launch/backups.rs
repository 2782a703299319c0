//! `credential-service backup` and `restore`: the offline side of backups, on a stopped service's
//! data directory or store URL (a running service is backed up with `credctl backup`).

use std::path::Path;

use super::LaunchError;
use crate::{
    backup::{self, Restored},
    config::{KeySettings, StoreConfig, StoreSettings},
    sealing::{self, EncryptionConfig, Keyring},
    server,
    store::{PostgresStore, SledStore, Store},
};

/// Where an offline command works: the store and the keys it was given.
pub struct Target<'a> {
    pub data_dir: &'a Path,
    pub store: &'a StoreSettings,
    pub keys: &'a KeySettings,
}

impl Target<'_> {
    /// The configured keys. Never creates one: a new key would open nothing in a backup. Without
    /// `--encryption-key-file`, the key beside the data directory must exist.
    fn keyring(&self) -> Result<Keyring, LaunchError> {
        let mut encryption = self.keys.encryption();
        if encryption.key_file.is_none() {
            let beside = sealing::default_key_path(self.data_dir)?;
            if !beside.exists() {
                return Err(LaunchError::Usage(format!(
                    "no encryption key: {} does not exist; pass the key that sealed the records \
                     with --encryption-key-file (and older ones with --previous-encryption-key-file)",
                    beside.display()
                )));
            }
            encryption = EncryptionConfig {
                key_file: Some(beside),
                ..encryption
            };
        }
        Ok(Keyring::load(&encryption, self.data_dir)?)
    }

    async fn open(&self, keys: Keyring) -> Result<(Box<dyn Store>, String), LaunchError> {
        Ok(match self.store.resolve(self.keys)? {
            StoreConfig::Sled => (
                Box::new(SledStore::open(self.data_dir, keys)?),
                format!("the sled data directory {}", self.data_dir.display()),
            ),
            StoreConfig::Postgres(pg) => (
                Box::new(PostgresStore::open(&pg, keys).await?),
                "the PostgreSQL store".to_owned(),
            ),
        })
    }
}

/// `backup --to FILE`: every account of a stopped service's store, sealed as stored.
pub async fn backup(target: Target<'_>, to: &Path) -> Result<(), LaunchError> {
    let store = target.store.resolve(target.keys)?;
    if matches!(store, StoreConfig::Sled) && !target.data_dir.join("db").exists() {
        return Err(LaunchError::Usage(format!(
            "{} holds no sled store; pass the service's --data-dir (or --store)",
            target.data_dir.display()
        )));
    }
    let keys = server::load_keys(&target.keys.encryption(), &store, target.data_dir)?;
    let (store, name) = target.open(keys).await?;
    let saved = backup::save(store.as_ref(), to).await?;
    println!(
        "credential-service: backed up {} account(s) from {name} to {} ({} bytes; sealed with key(s) {})",
        saved.header.accounts,
        to.display(),
        saved.bytes,
        key_list(&saved.header.key_ids),
    );
    Ok(())
}

/// `restore --check FILE`: the checksum and every record opened with the keys; nothing written.
pub fn check(target: Target<'_>, file: &Path) -> Result<(), LaunchError> {
    let (_, found) = backup::check(file, &target.keyring()?)?;
    println!(
        "credential-service: {} is a sound backup: {}; nothing was written",
        file.display(),
        described(&found)
    );
    Ok(())
}

/// `restore --from FILE`: [`backup::restore`] into the configured store.
pub async fn restore(target: Target<'_>, from: &Path, replace: bool) -> Result<(), LaunchError> {
    let keys = target.keyring()?;
    // The whole file is checked before the store is even opened.
    backup::check(from, &keys)?;
    let (store, name) = target.open(keys.clone()).await?;
    let restored = backup::restore(from, &keys, store.as_ref(), replace).await?;
    println!(
        "credential-service: restored {} into {name}: {}; start the service on it with the same key(s)",
        from.display(),
        described(&restored)
    );
    Ok(())
}

fn described(r: &Restored) -> String {
    format!(
        "{} account(s) ({} needing re-authorization), versions kept (highest {}), taken {} from {}, sealed with key(s) {}",
        r.accounts,
        r.needs_reauth,
        r.highest_version,
        r.header.created_at,
        r.header.source,
        key_list(&r.header.key_ids),
    )
}

fn key_list(ids: &std::collections::BTreeSet<String>) -> String {
    if ids.is_empty() {
        return "none".to_owned();
    }
    ids.iter().cloned().collect::<Vec<_>>().join(", ")
}
