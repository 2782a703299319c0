//! [`Throttled`]: one bound's refusal log, a line at most every [`LOG_EVERY`] carrying how many
//! refusals it stands for, and its count in `credential_limit_hits_total`. Here, below every
//! layer that bounds something (the listeners, the gRPC service's watch streams), so that each
//! can log its refusals the same way.

use std::{
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

/// How often, at most, one bound's refusals are logged (with the count since the last line).
pub const LOG_EVERY: Duration = Duration::from_secs(10);

/// A log line per bound at most every [`LOG_EVERY`], carrying how many hits it stands for. Hits
/// after the last line are logged by [`Throttled::flush`], which the server calls for every bound
/// every [`LOG_EVERY`] and at shutdown, so a burst's tail is never lost.
pub struct Throttled {
    what: &'static str,
    /// The bound's label in `credential_limit_hits_total`.
    limit: &'static str,
    since_last: AtomicU64,
    last: Mutex<Option<Instant>>,
}

impl Throttled {
    pub const fn new(limit: &'static str, what: &'static str) -> Self {
        Self {
            what,
            limit,
            since_last: AtomicU64::new(0),
            last: Mutex::new(None),
        }
    }

    /// Counts one hit of the bound (metric and, now and then, a warning).
    pub fn hit(&self) {
        super::record_limit_hit(self.limit);
        self.since_last.fetch_add(1, Ordering::Relaxed);
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_some_and(|at| at.elapsed() < LOG_EVERY) {
            return;
        }
        self.log(&mut last);
    }

    /// Logs the hits not yet logged, if any.
    pub fn flush(&self) {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        self.log(&mut last);
    }

    fn log(&self, last: &mut Option<Instant>) {
        let hits = self.since_last.swap(0, Ordering::Relaxed);
        if hits > 0 {
            *last = Some(Instant::now());
            tracing::warn!(limit = self.limit, hits, "{}", self.what);
        }
    }
}
