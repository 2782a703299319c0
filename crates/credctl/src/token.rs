//! The bearer token credctl sends: from `--token-file` (preferred: a command line is visible to
//! every local user in `ps` and `/proc/PID/cmdline`), `--token` or `CREDCTL_TOKEN`. It is kept
//! out of the argument parser's errors and out of the environment of the programs credctl starts.

use std::{ffi::OsString, path::Path, process::ExitCode};

use clap::Parser;
use secrecy::SecretString;

use crate::{Cli, CliError};

/// The variables that carry the token or say where it is: never passed on to a child process.
pub(crate) const VARIABLES: [&str; 2] = ["CREDCTL_TOKEN", "CREDCTL_TOKEN_FILE"];

/// Parses the command line. On a parse error, prints it (as clap would, without colours) with
/// every token value given on the command line or in `CREDCTL_TOKEN` replaced by `<redacted>`,
/// and returns the exit code.
pub fn parse() -> Result<Cli, ExitCode> {
    let args: Vec<OsString> = std::env::args_os().collect();
    Cli::try_parse_from(&args).map_err(|e| {
        let mut secrets = token_values(&args);
        secrets.extend(std::env::var("CREDCTL_TOKEN").ok());
        let text = redact(&e.render().to_string(), &secrets);
        if e.use_stderr() {
            eprint!("{text}");
        } else {
            print!("{text}");
        }
        ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(crate::exit::USAGE))
    })
}

/// The values given to `--token` in `args` (`--token VALUE` or `--token=VALUE`).
fn token_values(args: &[OsString]) -> Vec<String> {
    let mut values = Vec::new();
    let mut args = args.iter().map(|a| a.to_string_lossy());
    while let Some(arg) = args.next() {
        if arg == "--token" {
            values.extend(args.next().map(|v| v.into_owned()));
        } else if let Some(value) = arg.strip_prefix("--token=") {
            values.push(value.to_owned());
        }
    }
    values
}

/// `text` with each non-empty secret replaced by `<redacted>`, longest first (one may hold another).
fn redact(text: &str, secrets: &[String]) -> String {
    let mut secrets: Vec<&str> = secrets
        .iter()
        .map(String::as_str)
        .filter(|s| !s.is_empty())
        .collect();
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    secrets.into_iter().fold(text.to_owned(), |text, secret| {
        text.replace(secret, "<redacted>")
    })
}

/// The token to send: from `--token` / `CREDCTL_TOKEN`, or from the first line of `--token-file`
/// / `CREDCTL_TOKEN_FILE`; giving both is a usage error, since which one was meant is unclear.
pub(crate) fn bearer(
    token: Option<String>,
    file: Option<&Path>,
) -> Result<Option<SecretString>, CliError> {
    let token = token.filter(|t| !t.is_empty());
    match (token, file) {
        (Some(_), Some(_)) => Err(CliError::Usage(
            "both --token (or CREDCTL_TOKEN) and --token-file (or CREDCTL_TOKEN_FILE) are set: \
             give the token one way"
                .into(),
        )),
        (Some(token), None) => Ok(Some(SecretString::from(token))),
        (None, Some(path)) => read_file(path).map(Some),
        (None, None) => Ok(None),
    }
}

/// The token in `path`: its first line, without surrounding whitespace. Errors name the file,
/// never its content; a file that others may read is worth a warning.
fn read_file(path: &Path) -> Result<SecretString, CliError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        CliError::Usage(format!("cannot read --token-file {}: {e}", path.display()))
    })?;
    let token = text.lines().next().unwrap_or("").trim();
    if token.is_empty() {
        return Err(CliError::Usage(format!(
            "--token-file {} holds no token on its first line",
            path.display()
        )));
    }
    #[cfg(unix)]
    if let Ok(meta) = std::fs::metadata(path) {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            eprintln!(
                "credctl: warning: --token-file {} may be read by others (mode {mode:04o}); \
                 chmod 600 it",
                path.display()
            );
        }
    }
    Ok(SecretString::from(token))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_values_are_found_in_both_spellings_and_redacted() {
        let args: Vec<OsString> = [
            "credctl",
            "--token",
            "-abc",
            "list",
            "--token=xyz-1",
            "--json",
        ]
        .into_iter()
        .map(OsString::from)
        .collect();
        let values = token_values(&args);
        assert_eq!(values, ["-abc", "xyz-1"]);
        assert_eq!(
            redact("unexpected '-abc' and 'xyz-1'; not ''", &values),
            "unexpected '<redacted>' and '<redacted>'; not ''"
        );
        assert_eq!(
            redact("ab abc", &["ab".into(), "abc".into()]),
            "<redacted> <redacted>"
        );
    }

    #[test]
    fn a_token_comes_one_way_from_a_file_or_the_flag() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "  file-token \nsecond line\n").unwrap();
        use secrecy::ExposeSecret;
        let from_file = bearer(None, Some(&file)).unwrap().unwrap();
        assert_eq!(from_file.expose_secret(), "file-token");
        let from_flag = bearer(Some("flag-token".into()), None).unwrap().unwrap();
        assert_eq!(from_flag.expose_secret(), "flag-token");
        assert!(bearer(Some(String::new()), None).unwrap().is_none());
        let both = bearer(Some("flag-token".into()), Some(&file)).unwrap_err();
        assert_eq!(both.exit_code(), crate::exit::USAGE);
        assert!(!both.to_string().contains("token-token"));
        std::fs::write(&file, "\n").unwrap();
        let empty = bearer(None, Some(&file)).unwrap_err().to_string();
        assert!(empty.contains("no token"), "{empty}");
        let missing = bearer(None, Some(&dir.path().join("nope"))).unwrap_err();
        assert!(missing.to_string().contains("nope"), "{missing}");
    }
}
