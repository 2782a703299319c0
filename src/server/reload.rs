//! The reloader: takes up new content of the files read at start (the callers file, the TLS
//! certificate, key and client CA, the client secret file) on SIGHUP at once, and between SIGHUPs
//! whenever their content changes (checked every `--reload-interval`, see [`crate::reload`]); and
//! checks the served certificate's expiry once a day. SIGHUP also reopens the audit file.

use std::{sync::Arc, time::Duration};

use tokio::time::MissedTickBehavior;

use super::signals::Hangups;
use crate::{
    config::ServiceConfig,
    reload::{Outcome, Poller, Reloadable, reload_now},
    tls::ServerTls,
};

/// How often the served certificate's expiry is checked after the check at start.
const EXPIRY_CHECK_EVERY: Duration = Duration::from_secs(24 * 3600);

/// The files the reloader watches.
pub(super) fn reloadables(config: &ServiceConfig) -> Vec<Arc<dyn Reloadable>> {
    [
        config.callers.reloadable(),
        config.tls.as_ref().map(ServerTls::reloadable),
        config.provider.client_secret.reloadable(),
    ]
    .into_iter()
    .flatten()
    .collect()
}

/// Runs for as long as the server does.
pub(super) async fn run(
    mut hangups: Hangups,
    poller: Poller,
    interval: Duration,
    tls: Option<ServerTls>,
) {
    let mut poller = Some(poller);
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    tick.tick().await; // the first tick is immediate; start has just read every file
    let mut daily = tokio::time::interval(EXPIRY_CHECK_EVERY);
    daily.tick().await; // start checked it
    loop {
        let hangup = tokio::select! {
            () = hangups.recv() => true,
            _ = tick.tick() => false,
            _ = daily.tick() => {
                if let Some(tls) = &tls {
                    tls.check_expiry(std::time::SystemTime::now());
                }
                continue;
            }
        };
        if hangup {
            // Log rotation: the audit file is opened again at its path.
            let _ = tokio::task::spawn_blocking(crate::audit::reopen).await;
        }
        if poller.as_ref().is_some_and(Poller::is_empty) {
            if hangup {
                tracing::info!(
                    "SIGHUP: nothing to re-read (no callers file, TLS files or client secret file)"
                );
            }
            continue;
        }
        let Some(mut watching) = poller.take() else {
            return;
        };
        // Files are read and certificates parsed off the runtime's threads.
        let round = tokio::task::spawn_blocking(move || {
            let outcomes = if hangup {
                let outcomes: Vec<Outcome> =
                    watching.items().map(|item| reload_now(&**item)).collect();
                watching.reset();
                outcomes
            } else {
                watching.poll()
            };
            for outcome in &outcomes {
                outcome.log();
            }
            watching
        })
        .await;
        match round {
            Ok(watching) => poller = Some(watching),
            Err(e) => {
                tracing::error!(error = %e, "reloading files failed; they are no longer watched");
                return;
            }
        }
    }
}
