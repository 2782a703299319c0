//! GetToken: from memory when the token is fresh enough, through the single flight when not, and
//! one answer per cause when no refresh can help.

use std::{sync::Arc, time::Duration};

use super::{Broker, RefreshFailure, refresh::Trigger, slot::Slot};
use crate::{
    account::{AccountId, AccountName},
    error::Error,
    metrics,
    tokens::{AccountRecord, AccountStatus},
};

/// A served token read: the record, and the account's slot, where the audit counts the read.
pub struct Served {
    pub record: Arc<AccountRecord>,
    slot: Arc<Slot>,
}

impl Served {
    /// Where the audit counts this read (see [`crate::audit::count_token_read_in`]).
    pub fn counted(&self) -> &Arc<impl crate::audit::ReadCounted + use<>> {
        &self.slot
    }
}

impl Broker {
    /// The record whose token is valid for at least `min_validity` (and, unless the provider is
    /// down, beyond the refresh margin), with the account's team. Answered from memory unless a
    /// refresh is due.
    pub async fn get_token(
        &self,
        account: &AccountId,
        min_validity: Duration,
    ) -> Result<Arc<AccountRecord>, Error> {
        Ok(self.serve_token(account.name(), min_validity).await?.record)
    }

    /// [`Self::get_token`], with the broker's own name of the account.
    pub async fn serve_token(
        &self,
        account: AccountName<'_>,
        min_validity: Duration,
    ) -> Result<Served, Error> {
        let slot = self.slot_named(account)?;
        let record = slot.record.load();
        // A need no fresh token meets is refused (in the slow path) whatever the current token's
        // age, so one request always gets one answer; the common call without a need skips it.
        let record = if record.status == AccountStatus::Active
            && self.inner.fresh_enough(&record.tokens, min_validity)
            && (min_validity.is_zero() || min_validity <= self.inner.longest_need(&record.tokens))
        {
            arc_swap::Guard::into_inner(record)
        } else {
            // What was judged too old is what the refresh must replace; a record published since
            // then is taken as the answer instead of refreshing again.
            let seen = arc_swap::Guard::into_inner(record);
            self.get_token_slow(&slot.account, &slot, min_validity, seen)
                .await?
        };
        Ok(Served { record, slot })
    }

    async fn get_token_slow(
        &self,
        account: &AccountId,
        slot: &Arc<Slot>,
        min_validity: Duration,
        mut seen: Arc<AccountRecord>,
    ) -> Result<Arc<AccountRecord>, Error> {
        let inner = &self.inner;
        if seen.status == AccountStatus::NeedsReauth {
            return Err(Error::NeedsReauth(account.clone()));
        }
        let longest = inner.longest_need(&seen.tokens);
        if min_validity > longest {
            return Err(Error::MinValidityTooLong { longest });
        }
        // Two rounds at most: a refresh started for someone with a shorter need may not satisfy ours.
        for _ in 0..2 {
            let backing_off = slot.backing_off(inner.clock.now());
            if let Some(failure) = &backing_off
                && (covers(slot, inner.clock.now(), min_validity)
                    || slot.held_by_provider(inner.clock.now()))
            {
                // Do not hammer a failing provider: the scheduler retries when the back-off ends,
                // and nobody returns before EdgeTag's Retry-After.
                return self.without_refresh(account, slot, min_validity, Some(failure.clone()));
            }
            // Otherwise callers want a token the current one cannot give: a refresh, or while the
            // account backs off, a probe; callers start at most one per demand interval.
            let Some(refresh) =
                inner.start_refresh(account, slot, seen.tokens.clone(), Trigger::Caller)
            else {
                // A held-back token set is the store's failure: the same answer the caller that
                // met it got.
                let why = backing_off.or_else(|| slot.held_back());
                return self.without_refresh(account, slot, min_validity, why);
            };
            let waited = {
                let _waiting = metrics::single_flight_waiter();
                refresh.await
            };
            match waited {
                Ok(record) if inner.fresh_enough(&record.tokens, min_validity) => {
                    return Ok(record);
                }
                Ok(record) => seen = record,
                Err(failure) => {
                    return self.without_refresh(account, slot, min_validity, Some(failure));
                }
            }
        }
        self.without_refresh(account, slot, min_validity, None)
    }

    /// The answer when no refresh can help now: the current token while it still covers the need
    /// (even inside the margin), else the error for `why` (or, without a failure, that the
    /// needed validity could not be reached yet).
    fn without_refresh(
        &self,
        account: &AccountId,
        slot: &Slot,
        min_validity: Duration,
        why: Option<RefreshFailure>,
    ) -> Result<Arc<AccountRecord>, Error> {
        if why == Some(RefreshFailure::Removed) {
            return Err(Error::UnknownAccount(account.clone()));
        }
        let current = slot.record.load();
        if current.status == AccountStatus::NeedsReauth {
            return Err(Error::NeedsReauth(account.clone()));
        }
        if covers(slot, self.inner.clock.now(), min_validity) {
            tracing::debug!(account = %account, why = ?why, "no refresh now; serving the current token");
            return Ok(arc_swap::Guard::into_inner(current));
        }
        Err(match why {
            Some(failure) => failure.into_error(account),
            None => Error::ValidityNotReached(account.clone()),
        })
    }
}

/// Whether the slot's current token outlasts `min_validity` (and has not expired).
fn covers(slot: &Slot, now: std::time::SystemTime, min_validity: Duration) -> bool {
    let remaining = slot.record.load().tokens.remaining(now);
    remaining > min_validity && remaining > Duration::ZERO
}
