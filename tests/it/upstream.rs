//! A slow EdgeTag for some accounts must not make every other account wait (issue 31, §1):
//! requests that stall give their place to the next, a caller's wait for a place is bounded,
//! and code exchanges never queue behind refreshes.

use std::time::{Duration, Instant};

use tonic::Code;

use crate::common::{self, HOUR, MINUTE, Options, TestApp};

/// Accounts whose refreshes EdgeTag sits on, as in the measured attack.
const SLOW: usize = 24;
/// How long EdgeTag sits on them: beyond the upstream timeout, so each ends by timing out.
const HOLD: Duration = Duration::from_secs(8);
/// The bound the issue sets on everyone else's wait, beyond their own upstream latency.
const BOUND: Duration = Duration::from_secs(2);

/// The production limits (8 places, a stall after 500 ms, 32 out at most, 2 s in the queue),
/// and an upstream timeout shorter than [`HOLD`].
fn options() -> Options {
    Options {
        request_timeout: Duration::from_secs(6),
        ..Options::default()
    }
}

/// 24 accounts' refreshes held for longer than the upstream timeout, each with a caller waiting:
/// another account's refresh and an operator's CompleteAuth each finish within 2 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_edgetag_for_some_accounts_does_not_starve_the_others() {
    let app = TestApp::spawn_with(options()).await;
    for i in 0..SLOW {
        app.connect(&format!("slow-{i}")).await;
    }
    let slow_tokens = app.fake.issued_refresh_tokens();
    assert_eq!(slow_tokens.len(), SLOW);
    app.connect("other").await;
    app.fake.hold_refreshes(slow_tokens, HOLD);
    app.clock.advance(2 * HOUR); // every access token has expired

    let slow_callers: Vec<_> = (0..SLOW)
        .map(|i| {
            let mut client = app.client.clone();
            tokio::spawn(async move {
                client
                    .get_token(credential_service::proto::GetTokenRequest {
                        account: format!("slow-{i}"),
                        min_validity: None,
                    })
                    .await
            })
        })
        .collect();
    // Every place is taken by a held refresh before the others ask.
    app.fake.until_token_requests_in_flight(|n| n >= 8).await;

    let started = Instant::now();
    let token = app
        .get_token("other")
        .await
        .expect("the other account refreshes");
    let refreshed_in = started.elapsed();
    assert!(app.fake.access_token_is_valid(&token.access_token));

    let (code, state) = app.authorize("newcomer").await;
    let started = Instant::now();
    app.complete(&code, &state)
        .await
        .expect("CompleteAuth succeeds");
    let completed_in = started.elapsed();

    assert!(
        refreshed_in < BOUND,
        "another account's refresh took {refreshed_in:?} behind {SLOW} slow ones"
    );
    assert!(
        completed_in < BOUND,
        "CompleteAuth took {completed_in:?} behind {SLOW} slow refreshes"
    );

    // The slow accounts' callers are answered too, never hung: UNAVAILABLE (their tokens
    // expired), within the upstream timeout and the queue bound, not after rounds of them.
    let deadline = options().request_timeout + BOUND + Duration::from_secs(3);
    for caller in slow_callers {
        let answer = tokio::time::timeout(deadline, caller)
            .await
            .expect("a slow account's caller is answered")
            .unwrap();
        let status = answer.expect_err("EdgeTag held the refresh past its timeout");
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    }
}

/// With every place held, a caller whose account's token is still valid (inside the refresh
/// margin) gets that token once the queue bound passes, and one whose token expired gets
/// UNAVAILABLE naming the slow EdgeTag; neither hangs, and neither account backs off for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_that_finds_no_place_gets_its_valid_token_or_unavailable() {
    let mut options = options();
    options.broker.upstream_concurrency = 1;
    options.broker.upstream_max_in_flight = 1; // the held request keeps the only place
    let queue_bound = options.broker.upstream_queue_timeout;
    let app = TestApp::spawn_with(options).await;
    app.connect("hog").await;
    let hog_token = app.fake.issued_refresh_tokens();
    app.connect("expired").await;
    app.clock.advance(5 * MINUTE);
    app.connect("valid").await;
    let valid = app.get_token("valid").await.unwrap().access_token;
    app.fake.hold_refreshes(hog_token, HOLD);
    // EdgeTag's tokens last two hours: `hog` and `expired` have expired; `valid` has 4 minutes
    // left, inside the 5-minute refresh margin.
    app.clock.advance(2 * HOUR - 4 * MINUTE);

    let mut client = app.client.clone();
    let hog = tokio::spawn(async move {
        client
            .get_token(credential_service::proto::GetTokenRequest {
                account: "hog".into(),
                min_validity: None,
            })
            .await
    });
    app.until_token_request_in_flight().await;

    let started = Instant::now();
    common::assert_status(
        app.get_token("expired").await,
        Code::Unavailable,
        "too slowly",
    );
    let waited = started.elapsed();
    assert!(
        waited >= queue_bound && waited < queue_bound + BOUND,
        "answered after {waited:?}"
    );
    let started = Instant::now();
    let served = app
        .get_token("valid")
        .await
        .expect("the current token serves");
    assert_eq!(served.access_token, valid, "no refresh happened");
    assert!(started.elapsed() < queue_bound + BOUND);

    // Not the account's fault: once EdgeTag has a place again, `expired` refreshes at once.
    app.fake.hold_refreshes([], Duration::ZERO);
    hog.await.unwrap().expect_err("the held refresh timed out");
    let token = app.get_token("expired").await.expect("refreshes now");
    assert!(app.fake.access_token_is_valid(&token.access_token));
}
