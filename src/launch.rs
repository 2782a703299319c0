//! What the `credential-service` binary does between parsing its flags and exiting, so that its
//! `main` reads parse, build, run: `--dev`'s set-up, resolving the settings, raising the open-file
//! limit (`open_files`), binding every listener before anything is opened, serving until a
//! signal, `rotate-keys`, `backup` and `restore` ([`backups`]), and the exit code of each failure
//! (2: the settings cannot work as given; 1: starting, serving or a command failed).

pub mod backups;
mod open_files;

pub use self::open_files::budget as open_files_budget;

use std::{future::Future, path::Path, process::ExitCode};

use crate::{
    backup::BackupError,
    clock::Clock,
    config::{ConfigError, KeySettings, Settings, StoreConfig, StoreSettings},
    dev::{self, DevEnvironment, DevError},
    sealing::KeyError,
    server::{self, ServeError, Service, StartOptions},
    store::{PostgresStore, SledStore, Store, StoreError},
    telemetry::OtelError,
};

/// Why the binary stops with an error; [`LaunchError::exit_code`] tells scripts which kind.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Dev(#[from] DevError),
    /// Trace export cannot be set up as configured.
    #[error(transparent)]
    Telemetry(#[from] OtelError),
    /// The key files given to `rotate-keys` (the server's own key errors come as [`ServeError`]).
    #[error(transparent)]
    Keys(#[from] KeyError),
    #[error(transparent)]
    Serve(#[from] ServeError),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// `rotate-keys` left records sealed with keys it was not given.
    #[error(
        "{count} record(s) stay sealed with key(s) {key_ids}, which were not given; pass their \
         files with --previous-encryption-key-file and run rotate-keys again"
    )]
    KeysNotGiven { count: usize, key_ids: String },
    #[error(transparent)]
    Backup(#[from] BackupError),
    /// An offline command's arguments cannot work as given.
    #[error("{0}")]
    Usage(String),
}

impl LaunchError {
    /// 2 when the settings must change, like a usage error; 1 when starting or serving failed.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Config(_)
            | Self::Dev(_)
            | Self::Telemetry(_)
            | Self::Keys(_)
            | Self::KeysNotGiven { .. }
            | Self::Usage(_)
            | Self::Serve(ServeError::AuditFile { .. }) => 2,
            Self::Serve(_) | Self::Store(_) | Self::Backup(_) => 1,
        }
    }
}

/// Prints a failure as the binary's one line on stderr and turns the outcome into its exit code.
pub fn exit(outcome: Result<(), LaunchError>) -> ExitCode {
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("credential-service: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// The service with its settings checked, its listeners bound and its data opened: what is left
/// is to serve.
pub struct Launch {
    service: Service,
    /// `--dev`'s fake EdgeTag and temporary data directory, kept alive while the service runs.
    dev: Option<DevEnvironment>,
}

impl Launch {
    /// With `dev`, first starts the fake EdgeTag and points `settings` at it (see [`dev::start`]).
    /// The client secret may come from EDGETAG_CLIENT_SECRET, read here rather than by clap so that
    /// it never shows in `--help`.
    pub async fn build(mut settings: Settings, dev: bool) -> Result<Self, LaunchError> {
        // From here on a SIGHUP (a config-management reload, an operator's `kill -HUP`) no longer
        // ends the process, however long opening the store takes; the server then acts on it.
        drop(server::Hangups::install());
        let mut client_secret = std::env::var("EDGETAG_CLIENT_SECRET").ok();
        let mut dev_env = None;
        if dev {
            dev_env = Some(dev::start(&mut settings).await?);
            client_secret = None; // dev::start put the fake's in a file
        }
        let config = settings.resolve(client_secret)?;
        open_files::raise_and_check(&config);
        let options = StartOptions {
            // Dev mode bound the callback already: its address is the redirect URI.
            callback: dev_env.as_mut().and_then(|e| e.callback.take()),
            ..StartOptions::default()
        };
        let service = Service::start_with(config, Clock::system(), options).await?;
        if let Some(env) = &dev_env {
            eprintln!("{}", dev::banner(service.grpc_addr(), env));
        }
        Ok(Self {
            service,
            dev: dev_env,
        })
    }

    /// Serves until `shutdown` resolves (see [`Service::serve`]).
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), LaunchError> {
        let Self { service, dev } = self;
        service.serve(shutdown).await?;
        drop(dev); // only now: the fake and the temporary data outlive the server
        Ok(())
    }
}

/// `rotate-keys`: re-seals every record with the current key, so previous keys can be retired.
pub async fn rotate_keys(
    data_dir: &Path,
    store: &StoreSettings,
    keys: &KeySettings,
) -> Result<(), LaunchError> {
    let store = store.resolve(keys)?;
    let keyring = server::load_keys(&keys.encryption(), &store, data_dir)?;
    let current = keyring.current_id();
    let done = match store {
        StoreConfig::Sled => SledStore::open(data_dir, keyring)?.reseal_all().await?,
        StoreConfig::Postgres(pg) => {
            PostgresStore::open(&pg, keyring)
                .await?
                .reseal_all()
                .await?
        }
    };
    if !done.remaining.is_empty() {
        eprintln!(
            "credential-service: {} record(s) re-sealed with key {current}, {} already were",
            done.resealed, done.current
        );
        return Err(LaunchError::KeysNotGiven {
            count: done.remaining.values().sum(),
            key_ids: done.remaining.into_keys().collect::<Vec<_>>().join(", "),
        });
    }
    eprintln!(
        "credential-service: {} record(s) re-sealed with key {current}, {} already were; \
         the previous key files are no longer needed",
        done.resealed, done.current
    );
    Ok(())
}
