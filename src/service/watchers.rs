//! The places for watch streams (WatchToken, WatchAccounts), which never end on their own:
//! `--max-watchers` for both kinds together, and `--watchers-kept-for-admins` more that only
//! WatchAccounts may take, so that operators can still follow their accounts when callers'
//! streams take every other place; and at most `--max-watchers-per-caller` of one caller's
//! streams of both kinds, so that one caller cannot take every place. Each open stream holds a [`WatchPermit`] until it is
//! dropped. Past a bound the call gets RESOURCE_EXHAUSTED at once, never a queue; each refusal is
//! counted in `credential_limit_hits_total` and logged at most once per ten seconds per bound.
//! A watch starts rarely, so one lock over the counts costs nothing that matters.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard},
};

use tonic::Status;

use crate::metrics::Throttled;

/// Refusals because every place was taken (`--max-watchers`).
pub static WATCHERS_REFUSED: Throttled = Throttled::new(
    "watchers",
    "watch stream refused: too many open (--max-watchers / CREDENTIAL_SERVICE_MAX_WATCHERS, \
     and --watchers-kept-for-admins more for WatchAccounts)",
);

/// Refusals because the caller holds its share already (`--max-watchers-per-caller`).
pub static CALLER_WATCHERS_REFUSED: Throttled = Throttled::new(
    "watchers_per_caller",
    "watch stream refused: the caller has too many open (--max-watchers-per-caller / \
     CREDENTIAL_SERVICE_MAX_WATCHERS_PER_CALLER); the audit events name it",
);

/// Which kind of watch stream asks for a place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchKind {
    /// WatchToken: any caller's.
    Token,
    /// WatchAccounts: admins'; may also take the places kept for them.
    Accounts,
}

/// The places for watch streams; cheap to clone, clones share the counts.
#[derive(Clone, Debug)]
pub struct WatchBounds {
    inner: Arc<Bounds>,
}

#[derive(Debug)]
struct Bounds {
    max: usize,
    kept_for_accounts: usize,
    /// `None` without a callers file: every call is the same anonymous caller then, so a
    /// per-caller bound would only be a second global one.
    per_caller: Option<usize>,
    counts: Mutex<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    open: usize,
    by_caller: HashMap<Box<str>, usize>,
}

impl WatchBounds {
    /// `--max-watchers`, `--watchers-kept-for-admins`, and `--max-watchers-per-caller` (`None`
    /// without a callers file).
    pub fn new(max: usize, kept_for_admins: usize, per_caller: Option<usize>) -> Self {
        Self {
            inner: Arc::new(Bounds {
                max,
                kept_for_accounts: kept_for_admins,
                per_caller,
                counts: Mutex::default(),
            }),
        }
    }

    /// A place for a `kind` stream of `caller`, held until the permit is dropped; or the
    /// RESOURCE_EXHAUSTED status that says which bound refused it.
    pub fn admit(&self, caller: &str, kind: WatchKind) -> Result<WatchPermit, Status> {
        let bounds = &self.inner;
        let mut counts = bounds.lock();
        let of_caller = counts.by_caller.get(caller).copied().unwrap_or(0);
        if bounds.per_caller.is_some_and(|max| of_caller >= max) {
            CALLER_WATCHERS_REFUSED.hit();
            return Err(Status::resource_exhausted(
                "this caller has too many watch streams open (--max-watchers-per-caller); close \
                 some, use GetToken, or retry later",
            ));
        }
        let room = match kind {
            WatchKind::Token => bounds.max,
            WatchKind::Accounts => bounds.max + bounds.kept_for_accounts,
        };
        if counts.open >= room {
            WATCHERS_REFUSED.hit();
            return Err(Status::resource_exhausted(match kind {
                WatchKind::Token => {
                    "too many WatchToken streams open (--max-watchers); use GetToken, or retry later"
                }
                WatchKind::Accounts => {
                    "too many watch streams open (--max-watchers); use ListAccounts, or retry later"
                }
            }));
        }
        counts.open += 1;
        let caller = bounds.per_caller.map(|_| {
            *counts.by_caller.entry(caller.into()).or_insert(0) += 1;
            Box::<str>::from(caller)
        });
        Ok(WatchPermit {
            bounds: self.inner.clone(),
            caller,
        })
    }
}

impl Bounds {
    fn lock(&self) -> MutexGuard<'_, Counts> {
        // The counts stay consistent under a panic elsewhere: each change is one statement.
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One open stream's place; given back when the stream is dropped.
#[derive(Debug)]
pub struct WatchPermit {
    bounds: Arc<Bounds>,
    caller: Option<Box<str>>,
}

impl Drop for WatchPermit {
    fn drop(&mut self) {
        let mut counts = self.bounds.lock();
        counts.open -= 1;
        if let Some(caller) = &self.caller
            && let Some(n) = counts.by_caller.get_mut(caller)
        {
            *n -= 1;
            if *n == 0 {
                counts.by_caller.remove(caller);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bounds(max: usize, kept: usize, per_caller: usize) -> WatchBounds {
        WatchBounds::new(max, kept, Some(per_caller))
    }

    #[test]
    fn one_caller_gets_its_share_and_no_more_and_others_still_get_places() {
        let bounds = bounds(10, 0, 2);
        let a1 = bounds.admit("a", WatchKind::Token).unwrap();
        let _a2 = bounds.admit("a", WatchKind::Accounts).unwrap();
        let refused = bounds.admit("a", WatchKind::Token).unwrap_err();
        assert!(refused.message().contains("--max-watchers-per-caller"));
        let _b = bounds.admit("b", WatchKind::Token).unwrap();
        drop(a1);
        let _a3 = bounds.admit("a", WatchKind::Token).unwrap();
        assert_eq!(bounds.inner.lock().open, 3);
    }

    #[test]
    fn the_places_kept_for_admins_are_taken_only_by_watch_accounts() {
        let bounds = bounds(2, 1, 10);
        let _t1 = bounds.admit("a", WatchKind::Token).unwrap();
        let _t2 = bounds.admit("b", WatchKind::Token).unwrap();
        let refused = bounds.admit("c", WatchKind::Token).unwrap_err();
        assert!(refused.message().contains("--max-watchers"), "{refused:?}");
        let accounts = bounds.admit("ops", WatchKind::Accounts).unwrap();
        assert!(
            bounds.admit("ops", WatchKind::Accounts).is_err(),
            "all taken"
        );
        assert!(bounds.admit("c", WatchKind::Token).is_err());
        drop(accounts);
        assert!(bounds.admit("ops", WatchKind::Accounts).is_ok());
    }

    #[test]
    fn without_a_callers_file_only_the_shared_bounds_apply() {
        let bounds = WatchBounds::new(5, 0, None);
        let held: Vec<_> = (0..5)
            .map(|_| bounds.admit("anonymous", WatchKind::Token).unwrap())
            .collect();
        assert!(bounds.admit("anonymous", WatchKind::Token).is_err());
        drop(held);
        let counts = bounds.inner.lock();
        assert_eq!((counts.open, counts.by_caller.len()), (0, 0));
    }
}
