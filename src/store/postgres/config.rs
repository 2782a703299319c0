//! Where the database is and how to reach it: the store URL and its TLS mode
//! ([`PostgresConfig::parse`]), each session's settings, the timeouts that bound every wait, and
//! the [`Connector`] (plaintext or rustls, with the password of the moment) that builds the pool
//! and the listener's connection.

use std::{fmt, path::Path, sync::Arc, time::Duration};

use deadpool_postgres::{
    ConfigConnectImpl, Connect, Manager, ManagerConfig, Pool, RecyclingMethod,
};
use futures::{StreamExt, future::BoxFuture, stream::BoxStream};
use rustls_pki_types::pem::PemObject;
use secrecy::SecretString;
use tokio_postgres::{
    AsyncMessage, NoTls, Socket,
    tls::{MakeTlsConnect, TlsConnect},
};

use super::password::{Password, PasswordFile};
use crate::store::StoreError;

/// Connections per replica: refreshes hold one for their upstream call (at most the upstream cap
/// in the background, plus callers' and operators'), the rest are short writes.
const POOL_SIZE: usize = 32;

/// How long any one statement, or the wait for a connection, may take; and one operation as a
/// whole, as seen from here (a database that stopped answering without closing the socket).
pub(super) const STATEMENT_TIMEOUT: Duration = Duration::from_secs(5);
pub(super) const OPERATION_TIMEOUT: Duration = Duration::from_secs(10);

/// How long connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

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
    password: Arc<Password>,
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
            .field("password", &self.password)
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
        let pg: tokio_postgres::Config = without_tls
            .as_str()
            .parse()
            .map_err(|e| format!("the store URL is not a PostgreSQL URL: {e}"))?;
        if pg.get_user().is_none() {
            return Err("the store URL names no user (postgres://USER@HOST:PORT/DB)".into());
        }
        Ok(Self {
            url: url.to_owned(),
            pg,
            password: Arc::new(password.map_or(Password::None, Password::Given)),
            tls,
            ca_pem,
            lock_hold: Duration::from_secs(20),
        })
    }

    /// Logs in with the password in `path`, read again for every new connection (see
    /// [`super::password`]); fails if it cannot be read now.
    pub fn with_password_file(mut self, path: &Path) -> Result<Self, String> {
        self.password = Arc::new(Password::File(PasswordFile::open(path)?));
        Ok(self)
    }

    /// The URL as given (it carries no password), for logs.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The connection settings every session gets: timeouts that bound every wait.
    pub(super) fn session(&self) -> tokio_postgres::Config {
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

    pub(super) fn connector(&self) -> Result<Connector, StoreError> {
        Ok(Connector {
            tls: self.tls_connector()?,
            password: self.password.clone(),
        })
    }

    fn tls_connector(&self) -> Result<Tls, StoreError> {
        use tokio_rustls::rustls::{ClientConfig, RootCertStore};
        if self.tls == TlsMode::Disable {
            return Ok(Tls::Plain);
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
        Ok(Tls::Rustls(tokio_postgres_rustls::MakeRustlsConnect::new(
            config,
        )))
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

/// Plaintext or rustls, and the password: one value, so the pool and the listener connect the
/// same way.
#[derive(Clone)]
pub(super) struct Connector {
    tls: Tls,
    password: Arc<Password>,
}

#[derive(Clone)]
enum Tls {
    Plain,
    Rustls(tokio_postgres_rustls::MakeRustlsConnect),
}

pub(super) type Messages = BoxStream<'static, Result<AsyncMessage, tokio_postgres::Error>>;

impl Connector {
    pub(super) fn pool(&self, pg: tokio_postgres::Config) -> Result<Pool, StoreError> {
        let config = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let manager = Manager::from_connect(pg, self.clone(), config);
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
    pub(super) async fn connect(
        &self,
        pg: &tokio_postgres::Config,
    ) -> Result<(tokio_postgres::Client, Messages), tokio_postgres::Error> {
        let pg = self.with_password(pg);
        match &self.tls {
            Tls::Plain => connect_with(&pg, NoTls).await,
            Tls::Rustls(tls) => connect_with(&pg, tls.clone()).await,
        }
    }

    /// `pg` with the password a connection made now logs in with.
    fn with_password(&self, pg: &tokio_postgres::Config) -> tokio_postgres::Config {
        let mut pg = pg.clone();
        self.password.apply(&mut pg);
        pg
    }
}

/// How the pool makes a connection: with the password of the moment.
impl Connect for Connector {
    fn connect(
        &self,
        pg: &tokio_postgres::Config,
    ) -> BoxFuture<
        '_,
        Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>), tokio_postgres::Error>,
    > {
        let pg = self.with_password(pg);
        Box::pin(async move {
            match &self.tls {
                Tls::Plain => ConfigConnectImpl { tls: NoTls }.connect(&pg).await,
                Tls::Rustls(tls) => ConfigConnectImpl { tls: tls.clone() }.connect(&pg).await,
            }
        })
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
        assert_eq!(
            ok.connector().unwrap().with_password(&ok.pg).get_password(),
            Some(&b"pw"[..])
        );
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
}
