//! Durable state behind one interface: pending authorizations and versioned account records.
//!
//! The broker sees only [`Store`], so a networked backend can sit beside the embedded one:
//! - [`SledStore`] ([`sled`](self::sled)): the embedded default, one process per data directory;
//! - [`codec`]: the sealed-record format every backend writes, so a database sees account names and
//!   ciphertext only;
//! - [`RawAccount`] ([`raw`]): a record exactly as stored, for backups and restores;
//! - `Faulty` (with the `testing` feature, which only the tests turn on): a wrapper that makes writes
//!   fail or announces changes on demand, so tests can prove that the service fails closed and
//!   follows other writers; a release build does not contain it.
//!
//! The surface is what a networked backend needs. A write returns once it is durable (there is no
//! separate flush). Account writes name the version they replace ([`Expected`]), so a writer that
//! lost a race is refused with [`StoreError::Conflict`] instead of overwriting. A refresh first
//! claims the account ([`Store::claim_refresh`]): granted at once on sled, a row lock on a shared
//! database, and answered with the newer record when another process refreshed meanwhile. Changes
//! made by other processes arrive on [`Store::changes`] (never, on sled).
//!
//! `Arc<dyn Store>` rather than an enum or a type parameter: every call already costs an fsync or a
//! network round trip, so dynamic dispatch costs nothing that matters, and no type parameter spreads
//! through the broker and the server. GetToken's hot path never calls the store.

pub mod codec;
#[cfg(test)]
pub(crate) mod contract;
#[cfg(any(test, feature = "testing"))]
mod faulty;
pub mod postgres;
mod raw;
mod sled;

use std::{collections::BTreeMap, fmt, io, path::PathBuf, sync::Arc, time::SystemTime};

use async_trait::async_trait;
use futures::stream::BoxStream;

use crate::{
    account::AccountId,
    sealing::LiveKeyring,
    tokens::{AccountRecord, PendingAuth},
};

#[cfg(any(test, feature = "testing"))]
pub use self::faulty::{Faults, Faulty};
pub use self::{
    postgres::{PostgresConfig, PostgresStore},
    raw::RawAccount,
    sled::SledStore,
};

/// Each successful write of an account makes its version one higher; 0 is never stored.
pub type Version = u64;

/// An account record as stored, with the version the next write must name.
#[derive(Debug, Clone)]
pub struct Versioned {
    pub version: Version,
    pub record: AccountRecord,
}

/// What an account write expects to replace: the optimistic check that fences a writer who lost a
/// race (to another process, or to an operator's RemoveAccount).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expected {
    /// No record: a new account.
    Absent,
    /// The record at exactly this version.
    Version(Version),
}

/// A change another process made, for the broker to reload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// The account's record is now at `version`, or gone (`None`).
    Account {
        account: AccountId,
        version: Option<Version>,
    },
    /// Changes may have been missed (a lost connection): reload everything.
    Resync,
    /// Another process saw EdgeTag answer again and ended the fleet's outage back-offs
    /// ([`Store::end_outage_backoffs`]): end this process's too, and refresh at once.
    Recovered,
}

/// Who claims a refresh, which decides what a claim held elsewhere means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimMode {
    /// A caller (or an operator) needs the token: wait, within a bound, for another process's
    /// refresh of the account to finish, then take its result.
    Wait,
    /// The background scheduler: never queue behind another process. An account another process
    /// is refreshing is [`Claim::Busy`]; one the fleet is backing off (as of `now`) is
    /// [`Claim::BackingOff`].
    Skip { now: SystemTime },
}

/// A fleet-wide back-off, kept beside the record (plain values, nothing secret), so that several
/// processes do not multiply the attempts against a failing EdgeTag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Failed refreshes in a row.
    pub failures: u32,
    /// No background refresh before this.
    pub retry_at: SystemTime,
    /// The refresh failed because EdgeTag was unavailable (down, overloaded, unreachable), so
    /// EdgeTag's return ends the back-off early ([`Store::end_outage_backoffs`]).
    pub outage: bool,
    /// Until when EdgeTag's `Retry-After` holds the account back, even after its return.
    pub hold_until: Option<SystemTime>,
}

/// The answer to [`Store::claim_refresh`].
pub enum Claim {
    /// This process may refresh; the new record is written through the claim.
    Granted(Box<dyn RefreshClaim>),
    /// Another process refreshed since the version this one judged stale: take its record, make
    /// no upstream call.
    Superseded(Versioned),
    /// The account was removed.
    Gone,
    /// ([`ClaimMode::Skip`] only) another process is refreshing the account right now.
    Busy,
    /// ([`ClaimMode::Skip`] only) the fleet backs off this account until then.
    BackingOff(Backoff),
}

impl fmt::Debug for Claim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Granted(_) => f.write_str("Granted"),
            Self::Superseded(v) => write!(f, "Superseded(version {})", v.version),
            Self::Gone => f.write_str("Gone"),
            Self::Busy => f.write_str("Busy"),
            Self::BackingOff(b) => write!(f, "BackingOff({} failures)", b.failures),
        }
    }
}

/// The right to refresh one account, held from the claim until the new record is written or the
/// claim is dropped (which releases it without writing).
#[async_trait]
pub trait RefreshClaim: Send {
    /// The version claimed; the commit replaces exactly it.
    fn version(&self) -> Version;

    /// Writes the refreshed record (durably, fenced on the claimed version), then releases the
    /// claim. Returns the new version.
    async fn commit(self: Box<Self>, record: &AccountRecord) -> Result<Version, StoreError>;

    /// Releases the claim after a failed refresh, recording the back-off where every process
    /// sees it. A single process keeps its back-off in memory: the default records nothing.
    async fn fail(self: Box<Self>, backoff: Backoff) -> Result<(), StoreError> {
        let _ = backoff;
        Ok(())
    }
}

/// Durable state for the broker. Every write returns once it is durable.
#[async_trait]
pub trait Store: Send + Sync + fmt::Debug + 'static {
    /// Records a pending authorization under `state` (stored as a hash).
    async fn put_pending(&self, state: &str, pending: &PendingAuth) -> Result<(), StoreError>;

    /// Removes and returns the pending authorization for `state`, atomically: of any number of
    /// concurrent callers, in any number of processes, at most one gets it.
    async fn take_pending(&self, state: &str) -> Result<Option<PendingAuth>, StoreError>;

    /// Deletes pending authorizations that expired before `now`; returns how many.
    async fn purge_expired_pending(&self, now: SystemTime) -> Result<usize, StoreError>;

    /// Every stored account, each record opened on its own: one that does not open (sealed
    /// with a key this process does not hold yet, say) comes back as its error instead of
    /// failing the others. For resyncs while serving, which keep what they cannot open.
    async fn scan_accounts(
        &self,
    ) -> Result<Vec<(AccountId, Result<Versioned, StoreError>)>, StoreError>;

    /// Every stored account, for the in-memory cache at start-up: fails on the first record that
    /// does not open, so that a missing key stops the service instead of hiding accounts.
    async fn load_accounts(&self) -> Result<Vec<(AccountId, Versioned)>, StoreError> {
        self.scan_accounts()
            .await?
            .into_iter()
            .map(|(account, opened)| opened.map(|v| (account, v)))
            .collect()
    }

    /// One account, for reloading what another process changed.
    async fn load_account(&self, account: &AccountId) -> Result<Option<Versioned>, StoreError>;

    /// Writes an account's record if the stored one is what `expected` says; returns the new
    /// version, or [`StoreError::Conflict`] and changes nothing.
    async fn put_account(
        &self,
        account: &AccountId,
        record: &AccountRecord,
        expected: Expected,
    ) -> Result<Version, StoreError>;

    /// Deletes an account's record if it is at `expected`; deleting a missing one is a no-op.
    async fn delete_account(
        &self,
        account: &AccountId,
        expected: Version,
    ) -> Result<(), StoreError>;

    /// Claims the right to refresh `account`, whose record this process last saw at `seen`.
    async fn claim_refresh(
        &self,
        account: &AccountId,
        seen: Version,
        mode: ClaimMode,
    ) -> Result<Claim, StoreError>;

    /// EdgeTag answers again: ends every fleet-wide back-off that an outage caused (a
    /// `Retry-After` still holds) and tells the other processes ([`Change::Recovered`]); returns
    /// how many ended. A single process keeps its back-offs in memory: the default does nothing.
    async fn end_outage_backoffs(&self) -> Result<u64, StoreError> {
        Ok(0)
    }

    /// Changes made by other processes, in order. A backend with a single writer never yields.
    fn changes(&self) -> BoxStream<'static, Change>;

    /// The keyring records are sealed and opened with; a key reload replaces its keys in place.
    fn keyring(&self) -> &LiveKeyring;

    /// Re-seals, in place, every record not sealed with the current key, while the service
    /// serves (`credctl reseal`) or not (`credential-service rotate-keys`). Each rewrite is
    /// fenced on the record it read, so a record written meanwhile (sealed with the current key
    /// already) is never replaced by stale content; resealing keeps a record's version. Durable
    /// before it returns. Records that do not open with the keys in force are left as they are
    /// and counted in [`Resealed::remaining`]. Passes repeat (a few at most) while records remain
    /// on a key this process holds: a write sealed just before a key reload may land after the
    /// pass went by.
    async fn reseal_all(&self) -> Result<Resealed, StoreError>;

    /// Every account record as stored, sealed, sorted by name (a backup). Each record is at
    /// least as new as when the call began; nothing about pending authorizations. A record that
    /// does not open with the loaded keys fails the whole export.
    async fn export_accounts(&self) -> Result<Vec<RawAccount>, StoreError>;

    /// Writes `records` exactly as given, keeping their versions, all or nothing (a restore).
    /// A store that already holds accounts is refused with [`StoreError::NotEmpty`] unless
    /// `replace`, which removes every account the records do not name. Pending authorizations
    /// stay. Returns how many records were written.
    async fn restore_accounts(
        &self,
        records: &[RawAccount],
        replace: bool,
    ) -> Result<usize, StoreError>;

    /// The backend's name as operators give it (`sled`, `postgres`), for backup headers.
    fn kind(&self) -> &'static str;
}

/// What [`Store::reseal_all`] did. Key ids only, never keys.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resealed {
    /// The id of the key every record it could open is now sealed with.
    pub key_id: String,
    /// Records that were sealed with a previous key and now are with the current one.
    pub resealed: usize,
    /// Records already sealed with the current key (or written with it meanwhile).
    pub current: usize,
    /// Records still sealed with another key, by key id, counted after the last pass: ones this
    /// process could not re-seal (a key it does not hold; rarely, tampered with or locked past
    /// the bound). Empty once the rotation is complete.
    pub remaining: BTreeMap<String, usize>,
}

/// At most this many passes per re-seal. A pass that leaves records on a key this process holds
/// met a write sealed just before a key reload that landed after the pass went by; the next pass
/// takes it.
const RESEAL_PASSES: usize = 3;

impl Resealed {
    /// The report: `resealed` by the passes, then every record counted by the key that seals it
    /// (`by_key`, a count read after the last pass, so what remains is what is there).
    fn from_counts(key_id: String, resealed: usize, mut by_key: BTreeMap<String, usize>) -> Self {
        let on_current = by_key.remove(&key_id).unwrap_or(0);
        Self {
            key_id,
            resealed,
            current: on_current.saturating_sub(resealed),
            remaining: by_key,
        }
    }
}

/// What one pass of a re-seal did.
#[derive(Debug, Default)]
struct Pass {
    /// Records re-sealed with the current key.
    resealed: usize,
    /// Records on a key this process holds that it still could not re-seal (tampered with, or
    /// locked past the bound): another pass would not move them.
    stuck: usize,
}

impl Pass {
    /// Notes a record the pass could not re-seal, sealed with the key `key_id`.
    fn not_resealed(&mut self, keys: &LiveKeyring, key_id: &str) {
        if keys.get().holds(key_id) {
            self.stuck += 1;
        }
    }
}

/// Whether another pass could move something: records remain on keys this process holds,
/// beyond the ones the last pass could not move.
fn another_pass(keys: &LiveKeyring, by_key: &BTreeMap<String, usize>, last: &Pass) -> bool {
    let keyring = keys.get();
    let current = keyring.current_id();
    let movable: usize = by_key
        .iter()
        .filter(|(id, _)| **id != current && keyring.holds(id))
        .map(|(_, n)| n)
        .sum();
    movable > last.stuck
}

/// Why the store could not do what was asked. Messages name paths and causes, never record contents.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "the data directory {0} is in use by another credential-service process (sled allows one writer); \
         stop it or choose another --data-dir"
    )]
    Locked(PathBuf),
    #[error("cannot create the data directory {path}: {source}")]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("sled: {0}")]
    Sled(#[from] ::sled::Error),
    #[error(
        "the data directory {dir} does not open ({source}); refusing to start an empty store in its \
         place: restore the directory from a backup, or move it aside to start empty (every account \
         must then be authorized again)"
    )]
    Unreadable { dir: PathBuf, source: ::sled::Error },
    #[error("a stored {tree} record cannot be decoded: {reason}")]
    Corrupt { tree: &'static str, reason: String },
    /// Another process seals with a key this one does not hold (yet): a key rotation under way.
    #[error(
        "{record} is sealed with key {key_id}, which is not loaded; pass its file with \
         --previous-encryption-key-file, or, while serving, put it in the key files and send SIGHUP"
    )]
    KeyNotHeld { record: String, key_id: String },
    #[error("the flusher thread has stopped")]
    FlusherGone,
    #[error("account {0} was changed by another writer; reload it and decide again")]
    Conflict(AccountId),
    #[error("writes are failing on purpose (test fault injection)")]
    InjectedFailure,
    #[error("the database is unreachable: {0}")]
    Unavailable(String),
    #[error("the database refused: {0}")]
    Postgres(String),
    #[error(
        "the store already holds {accounts} account(s); a restore does not mix a backup into them: \
         pass --replace to replace them all, or restore into an empty store"
    )]
    NotEmpty { accounts: usize },
    #[error(
        "the database's schema is version {found}, newer than this binary knows ({known}); \
         run the newer credential-service, or restore the database"
    )]
    SchemaTooNew { found: i64, known: i64 },
}

impl StoreError {
    /// Whether the store could not be reached (worth a retry later), rather than refused.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }

    /// Whether the same write may succeed if tried again soon: not for data or set-up problems
    /// that no retry changes. (A [`StoreError::Conflict`] needs a reload first, not a retry.)
    pub fn may_pass_on_retry(&self) -> bool {
        !matches!(
            self,
            Self::Locked(_)
                | Self::CreateDir { .. }
                | Self::Unreadable { .. }
                | Self::Corrupt { .. }
                | Self::KeyNotHeld { .. }
                | Self::FlusherGone
                | Self::Conflict(_)
                | Self::NotEmpty { .. }
                | Self::SchemaTooNew { .. }
        )
    }
}

/// Opens the embedded default store.
pub fn open_sled(dir: &std::path::Path, keys: LiveKeyring) -> Result<Arc<dyn Store>, StoreError> {
    Ok(Arc::new(SledStore::open(dir, keys)?))
}
