//! Assembles the service and serves it: keys, store, provider client, broker, the gRPC service
//! with health and reflection (v1 and v1alpha, for grpcurl 1.8) behind the caller check, optional
//! TLS, background upkeep, callers-file reload on SIGHUP and graceful shutdown.

use std::{future::Future, time::Duration};

use tokio::net::TcpListener;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig, server::TcpIncoming};

use crate::{
    auth::{AuthLayer, Callers},
    broker::Broker,
    clock::Clock,
    config::ServiceConfig,
    oauth::ProviderClient,
    proto::{self, credential_service_server::CredentialServiceServer},
    sealing::{KeyError, Keyring},
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

/// Opens the service and serves on `listener` until `shutdown` resolves (see [`serve`]).
pub async fn run(
    listener: TcpListener,
    config: ServiceConfig,
    clock: Clock,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    serve(App::open(config, clock)?, listener, shutdown).await
}

/// Serves on `listener` until `shutdown` resolves, then finishes in-flight calls, flushes the store
/// and returns. Tests call this with a port-0 listener and a [`Clock::manual`].
pub async fn serve(
    app: App,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let App {
        config,
        clock,
        store,
        broker,
    } = app;
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
    let scheduler = tokio::spawn(broker.clone().run_scheduler());
    let api = CredentialServiceServer::new(CredentialApi::new(broker))
        .max_decoding_message_size(MAX_REQUEST_BYTES);

    let purge = tokio::spawn(purge_pending(store.clone(), clock, config.broker.state_ttl));
    let reload = tokio::spawn(reload_on_sighup(config.callers.clone()));
    let shutdown = async {
        shutdown.await;
        tracing::info!("shutting down: finishing in-flight calls");
        health
            .set_not_serving::<CredentialServiceServer<CredentialApi>>()
            .await;
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
        .layer(AuthLayer::new(config.callers.clone()))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(api)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    purge.abort();
    scheduler.abort();
    reload.abort();
    store.flush().await?;
    served?;
    tracing::info!("stopped");
    Ok(())
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
