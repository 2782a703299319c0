//! WatchAccounts against the real server and the strict fake: the snapshot, then each transition
//! of an account exactly once and in order (through an EdgeTag outage and back, through a rejected
//! refresh token and a new CompleteAuth, through removal), the latest state for a watcher that
//! lags, admin-only access limited to the caller's globs, shutdown, and, on PostgreSQL, an event
//! raised on one replica reaching a watcher on another.

use crate::common;

use std::time::Duration;

use common::{Client, Options, StoreKind, TestApp, assert_status};
use credential_service::{
    account::AccountId,
    auth::Callers,
    broker::{AccountEventKind as Kind, RefreshEventKind},
    proto::{AccountEvent, AccountEventKind, AccountStatus, WatchAccountsRequest},
};
use fake_edgetag::Fault;
use futures::{FutureExt, StreamExt};
use tonic::{Code, Status, Streaming};

async fn watch(client: &Client) -> Result<Streaming<AccountEvent>, Status> {
    client
        .clone()
        .watch_accounts(WatchAccountsRequest {})
        .await
        .map(tonic::Response::into_inner)
}

/// The stream's next event, or the status that ended it; fails the test after 10 s of silence.
/// The next event other than a team change (those are `team.rs`'s subject: the team learned
/// right after a CompleteAuth may come as an event of its own, or within the connected one).
async fn next(stream: &mut Streaming<AccountEvent>) -> Result<AccountEvent, Status> {
    loop {
        let event = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("the stream says something within 10 s")
            .and_then(|m| m.ok_or_else(|| Status::unknown("the stream ended without a status")))?;
        if event.kind() != AccountEventKind::TeamChanged {
            return Ok(event);
        }
    }
}

/// The next event, which must be `kind` for `account`; returns it for further checks.
async fn expect(
    stream: &mut Streaming<AccountEvent>,
    kind: AccountEventKind,
    account: &str,
) -> AccountEvent {
    let event = next(stream).await.unwrap();
    assert_eq!(
        (event.kind(), event.account.as_str()),
        (kind, account),
        "{event:?}"
    );
    event
}

fn status(event: &AccountEvent) -> AccountStatus {
    event
        .info
        .as_ref()
        .expect("the event carries the state")
        .status()
}

/// Past the scheduler's due time of a fresh two-hour token, short of its refresh margin.
const DUE: Duration = Duration::from_secs(112 * 60);

#[tokio::test]
async fn an_outage_and_back_is_refresh_failing_once_then_recovered_once() {
    let app = TestApp::spawn().await;
    app.connect("acme").await;
    let mut refreshes = app.broker.subscribe();
    let mut stream = watch(&app.client).await.unwrap();
    let snapshot = expect(&mut stream, AccountEventKind::Snapshot, "acme").await;
    assert_eq!(status(&snapshot), AccountStatus::Active);

    app.refresh("acme").await.unwrap();
    let refreshed = expect(&mut stream, AccountEventKind::Refreshed, "acme").await;
    assert_eq!(
        refreshed.info.unwrap().access_token_expires_at,
        app.describe("acme").await.unwrap().access_token_expires_at
    );

    // EdgeTag goes down: the scheduler's refresh fails, then every retry fails the same way.
    app.fake
        .set_persistent_fault(Some(Fault::ServiceUnavailable));
    app.clock.advance(DUE);
    assert_eq!(app.broker.refresh_due().await, 1);
    let failing = expect(&mut stream, AccountEventKind::RefreshFailing, "acme").await;
    assert_eq!(status(&failing), AccountStatus::RefreshingFailed);
    assert_eq!(failing.failure_code, Code::Unavailable as i32);
    assert!(
        failing.failure_message.contains("503"),
        "{}",
        failing.failure_message
    );
    for _ in 0..3 {
        app.broker.finish_refreshes().await;
        app.clock.advance(Duration::from_secs(10 * 60)); // past any back-off
        assert_eq!(app.broker.refresh_due().await, 1);
    }
    app.broker.finish_refreshes().await;
    assert_status(app.refresh("acme").await, Code::Unavailable, "503");
    let failed = common::events(&mut refreshes, 6).await;
    assert_eq!(failed[0].kind, RefreshEventKind::Refreshed);
    assert!(
        failed[1..]
            .iter()
            .all(|e| e.kind == RefreshEventKind::Failed),
        "five failed refreshes: {failed:?}"
    );

    // EdgeTag is back: the first success is "recovered", the next one "refreshed" again. Had a
    // retry been reported, it would come before these.
    app.fake.set_persistent_fault(None);
    app.refresh("acme").await.unwrap();
    let recovered = expect(&mut stream, AccountEventKind::Recovered, "acme").await;
    assert_eq!(status(&recovered), AccountStatus::Active);
    assert_eq!(recovered.failure_code, 0);
    app.refresh("acme").await.unwrap();
    expect(&mut stream, AccountEventKind::Refreshed, "acme").await;
}

#[tokio::test]
async fn invalid_grant_then_a_new_complete_auth_then_removal() {
    let app = TestApp::spawn().await;
    app.connect("acme").await;
    let mut stream = watch(&app.client).await.unwrap();
    expect(&mut stream, AccountEventKind::Snapshot, "acme").await;

    app.fake.push_faults([Fault::InvalidGrant]);
    app.clock.advance(DUE);
    app.broker.refresh_due().await;
    let reauth = expect(&mut stream, AccountEventKind::NeedsReauth, "acme").await;
    assert_eq!(status(&reauth), AccountStatus::NeedsReauth);
    // Callers failing on it afterwards change nothing.
    assert_status(
        app.get_token("acme").await,
        Code::FailedPrecondition,
        "acme",
    );

    app.connect("acme").await;
    let connected = expect(&mut stream, AccountEventKind::Connected, "acme").await;
    assert_eq!(status(&connected), AccountStatus::Active);

    // A new account, and the revoked grant of a third one found by the scheduler.
    app.connect("globex").await;
    expect(&mut stream, AccountEventKind::Connected, "globex").await;
    app.fake.revoke_all_refresh_tokens();
    app.clock.advance(DUE);
    assert_eq!(app.broker.refresh_due().await, 2);
    let mut reauths = [
        next(&mut stream).await.unwrap(),
        next(&mut stream).await.unwrap(),
    ];
    reauths.sort_by(|a, b| a.account.cmp(&b.account));
    for (event, account) in reauths.iter().zip(["acme", "globex"]) {
        assert_eq!(
            (event.kind(), event.account.as_str()),
            (AccountEventKind::NeedsReauth, account)
        );
    }

    app.remove("globex", true).await.unwrap();
    let removed = expect(&mut stream, AccountEventKind::Removed, "globex").await;
    assert!(removed.info.is_none());
    // Nothing about acme came in between, and nothing comes twice: the next event is the next
    // change.
    app.connect("acme").await;
    expect(&mut stream, AccountEventKind::Connected, "acme").await;
}

#[tokio::test]
async fn a_watcher_that_lags_gets_the_latest_state_not_a_backlog() {
    // The broker's stream, which the gRPC stream is polled from as fast as HTTP/2's flow control
    // lets it send: what a slow reader leaves unread is never queued beyond one event per account.
    let app = TestApp::spawn().await;
    app.connect("acme").await;
    app.connect("globex").await;
    let mut stream = Box::pin(app.broker.watch_accounts(|_| true));
    for account in ["acme", "globex"] {
        let snapshot = stream.next().await.unwrap();
        assert_eq!(
            (snapshot.kind, snapshot.account.as_str()),
            (Kind::Snapshot, account)
        );
    }

    // Five refreshes of acme, an outage and recovery of globex, while the watcher reads nothing.
    for _ in 0..5 {
        app.refresh("acme").await.unwrap();
    }
    app.fake
        .set_persistent_fault(Some(Fault::ServiceUnavailable));
    assert!(app.refresh("globex").await.is_err());
    app.fake.set_persistent_fault(None);
    app.refresh("globex").await.unwrap();

    // One event per account, each with its latest state.
    let acme = AccountId::parse("acme").unwrap();
    let globex = AccountId::parse("globex").unwrap();
    let mut got = [stream.next().await.unwrap(), stream.next().await.unwrap()];
    got.sort_by(|a, b| a.account.cmp(&b.account));
    assert_eq!((got[0].kind, &got[0].account), (Kind::Refreshed, &acme));
    assert_eq!((got[1].kind, &got[1].account), (Kind::Refreshed, &globex));
    for (event, account) in got.iter().zip([&acme, &globex]) {
        let latest = app.broker.describe(account).unwrap();
        assert_eq!(
            event.record.as_ref().unwrap().tokens.expires_at,
            latest.tokens.expires_at
        );
    }
    assert!(
        stream.next().now_or_never().is_none(),
        "no backlog of older states follows"
    );
    app.refresh("acme").await.unwrap();
    let after = stream.next().await.unwrap();
    assert_eq!((after.kind, &after.account), (Kind::Refreshed, &acme));
}

/// A callers file with a full admin (the harness's own token), an admin limited to `acme-*`,
/// and a reader.
const ROOT: &str = "events-root-token";
const OPS: &str = "events-ops-token";
const READER: &str = "events-reader-token";

fn callers(dir: &tempfile::TempDir) -> Callers {
    common::callers_file(
        dir.path(),
        &[
            ("root", ROOT, "admin", "*"),
            ("ops", OPS, "admin", "acme-*"),
            ("billing", READER, "reader", "*"),
        ],
    )
}

#[tokio::test]
async fn admins_only_and_each_sees_only_its_globs() {
    let dir = tempfile::tempdir().unwrap();
    let app = TestApp::spawn_with(Options {
        callers: callers(&dir),
        token: Some(ROOT.into()),
        ..Default::default()
    })
    .await;
    app.connect("acme-eu").await;
    app.connect("globex").await;

    let reader = app.client_with_token(Some(READER));
    assert_status(watch(&reader).await, Code::PermissionDenied, "");
    let stranger = app.client_with_token(Some("not-a-caller"));
    assert_status(watch(&stranger).await, Code::Unauthenticated, "");

    let ops = app.client_with_token(Some(OPS));
    let mut scoped = watch(&ops).await.unwrap();
    let mut everything = watch(&app.client).await.unwrap();
    expect(&mut scoped, AccountEventKind::Snapshot, "acme-eu").await;
    expect(&mut everything, AccountEventKind::Snapshot, "acme-eu").await;
    expect(&mut everything, AccountEventKind::Snapshot, "globex").await;

    app.refresh("globex").await.unwrap();
    app.connect("initech").await;
    app.connect("acme-us").await;
    expect(&mut everything, AccountEventKind::Refreshed, "globex").await;
    expect(&mut everything, AccountEventKind::Connected, "initech").await;
    expect(&mut everything, AccountEventKind::Connected, "acme-us").await;
    // Neither globex nor initech reached the scoped admin: its next event is acme-us.
    expect(&mut scoped, AccountEventKind::Connected, "acme-us").await;
    app.remove("globex", true).await.unwrap();
    app.remove("acme-eu", true).await.unwrap();
    expect(&mut scoped, AccountEventKind::Removed, "acme-eu").await;
}

#[tokio::test]
async fn shutdown_ends_the_stream_with_unavailable() {
    let app = TestApp::spawn().await;
    app.connect("acme").await;
    let mut stream = watch(&app.client).await.unwrap();
    expect(&mut stream, AccountEventKind::Snapshot, "acme").await;
    tokio::time::timeout(Duration::from_secs(10), app.stop())
        .await
        .expect("the server stops without waiting for the watcher");
    assert_status(next(&mut stream).await, Code::Unavailable, "shutting down");
}

/// On PostgreSQL, what one replica does reaches a watcher on another through the store's change
/// notifications: a connection, a refresh, a rejected refresh token, a removal.
#[tokio::test]
async fn on_postgres_an_event_on_one_replica_reaches_a_watcher_on_another() {
    common::STORE
        .scope(StoreKind::Postgres, async {
            let first = TestApp::spawn().await;
            let second = TestApp::start(
                first.fake.clone(),
                first.clock.clone(),
                first.data_dir.clone(),
                first.options.clone(),
            )
            .await;
            let mut stream = watch(&second.client).await.unwrap();

            first.connect("acme").await;
            expect(&mut stream, AccountEventKind::Connected, "acme").await;
            first.refresh("acme").await.unwrap();
            let refreshed = expect(&mut stream, AccountEventKind::Refreshed, "acme").await;
            assert_eq!(
                refreshed.info.unwrap().access_token_expires_at,
                second
                    .describe("acme")
                    .await
                    .unwrap()
                    .access_token_expires_at
            );
            first.fake.push_faults([Fault::InvalidGrant]);
            assert_status(
                first.refresh("acme").await,
                Code::FailedPrecondition,
                "acme",
            );
            expect(&mut stream, AccountEventKind::NeedsReauth, "acme").await;
            first.remove("acme", true).await.unwrap();
            expect(&mut stream, AccountEventKind::Removed, "acme").await;
        })
        .await;
}
