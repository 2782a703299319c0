//! `credctl reseal`: ResealRecords, after an encryption key rotation. Prints what was re-sealed
//! and what remains on other keys (key ids, never keys); remaining records make it exit 1, so a
//! script retires the old key only once nothing needs it.

use std::io::Write;

use credential_client::{GrpcClient as Client, proto::ResealRecordsRequest};
use serde_json::json;

use super::{CliError, print_json};

/// Runs ResealRecords and reports it.
pub(crate) async fn reseal(
    client: &mut Client,
    json: bool,
    out: &mut impl Write,
) -> Result<(), CliError> {
    let r = client
        .reseal_records(ResealRecordsRequest {})
        .await?
        .into_inner();
    let mut remaining: Vec<(String, u64)> = r.remaining.into_iter().collect();
    remaining.sort();
    let left: u64 = remaining.iter().map(|(_, n)| n).sum();
    if json {
        print_json(
            out,
            json!({
                "key_id": r.key_id,
                "resealed": r.resealed,
                "already_current": r.already_current,
                "remaining": remaining
                    .iter()
                    .map(|(key_id, n)| (key_id.clone(), json!(n)))
                    .collect::<serde_json::Map<_, _>>(),
            }),
        )?;
    } else {
        writeln!(
            out,
            "Re-sealed {} record(s) with key {}; {} already were.",
            r.resealed, r.key_id, r.already_current
        )?;
        if remaining.is_empty() {
            writeln!(
                out,
                "Every record is sealed with key {}: the previous key files can be retired.",
                r.key_id
            )?;
        }
        for (key_id, n) in &remaining {
            writeln!(out, "Still sealed with key {key_id}: {n} record(s).")?;
        }
    }
    if left > 0 {
        return Err(CliError::Incomplete(format!(
            "{left} record(s) remain sealed with other keys"
        )));
    }
    Ok(())
}
