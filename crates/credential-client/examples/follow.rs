//! Follows one account's token as a service using this crate sees it.
//!
//! ```text
//! cargo run -p credential-client --example follow -- --server URL [--token BEARER] ACCOUNT
//! ```
//!
//! Asks its [`TokenSource`] every 100 ms (from memory) and prints `expires_at=<RFC 3339 UTC>`
//! each time the token it hands out changes, and `error=<GRPC_CODE_NAME>` each time it starts
//! failing. Never prints the token.

use std::{process::ExitCode, time::Duration};

use credential_client::{Client, Code, Token, code_name};

struct Args {
    server: String,
    token: Option<String>,
    account: String,
}

const USAGE: &str = "usage: follow --server URL [--token BEARER] ACCOUNT";

fn parse_args() -> Result<Args, String> {
    let mut server = None;
    let mut token = None;
    let mut account = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--server" => server = Some(args.next().ok_or("--server needs a URL")?),
            "--token" => token = Some(args.next().ok_or("--token needs a value")?),
            "-h" | "--help" => return Err(USAGE.into()),
            flag if flag.starts_with('-') => return Err(format!("unknown flag {flag}")),
            _ if account.is_none() => account = Some(arg),
            _ => return Err("only one ACCOUNT".into()),
        }
    }
    Ok(Args {
        server: server.ok_or("--server is required")?,
        token,
        account: account.ok_or("ACCOUNT is required")?,
    })
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("follow: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let mut builder = Client::builder(args.server);
    if let Some(token) = args.token {
        builder = builder.bearer_token(token);
    }
    let client = match builder.build() {
        Ok(client) => client,
        Err(e) => {
            eprintln!("follow: {e}");
            return ExitCode::from(2);
        }
    };
    let source = client.token_source(args.account);
    let mut last: Option<Result<Token, Code>> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tick.tick().await;
        let now = source.token().await.map_err(|e| e.code());
        if last.as_ref() != Some(&now) {
            match &now {
                Ok(token) => println!(
                    "expires_at={}",
                    humantime::format_rfc3339_seconds(token.expires_at())
                ),
                Err(code) => println!("error={}", code_name(*code)),
            }
            last = Some(now);
        }
    }
}
