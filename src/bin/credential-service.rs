//! The credential-service binary: parse, build, run. All logic is in the library ([`launch`]).

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use credential_service::{
    config::{KeySettings, Settings, StoreSettings},
    launch::{
        self, Launch, LaunchError,
        backups::{self, Target},
    },
    server, telemetry,
};

/// Holds EdgeTag OAuth 2.0 credentials and serves fresh access tokens over gRPC.
#[derive(Parser)]
#[command(name = "credential-service", version, about)]
struct Cli {
    #[command(flatten)]
    settings: Settings,

    /// Try it out: a fake EdgeTag on loopback and a temporary data directory; prints the commands
    /// to run the whole flow. Never for production.
    #[arg(long)]
    dev: bool,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Re-seal every stored record with the current encryption key, so previous keys can be
    /// retired. With the new key as --encryption-key-file and the old one(s) as
    /// --previous-encryption-key-file. On sled, with the service stopped (while it serves, SIGHUP
    /// and `credctl reseal` do the same); on PostgreSQL, also while the replicas run, once each
    /// holds the new key.
    RotateKeys {
        /// Directory of the embedded sled database.
        #[arg(long, env = "CREDENTIAL_SERVICE_DATA_DIR", default_value = "./data")]
        data_dir: PathBuf,

        #[command(flatten)]
        store: StoreSettings,

        #[command(flatten)]
        keys: KeySettings,
    },
    /// Back up every account of a stopped service (sled's lock allows one process; a running
    /// service is backed up with `credctl backup`): the records as stored, sealed, in one file
    /// created 0600 under a temporary name and renamed into place once complete.
    Backup {
        /// The backup file to write (replaced if it exists, once the new one is complete).
        #[arg(long, value_name = "FILE")]
        to: PathBuf,

        /// Directory of the embedded sled database.
        #[arg(long, env = "CREDENTIAL_SERVICE_DATA_DIR", default_value = "./data")]
        data_dir: PathBuf,

        #[command(flatten)]
        store: StoreSettings,

        #[command(flatten)]
        keys: KeySettings,
    },
    /// Restore a backup into a stopped service's store, all or nothing: first the checksum and
    /// every record opened with the configured keys, then one write. Refuses a store that holds
    /// accounts unless --replace. Versions are kept, so replicas fence correctly on them.
    Restore {
        /// The backup file to restore.
        #[arg(long, value_name = "FILE", required_unless_present = "check")]
        from: Option<PathBuf>,

        /// Only verify FILE: its checksum, and that every record opens with the keys. Writes
        /// nothing and opens no store.
        #[arg(long, value_name = "FILE", conflicts_with_all = ["from", "replace"])]
        check: Option<PathBuf>,

        /// Replace every account the target store holds.
        #[arg(long)]
        replace: bool,

        /// Directory of the embedded sled database.
        #[arg(long, env = "CREDENTIAL_SERVICE_DATA_DIR", default_value = "./data")]
        data_dir: PathBuf,

        #[command(flatten)]
        store: StoreSettings,

        #[command(flatten)]
        keys: KeySettings,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let Cli {
        settings,
        dev,
        command,
    } = Cli::parse();
    let telemetry = match telemetry::init(settings.log_format, &settings.otel) {
        Ok(telemetry) => telemetry,
        Err(e) => return launch::exit(Err(e.into())),
    };
    let outcome = match command {
        Some(Command::RotateKeys {
            data_dir,
            store,
            keys,
        }) => launch::rotate_keys(&data_dir, &store, &keys).await,
        Some(Command::Backup {
            to,
            data_dir,
            store,
            keys,
        }) => {
            let target = Target {
                data_dir: &data_dir,
                store: &store,
                keys: &keys,
            };
            backups::backup(target, &to).await
        }
        Some(Command::Restore {
            from,
            check,
            replace,
            data_dir,
            store,
            keys,
        }) => {
            let target = Target {
                data_dir: &data_dir,
                store: &store,
                keys: &keys,
            };
            match (check, from) {
                (Some(file), _) => backups::check(target, &file),
                (None, Some(file)) => backups::restore(target, &file, replace).await,
                (None, None) => unreachable!("clap requires --from or --check"),
            }
        }
        None => serve(settings, dev).await,
    };
    telemetry.shutdown();
    launch::exit(outcome)
}

async fn serve(settings: Settings, dev: bool) -> Result<(), LaunchError> {
    let service = Launch::build(settings, dev).await?;
    service.run(server::shutdown_signal()).await
}
