//! The audit trail: one structured event (tracing target `audit`) for every call to the credential
//! service, authenticated or refused: caller, method, account and outcome (the gRPC code name).
//! Never a secret, and never raw input: the account is the parsed name or empty.
//!
//! GetToken is the hot path, so its events have their own level, [`GET_TOKEN_LEVEL`]; the fields
//! are borrowed strings, so a disabled level costs one comparison and an enabled one no formatting
//! beyond the subscriber's own.

use tonic::{Code, Status};
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

/// The canonical name of a gRPC status code, as grpcurl and the gRPC docs write it.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}
