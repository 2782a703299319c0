//! The EdgeTag team each grant reaches (EDGETAG.md §5: every API call wants `Team-Id`): learned
//! from `/v1/user/me` right after CompleteAuth stored the grant, served with every token, listed
//! for operators, put on requests by the client crate's `AuthorizationLayer`; learned later by the
//! scheduler when EdgeTag did not say at connection; asked again daily, not on each refresh;
//! shared by replicas on PostgreSQL.

use std::{
    future::{Future, poll_fn},
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use axum::{
    Router,
    http::{self, HeaderMap},
    routing::get,
};
use credential_client::{AuthorizationLayer, TEAM_ID_HEADER};
use credential_service::{
    broker::{BrokerConfig, RefreshPolicy, TEAM_RECHECK},
    proto::{
        AccountEvent, AccountEventKind, Team, WatchAccountsRequest, WatchTokenRequest,
        WatchTokenResponse,
    },
};
use fake_edgetag::{FAKE_TEAM_ID, FakeTeam, UserMeFault};
use tonic::Streaming;
use tower::{Layer, Service};

use crate::common::{self, HOUR, MINUTE, Options, StoreKind, TestApp};

/// Bound on every wait for something that normally takes milliseconds.
const PATIENCE: Duration = Duration::from_secs(10);

fn two_teams() -> Vec<FakeTeam> {
    vec![
        FakeTeam {
            id: "t-eu".into(),
            name: Some("Acme EU".into()),
        },
        FakeTeam {
            id: "t-us".into(),
            name: None,
        },
    ]
}

/// Polls `probe` until it gives a value, failing the test after [`PATIENCE`].
async fn until<T>(what: &str, mut probe: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "{what} did not happen within {PATIENCE:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn next<T>(stream: &mut Streaming<T>) -> T {
    tokio::time::timeout(PATIENCE, stream.message())
        .await
        .expect("the stream says something")
        .expect("no error")
        .expect("the stream goes on")
}

/// A loopback HTTP server standing in for EdgeTag's API: it answers 200 and keeps the headers of
/// the last request.
async fn api_stand_in() -> (String, Arc<Mutex<Option<HeaderMap>>>) {
    let seen = Arc::new(Mutex::new(None));
    let keep = seen.clone();
    let router = Router::new().route(
        "/v1/workspace",
        get(move |headers: HeaderMap| async move {
            *keep.lock().unwrap() = Some(headers);
            "ok"
        }),
    );
    let listener = tokio::net::TcpListener::bind(common::LOOPBACK_ANY_PORT)
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    (format!("http://{addr}/v1/workspace"), seen)
}

/// A real HTTP client as a tower service: what a caller wraps in `AuthorizationLayer`.
#[derive(Clone)]
struct Http(reqwest::Client);

impl Service<http::Request<String>> for Http {
    type Response = reqwest::Response;
    type Error = reqwest::Error;
    type Future = Pin<Box<dyn Future<Output = Result<reqwest::Response, reqwest::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), reqwest::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<String>) -> Self::Future {
        let client = self.0.clone();
        Box::pin(async move { client.execute(reqwest::Request::try_from(request)?).await })
    }
}

#[tokio::test]
async fn a_connected_account_serves_its_team_and_the_layer_sends_it() {
    let app = TestApp::spawn().await;
    app.fake.set_teams("t-us", two_teams());
    app.connect("acme").await;

    let token = app.get_token("acme").await.unwrap();
    assert_eq!(token.team_id, "t-us");
    let info = app.describe("acme").await.unwrap();
    assert_eq!(info.team_id, "t-us");
    assert_eq!(
        info.teams,
        [
            Team {
                id: "t-eu".into(),
                name: "Acme EU".into()
            },
            Team {
                id: "t-us".into(),
                name: String::new()
            },
        ]
    );
    assert_eq!(app.fake.user_me_requests(), 1, "asked once, at connection");

    // A caller of EdgeTag's API, through the client crate's layer, over real HTTP.
    let (url, seen) = api_stand_in().await;
    let client = credential_client::Client::builder(format!("http://{}", app.addr))
        .build()
        .unwrap();
    let mut caller =
        AuthorizationLayer::new(client.token_source("acme")).layer(Http(reqwest::Client::new()));
    poll_fn(|cx| caller.poll_ready(cx)).await.unwrap();
    let request = http::Request::get(&url).body(String::new()).unwrap();
    let response = caller.call(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let headers = seen.lock().unwrap().take().expect("the request arrived");
    assert_eq!(headers[TEAM_ID_HEADER], "t-us");
    assert_eq!(
        headers[http::header::AUTHORIZATION],
        format!("Bearer {}", token.access_token).as_str()
    );
}

#[tokio::test]
async fn a_team_edgetag_did_not_give_at_connection_is_learned_later_and_pushed() {
    // The scheduler scans every 50 ms; a failed lookup waits 100 ms, doubling up to 400 ms; other
    // replicas' grace for a new grant is three request timeouts (1.5 s).
    let app = TestApp::spawn_with(Options {
        request_timeout: Duration::from_millis(500),
        broker: BrokerConfig {
            refresh: RefreshPolicy {
                scan_interval: Duration::from_millis(50),
                backoff_base: Duration::from_millis(100),
                backoff_max: Duration::from_millis(400),
                ..common::test_policy()
            },
            ..BrokerConfig::default()
        },
        ..Options::default()
    })
    .await;
    app.fake.set_user_me_fault(Some(UserMeFault::Status(503)));
    let connected = app.connect("acme").await;
    assert_eq!(
        connected.account, "acme",
        "CompleteAuth succeeds all the same"
    );
    let token = app.get_token("acme").await.unwrap();
    assert_eq!(token.team_id, "", "served, with the team not known yet");
    assert!(app.fake.access_token_is_valid(&token.access_token));
    assert_eq!(app.describe("acme").await.unwrap().team_id, "");

    let mut tokens = app
        .client
        .clone()
        .watch_token(WatchTokenRequest {
            account: "acme".into(),
            min_validity: None,
        })
        .await
        .unwrap()
        .into_inner();
    let first: WatchTokenResponse = next(&mut tokens).await;
    assert_eq!(first.team_id, "");
    let mut events = app
        .client
        .clone()
        .watch_accounts(WatchAccountsRequest {})
        .await
        .unwrap()
        .into_inner();
    let snapshot: AccountEvent = next(&mut events).await;
    assert_eq!(snapshot.kind(), AccountEventKind::Snapshot);
    assert_eq!(snapshot.info.unwrap().team_id, "");

    // The scheduler keeps asking, with back-off; a 401 or an answer without teamId teaches it
    // nothing either.
    for (fault, what) in [
        (
            UserMeFault::Status(503),
            "two more lookups while EdgeTag is down",
        ),
        (UserMeFault::Status(401), "two lookups answered 401"),
        (
            UserMeFault::WithoutTeamId,
            "two lookups answered without teamId",
        ),
    ] {
        app.fake.set_user_me_fault(Some(fault));
        let asked = app.fake.user_me_requests();
        until(what, async || {
            (app.fake.user_me_requests() >= asked + 2).then_some(())
        })
        .await;
        assert_eq!(app.get_token("acme").await.unwrap().team_id, "");
    }

    // EdgeTag answers again: nobody acts, the team appears everywhere.
    app.fake.set_teams(FAKE_TEAM_ID, two_teams());
    app.fake.set_user_me_fault(None);
    let pushed = next(&mut tokens).await;
    assert_eq!(pushed.team_id, FAKE_TEAM_ID);
    assert_eq!(pushed.access_token, first.access_token, "the same token");
    let event = next(&mut events).await;
    assert_eq!(
        (event.kind(), event.account.as_str()),
        (AccountEventKind::TeamChanged, "acme")
    );
    let info = event.info.unwrap();
    assert_eq!(info.team_id, FAKE_TEAM_ID);
    assert_eq!(info.teams.len(), 3, "the listed two and the current one");
    assert_eq!(app.get_token("acme").await.unwrap().team_id, FAKE_TEAM_ID);
}

#[tokio::test]
async fn the_team_is_asked_again_daily_not_on_each_refresh() {
    // The scheduler scans only when the test asks (common::test_policy).
    let app = TestApp::spawn().await;
    app.connect("acme").await;
    let mut events = app
        .client
        .clone()
        .watch_accounts(WatchAccountsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next(&mut events).await.info.unwrap().team_id, FAKE_TEAM_ID);
    for _ in 0..3 {
        app.refresh("acme").await.unwrap();
        assert_eq!(next(&mut events).await.kind(), AccountEventKind::Refreshed);
    }
    app.clock.advance(HOUR);
    assert_eq!(app.broker.learn_teams_due().await, 0);
    assert_eq!(app.fake.user_me_requests(), 1, "not on refreshes");

    // A day later EdgeTag lists another team: asked once (after the token's own refresh).
    app.fake.set_teams("t-us", two_teams());
    app.clock.advance(TEAM_RECHECK);
    app.refresh("acme").await.unwrap();
    assert_eq!(next(&mut events).await.kind(), AccountEventKind::Refreshed);
    assert_eq!(app.broker.learn_teams_due().await, 1);
    let changed = next(&mut events).await;
    assert_eq!(changed.kind(), AccountEventKind::TeamChanged);
    assert_eq!(changed.info.unwrap().team_id, "t-us");
    assert_eq!(app.get_token("acme").await.unwrap().team_id, "t-us");
    assert_eq!(app.fake.user_me_requests(), 2);
    assert_eq!(app.broker.learn_teams_due().await, 0, "not again today");
    app.clock.advance(MINUTE);
    assert_eq!(app.broker.learn_teams_due().await, 0);
}

#[tokio::test]
async fn on_postgresql_a_team_learned_on_one_replica_is_served_by_another() {
    common::STORE
        .scope(StoreKind::Postgres, async {
            let one = TestApp::spawn().await;
            // This replica cannot reach /v1/user/me: the team it serves, it read from the database.
            let other = TestApp::start(
                one.fake.clone(),
                one.clock.clone(),
                one.data_dir.clone(), // the same data directory: the same database
                Options {
                    user_info_url: Some("http://127.0.0.1:9/v1/user/me".parse().unwrap()),
                    ..one.options.clone()
                },
            )
            .await;
            one.fake.set_user_me_fault(Some(UserMeFault::Status(502)));
            one.connect("acme").await;
            let served = until("the other replica serves the account", async || {
                other.get_token("acme").await.ok()
            })
            .await;
            assert_eq!(served.team_id, "");

            one.fake.set_teams("t-us", two_teams());
            one.fake.set_user_me_fault(None);
            one.clock.advance(10 * MINUTE); // past the failed lookup's back-off
            assert_eq!(one.broker.learn_teams_due().await, 1);
            let served = until("the other replica serves the team", async || {
                let token = other.get_token("acme").await.unwrap();
                (token.team_id == "t-us").then_some(token)
            })
            .await;
            assert_eq!(
                served.access_token,
                one.get_token("acme").await.unwrap().access_token
            );
            let info = other.describe("acme").await.unwrap();
            assert_eq!(info.teams.len(), 2);
            assert_eq!(one.fake.user_me_requests(), 2, "one failed, one answered");
        })
        .await;
}
