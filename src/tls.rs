//! gRPC over TLS: the server's certificate chain and key, and the CA that clients' certificates
//! must chain to. [`ServerTls`] reads the three files, checks them together (the key matches the
//! certificate, the certificate has not expired, the CA parses) and builds one rustls
//! configuration from them; when the files change (SIGHUP, or new content seen by the reloader,
//! [`crate::reload`]) it builds a new one and swaps it in whole. Each handshake takes the
//! configuration in force when it starts, so new connections get the new certificate and open
//! ones carry on with theirs; files that do not load leave the previous configuration in force.
//!
//! One configuration rather than a certificate resolver beside a verifier of its own: the
//! certificate and the client CA change together (a half-valid set changes nothing), and start
//! and reload take the same path.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime},
};

use clap::Args;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use tokio_rustls::{
    TlsAcceptor,
    rustls::{RootCertStore, ServerConfig, server::WebPkiClientVerifier},
};
use x509_cert::der::Decode;

use crate::{
    metrics,
    reload::{self, FileBacked, Read, Reloadable},
    sealing,
};

/// Below this much validity left, the service warns in its log (at start, once a day, and when a
/// certificate with less is loaded).
pub const EXPIRY_WARNING: Duration = Duration::from_secs(14 * 24 * 3600);

/// The TLS flags of the server.
#[derive(Debug, Clone, Args)]
pub struct TlsSettings {
    /// PEM certificate chain to serve gRPC over TLS (with --tls-key). Re-read on SIGHUP and when
    /// its content changes.
    #[arg(long, env = "CREDENTIAL_SERVICE_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(long, env = "CREDENTIAL_SERVICE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// PEM CA certificate(s) for client certificates (mutual TLS); a caller may then be named by
    /// its certificate's subject alternative name (`tls_san` in the callers file). Re-read with
    /// the certificate.
    #[arg(long, env = "CREDENTIAL_SERVICE_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
}

impl TlsSettings {
    /// The files, loaded; `None` for plaintext gRPC. The error names the file and the flag.
    pub fn resolve(&self) -> Result<Option<ServerTls>, String> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => {
                sealing::warn_if_open_to_others(key, "the TLS key file");
                ServerTls::load(&TlsFiles {
                    cert: cert.clone(),
                    key: key.clone(),
                    client_ca: self.tls_client_ca.clone(),
                })
                .map(Some)
            }
            (None, None) => Ok(None),
            _ => Err(
                "--tls-cert and --tls-key (CREDENTIAL_SERVICE_TLS_CERT, CREDENTIAL_SERVICE_TLS_KEY) go together".into(),
            ),
        }
    }
}

/// Where the server's TLS material is.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// PEM certificate chain, the server's own certificate first.
    pub cert: PathBuf,
    /// PEM private key of that certificate.
    pub key: PathBuf,
    /// PEM CA certificate(s): with them, clients may (not must) present certificates they sign.
    pub client_ca: Option<PathBuf>,
}

/// One loaded set of files: what handshakes use, and what the log and the metrics say of it.
pub struct Identity {
    config: Arc<ServerConfig>,
    /// The served certificate's serial number, in hex.
    pub serial: String,
    /// The served certificate's not-after.
    pub not_after: SystemTime,
}

/// The server's TLS configuration, reloadable; cheap to clone, clones share reloads.
#[derive(Clone)]
pub struct ServerTls(Arc<FileBacked<Identity>>);

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("ServerTls").field(&self.0.files()).finish()
    }
}

impl ServerTls {
    /// Reads and checks the files (see the module docs). The error names the file at fault, never
    /// its content.
    pub fn load(files: &TlsFiles) -> Result<Self, String> {
        let mut paths = vec![files.cert.clone(), files.key.clone()];
        paths.extend(files.client_ca.clone());
        let files = files.clone();
        FileBacked::load(
            "the TLS certificate",
            paths,
            Box::new(move |reads| identity(&files, reads, SystemTime::now())),
            announce,
        )
        .map(|loaded| Self(Arc::new(loaded)))
    }

    /// What the next handshake uses.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.0.peek().config.clone())
    }

    /// The certificate served now.
    pub fn identity(&self) -> Arc<Identity> {
        self.0.current()
    }

    /// For the server's reloader.
    pub fn reloadable(&self) -> Arc<dyn Reloadable> {
        self.0.clone()
    }

    /// Records the served certificate's expiry in the metrics, and warns when it is near: what
    /// the server does at start and once a day.
    pub fn check_expiry(&self, now: SystemTime) {
        let identity = self.identity();
        metrics::set_tls_certificate_expiry(identity.not_after);
        warn_if_expiring(&identity, now);
    }
}

/// What a reload logs of the new certificate; the metrics follow it from then on.
fn announce(identity: &Identity) -> String {
    metrics::set_tls_certificate_expiry(identity.not_after);
    warn_if_expiring(identity, SystemTime::now());
    format!(
        "serial {}, valid until {}",
        identity.serial,
        humantime::format_rfc3339_seconds(identity.not_after)
    )
}

/// How long `not_after` leaves from `now` when that is under [`EXPIRY_WARNING`].
pub fn expiring_in(not_after: SystemTime, now: SystemTime) -> Option<Duration> {
    let left = not_after.duration_since(now).unwrap_or_default();
    (left < EXPIRY_WARNING).then_some(left)
}

fn warn_if_expiring(identity: &Identity, now: SystemTime) {
    if let Some(left) = expiring_in(identity.not_after, now) {
        tracing::warn!(
            serial = %identity.serial,
            not_after = %humantime::format_rfc3339_seconds(identity.not_after),
            days_left = left.as_secs() / 86_400,
            "the TLS certificate expires in less than 14 days: renew it (new files are taken up \
             without a restart)"
        );
    }
}

/// The rustls configuration tonic would build from the files as read: the server's identity,
/// ALPN `h2`, and with a client CA, optional client certificates that must verify when presented.
fn identity(files: &TlsFiles, reads: &[Read], now: SystemTime) -> Result<Identity, String> {
    let cert_path = files.cert.display();
    let cert_pem = reload::content(&reads[0], "the certificate chain (--tls-cert)", &files.cert)?;
    let key_pem = reload::content(&reads[1], "the private key (--tls-key)", &files.key)?;
    let certs = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            format!("the certificate chain {cert_path} (--tls-cert) does not parse: {e}")
        })?;
    let leaf = certs
        .first()
        .ok_or_else(|| format!("{cert_path} (--tls-cert) holds no certificate"))?;
    let leaf = x509_cert::Certificate::from_der(leaf).map_err(|e| {
        format!("the first certificate in {cert_path} (--tls-cert) does not parse: {e}")
    })?;
    let tbs = &leaf.tbs_certificate;
    let serial = hex::encode(tbs.serial_number.as_bytes());
    let not_after = tbs.validity.not_after.to_system_time();
    if not_after <= now {
        return Err(format!(
            "the certificate in {cert_path} (--tls-cert, serial {serial}) expired at {}",
            humantime::format_rfc3339_seconds(not_after)
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| {
        format!(
            "the private key {} (--tls-key) does not parse: {e}",
            files.key.display()
        )
    })?;

    let builder = ServerConfig::builder();
    let builder = match (&files.client_ca, reads.get(2)) {
        (Some(path), Some(read)) => {
            let bad = |e: &dyn std::fmt::Display| {
                format!(
                    "the client CA {} (--tls-client-ca) is unusable: {e}",
                    path.display()
                )
            };
            let pem = reload::content(read, "the client CA (--tls-client-ca)", path)?;
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(pem) {
                roots.add(cert.map_err(|e| bad(&e))?).map_err(|e| bad(&e))?;
            }
            // Optional: bearer-token callers need no certificate; a presented one must verify.
            let verifier = WebPkiClientVerifier::builder(roots.into())
                .allow_unauthenticated()
                .build()
                .map_err(|e| bad(&e))?;
            builder.with_client_cert_verifier(verifier)
        }
        _ => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(certs, key).map_err(|e| {
        format!(
            "the certificate {cert_path} (--tls-cert) and the key {} (--tls-key) do not make an identity: {e}",
            files.key.display()
        )
    })?;
    config.alpn_protocols.push(b"h2".to_vec());
    Ok(Identity {
        config: Arc::new(config),
        serial,
        not_after,
    })
}

#[cfg(test)]
mod tests {
    use rcgen::{CertificateParams, KeyPair, SerialNumber};

    use super::*;

    const DAY: Duration = Duration::from_secs(86_400);

    /// Writes a self-signed certificate valid until `not_after` (and its key) into `dir`.
    fn pair(dir: &std::path::Path, serial: u8, not_after: SystemTime) -> TlsFiles {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params.serial_number = Some(SerialNumber::from_slice(&[serial]));
        params.not_before = time::OffsetDateTime::UNIX_EPOCH;
        params.not_after = time::OffsetDateTime::UNIX_EPOCH
            + not_after.duration_since(SystemTime::UNIX_EPOCH).unwrap();
        let cert = params.self_signed(&key).unwrap();
        let files = TlsFiles {
            cert: dir.join(format!("cert-{serial}.pem")),
            key: dir.join(format!("key-{serial}.pem")),
            client_ca: None,
        };
        std::fs::write(&files.cert, cert.pem()).unwrap();
        std::fs::write(&files.key, key.serialize_pem()).unwrap();
        files
    }

    #[test]
    fn a_pair_loads_with_its_serial_and_expiry_and_a_broken_one_says_why() {
        let dir = tempfile::tempdir().unwrap();
        let now = SystemTime::now();
        let in_a_year = SystemTime::UNIX_EPOCH
            + Duration::from_secs(
                (now + 365 * DAY)
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap()
                    .as_secs(),
            );
        let good = pair(dir.path(), 7, in_a_year);
        let tls = ServerTls::load(&good).unwrap();
        assert_eq!(tls.identity().serial, "07");
        assert_eq!(tls.identity().not_after, in_a_year);

        let other = pair(dir.path(), 8, in_a_year);
        let mismatched = TlsFiles {
            key: other.key.clone(),
            ..good.clone()
        };
        let mismatch = ServerTls::load(&mismatched).unwrap_err();
        assert!(mismatch.contains("do not make an identity"), "{mismatch}");

        let expired = pair(dir.path(), 9, now - DAY);
        let expired = ServerTls::load(&expired).unwrap_err();
        assert!(
            expired.contains("expired at") && expired.contains("serial 09"),
            "{expired}"
        );

        let missing = TlsFiles {
            cert: dir.path().join("nothing.pem"),
            ..good.clone()
        };
        let missing = ServerTls::load(&missing).unwrap_err();
        assert!(
            missing.contains("cannot read the certificate chain")
                && missing.contains("nothing.pem"),
            "{missing}"
        );

        let key_text = std::fs::read_to_string(&good.key).unwrap();
        let key_line = key_text.lines().nth(1).unwrap();
        for e in [mismatch, expired, missing] {
            assert!(!e.contains("BEGIN") && !e.contains(key_line), "{e}");
        }
    }

    #[test]
    fn fewer_than_fourteen_days_left_is_worth_a_warning() {
        let now = SystemTime::now();
        assert_eq!(expiring_in(now + 30 * DAY, now), None);
        assert_eq!(expiring_in(now + 14 * DAY, now), None);
        assert_eq!(expiring_in(now + 13 * DAY, now), Some(13 * DAY));
        assert_eq!(expiring_in(now - DAY, now), Some(Duration::ZERO));
    }
}
