//! Coherence between replicas: every account write notifies [`CHANNEL`] with the version and the
//! account (nothing secret); each replica `LISTEN`s on a connection of its own ([`listen`]) and
//! forwards what it hears as [`Change`]s, with a full resync after every reconnect and every
//! [`RESYNC_EVERY`].

use std::{sync::Arc, time::Duration};

use futures::StreamExt;
use tokio::sync::{broadcast, mpsc};
use tokio_postgres::AsyncMessage;
use tokio_util::task::AbortOnDropHandle;

use super::{
    config::{Connector, OPERATION_TIMEOUT, STATEMENT_TIMEOUT},
    pool::Database,
    reach::with_causes,
};
use crate::{
    account::AccountId,
    store::{Change, Version},
};

/// The channel account writes notify on.
pub(super) const CHANNEL: &str = "credential_service";

/// The listener checks its connection this often (so a silent network loss is noticed) and
/// retries a lost one after a pause that grows to the maximum.
const LISTENER_HEARTBEAT: Duration = Duration::from_secs(5);
const LISTENER_RETRY_MAX: Duration = Duration::from_secs(2);

/// The full resync that catches anything a notification missed.
const RESYNC_EVERY: Duration = Duration::from_secs(300);

/// Follows other replicas' writes: LISTEN on a connection of its own, forwarding each
/// notification; a full resync after every reconnect and every [`RESYNC_EVERY`].
pub(super) async fn listen(
    connector: Connector,
    session: tokio_postgres::Config,
    db: Arc<Database>,
    changes: broadcast::Sender<Change>,
    ready: tokio::sync::oneshot::Sender<()>,
) {
    let mut first = true;
    let mut ready = Some(ready);
    let mut pause = Duration::from_millis(100);
    loop {
        match listen_once(&connector, &session, &db, &changes, first, &mut ready).await {
            Ok(()) => return, // nobody follows any more
            Err(why) => {
                db.reach.lost(&why);
                tracing::debug!(error = why, "the change listener lost its connection");
            }
        }
        first = false;
        ready = None; // the reconnect resyncs in full: nothing to wait for
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(LISTENER_RETRY_MAX);
    }
}

async fn listen_once(
    connector: &Connector,
    session: &tokio_postgres::Config,
    db: &Database,
    changes: &broadcast::Sender<Change>,
    first: bool,
    ready: &mut Option<tokio::sync::oneshot::Sender<()>>,
) -> Result<(), String> {
    let (client, mut messages) = connector
        .connect(session)
        .await
        .map_err(|e| with_causes(&e))?;
    let (tx, mut notifications) = mpsc::unbounded_channel();
    let _pump = AbortOnDropHandle::new(tokio::spawn(async move {
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(n)) => {
                    if tx.send(n.payload().to_owned()).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "the change listener's connection failed");
                    return;
                }
            }
        }
    }));
    tokio::time::timeout(
        OPERATION_TIMEOUT,
        client.batch_execute(&format!("LISTEN {CHANNEL}")),
    )
    .await
    .map_err(|_| "LISTEN timed out".to_owned())?
    .map_err(|e| e.to_string())?;
    db.reach.answered();
    if let Some(ready) = ready.take() {
        let _ = ready.send(());
    }
    // Whatever happened while no one listened is unknown: reload everything.
    if !first && changes.send(Change::Resync).is_err() {
        return Ok(());
    }
    let mut heartbeat = tokio::time::interval(LISTENER_HEARTBEAT);
    let mut resync = tokio::time::interval(RESYNC_EVERY);
    resync.reset();
    loop {
        let change = tokio::select! {
            payload = notifications.recv() => match payload {
                Some(payload) => match parse_notification(&payload) {
                    Some(change) => change,
                    None => {
                        tracing::warn!(payload, "ignoring a notification this version does not understand");
                        continue;
                    }
                },
                None => return Err("the change listener's connection closed".into()),
            },
            _ = heartbeat.tick() => {
                tokio::time::timeout(STATEMENT_TIMEOUT, client.simple_query(""))
                    .await
                    .map_err(|_| "the change listener's connection stopped answering".to_owned())?
                    .map_err(|e| e.to_string())?;
                db.reach.answered();
                continue;
            }
            _ = resync.tick() => Change::Resync,
        };
        if changes.send(change).is_err() {
            return Ok(());
        }
    }
}

/// `"<version> <account>"`; version 0 means removed.
pub(super) fn notification(version: Option<Version>, account: &AccountId) -> String {
    format!("{} {account}", version.unwrap_or(0))
}

/// [`Change::Recovered`]'s payload: no space, so a binary that predates it ignores it (with a
/// warning) rather than misreading it.
pub(super) const RECOVERED: &str = "recovered";

fn parse_notification(payload: &str) -> Option<Change> {
    if payload == RECOVERED {
        return Some(Change::Recovered);
    }
    let (version, account) = payload.split_once(' ')?;
    let version: Version = version.parse().ok()?;
    Some(Change::Account {
        account: AccountId::parse(account).ok()?,
        version: (version > 0).then_some(version),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifications_round_trip_and_odd_ones_are_ignored() {
        let acme = AccountId::parse("acme").unwrap();
        assert_eq!(
            parse_notification(&notification(Some(7), &acme)),
            Some(Change::Account {
                account: acme.clone(),
                version: Some(7)
            })
        );
        assert_eq!(
            parse_notification(&notification(None, &acme)),
            Some(Change::Account {
                account: acme,
                version: None
            })
        );
        assert_eq!(parse_notification("seven acme"), None);
        assert_eq!(parse_notification("7"), None);
    }
}
