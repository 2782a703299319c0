//! `credctl import` end to end: valid grants refreshed (or kept with their access token), each
//! bad line reported, every import audited, and no token in the log (searched at TRACE, hence
//! this binary) or in the report.

use std::time::Duration;

use clap::Parser;

use crate::common;

/// Runs credctl's own code in-process, as the binary would, and returns what it printed.
async fn credctl(args: &[&str]) -> (Result<(), credctl::CliError>, String) {
    let cli = credctl::Cli::try_parse_from(std::iter::once("credctl").chain(args.iter().copied()))
        .unwrap();
    let mut out = Vec::new();
    let result = credctl::execute(cli, &mut out).await;
    (result, String::from_utf8(out).unwrap())
}

#[tokio::test]
async fn import_refreshes_valid_grants_reports_each_bad_line_and_never_shows_a_token() {
    let logs = crate::capture::LogCapture::install(tracing::Level::TRACE);
    let app = common::TestApp::spawn().await;
    let server = format!("http://{}", app.addr);
    let dead = app.fake.seed_grant();
    app.fake.revoke_all_refresh_tokens();
    let (acme, globex, hooli) = (
        app.fake.seed_grant(),
        app.fake.seed_grant(),
        app.fake.seed_grant(),
    );
    let later = humantime::format_rfc3339_seconds(app.clock.now() + Duration::from_secs(3600));
    let lines = [
        format!(r#"{{"account": "acme", "refresh_token": "{acme}"}}"#),
        format!(
            r#"{{"account": "globex", "refresh_token": "{globex}", "access_token": "at-carried-over", "expires_at": "{later}"}}"#
        ),
        format!(r#"{{"account": "initech", "refresh_token": "{dead}"}}"#),
        format!(r#"{{"account": "broken", "refresh_token": "{hooli}""#),
        format!(r#"{{"account": "acme", "refresh_token": "{hooli}"}}"#),
        String::new(),
        format!(r#"{{"account": "hooli", "refresh_token": "{hooli}"}}"#),
    ];
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("grants.jsonl");
    std::fs::write(&file, lines.join("\n")).unwrap();
    let refreshes = app.fake.stats().refreshes_ok;

    let (result, report) = credctl(&["--server", &server, "import", file.to_str().unwrap()]).await;
    let e = result.unwrap_err();
    assert_eq!(e.exit_code(), credctl::exit::NOT_ALL_IMPORTED, "{e}");
    assert_eq!(
        e.to_string(),
        "3 of 6 grant(s) imported; the lines above say what became of the others"
    );
    let expected = [
        "line 1 acme: refreshed: imported; EdgeTag refreshed it",
        "line 2 globex: stored: imported with its access token",
        "line 3 initech: needs_reauth: EdgeTag rejected the imported refresh token of account initech",
        "line 4: malformed: not JSON (it ends early at column",
        "line 5 acme: exists: already connected; not overwritten (pass --replace to overwrite)",
        "line 7 hooli: refreshed: imported; EdgeTag refreshed it",
        "Imported 3 of 6 grant(s) (2 refreshed, 1 with their access token); 1 need(s) \
         re-authorization, 1 already connected, 1 malformed, 0 failed.",
    ];
    let got: Vec<&str> = report.lines().collect();
    assert_eq!(got.len(), expected.len(), "{report}");
    for (line, want) in got.iter().zip(expected) {
        assert!(
            line.starts_with(want),
            "{line:?} does not start with {want:?}"
        );
    }
    assert_eq!(
        app.fake.stats().refreshes_ok,
        refreshes + 2,
        "acme and hooli, not globex"
    );

    // What the service now serves.
    let token = app.get_token("acme").await.unwrap().access_token;
    assert!(app.fake.access_token_is_valid(&token));
    assert_eq!(
        app.get_token("globex").await.unwrap().access_token,
        "at-carried-over"
    );
    let initech = app.describe("initech").await.unwrap();
    assert_eq!(
        initech.status(),
        credential_service::proto::AccountStatus::NeedsReauth
    );
    common::assert_status(
        app.get_token("initech").await,
        tonic::Code::FailedPrecondition,
        "needs re-authorization",
    );
    assert!(
        app.describe("broken").await.is_err(),
        "the malformed line imported nothing"
    );

    // --replace overwrites; a grant on the command line is refused before anything is sent.
    let again = dir.path().join("again.jsonl");
    std::fs::write(&again, &lines[4]).unwrap();
    let (result, printed) = credctl(&[
        "--server",
        &server,
        "import",
        "--replace",
        again.to_str().unwrap(),
    ])
    .await;
    result.unwrap();
    assert!(printed.starts_with("line 1 acme: refreshed"), "{printed}");
    // A dead grant never replaces a live one, even with --replace.
    std::fs::write(&again, lines[2].replace("initech", "acme")).unwrap();
    let (result, printed) = credctl(&[
        "--server",
        &server,
        "import",
        "--replace",
        again.to_str().unwrap(),
    ])
    .await;
    assert_eq!(
        result.unwrap_err().exit_code(),
        credctl::exit::NOT_ALL_IMPORTED
    );
    assert!(
        printed.contains("not stored; the account keeps the grant it already had"),
        "{printed}"
    );
    let token = app.get_token("acme").await.unwrap().access_token;
    assert!(app.fake.access_token_is_valid(&token));
    let (result, _) = credctl(&["--server", &server, "import", &lines[6]]).await;
    let e = result.unwrap_err();
    assert_eq!(e.exit_code(), credctl::exit::USAGE);
    assert!(e.to_string().contains("never from the command line"), "{e}");

    // Every import is audited, with its outcome; no token shows anywhere.
    let text = logs.text();
    for (account, outcome) in [
        ("acme", "OK"),
        ("globex", "OK"),
        ("initech", "FAILED_PRECONDITION"),
        ("acme", "ALREADY_EXISTS"),
        ("hooli", "OK"),
    ] {
        assert!(
            text.lines().any(|l| l.contains("method=\"ImportGrant\"")
                && l.contains(&format!("account=\"{account}\""))
                && l.contains(&format!("outcome=\"{outcome}\""))),
            "no audit event for {account} {outcome}"
        );
    }
    for secret in [&acme, &globex, &hooli, &dead, &"at-carried-over".to_owned()] {
        assert!(!text.contains(secret.as_str()), "a token reached the log");
        assert!(
            !report.contains(secret.as_str()),
            "a token reached the report"
        );
    }
}
