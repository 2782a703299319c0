//! Account records exactly as stored, for backups and restores: the sealed bytes are copied, never
//! sealed again, so a backup holds nothing a stolen disk would not.

use std::fmt;

use super::Version;
use crate::{account::AccountId, sealing::Keyring};

/// One account's record as a backend stores it. The version and the needs-reauth mark are also
/// inside the sealed bytes; they are repeated here (read by opening the record in memory) so that
/// a backup lists them without keys, and a restore can check that both agree.
#[derive(Clone, PartialEq, Eq)]
pub struct RawAccount {
    pub account: AccountId,
    pub version: Version,
    pub needs_reauth: bool,
    /// The [`codec`](super::codec) record, sealed for this account's name.
    pub sealed: Vec<u8>,
}

impl RawAccount {
    /// The id of the key that sealed the record (from its header; nothing is opened).
    pub fn key_id(&self) -> Option<String> {
        Keyring::key_id_of(&self.sealed)
    }
}

impl fmt::Debug for RawAccount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawAccount")
            .field("account", &self.account)
            .field("version", &self.version)
            .field("needs_reauth", &self.needs_reauth)
            .field("key_id", &self.key_id())
            .finish_non_exhaustive()
    }
}
