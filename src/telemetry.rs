//! Log set-up shared by the binaries: `RUST_LOG` picks levels (default `info`), `--log-format`
//! picks text or JSON lines. Spans carry the account; secrets are never fields.

use std::io::IsTerminal;

use tracing_subscriber::{EnvFilter, fmt, prelude::*};

use crate::config::LogFormat;

/// Installs the global subscriber. Call once, first thing in `main`.
pub fn init(format: LogFormat) {
    init_to(format, std::io::stderr, std::io::stderr().is_terminal());
}

/// [`init`], writing to `writer`: the benchmark suite keeps the logs' full cost on the hot path
/// but sends the lines to a file, so its tables on the terminal stay readable.
pub fn init_to<W>(format: LogFormat, writer: W, ansi: bool)
where
    W: for<'w> fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Text => registry
            .with(fmt::layer().with_ansi(ansi).with_writer(writer))
            .init(),
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .with_current_span(true)
                    .with_span_list(false)
                    .with_writer(writer),
            )
            .init(),
    }
}
