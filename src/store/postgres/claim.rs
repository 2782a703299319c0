//! A refresh claim on PostgreSQL ([`PgClaim`]): the account's row lock, held in an open
//! transaction until the claim commits the next version, shares a back-off, or is dropped (which
//! rolls back).

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use deadpool_postgres::Object;
use tokio_postgres::types::ToSql;

use super::{
    config::STATEMENT_TIMEOUT,
    notify::CHANNEL,
    pool::Database,
    sql::{PUT_NEXT, to_db},
};
use crate::{
    account::AccountId,
    store::{Backoff, RefreshClaim, StoreError, Version},
    tokens::AccountRecord,
};

/// A connection inside an open transaction; dropped with it still inside, it rolls back (or,
/// failing that, closes the session, which releases every lock it held).
pub(super) struct ClaimHolder(pub(super) Option<Object>);

impl Drop for ClaimHolder {
    fn drop(&mut self) {
        if let Some(client) = self.0.take() {
            release(client);
        }
    }
}

fn release(client: Object) {
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => {
            runtime.spawn(async move {
                let rolled_back =
                    tokio::time::timeout(STATEMENT_TIMEOUT, client.batch_execute("ROLLBACK")).await;
                if !matches!(rolled_back, Ok(Ok(()))) {
                    drop(Object::take(client));
                }
            });
        }
        Err(_) => drop(Object::take(client)),
    }
}

/// The row lock on one account, held in an open transaction until commit, failure or drop.
pub(super) struct PgClaim {
    pub(super) client: Option<Object>,
    pub(super) db: Arc<Database>,
    pub(super) account: AccountId,
    pub(super) version: Version,
}

impl Drop for PgClaim {
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            release(client);
        }
    }
}

impl PgClaim {
    /// Runs `statement` and COMMIT in the claim's transaction; the connection goes back to the
    /// pool only after a clean commit.
    async fn finish(
        &mut self,
        statement: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<usize, StoreError> {
        let db = self.db.clone();
        let client = self.client.as_ref().expect("a claim finishes once");
        let done = db
            .bounded(Duration::ZERO, async {
                let pg = |e: tokio_postgres::Error| db.pg(&e);
                let statement = client.prepare_cached(statement).await.map_err(pg)?;
                let rows = client.query(&statement, params).await.map_err(pg)?;
                client.batch_execute("COMMIT").await.map_err(pg)?;
                Ok(rows.len())
            })
            .await?;
        drop(self.client.take()); // committed: clean, back to the pool
        Ok(done)
    }
}

#[async_trait]
impl RefreshClaim for PgClaim {
    fn version(&self) -> Version {
        self.version
    }

    async fn commit(mut self: Box<Self>, record: &AccountRecord) -> Result<Version, StoreError> {
        let version = self.version + 1;
        let sealed = self.db.codec.seal_account(&self.account, record, version);
        let account = self.account.clone();
        let written = self
            .finish(
                PUT_NEXT,
                &[
                    &account.as_str(),
                    &sealed,
                    &to_db(version),
                    &to_db(self.version),
                    &CHANNEL,
                ],
            )
            .await?;
        if written == 0 {
            return Err(StoreError::Conflict(account));
        }
        Ok(version)
    }

    async fn fail(mut self: Box<Self>, backoff: Backoff) -> Result<(), StoreError> {
        let account = self.account.clone();
        let failures = i32::try_from(backoff.failures).unwrap_or(i32::MAX);
        self.finish(
            "UPDATE accounts SET failures = $2, retry_at = $3, outage = $5, hold_until = $6
             WHERE account = $1 AND version = $4",
            &[
                &account.as_str(),
                &failures,
                &backoff.retry_at,
                &to_db(self.version),
                &backoff.outage,
                &backoff.hold_until,
            ],
        )
        .await
        .map(drop)
    }
}
