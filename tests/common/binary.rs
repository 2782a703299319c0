//! The real binary in front of the fake EdgeTag, started as an operator would: a client secret
//! file, a callers file (an admin and a reader), an encryption key file, `--listen` on a port the
//! system picks. For what only a process shows: signals, exit codes, resource limits. A module of
//! the service's own test binaries only (`CARGO_BIN_EXE_*` exists there), beside `common`.

use std::{
    net::SocketAddr,
    process::{ExitStatus, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use credential_service::proto::{
    BeginAuthRequest, CompleteAuthRequest, GetTokenRequest, GetTokenResponse,
    credential_service_client::CredentialServiceClient,
};
use fake_edgetag::{FakeConfig, FakeEdgeTag};
use sha2::{Digest, Sha256};
use tempfile::TempDir;
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
    sync::watch,
};
use tonic::{Request, Status, transport::Channel};

use crate::common::REDIRECT_URI;

pub const BIN: &str = env!("CARGO_BIN_EXE_credential-service");
pub const ADMIN_TOKEN: &str = "binary-admin-token";
pub const READER_TOKEN: &str = "binary-reader-token";
/// How long a test waits for the service to show what it awaits.
const DEADLINE: Duration = Duration::from_secs(30);

/// Every line the service writes to stderr, kept, with a watch that ticks on each new one.
#[derive(Clone)]
pub struct Log {
    lines: Arc<Mutex<Vec<String>>>,
    added: watch::Sender<usize>,
}

impl Log {
    pub fn follow(child: &mut Child) -> Self {
        let log = Self {
            lines: Arc::default(),
            added: watch::channel(0).0,
        };
        let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
        let following = log.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = stderr.next_line().await {
                following.lines.lock().unwrap().push(line);
                following.added.send_modify(|n| *n += 1);
            }
        });
        log
    }

    /// The lines so far that hold every needle.
    pub fn matching(&self, needles: &[&str]) -> Vec<String> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| needles.iter().all(|n| l.contains(n)))
            .cloned()
            .collect()
    }

    /// Everything written so far.
    pub fn text(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// The first line holding every needle, once it is there.
    pub async fn wait_for(&self, needles: &[&str]) -> String {
        let mut added = self.added.subscribe();
        let found = tokio::time::timeout(DEADLINE, async {
            loop {
                if let Some(line) = self.matching(needles).into_iter().next() {
                    return line;
                }
                added.changed().await.expect("the log is followed");
            }
        })
        .await;
        found.unwrap_or_else(|_| panic!("no line with {needles:?} in\n{}", self.text()))
    }
}

/// One running service process, its fake EdgeTag and its files.
pub struct Binary {
    /// Killed when dropped.
    child: Child,
    pub addr: SocketAddr,
    metrics: Option<String>,
    pub log: Log,
    pub fake: FakeEdgeTag,
    /// Its files, removed when dropped.
    _dir: TempDir,
}

impl Binary {
    /// Starts the binary with its files in `dir` (a `callers.toml` there is kept, else one with
    /// [`write_callers`]'s admin and reader) and `args` added, `adjust` applied to the command
    /// last (limits, environment); returns once it serves.
    pub async fn start_with(
        dir: TempDir,
        args: &[&str],
        adjust: impl FnOnce(&mut Command),
    ) -> Self {
        let fake = FakeEdgeTag::start(FakeConfig {
            redirect_uris: vec![REDIRECT_URI.to_owned()],
            ..FakeConfig::default()
        })
        .await
        .unwrap();
        let secret = dir.path().join("client-secret");
        std::fs::write(&secret, fake.client_secret()).unwrap();
        let callers = dir.path().join("callers.toml");
        if !callers.exists() {
            write_callers(&callers, &[]);
        }
        let key = dir.path().join("encryption.key");
        if !key.exists() {
            credential_service::sealing::create_key_file(&key).unwrap();
        }
        let mut command = Command::new(BIN);
        command
            .args(["--listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--encryption-key-file")
            .arg(&key)
            .arg("--client-secret-file")
            .arg(&secret)
            .arg("--callers-file")
            .arg(&callers)
            .args([
                "--client-id",
                fake.client_id(),
                "--redirect-uri",
                REDIRECT_URI,
            ])
            .args(["--authorize-url", &fake.authorize_url()])
            .args(["--token-url", &fake.token_url()])
            .args(["--revoke-url", &fake.revoke_url()])
            .args(args)
            .env_clear()
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        adjust(&mut command);
        let mut child = command.spawn().unwrap();
        let log = Log::follow(&mut child);
        let addr_in = |line: &str| {
            line.split(" addr=")
                .nth(1)
                .map(|a| a.split_whitespace().next().unwrap().to_owned())
        };
        let serving = log.wait_for(&["credential-service serving"]).await;
        let addr = addr_in(&serving).unwrap().parse().unwrap();
        let metrics = match args.contains(&"--metrics-listen") {
            true => addr_in(&log.wait_for(&["metrics serving"]).await),
            false => None,
        };
        Self {
            child,
            addr,
            metrics,
            log,
            fake,
            _dir: dir,
        }
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    /// Connects `account` (BeginAuth, approval, CompleteAuth) as the admin over `channel`.
    pub async fn connect_account(&self, channel: Channel, account: &str) {
        let mut client = CredentialServiceClient::new(channel);
        let begun = client
            .begin_auth(with_token(
                BeginAuthRequest {
                    account: account.into(),
                },
                ADMIN_TOKEN,
            ))
            .await
            .unwrap()
            .into_inner();
        let redirect = self.fake.approve(&begun.authorize_url).await.unwrap();
        client
            .complete_auth(with_token(
                CompleteAuthRequest {
                    code: redirect.code,
                    state: redirect.state,
                },
                ADMIN_TOKEN,
            ))
            .await
            .unwrap();
    }

    /// GetToken as the reader, over `channel`.
    pub async fn get_token(channel: &Channel, account: &str) -> Result<GetTokenResponse, Status> {
        CredentialServiceClient::new(channel.clone())
            .get_token(with_token(
                GetTokenRequest {
                    account: account.into(),
                    min_validity: None,
                },
                READER_TOKEN,
            ))
            .await
            .map(tonic::Response::into_inner)
    }

    /// The process id, as an operator's `pgrep` finds it.
    pub fn pid(&self) -> u32 {
        self.child.id().unwrap()
    }

    /// Sends `signal` (`HUP`, `TERM`, ...) as `kill` does.
    pub async fn signal(&self, signal: &str) {
        let sent = Command::new("kill")
            .args([&format!("-{signal}"), &self.pid().to_string()])
            .status()
            .await
            .unwrap();
        assert!(sent.success(), "kill -{signal}");
    }

    /// SIGTERM, then the exit status once it has stopped.
    pub async fn stop(mut self) -> ExitStatus {
        self.signal("TERM").await;
        tokio::time::timeout(DEADLINE, self.child.wait())
            .await
            .expect("the service stops")
            .unwrap()
    }

    /// The first sample of metric `name` on `/metrics` (needs `--metrics-listen`).
    pub async fn metric(&self, name: &str) -> Option<f64> {
        let url = format!("http://{}/metrics", self.metrics.as_ref().unwrap());
        let text = reqwest::get(url).await.unwrap().text().await.unwrap();
        text.lines()
            .find(|l| l.split([' ', '{']).next() == Some(name))
            .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
    }
}

/// A callers file with the admin and reader tokens, and a reader per `tls_san` in `sans`.
pub fn write_callers(path: &std::path::Path, sans: &[&str]) {
    let hash = |token: &str| hex::encode(Sha256::digest(token.as_bytes()));
    let mut toml = format!(
        "[[caller]]\nname = \"admin\"\ntoken_sha256 = \"{}\"\nrole = \"admin\"\naccounts = [\"*\"]\n\n\
         [[caller]]\nname = \"reader\"\ntoken_sha256 = \"{}\"\nrole = \"reader\"\naccounts = [\"*\"]\n\n",
        hash(ADMIN_TOKEN),
        hash(READER_TOKEN)
    );
    for san in sans {
        toml += &format!(
            "[[caller]]\nname = \"{san}\"\ntls_san = \"{san}\"\nrole = \"reader\"\naccounts = [\"*\"]\n\n"
        );
    }
    std::fs::write(path, toml).unwrap();
}

pub fn with_token<T>(message: T, token: &str) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

/// Waits until `check` holds, polling an observable condition the service offers no event for.
pub async fn until<F: std::future::Future<Output = bool>>(
    what: &str,
    mut check: impl FnMut() -> F,
) {
    let reached = tokio::time::timeout(DEADLINE, async {
        while !check().await {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(reached.is_ok(), "{what} within {DEADLINE:?}");
}
