//! End to end over gRPC: BeginAuth → approval at the fake EdgeTag → CompleteAuth → GetToken, with
//! the provider's failures and the single-flight refresh.

use crate::common;

use std::{collections::HashSet, time::Duration};

use common::{HOUR, MINUTE, Options, REDIRECT_URI, TestApp, assert_status};
use credential_service::proto::GetTokenRequest;
use fake_edgetag::Fault;
use tonic::Code;
use url::Url;

common::on_both_stores! {
    #[tokio::test]
    full_flow_connects_an_account_and_serves_its_token,
    a_restart_serves_the_same_accounts_without_asking_edgetag,
    a_state_completes_once_and_not_after_it_expires,
    of_many_concurrent_completions_of_one_state_exactly_one_succeeds,
    concurrent_begin_and_complete_for_many_accounts_all_land_durably,
    two_hundred_callers_on_an_expiring_token_share_exactly_one_refresh,
    a_refresh_keeps_the_refresh_token_unless_edgetag_rotates_it,
    a_rotated_refresh_token_replaces_the_stored_one_durably,
    invalid_input_is_invalid_argument_with_the_rule,
    a_rejected_code_leaves_the_state_for_the_real_one_and_one_exchange_wins,
    an_unavailable_provider_leaves_the_state_usable_for_a_retry,
    rejected_client_credentials_get_their_own_status_and_keep_the_state,
    a_provider_outage_serves_the_current_token_until_it_expires,
    a_rejected_refresh_token_needs_reauthorization_until_complete_auth,
    min_validity_forces_a_refresh_and_impossible_values_are_rejected,
    redirect_uri_in_the_code_exchange_is_a_setting_for_strict_servers,
    a_completion_the_disk_refuses_is_never_served,
    a_store_that_recovers_within_seconds_keeps_the_grant,
}

async fn full_flow_connects_an_account_and_serves_its_token() {
    let app = TestApp::spawn().await;
    let begun = app.begin("acme-prod").await.unwrap();

    let url = Url::parse(&begun.authorize_url).unwrap();
    assert_eq!(
        url.as_str().split('?').next().unwrap(),
        app.fake.authorize_url()
    );
    let q: std::collections::HashMap<_, _> = url.query_pairs().into_owned().collect();
    assert_eq!(q["client_id"], app.fake.config().client_id);
    assert_eq!(q["redirect_uri"], REDIRECT_URI);
    assert_eq!(q["response_type"], "code");
    assert_eq!(q["scope"], "full");
    assert_eq!(q["state"], begun.state);
    assert_eq!(q["code_challenge_method"], "S256");
    assert_eq!(q["code_challenge"].len(), 43);
    assert_eq!(begun.state.len(), 43);
    let state_expiry = app.seconds_left(begun.expires_at);
    assert!(
        (595..=600).contains(&state_expiry),
        "state lives 10 minutes, got {state_expiry}s"
    );

    let redirect = app.fake.approve(&begun.authorize_url).await.unwrap();
    let done = app.complete(&redirect.code, &redirect.state).await.unwrap();
    assert_eq!(done.account, "acme-prod");
    let token_expiry = app.seconds_left(done.expires_at);
    assert!((7195..=7200).contains(&token_expiry), "{token_expiry}");

    let token = app.get_token("acme-prod").await.unwrap();
    assert_eq!(token.token_type, "Bearer");
    assert_eq!(token.expires_at, done.expires_at);
    assert!(app.fake.access_token_is_valid(&token.access_token));
    let stats = app.fake.stats();
    assert_eq!((stats.code_exchanges_ok, stats.refreshes_ok), (1, 0));

    // Served from memory: no further upstream calls.
    for _ in 0..10 {
        assert_eq!(
            app.get_token("acme-prod").await.unwrap().access_token,
            token.access_token
        );
    }
    assert_eq!(app.fake.stats().token_requests, 1);
}

async fn a_restart_serves_the_same_accounts_without_asking_edgetag() {
    let app = TestApp::spawn().await;
    app.connect("a").await;
    app.connect("b").await;
    let before = app.get_token("a").await.unwrap();
    let requests = app.fake.stats().token_requests;

    let app = app.restart().await;
    assert_eq!(
        app.get_token("a").await.unwrap().access_token,
        before.access_token
    );
    assert!(app.get_token("b").await.is_ok());
    assert_eq!(app.fake.stats().token_requests, requests);
}

async fn a_state_completes_once_and_not_after_it_expires() {
    let app = TestApp::spawn().await;
    let (code, state) = app.authorize("acme").await;
    app.complete(&code, &state).await.unwrap();
    assert_status(
        app.complete(&code, &state).await,
        Code::NotFound,
        "start again with BeginAuth",
    );

    let (code, state) = app.authorize("acme").await;
    app.clock.advance(Duration::from_secs(601));
    let requests = app.fake.stats().token_requests;
    assert_status(
        app.complete(&code, &state).await,
        Code::NotFound,
        "start again with BeginAuth",
    );
    assert_eq!(
        app.fake.stats().token_requests,
        requests,
        "an expired state never reaches EdgeTag"
    );

    assert_status(
        app.complete("some-code", "never-issued").await,
        Code::NotFound,
        "BeginAuth",
    );
}

async fn of_many_concurrent_completions_of_one_state_exactly_one_succeeds() {
    let app = TestApp::spawn().await;
    let (code, state) = app.authorize("acme").await;
    let calls = (0..25).map(|_| {
        let (app_client, code, state) = (app.client.clone(), code.clone(), state.clone());
        tokio::spawn(async move {
            let mut c = app_client;
            c.complete_auth(credential_service::proto::CompleteAuthRequest { code, state })
                .await
        })
    });
    let results = futures::future::join_all(calls).await;
    let ok = results
        .iter()
        .filter(|r| r.as_ref().unwrap().is_ok())
        .count();
    let not_found = results
        .iter()
        .filter(|r| {
            r.as_ref()
                .unwrap()
                .as_ref()
                .is_err_and(|s| s.code() == Code::NotFound)
        })
        .count();
    assert_eq!((ok, not_found), (1, 24));
    assert_eq!(app.fake.stats().token_requests, 1);
}

async fn concurrent_begin_and_complete_for_many_accounts_all_land_durably() {
    let app = TestApp::spawn().await;
    let tasks = (0..100).map(|i| {
        let app = &app;
        async move { app.connect(&format!("acct-{i}")).await }
    });
    futures::future::join_all(tasks).await;
    let app = app.restart().await;
    for i in 0..100 {
        app.get_token(&format!("acct-{i}")).await.unwrap();
    }
}

async fn two_hundred_callers_on_an_expiring_token_share_exactly_one_refresh() {
    let app = TestApp::spawn().await;
    app.connect("acme").await;
    let old = app.get_token("acme").await.unwrap().access_token;
    app.clock.advance(2 * HOUR - 2 * MINUTE); // inside the 5-minute margin
    app.fake.set_token_delay(Duration::from_millis(200)); // keep the refresh in flight while all arrive

    let calls = (0..200).map(|_| {
        let mut c = app.client.clone();
        tokio::spawn(async move {
            c.get_token(GetTokenRequest {
                account: "acme".into(),
                min_validity: None,
            })
            .await
        })
    });
    let tokens: HashSet<String> = futures::future::join_all(calls)
        .await
        .into_iter()
        .map(|r| r.unwrap().unwrap().into_inner().access_token)
        .collect();
    assert_eq!(tokens.len(), 1, "every caller got the same token");
    let new = tokens.into_iter().next().unwrap();
    assert_ne!(new, old);
    assert!(app.fake.access_token_is_valid(&new));
    let stats = app.fake.stats();
    assert_eq!((stats.refreshes_ok, stats.token_requests), (1, 2));
}

async fn a_refresh_keeps_the_refresh_token_unless_edgetag_rotates_it() {
    // EdgeTag's documented behaviour: no new refresh token; the stored one keeps working.
    let app = TestApp::spawn().await;
    app.connect("keep").await;
    for round in 1..=3 {
        app.clock.advance(2 * HOUR);
        let t = app.get_token("keep").await.unwrap();
        assert!(
            app.fake.access_token_is_valid(&t.access_token),
            "round {round}"
        );
    }
    assert_eq!(app.fake.stats().refreshes_ok, 3);
}

async fn a_rotated_refresh_token_replaces_the_stored_one_durably() {
    let app = TestApp::spawn_rotating().await;
    app.connect("rot").await;
    app.clock.advance(2 * HOUR);
    app.get_token("rot").await.unwrap();
    // The old refresh token is dead at the fake; only the persisted new one can work after a restart.
    let app = app.restart().await;
    app.clock.advance(2 * HOUR);
    let t = app.get_token("rot").await.unwrap();
    assert!(app.fake.access_token_is_valid(&t.access_token));
    assert_eq!(app.fake.stats().refreshes_ok, 2);
}

async fn invalid_input_is_invalid_argument_with_the_rule() {
    let app = TestApp::spawn().await;
    for bad in ["", "has space", "slash/", &"x".repeat(129)] {
        assert_status(
            app.begin(bad).await,
            Code::InvalidArgument,
            "1-128 characters",
        );
        assert_status(
            app.get_token(bad).await,
            Code::InvalidArgument,
            "1-128 characters",
        );
    }
    assert_status(
        app.complete("", "state").await,
        Code::InvalidArgument,
        "code is required",
    );
    assert_status(
        app.complete("code", "").await,
        Code::InvalidArgument,
        "state is required",
    );
    assert_status(
        app.complete(&"c".repeat(3000), "s").await,
        Code::InvalidArgument,
        "code is malformed",
    );
    assert_status(
        app.get_token("nobody").await,
        Code::NotFound,
        "not connected",
    );
}

/// Issue 10, finding 6: a code EdgeTag rejects (maybe a guess by someone who saw the state) does
/// not use up the state; the real code still completes, once.
async fn a_rejected_code_leaves_the_state_for_the_real_one_and_one_exchange_wins() {
    // A made-up code sent with someone's state must not cancel their pending approval: the
    // state stays usable until it expires, and still only one exchange ever succeeds.
    let app = TestApp::spawn().await;
    let (code, state) = app.authorize("acme").await;
    assert_status(
        app.complete("guessed-code", &state).await,
        Code::FailedPrecondition,
        "rejected the authorization code",
    );
    app.fake.push_faults([Fault::InvalidGrant]);
    assert_status(
        app.complete(&code, &state).await,
        Code::FailedPrecondition,
        "rejected the authorization code",
    );
    assert_eq!(app.complete(&code, &state).await.unwrap().account, "acme");
    assert_status(
        app.complete(&code, &state).await,
        Code::NotFound,
        "start again",
    );
}

async fn an_unavailable_provider_leaves_the_state_usable_for_a_retry() {
    let app = TestApp::spawn_with(Options {
        request_timeout: Duration::from_millis(300),
        ..Options::default()
    })
    .await;
    let (code, state) = app.authorize("acme").await;
    for fault in [
        Fault::ServiceUnavailable,
        Fault::ServerError,
        Fault::Hang,
        Fault::DropConnection,
        Fault::HtmlPage,
    ] {
        app.fake.push_faults([fault]);
        let s = assert_status(
            app.complete(&code, &state).await,
            Code::Unavailable,
            "retry later",
        );
        assert!(
            !s.message().contains(&code),
            "the code never appears in a status"
        );
    }
    let done = app.complete(&code, &state).await.unwrap();
    assert_eq!(done.account, "acme");
}

async fn rejected_client_credentials_get_their_own_status_and_keep_the_state() {
    let app = TestApp::spawn().await;
    let (code, state) = app.authorize("acme").await;
    app.fake.push_faults([Fault::InvalidClient]);
    assert_status(
        app.complete(&code, &state).await,
        Code::Internal,
        "client id and client secret",
    );
    app.complete(&code, &state).await.unwrap();
}

async fn a_provider_outage_serves_the_current_token_until_it_expires() {
    let app = TestApp::spawn().await;
    app.connect("acme").await;
    let current = app.get_token("acme").await.unwrap().access_token;
    app.fake
        .set_persistent_fault(Some(Fault::ServiceUnavailable));
    app.clock.advance(2 * HOUR - 2 * MINUTE);
    assert_eq!(
        app.get_token("acme").await.unwrap().access_token,
        current,
        "still valid for 2 minutes"
    );
    app.clock.advance(3 * MINUTE);
    assert_status(
        app.get_token("acme").await,
        Code::Unavailable,
        "has expired",
    );
    app.fake.set_persistent_fault(None);
    app.clock.advance(MINUTE); // past the account's back-off
    let fresh = app.get_token("acme").await.unwrap().access_token;
    assert_ne!(fresh, current);
}

async fn a_rejected_refresh_token_needs_reauthorization_until_complete_auth() {
    let app = TestApp::spawn().await;
    app.connect("acme").await;
    app.fake.revoke_all_refresh_tokens();
    app.clock.advance(2 * HOUR);
    assert_status(
        app.get_token("acme").await,
        Code::FailedPrecondition,
        "run BeginAuth again",
    );
    let requests = app.fake.stats().token_requests;
    assert_status(
        app.get_token("acme").await,
        Code::FailedPrecondition,
        "re-authorization",
    );
    assert_eq!(
        app.fake.stats().token_requests,
        requests,
        "remembered, not retried upstream"
    );

    let app = app.restart().await;
    assert_status(
        app.get_token("acme").await,
        Code::FailedPrecondition,
        "re-authorization",
    );
    app.connect("acme").await;
    assert!(app.get_token("acme").await.is_ok());
}

async fn min_validity_forces_a_refresh_and_impossible_values_are_rejected() {
    let app = TestApp::spawn().await;
    app.connect("acme").await;
    let first = app.get_token("acme").await.unwrap().access_token;
    app.clock.advance(HOUR + 30 * MINUTE); // 30 minutes left: fine for GetToken, not for a 1-hour need
    let ask = |secs| {
        let mut c = app.client.clone();
        async move {
            c.get_token(GetTokenRequest {
                account: "acme".into(),
                min_validity: Some(prost_types::Duration {
                    seconds: secs,
                    nanos: 0,
                }),
            })
            .await
            .map(|r| r.into_inner())
        }
    };
    assert_eq!(ask(60).await.unwrap().access_token, first);
    let longer = ask(3600).await.unwrap();
    assert_ne!(longer.access_token, first);
    assert!(app.seconds_left(longer.expires_at) >= 3600);
    assert_status(ask(3 * 3600).await, Code::InvalidArgument, "min_validity");
}

async fn redirect_uri_in_the_code_exchange_is_a_setting_for_strict_servers() {
    // EdgeTag's documented exchange carries no redirect_uri; a strict server requires it.
    let clock = credential_service::clock::Clock::manual();
    let strict = fake_edgetag::FakeConfig {
        accept_redirect_uri_in_body: true,
        ..common::fake_config(&clock)
    };
    let fake = std::sync::Arc::new(fake_edgetag::FakeEdgeTag::start(strict).await.unwrap());
    let dir = std::sync::Arc::new(tempfile::tempdir().unwrap());
    let options = Options {
        send_redirect_uri: true,
        ..Options::default()
    };
    let app = TestApp::start(fake, clock, dir, options).await;
    assert_eq!(app.connect("acme").await.account, "acme");

    // The default fake is as strict as EdgeTag's documentation: an extra field is refused.
    let app = TestApp::spawn_with(Options {
        send_redirect_uri: true,
        ..Options::default()
    })
    .await;
    let (code, state) = app.authorize("acme").await;
    assert_status(
        app.complete(&code, &state).await,
        Code::FailedPrecondition,
        "invalid_request",
    );
}

/// EdgeTag uses the code up in the exchange, so a store that refuses the token set for a moment (a
/// lock timeout, a failover) gets more tries before the person's approval is lost.
async fn a_store_that_recovers_within_seconds_keeps_the_grant() {
    let app = TestApp::spawn().await;
    let (code, state) = app.authorize("newcomer").await;
    app.faults.fail_next_writes(2);
    let connected = app
        .complete(&code, &state)
        .await
        .expect("stored on a later try");
    assert_eq!(connected.account, "newcomer");
    let stats = app.fake.stats();
    assert_eq!(stats.code_exchanges_ok, 1, "one exchange, its answer kept");
    let token = app.get_token("newcomer").await.unwrap();
    assert!(app.fake.access_token_is_valid(&token.access_token));
}

/// EdgeTag uses the code up in the exchange: when the store then refuses the token set, nothing is
/// served, and CompleteAuth says to start again (ABORTED), not to retry a call that cannot succeed.
async fn a_completion_the_disk_refuses_is_never_served() {
    let app = TestApp::spawn().await;
    let (code, state) = app.authorize("newcomer").await;
    app.faults.fail_writes(true);
    assert_status(
        app.complete(&code, &state).await,
        Code::Aborted,
        "start the authorization again with BeginAuth",
    );
    assert_status(app.complete(&code, &state).await, Code::NotFound, "");
    assert_status(
        app.get_token("newcomer").await,
        Code::NotFound,
        "not connected",
    );
    assert!(app.list(0, "").await.0.is_empty(), "not even listed");
    app.faults.fail_writes(false);
    app.connect("newcomer").await;
    assert!(app.get_token("newcomer").await.is_ok());
}
