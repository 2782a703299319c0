//! Settings: clap flags, each with an environment variable, resolved once into [`ServiceConfig`].
//!
//! EdgeTag's hosts come from the `--environment` preset (sandbox or production) and each URL can be
//! overridden, so tests and other OAuth 2.0 servers work too. Missing or unsafe settings stop the
//! process with one line naming both the flag and the variable.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, ValueEnum};
use secrecy::SecretString;
use url::Url;

use crate::{
    auth::Callers,
    broker::BrokerConfig,
    oauth::{ClientSecret, ProviderConfig},
    sealing::{self, EncryptionConfig},
    tls::{ServerTls, TlsSettings},
};

/// Which EdgeTag deployment to talk to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Environment {
    Sandbox,
    Production,
}

impl Environment {
    /// (browser host, API host) from EdgeTag's documentation.
    fn hosts(self) -> (&'static str, &'static str) {
        match self {
            Self::Sandbox => (
                "https://app-sandbox.edgetag.io",
                "https://api-sandbox.edgetag.io",
            ),
            Self::Production => ("https://app.edgetag.io", "https://api.edgetag.io"),
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Command-line and environment settings of the server.
#[derive(Debug, Clone, Args)]
pub struct Settings {
    /// Address to serve gRPC on (health and reflection included).
    #[arg(
        long,
        env = "CREDENTIAL_SERVICE_LISTEN",
        default_value = "127.0.0.1:50051"
    )]
    pub listen: SocketAddr,

    /// Directory of the embedded sled database (created with mode 0700).
    #[arg(long, env = "CREDENTIAL_SERVICE_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,

    #[command(flatten)]
    pub store: StoreSettings,

    /// EdgeTag deployment whose hosts the URLs default to.
    #[arg(long, env = "EDGETAG_ENVIRONMENT", value_enum, default_value_t = Environment::Sandbox)]
    pub environment: Environment,

    /// Full URL of the authorize page [default: {UI host}/oauth/app/login].
    #[arg(long, env = "EDGETAG_AUTHORIZE_URL")]
    pub authorize_url: Option<Url>,

    /// Full URL of the token endpoint [default: {API host}/v1/oauth-app/client/token].
    #[arg(long, env = "EDGETAG_TOKEN_URL")]
    pub token_url: Option<Url>,

    /// Full URL of the revocation endpoint [default: {API host}/v1/oauth-app/client/revoke].
    #[arg(long, env = "EDGETAG_REVOKE_URL")]
    pub revoke_url: Option<Url>,

    /// The OAuth app's client id (required).
    #[arg(long, env = "EDGETAG_CLIENT_ID")]
    pub client_id: Option<String>,

    /// File holding the OAuth app's client secret; re-read on SIGHUP, when its content changes and
    /// when EdgeTag rejects the secret in force. Alternatively put the secret itself in
    /// EDGETAG_CLIENT_SECRET (never on the command line, where `ps` shows it), which cannot change
    /// without a restart.
    #[arg(long, env = "EDGETAG_CLIENT_SECRET_FILE")]
    pub client_secret_file: Option<PathBuf>,

    /// Redirect URI registered for the OAuth app; must match it exactly (required).
    #[arg(long, env = "EDGETAG_REDIRECT_URI")]
    pub redirect_uri: Option<Url>,

    /// OAuth scope to request (EdgeTag supports only `full`).
    #[arg(long, env = "EDGETAG_SCOPE", default_value = "full")]
    pub scope: String,

    /// How long a BeginAuth state stays usable.
    #[arg(long, env = "CREDENTIAL_SERVICE_STATE_TTL", default_value = "10m", value_parser = humantime::parse_duration)]
    pub state_ttl: Duration,

    /// GetToken refreshes first when the access token expires within this margin (never more
    /// than half the token's lifetime, so short-lived tokens are not refreshed on every call).
    #[arg(long, env = "CREDENTIAL_SERVICE_REFRESH_MARGIN", default_value = "5m", value_parser = humantime::parse_duration)]
    pub refresh_margin: Duration,

    /// Callers start at most one refresh per account in this interval: a token just issued is not
    /// refreshed again on demand, and an expired account backing off lets one probe through this
    /// often.
    #[arg(long, env = "CREDENTIAL_SERVICE_DEMAND_REFRESH_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub demand_refresh_interval: Duration,

    /// Deadline for each request to EdgeTag, connecting included.
    #[arg(long, env = "EDGETAG_REQUEST_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub upstream_timeout: Duration,

    /// Token lifetime assumed when EdgeTag's answer has no `expires_in`.
    #[arg(long, env = "EDGETAG_DEFAULT_TOKEN_LIFETIME", default_value = "1h", value_parser = humantime::parse_duration)]
    pub default_token_lifetime: Duration,

    /// Most requests to EdgeTag's token endpoint in flight at once.
    #[arg(
        long,
        env = "CREDENTIAL_SERVICE_UPSTREAM_CONCURRENCY",
        default_value_t = 8
    )]
    pub upstream_concurrency: usize,

    /// Also send `redirect_uri` in the code exchange, for strict OAuth 2.0 servers (EdgeTag needs none).
    #[arg(long, env = "EDGETAG_SEND_REDIRECT_URI")]
    pub send_redirect_uri: bool,

    /// Address to serve the browser callback on (EdgeTag's redirect target; see --callback-path).
    /// Off when unset. Register `http(s)://HOST:PORT/oauth/callback` as the redirect URI.
    #[arg(long, env = "CREDENTIAL_SERVICE_CALLBACK_LISTEN")]
    pub callback_listen: Option<SocketAddr>,

    /// Path of the browser callback page.
    #[arg(
        long,
        env = "CREDENTIAL_SERVICE_CALLBACK_PATH",
        default_value = "/oauth/callback"
    )]
    pub callback_path: String,

    /// Address to serve Prometheus metrics on (`/metrics`). Off when unset.
    #[arg(long, env = "CREDENTIAL_SERVICE_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// Log format.
    #[arg(long, env = "CREDENTIAL_SERVICE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// TOML file of the callers allowed in (token hashes or TLS names, roles, account globs);
    /// re-read on SIGHUP and when its content changes. Without it every call is allowed and only
    /// loopback may be listened on.
    #[arg(long, env = "CREDENTIAL_SERVICE_CALLERS_FILE")]
    pub callers_file: Option<PathBuf>,

    #[command(flatten)]
    pub tls: TlsSettings,

    /// How often the callers file, the TLS files and the client secret file are checked for new
    /// content, which is then taken up (SIGHUP takes it up at once).
    #[arg(long, env = "CREDENTIAL_SERVICE_RELOAD_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration)]
    pub reload_interval: Duration,

    #[command(flatten)]
    pub keys: KeySettings,

    /// How often the aggregated audit events (token reads, refusals) are written.
    #[arg(long, env = "CREDENTIAL_SERVICE_AUDIT_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration)]
    pub audit_interval: Duration,

    /// Most distinct refusals (caller, method, account, outcome, peer) counted apart per thread and
    /// audit interval; the rest are counted together under `(others)`.
    #[arg(long, env = "CREDENTIAL_SERVICE_AUDIT_MAX_KEYS", default_value_t = crate::audit::DEFAULT_MAX_KEYS)]
    pub audit_max_keys: usize,

    #[command(flatten)]
    pub limits: LimitSettings,
}

/// What one peer, or all of them together, may hold of the gRPC listener at once. Each bound
/// answers a way to exhaust the service's memory or file descriptors without credentials.
#[derive(Debug, Clone, Args)]
pub struct LimitSettings {
    /// Largest request message on every gRPC service (health and reflection too); a larger one is
    /// refused (OUT_OF_RANGE) before it is read.
    #[arg(long, env = "CREDENTIAL_SERVICE_MAX_REQUEST_BYTES", default_value_t = Limits::DEFAULT.max_request_bytes)]
    pub max_request_bytes: usize,

    /// Most gRPC connections open at once; one more is closed as soon as it is accepted.
    #[arg(long, env = "CREDENTIAL_SERVICE_MAX_CONNECTIONS", default_value_t = Limits::DEFAULT.max_connections)]
    pub max_connections: usize,

    /// Most concurrent calls (HTTP/2 streams) on one connection.
    #[arg(long, env = "CREDENTIAL_SERVICE_MAX_STREAMS_PER_CONNECTION", default_value_t = Limits::DEFAULT.max_streams_per_connection)]
    pub max_streams_per_connection: u32,

    /// Most calls by authenticated callers in progress at once over all connections; one more is
    /// refused with RESOURCE_EXHAUSTED, not queued.
    #[arg(long, env = "CREDENTIAL_SERVICE_MAX_CALLS_IN_FLIGHT", default_value_t = Limits::DEFAULT.max_calls_in_flight)]
    pub max_calls_in_flight: usize,

    /// Most calls to the methods anyone may call (health Watch, reflection) in progress at once,
    /// apart from `--max-calls-in-flight` so that they cannot lock callers out; one more is refused
    /// with RESOURCE_EXHAUSTED.
    #[arg(long, env = "CREDENTIAL_SERVICE_MAX_OPEN_CALLS_IN_FLIGHT", default_value_t = Limits::DEFAULT.max_open_calls_in_flight)]
    pub max_open_calls_in_flight: usize,

    /// Most health Watch streams open at once; one more is refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "CREDENTIAL_SERVICE_MAX_HEALTH_WATCHES", default_value_t = Limits::DEFAULT.max_health_watches)]
    pub max_health_watches: usize,

    /// Most WatchToken and WatchAccounts streams open at once, together; one more is refused
    /// with RESOURCE_EXHAUSTED.
    #[arg(long, env = "CREDENTIAL_SERVICE_MAX_WATCHERS", default_value_t = Limits::DEFAULT.max_watchers)]
    pub max_watchers: usize,

    /// A connection that has not finished its TLS handshake and sent the HTTP/2 preface within
    /// this is closed.
    #[arg(long, env = "CREDENTIAL_SERVICE_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub handshake_timeout: Duration,

    /// Sends an HTTP/2 PING to a peer that has been silent this long, so dead peers are found.
    #[arg(long, env = "CREDENTIAL_SERVICE_HTTP2_KEEPALIVE_INTERVAL", default_value = "60s", value_parser = humantime::parse_duration)]
    pub http2_keepalive_interval: Duration,

    /// Closes a connection whose peer has not answered a keepalive PING within this.
    #[arg(long, env = "CREDENTIAL_SERVICE_HTTP2_KEEPALIVE_TIMEOUT", default_value = "20s", value_parser = humantime::parse_duration)]
    pub http2_keepalive_timeout: Duration,
}

/// The bounds of the gRPC listener, checked; see [`LimitSettings`] for what each means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_request_bytes: usize,
    pub max_connections: usize,
    pub max_streams_per_connection: u32,
    pub max_calls_in_flight: usize,
    pub max_open_calls_in_flight: usize,
    pub max_health_watches: usize,
    pub max_watchers: usize,
    pub handshake_timeout: Duration,
    pub http2_keepalive_interval: Duration,
    pub http2_keepalive_timeout: Duration,
}

impl Limits {
    /// The production defaults (those of the flags).
    pub const DEFAULT: Self = Self {
        max_request_bytes: 16 * 1024,
        max_connections: 512,
        max_streams_per_connection: 100,
        max_calls_in_flight: 1024,
        max_open_calls_in_flight: 128,
        max_health_watches: 64,
        max_watchers: 10_000,
        handshake_timeout: Duration::from_secs(10),
        http2_keepalive_interval: Duration::from_secs(60),
        http2_keepalive_timeout: Duration::from_secs(20),
    };
}

impl Default for Limits {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl LimitSettings {
    fn resolve(&self) -> Result<Limits, ConfigError> {
        let counts = [
            (
                self.max_request_bytes,
                "--max-request-bytes / CREDENTIAL_SERVICE_MAX_REQUEST_BYTES",
            ),
            (
                self.max_connections,
                "--max-connections / CREDENTIAL_SERVICE_MAX_CONNECTIONS",
            ),
            (
                self.max_streams_per_connection as usize,
                "--max-streams-per-connection / CREDENTIAL_SERVICE_MAX_STREAMS_PER_CONNECTION",
            ),
            (
                self.max_calls_in_flight,
                "--max-calls-in-flight / CREDENTIAL_SERVICE_MAX_CALLS_IN_FLIGHT",
            ),
            (
                self.max_open_calls_in_flight,
                "--max-open-calls-in-flight / CREDENTIAL_SERVICE_MAX_OPEN_CALLS_IN_FLIGHT",
            ),
            (
                self.max_health_watches,
                "--max-health-watches / CREDENTIAL_SERVICE_MAX_HEALTH_WATCHES",
            ),
            (
                self.max_watchers,
                "--max-watchers / CREDENTIAL_SERVICE_MAX_WATCHERS",
            ),
        ];
        for (value, name) in counts {
            if value == 0 {
                return Err(ConfigError(format!("{name} must be at least 1")));
            }
        }
        for (value, name) in [
            (
                self.handshake_timeout,
                "--handshake-timeout / CREDENTIAL_SERVICE_HANDSHAKE_TIMEOUT",
            ),
            (
                self.http2_keepalive_interval,
                "--http2-keepalive-interval / CREDENTIAL_SERVICE_HTTP2_KEEPALIVE_INTERVAL",
            ),
            (
                self.http2_keepalive_timeout,
                "--http2-keepalive-timeout / CREDENTIAL_SERVICE_HTTP2_KEEPALIVE_TIMEOUT",
            ),
        ] {
            if value.is_zero() {
                return Err(ConfigError(format!("{name} must be longer than zero")));
            }
        }
        Ok(Limits {
            max_request_bytes: self.max_request_bytes,
            max_connections: self.max_connections,
            max_streams_per_connection: self.max_streams_per_connection,
            max_calls_in_flight: self.max_calls_in_flight,
            max_open_calls_in_flight: self.max_open_calls_in_flight,
            max_health_watches: self.max_health_watches,
            max_watchers: self.max_watchers,
            handshake_timeout: self.handshake_timeout,
            http2_keepalive_interval: self.http2_keepalive_interval,
            http2_keepalive_timeout: self.http2_keepalive_timeout,
        })
    }
}

/// EdgeTag's revocation path, on its API host.
const REVOKE_PATH: &str = "/v1/oauth-app/client/revoke";

/// Where state lives: sled in `--data-dir` (the default), or a PostgreSQL database that several
/// replicas share. Shared by the server and `rotate-keys`.
#[derive(Debug, Clone, Args)]
pub struct StoreSettings {
    /// `sled` (in --data-dir), or `postgres://USER@HOST:PORT/DB?sslmode=verify-full|require|disable`
    /// for several replicas sharing one database.
    #[arg(long, env = "CREDENTIAL_SERVICE_STORE", default_value = "sled")]
    pub store: String,

    /// File with the PostgreSQL password (kept out of the URL and the environment).
    #[arg(long, env = "CREDENTIAL_SERVICE_STORE_PASSWORD_FILE")]
    pub store_password_file: Option<PathBuf>,

    /// PEM file of the CA that signed PostgreSQL's certificate (needed for sslmode=verify-full).
    #[arg(long, env = "CREDENTIAL_SERVICE_STORE_CA_FILE")]
    pub store_ca_file: Option<PathBuf>,
}

impl StoreSettings {
    /// The store to open. PostgreSQL needs an explicit encryption key: every replica must seal
    /// with the same one, and a key created on one machine would exist on that machine only.
    pub fn resolve(&self, keys: &KeySettings) -> Result<StoreConfig, ConfigError> {
        let store = self.store.trim();
        if store.is_empty() || store == "sled" {
            if self.store_password_file.is_some() || self.store_ca_file.is_some() {
                return Err(ConfigError(
                    "--store-password-file and --store-ca-file are for --store postgres://…; the sled store has no server".into(),
                ));
            }
            return Ok(StoreConfig::Sled);
        }
        if !(store.starts_with("postgres://") || store.starts_with("postgresql://")) {
            return Err(ConfigError(
                "--store / CREDENTIAL_SERVICE_STORE must be `sled` or a postgres:// URL".into(),
            ));
        }
        if keys.encryption_key_file.is_none() {
            return Err(ConfigError(
                "--store postgres://… needs --encryption-key-file (CREDENTIAL_SERVICE_ENCRYPTION_KEY_FILE): every replica must seal with the same key".into(),
            ));
        }
        let ca = self
            .store_ca_file
            .as_ref()
            .map(|path| {
                std::fs::read(path).map_err(|e| {
                    ConfigError(format!(
                        "cannot read --store-ca-file / CREDENTIAL_SERVICE_STORE_CA_FILE {}: {e}",
                        path.display()
                    ))
                })
            })
            .transpose()?;
        let pg = crate::store::PostgresConfig::parse(store, None, ca)
            .map_err(|e| ConfigError(format!("--store / CREDENTIAL_SERVICE_STORE: {e}")))?;
        let pg = match &self.store_password_file {
            Some(path) => {
                sealing::warn_if_open_to_others(path, "the store password file");
                pg.with_password_file(path).map_err(ConfigError)?
            }
            None => pg,
        };
        Ok(StoreConfig::Postgres(Box::new(pg)))
    }
}

/// Which store the service opens.
#[derive(Debug, Clone, Default)]
pub enum StoreConfig {
    /// sled in the data directory: one process.
    #[default]
    Sled,
    /// A PostgreSQL database shared by several replicas.
    Postgres(Box<crate::store::PostgresConfig>),
}

/// The encryption keys of the data directory; shared by the server and `rotate-keys`.
#[derive(Debug, Clone, Args)]
pub struct KeySettings {
    /// File with the 32-byte encryption key (base64) that seals stored records
    /// [default: <data-dir>.key, created on first start].
    #[arg(long, env = "CREDENTIAL_SERVICE_ENCRYPTION_KEY_FILE")]
    pub encryption_key_file: Option<PathBuf>,

    /// Older key file(s) that still open records sealed before a rotation (repeatable;
    /// comma-separated in the variable).
    #[arg(
        long,
        env = "CREDENTIAL_SERVICE_PREVIOUS_ENCRYPTION_KEY_FILES",
        value_delimiter = ','
    )]
    pub previous_encryption_key_file: Vec<PathBuf>,
}

impl KeySettings {
    /// The key files as the server and `rotate-keys` load them.
    pub fn encryption(&self) -> EncryptionConfig {
        EncryptionConfig {
            key_file: self.encryption_key_file.clone(),
            previous_key_files: self.previous_encryption_key_file.clone(),
        }
    }
}

/// Everything the server needs, checked.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub provider: ProviderConfig,
    pub broker: BrokerConfig,
    /// Who may call; [`Callers::open`] without a callers file.
    pub callers: Callers,
    /// `None`: plaintext gRPC.
    pub tls: Option<ServerTls>,
    pub encryption: EncryptionConfig,
    /// Where state lives.
    pub store: StoreConfig,
    /// The browser callback listener, if any.
    pub callback: Option<CallbackConfig>,
    /// Where `/metrics` is served, if anywhere.
    pub metrics_listen: Option<SocketAddr>,
    /// The bounds of the gRPC listener.
    pub limits: Limits,
    /// How the audit trail aggregates.
    pub audit: crate::audit::AuditConfig,
    /// How often reloadable files are checked for new content.
    pub reload_interval: Duration,
}

/// Where the browser callback listens and on which path.
#[derive(Debug, Clone)]
pub struct CallbackConfig {
    pub listen: SocketAddr,
    /// Starts with `/`.
    pub path: String,
}

/// A setting that is missing or unusable; one line, naming the flag and the variable.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(String);

/// Where EdgeTag is and who this service is to it: the settings that have no default.
#[derive(Debug, Clone)]
pub struct Upstream {
    pub authorize_url: Url,
    pub token_url: Url,
    pub revoke_url: Url,
    pub client_id: String,
    pub client_secret: ClientSecret,
    /// Must match a redirect URI registered for the OAuth app exactly.
    pub redirect_uri: Url,
}

impl ServiceConfig {
    /// The production defaults (those `--help` shows) around what has none. [`Settings::resolve`]
    /// starts here, and so do the tests and the benchmarks, each then setting what it is about:
    /// a new setting gets its default once, here.
    pub fn new(upstream: Upstream, data_dir: PathBuf) -> Self {
        let Upstream {
            authorize_url,
            token_url,
            revoke_url,
            client_id,
            client_secret,
            redirect_uri,
        } = upstream;
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            data_dir,
            provider: ProviderConfig {
                authorize_url,
                token_url,
                revoke_url,
                client_id,
                client_secret,
                redirect_uri,
                scope: "full".into(),
                request_timeout: Duration::from_secs(10),
                default_token_lifetime: Duration::from_secs(3600),
                send_redirect_uri: false,
            },
            broker: BrokerConfig::default(),
            callers: Callers::open(),
            tls: None,
            encryption: EncryptionConfig::default(),
            store: StoreConfig::Sled,
            callback: None,
            metrics_listen: None,
            limits: Limits::DEFAULT,
            audit: crate::audit::AuditConfig::default(),
            reload_interval: Duration::from_secs(10),
        }
    }
}

impl Settings {
    /// Checks the settings and fills in the environment's defaults. `client_secret_env` is the
    /// value of EDGETAG_CLIENT_SECRET, passed in so tests need not touch the process environment.
    pub fn resolve(self, client_secret_env: Option<String>) -> Result<ServiceConfig, ConfigError> {
        // Every flag named here, so a new one cannot be forgotten.
        let Settings {
            listen,
            data_dir,
            store,
            environment,
            authorize_url,
            token_url,
            revoke_url,
            client_id,
            client_secret_file,
            redirect_uri,
            scope,
            state_ttl,
            refresh_margin,
            demand_refresh_interval,
            upstream_timeout,
            default_token_lifetime,
            upstream_concurrency,
            send_redirect_uri,
            callback_listen,
            callback_path,
            metrics_listen,
            log_format: _, // read by the binary before anything else
            callers_file,
            tls,
            reload_interval,
            keys,
            limits,
            audit_interval,
            audit_max_keys,
        } = self;
        let client_id = client_id.filter(|s| !s.trim().is_empty()).ok_or_else(|| {
            ConfigError("missing client id: set --client-id or EDGETAG_CLIENT_ID".into())
        })?;
        let client_secret = match (
            &client_secret_file,
            client_secret_env.filter(|s| !s.is_empty()),
        ) {
            (Some(path), _) => {
                sealing::warn_if_open_to_others(path, "the client secret file");
                ClientSecret::from_file(path).map_err(ConfigError)?
            }
            (None, Some(secret)) => {
                tracing::warn!(
                    "the client secret comes from EDGETAG_CLIENT_SECRET, which cannot change while the \
                     service runs: after a roll at EdgeTag every refresh fails until a restart. \
                     --client-secret-file / EDGETAG_CLIENT_SECRET_FILE is re-read instead"
                );
                ClientSecret::fixed(SecretString::from(secret))
            }
            (None, None) => {
                return Err(ConfigError(
                    "missing client secret: set --client-secret-file or EDGETAG_CLIENT_SECRET_FILE (or EDGETAG_CLIENT_SECRET)"
                        .into(),
                ));
            }
        };
        let redirect_uri = redirect_uri.ok_or_else(|| {
            ConfigError("missing redirect URI: set --redirect-uri or EDGETAG_REDIRECT_URI".into())
        })?;

        let (ui, api) = environment.hosts();
        let preset = |base: &str, path: &str| {
            Url::parse(&format!("{base}{path}")).expect("preset URLs are valid")
        };
        // EdgeTag serves the token and revoke endpoints from one API host. A token URL given without
        // a revoke URL (a stand-in EdgeTag, a proxy) takes the revoke path on its own origin, so that
        // RemoveAccount never sends these client credentials to the preset's host instead.
        let revoke_url = revoke_url.unwrap_or_else(|| match &token_url {
            Some(token) => preset(&token.origin().ascii_serialization(), REVOKE_PATH),
            None => preset(api, REVOKE_PATH),
        });
        let authorize_url = authorize_url.unwrap_or_else(|| preset(ui, "/oauth/app/login"));
        let token_url = token_url.unwrap_or_else(|| preset(api, "/v1/oauth-app/client/token"));
        require_https(&authorize_url, "--authorize-url / EDGETAG_AUTHORIZE_URL")?;
        require_https(&token_url, "--token-url / EDGETAG_TOKEN_URL")?;
        require_https(&revoke_url, "--revoke-url / EDGETAG_REVOKE_URL")?;

        for (value, name) in [
            (state_ttl, "--state-ttl / CREDENTIAL_SERVICE_STATE_TTL"),
            (
                upstream_timeout,
                "--upstream-timeout / EDGETAG_REQUEST_TIMEOUT",
            ),
            (
                default_token_lifetime,
                "--default-token-lifetime / EDGETAG_DEFAULT_TOKEN_LIFETIME",
            ),
        ] {
            if value.is_zero() {
                return Err(ConfigError(format!("{name} must be longer than zero")));
            }
        }
        if upstream_concurrency == 0 {
            return Err(ConfigError(
                "--upstream-concurrency / CREDENTIAL_SERVICE_UPSTREAM_CONCURRENCY must be at least 1".into(),
            ));
        }

        let callers = match &callers_file {
            Some(path) => Callers::load(path).map_err(|e| ConfigError(e.to_string()))?,
            None if !listen.ip().is_loopback() => {
                return Err(ConfigError(format!(
                    "refusing to listen on {listen} without a callers file: anyone who can reach it could \
                     take every token. Set --callers-file / CREDENTIAL_SERVICE_CALLERS_FILE, or listen \
                     on loopback"
                )));
            }
            None => Callers::open(),
        };
        let tls = tls.resolve().map_err(ConfigError)?;
        if reload_interval.is_zero() {
            return Err(ConfigError(
                "--reload-interval / CREDENTIAL_SERVICE_RELOAD_INTERVAL must be longer than zero"
                    .into(),
            ));
        }
        let limits = limits.resolve()?;
        let store = store.resolve(&keys)?;
        if !callback_path.starts_with('/') || callback_path.contains(['?', '#']) {
            return Err(ConfigError(format!(
                "--callback-path / CREDENTIAL_SERVICE_CALLBACK_PATH must be a path starting with /: {callback_path:?}"
            )));
        }
        if callback_listen.is_some() && redirect_uri.path() != callback_path {
            tracing::warn!(
                redirect_uri = %printable(&redirect_uri),
                callback_path = %callback_path,
                "the redirect URI's path is not the callback path; fine behind a proxy that rewrites it"
            );
        }

        let upstream = Upstream {
            authorize_url,
            token_url,
            revoke_url,
            client_id,
            client_secret,
            redirect_uri,
        };
        let mut config = ServiceConfig::new(upstream, data_dir);
        config.listen = listen;
        config.provider.scope = scope;
        config.provider.request_timeout = upstream_timeout;
        config.provider.default_token_lifetime = default_token_lifetime;
        config.provider.send_redirect_uri = send_redirect_uri;
        config.broker.state_ttl = state_ttl;
        config.broker.refresh_margin = refresh_margin;
        config.broker.refresh.demand_interval = demand_refresh_interval;
        config.broker.upstream_concurrency = upstream_concurrency;
        config.callers = callers;
        config.tls = tls;
        config.reload_interval = reload_interval;
        config.encryption = keys.encryption();
        config.store = store;
        config.callback = callback_listen.map(|listen| CallbackConfig {
            listen,
            path: callback_path,
        });
        config.metrics_listen = metrics_listen;
        config.limits = limits;
        config.audit = crate::audit::AuditConfig {
            interval: audit_interval,
            max_keys: audit_max_keys,
        };
        Ok(config)
    }
}

/// Credentials travel to these URLs, so plain HTTP is allowed only to this machine.
fn require_https(url: &Url, name: &str) -> Result<(), ConfigError> {
    match url.scheme() {
        "https" => Ok(()),
        "http" if is_loopback(url) => Ok(()),
        _ => Err(ConfigError(format!(
            "{name} must be an https:// URL (plain http only to loopback): {}",
            printable(url)
        ))),
    }
}

/// Whether `url` points at this machine (where clear text cannot be overheard on a network).
pub fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(d)) => d == "localhost",
        None => false,
    }
}

/// `url` without any `user:password@`, for messages and logs.
pub fn printable(url: &Url) -> String {
    let mut url = url.clone();
    let _ = url.set_username("");
    let _ = url.set_password(None);
    url.to_string()
}

#[cfg(test)]
mod tests {
    use clap::Parser;
    use secrecy::ExposeSecret;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        settings: Settings,
    }

    fn settings(args: &[&str]) -> Settings {
        let mut argv = vec!["credential-service"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv).unwrap().settings
    }

    const REQUIRED: [&str; 4] = [
        "--client-id",
        "cid",
        "--redirect-uri",
        "https://ops.example.com/cb",
    ];

    #[test]
    fn postgres_needs_a_shared_key_and_keeps_the_password_in_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let password = dir.path().join("store-password");
        std::fs::write(&password, "s3cret-pw\n").unwrap();
        let key = dir.path().join("key");
        let url = "postgres://svc@db.internal:5432/creds?sslmode=disable";
        let with = |extra: &[&str]| {
            let mut args = REQUIRED.to_vec();
            args.extend_from_slice(&["--store", url]);
            args.extend_from_slice(extra);
            settings(&args).resolve(Some("secret".into()))
        };

        let e = with(&[]).unwrap_err().to_string();
        assert!(e.contains("needs --encryption-key-file"), "{e}");
        assert_eq!(e.lines().count(), 1);

        let key_arg = key.to_str().unwrap();
        let password_arg = password.to_str().unwrap();
        let config = with(&[
            "--encryption-key-file",
            key_arg,
            "--store-password-file",
            password_arg,
        ])
        .unwrap();
        let StoreConfig::Postgres(pg) = &config.store else {
            panic!("a postgres:// store is PostgreSQL");
        };
        assert_eq!(pg.url(), url);
        assert!(!format!("{config:?}").contains("s3cret-pw"), "{config:?}");

        // sled stays the default, and PostgreSQL's settings mean nothing to it.
        let config = settings(&REQUIRED).resolve(Some("secret".into())).unwrap();
        assert!(matches!(config.store, StoreConfig::Sled));
        let mut args = REQUIRED.to_vec();
        args.extend_from_slice(&["--store-password-file", password_arg]);
        let e = settings(&args).resolve(Some("secret".into())).unwrap_err();
        assert!(e.to_string().contains("sled store has no server"), "{e}");
    }

    #[test]
    fn a_token_url_without_a_revoke_url_revokes_on_its_own_host() {
        let mut args = REQUIRED.to_vec();
        args.extend([
            "--token-url",
            "https://edgetag.internal:8443/v1/oauth-app/client/token",
        ]);
        let c = settings(&args).resolve(Some("s".into())).unwrap();
        assert_eq!(
            c.provider.revoke_url.as_str(),
            "https://edgetag.internal:8443/v1/oauth-app/client/revoke"
        );
        args.extend(["--revoke-url", "https://other.internal/revoke"]);
        let c = settings(&args).resolve(Some("s".into())).unwrap();
        assert_eq!(
            c.provider.revoke_url.as_str(),
            "https://other.internal/revoke"
        );
    }

    #[test]
    fn sandbox_is_the_default_and_production_switches_every_host() {
        let c = settings(&REQUIRED).resolve(Some("s3cret".into())).unwrap();
        assert_eq!(
            c.provider.authorize_url.as_str(),
            "https://app-sandbox.edgetag.io/oauth/app/login"
        );
        assert_eq!(
            c.provider.token_url.as_str(),
            "https://api-sandbox.edgetag.io/v1/oauth-app/client/token"
        );
        assert_eq!(c.provider.client_secret.current().expose_secret(), "s3cret");
        assert_eq!(c.broker.state_ttl, Duration::from_secs(600));
        assert_eq!(c.broker.refresh_margin, Duration::from_secs(300));
        assert_eq!(c.listen.to_string(), "127.0.0.1:50051");

        let mut args = REQUIRED.to_vec();
        args.extend(["--environment", "production", "--state-ttl", "90s"]);
        let c = settings(&args).resolve(Some("s".into())).unwrap();
        assert_eq!(
            c.provider.authorize_url.as_str(),
            "https://app.edgetag.io/oauth/app/login"
        );
        assert_eq!(
            c.provider.token_url.as_str(),
            "https://api.edgetag.io/v1/oauth-app/client/token"
        );
        assert_eq!(
            c.provider.revoke_url.as_str(),
            "https://api.edgetag.io/v1/oauth-app/client/revoke"
        );
        assert_eq!(c.broker.state_ttl, Duration::from_secs(90));
    }

    #[test]
    fn the_flags_defaults_are_the_builders() {
        let resolved = settings(&REQUIRED).resolve(Some("s".into())).unwrap();
        let (ui, api) = Environment::Sandbox.hosts();
        let url = |base: &str, path: &str| Url::parse(&format!("{base}{path}")).unwrap();
        let built = ServiceConfig::new(
            Upstream {
                authorize_url: url(ui, "/oauth/app/login"),
                token_url: url(api, "/v1/oauth-app/client/token"),
                revoke_url: url(api, "/v1/oauth-app/client/revoke"),
                client_id: "cid".into(),
                client_secret: "s".into(),
                redirect_uri: url("https://ops.example.com", "/cb"),
            },
            "./data".into(),
        );
        assert_eq!(format!("{resolved:?}"), format!("{built:?}"));
        // What the provider's Debug leaves out.
        let (r, b) = (&resolved.provider, &built.provider);
        assert_eq!(
            r.client_secret.current().expose_secret(),
            b.client_secret.current().expose_secret()
        );
        assert_eq!(r.default_token_lifetime, b.default_token_lifetime);
        assert_eq!(r.send_redirect_uri, b.send_redirect_uri);
    }

    #[test]
    fn missing_settings_name_flag_and_variable() {
        let e = settings(&[])
            .resolve(Some("s".into()))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--client-id") && e.contains("EDGETAG_CLIENT_ID"),
            "{e}"
        );
        let e = settings(&REQUIRED).resolve(None).unwrap_err().to_string();
        assert!(
            e.contains("--client-secret-file") && e.contains("EDGETAG_CLIENT_SECRET_FILE"),
            "{e}"
        );
        let e = settings(&["--client-id", "c"])
            .resolve(Some("s".into()))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--redirect-uri") && e.contains("EDGETAG_REDIRECT_URI"),
            "{e}"
        );
    }

    #[test]
    fn secret_file_is_read_and_trimmed_and_never_printed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, "file-secret\n").unwrap();
        let mut args = REQUIRED.to_vec();
        let p = path.to_str().unwrap();
        args.extend(["--client-secret-file", p]);
        let c = settings(&args).resolve(Some("env-secret".into())).unwrap();
        assert_eq!(
            c.provider.client_secret.current().expose_secret(),
            "file-secret"
        );
        assert!(!format!("{c:?}").contains("file-secret"));
    }

    #[test]
    fn listening_beyond_loopback_needs_a_callers_file() {
        let mut args = REQUIRED.to_vec();
        args.extend(["--listen", "0.0.0.0:50051"]);
        let e = settings(&args)
            .resolve(Some("s".into()))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("0.0.0.0:50051") && e.contains("--callers-file"),
            "{e}"
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("callers.toml");
        std::fs::write(&path, "").unwrap();
        args.extend(["--callers-file", path.to_str().unwrap()]);
        let c = settings(&args).resolve(Some("s".into())).unwrap();
        assert!(!c.callers.is_open());
        let c = settings(&REQUIRED).resolve(Some("s".into())).unwrap();
        assert!(c.callers.is_open());
    }

    #[test]
    fn limits_default_to_the_documented_values_and_none_may_be_zero() {
        let c = settings(&REQUIRED).resolve(Some("s".into())).unwrap();
        assert_eq!(c.limits, Limits::DEFAULT);
        let mut args = REQUIRED.to_vec();
        args.extend(["--max-health-watches", "3", "--handshake-timeout", "2s"]);
        let c = settings(&args).resolve(Some("s".into())).unwrap();
        assert_eq!(c.limits.max_health_watches, 3);
        assert_eq!(c.limits.handshake_timeout, Duration::from_secs(2));
        for (flag, value, variable) in [
            (
                "--max-connections",
                "0",
                "CREDENTIAL_SERVICE_MAX_CONNECTIONS",
            ),
            (
                "--max-calls-in-flight",
                "0",
                "CREDENTIAL_SERVICE_MAX_CALLS_IN_FLIGHT",
            ),
            (
                "--max-open-calls-in-flight",
                "0",
                "CREDENTIAL_SERVICE_MAX_OPEN_CALLS_IN_FLIGHT",
            ),
            (
                "--handshake-timeout",
                "0s",
                "CREDENTIAL_SERVICE_HANDSHAKE_TIMEOUT",
            ),
        ] {
            let mut args = REQUIRED.to_vec();
            args.extend([flag, value]);
            let e = settings(&args)
                .resolve(Some("s".into()))
                .unwrap_err()
                .to_string();
            assert!(e.contains(flag) && e.contains(variable), "{e}");
        }
    }

    #[test]
    fn credentials_never_go_over_plain_http_except_to_loopback() {
        let mut args = REQUIRED.to_vec();
        args.extend(["--token-url", "http://api.example.com/token"]);
        let e = settings(&args)
            .resolve(Some("s".into()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("--token-url") && e.contains("https"), "{e}");
        let mut args = REQUIRED.to_vec();
        args.extend(["--token-url", "http://127.0.0.1:9/token"]);
        assert!(settings(&args).resolve(Some("s".into())).is_ok());
    }

    #[test]
    fn urls_are_printed_without_credentials() {
        let url = Url::parse("https://user:hunter2@api.example.com/token").unwrap();
        assert_eq!(printable(&url), "https://api.example.com/token");
        let mut args = REQUIRED.to_vec();
        args.extend(["--token-url", "http://user:hunter2@api.example.com/token"]);
        let e = settings(&args)
            .resolve(Some("s".into()))
            .unwrap_err()
            .to_string();
        assert!(!e.contains("hunter2"), "{e}");
    }
}
