//! The embedded default: an sled database in the data directory, one process at a time.
//!
//! Two trees: `pending` (SHA-256 of the state → sealed pending record) and `accounts` (account →
//! sealed, versioned record), both in the [`codec`](super::codec) format. Every write waits for a
//! flush that started after it; flushes are batched by one flusher thread (group commit), which also
//! sidesteps sled 0.34's `flush_async` hang under concurrency (spacejam/sled#1308). Versions are
//! fenced with sled's compare-and-swap on the sealed bytes, which are unique per write (random
//! nonce), so a swap succeeds only over exactly the record that was read. A re-seal
//! ([`Store::reseal_all`]) changes the bytes but not the version: a writer whose swap meets one
//! reads again and swaps over it, so only a new version is a conflict.
//!
//! sled's own flush is not durable in a power cut; [`files`] adds what it leaves out (an
//! `fdatasync` after each flush, fsynced directories, an atomically written `conf`).

mod files;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt, io,
    path::Path,
    sync::{Arc, mpsc},
    time::SystemTime,
};

use async_trait::async_trait;
use futures::{StreamExt, stream::BoxStream};
use tokio::sync::oneshot;

use super::{
    Change, Claim, ClaimMode, Expected, Pass, RESEAL_PASSES, RawAccount, RefreshClaim, Resealed,
    Store, StoreError, Version, Versioned, another_pass,
    codec::{ACCOUNTS, Codec, PENDING, Resealing, account_of_key, state_key},
};
use crate::{
    account::AccountId,
    sealing::{Keyring, LiveKeyring},
    tokens::{AccountRecord, PendingAuth},
};

/// sled's page cache; the default (1 GiB) is far more than a few hundred thousand small records need.
const CACHE_BYTES: u64 = 64 * 1024 * 1024;

/// A cheap-to-clone handle on the database.
#[derive(Clone)]
pub struct SledStore {
    pending: sled::Tree,
    accounts: sled::Tree,
    codec: Codec,
    flusher: Arc<Flusher>,
    /// Makes every flush fail, as a full or failing disk would.
    #[cfg(test)]
    fail_flushes: Arc<std::sync::atomic::AtomicBool>,
}

impl fmt::Debug for SledStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SledStore").finish_non_exhaustive()
    }
}

/// How long opening waits for the data directory's lock. A handle that was just dropped (a
/// restart in the same process, `rotate-keys` right after a stop) lets go of the lock a moment
/// later, once sled's own background thread has ended; another running process keeps it.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Opens sled in `dir`, waiting up to [`LOCK_WAIT`] for its lock.
fn open_db(dir: &Path) -> Result<sled::Db, StoreError> {
    let started = std::time::Instant::now();
    loop {
        match sled::Config::new()
            .path(dir)
            .cache_capacity(CACHE_BYTES)
            .segment_size(files::SEGMENT_SIZE)
            .open()
        {
            Ok(db) => return Ok(db),
            Err(sled::Error::Io(ref io)) if io.to_string().contains("could not acquire lock") => {
                if started.elapsed() >= LOCK_WAIT {
                    return Err(StoreError::Locked(dir.to_owned()));
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(other) => return Err(unreadable(dir, other)),
        }
    }
}

/// A data directory that holds a store sled cannot read: the service stops rather than start
/// empty in its place.
fn unreadable(dir: &Path, source: impl Into<sled::Error>) -> StoreError {
    StoreError::Unreadable {
        dir: dir.to_owned(),
        source: source.into(),
    }
}

impl SledStore {
    /// Opens (or creates, mode 0700, files 0600) the database in `dir`, sealing and opening
    /// records with `keys`. Fails within [`LOCK_WAIT`] when another process holds it.
    pub fn open(dir: &Path, keys: impl Into<LiveKeyring>) -> Result<Self, StoreError> {
        let repaired = files::prepare(dir).map_err(|source| StoreError::CreateDir {
            path: dir.to_owned(),
            source,
        })?;
        if repaired {
            tracing::warn!(
                data_dir = %dir.display(),
                "sled's conf file was torn (a first start cut short); wrote it again"
            );
        }
        let db = open_db(dir)?;
        private_files(dir).map_err(|source| StoreError::CreateDir {
            path: dir.to_owned(),
            source,
        })?;
        let pending = db.open_tree(PENDING).map_err(|e| unreadable(dir, e))?;
        let accounts = db.open_tree(ACCOUNTS).map_err(|e| unreadable(dir, e))?;
        let syncer = files::Syncer::open(dir).map_err(|e| unreadable(dir, e))?;
        let flusher = Arc::new(Flusher::start(db.clone(), syncer, dir));
        Ok(Self {
            pending,
            accounts,
            codec: Codec::new(keys),
            flusher,
            #[cfg(test)]
            fail_flushes: Default::default(),
        })
    }

    /// The ids of the keys that sealed the accounts stored in `dir`, read from the records' headers
    /// without opening any: names the key a store needs when its key file is missing. Empty for a
    /// directory sled never wrote to.
    pub fn sealing_key_ids(dir: &Path) -> Result<BTreeSet<String>, StoreError> {
        let mut ids = BTreeSet::new();
        if !dir.join("db").exists() {
            return Ok(ids);
        }
        files::prepare(dir).map_err(|e| unreadable(dir, e))?;
        let db = open_db(dir)?;
        let accounts = db.open_tree(ACCOUNTS).map_err(|e| unreadable(dir, e))?;
        for item in accounts.iter() {
            let (_, sealed) = item.map_err(|e| unreadable(dir, e))?;
            ids.extend(Keyring::key_id_of(&sealed));
        }
        Ok(ids)
    }

    /// Creates the data directory (and any missing parents, mode 0700), each fsynced into its
    /// parent, before a key is created beside it.
    pub fn create_dir(dir: &Path) -> Result<(), StoreError> {
        files::create_dir_durably(dir).map_err(|source| StoreError::CreateDir {
            path: dir.to_owned(),
            source,
        })
    }

    /// Waits until everything written so far is durable.
    async fn flush(&self) -> Result<(), StoreError> {
        #[cfg(test)]
        if self.fail_flushes.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(sled::Error::Io(io::Error::other("injected flush failure")).into());
        }
        self.flusher.flush().await
    }

    /// Writes (or with `None`, deletes) an account's record if its stored version is `expected`,
    /// and makes it durable. If the flush fails the write is undone, so the store keeps the version
    /// the caller still holds: its retry of the same write can then succeed (it would otherwise
    /// meet its own undurable write as a conflict, until a restart).
    async fn write_account(
        &self,
        account: &AccountId,
        expected: Expected,
        new: Option<(&AccountRecord, Version)>,
    ) -> Result<(), StoreError> {
        let (old, written) = self.swap_account(account, expected, new)?;
        if let Err(e) = self.flush().await {
            if let Err(undo) = self
                .accounts
                .compare_and_swap(account.as_str(), written, old)
            {
                tracing::error!(account = %account, error = %undo, "undoing a write that could not be flushed failed");
            }
            return Err(e);
        }
        Ok(())
    }

    fn current(&self, account: &AccountId) -> Result<Option<(sled::IVec, Versioned)>, StoreError> {
        let Some(bytes) = self.accounts.get(account.as_str())? else {
            return Ok(None);
        };
        let (_, versioned) = self
            .codec
            .open_account(account.as_str().as_bytes(), &bytes)?;
        Ok(Some((bytes, versioned)))
    }

    /// The compare-and-swap behind every account write: replaces exactly the record `expected`
    /// names, or nothing. A swap that fails over a record of the expected version (a re-seal
    /// rewrote its bytes meanwhile) reads it again and swaps over that.
    /// The in-memory half of [`Self::write_account`]: returns the bytes replaced and written.
    fn swap_account(
        &self,
        account: &AccountId,
        expected: Expected,
        new: Option<(&AccountRecord, Version)>,
    ) -> Result<(Option<sled::IVec>, Option<sled::IVec>), StoreError> {
        let sealed = new.map(|(record, version)| {
            sled::IVec::from(self.codec.seal_account(account, record, version))
        });
        loop {
            let old = match (expected, self.current(account)?) {
                (Expected::Absent, None) => None,
                (Expected::Version(v), Some((bytes, stored))) if stored.version == v => Some(bytes),
                _ => return Err(StoreError::Conflict(account.clone())),
            };
            if self
                .accounts
                .compare_and_swap(account.as_str(), old.clone(), sealed.clone())?
                .is_ok()
            {
                return Ok((old, sealed));
            }
        }
    }

    /// One pass of [`Store::reseal_all`] over one tree, blocking (sled's calls and the ciphers
    /// are synchronous): each record is re-sealed with a compare-and-swap over the bytes read,
    /// and read again when a writer got there first.
    fn reseal_tree(&self, name: &'static str, pass: &mut Pass) -> Result<(), StoreError> {
        let tree = self.tree(name);
        for item in tree.iter().keys() {
            let key = item?;
            while let Some(bytes) = tree.get(&key)? {
                match self.codec.reseal(name, &key, &bytes) {
                    Resealing::Current => {}
                    Resealing::Unopened(key_id) => pass.not_resealed(self.codec.keyring(), &key_id),
                    Resealing::Resealed(sealed) => {
                        if tree
                            .compare_and_swap(&key, Some(bytes), Some(sealed))?
                            .is_err()
                        {
                            continue; // written meanwhile: look at what is there now
                        }
                        pass.resealed += 1;
                    }
                }
                break;
            }
        }
        Ok(())
    }

    /// Every record of both trees counted by the id of the key that sealed it (from its header).
    fn count_by_key(&self) -> Result<BTreeMap<String, usize>, StoreError> {
        let mut counts = BTreeMap::new();
        for name in [PENDING, ACCOUNTS] {
            for item in self.tree(name).iter().values() {
                let id = Keyring::key_id_of(&item?).unwrap_or_else(|| "(not sealed)".into());
                *counts.entry(id).or_default() += 1;
            }
        }
        Ok(counts)
    }

    /// [`Store::reseal_all`]'s passes, blocking; see there.
    fn reseal_blocking(&self) -> Result<Resealed, StoreError> {
        let mut resealed = 0;
        for _ in 0..RESEAL_PASSES {
            let mut pass = Pass::default();
            self.reseal_tree(PENDING, &mut pass)?;
            self.reseal_tree(ACCOUNTS, &mut pass)?;
            resealed += pass.resealed;
            let by_key = self.count_by_key()?;
            if !another_pass(self.codec.keyring(), &by_key, &pass) {
                return Ok(Resealed::from_counts(
                    self.codec.current_key_id(),
                    resealed,
                    by_key,
                ));
            }
        }
        let by_key = self.count_by_key()?;
        Ok(Resealed::from_counts(
            self.codec.current_key_id(),
            resealed,
            by_key,
        ))
    }

    fn tree(&self, name: &str) -> &sled::Tree {
        match name {
            PENDING => &self.pending,
            _ => &self.accounts,
        }
    }
}

#[async_trait]
impl Store for SledStore {
    async fn put_pending(&self, state: &str, pending: &PendingAuth) -> Result<(), StoreError> {
        let key = state_key(state);
        self.pending
            .insert(key, self.codec.seal_pending(&key, pending))?;
        self.flush().await
    }

    /// The removal is not flushed: if it is lost in a crash, the provider still refuses the
    /// already used code.
    async fn take_pending(&self, state: &str) -> Result<Option<PendingAuth>, StoreError> {
        let key = state_key(state);
        let Some(bytes) = self.pending.remove(key)? else {
            return Ok(None);
        };
        self.codec.open_pending(&key, &bytes).map(Some)
    }

    async fn purge_expired_pending(&self, now: SystemTime) -> Result<usize, StoreError> {
        let mut purged = 0;
        for item in self.pending.iter() {
            let (key, bytes) = item?;
            // Compare-and-swap so a record replaced meanwhile is not removed by mistake.
            if self.codec.pending_expired(&key, &bytes, now)
                && self
                    .pending
                    .compare_and_swap(&key, Some(bytes), None::<&[u8]>)?
                    .is_ok()
            {
                purged += 1;
            }
        }
        Ok(purged)
    }

    async fn scan_accounts(
        &self,
    ) -> Result<Vec<(AccountId, Result<Versioned, StoreError>)>, StoreError> {
        self.accounts
            .iter()
            .map(|item| {
                let (key, bytes) = item?;
                let account = account_of_key(&key)?;
                let opened = self.codec.open_account(&key, &bytes).map(|(_, v)| v);
                Ok((account, opened))
            })
            .collect()
    }

    async fn load_account(&self, account: &AccountId) -> Result<Option<Versioned>, StoreError> {
        Ok(self.current(account)?.map(|(_, v)| v))
    }

    async fn put_account(
        &self,
        account: &AccountId,
        record: &AccountRecord,
        expected: Expected,
    ) -> Result<Version, StoreError> {
        let version = match expected {
            Expected::Absent => 1,
            Expected::Version(v) => v + 1,
        };
        self.write_account(account, expected, Some((record, version)))
            .await?;
        Ok(version)
    }

    async fn delete_account(
        &self,
        account: &AccountId,
        expected: Version,
    ) -> Result<(), StoreError> {
        if self.current(account)?.is_none() {
            return Ok(());
        }
        self.write_account(account, Expected::Version(expected), None)
            .await
    }

    /// One process per directory: the claim is always granted unless the record moved on (which
    /// only this process can have done) or went away.
    async fn claim_refresh(
        &self,
        account: &AccountId,
        seen: Version,
        _mode: ClaimMode,
    ) -> Result<Claim, StoreError> {
        Ok(match self.current(account)? {
            None => Claim::Gone,
            Some((_, stored)) if stored.version != seen => Claim::Superseded(stored),
            Some(_) => Claim::Granted(Box::new(SledClaim {
                store: self.clone(),
                account: account.clone(),
                version: seen,
            })),
        })
    }

    fn changes(&self) -> BoxStream<'static, Change> {
        futures::stream::pending().boxed()
    }

    fn keyring(&self) -> &LiveKeyring {
        self.codec.keyring()
    }

    /// While serving: the passes run on a blocking thread beside the broker's writes (see
    /// [`Self::reseal_tree`]); one group commit makes every rewrite durable before it returns.
    async fn reseal_all(&self) -> Result<Resealed, StoreError> {
        let store = self.clone();
        let done = tokio::task::spawn_blocking(move || store.reseal_blocking())
            .await
            .map_err(|e| match e.try_into_panic() {
                Ok(panic) => std::panic::resume_unwind(panic),
                Err(_) => StoreError::FlusherGone, // the runtime is shutting down
            })??;
        self.flush().await?;
        Ok(done)
    }

    /// sled's iterator sees each key's latest value as it passes it: every record is one that was
    /// stored, at least as new as when the export began. On a blocking thread: 100,000 records
    /// take a while, and the runtime's workers keep answering GetToken meanwhile.
    async fn export_accounts(&self) -> Result<Vec<RawAccount>, StoreError> {
        let (accounts, codec) = (self.accounts.clone(), self.codec.clone());
        tokio::task::spawn_blocking(move || {
            accounts
                .iter()
                .map(|item| {
                    let (key, sealed) = item?;
                    codec.raw_account(&key, &sealed)
                })
                .collect()
        })
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
    }

    /// One sled batch (atomic, also across a crash), then one flush.
    async fn restore_accounts(
        &self,
        records: &[RawAccount],
        replace: bool,
    ) -> Result<usize, StoreError> {
        let mut batch = sled::Batch::default();
        let mut existing = 0;
        for item in self.accounts.iter() {
            let (key, _) = item?;
            existing += 1;
            batch.remove(key);
        }
        if existing > 0 && !replace {
            return Err(StoreError::NotEmpty { accounts: existing });
        }
        // A later insert of the same key wins over its removal in the batch.
        for r in records {
            batch.insert(r.account.as_str(), r.sealed.as_slice());
        }
        self.accounts.apply_batch(batch)?;
        self.flush().await?;
        Ok(records.len())
    }

    fn kind(&self) -> &'static str {
        "sled"
    }
}

struct SledClaim {
    store: SledStore,
    account: AccountId,
    version: Version,
}

#[async_trait]
impl RefreshClaim for SledClaim {
    fn version(&self) -> Version {
        self.version
    }

    async fn commit(self: Box<Self>, record: &AccountRecord) -> Result<Version, StoreError> {
        self.store
            .put_account(&self.account, record, Expected::Version(self.version))
            .await
    }
}

/// Tightens what sled created to owner-only (its files hold sealed secrets; the directory is
/// already 0700, this is depth in defence), and the process umask to 0077, so files sled
/// creates later (snapshots, blobs) are born private.
#[cfg(unix)]
fn private_files(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let mode = if entry.file_type()?.is_dir() {
            private_files(&entry.path())?;
            0o700
        } else {
            0o600
        };
        std::fs::set_permissions(entry.path(), std::fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

#[cfg(not(unix))]
fn private_files(_dir: &Path) -> io::Result<()> {
    Ok(())
}

/// Group commit: callers enqueue a waiter after their write; the thread flushes (sled's flush, then
/// [`files::Syncer::sync`]) once for every waiter it has collected, so a burst of N writes costs
/// far fewer than N fsyncs, and no waiter hears back before its write is durable. When the last
/// [`SledStore`] handle goes, the thread flushes a final time and the database closes before the drop
/// returns, so a restart in the same process finds the directory free.
struct Flusher {
    tx: Option<mpsc::Sender<FlushWaiter>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// The data directory, fsynced once sled has closed: closing may write a snapshot.
    dir: std::path::PathBuf,
}

type FlushWaiter = oneshot::Sender<Result<(), Arc<sled::Error>>>;

impl Flusher {
    fn start(db: sled::Db, mut syncer: files::Syncer, dir: &Path) -> Self {
        let (tx, rx) = mpsc::channel::<FlushWaiter>();
        let mut durable = move || -> Result<(), sled::Error> {
            db.flush()?;
            syncer.sync()?;
            Ok(())
        };
        let thread = std::thread::Builder::new()
            .name("sled-flusher".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let waiters: Vec<_> = std::iter::once(first).chain(rx.try_iter()).collect();
                    let result = durable().map_err(Arc::new);
                    for w in waiters {
                        let _ = w.send(result.clone());
                    }
                }
                if let Err(e) = durable() {
                    tracing::error!(error = %e, "final flush failed");
                }
            })
            .expect("spawning the flusher thread");
        Self {
            tx: Some(tx),
            thread: Some(thread),
            dir: dir.to_owned(),
        }
    }

    async fn flush(&self) -> Result<(), StoreError> {
        let (done, wait) = oneshot::channel();
        let tx = self.tx.as_ref().ok_or(StoreError::FlusherGone)?;
        tx.send(done).map_err(|_| StoreError::FlusherGone)?;
        match wait.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(StoreError::Sled(clone_sled_error(&e))),
            Err(_) => Err(StoreError::FlusherGone),
        }
    }
}

impl Drop for Flusher {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        if let Err(e) = files::sync_dir(&self.dir) {
            tracing::warn!(data_dir = %self.dir.display(), error = %e, "fsync of the data directory at close failed");
        }
    }
}

fn clone_sled_error(e: &sled::Error) -> sled::Error {
    match e {
        sled::Error::Io(io) => sled::Error::Io(io::Error::new(io.kind(), io.to_string())),
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::contract::{Backend, contract_tests, record};

    /// A fresh data directory; every open is a new handle on it.
    struct SledBackend(tempfile::TempDir);

    impl SledBackend {
        fn new() -> Self {
            Self(tempfile::tempdir().unwrap())
        }
    }

    #[async_trait]
    impl Backend for SledBackend {
        async fn open(&self, keys: Keyring) -> Arc<dyn Store> {
            Arc::new(SledStore::open(self.0.path(), keys).unwrap())
        }
    }

    contract_tests!(SledBackend::new());

    #[test]
    fn a_second_process_on_the_same_directory_is_refused_clearly() {
        // sled's lock is per process (fcntl), so a second open here would succeed; the refusal
        // across processes is tested in tests/it/process.rs with the real binary. Here: the message.
        let e = StoreError::Locked("/var/lib/x".into());
        assert!(
            e.to_string()
                .contains("in use by another credential-service process")
        );
    }

    #[tokio::test]
    async fn the_data_directory_and_its_files_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let store = SledStore::open(&data, Keyring::ephemeral()).unwrap();
        store
            .put_account(
                &AccountId::parse("acme").unwrap(),
                &record("at", None),
                Expected::Absent,
            )
            .await
            .unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&data), 0o700);
        let mut files = 0;
        for entry in std::fs::read_dir(&data).unwrap() {
            let path = entry.unwrap().path();
            if path.is_file() {
                files += 1;
                assert_eq!(mode(&path), 0o600, "{}", path.display());
            }
        }
        assert!(files >= 2, "sled's conf and db files were checked");
    }

    /// A write whose flush fails (a full disk) is undone: the stored version stays the one the
    /// caller holds, so the same write succeeds once the disk is back, without a restart.
    #[tokio::test]
    async fn a_write_that_cannot_be_flushed_is_undone_and_its_retry_succeeds() {
        use secrecy::ExposeSecret;
        use std::sync::atomic::Ordering;
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), Keyring::ephemeral()).unwrap();
        let acme = AccountId::parse("acme").unwrap();
        let v1 = store
            .put_account(&acme, &record("at-1", Some("rt-1")), Expected::Absent)
            .await
            .unwrap();

        store.fail_flushes.store(true, Ordering::Relaxed);
        let rotated = record("at-2", Some("rt-2"));
        store
            .put_account(&acme, &rotated, Expected::Version(v1))
            .await
            .unwrap_err();
        store.delete_account(&acme, v1).await.unwrap_err();
        let kept = store.load_account(&acme).await.unwrap().unwrap();
        assert_eq!(kept.version, v1, "the unflushed writes were undone");
        assert_eq!(kept.record.tokens.access_token.expose_secret(), "at-1");

        store.fail_flushes.store(false, Ordering::Relaxed);
        let v2 = store
            .put_account(&acme, &rotated, Expected::Version(v1))
            .await
            .expect("the retry of the same write succeeds");
        let stored = store.load_account(&acme).await.unwrap().unwrap();
        assert_eq!(stored.version, v2);
        assert_eq!(stored.record.tokens.access_token.expose_secret(), "at-2");
    }

    #[tokio::test]
    async fn records_moved_to_another_account_do_not_open() {
        let dir = tempfile::tempdir().unwrap();
        let keys = Keyring::ephemeral();
        {
            let store = SledStore::open(dir.path(), keys.clone()).unwrap();
            for (name, token) in [("acme", "at-acme"), ("globex", "at-globex")] {
                let id = AccountId::parse(name).unwrap();
                store
                    .put_account(&id, &record(token, Some("rt")), Expected::Absent)
                    .await
                    .unwrap();
            }
            let acme = store.accounts.get("acme").unwrap().unwrap();
            let globex = store.accounts.get("globex").unwrap().unwrap();
            store.accounts.insert("acme", globex).unwrap();
            store.accounts.insert("globex", acme).unwrap();
            store.flush().await.unwrap();
        }
        let store = SledStore::open(dir.path(), keys).unwrap();
        let e = store.load_accounts().await.unwrap_err().to_string();
        assert!(e.contains("does not open"), "{e}");
    }
}
