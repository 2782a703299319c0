//! One account's tokens: the latest in memory, kept current by a background task that follows
//! the account's WatchToken stream, or polls GetToken where the service has no WatchToken, where
//! it has no place for another stream, or where streams keep failing while calls get through.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use secrecy::SecretString;
use tokio::{sync::watch, time::Instant};
use tonic::{Code, Status};

use crate::{
    ClockFn, Error, Grpc, Settings, Token,
    proto::{GetTokenRequest, WatchTokenRequest, WatchTokenResponse},
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
async fn follow(grpc: Grpc, account: String, settings: Settings, tx: watch::Sender<State>) {
    let backoff = Backoff::new(&settings);
    let mut follower = Follower {
        grpc,
        account,
        settings,
        backoff,
        unavailable_in_a_row: 0,
        polling: None,
    };
    loop {
        let ended = tokio::select! {
            () = tx.closed() => return,
            status = follower.session(&tx) => status,
        };
        let account = &follower.account;
        let error = Error::from_status(account, &ended);
        let pause = follower.backoff.next();
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

/// What the background task keeps between connections.
struct Follower {
    grpc: Grpc,
    account: String,
    settings: Settings,
    backoff: Backoff,
    /// WatchToken attempts that ended UNAVAILABLE since the last token, counted against
    /// [`Settings::unavailable_attempts`].
    unavailable_in_a_row: u32,
    /// While it polls GetToken instead of watching: when it tries WatchToken again.
    polling: Option<Polling>,
}

/// Polling GetToken in place of a WatchToken stream.
struct Polling {
    /// When to try WatchToken again; `None`: only after a failure (the service has no
    /// WatchToken, and will not have one until it is upgraded, which a failure goes with).
    watch_again: Option<Instant>,
    /// When the token it holds needs asking for again.
    next_poll: Instant,
}

impl Follower {
    /// One connection's worth of following: a WatchToken stream; or GetToken polling where the
    /// service has no WatchToken, where it refuses one (RESOURCE_EXHAUSTED: every place taken),
    /// or where streams keep failing (UNAVAILABLE past the attempts allowed) while GetToken may
    /// still get through; polling tries WatchToken again from time to time. Returns the status
    /// that ended it.
    async fn session(&mut self, tx: &watch::Sender<State>) -> Status {
        loop {
            let watch_now = self
                .polling
                .as_ref()
                .is_none_or(|p| p.watch_again.is_some_and(|at| Instant::now() >= at));
            if watch_now {
                match self.grpc.watch_token(self.watch_request()).await {
                    Ok(response) => {
                        if self.polling.take().is_some() {
                            tracing::info!(account = self.account, "watching the token again");
                        }
                        return self.stream(tx, response.into_inner()).await;
                    }
                    Err(status) => {
                        let code = status.code();
                        if code == Code::Unavailable {
                            self.unavailable_in_a_row += 1;
                        }
                        let watch_again = match code {
                            Code::Unimplemented => None,
                            Code::ResourceExhausted => Some(self.settings.watch_again_after),
                            Code::Unavailable
                                if self.unavailable_in_a_row
                                    >= self.settings.unavailable_attempts =>
                            {
                                Some(self.settings.watch_again_after)
                            }
                            _ => return status,
                        };
                        self.poll_instead(&status, watch_again);
                    }
                }
            }
            if let Err(status) = self.poll(tx).await {
                // GetToken fails too: nothing to do with watching; try that first next time.
                if let Some(polling) = &mut self.polling {
                    polling.watch_again = Some(Instant::now());
                }
                return status;
            }
        }
    }

    fn watch_request(&self) -> WatchTokenRequest {
        WatchTokenRequest {
            account: self.account.clone(),
            min_validity: prost_types::Duration::try_from(self.settings.min_validity).ok(),
        }
    }

    /// Switches to (or stays with) polling after WatchToken failed with `status`; tries
    /// watching again after `watch_again` (never, without a failure, if `None`).
    fn poll_instead(&mut self, status: &Status, watch_again: Option<Duration>) {
        // Randomized so that the callers refused together do not come back together.
        let watch_again =
            watch_again.map(|d| Instant::now() + d.mul_f64(0.75 + 0.5 * rand::random::<f64>()));
        match &mut self.polling {
            Some(polling) => polling.watch_again = watch_again,
            None => {
                let account = &self.account;
                match status.code() {
                    Code::Unimplemented => tracing::info!(
                        account,
                        "the credential service has no WatchToken; polling GetToken"
                    ),
                    code => tracing::warn!(
                        account,
                        code = ?code,
                        message = status.message(),
                        "WatchToken refused; polling GetToken until a watch is possible again"
                    ),
                }
                self.polling = Some(Polling {
                    watch_again,
                    next_poll: Instant::now(),
                });
            }
        }
    }

    /// Follows an open WatchToken stream until it ends; returns the status that ended it.
    async fn stream(
        &mut self,
        tx: &watch::Sender<State>,
        mut stream: tonic::Streaming<WatchTokenResponse>,
    ) -> Status {
        let ended = loop {
            match stream.message().await {
                Ok(Some(message)) => {
                    let Some(token) = token(
                        message.access_token,
                        message.token_type,
                        message.expires_at,
                        message.team_id,
                    ) else {
                        break Status::internal("the service sent a token without an expiry");
                    };
                    publish(tx, token);
                    self.backoff.reset();
                    self.unavailable_in_a_row = 0;
                }
                Ok(None) => {
                    break Status::unavailable("the WatchToken stream ended without a status");
                }
                Err(status) => break status,
            }
        };
        if ended.code() == Code::Unavailable {
            self.unavailable_in_a_row += 1;
        }
        ended
    }

    /// GetToken when the token held is due, then waits until the next one is, or until it is
    /// time to try watching again. The service refreshes once a token nears its margin, so
    /// asking again each time three quarters of the token's useful life (beyond `min_validity`)
    /// have passed finds the new one well before the old one stops covering `min_validity`.
    async fn poll(&mut self, tx: &watch::Sender<State>) -> Result<(), Status> {
        let Some(polling) = &self.polling else {
            return Ok(());
        };
        if Instant::now() >= polling.next_poll {
            let request = GetTokenRequest {
                account: self.account.clone(),
                min_validity: prost_types::Duration::try_from(self.settings.min_validity).ok(),
            };
            let message = self.grpc.get_token(request).await?.into_inner();
            let Some(token) = token(
                message.access_token,
                message.token_type,
                message.expires_at,
                message.team_id,
            ) else {
                return Err(Status::internal(
                    "the service sent a token without an expiry",
                ));
            };
            let expires_at = token.expires_at();
            publish(tx, token);
            self.backoff.reset();
            let useful = expires_at
                .duration_since((self.settings.clock)() + self.settings.min_validity)
                .unwrap_or_default();
            // Randomized so that callers that started together do not keep asking together.
            let wait = useful.mul_f64(0.75 * (0.9 + 0.1 * rand::random::<f64>()));
            if let Some(polling) = &mut self.polling {
                polling.next_poll = Instant::now() + wait.max(Duration::from_secs(1));
            }
        }
        let Some(polling) = &self.polling else {
            return Ok(());
        };
        let until = match polling.watch_again {
            Some(at) => at.min(polling.next_poll),
            None => polling.next_poll,
        };
        tokio::time::sleep_until(until).await;
        Ok(())
    }
}

fn token(
    access_token: String,
    token_type: String,
    expires_at: Option<prost_types::Timestamp>,
    team_id: String,
) -> Option<Token> {
    let expires_at = SystemTime::try_from(expires_at?).ok()?;
    Some(Token::new(SecretString::from(access_token), token_type, expires_at).with_team_id(team_id))
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
            unavailable_attempts: 3,
            watch_again_after: Duration::from_secs(30),
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
