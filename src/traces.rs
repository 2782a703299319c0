//! What the data's path needs from OpenTelemetry traces, without knowing how they are exported:
//! whether they are on, and links from a span to another (a caller that waited on a refresh it did
//! not start links to that refresh's span). Inert until [`crate::telemetry`] turns traces on.

use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::trace::{SpanContext, TraceContextExt};
use tracing_opentelemetry::OpenTelemetrySpanExt;

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Called once the process's subscriber exports traces.
pub fn enable() {
    ENABLED.store(true, Ordering::Release);
}

/// Whether spans are exported: without, no span context is looked up or kept.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Acquire)
}

/// Where a span can be found later by a span that links to it; empty while traces are off or the
/// span is not sampled.
#[derive(Clone, Debug, Default)]
pub struct LinkTarget(Option<SpanContext>);

impl LinkTarget {
    /// `span`, if traces are on and it is sampled.
    pub fn of(span: &tracing::Span) -> Self {
        if !enabled() {
            return Self(None);
        }
        let context = span.context();
        let span = context.span().span_context().clone();
        Self(span.is_sampled().then_some(span))
    }

    /// Links the current span to this one (a no-op when empty).
    pub fn link_current(&self) {
        if let Some(target) = &self.0 {
            tracing::Span::current().add_link(target.clone());
        }
    }
}
