//! The README's "Backups" and "From one node to several replicas" blocks, run as written with the
//! real `credctl` and `credential-service` binaries against a real node (sled, the fake EdgeTag on
//! loopback) and this test binary's private PostgreSQL; then the restored stores serve every
//! account. The commands come out of README.md, so the README and this test cannot drift apart.
//! Paths and the store URL are replaced with the test's own, nothing else.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use credential_service::proto::{
    BeginAuthRequest, CompleteAuthRequest, GetTokenRequest,
    credential_service_client::CredentialServiceClient,
};
use fake_edgetag::{FakeConfig, FakeEdgeTag};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};

const BIN: &str = env!("CARGO_BIN_EXE_credential-service");
const REDIRECT_URI: &str = "https://ops.example.com/oauth/callback";
const MARKER: &str = "<!-- tests/it/readme_backups.rs runs the next block as written -->";
const ACCOUNTS: [&str; 2] = ["acme", "globex"];

/// The fenced `sh` blocks right after each [`MARKER`], in order.
fn readme_blocks() -> Vec<String> {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    readme
        .split(MARKER)
        .skip(1)
        .map(|after| {
            let block = after.split("```sh\n").nth(1).unwrap();
            block.split("\n```").next().unwrap().to_owned()
        })
        .collect()
}

/// credctl, built beside the service by `cargo test --workspace` (`.ci/run`) or `cargo build`.
fn credctl_dir() -> PathBuf {
    let dir = Path::new(BIN).parent().unwrap().to_owned();
    assert!(
        dir.join("credctl").exists(),
        "{} has no credctl: build it first (cargo build -p credctl; `cargo test --workspace` does)",
        dir.display()
    );
    dir
}

async fn start(fake: &FakeEdgeTag, store: &[&std::ffi::OsStr], key: &Path) -> (Child, String) {
    let mut child = Command::new(BIN)
        .args(["--listen", "127.0.0.1:0"])
        .args(store)
        .arg("--encryption-key-file")
        .arg(key)
        .args(["--client-id", fake.client_id()])
        .args(["--redirect-uri", REDIRECT_URI])
        .args(["--authorize-url", &fake.authorize_url()])
        .args(["--token-url", &fake.token_url()])
        .args(["--revoke-url", &fake.revoke_url()])
        .env_clear()
        .env("EDGETAG_CLIENT_SECRET", fake.client_secret())
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(rest) = line.split("credential-service serving addr=").nth(1) {
                return rest.split_whitespace().next().unwrap().to_owned();
            }
        }
        panic!("the service exited before serving");
    })
    .await
    .expect("the service starts");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, format!("http://{addr}"))
}

/// Runs `script` with bash (-euo pipefail), the two binaries first on PATH.
async fn run(script: &str, server: &str) -> String {
    let path = format!("{}:/usr/local/bin:/usr/bin:/bin", credctl_dir().display());
    let out = Command::new("bash")
        .args(["-euo", "pipefail", "-c", script])
        .env_clear()
        .env("PATH", path)
        .env("CREDCTL_SERVER", server)
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "the README block failed\n--- script\n{script}\n--- stdout\n{stdout}\n--- stderr\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Every account serves a token the fake accepts.
async fn serves_every_account(fake: &FakeEdgeTag, server: &str) {
    let mut client = CredentialServiceClient::connect(server.to_owned())
        .await
        .unwrap();
    for account in ACCOUNTS {
        let token = client
            .get_token(GetTokenRequest {
                account: account.into(),
                min_validity: None,
            })
            .await
            .unwrap()
            .into_inner()
            .access_token;
        assert!(fake.access_token_is_valid(&token), "{account}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_backup_and_migration_blocks_work_as_written() {
    let blocks = readme_blocks();
    assert_eq!(blocks.len(), 2, "README.md has both marked blocks");
    let fake = FakeEdgeTag::start(FakeConfig {
        redirect_uris: vec![REDIRECT_URI.into()],
        ..FakeConfig::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("encryption.key");
    credential_service::sealing::create_key_file(&key).unwrap();
    let backups = dir.path().join("backups");
    std::fs::create_dir(&backups).unwrap();
    let node_dir = dir.path().join("node");
    let (_node, server) = start(&fake, &["--data-dir".as_ref(), node_dir.as_os_str()], &key).await;
    let mut client = CredentialServiceClient::connect(server.clone())
        .await
        .unwrap();
    for account in ACCOUNTS {
        let begun = client
            .begin_auth(BeginAuthRequest {
                account: account.into(),
            })
            .await
            .unwrap()
            .into_inner();
        let redirect = fake.approve(&begun.authorize_url).await.unwrap();
        client
            .complete_auth(CompleteAuthRequest {
                code: redirect.code,
                state: redirect.state,
            })
            .await
            .unwrap();
    }
    let ours = |s: &str| {
        s.replace("/var/backups/credential-service", backups.to_str().unwrap())
            .replace(
                "/etc/credential-service/encryption.key",
                key.to_str().unwrap(),
            )
    };

    // Backups: online backup, check, restore into a fresh directory; it then serves.
    let restored = dir.path().join("restored");
    let script = ours(&blocks[0]).replace(
        "/var/lib/credential-service-restored",
        restored.to_str().unwrap(),
    );
    let stdout = run(&script, &server).await;
    for expected in [
        "Backed up 2 account(s) from the sled store",
        "is a sound backup: 2 account(s)",
        "restored",
    ] {
        assert!(stdout.contains(expected), "no {expected:?} in\n{stdout}");
    }
    let (_restored, restored_server) =
        start(&fake, &["--data-dir".as_ref(), restored.as_os_str()], &key).await;
    serves_every_account(&fake, &restored_server).await;

    // From one node to several replicas: backup, restore into PostgreSQL, a replica serves.
    let cluster = pg_cluster::Cluster::shared();
    let db = cluster.create_database();
    let url = format!("{}?sslmode=disable", db.url());
    let ca = dir.path().join("store-ca.pem"); // unused with sslmode=disable, but named
    std::fs::write(&ca, "").unwrap();
    let script = ours(&blocks[1])
        .replace(
            "postgres://credential_service@db.example.internal:5432/credentials?sslmode=verify-full",
            &url,
        )
        .replace(
            "/etc/credential-service/store-password",
            cluster.password_file().to_str().unwrap(),
        )
        .replace("/etc/credential-service/store-ca.pem", ca.to_str().unwrap());
    let stdout = run(&script, &server).await;
    assert!(
        stdout.contains("into the PostgreSQL store: 2 account(s)"),
        "{stdout}"
    );
    let store = [
        "--store".as_ref(),
        url.as_ref(),
        "--store-password-file".as_ref(),
        cluster.password_file().as_os_str(),
    ];
    let (_replica, replica_server) = start(&fake, &store, &key).await;
    serves_every_account(&fake, &replica_server).await;
}
