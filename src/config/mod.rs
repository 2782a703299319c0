//! Settings: clap flags, each with an environment variable, resolved once into [`ServiceConfig`].
//!
//! EdgeTag's hosts come from the `--environment` preset (sandbox or production) and each URL can be
//! overridden, so tests and other OAuth 2.0 servers work too. Missing or unsafe settings stop the
//! process with one line naming both the flag and the variable.

mod flags;
mod http_limits;
mod limits;
mod otel;

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, ValueEnum};
use secrecy::SecretString;
use url::Url;

pub use self::{
    flags::flag,
    http_limits::{HttpLimitSettings, HttpLimits},
    limits::{LimitSettings, Limits},
    otel::{CallSampling, OtelConfig, OtelSettings, SamplerName},
};
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

    /// Full URL of the endpoint that names a grant's EdgeTag team, asked once an account is
    /// connected and then daily [default: {API host}/v1/user/me].
    #[arg(long, env = "EDGETAG_USER_INFO_URL")]
    pub user_info_url: Option<Url>,

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

    /// Refreshes asking EdgeTag's token endpoint at once (places). A request still unanswered
    /// after --upstream-stall-after gives its place to the next, so a slow EdgeTag cannot make
    /// every other account wait.
    #[arg(
        long,
        env = "CREDENTIAL_SERVICE_UPSTREAM_CONCURRENCY",
        default_value_t = 8
    )]
    pub upstream_concurrency: usize,

    /// When an unanswered refresh request stops holding its place (it runs on until
    /// --upstream-timeout).
    #[arg(long, env = "CREDENTIAL_SERVICE_UPSTREAM_STALL_AFTER", default_value = "500ms", value_parser = humantime::parse_duration)]
    pub upstream_stall_after: Duration,

    /// Most refresh requests out at once, stalled ones included.
    #[arg(
        long,
        env = "CREDENTIAL_SERVICE_UPSTREAM_MAX_IN_FLIGHT",
        default_value_t = 32
    )]
    pub upstream_max_in_flight: usize,

    /// How long a refresh a caller waits for may wait for a place; after it the caller gets its
    /// still-valid token or UNAVAILABLE.
    #[arg(long, env = "CREDENTIAL_SERVICE_UPSTREAM_QUEUE_TIMEOUT", default_value = "2s", value_parser = humantime::parse_duration)]
    pub upstream_queue_timeout: Duration,

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

    /// Write the audit trail to this file as JSON lines (created 0600, reopened on SIGHUP)
    /// instead of into the logs.
    #[arg(long, env = "CREDENTIAL_SERVICE_AUDIT_FILE", value_name = "PATH")]
    pub audit_file: Option<PathBuf>,

    /// While the audit file cannot be written, refuse every call that would be audited with
    /// UNAVAILABLE (without it, the lost events are counted and the service keeps serving).
    #[arg(
        long,
        env = "CREDENTIAL_SERVICE_AUDIT_REQUIRED",
        requires = "audit_file"
    )]
    pub audit_required: bool,

    #[command(flatten)]
    pub limits: LimitSettings,

    #[command(flatten)]
    pub http_limits: HttpLimitSettings,

    #[command(flatten)]
    pub otel: OtelSettings,
}

/// EdgeTag's revocation path, on its API host.
const REVOKE_PATH: &str = "/v1/oauth-app/client/revoke";
/// EdgeTag's "who am I" path (the grant's teams), on its API host.
const USER_INFO_PATH: &str = "/v1/user/me";

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
                return Err(ConfigError(format!(
                    "{} and {} are for a postgres:// store; the sled store has no server",
                    flag("store_password_file"),
                    flag("store_ca_file")
                )));
            }
            return Ok(StoreConfig::Sled);
        }
        if !(store.starts_with("postgres://") || store.starts_with("postgresql://")) {
            return Err(ConfigError(format!(
                "{} must be `sled` or a postgres:// URL",
                flag("store")
            )));
        }
        if keys.encryption_key_file.is_none() {
            return Err(ConfigError(format!(
                "a postgres:// store needs {}: every replica must seal with the same key",
                flag("encryption_key_file")
            )));
        }
        let ca = self
            .store_ca_file
            .as_ref()
            .map(|path| {
                std::fs::read(path).map_err(|e| {
                    ConfigError(format!(
                        "cannot read {} {}: {e}",
                        flag("store_ca_file"),
                        path.display()
                    ))
                })
            })
            .transpose()?;
        let pg = crate::store::PostgresConfig::parse(store, None, ca)
            .map_err(|e| ConfigError(format!("{}: {e}", flag("store"))))?;
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
    /// The bounds of each HTTP listener.
    pub http_limits: HttpLimits,
    /// How the audit trail aggregates.
    pub audit: crate::audit::AuditConfig,
    /// Where the audit trail is written, when not into the logs.
    pub audit_file: Option<crate::audit::FileConfig>,
    /// How often reloadable files are checked for new content.
    pub reload_interval: Duration,
    /// A span per sampled call, continuing the caller's trace: when OTLP export is on
    /// (`--otel-endpoint`); `None`, no call pays for trace context.
    pub traces: Option<CallSampling>,
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
        // EdgeTag answers `/v1/user/me` on the API host that serves its token endpoint.
        let user_info_url = on_origin_of(&token_url, USER_INFO_PATH);
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            data_dir,
            provider: ProviderConfig {
                authorize_url,
                token_url,
                revoke_url,
                user_info_url,
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
            http_limits: HttpLimits::DEFAULT,
            audit: crate::audit::AuditConfig::default(),
            audit_file: None,
            reload_interval: Duration::from_secs(10),
            traces: None,
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
            user_info_url,
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
            upstream_stall_after,
            upstream_max_in_flight,
            upstream_queue_timeout,
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
            http_limits,
            audit_interval,
            audit_max_keys,
            audit_file,
            audit_required,
            otel,
        } = self;
        let client_id = client_id
            .filter(|s| !s.trim().is_empty())
            .ok_or_else(|| ConfigError(format!("missing client id: set {}", flag("client_id"))))?;
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
                return Err(ConfigError(format!(
                    "missing client secret: set {} (or EDGETAG_CLIENT_SECRET)",
                    flag("client_secret_file")
                )));
            }
        };
        let redirect_uri = redirect_uri.ok_or_else(|| {
            ConfigError(format!(
                "missing redirect URI: set {}",
                flag("redirect_uri")
            ))
        })?;

        let (ui, api) = environment.hosts();
        let preset = |base: &str, path: &str| {
            Url::parse(&format!("{base}{path}")).expect("preset URLs are valid")
        };
        // EdgeTag serves the token and revoke endpoints from one API host. A token URL given without
        // a revoke URL (a stand-in EdgeTag, a proxy) takes the revoke path on its own origin, so that
        // RemoveAccount never sends these client credentials to the preset's host instead.
        let revoke_url = revoke_url.unwrap_or_else(|| match &token_url {
            Some(token) => on_origin_of(token, REVOKE_PATH),
            None => preset(api, REVOKE_PATH),
        });
        // The same rule: a grant's access token goes to no host but the one it came from.
        let user_info_url = user_info_url.unwrap_or_else(|| match &token_url {
            Some(token) => on_origin_of(token, USER_INFO_PATH),
            None => preset(api, USER_INFO_PATH),
        });
        let authorize_url = authorize_url.unwrap_or_else(|| preset(ui, "/oauth/app/login"));
        let token_url = token_url.unwrap_or_else(|| preset(api, "/v1/oauth-app/client/token"));
        require_https(&authorize_url, "authorize_url")?;
        require_https(&token_url, "token_url")?;
        require_https(&revoke_url, "revoke_url")?;
        require_https(&user_info_url, "user_info_url")?;

        for (value, id) in [
            (state_ttl, "state_ttl"),
            (upstream_timeout, "upstream_timeout"),
            (default_token_lifetime, "default_token_lifetime"),
        ] {
            if value.is_zero() {
                return Err(ConfigError(format!(
                    "{} must be longer than zero",
                    flag(id)
                )));
            }
        }
        if upstream_max_in_flight < upstream_concurrency {
            return Err(ConfigError(format!(
                "{} must be at least {}",
                flag("upstream_max_in_flight"),
                flag("upstream_concurrency")
            )));
        }
        for (value, id) in [
            (upstream_stall_after, "upstream_stall_after"),
            (upstream_queue_timeout, "upstream_queue_timeout"),
        ] {
            if value.is_zero() {
                return Err(ConfigError(format!(
                    "{} must be longer than zero",
                    flag(id)
                )));
            }
        }
        if upstream_concurrency == 0 {
            return Err(ConfigError(format!(
                "{} must be at least 1",
                flag("upstream_concurrency")
            )));
        }

        let callers = match &callers_file {
            Some(path) => Callers::load(path).map_err(|e| ConfigError(e.to_string()))?,
            None => {
                // An open service (every call allowed: --dev, tests) is for this machine only,
                // with its browser callback and metrics: the gRPC rule, for every listener.
                let listeners = [
                    (
                        Some(listen),
                        "listen",
                        "anyone who can reach it could take every token",
                    ),
                    (
                        callback_listen,
                        "callback_listen",
                        "an open service stays on this machine, its browser callback too",
                    ),
                    (
                        metrics_listen,
                        "metrics_listen",
                        "an open service stays on this machine, its metrics too",
                    ),
                ];
                for (addr, id, why) in listeners {
                    if let Some(addr) = addr.filter(|a| !a.ip().is_loopback()) {
                        return Err(ConfigError(format!(
                            "refusing to listen on {addr} without a callers file: {why} ({}). Set \
                             {}, or listen on loopback",
                            flag(id),
                            flag("callers_file")
                        )));
                    }
                }
                Callers::open()
            }
        };
        let tls = tls.resolve().map_err(ConfigError)?;
        if reload_interval.is_zero() {
            return Err(ConfigError(format!(
                "{} must be longer than zero",
                flag("reload_interval")
            )));
        }
        let limits = limits.resolve()?;
        let http_limits = http_limits.resolve()?;
        let store = store.resolve(&keys)?;
        if !callback_path.starts_with('/') || callback_path.contains(['?', '#']) {
            return Err(ConfigError(format!(
                "{} must be a path starting with /: {callback_path:?}",
                flag("callback_path")
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
        config.provider.user_info_url = user_info_url;
        config.listen = listen;
        config.provider.scope = scope;
        config.provider.request_timeout = upstream_timeout;
        config.provider.default_token_lifetime = default_token_lifetime;
        config.provider.send_redirect_uri = send_redirect_uri;
        config.broker.state_ttl = state_ttl;
        config.broker.refresh_margin = refresh_margin;
        config.broker.refresh.demand_interval = demand_refresh_interval;
        config.broker.upstream_concurrency = upstream_concurrency;
        config.broker.upstream_stall_after = upstream_stall_after;
        config.broker.upstream_max_in_flight = upstream_max_in_flight;
        config.broker.upstream_queue_timeout = upstream_queue_timeout;
        config.callers = callers;
        config.tls = tls;
        config.reload_interval = reload_interval;
        config.traces = otel.resolve()?.map(|otel| otel.calls);
        config.encryption = keys.encryption();
        config.store = store;
        config.callback = callback_listen.map(|listen| CallbackConfig {
            listen,
            path: callback_path,
        });
        config.metrics_listen = metrics_listen;
        config.limits = limits;
        config.http_limits = http_limits;
        config.audit = crate::audit::AuditConfig {
            interval: audit_interval,
            max_keys: audit_max_keys,
        };
        config.audit_file = audit_file.map(|path| crate::audit::FileConfig {
            path,
            required: audit_required,
        });
        Ok(config)
    }
}

/// `path` on the scheme, host and port of `url`.
fn on_origin_of(url: &Url, path: &str) -> Url {
    let mut on_origin = url.clone();
    on_origin.set_path(path);
    on_origin.set_query(None);
    on_origin.set_fragment(None);
    on_origin
}

/// Credentials travel to these URLs, so plain HTTP is allowed only to this machine.
fn require_https(url: &Url, id: &str) -> Result<(), ConfigError> {
    match url.scheme() {
        "https" => Ok(()),
        "http" if is_loopback(url) => Ok(()),
        _ => Err(ConfigError(format!(
            "{} must be an https:// URL (plain http only to loopback): {}",
            flag(id),
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
mod tests;
