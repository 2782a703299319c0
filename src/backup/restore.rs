//! The offline side: checking a backup against the configured keys, restoring it into a store,
//! and taking a backup of a stopped service's store.

use std::{io::Write, path::Path};

use super::{
    BackupError,
    file::write_atomically,
    format::{self, Backup, Encoder, Header},
};
use crate::{
    sealing::Keyring,
    store::{Store, StoreError, codec::Codec},
};

/// What a restore (or a check) found in the backup.
#[derive(Debug)]
pub struct Restored {
    pub header: Header,
    pub accounts: usize,
    pub needs_reauth: usize,
    /// The highest version among the records (0 for an empty backup).
    pub highest_version: u64,
}

/// What an offline backup wrote.
#[derive(Debug)]
pub struct Saved {
    pub header: Header,
    pub bytes: u64,
}

/// Reads `path` and verifies its format and checksum.
fn read(path: &Path) -> Result<Backup, BackupError> {
    let bytes = std::fs::read(path).map_err(|source| BackupError::Read {
        path: path.to_owned(),
        source,
    })?;
    format::decode(&bytes).map_err(|source| BackupError::Format {
        path: path.to_owned(),
        source,
    })
}

/// Reads the backup at `path` and opens every record with `keys` (in memory; nothing is
/// written): the checksum, then each seal, then that each record's sealed version and mark are
/// the ones listed. The first failure is the answer.
pub fn check(path: &Path, keys: &Keyring) -> Result<(Backup, Restored), BackupError> {
    let backup = read(path)?;
    let codec = Codec::new(keys.clone());
    let mut needs_reauth = 0;
    for listed in &backup.records {
        let opened = codec
            .raw_account(listed.account.as_str().as_bytes(), &listed.sealed)
            .map_err(|e| BackupError::DoesNotOpen {
                path: path.to_owned(),
                reason: match e {
                    StoreError::Corrupt { reason, .. } => reason,
                    other => other.to_string(),
                },
            })?;
        if (opened.version, opened.needs_reauth) != (listed.version, listed.needs_reauth) {
            let mark = |needs: bool| {
                if needs {
                    " (needs re-authorization)"
                } else {
                    ""
                }
            };
            return Err(BackupError::Mismatch {
                path: path.to_owned(),
                account: listed.account.to_string(),
                listed: listed.version,
                listed_mark: mark(listed.needs_reauth),
                sealed: opened.version,
                sealed_mark: mark(opened.needs_reauth),
            });
        }
        needs_reauth += usize::from(listed.needs_reauth);
    }
    let summary = Restored {
        header: backup.header.clone(),
        accounts: backup.records.len(),
        needs_reauth,
        highest_version: backup.records.iter().map(|r| r.version).max().unwrap_or(0),
    };
    Ok((backup, summary))
}

/// Checks the backup at `path` in full ([`check`]), then writes it into `store` all or nothing
/// (refused when the store holds accounts, unless `replace`).
pub async fn restore(
    path: &Path,
    keys: &Keyring,
    store: &dyn Store,
    replace: bool,
) -> Result<Restored, BackupError> {
    let (backup, summary) = check(path, keys)?;
    store.restore_accounts(&backup.records, replace).await?;
    Ok(summary)
}

/// Writes a backup of every account in `store` to `path` (see [`write_atomically`]).
pub async fn save(store: &dyn Store, path: &Path) -> Result<Saved, BackupError> {
    let records = store.export_accounts().await?;
    let header = Header::new(store.kind(), &records);
    let written = {
        let (path, header) = (path.to_owned(), header.clone());
        tokio::task::spawn_blocking(move || {
            let mut bytes = 0u64;
            write_atomically(&path, |out| {
                let mut encoder = Encoder::new(&header);
                for r in &records {
                    encoder.record(r);
                    let piece = encoder.take();
                    bytes += piece.len() as u64;
                    out.write_all(&piece)?;
                }
                let last = encoder.finish();
                bytes += last.len() as u64;
                out.write_all(&last)
            })
            .map(|()| bytes)
        })
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
    };
    let bytes = written.map_err(|source| BackupError::Write {
        path: path.to_owned(),
        source,
    })?;
    Ok(Saved { header, bytes })
}
