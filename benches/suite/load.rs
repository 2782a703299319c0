//! The load generator: several HTTP/2 connections (one tonic channel tops out near 30k req/s), many
//! requests in flight on each, a fixed measured window after a warm-up, every latency in an HDR
//! histogram, and every answer checked (a gRPC error is an error, never a success). CPU time is read
//! per thread from /proc, so the server's cost per request is known even when the client is the
//! bottleneck.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use credential_service::proto::{
    GetTokenRequest, credential_service_client::CredentialServiceClient,
};
use hdrhistogram::Histogram;
use tonic::{
    Request,
    metadata::AsciiMetadataValue,
    transport::{Channel, Endpoint},
};

use crate::fixture::{CLIENT_THREADS, SERVER_THREADS};

#[derive(Clone, Debug)]
pub struct LoadSpec {
    /// Client connections.
    pub channels: usize,
    /// Requests in flight on each connection.
    pub in_flight: usize,
    pub warmup: Duration,
    pub duration: Duration,
}

/// What one measured window saw.
pub struct LoadResult {
    pub ok: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub window: Duration,
    /// Nanoseconds per request.
    pub latency: Histogram<u64>,
    /// CPU time of the server: its runtime's threads in process, or the whole child process.
    pub server_cpu: Duration,
    pub client_cpu: Duration,
}

impl LoadResult {
    pub fn empty() -> Self {
        Self {
            ok: 0,
            errors: 0,
            first_error: None,
            window: Duration::ZERO,
            latency: histogram(),
            server_cpu: Duration::ZERO,
            client_cpu: Duration::ZERO,
        }
    }

    /// Adds another window (of another round) to this one.
    pub fn merge(&mut self, other: &LoadResult) {
        self.ok += other.ok;
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error.clone_from(&other.first_error);
        }
        self.window += other.window;
        self.latency.add(&other.latency).unwrap();
        self.server_cpu += other.server_cpu;
        self.client_cpu += other.client_cpu;
    }

    pub fn rps(&self) -> f64 {
        self.ok as f64 / self.window.as_secs_f64().max(1e-9)
    }

    pub fn p50_us(&self) -> f64 {
        self.latency.value_at_quantile(0.50) as f64 / 1000.0
    }

    pub fn p99_us(&self) -> f64 {
        self.latency.value_at_quantile(0.99) as f64 / 1000.0
    }

    /// Server CPU microseconds per successful request.
    pub fn server_us_per_req(&self) -> f64 {
        self.server_cpu.as_secs_f64() * 1e6 / (self.ok.max(1) as f64)
    }

    pub fn client_us_per_req(&self) -> f64 {
        self.client_cpu.as_secs_f64() * 1e6 / (self.ok.max(1) as f64)
    }
}

/// 1 ns to 60 s at three significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).unwrap()
}

/// `channels` separate HTTP/2 connections to `addr`.
pub async fn connect(addr: SocketAddr, channels: usize) -> Vec<CredentialServiceClient<Channel>> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .tcp_nodelay(true);
    let mut clients = Vec::with_capacity(channels);
    for _ in 0..channels {
        let channel = endpoint.connect().await.expect("the server accepts");
        clients.push(CredentialServiceClient::new(channel));
    }
    clients
}

/// Where the server's CPU time is read.
#[derive(Clone, Copy)]
pub enum ServerCpu {
    /// Threads of this process whose name starts with the server runtime's prefix.
    InProcess,
    /// A child process, every thread.
    Process(u32),
}

impl ServerCpu {
    fn read(self) -> Duration {
        match self {
            Self::InProcess => thread_cpu(SERVER_THREADS),
            Self::Process(pid) => process_cpu(pid),
        }
    }
}

/// Drives GetToken over `accounts` (spread over all of them) for `spec.warmup + spec.duration`.
pub async fn drive(
    clients: &[CredentialServiceClient<Channel>],
    accounts: Arc<[String]>,
    bearer: Option<AsciiMetadataValue>,
    spec: &LoadSpec,
    server_cpu: ServerCpu,
) -> LoadResult {
    let start = Instant::now();
    let measure_from = start + spec.warmup;
    let end = measure_from + spec.duration;
    let workers = clients.len() * spec.in_flight;
    let mut tasks = Vec::with_capacity(workers);
    for w in 0..workers {
        let mut client = clients[w % clients.len()].clone();
        let accounts = accounts.clone();
        let bearer = bearer.clone();
        tasks.push(tokio::spawn(async move {
            let mut result = LoadResult::empty();
            // Each worker starts elsewhere and strides by a prime, so every account gets asked.
            let mut i = w * 7919;
            loop {
                let sent = Instant::now();
                if sent >= end {
                    break;
                }
                let account = accounts[i % accounts.len()].clone();
                i = i.wrapping_add(104_729);
                let mut request = Request::new(GetTokenRequest {
                    account,
                    min_validity: None,
                });
                if let Some(b) = &bearer {
                    request.metadata_mut().insert("authorization", b.clone());
                }
                let answer = client.get_token(request).await;
                let done = Instant::now();
                if done < measure_from || done > end {
                    continue;
                }
                match answer {
                    Ok(r) if !r.get_ref().access_token.is_empty() => {
                        result.ok += 1;
                        let ns = u64::try_from((done - sent).as_nanos()).unwrap_or(u64::MAX);
                        result.latency.saturating_record(ns.max(1));
                    }
                    Ok(_) => {
                        result.errors += 1;
                        result
                            .first_error
                            .get_or_insert_with(|| "OK without a token".into());
                    }
                    Err(status) => {
                        result.errors += 1;
                        result.first_error.get_or_insert_with(|| {
                            format!("{:?}: {}", status.code(), status.message())
                        });
                    }
                }
            }
            result
        }));
    }
    tokio::time::sleep_until(measure_from.into()).await;
    let (server0, client0) = (server_cpu.read(), thread_cpu(CLIENT_THREADS));
    tokio::time::sleep_until(end.into()).await;
    let (server1, client1) = (server_cpu.read(), thread_cpu(CLIENT_THREADS));
    let mut total = LoadResult::empty();
    for t in tasks {
        total.merge(&t.await.expect("a load worker"));
    }
    total.window = spec.duration;
    total.server_cpu = server1.saturating_sub(server0);
    total.client_cpu = client1.saturating_sub(client0);
    total
}

/// On-CPU time of this process's threads whose name starts with `prefix` (schedstat, nanoseconds).
pub fn thread_cpu(prefix: &str) -> Duration {
    let mut total = 0u64;
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Duration::ZERO;
    };
    for task in tasks.flatten() {
        let path = task.path();
        let named = std::fs::read_to_string(path.join("comm"))
            .is_ok_and(|comm| comm.starts_with(&prefix[..prefix.len().min(15)]));
        if !named {
            continue;
        }
        if let Some(ns) = std::fs::read_to_string(path.join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        {
            total += ns;
        }
    }
    Duration::from_nanos(total)
}

/// User plus system time of a whole process (all threads), from /proc/PID/stat.
pub fn process_cpu(pid: u32) -> Duration {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return Duration::ZERO;
    };
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let hz = 100; // USER_HZ on Linux
    Duration::from_millis((ticks(11) + ticks(12)) * 1000 / hz)
}
