//! No secret reaches the logs: capture everything at TRACE level (every crate, ours and the HTTP
//! stacks) over the full flow, a refresh, rotation and the error paths, then search for secrets.

use crate::common;

use std::time::Duration;

use base64::{Engine, engine::general_purpose::STANDARD};
use common::TestApp;
use fake_edgetag::Fault;

#[tokio::test]
async fn no_secret_appears_in_trace_logs() {
    let capture = crate::capture::LogCapture::install(tracing::Level::TRACE);

    let app = TestApp::spawn_with(common::Options {
        request_timeout: Duration::from_millis(300),
        ..Default::default()
    })
    .await;
    let mut secrets = vec![
        app.fake.config().client_secret.clone(),
        STANDARD.encode(format!(
            "{}:{}",
            app.fake.config().client_id,
            app.fake.config().client_secret
        )),
    ];

    let (code, state) = app.authorize("acme").await;
    app.fake
        .push_faults([Fault::ServiceUnavailable, Fault::HtmlPage]);
    assert!(app.complete(&code, &state).await.is_err());
    assert!(app.complete(&code, &state).await.is_err());
    app.complete(&code, &state).await.unwrap();
    assert!(app.complete(&code, &state).await.is_err());
    secrets.push(code);
    secrets.push(state);

    let first = app.get_token("acme").await.unwrap().access_token;
    app.clock.advance(Duration::from_secs(7200));
    let second = app.get_token("acme").await.unwrap().access_token;
    secrets.extend([first, second]);
    secrets.extend(app.fake.issued_refresh_tokens());
    secrets.extend(app.fake.received_code_verifiers());
    app.fake.revoke_all_refresh_tokens();
    app.clock.advance(Duration::from_secs(7200));
    assert!(app.get_token("acme").await.is_err());
    drop(app);

    // The browser path: EdgeTag's redirect lands on the callback page, which completes the flow.
    let app = TestApp::spawn_with(common::Options {
        callback: true,
        ..Default::default()
    })
    .await;
    let key_file = app.options.encryption.key_file.clone().unwrap();
    secrets.push(std::fs::read_to_string(key_file).unwrap().trim().to_owned());
    let begun = app.begin("browser").await.unwrap();
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let approved = http.get(&begun.authorize_url).send().await.unwrap();
    let location = approved.headers()["location"].to_str().unwrap().to_owned();
    let page = http
        .get(&location)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("Connected account browser"), "{page}");
    let query: std::collections::HashMap<_, _> = url::Url::parse(&location)
        .unwrap()
        .query_pairs()
        .into_owned()
        .collect();
    secrets.push(query["code"].clone());
    secrets.push(begun.state.clone());
    secrets.push(app.get_token("browser").await.unwrap().access_token);
    secrets.extend(app.fake.issued_refresh_tokens());
    secrets.extend(app.fake.received_code_verifiers());
    drop(app);

    let logs = capture.text();
    assert!(
        logs.contains("CompleteAuth") && logs.contains("acme"),
        "the capture saw the flow"
    );
    assert!(
        logs.contains(
            r#"caller="browser-callback" method="CompleteAuth" account="browser" outcome="OK""#
        ),
        "the browser callback's completion is audited"
    );
    assert!(secrets.len() >= 14);
    for secret in &secrets {
        assert!(!secret.is_empty());
        assert!(
            !logs.contains(secret.as_str()),
            "a secret leaked into the logs: {}...",
            &secret[..4]
        );
    }
}
