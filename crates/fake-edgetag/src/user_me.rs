//! `GET /v1/user/me`: the token's team and teams for a live access token, 401 otherwise; or a
//! fault a test set.

use std::sync::Arc;

use axum::{
    extract::State,
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::Response,
};
use serde_json::{Value, json};

use crate::{
    UserMeFault,
    state::{Inner, lock},
    token::json_response,
};

pub(crate) async fn user_me_handler(
    State(fake): State<Arc<Inner>>,
    headers: HeaderMap,
) -> Response {
    fake.counters.note_trace_context(&headers);
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim());
    let (fault, team_id, teams) = {
        let mut user_me = lock(&fake.user_me);
        user_me.requests += 1;
        (
            user_me.fault.clone(),
            user_me.team_id.clone(),
            user_me.teams.clone(),
        )
    };
    if let Some(UserMeFault::Status(status)) = fault {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return json_response(
            status,
            &json!({"error": "fault", "token": token.unwrap_or_default()}),
        );
    }
    let now = fake.config.clock.now();
    let valid = token.is_some_and(|t| lock(&fake.store).access_token_is_valid(t, now));
    if !valid {
        let mut response =
            json_response(StatusCode::UNAUTHORIZED, &json!({"error": "invalid_token"}));
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static(r#"Bearer error="invalid_token""#),
        );
        return response;
    }
    let teams: Vec<Value> = teams
        .iter()
        .map(|t| match &t.name {
            Some(name) => json!({ "id": t.id, "name": name }),
            None => json!({ "id": t.id }),
        })
        .collect();
    let body = match fault {
        Some(UserMeFault::WithoutTeamId) => json!({ "teams": teams }),
        _ => json!({ "teamId": team_id, "teams": teams }),
    };
    json_response(StatusCode::OK, &body)
}
