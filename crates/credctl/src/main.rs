//! `credctl`: the operators' command line for credential-service. All logic is in the library.

use std::process::ExitCode;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    match credctl::parse() {
        Ok(cli) => credctl::run(cli).await,
        Err(code) => code,
    }
}
