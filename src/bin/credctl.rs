//! `credctl`: the operators' command line for credential-service. All logic is in the library's
//! `cli` module.

use std::process::ExitCode;

use clap::Parser;
use credential_service::cli::{self, Cli};

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    cli::run(Cli::parse()).await
}
