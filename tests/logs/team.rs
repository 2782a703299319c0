//! Learning an account's EdgeTag team (`GET /v1/user/me`, asked with the access token) logs
//! neither the token nor the answer's body, at TRACE, every crate included (reqwest, hyper): not
//! when EdgeTag fails and echoes the token back in its error body, not when it answers. And the
//! failure is said once, not on every retry.

use crate::common;

use std::time::Duration;

use common::{MINUTE, TestApp};
use fake_edgetag::{FakeTeam, UserMeFault};

/// In the team's name only: found in a log line, it came from the answer's body.
const NAME_MARKER: &str = "Team-Name-Only-In-The-Body-4c1e";

#[tokio::test]
async fn no_access_token_or_user_me_body_reaches_the_logs() {
    let capture = crate::capture::LogCapture::install(tracing::Level::TRACE);
    let app = TestApp::spawn_with(common::Options {
        request_timeout: Duration::from_millis(500),
        ..Default::default()
    })
    .await;
    app.fake.set_teams(
        "team-logs",
        vec![FakeTeam {
            id: "team-logs".into(),
            name: Some(NAME_MARKER.into()),
        }],
    );

    // EdgeTag fails and echoes the token in its error body; later it answers without teamId.
    app.fake.set_user_me_fault(Some(UserMeFault::Status(500)));
    app.connect("team-logs-acct").await;
    let token = app.get_token("team-logs-acct").await.unwrap();
    assert_eq!(token.team_id, "");
    app.fake.set_user_me_fault(Some(UserMeFault::WithoutTeamId));
    app.clock.advance(MINUTE); // past the back-off
    assert_eq!(app.broker.learn_teams_due().await, 1);
    let asked = async |n: u64| {
        tokio::time::timeout(Duration::from_secs(10), async {
            while app.fake.user_me_requests() < n {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the lookup reached EdgeTag")
    };
    asked(2).await;

    // EdgeTag answers: the team is learned (and its name is in the body).
    app.fake.set_user_me_fault(None);
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            app.clock.advance(MINUTE);
            app.broker.learn_teams_due().await;
            if app.get_token("team-logs-acct").await.unwrap().team_id == "team-logs" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the team is learned");
    let info = app.describe("team-logs-acct").await.unwrap();
    assert_eq!(info.teams[0].name, NAME_MARKER, "the body was read");
    drop(app);

    let logs = capture.text();
    assert!(
        logs.contains("upstream.user_info") && logs.contains("EdgeTag team learned"),
        "the lookups ran under TRACE logging"
    );
    assert!(
        !logs.contains(&token.access_token),
        "the access token reached the logs"
    );
    for body_part in [
        NAME_MARKER,
        "\"teamId\"",
        "\"teams\"",
        "\"error\":\"fault\"",
    ] {
        assert!(
            !logs.contains(body_part),
            "{body_part:?} from a body reached the logs"
        );
    }
    let warnings = logs
        .lines()
        .filter(|l| l.contains("team-logs-acct") && l.contains("could not learn"))
        .count();
    assert_eq!(warnings, 1, "two failures in a row, said once");
}
