//! OpenTelemetry export of the service's `tracing` spans over OTLP/gRPC (tonic, the service's own),
//! batched on the SDK's background thread. Only spans and events at INFO and above reach it, the
//! levels whose fields are written for operators and hold no secret; no span of the HTTP or gRPC
//! libraries does, and none outside a sampled call or a refresh.

use opentelemetry::{
    KeyValue,
    trace::{Link, SpanKind, TraceContextExt, TraceId, TracerProvider as _},
};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::{
    Resource,
    trace::{Sampler, SamplingDecision, SamplingResult, SdkTracerProvider, ShouldSample},
};
use tracing::{Level, Metadata, subscriber::Interest};
use tracing_subscriber::{Layer, filter, layer::Context, registry::LookupSpan};

use crate::config::{ConfigError, OtelConfig};

/// Why traces could not be set up as configured.
#[derive(Debug, thiserror::Error)]
pub enum OtelError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The OTLP exporter refused its settings (the endpoint, in practice).
    #[error("OTLP exporter (--otel-endpoint / OTEL_EXPORTER_OTLP_ENDPOINT): {0}")]
    Exporter(String),
}

/// The configured sampler, except that a call's span is always kept: it is made only for a call
/// already sampled (`server::trace` applies the same sampler first).
#[derive(Clone, Debug)]
struct CallsDecided(Sampler);

impl ShouldSample for CallsDecided {
    fn should_sample(
        &self,
        parent_context: Option<&opentelemetry::Context>,
        trace_id: TraceId,
        name: &str,
        span_kind: &SpanKind,
        attributes: &[KeyValue],
        links: &[Link],
    ) -> SamplingResult {
        if *span_kind != SpanKind::Server {
            return self.0.should_sample(
                parent_context,
                trace_id,
                name,
                span_kind,
                attributes,
                links,
            );
        }
        let trace_state = parent_context
            .filter(|cx| cx.has_active_span())
            .map(|cx| cx.span().span_context().trace_state().clone())
            .unwrap_or_default();
        SamplingResult {
            decision: SamplingDecision::RecordAndSample,
            attributes: Vec::new(),
            trace_state,
        }
    }
}

/// The tracer provider behind the subscriber's OpenTelemetry layer.
pub(super) struct Traces {
    provider: SdkTracerProvider,
}

impl Traces {
    /// Connects lazily: an unreachable collector costs dropped spans, never a failed start.
    pub(super) fn start(config: &OtelConfig) -> Result<Self, OtelError> {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(config.endpoint.as_str())
            .build()
            .map_err(|e| OtelError::Exporter(e.to_string()))?;
        let resource = Resource::builder()
            .with_service_name(config.service_name.clone())
            .build();
        // The batch's size and delay follow the standard OTEL_BSP_* variables.
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_sampler(CallsDecided(config.sampler.clone()))
            .with_resource(resource)
            .build();
        Ok(Self { provider })
    }

    /// The `tracing` layer that turns spans into OpenTelemetry spans. Source locations, thread
    /// names and busy/idle timings are left out: each would cost every traced call for little.
    /// It takes a span only inside a call's span, or a refresh (which may start a trace of its
    /// own, as the scheduler's do), and events only inside those: the spans of a call that was
    /// not sampled (none was made) are left out with it.
    pub(super) fn layer<S>(&self) -> impl Layer<S> + use<S>
    where
        S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    {
        let traced = filter::dynamic_filter_fn(|meta: &Metadata<'_>, cx: &Context<'_, S>| {
            let starts_trace = meta.is_span()
                && matches!(
                    (meta.target(), meta.name()),
                    ("credential_service::server::trace", "call")
                        | ("credential_service::broker::refresh", "refresh")
                );
            meta.level() <= &Level::INFO && (starts_trace || cx.lookup_current().is_some())
        })
        .with_callsite_filter(|meta| {
            if meta.level() <= &Level::INFO {
                Interest::sometimes()
            } else {
                Interest::never()
            }
        });
        tracing_opentelemetry::layer()
            .with_tracer(self.provider.tracer("credential-service"))
            .with_location(false)
            .with_threads(false)
            .with_tracked_inactivity(false)
            .with_filter(traced)
    }

    /// Sends what is queued, then stops.
    pub(super) fn shutdown(self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!(error = %e, "traces not all exported at shutdown");
        }
    }
}
