//! Backups and imports as operators run them (issue 26): the real `credential-service` binary, the
//! fake EdgeTag on loopback, `credctl backup` and `credctl import` (credctl's own code, run in
//! this process), and `credential-service restore` as a process.
//!
//! - The disaster drill: under GetToken load and refreshes, an online backup; `kill -9`; a restore
//!   into a fresh data directory, and (second test) into PostgreSQL behind two replicas: every
//!   account acknowledged before the backup began serves a token EdgeTag accepts, no version is
//!   lower than in the backup, and the replicas serve the same token.
//! - Restore refuses a truncated file, a flipped byte, a record sealed with a key it was not
//!   given, and a store that holds accounts, each with one line saying why, the target unchanged.
//! - Import: valid grants, a revoked one, a malformed line, a duplicate, a grant on the command line.

use crate::common;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use clap::Parser;
use credential_service::{
    backup::format,
    proto::{
        BeginAuthRequest, CompleteAuthRequest, GetTokenRequest, RefreshTokenRequest,
        credential_service_client::CredentialServiceClient,
    },
    sealing::{self, Keyring},
    store::{PostgresConfig, PostgresStore, SledStore, Store},
};
use fake_edgetag::{FakeConfig, FakeEdgeTag};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};
use tonic::transport::Channel;

const BIN: &str = env!("CARGO_BIN_EXE_credential-service");
const REDIRECT_URI: &str = "https://ops.example.com/oauth/callback";
const ACCOUNTS: usize = 40;

type Client = CredentialServiceClient<Channel>;

/// Where a service keeps its state.
enum On<'a> {
    Sled(&'a Path),
    Postgres {
        url: &'a str,
        password_file: &'a Path,
    },
}

impl On<'_> {
    fn args(&self) -> Vec<std::ffi::OsString> {
        match self {
            On::Sled(dir) => vec!["--data-dir".into(), dir.into()],
            On::Postgres { url, password_file } => vec![
                "--store".into(),
                (*url).into(),
                "--store-password-file".into(),
                password_file.into(),
            ],
        }
    }
}

/// A running service: dropping it kills the process.
struct Node {
    child: Child,
    client: Client,
    /// `http://127.0.0.1:PORT`
    server: String,
}

/// Starts the service; returns once it serves.
async fn start(fake: &FakeEdgeTag, on: &On<'_>, key: &Path, scratch: &Path) -> Node {
    let mut child = Command::new(BIN)
        .args(["--listen", "127.0.0.1:0"])
        .args(on.args())
        .arg("--encryption-key-file")
        .arg(key)
        .args(["--client-id", fake.client_id()])
        .args(["--redirect-uri", REDIRECT_URI])
        .args(["--authorize-url", &fake.authorize_url()])
        .args(["--token-url", &fake.token_url()])
        .args(["--revoke-url", &fake.revoke_url()])
        .args(["--refresh-margin", "3s", "--upstream-timeout", "2s"])
        .current_dir(scratch)
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
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let server = format!("http://{addr}");
    let client = Client::connect(server.clone()).await.unwrap();
    Node {
        child,
        client,
        server,
    }
}

/// `credential-service ARGS`: exit code, stdout, stderr.
async fn service(args: &[&std::ffi::OsStr]) -> (Option<i32>, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .env_clear()
        .output()
        .await
        .unwrap();
    (
        out.status.code(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

/// credctl with these arguments, in this process: its result and what it printed.
async fn credctl(args: &[&str]) -> (Result<(), credctl::CliError>, String) {
    let cli = credctl::Cli::try_parse_from(std::iter::once("credctl").chain(args.iter().copied()))
        .unwrap();
    let mut out = Vec::new();
    let result = credctl::execute(cli, &mut out).await;
    (result, String::from_utf8(out).unwrap())
}

async fn connect(fake: &FakeEdgeTag, client: &mut Client, account: &str) {
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

async fn get_token(client: &mut Client, account: &str) -> Result<String, tonic::Status> {
    client
        .get_token(GetTokenRequest {
            account: account.into(),
            min_validity: None,
        })
        .await
        .map(|r| r.into_inner().access_token)
}

fn names() -> Vec<String> {
    (0..ACCOUNTS).map(|i| format!("acct-{i:03}")).collect()
}

/// GetToken and RefreshToken calls on every account until stopped; counts GetToken replies.
struct Load {
    stop: Arc<AtomicBool>,
    replies: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(client: &Client) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let replies = Arc::new(AtomicUsize::new(0));
        let tasks = (0..4)
            .map(|w| {
                let (stop, replies, mut client) = (stop.clone(), replies.clone(), client.clone());
                tokio::spawn(async move {
                    let names = names();
                    let mut i = w;
                    while !stop.load(Ordering::Relaxed) {
                        let account = &names[i % names.len()];
                        i += 7;
                        if i % 5 == 0 {
                            // A refresh now and then: versions move while the backup runs.
                            let _ = client
                                .refresh_token(RefreshTokenRequest {
                                    account: account.clone(),
                                })
                                .await;
                        } else if get_token(&mut client, account).await.is_ok() {
                            replies.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        Self {
            stop,
            replies,
            tasks,
        }
    }

    async fn stop(self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
        self.replies.load(Ordering::Relaxed)
    }
}

/// Versions by account, as a backup lists them.
fn versions_in(file: &Path) -> BTreeMap<String, u64> {
    let backup = format::decode(&std::fs::read(file).unwrap()).unwrap();
    backup
        .records
        .iter()
        .map(|r| (r.account.to_string(), r.version))
        .collect()
}

async fn versions_of(store: &dyn Store) -> BTreeMap<String, u64> {
    store
        .export_accounts()
        .await
        .unwrap()
        .iter()
        .map(|r| (r.account.to_string(), r.version))
        .collect()
}

/// The common first half of both drills: a sled node under load, an online backup with
/// `credctl backup`, then `kill -9`. Returns the backup file and the accounts acknowledged before
/// it began.
async fn back_up_a_loaded_node_then_kill_it(fake: &FakeEdgeTag, dir: &Path, key: &Path) -> PathBuf {
    let data = dir.join("node");
    let mut node = start(fake, &On::Sled(&data), key, dir).await;
    let client = node.client.clone();
    let mut c = client.clone();
    for account in names() {
        connect(fake, &mut c, &account).await;
    }
    let load = Load::start(&client);
    let until = Instant::now() + Duration::from_secs(10);
    while load.replies.load(Ordering::Relaxed) < 200 {
        assert!(Instant::now() < until, "the load gets answers");
        tokio::task::yield_now().await;
    }
    let file = dir.join("drill.backup");
    let before = load.replies.load(Ordering::Relaxed);
    let (backed_up, printed) =
        credctl(&["--server", &node.server, "backup", file.to_str().unwrap()]).await;
    backed_up.unwrap();
    let during = load.replies.load(Ordering::Relaxed) - before;
    assert!(
        printed.contains(&format!(
            "Backed up {ACCOUNTS} account(s) from the sled store"
        )),
        "{printed}"
    );
    node.child.start_kill().unwrap(); // SIGKILL, under load
    node.child.wait().await.unwrap();
    let replies = load.stop().await;
    println!("drill: {replies} GetToken replies under load, {during} while `credctl backup` ran");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the backup is private");
    let leftovers: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".partial"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    file
}

fn fake_config() -> FakeConfig {
    FakeConfig {
        redirect_uris: vec![REDIRECT_URI.into()],
        // Short-lived tokens: refreshes happen throughout the drill.
        access_token_lifetime: Duration::from_secs(8),
        ..FakeConfig::default()
    }
}

/// Every account serves a token EdgeTag accepts (refreshing with the restored grant where due).
async fn every_account_serves(fake: &FakeEdgeTag, client: &mut Client) -> Vec<String> {
    let mut tokens = Vec::new();
    for account in names() {
        let token = get_token(client, &account)
            .await
            .unwrap_or_else(|s| panic!("{account}: {s:?}"));
        assert!(
            fake.access_token_is_valid(&token),
            "{account}: EdgeTag refuses its token"
        );
        tokens.push(token);
    }
    tokens
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disaster_drill_backup_under_load_kill_9_restore_into_a_fresh_directory() {
    let fake = FakeEdgeTag::start(fake_config()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("encryption.key");
    sealing::create_key_file(&key).unwrap();
    let file = back_up_a_loaded_node_then_kill_it(&fake, dir.path(), &key).await;
    let listed = versions_in(&file);
    assert_eq!(listed.keys().cloned().collect::<Vec<_>>(), names());

    let fresh = dir.path().join("restored");
    let (code, stdout, stderr) = service(&[
        "restore".as_ref(),
        "--from".as_ref(),
        file.as_os_str(),
        "--data-dir".as_ref(),
        fresh.as_os_str(),
        "--encryption-key-file".as_ref(),
        key.as_os_str(),
    ])
    .await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stdout.contains(&format!(
            "{ACCOUNTS} account(s) (0 needing re-authorization), versions kept"
        )),
        "{stdout}"
    );
    {
        let store =
            SledStore::open(&fresh, Keyring::load(&key_config(&key), &fresh).unwrap()).unwrap();
        assert_eq!(
            versions_of(&store).await,
            listed,
            "every version as in the backup"
        );
        // The EdgeTag team learned at connection is in the sealed records the backup carried.
        for (account, stored) in store.load_accounts().await.unwrap() {
            assert_eq!(
                stored.record.team_id(),
                fake_edgetag::FAKE_TEAM_ID,
                "{account}"
            );
        }
    }
    let mut node = start(&fake, &On::Sled(&fresh), &key, dir.path()).await;
    every_account_serves(&fake, &mut node.client).await;
}

fn key_config(key: &Path) -> sealing::EncryptionConfig {
    sealing::EncryptionConfig {
        key_file: Some(key.to_owned()),
        previous_key_files: Vec::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disaster_drill_from_sled_into_postgres_behind_two_replicas() {
    let fake = FakeEdgeTag::start(fake_config()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("encryption.key");
    sealing::create_key_file(&key).unwrap();
    let file = back_up_a_loaded_node_then_kill_it(&fake, dir.path(), &key).await;
    let listed = versions_in(&file);

    let cluster = pg_cluster::Cluster::shared();
    let db = cluster.create_database();
    let url = format!("{}?sslmode=disable", db.url());
    let (code, stdout, stderr) = service(&[
        "restore".as_ref(),
        "--from".as_ref(),
        file.as_os_str(),
        "--store".as_ref(),
        url.as_ref(),
        "--store-password-file".as_ref(),
        cluster.password_file().as_os_str(),
        "--encryption-key-file".as_ref(),
        key.as_os_str(),
    ])
    .await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("into the PostgreSQL store"), "{stdout}");
    let pg = PostgresConfig::parse(&url, Some(cluster.password().into()), None).unwrap();
    let keys = Keyring::load(&key_config(&key), dir.path()).unwrap();
    let store = PostgresStore::open(&pg, keys).await.unwrap();
    assert_eq!(
        versions_of(&store).await,
        listed,
        "every version as in the backup"
    );

    let on = On::Postgres {
        url: &url,
        password_file: cluster.password_file(),
    };
    let mut replica_a = start(&fake, &on, &key, dir.path()).await;
    let mut replica_b = start(&fake, &on, &key, dir.path()).await;
    let (a, b) = (&mut replica_a.client, &mut replica_b.client);
    let from_a = every_account_serves(&fake, a).await;
    let from_b = every_account_serves(&fake, b).await;
    assert_eq!(
        from_a, from_b,
        "both replicas serve the same token for each account"
    );

    // The replicas fence on the restored versions: a refresh on one moves the version past the
    // backup's and the other serves its token.
    a.refresh_token(RefreshTokenRequest {
        account: "acct-000".into(),
    })
    .await
    .unwrap();
    let now = versions_of(&store).await;
    assert!(now["acct-000"] > listed["acct-000"]);
    assert!(
        listed.iter().all(|(name, v)| now[name] >= *v),
        "no version went back"
    );
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let seen = get_token(b, "acct-000").await.unwrap();
        if seen == get_token(a, "acct-000").await.unwrap() {
            break;
        }
        assert!(Instant::now() < until, "replica b serves a's refresh");
        tokio::task::yield_now().await;
    }
}

/// `credential-service restore` with `args`; asserts it failed with exit code 1 and one line on
/// stderr naming `reason`.
#[track_caller]
fn refused(outcome: (Option<i32>, String, String), reason: &str) {
    let (code, stdout, stderr) = outcome;
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(stderr.contains(reason), "{stderr:?} lacks {reason:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_refuses_damage_a_missing_key_and_a_store_with_accounts_and_changes_nothing() {
    let fake = FakeEdgeTag::start(fake_config()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("encryption.key");
    sealing::create_key_file(&key).unwrap();
    let node_dir = dir.path().join("node");
    let mut node = start(&fake, &On::Sled(&node_dir), &key, dir.path()).await;
    for account in ["acme", "globex", "initech"] {
        connect(&fake, &mut node.client, account).await;
    }
    let file = dir.path().join("good.backup");
    credctl(&["--server", &node.server, "backup", file.to_str().unwrap()])
        .await
        .0
        .unwrap();
    drop(node); // killed: sled allows one process, and restore is offline
    let bytes = std::fs::read(&file).unwrap();
    let target = dir.path().join("target");
    let restore = |from: &Path, key: &Path, data_dir: &Path, extra: &[&str]| {
        let mut args: Vec<std::ffi::OsString> = vec![
            "restore".into(),
            "--from".into(),
            from.into(),
            "--data-dir".into(),
            data_dir.into(),
            "--encryption-key-file".into(),
            key.into(),
        ];
        args.extend(extra.iter().map(Into::into));
        async move {
            let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
            service(&args).await
        }
    };

    // Truncated, and one byte flipped: the checksum says so before anything opens.
    let truncated = dir.path().join("truncated.backup");
    std::fs::write(&truncated, &bytes[..bytes.len() - 100]).unwrap();
    refused(
        restore(&truncated, &key, &target, &[]).await,
        "damaged or truncated",
    );
    let flipped = dir.path().join("flipped.backup");
    let mut bad = bytes.clone();
    bad[bytes.len() / 2] ^= 0x20;
    std::fs::write(&flipped, &bad).unwrap();
    refused(
        restore(&flipped, &key, &target, &[]).await,
        "damaged or truncated",
    );

    // A record changed and the checksum made to match: the record's own seal refuses it.
    let mut backup = format::decode(&bytes).unwrap();
    let last = backup.records[1].sealed.len() - 1;
    backup.records[1].sealed[last] ^= 0x01;
    let forged = dir.path().join("forged.backup");
    std::fs::write(&forged, format::encode(&backup.header, &backup.records)).unwrap();
    refused(
        restore(&forged, &key, &target, &[]).await,
        "account globex: the record does not open",
    );

    // Sealed with a key it was not given: the message names the key the records need.
    let other = dir.path().join("other.key");
    sealing::create_key_file(&other).unwrap();
    let needed = backup.header.key_ids.iter().next().unwrap().clone();
    refused(
        restore(&file, &other, &target, &[]).await,
        &format!("sealed with key {needed}, which is not loaded"),
    );
    assert!(!target.exists(), "no refusal so much as created the target");

    // A store that holds accounts, even the very ones backed up: refused, then unchanged.
    let keys = || Keyring::load(&key_config(&key), &node_dir).unwrap();
    let before = versions_of(&SledStore::open(&node_dir, keys()).unwrap()).await;
    refused(
        restore(&file, &key, &node_dir, &[]).await,
        "the store already holds 3 account(s)",
    );
    assert_eq!(
        versions_of(&SledStore::open(&node_dir, keys()).unwrap()).await,
        before
    );

    // --check opens everything and writes nothing; --replace restores over them.
    let (code, stdout, stderr) = service(&[
        "restore".as_ref(),
        "--check".as_ref(),
        file.as_os_str(),
        "--encryption-key-file".as_ref(),
        key.as_os_str(),
    ])
    .await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stdout.contains("is a sound backup: 3 account(s)")
            && stdout.contains("nothing was written"),
        "{stdout}"
    );
    let (code, stdout, stderr) = restore(&file, &key, &node_dir, &["--replace"]).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("restored"), "{stdout}");
}

#[tokio::test]
async fn a_backup_needs_a_caller_whose_globs_cover_every_account() {
    let dir = tempfile::tempdir().unwrap();
    let callers = common::callers_file(
        dir.path(),
        &[
            ("ops", "t-ops", "admin", "*"),
            ("team", "t-team", "admin", "acme*"),
        ],
    );
    let app = common::TestApp::spawn_with(common::Options {
        callers,
        token: Some("t-ops".into()),
        ..common::Options::default()
    })
    .await;
    app.connect("acme").await;
    app.connect("globex").await;
    let server = format!("http://{}", app.addr);
    let file = dir.path().join("team.backup");
    let (result, _) = credctl(&[
        "--server",
        &server,
        "--token",
        "t-team",
        "backup",
        file.to_str().unwrap(),
    ])
    .await;
    let e = result.unwrap_err();
    assert_eq!(e.exit_code(), credctl::exit::PERMISSION_DENIED, "{e}");
    assert!(e.to_string().contains("1 of them are outside"), "{e}");
    assert!(!file.exists(), "no partial backup");
    let (result, printed) = credctl(&[
        "--server",
        &server,
        "--token",
        "t-ops",
        "backup",
        file.to_str().unwrap(),
    ])
    .await;
    result.unwrap();
    assert!(printed.contains("Backed up 2 account(s)"), "{printed}");
    assert_eq!(
        format::decode(&std::fs::read(&file).unwrap())
            .unwrap()
            .records
            .len(),
        2
    );
}
