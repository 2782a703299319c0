//! The single flight and the refresh state machine.
//!
//! One refresh per account at a time, whoever asks: the first asker spawns the task and stores a
//! shared handle in the slot; later askers await the same handle. The task takes the account's
//! write lock, claims the account in the store (another process may have refreshed it already),
//! asks EdgeTag with retries inside a budget, writes the outcome durably and only then publishes
//! it. A write that fails holds the new token set back (never served) and the scheduler retries
//! the write; the held-back path is [`persist_or_hold_back`], used by every write of a refresh.
//!
//! What a refresh produces, [`RefreshResult`] and [`RefreshFailure`], is in `outcome`.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Instant, SystemTime},
};

use futures::FutureExt;
use secrecy::SecretString;
use tokio::sync::Notify;
use tracing::Instrument;

use super::{
    Inner, RefreshEventKind,
    outcome::{RefreshFailure, RefreshResult, SharedRefresh},
    places::{NoPlace, Place, Priority},
    policy,
    slot::{Health, HeldBack, Inflight, Slot},
};
use crate::{
    account::AccountId,
    clock::to_unix_ms,
    oauth::{TokenResponse, UpstreamError},
    store::{Backoff, Claim, ClaimMode, RefreshClaim, StoreError, Version},
    tokens::{AccountRecord, AccountStatus, LastRefresh, RefreshOutcome, TokenSet},
    traces::{self, LinkTarget},
};

/// Who wants a refresh: callers are limited to one started refresh per account per
/// [`super::RefreshPolicy::demand_interval`]; the scheduler and operators are not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Trigger {
    Caller,
    Background,
    Operator,
}

impl Trigger {
    /// Where its request queues for a place (see [`super::places`]).
    fn priority(self) -> Priority {
        match self {
            Self::Caller | Self::Operator => Priority::Waited,
            Self::Background => Priority::Ahead,
        }
    }
}

static NEXT_REFRESH_ID: AtomicU64 = AtomicU64::new(1);

impl Inner {
    /// Joins the refresh in flight for `account`, or starts one. `seen` is the token set the asker
    /// judged too old: if the stored one differs by the time the refresh runs, that one is the
    /// answer. `None` when a caller may not start one now (see [`Trigger::Caller`]).
    pub(super) fn start_refresh(
        self: &Arc<Self>,
        account: &AccountId,
        slot: &Arc<Slot>,
        seen: Arc<TokenSet>,
        trigger: Trigger,
    ) -> Option<SharedRefresh> {
        let mut inflight = slot.inflight();
        if let Some(running) = &*inflight {
            if trigger != Trigger::Background {
                running.waited.notify_one();
                // The caller's span shows which refresh it waited for.
                running.span.link_current();
            }
            return Some(running.result.clone());
        }
        if trigger == Trigger::Caller
            && !slot.take_demand_turn(self.clock.now(), self.config.refresh.demand_interval)
        {
            return None;
        }
        let id = NEXT_REFRESH_ID.fetch_add(1, Ordering::Relaxed);
        let waited = Arc::new(Notify::new());
        // A child of the span of whoever started it (the caller's call, when one did).
        let span = tracing::info_span!("refresh", account = %account);
        let link = LinkTarget::of(&span);
        let task = self.refreshes.spawn(
            refresh_task(
                self.clone(),
                RefreshOf {
                    account: account.clone(),
                    slot: slot.clone(),
                    seen,
                    id,
                    trigger,
                    waited: waited.clone(),
                },
            )
            .instrument(span),
        );
        let result = async move { task.await.unwrap_or(Err(RefreshFailure::Panicked)) }
            .boxed()
            .shared();
        *inflight = Some(Inflight {
            id,
            result: result.clone(),
            waited,
            span: link,
        });
        Some(result)
    }

    /// A place for the refresh's request to EdgeTag: a refresh someone waits for goes first and
    /// waits at most the queue timeout; refresh-ahead waits behind, as long as it takes.
    /// A refresh-ahead that a caller joins while it queues moves to the front part of the queue
    /// (`waited`).
    async fn upstream_place(
        &self,
        trigger: Trigger,
        waited: &Notify,
    ) -> Result<Place<'_>, NoPlace> {
        let wait = Some(self.config.upstream_queue_timeout);
        if trigger.priority() == Priority::Waited {
            return self.places.acquire(Priority::Waited, wait).await;
        }
        tokio::select! {
            place = self.places.acquire(Priority::Ahead, None) => place,
            () = waited.notified() => self.places.acquire(Priority::Waited, wait).await,
        }
    }

    /// One refresh request with retries for transient failures, inside the policy's budget; the
    /// first try uses `place`, taken already. A retry goes ahead only
    /// if a place is free when its pause ends: the caller holds the account's claim (on a shared
    /// store a row lock and a pooled connection), which must not wait in the queue for the cap.
    /// Returns when the successful request was sent, for a conservative expiry.
    async fn refresh_with_retries(
        &self,
        refresh_token: &SecretString,
        mut place: Place<'_>,
        priority: Priority,
    ) -> Result<(SystemTime, TokenResponse), UpstreamError> {
        let policy = &self.config.refresh;
        let started = Instant::now();
        let mut pause = policy.retry_base;
        let mut attempt = 1;
        loop {
            let requested_at = self.clock.now();
            let result = place.run(self.provider.refresh(refresh_token)).await;
            drop(place);
            let e = match result {
                Ok(response) => return Ok((requested_at, response)),
                Err(e) => e,
            };
            let wait = e
                .retry_after()
                .unwrap_or_else(|| policy::jittered(pause, rand::random()));
            if !e.is_transient()
                || attempt >= policy.attempts
                || started.elapsed() + wait > policy.retry_budget
            {
                return Err(e);
            }
            tracing::debug!(error = %e, attempt, "transient refresh failure; retrying");
            tokio::time::sleep(wait).await;
            place = match self.places.try_acquire(priority) {
                Some(place) => place,
                // Every place is taken: this failure is the answer, and the back-off takes over.
                None => return Err(e),
            };
            pause *= 2;
            attempt += 1;
        }
    }

    /// Notes a failed refresh: the account backs off (longer with each failure, honouring
    /// `Retry-After`), and its record shows the failed attempt.
    fn note_failure(
        &self,
        account: &AccountId,
        slot: &Slot,
        current: &AccountRecord,
        failure: RefreshFailure,
        at: SystemTime,
    ) -> RefreshFailure {
        let policy = &self.config.refresh;
        {
            let mut health = slot.health();
            health.failures = health.failures.saturating_add(1);
            let retry_after = match &failure {
                RefreshFailure::Upstream(e) => e.retry_after(),
                _ => None,
            };
            let wait = policy::backoff(
                health.failures,
                policy.backoff_base,
                policy.backoff_max,
                retry_after,
                rand::random(),
            );
            health.retry_at = Some(at + wait);
            health.hold_until = retry_after.map(|ra| at + ra);
            health.last_failure = Some(failure.clone());
            health.fleet_outage = false;
        }
        if matches!(&failure, RefreshFailure::Upstream(e) if e.is_outage()) {
            self.transient_backoffs.store(true, Ordering::Release);
        }
        slot.record.store(Arc::new(AccountRecord {
            last_refresh: Some(LastRefresh {
                at,
                outcome: RefreshOutcome::Failed,
            }),
            ..current.clone()
        }));
        self.emit(account, failure.event_kind());
        slot.touch();
        failure
    }

    /// EdgeTag answered a refresh again: every account backing off because EdgeTag was down
    /// ([`UpstreamError::is_outage`]) may refresh at once, unless EdgeTag's `Retry-After` still
    /// holds it, instead of waiting out back-offs of up to `backoff_max`. The scheduler takes them
    /// most overdue first, within the upstream cap. An account whose own answers are unusable
    /// keeps backing off: another account's success says nothing about it. On a shared store the
    /// fleet's back-offs end first, and every other process hears of it
    /// ([`crate::store::Change::Recovered`]).
    fn end_transient_backoffs(self: &Arc<Self>) {
        if !self.transient_backoffs.swap(false, Ordering::AcqRel) {
            return;
        }
        let inner = self.clone();
        tokio::spawn(async move {
            // The store first: a scan woken before it would meet the fleet's back-offs there and
            // take them up again.
            if let Err(e) = inner.store.end_outage_backoffs().await {
                tracing::warn!(
                    error = %e,
                    "could not end the fleet's back-offs in the store; they run out on their own"
                );
            }
            inner.end_outage_backoffs_here();
        });
    }

    /// Ends this process's back-offs after an outage (its own, and those it learned from the
    /// store) and wakes the scheduler.
    pub(super) fn end_outage_backoffs_here(&self) {
        let mut ended = 0usize;
        for entry in self.accounts.iter() {
            let mut health = entry.value().health();
            if health.retry_at.is_some() && health.after_outage() {
                // An explicit Retry-After still holds.
                health.retry_at = health.hold_until;
                health.fleet_outage = false;
                ended += 1;
            }
        }
        if ended > 0 {
            tracing::info!(
                accounts = ended,
                "EdgeTag answers again; refreshing the accounts that were backing off"
            );
            self.wake_scheduler.notify_one();
        }
    }
}

/// Writes `record` through the claim (or, without one, over the slot's stored version) and
/// returns its version. If the store refuses, the record is held back: never served, written again
/// by the scheduler at once, and the account counts as unpersisted until then (fail closed: it may
/// carry the only live refresh token).
async fn persist_or_hold_back(
    inner: &Inner,
    account: &AccountId,
    slot: &Slot,
    claim: Option<Box<dyn RefreshClaim>>,
    record: &Arc<AccountRecord>,
) -> Result<Version, RefreshFailure> {
    let written = match claim {
        Some(claim) => claim.commit(record).instrument(commit_span(account)).await,
        None => {
            inner
                .store
                .put_account(account, record, slot.expected())
                .instrument(commit_span(account))
                .await
        }
    };
    written.map_err(|e| {
        tracing::error!(error = %e, "refreshed token set not stored; holding it back and retrying the write");
        // An unreachable store is the same answer here as at the claim.
        let why = if e.is_unavailable() {
            RefreshFailure::StoreUnavailable
        } else {
            RefreshFailure::Store
        };
        let held = HeldBack {
            record: record.clone(),
            why: why.clone(),
        };
        let newly_held = slot.health().unpersisted.replace(held).is_none();
        slot.due_ms.store(0, Ordering::Release); // the scheduler retries the write at once
        if newly_held {
            inner.emit(account, RefreshEventKind::NotPersisted);
        }
        why
    })
}

/// The span of a refresh's write to the store, when traces are on.
fn commit_span(account: &AccountId) -> tracing::Span {
    if traces::enabled() {
        tracing::info_span!("commit", account = %account)
    } else {
        tracing::Span::none()
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
        let mut inflight = self.slot.inflight();
        if inflight.as_ref().is_some_and(|i| i.id == self.id) {
            *inflight = None;
        }
    }
}

/// What one refresh task is about (see [`Inner::start_refresh`]).
struct RefreshOf {
    account: AccountId,
    slot: Arc<Slot>,
    /// The token set the asker judged too old.
    seen: Arc<TokenSet>,
    id: u64,
    trigger: Trigger,
    waited: Arc<Notify>,
}

/// One refresh, start to end: the held-back set first if there is one; else [`Refresh::claim`]
/// the account, [`Refresh::ask_edgetag`], and [`Refresh::persist_and_publish`] its answer. Runs
/// in the `refresh` span (see [`Inner::start_refresh`]).
async fn refresh_task(inner: Arc<Inner>, of: RefreshOf) -> RefreshResult {
    let RefreshOf {
        account,
        slot,
        seen,
        id,
        trigger,
        waited,
    } = of;
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
    let held_back = slot
        .health()
        .unpersisted
        .as_ref()
        .map(|held| held.record.clone());
    if let Some(record) = held_back {
        return store_held_back(&inner, &account, &slot, record).await;
    }

    let current = slot.record.load_full();
    if !Arc::ptr_eq(&current.tokens, &seen) {
        // Replaced meanwhile (CompleteAuth or an earlier refresh): that is the answer.
        return servable(current);
    }
    if current.status == AccountStatus::NeedsReauth {
        return Err(RefreshFailure::NeedsReauth);
    }
    let Some(refresh_token) = current.tokens.refresh_token.clone() else {
        return Err(RefreshFailure::NeedsReauth);
    };
    let refresh = Refresh {
        inner: &inner,
        account: &account,
        slot: &slot,
        current,
        waited: &waited,
    };
    let (place, claim) = match refresh.claim(trigger).await {
        Ok(claimed) => claimed,
        Err(answer) => return answer,
    };
    let answer = refresh
        .ask_edgetag(&refresh_token, place, trigger.priority(), claim)
        .await?;
    refresh.persist_and_publish(answer, &refresh_token).await
}

/// Writes the token set the store refused before, and serves it once written.
async fn store_held_back(
    inner: &Inner,
    account: &AccountId,
    slot: &Slot,
    record: Arc<AccountRecord>,
) -> RefreshResult {
    let version = persist_or_hold_back(inner, account, slot, None, &record).await?;
    *slot.health() = Health::default();
    inner.publish(slot, record.clone(), version);
    tracing::info!("held-back token set stored; serving it");
    inner.emit(account, RefreshEventKind::Refreshed);
    Ok(record)
}

/// A refresh under way: the account, its slot, and the record it sets out to replace.
struct Refresh<'a> {
    inner: &'a Arc<Inner>,
    account: &'a AccountId,
    slot: &'a Slot,
    current: Arc<AccountRecord>,
    /// Notified when a caller joins (see [`Inner::upstream_place`]).
    waited: &'a Notify,
}

/// EdgeTag's new token set, with the claim still held for writing it.
struct Answer {
    claim: Box<dyn RefreshClaim>,
    /// When the refresh began asking (a failure is noted at this time).
    attempted_at: SystemTime,
    /// When the request that succeeded was sent (for a conservative expiry).
    requested_at: SystemTime,
    response: TokenResponse,
}

impl<'a> Refresh<'a> {
    /// A place in the upstream cap, then the account's claim in the store. `Err` carries the
    /// refresh's answer when there is nothing to ask EdgeTag: a newer record stored elsewhere, the
    /// account gone, another process refreshing it or backing it off, or the store failing.
    async fn claim(
        &self,
        trigger: Trigger,
    ) -> Result<(Place<'a>, Box<dyn RefreshClaim>), RefreshResult> {
        let span = if traces::enabled() {
            tracing::info_span!("claim", account = %self.account)
        } else {
            tracing::Span::none()
        };
        self.claim_in_span(trigger).instrument(span).await
    }

    /// [`Refresh::claim`], in its span.
    async fn claim_in_span(
        &self,
        trigger: Trigger,
    ) -> Result<(Place<'a>, Box<dyn RefreshClaim>), RefreshResult> {
        let inner: &'a Inner = self.inner;
        let (account, slot, current) = (self.account, self.slot, &self.current);
        // A place in the upstream cap first, the claim second: on a shared store a claim holds a
        // row lock and a pooled connection until the refresh ends, so claims must not queue for
        // places.
        let place = inner
            .upstream_place(trigger, self.waited)
            .await
            .map_err(|NoPlace| Err(RefreshFailure::NoPlace))?;
        // Fleet-wide, only the claim holder refreshes; a newer record stored elsewhere is the
        // answer. The scheduler never waits for another process's refresh, and honours the
        // fleet's back-off.
        let mode = match trigger {
            Trigger::Background => ClaimMode::Skip {
                now: inner.clock.now(),
            },
            Trigger::Caller | Trigger::Operator => ClaimMode::Wait,
        };
        match inner
            .store
            .claim_refresh(account, slot.version.load(Ordering::Acquire), mode)
            .await
        {
            Ok(Claim::Granted(claim)) => Ok((place, claim)),
            Ok(Claim::Superseded(newer)) => {
                let record = Arc::new(newer.record);
                inner.publish(slot, record.clone(), newer.version);
                Err(servable(record))
            }
            Ok(Claim::Gone) => Err(Err(RefreshFailure::Removed)),
            Ok(Claim::Busy) => {
                // Another process refreshes it now; its commit reaches us as a change. Look again
                // after a scan or two in case that never comes.
                let later = inner.clock.now() + inner.config.refresh.scan_interval * 2;
                slot.due_ms.store(to_unix_ms(later), Ordering::Release);
                Err(servable(current.clone()))
            }
            Ok(Claim::BackingOff(backoff)) => {
                let mut health = slot.health();
                health.failures = health.failures.max(backoff.failures);
                health.retry_at = Some(backoff.retry_at);
                health.hold_until = backoff.hold_until;
                health.fleet_outage = backoff.outage;
                drop(health);
                if backoff.outage {
                    // A success in this process ends it too.
                    inner.transient_backoffs.store(true, Ordering::Release);
                }
                Err(servable(current.clone()))
            }
            Err(e) => {
                // Noted like any failed refresh, so that callers the demand limit answers without
                // a refresh of their own get the same answer, and the scheduler backs off. A
                // record another replica sealed with a key this one lacks is logged once per key
                // and taken up after the next key reload.
                let failure = match e {
                    StoreError::KeyNotHeld { key_id, .. } => {
                        inner.note_unopened(account, &key_id);
                        RefreshFailure::ClaimFailed
                    }
                    e => claim_failure(e),
                };
                let now = inner.clock.now();
                Err(Err(inner.note_failure(account, slot, current, failure, now)))
            }
        }
    }

    /// Asks EdgeTag for a new token set (with retries, see [`Inner::refresh_with_retries`]).
    /// When it refuses, the refusal is noted and the claim released here: `invalid_grant` stores
    /// the account as needing re-authorization; any other failure backs the account off and
    /// shares the back-off.
    async fn ask_edgetag(
        &self,
        refresh_token: &SecretString,
        place: Place<'_>,
        priority: Priority,
        claim: Box<dyn RefreshClaim>,
    ) -> Result<Answer, RefreshFailure> {
        let (inner, account, slot, current) = (self.inner, self.account, self.slot, &self.current);
        let attempted_at = inner.clock.now();
        match inner
            .refresh_with_retries(refresh_token, place, priority)
            .await
        {
            Ok((requested_at, response)) => Ok(Answer {
                claim,
                attempted_at,
                requested_at,
                response,
            }),
            Err(UpstreamError::InvalidGrant) => {
                let record = Arc::new(AccountRecord {
                    tokens: current.tokens.clone(),
                    status: AccountStatus::NeedsReauth,
                    last_refresh: Some(LastRefresh {
                        at: attempted_at,
                        outcome: RefreshOutcome::Failed,
                    }),
                    teams: current.teams.clone(),
                });
                let version = claim
                    .commit(&record)
                    .instrument(commit_span(account))
                    .await
                    .map_err(store_failure)?;
                inner.publish(slot, record, version);
                tracing::warn!(
                    "EdgeTag rejected the refresh token; the account needs re-authorization (BeginAuth)"
                );
                inner.emit(account, RefreshEventKind::NeedsReauth);
                Err(RefreshFailure::NeedsReauth)
            }
            Err(UpstreamError::InvalidClient { status }) => {
                log_client_rejected(status);
                let failure = RefreshFailure::ClientRejected;
                let failure = inner.note_failure(account, slot, current, failure, attempted_at);
                share_backoff(claim, slot).await;
                Err(failure)
            }
            Err(e) => {
                tracing::warn!(error = %e, "refresh failed");
                let failure = RefreshFailure::Upstream(e);
                let failure = inner.note_failure(account, slot, current, failure, attempted_at);
                share_backoff(claim, slot).await;
                Err(failure)
            }
        }
    }

    /// Turns EdgeTag's answer into the account's new record, writes it through the claim and only
    /// then serves it. An answer that renews nothing is a failure, though a rotated refresh token
    /// in it is stored all the same.
    async fn persist_and_publish(
        &self,
        answer: Answer,
        refresh_token: &SecretString,
    ) -> RefreshResult {
        let (inner, account, slot, current) = (self.inner, self.account, self.slot, &self.current);
        let Answer {
            claim,
            attempted_at,
            requested_at,
            response,
        } = answer;
        let rotated = response.refresh_token.is_some();
        let tokens = response.into_token_set(
            requested_at,
            inner.provider.config().default_token_lifetime,
            Some(refresh_token),
        );
        if tokens.expires_at <= current.tokens.expires_at {
            // Not a usable renewal. A rotated refresh token is kept all the same: the old one may
            // already be dead at the provider.
            let e = UpstreamError::Malformed("the new token expires no later than the old one");
            tracing::warn!(error = %e, rotated, "refresh answer not used");
            let mut kept = current.clone();
            let mut claim = Some(claim);
            if let Some(claim) = claim.take().filter(|_| rotated) {
                kept = Arc::new(AccountRecord {
                    tokens: Arc::new(TokenSet {
                        refresh_token: tokens.refresh_token,
                        ..(*current.tokens).clone()
                    }),
                    ..(**current).clone()
                });
                let version =
                    persist_or_hold_back(inner, account, slot, Some(claim), &kept).await?;
                inner.publish(slot, kept.clone(), version);
            }
            let failure = RefreshFailure::Upstream(e);
            let failure = inner.note_failure(account, slot, &kept, failure, attempted_at);
            if let Some(claim) = claim {
                share_backoff(claim, slot).await;
            }
            return Err(failure);
        }

        let record = Arc::new(AccountRecord {
            tokens: Arc::new(tokens),
            status: AccountStatus::Active,
            last_refresh: Some(LastRefresh {
                at: requested_at,
                outcome: RefreshOutcome::Succeeded,
            }),
            // The same grant: its team stays (asked again daily, not on every refresh).
            teams: current.teams.clone(),
        });
        let version = persist_or_hold_back(inner, account, slot, Some(claim), &record).await?;
        *slot.health() = Health::default();
        inner.publish(slot, record.clone(), version);
        tracing::info!("access token refreshed");
        inner.emit(account, RefreshEventKind::Refreshed);
        inner.end_transient_backoffs();
        Ok(record)
    }
}

/// Releases a claim after a failed refresh, leaving the account's back-off where other processes
/// see it (on a shared store), so a fleet does not multiply the attempts on a failing EdgeTag.
async fn share_backoff(claim: Box<dyn RefreshClaim>, slot: &Slot) {
    let backoff = {
        let health = slot.health();
        health.retry_at.map(|retry_at| Backoff {
            failures: health.failures,
            retry_at,
            outage: health.after_outage(),
            hold_until: health.hold_until,
        })
    };
    let Some(backoff) = backoff else {
        return;
    };
    if let Err(e) = claim.fail(backoff).await {
        tracing::warn!(error = %e, "could not share the back-off with other replicas");
    }
}

/// A record someone else produced, as the answer to a refresh.
fn servable(record: Arc<AccountRecord>) -> RefreshResult {
    match record.status {
        AccountStatus::Active => Ok(record),
        AccountStatus::NeedsReauth => Err(RefreshFailure::NeedsReauth),
    }
}

fn store_failure(e: StoreError) -> RefreshFailure {
    if e.is_unavailable() {
        // Logged once per outage by the store.
        return RefreshFailure::StoreUnavailable;
    }
    tracing::error!(error = %e, "storing a token set failed");
    RefreshFailure::Store
}

/// Why claiming an account failed; like [`store_failure`], but nothing was refreshed yet.
fn claim_failure(e: StoreError) -> RefreshFailure {
    if e.is_unavailable() {
        // Logged once per outage by the store.
        return RefreshFailure::StoreUnavailable;
    }
    tracing::error!(error = %e, "claiming an account's refresh in the store failed");
    RefreshFailure::ClaimFailed
}

pub(super) fn log_client_rejected(status: u16) {
    tracing::error!(
        http_status = status,
        "EdgeTag rejected this service's client credentials: check --client-id and the client secret \
         (EDGETAG_CLIENT_ID, EDGETAG_CLIENT_SECRET_FILE / EDGETAG_CLIENT_SECRET); after a roll at \
         EdgeTag, put the new secret in the client secret file: it is taken up without a restart"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        broker::{Broker, BrokerConfig},
        clock::Clock,
        sealing::Keyring,
        store::{Expected, SledStore, Store, contract::record},
    };

    /// The back-off cut after EdgeTag's return is for accounts that failed because EdgeTag was
    /// down. An account whose own answers were unusable keeps backing off: cut on every other
    /// account's success, it would be retried on every scan for good.
    #[tokio::test]
    async fn the_back_off_cut_spares_accounts_whose_answers_were_unusable() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(SledStore::open(dir.path(), Keyring::ephemeral()).unwrap());
        let accounts = ["down", "malformed"].map(|a| AccountId::parse(a).unwrap());
        for account in &accounts {
            store
                .put_account(account, &record("at", Some("rt")), Expected::Absent)
                .await
                .unwrap();
        }
        let clock = Clock::manual();
        let broker = Broker::new(
            store,
            crate::oauth::unreachable_provider(),
            clock.clone(),
            BrokerConfig::default(),
        )
        .await
        .unwrap();
        let inner = &broker.inner;
        let failures = [
            UpstreamError::Unavailable {
                status: 503,
                retry_after: None,
            },
            UpstreamError::Malformed("no access_token"),
        ];
        for (account, failure) in accounts.iter().zip(failures) {
            let slot = broker.slot(account).unwrap();
            let current = slot.record.load_full();
            let failure = RefreshFailure::Upstream(failure);
            inner.note_failure(account, &slot, &current, failure, clock.now());
            assert!(slot.backing_off(clock.now()).is_some());
        }

        inner.end_outage_backoffs_here();
        let backing_off = |account: &AccountId| {
            broker
                .slot(account)
                .unwrap()
                .backing_off(clock.now())
                .is_some()
        };
        assert!(
            !backing_off(&accounts[0]),
            "EdgeTag was down: refreshes at once"
        );
        assert!(
            backing_off(&accounts[1]),
            "its own answer was unusable: still backs off"
        );
    }
}
