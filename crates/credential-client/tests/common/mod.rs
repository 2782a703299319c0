//! The real credential service, in-process on a loopback port, in front of the strict fake
//! EdgeTag; it can be stopped and started again on the same address. And a GetToken-only
//! service, standing in for a server from before WatchToken.
#![allow(dead_code)] // each test binary uses its own subset

use std::{
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use credential_client::{Client, ClientBuilder, Error, Token, TokenSource};
use credential_service::{
    broker::{BrokerConfig, RefreshPolicy},
    clock::Clock,
    config::{ServiceConfig, Upstream},
    proto::{
        self, BeginAuthRequest, CompleteAuthRequest, GetTokenRequest, RefreshTokenRequest,
        RemoveAccountRequest,
        credential_service_client::CredentialServiceClient,
        credential_service_server::{CredentialService, CredentialServiceServer},
    },
    sealing::{self, EncryptionConfig},
    server::{self, ServeError},
};
use fake_edgetag::{FakeClock, FakeConfig, FakeEdgeTag};
use futures::{Stream, StreamExt};
use tempfile::TempDir;
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic::{Request, Response, Status, transport::Channel};
use url::Url;

const REDIRECT_URI: &str = "https://ops.example.com/oauth/callback";

/// A client of `addr` that judges expiry by `clock` and retries quickly, so tests wait little.
pub fn client(addr: SocketAddr, clock: &Clock) -> ClientBuilder {
    let clock = clock.clone();
    Client::builder(format!("http://{addr}"))
        .clock(move || clock.now())
        .reconnect_backoff(Duration::from_millis(10), Duration::from_millis(100))
}

/// Polls `f` every millisecond until it returns `Some`; fails the test after `limit`.
pub async fn until<T>(limit: Duration, what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(t) = f().await {
            return t;
        }
        assert!(Instant::now() < deadline, "gave up waiting for {what}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Waits until the source reports it lost the service, and returns why.
pub async fn lost(source: &TokenSource) -> Error {
    until(
        Duration::from_secs(10),
        "the source to notice",
        async || source.last_error(),
    )
    .await
}

/// The real service, stoppable and restartable on the same address.
pub struct Service {
    pub addr: SocketAddr,
    pub clock: Clock,
    pub fake: Arc<FakeEdgeTag>,
    pub broker: credential_service::broker::Broker,
    pub grpc: CredentialServiceClient<Channel>,
    root: Arc<TempDir>,
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<Result<(), ServeError>>>,
}

/// What a restart needs.
pub struct Stopped {
    addr: SocketAddr,
    clock: Clock,
    fake: Arc<FakeEdgeTag>,
    root: Arc<TempDir>,
}

impl Service {
    pub async fn spawn() -> Self {
        let clock = Clock::manual();
        let fake_clock = clock.clone();
        let fake = FakeEdgeTag::start(FakeConfig {
            redirect_uris: vec![REDIRECT_URI.to_owned()],
            clock: FakeClock::from_fn(move || fake_clock.now()),
            ..FakeConfig::default()
        })
        .await
        .expect("the fake EdgeTag starts");
        let root = Arc::new(tempfile::tempdir().unwrap());
        sealing::create_key_file(&root.path().join("current.key")).unwrap();
        let any_port = SocketAddr::from(([127, 0, 0, 1], 0));
        Self::start(any_port, clock, Arc::new(fake), root).await
    }

    async fn start(
        listen: SocketAddr,
        clock: Clock,
        fake: Arc<FakeEdgeTag>,
        root: Arc<TempDir>,
    ) -> Self {
        let url = |s: String| Url::parse(&s).unwrap();
        let upstream = Upstream {
            authorize_url: url(fake.authorize_url()),
            token_url: url(fake.token_url()),
            revoke_url: url(fake.revoke_url()),
            client_id: fake.config().client_id.clone(),
            client_secret: fake.config().client_secret.clone().into(),
            redirect_uri: url(REDIRECT_URI.to_owned()),
        };
        let mut config = ServiceConfig::new(upstream, root.path().join("data"));
        // The scheduler scans only when a test calls `broker.refresh_due()`.
        config.broker = BrokerConfig {
            refresh: RefreshPolicy {
                scan_interval: Duration::from_secs(24 * 3600),
                retry_base: Duration::from_millis(10),
                retry_budget: Duration::from_secs(2),
                ..RefreshPolicy::default()
            },
            ..BrokerConfig::default()
        };
        config.encryption = EncryptionConfig {
            key_file: Some(root.path().join("current.key")),
            previous_key_files: Vec::new(),
        };
        config.listen = listen;
        let service = server::Service::start(config, clock.clone())
            .await
            .expect("the service starts");
        let addr = service.grpc_addr();
        let broker = service.broker().clone();
        let (tx, rx) = oneshot::channel::<()>();
        let server = tokio::spawn(service.serve(async {
            let _ = rx.await;
        }));
        let grpc = CredentialServiceClient::new(
            Channel::from_shared(format!("http://{addr}"))
                .unwrap()
                .connect_lazy(),
        );
        Self {
            addr,
            clock,
            fake,
            broker,
            grpc,
            root,
            shutdown: Some(tx),
            server: Some(server),
        }
    }

    /// Graceful stop: streams end with UNAVAILABLE, the port closes.
    pub async fn stop(mut self) -> Stopped {
        self.shutdown.take().unwrap().send(()).ok();
        self.server
            .take()
            .unwrap()
            .await
            .unwrap()
            .expect("the server stops cleanly");
        Stopped {
            addr: self.addr,
            clock: self.clock.clone(),
            fake: self.fake.clone(),
            root: self.root.clone(),
        }
    }

    /// Starts again on the same address, data, clock and fake.
    pub async fn restart(stopped: Stopped) -> Self {
        // The port is free again: the service binds it anew.
        Self::start(stopped.addr, stopped.clock, stopped.fake, stopped.root).await
    }

    /// The whole connect flow for one account, as an operator and a browser do it.
    pub async fn connect(&self, account: &str) {
        let mut grpc = self.grpc.clone();
        let begun = grpc
            .begin_auth(BeginAuthRequest {
                account: account.into(),
            })
            .await
            .unwrap()
            .into_inner();
        let redirect = self.fake.approve(&begun.authorize_url).await.unwrap();
        grpc.complete_auth(CompleteAuthRequest {
            code: redirect.code,
            state: redirect.state,
        })
        .await
        .unwrap();
    }

    /// What GetToken answers now: (access token, expiry).
    pub async fn current(&self, account: &str) -> (String, SystemTime) {
        let r = self
            .grpc
            .clone()
            .get_token(GetTokenRequest {
                account: account.into(),
                min_validity: None,
            })
            .await
            .unwrap()
            .into_inner();
        (
            r.access_token,
            SystemTime::try_from(r.expires_at.unwrap()).unwrap(),
        )
    }

    /// An operator's RefreshToken.
    pub async fn refresh(&self, account: &str) {
        self.grpc
            .clone()
            .refresh_token(RefreshTokenRequest {
                account: account.into(),
            })
            .await
            .unwrap();
    }

    /// An operator's RemoveAccount.
    pub async fn remove(&self, account: &str) {
        self.grpc
            .clone()
            .remove_account(RemoveAccountRequest {
                account: account.into(),
                force: false,
            })
            .await
            .unwrap();
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// The secret of a token, for comparisons.
pub fn secret(token: &Token) -> String {
    use credential_client::ExposeSecret;
    token.access_token().expose_secret().to_owned()
}

/// A credential service from before WatchToken, or (with `watch`) one whose streams never push
/// after the first token: GetToken hands out `t-1`, `t-2`, … each living `lifetime`; `nobody`
/// is NOT_FOUND; everything else is UNIMPLEMENTED. Counts calls, connections and closed streams.
/// While `refuse_watch` holds a code, WatchToken fails with it (a full or failing service).
#[derive(Clone, Default)]
pub struct Legacy {
    pub watch: bool,
    pub refuse_watch: Arc<std::sync::Mutex<Option<tonic::Code>>>,
    pub lifetime: Duration,
    pub get_token_calls: Arc<AtomicUsize>,
    pub watch_token_calls: Arc<AtomicUsize>,
    pub streams_closed: Arc<AtomicUsize>,
    pub connections: Arc<AtomicUsize>,
    /// The `authorization` header of each GetToken call, in order (`-` when there was none).
    pub authorizations: Arc<std::sync::Mutex<Vec<String>>>,
}

impl Legacy {
    /// Serves on a fresh loopback port; stops when the test's runtime ends.
    pub async fn serve(&self) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = self.connections.clone();
        let incoming =
            tokio_stream::wrappers::TcpListenerStream::new(listener).inspect(move |_| {
                connections.fetch_add(1, Ordering::SeqCst);
            });
        let service = CredentialServiceServer::new(self.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(incoming),
        );
        addr
    }

    fn token(&self, n: usize) -> (String, prost_types::Timestamp) {
        (format!("t-{n}"), (SystemTime::now() + self.lifetime).into())
    }
}

/// Counts a closed stream when the server drops it (the client went away).
struct CountOnDrop(Arc<AtomicUsize>);

impl Drop for CountOnDrop {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

type TokenStream =
    Pin<Box<dyn Stream<Item = Result<proto::WatchTokenResponse, Status>> + Send + 'static>>;

fn unimplemented<T>() -> Result<Response<T>, Status> {
    Err(Status::unimplemented("not in this version"))
}

#[tonic::async_trait]
impl CredentialService for Legacy {
    type WatchTokenStream = TokenStream;

    async fn get_token(
        &self,
        request: Request<GetTokenRequest>,
    ) -> Result<Response<proto::GetTokenResponse>, Status> {
        let authorization = request
            .metadata()
            .get("authorization")
            .map_or("-".to_owned(), |v| v.to_str().unwrap_or("?").to_owned());
        self.authorizations.lock().unwrap().push(authorization);
        if request.get_ref().account == "nobody" {
            return Err(Status::not_found("account nobody is not connected"));
        }
        let n = self.get_token_calls.fetch_add(1, Ordering::SeqCst) + 1;
        let (access_token, expires_at) = self.token(n);
        Ok(Response::new(proto::GetTokenResponse {
            access_token,
            token_type: "Bearer".into(),
            expires_at: Some(expires_at),
            team_id: String::new(), // a service that knows no team (yet, or from before teams)
        }))
    }

    async fn watch_token(
        &self,
        _: Request<proto::WatchTokenRequest>,
    ) -> Result<Response<TokenStream>, Status> {
        let n = self.watch_token_calls.fetch_add(1, Ordering::SeqCst) + 1;
        if !self.watch {
            return unimplemented();
        }
        if let Some(code) = *self.refuse_watch.lock().unwrap() {
            return Err(Status::new(code, "refused by the test"));
        }
        let (access_token, expires_at) = self.token(n);
        let first = proto::WatchTokenResponse {
            access_token,
            token_type: "Bearer".into(),
            expires_at: Some(expires_at),
            team_id: String::new(),
        };
        let guard = CountOnDrop(self.streams_closed.clone());
        let stream = futures::stream::once(async move { Ok(first) }).chain(
            futures::stream::pending().map(move |()| {
                let _keep = &guard;
                Err(Status::internal("never"))
            }),
        );
        Ok(Response::new(Box::pin(stream)))
    }

    async fn begin_auth(
        &self,
        _: Request<BeginAuthRequest>,
    ) -> Result<Response<proto::BeginAuthResponse>, Status> {
        unimplemented()
    }
    async fn complete_auth(
        &self,
        _: Request<CompleteAuthRequest>,
    ) -> Result<Response<proto::CompleteAuthResponse>, Status> {
        unimplemented()
    }
    async fn list_accounts(
        &self,
        _: Request<proto::ListAccountsRequest>,
    ) -> Result<Response<proto::ListAccountsResponse>, Status> {
        unimplemented()
    }
    async fn describe_account(
        &self,
        _: Request<proto::DescribeAccountRequest>,
    ) -> Result<Response<proto::AccountInfo>, Status> {
        unimplemented()
    }
    async fn remove_account(
        &self,
        _: Request<RemoveAccountRequest>,
    ) -> Result<Response<proto::RemoveAccountResponse>, Status> {
        unimplemented()
    }
    async fn refresh_token(
        &self,
        _: Request<RefreshTokenRequest>,
    ) -> Result<Response<proto::RefreshTokenResponse>, Status> {
        unimplemented()
    }

    type WatchAccountsStream =
        Pin<Box<dyn Stream<Item = Result<proto::AccountEvent, Status>> + Send + 'static>>;

    async fn watch_accounts(
        &self,
        _: Request<proto::WatchAccountsRequest>,
    ) -> Result<Response<Self::WatchAccountsStream>, Status> {
        unimplemented()
    }
    async fn reseal_records(
        &self,
        _: Request<proto::ResealRecordsRequest>,
    ) -> Result<Response<proto::ResealRecordsResponse>, Status> {
        unimplemented()
    }

    type BackupStream =
        Pin<Box<dyn Stream<Item = Result<proto::BackupResponse, Status>> + Send + 'static>>;

    async fn backup(
        &self,
        _: Request<proto::BackupRequest>,
    ) -> Result<Response<Self::BackupStream>, Status> {
        unimplemented()
    }
    async fn import_grant(
        &self,
        _: Request<proto::ImportGrantRequest>,
    ) -> Result<Response<proto::ImportGrantResponse>, Status> {
        unimplemented()
    }
}
