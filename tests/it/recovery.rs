//! Demand limits and recovery, against the real server, the fake EdgeTag and the manual clock:
//! a `min_validity` no fresh token meets is refused without asking EdgeTag, callers start at most
//! one refresh per account per demand interval, accounts whose tokens expired during an EdgeTag
//! outage serve again within 2 s of its return (one account and 1,000, on sled and on PostgreSQL,
//! and fleet-wide across two replicas), and each cause of a failed refresh reaches callers as one
//! status, whether a caller or the scheduler met it first.

use crate::common;

use std::time::Duration;

use common::{HOUR, MINUTE, Options, TestApp, assert_status, events, test_policy};
use credential_service::{
    broker::{BrokerConfig, RefreshEventKind, RefreshPolicy},
    proto::{GetTokenRequest, GetTokenResponse},
};
use fake_edgetag::Fault;
use tonic::{Code, Status};

/// Refresh margin in force for the fake's 2-hour tokens (the 5-minute default; below half the
/// lifetime, so not capped).
const MARGIN: Duration = Duration::from_secs(300);
/// `policy::max_min_validity(7200 s, 300 s)`: the largest `min_validity` a caller may ask for.
const LONGEST: Duration = Duration::from_secs(7200 - MARGIN.as_secs());

fn requests(app: &TestApp) -> u64 {
    app.fake.stats().token_requests
}

/// A connected account whose access token has just expired: the next GetToken must refresh.
async fn expired_account(options: Options) -> TestApp {
    let app = TestApp::spawn_with(options).await;
    app.connect("acme").await;
    app.clock.advance(2 * HOUR + MINUTE);
    app
}

/// How far the test clock is ahead of real time (it moves with real time, plus what tests add).
fn clock_offset(app: &TestApp) -> Duration {
    app.clock
        .now()
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default()
}

fn with_policy(policy: RefreshPolicy) -> Options {
    Options {
        broker: BrokerConfig {
            refresh: policy,
            ..BrokerConfig::default()
        },
        ..Options::default()
    }
}

/// GetToken for `account` with a `min_validity`.
async fn get_for(
    app: &TestApp,
    account: &str,
    min_validity: Duration,
) -> Result<GetTokenResponse, Status> {
    app.client
        .clone()
        .get_token(GetTokenRequest {
            account: account.into(),
            min_validity: Some(prost_types::Duration {
                seconds: min_validity.as_secs() as i64,
                nanos: min_validity.subsec_nanos() as i32,
            }),
        })
        .await
        .map(|r| r.into_inner())
}

// On PostgreSQL the back-offs are the fleet's, kept in the database: the recovery must end them
// there too, or the scheduler would take them up again from the store.
common::on_both_stores! {
    #[tokio::test]
    one_expired_account_serves_within_two_seconds_of_edgetag_returning,
    retry_after_still_holds_probes_back,
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    a_thousand_expired_accounts_are_all_served_at_once_after_a_long_outage,
}

// ---- Issue 10, finding 3: a reader cannot make the service refresh over and over ----

#[tokio::test]
async fn a_min_validity_no_fresh_token_meets_is_refused_without_asking_edgetag() {
    let app = TestApp::spawn().await;
    app.connect("acme").await;
    let before = requests(&app);
    let too_long = [
        Duration::from_millis(7_199_999),
        LONGEST + Duration::from_millis(1),
        2 * HOUR,
    ];

    // On a valid token, later in its life (it no longer covers these needs), and on an expired
    // one: each would otherwise make a refresh.
    for advance in [Duration::from_secs(1), HOUR, HOUR + 2 * MINUTE] {
        app.clock.advance(advance);
        for need in too_long {
            let status = assert_status(
                get_for(&app, "acme", need).await,
                Code::InvalidArgument,
                "min_validity",
            );
            assert!(
                status.message().contains("at most 6900s"),
                "names the largest allowed value: {:?}",
                status.message()
            );
        }
    }
    assert_eq!(requests(&app), before, "no upstream request for a refusal");

    // The largest allowed value itself is served, by a refresh the expired token needs.
    let token = get_for(&app, "acme", LONGEST).await.unwrap();
    assert!(app.seconds_left(token.expires_at) > LONGEST.as_secs() as i64);
    assert_eq!(requests(&app), before + 1);
}

#[tokio::test]
async fn two_hundred_readers_asking_for_the_longest_validity_make_at_most_two_refreshes() {
    let app = TestApp::spawn().await;
    app.connect("acme").await;
    let old = app.get_token("acme").await.unwrap().access_token;
    // 6,600 s left: valid, but short of the 6,900 s the readers ask for.
    app.clock.advance(10 * MINUTE);
    let before = requests(&app);
    app.fake.set_token_delay(Duration::from_millis(100));

    let calls = (0..200).map(|_| {
        let app = &app;
        async move { get_for(app, "acme", LONGEST).await }
    });
    let results = futures::future::join_all(calls).await;
    let refreshes = requests(&app) - before;
    assert!(
        (1..=2).contains(&refreshes),
        "{refreshes} upstream refreshes"
    );
    for result in results {
        let token = result.expect("every reader is served");
        assert_ne!(token.access_token, old);
        assert!(app.seconds_left(token.expires_at) > LONGEST.as_secs() as i64);
    }

    // Once more, the same instant: served from memory.
    get_for(&app, "acme", LONGEST).await.unwrap();
    assert_eq!(requests(&app) - before, refreshes);
}

#[tokio::test]
async fn a_token_just_issued_is_not_refreshed_again_on_demand() {
    // The refresh answers without expires_in, so the new token lives 1 h (the configured default):
    // short of the 5,000 s the caller asked for (allowed for 2-hour tokens). Refreshing again at
    // once would fix that, at one more upstream call per caller.
    let need = Duration::from_secs(5000);
    let app = expired_account(Options::default()).await;
    let before = requests(&app);
    app.fake.push_faults([Fault::MissingExpiresIn]);
    assert_status(
        get_for(&app, "acme", need).await,
        Code::Unavailable,
        "no token valid for the requested time",
    );
    assert_eq!(requests(&app) - before, 1, "one refresh, not two");
    // The new token serves needs it covers, from memory.
    let token = app.get_token("acme").await.unwrap();
    assert!((3590..=3600).contains(&app.seconds_left(token.expires_at)));
    get_for(&app, "acme", Duration::from_secs(3000))
        .await
        .unwrap();
    assert_eq!(requests(&app) - before, 1);
    // A moment later (well inside the demand interval), callers still cannot start another one.
    app.clock.advance(Duration::from_millis(200));
    get_for(&app, "acme", Duration::from_secs(3000))
        .await
        .unwrap();
    assert_eq!(requests(&app) - before, 1);

    // The control: without the demand interval the caller's second round refreshes again.
    let app = expired_account(with_policy(RefreshPolicy {
        demand_interval: Duration::ZERO,
        ..test_policy()
    }))
    .await;
    let before = requests(&app);
    app.fake.push_faults([Fault::MissingExpiresIn]);
    get_for(&app, "acme", need).await.unwrap();
    assert_eq!(requests(&app) - before, 2);
}

// ---- Issue 11, item 1: after an EdgeTag outage, serve again at once ----

async fn one_expired_account_serves_within_two_seconds_of_edgetag_returning() {
    // Short real-time pauses between the tries inside one refresh; the policy is otherwise the
    // production one (3 tries, back-off from 5 s doubling to 5 min, 1-s demand interval).
    let policy = RefreshPolicy {
        retry_base: Duration::from_millis(1),
        ..test_policy()
    };
    let attempts = u64::from(policy.attempts);
    let app = expired_account(with_policy(policy)).await;
    let mut events_rx = app.broker.subscribe();
    app.fake
        .set_persistent_fault(Some(Fault::ServiceUnavailable));
    let before = requests(&app);

    // Ten minutes of outage: every second of clock two callers ask, and the scheduler scans (as
    // it does every second in production).
    let step = Duration::from_secs(1);
    let steps = 600;
    let mut scheduler_refreshes = 0;
    for _ in 0..steps {
        for _ in 0..2 {
            assert_status(app.get_token("acme").await, Code::Unavailable, "503");
        }
        scheduler_refreshes += app.broker.refresh_due().await;
        app.broker.finish_refreshes().await;
        app.clock.advance(step);
    }
    let outage = step * steps;
    let failed = std::iter::from_fn(|| events_rx.try_recv().ok())
        .filter(|e| e.kind == RefreshEventKind::Failed)
        .count() as u64;
    let during = requests(&app) - before;
    println!(
        "outage of {outage:?}: {failed} failed refreshes ({scheduler_refreshes} by the scheduler), {during} upstream requests"
    );
    // Bounded: callers let at most one probe through per second of clock (and waiting callers do
    // use it), the scheduler adds only what the back-off allows (at most 9 in 10 minutes); each
    // refresh is at most `attempts` requests, and no request is made outside a refresh. So at
    // most 3 requests per second of clock for this account, however many callers wait.
    let seconds = outage.as_secs();
    assert!(failed <= seconds + 10, "{failed} refreshes in {seconds} s");
    assert!(
        failed >= seconds - 10,
        "callers probe: {failed} in {seconds} s"
    );
    assert_eq!(during, attempts * failed);
    assert!(
        scheduler_refreshes <= 10,
        "the back-off grew: {scheduler_refreshes} scheduler refreshes in {seconds} s"
    );

    // The back-off has grown to minutes (its base is 5 s): two minutes without callers, and the
    // scheduler still leaves the account alone.
    app.clock.advance(2 * MINUTE);
    assert_eq!(app.broker.refresh_due().await, 0, "backing off for minutes");
    assert_eq!(requests(&app) - before, during);

    // A caller's probe is let through, and fails; a caller at the same instant is answered at
    // once, without asking.
    assert_status(app.get_token("acme").await, Code::Unavailable, "503");
    assert_eq!(requests(&app) - before, during + attempts);
    app.fake.set_persistent_fault(None);
    let at_return = requests(&app);
    assert_status(app.get_token("acme").await, Code::Unavailable, "503");
    assert_eq!(requests(&app), at_return, "at most one probe a second");

    // EdgeTag is back; the account backs off for minutes, yet callers are served within 2 s.
    let mut waited = Duration::ZERO;
    let token = loop {
        app.clock.advance(Duration::from_millis(250));
        waited += Duration::from_millis(250);
        match app.get_token("acme").await {
            Ok(token) => break token,
            Err(status) => assert_eq!(status.code(), Code::Unavailable, "{status:?}"),
        }
        assert!(
            waited < Duration::from_secs(2),
            "still failing after {waited:?}"
        );
    };
    println!("served {waited:?} after EdgeTag's return");
    assert!(app.fake.access_token_is_valid(&token.access_token));
    assert!(waited <= Duration::from_secs(2));
    assert_eq!(requests(&app), at_return + 1, "one probe");
}

async fn retry_after_still_holds_probes_back() {
    let app = expired_account(Options::default()).await;
    let before = requests(&app);
    app.fake.set_persistent_fault(Some(Fault::TooManyRequests {
        retry_after_secs: 120,
    }));
    assert_status(app.get_token("acme").await, Code::Unavailable, "429");
    assert_eq!(
        requests(&app) - before,
        1,
        "beyond the retry budget: one try"
    );

    // EdgeTag asked for two minutes: neither callers (however many, however often) nor the
    // scheduler ask before then, even once EdgeTag would answer again.
    // (The test clock also moves with real time, so stop a few seconds short of the two minutes.)
    for i in 0..110 {
        if i == 60 {
            app.fake.set_persistent_fault(None);
        }
        app.clock.advance(Duration::from_secs(1));
        for _ in 0..3 {
            assert_status(app.get_token("acme").await, Code::Unavailable, "429");
        }
        assert_eq!(app.broker.refresh_due().await, 0);
    }
    assert_eq!(requests(&app) - before, 1, "held back by Retry-After");

    app.clock.advance(Duration::from_secs(11));
    let token = app.get_token("acme").await.unwrap();
    assert!(app.fake.access_token_is_valid(&token.access_token));
    assert_eq!(requests(&app) - before, 2);
}

async fn a_thousand_expired_accounts_are_all_served_at_once_after_a_long_outage() {
    // One try per refresh keeps the outage's request count (and this test's run time) small; the
    // recovery does not depend on it.
    let app = TestApp::spawn_with(with_policy(RefreshPolicy {
        attempts: 1,
        ..test_policy()
    }))
    .await;
    let names: Vec<String> = (0..1000).map(|i| format!("acct-{i}")).collect();
    for chunk in names.chunks(200) {
        futures::future::join_all(chunk.iter().map(|n| app.connect(n))).await;
    }
    let mut events_rx = app.broker.subscribe();
    app.fake
        .set_persistent_fault(Some(Fault::ServiceUnavailable));
    app.clock.advance(2 * HOUR + MINUTE);
    let before = requests(&app);

    // Nine minutes of outage, the scheduler scanning every second of clock: every account fails,
    // backs off, fails again when its back-off ends, …
    let mut passes = Vec::new();
    for _ in 0..540 {
        let started = app.broker.refresh_due().await;
        let failed = events(&mut events_rx, started).await;
        assert!(failed.iter().all(|e| e.kind == RefreshEventKind::Failed));
        passes.push(started);
        app.clock.advance(Duration::from_secs(1));
    }
    let during = requests(&app) - before;
    let busy = passes.iter().filter(|n| **n > 0).count();
    println!(
        "outage: {during} upstream requests for 1000 accounts in 540 s, {busy} busy scheduler passes"
    );
    // Back-off (2.5-5 s, doubling to 150-300 s) allows 7 to 9 refreshes per account in nine
    // minutes (the first included; the test clock also moves with real time, by far less than the
    // minute of slack): a scan a second without back-off would be 540 per account.
    assert!(during >= 1000 * 7, "the outage was met: {during}");
    assert!(during <= 1000 * 9, "bounded: {during}");
    // Late in the outage accounts are in their longest back-off: the last minute is quiet.
    let last_minute: usize = passes[480..].iter().sum();
    assert!(
        last_minute <= 1000,
        "{last_minute} refreshes in the last minute"
    );

    // EdgeTag returns. One caller's probe gets through and is served...
    app.fake.set_persistent_fault(None);
    app.fake.reset_peak();
    let at_return = requests(&app);
    let offset_at_return = clock_offset(&app);
    let started = std::time::Instant::now();
    let token = app.get_token("acct-0").await.unwrap();
    assert!(app.fake.access_token_is_valid(&token.access_token));

    // ... and every other account is refreshed at once (the scheduler is woken; its next scan
    // would be a day away in these tests), without the clock moving at all.
    let recovered = events(&mut events_rx, 1000).await;
    assert!(
        recovered
            .iter()
            .all(|e| e.kind == RefreshEventKind::Refreshed),
        "{:?}",
        recovered
            .iter()
            .find(|e| e.kind != RefreshEventKind::Refreshed)
    );
    println!(
        "all 1000 served {:?} (real time) after EdgeTag's return",
        started.elapsed()
    );
    let moved = clock_offset(&app).abs_diff(offset_at_return);
    assert!(
        moved < Duration::from_millis(100),
        "the test clock was not moved: {moved:?}"
    );
    let stats = app.fake.stats();
    assert_eq!(stats.token_requests - at_return, 1000, "one refresh each");
    assert!(stats.peak_token_concurrency <= 8, "within the upstream cap");
    let before_reads = requests(&app);
    for name in &names {
        let token = app.get_token(name).await.unwrap();
        assert!(app.seconds_left(token.expires_at) > 7000, "{name}");
    }
    assert_eq!(requests(&app), before_reads, "served from memory");
}

/// Two replicas on one PostgreSQL database. During the outage one replica's scheduler fails
/// every account and shares the back-offs; the other learns them from the store. When EdgeTag
/// returns, one caller's probe on the replica that never failed a refresh itself ends the fleet's
/// back-offs: every account is refreshed at once, exactly once fleet-wide, without the clock
/// moving (without the store's part of the cut, every account waited out a back-off of minutes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recovery_on_one_replica_ends_the_back_offs_of_the_fleet() {
    common::STORE
        .scope(common::StoreKind::Postgres, async {
            let options = with_policy(RefreshPolicy {
                attempts: 1,
                ..test_policy()
            });
            let a = TestApp::spawn_with(options.clone()).await;
            let names: Vec<String> = (0..20).map(|i| format!("acct-{i}")).collect();
            for name in &names {
                a.connect(name).await;
            }
            // The second replica loads every account at start.
            let b =
                TestApp::start(a.fake.clone(), a.clock.clone(), a.data_dir.clone(), options).await;
            assert_eq!(b.broker.account_count(), names.len());
            let (mut a_events, mut b_events) = (a.broker.subscribe(), b.broker.subscribe());

            a.fake.set_persistent_fault(Some(Fault::ServiceUnavailable));
            a.clock.advance(2 * HOUR + MINUTE);
            // (Counted by events: B's scheduler task may make its first scan at this moment too.)
            b.broker.refresh_due().await;
            let failed = events(&mut b_events, names.len()).await;
            assert!(failed.iter().all(|e| e.kind == RefreshEventKind::Failed));
            let after_outage = requests(&a);
            // The first replica's scheduler finds the fleet backing off: nothing reaches EdgeTag.
            a.broker.refresh_due().await;
            a.broker.finish_refreshes().await;
            assert_eq!(requests(&a), after_outage, "the fleet backs off as one");

            a.fake.set_persistent_fault(None);
            let offset_at_return = clock_offset(&a);
            let token = a.get_token("acct-0").await.unwrap();
            assert!(a.fake.access_token_is_valid(&token.access_token));

            // Every account, once, by whichever replica's scheduler claims it first.
            let mut refreshed = std::collections::HashSet::new();
            let collect = async {
                while refreshed.len() < names.len() {
                    let event = tokio::select! {
                        e = a_events.recv() => e,
                        e = b_events.recv() => e,
                    }
                    .expect("event stream open");
                    assert_eq!(event.kind, RefreshEventKind::Refreshed, "{event:?}");
                    assert!(refreshed.insert(event.account.clone()), "twice: {event:?}");
                }
            };
            tokio::time::timeout(Duration::from_secs(30), collect)
                .await
                .expect("every account refreshed at once");
            let moved = clock_offset(&a).abs_diff(offset_at_return);
            assert!(moved < Duration::from_millis(100), "clock moved {moved:?}");
            assert_eq!(
                requests(&a) - after_outage,
                names.len() as u64,
                "one refresh each"
            );
            for name in &names {
                let token = a.get_token(name).await.unwrap();
                assert!(a.fake.access_token_is_valid(&token.access_token), "{name}");
            }
        })
        .await
}

// ---- Issue 11, item 2: one status for one cause ----

/// What callers are told about an expired account whose refresh meets `cause` (set up by `inject`),
/// when a caller meets it first and when the scheduler does; every answer must be the same.
async fn answers_on_both_paths(inject: impl Fn(&TestApp)) -> Vec<(Code, String)> {
    let mut answers = Vec::new();
    let mut record = |r: Result<GetTokenResponse, Status>| {
        let status = r.expect_err("the refresh fails");
        answers.push((status.code(), status.message().to_owned()));
    };

    // Caller first: its own refresh meets the failure; a second caller at the same instant is
    // answered from what the first found (no refresh of its own).
    let app = expired_account(Options::default()).await;
    inject(&app);
    record(app.get_token("acme").await);
    let n = requests(&app);
    record(app.get_token("acme").await);
    assert_eq!(requests(&app), n, "the second caller does not refresh");

    // Scheduler first: its refresh meets the failure; then a caller (which may probe once) and
    // another caller answered without refreshing.
    let app = expired_account(Options::default()).await;
    let mut events_rx = app.broker.subscribe();
    inject(&app);
    assert_eq!(app.broker.refresh_due().await, 1);
    let kind = events(&mut events_rx, 1).await[0].kind;
    assert_ne!(kind, RefreshEventKind::Refreshed);
    app.broker.finish_refreshes().await;
    record(app.get_token("acme").await);
    let n = requests(&app);
    record(app.get_token("acme").await);
    assert_eq!(requests(&app), n, "the second caller does not refresh");
    answers
}

#[track_caller]
fn assert_one_answer(answers: &[(Code, String)], code: Code, needle: &str) {
    for answer in answers {
        assert_eq!(answer, &answers[0], "the same cause, the same answer");
    }
    let (got, message) = &answers[0];
    assert_eq!(*got, code, "{message}");
    assert!(message.contains(needle), "{message:?} lacks {needle:?}");
}

#[tokio::test]
async fn rejected_client_credentials_are_one_status_on_every_path() {
    let answers = answers_on_both_paths(|app| {
        app.fake.set_persistent_fault(Some(Fault::InvalidClient));
    })
    .await;
    assert_one_answer(&answers, Code::Internal, "client credentials");
}

#[tokio::test]
async fn a_rejected_refresh_token_is_one_status_on_every_path() {
    let answers = answers_on_both_paths(|app| {
        app.fake.set_persistent_fault(Some(Fault::InvalidGrant));
    })
    .await;
    assert_one_answer(&answers, Code::FailedPrecondition, "re-authorization");
}

#[tokio::test]
async fn a_malformed_answer_is_one_status_on_every_path() {
    for fault in [Fault::MalformedJson, Fault::HtmlPage] {
        let answers = answers_on_both_paths(|app| {
            app.fake.set_persistent_fault(Some(fault.clone()));
        })
        .await;
        assert_one_answer(&answers, Code::Unavailable, "could not renew it");
        assert!(!answers[0].1.contains("<html"), "no body is echoed");
    }
}

#[tokio::test]
async fn an_unavailable_edgetag_is_one_status_on_every_path() {
    let answers = answers_on_both_paths(|app| {
        app.fake
            .set_persistent_fault(Some(Fault::ServiceUnavailable));
    })
    .await;
    assert_one_answer(&answers, Code::Unavailable, "503");
}

#[tokio::test]
async fn a_store_failure_is_one_status_on_every_path() {
    let answers = answers_on_both_paths(|app| app.faults.fail_writes(true)).await;
    assert_one_answer(
        &answers,
        Code::Internal,
        "internal error; the service's log has the cause",
    );
}

/// A store that went out of reach after the refresh's claim (the write meets it) answers as one
/// that cannot be reached for the claim does: UNAVAILABLE, for the token set held back too.
#[tokio::test]
async fn an_unreachable_store_is_one_status_on_every_path() {
    let answers = answers_on_both_paths(|app| app.faults.unreachable_writes(true)).await;
    assert_one_answer(&answers, Code::Unavailable, "store");
}

#[tokio::test]
async fn a_store_failure_at_the_refresh_claim_is_one_status_on_every_path() {
    let answers = answers_on_both_paths(|app| app.faults.fail_claims(true)).await;
    assert_one_answer(
        &answers,
        Code::Internal,
        "internal error; the service's log has the cause",
    );
}

// ---- Claims and the upstream cap ----

/// A refresh whose try failed transiently retries only if a place in the upstream cap is free when
/// its pause ends. It holds the account's claim (on PostgreSQL a row lock and a pooled connection),
/// so it must not wait behind other refreshes for a place: it answers with its failure instead.
#[tokio::test]
async fn a_retry_does_not_wait_for_a_place_while_holding_the_claim() {
    let app = TestApp::spawn_with(Options {
        broker: BrokerConfig {
            upstream_concurrency: 1,
            // b's slow request keeps the one request slot even after it stalls (see
            // tests/it/upstream.rs for stalls), so no place is free during a's pause.
            upstream_max_in_flight: 1,
            refresh: RefreshPolicy {
                retry_base: Duration::from_secs(1),
                retry_budget: Duration::from_secs(5),
                ..test_policy()
            },
            ..BrokerConfig::default()
        },
        request_timeout: Duration::from_secs(10),
        ..Options::default()
    })
    .await;
    app.connect("a").await;
    app.connect("b").await;
    app.clock.advance(2 * HOUR + MINUTE);
    let base = requests(&app);
    // a's first try meets a 503; b's refresh then holds the only place at EdgeTag for 4 s.
    app.fake.push_faults([
        Fault::ServiceUnavailable,
        Fault::Delay(Duration::from_secs(4)),
    ]);
    let a = tokio::spawn({
        let mut client = app.client.clone();
        async move {
            client
                .get_token(GetTokenRequest {
                    account: "a".into(),
                    min_validity: None,
                })
                .await
        }
    });
    app.fake
        .until_token_requests_in_flight(|n| n == 0 && requests(&app) == base + 1)
        .await;
    let b = app.get_token("b");
    tokio::pin!(b);
    // b's request reaches EdgeTag during a's pause (at least half of retry_base).
    tokio::select! {
        _ = &mut b => panic!("b answered before its delayed refresh"),
        () = app.until_token_request_in_flight() => {}
    }
    let answer = tokio::select! {
        answer = a => answer.unwrap(),
        _ = &mut b => panic!("a waited for b's place"),
    };
    assert_status(answer.map(|r| r.into_inner()), Code::Unavailable, "503");
    assert_eq!(
        app.fake.token_requests_in_flight(),
        1,
        "b still holds the place"
    );
    assert_eq!(
        requests(&app),
        base + 2,
        "a's one try and b's: a did not retry"
    );
    assert!(b.await.is_ok());
}

/// A refresh waits for an upstream slot before it claims the account, not after: on PostgreSQL a
/// claim holds a row lock and a pooled connection until its refresh ends, so claims queued behind
/// the cap could use up the pool, or outlive the database's idle-in-transaction timeout and let
/// another replica refresh the same account.
#[tokio::test]
async fn refreshes_queued_behind_the_upstream_cap_hold_no_claim() {
    let app = TestApp::spawn_with(Options {
        broker: BrokerConfig {
            upstream_concurrency: 1,
            ..BrokerConfig::default()
        },
        ..Options::default()
    })
    .await;
    let accounts = ["a0", "a1", "a2", "a3", "a4"];
    for account in accounts {
        app.connect(account).await;
    }
    app.clock.advance(2 * HOUR + MINUTE);
    // Long enough that every caller's refresh is queued while the first is at EdgeTag.
    app.fake.set_token_delay(Duration::from_millis(100));
    let calls = accounts.map(|account| app.get_token(account));
    for token in futures::future::join_all(calls).await {
        assert!(app.fake.access_token_is_valid(&token.unwrap().access_token));
    }
    // One claim at EdgeTag, and at most one more writing the answer it got (its place in the cap
    // is free once EdgeTag has answered); all five at once before.
    let peak = app.faults.peak_claims();
    assert!(
        peak <= 2,
        "{peak} claims held at once with one upstream slot"
    );
}
