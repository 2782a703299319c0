//! Log set-up shared by the binaries: `RUST_LOG` picks levels (default `info`), `--log-format`
//! picks text or JSON lines. Spans carry the account; secrets are never fields. With an OTLP
//! endpoint set, spans are exported as OpenTelemetry traces too (`otel`).

mod otel;

use std::io::IsTerminal;

use tracing_subscriber::{EnvFilter, Layer, fmt, prelude::*};

pub use self::otel::OtelError;
use crate::config::{LogFormat, OtelConfig, OtelSettings};

/// The installed subscriber's exporter, if traces are on: [`Telemetry::shutdown`] sends the spans
/// still queued before the process exits.
#[must_use = "shut it down before exiting, or the last spans are lost"]
pub struct Telemetry {
    traces: Option<otel::Traces>,
}

impl Telemetry {
    /// Exports the spans still queued (bounded by the exporter's timeout) and stops exporting.
    pub fn shutdown(self) {
        if let Some(traces) = self.traces {
            traces.shutdown();
        }
    }
}

/// Installs the global subscriber. Call once, first thing in `main`, inside the tokio runtime
/// (the OTLP exporter runs on it).
pub fn init(format: LogFormat, otel: &OtelSettings) -> Result<Telemetry, OtelError> {
    let otel = otel.resolve()?;
    init_to(
        format,
        std::io::stderr,
        std::io::stderr().is_terminal(),
        otel.as_ref(),
    )
}

/// [`init`], writing to `writer`: the benchmark suite keeps the logs' full cost on the hot path
/// but sends the lines to a file, so its tables on the terminal stay readable.
pub fn init_to<W>(
    format: LogFormat,
    writer: W,
    ansi: bool,
    otel: Option<&OtelConfig>,
) -> Result<Telemetry, OtelError>
where
    W: for<'w> fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let Some(otel) = otel else {
        // Traces off: one global filter, as before traces existed; nothing else on any path.
        let registry = tracing_subscriber::registry().with(filter);
        match format {
            LogFormat::Text => registry
                .with(fmt::layer().with_ansi(ansi).with_writer(writer))
                .init(),
            LogFormat::Json => registry.with(json(writer)).init(),
        }
        return Ok(Telemetry { traces: None });
    };
    // Traces on: `RUST_LOG` filters the log lines only, so that quieter logs keep the spans.
    let traces = otel::Traces::start(otel)?;
    let registry = tracing_subscriber::registry().with(traces.layer());
    match format {
        LogFormat::Text => registry
            .with(
                fmt::layer()
                    .with_ansi(ansi)
                    .with_writer(writer)
                    .with_filter(filter),
            )
            .init(),
        LogFormat::Json => registry.with(json(writer).with_filter(filter)).init(),
    }
    crate::traces::enable();
    Ok(Telemetry {
        traces: Some(traces),
    })
}

/// JSON lines: the event's fields and its span's (the account), not the whole span list.
fn json<S, W>(
    writer: W,
) -> fmt::Layer<S, fmt::format::JsonFields, fmt::format::Format<fmt::format::Json>, W>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    W: for<'w> fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    fmt::layer()
        .json()
        .with_current_span(true)
        .with_span_list(false)
        .with_writer(writer)
}
