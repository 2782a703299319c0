//! Assembles the service and serves it. [`Service::start`] binds the listeners and opens keys,
//! store, provider client and broker; [`Service::serve`] composes the pieces, each in its own file:
//! - `grpc`: the credential service with health and reflection, the layers, the drain;
//! - `conn`: accepting connections within bounds: how many, handshake deadline, TLS;
//! - `error`: [`ServeError`], why serving could not start or stopped;
//! - `limits`: bounds on calls in flight and on health Watch streams;
//! - `http`: the optional HTTP listeners (browser callback, metrics);
//! - `upkeep`: the refresh scheduler, the purge of expired authorizations, the reloader;
//! - `reload`: the reloader: files re-read on SIGHUP and when their content changes, the
//!   certificate's daily expiry check;
//! - `rekey`: SIGHUP's reload of the encryption key files;
//! - `trace`: with traces on, a span per call continuing the caller's trace;
//! - `signals`: SIGTERM / ctrl-c ([`shutdown_signal`]) and SIGHUP ([`Hangups`]).
//!
//! Shutdown order: stop accepting, health NOT_SERVING, open calls drain (bounded by
//! [`DRAIN_GRACE`]), HTTP listeners finish, upkeep ends, refreshes in flight finish, the last store handle closes.

mod conn;
mod error;
mod grpc;
mod http;
mod limits;
mod rekey;
mod reload;
mod signals;
mod trace;
mod upkeep;

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use tokio::net::TcpListener;

pub use self::{
    error::ServeError,
    signals::{Hangups, shutdown_signal},
};
use self::{http::HttpListeners, upkeep::Upkeep};
use crate::{
    broker::Broker,
    clock::Clock,
    config::{ServiceConfig, StoreConfig, flag},
    oauth::ProviderClient,
    sealing::{EncryptionConfig, KeyError, Keyring, LiveKeyring, default_key_path},
    store::{self as stores, Store, StoreError},
};

/// How long shutdown waits for open calls, and then for refreshes in flight, before it gives up on them.
pub const DRAIN_GRACE: Duration = Duration::from_secs(30);

/// Requests are tiny (an account name, a code and a state); anything bigger is refused unread.
/// The default of `--max-request-bytes`.
pub const MAX_REQUEST_BYTES: usize = crate::config::Limits::DEFAULT.max_request_bytes;

/// tonic's server with the listener's HTTP/2 settings (streams per connection, keepalive). The
/// benchmark's floor is built from it too, so that floor and service differ only in what the
/// service adds on top of the transport.
pub fn http2_server(limits: &crate::config::Limits) -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .max_concurrent_streams(limits.max_streams_per_connection)
        .http2_keepalive_interval(Some(limits.http2_keepalive_interval))
        .http2_keepalive_timeout(Some(limits.http2_keepalive_timeout))
}

/// The sockets the service serves on: gRPC, and the optional HTTP ones.
struct Listeners {
    grpc: TcpListener,
    /// The browser callback (path from `config.callback`, else `/oauth/callback`).
    callback: Option<TcpListener>,
    /// `/metrics`.
    metrics: Option<TcpListener>,
}

/// Binds `addr`; the error names the setting (`id`, see [`flag`]) so the operator knows which to fix.
async fn bind(addr: SocketAddr, id: &str) -> Result<TcpListener, ServeError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind {
            what: flag(id),
            addr,
            source,
        })
}

/// Opens the configured store. On PostgreSQL a refresh may hold an account's lock for as long as
/// EdgeTag may take to answer it, retries included.
async fn open_store(
    config: &ServiceConfig,
    keys: LiveKeyring,
) -> Result<Arc<dyn Store>, StoreError> {
    match &config.store {
        StoreConfig::Sled => stores::open_sled(&config.data_dir, keys),
        StoreConfig::Postgres(pg) => {
            let mut pg = (**pg).clone();
            pg.lock_hold = config.provider.request_timeout
                + config.broker.refresh.retry_budget
                + Duration::from_secs(5);
            Ok(Arc::new(stores::PostgresStore::open(&pg, keys).await?))
        }
    }
}

/// Loads the encryption keys. On sled with the default key (`<data-dir>.key`, created on first
/// start), a key and its data are kept together: the service never creates a key beside a store
/// that holds records (they would stay sealed for good), never starts an empty store beside a key
/// whose data directory is gone, and creates the data directory before the key, so a first start
/// cut short leaves a state the next start accepts.
pub fn load_keys(
    encryption: &EncryptionConfig,
    store: &StoreConfig,
    data_dir: &std::path::Path,
) -> Result<Keyring, ServeError> {
    if encryption.key_file.is_none() && matches!(store, StoreConfig::Sled) {
        let key_file = default_key_path(data_dir)?;
        match (key_file.exists(), data_dir.exists()) {
            (true, false) => {
                return Err(KeyError::DataDirMissing {
                    data_dir: data_dir.to_owned(),
                    key_file,
                }
                .into());
            }
            (false, true) => {
                let ids = stores::SledStore::sealing_key_ids(data_dir)?;
                if !ids.is_empty() {
                    let key_ids = ids.into_iter().collect::<Vec<_>>().join(", ");
                    return Err(KeyError::MissingForRecords {
                        data_dir: data_dir.to_owned(),
                        key_file,
                        key_ids,
                    }
                    .into());
                }
            }
            (false, false) => stores::SledStore::create_dir(data_dir)?,
            (true, true) => {}
        }
    }
    Ok(Keyring::load(encryption, data_dir)?)
}

/// The assembled service before it serves.
struct App {
    config: ServiceConfig,
    clock: Clock,
    store: Arc<dyn Store>,
    broker: Broker,
}

impl App {
    /// Loads the encryption keys, opens the store (passed through `wrap`) and loads every account
    /// into memory.
    async fn open(
        config: ServiceConfig,
        clock: Clock,
        wrap: impl FnOnce(Arc<dyn Store>) -> Arc<dyn Store>,
    ) -> Result<Self, ServeError> {
        let keys = load_keys(&config.encryption, &config.store, &config.data_dir)?;
        // SIGHUP and ResealRecords read the same files again.
        let keys =
            LiveKeyring::from_files(keys, config.encryption.clone(), config.data_dir.clone());
        let store = wrap(open_store(&config, keys).await?);
        let provider = ProviderClient::new(config.provider.clone())?;
        let broker = Broker::new(
            store.clone(),
            provider,
            clock.clone(),
            config.broker.clone(),
        )
        .await?;
        Ok(Self {
            config,
            clock,
            store,
            broker,
        })
    }
}

/// What [`Service::start_with`] takes besides the settings; the binary passes none of it.
#[derive(Default)]
pub struct StartOptions {
    /// The browser callback's listener, bound already: `--dev` binds it first, since its
    /// address is the redirect URI. Otherwise `config.callback` says where to bind it.
    pub callback: Option<TcpListener>,
    /// Passes the store through this before the broker sees it (tests wrap it in `Faulty`,
    /// from the `testing` feature, to make writes fail on demand).
    #[allow(clippy::type_complexity)]
    pub wrap_store: Option<Box<dyn FnOnce(Arc<dyn Store>) -> Arc<dyn Store> + Send>>,
}

/// The service, started: every listener bound, keys, store and broker open. The one way to
/// start it, for the binary, the tests and the benchmarks alike; [`Service::serve`] runs it.
pub struct Service {
    app: App,
    listeners: Listeners,
    audit_file: Option<crate::audit::Installed>,
}

impl Service {
    /// Binds every listener in `config` first (a port in use stops the start before any data
    /// is opened), then loads the keys, opens the store and loads every account.
    pub async fn start(config: ServiceConfig, clock: Clock) -> Result<Self, ServeError> {
        Self::start_with(config, clock, StartOptions::default()).await
    }

    /// [`Service::start`], with a listener bound already or the store wrapped ([`StartOptions`]).
    pub async fn start_with(
        config: ServiceConfig,
        clock: Clock,
        options: StartOptions,
    ) -> Result<Self, ServeError> {
        let grpc = bind(config.listen, "listen").await?;
        let callback = match (options.callback, &config.callback) {
            (Some(bound), _) => Some(bound),
            (None, Some(c)) => Some(bind(c.listen, "callback_listen").await?),
            (None, None) => None,
        };
        let metrics = match config.metrics_listen {
            Some(addr) => Some(bind(addr, "metrics_listen").await?),
            None => None,
        };
        // Before the store: a path that cannot be written stops the start with nothing opened.
        let audit_file = match &config.audit_file {
            Some(file) => {
                Some(
                    crate::audit::install(file).map_err(|source| ServeError::AuditFile {
                        path: file.path.clone(),
                        source,
                    })?,
                )
            }
            None => None,
        };
        let wrap = options
            .wrap_store
            .unwrap_or_else(|| Box::new(|store| store));
        let app = App::open(config, clock, wrap).await?;
        Ok(Self {
            app,
            listeners: Listeners {
                grpc,
                callback,
                metrics,
            },
            audit_file,
        })
    }

    /// Where gRPC is served (the port chosen when `--listen` asked for port 0).
    pub fn grpc_addr(&self) -> SocketAddr {
        local_addr(&self.listeners.grpc)
    }

    /// Where the browser callback is served, if it is.
    pub fn callback_addr(&self) -> Option<SocketAddr> {
        self.listeners.callback.as_ref().map(local_addr)
    }

    /// Where `/metrics` is served, if it is.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.listeners.metrics.as_ref().map(local_addr)
    }

    /// Tests and benchmarks drive refreshes and read state through it.
    pub fn broker(&self) -> &Broker {
        &self.app.broker
    }

    /// Serves until `shutdown` resolves, then finishes in-flight calls, flushes the store and
    /// returns once every task holding the store has ended, so the data directory is free again.
    pub async fn serve(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), ServeError> {
        let served = serve(self.app, self.listeners, shutdown).await;
        drop(self.audit_file); // after the last flush has written to it
        served
    }
}

fn local_addr(listener: &TcpListener) -> SocketAddr {
    listener
        .local_addr()
        .expect("a bound TCP listener has an address")
}

/// [`Service::serve`]: the shutdown order is in this module's documentation.
async fn serve(
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
    // Before anything reports SERVING: a SIGHUP from then on re-reads files instead of ending
    // the process.
    let hangups = Hangups::install();
    announce(&listeners, &config, &broker)?;
    if let Some(tls) = &config.tls {
        tls.check_expiry(std::time::SystemTime::now());
    }
    let http = HttpListeners::spawn(listeners.callback, listeners.metrics, &config, &broker);
    let upkeep = Upkeep::spawn(&config, &store, clock, &broker, hangups);
    let shutdown = async {
        shutdown.await;
        tracing::info!("shutting down: finishing in-flight calls");
        http.stop();
    };
    let served = grpc::serve(listeners.grpc, &config, &broker, shutdown).await;
    http.finish().await;
    upkeep.stop().await;
    crate::audit::flush(); // calls have ended: the counts written now add up to every call
    limits::flush_refusal_logs();
    // Refreshes in flight finish their write (each is bounded by the retry budget).
    if tokio::time::timeout(DRAIN_GRACE, broker.finish_refreshes())
        .await
        .is_err()
    {
        tracing::warn!("refreshes still running after the grace period; stopping without them");
    }
    drop(store); // the last handle closes the database (sled flushes a final time)
    served?;
    tracing::info!("stopped");
    Ok(())
}

/// Refuses an open service (no callers file) beyond loopback, on any of its listeners, then logs
/// what is about to serve.
fn announce(
    listeners: &Listeners,
    config: &ServiceConfig,
    broker: &Broker,
) -> Result<(), ServeError> {
    let local = listeners.grpc.local_addr().ok();
    let http = [&listeners.callback, &listeners.metrics]
        .into_iter()
        .flatten()
        .filter_map(|l| l.local_addr().ok());
    if config.callers.is_open()
        && let Some(addr) = local
            .into_iter()
            .chain(http)
            .find(|addr| !addr.ip().is_loopback())
    {
        return Err(ServeError::OpenOnNetwork(addr));
    }
    tracing::info!(
        addr = %local.map(|a| a.to_string()).unwrap_or_default(),
        store = %match config.store {
            StoreConfig::Sled => "sled",
            StoreConfig::Postgres(_) => "postgres",
        },
        // Only sled keeps its data there; a replica on PostgreSQL uses no data directory.
        data_dir = matches!(config.store, StoreConfig::Sled)
            .then(|| tracing::field::display(config.data_dir.display())),
        tls = config.tls.is_some(),
        callers = if config.callers.is_open() { "open (no callers file)" } else { "callers file" },
        accounts = broker.account_count(),
        authorize_url = %config.provider.authorize_url,
        token_url = %config.provider.token_url,
        revoke_url = %config.provider.revoke_url,
        user_info_url = %config.provider.user_info_url,
        "credential-service serving"
    );
    Ok(())
}
