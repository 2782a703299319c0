//! JWT callers in the audit trail: refusals say why (expired, wrong audience, unknown issuer,
//! bad signature) and name the caller when the signature proved who it is; no token appears
//! anywhere in a TRACE capture of every crate.

use crate::common;

use base64::Engine as _;
use common::{Options, TestApp};
use credential_service::{auth::Callers, proto::GetTokenRequest};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rcgen::KeyPair;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

const ADMIN: &str = "admin-bearer-identity-5c02";
const ISS: &str = "https://issuer.example.com";
const SUBJECT: &str = "system:serviceaccount:billing:billing-api";

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn claims() -> Value {
    json!({"iss": ISS, "aud": "credential-service", "sub": SUBJECT, "exp": now() + 600})
}

fn sign(key: &KeyPair, claims: &Value) -> String {
    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = Some("ed-1".into());
    jsonwebtoken::encode(
        &header,
        claims,
        &EncodingKey::from_ed_der(&key.serialize_der()),
    )
    .unwrap()
}

#[tokio::test]
async fn jwt_refusals_are_audited_with_their_reason_and_never_the_token() {
    let capture = crate::capture::LogCapture::install(tracing::Level::TRACE);
    let key = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("jwks.json");
    let x = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(key.public_key_raw());
    std::fs::write(
        &jwks,
        json!({"keys": [{"kty": "OKP", "crv": "Ed25519", "kid": "ed-1", "x": x}]}).to_string(),
    )
    .unwrap();
    let path = dir.path().join("callers.toml");
    std::fs::write(
        &path,
        format!(
            "[[issuer]]\nname = \"cluster\"\nissuer = \"{ISS}\"\njwks_file = \"{}\"\n\
             audiences = [\"credential-service\"]\n\
             [[caller]]\nname = \"ops\"\ntoken_sha256 = \"{}\"\nrole = \"admin\"\naccounts = [\"*\"]\n\
             [[caller]]\nname = \"billing-api\"\njwt = {{ issuer = \"cluster\", subject = \"{SUBJECT}\" }}\n\
             role = \"reader\"\naccounts = [\"acme\"]\n",
            jwks.display(),
            hex::encode(Sha256::digest(ADMIN)),
        ),
    )
    .unwrap();
    let app = TestApp::spawn_with(Options {
        callers: Callers::load(&path).unwrap(),
        token: Some(ADMIN.into()),
        ..Default::default()
    })
    .await;
    app.connect("acme").await;

    let with = |field: &str, value: Value| {
        let mut c = claims();
        c[field] = value;
        sign(&key, &c)
    };
    let stranger = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let good = sign(&key, &claims());
    let tokens = [
        good.clone(),
        with("exp", json!(now() - 3600)),
        with("aud", json!("someone-else")),
        with("iss", json!("https://evil.example.com")),
        sign(&stranger, &claims()),
    ];
    let mut outcomes = Vec::new();
    for token in &tokens {
        let mut client = app.client_with_token(Some(token));
        let result = client
            .get_token(GetTokenRequest {
                account: "acme".into(),
                min_validity: None,
            })
            .await;
        outcomes.push(result.map(|_| ()).map_err(|s| s.code()));
    }
    assert_eq!(outcomes[0], Ok(()));
    assert!(
        outcomes[1..]
            .iter()
            .all(|o| *o == Err(tonic::Code::Unauthenticated))
    );
    credential_service::audit::flush();

    let logs = capture.text();
    for token in &tokens {
        // Any of a token's three parts would be a leak; the header part is shared by all, so
        // look for the payload and signature.
        for part in token.split('.').skip(1) {
            assert!(!logs.contains(part), "a token leaked into the logs");
        }
    }
    let audit: Vec<&str> = logs.lines().filter(|l| l.contains(" audit:")).collect();
    let has = |needles: &[&str]| audit.iter().any(|l| needles.iter().all(|n| l.contains(n)));
    assert!(
        has(&[
            "caller=\"billing-api\"",
            "method=\"GetToken\"",
            "outcome=\"OK\""
        ]),
        "{audit:#?}"
    );
    // An expired token with a good signature names its caller; the others name nobody.
    for (caller, reason) in [
        ("billing-api", "expired"),
        ("", "wrong audience"),
        ("", "unknown issuer"),
        ("", "bad signature"),
    ] {
        assert!(
            has(&[
                &format!("caller=\"{caller}\""),
                "method=\"GetToken\"",
                "outcome=\"UNAUTHENTICATED\"",
                &format!("reason=\"{reason}\""),
            ]),
            "{reason}: {audit:#?}"
        );
    }
}
