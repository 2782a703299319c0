//! Durable state in an embedded sled database: pending authorizations and account token sets.
//!
//! Two trees: `pending` (SHA-256 of the state → account, PKCE verifier, expiry) and `accounts`
//! (account → token set and status). Records are versioned protobuf messages, sealed with the
//! [`Keyring`] (see [`crate::sealing`]) for their tree and key, so neither tokens nor verifiers
//! reach the disk in the clear and records cannot be swapped between keys. Every write that a
//! reply depends on is flushed before the call returns; flushes are batched by one flusher thread
//! (group commit), which also sidesteps sled 0.34's `flush_async` hang under concurrency
//! (spacejam/sled#1308). The surface is narrow on purpose, so another store can sit beside it.

use std::{
    fmt, io,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    time::SystemTime,
};

use prost::Message;
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;

use crate::{
    account::AccountId,
    clock::{from_unix_ms, to_unix_ms},
    sealing::{Keyring, UnsealError},
    tokens::{AccountRecord, AccountStatus, LastRefresh, PendingAuth, RefreshOutcome, TokenSet},
};

const RECORD_VERSION: u32 = 1;
/// sled's page cache; the default (1 GiB) is far more than a few hundred thousand small records need.
const CACHE_BYTES: u64 = 64 * 1024 * 1024;

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
    Sled(#[from] sled::Error),
    #[error("a stored {tree} record cannot be decoded: {reason}")]
    Corrupt { tree: &'static str, reason: String },
    #[error("the flusher thread has stopped")]
    FlusherGone,
    #[error("writes are failing on purpose (test hook)")]
    InjectedFailure,
}

/// A cheap-to-clone handle on the database.
#[derive(Clone)]
pub struct Store {
    pending: sled::Tree,
    accounts: sled::Tree,
    keys: Keyring,
    flusher: Arc<Flusher>,
    fail_writes: Arc<AtomicBool>,
}

const PENDING: &str = "pending";
const ACCOUNTS: &str = "accounts";

/// What [`Store::reseal_all`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Resealed {
    /// Records that were sealed with a previous key and now are with the current one.
    pub resealed: usize,
    /// Records already sealed with the current key.
    pub current: usize,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (or creates, mode 0700) the database in `dir`, sealing and opening records with
    /// `keys`. Fails fast when another process holds it.
    pub fn open(dir: &Path, keys: Keyring) -> Result<Self, StoreError> {
        create_private_dir(dir).map_err(|source| StoreError::CreateDir {
            path: dir.to_owned(),
            source,
        })?;
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(CACHE_BYTES)
            .open()
            .map_err(|e| match e {
                sled::Error::Io(ref io) if io.to_string().contains("could not acquire lock") => {
                    StoreError::Locked(dir.to_owned())
                }
                other => StoreError::Sled(other),
            })?;
        let pending = db.open_tree(PENDING)?;
        let accounts = db.open_tree(ACCOUNTS)?;
        let flusher = Arc::new(Flusher::start(db.clone()));
        Ok(Self {
            pending,
            accounts,
            keys,
            flusher,
            fail_writes: Arc::default(),
        })
    }

    /// Makes every following write fail until called with `false`: lets tests prove that the
    /// service fails closed when its disk does. Not for production use.
    #[doc(hidden)]
    pub fn fail_writes(&self, fail: bool) {
        self.fail_writes.store(fail, Ordering::SeqCst);
    }

    fn writable(&self) -> Result<(), StoreError> {
        if self.fail_writes.load(Ordering::SeqCst) {
            Err(StoreError::InjectedFailure)
        } else {
            Ok(())
        }
    }

    /// Records a pending authorization and waits until it is on disk.
    pub async fn put_pending(&self, state: &str, pending: &PendingAuth) -> Result<(), StoreError> {
        self.writable()?;
        let record = PendingRecord {
            version: RECORD_VERSION,
            account: pending.account.to_string(),
            verifier: pending.verifier.expose_secret().to_owned(),
            expires_at_ms: to_unix_ms(pending.expires_at),
        };
        let key = state_key(state);
        let sealed = self.keys.seal(PENDING, &key, &record.encode_to_vec());
        self.pending.insert(key, sealed)?;
        self.flush().await
    }

    /// Removes and returns the pending authorization for `state`, atomically: of any number of
    /// concurrent callers, at most one gets it. The removal is not flushed: if it is lost in a
    /// crash, the provider still refuses the already used code.
    pub fn take_pending(&self, state: &str) -> Result<Option<PendingAuth>, StoreError> {
        let key = state_key(state);
        let Some(bytes) = self.pending.remove(key)? else {
            return Ok(None);
        };
        decode_pending(&self.unseal(PENDING, &key, &bytes)?).map(Some)
    }

    /// Deletes pending authorizations that expired before `now`; returns how many.
    pub fn purge_expired_pending(&self, now: SystemTime) -> Result<usize, StoreError> {
        let now_ms = to_unix_ms(now);
        let mut purged = 0;
        for item in self.pending.iter() {
            let (key, bytes) = item?;
            let expired = match self
                .keys
                .unseal(PENDING, &key, &bytes)
                .map(|u| PendingRecord::decode(&*u.plaintext))
            {
                Ok(Ok(r)) => r.expires_at_ms < now_ms,
                _ => true, // unreadable: it can never complete either
            };
            // Compare-and-swap so a record replaced meanwhile is not removed by mistake.
            if expired
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

    /// Stores an account's record and waits until it is on disk.
    pub async fn put_account(
        &self,
        account: &AccountId,
        record: &AccountRecord,
    ) -> Result<(), StoreError> {
        self.writable()?;
        let sealed = self.keys.seal(
            ACCOUNTS,
            account.as_str().as_bytes(),
            &encode_account(record),
        );
        self.accounts.insert(account.as_str(), sealed)?;
        self.flush().await
    }

    /// Deletes an account's record and waits until the deletion is on disk.
    pub async fn delete_account(&self, account: &AccountId) -> Result<(), StoreError> {
        self.writable()?;
        self.accounts.remove(account.as_str())?;
        self.flush().await
    }

    /// Every stored account, for the in-memory cache at start-up.
    pub fn load_accounts(&self) -> Result<Vec<(AccountId, AccountRecord)>, StoreError> {
        self.accounts
            .iter()
            .map(|item| {
                let (key, bytes) = item?;
                let name = std::str::from_utf8(&key)
                    .ok()
                    .and_then(|s| AccountId::parse(s).ok())
                    .ok_or_else(|| StoreError::Corrupt {
                        tree: ACCOUNTS,
                        reason: "key is not an account name".into(),
                    })?;
                let plaintext = self
                    .keys
                    .unseal(ACCOUNTS, &key, &bytes)
                    .map_err(|e| StoreError::Corrupt {
                        tree: ACCOUNTS,
                        reason: format!("account {name}: {e}"),
                    })?
                    .plaintext;
                Ok((name, decode_account(&plaintext)?))
            })
            .collect()
    }

    /// Re-seals every record not sealed with the current key, then flushes. Run while the service
    /// is stopped (sled allows one process); a record that opens with no loaded key stops it.
    pub async fn reseal_all(&self) -> Result<Resealed, StoreError> {
        let mut done = Resealed::default();
        for (name, tree) in [(PENDING, &self.pending), (ACCOUNTS, &self.accounts)] {
            for item in tree.iter() {
                let (key, bytes) = item?;
                let unsealed =
                    self.keys
                        .unseal(name, &key, &bytes)
                        .map_err(|e| StoreError::Corrupt {
                            tree: name,
                            reason: match name {
                                ACCOUNTS => {
                                    format!("account {}: {e}", String::from_utf8_lossy(&key))
                                }
                                _ => e.to_string(),
                            },
                        })?;
                if unsealed.current {
                    done.current += 1;
                    continue;
                }
                let sealed = self.keys.seal(name, &key, &unsealed.plaintext);
                // Compare-and-swap: never overwrite a record written meanwhile.
                if tree
                    .compare_and_swap(&key, Some(bytes), Some(sealed))?
                    .is_ok()
                {
                    done.resealed += 1;
                }
            }
        }
        self.flush().await?;
        Ok(done)
    }

    fn unseal(&self, tree: &'static str, key: &[u8], bytes: &[u8]) -> Result<Vec<u8>, StoreError> {
        self.keys
            .unseal(tree, key, bytes)
            .map(|u| u.plaintext)
            .map_err(|e: UnsealError| StoreError::Corrupt {
                tree,
                reason: e.to_string(),
            })
    }

    /// Waits until everything written so far is durable.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.flusher.flush().await
    }
}

/// States are bearer secrets of a kind (CSRF tokens): only their hash is stored.
fn state_key(state: &str) -> [u8; 32] {
    Sha256::digest(state.as_bytes()).into()
}

#[cfg(unix)]
fn create_private_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    // An existing directory keeps its mode unless we tighten it.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

#[cfg(not(unix))]
fn create_private_dir(dir: &Path) -> io::Result<()> {
    std::fs::create_dir_all(dir)
}

/// Group commit: callers enqueue a waiter after their write; the thread flushes once for every
/// waiter it has collected, so a burst of N writes costs far fewer than N fsyncs. When the last
/// [`Store`] handle goes, the thread flushes a final time and the database closes before the drop
/// returns, so a restart in the same process finds the directory free.
struct Flusher {
    tx: Option<mpsc::Sender<FlushWaiter>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

type FlushWaiter = oneshot::Sender<Result<(), Arc<sled::Error>>>;

impl Flusher {
    fn start(db: sled::Db) -> Self {
        let (tx, rx) = mpsc::channel::<FlushWaiter>();
        let thread = std::thread::Builder::new()
            .name("sled-flusher".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let waiters: Vec<_> = std::iter::once(first).chain(rx.try_iter()).collect();
                    let result = db.flush().map(drop).map_err(Arc::new);
                    for w in waiters {
                        let _ = w.send(result.clone());
                    }
                }
                if let Err(e) = db.flush() {
                    tracing::error!(error = %e, "final flush failed");
                }
            })
            .expect("spawning the flusher thread");
        Self {
            tx: Some(tx),
            thread: Some(thread),
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
    }
}

fn clone_sled_error(e: &sled::Error) -> sled::Error {
    match e {
        sled::Error::Io(io) => sled::Error::Io(io::Error::new(io.kind(), io.to_string())),
        other => other.clone(),
    }
}

#[derive(Clone, PartialEq, Message)]
#[prost(skip_debug)]
struct PendingRecord {
    #[prost(uint32, tag = "1")]
    version: u32,
    #[prost(string, tag = "2")]
    account: String,
    #[prost(string, tag = "3")]
    verifier: String,
    #[prost(int64, tag = "4")]
    expires_at_ms: i64,
}

impl fmt::Debug for PendingRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PendingRecord")
            .field("account", &self.account)
            .finish_non_exhaustive()
    }
}

#[derive(Clone, PartialEq, Message)]
#[prost(skip_debug)]
struct AccountRecordPb {
    #[prost(uint32, tag = "1")]
    version: u32,
    #[prost(string, tag = "2")]
    access_token: String,
    /// Empty when the provider issued none.
    #[prost(string, tag = "3")]
    refresh_token: String,
    #[prost(string, tag = "4")]
    token_type: String,
    #[prost(int64, tag = "5")]
    issued_at_ms: i64,
    #[prost(int64, tag = "6")]
    expires_at_ms: i64,
    /// 0 active, 1 needs re-authorization.
    #[prost(uint32, tag = "7")]
    status: u32,
    /// 0 never, 1 succeeded, 2 failed.
    #[prost(uint32, tag = "8")]
    last_refresh_outcome: u32,
    #[prost(int64, tag = "9")]
    last_refresh_at_ms: i64,
}

impl fmt::Debug for AccountRecordPb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccountRecordPb")
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

fn decode_pending(bytes: &[u8]) -> Result<PendingAuth, StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt {
        tree: "pending",
        reason,
    };
    let r = PendingRecord::decode(bytes).map_err(|e| corrupt(e.to_string()))?;
    if r.version != RECORD_VERSION {
        return Err(corrupt(format!("unknown record version {}", r.version)));
    }
    Ok(PendingAuth {
        account: AccountId::parse(&r.account).map_err(|e| corrupt(e.to_string()))?,
        verifier: SecretString::from(r.verifier),
        expires_at: from_unix_ms(r.expires_at_ms),
    })
}

fn encode_account(record: &AccountRecord) -> Vec<u8> {
    let t = &record.tokens;
    let (last_refresh_outcome, last_refresh_at_ms) = match record.last_refresh {
        None => (0, 0),
        Some(LastRefresh {
            at,
            outcome: RefreshOutcome::Succeeded,
        }) => (1, to_unix_ms(at)),
        Some(LastRefresh {
            at,
            outcome: RefreshOutcome::Failed,
        }) => (2, to_unix_ms(at)),
    };
    AccountRecordPb {
        version: RECORD_VERSION,
        access_token: t.access_token.expose_secret().to_owned(),
        refresh_token: t
            .refresh_token
            .as_ref()
            .map(|r| r.expose_secret().to_owned())
            .unwrap_or_default(),
        token_type: t.token_type.clone(),
        issued_at_ms: to_unix_ms(t.issued_at),
        expires_at_ms: to_unix_ms(t.expires_at),
        status: match record.status {
            AccountStatus::Active => 0,
            AccountStatus::NeedsReauth => 1,
        },
        last_refresh_outcome,
        last_refresh_at_ms,
    }
    .encode_to_vec()
}

fn decode_account(bytes: &[u8]) -> Result<AccountRecord, StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt {
        tree: "accounts",
        reason,
    };
    let r = AccountRecordPb::decode(bytes).map_err(|e| corrupt(e.to_string()))?;
    if r.version != RECORD_VERSION {
        return Err(corrupt(format!("unknown record version {}", r.version)));
    }
    let status = match r.status {
        0 => AccountStatus::Active,
        1 => AccountStatus::NeedsReauth,
        other => return Err(corrupt(format!("unknown status {other}"))),
    };
    let last_refresh = match r.last_refresh_outcome {
        1 => Some(LastRefresh {
            at: from_unix_ms(r.last_refresh_at_ms),
            outcome: RefreshOutcome::Succeeded,
        }),
        2 => Some(LastRefresh {
            at: from_unix_ms(r.last_refresh_at_ms),
            outcome: RefreshOutcome::Failed,
        }),
        _ => None,
    };
    Ok(AccountRecord {
        tokens: Arc::new(TokenSet {
            access_token: SecretString::from(r.access_token),
            refresh_token: (!r.refresh_token.is_empty())
                .then(|| SecretString::from(r.refresh_token)),
            token_type: r.token_type,
            issued_at: from_unix_ms(r.issued_at_ms),
            expires_at: from_unix_ms(r.expires_at_ms),
        }),
        status,
        last_refresh,
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn record(access: &str, refresh: Option<&str>) -> AccountRecord {
        AccountRecord {
            tokens: Arc::new(TokenSet {
                access_token: access.into(),
                refresh_token: refresh.map(SecretString::from),
                token_type: "Bearer".into(),
                issued_at: from_unix_ms(1_000),
                expires_at: from_unix_ms(7_201_000),
            }),
            status: AccountStatus::NeedsReauth,
            last_refresh: Some(LastRefresh {
                at: from_unix_ms(5_000),
                outcome: RefreshOutcome::Failed,
            }),
        }
    }

    #[tokio::test]
    async fn accounts_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let keys = Keyring::ephemeral();
        let acme = AccountId::parse("acme").unwrap();
        {
            let store = Store::open(dir.path(), keys.clone()).unwrap();
            store
                .put_account(&acme, &record("at-1", Some("rt-1")))
                .await
                .unwrap();
            store
                .put_account(&AccountId::parse("bare").unwrap(), &record("at-2", None))
                .await
                .unwrap();
        }
        let store = Store::open(dir.path(), keys.clone()).unwrap();
        let loaded = store.load_accounts().unwrap();
        assert_eq!(loaded.len(), 2);
        let (id, rec) = &loaded[0];
        assert_eq!(id, &acme);
        assert_eq!(rec.tokens.access_token.expose_secret(), "at-1");
        assert_eq!(
            rec.tokens.refresh_token.as_ref().unwrap().expose_secret(),
            "rt-1"
        );
        assert_eq!(rec.tokens.expires_at, from_unix_ms(7_201_000));
        assert_eq!(rec.status, AccountStatus::NeedsReauth);
        assert_eq!(rec.last_refresh, record("", None).last_refresh);
        assert!(loaded[1].1.tokens.refresh_token.is_none());
    }

    #[tokio::test]
    async fn a_second_process_on_the_same_directory_is_refused_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let keys = Keyring::ephemeral();
        let _first = Store::open(dir.path(), keys.clone()).unwrap();
        // sled's lock is per process (fcntl), so a second open here succeeds; the refusal across
        // processes is tested in tests/server.rs with the real binary. Here: the mapping of the error.
        let e = StoreError::Locked(dir.path().to_owned());
        assert!(
            e.to_string()
                .contains("in use by another credential-service process")
        );
    }

    #[tokio::test]
    async fn pending_states_are_taken_once_and_purged_when_expired() {
        let dir = tempfile::tempdir().unwrap();
        let keys = Keyring::ephemeral();
        let store = Store::open(dir.path(), keys.clone()).unwrap();
        let now = SystemTime::now();
        let pending = |secs| PendingAuth {
            account: AccountId::parse("acme").unwrap(),
            verifier: "verifier".into(),
            expires_at: now + Duration::from_secs(secs),
        };
        store.put_pending("s-live", &pending(600)).await.unwrap();
        store.put_pending("s-old", &pending(1)).await.unwrap();
        assert_eq!(
            store
                .purge_expired_pending(now + Duration::from_secs(2))
                .unwrap(),
            1
        );
        assert!(store.take_pending("s-old").unwrap().is_none());
        let taken = store.take_pending("s-live").unwrap().unwrap();
        assert_eq!(taken.account.as_str(), "acme");
        assert_eq!(taken.verifier.expose_secret(), "verifier");
        assert!(store.take_pending("s-live").unwrap().is_none());
    }

    #[tokio::test]
    async fn the_data_directory_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let _store = Store::open(&data, Keyring::ephemeral()).unwrap();
        let mode = std::fs::metadata(&data).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
    }

    #[tokio::test]
    async fn many_concurrent_flushes_all_complete() {
        let dir = tempfile::tempdir().unwrap();
        let keys = Keyring::ephemeral();
        let store = Store::open(dir.path(), keys.clone()).unwrap();
        let tasks: Vec<_> = (0..300)
            .map(|i| {
                let store = store.clone();
                tokio::spawn(async move {
                    let id = AccountId::parse(&format!("a{i}")).unwrap();
                    store.put_account(&id, &record("at", Some("rt"))).await
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        assert_eq!(store.load_accounts().unwrap().len(), 300);
    }

    #[tokio::test]
    async fn records_moved_to_another_account_do_not_open() {
        let dir = tempfile::tempdir().unwrap();
        let keys = Keyring::ephemeral();
        {
            let store = Store::open(dir.path(), keys.clone()).unwrap();
            for (name, token) in [("acme", "at-acme"), ("globex", "at-globex")] {
                let id = AccountId::parse(name).unwrap();
                store
                    .put_account(&id, &record(token, Some("rt")))
                    .await
                    .unwrap();
            }
            let acme = store.accounts.get("acme").unwrap().unwrap();
            let globex = store.accounts.get("globex").unwrap().unwrap();
            store.accounts.insert("acme", globex).unwrap();
            store.accounts.insert("globex", acme).unwrap();
            store.flush().await.unwrap();
        }
        let store = Store::open(dir.path(), keys).unwrap();
        let e = store.load_accounts().unwrap_err().to_string();
        assert!(e.contains("does not open"), "{e}");
    }

    #[tokio::test]
    async fn reseal_moves_every_record_to_the_current_key() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (rand::random::<[u8; 32]>(), rand::random::<[u8; 32]>());
        let acme = AccountId::parse("acme").unwrap();
        let pending = PendingAuth {
            account: acme.clone(),
            verifier: "verifier".into(),
            expires_at: SystemTime::now() + std::time::Duration::from_secs(600),
        };
        {
            let store = Store::open(dir.path(), Keyring::from_keys(&a, &[])).unwrap();
            store
                .put_account(&acme, &record("at", Some("rt")))
                .await
                .unwrap();
            store.put_pending("s", &pending).await.unwrap();
        }
        {
            let store = Store::open(dir.path(), Keyring::from_keys(&b, &[a])).unwrap();
            let done = store.reseal_all().await.unwrap();
            assert_eq!(
                done,
                Resealed {
                    resealed: 2,
                    current: 0
                }
            );
            let again = store.reseal_all().await.unwrap();
            assert_eq!(
                again,
                Resealed {
                    resealed: 0,
                    current: 2
                }
            );
        }
        let store = Store::open(dir.path(), Keyring::from_keys(&b, &[])).unwrap();
        assert_eq!(store.load_accounts().unwrap().len(), 1);
        assert!(store.take_pending("s").unwrap().is_some());
    }
}
