//! A strict fake of EdgeTag's OAuth 2.0 provider, served over real HTTP on loopback.
//!
//! Integration tests, the service's `--dev` mode and the `fake-edgetag` binary talk to this instead of
//! EdgeTag. It speaks EdgeTag's wire format exactly (authorization code + PKCE S256, HTTP Basic client
//! authentication, `{"access_token","refresh_token","expires_in"}` with no `token_type`), and it is
//! deliberately *stricter* than EdgeTag is known to be: unknown form fields, missing Basic auth, a
//! wrong content type or a PKCE mismatch are all rejected, so a client that works against the fake
//! does not rely on the real provider being lenient. Every expiry decision reads the configured
//! [`FakeClock`], so a test hands in its own clock and moves time instead of sleeping.
//!
//! For failure testing the token endpoint has a fault queue ([`FakeEdgeTag::push_faults`],
//! [`FakeEdgeTag::set_persistent_fault`]) covering HTTP errors, garbage bodies, hangs and dropped
//! connections, plus counters ([`FakeEdgeTag::stats`]) including the peak number of token requests
//! in flight at once, for checking an upstream concurrency cap.
//!
//! Endpoints:
//! - `GET  /oauth/app/login`: authorize; auto-approves (no login UI) and redirects with a code.
//! - `POST /v1/oauth-app/client/token`: `authorization_code` and `refresh_token` grants.
//! - `POST /v1/oauth-app/client/revoke`: RFC 7009 revocation of a whole grant.
//! - `GET  /v1/user/me`: answers 200 for a live access token, 401 otherwise.

use std::{
    collections::{HashMap, VecDeque},
    io,
    net::{Ipv4Addr, SocketAddr},
    pin::Pin,
    sync::{
        Arc, Mutex, MutexGuard, Weak,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, SystemTime},
};

use axum::{
    Router,
    body::Bytes,
    extract::{ConnectInfo, RawQuery, State, connect_info::Connected},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
    serve::{IncomingStream, Listener},
};
use base64::{
    Engine,
    engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD},
};
use futures::task::AtomicWaker;
use rand::RngCore;
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpSocket, TcpStream},
    sync::watch,
    task::JoinHandle,
};
use url::Url;

/// Path of the browser-facing authorize endpoint.
pub const AUTHORIZE_PATH: &str = "/oauth/app/login";
/// Path of the token endpoint.
pub const TOKEN_PATH: &str = "/v1/oauth-app/client/token";
/// Path of the revocation endpoint.
pub const REVOKE_PATH: &str = "/v1/oauth-app/client/revoke";
/// Path of the "who am I" endpoint, used to ask whether an access token is accepted.
pub const USER_ME_PATH: &str = "/v1/user/me";

/// How long an authorization code stays redeemable after it is issued.
pub const CODE_LIFETIME: Duration = Duration::from_secs(600);

/// The team every access token belongs to, as reported by `/v1/user/me`.
pub const FAKE_TEAM_ID: &str = "team-fake";

/// Listen backlog for [`FakeEdgeTag::start`]: tests open thousands of connections at once, and a
/// small backlog turns that into SYN retransmits (multi-second stalls) rather than errors.
const LISTEN_BACKLOG: u32 = 8192;

/// How the fake is set up. [`Default`] gives a ready-to-use client that accepts any redirect URI.
#[derive(Clone, Debug)]
pub struct FakeConfig {
    /// The only client id the fake knows.
    pub client_id: String,
    /// The secret that client must present in HTTP Basic auth.
    pub client_secret: String,
    /// Redirect URIs accepted by the authorize endpoint (exact string match). Empty accepts any
    /// absolute `http`/`https` URL without a fragment, which suits tests on random ports.
    pub redirect_uris: Vec<String>,
    /// Lifetime of issued access tokens, reported as `expires_in`. EdgeTag uses two hours.
    pub access_token_lifetime: Duration,
    /// Whether a refresh returns a new refresh token and invalidates the old one. EdgeTag does not
    /// rotate; turn this on to check that a client copes with providers that do.
    pub rotate_refresh_tokens: bool,
    /// Whether the token endpoint tolerates `redirect_uri` in the code-exchange body (it must then
    /// equal the one the code was issued for). EdgeTag documents no such field, so the default is
    /// to reject it like any other unknown field.
    pub accept_redirect_uri_in_body: bool,
    /// Source of "now" for every expiry decision.
    pub clock: FakeClock,
}

impl Default for FakeConfig {
    fn default() -> Self {
        Self {
            client_id: "00000000-0000-4000-8000-000000000001".to_owned(),
            client_secret: "fake-client-secret".to_owned(),
            redirect_uris: Vec::new(),
            access_token_lifetime: Duration::from_secs(7200),
            rotate_refresh_tokens: false,
            accept_redirect_uri_in_body: false,
            clock: FakeClock::system(),
        }
    }
}

/// Where the fake reads "now". A test that moves its client's clock hands in a reading of that same
/// clock, so the fake and the client agree on when codes and tokens expire.
#[derive(Clone)]
pub struct FakeClock(Arc<dyn Fn() -> SystemTime + Send + Sync>);

impl FakeClock {
    /// The system clock.
    pub fn system() -> Self {
        Self::from_fn(SystemTime::now)
    }

    /// A clock that reads `now` each time the fake needs the time.
    pub fn from_fn(now: impl Fn() -> SystemTime + Send + Sync + 'static) -> Self {
        Self(Arc::new(now))
    }

    /// The current instant as this clock sees it.
    pub fn now(&self) -> SystemTime {
        (self.0)()
    }
}

impl Default for FakeClock {
    fn default() -> Self {
        Self::system()
    }
}

impl std::fmt::Debug for FakeClock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FakeClock")
    }
}

/// A misbehaviour of the token endpoint, injected by tests.
///
/// A fault replaces the endpoint's answer *before* any authentication or body check, except the
/// variants documented as processing the request normally (tokens are then really issued).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// That status with an empty body. A number outside 100..=999 is answered as 500.
    Status(u16),
    /// 500 with an HTML error page, like a crashed backend behind a proxy.
    ServerError,
    /// 503 with an HTML error page, like an overloaded load balancer.
    ServiceUnavailable,
    /// 429 with a `Retry-After` header and an empty body.
    TooManyRequests {
        /// Value of the `Retry-After` header, in seconds.
        retry_after_secs: u64,
    },
    /// Waits this long, then processes the request normally.
    Delay(Duration),
    /// Never answers; the request stays open until the client gives up (or the fake is dropped).
    Hang,
    /// Closes the TCP connection without writing any byte of a response.
    DropConnection,
    /// 200 with the truncated JSON body `{"access_token": `.
    MalformedJson,
    /// 200 with an HTML page instead of JSON, like a captive portal or login wall.
    HtmlPage,
    /// 200 with an empty body.
    EmptyBody,
    /// 200 whose JSON body is `{"error":"server_error"}`.
    ErrorIn200,
    /// 400 `{"error":"invalid_grant"}`, whatever the request.
    InvalidGrant,
    /// 401 `{"error":"invalid_client"}`, whatever the request.
    InvalidClient,
    /// Processes the request normally but leaves `expires_in` out of a successful answer.
    MissingExpiresIn,
    /// Processes the request normally but sends `"expires_in":"7200"` (a string) on success.
    ExpiresInAsString,
}

/// Counters, read with [`FakeEdgeTag::stats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FakeStats {
    /// Authorize requests (HTTP or [`FakeEdgeTag::approve`]), valid or not.
    pub authorize: u64,
    /// Every request to the token endpoint, including faulted and rejected ones.
    pub token_requests: u64,
    /// Successful `authorization_code` exchanges.
    pub code_exchanges_ok: u64,
    /// Successful `refresh_token` grants.
    pub refreshes_ok: u64,
    /// Accepted revocation requests (including those naming an unknown token).
    pub revokes: u64,
    /// Most token requests in flight at the same moment since start or [`FakeEdgeTag::reset_peak`].
    pub peak_token_concurrency: u64,
}

/// The outcome of an approved authorization: where the browser is sent, and what it carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Redirect {
    /// The one-time authorization code (`etc_…`).
    pub code: String,
    /// The `state` echoed back from the authorize request.
    pub state: String,
    /// The full `Location` URL: the redirect URI plus `code` and `state`.
    pub location: String,
}

/// A running fake provider. Dropping it stops the server and closes every open connection, so a
/// client holding pooled connections sees the provider vanish rather than keep answering.
pub struct FakeEdgeTag {
    inner: Arc<Inner>,
    addr: SocketAddr,
    server: JoinHandle<()>,
}

impl FakeEdgeTag {
    /// Serves on a fresh `127.0.0.1` port.
    pub async fn start(config: FakeConfig) -> io::Result<FakeEdgeTag> {
        let socket = TcpSocket::new_v4()?;
        socket.bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))?;
        let listener = socket.listen(LISTEN_BACKLOG)?;
        Self::start_on(listener, config).await
    }

    /// Serves on a listener the caller bound (e.g. a fixed port for the `fake-edgetag` binary).
    pub async fn start_on(listener: TcpListener, config: FakeConfig) -> io::Result<FakeEdgeTag> {
        let addr = listener.local_addr()?;
        let (shutdown, _) = watch::channel(false);
        let inner = Arc::new(Inner {
            config,
            store: Mutex::default(),
            faults: Mutex::default(),
            token_delay_nanos: AtomicU64::new(0),
            counters: Counters::default(),
            connections: Arc::default(),
            shutdown,
        });
        let router = Router::new()
            .route(AUTHORIZE_PATH, get(authorize_handler))
            .route(TOKEN_PATH, post(token_handler))
            .route(REVOKE_PATH, post(revoke_handler))
            .route(USER_ME_PATH, get(user_me_handler))
            .with_state(inner.clone());
        let listener = KillableListener {
            inner: listener,
            connections: inner.connections.clone(),
        };
        let server = tokio::spawn(async move {
            // Serving only ends with an abort from `Drop`; the result is infallible.
            let _ = axum::serve(
                listener,
                router.into_make_service_with_connect_info::<ConnHandle>(),
            )
            .await;
        });
        tracing::debug!(%addr, "fake EdgeTag listening");
        Ok(FakeEdgeTag {
            inner,
            addr,
            server,
        })
    }

    /// The address the fake listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`, without a trailing slash.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// URL of the authorize endpoint, to configure the service's `--authorize-url`.
    pub fn authorize_url(&self) -> String {
        format!("{}{AUTHORIZE_PATH}", self.base_url())
    }

    /// URL of the token endpoint, to configure the service's `--token-url`.
    pub fn token_url(&self) -> String {
        format!("{}{TOKEN_PATH}", self.base_url())
    }

    /// URL of the revocation endpoint, to configure the service's `--revoke-url`.
    pub fn revoke_url(&self) -> String {
        format!("{}{REVOKE_PATH}", self.base_url())
    }

    /// URL of `/v1/user/me`.
    pub fn user_me_url(&self) -> String {
        format!("{}{USER_ME_PATH}", self.base_url())
    }

    /// The configuration the fake runs with (client credentials, clock, …).
    pub fn config(&self) -> &FakeConfig {
        &self.inner.config
    }

    /// The client id the fake accepts.
    pub fn client_id(&self) -> &str {
        &self.inner.config.client_id
    }

    /// The client secret the fake accepts.
    pub fn client_secret(&self) -> &str {
        &self.inner.config.client_secret
    }

    /// Queues faults; each answers exactly one later token request, in order. Queued faults take
    /// precedence over a persistent one.
    pub fn push_faults(&self, faults: impl IntoIterator<Item = Fault>) {
        lock(&self.inner.faults).queue.extend(faults);
    }

    /// Answers every token request not claimed by a queued fault with `fault`, until cleared
    /// with `None`.
    pub fn set_persistent_fault(&self, fault: Option<Fault>) {
        lock(&self.inner.faults).persistent = fault;
    }

    /// Drops every queued fault that has not fired yet.
    pub fn clear_faults(&self) {
        lock(&self.inner.faults).queue.clear();
    }

    /// Makes every token request wait this long before answering, so that concurrency is
    /// observable. Zero (the default) disables it.
    pub fn set_token_delay(&self, delay: Duration) {
        let nanos = u64::try_from(delay.as_nanos()).unwrap_or(u64::MAX);
        self.inner.token_delay_nanos.store(nanos, Ordering::Relaxed);
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> FakeStats {
        let c = &self.inner.counters;
        FakeStats {
            authorize: c.authorize.load(Ordering::Relaxed),
            token_requests: c.token_requests.load(Ordering::Relaxed),
            code_exchanges_ok: c.code_exchanges_ok.load(Ordering::Relaxed),
            refreshes_ok: c.refreshes_ok.load(Ordering::Relaxed),
            revokes: c.revokes.load(Ordering::Relaxed),
            peak_token_concurrency: c.token_peak.load(Ordering::SeqCst),
        }
    }

    /// Token requests being handled right now, for waiting until a burst has arrived.
    pub fn token_requests_in_flight(&self) -> u64 {
        self.inner.counters.token_in_flight.load(Ordering::SeqCst)
    }

    /// Restarts peak tracking from the number of token requests currently in flight.
    pub fn reset_peak(&self) {
        let c = &self.inner.counters;
        c.token_peak
            .store(c.token_in_flight.load(Ordering::SeqCst), Ordering::SeqCst);
    }

    /// Approves an authorize URL as the browser flow would, without HTTP: same validation, same
    /// code issuing, same counter. The error is the problem the HTTP endpoint would report.
    pub async fn approve(&self, authorize_url: &str) -> Result<Redirect, String> {
        self.inner
            .counters
            .authorize
            .fetch_add(1, Ordering::Relaxed);
        let url =
            Url::parse(authorize_url).map_err(|e| format!("unparsable authorize URL: {e}"))?;
        if url.path() != AUTHORIZE_PATH {
            return Err(format!(
                "authorize URL path is {:?}, expected {AUTHORIZE_PATH:?}",
                url.path()
            ));
        }
        self.inner.authorize(url.query().unwrap_or(""))
    }

    /// Whether `/v1/user/me` would accept this access token now (known, unrevoked, unexpired).
    pub fn access_token_is_valid(&self, token: &str) -> bool {
        let now = self.inner.config.clock.now();
        lock(&self.inner.store).access_token_is_valid(token, now)
    }

    /// Whether a `refresh_token` grant with this token would succeed now.
    pub fn refresh_token_is_valid(&self, token: &str) -> bool {
        lock(&self.inner.store).refresh.contains_key(token)
    }

    /// Creates a grant as if an authorization code had been exchanged long ago and returns its
    /// refresh token, so benchmarks can store thousands of refreshable accounts without running
    /// the browser flow for each.
    pub fn seed_grant(&self) -> String {
        let mut store = lock(&self.inner.store);
        let grant = store.new_grant();
        store.issue_refresh_token(grant)
    }

    /// Every refresh token issued so far, live or not: tests search logs and disks for them.
    pub fn issued_refresh_tokens(&self) -> Vec<String> {
        lock(&self.inner.store).issued_refresh.clone()
    }

    /// Every `code_verifier` received at the token endpoint: tests search logs and disks for them.
    pub fn received_code_verifiers(&self) -> Vec<String> {
        lock(&self.inner.store).received_verifiers.clone()
    }

    /// Invalidates every refresh token (access tokens stay valid), so the next refresh fails with
    /// `invalid_grant` the way it does when a user disconnects the app at EdgeTag.
    pub fn revoke_all_refresh_tokens(&self) {
        let mut store = lock(&self.inner.store);
        store.refresh.clear();
        for grant in store.grants.values_mut() {
            grant.refresh_token = None;
        }
    }
}

impl Drop for FakeEdgeTag {
    fn drop(&mut self) {
        self.inner.shutdown.send_replace(true);
        self.inner.connections.kill_all();
        self.server.abort();
    }
}

impl std::fmt::Debug for FakeEdgeTag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeEdgeTag")
            .field("addr", &self.addr)
            .field("client_id", &self.inner.config.client_id)
            .finish_non_exhaustive()
    }
}

// ---------------------------------------------------------------------------------------------
// Shared state
// ---------------------------------------------------------------------------------------------

struct Inner {
    config: FakeConfig,
    store: Mutex<Store>,
    faults: Mutex<Faults>,
    token_delay_nanos: AtomicU64,
    counters: Counters,
    connections: Arc<Connections>,
    /// Flips to `true` when the fake is dropped; releases [`Fault::Hang`] handlers.
    shutdown: watch::Sender<bool>,
}

#[derive(Default)]
struct Counters {
    authorize: AtomicU64,
    token_requests: AtomicU64,
    code_exchanges_ok: AtomicU64,
    refreshes_ok: AtomicU64,
    revokes: AtomicU64,
    token_in_flight: AtomicU64,
    token_peak: AtomicU64,
}

#[derive(Default)]
struct Faults {
    queue: VecDeque<Fault>,
    persistent: Option<Fault>,
}

/// Counts one token request as in flight for as long as it lives.
struct InFlight<'a>(&'a Counters);

impl<'a> InFlight<'a> {
    fn enter(counters: &'a Counters) -> Self {
        let now = counters.token_in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        counters.token_peak.fetch_max(now, Ordering::SeqCst);
        InFlight(counters)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.token_in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Locks a mutex, ignoring poisoning: every critical section leaves the data consistent.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

struct PendingCode {
    client_id: String,
    redirect_uri: String,
    code_challenge: String,
    issued_at: SystemTime,
}

struct Grant {
    revoked: bool,
    /// The grant's current refresh token, if it still has one.
    refresh_token: Option<String>,
}

struct AccessToken {
    grant: u64,
    expires_at: SystemTime,
}

/// Codes, grants and tokens. Held under a `std` mutex for a few map operations at a time.
#[derive(Default)]
struct Store {
    codes: HashMap<String, PendingCode>,
    grants: HashMap<u64, Grant>,
    access: HashMap<String, AccessToken>,
    /// Live refresh token → grant id.
    refresh: HashMap<String, u64>,
    /// Every refresh token ever issued and every verifier ever received, for leak-scanning tests.
    issued_refresh: Vec<String>,
    received_verifiers: Vec<String>,
    next_grant_id: u64,
}

impl Store {
    fn access_token_is_valid(&self, token: &str, now: SystemTime) -> bool {
        self.access.get(token).is_some_and(|t| {
            now < t.expires_at && self.grants.get(&t.grant).is_some_and(|g| !g.revoked)
        })
    }

    /// Forgets expired codes and access tokens once the maps have doubled since the last sweep,
    /// keeping memory bounded in long `--dev` runs at amortised constant cost.
    fn sweep(&mut self, now: SystemTime) {
        if self.codes.len() >= 1024 && self.codes.len() == self.codes.capacity() {
            self.codes.retain(|_, c| now < c.issued_at + CODE_LIFETIME);
        }
        if self.access.len() >= 1024 && self.access.len() == self.access.capacity() {
            self.access.retain(|_, t| now < t.expires_at);
        }
    }

    fn new_grant(&mut self) -> u64 {
        self.next_grant_id += 1;
        let id = self.next_grant_id;
        self.grants.insert(
            id,
            Grant {
                revoked: false,
                refresh_token: None,
            },
        );
        id
    }

    fn issue_access_token(&mut self, grant: u64, now: SystemTime, lifetime: Duration) -> String {
        self.sweep(now);
        let token = random_token("eta_");
        self.access.insert(
            token.clone(),
            AccessToken {
                grant,
                expires_at: now + lifetime,
            },
        );
        token
    }

    /// Gives the grant a fresh refresh token, invalidating its previous one.
    fn issue_refresh_token(&mut self, grant: u64) -> String {
        let token = random_token("etr_");
        if let Some(g) = self.grants.get_mut(&grant)
            && let Some(old) = g.refresh_token.replace(token.clone())
        {
            self.refresh.remove(&old);
        }
        self.refresh.insert(token.clone(), grant);
        self.issued_refresh.push(token.clone());
        token
    }

    fn revoke_grant(&mut self, grant: u64) {
        if let Some(g) = self.grants.get_mut(&grant) {
            g.revoked = true;
            if let Some(old) = g.refresh_token.take() {
                self.refresh.remove(&old);
            }
        }
    }
}

/// A prefixed random token: 256 bits, base64url without padding.
fn random_token(prefix: &str) -> String {
    format!("{prefix}{}", random_base64url())
}

/// 256 random bits, base64url without padding: 43 characters, also a valid PKCE verifier.
fn random_base64url() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

// ---------------------------------------------------------------------------------------------
// Authorize
// ---------------------------------------------------------------------------------------------

impl Inner {
    /// Validates an authorize query string and issues a code. The error names the problem.
    fn authorize(&self, query: &str) -> Result<Redirect, String> {
        let params = parse_form(query.as_bytes()).map_err(|e| e.to_string())?;
        let get = |name: &str| -> Result<&str, String> {
            params
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
                .ok_or_else(|| format!("missing parameter `{name}`"))
        };
        let client_id = get("client_id")?;
        if client_id != self.config.client_id {
            return Err(format!("unknown client_id {client_id:?}"));
        }
        let redirect_uri = get("redirect_uri")?;
        let mut location = self.check_redirect_uri(redirect_uri)?;
        let response_type = get("response_type")?;
        if response_type != "code" {
            return Err(format!(
                "response_type must be \"code\", got {response_type:?}"
            ));
        }
        let scope = get("scope")?;
        if scope != "full" {
            return Err(format!("scope must be \"full\", got {scope:?}"));
        }
        let method = get("code_challenge_method")?;
        if method != "S256" {
            return Err(format!(
                "code_challenge_method must be \"S256\", got {method:?}"
            ));
        }
        let code_challenge = get("code_challenge")?;
        if !is_s256_challenge(code_challenge) {
            return Err(
                "code_challenge must be 43 characters of base64url without padding".to_owned(),
            );
        }
        let state = get("state")?;
        if state.is_empty() {
            return Err("state must not be empty".to_owned());
        }

        let code = random_token("etc_");
        let now = self.config.clock.now();
        {
            let mut store = lock(&self.store);
            store.sweep(now);
            store.codes.insert(
                code.clone(),
                PendingCode {
                    client_id: client_id.to_owned(),
                    redirect_uri: redirect_uri.to_owned(),
                    code_challenge: code_challenge.to_owned(),
                    issued_at: now,
                },
            );
        }
        location
            .query_pairs_mut()
            .append_pair("code", &code)
            .append_pair("state", state);
        tracing::debug!("fake EdgeTag issued an authorization code");
        Ok(Redirect {
            code,
            state: state.to_owned(),
            location: location.into(),
        })
    }

    /// Checks a redirect URI against the configuration and parses it for appending the answer.
    fn check_redirect_uri(&self, redirect_uri: &str) -> Result<Url, String> {
        let configured = &self.config.redirect_uris;
        if !configured.is_empty() && !configured.iter().any(|u| u == redirect_uri) {
            return Err(format!(
                "redirect_uri {redirect_uri:?} is not registered for this client"
            ));
        }
        let url =
            Url::parse(redirect_uri).map_err(|e| format!("redirect_uri is not a URL: {e}"))?;
        if !matches!(url.scheme(), "http" | "https") || !url.has_host() {
            return Err(format!(
                "redirect_uri {redirect_uri:?} is not an absolute http(s) URL"
            ));
        }
        if url.fragment().is_some() {
            return Err("redirect_uri must not contain a fragment".to_owned());
        }
        Ok(url)
    }
}

/// RFC 7636 §4.2: `BASE64URL-NOPAD(SHA256(verifier))`. The fake's own, so that a mistake in the
/// client's PKCE code cannot be mirrored here and pass unnoticed.
fn s256_challenge(verifier: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()))
}

/// RFC 7636 S256 challenge: base64url (no padding) of a SHA-256 digest, hence 43 characters.
fn is_s256_challenge(s: &str) -> bool {
    s.len() == 43
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// RFC 7636 §4.1: 43–128 characters from the unreserved set.
fn is_code_verifier(s: &str) -> bool {
    (43..=128).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'))
}

async fn authorize_handler(State(fake): State<Arc<Inner>>, RawQuery(query): RawQuery) -> Response {
    fake.counters.authorize.fetch_add(1, Ordering::Relaxed);
    match fake.authorize(query.as_deref().unwrap_or("")) {
        Ok(redirect) => match HeaderValue::from_str(&redirect.location) {
            Ok(location) => (StatusCode::FOUND, [(header::LOCATION, location)]).into_response(),
            Err(_) => error_page(
                StatusCode::BAD_REQUEST,
                "redirect_uri is not a valid header",
            ),
        },
        Err(problem) => error_page(StatusCode::BAD_REQUEST, &problem),
    }
}

/// A small HTML page for the browser-facing endpoint.
fn error_page(status: StatusCode, problem: &str) -> Response {
    let body = format!(
        "<!doctype html>\n<html><head><title>Fake EdgeTag: authorization error</title></head>\
         <body><h1>Authorization error</h1><p>{}</p></body></html>\n",
        html_escape(problem)
    );
    (
        status,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        body,
    )
        .into_response()
}

/// Escapes the five characters that matter in HTML text and attribute values.
fn html_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Token and revoke
// ---------------------------------------------------------------------------------------------

/// How a successful token answer is shaped ([`Fault::MissingExpiresIn`] and friends).
#[derive(Clone, Copy)]
enum Shape {
    Normal,
    NoExpiresIn,
    ExpiresInAsString,
}

async fn token_handler(
    State(fake): State<Arc<Inner>>,
    ConnectInfo(conn): ConnectInfo<ConnHandle>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    fake.counters.token_requests.fetch_add(1, Ordering::Relaxed);
    let _in_flight = InFlight::enter(&fake.counters);
    // Claim the fault on arrival so "the Nth request gets the Nth fault" holds under concurrency.
    let fault = {
        let mut faults = lock(&fake.faults);
        faults
            .queue
            .pop_front()
            .or_else(|| faults.persistent.clone())
    };
    let delay = Duration::from_nanos(fake.token_delay_nanos.load(Ordering::Relaxed));
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let shape = match fault {
        None => Shape::Normal,
        Some(Fault::Delay(d)) => {
            tokio::time::sleep(d).await;
            Shape::Normal
        }
        Some(Fault::MissingExpiresIn) => Shape::NoExpiresIn,
        Some(Fault::ExpiresInAsString) => Shape::ExpiresInAsString,
        Some(Fault::Hang) => {
            let mut shutdown = fake.shutdown.subscribe();
            // Errors only if the sender is gone, which also means shutdown.
            let _ = shutdown.wait_for(|stopped| *stopped).await;
            conn.kill();
            return StatusCode::SERVICE_UNAVAILABLE.into_response();
        }
        Some(Fault::DropConnection) => {
            // The connection's I/O now fails, so hyper closes the socket instead of writing this.
            conn.kill();
            return StatusCode::INTERNAL_SERVER_ERROR.into_response();
        }
        Some(fault) => return canned_fault_response(&fault),
    };
    fake.token(&headers, &body, shape)
}

fn canned_fault_response(fault: &Fault) -> Response {
    match fault {
        Fault::Status(code) => StatusCode::from_u16(*code)
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
            .into_response(),
        Fault::ServerError => html(
            StatusCode::INTERNAL_SERVER_ERROR,
            "<!doctype html>\n<html><head><title>500 Internal Server Error</title></head>\
             <body><h1>Internal Server Error</h1></body></html>\n",
        ),
        Fault::ServiceUnavailable => html(
            StatusCode::SERVICE_UNAVAILABLE,
            "<!doctype html>\n<html><head><title>503 Service Unavailable</title></head>\
             <body><h1>Service Unavailable</h1></body></html>\n",
        ),
        Fault::TooManyRequests { retry_after_secs } => (
            StatusCode::TOO_MANY_REQUESTS,
            [(header::RETRY_AFTER, retry_after_secs.to_string())],
        )
            .into_response(),
        Fault::MalformedJson => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            r#"{"access_token": "#,
        )
            .into_response(),
        Fault::HtmlPage => html(
            StatusCode::OK,
            "<!doctype html>\n<html><head><title>Sign in</title></head>\
             <body><h1>Please sign in</h1></body></html>\n",
        ),
        Fault::EmptyBody => {
            (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")]).into_response()
        }
        Fault::ErrorIn200 => json_response(StatusCode::OK, &json!({"error": "server_error"})),
        Fault::InvalidGrant => oauth_error(StatusCode::BAD_REQUEST, "invalid_grant"),
        Fault::InvalidClient => oauth_error(StatusCode::UNAUTHORIZED, "invalid_client"),
        // Handled by the caller because they need the request or the connection.
        Fault::Delay(_)
        | Fault::Hang
        | Fault::DropConnection
        | Fault::MissingExpiresIn
        | Fault::ExpiresInAsString => unreachable!("{fault:?} is not a canned response"),
    }
}

async fn revoke_handler(
    State(fake): State<Arc<Inner>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    fake.revoke(&headers, &body)
}

/// A form field set with duplicates rejected (RFC 6749 §3.1: parameters must not repeat).
type Form = Vec<(String, String)>;

#[derive(Debug, thiserror::Error)]
#[error("parameter `{0}` is repeated")]
struct RepeatedParameter(String);

fn parse_form(bytes: &[u8]) -> Result<Form, RepeatedParameter> {
    let mut form: Form = Vec::new();
    for (k, v) in url::form_urlencoded::parse(bytes) {
        if form.iter().any(|(seen, _)| *seen == k) {
            return Err(RepeatedParameter(k.into_owned()));
        }
        form.push((k.into_owned(), v.into_owned()));
    }
    Ok(form)
}

fn form_get<'a>(form: &'a Form, name: &str) -> Option<&'a str> {
    form.iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// Why a client request was refused, mapped to the OAuth error answer.
enum Refusal {
    InvalidClient,
    InvalidRequest,
    InvalidGrant,
    UnsupportedGrantType,
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        match self {
            Refusal::InvalidClient => oauth_error(StatusCode::UNAUTHORIZED, "invalid_client"),
            Refusal::InvalidRequest => oauth_error(StatusCode::BAD_REQUEST, "invalid_request"),
            Refusal::InvalidGrant => oauth_error(StatusCode::BAD_REQUEST, "invalid_grant"),
            Refusal::UnsupportedGrantType => {
                oauth_error(StatusCode::BAD_REQUEST, "unsupported_grant_type")
            }
        }
    }
}

impl Inner {
    /// Checks Basic client authentication and the form encoding shared by token and revoke.
    fn client_form(&self, headers: &HeaderMap, body: &[u8]) -> Result<Form, Refusal> {
        let (id, secret) = basic_credentials(headers).ok_or(Refusal::InvalidClient)?;
        // Both comparisons run regardless of the first result, on fixed-size digests.
        let id_ok = digest_eq(id.as_bytes(), self.config.client_id.as_bytes());
        let secret_ok = digest_eq(secret.as_bytes(), self.config.client_secret.as_bytes());
        if !(id_ok & secret_ok) {
            return Err(Refusal::InvalidClient);
        }
        if !is_form_urlencoded(headers) {
            return Err(Refusal::InvalidRequest);
        }
        parse_form(body).map_err(|_| Refusal::InvalidRequest)
    }

    fn token(&self, headers: &HeaderMap, body: &[u8], shape: Shape) -> Response {
        let result =
            self.client_form(headers, body)
                .and_then(|form| match form_get(&form, "grant_type") {
                    None => Err(Refusal::InvalidRequest),
                    Some("authorization_code") => self.exchange_code(&form),
                    Some("refresh_token") => self.refresh(&form),
                    Some(_) => Err(Refusal::UnsupportedGrantType),
                });
        match result {
            Ok(mut answer) => {
                match shape {
                    Shape::Normal => {}
                    Shape::NoExpiresIn => {
                        answer.remove("expires_in");
                    }
                    Shape::ExpiresInAsString => {
                        let secs = self.config.access_token_lifetime.as_secs().to_string();
                        answer.insert("expires_in".to_owned(), secs.into());
                    }
                }
                json_response(StatusCode::OK, &answer.into())
            }
            Err(refusal) => refusal.into_response(),
        }
    }

    fn exchange_code(
        &self,
        form: &Form,
    ) -> Result<serde_json::Map<String, serde_json::Value>, Refusal> {
        let allowed: &[&str] = if self.config.accept_redirect_uri_in_body {
            &["grant_type", "code", "code_verifier", "redirect_uri"]
        } else {
            &["grant_type", "code", "code_verifier"]
        };
        only_fields(form, allowed)?;
        let code = form_get(form, "code").ok_or(Refusal::InvalidRequest)?;
        let verifier = form_get(form, "code_verifier").ok_or(Refusal::InvalidRequest)?;
        let body_redirect_uri = form_get(form, "redirect_uri");

        let now = self.config.clock.now();
        let mut store = lock(&self.store);
        // Burnt on first use, whatever the outcome.
        store.received_verifiers.push(verifier.to_owned());
        let pending = store.codes.remove(code).ok_or(Refusal::InvalidGrant)?;
        let fresh = now < pending.issued_at + CODE_LIFETIME;
        let challenge = s256_challenge(verifier);
        let verifier_ok = is_code_verifier(verifier) && challenge == pending.code_challenge;
        let redirect_ok = body_redirect_uri.is_none_or(|uri| uri == pending.redirect_uri);
        if !(fresh && verifier_ok && redirect_ok && pending.client_id == self.config.client_id) {
            return Err(Refusal::InvalidGrant);
        }
        let grant = store.new_grant();
        let access = store.issue_access_token(grant, now, self.config.access_token_lifetime);
        let refresh = store.issue_refresh_token(grant);
        drop(store);

        self.counters
            .code_exchanges_ok
            .fetch_add(1, Ordering::Relaxed);
        tracing::debug!(
            grant_type = "authorization_code",
            "fake EdgeTag issued tokens"
        );
        Ok(self.token_answer(access, Some(refresh)))
    }

    fn refresh(&self, form: &Form) -> Result<serde_json::Map<String, serde_json::Value>, Refusal> {
        only_fields(form, &["grant_type", "refresh_token"])?;
        let presented = form_get(form, "refresh_token").ok_or(Refusal::InvalidRequest)?;

        let now = self.config.clock.now();
        let mut store = lock(&self.store);
        let grant = *store.refresh.get(presented).ok_or(Refusal::InvalidGrant)?;
        let access = store.issue_access_token(grant, now, self.config.access_token_lifetime);
        let rotated = self
            .config
            .rotate_refresh_tokens
            .then(|| store.issue_refresh_token(grant));
        drop(store);

        self.counters.refreshes_ok.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(
            grant_type = "refresh_token",
            rotated = rotated.is_some(),
            "fake EdgeTag issued tokens"
        );
        Ok(self.token_answer(access, rotated))
    }

    /// EdgeTag's token answer: no `token_type`, no `scope`.
    fn token_answer(
        &self,
        access: String,
        refresh: Option<String>,
    ) -> serde_json::Map<String, serde_json::Value> {
        let mut answer = serde_json::Map::new();
        answer.insert("access_token".to_owned(), access.into());
        if let Some(refresh) = refresh {
            answer.insert("refresh_token".to_owned(), refresh.into());
        }
        answer.insert(
            "expires_in".to_owned(),
            self.config.access_token_lifetime.as_secs().into(),
        );
        answer
    }

    fn revoke(&self, headers: &HeaderMap, body: &[u8]) -> Response {
        let form = match self.client_form(headers, body) {
            Ok(form) => form,
            Err(refusal) => return refusal.into_response(),
        };
        if only_fields(&form, &["token", "token_type_hint"]).is_err() {
            return Refusal::InvalidRequest.into_response();
        }
        let Some(token) = form_get(&form, "token") else {
            return Refusal::InvalidRequest.into_response();
        };
        {
            // RFC 7009 §2.1: the hint only orders the search, so look the token up as either kind.
            let mut store = lock(&self.store);
            let grant = store
                .access
                .get(token)
                .map(|t| t.grant)
                .or_else(|| store.refresh.get(token).copied());
            if let Some(grant) = grant {
                store.revoke_grant(grant);
            }
        }
        self.counters.revokes.fetch_add(1, Ordering::Relaxed);
        tracing::debug!("fake EdgeTag handled a revocation");
        json_response(StatusCode::OK, &json!({}))
    }
}

/// Rejects any field outside `allowed`: EdgeTag documents exactly these, and the fake is strict.
fn only_fields(form: &Form, allowed: &[&str]) -> Result<(), Refusal> {
    if form.iter().all(|(k, _)| allowed.contains(&k.as_str())) {
        Ok(())
    } else {
        Err(Refusal::InvalidRequest)
    }
}

/// `(client_id, client_secret)` from `Authorization: Basic …`, if well-formed.
fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = String::from_utf8(STANDARD.decode(encoded.trim()).ok()?).ok()?;
    let (id, secret) = decoded.split_once(':')?;
    Some((id.to_owned(), secret.to_owned()))
}

/// Compares SHA-256 digests in constant time, so timing reveals neither length nor a common prefix.
fn digest_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    Sha256::digest(a).ct_eq(&Sha256::digest(b)).into()
}

fn is_form_urlencoded(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|essence| {
            essence
                .trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        })
}

fn json_response(status: StatusCode, body: &serde_json::Value) -> Response {
    (
        status,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
            (header::PRAGMA, "no-cache"),
        ],
        body.to_string(),
    )
        .into_response()
}

fn oauth_error(status: StatusCode, error: &str) -> Response {
    let mut response = json_response(status, &json!({ "error": error }));
    if status == StatusCode::UNAUTHORIZED {
        // RFC 6749 §5.2: required when the client tried HTTP authentication.
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static(r#"Basic realm="edgetag""#),
        );
    }
    response
}

fn html(status: StatusCode, body: &'static str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        body,
    )
        .into_response()
}

// ---------------------------------------------------------------------------------------------
// /v1/user/me
// ---------------------------------------------------------------------------------------------

async fn user_me_handler(State(fake): State<Arc<Inner>>, headers: HeaderMap) -> Response {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim());
    let now = fake.config.clock.now();
    let valid = token.is_some_and(|t| lock(&fake.store).access_token_is_valid(t, now));
    if valid {
        json_response(
            StatusCode::OK,
            &json!({ "teamId": FAKE_TEAM_ID, "teams": [{ "id": FAKE_TEAM_ID }] }),
        )
    } else {
        let mut response =
            json_response(StatusCode::UNAUTHORIZED, &json!({"error": "invalid_token"}));
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static(r#"Bearer error="invalid_token""#),
        );
        response
    }
}

// ---------------------------------------------------------------------------------------------
// Killable connections
//
// hyper offers no way for a handler to abort its connection, and an erroring response body still
// lets the status line and headers out first. So every accepted socket is wrapped in a stream with
// a kill switch, handed to handlers as connect info: once killed, its reads and writes fail, hyper
// drops the socket, and the client sees the connection close before any response byte. Dropping
// the fake kills every open connection the same way.
// ---------------------------------------------------------------------------------------------

/// A per-connection switch that makes the connection's I/O fail.
#[derive(Default)]
struct KillSwitch {
    killed: AtomicBool,
    /// The connection task, woken so an idle connection notices promptly.
    waker: AtomicWaker,
}

impl KillSwitch {
    fn kill(&self) {
        self.killed.store(true, Ordering::SeqCst);
        self.waker.wake();
    }

    /// Registers the polling task, then fails if the connection has been killed.
    fn check(&self, cx: &Context<'_>) -> io::Result<()> {
        self.waker.register(cx.waker());
        if self.killed.load(Ordering::SeqCst) {
            Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "connection dropped by the fake EdgeTag",
            ))
        } else {
            Ok(())
        }
    }
}

/// Connect info giving a handler the kill switch of its own connection.
#[derive(Clone)]
struct ConnHandle(Arc<KillSwitch>);

impl ConnHandle {
    fn kill(&self) {
        self.0.kill();
    }
}

impl Connected<IncomingStream<'_, KillableListener>> for ConnHandle {
    fn connect_info(stream: IncomingStream<'_, KillableListener>) -> Self {
        ConnHandle(stream.io().switch.clone())
    }
}

/// The kill switches of live connections, so shutdown can close them all.
#[derive(Default)]
struct Connections {
    /// Guarded together with the list so a connection accepted during shutdown is not missed.
    live: Mutex<(bool, Vec<Weak<KillSwitch>>)>,
}

impl Connections {
    fn register(&self) -> Arc<KillSwitch> {
        let switch = Arc::new(KillSwitch::default());
        let mut live = lock(&self.live);
        let (shut_down, list) = &mut *live;
        if *shut_down {
            switch.kill();
        }
        // Prune closed connections whenever the list is full: amortised O(1) per connection.
        if list.len() == list.capacity() {
            list.retain(|w| w.strong_count() > 0);
        }
        list.push(Arc::downgrade(&switch));
        switch
    }

    fn kill_all(&self) {
        let mut live = lock(&self.live);
        live.0 = true;
        for switch in live.1.drain(..).filter_map(|w| w.upgrade()) {
            switch.kill();
        }
    }
}

struct KillableListener {
    inner: TcpListener,
    connections: Arc<Connections>,
}

impl Listener for KillableListener {
    type Io = KillableStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.inner.accept().await {
                Ok((stream, addr)) => {
                    let _ = stream.set_nodelay(true);
                    let switch = self.connections.register();
                    return (
                        KillableStream {
                            inner: stream,
                            switch,
                        },
                        addr,
                    );
                }
                // The peer gave up before we accepted; nothing to do.
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionRefused
                            | io::ErrorKind::ConnectionAborted
                            | io::ErrorKind::ConnectionReset
                    ) => {}
                // Typically EMFILE under a huge burst: back off instead of spinning.
                Err(e) => {
                    tracing::error!(error = %e, "fake EdgeTag: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

struct KillableStream {
    inner: TcpStream,
    switch: Arc<KillSwitch>,
}

impl AsyncRead for KillableStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.switch.check(cx)?;
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for KillableStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.switch.check(cx)?;
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.switch.check(cx)?;
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.switch.check(cx)?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const REDIRECT_URI: &str = "http://127.0.0.1:9/callback?keep=1";

    fn client() -> reqwest::Client {
        reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap()
    }

    /// A fresh PKCE pair: (verifier, S256 challenge).
    fn pkce() -> (String, String) {
        let verifier = random_base64url();
        let challenge = s256_challenge(&verifier);
        (verifier, challenge)
    }

    fn authorize_url(fake: &FakeEdgeTag, challenge: &str, extra: &[(&str, &str)]) -> String {
        let mut url = Url::parse(&fake.authorize_url()).unwrap();
        url.query_pairs_mut()
            .append_pair("client_id", fake.client_id())
            .append_pair("redirect_uri", REDIRECT_URI)
            .append_pair("response_type", "code")
            .append_pair("scope", "full")
            .append_pair("state", "st-123")
            .append_pair("code_challenge", challenge)
            .append_pair("code_challenge_method", "S256");
        // Replace any standard parameter named in `extra`; an empty value removes it.
        let mut pairs: Vec<(String, String)> = url
            .query_pairs()
            .into_owned()
            .filter(|(k, _)| !extra.iter().any(|(e, _)| e == k))
            .collect();
        pairs.extend(
            extra
                .iter()
                .filter(|(_, v)| !v.is_empty())
                .map(|(k, v)| (k.to_string(), v.to_string())),
        );
        url.query_pairs_mut().clear().extend_pairs(pairs);
        url.into()
    }

    /// Runs the browser leg over HTTP and returns (code, verifier).
    async fn authorize(fake: &FakeEdgeTag) -> (String, String) {
        let (verifier, challenge) = pkce();
        let redirect = fake
            .approve(&authorize_url(fake, &challenge, &[]))
            .await
            .unwrap();
        (redirect.code, verifier)
    }

    async fn post_form(
        client: &reqwest::Client,
        url: &str,
        auth: Option<(&str, &str)>,
        fields: &[(&str, &str)],
    ) -> reqwest::Result<reqwest::Response> {
        let body = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(fields)
            .finish();
        let mut request = client
            .post(url)
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(body);
        if let Some((id, secret)) = auth {
            request = request.basic_auth(id, Some(secret));
        }
        request.send().await
    }

    async fn token(
        client: &reqwest::Client,
        fake: &FakeEdgeTag,
        fields: &[(&str, &str)],
    ) -> reqwest::Result<reqwest::Response> {
        let auth = (fake.client_id(), fake.client_secret());
        post_form(client, &fake.token_url(), Some(auth), fields).await
    }

    async fn exchange(
        client: &reqwest::Client,
        fake: &FakeEdgeTag,
        code: &str,
        verifier: &str,
    ) -> reqwest::Response {
        let fields = [
            ("grant_type", "authorization_code"),
            ("code", code),
            ("code_verifier", verifier),
        ];
        token(client, fake, &fields).await.unwrap()
    }

    async fn refresh(
        client: &reqwest::Client,
        fake: &FakeEdgeTag,
        refresh_token: &str,
    ) -> reqwest::Response {
        let fields = [
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh_token),
        ];
        token(client, fake, &fields).await.unwrap()
    }

    /// Status and JSON body of a response.
    async fn json_of(response: reqwest::Response) -> (u16, serde_json::Value) {
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        let body = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text:?}"));
        (status, body)
    }

    fn oauth_error_body(code: &str) -> serde_json::Value {
        json!({ "error": code })
    }

    async fn user_me(client: &reqwest::Client, fake: &FakeEdgeTag, access: &str) -> u16 {
        client
            .get(fake.user_me_url())
            .bearer_auth(access)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }

    async fn start(config: FakeConfig) -> FakeEdgeTag {
        FakeEdgeTag::start(config).await.unwrap()
    }

    /// The system clock plus an offset the test moves, as a client's test clock would be.
    #[derive(Default)]
    struct ManualClock(Arc<AtomicU64>);

    impl ManualClock {
        fn fake_clock(&self) -> FakeClock {
            let offset = self.0.clone();
            FakeClock::from_fn(move || {
                SystemTime::now() + Duration::from_millis(offset.load(Ordering::Relaxed))
            })
        }

        fn advance(&self, by: Duration) {
            let ms = u64::try_from(by.as_millis()).unwrap();
            self.0.fetch_add(ms, Ordering::Relaxed);
        }
    }

    #[tokio::test]
    async fn happy_path_authorize_token_refresh_user_me() {
        let fake = start(FakeConfig::default()).await;
        let client = client();
        let (verifier, challenge) = pkce();

        let response = client
            .get(authorize_url(&fake, &challenge, &[]))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::FOUND);
        let location = response.headers()[header::LOCATION].to_str().unwrap();
        let location = Url::parse(location).unwrap();
        assert_eq!(location.path(), "/callback");
        let query: HashMap<_, _> = location.query_pairs().into_owned().collect();
        assert_eq!(
            query["keep"], "1",
            "existing redirect_uri parameters are kept"
        );
        assert_eq!(query["state"], "st-123");
        let code = &query["code"];
        assert!(code.starts_with("etc_"));

        let response = exchange(&client, &fake, code, &verifier).await;
        assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
        let (status, body) = json_of(response).await;
        assert_eq!(status, 200);
        let object = body.as_object().unwrap();
        let mut keys: Vec<_> = object.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["access_token", "expires_in", "refresh_token"]);
        assert_eq!(body["expires_in"], 7200);
        let access = body["access_token"].as_str().unwrap();
        let refresh_token = body["refresh_token"].as_str().unwrap();
        assert!(access.starts_with("eta_") && refresh_token.starts_with("etr_"));
        assert!(fake.access_token_is_valid(access));

        let me = client
            .get(fake.user_me_url())
            .bearer_auth(access)
            .send()
            .await
            .unwrap();
        let (status, body) = json_of(me).await;
        assert_eq!(status, 200);
        assert_eq!(
            body,
            json!({"teamId": "team-fake", "teams": [{"id": "team-fake"}]})
        );

        let (status, body) = json_of(refresh(&client, &fake, refresh_token).await).await;
        assert_eq!(status, 200);
        assert!(
            body.get("refresh_token").is_none(),
            "no rotation by default"
        );
        assert_eq!(body["expires_in"], 7200);
        let new_access = body["access_token"].as_str().unwrap();
        assert_ne!(new_access, access);
        assert_eq!(user_me(&client, &fake, new_access).await, 200);
        assert!(fake.refresh_token_is_valid(refresh_token));

        assert_eq!(user_me(&client, &fake, "eta_unknown").await, 401);
        let anonymous = client.get(fake.user_me_url()).send().await.unwrap();
        let (status, body) = json_of(anonymous).await;
        assert_eq!((status, body), (401, oauth_error_body("invalid_token")));

        assert_eq!(
            fake.stats(),
            FakeStats {
                authorize: 1,
                token_requests: 2,
                code_exchanges_ok: 1,
                refreshes_ok: 1,
                revokes: 0,
                peak_token_concurrency: 1,
            }
        );
    }

    #[tokio::test]
    async fn a_seeded_grant_refreshes_like_an_exchanged_one() {
        let fake = start(FakeConfig::default()).await;
        let seeded = fake.seed_grant();
        assert!(seeded.starts_with("etr_") && fake.refresh_token_is_valid(&seeded));
        assert_ne!(fake.seed_grant(), seeded, "each seed is its own grant");
        let (status, body) = json_of(refresh(&client(), &fake, &seeded).await).await;
        assert_eq!(status, 200);
        assert!(fake.access_token_is_valid(body["access_token"].as_str().unwrap()));
        assert_eq!(fake.stats().refreshes_ok, 1);
    }

    #[tokio::test]
    async fn refresh_rotation_replaces_the_refresh_token_when_enabled() {
        let fake = start(FakeConfig {
            rotate_refresh_tokens: true,
            ..FakeConfig::default()
        })
        .await;
        let client = client();
        let (code, verifier) = authorize(&fake).await;
        let (_, body) = json_of(exchange(&client, &fake, &code, &verifier).await).await;
        let first = body["refresh_token"].as_str().unwrap().to_owned();

        let (status, body) = json_of(refresh(&client, &fake, &first).await).await;
        assert_eq!(status, 200);
        let second = body["refresh_token"].as_str().unwrap();
        assert!(second.starts_with("etr_") && second != first);
        assert!(!fake.refresh_token_is_valid(&first));
        assert!(fake.refresh_token_is_valid(second));

        let (status, body) = json_of(refresh(&client, &fake, &first).await).await;
        assert_eq!((status, body), (400, oauth_error_body("invalid_grant")));
        let (status, _) = json_of(refresh(&client, &fake, second).await).await;
        assert_eq!(status, 200);
    }

    #[tokio::test]
    async fn client_authentication_is_required_and_checked() {
        let fake = start(FakeConfig::default()).await;
        let client = client();
        let (code, verifier) = authorize(&fake).await;
        let fields = [
            ("grant_type", "authorization_code"),
            ("code", code.as_str()),
            ("code_verifier", verifier.as_str()),
        ];
        let id = fake.client_id().to_owned();
        for auth in [
            None,
            Some((id.as_str(), "wrong-secret")),
            Some((id.as_str(), "")),
            Some(("other-client", fake.client_secret())),
        ] {
            let response = post_form(&client, &fake.token_url(), auth, &fields)
                .await
                .unwrap();
            assert!(response.headers().contains_key(header::WWW_AUTHENTICATE));
            let (status, body) = json_of(response).await;
            assert_eq!(
                (status, body),
                (401, oauth_error_body("invalid_client")),
                "{auth:?}"
            );
        }
        // Rejected client authentication does not burn the code.
        let (status, _) = json_of(exchange(&client, &fake, &code, &verifier).await).await;
        assert_eq!(status, 200);
    }

    #[tokio::test]
    async fn wrong_verifier_is_invalid_grant_and_burns_the_code() {
        let fake = start(FakeConfig::default()).await;
        let client = client();
        let (code, verifier) = authorize(&fake).await;
        let (other_verifier, _) = pkce();
        for bad in [other_verifier.as_str(), "short", &"a".repeat(129)] {
            let (code, _) = authorize(&fake).await;
            let (status, body) = json_of(exchange(&client, &fake, &code, bad).await).await;
            assert_eq!((status, body), (400, oauth_error_body("invalid_grant")));
        }
        let (status, _) = json_of(exchange(&client, &fake, &code, &other_verifier).await).await;
        assert_eq!(status, 400);
        let (status, body) = json_of(exchange(&client, &fake, &code, &verifier).await).await;
        assert_eq!((status, body), (400, oauth_error_body("invalid_grant")));
        assert_eq!(fake.stats().code_exchanges_ok, 0);
    }

    #[tokio::test]
    async fn a_code_works_once() {
        let fake = start(FakeConfig::default()).await;
        let client = client();
        let (code, verifier) = authorize(&fake).await;
        let (status, _) = json_of(exchange(&client, &fake, &code, &verifier).await).await;
        assert_eq!(status, 200);
        let (status, body) = json_of(exchange(&client, &fake, &code, &verifier).await).await;
        assert_eq!((status, body), (400, oauth_error_body("invalid_grant")));
        let (status, body) =
            json_of(exchange(&client, &fake, "etc_unknown", &verifier).await).await;
        assert_eq!((status, body), (400, oauth_error_body("invalid_grant")));
    }

    #[tokio::test]
    async fn unknown_or_repeated_body_fields_are_invalid_request() {
        let fake = start(FakeConfig::default()).await;
        let client = client();
        let (code, verifier) = authorize(&fake).await;
        let base = [
            ("grant_type", "authorization_code"),
            ("code", code.as_str()),
            ("code_verifier", verifier.as_str()),
        ];
        for extra in [
            ("client_id", fake.client_id()),
            ("redirect_uri", REDIRECT_URI),
            ("scope", "full"),
            ("code", code.as_str()),
        ] {
            let mut fields = base.to_vec();
            fields.push(extra);
            let (status, body) = json_of(token(&client, &fake, &fields).await.unwrap()).await;
            assert_eq!(
                (status, body),
                (400, oauth_error_body("invalid_request")),
                "{extra:?}"
            );
        }
        let (status, body) = json_of(
            token(&client, &fake, &[("grant_type", "authorization_code")])
                .await
                .unwrap(),
        )
        .await;
        assert_eq!((status, body), (400, oauth_error_body("invalid_request")));
        let (status, body) = json_of(token(&client, &fake, &[]).await.unwrap()).await;
        assert_eq!((status, body), (400, oauth_error_body("invalid_request")));
        let refresh_with_scope = [
            ("grant_type", "refresh_token"),
            ("refresh_token", "etr_x"),
            ("scope", "full"),
        ];
        let (status, body) =
            json_of(token(&client, &fake, &refresh_with_scope).await.unwrap()).await;
        assert_eq!((status, body), (400, oauth_error_body("invalid_request")));

        // None of that burnt the code.
        let (status, _) = json_of(exchange(&client, &fake, &code, &verifier).await).await;
        assert_eq!(status, 200);
    }

    #[tokio::test]
    async fn redirect_uri_in_body_is_accepted_only_when_configured_and_must_match() {
        let fake = start(FakeConfig {
            accept_redirect_uri_in_body: true,
            ..FakeConfig::default()
        })
        .await;
        let client = client();
        for (redirect_uri, expected) in [(REDIRECT_URI, 200), ("http://127.0.0.1:9/other", 400)] {
            let (code, verifier) = authorize(&fake).await;
            let fields = [
                ("grant_type", "authorization_code"),
                ("code", code.as_str()),
                ("code_verifier", verifier.as_str()),
                ("redirect_uri", redirect_uri),
            ];
            let (status, body) = json_of(token(&client, &fake, &fields).await.unwrap()).await;
            assert_eq!(status, expected, "{body}");
            if expected == 400 {
                assert_eq!(body, oauth_error_body("invalid_grant"));
            }
        }
    }

    #[tokio::test]
    async fn wrong_content_type_is_invalid_request() {
        let fake = start(FakeConfig::default()).await;
        let response = client()
            .post(fake.token_url())
            .basic_auth(fake.client_id(), Some(fake.client_secret()))
            .header(header::CONTENT_TYPE, "application/json")
            .body(r#"{"grant_type":"refresh_token","refresh_token":"etr_x"}"#)
            .send()
            .await
            .unwrap();
        let (status, body) = json_of(response).await;
        assert_eq!((status, body), (400, oauth_error_body("invalid_request")));
    }

    #[tokio::test]
    async fn unknown_grant_type_is_unsupported() {
        let fake = start(FakeConfig::default()).await;
        let fields = [("grant_type", "client_credentials")];
        let (status, body) = json_of(token(&client(), &fake, &fields).await.unwrap()).await;
        assert_eq!(
            (status, body),
            (400, oauth_error_body("unsupported_grant_type"))
        );
    }

    #[tokio::test]
    async fn codes_expire_after_ten_minutes_by_the_clock() {
        let clock = ManualClock::default();
        let fake = start(FakeConfig {
            clock: clock.fake_clock(),
            ..FakeConfig::default()
        })
        .await;
        let client = client();
        let (fresh_code, fresh_verifier) = authorize(&fake).await;
        let (stale_code, stale_verifier) = authorize(&fake).await;
        clock.advance(CODE_LIFETIME - Duration::from_secs(5));
        let (status, _) =
            json_of(exchange(&client, &fake, &fresh_code, &fresh_verifier).await).await;
        assert_eq!(status, 200);
        clock.advance(Duration::from_secs(5));
        let (status, body) =
            json_of(exchange(&client, &fake, &stale_code, &stale_verifier).await).await;
        assert_eq!((status, body), (400, oauth_error_body("invalid_grant")));
    }

    #[tokio::test]
    async fn access_tokens_expire_by_the_clock() {
        let clock = ManualClock::default();
        let fake = start(FakeConfig {
            clock: clock.fake_clock(),
            access_token_lifetime: Duration::from_secs(60),
            ..FakeConfig::default()
        })
        .await;
        let client = client();
        let (code, verifier) = authorize(&fake).await;
        let (_, body) = json_of(exchange(&client, &fake, &code, &verifier).await).await;
        assert_eq!(body["expires_in"], 60);
        let access = body["access_token"].as_str().unwrap();
        let refresh_token = body["refresh_token"].as_str().unwrap();
        assert_eq!(user_me(&client, &fake, access).await, 200);
        clock.advance(Duration::from_secs(60));
        assert_eq!(user_me(&client, &fake, access).await, 401);
        assert!(!fake.access_token_is_valid(access));
        // The refresh token outlives the access token.
        let (status, _) = json_of(refresh(&client, &fake, refresh_token).await).await;
        assert_eq!(status, 200);
    }

    #[tokio::test]
    async fn revoking_an_access_token_revokes_the_whole_grant() {
        let fake = start(FakeConfig::default()).await;
        let client = client();
        let (code, verifier) = authorize(&fake).await;
        let (_, body) = json_of(exchange(&client, &fake, &code, &verifier).await).await;
        let access = body["access_token"].as_str().unwrap();
        let refresh_token = body["refresh_token"].as_str().unwrap();
        let (_, body) = json_of(refresh(&client, &fake, refresh_token).await).await;
        let second_access = body["access_token"].as_str().unwrap();
        // An unrelated grant is untouched.
        let (other_code, other_verifier) = authorize(&fake).await;
        let (_, other) =
            json_of(exchange(&client, &fake, &other_code, &other_verifier).await).await;

        let auth = Some((fake.client_id(), fake.client_secret()));
        let revoke = [("token", access), ("token_type_hint", "access_token")];
        let response = post_form(&client, &fake.revoke_url(), auth, &revoke)
            .await
            .unwrap();
        assert_eq!(json_of(response).await, (200, json!({})));

        assert_eq!(user_me(&client, &fake, access).await, 401);
        assert_eq!(user_me(&client, &fake, second_access).await, 401);
        assert!(!fake.refresh_token_is_valid(refresh_token));
        let (status, body) = json_of(refresh(&client, &fake, refresh_token).await).await;
        assert_eq!((status, body), (400, oauth_error_body("invalid_grant")));
        assert!(fake.access_token_is_valid(other["access_token"].as_str().unwrap()));

        // RFC 7009: unknown tokens get 200 too; client authentication is still required.
        let unknown = [
            ("token", "eta_unknown"),
            ("token_type_hint", "access_token"),
        ];
        let response = post_form(&client, &fake.revoke_url(), auth, &unknown)
            .await
            .unwrap();
        assert_eq!(json_of(response).await, (200, json!({})));
        let response = post_form(&client, &fake.revoke_url(), None, &unknown)
            .await
            .unwrap();
        assert_eq!(
            json_of(response).await,
            (401, oauth_error_body("invalid_client"))
        );
        let extra = [("token", "eta_unknown"), ("client_id", fake.client_id())];
        let response = post_form(&client, &fake.revoke_url(), auth, &extra)
            .await
            .unwrap();
        assert_eq!(
            json_of(response).await,
            (400, oauth_error_body("invalid_request"))
        );
        assert_eq!(fake.stats().revokes, 2);
    }

    #[tokio::test]
    async fn revoke_all_refresh_tokens_makes_the_next_refresh_fail() {
        let fake = start(FakeConfig::default()).await;
        let client = client();
        let (code, verifier) = authorize(&fake).await;
        let (_, body) = json_of(exchange(&client, &fake, &code, &verifier).await).await;
        let access = body["access_token"].as_str().unwrap();
        let refresh_token = body["refresh_token"].as_str().unwrap();
        fake.revoke_all_refresh_tokens();
        let (status, body) = json_of(refresh(&client, &fake, refresh_token).await).await;
        assert_eq!((status, body), (400, oauth_error_body("invalid_grant")));
        assert!(fake.access_token_is_valid(access));
    }

    #[tokio::test]
    async fn authorize_rejects_bad_requests_with_an_html_page() {
        let fake = start(FakeConfig {
            redirect_uris: vec![REDIRECT_URI.to_owned()],
            ..FakeConfig::default()
        })
        .await;
        let client = client();
        let (_, challenge) = pkce();
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[("client_id", "someone-else")], "client_id"),
            (&[("client_id", "")], "client_id"),
            (
                &[("redirect_uri", "http://127.0.0.1:9/elsewhere")],
                "redirect_uri",
            ),
            (&[("response_type", "token")], "response_type"),
            (&[("scope", "read")], "scope"),
            (&[("state", "")], "state"),
            (&[("code_challenge", "")], "code_challenge"),
            (&[("code_challenge", "tooshort")], "code_challenge"),
            (
                &[("code_challenge_method", "plain")],
                "code_challenge_method",
            ),
        ];
        for (overrides, problem) in cases {
            let url = authorize_url(&fake, &challenge, overrides);
            let response = client.get(&url).send().await.unwrap();
            assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{overrides:?}");
            assert!(
                response.headers()[header::CONTENT_TYPE]
                    .to_str()
                    .unwrap()
                    .starts_with("text/html")
            );
            let page = response.text().await.unwrap();
            assert!(page.contains(problem), "{overrides:?}: {page}");
            let err = fake.approve(&url).await.unwrap_err();
            assert!(err.contains(problem), "{overrides:?}: {err}");
        }
        assert_eq!(fake.stats().authorize, 2 * cases.len() as u64);
        assert!(
            fake.approve(&authorize_url(&fake, &challenge, &[]))
                .await
                .is_ok()
        );
        let elsewhere = authorize_url(&fake, &challenge, &[]).replace(AUTHORIZE_PATH, "/login");
        assert!(fake.approve(&elsewhere).await.is_err());
    }

    #[tokio::test]
    async fn without_registered_uris_any_absolute_http_redirect_is_accepted() {
        let fake = start(FakeConfig::default()).await;
        let (_, challenge) = pkce();
        for ok in ["https://example.test/cb", "http://localhost:1234/"] {
            let url = authorize_url(&fake, &challenge, &[("redirect_uri", ok)]);
            let redirect = fake.approve(&url).await.unwrap();
            assert!(redirect.location.starts_with(ok), "{redirect:?}");
            assert_eq!(redirect.state, "st-123");
        }
        for bad in [
            "/relative",
            "ftp://example.test/",
            "http://example.test/#frag",
        ] {
            let url = authorize_url(&fake, &challenge, &[("redirect_uri", bad)]);
            assert!(fake.approve(&url).await.is_err(), "{bad}");
        }
    }

    /// What a client observed from one token request.
    #[derive(Debug, PartialEq)]
    struct Observed {
        status: u16,
        content_type: Option<String>,
        retry_after: Option<String>,
        body: String,
    }

    async fn observe(client: &reqwest::Client, fake: &FakeEdgeTag) -> reqwest::Result<Observed> {
        // A request that would be refused (no client auth): faults answer before any check.
        let response = post_form(client, &fake.token_url(), None, &[("grant_type", "x")]).await?;
        let header = |name| {
            response
                .headers()
                .get(name)
                .map(|v: &HeaderValue| v.to_str().unwrap().to_owned())
        };
        Ok(Observed {
            status: response.status().as_u16(),
            content_type: header(header::CONTENT_TYPE),
            retry_after: header(header::RETRY_AFTER),
            body: response.text().await?,
        })
    }

    #[tokio::test]
    async fn canned_faults_answer_one_request_each_in_order() {
        let fake = start(FakeConfig::default()).await;
        let client = client();
        let faults = [
            Fault::Status(502),
            Fault::Status(1000),
            Fault::ServerError,
            Fault::ServiceUnavailable,
            Fault::TooManyRequests {
                retry_after_secs: 7,
            },
            Fault::MalformedJson,
            Fault::HtmlPage,
            Fault::EmptyBody,
            Fault::ErrorIn200,
            Fault::InvalidGrant,
            Fault::InvalidClient,
        ];
        fake.push_faults(faults.clone());
        let mut seen = Vec::new();
        for _ in &faults {
            seen.push(observe(&client, &fake).await.unwrap());
        }
        let html = Some("text/html; charset=utf-8".to_owned());
        let json = Some("application/json".to_owned());
        let statuses: Vec<u16> = seen.iter().map(|o| o.status).collect();
        assert_eq!(
            statuses,
            [502, 500, 500, 503, 429, 200, 200, 200, 200, 400, 401]
        );
        assert_eq!(seen[0].body, "");
        assert!(seen[2].body.contains("Internal Server Error") && seen[2].content_type == html);
        assert!(seen[3].body.contains("Service Unavailable") && seen[3].content_type == html);
        assert_eq!(seen[4].retry_after.as_deref(), Some("7"));
        assert_eq!(
            (&seen[5].body[..], &seen[5].content_type),
            (r#"{"access_token": "#, &json)
        );
        assert!(serde_json::from_str::<serde_json::Value>(&seen[5].body).is_err());
        assert!(seen[6].body.contains("<html>") && seen[6].content_type == html);
        assert_eq!(seen[7].body, "");
        assert_eq!(seen[8].body, r#"{"error":"server_error"}"#);
        assert_eq!(seen[9].body, r#"{"error":"invalid_grant"}"#);
        assert_eq!(seen[10].body, r#"{"error":"invalid_client"}"#);

        // The queue is empty again: the request is judged on its merits.
        let after = observe(&client, &fake).await.unwrap();
        assert_eq!(
            (after.status, &after.body[..]),
            (401, r#"{"error":"invalid_client"}"#)
        );
        assert_eq!(fake.stats().token_requests, faults.len() as u64 + 1);
    }

    #[tokio::test]
    async fn a_persistent_fault_answers_until_cleared_and_queued_faults_go_first() {
        let fake = start(FakeConfig::default()).await;
        let client = client();
        fake.set_persistent_fault(Some(Fault::ServiceUnavailable));
        fake.push_faults([Fault::Status(418)]);
        assert_eq!(observe(&client, &fake).await.unwrap().status, 418);
        for _ in 0..3 {
            assert_eq!(observe(&client, &fake).await.unwrap().status, 503);
        }
        fake.set_persistent_fault(None);
        assert_eq!(observe(&client, &fake).await.unwrap().status, 401);
        fake.push_faults([Fault::Status(500), Fault::Status(500)]);
        fake.clear_faults();
        assert_eq!(observe(&client, &fake).await.unwrap().status, 401);
    }

    #[tokio::test]
    async fn shape_faults_issue_real_tokens() {
        let fake = start(FakeConfig::default()).await;
        let client = client();

        fake.push_faults([Fault::MissingExpiresIn]);
        let (code, verifier) = authorize(&fake).await;
        let (status, body) = json_of(exchange(&client, &fake, &code, &verifier).await).await;
        assert_eq!(status, 200);
        assert!(body.get("expires_in").is_none(), "{body}");
        assert!(fake.access_token_is_valid(body["access_token"].as_str().unwrap()));
        let refresh_token = body["refresh_token"].as_str().unwrap();

        fake.push_faults([Fault::ExpiresInAsString]);
        let (status, body) = json_of(refresh(&client, &fake, refresh_token).await).await;
        assert_eq!(status, 200);
        assert_eq!(body["expires_in"], json!("7200"));
        assert!(fake.access_token_is_valid(body["access_token"].as_str().unwrap()));

        fake.push_faults([Fault::Delay(Duration::from_millis(50))]);
        let started = std::time::Instant::now();
        let (status, _) = json_of(refresh(&client, &fake, refresh_token).await).await;
        assert_eq!(status, 200);
        assert!(started.elapsed() >= Duration::from_millis(50));

        // A shape fault does not turn a refused request into a success.
        fake.push_faults([Fault::MissingExpiresIn]);
        let (status, body) = json_of(refresh(&client, &fake, "etr_unknown").await).await;
        assert_eq!((status, body), (400, oauth_error_body("invalid_grant")));
        assert_eq!(fake.stats().refreshes_ok, 2);
    }

    #[tokio::test]
    async fn hang_never_answers() {
        let fake = start(FakeConfig::default()).await;
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(200))
            .build()
            .unwrap();
        fake.push_faults([Fault::Hang]);
        let err = observe(&client, &fake).await.unwrap_err();
        assert!(err.is_timeout(), "{err:?}");
        // The next request is answered normally.
        assert_eq!(observe(&client, &fake).await.unwrap().status, 401);
    }

    #[tokio::test]
    async fn drop_connection_closes_the_socket_without_a_response() {
        let fake = start(FakeConfig::default()).await;
        let client = client();

        fake.push_faults([Fault::DropConnection]);
        let err = observe(&client, &fake).await.unwrap_err();
        assert!(!err.is_timeout() && err.status().is_none(), "{err:?}");
        assert_eq!(observe(&client, &fake).await.unwrap().status, 401);

        // On the wire: not a single byte comes back before the close.
        fake.push_faults([Fault::DropConnection]);
        let mut socket = TcpStream::connect(fake.addr()).await.unwrap();
        let request = format!(
            "POST {TOKEN_PATH} HTTP/1.1\r\nHost: {}\r\nContent-Type: \
             application/x-www-form-urlencoded\r\nContent-Length: 12\r\n\r\ngrant_type=x",
            fake.addr()
        );
        socket.write_all(request.as_bytes()).await.unwrap();
        let mut received = Vec::new();
        // A reset instead of a clean close is fine too; either way nothing was sent.
        let _ = socket.read_to_end(&mut received).await;
        assert!(
            received.is_empty(),
            "{:?}",
            String::from_utf8_lossy(&received)
        );
        assert_eq!(fake.stats().token_requests, 3);
    }

    #[tokio::test]
    async fn peak_concurrency_counts_simultaneous_token_requests() {
        let fake = start(FakeConfig::default()).await;
        let client = client();
        fake.set_token_delay(Duration::from_secs(1));
        let requests = (0..20).map(|_| observe(&client, &fake));
        let results = futures::future::join_all(requests).await;
        assert!(results.iter().all(|r| r.as_ref().unwrap().status == 401));
        let stats = fake.stats();
        assert_eq!(
            (stats.token_requests, stats.peak_token_concurrency),
            (20, 20)
        );
        assert_eq!(fake.token_requests_in_flight(), 0);

        fake.reset_peak();
        assert_eq!(fake.stats().peak_token_concurrency, 0);
        fake.set_token_delay(Duration::ZERO);
        observe(&client, &fake).await.unwrap();
        assert_eq!(fake.stats().peak_token_concurrency, 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn thousands_of_concurrent_refreshes_all_succeed() {
        let fake = start(FakeConfig::default()).await;
        let client = client();
        let (code, verifier) = authorize(&fake).await;
        let (_, body) = json_of(exchange(&client, &fake, &code, &verifier).await).await;
        let refresh_token = body["refresh_token"].as_str().unwrap();
        fake.set_token_delay(Duration::from_millis(200));
        let requests = (0..2000).map(|_| refresh(&client, &fake, refresh_token));
        let responses = futures::future::join_all(requests).await;
        assert!(responses.iter().all(|r| r.status() == StatusCode::OK));
        let stats = fake.stats();
        assert_eq!(stats.refreshes_ok, 2000);
        assert!(stats.peak_token_concurrency > 100, "{stats:?}");
    }

    #[tokio::test]
    async fn dropping_the_fake_closes_pooled_connections() {
        let fake = start(FakeConfig::default()).await;
        let client = client();
        let url = fake.user_me_url();
        let response = client.get(&url).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        drop(fake);
        assert!(client.get(&url).send().await.is_err());
    }

    #[test]
    fn pkce_checks_follow_rfc_7636() {
        // RFC 7636 appendix B.
        let verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
        let challenge = s256_challenge(verifier);
        assert_eq!(challenge, "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM");
        assert!(is_code_verifier(verifier) && is_s256_challenge(&challenge));
        assert!(is_code_verifier(&"~._-".repeat(32)));
        assert!(!is_code_verifier(&"a".repeat(42)));
        assert!(!is_code_verifier(&format!("{}+", "a".repeat(42))));
        assert!(!is_s256_challenge(&format!("{}=", &challenge[..42])));
    }
}
