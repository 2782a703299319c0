//! `GET /v1/user/me`: 200 for a live access token, 401 otherwise.

use std::sync::Arc;

use axum::{
    extract::State,
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::Response,
};
use serde_json::json;

use crate::{
    FAKE_TEAM_ID,
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
    let now = fake.config.clock.now();
    let valid = token.is_some_and(|t| lock(&fake.store).access_token_is_valid(t, now));
    if valid {
        json_response(
            StatusCode::OK,
            &json!({ "teamId": FAKE_TEAM_ID, "teams": [{ "id": FAKE_TEAM_ID }] }),
        )
    } else {
        let mut response =
            json_response(StatusCode::UNAUTHORIZED, &json!({"error": "invalid_token"}));
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static(r#"Bearer error="invalid_token""#),
        );
        response
    }
}
