//! The real `credctl` binary against the real server: the whole operator flow in human and JSON
//! output, and each failure's message and exit code.

#[path = "../../../tests/common/mod.rs"]
#[allow(dead_code, unused_macros, unused_imports)] // credctl's cases use a part of the harness
mod common;

use std::{os::unix::fs::PermissionsExt, process::Output};

use common::TestApp;
use serde_json::Value;
use tokio::process::Command;

const CREDCTL: &str = env!("CARGO_BIN_EXE_credctl");

async fn credctl(server: &str, args: &[&str]) -> Output {
    Command::new(CREDCTL)
        .env_clear()
        .env("CREDCTL_SERVER", server)
        .args(args)
        .output()
        .await
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8(o.stderr.clone()).unwrap()
}

#[track_caller]
fn ok(o: &Output) -> String {
    assert_eq!(o.status.code(), Some(0), "{}", stderr(o));
    stdout(o)
}

#[track_caller]
fn json(o: &Output) -> Value {
    serde_json::from_str(&ok(o)).unwrap()
}

#[tokio::test]
async fn an_operator_connects_inspects_refreshes_and_removes_an_account() {
    let app = TestApp::spawn().await;
    let server = format!("http://{}", app.addr);
    let run = |args: &'static [&'static str]| credctl(&server, args);

    assert!(ok(&run(&["list"]).await).contains("No accounts are connected"));

    let begun = json(&run(&["--json", "begin", "acme"]).await);
    let url = begun["authorize_url"].as_str().unwrap();
    assert!(url.starts_with(&app.fake.authorize_url()), "{url}");
    let human = ok(&run(&["begin", "acme"]).await);
    assert!(
        human.contains(&app.fake.authorize_url()) && human.contains("credctl complete -"),
        "{human}"
    );

    let redirect = app.fake.approve(url).await.unwrap();
    assert_eq!(redirect.state, begun["state"].as_str().unwrap());
    let done = credctl(&server, &["complete", &redirect.code, &redirect.state]).await;
    assert!(ok(&done).starts_with("Connected account acme; its access token expires at 20"));

    // The code can stay out of argv: the redirect URL on standard input.
    let begun = json(&run(&["--json", "begin", "acme"]).await);
    let redirect = app
        .fake
        .approve(begun["authorize_url"].as_str().unwrap())
        .await
        .unwrap();
    let mut child = Command::new(CREDCTL)
        .env_clear()
        .env("CREDCTL_SERVER", &server)
        .args(["complete", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use tokio::io::AsyncWriteExt;
        let mut stdin = child.stdin.take().unwrap();
        stdin
            .write_all(format!("{}\n", redirect.location).as_bytes())
            .await
            .unwrap();
    }
    let piped = child.wait_with_output().await.unwrap();
    assert!(ok(&piped).starts_with("Connected account acme"));

    let plain = run(&["token", "acme"]).await;
    assert_eq!(
        ok(&plain).trim(),
        app.get_token("acme").await.unwrap().access_token,
        "the token alone on stdout"
    );
    assert_eq!(stderr(&plain), "team_id: team-fake\n");
    let token = json(&run(&["--json", "token", "acme", "--min-validity", "30m"]).await);
    assert_eq!(token["token_type"], "Bearer");
    assert_eq!(token["team_id"], fake_edgetag::FAKE_TEAM_ID);
    assert!(
        app.fake
            .access_token_is_valid(token["access_token"].as_str().unwrap())
    );

    let table = ok(&run(&["list"]).await);
    let row = table.lines().nth(1).unwrap();
    assert!(row.starts_with("acme") && row.contains("active"), "{table}");
    assert!(
        table.lines().next().unwrap().contains("TEAM") && row.contains(" team-fake "),
        "{table}"
    );
    let info = json(&run(&["describe", "acme", "--json"]).await);
    assert_eq!(info["status"], "active");
    assert_eq!(info["team_id"], "team-fake");
    assert_eq!(info["teams"][0]["id"], "team-fake");
    assert_eq!(info["last_refresh_outcome"], Value::Null);

    let refreshes = app.fake.stats().refreshes_ok;
    assert!(ok(&run(&["refresh", "acme"]).await).starts_with("Refreshed account acme"));
    assert_eq!(app.fake.stats().refreshes_ok, refreshes + 1);
    let described = ok(&run(&["describe", "acme"]).await);
    assert!(
        described.contains("last refresh outcome  succeeded")
            && described.contains("\nteam                  team-fake\n")
            && described.contains("\nreaches team          team-fake"),
        "{described}"
    );
    let listed = json(&run(&["list", "--json"]).await);
    assert_eq!(listed[0]["account"], "acme");
    assert_eq!(listed[0]["last_refresh_outcome"], "succeeded");

    let removed = ok(&run(&["remove", "acme"]).await);
    assert!(removed.contains("EdgeTag revoked its grant"), "{removed}");
    let again = json(&run(&["--json", "remove", "acme"]).await);
    assert_eq!(again["outcome"], "not_found");

    let gone = run(&["describe", "acme"]).await;
    assert_eq!(gone.status.code(), Some(4));
    let err = stderr(&gone);
    assert!(
        err.starts_with("credctl: NOT_FOUND: account acme is not connected"),
        "{err}"
    );
    assert!(err.contains("hint: "), "{err}");
}

#[tokio::test]
async fn each_failure_has_a_clear_message_and_its_own_exit_code() {
    let app = TestApp::spawn().await;
    let server = format!("http://{}", app.addr);

    let bad = credctl(&server, &["token", "a b"]).await;
    assert_eq!(bad.status.code(), Some(5));
    assert!(stderr(&bad).contains("INVALID_ARGUMENT: invalid account name"));

    let unknown = credctl(&server, &["complete", "code", "no-such-state"]).await;
    assert_eq!(unknown.status.code(), Some(4));

    app.connect("acme").await;
    app.fake.revoke_all_refresh_tokens();
    let reauth = credctl(&server, &["refresh", "acme"]).await;
    assert_eq!(reauth.status.code(), Some(6));
    assert!(
        stderr(&reauth).contains("credctl begin ACCOUNT"),
        "{}",
        stderr(&reauth)
    );

    let unreachable = credctl("http://127.0.0.1:1", &["list"]).await;
    assert_eq!(unreachable.status.code(), Some(3));
    assert!(stderr(&unreachable).contains("cannot reach credential-service at http://127.0.0.1:1"));

    let clear_text = Command::new(CREDCTL)
        .env_clear()
        .env("CREDCTL_TOKEN", "caller-secret-token")
        .args(["--server", "http://credentials.example.com:50051", "list"])
        .output()
        .await
        .unwrap();
    assert_eq!(clear_text.status.code(), Some(2));
    assert!(!stderr(&clear_text).contains("caller-secret-token"));

    let usage = credctl(&server, &["frobnicate"]).await;
    assert_eq!(usage.status.code(), Some(2));
}

#[tokio::test]
async fn begin_open_starts_the_browser_opener_or_says_there_is_none() {
    let app = TestApp::spawn().await;
    let server = format!("http://{}", app.addr);
    let bin = tempfile::tempdir().unwrap();
    let run = |path: &std::path::Path| {
        Command::new(CREDCTL)
            .env_clear()
            .env("PATH", path)
            .args(["--server", &server, "begin", "acme", "--open"])
            .output()
    };

    let none = run(bin.path()).await.unwrap();
    let text = ok(&none);
    assert!(
        text.contains("could not start a browser with xdg-open")
            && text.contains("/oauth/app/login")
    );

    let opened = bin.path().join("opened");
    let opener = bin.path().join("xdg-open");
    std::fs::write(
        &opener,
        format!("#!/bin/sh\nprintf '%s' \"$1\" > '{}'\n", opened.display()),
    )
    .unwrap();
    std::fs::set_permissions(&opener, std::fs::Permissions::from_mode(0o755)).unwrap();
    let text = ok(&run(bin.path()).await.unwrap());
    assert!(text.contains("(opened in your browser)"), "{text}");
    let url = std::fs::read_to_string(&opened).unwrap();
    assert!(url.starts_with(&app.fake.authorize_url()) && text.contains(&url));
}

/// credctl with piped output against the server at `addr`, for commands that stream until stopped.
fn following(addr: std::net::SocketAddr, args: &[&str]) -> tokio::process::Child {
    Command::new(CREDCTL)
        .env_clear()
        .env("CREDCTL_SERVER", format!("http://{addr}"))
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

#[tokio::test]
async fn watch_prints_one_line_per_pushed_token_and_the_token_only_when_asked() {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let app = TestApp::spawn().await;
    app.connect("acme").await;
    let spawn = |args: &[&str]| following(app.addr, args);
    let mut quiet = spawn(&["watch", "acme"]);
    let mut shown = spawn(&["--json", "watch", "--show-token", "acme"]);
    let mut quiet_lines = BufReader::new(quiet.stdout.take().unwrap()).lines();
    let mut shown_lines = BufReader::new(shown.stdout.take().unwrap()).lines();
    let line = async |lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>| {
        tokio::time::timeout(std::time::Duration::from_secs(10), lines.next_line())
            .await
            .expect("a line within 10 s")
            .unwrap()
            .expect("a line, not the end")
    };

    // The current token at once, then the next one when it is published.
    for round in 0..2 {
        if round == 1 {
            app.refresh("acme").await.unwrap();
        }
        let token = app.get_token("acme").await.unwrap();
        let expires = humantime::format_rfc3339_seconds(
            std::time::SystemTime::try_from(token.expires_at.unwrap()).unwrap(),
        )
        .to_string();
        let quiet_line = line(&mut quiet_lines).await;
        assert_eq!(
            quiet_line,
            format!("expires_at={expires} team_id=team-fake")
        );
        assert!(!quiet_line.contains(&token.access_token));
        let shown: Value = serde_json::from_str(&line(&mut shown_lines).await).unwrap();
        assert_eq!(shown["access_token"], token.access_token.as_str());
        assert_eq!(shown["expires_at"], expires.as_str());
    }

    // Removal ends the stream: the command says why and exits as for an unknown account.
    app.remove("acme", false).await.unwrap();
    let ended = quiet.wait_with_output().await.unwrap();
    assert_eq!(ended.status.code(), Some(credctl::exit::NOT_FOUND as i32));
    assert!(stderr(&ended).contains("acme"), "{}", stderr(&ended));
}

#[tokio::test]
async fn events_prints_one_line_per_account_event_and_json_lines_with_json() {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let app = TestApp::spawn().await;
    app.connect("acme").await;
    let spawn = |args: &[&str]| following(app.addr, args);
    let mut human = spawn(&["events"]);
    let mut json = spawn(&["--json", "events"]);
    let mut human_lines = BufReader::new(human.stdout.take().unwrap()).lines();
    let mut json_lines = BufReader::new(json.stdout.take().unwrap()).lines();
    let line = async |lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>| {
        tokio::time::timeout(std::time::Duration::from_secs(10), lines.next_line())
            .await
            .expect("a line within 10 s")
            .unwrap()
            .expect("a line, not the end")
    };
    let expires = |info: credential_service::proto::AccountInfo| {
        humantime::format_rfc3339_seconds(
            std::time::SystemTime::try_from(info.access_token_expires_at.unwrap()).unwrap(),
        )
        .to_string()
    };

    let first = expires(app.describe("acme").await.unwrap());
    assert_eq!(
        line(&mut human_lines).await,
        format!("snapshot acme status=active expires={first} team=team-fake")
    );
    let snapshot: Value = serde_json::from_str(&line(&mut json_lines).await).unwrap();
    assert_eq!(snapshot["event"], "snapshot");
    assert_eq!(snapshot["info"]["access_token_expires_at"], first.as_str());
    assert_eq!(snapshot["info"]["team_id"], "team-fake");

    // A failing refresh comes with the code callers will get; the token never appears.
    app.fake
        .set_persistent_fault(Some(fake_edgetag::Fault::ServiceUnavailable));
    assert!(app.refresh("acme").await.is_err());
    let failing = line(&mut human_lines).await;
    assert!(
        failing.starts_with("refresh_failing acme status=refreshing_failed")
            && failing.contains("failure=UNAVAILABLE: ")
            && failing.contains("503"),
        "{failing}"
    );
    let failing: Value = serde_json::from_str(&line(&mut json_lines).await).unwrap();
    assert_eq!(failing["event"], "refresh_failing");
    assert_eq!(failing["failure"]["code"], "UNAVAILABLE");
    app.fake.set_persistent_fault(None);
    app.refresh("acme").await.unwrap();
    let token = app.get_token("acme").await.unwrap().access_token;
    let recovered = line(&mut human_lines).await;
    assert!(
        recovered.starts_with("recovered acme status=active"),
        "{recovered}"
    );
    let recovered_json = line(&mut json_lines).await;
    assert!(!recovered.contains(&token) && !recovered_json.contains(&token));
    let recovered: Value = serde_json::from_str(&recovered_json).unwrap();
    assert_eq!(
        (&recovered["event"], &recovered["failure"]),
        (&"recovered".into(), &Value::Null)
    );

    app.remove("acme", true).await.unwrap();
    assert_eq!(line(&mut human_lines).await, "removed acme");
    let removed: Value = serde_json::from_str(&line(&mut json_lines).await).unwrap();
    assert_eq!(
        (&removed["event"], &removed["info"]),
        (&"removed".into(), &Value::Null)
    );
}
