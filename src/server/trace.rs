//! A span per sampled gRPC call that continues the caller's W3C trace (`traceparent`,
//! `tracestate`), set only when traces are on (`ServiceConfig::traces`): otherwise tonic makes no
//! span and reads no header. Whether a call is sampled is decided here, before any span exists, so
//! the 99% of calls a 1% sampler leaves out cost a header lookup and a random draw, not a span
//! (`telemetry` has the SDK's sampler keep every call span made here). The span carries the
//! method, never a header's or a message's content.

use opentelemetry::{
    propagation::{Extractor, TextMapPropagator},
    trace::TraceContextExt,
};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tonic::codegen::http;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::config::CallSampling;

/// The span of one call, named after its method (`credential.v1.CredentialService/GetToken`), a
/// child of the caller's span when the call carries one; none for a call not sampled.
pub(super) fn call_span(sampling: CallSampling, request: &http::Request<()>) -> tracing::Span {
    let parent = TraceContextPropagator::new().extract(&Headers(request.headers()));
    let caller = parent.span().span_context().clone();
    let caller_sampled = caller.is_valid().then(|| caller.is_sampled());
    if !sampling.sampled(caller_sampled, rand::random()) {
        return tracing::Span::none();
    }
    let path = request.uri().path();
    let method = path.strip_prefix('/').unwrap_or(path);
    let span = tracing::info_span!(
        "call",
        otel.name = method,
        otel.kind = "server",
        rpc.system = "grpc",
    );
    // Fails only for a span the subscriber does not trace; nothing to continue then.
    let _ = span.set_parent(parent);
    span
}

/// The call's HTTP/2 headers, read by the propagator.
struct Headers<'a>(&'a http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}
