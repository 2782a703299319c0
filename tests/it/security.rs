//! Who may call, what is stored, and how: callers and roles, account globs, the callers-file
//! reload, TLS and mutual TLS with certificates made here, nothing secret on disk, records that
//! cannot be swapped, and key rotation with the real `rotate-keys` command.

use crate::common;

use std::{path::Path, process::Stdio, time::Duration};

use common::{Bearer, Client, Options, StoreKind, TestApp, assert_status};
use credential_service::{
    auth::Callers,
    proto::{
        BeginAuthRequest, GetTokenRequest, credential_service_client::CredentialServiceClient,
    },
    sealing::{self, EncryptionConfig},
    server::{ServeError, Service},
    tls::{ServerTls, TlsFiles},
};
use futures::TryStreamExt;
use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};
use sha2::{Digest, Sha256};
use tempfile::TempDir;
use tonic::{
    Code,
    transport::{Certificate, Channel, ClientTlsConfig, Identity},
};

common::on_both_stores! {
    #[tokio::test]
    calls_without_or_with_a_wrong_token_are_unauthenticated,
    a_reader_may_only_get_tokens_and_only_for_its_accounts,
    admins_are_limited_to_their_account_globs_too,
    health_and_reflection_stay_open_without_a_token,
    a_reload_swaps_the_callers_file_and_a_bad_one_keeps_the_old,
    no_token_verifier_or_code_reaches_the_data_directory_in_the_clear,
    records_swapped_between_accounts_are_refused_not_served,
    key_rotation_keeps_every_account_serving,
    tls_serves_token_callers_and_mtls_names_callers_by_certificate,
    a_wildcard_client_certificate_names_no_caller_and_only_the_exact_name_does,
    tls_refuses_plaintext_and_certificates_from_another_ca,
    admin_rpcs_need_the_admin_role_and_respect_account_globs,
}

const ADMIN: &str = "admin-token-3f9a7c";
const READER: &str = "reader-token-81bd22";
const ACME_ADMIN: &str = "acme-admin-token-55e0";

fn sha256_hex(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

fn callers_toml(reader_token: &str) -> String {
    format!(
        r#"
[[caller]]
name = "ops"
token_sha256 = "{}"
role = "admin"
accounts = ["*"]

[[caller]]
name = "billing"
token_sha256 = "{}"
role = "reader"
accounts = ["acme-*"]

[[caller]]
name = "acme-ops"
token_sha256 = "{}"
role = "admin"
accounts = ["acme-*"]

[[caller]]
name = "ops-mtls"
tls_san = "ops.internal.example.com"
role = "admin"
accounts = ["*"]
"#,
        sha256_hex(ADMIN),
        sha256_hex(reader_token),
        sha256_hex(ACME_ADMIN),
    )
}

/// A callers file in its own directory, and its loaded [`Callers`].
fn callers_file(reader_token: &str) -> (TempDir, std::path::PathBuf, Callers) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("callers.toml");
    std::fs::write(&path, callers_toml(reader_token)).unwrap();
    let callers = Callers::load(&path).unwrap();
    (dir, path, callers)
}

/// A server with the callers file; its harness client is the all-accounts admin.
async fn secured() -> (TestApp, TempDir, std::path::PathBuf, Callers) {
    let (dir, path, callers) = callers_file(READER);
    let app = TestApp::spawn_with(Options {
        callers: callers.clone(),
        token: Some(ADMIN.into()),
        ..Default::default()
    })
    .await;
    (app, dir, path, callers)
}

async fn get_token(client: &Client, account: &str) -> Result<String, tonic::Status> {
    client
        .clone()
        .get_token(GetTokenRequest {
            account: account.into(),
            min_validity: None,
        })
        .await
        .map(|r| r.into_inner().access_token)
}

async fn begin(client: &Client, account: &str) -> Result<String, tonic::Status> {
    client
        .clone()
        .begin_auth(BeginAuthRequest {
            account: account.into(),
        })
        .await
        .map(|r| r.into_inner().state)
}

async fn calls_without_or_with_a_wrong_token_are_unauthenticated() {
    let (app, _dir, _path, _callers) = secured().await;
    app.connect("acme-1").await;
    for token in [None, Some("wrong-token"), Some("")] {
        let client = app.client_with_token(token);
        assert_status(
            get_token(&client, "acme-1").await,
            Code::Unauthenticated,
            "",
        );
        assert_status(begin(&client, "acme-1").await, Code::Unauthenticated, "");
    }
    // The right token, for contrast.
    assert!(
        get_token(&app.client_with_token(Some(READER)), "acme-1")
            .await
            .is_ok()
    );
}

async fn a_reader_may_only_get_tokens_and_only_for_its_accounts() {
    let (app, _dir, _path, _callers) = secured().await;
    app.connect("acme-1").await;
    app.connect("globex").await;
    let reader = app.client_with_token(Some(READER));

    let token = get_token(&reader, "acme-1").await.unwrap();
    assert!(app.fake.access_token_is_valid(&token));
    assert_status(
        begin(&reader, "acme-1").await,
        Code::PermissionDenied,
        "BeginAuth needs the admin role",
    );
    let (code, state) = app.authorize("acme-2").await;
    let denied = reader
        .clone()
        .complete_auth(credential_service::proto::CompleteAuthRequest { code, state })
        .await;
    assert_status(denied, Code::PermissionDenied, "admin role");

    // Another team's account: the same answer whether it exists (globex) or not (initech).
    let existing = assert_status(
        get_token(&reader, "globex").await,
        Code::PermissionDenied,
        "",
    );
    let missing = assert_status(
        get_token(&reader, "initech").await,
        Code::PermissionDenied,
        "",
    );
    assert_eq!(
        existing.message().replace("globex", "X"),
        missing.message().replace("initech", "X")
    );
    // Not even the account's existence inside the reader's own globs is told before the check.
    assert_status(get_token(&reader, "acme-9").await, Code::NotFound, "");
}

async fn admins_are_limited_to_their_account_globs_too() {
    let (app, _dir, _path, _callers) = secured().await;
    app.connect("globex").await;
    let acme_admin = app.client_with_token(Some(ACME_ADMIN));
    assert!(begin(&acme_admin, "acme-7").await.is_ok());
    assert_status(
        begin(&acme_admin, "globex").await,
        Code::PermissionDenied,
        "may not use account globex",
    );
    assert_status(
        get_token(&acme_admin, "globex").await,
        Code::PermissionDenied,
        "may not use account globex",
    );
}

async fn health_and_reflection_stay_open_without_a_token() {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let (app, _dir, _path, _callers) = secured().await;
    let channel = Channel::from_shared(format!("http://{}", app.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let health = HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: "credential.v1.CredentialService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(health.status, 1); // SERVING

    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        answers.message().await.unwrap().unwrap().message_response
    else {
        panic!("not a service list")
    };
    assert!(
        list.service
            .iter()
            .any(|s| s.name == "credential.v1.CredentialService")
    );
}

async fn a_reload_swaps_the_callers_file_and_a_bad_one_keeps_the_old() {
    let (app, _dir, path, callers) = secured().await;
    app.connect("acme-1").await;
    let (old, new) = (
        app.client_with_token(Some(READER)),
        app.client_with_token(Some("rotated-reader-token")),
    );
    assert!(get_token(&old, "acme-1").await.is_ok());

    std::fs::write(&path, callers_toml("rotated-reader-token")).unwrap();
    assert_eq!(callers.reload().unwrap(), 4);
    assert!(get_token(&new, "acme-1").await.is_ok());
    assert_status(get_token(&old, "acme-1").await, Code::Unauthenticated, "");

    std::fs::write(&path, "[[caller]]\nname = \"broken\"\n").unwrap();
    let e = callers.reload().unwrap_err().to_string();
    assert!(e.contains("invalid"), "{e}");
    assert!(
        get_token(&new, "acme-1").await.is_ok(),
        "the old file stays"
    );
}

async fn no_token_verifier_or_code_reaches_the_data_directory_in_the_clear() {
    let app = TestApp::spawn().await;
    let mut access_tokens = Vec::new();
    for account in ["acme", "globex"] {
        app.connect(account).await;
        access_tokens.push(app.get_token(account).await.unwrap().access_token);
    }
    app.clock.advance(Duration::from_secs(7200)); // a refresh: new tokens written
    access_tokens.push(app.get_token("acme").await.unwrap().access_token);
    let (code, state) = app.authorize("pending-one").await; // a pending verifier on disk
    let (fake, _clock, data_dir, options) = app.stop().await;
    let mut secrets = access_tokens;
    secrets.extend(fake.issued_refresh_tokens());
    secrets.extend(fake.received_code_verifiers());
    secrets.push(code);
    secrets.push(state);
    assert!(secrets.len() >= 9, "{}", secrets.len());
    assert!(secrets.iter().all(|s| s.len() >= 16));

    let (files, contents) = stored(data_dir.path()).await;
    assert!(
        contents
            .iter()
            .any(|c| c.windows(6).any(|w| w == b"globex")),
        "the scan sees the records (account names are keys, in the clear)"
    );
    for secret in &secrets {
        for (file, content) in files.iter().zip(&contents) {
            assert!(
                !content
                    .windows(secret.len())
                    .any(|w| w == secret.as_bytes()),
                "{}... found in {file}",
                &secret[..4],
            );
        }
    }
    // And the key is not in the data directory.
    let key = std::fs::read_to_string(options.encryption.key_file.unwrap()).unwrap();
    assert!(!contents.iter().any(|c| {
        c.windows(key.trim().len())
            .any(|w| w == key.trim().as_bytes())
    }));
}

/// Where the store keeps what it holds, and those bytes: every file in the data directory, and
/// on PostgreSQL also every table of the test's database, as `COPY … (FORMAT binary)` gives it
/// (text and bytea values exactly as stored).
async fn stored(data_dir: &Path) -> (Vec<String>, Vec<Vec<u8>>) {
    let files = all_files(data_dir);
    let mut names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    let mut contents: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
    if common::store_kind() == StoreKind::Postgres {
        let db = common::postgres_database(data_dir).connect().await;
        let tables = db
            .query(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public'",
                &[],
            )
            .await
            .unwrap();
        assert!(tables.len() >= 2, "accounts and pending, at least");
        for row in tables {
            let table: String = row.get(0);
            let copy = db
                .copy_out(&format!("COPY {table} TO STDOUT (FORMAT binary)"))
                .await
                .unwrap();
            let chunks: Vec<_> = copy.try_collect().await.unwrap();
            names.push(format!("PostgreSQL table {table}"));
            contents.push(chunks.concat());
        }
    }
    (names, contents)
}

fn all_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(all_files(&path));
        } else {
            files.push(path);
        }
    }
    files
}

async fn records_swapped_between_accounts_are_refused_not_served() {
    let app = TestApp::spawn().await;
    app.connect("acme").await;
    app.connect("globex").await;
    let (fake, clock, data_dir, options) = app.stop().await;
    match common::store_kind() {
        StoreKind::Sled => {
            let db = ::sled::open(data_dir.path()).unwrap();
            let accounts = db.open_tree("accounts").unwrap();
            let acme = accounts.get("acme").unwrap().unwrap();
            let globex = accounts.get("globex").unwrap().unwrap();
            accounts.insert("acme", globex).unwrap();
            accounts.insert("globex", acme).unwrap();
            db.flush().unwrap();
        }
        StoreKind::Postgres => {
            let db = common::postgres_database(data_dir.path()).connect().await;
            let swapped = db
                .execute(
                    "UPDATE accounts SET sealed = other.sealed FROM accounts other \
                     WHERE accounts.account IN ('acme', 'globex') \
                     AND other.account IN ('acme', 'globex') \
                     AND other.account <> accounts.account",
                    &[],
                )
                .await
                .unwrap();
            assert_eq!(swapped, 2);
        }
    }
    let config = common::service_config(&fake, data_dir.path().to_owned(), &options);
    let e = Service::start(config, clock)
        .await
        .err()
        .expect("the service refuses to start");
    assert!(matches!(e, ServeError::Store(_)), "{e}");
    let text = e.to_string();
    assert!(
        text.contains("accounts") && text.contains("does not open"),
        "{text}"
    );
}

fn key_file(dir: &Path, name: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    sealing::create_key_file(&path).unwrap();
    path
}

async fn key_rotation_keeps_every_account_serving() {
    let keys = tempfile::tempdir().unwrap();
    let (a, b) = (
        key_file(keys.path(), "a.key"),
        key_file(keys.path(), "b.key"),
    );
    let with_keys = |current: &Path, previous: &[&Path]| Options {
        encryption: EncryptionConfig {
            key_file: Some(current.to_owned()),
            previous_key_files: previous.iter().map(|p| p.to_path_buf()).collect(),
        },
        ..Default::default()
    };
    let app = TestApp::spawn_with(with_keys(&a, &[])).await;
    let accounts = ["acme", "globex", "initech"];
    for account in accounts {
        app.connect(account).await;
    }
    let (fake, clock, data_dir, _) = app.stop().await;

    // B alone cannot open A's records, and says which key is missing.
    let config = common::service_config(&fake, data_dir.path().to_owned(), &with_keys(&b, &[]));
    let e = Service::start(config, clock.clone())
        .await
        .err()
        .expect("the service refuses to start")
        .to_string();
    assert!(e.contains("--previous-encryption-key-file"), "{e}");

    // B with A as previous serves everything.
    let app = TestApp::start(
        fake.clone(),
        clock.clone(),
        data_dir.clone(),
        with_keys(&b, &[&a]),
    )
    .await;
    for account in accounts {
        app.get_token(account).await.unwrap();
    }
    let (fake, clock, data_dir, _) = app.stop().await;

    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_credential-service"))
        .args(["rotate-keys", "--data-dir"])
        .arg(data_dir.path())
        .args(common::store_args(data_dir.path()))
        .arg("--encryption-key-file")
        .arg(&b)
        .arg("--previous-encryption-key-file")
        .arg(&a)
        .env_clear()
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap();
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("3 record(s) re-sealed"), "{err}");

    // A is retired: B alone now serves every account.
    std::fs::remove_file(&a).unwrap();
    let app = TestApp::start(fake, clock, data_dir, with_keys(&b, &[])).await;
    for account in accounts {
        let token = app.get_token(account).await.unwrap().access_token;
        assert!(app.fake.access_token_is_valid(&token));
    }
}

/// A CA, a server certificate for 127.0.0.1/localhost, and client certificates.
struct Pki {
    ca_params: CertificateParams,
    ca_key: KeyPair,
    ca_pem: String,
}

impl Pki {
    fn new() -> Self {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_pem = ca_params.self_signed(&ca_key).unwrap().pem();
        Self {
            ca_params,
            ca_key,
            ca_pem,
        }
    }

    /// (certificate PEM, key PEM) for `names`.
    fn leaf(&self, names: &[&str], usage: ExtendedKeyUsagePurpose) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.extended_key_usages = vec![usage];
        let issuer = Issuer::from_params(&self.ca_params, &self.ca_key);
        let cert = params.signed_by(&key, &issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

async fn tls_app(pki: &Pki) -> TestApp {
    let (cert, key) = pki.leaf(
        &["localhost", "127.0.0.1"],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let (dir, _path, callers) = callers_file(READER);
    let files = TlsFiles {
        cert: dir.path().join("cert.pem"),
        key: dir.path().join("key.pem"),
        client_ca: Some(dir.path().join("ca.pem")),
    };
    std::fs::write(&files.cert, cert).unwrap();
    std::fs::write(&files.key, key).unwrap();
    std::fs::write(files.client_ca.as_ref().unwrap(), &pki.ca_pem).unwrap();
    TestApp::spawn_with(Options {
        callers,
        tls: Some(ServerTls::load(&files).unwrap()),
        ..Default::default()
    })
    .await
}

async fn tls_client(
    app: &TestApp,
    pki: &Pki,
    identity: Option<(String, String)>,
    token: Option<&str>,
) -> Result<Client, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&pki.ca_pem))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    let channel = Channel::from_shared(format!("https://{}", app.addr))
        .unwrap()
        .tls_config(tls)?
        .connect()
        .await?;
    Ok(CredentialServiceClient::with_interceptor(
        channel,
        Bearer::new(token).unwrap(),
    ))
}

async fn tls_serves_token_callers_and_mtls_names_callers_by_certificate() {
    let pki = Pki::new();
    let app = tls_app(&pki).await;

    // TLS with a bearer token, no client certificate.
    let admin = tls_client(&app, &pki, None, Some(ADMIN)).await.unwrap();
    let state = begin(&admin, "acme-1").await.unwrap();
    assert!(!state.is_empty());

    // mTLS: the certificate's SAN names the admin "ops-mtls"; no token needed.
    let ops = pki.leaf(
        &["ops.internal.example.com"],
        ExtendedKeyUsagePurpose::ClientAuth,
    );
    let mtls = tls_client(&app, &pki, Some(ops), None).await.unwrap();
    assert!(begin(&mtls, "globex").await.is_ok());

    // A valid certificate that names no caller, and no certificate and no token.
    let stranger = pki.leaf(
        &["stranger.example.com"],
        ExtendedKeyUsagePurpose::ClientAuth,
    );
    let unnamed = tls_client(&app, &pki, Some(stranger), None).await.unwrap();
    assert_status(begin(&unnamed, "globex").await, Code::Unauthenticated, "");
    let anonymous = tls_client(&app, &pki, None, None).await.unwrap();
    assert_status(
        get_token(&anonymous, "globex").await,
        Code::Unauthenticated,
        "",
    );
}

/// A CA that issues wildcards must not let `*.internal.example.com` pass for the caller named
/// `ops.internal.example.com`. The answer is UNAUTHENTICATED, not PERMISSION_DENIED: the
/// certificate identifies no caller at all, so there is nobody whose rights could be checked.
async fn a_wildcard_client_certificate_names_no_caller_and_only_the_exact_name_does() {
    let pki = Pki::new();
    let app = tls_app(&pki).await;
    let client = |names: &'static [&'static str]| {
        let (app, pki) = (&app, &pki);
        async move {
            let identity = pki.leaf(names, ExtendedKeyUsagePurpose::ClientAuth);
            tls_client(app, pki, Some(identity), None).await.unwrap()
        }
    };

    for names in [
        &["*.internal.example.com"][..],
        &["*.example.com"],
        &["ops.internal.example.com", "*.internal.example.com"],
    ] {
        let wildcard = client(names).await;
        assert_status(
            begin(&wildcard, "globex").await,
            Code::Unauthenticated,
            "wildcard",
        );
        assert_status(
            get_token(&wildcard, "globex").await,
            Code::Unauthenticated,
            "wildcard",
        );
    }
    // A longer or shorter name under the same domain is another name.
    for names in [
        &["x.ops.internal.example.com"][..],
        &["internal.example.com"],
    ] {
        let other = client(names).await;
        assert_status(begin(&other, "globex").await, Code::Unauthenticated, "");
    }
    // The exact name works, in any ASCII case.
    for names in [
        &["ops.internal.example.com"][..],
        &["OPS.Internal.Example.COM"],
    ] {
        let exact = client(names).await;
        assert!(begin(&exact, "globex").await.is_ok(), "{names:?}");
    }
}

async fn tls_refuses_plaintext_and_certificates_from_another_ca() {
    let pki = Pki::new();
    let app = tls_app(&pki).await;

    let plain = app.client_with_token(Some(ADMIN));
    assert!(begin(&plain, "acme-1").await.is_err());

    let other = Pki::new();
    let forged = other.leaf(
        &["ops.internal.example.com"],
        ExtendedKeyUsagePurpose::ClientAuth,
    );
    let refused = match tls_client(&app, &pki, Some(forged), None).await {
        Err(_) => true, // the handshake failed
        Ok(client) => begin(&client, "acme-1").await.is_err(),
    };
    assert!(refused);

    // A client that does not trust the server's CA refuses it.
    let distrustful = Channel::from_shared(format!("https://{}", app.addr))
        .unwrap()
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(&other.ca_pem))
                .domain_name("localhost"),
        )
        .unwrap()
        .connect()
        .await;
    assert!(distrustful.is_err());
}

async fn admin_rpcs_need_the_admin_role_and_respect_account_globs() {
    use credential_service::proto::{
        DescribeAccountRequest, ListAccountsRequest, RefreshTokenRequest, RemoveAccountRequest,
    };
    let (app, _dir, _path, _callers) = secured().await;
    app.connect("acme-1").await;
    app.connect("globex").await;
    let list = |client: Client| async move {
        client
            .clone()
            .list_accounts(ListAccountsRequest::default())
            .await
            .map(|r| {
                r.into_inner()
                    .accounts
                    .into_iter()
                    .map(|a| a.account)
                    .collect::<Vec<_>>()
            })
    };

    // A reader may not call any admin RPC, even for its own accounts.
    let reader = app.client_with_token(Some(READER));
    assert_status(
        list(reader.clone()).await,
        Code::PermissionDenied,
        "permission denied",
    );
    let describe = reader
        .clone()
        .describe_account(DescribeAccountRequest {
            account: "acme-1".into(),
        })
        .await;
    assert_status(describe, Code::PermissionDenied, "permission denied");
    let refresh = reader
        .clone()
        .refresh_token(RefreshTokenRequest {
            account: "acme-1".into(),
        })
        .await;
    assert_status(refresh, Code::PermissionDenied, "permission denied");

    // An admin limited to acme-* sees and touches only those, and learns nothing of the others.
    let acme_admin = app.client_with_token(Some(ACME_ADMIN));
    assert_eq!(list(acme_admin.clone()).await.unwrap(), vec!["acme-1"]);
    for account in ["globex", "no-such-account"] {
        let removed = acme_admin
            .clone()
            .remove_account(RemoveAccountRequest {
                account: account.into(),
                force: true,
            })
            .await;
        let status = assert_status(removed, Code::PermissionDenied, "may not use account");
        assert!(!status.message().contains("not connected"));
    }
    assert!(
        get_token(&app.client_with_token(Some(ADMIN)), "globex")
            .await
            .is_ok()
    );

    // The all-accounts admin sees everything.
    assert_eq!(
        list(app.client_with_token(Some(ADMIN))).await.unwrap(),
        vec!["acme-1", "globex"]
    );
}
