//! Account names: the only way to get an [`AccountId`] is to parse one, so nothing downstream checks again.

use std::{fmt, sync::Arc};

/// What an account name may contain, worded for the people who typed a wrong one.
pub const ACCOUNT_RULE: &str =
    "an account is 1-128 characters of ASCII letters, digits, '.', '_', '-', ':' or '@'";

/// An operator-chosen account name, e.g. `acme-prod` or `team@edgetag`. Cheap to clone.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AccountId(Arc<str>);

/// The input was not an account name; the message says what is allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid account name: {ACCOUNT_RULE}")]
pub struct InvalidAccount;

/// A parsed account name borrowed from the request: finding an account to read its token needs
/// no allocation of its own; [`AccountName::to_id`] makes one where a name must be kept.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct AccountName<'a>(&'a str);

impl<'a> AccountName<'a> {
    /// Accepts 1–128 characters of `[A-Za-z0-9._:@-]`.
    pub fn parse(s: &'a str) -> Result<Self, InvalidAccount> {
        let ok = (1..=128).contains(&s.len())
            && s.bytes().all(|b| {
                b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':' | b'@')
            });
        if ok { Ok(Self(s)) } else { Err(InvalidAccount) }
    }

    pub fn as_str(self) -> &'a str {
        self.0
    }

    pub fn to_id(self) -> AccountId {
        AccountId(Arc::from(self.0))
    }
}

impl fmt::Display for AccountName<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl fmt::Debug for AccountName<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.0, f)
    }
}

impl AccountId {
    /// Accepts 1–128 characters of `[A-Za-z0-9._:@-]`.
    pub fn parse(s: &str) -> Result<Self, InvalidAccount> {
        AccountName::parse(s).map(AccountName::to_id)
    }

    pub fn name(&self) -> AccountName<'_> {
        AccountName(&self.0)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether both are the same allocation, not merely the same name: the broker keeps one per
    /// account, which lets the audit count reads by address instead of comparing names.
    pub fn same_allocation(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    /// The address of the name, for hashing alongside [`Self::same_allocation`].
    pub fn address(&self) -> usize {
        self.0.as_ptr() as usize
    }
}

impl fmt::Display for AccountId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for AccountId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl std::borrow::Borrow<str> for AccountId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_every_allowed_character_and_both_length_bounds() {
        for ok in [
            "a",
            "acme-prod",
            "team@edgetag.io",
            "x:y_z.1-2",
            &"a".repeat(128),
            "AZaz09",
        ] {
            assert_eq!(AccountId::parse(ok).unwrap().as_str(), ok);
        }
    }

    #[test]
    fn rejects_empty_too_long_and_foreign_characters() {
        for bad in [
            "",
            &"a".repeat(129),
            "a b",
            "a/b",
            "ä",
            "a\n",
            "a%2F",
            "a+b",
            "a*",
        ] {
            assert_eq!(AccountId::parse(bad), Err(InvalidAccount), "{bad:?}");
        }
    }

    #[test]
    fn error_message_says_what_is_allowed() {
        assert!(InvalidAccount.to_string().contains("1-128 characters"));
    }
}
