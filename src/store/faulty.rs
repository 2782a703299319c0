//! A store wrapper for tests: writes fail while told to, and changes can be announced as if another
//! process had made them. It replaces a test hook inside the real backends, so production code
//! carries no switch that makes its writes fail.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::SystemTime,
};

use async_trait::async_trait;
use futures::{StreamExt, stream::BoxStream};
use tokio::sync::broadcast;
use tokio_stream::wrappers::BroadcastStream;

use super::{
    Backoff, Change, Claim, ClaimMode, Expected, RawAccount, RefreshClaim, Resealed, Store,
    StoreError, Version, Versioned,
};
use crate::{
    account::AccountId,
    tokens::{AccountRecord, PendingAuth},
};

/// The switches of a [`Faulty`] store, kept by the test; cheap to clone.
#[derive(Clone, Debug)]
pub struct Faults {
    fail_writes: Arc<AtomicBool>,
    /// Writes still to fail before they succeed again.
    fail_next: Arc<AtomicUsize>,
    /// Writes fail as against a database that cannot be reached.
    unreachable: Arc<AtomicBool>,
    fail_claims: Arc<AtomicBool>,
    /// Refresh claims granted and not yet committed, failed or dropped; and the most at once.
    open_claims: Arc<AtomicUsize>,
    peak_claims: Arc<AtomicUsize>,
    changes: broadcast::Sender<Change>,
}

impl Default for Faults {
    fn default() -> Self {
        Self {
            fail_writes: Arc::default(),
            fail_next: Arc::default(),
            unreachable: Arc::default(),
            fail_claims: Arc::default(),
            open_claims: Arc::default(),
            peak_claims: Arc::default(),
            changes: broadcast::channel(1024).0,
        }
    }
}

impl Faults {
    /// Makes every following write (pending, account, claim commit) fail until called with `false`.
    pub fn fail_writes(&self, fail: bool) {
        self.fail_writes.store(fail, Ordering::SeqCst);
    }

    /// Makes the next `n` writes fail, as a store that recovers by itself (a lock timeout, a
    /// database failing over) would.
    pub fn fail_next_writes(&self, n: usize) {
        self.fail_next.store(n, Ordering::SeqCst);
    }

    /// Makes every following write fail as a database that went out of reach would
    /// ([`StoreError::Unavailable`]), until called with `false`. Claims still pass: the database
    /// went away between a refresh's claim and its commit.
    pub fn unreachable_writes(&self, on: bool) {
        self.unreachable.store(on, Ordering::SeqCst);
    }

    /// Makes every following refresh claim fail (as a database that cannot take the row lock
    /// would) until called with `false`.
    pub fn fail_claims(&self, fail: bool) {
        self.fail_claims.store(fail, Ordering::SeqCst);
    }

    /// The most refresh claims held at once so far: on a shared store each holds a row lock and a
    /// pooled connection.
    pub fn peak_claims(&self) -> usize {
        self.peak_claims.load(Ordering::SeqCst)
    }

    /// Announces a change on [`Store::changes`], as another replica's commit would.
    pub fn announce(&self, change: Change) {
        let _ = self.changes.send(change);
    }

    fn check(&self) -> Result<(), StoreError> {
        let one_of_the_next = self
            .fail_next
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if self.unreachable.load(Ordering::SeqCst) {
            Err(StoreError::Unavailable(
                "out of reach (test fault injection)".into(),
            ))
        } else if one_of_the_next || self.fail_writes.load(Ordering::SeqCst) {
            Err(StoreError::InjectedFailure)
        } else {
            Ok(())
        }
    }
}

/// Wraps a real store with [`Faults`].
#[derive(Debug)]
pub struct Faulty {
    inner: Arc<dyn Store>,
    faults: Faults,
}

impl Faulty {
    pub fn new(inner: Arc<dyn Store>, faults: Faults) -> Self {
        Self { inner, faults }
    }
}

#[async_trait]
impl Store for Faulty {
    async fn put_pending(&self, state: &str, pending: &PendingAuth) -> Result<(), StoreError> {
        self.faults.check()?;
        self.inner.put_pending(state, pending).await
    }

    async fn take_pending(&self, state: &str) -> Result<Option<PendingAuth>, StoreError> {
        self.inner.take_pending(state).await
    }

    async fn purge_expired_pending(&self, now: SystemTime) -> Result<usize, StoreError> {
        self.inner.purge_expired_pending(now).await
    }

    async fn scan_accounts(
        &self,
    ) -> Result<Vec<(AccountId, Result<Versioned, StoreError>)>, StoreError> {
        self.inner.scan_accounts().await
    }

    async fn load_account(&self, account: &AccountId) -> Result<Option<Versioned>, StoreError> {
        self.inner.load_account(account).await
    }

    async fn put_account(
        &self,
        account: &AccountId,
        record: &AccountRecord,
        expected: Expected,
    ) -> Result<Version, StoreError> {
        self.faults.check()?;
        self.inner.put_account(account, record, expected).await
    }

    async fn delete_account(
        &self,
        account: &AccountId,
        expected: Version,
    ) -> Result<(), StoreError> {
        self.faults.check()?;
        self.inner.delete_account(account, expected).await
    }

    async fn end_outage_backoffs(&self) -> Result<u64, StoreError> {
        self.inner.end_outage_backoffs().await
    }

    async fn claim_refresh(
        &self,
        account: &AccountId,
        seen: Version,
        mode: ClaimMode,
    ) -> Result<Claim, StoreError> {
        if self.faults.fail_claims.load(Ordering::SeqCst) {
            return Err(StoreError::InjectedFailure);
        }
        Ok(match self.inner.claim_refresh(account, seen, mode).await? {
            Claim::Granted(claim) => Claim::Granted(Box::new(FaultyClaim {
                inner: claim,
                faults: self.faults.clone(),
                _open: OpenClaim::new(&self.faults),
            })),
            other => other,
        })
    }

    fn changes(&self) -> BoxStream<'static, Change> {
        let announced = BroadcastStream::new(self.faults.changes.subscribe())
            .map(|c| c.unwrap_or(Change::Resync)); // lagged: changes were missed
        futures::stream::select(self.inner.changes(), announced).boxed()
    }

    fn keyring(&self) -> &crate::sealing::LiveKeyring {
        self.inner.keyring()
    }

    async fn reseal_all(&self) -> Result<Resealed, StoreError> {
        self.faults.check()?;
        self.inner.reseal_all().await
    }

    async fn export_accounts(&self) -> Result<Vec<RawAccount>, StoreError> {
        self.inner.export_accounts().await
    }

    async fn restore_accounts(
        &self,
        records: &[RawAccount],
        replace: bool,
    ) -> Result<usize, StoreError> {
        self.faults.check()?;
        self.inner.restore_accounts(records, replace).await
    }

    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
}

struct FaultyClaim {
    inner: Box<dyn RefreshClaim>,
    faults: Faults,
    _open: OpenClaim,
}

/// Counts its claim as open (and the peak) until the claim is done with.
struct OpenClaim(Arc<AtomicUsize>);

impl OpenClaim {
    fn new(faults: &Faults) -> Self {
        let open = faults.open_claims.fetch_add(1, Ordering::SeqCst) + 1;
        faults.peak_claims.fetch_max(open, Ordering::SeqCst);
        Self(faults.open_claims.clone())
    }
}

impl Drop for OpenClaim {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[async_trait]
impl RefreshClaim for FaultyClaim {
    fn version(&self) -> Version {
        self.inner.version()
    }

    async fn commit(self: Box<Self>, record: &AccountRecord) -> Result<Version, StoreError> {
        self.faults.check()?;
        self.inner.commit(record).await
    }

    async fn fail(self: Box<Self>, backoff: Backoff) -> Result<(), StoreError> {
        self.faults.check()?;
        self.inner.fail(backoff).await
    }
}
