//! A tower layer that puts a [`TokenSource`]'s token on outgoing HTTP requests.

use std::task::{Context, Poll};

use futures::future::BoxFuture;
use tower::{BoxError, Layer, Service};

use crate::TokenSource;

/// The header EdgeTag's API reads the team from.
pub const TEAM_ID_HEADER: &str = "team-id";

/// Sets `Authorization: <token_type> <access_token>` on every request, from a [`TokenSource`]
/// (from memory, so it adds no round trip), and `Team-Id: <team id>` once the service knows the
/// account's EdgeTag team (EdgeTag's API wants both). Wrap the HTTP client that calls EdgeTag's
/// API.
///
/// A request for which there is no token fails with the source's [`Error`](crate::Error) (boxed)
/// and is not sent.
#[derive(Clone, Debug)]
pub struct AuthorizationLayer {
    source: TokenSource,
}

impl AuthorizationLayer {
    /// Authorizes requests with `source`'s tokens.
    pub fn new(source: TokenSource) -> Self {
        Self { source }
    }
}

impl<S> Layer<S> for AuthorizationLayer {
    type Service = Authorization<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Authorization {
            inner,
            source: self.source.clone(),
        }
    }
}

/// The service [`AuthorizationLayer`] makes.
#[derive(Clone, Debug)]
pub struct Authorization<S> {
    inner: S,
    source: TokenSource,
}

impl<S, B> Service<http::Request<B>> for Authorization<S>
where
    S: Service<http::Request<B>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<S::Response, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        // The clone that was made ready goes with this request; a fresh clone waits for the next.
        let fresh = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, fresh);
        let source = self.source.clone();
        Box::pin(async move {
            let token = source.token().await?;
            let headers = request.headers_mut();
            headers.insert(http::header::AUTHORIZATION, token.authorization()?);
            // While the team is not known, a `Team-Id` the caller set itself goes as it is.
            if let Some(team_id) = token.team_id() {
                headers.insert(TEAM_ID_HEADER, http::HeaderValue::from_str(team_id)?);
            }
            inner.call(request).await.map_err(Into::into)
        })
    }
}
