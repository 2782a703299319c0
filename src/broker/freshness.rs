//! How fresh the broker keeps tokens, with its settings in force: when the scheduler refreshes a
//! record, the margin, the longest need a caller may state, whether a token may be handed out. The
//! arithmetic itself is [`policy`]'s (pure functions); this applies it to the broker's
//! configuration and clock, and logs once when the margin is capped.

use std::{sync::atomic::Ordering, time::Duration};

use super::{Inner, policy};
use crate::{
    clock::to_unix_ms,
    tokens::{AccountRecord, TokenSet},
};

impl Inner {
    /// When the scheduler should refresh this record; never for an account that cannot refresh.
    pub(super) fn due_ms(&self, record: &AccountRecord) -> i64 {
        if !policy::refreshable(record) {
            return i64::MAX;
        }
        let policy = &self.config.refresh;
        to_unix_ms(policy::due(
            &record.tokens,
            policy.ahead_fraction,
            policy.jitter_fraction * rand::random::<f64>(),
            self.margin(&record.tokens),
        ))
    }

    /// The refresh margin in force for `tokens` (see [`policy::margin`]); logs once when the cap
    /// shortens the configured margin, so the operator learns why it acts shorter than set.
    pub(super) fn margin(&self, tokens: &TokenSet) -> Duration {
        let lifetime = tokens.lifetime();
        let margin = policy::margin(self.config.refresh_margin, lifetime);
        if margin < self.config.refresh_margin
            && !self.margin_cap_logged.load(Ordering::Relaxed)
            && !self.margin_cap_logged.swap(true, Ordering::Relaxed)
        {
            tracing::info!(
                configured = ?self.config.refresh_margin,
                token_lifetime = ?lifetime,
                in_force = ?margin,
                "the refresh margin is capped at half the token lifetime, so short-lived tokens are not refreshed on every call"
            );
        }
        margin
    }

    /// The largest `min_validity` a caller may ask for with tokens like `tokens` (see
    /// [`policy::max_min_validity`]).
    pub(super) fn longest_need(&self, tokens: &TokenSet) -> Duration {
        policy::max_min_validity(tokens.lifetime(), self.margin(tokens))
    }

    /// Whether `tokens` can be handed out without refreshing first. Asked on every read, so the
    /// common read (no `min_validity`) asks the coarse clock: a token judged a few milliseconds
    /// younger than it is changes nothing against the margin's seconds. A caller's own
    /// `min_validity` is a promise to that caller, kept to the precise clock.
    pub(super) fn fresh_enough(&self, tokens: &TokenSet, min_validity: Duration) -> bool {
        let now = if min_validity.is_zero() {
            self.clock.now_coarse()
        } else {
            self.clock.now()
        };
        policy::fresh_enough(tokens.remaining(now), min_validity, self.margin(tokens))
    }
}
