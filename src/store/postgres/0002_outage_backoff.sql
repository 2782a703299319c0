-- Why the fleet backs an account off: after an outage (EdgeTag down, overloaded or unreachable)
-- EdgeTag's return ends the back-off at once, except where its Retry-After (hold_until) still holds.
-- The partial index keeps that one UPDATE to the accounts actually backing off.
ALTER TABLE accounts
    ADD COLUMN outage boolean NOT NULL DEFAULT false,
    ADD COLUMN hold_until timestamptz;
CREATE INDEX accounts_outage ON accounts (account) WHERE outage;
