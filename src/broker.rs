//! The heart of the service: pending authorizations, the in-memory account cache and single-flight
//! refresh.
//!
//! GetToken is answered from memory: a concurrent map from account to a slot whose current record
//! sits behind an [`ArcSwap`], so the hot path takes no lock and copies no secret. When a token is
//! close to expiry the first caller starts one refresh as a spawned task and every other caller
//! awaits the same shared result; a caller that goes away does not cancel it. The task persists the
//! new token set (flushed) before publishing it, then clears the in-flight marker, so the next caller
//! always sees the stored state.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwap;
use dashmap::DashMap;
use futures::{
    FutureExt,
    future::{BoxFuture, Shared},
};
use secrecy::SecretString;
use tokio::sync::Semaphore;
use url::Url;

use crate::{
    account::AccountId,
    clock::Clock,
    error::Error,
    oauth::{Pkce, ProviderClient, UpstreamError, random_token},
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
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            state_ttl: Duration::from_secs(600),
            refresh_margin: Duration::from_secs(300),
            upstream_concurrency: 8,
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
    accounts: DashMap<AccountId, Arc<Slot>>,
    upstream: Semaphore,
}

/// One account in memory.
struct Slot {
    /// What is stored now. Replaced only after the store has flushed the replacement.
    record: ArcSwap<AccountRecord>,
    /// The refresh in flight, if any.
    inflight: Mutex<Option<Inflight>>,
    /// Serialises persist-and-publish of this account (a refresh against a CompleteAuth).
    write: tokio::sync::Mutex<()>,
    /// Set, under `write`, when the account is removed: a stale handle must not write it back.
    removed: AtomicBool,
}

/// The shared result of one refresh: the record it produced, or why it failed.
type RefreshResult = Result<Arc<AccountRecord>, RefreshFailure>;

struct Inflight {
    id: u64,
    result: Shared<BoxFuture<'static, RefreshResult>>,
}

/// Why a refresh failed, cloneable so every waiter gets the same answer.
#[derive(Debug, Clone)]
enum RefreshFailure {
    Upstream(UpstreamError),
    NeedsReauth,
    ClientRejected,
    Store(Arc<StoreError>),
    Removed,
    Panicked,
}

impl RefreshFailure {
    fn into_error(self, account: &AccountId) -> Error {
        match self {
            Self::Upstream(cause) => Error::ProviderUnavailable(cause),
            Self::NeedsReauth => Error::NeedsReauth(account.clone()),
            Self::ClientRejected => Error::ClientCredentialsRejected,
            Self::Store(e) => {
                tracing::error!(account = %account, error = %e, "could not persist a refreshed token set");
                Error::Internal("could not persist a refreshed token set")
            }
            Self::Removed => Error::UnknownAccount(account.clone()),
            Self::Panicked => Error::Internal("refresh task failed"),
        }
    }
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

static NEXT_REFRESH_ID: AtomicU64 = AtomicU64::new(1);

impl Broker {
    /// Loads every stored account into memory.
    pub fn new(
        store: Store,
        provider: ProviderClient,
        clock: Clock,
        config: BrokerConfig,
    ) -> Result<Self, StoreError> {
        let accounts = DashMap::new();
        for (id, record) in store.load_accounts()? {
            accounts.insert(id, Arc::new(Slot::new(record)));
        }
        let upstream = Semaphore::new(config.upstream_concurrency.max(1));
        Ok(Self {
            inner: Arc::new(Inner {
                store,
                provider,
                clock,
                config,
                accounts,
                upstream,
            }),
        })
    }

    /// How many accounts are held.
    pub fn account_count(&self) -> usize {
        self.inner.accounts.len()
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
                let retryable =
                    e.is_transient() || matches!(e, UpstreamError::InvalidClient { .. });
                if retryable {
                    // The code was not consumed as far as we know: keep the state for a retry.
                    inner.store.put_pending(state, &pending).await?;
                }
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
        loop {
            let slot = inner
                .accounts
                .entry(pending.account.clone())
                .or_insert_with(|| Arc::new(Slot::new((*record).clone())))
                .clone();
            let _write = slot.write.lock().await;
            if slot.removed.load(Ordering::Acquire) {
                continue; // removed while we waited: a fresh slot takes the record
            }
            inner.store.put_account(&pending.account, &record).await?;
            slot.record.store(record.clone());
            break;
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
        if record.status == AccountStatus::Active && self.fresh_enough(&record.tokens, min_validity)
        {
            return Ok(Arc::clone(&record.tokens));
        }
        drop(record);
        self.get_token_slow(account, &slot, min_validity).await
    }

    async fn get_token_slow(
        &self,
        account: &AccountId,
        slot: &Arc<Slot>,
        min_validity: Duration,
    ) -> Result<Arc<TokenSet>, Error> {
        let record = slot.record.load_full();
        if record.status == AccountStatus::NeedsReauth {
            return Err(Error::NeedsReauth(account.clone()));
        }
        if min_validity > Duration::ZERO && min_validity >= record.tokens.lifetime() {
            return Err(Error::InvalidArgument(
                "min_validity is longer than EdgeTag's tokens live; ask for less",
            ));
        }
        // Two rounds at most: a refresh started for someone with a shorter need may not satisfy ours.
        let mut seen = record.tokens.clone();
        for _ in 0..2 {
            match self.refresh_shared(account, slot, seen.clone()).await {
                Ok(record) => {
                    if self.fresh_enough(&record.tokens, min_validity) {
                        return Ok(record.tokens.clone());
                    }
                    seen = record.tokens.clone();
                }
                Err(RefreshFailure::Upstream(cause)) => {
                    // Provider trouble: the current token is still good if it covers the caller's need.
                    let current = slot.record.load();
                    let remaining = current.tokens.remaining(self.inner.clock.now());
                    if current.status == AccountStatus::Active
                        && remaining > min_validity
                        && remaining > Duration::ZERO
                    {
                        tracing::warn!(account = %account, error = %cause, "refresh failed; serving the current token");
                        return Ok(current.tokens.clone());
                    }
                    return Err(Error::TokenExpired {
                        account: account.clone(),
                        cause,
                    });
                }
                Err(failure) => return Err(failure.into_error(account)),
            }
        }
        Err(Error::ValidityNotReached(account.clone()))
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
        self.slot(account).is_ok_and(|s| {
            s.inflight
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_some()
        })
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
            .refresh_shared(account, &slot, current.tokens.clone())
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

    /// Whether `tokens` can be handed out without refreshing first: valid beyond both the caller's
    /// need and the refresh margin. The margin is capped at half the token's lifetime, so a provider
    /// issuing very short-lived tokens does not cause a refresh on every call.
    fn fresh_enough(&self, tokens: &TokenSet, min_validity: Duration) -> bool {
        let margin = self.inner.config.refresh_margin.min(tokens.lifetime() / 2);
        tokens.remaining(self.inner.clock.now()) > min_validity.max(margin)
    }

    /// Joins the refresh in flight for `account`, or starts one. `seen` is the token set the caller
    /// judged too old: if the stored one differs by the time the refresh runs, that one is the answer.
    async fn refresh_shared(
        &self,
        account: &AccountId,
        slot: &Arc<Slot>,
        seen: Arc<TokenSet>,
    ) -> RefreshResult {
        let result = {
            let mut inflight = slot.inflight.lock().unwrap_or_else(|p| p.into_inner());
            match &*inflight {
                Some(running) => running.result.clone(),
                None => {
                    let id = NEXT_REFRESH_ID.fetch_add(1, Ordering::Relaxed);
                    let task = tokio::spawn(refresh_task(
                        self.inner.clone(),
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
            }
        };
        let _waiting = crate::metrics::single_flight_waiter();
        result.await
    }
}

impl Slot {
    fn new(record: AccountRecord) -> Self {
        Self {
            record: ArcSwap::from_pointee(record),
            inflight: Mutex::new(None),
            write: tokio::sync::Mutex::new(()),
            removed: AtomicBool::new(false),
        }
    }
}

/// Clears the slot's in-flight marker when the refresh task ends, however it ends (panics included),
/// but only its own: a newer refresh's marker stays.
struct InflightGuard {
    slot: Arc<Slot>,
    id: u64,
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        let mut inflight = self.slot.inflight.lock().unwrap_or_else(|p| p.into_inner());
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

    let requested_at = inner.clock.now();
    let response = {
        let Ok(_permit) = inner.upstream.acquire().await else {
            return Err(RefreshFailure::Panicked);
        };
        inner.provider.refresh(&refresh_token).await
    };
    match response {
        Ok(response) => {
            let tokens = TokenSet::from_response(
                response,
                requested_at,
                inner.provider.config().default_token_lifetime,
                Some(&refresh_token),
            );
            if tokens.expires_at <= current.tokens.expires_at {
                let e = UpstreamError::Malformed("the new token expires no later than the old one");
                record_failure(&slot, &current, requested_at);
                return Err(RefreshFailure::Upstream(e));
            }
            let record = Arc::new(AccountRecord {
                tokens: Arc::new(tokens),
                status: AccountStatus::Active,
                last_refresh: Some(LastRefresh {
                    at: requested_at,
                    outcome: RefreshOutcome::Succeeded,
                }),
            });
            inner
                .store
                .put_account(&account, &record)
                .await
                .map_err(|e| RefreshFailure::Store(Arc::new(e)))?;
            slot.record.store(record.clone());
            tracing::info!("access token refreshed");
            Ok(record)
        }
        Err(UpstreamError::InvalidGrant) => {
            let record = Arc::new(AccountRecord {
                tokens: current.tokens.clone(),
                status: AccountStatus::NeedsReauth,
                last_refresh: Some(LastRefresh {
                    at: requested_at,
                    outcome: RefreshOutcome::Failed,
                }),
            });
            inner
                .store
                .put_account(&account, &record)
                .await
                .map_err(|e| RefreshFailure::Store(Arc::new(e)))?;
            slot.record.store(record);
            tracing::warn!(
                "EdgeTag rejected the refresh token; the account needs re-authorization (BeginAuth)"
            );
            Err(RefreshFailure::NeedsReauth)
        }
        Err(UpstreamError::InvalidClient { status }) => {
            log_client_rejected(status);
            record_failure(&slot, &current, requested_at);
            Err(RefreshFailure::ClientRejected)
        }
        Err(e) => {
            tracing::warn!(error = %e, "refresh failed");
            record_failure(&slot, &current, requested_at);
            Err(RefreshFailure::Upstream(e))
        }
    }
}

/// Notes a failed attempt in memory (for operators); the stored tokens stay as they are.
fn record_failure(slot: &Slot, current: &AccountRecord, at: SystemTime) {
    slot.record.store(Arc::new(AccountRecord {
        last_refresh: Some(LastRefresh {
            at,
            outcome: RefreshOutcome::Failed,
        }),
        ..current.clone()
    }));
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
