//! The refresh engine against every upstream fault: status codes, upstream call counts and the
//! stored state; single flight under load and cancellation; the background scheduler with a
//! controllable clock; back-off; failing closed when the disk refuses a rotated refresh token.

use crate::common;

use std::{
    collections::HashSet,
    sync::Arc,
    time::{Duration, Instant},
};

use common::{HOUR, MINUTE, Options, TestApp, assert_status, events};
use credential_service::{
    account::AccountId,
    broker::RefreshEventKind,
    proto::{AccountStatus, GetTokenRequest, RefreshOutcome},
};
use fake_edgetag::Fault;
use secrecy::ExposeSecret;
use tonic::Code;

common::on_both_stores! {
    #[tokio::test]
    a_single_transient_failure_is_retried_within_the_call,
    a_lasting_failure_exhausts_the_retries_then_backs_off,
    a_slow_provider_times_out_each_try,
    retry_after_is_honoured_inside_the_budget_and_beyond_it,
    invalid_grant_is_not_retried_and_marks_the_account,
    odd_but_usable_expiries_are_accepted,
    a_thousand_callers_on_an_expired_account_make_one_upstream_call,
    a_caller_that_gives_up_does_not_cancel_the_refresh,
    the_scheduler_refreshes_ahead_of_the_margin_so_callers_never_wait,
    jitter_spreads_accounts_connected_together,
    two_thousand_due_accounts_never_exceed_the_upstream_cap,
    a_provider_wide_outage_gets_spaced_retries_not_a_storm,
    a_completed_authorization_during_a_rejected_refresh_wins,
    a_rotated_refresh_token_that_cannot_be_stored_is_never_served,
    an_unusable_renewal_still_keeps_a_rotated_refresh_token,
}

fn id(s: &str) -> AccountId {
    AccountId::parse(s).unwrap()
}

/// A connected account whose access token has just expired: the next GetToken must refresh.
async fn expired_account(options: Options) -> TestApp {
    let app = TestApp::spawn_with(options).await;
    app.connect("acme").await;
    app.clock.advance(2 * HOUR + MINUTE);
    app
}

fn requests(app: &TestApp) -> u64 {
    app.fake.stats().token_requests
}

async fn a_single_transient_failure_is_retried_within_the_call() {
    for fault in [
        Fault::ServerError,
        Fault::ServiceUnavailable,
        Fault::DropConnection,
        Fault::Status(502),
        Fault::Status(408),
    ] {
        let app = expired_account(Options::default()).await;
        let before = requests(&app);
        app.fake.push_faults([fault.clone()]);
        let token = app.get_token("acme").await.unwrap();
        assert!(
            app.fake.access_token_is_valid(&token.access_token),
            "{fault:?}"
        );
        assert_eq!(
            requests(&app) - before,
            2,
            "{fault:?}: one failure, one retry"
        );
        let info = app.describe("acme").await.unwrap();
        assert_eq!(info.last_refresh_outcome(), RefreshOutcome::Succeeded);
    }
}

async fn a_lasting_failure_exhausts_the_retries_then_backs_off() {
    for fault in [
        Fault::ServiceUnavailable,
        Fault::MalformedJson,
        Fault::HtmlPage,
        Fault::EmptyBody,
        Fault::ErrorIn200,
    ] {
        let app = expired_account(Options::default()).await;
        let old = app.broker.describe(&id("acme")).unwrap();
        let before = requests(&app);
        app.fake.set_persistent_fault(Some(fault.clone()));
        let status = assert_status(app.get_token("acme").await, Code::Unavailable, "EdgeTag");
        assert!(!status.message().contains("<html"), "no body is echoed");
        assert_eq!(requests(&app) - before, 3, "{fault:?}: three tries");

        // The stored tokens are untouched (not even replaced by a copy, which no RPC shows)
        // and the failure is on record: still active, its last refresh failed.
        let stored = app.broker.describe(&id("acme")).unwrap();
        assert!(Arc::ptr_eq(&stored.tokens, &old.tokens));
        let info = app.describe("acme").await.unwrap();
        assert_eq!(info.status(), AccountStatus::RefreshingFailed);
        assert_eq!(info.last_refresh_outcome(), RefreshOutcome::Failed);

        // Backing off: callers are answered at once, without asking EdgeTag again.
        assert_status(app.get_token("acme").await, Code::Unavailable, "EdgeTag");
        assert_eq!(
            requests(&app) - before,
            3,
            "{fault:?}: no call while backing off"
        );

        app.fake.set_persistent_fault(None);
        app.clock.advance(MINUTE);
        assert!(app.get_token("acme").await.is_ok(), "{fault:?}");
    }
}

async fn a_slow_provider_times_out_each_try() {
    let app = expired_account(Options {
        request_timeout: Duration::from_millis(200),
        ..Options::default()
    })
    .await;
    let before = requests(&app);
    app.fake.set_persistent_fault(Some(Fault::Hang));
    let status = assert_status(app.get_token("acme").await, Code::Unavailable, "within");
    assert!(status.message().contains("200ms"), "{}", status.message());
    assert_eq!(requests(&app) - before, 3);
}

async fn retry_after_is_honoured_inside_the_budget_and_beyond_it() {
    // Inside the 2 s budget: the retry waits the second EdgeTag asked for, then succeeds.
    let app = expired_account(Options::default()).await;
    let before = requests(&app);
    app.fake.push_faults([Fault::TooManyRequests {
        retry_after_secs: 1,
    }]);
    let started = Instant::now();
    assert!(app.get_token("acme").await.is_ok());
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert_eq!(requests(&app) - before, 2);

    // Beyond the budget: no retry now; the account waits as long as EdgeTag said.
    let app = expired_account(Options::default()).await;
    let before = requests(&app);
    app.fake.push_faults([Fault::TooManyRequests {
        retry_after_secs: 120,
    }]);
    assert_status(app.get_token("acme").await, Code::Unavailable, "429");
    assert_eq!(requests(&app) - before, 1);
    app.clock.advance(MINUTE);
    assert_status(app.get_token("acme").await, Code::Unavailable, "429");
    assert_eq!(requests(&app) - before, 1, "still inside Retry-After");
    app.clock.advance(2 * MINUTE);
    assert!(app.get_token("acme").await.is_ok());
    assert_eq!(requests(&app) - before, 2);
}

async fn invalid_grant_is_not_retried_and_marks_the_account() {
    // The standard 400, and the 401 some servers send for a revoked refresh token: both name the
    // grant, not this service's client credentials.
    for fault in [Fault::InvalidGrant, Fault::InvalidGrantAs401] {
        let app = expired_account(Options::default()).await;
        let before = requests(&app);
        app.fake.push_faults([fault.clone()]);
        assert_status(
            app.get_token("acme").await,
            Code::FailedPrecondition,
            "run BeginAuth again",
        );
        assert_eq!(requests(&app) - before, 1, "{fault:?}");
        let info = app.describe("acme").await.unwrap();
        assert_eq!(info.status(), AccountStatus::NeedsReauth, "{fault:?}");
        // The scheduler leaves it alone too.
        app.clock.advance(HOUR);
        assert_eq!(app.broker.refresh_due().await, 0);
        assert_eq!(requests(&app) - before, 1, "{fault:?}");
    }
}

async fn odd_but_usable_expiries_are_accepted() {
    // No expires_in: the configured default lifetime (1 h in these tests) applies.
    let app = expired_account(Options::default()).await;
    app.fake.push_faults([Fault::MissingExpiresIn]);
    let token = app.get_token("acme").await.unwrap();
    let left = app.seconds_left(token.expires_at);
    assert!((3590..=3600).contains(&left), "{left}");

    // expires_in as a string.
    let app = expired_account(Options::default()).await;
    app.fake.push_faults([Fault::ExpiresInAsString]);
    let token = app.get_token("acme").await.unwrap();
    let left = app.seconds_left(token.expires_at);
    assert!((7190..=7200).contains(&left), "{left}");
}

async fn a_thousand_callers_on_an_expired_account_make_one_upstream_call() {
    let app = expired_account(Options::default()).await;
    let before = requests(&app);
    app.fake.set_token_delay(Duration::from_millis(300));
    let channels: Vec<_> = (0..4).map(|_| app.client.clone()).collect();
    let calls = (0..1000).map(|i| {
        let mut c = channels[i % channels.len()].clone();
        tokio::spawn(async move {
            c.get_token(GetTokenRequest {
                account: "acme".into(),
                min_validity: None,
            })
            .await
            .map(|r| r.into_inner().access_token)
        })
    });
    let tokens: HashSet<String> = futures::future::join_all(calls)
        .await
        .into_iter()
        .map(|r| r.unwrap().unwrap())
        .collect();
    assert_eq!(tokens.len(), 1);
    assert_eq!(requests(&app) - before, 1, "exactly one upstream refresh");
}

async fn a_caller_that_gives_up_does_not_cancel_the_refresh() {
    let app = expired_account(Options::default()).await;
    let mut events_rx = app.broker.subscribe();
    let before = requests(&app);
    app.fake.set_token_delay(Duration::from_millis(500));
    let mut request = tonic::Request::new(GetTokenRequest {
        account: "acme".into(),
        min_validity: None,
    });
    request.set_timeout(Duration::from_millis(50));
    let status = app.client.clone().get_token(request).await.unwrap_err();
    // The server enforces the caller's grpc-timeout (tonic reports it as CANCELLED).
    assert!(
        matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{status:?}"
    );

    // The refresh went on without the caller, and its result is what the next caller gets.
    let done = events(&mut events_rx, 1).await;
    assert_eq!(done[0].kind, RefreshEventKind::Refreshed);
    app.fake.set_token_delay(Duration::ZERO);
    let token = app.get_token("acme").await.unwrap();
    assert!(app.fake.access_token_is_valid(&token.access_token));
    assert_eq!(requests(&app) - before, 1);
    assert!(!app.describe("acme").await.unwrap().refreshing);
}

async fn the_scheduler_refreshes_ahead_of_the_margin_so_callers_never_wait() {
    let app = TestApp::spawn().await;
    app.connect("acme").await;
    let first = app.get_token("acme").await.unwrap();
    let mut events_rx = app.broker.subscribe();

    // 7,200 s tokens: due when 20% (1,440 s) plus up to 5% jitter (360 s) is left.
    app.clock.advance(Duration::from_secs(7200 - 1800 - 60));
    assert_eq!(app.broker.refresh_due().await, 0, "not due yet");
    app.clock
        .advance(Duration::from_secs(7200 - 1440 + 1) - Duration::from_secs(7200 - 1800 - 60));
    assert_eq!(app.broker.refresh_due().await, 1);
    assert_eq!(
        events(&mut events_rx, 1).await[0].kind,
        RefreshEventKind::Refreshed
    );
    assert_eq!(
        app.broker.refresh_due().await,
        0,
        "refreshed accounts are not due again"
    );

    // Long before the 5-minute margin: the caller gets the new token from memory.
    let before = requests(&app);
    let second = app.get_token("acme").await.unwrap();
    assert_ne!(second.access_token, first.access_token);
    assert!(app.seconds_left(second.expires_at) > 7000);
    assert_eq!(requests(&app), before);
}

async fn jitter_spreads_accounts_connected_together() {
    let app = TestApp::spawn().await;
    let connects = (0..40).map(|i| {
        let app = &app;
        async move { app.connect(&format!("a{i}")).await }
    });
    futures::future::join_all(connects).await;
    let mut events_rx = app.broker.subscribe();
    app.clock.advance(Duration::from_secs(7200 - 1800 - 1));
    let mut buckets = Vec::new();
    for _ in 0..7 {
        app.clock.advance(MINUTE);
        let started = app.broker.refresh_due().await;
        events(&mut events_rx, started).await;
        buckets.push(started);
    }
    assert_eq!(buckets.iter().sum::<usize>(), 40, "{buckets:?}");
    assert!(
        buckets.iter().filter(|n| **n > 0).count() >= 3,
        "refreshes spread over the jitter window: {buckets:?}"
    );
}

async fn two_thousand_due_accounts_never_exceed_the_upstream_cap() {
    let app = TestApp::spawn().await;
    let names: Vec<String> = (0..2000).map(|i| format!("acct-{i}")).collect();
    for chunk in names.chunks(200) {
        futures::future::join_all(chunk.iter().map(|n| app.connect(n))).await;
    }
    let mut events_rx = app.broker.subscribe();
    let before = requests(&app);
    app.fake.reset_peak();
    app.fake.set_token_delay(Duration::from_millis(2));
    app.clock.advance(2 * HOUR - 2 * MINUTE);

    // The scheduler and 2,000 callers at once, all wanting a refresh.
    let scheduler = tokio::spawn({
        let broker = app.broker.clone();
        async move { broker.refresh_due().await }
    });
    let callers = names.iter().map(|n| app.get_token(n));
    for result in futures::future::join_all(callers).await {
        result.unwrap();
    }
    let started = scheduler.await.unwrap();
    events(&mut events_rx, 2000).await;
    let stats = app.fake.stats();
    println!(
        "storm: 2000 due accounts, {} upstream calls ({started} started by the scheduler), peak concurrency {}",
        stats.token_requests - before,
        stats.peak_token_concurrency
    );
    assert_eq!(
        stats.token_requests - before,
        2000,
        "one refresh per account ({started} by the scheduler)"
    );
    assert!(
        stats.peak_token_concurrency <= 8,
        "peak {}",
        stats.peak_token_concurrency
    );
    assert!(stats.peak_token_concurrency >= 2, "the cap was exercised");
}

async fn a_provider_wide_outage_gets_spaced_retries_not_a_storm() {
    let app = TestApp::spawn().await;
    for i in 0..20 {
        app.connect(&format!("a{i}")).await;
    }
    let mut events_rx = app.broker.subscribe();
    app.fake
        .set_persistent_fault(Some(Fault::ServiceUnavailable));
    app.clock.advance(2 * HOUR - 20 * MINUTE);
    let before = requests(&app);

    assert_eq!(app.broker.refresh_due().await, 20);
    events(&mut events_rx, 20).await;
    assert_eq!(requests(&app) - before, 60, "three tries each");
    assert_eq!(app.broker.refresh_due().await, 0, "everyone backs off");

    // First back-off: 2.5-5 s; the second doubles to 5-10 s. The test clock also runs in real
    // time, so a round that takes a moment on a busy machine makes it later than the advances
    // alone say: the "none due yet" check keeps a second in hand.
    app.clock.advance(Duration::from_millis(5100));
    assert_eq!(app.broker.refresh_due().await, 20);
    events(&mut events_rx, 20).await;
    app.clock.advance(Duration::from_millis(4000));
    assert_eq!(app.broker.refresh_due().await, 0);
    app.clock.advance(Duration::from_millis(6100));
    assert_eq!(app.broker.refresh_due().await, 20);
    events(&mut events_rx, 20).await;
    assert_eq!(requests(&app) - before, 180);

    // Callers still get their valid tokens throughout, without upstream calls.
    let during = requests(&app);
    for i in 0..20 {
        app.get_token(&format!("a{i}")).await.unwrap();
    }
    assert_eq!(requests(&app), during);
}

async fn a_completed_authorization_during_a_rejected_refresh_wins() {
    let app = expired_account(Options::default()).await;
    app.fake.revoke_all_refresh_tokens();
    app.fake.set_token_delay(Duration::from_millis(200));
    let refresh = tokio::spawn({
        let mut c = app.client.clone();
        async move {
            c.get_token(GetTokenRequest {
                account: "acme".into(),
                min_validity: None,
            })
            .await
        }
    });
    app.connect("acme").await;
    let first = refresh.await.unwrap();
    assert!(
        first.is_ok() || first.as_ref().unwrap_err().code() == Code::FailedPrecondition,
        "{first:?}"
    );
    // Whatever the interleaving, the new grant is what stays.
    let token = app.get_token("acme").await.unwrap();
    assert!(app.fake.access_token_is_valid(&token.access_token));
    // Active, that is: not waiting for a re-authorization.
    assert!(matches!(
        app.describe("acme").await.unwrap().status(),
        AccountStatus::Active | AccountStatus::RefreshingFailed
    ));
}

async fn a_rotated_refresh_token_that_cannot_be_stored_is_never_served() {
    let app = TestApp::spawn_rotating_with(Options {
        metrics: true,
        ..Options::default()
    })
    .await;
    app.connect("rot").await;
    let old = app.get_token("rot").await.unwrap().access_token;
    let mut events_rx = app.broker.subscribe();

    app.clock.advance(2 * HOUR - 2 * MINUTE);
    app.faults.fail_writes(true);
    assert_eq!(
        app.get_token("rot").await.unwrap().access_token,
        old,
        "the new token is held back; the old one is still valid"
    );
    assert_eq!(
        app.fake.stats().refreshes_ok,
        1,
        "EdgeTag rotated the refresh token"
    );
    assert_eq!(
        events(&mut events_rx, 1).await[0].kind,
        RefreshEventKind::NotPersisted
    );
    assert_eq!(app.broker.unpersisted_accounts(), vec![id("rot")]);
    let scraped = app.metrics().await;
    assert!(
        scraped.contains("credential_accounts_unpersisted 1"),
        "{scraped}"
    );
    assert_eq!(app.get_token("rot").await.unwrap().access_token, old);
    assert_eq!(app.fake.stats().token_requests, 2, "no second refresh");

    app.clock.advance(3 * MINUTE);
    assert_status(app.get_token("rot").await, Code::Internal, "");

    // The disk recovers: the scheduler stores the held-back set, which then serves.
    app.faults.fail_writes(false);
    assert_eq!(app.broker.refresh_due().await, 1);
    assert_eq!(
        events(&mut events_rx, 1).await[0].kind,
        RefreshEventKind::Refreshed
    );
    assert!(app.broker.unpersisted_accounts().is_empty());
    assert!(
        app.metrics()
            .await
            .contains("credential_accounts_unpersisted 0")
    );
    let new = app.get_token("rot").await.unwrap().access_token;
    assert_ne!(new, old);
    assert!(app.fake.access_token_is_valid(&new));
    assert_eq!(app.fake.stats().token_requests, 2);

    // Stored for good: after a restart the rotated refresh token still works.
    let app = app.restart().await;
    app.clock.advance(2 * HOUR);
    let later = app.get_token("rot").await.unwrap().access_token;
    assert!(app.fake.access_token_is_valid(&later));
    let stored = app.broker.describe(&id("rot")).unwrap();
    assert!(
        app.fake.refresh_token_is_valid(
            stored
                .tokens
                .refresh_token
                .as_ref()
                .unwrap()
                .expose_secret()
        )
    );
}

async fn an_unusable_renewal_still_keeps_a_rotated_refresh_token() {
    let app = TestApp::spawn_rotating().await;
    app.connect("rot").await;
    let first = app.get_token("rot").await.unwrap().access_token;

    // An immediate forced refresh whose answer has no expires_in: the default 1 h lifetime ends
    // before the current 2 h token, so the answer is refused, but EdgeTag has rotated already.
    app.fake.push_faults([Fault::MissingExpiresIn]);
    let refused = app.refresh("rot").await.unwrap_err();
    assert!(refused.message().contains("no later"), "{refused:?}");
    let stored = app.broker.describe(&id("rot")).unwrap();
    let kept = stored
        .tokens
        .refresh_token
        .as_ref()
        .unwrap()
        .expose_secret();
    assert!(
        app.fake.refresh_token_is_valid(kept),
        "the rotated token was stored"
    );
    assert_eq!(app.get_token("rot").await.unwrap().access_token, first);

    // It survives a restart and renews the account later.
    let app = app.restart().await;
    app.clock.advance(2 * HOUR);
    let later = app.get_token("rot").await.unwrap().access_token;
    assert!(app.fake.access_token_is_valid(&later));
}
