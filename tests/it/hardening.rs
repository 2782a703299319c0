//! What a hostile process on the network can do without credentials, tried with real connections
//! against the real binary: flood health with huge messages over one HTTP/2 connection (the
//! server's memory, read from /proc, must stay small and health must keep answering), hold
//! connections open without a handshake, exceed the connection, in-flight and Watch bounds. And a
//! start with secret files open to others warns.

use std::{path::Path, process::Stdio, time::Duration};

use credential_service::proto::{
    GetTokenRequest, credential_service_client::CredentialServiceClient,
};
use h2::client::SendRequest;
use prost::Message;
use sha2::Digest;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, Lines},
    net::TcpStream,
    process::{Child, ChildStderr, Command},
};
use tonic::{
    Code,
    codegen::{Bytes, http},
    transport::Channel,
};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

const BIN: &str = env!("CARGO_BIN_EXE_credential-service");

/// The binary with its required settings, a data directory in `dir`, on an ephemeral port.
fn service(dir: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args([
        "--listen",
        "127.0.0.1:0",
        "--client-id",
        "cid",
        "--redirect-uri",
        "https://ops.example.com/cb",
        "--data-dir",
    ])
    .arg(dir.join("data"))
    .args(args)
    .env_clear()
    .env("EDGETAG_CLIENT_SECRET", "s3cret")
    .env("RUST_LOG", "info")
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .kill_on_drop(true);
    cmd
}

/// Reads stderr until a line contains `needle`; returns that line.
async fn wait_for_line(lines: &mut Lines<BufReader<ChildStderr>>, needle: &str) -> String {
    let read = async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains(needle) {
                return line;
            }
        }
        panic!("stderr ended before a line with {needle:?}");
    };
    tokio::time::timeout(Duration::from_secs(30), read)
        .await
        .expect("the line appears")
}

fn field(line: &str, name: &str) -> String {
    line.split(&format!("{name}="))
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

struct Server {
    child: Child,
    lines: Lines<BufReader<ChildStderr>>,
    addr: String,
    _dir: tempfile::TempDir,
}

async fn start(args: &[&str]) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let mut child = service(dir.path(), args).spawn().unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = field(
        &wait_for_line(&mut lines, "credential-service serving").await,
        "addr",
    );
    Server {
        child,
        lines,
        addr,
        _dir: dir,
    }
}

/// A line of /proc/<pid>/status, in KiB (VmRSS now, VmHWM the peak so far).
fn proc_kib(pid: u32, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with(key)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

async fn health(addr: &str) -> HealthClient<Channel> {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    HealthClient::new(channel)
}

async fn check(client: &mut HealthClient<Channel>) -> Result<i32, tonic::Status> {
    client
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map(|r| r.into_inner().status)
}

/// A raw HTTP/2 connection, as an attacker's own client would open it.
async fn h2_connect(addr: &str) -> SendRequest<Bytes> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

fn grpc_request(addr: &str, path: &str) -> http::Request<()> {
    http::Request::post(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap()
}

/// A gRPC frame: uncompressed, length-prefixed.
fn grpc_frame(message: &[u8]) -> Bytes {
    let mut frame = Vec::with_capacity(5 + message.len());
    frame.push(0);
    frame.extend_from_slice(&u32::try_from(message.len()).unwrap().to_be_bytes());
    frame.extend_from_slice(message);
    frame.into()
}

/// The grpc-status of an answer: in its headers (trailers-only) or its trailers.
async fn grpc_status(response: h2::client::ResponseFuture) -> Option<i32> {
    let response = response.await.ok()?;
    let parse = |h: &http::HeaderMap| {
        h.get("grpc-status")
            .and_then(|v| v.to_str().ok()?.parse().ok())
    };
    if let Some(code) = parse(response.headers()) {
        return Some(code);
    }
    let mut body = response.into_body();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.ok()?;
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    parse(&body.trailers().await.ok()??)
}

type Answer = std::pin::Pin<Box<dyn Future<Output = Option<i32>> + Send>>;

/// `n` calls to `path` on one raw HTTP/2 connection whose request never ends: their answers (the
/// grpc-status each gets) and the request bodies, which keep them open while held.
async fn stalled_calls(
    addr: &str,
    path: &str,
    n: usize,
) -> (Vec<Answer>, Vec<h2::SendStream<Bytes>>) {
    let attacker = h2_connect(addr).await;
    let (mut answers, mut bodies) = (Vec::<Answer>::new(), Vec::new());
    for _ in 0..n {
        let mut sender = attacker.clone().ready().await.unwrap();
        let (response, body) = sender
            .send_request(grpc_request(addr, path), false)
            .unwrap();
        answers.push(Box::pin(grpc_status(response)));
        bodies.push(body);
    }
    (answers, bodies)
}

/// Sends SIGTERM to `child`, as systemd or Kubernetes would to stop the service.
async fn terminate(child: &Child) {
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().unwrap().to_string()])
        .status()
        .await
        .unwrap();
    assert!(killed.success());
}

#[tokio::test]
async fn a_flood_of_huge_health_requests_on_one_connection_stays_small_and_health_answers() {
    const STREAMS: usize = 100;
    // 4 MB: just under tonic's default limit of 4 MiB, which alone would refuse it.
    const MESSAGE: usize = 4_000_000;
    let mut server = start(&[]).await;
    let pid = server.child.id().unwrap();
    let mut prober = health(&server.addr).await;
    assert_eq!(check(&mut prober).await.unwrap(), 1); // SERVING
    let before = proc_kib(pid, "VmHWM:");

    let message = HealthCheckRequest {
        service: "x".repeat(MESSAGE),
    }
    .encode_to_vec();
    let frame = grpc_frame(&message);
    let attacker = h2_connect(&server.addr).await;
    let attack = {
        let addr = server.addr.clone();
        tokio::spawn(async move {
            let mut answers = Vec::new();
            for _ in 0..STREAMS {
                let mut sender = attacker.clone().ready().await.unwrap();
                let request = grpc_request(&addr, "/grpc.health.v1.Health/Check");
                let (response, mut body) = sender.send_request(request, false).unwrap();
                // Queued in the client and pushed as fast as the server's flow control allows.
                let _ = body.send_data(frame.clone(), true);
                answers.push(tokio::spawn(async move {
                    let code = grpc_status(response).await;
                    drop(body);
                    code
                }));
            }
            let mut codes = Vec::new();
            for answer in answers {
                codes.push(answer.await.unwrap());
            }
            codes
        })
    };
    // Health keeps answering on another connection while the flood runs.
    let mut probes = 0;
    while !attack.is_finished() {
        let answered = tokio::time::timeout(Duration::from_secs(5), check(&mut prober)).await;
        assert_eq!(answered.expect("health answers in time").unwrap(), 1);
        probes += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let codes = tokio::time::timeout(Duration::from_secs(60), attack)
        .await
        .expect("the flood ends")
        .unwrap();
    assert_eq!(check(&mut prober).await.unwrap(), 1);
    let after = proc_kib(pid, "VmHWM:");
    let grown_mib = after.saturating_sub(before) / 1024;
    eprintln!(
        "server peak RSS {} MiB before, {} MiB after {STREAMS} x {} MB on one connection (+{grown_mib} MiB); {probes} health checks answered meanwhile",
        before / 1024,
        after / 1024,
        MESSAGE / 1_000_000,
    );
    assert!(grown_mib < 32, "the server grew by {grown_mib} MiB");
    // Every stream was answered, and refused unread: OUT_OF_RANGE (11).
    assert_eq!(codes.len(), STREAMS);
    assert!(codes.iter().all(|c| *c == Some(11)), "{codes:?}");
    server.child.kill().await.unwrap();
}

/// Reads until the server closes the connection (EOF or reset); the bytes it sent are ignored.
async fn closed_by_server(mut tcp: TcpStream) {
    let mut buf = [0u8; 1024];
    loop {
        match tcp.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

#[tokio::test]
async fn connections_without_a_handshake_are_closed_within_the_timeout() {
    let mut server = start(&[
        "--handshake-timeout",
        "1s",
        "--metrics-listen",
        "127.0.0.1:0",
    ])
    .await;
    let metrics = field(
        &wait_for_line(&mut server.lines, "metrics serving").await,
        "addr",
    );
    let started = tokio::time::Instant::now();
    let mut silent = Vec::new();
    for i in 0..100 {
        let mut tcp = TcpStream::connect(&server.addr).await.unwrap();
        if i % 10 == 0 {
            // Some begin the preface and stop halfway.
            tcp.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
        }
        silent.push(tokio::spawn(closed_by_server(tcp)));
    }
    for conn in silent {
        tokio::time::timeout(Duration::from_secs(10), conn)
            .await
            .expect("the server closes a silent connection")
            .unwrap();
    }
    assert!(started.elapsed() >= Duration::from_millis(900));
    // A real client is unaffected, also after the timeout.
    let mut client = health(&server.addr).await;
    tokio::time::sleep(Duration::from_millis(1500)).await; // idle past the timeout on purpose
    assert_eq!(check(&mut client).await.unwrap(), 1);
    wait_for_line(
        &mut server.lines,
        "no TLS handshake or HTTP/2 preface in time",
    )
    .await;
    let text = reqwest::get(format!("http://{metrics}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let timeouts: u64 = text
        .lines()
        .find(|l| l.starts_with("credential_limit_hits_total{limit=\"handshake_timeout\"}"))
        .and_then(|l| l.split_whitespace().last()?.parse().ok())
        .unwrap_or_else(|| panic!("no handshake_timeout count in\n{text}"));
    assert_eq!(timeouts, 100);
    server.child.kill().await.unwrap();
}

#[tokio::test]
async fn tls_connections_without_a_handshake_or_a_preface_are_closed_within_the_timeout() {
    use rcgen::{CertifiedKey, generate_simple_self_signed};
    use tokio_rustls::{
        TlsConnector,
        rustls::{ClientConfig, RootCertStore, pki_types::ServerName},
    };
    let dir = tempfile::tempdir().unwrap();
    let CertifiedKey { cert, signing_key } =
        generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let (cert_file, key_file) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_file, cert.pem()).unwrap();
    std::fs::write(&key_file, signing_key.serialize_pem()).unwrap();
    let mut server = start(&[
        "--handshake-timeout",
        "1s",
        "--tls-cert",
        cert_file.to_str().unwrap(),
        "--tls-key",
        key_file.to_str().unwrap(),
    ])
    .await;
    let mut roots = RootCertStore::empty();
    roots.add(cert.der().clone()).unwrap();
    let mut config = ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = TlsConnector::from(std::sync::Arc::new(config));

    let mut silent = Vec::new();
    for _ in 0..20 {
        // No TLS handshake at all.
        let tcp = TcpStream::connect(&server.addr).await.unwrap();
        silent.push(tokio::spawn(closed_by_server(tcp)));
    }
    for _ in 0..20 {
        // A complete TLS handshake, then no HTTP/2 preface.
        let tcp = TcpStream::connect(&server.addr).await.unwrap();
        let mut tls = connector
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .expect("the TLS handshake succeeds");
        silent.push(tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            while let Ok(n) = tls.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
        }));
    }
    for conn in silent {
        tokio::time::timeout(Duration::from_secs(10), conn)
            .await
            .expect("the server closes a silent TLS connection")
            .unwrap();
    }
    wait_for_line(
        &mut server.lines,
        "no TLS handshake or HTTP/2 preface in time",
    )
    .await;
    server.child.kill().await.unwrap();
}

/// CPU time (user + system) the process has used, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The fields after the command name, which is in parentheses.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[cfg(unix)]
#[tokio::test]
async fn out_of_file_descriptors_the_accept_loop_backs_off_instead_of_spinning() {
    let dir = tempfile::tempdir().unwrap();
    // The binary under a small open-files limit, as in a tight container.
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(r#"ulimit -n 64 && exec "$0" "$@""#)
        .arg(BIN)
        .args(
            service(dir.path(), &["--handshake-timeout", "60s"])
                .as_std()
                .get_args(),
        );
    cmd.env_clear()
        .env("EDGETAG_CLIENT_SECRET", "s3cret")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().unwrap();
    let pid = child.id().unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = field(
        &wait_for_line(&mut lines, "credential-service serving").await,
        "addr",
    );
    // Silent connections until the server runs out of descriptors (the backlog holds the rest).
    let mut silent = Vec::new();
    for _ in 0..100 {
        silent.push(TcpStream::connect(&addr).await.unwrap());
    }
    wait_for_line(&mut lines, "cannot accept connections; backing off").await;
    let before = cpu_ticks(pid);
    tokio::time::sleep(Duration::from_secs(2)).await; // measuring CPU use over time
    let used = cpu_ticks(pid) - before;
    eprintln!("out of descriptors: {used} ticks of CPU in 2 s");
    // Spinning would use about 200 ticks (two seconds of a core); backing off, a handful.
    assert!(
        used < 40,
        "{used} ticks of CPU in 2 s while out of descriptors"
    );
    drop(silent);
    wait_for_line(&mut lines, "accepting connections again").await;
    let mut client = health(&addr).await;
    assert_eq!(check(&mut client).await.unwrap(), 1);
    child.kill().await.unwrap();
}

#[tokio::test]
async fn past_the_connection_bound_a_connection_is_closed_at_once() {
    let mut server = start(&["--max-connections", "3"]).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(health(&server.addr).await);
    }
    for client in &mut held {
        assert_eq!(check(client).await.unwrap(), 1);
    }
    let extra = TcpStream::connect(&server.addr).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), closed_by_server(extra))
        .await
        .expect("the connection past the bound is closed at once");
    wait_for_line(&mut server.lines, "too many open (--max-connections").await;
    drop(held);
    // Places free up when connections close (the server sees the close a moment later).
    let mut client = within(async {
        loop {
            let mut client = health(&server.addr).await;
            if check(&mut client).await.is_ok() {
                break client;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert_eq!(check(&mut client).await.unwrap(), 1);
    server.child.kill().await.unwrap();
}

#[tokio::test]
async fn calls_past_the_in_flight_bound_are_refused_and_health_still_answers() {
    let mut server = start(&["--max-calls-in-flight", "2"]).await;
    // Three GetToken calls whose body never comes. A call is refused only while two others hold
    // both places, and these never end on their own: so once one of the three is refused, the
    // other two fill the bound until their bodies come.
    let (answers, mut bodies) =
        stalled_calls(&server.addr, "/credential.v1.CredentialService/GetToken", 3).await;
    let (refused, index, hanging) = within(futures::future::select_all(answers)).await;
    assert_eq!(refused, Some(Code::ResourceExhausted as i32));
    bodies.swap_remove(index); // select_all removes the finished future the same way
    let channel = Channel::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let get = || {
        let mut client = CredentialServiceClient::new(channel.clone());
        async move {
            client
                .get_token(GetTokenRequest {
                    account: "acme".into(),
                    min_validity: None,
                })
                .await
        }
    };
    let refused = within(get()).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("too many calls"), "{refused:?}");
    wait_for_line(&mut server.lines, "too many in flight").await;
    let mut prober = health(&server.addr).await;
    assert_eq!(within(check(&mut prober)).await.unwrap(), 1);

    // The hanging calls end (each answered): their places are free again.
    let message = GetTokenRequest {
        account: "acme".into(),
        min_validity: None,
    }
    .encode_to_vec();
    for (response, mut body) in hanging.into_iter().zip(bodies) {
        body.send_data(grpc_frame(&message), true).unwrap();
        let answered = within(response).await;
        assert_eq!(answered, Some(Code::NotFound as i32)); // never connected: but served
    }
    let answered = within(get()).await;
    assert_eq!(answered.unwrap_err().code(), Code::NotFound);
    server.child.kill().await.unwrap();
}

/// Without credentials, calls to the methods anyone may call (health, reflection) whose body
/// never comes fill only `--max-open-calls-in-flight`: a caller's GetToken is still served, and
/// health still answers. (They used to hold the places of `--max-calls-in-flight`, and so lock out
/// every caller.)
#[tokio::test]
async fn stalled_calls_without_credentials_do_not_lock_callers_out() {
    let dir = tempfile::tempdir().unwrap();
    let callers = dir.path().join("callers.toml");
    let digest = sha2::Sha256::digest(b"reader-token");
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    std::fs::write(
        &callers,
        format!(
            "[[caller]]\nname = \"billing\"\ntoken_sha256 = \"{hex}\"\nrole = \"reader\"\naccounts = [\"*\"]\n"
        ),
    )
    .unwrap();
    let mut server = start(&[
        "--max-calls-in-flight",
        "2",
        "--max-open-calls-in-flight",
        "2",
        "--callers-file",
        callers.to_str().unwrap(),
    ])
    .await;
    // Three health Watch calls, no credentials, whose request never ends: two hold the open
    // bound, and the third is refused.
    let (answers, bodies) = stalled_calls(&server.addr, "/grpc.health.v1.Health/Watch", 3).await;
    let (refused, _, _hanging) = within(futures::future::select_all(answers)).await;
    assert_eq!(refused, Some(Code::ResourceExhausted as i32));
    wait_for_line(
        &mut server.lines,
        "too many in flight (--max-open-calls-in-flight",
    )
    .await;

    let channel = Channel::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut request = tonic::Request::new(GetTokenRequest {
        account: "acme".into(),
        min_validity: None,
    });
    request
        .metadata_mut()
        .insert("authorization", "Bearer reader-token".parse().unwrap());
    let served = within(CredentialServiceClient::new(channel).get_token(request)).await;
    assert_eq!(
        served.unwrap_err().code(),
        Code::NotFound,
        "served (the account was never connected), not refused"
    );
    let mut prober = health(&server.addr).await;
    assert_eq!(within(check(&mut prober)).await.unwrap(), 1);
    drop(bodies);
    server.child.kill().await.unwrap();
}

/// Awaits `future`, failing the test instead of hanging it when the server never answers.
async fn within<F: Future>(future: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(30), future)
        .await
        .expect("the server answers within 30 s")
}

#[tokio::test]
async fn health_watches_are_capped_and_a_closed_one_frees_its_place() {
    let mut server = start(&["--max-health-watches", "2"]).await;
    let mut client = health(&server.addr).await;
    let watch = |mut client: HealthClient<Channel>| async move {
        client
            .watch(HealthCheckRequest {
                service: String::new(),
            })
            .await
    };
    let mut first = watch(client.clone()).await.unwrap().into_inner();
    let _second = watch(client.clone()).await.unwrap().into_inner();
    assert_eq!(first.message().await.unwrap().unwrap().status, 1);
    let refused = watch(client.clone()).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    wait_for_line(&mut server.lines, "too many open (--max-health-watches").await;
    assert_eq!(check(&mut client).await.unwrap(), 1);

    drop(first);
    // The server sees the stream's reset a moment later.
    let third = within(async {
        loop {
            match watch(client.clone()).await {
                Ok(stream) => break stream,
                Err(status) => {
                    assert_eq!(status.code(), Code::ResourceExhausted);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    })
    .await;
    drop(third);
    server.child.kill().await.unwrap();
}

/// Issue 10, finding 7: refusal lines are throttled, but their `hits` add up to the refusals: the
/// ones after a bound's last line are logged by the next flush (here, at shutdown), not dropped.
#[tokio::test]
async fn throttled_refusal_lines_account_for_every_refusal() {
    let mut server = start(&["--max-health-watches", "1"]).await;
    let mut client = health(&server.addr).await;
    let open = client
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();
    for _ in 0..5 {
        let refused = client
            .watch(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    }
    drop(open);
    terminate(&server.child).await;
    let mut hits = 0;
    let read = async {
        while let Some(line) = server.lines.next_line().await.unwrap() {
            if line.contains("too many open (--max-health-watches") {
                hits += field(&line, "hits").parse::<u64>().unwrap();
            }
            if line.contains(" stopped") {
                return;
            }
        }
        panic!("stderr ended before the service stopped");
    };
    within(read).await;
    assert_eq!(hits, 5, "the refusal lines' hits add up to the refusals");
}

/// An HTTP request that does not finish (here a callback whose code exchange EdgeTag never
/// answers; a client that never completes its request head does the same) holds up the shutdown,
/// and with it the audit's last counts and the refreshes' drain, only for a short grace period.
#[tokio::test]
async fn an_unfinished_http_request_does_not_hold_up_the_shutdown() {
    // An EdgeTag that takes token requests and never answers them.
    let edgetag = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let token_url = format!("http://{}/oauth/token", edgetag.local_addr().unwrap());
    let mut server = start(&[
        "--callback-listen",
        "127.0.0.1:0",
        "--token-url",
        &token_url,
        "--upstream-timeout",
        "10m",
    ])
    .await;
    let callback = field(
        &wait_for_line(&mut server.lines, "browser callback serving").await,
        "addr",
    );
    let mut client = CredentialServiceClient::connect(format!("http://{}", server.addr))
        .await
        .unwrap();
    let begun = client
        .begin_auth(credential_service::proto::BeginAuthRequest {
            account: "acme".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let state: String = url::form_urlencoded::byte_serialize(begun.state.as_bytes()).collect();
    let page = tokio::spawn(reqwest::get(format!(
        "http://{callback}/oauth/callback?code=c&state={state}"
    )));
    // The exchange has reached EdgeTag: the callback request is in flight.
    let (_exchange, _) = within(edgetag.accept()).await.unwrap();

    terminate(&server.child).await;
    wait_for_line(
        &mut server.lines,
        "HTTP connections still open after the grace period",
    )
    .await;
    wait_for_line(&mut server.lines, " stopped").await;
    let status = within(server.child.wait()).await.unwrap();
    assert_eq!(status.code(), Some(0));
    page.abort();
}

#[cfg(unix)]
#[tokio::test]
async fn secret_files_open_to_others_are_named_with_their_mode_at_start() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("client-secret");
    std::fs::write(&secret, "s3cret-from-file\n").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    let key = dir.path().join("encryption.key");
    credential_service::sealing::create_key_file(&key).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
    let rcgen::CertifiedKey { cert, signing_key } =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let (tls_cert, tls_key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&tls_cert, cert.pem()).unwrap();
    std::fs::write(&tls_key, signing_key.serialize_pem()).unwrap();
    std::fs::set_permissions(&tls_key, std::fs::Permissions::from_mode(0o604)).unwrap();
    let start = || {
        service(dir.path(), &[])
            .env_remove("EDGETAG_CLIENT_SECRET")
            .arg("--client-secret-file")
            .arg(&secret)
            .arg("--encryption-key-file")
            .arg(&key)
            .arg("--tls-cert")
            .arg(&tls_cert)
            .arg("--tls-key")
            .arg(&tls_key)
            .spawn()
            .unwrap()
    };

    let mut child = start();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    let serving = async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains("credential-service serving") {
                return;
            }
            seen.push(line);
        }
        panic!("the service stopped");
    };
    tokio::time::timeout(Duration::from_secs(30), serving)
        .await
        .unwrap();
    let warning = |file: &Path| {
        seen.iter()
            .filter(|l| l.contains("WARN") && l.contains(&*file.to_string_lossy()))
            .cloned()
            .collect::<Vec<_>>()
    };
    let secret_lines = warning(&secret);
    assert_eq!(secret_lines.len(), 1, "{seen:#?}");
    assert!(
        secret_lines[0].contains("client secret file") && secret_lines[0].contains("0644"),
        "{secret_lines:?}"
    );
    let key_lines = warning(&key);
    assert_eq!(key_lines.len(), 1, "{seen:#?}");
    assert!(
        key_lines[0].contains("encryption key file") && key_lines[0].contains("0640"),
        "{key_lines:?}"
    );
    let tls_key_lines = warning(&tls_key);
    assert_eq!(tls_key_lines.len(), 1, "{seen:#?}");
    assert!(
        tls_key_lines[0].contains("TLS key file") && tls_key_lines[0].contains("0604"),
        "{tls_key_lines:?}"
    );
    assert!(!seen.iter().any(|l| l.contains("s3cret-from-file")));

    // Mode 0600: no warning.
    for file in [&secret, &key, &tls_key] {
        std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    child.kill().await.unwrap();
    let _ = child.wait().await;
    let mut child = start();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let quiet = async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains("credential-service serving") {
                return;
            }
            assert!(!line.contains("open to group or others"), "{line}");
        }
        panic!("the service stopped");
    };
    tokio::time::timeout(Duration::from_secs(30), quiet)
        .await
        .unwrap();
    child.kill().await.unwrap();
}
