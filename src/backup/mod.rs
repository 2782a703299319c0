//! Backups: every account record exactly as stored, sealed, in one checksummed file
//! ([`format`]), taken online (the Backup RPC, through the broker) or offline
//! (`credential-service backup`), and restored offline, all or nothing, after every record has
//! been opened with the configured keys (`credential-service restore`).
//!
//! - [`format`]: the file layout, its writer and its reader;
//! - [`file`]: writing a file so that a partial one never carries the final name;
//! - [`restore`]: the checks before a restore, the restore, and the offline backup.

pub mod file;
pub mod format;
pub mod restore;

use std::{io, path::PathBuf};

use crate::store::StoreError;

pub use self::{
    format::{Backup, FormatError, Header},
    restore::{Restored, Saved, check, restore, save},
};

/// Why a backup or restore stopped. One line each; nothing written when a check fails.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("cannot read the backup {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot write the backup {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("refusing the backup {path}: {source}")]
    Format { path: PathBuf, source: FormatError },
    #[error(
        "refusing the backup {path}: a record does not open with the configured keys ({reason}); nothing was written"
    )]
    DoesNotOpen { path: PathBuf, reason: String },
    #[error(
        "refusing the backup {path}: account {account} is listed at version {listed}{listed_mark} but its sealed record is at version {sealed}{sealed_mark}; nothing was written"
    )]
    Mismatch {
        path: PathBuf,
        account: String,
        listed: u64,
        listed_mark: &'static str,
        sealed: u64,
        sealed_mark: &'static str,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}
