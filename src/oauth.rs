//! Everything that speaks OAuth 2.0 to EdgeTag: PKCE, the authorize URL, the token endpoint and the
//! classification of its answers.
//!
//! The wire format follows EdgeTag's public API docs (docs.edgetag.io, "OAuth 2.0 →
//! Implementation"): form POSTs with HTTP Basic client authentication, no `token_type` in
//! responses, undocumented error bodies. Responses are parsed leniently but never
//! echoed: an upstream body may hold a token, so errors carry only the status and a known OAuth error
//! code. The client secret is re-read when EdgeTag rejects it (`secret`).

mod secret;
mod user_info;

use std::{
    fmt,
    time::{Duration, Instant, SystemTime},
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use rand::RngCore;
use reqwest::{StatusCode, header};
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;
use sha2::{Digest, Sha256};
use url::Url;

pub use self::{
    secret::ClientSecret,
    user_info::{UserInfo, parse_user_info},
};

use crate::{
    clock::{from_unix_ms, to_unix_ms},
    metrics,
    tokens::{DEFAULT_TOKEN_TYPE, TokenSet},
};

/// Responses larger than this are not tokens; reading stops there.
const MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// How to reach and authenticate to the provider.
#[derive(Clone)]
pub struct ProviderConfig {
    /// The page the browser opens (`{UI}/oauth/app/login` for EdgeTag).
    pub authorize_url: Url,
    /// The token endpoint (`{API}/v1/oauth-app/client/token`).
    pub token_url: Url,
    /// The revocation endpoint (`{API}/v1/oauth-app/client/revoke`).
    pub revoke_url: Url,
    /// Which teams a grant reaches (`{API}/v1/user/me`), asked with the access token.
    pub user_info_url: Url,
    pub client_id: String,
    /// Sent with every request; re-read from its file when EdgeTag rejects it.
    pub client_secret: ClientSecret,
    /// Must match one of the redirect URIs registered for the OAuth app exactly.
    pub redirect_uri: Url,
    pub scope: String,
    /// Deadline for one upstream HTTP request, connect included.
    pub request_timeout: Duration,
    /// Lifetime assumed when a token response omits `expires_in`.
    pub default_token_lifetime: Duration,
    /// Also send `redirect_uri` in the code exchange (RFC 6749 §4.1.3). EdgeTag documents none;
    /// strict servers require it.
    pub send_redirect_uri: bool,
}

impl fmt::Debug for ProviderConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProviderConfig")
            .field("authorize_url", &self.authorize_url.as_str())
            .field("token_url", &self.token_url.as_str())
            .field("revoke_url", &self.revoke_url.as_str())
            .field("user_info_url", &self.user_info_url.as_str())
            .field("client_id", &self.client_id)
            .field("client_secret", &self.client_secret)
            .field("redirect_uri", &self.redirect_uri.as_str())
            .field("scope", &self.scope)
            .field("request_timeout", &self.request_timeout)
            .finish_non_exhaustive()
    }
}

/// 32 bytes from the thread-local CSPRNG, base64url without padding (43 characters).
pub fn random_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

/// A PKCE (RFC 7636) verifier and its S256 challenge.
pub struct Pkce {
    pub verifier: SecretString,
    pub challenge: String,
}

impl Pkce {
    pub fn generate() -> Self {
        let verifier = random_token();
        let challenge = s256_challenge(&verifier);
        Self {
            verifier: verifier.into(),
            challenge,
        }
    }
}

/// `BASE64URL-NOPAD(SHA256(verifier))`.
pub fn s256_challenge(verifier: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()))
}

/// A successful token response, as far as this service needs it.
pub struct TokenResponse {
    pub access_token: SecretString,
    /// Present on the code exchange; on refresh only when the provider rotates refresh tokens.
    pub refresh_token: Option<SecretString>,
    pub token_type: Option<String>,
    pub expires_in: Option<Duration>,
}

impl TokenResponse {
    /// The domain's token set from this answer. `requested_at` is when the request left, so the
    /// computed expiry errs early; `previous_refresh` is kept when the answer carries none. Times
    /// are cut to whole milliseconds, as the store keeps them, so the process that refreshed and
    /// every one that loads the record hand callers the same `expires_at`.
    pub fn into_token_set(
        self,
        requested_at: SystemTime,
        default_lifetime: Duration,
        previous_refresh: Option<&SecretString>,
    ) -> TokenSet {
        let requested_at = from_unix_ms(to_unix_ms(requested_at));
        let lifetime = self.expires_in.unwrap_or(default_lifetime);
        TokenSet {
            access_token: self.access_token,
            refresh_token: self.refresh_token.or_else(|| previous_refresh.cloned()),
            token_type: self
                .token_type
                .unwrap_or_else(|| DEFAULT_TOKEN_TYPE.to_owned()),
            issued_at: requested_at,
            expires_at: requested_at + lifetime,
        }
    }
}

impl fmt::Debug for TokenResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenResponse")
            .field("access_token", &"<redacted>")
            .field(
                "refresh_token",
                &self.refresh_token.as_ref().map(|_| "<redacted>"),
            )
            .field("token_type", &self.token_type)
            .field("expires_in", &self.expires_in)
            .finish()
    }
}

/// Why an upstream call did not produce tokens. Classified once, here, so callers only decide
/// what to do. Never carries response bodies.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamError {
    #[error("EdgeTag could not be reached ({0})")]
    Unreachable(&'static str),
    #[error("EdgeTag did not answer within {0:?}")]
    Timeout(Duration),
    /// 5xx, 408 and 429: worth retrying later.
    #[error("EdgeTag is unavailable (HTTP {status})")]
    Unavailable {
        status: u16,
        retry_after: Option<Duration>,
    },
    /// The code or refresh token is invalid, expired, revoked or already used.
    #[error("EdgeTag rejected the grant (invalid_grant)")]
    InvalidGrant,
    /// Our client id or secret is wrong: an operator must fix the configuration.
    #[error("EdgeTag rejected this service's client credentials (HTTP {status})")]
    InvalidClient { status: u16 },
    /// Any other 4xx: the request itself was refused.
    #[error("EdgeTag refused the request (HTTP {status}, {error})")]
    Rejected { status: u16, error: &'static str },
    /// A 2xx (or unreadable) answer that holds no usable token.
    #[error("EdgeTag sent an unusable response ({0})")]
    Malformed(&'static str),
}

impl UpstreamError {
    /// Whether the same request may succeed later.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Unreachable(_)
            | Self::Timeout(_)
            | Self::Unavailable { .. }
            | Self::Malformed(_) => true,
            Self::InvalidGrant | Self::InvalidClient { .. } | Self::Rejected { .. } => false,
        }
    }

    /// Whether EdgeTag itself was down or overloaded (no answer, or a 5xx or 429): one
    /// successful refresh then shows it is back for every account. An unusable answer is
    /// transient too, but says nothing about other accounts.
    pub fn is_outage(&self) -> bool {
        matches!(
            self,
            Self::Unreachable(_) | Self::Timeout(_) | Self::Unavailable { .. }
        )
    }

    /// The provider's explicit back-off request, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Unavailable { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// The OAuth 2.0 error codes (RFC 6749 §5.2, RFC 7009) we name in messages. Anything else the
/// provider says is reported as "unrecognised", since a free-form string could hold anything.
const KNOWN_ERRORS: &[&str] = &[
    "invalid_request",
    "invalid_client",
    "invalid_grant",
    "unauthorized_client",
    "unsupported_grant_type",
    "invalid_scope",
    "unsupported_token_type",
    "access_denied",
    "server_error",
    "temporarily_unavailable",
];

fn known_error(code: &str) -> &'static str {
    KNOWN_ERRORS
        .iter()
        .find(|k| **k == code)
        .copied()
        .unwrap_or("unrecognised error")
}

/// Classifies one token-endpoint answer. Pure, so it can be fed arbitrary input in tests.
pub fn parse_token_response(
    status: StatusCode,
    retry_after: Option<&str>,
    body: &[u8],
) -> Result<TokenResponse, UpstreamError> {
    let json: Option<serde_json::Map<String, Value>> = match serde_json::from_slice(body) {
        Ok(Value::Object(map)) => Some(map),
        _ => None,
    };
    let error = json
        .as_ref()
        .and_then(|m| m.get("error"))
        .and_then(Value::as_str);

    if status.is_server_error()
        || status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
    {
        return Err(UpstreamError::Unavailable {
            status: status.as_u16(),
            retry_after: retry_after.and_then(parse_retry_after),
        });
    }
    // A 401 is about this service's client credentials, unless its body names the grant: some
    // servers answer a revoked or expired refresh token with 401 `invalid_grant`, and taking that
    // for a client problem would never ask for the new authorization the account needs.
    if (status == StatusCode::UNAUTHORIZED && error != Some("invalid_grant"))
        || error == Some("invalid_client")
    {
        return Err(UpstreamError::InvalidClient {
            status: status.as_u16(),
        });
    }
    if !status.is_success() {
        return Err(match error {
            Some("invalid_grant") => UpstreamError::InvalidGrant,
            Some(code) => UpstreamError::Rejected {
                status: status.as_u16(),
                error: known_error(code),
            },
            None => UpstreamError::Rejected {
                status: status.as_u16(),
                error: "no OAuth error code",
            },
        });
    }

    let Some(map) = json.as_ref() else {
        return Err(UpstreamError::Malformed(if body.is_empty() {
            "empty body"
        } else {
            "not a JSON object"
        }));
    };
    match error {
        Some("invalid_grant") => return Err(UpstreamError::InvalidGrant),
        Some(_) => {
            return Err(UpstreamError::Malformed(
                "error field in a success response",
            ));
        }
        None => {}
    }
    let access_token = match map.get("access_token") {
        Some(Value::String(s)) if !s.is_empty() => SecretString::from(s.as_str()),
        _ => return Err(UpstreamError::Malformed("no access_token")),
    };
    let refresh_token = match map.get("refresh_token") {
        Some(Value::String(s)) if !s.is_empty() => Some(SecretString::from(s.as_str())),
        None | Some(Value::Null) => None,
        Some(Value::String(_)) => None,
        Some(_) => return Err(UpstreamError::Malformed("refresh_token is not a string")),
    };
    let token_type = match map.get("token_type") {
        Some(Value::String(s)) if !s.is_empty() && s.len() <= 64 => Some(s.clone()),
        _ => None,
    };
    let expires_in = match map.get("expires_in") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => Some(
            n.as_u64()
                .ok_or(UpstreamError::Malformed("expires_in is not a whole number"))?,
        ),
        Some(Value::String(s)) => Some(
            s.trim()
                .parse::<u64>()
                .map_err(|_| UpstreamError::Malformed("expires_in is not a number"))?,
        ),
        Some(_) => return Err(UpstreamError::Malformed("expires_in is not a number")),
    };
    let expires_in = match expires_in {
        Some(0) => return Err(UpstreamError::Malformed("expires_in is zero")),
        // Ten years: anything longer is a unit mix-up, not a lifetime.
        Some(s) if s > 10 * 365 * 24 * 3600 => {
            return Err(UpstreamError::Malformed("expires_in is implausibly large"));
        }
        other => other.map(Duration::from_secs),
    };
    Ok(TokenResponse {
        access_token,
        refresh_token,
        token_type,
        expires_in,
    })
}

/// `Retry-After` in seconds (the HTTP-date form is rare for token endpoints and is ignored), capped
/// at an hour so a bad header cannot park an account for good.
fn parse_retry_after(v: &str) -> Option<Duration> {
    v.trim()
        .parse::<u64>()
        .ok()
        .map(|s| Duration::from_secs(s.min(3600)))
}

/// HTTP client for the provider's token and revocation endpoints.
#[derive(Clone, Debug)]
pub struct ProviderClient {
    http: reqwest::Client,
    config: ProviderConfig,
}

impl ProviderClient {
    pub fn new(config: ProviderConfig) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(config.request_timeout)
            .connect_timeout(config.request_timeout.min(Duration::from_secs(5)))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("credential-service/", env!("CARGO_PKG_VERSION")))
            .tcp_nodelay(true)
            .build()?;
        Ok(Self { http, config })
    }

    pub fn config(&self) -> &ProviderConfig {
        &self.config
    }

    /// The page a person opens to approve access, with every parameter EdgeTag requires.
    pub fn authorize_url(&self, state: &str, code_challenge: &str) -> Url {
        let mut url = self.config.authorize_url.clone();
        url.query_pairs_mut()
            .append_pair("client_id", &self.config.client_id)
            .append_pair("redirect_uri", self.config.redirect_uri.as_str())
            .append_pair("response_type", "code")
            .append_pair("scope", &self.config.scope)
            .append_pair("state", state)
            .append_pair("code_challenge", code_challenge)
            .append_pair("code_challenge_method", "S256");
        url
    }

    /// Exchanges an authorization code (`grant_type=authorization_code`).
    #[tracing::instrument(name = "upstream.exchange_code", skip_all, err(Display))]
    pub async fn exchange_code(
        &self,
        code: &SecretString,
        verifier: &SecretString,
    ) -> Result<TokenResponse, UpstreamError> {
        let mut form = vec![
            ("grant_type", "authorization_code"),
            ("code", code.expose_secret()),
            ("code_verifier", verifier.expose_secret()),
        ];
        if self.config.send_redirect_uri {
            form.push(("redirect_uri", self.config.redirect_uri.as_str()));
        }
        self.token_request("exchange_code", &form).await
    }

    /// Refreshes an access token (`grant_type=refresh_token`).
    #[tracing::instrument(name = "upstream.refresh", skip_all, err(Display))]
    pub async fn refresh(
        &self,
        refresh_token: &SecretString,
    ) -> Result<TokenResponse, UpstreamError> {
        let result = self
            .token_request(
                "refresh",
                &[
                    ("grant_type", "refresh_token"),
                    ("refresh_token", refresh_token.expose_secret()),
                ],
            )
            .await;
        metrics::record_refresh(match &result {
            Ok(_) => "succeeded",
            Err(UpstreamError::InvalidGrant | UpstreamError::Rejected { .. }) => "rejected",
            Err(UpstreamError::InvalidClient { .. }) => "client_rejected",
            Err(UpstreamError::Malformed(_)) => "malformed",
            Err(
                UpstreamError::Unreachable(_)
                | UpstreamError::Timeout(_)
                | UpstreamError::Unavailable { .. },
            ) => "unavailable",
        });
        result
    }

    /// Revokes the grant behind an access token (EdgeTag: "immediately invalidate users' access").
    /// EdgeTag documents no response body, so only the status counts.
    #[tracing::instrument(name = "upstream.revoke", skip_all, err(Display))]
    pub async fn revoke(&self, access_token: &SecretString) -> Result<(), UpstreamError> {
        let form = [
            ("token", access_token.expose_secret()),
            ("token_type_hint", "access_token"),
        ];
        let answer = self
            .post_form("revoke", &self.config.revoke_url, &form)
            .await?;
        if answer.status.is_success() {
            return Ok(());
        }
        match answer.classify() {
            Err(e) => Err(e),
            Ok(_) => Err(UpstreamError::Malformed("unexpected revocation answer")),
        }
    }

    async fn token_request(
        &self,
        operation: &'static str,
        form: &[(&str, &str)],
    ) -> Result<TokenResponse, UpstreamError> {
        self.post_form(operation, &self.config.token_url, form)
            .await?
            .classify()
    }

    /// One form POST with the client's Basic credentials; the answer's status, `Retry-After` and
    /// (bounded) body. When EdgeTag rejects the client secret and its file holds a newer one (a
    /// roll at EdgeTag, then the new secret mounted), the request is sent once more with that one,
    /// before anyone is told.
    async fn post_form(
        &self,
        operation: &'static str,
        url: &Url,
        form: &[(&str, &str)],
    ) -> Result<Answer, UpstreamError> {
        let secret = self.config.client_secret.current();
        let answer = self.send_form(operation, url, form, &secret).await?;
        if answer.rejects_client()
            && let Some(newer) = self.config.client_secret.after_rejection(&secret)
        {
            tracing::warn!(
                operation,
                "EdgeTag rejected the client secret; the client secret file holds a new one: asking again with it"
            );
            return self.send_form(operation, url, form, &newer).await;
        }
        Ok(answer)
    }

    /// One form POST with `secret`, timed into the metrics under `operation`.
    async fn send_form(
        &self,
        operation: &'static str,
        url: &Url,
        form: &[(&str, &str)],
        secret: &SecretString,
    ) -> Result<Answer, UpstreamError> {
        let request = self
            .http
            .post(url.clone())
            .basic_auth(&self.config.client_id, Some(secret.expose_secret()))
            .form(form);
        self.send(operation, request).await
    }

    /// Sends `request` (method, URL and credentials set) asking for JSON, timed into the metrics
    /// under `operation`, and reads the answer within the size limit.
    async fn send(
        &self,
        operation: &'static str,
        request: reqwest::RequestBuilder,
    ) -> Result<Answer, UpstreamError> {
        let started = Instant::now();
        let response = request
            .header(header::ACCEPT, "application/json")
            .send()
            .await;
        observe(operation, started, &response);
        let response = response.map_err(|e| self.classify_transport(&e))?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = read_limited(response)
            .await
            .map_err(|e| self.classify_transport(&e))?;
        tracing::debug!(operation, status = status.as_u16(), "EdgeTag answered");
        Ok(Answer {
            status,
            retry_after,
            body,
        })
    }

    fn classify_transport(&self, e: &reqwest::Error) -> UpstreamError {
        if e.is_timeout() {
            UpstreamError::Timeout(self.config.request_timeout)
        } else if e.is_connect() {
            UpstreamError::Unreachable("connection failed")
        } else if e.is_body() || e.is_decode() {
            UpstreamError::Unreachable("connection broke while reading the answer")
        } else {
            UpstreamError::Unreachable("request failed")
        }
    }
}

/// Records an upstream request's latency (to the response head) and HTTP status in the metrics.
fn observe(
    operation: &'static str,
    started: Instant,
    response: &Result<reqwest::Response, reqwest::Error>,
) {
    let (status, timed_out) = match response {
        Ok(r) => (Some(r.status().as_u16()), false),
        Err(e) => (e.status().map(|s| s.as_u16()), e.is_timeout()),
    };
    metrics::observe_upstream(operation, status, timed_out, started.elapsed());
}

/// What an endpoint answered, before it is classified.
struct Answer {
    status: StatusCode,
    retry_after: Option<String>,
    body: Vec<u8>,
}

impl Answer {
    fn classify(&self) -> Result<TokenResponse, UpstreamError> {
        parse_token_response(self.status, self.retry_after.as_deref(), &self.body)
    }

    /// Whether EdgeTag refused this service's client credentials.
    fn rejects_client(&self) -> bool {
        !self.status.is_success()
            && matches!(self.classify(), Err(UpstreamError::InvalidClient { .. }))
    }
}

/// Reads at most [`MAX_RESPONSE_BYTES`]; the rest is dropped unread (the answer is then malformed).
async fn read_limited(mut response: reqwest::Response) -> Result<Vec<u8>, reqwest::Error> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
            return Ok(b"<oversized>".to_vec());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// A client for unit tests whose EdgeTag is a closed loopback port: for brokers whose tests never
/// reach the provider.
#[cfg(test)]
pub(crate) fn unreachable_provider() -> ProviderClient {
    let url = |p: &str| format!("http://127.0.0.1:9/{p}").parse().unwrap();
    ProviderClient::new(ProviderConfig {
        authorize_url: url("authorize"),
        token_url: url("token"),
        revoke_url: url("revoke"),
        user_info_url: url("user/me"),
        client_id: "client".into(),
        client_secret: "secret".into(),
        redirect_uri: url("callback"),
        scope: "full".into(),
        request_timeout: Duration::from_secs(1),
        default_token_lifetime: Duration::from_secs(7200),
        send_redirect_uri: false,
    })
    .unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A replica that refreshed and one that loaded the stored record agree to the nanosecond.
    #[test]
    fn token_times_are_whole_milliseconds_as_the_store_keeps_them() {
        let requested_at = SystemTime::UNIX_EPOCH + Duration::new(1_765_000_000, 123_456_789);
        let set = response(None, Some(3600)).into_token_set(requested_at, Duration::ZERO, None);
        for t in [set.issued_at, set.expires_at] {
            assert_eq!(
                from_unix_ms(to_unix_ms(t)),
                t,
                "{t:?} survives the store unchanged"
            );
        }
        assert!(set.issued_at <= requested_at, "the expiry still errs early");
        assert_eq!(
            set.expires_at,
            SystemTime::UNIX_EPOCH + Duration::new(1_765_003_600, 123_000_000)
        );
    }

    fn parse(status: u16, body: &str) -> Result<TokenResponse, UpstreamError> {
        parse_token_response(StatusCode::from_u16(status).unwrap(), None, body.as_bytes())
    }

    fn response(refresh: Option<&str>, expires_in: Option<u64>) -> TokenResponse {
        TokenResponse {
            access_token: "at-secret".into(),
            refresh_token: refresh.map(SecretString::from),
            token_type: None,
            expires_in: expires_in.map(Duration::from_secs),
        }
    }

    #[test]
    fn keeps_the_previous_refresh_token_unless_a_new_one_arrives() {
        let t0 = SystemTime::UNIX_EPOCH;
        let old = SecretString::from("rt-old");
        let kept = response(None, Some(60)).into_token_set(t0, Duration::from_secs(1), Some(&old));
        assert_eq!(kept.refresh_token.unwrap().expose_secret(), "rt-old");
        let rotated = response(Some("rt-new"), Some(60)).into_token_set(
            t0,
            Duration::from_secs(1),
            Some(&old),
        );
        assert_eq!(rotated.refresh_token.unwrap().expose_secret(), "rt-new");
    }

    #[test]
    fn expiry_counts_from_the_request_and_defaults_when_absent() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let t = response(None, Some(7200)).into_token_set(t0, Duration::from_secs(60), None);
        assert_eq!(t.expires_at, t0 + Duration::from_secs(7200));
        assert_eq!(t.token_type, "Bearer");
        assert_eq!(t.lifetime(), Duration::from_secs(7200));
        let d = response(None, None).into_token_set(t0, Duration::from_secs(60), None);
        assert_eq!(d.expires_at, t0 + Duration::from_secs(60));
        assert_eq!(d.remaining(t0 + Duration::from_secs(90)), Duration::ZERO);
    }

    #[test]
    fn rfc7636_appendix_b_example() {
        assert_eq!(
            s256_challenge("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
    }

    #[test]
    fn generated_pkce_is_43_url_safe_chars_and_matches_its_challenge() {
        let a = Pkce::generate();
        let b = Pkce::generate();
        let v = a.verifier.expose_secret();
        assert_eq!(v.len(), 43);
        assert!(
            v.bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
        );
        assert_eq!(a.challenge, s256_challenge(v));
        assert_ne!(v, b.verifier.expose_secret());
        assert_eq!(random_token().len(), 43);
    }

    #[test]
    fn edgetag_success_without_token_type() {
        let r = parse(
            200,
            r#"{"access_token":"a","refresh_token":"r","expires_in":7200}"#,
        )
        .unwrap();
        assert_eq!(r.access_token.expose_secret(), "a");
        assert_eq!(r.refresh_token.unwrap().expose_secret(), "r");
        assert_eq!(r.token_type, None);
        assert_eq!(r.expires_in, Some(Duration::from_secs(7200)));
    }

    #[test]
    fn standard_fields_and_string_expires_in_are_accepted() {
        let r = parse(
            200,
            r#"{"access_token":"a","token_type":"Bearer","scope":"full","id_token":"x","expires_in":"60"}"#,
        )
        .unwrap();
        assert_eq!(r.token_type.as_deref(), Some("Bearer"));
        assert_eq!(r.expires_in, Some(Duration::from_secs(60)));
        assert!(r.refresh_token.is_none());
        assert_eq!(
            parse(200, r#"{"access_token":"a"}"#).unwrap().expires_in,
            None
        );
    }

    #[test]
    fn unusable_success_bodies_are_malformed() {
        for body in [
            "",
            "<html>oops</html>",
            "{\"access_token\": ",
            "[]",
            r#"{"expires_in":5}"#,
            r#"{"access_token":""}"#,
            r#"{"access_token":"a","expires_in":-1}"#,
            r#"{"access_token":"a","expires_in":"soon"}"#,
            r#"{"access_token":"a","expires_in":0}"#,
            r#"{"error":"server_error"}"#,
        ] {
            assert!(
                matches!(parse(200, body), Err(UpstreamError::Malformed(_))),
                "{body:?}"
            );
        }
    }

    #[test]
    fn errors_are_classified_without_echoing_the_body() {
        assert_eq!(
            parse(400, r#"{"error":"invalid_grant"}"#).err(),
            Some(UpstreamError::InvalidGrant)
        );
        assert_eq!(
            parse(200, r#"{"error":"invalid_grant"}"#).err(),
            Some(UpstreamError::InvalidGrant)
        );
        assert_eq!(
            parse(401, "").err(),
            Some(UpstreamError::InvalidClient { status: 401 })
        );
        assert_eq!(
            parse(401, r#"{"error":"invalid_grant"}"#).err(),
            Some(UpstreamError::InvalidGrant),
            "a 401 that names the grant is about the grant"
        );
        assert_eq!(
            parse(401, r#"{"error":"invalid_request"}"#).err(),
            Some(UpstreamError::InvalidClient { status: 401 })
        );
        assert_eq!(
            parse(400, r#"{"error":"invalid_client"}"#).err(),
            Some(UpstreamError::InvalidClient { status: 400 })
        );
        assert_eq!(
            parse(400, r#"{"error":"secret-abc"}"#).err(),
            Some(UpstreamError::Rejected {
                status: 400,
                error: "unrecognised error"
            })
        );
        let e = parse(403, "<html>secret-abc</html>").unwrap_err();
        assert!(!e.to_string().contains("secret-abc"));
        for status in [500, 502, 503, 408, 429] {
            let e = parse(status, "<html>down</html>").unwrap_err();
            assert!(e.is_transient(), "{status}");
        }
    }

    #[test]
    fn retry_after_is_read_and_capped() {
        let e = parse_token_response(StatusCode::TOO_MANY_REQUESTS, Some("7"), b"").unwrap_err();
        assert_eq!(e.retry_after(), Some(Duration::from_secs(7)));
        let e =
            parse_token_response(StatusCode::SERVICE_UNAVAILABLE, Some("999999"), b"").unwrap_err();
        assert_eq!(e.retry_after(), Some(Duration::from_secs(3600)));
    }

    #[test]
    fn debug_output_redacts_tokens() {
        let r = parse(
            200,
            r#"{"access_token":"at-secret","refresh_token":"rt-secret"}"#,
        )
        .unwrap();
        let s = format!("{r:?}");
        assert!(!s.contains("at-secret") && !s.contains("rt-secret"), "{s}");
    }
}
