//! The refresh arithmetic, as pure functions of their inputs (randomness is passed in), so each can
//! be tested exhaustively: whether an account is refreshed at all, when a token is due, what margin is in force, whether a token is fresh
//! enough, how long to back off, and the largest `min_validity` a caller may ask for.

use std::time::{Duration, SystemTime};

use crate::tokens::{AccountRecord, AccountStatus, TokenSet};

/// The refresh margin in force: the configured one, capped at half the token's lifetime, so a
/// provider issuing very short-lived tokens does not cause a refresh on every call.
pub fn margin(configured: Duration, lifetime: Duration) -> Duration {
    configured.min(lifetime / 2)
}

/// Whether a token with `remaining` validity can be handed out without refreshing first: it must
/// outlast both the caller's need and the margin.
pub fn fresh_enough(remaining: Duration, min_validity: Duration, margin: Duration) -> bool {
    remaining > min_validity.max(margin)
}

/// Whether the scheduler ever refreshes `record`: only an active account with a refresh token can
/// be refreshed (one that needs re-authorization waits for CompleteAuth).
pub fn refreshable(record: &AccountRecord) -> bool {
    record.status == AccountStatus::Active && record.tokens.refresh_token.is_some()
}

/// When the scheduler should refresh `tokens`: when `ahead_fraction` of the lifetime is left (at
/// least the margin), earlier by `jitter` (a fraction of the lifetime, drawn by the caller), never
/// before the token was issued.
pub fn due(tokens: &TokenSet, ahead_fraction: f64, jitter: f64, margin: Duration) -> SystemTime {
    let lifetime = tokens.lifetime();
    let lead = lifetime.mul_f64(ahead_fraction.max(0.0)).max(margin);
    let jitter = lifetime.mul_f64(jitter.max(0.0));
    tokens
        .expires_at
        .checked_sub(lead + jitter)
        .unwrap_or(tokens.issued_at)
        .max(tokens.issued_at)
}

/// Between half and all of `d` ("equal jitter"), for `sample` in `[0, 1)`: spreads retries
/// without ever retrying at once.
pub fn jittered(d: Duration, sample: f64) -> Duration {
    d.mul_f64(0.5 + sample.clamp(0.0, 1.0) * 0.5)
}

/// How long an account backs off after its `failures`-th failure in a row: `base` doubling up to
/// `max`, jittered with `sample`, and never shorter than the provider's `Retry-After`.
pub fn backoff(
    failures: u32,
    base: Duration,
    max: Duration,
    retry_after: Option<Duration>,
    sample: f64,
) -> Duration {
    let exponent = failures.saturating_sub(1).min(16);
    let backoff = base.saturating_mul(1 << exponent).min(max);
    jittered(backoff, sample).max(retry_after.unwrap_or_default())
}

/// The largest `min_validity` a caller may ask for with tokens of `lifetime`: what a token issued
/// now still covers when it enters the margin. Anything longer could never be met, and would make
/// every call refresh.
pub fn max_min_validity(lifetime: Duration, margin: Duration) -> Duration {
    lifetime.saturating_sub(margin)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const MIN: Duration = Duration::from_secs(60);
    const HOUR: Duration = Duration::from_secs(3600);

    fn tokens(lifetime: Duration) -> TokenSet {
        let issued_at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        TokenSet {
            access_token: "at".into(),
            refresh_token: Some("rt".into()),
            token_type: "Bearer".into(),
            issued_at,
            expires_at: issued_at + lifetime,
        }
    }

    #[test]
    fn edgetag_tokens_are_due_at_eighty_percent_of_their_life() {
        let t = tokens(2 * HOUR);
        let m = margin(5 * MIN, t.lifetime());
        assert_eq!(m, 5 * MIN);
        assert_eq!(due(&t, 0.2, 0.0, m), t.expires_at - 24 * MIN);
        assert_eq!(due(&t, 0.2, 0.05, m), t.expires_at - 30 * MIN);
    }

    #[test]
    fn only_active_accounts_with_a_refresh_token_are_refreshed() {
        let record = |status, refresh_token: Option<&str>| AccountRecord {
            tokens: std::sync::Arc::new(TokenSet {
                refresh_token: refresh_token.map(Into::into),
                ..tokens(HOUR)
            }),
            status,
            last_refresh: None,
            teams: None,
        };
        assert!(refreshable(&record(AccountStatus::Active, Some("rt"))));
        assert!(!refreshable(&record(AccountStatus::Active, None)));
        assert!(!refreshable(&record(
            AccountStatus::NeedsReauth,
            Some("rt")
        )));
        assert!(!refreshable(&record(AccountStatus::NeedsReauth, None)));
    }

    #[test]
    fn the_margin_is_capped_at_half_the_lifetime() {
        assert_eq!(
            margin(30 * Duration::from_secs(1), Duration::from_secs(40)),
            Duration::from_secs(20)
        );
        assert_eq!(margin(5 * MIN, 2 * HOUR), 5 * MIN);
    }

    #[test]
    fn fresh_means_outlasting_both_the_need_and_the_margin() {
        assert!(fresh_enough(10 * MIN, MIN, 5 * MIN));
        assert!(!fresh_enough(5 * MIN, MIN, 5 * MIN), "inside the margin");
        assert!(
            !fresh_enough(10 * MIN, 10 * MIN, 5 * MIN),
            "not beyond the need"
        );
        assert!(
            !fresh_enough(Duration::ZERO, Duration::ZERO, Duration::ZERO),
            "expired"
        );
    }

    #[test]
    fn back_off_doubles_to_its_ceiling_and_honours_retry_after() {
        let b = |n, ra| backoff(n, Duration::from_secs(5), 5 * MIN, ra, 1.0);
        assert_eq!(b(1, None), Duration::from_secs(5));
        assert_eq!(b(2, None), Duration::from_secs(10));
        assert_eq!(b(7, None), 5 * MIN);
        assert_eq!(b(60, None), 5 * MIN);
        assert_eq!(b(1, Some(MIN)), MIN);
        assert_eq!(
            backoff(1, Duration::from_secs(5), 5 * MIN, None, 0.0),
            Duration::from_millis(2500)
        );
    }

    #[test]
    fn the_largest_need_leaves_the_margin() {
        assert_eq!(max_min_validity(2 * HOUR, 5 * MIN), 2 * HOUR - 5 * MIN);
        assert_eq!(
            max_min_validity(Duration::from_secs(10), MIN),
            Duration::ZERO
        );
    }

    proptest! {
        #[test]
        fn due_lies_within_the_tokens_life_and_before_the_margin(
            lifetime_s in 1u64..1_000_000,
            configured_s in 0u64..100_000,
            ahead in 0.0f64..1.0,
            jitter in 0.0f64..0.5,
        ) {
            let t = tokens(Duration::from_secs(lifetime_s));
            let m = margin(Duration::from_secs(configured_s), t.lifetime());
            let at = due(&t, ahead, jitter, m);
            prop_assert!(at >= t.issued_at && at <= t.expires_at);
            prop_assert!(at <= t.expires_at - m, "due no later than the margin begins");
            prop_assert!(due(&t, ahead, 0.0, m) >= at, "jitter only makes it earlier");
        }

        #[test]
        fn a_fresh_token_meets_every_allowed_need(
            lifetime_ms in 2u64..10_000_000,
            configured_ms in 0u64..1_000_000,
            need_fraction in 0.0f64..1.0,
        ) {
            let lifetime = Duration::from_millis(lifetime_ms);
            let m = margin(Duration::from_millis(configured_ms), lifetime);
            let need = max_min_validity(lifetime, m).mul_f64(need_fraction);
            prop_assert!(m <= lifetime / 2);
            // Issued now, the token outlasts the need; the margin decides when to refresh.
            prop_assert!(lifetime >= need + m);
            prop_assert_eq!(
                fresh_enough(lifetime, need, m),
                lifetime > need.max(m)
            );
        }

        #[test]
        fn jitter_and_back_off_stay_in_their_bounds(
            failures in 0u32..100,
            base_ms in 1u64..100_000,
            max_ms in 1u64..1_000_000,
            sample in 0.0f64..1.0,
            retry_after_ms in proptest::option::of(0u64..1_000_000),
        ) {
            let (base, max) = (Duration::from_millis(base_ms), Duration::from_millis(max_ms));
            let retry_after = retry_after_ms.map(Duration::from_millis);
            let b = backoff(failures, base, max, retry_after, sample);
            let ceiling = max.max(retry_after.unwrap_or_default());
            prop_assert!(b <= ceiling);
            prop_assert!(b >= retry_after.unwrap_or_default());
            prop_assert!(b >= base.min(max) / 2);
            let j = jittered(base, sample);
            prop_assert!(j >= base / 2 && j <= base);
        }
    }
}
