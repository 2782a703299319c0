//! The heart of the service: pending authorizations, the in-memory account cache, single-flight
//! refresh and the background refresh scheduler.
//!
//! GetToken is answered from memory: a concurrent map from account to a slot whose current record
//! sits behind an [`ArcSwap`], so the hot path takes no lock and copies no secret. A background
//! scheduler refreshes each account well before its token enters the refresh margin (20% of the
//! lifetime left, plus jitter), so callers almost never wait for EdgeTag. When a caller does find a
//! token inside the margin, the first one starts one refresh as a spawned task and every other
//! caller awaits the same shared result; a caller that goes away does not cancel it.
//!
//! A refresh persists the new token set (flushed) before publishing it, then clears the in-flight
//! marker, so the next caller always sees the stored state. If the write fails, the new set is kept
//! in memory but never handed out (the old refresh token may already be dead at the provider), and
//! the write is retried until it lands. Transient upstream failures are retried with backoff inside a
//! small budget; after that the account backs off (honouring `Retry-After`) while callers keep getting
//! the current token as long as it is valid.

mod scheduler;

use std::{
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use arc_swap::ArcSwap;
use dashmap::DashMap;
use futures::{
    FutureExt,
    future::{BoxFuture, Shared},
};
use rand::Rng;
use secrecy::SecretString;
use tokio::sync::{Semaphore, broadcast};
use url::Url;

use crate::{
    account::AccountId,
    clock::{Clock, to_unix_ms},
    error::Error,
    oauth::{Pkce, ProviderClient, TokenResponse, UpstreamError, random_token},
    store::{Store, StoreError},
    tokens::{AccountRecord, AccountStatus, LastRefresh, PendingAuth, RefreshOutcome, TokenSet},
};

/// Longest code and state accepted; real ones are far shorter, these only bound the work.
pub const MAX_CODE_LEN: usize = 2048;
pub const MAX_STATE_LEN: usize = 256;

/// Timing and limits of the broker.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// How long a BeginAuth state stays usable.
    pub state_ttl: Duration,
    /// GetToken refreshes first when the token expires within this margin.
    pub refresh_margin: Duration,
    /// Most token-endpoint requests in flight at once, over all accounts.
    pub upstream_concurrency: usize,
    /// When and how persistently to refresh.
    pub refresh: RefreshPolicy,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            state_ttl: Duration::from_secs(600),
            refresh_margin: Duration::from_secs(300),
            upstream_concurrency: 8,
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

/// Something that happened to an account's tokens, for observers (tests, metrics).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefreshEvent {
    pub account: AccountId,
    pub kind: RefreshEventKind,
}

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

/// How RemoveAccount ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    /// Revoked at the provider (or unknown there), then deleted here.
    Revoked,
    /// Deleted here although the provider could not be told (forced).
    RemovedWithoutRevocation,
    /// There was no such account.
    NotFound,
}

/// Cheap to clone; every clone is the same broker.
#[derive(Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    provider: ProviderClient,
    clock: Clock,
    config: BrokerConfig,
    /// foldhash rather than SipHash: lookups are the hot path, and only operators add keys, so
    /// there is no hash-flooding surface.
    accounts: DashMap<AccountId, Arc<Slot>, foldhash::fast::RandomState>,
    /// Caps token-endpoint requests over all accounts.
    upstream: Semaphore,
    /// Caps background refreshes, so a wave of due accounts never queues ahead of callers.
    background: Arc<Semaphore>,
    events: broadcast::Sender<RefreshEvent>,
    /// Every refresh task, so shutdown can wait for their writes.
    refreshes: tokio_util::task::TaskTracker,
}

/// One account in memory.
struct Slot {
    /// What is stored now. Replaced only after the store has flushed the replacement.
    record: ArcSwap<AccountRecord>,
    /// When the scheduler should refresh (Unix ms); `i64::MAX` when it never should.
    due_ms: AtomicI64,
    /// Failures and back-off; touched only off the hot path.
    health: Mutex<Health>,
    /// The refresh in flight, if any.
    inflight: Mutex<Option<Inflight>>,
    /// Serialises persist-and-publish of this account (a refresh against a CompleteAuth).
    write: tokio::sync::Mutex<()>,
    /// Set, under `write`, when the account is removed: a stale handle must not write it back.
    removed: AtomicBool,
}

#[derive(Default)]
struct Health {
    failures: u32,
    retry_at: Option<SystemTime>,
    last_error: Option<UpstreamError>,
    /// A refreshed token set that the store has not accepted yet (fail closed: never served).
    unpersisted: Option<Arc<AccountRecord>>,
}

/// The shared result of one refresh: the record it produced, or why it failed.
type RefreshResult = Result<Arc<AccountRecord>, RefreshFailure>;
type SharedRefresh = Shared<BoxFuture<'static, RefreshResult>>;

struct Inflight {
    id: u64,
    result: SharedRefresh,
}

/// Why a refresh failed, cloneable so every waiter gets the same answer.
#[derive(Debug, Clone)]
enum RefreshFailure {
    Upstream(UpstreamError),
    NeedsReauth,
    ClientRejected,
    /// The store refused a write (logged where it happened).
    Store,
    Removed,
    Panicked,
}

impl RefreshFailure {
    fn into_error(self, account: &AccountId) -> Error {
        match self {
            Self::Upstream(cause) => Error::ProviderUnavailable(cause),
            Self::NeedsReauth => Error::NeedsReauth(account.clone()),
            Self::ClientRejected => Error::ClientCredentialsRejected,
            Self::Store => Error::Internal("a refreshed token set could not be stored yet"),
            Self::Removed => Error::UnknownAccount(account.clone()),
            Self::Panicked => Error::Internal("refresh task failed"),
        }
    }
}

static NEXT_REFRESH_ID: AtomicU64 = AtomicU64::new(1);

impl Broker {
    /// Loads every stored account into memory.
    pub fn new(
        store: Store,
        provider: ProviderClient,
        clock: Clock,
        config: BrokerConfig,
    ) -> Result<Self, StoreError> {
        let cap = config.upstream_concurrency.max(1);
        let inner = Arc::new(Inner {
            store,
            provider,
            clock,
            config,
            accounts: DashMap::default(),
            upstream: Semaphore::new(cap),
            background: Arc::new(Semaphore::new(cap)),
            events: broadcast::channel(16 * 1024).0,
            refreshes: tokio_util::task::TaskTracker::new(),
        });
        for (id, record) in inner.store.load_accounts()? {
            let slot = inner.new_slot(record);
            inner.accounts.insert(id, slot);
        }
        Ok(Self { inner })
    }

    /// How many accounts are held.
    pub fn account_count(&self) -> usize {
        self.inner.accounts.len()
    }

    /// Refresh outcomes as they happen.
    pub fn subscribe(&self) -> broadcast::Receiver<RefreshEvent> {
        self.inner.events.subscribe()
    }

    /// Starts connecting `account`: remembers a fresh PKCE verifier under a fresh state (durably)
    /// and returns the provider's authorize URL.
    pub async fn begin(&self, account: AccountId) -> Result<Authorization, Error> {
        let pkce = Pkce::generate();
        let state = random_token();
        let expires_at = self.inner.clock.now() + self.inner.config.state_ttl;
        let pending = PendingAuth {
            account,
            verifier: pkce.verifier,
            expires_at,
        };
        self.inner.store.put_pending(&state, &pending).await?;
        let authorize_url = self.inner.provider.authorize_url(&state, &pkce.challenge);
        Ok(Authorization {
            authorize_url,
            state,
            expires_at,
        })
    }

    /// Finishes connecting an account: claims the state (at most one caller wins), exchanges the
    /// code, stores the token set durably and only then returns.
    pub async fn complete(
        &self,
        code: &str,
        state: &str,
    ) -> Result<(AccountId, Arc<TokenSet>), Error> {
        let code = parse_code(code)?;
        let state = parse_state(state)?;
        let inner = &self.inner;
        let pending = inner
            .store
            .take_pending(state)?
            .ok_or(Error::UnknownState)?;
        let requested_at = inner.clock.now();
        if pending.expires_at <= requested_at {
            return Err(Error::UnknownState);
        }
        tracing::Span::current().record("account", tracing::field::display(&pending.account));

        let exchanged = {
            let _permit = inner
                .upstream
                .acquire()
                .await
                .map_err(|_| Error::Internal("upstream limiter closed"))?;
            inner.provider.exchange_code(&code, &pending.verifier).await
        };
        let response = match exchanged {
            Ok(response) => response,
            Err(e) => {
                // Keep the state for a retry: after a transient error the code was not consumed;
                // after a rejected code it may have been anyone's guess, and the person who
                // approves must still be able to finish. Only one exchange can hold the state.
                inner.store.put_pending(state, &pending).await?;
                return Err(match e {
                    UpstreamError::InvalidClient { status } => {
                        log_client_rejected(status);
                        Error::ClientCredentialsRejected
                    }
                    e if e.is_transient() => Error::ProviderUnavailable(e),
                    e => Error::CodeRejected(e),
                });
            }
        };
        if response.refresh_token.is_none() {
            tracing::warn!(account = %pending.account, "EdgeTag issued no refresh token; the account cannot be refreshed");
        }
        let tokens = TokenSet::from_response(
            response,
            requested_at,
            inner.provider.config().default_token_lifetime,
            None,
        );
        let record = Arc::new(AccountRecord::connected(tokens));
        // Nothing is served before it is stored: a known account is replaced under its write lock;
        // a new one is stored first and only then becomes visible.
        loop {
            let existing = inner
                .accounts
                .get(&pending.account)
                .map(|s| s.value().clone());
            if let Some(slot) = existing {
                let _write = slot.write.lock().await;
                if slot.removed.load(Ordering::Acquire) {
                    continue; // removed while we waited: store it as a new account
                }
                inner.store.put_account(&pending.account, &record).await?;
                // A new grant supersedes any failure, back-off or held-back refresh of the old one.
                *slot.health() = Health::default();
                inner.publish(&slot, record.clone());
                break;
            }
            inner.store.put_account(&pending.account, &record).await?;
            match inner.accounts.entry(pending.account.clone()) {
                dashmap::Entry::Vacant(vacant) => {
                    vacant.insert(inner.new_slot((*record).clone()));
                    break;
                }
                // Another CompleteAuth created it meanwhile: replace its record under its lock.
                dashmap::Entry::Occupied(_) => continue,
            }
        }
        tracing::info!(account = %pending.account, "account connected");
        Ok((pending.account, record.tokens.clone()))
    }

    /// A token for `account` valid for at least `min_validity` (and, unless the provider is down,
    /// beyond the refresh margin). Answered from memory unless a refresh is due.
    pub async fn get_token(
        &self,
        account: &AccountId,
        min_validity: Duration,
    ) -> Result<Arc<TokenSet>, Error> {
        let slot = self.slot(account)?;
        let record = slot.record.load();
        if record.status == AccountStatus::Active
            && self.inner.fresh_enough(&record.tokens, min_validity)
        {
            return Ok(Arc::clone(&record.tokens));
        }
        // What was judged too old is what the refresh must replace; a record published since
        // then is taken as the answer instead of refreshing again.
        let seen = arc_swap::Guard::into_inner(record);
        self.get_token_slow(account, &slot, min_validity, seen)
            .await
    }

    async fn get_token_slow(
        &self,
        account: &AccountId,
        slot: &Arc<Slot>,
        min_validity: Duration,
        mut seen: Arc<AccountRecord>,
    ) -> Result<Arc<TokenSet>, Error> {
        let inner = &self.inner;
        if seen.status == AccountStatus::NeedsReauth {
            return Err(Error::NeedsReauth(account.clone()));
        }
        if min_validity > Duration::ZERO && min_validity >= seen.tokens.lifetime() {
            return Err(Error::InvalidArgument(
                "min_validity is longer than EdgeTag's tokens live; ask for less",
            ));
        }
        // Two rounds at most: a refresh started for someone with a shorter need may not satisfy ours.
        for _ in 0..2 {
            if let Some(cause) = slot.backing_off(inner.clock.now()) {
                // Do not hammer a failing provider: the scheduler retries when the back-off ends.
                return self.current_or(account, slot, min_validity, cause);
            }
            match inner.join_refresh(account, slot, seen.tokens.clone()).await {
                Ok(record) if inner.fresh_enough(&record.tokens, min_validity) => {
                    return Ok(record.tokens.clone());
                }
                Ok(record) => seen = record,
                Err(RefreshFailure::Upstream(cause)) => {
                    return self.current_or(account, slot, min_validity, cause);
                }
                Err(RefreshFailure::Store) => {
                    // Fail closed: the new tokens are held back, the old ones may still do.
                    let cause =
                        UpstreamError::Unreachable("the refreshed token could not be stored yet");
                    return self
                        .current_or(account, slot, min_validity, cause)
                        .map_err(|_| {
                            Error::Internal("a refreshed token set could not be stored yet")
                        });
                }
                Err(failure) => return Err(failure.into_error(account)),
            }
        }
        Err(Error::ValidityNotReached(account.clone()))
    }

    /// While a refresh cannot happen, the current token is still the answer if it covers the need.
    fn current_or(
        &self,
        account: &AccountId,
        slot: &Slot,
        min_validity: Duration,
        cause: UpstreamError,
    ) -> Result<Arc<TokenSet>, Error> {
        let current = slot.record.load();
        if current.status == AccountStatus::NeedsReauth {
            return Err(Error::NeedsReauth(account.clone()));
        }
        let remaining = current.tokens.remaining(self.inner.clock.now());
        if remaining > min_validity && remaining > Duration::ZERO {
            tracing::debug!(account = %account, error = %cause, "refresh unavailable; serving the current token");
            return Ok(current.tokens.clone());
        }
        Err(Error::TokenExpired {
            account: account.clone(),
            cause,
        })
    }

    /// Waits until every refresh in flight has ended (stored or failed); new ones may still start.
    pub async fn finish_refreshes(&self) {
        let tracker = &self.inner.refreshes;
        tracker.close();
        tracker.wait().await;
        tracker.reopen();
    }

    /// Every account with its current record, sorted by name (for operators; no disk reads).
    pub fn list(&self) -> Vec<(AccountId, Arc<AccountRecord>)> {
        let mut all: Vec<_> = self
            .inner
            .accounts
            .iter()
            .map(|e| (e.key().clone(), e.value().record.load_full()))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// One account's current record.
    pub fn describe(&self, account: &AccountId) -> Result<Arc<AccountRecord>, Error> {
        self.slot(account).map(|s| s.record.load_full())
    }

    /// Whether a refresh of `account` is running now.
    pub fn is_refreshing(&self, account: &AccountId) -> bool {
        self.slot(account).is_ok_and(|s| s.inflight().is_some())
    }

    /// Accounts whose refreshed tokens could not be stored yet: unhealthy until the write lands,
    /// because their old refresh token may already be dead at the provider.
    pub fn unpersisted_accounts(&self) -> Vec<AccountId> {
        let mut v: Vec<_> = self
            .inner
            .accounts
            .iter()
            .filter(|e| e.value().health().unpersisted.is_some())
            .map(|e| e.key().clone())
            .collect();
        v.sort();
        v
    }

    /// Refreshes now, however fresh the token is (an operator's "refresh"). Joins a refresh
    /// already in flight instead of starting a second one.
    pub async fn refresh_now(&self, account: &AccountId) -> Result<Arc<TokenSet>, Error> {
        let slot = self.slot(account)?;
        let current = slot.record.load_full();
        if current.status == AccountStatus::NeedsReauth {
            return Err(Error::NeedsReauth(account.clone()));
        }
        match self
            .inner
            .join_refresh(account, &slot, current.tokens.clone())
            .await
        {
            Ok(record) => Ok(record.tokens.clone()),
            Err(failure) => Err(failure.into_error(account)),
        }
    }

    /// Revokes the account's grant at the provider, then forgets the account (durably).
    /// Idempotent: an unknown account is already removed. A grant the provider refuses to revoke
    /// as invalid counts as revoked; with `force`, the local deletion happens even when the
    /// provider cannot be reached.
    pub async fn remove(&self, account: &AccountId, force: bool) -> Result<Removal, Error> {
        let Ok(slot) = self.slot(account) else {
            return Ok(Removal::NotFound);
        };
        let _write = slot.write.lock().await;
        if slot.removed.load(Ordering::Acquire) {
            return Ok(Removal::NotFound);
        }
        let current = slot.record.load_full();
        let revoked = {
            let _permit = self
                .inner
                .upstream
                .acquire()
                .await
                .map_err(|_| Error::Internal("upstream limiter closed"))?;
            self.inner
                .provider
                .revoke(&current.tokens.access_token)
                .await
        };
        let removal = match revoked {
            Ok(()) | Err(UpstreamError::InvalidGrant | UpstreamError::Rejected { .. }) => {
                Removal::Revoked
            }
            Err(UpstreamError::InvalidClient { status }) if !force => {
                log_client_rejected(status);
                return Err(Error::ClientCredentialsRejected);
            }
            Err(e) if !force => return Err(Error::ProviderUnavailable(e)),
            Err(e) => {
                tracing::warn!(account = %account, error = %e, "revocation failed; removing locally as forced");
                Removal::RemovedWithoutRevocation
            }
        };
        self.inner.store.delete_account(account).await?;
        slot.removed.store(true, Ordering::Release);
        self.inner
            .accounts
            .remove_if(account, |_, s| Arc::ptr_eq(s, &slot));
        tracing::info!(account = %account, outcome = ?removal, "account removed");
        Ok(removal)
    }

    fn slot(&self, account: &AccountId) -> Result<Arc<Slot>, Error> {
        self.inner
            .accounts
            .get(account)
            .map(|s| Arc::clone(s.value()))
            .ok_or_else(|| Error::UnknownAccount(account.clone()))
    }
}

impl Inner {
    fn new_slot(&self, record: AccountRecord) -> Arc<Slot> {
        let due = self.due_ms(&record);
        Arc::new(Slot {
            record: ArcSwap::from_pointee(record),
            due_ms: AtomicI64::new(due),
            health: Mutex::new(Health::default()),
            inflight: Mutex::new(None),
            write: tokio::sync::Mutex::new(()),
            removed: AtomicBool::new(false),
        })
    }

    /// Makes `record` the one served (after it is stored) and schedules its background refresh.
    fn publish(&self, slot: &Slot, record: Arc<AccountRecord>) {
        slot.due_ms.store(self.due_ms(&record), Ordering::Release);
        slot.record.store(record);
    }

    /// When the scheduler should refresh this record: when `ahead_fraction` of the lifetime is left
    /// (at least the refresh margin) plus random jitter; never for an account that cannot refresh.
    fn due_ms(&self, record: &AccountRecord) -> i64 {
        if record.status != AccountStatus::Active || record.tokens.refresh_token.is_none() {
            return i64::MAX;
        }
        let policy = &self.config.refresh;
        let lifetime = record.tokens.lifetime();
        let lead = lifetime
            .mul_f64(policy.ahead_fraction)
            .max(self.margin(&record.tokens));
        let jitter = lifetime.mul_f64(policy.jitter_fraction * rand::rng().random::<f64>());
        let due = record
            .tokens
            .expires_at
            .checked_sub(lead + jitter)
            .unwrap_or(record.tokens.issued_at);
        to_unix_ms(due)
    }

    /// The refresh margin, capped at half the token's lifetime, so a provider issuing very
    /// short-lived tokens does not cause a refresh on every call.
    fn margin(&self, tokens: &TokenSet) -> Duration {
        self.config.refresh_margin.min(tokens.lifetime() / 2)
    }

    /// Whether `tokens` can be handed out without refreshing first.
    fn fresh_enough(&self, tokens: &TokenSet, min_validity: Duration) -> bool {
        tokens.remaining(self.clock.now()) > min_validity.max(self.margin(tokens))
    }

    /// Joins the refresh in flight for `account`, or starts one. `seen` is the token set the caller
    /// judged too old: if the stored one differs by the time the refresh runs, that one is the answer.
    /// Joins or starts the account's refresh and waits for it, counted as a single-flight waiter
    /// (the metric shows how many callers a slow provider is holding up).
    async fn join_refresh(
        self: &Arc<Self>,
        account: &AccountId,
        slot: &Arc<Slot>,
        seen: Arc<TokenSet>,
    ) -> RefreshResult {
        let _waiting = crate::metrics::single_flight_waiter();
        self.start_refresh(account, slot, seen).await
    }

    fn start_refresh(
        self: &Arc<Self>,
        account: &AccountId,
        slot: &Arc<Slot>,
        seen: Arc<TokenSet>,
    ) -> SharedRefresh {
        let mut inflight = slot.inflight();
        if let Some(running) = &*inflight {
            return running.result.clone();
        }
        let id = NEXT_REFRESH_ID.fetch_add(1, Ordering::Relaxed);
        let task = self.refreshes.spawn(refresh_task(
            self.clone(),
            account.clone(),
            slot.clone(),
            seen,
            id,
        ));
        let result = async move { task.await.unwrap_or(Err(RefreshFailure::Panicked)) }
            .boxed()
            .shared();
        *inflight = Some(Inflight {
            id,
            result: result.clone(),
        });
        result
    }

    /// One refresh request with retries for transient failures, inside the policy's budget.
    /// Returns when the successful request was sent, for a conservative expiry.
    async fn refresh_with_retries(
        &self,
        refresh_token: &SecretString,
    ) -> Result<(SystemTime, TokenResponse), UpstreamError> {
        let policy = &self.config.refresh;
        let started = Instant::now();
        let mut pause = policy.retry_base;
        let mut attempt = 1;
        loop {
            let requested_at = self.clock.now();
            let result = {
                let Ok(_permit) = self.upstream.acquire().await else {
                    return Err(UpstreamError::Unreachable("shutting down"));
                };
                self.provider.refresh(refresh_token).await
            };
            let e = match result {
                Ok(response) => return Ok((requested_at, response)),
                Err(e) => e,
            };
            let wait = e.retry_after().unwrap_or_else(|| jittered(pause));
            if !e.is_transient()
                || attempt >= policy.attempts
                || started.elapsed() + wait > policy.retry_budget
            {
                return Err(e);
            }
            tracing::debug!(error = %e, attempt, "transient refresh failure; retrying");
            tokio::time::sleep(wait).await;
            pause *= 2;
            attempt += 1;
        }
    }

    /// Notes a failed refresh: back-off grows with each failure and honours `Retry-After`.
    fn note_failure(
        &self,
        slot: &Slot,
        current: &AccountRecord,
        error: UpstreamError,
        at: SystemTime,
    ) {
        let policy = &self.config.refresh;
        {
            let mut health = slot.health();
            health.failures = health.failures.saturating_add(1);
            let exponent = health.failures.saturating_sub(1).min(16);
            let backoff = policy
                .backoff_base
                .saturating_mul(1 << exponent)
                .min(policy.backoff_max);
            let wait = jittered(backoff).max(error.retry_after().unwrap_or_default());
            health.retry_at = Some(at + wait);
            health.last_error = Some(error);
        }
        slot.record.store(Arc::new(AccountRecord {
            last_refresh: Some(LastRefresh {
                at,
                outcome: RefreshOutcome::Failed,
            }),
            ..current.clone()
        }));
    }

    fn emit(&self, account: &AccountId, kind: RefreshEventKind) {
        let _ = self.events.send(RefreshEvent {
            account: account.clone(),
            kind,
        });
    }
}

impl Slot {
    fn health(&self) -> MutexGuard<'_, Health> {
        self.health.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn inflight(&self) -> MutexGuard<'_, Option<Inflight>> {
        self.inflight.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The last failure, while the account is backing off after it.
    fn backing_off(&self, now: SystemTime) -> Option<UpstreamError> {
        let health = self.health();
        match health.retry_at {
            Some(at) if now < at => Some(
                health
                    .last_error
                    .clone()
                    .unwrap_or(UpstreamError::Unreachable("backing off")),
            ),
            _ => None,
        }
    }
}

/// Between half and all of `d` ("equal jitter"): spreads retries without ever retrying at once.
fn jittered(d: Duration) -> Duration {
    d.mul_f64(0.5 + rand::rng().random::<f64>() * 0.5)
}

/// Clears the slot's in-flight marker when the refresh task ends, however it ends (panics included),
/// but only its own: a newer refresh's marker stays.
struct InflightGuard {
    slot: Arc<Slot>,
    id: u64,
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        let mut inflight = self.slot.inflight();
        if inflight.as_ref().is_some_and(|i| i.id == self.id) {
            *inflight = None;
        }
    }
}

#[tracing::instrument(name = "refresh", skip_all, fields(account = %account))]
async fn refresh_task(
    inner: Arc<Inner>,
    account: AccountId,
    slot: Arc<Slot>,
    seen: Arc<TokenSet>,
    id: u64,
) -> RefreshResult {
    let _guard = InflightGuard {
        slot: slot.clone(),
        id,
    };
    let _write = slot.write.lock().await;
    if slot.removed.load(Ordering::Acquire) {
        return Err(RefreshFailure::Removed);
    }

    // Fail closed: a refreshed set the store has not accepted yet goes first; its refresh token is
    // the live one.
    let held_back = slot.health().unpersisted.clone();
    if let Some(record) = held_back {
        inner
            .store
            .put_account(&account, &record)
            .await
            .map_err(store_failure)?;
        *slot.health() = Health::default();
        inner.publish(&slot, record.clone());
        tracing::info!("held-back token set stored; serving it");
        inner.emit(&account, RefreshEventKind::Refreshed);
        return Ok(record);
    }

    let current = slot.record.load_full();
    if !Arc::ptr_eq(&current.tokens, &seen) {
        // Replaced meanwhile (CompleteAuth or an earlier refresh): that is the answer.
        return match current.status {
            AccountStatus::Active => Ok(current),
            AccountStatus::NeedsReauth => Err(RefreshFailure::NeedsReauth),
        };
    }
    if current.status == AccountStatus::NeedsReauth {
        return Err(RefreshFailure::NeedsReauth);
    }
    let Some(refresh_token) = current.tokens.refresh_token.clone() else {
        return Err(RefreshFailure::NeedsReauth);
    };

    let attempted_at = inner.clock.now();
    let outcome =
        inner
            .refresh_with_retries(&refresh_token)
            .await
            .map(|(requested_at, response)| {
                let rotated = response.refresh_token.is_some();
                let tokens = TokenSet::from_response(
                    response,
                    requested_at,
                    inner.provider.config().default_token_lifetime,
                    Some(&refresh_token),
                );
                (requested_at, tokens, rotated)
            });
    match outcome {
        Ok((_, tokens, rotated)) if tokens.expires_at <= current.tokens.expires_at => {
            // Not a usable renewal. A rotated refresh token is kept all the same: the old one may
            // already be dead at the provider.
            let e = UpstreamError::Malformed("the new token expires no later than the old one");
            tracing::warn!(error = %e, rotated, "refresh answer not used");
            let mut kept = current.clone();
            if rotated {
                kept = Arc::new(AccountRecord {
                    tokens: Arc::new(TokenSet {
                        refresh_token: tokens.refresh_token,
                        ..(*current.tokens).clone()
                    }),
                    ..(*current).clone()
                });
                if let Err(e) = inner.store.put_account(&account, &kept).await {
                    tracing::error!(error = %e, "rotated refresh token not stored; holding it back and retrying the write");
                    slot.health().unpersisted = Some(kept);
                    slot.due_ms.store(0, Ordering::Release);
                    inner.emit(&account, RefreshEventKind::NotPersisted);
                    return Err(RefreshFailure::Store);
                }
                inner.publish(&slot, kept.clone());
            }
            inner.note_failure(&slot, &kept, e.clone(), attempted_at);
            inner.emit(&account, RefreshEventKind::Failed);
            Err(RefreshFailure::Upstream(e))
        }
        Ok((requested_at, tokens, _)) => {
            let record = Arc::new(AccountRecord {
                tokens: Arc::new(tokens),
                status: AccountStatus::Active,
                last_refresh: Some(LastRefresh {
                    at: requested_at,
                    outcome: RefreshOutcome::Succeeded,
                }),
            });
            if let Err(e) = inner.store.put_account(&account, &record).await {
                tracing::error!(error = %e, "refreshed token set not stored; holding it back and retrying the write");
                slot.health().unpersisted = Some(record);
                slot.due_ms.store(0, Ordering::Release); // the scheduler retries the write at once
                inner.emit(&account, RefreshEventKind::NotPersisted);
                return Err(RefreshFailure::Store);
            }
            *slot.health() = Health::default();
            inner.publish(&slot, record.clone());
            tracing::info!("access token refreshed");
            inner.emit(&account, RefreshEventKind::Refreshed);
            Ok(record)
        }
        Err(UpstreamError::InvalidGrant) => {
            let record = Arc::new(AccountRecord {
                tokens: current.tokens.clone(),
                status: AccountStatus::NeedsReauth,
                last_refresh: Some(LastRefresh {
                    at: attempted_at,
                    outcome: RefreshOutcome::Failed,
                }),
            });
            inner
                .store
                .put_account(&account, &record)
                .await
                .map_err(store_failure)?;
            inner.publish(&slot, record);
            tracing::warn!(
                "EdgeTag rejected the refresh token; the account needs re-authorization (BeginAuth)"
            );
            inner.emit(&account, RefreshEventKind::NeedsReauth);
            Err(RefreshFailure::NeedsReauth)
        }
        Err(e @ UpstreamError::InvalidClient { status }) => {
            log_client_rejected(status);
            inner.note_failure(&slot, &current, e, attempted_at);
            inner.emit(&account, RefreshEventKind::Failed);
            Err(RefreshFailure::ClientRejected)
        }
        Err(e) => {
            tracing::warn!(error = %e, "refresh failed");
            inner.note_failure(&slot, &current, e.clone(), attempted_at);
            inner.emit(&account, RefreshEventKind::Failed);
            Err(RefreshFailure::Upstream(e))
        }
    }
}

fn store_failure(e: StoreError) -> RefreshFailure {
    tracing::error!(error = %e, "storing a token set failed");
    RefreshFailure::Store
}

fn log_client_rejected(status: u16) {
    tracing::error!(
        http_status = status,
        "EdgeTag rejected this service's client credentials: check --client-id and the client secret \
         (EDGETAG_CLIENT_ID, EDGETAG_CLIENT_SECRET_FILE / EDGETAG_CLIENT_SECRET)"
    );
}

fn parse_code(code: &str) -> Result<SecretString, Error> {
    if code.is_empty() {
        return Err(Error::InvalidArgument(
            "code is required: the `code` parameter of EdgeTag's redirect",
        ));
    }
    if code.len() > MAX_CODE_LEN || !code.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Error::InvalidArgument(
            "code is malformed: expected at most 2048 printable ASCII characters",
        ));
    }
    Ok(SecretString::from(code))
}

fn parse_state(state: &str) -> Result<&str, Error> {
    if state.is_empty() {
        return Err(Error::InvalidArgument(
            "state is required: the `state` returned by BeginAuth",
        ));
    }
    if state.len() > MAX_STATE_LEN {
        return Err(Error::InvalidArgument(
            "state is malformed: expected at most 256 characters",
        ));
    }
    Ok(state)
}
