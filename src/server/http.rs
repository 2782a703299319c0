//! The optional HTTP listeners beside gRPC: the browser callback and `/metrics`. Each is bounded
//! like the gRPC listener, with budgets of its own (`--http-max-connections` each, apart from
//! gRPC's `--max-connections`), so slow or idle HTTP clients can never take the file descriptors
//! gRPC callers need: one more connection is closed as soon as it is accepted; a connection that
//! has not sent a whole request head within `--http-header-timeout` (from its start, or from its
//! previous answer) is closed, idle ones included; a head over `--http-max-header-bytes` is
//! answered 431 and closed. Each refusal counts in `credential_limit_hits_total` and is logged
//! at most once per ten seconds per bound. They stop when the shutdown starts, letting requests
//! in flight finish within a grace period.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use hyper::server::conn::http1;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::graceful::GracefulShutdown,
    service::TowerToHyperService,
};
use tokio::{
    net::TcpListener,
    sync::{Semaphore, watch},
    task::{JoinHandle, JoinSet},
};
use tower::Service;

use super::conn::Backoff;
use crate::{
    broker::Broker,
    callback,
    config::{HttpLimits, ServiceConfig},
    metrics::{self, Throttled},
};

/// How long HTTP requests in flight may take to finish once shutdown starts. A scrape or a callback
/// page takes milliseconds; an exchange the callback started completes on its own task anyway.
const HTTP_DRAIN_GRACE: Duration = Duration::from_secs(5);

pub(super) static HTTP_REFUSED: Throttled = Throttled::new(
    "http_connections",
    "HTTP connection refused: too many open on this listener (--http-max-connections / CREDENTIAL_SERVICE_HTTP_MAX_CONNECTIONS)",
);
pub(super) static HTTP_TIMED_OUT: Throttled = Throttled::new(
    "http_header_timeout",
    "HTTP connection closed: no whole request head in time (--http-header-timeout / CREDENTIAL_SERVICE_HTTP_HEADER_TIMEOUT)",
);
pub(super) static HTTP_TOO_LARGE: Throttled = Throttled::new(
    "http_header_too_large",
    "HTTP request refused (431): its head is too large (--http-max-header-bytes / CREDENTIAL_SERVICE_HTTP_MAX_HEADER_BYTES)",
);

/// The running HTTP listeners and the switch that stops them.
pub(super) struct HttpListeners {
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl HttpListeners {
    /// Serves the callback and metrics routers on the listeners the caller bound (either may be absent).
    pub(super) fn spawn(
        callback: Option<TcpListener>,
        metrics: Option<TcpListener>,
        config: &ServiceConfig,
        broker: &Broker,
    ) -> Self {
        let (stop, stopped) = watch::channel(false);
        let limits = config.http_limits;
        let mut tasks = Vec::new();
        if let Some(listener) = callback {
            let path = config
                .callback
                .as_ref()
                .map_or("/oauth/callback", |c| c.path.as_str());
            tracing::info!(
                addr = %local_addr(&listener),
                path,
                max_connections = limits.max_connections,
                "browser callback serving"
            );
            let router = callback::router(broker.clone(), path);
            tasks.push(tokio::spawn(serve_http(
                listener,
                router,
                stopped.clone(),
                limits,
            )));
        }
        if let Some(listener) = metrics {
            tracing::info!(
                addr = %local_addr(&listener),
                max_connections = limits.max_connections,
                "metrics serving at /metrics"
            );
            let gauges = broker.clone();
            let router = metrics::router(move || gauges.account_gauges());
            tasks.push(tokio::spawn(serve_http(
                listener,
                router,
                stopped.clone(),
                limits,
            )));
        }
        Self { stop, tasks }
    }

    /// Stops accepting; requests in flight go on. Idempotent.
    pub(super) fn stop(&self) {
        self.stop.send_replace(true);
    }

    /// Stops and waits until every listener has finished, or [`HTTP_DRAIN_GRACE`] has passed:
    /// a connection that never completes its request (a slow or stalled client) must not hold up
    /// the rest of the shutdown (the audit's last counts, refreshes in flight, the store's close).
    pub(super) async fn finish(self) {
        self.stop();
        let mut tasks = self.tasks;
        // An HTTP listener's failure is logged where it happens; the store still closes cleanly.
        let all = futures::future::join_all(tasks.iter_mut());
        if tokio::time::timeout(HTTP_DRAIN_GRACE, all).await.is_err() {
            tracing::warn!(
                grace = ?HTTP_DRAIN_GRACE,
                "HTTP connections still open after the grace period; closing them"
            );
            for task in &tasks {
                task.abort(); // its connections are in its JoinSet: they go with it
            }
        }
    }
}

fn local_addr(listener: &TcpListener) -> String {
    listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default()
}

/// Serves an HTTP/1 router within `limits` until `stop` turns true, then lets the requests in
/// flight finish (idle connections close at once).
async fn serve_http(
    listener: TcpListener,
    router: axum::Router,
    mut stop: watch::Receiver<bool>,
    limits: HttpLimits,
) {
    // Each connection's service carries the peer's address, for the audit of refusals.
    let mut services = router.into_make_service_with_connect_info::<SocketAddr>();
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(limits.max_header_bytes);
    let open = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    // Owned here, so that aborting this task (past the drain grace) closes every connection.
    let mut connections = JoinSet::new();
    let mut backoff = Backoff::default();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.wait_for(|stop| *stop) => break,
            Some(_) = connections.join_next() => continue,
        };
        let (tcp, peer) = match accepted {
            Ok(accepted) => {
                backoff.reset();
                accepted
            }
            Err(e) if super::conn::is_per_connection(&e) => continue,
            Err(e) => {
                backoff.wait(&e).await;
                continue;
            }
        };
        let Ok(permit) = open.clone().try_acquire_owned() else {
            HTTP_REFUSED.hit();
            continue; // dropping it closes it
        };
        let Ok(service) = services.call(peer).await;
        let connection =
            http.serve_connection(TokioIo::new(tcp), TowerToHyperService::new(service));
        let connection = graceful.watch(connection);
        connections.spawn(async move {
            let _permit = permit;
            if let Err(e) = connection.await {
                if e.is_timeout() {
                    HTTP_TIMED_OUT.hit();
                } else if e.is_parse_too_large() {
                    HTTP_TOO_LARGE.hit();
                } else {
                    tracing::debug!(error = %e, "HTTP connection ended with an error");
                }
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    while connections.join_next().await.is_some() {}
}
