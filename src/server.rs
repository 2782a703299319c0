//! Assembles the service and serves it: store, provider client, broker, the gRPC service with
//! health and reflection (v1 and v1alpha, for grpcurl 1.8), the optional HTTP listeners (browser
//! callback, metrics), background upkeep and graceful shutdown.

use std::{future::Future, net::SocketAddr, time::Duration};

use tokio::{net::TcpListener, sync::watch};
use tonic::transport::{Server, server::TcpIncoming};

use crate::{
    broker::Broker,
    callback,
    clock::Clock,
    config::ServiceConfig,
    metrics::{self, RpcMetricsLayer},
    oauth::ProviderClient,
    proto::{self, credential_service_server::CredentialServiceServer},
    service::CredentialApi,
    store::{Store, StoreError},
};

/// Requests are tiny (an account name, a code and a state); anything bigger is refused unread.
pub const MAX_REQUEST_BYTES: usize = 16 * 1024;

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot build the HTTP client for EdgeTag: {0}")]
    HttpClient(#[from] reqwest::Error),
    #[error("cannot build the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("gRPC transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// The sockets the service serves on: gRPC, and the optional HTTP ones.
pub struct Listeners {
    pub grpc: TcpListener,
    /// The browser callback (path from `config.callback`, else `/oauth/callback`).
    pub callback: Option<TcpListener>,
    /// `/metrics`.
    pub metrics: Option<TcpListener>,
}

/// Binds `addr`; the error names the setting (`what`) so the operator knows which to fix.
pub async fn bind(addr: SocketAddr, what: &'static str) -> Result<TcpListener, ServeError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { what, addr, source })
}

/// Binds the optional HTTP listeners named in `config`.
pub async fn bind_http(
    config: &ServiceConfig,
) -> Result<(Option<TcpListener>, Option<TcpListener>), ServeError> {
    let callback = match &config.callback {
        Some(c) => Some(
            bind(
                c.listen,
                "--callback-listen / CREDENTIAL_SERVICE_CALLBACK_LISTEN",
            )
            .await?,
        ),
        None => None,
    };
    let metrics = match config.metrics_listen {
        Some(addr) => {
            Some(bind(addr, "--metrics-listen / CREDENTIAL_SERVICE_METRICS_LISTEN").await?)
        }
        None => None,
    };
    Ok((callback, metrics))
}

/// Serves on `listener` (and on the HTTP addresses in `config`) until `shutdown` resolves, then
/// finishes in-flight calls, flushes the store and returns. Tests call this with a port-0 listener
/// and a [`Clock::manual`].
pub async fn run(
    listener: TcpListener,
    config: ServiceConfig,
    clock: Clock,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let (callback, metrics) = bind_http(&config).await?;
    let listeners = Listeners {
        grpc: listener,
        callback,
        metrics,
    };
    serve(listeners, config, clock, shutdown).await
}

/// [`run`] on listeners the caller bound (port 0 in tests, or the one `--dev` picked).
pub async fn serve(
    listeners: Listeners,
    config: ServiceConfig,
    clock: Clock,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let listener = listeners.grpc;
    let store = Store::open(&config.data_dir)?;
    let provider = ProviderClient::new(config.provider)?;
    let state_ttl = config.broker.state_ttl;
    let broker = Broker::new(store.clone(), provider, clock.clone(), config.broker)?;
    tracing::info!(
        addr = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        data_dir = %config.data_dir.display(),
        accounts = broker.account_count(),
        "credential-service serving"
    );

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<CredentialServiceServer<CredentialApi>>()
        .await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;
    let (stop_http, stopped) = watch::channel(false);
    let mut http = Vec::new();
    if let Some(listener) = listeners.callback {
        let path = config
            .callback
            .as_ref()
            .map_or("/oauth/callback", |c| c.path.as_str());
        tracing::info!(addr = %local_addr(&listener), path, "browser callback serving");
        let router = callback::router(broker.clone(), path);
        http.push(tokio::spawn(serve_http(listener, router, stopped.clone())));
    }
    if let Some(listener) = listeners.metrics {
        tracing::info!(addr = %local_addr(&listener), "metrics serving at /metrics");
        let router = metrics::router(broker.clone());
        http.push(tokio::spawn(serve_http(listener, router, stopped.clone())));
    }
    let api = CredentialServiceServer::new(CredentialApi::new(broker))
        .max_decoding_message_size(MAX_REQUEST_BYTES);

    let purge = tokio::spawn(purge_pending(store.clone(), clock, state_ttl));
    let shutdown = async {
        shutdown.await;
        tracing::info!("shutting down: finishing in-flight calls");
        stop_http.send_replace(true);
        health
            .set_not_serving::<CredentialServiceServer<CredentialApi>>()
            .await;
    };
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let served = Server::builder()
        .layer(RpcMetricsLayer)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(api)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    purge.abort();
    stop_http.send_replace(true);
    for server in http {
        // An HTTP listener's failure is logged where it happens; the store still gets flushed.
        let _ = server.await;
    }
    store.flush().await?;
    served?;
    tracing::info!("stopped");
    Ok(())
}

fn local_addr(listener: &TcpListener) -> String {
    listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default()
}

/// Serves an HTTP router until `stop` turns true, letting requests in flight finish.
async fn serve_http(listener: TcpListener, router: axum::Router, mut stop: watch::Receiver<bool>) {
    let served = axum::serve(listener, router)
        .with_graceful_shutdown(async move {
            let _ = stop.wait_for(|stop| *stop).await;
        })
        .await;
    if let Err(e) = served {
        tracing::error!(error = %e, "HTTP listener failed");
    }
}

/// Deletes expired pending authorizations now and then; they could never complete anyway.
async fn purge_pending(store: Store, clock: Clock, state_ttl: Duration) {
    let period = state_ttl.clamp(Duration::from_secs(1), Duration::from_secs(60));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match store.purge_expired_pending(clock.now()) {
            Ok(0) => {}
            Ok(n) => tracing::debug!(purged = n, "expired pending authorizations removed"),
            Err(e) => tracing::warn!(error = %e, "purging expired pending authorizations failed"),
        }
    }
}

/// Resolves on ctrl-c or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
