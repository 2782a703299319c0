//! Callers without a shared secret (issue 27): JWTs from an `[[issuer]]` whose keys the test
//! makes (RSA, P-256, Ed25519) and serves as a JWKS over real HTTPS on loopback, and client
//! certificates naming SPIFFE IDs. Each rule has an attacker's test that fails without it.

use crate::common;

use std::{
    path::Path,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use base64::Engine as _;
use common::{Client, Options, TestApp, assert_status};
use credential_service::{
    auth::Callers,
    proto::GetTokenRequest,
    tls::{ServerTls, TlsFiles},
};
use futures::StreamExt as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, SanType,
};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tempfile::TempDir;
use tonic::{
    Code,
    transport::{Certificate, Channel, ClientTlsConfig, Identity},
};

const ADMIN: &str = "admin-token-identity-7d1e";
const ISS: &str = "https://kubernetes.default.svc.cluster.local";
const AUDIENCE: &str = "credential-service";
const SUBJECT: &str = "system:serviceaccount:billing:billing-api";
const SPIFFE_ID: &str = "spiffe://cluster.local/ns/billing/sa/billing-api";

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A signing key made here: how to sign with it, and its public JWK.
#[derive(Clone)]
struct SigningKey {
    kid: String,
    alg: Algorithm,
    encoding: EncodingKey,
    jwk: Value,
    /// The public key in PEM (RSA only): what a confusion attack uses as an HMAC secret.
    public_pem: Option<String>,
}

/// One RSA key per test process: 2048-bit generation is the slow part.
fn rsa_key(kid: &str) -> SigningKey {
    use rsa::{
        pkcs1::EncodeRsaPrivateKey, pkcs8::EncodePublicKey, pkcs8::LineEnding,
        traits::PublicKeyParts,
    };
    static KEY: OnceLock<rsa::RsaPrivateKey> = OnceLock::new();
    let key = KEY.get_or_init(|| rsa::RsaPrivateKey::new(&mut rand_core::OsRng, 2048).unwrap());
    let der = key.to_pkcs1_der().unwrap();
    SigningKey {
        kid: kid.into(),
        alg: Algorithm::RS256,
        encoding: EncodingKey::from_rsa_der(der.as_bytes()),
        jwk: json!({
            "kty": "RSA", "kid": kid, "use": "sig",
            "n": b64(&key.n().to_bytes_be()), "e": b64(&key.e().to_bytes_be()),
        }),
        public_pem: Some(
            key.to_public_key()
                .to_public_key_pem(LineEnding::LF)
                .unwrap(),
        ),
    }
}

fn ec_key(kid: &str) -> SigningKey {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let point = key.public_key_raw(); // 0x04 || x || y
    SigningKey {
        kid: kid.into(),
        alg: Algorithm::ES256,
        encoding: EncodingKey::from_ec_der(&key.serialize_der()),
        jwk: json!({
            "kty": "EC", "kid": kid, "crv": "P-256",
            "x": b64(&point[1..33]), "y": b64(&point[33..65]),
        }),
        public_pem: None,
    }
}

fn ed_key(kid: &str) -> SigningKey {
    let key = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    SigningKey {
        kid: kid.into(),
        alg: Algorithm::EdDSA,
        encoding: EncodingKey::from_ed_der(&key.serialize_der()),
        jwk: json!({"kty": "OKP", "kid": kid, "crv": "Ed25519", "x": b64(key.public_key_raw())}),
        public_pem: None,
    }
}

/// Claims of a good token for `SUBJECT`, valid for an hour.
fn claims() -> Value {
    let now = now();
    json!({
        "iss": ISS, "aud": [AUDIENCE, "other"], "sub": SUBJECT,
        "iat": now, "nbf": now, "exp": now + 3600,
    })
}

fn sign_as(key: &SigningKey, alg: Algorithm, claims: &Value) -> String {
    let mut header = Header::new(alg);
    header.kid = Some(key.kid.clone());
    jsonwebtoken::encode(&header, claims, &key.encoding).unwrap()
}

fn sign(key: &SigningKey, claims: &Value) -> String {
    sign_as(key, key.alg, claims)
}

/// A JWKS endpoint over HTTPS on loopback, serving what the test says and counting fetches.
struct JwksServer {
    url: String,
    ca_pem: String,
    keys: Arc<Mutex<Vec<Value>>>,
    fetches: Arc<AtomicUsize>,
    down: Arc<AtomicBool>,
    /// When set, fetches without `authorization: Bearer <this>` get 401.
    needs_bearer: Arc<Mutex<Option<String>>>,
}

impl JwksServer {
    async fn start(keys: &[&SigningKey]) -> Self {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
        let leaf_key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec!["127.0.0.1".to_string()])
            .unwrap()
            .signed_by(&leaf_key, &Issuer::from_params(&ca, &ca_key))
            .unwrap();
        let tls = tokio_rustls::rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.der().clone()],
                rustls_pki_types::PrivateKeyDer::try_from(leaf_key.serialize_der()).unwrap(),
            )
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = Self {
            url: format!("https://{addr}/openid/v1/jwks"),
            ca_pem,
            keys: Arc::new(Mutex::new(keys.iter().map(|k| k.jwk.clone()).collect())),
            fetches: Arc::default(),
            down: Arc::default(),
            needs_bearer: Arc::default(),
        };
        let (served, fetches, down, needs_bearer) = (
            server.keys.clone(),
            server.fetches.clone(),
            server.down.clone(),
            server.needs_bearer.clone(),
        );
        let app = axum::Router::new().route(
            "/openid/v1/jwks",
            axum::routing::get(move |headers: axum::http::HeaderMap| {
                let (served, fetches, down) = (served.clone(), fetches.clone(), down.clone());
                let needed = needs_bearer.lock().unwrap().clone();
                async move {
                    fetches.fetch_add(1, Ordering::SeqCst);
                    if down.load(Ordering::SeqCst) {
                        return Err(axum::http::StatusCode::SERVICE_UNAVAILABLE);
                    }
                    if let Some(token) = needed {
                        let sent = headers.get("authorization").and_then(|v| v.to_str().ok());
                        if sent != Some(format!("Bearer {token}").as_str()) {
                            return Err(axum::http::StatusCode::UNAUTHORIZED);
                        }
                    }
                    let keys = served.lock().unwrap().clone();
                    Ok((
                        [(axum::http::header::CONTENT_TYPE, "application/json")],
                        json!({ "keys": keys }).to_string(),
                    ))
                }
            }),
        );
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let (acceptor, app) = (acceptor.clone(), app.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(
                            hyper_util::rt::TokioIo::new(tls),
                            hyper_util::service::TowerToHyperService::new(app),
                        )
                        .await;
                });
            }
        });
        server
    }

    fn serve(&self, keys: &[&SigningKey]) {
        *self.keys.lock().unwrap() = keys.iter().map(|k| k.jwk.clone()).collect();
    }

    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

/// The callers file: an admin with a static token, the cluster issuer (at `jwks`: a URL with
/// its CA, or a file), the JWT caller `billing-api` (reader of `acme-*`), and the SPIFFE caller
/// `billing-mesh`.
fn callers_toml(jwks: &str) -> String {
    format!(
        r#"
[[issuer]]
name = "cluster"
issuer = "{ISS}"
{jwks}
audiences = ["{AUDIENCE}"]

[[caller]]
name = "ops"
token_sha256 = "{admin}"
role = "admin"
accounts = ["*"]

[[caller]]
name = "billing-api"
jwt = {{ issuer = "cluster", subject = "{SUBJECT}" }}
role = "reader"
accounts = ["acme-*"]

[[caller]]
name = "billing-mesh"
tls_spiffe_id = "{SPIFFE_ID}"
role = "reader"
accounts = ["acme-*"]
"#,
        admin = hex::encode(Sha256::digest(ADMIN)),
    )
}

struct World {
    app: TestApp,
    jwks: JwksServer,
    dir: TempDir,
    /// The callers file's `jwks_uri`, `ca_file` and `token_file` lines.
    source: String,
}

/// A server whose issuer's keys come from a [`JwksServer`] serving `keys`; `acme-1` connected.
async fn world(keys: &[&SigningKey]) -> World {
    world_with(keys, |_| {}).await
}

async fn world_with(keys: &[&SigningKey], before_start: impl FnOnce(&JwksServer)) -> World {
    let jwks = JwksServer::start(keys).await;
    before_start(&jwks);
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.crt");
    std::fs::write(&ca, &jwks.ca_pem).unwrap();
    // The service's own token, sent with every fetch (a server may ask for it: `needs_bearer`).
    let token = dir.path().join("token");
    std::fs::write(&token, "service-own-token-4a1f\n").unwrap();
    let source = format!(
        "jwks_uri = \"{}\"\nca_file = \"{}\"\ntoken_file = \"{}\"",
        jwks.url,
        ca.display(),
        token.display()
    );
    let callers = load(dir.path(), &callers_toml(&source));
    let app = TestApp::spawn_with(Options {
        callers,
        token: Some(ADMIN.into()),
        ..Default::default()
    })
    .await;
    app.connect("acme-1").await;
    World {
        app,
        jwks,
        dir,
        source,
    }
}

fn load(dir: &Path, toml: &str) -> Callers {
    let path = dir.join("callers.toml");
    std::fs::write(&path, toml).unwrap();
    Callers::load(&path).unwrap()
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

/// GetToken for `acme-1` with `token` as the bearer.
async fn call(app: &TestApp, token: &str) -> Result<String, tonic::Status> {
    get_token(&app.client_with_token(Some(token)), "acme-1").await
}

/// Polls until a call with `token` succeeds (the issuer's keys arrive in the background).
async fn until_accepted(app: &TestApp, token: &str, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        match call(app, token).await {
            Ok(_) => return,
            Err(status) => {
                assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                assert!(Instant::now() < deadline, "still refused: {status:?}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

#[tokio::test]
async fn jwt_callers_of_each_key_type_get_tokens_for_their_accounts_only() {
    let (rsa, ec, ed) = (rsa_key("rsa-1"), ec_key("ec-1"), ed_key("ed-1"));
    let w = world(&[&rsa, &ec, &ed]).await;
    let first = sign(&rsa, &claims());
    until_accepted(&w.app, &first, Duration::from_secs(10)).await;
    for token in [
        sign_as(&rsa, Algorithm::PS256, &claims()),
        sign(&ec, &claims()),
        sign(&ed, &claims()),
    ] {
        let access = call(&w.app, &token).await.unwrap();
        assert!(w.app.fake.access_token_is_valid(&access));
        // The caller's account globs hold, and its role: a reader, not an admin.
        let client = w.app.client_with_token(Some(&token));
        assert_status(
            get_token(&client, "globex").await,
            Code::PermissionDenied,
            "billing-api",
        );
        assert_status(
            client
                .clone()
                .begin_auth(credential_service::proto::BeginAuthRequest {
                    account: "acme-2".into(),
                })
                .await,
            Code::PermissionDenied,
            "admin",
        );
    }
    // The static-token caller is unchanged.
    assert!(call(&w.app, ADMIN).await.is_ok());
}

#[tokio::test]
async fn forged_tokens_are_refused_none_hmac_confusion_wrong_family_and_bad_signatures() {
    let (rsa, ec) = (rsa_key("rsa-1"), ec_key("ec-1"));
    let w = world(&[&rsa, &ec]).await;
    until_accepted(&w.app, &sign(&rsa, &claims()), Duration::from_secs(10)).await;
    let payload = b64(claims().to_string().as_bytes());

    // alg none: no signature at all.
    for alg in ["none", "None", "NONE"] {
        let header = b64(json!({"alg": alg, "kid": "rsa-1", "typ": "JWT"})
            .to_string()
            .as_bytes());
        let token = format!("{header}.{payload}.");
        assert_status(
            call(&w.app, &token).await,
            Code::Unauthenticated,
            "algorithm",
        );
    }
    // HS256 keyed with the issuer's public key: the classic confusion attack.
    let secret = EncodingKey::from_secret(rsa.public_pem.as_ref().unwrap().as_bytes());
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some("rsa-1".into());
    let hs = jsonwebtoken::encode(&header, &claims(), &secret).unwrap();
    assert_status(call(&w.app, &hs).await, Code::Unauthenticated, "algorithm");
    // ... or with the JWK's JSON as the secret, and the other HMACs.
    for alg in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512] {
        let secret = EncodingKey::from_secret(rsa.jwk.to_string().as_bytes());
        let mut header = Header::new(alg);
        header.kid = Some("rsa-1".into());
        let token = jsonwebtoken::encode(&header, &claims(), &secret).unwrap();
        assert_status(
            call(&w.app, &token).await,
            Code::Unauthenticated,
            "algorithm",
        );
    }
    // An algorithm the key's type does not fit: ES256 claimed for the RSA key, RS256 for the EC
    // key (signed by a real key of the claimed type, so only the pinning stops it).
    let mut impostor = ec_key("rsa-1");
    assert_status(
        call(&w.app, &sign(&impostor, &claims())).await,
        Code::Unauthenticated,
        "algorithm",
    );
    impostor = rsa_key("ec-1");
    assert_status(
        call(&w.app, &sign(&impostor, &claims())).await,
        Code::Unauthenticated,
        "algorithm",
    );
    // A key of the right type that is not the issuer's, under the issuer's key id.
    let stranger = ec_key("ec-1");
    assert_status(
        call(&w.app, &sign(&stranger, &claims())).await,
        Code::Unauthenticated,
        "bad signature",
    );
    // A good token with its payload changed (another subject) keeps a signature that no longer
    // fits.
    let good = sign(&rsa, &claims());
    let mut parts: Vec<&str> = good.split('.').collect();
    let mut other = claims();
    other["sub"] = json!("system:serviceaccount:billing:admin");
    let swapped = b64(other.to_string().as_bytes());
    parts[1] = &swapped;
    assert_status(
        call(&w.app, &parts.join(".")).await,
        Code::Unauthenticated,
        "bad signature",
    );
    // Garbage shaped like a JWT.
    for token in ["a.b.c", "eyJ.eyJ.x", "x.y.z.w"] {
        assert_status(call(&w.app, token).await, Code::Unauthenticated, "");
    }
    // The good token still works.
    assert!(call(&w.app, &good).await.is_ok());
}

#[tokio::test]
async fn claims_are_held_to_issuer_audience_times_and_subject() {
    let ed = ed_key("ed-1");
    let w = world(&[&ed]).await;
    until_accepted(&w.app, &sign(&ed, &claims()), Duration::from_secs(10)).await;
    let now = now();
    let with = |field: &str, value: Value| {
        let mut c = claims();
        c[field] = value;
        sign(&ed, &c)
    };
    let refused = [
        (
            with("iss", json!("https://evil.example.com")),
            "unknown issuer",
        ),
        (with("iss", json!(format!("{ISS}/"))), "unknown issuer"),
        (with("aud", json!("someone-else")), "wrong audience"),
        (with("aud", json!(["a", "b"])), "wrong audience"),
        (with("exp", json!(now - 61 - 5)), "expired"),
        (with("nbf", json!(now + 300)), "not yet valid"),
        (with("iat", json!(now + 300)), "not yet valid"),
        (
            with("sub", json!("system:serviceaccount:billing:other")),
            "unknown subject",
        ),
        (with("sub", json!(format!("{SUBJECT}x"))), "unknown subject"),
    ];
    for (token, why) in refused {
        let status = assert_status(call(&w.app, &token).await, Code::Unauthenticated, why);
        assert!(!status.message().contains(&token[..20]), "{status:?}");
    }
    // Missing claims.
    for field in ["exp", "aud", "sub", "iss"] {
        let mut c = claims();
        c.as_object_mut().unwrap().remove(field);
        assert_status(
            call(&w.app, &sign(&ed, &c)).await,
            Code::Unauthenticated,
            "",
        );
    }
    // Within the 60 s leeway, clocks that disagree a little are forgiven.
    for (field, value) in [
        ("exp", json!(now - 30)),
        ("nbf", json!(now + 30)),
        ("iat", json!(now + 30)),
    ] {
        assert!(call(&w.app, &with(field, value)).await.is_ok(), "{field}");
    }
}

#[tokio::test]
async fn an_oversized_bearer_is_refused_before_parsing() {
    let ec = ec_key("ec-1");
    let w = world(&[&ec]).await;
    until_accepted(&w.app, &sign(&ec, &claims()), Duration::from_secs(10)).await;
    // A valid token, padded past 8 KiB: its size alone refuses it.
    let mut c = claims();
    c["pad"] = json!("x".repeat(8 * 1024));
    let big = sign(&ec, &c);
    assert!(big.len() > 8 * 1024);
    assert_status(
        call(&w.app, &big).await,
        Code::Unauthenticated,
        "over 8192 bytes",
    );
    let junk = "y".repeat(8 * 1024 + 1);
    assert_status(
        call(&w.app, &junk).await,
        Code::Unauthenticated,
        "over 8192 bytes",
    );
    // Just under the limit, a padded valid token passes.
    let mut c = claims();
    c["pad"] = json!("x".repeat(5 * 1024));
    assert!(call(&w.app, &sign(&ec, &c)).await.is_ok());
}

#[tokio::test]
async fn a_flood_of_unknown_key_ids_fetches_the_key_set_once() {
    let ec = ec_key("ec-1");
    let w = world(&[&ec]).await;
    until_accepted(&w.app, &sign(&ec, &claims()), Duration::from_secs(10)).await;
    let before = w.jwks.fetches();
    // 300 tokens, each with a made-up key id, signed by a key of their own.
    let mut codes = Vec::new();
    let made_up: Vec<String> = (0..300)
        .map(|i| sign(&ec_key(&format!("made-up-{i}")), &claims()))
        .collect();
    // Over one connection, 32 at a time (300 connections at once would test the listener's
    // bounds, not this rule).
    let client = w.app.client_with_token(None);
    let calls = made_up.iter().map(|token| {
        let mut client = client.clone();
        let mut request = tonic::Request::new(GetTokenRequest {
            account: "acme-1".into(),
            min_validity: None,
        });
        let bearer = format!("Bearer {token}").parse().unwrap();
        request.metadata_mut().insert("authorization", bearer);
        async move { client.get_token(request).await }
    });
    let mut results = futures::stream::iter(calls).buffer_unordered(32);
    while let Some(result) = results.next().await {
        codes.push(result.unwrap_err().code());
    }
    // The first asks for a fetch; until it is done they are told to retry (UNAVAILABLE), then
    // refused outright.
    let unavailable = codes.iter().filter(|c| **c == Code::Unavailable).count();
    assert!(unavailable >= 1, "{codes:?}");
    assert!(
        codes
            .iter()
            .all(|c| matches!(c, Code::Unavailable | Code::Unauthenticated)),
        "{codes:?}"
    );
    // Once the asked-for fetch is done, made-up key ids are refused outright.
    let deadline = Instant::now() + Duration::from_secs(10);
    while call(&w.app, &made_up[0]).await.unwrap_err().code() == Code::Unavailable {
        assert!(Instant::now() < deadline, "the asked-for fetch never ended");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(w.jwks.fetches(), before + 1);
    // A second wave inside the same 10 s asks for nothing.
    for token in &made_up[..100] {
        assert_status(
            call(&w.app, token).await,
            Code::Unauthenticated,
            "unknown key",
        );
    }
    assert_eq!(w.jwks.fetches(), before + 1);
    // The issuer's real key works throughout.
    assert!(call(&w.app, &sign(&ec, &claims())).await.is_ok());
}

#[tokio::test]
async fn a_new_key_is_fetched_on_first_use_and_a_removed_key_stops_verifying() {
    let (old, new) = (ec_key("2026-old"), ed_key("2026-new"));
    let w = world(&[&old]).await;
    let old_token = sign(&old, &claims());
    until_accepted(&w.app, &old_token, Duration::from_secs(10)).await;
    // Remembered: served from memory (a second call does not need the key set).
    assert!(call(&w.app, &old_token).await.is_ok());

    // The issuer rotates: publishes the new key, drops the old one.
    w.jwks.serve(&[&new]);
    let new_token = sign(&new, &claims());
    until_accepted(&w.app, &new_token, Duration::from_secs(10)).await;
    // The fetch that brought the new key removed the old one: its tokens, even one verified
    // and remembered before, are refused now.
    assert_status(
        call(&w.app, &old_token).await,
        Code::Unauthenticated,
        "unknown key",
    );
    assert_status(
        call(&w.app, &sign(&old, &claims())).await,
        Code::Unauthenticated,
        "unknown key",
    );
    assert!(call(&w.app, &new_token).await.is_ok());
}

#[tokio::test]
async fn start_up_does_not_wait_for_the_issuer_and_cached_keys_outlive_an_outage() {
    let ed = ed_key("ed-1");
    let w = world_with(&[&ed], |jwks| jwks.down.store(true, Ordering::SeqCst)).await;
    // The server serves while the issuer is down: static callers at once, JWT callers are told
    // to retry (UNAVAILABLE), not that they are unknown.
    assert!(call(&w.app, ADMIN).await.is_ok());
    let token = sign(&ed, &claims());
    assert_status(call(&w.app, &token).await, Code::Unavailable, "retry");
    w.jwks.down.store(false, Ordering::SeqCst);
    until_accepted(&w.app, &token, Duration::from_secs(15)).await;

    // The issuer goes down again; a fetch asked for by an unknown key id fails, and the keys in
    // hand keep verifying new tokens.
    w.jwks.down.store(true, Ordering::SeqCst);
    let fetches = w.jwks.fetches();
    let unknown = sign(&ed_key("unknown"), &claims());
    assert_status(call(&w.app, &unknown).await, Code::Unavailable, "");
    let deadline = Instant::now() + Duration::from_secs(10);
    while w.jwks.fetches() == fetches {
        assert!(Instant::now() < deadline, "no fetch");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut fresh = claims();
    fresh["jti"] = json!("another token");
    assert!(call(&w.app, &sign(&ed, &fresh)).await.is_ok());
}

#[tokio::test]
async fn a_reload_takes_up_new_jwt_callers_and_keeps_the_issuer_s_keys() {
    let ec = ec_key("ec-1");
    let w = world(&[&ec]).await;
    let billing = sign(&ec, &claims());
    until_accepted(&w.app, &billing, Duration::from_secs(10)).await;
    let mut worker_claims = claims();
    worker_claims["sub"] = json!("system:serviceaccount:billing:worker");
    let worker = sign(&ec, &worker_claims);
    assert_status(
        call(&w.app, &worker).await,
        Code::Unauthenticated,
        "unknown subject",
    );

    let fetches = w.jwks.fetches();
    let more = format!(
        "{}\n[[caller]]\nname = \"billing-worker\"\n\
         jwt = {{ issuer = \"cluster\", subject = \"system:serviceaccount:billing:worker\" }}\n\
         role = \"reader\"\naccounts = [\"acme-1\"]\n",
        callers_toml(&w.source)
    );
    std::fs::write(w.dir.path().join("callers.toml"), more).unwrap();
    assert_eq!(w.app.options.callers.reload().unwrap(), 4);
    // The new caller is in, the old one still; the unchanged issuer kept its keys: no fetch.
    assert!(call(&w.app, &worker).await.is_ok());
    assert!(call(&w.app, &billing).await.is_ok());
    assert_eq!(w.jwks.fetches(), fetches);

    // A broken file keeps the one in force.
    std::fs::write(w.dir.path().join("callers.toml"), "[[issuer]]\nname = 1\n").unwrap();
    assert!(w.app.options.callers.reload().is_err());
    assert!(call(&w.app, &worker).await.is_ok());
}

#[tokio::test]
async fn the_service_reads_a_jwks_uri_that_needs_its_own_token() {
    let ed = ed_key("ed-1");
    let w = world_with(&[&ed], |jwks| {
        *jwks.needs_bearer.lock().unwrap() = Some("service-own-token-4a1f".into());
    })
    .await;
    until_accepted(&w.app, &sign(&ed, &claims()), Duration::from_secs(10)).await;
    // Without the token the same server refuses, so the keys came with it.
    let ca = reqwest::Certificate::from_pem(w.jwks.ca_pem.as_bytes()).unwrap();
    let http = reqwest::Client::builder()
        .add_root_certificate(ca)
        .build()
        .unwrap();
    let status = http.get(&w.jwks.url).send().await.unwrap().status();
    assert_eq!(status, 401);
}

#[tokio::test]
async fn keys_from_a_jwks_file_and_plain_http_only_to_loopback() {
    let ec = ec_key("file-1");
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, json!({"keys": [ec.jwk]}).to_string()).unwrap();
    let callers = load(
        dir.path(),
        &callers_toml(&format!("jwks_file = \"{}\"", jwks.display())),
    );
    let app = TestApp::spawn_with(Options {
        callers,
        token: Some(ADMIN.into()),
        ..Default::default()
    })
    .await;
    app.connect("acme-1").await;
    // Read with the callers file: no wait.
    assert!(call(&app, &sign(&ec, &claims())).await.is_ok());

    let path = dir.path().join("bad.toml");
    for (source, why) in [
        ("jwks_uri = \"http://keys.example.com/jwks\"", "https"),
        ("jwks_uri = \"ftp://127.0.0.1/jwks\"", "https"),
        (
            "jwks_uri = \"http://127.0.0.1:1/jwks\"\njwks_file = \"/x\"",
            "exactly one",
        ),
        ("", "exactly one"),
        ("jwks_file = \"/nonexistent/jwks.json\"", "cannot read"),
    ] {
        std::fs::write(&path, callers_toml(source)).unwrap();
        let e = Callers::load(&path).unwrap_err().to_string();
        assert!(e.contains(why), "{source}: {e}");
    }
    std::fs::write(
        &path,
        callers_toml("jwks_uri = \"http://127.0.0.1:1/jwks\""),
    )
    .unwrap();
    assert!(Callers::load(&path).is_ok());
}

/// A CA for client certificates, and the TLS server that trusts it.
struct Pki {
    params: CertificateParams,
    key: KeyPair,
    pem: String,
}

impl Pki {
    fn new() -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let pem = params.self_signed(&key).unwrap().pem();
        Self { params, key, pem }
    }

    fn leaf(&self, dns: &[&str], uris: &[&str], usage: ExtendedKeyUsagePurpose) -> Identity {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(dns.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        for uri in uris {
            params
                .subject_alt_names
                .push(SanType::URI((*uri).try_into().unwrap()));
        }
        params.extended_key_usages = vec![usage];
        let cert = params
            .signed_by(&key, &Issuer::from_params(&self.params, &self.key))
            .unwrap();
        Identity::from_pem(cert.pem(), key.serialize_pem())
    }
}

async fn mtls_client(app: &TestApp, pki: &Pki, identity: Identity) -> Client {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&pki.pem))
        .domain_name("localhost")
        .identity(identity);
    let channel = Channel::from_shared(format!("https://{}", app.addr))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    credential_service::proto::credential_service_client::CredentialServiceClient::with_interceptor(
        channel,
        common::Bearer::new(None).unwrap(),
    )
}

#[tokio::test]
async fn a_spiffe_id_names_a_caller_only_alone_well_formed_and_exact() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    // The server's own certificate, from the same CA.
    let server_key = KeyPair::generate().unwrap();
    let mut server_params =
        CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_cert = server_params
        .signed_by(&server_key, &Issuer::from_params(&pki.params, &pki.key))
        .unwrap();
    let files = TlsFiles {
        cert: dir.path().join("cert.pem"),
        key: dir.path().join("key.pem"),
        client_ca: Some(dir.path().join("ca.pem")),
    };
    std::fs::write(&files.cert, server_cert.pem()).unwrap();
    std::fs::write(&files.key, server_key.serialize_pem()).unwrap();
    std::fs::write(files.client_ca.as_ref().unwrap(), &pki.pem).unwrap();
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, r#"{"keys":[]}"#).unwrap();
    let callers = load(
        dir.path(),
        &callers_toml(&format!("jwks_file = \"{}\"", jwks.display())),
    );
    let app = TestApp::spawn_with(Options {
        callers,
        tls: Some(ServerTls::load(&files).unwrap()),
        token: Some(ADMIN.into()),
        ..Default::default()
    })
    .await;
    let client = |uris: &'static [&'static str]| {
        let (app, pki) = (&app, &pki);
        async move {
            mtls_client(
                app,
                pki,
                pki.leaf(&[], uris, ExtendedKeyUsagePurpose::ClientAuth),
            )
            .await
        }
    };
    // Exactly the configured ID: the caller billing-mesh, a reader of acme-* (NOT_FOUND: let
    // in, and no such account yet).
    let mesh = client(&[SPIFFE_ID]).await;
    assert_status(get_token(&mesh, "acme-1").await, Code::NotFound, "");
    assert_status(
        get_token(&mesh, "globex").await,
        Code::PermissionDenied,
        "billing-mesh",
    );

    for uris in [
        // Two URI SANs, the right one among them: names no SPIFFE ID.
        &[SPIFFE_ID, "spiffe://cluster.local/ns/other/sa/x"][..],
        &["spiffe://cluster.local/ns/other/sa/x", SPIFFE_ID],
        // A prefix of the configured ID, and the configured ID as a prefix.
        &["spiffe://cluster.local/ns/billing"],
        &["spiffe://cluster.local/ns/billing/sa/billing-api/extra"],
        &["spiffe://cluster.local/ns/billing/sa/billing-api-x"],
        // Not well-formed, or not SPIFFE.
        &["spiffe://Cluster.local/ns/billing/sa/billing-api"],
        &["https://cluster.local/ns/billing/sa/billing-api"],
    ] {
        let other = client(uris).await;
        assert_status(get_token(&other, "acme-1").await, Code::Unauthenticated, "");
    }
}
