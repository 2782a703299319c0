//! The account writes the store and its claims share, and versions as the database keeps them.
//! Each write notifies in the same statement, so other replicas hear of it once it is committed,
//! and always then.

use crate::store::Version;

pub(super) fn to_db(version: Version) -> i64 {
    i64::try_from(version).expect("versions stay far below 2^63")
}

pub(super) fn from_db(version: i64) -> Version {
    Version::try_from(version).unwrap_or(0)
}

/// Writes a new account at version 1, unless it exists.
pub(super) const PUT_NEW: &str = "
    WITH written AS (
        INSERT INTO accounts (account, version, sealed) VALUES ($1, 1, $2)
        ON CONFLICT (account) DO NOTHING
        RETURNING account, version
    )
    SELECT pg_notify($3, version || ' ' || account) FROM written";

/// Writes the next version, fenced on the one read; a success ends the account's back-off.
pub(super) const PUT_NEXT: &str = "
    WITH written AS (
        UPDATE accounts
        SET version = $3, sealed = $2, failures = 0, retry_at = NULL, outage = false, hold_until = NULL
        WHERE account = $1 AND version = $4
        RETURNING account, version
    )
    SELECT pg_notify($5, version || ' ' || account) FROM written";

/// Ends outage back-offs (a `Retry-After` still holds) and notifies [`RECOVERED`](super::notify::RECOVERED) in the same
/// statement, so other replicas hear of it once it is committed, and always then. PostgreSQL
/// delivers identical notifications of one transaction once.
pub(super) const END_OUTAGE_BACKOFFS: &str = "
    WITH ended AS (
        UPDATE accounts SET retry_at = hold_until, outage = false WHERE outage
        RETURNING pg_notify($1, $2)
    )
    SELECT count(*) FROM ended";
