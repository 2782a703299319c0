//! The bounds of the HTTP listeners (browser callback, `/metrics`): flags ([`HttpLimitSettings`])
//! and their checked values ([`HttpLimits`]). Each listener has its own connection budget, apart
//! from the gRPC listener's, so that slow or idle HTTP clients can never take the descriptors
//! gRPC callers need.

use std::time::Duration;

use clap::Args;

use super::{ConfigError, flag};

/// The smallest header limit hyper's HTTP/1 server accepts (its `max_buf_size`).
const MIN_HEADER_BYTES: usize = 8192;

/// What clients of each HTTP listener may hold at once.
#[derive(Debug, Clone, Args)]
pub struct HttpLimitSettings {
    /// Most connections open at once on each HTTP listener (browser callback, metrics), apart
    /// from gRPC's --max-connections; one more is closed as soon as it is accepted.
    #[arg(long, env = "CREDENTIAL_SERVICE_HTTP_MAX_CONNECTIONS", default_value_t = HttpLimits::DEFAULT.max_connections)]
    pub http_max_connections: usize,

    /// An HTTP connection that has not sent a whole request head within this (from its start, or
    /// from its previous answer) is closed, idle ones included.
    #[arg(long, env = "CREDENTIAL_SERVICE_HTTP_HEADER_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub http_header_timeout: Duration,

    /// Largest request head (request line and headers) on the HTTP listeners; a larger one is
    /// answered 431 and the connection closed. At least 8192.
    #[arg(long, env = "CREDENTIAL_SERVICE_HTTP_MAX_HEADER_BYTES", default_value_t = HttpLimits::DEFAULT.max_header_bytes)]
    pub http_max_header_bytes: usize,
}

/// The bounds of each HTTP listener, checked; see [`HttpLimitSettings`] for what each means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub max_header_bytes: usize,
}

impl HttpLimits {
    /// The production defaults (those of the flags). A browser's request head is a few KiB,
    /// cookies of the callback's domain included; a scrape's is smaller.
    pub const DEFAULT: Self = Self {
        max_connections: 64,
        header_timeout: Duration::from_secs(10),
        max_header_bytes: 16 * 1024,
    };
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl HttpLimitSettings {
    pub(super) fn resolve(&self) -> Result<HttpLimits, ConfigError> {
        if self.http_max_connections == 0 {
            return Err(ConfigError(format!(
                "{} must be at least 1",
                flag("http_max_connections")
            )));
        }
        if self.http_header_timeout.is_zero() {
            return Err(ConfigError(format!(
                "{} must be longer than zero",
                flag("http_header_timeout")
            )));
        }
        if self.http_max_header_bytes < MIN_HEADER_BYTES {
            return Err(ConfigError(format!(
                "{} must be at least {MIN_HEADER_BYTES}",
                flag("http_max_header_bytes")
            )));
        }
        Ok(HttpLimits {
            max_connections: self.http_max_connections,
            header_timeout: self.http_header_timeout,
            max_header_bytes: self.http_max_header_bytes,
        })
    }
}
