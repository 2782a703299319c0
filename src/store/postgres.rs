//! The PostgreSQL backend: several replicas share one database, with no single point of failure.
//!
//! - Records are sealed by [`Codec`] exactly as on sled: the database sees account names,
//!   versions, back-off times and ciphertext, never a token or a verifier.
//! - One refresh per account fleet-wide: [`Store::claim_refresh`] takes the account's row lock
//!   (`SELECT … FOR UPDATE`, bounded by `lock_timeout` and `statement_timeout`), re-reads under it,
//!   and the claim's commit writes the next version fenced on the one read. Background claims use
//!   `SKIP LOCKED`, so schedulers never queue behind each other, and they honour the fleet's
//!   back-off kept in the row. A replica that dies holding a lock loses its session, and with it
//!   the lock; `idle_in_transaction_session_timeout` ends a session that hangs instead.
//! - Coherence: every account write sends `NOTIFY` with the version and the account (nothing
//!   secret) in its own transaction; each replica `LISTEN`s on a connection of its own and reloads
//!   what changed. After a lost listener connection it reconnects and asks for a full resync, and a
//!   periodic resync is the safety net.
//! - Bounded failure: every operation has a deadline, so with the database down writes and
//!   refreshes fail with [`StoreError::Unavailable`] instead of hanging, while GetToken goes on
//!   from memory. One log line and the `credential_store_up` gauge say so, and again when it
//!   answers.
//! - Migrations are embedded and applied at start under an advisory lock, so replicas starting
//!   together do not race; a schema newer than this binary knows is refused.
//!
//! Hand-written rather than with a migration crate: the two that fit tokio-postgres take no
//! advisory lock, which is the part that matters here, and the rest is a loop.

use std::{
    fmt,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime},
};

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod};
use futures::{StreamExt, TryStreamExt, stream::BoxStream};
use rustls_pki_types::pem::PemObject;
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::{broadcast, mpsc};
use tokio_postgres::{
    AsyncMessage, NoTls, Socket,
    error::SqlState,
    tls::{MakeTlsConnect, TlsConnect},
    types::ToSql,
};
use tokio_stream::wrappers::BroadcastStream;
use tokio_util::task::AbortOnDropHandle;

use super::{
    Backoff, Change, Claim, ClaimMode, Expected, RefreshClaim, Resealed, Store, StoreError,
    Version, Versioned,
    codec::{ACCOUNTS, Codec, PENDING, Resealing, state_key},
};
use crate::{
    account::AccountId,
    metrics,
    sealing::Keyring,
    tokens::{AccountRecord, PendingAuth},
};

/// The migrations, in order; the schema's version is how many have been applied.
const MIGRATIONS: &[&str] = &[
    include_str!("postgres/0001_init.sql"),
    include_str!("postgres/0002_outage_backoff.sql"),
];

/// The channel account writes notify on.
const CHANNEL: &str = "credential_service";

/// Advisory lock keys (arbitrary, fixed): migrations, and the purge of expired states.
const MIGRATION_LOCK: i64 = 0x6372_6564_0001;
const PURGE_LOCK: i64 = 0x6372_6564_0002;

/// Connections per replica: refreshes hold one for their upstream call (at most the upstream cap
/// in the background, plus callers' and operators'), the rest are short writes.
const POOL_SIZE: usize = 32;

/// How long any one statement, or the wait for a connection, may take; and one operation as a
/// whole, as seen from here (a database that stopped answering without closing the socket).
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(5);
const OPERATION_TIMEOUT: Duration = Duration::from_secs(10);

/// How long connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The listener checks its connection this often (so a silent network loss is noticed) and
/// retries a lost one after a pause that grows to the maximum.
const LISTENER_HEARTBEAT: Duration = Duration::from_secs(5);
const LISTENER_RETRY_MAX: Duration = Duration::from_secs(2);

/// The full resync that catches anything a notification missed.
const RESYNC_EVERY: Duration = Duration::from_secs(300);

/// How the connection to PostgreSQL is protected (the URL's `sslmode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// Plaintext: only for a database on the same host or a trusted network.
    Disable,
    /// Encrypted; the server's certificate is checked only with `--store-ca-file` (as libpq does).
    Require,
    /// Encrypted, with the certificate checked against `--store-ca-file` and the host name.
    VerifyFull,
}

/// Where the database is and how to reach it. `Debug` leaves the password out (the URL may not
/// carry one).
#[derive(Clone)]
pub struct PostgresConfig {
    url: String,
    pg: tokio_postgres::Config,
    tls: TlsMode,
    ca_pem: Option<Vec<u8>>,
    /// How long one refresh may hold an account's lock: the upstream timeout and retry budget,
    /// with room to spare. Other replicas' callers wait up to this long for its result.
    pub lock_hold: Duration,
}

impl fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresConfig")
            .field("url", &self.url)
            .field("tls", &self.tls)
            .field("ca", &self.ca_pem.is_some())
            .field("lock_hold", &self.lock_hold)
            .finish_non_exhaustive()
    }
}

impl PostgresConfig {
    /// Parses `postgres://USER@HOST:PORT/DB?sslmode=disable|require|verify-full`. The password
    /// comes from a file, never the URL (which shows in process lists and logs); the TLS mode
    /// must be said, since a silent plaintext default would put tokens' ciphertext and account
    /// names on the wire unprotected.
    pub fn parse(
        url: &str,
        password: Option<SecretString>,
        ca_pem: Option<Vec<u8>>,
    ) -> Result<Self, String> {
        let parsed =
            url::Url::parse(url).map_err(|e| format!("the store URL does not parse: {e}"))?;
        if parsed.password().is_some() {
            return Err(
                "the store URL carries a password; put it in --store-password-file instead".into(),
            );
        }
        let mut tls = None;
        let mut rest = url::form_urlencoded::Serializer::new(String::new());
        for (key, value) in parsed.query_pairs() {
            match &*key {
                "sslmode" => {
                    tls = Some(match &*value {
                        "disable" => TlsMode::Disable,
                        "require" => TlsMode::Require,
                        "verify-full" => TlsMode::VerifyFull,
                        other => {
                            return Err(format!(
                                "sslmode={other} is not supported; use verify-full (with --store-ca-file), require, or disable"
                            ));
                        }
                    });
                }
                "password" => {
                    return Err(
                        "the store URL carries a password; put it in --store-password-file instead"
                            .into(),
                    );
                }
                _ => {
                    rest.append_pair(&key, &value);
                }
            }
        }
        let Some(tls) = tls else {
            return Err(
                "the store URL must say sslmode=verify-full (with --store-ca-file), require, or disable".into(),
            );
        };
        if tls == TlsMode::VerifyFull && ca_pem.is_none() {
            return Err("sslmode=verify-full needs --store-ca-file".into());
        }
        let mut without_tls = parsed.clone();
        let rest = rest.finish();
        without_tls.set_query((!rest.is_empty()).then_some(&rest));
        let mut pg: tokio_postgres::Config = without_tls
            .as_str()
            .parse()
            .map_err(|e| format!("the store URL is not a PostgreSQL URL: {e}"))?;
        if pg.get_user().is_none() {
            return Err("the store URL names no user (postgres://USER@HOST:PORT/DB)".into());
        }
        if let Some(password) = password {
            pg.password(password.expose_secret());
        }
        Ok(Self {
            url: url.to_owned(),
            pg,
            tls,
            ca_pem,
            lock_hold: Duration::from_secs(20),
        })
    }

    /// The URL as given (it carries no password), for logs.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The connection settings every session gets: timeouts that bound every wait.
    fn session(&self) -> tokio_postgres::Config {
        let mut pg = self.pg.clone();
        let ms = |d: Duration| d.as_millis();
        pg.application_name("credential-service")
            .connect_timeout(CONNECT_TIMEOUT)
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(10))
            .tcp_user_timeout(OPERATION_TIMEOUT)
            .ssl_mode(match self.tls {
                TlsMode::Disable => tokio_postgres::config::SslMode::Disable,
                TlsMode::Require | TlsMode::VerifyFull => tokio_postgres::config::SslMode::Require,
            })
            .options(format!(
                "-c statement_timeout={} -c lock_timeout={} -c idle_in_transaction_session_timeout={}",
                ms(STATEMENT_TIMEOUT),
                ms(STATEMENT_TIMEOUT),
                ms(self.lock_hold + Duration::from_secs(10)),
            ));
        pg
    }

    fn connector(&self) -> Result<Connector, StoreError> {
        use tokio_rustls::rustls::{ClientConfig, RootCertStore};
        if self.tls == TlsMode::Disable {
            return Ok(Connector::Plain);
        }
        let builder = ClientConfig::builder();
        let config = match &self.ca_pem {
            Some(pem) => {
                let mut roots = RootCertStore::empty();
                for cert in rustls_pki_types::CertificateDer::pem_slice_iter(pem) {
                    let cert = cert.map_err(|e| {
                        StoreError::Postgres(format!("--store-ca-file does not parse: {e}"))
                    })?;
                    roots.add(cert).map_err(|e| {
                        StoreError::Postgres(format!("--store-ca-file is unusable: {e}"))
                    })?;
                }
                builder.with_root_certificates(roots).with_no_client_auth()
            }
            None => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(unverified::Encrypted::new()))
                .with_no_client_auth(),
        };
        Ok(Connector::Tls(
            tokio_postgres_rustls::MakeRustlsConnect::new(config),
        ))
    }
}

/// `sslmode=require` without a CA: encrypted against eavesdropping, but not authenticated, as
/// libpq does it. Signatures in the handshake are still checked.
mod unverified {
    use tokio_rustls::rustls::{
        DigitallySignedStruct, Error, SignatureScheme,
        client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        crypto::{
            CryptoProvider, WebPkiSupportedAlgorithms, verify_tls12_signature,
            verify_tls13_signature,
        },
        pki_types::{CertificateDer, ServerName, UnixTime},
    };

    #[derive(Debug)]
    pub(super) struct Encrypted(WebPkiSupportedAlgorithms);

    impl Encrypted {
        pub(super) fn new() -> Self {
            let provider = CryptoProvider::get_default()
                .cloned()
                .unwrap_or_else(|| tokio_rustls::rustls::crypto::ring::default_provider().into());
            Self(provider.signature_verification_algorithms)
        }
    }

    impl ServerCertVerifier for Encrypted {
        fn verify_server_cert(
            &self,
            _end_entity: &CertificateDer<'_>,
            _intermediates: &[CertificateDer<'_>],
            _server_name: &ServerName<'_>,
            _ocsp: &[u8],
            _now: UnixTime,
        ) -> Result<ServerCertVerified, Error> {
            Ok(ServerCertVerified::assertion())
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            verify_tls12_signature(message, cert, dss, &self.0)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            verify_tls13_signature(message, cert, dss, &self.0)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.supported_schemes()
        }
    }
}

/// Plaintext or rustls: one value, so the pool and the listener are built the same way.
#[derive(Clone)]
enum Connector {
    Plain,
    Tls(tokio_postgres_rustls::MakeRustlsConnect),
}

type Messages = BoxStream<'static, Result<AsyncMessage, tokio_postgres::Error>>;

impl Connector {
    fn pool(&self, pg: tokio_postgres::Config) -> Result<Pool, StoreError> {
        let config = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let manager = match self {
            Self::Plain => Manager::from_config(pg, NoTls, config),
            Self::Tls(tls) => Manager::from_config(pg, tls.clone(), config),
        };
        Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(STATEMENT_TIMEOUT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .recycle_timeout(Some(STATEMENT_TIMEOUT))
            .build()
            .map_err(|e| StoreError::Postgres(e.to_string()))
    }

    /// A connection of its own (for LISTEN), with its messages as a stream that drives it.
    async fn connect(
        &self,
        pg: &tokio_postgres::Config,
    ) -> Result<(tokio_postgres::Client, Messages), tokio_postgres::Error> {
        match self {
            Self::Plain => connect_with(pg, NoTls).await,
            Self::Tls(tls) => connect_with(pg, tls.clone()).await,
        }
    }
}

async fn connect_with<T>(
    pg: &tokio_postgres::Config,
    tls: T,
) -> Result<(tokio_postgres::Client, Messages), tokio_postgres::Error>
where
    T: MakeTlsConnect<Socket> + 'static,
    T::Stream: Send + 'static,
    T::TlsConnect: Send,
    <T::TlsConnect as TlsConnect<Socket>>::Future: Send,
{
    let (client, mut connection) = pg.connect(tls).await?;
    let messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx)).boxed();
    Ok((client, messages))
}

/// Whether the database answers: one log line and the gauge change on each transition, not one
/// per failed call.
#[derive(Debug)]
struct Reach {
    up: AtomicBool,
}

impl Reach {
    fn new() -> Self {
        metrics::set_store_up(true);
        Self {
            up: AtomicBool::new(true),
        }
    }

    fn answered(&self) {
        if !self.up.swap(true, Ordering::AcqRel) {
            metrics::set_store_up(true);
            tracing::info!("the database answers again");
        }
    }

    fn lost(&self, why: &str) {
        if self.up.swap(false, Ordering::AcqRel) {
            metrics::set_store_up(false);
            tracing::error!(
                error = why,
                "the database is unreachable: serving tokens from memory while they last; refreshes and writes fail until it answers"
            );
        }
    }
}

/// An error with its causes ("error performing TLS handshake: invalid peer certificate: …"):
/// the driver's own message alone rarely says what to fix.
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}

/// What every handle on the store shares.
struct Shared {
    pool: Pool,
    codec: Codec,
    reach: Reach,
    lock_hold: Duration,
}

impl Shared {
    /// Turns a driver error into a store error, noting a lost database.
    fn pg(&self, e: &tokio_postgres::Error) -> StoreError {
        let Some(db) = e.as_db_error() else {
            let why = with_causes(e);
            self.reach.lost(&why);
            return StoreError::Unavailable(why);
        };
        let code = db.code();
        if *code == SqlState::LOCK_NOT_AVAILABLE {
            return StoreError::Unavailable(
                "another replica held the account's refresh lock for too long".into(),
            );
        }
        if *code == SqlState::QUERY_CANCELED {
            return StoreError::Unavailable("a statement timed out".into());
        }
        let class = &code.code()[..2];
        if matches!(class, "08" | "53" | "57") {
            let why = format!("{} ({})", db.message(), code.code());
            self.reach.lost(&why);
            return StoreError::Unavailable(why);
        }
        StoreError::Postgres(format!("{} ({})", db.message(), code.code()))
    }

    fn pool_error(&self, e: PoolError) -> StoreError {
        match e {
            PoolError::Backend(e) => self.pg(&e),
            PoolError::Timeout(deadpool_postgres::TimeoutType::Wait) => {
                StoreError::Unavailable("every database connection of this replica is busy".into())
            }
            other => {
                let why = other.to_string();
                self.reach.lost(&why);
                StoreError::Unavailable(why)
            }
        }
    }

    async fn client(&self) -> Result<Object, StoreError> {
        self.pool.get().await.map_err(|e| self.pool_error(e))
    }

    /// Runs one operation within [`OPERATION_TIMEOUT`] (plus `extra`), noting whether the database
    /// answered.
    async fn bounded<T>(
        &self,
        extra: Duration,
        op: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(OPERATION_TIMEOUT + extra, op).await {
            Ok(result) => {
                if !matches!(&result, Err(e) if e.is_unavailable()) {
                    self.reach.answered();
                }
                result
            }
            Err(_) => {
                let why = format!("no answer within {:?}", OPERATION_TIMEOUT + extra);
                self.reach.lost(&why);
                Err(StoreError::Unavailable(why))
            }
        }
    }

    fn open_row(&self, account: &AccountId, sealed: &[u8]) -> Result<Versioned, StoreError> {
        Ok(self
            .codec
            .open_account(account.as_str().as_bytes(), sealed)?
            .1)
    }
}

/// The PostgreSQL store (see the module docs).
#[derive(Clone)]
pub struct PostgresStore {
    shared: Arc<Shared>,
    changes: broadcast::Sender<Change>,
    /// Changes since the store opened, for the first subscriber (the broker), so that none that
    /// arrives between loading the accounts and following the changes is lost.
    first: Arc<Mutex<Option<broadcast::Receiver<Change>>>>,
    _listener: Arc<AbortOnDropHandle<()>>,
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStore").finish_non_exhaustive()
    }
}

impl PostgresStore {
    /// Connects, applies the migrations this binary carries (refusing a newer schema) and starts
    /// following other replicas' writes.
    pub async fn open(config: &PostgresConfig, keys: Keyring) -> Result<Self, StoreError> {
        let connector = config.connector()?;
        let session = config.session();
        let pool = connector.pool(session.clone())?;
        let shared = Arc::new(Shared {
            pool,
            codec: Codec::new(keys),
            reach: Reach::new(),
            lock_hold: config.lock_hold,
        });
        shared
            .bounded(Duration::from_secs(60), async {
                let client = shared.client().await?;
                let migrated = migrate(&client).await;
                // The session held the advisory lock: end it rather than hand it back.
                drop(Object::take(client));
                migrated.map_err(|e| match e {
                    Migration::Pg(e) => shared.pg(&e),
                    Migration::Store(e) => e,
                })
            })
            .await?;
        let (changes, first) = broadcast::channel(4096);
        let (ready, listening) = tokio::sync::oneshot::channel();
        let listener = tokio::spawn(listen(
            connector,
            session,
            shared.clone(),
            changes.clone(),
            ready,
        ));
        // Return only once LISTEN is in place, so that what the caller loads next and the changes
        // after it leave no gap between them (a failed first try resyncs in full on reconnect).
        let _ = tokio::time::timeout(OPERATION_TIMEOUT, listening).await;
        Ok(Self {
            shared,
            changes,
            first: Arc::new(Mutex::new(Some(first))),
            _listener: Arc::new(AbortOnDropHandle::new(listener)),
        })
    }

    async fn query(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, StoreError> {
        let shared = &self.shared;
        shared
            .bounded(Duration::ZERO, async {
                let client = shared.client().await?;
                let statement = client
                    .prepare_cached(sql)
                    .await
                    .map_err(|e| shared.pg(&e))?;
                client
                    .query(&statement, params)
                    .await
                    .map_err(|e| shared.pg(&e))
            })
            .await
    }
}

enum Migration {
    Pg(tokio_postgres::Error),
    Store(StoreError),
}

impl From<tokio_postgres::Error> for Migration {
    fn from(e: tokio_postgres::Error) -> Self {
        Self::Pg(e)
    }
}

/// Applies the missing migrations, each in its own transaction, under an advisory lock.
async fn migrate(client: &tokio_postgres::Client) -> Result<(), Migration> {
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS credential_service_schema (
                 only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
                 version  bigint NOT NULL
             )",
        )
        .await?;
    let found: i64 = client
        .query_opt("SELECT version FROM credential_service_schema", &[])
        .await?
        .map_or(0, |row| row.get(0));
    let known = i64::try_from(MIGRATIONS.len()).expect("a few migrations");
    if found > known {
        return Err(Migration::Store(StoreError::SchemaTooNew { found, known }));
    }
    for (applied, sql) in (1..)
        .zip(MIGRATIONS)
        .skip(usize::try_from(found).unwrap_or(0))
    {
        let applied: i64 = applied;
        client.batch_execute("BEGIN").await?;
        client.batch_execute(sql).await?;
        client
            .execute(
                "INSERT INTO credential_service_schema (only_row, version) VALUES (true, $1)
                 ON CONFLICT (only_row) DO UPDATE SET version = EXCLUDED.version",
                &[&applied],
            )
            .await?;
        client.batch_execute("COMMIT").await?;
        tracing::info!(version = applied, "database schema migrated");
    }
    Ok(())
}

/// Follows other replicas' writes: LISTEN on a connection of its own, forwarding each
/// notification; a full resync after every reconnect and every [`RESYNC_EVERY`].
async fn listen(
    connector: Connector,
    session: tokio_postgres::Config,
    shared: Arc<Shared>,
    changes: broadcast::Sender<Change>,
    ready: tokio::sync::oneshot::Sender<()>,
) {
    let mut first = true;
    let mut ready = Some(ready);
    let mut pause = Duration::from_millis(100);
    loop {
        match listen_once(&connector, &session, &shared, &changes, first, &mut ready).await {
            Ok(()) => return, // nobody follows any more
            Err(why) => {
                shared.reach.lost(&why);
                tracing::debug!(error = why, "the change listener lost its connection");
            }
        }
        first = false;
        ready = None; // the reconnect resyncs in full: nothing to wait for
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(LISTENER_RETRY_MAX);
    }
}

async fn listen_once(
    connector: &Connector,
    session: &tokio_postgres::Config,
    shared: &Shared,
    changes: &broadcast::Sender<Change>,
    first: bool,
    ready: &mut Option<tokio::sync::oneshot::Sender<()>>,
) -> Result<(), String> {
    let (client, mut messages) = connector
        .connect(session)
        .await
        .map_err(|e| with_causes(&e))?;
    let (tx, mut notifications) = mpsc::unbounded_channel();
    let _pump = AbortOnDropHandle::new(tokio::spawn(async move {
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(n)) => {
                    if tx.send(n.payload().to_owned()).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "the change listener's connection failed");
                    return;
                }
            }
        }
    }));
    tokio::time::timeout(
        OPERATION_TIMEOUT,
        client.batch_execute(&format!("LISTEN {CHANNEL}")),
    )
    .await
    .map_err(|_| "LISTEN timed out".to_owned())?
    .map_err(|e| e.to_string())?;
    shared.reach.answered();
    if let Some(ready) = ready.take() {
        let _ = ready.send(());
    }
    // Whatever happened while no one listened is unknown: reload everything.
    if !first && changes.send(Change::Resync).is_err() {
        return Ok(());
    }
    let mut heartbeat = tokio::time::interval(LISTENER_HEARTBEAT);
    let mut resync = tokio::time::interval(RESYNC_EVERY);
    resync.reset();
    loop {
        let change = tokio::select! {
            payload = notifications.recv() => match payload {
                Some(payload) => match parse_notification(&payload) {
                    Some(change) => change,
                    None => {
                        tracing::warn!(payload, "ignoring a notification this version does not understand");
                        continue;
                    }
                },
                None => return Err("the change listener's connection closed".into()),
            },
            _ = heartbeat.tick() => {
                tokio::time::timeout(STATEMENT_TIMEOUT, client.simple_query(""))
                    .await
                    .map_err(|_| "the change listener's connection stopped answering".to_owned())?
                    .map_err(|e| e.to_string())?;
                shared.reach.answered();
                continue;
            }
            _ = resync.tick() => Change::Resync,
        };
        if changes.send(change).is_err() {
            return Ok(());
        }
    }
}

/// `"<version> <account>"`; version 0 means removed.
fn notification(version: Option<Version>, account: &AccountId) -> String {
    format!("{} {account}", version.unwrap_or(0))
}

/// [`Change::Recovered`]'s payload: no space, so a binary that predates it ignores it (with a
/// warning) rather than misreading it.
const RECOVERED: &str = "recovered";

fn parse_notification(payload: &str) -> Option<Change> {
    if payload == RECOVERED {
        return Some(Change::Recovered);
    }
    let (version, account) = payload.split_once(' ')?;
    let version: Version = version.parse().ok()?;
    Some(Change::Account {
        account: AccountId::parse(account).ok()?,
        version: (version > 0).then_some(version),
    })
}

fn to_db(version: Version) -> i64 {
    i64::try_from(version).expect("versions stay far below 2^63")
}

fn from_db(version: i64) -> Version {
    Version::try_from(version).unwrap_or(0)
}

const PUT_NEW: &str = "
    WITH written AS (
        INSERT INTO accounts (account, version, sealed) VALUES ($1, 1, $2)
        ON CONFLICT (account) DO NOTHING
        RETURNING account, version
    )
    SELECT pg_notify($3, version || ' ' || account) FROM written";

const PUT_NEXT: &str = "
    WITH written AS (
        UPDATE accounts
        SET version = $3, sealed = $2, failures = 0, retry_at = NULL, outage = false, hold_until = NULL
        WHERE account = $1 AND version = $4
        RETURNING account, version
    )
    SELECT pg_notify($5, version || ' ' || account) FROM written";

/// Ends outage back-offs (a `Retry-After` still holds) and notifies [`RECOVERED`] in the same
/// statement, so other replicas hear of it once it is committed, and always then. PostgreSQL
/// delivers identical notifications of one transaction once.
const END_OUTAGE_BACKOFFS: &str = "
    WITH ended AS (
        UPDATE accounts SET retry_at = hold_until, outage = false WHERE outage
        RETURNING pg_notify($1, $2)
    )
    SELECT count(*) FROM ended";

#[async_trait]
impl Store for PostgresStore {
    async fn put_pending(&self, state: &str, pending: &PendingAuth) -> Result<(), StoreError> {
        let key = state_key(state);
        let sealed = self.shared.codec.seal_pending(&key, pending);
        self.query(
            "INSERT INTO pending (state_hash, sealed, expires_at) VALUES ($1, $2, $3)
             ON CONFLICT (state_hash) DO UPDATE SET sealed = EXCLUDED.sealed, expires_at = EXCLUDED.expires_at",
            &[&&key[..], &sealed, &pending.expires_at],
        )
        .await?;
        Ok(())
    }

    async fn take_pending(&self, state: &str) -> Result<Option<PendingAuth>, StoreError> {
        let key = state_key(state);
        let rows = self
            .query(
                "DELETE FROM pending WHERE state_hash = $1 RETURNING sealed",
                &[&&key[..]],
            )
            .await?;
        rows.first()
            .map(|row| self.shared.codec.open_pending(&key, row.get(0)))
            .transpose()
    }

    async fn purge_expired_pending(&self, now: SystemTime) -> Result<usize, StoreError> {
        let shared = &self.shared;
        shared
            .bounded(Duration::ZERO, async {
                let client = shared.client().await?;
                let pg = |e: tokio_postgres::Error| shared.pg(&e);
                client.batch_execute("BEGIN").await.map_err(pg)?;
                let purged = async {
                    // One replica purges at a time; the others have nothing to do.
                    let row = client
                        .query_one("SELECT pg_try_advisory_xact_lock($1)", &[&PURGE_LOCK])
                        .await?;
                    if !row.get::<_, bool>(0) {
                        return Ok(0);
                    }
                    client
                        .execute("DELETE FROM pending WHERE expires_at < $1", &[&now])
                        .await
                }
                .await;
                let purged = match purged {
                    Ok(n) => n,
                    Err(e) => {
                        drop(Object::take(client));
                        return Err(pg(e));
                    }
                };
                client.batch_execute("COMMIT").await.map_err(pg)?;
                Ok(usize::try_from(purged).unwrap_or(usize::MAX))
            })
            .await
    }

    async fn load_accounts(&self) -> Result<Vec<(AccountId, Versioned)>, StoreError> {
        let shared = &self.shared;
        // 100,000 accounts stream in one query well within the operation bound.
        shared
            .bounded(Duration::from_secs(50), async {
                let client = shared.client().await?;
                let pg = |e: tokio_postgres::Error| shared.pg(&e);
                let rows = client
                    .query_raw(
                        "SELECT account, sealed FROM accounts",
                        std::iter::empty::<i32>(),
                    )
                    .await
                    .map_err(pg)?;
                let mut rows = std::pin::pin!(rows);
                let mut loaded = Vec::new();
                while let Some(row) = rows.try_next().await.map_err(pg)? {
                    let name: &str = row.get(0);
                    let sealed: &[u8] = row.get(1);
                    loaded.push(shared.codec.open_account(name.as_bytes(), sealed)?);
                }
                Ok(loaded)
            })
            .await
    }

    async fn load_account(&self, account: &AccountId) -> Result<Option<Versioned>, StoreError> {
        let rows = self
            .query(
                "SELECT sealed FROM accounts WHERE account = $1",
                &[&account.as_str()],
            )
            .await?;
        rows.first()
            .map(|row| self.shared.open_row(account, row.get(0)))
            .transpose()
    }

    async fn put_account(
        &self,
        account: &AccountId,
        record: &AccountRecord,
        expected: Expected,
    ) -> Result<Version, StoreError> {
        let (version, rows) = match expected {
            Expected::Absent => {
                let sealed = self.shared.codec.seal_account(account, record, 1);
                let rows = self
                    .query(PUT_NEW, &[&account.as_str(), &sealed, &CHANNEL])
                    .await?;
                (1, rows)
            }
            Expected::Version(old) => {
                let version = old + 1;
                let sealed = self.shared.codec.seal_account(account, record, version);
                let rows = self
                    .query(
                        PUT_NEXT,
                        &[
                            &account.as_str(),
                            &sealed,
                            &to_db(version),
                            &to_db(old),
                            &CHANNEL,
                        ],
                    )
                    .await?;
                (version, rows)
            }
        };
        if rows.is_empty() {
            return Err(StoreError::Conflict(account.clone()));
        }
        Ok(version)
    }

    async fn delete_account(
        &self,
        account: &AccountId,
        expected: Version,
    ) -> Result<(), StoreError> {
        let removed = notification(None, account);
        let rows = self
            .query(
                "WITH removed AS (
                     DELETE FROM accounts WHERE account = $1 AND version = $2 RETURNING account
                 )
                 SELECT pg_notify($3, $4) FROM removed",
                &[&account.as_str(), &to_db(expected), &CHANNEL, &removed],
            )
            .await?;
        if !rows.is_empty() {
            return Ok(());
        }
        // Nothing deleted: fine if it was already gone, a conflict if it is at another version.
        let still = self
            .query(
                "SELECT 1 FROM accounts WHERE account = $1",
                &[&account.as_str()],
            )
            .await?;
        if still.is_empty() {
            Ok(())
        } else {
            Err(StoreError::Conflict(account.clone()))
        }
    }

    async fn claim_refresh(
        &self,
        account: &AccountId,
        seen: Version,
        mode: ClaimMode,
    ) -> Result<Claim, StoreError> {
        let shared = &self.shared;
        let hold_ms = shared.lock_hold.as_millis();
        let (lock, extra) = match mode {
            ClaimMode::Wait => ("FOR UPDATE", shared.lock_hold),
            ClaimMode::Skip { .. } => ("FOR UPDATE SKIP LOCKED", Duration::ZERO),
        };
        let select = format!(
            "SELECT version, sealed, failures, retry_at, outage, hold_until FROM accounts WHERE account = $1 {lock}"
        );
        let mut holder = ClaimHolder(None);
        let claimed = shared
            .bounded(extra, async {
                let client = holder.0.insert(shared.client().await?);
                let pg = |e: tokio_postgres::Error| shared.pg(&e);
                client
                    .batch_execute(&format!(
                        "BEGIN; SET LOCAL lock_timeout = {hold_ms}; SET LOCAL statement_timeout = {}",
                        hold_ms + 1000
                    ))
                    .await
                    .map_err(pg)?;
                let statement = client.prepare_cached(&select).await.map_err(pg)?;
                let row = client
                    .query_opt(&statement, &[&account.as_str()])
                    .await
                    .map_err(pg)?;
                let Some(row) = row else {
                    if matches!(mode, ClaimMode::Skip { .. }) {
                        let exists = client
                            .query_opt(
                                "SELECT 1 FROM accounts WHERE account = $1",
                                &[&account.as_str()],
                            )
                            .await
                            .map_err(pg)?;
                        if exists.is_some() {
                            return Ok(Claim::Busy);
                        }
                    }
                    return Ok(Claim::Gone);
                };
                let version = from_db(row.get(0));
                if version != seen {
                    return Ok(Claim::Superseded(shared.open_row(account, row.get(1))?));
                }
                if let ClaimMode::Skip { now } = mode {
                    let failures: i32 = row.get(2);
                    let retry_at: Option<SystemTime> = row.get(3);
                    if let Some(retry_at) = retry_at.filter(|at| *at > now) {
                        return Ok(Claim::BackingOff(Backoff {
                            failures: u32::try_from(failures).unwrap_or(0),
                            retry_at,
                            outage: row.get(4),
                            hold_until: row.get(5),
                        }));
                    }
                }
                Ok(Claim::Granted(Box::new(PgClaim {
                    client: holder.0.take(),
                    shared: self.shared.clone(),
                    account: account.clone(),
                    version,
                })))
            })
            .await;
        // `holder` still has the connection unless the claim was granted: its drop rolls back.
        drop(holder);
        claimed
    }

    async fn end_outage_backoffs(&self) -> Result<u64, StoreError> {
        let rows = self
            .query(END_OUTAGE_BACKOFFS, &[&CHANNEL, &RECOVERED])
            .await?;
        let ended: i64 = rows.first().map_or(0, |row| row.get(0));
        Ok(u64::try_from(ended).unwrap_or(0))
    }

    fn changes(&self) -> BoxStream<'static, Change> {
        let receiver = self
            .first
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .unwrap_or_else(|| self.changes.subscribe());
        BroadcastStream::new(receiver)
            .map(|c| c.unwrap_or(Change::Resync)) // lagged: changes were missed
            .boxed()
    }

    async fn reseal_all(&self) -> Result<Resealed, StoreError> {
        let mut done = Resealed::default();
        let accounts = self
            .query("SELECT account, sealed FROM accounts", &[])
            .await?;
        for row in accounts {
            let (name, sealed): (&str, &[u8]) = (row.get(0), row.get(1));
            match self
                .shared
                .codec
                .reseal(ACCOUNTS, name.as_bytes(), sealed)?
            {
                Resealing::Current => done.current += 1,
                Resealing::Resealed(new) => {
                    let changed = self
                        .query(
                            "UPDATE accounts SET sealed = $3 WHERE account = $1 AND sealed = $2 RETURNING 1",
                            &[&name, &sealed, &new],
                        )
                        .await?;
                    done.resealed += changed.len();
                }
            }
        }
        let pending = self
            .query("SELECT state_hash, sealed FROM pending", &[])
            .await?;
        for row in pending {
            let (key, sealed): (&[u8], &[u8]) = (row.get(0), row.get(1));
            match self.shared.codec.reseal(PENDING, key, sealed)? {
                Resealing::Current => done.current += 1,
                Resealing::Resealed(new) => {
                    let changed = self
                        .query(
                            "UPDATE pending SET sealed = $3 WHERE state_hash = $1 AND sealed = $2 RETURNING 1",
                            &[&key, &sealed, &new],
                        )
                        .await?;
                    done.resealed += changed.len();
                }
            }
        }
        Ok(done)
    }
}

/// A connection inside an open transaction; dropped with it still inside, it rolls back (or,
/// failing that, closes the session, which releases every lock it held).
struct ClaimHolder(Option<Object>);

impl Drop for ClaimHolder {
    fn drop(&mut self) {
        if let Some(client) = self.0.take() {
            release(client);
        }
    }
}

fn release(client: Object) {
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => {
            runtime.spawn(async move {
                let rolled_back =
                    tokio::time::timeout(STATEMENT_TIMEOUT, client.batch_execute("ROLLBACK")).await;
                if !matches!(rolled_back, Ok(Ok(()))) {
                    drop(Object::take(client));
                }
            });
        }
        Err(_) => drop(Object::take(client)),
    }
}

/// The row lock on one account, held in an open transaction until commit, failure or drop.
struct PgClaim {
    client: Option<Object>,
    shared: Arc<Shared>,
    account: AccountId,
    version: Version,
}

impl Drop for PgClaim {
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            release(client);
        }
    }
}

impl PgClaim {
    /// Runs `statement` and COMMIT in the claim's transaction; the connection goes back to the
    /// pool only after a clean commit.
    async fn finish(
        &mut self,
        statement: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<usize, StoreError> {
        let shared = self.shared.clone();
        let client = self.client.as_ref().expect("a claim finishes once");
        let done = shared
            .bounded(Duration::ZERO, async {
                let pg = |e: tokio_postgres::Error| shared.pg(&e);
                let statement = client.prepare_cached(statement).await.map_err(pg)?;
                let rows = client.query(&statement, params).await.map_err(pg)?;
                client.batch_execute("COMMIT").await.map_err(pg)?;
                Ok(rows.len())
            })
            .await?;
        drop(self.client.take()); // committed: clean, back to the pool
        Ok(done)
    }
}

#[async_trait]
impl RefreshClaim for PgClaim {
    fn version(&self) -> Version {
        self.version
    }

    async fn commit(mut self: Box<Self>, record: &AccountRecord) -> Result<Version, StoreError> {
        let version = self.version + 1;
        let sealed = self
            .shared
            .codec
            .seal_account(&self.account, record, version);
        let account = self.account.clone();
        let written = self
            .finish(
                PUT_NEXT,
                &[
                    &account.as_str(),
                    &sealed,
                    &to_db(version),
                    &to_db(self.version),
                    &CHANNEL,
                ],
            )
            .await?;
        if written == 0 {
            return Err(StoreError::Conflict(account));
        }
        Ok(version)
    }

    async fn fail(mut self: Box<Self>, backoff: Backoff) -> Result<(), StoreError> {
        let account = self.account.clone();
        let failures = i32::try_from(backoff.failures).unwrap_or(i32::MAX);
        self.finish(
            "UPDATE accounts SET failures = $2, retry_at = $3, outage = $5, hold_until = $6
             WHERE account = $1 AND version = $4",
            &[
                &account.as_str(),
                &failures,
                &backoff.retry_at,
                &to_db(self.version),
                &backoff.outage,
                &backoff.hold_until,
            ],
        )
        .await
        .map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_say_their_tls_and_carry_no_password() {
        let ok = PostgresConfig::parse(
            "postgres://svc@db.internal:5432/creds?sslmode=disable&connect_timeout=3",
            Some("pw".into()),
            None,
        )
        .unwrap();
        assert_eq!(ok.tls, TlsMode::Disable);
        assert_eq!(ok.pg.get_dbname(), Some("creds"));
        assert_eq!(ok.pg.get_password(), Some(&b"pw"[..]));
        assert!(!format!("{ok:?}").contains("pw\""), "{ok:?}");

        for (url, says) in [
            ("postgres://svc@db/creds", "must say sslmode"),
            (
                "postgres://svc:pw@db/creds?sslmode=disable",
                "--store-password-file",
            ),
            (
                "postgres://svc@db/creds?sslmode=disable&password=pw",
                "--store-password-file",
            ),
            ("postgres://svc@db/creds?sslmode=prefer", "not supported"),
            (
                "postgres://svc@db/creds?sslmode=verify-full",
                "needs --store-ca-file",
            ),
            ("postgres://db/creds?sslmode=disable", "names no user"),
        ] {
            let e = PostgresConfig::parse(url, None, None).unwrap_err();
            assert!(e.contains(says), "{url}: {e}");
            assert!(!e.contains("pw"), "{url}: {e}");
        }
    }

    #[test]
    fn notifications_round_trip_and_odd_ones_are_ignored() {
        let acme = AccountId::parse("acme").unwrap();
        assert_eq!(
            parse_notification(&notification(Some(7), &acme)),
            Some(Change::Account {
                account: acme.clone(),
                version: Some(7)
            })
        );
        assert_eq!(
            parse_notification(&notification(None, &acme)),
            Some(Change::Account {
                account: acme,
                version: None
            })
        );
        assert_eq!(parse_notification("seven acme"), None);
        assert_eq!(parse_notification("7"), None);
    }
}

#[cfg(test)]
mod contract_on_postgres {
    use async_trait::async_trait;

    use super::*;
    use crate::store::contract::{Backend, contract_tests, record};

    struct Pg(PostgresConfig);

    #[async_trait]
    impl Backend for Pg {
        async fn open(&self, keys: Keyring) -> Arc<dyn Store> {
            Arc::new(PostgresStore::open(&self.0, keys).await.unwrap())
        }
    }

    /// A fresh database on this test binary's private cluster.
    fn fresh() -> Pg {
        let cluster = pg_cluster::Cluster::shared();
        let db = cluster.create_database();
        Pg(PostgresConfig::parse(
            &format!("{}?sslmode=disable", db.url()),
            Some(cluster.password().into()),
            None,
        )
        .unwrap())
    }

    contract_tests!(fresh());

    fn acme() -> AccountId {
        AccountId::parse("acme").unwrap()
    }

    /// Two replicas: the same database, the same key, two stores.
    async fn replicas(n: usize) -> Vec<Arc<dyn Store>> {
        let db = fresh();
        let keys = Keyring::ephemeral();
        let opened = futures::future::join_all((0..n).map(|_| db.open(keys.clone()))).await;
        assert_eq!(opened.len(), n);
        opened
    }

    /// A CA and a server certificate for 127.0.0.1 signed by it (PEM), plus the CA.
    fn pki() -> (String, String, String) {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
        let key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .unwrap()
            .signed_by(&key, &Issuer::from_params(&ca, &ca_key))
            .unwrap();
        (leaf.pem(), key.serialize_pem(), ca_pem)
    }

    #[tokio::test]
    async fn tls_to_postgresql_verifies_the_server_against_the_ca_file() {
        let (cert, key, ca) = pki();
        let cluster = pg_cluster::Cluster::start_with_tls(&cert, &key);
        let db = cluster.create_database();
        let config = |mode: &str, ca: Option<&str>| {
            PostgresConfig::parse(
                &format!("{}?sslmode={mode}", db.url()),
                Some(cluster.password().into()),
                ca.map(|c| c.as_bytes().to_vec()),
            )
            .unwrap()
        };
        let encrypted = async |store: &PostgresStore| -> bool {
            let client = store.shared.client().await.unwrap();
            client
                .query_one(
                    "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                    &[],
                )
                .await
                .unwrap()
                .get(0)
        };

        // verify-full with the right CA: the session is encrypted and the store works.
        let store = PostgresStore::open(&config("verify-full", Some(&ca)), Keyring::ephemeral())
            .await
            .unwrap();
        assert!(encrypted(&store).await);
        store
            .put_account(&acme(), &record("at", Some("rt")), Expected::Absent)
            .await
            .unwrap();
        assert!(store.load_account(&acme()).await.unwrap().is_some());
        // require without a CA: encrypted, not authenticated (as libpq does it).
        let store = PostgresStore::open(&config("require", None), Keyring::ephemeral())
            .await
            .unwrap();
        assert!(encrypted(&store).await);

        // A server whose certificate another CA signed is refused, and the message says why.
        let (_, _, other_ca) = pki();
        let refused = PostgresStore::open(
            &config("verify-full", Some(&other_ca)),
            Keyring::ephemeral(),
        )
        .await
        .unwrap_err();
        assert!(refused.is_unavailable(), "{refused:?}");
        assert!(refused.to_string().contains("certificate"), "{refused}");
    }

    #[tokio::test]
    async fn replicas_starting_together_migrate_once_and_a_newer_schema_is_refused() {
        let db = fresh();
        let keys = Keyring::ephemeral();
        // Eight at once: without the advisory lock, CREATE TABLE races and some fail.
        let stores =
            futures::future::join_all((0..8).map(|_| PostgresStore::open(&db.0, keys.clone())))
                .await;
        for store in &stores {
            assert!(store.is_ok(), "{store:?}");
        }
        let client = stores[0].as_ref().unwrap().shared.client().await.unwrap();
        let version: i64 = client
            .query_one("SELECT version FROM credential_service_schema", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(version, i64::try_from(MIGRATIONS.len()).unwrap());
        client
            .execute(
                "UPDATE credential_service_schema SET version = version + 1",
                &[],
            )
            .await
            .unwrap();
        drop(client);
        match PostgresStore::open(&db.0, keys).await {
            Err(StoreError::SchemaTooNew { found, known }) => assert_eq!(found, known + 1),
            other => panic!("a newer schema must be refused: {other:?}"),
        }
    }

    /// A database that schema 1 wrote, with an account backing off, migrates to the current
    /// schema at the next start and keeps the account, its version and its back-off.
    #[tokio::test]
    async fn a_schema_1_database_with_data_migrates_and_keeps_it() {
        let db = fresh();
        let keys = Keyring::ephemeral();
        let store = PostgresStore::open(&db.0, keys.clone()).await.unwrap();
        let v1 = store
            .put_account(&acme(), &record("at-1", Some("rt-1")), Expected::Absent)
            .await
            .unwrap();
        // Back to what schema 1 had (dropping `outage` drops its index), the account backing off.
        let client = store.shared.client().await.unwrap();
        client
            .batch_execute(
                "ALTER TABLE accounts DROP COLUMN outage, DROP COLUMN hold_until;
                 UPDATE credential_service_schema SET version = 1;
                 UPDATE accounts SET failures = 2, retry_at = now() + interval '600 seconds';",
            )
            .await
            .unwrap();
        drop((client, store));
        let retry_at = SystemTime::now() + Duration::from_secs(600);

        let store = PostgresStore::open(&db.0, keys).await.unwrap();
        let stored = store.load_account(&acme()).await.unwrap().expect("kept");
        assert_eq!(stored.version, v1);
        assert_eq!(stored.record.tokens.access_token.expose_secret(), "at-1");
        let now = SystemTime::now();
        match store
            .claim_refresh(&acme(), v1, ClaimMode::Skip { now })
            .await
            .unwrap()
        {
            Claim::BackingOff(b) => {
                assert_eq!(b.failures, 2);
                assert!(b.retry_at > now && b.retry_at <= retry_at + Duration::from_secs(5));
                assert!(
                    !b.outage,
                    "schema 1 did not say why: not ended by EdgeTag's return"
                );
                assert_eq!(b.hold_until, None);
            }
            other => panic!("the back-off is kept: {other:?}"),
        }
        assert_eq!(store.end_outage_backoffs().await.unwrap(), 0);
    }

    #[tokio::test]
    async fn a_claim_waits_for_another_replicas_refresh_and_takes_its_result() {
        let r = replicas(2).await;
        let v1 = r[0]
            .put_account(&acme(), &record("at-1", Some("rt-1")), Expected::Absent)
            .await
            .unwrap();
        let Claim::Granted(first) = r[0]
            .claim_refresh(&acme(), v1, ClaimMode::Wait)
            .await
            .unwrap()
        else {
            panic!("claimable");
        };
        // The scheduler elsewhere does not queue behind it.
        let now = SystemTime::now();
        assert!(matches!(
            r[1].claim_refresh(&acme(), v1, ClaimMode::Skip { now })
                .await
                .unwrap(),
            Claim::Busy
        ));
        // A caller elsewhere waits for it, then takes the new record instead of refreshing.
        let waiting = {
            let other = r[1].clone();
            tokio::spawn(async move { other.claim_refresh(&acme(), v1, ClaimMode::Wait).await })
        };
        let v2 = first.commit(&record("at-2", Some("rt-2"))).await.unwrap();
        match waiting.await.unwrap().unwrap() {
            Claim::Superseded(newer) => {
                assert_eq!(newer.version, v2);
                assert_eq!(newer.record.tokens.access_token.expose_secret(), "at-2");
            }
            other => panic!("expected Superseded, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_failed_refresh_backs_the_whole_fleet_off_but_not_callers() {
        let r = replicas(2).await;
        let v1 = r[0]
            .put_account(&acme(), &record("at-1", Some("rt-1")), Expected::Absent)
            .await
            .unwrap();
        let Claim::Granted(claim) = r[0]
            .claim_refresh(&acme(), v1, ClaimMode::Wait)
            .await
            .unwrap()
        else {
            panic!("claimable");
        };
        let now = SystemTime::now();
        let retry_at = now + Duration::from_secs(60);
        claim
            .fail(Backoff {
                failures: 3,
                retry_at,
                outage: false,
                hold_until: None,
            })
            .await
            .unwrap();
        match r[1]
            .claim_refresh(&acme(), v1, ClaimMode::Skip { now })
            .await
            .unwrap()
        {
            Claim::BackingOff(b) => {
                assert_eq!(b.failures, 3);
                let off = b
                    .retry_at
                    .duration_since(retry_at)
                    .unwrap_or_else(|e| e.duration());
                assert!(off < Duration::from_millis(1), "{off:?}"); // microsecond precision
            }
            other => panic!("expected BackingOff, got {other:?}"),
        }
        // Past the back-off, or for a caller who needs the token, it is claimable again.
        let later = retry_at + Duration::from_secs(1);
        assert!(matches!(
            r[1].claim_refresh(&acme(), v1, ClaimMode::Skip { now: later })
                .await
                .unwrap(),
            Claim::Granted(_)
        ));
        let Claim::Granted(claim) = r[1]
            .claim_refresh(&acme(), v1, ClaimMode::Wait)
            .await
            .unwrap()
        else {
            panic!("a caller may probe through the back-off");
        };
        // A success clears the fleet's back-off.
        let v2 = claim.commit(&record("at-2", Some("rt-2"))).await.unwrap();
        assert!(matches!(
            r[0].claim_refresh(&acme(), v2, ClaimMode::Skip { now })
                .await
                .unwrap(),
            Claim::Granted(_)
        ));
    }

    /// EdgeTag's return ends the fleet's outage back-offs in the store and tells every replica;
    /// a `Retry-After` still holds, and back-offs for other causes stay.
    #[tokio::test]
    async fn edgetags_return_ends_outage_back_offs_fleet_wide() {
        let r = replicas(2).await;
        let mut heard = r[1].changes();
        let now = SystemTime::now();
        let hour = Duration::from_secs(3600);
        let cases = [
            ("down", true, None),
            ("held", true, Some(now + hour / 2)),
            ("malformed", false, None),
        ];
        let mut versions = Vec::new();
        for (name, outage, hold_until) in cases {
            let account = AccountId::parse(name).unwrap();
            let v = r[0]
                .put_account(&account, &record("at", Some("rt")), Expected::Absent)
                .await
                .unwrap();
            assert!(matches!(
                next(&mut heard).await,
                Some(Change::Account { .. })
            ));
            let Claim::Granted(claim) = r[0]
                .claim_refresh(&account, v, ClaimMode::Wait)
                .await
                .unwrap()
            else {
                panic!("claimable");
            };
            let backoff = Backoff {
                failures: 4,
                retry_at: now + hour,
                outage,
                hold_until,
            };
            claim.fail(backoff).await.unwrap();
            versions.push((account, v));
        }
        let claim = |i: usize| {
            let (account, v) = versions[i].clone();
            let store = r[1].clone();
            async move {
                store
                    .claim_refresh(&account, v, ClaimMode::Skip { now })
                    .await
                    .unwrap()
            }
        };
        match claim(1).await {
            Claim::BackingOff(b) => {
                assert!(b.outage);
                assert!(same_time(b.retry_at, now + hour));
                let held = b.hold_until.expect("the Retry-After is shared");
                assert!(same_time(held, now + hour / 2));
            }
            other => panic!("expected BackingOff, got {other:?}"),
        }

        assert_eq!(r[0].end_outage_backoffs().await.unwrap(), 2);
        assert_eq!(next(&mut heard).await, Some(Change::Recovered));
        assert!(
            matches!(claim(0).await, Claim::Granted(_)),
            "refreshes at once"
        );
        match claim(1).await {
            Claim::BackingOff(b) => {
                assert!(!b.outage);
                assert!(same_time(b.retry_at, now + hour / 2));
            }
            other => panic!("Retry-After still holds: expected BackingOff, got {other:?}"),
        }
        assert!(
            matches!(claim(2).await, Claim::BackingOff(b) if !b.outage),
            "its own answers were unusable: still backs off"
        );
        // Nothing left to end: no second notification comes before the next write's.
        assert_eq!(r[1].end_outage_backoffs().await.unwrap(), 0);
        put_acme_and_hear(&*r[0], &mut heard).await;
    }

    /// Connects acme through `store` and waits until `heard` announces it; returns its version.
    async fn put_acme_and_hear(
        store: &dyn Store,
        heard: &mut BoxStream<'static, Change>,
    ) -> Version {
        let v = store
            .put_account(&acme(), &record("at-1", Some("rt-1")), Expected::Absent)
            .await
            .unwrap();
        assert_eq!(
            next(heard).await,
            Some(Change::Account {
                account: acme(),
                version: Some(v)
            })
        );
        v
    }

    /// Equal at PostgreSQL's microsecond precision.
    fn same_time(a: SystemTime, b: SystemTime) -> bool {
        let apart = a.duration_since(b).unwrap_or_else(|e| e.duration());
        apart < Duration::from_micros(1)
    }

    async fn next(heard: &mut BoxStream<'static, Change>) -> Option<Change> {
        tokio::time::timeout(Duration::from_secs(10), heard.next())
            .await
            .expect("a notification arrives")
    }

    #[tokio::test]
    async fn every_replica_hears_of_every_write_with_its_version() {
        let r = replicas(2).await;
        let mut heard = r[1].changes();
        let v1 = put_acme_and_hear(&*r[0], &mut heard).await;
        let Claim::Granted(claim) = r[0]
            .claim_refresh(&acme(), v1, ClaimMode::Wait)
            .await
            .unwrap()
        else {
            panic!("claimable");
        };
        let v2 = claim.commit(&record("at-2", Some("rt-2"))).await.unwrap();
        assert_eq!(
            next(&mut heard).await,
            Some(Change::Account {
                account: acme(),
                version: Some(v2)
            })
        );
        r[0].delete_account(&acme(), v2).await.unwrap();
        assert_eq!(
            next(&mut heard).await,
            Some(Change::Account {
                account: acme(),
                version: None
            })
        );
    }
}
