//! Export and restore of every account record as stored (backups): one statement reads them all
//! from one snapshot; one transaction writes them all or none.

use std::time::Duration;

use deadpool_postgres::Object;
use futures::TryStreamExt;

use super::{
    pool::Database,
    sql::{from_db, to_db},
};
use crate::store::{RawAccount, StoreError, codec::ACCOUNTS};

/// Rows per INSERT of a restore: large enough that 100,000 accounts take 100 statements, small
/// enough that each stays far inside the session's statement timeout.
const RESTORE_CHUNK: usize = 1000;

/// Every account, sorted by name, from one statement (so from one snapshot of the database).
/// Each row's version column must be the version sealed inside its record.
pub(super) async fn export(db: &Database) -> Result<Vec<RawAccount>, StoreError> {
    db.bounded(Duration::from_secs(110), async {
        let client = db.client().await?;
        let pg = |e: tokio_postgres::Error| db.pg(&e);
        let rows = client
            .query_raw(
                "SELECT account, version, sealed FROM accounts ORDER BY account",
                std::iter::empty::<i32>(),
            )
            .await
            .map_err(pg)?;
        let mut rows = std::pin::pin!(rows);
        let mut out = Vec::new();
        while let Some(row) = rows.try_next().await.map_err(pg)? {
            let name: &str = row.get(0);
            let raw = db.codec.raw_account(name.as_bytes(), row.get(2))?;
            if raw.version != from_db(row.get(1)) {
                return Err(StoreError::Corrupt {
                    tree: ACCOUNTS,
                    reason: format!(
                        "account {name}: the version column says {}, the record {}",
                        row.get::<_, i64>(1),
                        raw.version
                    ),
                });
            }
            out.push(raw);
        }
        Ok(out)
    })
    .await
}

/// Writes `records` in one transaction, refusing a table that holds accounts unless `replace`.
/// The table is locked against other writers for the transaction, so the count it refuses on is
/// the count it would replace.
pub(super) async fn restore(
    db: &Database,
    records: &[RawAccount],
    replace: bool,
) -> Result<usize, StoreError> {
    db.bounded(Duration::from_secs(290), async {
        let client = db.client().await?;
        let written = write(&client, records, replace).await;
        if !matches!(written, Ok(Ok(_))) {
            // Whatever failed, the transaction must not linger in a pooled connection.
            drop(Object::take(client));
        }
        written.map_err(|e| db.pg(&e))?
    })
    .await
}

async fn write(
    client: &Object,
    records: &[RawAccount],
    replace: bool,
) -> Result<Result<usize, StoreError>, tokio_postgres::Error> {
    client
        .batch_execute("BEGIN; LOCK TABLE accounts IN EXCLUSIVE MODE")
        .await?;
    let held: i64 = client
        .query_one("SELECT count(*) FROM accounts", &[])
        .await?
        .get(0);
    if held > 0 && !replace {
        return Ok(Err(StoreError::NotEmpty {
            accounts: usize::try_from(held).unwrap_or(usize::MAX),
        }));
    }
    client.batch_execute("DELETE FROM accounts").await?;
    let insert = client
        .prepare(
            "INSERT INTO accounts (account, version, sealed)
             SELECT * FROM unnest($1::text[], $2::bigint[], $3::bytea[])",
        )
        .await?;
    for chunk in records.chunks(RESTORE_CHUNK) {
        let names: Vec<&str> = chunk.iter().map(|r| r.account.as_str()).collect();
        let versions: Vec<i64> = chunk.iter().map(|r| to_db(r.version)).collect();
        let sealed: Vec<&[u8]> = chunk.iter().map(|r| r.sealed.as_slice()).collect();
        client
            .execute(&insert, &[&names, &versions, &sealed])
            .await?;
    }
    client.batch_execute("COMMIT").await?;
    Ok(Ok(records.len()))
}
