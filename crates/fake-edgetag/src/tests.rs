//! The fake's endpoints over real HTTP, driven the way a client drives them.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use axum::http::{HeaderValue, StatusCode, header};
use serde_json::json;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use url::Url;

use crate::{
    AUTHORIZE_PATH, CODE_LIFETIME, FakeClock, FakeConfig, FakeEdgeTag, FakeStats, FakeTeam, Fault,
    TOKEN_PATH, UserMeFault, pkce::s256_challenge, state::random_base64url,
};

const REDIRECT_URI: &str = "http://127.0.0.1:9/callback?keep=1";

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// A fresh PKCE pair: (verifier, S256 challenge).
fn pkce() -> (String, String) {
    let verifier = random_base64url();
    let challenge = s256_challenge(&verifier);
    (verifier, challenge)
}

fn authorize_url(fake: &FakeEdgeTag, challenge: &str, extra: &[(&str, &str)]) -> String {
    let mut url = Url::parse(&fake.authorize_url()).unwrap();
    url.query_pairs_mut()
        .append_pair("client_id", fake.client_id())
        .append_pair("redirect_uri", REDIRECT_URI)
        .append_pair("response_type", "code")
        .append_pair("scope", "full")
        .append_pair("state", "st-123")
        .append_pair("code_challenge", challenge)
        .append_pair("code_challenge_method", "S256");
    // Replace any standard parameter named in `extra`; an empty value removes it.
    let mut pairs: Vec<(String, String)> = url
        .query_pairs()
        .into_owned()
        .filter(|(k, _)| !extra.iter().any(|(e, _)| e == k))
        .collect();
    pairs.extend(
        extra
            .iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    url.query_pairs_mut().clear().extend_pairs(pairs);
    url.into()
}

/// Runs the browser leg over HTTP and returns (code, verifier).
async fn authorize(fake: &FakeEdgeTag) -> (String, String) {
    let (verifier, challenge) = pkce();
    let redirect = fake
        .approve(&authorize_url(fake, &challenge, &[]))
        .await
        .unwrap();
    (redirect.code, verifier)
}

async fn post_form(
    client: &reqwest::Client,
    url: &str,
    auth: Option<(&str, &str)>,
    fields: &[(&str, &str)],
) -> reqwest::Result<reqwest::Response> {
    let body = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(fields)
        .finish();
    let mut request = client
        .post(url)
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(body);
    if let Some((id, secret)) = auth {
        request = request.basic_auth(id, Some(secret));
    }
    request.send().await
}

async fn token(
    client: &reqwest::Client,
    fake: &FakeEdgeTag,
    fields: &[(&str, &str)],
) -> reqwest::Result<reqwest::Response> {
    let secret = fake.client_secret();
    post_form(
        client,
        &fake.token_url(),
        Some((fake.client_id(), &secret)),
        fields,
    )
    .await
}

async fn exchange(
    client: &reqwest::Client,
    fake: &FakeEdgeTag,
    code: &str,
    verifier: &str,
) -> reqwest::Response {
    let fields = [
        ("grant_type", "authorization_code"),
        ("code", code),
        ("code_verifier", verifier),
    ];
    token(client, fake, &fields).await.unwrap()
}

async fn refresh(
    client: &reqwest::Client,
    fake: &FakeEdgeTag,
    refresh_token: &str,
) -> reqwest::Response {
    let fields = [
        ("grant_type", "refresh_token"),
        ("refresh_token", refresh_token),
    ];
    token(client, fake, &fields).await.unwrap()
}

/// Status and JSON body of a response.
async fn json_of(response: reqwest::Response) -> (u16, serde_json::Value) {
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text:?}"));
    (status, body)
}

fn oauth_error_body(code: &str) -> serde_json::Value {
    json!({ "error": code })
}

async fn user_me(client: &reqwest::Client, fake: &FakeEdgeTag, access: &str) -> u16 {
    client
        .get(fake.user_me_url())
        .bearer_auth(access)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

async fn start(config: FakeConfig) -> FakeEdgeTag {
    FakeEdgeTag::start(config).await.unwrap()
}

/// The system clock plus an offset the test moves, as a client's test clock would be.
#[derive(Default)]
struct ManualClock(Arc<AtomicU64>);

impl ManualClock {
    fn fake_clock(&self) -> FakeClock {
        let offset = self.0.clone();
        FakeClock::from_fn(move || {
            SystemTime::now() + Duration::from_millis(offset.load(Ordering::Relaxed))
        })
    }

    fn advance(&self, by: Duration) {
        let ms = u64::try_from(by.as_millis()).unwrap();
        self.0.fetch_add(ms, Ordering::Relaxed);
    }
}

#[tokio::test]
async fn happy_path_authorize_token_refresh_user_me() {
    let fake = start(FakeConfig::default()).await;
    let client = client();
    let (verifier, challenge) = pkce();

    let response = client
        .get(authorize_url(&fake, &challenge, &[]))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::FOUND);
    let location = response.headers()[header::LOCATION].to_str().unwrap();
    let location = Url::parse(location).unwrap();
    assert_eq!(location.path(), "/callback");
    let query: HashMap<_, _> = location.query_pairs().into_owned().collect();
    assert_eq!(
        query["keep"], "1",
        "existing redirect_uri parameters are kept"
    );
    assert_eq!(query["state"], "st-123");
    let code = &query["code"];
    assert!(code.starts_with("etc_"));

    let response = exchange(&client, &fake, code, &verifier).await;
    assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
    let (status, body) = json_of(response).await;
    assert_eq!(status, 200);
    let object = body.as_object().unwrap();
    let mut keys: Vec<_> = object.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["access_token", "expires_in", "refresh_token"]);
    assert_eq!(body["expires_in"], 7200);
    let access = body["access_token"].as_str().unwrap();
    let refresh_token = body["refresh_token"].as_str().unwrap();
    assert!(access.starts_with("eta_") && refresh_token.starts_with("etr_"));
    assert!(fake.access_token_is_valid(access));

    let me = client
        .get(fake.user_me_url())
        .bearer_auth(access)
        .send()
        .await
        .unwrap();
    let (status, body) = json_of(me).await;
    assert_eq!(status, 200);
    assert_eq!(
        body,
        json!({"teamId": "team-fake", "teams": [{"id": "team-fake"}]})
    );

    let (status, body) = json_of(refresh(&client, &fake, refresh_token).await).await;
    assert_eq!(status, 200);
    assert!(
        body.get("refresh_token").is_none(),
        "no rotation by default"
    );
    assert_eq!(body["expires_in"], 7200);
    let new_access = body["access_token"].as_str().unwrap();
    assert_ne!(new_access, access);
    assert_eq!(user_me(&client, &fake, new_access).await, 200);
    assert!(fake.refresh_token_is_valid(refresh_token));

    assert_eq!(user_me(&client, &fake, "eta_unknown").await, 401);
    let anonymous = client.get(fake.user_me_url()).send().await.unwrap();
    let (status, body) = json_of(anonymous).await;
    assert_eq!((status, body), (401, oauth_error_body("invalid_token")));

    assert_eq!(
        fake.stats(),
        FakeStats {
            authorize: 1,
            token_requests: 2,
            code_exchanges_ok: 1,
            refreshes_ok: 1,
            revokes: 0,
            refresh_token_reuses: 0,
            peak_token_concurrency: 1,
            trace_context_requests: 0,
        }
    );
}

/// `/v1/user/me` lists several teams with names, leaves `teamId` out, or fails (echoing the
/// token, as a careless proxy would) when told to, and counts every request.
#[tokio::test]
async fn user_me_gives_several_teams_and_fails_when_told() {
    let fake = start(FakeConfig::default()).await;
    let client = client();
    let (verifier, challenge) = pkce();
    let location = client
        .get(authorize_url(&fake, &challenge, &[]))
        .send()
        .await
        .unwrap();
    let location = Url::parse(location.headers()[header::LOCATION].to_str().unwrap()).unwrap();
    let query: HashMap<_, _> = location.query_pairs().into_owned().collect();
    let (_, body) = json_of(exchange(&client, &fake, &query["code"], &verifier).await).await;
    let access = body["access_token"].as_str().unwrap().to_owned();
    let me = async || {
        json_of(
            client
                .get(fake.user_me_url())
                .bearer_auth(&access)
                .send()
                .await
                .unwrap(),
        )
        .await
    };

    fake.set_teams(
        "t-2",
        vec![
            FakeTeam {
                id: "t-1".into(),
                name: Some("Acme EU".into()),
            },
            FakeTeam {
                id: "t-2".into(),
                name: None,
            },
        ],
    );
    assert_eq!(
        me().await,
        (
            200,
            json!({"teamId": "t-2", "teams": [{"id": "t-1", "name": "Acme EU"}, {"id": "t-2"}]})
        )
    );
    fake.set_user_me_fault(Some(UserMeFault::WithoutTeamId));
    let (status, body) = me().await;
    assert_eq!(status, 200);
    assert!(
        body.get("teamId").is_none() && body["teams"].is_array(),
        "{body}"
    );
    fake.set_user_me_fault(Some(UserMeFault::Status(503)));
    let (status, body) = me().await;
    assert_eq!(
        (status, body["token"].as_str()),
        (503, Some(access.as_str()))
    );
    fake.set_user_me_fault(None);
    assert_eq!(me().await.0, 200);
    assert_eq!(fake.user_me_requests(), 4);
}

#[tokio::test]
async fn a_seeded_grant_refreshes_like_an_exchanged_one() {
    let fake = start(FakeConfig::default()).await;
    let seeded = fake.seed_grant();
    assert!(seeded.starts_with("etr_") && fake.refresh_token_is_valid(&seeded));
    assert_ne!(fake.seed_grant(), seeded, "each seed is its own grant");
    let (status, body) = json_of(refresh(&client(), &fake, &seeded).await).await;
    assert_eq!(status, 200);
    assert!(fake.access_token_is_valid(body["access_token"].as_str().unwrap()));
    assert_eq!(fake.stats().refreshes_ok, 1);
}

/// EdgeTag's "roll secret": the old secret is refused from then on, the new one works, and the
/// grants made before stay valid.
#[tokio::test]
async fn a_rolled_client_secret_replaces_the_old_one_and_grants_stay() {
    let fake = start(FakeConfig::default()).await;
    let client = client();
    let grant = fake.seed_grant();
    let old = fake.client_secret();
    assert_eq!(old, FakeConfig::default().client_secret);
    let new = fake.roll_client_secret();
    assert_ne!(new, old);
    assert_eq!(fake.client_secret(), new);
    let fields = [
        ("grant_type", "refresh_token"),
        ("refresh_token", grant.as_str()),
    ];
    let with = |secret: String| {
        let (client, fake, id) = (&client, &fake, fake.client_id().to_owned());
        async move {
            let response = post_form(client, &fake.token_url(), Some((&id, &secret)), &fields)
                .await
                .unwrap();
            json_of(response).await
        }
    };
    assert_eq!(with(old).await, (401, oauth_error_body("invalid_client")));
    let (status, body) = with(new).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn refresh_rotation_replaces_the_refresh_token_when_enabled() {
    let fake = start(FakeConfig {
        rotate_refresh_tokens: true,
        ..FakeConfig::default()
    })
    .await;
    let client = client();
    let (code, verifier) = authorize(&fake).await;
    let (_, body) = json_of(exchange(&client, &fake, &code, &verifier).await).await;
    let first = body["refresh_token"].as_str().unwrap().to_owned();

    let (status, body) = json_of(refresh(&client, &fake, &first).await).await;
    assert_eq!(status, 200);
    let second = body["refresh_token"].as_str().unwrap();
    assert!(second.starts_with("etr_") && second != first);
    assert!(!fake.refresh_token_is_valid(&first));
    assert!(fake.refresh_token_is_valid(second));

    let (status, body) = json_of(refresh(&client, &fake, &first).await).await;
    assert_eq!((status, body), (400, oauth_error_body("invalid_grant")));
    let (status, _) = json_of(refresh(&client, &fake, second).await).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn reusing_a_rotated_refresh_token_revokes_the_grant_when_configured() {
    let fake = start(FakeConfig {
        rotate_refresh_tokens: true,
        revoke_grant_on_refresh_token_reuse: true,
        ..FakeConfig::default()
    })
    .await;
    let client = client();
    let (code, verifier) = authorize(&fake).await;
    let (_, body) = json_of(exchange(&client, &fake, &code, &verifier).await).await;
    let first = body["refresh_token"].as_str().unwrap().to_owned();
    let (status, body) = json_of(refresh(&client, &fake, &first).await).await;
    assert_eq!(status, 200);
    let second = body["refresh_token"].as_str().unwrap().to_owned();
    let access = body["access_token"].as_str().unwrap().to_owned();
    assert!(fake.refresh_token_is_valid(&second) && fake.access_token_is_valid(&access));
    assert_eq!(fake.stats().refresh_token_reuses, 0);

    // The replaced token comes back: refused, and the whole grant is gone.
    let (status, body) = json_of(refresh(&client, &fake, &first).await).await;
    assert_eq!((status, body), (400, oauth_error_body("invalid_grant")));
    assert_eq!(fake.stats().refresh_token_reuses, 1);
    assert!(
        !fake.refresh_token_is_valid(&second),
        "the current token died too"
    );
    assert!(!fake.access_token_is_valid(&access));
    assert_eq!(user_me(&client, &fake, &access).await, 401);
    let (status, _) = json_of(refresh(&client, &fake, &second).await).await;
    assert_eq!(status, 400);
    // A revoked (not replaced) or unknown token is refused without counting as a reuse.
    let (status, _) = json_of(refresh(&client, &fake, "etr_unknown").await).await;
    assert_eq!(status, 400);
    assert_eq!(fake.stats().refresh_token_reuses, 1);
    assert_eq!(fake.stats().refreshes_ok, 1);
}

#[tokio::test]
async fn client_authentication_is_required_and_checked() {
    let fake = start(FakeConfig::default()).await;
    let client = client();
    let (code, verifier) = authorize(&fake).await;
    let fields = [
        ("grant_type", "authorization_code"),
        ("code", code.as_str()),
        ("code_verifier", verifier.as_str()),
    ];
    let id = fake.client_id().to_owned();
    let secret = fake.client_secret();
    for auth in [
        None,
        Some((id.as_str(), "wrong-secret")),
        Some((id.as_str(), "")),
        Some(("other-client", secret.as_str())),
    ] {
        let response = post_form(&client, &fake.token_url(), auth, &fields)
            .await
            .unwrap();
        assert!(response.headers().contains_key(header::WWW_AUTHENTICATE));
        let (status, body) = json_of(response).await;
        assert_eq!(
            (status, body),
            (401, oauth_error_body("invalid_client")),
            "{auth:?}"
        );
    }
    // Rejected client authentication does not burn the code.
    let (status, _) = json_of(exchange(&client, &fake, &code, &verifier).await).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn wrong_verifier_is_invalid_grant_and_burns_the_code() {
    let fake = start(FakeConfig::default()).await;
    let client = client();
    let (code, verifier) = authorize(&fake).await;
    let (other_verifier, _) = pkce();
    for bad in [other_verifier.as_str(), "short", &"a".repeat(129)] {
        let (code, _) = authorize(&fake).await;
        let (status, body) = json_of(exchange(&client, &fake, &code, bad).await).await;
        assert_eq!((status, body), (400, oauth_error_body("invalid_grant")));
    }
    let (status, _) = json_of(exchange(&client, &fake, &code, &other_verifier).await).await;
    assert_eq!(status, 400);
    let (status, body) = json_of(exchange(&client, &fake, &code, &verifier).await).await;
    assert_eq!((status, body), (400, oauth_error_body("invalid_grant")));
    assert_eq!(fake.stats().code_exchanges_ok, 0);
}

#[tokio::test]
async fn a_code_works_once() {
    let fake = start(FakeConfig::default()).await;
    let client = client();
    let (code, verifier) = authorize(&fake).await;
    let (status, _) = json_of(exchange(&client, &fake, &code, &verifier).await).await;
    assert_eq!(status, 200);
    let (status, body) = json_of(exchange(&client, &fake, &code, &verifier).await).await;
    assert_eq!((status, body), (400, oauth_error_body("invalid_grant")));
    let (status, body) = json_of(exchange(&client, &fake, "etc_unknown", &verifier).await).await;
    assert_eq!((status, body), (400, oauth_error_body("invalid_grant")));
}

#[tokio::test]
async fn unknown_or_repeated_body_fields_are_invalid_request() {
    let fake = start(FakeConfig::default()).await;
    let client = client();
    let (code, verifier) = authorize(&fake).await;
    let base = [
        ("grant_type", "authorization_code"),
        ("code", code.as_str()),
        ("code_verifier", verifier.as_str()),
    ];
    for extra in [
        ("client_id", fake.client_id()),
        ("redirect_uri", REDIRECT_URI),
        ("scope", "full"),
        ("code", code.as_str()),
    ] {
        let mut fields = base.to_vec();
        fields.push(extra);
        let (status, body) = json_of(token(&client, &fake, &fields).await.unwrap()).await;
        assert_eq!(
            (status, body),
            (400, oauth_error_body("invalid_request")),
            "{extra:?}"
        );
    }
    let (status, body) = json_of(
        token(&client, &fake, &[("grant_type", "authorization_code")])
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((status, body), (400, oauth_error_body("invalid_request")));
    let (status, body) = json_of(token(&client, &fake, &[]).await.unwrap()).await;
    assert_eq!((status, body), (400, oauth_error_body("invalid_request")));
    let refresh_with_scope = [
        ("grant_type", "refresh_token"),
        ("refresh_token", "etr_x"),
        ("scope", "full"),
    ];
    let (status, body) = json_of(token(&client, &fake, &refresh_with_scope).await.unwrap()).await;
    assert_eq!((status, body), (400, oauth_error_body("invalid_request")));

    // None of that burnt the code.
    let (status, _) = json_of(exchange(&client, &fake, &code, &verifier).await).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn redirect_uri_in_body_is_accepted_only_when_configured_and_must_match() {
    let fake = start(FakeConfig {
        accept_redirect_uri_in_body: true,
        ..FakeConfig::default()
    })
    .await;
    let client = client();
    for (redirect_uri, expected) in [(REDIRECT_URI, 200), ("http://127.0.0.1:9/other", 400)] {
        let (code, verifier) = authorize(&fake).await;
        let fields = [
            ("grant_type", "authorization_code"),
            ("code", code.as_str()),
            ("code_verifier", verifier.as_str()),
            ("redirect_uri", redirect_uri),
        ];
        let (status, body) = json_of(token(&client, &fake, &fields).await.unwrap()).await;
        assert_eq!(status, expected, "{body}");
        if expected == 400 {
            assert_eq!(body, oauth_error_body("invalid_grant"));
        }
    }
}

#[tokio::test]
async fn wrong_content_type_is_invalid_request() {
    let fake = start(FakeConfig::default()).await;
    let response = client()
        .post(fake.token_url())
        .basic_auth(fake.client_id(), Some(fake.client_secret()))
        .header(header::CONTENT_TYPE, "application/json")
        .body(r#"{"grant_type":"refresh_token","refresh_token":"etr_x"}"#)
        .send()
        .await
        .unwrap();
    let (status, body) = json_of(response).await;
    assert_eq!((status, body), (400, oauth_error_body("invalid_request")));
}

#[tokio::test]
async fn unknown_grant_type_is_unsupported() {
    let fake = start(FakeConfig::default()).await;
    let fields = [("grant_type", "client_credentials")];
    let (status, body) = json_of(token(&client(), &fake, &fields).await.unwrap()).await;
    assert_eq!(
        (status, body),
        (400, oauth_error_body("unsupported_grant_type"))
    );
}

#[tokio::test]
async fn codes_expire_after_ten_minutes_by_the_clock() {
    let clock = ManualClock::default();
    let fake = start(FakeConfig {
        clock: clock.fake_clock(),
        ..FakeConfig::default()
    })
    .await;
    let client = client();
    let (fresh_code, fresh_verifier) = authorize(&fake).await;
    let (stale_code, stale_verifier) = authorize(&fake).await;
    clock.advance(CODE_LIFETIME - Duration::from_secs(5));
    let (status, _) = json_of(exchange(&client, &fake, &fresh_code, &fresh_verifier).await).await;
    assert_eq!(status, 200);
    clock.advance(Duration::from_secs(5));
    let (status, body) =
        json_of(exchange(&client, &fake, &stale_code, &stale_verifier).await).await;
    assert_eq!((status, body), (400, oauth_error_body("invalid_grant")));
}

#[tokio::test]
async fn access_tokens_expire_by_the_clock() {
    let clock = ManualClock::default();
    let fake = start(FakeConfig {
        clock: clock.fake_clock(),
        access_token_lifetime: Duration::from_secs(60),
        ..FakeConfig::default()
    })
    .await;
    let client = client();
    let (code, verifier) = authorize(&fake).await;
    let (_, body) = json_of(exchange(&client, &fake, &code, &verifier).await).await;
    assert_eq!(body["expires_in"], 60);
    let access = body["access_token"].as_str().unwrap();
    let refresh_token = body["refresh_token"].as_str().unwrap();
    assert_eq!(user_me(&client, &fake, access).await, 200);
    clock.advance(Duration::from_secs(60));
    assert_eq!(user_me(&client, &fake, access).await, 401);
    assert!(!fake.access_token_is_valid(access));
    // The refresh token outlives the access token.
    let (status, _) = json_of(refresh(&client, &fake, refresh_token).await).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn revoking_an_access_token_revokes_the_whole_grant() {
    let fake = start(FakeConfig::default()).await;
    let client = client();
    let (code, verifier) = authorize(&fake).await;
    let (_, body) = json_of(exchange(&client, &fake, &code, &verifier).await).await;
    let access = body["access_token"].as_str().unwrap();
    let refresh_token = body["refresh_token"].as_str().unwrap();
    let (_, body) = json_of(refresh(&client, &fake, refresh_token).await).await;
    let second_access = body["access_token"].as_str().unwrap();
    // An unrelated grant is untouched.
    let (other_code, other_verifier) = authorize(&fake).await;
    let (_, other) = json_of(exchange(&client, &fake, &other_code, &other_verifier).await).await;

    let secret = fake.client_secret();
    let auth = Some((fake.client_id(), secret.as_str()));
    let revoke = [("token", access), ("token_type_hint", "access_token")];
    let response = post_form(&client, &fake.revoke_url(), auth, &revoke)
        .await
        .unwrap();
    assert_eq!(json_of(response).await, (200, json!({})));

    assert_eq!(user_me(&client, &fake, access).await, 401);
    assert_eq!(user_me(&client, &fake, second_access).await, 401);
    assert!(!fake.refresh_token_is_valid(refresh_token));
    let (status, body) = json_of(refresh(&client, &fake, refresh_token).await).await;
    assert_eq!((status, body), (400, oauth_error_body("invalid_grant")));
    assert!(fake.access_token_is_valid(other["access_token"].as_str().unwrap()));

    // RFC 7009: unknown tokens get 200 too; client authentication is still required.
    let unknown = [
        ("token", "eta_unknown"),
        ("token_type_hint", "access_token"),
    ];
    let response = post_form(&client, &fake.revoke_url(), auth, &unknown)
        .await
        .unwrap();
    assert_eq!(json_of(response).await, (200, json!({})));
    let response = post_form(&client, &fake.revoke_url(), None, &unknown)
        .await
        .unwrap();
    assert_eq!(
        json_of(response).await,
        (401, oauth_error_body("invalid_client"))
    );
    let extra = [("token", "eta_unknown"), ("client_id", fake.client_id())];
    let response = post_form(&client, &fake.revoke_url(), auth, &extra)
        .await
        .unwrap();
    assert_eq!(
        json_of(response).await,
        (400, oauth_error_body("invalid_request"))
    );
    assert_eq!(fake.stats().revokes, 2);
}

#[tokio::test]
async fn revoke_all_refresh_tokens_makes_the_next_refresh_fail() {
    let fake = start(FakeConfig::default()).await;
    let client = client();
    let (code, verifier) = authorize(&fake).await;
    let (_, body) = json_of(exchange(&client, &fake, &code, &verifier).await).await;
    let access = body["access_token"].as_str().unwrap();
    let refresh_token = body["refresh_token"].as_str().unwrap();
    fake.revoke_all_refresh_tokens();
    let (status, body) = json_of(refresh(&client, &fake, refresh_token).await).await;
    assert_eq!((status, body), (400, oauth_error_body("invalid_grant")));
    assert!(fake.access_token_is_valid(access));
}

#[tokio::test]
async fn authorize_rejects_bad_requests_with_an_html_page() {
    let fake = start(FakeConfig {
        redirect_uris: vec![REDIRECT_URI.to_owned()],
        ..FakeConfig::default()
    })
    .await;
    let client = client();
    let (_, challenge) = pkce();
    let cases: &[(&[(&str, &str)], &str)] = &[
        (&[("client_id", "someone-else")], "client_id"),
        (&[("client_id", "")], "client_id"),
        (
            &[("redirect_uri", "http://127.0.0.1:9/elsewhere")],
            "redirect_uri",
        ),
        (&[("response_type", "token")], "response_type"),
        (&[("scope", "read")], "scope"),
        (&[("state", "")], "state"),
        (&[("code_challenge", "")], "code_challenge"),
        (&[("code_challenge", "tooshort")], "code_challenge"),
        (
            &[("code_challenge_method", "plain")],
            "code_challenge_method",
        ),
    ];
    for (overrides, problem) in cases {
        let url = authorize_url(&fake, &challenge, overrides);
        let response = client.get(&url).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{overrides:?}");
        assert!(
            response.headers()[header::CONTENT_TYPE]
                .to_str()
                .unwrap()
                .starts_with("text/html")
        );
        let page = response.text().await.unwrap();
        assert!(page.contains(problem), "{overrides:?}: {page}");
        let err = fake.approve(&url).await.unwrap_err();
        assert!(err.contains(problem), "{overrides:?}: {err}");
    }
    assert_eq!(fake.stats().authorize, 2 * cases.len() as u64);
    assert!(
        fake.approve(&authorize_url(&fake, &challenge, &[]))
            .await
            .is_ok()
    );
    let elsewhere = authorize_url(&fake, &challenge, &[]).replace(AUTHORIZE_PATH, "/login");
    assert!(fake.approve(&elsewhere).await.is_err());
}

#[tokio::test]
async fn the_authorize_error_page_escapes_what_the_request_sent() {
    let fake = start(FakeConfig::default()).await;
    let (_, challenge) = pkce();
    let hostile = r#"<script>alert("x&'y")</script>"#;
    let url = authorize_url(&fake, &challenge, &[("client_id", hostile)]);
    let response = client().get(&url).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let page = response.text().await.unwrap();
    assert!(!page.contains("<script>"), "{page}");
    assert!(
        page.contains(r#"&lt;script&gt;alert(\&quot;x&amp;&#39;y\&quot;)&lt;/script&gt;"#),
        "{page}"
    );
}

#[tokio::test]
async fn without_registered_uris_any_absolute_http_redirect_is_accepted() {
    let fake = start(FakeConfig::default()).await;
    let (_, challenge) = pkce();
    for ok in ["https://example.test/cb", "http://localhost:1234/"] {
        let url = authorize_url(&fake, &challenge, &[("redirect_uri", ok)]);
        let redirect = fake.approve(&url).await.unwrap();
        assert!(redirect.location.starts_with(ok), "{redirect:?}");
        assert_eq!(redirect.state, "st-123");
    }
    for bad in [
        "/relative",
        "ftp://example.test/",
        "http://example.test/#frag",
    ] {
        let url = authorize_url(&fake, &challenge, &[("redirect_uri", bad)]);
        assert!(fake.approve(&url).await.is_err(), "{bad}");
    }
}

/// What a client observed from one token request.
#[derive(Debug, PartialEq)]
struct Observed {
    status: u16,
    content_type: Option<String>,
    retry_after: Option<String>,
    body: String,
}

async fn observe(client: &reqwest::Client, fake: &FakeEdgeTag) -> reqwest::Result<Observed> {
    // A request that would be refused (no client auth): faults answer before any check.
    let response = post_form(client, &fake.token_url(), None, &[("grant_type", "x")]).await?;
    let header = |name| {
        response
            .headers()
            .get(name)
            .map(|v: &HeaderValue| v.to_str().unwrap().to_owned())
    };
    Ok(Observed {
        status: response.status().as_u16(),
        content_type: header(header::CONTENT_TYPE),
        retry_after: header(header::RETRY_AFTER),
        body: response.text().await?,
    })
}

#[tokio::test]
async fn canned_faults_answer_one_request_each_in_order() {
    let fake = start(FakeConfig::default()).await;
    let client = client();
    let faults = [
        Fault::Status(502),
        Fault::Status(1000),
        Fault::ServerError,
        Fault::ServiceUnavailable,
        Fault::TooManyRequests {
            retry_after_secs: 7,
        },
        Fault::MalformedJson,
        Fault::HtmlPage,
        Fault::EmptyBody,
        Fault::ErrorIn200,
        Fault::InvalidGrant,
        Fault::InvalidClient,
        Fault::InvalidGrantAs401,
    ];
    fake.push_faults(faults.clone());
    let mut seen = Vec::new();
    for _ in &faults {
        seen.push(observe(&client, &fake).await.unwrap());
    }
    let html = Some("text/html; charset=utf-8".to_owned());
    let json = Some("application/json".to_owned());
    let statuses: Vec<u16> = seen.iter().map(|o| o.status).collect();
    assert_eq!(
        statuses,
        [502, 500, 500, 503, 429, 200, 200, 200, 200, 400, 401, 401]
    );
    assert_eq!(seen[0].body, "");
    assert!(seen[2].body.contains("Internal Server Error") && seen[2].content_type == html);
    assert!(seen[3].body.contains("Service Unavailable") && seen[3].content_type == html);
    assert_eq!(seen[4].retry_after.as_deref(), Some("7"));
    assert_eq!(
        (&seen[5].body[..], &seen[5].content_type),
        (r#"{"access_token": "#, &json)
    );
    assert!(serde_json::from_str::<serde_json::Value>(&seen[5].body).is_err());
    assert!(seen[6].body.contains("<html>") && seen[6].content_type == html);
    assert_eq!(seen[7].body, "");
    assert_eq!(seen[8].body, r#"{"error":"server_error"}"#);
    assert_eq!(seen[9].body, r#"{"error":"invalid_grant"}"#);
    assert_eq!(seen[10].body, r#"{"error":"invalid_client"}"#);
    assert_eq!(seen[11].body, r#"{"error":"invalid_grant"}"#);

    // The queue is empty again: the request is judged on its merits.
    let after = observe(&client, &fake).await.unwrap();
    assert_eq!(
        (after.status, &after.body[..]),
        (401, r#"{"error":"invalid_client"}"#)
    );
    assert_eq!(fake.stats().token_requests, faults.len() as u64 + 1);
}

#[tokio::test]
async fn a_persistent_fault_answers_until_cleared_and_queued_faults_go_first() {
    let fake = start(FakeConfig::default()).await;
    let client = client();
    fake.set_persistent_fault(Some(Fault::ServiceUnavailable));
    fake.push_faults([Fault::Status(418)]);
    assert_eq!(observe(&client, &fake).await.unwrap().status, 418);
    for _ in 0..3 {
        assert_eq!(observe(&client, &fake).await.unwrap().status, 503);
    }
    fake.set_persistent_fault(None);
    assert_eq!(observe(&client, &fake).await.unwrap().status, 401);
    fake.push_faults([Fault::Status(500), Fault::Status(500)]);
    fake.clear_faults();
    assert_eq!(observe(&client, &fake).await.unwrap().status, 401);
}

#[tokio::test]
async fn shape_faults_issue_real_tokens() {
    let fake = start(FakeConfig::default()).await;
    let client = client();

    fake.push_faults([Fault::MissingExpiresIn]);
    let (code, verifier) = authorize(&fake).await;
    let (status, body) = json_of(exchange(&client, &fake, &code, &verifier).await).await;
    assert_eq!(status, 200);
    assert!(body.get("expires_in").is_none(), "{body}");
    assert!(fake.access_token_is_valid(body["access_token"].as_str().unwrap()));
    let refresh_token = body["refresh_token"].as_str().unwrap();

    fake.push_faults([Fault::ExpiresInAsString]);
    let (status, body) = json_of(refresh(&client, &fake, refresh_token).await).await;
    assert_eq!(status, 200);
    assert_eq!(body["expires_in"], json!("7200"));
    assert!(fake.access_token_is_valid(body["access_token"].as_str().unwrap()));

    fake.push_faults([Fault::Delay(Duration::from_millis(50))]);
    let started = std::time::Instant::now();
    let (status, _) = json_of(refresh(&client, &fake, refresh_token).await).await;
    assert_eq!(status, 200);
    assert!(started.elapsed() >= Duration::from_millis(50));

    // A shape fault does not turn a refused request into a success.
    fake.push_faults([Fault::MissingExpiresIn]);
    let (status, body) = json_of(refresh(&client, &fake, "etr_unknown").await).await;
    assert_eq!((status, body), (400, oauth_error_body("invalid_grant")));
    assert_eq!(fake.stats().refreshes_ok, 2);
}

#[tokio::test]
async fn hang_never_answers() {
    let fake = start(FakeConfig::default()).await;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    fake.push_faults([Fault::Hang]);
    let err = observe(&client, &fake).await.unwrap_err();
    assert!(err.is_timeout(), "{err:?}");
    // The next request is answered normally.
    assert_eq!(observe(&client, &fake).await.unwrap().status, 401);
}

#[tokio::test]
async fn drop_connection_closes_the_socket_without_a_response() {
    let fake = start(FakeConfig::default()).await;
    let client = client();

    fake.push_faults([Fault::DropConnection]);
    let err = observe(&client, &fake).await.unwrap_err();
    assert!(!err.is_timeout() && err.status().is_none(), "{err:?}");
    assert_eq!(observe(&client, &fake).await.unwrap().status, 401);

    // On the wire: not a single byte comes back before the close.
    fake.push_faults([Fault::DropConnection]);
    let mut socket = TcpStream::connect(fake.addr()).await.unwrap();
    let request = format!(
        "POST {TOKEN_PATH} HTTP/1.1\r\nHost: {}\r\nContent-Type: \
         application/x-www-form-urlencoded\r\nContent-Length: 12\r\n\r\ngrant_type=x",
        fake.addr()
    );
    socket.write_all(request.as_bytes()).await.unwrap();
    let mut received = Vec::new();
    // A reset instead of a clean close is fine too; either way nothing was sent.
    let _ = socket.read_to_end(&mut received).await;
    assert!(
        received.is_empty(),
        "{:?}",
        String::from_utf8_lossy(&received)
    );
    assert_eq!(fake.stats().token_requests, 3);
}

#[tokio::test]
async fn peak_concurrency_counts_simultaneous_token_requests() {
    let fake = start(FakeConfig::default()).await;
    let client = client();
    fake.set_token_delay(Duration::from_secs(1));
    let requests = (0..20).map(|_| observe(&client, &fake));
    let results = futures::future::join_all(requests).await;
    assert!(results.iter().all(|r| r.as_ref().unwrap().status == 401));
    let stats = fake.stats();
    assert_eq!(
        (stats.token_requests, stats.peak_token_concurrency),
        (20, 20)
    );
    assert_eq!(fake.token_requests_in_flight(), 0);

    fake.reset_peak();
    assert_eq!(fake.stats().peak_token_concurrency, 0);
    fake.set_token_delay(Duration::ZERO);
    observe(&client, &fake).await.unwrap();
    assert_eq!(fake.stats().peak_token_concurrency, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thousands_of_concurrent_refreshes_all_succeed() {
    let fake = start(FakeConfig::default()).await;
    let client = client();
    let (code, verifier) = authorize(&fake).await;
    let (_, body) = json_of(exchange(&client, &fake, &code, &verifier).await).await;
    let refresh_token = body["refresh_token"].as_str().unwrap();
    fake.set_token_delay(Duration::from_millis(200));
    let requests = (0..2000).map(|_| refresh(&client, &fake, refresh_token));
    let responses = futures::future::join_all(requests).await;
    assert!(responses.iter().all(|r| r.status() == StatusCode::OK));
    let stats = fake.stats();
    assert_eq!(stats.refreshes_ok, 2000);
    assert!(stats.peak_token_concurrency > 100, "{stats:?}");
}

#[tokio::test]
async fn dropping_the_fake_closes_pooled_connections() {
    let fake = start(FakeConfig::default()).await;
    let client = client();
    let url = fake.user_me_url();
    let response = client.get(&url).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    drop(fake);
    assert!(client.get(&url).send().await.is_err());
}
