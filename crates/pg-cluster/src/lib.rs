//! A private, real PostgreSQL cluster for the tests.
//!
//! # Why
//! The PostgreSQL store is only tested for real against a real server: row locks, `LISTEN`/`NOTIFY`,
//! fsync'd commits, a server that goes away and comes back. No test may depend on a PostgreSQL that
//! someone else started, so the tests start their own: `initdb` into a fresh temporary directory,
//! `postgres` on a free loopback port with `fsync=on`, and a fresh database per test. The postmaster
//! never outlives the test process (a parent-death signal), an owned [`Cluster`] is shut down and
//! removed when dropped, and the directories of test processes that died are swept away by the next
//! start.
//!
//! # How tests use it
//! ```no_run
//! let cluster = pg_cluster::Cluster::shared(); // one per test binary, started on first use
//! let db = cluster.create_database(); // a fresh, empty database for this test
//! // Start the service with `--store <db.url()> --store-password-file <cluster.password_file()>`.
//! # let _ = (db.url(), cluster.password_file());
//! ```
//! A test that stops and restarts PostgreSQL takes a cluster of its own with [`Cluster::start`] and
//! calls [`Cluster::stop`] and [`Cluster::start_again`]; both need `&mut`, so nobody can stop the
//! shared cluster under other tests.
//!
//! The API is synchronous and blocks the calling thread: about a second for the first
//! [`Cluster::shared`] or any [`Cluster::start`] (initdb and start-up), milliseconds for
//! [`Cluster::create_database`]. It talks to the server from a helper thread with a runtime of its
//! own, so it may be called from `#[tokio::test]` code; call it at the start of the test, before
//! spawning tasks that need the test's runtime thread.
//!
//! # Requirements
//! PostgreSQL's server binaries (14 or newer): `apt-get install postgresql` (`.ci/run` does it). They
//! are found with `pg_config --bindir`, else in the newest `/usr/lib/postgresql/<N>/bin`. `initdb` and
//! `postgres` refuse to run as root, so when the tests run as root (as in CI) they run as the
//! `postgres` system user that the Debian package creates.

use std::collections::VecDeque;
use std::fmt;
use std::fs;
use std::io::{self, BufRead, BufReader, Write};
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, chown};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock, mpsc};
use std::thread;
use std::time::Duration;

use rustix::process::{Pid, Signal};

/// How long start-up (after initdb) may take before the cluster counts as broken.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a fast shutdown may take before the postmaster is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// The superuser that initdb creates and the tests connect as.
const SUPERUSER: &str = "postgres";
/// The system user that runs the server when the tests run as root.
const SYSTEM_USER: &str = "postgres";
/// Cluster directories are `<temp dir>/pg-cluster-<pid>-<n>`, so stale ones can be told apart.
const DIR_PREFIX: &str = "pg-cluster-";
/// Server log lines kept for the message when the server fails to start or dies.
const LOG_TAIL: usize = 50;
/// How often start-up picks another port when the free one was taken before the server bound it.
const PORT_ATTEMPTS: usize = 5;
const INSTALL_HINT: &str =
    "install the PostgreSQL server: `apt-get install postgresql` (.ci/run does it)";

/// A PostgreSQL cluster of the test process's own: its data directory, its postmaster, its port.
pub struct Cluster {
    bin_dir: PathBuf,
    dir: PathBuf,
    data_dir: PathBuf,
    password: String,
    password_file: PathBuf,
    port: u16,
    run_as: Option<SystemUser>,
    settings: Vec<String>,
    postmaster: Option<Postmaster>,
}

/// A fresh database in a [`Cluster`], for one test.
#[derive(Debug, Clone)]
pub struct Database {
    name: String,
    url: String,
    // Its `Debug` redacts the password.
    config: tokio_postgres::Config,
}

#[derive(Debug, Clone, Copy)]
struct SystemUser {
    uid: u32,
    gid: u32,
}

/// A running postmaster, watched by the thread that spawned it (see [`supervise`]).
struct Postmaster {
    pid: Pid,
    // In a mutex only so that `Cluster` is `Sync` (for `Cluster::shared`).
    events: Mutex<mpsc::Receiver<Event>>,
}

enum Event {
    Ready,
    Exited {
        status: io::Result<ExitStatus>,
        log: String,
    },
}

enum StartFailure {
    PortTaken(String),
    Other(String),
}

impl Cluster {
    /// Starts a cluster owned by the caller, for tests that stop and restart PostgreSQL. Dropping
    /// it shuts the server down and removes its directory.
    ///
    /// # Panics
    /// If the server binaries are missing or the server does not start; the message says why.
    pub fn start() -> Cluster {
        Self::start_with(None)
    }

    /// Like [`Cluster::start`], with TLS on (`ssl=on`) using the given PEM certificate chain and
    /// key; clients may still connect without TLS unless they ask for it (`sslmode=require`).
    pub fn start_with_tls(cert_pem: &str, key_pem: &str) -> Cluster {
        Self::start_with(Some((cert_pem, key_pem)))
    }

    /// The cluster shared by all tests of this test binary, started on first use. It is never
    /// stopped by the tests; its postmaster dies with the test process.
    pub fn shared() -> &'static Cluster {
        static SHARED: OnceLock<Cluster> = OnceLock::new();
        SHARED.get_or_init(Cluster::start)
    }

    fn start_with(tls: Option<(&str, &str)>) -> Cluster {
        let bin_dir = find_bin_dir().unwrap_or_else(|| {
            panic!("no PostgreSQL server binaries (initdb, postgres) found; {INSTALL_HINT}")
        });
        let run_as = if rustix::process::geteuid().is_root() {
            Some(system_user(SYSTEM_USER).unwrap_or_else(|| {
                panic!(
                    "the tests run as root, which initdb and postgres refuse, and there is no \
                     `{SYSTEM_USER}` system user to run them as; {INSTALL_HINT}"
                )
            }))
        } else {
            None
        };
        let dir = create_cluster_dir(run_as);
        let password = hex_password();
        let password_file = dir.join("password");
        // From here on, dropping `cluster` (also by a panic) removes the directory.
        let mut cluster = Cluster {
            data_dir: dir.join("data"),
            password_file,
            bin_dir,
            dir,
            password,
            port: 0,
            run_as,
            settings: Vec::new(),
            postmaster: None,
        };
        cluster.write_private_file(&cluster.password_file, cluster.password.as_bytes());
        if let Some((cert, key)) = tls {
            let cert_file = cluster.dir.join("server.crt");
            let key_file = cluster.dir.join("server.key");
            cluster.write_private_file(&cert_file, cert.as_bytes());
            cluster.write_private_file(&key_file, key.as_bytes());
            cluster.settings.extend([
                "ssl=on".to_owned(),
                format!("ssl_cert_file={}", cert_file.display()),
                format!("ssl_key_file={}", key_file.display()),
            ]);
        }
        cluster.initdb();

        let mut last = String::new();
        for _ in 0..PORT_ATTEMPTS {
            cluster.port = free_port();
            match cluster.spawn_postmaster() {
                Ok(postmaster) => {
                    cluster.postmaster = Some(postmaster);
                    return cluster;
                }
                Err(StartFailure::PortTaken(log)) => last = log,
                Err(StartFailure::Other(why)) => panic!("PostgreSQL did not start: {why}"),
            }
        }
        panic!(
            "PostgreSQL did not start: {PORT_ATTEMPTS} free ports were taken first; last log:\n{last}"
        )
    }

    /// Creates a fresh, empty database with a name unique in this process.
    ///
    /// # Panics
    /// If the server refuses; the message has the server's error.
    pub fn create_database(&self) -> Database {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let name = format!("test_{}", NEXT.fetch_add(1, Ordering::Relaxed));
        self.execute(&format!("CREATE DATABASE {name}"))
            .unwrap_or_else(|e| panic!("CREATE DATABASE {name} failed: {}", chain(&e)));
        let mut config = self.config();
        config.dbname(&name);
        Database {
            url: format!("postgres://{SUPERUSER}@127.0.0.1:{}/{name}", self.port),
            name,
            config,
        }
    }

    /// The superuser's password (the URLs carry none).
    pub fn password(&self) -> &str {
        &self.password
    }

    /// A file (mode 0600) holding just the password, for `--store-password-file`.
    pub fn password_file(&self) -> &Path {
        &self.password_file
    }

    /// The loopback TCP port the server listens on; it stays the same across [`Cluster::stop`] and
    /// [`Cluster::start_again`].
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Shuts the server down (fast shutdown: open sessions are cut) and returns once it has exited
    /// and its port is closed. Does nothing if it is already stopped.
    ///
    /// # Panics
    /// If the server had already died, or does not stop even when killed.
    pub fn stop(&mut self) {
        if let Some(postmaster) = self.postmaster.take()
            && let Err(why) = postmaster.shut_down(Signal::INT)
        {
            panic!("PostgreSQL did not stop cleanly: {why}");
        }
    }

    /// Starts the stopped server again on the same data and port, and returns once it accepts
    /// connections. Does nothing if it is running.
    ///
    /// # Panics
    /// If it does not start, e.g. because another process took the port meanwhile.
    pub fn start_again(&mut self) {
        if self.postmaster.is_some() {
            return;
        }
        match self.spawn_postmaster() {
            Ok(postmaster) => self.postmaster = Some(postmaster),
            Err(StartFailure::PortTaken(log)) => {
                panic!(
                    "PostgreSQL did not start again: port {} was taken meanwhile:\n{log}",
                    self.port
                )
            }
            Err(StartFailure::Other(why)) => panic!("PostgreSQL did not start again: {why}"),
        }
    }

    /// A client configuration for the `postgres` database as the superuser, password included.
    fn config(&self) -> tokio_postgres::Config {
        let mut config = tokio_postgres::Config::new();
        config
            .host("127.0.0.1")
            .port(self.port)
            .user(SUPERUSER)
            .password(&self.password)
            .dbname("postgres")
            .connect_timeout(Duration::from_secs(10));
        config
    }

    /// Runs `sql` as the superuser, on a helper thread with its own runtime, so that it works the
    /// same from plain and from async tests (a runtime may not be entered from inside another).
    fn execute(&self, sql: &str) -> Result<(), tokio_postgres::Error> {
        let mut config = self.config();
        // Not waiting for the WAL flush of set-up statements saves a few hundred milliseconds per
        // database; the server and the tests' own sessions keep fsync and synchronous commits.
        config.options("-c synchronous_commit=off");
        thread::scope(|scope| {
            scope
                .spawn(|| {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("a current-thread tokio runtime");
                    runtime.block_on(async {
                        let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
                        let connection = tokio::spawn(connection);
                        client.batch_execute(sql).await?;
                        drop(client);
                        let _ = connection.await;
                        Ok(())
                    })
                })
                .join()
                .expect("the pg-cluster helper thread panicked")
        })
    }

    /// A command for one of the server binaries, run as the system user when we are root.
    fn command(&self, binary: &str) -> Command {
        let mut command = Command::new(self.bin_dir.join(binary));
        command
            .current_dir(&self.dir)
            .env("LC_ALL", "C")
            .stdin(Stdio::null());
        if let Some(user) = self.run_as {
            command.uid(user.uid).gid(user.gid);
        }
        command
    }

    fn initdb(&self) {
        let output = self
            .command("initdb")
            .arg("--pgdata")
            .arg(&self.data_dir)
            .arg("--username")
            .arg(SUPERUSER)
            .arg("--pwfile")
            .arg(&self.password_file)
            .args([
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--encoding=UTF8",
                "--locale=C",
                "--no-instructions",
                // Only initdb's final flush of the fresh files to disk: the directory is thrown
                // away after the test. The server itself runs with fsync on.
                "--no-sync",
            ])
            .output()
            .unwrap_or_else(|e| {
                panic!(
                    "could not run {}: {e}",
                    self.bin_dir.join("initdb").display()
                )
            });
        if !output.status.success() {
            panic!(
                "initdb failed ({}):\n{}{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }

    /// Starts the postmaster on `self.port` and waits until it accepts connections.
    fn spawn_postmaster(&self) -> Result<Postmaster, StartFailure> {
        let mut command = self.command("postgres");
        command
            .arg("-D")
            .arg(&self.data_dir)
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-c")
            .arg(format!("unix_socket_directories={}", self.dir.display()));
        let fixed = [
            "listen_addresses=127.0.0.1",
            "fsync=on",
            "max_connections=300",
            // Small, so that one cluster per test binary, all at once, fits in memory.
            "shared_buffers=32MB",
            "huge_pages=off",
            "lc_messages=C",
        ];
        for setting in fixed
            .iter()
            .copied()
            .chain(self.settings.iter().map(String::as_str))
        {
            command.arg("-c").arg(setting);
        }
        command.stdout(Stdio::null()).stderr(Stdio::piped());
        die_with_parent(&mut command);

        let (spawned_tx, spawned_rx) = mpsc::channel();
        let (events_tx, events_rx) = mpsc::channel();
        thread::Builder::new()
            .name(format!("pg-cluster-{}", self.port))
            .spawn(move || supervise(command, spawned_tx, events_tx))
            .map_err(|e| StartFailure::Other(format!("could not start a thread: {e}")))?;
        let pid = match spawned_rx.recv() {
            Ok(Ok(pid)) => pid,
            Ok(Err(e)) => {
                return Err(StartFailure::Other(format!(
                    "could not run {}: {e}",
                    self.bin_dir.join("postgres").display()
                )));
            }
            Err(_) => return Err(StartFailure::Other("its supervisor thread died".into())),
        };
        let postmaster = Postmaster {
            pid,
            events: Mutex::new(events_rx),
        };
        match postmaster.next_event(READY_TIMEOUT) {
            Ok(Event::Ready) => Ok(postmaster),
            Ok(Event::Exited { status, log }) => {
                let why = format!("it exited ({}):\n{log}", describe(&status));
                // Another process bound the port between our probe and the server's bind.
                if log.contains("could not create any TCP/IP sockets") {
                    Err(StartFailure::PortTaken(why))
                } else {
                    Err(StartFailure::Other(why))
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let outcome = postmaster.kill();
                Err(StartFailure::Other(format!(
                    "not ready after {READY_TIMEOUT:?}; killed it: {outcome}"
                )))
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                Err(StartFailure::Other("its supervisor thread died".into()))
            }
        }
    }

    /// Writes a file only the server's user may read (PostgreSQL insists on that for keys).
    fn write_private_file(&self, path: &Path, contents: &[u8]) {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .and_then(|mut file| file.write_all(contents).map(|()| file))
            .unwrap_or_else(|e| panic!("could not write {}: {e}", path.display()));
        file.flush().ok();
        if let Some(user) = self.run_as {
            chown(path, Some(user.uid), Some(user.gid))
                .unwrap_or_else(|e| panic!("could not chown {}: {e}", path.display()));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Immediate shutdown: the data is thrown away, so the shutdown checkpoint would be wasted.
        if let Some(postmaster) = self.postmaster.take() {
            let _ = postmaster.shut_down(Signal::QUIT);
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

impl fmt::Debug for Cluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cluster")
            .field("dir", &self.dir)
            .field("port", &self.port)
            .field("running", &self.postmaster.is_some())
            .finish_non_exhaustive()
    }
}

impl Database {
    /// `postgres://postgres@127.0.0.1:<port>/<name>`, without the password (see
    /// [`Cluster::password_file`]).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Connects as the superuser (password over TCP), for tests that look at or change rows
    /// directly. The connection is driven by a task on the current tokio runtime.
    ///
    /// # Panics
    /// If the connection fails.
    pub async fn connect(&self) -> tokio_postgres::Client {
        let (client, connection) = self
            .config
            .connect(tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("could not connect to {}: {}", self.url, chain(&e)));
        tokio::spawn(connection);
        client
    }
}

impl Postmaster {
    fn next_event(&self, timeout: Duration) -> Result<Event, mpsc::RecvTimeoutError> {
        let events = self
            .events
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        events.recv_timeout(timeout)
    }

    /// Shuts down with `signal` (SIGINT: fast, SIGQUIT: immediate) and waits; killed if it takes
    /// too long.
    fn shut_down(self, signal: Signal) -> Result<(), String> {
        if let Err(e) = rustix::process::kill_process(self.pid, signal) {
            return Err(format!("could not signal it: {e}"));
        }
        match self.next_event(STOP_TIMEOUT) {
            Ok(Event::Exited {
                status: Ok(status), ..
            }) if status.success() => Ok(()),
            Ok(Event::Exited { status, log }) => {
                Err(format!("it exited ({}):\n{log}", describe(&status)))
            }
            Ok(Event::Ready) => Err("it reported ready twice".into()),
            Err(_) => Err(format!(
                "it did not stop within {STOP_TIMEOUT:?}: {}",
                self.kill()
            )),
        }
    }

    /// SIGKILL and wait; says how it went.
    fn kill(self) -> String {
        let _ = rustix::process::kill_process(self.pid, Signal::KILL);
        loop {
            match self.next_event(STOP_TIMEOUT) {
                Ok(Event::Ready) => continue,
                Ok(Event::Exited { log, .. }) => return format!("log:\n{log}"),
                Err(_) => return "it did not exit even after SIGKILL".into(),
            }
        }
    }
}

/// Runs on the thread that owns the postmaster for its whole life: spawns it, reports its pid,
/// reports when it accepts connections, drains its log (a full pipe would block the server) and
/// reports its exit. Living exactly as long as the postmaster matters: the parent-death signal is
/// tied to the spawning *thread*, not to the process.
fn supervise(
    mut command: Command,
    spawned: mpsc::Sender<io::Result<Pid>>,
    events: mpsc::Sender<Event>,
) {
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            let _ = spawned.send(Err(e));
            return;
        }
    };
    let pid = Pid::from_raw(child.id() as i32).expect("a child's pid is positive");
    let _ = spawned.send(Ok(pid));
    let mut tail = VecDeque::with_capacity(LOG_TAIL);
    if let Some(stderr) = child.stderr.take() {
        for line in BufReader::new(stderr).split(b'\n') {
            let Ok(line) = line else { break };
            let line = String::from_utf8_lossy(&line).into_owned();
            if line.contains("database system is ready to accept connections") {
                let _ = events.send(Event::Ready);
            }
            if tail.len() == LOG_TAIL {
                tail.pop_front();
            }
            tail.push_back(line);
        }
    }
    let status = child.wait();
    let log = Vec::from(tail).join("\n");
    let _ = events.send(Event::Exited { status, log });
}

/// The postmaster gets SIGQUIT (immediate shutdown) when the thread that spawned it ends, which
/// for the shared cluster is when the test process ends, however it ends.
fn die_with_parent(command: &mut Command) {
    #[cfg(target_os = "linux")]
    // SAFETY: the closure makes one raw prctl system call, which is async-signal-safe. It runs
    // after std's setgid/setuid, which would otherwise clear the setting.
    unsafe {
        command.pre_exec(|| {
            rustix::process::set_parent_process_death_signal(Some(Signal::QUIT))?;
            Ok(())
        });
    }
    #[cfg(not(target_os = "linux"))]
    let _ = command;
}

/// An error with its causes: tokio-postgres's own message is only the kind ("db error").
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn describe(status: &io::Result<ExitStatus>) -> String {
    match status {
        Ok(status) => status.to_string(),
        Err(e) => format!("wait failed: {e}"),
    }
}

/// `pg_config --bindir` if it has the server, else the newest `/usr/lib/postgresql/<N>/bin`.
fn find_bin_dir() -> Option<PathBuf> {
    let has_server = |dir: &Path| dir.join("initdb").is_file() && dir.join("postgres").is_file();
    let from_pg_config = Command::new("pg_config")
        .arg("--bindir")
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|output| output.status.success())
        .map(|output| PathBuf::from(String::from_utf8_lossy(&output.stdout).trim()));
    if let Some(dir) = from_pg_config.filter(|dir| has_server(dir)) {
        return Some(dir);
    }
    fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|entry| {
            let version: u32 = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            has_server(&bin).then_some((version, bin))
        })
        .max_by_key(|(version, _)| *version)
        .map(|(_, bin)| bin)
}

/// The uid and gid of a system user, from `/etc/passwd` (where the Debian package puts it).
fn system_user(name: &str) -> Option<SystemUser> {
    let passwd = fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        if fields.next()? != name {
            return None;
        }
        let _password = fields.next()?;
        Some(SystemUser {
            uid: fields.next()?.parse().ok()?,
            gid: fields.next()?.parse().ok()?,
        })
    })
}

/// Creates `<temp dir>/pg-cluster-<pid>-<n>` (owned by the server's user, mode 0700), after
/// removing the directories of test processes that no longer exist.
fn create_cluster_dir(run_as: Option<SystemUser>) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let temp = std::env::temp_dir();
    remove_stale_dirs(&temp);
    let dir = temp.join(format!(
        "{DIR_PREFIX}{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    // Left behind by an earlier process with our pid: ours now.
    let _ = fs::remove_dir_all(&dir);
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .unwrap_or_else(|e| panic!("could not create {}: {e}", dir.display()));
    if let Some(user) = run_as {
        chown(&dir, Some(user.uid), Some(user.gid))
            .unwrap_or_else(|e| panic!("could not chown {}: {e}", dir.display()));
    }
    dir
}

fn remove_stale_dirs(temp: &Path) {
    let Ok(entries) = fs::read_dir(temp) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|name| name.strip_prefix(DIR_PREFIX))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<i32>().ok())
        else {
            continue;
        };
        let gone = match Pid::from_raw(pid) {
            None => true,
            Some(pid) => matches!(
                rustix::process::test_kill_process(pid),
                Err(rustix::io::Errno::SRCH)
            ),
        };
        if gone {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// A port that was free a moment ago; start-up retries if someone takes it first.
fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .unwrap_or_else(|e| panic!("could not bind a loopback port: {e}"))
}

fn hex_password() -> String {
    let bytes: [u8; 16] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::net::TcpStream;
    use std::os::unix::fs::PermissionsExt;

    async fn connect(
        db: &Database,
        password: &str,
    ) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let mut config = db.config.clone();
        config.password(password);
        let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        Ok(client)
    }

    async fn notes(client: &tokio_postgres::Client) -> Vec<String> {
        client
            .query("SELECT body FROM notes ORDER BY body", &[])
            .await
            .expect("select")
            .iter()
            .map(|row| row.get(0))
            .collect()
    }

    #[tokio::test]
    async fn databases_are_separate_need_the_password_and_survive_a_restart() {
        let mut cluster = Cluster::start();
        let port = cluster.port();
        let (a, b) = (cluster.create_database(), cluster.create_database());
        assert_ne!(a.name(), b.name());
        assert_eq!(
            a.url(),
            format!("postgres://postgres@127.0.0.1:{port}/{}", a.name())
        );
        assert!(!a.url().contains(cluster.password()));

        for (db, body) in [(&a, "in a"), (&b, "in b")] {
            let client = db.connect().await;
            client
                .batch_execute("CREATE TABLE notes (body text NOT NULL)")
                .await
                .expect("create table");
            client
                .execute("INSERT INTO notes VALUES ($1)", &[&body])
                .await
                .expect("insert");
        }
        assert_eq!(notes(&a.connect().await).await, ["in a"]);
        assert_eq!(notes(&b.connect().await).await, ["in b"]);
        let Err(refused) = connect(&a, "not the password").await else {
            panic!("a wrong password was accepted");
        };
        assert_eq!(
            refused.code(),
            Some(&tokio_postgres::error::SqlState::INVALID_PASSWORD),
            "{}",
            chain(&refused)
        );

        let open = a.connect().await;
        cluster.stop();
        assert!(
            TcpStream::connect(("127.0.0.1", port)).is_err(),
            "the port is closed once stopped"
        );
        assert!(
            open.simple_query("SELECT 1").await.is_err(),
            "sessions end with the server"
        );

        cluster.start_again();
        assert_eq!(cluster.port(), port);
        assert_eq!(
            notes(&a.connect().await).await,
            ["in a"],
            "committed rows survive a restart"
        );
        assert_eq!(notes(&b.connect().await).await, ["in b"]);
        let c = cluster.create_database();
        assert!(c.connect().await.simple_query("SELECT 1").await.is_ok());

        let dir = cluster.dir.clone();
        drop(cluster);
        assert!(!dir.exists(), "dropping the cluster removes its directory");
        assert!(
            TcpStream::connect(("127.0.0.1", port)).is_err(),
            "and stops the server"
        );
    }

    #[tokio::test]
    async fn the_shared_cluster_is_one_per_process_with_a_private_password_file() {
        let cluster = Cluster::shared();
        assert!(std::ptr::eq(cluster, Cluster::shared()));
        let file = cluster.password_file();
        assert_eq!(
            fs::read_to_string(file).expect("read the password file"),
            cluster.password()
        );
        let mode = fs::metadata(file).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let db = cluster.create_database();
        let row = db
            .connect()
            .await
            .query_one("SELECT current_database()", &[])
            .await
            .expect("query");
        assert_eq!(row.get::<_, String>(0), db.name());
        let fsync = db
            .connect()
            .await
            .query_one("SHOW fsync", &[])
            .await
            .expect("show");
        assert_eq!(fsync.get::<_, String>(0), "on");
    }

    #[test]
    fn tls_is_offered_when_asked_for() {
        let key = rcgen::KeyPair::generate().expect("key");
        let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()]).expect("params");
        let cert = params.self_signed(&key).expect("cert");
        let cluster = Cluster::start_with_tls(&cert.pem(), &key.serialize_pem());
        // An SSLRequest (length 8, code 80877103) is answered `S` when the server will do TLS.
        let mut stream = TcpStream::connect(("127.0.0.1", cluster.port())).expect("connect");
        stream
            .write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])
            .expect("send SSLRequest");
        let mut answer = [0u8; 1];
        stream.read_exact(&mut answer).expect("read answer");
        assert_eq!(&answer, b"S");
    }

    #[test]
    fn directories_of_dead_processes_are_swept() {
        let temp = std::env::temp_dir();
        let mut child = Command::new("true").spawn().expect("spawn true");
        let dead = child.id();
        child.wait().expect("wait");
        let stale = temp.join(format!("{DIR_PREFIX}{dead}-0"));
        let alive = temp.join(format!("{DIR_PREFIX}{}-999999", std::process::id()));
        for dir in [&stale, &alive] {
            fs::create_dir_all(dir.join("data")).expect("create");
        }
        remove_stale_dirs(&temp);
        assert!(!stale.exists());
        assert!(alive.exists());
        fs::remove_dir_all(&alive).expect("clean up");
    }
}
