//! GetToken driven from outside the process: h2load (Debian `nghttp2-client`), 4 connections ×
//! 32 streams, against three servers up at once on the same runtime: the floor on tonic's
//! defaults (the *bare* floor: a plain tonic server answering the same constant), the floor on the
//! service's HTTP/2 settings, and the service. Rounds alternate the order. Against the in-process
//! generator of `throughput`, this one costs the server's threads no CPU of its own (h2load runs in
//! its own process) and sends the same pre-encoded request each time.
//!
//! h2load counts HTTP 200 as success, and gRPC answers errors with 200 too: a run counts only if
//! the bytes of data it received add up to a full GetToken answer per request.

use std::{path::Path, process::Command, sync::Arc};

use credential_service::{clock::Clock, proto::GetTokenRequest};
use prost::Message;
use tonic::metadata::AsciiMetadataValue;

use crate::{
    Env,
    fixture::{CallerAuth, RunningServer, SERVER_THREADS},
    floor,
    load::{self, thread_cpu},
    throughput,
};

/// Requests per h2load run (after one unmeasured run of a tenth of that).
const REQUESTS: u64 = 200_000;

/// One configuration's rounds: requests per second and server CPU per request of each target.
pub struct H2Row {
    pub settings: &'static str,
    pub accounts: usize,
    /// bare floor, floor on the service's settings, service: (req/s, CPU µs/req) per round.
    pub rounds: Vec<[(f64, f64); 3]>,
    /// h2load's own CPU per request, over every measured run.
    pub client_cpu_us: f64,
}

pub const TARGETS: [&str; 3] = ["bare floor", "floor", "service"];

impl H2Row {
    /// The median over rounds of `target`'s ratio to `base` in throughput and in CPU per request.
    pub fn ratios(&self, target: usize, base: usize) -> (f64, f64) {
        let rps = self
            .rounds
            .iter()
            .map(|r| r[target].0 / r[base].0)
            .collect();
        let cpu = self
            .rounds
            .iter()
            .map(|r| r[target].1 / r[base].1)
            .collect();
        (median(rps), median(cpu))
    }

    /// The median of `target`'s req/s and CPU µs/req.
    pub fn medians(&self, target: usize) -> (f64, f64) {
        (
            median(self.rounds.iter().map(|r| r[target].0).collect()),
            median(self.rounds.iter().map(|r| r[target].1).collect()),
        )
    }
}

/// The middle value (the upper one of an even count).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs `rounds` alternating rounds for one configuration.
pub async fn run(
    env: &Env,
    data_dir: &Path,
    accounts: Arc<[String]>,
    auth: Option<&CallerAuth>,
    production: bool,
) -> H2Row {
    let server_rt = env.runtimes.server.handle();
    let config = throughput::row_config(env, data_dir, auth, production);
    let service = RunningServer::service(server_rt, config, Clock::system()).await;
    let mut floors = Vec::new();
    for bare in [true, false] {
        floors.push(
            RunningServer::spawn(server_rt, move |listener, stop| {
                floor::run(listener, stop, bare, None)
            })
            .await,
        );
    }
    let addrs = [floors[0].addr, floors[1].addr, service.addr];
    let bearer = auth.map(|a| format!("Bearer {}", a.bearer));

    // One account (the first): h2load sends one body.
    let body_file = tempfile::NamedTempFile::new().expect("a temporary file");
    let message = GetTokenRequest {
        account: accounts[0].clone(),
        min_validity: None,
    }
    .encode_to_vec();
    let mut framed = vec![0u8];
    framed.extend_from_slice(&u32::try_from(message.len()).unwrap().to_be_bytes());
    framed.extend_from_slice(&message);
    std::fs::write(body_file.path(), &framed).unwrap();

    // What a full answer weighs, per target, as tonic receives it.
    let mut answer_bytes = [0usize; 3];
    for (i, addr) in addrs.iter().enumerate() {
        let mut client = load::connect(*addr, 1).await.remove(0);
        let mut request = tonic::Request::new(GetTokenRequest {
            account: accounts[0].clone(),
            min_validity: None,
        });
        if let Some(b) = &bearer {
            request.metadata_mut().insert(
                "authorization",
                AsciiMetadataValue::try_from(b.as_str()).unwrap(),
            );
        }
        let answer = client
            .get_token(request)
            .await
            .unwrap_or_else(|e| panic!("{} answers GetToken: {e:?}", TARGETS[i]));
        answer_bytes[i] = answer.get_ref().encoded_len() + 5;
    }

    let mut row = H2Row {
        settings: if production {
            "production"
        } else if auth.is_some() {
            "yes"
        } else {
            "no"
        },
        accounts: accounts.len(),
        rounds: Vec::new(),
        client_cpu_us: 0.0,
    };
    let (mut client_cpu, mut client_requests) = (0.0, 0u64);
    for round in 0..env.rounds {
        let mut results = [(0.0, 0.0); 3];
        let order: Vec<usize> = if round % 2 == 0 {
            vec![0, 1, 2]
        } else {
            vec![2, 1, 0]
        };
        for i in order {
            // `--only service` (or `floor`, `bare`) drives one target alone, for profiles.
            let name = ["bare", "floor", "service"][i];
            if env.only.as_deref().is_some_and(|only| only != name) {
                continue;
            }
            let url = format!(
                "http://{}/credential.v1.CredentialService/GetToken",
                addrs[i]
            );
            let h2load = |n: u64| {
                let mut cmd = Command::new("h2load");
                cmd.args(["-c", "4", "-m", "32", "-t", "1", "-n", &n.to_string()])
                    .args(["-H", "content-type: application/grpc", "-H", "te: trailers"])
                    .arg("-d")
                    .arg(body_file.path());
                if let Some(b) = &bearer {
                    cmd.args(["-H", &format!("authorization: {b}")]);
                }
                cmd.arg(&url);
                cmd
            };
            let warm = tokio::task::spawn_blocking({
                let mut cmd = h2load(REQUESTS / 10);
                move || cmd.output()
            });
            warm.await
                .unwrap()
                .expect("h2load runs (apt-get install nghttp2-client)");
            let cpu0 = thread_cpu(SERVER_THREADS);
            let children0 = children_cpu();
            let out = tokio::task::spawn_blocking({
                let mut cmd = h2load(REQUESTS);
                move || cmd.output()
            })
            .await
            .unwrap()
            .expect("h2load runs");
            let cpu = thread_cpu(SERVER_THREADS).saturating_sub(cpu0);
            client_cpu += children_cpu() - children0;
            client_requests += REQUESTS;
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            let parsed =
                parse(&text).unwrap_or_else(|| panic!("h2load's output is as expected:\n{text}"));
            assert_eq!(
                parsed.succeeded, REQUESTS,
                "every request succeeds at {}:\n{text}",
                TARGETS[i]
            );
            assert!(
                parsed.data_bytes >= REQUESTS * answer_bytes[i] as u64,
                "{} sent full answers ({} bytes each): {text}",
                TARGETS[i],
                answer_bytes[i]
            );
            let per_request = cpu.as_secs_f64() * 1e6 / REQUESTS as f64;
            results[i] = (parsed.rps, per_request);
        }
        eprintln!(
            "bench: h2load {} round {}: bare floor {:.0}, floor {:.0}, service {:.0} req/s; \
             CPU µs/req {:.1} / {:.1} / {:.1}",
            row.settings,
            round + 1,
            results[0].0,
            results[1].0,
            results[2].0,
            results[0].1,
            results[1].1,
            results[2].1,
        );
        row.rounds.push(results);
    }
    row.client_cpu_us = client_cpu * 1e6 / client_requests.max(1) as f64;
    for f in floors {
        f.stop().await;
    }
    service.stop().await;
    row
}

/// User and system CPU seconds of the waited-for children (h2load runs) so far.
fn children_cpu() -> f64 {
    // SAFETY: getrusage writes into the struct it is given and nothing else.
    let usage = unsafe {
        let mut usage = std::mem::zeroed::<libc::rusage>();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage);
        usage
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

struct Parsed {
    rps: f64,
    succeeded: u64,
    data_bytes: u64,
}

/// Reads `finished in 1.23s, 162601.30 req/s, ...`, `requests: N total, N started, N done, N
/// succeeded, ...` and `traffic: ... (N) data` from h2load's summary.
fn parse(text: &str) -> Option<Parsed> {
    let rps = text
        .lines()
        .find(|l| l.starts_with("finished in"))?
        .split(", ")
        .nth(1)?
        .strip_suffix(" req/s")?
        .parse()
        .ok()?;
    let requests = text.lines().find(|l| l.starts_with("requests:"))?;
    let succeeded = requests
        .split(", ")
        .find(|p| p.ends_with(" succeeded"))?
        .trim_end_matches(" succeeded")
        .parse()
        .ok()?;
    let traffic = text.lines().find(|l| l.starts_with("traffic:"))?;
    let data_bytes = traffic
        .split(", ")
        .find(|p| p.ends_with(" data"))?
        .rsplit_once('(')?
        .1
        .split(')')
        .next()?
        .parse()
        .ok()?;
    Some(Parsed {
        rps,
        succeeded,
        data_bytes,
    })
}
