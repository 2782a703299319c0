//! `fake-edgetag`: runs the strict fake EdgeTag OAuth provider on loopback, for trying the
//! credential service locally without a real EdgeTag app.
//!
//! It prints the authorize, token and revoke URLs to pass to the service's `--authorize-url`,
//! `--token-url` and `--revoke-url` flags, then serves until Ctrl-C.

use std::{io::IsTerminal, net::SocketAddr, process::ExitCode, time::Duration};

use clap::Parser;
use fake_edgetag::{FakeConfig, FakeEdgeTag};
use tracing_subscriber::EnvFilter;

/// A fake EdgeTag OAuth 2.0 provider for local development and tests. Not for production: it
/// approves every authorization request without asking anyone.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Address to listen on. Must be a loopback address.
    #[arg(long, env = "FAKE_EDGETAG_LISTEN", default_value = "127.0.0.1:8090")]
    listen: SocketAddr,

    /// The client id the fake accepts.
    #[arg(long, env = "FAKE_EDGETAG_CLIENT_ID", default_value_t = FakeConfig::default().client_id)]
    client_id: String,

    /// The client secret the fake accepts. The default is public (it guards nothing real); a
    /// secret given in the environment stays hidden in this help.
    #[arg(
        long,
        env = "FAKE_EDGETAG_CLIENT_SECRET",
        default_value_t = FakeConfig::default().client_secret,
        hide_env_values = true
    )]
    client_secret: String,

    /// A redirect URI to accept (repeatable; comma-separated in the environment variable). With
    /// none, any absolute http(s) URL is accepted.
    #[arg(
        long = "redirect-uri",
        env = "FAKE_EDGETAG_REDIRECT_URIS",
        value_delimiter = ','
    )]
    redirect_uris: Vec<String>,

    /// Lifetime of issued access tokens, e.g. `2h` or `90s`.
    #[arg(long, default_value = "2h", value_parser = humantime::parse_duration)]
    token_lifetime: Duration,

    /// Issue a new refresh token on every refresh and invalidate the old one (EdgeTag does not).
    #[arg(long)]
    rotate_refresh_tokens: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        // Colour codes only for a terminal: a log written to a file or a pipe stays plain text.
        .with_ansi(std::io::stdout().is_terminal())
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();

    if !args.listen.ip().is_loopback() {
        eprintln!(
            "fake-edgetag: refusing to listen on {}: this is a fake provider that approves \
             every request, so it only listens on loopback (e.g. 127.0.0.1 or [::1])",
            args.listen
        );
        return ExitCode::from(2);
    }

    let uses_default_secret = args.client_secret == FakeConfig::default().client_secret;
    let config = FakeConfig {
        client_id: args.client_id,
        client_secret: args.client_secret,
        redirect_uris: args
            .redirect_uris
            .into_iter()
            .filter(|u| !u.is_empty())
            .collect(),
        access_token_lifetime: args.token_lifetime,
        rotate_refresh_tokens: args.rotate_refresh_tokens,
        ..FakeConfig::default()
    };
    let listener = match tokio::net::TcpListener::bind(args.listen).await {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("fake-edgetag: cannot listen on {}: {e}", args.listen);
            return ExitCode::FAILURE;
        }
    };
    let fake = match FakeEdgeTag::start_on(listener, config).await {
        Ok(fake) => fake,
        Err(e) => {
            eprintln!("fake-edgetag: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };

    println!("authorize URL: {}", fake.authorize_url());
    println!("token URL:     {}", fake.token_url());
    println!("revoke URL:    {}", fake.revoke_url());
    println!("user info URL: {}", fake.user_me_url());
    println!("client id:     {}", fake.client_id());
    if uses_default_secret {
        println!("client secret: {} (the default)", fake.client_secret());
    } else {
        println!("client secret: as given by --client-secret / FAKE_EDGETAG_CLIENT_SECRET");
    }
    tracing::info!(addr = %fake.addr(), "fake EdgeTag serving; Ctrl-C to stop");

    if let Err(e) = tokio::signal::ctrl_c().await {
        eprintln!("fake-edgetag: cannot wait for Ctrl-C: {e}");
        return ExitCode::FAILURE;
    }
    tracing::info!("fake EdgeTag stopping");
    drop(fake);
    ExitCode::SUCCESS
}
