//! WatchToken (issue 13): what idle watchers cost the real binary, and how fast one refresh
//! reaches many watchers of one account.
//!
//! - Idle: 10,000 streams open on the real binary (100 connections of 100 streams, the default
//!   per-connection bound), each having read its first token; resident memory before and after,
//!   and the CPU the process uses while they sit idle.
//! - Fan-out: 1,000 watchers of one account on an in-process server; one RefreshToken; the time
//!   from sending it until the last watcher has the new token.

use std::time::{Duration, Instant};

use credential_service::{
    broker::BrokerConfig,
    clock::Clock,
    proto::{RefreshTokenRequest, WatchTokenRequest},
};
use futures::StreamExt;

use crate::{
    Env,
    fixture::{self, RunningServer},
    load, scale,
};

pub struct Watchers {
    pub idle: usize,
    pub rss_before_mb: f64,
    pub rss_after_mb: f64,
    /// Share of one core the process used while the watchers sat idle.
    pub idle_cpu: f64,
    pub idle_window: Duration,
    pub fan_out: usize,
    /// From sending RefreshToken to the last watcher holding the new token.
    pub fan_out_last: Duration,
    /// RefreshToken's own round trip (EdgeTag on loopback and the durable write included).
    pub refresh_call: Duration,
}

impl Watchers {
    pub fn kib_per_watcher(&self) -> f64 {
        (self.rss_after_mb - self.rss_before_mb) * 1024.0 / self.idle as f64
    }
}

pub async fn run(env: &Env, idle: usize, fan_out: usize) -> Watchers {
    let (rss_before_mb, rss_after_mb, idle_cpu, idle_window) = idle_watchers(env, idle).await;
    let (fan_out_last, refresh_call) = fan_out_to(env, fan_out).await;
    Watchers {
        idle,
        rss_before_mb,
        rss_after_mb,
        idle_cpu,
        idle_window,
        fan_out,
        fan_out_last,
        refresh_call,
    }
}

async fn idle_watchers(env: &Env, watchers: usize) -> (f64, f64, f64, Duration) {
    const PER_CONNECTION: usize = 100;
    let dir = fixture::temp_dir(env.data_root.as_deref(), "cs-bench-watch-");
    let names = fixture::account_names(1);
    fixture::seed(dir.path(), &names, &Clock::system(), |_| {
        fixture::random_token("etr_")
    })
    .await;
    let addr = scale::free_port();
    let log_dir = fixture::temp_dir(None, "cs-bench-log-");
    let log = std::fs::File::create(log_dir.path().join("stderr.log")).unwrap();
    let mut child = scale::command(addr, dir.path(), log)
        .spawn()
        .expect("the binary starts");
    let pid = child.id().expect("a running child");
    fixture::wait_until_serving(addr, Duration::from_secs(60))
        .await
        .expect("the binary serves");
    let clients = load::connect(addr, watchers.div_ceil(PER_CONNECTION)).await;
    let rss_before = scale::status_mb(pid, "VmRSS");

    // Opened 256 at a time: a burst of 10,000 calls at once would meet --max-calls-in-flight
    // (1,024) while their first answers are made, as a reconnecting fleet would (and retry).
    let open: Vec<_> = futures::stream::iter(0..watchers)
        .map(|i| {
            let mut client = clients[i / PER_CONNECTION].clone();
            async move {
                let mut stream = client
                    .watch_token(WatchTokenRequest {
                        account: "acct-000000".into(),
                        min_validity: None,
                    })
                    .await
                    .expect("a watch")
                    .into_inner();
                stream
                    .message()
                    .await
                    .expect("the first token")
                    .expect("a message");
                stream
            }
        })
        .buffer_unordered(256)
        .collect()
        .await;
    let rss_after = scale::status_mb(pid, "VmRSS");
    let window = Duration::from_secs(5);
    let before = load::process_cpu(pid);
    tokio::time::sleep(window).await; // measuring rest, not waiting for an event
    let idle_cpu =
        load::process_cpu(pid).saturating_sub(before).as_secs_f64() / window.as_secs_f64();
    drop(open);
    drop(clients);
    scale::stop(&mut child).await;
    (rss_before, rss_after, idle_cpu, window)
}

async fn fan_out_to(env: &Env, watchers: usize) -> (Duration, Duration) {
    let clock = Clock::manual();
    let fake = fixture::start_fake(env.runtimes.fake.handle(), &clock).await;
    let dir = fixture::temp_dir(env.data_root.as_deref(), "cs-bench-fanout-");
    let names = fixture::account_names(1);
    fixture::seed(dir.path(), &names, &clock, |_| fake.seed_grant()).await;
    let config = fixture::service_config(
        dir.path(),
        fixture::fake_upstream(&fake),
        BrokerConfig::default(),
        None,
    );
    let server = RunningServer::service(env.runtimes.server.handle(), config, clock).await;
    let clients = load::connect(server.addr, watchers.div_ceil(100)).await;
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel(watchers);
    let mut got = Vec::with_capacity(watchers);
    for i in 0..watchers {
        let mut client = clients[i / 100].clone();
        let ready = ready_tx.clone();
        got.push(tokio::spawn(async move {
            let mut stream = client
                .watch_token(WatchTokenRequest {
                    account: "acct-000000".into(),
                    min_validity: None,
                })
                .await
                .expect("a watch")
                .into_inner()
                .boxed();
            let first = stream
                .next()
                .await
                .expect("a first token")
                .expect("a token");
            ready.send(()).await.unwrap();
            let second = stream
                .next()
                .await
                .expect("a pushed token")
                .expect("a token");
            assert_ne!(first.access_token, second.access_token);
            Instant::now()
        }));
    }
    for _ in 0..watchers {
        ready_rx.recv().await.unwrap();
    }
    // A connection of its own: the watchers' carry 100 streams each, the per-connection bound.
    let mut admin = load::connect(server.addr, 1).await.remove(0);
    let sent = Instant::now();
    admin
        .refresh_token(RefreshTokenRequest {
            account: "acct-000000".into(),
        })
        .await
        .expect("RefreshToken");
    let refresh_call = sent.elapsed();
    let mut last = sent;
    for g in got {
        last = last.max(g.await.expect("a watcher"));
    }
    drop(clients);
    server.stop().await;
    (last - sent, refresh_call)
}
