//! The backup file, version 1. Every integer is big-endian.
//!
//! | bytes | field |
//! |---|---|
//! | 8 | magic `CSBACKUP` |
//! | 4 | format version (1); a reader refuses any other |
//! | 4 | header length `H` |
//! | `H` | header, a JSON object: `format` (1), `created_at` (RFC 3339, UTC), `source` (`sled` or `postgres`), `key_ids` (hex ids of the keys that sealed the records, sorted), `accounts` (how many records follow) |
//! | | then, per account, sorted by name: |
//! | 2 | name length `L` |
//! | `L` | account name (UTF-8) |
//! | 8 | version |
//! | 1 | flags: bit 0 set when the account needs re-authorization; the other bits 0 |
//! | 4 | sealed length `S` |
//! | `S` | the record exactly as stored: `[1][key id: 4][nonce: 24][ciphertext + tag]` (see `sealing`); the key id is its bytes 1 to 4 |
//! | 32 | SHA-256 of every byte before it |
//!
//! The version and the flag repeat what is sealed inside the record, so that a file lists them
//! without keys; a restore opens each record and refuses one whose sealed version or mark differs.
//! The checksum finds damage and truncation, not forgery: the records' own seals stop forgery of
//! their contents.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{account::AccountId, store::RawAccount};

const MAGIC: &[u8; 8] = b"CSBACKUP";
/// The format this binary writes, and the only one it reads.
pub const FORMAT: u32 = 1;
const CHECKSUM_LEN: usize = 32;
const NEEDS_REAUTH: u8 = 1;

/// What a backup says about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub format: u32,
    /// RFC 3339, UTC, whole seconds.
    pub created_at: String,
    /// The store kind it was taken from (`sled`, `postgres`).
    pub source: String,
    /// The ids of the keys that sealed the records: a restore needs each of them.
    pub key_ids: BTreeSet<String>,
    pub accounts: u64,
}

impl Header {
    /// The header of a backup of `records` taken now from a `source` store.
    pub fn new(source: &str, records: &[RawAccount]) -> Self {
        Self {
            format: FORMAT,
            created_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            source: source.to_owned(),
            key_ids: records.iter().filter_map(RawAccount::key_id).collect(),
            accounts: records.len() as u64,
        }
    }
}

/// Writes a backup piece by piece, hashing as it goes, so a large one is streamed rather than
/// built whole.
pub struct Encoder {
    hasher: Sha256,
    out: Vec<u8>,
}

impl Encoder {
    pub fn new(header: &Header) -> Self {
        let json = serde_json::to_vec(header).expect("a header always serializes");
        let mut encoder = Self {
            hasher: Sha256::new(),
            out: Vec::with_capacity(64 * 1024),
        };
        encoder.put(MAGIC);
        encoder.put(&FORMAT.to_be_bytes());
        encoder.put(&(json.len() as u32).to_be_bytes());
        encoder.put(&json);
        encoder
    }

    pub fn record(&mut self, r: &RawAccount) {
        let name = r.account.as_str().as_bytes();
        // Account names are at most 128 bytes; sealed records a few hundred.
        self.put(&(name.len() as u16).to_be_bytes());
        self.put(name);
        self.put(&r.version.to_be_bytes());
        self.put(&[if r.needs_reauth { NEEDS_REAUTH } else { 0 }]);
        self.put(&(r.sealed.len() as u32).to_be_bytes());
        self.put(&r.sealed);
    }

    /// How many encoded bytes wait to be taken.
    pub fn pending(&self) -> usize {
        self.out.len()
    }

    /// The bytes encoded since the last take.
    pub fn take(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }

    /// The last bytes: what is left, then the checksum.
    pub fn finish(mut self) -> Vec<u8> {
        let sum = self.hasher.finalize();
        self.out.extend_from_slice(&sum);
        self.out
    }

    fn put(&mut self, bytes: &[u8]) {
        self.hasher.update(bytes);
        self.out.extend_from_slice(bytes);
    }
}

/// A whole backup in memory (its header and records), for tests and small tools.
pub fn encode(header: &Header, records: &[RawAccount]) -> Vec<u8> {
    let mut encoder = Encoder::new(header);
    let mut out = Vec::new();
    for r in records {
        encoder.record(r);
        out.append(&mut encoder.take());
    }
    out.append(&mut encoder.finish());
    out
}

/// A backup read back, checksum verified.
#[derive(Debug)]
pub struct Backup {
    pub header: Header,
    pub records: Vec<RawAccount>,
}

/// Why a file is not a backup this binary can restore; each message is one line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("not a credential-service backup (no CSBACKUP magic at its start)")]
    NotABackup,
    #[error(
        "backup format version {0} is not one this binary reads (it reads {FORMAT}); use a newer credential-service"
    )]
    UnknownFormat(u32),
    #[error("the file is damaged or truncated: its SHA-256 does not match its contents")]
    Checksum,
    #[error("the file is malformed although its checksum matches: {0}")]
    Malformed(String),
}

/// Reads a backup: magic, format, checksum first (nothing else is trusted before it), then the
/// header and every record.
pub fn decode(bytes: &[u8]) -> Result<Backup, FormatError> {
    if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
        return Err(FormatError::NotABackup);
    }
    let mut r = Reader(&bytes[MAGIC.len()..]);
    let format = r.u32().map_err(|_| FormatError::Checksum)?;
    if format != FORMAT {
        return Err(FormatError::UnknownFormat(format));
    }
    if bytes.len() < MAGIC.len() + 8 + CHECKSUM_LEN {
        return Err(FormatError::Checksum);
    }
    let (body, sum) = bytes.split_at(bytes.len() - CHECKSUM_LEN);
    if Sha256::digest(body).as_slice() != sum {
        return Err(FormatError::Checksum);
    }
    let mut r = Reader(&body[MAGIC.len() + 4..]);
    let header_len = r.u32()? as usize;
    let header: Header = serde_json::from_slice(r.take(header_len)?)
        .map_err(|e| FormatError::Malformed(format!("header: {e}")))?;
    let mut records = Vec::with_capacity(header.accounts.min(1 << 20) as usize);
    for _ in 0..header.accounts {
        let name_len = usize::from(r.u16()?);
        let name = std::str::from_utf8(r.take(name_len)?)
            .ok()
            .and_then(|n| AccountId::parse(n).ok())
            .ok_or_else(|| FormatError::Malformed("an account name is not valid".into()))?;
        let version = r.u64()?;
        let flags = r.take(1)?[0];
        if flags & !NEEDS_REAUTH != 0 {
            return Err(FormatError::Malformed(format!(
                "account {name}: unknown flags {flags:#04x}"
            )));
        }
        let sealed_len = r.u32()? as usize;
        let sealed = r.take(sealed_len)?.to_vec();
        if records
            .last()
            .is_some_and(|last: &RawAccount| last.account >= name)
        {
            return Err(FormatError::Malformed(format!(
                "account {name} is out of order or repeated"
            )));
        }
        records.push(RawAccount {
            account: name,
            version,
            needs_reauth: flags & NEEDS_REAUTH != 0,
            sealed,
        });
    }
    if !r.0.is_empty() {
        return Err(FormatError::Malformed(format!(
            "{} bytes after the {} records the header announces",
            r.0.len(),
            header.accounts
        )));
    }
    Ok(Backup { header, records })
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FormatError> {
        if self.0.len() < n {
            return Err(FormatError::Malformed(
                "it ends before the records the header announces".into(),
            ));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u16(&mut self) -> Result<u16, FormatError> {
        Ok(u16::from_be_bytes(self.take(2)?.try_into().unwrap()))
    }

    fn u32(&mut self) -> Result<u32, FormatError> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().unwrap()))
    }

    fn u64(&mut self) -> Result<u64, FormatError> {
        Ok(u64::from_be_bytes(self.take(8)?.try_into().unwrap()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(name: &str, version: u64, needs_reauth: bool) -> RawAccount {
        RawAccount {
            account: AccountId::parse(name).unwrap(),
            version,
            needs_reauth,
            sealed: [&[1u8, 0xab, 0xcd, 0xef, 0x01][..], &[7; 60]].concat(),
        }
    }

    fn sample() -> (Header, Vec<RawAccount>, Vec<u8>) {
        let records = vec![raw("acme", 3, false), raw("globex", 1, true)];
        let header = Header::new("sled", &records);
        let bytes = encode(&header, &records);
        (header, records, bytes)
    }

    #[test]
    fn a_backup_reads_back_as_written() {
        let (header, records, bytes) = sample();
        assert_eq!(header.key_ids.iter().collect::<Vec<_>>(), ["abcdef01"]);
        assert_eq!(header.accounts, 2);
        let back = decode(&bytes).unwrap();
        assert_eq!(back.header, header);
        assert_eq!(back.records, records);
        // Streaming in pieces gives the same bytes as encoding whole.
        let mut encoder = Encoder::new(&header);
        let mut streamed = encoder.take();
        for r in &records {
            encoder.record(r);
            streamed.extend(encoder.take());
        }
        streamed.extend(encoder.finish());
        assert_eq!(streamed, bytes);
        let empty = encode(&Header::new("postgres", &[]), &[]);
        assert!(decode(&empty).unwrap().records.is_empty());
    }

    #[test]
    fn every_truncation_and_every_flipped_byte_is_refused() {
        let (_, _, bytes) = sample();
        for len in 0..bytes.len() {
            assert!(decode(&bytes[..len]).is_err(), "truncated to {len}");
        }
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x01;
            assert!(decode(&bad).is_err(), "byte {i} flipped");
        }
        let mut bad = bytes.clone();
        bad[MAGIC.len() + 3] = 2;
        assert_eq!(decode(&bad).unwrap_err(), FormatError::UnknownFormat(2));
        assert_eq!(decode(b"hello").unwrap_err(), FormatError::NotABackup);
        let mut cut = bytes.clone();
        cut.truncate(bytes.len() - 10);
        assert_eq!(decode(&cut).unwrap_err(), FormatError::Checksum);
    }
}
