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
//! - `GET  /v1/user/me`: answers 200 with `teamId` and `teams` for a live access token, 401
//!   otherwise; [`FakeEdgeTag::set_teams`] and [`FakeEdgeTag::set_user_me_fault`] change that.
//!
//! # Layout
//! - `lib.rs`: the public surface: [`FakeEdgeTag`], [`FakeConfig`], [`Fault`], [`FakeStats`].
//! - `authorize`, `token`, `user_me`: one module per endpoint; `token` also plays the faults.
//! - `pkce`: RFC 7636 S256 with the fake's own code, independent of any client's.
//! - `state`: codes, grants, tokens, queued faults and counters behind the handlers.
//! - `connections`: connections a fault or shutdown can cut before any response byte.
//! - `clock`: [`FakeClock`], the fake's source of "now".

mod authorize;
mod clock;
mod connections;
mod pkce;
mod state;
mod token;
mod user_me;

#[cfg(test)]
mod tests;

use std::{
    io,
    net::{Ipv4Addr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use axum::{
    Router,
    routing::{get, post},
};
use tokio::{
    net::{TcpListener, TcpSocket},
    sync::watch,
    task::JoinHandle,
};
use url::Url;

pub use crate::clock::FakeClock;
use crate::{
    authorize::authorize_handler,
    connections::{ConnHandle, KillableListener},
    state::{Counters, Inner, lock},
    token::{revoke_handler, token_handler},
    user_me::user_me_handler,
};

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
    /// Whether presenting a refresh token that rotation already replaced revokes the whole grant,
    /// as providers with reuse detection do (RFC 9700 §4.14.2). With rotation on, a client that
    /// refreshes twice with the same token loses the grant; tests use this to prove it never does.
    pub revoke_grant_on_refresh_token_reuse: bool,
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
            revoke_grant_on_refresh_token_reuse: false,
            accept_redirect_uri_in_body: false,
            clock: FakeClock::system(),
        }
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
    /// 401 `{"error":"invalid_grant"}`, as some servers answer a revoked refresh token.
    InvalidGrantAs401,
    /// 401 `{"error":"invalid_client"}`, whatever the request.
    InvalidClient,
    /// Processes the request normally but leaves `expires_in` out of a successful answer.
    MissingExpiresIn,
    /// Processes the request normally but sends `"expires_in":"7200"` (a string) on success.
    ExpiresInAsString,
}

/// A misbehaviour of `/v1/user/me`, injected by tests ([`FakeEdgeTag::set_user_me_fault`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UserMeFault {
    /// That status, whatever the token, with a JSON body that echoes the presented access token
    /// (as a careless proxy might): a client that logs bodies leaks it.
    Status(u16),
    /// 200 for a live token, but the body has no `teamId` (only `teams`).
    WithoutTeamId,
}

/// One team `/v1/user/me` lists.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FakeTeam {
    pub id: String,
    /// Left out of the answer when `None`, as EdgeTag's docs show no names.
    pub name: Option<String>,
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
    /// Refresh requests that presented a refresh token already replaced by rotation (counted with
    /// [`FakeConfig::revoke_grant_on_refresh_token_reuse`] on; each revoked the grant).
    pub refresh_token_reuses: u64,
    /// Most token requests in flight at the same moment since start or [`FakeEdgeTag::reset_peak`].
    pub peak_token_concurrency: u64,
    /// Requests to the API host (token, revoke, user) that carried W3C trace context
    /// (`traceparent`, `tracestate`): EdgeTag is a third party, and should see none.
    pub trace_context_requests: u64,
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
            client_secret: Mutex::new(config.client_secret.clone()),
            config,
            store: Mutex::default(),
            faults: Mutex::default(),
            token_delay_nanos: AtomicU64::new(0),
            counters: Counters::default(),
            connections: Arc::default(),
            shutdown,
            user_me: Mutex::default(),
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

    /// The client secret the fake accepts now ([`FakeConfig::client_secret`] until
    /// [`FakeEdgeTag::roll_client_secret`]).
    pub fn client_secret(&self) -> String {
        lock(&self.inner.client_secret).clone()
    }

    /// Rolls the client secret as EdgeTag's "OAuth Apps" page does: a new random secret, returned
    /// (EdgeTag shows it once), and the old one rejected (`invalid_client`) from now on. Grants and
    /// tokens stay valid.
    pub fn roll_client_secret(&self) -> String {
        let secret = state::random_token("ets_");
        *lock(&self.inner.client_secret) = secret.clone();
        secret
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

    /// Makes `/v1/user/me` misbehave until cleared with `None`.
    pub fn set_user_me_fault(&self, fault: Option<UserMeFault>) {
        lock(&self.inner.user_me).fault = fault;
    }

    /// What `/v1/user/me` answers from now on: `teamId` and the `teams` list (by default
    /// [`FAKE_TEAM_ID`] alone, without a name).
    pub fn set_teams(&self, team_id: &str, teams: Vec<FakeTeam>) {
        let mut user_me = lock(&self.inner.user_me);
        user_me.team_id = team_id.to_owned();
        user_me.teams = teams;
    }

    /// Requests `/v1/user/me` received, answered or faulted.
    pub fn user_me_requests(&self) -> u64 {
        lock(&self.inner.user_me).requests
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

    /// Makes every `refresh_token` grant with one of `refresh_tokens` wait `delay` before it is
    /// answered, as an EdgeTag that is slow for some accounts; other requests are unaffected.
    pub fn hold_refreshes(
        &self,
        refresh_tokens: impl IntoIterator<Item = String>,
        delay: Duration,
    ) {
        lock(&self.inner.faults).held_refreshes = (refresh_tokens.into_iter().collect(), delay);
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
            refresh_token_reuses: c.refresh_token_reuses.load(Ordering::Relaxed),
            peak_token_concurrency: c.token_peak.load(Ordering::SeqCst),
            trace_context_requests: c.trace_context.load(Ordering::Relaxed),
        }
    }

    /// The time token requests have spent in the fake since it started, summed: with
    /// [`FakeStats::token_requests`], the latency EdgeTag really had (a 2 ms delay takes longer:
    /// the timer's resolution is a millisecond).
    pub fn token_time(&self) -> Duration {
        Duration::from_nanos(self.inner.counters.token_nanos.load(Ordering::Relaxed))
    }

    /// Token requests being handled right now.
    pub fn token_requests_in_flight(&self) -> u64 {
        *self.inner.counters.token_in_flight.borrow()
    }

    /// Returns once the number of token requests in flight satisfies `ready`, which is asked at
    /// once and again at every change: for waiting until a request has arrived, or all are done.
    pub async fn until_token_requests_in_flight(&self, mut ready: impl FnMut(u64) -> bool) {
        let mut changes = self.inner.counters.token_in_flight.subscribe();
        changes
            .wait_for(|now| ready(*now))
            .await
            .expect("the fake owns the sender");
    }

    /// Restarts peak tracking from the number of token requests currently in flight.
    pub fn reset_peak(&self) {
        let c = &self.inner.counters;
        c.token_peak
            .store(*c.token_in_flight.borrow(), Ordering::SeqCst);
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
