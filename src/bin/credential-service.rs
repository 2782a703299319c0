//! The credential-service binary: parse, build, run. All logic is in the library ([`launch`]).

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use credential_service::{
    config::{KeySettings, Settings, StoreSettings},
    launch::{self, Launch, LaunchError},
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
}

#[tokio::main]
async fn main() -> ExitCode {
    let Cli {
        settings,
        dev,
        command,
    } = Cli::parse();
    telemetry::init(settings.log_format);
    let outcome = match command {
        Some(Command::RotateKeys {
            data_dir,
            store,
            keys,
        }) => launch::rotate_keys(&data_dir, &store, &keys).await,
        None => serve(settings, dev).await,
    };
    launch::exit(outcome)
}

async fn serve(settings: Settings, dev: bool) -> Result<(), LaunchError> {
    let service = Launch::build(settings, dev).await?;
    service.run(server::shutdown_signal()).await
}
