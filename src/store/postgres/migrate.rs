//! The schema: migrations embedded in the binary (the `.sql` files beside this one), applied at
//! start under an advisory lock so that replicas starting together do not race; a schema newer
//! than this binary knows is refused.

use crate::store::StoreError;

/// The migrations, in order; the schema's version is how many have been applied.
pub(super) const MIGRATIONS: &[&str] = &[
    include_str!("0001_init.sql"),
    include_str!("0002_outage_backoff.sql"),
];

/// Advisory lock key (arbitrary, fixed) of migrations.
const MIGRATION_LOCK: i64 = 0x6372_6564_0001;

/// Why migrating failed: the driver, or the store refusing the schema.
pub(super) enum Migration {
    Pg(tokio_postgres::Error),
    Store(StoreError),
}

impl From<tokio_postgres::Error> for Migration {
    fn from(e: tokio_postgres::Error) -> Self {
        Self::Pg(e)
    }
}

/// Applies the missing migrations, each in its own transaction, under an advisory lock.
pub(super) async fn migrate(client: &tokio_postgres::Client) -> Result<(), Migration> {
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    // Created only when missing (under the lock, so no race): `CREATE TABLE IF NOT EXISTS` would
    // make PostgreSQL send a NOTICE that every later replica logs at start-up as if it mattered.
    let exists: bool = client
        .query_one(
            "SELECT to_regclass('credential_service_schema') IS NOT NULL",
            &[],
        )
        .await?
        .get(0);
    if !exists {
        client
            .batch_execute(
                "CREATE TABLE credential_service_schema (
                     only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
                     version  bigint NOT NULL
                 )",
            )
            .await?;
    }
    let found: i64 = client
        .query_opt("SELECT version FROM credential_service_schema", &[])
        .await?
        .map_or(0, |row| row.get(0));
    let known = i64::try_from(MIGRATIONS.len()).expect("a few migrations");
    if found > known {
        return Err(Migration::Store(StoreError::SchemaTooNew { found, known }));
    }
    for (applied, sql) in (1..)
        .zip(MIGRATIONS)
        .skip(usize::try_from(found).unwrap_or(0))
    {
        let applied: i64 = applied;
        client.batch_execute("BEGIN").await?;
        client.batch_execute(sql).await?;
        client
            .execute(
                "INSERT INTO credential_service_schema (only_row, version) VALUES (true, $1)
                 ON CONFLICT (only_row) DO UPDATE SET version = EXCLUDED.version",
                &[&applied],
            )
            .await?;
        client.batch_execute("COMMIT").await?;
        tracing::info!(version = applied, "database schema migrated");
    }
    Ok(())
}
