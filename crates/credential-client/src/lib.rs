//! # credential-client
//!
//! Access tokens from the credential service for internal Rust services, without a network round
//! trip per use and without guessing when to ask again.
//!
//! A [`TokenSource`] keeps one `WatchToken` stream open to the service, which pushes each new
//! token as soon as it is published (well before the previous one nears expiry), so
//! [`TokenSource::token`] answers from memory. While the service is unreachable it keeps handing
//! out the token it has, for as long as that token still covers the source's `min_validity`, and
//! then fails; it never hands out an expired token. Against a service without `WatchToken`, one
//! that has no place for another stream (`RESOURCE_EXHAUSTED`), or one whose streams keep ending
//! `UNAVAILABLE` while calls get through, it polls `GetToken` ahead of expiry instead, and goes back
//! to watching when it can ([`ClientBuilder::polling_fallback`]).
//!
//! A [`Client`] holds one gRPC channel; every [`TokenSource`] made from it shares that channel,
//! so a service with 50 accounts opens one connection, not 50. [`AuthorizationLayer`] puts the
//! token on outgoing HTTP requests, with the account's EdgeTag team as `Team-Id`
//! ([`Token::team_id`]), which EdgeTag's API wants beside it.
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use credential_client::{Client, ExposeSecret};
//!
//! let client = Client::builder("https://credentials.internal:50051")
//!     .bearer_token(std::env::var("CREDENTIALS_TOKEN")?)
//!     .min_validity(Duration::from_secs(60))
//!     .build()?;
//! let acme = client.token_source("acme");
//! let token = acme.token().await?; // from memory once the first token has arrived
//! let header = format!("{} {}", token.token_type(), token.access_token().expose_secret());
//! let team = token.team_id(); // for `Team-Id`; None until the service has learned it
//! # Ok(()) }
//! ```

mod codes;
mod layer;
#[cfg(feature = "otel")]
mod otel;
pub mod proto;
mod source;
mod token_file;

use std::{
    fmt,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

pub use codes::code_name;
pub use layer::{Authorization, AuthorizationLayer, TEAM_ID_HEADER};
pub use secrecy::{ExposeSecret, SecretString};
pub use source::TokenSource;
pub use token_file::TokenFileError;
pub use tonic::{
    Code,
    transport::{Channel, ClientTlsConfig},
};
use tonic::{
    metadata::{Ascii, MetadataValue, errors::InvalidMetadataValue},
    service::{Interceptor, interceptor::InterceptedService},
    transport::Endpoint,
};

use crate::proto::credential_service_client::CredentialServiceClient;

/// An access token as the service handed it out. Cloning is cheap (the token is shared), and
/// `Debug` never shows the token itself.
#[derive(Clone)]
pub struct Token(Arc<TokenInner>);

#[derive(Clone)]
struct TokenInner {
    access_token: SecretString,
    token_type: String,
    expires_at: SystemTime,
    /// Empty while the service does not know it.
    team_id: String,
}

impl Token {
    /// Assembles a token; for tests and for services that wrap this crate.
    pub fn new(access_token: SecretString, token_type: String, expires_at: SystemTime) -> Self {
        Self(Arc::new(TokenInner {
            access_token,
            token_type,
            expires_at,
            team_id: String::new(),
        }))
    }

    /// The same token, for the EdgeTag team `team_id` (empty: not known).
    pub fn with_team_id(self, team_id: impl Into<String>) -> Self {
        let inner = Arc::unwrap_or_clone(self.0);
        Self(Arc::new(TokenInner {
            team_id: team_id.into(),
            ..inner
        }))
    }

    /// The EdgeTag team the account's grant reaches: EdgeTag's API wants it as `Team-Id` beside
    /// `Authorization` ([`AuthorizationLayer`] sends both). `None` while the service has not
    /// learned it yet (it pushes the token again once it has).
    pub fn team_id(&self) -> Option<&str> {
        Some(self.0.team_id.as_str()).filter(|id| !id.is_empty())
    }

    /// The access token; send it as `Authorization: <token_type> <access_token>`.
    pub fn access_token(&self) -> &SecretString {
        &self.0.access_token
    }

    /// `Bearer` unless the provider says otherwise.
    pub fn token_type(&self) -> &str {
        &self.0.token_type
    }

    /// When EdgeTag stops accepting the token.
    pub fn expires_at(&self) -> SystemTime {
        self.0.expires_at
    }

    /// The `Authorization` header value, marked sensitive so HTTP libraries leave it out of
    /// their logs. Fails only if the token holds characters a header cannot carry.
    pub fn authorization(&self) -> Result<http::HeaderValue, http::header::InvalidHeaderValue> {
        let mut value = http::HeaderValue::try_from(format!(
            "{} {}",
            self.token_type(),
            self.access_token().expose_secret()
        ))?;
        value.set_sensitive(true);
        Ok(value)
    }

    /// Whether the token stays valid for `min_validity` after `now`.
    fn covers(&self, now: SystemTime, min_validity: Duration) -> bool {
        now.checked_add(min_validity)
            .is_some_and(|t| t < self.expires_at())
    }
}

/// The same token: the same access token, type and team (a token whose team became known is
/// worth sending again). The expiry is left out, as the service may report the same token's
/// expiry with a different precision after a restart.
impl PartialEq for Token {
    fn eq(&self, other: &Self) -> bool {
        self.access_token().expose_secret() == other.access_token().expose_secret()
            && self.token_type() == other.token_type()
            && self.team_id() == other.team_id()
    }
}

impl Eq for Token {}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("access_token", &"<redacted>")
            .field("token_type", &self.token_type())
            .field("expires_at", &self.expires_at())
            .field("team_id", &self.team_id())
            .finish()
    }
}

/// Why [`TokenSource::token`] has no token to hand out.
///
/// The first two need a person (connect the account); the last passes with time, as the source
/// keeps reconnecting in the background.
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The service does not know the account (`NOT_FOUND`): never connected, or removed.
    #[error("account {account:?} is not connected at the credential service")]
    UnknownAccount { account: String },
    /// EdgeTag rejected the account's refresh token (`FAILED_PRECONDITION`): an operator must
    /// connect it again with BeginAuth and CompleteAuth.
    #[error("account {account:?} needs re-authorization at the credential service")]
    NeedsReauthorization { account: String },
    /// No token that covers `min_validity`: the service is unreachable or refused (`code` says
    /// how), and the last token it sent is too close to expiry, or there was none.
    #[error("no token for account {account:?}: {code:?}: {message}")]
    Unavailable {
        account: String,
        code: Code,
        message: String,
    },
}

impl Error {
    /// The gRPC status code this error stands for.
    pub fn code(&self) -> Code {
        match self {
            Error::UnknownAccount { .. } => Code::NotFound,
            Error::NeedsReauthorization { .. } => Code::FailedPrecondition,
            Error::Unavailable { code, .. } => *code,
        }
    }

    fn from_status(account: &str, status: &tonic::Status) -> Self {
        let account = account.to_owned();
        match status.code() {
            Code::NotFound => Error::UnknownAccount { account },
            Code::FailedPrecondition => Error::NeedsReauthorization { account },
            code => Error::Unavailable {
                account,
                code,
                message: status.message().to_owned(),
            },
        }
    }
}

/// Why a [`Client`] could not be built. Never shows the bearer token.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The endpoint is not a URL tonic can connect to, or the TLS settings do not apply to it.
    #[error("invalid credential service endpoint: {0}")]
    Endpoint(#[source] tonic::transport::Error),
    /// The bearer token holds characters an HTTP header cannot carry.
    #[error("the bearer token holds characters an HTTP header cannot carry")]
    BearerToken,
    /// The bearer token file cannot be read, or holds no usable token.
    #[error(transparent)]
    BearerTokenFile(#[from] TokenFileError),
}

/// The generated gRPC client with the caller's [`Bearer`] token on every call.
pub type GrpcClient = CredentialServiceClient<InterceptedService<Channel, Bearer>>;

type Grpc = GrpcClient;

/// The wall clock a source judges expiry by.
type ClockFn = Arc<dyn Fn() -> SystemTime + Send + Sync>;

/// Adds `authorization: Bearer ...` (the caller's token from the service's callers file, or a
/// JWT from a file such as a projected service-account token) to every call when a token is
/// configured, marked sensitive so that no `Debug` output shows it. For any client of the
/// service: [`Client`], `credctl` and the service's tests. With the `otel` feature, also the
/// caller's current trace context (`traceparent`), so the service's spans join its trace.
#[derive(Clone)]
pub struct Bearer(BearerFrom);

#[derive(Clone)]
enum BearerFrom {
    Fixed(Option<MetadataValue<Ascii>>),
    File(Arc<token_file::TokenFile>),
}

impl Bearer {
    /// Fails when the token holds characters a header cannot carry; the error shows none of them.
    pub fn new(token: Option<&str>) -> Result<Self, InvalidMetadataValue> {
        let header = token
            .map(|t| {
                let mut value = MetadataValue::try_from(format!("Bearer {t}"))?;
                value.set_sensitive(true);
                Ok(value)
            })
            .transpose()?;
        Ok(Self(BearerFrom::Fixed(header)))
    }

    /// The token on the first line of `path`, read again whenever the file changes (see
    /// [`ClientBuilder::bearer_token_file`]). Fails if the file cannot be read now.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, TokenFileError> {
        let file = token_file::TokenFile::open(path.as_ref())?;
        Ok(Self(BearerFrom::File(Arc::new(file))))
    }
}

impl Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        let value = match &self.0 {
            BearerFrom::Fixed(value) => value.clone(),
            BearerFrom::File(file) => Some(
                file.header()
                    .map_err(|e| tonic::Status::unauthenticated(e.to_string()))?,
            ),
        };
        if let Some(value) = value {
            request.metadata_mut().insert("authorization", value);
        }
        #[cfg(feature = "otel")]
        otel::inject(request.metadata_mut());
        Ok(request)
    }
}

/// Why [`endpoint`] could not describe the connection.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EndpointError {
    /// The address is not a URL tonic can connect to.
    #[error("{0}")]
    Address(#[source] tonic::transport::Error),
    /// The TLS settings do not apply to it.
    #[error("{0}")]
    Tls(#[source] tonic::transport::Error),
}

impl EndpointError {
    /// The transport's own error.
    pub fn into_inner(self) -> tonic::transport::Error {
        match self {
            Self::Address(e) | Self::Tls(e) => e,
        }
    }
}

/// How every client of the service ([`Client`], `credctl`) reaches it: `url` with a 5 s connect
/// timeout, and `tls` when given. Callers add what is theirs (keep-alives, a call timeout) and
/// connect, lazily or at once.
pub fn endpoint(
    url: impl Into<String>,
    tls: Option<ClientTlsConfig>,
) -> Result<Endpoint, EndpointError> {
    let mut endpoint = Endpoint::from_shared(url.into())
        .map_err(EndpointError::Address)?
        .connect_timeout(Duration::from_secs(5));
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls).map_err(EndpointError::Tls)?;
    }
    Ok(endpoint)
}

/// What every source of a client shares, apart from the channel.
#[derive(Clone)]
struct Settings {
    min_validity: Duration,
    backoff_initial: Duration,
    backoff_max: Duration,
    /// WatchToken attempts in a row that may end UNAVAILABLE before GetToken is tried instead.
    unavailable_attempts: u32,
    /// While polling, how often WatchToken is tried again.
    watch_again_after: Duration,
    clock: ClockFn,
}

/// A connection to the credential service, shared by the [`TokenSource`]s made from it.
///
/// Cloning is cheap and shares the connection.
#[derive(Clone)]
pub struct Client {
    grpc: Grpc,
    settings: Settings,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("min_validity", &self.settings.min_validity)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Starts configuring a client of the service at `endpoint`
    /// (`http://host:port`, or `https://…` for TLS with the system's roots unless
    /// [`ClientBuilder::tls`] says otherwise). It connects lazily, on first use, and reconnects
    /// by itself.
    pub fn builder(endpoint: impl Into<String>) -> ClientBuilder {
        ClientBuilder::new(Target::Endpoint(endpoint.into()))
    }

    /// Starts configuring a client over a channel the caller built (its own TLS, timeouts or
    /// load balancing); [`ClientBuilder::tls`] does not apply then.
    pub fn builder_with_channel(channel: Channel) -> ClientBuilder {
        ClientBuilder::new(Target::Channel(channel))
    }

    /// A source of tokens for `account`, following it in the background from now on, over this
    /// client's connection. Must be called within a Tokio runtime.
    pub fn token_source(&self, account: impl Into<String>) -> TokenSource {
        TokenSource::start(self.grpc.clone(), account.into(), self.settings.clone())
    }

    /// The same connection, with a different `min_validity` for the sources made from it.
    pub fn with_min_validity(&self, min_validity: Duration) -> Client {
        let mut client = self.clone();
        client.settings.min_validity = min_validity;
        client
    }
}

enum Target {
    Endpoint(String),
    Channel(Channel),
}

/// Settings for a [`Client`]; made by [`Client::builder`].
#[must_use]
pub struct ClientBuilder {
    target: Target,
    bearer_token: Option<SecretString>,
    bearer_token_file: Option<PathBuf>,
    tls: Option<ClientTlsConfig>,
    settings: Settings,
}

impl fmt::Debug for ClientBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientBuilder")
            .field(
                "bearer_token",
                &self.bearer_token.as_ref().map(|_| "<redacted>"),
            )
            .field("bearer_token_file", &self.bearer_token_file)
            .field("min_validity", &self.settings.min_validity)
            .finish_non_exhaustive()
    }
}

impl ClientBuilder {
    fn new(target: Target) -> Self {
        Self {
            target,
            bearer_token: None,
            bearer_token_file: None,
            tls: None,
            settings: Settings {
                min_validity: Duration::ZERO,
                backoff_initial: Duration::from_millis(200),
                backoff_max: Duration::from_secs(30),
                unavailable_attempts: 3,
                watch_again_after: Duration::from_secs(30),
                clock: Arc::new(SystemTime::now),
            },
        }
    }

    /// The token this service presents to the credential service (its entry in the callers
    /// file). Without one, calls carry no credentials, which only an open service accepts.
    pub fn bearer_token(mut self, token: impl Into<SecretString>) -> Self {
        self.bearer_token = Some(token.into());
        self.bearer_token_file = None;
        self
    }

    /// Sends the token on the first line of `path` instead, read again whenever the file changes
    /// (checked on each call with one `stat`): for a Kubernetes projected service-account token
    /// (`/var/run/secrets/tokens/credential-service`), which the kubelet rewrites before it
    /// expires. If the file cannot be read later, the last token read is sent.
    pub fn bearer_token_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.bearer_token_file = Some(path.into());
        self.bearer_token = None;
        self
    }

    /// TLS settings (CA, client certificate for mutual TLS, domain name) for an `https` endpoint.
    pub fn tls(mut self, tls: ClientTlsConfig) -> Self {
        self.tls = Some(tls);
        self
    }

    /// How long a token must still be valid when handed out (default: zero, merely unexpired).
    /// The service refreshes ahead of this, and while it is unreachable the cached token is
    /// handed out only while it still covers this much.
    pub fn min_validity(mut self, min_validity: Duration) -> Self {
        self.settings.min_validity = min_validity;
        self
    }

    /// The first and the longest pause between reconnection attempts (default 200 ms and 30 s).
    /// Pauses double from `initial` up to `max`, each randomized by up to half so that many
    /// callers do not come back at once.
    pub fn reconnect_backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.settings.backoff_initial = initial;
        self.settings.backoff_max = max.max(initial);
        self
    }

    /// When to poll GetToken instead of watching: after `unavailable_attempts` WatchToken
    /// attempts in a row ended UNAVAILABLE without a token (default 3; a proxy may cut streams
    /// while calls get through), and at once when the service has no place for another stream
    /// (RESOURCE_EXHAUSTED). While polling, WatchToken is tried again about every
    /// `watch_again_after` (default 30 s, randomized), and at once after GetToken fails too.
    pub fn polling_fallback(
        mut self,
        unavailable_attempts: u32,
        watch_again_after: Duration,
    ) -> Self {
        self.settings.unavailable_attempts = unavailable_attempts.max(1);
        self.settings.watch_again_after = watch_again_after;
        self
    }

    /// The clock that decides whether a token still covers `min_validity` (default: the system
    /// clock). For tests that move time rather than wait.
    pub fn clock(mut self, now: impl Fn() -> SystemTime + Send + Sync + 'static) -> Self {
        self.settings.clock = Arc::new(now);
        self
    }

    /// The client. Connects lazily: an unreachable service shows up as [`Error::Unavailable`]
    /// from the sources, not here.
    pub fn build(self) -> Result<Client, ConfigError> {
        let channel = match self.target {
            Target::Channel(channel) => channel,
            Target::Endpoint(url) => {
                let https = url.starts_with("https:");
                let tls = match (self.tls, https) {
                    (Some(tls), _) => Some(tls),
                    (None, true) => Some(ClientTlsConfig::new().with_enabled_roots()),
                    (None, false) => None,
                };
                endpoint(url, tls)
                    .map_err(|e| ConfigError::Endpoint(e.into_inner()))?
                    // Dead connections (a vanished server, a dropped NAT entry) are noticed
                    // within about a minute even while a stream sits idle between tokens.
                    .http2_keep_alive_interval(Duration::from_secs(30))
                    .keep_alive_timeout(Duration::from_secs(20))
                    .keep_alive_while_idle(true)
                    .connect_lazy()
            }
        };
        let bearer = match &self.bearer_token_file {
            Some(path) => Bearer::from_file(path)?,
            None => Bearer::new(self.bearer_token.as_ref().map(|t| t.expose_secret()))
                .map_err(|_| ConfigError::BearerToken)?,
        };
        Ok(Client {
            grpc: CredentialServiceClient::with_interceptor(channel, bearer),
            settings: self.settings,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_goes_in_the_authorization_header_only_when_set() {
        let request = Bearer::new(Some("tok"))
            .unwrap()
            .call(tonic::Request::new(()))
            .unwrap();
        assert_eq!(
            request.metadata().get("authorization").unwrap(),
            "Bearer tok"
        );
        assert!(
            !format!("{:?}", request.metadata()).contains("tok"),
            "sensitive"
        );
        let request = Bearer::new(None)
            .unwrap()
            .call(tonic::Request::new(()))
            .unwrap();
        assert!(request.metadata().get("authorization").is_none());
    }

    /// The team rides along without changing the token; an empty one means not known; a token
    /// with another team is another token; `Debug` shows the team, never the token.
    #[test]
    fn a_token_carries_its_team() {
        let at = SystemTime::UNIX_EPOCH;
        let bare = Token::new("at-secret".into(), "Bearer".into(), at);
        assert_eq!(bare.team_id(), None);
        assert_eq!(bare.clone().with_team_id("").team_id(), None);
        let team = bare.clone().with_team_id("t-1");
        assert_eq!(team.team_id(), Some("t-1"));
        assert_eq!(team.access_token().expose_secret(), "at-secret");
        assert_ne!(team, bare);
        let shown = format!("{team:?}");
        assert!(
            shown.contains("t-1") && !shown.contains("at-secret"),
            "{shown}"
        );
    }
}
