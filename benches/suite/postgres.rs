//! PostgreSQL rows (issue 12): the same measurements as on sled, on a private PostgreSQL cluster
//! on loopback (started here, fsync on), so the two stores can be read side by side.
//!
//! - GetToken throughput of a PostgreSQL-backed service versus the floor, and of a sled-backed one
//!   in the same run.
//! - Refresh latency (GetToken that refreshes: EdgeTag on loopback, then the commit) on each store.
//! - A fleet storm: 10,000 accounts expiring together on three replicas that share the database,
//!   every account asked for on every replica: upstream calls counted at the fake.
//! - Start-up: time until a service over 100,000 stored accounts answers SERVING.

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant},
};

use credential_service::{
    account::AccountId,
    broker::BrokerConfig,
    clock::Clock,
    config::StoreConfig,
    proto::GetTokenRequest,
    sealing::Keyring,
    store::{PostgresConfig, PostgresStore, Store},
};
use hdrhistogram::Histogram;
use pg_cluster::Cluster;

use crate::{
    Env,
    fixture::{self, RunningServer, TOKEN_LIFETIME},
    load,
    throughput::{self, Comparison},
};

pub struct Postgres {
    pub throughput: Vec<(&'static str, Comparison)>,
    /// (store, latencies in ns) of GetToken calls that each refresh once.
    pub refresh: Vec<(&'static str, Histogram<u64>)>,
    pub fleet: Fleet,
    pub startup: Startup,
}

pub struct Fleet {
    pub replicas: usize,
    pub accounts: usize,
    pub calls: usize,
    pub upstream_calls: u64,
    /// Accounts whose stored version is not exactly one past the seeded one.
    pub not_refreshed_once: usize,
    pub peak_upstream: u64,
    pub cap_per_replica: usize,
    pub errors: usize,
    pub distinct_tokens_per_account_max: usize,
    pub drain: Duration,
}

pub struct Startup {
    pub accounts: usize,
    pub seeded_in: Duration,
    pub serving_after: Duration,
}

fn store_config(cluster: &Cluster) -> StoreConfig {
    let db = cluster.create_database();
    let config = PostgresConfig::parse(
        &format!("{}?sslmode=disable", db.url()),
        Some(cluster.password().into()),
        None,
    )
    .expect("the cluster's URL parses");
    StoreConfig::Postgres(Box::new(config))
}

fn pg(store: &StoreConfig) -> &PostgresConfig {
    match store {
        StoreConfig::Postgres(pg) => pg,
        StoreConfig::Sled => unreachable!("a PostgreSQL store"),
    }
}

/// Seeds `names` into the database with the data directory's key, as CompleteAuth would have.
async fn seed(
    store: &StoreConfig,
    dir: &std::path::Path,
    names: &[String],
    clock: &Clock,
    refresh: impl FnMut(usize) -> String,
) -> Duration {
    let started = Instant::now();
    let keys = Keyring::load(&fixture::encryption(dir), dir).expect("the key loads");
    let opened = PostgresStore::open(pg(store), keys)
        .await
        .expect("the database opens");
    fixture::seed_into(&opened, names, clock, refresh, 64).await;
    started.elapsed()
}

pub async fn run(env: &Env, quick: bool) -> Postgres {
    let cluster = Cluster::start();
    let root = env.data_root.as_deref();

    // Throughput: 1,000 accounts, PostgreSQL and sled in the same run.
    let names = fixture::account_names(1_000);
    let mut throughput = Vec::new();
    {
        let dir = fixture::temp_dir(root, "cs-bench-pg-tp-");
        let store = store_config(&cluster);
        seed(&store, dir.path(), &names, &Clock::system(), |_| {
            fixture::random_token("etr_")
        })
        .await;
        throughput.push((
            "PostgreSQL",
            throughput::compare_on(env, dir.path(), names.clone(), None, false, store).await,
        ));
        let dir = fixture::temp_dir(root, "cs-bench-sled-tp-");
        fixture::seed(dir.path(), &names, &Clock::system(), |_| {
            fixture::random_token("etr_")
        })
        .await;
        throughput.push((
            "sled",
            throughput::compare(env, dir.path(), names.clone(), None, false).await,
        ));
    }

    let ops = if quick { 50 } else { 300 };
    let refresh = vec![
        ("sled", refresh_latency(env, ops, StoreConfig::Sled).await),
        (
            "PostgreSQL",
            refresh_latency(env, ops, store_config(&cluster)).await,
        ),
    ];
    let fleet = fleet_storm(env, &cluster, if quick { 1_000 } else { 10_000 }).await;
    let startup = startup(env, &cluster, if quick { 10_000 } else { 100_000 }).await;
    Postgres {
        throughput,
        refresh,
        fleet,
        startup,
    }
}

/// `ops` accounts, each refreshed once by a GetToken after its token expired.
async fn refresh_latency(env: &Env, ops: usize, store: StoreConfig) -> Histogram<u64> {
    let clock = Clock::manual();
    let fake = fixture::start_fake(env.runtimes.fake.handle(), &clock).await;
    let dir = fixture::temp_dir(env.data_root.as_deref(), "cs-bench-pg-refresh-");
    let names = fixture::account_names(ops);
    match &store {
        StoreConfig::Sled => {
            fixture::seed(dir.path(), &names, &clock, |_| fake.seed_grant()).await;
        }
        StoreConfig::Postgres(_) => {
            seed(&store, dir.path(), &names, &clock, |_| fake.seed_grant()).await;
        }
    }
    let mut config = fixture::service_config(
        dir.path(),
        fixture::fake_upstream(&fake),
        BrokerConfig::default(),
        None,
    );
    config.store = store;
    let server = RunningServer::service(env.runtimes.server.handle(), config, clock.clone()).await;
    let mut client = load::connect(server.addr, 1).await.remove(0);
    clock.advance(TOKEN_LIFETIME + Duration::from_secs(60));
    let before = fake.stats().refreshes_ok;
    let mut latency = load::histogram();
    for name in names.iter() {
        let t = Instant::now();
        client
            .get_token(GetTokenRequest {
                account: name.clone(),
                min_validity: None,
            })
            .await
            .expect("GetToken with a refresh");
        latency.saturating_record(u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX));
    }
    assert_eq!(
        fake.stats().refreshes_ok - before,
        ops as u64,
        "one refresh per call"
    );
    drop(client);
    server.stop().await;
    latency
}

/// Three replicas on one database; every account expires at once and is asked for on every
/// replica at the same moment, while each replica's scheduler also finds it due.
async fn fleet_storm(env: &Env, cluster: &Cluster, accounts: usize) -> Fleet {
    const REPLICAS: usize = 3;
    let clock = Clock::manual();
    let fake = fixture::start_fake(env.runtimes.fake.handle(), &clock).await;
    let dir = fixture::temp_dir(env.data_root.as_deref(), "cs-bench-pg-fleet-");
    let names = fixture::account_names(accounts);
    let store = store_config(cluster);
    seed(&store, dir.path(), &names, &clock, |_| fake.seed_grant()).await;
    let broker = BrokerConfig::default();
    let cap = broker.upstream_concurrency;
    let mut replicas = Vec::new();
    for _ in 0..REPLICAS {
        let mut config = fixture::service_config(
            dir.path(),
            fixture::fake_upstream(&fake),
            broker.clone(),
            None,
        );
        config.store = store.clone();
        replicas.push(
            RunningServer::service(env.runtimes.server.handle(), config, clock.clone()).await,
        );
    }
    let mut clients = Vec::new();
    for replica in &replicas {
        clients.push(load::connect(replica.addr, 4).await);
    }

    fake.set_token_delay(Duration::from_millis(2));
    let before = fake.stats();
    fake.reset_peak();
    clock.advance(TOKEN_LIFETIME + Duration::from_secs(60));
    let started = Instant::now();
    let mut calls = Vec::new();
    for (i, name) in names.iter().enumerate() {
        for (r, replica) in clients.iter().enumerate() {
            let mut client = replica[i % replica.len()].clone();
            let account = name.clone();
            calls.push(tokio::spawn(async move {
                let answer = client
                    .get_token(GetTokenRequest {
                        account: account.clone(),
                        min_validity: None,
                    })
                    .await;
                (account, r, answer.map(|a| a.into_inner().access_token))
            }));
        }
    }
    let mut errors = 0;
    let mut tokens: HashMap<String, HashSet<String>> = HashMap::new();
    for call in calls {
        let (account, _replica, answer) = call.await.expect("a call");
        match answer {
            Ok(token) => {
                tokens.entry(account).or_default().insert(token);
            }
            Err(e) => {
                if errors == 0 {
                    eprintln!("bench: fleet storm: first error: {e}");
                }
                errors += 1;
            }
        }
    }
    let drain = started.elapsed();
    let after = fake.stats();
    // Each account's stored version says how many times it was written: seeded at 1, once more.
    let keys = Keyring::load(&fixture::encryption(dir.path()), dir.path()).expect("the key");
    let check = PostgresStore::open(pg(&store), keys)
        .await
        .expect("the database");
    let stored = check.load_accounts().await.expect("the accounts load");
    let not_refreshed_once = stored.iter().filter(|(_, v)| v.version != 2).count()
        + accounts.saturating_sub(stored.len());
    for replica in replicas {
        replica.stop().await;
    }
    Fleet {
        replicas: REPLICAS,
        accounts,
        calls: accounts * REPLICAS,
        upstream_calls: after.token_requests - before.token_requests,
        not_refreshed_once,
        peak_upstream: after.peak_token_concurrency,
        cap_per_replica: cap,
        errors,
        distinct_tokens_per_account_max: tokens.values().map(HashSet::len).max().unwrap_or(0),
        drain,
    }
}

/// Time until a service over `accounts` stored accounts answers SERVING (one streaming query).
async fn startup(env: &Env, cluster: &Cluster, accounts: usize) -> Startup {
    let dir = fixture::temp_dir(env.data_root.as_deref(), "cs-bench-pg-start-");
    let names = fixture::account_names(accounts);
    let store = store_config(cluster);
    let seeded_in = seed(&store, dir.path(), &names, &Clock::system(), |_| {
        fixture::random_token("etr_")
    })
    .await;
    let mut config = fixture::service_config(
        dir.path(),
        fixture::unreachable_upstream(),
        BrokerConfig::default(),
        None,
    );
    config.store = store;
    let started = Instant::now();
    let server =
        RunningServer::service(env.runtimes.server.handle(), config, Clock::system()).await;
    let serving_after = started.elapsed();
    let mut client = load::connect(server.addr, 1).await.remove(0);
    let last = AccountId::parse(names.last().unwrap()).unwrap();
    client
        .get_token(GetTokenRequest {
            account: last.to_string(),
            min_validity: None,
        })
        .await
        .expect("every account is served after start-up");
    drop(client);
    server.stop().await;
    Startup {
        accounts,
        seeded_in,
        serving_after,
    }
}
