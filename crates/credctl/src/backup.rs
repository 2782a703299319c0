//! `credctl backup FILE`: the Backup RPC's stream, written so that only a complete, verified
//! backup ever carries the name FILE: a private (0600) temporary file beside it, the trailing
//! SHA-256 checked against the bytes received, fsync, rename, fsync of the directory.
//!
//! Of the file format (README "Backups"; the service's `backup::format` writes and reads it) only
//! what this needs is read here: the header, for the summary, and the checksum at the end.

use std::{
    fs::File,
    io::{BufWriter, Write},
    path::Path,
};

use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};

use super::{CliError, Client, print_json};
use credential_client::proto::BackupRequest;

const MAGIC: &[u8] = b"CSBACKUP";
const CHECKSUM_LEN: usize = 32;

/// The header fields the summary names.
#[derive(Deserialize)]
struct Header {
    created_at: String,
    source: String,
    key_ids: Vec<String>,
    accounts: u64,
}

/// Writes the service's backup to `file`; see the module docs.
pub(super) async fn backup(
    client: &mut Client,
    json: bool,
    out: &mut impl Write,
    file: &Path,
) -> Result<(), CliError> {
    let failed =
        |e: std::io::Error| CliError::Failed(format!("cannot write {}: {e}", file.display()));
    let dir = match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = file
        .file_name()
        .ok_or_else(|| CliError::Usage(format!("{} is not a file name", file.display())))?;
    // Created 0600, and removed when dropped before it is renamed into place.
    let temp = tempfile::Builder::new()
        .prefix(&format!(".{}.", name.to_string_lossy()))
        .suffix(".partial")
        .tempfile_in(dir)
        .map_err(failed)?;
    let mut stream = client.backup(BackupRequest {}).await?.into_inner();
    let mut writer = BufWriter::new(temp.as_file());
    let (mut hasher, mut tail, mut head) = (Sha256::new(), Vec::new(), Vec::new());
    let mut bytes = 0u64;
    while let Some(piece) = stream.message().await? {
        bytes += piece.data.len() as u64;
        if head.len() < 64 * 1024 {
            head.extend_from_slice(&piece.data);
        }
        // Everything but the last 32 bytes received is hashed: those are the checksum.
        tail.extend_from_slice(&piece.data);
        let settled = tail.len().saturating_sub(CHECKSUM_LEN);
        hasher.update(&tail[..settled]);
        writer.write_all(&tail[..settled]).map_err(failed)?;
        tail.drain(..settled);
    }
    let sum = hasher.finalize();
    if tail.len() != CHECKSUM_LEN || tail != sum.as_slice() {
        return Err(CliError::Failed(format!(
            "the backup stream ended incomplete or damaged (its SHA-256 does not match); {} was not written",
            file.display()
        )));
    }
    let header = read_header(&head).ok_or_else(|| {
        CliError::Failed("the service sent a backup whose header this credctl cannot read".into())
    })?;
    writer.write_all(&tail).map_err(failed)?;
    writer.flush().map_err(failed)?;
    drop(writer);
    temp.as_file().sync_all().map_err(failed)?;
    temp.persist(file).map_err(|e| failed(e.error))?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(failed)?;
    let sha256 = hex(&sum);
    if json {
        print_json(
            out,
            json!({
                "file": file.display().to_string(),
                "accounts": header.accounts,
                "bytes": bytes,
                "sha256": sha256,
                "key_ids": header.key_ids,
                "created_at": header.created_at,
                "source": header.source,
            }),
        )?;
    } else {
        writeln!(
            out,
            "Backed up {} account(s) from the {} store to {} ({bytes} bytes, SHA-256 {sha256}), \
             taken at {}; the records are sealed with key(s) {}: keep the key file(s) apart from the \
             backup.\nVerify it with `credential-service restore --check {}`.",
            header.accounts,
            header.source,
            file.display(),
            header.created_at,
            header.key_ids.join(", "),
            file.display(),
        )?;
    }
    Ok(())
}

/// The header at the start of a backup: magic, format 1, length, JSON.
fn read_header(head: &[u8]) -> Option<Header> {
    let rest = head.strip_prefix(MAGIC)?;
    let format = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?);
    let len = u32::from_be_bytes(rest.get(4..8)?.try_into().ok()?) as usize;
    if format != 1 {
        return None;
    }
    serde_json::from_slice(rest.get(8..8 + len)?).ok()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
