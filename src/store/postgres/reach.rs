//! Whether the database answers ([`Reach`]), and what to say when it does not ([`with_causes`]).

use std::sync::atomic::{AtomicBool, Ordering};

use crate::metrics;

/// Whether the database answers: one log line and the gauge change on each transition, not one
/// per failed call.
#[derive(Debug)]
pub(super) struct Reach {
    up: AtomicBool,
}

impl Reach {
    pub(super) fn new() -> Self {
        metrics::set_store_up(true);
        Self {
            up: AtomicBool::new(true),
        }
    }

    pub(super) fn answered(&self) {
        if !self.up.swap(true, Ordering::AcqRel) {
            metrics::set_store_up(true);
            tracing::info!("the database answers again");
        }
    }

    pub(super) fn lost(&self, why: &str) {
        if self.up.swap(false, Ordering::AcqRel) {
            metrics::set_store_up(false);
            tracing::error!(
                error = why,
                "the database is unreachable: serving tokens from memory while they last; refreshes and writes fail until it answers"
            );
        }
    }
}

/// An error with its causes ("error performing TLS handshake: invalid peer certificate: …"):
/// the driver's own message alone rarely says what to fix.
pub(super) fn with_causes(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}
