//! The soak (issue 11 item 4): a long run of ordinary work, watching for slow leaks. Not part of
//! the default sections or of CI; run it with `cargo bench --bench suite -- soak`
//! (`--soak-seconds` to shorten it).
//!
//! Workload, all at once, on the system clock:
//! - 1,000 accounts whose tokens live 20 seconds, so the scheduler refreshes each about every 10 s
//!   (the margin is capped at half the lifetime), each refresh a durable write;
//! - churn: BeginAuth + approval at the fake + CompleteAuth of a new account, and RemoveAccount of
//!   the oldest one, so the number of accounts stays at 1,000 while the names move on;
//! - GetToken at a fixed rate over the live accounts.
//!
//! The service is the real binary in its own process (the fake EdgeTag and the load generator run
//! in this one). Every 10 s the soak samples the service's resident memory (`VmRSS`), its open
//! file descriptors (`/proc/PID/fd`) and the data directory's size, then fits a line through the
//! samples after the warm-up and reports each slope per hour.

use std::{
    collections::VecDeque,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use credential_service::{
    account::AccountId,
    proto::{
        BeginAuthRequest, CompleteAuthRequest, GetTokenRequest, RemoveAccountRequest,
        credential_service_client::CredentialServiceClient,
    },
    store::{Expected, Store},
    tokens::{AccountRecord, TokenSet},
};
use fake_edgetag::{FakeClock, FakeConfig, FakeEdgeTag};
use futures::StreamExt;
use tonic::transport::Channel;

use crate::{
    Env,
    fixture::{self, REDIRECT_URI},
    load, scale,
};

/// What the soak is asked to do.
pub struct SoakSpec {
    pub duration: Duration,
    pub warmup: Duration,
    pub accounts: usize,
    pub token_lifetime: Duration,
    /// New accounts connected (and old ones removed) per second.
    pub churn_per_sec: f64,
    /// GetToken calls per second.
    pub gets_per_sec: f64,
    pub sample_every: Duration,
}

impl SoakSpec {
    pub fn new(duration: Duration) -> Self {
        Self {
            duration,
            warmup: Duration::from_secs(60).min(duration / 3),
            accounts: 1_000,
            token_lifetime: Duration::from_secs(20),
            churn_per_sec: 5.0,
            gets_per_sec: 2_000.0,
            sample_every: Duration::from_secs(10),
        }
    }
}

#[derive(Clone, Copy)]
pub struct Sample {
    pub at: Duration,
    pub rss_kib: u64,
    pub fds: u64,
    pub data_bytes: u64,
    pub data_files: u64,
    pub refreshes_ok: u64,
}

#[derive(Default)]
struct Counts {
    gets: AtomicU64,
    get_errors: AtomicU64,
    connected: AtomicU64,
    removed: AtomicU64,
    churn_errors: AtomicU64,
}

pub struct Soak {
    pub spec: SoakSpec,
    pub samples: Vec<Sample>,
    pub gets: u64,
    pub get_errors: u64,
    pub connected: u64,
    pub removed: u64,
    pub churn_errors: u64,
    /// Token-endpoint requests the fake did not answer with a token (failed refreshes or codes).
    pub upstream_failures: u64,
    pub refreshes_ok: u64,
    pub accounts_at_end: usize,
    pub first_error: Option<String>,
    pub load_before: String,
    pub load_after: String,
}

impl Soak {
    pub fn errors(&self) -> u64 {
        self.get_errors + self.churn_errors + self.upstream_failures
    }

    /// Least-squares slope per hour of `f` over the samples after the warm-up.
    pub fn slope_per_hour(&self, f: impl Fn(&Sample) -> f64) -> f64 {
        self.slope_per_hour_from(self.spec.warmup, f)
    }

    /// The slope over the second half of the run: a leak keeps its slope there, a warm-up that
    /// outlasted [`SoakSpec::warmup`] does not.
    pub fn late_slope_per_hour(&self, f: impl Fn(&Sample) -> f64) -> f64 {
        let end = self.samples.last().map_or(Duration::ZERO, |s| s.at);
        self.slope_per_hour_from((end / 2).max(self.spec.warmup), f)
    }

    fn slope_per_hour_from(&self, from: Duration, f: impl Fn(&Sample) -> f64) -> f64 {
        let pts: Vec<(f64, f64)> = self
            .samples
            .iter()
            .filter(|s| s.at >= from)
            .map(|s| (s.at.as_secs_f64(), f(s)))
            .collect();
        if pts.len() < 2 {
            return f64::NAN;
        }
        let n = pts.len() as f64;
        let mx = pts.iter().map(|p| p.0).sum::<f64>() / n;
        let my = pts.iter().map(|p| p.1).sum::<f64>() / n;
        let sxy: f64 = pts.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
        let sxx: f64 = pts.iter().map(|p| (p.0 - mx).powi(2)).sum();
        sxy / sxx * 3600.0
    }
}

pub async fn run(env: &Env, spec: SoakSpec) -> Soak {
    let load_before = loadavg();
    let fake = Arc::new(
        env.runtimes
            .fake
            .spawn(FakeEdgeTag::start(FakeConfig {
                redirect_uris: vec![REDIRECT_URI.to_owned()],
                access_token_lifetime: spec.token_lifetime,
                clock: FakeClock::system(),
                ..FakeConfig::default()
            }))
            .await
            .unwrap()
            .expect("the fake EdgeTag starts"),
    );
    let dir = fixture::temp_dir(env.data_root.as_deref(), "cs-bench-soak-");
    let names = fixture::account_names(spec.accounts);
    seed(dir.path(), &names, spec.token_lifetime, &fake).await;
    // The real binary in its own process, so memory and descriptors are the service's alone (the
    // fake EdgeTag here keeps every token it issued, for reuse detection and leak scans).
    let addr = scale::free_port();
    let log_dir = fixture::temp_dir(env.data_root.as_deref(), "cs-bench-soak-log-");
    let log_path = log_dir.path().join("stderr.log");
    let log = std::fs::File::create(&log_path).expect("a log file");
    let mut child = scale::command_with(addr, dir.path(), &fixture::fake_upstream(&fake), log)
        .spawn()
        .expect("the binary starts");
    let pid = child.id().expect("a running child");
    if let Err(e) = fixture::wait_until_serving(addr, Duration::from_secs(60)).await {
        let _ = child.kill().await;
        panic!(
            "the binary did not serve: {e}\n{}",
            std::fs::read_to_string(&log_path).unwrap_or_default()
        );
    }
    let clients = load::connect(addr, 4).await;

    let live: Arc<Mutex<VecDeque<String>>> = Arc::new(Mutex::new(names.iter().cloned().collect()));
    let counts = Arc::new(Counts::default());
    let first_error: Arc<Mutex<Option<String>>> = Arc::default();
    let started = Instant::now();
    let end = started + spec.duration;

    // GetToken at a fixed rate over the live accounts.
    let gets = {
        let (clients, live, counts, first_error) = (
            clients.clone(),
            live.clone(),
            counts.clone(),
            first_error.clone(),
        );
        // A batch every 10 ms (the timer's resolution is 1 ms).
        let batch = (spec.gets_per_sec / 100.0).round().max(1.0) as usize;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            let mut i = 0usize;
            while Instant::now() < end {
                tick.tick().await;
                for _ in 0..batch {
                    let account = {
                        let live = live.lock().unwrap();
                        live[i % live.len()].clone()
                    };
                    let mut client = clients[i % clients.len()].clone();
                    i = i.wrapping_add(7919);
                    let (counts, first_error) = (counts.clone(), first_error.clone());
                    tokio::spawn(async move {
                        let answer = client
                            .get_token(GetTokenRequest {
                                account: account.clone(),
                                min_validity: None,
                            })
                            .await;
                        counts.gets.fetch_add(1, Ordering::Relaxed);
                        if let Err(s) = answer {
                            counts.get_errors.fetch_add(1, Ordering::Relaxed);
                            note(&first_error, format!("GetToken {account}: {s:?}"));
                        }
                    });
                }
            }
        })
    };

    // Churn: connect a new account, retire the oldest (a second later, so GetToken calls already
    // aimed at it have landed).
    let churn = {
        let (client, live, counts, first_error, fake) = (
            clients[0].clone(),
            live.clone(),
            counts.clone(),
            first_error.clone(),
            fake.clone(),
        );
        let period = Duration::from_secs_f64(1.0 / spec.churn_per_sec);
        let first_new = spec.accounts;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut next = first_new;
            let mut removals = Vec::new();
            while Instant::now() < end {
                tick.tick().await;
                let account = format!("acct-{next:06}");
                next += 1;
                match connect(&mut client.clone(), &fake, &account).await {
                    Ok(()) => {
                        counts.connected.fetch_add(1, Ordering::Relaxed);
                        live.lock().unwrap().push_back(account);
                    }
                    Err(e) => {
                        counts.churn_errors.fetch_add(1, Ordering::Relaxed);
                        note(&first_error, e);
                        continue;
                    }
                }
                let Some(old) = live.lock().unwrap().pop_front() else {
                    continue;
                };
                let (mut client, counts, first_error) =
                    (client.clone(), counts.clone(), first_error.clone());
                removals.push(tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    match client
                        .remove_account(RemoveAccountRequest {
                            account: old.clone(),
                            force: false,
                        })
                        .await
                    {
                        Ok(_) => {
                            counts.removed.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(s) => {
                            counts.churn_errors.fetch_add(1, Ordering::Relaxed);
                            note(&first_error, format!("RemoveAccount {old}: {s:?}"));
                        }
                    }
                }));
            }
            for r in removals {
                let _ = r.await;
            }
        })
    };

    // Samples every `sample_every`, the first at the start.
    let mut samples = Vec::new();
    loop {
        let at = started.elapsed();
        let (data_bytes, data_files) = dir_size(dir.path());
        let sample = Sample {
            at,
            rss_kib: rss_kib(pid),
            fds: open_fds(pid),
            data_bytes,
            data_files,
            refreshes_ok: fake.stats().refreshes_ok,
        };
        eprintln!(
            "bench: soak {:>4.0} s: RSS {:.1} MiB, {} fds, data {:.2} MiB in {} files, {} refreshes, \
             {} GetToken ({} errors), +{} -{} accounts ({} errors), load {}",
            at.as_secs_f64(),
            sample.rss_kib as f64 / 1024.0,
            sample.fds,
            sample.data_bytes as f64 / 1048576.0,
            sample.data_files,
            sample.refreshes_ok,
            counts.gets.load(Ordering::Relaxed),
            counts.get_errors.load(Ordering::Relaxed),
            counts.connected.load(Ordering::Relaxed),
            counts.removed.load(Ordering::Relaxed),
            counts.churn_errors.load(Ordering::Relaxed),
            loadavg(),
        );
        samples.push(sample);
        if started.elapsed() + spec.sample_every > spec.duration + Duration::from_secs(1) {
            break;
        }
        tokio::time::sleep_until((started + spec.sample_every * samples.len() as u32).into()).await;
    }
    gets.await.unwrap();
    churn.await.unwrap();
    // Let GetToken calls still in flight land.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let accounts_at_end = live.lock().unwrap().len();
    let stats = fake.stats();
    drop(clients);
    scale::stop(&mut child).await;
    let first_error = first_error.lock().unwrap().clone();
    Soak {
        gets: counts.gets.load(Ordering::Relaxed),
        get_errors: counts.get_errors.load(Ordering::Relaxed),
        connected: counts.connected.load(Ordering::Relaxed),
        removed: counts.removed.load(Ordering::Relaxed),
        churn_errors: counts.churn_errors.load(Ordering::Relaxed),
        upstream_failures: stats.token_requests - stats.refreshes_ok - stats.code_exchanges_ok,
        refreshes_ok: stats.refreshes_ok,
        accounts_at_end,
        first_error,
        samples,
        spec,
        load_before,
        load_after: loadavg(),
    }
}

fn note(first: &Mutex<Option<String>>, e: String) {
    first.lock().unwrap().get_or_insert(e);
}

/// BeginAuth, approval at the fake, CompleteAuth.
async fn connect(
    client: &mut CredentialServiceClient<Channel>,
    fake: &FakeEdgeTag,
    account: &str,
) -> Result<(), String> {
    let begun = client
        .begin_auth(BeginAuthRequest {
            account: account.to_owned(),
        })
        .await
        .map_err(|s| format!("BeginAuth {account}: {s:?}"))?
        .into_inner();
    let redirect = fake.approve(&begun.authorize_url).await?;
    client
        .complete_auth(CompleteAuthRequest {
            code: redirect.code,
            state: redirect.state,
        })
        .await
        .map_err(|s| format!("CompleteAuth {account}: {s:?}"))?;
    Ok(())
}

/// Stores `names` with tokens of `lifetime` issued at spread-out moments of the last lifetime, so
/// their refreshes are spread evenly from the start.
async fn seed(dir: &Path, names: &[String], lifetime: Duration, fake: &FakeEdgeTag) {
    let store = fixture::open_store(dir);
    let now = SystemTime::now();
    let n = names.len().max(1) as u32;
    let records: Vec<(AccountId, AccountRecord)> = names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let issued_at = now - lifetime / 2 * i as u32 / n;
            let record = AccountRecord::connected(TokenSet {
                access_token: fixture::random_token("eta_").into(),
                refresh_token: Some(fake.seed_grant().into()),
                token_type: "Bearer".into(),
                issued_at,
                expires_at: issued_at + lifetime,
            });
            (AccountId::parse(name).unwrap(), record)
        })
        .collect();
    futures::stream::iter(records)
        .map(|(id, record)| {
            let store = store.clone();
            async move { store.put_account(&id, &record, Expected::Absent).await }
        })
        .buffer_unordered(256)
        .for_each(|r| {
            r.expect("seeding writes");
            async {}
        })
        .await;
    drop(store);
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn open_fds(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64)
}

/// Bytes and files under `dir`, recursively.
fn dir_size(dir: &Path) -> (u64, u64) {
    let (mut bytes, mut files) = (0, 0);
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(meta) = e.metadata() else { continue };
            if meta.is_dir() {
                todo.push(e.path());
            } else {
                bytes += meta.len();
                files += 1;
            }
        }
    }
    (bytes, files)
}

pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}
