//! The browser callback: the page EdgeTag redirects to after a person approves (served on
//! `--callback-listen` at `--callback-path`). It completes the authorization from the `code` and
//! `state` on the address and says, in a small HTML page, which account is now connected or what
//! went wrong and what to do. With it, BeginAuth → open the URL → approve is the whole flow.
//!
//! Everything rendered is HTML-escaped and capped; the code and the tokens are never rendered or
//! logged, and the page is neither cached nor sent as a referrer.

use std::net::{IpAddr, SocketAddr};

use axum::{
    Router,
    extract::{ConnectInfo, RawQuery, Request, State},
    http::{HeaderName, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};

use crate::{broker::Broker, error::Error, tokens::TokenSet};

/// Longest provider `error` rendered; longer ones are cut.
const MAX_ERROR_CHARS: usize = 64;
/// Longest provider `error_description` rendered.
const MAX_DESCRIPTION_CHARS: usize = 300;

/// The callback endpoint at `path` (e.g. `/oauth/callback`).
pub fn router(broker: Broker, path: &str) -> Router {
    Router::new().route(path, get(callback)).with_state(broker)
}

/// The query parameters EdgeTag may put on the redirect; anything else is ignored.
#[derive(Default)]
struct Redirect {
    code: Option<String>,
    state: Option<String>,
    error: Option<String>,
    error_description: Option<String>,
}

impl Redirect {
    fn parse(query: &str) -> Self {
        let mut r = Self::default();
        for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
            let slot = match &*k {
                "code" => &mut r.code,
                "state" => &mut r.state,
                "error" => &mut r.error,
                "error_description" => &mut r.error_description,
                _ => continue,
            };
            slot.get_or_insert_with(|| v.into_owned());
        }
        r
    }
}

/// How the audit trail names the browser callback (the person in the browser is not a gRPC caller).
const CALLER: &str = "browser-callback";

/// Counts a request that connected nothing; anyone can send those, so they are aggregated per
/// peer (see [`crate::audit`]) rather than logged one line each.
fn refused(outcome: tonic::Code, peer: Option<IpAddr>) {
    crate::audit::count("CompleteAuth", CALLER, "", outcome, peer);
}

#[tracing::instrument(name = "callback", skip_all, fields(account = tracing::field::Empty))]
async fn callback(
    State(broker): State<Broker>,
    RawQuery(query): RawQuery,
    request: Request,
) -> Response {
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| addr.ip());
    let redirect = Redirect::parse(query.as_deref().unwrap_or(""));
    if let Some(error) = &redirect.error {
        let error = cap(error, MAX_ERROR_CHARS);
        // Anyone can put text here: quoted and escaped (`Debug`), so that it reads as one value
        // to a logfmt parser whatever it holds (spaces, `=`, quotes, U+2028).
        tracing::debug!(error = ?error, "EdgeTag redirected with an error");
        refused(tonic::Code::PermissionDenied, peer);
        let mut lines = vec![format!("EdgeTag answered: {error}")];
        if let Some(d) = &redirect.error_description {
            lines.push(cap(d, MAX_DESCRIPTION_CHARS));
        }
        lines.push(
            "No account was connected. If access was denied by mistake, start again: run \
             `credctl begin ACCOUNT` (or call BeginAuth) and open the new link."
                .to_owned(),
        );
        return page(
            StatusCode::BAD_REQUEST,
            false,
            "Access was not granted",
            &lines,
        );
    }
    let (Some(code), Some(state)) = (&redirect.code, &redirect.state) else {
        refused(tonic::Code::InvalidArgument, peer);
        return page(
            StatusCode::BAD_REQUEST,
            false,
            "This address is incomplete",
            &[
                "This page is where EdgeTag sends the browser after approval, with a code and a \
               state on the address. Open the link from `credctl begin ACCOUNT` (or BeginAuth) \
               instead."
                    .to_owned(),
            ],
        );
    };
    if crate::audit::refusing() {
        refused(tonic::Code::Unavailable, peer);
        return page(
            StatusCode::SERVICE_UNAVAILABLE,
            false,
            "Not connected yet: try again shortly",
            &[
                "The service cannot write its audit trail right now, and refuses to connect \
                 accounts until it can. Reload this page in a minute; the approval stays valid \
                 until its code expires."
                    .to_owned(),
            ],
        );
    }
    match broker.complete(code, state).await {
        Ok((account, tokens)) => {
            crate::audit::record("CompleteAuth", CALLER, account.as_str(), tonic::Code::Ok);
            connected(account.as_str(), &tokens)
        }
        Err(e) => {
            refused(e.code(), peer);
            failed(e)
        }
    }
}

fn connected(account: &str, tokens: &TokenSet) -> Response {
    tracing::info!("account connected through the browser callback");
    page(
        StatusCode::OK,
        true,
        &format!("Connected account {account}"),
        &[
            format!(
                "credential-service now holds EdgeTag access for account {account} and keeps its \
                 token fresh; the current one expires at {}.",
                humantime::format_rfc3339_seconds(tokens.expires_at)
            ),
            "You can close this window.".to_owned(),
        ],
    )
}

/// Every way CompleteAuth fails, told to the person in the browser. Exhaustive, so a new error
/// variant forces a decision here too.
fn failed(e: Error) -> Response {
    let start_again = "Start again: run `credctl begin ACCOUNT` (or call BeginAuth) and open the \
                       new link.";
    let (status, title, advice): (StatusCode, &str, &str) = match &e {
        Error::UnknownState => (
            StatusCode::BAD_REQUEST,
            "This link has expired or was already used",
            "If you just connected the account, it stays connected (reloading this page shows \
             this message). Otherwise the approval took too long or the link was used twice.",
        ),
        Error::InvalidArgument(_) | Error::InvalidAccount(_) => (
            StatusCode::BAD_REQUEST,
            "This address is malformed",
            "The code or state on it is empty or too long.",
        ),
        Error::CodeRejected(_) => (
            StatusCode::BAD_REQUEST,
            "EdgeTag rejected the authorization",
            "The authorization code was refused (expired, or already used).",
        ),
        Error::ProviderUnavailable(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "EdgeTag could not be reached",
            "Nothing is lost: reload this page in a minute to try again, while the link is valid.",
        ),
        Error::StoreUnavailable => (
            StatusCode::SERVICE_UNAVAILABLE,
            "The service's database could not be reached",
            "Reload this page in a minute to try again, while the link is valid.",
        ),
        Error::Store(cause) if cause.is_unavailable() => (
            StatusCode::SERVICE_UNAVAILABLE,
            "The service's database could not be reached",
            "Reload this page in a minute to try again, while the link is valid.",
        ),
        Error::GrantNotStored { account, cause } => {
            tracing::error!(account = %account, error = %cause, "browser callback: a granted token set could not be stored");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "The service could not keep the connection",
                "EdgeTag approved it, but the service's database did not store it, and an approval \
                 cannot be used twice; reloading this page will not help.",
            )
        }
        Error::ClientCredentialsRejected => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "The service's EdgeTag credentials were rejected",
            "An operator must check the configured client id and client secret; then reload this \
             page.",
        ),
        // (KeysNotLoaded: only a re-seal meets it, never CompleteAuth.)
        Error::Store(_)
        | Error::Internal(_)
        | Error::KeysNotLoaded(_)
        | Error::UnknownAccount(_)
        | Error::NeedsReauth(_)
        | Error::TokenExpired { .. }
        | Error::UpstreamBusy(_)
        | Error::ValidityNotReached(_)
        | Error::MinValidityTooLong { .. }
        | Error::AlreadyConnected(_)
        | Error::ImportedGrantRejected { .. }
        | Error::NotEveryAccount { .. } => {
            tracing::error!(error = %e, "browser callback failed");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "Something went wrong inside the service",
                "The service's log has the cause.",
            )
        }
    };
    if status != StatusCode::INTERNAL_SERVER_ERROR {
        // DEBUG: anyone can cause this; the aggregated audit event counts it.
        tracing::debug!(error = %e, "browser callback did not connect an account");
    }
    let mut lines = vec![advice.to_owned()];
    if matches!(
        e,
        Error::UnknownState
            | Error::InvalidArgument(_)
            | Error::InvalidAccount(_)
            | Error::CodeRejected(_)
            | Error::GrantNotStored { .. }
            | Error::Store(_)
            | Error::Internal(_)
    ) {
        lines.push(start_again.to_owned());
    }
    page(status, false, title, &lines)
}

/// The whole page; every piece of text is escaped here, once.
fn page(status: StatusCode, ok: bool, title: &str, paragraphs: &[String]) -> Response {
    let title = html_escape(title);
    let body: String = paragraphs
        .iter()
        .map(|p| format!("<p>{}</p>\n", html_escape(p)))
        .collect();
    let class = if ok { "ok" } else { "err" };
    let html = format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{title} · credential-service</title>\n<style>body{{font-family:system-ui,sans-serif;\
         max-width:38rem;margin:4rem auto;padding:0 1rem;line-height:1.5;color:#222}}\
         h1{{font-size:1.4rem}}.ok{{color:#106b2d}}.err{{color:#a31b1b}}</style></head>\n\
         <body><h1 class=\"{class}\">{title}</h1>\n{body}</body></html>\n"
    );
    (
        status,
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'",
            ),
        ]
        .map(|(k, v): (HeaderName, &'static str)| (k, HeaderValue::from_static(v))),
        html,
    )
        .into_response()
}

/// At most `max` characters, control and invisible format characters dropped (provider text is
/// untrusted, and bidi overrides such as U+202E would make the page say something else).
fn cap(s: &str, max: usize) -> String {
    let shown = || {
        s.chars()
            .filter(|&c| !c.is_control() && !is_invisible_format(c))
    };
    let mut out: String = shown().take(max).collect();
    if shown().nth(max).is_some() {
        out.push('…');
    }
    out
}

/// Unicode's bidi controls and the other invisible format characters (general category Cf, the
/// ones browsers render as nothing or use to reorder text): U+00AD, U+061C, U+180E, U+200B–U+200F,
/// U+202A–U+202E, U+2060–U+206F, U+FEFF, U+FFF9–U+FFFB and the tag characters U+E0000–U+E007F.
fn is_invisible_format(c: char) -> bool {
    matches!(
        c,
        '\u{00AD}'
            | '\u{061C}'
            | '\u{180E}'
            | '\u{200B}'..='\u{200F}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{206F}'
            | '\u{FEFF}'
            | '\u{FFF9}'..='\u{FFFB}'
            | '\u{E0000}'..='\u{E007F}'
    )
}

/// Escapes the five characters that matter in HTML text and attribute values.
pub fn html_escape(s: &str) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provider_text_is_escaped_capped_and_stripped_of_control_characters() {
        assert_eq!(
            html_escape(r#"<script>alert("x&'y")</script>"#),
            "&lt;script&gt;alert(&quot;x&amp;&#39;y&quot;)&lt;/script&gt;"
        );
        assert_eq!(cap("ab\ncd", 10), "abcd");
        assert_eq!(cap(&"x".repeat(100), 64).chars().count(), 65);
        assert_eq!(cap("short", 64), "short");
        assert_eq!(
            cap("a\u{202E}b\u{2066}c\u{200B}d\u{FEFF}e\u{E0041}f", 64),
            "abcdef"
        );
    }

    #[test]
    fn provider_errors_are_logged_as_one_quoted_value() {
        let logged = format!("{:?}", cap("x caller=ops-cli\u{2028}y=\"z\"", 64));
        assert_eq!(logged, r#""x caller=ops-cli\u{2028}y=\"z\"""#);
    }

    #[test]
    fn the_first_of_repeated_parameters_counts_and_others_are_ignored() {
        let r = Redirect::parse("code=a&code=b&state=s&foo=bar&error_description=x%20y");
        assert_eq!(r.code.as_deref(), Some("a"));
        assert_eq!(r.state.as_deref(), Some("s"));
        assert_eq!(r.error, None);
        assert_eq!(r.error_description.as_deref(), Some("x y"));
    }
}
