//! Issue 31, the second hardening pass, tried the way an attacker (or an unlucky caller) would:
//! with real sockets against the real binary, the fake EdgeTag on loopback behind it.
//! - one caller taking every watch place: its own bound, the places kept for admins, and the
//!   client crate polling GetToken when no place is left, then watching again;
//! - the HTTP listeners (browser callback, metrics): slow and idle connections closed after the
//!   header timeout, a connection bound of their own, a small head limit, and descriptors they
//!   can never take from gRPC; the soft open-file limit raised at start, and the systemd unit's;
//! - an open service's HTTP listeners kept on loopback, like its gRPC listener;
//! - a client certificate naming two callers names none;
//! - the callback's `error` parameter logged as one quoted value.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    sync::{Arc, Mutex},
    time::Duration,
};

use credential_service::proto::{
    BeginAuthRequest, CompleteAuthRequest, GetTokenRequest, RefreshTokenRequest,
    WatchAccountsRequest, WatchTokenRequest, WatchTokenResponse,
    credential_service_client::CredentialServiceClient,
};
use fake_edgetag::{FakeConfig, FakeEdgeTag};
use sha2::Digest;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::TcpStream,
    process::{Child, Command},
    sync::Notify,
};
use tonic::{Code, Status, Streaming, transport::Channel};

use crate::common::Bearer;

const BIN: &str = env!("CARGO_BIN_EXE_credential-service");
const REDIRECT_URI: &str = "https://ops.example.com/oauth/callback";
/// Bound on every wait for something that normally takes milliseconds.
const PATIENCE: Duration = Duration::from_secs(20);

type Client =
    CredentialServiceClient<tonic::service::interceptor::InterceptedService<Channel, Bearer>>;

/// Everything the binary wrote to stderr so far, and a wake-up for each new line.
#[derive(Clone, Default)]
struct Log {
    lines: Arc<Mutex<Vec<String>>>,
    added: Arc<Notify>,
}

impl Log {
    /// The first line containing `needle`, waiting for it if need be.
    async fn wait_for(&self, needle: &str) -> String {
        let wait = async {
            loop {
                let added = self.added.notified();
                if let Some(line) = self
                    .lines
                    .lock()
                    .unwrap()
                    .iter()
                    .find(|l| l.contains(needle))
                {
                    return line.clone();
                }
                added.await;
            }
        };
        match tokio::time::timeout(PATIENCE, wait).await {
            Ok(line) => line,
            Err(_) => panic!(
                "no line with {needle:?} in\n{}",
                self.lines.lock().unwrap().join("\n")
            ),
        }
    }
}

/// The value of `name=` in a log line.
fn field(line: &str, name: &str) -> String {
    line.split(&format!("{name}="))
        .nth(1)
        .unwrap_or_else(|| panic!("no {name} in {line}"))
        .split_whitespace()
        .next()
        .unwrap()
        .trim_matches('"')
        .to_owned()
}

/// The real binary in front of the fake EdgeTag, serving.
struct Service {
    child: Child,
    addr: String,
    log: Log,
    fake: Arc<FakeEdgeTag>,
    _dir: tempfile::TempDir,
}

impl Service {
    /// Starts the binary with `args` after the required settings, and waits until it serves.
    async fn start(args: &[&str]) -> Self {
        Self::start_in(tempfile::tempdir().unwrap(), args).await
    }

    /// [`Service::start`] with `dir` (which may hold a callers file) as its directory.
    async fn start_in(dir: tempfile::TempDir, args: &[&str]) -> Self {
        Self::start_with(dir, args, None, "info").await
    }

    /// [`Service::start_in`] under `ulimit` (the shell's options, e.g. `-n 256`) if given, with
    /// `RUST_LOG` set to `log`.
    async fn start_with(
        dir: tempfile::TempDir,
        args: &[&str],
        ulimit: Option<&str>,
        log: &str,
    ) -> Self {
        let fake = Arc::new(
            FakeEdgeTag::start(FakeConfig {
                redirect_uris: vec![REDIRECT_URI.to_owned()],
                ..FakeConfig::default()
            })
            .await
            .expect("the fake EdgeTag starts"),
        );
        let mut child = service_command(&fake, dir.path(), args, ulimit)
            .env("RUST_LOG", log)
            .spawn()
            .unwrap();
        let log = Log::default();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let collect = log.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                collect.lines.lock().unwrap().push(line);
                collect.added.notify_waiters();
            }
        });
        let addr = field(&log.wait_for("credential-service serving").await, "addr");
        Self {
            child,
            addr,
            log,
            fake,
            _dir: dir,
        }
    }

    /// A gRPC client sending `token` as its bearer token.
    async fn client(&self, token: Option<&str>) -> Client {
        let channel = Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .unwrap();
        CredentialServiceClient::with_interceptor(channel, Bearer::new(token).unwrap())
    }

    /// BeginAuth, the approval at the fake, CompleteAuth, as `admin`.
    async fn connect(&self, admin: &mut Client, account: &str) {
        let begun = admin
            .begin_auth(BeginAuthRequest {
                account: account.into(),
            })
            .await
            .unwrap()
            .into_inner();
        let redirect = self.fake.approve(&begun.authorize_url).await.unwrap();
        admin
            .complete_auth(CompleteAuthRequest {
                code: redirect.code,
                state: redirect.state,
            })
            .await
            .unwrap();
    }

    /// Waits until `/metrics` at `metrics` counts at least `n` refusals by `limit`; returns the
    /// count. (A connection's refusal is counted a moment after its socket closes.)
    async fn until_limit_hits(metrics: &str, limit: &str, n: u64) -> u64 {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let hits = Self::limit_hits(metrics, limit).await;
            if hits >= n || tokio::time::Instant::now() > deadline {
                return hits;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The `credential_limit_hits_total` count of `limit` from `/metrics` at `metrics`.
    async fn limit_hits(metrics: &str, limit: &str) -> u64 {
        let text = reqwest::get(format!("http://{metrics}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let series = format!("credential_limit_hits_total{{limit=\"{limit}\"}}");
        text.lines()
            .find(|l| l.starts_with(&series))
            .and_then(|l| l.split_whitespace().last()?.parse().ok())
            .unwrap_or(0)
    }
}

/// The binary with the required settings pointed at `fake`, its data in `dir`, on ephemeral
/// loopback ports, then `args`; started by a shell under `ulimit` if given.
fn service_command(fake: &FakeEdgeTag, dir: &Path, args: &[&str], ulimit: Option<&str>) -> Command {
    let mut cmd = match ulimit {
        None => Command::new(BIN),
        Some(options) => {
            let mut sh = Command::new("sh");
            sh.arg("-c")
                .arg(format!(r#"ulimit {options} && exec "$0" "$@""#))
                .arg(BIN);
            sh
        }
    };
    cmd.args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.join("data"))
        .args(["--client-id", fake.client_id()])
        .args(["--redirect-uri", REDIRECT_URI])
        .args(["--authorize-url", &fake.authorize_url()])
        .args(["--token-url", &fake.token_url()])
        .args(["--revoke-url", &fake.revoke_url()])
        .args(args)
        .env_clear()
        .env("EDGETAG_CLIENT_SECRET", fake.client_secret())
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

/// A callers file in `dir` with one entry per `(name, bearer token, role)`, every account allowed.
fn callers_file(dir: &Path, entries: &[(&str, &str, &str)]) -> PathBuf {
    let toml: String = entries
        .iter()
        .map(|(name, token, role)| {
            let hash = hex::encode(sha2::Sha256::digest(token.as_bytes()));
            format!(
                "[[caller]]\nname = \"{name}\"\ntoken_sha256 = \"{hash}\"\nrole = \"{role}\"\naccounts = [\"*\"]\n\n"
            )
        })
        .collect();
    let path = dir.join("callers.toml");
    std::fs::write(&path, toml).unwrap();
    path
}

/// Awaits `future`, failing the test instead of hanging it.
async fn within<F: Future>(future: F) -> F::Output {
    tokio::time::timeout(PATIENCE, future)
        .await
        .expect("in time")
}

/// Opens a WatchToken stream of `account` and reads its first token.
async fn watch(
    client: &mut Client,
    account: &str,
) -> Result<(Streaming<WatchTokenResponse>, WatchTokenResponse), Status> {
    let mut stream = client
        .watch_token(WatchTokenRequest {
            account: account.into(),
            min_validity: None,
        })
        .await?
        .into_inner();
    let first = within(stream.message()).await?.expect("a first token");
    Ok((stream, first))
}

async fn get_token(client: &mut Client, account: &str) -> String {
    client
        .get_token(GetTokenRequest {
            account: account.into(),
            min_validity: None,
        })
        .await
        .unwrap()
        .into_inner()
        .access_token
}

/// Issue 31, finding 2: one reader opened every WatchToken place, and everyone else's WatchToken,
/// the admins' WatchAccounts and the client crate's `follow` (0 tokens in 8 s) were refused.
/// Now one caller gets at most `--max-watchers-per-caller`; another caller still watches; when
/// callers fill `--max-watchers`, admins still get a kept place for WatchAccounts, and the client
/// crate polls GetToken, then watches again once a place frees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_caller_cannot_take_every_watch_place_and_the_client_still_gets_tokens() {
    const HOG: &str = "hog-reader-token";
    const OTHER: &str = "other-reader-token";
    const FOLLOWER: &str = "follower-reader-token";
    const OPS: &str = "ops-admin-token";
    let dir = tempfile::tempdir().unwrap();
    let callers = callers_file(
        dir.path(),
        &[
            ("hog", HOG, "reader"),
            ("other", OTHER, "reader"),
            ("follower", FOLLOWER, "reader"),
            ("ops", OPS, "admin"),
        ],
    );
    let mut service = Service::start_in(
        dir,
        &[
            "--callers-file",
            callers.to_str().unwrap(),
            "--max-watchers",
            "6",
            "--max-watchers-per-caller",
            "4",
            "--watchers-kept-for-admins",
            "2",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
    )
    .await;
    let metrics = field(&service.log.wait_for("metrics serving").await, "addr");
    let mut ops = service.client(Some(OPS)).await;
    service.connect(&mut ops, "acme").await;

    // The hog opens streams until it is refused: it holds its own bound, no more.
    let mut hog = service.client(Some(HOG)).await;
    let mut held = Vec::new();
    let refused = loop {
        match watch(&mut hog, "acme").await {
            Ok((stream, _)) => held.push(stream),
            Err(status) => break status,
        }
        assert!(held.len() <= 6, "the hog took every place");
    };
    assert_eq!(held.len(), 4, "--max-watchers-per-caller");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("--max-watchers-per-caller"),
        "{refused:?}"
    );
    service.log.wait_for("the caller has too many open").await;

    // Another caller still watches, and takes the last places of --max-watchers.
    let mut other = service.client(Some(OTHER)).await;
    let mut others = Vec::new();
    for _ in 0..2 {
        others.push(
            watch(&mut other, "acme")
                .await
                .expect("another caller watches")
                .0,
        );
    }
    let full = watch(&mut other, "acme").await.unwrap_err();
    assert_eq!(full.code(), Code::ResourceExhausted, "{full:?}");

    // Admins still follow their accounts: WatchAccounts takes a place kept for them.
    let mut events = within(ops.watch_accounts(WatchAccountsRequest {}))
        .await
        .expect("a kept place for WatchAccounts")
        .into_inner();
    let snapshot = within(events.message()).await.unwrap().unwrap();
    assert_eq!(snapshot.account, "acme");

    // The client crate, refused a stream, polls GetToken: it has a token at once.
    let follower = credential_client::Client::builder(format!("http://{}", service.addr))
        .bearer_token(FOLLOWER)
        .reconnect_backoff(Duration::from_millis(10), Duration::from_millis(100))
        .polling_fallback(3, Duration::from_millis(200))
        .build()
        .unwrap()
        .token_source("acme");
    let polled = within(follower.token()).await.expect("a token by polling");
    let current = get_token(&mut ops, "acme").await;
    assert_eq!(
        credential_client::ExposeSecret::expose_secret(polled.access_token()),
        current
    );
    service
        .log
        .wait_for("watch stream refused: too many open")
        .await;
    assert!(Service::until_limit_hits(&metrics, "watchers_per_caller", 1).await >= 1);
    assert!(Service::until_limit_hits(&metrics, "watchers", 2).await >= 2);

    // The hog leaves: the client watches again, so each refresh reaches it within moments (polling
    // would ask again only when three quarters of the hour-long token have passed).
    drop(held);
    for _ in 0..2 {
        let before = follower.token().await.unwrap();
        ops.refresh_token(RefreshTokenRequest {
            account: "acme".into(),
        })
        .await
        .unwrap();
        let refreshed = get_token(&mut ops, "acme").await;
        let pushed = within(async {
            loop {
                let token = follower.token().await.unwrap();
                if token != before {
                    break token;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        assert_eq!(
            credential_client::ExposeSecret::expose_secret(pushed.access_token()),
            refreshed
        );
    }
    drop(others);
    service.child.kill().await.unwrap();
}

/// A raw TCP connection to an HTTP listener, as an attacker's own client opens it.
async fn tcp(addr: &str) -> TcpStream {
    TcpStream::connect(addr).await.unwrap()
}

/// Reads until the server closes the connection (EOF or reset); returns what it sent.
async fn read_to_close(tcp: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tcp.read(&mut buf).await {
            Ok(0) | Err(_) => return String::from_utf8_lossy(&got).into_owned(),
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// The HTTP listeners' address from their start-up line (`browser callback serving`, `metrics
/// serving`).
async fn http_addr(service: &Service, line: &str) -> String {
    field(&service.log.wait_for(line).await, "addr")
}

/// A gRPC health check on a new connection, as a probe would make it: SERVING within 10 s.
async fn healthy_on_a_new_connection(addr: &str) -> bool {
    let probe = async {
        let channel = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .ok()?;
        let status = tonic_health::pb::health_client::HealthClient::new(channel)
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .ok()?
            .into_inner()
            .status;
        Some(status == 1)
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(10), probe).await,
        Ok(Some(true))
    )
}

/// Issue 31, finding 3: a connection to the callback that sends nothing, or a request head in
/// pieces, stayed open 20 s and more (one stalled request was still open at 40 s). Now each is
/// closed once `--http-header-timeout` has passed without a whole head, however it trickles, and
/// so is a kept-alive connection that goes idle after its answer.
#[tokio::test]
async fn slow_and_idle_http_connections_are_closed_after_the_header_timeout() {
    let service = Service::start(&[
        "--callback-listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
        "--http-header-timeout",
        "1s",
        "--http-max-connections",
        "200",
    ])
    .await;
    let callback = http_addr(&service, "browser callback serving").await;
    let metrics = http_addr(&service, "metrics serving").await;
    let started = tokio::time::Instant::now();
    let mut attackers = Vec::new();
    for i in 0..60 {
        let mut conn = tcp(&callback).await;
        attackers.push(tokio::spawn(async move {
            match i % 3 {
                0 => {} // sends nothing
                1 => {
                    // half a head, then nothing
                    let _ = conn
                        .write_all(b"GET /oauth/callback HTTP/1.1\r\nHost: x\r\n")
                        .await;
                }
                _ => {
                    // a head one byte every 100 ms, for far longer than the timeout
                    for byte in b"GET /oauth/callback?state=s HTTP/1.1\r\nHost: x\r\nX-Slow: "
                        .iter()
                        .cycle()
                        .take(100)
                    {
                        if conn.write_all(&[*byte]).await.is_err() {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await; // the trickle itself
                    }
                }
            }
            read_to_close(&mut conn).await;
            started.elapsed()
        }));
    }
    // A real request, answered; then its kept-alive connection idles past the timeout.
    let mut kept = tcp(&callback).await;
    kept.write_all(b"GET /oauth/callback HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let answer = within(read_to_close(&mut kept)).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    for attacker in attackers {
        let closed_after = within(attacker).await.unwrap();
        assert!(
            closed_after >= Duration::from_millis(900) && closed_after < Duration::from_secs(5),
            "closed after {closed_after:?}"
        );
    }
    service.log.wait_for("no whole request head in time").await;
    let closed = Service::until_limit_hits(&metrics, "http_header_timeout", 61).await;
    assert!(closed >= 61, "{closed} timeouts counted");
    assert!(healthy_on_a_new_connection(&service.addr).await);
}

/// Issue 31, finding 3: nothing bounded the HTTP listeners' connections. Now each listener holds
/// at most `--http-max-connections`, apart from gRPC's and from the other listener's: one more
/// is closed at once, while gRPC and `/metrics` still serve.
#[tokio::test]
async fn past_the_http_connection_bound_a_connection_is_closed_at_once_and_the_rest_still_serves() {
    let service = Service::start(&[
        "--callback-listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
        "--http-max-connections",
        "4",
        "--http-header-timeout",
        "60s",
    ])
    .await;
    let callback = http_addr(&service, "browser callback serving").await;
    let metrics = http_addr(&service, "metrics serving").await;
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut conn = tcp(&callback).await;
        conn.write_all(b"GET /oauth/callback HTTP/1.1\r\n")
            .await
            .unwrap();
        held.push(conn);
    }
    let mut extra = tcp(&callback).await;
    let started = tokio::time::Instant::now();
    let sent = within(read_to_close(&mut extra)).await;
    assert!(sent.is_empty(), "{sent}");
    assert!(started.elapsed() < Duration::from_secs(5));
    service.log.wait_for("too many open on this listener").await;
    assert!(Service::until_limit_hits(&metrics, "http_connections", 1).await >= 1);
    assert!(healthy_on_a_new_connection(&service.addr).await);
    // The held connections are served when they finish their request.
    let mut first = held.remove(0);
    first
        .write_all(b"Host: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let answer = within(read_to_close(&mut first)).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
}

/// Issue 31, finding 3: a 1 MB head was refused (431), but 200 connections each stalled inside a
/// 380 KB head added 73 MB. Now a head over `--http-max-header-bytes` (16 KiB) is refused 431
/// and closed, and a stalled head holds at most that much.
#[tokio::test]
async fn a_request_head_over_the_limit_is_refused_and_stalled_heads_hold_little_memory() {
    let mut service = Service::start(&[
        "--callback-listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
        "--http-header-timeout",
        "60s",
        // Room for every connection below, so that each is read, not refused.
        "--http-max-connections",
        "100",
    ])
    .await;
    let callback = http_addr(&service, "browser callback serving").await;
    let metrics = http_addr(&service, "metrics serving").await;
    let request = |header: usize| {
        format!(
            "GET /oauth/callback HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Big: {}\r\n\r\n",
            "a".repeat(header)
        )
    };
    let mut big = tcp(&callback).await;
    big.write_all(request(20 * 1024).as_bytes()).await.unwrap();
    let answer = within(read_to_close(&mut big)).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    let mut fine = tcp(&callback).await;
    fine.write_all(request(12 * 1024).as_bytes()).await.unwrap();
    let answer = within(read_to_close(&mut fine)).await;
    assert!(
        answer.starts_with("HTTP/1.1 400"),
        "a page, not a refusal: {answer}"
    );
    service.log.wait_for("its head is too large").await;
    assert!(Service::until_limit_hits(&metrics, "http_header_too_large", 1).await >= 1);

    // Connections each stalled inside a 380 KB head.
    let pid = service.child.id().unwrap();
    let before = proc_kib(pid, "VmRSS:");
    let chunk = vec![b'a'; 380 * 1024];
    let mut stalled = Vec::new();
    for _ in 0..64 {
        let mut conn = tcp(&callback).await;
        conn.write_all(b"GET /oauth/callback HTTP/1.1\r\nX-Big: ")
            .await
            .unwrap();
        // The server stops reading at the limit: the rest waits in the socket buffers, or not.
        let _ = tokio::time::timeout(Duration::from_millis(50), conn.write_all(&chunk)).await;
        stalled.push(conn);
    }
    // Each is answered 431 and closed (or reset, for what the server never read).
    within(futures::future::join_all(
        stalled.iter_mut().map(read_to_close),
    ))
    .await;
    let after = proc_kib(pid, "VmRSS:");
    let grown = after.saturating_sub(before) / 1024;
    eprintln!(
        "64 connections each sending a 380 KB head: RSS {} MiB before, {} MiB after (+{grown} MiB)",
        before / 1024,
        after / 1024
    );
    assert!(grown < 16, "grew by {grown} MiB");
    let refused = Service::until_limit_hits(&metrics, "http_header_too_large", 65).await;
    assert!(refused >= 65, "{refused} refused");
    service.child.kill().await.unwrap();
}

/// A line of /proc/<pid>/status, in KiB.
fn proc_kib(pid: u32, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with(key)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Issue 31, finding 3: with 1,024 descriptors, 1,100 idle callback connections took every one:
/// new gRPC connections failed (health down, GetToken timing out) until the attacker left. Now
/// the HTTP listeners hold at most their own budgets, so gRPC keeps its descriptors.
#[tokio::test]
async fn idle_http_connections_cannot_take_the_descriptors_grpc_needs() {
    let dir = tempfile::tempdir().unwrap();
    let mut service = Service::start_with(
        dir,
        &[
            "--callback-listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--max-connections",
            "64",
            "--http-max-connections",
            "16",
            "--http-header-timeout",
            "60s",
        ],
        Some("-n 256"),
        "info",
    )
    .await;
    let budget = service.log.wait_for("open-file limit").await;
    assert!(budget.contains("open_files=256"), "{budget}");
    let callback = http_addr(&service, "browser callback serving").await;
    // Far more idle connections than the process has descriptors.
    let mut idle = Vec::new();
    for _ in 0..400 {
        idle.push(tcp(&callback).await);
    }
    service.log.wait_for("too many open on this listener").await;
    // A probe and a caller on new connections are served while the attacker stays.
    for _ in 0..3 {
        assert!(healthy_on_a_new_connection(&service.addr).await);
    }
    let mut caller = service.client(None).await;
    let unknown = within(caller.get_token(GetTokenRequest {
        account: "acme".into(),
        min_validity: None,
    }))
    .await
    .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound, "served: {unknown:?}");
    drop(idle);
    service.child.kill().await.unwrap();
}

/// The soft open-file limit starts at 1,024 under systemd and many shells; the service raises it
/// to the hard limit at start and logs it. The systemd unit's `LimitNOFILE` covers the
/// descriptors the default bounds may hold.
#[tokio::test]
async fn the_soft_open_file_limit_is_raised_to_the_hard_one_at_start() {
    let hard = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .maximum
        .expect("a finite hard limit here");
    let service =
        Service::start_with(tempfile::tempdir().unwrap(), &[], Some("-S -n 200"), "info").await;
    let pid = service.child.id().unwrap();
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let open_files: Vec<&str> = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap()
        .split_whitespace()
        .skip(3)
        .take(2)
        .collect();
    assert_eq!(open_files, [hard.to_string(), hard.to_string()], "{limits}");
    let line = service.log.wait_for("open-file limit").await;
    assert!(line.contains(&format!("open_files={hard}")), "{line}");

    let unit = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/systemd/credential-service.service"),
    )
    .unwrap();
    let limit: u64 = unit
        .lines()
        .find_map(|l| l.strip_prefix("LimitNOFILE="))
        .expect("the unit sets LimitNOFILE")
        .parse()
        .unwrap();
    let mut config = credential_service::config::ServiceConfig::new(
        credential_service::config::Upstream {
            authorize_url: "https://app.example.com/a".parse().unwrap(),
            token_url: "https://api.example.com/t".parse().unwrap(),
            revoke_url: "https://api.example.com/r".parse().unwrap(),
            client_id: "c".into(),
            client_secret: "s".into(),
            redirect_uri: REDIRECT_URI.parse().unwrap(),
        },
        "/var/lib/credential-service".into(),
    );
    config.callback = Some(credential_service::config::CallbackConfig {
        listen: "127.0.0.1:8080".parse().unwrap(),
        path: "/oauth/callback".into(),
    });
    config.metrics_listen = Some("127.0.0.1:9090".parse().unwrap());
    let needed = credential_service::launch::open_files_budget(&config);
    assert!(
        limit >= needed,
        "LimitNOFILE={limit}, the defaults need {needed}"
    );
}

/// Issue 31, finding 4: without a callers file the gRPC listener refused anything but loopback,
/// but `--callback-listen` and `--metrics-listen` bound any address. They follow the same rule.
#[tokio::test]
async fn an_open_service_keeps_its_http_listeners_on_loopback_too() {
    let fake = FakeEdgeTag::start(FakeConfig::default()).await.unwrap();
    for (flag, addr) in [
        ("--callback-listen", "0.0.0.0:0"),
        ("--metrics-listen", "[::]:0"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let out = within(
            service_command(&fake, dir.path(), &[flag, addr], None)
                .stderr(Stdio::piped())
                .output(),
        )
        .await
        .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(
            stderr.contains(flag)
                && stderr.contains("--callers-file")
                && stderr.contains("loopback"),
            "{stderr}"
        );
        assert!(!stderr.contains("serving"), "{stderr}");
    }
}

/// Issue 31, finding 4: a client certificate whose subject alternative names belong to two
/// callers was taken for whichever the callers file listed first. It names neither now.
#[tokio::test]
async fn a_client_certificate_naming_two_callers_names_none() {
    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    };
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::from_params(&ca, &ca_key);
    let leaf = |names: &[&str], usage| {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.extended_key_usages = vec![usage];
        (
            params.signed_by(&key, &issuer).unwrap().pem(),
            key.serialize_pem(),
        )
    };
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_owned()
    };
    let (server_cert, server_key) = leaf(&["localhost"], ExtendedKeyUsagePurpose::ServerAuth);
    let (cert, key, ca_file) = (
        write("server.pem", &server_cert),
        write("server.key", &server_key),
        write("ca.pem", &ca_pem),
    );
    let callers = write(
        "callers.toml",
        "[[caller]]\nname = \"billing\"\ntls_san = \"billing.internal\"\nrole = \"reader\"\naccounts = [\"*\"]\n\n\
         [[caller]]\nname = \"ops\"\ntls_san = \"ops.internal\"\nrole = \"admin\"\naccounts = [\"*\"]\n",
    );
    let service = Service::start_in(
        dir,
        &[
            "--callers-file",
            &callers,
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--tls-client-ca",
            &ca_file,
        ],
    )
    .await;
    let client = |names: &[&str]| {
        let (cert, key) = leaf(names, ExtendedKeyUsagePurpose::ClientAuth);
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&ca_pem))
            .domain_name("localhost")
            .identity(Identity::from_pem(cert, key));
        let addr = service.addr.clone();
        async move {
            let channel = Channel::from_shared(format!("https://{addr}"))
                .unwrap()
                .tls_config(tls)
                .unwrap()
                .connect()
                .await
                .unwrap();
            CredentialServiceClient::with_interceptor(channel, Bearer::new(None).unwrap())
        }
    };
    let begin = async |client: &mut Client| {
        client
            .begin_auth(BeginAuthRequest {
                account: "acme".into(),
            })
            .await
    };
    for names in [
        &["billing.internal", "ops.internal"][..],
        &["ops.internal", "billing.internal"],
    ] {
        let mut both = client(names).await;
        let refused = begin(&mut both).await.unwrap_err();
        assert_eq!(
            refused.code(),
            Code::Unauthenticated,
            "{names:?}: {refused:?}"
        );
        assert!(
            refused.message().contains("more than one caller"),
            "{refused:?}"
        );
        let refused = both
            .get_token(GetTokenRequest {
                account: "acme".into(),
                min_validity: None,
            })
            .await
            .unwrap_err();
        assert_eq!(
            refused.code(),
            Code::Unauthenticated,
            "{names:?}: {refused:?}"
        );
    }
    // One name, one caller: as before.
    let mut ops = client(&["ops.internal"]).await;
    assert!(begin(&mut ops).await.is_ok());
    let mut billing = client(&["billing.internal"]).await;
    assert_eq!(
        begin(&mut billing).await.unwrap_err().code(),
        Code::PermissionDenied
    );
}

/// Issue 31, finding 4: the callback's `error` parameter was logged unquoted, so
/// `error=x caller=ops-cli` read as two fields to a logfmt parser, and U+2028 passed the filter.
/// It is one quoted, escaped value now.
#[tokio::test]
async fn the_callbacks_error_parameter_is_logged_as_one_quoted_value() {
    let service = Service::start_with(
        tempfile::tempdir().unwrap(),
        &["--callback-listen", "127.0.0.1:0"],
        None,
        "info,credential_service::callback=debug",
    )
    .await;
    let callback = http_addr(&service, "browser callback serving").await;
    let forged = "x caller=ops-cli\u{2028}outcome=OK \"quoted\"";
    let query: String = url::form_urlencoded::byte_serialize(forged.as_bytes()).collect();
    let page = reqwest::get(format!("http://{callback}/oauth/callback?error={query}"))
        .await
        .unwrap();
    assert_eq!(page.status(), 400);
    let line = service
        .log
        .wait_for("EdgeTag redirected with an error")
        .await;
    assert!(
        line.contains(r#"error="x caller=ops-cli\u{2028}outcome=OK \"quoted\"""#),
        "{line}"
    );
    assert!(!line.contains('\u{2028}'), "{line}");
}
