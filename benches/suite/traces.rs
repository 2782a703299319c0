//! GetToken with traces off and on, in the same process and the same run: two services on the
//! server runtime, one with `traces` off and one on, driven in alternation (the order flips each
//! round) with production settings. The process's subscriber exports over OTLP to a collector
//! on the fake's runtime that counts what it receives, sampling 1% of new traces
//! (`parentbased_traceidratio`, 0.01), as a fleet would run it. Only when named: `-- traces`.

use std::{
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use credential_service::{
    broker::BrokerConfig,
    clock::Clock,
    config::{CallSampling, OtelConfig},
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
    trace_service_server::{TraceService, TraceServiceServer},
};
use opentelemetry_sdk::trace::Sampler;
use tonic::metadata::AsciiMetadataValue;

use crate::{
    Env,
    fixture::{self, CallerAuth, RunningServer},
    load::{self, LoadResult, ServerCpu},
};

/// The target: throughput with traces on at least this share of off.
pub const MIN_RATIO: f64 = 0.95;

/// A collector that counts the spans it is sent.
#[derive(Clone, Default)]
pub struct Collector {
    spans: Arc<AtomicU64>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let spans: usize = request
            .get_ref()
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum();
        self.spans.fetch_add(spans as u64, Ordering::Relaxed);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Collector {
    /// Serves on `rt` (not the server runtime, so its CPU is not the service's); returns the
    /// export settings pointing at it.
    pub fn start(rt: &tokio::runtime::Runtime) -> (Self, OtelConfig) {
        let collector = Self::default();
        let service = TraceServiceServer::new(collector.clone());
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind");
        let addr = listener.local_addr().expect("bound");
        rt.spawn(async move {
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
                .expect("the collector serves");
        });
        let config = OtelConfig {
            endpoint: format!("http://{addr}").parse().expect("a URL"),
            service_name: "credential-service-bench".into(),
            sampler: Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(0.01))),
            calls: CallSampling {
                follow_parent: true,
                ratio: 0.01,
            },
        };
        (collector, config)
    }

    pub fn spans(&self) -> u64 {
        self.spans.load(Ordering::Relaxed)
    }
}

pub struct Traced {
    pub accounts: usize,
    pub off: LoadResult,
    pub on: LoadResult,
    /// Requests per second of each round: off, on.
    pub rounds: Vec<(f64, f64)>,
    /// Spans the collector received during the run.
    pub exported: u64,
}

impl Traced {
    pub fn ratio(&self) -> f64 {
        self.on.rps() / self.off.rps()
    }
}

/// Production settings (callers file, bearer tokens, `/metrics`): traces off on the accounts
/// seeded in `dirs[0]`, on in `dirs[1]` (the same accounts; each service opens its own store).
pub async fn compare(
    env: &Env,
    dirs: [&Path; 2],
    accounts: Arc<[String]>,
    auth: &CallerAuth,
    collector: &Collector,
    calls: CallSampling,
) -> Traced {
    let server_rt = env.runtimes.server.handle();
    let start = |dir: &Path, traces: bool| {
        let mut config = fixture::service_config(
            dir,
            fixture::unreachable_upstream(),
            BrokerConfig::default(),
            Some(auth),
        );
        config.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
        config.traces = traces.then_some(calls);
        RunningServer::service(server_rt, config, Clock::system())
    };
    let services = [start(dirs[0], false).await, start(dirs[1], true).await];
    let bearer =
        AsciiMetadataValue::try_from(format!("Bearer {}", auth.bearer)).expect("an ASCII token");
    let exported_before = collector.spans();
    let mut traced = Traced {
        accounts: accounts.len(),
        off: LoadResult::empty(),
        on: LoadResult::empty(),
        rounds: Vec::new(),
        exported: 0,
    };
    for round in 0..env.rounds {
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        let mut rps = (0.0, 0.0);
        for traces in order {
            let clients = load::connect(services[traces].addr, env.load.channels).await;
            let result = load::drive(
                &clients,
                accounts.clone(),
                Some(bearer.clone()),
                &env.load,
                ServerCpu::InProcess,
            )
            .await;
            if let Some(e) = &result.first_error {
                eprintln!(
                    "bench: {} errors with traces {}; first: {e}",
                    result.errors,
                    traces == 1
                );
            }
            if traces == 1 {
                rps.1 = result.rps();
                traced.on.merge(&result);
            } else {
                rps.0 = result.rps();
                traced.off.merge(&result);
            }
        }
        eprintln!(
            "bench: traces, round {}: off {:.0} req/s, on (1%) {:.0} req/s",
            round + 1,
            rps.0,
            rps.1
        );
        traced.rounds.push(rps);
    }
    for service in services {
        service.stop().await;
    }
    traced.exported = collector.spans() - exported_before;
    traced
}
