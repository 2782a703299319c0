//! The caller's trace context on each call (cargo feature `otel`): the current OpenTelemetry
//! context, which `tracing-opentelemetry` keeps in step with the current `tracing` span, goes out
//! as W3C `traceparent` / `tracestate` metadata. Nothing is sent outside a sampled or remote span.

use opentelemetry::{
    Context,
    propagation::{Injector, TextMapPropagator},
};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};

/// Adds the current trace context to `metadata`.
pub(crate) fn inject(metadata: &mut MetadataMap) {
    TraceContextPropagator::new().inject_context(&Context::current(), &mut Metadata(metadata));
}

struct Metadata<'a>(&'a mut MetadataMap);

impl Injector for Metadata<'_> {
    fn set(&mut self, key: &str, value: String) {
        // The propagator writes only its two lowercase keys and printable values.
        if let (Ok(key), Ok(value)) = (
            MetadataKey::from_bytes(key.as_bytes()),
            MetadataValue::try_from(value),
        ) {
            self.0.insert(key, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::{
        SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState,
    };

    use super::*;

    #[test]
    fn the_current_span_goes_out_as_traceparent_and_nothing_without_one() {
        let mut metadata = MetadataMap::new();
        inject(&mut metadata);
        assert!(metadata.get("traceparent").is_none());

        let span = SpanContext::new(
            TraceId::from_hex("0af7651916cd43dd8448eb211c80319c").unwrap(),
            SpanId::from_hex("b7ad6b7169203331").unwrap(),
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        );
        let _current = Context::new().with_remote_span_context(span).attach();
        inject(&mut metadata);
        assert_eq!(
            metadata.get("traceparent").unwrap(),
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        );
    }
}
