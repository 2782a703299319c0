//! `GET /oauth/app/login`: validates the request like EdgeTag, auto-approves and redirects with
//! a code. No login page: whoever opens the URL approves.

use std::sync::{Arc, atomic::Ordering};

use axum::{
    extract::{RawQuery, State},
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use url::Url;

use crate::{
    Redirect,
    pkce::is_s256_challenge,
    state::{Inner, PendingCode, lock, random_token},
    token::parse_form,
};

impl Inner {
    /// Validates an authorize query string and issues a code. The error names the problem.
    pub(crate) fn authorize(&self, query: &str) -> Result<Redirect, String> {
        let params = parse_form(query.as_bytes()).map_err(|e| e.to_string())?;
        let get = |name: &str| -> Result<&str, String> {
            params
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
                .ok_or_else(|| format!("missing parameter `{name}`"))
        };
        let client_id = get("client_id")?;
        if client_id != self.config.client_id {
            return Err(format!("unknown client_id {client_id:?}"));
        }
        let redirect_uri = get("redirect_uri")?;
        let mut location = self.check_redirect_uri(redirect_uri)?;
        let response_type = get("response_type")?;
        if response_type != "code" {
            return Err(format!(
                "response_type must be \"code\", got {response_type:?}"
            ));
        }
        let scope = get("scope")?;
        if scope != "full" {
            return Err(format!("scope must be \"full\", got {scope:?}"));
        }
        let method = get("code_challenge_method")?;
        if method != "S256" {
            return Err(format!(
                "code_challenge_method must be \"S256\", got {method:?}"
            ));
        }
        let code_challenge = get("code_challenge")?;
        if !is_s256_challenge(code_challenge) {
            return Err(
                "code_challenge must be 43 characters of base64url without padding".to_owned(),
            );
        }
        let state = get("state")?;
        if state.is_empty() {
            return Err("state must not be empty".to_owned());
        }

        let code = random_token("etc_");
        let now = self.config.clock.now();
        {
            let mut store = lock(&self.store);
            store.sweep(now);
            store.codes.insert(
                code.clone(),
                PendingCode {
                    client_id: client_id.to_owned(),
                    redirect_uri: redirect_uri.to_owned(),
                    code_challenge: code_challenge.to_owned(),
                    issued_at: now,
                },
            );
        }
        location
            .query_pairs_mut()
            .append_pair("code", &code)
            .append_pair("state", state);
        tracing::debug!("fake EdgeTag issued an authorization code");
        Ok(Redirect {
            code,
            state: state.to_owned(),
            location: location.into(),
        })
    }

    /// Checks a redirect URI against the configuration and parses it for appending the answer.
    fn check_redirect_uri(&self, redirect_uri: &str) -> Result<Url, String> {
        let configured = &self.config.redirect_uris;
        if !configured.is_empty() && !configured.iter().any(|u| u == redirect_uri) {
            return Err(format!(
                "redirect_uri {redirect_uri:?} is not registered for this client"
            ));
        }
        let url =
            Url::parse(redirect_uri).map_err(|e| format!("redirect_uri is not a URL: {e}"))?;
        if !matches!(url.scheme(), "http" | "https") || !url.has_host() {
            return Err(format!(
                "redirect_uri {redirect_uri:?} is not an absolute http(s) URL"
            ));
        }
        if url.fragment().is_some() {
            return Err("redirect_uri must not contain a fragment".to_owned());
        }
        Ok(url)
    }
}

pub(crate) async fn authorize_handler(
    State(fake): State<Arc<Inner>>,
    RawQuery(query): RawQuery,
) -> Response {
    fake.counters.authorize.fetch_add(1, Ordering::Relaxed);
    match fake.authorize(query.as_deref().unwrap_or("")) {
        Ok(redirect) => match HeaderValue::from_str(&redirect.location) {
            Ok(location) => (StatusCode::FOUND, [(header::LOCATION, location)]).into_response(),
            Err(_) => error_page(
                StatusCode::BAD_REQUEST,
                "redirect_uri is not a valid header",
            ),
        },
        Err(problem) => error_page(StatusCode::BAD_REQUEST, &problem),
    }
}

/// A small HTML page for the browser-facing endpoint.
fn error_page(status: StatusCode, problem: &str) -> Response {
    let body = format!(
        "<!doctype html>\n<html><head><title>Fake EdgeTag: authorization error</title></head>\
         <body><h1>Authorization error</h1><p>{}</p></body></html>\n",
        html_escape(problem)
    );
    (
        status,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        body,
    )
        .into_response()
}

/// Escapes the five characters that matter in HTML text and attribute values.
fn html_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}
