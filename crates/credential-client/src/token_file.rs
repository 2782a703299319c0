//! A bearer token read from a file and read again when the file changes: a Kubernetes projected
//! service-account token, which the kubelet rewrites well before it expires.
//!
//! Every call looks at the file's metadata (one `stat`, through symlinks) and reads the file only
//! when its device, inode, size or modification time differ from the last read. The kubelet
//! replaces a projected volume's files by pointing its `..data` symlink at a new directory, so the
//! token path then leads to a new inode; a file rewritten in place gets a new modification time.
//! A `stat` costs about a microsecond, far below a call's round trip, and unlike a timer it
//! cannot send a token the kubelet has already replaced.

use std::{
    path::{Path, PathBuf},
    sync::Mutex,
    time::SystemTime,
};

use tonic::metadata::{Ascii, MetadataValue};

/// What tells one version of the file from another.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Stamp {
    device: u64,
    inode: u64,
    len: u64,
    modified: Option<SystemTime>,
}

impl Stamp {
    fn of(metadata: &std::fs::Metadata) -> Self {
        #[cfg(unix)]
        let (device, inode) = {
            use std::os::unix::fs::MetadataExt;
            (metadata.dev(), metadata.ino())
        };
        #[cfg(not(unix))]
        let (device, inode) = (0, 0);
        Self {
            device,
            inode,
            len: metadata.len(),
            modified: metadata.modified().ok(),
        }
    }
}

/// Why the token file could not be used. Names the file, never its content.
#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    #[error("cannot read the bearer token file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the bearer token file {path} has no token on its first line")]
    Empty { path: PathBuf },
    #[error("the bearer token in {path} holds characters an HTTP header cannot carry")]
    Invalid { path: PathBuf },
}

/// The file and the header made from its last good read.
pub(crate) struct TokenFile {
    path: PathBuf,
    last: Mutex<Option<(Stamp, MetadataValue<Ascii>)>>,
}

impl TokenFile {
    /// Reads `path` once, so that a missing or empty file shows up when the client is built.
    pub(crate) fn open(path: &Path) -> Result<Self, TokenFileError> {
        let file = Self {
            path: path.to_owned(),
            last: Mutex::new(None),
        };
        file.header()?;
        Ok(file)
    }

    /// `Bearer <first line of the file>`, read again if the file changed. If it cannot be read
    /// now but could before, the last token is sent (the service will say if it expired).
    pub(crate) fn header(&self) -> Result<MetadataValue<Ascii>, TokenFileError> {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let read_error = |source| TokenFileError::Read {
            path: self.path.clone(),
            source,
        };
        let stamp = match std::fs::metadata(&self.path) {
            Ok(metadata) => Stamp::of(&metadata),
            Err(e) => {
                return match &*last {
                    Some((_, header)) => Ok(header.clone()),
                    None => Err(read_error(e)),
                };
            }
        };
        if let Some((known, header)) = &*last
            && *known == stamp
        {
            return Ok(header.clone());
        }
        let text = match std::fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(e) => {
                return match &*last {
                    Some((_, header)) => Ok(header.clone()),
                    None => Err(read_error(e)),
                };
            }
        };
        let token = text.lines().next().unwrap_or("").trim();
        if token.is_empty() {
            // A writer half-way through: keep the last token if there is one.
            return match &*last {
                Some((_, header)) => Ok(header.clone()),
                None => Err(TokenFileError::Empty {
                    path: self.path.clone(),
                }),
            };
        }
        let mut header = MetadataValue::try_from(format!("Bearer {token}")).map_err(|_| {
            TokenFileError::Invalid {
                path: self.path.clone(),
            }
        })?;
        header.set_sensitive(true);
        *last = Some((stamp, header.clone()));
        Ok(header)
    }
}
