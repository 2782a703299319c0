//! The fake's source of "now", so tests move time instead of sleeping.

use std::{sync::Arc, time::SystemTime};

/// Where the fake reads "now". A test that moves its client's clock hands in a reading of that same
/// clock, so the fake and the client agree on when codes and tokens expire.
#[derive(Clone)]
pub struct FakeClock(Arc<dyn Fn() -> SystemTime + Send + Sync>);

impl FakeClock {
    /// The system clock.
    pub fn system() -> Self {
        Self::from_fn(SystemTime::now)
    }

    /// A clock that reads `now` each time the fake needs the time.
    pub fn from_fn(now: impl Fn() -> SystemTime + Send + Sync + 'static) -> Self {
        Self(Arc::new(now))
    }

    /// The current instant as this clock sees it.
    pub fn now(&self) -> SystemTime {
        (self.0)()
    }
}

impl Default for FakeClock {
    fn default() -> Self {
        Self::system()
    }
}

impl std::fmt::Debug for FakeClock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FakeClock")
    }
}
