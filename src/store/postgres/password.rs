//! The PostgreSQL password, applied to each new connection. From `--store-password-file` it is
//! read again for every connection the pool or the listener opens, so a password rotation needs
//! no restart: give the role its new password, put it in the file, and connections made from then
//! on use it (open ones stay logged in; PostgreSQL checks a password only at login).

use std::{
    fmt,
    path::{Path, PathBuf},
    sync::Mutex,
};

use secrecy::{ExposeSecret, SecretString};

/// Where the password comes from.
pub(super) enum Password {
    /// No password (trust or peer authentication).
    None,
    /// Given once (tests).
    Given(SecretString),
    /// Read from this file for every new connection.
    File(PasswordFile),
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::None => f.write_str("None"),
            Self::Given(_) => f.write_str("Given(<redacted>)"),
            Self::File(file) => write!(f, "File({})", file.path.display()),
        }
    }
}

impl Password {
    /// Puts the password a new connection should log in with into `pg`.
    pub(super) fn apply(&self, pg: &mut tokio_postgres::Config) {
        match self {
            Self::None => {}
            Self::Given(password) => {
                pg.password(password.expose_secret());
            }
            Self::File(file) => {
                pg.password(file.read().expose_secret());
            }
        }
    }
}

/// `--store-password-file`, with the last password read from it.
pub(super) struct PasswordFile {
    path: PathBuf,
    state: Mutex<State>,
}

struct State {
    last: SecretString,
    /// Why the file could not be read last time, so that an outage is logged once.
    failing: Option<String>,
}

impl PasswordFile {
    /// Reads the file once, so that a file that cannot be read stops the start.
    pub(super) fn open(path: &Path) -> Result<Self, String> {
        let last = read(path)?;
        Ok(Self {
            path: path.to_owned(),
            state: Mutex::new(State {
                last,
                failing: None,
            }),
        })
    }

    /// The password in the file now; if it cannot be read, the last one read (logged once).
    fn read(&self) -> SecretString {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match read(&self.path) {
            Ok(password) => {
                if state.failing.take().is_some() {
                    tracing::info!(file = %self.path.display(), "the store password file is readable again");
                }
                state.last = password.clone();
                password
            }
            Err(why) => {
                if state.failing.as_ref() != Some(&why) {
                    tracing::warn!(error = %why, "new store connections log in with the password read before");
                    state.failing = Some(why);
                }
                state.last.clone()
            }
        }
    }
}

/// The file's content without its trailing line break.
fn read(path: &Path) -> Result<SecretString, String> {
    let raw = std::fs::read_to_string(path).map_err(|e| {
        format!(
            "cannot read the store password file {} (--store-password-file / CREDENTIAL_SERVICE_STORE_PASSWORD_FILE): {e}",
            path.display()
        )
    })?;
    Ok(SecretString::from(raw.trim_end_matches(['\n', '\r'])))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_connection_reads_the_file_and_a_lost_file_keeps_the_last_password() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("password");
        std::fs::write(&path, "first\n").unwrap();
        let password = Password::File(PasswordFile::open(&path).unwrap());
        let applied = |password: &Password| {
            let mut pg = tokio_postgres::Config::new();
            password.apply(&mut pg);
            pg.get_password()
                .map(|p| String::from_utf8(p.to_vec()).unwrap())
        };
        assert_eq!(applied(&password).as_deref(), Some("first"));
        std::fs::write(&path, "second\r\n").unwrap();
        assert_eq!(applied(&password).as_deref(), Some("second"));
        std::fs::remove_file(&path).unwrap();
        assert_eq!(applied(&password).as_deref(), Some("second"));
        assert!(!format!("{password:?}").contains("second"));
        let Err(e) = PasswordFile::open(&path) else {
            panic!("a missing file opens");
        };
        assert!(e.contains("--store-password-file"), "{e}");
    }
}
