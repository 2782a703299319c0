//! Wall-clock time for token expiry, with a test hook.
//!
//! Token expiry is an absolute instant that survives restarts, so it is measured on the system clock,
//! not tokio's monotonic one: `tokio::time::pause()` cannot move it. Everything that asks "is this
//! expired?" takes the time from a [`Clock`]; tests use [`Clock::manual`] and move time with
//! [`Clock::advance`] instead of sleeping.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

/// The system clock plus an offset that only tests move. Cloning shares the offset.
#[derive(Clone, Debug, Default)]
pub struct Clock {
    offset_ms: Arc<AtomicU64>,
}

impl Clock {
    /// The real clock.
    pub fn system() -> Self {
        Self::default()
    }

    /// The same clock, named for tests: it starts at the real time and jumps when told to.
    pub fn manual() -> Self {
        Self::default()
    }

    /// The current instant as this clock sees it.
    pub fn now(&self) -> SystemTime {
        SystemTime::now() + Duration::from_millis(self.offset_ms.load(Ordering::Relaxed))
    }

    /// [`Self::now`] from the kernel's coarse clock (see [`coarse_now`]): for the check every
    /// token read makes against the refresh margin, which is seconds long.
    pub fn now_coarse(&self) -> SystemTime {
        coarse_now() + Duration::from_millis(self.offset_ms.load(Ordering::Relaxed))
    }

    /// Moves this clock (and every clone of it) forward.
    pub fn advance(&self, by: Duration) {
        let ms = u64::try_from(by.as_millis()).unwrap_or(u64::MAX);
        self.offset_ms.fetch_add(ms, Ordering::Relaxed);
    }
}

/// The wall-clock time from Linux's coarse clock: up to a scheduler tick (1–10 ms) behind, and a
/// fraction of a precise read's cost; for what every call asks and needs only to the second.
#[cfg(target_os = "linux")]
pub fn coarse_now() -> SystemTime {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::RealtimeCoarse);
    let (secs, nanos) = (u64::try_from(now.tv_sec), u32::try_from(now.tv_nsec));
    match (secs, nanos) {
        (Ok(secs), Ok(nanos)) => SystemTime::UNIX_EPOCH + Duration::new(secs, nanos),
        _ => SystemTime::now(),
    }
}

#[cfg(not(target_os = "linux"))]
pub fn coarse_now() -> SystemTime {
    SystemTime::now()
}

/// Milliseconds since the Unix epoch, the representation used on disk and on the wire.
pub fn to_unix_ms(t: SystemTime) -> i64 {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_millis()).unwrap_or(i64::MAX),
    }
}

/// Inverse of [`to_unix_ms`].
pub fn from_unix_ms(ms: i64) -> SystemTime {
    if ms >= 0 {
        SystemTime::UNIX_EPOCH + Duration::from_millis(ms.unsigned_abs())
    } else {
        SystemTime::UNIX_EPOCH - Duration::from_millis(ms.unsigned_abs())
    }
}

/// A protobuf timestamp for an instant.
pub fn to_timestamp(t: SystemTime) -> prost_types::Timestamp {
    prost_types::Timestamp::from(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advancing_a_clone_moves_the_original() {
        let clock = Clock::manual();
        let before = clock.now();
        clock.clone().advance(Duration::from_secs(3600));
        assert!(clock.now().duration_since(before).unwrap() >= Duration::from_secs(3600));
    }

    /// The token read's freshness check trusts the coarse clock to within a tick: never ahead of
    /// the precise clock, not seconds behind it, and moved by the tests' offset like `now`.
    #[test]
    fn the_coarse_clock_trails_the_precise_one_and_keeps_the_offset() {
        for _ in 0..1_000 {
            let coarse = coarse_now();
            let precise = SystemTime::now();
            let behind = precise
                .duration_since(coarse)
                .expect("the coarse clock is never ahead of the precise one");
            // A tick is 1-10 ms; the bound leaves room for this machine being descheduled.
            assert!(behind < Duration::from_millis(500), "{behind:?} behind");
        }
        let clock = Clock::manual();
        clock.advance(Duration::from_secs(3600));
        let ahead = clock
            .now_coarse()
            .duration_since(SystemTime::now())
            .unwrap();
        assert!(ahead > Duration::from_secs(3599), "{ahead:?}");
    }

    #[test]
    fn unix_ms_round_trips() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        assert_eq!(from_unix_ms(to_unix_ms(t)), t);
        assert_eq!(to_unix_ms(from_unix_ms(-5)), -5);
    }
}
