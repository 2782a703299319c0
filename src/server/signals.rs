//! The process signals the server acts on: SIGTERM and ctrl-c end it, SIGHUP reloads the callers file.

use crate::auth::Callers;

/// Resolves on ctrl-c or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}

/// Re-reads the callers file on each SIGHUP, for as long as the server runs.
pub(super) async fn reload_on_sighup(callers: Callers) {
    if callers.is_open() {
        return;
    }
    #[cfg(unix)]
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(mut hangups) => {
            while hangups.recv().await.is_some() {
                callers.reload_and_log();
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; the callers file will not be reloaded")
        }
    }
}
