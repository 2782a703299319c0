//! Floor versus service in the same run: both servers up at once on the same runtime, driven in
//! alternation (the order flips each round) by the same load generator with the same requests.

use std::{path::Path, sync::Arc};

use credential_service::{broker::BrokerConfig, clock::Clock};
use tonic::metadata::AsciiMetadataValue;

use crate::{
    Env,
    fixture::{self, CallerAuth, RunningServer},
    floor,
    load::{self, LoadResult, ServerCpu},
};

/// Throughput at least this share of the floor's.
pub const MIN_THROUGHPUT_RATIO: f64 = 0.90;
/// p99 latency at most this multiple of the floor's.
pub const MAX_P99_RATIO: f64 = 1.2;

pub struct Comparison {
    pub accounts: usize,
    pub auth: bool,
    pub floor: LoadResult,
    pub service: LoadResult,
    /// Requests per second of each round, floor and service.
    pub rounds: Vec<(f64, f64)>,
}

impl Comparison {
    pub fn throughput_ratio(&self) -> f64 {
        self.service.rps() / self.floor.rps()
    }

    pub fn p99_ratio(&self) -> f64 {
        self.service.p99_us() / self.floor.p99_us()
    }

    pub fn holds(&self) -> bool {
        self.throughput_ratio() >= MIN_THROUGHPUT_RATIO
            && self.p99_ratio() <= MAX_P99_RATIO
            && self.service.errors == 0
            && self.floor.errors == 0
    }
}

/// Floor and service with the accounts already seeded in `data_dir`.
pub async fn compare(
    env: &Env,
    data_dir: &Path,
    accounts: Arc<[String]>,
    auth: Option<&CallerAuth>,
) -> Comparison {
    let server_rt = env.runtimes.server.handle();
    let config = fixture::service_config(
        data_dir,
        fixture::unreachable_upstream(),
        BrokerConfig::default(),
        auth,
    );
    let service = RunningServer::service(server_rt, config, Clock::system()).await;
    let floor = RunningServer::spawn(server_rt, floor::run).await;
    let bearer = auth.map(|a| {
        AsciiMetadataValue::try_from(format!("Bearer {}", a.bearer)).expect("an ASCII token")
    });

    let mut comparison = Comparison {
        accounts: accounts.len(),
        auth: auth.is_some(),
        floor: LoadResult::empty(),
        service: LoadResult::empty(),
        rounds: Vec::new(),
    };
    for round in 0..env.rounds {
        let mut rps = (0.0, 0.0);
        let order = if round % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for is_service in order {
            let addr = if is_service { service.addr } else { floor.addr };
            let clients = load::connect(addr, env.load.channels).await;
            let result = load::drive(
                &clients,
                accounts.clone(),
                bearer.clone(),
                &env.load,
                ServerCpu::InProcess,
            )
            .await;
            if let Some(e) = &result.first_error {
                eprintln!(
                    "bench: {} errors against the {}; first: {e}",
                    result.errors,
                    if is_service { "service" } else { "floor" }
                );
            }
            if is_service {
                rps.1 = result.rps();
                comparison.service.merge(&result);
            } else {
                rps.0 = result.rps();
                comparison.floor.merge(&result);
            }
        }
        eprintln!(
            "bench: {} accounts, round {}: floor {:.0} req/s, service {:.0} req/s",
            accounts.len(),
            round + 1,
            rps.0,
            rps.1
        );
        comparison.rounds.push(rps);
    }
    floor.stop().await;
    service.stop().await;
    comparison
}
