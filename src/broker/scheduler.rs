//! The background refresh scheduler: refreshes every account before callers would have to wait.
//!
//! A scan every `scan_interval` collects the accounts whose due time (set when their token set was
//! published: 20% of the lifetime left, plus jitter) has passed, oldest first, and starts their
//! refreshes through the same single flight callers use. At most `upstream_concurrency` background
//! refreshes run at once, so 10,000 accounts expiring together cannot flood EdgeTag, and callers'
//! own refreshes never queue behind the whole wave. Time comes from the broker's clock, so
//! tests move it instead of sleeping; accounts backing off after a failure are skipped until their
//! back-off ends (or until EdgeTag answers another refresh, which ends transient back-offs and wakes
//! the scan at once), and held-back token sets (a failed write) are retried on every scan.

use std::{sync::atomic::Ordering, time::Duration};

use super::{Broker, refresh::Trigger};
use crate::{clock::to_unix_ms, tokens::AccountStatus};

impl Broker {
    /// Runs the scheduler until the task is dropped or aborted.
    pub async fn run_scheduler(self) {
        let mut tick = tokio::time::interval(
            self.inner
                .config
                .refresh
                .scan_interval
                .max(Duration::from_millis(10)),
        );
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = self.inner.wake_scheduler.notified() => {}
            }
            self.refresh_due().await;
            self.learn_teams_due().await;
        }
    }

    /// Starts a background refresh for every due account, most overdue first, waiting for a free
    /// background slot before each; returns how many it started (they finish on their own).
    pub async fn refresh_due(&self) -> usize {
        let inner = &self.inner;
        let now_ms = to_unix_ms(inner.clock.now());
        let mut due: Vec<_> = inner
            .accounts
            .iter()
            .filter_map(|e| {
                let due = e.value().due_ms.load(Ordering::Acquire);
                (due <= now_ms).then(|| (due, e.key().clone(), e.value().clone()))
            })
            .collect();
        due.sort_unstable_by_key(|(due, ..)| *due);

        let mut started = 0;
        for (due_ms, account, slot) in due {
            if slot.removed.load(Ordering::Acquire) || slot.inflight().is_some() {
                continue;
            }
            let held_back = slot.health().unpersisted.is_some();
            if !held_back && slot.backing_off(inner.clock.now()).is_some() {
                continue;
            }
            let Ok(permit) = inner.background.clone().acquire_owned().await else {
                break;
            };
            // Waiting for the permit took time: someone may have refreshed this account meanwhile.
            let current = slot.record.load_full();
            let still_due = slot.due_ms.load(Ordering::Acquire) <= to_unix_ms(inner.clock.now());
            if !held_back && (current.status != AccountStatus::Active || !still_due) {
                continue;
            }
            let lag_ms = to_unix_ms(inner.clock.now()).saturating_sub(due_ms);
            crate::metrics::record_refresh_lag(Duration::from_millis(lag_ms.max(0).unsigned_abs()));
            tracing::debug!(account = %account, lag_ms, "background refresh");
            let Some(refresh) =
                inner.start_refresh(&account, &slot, current.tokens.clone(), Trigger::Background)
            else {
                continue; // only callers are ever refused
            };
            tokio::spawn(async move {
                let _ = refresh.await;
                drop(permit);
            });
            started += 1;
        }
        started
    }
}
