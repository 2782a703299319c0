//! When the service will not keep a WatchToken stream for the source (every place taken, or
//! streams failing while calls get through), the source polls GetToken instead, and goes back to
//! watching once a stream is possible again.

mod common;

use std::{sync::atomic::Ordering, time::Duration};

use common::{Legacy, secret, until};
use credential_client::{Client, Code, TokenSource};

/// A source of `acme` at `legacy` that tries watching again about every `again` while it polls.
async fn source(legacy: &Legacy, again: Duration) -> TokenSource {
    let addr = legacy.serve().await;
    Client::builder(format!("http://{addr}"))
        .reconnect_backoff(Duration::from_millis(10), Duration::from_millis(50))
        .polling_fallback(3, again)
        .build()
        .unwrap()
        .token_source("acme")
}

fn refuse_watch(legacy: &Legacy, code: Option<Code>) {
    *legacy.refuse_watch.lock().unwrap() = code;
}

#[tokio::test]
async fn with_no_place_for_a_stream_it_polls_at_once_and_watches_again_when_one_frees() {
    let legacy = Legacy {
        watch: true,
        lifetime: Duration::from_secs(3600),
        ..Legacy::default()
    };
    refuse_watch(&legacy, Some(Code::ResourceExhausted));
    let source = source(&legacy, Duration::from_millis(500)).await;
    let polled = tokio::time::timeout(Duration::from_secs(5), source.token())
        .await
        .expect("a token without waiting for a stream")
        .unwrap();
    assert_eq!(secret(&polled), "t-1", "from GetToken");
    assert_eq!(legacy.watch_token_calls.load(Ordering::SeqCst), 1);
    assert!(source.last_error().is_none(), "polling is not a failure");

    // Still full: it keeps trying to watch, without asking GetToken again before the token is due.
    until(Duration::from_secs(5), "a few more tries", async || {
        (legacy.watch_token_calls.load(Ordering::SeqCst) >= 3).then_some(())
    })
    .await;
    assert_eq!(legacy.get_token_calls.load(Ordering::SeqCst), 1);

    // A place frees: the next try opens a stream, whose token replaces the polled one.
    refuse_watch(&legacy, None);
    let watched = until(Duration::from_secs(5), "the stream's token", async || {
        let token = source.token().await.unwrap();
        (token != polled).then_some(token)
    })
    .await;
    let calls = legacy.watch_token_calls.load(Ordering::SeqCst);
    assert_eq!(secret(&watched), format!("t-{calls}"), "the stream's token");
    assert_eq!(
        legacy.streams_closed.load(Ordering::SeqCst),
        0,
        "still open"
    );
    assert_eq!(legacy.get_token_calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn past_its_unavailable_attempts_it_polls_and_watches_again_when_streams_work() {
    let legacy = Legacy {
        watch: true,
        lifetime: Duration::from_secs(3600),
        ..Legacy::default()
    };
    refuse_watch(&legacy, Some(Code::Unavailable));
    let source = source(&legacy, Duration::from_millis(100)).await;
    // The first attempts fail, and the source says so, until it polls.
    let polled = until(Duration::from_secs(5), "a polled token", async || {
        source.token().await.ok()
    })
    .await;
    assert_eq!(secret(&polled), "t-1", "from GetToken");
    assert!(legacy.watch_token_calls.load(Ordering::SeqCst) >= 3);

    refuse_watch(&legacy, None);
    let watched = until(Duration::from_secs(5), "the stream's token", async || {
        let token = source.token().await.unwrap();
        (token != polled).then_some(token)
    })
    .await;
    assert!(secret(&watched).starts_with("t-"), "{watched:?}");
    assert_eq!(
        legacy.streams_closed.load(Ordering::SeqCst),
        0,
        "still open"
    );
    assert_eq!(legacy.get_token_calls.load(Ordering::SeqCst), 1);
}
