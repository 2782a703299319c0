//! Test harness: the real server on an ephemeral loopback port with a temporary data directory,
//! in front of the strict fake EdgeTag, and typed helpers for the calls tests make.
#![allow(dead_code)] // each test binary uses its own subset

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use credential_service::{
    auth::Callers,
    broker::{Broker, BrokerConfig, RefreshPolicy},
    clock::Clock,
    config::{CallbackConfig, ServiceConfig, TlsConfig},
    fake_provider::{FakeConfig, FakeEdgeTag},
    oauth::ProviderConfig,
    proto::{
        BeginAuthRequest, BeginAuthResponse, CompleteAuthRequest, CompleteAuthResponse,
        GetTokenRequest, GetTokenResponse, credential_service_client::CredentialServiceClient,
    },
    sealing::{self, EncryptionConfig},
    server::{self, App, ServeError},
    store::Store,
};
use tempfile::TempDir;
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic::{
    Code, Request, Status,
    metadata::{Ascii, MetadataValue},
    service::{Interceptor, interceptor::InterceptedService},
    transport::Channel,
};
use url::Url;

pub const REDIRECT_URI: &str = "https://ops.example.com/oauth/callback";

/// Knobs a test may turn; everything else is the production default.
#[derive(Clone)]
pub struct Options {
    pub broker: BrokerConfig,
    pub request_timeout: Duration,
    pub default_token_lifetime: Duration,
    /// Send `redirect_uri` in the code exchange (strict OAuth servers).
    pub send_redirect_uri: bool,
    /// Who may call; open (no callers file) by default.
    pub callers: Callers,
    pub tls: Option<TlsConfig>,
    /// Key files; by default one random key in [`Options::key_dir`], kept across restarts.
    pub encryption: EncryptionConfig,
    /// Holds the default key file (outside the data directory, as in production).
    pub key_dir: Arc<TempDir>,
    /// Bearer token the harness's client sends (for servers with a callers file).
    pub token: Option<String>,
    /// Replaces the fake's revocation URL (e.g. with a closed port, to make EdgeTag unreachable).
    pub revoke_url: Option<Url>,
    /// Serve the browser callback on a port of its own; it becomes the redirect URI.
    pub callback: bool,
    /// Serve `/metrics` on a port of its own.
    pub metrics: bool,
}

/// Adds `authorization: Bearer <token>` to every call, if there is a token.
#[derive(Clone)]
pub struct Bearer(pub Option<MetadataValue<Ascii>>);

impl Bearer {
    pub fn new(token: Option<&str>) -> Self {
        Self(token.map(|t| format!("Bearer {t}").parse().unwrap()))
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
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
            default_token_lifetime: Duration::from_secs(3600),
            send_redirect_uri: false,
            callers: Callers::open(),
            tls: None,
            encryption: EncryptionConfig {
                key_file: Some(key_file),
                previous_key_files: Vec::new(),
            },
            key_dir,
            token: None,
            revoke_url: None,
            callback: false,
            metrics: false,
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
    pub store: Store,
    pub data_dir: Arc<TempDir>,
    pub options: Options,
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<Result<(), ServeError>>>,
}

pub fn fake_config(clock: &Clock) -> FakeConfig {
    FakeConfig {
        redirect_uris: vec![REDIRECT_URI.to_owned()],
        clock: clock.clone(),
        ..FakeConfig::default()
    }
}

impl TestApp {
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
        Self::start(fake, clock, data_dir, Options::default()).await
    }

    /// Starts a server on an existing fake, clock and data directory.
    pub async fn start(
        fake: Arc<FakeEdgeTag>,
        clock: Clock,
        data_dir: Arc<TempDir>,
        options: Options,
    ) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut config = service_config(&fake, data_dir.path().to_owned(), &options);
        let bind_http = async |wanted: bool| match wanted {
            true => Some(TcpListener::bind("127.0.0.1:0").await.unwrap()),
            false => None,
        };
        let callback = bind_http(options.callback).await;
        let metrics = bind_http(options.metrics).await;
        let http_url = |l: &Option<TcpListener>, path: &str| {
            l.as_ref()
                .map(|l| format!("http://{}{path}", l.local_addr().unwrap()))
        };
        let callback_url = http_url(&callback, "/oauth/callback");
        let metrics_url = http_url(&metrics, "/metrics");
        if let Some(url) = &callback_url {
            config.provider.redirect_uri = url.parse().unwrap();
            config.callback = Some(CallbackConfig {
                listen: callback.as_ref().unwrap().local_addr().unwrap(),
                path: "/oauth/callback".into(),
            });
        }
        let listeners = server::Listeners {
            grpc: listener,
            callback,
            metrics,
        };
        let (tx, rx) = oneshot::channel::<()>();
        let app = App::open(config, clock.clone()).expect("the service opens");
        let (broker, store) = (app.broker().clone(), app.store().clone());
        let server = tokio::spawn(server::serve(app, listeners, async {
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
            Bearer::new(options.token.as_deref()),
        );
        Self {
            addr,
            callback_url,
            metrics_url,
            client,
            fake,
            clock,
            broker,
            store,
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
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

pub fn service_config(fake: &FakeEdgeTag, data_dir: PathBuf, options: &Options) -> ServiceConfig {
    let url = |s: String| Url::parse(&s).unwrap();
    ServiceConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir,
        provider: ProviderConfig {
            authorize_url: url(fake.authorize_url()),
            token_url: url(fake.token_url()),
            revoke_url: options
                .revoke_url
                .clone()
                .unwrap_or_else(|| url(fake.revoke_url())),
            client_id: fake.config().client_id.clone(),
            client_secret: fake.config().client_secret.clone().into(),
            redirect_uri: url(REDIRECT_URI.to_owned()),
            scope: "full".into(),
            request_timeout: options.request_timeout,
            default_token_lifetime: options.default_token_lifetime,
            send_redirect_uri: options.send_redirect_uri,
        },
        broker: options.broker.clone(),
        callers: options.callers.clone(),
        tls: options.tls.clone(),
        encryption: options.encryption.clone(),
        callback: None,
        metrics_listen: None,
        audit: Default::default(),
    }
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

/// Everything every crate logs, at TRACE, kept in memory so a test can search it for secrets.
#[derive(Clone, Default)]
pub struct LogCapture(Arc<std::sync::Mutex<Vec<u8>>>);

impl LogCapture {
    /// Installs the capture as this test binary's global subscriber (once per binary).
    pub fn install_trace() -> Self {
        let capture = Self::default();
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_writer(capture.clone())
            .with_ansi(false)
            .init();
        capture
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl std::io::Write for LogCapture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogCapture {
    type Writer = LogCapture;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}
