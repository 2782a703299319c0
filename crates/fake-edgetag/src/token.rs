//! `POST /v1/oauth-app/client/token` (code exchange and refresh) and
//! `POST /v1/oauth-app/client/revoke`, with the fault injection of the token endpoint.

use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use axum::{
    body::Bytes,
    extract::{ConnectInfo, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use base64::{Engine, engine::general_purpose::STANDARD};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::{
    CODE_LIFETIME, Fault,
    connections::ConnHandle,
    pkce::{is_code_verifier, s256_challenge},
    state::{InFlight, Inner, lock},
};

/// How a successful token answer is shaped ([`Fault::MissingExpiresIn`] and friends).
#[derive(Clone, Copy)]
enum Shape {
    Normal,
    NoExpiresIn,
    ExpiresInAsString,
}

pub(crate) async fn token_handler(
    State(fake): State<Arc<Inner>>,
    ConnectInfo(conn): ConnectInfo<ConnHandle>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    fake.counters.token_requests.fetch_add(1, Ordering::Relaxed);
    fake.counters.note_trace_context(&headers);
    let _in_flight = InFlight::enter(&fake.counters);
    // Claim the fault on arrival so "the Nth request gets the Nth fault" holds under concurrency.
    let (fault, held) = {
        let mut faults = lock(&fake.faults);
        let (tokens, hold) = &faults.held_refreshes;
        let held = (!tokens.is_empty()
            && url::form_urlencoded::parse(&body)
                .any(|(k, v)| k == "refresh_token" && tokens.contains(v.as_ref())))
        .then_some(*hold);
        let fault = faults
            .queue
            .pop_front()
            .or_else(|| faults.persistent.clone());
        (fault, held)
    };
    if let Some(hold) = held {
        tokio::time::sleep(hold).await;
    }
    let delay = Duration::from_nanos(fake.token_delay_nanos.load(Ordering::Relaxed));
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let shape = match fault {
        None => Shape::Normal,
        Some(Fault::Delay(d)) => {
            tokio::time::sleep(d).await;
            Shape::Normal
        }
        Some(Fault::MissingExpiresIn) => Shape::NoExpiresIn,
        Some(Fault::ExpiresInAsString) => Shape::ExpiresInAsString,
        Some(Fault::Hang) => {
            let mut shutdown = fake.shutdown.subscribe();
            // Errors only if the sender is gone, which also means shutdown.
            let _ = shutdown.wait_for(|stopped| *stopped).await;
            conn.kill();
            return StatusCode::SERVICE_UNAVAILABLE.into_response();
        }
        Some(Fault::DropConnection) => {
            // The connection's I/O now fails, so hyper closes the socket instead of writing this.
            conn.kill();
            return StatusCode::INTERNAL_SERVER_ERROR.into_response();
        }
        Some(fault) => return canned_fault_response(&fault),
    };
    fake.token(&headers, &body, shape)
}

fn canned_fault_response(fault: &Fault) -> Response {
    match fault {
        Fault::Status(code) => StatusCode::from_u16(*code)
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
            .into_response(),
        Fault::ServerError => html(
            StatusCode::INTERNAL_SERVER_ERROR,
            "<!doctype html>\n<html><head><title>500 Internal Server Error</title></head>\
             <body><h1>Internal Server Error</h1></body></html>\n",
        ),
        Fault::ServiceUnavailable => html(
            StatusCode::SERVICE_UNAVAILABLE,
            "<!doctype html>\n<html><head><title>503 Service Unavailable</title></head>\
             <body><h1>Service Unavailable</h1></body></html>\n",
        ),
        Fault::TooManyRequests { retry_after_secs } => (
            StatusCode::TOO_MANY_REQUESTS,
            [(header::RETRY_AFTER, retry_after_secs.to_string())],
        )
            .into_response(),
        Fault::MalformedJson => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            r#"{"access_token": "#,
        )
            .into_response(),
        Fault::HtmlPage => html(
            StatusCode::OK,
            "<!doctype html>\n<html><head><title>Sign in</title></head>\
             <body><h1>Please sign in</h1></body></html>\n",
        ),
        Fault::EmptyBody => {
            (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")]).into_response()
        }
        Fault::ErrorIn200 => json_response(StatusCode::OK, &json!({"error": "server_error"})),
        Fault::InvalidGrant => oauth_error(StatusCode::BAD_REQUEST, "invalid_grant"),
        Fault::InvalidGrantAs401 => oauth_error(StatusCode::UNAUTHORIZED, "invalid_grant"),
        Fault::InvalidClient => oauth_error(StatusCode::UNAUTHORIZED, "invalid_client"),
        // Handled by the caller because they need the request or the connection.
        Fault::Delay(_)
        | Fault::Hang
        | Fault::DropConnection
        | Fault::MissingExpiresIn
        | Fault::ExpiresInAsString => unreachable!("{fault:?} is not a canned response"),
    }
}

pub(crate) async fn revoke_handler(
    State(fake): State<Arc<Inner>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    fake.counters.note_trace_context(&headers);
    fake.revoke(&headers, &body)
}

/// A form field set with duplicates rejected (RFC 6749 §3.1: parameters must not repeat).
pub(crate) type Form = Vec<(String, String)>;

#[derive(Debug, thiserror::Error)]
#[error("parameter `{0}` is repeated")]
pub(crate) struct RepeatedParameter(String);

pub(crate) fn parse_form(bytes: &[u8]) -> Result<Form, RepeatedParameter> {
    let mut form: Form = Vec::new();
    for (k, v) in url::form_urlencoded::parse(bytes) {
        if form.iter().any(|(seen, _)| *seen == k) {
            return Err(RepeatedParameter(k.into_owned()));
        }
        form.push((k.into_owned(), v.into_owned()));
    }
    Ok(form)
}

pub(crate) fn form_get<'a>(form: &'a Form, name: &str) -> Option<&'a str> {
    form.iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// Why a client request was refused, mapped to the OAuth error answer.
enum Refusal {
    InvalidClient,
    InvalidRequest,
    InvalidGrant,
    UnsupportedGrantType,
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        match self {
            Refusal::InvalidClient => oauth_error(StatusCode::UNAUTHORIZED, "invalid_client"),
            Refusal::InvalidRequest => oauth_error(StatusCode::BAD_REQUEST, "invalid_request"),
            Refusal::InvalidGrant => oauth_error(StatusCode::BAD_REQUEST, "invalid_grant"),
            Refusal::UnsupportedGrantType => {
                oauth_error(StatusCode::BAD_REQUEST, "unsupported_grant_type")
            }
        }
    }
}

impl Inner {
    /// Checks Basic client authentication and the form encoding shared by token and revoke.
    fn client_form(&self, headers: &HeaderMap, body: &[u8]) -> Result<Form, Refusal> {
        let (id, secret) = basic_credentials(headers).ok_or(Refusal::InvalidClient)?;
        // Both comparisons run regardless of the first result, on fixed-size digests.
        let id_ok = digest_eq(id.as_bytes(), self.config.client_id.as_bytes());
        let secret_ok = digest_eq(secret.as_bytes(), lock(&self.client_secret).as_bytes());
        if !(id_ok & secret_ok) {
            return Err(Refusal::InvalidClient);
        }
        if !is_form_urlencoded(headers) {
            return Err(Refusal::InvalidRequest);
        }
        parse_form(body).map_err(|_| Refusal::InvalidRequest)
    }

    fn token(&self, headers: &HeaderMap, body: &[u8], shape: Shape) -> Response {
        let result =
            self.client_form(headers, body)
                .and_then(|form| match form_get(&form, "grant_type") {
                    None => Err(Refusal::InvalidRequest),
                    Some("authorization_code") => self.exchange_code(&form),
                    Some("refresh_token") => self.refresh(&form),
                    Some(_) => Err(Refusal::UnsupportedGrantType),
                });
        match result {
            Ok(mut answer) => {
                match shape {
                    Shape::Normal => {}
                    Shape::NoExpiresIn => {
                        answer.remove("expires_in");
                    }
                    Shape::ExpiresInAsString => {
                        let secs = self.config.access_token_lifetime.as_secs().to_string();
                        answer.insert("expires_in".to_owned(), secs.into());
                    }
                }
                json_response(StatusCode::OK, &answer.into())
            }
            Err(refusal) => refusal.into_response(),
        }
    }

    fn exchange_code(
        &self,
        form: &Form,
    ) -> Result<serde_json::Map<String, serde_json::Value>, Refusal> {
        let allowed: &[&str] = if self.config.accept_redirect_uri_in_body {
            &["grant_type", "code", "code_verifier", "redirect_uri"]
        } else {
            &["grant_type", "code", "code_verifier"]
        };
        only_fields(form, allowed)?;
        let code = form_get(form, "code").ok_or(Refusal::InvalidRequest)?;
        let verifier = form_get(form, "code_verifier").ok_or(Refusal::InvalidRequest)?;
        let body_redirect_uri = form_get(form, "redirect_uri");

        let now = self.config.clock.now();
        let mut store = lock(&self.store);
        // Burnt on first use, whatever the outcome.
        store.received_verifiers.push(verifier.to_owned());
        let pending = store.codes.remove(code).ok_or(Refusal::InvalidGrant)?;
        let fresh = now < pending.issued_at + CODE_LIFETIME;
        let challenge = s256_challenge(verifier);
        let verifier_ok = is_code_verifier(verifier) && challenge == pending.code_challenge;
        let redirect_ok = body_redirect_uri.is_none_or(|uri| uri == pending.redirect_uri);
        if !(fresh && verifier_ok && redirect_ok && pending.client_id == self.config.client_id) {
            return Err(Refusal::InvalidGrant);
        }
        let grant = store.new_grant();
        let access = store.issue_access_token(grant, now, self.config.access_token_lifetime);
        let refresh = store.issue_refresh_token(grant);
        drop(store);

        self.counters
            .code_exchanges_ok
            .fetch_add(1, Ordering::Relaxed);
        tracing::debug!(
            grant_type = "authorization_code",
            "fake EdgeTag issued tokens"
        );
        Ok(self.token_answer(access, Some(refresh)))
    }

    fn refresh(&self, form: &Form) -> Result<serde_json::Map<String, serde_json::Value>, Refusal> {
        only_fields(form, &["grant_type", "refresh_token"])?;
        let presented = form_get(form, "refresh_token").ok_or(Refusal::InvalidRequest)?;

        let now = self.config.clock.now();
        let mut store = lock(&self.store);
        let Some(&grant) = store.refresh.get(presented) else {
            if let Some(&grant) = store.rotated_away.get(presented) {
                // Reuse detection: whoever holds the current token may be an attacker, or a
                // client that refreshed twice; either way the grant goes.
                store.revoke_grant(grant);
                drop(store);
                self.counters
                    .refresh_token_reuses
                    .fetch_add(1, Ordering::Relaxed);
                tracing::debug!("fake EdgeTag revoked a grant whose old refresh token was reused");
            }
            return Err(Refusal::InvalidGrant);
        };
        let access = store.issue_access_token(grant, now, self.config.access_token_lifetime);
        let rotated = self
            .config
            .rotate_refresh_tokens
            .then(|| store.issue_refresh_token(grant));
        if rotated.is_some() && self.config.revoke_grant_on_refresh_token_reuse {
            store.rotated_away.insert(presented.to_owned(), grant);
        }
        drop(store);

        self.counters.refreshes_ok.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(
            grant_type = "refresh_token",
            rotated = rotated.is_some(),
            "fake EdgeTag issued tokens"
        );
        Ok(self.token_answer(access, rotated))
    }

    /// EdgeTag's token answer: no `token_type`, no `scope`.
    fn token_answer(
        &self,
        access: String,
        refresh: Option<String>,
    ) -> serde_json::Map<String, serde_json::Value> {
        let mut answer = serde_json::Map::new();
        answer.insert("access_token".to_owned(), access.into());
        if let Some(refresh) = refresh {
            answer.insert("refresh_token".to_owned(), refresh.into());
        }
        answer.insert(
            "expires_in".to_owned(),
            self.config.access_token_lifetime.as_secs().into(),
        );
        answer
    }

    fn revoke(&self, headers: &HeaderMap, body: &[u8]) -> Response {
        let form = match self.client_form(headers, body) {
            Ok(form) => form,
            Err(refusal) => return refusal.into_response(),
        };
        if only_fields(&form, &["token", "token_type_hint"]).is_err() {
            return Refusal::InvalidRequest.into_response();
        }
        let Some(token) = form_get(&form, "token") else {
            return Refusal::InvalidRequest.into_response();
        };
        {
            // RFC 7009 §2.1: the hint only orders the search, so look the token up as either kind.
            let mut store = lock(&self.store);
            let grant = store
                .access
                .get(token)
                .map(|t| t.grant)
                .or_else(|| store.refresh.get(token).copied());
            if let Some(grant) = grant {
                store.revoke_grant(grant);
            }
        }
        self.counters.revokes.fetch_add(1, Ordering::Relaxed);
        tracing::debug!("fake EdgeTag handled a revocation");
        json_response(StatusCode::OK, &json!({}))
    }
}

/// Rejects any field outside `allowed`: EdgeTag documents exactly these, and the fake is strict.
fn only_fields(form: &Form, allowed: &[&str]) -> Result<(), Refusal> {
    if form.iter().all(|(k, _)| allowed.contains(&k.as_str())) {
        Ok(())
    } else {
        Err(Refusal::InvalidRequest)
    }
}

/// `(client_id, client_secret)` from `Authorization: Basic …`, if well-formed.
fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = String::from_utf8(STANDARD.decode(encoded.trim()).ok()?).ok()?;
    let (id, secret) = decoded.split_once(':')?;
    Some((id.to_owned(), secret.to_owned()))
}

/// Compares SHA-256 digests in constant time, so timing reveals neither length nor a common prefix.
fn digest_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    Sha256::digest(a).ct_eq(&Sha256::digest(b)).into()
}

fn is_form_urlencoded(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|essence| {
            essence
                .trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        })
}

pub(crate) fn json_response(status: StatusCode, body: &serde_json::Value) -> Response {
    (
        status,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
            (header::PRAGMA, "no-cache"),
        ],
        body.to_string(),
    )
        .into_response()
}

fn oauth_error(status: StatusCode, error: &str) -> Response {
    let mut response = json_response(status, &json!({ "error": error }));
    if status == StatusCode::UNAUTHORIZED {
        // RFC 6749 §5.2: required when the client tried HTTP authentication.
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static(r#"Basic realm="edgetag""#),
        );
    }
    response
}

fn html(status: StatusCode, body: &'static str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        body,
    )
        .into_response()
}
