//! What every benchmark needs: the runtimes, the service's configuration for a benchmark, seeded
//! data directories, and an in-process server with a handle to stop it.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use credential_service::{
    account::AccountId,
    auth::Callers,
    broker::BrokerConfig,
    clock::Clock,
    config::{ServiceConfig, Upstream},
    sealing::{EncryptionConfig, Keyring},
    server::{ServeError, Service},
    store::{Expected, SledStore, Store},
    tokens::{AccountRecord, Teams, TokenSet},
};
use fake_edgetag::{FakeClock, FakeConfig, FakeEdgeTag};
use futures::StreamExt;
use tempfile::TempDir;
use tokio::{
    net::TcpListener,
    runtime::{Handle, Runtime},
    sync::oneshot,
    task::JoinHandle,
};
use tonic::transport::Endpoint;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use url::Url;

pub const REDIRECT_URI: &str = "https://ops.example.com/oauth/callback";
/// What EdgeTag grants; seeded tokens get the same lifetime.
pub const TOKEN_LIFETIME: Duration = Duration::from_secs(7200);
/// Thread-name prefixes, so CPU time can be charged to the server or the load generator.
pub const SERVER_THREADS: &str = "bench-server";
pub const CLIENT_THREADS: &str = "bench-client";

/// Three runtimes: the servers under test, the load generator, and the fake EdgeTag, so that what
/// the server's threads spend is measurable on its own.
pub struct Runtimes {
    pub server: Runtime,
    pub client: Runtime,
    pub fake: Runtime,
}

impl Runtimes {
    pub fn new(server_threads: usize, client_threads: usize) -> Self {
        let build = |threads: usize, name: &str| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(threads)
                .thread_name(name)
                .enable_all()
                .build()
                .expect("a runtime")
        };
        Self {
            server: build(server_threads, SERVER_THREADS),
            client: build(client_threads, CLIENT_THREADS),
            fake: build(1, "bench-fake"),
        }
    }
}

/// The service's EdgeTag client pointed at `fake`.
pub fn fake_upstream(fake: &FakeEdgeTag) -> Upstream {
    Upstream {
        authorize_url: Url::parse(&fake.authorize_url()).unwrap(),
        token_url: Url::parse(&fake.token_url()).unwrap(),
        revoke_url: Url::parse(&fake.revoke_url()).unwrap(),
        client_id: fake.client_id().to_owned(),
        client_secret: fake.client_secret().into(),
        redirect_uri: Url::parse(REDIRECT_URI).unwrap(),
    }
}

/// A closed loopback port: enough for benchmarks whose tokens never need a refresh.
pub fn unreachable_upstream() -> Upstream {
    let url = |path: &str| Url::parse(&format!("http://127.0.0.1:9{path}")).unwrap();
    Upstream {
        authorize_url: url("/oauth/app/login"),
        token_url: url("/v1/oauth-app/client/token"),
        revoke_url: url("/v1/oauth-app/client/revoke"),
        client_id: "bench-client".into(),
        client_secret: "bench-secret".into(),
        redirect_uri: Url::parse(REDIRECT_URI).unwrap(),
    }
}

/// Caller authentication for the "with authentication" variant: the callers file the server
/// reads and the bearer token the load generator sends on every call.
pub struct CallerAuth {
    pub bearer: String,
    pub callers_file: PathBuf,
}

/// Writes a callers file beside the data directory's records: one reader whose glob covers every
/// seeded account (`acct-*`), as a production reader would be configured.
pub fn caller_auth(dir: &Path) -> CallerAuth {
    use sha2::{Digest, Sha256};
    let bearer = random_token("bench-caller-");
    let callers_file = dir.join("callers.toml");
    let digest: String = Sha256::digest(bearer.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    std::fs::write(
        &callers_file,
        format!(
            "[[caller]]\nname = \"bench-reader\"\ntoken_sha256 = \"{digest}\"\nrole = \"reader\"\naccounts = [\"acct-*\"]\n"
        ),
    )
    .expect("the callers file is written");
    CallerAuth {
        bearer,
        callers_file,
    }
}

/// The encryption key of a benchmark data directory: kept inside it, so nothing is left behind.
pub fn key_file(data_dir: &Path) -> PathBuf {
    data_dir.join("bench.key")
}

pub fn encryption(data_dir: &Path) -> EncryptionConfig {
    let key_file = key_file(data_dir);
    if !key_file.exists() {
        credential_service::sealing::create_key_file(&key_file).expect("a key file");
    }
    EncryptionConfig {
        key_file: Some(key_file),
        previous_key_files: Vec::new(),
    }
}

/// The production configuration (`ServiceConfig::new`) with the benchmark's upstream, broker
/// settings, callers and key, and EdgeTag's real token lifetime.
pub fn service_config(
    data_dir: &Path,
    upstream: Upstream,
    broker: BrokerConfig,
    auth: Option<&CallerAuth>,
) -> ServiceConfig {
    let mut config = ServiceConfig::new(upstream, data_dir.to_owned());
    config.provider.default_token_lifetime = TOKEN_LIFETIME;
    config.broker = broker;
    if let Some(auth) = auth {
        config.callers = Callers::load(&auth.callers_file).expect("the callers file loads");
    }
    config.encryption = encryption(data_dir);
    config
}

/// Opens a benchmark data directory's store with its key.
pub fn open_store(data_dir: &Path) -> SledStore {
    let keys = Keyring::load(&encryption(data_dir), data_dir).expect("the key loads");
    SledStore::open(data_dir, keys).expect("the store opens")
}

/// The fake EdgeTag on its own runtime, on `clock`.
pub async fn start_fake(fake_rt: &Handle, clock: &Clock) -> Arc<FakeEdgeTag> {
    let config = FakeConfig {
        redirect_uris: vec![REDIRECT_URI.to_owned()],
        clock: {
            let clock = clock.clone();
            FakeClock::from_fn(move || clock.now())
        },
        ..FakeConfig::default()
    };
    let fake = fake_rt
        .spawn(FakeEdgeTag::start(config))
        .await
        .unwrap()
        .expect("the fake EdgeTag starts");
    Arc::new(fake)
}

/// A fresh temporary directory under `root` (or the system's temporary directory).
pub fn temp_dir(root: Option<&Path>, prefix: &str) -> TempDir {
    let mut builder = tempfile::Builder::new();
    builder.prefix(prefix);
    match root {
        Some(root) => builder.tempdir_in(root),
        None => builder.tempdir(),
    }
    .expect("a temporary directory")
}

/// `acct-000042`: the names the seeded accounts get, in order.
pub fn account_names(n: usize) -> Arc<[String]> {
    (0..n).map(|i| format!("acct-{i:06}")).collect()
}

/// Like the fake's tokens: a prefix and 256 random bits, so records have their real size.
pub fn random_token(prefix: &str) -> String {
    let bytes: [u8; 32] = rand::random();
    format!("{prefix}{}", URL_SAFE_NO_PAD.encode(bytes))
}

/// Writes one record per name with the library's own store, as CompleteAuth would have: an access
/// token valid for [`TOKEN_LIFETIME`] from `clock`'s now, and the refresh token `refresh(i)`.
/// Returns how long it took.
pub async fn seed(
    dir: &Path,
    names: &[String],
    clock: &Clock,
    refresh: impl FnMut(usize) -> String,
) -> Duration {
    let started = Instant::now();
    let store = open_store(dir);
    // Concurrent writes share the store's group-committed flushes.
    seed_into(&store, names, clock, refresh, 1024).await;
    drop(store); // closes the database before a server opens it
    started.elapsed()
}

/// [`seed`] into any store, `concurrency` writes at a time.
pub async fn seed_into(
    store: &dyn Store,
    names: &[String],
    clock: &Clock,
    mut refresh: impl FnMut(usize) -> String,
    concurrency: usize,
) {
    let now = clock.now();
    let records: Vec<(AccountId, AccountRecord)> = names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let record = record(now, random_token("eta_"), refresh(i));
            (AccountId::parse(name).unwrap(), record)
        })
        .collect();
    futures::stream::iter(records)
        .map(|(id, record)| async move { store.put_account(&id, &record, Expected::Absent).await })
        .buffer_unordered(concurrency)
        .for_each(|r| {
            r.expect("seeding writes");
            async {}
        })
        .await;
}

/// A connected account whose EdgeTag team is known, as after its connection: without the team,
/// the scheduler would ask the (unreachable) EdgeTag for every account's during the measurement.
pub fn record(now: SystemTime, access: String, refresh: String) -> AccountRecord {
    AccountRecord {
        teams: Some(Arc::new(Teams {
            team_id: "team-bench".into(),
            teams: Vec::new(),
            learned_at: now,
        })),
        ..AccountRecord::connected(TokenSet {
            access_token: access.into(),
            refresh_token: Some(refresh.into()),
            token_type: "Bearer".into(),
            issued_at: now,
            expires_at: now + TOKEN_LIFETIME,
        })
    }
}

/// A server running on the server runtime.
pub struct RunningServer {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    done: JoinHandle<Result<(), ServeError>>,
}

impl RunningServer {
    /// The real service, started as the binary starts it ([`Service::start`]) on a port the
    /// system picks; returns once health says SERVING.
    pub async fn service(server_rt: &Handle, mut config: ServiceConfig, clock: Clock) -> Self {
        config.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        let (addr_tx, addr_rx) = oneshot::channel();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        // Started inside the server runtime, so its reactor (not the load generator's) drives the socket.
        let done = server_rt.spawn(async move {
            let service = Service::start(config, clock).await?;
            addr_tx.send(service.grpc_addr()).unwrap();
            service
                .serve(async move {
                    let _ = stop_rx.await;
                })
                .await
        });
        Self::serving(addr_rx, stop_tx, done).await
    }

    /// Any other server (the floor) on a loopback listener of its own, served until stopped.
    pub async fn spawn<F, Fut>(server_rt: &Handle, serve: F) -> Self
    where
        F: FnOnce(TcpListener, futures::future::BoxFuture<'static, ()>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), ServeError>> + Send + 'static,
    {
        let (addr_tx, addr_rx) = oneshot::channel();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        // Bound inside the server runtime, so its reactor (not the load generator's) drives the socket.
        let done = server_rt.spawn(async move {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            addr_tx.send(listener.local_addr().unwrap()).unwrap();
            let stop = Box::pin(async move {
                let _ = stop_rx.await;
            });
            serve(listener, stop).await
        });
        Self::serving(addr_rx, stop_tx, done).await
    }

    async fn serving(
        addr: oneshot::Receiver<SocketAddr>,
        stop: oneshot::Sender<()>,
        done: JoinHandle<Result<(), ServeError>>,
    ) -> Self {
        let addr = match addr.await {
            Ok(addr) => addr,
            Err(_) => panic!("the server did not start: {:?}", done.await),
        };
        wait_until_serving(addr, Duration::from_secs(120))
            .await
            .expect("the server answers health checks");
        Self {
            addr,
            stop: Some(stop),
            done,
        }
    }

    /// Graceful stop; the data directory is free again afterwards.
    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.done
            .await
            .expect("the server task")
            .expect("the server stops cleanly");
    }
}

/// Polls the gRPC health check of the credential service until it answers SERVING.
pub async fn wait_until_serving(addr: SocketAddr, limit: Duration) -> Result<Duration, String> {
    let started = Instant::now();
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_millis(200));
    let request = || HealthCheckRequest {
        service: credential_service::proto::credential_service_server::SERVICE_NAME.into(),
    };
    let mut last = String::from("not tried");
    while started.elapsed() < limit {
        match endpoint.connect().await {
            Ok(channel) => match HealthClient::new(channel).check(request()).await {
                Ok(r) if r.get_ref().status() == ServingStatus::Serving => {
                    return Ok(started.elapsed());
                }
                Ok(r) => last = format!("status {:?}", r.get_ref().status()),
                Err(e) => last = e.to_string(),
            },
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Err(format!("not serving after {limit:?}: {last}"))
}
