//! The browser callback: EdgeTag's redirect lands on the service, which completes the flow and
//! says so in a small page. Driven over real HTTP and, once, by headless Chromium.

use crate::common;

use std::{path::Path, process::Stdio, time::Duration};

use common::{Options, TestApp};
use fake_edgetag::Fault;
use reqwest::{StatusCode, header};
use tokio::{io::AsyncWriteExt, net::TcpStream};

async fn spawn() -> TestApp {
    TestApp::spawn_with(Options {
        callback: true,
        ..Options::default()
    })
    .await
}

/// Follows redirects like a browser: the fake's 302 leads to the callback.
async fn visit(url: &str) -> (StatusCode, header::HeaderMap, String) {
    let response = reqwest::get(url).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    (status, headers, response.text().await.unwrap())
}

#[tokio::test]
async fn approving_in_the_browser_connects_the_account() {
    let app = spawn().await;
    let begun = app.begin("acme").await.unwrap();
    assert!(
        begun
            .authorize_url
            .contains(&url_encoded(app.callback_url.as_ref().unwrap())),
        "the callback is the redirect URI"
    );

    let (status, headers, page) = visit(&begun.authorize_url).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert!(
        page.contains("<h1 class=\"ok\">Connected account acme</h1>"),
        "{page}"
    );
    assert_eq!(headers[header::CACHE_CONTROL], "no-store");
    assert_eq!(headers[header::REFERRER_POLICY], "no-referrer");
    assert!(
        headers[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let token = app.get_token("acme").await.unwrap().access_token;
    assert!(app.fake.access_token_is_valid(&token));
    assert!(!page.contains(&token));

    // Reloading the callback (same code and state) does not connect twice, and says why.
    let (status, _, page) = visit(&begun.authorize_url).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(page.contains("expired or was already used"), "{page}");
}

#[tokio::test]
async fn edgetag_errors_are_shown_escaped_and_nothing_is_connected() {
    let app = spawn().await;
    let callback = app.callback_url.clone().unwrap();
    let long = "d".repeat(1000);
    let url = format!(
        "{callback}?error=access_denied&error_description=%3Cscript%3Ealert(1)%3C%2Fscript%3E{long}&state=x"
    );
    let (status, _, page) = visit(&url).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        page.contains("Access was not granted") && page.contains("EdgeTag answered: access_denied")
    );
    assert!(
        page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
        "{page}"
    );
    assert!(!page.contains("<script>"));
    assert!(
        !page.contains(&"d".repeat(400)),
        "the description is capped"
    );
    assert!(page.contains("credctl begin ACCOUNT"));

    let (status, _, page) = visit(&callback).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(page.contains("This address is incomplete"), "{page}");
    let (status, _, page) = visit(&format!("{callback}?code=c&state=unknown")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(page.contains("expired or was already used"), "{page}");
}

#[tokio::test]
async fn edgetag_down_asks_for_a_reload_which_then_works() {
    let app = spawn().await;
    let begun = app.begin("acme").await.unwrap();
    let redirect = app.fake.approve(&begun.authorize_url).await.unwrap();

    app.fake.push_faults([Fault::ServiceUnavailable]);
    let (status, _, page) = visit(&redirect.location).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        page.contains("EdgeTag could not be reached") && page.contains("reload"),
        "{page}"
    );

    let (status, _, page) = visit(&redirect.location).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert!(page.contains("Connected account acme"));
    app.get_token("acme").await.unwrap();
}

fn url_encoded(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

const CHROMIUM: &str = "/usr/bin/chromium";

#[tokio::test]
async fn headless_chromium_goes_from_the_authorize_url_to_a_connected_account() {
    assert!(
        Path::new(CHROMIUM).exists(),
        "this test drives a real browser: install Chromium with \
         `apt-get update && apt-get install -y chromium` (.ci/run does)"
    );
    let app = spawn().await;
    let begun = app.begin("acme").await.unwrap();
    let profile = tempfile::tempdir().unwrap();

    let browser = tokio::process::Command::new(CHROMIUM)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-quic",
            "--disable-dev-shm-usage",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("--dump-dom")
        .arg(&begun.authorize_url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(90), browser)
        .await
        .expect("Chromium finishes within 90 s")
        .unwrap();
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(
        dom.contains("Connected account acme"),
        "Chromium ended with {:?}; DOM:\n{dom}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(dom.contains("You can close this window."));
    let token = app.get_token("acme").await.unwrap();
    assert!(app.fake.access_token_is_valid(&token.access_token));
}

/// Issue 10, finding 6: someone who learnt the state sends a garbage code first; the person who
/// then approves still connects the account.
#[tokio::test]
async fn a_garbage_code_does_not_cancel_the_pending_authorization() {
    let app = spawn().await;
    let begun = app.begin("acme").await.unwrap();
    let callback = app.callback_url.clone().unwrap();
    let state = url_encoded(&begun.state);
    for _ in 0..3 {
        let (status, _, page) = visit(&format!("{callback}?code=garbage&state={state}")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(
            page.contains("EdgeTag rejected the authorization"),
            "{page}"
        );
    }
    let (status, _, page) = visit(&begun.authorize_url).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert!(page.contains("Connected account acme"), "{page}");
    let (status, _, page) = visit(&format!("{callback}?code=garbage&state={state}")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(page.contains("expired or was already used"), "{page}");
}

/// Sends `GET url` on a raw connection and hangs up once EdgeTag has the service's token request
/// in hand: what a closed tab does, or a stranger who wants the exchange dropped halfway.
async fn hang_up_during_the_exchange(app: &TestApp, url: &str) {
    let url = reqwest::Url::parse(url).unwrap();
    let mut socket = TcpStream::connect((url.host_str().unwrap(), url.port().unwrap()))
        .await
        .unwrap();
    let request = format!(
        "GET {}?{} HTTP/1.1\r\nHost: {}\r\n\r\n",
        url.path(),
        url.query().unwrap_or(""),
        url.authority()
    );
    socket.write_all(request.as_bytes()).await.unwrap();
    app.until_token_request_in_flight().await;
    drop(socket);
}

/// Visits `url` until the page says the account is connected, as a person reloading would; fails
/// after a few seconds.
async fn reload_until_connected(url: &str) -> String {
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let (status, _, page) = visit(url).await;
            if status == StatusCode::OK {
                return page;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the account is connected within 5 s")
}

/// Issue 10, finding 6, by hanging up: a stranger who learnt the state sends a garbage code and
/// closes the connection while EdgeTag is still answering. The exchange still ends, the state is
/// put back, and the person's own redirect then connects the account.
#[tokio::test]
async fn hanging_up_during_a_garbage_exchange_does_not_cancel_the_pending_authorization() {
    let app = spawn().await;
    let begun = app.begin("acme").await.unwrap();
    let callback = app.callback_url.clone().unwrap();
    let state = url_encoded(&begun.state);
    app.fake
        .push_faults([Fault::Delay(Duration::from_millis(300))]);
    hang_up_during_the_exchange(&app, &format!("{callback}?code=garbage&state={state}")).await;

    let redirect = app.fake.approve(&begun.authorize_url).await.unwrap();
    let page = reload_until_connected(&redirect.location).await;
    assert!(page.contains("Connected account acme"), "{page}");
    assert!(
        app.fake
            .access_token_is_valid(&app.get_token("acme").await.unwrap().access_token)
    );
}

/// A person who closes the tab while the real code is being exchanged still gets the account
/// connected: EdgeTag has used the single-use code up, so the token set it issued must be stored.
#[tokio::test]
async fn closing_the_tab_during_the_exchange_still_connects_the_account() {
    let app = spawn().await;
    let begun = app.begin("acme").await.unwrap();
    let redirect = app.fake.approve(&begun.authorize_url).await.unwrap();
    app.fake
        .push_faults([Fault::Delay(Duration::from_millis(300))]);
    hang_up_during_the_exchange(&app, &redirect.location).await;

    let token = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Ok(token) = app.get_token("acme").await {
                return token;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the account is connected within 5 s");
    assert!(app.fake.access_token_is_valid(&token.access_token));
    assert_eq!(
        app.fake.stats().token_requests,
        1,
        "one exchange, not a retry"
    );
}

/// Issue 10, finding 8: bidi overrides and other invisible format characters in EdgeTag's error
/// text cannot reorder what the page says.
#[tokio::test]
async fn bidi_overrides_in_provider_text_are_stripped() {
    let app = spawn().await;
    let callback = app.callback_url.clone().unwrap();
    let sneaky = "access\u{202E}deined\u{2066}\u{200B}";
    let url = format!(
        "{callback}?error={}&error_description={}&state=x",
        url_encoded(sneaky),
        url_encoded("Click \u{202E}moc.elgoog\u{202C} to fix \u{FEFF}\u{E0041}it")
    );
    let (status, _, page) = visit(&url).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    for c in [
        '\u{202E}',
        '\u{202C}',
        '\u{2066}',
        '\u{200B}',
        '\u{FEFF}',
        '\u{E0041}',
    ] {
        assert!(!page.contains(c), "U+{:04X} reached the page", c as u32);
    }
    assert!(page.contains("EdgeTag answered: accessdeined"), "{page}");
    assert!(page.contains("Click moc.elgoog to fix it"), "{page}");
}
