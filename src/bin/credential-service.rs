//! The credential-service binary: parse settings, set up logs, bind, serve. All logic is in the library.

use std::process::ExitCode;

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use credential_service::{
    clock::Clock,
    config::{KeySettings, Settings},
    dev,
    sealing::Keyring,
    server,
    store::{SledStore, Store},
    telemetry,
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
    /// retired. Run it with the service stopped, with the new key as --encryption-key-file and the
    /// old one(s) as --previous-encryption-key-file.
    RotateKeys {
        /// Directory of the embedded sled database.
        #[arg(long, env = "CREDENTIAL_SERVICE_DATA_DIR", default_value = "./data")]
        data_dir: PathBuf,

        #[command(flatten)]
        keys: KeySettings,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let Cli {
        mut settings,
        dev,
        command,
    } = Cli::parse();
    telemetry::init(settings.log_format);
    if let Some(Command::RotateKeys { data_dir, keys }) = command {
        return rotate_keys(data_dir, keys).await;
    }

    let mut client_secret = std::env::var("EDGETAG_CLIENT_SECRET").ok();
    let mut dev_env = if dev {
        match dev::start(&mut settings).await {
            Ok(env) => {
                client_secret = Some(env.client_secret.clone());
                Some(env)
            }
            Err(e) => return fail(e, 2),
        }
    } else {
        None
    };
    let config = match settings.resolve(client_secret) {
        Ok(config) => config,
        Err(e) => return fail(e, 2),
    };
    let listener = match tokio::net::TcpListener::bind(config.listen).await {
        Ok(l) => l,
        Err(e) => {
            return fail(
                format!(
                    "cannot listen on {} (--listen / CREDENTIAL_SERVICE_LISTEN): {e}",
                    config.listen
                ),
                1,
            );
        }
    };
    // Dev mode bound the callback already: its address is the redirect URI.
    let callback = match (
        dev_env.as_mut().and_then(|e| e.callback.take()),
        &config.callback,
    ) {
        (Some(bound), _) => Some(bound),
        (None, Some(c)) => match server::bind(
            c.listen,
            "--callback-listen / CREDENTIAL_SERVICE_CALLBACK_LISTEN",
        )
        .await
        {
            Ok(l) => Some(l),
            Err(e) => return fail(e, 1),
        },
        (None, None) => None,
    };
    let metrics = match config.metrics_listen {
        Some(addr) => {
            match server::bind(addr, "--metrics-listen / CREDENTIAL_SERVICE_METRICS_LISTEN").await {
                Ok(l) => Some(l),
                Err(e) => return fail(e, 1),
            }
        }
        None => None,
    };
    if let Some(env) = &dev_env {
        eprintln!(
            "{}",
            dev::banner(listener.local_addr().unwrap_or(config.listen), env)
        );
    }
    let listeners = server::Listeners {
        grpc: listener,
        callback,
        metrics,
    };
    let app = match server::App::open(config, Clock::system()).await {
        Ok(app) => app,
        Err(e) => return fail(e, 1),
    };
    match server::serve(app, listeners, server::shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e, 1),
    }
}

async fn rotate_keys(data_dir: PathBuf, keys: KeySettings) -> ExitCode {
    let keyring = match Keyring::load(&keys.encryption(), &data_dir) {
        Ok(k) => k,
        Err(e) => return fail(e, 2),
    };
    let current = keyring.current_id();
    let store = match SledStore::open(&data_dir, keyring) {
        Ok(s) => s,
        Err(e) => return fail(e, 1),
    };
    match store.reseal_all().await {
        Ok(done) => {
            eprintln!(
                "credential-service: {} record(s) re-sealed with key {current}, {} already were; \
                 the previous key files are no longer needed",
                done.resealed, done.current
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(e, 1),
    }
}

fn fail(e: impl std::fmt::Display, code: u8) -> ExitCode {
    eprintln!("credential-service: {e}");
    ExitCode::from(code)
}
