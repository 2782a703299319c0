//! The optional HTTP listeners beside gRPC: the browser callback and `/metrics`. They stop when
//! the shutdown starts, letting requests in flight finish within a grace period.

use std::time::Duration;

use tokio::{net::TcpListener, sync::watch, task::JoinHandle};

use crate::{broker::Broker, callback, config::ServiceConfig, metrics};

/// How long HTTP requests in flight may take to finish once shutdown starts. A scrape or a callback
/// page takes milliseconds; an exchange the callback started completes on its own task anyway.
const HTTP_DRAIN_GRACE: Duration = Duration::from_secs(5);

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
        let mut tasks = Vec::new();
        if let Some(listener) = callback {
            let path = config
                .callback
                .as_ref()
                .map_or("/oauth/callback", |c| c.path.as_str());
            tracing::info!(addr = %local_addr(&listener), path, "browser callback serving");
            let router = callback::router(broker.clone(), path);
            tasks.push(tokio::spawn(serve_http(listener, router, stopped.clone())));
        }
        if let Some(listener) = metrics {
            tracing::info!(addr = %local_addr(&listener), "metrics serving at /metrics");
            let gauges = broker.clone();
            let router = metrics::router(move || gauges.account_gauges());
            tasks.push(tokio::spawn(serve_http(listener, router, stopped.clone())));
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
                task.abort();
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

/// Serves an HTTP router until `stop` turns true, letting requests in flight finish.
async fn serve_http(listener: TcpListener, router: axum::Router, mut stop: watch::Receiver<bool>) {
    // The peer's address is for the audit of refusals.
    let router = router.into_make_service_with_connect_info::<std::net::SocketAddr>();
    let served = axum::serve(listener, router)
        .with_graceful_shutdown(async move {
            let _ = stop.wait_for(|stop| *stop).await;
        })
        .await;
    if let Err(e) = served {
        tracing::error!(error = %e, "HTTP listener failed");
    }
}
