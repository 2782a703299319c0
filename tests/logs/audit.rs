//! With callers and encryption on: a TRACE capture of every crate over the full flow holds no
//! secret (bearer tokens, encryption key, OAuth tokens, codes, verifiers), and every call left
//! its audit event with caller, method, account and outcome.

use crate::common;

use base64::{Engine, engine::general_purpose::STANDARD};
use common::{Options, TestApp};
use credential_service::{auth::Callers, proto::GetTokenRequest};
use sha2::{Digest, Sha256};

const ADMIN: &str = "admin-bearer-7d1c93e0aa";
const READER: &str = "reader-bearer-0b55f2c4e1";

#[tokio::test]
async fn trace_logs_hold_no_secret_and_every_call_is_audited() {
    let capture = crate::capture::LogCapture::install(tracing::Level::TRACE);

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("callers.toml");
    let hash = |t: &str| hex::encode(Sha256::digest(t));
    std::fs::write(
        &path,
        format!(
            "[[caller]]\nname = \"ops\"\ntoken_sha256 = \"{}\"\nrole = \"admin\"\naccounts = [\"*\"]\n\
             [[caller]]\nname = \"billing\"\ntoken_sha256 = \"{}\"\nrole = \"reader\"\naccounts = [\"acme\"]\n",
            hash(ADMIN),
            hash(READER)
        ),
    )
    .unwrap();
    let options = Options {
        callers: Callers::load(&path).unwrap(),
        token: Some(ADMIN.into()),
        ..Default::default()
    };
    let key = std::fs::read_to_string(options.encryption.key_file.as_ref().unwrap()).unwrap();
    let app = TestApp::spawn_with(options).await;

    let (code, state) = app.authorize("acme").await;
    app.complete(&code, &state).await.unwrap();
    let reader = app.client_with_token(Some(READER));
    let get = |account: &str| {
        let mut reader = reader.clone();
        let account = account.to_owned();
        async move {
            reader
                .get_token(GetTokenRequest {
                    account,
                    min_validity: None,
                })
                .await
        }
    };
    let access = get("acme").await.unwrap().into_inner().access_token;
    assert_eq!(
        get("globex").await.unwrap_err().code(),
        tonic::Code::PermissionDenied
    );
    let stranger = app.client_with_token(Some("not-a-known-token-12345"));
    assert!(
        stranger
            .clone()
            .begin_auth(credential_service::proto::BeginAuthRequest {
                account: "acme".into()
            })
            .await
            .is_err()
    );
    let app = app.restart().await; // records read back with the key
    app.get_token("acme").await.unwrap();

    let mut secrets = vec![
        ADMIN.to_owned(),
        READER.to_owned(),
        "not-a-known-token-12345".to_owned(),
        key.trim().to_owned(),
        code,
        state,
        access,
    ];
    secrets.extend(app.fake.issued_refresh_tokens());
    secrets.extend(app.fake.received_code_verifiers());
    // The raw key bytes in other encodings, too.
    let raw = STANDARD.decode(key.trim()).unwrap();
    secrets.push(hex::encode(&raw));
    drop(app);

    let logs = capture.text();
    for secret in &secrets {
        assert!(
            !logs.contains(secret.as_str()),
            "a secret leaked into the logs: {}...",
            &secret[..4]
        );
    }
    let audit: Vec<&str> = logs.lines().filter(|l| l.contains(" audit:")).collect();
    let has = |needles: &[&str]| audit.iter().any(|l| needles.iter().all(|n| l.contains(n)));
    assert!(
        has(&[
            "caller=\"ops\"",
            "method=\"BeginAuth\"",
            "account=\"acme\"",
            "outcome=\"OK\""
        ]),
        "{audit:#?}"
    );
    assert!(
        has(&[
            "caller=\"ops\"",
            "method=\"CompleteAuth\"",
            "account=\"acme\"",
            "outcome=\"OK\""
        ]),
        "{audit:#?}"
    );
    assert!(
        has(&[
            "caller=\"billing\"",
            "method=\"GetToken\"",
            "account=\"acme\"",
            "outcome=\"OK\""
        ]),
        "{audit:#?}"
    );
    assert!(
        has(&[
            "caller=\"billing\"",
            "method=\"GetToken\"",
            "account=\"globex\"",
            "outcome=\"PERMISSION_DENIED\""
        ]),
        "{audit:#?}"
    );
    assert!(
        has(&[
            "caller=\"\"",
            "method=\"BeginAuth\"",
            "outcome=\"UNAUTHENTICATED\""
        ]),
        "{audit:#?}"
    );
}
