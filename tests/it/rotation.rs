//! Rotating every secret while the service serves (issue 25): the server certificate, the client
//! CA, a Kubernetes-style Secret update, a broken pair; EdgeTag's client secret; the PostgreSQL
//! password; SIGHUP at once after start. The TLS rotations run against the real binary under a
//! steady GetToken load over TLS and count its failed calls, which must stay at 0; the channels
//! carrying the load count their connections, so "open connections carry on" is checked, not
//! assumed.

use crate::{
    binary::{ADMIN_TOKEN, BIN, Binary, Log, READER_TOKEN, until, with_token, write_callers},
    common,
};

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    pin::Pin,
    process::Stdio,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, SystemTime},
};

use common::{Options, REDIRECT_URI, TestApp, assert_status};
use credential_service::{
    oauth::ClientSecret,
    proto::{
        BeginAuthRequest, DescribeAccountRequest, GetTokenRequest, RefreshTokenRequest,
        credential_service_client::CredentialServiceClient,
    },
};
use fake_edgetag::FakeConfig;
use hyper_util::rt::TokioIo;
use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    SerialNumber,
};
use rustls_pki_types::{CertificateDer, pem::PemObject};
use secrecy::ExposeSecret;
use sha2::{Digest, Sha256};
use tempfile::TempDir;
use tokio::{net::TcpStream, process::Command, task::JoinHandle};
use tokio_rustls::{
    TlsConnector,
    rustls::{ClientConfig, RootCertStore, pki_types::ServerName},
};
use tonic::{
    Code, Request,
    codegen::http::Uri,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};
use x509_cert::der::Decode;

/// How often the service under test looks at its files.
const RELOAD_INTERVAL: &str = "100ms";
/// Long enough for several looks at the files: to see that something does *not* happen again.
const SEVERAL_POLLS: Duration = Duration::from_millis(600);

// ---------------------------------------------------------------------------------------------
// Certificates

/// A CA that signs server and client certificates with the serial numbers a test chooses.
struct Ca {
    params: CertificateParams,
    key: KeyPair,
    pem: String,
}

/// A certificate and its key, PEM.
#[derive(Clone)]
struct Pair {
    cert: String,
    key: String,
}

impl Ca {
    fn new() -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let pem = params.self_signed(&key).unwrap().pem();
        Self { params, key, pem }
    }

    /// A certificate for `names`, with the key in `key` (PEM) or a new one.
    fn issue(
        &self,
        names: &[&str],
        usage: ExtendedKeyUsagePurpose,
        serial: u8,
        not_after: time::OffsetDateTime,
        key: Option<&str>,
    ) -> Pair {
        let key = match key {
            Some(pem) => KeyPair::from_pem(pem).unwrap(),
            None => KeyPair::generate().unwrap(),
        };
        let mut params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.extended_key_usages = vec![usage];
        params.serial_number = Some(SerialNumber::from_slice(&[serial]));
        params.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(1);
        params.not_after = not_after;
        let cert = params
            .signed_by(&key, &Issuer::from_params(&self.params, &self.key))
            .unwrap();
        Pair {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }

    /// A server certificate for localhost, valid for a year.
    fn server(&self, serial: u8) -> Pair {
        self.server_until(
            serial,
            time::OffsetDateTime::now_utc() + time::Duration::days(365),
        )
    }

    fn server_until(&self, serial: u8, not_after: time::OffsetDateTime) -> Pair {
        self.issue(
            &["localhost", "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
            serial,
            not_after,
            None,
        )
    }

    /// A client certificate naming `san`.
    fn client(&self, san: &str) -> Pair {
        self.issue(
            &[san],
            ExtendedKeyUsagePurpose::ClientAuth,
            1,
            time::OffsetDateTime::now_utc() + time::Duration::days(365),
            None,
        )
    }
}

/// Replaces `path`'s content the way a careful writer does: a new file renamed over it.
fn replace(path: &Path, content: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

// ---------------------------------------------------------------------------------------------
// The service under test: the real binary in front of the fake EdgeTag

/// Where the service's TLS files are.
struct TlsPaths {
    cert: PathBuf,
    key: PathBuf,
    client_ca: Option<PathBuf>,
}

/// Starts the binary with the callers file of [`write_callers`] naming `sans`, `tls` and `args`,
/// looking at its files every [`RELOAD_INTERVAL`]; returns once it serves.
async fn start(dir: TempDir, tls: Option<&TlsPaths>, sans: &[&str], args: &[&str]) -> Binary {
    write_callers(&dir.path().join("callers.toml"), sans);
    let mut all: Vec<String> = vec!["--reload-interval".into(), RELOAD_INTERVAL.into()];
    if let Some(tls) = tls {
        all.push("--tls-cert".into());
        all.push(tls.cert.display().to_string());
        all.push("--tls-key".into());
        all.push(tls.key.display().to_string());
        if let Some(ca) = &tls.client_ca {
            all.push("--tls-client-ca".into());
            all.push(ca.display().to_string());
        }
    }
    all.extend(args.iter().map(|a| a.to_string()));
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    Binary::start_with(dir, &all, |_| {}).await
}

// ---------------------------------------------------------------------------------------------
// Clients

/// Connects to the service over plain TCP and counts each connection it makes; TLS (from the
/// endpoint's settings) is put on top by tonic.
#[derive(Clone)]
struct CountingConnector {
    addr: SocketAddr,
    connects: Arc<AtomicUsize>,
}

impl tower::Service<Uri> for CountingConnector {
    type Response = TokioIo<TcpStream>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        self.connects.fetch_add(1, Ordering::SeqCst);
        let addr = self.addr;
        Box::pin(async move { TcpStream::connect(addr).await.map(TokioIo::new) })
    }
}

/// A TLS channel to `addr` trusting `ca_pem`, presenting `identity` if any; connected now, and
/// with the number of connections it has made.
async fn tls_channel(
    addr: SocketAddr,
    ca_pem: &str,
    identity: Option<&Pair>,
) -> Result<(Channel, Arc<AtomicUsize>), tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name("localhost");
    if let Some(pair) = identity {
        tls = tls.identity(Identity::from_pem(&pair.cert, &pair.key));
    }
    let connects = Arc::new(AtomicUsize::new(0));
    let channel = Endpoint::from_shared(format!("https://localhost:{}", addr.port()))
        .unwrap()
        .tls_config(tls)?
        .connect_with_connector(CountingConnector {
            addr,
            connects: connects.clone(),
        })
        .await?;
    Ok((channel, connects))
}

/// Whether a fresh connection presenting `identity` (and no token) gets a token for `account`.
async fn accepted(addr: SocketAddr, ca_pem: &str, identity: &Pair, account: &str) -> bool {
    let Ok((channel, _)) = tls_channel(addr, ca_pem, Some(identity)).await else {
        return false; // the handshake failed
    };
    CredentialServiceClient::new(channel)
        .get_token(GetTokenRequest {
            account: account.into(),
            min_validity: None,
        })
        .await
        .is_ok()
}

/// The serial number (hex) of the certificate a new TLS connection to `addr` is shown.
async fn served_serial(addr: SocketAddr, ca_pem: &str) -> String {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let leaf = &tls.get_ref().1.peer_certificates().unwrap()[0];
    let cert = x509_cert::Certificate::from_der(leaf).unwrap();
    hex::encode(cert.tbs_certificate.serial_number.as_bytes())
}

// ---------------------------------------------------------------------------------------------
// Load

/// GetToken in a loop on each channel (two callers per channel), counting what succeeds and
/// what fails (keeping the first failures' statuses). Dropping it stops the callers.
struct Load {
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    first_failures: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Load {
    fn start(channels: &[Channel], account: &str, token: Option<&str>) -> Self {
        let mut load = Self {
            ok: Arc::default(),
            failed: Arc::default(),
            first_failures: Arc::default(),
            stop: Arc::default(),
            tasks: Vec::new(),
        };
        for channel in channels.iter().flat_map(|c| [c.clone(), c.clone()]) {
            let (ok, failed, first_failures, stop) = (
                load.ok.clone(),
                load.failed.clone(),
                load.first_failures.clone(),
                load.stop.clone(),
            );
            let (account, token) = (account.to_owned(), token.map(str::to_owned));
            load.tasks.push(tokio::spawn(async move {
                let mut client = CredentialServiceClient::new(channel);
                while !stop.load(Ordering::Relaxed) {
                    let message = GetTokenRequest {
                        account: account.clone(),
                        min_validity: None,
                    };
                    let request = match &token {
                        Some(token) => with_token(message, token),
                        None => Request::new(message),
                    };
                    match client.get_token(request).await {
                        Ok(_) => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(status) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            {
                                let mut first = first_failures.lock().unwrap();
                                if first.len() < 10 {
                                    first.push(format!(
                                        "{:?}: {}",
                                        status.code(),
                                        status.message()
                                    ));
                                }
                            }
                            // A failure may come back at once: leave the thread to others.
                            tokio::task::yield_now().await;
                        }
                    }
                }
            }));
        }
        load
    }

    /// Returns once `n` more calls have succeeded: the load went on through what happened before.
    async fn carries_on(&self, n: u64) {
        let from = self.ok.load(Ordering::Relaxed);
        until("the load carrying on", || async {
            self.ok.load(Ordering::Relaxed) >= from + n
        })
        .await;
    }

    /// Stops; (calls that succeeded, calls that failed, the first failures).
    async fn stop(mut self) -> (u64, u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for task in std::mem::take(&mut self.tasks) {
            task.await.unwrap();
        }
        let first = self.first_failures.lock().unwrap().clone();
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            first,
        )
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Load channels over TLS; each must have connected exactly once when the test ends.
struct LoadChannels {
    channels: Vec<Channel>,
    connects: Vec<Arc<AtomicUsize>>,
}

impl LoadChannels {
    async fn open(addr: SocketAddr, ca_pem: &str, identity: Option<&Pair>, n: usize) -> Self {
        let mut channels = Vec::new();
        let mut connects = Vec::new();
        for _ in 0..n {
            let (channel, count) = tls_channel(addr, ca_pem, identity).await.unwrap();
            channels.push(channel);
            connects.push(count);
        }
        Self { channels, connects }
    }

    /// Every channel is still on its first connection.
    #[track_caller]
    fn assert_never_reconnected(&self) {
        let counts: Vec<usize> = self
            .connects
            .iter()
            .map(|c| c.load(Ordering::SeqCst))
            .collect();
        assert!(
            counts.iter().all(|n| *n == 1),
            "connections made: {counts:?}"
        );
    }
}

/// Reports a rotation's failed calls under load (the issue asks for the count) and requires 0.
#[track_caller]
fn report(rotation: &str, (ok, failed, first): (u64, u64, Vec<String>)) {
    eprintln!("rotation under load: {rotation}: {ok} GetToken calls succeeded, {failed} failed");
    assert_eq!(
        failed,
        0,
        "{rotation}: {failed} failed calls (of {}), first: {first:?}",
        ok + failed
    );
    assert!(ok > 0);
}

/// A service over TLS with the certificate `pair` (issued by `ca`) in `dir`, an account
/// connected, and `n` load channels with the reader token.
async fn tls_service(ca: &Ca, pair: &Pair, extra: &[&str]) -> (Binary, TlsPaths, LoadChannels) {
    let dir = tempfile::tempdir().unwrap();
    let paths = TlsPaths {
        cert: dir.path().join("tls.crt"),
        key: dir.path().join("tls.key"),
        client_ca: None,
    };
    std::fs::write(&paths.cert, &pair.cert).unwrap();
    std::fs::write(&paths.key, &pair.key).unwrap();
    let service = start(dir, Some(&paths), &[], extra).await;
    let load = LoadChannels::open(service.addr, &ca.pem, None, 4).await;
    service
        .connect_account(load.channels[0].clone(), "acme")
        .await;
    (service, paths, load)
}

// ---------------------------------------------------------------------------------------------
// TLS

/// cert-manager renews the certificate (same CA, new serial, new key) by writing new files: new
/// connections get the new certificate, the open ones carry on, no call fails, and the expiry
/// metric follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_renewed_server_certificate_reaches_new_connections_and_open_ones_carry_on() {
    let ca = Ca::new();
    let first = ca.server(1);
    let (service, paths, channels) =
        tls_service(&ca, &first, &["--metrics-listen", "127.0.0.1:0"]).await;
    assert_eq!(served_serial(service.addr, &ca.pem).await, "01");
    let expiry = |pair: &Pair| {
        let der = CertificateDer::from_pem_slice(pair.cert.as_bytes()).unwrap();
        x509_cert::Certificate::from_der(&der)
            .unwrap()
            .tbs_certificate
            .validity
            .not_after
            .to_unix_duration()
            .as_secs() as f64
    };
    let gauge = "credential_tls_certificate_expiry_timestamp_seconds";
    assert_eq!(service.metric(gauge).await, Some(expiry(&first)));

    let load = Load::start(&channels.channels, "acme", Some(READER_TOKEN));
    load.carries_on(200).await;
    // New files, written one after the other as a simple renewal job would: for a moment the new
    // certificate sits beside the old key (a look at the files then is not reported unless the
    // pair stays that way for a whole --reload-interval; src/reload.rs tests that exactly).
    let renewed = ca.server(2);
    std::fs::write(&paths.cert, &renewed.cert).unwrap();
    std::fs::write(&paths.key, &renewed.key).unwrap();
    until("a new connection sees serial 02", || async {
        served_serial(service.addr, &ca.pem).await == "02"
    })
    .await;
    service
        .log
        .wait_for(&["the TLS certificate reloaded", "serial 02"])
        .await;
    load.carries_on(200).await;
    report("renewed server certificate", load.stop().await);
    channels.assert_never_reconnected();
    assert_eq!(service.metric(gauge).await, Some(expiry(&renewed)));
}

/// A client-CA rollover: the bundle first holds the old CA, then both, then the new one alone.
/// A client certificate from the new CA is accepted once the bundle holds both; the load, on
/// connections made with old-CA certificates, carries on to the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_ca_rollover_accepts_the_new_ca_once_the_bundle_holds_both() {
    let (server_ca, old_ca, new_ca) = (Ca::new(), Ca::new(), Ca::new());
    let dir = tempfile::tempdir().unwrap();
    let paths = TlsPaths {
        cert: dir.path().join("tls.crt"),
        key: dir.path().join("tls.key"),
        client_ca: Some(dir.path().join("client-ca.crt")),
    };
    let pair = server_ca.server(1);
    std::fs::write(&paths.cert, &pair.cert).unwrap();
    std::fs::write(&paths.key, &pair.key).unwrap();
    let bundle = paths.client_ca.as_ref().unwrap();
    std::fs::write(bundle, &old_ca.pem).unwrap();
    let service = start(
        dir,
        Some(&paths),
        &["old.internal.example.com", "new.internal.example.com"],
        &[],
    )
    .await;
    let old_client = old_ca.client("old.internal.example.com");
    let new_client = new_ca.client("new.internal.example.com");
    let (admin, _) = tls_channel(service.addr, &server_ca.pem, None)
        .await
        .unwrap();
    service.connect_account(admin, "acme").await;
    let channels = LoadChannels::open(service.addr, &server_ca.pem, Some(&old_client), 4).await;
    let load = Load::start(&channels.channels, "acme", None);
    load.carries_on(200).await;
    assert!(!accepted(service.addr, &server_ca.pem, &new_client, "acme").await);

    replace(bundle, &format!("{}{}", old_ca.pem, new_ca.pem));
    until("a new-CA client is accepted", || {
        accepted(service.addr, &server_ca.pem, &new_client, "acme")
    })
    .await;
    assert!(accepted(service.addr, &server_ca.pem, &old_client, "acme").await);
    load.carries_on(200).await;

    // The rollover ends: new connections with the old CA's certificates are refused, the ones
    // open since before carry on.
    replace(bundle, &new_ca.pem);
    until("an old-CA client is refused", || async {
        !accepted(service.addr, &server_ca.pem, &old_client, "acme").await
    })
    .await;
    assert!(accepted(service.addr, &server_ca.pem, &new_client, "acme").await);
    load.carries_on(200).await;
    report("client-CA rollover", load.stop().await);
    channels.assert_never_reconnected();
}

/// How the kubelet updates a mounted Secret: the files are symlinks through `..data`, which is
/// switched atomically to a new timestamped directory; the old directory is then removed.
struct SecretVolume {
    dir: PathBuf,
    generation: u32,
}

impl SecretVolume {
    fn create(dir: &Path, files: &[(&str, &str)]) -> Self {
        let mut volume = Self {
            dir: dir.to_owned(),
            generation: 0,
        };
        volume.update(files);
        for (name, _) in files {
            std::os::unix::fs::symlink(format!("..data/{name}"), dir.join(name)).unwrap();
        }
        volume
    }

    fn update(&mut self, files: &[(&str, &str)]) {
        self.generation += 1;
        let name = format!(
            "..2026_12_07_21_00_{:02}.{}",
            self.generation, self.generation
        );
        let generation = self.dir.join(&name);
        std::fs::create_dir(&generation).unwrap();
        for (file, content) in files {
            std::fs::write(generation.join(file), content).unwrap();
        }
        let old = std::fs::read_link(self.dir.join("..data")).ok();
        let tmp = self.dir.join("..data_tmp");
        std::os::unix::fs::symlink(&name, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.join("..data")).unwrap();
        if let Some(old) = old {
            std::fs::remove_dir_all(self.dir.join(old)).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_kubernetes_secret_update_swaps_the_certificate_through_the_data_symlink() {
    let ca = Ca::new();
    let dir = tempfile::tempdir().unwrap();
    let mount = dir.path().join("tls");
    std::fs::create_dir(&mount).unwrap();
    let first = ca.server(1);
    let mut volume =
        SecretVolume::create(&mount, &[("tls.crt", &first.cert), ("tls.key", &first.key)]);
    let paths = TlsPaths {
        cert: mount.join("tls.crt"),
        key: mount.join("tls.key"),
        client_ca: None,
    };
    let service = start(dir, Some(&paths), &[], &[]).await;
    let channels = LoadChannels::open(service.addr, &ca.pem, None, 4).await;
    service
        .connect_account(channels.channels[0].clone(), "acme")
        .await;
    let load = Load::start(&channels.channels, "acme", Some(READER_TOKEN));
    load.carries_on(200).await;

    let named_before = std::fs::symlink_metadata(&paths.cert)
        .unwrap()
        .modified()
        .unwrap();
    let renewed = ca.server(2);
    volume.update(&[("tls.crt", &renewed.cert), ("tls.key", &renewed.key)]);
    // The named path itself did not change: only its content did.
    assert_eq!(
        std::fs::symlink_metadata(&paths.cert)
            .unwrap()
            .modified()
            .unwrap(),
        named_before
    );
    until("a new connection sees serial 02", || async {
        served_serial(service.addr, &ca.pem).await == "02"
    })
    .await;
    load.carries_on(200).await;
    report("Kubernetes Secret symlink swap", load.stop().await);
    channels.assert_never_reconnected();
    assert!(service.log.matching(&["not reloaded"]).is_empty());
}

/// Pairs that do not load (a key that is not the certificate's, an expired certificate, a key
/// file that cannot be read): each is logged once with its reason, the previous pair stays in
/// force, and no call fails. Then a good pair is taken up.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broken_pair_keeps_the_previous_one_and_is_logged_once() {
    let ca = Ca::new();
    let first = ca.server(1);
    let (service, paths, channels) = tls_service(&ca, &first, &[]).await;
    let load = Load::start(&channels.channels, "acme", Some(READER_TOKEN));
    load.carries_on(200).await;

    // Each breakage is one change to one file (a new file renamed over the old), so no
    // in-between state can be reported besides the one under test.
    let other = ca.server(3);
    let expired = ca.issue(
        &["localhost"],
        ExtendedKeyUsagePurpose::ServerAuth,
        4,
        time::OffsetDateTime::now_utc() - time::Duration::days(1),
        Some(&first.key),
    );
    let refused = "the TLS certificate not reloaded; the previous one stays in force";
    /// What a breakage's log line says, and how to break the files.
    type Breakage<'a> = (&'static str, Box<dyn Fn() + 'a>);
    let breakages: [Breakage; 3] = [
        (
            "do not make an identity",
            Box::new(|| replace(&paths.cert, &other.cert)), // beside the first key
        ),
        (
            "expired at",
            Box::new(|| replace(&paths.cert, &expired.cert)), // the first key's, expired
        ),
        (
            "cannot read the private key",
            Box::new(|| std::fs::remove_file(&paths.key).unwrap()),
        ),
    ];
    for (i, (reason, breakage)) in breakages.iter().enumerate() {
        breakage();
        let line = service.log.wait_for(&[refused, reason]).await;
        assert!(line.contains("ERROR"), "{line}");
        tokio::time::sleep(SEVERAL_POLLS).await; // more looks at the same files
        assert_eq!(
            service.log.matching(&[refused, reason]).len(),
            1,
            "{reason}: logged once"
        );
        assert_eq!(service.log.matching(&[refused]).len(), i + 1);
        assert_eq!(served_serial(service.addr, &ca.pem).await, "01");
        load.carries_on(100).await;
    }
    for line in service.log.matching(&[refused]) {
        assert!(!line.contains("PRIVATE KEY"), "{line}");
    }

    let good = ca.server(5);
    replace(&paths.key, &good.key);
    replace(&paths.cert, &good.cert);
    until("a new connection sees serial 05", || async {
        served_serial(service.addr, &ca.pem).await == "05"
    })
    .await;
    load.carries_on(100).await;
    report("broken pairs, then a good one", load.stop().await);
    channels.assert_never_reconnected();
}

/// A certificate with fewer than 14 days left is worth a warning at start, and the metric says
/// when it expires.
#[tokio::test]
async fn a_certificate_near_its_expiry_is_warned_about_at_start() {
    let ca = Ca::new();
    let soon = ca.server_until(
        1,
        time::OffsetDateTime::now_utc() + time::Duration::days(10),
    );
    let (service, _paths, _channels) =
        tls_service(&ca, &soon, &["--metrics-listen", "127.0.0.1:0"]).await;
    let line = service
        .log
        .wait_for(&["WARN", "the TLS certificate expires in less than 14 days"])
        .await;
    assert!(
        line.contains("days_left=9") || line.contains("days_left=10"),
        "{line}"
    );
    let expires = service
        .metric("credential_tls_certificate_expiry_timestamp_seconds")
        .await
        .unwrap();
    let in_ten_days = (SystemTime::now() + Duration::from_secs(10 * 86_400))
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        (expires - in_ten_days).abs() < 120.0,
        "{expires} vs {in_ten_days}"
    );
}

// ---------------------------------------------------------------------------------------------
// The README's steps

/// The fenced `sh` block after `<!-- tests/it/rotation.rs runs the next block: NAME -->` in
/// README.md, so that the README and this test cannot drift apart.
fn readme_block(name: &str) -> String {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let marker = format!("<!-- tests/it/rotation.rs runs the next block: {name} -->");
    let after = readme
        .split(&marker)
        .nth(1)
        .unwrap_or_else(|| panic!("README.md has no {marker}"));
    let block = after
        .trim_start()
        .strip_prefix("```sh\n")
        .unwrap_or_else(|| {
            panic!("a ```sh block follows {marker}");
        });
    block.split("\n```").next().unwrap().to_owned()
}

/// Runs the README's block `name` with bash, in `cwd`, with `DIR` and `PID` as the README
/// defines them, and `env`.
async fn run_readme_block(
    name: &str,
    service: &Binary,
    dir: &Path,
    cwd: &Path,
    env: &[(&str, &str)],
) {
    let script = readme_block(name);
    let out = Command::new("bash")
        .args(["-euo", "pipefail", "-c", &script])
        .current_dir(cwd)
        .env("DIR", dir)
        .env("PID", service.pid().to_string())
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "README block {name} failed:\n{script}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The README's rotation steps, run as written against the real binary under load: the renewed
/// certificate, the client-CA rollover in its two steps, the rolled client secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_readme_rotation_steps_work_as_written() {
    let (server_ca, old_ca, new_ca) = (Ca::new(), Ca::new(), Ca::new());
    let dir = tempfile::tempdir().unwrap();
    let files = dir.path().to_owned();
    let paths = TlsPaths {
        cert: files.join("tls.crt"),
        key: files.join("tls.key"),
        client_ca: Some(files.join("client-ca.crt")),
    };
    let first = server_ca.server(1);
    std::fs::write(&paths.cert, &first.cert).unwrap();
    std::fs::write(&paths.key, &first.key).unwrap();
    std::fs::write(paths.client_ca.as_ref().unwrap(), &old_ca.pem).unwrap();
    let service = start(
        dir,
        Some(&paths),
        &["old.internal.example.com", "new.internal.example.com"],
        &[],
    )
    .await;
    let channels = LoadChannels::open(service.addr, &server_ca.pem, None, 4).await;
    service
        .connect_account(channels.channels[0].clone(), "acme")
        .await;
    let load = Load::start(&channels.channels, "acme", Some(READER_TOKEN));
    load.carries_on(200).await;

    // What the operator has at hand: the renewed pair, both CAs.
    let cwd = tempfile::tempdir().unwrap();
    let renewed = server_ca.server(2);
    std::fs::write(cwd.path().join("new.crt"), &renewed.cert).unwrap();
    std::fs::write(cwd.path().join("new.key"), &renewed.key).unwrap();
    std::fs::write(cwd.path().join("old-ca.crt"), &old_ca.pem).unwrap();
    std::fs::write(cwd.path().join("new-ca.crt"), &new_ca.pem).unwrap();

    run_readme_block("tls", &service, &files, cwd.path(), &[]).await;
    service
        .log
        .wait_for(&["the TLS certificate reloaded", "serial 02"])
        .await;
    assert_eq!(served_serial(service.addr, &server_ca.pem).await, "02");
    load.carries_on(100).await;

    let old_client = old_ca.client("old.internal.example.com");
    let new_client = new_ca.client("new.internal.example.com");
    assert!(!accepted(service.addr, &server_ca.pem, &new_client, "acme").await);
    run_readme_block("client-ca-both", &service, &files, cwd.path(), &[]).await;
    until("a new-CA client is accepted", || {
        accepted(service.addr, &server_ca.pem, &new_client, "acme")
    })
    .await;
    assert!(accepted(service.addr, &server_ca.pem, &old_client, "acme").await);
    run_readme_block("client-ca-new", &service, &files, cwd.path(), &[]).await;
    until("an old-CA client is refused", || async {
        !accepted(service.addr, &server_ca.pem, &old_client, "acme").await
    })
    .await;
    load.carries_on(100).await;

    let rolled = service.fake.roll_client_secret();
    run_readme_block(
        "client-secret",
        &service,
        &files,
        cwd.path(),
        &[("NEW_SECRET", &rolled)],
    )
    .await;
    service
        .log
        .wait_for(&["the client secret file reloaded"])
        .await;
    let before = service.fake.stats();
    CredentialServiceClient::new(channels.channels[0].clone())
        .refresh_token(with_token(
            RefreshTokenRequest {
                account: "acme".into(),
            },
            ADMIN_TOKEN,
        ))
        .await
        .expect("a refresh with the new secret");
    let after = service.fake.stats();
    assert_eq!(after.refreshes_ok, before.refreshes_ok + 1);
    assert_eq!(
        after.token_requests,
        before.token_requests + 1,
        "no rejected try first"
    );
    let secret_mode = std::fs::metadata(files.join("client-secret")).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&secret_mode.permissions()) & 0o777,
        0o600
    );
    load.carries_on(100).await;
    report("the README's steps", load.stop().await);
    channels.assert_never_reconnected();
    assert!(service.log.matching(&["not reloaded"]).is_empty());
}

// ---------------------------------------------------------------------------------------------
// SIGHUP

/// SIGHUP's default action ends a process: the handler must be in place before the service
/// answers anything. Sent at once after the first health answer (and again, and again), the
/// service keeps serving, with no callers file (nothing to reload) and with one.
#[tokio::test]
async fn sighup_at_once_after_the_first_health_answer_keeps_the_service_serving() {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    for with_callers in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let callers = dir.path().join("callers.toml");
        write_callers(&callers, &[]);
        let mut command = Command::new(BIN);
        command
            .args(["--listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(["--client-id", "cid", "--redirect-uri", REDIRECT_URI])
            .env_clear()
            .env("EDGETAG_CLIENT_SECRET", "s3cret")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if with_callers {
            command.arg("--callers-file").arg(&callers);
        }
        let mut child = command.spawn().unwrap();
        let pid = rustix::process::Pid::from_raw(child.id().unwrap() as i32).unwrap();
        let log = Log::follow(&mut child);
        let serving = log.wait_for(&["credential-service serving"]).await;
        let addr = serving
            .split(" addr=")
            .nth(1)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .to_owned();
        let channel = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_lazy();
        let check = || {
            let mut health = HealthClient::new(channel.clone());
            async move {
                health
                    .check(HealthCheckRequest {
                        service: String::new(),
                    })
                    .await
                    .map(|r| r.into_inner().status)
            }
        };
        let first = check().await.expect("a first health answer");
        rustix::process::kill_process(pid, rustix::process::Signal::HUP).unwrap();
        assert_eq!(first, 1, "SERVING");
        for _ in 0..3 {
            rustix::process::kill_process(pid, rustix::process::Signal::HUP).unwrap();
        }
        let needle = match with_callers {
            true => "the callers file reloaded",
            false => "SIGHUP: nothing to re-read",
        };
        log.wait_for(&[needle]).await;
        assert_eq!(check().await.expect("still serving"), 1);
        assert!(child.try_wait().unwrap().is_none(), "the process is alive");
        child.kill().await.unwrap();
    }
}

// ---------------------------------------------------------------------------------------------
// EdgeTag's client secret (in process: the test's clock decides when tokens need a refresh)

/// A service whose client secret comes from a file in a directory of its own.
async fn secret_app(reload_interval: Duration) -> (TestApp, PathBuf, ClientSecret, TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("client-secret");
    std::fs::write(&file, format!("{}\n", FakeConfig::default().client_secret)).unwrap();
    let secret = ClientSecret::from_file(&file).unwrap();
    let app = TestApp::spawn_with(Options {
        client_secret: Some(secret.clone()),
        reload_interval,
        ..Default::default()
    })
    .await;
    (app, file, secret, dir)
}

fn status_of(info: &credential_service::proto::AccountInfo) -> &'static str {
    info.status().as_str_name()
}

async fn describe(app: &TestApp, account: &str) -> credential_service::proto::AccountInfo {
    app.client
        .clone()
        .describe_account(DescribeAccountRequest {
            account: account.into(),
        })
        .await
        .unwrap()
        .into_inner()
}

/// GetToken in a loop from `n` tasks on the harness's client.
fn in_process_load(app: &TestApp, account: &str, n: usize) -> Load {
    let channels: Vec<Channel> = (0..n.div_ceil(2))
        .map(|_| {
            Channel::from_shared(format!("http://{}", app.addr))
                .unwrap()
                .connect_lazy()
        })
        .collect();
    Load::start(&channels, account, None)
}

/// The secret is rolled at EdgeTag and the new one reaches the file before the service has looked
/// at it: the refresh that EdgeTag rejects re-reads the file and is asked again with the new
/// secret before anyone is told. Callers see nothing, the account never needs re-authorization.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rolled_client_secret_is_taken_from_the_file_by_the_rejected_refresh_itself() {
    // The reloader would look only in an hour: the rejected request is what finds the new secret.
    let (app, file, secret, _dir) = secret_app(Duration::from_secs(3600)).await;
    app.connect("acme").await;
    let load = in_process_load(&app, "acme", 8);
    load.carries_on(200).await;

    let rolled = app.fake.roll_client_secret();
    std::fs::write(&file, format!("{rolled}\n")).unwrap();
    let before = app.fake.stats();
    // Into the refresh margin: the next GetToken refreshes.
    app.clock.advance(Duration::from_secs(7200 - 60));
    until("the refresh with the new secret", || async {
        app.fake.stats().refreshes_ok > before.refreshes_ok
    })
    .await;
    load.carries_on(200).await;
    report("client secret rolled, then the new file", load.stop().await);

    let after = app.fake.stats();
    assert_eq!(after.refreshes_ok, before.refreshes_ok + 1);
    assert_eq!(
        after.token_requests,
        before.token_requests + 2,
        "one request refused with the old secret, one accepted with the new"
    );
    assert_eq!(secret.current().expose_secret(), rolled);
    assert_eq!(
        status_of(&describe(&app, "acme").await),
        "ACCOUNT_STATUS_ACTIVE"
    );
    // The token served is the one just issued (real time goes on under the test's clock).
    let token = app.get_token("acme").await.unwrap();
    assert!(app.fake.access_token_is_valid(&token.access_token));
    assert!(app.seconds_left(token.expires_at) > 7200 - 60);
}

/// The secret is rolled at EdgeTag but the file still holds the old one: the refresh fails with
/// the status it always had for rejected client credentials, and the account is not marked as
/// needing re-authorization. Once the new secret is in the file, the reloader takes it up and the
/// next refresh succeeds with it at the first try.
#[tokio::test]
async fn with_the_file_not_yet_changed_a_rejected_secret_is_todays_status_until_the_file_is() {
    let (app, file, secret, _dir) = secret_app(Duration::from_millis(50)).await;
    app.connect("acme").await;
    let rolled = app.fake.roll_client_secret();
    app.clock.advance(Duration::from_secs(7200 + 60)); // the token has expired
    assert_status(
        app.get_token("acme").await,
        Code::Internal,
        "EdgeTag rejected this service's client credentials; an operator must check the configured client id and client secret",
    );
    let info = describe(&app, "acme").await;
    assert_eq!(status_of(&info), "ACCOUNT_STATUS_REFRESHING_FAILED");
    assert_ne!(status_of(&info), "ACCOUNT_STATUS_NEEDS_REAUTH");

    std::fs::write(&file, format!("{rolled}\n")).unwrap();
    until("the reloader takes the new secret up", || async {
        secret.current().expose_secret() == rolled
    })
    .await;
    let before = app.fake.stats();
    app.clock.advance(Duration::from_secs(60)); // past the back-off
    let token = app.get_token("acme").await.unwrap();
    assert!(app.fake.access_token_is_valid(&token.access_token));
    let after = app.fake.stats();
    assert_eq!(
        after.token_requests,
        before.token_requests + 1,
        "no rejected try first"
    );
    assert_eq!(
        status_of(&describe(&app, "acme").await),
        "ACCOUNT_STATUS_ACTIVE"
    );
}

/// The callers file is taken up when its content changes, without a SIGHUP.
#[tokio::test]
async fn a_changed_callers_file_is_taken_up_without_a_signal() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("callers.toml");
    write_callers(&path, &[]);
    let callers = credential_service::auth::Callers::load(&path).unwrap();
    let app = TestApp::spawn_with(Options {
        callers,
        token: Some(ADMIN_TOKEN.into()),
        reload_interval: Duration::from_millis(50),
        ..Default::default()
    })
    .await;
    app.connect("acme").await;
    let reader = |token: &'static str| {
        let client = app.client_with_token(Some(token));
        async move {
            let mut client = client;
            client
                .get_token(GetTokenRequest {
                    account: "acme".into(),
                    min_validity: None,
                })
                .await
                .map(|_| ())
                .map_err(|s| s.code())
        }
    };
    assert_eq!(
        reader("next-reader-token").await,
        Err(Code::Unauthenticated)
    );
    let hash = hex::encode(Sha256::digest(b"next-reader-token"));
    let mut text = std::fs::read_to_string(&path).unwrap();
    text += &format!(
        "[[caller]]\nname = \"next\"\ntoken_sha256 = \"{hash}\"\nrole = \"reader\"\naccounts = [\"*\"]\n"
    );
    replace(&path, &text);
    until("the new caller is known", || async {
        reader("next-reader-token").await.is_ok()
    })
    .await;
    assert_eq!(reader(READER_TOKEN).await, Ok(()));
}

// ---------------------------------------------------------------------------------------------
// The PostgreSQL password

/// The role's password is changed in the database and in the password file; the sessions open
/// until then are cut (as a server restart or a network blip would). New connections log in with
/// the new password: the service goes on writing without a restart, and GetToken never fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_store_password_is_used_by_the_connections_made_after_it() {
    let cluster = pg_cluster::Cluster::shared();
    let db = cluster.create_database();
    let role = format!("{}_svc", db.name());
    let admin = db.connect().await;
    admin
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN PASSWORD 'first-password'; ALTER DATABASE {} OWNER TO {role}",
            db.name()
        ))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let password = dir.path().join("store-password");
    std::fs::write(&password, "first-password\n").unwrap();
    let store = format!(
        "postgres://{role}@127.0.0.1:{}/{}?sslmode=disable",
        cluster.port(),
        db.name()
    );
    let password_arg = password.to_str().unwrap().to_owned();
    let service = start(
        dir,
        None,
        &[],
        &["--store", &store, "--store-password-file", &password_arg],
    )
    .await;
    let channel = Channel::from_shared(format!("http://{}", service.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    service.connect_account(channel.clone(), "acme").await;
    let load = Load::start(std::slice::from_ref(&channel), "acme", Some(READER_TOKEN));
    load.carries_on(100).await;

    admin
        .batch_execute(&format!("ALTER ROLE {role} PASSWORD 'second-password'"))
        .await
        .unwrap();
    replace(&password, "second-password\n");
    admin
        .batch_execute(&format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}'"
        ))
        .await
        .unwrap();
    // Writes need new connections: they log in with the new password (a write that met a cut
    // session before the pool noticed may fail; the next one is what counts).
    until("a write after the rotation", || async {
        let mut client = CredentialServiceClient::new(channel.clone());
        client
            .begin_auth(with_token(
                BeginAuthRequest {
                    account: "globex".into(),
                },
                ADMIN_TOKEN,
            ))
            .await
            .is_ok()
    })
    .await;
    service.connect_account(channel.clone(), "globex").await;
    let sessions = admin
        .query_one(
            &format!("SELECT count(*) FROM pg_stat_activity WHERE usename = '{role}'"),
            &[],
        )
        .await
        .unwrap()
        .get::<_, i64>(0);
    assert!(sessions > 0, "the service is logged in again");
    load.carries_on(100).await;
    report("store password", load.stop().await);
    assert!(
        service
            .log
            .matching(&["password authentication failed"])
            .is_empty()
    );
}
