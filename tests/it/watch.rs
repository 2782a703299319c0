//! WatchToken against the real server and the strict fake: the first message is GetToken's answer,
//! then one message per published token whatever published it, latest-value delivery to a
//! watcher that lags, the statuses that end a stream, shutdown, and the caller checks.

use crate::common;

use std::time::Duration;

use common::{Client, HOUR, Options, StoreKind, TestApp, assert_status};
use credential_service::{
    config::Limits,
    proto::{WatchTokenRequest, WatchTokenResponse},
};
use fake_edgetag::Fault;
use futures::StreamExt;
use secrecy::ExposeSecret;
use tonic::{Code, Status, Streaming};

async fn watch(client: &Client, account: &str) -> Result<Streaming<WatchTokenResponse>, Status> {
    client
        .clone()
        .watch_token(WatchTokenRequest {
            account: account.into(),
            min_validity: None,
        })
        .await
        .map(tonic::Response::into_inner)
}

/// The stream's next message, or the status that ended it; fails the test after 10 s of silence.
async fn next(stream: &mut Streaming<WatchTokenResponse>) -> Result<WatchTokenResponse, Status> {
    tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("the stream says something within 10 s")
        .and_then(|m| m.ok_or_else(|| Status::unknown("the stream ended without a status")))
}

/// Past the scheduler's due time of a fresh two-hour token (80% of its life, less jitter), and
/// short of the refresh margin (its last five minutes).
const DUE: Duration = Duration::from_secs(112 * 60);

async fn current(app: &TestApp, account: &str) -> String {
    app.get_token(account).await.unwrap().access_token
}

#[tokio::test]
async fn every_publish_reaches_the_watcher_whoever_made_it() {
    let app = TestApp::spawn().await;
    app.connect("acme").await;
    let mut stream = watch(&app.client, "acme").await.unwrap();

    // At once: what GetToken answers.
    let first = next(&mut stream).await.unwrap();
    assert_eq!(first.access_token, current(&app, "acme").await);
    assert_eq!(first.token_type, "Bearer");
    assert!(app.seconds_left(first.expires_at) > 0);

    // An operator's RefreshToken.
    app.refresh("acme").await.unwrap();
    let pushed = next(&mut stream).await.unwrap();
    assert_ne!(pushed.access_token, first.access_token);
    assert_eq!(pushed.access_token, current(&app, "acme").await);

    // The scheduler, once the token is due.
    app.clock.advance(DUE);
    assert_eq!(app.broker.refresh_due().await, 1);
    let scheduled = next(&mut stream).await.unwrap();
    assert_ne!(scheduled.access_token, pushed.access_token);
    assert_eq!(scheduled.access_token, current(&app, "acme").await);
    assert!(app.fake.access_token_is_valid(&scheduled.access_token));

    // A caller's own refresh: the token it got is the one pushed.
    app.clock.advance(2 * HOUR);
    let caller_got = current(&app, "acme").await;
    assert_ne!(caller_got, scheduled.access_token);
    assert_eq!(next(&mut stream).await.unwrap().access_token, caller_got);

    // A new CompleteAuth for the account.
    app.connect("acme").await;
    let reconnected = next(&mut stream).await.unwrap();
    assert_ne!(reconnected.access_token, caller_got);
    assert_eq!(reconnected.access_token, current(&app, "acme").await);
}

#[tokio::test]
async fn a_watcher_that_lags_gets_the_newest_token_not_a_backlog() {
    // The broker's stream, which the gRPC stream is polled from as fast as HTTP/2's flow control
    // lets it send: whatever a slow reader leaves unread beyond that window is never queued.
    let app = TestApp::spawn().await;
    app.connect("acme").await;
    let account = credential_service::account::AccountId::parse("acme").unwrap();
    let mut stream = Box::pin(app.broker.watch_token(account, Duration::ZERO));
    let first = stream.next().await.unwrap().unwrap();
    assert_eq!(
        first.tokens.access_token.expose_secret(),
        current(&app, "acme").await
    );

    // Three refreshes while the watcher reads nothing.
    for _ in 0..3 {
        app.refresh("acme").await.unwrap();
    }
    let newest = current(&app, "acme").await;
    let got = stream.next().await.unwrap().unwrap();
    assert_eq!(got.tokens.access_token.expose_secret(), newest);
    // Had the older two been queued, they would come now; the next message is the next token.
    app.refresh("acme").await.unwrap();
    let got = stream.next().await.unwrap().unwrap();
    assert_eq!(
        got.tokens.access_token.expose_secret(),
        current(&app, "acme").await
    );
}

#[tokio::test]
async fn removal_ends_the_stream_with_not_found() {
    let app = TestApp::spawn().await;
    app.connect("acme").await;
    let mut stream = watch(&app.client, "acme").await.unwrap();
    next(&mut stream).await.unwrap();
    app.remove("acme", false).await.unwrap();
    assert_status(next(&mut stream).await, Code::NotFound, "acme");

    // Unknown accounts are NOT_FOUND at once.
    let mut unknown = watch(&app.client, "nobody").await.unwrap();
    assert_status(next(&mut unknown).await, Code::NotFound, "nobody");
}

#[tokio::test]
async fn a_rejected_refresh_token_ends_the_stream_with_failed_precondition() {
    let app = TestApp::spawn().await;
    app.connect("acme").await;
    let mut stream = watch(&app.client, "acme").await.unwrap();
    next(&mut stream).await.unwrap();
    app.fake.push_faults([Fault::InvalidGrant]);
    app.clock.advance(DUE);
    app.broker.refresh_due().await;
    assert_status(
        next(&mut stream).await,
        Code::FailedPrecondition,
        "re-authorization",
    );
}

#[tokio::test]
async fn a_token_that_expires_unrenewed_ends_the_stream_with_unavailable() {
    let app = TestApp::spawn().await;
    app.connect("acme").await;
    let mut stream = watch(&app.client, "acme").await.unwrap();
    let first = next(&mut stream).await.unwrap();
    app.fake
        .set_persistent_fault(Some(Fault::ServiceUnavailable));

    // Due, but still valid: a failed background refresh does not end the stream; the next
    // token, once EdgeTag is back, still reaches it.
    app.clock.advance(DUE);
    app.broker.refresh_due().await;
    app.fake.set_persistent_fault(None);
    app.refresh("acme").await.unwrap();
    let renewed = next(&mut stream).await.unwrap();
    assert_ne!(renewed.access_token, first.access_token);
    app.fake
        .set_persistent_fault(Some(Fault::ServiceUnavailable));
    app.clock.advance(DUE);
    app.broker.refresh_due().await;
    // Expired, and EdgeTag still down: it ends, with the cause.
    app.clock.advance(HOUR);
    app.broker.refresh_due().await;
    let ended = next(&mut stream).await;
    assert_status(ended, Code::Unavailable, "503");
    assert!(
        app.seconds_left(renewed.expires_at) <= 0,
        "it ended only at expiry"
    );
}

#[tokio::test]
async fn shutdown_ends_every_stream_at_once_with_unavailable() {
    let app = TestApp::spawn().await;
    app.connect("acme").await;
    let mut streams = Vec::new();
    for _ in 0..3 {
        let mut stream = watch(&app.client, "acme").await.unwrap();
        next(&mut stream).await.unwrap();
        streams.push(stream);
    }
    // The drain waits up to 30 s for open calls: open watchers must not hold it.
    let stopping = tokio::time::timeout(Duration::from_secs(10), app.stop());
    stopping
        .await
        .expect("the server stops without waiting for watchers");
    for mut stream in streams {
        assert_status(next(&mut stream).await, Code::Unavailable, "shutting down");
    }
}

#[tokio::test]
async fn readers_watch_only_the_accounts_their_globs_allow() {
    const ADMIN: &str = "watch-admin-token";
    const READER: &str = "watch-reader-token";
    let dir = tempfile::tempdir().unwrap();
    let callers = common::callers_file(
        dir.path(),
        &[
            ("ops", ADMIN, "admin", "*"),
            ("billing", READER, "reader", "acme-*"),
        ],
    );
    let app = TestApp::spawn_with(Options {
        callers,
        token: Some(ADMIN.into()),
        ..Default::default()
    })
    .await;
    app.connect("acme-eu").await;
    app.connect("globex").await;
    let reader = app.client_with_token(Some(READER));
    let mut allowed = watch(&reader, "acme-eu").await.unwrap();
    assert_eq!(
        next(&mut allowed).await.unwrap().access_token,
        current(&app, "acme-eu").await
    );
    assert_status(
        watch(&reader, "globex").await,
        Code::PermissionDenied,
        "globex",
    );
    let stranger = app.client_with_token(Some("not-a-caller"));
    assert_status(watch(&stranger, "acme-eu").await, Code::Unauthenticated, "");
}

#[tokio::test]
async fn watchers_past_the_cap_are_refused_and_a_closed_one_frees_its_place() {
    let app = TestApp::spawn_with(Options {
        limits: Limits {
            max_watchers: 2,
            ..Limits::DEFAULT
        },
        ..Options::default()
    })
    .await;
    app.connect("acme").await;
    let mut first = watch(&app.client, "acme").await.unwrap();
    next(&mut first).await.unwrap();
    let mut second = watch(&app.client, "acme").await.unwrap();
    next(&mut second).await.unwrap();
    assert_status(
        watch(&app.client, "acme").await,
        Code::ResourceExhausted,
        "--max-watchers",
    );
    // GetToken is not a watcher: still served.
    current(&app, "acme").await;

    drop(first);
    // The server sees the stream's reset a moment later.
    let mut again = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match watch(&app.client, "acme").await {
                Ok(mut stream) => {
                    next(&mut stream).await.unwrap();
                    break stream;
                }
                Err(status) => assert_eq!(status.code(), Code::ResourceExhausted),
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the closed watcher's place frees up");
    app.refresh("acme").await.unwrap();
    let pushed = next(&mut again).await.unwrap();
    assert_eq!(pushed.access_token, current(&app, "acme").await);
}

#[tokio::test]
async fn on_postgresql_a_refresh_on_one_replica_reaches_a_watcher_on_another() {
    common::STORE
        .scope(StoreKind::Postgres, async {
            let one = TestApp::spawn().await;
            let other = TestApp::start(
                one.fake.clone(),
                one.clock.clone(),
                one.data_dir.clone(), // the same data directory: the same database
                one.options.clone(),
            )
            .await;
            one.connect("acme").await;
            // The other replica hears of the new account through the database's notifications.
            let mut stream = tokio::time::timeout(Duration::from_secs(10), async {
                loop {
                    if let Ok(mut stream) = watch(&other.client, "acme").await
                        && let Ok(first) = next(&mut stream).await
                    {
                        break (stream, first);
                    }
                    tokio::task::yield_now().await;
                }
            })
            .await
            .expect("the other replica learns of the account");
            // The team, learned after the grant was stored, may follow as a push of its own.
            while stream.1.team_id.is_empty() {
                stream.1 = next(&mut stream.0).await.unwrap();
            }
            assert_eq!(stream.1.access_token, current(&one, "acme").await);

            for _ in 0..3 {
                let sent = std::time::Instant::now();
                one.refresh("acme").await.unwrap();
                let pushed = next(&mut stream.0).await.unwrap();
                assert_eq!(pushed.access_token, current(&one, "acme").await);
                assert!(
                    sent.elapsed() < Duration::from_secs(1),
                    "{:?}",
                    sent.elapsed()
                );
            }
        })
        .await;
}
