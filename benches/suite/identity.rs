//! JWT callers against static-token callers (issue 27): one service whose callers file has both,
//! driven with the same GetToken load in alternation (the order flips each round), the only
//! difference the bearer each request carries: a 43-character static token, or an RS256
//! service-account-style JWT (about 800 bytes) from an issuer whose keys come from a JWKS file.
//! The JWT is verified once and then found by its SHA-256 (src/auth/jwt.rs); the target is at
//! least 0.95 of the static token's throughput. A third caller has a static token as long as the
//! JWT: what the bigger header alone costs (HTTP/2 and hashing), apart from the JWT path.

use std::{path::Path, sync::Arc, time::SystemTime};

use credential_service::{broker::BrokerConfig, clock::Clock};
use tonic::metadata::AsciiMetadataValue;

use crate::{
    Env,
    fixture::{self, RunningServer},
    load::{self, LoadResult, ServerCpu},
};

/// GetToken with a JWT caller at least this share of the static-token caller's throughput.
pub const MIN_RATIO: f64 = 0.95;

pub struct Identity {
    pub accounts: usize,
    pub jwt_bytes: usize,
    pub static_token: LoadResult,
    pub jwt: LoadResult,
    /// A static token of the JWT's length.
    pub long_static: LoadResult,
    /// Requests per second of each round: static, JWT, long static.
    pub rounds: Vec<(f64, f64, f64)>,
}

impl Identity {
    pub fn ratio(&self) -> f64 {
        self.jwt.rps() / self.static_token.rps()
    }
}

/// A callers file in `dir` with a static-token reader, a JWT reader and a reader with a static
/// token as long as the JWT, of every account; returns (static token, JWT, long static token).
fn callers(dir: &Path) -> (String, String, String) {
    use base64::Engine as _;
    use rsa::{pkcs1::EncodeRsaPrivateKey, traits::PublicKeyParts};
    use sha2::{Digest, Sha256};
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let key = rsa::RsaPrivateKey::new(&mut rand_core::OsRng, 2048).expect("an RSA key");
    let jwks = dir.join("bench-jwks.json");
    let jwk = serde_json::json!({"keys": [{
        "kty": "RSA", "kid": "bench", "use": "sig",
        "n": b64(&key.n().to_bytes_be()), "e": b64(&key.e().to_bytes_be()),
    }]});
    std::fs::write(&jwks, jwk.to_string()).expect("the JWKS file is written");
    let issuer = "https://kubernetes.default.svc.cluster.local";
    let subject = "system:serviceaccount:bench:bench-reader";
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    header.kid = Some("bench".into());
    // The claims a projected Kubernetes token carries, so the size is a real one's.
    let claims = serde_json::json!({
        "aud": ["credential-service"], "exp": now + 3600, "iat": now, "nbf": now, "iss": issuer,
        "sub": subject, "jti": fixture::random_token(""),
        "kubernetes.io": {
            "namespace": "bench",
            "node": {"name": "node-1", "uid": "0c5e4a3e-2b1d-4c8e-9f7a-1d2e3f4a5b6c"},
            "pod": {"name": "bench-reader-7d9f8c6b5-x2x4z", "uid": "5b4d6c2e-8a1f-4e3d-b7c9-2a1b3c4d5e6f"},
            "serviceaccount": {"name": "bench-reader", "uid": "9e8d7c6b-5a4f-4e3d-a2b1-c0d9e8f7a6b5"},
        },
    });
    let der = key.to_pkcs1_der().expect("the key encodes");
    let jwt = jsonwebtoken::encode(
        &header,
        &claims,
        &jsonwebtoken::EncodingKey::from_rsa_der(der.as_bytes()),
    )
    .expect("the JWT is signed");
    let token = fixture::random_token("bench-caller-");
    let digest = hex::encode(Sha256::digest(token.as_bytes()));
    let mut long = fixture::random_token("bench-long-");
    while long.len() < jwt.len() {
        long.push_str(&fixture::random_token(""));
    }
    long.truncate(jwt.len());
    let long_digest = hex::encode(Sha256::digest(long.as_bytes()));
    std::fs::write(
        dir.join("callers.toml"),
        format!(
            "[[issuer]]\nname = \"cluster\"\nissuer = \"{issuer}\"\njwks_file = \"{}\"\n\
             audiences = [\"credential-service\"]\n\
             [[caller]]\nname = \"bench-static\"\ntoken_sha256 = \"{digest}\"\nrole = \"reader\"\naccounts = [\"acct-*\"]\n\
             [[caller]]\nname = \"bench-jwt\"\njwt = {{ issuer = \"cluster\", subject = \"{subject}\" }}\n\
             role = \"reader\"\naccounts = [\"acct-*\"]\n\
             [[caller]]\nname = \"bench-long\"\ntoken_sha256 = \"{long_digest}\"\nrole = \"reader\"\naccounts = [\"acct-*\"]\n",
            jwks.display()
        ),
    )
    .expect("the callers file is written");
    (token, jwt, long)
}

/// Static token and JWT, in alternation, on the accounts seeded in `data_dir`.
pub async fn run(env: &Env, data_dir: &Path, accounts: Arc<[String]>) -> Identity {
    let (token, jwt, long) = callers(data_dir);
    let mut config = fixture::service_config(
        data_dir,
        fixture::unreachable_upstream(),
        BrokerConfig::default(),
        None,
    );
    config.callers = credential_service::auth::Callers::load(&data_dir.join("callers.toml"))
        .expect("the callers file loads");
    let service =
        RunningServer::service(env.runtimes.server.handle(), config, Clock::system()).await;
    let bearer = |t: &str| Some(AsciiMetadataValue::try_from(format!("Bearer {t}")).unwrap());
    let bearers = [bearer(&token), bearer(&jwt), bearer(&long)];
    let mut identity = Identity {
        accounts: accounts.len(),
        jwt_bytes: jwt.len(),
        static_token: LoadResult::empty(),
        jwt: LoadResult::empty(),
        long_static: LoadResult::empty(),
        rounds: Vec::new(),
    };
    for round in 0..env.rounds {
        let order = if round % 2 == 0 { [0, 1, 2] } else { [2, 1, 0] };
        let mut rps = [0.0; 3];
        for which in order {
            let clients = load::connect(service.addr, env.load.channels).await;
            let bearer = &bearers[which];
            let result = load::drive(
                &clients,
                accounts.clone(),
                bearer.clone(),
                &env.load,
                ServerCpu::InProcess,
            )
            .await;
            if let Some(e) = &result.first_error {
                eprintln!("bench: {} errors; first: {e}", result.errors);
            }
            rps[which] = result.rps();
            match which {
                0 => identity.static_token.merge(&result),
                1 => identity.jwt.merge(&result),
                _ => identity.long_static.merge(&result),
            }
        }
        eprintln!(
            "bench: identity, round {}: static token {:.0} req/s, JWT {:.0} req/s, long static {:.0} req/s",
            round + 1,
            rps[0],
            rps[1],
            rps[2]
        );
        identity.rounds.push((rps[0], rps[1], rps[2]));
    }
    service.stop().await;
    identity
}

/// The Markdown table for BENCHMARKS.md.
pub fn report(r: &Identity) -> String {
    let rounds: Vec<String> = r
        .rounds
        .iter()
        .map(|(s, j, l)| format!("{s:.0} / {j:.0} / {l:.0}"))
        .collect();
    format!(
        "### GetToken: JWT caller vs static-token caller (same service, alternating)\n\n\
         | accounts | JWT bytes | static req/s | JWT req/s | ratio (target ≥ {MIN_RATIO}) | static token of the JWT's length, req/s | JWT / it | static p99 µs | JWT p99 µs | errors | rounds (static / JWT / long static req/s) | holds |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|\n\
         | {} | {} | {:.0} | {:.0} | {:.3} | {:.0} | {:.3} | {:.0} | {:.0} | {} | {} | {} |\n",
        r.accounts,
        r.jwt_bytes,
        r.static_token.rps(),
        r.jwt.rps(),
        r.ratio(),
        r.long_static.rps(),
        r.jwt.rps() / r.long_static.rps(),
        r.static_token.p99_us(),
        r.jwt.p99_us(),
        r.static_token.errors + r.jwt.errors + r.long_static.errors,
        rounds.join(", "),
        if r.ratio() >= MIN_RATIO && r.jwt.errors == 0 && r.static_token.errors == 0 {
            "yes"
        } else {
            "no"
        },
    )
}
