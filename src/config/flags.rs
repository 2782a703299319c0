//! How messages name a setting: its flag and its environment variable, read from clap's
//! declarations so that each is written once, in the `#[arg]` attribute.

use std::sync::LazyLock;

use clap::{Args, Command};

use super::Settings;

/// Every setting of the server, as clap declares them.
fn declared() -> &'static Command {
    static SETTINGS: LazyLock<Command> =
        LazyLock::new(|| Settings::augment_args(Command::new("credential-service")));
    &SETTINGS
}

/// `--flag / VARIABLE` for the setting whose field is `id` (`"max_connections"`), as an operator
/// types it; `--flag` alone for a setting without a variable.
pub fn flag(id: &str) -> String {
    let Some(arg) = declared().get_arguments().find(|a| a.get_id() == id) else {
        // Unreachable for the ids in this crate (a test checks every call); still a usable name.
        debug_assert!(false, "no setting {id}");
        return format!("--{}", id.replace('_', "-"));
    };
    let long = arg.get_long().unwrap_or(id);
    match arg.get_env() {
        Some(env) => format!("--{long} / {}", env.to_string_lossy()),
        None => format!("--{long}"),
    }
}

#[cfg(test)]
mod tests {
    use std::{fs, path::Path};

    use super::*;

    #[test]
    fn names_come_from_the_declarations() {
        assert_eq!(flag("listen"), "--listen / CREDENTIAL_SERVICE_LISTEN");
        assert_eq!(
            flag("upstream_timeout"),
            "--upstream-timeout / EDGETAG_REQUEST_TIMEOUT"
        );
        assert_eq!(
            flag("max_connections"),
            "--max-connections / CREDENTIAL_SERVICE_MAX_CONNECTIONS"
        );
    }

    /// Every `flag("…")` in the crate names a declared setting (a typo would otherwise surface
    /// only in the error message it was meant for). Ids passed through a table first are checked
    /// by the tests of those messages (config's tests).
    #[test]
    fn every_call_names_a_declared_setting() {
        let ids: Vec<&str> = declared()
            .get_arguments()
            .map(|a| a.get_id().as_str())
            .collect();
        let mut calls = 0;
        let mut dirs = vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("src")];
        while let Some(dir) = dirs.pop() {
            for entry in fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    dirs.push(path);
                } else if path.file_name() != Some("flags.rs".as_ref()) {
                    let code = fs::read_to_string(&path).unwrap();
                    for call in code.split("flag(\"").skip(1) {
                        let id = &call[..call.find('"').unwrap()];
                        assert!(ids.contains(&id), "{}: flag({id:?})", path.display());
                        calls += 1;
                    }
                }
            }
        }
        assert!(calls >= 10, "found only {calls} calls");
    }
}
