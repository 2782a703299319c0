//! [`ServeError`]: why the server could not start or stopped with an error. Its own file, so the
//! parts of `server` that return it need not import the file that assembles them.

use std::net::SocketAddr;

use crate::{sealing::KeyError, store::StoreError};

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Keys(#[from] KeyError),
    #[error(
        "refusing to serve on {0} without a callers file: only loopback is safe when every call is allowed"
    )]
    OpenOnNetwork(std::net::SocketAddr),
    #[error("cannot build the HTTP client for EdgeTag: {0}")]
    HttpClient(#[from] reqwest::Error),
    #[error("cannot build the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("gRPC transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("cannot open the audit file {path} (--audit-file): {source}")]
    AuditFile {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        what: String,
        addr: SocketAddr,
        source: std::io::Error,
    },
}
