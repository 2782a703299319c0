//! The EdgeTag team each grant reaches: learned from `/v1/user/me` right after CompleteAuth
//! stored the grant, and otherwise by the scheduler.
//!
//! The team is kept in the account's sealed record, so every replica serves what one learned. A
//! lookup runs after the grant is stored, so a failing `/v1/user/me` costs CompleteAuth nothing:
//! the account is served with an empty team id, and the scheduler asks again after the refresh
//! policy's back-off (said in the log once per run of failures, and at most once a minute over
//! all accounts), taking a background place, so
//! lookups share the background refreshes' cap. A known team is asked again a day after it was
//! learned, not on every refresh; a failing re-check keeps the team known. A grant whose team is
//! unknown waits a short grace after it was issued, so that on a shared store the replica that
//! connected it asks, not every replica at once.
//!
//! One lookup per account at a time in this process (the slot's [`TeamLookup`]); on a shared store two
//! replicas may both ask, and the version fence lets one write win (the other reloads it).

use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use secrecy::ExposeSecret;

use super::{
    Broker, policy,
    slot::{Slot, TeamLookup},
};
use crate::{
    account::AccountId,
    clock::to_unix_ms,
    oauth::UpstreamError,
    store::StoreError,
    tokens::{AccountRecord, AccountStatus, Teams, TokenSet},
};

/// How long a learned team is taken as it is before EdgeTag is asked again.
pub const TEAM_RECHECK: Duration = Duration::from_secs(24 * 3600);

/// How often failed lookups are warned about at most (EdgeTag down with 100,000 accounts must
/// not write 100,000 warnings).
const WARN_EVERY: Duration = Duration::from_secs(60);

/// The broker's failed-lookup warnings: the first of each minute is written, naming its account
/// and how many accounts' lookups started failing since the last one.
#[derive(Default)]
pub(super) struct Warnings {
    last: std::sync::Mutex<Option<std::time::Instant>>,
    since: std::sync::atomic::AtomicU64,
}

impl Warnings {
    /// Counts one account whose lookups started failing; `Some(count)` when a line is due now.
    fn due(&self) -> Option<u64> {
        let since = self.since.fetch_add(1, Ordering::AcqRel) + 1;
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_some_and(|at| at.elapsed() < WARN_EVERY) {
            return None;
        }
        *last = Some(std::time::Instant::now());
        self.since.fetch_sub(since, Ordering::AcqRel);
        Some(since)
    }
}

/// The running lookup of one account; dropping it lets the next one start.
pub(super) struct Running(Arc<Slot>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.team.running.store(false, Ordering::Release);
    }
}

/// Whole milliseconds, saturating.
fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// When the team of `record` should be asked for (Unix ms), back-off aside; never for an account
/// whose token is dead. A grant whose team is not known is left alone for `grace` after it was
/// issued: the process that connected it asks then, and on a shared store the other replicas
/// would only ask a second time.
fn team_due_ms(record: &AccountRecord, grace: Duration) -> i64 {
    if record.status != AccountStatus::Active {
        return i64::MAX;
    }
    match &record.teams {
        None => to_unix_ms(record.tokens.issued_at).saturating_add(ms(grace)),
        Some(teams) => to_unix_ms(teams.learned_at).saturating_add(ms(TEAM_RECHECK)),
    }
}

impl TeamLookup {
    /// Whether the team should be asked for at `now_ms`: the served record's team is due, and no
    /// lookup runs or backs off. Reads only this slot's atomics, so that a scan of 100,000
    /// accounts every second stays cheap.
    fn due(&self, now_ms: i64) -> bool {
        self.due_ms.load(Ordering::Acquire) <= now_ms
            && self.retry_at_ms.load(Ordering::Acquire) <= now_ms
            && !self.running.load(Ordering::Acquire)
    }
}

impl super::Inner {
    /// [`team_due_ms`] with this broker's grace: time enough for a code exchange and the lookup
    /// after it.
    pub(super) fn team_due_ms(&self, record: &AccountRecord) -> i64 {
        team_due_ms(record, self.provider.config().request_timeout * 3)
    }
}

/// Whether two token sets belong to one grant: the same access token, or the same refresh token
/// (EdgeTag keeps it across refreshes). A new CompleteAuth is a new grant, maybe of another team.
fn same_grant(a: &TokenSet, b: &TokenSet) -> bool {
    a.access_token.expose_secret() == b.access_token.expose_secret()
        || matches!((&a.refresh_token, &b.refresh_token),
            (Some(x), Some(y)) if x.expose_secret() == y.expose_secret())
}

/// Whether `a` and `b` name the same teams (when they were learned aside).
pub(super) fn same_teams(a: Option<&Teams>, b: Option<&Teams>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => a.team_id == b.team_id && a.teams == b.teams,
        _ => false,
    }
}

impl Broker {
    /// Learns the team of an account CompleteAuth just stored; waits for the answer (bounded by
    /// the upstream timeout) so that the caller's next GetToken has it. Failing, it leaves the
    /// account to the scheduler.
    pub(super) async fn learn_team_after_connect(&self, account: &AccountId) {
        let Ok(slot) = self.slot(account) else {
            return;
        };
        let Some(running) = claim(&slot) else {
            return;
        };
        let _permit = self.inner.operator_upstream.acquire().await;
        self.learn_team(account, running).await;
    }

    /// Starts a lookup for every account whose team is due (unknown, or learned a day ago), each
    /// in a background place; returns how many it started (they finish on their own). Waits for
    /// places for at most one scan interval, so that a wave of lookups (the first start after an
    /// upgrade, say) never holds back the next scan's refreshes: the rest wait for later scans.
    pub async fn learn_teams_due(&self) -> usize {
        let inner = &self.inner;
        let stop_waiting = tokio::time::Instant::now() + inner.config.refresh.scan_interval;
        let now_ms = to_unix_ms(inner.clock.now());
        let due: Vec<(AccountId, Arc<Slot>)> = inner
            .accounts
            .iter()
            .filter(|e| e.value().team.due(now_ms))
            .map(|e| (e.key().clone(), e.value().clone()))
            .collect();
        let mut started = 0;
        for (account, slot) in due {
            let place = inner.background.clone().acquire_owned();
            let Ok(Ok(permit)) = tokio::time::timeout_at(stop_waiting, place).await else {
                break;
            };
            let due = slot.team.due(to_unix_ms(inner.clock.now()));
            if slot.removed.load(Ordering::Acquire) || !due {
                continue;
            }
            let Some(running) = claim(&slot) else {
                continue;
            };
            let broker = self.clone();
            tokio::spawn(async move {
                broker.learn_team(&account, running).await;
                drop(permit);
            });
            started += 1;
        }
        started
    }

    /// Asks EdgeTag with the account's current access token, stores what it said and publishes
    /// it; on failure the account backs off.
    #[tracing::instrument(name = "learn_team", skip_all, fields(account = %account))]
    async fn learn_team(&self, account: &AccountId, running: Running) {
        let slot = &running.0;
        let asked_with = slot.record.load_full().tokens.clone();
        if asked_with.remaining(self.inner.clock.now()).is_zero() {
            // The refresh comes first; its token is asked with on the next scan.
            return;
        }
        match self
            .inner
            .provider
            .user_info(&asked_with.access_token)
            .await
        {
            Ok(info) => {
                let teams = info.into_teams(self.inner.clock.now());
                match self.store_teams(account, slot, &asked_with, teams).await {
                    Ok(()) => {
                        let lookup = &slot.team;
                        lookup.failures.store(0, Ordering::Release);
                        lookup.retry_at_ms.store(0, Ordering::Release);
                        lookup.failure_logged.store(false, Ordering::Release);
                    }
                    Err(e) => self.team_lookup_failed(account, slot, &Failure::Store(e)),
                }
            }
            Err(e) => self.team_lookup_failed(account, slot, &Failure::Upstream(e)),
        }
    }

    /// Writes the learned teams into the account's record (if it still holds the grant that was
    /// asked about) and serves them. A write that lost a race reloads and leaves the rest to the
    /// next scan.
    async fn store_teams(
        &self,
        account: &AccountId,
        slot: &Slot,
        asked_with: &TokenSet,
        teams: Teams,
    ) -> Result<(), StoreError> {
        let inner = &self.inner;
        let write = slot.write.lock().await;
        if slot.removed.load(Ordering::Acquire) || slot.health().unpersisted.is_some() {
            return Ok(());
        }
        let current = slot.record.load_full();
        if !same_grant(&current.tokens, asked_with) {
            return Ok(()); // connected again meanwhile: that grant's team is asked next
        }
        let changed = !same_teams(current.teams.as_deref(), Some(&teams));
        let record = Arc::new(AccountRecord {
            teams: Some(Arc::new(teams)),
            ..(*current).clone()
        });
        match inner
            .store
            .put_account(account, &record, slot.expected())
            .await
        {
            Ok(version) => {
                if changed {
                    tracing::info!(
                        team_id = record.team_id(),
                        teams = record.teams.as_ref().map_or(0, |t| t.teams.len()),
                        "EdgeTag team learned"
                    );
                }
                inner.publish(slot, record, version);
                Ok(())
            }
            Err(StoreError::Conflict(_)) => {
                drop(write); // a reload takes the lock itself
                self.reload(account).await
            }
            Err(e) => Err(e),
        }
    }

    fn team_lookup_failed(&self, account: &AccountId, slot: &Slot, failure: &Failure) {
        let policy = &self.inner.config.refresh;
        let lookup = &slot.team;
        let failures = lookup
            .failures
            .fetch_add(1, Ordering::AcqRel)
            .saturating_add(1);
        let retry_after = match failure {
            Failure::Upstream(e) => e.retry_after(),
            Failure::Store(_) => None,
        };
        let wait = policy::backoff(
            failures,
            policy.backoff_base,
            policy.backoff_max,
            retry_after,
            rand::random(),
        );
        let retry_at = to_unix_ms(self.inner.clock.now() + wait);
        lookup.retry_at_ms.store(retry_at, Ordering::Release);
        if lookup.failure_logged.swap(true, Ordering::AcqRel) {
            tracing::debug!(error = %failure, failures, "team lookup failed again");
            return;
        }
        let Some(accounts) = self.inner.team_warnings.due() else {
            tracing::debug!(error = %failure, "team lookup failed; warned about within the minute");
            return;
        };
        let known = slot.record.load().teams.is_some();
        tracing::warn!(
            account = %account,
            error = %failure,
            retry_in = ?wait,
            accounts_failing_since_last_warning = accounts,
            "could not learn the account's EdgeTag team from /v1/user/me; {}",
            if known {
                "the team learned before is still served; asking again with back-off"
            } else {
                "GetToken serves an empty team_id until the scheduler learns it (with back-off)"
            }
        );
    }
}

/// Marks `slot` as having a lookup running, unless one is.
fn claim(slot: &Arc<Slot>) -> Option<Running> {
    (!slot.team.running.swap(true, Ordering::AcqRel)).then(|| Running(slot.clone()))
}

/// Why a lookup did not leave the team stored.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error(transparent)]
    Upstream(UpstreamError),
    #[error("storing it failed: {0}")]
    Store(StoreError),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{clock::from_unix_ms, store::contract::record};

    /// However many accounts' lookups start failing, one line a minute: the first says one
    /// account, the next (a minute on) how many failed since.
    #[test]
    fn failed_lookups_are_warned_about_once_a_minute_over_all_accounts() {
        let warnings = Warnings::default();
        assert_eq!(warnings.due(), Some(1));
        for _ in 0..99_999 {
            assert_eq!(warnings.due(), None);
        }
        *warnings.last.lock().unwrap() = Some(std::time::Instant::now() - WARN_EVERY);
        assert_eq!(
            warnings.due(),
            Some(100_000),
            "the 99,999 since, and this one"
        );
        assert_eq!(warnings.due(), None);
    }

    /// An unknown team is due after the grace (the connecting process asks first), a known one a
    /// day after it was learned, a dead grant's never; and never while a lookup runs or a failed
    /// one backs off.
    #[test]
    fn when_a_team_is_due() {
        let grace = Duration::from_secs(6);
        let mut unknown = record("at", Some("rt"));
        unknown.status = AccountStatus::Active;
        unknown.teams = None;
        let issued = to_unix_ms(unknown.tokens.issued_at);
        assert_eq!(team_due_ms(&unknown, grace), issued + 6_000);

        let known = AccountRecord {
            teams: Some(Arc::new(Teams {
                team_id: "t".into(),
                teams: Vec::new(),
                learned_at: from_unix_ms(issued + 10_000),
            })),
            ..unknown.clone()
        };
        assert_eq!(
            team_due_ms(&known, grace),
            issued + 10_000 + ms(TEAM_RECHECK)
        );
        let reauth = AccountRecord {
            status: AccountStatus::NeedsReauth,
            ..unknown.clone()
        };
        assert_eq!(team_due_ms(&reauth, grace), i64::MAX, "its token is dead");

        let lookup = TeamLookup::default();
        lookup
            .due_ms
            .store(team_due_ms(&unknown, grace), Ordering::Release);
        assert!(!lookup.due(issued + 5_999));
        assert!(lookup.due(issued + 6_000));
        lookup.retry_at_ms.store(issued + 20_000, Ordering::Release);
        assert!(!lookup.due(issued + 19_999));
        assert!(lookup.due(issued + 20_000));
        lookup.running.store(true, Ordering::Release);
        assert!(!lookup.due(issued + 20_000));
    }
}
