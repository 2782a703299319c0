//! Refresh storms: many callers on one expired account must cost one upstream call; many accounts
//! expiring at once must cost one call each, never more than the upstream cap in flight.

use std::time::{Duration, Instant};

use credential_service::{
    broker::BrokerConfig,
    clock::Clock,
    metrics,
    proto::{
        GetTokenRequest, RefreshTokenRequest, credential_service_client::CredentialServiceClient,
    },
};
use fake_edgetag::{FakeEdgeTag, FakeStats, Fault};
use hdrhistogram::Histogram;
use tonic::transport::Channel;

use crate::{
    Env,
    fixture::{self, RunningServer, SERVER_THREADS, TOKEN_LIFETIME},
    load,
};

/// Client connections the storm's calls share (calls are HTTP/2 streams, not connections).
const CHANNELS: usize = 16;

pub struct Storm {
    pub name: &'static str,
    pub callers: usize,
    pub accounts: usize,
    /// Delay the fake adds to every token request, standing in for EdgeTag's own latency.
    pub upstream_delay: Duration,
    /// The mean time a token request really spent in the fake (the delay, rounded up to the
    /// timer's millisecond, plus the fake's own work).
    pub upstream_latency: Duration,
    pub expected_calls: u64,
    pub upstream_calls: u64,
    pub refreshes_ok: u64,
    pub peak_upstream: u64,
    pub cap: usize,
    pub errors: u64,
    pub first_error: Option<String>,
    /// From the first call sent to the last answer received.
    pub drain: Duration,
    /// Caller latency, nanoseconds.
    pub latency: Histogram<u64>,
}

impl Storm {
    /// The drain if every upstream slot were always busy: ⌈accounts ÷ cap⌉ requests in a row, each
    /// taking the latency EdgeTag really had.
    pub fn limit(&self) -> Duration {
        self.upstream_latency * self.accounts.div_ceil(self.cap.max(1)) as u32
    }

    pub fn holds(&self) -> bool {
        self.errors == 0
            && self.upstream_calls == self.expected_calls
            && self.refreshes_ok == self.expected_calls
            && self.peak_upstream <= self.cap as u64
    }
}

/// `callers` concurrent GetToken calls, all for one account whose token has just expired.
pub async fn one_account(env: &Env, callers: usize) -> Storm {
    run(
        env,
        "one account, many callers",
        1,
        callers,
        Duration::from_millis(50),
    )
    .await
}

/// `accounts` accounts expiring at the same moment, one GetToken each, all at once.
pub async fn many_accounts(env: &Env, accounts: usize) -> Storm {
    run(
        env,
        "many accounts expiring at once",
        accounts,
        accounts,
        // Enough for requests to overlap at the fake, so the peak shows whether the cap binds.
        Duration::from_millis(2),
    )
    .await
}

async fn run(
    env: &Env,
    name: &'static str,
    accounts: usize,
    callers: usize,
    upstream_delay: Duration,
) -> Storm {
    let clock = Clock::manual();
    let fake = fixture::start_fake(env.runtimes.fake.handle(), &clock).await;
    let dir = fixture::temp_dir(env.data_root.as_deref(), "cs-bench-storm-");
    let names = fixture::account_names(accounts);
    fixture::seed(dir.path(), &names, &clock, |_| fake.seed_grant()).await;
    let broker = BrokerConfig::default();
    let cap = broker.upstream_concurrency;
    let mut config =
        fixture::service_config(dir.path(), fixture::fake_upstream(&fake), broker, None);
    // Every caller's call is let in: the storm measures the single flight and the upstream cap,
    // not --max-calls-in-flight (whose refusals callers would retry).
    config.limits.max_calls_in_flight = config.limits.max_calls_in_flight.max(callers);
    let server = RunningServer::service(env.runtimes.server.handle(), config, clock.clone()).await;
    let clients = load::connect(server.addr, CHANNELS).await;

    fake.set_token_delay(upstream_delay);
    let before = fake.stats();
    let time_before = fake.token_time();
    fake.reset_peak();
    // Every token expires now.
    clock.advance(TOKEN_LIFETIME + Duration::from_secs(60));
    let started = Instant::now();
    let calls: Vec<_> = (0..callers)
        .map(|i| {
            let client = clients[i % clients.len()].clone();
            let account = names[i % names.len()].clone();
            tokio::spawn(call(client, account))
        })
        .collect();
    let mut latency = load::histogram();
    let (mut errors, mut first_error) = (0, None);
    for c in calls {
        match c.await.expect("a storm call") {
            Ok(ns) => latency.saturating_record(ns.max(1)),
            Err(e) => {
                errors += 1;
                first_error.get_or_insert(e);
            }
        }
    }
    let drain = started.elapsed();
    let after = fake.stats();
    let upstream_latency = mean_latency(&fake, time_before, before, after);
    server.stop().await;
    Storm {
        name,
        callers,
        accounts,
        upstream_delay,
        upstream_latency,
        expected_calls: accounts as u64,
        upstream_calls: after.token_requests - before.token_requests,
        refreshes_ok: after.refreshes_ok - before.refreshes_ok,
        peak_upstream: after.peak_token_concurrency,
        cap,
        errors,
        first_error,
        drain,
        latency,
    }
}

/// One GetToken; its latency in nanoseconds, or what went wrong.
async fn call(
    mut client: CredentialServiceClient<Channel>,
    account: String,
) -> Result<u64, String> {
    let sent = Instant::now();
    let answer = client
        .get_token(GetTokenRequest {
            account,
            min_validity: None,
        })
        .await;
    let ns = u64::try_from(sent.elapsed().as_nanos()).unwrap_or(u64::MAX);
    match answer {
        Ok(r) if !r.get_ref().access_token.is_empty() => Ok(ns),
        Ok(_) => Err("OK without a token".into()),
        Err(s) => Err(format!("{:?}: {}", s.code(), s.message())),
    }
}

/// How the accounts are brought back after the outage.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// Every account's caller is waiting: a second after the outage each caller calls again, and
    /// its demand probe (or the scheduler's refresh it joins) serves it.
    Callers,
    /// Nobody calls: one operator refresh succeeds, which ends every transient back-off and wakes
    /// the scheduler; the scheduler alone refreshes the rest.
    Scheduler,
}

/// Recovery after an EdgeTag outage (issue 11 item 1): every account's token has expired while
/// EdgeTag answered 503 to every refresh and every caller was told UNAVAILABLE; then EdgeTag is back.
pub struct Recovery {
    pub wake: Wake,
    pub accounts: usize,
    pub upstream_delay: Duration,
    /// The mean time a token request really spent in the fake after EdgeTag's return.
    pub upstream_latency: Duration,
    /// The mean latency of those refreshes as the service's EdgeTag client saw them (request
    /// sent to response head: the fake's time plus both HTTP stacks and loopback), from the
    /// service's own `credential_upstream_request_duration_seconds`.
    pub client_latency: Duration,
    pub cap: usize,
    /// Token requests during the outage (each failed), and callers told UNAVAILABLE.
    pub outage_requests: u64,
    pub outage_unavailable: u64,
    pub upstream_calls: u64,
    pub refreshes_ok: u64,
    pub peak_upstream: u64,
    /// From EdgeTag's return until the fake had answered every refresh.
    pub refreshed: Duration,
    /// From EdgeTag's return until every account had served a new token.
    pub served: Duration,
    pub errors: u64,
    pub first_error: Option<String>,
    /// On-CPU time, from EdgeTag's return to the end of the row, of the server runtime's threads
    /// and of the whole process (server, fake EdgeTag, callers, sled), and that window.
    pub server_cpu: Duration,
    pub process_cpu: Duration,
    pub window: Duration,
}

impl Recovery {
    /// accounts × upstream latency ÷ cap: the drain if every upstream slot were always busy,
    /// with the latency EdgeTag (the fake) really had.
    pub fn limit(&self) -> Duration {
        self.upstream_latency * self.accounts.div_ceil(self.cap.max(1)) as u32
    }

    /// [`Self::limit`] at the latency the service's client saw: what is left above it is time
    /// the service left an upstream slot idle.
    pub fn client_limit(&self) -> Duration {
        self.client_latency * self.accounts.div_ceil(self.cap.max(1)) as u32
    }

    /// [`Self::limit`] at the delay the fake was asked for.
    pub fn nominal_limit(&self) -> Duration {
        self.upstream_delay * self.accounts as u32 / self.cap as u32
    }

    pub fn holds(&self) -> bool {
        self.errors == 0
            && self.refreshes_ok == self.accounts as u64
            && self.served.as_secs_f64() <= 1.2 * self.limit().as_secs_f64()
    }
}

/// `accounts` expired accounts through an outage and EdgeTag's return; see [`Recovery`].
pub async fn recovery(env: &Env, accounts: usize, wake: Wake) -> Recovery {
    let upstream_delay = Duration::from_millis(2);
    let clock = Clock::manual();
    let fake = fixture::start_fake(env.runtimes.fake.handle(), &clock).await;
    let dir = fixture::temp_dir(env.data_root.as_deref(), "cs-bench-recovery-");
    let names = fixture::account_names(accounts);
    fixture::seed(dir.path(), &names, &clock, |_| fake.seed_grant()).await;
    let broker = BrokerConfig::default();
    let cap = broker.upstream_concurrency;
    let demand_interval = broker.refresh.demand_interval;
    let config = fixture::service_config(dir.path(), fixture::fake_upstream(&fake), broker, None);
    let server = RunningServer::service(env.runtimes.server.handle(), config, clock.clone()).await;
    let clients = load::connect(server.addr, CHANNELS).await;
    fake.set_token_delay(upstream_delay);

    // The outage: every token expires while every refresh gets 503. One call per account; each
    // must fail, after which the account backs off.
    fake.set_persistent_fault(Some(Fault::ServiceUnavailable));
    let before_outage = fake.stats().token_requests;
    clock.advance(TOKEN_LIFETIME + Duration::from_secs(60));
    let outage = sweep(&clients, &names).await;
    let outage_unavailable = outage
        .iter()
        .filter(|r| matches!(r, Err(e) if e.starts_with("Unavailable")))
        .count() as u64;
    // Let the refreshes the sweep and the scheduler started end. The test clock runs at real
    // speed from where it was moved, so back-offs end in real time and the scheduler retries the
    // accounts again seconds later; the bench does not wait for that (the back-off and the
    // demand limit are tested with the manual clock in tests/it/refresh.rs and tests/it/recovery.rs).
    settle(&fake).await;
    let outage_requests = fake.stats().token_requests - before_outage;

    // EdgeTag is back.
    fake.set_persistent_fault(None);
    fake.reset_peak();
    let before = fake.stats();
    let time_before = fake.token_time();
    let client_before = client_refreshes();
    let (mut errors, mut first_error) = (0, None);
    let back = Instant::now();
    let cpu_before = (load::thread_cpu(SERVER_THREADS), load::thread_cpu(""));
    let (refreshed, served) = match wake {
        Wake::Callers => {
            clock.advance(demand_interval);
            let results = sweep(&clients, &names).await;
            let served = back.elapsed();
            for r in results {
                if let Err(e) = r {
                    errors += 1;
                    first_error.get_or_insert(e);
                }
            }
            let refreshed = wait_refreshed(&fake, before.refreshes_ok, accounts, back).await;
            (refreshed, served)
        }
        Wake::Scheduler => {
            let mut admin = clients[0].clone();
            if let Err(s) = admin
                .refresh_token(RefreshTokenRequest {
                    account: names[0].clone(),
                })
                .await
            {
                errors += 1;
                first_error.get_or_insert(format!("{:?}: {}", s.code(), s.message()));
            }
            let refreshed = wait_refreshed(&fake, before.refreshes_ok, accounts, back).await;
            // Until every account answers with a token (refreshes finishing their writes are
            // joined, never started: the clock has not moved, so callers get no demand turn).
            let mut left: Vec<String> = names.to_vec();
            let deadline = Instant::now() + Duration::from_secs(60);
            while !left.is_empty() && Instant::now() < deadline {
                let results = sweep(&clients, &left).await;
                left = left
                    .into_iter()
                    .zip(results)
                    .filter_map(|(n, r)| r.is_err().then_some(n))
                    .collect();
            }
            if !left.is_empty() {
                errors += left.len() as u64;
                first_error.get_or_insert(format!("{} accounts never served", left.len()));
            }
            (refreshed, back.elapsed())
        }
    };
    let window = back.elapsed();
    let server_cpu = load::thread_cpu(SERVER_THREADS).saturating_sub(cpu_before.0);
    let process_cpu = load::thread_cpu("").saturating_sub(cpu_before.1);
    let after = fake.stats();
    let upstream_latency = mean_latency(&fake, time_before, before, after);
    let client_latency = {
        let (seconds, count) = client_refreshes();
        let (seconds, count) = (seconds - client_before.0, count - client_before.1);
        Duration::from_secs_f64(seconds / count.max(1) as f64)
    };
    drop(clients);
    server.stop().await;
    Recovery {
        upstream_latency,
        client_latency,
        server_cpu,
        process_cpu,
        window,
        wake,
        accounts,
        upstream_delay,
        cap,
        outage_requests,
        outage_unavailable,
        upstream_calls: after.token_requests - before.token_requests,
        refreshes_ok: after.refreshes_ok - before.refreshes_ok,
        peak_upstream: after.peak_token_concurrency,
        refreshed,
        served,
        errors,
        first_error,
    }
}

/// One GetToken per account, all at once; each call's outcome, in order.
async fn sweep(
    clients: &[CredentialServiceClient<Channel>],
    names: &[String],
) -> Vec<Result<u64, String>> {
    let calls: Vec<_> = names
        .iter()
        .enumerate()
        .map(|(i, name)| tokio::spawn(call(clients[i % clients.len()].clone(), name.clone())))
        .collect();
    let mut out = Vec::with_capacity(calls.len());
    for c in calls {
        out.push(c.await.expect("a recovery call"));
    }
    out
}

/// Waits until no token request is in flight at the fake and none arrived for longer than the
/// scheduler's scan interval.
/// The mean time the fake spent on a token request between two snapshots.
fn mean_latency(
    fake: &FakeEdgeTag,
    time_before: Duration,
    before: FakeStats,
    after: FakeStats,
) -> Duration {
    let requests = after
        .token_requests
        .saturating_sub(before.token_requests)
        .max(1);
    fake.token_time().saturating_sub(time_before) / u32::try_from(requests).unwrap_or(u32::MAX)
}

/// Successful refreshes the service's EdgeTag client has timed so far in this process: their
/// total seconds and their number, read from the service's metrics.
fn client_refreshes() -> (f64, u64) {
    let text = metrics::encode(&metrics::AccountGauges::default());
    let series = r#"{operation="refresh",status="200"}"#;
    let value = |name: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(series))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (
        value("credential_upstream_request_duration_seconds_sum"),
        value("credential_upstream_request_duration_seconds_count") as u64,
    )
}

/// Waits (up to 60 s) until the fake has no token request in flight.
async fn settle(fake: &FakeEdgeTag) {
    let settled = fake.until_token_requests_in_flight(|n| n == 0);
    let _ = tokio::time::timeout(Duration::from_secs(60), settled).await;
}

/// Polls the fake until it has answered `accounts` successful refreshes since `from`; the time
/// since `back` when it had.
async fn wait_refreshed(fake: &FakeEdgeTag, from: u64, accounts: usize, back: Instant) -> Duration {
    let deadline = back + Duration::from_secs(60);
    while fake.stats().refreshes_ok - from < accounts as u64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
    back.elapsed()
}
