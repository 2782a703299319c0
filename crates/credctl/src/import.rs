//! `credctl import FILE`: grants obtained elsewhere, one JSON object per line
//! (`{"account": "...", "refresh_token": "...", "access_token": "...", "expires_at": "RFC 3339"}`,
//! the last two optional), each handed to the ImportGrant RPC. Secrets come only from the file
//! or standard input (`-`), never from the command line, where `ps` and shell history would keep
//! them. Every line gets a result, then a summary; the exit code says whether all were imported.
//!
//! No message ever quotes the input: a malformed line is reported by number and by what is wrong
//! with it, since the line may hold a token.

use std::{io::Write, path::Path, time::SystemTime};

use serde_json::{Value, json};
use tonic::Code;

use super::{CliError, Client, format_time, print_json};
use credential_client::proto::{ImportGrantRequest, ImportOutcome};

/// Refuses an argument that carries a grant instead of naming a file: it would already sit in
/// `ps` and the shell history.
pub(super) fn refuse_secret_argument(file: &str) -> Result<(), CliError> {
    if file.trim_start().starts_with('{') || file.contains("refresh_token") {
        return Err(CliError::Usage(
            "import reads grants from a file or from standard input (-), never from the command \
             line, where other users see them in `ps` and the shell history keeps them; this \
             argument looks like a grant: treat its refresh token as exposed"
                .into(),
        ));
    }
    Ok(())
}

/// Reads the grants: the whole file (or standard input) before anything is sent.
pub(super) fn read_input(file: &str) -> Result<String, CliError> {
    if file == "-" {
        return std::io::read_to_string(std::io::stdin())
            .map_err(|e| CliError::Usage(format!("cannot read standard input: {e}")));
    }
    std::fs::read_to_string(Path::new(file))
        .map_err(|e| CliError::Usage(format!("cannot read {file}: {e}")))
}

/// One line's grant, or why the line is not one.
fn parse_line(line: &str) -> Result<ImportGrantRequest, String> {
    let value: Value = serde_json::from_str(line).map_err(|e| {
        // serde_json's syntax errors name a position only, never the text.
        format!("not JSON ({} at column {})", category(&e), e.column())
    })?;
    let Value::Object(fields) = value else {
        return Err("not a JSON object".into());
    };
    let text = |name: &str, required: bool| match fields.get(name) {
        Some(Value::String(s)) if !s.is_empty() => Ok(Some(s.clone())),
        None | Some(Value::Null) if !required => Ok(None),
        None | Some(Value::Null) => Err(format!("{name} is missing")),
        Some(_) => Err(format!("{name} must be a non-empty string")),
    };
    let account = text("account", true)?.unwrap_or_default();
    let refresh_token = text("refresh_token", true)?.unwrap_or_default();
    let access_token = text("access_token", false)?;
    let expires_at = text("expires_at", false)?
        .map(|s| {
            humantime::parse_rfc3339_weak(&s)
                .map_err(|_| "expires_at is not an RFC 3339 time".to_owned())
        })
        .transpose()?;
    if access_token.is_some() != expires_at.is_some() {
        return Err("access_token and expires_at go together: give both or neither".into());
    }
    Ok(ImportGrantRequest {
        account,
        refresh_token,
        access_token: access_token.unwrap_or_default(),
        access_token_expires_at: expires_at.map(|t: SystemTime| t.into()),
        replace: false,
    })
}

fn category(e: &serde_json::Error) -> &'static str {
    match e.classify() {
        serde_json::error::Category::Eof => "it ends early",
        _ => "a syntax error",
    }
}

/// How one line ended.
#[derive(Clone, Copy)]
enum LineResult {
    Refreshed,
    Stored,
    NeedsReauth,
    Exists,
    Malformed,
    Failed,
}

impl LineResult {
    fn name(&self) -> &'static str {
        match self {
            Self::Refreshed => "refreshed",
            Self::Stored => "stored",
            Self::NeedsReauth => "needs_reauth",
            Self::Exists => "exists",
            Self::Malformed => "malformed",
            Self::Failed => "failed",
        }
    }
}

/// Imports every line of `input`, printing one result per line and a summary.
pub(super) async fn import(
    client: &mut Client,
    json: bool,
    out: &mut impl Write,
    input: &str,
    replace: bool,
) -> Result<(), CliError> {
    let mut counts = [0usize; 6];
    for (i, line) in input.lines().enumerate() {
        let number = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let (result, account, message) = match parse_line(line) {
            Err(why) => (LineResult::Malformed, String::new(), why),
            Ok(mut request) => {
                request.replace = replace;
                let account = request.account.clone();
                let (result, message) = match client.import_grant(request).await {
                    Ok(r) => {
                        let r = r.into_inner();
                        let expires = r.expires_at.map(format_time).unwrap_or_default();
                        match r.outcome() {
                            ImportOutcome::Stored => (
                                LineResult::Stored,
                                format!("imported with its access token (expires {expires})"),
                            ),
                            _ => (
                                LineResult::Refreshed,
                                format!("imported; EdgeTag refreshed it (expires {expires})"),
                            ),
                        }
                    }
                    Err(s) if s.code() == Code::FailedPrecondition => {
                        (LineResult::NeedsReauth, s.message().to_owned())
                    }
                    Err(s) if s.code() == Code::AlreadyExists => (
                        LineResult::Exists,
                        "already connected; not overwritten (pass --replace to overwrite)".into(),
                    ),
                    Err(s) => (
                        LineResult::Failed,
                        format!(
                            "{}: {}",
                            credential_client::code_name(s.code()),
                            s.message()
                        ),
                    ),
                };
                (result, account, message)
            }
        };
        counts[result as usize] += 1;
        if json {
            writeln!(
                out,
                "{}",
                json!({"line": number, "account": account, "result": result.name(), "message": message})
            )?;
        } else if account.is_empty() {
            writeln!(out, "line {number}: {}: {message}", result.name())?;
        } else {
            writeln!(out, "line {number} {account}: {}: {message}", result.name())?;
        }
        out.flush()?;
    }
    let [refreshed, stored, needs_reauth, exists, malformed, failed] = counts;
    let imported = refreshed + stored;
    let total: usize = counts.iter().sum();
    if json {
        print_json(
            out,
            json!({"summary": {"lines": total, "imported": imported, "refreshed": refreshed,
                "stored": stored, "needs_reauth": needs_reauth, "exists": exists,
                "malformed": malformed, "failed": failed}}),
        )?;
    } else {
        writeln!(
            out,
            "Imported {imported} of {total} grant(s) ({refreshed} refreshed, {stored} with their access token); \
             {needs_reauth} need(s) re-authorization, {exists} already connected, {malformed} malformed, {failed} failed."
        )?;
    }
    if imported == total {
        Ok(())
    } else {
        Err(CliError::NotAllImported { imported, total })
    }
}
