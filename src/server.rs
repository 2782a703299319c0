//! Assembles the service and serves it: keys, store, provider client, broker, the gRPC service
//! with health and reflection (v1 and v1alpha, for grpcurl 1.8) behind the caller check, optional
//! TLS, the optional HTTP listeners (browser callback, metrics), background upkeep, callers-file
//! reload on SIGHUP and graceful shutdown.

use std::{future::Future, net::SocketAddr, time::Duration};

use tokio::{net::TcpListener, sync::watch};
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig, server::TcpIncoming};

use crate::{
    auth::{AuthLayer, Callers},
    broker::Broker,
    callback,
    clock::Clock,
    config::ServiceConfig,
    metrics::{self, RpcMetricsLayer},
    oauth::ProviderClient,
    proto::{self, credential_service_server::CredentialServiceServer},
    sealing::{KeyError, Keyring},
    service::CredentialApi,
    store::{Store, StoreError},
};

/// How long shutdown waits for open calls, and then for refreshes in flight, before it gives up on them.
pub const DRAIN_GRACE: Duration = Duration::from_secs(30);

/// Requests are tiny (an account name, a code and a state); anything bigger is refused unread.
pub const MAX_REQUEST_BYTES: usize = 16 * 1024;

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Keys(#[from] KeyError),
    #[error(
        "refusing to serve on {0} without a callers file: only loopback is safe when every call is allowed"
    )]
    OpenOnNetwork(std::net::SocketAddr),
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

/// The assembled service before it serves: tests reach the broker and the store through it.
pub struct App {
    config: ServiceConfig,
    clock: Clock,
    store: Store,
    broker: Broker,
}

impl App {
    /// Loads the encryption keys, opens the store and loads every account into memory.
    pub fn open(config: ServiceConfig, clock: Clock) -> Result<Self, ServeError> {
        let keys = Keyring::load(&config.encryption, &config.data_dir)?;
        let store = Store::open(&config.data_dir, keys)?;
        let provider = ProviderClient::new(config.provider.clone())?;
        let broker = Broker::new(
            store.clone(),
            provider,
            clock.clone(),
            config.broker.clone(),
        )?;
        Ok(Self {
            config,
            clock,
            store,
            broker,
        })
    }

    pub fn broker(&self) -> &Broker {
        &self.broker
    }

    pub fn store(&self) -> &Store {
        &self.store
    }
}

/// Opens the service and serves on `listener` (and on the HTTP addresses in `config`) until
/// `shutdown` resolves (see [`serve`]).
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
    serve(App::open(config, clock)?, listeners, shutdown).await
}

/// Serves on listeners the caller bound (port 0 in tests, or the ones `--dev` picked) until
/// `shutdown` resolves, then finishes in-flight calls, flushes the store and returns once every
/// task holding the store has ended, so the data directory is free again.
pub async fn serve(
    app: App,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let App {
        config,
        clock,
        store,
        broker,
    } = app;
    let listener = listeners.grpc;
    let local = listener.local_addr().ok();
    if let Some(addr) = local
        && config.callers.is_open()
        && !addr.ip().is_loopback()
    {
        return Err(ServeError::OpenOnNetwork(addr));
    }
    tracing::info!(
        addr = %local.map(|a| a.to_string()).unwrap_or_default(),
        data_dir = %config.data_dir.display(),
        tls = config.tls.is_some(),
        callers = if config.callers.is_open() { "open (no callers file)" } else { "callers file" },
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
    let scheduler = tokio::spawn(broker.clone().run_scheduler());
    let api = CredentialServiceServer::new(CredentialApi::new(broker.clone()))
        .max_decoding_message_size(MAX_REQUEST_BYTES);

    let purge = tokio::spawn(purge_pending(store.clone(), clock, config.broker.state_ttl));
    let reload = tokio::spawn(reload_on_sighup(config.callers.clone()));
    let audit = tokio::spawn(crate::audit::run_flusher(config.audit));
    let (draining, mut drain_started) = watch::channel(false);
    let (stop_http_ref, health) = (&stop_http, &health);
    let shutdown = async move {
        shutdown.await;
        tracing::info!("shutting down: finishing in-flight calls");
        stop_http_ref.send_replace(true);
        health
            .set_not_serving::<CredentialServiceServer<CredentialApi>>()
            .await;
        draining.send_replace(true);
    };
    // Calls that never end on their own (health Watch streams) must not hold the exit forever.
    let drain_deadline = async move {
        let _ = drain_started.wait_for(|started| *started).await;
        tokio::time::sleep(DRAIN_GRACE).await;
    };
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let mut builder = Server::builder();
    if let Some(tls) = &config.tls {
        let mut tls_config =
            ServerTlsConfig::new().identity(Identity::from_pem(&tls.cert_pem, &tls.key_pem));
        if let Some(ca) = &tls.client_ca_pem {
            // Optional: bearer-token callers need no certificate; a presented one must verify.
            tls_config = tls_config
                .client_ca_root(Certificate::from_pem(ca))
                .client_auth_optional(true);
        }
        builder = builder.tls_config(tls_config)?;
    }
    let served = builder
        .layer(RpcMetricsLayer)
        .layer(AuthLayer::new(config.callers.clone()))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(api)
        .serve_with_incoming_shutdown(incoming, shutdown);
    let served = tokio::select! {
        served = served => served,
        () = drain_deadline => {
            tracing::warn!(grace = ?DRAIN_GRACE, "calls still open after the grace period; closing them");
            Ok(())
        }
    };
    stop_http.send_replace(true);
    for server in http {
        // An HTTP listener's failure is logged where it happens; the store still gets flushed.
        let _ = server.await;
    }
    for task in [purge, scheduler, reload, audit] {
        task.abort();
        let _ = task.await; // each holds a store handle: wait until it is dropped
    }
    crate::audit::flush(); // calls have ended: the counts written now add up to every call
    // Refreshes in flight finish their write (each is bounded by the retry budget).
    if tokio::time::timeout(DRAIN_GRACE, broker.finish_refreshes())
        .await
        .is_err()
    {
        tracing::warn!("refreshes still running after the grace period; stopping without them");
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
    // The peer's address is for the audit of refusals.
    let router = router.into_make_service_with_connect_info::<SocketAddr>();
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

/// Re-reads the callers file on each SIGHUP, for as long as the server runs.
async fn reload_on_sighup(callers: Callers) {
    if callers.is_open() {
        return;
    }
    #[cfg(unix)]
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(mut hangups) => {
            while hangups.recv().await.is_some() {
                callers.reload_and_log();
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; the callers file will not be reloaded")
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
