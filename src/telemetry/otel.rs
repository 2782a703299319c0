//! OpenTelemetry export of the service's `tracing` spans over OTLP/gRPC (tonic, the service's own),
//! batched on the SDK's background thread. Only spans and events at INFO and above reach it, the
//! levels whose fields are written for operators and hold no secret; no span of the HTTP or gRPC
//! libraries does.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::{Resource, trace::SdkTracerProvider};
use tracing_subscriber::{Layer, filter::LevelFilter, registry::LookupSpan};

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
            .with_sampler(config.sampler.clone())
            .with_resource(resource)
            .build();
        Ok(Self { provider })
    }

    /// The `tracing` layer that turns spans into OpenTelemetry spans. Source locations, thread
    /// names and busy/idle timings are left out: each would cost every traced call for little.
    pub(super) fn layer<S>(&self) -> impl Layer<S> + use<S>
    where
        S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    {
        tracing_opentelemetry::layer()
            .with_tracer(self.provider.tracer("credential-service"))
            .with_location(false)
            .with_threads(false)
            .with_tracked_inactivity(false)
            .with_filter(LevelFilter::INFO)
    }

    /// Sends what is queued, then stops.
    pub(super) fn shutdown(self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!(error = %e, "traces not all exported at shutdown");
        }
    }
}
