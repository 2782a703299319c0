//! `GET {API}/v1/user/me` (EDGETAG.md §5): which EdgeTag team a grant reaches. Callers need the
//! team's id beside the token (`Team-Id`) on every EdgeTag API call, so the service asks once a
//! grant is stored and hands the answer out with the token.
//!
//! Only the access token authenticates this request (no client credentials). The answer is
//! parsed leniently and never echoed: neither the token nor the body reaches a log or an error,
//! only the status.

use std::{collections::HashSet, time::SystemTime};

use reqwest::StatusCode;
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;

use super::{ProviderClient, UpstreamError, parse_retry_after};
use crate::tokens::{Team, Teams};

/// Team ids become a header value at every caller: longer ones are not ids.
const MAX_TEAM_ID_CHARS: usize = 128;
/// Names are for operators' eyes; longer ones are cut.
const MAX_TEAM_NAME_CHARS: usize = 200;
/// Teams kept from one answer.
const MAX_TEAMS: usize = 1000;

/// What `/v1/user/me` said about a grant's teams.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserInfo {
    pub team_id: String,
    /// The listed teams, the current one always among them.
    pub teams: Vec<Team>,
}

impl UserInfo {
    /// The domain's record of it, learned at `at`.
    pub fn into_teams(self, at: SystemTime) -> Teams {
        Teams {
            team_id: self.team_id,
            teams: self.teams,
            learned_at: at,
        }
    }
}

impl ProviderClient {
    /// Asks EdgeTag which teams the grant behind `access_token` reaches.
    // A failure is the caller's to judge (the team lookup warns, throttled): DEBUG here.
    #[tracing::instrument(name = "upstream.user_info", skip_all, err(level = "debug", Display))]
    pub async fn user_info(&self, access_token: &SecretString) -> Result<UserInfo, UpstreamError> {
        let request = self
            .http
            .get(self.config.user_info_url.clone())
            .bearer_auth(access_token.expose_secret());
        let answer = self.send("user_info", request).await?;
        parse_user_info(answer.status, answer.retry_after.as_deref(), &answer.body)
    }
}

/// Classifies one `/v1/user/me` answer. Pure, so it can be fed arbitrary input in tests.
pub fn parse_user_info(
    status: StatusCode,
    retry_after: Option<&str>,
    body: &[u8],
) -> Result<UserInfo, UpstreamError> {
    if status.is_server_error()
        || status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
    {
        return Err(UpstreamError::Unavailable {
            status: status.as_u16(),
            retry_after: retry_after.and_then(parse_retry_after),
        });
    }
    if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
        return Err(UpstreamError::Rejected {
            status: status.as_u16(),
            error: "the access token was not accepted",
        });
    }
    if !status.is_success() {
        return Err(UpstreamError::Rejected {
            status: status.as_u16(),
            error: "no usable answer",
        });
    }
    let Ok(Value::Object(map)) = serde_json::from_slice::<Value>(body) else {
        return Err(UpstreamError::Malformed("not a JSON object"));
    };
    let team_id = map
        .get("teamId")
        .and_then(id_of)
        .ok_or(UpstreamError::Malformed("no teamId"))?;
    if !usable_id(&team_id) {
        return Err(UpstreamError::Malformed(
            "teamId is not a usable header value",
        ));
    }
    let mut seen = HashSet::new();
    let mut teams: Vec<Team> = map
        .get("teams")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|entry| {
            let id = entry.get("id").and_then(id_of).filter(|id| usable_id(id))?;
            let name = entry
                .get("name")
                .and_then(Value::as_str)
                .map(|n| n.chars().take(MAX_TEAM_NAME_CHARS).collect())
                .unwrap_or_default();
            Some(Team { id, name })
        })
        .filter(|team| seen.insert(team.id.clone()))
        .take(MAX_TEAMS)
        .collect();
    if !teams.iter().any(|t| t.id == team_id) {
        teams.insert(
            0,
            Team {
                id: team_id.clone(),
                name: String::new(),
            },
        );
    }
    Ok(UserInfo { team_id, teams })
}

/// An id as EdgeTag may send it: a string, or a number.
fn id_of(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.trim().to_owned()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Fits a `Team-Id` header as it is: visible ASCII, no spaces, bounded.
fn usable_id(id: &str) -> bool {
    (1..=MAX_TEAM_ID_CHARS).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_graphic())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(status: u16, body: &str) -> Result<UserInfo, UpstreamError> {
        parse_user_info(StatusCode::from_u16(status).unwrap(), None, body.as_bytes())
    }

    #[test]
    fn reads_the_team_and_the_listed_teams_with_their_names() {
        let info = parse(
            200,
            r#"{"email":"a@b.c","teamId":"t-2","teams":[{"id":"t-1","name":"Acme EU"},{"id":"t-2"},{"id":7,"name":"Seven"},{"name":"no id"},{"id":"t-1"}]}"#,
        )
        .unwrap();
        assert_eq!(info.team_id, "t-2");
        let listed: Vec<(&str, &str)> = info
            .teams
            .iter()
            .map(|t| (t.id.as_str(), t.name.as_str()))
            .collect();
        assert_eq!(
            listed,
            [("t-1", "Acme EU"), ("t-2", ""), ("7", "Seven")],
            "entries without an id and repeats are dropped"
        );
        let bare = parse(200, r#"{"teamId":42}"#).unwrap();
        assert_eq!((bare.team_id.as_str(), bare.teams.len()), ("42", 1));
    }

    #[test]
    fn an_answer_without_a_usable_team_is_malformed_and_never_echoed() {
        for body in [
            r#"{"teams":[{"id":"t-1"}]}"#,
            r#"{"teamId":""}"#,
            r#"{"teamId":"a b"}"#,
            r#"{"teamId":null}"#,
            "<html>secret-abc</html>",
            "",
        ] {
            let e = parse(200, body).unwrap_err();
            assert!(matches!(e, UpstreamError::Malformed(_)), "{body:?}");
            assert!(!e.to_string().contains("secret-abc"));
        }
    }

    #[test]
    fn failures_are_classified_by_status() {
        assert!(parse(503, "down").unwrap_err().is_outage());
        let e = parse_user_info(StatusCode::TOO_MANY_REQUESTS, Some("9"), b"").unwrap_err();
        assert_eq!(e.retry_after(), Some(std::time::Duration::from_secs(9)));
        let refused = parse(401, r#"{"error":"invalid_token","token":"at-secret"}"#).unwrap_err();
        assert!(matches!(
            refused,
            UpstreamError::Rejected { status: 401, .. }
        ));
        assert!(!refused.to_string().contains("at-secret"));
    }
}
