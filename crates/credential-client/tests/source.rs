//! TokenSource against the real service (and the strict fake EdgeTag): the first token, pushed
//! refreshes, outages, restarts, expiry, removal; and the GetToken fallback, connection sharing,
//! the HTTP layer and shutdown against a minimal GetToken-only service.

mod common;

use std::{
    sync::atomic::Ordering,
    time::{Duration, Instant, SystemTime},
};

use common::{Legacy, Service, client, lost, secret, until};
use credential_client::{
    AuthorizationLayer, Client, Code, Error, TEAM_ID_HEADER, Token, TokenSource,
};
use tower::{Layer, ServiceExt, service_fn};

const MINUTE: Duration = Duration::from_secs(60);

/// Polls until the source hands out a token other than `old`; fails after `limit`.
async fn next_token(source: &TokenSource, old: &Token, limit: Duration) -> Token {
    until(limit, "a new token", async || {
        let token = source.token().await.expect("no error while waiting");
        (token != *old).then_some(token)
    })
    .await
}

#[tokio::test]
async fn the_first_token_is_what_get_token_answers() {
    let service = Service::spawn().await;
    service.connect("acme").await;
    let source = client(service.addr, &service.clock)
        .build()
        .unwrap()
        .token_source("acme");
    let token = source.token().await.unwrap();
    let (current, expires_at) = service.current("acme").await;
    assert_eq!(secret(&token), current);
    assert_eq!(token.token_type(), "Bearer");
    assert_eq!(token.expires_at(), expires_at);
    assert!(source.last_error().is_none());
    let printed = format!("{token:?} {source:?}");
    assert!(!printed.contains(&current), "{printed}");
}

#[tokio::test]
async fn a_refresh_is_pushed_within_a_second() {
    let service = Service::spawn().await;
    service.connect("acme").await;
    let source = client(service.addr, &service.clock)
        .build()
        .unwrap()
        .token_source("acme");
    let first = source.token().await.unwrap();

    // From the operator's call (EdgeTag's round trip included) to the new token in memory.
    let asked = Instant::now();
    service.refresh("acme").await;
    let pushed = next_token(&source, &first, Duration::from_secs(1)).await;
    let took = asked.elapsed();
    eprintln!("the refreshed token reached the source {took:?} after RefreshToken was called");
    assert!(took < Duration::from_secs(1), "{took:?}");
    assert_eq!(secret(&pushed), service.current("acme").await.0);
    assert!(service.fake.access_token_is_valid(&secret(&pushed)));
}

#[tokio::test]
async fn with_the_service_stopped_the_cached_token_is_still_served() {
    let service = Service::spawn().await;
    service.connect("acme").await;
    let source = client(service.addr, &service.clock)
        .build()
        .unwrap()
        .token_source("acme");
    let first = source.token().await.unwrap();
    let clock = service.clock.clone();
    service.stop().await;

    let why = lost(&source).await;
    assert_eq!(why.code(), Code::Unavailable, "{why}");
    clock.advance(30 * MINUTE);
    assert_eq!(source.token().await.unwrap(), first);
}

#[tokio::test]
async fn after_a_restart_on_the_same_address_the_stream_resumes() {
    let service = Service::spawn().await;
    service.connect("acme").await;
    let source = client(service.addr, &service.clock)
        .build()
        .unwrap()
        .token_source("acme");
    let first = source.token().await.unwrap();
    let stopped = service.stop().await;
    lost(&source).await;

    let service = Service::restart(stopped).await;
    // The new stream's first message (the same token) clears the error.
    until(
        Duration::from_secs(10),
        "the stream to resume",
        async || source.last_error().is_none().then_some(()),
    )
    .await;
    assert_eq!(source.token().await.unwrap(), first);
    service.refresh("acme").await;
    let pushed = next_token(&source, &first, Duration::from_secs(1)).await;
    assert_eq!(secret(&pushed), service.current("acme").await.0);
}

#[tokio::test]
async fn near_expiry_with_the_service_gone_it_fails_rather_than_hand_out_the_token() {
    let service = Service::spawn().await;
    service.connect("acme").await;
    let min_validity = 10 * MINUTE;
    let source = client(service.addr, &service.clock)
        .min_validity(min_validity)
        .build()
        .unwrap()
        .token_source("acme");
    let token = source.token().await.unwrap();
    let clock = service.clock.clone();
    service.stop().await;
    lost(&source).await;

    // Until `min_validity` before expiry: the cached token.
    let left = token.expires_at().duration_since(clock.now()).unwrap();
    clock.advance(left - min_validity - Duration::from_secs(5));
    assert_eq!(source.token().await.unwrap(), token);
    // Then an error, however often it is asked; and after expiry too.
    clock.advance(Duration::from_secs(10));
    for _ in 0..3 {
        let error = source.token().await.unwrap_err();
        assert!(matches!(error, Error::Unavailable { .. }), "{error}");
        assert_eq!(error.code(), Code::Unavailable);
    }
    clock.advance(min_validity);
    assert!(clock.now() > token.expires_at());
    source.token().await.unwrap_err();
}

#[tokio::test]
async fn a_removed_account_is_not_found() {
    let service = Service::spawn().await;
    service.connect("acme").await;
    let client = client(service.addr, &service.clock).build().unwrap();
    let source = client.token_source("acme");
    source.token().await.unwrap();

    service.remove("acme").await;
    let error = until(Duration::from_secs(10), "NOT_FOUND", async || {
        source.token().await.err()
    })
    .await;
    assert!(
        matches!(&error, Error::UnknownAccount { account } if account == "acme"),
        "{error}"
    );
    assert_eq!(error.code(), Code::NotFound);

    // Never connected: NOT_FOUND on the first call.
    let error = client.token_source("nobody").token().await.unwrap_err();
    assert!(matches!(error, Error::UnknownAccount { .. }), "{error}");
}

#[tokio::test]
async fn a_rejected_grant_needs_reauthorization() {
    let service = Service::spawn().await;
    service.connect("acme").await;
    let source = client(service.addr, &service.clock)
        .build()
        .unwrap()
        .token_source("acme");
    source.token().await.unwrap();

    service
        .fake
        .push_faults([fake_edgetag::Fault::InvalidGrant]);
    service.clock.advance(112 * MINUTE); // due
    service.broker.refresh_due().await;
    let error = until(Duration::from_secs(10), "FAILED_PRECONDITION", async || {
        source.token().await.err()
    })
    .await;
    assert!(
        matches!(error, Error::NeedsReauthorization { .. }),
        "{error}"
    );
    assert_eq!(error.code(), Code::FailedPrecondition);
}

#[tokio::test]
async fn without_watch_token_it_polls_get_token_ahead_of_expiry() {
    let legacy = Legacy {
        lifetime: Duration::from_secs(3),
        ..Legacy::default()
    };
    let addr = legacy.serve().await;
    let source = Client::builder(format!("http://{addr}"))
        .build()
        .unwrap()
        .token_source("acme");
    let first = source.token().await.unwrap();
    assert_eq!(secret(&first), "t-1");
    assert!(legacy.watch_token_calls.load(Ordering::SeqCst) >= 1);

    let second = next_token(&source, &first, Duration::from_secs(10)).await;
    assert!(
        SystemTime::now() < first.expires_at(),
        "asked only after expiry"
    );
    assert_eq!(secret(&second), "t-2");
    assert_eq!(legacy.get_token_calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn fifty_accounts_share_one_connection() {
    let legacy = Legacy {
        lifetime: Duration::from_secs(3600),
        ..Legacy::default()
    };
    let addr = legacy.serve().await;
    let client = Client::builder(format!("http://{addr}")).build().unwrap();
    let sources: Vec<_> = (0..50)
        .map(|i| client.token_source(format!("account-{i}")))
        .collect();
    for source in &sources {
        source.token().await.unwrap();
    }
    assert_eq!(legacy.get_token_calls.load(Ordering::SeqCst), 50);
    assert_eq!(legacy.connections.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn dropping_the_last_handle_closes_the_stream() {
    let legacy = Legacy {
        watch: true,
        lifetime: Duration::from_secs(3600),
        ..Legacy::default()
    };
    let addr = legacy.serve().await;
    let source = Client::builder(format!("http://{addr}"))
        .build()
        .unwrap()
        .token_source("acme");
    let copy = source.clone();
    source.token().await.unwrap();
    drop(source);
    copy.token().await.unwrap(); // a clone keeps it open
    assert_eq!(legacy.streams_closed.load(Ordering::SeqCst), 0);
    drop(copy);
    until(Duration::from_secs(10), "the stream to close", async || {
        (legacy.streams_closed.load(Ordering::SeqCst) == 1).then_some(())
    })
    .await;
    assert_eq!(legacy.watch_token_calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn the_layer_authorizes_requests_and_sends_none_without_a_token() {
    let legacy = Legacy {
        lifetime: Duration::from_secs(3600),
        ..Legacy::default()
    };
    let addr = legacy.serve().await;
    let client = Client::builder(format!("http://{addr}")).build().unwrap();
    let echo = service_fn(|request: http::Request<()>| async move {
        Ok::<_, std::convert::Infallible>(request.headers().clone())
    });

    let authorized = AuthorizationLayer::new(client.token_source("acme")).layer(echo);
    let headers = authorized
        .clone()
        .oneshot(http::Request::new(()))
        .await
        .unwrap();
    let header = &headers[http::header::AUTHORIZATION];
    assert_eq!(header, "Bearer t-1");
    assert!(header.is_sensitive());
    // This service knows no team: no Team-Id is made up, and one the caller set goes as it is.
    assert!(!headers.contains_key(TEAM_ID_HEADER));
    let mut own = http::Request::new(());
    own.headers_mut()
        .insert(TEAM_ID_HEADER, http::HeaderValue::from_static("t-own"));
    let headers = authorized.clone().oneshot(own).await.unwrap();
    assert_eq!(headers[TEAM_ID_HEADER], "t-own");

    let unknown = AuthorizationLayer::new(client.token_source("nobody")).layer(echo);
    let error = unknown.oneshot(http::Request::new(())).await.unwrap_err();
    let error = error.downcast::<Error>().expect("the source's error");
    assert!(matches!(*error, Error::UnknownAccount { .. }), "{error}");
}
