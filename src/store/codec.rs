//! The sealed-record format every backend stores: versioned protobuf messages, sealed with the
//! [`Keyring`] for their table ("tree") and key, so neither tokens nor verifiers reach a disk or a
//! database in the clear, and a record copied under another key does not open.
//!
//! Pending authorizations are keyed by SHA-256 of their state: a copied database does not reveal
//! live states.

use std::{fmt, sync::Arc, time::SystemTime};

use prost::Message;
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};

use super::{RawAccount, StoreError, Version, Versioned};
use crate::{
    account::AccountId,
    clock::{from_unix_ms, to_unix_ms},
    sealing::{Keyring, LiveKeyring, UnsealError},
    tokens::{
        AccountRecord, AccountStatus, LastRefresh, PendingAuth, RefreshOutcome, Team, Teams,
        TokenSet,
    },
};

/// The format of the messages below; a record of another format is refused, never guessed at.
const RECORD_FORMAT: u32 = 1;

/// The table names sealed into each record's additional data.
pub const PENDING: &str = "pending";
pub const ACCOUNTS: &str = "accounts";

/// States are bearer secrets of a kind (CSRF tokens): only their hash is stored.
pub fn state_key(state: &str) -> [u8; 32] {
    Sha256::digest(state.as_bytes()).into()
}

/// Seals and opens records with the keyring in force (replaced whole when the key files are
/// reloaded).
#[derive(Clone)]
pub struct Codec {
    keys: LiveKeyring,
}

impl fmt::Debug for Codec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Codec").finish_non_exhaustive()
    }
}

/// What [`Codec::reseal`] made of a record.
pub enum Resealing {
    /// Sealed with the current key already: nothing to write.
    Current,
    /// The same plaintext (version included), sealed again with the current key.
    Resealed(Vec<u8>),
    /// It does not open with the keys in force: it stays as it is, sealed with this key id.
    Unopened(String),
}

impl Codec {
    pub fn new(keys: impl Into<LiveKeyring>) -> Self {
        Self { keys: keys.into() }
    }

    /// The keyring in force, which a key reload replaces in place.
    pub fn keyring(&self) -> &LiveKeyring {
        &self.keys
    }

    /// The id of the key new records are sealed with.
    pub fn current_key_id(&self) -> String {
        self.keys.get().current_id()
    }

    /// The sealed pending record for the state whose key is `key` ([`state_key`]).
    pub fn seal_pending(&self, key: &[u8; 32], pending: &PendingAuth) -> Vec<u8> {
        let record = PendingRecord {
            format: RECORD_FORMAT,
            account: pending.account.to_string(),
            verifier: pending.verifier.expose_secret().to_owned(),
            expires_at_ms: to_unix_ms(pending.expires_at),
        };
        self.keys.get().seal(PENDING, key, &record.encode_to_vec())
    }

    pub fn open_pending(&self, key: &[u8], sealed: &[u8]) -> Result<PendingAuth, StoreError> {
        let corrupt = |reason: String| StoreError::Corrupt {
            tree: PENDING,
            reason,
        };
        let plaintext = self.unseal(PENDING, key, sealed, None)?;
        let r = PendingRecord::decode(&*plaintext).map_err(|e| corrupt(e.to_string()))?;
        if r.format != RECORD_FORMAT {
            return Err(corrupt(format!("unknown record format {}", r.format)));
        }
        Ok(PendingAuth {
            account: AccountId::parse(&r.account).map_err(|e| corrupt(e.to_string()))?,
            verifier: SecretString::from(r.verifier),
            expires_at: from_unix_ms(r.expires_at_ms),
        })
    }

    /// Whether a sealed pending record expired before `now`; an unreadable one counts as expired,
    /// since it can never complete either.
    pub fn pending_expired(&self, key: &[u8], sealed: &[u8], now: SystemTime) -> bool {
        self.open_pending(key, sealed)
            .map_or(true, |p| p.expires_at < now)
    }

    /// The sealed account record, carrying its version.
    pub fn seal_account(
        &self,
        account: &AccountId,
        record: &AccountRecord,
        version: Version,
    ) -> Vec<u8> {
        self.keys.get().seal(
            ACCOUNTS,
            account.as_str().as_bytes(),
            &encode_account(record, version),
        )
    }

    /// Opens the record stored under `key` (the account name's bytes).
    pub fn open_account(
        &self,
        key: &[u8],
        sealed: &[u8],
    ) -> Result<(AccountId, Versioned), StoreError> {
        let name = account_of_key(key)?;
        let plaintext = self.unseal(ACCOUNTS, key, sealed, Some(&name))?;
        Ok((name, decode_account(&plaintext)?))
    }

    /// The record stored under `key`, copied as it is, with the version and needs-reauth mark read
    /// by opening it in memory: a record that does not open with these keys is refused here.
    pub fn raw_account(&self, key: &[u8], sealed: &[u8]) -> Result<RawAccount, StoreError> {
        let (account, versioned) = self.open_account(key, sealed)?;
        Ok(RawAccount {
            account,
            version: versioned.version,
            needs_reauth: versioned.record.status == AccountStatus::NeedsReauth,
            sealed: sealed.to_vec(),
        })
    }

    /// Opens any record and seals it again with the current key unless its header says it already
    /// is. A record that does not open (a key not held, or tampered with) is left for the caller
    /// to count.
    pub fn reseal(&self, tree: &'static str, key: &[u8], sealed: &[u8]) -> Resealing {
        let keys = self.keys.get();
        // The header names the key: a record on the current one needs no deciphering.
        if Keyring::key_id_of(sealed).is_some_and(|id| id == keys.current_id()) {
            return Resealing::Current;
        }
        match keys.unseal(tree, key, sealed) {
            Ok(unsealed) if unsealed.current => Resealing::Current,
            Ok(unsealed) => Resealing::Resealed(keys.seal(tree, key, &unsealed.plaintext)),
            Err(e) => {
                let key_id = Keyring::key_id_of(sealed).unwrap_or_else(|| "(not sealed)".into());
                if !matches!(e, UnsealError::UnknownKey(_)) {
                    let record = record_name(tree, key);
                    tracing::warn!(%record, key_id, error = %e, "a stored record does not open; left as it is");
                }
                Resealing::Unopened(key_id)
            }
        }
    }

    fn unseal(
        &self,
        tree: &'static str,
        key: &[u8],
        sealed: &[u8],
        account: Option<&AccountId>,
    ) -> Result<Vec<u8>, StoreError> {
        self.keys
            .get()
            .unseal(tree, key, sealed)
            .map(|u| u.plaintext)
            .map_err(|e| match e {
                UnsealError::UnknownKey(key_id) => StoreError::KeyNotHeld {
                    record: match account {
                        Some(name) => format!("account {name}"),
                        None => record_name(tree, key),
                    },
                    key_id,
                },
                e => StoreError::Corrupt {
                    tree,
                    reason: match account {
                        Some(name) => format!("account {name}: {e}"),
                        None => e.to_string(),
                    },
                },
            })
    }
}

/// The account whose record is stored under `key` (its name's bytes).
pub fn account_of_key(key: &[u8]) -> Result<AccountId, StoreError> {
    std::str::from_utf8(key)
        .ok()
        .and_then(|s| AccountId::parse(s).ok())
        .ok_or_else(|| StoreError::Corrupt {
            tree: ACCOUNTS,
            reason: "key is not an account name".into(),
        })
}

/// How logs and errors name a record: an account by its name, a pending authorization by nothing
/// (its key is the hash of a live state).
fn record_name(tree: &str, key: &[u8]) -> String {
    match tree {
        ACCOUNTS => format!("account {}", String::from_utf8_lossy(key)),
        _ => "a pending authorization".to_owned(),
    }
}

#[derive(Clone, PartialEq, Message)]
#[prost(skip_debug)]
struct PendingRecord {
    #[prost(uint32, tag = "1")]
    format: u32,
    #[prost(string, tag = "2")]
    account: String,
    #[prost(string, tag = "3")]
    verifier: String,
    #[prost(int64, tag = "4")]
    expires_at_ms: i64,
}

impl fmt::Debug for PendingRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PendingRecord")
            .field("account", &self.account)
            .finish_non_exhaustive()
    }
}

#[derive(Clone, PartialEq, Message)]
#[prost(skip_debug)]
struct AccountRecordPb {
    #[prost(uint32, tag = "1")]
    format: u32,
    #[prost(string, tag = "2")]
    access_token: String,
    /// Empty when the provider issued none.
    #[prost(string, tag = "3")]
    refresh_token: String,
    #[prost(string, tag = "4")]
    token_type: String,
    #[prost(int64, tag = "5")]
    issued_at_ms: i64,
    #[prost(int64, tag = "6")]
    expires_at_ms: i64,
    /// 0 active, 1 needs re-authorization.
    #[prost(uint32, tag = "7")]
    status: u32,
    /// 0 never, 1 succeeded, 2 failed.
    #[prost(uint32, tag = "8")]
    last_refresh_outcome: u32,
    #[prost(int64, tag = "9")]
    last_refresh_at_ms: i64,
    /// The optimistic version ([`Version`]); 0 in records written before versions existed, which
    /// read as version 1.
    #[prost(uint64, tag = "10")]
    version: u64,
    /// The EdgeTag team the grant reaches; empty while not known (and in records written before
    /// teams were kept, which read as "not known": no new format number needed).
    #[prost(string, tag = "11")]
    team_id: String,
    #[prost(message, repeated, tag = "12")]
    teams: Vec<TeamPb>,
    /// When `/v1/user/me` last answered (Unix ms); 0 with `team_id` empty.
    #[prost(int64, tag = "13")]
    teams_learned_at_ms: i64,
}

#[derive(Clone, PartialEq, Message)]
struct TeamPb {
    #[prost(string, tag = "1")]
    id: String,
    #[prost(string, tag = "2")]
    name: String,
}

impl fmt::Debug for AccountRecordPb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccountRecordPb")
            .field("status", &self.status)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

fn encode_account(record: &AccountRecord, version: Version) -> Vec<u8> {
    let t = &record.tokens;
    let (last_refresh_outcome, last_refresh_at_ms) = match record.last_refresh {
        None => (0, 0),
        Some(LastRefresh {
            at,
            outcome: RefreshOutcome::Succeeded,
        }) => (1, to_unix_ms(at)),
        Some(LastRefresh {
            at,
            outcome: RefreshOutcome::Failed,
        }) => (2, to_unix_ms(at)),
    };
    AccountRecordPb {
        format: RECORD_FORMAT,
        access_token: t.access_token.expose_secret().to_owned(),
        refresh_token: t
            .refresh_token
            .as_ref()
            .map(|r| r.expose_secret().to_owned())
            .unwrap_or_default(),
        token_type: t.token_type.clone(),
        issued_at_ms: to_unix_ms(t.issued_at),
        expires_at_ms: to_unix_ms(t.expires_at),
        status: match record.status {
            AccountStatus::Active => 0,
            AccountStatus::NeedsReauth => 1,
        },
        last_refresh_outcome,
        last_refresh_at_ms,
        version,
        team_id: record.team_id().to_owned(),
        teams: record.teams.as_ref().map_or_else(Vec::new, |t| {
            t.teams
                .iter()
                .map(|team| TeamPb {
                    id: team.id.clone(),
                    name: team.name.clone(),
                })
                .collect()
        }),
        teams_learned_at_ms: record
            .teams
            .as_ref()
            .map_or(0, |t| to_unix_ms(t.learned_at)),
    }
    .encode_to_vec()
}

fn decode_account(bytes: &[u8]) -> Result<Versioned, StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt {
        tree: ACCOUNTS,
        reason,
    };
    let r = AccountRecordPb::decode(bytes).map_err(|e| corrupt(e.to_string()))?;
    if r.format != RECORD_FORMAT {
        return Err(corrupt(format!("unknown record format {}", r.format)));
    }
    let status = match r.status {
        0 => AccountStatus::Active,
        1 => AccountStatus::NeedsReauth,
        other => return Err(corrupt(format!("unknown status {other}"))),
    };
    let last_refresh = match r.last_refresh_outcome {
        1 => Some(LastRefresh {
            at: from_unix_ms(r.last_refresh_at_ms),
            outcome: RefreshOutcome::Succeeded,
        }),
        2 => Some(LastRefresh {
            at: from_unix_ms(r.last_refresh_at_ms),
            outcome: RefreshOutcome::Failed,
        }),
        _ => None,
    };
    Ok(Versioned {
        version: r.version.max(1),
        record: AccountRecord {
            tokens: Arc::new(TokenSet {
                access_token: SecretString::from(r.access_token),
                refresh_token: (!r.refresh_token.is_empty())
                    .then(|| SecretString::from(r.refresh_token)),
                token_type: r.token_type,
                issued_at: from_unix_ms(r.issued_at_ms),
                expires_at: from_unix_ms(r.expires_at_ms),
            }),
            status,
            last_refresh,
            teams: (!r.team_id.is_empty()).then(|| {
                Arc::new(Teams {
                    team_id: r.team_id,
                    teams: r
                        .teams
                        .into_iter()
                        .map(|t| Team {
                            id: t.id,
                            name: t.name,
                        })
                        .collect(),
                    learned_at: from_unix_ms(r.teams_learned_at_ms),
                })
            }),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_with_their_version_and_never_show_secrets() {
        let codec = Codec::new(Keyring::ephemeral());
        let acme = AccountId::parse("acme").unwrap();
        let record = AccountRecord::connected(TokenSet {
            access_token: "at-secret".into(),
            refresh_token: Some("rt-secret".into()),
            token_type: "Bearer".into(),
            issued_at: from_unix_ms(1_000),
            expires_at: from_unix_ms(7_201_000),
        });
        let sealed = codec.seal_account(&acme, &record, 7);
        let text = String::from_utf8_lossy(&sealed);
        assert!(!text.contains("at-secret") && !text.contains("rt-secret"));
        let (name, opened) = codec.open_account(b"acme", &sealed).unwrap();
        assert_eq!(name, acme);
        assert_eq!(opened.version, 7);
        assert_eq!(
            opened.record.tokens.access_token.expose_secret(),
            "at-secret"
        );
        // Under another account's key the same bytes do not open.
        assert!(codec.open_account(b"globex", &sealed).is_err());
    }

    /// Records sealed before teams were kept (fields 1–10 only) open, with the team unknown; a
    /// record with a team keeps it through sealing.
    #[test]
    fn records_without_a_team_open_and_teams_round_trip() {
        #[derive(Clone, PartialEq, Message)]
        struct RecordBeforeTeams {
            #[prost(uint32, tag = "1")]
            format: u32,
            #[prost(string, tag = "2")]
            access_token: String,
            #[prost(string, tag = "3")]
            refresh_token: String,
            #[prost(string, tag = "4")]
            token_type: String,
            #[prost(int64, tag = "5")]
            issued_at_ms: i64,
            #[prost(int64, tag = "6")]
            expires_at_ms: i64,
            #[prost(uint32, tag = "7")]
            status: u32,
            #[prost(uint32, tag = "8")]
            last_refresh_outcome: u32,
            #[prost(int64, tag = "9")]
            last_refresh_at_ms: i64,
            #[prost(uint64, tag = "10")]
            version: u64,
        }
        let codec = Codec::new(Keyring::ephemeral());
        let old = RecordBeforeTeams {
            format: RECORD_FORMAT,
            access_token: "at-old".into(),
            refresh_token: "rt-old".into(),
            token_type: "Bearer".into(),
            issued_at_ms: 1_000,
            expires_at_ms: 7_201_000,
            status: 0,
            last_refresh_outcome: 1,
            last_refresh_at_ms: 2_000,
            version: 3,
        };
        let sealed = codec
            .keys
            .get()
            .seal(ACCOUNTS, b"acme", &old.encode_to_vec());
        let (_, opened) = codec.open_account(b"acme", &sealed).unwrap();
        assert_eq!(opened.version, 3);
        assert!(opened.record.teams.is_none());
        assert_eq!(opened.record.team_id(), "");
        assert_eq!(opened.record.tokens.access_token.expose_secret(), "at-old");

        let mut record = opened.record;
        record.teams = Some(Arc::new(Teams {
            team_id: "t-2".into(),
            teams: vec![
                Team {
                    id: "t-1".into(),
                    name: "Acme EU".into(),
                },
                Team {
                    id: "t-2".into(),
                    name: String::new(),
                },
            ],
            learned_at: from_unix_ms(5_000),
        }));
        let sealed = codec.seal_account(&AccountId::parse("acme").unwrap(), &record, 4);
        let (_, opened) = codec.open_account(b"acme", &sealed).unwrap();
        assert_eq!(opened.record.teams, record.teams);
    }

    #[test]
    fn pending_records_open_only_under_their_state() {
        let codec = Codec::new(Keyring::ephemeral());
        let pending = PendingAuth {
            account: AccountId::parse("acme").unwrap(),
            verifier: "v-secret".into(),
            expires_at: from_unix_ms(10_000),
        };
        let key = state_key("s1");
        let sealed = codec.seal_pending(&key, &pending);
        assert_eq!(
            codec.open_pending(&key, &sealed).unwrap().account.as_str(),
            "acme"
        );
        assert!(codec.open_pending(&state_key("s2"), &sealed).is_err());
        assert!(codec.pending_expired(&key, &sealed, from_unix_ms(10_001)));
        assert!(!codec.pending_expired(&key, &sealed, from_unix_ms(9_999)));
        assert!(codec.pending_expired(&state_key("s2"), &sealed, from_unix_ms(0)));
    }
}
