//! Background work for as long as the server runs: the broker's refresh scheduler, the purge of
//! expired pending authorizations, the reloader (SIGHUP, changed files, the certificate's expiry),
//! the audit's periodic flush of its counts and that of the refusal logs, the fetching of the
//! callers file's JWT issuer keys.

use std::{sync::Arc, time::Duration};

use tokio::task::JoinHandle;

use super::{rekey::reload_keys_on_sighup, reload, signals::Hangups};
use crate::{broker::Broker, clock::Clock, config::ServiceConfig, reload::Poller, store::Store};

/// The upkeep tasks; each holds a store handle until [`Upkeep::stop`] has waited for it.
pub(super) struct Upkeep {
    tasks: [JoinHandle<()>; 7],
}

impl Upkeep {
    pub(super) fn spawn(
        config: &ServiceConfig,
        store: &Arc<dyn Store>,
        clock: Clock,
        broker: &Broker,
        hangups: Hangups,
    ) -> Self {
        let poller = Poller::new(reload::reloadables(config));
        Self {
            tasks: [
                tokio::spawn(purge_pending(store.clone(), clock, config.broker.state_ttl)),
                tokio::spawn(broker.clone().run()),
                tokio::spawn(reload::run(
                    hangups,
                    poller,
                    config.reload_interval,
                    config.tls.clone(),
                )),
                tokio::spawn(crate::audit::run_flusher(config.audit)),
                tokio::spawn(super::limits::run_refusal_log_flusher()),
                tokio::spawn(reload_keys_on_sighup(broker.clone())),
                tokio::spawn(config.callers.clone().fetch_issuer_keys()),
            ],
        }
    }

    /// Ends every task and waits until each has dropped its store handle.
    pub(super) async fn stop(self) {
        for task in self.tasks {
            task.abort();
            let _ = task.await;
        }
    }
}

/// Deletes expired pending authorizations now and then; they could never complete anyway.
async fn purge_pending(store: Arc<dyn Store>, clock: Clock, state_ttl: Duration) {
    let period = state_ttl.clamp(Duration::from_secs(1), Duration::from_secs(60));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match store.purge_expired_pending(clock.now()).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(purged = n, "expired pending authorizations removed"),
            Err(e) => tracing::warn!(error = %e, "purging expired pending authorizations failed"),
        }
    }
}
