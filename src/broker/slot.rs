//! One account in memory: the record served, its stored version, when to refresh it, its health
//! and the refresh in flight.
//!
//! # Locks, and their order
//! - `record` is an `ArcSwap`: readers (GetToken) load it without a lock.
//! - `write` (async mutex) serialises persist-and-publish of this account: a refresh, a
//!   CompleteAuth, a removal, a reload of another process's change. It is the only lock held across
//!   an `.await` (the store write, the upstream call of a refresh), and it is taken first.
//! - `health` and `inflight` (std mutexes) are leaves: held for a few instructions, never across an
//!   `.await`, never one while taking the other. Either may be taken while `write` is held.
//! - `version`, `due_ms`, `last_demand_ms` and `removed` are atomics. `version` and `removed`
//!   change only under `write`.

use std::{
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwap;

use super::{
    Inner,
    outcome::{RefreshFailure, SharedRefresh},
};
use crate::{
    account::AccountId,
    clock::to_unix_ms,
    store::{Expected, Version},
    tokens::AccountRecord,
};

pub(super) struct Slot {
    /// What is stored now. Replaced only after the store has accepted the replacement.
    pub(super) record: ArcSwap<AccountRecord>,
    /// The audit's count of this account's token reads (see [`crate::audit::AccountReads`]).
    reads: crate::audit::AccountReads,
    /// The stored version of `record`, which the next write must name.
    pub(super) version: AtomicU64,
    /// When the scheduler should refresh (Unix ms); `i64::MAX` when it never should.
    pub(super) due_ms: AtomicI64,
    /// When a caller last started a refresh (Unix ms), for [`super::RefreshPolicy::demand_interval`].
    pub(super) last_demand_ms: AtomicI64,
    /// Failures and back-off; touched only off the hot path.
    health: Mutex<Health>,
    /// The refresh in flight, if any.
    inflight: Mutex<Option<Inflight>>,
    /// Serialises persist-and-publish of this account.
    pub(super) write: tokio::sync::Mutex<()>,
    /// Set, under `write`, when the account is removed: a stale handle must not write it back.
    pub(super) removed: AtomicBool,
    /// Touched when the account changes for watchers (a new record, a failed refresh, removal):
    /// carries no value, so watchers that lag look once at the newest state.
    pub(super) changed: tokio::sync::watch::Sender<()>,
    /// The account's name, announced to WatchAccounts watchers on each change.
    pub(super) account: AccountId,
    /// Names of changed accounts for WatchAccounts watchers (see [`super::events`]).
    announce: tokio::sync::broadcast::Sender<AccountId>,
    /// Asking EdgeTag which team the grant reaches (see [`super::team`]).
    pub(super) team: TeamLookup,
}

/// One account's team lookups in this process (see [`super::team`]): one at a time, and the
/// back-off after failures.
#[derive(Debug, Default)]
pub(super) struct TeamLookup {
    /// When the served record's team is due (Unix ms), set when a record is published, so that
    /// the scheduler's scan reads one number instead of the record (see [`super::team`]).
    pub(super) due_ms: AtomicI64,
    pub(super) running: AtomicBool,
    pub(super) failures: AtomicU32,
    /// No lookup before this (Unix ms).
    pub(super) retry_at_ms: AtomicI64,
    /// The current run of failures has been logged.
    pub(super) failure_logged: AtomicBool,
}

impl crate::audit::ReadCounted for Slot {
    fn reads(&self) -> &crate::audit::AccountReads {
        &self.reads
    }

    fn account(&self) -> &AccountId {
        &self.account
    }
}

impl Slot {
    /// Tells the account's watchers (WatchToken and WatchAccounts) to look again; never waits for
    /// them.
    pub(super) fn touch(&self) {
        self.changed.send_replace(());
        // No receiver is not an error: nobody watches accounts now.
        let _ = self.announce.send(self.account.clone());
    }
}

/// Failures and back-off of one account.
#[derive(Default)]
pub(super) struct Health {
    pub(super) failures: u32,
    pub(super) retry_at: Option<SystemTime>,
    /// Until when EdgeTag asked us to stay away (`Retry-After`): no probe passes before it.
    pub(super) hold_until: Option<SystemTime>,
    /// Why the last refresh failed: what callers are told while no refresh can help.
    pub(super) last_failure: Option<RefreshFailure>,
    /// The back-off came from the store (another process's refresh failed) and an outage caused
    /// it, so EdgeTag's return ends it like one of this process's own.
    pub(super) fleet_outage: bool,
    /// A refreshed token set that the store has not accepted yet (fail closed: never served).
    pub(super) unpersisted: Option<HeldBack>,
}

impl Health {
    /// Whether EdgeTag being unavailable caused the back-off, which its return then ends.
    pub(super) fn after_outage(&self) -> bool {
        self.fleet_outage
            || matches!(&self.last_failure, Some(RefreshFailure::Upstream(e)) if e.is_outage())
    }
}

/// A refreshed token set the store refused, and why, which is what callers are told until it is
/// written.
#[derive(Clone)]
pub(super) struct HeldBack {
    pub(super) record: Arc<AccountRecord>,
    pub(super) why: RefreshFailure,
}

pub(super) struct Inflight {
    pub(super) id: u64,
    pub(super) result: SharedRefresh,
    /// Told when a caller joins a refresh-ahead: its request then queues as one someone waits
    /// for (see `places`).
    pub(super) waited: Arc<tokio::sync::Notify>,
    /// The refresh's span, for the callers that join it to link to.
    pub(super) span: crate::traces::LinkTarget,
}

impl Slot {
    /// What the next write of this account must replace.
    pub(super) fn expected(&self) -> Expected {
        Expected::Version(self.version.load(Ordering::Acquire))
    }

    pub(super) fn health(&self) -> MutexGuard<'_, Health> {
        self.health.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn inflight(&self) -> MutexGuard<'_, Option<Inflight>> {
        self.inflight.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Why the last refresh failed, while the account is backing off after it.
    pub(super) fn backing_off(&self, now: SystemTime) -> Option<RefreshFailure> {
        let health = self.health();
        match health.retry_at {
            Some(at) if now < at => Some(health.last_failure.clone().unwrap_or(
                RefreshFailure::Upstream(crate::oauth::UpstreamError::Unreachable("backing off")),
            )),
            _ => None,
        }
    }

    /// Why a refreshed token set is held back, if the store refused one.
    pub(super) fn held_back(&self) -> Option<RefreshFailure> {
        self.health()
            .unpersisted
            .as_ref()
            .map(|held| held.why.clone())
    }

    /// Whether EdgeTag's `Retry-After` still holds the account back at `now`.
    pub(super) fn held_by_provider(&self, now: SystemTime) -> bool {
        self.health().hold_until.is_some_and(|until| now < until)
    }

    /// Records that a caller starts a refresh now, if the demand interval allows one; false when
    /// a caller-started refresh began less than `interval` ago.
    pub(super) fn take_demand_turn(&self, now: SystemTime, interval: Duration) -> bool {
        let now_ms = to_unix_ms(now);
        let gap = i64::try_from(interval.as_millis()).unwrap_or(i64::MAX);
        let last = self.last_demand_ms.load(Ordering::Acquire);
        now_ms.saturating_sub(last) >= gap
            && self
                .last_demand_ms
                .compare_exchange(last, now_ms, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
    }
}

impl Inner {
    pub(super) fn new_slot(
        &self,
        account: &AccountId,
        record: AccountRecord,
        version: Version,
    ) -> Arc<Slot> {
        let due = self.due_ms(&record);
        let team = TeamLookup::default();
        team.due_ms
            .store(self.team_due_ms(&record), Ordering::Release);
        Arc::new(Slot {
            record: ArcSwap::from_pointee(record),
            version: AtomicU64::new(version),
            due_ms: AtomicI64::new(due),
            last_demand_ms: AtomicI64::new(i64::MIN),
            health: Mutex::new(Health::default()),
            inflight: Mutex::new(None),
            write: tokio::sync::Mutex::new(()),
            removed: AtomicBool::new(false),
            changed: tokio::sync::watch::Sender::new(()),
            account: account.clone(),
            announce: self.account_changes.clone(),
            team,
            reads: Default::default(),
        })
    }

    /// Makes `record` (stored as `version`) the one served and schedules its background refresh.
    /// Called under the slot's write lock, after the store accepted the record.
    pub(super) fn publish(&self, slot: &Slot, record: Arc<AccountRecord>, version: Version) {
        slot.version.store(version, Ordering::Release);
        slot.due_ms.store(self.due_ms(&record), Ordering::Release);
        slot.team
            .due_ms
            .store(self.team_due_ms(&record), Ordering::Release);
        slot.record.store(record);
        slot.touch();
    }
}
