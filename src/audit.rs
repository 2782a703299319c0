//! The audit trail: one structured event (tracing target `audit`) for every call to the credential
//! service, authenticated or refused: caller, method, account and outcome (the gRPC code name).
//! Never a secret, and never raw input: the account is the parsed name or empty.
//!
//! GetToken is the hot path: a successful one is recorded at [`GET_TOKEN_OK_LEVEL`] (DEBUG), so
//! the default `info` level logs every refusal and every operator action but not each of the tens
//! of thousands of routine token reads a second; `RUST_LOG=info,audit=debug` records those too. The
//! fields are borrowed strings, so a disabled level costs one comparison.

use tonic::{Code, Status};

use crate::codes::code_name;
use tracing::Level;

/// Level of a successful GetToken's audit event (refused ones are INFO like everything else).
pub const GET_TOKEN_OK_LEVEL: Level = Level::DEBUG;

/// Records one call. `caller` and `account` may be empty when not (yet) known.
pub fn record(method: &str, caller: &str, account: &str, outcome: Code) {
    let outcome_name = code_name(outcome);
    if method == "GetToken" && outcome == Code::Ok {
        tracing::event!(target: "audit", GET_TOKEN_OK_LEVEL, caller, method, account, outcome = outcome_name, "call");
    } else {
        tracing::event!(target: "audit", Level::INFO, caller, method, account, outcome = outcome_name, "call");
    }
}

/// The outcome of a handler's result.
pub fn outcome<T>(result: &Result<T, Status>) -> Code {
    match result {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    }
}
