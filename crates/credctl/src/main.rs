//! `credctl`: the operators' command line for credential-service. All logic is in the library.

use std::process::ExitCode;

use clap::Parser;
use credctl::Cli;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    credctl::run(Cli::parse()).await
}
