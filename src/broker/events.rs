//! WatchAccounts: each account's transitions, for operators.
//!
//! Every change of an account touches its slot (see [`Slot::touch`](super::slot::Slot)), which
//! announces the account's name on a bounded broadcast channel. A watcher keeps, per account in
//! its scope, the state it last reported, and on each announcement compares the account's current
//! state with it: the difference is the event (connected, refreshed, refresh failing, recovered,
//! needs re-authorization, removed, and, when nothing else changed, team changed), or nothing. So
//! - each transition is reported once: a failed retry with the same cause changes nothing a
//!   watcher compares, so it sends nothing (no flapping), and recovery is the first success after
//!   a failing state;
//! - a watcher that lags reports each account's latest state once, never a backlog: several
//!   announcements of one account yield one event, and a watcher that falls more than [`BACKLOG`]
//!   names behind compares every account instead;
//! - every path that changes an account reaches watchers, including another replica's changes
//!   applied by [`follow`](super::follow), because they all touch the slot.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, atomic::Ordering},
};

use futures::Stream;
use secrecy::ExposeSecret;
use tokio::sync::broadcast::{self, error::RecvError};
use tonic::Code;

use super::{Broker, RefreshFailure};
use crate::{
    account::AccountId,
    tokens::{AccountRecord, AccountStatus, RefreshOutcome, TokenSet},
};

/// How many account names a watcher may fall behind before it compares every account instead.
pub(super) const BACKLOG: usize = 1024;

/// One account's transition, with its state afterwards. Never a token (the record's tokens are
/// redacted in `Debug`, and the gRPC message carries only expiry).
#[derive(Debug, Clone)]
pub struct AccountEvent {
    pub account: AccountId,
    pub kind: AccountEventKind,
    /// The account's record after the event; `None` when removed.
    pub record: Option<Arc<AccountRecord>>,
    /// Whether a refresh was running when the event was read.
    pub refreshing: bool,
    /// Why refreshing fails, while it does (with [`AccountEventKind::RefreshFailing`], and in a
    /// snapshot of a failing account).
    pub failure: Option<Failing>,
}

/// Why an account's refreshes fail: what GetToken answers once its token no longer does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failing {
    pub code: Code,
    /// Empty when the cause was not known at the moment the event was read.
    pub message: String,
}

/// What happened to an account.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccountEventKind {
    /// Its state when the watch started.
    Snapshot,
    /// A CompleteAuth connected it (new, or again).
    Connected,
    /// A refresh stored a new token.
    Refreshed,
    /// Refreshing started failing, or fails with another code now.
    RefreshFailing,
    /// The first successful refresh after failures.
    Recovered,
    /// The provider rejected its refresh token.
    NeedsReauth,
    /// It was removed.
    Removed,
    /// The EdgeTag team its grant reaches became known, or changed (and nothing else did).
    TeamChanged,
}

/// The part of an account's state whose change is a transition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Healthy,
    /// Refreshing fails; the gRPC code GetToken answers once the token no longer does.
    Failing(Code),
    NeedsReauth,
}

/// What a watcher last reported of an account.
struct Seen {
    record: Arc<AccountRecord>,
    phase: Phase,
}

/// An account's state as read now.
struct Current {
    record: Arc<AccountRecord>,
    failure: Option<RefreshFailure>,
    refreshing: bool,
}

impl Broker {
    /// Follows the accounts `in_scope` accepts: first a [`AccountEventKind::Snapshot`] of each,
    /// sorted by name, then each transition. Subscribes when called, so nothing that changes after
    /// this call is missed. Never ends on its own.
    pub fn watch_accounts(
        &self,
        in_scope: impl Fn(&AccountId) -> bool + Send + Sync + 'static,
    ) -> impl Stream<Item = AccountEvent> + Send + 'static {
        let changes = self.inner.account_changes.subscribe();
        let mut watcher = Watcher {
            broker: self.clone(),
            in_scope: Box::new(in_scope),
            changes,
            seen: HashMap::new(),
            pending: VecDeque::new(),
        };
        for (account, _) in self.list() {
            if !(watcher.in_scope)(&account) {
                continue;
            }
            let Some(current) = self.current(&account) else {
                continue;
            };
            let phase = phase(&account, &current, None);
            watcher.pending.push_back(event(
                &account,
                AccountEventKind::Snapshot,
                Some(&current),
                phase,
            ));
            watcher.seen.insert(
                account,
                Seen {
                    record: current.record,
                    phase,
                },
            );
        }
        futures::stream::unfold(watcher, |mut watcher| async move {
            let event = watcher.next().await?;
            Some((event, watcher))
        })
    }

    fn current(&self, account: &AccountId) -> Option<Current> {
        let slot = self.inner.accounts.get(account)?.value().clone();
        if slot.removed.load(Ordering::Acquire) {
            return None;
        }
        let record = slot.record.load_full();
        let failure = slot.health().last_failure.clone();
        let refreshing = slot.inflight().is_some();
        Some(Current {
            record,
            failure,
            refreshing,
        })
    }
}

struct Watcher {
    broker: Broker,
    in_scope: Box<dyn Fn(&AccountId) -> bool + Send + Sync>,
    changes: broadcast::Receiver<AccountId>,
    seen: HashMap<AccountId, Seen>,
    /// Events found but not yet handed out: at most one per account in scope.
    pending: VecDeque<AccountEvent>,
}

impl Watcher {
    async fn next(&mut self) -> Option<AccountEvent> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Some(event);
            }
            match self.changes.recv().await {
                Ok(account) => {
                    if (self.in_scope)(&account) {
                        self.look(&account);
                    }
                }
                Err(RecvError::Lagged(_)) => self.look_at_all(),
                Err(RecvError::Closed) => return None,
            }
        }
    }

    /// Fell behind: compares every account it knows or that exists now, so what it missed comes
    /// as one event per changed account.
    fn look_at_all(&mut self) {
        let mut accounts: Vec<AccountId> = self.seen.keys().cloned().collect();
        accounts.extend(
            self.broker
                .list()
                .into_iter()
                .map(|(account, _)| account)
                .filter(|account| (self.in_scope)(account)),
        );
        accounts.sort();
        accounts.dedup();
        for account in accounts {
            self.look(&account);
        }
    }

    /// Compares the account's state with what was last reported, and queues the difference.
    fn look(&mut self, account: &AccountId) {
        let current = self.broker.current(account);
        let (kind, phase) = match (self.seen.get(account), &current) {
            (None, None) => return,
            (Some(_), None) => {
                self.seen.remove(account);
                let removed = AccountEvent {
                    account: account.clone(),
                    kind: AccountEventKind::Removed,
                    record: None,
                    refreshing: false,
                    failure: None,
                };
                self.pending.push_back(removed);
                return;
            }
            (None, Some(current)) => (
                Some(AccountEventKind::Connected),
                phase(account, current, None),
            ),
            (Some(seen), Some(current)) => {
                let phase = phase(account, current, Some(seen.phase));
                (transition(seen, &current.record, phase), phase)
            }
        };
        let Some(current) = current else {
            return;
        };
        if let Some(kind) = kind {
            self.pending
                .push_back(event(account, kind, Some(&current), phase));
        }
        self.seen.insert(
            account.clone(),
            Seen {
                record: current.record,
                phase,
            },
        );
    }
}

/// Where `current` stands. A failing record whose cause is not known (read between a success
/// clearing the cause and publishing its record) keeps the cause reported before.
fn phase(account: &AccountId, current: &Current, before: Option<Phase>) -> Phase {
    let record = &current.record;
    if record.status == AccountStatus::NeedsReauth {
        return Phase::NeedsReauth;
    }
    if !record.refresh_failing() {
        return Phase::Healthy;
    }
    match (&current.failure, before) {
        (Some(failure), _) => Phase::Failing(failure.clone().into_error(account).code()),
        (None, Some(Phase::Failing(code))) => Phase::Failing(code),
        (None, _) => Phase::Failing(Code::Unavailable),
    }
}

/// The event between what was reported (`seen`) and `record` in `phase`, if any.
fn transition(seen: &Seen, record: &AccountRecord, phase: Phase) -> Option<AccountEventKind> {
    let new_grant =
        !same_tokens(&seen.record.tokens, &record.tokens) && record.last_refresh.is_none();
    let new_success = record.last_refresh != seen.record.last_refresh
        && record
            .last_refresh
            .is_some_and(|r| r.outcome == RefreshOutcome::Succeeded);
    let was_failing = matches!(seen.phase, Phase::Failing(_));
    let team_changed =
        !super::team::same_teams(seen.record.teams.as_deref(), record.teams.as_deref());
    let kind = match phase {
        Phase::NeedsReauth => {
            (seen.phase != Phase::NeedsReauth).then_some(AccountEventKind::NeedsReauth)
        }
        _ if new_grant || seen.phase == Phase::NeedsReauth => Some(AccountEventKind::Connected),
        Phase::Healthy if was_failing => Some(AccountEventKind::Recovered),
        Phase::Healthy if new_success => Some(AccountEventKind::Refreshed),
        Phase::Healthy => None,
        // Once per cause: a retry failing the same way is no news.
        Phase::Failing(_) => (seen.phase != phase).then_some(AccountEventKind::RefreshFailing),
    };
    // Another transition's event carries the new team in its record.
    kind.or(team_changed.then_some(AccountEventKind::TeamChanged))
}

/// Whether two token sets are the same grant's same token (a record republished unchanged, or
/// with only a rotated refresh token kept, is not a new token).
fn same_tokens(a: &Arc<TokenSet>, b: &Arc<TokenSet>) -> bool {
    Arc::ptr_eq(a, b) || a.access_token.expose_secret() == b.access_token.expose_secret()
}

fn event(
    account: &AccountId,
    kind: AccountEventKind,
    current: Option<&Current>,
    phase: Phase,
) -> AccountEvent {
    AccountEvent {
        account: account.clone(),
        kind,
        record: current.map(|c| c.record.clone()),
        refreshing: current.is_some_and(|c| c.refreshing),
        failure: match phase {
            Phase::Failing(code) => Some(Failing {
                code,
                message: match current.and_then(|c| c.failure.clone()) {
                    // The cause itself: the token may well be valid still.
                    Some(RefreshFailure::Upstream(cause)) => cause.to_string(),
                    Some(failure) => failure.into_error(account).to_string(),
                    None => String::new(),
                },
            }),
            _ => None,
        },
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use futures::{FutureExt, StreamExt};

    use super::{AccountEventKind as Kind, *};
    use crate::{
        broker::BrokerConfig,
        clock::Clock,
        sealing::Keyring,
        store::{Expected, SledStore, Store, contract::record},
        tokens::LastRefresh,
    };

    fn active(access: &str, refreshed_at: u64) -> AccountRecord {
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(refreshed_at);
        let mut r = record(access, Some("rt"));
        r.status = AccountStatus::Active;
        r.tokens = Arc::new(TokenSet {
            expires_at: at + Duration::from_secs(7200),
            ..(*r.tokens).clone()
        });
        r.last_refresh = Some(LastRefresh {
            at,
            outcome: RefreshOutcome::Succeeded,
        });
        r
    }

    /// Far more changes than the backlog holds while the watcher reads nothing: it compares every
    /// account instead, and reports each one's latest state once (a removal included).
    #[tokio::test]
    async fn a_watcher_beyond_the_backlog_gets_each_accounts_latest_state_once() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(SledStore::open(dir.path(), Keyring::ephemeral()).unwrap());
        let acme = AccountId::parse("acme").unwrap();
        let globex = AccountId::parse("globex").unwrap();
        for account in [&acme, &globex] {
            store
                .put_account(account, &active("at-0", 0), Expected::Absent)
                .await
                .unwrap();
        }
        let broker = Broker::new(
            store.clone(),
            crate::oauth::unreachable_provider(),
            Clock::manual(),
            BrokerConfig::default(),
        )
        .await
        .unwrap();
        let mut events = Box::pin(broker.watch_accounts(|_| true));
        for account in [&acme, &globex] {
            let snapshot = events.next().await.unwrap();
            assert_eq!(
                (snapshot.kind, &snapshot.account),
                (Kind::Snapshot, account)
            );
        }

        let slot = broker.slot(&acme).unwrap();
        let changes = u64::try_from(BACKLOG).unwrap() + 100;
        for i in 1..=changes {
            let record = Arc::new(active(&format!("at-{i}"), i));
            broker.inner.publish(&slot, record, i + 10);
        }
        let version = broker
            .slot(&globex)
            .unwrap()
            .version
            .load(Ordering::Acquire);
        store.delete_account(&globex, version).await.unwrap();
        broker.reload(&globex).await.unwrap();

        let refreshed = events.next().await.unwrap();
        assert_eq!(
            (refreshed.kind, &refreshed.account),
            (Kind::Refreshed, &acme)
        );
        assert_eq!(
            refreshed.record.unwrap().tokens.expires_at,
            SystemTime::UNIX_EPOCH + Duration::from_secs(changes + 7200),
            "the latest state"
        );
        let removed = events.next().await.unwrap();
        assert_eq!((removed.kind, &removed.account), (Kind::Removed, &globex));
        assert!(events.next().now_or_never().is_none(), "and nothing else");
    }

    #[test]
    fn a_failing_retry_is_no_news_and_a_new_cause_is() {
        let acme = AccountId::parse("acme").unwrap();
        let mut failing = active("at-1", 10);
        failing.last_refresh = Some(LastRefresh {
            at: SystemTime::UNIX_EPOCH + Duration::from_secs(20),
            outcome: RefreshOutcome::Failed,
        });
        let current = |failure| Current {
            record: Arc::new(failing.clone()),
            failure: Some(failure),
            refreshing: false,
        };
        let down = current(RefreshFailure::Upstream(
            crate::oauth::UpstreamError::Unreachable("connection refused"),
        ));
        let seen = Seen {
            record: Arc::new(failing.clone()),
            phase: phase(&acme, &down, None),
        };
        assert_eq!(seen.phase, Phase::Failing(Code::Unavailable));
        assert_eq!(transition(&seen, &down.record, seen.phase), None);
        let rejected = current(RefreshFailure::ClientRejected);
        let now = phase(&acme, &rejected, Some(seen.phase));
        assert_eq!(now, Phase::Failing(Code::Internal));
        assert_eq!(
            transition(&seen, &rejected.record, now),
            Some(Kind::RefreshFailing)
        );
        // Read between a success clearing the cause and its record being published: no change.
        let unknown = Current {
            failure: None,
            ..current(RefreshFailure::ClientRejected)
        };
        assert_eq!(phase(&acme, &unknown, Some(seen.phase)), seen.phase);
    }
}
