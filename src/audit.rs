//! The audit trail: one structured event (tracing target `audit`) for every call to the credential
//! service, authenticated or refused: caller, method, account and outcome (the gRPC code name).
//! Never a secret, and never raw input: the account is the parsed name or empty.
//!
//! GetToken is the hot path, so its events have their own level, [`GET_TOKEN_LEVEL`]; the fields
//! are borrowed strings, so a disabled level costs one comparison and an enabled one no formatting
//! beyond the subscriber's own.

use tonic::{Code, Status};

use crate::error::code_name;
use tracing::Level;

/// Level of GetToken's audit events. Lower it to `Level::DEBUG` if the volume is too much.
pub const GET_TOKEN_LEVEL: Level = Level::INFO;

/// Records one call. `caller` and `account` may be empty when not (yet) known.
pub fn record(method: &str, caller: &str, account: &str, outcome: Code) {
    let outcome = code_name(outcome);
    if method == "GetToken" {
        tracing::event!(target: "audit", GET_TOKEN_LEVEL, caller, method, account, outcome, "call");
    } else {
        tracing::event!(target: "audit", Level::INFO, caller, method, account, outcome, "call");
    }
}

/// The outcome of a handler's result.
pub fn outcome<T>(result: &Result<T, Status>) -> Code {
    match result {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    }
}
