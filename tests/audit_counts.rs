//! The aggregated audit trail at the default level (INFO), driven over real connections: every
//! token read is counted exactly, every call that reaches the server leaves an event (also those
//! tonic refuses before the handler), refusals carry the peer, and floods of refusals (gRPC or the
//! browser callback) write a handful of lines whose counts add up to the requests sent.

#[path = "logs/capture.rs"]
mod capture;
#[allow(dead_code, unused_macros, unused_imports)] // this suite uses a part of the harness
mod common;

use std::time::Duration;

use capture::LogCapture;
use common::{Options, TestApp};
use credential_service::{auth::Callers, proto::GetTokenRequest};
use futures::StreamExt;
use sha2::{Digest, Sha256};

/// One INFO capture for this test binary (the production default level).
fn capture() -> &'static LogCapture {
    LogCapture::install(tracing::Level::INFO)
}

/// A server whose callers file names `ops` (admin) and `reader` (reader of `acme*`), each with
/// the given tokens; the harness's own client is `ops`.
async fn spawn(ops: &str, reader: &str, callback: bool) -> (TestApp, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("callers.toml");
    let hash = |t: &str| hex::encode(Sha256::digest(t));
    std::fs::write(
        &path,
        format!(
            "[[caller]]\nname = \"{ops}\"\ntoken_sha256 = \"{}\"\nrole = \"admin\"\naccounts = [\"*\"]\n\
             [[caller]]\nname = \"{reader}\"\ntoken_sha256 = \"{}\"\nrole = \"reader\"\naccounts = [\"acme*\"]\n",
            hash(ops),
            hash(reader)
        ),
    )
    .unwrap();
    let app = TestApp::spawn_with(Options {
        callers: Callers::load(&path).unwrap(),
        token: Some(ops.into()),
        callback,
        ..Default::default()
    })
    .await;
    (app, dir)
}

fn client(app: &TestApp, token: Option<&str>) -> common::Client {
    app.client_with_token(token)
}

/// The audit lines (aggregated or not) that contain every needle.
fn audit_lines(needles: &[&str]) -> Vec<String> {
    capture()
        .text()
        .lines()
        .filter(|l| l.contains(" audit: ") && needles.iter().all(|n| l.contains(n)))
        .map(str::to_owned)
        .collect()
}

/// The sum of the `count` fields of aggregated lines (a one-off `call` line counts 1).
fn total(lines: &[String]) -> u64 {
    lines
        .iter()
        .map(|l| match l.split_once(" count=") {
            Some((_, rest)) => rest
                .split(' ')
                .next()
                .unwrap()
                .parse::<u64>()
                .expect("count is a number"),
            None => 1,
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n_token_reads_add_up_to_n_after_shutdown() {
    capture();
    let (ops, reader) = ("ops-count-4f1e", "reader-count-91ab");
    let (app, _dir) = spawn(ops, reader, false).await;
    app.connect("acme").await;
    app.connect("acme-2").await;
    let reader_client = client(&app, Some(reader));
    const N: usize = 3000;
    let results: Vec<_> = futures::stream::iter(0..N)
        .map(|i| {
            let mut c = reader_client.clone();
            let account = if i % 3 == 0 { "acme-2" } else { "acme" };
            async move {
                c.get_token(GetTokenRequest {
                    account: account.into(),
                    min_validity: None,
                })
                .await
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    assert!(results.iter().all(Result::is_ok));
    let caller = format!("caller=\"{reader}\"");
    let before = audit_lines(&[&caller, "method=\"GetToken\""]);
    assert!(
        before.len() < 10,
        "reads are aggregated, not one line each: {}",
        before.len()
    );
    app.stop().await;

    let lines = audit_lines(&[&caller, "method=\"GetToken\"", "outcome=\"OK\""]);
    assert_eq!(total(&lines), N as u64, "{lines:#?}");
    let per_account = |a: &str| {
        total(
            &lines
                .iter()
                .filter(|l| l.contains(&format!("account=\"{a}\"")))
                .cloned()
                .collect::<Vec<_>>(),
        )
    };
    assert_eq!(per_account("acme-2"), N.div_ceil(3) as u64);
    assert!(
        lines
            .iter()
            .all(|l| l.contains(" calls ") && l.contains(" first=") && l.contains(" last=")),
        "{lines:#?}"
    );
}

/// A raw gRPC call over HTTP/2: what a hostile client can send that tonic refuses before any
/// handler runs. Returns (grpc-status, grpc-message).
async fn raw_call(app: &TestApp, path: &str, token: Option<&str>, body: Vec<u8>) -> (i32, String) {
    let http = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let mut request = http
        .post(format!("http://{}{path}", app.addr))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(body);
    if let Some(t) = token {
        request = request.bearer_auth(t);
    }
    let response = request.send().await.unwrap();
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
    };
    let status = header("grpc-status").expect("a trailers-only refusal");
    let message = header("grpc-message").unwrap_or_default();
    (status.parse().unwrap(), message)
}

fn frame(compressed: bool, message: &[u8]) -> Vec<u8> {
    let mut out = vec![u8::from(compressed)];
    out.extend_from_slice(&(message.len() as u32).to_be_bytes());
    out.extend_from_slice(message);
    out
}

#[tokio::test]
async fn calls_refused_before_the_handler_are_audited_with_caller_or_peer() {
    capture();
    let (ops, reader) = ("ops-raw-77c2", "reader-raw-0d3a");
    let (app, _dir) = spawn(ops, reader, false).await;
    let get_token = "/credential.v1.CredentialService/GetToken";

    let undecodable = raw_call(&app, get_token, Some(reader), frame(false, &[0xff; 3])).await;
    assert_eq!(undecodable.0, tonic::Code::Internal as i32);
    let missing = raw_call(&app, get_token, Some(reader), Vec::new()).await;
    assert_ne!(missing.0, 0);
    let compressed = raw_call(&app, get_token, Some(reader), frame(true, b"abc")).await;
    assert_ne!(compressed.0, 0);
    // A raw method path is neither logged nor echoed.
    let odd = raw_call(&app, "/x/RemoveAccount", Some(ops), frame(false, b"")).await;
    assert_eq!(odd.0, tonic::Code::Unimplemented as i32);
    let denied = raw_call(&app, "/x/RemoveAccount", Some(reader), frame(false, b"")).await;
    assert_eq!(denied.0, tonic::Code::PermissionDenied as i32);
    assert!(!denied.1.contains("RemoveAccount"), "{}", denied.1);
    let anonymous = raw_call(&app, "/x/RemoveAccount", None, frame(false, b"")).await;
    assert_eq!(anonymous.0, tonic::Code::Unauthenticated as i32);
    app.stop().await;

    let reader_calls = audit_lines(&[&format!("caller=\"{reader}\"")]);
    for (code, what) in [
        (undecodable.0, "undecodable"),
        (missing.0, "missing"),
        (compressed.0, "compressed"),
    ] {
        let outcome = format!(
            "outcome=\"{}\"",
            credential_client::code_name(tonic::Code::from_i32(code))
        );
        assert!(
            reader_calls
                .iter()
                .any(|l| l.contains("method=\"GetToken\"") && l.contains(&outcome)),
            "{what}: {reader_calls:#?}"
        );
    }
    assert_eq!(
        total(&audit_lines(&[
            &format!("caller=\"{reader}\""),
            "method=\"GetToken\""
        ])),
        3,
        "one event each"
    );
    assert_eq!(
        total(&audit_lines(&[
            &format!("caller=\"{ops}\""),
            "method=\"unknown\"",
            "outcome=\"UNIMPLEMENTED\""
        ])),
        1
    );
    assert_eq!(
        total(&audit_lines(&[
            &format!("caller=\"{reader}\""),
            "method=\"unknown\"",
            "outcome=\"PERMISSION_DENIED\"",
            "peer=127.0.0.1"
        ])),
        1
    );
    assert!(
        !capture().text().contains("RemoveAccount"),
        "the raw path is never logged"
    );
    assert_eq!(
        total(&audit_lines(&[
            "caller=\"\"",
            "method=\"unknown\"",
            "outcome=\"UNAUTHENTICATED\"",
            "peer=127.0.0.1"
        ])),
        1
    );
}

/// A call the client gives up on (RST_STREAM) while its handler waits still leaves its event,
/// with its caller and CANCELLED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_the_client_cancels_are_audited() {
    capture();
    let (ops, reader) = ("ops-cancel-2b7e", "reader-cancel-e40f");
    let (app, _dir) = spawn(ops, reader, false).await;
    app.connect("acme").await;
    // acme's token has expired and EdgeTag is slow: GetToken waits in its handler for the refresh.
    app.clock.advance(Duration::from_secs(3 * 3600));
    app.fake.set_token_delay(Duration::from_millis(300));
    let mut reader_client = client(&app, Some(reader));
    let call = tokio::spawn(async move {
        reader_client
            .get_token(GetTokenRequest {
                account: "acme".into(),
                min_validity: None,
            })
            .await
    });
    app.until_token_request_in_flight().await;
    call.abort(); // the client drops the call: h2 resets the stream
    assert!(call.await.unwrap_err().is_cancelled());
    // The server has dropped the call once the metrics count it.
    let cancelled = |text: &str| {
        text.lines().any(|l| {
            l.starts_with("credential_rpc_duration_seconds_count")
                && l.contains("method=\"GetToken\"")
                && l.contains("code=\"CANCELLED\"")
        })
    };
    let recorded = async {
        while !cancelled(&credential_service::metrics::encode(&Default::default())) {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), recorded)
        .await
        .expect("the server records the cancelled call");
    app.stop().await;

    let lines = audit_lines(&[
        &format!("caller=\"{reader}\""),
        "method=\"GetToken\"",
        "outcome=\"CANCELLED\"",
    ]);
    assert_eq!(total(&lines), 1, "{lines:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floods_of_refusals_write_a_few_lines_with_exact_counts() {
    capture();
    let (ops, reader) = ("ops-flood-5a0b", "reader-flood-c3d9");
    let (app, _dir) = spawn(ops, reader, true).await;
    let lines_before = capture().text().lines().count();
    let started = std::time::Instant::now();

    // gRPC: a token guesser.
    const GRPC: usize = 5000;
    let guesser = client(&app, Some("guessed-token-000000"));
    let refused = futures::stream::iter(0..GRPC)
        .map(|_| {
            let mut c = guesser.clone();
            async move {
                c.get_token(GetTokenRequest {
                    account: "acme".into(),
                    min_validity: None,
                })
                .await
            }
        })
        .buffer_unordered(64)
        .filter(|r| {
            std::future::ready(
                r.as_ref()
                    .is_err_and(|s| s.code() == tonic::Code::Unauthenticated),
            )
        })
        .count()
        .await;
    assert_eq!(refused, GRPC);

    // The browser callback: garbage states, missing parameters, provider errors.
    const CALLBACK: usize = 20_000;
    let callback = app.callback_url.clone().unwrap();
    let http = reqwest::Client::new();
    let statuses = futures::stream::iter(0..CALLBACK)
        .map(|i| {
            let url = match i % 3 {
                0 => format!("{callback}?code=garbage&state=state-{i}"),
                1 => callback.clone(),
                _ => format!("{callback}?error=access_denied&state=s"),
            };
            let http = http.clone();
            async move { http.get(url).send().await.unwrap().status() }
        })
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await;
    assert!(statuses.iter().all(|s| s.is_client_error()));
    let during = capture().text().lines().count() - lines_before;
    assert!(
        during < 1000,
        "{} requests wrote {during} lines",
        GRPC + CALLBACK
    );
    app.stop().await;

    let grpc = audit_lines(&[
        "caller=\"\"",
        "method=\"GetToken\"",
        "outcome=\"UNAUTHENTICATED\"",
        "peer=127.0.0.1",
    ]);
    // Other tests in this binary may refuse unauthenticated calls too, but none with GetToken.
    assert_eq!(total(&grpc), GRPC as u64, "{grpc:#?}");
    let browser = audit_lines(&[
        "caller=\"browser-callback\"",
        "method=\"CompleteAuth\"",
        "peer=127.0.0.1",
    ]);
    assert_eq!(total(&browser), CALLBACK as u64, "{browser:#?}");
    // One line per outcome and flush: the periodic ones (every 10 s) and the stops of the
    // other tests in this binary.
    let flushes = started.elapsed().as_secs() as usize / 10 + 4;
    assert!(browser.len() <= 3 * flushes, "{browser:#?}");
    let after = capture().text().lines().count() - lines_before;
    assert!(after < 50 + 6 * flushes, "{after} lines in all");
}
