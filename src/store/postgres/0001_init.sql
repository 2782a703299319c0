-- Account records: the name in the clear (it is the key), the record sealed exactly as on sled.
-- The back-off columns are plain on purpose: every replica reads them before a background
-- refresh, so a fleet backs off as one.
CREATE TABLE accounts (
    account  text PRIMARY KEY,
    version  bigint NOT NULL CHECK (version > 0),
    sealed   bytea NOT NULL,
    failures integer NOT NULL DEFAULT 0,
    retry_at timestamptz
);

-- Pending authorizations, keyed by SHA-256 of the state; the expiry is plain so that a purge is
-- one DELETE.
CREATE TABLE pending (
    state_hash bytea PRIMARY KEY,
    sealed     bytea NOT NULL,
    expires_at timestamptz NOT NULL
);
CREATE INDEX pending_expires_at ON pending (expires_at);
