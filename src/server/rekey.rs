//! SIGHUP takes up new encryption key files ([`Broker::reload_keys`]): new records are sealed with
//! the new key at once, and `credctl reseal` re-seals the older ones while the service serves.

use std::future::Future;

use crate::broker::Broker;

/// Reloads the encryption keys on each SIGHUP, for as long as the server runs. The handler is
/// installed when this is called, not when the future first runs, so that a SIGHUP sent once the
/// service serves is never the signal's default action (the end of the process).
pub(super) fn reload_keys_on_sighup(broker: Broker) -> impl Future<Output = ()> + Send {
    #[cfg(unix)]
    let hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
    async move {
        #[cfg(unix)]
        match hangups {
            Ok(mut hangups) => {
                while hangups.recv().await.is_some() {
                    // Logged by the broker, success or failure; a failure keeps the keys in force.
                    let _ = broker.reload_keys().await;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP; new encryption key files need a restart")
            }
        }
        #[cfg(not(unix))]
        drop(broker);
    }
}
