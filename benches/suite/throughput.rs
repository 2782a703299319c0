//! Floor versus service in the same run: both servers up at once on the same runtime, driven in
//! alternation (the order flips each round) by the same load generator with the same requests.

use std::{path::Path, sync::Arc};

use credential_service::{
    broker::BrokerConfig,
    clock::Clock,
    config::{ServiceConfig, StoreConfig},
};
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
/// Issue 11's targets for production settings (callers file, bearer tokens, `/metrics`, the
/// default log level with the aggregated read audit).
pub const PRODUCTION_MIN_THROUGHPUT_RATIO: f64 = 0.95;
pub const PRODUCTION_MAX_P99_RATIO: f64 = 1.1;

/// What the service under test is configured with.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Settings {
    /// No callers file.
    Open,
    /// A callers file and a bearer token on every call.
    Auth,
    /// Auth, plus `/metrics` served, at the default log level with the read audit.
    Production,
}

impl Settings {
    pub fn label(self) -> &'static str {
        match self {
            Settings::Open => "no",
            Settings::Auth => "yes",
            Settings::Production => "production",
        }
    }

    /// The (throughput, p99) targets.
    pub fn targets(self) -> (f64, f64) {
        match self {
            Settings::Production => (PRODUCTION_MIN_THROUGHPUT_RATIO, PRODUCTION_MAX_P99_RATIO),
            _ => (MIN_THROUGHPUT_RATIO, MAX_P99_RATIO),
        }
    }
}

pub struct Comparison {
    pub accounts: usize,
    pub settings: Settings,
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
        let (throughput, p99) = self.settings.targets();
        self.throughput_ratio() >= throughput
            && self.p99_ratio() <= p99
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
    production: bool,
) -> Comparison {
    compare_on(env, data_dir, accounts, auth, production, StoreConfig::Sled).await
}

/// The service's settings for a GetToken row: production rows add `/metrics` and, with
/// `--audit-file`, the audit file in `data_dir`.
pub fn row_config(
    env: &Env,
    data_dir: &Path,
    auth: Option<&CallerAuth>,
    production: bool,
) -> ServiceConfig {
    let mut config = fixture::service_config(
        data_dir,
        fixture::unreachable_upstream(),
        BrokerConfig::default(),
        auth,
    );
    if production {
        config.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
        if env.audit_file {
            config.audit_file = Some(credential_service::audit::FileConfig {
                path: data_dir.join("audit.jsonl"),
                required: false,
            });
        }
    }
    config
}

/// [`compare`] with the service on `store` (its key still in `data_dir`).
pub async fn compare_on(
    env: &Env,
    data_dir: &Path,
    accounts: Arc<[String]>,
    auth: Option<&CallerAuth>,
    production: bool,
    store: StoreConfig,
) -> Comparison {
    let server_rt = env.runtimes.server.handle();
    let mut config = row_config(env, data_dir, auth, production);
    config.store = store;
    let service = RunningServer::service(server_rt, config, Clock::system()).await;
    let bare = env.bare_floor;
    let lookup = env.lookup_floor.then(|| accounts.clone());
    let floor = RunningServer::spawn(server_rt, move |listener, stop| {
        floor::run(listener, stop, bare, lookup)
    })
    .await;
    let bearer = auth.map(|a| {
        AsciiMetadataValue::try_from(format!("Bearer {}", a.bearer)).expect("an ASCII token")
    });

    let mut comparison = Comparison {
        accounts: accounts.len(),
        settings: match (auth.is_some(), production) {
            (_, true) => Settings::Production,
            (true, false) => Settings::Auth,
            (false, false) => Settings::Open,
        },
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
            let name = if is_service { "service" } else { "floor" };
            if env.only.as_deref().is_some_and(|only| only != name) {
                continue;
            }
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
