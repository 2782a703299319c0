//! Power cuts: "durable before the reply", measured. The real binary serves from a store whose
//! files live on the power-cut kit (`crates/powercut`: a FUSE file system that keeps everything not
//! yet fsynced in memory and drops it on command, directory entries included, sometimes tearing
//! the last write), under a mixed load of CompleteAuth, RefreshToken and RemoveAccount. At a random
//! moment the power goes: the kit drops what was not durable, the service (and PostgreSQL) are
//! killed, the kit comes back with what survived, and the service starts again on it.
//!
//! After each cut: the store opens; every account whose CompleteAuth or RefreshToken was
//! acknowledged refreshes and serves a token the fake EdgeTag accepts; no acknowledged removal
//! comes back. The fake rotates refresh tokens and revokes a grant whose old refresh token is
//! presented again, so a refresh lost after its acknowledgment cannot go unnoticed.
//!
//! Knobs (the defaults are what `.ci/run` runs; BENCHMARKS.md has the long runs):
//! - `POWERCUT_CUTS`: cuts per store (default 6);
//! - `POWERCUT_SEED`: the run's seed, printed at the start; the same seed makes the same choices
//!   (operations, moments, tears), though thread timing still varies;
//! - `POWERCUT_BIN`: another `credential-service` binary to put through the same cuts (how the
//!   experiment was shown to fail on the code before the fix).

use std::{
    collections::BTreeMap,
    path::PathBuf,
    process::Stdio,
    sync::{Arc, Mutex},
    time::Duration,
};

use credential_service::proto::{
    BeginAuthRequest, CompleteAuthRequest, GetTokenRequest, RefreshTokenRequest,
    RemoveAccountRequest, credential_service_client::CredentialServiceClient,
};
use fake_edgetag::{FakeConfig, FakeEdgeTag};
use powercut::{Options, PowerCutFs};
use rand::{Rng, SeedableRng, rngs::StdRng};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};
use tonic::{Code, transport::Channel};

const REDIRECT_URI: &str = "https://ops.example.com/oauth/callback";
const WORKERS: usize = 6;
const DEFAULT_CUTS: usize = 6;

type Client = CredentialServiceClient<Channel>;

/// The binary under test: this build's, unless `POWERCUT_BIN` names another.
fn binary() -> PathBuf {
    std::env::var_os("POWERCUT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_credential-service").into())
}

fn cuts() -> usize {
    std::env::var("POWERCUT_CUTS").map_or(DEFAULT_CUTS, |v| {
        v.parse().expect("POWERCUT_CUTS is a number")
    })
}

fn seed() -> u64 {
    std::env::var("POWERCUT_SEED").map_or_else(
        |_| rand::random(),
        |v| v.parse().expect("POWERCUT_SEED is a number"),
    )
}

/// What the load was told, per account: the last acknowledged operation decides what must hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Acked {
    /// CompleteAuth or RefreshToken answered OK: the account must serve a valid token.
    Connected { by: &'static str, round: usize },
    /// RemoveAccount answered OK: the account must stay gone.
    Removed { round: usize },
    /// An operation was under way when the power went: either outcome is allowed.
    Uncertain,
}

type Model = Arc<Mutex<BTreeMap<String, Acked>>>;

/// Where the store lives: sled's data directory on the kit, or PostgreSQL's.
enum Target {
    Sled,
    Postgres {
        cluster: Box<pg_cluster::Cluster>,
        url: String,
        key_file: PathBuf,
    },
}

struct Experiment {
    name: &'static str,
    fake: Arc<FakeEdgeTag>,
    kit: PowerCutFs,
    target: Target,
    /// The service's `--data-dir`: on the kit for sled; beside it (unused but for logs) on PostgreSQL.
    data_dir: PathBuf,
    /// The upper bound of a round's cut drawn as a write count: about what a round's load writes
    /// to the kit in a second (PostgreSQL writes far more per operation than sled).
    writes_per_round: u64,
    _dirs: tempfile::TempDir,
}

/// The service and its gRPC address.
struct Running {
    child: Child,
    addr: String,
}

impl Experiment {
    async fn new(name: &'static str, postgres: bool) -> Self {
        let fake = Arc::new(
            FakeEdgeTag::start(FakeConfig {
                redirect_uris: vec![REDIRECT_URI.into()],
                // No background refresh during a round: each refresh is one the load asked for,
                // so each is acknowledged or known to be under way at the cut.
                access_token_lifetime: Duration::from_secs(3600),
                rotate_refresh_tokens: true,
                revoke_grant_on_refresh_token_reuse: true,
                ..FakeConfig::default()
            })
            .await
            .unwrap(),
        );
        let dirs = tempfile::tempdir().unwrap();
        // PostgreSQL runs as its own system user, which must reach the mount inside.
        std::fs::set_permissions(
            dirs.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let mountpoint = dirs.path().join("kit");
        std::fs::create_dir(&mountpoint).unwrap();
        let kit = PowerCutFs::mount(&mountpoint, None, Options::default()).unwrap_or_else(|e| {
            panic!(
                "the power-cut kit did not mount at {} ({e}); it needs /dev/fuse and the right to \
                 mount (root, or fusermount3 from Debian's fuse3); .ci/run installs fuse3",
                mountpoint.display()
            )
        });
        let (target, data_dir) = if postgres {
            let cluster = Box::new(pg_cluster::Cluster::start_in(&mountpoint));
            let db = cluster.create_database();
            let url = format!("{}?sslmode=disable", db.url());
            // PostgreSQL does not fsync the directories CREATE DATABASE makes (nor does its
            // recovery when it makes them again): the set-up is settled, and the experiment cuts
            // only the service's own writes.
            kit.settle();
            let key_file = dirs.path().join("store.key");
            credential_service::sealing::create_key_file(&key_file).unwrap();
            (
                Target::Postgres {
                    cluster,
                    url,
                    key_file,
                },
                dirs.path().join("data"),
            )
        } else {
            (Target::Sled, mountpoint.join("data"))
        };
        let writes_per_round = if postgres { 3000 } else { 300 };
        Self {
            name,
            fake,
            kit,
            target,
            data_dir,
            writes_per_round,
            _dirs: dirs,
        }
    }

    /// Starts the service and waits until it serves; the one line it exits with otherwise.
    async fn start(&self) -> Result<Running, String> {
        let mut cmd = Command::new(binary());
        cmd.args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(&self.data_dir)
            .args(["--client-id", &self.fake.config().client_id])
            .args(["--redirect-uri", REDIRECT_URI])
            .args(["--authorize-url", &self.fake.authorize_url()])
            .args(["--token-url", &self.fake.token_url()])
            .args(["--revoke-url", &self.fake.revoke_url()])
            .args(["--upstream-timeout", "5s"])
            .env_clear()
            .env("EDGETAG_CLIENT_SECRET", &self.fake.config().client_secret)
            // The serving line is at info; the rest of the log stays at warn.
            .env("RUST_LOG", "warn,credential_service=info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Target::Postgres {
            cluster,
            url,
            key_file,
        } = &self.target
        {
            cmd.arg("--store")
                .arg(url)
                .arg("--store-password-file")
                .arg(cluster.password_file())
                .arg("--encryption-key-file")
                .arg(key_file);
        }
        let mut child = cmd.spawn().unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let mut last = String::new();
        let find = async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(rest) = line.split("credential-service serving addr=").nth(1) {
                    return Ok(rest.split_whitespace().next().unwrap().to_owned());
                }
                last = line;
            }
            Err(last)
        };
        let addr = tokio::time::timeout(Duration::from_secs(60), find)
            .await
            .map_err(|_| "did not serve within 60 s".to_owned())??;
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Running { child, addr })
    }

    /// The power goes at a moment drawn from `rng`: after a pause, or in the middle of the
    /// store's `n`th write from now (so that cuts also land inside writes, which a tear then
    /// leaves half done). The kit drops what was not durable; then every process using it dies.
    async fn cut(&mut self, running: Running, rng: &mut StdRng) -> (String, powercut::CutReport) {
        let tear = rng.random_bool(0.5).then(|| rng.random());
        let (moment, report) = if rng.random_bool(0.5) {
            let delay = rng.random_range(100..1200);
            tokio::time::sleep(Duration::from_millis(delay)).await; // the chaos itself, not a synchronisation
            (format!("after {delay} ms"), self.kit.cut(tear))
        } else {
            let n = rng.random_range(1..=self.writes_per_round);
            let armed = self.kit.cut_at_write(n, tear);
            let fired =
                tokio::task::spawn_blocking(move || armed.recv_timeout(Duration::from_secs(20)))
                    .await
                    .unwrap();
            match fired {
                Ok(report) => (format!("at write {n}"), report),
                // The load stopped short of n writes: cut now instead.
                Err(_) => (
                    format!("after 20 s, short of write {n}"),
                    self.kit.cut(tear),
                ),
            }
        };
        let mut child = running.child;
        child.start_kill().unwrap(); // SIGKILL
        child.wait().await.unwrap();
        if let Target::Postgres { cluster, .. } = &mut self.target {
            cluster.power_cut();
        }
        (moment, report)
    }

    async fn power_on(&mut self) {
        self.kit.power_on().expect("the kit mounts again");
        if let Target::Postgres { cluster, .. } = &mut self.target {
            cluster.start_again();
        }
    }
}

async fn connect(
    fake: &FakeEdgeTag,
    client: &mut Client,
    account: &str,
) -> Result<(), tonic::Status> {
    let begun = client
        .begin_auth(BeginAuthRequest {
            account: account.into(),
        })
        .await?;
    let redirect = fake
        .approve(&begun.into_inner().authorize_url)
        .await
        .map_err(tonic::Status::internal)?;
    client
        .complete_auth(CompleteAuthRequest {
            code: redirect.code,
            state: redirect.state,
        })
        .await
        .map(drop)
}

async fn refresh(client: &mut Client, account: &str) -> Result<(), tonic::Status> {
    client
        .refresh_token(RefreshTokenRequest {
            account: account.into(),
        })
        .await
        .map(drop)
}

async fn remove(client: &mut Client, account: &str) -> Result<(), tonic::Status> {
    client
        .remove_account(RemoveAccountRequest {
            account: account.into(),
            force: false,
        })
        .await
        .map(drop)
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

/// One worker's load until the service stops answering: each worker owns its accounts and works
/// on one at a time, so the model knows exactly which operation each account last had answered.
async fn load(
    fake: Arc<FakeEdgeTag>,
    mut client: Client,
    model: Model,
    prefix: String,
    round: usize,
    seed: u64,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut mine: Vec<String> = Vec::new();
    for i in 0.. {
        let pick = rng.random_range(0..100);
        let (account, op) = if pick < 45 || mine.is_empty() {
            (format!("{prefix}-{i}"), "CompleteAuth")
        } else if pick < 85 {
            (
                mine[rng.random_range(0..mine.len())].clone(),
                "RefreshToken",
            )
        } else {
            (
                mine.swap_remove(rng.random_range(0..mine.len())),
                "RemoveAccount",
            )
        };
        model
            .lock()
            .unwrap()
            .insert(account.clone(), Acked::Uncertain);
        let answer = match op {
            "CompleteAuth" => connect(&fake, &mut client, &account).await,
            "RefreshToken" => refresh(&mut client, &account).await,
            _ => remove(&mut client, &account).await,
        };
        if answer.is_err() {
            return; // the power went (or the service died): this account stays uncertain
        }
        let acked = if op == "RemoveAccount" {
            Acked::Removed { round }
        } else {
            if op == "CompleteAuth" {
                mine.push(account.clone());
            }
            Acked::Connected { by: op, round }
        };
        model.lock().unwrap().insert(account, acked);
    }
}

/// How many accounts acknowledged in earlier rounds are refreshed again after each cut (all of
/// them are asked for their token).
const OLDER_REFRESHED: usize = 20;

/// Checks every acknowledged account against the restarted service; returns what was lost. Each
/// account acknowledged in `round` (and a sample of older ones) must also refresh: a refresh
/// token lost after its acknowledgment was revoked at EdgeTag by the rotation.
async fn verify(
    fake: &FakeEdgeTag,
    client: &mut Client,
    model: &Model,
    round: usize,
    rng: &mut StdRng,
) -> Vec<String> {
    let accounts: Vec<(String, Acked)> = model
        .lock()
        .unwrap()
        .iter()
        .map(|(a, s)| (a.clone(), *s))
        .collect();
    let older = accounts
        .iter()
        .filter(|(_, a)| matches!(a, Acked::Connected { round: r, .. } if *r != round))
        .count();
    let mut lost = Vec::new();
    for (account, acked) in accounts {
        match acked {
            Acked::Connected { by, round: when } => {
                let again = when == round
                    || rng.random_ratio(OLDER_REFRESHED.min(older) as u32, older.max(1) as u32);
                let refreshed = if again {
                    refresh(client, &account).await
                } else {
                    Ok(())
                };
                let served = match refreshed {
                    Ok(()) => get_token(client, &account).await,
                    Err(e) => Err(e),
                };
                match served {
                    Ok(token) if fake.access_token_is_valid(&token) => {}
                    Ok(_) => lost.push(format!(
                        "{account} ({by} acknowledged in round {when}): its token is not valid at EdgeTag"
                    )),
                    Err(s) => lost.push(format!(
                        "{account} ({by} acknowledged in round {when}): {:?} {}",
                        s.code(),
                        s.message()
                    )),
                }
            }
            Acked::Removed { round } => match get_token(client, &account).await {
                Err(s) if s.code() == Code::NotFound => {}
                other => lost.push(format!(
                    "{account} (RemoveAccount acknowledged in round {round}) came back: {:?}",
                    other.map(|_| "serves a token").map_err(|s| s.code())
                )),
            },
            Acked::Uncertain => {}
        }
    }
    lost
}

async fn run(experiment: &mut Experiment) {
    let seed = seed();
    let cuts = cuts();
    let name = experiment.name;
    println!(
        "powercut {name}: seed {seed}, {cuts} cuts (replay: POWERCUT_SEED={seed} POWERCUT_CUTS={cuts})"
    );
    let mut rng = StdRng::seed_from_u64(seed);
    let model: Model = Arc::default();
    let mut running = experiment
        .start()
        .await
        .unwrap_or_else(|e| panic!("{name}: the service did not start on the kit: {e}"));
    let (mut acked_total, mut torn) = (0usize, 0usize);
    for round in 0..cuts {
        let client = Client::connect(format!("http://{}", running.addr))
            .await
            .unwrap();
        let workers: Vec<_> = (0..WORKERS)
            .map(|w| {
                tokio::spawn(load(
                    experiment.fake.clone(),
                    client.clone(),
                    model.clone(),
                    format!("r{round}w{w}"),
                    round,
                    rng.random(),
                ))
            })
            .collect();
        let (moment, report) = experiment.cut(running, &mut rng).await;
        for w in workers {
            w.await.unwrap();
        }
        torn += usize::from(report.torn.is_some());
        experiment.power_on().await;

        running = match experiment.start().await {
            Ok(r) => r,
            Err(e) => {
                panic!(
                    "{name}: after cut {round} {moment} (seed {seed}) the store does not open: {e}; cut: {report:?}"
                )
            }
        };
        let mut client = Client::connect(format!("http://{}", running.addr))
            .await
            .unwrap();
        let lost = verify(&experiment.fake, &mut client, &model, round, &mut rng).await;
        let acked = model
            .lock()
            .unwrap()
            .values()
            .filter(|a| !matches!(a, Acked::Uncertain))
            .count();
        acked_total = acked_total.max(acked);
        println!(
            "powercut {name}: cut {round} {moment}: {acked} acknowledged accounts checked, \
             {} lost; dropped {} bytes in {} files and {} directory entries{}",
            lost.len(),
            report.bytes_dropped,
            report.files_with_dropped_writes,
            report.entries_dropped,
            if report.torn.is_some() {
                ", tore the last write"
            } else {
                ""
            }
        );
        assert!(
            lost.is_empty(),
            "{name}: cut {round} (seed {seed}) lost {} acknowledged writes:\n{}",
            lost.len(),
            lost.join("\n")
        );
    }
    let stats = experiment.kit.stats();
    println!(
        "powercut {name}: {cuts} cuts, {torn} with a torn write, every store opened, 0 acknowledged \
         writes lost; {acked_total} accounts at most; {} file syncs, {} directory syncs",
        stats.file_syncs, stats.dir_syncs
    );
    assert!(
        acked_total >= cuts,
        "{name}: the load had most of its writes acknowledged"
    );
    let mut child = running.child;
    child.start_kill().unwrap();
    child.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_cuts_lose_no_acknowledged_write_on_sled() {
    let mut experiment = Experiment::new("sled", false).await;
    run(&mut experiment).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_cuts_lose_no_acknowledged_write_on_postgres() {
    let mut experiment = Experiment::new("postgres", true).await;
    run(&mut experiment).await;
}
