//! Refresh storms: many callers on one expired account must cost one upstream call; many accounts
//! expiring at once must cost one call each, never more than the upstream cap in flight.

use std::time::{Duration, Instant};

use credential_service::{
    broker::BrokerConfig,
    clock::Clock,
    proto::{GetTokenRequest, credential_service_client::CredentialServiceClient},
};
use hdrhistogram::Histogram;
use tonic::transport::Channel;

use crate::{
    Env,
    fixture::{self, RunningServer, TOKEN_LIFETIME},
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
    let config = fixture::service_config(dir.path(), fixture::fake_upstream(&fake), broker, None);
    let server = RunningServer::service(env.runtimes.server.handle(), config, clock.clone()).await;
    let clients = load::connect(server.addr, CHANNELS).await;

    fake.set_token_delay(upstream_delay);
    let before = fake.stats();
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
    server.stop().await;
    Storm {
        name,
        callers,
        accounts,
        upstream_delay,
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
