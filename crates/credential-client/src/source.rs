//! One account's tokens: the latest in memory, kept current by a background task that follows
//! the account's WatchToken stream (or polls GetToken where the service has no WatchToken).

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use secrecy::SecretString;
use tokio::sync::watch;
use tonic::{Code, Status};

use crate::{
    ClockFn, Error, Grpc, Settings, Token,
    proto::{GetTokenRequest, WatchTokenRequest},
};

/// What the background task last learned.
#[derive(Clone, Default)]
struct State {
    /// The newest token the service sent; dropped when the account is gone or needs
    /// re-authorization.
    token: Option<Token>,
    /// Why the latest attempt to reach the service failed; cleared by the next token.
    error: Option<Error>,
}

/// Tokens for one account, from memory.
///
/// Made by [`Client::token_source`](crate::Client::token_source). A background task follows the
/// account at the service and keeps the latest token here; cloning shares it. Dropping the last
/// clone stops the task and closes the stream.
#[derive(Clone)]
pub struct TokenSource {
    inner: Arc<Inner>,
}

struct Inner {
    account: String,
    state: watch::Receiver<State>,
    min_validity: Duration,
    clock: ClockFn,
}

impl std::fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSource")
            .field("account", &self.inner.account)
            .field("min_validity", &self.inner.min_validity)
            .finish_non_exhaustive()
    }
}

impl TokenSource {
    pub(crate) fn start(grpc: Grpc, account: String, settings: Settings) -> Self {
        let (tx, rx) = watch::channel(State::default());
        tokio::spawn(follow(grpc, account.clone(), settings.clone(), tx));
        Self {
            inner: Arc::new(Inner {
                account,
                state: rx,
                min_validity: settings.min_validity,
                clock: settings.clock,
            }),
        }
    }

    /// The account this source follows.
    pub fn account(&self) -> &str {
        &self.inner.account
    }

    /// Why the latest attempt to reach the service failed, while that is the case: `None` once a
    /// stream is open (or a poll succeeded) again. For health checks and metrics: a source can be
    /// degraded (reconnecting) and still hand out its cached token.
    pub fn last_error(&self) -> Option<Error> {
        self.inner.state.borrow().error.clone()
    }

    /// The latest token, valid for at least `min_validity` from now.
    ///
    /// Answers from memory (well under a microsecond); only the very first calls wait, until the
    /// service has answered once. While the service is unreachable it hands out the last token
    /// for as long as that covers `min_validity`, then fails with the reason the service could
    /// not be reached. It never hands out a token that would expire within `min_validity`.
    pub async fn token(&self) -> Result<Token, Error> {
        if let Some(answer) = self.answer(&self.inner.state.borrow()) {
            return answer;
        }
        let mut state = self.inner.state.clone();
        loop {
            if let Some(answer) = self.answer(&state.borrow_and_update()) {
                return answer;
            }
            if state.changed().await.is_err() {
                return Err(Error::Unavailable {
                    account: self.inner.account.clone(),
                    code: Code::Internal,
                    message: "the token source's background task ended".into(),
                });
            }
        }
    }

    /// The answer `state` allows now; `None` before the service's first answer.
    fn answer(&self, state: &State) -> Option<Result<Token, Error>> {
        let now = (self.inner.clock)();
        match (&state.token, &state.error) {
            (Some(token), _) if token.covers(now, self.inner.min_validity) => {
                Some(Ok(token.clone()))
            }
            (_, Some(error)) => Some(Err(error.clone())),
            (Some(_), None) => Some(Err(Error::Unavailable {
                account: self.inner.account.clone(),
                code: Code::Unavailable,
                message: format!(
                    "the latest token expires within min_validity ({:?}) and no newer one has come",
                    self.inner.min_validity
                ),
            })),
            (None, None) => None,
        }
    }
}

/// The background task: follows the account until every [`TokenSource`] handle is gone.
async fn follow(mut grpc: Grpc, account: String, settings: Settings, tx: watch::Sender<State>) {
    let mut backoff = Backoff::new(&settings);
    loop {
        let ended = tokio::select! {
            () = tx.closed() => return,
            status = session(&mut grpc, &account, &settings, &tx, &mut backoff) => status,
        };
        let error = Error::from_status(&account, &ended);
        let pause = backoff.next();
        tracing::warn!(
            account,
            code = ?ended.code(),
            message = ended.message(),
            retry_in = ?pause,
            "lost the credential service's token stream"
        );
        // The account is gone or its grant rejected: its last token is no longer to be used.
        let revoked = matches!(
            error,
            Error::UnknownAccount { .. } | Error::NeedsReauthorization { .. }
        );
        tx.send_modify(|state| {
            if revoked {
                state.token = None;
            }
            state.error = Some(error);
        });
        tokio::select! {
            () = tx.closed() => return,
            () = tokio::time::sleep(pause) => {}
        }
    }
}

/// One connection's worth of following: a WatchToken stream, or GetToken polling where the
/// service has no WatchToken. Returns the status that ended it.
async fn session(
    grpc: &mut Grpc,
    account: &str,
    settings: &Settings,
    tx: &watch::Sender<State>,
    backoff: &mut Backoff,
) -> Status {
    let min_validity = prost_types::Duration::try_from(settings.min_validity).ok();
    let request = WatchTokenRequest {
        account: account.to_owned(),
        min_validity,
    };
    let mut stream = match grpc.watch_token(request).await {
        Ok(response) => response.into_inner(),
        Err(status) if status.code() == Code::Unimplemented => {
            tracing::info!(
                account,
                "the credential service has no WatchToken; polling GetToken"
            );
            return poll(grpc, account, settings, tx, backoff).await;
        }
        Err(status) => return status,
    };
    loop {
        match stream.message().await {
            Ok(Some(message)) => {
                let Some(token) =
                    token(message.access_token, message.token_type, message.expires_at)
                else {
                    return Status::internal("the service sent a token without an expiry");
                };
                publish(tx, token);
                backoff.reset();
            }
            Ok(None) => return Status::unavailable("the WatchToken stream ended without a status"),
            Err(status) => return status,
        }
    }
}

/// GetToken, again each time three quarters of the token's useful life (beyond `min_validity`)
/// have passed: the service refreshes once a token nears its margin, so a few calls per token
/// lifetime find the new one well before the old one stops covering `min_validity`.
async fn poll(
    grpc: &mut Grpc,
    account: &str,
    settings: &Settings,
    tx: &watch::Sender<State>,
    backoff: &mut Backoff,
) -> Status {
    loop {
        let request = GetTokenRequest {
            account: account.to_owned(),
            min_validity: prost_types::Duration::try_from(settings.min_validity).ok(),
        };
        let message = match grpc.get_token(request).await {
            Ok(response) => response.into_inner(),
            Err(status) => return status,
        };
        let Some(token) = token(message.access_token, message.token_type, message.expires_at)
        else {
            return Status::internal("the service sent a token without an expiry");
        };
        let expires_at = token.expires_at();
        publish(tx, token);
        backoff.reset();
        let useful = expires_at
            .duration_since((settings.clock)() + settings.min_validity)
            .unwrap_or_default();
        // Randomized so that callers that started together do not keep asking together.
        let wait = useful.mul_f64(0.75 * (0.9 + 0.1 * rand::random::<f64>()));
        tokio::time::sleep(wait.max(Duration::from_secs(1))).await;
    }
}

fn token(
    access_token: String,
    token_type: String,
    expires_at: Option<prost_types::Timestamp>,
) -> Option<Token> {
    let expires_at = SystemTime::try_from(expires_at?).ok()?;
    Some(Token::new(
        SecretString::from(access_token),
        token_type,
        expires_at,
    ))
}

fn publish(tx: &watch::Sender<State>, token: Token) {
    tx.send_modify(|state| {
        state.token = Some(token);
        state.error = None;
    });
}

/// Jittered exponential back-off between reconnection attempts.
struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    fn new(settings: &Settings) -> Self {
        Self {
            initial: settings.backoff_initial,
            max: settings.backoff_max,
            next: settings.backoff_initial,
        }
    }

    /// The next pause: the current step, less a random part of up to half ("equal jitter").
    fn next(&mut self) -> Duration {
        let step = self.next;
        self.next = (step * 2).min(self.max);
        step / 2 + (step / 2).mul_f64(rand::random::<f64>())
    }

    fn reset(&mut self) {
        self.next = self.initial;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_max_with_jitter_and_resets() {
        let settings = Settings {
            min_validity: Duration::ZERO,
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_millis(400),
            clock: Arc::new(SystemTime::now),
        };
        let mut backoff = Backoff::new(&settings);
        let steps = [100, 200, 400, 400];
        for ms in steps {
            let pause = backoff.next();
            let step = Duration::from_millis(ms);
            assert!(pause >= step / 2 && pause <= step, "{pause:?} for {step:?}");
        }
        backoff.reset();
        assert!(backoff.next() <= Duration::from_millis(100));
    }
}
