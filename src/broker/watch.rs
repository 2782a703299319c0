//! WatchToken: an account's tokens as a stream, pushed as they are published.
//!
//! Each slot has a `watch` channel that [`Inner::publish`](super::Inner::publish), a failed
//! refresh and a removal touch. A watcher holds a receiver: it carries no value, only "look
//! again", so a watcher that lags sees the newest state once, never a backlog, and publishing
//! never waits for a watcher. Whatever published the token (the scheduler, a caller's refresh,
//! RefreshToken, CompleteAuth, or another replica through the store's notifications) goes through
//! `publish`, so every path reaches every watcher.

use std::{sync::Arc, time::Duration};

use futures::Stream;
use tokio::sync::watch;

use super::{Broker, slot::Slot};
use crate::{
    account::AccountId,
    error::Error,
    tokens::{AccountRecord, AccountStatus},
};

/// Where a watch stands between two messages.
enum Watching {
    /// Nothing sent yet.
    Start,
    /// `last` was sent; `changed` says when to look again.
    Following {
        slot: Arc<Slot>,
        changed: watch::Receiver<()>,
        last: Arc<AccountRecord>,
    },
    /// The stream ended (after an error message).
    Done,
}

impl Broker {
    /// The tokens of `account` as they are published: first what [`Broker::get_token`] answers
    /// (refreshing first if it would), then each new token, and the same token again when only
    /// the account's team changed. Ends after one error: the account
    /// was removed, needs re-authorization, or its token no longer covers `min_validity` and no
    /// refresh could renew it.
    pub fn watch_token(
        &self,
        account: AccountId,
        min_validity: Duration,
    ) -> impl Stream<Item = Result<Arc<AccountRecord>, Error>> + Send + 'static {
        let broker = self.clone();
        futures::stream::unfold(Watching::Start, move |state| {
            let broker = broker.clone();
            let account = account.clone();
            async move {
                let (item, next) = broker.watch_step(&account, min_validity, state).await?;
                Some((item, next))
            }
        })
    }

    async fn watch_step(
        &self,
        account: &AccountId,
        min_validity: Duration,
        state: Watching,
    ) -> Option<(Result<Arc<AccountRecord>, Error>, Watching)> {
        match state {
            Watching::Done => None,
            Watching::Start => {
                let slot = match self.slot(account) {
                    Ok(slot) => slot,
                    Err(e) => return Some((Err(e), Watching::Done)),
                };
                // Subscribed before the first answer, so nothing published after it is missed.
                let changed = slot.changed.subscribe();
                Some(match self.get_token(account, min_validity).await {
                    Ok(tokens) => (
                        Ok(tokens.clone()),
                        Watching::Following {
                            slot,
                            changed,
                            last: tokens,
                        },
                    ),
                    Err(e) => (Err(e), Watching::Done),
                })
            }
            Watching::Following {
                slot,
                mut changed,
                last,
            } => {
                let item = self
                    .next_token(account, min_validity, &slot, &mut changed, &last)
                    .await;
                Some(match item {
                    Ok(tokens) => (
                        Ok(tokens.clone()),
                        Watching::Following {
                            slot,
                            changed,
                            last: tokens,
                        },
                    ),
                    Err(e) => (Err(e), Watching::Done),
                })
            }
        }
    }

    /// Waits until the slot publishes a token (or a team) other than `last`'s, or ends the watch.
    async fn next_token(
        &self,
        account: &AccountId,
        min_validity: Duration,
        slot: &Slot,
        changed: &mut watch::Receiver<()>,
        last: &Arc<AccountRecord>,
    ) -> Result<Arc<AccountRecord>, Error> {
        let clock = &self.inner.clock;
        loop {
            // Also wake when `last` stops covering the need, in case no refresh ever reports.
            let covered_for = last
                .tokens
                .remaining(clock.now())
                .saturating_sub(min_validity)
                .max(Duration::from_millis(1));
            tokio::select! {
                gone = changed.changed() => {
                    if gone.is_err() {
                        return Err(Error::UnknownAccount(account.clone()));
                    }
                }
                () = tokio::time::sleep(covered_for) => {}
            }
            if slot.removed.load(std::sync::atomic::Ordering::Acquire) {
                return Err(Error::UnknownAccount(account.clone()));
            }
            let record = slot.record.load_full();
            if record.status == AccountStatus::NeedsReauth {
                return Err(Error::NeedsReauth(account.clone()));
            }
            if !Arc::ptr_eq(&record.tokens, &last.tokens) || record.team_id() != last.team_id() {
                return Ok(record);
            }
            let remaining = last.tokens.remaining(clock.now());
            if remaining <= min_validity || remaining.is_zero() {
                // The current token no longer does: what GetToken would do now decides.
                let record = self.get_token(account, min_validity).await?;
                if !Arc::ptr_eq(&record.tokens, &last.tokens) {
                    return Ok(record);
                }
            }
        }
    }
}
