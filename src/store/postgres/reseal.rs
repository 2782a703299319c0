//! Re-sealing every record with the current key while the replicas serve ([`reseal_all`]).
//!
//! Accounts go in batches along the primary key, one statement per batch: it re-seals only the
//! rows it can lock at once (`FOR UPDATE SKIP LOCKED`, so a refresher holding a row's lock across
//! its call to EdgeTag is never waited for, nor made to wait) and only at the version read, so a
//! record refreshed meanwhile keeps what its writer wrote, which is sealed with the current key
//! anyway. The few rows a batch skipped are then taken one at a time, waiting for the lock as a
//! caller's refresh would. Pending authorizations are fenced on their bytes (they have no
//! version). Each statement commits on its own, durably; the version stays (the content is the
//! same), so nothing is announced and no replica reloads anything. Then the records are counted
//! by key in the database, from their headers (see [`Store::reseal_all`] for the passes).

use std::collections::{BTreeMap, HashSet};

use tokio_postgres::types::ToSql;

use super::{PostgresStore, claim::ClaimHolder};
use crate::store::{
    Pass, RESEAL_PASSES, Resealed, StoreError, another_pass,
    codec::{ACCOUNTS, PENDING, Resealing},
};

/// Rows per batch: their ciphers run between the read and the write, and the write locks them
/// for one short statement.
const BATCH: i64 = 200;

/// Re-seals the rows of `accounts` the batch read, at the versions read, skipping rows another
/// session holds locked; returns the accounts re-sealed.
const RESEAL_ACCOUNTS: &str = "
    WITH lockable AS (
        SELECT account FROM accounts WHERE account = ANY($1) FOR UPDATE SKIP LOCKED
    )
    UPDATE accounts AS a SET sealed = v.sealed
    FROM unnest($1::text[], $2::bigint[], $3::bytea[]) AS v(account, version, sealed)
    WHERE a.account = v.account AND a.version = v.version
      AND a.account IN (SELECT account FROM lockable)
    RETURNING a.account";

/// Re-seals pending authorizations whose bytes are still the ones read.
const RESEAL_PENDING: &str = "
    UPDATE pending AS p SET sealed = v.sealed
    FROM unnest($1::bytea[], $2::bytea[], $3::bytea[]) AS v(state_hash, old, sealed)
    WHERE p.state_hash = v.state_hash AND p.sealed = v.old
    RETURNING p.state_hash";

/// Every record of both tables by the id of the key in its header (byte 0 the format, 1 to 4
/// the key id; see `sealing`), counted where the records are.
const COUNT_BY_KEY: &str = "
    SELECT CASE WHEN length(sealed) >= 29 AND get_byte(sealed, 0) = 1
                THEN encode(substring(sealed FROM 2 FOR 4), 'hex')
                ELSE '(not sealed)' END AS key_id,
           count(*)
    FROM (SELECT sealed FROM accounts UNION ALL SELECT sealed FROM pending) AS records
    GROUP BY 1";

/// See the module docs.
pub(super) async fn reseal_all(store: &PostgresStore) -> Result<Resealed, StoreError> {
    let keys = store.db.codec.keyring();
    let mut resealed = 0;
    let mut by_key = BTreeMap::new();
    for _ in 0..RESEAL_PASSES {
        let mut pass = Pass::default();
        reseal_accounts(store, &mut pass).await?;
        reseal_pending(store, &mut pass).await?;
        resealed += pass.resealed;
        by_key = count_by_key(store).await?;
        if !another_pass(keys, &by_key, &pass) {
            break;
        }
    }
    Ok(Resealed::from_counts(
        store.db.codec.current_key_id(),
        resealed,
        by_key,
    ))
}

async fn count_by_key(store: &PostgresStore) -> Result<BTreeMap<String, usize>, StoreError> {
    Ok(store
        .query(COUNT_BY_KEY, &[])
        .await?
        .iter()
        .map(|row| {
            let n: i64 = row.get(1);
            (row.get(0), usize::try_from(n).unwrap_or(0))
        })
        .collect())
}

/// Every account, in batches, then the ones a batch skipped one at a time.
async fn reseal_accounts(store: &PostgresStore, pass: &mut Pass) -> Result<(), StoreError> {
    let codec = &store.db.codec;
    let mut skipped = Vec::new();
    let mut after = String::new();
    loop {
        let rows = store
            .query(
                "SELECT account, version, sealed FROM accounts WHERE account > $1
                 ORDER BY account LIMIT $2",
                &[&after, &BATCH],
            )
            .await?;
        let Some(last) = rows.last() else { break };
        after = last.get(0);
        let (mut names, mut versions, mut sealed) = (Vec::new(), Vec::new(), Vec::new());
        for row in &rows {
            let name: String = row.get(0);
            match codec.reseal(ACCOUNTS, name.as_bytes(), row.get(2)) {
                Resealing::Current => {}
                Resealing::Unopened(key_id) => pass.not_resealed(codec.keyring(), &key_id),
                Resealing::Resealed(new) => {
                    names.push(name);
                    versions.push(row.get::<_, i64>(1));
                    sealed.push(new);
                }
            }
        }
        if names.is_empty() {
            continue;
        }
        let written: HashSet<String> = store
            .query(RESEAL_ACCOUNTS, &[&names, &versions, &sealed])
            .await?
            .iter()
            .map(|row| row.get(0))
            .collect();
        pass.resealed += written.len();
        skipped.extend(names.into_iter().filter(|name| !written.contains(name)));
    }
    for account in skipped {
        reseal_one_account(store, &account, pass).await?;
    }
    Ok(())
}

/// One account a batch skipped (locked, or written meanwhile): waits for its lock (as long as a
/// refresh may hold it), then re-seals it at the version read under the lock, unless it is
/// current by now.
async fn reseal_one_account(
    store: &PostgresStore,
    account: &str,
    pass: &mut Pass,
) -> Result<(), StoreError> {
    let db = &store.db;
    let hold_ms = db.lock_hold.as_millis();
    let mut holder = ClaimHolder(None);
    let outcome = db
        .bounded(db.lock_hold, async {
            let client = holder.0.insert(db.client().await?);
            let pg = |e: tokio_postgres::Error| db.pg(&e);
            client
                .batch_execute(&format!(
                    "BEGIN; SET LOCAL lock_timeout = {hold_ms}; SET LOCAL statement_timeout = {}",
                    hold_ms + 1000
                ))
                .await
                .map_err(pg)?;
            let row = client
                .query_opt(
                    "SELECT version, sealed FROM accounts WHERE account = $1 FOR UPDATE",
                    &[&account],
                )
                .await
                .map_err(pg)?;
            let Some(row) = row else {
                return Ok(None); // removed meanwhile: nothing left to re-seal
            };
            let resealing = db.codec.reseal(ACCOUNTS, account.as_bytes(), row.get(1));
            if let Resealing::Resealed(new) = &resealing {
                let version: i64 = row.get(0);
                client
                    .execute(
                        "UPDATE accounts SET sealed = $2 WHERE account = $1 AND version = $3",
                        &[&account, new, &version],
                    )
                    .await
                    .map_err(pg)?;
            }
            client.batch_execute("COMMIT").await.map_err(pg)?;
            drop(holder.0.take()); // committed: clean, back to the pool
            Ok(Some(resealing))
        })
        .await;
    drop(holder); // still holding the connection only after a failure: rolls back
    match outcome {
        Ok(Some(Resealing::Resealed(_))) => pass.resealed += 1,
        Ok(Some(Resealing::Unopened(key_id))) => pass.not_resealed(db.codec.keyring(), &key_id),
        Ok(Some(Resealing::Current) | None) => {}
        Err(e) => {
            // Its lock held past the bound, say: the account stays on its key, the count says
            // so, and the next reseal takes it. (With the database gone, the count fails too.)
            tracing::warn!(account, error = %e, "an account could not be re-sealed now; run the reseal again");
            pass.stuck += 1;
        }
    }
    Ok(())
}

/// Pending authorizations, in batches along their key, each fenced on the bytes read.
async fn reseal_pending(store: &PostgresStore, pass: &mut Pass) -> Result<(), StoreError> {
    let codec = &store.db.codec;
    let mut after: Vec<u8> = Vec::new();
    loop {
        let rows = store
            .query(
                "SELECT state_hash, sealed FROM pending WHERE state_hash > $1
                 ORDER BY state_hash LIMIT $2",
                &[&after, &BATCH],
            )
            .await?;
        let Some(last) = rows.last() else { break };
        after = last.get(0);
        let (mut keys, mut olds, mut sealed) = (Vec::new(), Vec::new(), Vec::new());
        for row in &rows {
            let (key, old): (&[u8], &[u8]) = (row.get(0), row.get(1));
            match codec.reseal(PENDING, key, old) {
                Resealing::Current => {}
                Resealing::Unopened(key_id) => pass.not_resealed(codec.keyring(), &key_id),
                Resealing::Resealed(new) => {
                    keys.push(key);
                    olds.push(old);
                    sealed.push(new);
                }
            }
        }
        if keys.is_empty() {
            continue;
        }
        let params: [&(dyn ToSql + Sync); 3] = [&keys, &olds, &sealed];
        // A pending record is never rewritten, only taken: one that did not land is gone.
        pass.resealed += store.query(RESEAL_PENDING, &params).await?.len();
    }
    Ok(())
}
