//! What one refresh produces, shared by everyone who awaits it: the record, or why there is none.
//!
//! [`RefreshFailure`] is the one type for why a refresh did not produce a token: callers' statuses
//! ([`RefreshFailure::into_error`]), observers' events and the account's back-off all derive from it.
//! Its own file, so that the refresh (which produces it) and the slot (which keeps it) need not
//! import each other.

use std::sync::Arc;

use futures::future::{BoxFuture, Shared};

use super::RefreshEventKind;
use crate::{account::AccountId, error::Error, oauth::UpstreamError, tokens::AccountRecord};

/// The shared result of one refresh: the record it produced, or why it failed.
pub(super) type RefreshResult = Result<Arc<AccountRecord>, RefreshFailure>;
pub(super) type SharedRefresh = Shared<BoxFuture<'static, RefreshResult>>;

/// Why a refresh did not produce a servable token; cloneable, so every waiter gets the same answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefreshFailure {
    /// EdgeTag failed in a way that may pass (unreachable, 5xx, 429, an unusable answer, a 4xx
    /// other than the two below).
    Upstream(UpstreamError),
    /// EdgeTag rejected the refresh token: only a new authorization helps.
    NeedsReauth,
    /// EdgeTag rejected this service's client credentials: only an operator helps.
    ClientRejected,
    /// The store refused the write (logged where it happened); the new tokens are held back.
    Store,
    /// The shared store could not be reached to claim the account: nothing was asked of EdgeTag.
    StoreUnavailable,
    /// The store failed otherwise while claiming the account (logged where it happened): nothing
    /// was asked of EdgeTag.
    ClaimFailed,
    /// Every place for EdgeTag requests stayed taken for the queue timeout (EdgeTag is slow):
    /// nothing was asked, and the account does not back off for it.
    NoPlace,
    /// The account was removed meanwhile.
    Removed,
    /// The refresh task panicked.
    Panicked,
}

impl RefreshFailure {
    /// What a GetToken caller is told when this failure leaves no token that covers its need. The
    /// same failure gets the same status and message on every path (the caller's own refresh, or
    /// a back-off after the scheduler's).
    pub fn into_error(self, account: &AccountId) -> Error {
        match self {
            Self::Upstream(cause) => Error::TokenExpired {
                account: account.clone(),
                cause,
            },
            Self::NeedsReauth => Error::NeedsReauth(account.clone()),
            Self::ClientRejected => Error::ClientCredentialsRejected,
            Self::Store => Error::Internal("a refreshed token set could not be stored yet"),
            Self::StoreUnavailable => Error::StoreUnavailable,
            Self::ClaimFailed => {
                Error::Internal("the account's refresh could not be claimed in the store")
            }
            Self::NoPlace => Error::UpstreamBusy(account.clone()),
            Self::Removed => Error::UnknownAccount(account.clone()),
            Self::Panicked => Error::Internal("refresh task failed"),
        }
    }

    pub(super) fn event_kind(&self) -> RefreshEventKind {
        match self {
            Self::NeedsReauth => RefreshEventKind::NeedsReauth,
            Self::Store => RefreshEventKind::NotPersisted,
            Self::Upstream(_)
            | Self::ClientRejected
            | Self::Removed
            | Self::Panicked
            | Self::StoreUnavailable
            | Self::NoPlace
            | Self::ClaimFailed => RefreshEventKind::Failed,
        }
    }
}
