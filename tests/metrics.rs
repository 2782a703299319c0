//! `/metrics` after real traffic: RPCs by method and code, upstream requests and refreshes,
//! accounts by status, single-flight waiters. One test in its own binary, because the series are
//! process-wide.

mod common;

use std::time::Duration;

use common::{Options, TestApp};
use fake_edgetag::Fault;

/// The value of the series whose line starts with `series ` exactly (name and labels).
#[track_caller]
fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no series {series} in\n{text}"))
        .parse()
        .unwrap()
}

#[tokio::test]
async fn metrics_count_calls_upstream_requests_refreshes_and_accounts() {
    let app = TestApp::spawn_with(Options {
        metrics: true,
        ..Options::default()
    })
    .await;
    app.connect("acme").await;
    app.connect("bad").await;
    for _ in 0..3 {
        app.get_token("acme").await.unwrap();
    }
    assert!(app.get_token("nobody").await.is_err());
    app.clock.advance(Duration::from_secs(7000));
    app.get_token("acme").await.unwrap(); // refreshes
    app.fake.push_faults([Fault::InvalidGrant]);
    assert!(app.get_token("bad").await.is_err()); // refresh rejected: needs re-authorization

    let text = app.metrics().await;
    let rpc = |method: &str, code: &str| {
        value(
            &text,
            &format!(
                "credential_rpc_duration_seconds_count{{service=\"credential.v1.CredentialService\",method=\"{method}\",code=\"{code}\"}}"
            ),
        )
    };
    assert_eq!(rpc("GetToken", "OK"), 4.0);
    assert_eq!(rpc("GetToken", "NOT_FOUND"), 1.0);
    assert_eq!(rpc("GetToken", "FAILED_PRECONDITION"), 1.0);
    assert_eq!(rpc("BeginAuth", "OK"), 2.0);
    assert_eq!(rpc("CompleteAuth", "OK"), 2.0);
    assert!(text.contains("# TYPE credential_rpc_duration_seconds histogram"));

    let upstream = |operation: &str, status: &str| {
        value(
            &text,
            &format!(
                "credential_upstream_request_duration_seconds_count{{operation=\"{operation}\",status=\"{status}\"}}"
            ),
        )
    };
    assert_eq!(upstream("exchange_code", "200"), 2.0);
    assert_eq!(upstream("refresh", "200"), 1.0);
    assert_eq!(upstream("refresh", "400"), 1.0);
    assert_eq!(
        value(&text, "credential_refreshes_total{outcome=\"succeeded\"}"),
        1.0
    );
    assert_eq!(
        value(&text, "credential_refreshes_total{outcome=\"rejected\"}"),
        1.0
    );
    assert_eq!(value(&text, "credential_accounts{status=\"active\"}"), 1.0);
    assert_eq!(
        value(&text, "credential_accounts{status=\"needs_reauth\"}"),
        1.0
    );
    assert_eq!(
        value(&text, "credential_accounts{status=\"refreshing_failed\"}"),
        0.0
    );
    assert_eq!(value(&text, "credential_single_flight_waiters"), 0.0);

    // Waiters show while a slow refresh is in flight.
    app.fake.set_token_delay(Duration::from_millis(500));
    app.clock.advance(Duration::from_secs(7000));
    let waiting: Vec<_> = (0..5)
        .map(|_| {
            let mut client = app.client.clone();
            tokio::spawn(async move {
                client
                    .get_token(credential_service::proto::GetTokenRequest {
                        account: "acme".into(),
                        min_validity: None,
                    })
                    .await
            })
        })
        .collect();
    // Scrape until all five callers have joined the one refresh (it takes 500 ms at the fake).
    let all_waiting = async {
        while value(&app.metrics().await, "credential_single_flight_waiters") < 5.0 {
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), all_waiting)
        .await
        .expect("five waiters show");
    assert_eq!(
        app.fake.token_requests_in_flight(),
        1,
        "one refresh for all"
    );
    for w in waiting {
        w.await.unwrap().unwrap();
    }
    let after = app.metrics().await;
    assert_eq!(value(&after, "credential_single_flight_waiters"), 0.0);
    assert_eq!(
        value(&after, "credential_refreshes_total{outcome=\"succeeded\"}"),
        2.0
    );

    credential_service::metrics::record_refresh_lag(Duration::from_millis(1500));
    assert_eq!(
        value(&app.metrics().await, "credential_refresh_lag_seconds"),
        1.5
    );
}
