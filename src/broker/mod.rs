//! The heart of the service: pending authorizations, the in-memory account cache, single-flight
//! refresh and the background refresh scheduler.
//!
//! GetToken is answered from memory: a concurrent map from account to a [`slot`] whose current
//! record sits behind an `ArcSwap`, so the hot path takes no lock, copies no secret and never
//! touches the store. A background scheduler refreshes each account well before its token enters
//! the refresh margin (20% of the lifetime left, plus jitter), so callers almost never wait for
//! EdgeTag. When a caller does find a token inside the margin, the first one starts one refresh as
//! a spawned task and every other caller awaits the same shared result; a caller that goes away
//! does not cancel it.
//!
//! A refresh claims the account in the store, persists the new token set durably before
//! publishing it, then clears the in-flight marker, so the next caller always sees the stored
//! state. If the write fails, the new set is held back in memory but never handed out (the old
//! refresh token may already be dead at the provider), and the write is retried until it lands.
//! Transient upstream failures are retried with back-off inside a small budget; after that the
//! account backs off (honouring `Retry-After`) while callers keep getting the current token as long
//! as it is valid.
//!
//! One file per job:
//! - [`connect`](self::connect): BeginAuth and CompleteAuth;
//! - [`get`](self::get): GetToken, and the one answer for each cause when no refresh can help;
//! - [`refresh`](self::refresh): the single flight and the refresh state machine;
//! - [`outcome`](self::outcome): what a refresh produces, and why it failed ([`RefreshFailure`]);
//! - [`admin`](self::admin): list, describe, refresh now, remove, gauges, the records for a backup;
//! - [`import`](self::import): grants obtained elsewhere, checked with EdgeTag, then stored;
//! - [`slot`]: one account in memory, its locks and their order;
//! - [`policy`]: due times, margins, freshness, back-off and jitter, as pure functions;
//! - [`freshness`](self::freshness): that policy with the broker's settings and clock in force;
//! - [`scheduler`](self::scheduler): background refreshes, most urgent first;
//! - [`follow`](self::follow): reloading what other processes changed in a shared store;
//! - [`unopened`](self::unopened): records sealed with a key this process does not hold yet;
//! - [`reseal`](self::reseal): taking up new key files, and re-sealing every record with the current key;
//! - [`events`](self::events): WatchAccounts, each account's transitions for operators;
//! - [`team`](self::team): the EdgeTag team each grant reaches, learned at connection and daily.

mod admin;
mod connect;
mod events;
mod follow;
mod freshness;
mod get;
mod import;
mod outcome;
mod places;
pub mod policy;
mod refresh;
mod reseal;
mod scheduler;
mod slot;
mod team;
mod unopened;
mod watch;

use std::{
    sync::{Arc, atomic::AtomicBool},
    time::{Duration, SystemTime},
};

use dashmap::DashMap;
use tokio::sync::{Notify, Semaphore, broadcast};
use url::Url;

use self::slot::Slot;
use crate::{
    account::{AccountId, AccountName},
    clock::Clock,
    error::Error,
    oauth::ProviderClient,
    store::Store,
    store::StoreError,
};

pub use self::{
    admin::Removal,
    events::{AccountEvent, AccountEventKind, Failing},
    get::Served,
    import::{Grant, Imported},
    outcome::RefreshFailure,
    team::TEAM_RECHECK,
};

/// Timing and limits of the broker.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// How long a BeginAuth state stays usable.
    pub state_ttl: Duration,
    /// GetToken refreshes first when the token expires within this margin (capped at half the
    /// token's lifetime, see [`policy::margin`]).
    pub refresh_margin: Duration,
    /// Refreshes asking the token endpoint at once, over all accounts (per process); code
    /// exchanges and revocations have as many places of their own (see [`places`]).
    pub upstream_concurrency: usize,
    /// When an unanswered refresh request stops holding its place.
    pub upstream_stall_after: Duration,
    /// Most refresh requests out at once, stalled ones included.
    pub upstream_max_in_flight: usize,
    /// How long a refresh that callers wait for may wait for a place.
    pub upstream_queue_timeout: Duration,
    /// When and how persistently to refresh.
    pub refresh: RefreshPolicy,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            state_ttl: Duration::from_secs(600),
            refresh_margin: Duration::from_secs(300),
            upstream_concurrency: 8,
            upstream_stall_after: Duration::from_millis(500),
            upstream_max_in_flight: 32,
            upstream_queue_timeout: Duration::from_secs(2),
            refresh: RefreshPolicy::default(),
        }
    }
}

/// Refresh-ahead timing, retries and back-off.
#[derive(Debug, Clone)]
pub struct RefreshPolicy {
    /// The scheduler refreshes when this fraction of a token's lifetime is left (never later than
    /// the refresh margin). Blotout advises refreshing at about 80% of the lifetime.
    pub ahead_fraction: f64,
    /// Up to this fraction of the lifetime is added at random to the lead, so accounts authorised
    /// together do not refresh together.
    pub jitter_fraction: f64,
    /// How often the scheduler looks for due accounts.
    pub scan_interval: Duration,
    /// Tries per refresh for transient failures (connect errors, timeouts, 5xx, 408, 429).
    pub attempts: u32,
    /// First pause between tries; doubles each time, with jitter.
    pub retry_base: Duration,
    /// Tries stop when the next pause would end beyond this budget.
    pub retry_budget: Duration,
    /// After a failed refresh the account waits at least this long before the next one; doubles
    /// with each further failure up to `backoff_max`, with jitter. `Retry-After` lengthens it.
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Callers start at most one refresh per account in this interval: a token just issued is not
    /// refreshed again on demand, and while an account backs off with an expired token, waiting
    /// callers let one probe through this often.
    pub demand_interval: Duration,
}

impl Default for RefreshPolicy {
    fn default() -> Self {
        Self {
            ahead_fraction: 0.2,
            jitter_fraction: 0.05,
            scan_interval: Duration::from_secs(1),
            attempts: 3,
            retry_base: Duration::from_millis(250),
            retry_budget: Duration::from_secs(5),
            backoff_base: Duration::from_secs(5),
            backoff_max: Duration::from_secs(300),
            demand_interval: Duration::from_secs(1),
        }
    }
}

/// What BeginAuth hands back.
#[derive(Debug)]
pub struct Authorization {
    pub authorize_url: Url,
    pub state: String,
    pub expires_at: SystemTime,
}

/// How a refresh ended, for tests to await (the `testing` feature; a release build has no
/// broadcast).
#[cfg(any(test, feature = "testing"))]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefreshEvent {
    pub account: AccountId,
    pub kind: RefreshEventKind,
}

/// What observers see of a refresh's end; derived from [`RefreshFailure`] for failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefreshEventKind {
    /// A new token set is stored and served.
    Refreshed,
    /// The refresh failed for a reason that may pass (the account backs off).
    Failed,
    /// The provider rejected the refresh token; the account needs a new authorization.
    NeedsReauth,
    /// The new token set could not be written; it is held back and the write retried.
    NotPersisted,
}

/// Cheap to clone; every clone is the same broker.
#[derive(Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn Store>,
    provider: ProviderClient,
    clock: Clock,
    config: BrokerConfig,
    /// foldhash rather than SipHash: lookups are the hot path, and only operators add keys, so
    /// there is no hash-flooding surface.
    accounts: DashMap<AccountId, Arc<Slot>, foldhash::fast::RandomState>,
    /// Places for refresh requests to the token endpoint, over all accounts.
    places: places::Places,
    /// Caps code exchanges and revocations: an operator waits for those, so they never queue
    /// behind refreshes.
    operator_upstream: Semaphore,
    /// Caps background refreshes, so a wave of due accounts never queues ahead of callers.
    background: Arc<Semaphore>,
    /// Wakes the scheduler before its next tick (after EdgeTag recovered, say).
    wake_scheduler: Notify,
    /// Failed team lookups are warned about at most once a minute over all accounts.
    team_warnings: team::Warnings,
    #[cfg(any(test, feature = "testing"))]
    events: broadcast::Sender<RefreshEvent>,
    /// Names of accounts that changed, for WatchAccounts (see [`events`]); bounded: a watcher
    /// that lags looks at every account again.
    account_changes: broadcast::Sender<AccountId>,
    /// Every refresh task, so shutdown can wait for their writes.
    refreshes: tokio_util::task::TaskTracker,
    /// Whether the margin cap (half the lifetime) has been logged; once is enough.
    margin_cap_logged: AtomicBool,
    /// Set when an account starts backing off after an outage (here, or learned from the store);
    /// the next successful refresh ends those back-offs (EdgeTag is back).
    transient_backoffs: AtomicBool,
    /// Accounts whose stored record needs a key this process does not hold yet.
    unopened: std::sync::Mutex<unopened::Unopened>,
    /// One re-seal at a time.
    resealing: tokio::sync::Mutex<()>,
}

impl Broker {
    /// Loads every stored account into memory.
    pub async fn new(
        store: Arc<dyn Store>,
        provider: ProviderClient,
        clock: Clock,
        config: BrokerConfig,
    ) -> Result<Self, StoreError> {
        let cap = config.upstream_concurrency.max(1);
        let limits = places::Limits {
            places: cap,
            max_in_flight: config.upstream_max_in_flight,
            stall_after: config.upstream_stall_after,
        };
        let inner = Arc::new(Inner {
            store,
            provider,
            clock,
            config,
            accounts: DashMap::default(),
            places: places::Places::new(limits),
            operator_upstream: Semaphore::new(cap),
            background: Arc::new(Semaphore::new(cap)),
            wake_scheduler: Notify::new(),
            team_warnings: team::Warnings::default(),
            #[cfg(any(test, feature = "testing"))]
            events: broadcast::channel(16 * 1024).0,
            account_changes: broadcast::channel(events::BACKLOG).0,
            refreshes: tokio_util::task::TaskTracker::new(),
            margin_cap_logged: AtomicBool::new(false),
            transient_backoffs: AtomicBool::new(false),
            unopened: Default::default(),
            resealing: Default::default(),
        });
        for (id, stored) in inner.store.load_accounts().await? {
            let slot = inner.new_slot(&id, stored.record, stored.version);
            inner.accounts.insert(id, slot);
        }
        Ok(Self { inner })
    }

    /// Runs the broker's background work until the task is dropped or aborted: the refresh
    /// scheduler, and following changes other processes make in a shared store.
    pub async fn run(self) {
        tokio::join!(self.clone().run_scheduler(), self.follow_changes());
    }

    /// How many accounts are held.
    pub fn account_count(&self) -> usize {
        self.inner.accounts.len()
    }

    /// Refresh outcomes as they happen (tests; the `testing` feature).
    #[cfg(any(test, feature = "testing"))]
    pub fn subscribe(&self) -> broadcast::Receiver<RefreshEvent> {
        self.inner.events.subscribe()
    }

    /// The clock the broker decides expiry by (tests share it with the fake provider).
    pub fn clock(&self) -> &Clock {
        &self.inner.clock
    }

    /// Waits until every refresh in flight has ended (stored or failed); new ones may still start.
    pub async fn finish_refreshes(&self) {
        let tracker = &self.inner.refreshes;
        tracker.close();
        tracker.wait().await;
        tracker.reopen();
    }

    fn slot(&self, account: &AccountId) -> Result<Arc<Slot>, Error> {
        self.slot_named(account.name())
    }

    fn slot_named(&self, account: AccountName<'_>) -> Result<Arc<Slot>, Error> {
        self.inner
            .accounts
            .get(account.as_str())
            .map(|s| Arc::clone(s.value()))
            .ok_or_else(|| Error::UnknownAccount(account.to_id()))
    }
}

impl Inner {
    /// Tells the tests' observers how a refresh ended; nothing in a release build.
    #[cfg(any(test, feature = "testing"))]
    fn emit(&self, account: &AccountId, kind: RefreshEventKind) {
        let _ = self.events.send(RefreshEvent {
            account: account.clone(),
            kind,
        });
    }

    #[cfg(not(any(test, feature = "testing")))]
    fn emit(&self, _: &AccountId, _: RefreshEventKind) {}
}
