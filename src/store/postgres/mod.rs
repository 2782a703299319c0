//! The PostgreSQL backend: several replicas share one database, with no single point of failure.
//!
//! - Records are sealed by [`Codec`] exactly as on sled: the database sees account names,
//!   versions, back-off times and ciphertext, never a token or a verifier.
//! - One refresh per account fleet-wide: [`Store::claim_refresh`] takes the account's row lock
//!   (`SELECT … FOR UPDATE`, bounded by `lock_timeout` and `statement_timeout`), re-reads under it,
//!   and the claim's commit writes the next version fenced on the one read. Background claims use
//!   `SKIP LOCKED`, so schedulers never queue behind each other, and they honour the fleet's
//!   back-off kept in the row. A replica that dies holding a lock loses its session, and with it
//!   the lock; `idle_in_transaction_session_timeout` ends a session that hangs instead.
//! - Coherence: every account write sends `NOTIFY` with the version and the account (nothing
//!   secret) in its own transaction; each replica `LISTEN`s on a connection of its own and reloads
//!   what changed. After a lost listener connection it reconnects and asks for a full resync, and a
//!   periodic resync is the safety net.
//! - Bounded failure: every operation has a deadline, so with the database down writes and
//!   refreshes fail with [`StoreError::Unavailable`] instead of hanging, while GetToken goes on
//!   from memory. One log line and the `credential_store_up` gauge say so, and again when it
//!   answers.
//! - Migrations are embedded and applied at start under an advisory lock, so replicas starting
//!   together do not race; a schema newer than this binary knows is refused.
//!
//! Hand-written rather than with a migration crate: the two that fit tokio-postgres take no
//! advisory lock, which is the part that matters here, and the rest is a loop.
//!
//! One file per job:
//! - `config`: the store URL, TLS, session settings and timeouts, the connector;
//! - `password`: the password, read from its file again for every new connection;
//! - `reach`: whether the database answers (the log line and `credential_store_up`);
//! - `pool`: the [`Database`](self::pool::Database) every handle shares: pool, codec, error
//!   mapping, the bound on every operation;
//! - `migrate`: the embedded migrations (the `.sql` files beside it) under the advisory lock;
//! - `notify`: NOTIFY payloads, LISTEN and the resyncs;
//! - `sql`: the account writes the store and its claims share;
//! - `claim`: [`PgClaim`](self::claim::PgClaim), the row lock a refresh holds;
//! - `reseal`: re-sealing every record with the current key while the replicas serve;
//! - `backup`: every record as stored, out (one snapshot) and in (one transaction);
//! - here: [`PostgresStore`] and its [`Store`] implementation.

mod backup;
mod claim;
mod config;
mod migrate;
mod notify;
mod password;
mod pool;
mod reach;
mod reseal;
mod sql;
#[cfg(test)]
mod tests;

use std::{
    fmt,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use async_trait::async_trait;
use deadpool_postgres::Object;
use futures::{StreamExt, TryStreamExt, stream::BoxStream};
use tokio::sync::broadcast;
use tokio_postgres::types::ToSql;
use tokio_stream::wrappers::BroadcastStream;
use tokio_util::task::AbortOnDropHandle;

pub use self::config::{PostgresConfig, TlsMode};
use self::{
    claim::{ClaimHolder, PgClaim},
    config::OPERATION_TIMEOUT,
    migrate::{Migration, migrate},
    notify::{CHANNEL, RECOVERED, listen, notification},
    pool::Database,
    reach::Reach,
    sql::{END_OUTAGE_BACKOFFS, PUT_NEW, PUT_NEXT, from_db, to_db},
};
use super::{
    Backoff, Change, Claim, ClaimMode, Expected, RawAccount, Resealed, Store, StoreError, Version,
    Versioned,
    codec::{Codec, account_of_key, state_key},
};
use crate::{
    account::AccountId,
    sealing::LiveKeyring,
    tokens::{AccountRecord, PendingAuth},
};

/// Advisory lock key (arbitrary, fixed) of the purge of expired states.
const PURGE_LOCK: i64 = 0x6372_6564_0002;

/// The PostgreSQL store (see the module docs).
#[derive(Clone)]
pub struct PostgresStore {
    db: Arc<Database>,
    changes: broadcast::Sender<Change>,
    /// Changes since the store opened, for the first subscriber (the broker), so that none that
    /// arrives between loading the accounts and following the changes is lost.
    first: Arc<Mutex<Option<broadcast::Receiver<Change>>>>,
    _listener: Arc<AbortOnDropHandle<()>>,
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStore").finish_non_exhaustive()
    }
}

impl PostgresStore {
    /// Connects, applies the migrations this binary carries (refusing a newer schema) and starts
    /// following other replicas' writes.
    pub async fn open(
        config: &PostgresConfig,
        keys: impl Into<LiveKeyring>,
    ) -> Result<Self, StoreError> {
        let connector = config.connector()?;
        let session = config.session();
        let pool = connector.pool(session.clone())?;
        let db = Arc::new(Database {
            pool,
            codec: Codec::new(keys),
            reach: Reach::new(),
            lock_hold: config.lock_hold,
        });
        db.bounded(Duration::from_secs(60), async {
            let client = db.client().await?;
            let migrated = migrate(&client).await;
            // The session held the advisory lock: end it rather than hand it back.
            drop(Object::take(client));
            migrated.map_err(|e| match e {
                Migration::Pg(e) => db.pg(&e),
                Migration::Store(e) => e,
            })
        })
        .await?;
        let (changes, first) = broadcast::channel(4096);
        let (ready, listening) = tokio::sync::oneshot::channel();
        let listener = tokio::spawn(listen(
            connector,
            session,
            db.clone(),
            changes.clone(),
            ready,
        ));
        // Return only once LISTEN is in place, so that what the caller loads next and the changes
        // after it leave no gap between them (a failed first try resyncs in full on reconnect).
        let _ = tokio::time::timeout(OPERATION_TIMEOUT, listening).await;
        Ok(Self {
            db,
            changes,
            first: Arc::new(Mutex::new(Some(first))),
            _listener: Arc::new(AbortOnDropHandle::new(listener)),
        })
    }

    async fn query(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, StoreError> {
        let db = &self.db;
        db.bounded(Duration::ZERO, async {
            let client = db.client().await?;
            let statement = client.prepare_cached(sql).await.map_err(|e| db.pg(&e))?;
            client
                .query(&statement, params)
                .await
                .map_err(|e| db.pg(&e))
        })
        .await
    }
}

#[async_trait]
impl Store for PostgresStore {
    async fn put_pending(&self, state: &str, pending: &PendingAuth) -> Result<(), StoreError> {
        let key = state_key(state);
        let sealed = self.db.codec.seal_pending(&key, pending);
        self.query(
            "INSERT INTO pending (state_hash, sealed, expires_at) VALUES ($1, $2, $3)
             ON CONFLICT (state_hash) DO UPDATE SET sealed = EXCLUDED.sealed, expires_at = EXCLUDED.expires_at",
            &[&&key[..], &sealed, &pending.expires_at],
        )
        .await?;
        Ok(())
    }

    async fn take_pending(&self, state: &str) -> Result<Option<PendingAuth>, StoreError> {
        let key = state_key(state);
        let rows = self
            .query(
                "DELETE FROM pending WHERE state_hash = $1 RETURNING sealed",
                &[&&key[..]],
            )
            .await?;
        rows.first()
            .map(|row| self.db.codec.open_pending(&key, row.get(0)))
            .transpose()
    }

    async fn purge_expired_pending(&self, now: SystemTime) -> Result<usize, StoreError> {
        let db = &self.db;
        db.bounded(Duration::ZERO, async {
            let client = db.client().await?;
            let pg = |e: tokio_postgres::Error| db.pg(&e);
            client.batch_execute("BEGIN").await.map_err(pg)?;
            let purged = async {
                // One replica purges at a time; the others have nothing to do.
                let row = client
                    .query_one("SELECT pg_try_advisory_xact_lock($1)", &[&PURGE_LOCK])
                    .await?;
                if !row.get::<_, bool>(0) {
                    return Ok(0);
                }
                client
                    .execute("DELETE FROM pending WHERE expires_at < $1", &[&now])
                    .await
            }
            .await;
            let purged = match purged {
                Ok(n) => n,
                Err(e) => {
                    drop(Object::take(client));
                    return Err(pg(e));
                }
            };
            client.batch_execute("COMMIT").await.map_err(pg)?;
            Ok(usize::try_from(purged).unwrap_or(usize::MAX))
        })
        .await
    }

    async fn scan_accounts(
        &self,
    ) -> Result<Vec<(AccountId, Result<Versioned, StoreError>)>, StoreError> {
        let db = &self.db;
        // 100,000 accounts stream in one query well within the operation bound.
        db.bounded(Duration::from_secs(50), async {
            let client = db.client().await?;
            let pg = |e: tokio_postgres::Error| db.pg(&e);
            let rows = client
                .query_raw(
                    "SELECT account, sealed FROM accounts",
                    std::iter::empty::<i32>(),
                )
                .await
                .map_err(pg)?;
            let mut rows = std::pin::pin!(rows);
            let mut loaded = Vec::new();
            while let Some(row) = rows.try_next().await.map_err(pg)? {
                let name: &str = row.get(0);
                let sealed: &[u8] = row.get(1);
                let account = account_of_key(name.as_bytes())?;
                let opened = db.open_row(&account, sealed);
                loaded.push((account, opened));
            }
            Ok(loaded)
        })
        .await
    }

    async fn load_account(&self, account: &AccountId) -> Result<Option<Versioned>, StoreError> {
        let rows = self
            .query(
                "SELECT sealed FROM accounts WHERE account = $1",
                &[&account.as_str()],
            )
            .await?;
        rows.first()
            .map(|row| self.db.open_row(account, row.get(0)))
            .transpose()
    }

    async fn put_account(
        &self,
        account: &AccountId,
        record: &AccountRecord,
        expected: Expected,
    ) -> Result<Version, StoreError> {
        let (version, rows) = match expected {
            Expected::Absent => {
                let sealed = self.db.codec.seal_account(account, record, 1);
                let rows = self
                    .query(PUT_NEW, &[&account.as_str(), &sealed, &CHANNEL])
                    .await?;
                (1, rows)
            }
            Expected::Version(old) => {
                let version = old + 1;
                let sealed = self.db.codec.seal_account(account, record, version);
                let rows = self
                    .query(
                        PUT_NEXT,
                        &[
                            &account.as_str(),
                            &sealed,
                            &to_db(version),
                            &to_db(old),
                            &CHANNEL,
                        ],
                    )
                    .await?;
                (version, rows)
            }
        };
        if rows.is_empty() {
            return Err(StoreError::Conflict(account.clone()));
        }
        Ok(version)
    }

    async fn delete_account(
        &self,
        account: &AccountId,
        expected: Version,
    ) -> Result<(), StoreError> {
        let removed = notification(None, account);
        let rows = self
            .query(
                "WITH removed AS (
                     DELETE FROM accounts WHERE account = $1 AND version = $2 RETURNING account
                 )
                 SELECT pg_notify($3, $4) FROM removed",
                &[&account.as_str(), &to_db(expected), &CHANNEL, &removed],
            )
            .await?;
        if !rows.is_empty() {
            return Ok(());
        }
        // Nothing deleted: fine if it was already gone, a conflict if it is at another version.
        let still = self
            .query(
                "SELECT 1 FROM accounts WHERE account = $1",
                &[&account.as_str()],
            )
            .await?;
        if still.is_empty() {
            Ok(())
        } else {
            Err(StoreError::Conflict(account.clone()))
        }
    }

    async fn claim_refresh(
        &self,
        account: &AccountId,
        seen: Version,
        mode: ClaimMode,
    ) -> Result<Claim, StoreError> {
        let db = &self.db;
        let hold_ms = db.lock_hold.as_millis();
        let (lock, extra) = match mode {
            ClaimMode::Wait => ("FOR UPDATE", db.lock_hold),
            ClaimMode::Skip { .. } => ("FOR UPDATE SKIP LOCKED", Duration::ZERO),
        };
        let select = format!(
            "SELECT version, sealed, failures, retry_at, outage, hold_until FROM accounts WHERE account = $1 {lock}"
        );
        let mut holder = ClaimHolder(None);
        let claimed = db
            .bounded(extra, async {
                let client = holder.0.insert(db.client().await?);
                let pg = |e: tokio_postgres::Error| db.pg(&e);
                client
                    .batch_execute(&format!(
                        "BEGIN; SET LOCAL lock_timeout = {hold_ms}; SET LOCAL statement_timeout = {}",
                        hold_ms + 1000
                    ))
                    .await
                    .map_err(pg)?;
                let statement = client.prepare_cached(&select).await.map_err(pg)?;
                let row = client
                    .query_opt(&statement, &[&account.as_str()])
                    .await
                    .map_err(pg)?;
                let Some(row) = row else {
                    if matches!(mode, ClaimMode::Skip { .. }) {
                        let exists = client
                            .query_opt(
                                "SELECT 1 FROM accounts WHERE account = $1",
                                &[&account.as_str()],
                            )
                            .await
                            .map_err(pg)?;
                        if exists.is_some() {
                            return Ok(Claim::Busy);
                        }
                    }
                    return Ok(Claim::Gone);
                };
                let version = from_db(row.get(0));
                if version != seen {
                    return Ok(Claim::Superseded(db.open_row(account, row.get(1))?));
                }
                if let ClaimMode::Skip { now } = mode {
                    let failures: i32 = row.get(2);
                    let retry_at: Option<SystemTime> = row.get(3);
                    if let Some(retry_at) = retry_at.filter(|at| *at > now) {
                        return Ok(Claim::BackingOff(Backoff {
                            failures: u32::try_from(failures).unwrap_or(0),
                            retry_at,
                            outage: row.get(4),
                            hold_until: row.get(5),
                        }));
                    }
                }
                Ok(Claim::Granted(Box::new(PgClaim {
                    client: holder.0.take(),
                    db: self.db.clone(),
                    account: account.clone(),
                    version,
                })))
            })
            .await;
        // `holder` still has the connection unless the claim was granted: its drop rolls back.
        drop(holder);
        claimed
    }

    async fn end_outage_backoffs(&self) -> Result<u64, StoreError> {
        let rows = self
            .query(END_OUTAGE_BACKOFFS, &[&CHANNEL, &RECOVERED])
            .await?;
        let ended: i64 = rows.first().map_or(0, |row| row.get(0));
        Ok(u64::try_from(ended).unwrap_or(0))
    }

    fn changes(&self) -> BoxStream<'static, Change> {
        let receiver = self
            .first
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .unwrap_or_else(|| self.changes.subscribe());
        BroadcastStream::new(receiver)
            .map(|c| c.unwrap_or(Change::Resync)) // lagged: changes were missed
            .boxed()
    }

    fn keyring(&self) -> &LiveKeyring {
        self.db.codec.keyring()
    }

    async fn reseal_all(&self) -> Result<Resealed, StoreError> {
        reseal::reseal_all(self).await
    }

    async fn export_accounts(&self) -> Result<Vec<RawAccount>, StoreError> {
        backup::export(&self.db).await
    }

    async fn restore_accounts(
        &self,
        records: &[RawAccount],
        replace: bool,
    ) -> Result<usize, StoreError> {
        backup::restore(&self.db, records, replace).await
    }

    fn kind(&self) -> &'static str {
        "postgres"
    }
}
