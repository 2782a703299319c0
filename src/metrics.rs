//! Prometheus metrics (`/metrics` on `--metrics-listen`), through the official `prometheus-client`.
//!
//! One process-wide set of series, fed from where things happen: the server's call layer, through
//! [`RpcCall`] (calls by method and status code, with latency), the EdgeTag client (upstream requests by
//! operation and HTTP status, refreshes by outcome), the broker (single-flight waiters, background
//! refresh lag via [`record_refresh_lag`]); accounts by status are counted at scrape time by a
//! closure the server hands to [`router`], so this module sits below everything it measures. The
//! hot path costs an array lookup of the (method, code) series and an uncontended histogram lock:
//! no allocation, no hashing.

mod throttled;

pub use self::throttled::{LOG_EVERY, Throttled};

use std::{
    sync::{
        LazyLock, OnceLock,
        atomic::{AtomicI64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use axum::{
    Router,
    http::{self, HeaderValue, header},
    response::IntoResponse,
    routing::get,
};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::Histogram,
    },
    registry::Registry,
};
use std::sync::atomic::AtomicU64;
use tonic::Code;

use credential_client::code_name;

/// The `Content-Type` of the OpenMetrics text format that `prometheus-client` writes.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The gRPC methods served, as (path, service, method). Anything else is counted as `unknown`,
/// so a client cannot grow the label set.
const METHODS: &[(&str, &str, &str)] = &[
    (
        "/credential.v1.CredentialService/BeginAuth",
        "credential.v1.CredentialService",
        "BeginAuth",
    ),
    (
        "/credential.v1.CredentialService/CompleteAuth",
        "credential.v1.CredentialService",
        "CompleteAuth",
    ),
    (
        "/credential.v1.CredentialService/GetToken",
        "credential.v1.CredentialService",
        "GetToken",
    ),
    (
        "/credential.v1.CredentialService/WatchToken",
        "credential.v1.CredentialService",
        "WatchToken",
    ),
    (
        "/credential.v1.CredentialService/WatchAccounts",
        "credential.v1.CredentialService",
        "WatchAccounts",
    ),
    (
        "/credential.v1.CredentialService/ListAccounts",
        "credential.v1.CredentialService",
        "ListAccounts",
    ),
    (
        "/credential.v1.CredentialService/DescribeAccount",
        "credential.v1.CredentialService",
        "DescribeAccount",
    ),
    (
        "/credential.v1.CredentialService/RemoveAccount",
        "credential.v1.CredentialService",
        "RemoveAccount",
    ),
    (
        "/credential.v1.CredentialService/RefreshToken",
        "credential.v1.CredentialService",
        "RefreshToken",
    ),
    (
        "/credential.v1.CredentialService/ResealRecords",
        "credential.v1.CredentialService",
        "ResealRecords",
    ),
    (
        "/credential.v1.CredentialService/Backup",
        "credential.v1.CredentialService",
        "Backup",
    ),
    (
        "/credential.v1.CredentialService/ImportGrant",
        "credential.v1.CredentialService",
        "ImportGrant",
    ),
    (
        "/grpc.health.v1.Health/Check",
        "grpc.health.v1.Health",
        "Check",
    ),
    (
        "/grpc.health.v1.Health/Watch",
        "grpc.health.v1.Health",
        "Watch",
    ),
    (
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        "grpc.reflection.v1.ServerReflection",
        "ServerReflectionInfo",
    ),
    (
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        "grpc.reflection.v1alpha.ServerReflection",
        "ServerReflectionInfo",
    ),
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    service: &'static str,
    method: &'static str,
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamLabels {
    operation: &'static str,
    /// The HTTP status, or `timeout` / `unreachable` when there was no answer.
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabels {
    limit: &'static str,
}

struct Metrics {
    registry: Registry,
    rpc: Family<RpcLabels, Histogram>,
    upstream: Family<UpstreamLabels, Histogram>,
    refreshes: Family<OutcomeLabels, Counter>,
    accounts: Family<StatusLabels, Gauge>,
    unpersisted: Gauge,
    waiters: Gauge,
    refresh_lag: Gauge<f64, AtomicU64>,
    limit_hits: Family<LimitLabels, Counter>,
    connections: Gauge,
    store_up: Gauge,
    audit_lost: Counter,
    audit_writable: Gauge,
}

/// Latency buckets from 100µs (a GetToken from memory) to 10s (the default upstream timeout).
fn latency_buckets() -> impl Iterator<Item = f64> {
    [
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        5.0, 10.0,
    ]
    .into_iter()
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let mut registry = Registry::with_prefix("credential");
    let rpc = Family::<RpcLabels, Histogram>::new_with_constructor(
        (|| Histogram::new(latency_buckets())) as fn() -> Histogram,
    );
    let upstream = Family::<UpstreamLabels, Histogram>::new_with_constructor(
        (|| Histogram::new(latency_buckets())) as fn() -> Histogram,
    );
    let refreshes = Family::<OutcomeLabels, Counter>::default();
    let accounts = Family::<StatusLabels, Gauge>::default();
    let unpersisted = Gauge::default();
    let waiters = Gauge::default();
    let refresh_lag = Gauge::<f64, AtomicU64>::default();
    let limit_hits = Family::<LimitLabels, Counter>::default();
    let connections = Gauge::default();
    let store_up = Gauge::default();
    store_up.set(1);
    let audit_lost = Counter::default();
    let audit_writable = Gauge::default();
    audit_writable.set(1);
    registry.register(
        "rpc_duration_seconds",
        "gRPC calls by service, method and status code, with their latency (the _count is the number of calls)",
        rpc.clone(),
    );
    registry.register(
        "upstream_request_duration_seconds",
        "Requests to EdgeTag by operation (exchange_code, refresh, revoke) and HTTP status, with their latency",
        upstream.clone(),
    );
    registry.register(
        "refreshes",
        "Refresh requests to EdgeTag by outcome (succeeded, rejected, client_rejected, unavailable, malformed)",
        refreshes.clone(),
    );
    registry.register(
        "accounts",
        "Connected accounts by status (active, needs_reauth, refreshing_failed)",
        accounts.clone(),
    );
    registry.register(
        "accounts_unpersisted",
        "Accounts whose refreshed tokens the disk refused: held back, written again each scheduler pass; \
         unhealthy until 0, since the old refresh token may be dead at EdgeTag",
        unpersisted.clone(),
    );
    registry.register(
        "single_flight_waiters",
        "Callers waiting right now on a refresh in flight (the caller that started it included)",
        waiters.clone(),
    );
    registry.register(
        "refresh_lag_seconds",
        "How late the most recent background refresh started after it was due",
        refresh_lag.clone(),
    );
    registry.register(
        "limit_hits",
        "Connections or calls refused, or connections closed, by the listener's bounds (connections, \
         calls_in_flight, health_watches, handshake_timeout, accept_errors), and refreshes that found no place for \
         an EdgeTag request in time (upstream_queue)",
        limit_hits.clone(),
    );
    registry.register(
        "grpc_connections",
        "gRPC connections open now (handshakes in progress included)",
        connections.clone(),
    );
    registry.register(
        "store_up",
        "1 while the shared store (PostgreSQL) answers, 0 while it is unreachable: tokens are then served \
         from memory while they last, and refreshes and writes fail (always 1 on sled)",
        store_up.clone(),
    );
    registry.register(
        "audit_events_lost",
        "Audit lines that could not be written to --audit-file (without --audit-required: the calls were served)",
        audit_lost.clone(),
    );
    registry.register(
        "audit_file_writable",
        "0 while --audit-file cannot be written (with --audit-required, audited calls are then refused), else 1",
        audit_writable.clone(),
    );
    registry.register_collector(Box::new(TlsExpiry));
    Metrics {
        registry,
        rpc,
        upstream,
        refreshes,
        accounts,
        unpersisted,
        waiters,
        refresh_lag,
        limit_hits,
        connections,
        store_up,
        audit_lost,
        audit_writable,
    }
});

/// The index of a request path in [`METHODS`] (`METHODS.len()` for `unknown`) and its labels.
fn method_entry(path: &str) -> (usize, &'static str, &'static str) {
    METHODS
        .iter()
        .position(|(p, _, _)| *p == path)
        .map_or((METHODS.len(), "unknown", "unknown"), |i| {
            (i, METHODS[i].1, METHODS[i].2)
        })
}

/// gRPC status codes: 0 (OK) to 16 (UNAUTHENTICATED).
const CODES: usize = 17;

/// Each (method, code) series' histogram, looked up in the family once: the hot path then costs
/// two array indexings instead of hashing the labels under the family's lock on every call.
static RPC_SERIES: LazyLock<Vec<[OnceLock<Histogram>; CODES]>> = LazyLock::new(|| {
    (0..=METHODS.len())
        .map(|_| std::array::from_fn(|_| OnceLock::new()))
        .collect()
});

/// The status of a gRPC answer: its `grpc-status` header (trailers-only answers: every error),
/// else OK (an answer with a body; its status follows in trailers).
pub fn grpc_status(headers: &http::HeaderMap) -> Code {
    headers
        .get(tonic::Status::GRPC_STATUS)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map_or(Code::Ok, Code::from_i32)
}

fn observe_rpc(
    index: usize,
    service: &'static str,
    method: &'static str,
    code: Code,
    elapsed: Duration,
) {
    let code_index = usize::try_from(code as i32).map_or(CODES, |c| c.min(CODES - 1));
    let series = || {
        METRICS.rpc.get_or_create_owned(&RpcLabels {
            service,
            method,
            code: code_name(code),
        })
    };
    match RPC_SERIES.get(index).and_then(|m| m.get(code_index)) {
        Some(cell) => cell.get_or_init(series).observe(elapsed.as_secs_f64()),
        None => series().observe(elapsed.as_secs_f64()),
    }
}

/// Records one request to EdgeTag; `status` is the HTTP status, or `None` when none arrived
/// (`timed_out` then tells a timeout from a failed connection).
pub fn observe_upstream(
    operation: &'static str,
    status: Option<u16>,
    timed_out: bool,
    elapsed: Duration,
) {
    let status = match status {
        Some(s) => s.to_string(),
        None if timed_out => "timeout".to_owned(),
        None => "unreachable".to_owned(),
    };
    METRICS
        .upstream
        .get_or_create(&UpstreamLabels { operation, status })
        .observe(elapsed.as_secs_f64());
}

/// Records how a refresh request to EdgeTag ended.
pub fn record_refresh(outcome: &'static str) {
    METRICS
        .refreshes
        .get_or_create(&OutcomeLabels { outcome })
        .inc();
}

/// For the background refresh engine: how late a refresh started after it was due (zero when on
/// time). Exposed as `credential_refresh_lag_seconds`.
pub fn record_refresh_lag(lag: Duration) {
    METRICS.refresh_lag.set(lag.as_secs_f64());
}

/// Counts one refusal by a bound (of a listener, or of watch streams); `limit` names it.
pub fn record_limit_hit(limit: &'static str) {
    METRICS
        .limit_hits
        .get_or_create(&LimitLabels { limit })
        .inc();
}

/// Counts audit lines that never reached `--audit-file`.
pub fn record_audit_lost(lines: u64) {
    METRICS.audit_lost.inc_by(lines);
}

/// Whether `--audit-file` can be written (see the `audit_file_writable` gauge).
pub fn set_audit_writable(writable: bool) {
    METRICS.audit_writable.set(i64::from(writable));
}

/// Whether the shared store answers (see the `store_up` gauge).
pub fn set_store_up(up: bool) {
    METRICS.store_up.set(i64::from(up));
}

/// The served TLS certificate's not-after in Unix seconds; [`NO_CERTIFICATE`] without TLS.
static TLS_EXPIRY: AtomicI64 = AtomicI64::new(NO_CERTIFICATE);
const NO_CERTIFICATE: i64 = i64::MIN;

/// `credential_tls_certificate_expiry_timestamp_seconds`, present only once a certificate is
/// served: without TLS there is no series, rather than a 0 an alert would take for an expiry.
#[derive(Debug)]
struct TlsExpiry;

impl Collector for TlsExpiry {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let not_after = TLS_EXPIRY.load(Ordering::Relaxed);
        if not_after == NO_CERTIFICATE {
            return Ok(());
        }
        let gauge = ConstGauge::new(not_after);
        let metric = encoder.encode_descriptor(
            "tls_certificate_expiry_timestamp_seconds",
            "When the TLS certificate the gRPC listener serves expires (its not-after), in Unix seconds; \
             follows the certificate files as they are reloaded",
            None,
            gauge.metric_type(),
        )?;
        gauge.encode(metric)
    }
}

/// The certificate now served expires at `not_after`.
pub fn set_tls_certificate_expiry(not_after: SystemTime) {
    let secs = match not_after.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(_) => 0,
    };
    TLS_EXPIRY.store(secs, Ordering::Relaxed);
}

/// Counts an open gRPC connection for as long as it lives.
#[must_use = "the connection counts as open only while the guard lives"]
pub struct ConnectionGuard(());

/// Call when a gRPC connection is accepted; drop the guard when it closes.
pub fn grpc_connection() -> ConnectionGuard {
    METRICS.connections.inc();
    ConnectionGuard(())
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        METRICS.connections.dec();
    }
}

/// Counts a caller waiting on a shared refresh for as long as it lives.
#[must_use = "the caller counts as waiting only while the guard lives"]
pub struct WaiterGuard(());

/// Call where a caller starts awaiting a single-flight refresh; drop the guard when it returns.
pub fn single_flight_waiter() -> WaiterGuard {
    METRICS.waiters.inc();
    WaiterGuard(())
}

impl Drop for WaiterGuard {
    fn drop(&mut self) {
        METRICS.waiters.dec();
    }
}

/// Accounts by status, counted at scrape time by whoever owns the accounts (the broker), so this
/// module needs to know nothing above it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AccountGauges {
    pub active: i64,
    pub needs_reauth: i64,
    /// Still served, but the latest refresh failed.
    pub refreshing_failed: i64,
    /// Refreshed token sets the store has not accepted yet.
    pub unpersisted: i64,
}

/// The text a scrape returns, with the account gauges set from `accounts`.
pub fn encode(accounts: &AccountGauges) -> String {
    for (status, n) in [
        ("active", accounts.active),
        ("needs_reauth", accounts.needs_reauth),
        ("refreshing_failed", accounts.refreshing_failed),
    ] {
        METRICS
            .accounts
            .get_or_create(&StatusLabels { status })
            .set(n);
    }
    METRICS.unpersisted.set(accounts.unpersisted);
    let mut text = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut text, &METRICS.registry);
    text
}

/// The `/metrics` endpoint; `accounts` is called once per scrape.
pub fn router<F>(accounts: F) -> Router
where
    F: Fn() -> AccountGauges + Clone + Send + Sync + 'static,
{
    Router::new().route(
        "/metrics",
        get(move || async move {
            (
                [(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE))],
                encode(&accounts()),
            )
                .into_response()
        }),
    )
}

/// One gRPC call being timed, from its arrival to its answer's head, then recorded by method and
/// status code. The server's call layer (`server::limits`) makes one per call.
#[derive(Debug)]
pub struct RpcCall {
    index: usize,
    service: &'static str,
    method: &'static str,
    started: Instant,
}

impl RpcCall {
    /// Starts timing a call to `path` (an unknown path is labelled `unknown`).
    pub fn start(path: &str) -> Self {
        let (index, service, method) = method_entry(path);
        Self {
            index,
            service,
            method,
            started: Instant::now(),
        }
    }

    /// The called method's name from the table of served methods (`unknown` for any other path):
    /// what logs and audit events may name without echoing client input.
    pub fn method(&self) -> &'static str {
        self.method
    }

    /// Records the call with `code`: for an answer, [`grpc_status`] of its head, so streams count
    /// when they start.
    pub fn finish(&self, code: Code) {
        observe_rpc(
            self.index,
            self.service,
            self.method,
            code,
            self.started.elapsed(),
        );
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    #[test]
    fn every_method_of_the_contract_has_its_own_label() {
        let set =
            prost_types::FileDescriptorSet::decode(crate::proto::FILE_DESCRIPTOR_SET).unwrap();
        let file = set
            .file
            .iter()
            .find(|f| f.name() == "credential/v1/credential.proto")
            .unwrap();
        let mut n = 0;
        for service in &file.service {
            for method in &service.method {
                let path = format!("/credential.v1.{}/{}", service.name(), method.name());
                assert!(
                    METHODS
                        .iter()
                        .any(|(p, _, m)| *p == path && m == &method.name()),
                    "{path} is missing from METHODS"
                );
                n += 1;
            }
        }
        assert_eq!(n, 12);
    }
}
