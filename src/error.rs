//! The domain's errors and their one mapping to gRPC status codes.
//!
//! The mapping is an exhaustive `match` without a catch-all, so a new variant forces a decision about
//! its code. Messages tell the caller what to do next and never contain a secret; internal causes
//! are logged here, once, and the caller gets an opaque message.

use tonic::{Code, Status};

use crate::{
    account::{AccountId, InvalidAccount},
    grant::InvalidInput,
    oauth::UpstreamError,
    sealing::KeyError,
    store::StoreError,
};

/// Everything a credential-service call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    InvalidAccount(#[from] InvalidAccount),
    /// A malformed request field; the message names the field and the rule.
    #[error("{0}")]
    InvalidArgument(&'static str),
    #[error("account {0} is not connected; connect it with BeginAuth and CompleteAuth")]
    UnknownAccount(AccountId),
    #[error("unknown, expired or already used state; start again with BeginAuth")]
    UnknownState,
    #[error("EdgeTag rejected the authorization code ({0}); start again with BeginAuth")]
    CodeRejected(UpstreamError),
    #[error(
        "account {0} needs re-authorization: EdgeTag rejected its refresh token; run BeginAuth again"
    )]
    NeedsReauth(AccountId),
    #[error(
        "EdgeTag rejected this service's client credentials; an operator must check the configured \
         client id and client secret"
    )]
    ClientCredentialsRejected,
    #[error("{0}; retry later")]
    ProviderUnavailable(UpstreamError),
    #[error(
        "the access token of account {account} has expired (or expires sooner than asked) and EdgeTag could not renew it ({cause}); retry later"
    )]
    TokenExpired {
        account: AccountId,
        cause: UpstreamError,
    },
    /// EdgeTag is slow: every place for its requests stayed taken (see `broker::places`).
    #[error(
        "the access token of account {0} has expired (or expires sooner than asked) and EdgeTag is answering too slowly to renew it now; retry later"
    )]
    UpstreamBusy(AccountId),
    #[error(
        "min_validity is longer than a freshly issued EdgeTag token covers before its refresh margin; ask for at most {longest:?}"
    )]
    MinValidityTooLong { longest: std::time::Duration },
    #[error("no token valid for the requested time could be obtained for account {0}; retry later")]
    ValidityNotReached(AccountId),
    /// The shared store (PostgreSQL) is unreachable; it logs that once, not per call.
    #[error("the credential store is unreachable; retry later")]
    StoreUnavailable,
    /// CompleteAuth exchanged the code, which EdgeTag has then used up, but could not store the
    /// token set: retrying CompleteAuth cannot help, a new authorization can.
    #[error(
        "EdgeTag granted access to account {account}, but the credential store could not keep it; start the authorization again with BeginAuth"
    )]
    GrantNotStored {
        account: AccountId,
        cause: StoreError,
    },
    /// A re-seal found the encryption key files unloadable; the keys in force stay. The message
    /// names the file and why (never its content), for the operator who must fix it.
    #[error("{0}; the keys in force stay and nothing was re-sealed: fix the file, then retry")]
    KeysNotLoaded(KeyError),
    #[error(
        "account {0} is already connected; its grant is overwritten only when asked to (credctl import --replace)"
    )]
    AlreadyConnected(AccountId),
    /// An imported grant that EdgeTag refused at once: stored marked as needing
    /// re-authorization, so the account is listed and can be connected again; an account already
    /// connected keeps its grant (a dead one replaces nothing).
    #[error(
        "EdgeTag rejected the imported refresh token of account {account}: {}",
        if *.stored {
            "stored, marked as needing re-authorization; connect it again with BeginAuth"
        } else {
            "not stored; the account keeps the grant it already had"
        }
    )]
    ImportedGrantRejected { account: AccountId, stored: bool },
    /// A backup copies every account; a caller who may see only some must not get the others.
    #[error(
        "a backup copies every account, and {outside} of them are outside this caller's account globs; use a caller whose globs cover every account"
    )]
    NotEveryAccount { outside: usize },
    #[error("internal error: storage")]
    Store(#[from] StoreError),
    #[error("internal error: {0}")]
    Internal(&'static str),
}

impl From<InvalidInput> for Error {
    fn from(e: InvalidInput) -> Self {
        Error::InvalidArgument(e.0)
    }
}

impl Error {
    /// The gRPC code this error is answered with (also what audit events and metrics record).
    pub fn code(&self) -> Code {
        match self {
            Error::InvalidAccount(_)
            | Error::InvalidArgument(_)
            | Error::MinValidityTooLong { .. } => Code::InvalidArgument,
            Error::UnknownAccount(_) | Error::UnknownState => Code::NotFound,
            // Retry at a higher level: the whole authorization, not this call.
            Error::GrantNotStored { .. } => Code::Aborted,
            Error::CodeRejected(_)
            | Error::NeedsReauth(_)
            | Error::KeysNotLoaded(_)
            | Error::ImportedGrantRejected { .. } => Code::FailedPrecondition,
            Error::AlreadyConnected(_) => Code::AlreadyExists,
            Error::NotEveryAccount { .. } => Code::PermissionDenied,
            // Distinct from a rejected code: nothing the caller sends can fix it, only the operator.
            Error::ClientCredentialsRejected => Code::Internal,
            Error::ProviderUnavailable(_)
            | Error::TokenExpired { .. }
            | Error::UpstreamBusy(_)
            | Error::ValidityNotReached(_)
            | Error::StoreUnavailable => Code::Unavailable,
            Error::Store(e) if e.is_unavailable() => Code::Unavailable,
            Error::Store(_) | Error::Internal(_) => Code::Internal,
        }
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        match &e {
            Error::Store(cause) if cause.is_unavailable() => {
                return Status::new(e.code(), Error::StoreUnavailable.to_string());
            }
            Error::Store(cause) => tracing::error!(error = %cause, "storage failure"),
            Error::GrantNotStored { account, cause } => {
                tracing::error!(account = %account, error = %cause, "a granted token set could not be stored");
                return Status::new(e.code(), e.to_string());
            }
            Error::Internal(what) => tracing::error!(error = what, "internal failure"),
            _ => return Status::new(e.code(), e.to_string()),
        }
        Status::internal("internal error; the service's log has the cause")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_variant_maps_to_its_documented_code() {
        let acme = AccountId::parse("acme").unwrap();
        let down = UpstreamError::Unavailable {
            status: 503,
            retry_after: None,
        };
        let cases: Vec<(Error, Code)> = vec![
            (InvalidAccount.into(), Code::InvalidArgument),
            (
                Error::InvalidArgument("code is required"),
                Code::InvalidArgument,
            ),
            (Error::UnknownAccount(acme.clone()), Code::NotFound),
            (Error::UnknownState, Code::NotFound),
            (
                Error::CodeRejected(UpstreamError::InvalidGrant),
                Code::FailedPrecondition,
            ),
            (Error::NeedsReauth(acme.clone()), Code::FailedPrecondition),
            (Error::ClientCredentialsRejected, Code::Internal),
            (Error::ProviderUnavailable(down.clone()), Code::Unavailable),
            (
                Error::TokenExpired {
                    account: acme.clone(),
                    cause: down,
                },
                Code::Unavailable,
            ),
            (Error::ValidityNotReached(acme), Code::Unavailable),
            (
                Error::MinValidityTooLong {
                    longest: std::time::Duration::from_secs(6900),
                },
                Code::InvalidArgument,
            ),
            (
                Error::KeysNotLoaded(KeyError::Invalid("/etc/k".into())),
                Code::FailedPrecondition,
            ),
            (Error::Store(StoreError::FlusherGone), Code::Internal),
            (Error::Internal("refresh task panicked"), Code::Internal),
        ];
        for (error, code) in cases {
            let text = error.to_string();
            let status = Status::from(error);
            assert_eq!(status.code(), code, "{text}");
        }
    }

    #[test]
    fn internal_causes_stay_in_the_log() {
        let status = Status::from(Error::Store(StoreError::Corrupt {
            tree: "accounts",
            reason: "x".into(),
        }));
        assert!(!status.message().contains("accounts"));
    }
}
