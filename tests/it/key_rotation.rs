//! The encryption key rotated while the service serves (issue 25, item 3): real
//! `credential-service` processes (SIGHUP matters, so the real binary), the real `credctl`, the
//! fake EdgeTag on loopback, and on PostgreSQL two replicas on a private cluster.
//!
//! What each test proves:
//! - on sled, the README's steps, run as written, rotate the key under a steady GetToken load
//!   (and operator refreshes racing the re-seal) with zero failed calls; a key file that does not
//!   load is logged once and changes nothing; after `credctl reseal` the service restarts with the
//!   new key alone and every account serves the token it served before (no write was undone);
//! - on PostgreSQL, a replica that meets a record sealed with a key it does not hold logs it once
//!   (per key), keeps serving what it has, and takes the record up after its SIGHUP; once both
//!   hold the new key, `credctl reseal` leaves nothing on the old one, and both replicas restart
//!   with the new key alone and serve every account, with zero failed calls under load;
//! - ResealRecords is for admins only, like the other admin RPCs.
//!
//! `credctl` is the binary beside the service's (`cargo test --workspace` builds both; after
//! `cargo test --test key_rotation` alone, build it first with `cargo build -p credctl`).

use crate::common;

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use credential_service::{
    proto::{
        BeginAuthRequest, CompleteAuthRequest, GetTokenRequest, RefreshTokenRequest,
        ResealRecordsRequest, credential_service_client::CredentialServiceClient,
    },
    sealing::{self, EncryptionConfig, Keyring},
};
use fake_edgetag::{FakeConfig, FakeEdgeTag};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};
use tonic::{Code, transport::Channel};

const BIN: &str = env!("CARGO_BIN_EXE_credential-service");
const REDIRECT_URI: &str = "https://ops.example.com/oauth/callback";
/// What the fake issues: long enough that nothing refreshes unless a test asks.
const LIFETIME: Duration = Duration::from_secs(3600);
/// Bound on every wait for something that normally takes milliseconds.
const PATIENCE: Duration = Duration::from_secs(20);
/// The README's marker before the block this file runs.
const MARKER: &str = "<!-- tests/it/key_rotation.rs runs the next block -->";

type Client = CredentialServiceClient<Channel>;

/// The real `credctl`, beside the service's binary.
fn credctl() -> PathBuf {
    let path = Path::new(BIN).with_file_name("credctl");
    assert!(
        path.exists(),
        "{} is missing: build it with `cargo build -p credctl` (cargo test --workspace does)",
        path.display()
    );
    path
}

/// The id of the key in `file`, as records and reports name it.
fn key_id(file: &Path) -> String {
    let config = EncryptionConfig {
        key_file: Some(file.to_owned()),
        previous_key_files: Vec::new(),
    };
    Keyring::load(&config, file.parent().unwrap())
        .unwrap()
        .current_id()
}

/// One running `credential-service`. Dropping it kills the process; a failing test prints its
/// log tail.
struct Service {
    name: String,
    child: Child,
    addr: String,
    client: Client,
    log: Arc<Mutex<Vec<String>>>,
}

impl Service {
    /// Starts the binary with `args` in front of `fake`; returns once it serves.
    async fn start(name: &str, fake: &FakeEdgeTag, args: &[&std::ffi::OsStr]) -> Service {
        let mut child = Command::new(BIN)
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
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
        let log: Arc<Mutex<Vec<String>>> = Arc::default();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let find = async {
            while let Some(line) = lines.next_line().await.unwrap() {
                let addr = line
                    .split("credential-service serving addr=")
                    .nth(1)
                    .map(|rest| rest.split_whitespace().next().unwrap().to_owned());
                log.lock().unwrap().push(line);
                if let Some(addr) = addr {
                    return Some(addr);
                }
            }
            None
        };
        let Ok(Some(addr)) = tokio::time::timeout(Duration::from_secs(30), find).await else {
            panic!(
                "{name} did not start serving:\n{}",
                log.lock().unwrap().join("\n")
            );
        };
        let keep = log.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                keep.lock().unwrap().push(line);
            }
        });
        let client = CredentialServiceClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        Service {
            name: name.to_owned(),
            child,
            addr,
            client,
            log,
        }
    }

    fn pid(&self) -> String {
        self.child.id().unwrap().to_string()
    }

    fn server(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `kill -HUP`, as an operator sends it.
    async fn sighup(&self) {
        let sent = Command::new("kill")
            .args(["-HUP", &self.pid()])
            .status()
            .await
            .unwrap();
        assert!(sent.success());
    }

    /// SIGTERM, then waits for the clean exit.
    async fn stop(mut self) {
        let sent = Command::new("kill")
            .args(["-TERM", &self.pid()])
            .status()
            .await
            .unwrap();
        assert!(sent.success());
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("it stops within 30 s")
            .unwrap();
        assert_eq!(status.code(), Some(0), "{} stopped badly", self.name);
    }

    /// How many log lines so far contain `needle`.
    fn log_count(&self, needle: &str) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// Waits (bounded) until `n` log lines contain `needle`.
    async fn until_logged(&self, needle: &str, n: usize) {
        let started = Instant::now();
        while self.log_count(needle) < n {
            assert!(
                started.elapsed() < PATIENCE,
                "{} never logged {needle:?} {n} time(s)",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Connects `account` (BeginAuth, the person's approval at the fake, CompleteAuth).
    async fn connect(&self, fake: &FakeEdgeTag, account: &str) {
        let begun = self
            .client
            .clone()
            .begin_auth(BeginAuthRequest {
                account: account.into(),
            })
            .await
            .unwrap()
            .into_inner();
        let redirect = fake.approve(&begun.authorize_url).await.unwrap();
        self.client
            .clone()
            .complete_auth(CompleteAuthRequest {
                code: redirect.code,
                state: redirect.state,
            })
            .await
            .unwrap();
    }

    async fn token(&self, account: &str) -> String {
        get_token(&self.client, account).await.unwrap()
    }

    /// Polls until this service serves `token` for `account`. Until another replica's write
    /// reaches it, it may not know the account yet (NOT_FOUND): that is "not yet" too.
    async fn until_serving(&self, account: &str, token: &str) {
        let started = Instant::now();
        while get_token(&self.client, account).await.ok().as_deref() != Some(token) {
            assert!(
                started.elapsed() < PATIENCE,
                "{} never served the new token of {account}",
                self.name
            );
            tokio::task::yield_now().await;
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log.lock().unwrap();
            let tail = &log[log.len().saturating_sub(40)..];
            eprintln!("--- {} log tail ---\n{}", self.name, tail.join("\n"));
        }
    }
}

async fn get_token(client: &Client, account: &str) -> Result<String, tonic::Status> {
    client
        .clone()
        .get_token(GetTokenRequest {
            account: account.into(),
            min_validity: None,
        })
        .await
        .map(|r| r.into_inner().access_token)
}

async fn refresh(client: &Client, account: &str) -> String {
    client
        .clone()
        .refresh_token(RefreshTokenRequest {
            account: account.into(),
        })
        .await
        .unwrap();
    get_token(client, account).await.unwrap()
}

/// A steady GetToken load: `per_client` callers per client, each asking for the accounts in turn
/// every 2 ms, counting every call and every failure (with its status) until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    calls: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(clients: &[Client], per_client: usize, accounts: &[String]) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let calls = Arc::new(AtomicU64::new(0));
        let failures: Arc<Mutex<Vec<String>>> = Arc::default();
        let mut tasks = Vec::new();
        for (c, client) in clients.iter().enumerate() {
            for n in 0..per_client {
                let (client, accounts) = (client.clone(), accounts.to_vec());
                let (stop, calls, failures) = (stop.clone(), calls.clone(), failures.clone());
                tasks.push(tokio::spawn(async move {
                    let mut tick = tokio::time::interval(Duration::from_millis(2));
                    let mut i = c + n;
                    while !stop.load(Ordering::Relaxed) {
                        tick.tick().await;
                        let account = &accounts[i % accounts.len()];
                        i += 1;
                        if let Err(status) = get_token(&client, account).await {
                            failures
                                .lock()
                                .unwrap()
                                .push(format!("{account}: {status:?}"));
                        }
                        calls.fetch_add(1, Ordering::Relaxed);
                    }
                }));
            }
        }
        Load {
            stop,
            calls,
            failures,
            tasks,
        }
    }

    /// Waits until `more` further calls have completed, so each phase runs under load.
    async fn until_more_calls(&self, more: u64) {
        let target = self.calls.load(Ordering::Relaxed) + more;
        let started = Instant::now();
        while self.calls.load(Ordering::Relaxed) < target {
            assert!(started.elapsed() < PATIENCE, "the load stalled");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Stops the callers; returns (calls, failures).
    async fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.unwrap();
        }
        let failures = self.failures.lock().unwrap().clone();
        (self.calls.load(Ordering::Relaxed), failures)
    }
}

async fn fake() -> FakeEdgeTag {
    FakeEdgeTag::start(FakeConfig {
        redirect_uris: vec![REDIRECT_URI.to_owned()],
        access_token_lifetime: LIFETIME,
        ..FakeConfig::default()
    })
    .await
    .expect("the fake EdgeTag starts")
}

/// The README's encryption-key block.
fn readme_rotation() -> String {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let after = readme
        .split(MARKER)
        .nth(1)
        .expect("README.md has the key rotation marker");
    after
        .split("```sh\n")
        .nth(1)
        .unwrap()
        .split("\n```")
        .next()
        .unwrap()
        .to_owned()
}

/// Runs `script` with bash (`-euo pipefail`); returns (success, stdout, stderr).
async fn bash(script: &str) -> (bool, String, String) {
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        Command::new("bash")
            .args(["-euo", "pipefail", "-c", script])
            .stdin(Stdio::null())
            .output(),
    )
    .await
    .expect("the script finishes")
    .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn run_credctl(server: &str, args: &[&str]) -> std::process::Output {
    Command::new(credctl())
        .env_clear()
        .env("CREDCTL_SERVER", server)
        .args(args)
        .output()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_sled_the_readme_rotation_under_load_fails_no_call_and_the_new_key_alone_serves() {
    const ACCOUNTS: usize = 20;
    let fake = fake().await;
    let dir = tempfile::tempdir().unwrap();
    let etc = dir.path().join("etc");
    std::fs::create_dir(&etc).unwrap();
    let key = etc.join("encryption-key");
    sealing::create_key_file(&key).unwrap();
    let old_id = key_id(&key);
    let data = dir.path().join("data");
    let args: [&std::ffi::OsStr; 4] = [
        "--data-dir".as_ref(),
        data.as_os_str(),
        "--encryption-key-file".as_ref(),
        key.as_os_str(),
    ];
    let service = Service::start("sled", &fake, &args).await;
    let accounts: Vec<String> = (0..ACCOUNTS).map(|i| format!("acct-{i:02}")).collect();
    for account in &accounts {
        service.connect(&fake, account).await;
    }

    let clients = [service.client.clone(), {
        CredentialServiceClient::connect(service.server())
            .await
            .unwrap()
    }];
    let load = Load::start(&clients, 2, &accounts);
    // Operators refresh accounts all along, so re-seals race real writes of the same records.
    let refreshing = Arc::new(AtomicBool::new(true));
    let refresher = tokio::spawn({
        let (client, accounts, refreshing) =
            (service.client.clone(), accounts.clone(), refreshing.clone());
        async move {
            let mut refreshed = 0;
            while refreshing.load(Ordering::Relaxed) || refreshed < ACCOUNTS {
                refresh(&client, &accounts[refreshed % ACCOUNTS]).await;
                refreshed += 1;
            }
            refreshed
        }
    });
    load.until_more_calls(500).await;

    // The README's steps, as written: new key file, SIGHUP, credctl reseal, old key removed.
    let script = readme_rotation()
        .replace("/etc/credential-service", etc.to_str().unwrap())
        .replace("\"$(pidof credential-service)\"", &service.pid())
        .replace(
            "credctl reseal",
            &format!(
                "'{}' --server {} reseal",
                credctl().display(),
                service.server()
            ),
        );
    let (ok, stdout, stderr) = bash(&script).await;
    assert!(
        ok,
        "the README's rotation failed\n--- script\n{script}\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    );
    let new_id = key_id(&key);
    assert_ne!(new_id, old_id);
    assert!(
        stdout.contains(&format!(
            "Every record is sealed with key {new_id}: the previous key files can be retired."
        )),
        "{stdout}"
    );
    assert!(!etc.join("previous-encryption-key").exists());
    // One reload took the new key up, whichever of the signal and credctl came first.
    service.until_logged("encryption keys reloaded", 1).await;
    assert_eq!(service.log_count("encryption keys reloaded"), 1);
    load.until_more_calls(500).await;

    // A key file that does not load: one log line, the keys in force stay, credctl says why
    // (naming the file, never its content), and nothing changes for callers.
    let good = std::fs::read_to_string(&key).unwrap();
    std::fs::write(&key, "not-a-key-but-secret-looking\n").unwrap();
    service.sighup().await;
    service
        .until_logged("the encryption key files did not load", 1)
        .await;
    let refused = run_credctl(&service.server(), &["reseal"]).await;
    let err = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(6), "{err}");
    assert!(
        err.contains("FAILED_PRECONDITION")
            && err.contains(key.to_str().unwrap())
            && err.contains("the keys in force stay")
            && !err.contains("secret-looking"),
        "{err}"
    );
    // The refused reseal's line reaches the captured log after credctl has its answer.
    service
        .until_logged("the encryption key files did not load", 2)
        .await;
    assert_eq!(
        service.log_count("the encryption key files did not load"),
        2,
        "one line for the SIGHUP, one for the refused reseal"
    );
    assert!(!service.log_text().contains("secret-looking"));
    std::fs::write(&key, &good).unwrap();
    let again = run_credctl(&service.server(), &["--json", "reseal"]).await;
    assert_eq!(again.status.code(), Some(0));
    let report: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(report["key_id"], new_id.as_str());
    assert_eq!(report["resealed"], 0);
    assert_eq!(report["already_current"], ACCOUNTS as u64);
    assert_eq!(report["remaining"], serde_json::json!({}));
    // Each re-seal is audited like every operator action, refused or not.
    for outcome in ["OK", "FAILED_PRECONDITION"] {
        let audited = format!("method=\"ResealRecords\" account=\"\" outcome=\"{outcome}\"");
        service.until_logged(&audited, 1).await;
    }
    load.until_more_calls(200).await;

    refreshing.store(false, Ordering::Relaxed);
    let refreshed = refresher.await.unwrap();
    let (calls, failures) = load.finish().await;
    println!(
        "sled key rotation under load: {calls} GetToken calls, {} failed; {refreshed} operator refreshes during it",
        failures.len()
    );
    assert!(failures.is_empty(), "{failures:#?}");
    let mut served = Vec::new();
    for account in &accounts {
        served.push(service.token(account).await);
    }
    service.stop().await;

    // The new key alone opens everything, and every account serves what it served before.
    let service = Service::start("sled, new key alone", &fake, &args).await;
    for (account, before) in accounts.iter().zip(&served) {
        let token = service.token(account).await;
        assert_eq!(&token, before, "{account} serves what it served before");
        assert!(fake.access_token_is_valid(&token));
    }
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgresql_two_replicas_rotate_under_load_and_the_new_key_alone_serves() {
    const ACCOUNTS: usize = 10;
    let cluster = pg_cluster::Cluster::shared();
    let db = cluster.create_database();
    let fake = fake().await;
    let dir = tempfile::tempdir().unwrap();
    // Each replica has its own key file (as each pod has its own copy of the Secret), so one can
    // take the new key up before the other.
    let (a_key, b_key) = (dir.path().join("a.key"), dir.path().join("b.key"));
    sealing::create_key_file(&a_key).unwrap();
    std::fs::copy(&a_key, &b_key).unwrap();
    let old_id = key_id(&a_key);
    let store = format!("{}?sslmode=disable", db.url());
    let args = |key: &Path, name: &str| -> Vec<std::ffi::OsString> {
        vec![
            "--store".into(),
            store.clone().into(),
            "--store-password-file".into(),
            cluster.password_file().into(),
            "--encryption-key-file".into(),
            key.into(),
            "--data-dir".into(),
            dir.path().join(name).into(),
        ]
    };
    let start = async |name: &str, key: &Path| {
        let args = args(key, name);
        let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
        Service::start(name, &fake, &args).await
    };
    let (a, b) = tokio::join!(start("replica-a", &a_key), start("replica-b", &b_key));
    let accounts: Vec<String> = (0..ACCOUNTS).map(|i| format!("acct-{i:02}")).collect();
    for account in &accounts {
        a.connect(&fake, account).await;
    }
    for account in &accounts {
        let token = a.token(account).await;
        b.until_serving(account, &token).await;
    }
    let load = Load::start(&[a.client.clone(), b.client.clone()], 2, &accounts);
    load.until_more_calls(500).await;

    // A takes up the new key first.
    let new_key = dir.path().join("new.key");
    sealing::create_key_file(&new_key).unwrap();
    let new_id = key_id(&new_key);
    std::fs::copy(&new_key, &a_key).unwrap();
    a.sighup().await;
    a.until_logged("encryption keys reloaded", 1).await;

    // A refreshes two accounts: their records are now sealed with a key B does not hold. B says
    // so once (per key, not per record), and keeps serving the tokens it has.
    let (first, second) = (&accounts[0], &accounts[1]);
    let before = b.token(first).await;
    let new_first = refresh(&a.client, first).await;
    b.until_logged("sealed with a key this replica does not hold", 1)
        .await;
    let new_second = refresh(&a.client, second).await;
    assert_ne!(before, new_first);
    assert_eq!(b.token(first).await, before, "B keeps serving what it has");
    load.until_more_calls(500).await;

    // B takes up the new key: it loads the records it could not open.
    std::fs::copy(&new_key, &b_key).unwrap();
    b.sighup().await;
    b.until_serving(first, &new_first).await;
    b.until_serving(second, &new_second).await;
    assert_eq!(
        b.log_count("sealed with a key this replica does not hold"),
        1,
        "logged once for the key, not once per record or notification"
    );
    let key_warning = b
        .log_text()
        .lines()
        .find(|l| l.contains("sealed with a key this replica does not hold"))
        .unwrap()
        .to_owned();
    assert!(key_warning.contains(&new_id), "{key_warning}");

    // Every replica holds the new key: re-seal, with the real credctl.
    let resealed = run_credctl(&a.server(), &["reseal"]).await;
    let out = String::from_utf8_lossy(&resealed.stdout);
    assert_eq!(
        resealed.status.code(),
        Some(0),
        "{out}{}",
        String::from_utf8_lossy(&resealed.stderr)
    );
    assert!(
        out.contains(&format!(
            "Re-sealed {} record(s) with key {new_id}; 2 already were.",
            ACCOUNTS - 2
        )) && out.contains("Every record is sealed with key"),
        "{out}"
    );
    // Asked of the other replica, there is nothing left to do.
    let report = b
        .client
        .clone()
        .reseal_records(ResealRecordsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (report.resealed, report.already_current),
        (0, ACCOUNTS as u64)
    );
    assert!(report.remaining.is_empty(), "{:?}", report.remaining);
    load.until_more_calls(500).await;

    let (calls, failures) = load.finish().await;
    println!(
        "PostgreSQL key rotation on two replicas under load: {calls} GetToken calls, {} failed",
        failures.len()
    );
    assert!(failures.is_empty(), "{failures:#?}");
    let mut served = Vec::new();
    for account in &accounts {
        served.push(a.token(account).await);
    }
    assert_ne!(old_id, new_id);
    tokio::join!(a.stop(), b.stop());

    // Both key files hold the new key alone now: both replicas start and serve every account.
    let (a, b) = tokio::join!(
        start("replica-a again", &a_key),
        start("replica-b again", &b_key)
    );
    for (account, before) in accounts.iter().zip(&served) {
        for replica in [&a, &b] {
            let token = replica.token(account).await;
            assert_eq!(
                &token, before,
                "{} serves {account} as before",
                replica.name
            );
            assert!(fake.access_token_is_valid(&token));
        }
    }
}

/// ResealRecords is an admin RPC: a reader is refused before anything happens.
#[tokio::test]
async fn resealing_needs_the_admin_role() {
    let dir = tempfile::tempdir().unwrap();
    let callers = common::callers_file(
        dir.path(),
        &[
            ("ops", "admin-token", "admin", "*"),
            ("billing", "reader-token", "reader", "*"),
        ],
    );
    let app = common::TestApp::spawn_with(common::Options {
        callers,
        token: Some("admin-token".into()),
        ..Default::default()
    })
    .await;
    app.connect("acme").await;
    let reader = app.client_with_token(Some("reader-token"));
    let refused = reader
        .clone()
        .reseal_records(ResealRecordsRequest {})
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    let done = app
        .client
        .clone()
        .reseal_records(ResealRecordsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!((done.resealed, done.already_current), (0, 1));
}
