//! Crash safety: `kill -9` the real binary again and again during a mixed CompleteAuth + refresh load
//! against the fake EdgeTag, restart it on the same data directory, and check that every account
//! whose CompleteAuth or GetToken was acknowledged still serves a token EdgeTag accepts.
//!
//! Tokens live 8 s and the refresh margin is 3 s, so accounts refresh every few seconds, both from
//! the background scheduler and from callers, while the kills land at random moments.

use std::{
    collections::BTreeSet,
    process::Stdio,
    sync::{Arc, Mutex},
    time::Duration,
};

use credential_service::proto::{
    BeginAuthRequest, CompleteAuthRequest, GetTokenRequest,
    credential_service_client::CredentialServiceClient,
};
use fake_edgetag::{FakeConfig, FakeEdgeTag};
use rand::Rng;
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};
use tonic::transport::Channel;

const BIN: &str = env!("CARGO_BIN_EXE_credential-service");
const REDIRECT_URI: &str = "https://ops.example.com/oauth/callback";
const KILLS: usize = 12;
const WORKERS: usize = 8;

/// Starts the service on the data directory; returns the child and its gRPC address once serving.
async fn start(fake: &FakeEdgeTag, data_dir: &std::path::Path) -> (Child, String) {
    let mut child = Command::new(BIN)
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir)
        .args(["--client-id", &fake.config().client_id])
        .args(["--redirect-uri", REDIRECT_URI])
        .args(["--authorize-url", &fake.authorize_url()])
        .args(["--token-url", &fake.token_url()])
        .args(["--revoke-url", &fake.revoke_url()])
        .args(["--refresh-margin", "3s", "--upstream-timeout", "2s"])
        .env_clear()
        .env("EDGETAG_CLIENT_SECRET", &fake.config().client_secret)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let find = async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(rest) = line.split("credential-service serving addr=").nth(1) {
                return rest.split_whitespace().next().unwrap().to_owned();
            }
        }
        panic!("the service exited before serving");
    };
    let addr = tokio::time::timeout(Duration::from_secs(30), find)
        .await
        .expect("the service starts");
    // Keep draining its log so the pipe never fills and blocks it.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, addr)
}

async fn connect(
    fake: &FakeEdgeTag,
    client: &mut CredentialServiceClient<Channel>,
    account: &str,
) -> bool {
    let Ok(begun) = client
        .begin_auth(BeginAuthRequest {
            account: account.into(),
        })
        .await
    else {
        return false;
    };
    let redirect = fake
        .approve(&begun.into_inner().authorize_url)
        .await
        .unwrap();
    client
        .complete_auth(CompleteAuthRequest {
            code: redirect.code,
            state: redirect.state,
        })
        .await
        .is_ok()
}

async fn get_token(
    client: &mut CredentialServiceClient<Channel>,
    account: &str,
) -> Result<String, tonic::Status> {
    client
        .get_token(GetTokenRequest {
            account: account.into(),
            min_validity: None,
        })
        .await
        .map(|r| r.into_inner().access_token)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_load_loses_no_acknowledged_account() {
    let fake = Arc::new(
        FakeEdgeTag::start(FakeConfig {
            redirect_uris: vec![REDIRECT_URI.into()],
            access_token_lifetime: Duration::from_secs(8),
            ..FakeConfig::default()
        })
        .await
        .unwrap(),
    );
    let dir = tempfile::tempdir().unwrap();
    // A subdirectory, so the generated encryption key (created beside it) stays in the temp dir.
    let data_dir = dir.path().join("data");
    let acked: Arc<Mutex<BTreeSet<String>>> = Arc::default();
    let mut next_account = 0usize;
    let mut token_replies = 0usize;

    for _round in 0..KILLS {
        let (mut child, addr) = start(&fake, &data_dir).await;
        let client = CredentialServiceClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        let workers: Vec<_> = (0..WORKERS)
            .map(|w| {
                let (fake, acked, mut client) = (fake.clone(), acked.clone(), client.clone());
                let first = next_account + w * 1000;
                tokio::spawn(async move {
                    let mut replies = 0;
                    for i in 0.. {
                        // Half new accounts, half tokens of acknowledged ones (refreshing as due).
                        let known: Vec<String> = acked.lock().unwrap().iter().cloned().collect();
                        if i % 2 == 0 || known.is_empty() {
                            let account = format!("acct-{}", first + i);
                            if !connect(&fake, &mut client, &account).await {
                                break;
                            }
                            acked.lock().unwrap().insert(account);
                        } else {
                            let account = &known[rand::rng().random_range(0..known.len())];
                            match get_token(&mut client, account).await {
                                Ok(_) => replies += 1,
                                // The server died under the call.
                                Err(s)
                                    if matches!(
                                        s.code(),
                                        tonic::Code::Unavailable
                                            | tonic::Code::Unknown
                                            | tonic::Code::Cancelled
                                    ) =>
                                {
                                    break;
                                }
                                Err(s) => panic!("{account}: {s:?}"),
                            }
                        }
                    }
                    replies
                })
            })
            .collect();
        next_account += WORKERS * 1000;
        let delay = rand::rng().random_range(300..900);
        tokio::time::sleep(Duration::from_millis(delay)).await; // the chaos itself, not a synchronisation
        child.start_kill().unwrap(); // SIGKILL
        child.wait().await.unwrap();
        for w in workers {
            token_replies += w.await.unwrap();
        }
    }

    // Every acknowledged account serves a token EdgeTag accepts, refreshing where it expired.
    let (_child, addr) = start(&fake, &data_dir).await;
    let mut client = CredentialServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let acked = acked.lock().unwrap().clone();
    let mut lost = Vec::new();
    for account in &acked {
        match get_token(&mut client, account).await {
            Ok(token) if fake.access_token_is_valid(&token) => {}
            other => lost.push((account.clone(), other.map(|_| "token not valid at EdgeTag"))),
        }
    }
    println!(
        "crash test: {KILLS} kills, {} accounts checked, {token_replies} GetToken replies during load, \
         {} upstream refreshes, {} lost",
        acked.len(),
        fake.stats().refreshes_ok,
        lost.len()
    );
    assert!(
        acked.len() >= KILLS,
        "the load connected accounts in most rounds"
    );
    assert!(lost.is_empty(), "lost accounts: {lost:?}");
}
