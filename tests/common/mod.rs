//! Test harness: the real server on an ephemeral loopback port with a temporary data directory,
//! in front of the strict fake EdgeTag, and typed helpers for the calls tests make.

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, LazyLock, Mutex},
    time::{Duration, UNIX_EPOCH},
};

pub use credential_client::Bearer;
use credential_service::{
    auth::Callers,
    broker::{Broker, BrokerConfig, RefreshPolicy},
    clock::Clock,
    config::{CallbackConfig, Limits, ServiceConfig, StoreConfig, Upstream},
    oauth::ClientSecret,
    proto::{
        AccountInfo, BeginAuthRequest, BeginAuthResponse, CompleteAuthRequest,
        CompleteAuthResponse, DescribeAccountRequest, GetTokenRequest, GetTokenResponse,
        ListAccountsRequest, RefreshTokenRequest, RemoveAccountRequest, RemoveOutcome,
        credential_service_client::CredentialServiceClient,
    },
    sealing::{self, EncryptionConfig},
    server::{ServeError, Service, StartOptions},
    store::{Faults, Faulty, PostgresConfig},
    tls::ServerTls,
};
use fake_edgetag::{FakeClock, FakeConfig, FakeEdgeTag};
use tempfile::TempDir;
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic::{Code, Status, service::interceptor::InterceptedService, transport::Channel};
use url::Url;

pub const REDIRECT_URI: &str = "https://ops.example.com/oauth/callback";
pub const HOUR: Duration = Duration::from_secs(3600);
pub const MINUTE: Duration = Duration::from_secs(60);
/// Where test servers listen: loopback, a port the system picks.
pub const LOOPBACK_ANY_PORT: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 0);

/// Knobs a test may turn; everything else is the production default (`ServiceConfig::new`).
#[derive(Clone)]
pub struct Options {
    pub broker: BrokerConfig,
    pub request_timeout: Duration,
    /// Send `redirect_uri` in the code exchange (strict OAuth servers).
    pub send_redirect_uri: bool,
    /// Who may call; open (no callers file) by default.
    pub callers: Callers,
    pub tls: Option<ServerTls>,
    /// The client secret, when not the fake's own as a fixed value (a file, to roll it).
    pub client_secret: Option<ClientSecret>,
    /// How often reloadable files are checked for new content.
    pub reload_interval: Duration,
    /// Key files; by default one random key in [`Options::key_dir`], kept across restarts.
    pub encryption: EncryptionConfig,
    /// Holds the default key file (outside the data directory, as in production).
    #[allow(dead_code)] // held so the key file outlives every restart; never read
    pub key_dir: Arc<TempDir>,
    /// Bearer token the harness's client sends (for servers with a callers file).
    pub token: Option<String>,
    /// Replaces the fake's revocation URL (e.g. with a closed port, to make EdgeTag unreachable).
    pub revoke_url: Option<Url>,
    /// Replaces the fake's `/v1/user/me` (e.g. with a closed port: a replica that never learns a
    /// team itself).
    pub user_info_url: Option<Url>,
    /// Serve the browser callback on a port of its own; it becomes the redirect URI.
    pub callback: bool,
    /// Serve `/metrics` on a port of its own.
    pub metrics: bool,
    /// The listener's bounds (calls, watchers, ...).
    pub limits: Limits,
}

pub type Client = CredentialServiceClient<InterceptedService<Channel, Bearer>>;

impl Default for Options {
    fn default() -> Self {
        let key_dir = Arc::new(tempfile::tempdir().unwrap());
        let key_file = key_dir.path().join("current.key");
        sealing::create_key_file(&key_file).unwrap();
        Self {
            broker: BrokerConfig {
                refresh: test_policy(),
                ..BrokerConfig::default()
            },
            request_timeout: Duration::from_secs(2),
            send_redirect_uri: false,
            callers: Callers::open(),
            tls: None,
            client_secret: None,
            reload_interval: Duration::from_secs(10),
            encryption: EncryptionConfig {
                key_file: Some(key_file),
                previous_key_files: Vec::new(),
            },
            key_dir,
            token: None,
            revoke_url: None,
            user_info_url: None,
            callback: false,
            metrics: false,
            limits: Limits::DEFAULT,
        }
    }
}

/// The production policy with short real-time pauses, and a scheduler that scans only when a
/// test calls `broker.refresh_due()`, so upstream call counts are exact.
pub fn test_policy() -> RefreshPolicy {
    RefreshPolicy {
        scan_interval: Duration::from_secs(24 * 3600),
        retry_base: Duration::from_millis(10),
        retry_budget: Duration::from_secs(2),
        ..RefreshPolicy::default()
    }
}

/// One running service. Dropping it stops the server without waiting; [`TestApp::stop`] waits.
pub struct TestApp {
    pub addr: SocketAddr,
    /// `http://127.0.0.1:PORT/oauth/callback` when [`Options::callback`] is set.
    pub callback_url: Option<String>,
    /// `http://127.0.0.1:PORT/metrics` when [`Options::metrics`] is set.
    pub metrics_url: Option<String>,
    pub client: Client,
    pub fake: Arc<FakeEdgeTag>,
    pub clock: Clock,
    pub broker: Broker,
    /// Makes the store's writes fail on demand.
    pub faults: Faults,
    pub data_dir: Arc<TempDir>,
    pub options: Options,
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<Result<(), ServeError>>>,
}

/// The fake EdgeTag reads the test's clock, so both sides agree when time is moved.
pub fn fake_clock(clock: &Clock) -> FakeClock {
    let clock = clock.clone();
    FakeClock::from_fn(move || clock.now())
}

pub fn fake_config(clock: &Clock) -> FakeConfig {
    FakeConfig {
        redirect_uris: vec![REDIRECT_URI.to_owned()],
        clock: fake_clock(clock),
        ..FakeConfig::default()
    }
}

impl TestApp {
    /// Returns once the fake EdgeTag holds a token request (the exchange or refresh under way).
    pub async fn until_token_request_in_flight(&self) {
        self.fake.until_token_requests_in_flight(|n| n > 0).await;
    }

    pub async fn spawn() -> Self {
        Self::spawn_with(Options::default()).await
    }

    pub async fn spawn_with(options: Options) -> Self {
        let clock = Clock::manual();
        let mut config = fake_config(&clock);
        if options.callback {
            // The callback's port is only known at start: accept any redirect URI.
            config.redirect_uris.clear();
        }
        let fake = Arc::new(
            FakeEdgeTag::start(config)
                .await
                .expect("fake EdgeTag starts"),
        );
        let data_dir = Arc::new(tempfile::tempdir().unwrap());
        Self::start(fake, clock, data_dir, options).await
    }

    /// A server in front of a fake EdgeTag that rotates refresh tokens on every refresh.
    pub async fn spawn_rotating() -> Self {
        Self::spawn_rotating_with(Options::default()).await
    }

    pub async fn spawn_rotating_with(options: Options) -> Self {
        let clock = Clock::manual();
        let config = FakeConfig {
            rotate_refresh_tokens: true,
            ..fake_config(&clock)
        };
        let fake = Arc::new(
            FakeEdgeTag::start(config)
                .await
                .expect("fake EdgeTag starts"),
        );
        let data_dir = Arc::new(tempfile::tempdir().unwrap());
        Self::start(fake, clock, data_dir, options).await
    }

    /// Starts a server on an existing fake, clock and data directory.
    pub async fn start(
        fake: Arc<FakeEdgeTag>,
        clock: Clock,
        data_dir: Arc<TempDir>,
        options: Options,
    ) -> Self {
        let mut config = service_config(&fake, data_dir.path().to_owned(), &options);
        // The callback's port is its redirect URI, so it is bound before the configuration is
        // complete; /metrics binds with the service.
        let callback = match options.callback {
            true => Some(TcpListener::bind(LOOPBACK_ANY_PORT).await.unwrap()),
            false => None,
        };
        if let Some(listener) = &callback {
            let listen = listener.local_addr().unwrap();
            config.provider.redirect_uri =
                format!("http://{listen}/oauth/callback").parse().unwrap();
            config.callback = Some(CallbackConfig {
                listen,
                path: "/oauth/callback".into(),
            });
        }
        if options.metrics {
            config.metrics_listen = Some(LOOPBACK_ANY_PORT);
        }
        let faults = Faults::default();
        let wrap_faults = faults.clone();
        let start = StartOptions {
            callback,
            wrap_store: Some(Box::new(move |store| {
                Arc::new(Faulty::new(store, wrap_faults))
            })),
        };
        let service = Service::start_with(config, clock.clone(), start)
            .await
            .expect("the service starts");
        let addr = service.grpc_addr();
        let callback_url = service
            .callback_addr()
            .map(|a| format!("http://{a}/oauth/callback"));
        let metrics_url = service
            .metrics_addr()
            .map(|a| format!("http://{a}/metrics"));
        let broker = service.broker().clone();
        let (tx, rx) = oneshot::channel::<()>();
        let server = tokio::spawn(service.serve(async {
            let _ = rx.await;
        }));
        let endpoint = Channel::from_shared(format!("http://{addr}")).unwrap();
        let channel = if options.tls.is_some() {
            endpoint.connect_lazy() // TLS tests make their own channels
        } else {
            endpoint.connect().await.expect("server accepts")
        };
        let client = CredentialServiceClient::with_interceptor(
            channel,
            Bearer::new(options.token.as_deref()).unwrap(),
        );
        Self {
            addr,
            callback_url,
            metrics_url,
            client,
            fake,
            clock,
            broker,
            faults,
            data_dir,
            options,
            shutdown: Some(tx),
            server: Some(server),
        }
    }

    /// Graceful stop; returns what a restart needs.
    pub async fn stop(mut self) -> (Arc<FakeEdgeTag>, Clock, Arc<TempDir>, Options) {
        self.shutdown.take().unwrap().send(()).ok();
        self.server
            .take()
            .unwrap()
            .await
            .unwrap()
            .expect("server stops cleanly");
        (
            self.fake.clone(),
            self.clock.clone(),
            self.data_dir.clone(),
            self.options.clone(),
        )
    }

    /// Stops and starts again on the same data directory, clock and fake.
    pub async fn restart(self) -> Self {
        let (fake, clock, data_dir, options) = self.stop().await;
        Self::start(fake, clock, data_dir, options).await
    }

    pub async fn begin(&self, account: &str) -> Result<BeginAuthResponse, Status> {
        self.client
            .clone()
            .begin_auth(BeginAuthRequest {
                account: account.into(),
            })
            .await
            .map(|r| r.into_inner())
    }

    pub async fn complete(&self, code: &str, state: &str) -> Result<CompleteAuthResponse, Status> {
        self.client
            .clone()
            .complete_auth(CompleteAuthRequest {
                code: code.into(),
                state: state.into(),
            })
            .await
            .map(|r| r.into_inner())
    }

    pub async fn get_token(&self, account: &str) -> Result<GetTokenResponse, Status> {
        self.client
            .clone()
            .get_token(GetTokenRequest {
                account: account.into(),
                min_validity: None,
            })
            .await
            .map(|r| r.into_inner())
    }

    /// BeginAuth, approval at the fake (as the browser would), returns (code, state).
    pub async fn authorize(&self, account: &str) -> (String, String) {
        let begun = self.begin(account).await.expect("BeginAuth");
        let redirect = self
            .fake
            .approve(&begun.authorize_url)
            .await
            .expect("the fake approves");
        assert_eq!(redirect.state, begun.state);
        (redirect.code, redirect.state)
    }

    /// The whole connect flow for one account.
    pub async fn connect(&self, account: &str) -> CompleteAuthResponse {
        let (code, state) = self.authorize(account).await;
        self.complete(&code, &state).await.expect("CompleteAuth")
    }

    /// ListAccounts: one page's account names and the next page's token.
    pub async fn list(&self, page_size: i32, page_token: &str) -> (Vec<String>, String) {
        let page = self
            .client
            .clone()
            .list_accounts(ListAccountsRequest {
                page_size,
                page_token: page_token.into(),
            })
            .await
            .unwrap()
            .into_inner();
        (
            page.accounts.into_iter().map(|a| a.account).collect(),
            page.next_page_token,
        )
    }

    /// DescribeAccount.
    pub async fn describe(&self, account: &str) -> Result<AccountInfo, Status> {
        self.client
            .clone()
            .describe_account(DescribeAccountRequest {
                account: account.into(),
            })
            .await
            .map(|r| r.into_inner())
    }

    /// RefreshToken: the new access token's expiry.
    pub async fn refresh(&self, account: &str) -> Result<prost_types::Timestamp, Status> {
        self.client
            .clone()
            .refresh_token(RefreshTokenRequest {
                account: account.into(),
            })
            .await
            .map(|r| r.into_inner().expires_at.unwrap())
    }

    /// RemoveAccount.
    pub async fn remove(&self, account: &str, force: bool) -> Result<RemoveOutcome, Status> {
        self.client
            .clone()
            .remove_account(RemoveAccountRequest {
                account: account.into(),
                force,
            })
            .await
            .map(|r| r.into_inner().outcome())
    }

    /// A client of this server that sends `token` (or nothing), beside the harness's own.
    pub fn client_with_token(&self, token: Option<&str>) -> Client {
        let channel = Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect_lazy();
        CredentialServiceClient::with_interceptor(channel, Bearer::new(token).unwrap())
    }

    /// `/metrics` as a scraper gets it (needs [`Options::metrics`]).
    pub async fn metrics(&self) -> String {
        let response = reqwest::get(self.metrics_url.as_ref().expect("Options::metrics"))
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert!(
            response.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("application/openmetrics-text")
        );
        response.text().await.unwrap()
    }

    /// Seconds from the test clock's now until `expires_at`.
    pub fn seconds_left(&self, expires_at: Option<prost_types::Timestamp>) -> i64 {
        let now = self
            .clock
            .now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        expires_at.unwrap().seconds - now
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// The production configuration (`ServiceConfig::new`) pointed at `fake`, with `options` applied.
pub fn service_config(fake: &FakeEdgeTag, data_dir: PathBuf, options: &Options) -> ServiceConfig {
    let url = |s: String| Url::parse(&s).unwrap();
    let upstream = Upstream {
        authorize_url: url(fake.authorize_url()),
        token_url: url(fake.token_url()),
        revoke_url: options
            .revoke_url
            .clone()
            .unwrap_or_else(|| url(fake.revoke_url())),
        client_id: fake.config().client_id.clone(),
        client_secret: fake.config().client_secret.clone().into(),
        redirect_uri: url(REDIRECT_URI.to_owned()),
    };
    let mut config = ServiceConfig::new(upstream, data_dir);
    config.listen = LOOPBACK_ANY_PORT;
    config.provider.request_timeout = options.request_timeout;
    config.provider.send_redirect_uri = options.send_redirect_uri;
    if let Some(url) = &options.user_info_url {
        config.provider.user_info_url = url.clone();
    }
    config.broker = options.broker.clone();
    config.callers = options.callers.clone();
    config.tls = options.tls.clone();
    if let Some(secret) = &options.client_secret {
        config.provider.client_secret = secret.clone();
    }
    config.reload_interval = options.reload_interval;
    config.encryption = options.encryption.clone();
    config.limits = options.limits;
    if store_kind() == StoreKind::Postgres {
        config.store = StoreConfig::Postgres(Box::new(postgres_config(&config.data_dir)));
    }
    config
}

/// Asserts the status code and that the message contains `needle`.
#[track_caller]
pub fn assert_status(
    result: Result<impl std::fmt::Debug, Status>,
    code: Code,
    needle: &str,
) -> Status {
    let status = result.expect_err("expected an error status");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().contains(needle),
        "{:?} lacks {needle:?}",
        status.message()
    );
    status
}

/// Waits for `n` refresh events (of any kind) and returns them.
pub async fn events(
    rx: &mut tokio::sync::broadcast::Receiver<credential_service::broker::RefreshEvent>,
    n: usize,
) -> Vec<credential_service::broker::RefreshEvent> {
    let collect = async {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            out.push(rx.recv().await.expect("event stream open"));
        }
        out
    };
    tokio::time::timeout(Duration::from_secs(60), collect)
        .await
        .expect("events arrive")
}

/// The store a test's servers open. Suites run their tests on both with [`on_both_stores!`];
/// a test outside it (or a task it spawns) gets sled, as before.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreKind {
    Sled,
    Postgres,
}

tokio::task_local! {
    /// Set by [`on_both_stores!`] around each copy of a test.
    pub static STORE: StoreKind;
}

/// The store of the running test (sled when none was chosen).
pub fn store_kind() -> StoreKind {
    STORE.try_with(|kind| *kind).unwrap_or(StoreKind::Sled)
}

/// The PostgreSQL database standing in for `data_dir`: created (on this test binary's private
/// cluster) the first time a server starts on that directory, and the same one on every restart,
/// so a restart finds what the previous server stored, as it would on sled.
pub fn postgres_database(data_dir: &Path) -> pg_cluster::Database {
    static DATABASES: LazyLock<Mutex<HashMap<PathBuf, pg_cluster::Database>>> =
        LazyLock::new(Mutex::default);
    let mut databases = DATABASES.lock().unwrap();
    databases
        .entry(data_dir.to_owned())
        .or_insert_with(|| pg_cluster::Cluster::shared().create_database())
        .clone()
}

/// The store configuration for [`postgres_database`] of `data_dir`.
pub fn postgres_config(data_dir: &Path) -> PostgresConfig {
    let url = format!("{}?sslmode=disable", postgres_database(data_dir).url());
    let password = pg_cluster::Cluster::shared().password();
    PostgresConfig::parse(&url, Some(password.into()), None).unwrap()
}

/// The `--store` arguments of a `credential-service` command that must open the same store as
/// the test's servers on `data_dir` (none for sled).
pub fn store_args(data_dir: &Path) -> Vec<std::ffi::OsString> {
    match store_kind() {
        StoreKind::Sled => Vec::new(),
        StoreKind::Postgres => vec![
            "--store".into(),
            format!("{}?sslmode=disable", postgres_database(data_dir).url()).into(),
            "--store-password-file".into(),
            pg_cluster::Cluster::shared().password_file().into(),
        ],
    }
}

/// Runs the named `async fn`s of the suite as tests twice: on sled (in `mod sled`) and on
/// PostgreSQL (in `mod postgres`), each copy inside [`STORE`]'s scope. The fns stay ordinary items,
/// so rustfmt and the compiler see their bodies as usual; one that is neither listed here nor a
/// test itself is dead code, which clippy refuses. Each group of names follows the test attribute
/// its copies get:
/// ```ignore
/// on_both_stores! {
///     #[tokio::test]
///     first_test,
///     second_test,
///     #[tokio::test(flavor = "multi_thread")]
///     threaded_test,
/// }
/// ```
macro_rules! on_both_stores {
    ($(#[$attr:meta] $($name:ident),+ $(,)?)+) => {
        mod sled {
            $($(
                #[$attr]
                async fn $name() {
                    $crate::common::STORE
                        .scope($crate::common::StoreKind::Sled, super::$name())
                        .await
                }
            )+)+
        }
        mod postgres {
            $($(
                #[$attr]
                async fn $name() {
                    $crate::common::STORE
                        .scope($crate::common::StoreKind::Postgres, super::$name())
                        .await
                }
            )+)+
        }
    };
}
pub(crate) use on_both_stores;

/// A callers file in `dir` with one entry per `(name, bearer token, role, account glob)`, loaded.
/// The file holds only each token's SHA-256, as in production.
pub fn callers_file(dir: &Path, entries: &[(&str, &str, &str, &str)]) -> Callers {
    use sha2::Digest;
    let toml: String = entries
        .iter()
        .map(|(name, token, role, glob)| {
            let hash = hex::encode(sha2::Sha256::digest(token.as_bytes()));
            format!(
                "[[caller]]\nname = \"{name}\"\ntoken_sha256 = \"{hash}\"\nrole = \"{role}\"\naccounts = [\"{glob}\"]\n\n"
            )
        })
        .collect();
    let path = dir.join("callers.toml");
    std::fs::write(&path, toml).unwrap();
    Callers::load(&path).unwrap()
}
