//! The operators' RPCs against the real server and the strict fake: ListAccounts (statuses,
//! pagination), DescribeAccount, RefreshToken and RemoveAccount (revocation, idempotence, force).

use crate::common;

use std::time::Duration;

use common::{Options, TestApp, assert_status};
use credential_service::proto::{
    AccountStatus, ListAccountsRequest, RefreshOutcome, RemoveOutcome,
};
use fake_edgetag::Fault;
use tonic::Code;

common::on_both_stores! {
    #[tokio::test]
    list_pages_through_accounts_in_name_order,
    describe_shows_status_expiry_and_refreshes_but_never_a_token,
    refresh_token_forces_a_refresh_and_reports_each_outcome,
    remove_revokes_at_edgetag_deletes_durably_and_is_idempotent,
    remove_with_edgetag_unreachable_needs_force,
}

async fn list_pages_through_accounts_in_name_order() {
    let app = TestApp::spawn().await;
    assert_eq!(app.list(0, "").await, (vec![], String::new()));
    for account in ["carol", "alice", "bob", "dave", "erin"] {
        app.connect(account).await;
    }

    let (first, token) = app.list(2, "").await;
    assert_eq!(first, ["alice", "bob"]);
    assert!(!token.is_empty());
    // An account added between pages neither repeats nor hides anything after the token.
    app.connect("aaron").await;
    let (second, token) = app.list(2, &token).await;
    assert_eq!(second, ["carol", "dave"]);
    let (third, token) = app.list(2, &token).await;
    assert_eq!(third, ["erin"]);
    assert_eq!(token, "", "the last page has no next token");

    let (all, token) = app.list(0, "").await;
    assert_eq!(all, ["aaron", "alice", "bob", "carol", "dave", "erin"]);
    assert_eq!(token, "");

    let bad = app
        .client
        .clone()
        .list_accounts(ListAccountsRequest {
            page_size: 10,
            page_token: "not-a-token!".into(),
        })
        .await;
    assert_status(bad, Code::InvalidArgument, "page_token");
    let negative = app
        .client
        .clone()
        .list_accounts(ListAccountsRequest {
            page_size: -1,
            page_token: String::new(),
        })
        .await;
    assert_status(negative, Code::InvalidArgument, "page_size");
}

async fn describe_shows_status_expiry_and_refreshes_but_never_a_token() {
    let app = TestApp::spawn().await;
    let connected = app.connect("acme").await;
    let info = app.describe("acme").await.unwrap();
    assert_eq!(info.account, "acme");
    assert_eq!(info.status(), AccountStatus::Active);
    assert_eq!(info.access_token_expires_at, connected.expires_at);
    assert_eq!(info.last_refresh_at, None);
    assert_eq!(info.last_refresh_outcome(), RefreshOutcome::Unspecified);
    assert!(!info.refreshing);

    let token = app.get_token("acme").await.unwrap().access_token;
    let listed = app
        .client
        .clone()
        .list_accounts(ListAccountsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.accounts, vec![info.clone()]);
    assert!(!format!("{listed:?}{info:?}").contains(&token));

    assert_status(app.describe("nobody").await, Code::NotFound, "nobody");
    assert_status(app.describe("a b").await, Code::InvalidArgument, "1-128");
}

async fn refresh_token_forces_a_refresh_and_reports_each_outcome() {
    let app = TestApp::spawn().await;
    let connected = app.connect("acme").await;
    app.clock.advance(Duration::from_secs(60));
    let before = app.fake.stats().refreshes_ok;

    let expires_at = app.refresh("acme").await.unwrap();
    assert_eq!(app.fake.stats().refreshes_ok, before + 1);
    // The test clock runs on from the real time, so the refresh's request time is 60 s plus the
    // real time between the two requests later: compare whole instants, not their seconds.
    let instant = |t: &prost_types::Timestamp| Duration::new(t.seconds as u64, t.nanos as u32);
    let later = instant(&expires_at) - instant(connected.expires_at.as_ref().unwrap());
    assert!(
        later >= Duration::from_secs(60) && later < Duration::from_secs(65),
        "a fresh two-hour token from the new request time: {later:?} later"
    );
    let info = app.describe("acme").await.unwrap();
    assert_eq!(info.status(), AccountStatus::Active);
    assert_eq!(info.last_refresh_outcome(), RefreshOutcome::Succeeded);
    assert_eq!(info.access_token_expires_at, Some(expires_at));
    assert!(info.last_refresh_at.is_some());

    // EdgeTag down: the refresh fails, the account shows it, GetToken still serves the valid token.
    app.fake
        .set_persistent_fault(Some(Fault::ServiceUnavailable));
    app.clock.advance(Duration::from_secs(60));
    assert_status(app.refresh("acme").await, Code::Unavailable, "retry");
    let info = app.describe("acme").await.unwrap();
    assert_eq!(info.status(), AccountStatus::RefreshingFailed);
    assert_eq!(info.last_refresh_outcome(), RefreshOutcome::Failed);
    app.get_token("acme").await.unwrap();
    app.fake.set_persistent_fault(None);

    // EdgeTag rejects the refresh token: the account needs re-authorization.
    app.fake.revoke_all_refresh_tokens();
    assert_status(
        app.refresh("acme").await,
        Code::FailedPrecondition,
        "re-authorization",
    );
    let info = app.describe("acme").await.unwrap();
    assert_eq!(info.status(), AccountStatus::NeedsReauth);
    assert_status(app.refresh("ghost").await, Code::NotFound, "ghost");
}

async fn remove_revokes_at_edgetag_deletes_durably_and_is_idempotent() {
    let app = TestApp::spawn().await;
    app.connect("acme").await;
    app.connect("keep").await;
    let token = app.get_token("acme").await.unwrap().access_token;
    assert!(app.fake.access_token_is_valid(&token));

    assert_eq!(
        app.remove("acme", false).await.unwrap(),
        RemoveOutcome::Revoked
    );
    assert!(
        !app.fake.access_token_is_valid(&token),
        "revoked at EdgeTag"
    );
    assert_eq!(app.fake.stats().revokes, 1);
    assert_status(app.get_token("acme").await, Code::NotFound, "not connected");
    assert_eq!(
        app.remove("acme", false).await.unwrap(),
        RemoveOutcome::NotFound
    );
    assert_eq!(app.fake.stats().revokes, 1, "nothing left to revoke");

    let app = app.restart().await;
    assert_eq!(
        app.list(0, "").await.0,
        ["keep"],
        "gone after a restart too"
    );
    app.get_token("keep").await.unwrap();
}

async fn remove_with_edgetag_unreachable_needs_force() {
    let app = TestApp::spawn_with(Options {
        revoke_url: Some(
            "http://127.0.0.1:1/v1/oauth-app/client/revoke"
                .parse()
                .unwrap(),
        ),
        ..Options::default()
    })
    .await;
    app.connect("acme").await;

    assert_status(app.remove("acme", false).await, Code::Unavailable, "retry");
    app.get_token("acme").await.expect("kept without force");

    assert_eq!(
        app.remove("acme", true).await.unwrap(),
        RemoveOutcome::RemovedWithoutRevocation
    );
    assert_status(app.describe("acme").await, Code::NotFound, "acme");
    let app = app.restart().await;
    assert_status(app.describe("acme").await, Code::NotFound, "acme");
}
