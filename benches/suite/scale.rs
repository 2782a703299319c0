//! Scale: the real binary on a data directory holding many accounts. Time from spawning the process
//! to the first SERVING health answer, resident memory, and GetToken throughput against it.

use std::{
    net::SocketAddr,
    path::Path,
    process::Stdio,
    sync::Arc,
    time::{Duration, Instant},
};

use credential_service::config::Upstream;
use secrecy::ExposeSecret;
use tokio::process::{Child, Command};

use crate::{
    Env, fixture,
    load::{self, LoadResult, ServerCpu},
};

const BIN: &str = env!("CARGO_BIN_EXE_credential-service");
/// Targets from issue 6.
pub const MAX_TIME_TO_SERVE: Duration = Duration::from_secs(2);
pub const MAX_RSS_MB: f64 = 150.0;

pub struct Scale {
    pub accounts: usize,
    /// Backups on the same binary, with and without GetToken load.
    pub backup: crate::backup::BackupRun,
    pub time_to_serve: Duration,
    pub rss_after_load_mb: f64,
    pub rss_after_traffic_mb: f64,
    pub peak_rss_mb: f64,
    pub load: LoadResult,
}

/// The binary's command line: everything it needs, pointing EdgeTag at a closed loopback port
/// (tokens are fresh, so it never calls). New required settings go here.
pub fn command(addr: SocketAddr, data_dir: &Path, log: std::fs::File) -> Command {
    command_with(addr, data_dir, &fixture::unreachable_upstream(), log)
}

/// [`command`] against `upstream` (a fake EdgeTag, for sections that refresh).
pub fn command_with(
    addr: SocketAddr,
    data_dir: &Path,
    upstream: &Upstream,
    log: std::fs::File,
) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(["--listen", &addr.to_string()])
        .args(["--data-dir", data_dir.to_str().expect("a UTF-8 path")])
        .args([
            "--encryption-key-file",
            fixture::key_file(data_dir).to_str().expect("a UTF-8 path"),
        ])
        .args(["--client-id", &upstream.client_id])
        .args(["--redirect-uri", upstream.redirect_uri.as_str()])
        .args(["--authorize-url", upstream.authorize_url.as_str()])
        .args(["--token-url", upstream.token_url.as_str()])
        .args(["--revoke-url", upstream.revoke_url.as_str()])
        .env_clear()
        .env(
            "EDGETAG_CLIENT_SECRET",
            upstream.client_secret.current().expose_secret(),
        )
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true);
    cmd
}

/// Runs the binary on `data_dir`, which holds `accounts` (already seeded and closed).
pub async fn run(env: &Env, data_dir: &Path, accounts: Arc<[String]>) -> Scale {
    let addr = free_port();
    let log_dir = fixture::temp_dir(None, "cs-bench-log-");
    let log_path = log_dir.path().join("stderr.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let started = Instant::now();
    let mut child = command(addr, data_dir, log)
        .spawn()
        .expect("the binary starts");
    let pid = child.id().expect("a running child");
    let serving = fixture::wait_until_serving(addr, Duration::from_secs(60)).await;
    let time_to_serve = started.elapsed();
    if let Err(e) = serving {
        let _ = child.kill().await;
        panic!(
            "the binary did not serve: {e}\n{}",
            std::fs::read_to_string(&log_path).unwrap_or_default()
        );
    }
    let rss_after_load_mb = status_mb(pid, "VmRSS");
    let clients = load::connect(addr, env.load.channels).await;
    let load = load::drive(
        &clients,
        accounts.clone(),
        None,
        &env.load,
        ServerCpu::Process(pid),
    )
    .await;
    let rss_after_traffic_mb = status_mb(pid, "VmRSS");
    let peak_rss_mb = status_mb(pid, "VmHWM");
    drop(clients);
    let backup = crate::backup::run(env, addr, pid, accounts.clone()).await;
    stop(&mut child).await;
    Scale {
        accounts: accounts.len(),
        backup,
        time_to_serve,
        rss_after_load_mb,
        rss_after_traffic_mb,
        peak_rss_mb,
        load,
    }
}

/// SIGTERM, as an operator's supervisor would, then wait (kill after 10 s).
pub async fn stop(child: &mut Child) {
    if let Some(pid) = child.id() {
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await;
    }
    if tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
}

/// A loopback port free right now (bound and released; the child binds it a moment later).
pub fn free_port() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

/// A `Vm…` line of /proc/PID/status, in MiB.
pub fn status_mb(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(&format!("{field}:")))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}
