//! [`Database`]: what every handle on the store shares, the connection pool with the codec that
//! seals what goes into it, whether the database answers, and how long a claim may hold a lock;
//! with the one mapping of driver errors to store errors and the bound on every operation.

use std::time::Duration;

use deadpool_postgres::{Object, Pool, PoolError};
use tokio_postgres::error::SqlState;

use super::{
    config::OPERATION_TIMEOUT,
    reach::{Reach, with_causes},
};
use crate::{
    account::AccountId,
    store::{StoreError, Versioned, codec::Codec},
};

/// The database as this replica sees it: what every handle on the store shares.
pub(super) struct Database {
    pub(super) pool: Pool,
    pub(super) codec: Codec,
    pub(super) reach: Reach,
    pub(super) lock_hold: Duration,
}

impl Database {
    /// Turns a driver error into a store error, noting a lost database.
    pub(super) fn pg(&self, e: &tokio_postgres::Error) -> StoreError {
        let Some(db) = e.as_db_error() else {
            let why = with_causes(e);
            self.reach.lost(&why);
            return StoreError::Unavailable(why);
        };
        let code = db.code();
        if *code == SqlState::LOCK_NOT_AVAILABLE {
            return StoreError::Unavailable(
                "another replica held the account's refresh lock for too long".into(),
            );
        }
        if *code == SqlState::QUERY_CANCELED {
            return StoreError::Unavailable("a statement timed out".into());
        }
        let class = &code.code()[..2];
        if matches!(class, "08" | "53" | "57") {
            let why = format!("{} ({})", db.message(), code.code());
            self.reach.lost(&why);
            return StoreError::Unavailable(why);
        }
        StoreError::Postgres(format!("{} ({})", db.message(), code.code()))
    }

    pub(super) fn pool_error(&self, e: PoolError) -> StoreError {
        match e {
            PoolError::Backend(e) => self.pg(&e),
            PoolError::Timeout(deadpool_postgres::TimeoutType::Wait) => {
                StoreError::Unavailable("every database connection of this replica is busy".into())
            }
            other => {
                let why = other.to_string();
                self.reach.lost(&why);
                StoreError::Unavailable(why)
            }
        }
    }

    pub(super) async fn client(&self) -> Result<Object, StoreError> {
        self.pool.get().await.map_err(|e| self.pool_error(e))
    }

    /// Runs one operation within [`OPERATION_TIMEOUT`] (plus `extra`), noting whether the database
    /// answered.
    pub(super) async fn bounded<T>(
        &self,
        extra: Duration,
        op: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(OPERATION_TIMEOUT + extra, op).await {
            Ok(result) => {
                if !matches!(&result, Err(e) if e.is_unavailable()) {
                    self.reach.answered();
                }
                result
            }
            Err(_) => {
                let why = format!("no answer within {:?}", OPERATION_TIMEOUT + extra);
                self.reach.lost(&why);
                Err(StoreError::Unavailable(why))
            }
        }
    }

    pub(super) fn open_row(
        &self,
        account: &AccountId,
        sealed: &[u8],
    ) -> Result<Versioned, StoreError> {
        Ok(self
            .codec
            .open_account(account.as_str().as_bytes(), sealed)?
            .1)
    }
}
