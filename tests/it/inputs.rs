//! Bad input gets a clear status, never a panic or INTERNAL: random requests through the real gRPC
//! service, and random token-endpoint answers through the parser. Case counts are modest so the
//! suite stays fast; proptest shrinks any failure to a small example.

use crate::common;

use std::time::Duration;

use common::TestApp;
use credential_service::{
    oauth::parse_token_response,
    proto::{BeginAuthRequest, CompleteAuthRequest, GetTokenRequest},
};
use proptest::{
    prelude::*,
    test_runner::{Config, TestRunner},
};
use reqwest::StatusCode;
use serde_json::Value;
use tonic::Code;

#[derive(Debug, Clone)]
enum Call {
    Begin(String),
    Complete {
        code: String,
        state: String,
    },
    Get {
        account: String,
        min_validity: Option<(i64, i32)>,
    },
}

fn account() -> impl Strategy<Value = String> {
    prop_oneof![
        "[A-Za-z0-9._:@-]{1,130}",
        Just("acme".to_owned()),
        ".{0,40}",
        "[a-z]{0,3}[\\x00-\\x1f /\\\\*?\\[\\]]{1,4}",
    ]
}

fn call() -> impl Strategy<Value = Call> {
    let secret = || prop_oneof![".{0,40}", "[A-Za-z0-9_-]{0,600}", "\\PC{0,300}"];
    prop_oneof![
        account().prop_map(Call::Begin),
        (secret(), secret()).prop_map(|(code, state)| Call::Complete { code, state }),
        (
            account(),
            proptest::option::of((any::<i64>(), any::<i32>()))
        )
            .prop_map(|(account, min_validity)| Call::Get {
                account,
                min_validity
            }),
    ]
}

#[test]
fn random_requests_get_clear_statuses_and_lose_nothing() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let app = rt.block_on(async {
        let app = TestApp::spawn().await;
        app.connect("acme").await;
        app
    });
    let before = rt.block_on(app.get_token("acme")).unwrap().access_token;

    let mut runner = TestRunner::new(Config {
        cases: 200,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&call(), |call| {
            let mut client = app.client.clone();
            let result = rt.block_on(async {
                match call.clone() {
                    Call::Begin(account) => client
                        .begin_auth(BeginAuthRequest { account })
                        .await
                        .map(drop),
                    Call::Complete { code, state } => client
                        .complete_auth(CompleteAuthRequest { code, state })
                        .await
                        .map(drop),
                    Call::Get {
                        account,
                        min_validity,
                    } => client
                        .get_token(GetTokenRequest {
                            account,
                            min_validity: min_validity
                                .map(|(seconds, nanos)| prost_types::Duration { seconds, nanos }),
                        })
                        .await
                        .map(drop),
                }
            });
            if let Err(status) = result {
                prop_assert!(
                    !matches!(status.code(), Code::Internal | Code::Unknown),
                    "{call:?} → {status:?}"
                );
                prop_assert!(!status.message().is_empty(), "{call:?} → {status:?}");
            }
            Ok(())
        })
        .unwrap();

    let after = rt.block_on(app.get_token("acme")).unwrap().access_token;
    assert_eq!(before, after, "the stored account is untouched");
}

fn json(depth: u32) -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f)
            .map(Value::Number)
            .unwrap_or(Value::Null)),
        ".{0,40}".prop_map(Value::from),
        "[0-9 ]{0,12}".prop_map(Value::from),
    ];
    let key = prop_oneof![
        Just("access_token".to_owned()),
        Just("refresh_token".to_owned()),
        Just("expires_in".to_owned()),
        Just("token_type".to_owned()),
        Just("error".to_owned()),
        ".{0,12}",
    ];
    leaf.prop_recursive(depth, 48, 6, move |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            proptest::collection::btree_map(key.clone(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..300),
        json(3).prop_map(|v| serde_json::to_vec(&v).unwrap()),
        // Mostly well-formed token answers with one odd field.
        (
            "[A-Za-z0-9]{0,20}",
            json(1),
            json(1),
            prop_oneof![Just(Value::Null), json(1)]
        )
            .prop_map(|(access, expires, refresh, error)| {
                let mut m = serde_json::Map::new();
                m.insert("access_token".into(), access.into());
                m.insert("expires_in".into(), expires);
                m.insert("refresh_token".into(), refresh);
                if !error.is_null() {
                    m.insert("error".into(), error);
                }
                serde_json::to_vec(&Value::Object(m)).unwrap()
            }),
    ]
}

proptest! {
    #![proptest_config(Config { cases: 512, failure_persistence: None, ..Config::default() })]

    #[test]
    fn random_provider_answers_are_classified_never_panic(
        status in 100u16..600,
        retry_after in proptest::option::of(".{0,20}"),
        body in body(),
    ) {
        let status = StatusCode::from_u16(status).unwrap();
        match parse_token_response(status, retry_after.as_deref(), &body) {
            Ok(tokens) => {
                prop_assert!(status.is_success());
                let lifetime = tokens.expires_in.unwrap_or(Duration::from_secs(1));
                prop_assert!(lifetime > Duration::ZERO);
                prop_assert!(lifetime <= Duration::from_secs(10 * 365 * 24 * 3600));
            }
            Err(e) => {
                // The message never echoes the body.
                let text = e.to_string();
                if body.len() >= 8 {
                    let body = String::from_utf8_lossy(&body);
                    prop_assert!(!text.contains(body.as_ref()), "{text}");
                }
                if let Some(after) = e.retry_after() {
                    prop_assert!(after <= Duration::from_secs(3600));
                }
            }
        }
    }
}
