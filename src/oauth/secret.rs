//! The OAuth app's client secret. EdgeTag shows a secret once and rolling it breaks the old one
//! at once (EDGETAG.md §6), so a secret from `--client-secret-file` is re-read while serving: on
//! SIGHUP and when the file's content changes (the server's reloader), and when EdgeTag rejects
//! the client ([`ClientSecret::after_rejection`]), so that a roll followed by the new file costs
//! callers nothing. A secret from EDGETAG_CLIENT_SECRET is fixed for the life of the process.

use std::{fmt, path::Path, sync::Arc};

use secrecy::SecretString;

use crate::reload::{self, FileBacked, Reloadable};

/// The client secret, from a file (reloadable) or fixed. Cheap to clone; clones share reloads.
/// `Debug` shows where it comes from, never the secret.
#[derive(Clone)]
pub struct ClientSecret(Source);

#[derive(Clone)]
enum Source {
    Fixed(Arc<SecretString>),
    File(Arc<FileBacked<SecretString>>),
}

impl fmt::Debug for ClientSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Source::Fixed(_) => f.write_str("ClientSecret(<redacted>)"),
            Source::File(file) => write!(f, "ClientSecret({})", file.files()[0].display()),
        }
    }
}

impl ClientSecret {
    /// A secret that never changes while the process runs.
    pub fn fixed(secret: SecretString) -> Self {
        Self(Source::Fixed(Arc::new(secret)))
    }

    /// The secret in `path`: trimmed, not empty. Re-read later by [`ClientSecret::reloadable`]
    /// and [`ClientSecret::after_rejection`].
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let file = path.to_owned();
        let loaded = FileBacked::load(
            "the client secret file",
            vec![path.to_owned()],
            Box::new(move |reads| one_line(&file, &reads[0])),
            |_| "EdgeTag requests use the new secret".to_owned(),
        )?;
        Ok(Self(Source::File(Arc::new(loaded))))
    }

    /// The secret to send now.
    pub fn current(&self) -> Arc<SecretString> {
        match &self.0 {
            Source::Fixed(secret) => secret.clone(),
            Source::File(file) => file.current(),
        }
    }

    /// After EdgeTag rejected `used`: re-reads the file once, and returns the secret to retry
    /// with if it is not `used` (the file changed since, or a reload took a newer one up
    /// meanwhile). `None` when there is nothing new to try.
    pub fn after_rejection(&self, used: &Arc<SecretString>) -> Option<Arc<SecretString>> {
        let Source::File(file) = &self.0 else {
            return None;
        };
        if let Err(reason) = file.reload() {
            // The reloader reports a broken file once; every rejected request would repeat it.
            tracing::debug!(error = %reason, "the client secret file could not be re-read");
        }
        let current = file.current();
        (!Arc::ptr_eq(&current, used)).then_some(current)
    }

    /// The file for the server's reloader; `None` for a fixed secret.
    pub fn reloadable(&self) -> Option<Arc<dyn Reloadable>> {
        match &self.0 {
            Source::Fixed(_) => None,
            Source::File(file) => Some(file.clone()),
        }
    }
}

impl From<SecretString> for ClientSecret {
    fn from(secret: SecretString) -> Self {
        Self::fixed(secret)
    }
}

impl From<String> for ClientSecret {
    fn from(secret: String) -> Self {
        Self::fixed(secret.into())
    }
}

impl From<&str> for ClientSecret {
    fn from(secret: &str) -> Self {
        Self::fixed(secret.into())
    }
}

/// A secret file's content: surrounding white space (a trailing line break) is not part of it, and
/// an empty file is refused.
fn one_line(path: &Path, read: &reload::Read) -> Result<SecretString, String> {
    let what = "the client secret file (--client-secret-file / EDGETAG_CLIENT_SECRET_FILE)";
    let bytes = reload::content(read, what, path)?;
    let text = std::str::from_utf8(bytes).map_err(|_| {
        format!(
            "the client secret file {} is not UTF-8 text",
            path.display()
        )
    })?;
    let secret = text.trim();
    if secret.is_empty() {
        return Err(format!(
            "the client secret file {} is empty",
            path.display()
        ));
    }
    Ok(SecretString::from(secret))
}

#[cfg(test)]
mod tests {
    use secrecy::ExposeSecret;

    use super::*;

    #[test]
    fn a_rejection_rereads_the_file_and_offers_only_a_new_secret() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, "first\n").unwrap();
        let secret = ClientSecret::from_file(&path).unwrap();
        let used = secret.current();
        assert_eq!(used.expose_secret(), "first");
        assert!(secret.after_rejection(&used).is_none(), "unchanged");

        std::fs::write(&path, "second\n").unwrap();
        let retry = secret.after_rejection(&used).unwrap();
        assert_eq!(retry.expose_secret(), "second");
        // Another request that used the old secret retries with the new one too, without a read
        // that finds anything new.
        assert_eq!(
            secret.after_rejection(&used).unwrap().expose_secret(),
            "second"
        );
        assert!(secret.after_rejection(&retry).is_none());

        // A broken file leaves the secret in force.
        std::fs::write(&path, "  \n").unwrap();
        assert!(secret.after_rejection(&retry).is_none());
        assert_eq!(secret.current().expose_secret(), "second");

        let fixed = ClientSecret::from("env");
        assert!(fixed.after_rejection(&fixed.current()).is_none());
        assert!(fixed.reloadable().is_none());
        for debug in [format!("{secret:?}"), format!("{fixed:?}")] {
            assert!(
                !debug.contains("second") && !debug.contains("env"),
                "{debug}"
            );
        }
    }
}
