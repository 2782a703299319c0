//! Several replicas on one PostgreSQL database, as operators run them: real `credential-service`
//! processes sharing a private PostgreSQL cluster and one encryption key, real gRPC, and the fake
//! EdgeTag (a real HTTP server on loopback) in the test process.
//!
//! What each test proves fleet-wide: one upstream refresh for a thousand callers spread over three
//! replicas; no refresh token ever used twice under a provider that revokes the grant on reuse; a
//! replica killed while it holds an account's lock loses nothing; GetToken keeps serving while
//! PostgreSQL is down and refreshes resume when it returns; an authorization begun on one replica
//! completes on another exactly once; and every replica serves a refresh committed elsewhere
//! within 1 s (measured, printed for BENCHMARKS.md).
//!
//! Tokens live an hour, so nothing refreshes unless a test asks: callers force a refresh with a
//! `min_validity` longer than what the token has left, operators with RefreshToken. The tests
//! take turns (one fleet at a time) so that the timing bounds measure the service, not the other
//! tests on a 2-core machine.

use std::{
    collections::HashSet,
    path::PathBuf,
    process::Stdio,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use credential_service::proto::{
    BeginAuthRequest, CompleteAuthRequest, DescribeAccountRequest, GetTokenRequest,
    RefreshTokenRequest, credential_service_client::CredentialServiceClient,
};
use fake_edgetag::{FakeConfig, FakeEdgeTag};
use pg_cluster::{Cluster, Database};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};
use tonic::{Code, Status, transport::Channel};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

const BIN: &str = env!("CARGO_BIN_EXE_credential-service");
const REDIRECT_URI: &str = "https://ops.example.com/oauth/callback";
const ACCOUNT: &str = "acme";
/// What the fake issues: long enough that no background refresh happens during a test.
const LIFETIME: Duration = Duration::from_secs(3600);
/// Bound on every wait for something that normally takes milliseconds.
const PATIENCE: Duration = Duration::from_secs(10);

/// One fleet at a time (see the module docs). A tokio mutex: each test has its own runtime, and
/// the guard is held across awaits.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

type Client = CredentialServiceClient<Channel>;

/// Everything the replicas of one test share: the fake, the database, the key, the flags.
struct Fleet {
    fake: Arc<FakeEdgeTag>,
    store_url: String,
    password_file: PathBuf,
    key_file: PathBuf,
    dir: tempfile::TempDir,
    flags: Vec<String>,
    started: AtomicUsize,
}

/// One running replica. Dropping it kills the process; a failing test prints its log tail.
struct Replica {
    name: String,
    child: Child,
    addr: String,
    client: Client,
    log: Arc<Mutex<Vec<String>>>,
}

impl Fleet {
    /// A fleet on `db` behind a fake configured by `config`; `flags` go to every replica.
    async fn new(config: FakeConfig, cluster: &Cluster, db: &Database, flags: &[&str]) -> Fleet {
        let fake = FakeEdgeTag::start(FakeConfig {
            redirect_uris: vec![REDIRECT_URI.to_owned()],
            access_token_lifetime: LIFETIME,
            ..config
        })
        .await
        .expect("the fake EdgeTag starts");
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("encryption.key");
        credential_service::sealing::create_key_file(&key_file).unwrap();
        Fleet {
            fake: Arc::new(fake),
            store_url: format!("{}?sslmode=disable", db.url()),
            password_file: cluster.password_file().to_owned(),
            key_file,
            dir,
            flags: flags.iter().map(|f| (*f).to_owned()).collect(),
            started: AtomicUsize::new(0),
        }
    }

    /// Starts one replica and returns once it serves.
    async fn replica(&self) -> Replica {
        let n = self.started.fetch_add(1, Ordering::Relaxed);
        let name = format!("replica-{n}");
        let fake = &self.fake;
        let mut child = Command::new(BIN)
            .args(["--listen", "127.0.0.1:0", "--store", &self.store_url])
            .arg("--store-password-file")
            .arg(&self.password_file)
            .arg("--encryption-key-file")
            .arg(&self.key_file)
            // Unused with PostgreSQL; kept inside the temporary directory all the same.
            .arg("--data-dir")
            .arg(self.dir.path().join(&name))
            .args(["--client-id", fake.client_id()])
            .args(["--redirect-uri", REDIRECT_URI])
            .args(["--authorize-url", &fake.authorize_url()])
            .args(["--token-url", &fake.token_url()])
            .args(["--revoke-url", &fake.revoke_url()])
            .args(&self.flags)
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
        let addr = tokio::time::timeout(Duration::from_secs(30), find).await;
        let Ok(Some(addr)) = addr else {
            panic!(
                "{name} did not start serving:\n{}",
                log.lock().unwrap().join("\n")
            );
        };
        // Keep draining its log (so the pipe never blocks it), keeping it for a failure report.
        let keep = log.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                keep.lock().unwrap().push(line);
            }
        });
        let client = connect_client(&addr).await;
        Replica {
            name,
            child,
            addr,
            client,
            log,
        }
    }

    /// Starts `n` replicas at once.
    async fn replicas(&self, n: usize) -> Vec<Replica> {
        futures::future::join_all((0..n).map(|_| self.replica())).await
    }

    /// Connects `account` with BeginAuth on one replica and CompleteAuth on another (or the same);
    /// returns when its token expires, as CompleteAuth reports it.
    async fn connect_account(&self, begin_on: &Replica, complete_on: &Replica) -> SystemTime {
        let redirect = self.begin_and_approve(begin_on).await;
        let done = complete_on
            .client
            .clone()
            .complete_auth(CompleteAuthRequest {
                code: redirect.code,
                state: redirect.state,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(done.account, ACCOUNT);
        SystemTime::try_from(done.expires_at.unwrap()).unwrap()
    }

    /// BeginAuth for `account` on `replica`, then the person's approval at the fake EdgeTag: the
    /// code and state CompleteAuth takes.
    async fn begin_and_approve(&self, replica: &Replica) -> fake_edgetag::Redirect {
        let begun = replica
            .client
            .clone()
            .begin_auth(BeginAuthRequest {
                account: ACCOUNT.into(),
            })
            .await
            .unwrap()
            .into_inner();
        self.fake.approve(&begun.authorize_url).await.unwrap()
    }
}

impl Replica {
    /// More connections to this replica, so a burst is not capped by one connection's streams.
    async fn clients(&self, n: usize) -> Vec<Client> {
        futures::future::join_all((0..n).map(|_| connect_client(&self.addr))).await
    }

    /// The first log line containing `needle`, waiting (bounded) for it to be written.
    async fn log_line(&self, needle: &str) -> String {
        let started = Instant::now();
        loop {
            if let Some(line) = self.log.lock().unwrap().iter().find(|l| l.contains(needle)) {
                return line.clone();
            }
            assert!(
                started.elapsed() < PATIENCE,
                "{} never logged {needle:?}",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
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

    /// gRPC health of the whole server (1 is SERVING).
    async fn health(&self) -> i32 {
        let channel = Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .unwrap();
        HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .status
    }

    /// `kill -9`, and waits until the process is gone.
    async fn kill_9(&mut self) {
        self.child.start_kill().unwrap();
        self.child.wait().await.unwrap();
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log.lock().unwrap();
            let tail = &log[log.len().saturating_sub(40)..];
            eprintln!("--- {} log tail ---\n{}", self.name, tail.join("\n"));
        }
    }
}

async fn connect_client(addr: &str) -> Client {
    CredentialServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
}

async fn get_token(client: &Client, min_validity: Option<Duration>) -> Result<String, Status> {
    client
        .clone()
        .get_token(GetTokenRequest {
            account: ACCOUNT.into(),
            min_validity: min_validity.map(|d| d.try_into().unwrap()),
        })
        .await
        .map(|r| r.into_inner().access_token)
}

/// An operator's RefreshToken.
async fn refresh_token(client: &Client) -> Result<(), Status> {
    client
        .clone()
        .refresh_token(RefreshTokenRequest {
            account: ACCOUNT.into(),
        })
        .await
        .map(|_| ())
}

/// The `credential_store_up` gauge from a replica's metrics endpoint.
async fn store_up(metrics: &str) -> u8 {
    let text = reqwest::get(format!("http://{metrics}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find(|l| l.starts_with("credential_store_up "))
        .and_then(|l| l.split_whitespace().last()?.parse().ok())
        .unwrap_or_else(|| panic!("no credential_store_up in\n{text}"))
}

/// Polls a replica's `credential_store_up` gauge (bounded) until it reads `want`.
async fn until_store_up(metrics: &str, want: u8) {
    let started = Instant::now();
    while store_up(metrics).await != want {
        assert!(
            started.elapsed() < PATIENCE,
            "credential_store_up never became {want}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls `replica` until it serves `token` (not merely any token); returns how long that took.
/// Polls back to back: each call is a loopback round trip.
async fn until_serving(replica: &Replica, token: &str) -> Duration {
    let started = Instant::now();
    loop {
        match get_token(&replica.client, None).await {
            Ok(served) if served == token => return started.elapsed(),
            Ok(_) | Err(_) => {}
        }
        assert!(
            started.elapsed() < PATIENCE,
            "{} never served the expected token",
            replica.name
        );
        tokio::task::yield_now().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_callers_on_three_replicas_cause_one_upstream_refresh() {
    const MARGIN: Duration = Duration::from_secs(4);
    let cluster = Cluster::shared();
    let db = cluster.create_database();
    let _turn = ONE_AT_A_TIME.lock().await;
    let fleet = Fleet::new(
        FakeConfig::default(),
        cluster,
        &db,
        &["--refresh-margin", "4s"],
    )
    .await;
    let a = fleet.replica().await;
    // A replica names its store, and no data directory it does not use.
    let serving = a.log_line("credential-service serving").await;
    assert!(
        serving.contains("store=postgres") && !serving.contains("data_dir="),
        "{serving}"
    );
    let expires_at = fleet.connect_account(&a, &a).await;
    let first = get_token(&a.client, None).await.unwrap();
    let (b, c) = tokio::join!(fleet.replica(), fleet.replica());
    // The replicas that loaded the account from the store answer the expiry the one that
    // connected it answered, to the nanosecond.
    for replica in [&b, &c] {
        let info = replica
            .client
            .clone()
            .describe_account(DescribeAccountRequest {
                account: ACCOUNT.into(),
            })
            .await
            .unwrap()
            .into_inner();
        let loaded = SystemTime::try_from(info.access_token_expires_at.unwrap()).unwrap();
        assert_eq!(loaded, expires_at, "{}", replica.name);
    }
    // Replicas after the first find the schema in place, quietly (no "already exists" NOTICE).
    for replica in [&b, &c] {
        let log = replica.log.lock().unwrap();
        assert!(
            !log.iter().any(|l| l.contains("already exists")),
            "{}",
            log.join("\n")
        );
    }
    until_serving(&b, &first).await;
    until_serving(&c, &first).await;
    let replicas = [a, b, c];

    // The most a caller may ask for; once the token is MARGIN old it has less than that left, so
    // every caller needs a refresh (the real clock passing, not a synchronisation).
    let need = LIFETIME - MARGIN;
    let stale_at = expires_at - need + Duration::from_millis(50);
    if let Ok(wait) = stale_at.duration_since(SystemTime::now()) {
        tokio::time::sleep(wait).await;
    }
    let mut clients = Vec::new();
    for replica in &replicas {
        clients.extend(replica.clients(4).await);
    }
    let before = fleet.fake.stats();
    let calls: Vec<_> = (0..1000)
        .map(|i| {
            let client = clients[i % clients.len()].clone();
            tokio::spawn(async move { get_token(&client, Some(need)).await })
        })
        .collect();
    let mut tokens = HashSet::new();
    for call in futures::future::join_all(calls).await {
        tokens.insert(call.unwrap().expect("every caller gets a token"));
    }
    let after = fleet.fake.stats();

    assert_eq!(
        after.refreshes_ok - before.refreshes_ok,
        1,
        "exactly one upstream refresh fleet-wide"
    );
    assert_eq!(
        after.token_requests - before.token_requests,
        1,
        "no other request reached EdgeTag"
    );
    assert_eq!(tokens.len(), 1, "every caller got the same token");
    let token = tokens.into_iter().next().unwrap();
    assert_ne!(token, first, "the stale token was replaced");
    assert!(fleet.fake.access_token_is_valid(&token));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_rotations_on_three_replicas_never_reuse_a_refresh_token() {
    const CYCLES: u64 = 20;
    let cluster = Cluster::shared();
    let db = cluster.create_database();
    let _turn = ONE_AT_A_TIME.lock().await;
    let fleet = Fleet::new(
        FakeConfig {
            rotate_refresh_tokens: true,
            revoke_grant_on_refresh_token_reuse: true,
            ..FakeConfig::default()
        },
        cluster,
        &db,
        &[],
    )
    .await;
    let replicas = fleet.replicas(3).await;
    fleet.connect_account(&replicas[0], &replicas[1]).await;
    let first = get_token(&replicas[1].client, None).await.unwrap();
    for replica in &replicas {
        until_serving(replica, &first).await;
    }
    // A slower EdgeTag widens the window in which the three replicas' refreshes overlap.
    fleet.fake.set_token_delay(Duration::from_millis(20));

    // GetToken load on every replica: each answer must be a token EdgeTag accepts right then, which
    // stops being true for all of them the moment a reuse revokes the grant.
    let stop = Arc::new(AtomicBool::new(false));
    let mut load = Vec::new();
    for replica in &replicas {
        for client in replica.clients(2).await {
            let (stop, fake) = (stop.clone(), fleet.fake.clone());
            load.push(tokio::spawn(async move {
                let mut served = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let token = get_token(&client, None).await.expect("GetToken under load");
                    assert!(fake.access_token_is_valid(&token), "a revoked token served");
                    served += 1;
                }
                served
            }));
        }
    }

    // Each cycle, all three replicas are told to refresh at the same moment: one refreshes, the
    // others must take its result rather than present the refresh token it just rotated away.
    let mut rounds = 0;
    while fleet.fake.stats().refreshes_ok < CYCLES {
        rounds += 1;
        assert!(rounds <= 3 * CYCLES, "too few refreshes happened");
        let answers = futures::future::join_all(replicas.iter().map(|r| refresh_token(&r.client)));
        for (i, answer) in answers.await.into_iter().enumerate() {
            answer.unwrap_or_else(|s| panic!("RefreshToken on replica {i}: {s:?}"));
        }
    }
    stop.store(true, Ordering::Relaxed);
    let mut served = 0;
    for task in load {
        served += task.await.unwrap();
    }

    let stats = fleet.fake.stats();
    assert_eq!(stats.refresh_token_reuses, 0, "no refresh token was reused");
    assert!(served > 0);
    // The grant is alive: one more refresh works, and every replica serves what it produced.
    fleet.fake.set_token_delay(Duration::ZERO);
    refresh_token(&replicas[2].client).await.unwrap();
    let last = get_token(&replicas[2].client, None).await.unwrap();
    assert!(fleet.fake.access_token_is_valid(&last));
    for replica in &replicas {
        until_serving(replica, &last).await;
    }
    eprintln!(
        "rotation: {} upstream refreshes in {rounds} rounds of 3 concurrent RefreshToken, \
         {served} GetToken answers, 0 reuses",
        stats.refreshes_ok
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_holding_the_lock_mid_refresh_loses_nothing() {
    let cluster = Cluster::shared();
    let db = cluster.create_database();
    let _turn = ONE_AT_A_TIME.lock().await;
    let fleet = Fleet::new(FakeConfig::default(), cluster, &db, &[]).await;
    let mut replicas = fleet.replicas(3).await;
    fleet.connect_account(&replicas[0], &replicas[0]).await;
    let first = get_token(&replicas[0].client, None).await.unwrap();
    for replica in &replicas {
        until_serving(replica, &first).await;
    }

    // Replica 0 refreshes against a slow EdgeTag: it holds the account's row lock while it waits.
    fleet.fake.set_token_delay(Duration::from_secs(5));
    let victim = replicas[0].client.clone();
    let doomed = tokio::spawn(async move { refresh_token(&victim).await });
    tokio::time::timeout(
        PATIENCE,
        fleet.fake.until_token_requests_in_flight(|n| n > 0),
    )
    .await
    .expect("the refresh reaches EdgeTag");
    replicas[0].kill_9().await;
    fleet.fake.set_token_delay(Duration::ZERO);
    let doomed = tokio::time::timeout(PATIENCE, doomed)
        .await
        .unwrap()
        .unwrap();
    assert!(doomed.is_err(), "the killed replica answered: {doomed:?}");

    // Its session ended with it, and the lock with the session: another replica refreshes at once
    // (a lock still held would make it wait out lock_timeout and fail with UNAVAILABLE).
    let started = Instant::now();
    refresh_token(&replicas[1].client)
        .await
        .expect("another replica refreshes");
    let took = started.elapsed();
    let second = get_token(&replicas[1].client, None).await.unwrap();
    assert_ne!(second, first);
    assert!(fleet.fake.access_token_is_valid(&second));
    until_serving(&replicas[2], &second).await;
    // The stored refresh token still works: the third replica refreshes too.
    refresh_token(&replicas[2].client)
        .await
        .expect("the refresh token survived");
    let third = get_token(&replicas[2].client, None).await.unwrap();
    assert!(third != second && fleet.fake.access_token_is_valid(&third));
    until_serving(&replicas[1], &third).await;
    assert!(
        took < Duration::from_secs(3),
        "the next refresh waited {took:?} for the dead replica's lock"
    );
    eprintln!("kill -9 mid-refresh: the next replica's refresh took {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_down_tokens_still_served_and_refreshes_resume_when_it_returns() {
    let cluster = Cluster::start();
    let db = cluster.create_database();
    let _turn = ONE_AT_A_TIME.lock().await;
    let fleet = Fleet::new(
        FakeConfig::default(),
        &cluster,
        &db,
        &["--metrics-listen", "127.0.0.1:0"],
    )
    .await;
    let replicas = fleet.replicas(2).await;
    let mut metrics = Vec::new();
    for replica in &replicas {
        let line = replica.log_line("metrics serving").await;
        let addr = line.split("addr=").nth(1).unwrap().split_whitespace();
        metrics.push(addr.into_iter().next().unwrap().to_owned());
    }
    fleet.connect_account(&replicas[0], &replicas[0]).await;
    let first = get_token(&replicas[0].client, None).await.unwrap();
    until_serving(&replicas[1], &first).await;
    const UNREACHABLE: &str = "the database is unreachable";
    for (replica, metrics) in replicas.iter().zip(&metrics) {
        assert_eq!(store_up(metrics).await, 1);
        assert_eq!(replica.log_count(UNREACHABLE), 0);
    }

    // GetToken load on both replicas all along; `outage` counts answers while PostgreSQL is down.
    let stop = Arc::new(AtomicBool::new(false));
    let down = Arc::new(AtomicBool::new(false));
    let during_outage = Arc::new(AtomicUsize::new(0));
    let mut load = Vec::new();
    for replica in &replicas {
        for client in replica.clients(2).await {
            let (stop, down, during_outage) = (stop.clone(), down.clone(), during_outage.clone());
            load.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let was_down = down.load(Ordering::Relaxed);
                    let answer = get_token(&client, None).await;
                    let token = answer.unwrap_or_else(|s| {
                        panic!("GetToken failed (PostgreSQL down: {was_down}): {s:?}")
                    });
                    assert!(!token.is_empty());
                    if was_down && down.load(Ordering::Relaxed) {
                        during_outage.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
    }

    let mut cluster = tokio::task::spawn_blocking(move || {
        let mut cluster = cluster;
        cluster.stop();
        cluster
    })
    .await
    .unwrap();
    down.store(true, Ordering::Relaxed);
    // A refresh fails closed, with UNAVAILABLE, in bounded time.
    let started = Instant::now();
    let refused = refresh_token(&replicas[0].client).await;
    assert_eq!(
        refused.map_err(|s| s.code()),
        Err(Code::Unavailable),
        "a refresh while PostgreSQL is down"
    );
    assert!(started.elapsed() < Duration::from_secs(15));
    // Both replicas notice (the listener's connection drops), say so once, and stay SERVING.
    for (replica, metrics) in replicas.iter().zip(&metrics) {
        until_store_up(metrics, 0).await;
        assert_eq!(replica.health().await, 1, "{} stays SERVING", replica.name);
    }
    let waited = Instant::now();
    while during_outage.load(Ordering::Relaxed) < 200 {
        assert!(waited.elapsed() < PATIENCE, "too few GetToken answers");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cluster = tokio::task::spawn_blocking(move || {
        cluster.start_again();
        cluster
    })
    .await
    .unwrap();
    let back = Instant::now();
    down.store(false, Ordering::Relaxed);

    // Refreshes resume by themselves: poll (bounded) until one succeeds.
    loop {
        match refresh_token(&replicas[0].client).await {
            Ok(()) => break,
            Err(s) => {
                assert_eq!(s.code(), Code::Unavailable, "{s:?}");
                assert!(
                    back.elapsed() < Duration::from_secs(10),
                    "no refresh within 10 s of PostgreSQL's return: {s:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let resumed = back.elapsed();
    let fresh = get_token(&replicas[0].client, None).await.unwrap();
    assert_ne!(fresh, first);
    // The other replica's listener reconnected and follows again.
    until_serving(&replicas[1], &fresh).await;
    stop.store(true, Ordering::Relaxed);
    for task in load {
        task.await.unwrap();
    }
    for (replica, metrics) in replicas.iter().zip(&metrics) {
        until_store_up(metrics, 1).await;
        assert_eq!(
            replica.log_count(UNREACHABLE),
            1,
            "{}: one log line per outage, not one per call",
            replica.name
        );
    }
    eprintln!(
        "PostgreSQL outage: {} GetToken answers while down, refreshes resumed {resumed:?} after its return",
        during_outage.load(Ordering::Relaxed)
    );
    drop(replicas);
    drop(cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn begin_on_one_replica_complete_on_another_and_a_replay_is_not_found() {
    let cluster = Cluster::shared();
    let db = cluster.create_database();
    let _turn = ONE_AT_A_TIME.lock().await;
    let fleet = Fleet::new(FakeConfig::default(), cluster, &db, &[]).await;
    let replicas = fleet.replicas(3).await;
    let complete = |replica: &Replica, code: &str, state: &str| {
        let mut client = replica.client.clone();
        let request = CompleteAuthRequest {
            code: code.into(),
            state: state.into(),
        };
        async move { client.complete_auth(request).await }
    };

    let redirect = fleet.begin_and_approve(&replicas[0]).await;
    let done = complete(&replicas[1], &redirect.code, &redirect.state)
        .await
        .expect("CompleteAuth on another replica")
        .into_inner();
    assert_eq!(done.account, ACCOUNT);
    for replica in [&replicas[2], &replicas[0], &replicas[1]] {
        let replay = complete(replica, &redirect.code, &redirect.state).await;
        assert_eq!(
            replay.map(|_| ()).map_err(|s| s.code()),
            Err(Code::NotFound),
            "a replay on {}",
            replica.name
        );
    }
    let token = get_token(&replicas[1].client, None).await.unwrap();
    until_serving(&replicas[2], &token).await;

    // The same state completed on all three at once: exactly one wins.
    let redirect = fleet.begin_and_approve(&replicas[2]).await;
    let answers = futures::future::join_all(
        replicas
            .iter()
            .map(|r| complete(r, &redirect.code, &redirect.state)),
    )
    .await;
    let codes: Vec<_> = answers
        .into_iter()
        .map(|a| a.map(|_| ()).map_err(|s| s.code()))
        .collect();
    assert_eq!(codes.iter().filter(|c| c.is_ok()).count(), 1, "{codes:?}");
    assert_eq!(
        codes.iter().filter(|c| **c == Err(Code::NotFound)).count(),
        2,
        "{codes:?}"
    );
    assert_eq!(fleet.fake.stats().code_exchanges_ok, 2, "one exchange each");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_replica_serves_a_refresh_committed_elsewhere_within_one_second() {
    const ROUNDS: usize = 20;
    let cluster = Cluster::shared();
    let db = cluster.create_database();
    let _turn = ONE_AT_A_TIME.lock().await;
    let fleet = Fleet::new(FakeConfig::default(), cluster, &db, &[]).await;
    let replicas = fleet.replicas(3).await;
    fleet.connect_account(&replicas[0], &replicas[0]).await;
    let mut current = get_token(&replicas[0].client, None).await.unwrap();
    for replica in &replicas {
        until_serving(replica, &current).await;
    }

    let mut latencies = Vec::new();
    for round in 0..ROUNDS {
        let writer = &replicas[round % replicas.len()];
        // The reply comes after the commit: latencies count from there.
        refresh_token(&writer.client).await.unwrap();
        let committed = Instant::now();
        let fresh = get_token(&writer.client, None).await.unwrap();
        assert_ne!(fresh, current, "the writer serves its own refresh at once");
        let others = replicas.iter().filter(|r| r.addr != writer.addr);
        let seen = futures::future::join_all(others.map(|r| {
            let fresh = fresh.clone();
            async move {
                until_serving(r, &fresh).await;
                let latency = committed.elapsed();
                // And never an older token after that.
                for _ in 0..5 {
                    assert_eq!(get_token(&r.client, None).await.unwrap(), fresh);
                }
                latency
            }
        }))
        .await;
        latencies.extend(seen);
        current = fresh;
    }
    latencies.sort();
    let p50 = latencies[latencies.len() / 2];
    let max = *latencies.last().unwrap();
    eprintln!(
        "coherence (RefreshToken reply on one replica -> served by another), {} samples over \
         {ROUNDS} rounds: p50 {p50:?}, max {max:?}",
        latencies.len()
    );
    assert!(
        max < Duration::from_secs(1),
        "a replica served the new token only after {max:?}"
    );
}
