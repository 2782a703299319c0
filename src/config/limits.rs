//! The bounds of the gRPC listener: flags ([`LimitSettings`]) and their checked values
//! ([`Limits`]). Each bound answers a way to exhaust the service's memory or file descriptors.

use std::time::Duration;

use clap::Args;

use super::{ConfigError, flag};

/// What one peer, or all of them together, may hold of the gRPC listener at once. Each bound
/// answers a way to exhaust the service's memory or file descriptors without credentials.
#[derive(Debug, Clone, Args)]
pub struct LimitSettings {
    /// Largest request message on every gRPC service (health and reflection too); a larger one is
    /// refused (OUT_OF_RANGE) before it is read.
    #[arg(long, env = "CREDENTIAL_SERVICE_MAX_REQUEST_BYTES", default_value_t = Limits::DEFAULT.max_request_bytes)]
    pub max_request_bytes: usize,

    /// Most gRPC connections open at once; one more is closed as soon as it is accepted.
    #[arg(long, env = "CREDENTIAL_SERVICE_MAX_CONNECTIONS", default_value_t = Limits::DEFAULT.max_connections)]
    pub max_connections: usize,

    /// Most concurrent calls (HTTP/2 streams) on one connection.
    #[arg(long, env = "CREDENTIAL_SERVICE_MAX_STREAMS_PER_CONNECTION", default_value_t = Limits::DEFAULT.max_streams_per_connection)]
    pub max_streams_per_connection: u32,

    /// Most calls by authenticated callers in progress at once over all connections; one more is
    /// refused with RESOURCE_EXHAUSTED, not queued.
    #[arg(long, env = "CREDENTIAL_SERVICE_MAX_CALLS_IN_FLIGHT", default_value_t = Limits::DEFAULT.max_calls_in_flight)]
    pub max_calls_in_flight: usize,

    /// Most calls to the methods anyone may call (health Watch, reflection) in progress at once,
    /// apart from `--max-calls-in-flight` so that they cannot lock callers out; one more is refused
    /// with RESOURCE_EXHAUSTED.
    #[arg(long, env = "CREDENTIAL_SERVICE_MAX_OPEN_CALLS_IN_FLIGHT", default_value_t = Limits::DEFAULT.max_open_calls_in_flight)]
    pub max_open_calls_in_flight: usize,

    /// Most health Watch streams open at once; one more is refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "CREDENTIAL_SERVICE_MAX_HEALTH_WATCHES", default_value_t = Limits::DEFAULT.max_health_watches)]
    pub max_health_watches: usize,

    /// Most WatchToken and WatchAccounts streams open at once, together; one more is refused
    /// with RESOURCE_EXHAUSTED.
    #[arg(long, env = "CREDENTIAL_SERVICE_MAX_WATCHERS", default_value_t = Limits::DEFAULT.max_watchers)]
    pub max_watchers: usize,

    /// Most WatchToken and WatchAccounts streams one caller (of the callers file) may hold open at
    /// once, so that one caller cannot take every place; one more is refused with
    /// RESOURCE_EXHAUSTED.
    #[arg(long, env = "CREDENTIAL_SERVICE_MAX_WATCHERS_PER_CALLER", default_value_t = Limits::DEFAULT.max_watchers_per_caller)]
    pub max_watchers_per_caller: usize,

    /// Places beyond --max-watchers that only WatchAccounts streams (admins) may take, so
    /// operators can still follow their accounts when callers' WatchToken streams take every
    /// place of --max-watchers.
    #[arg(long, env = "CREDENTIAL_SERVICE_WATCHERS_KEPT_FOR_ADMINS", default_value_t = Limits::DEFAULT.watchers_kept_for_admins)]
    pub watchers_kept_for_admins: usize,

    /// A connection that has not finished its TLS handshake and sent the HTTP/2 preface within
    /// this is closed.
    #[arg(long, env = "CREDENTIAL_SERVICE_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub handshake_timeout: Duration,

    /// Sends an HTTP/2 PING to a peer that has been silent this long, so dead peers are found.
    #[arg(long, env = "CREDENTIAL_SERVICE_HTTP2_KEEPALIVE_INTERVAL", default_value = "60s", value_parser = humantime::parse_duration)]
    pub http2_keepalive_interval: Duration,

    /// Closes a connection whose peer has not answered a keepalive PING within this.
    #[arg(long, env = "CREDENTIAL_SERVICE_HTTP2_KEEPALIVE_TIMEOUT", default_value = "20s", value_parser = humantime::parse_duration)]
    pub http2_keepalive_timeout: Duration,
}

/// The bounds of the gRPC listener, checked; see [`LimitSettings`] for what each means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_request_bytes: usize,
    pub max_connections: usize,
    pub max_streams_per_connection: u32,
    pub max_calls_in_flight: usize,
    pub max_open_calls_in_flight: usize,
    pub max_health_watches: usize,
    pub max_watchers: usize,
    pub max_watchers_per_caller: usize,
    pub watchers_kept_for_admins: usize,
    pub handshake_timeout: Duration,
    pub http2_keepalive_interval: Duration,
    pub http2_keepalive_timeout: Duration,
}

impl Limits {
    /// The production defaults (those of the flags).
    pub const DEFAULT: Self = Self {
        max_request_bytes: 16 * 1024,
        max_connections: 512,
        max_streams_per_connection: 100,
        max_calls_in_flight: 1024,
        max_open_calls_in_flight: 128,
        max_health_watches: 64,
        max_watchers: 10_000,
        max_watchers_per_caller: 1_000,
        watchers_kept_for_admins: 100,
        handshake_timeout: Duration::from_secs(10),
        http2_keepalive_interval: Duration::from_secs(60),
        http2_keepalive_timeout: Duration::from_secs(20),
    };
}

impl Default for Limits {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl LimitSettings {
    pub(super) fn resolve(&self) -> Result<Limits, ConfigError> {
        let counts = [
            (self.max_request_bytes, "max_request_bytes"),
            (self.max_connections, "max_connections"),
            (
                self.max_streams_per_connection as usize,
                "max_streams_per_connection",
            ),
            (self.max_calls_in_flight, "max_calls_in_flight"),
            (self.max_open_calls_in_flight, "max_open_calls_in_flight"),
            (self.max_health_watches, "max_health_watches"),
            (self.max_watchers, "max_watchers"),
            (self.max_watchers_per_caller, "max_watchers_per_caller"),
        ];
        for (value, id) in counts {
            if value == 0 {
                return Err(ConfigError(format!("{} must be at least 1", flag(id))));
            }
        }
        for (value, id) in [
            (self.handshake_timeout, "handshake_timeout"),
            (self.http2_keepalive_interval, "http2_keepalive_interval"),
            (self.http2_keepalive_timeout, "http2_keepalive_timeout"),
        ] {
            if value.is_zero() {
                return Err(ConfigError(format!(
                    "{} must be longer than zero",
                    flag(id)
                )));
            }
        }
        Ok(Limits {
            max_request_bytes: self.max_request_bytes,
            max_connections: self.max_connections,
            max_streams_per_connection: self.max_streams_per_connection,
            max_calls_in_flight: self.max_calls_in_flight,
            max_open_calls_in_flight: self.max_open_calls_in_flight,
            max_health_watches: self.max_health_watches,
            max_watchers: self.max_watchers,
            max_watchers_per_caller: self.max_watchers_per_caller,
            watchers_kept_for_admins: self.watchers_kept_for_admins,
            handshake_timeout: self.handshake_timeout,
            http2_keepalive_interval: self.http2_keepalive_interval,
            http2_keepalive_timeout: self.http2_keepalive_timeout,
        })
    }
}
