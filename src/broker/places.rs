//! Places for token-endpoint requests: how many refreshes may ask EdgeTag at once, in which
//! order they get to, and for how long a slow one keeps its place.
//!
//! A plain semaphore lets a slow EdgeTag starve everyone: requests that hang until the upstream
//! timeout hold every place, and the queue behind them grows by one timeout per round (measured:
//! 24 stalled accounts made another account's refresh wait 20 s). So:
//! - a request that has not been answered after `stall_after` gives its place back and runs on as
//!   *stalled*; at most `max_in_flight` requests are out at once, stalled ones included. The cap
//!   then bounds how fast requests start while EdgeTag is slow, not how long others wait;
//! - a refresh a caller waits for goes ahead of refresh-ahead work (the scheduler's);
//! - a caller's refresh waits at most the queue timeout for a place; after it the caller gets its
//!   still-valid token or UNAVAILABLE (see [`super::RefreshFailure::NoPlace`]), never a hang.
//!
//! Code exchanges and revocations (an operator waiting) do not queue here at all.

use std::{
    collections::VecDeque,
    future::Future,
    sync::Mutex,
    time::{Duration, Instant},
};

use tokio::sync::oneshot;

/// At most one "no place" warning per this interval.
const WARN_INTERVAL: Duration = Duration::from_secs(10);

/// Who waits for the place, which decides the order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Priority {
    /// A caller (or an operator) waits for this refresh.
    Waited,
    /// Refresh-ahead: nobody waits yet.
    Ahead,
}

/// The limits; see the module documentation.
#[derive(Debug, Clone, Copy)]
pub(super) struct Limits {
    /// Places: requests that count against the cap (`--upstream-concurrency`).
    pub places: usize,
    /// Requests out at once, stalled included (`--upstream-max-in-flight`).
    pub max_in_flight: usize,
    /// When a request stops holding its place (`--upstream-stall-after`).
    pub stall_after: Duration,
}

pub(super) struct Places {
    limits: Limits,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Requests holding a place.
    holding: usize,
    /// Requests out, holding a place or stalled.
    in_flight: usize,
    /// Waiters per priority, oldest first: `Waited` before `Ahead`.
    waited: VecDeque<Waiter>,
    ahead: VecDeque<Waiter>,
    next_id: u64,
    /// When the last "no place" warning was written: a slow EdgeTag writes one line per
    /// [`WARN_INTERVAL`].
    last_warned: Option<Instant>,
}

struct Waiter {
    id: u64,
    granted: oneshot::Sender<()>,
}

/// Why no place was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct NoPlace;

impl State {
    fn has_room(&self, limits: &Limits) -> bool {
        self.holding < limits.places && self.in_flight < limits.max_in_flight
    }

    fn take(&mut self) {
        self.holding += 1;
        self.in_flight += 1;
    }

    /// Hands free places to waiters, `Waited` first; skips waiters that gave up.
    fn grant(&mut self, limits: &Limits) {
        while self.has_room(limits) {
            let Some(waiter) = self.waited.pop_front().or_else(|| self.ahead.pop_front()) else {
                return;
            };
            self.take();
            if waiter.granted.send(()).is_err() {
                // It timed out and left; the place stays free.
                self.holding -= 1;
                self.in_flight -= 1;
            }
        }
    }

    fn queue(&mut self, priority: Priority) -> &mut VecDeque<Waiter> {
        match priority {
            Priority::Waited => &mut self.waited,
            Priority::Ahead => &mut self.ahead,
        }
    }
}

impl Places {
    pub(super) fn new(limits: Limits) -> Self {
        let limits = Limits {
            places: limits.places.max(1),
            max_in_flight: limits.max_in_flight.max(limits.places.max(1)),
            stall_after: limits.stall_after,
        };
        Self {
            limits,
            state: Mutex::new(State::default()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // Nothing panics while holding it; a poisoned lock still holds consistent counts.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A place at once, if one is free and nobody of this priority or higher waits.
    pub(super) fn try_acquire(&self, priority: Priority) -> Option<Place<'_>> {
        let mut state = self.state();
        let queued = match priority {
            Priority::Waited => !state.waited.is_empty(),
            Priority::Ahead => !state.waited.is_empty() || !state.ahead.is_empty(),
        };
        if queued || !state.has_room(&self.limits) {
            return None;
        }
        state.take();
        Some(Place::new(self))
    }

    /// A place, waiting behind earlier waiters of the same priority and every `Waited` one;
    /// `None` for `wait` means as long as it takes. Cancel-safe: a waiter dropped while queued
    /// leaves the queue, and a place granted to it in that moment goes to the next.
    pub(super) async fn acquire(
        &self,
        priority: Priority,
        wait: Option<Duration>,
    ) -> Result<Place<'_>, NoPlace> {
        if let Some(place) = self.try_acquire(priority) {
            return Ok(place);
        }
        let (granted, rx) = oneshot::channel();
        let mut queued = {
            let mut state = self.state();
            let id = state.next_id;
            state.next_id += 1;
            state.queue(priority).push_back(Waiter { id, granted });
            // A place may have come free between the two locks.
            let limits = self.limits;
            state.grant(&limits);
            Queued {
                places: self,
                id,
                priority,
                rx: Some(rx),
            }
        };
        let rx = queued.rx.as_mut().expect("set above");
        let outcome = match wait {
            Some(wait) => tokio::time::timeout(wait, rx).await.ok(),
            None => Some(rx.await),
        };
        if let Some(Ok(())) = outcome {
            queued.rx = None; // the place is the caller's now
            return Ok(Place::new(self));
        }
        drop(queued); // leaves the queue, or passes on a place granted meanwhile
        self.warn_no_place(wait.unwrap_or_default());
        Err(NoPlace)
    }

    fn warn_no_place(&self, waited: Duration) {
        crate::metrics::record_limit_hit("upstream_queue");
        let now = Instant::now();
        let mut state = self.state();
        if state
            .last_warned
            .is_some_and(|at| now.duration_since(at) < WARN_INTERVAL)
        {
            return;
        }
        state.last_warned = Some(now);
        drop(state);
        tracing::warn!(
            waited_ms = waited.as_millis() as u64,
            places = self.limits.places,
            "EdgeTag is slow: a refresh found no free place for EdgeTag requests in time \
             (--upstream-queue-timeout); its callers got their current token or UNAVAILABLE \
             (counted as credential_limit_hits_total, limit upstream_queue)"
        );
    }

    /// Requests out now, holding a place or stalled (for tests).
    #[cfg(test)]
    fn counts(&self) -> (usize, usize) {
        let state = self.state();
        (state.holding, state.in_flight)
    }
}

/// A waiter in the queue; on drop (timed out, or the waiting future dropped) it leaves the
/// queue, or gives back the place granted to it after all.
struct Queued<'a> {
    places: &'a Places,
    id: u64,
    priority: Priority,
    rx: Option<oneshot::Receiver<()>>,
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        let Some(mut rx) = self.rx.take() else {
            return;
        };
        let mut state = self.places.state();
        let queue = state.queue(self.priority);
        if let Some(at) = queue.iter().position(|w| w.id == self.id) {
            queue.remove(at);
        } else if rx.try_recv().is_ok() {
            // Granted after the wait ended: hand it on.
            state.holding -= 1;
            state.in_flight -= 1;
            let limits = self.places.limits;
            state.grant(&limits);
        }
    }
}

/// A request's place; freed on drop.
pub(super) struct Place<'a> {
    places: &'a Places,
    stalled: bool,
}

impl<'a> Place<'a> {
    fn new(places: &'a Places) -> Self {
        Self {
            places,
            stalled: false,
        }
    }

    /// Runs `request`; if it takes longer than `stall_after`, gives the place back to the next
    /// waiter and lets the request run on as stalled.
    pub(super) async fn run<F: Future>(&mut self, request: F) -> F::Output {
        let mut request = std::pin::pin!(request);
        if !self.stalled {
            tokio::select! {
                biased;
                out = &mut request => return out,
                () = tokio::time::sleep(self.places.limits.stall_after) => self.stall(),
            }
        }
        request.await
    }

    fn stall(&mut self) {
        if self.stalled {
            return;
        }
        self.stalled = true;
        let mut state = self.places.state();
        state.holding -= 1;
        let limits = self.places.limits;
        state.grant(&limits);
    }
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        let mut state = self.places.state();
        if !self.stalled {
            state.holding -= 1;
        }
        state.in_flight -= 1;
        let limits = self.places.limits;
        state.grant(&limits);
    }
}

#[cfg(test)]
mod tests {
    use std::future::pending;

    use super::*;

    fn places(places: usize, max_in_flight: usize) -> Places {
        Places::new(Limits {
            places,
            max_in_flight,
            stall_after: Duration::from_millis(500),
        })
    }

    #[tokio::test(start_paused = true)]
    async fn waited_for_refreshes_go_before_refresh_ahead() {
        let p = places(1, 4);
        let held = p.try_acquire(Priority::Waited).unwrap();
        let ahead = p.acquire(Priority::Ahead, None);
        let waited = p.acquire(Priority::Waited, None);
        let mut ahead = std::pin::pin!(ahead);
        let mut waited = std::pin::pin!(waited);
        // Both queue (the ahead one first).
        assert!(futures::poll!(&mut ahead).is_pending());
        assert!(futures::poll!(&mut waited).is_pending());
        drop(held);
        assert!(
            futures::poll!(&mut ahead).is_pending(),
            "refresh-ahead waits"
        );
        let got = waited.await.unwrap();
        drop(got);
        ahead.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn the_wait_is_bounded_and_a_timed_out_waiter_leaves_the_queue() {
        let p = places(1, 4);
        let held = p.try_acquire(Priority::Waited).unwrap();
        let wait = Duration::from_secs(2);
        let started = tokio::time::Instant::now();
        assert_eq!(
            p.acquire(Priority::Waited, Some(wait)).await.err(),
            Some(NoPlace)
        );
        assert_eq!(started.elapsed(), wait);
        drop(held);
        // The place went back to the pool, not to the waiter that left.
        assert_eq!(p.counts(), (0, 0));
        assert!(p.try_acquire(Priority::Ahead).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_dropped_after_its_grant_passes_the_place_on() {
        let p = places(1, 4);
        let held = p.try_acquire(Priority::Waited).unwrap();
        let mut first = Box::pin(p.acquire(Priority::Waited, None));
        assert!(futures::poll!(&mut first).is_pending());
        drop(held); // granted to `first`, which is dropped before it looks
        drop(first);
        assert_eq!(p.counts(), (0, 0), "no place leaked");
        let mut second = Box::pin(p.acquire(Priority::Ahead, None));
        assert!(futures::poll!(&mut second).is_ready());
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_request_gives_its_place_to_the_next() {
        let p = places(1, 2);
        let mut slow = p.try_acquire(Priority::Waited).unwrap();
        let stalled = async { slow.run(pending::<()>()).await };
        let mut stalled = std::pin::pin!(stalled);
        assert!(futures::poll!(&mut stalled).is_pending());
        // Queued behind the slow one until it stalls (500 ms), then served.
        let started = tokio::time::Instant::now();
        let next = tokio::select! {
            place = p.acquire(Priority::Waited, Some(Duration::from_secs(2))) => place.unwrap(),
            () = &mut stalled => unreachable!(),
        };
        assert_eq!(started.elapsed(), Duration::from_millis(500));
        assert_eq!(p.counts(), (1, 2));
        // The ceiling holds: two out, no third even though no place is held by the stalled one.
        drop(next);
        let mut third = p.try_acquire(Priority::Waited).unwrap();
        assert!(p.try_acquire(Priority::Waited).is_none(), "max in flight");
        // A fast request keeps its place and frees it when done.
        assert_eq!(third.run(async { 7 }).await, 7);
        drop(third);
        assert_eq!(p.counts(), (0, 1));
    }
}
