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
//! A power-cut test puts the data directory on storage of its own (a file system that drops
//! unsynced writes on command) with [`Cluster::start_in`], cuts the power, calls
//! [`Cluster::power_cut`] to SIGKILL every process of the server at once, and restarts it with
//! [`Cluster::start_again`], which runs crash recovery: whatever was committed must still be there.
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

use std::collections::{HashSet, VecDeque};
use std::fmt;
use std::fs;
use std::io::{self, BufRead, BufReader, Write};
use std::net::{Ipv4Addr, TcpListener};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt, chown};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::io::Errno;
use rustix::process::{Pid, PidfdFlags, Signal, WaitId, WaitIdOptions};

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
    /// Set-up (initdb, `CREATE DATABASE`) reaches the disk too, for data that may lose power.
    durable_setup: bool,
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
        Self::start_with(None, None)
    }

    /// Like [`Cluster::start`], but with the data directory at `parent/pgdata`, for power-cut tests
    /// that put it on a file system of their own; the password file, socket and log stay in the
    /// cluster's temporary directory. initdb syncs the new files and set-up statements commit
    /// synchronously, since anything unsynced is lost at a cut. Dropping the cluster leaves
    /// `parent/pgdata` alone (it may be unmounted by then): it is the caller's.
    ///
    /// When the tests run as root, `parent` is given to the `postgres` system user (mode 0700), who
    /// must be able to reach it: the directories above it searchable, and a FUSE mount made with
    /// `allow_other`.
    ///
    /// # Panics
    /// Like [`Cluster::start`], and if the system user cannot have or reach `parent`.
    pub fn start_in(parent: &Path) -> Cluster {
        Self::start_with(None, Some(parent))
    }

    /// Like [`Cluster::start`], with TLS on (`ssl=on`) using the given PEM certificate chain and
    /// key; clients may still connect without TLS unless they ask for it (`sslmode=require`).
    pub fn start_with_tls(cert_pem: &str, key_pem: &str) -> Cluster {
        Self::start_with(Some((cert_pem, key_pem)), None)
    }

    /// The cluster shared by all tests of this test binary, started on first use. It is never
    /// stopped by the tests; its postmaster dies with the test process.
    pub fn shared() -> &'static Cluster {
        static SHARED: OnceLock<Cluster> = OnceLock::new();
        SHARED.get_or_init(Cluster::start)
    }

    fn start_with(tls: Option<(&str, &str)>, data_parent: Option<&Path>) -> Cluster {
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
        if let (Some(parent), Some(user)) = (data_parent, run_as) {
            give_to(parent, user);
        }
        let dir = create_cluster_dir(run_as);
        let password = hex_password();
        let password_file = dir.join("password");
        // From here on, dropping `cluster` (also by a panic) removes the directory.
        let mut cluster = Cluster {
            data_dir: data_parent.map_or_else(|| dir.join("data"), |parent| parent.join("pgdata")),
            durable_setup: data_parent.is_some(),
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
        if let Some(parent) = data_parent {
            // initdb syncs the data directory's contents, not its entry in `parent`: without this,
            // a power cut could take the whole cluster away.
            fs::File::open(parent)
                .and_then(|d| d.sync_all())
                .unwrap_or_else(|e| panic!("could not fsync {}: {e}", parent.display()));
        }

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

    /// The server's side of a power cut: SIGKILLs the postmaster and every process it started, and
    /// returns once all of them have exited, so that none keeps the old shared memory attached and
    /// [`Cluster::start_again`] can start a new server, which runs crash recovery. Cut the storage
    /// first, and keep its file system answering (with errors) until this returns: a process
    /// cannot finish exiting while a file operation of its hangs. Does nothing if it is stopped.
    ///
    /// # Panics
    /// If a process of the server does not exit within 30 seconds; the message lists them.
    pub fn power_cut(&mut self) {
        if let Some(postmaster) = self.postmaster.take()
            && let Err(why) = postmaster.power_cut()
        {
            panic!("the power cut did not kill PostgreSQL: {why}");
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
        // Not on storage that may lose power: a cut could lose what was set up.
        if !self.durable_setup {
            config.options("-c synchronous_commit=off");
        }
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
        let mut command = self.command("initdb");
        // initdb's final flush of the fresh files to disk is wasted on a directory that is thrown
        // away after the test; the server itself runs with fsync on.
        if !self.durable_setup {
            command.arg("--no-sync");
        }
        let output = command
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
            // Durability as by default, spelled out: power-cut tests depend on it.
            "fsync=on",
            "full_page_writes=on",
            "synchronous_commit=on",
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

    /// See [`Cluster::power_cut`]. Every child of the postmaster makes itself the leader of a
    /// session (and process group) of its own, so they cannot be killed as one group. Instead the
    /// postmaster is stopped first, so that it can start no more processes (nor restart killed
    /// ones), then its children and whatever runs in their sessions are killed, and the postmaster
    /// last. The few microseconds between the kills do not matter: the storage is already cut.
    fn power_cut(self) -> Result<(), String> {
        let _ = rustix::process::kill_process(self.pid, Signal::STOP);
        // A fork under way completes before the stop takes effect, so once the postmaster is
        // stopped, all its children are in /proc. ECHILD: it died and the supervisor reaped it.
        let stopped = WaitIdOptions::STOPPED | WaitIdOptions::EXITED | WaitIdOptions::NOWAIT;
        loop {
            match rustix::process::waitid(WaitId::Pid(self.pid), stopped) {
                Ok(_) | Err(Errno::CHILD) => break,
                Err(Errno::INTR) => continue,
                Err(e) => return Err(format!("could not wait for the postmaster to stop: {e}")),
            }
        }
        // By pidfd, so that a pid reused meanwhile is never signalled; again until no new process
        // turns up, in case one forked before it was killed.
        let mut killed: Vec<(Pid, OwnedFd)> = Vec::new();
        for _ in 0..100 {
            let new: Vec<Pid> = started_by(self.pid)
                .into_iter()
                .filter(|pid| killed.iter().all(|(old, _)| old != pid))
                .collect();
            if new.is_empty() {
                break;
            }
            for pid in new {
                match rustix::process::pidfd_open(pid, PidfdFlags::empty()) {
                    Ok(pidfd) => {
                        let _ = rustix::process::pidfd_send_signal(&pidfd, Signal::KILL);
                        killed.push((pid, pidfd));
                    }
                    Err(Errno::SRCH) => {}
                    Err(e) => return Err(format!("could not open a pidfd for {pid}: {e}")),
                }
            }
        }
        let _ = rustix::process::kill_process(self.pid, Signal::KILL);
        wait_for_exits(killed, STOP_TIMEOUT)?;
        // The supervisor reaps the postmaster; it reports the exit once every process holding the
        // server's stderr is gone too. A Ready is from a crash restart that the cut overtook.
        loop {
            match self.next_event(STOP_TIMEOUT) {
                Ok(Event::Ready) => continue,
                Ok(Event::Exited { .. }) => return Ok(()),
                Err(_) => {
                    return Err(format!(
                        "the postmaster ({}) did not exit within {STOP_TIMEOUT:?} of SIGKILL",
                        self.pid
                    ));
                }
            }
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

/// The processes that `postmaster` started, found in /proc: its children, and the processes in
/// their sessions (anything a backend runs, e.g. `COPY ... TO PROGRAM`, even once orphaned).
fn started_by(postmaster: Pid) -> Vec<Pid> {
    let postmaster = postmaster.as_raw_pid();
    let all: Vec<ProcStat> = fs::read_dir("/proc")
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
                .filter_map(proc_stat)
                .collect()
        })
        .unwrap_or_default();
    let children: HashSet<i32> = all
        .iter()
        .filter(|process| process.ppid == postmaster)
        .map(|process| process.pid)
        .collect();
    all.iter()
        .filter(|process| children.contains(&process.pid) || children.contains(&process.session))
        .filter_map(|process| Pid::from_raw(process.pid))
        .collect()
}

/// The fields of `/proc/<pid>/stat` that say whose a process is and whether it still runs.
struct ProcStat {
    pid: i32,
    /// `R`, `S`, `D` (in an uninterruptible wait, e.g. on a hung file system), `Z` (exited)...
    state: char,
    ppid: i32,
    session: i32,
}

fn proc_stat(pid: i32) -> Option<ProcStat> {
    let fields = proc_stat_fields(pid)?;
    Some(ProcStat {
        pid,
        state: fields.first()?.chars().next()?,
        ppid: fields.get(1)?.parse().ok()?,
        session: fields.get(3)?.parse().ok()?,
    })
}

/// The fields of `/proc/<pid>/stat` after the command name (which may hold spaces and
/// parentheses): the state first, then the parent's pid, and so on (`man 5 proc`, from field 3).
fn proc_stat_fields(pid: i32) -> Option<Vec<String>> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// Waits until every process has exited (a pidfd polls readable then, zombie or not).
fn wait_for_exits(mut pidfds: Vec<(Pid, OwnedFd)>, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    while !pidfds.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            let states: Vec<String> = pidfds
                .iter()
                .map(|(pid, _)| {
                    let state = proc_stat(pid.as_raw_pid()).map_or('?', |stat| stat.state);
                    format!("{pid} (state {state})")
                })
                .collect();
            return Err(format!(
                "still running {timeout:?} after SIGKILL: {}",
                states.join(", ")
            ));
        }
        let left = Timespec::try_from(left).expect("a timeout of seconds fits a timespec");
        let mut polled: Vec<PollFd<'_>> = pidfds
            .iter()
            .map(|(_, pidfd)| PollFd::new(pidfd, PollFlags::IN))
            .collect();
        match rustix::event::poll(&mut polled, Some(&left)) {
            Ok(_) | Err(Errno::INTR) => {}
            Err(e) => return Err(format!("could not poll pidfds: {e}")),
        }
        let exited: Vec<bool> = polled.iter().map(|fd| !fd.revents().is_empty()).collect();
        let mut exited = exited.into_iter();
        pidfds.retain(|_| !exited.next().unwrap_or(false));
    }
    Ok(())
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

/// Makes `parent` the system user's (mode 0700), and checks that it can get there: initdb's
/// "Permission denied" would not say that a directory above it is the trouble.
fn give_to(parent: &Path, user: SystemUser) {
    chown(parent, Some(user.uid), Some(user.gid))
        .and_then(|()| fs::set_permissions(parent, fs::Permissions::from_mode(0o700)))
        .unwrap_or_else(|e| panic!("could not give {} to {SYSTEM_USER}: {e}", parent.display()));
    // Asked of the user itself, with the same credentials as initdb gets (no extra groups).
    let writable = Command::new("test")
        .arg("-w")
        .arg(parent)
        .uid(user.uid)
        .gid(user.gid)
        .status()
        .unwrap_or_else(|e| panic!("could not run `test`: {e}"));
    if !writable.success() {
        panic!(
            "the `{SYSTEM_USER}` system user, which runs PostgreSQL, cannot get to {}: every \
             directory above it must be searchable by others (a tempfile::tempdir() is mode 0700; \
             chmod it 0755), and a FUSE mount must allow other users (allow_other)",
            parent.display()
        );
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

    /// A directory of the test's own for `Cluster::start_in`, removed on drop. Named like cluster
    /// directories, so that it is swept like them if the test process dies first.
    struct Parent(PathBuf);

    impl Parent {
        fn new(name: &str) -> Parent {
            let dir =
                std::env::temp_dir().join(format!("{DIR_PREFIX}{}-{name}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir(&dir).expect("create the parent directory");
            Parent(dir)
        }
    }

    impl Drop for Parent {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// The server's processes, each with its start time (field 22 of /proc/<pid>/stat), which
    /// tells it from a later process that reuses the pid.
    fn server_processes(cluster: &Cluster) -> Vec<(i32, u64)> {
        let postmaster = cluster.postmaster.as_ref().expect("running").pid;
        std::iter::once(postmaster)
            .chain(started_by(postmaster))
            .map(|pid| {
                let pid = pid.as_raw_pid();
                (
                    pid,
                    start_time(pid).expect("a running process has a start time"),
                )
            })
            .collect()
    }

    fn start_time(pid: i32) -> Option<u64> {
        proc_stat_fields(pid)?.get(19)?.parse().ok()
    }

    /// Not exited. A zombie has: the killed children are orphans until pid 1 gets to reap them.
    fn still_running(&(pid, started): &(i32, u64)) -> bool {
        start_time(pid) == Some(started)
            && proc_stat(pid).is_some_and(|process| process.state != 'Z')
    }

    fn assert_all_gone(processes: &[(i32, u64)]) {
        let running: Vec<_> = processes.iter().filter(|p| still_running(p)).collect();
        assert!(
            running.is_empty(),
            "still running after the power cut: {running:?}"
        );
        let postmaster = processes[0].0;
        let orphans = fs::read_dir("/proc")
            .expect("read /proc")
            .flatten()
            .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
            .filter_map(proc_stat)
            .filter(|process| process.ppid == postmaster && process.state != 'Z')
            .count();
        assert_eq!(orphans, 0, "children of the killed postmaster run on");
    }

    async fn show(client: &tokio_postgres::Client, setting: &str) -> String {
        client
            .query_one(&format!("SHOW {setting}"), &[])
            .await
            .expect("show")
            .get(0)
    }

    #[tokio::test]
    async fn committed_rows_survive_a_power_cut_in_a_directory_of_ones_own() {
        let parent = Parent::new("parent-power-cut");
        let mut cluster = Cluster::start_in(&parent.0);
        let port = cluster.port();
        assert!(parent.0.join("pgdata/PG_VERSION").is_file());
        assert!(cluster.password_file().starts_with(&cluster.dir));
        let db = cluster.create_database();
        let client = db.connect().await;
        for (setting, value) in [
            ("fsync", "on"),
            ("full_page_writes", "on"),
            ("synchronous_commit", "on"),
        ] {
            assert_eq!(show(&client, setting).await, value, "{setting}");
        }
        client
            .batch_execute(
                "CREATE TABLE notes (body text NOT NULL);
                 BEGIN; INSERT INTO notes VALUES ('committed'); COMMIT;",
            )
            .await
            .expect("insert");

        let processes = server_processes(&cluster);
        // The postmaster, its auxiliary processes and our backend at least.
        assert!(processes.len() >= 5, "{processes:?}");
        cluster.power_cut();
        assert_all_gone(&processes);
        assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
        assert!(client.simple_query("SELECT 1").await.is_err());

        cluster.start_again();
        assert_eq!(notes(&db.connect().await).await, ["committed"]);
        let dir = cluster.dir.clone();
        drop(cluster);
        assert!(!dir.exists());
        assert!(
            parent.0.join("pgdata/PG_VERSION").is_file(),
            "the data directory is the caller's"
        );
    }

    #[tokio::test]
    async fn a_power_cut_kills_busy_backends_and_loses_only_uncommitted_rows() {
        let parent = Parent::new("parent-busy");
        let mut cluster = Cluster::start_in(&parent.0);
        let db = cluster.create_database();
        let setup = db.connect().await;
        setup
            .batch_execute("CREATE TABLE notes (body text NOT NULL)")
            .await
            .expect("create table");
        let mut open = Vec::new();
        for n in 0..4 {
            let client = db.connect().await;
            // Two queries: in one, a BEGIN would take the first INSERT into its transaction.
            client
                .execute(
                    "INSERT INTO notes VALUES ($1)",
                    &[&format!("committed {n}")],
                )
                .await
                .expect("insert");
            client
                .batch_execute(&format!(
                    "BEGIN; INSERT INTO notes VALUES ('uncommitted {n}');"
                ))
                .await
                .expect("insert");
            open.push(client);
        }
        // One backend in the middle of a statement.
        let busy = db.connect().await;
        let sleeping = tokio::spawn(async move { busy.simple_query("SELECT pg_sleep(600)").await });
        loop {
            let row = setup
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep%' \
                     AND state = 'active'",
                    &[],
                )
                .await
                .expect("pg_stat_activity");
            if row.get::<_, i64>(0) == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let backends: i64 = setup
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'",
                &[],
            )
            .await
            .expect("pg_stat_activity")
            .get(0);
        assert_eq!(backends, 6);

        let processes = server_processes(&cluster);
        cluster.power_cut();
        assert_all_gone(&processes);
        assert!(
            sleeping.await.expect("join").is_err(),
            "the statement was cut"
        );
        for client in &open {
            assert!(client.simple_query("SELECT 1").await.is_err());
        }

        cluster.start_again();
        assert_eq!(
            notes(&db.connect().await).await,
            ["committed 0", "committed 1", "committed 2", "committed 3"]
        );
        // Dropping does not depend on the data directory (the power-cut test unmounts it first).
        fs::remove_dir_all(parent.0.join("pgdata")).expect("remove the data directory");
        drop(cluster);
    }

    #[test]
    fn a_data_parent_the_system_user_cannot_reach_is_refused_clearly() {
        let Some(user) = rustix::process::geteuid()
            .is_root()
            .then(|| system_user(SYSTEM_USER))
            .flatten()
        else {
            return; // Not root: PostgreSQL runs as the test's own user.
        };
        let locked = Parent::new("locked");
        fs::set_permissions(&locked.0, fs::Permissions::from_mode(0o700)).expect("chmod");
        let parent = locked.0.join("kit");
        fs::create_dir(&parent).expect("create");
        let refused = std::panic::catch_unwind(|| give_to(&parent, user))
            .expect_err("an unreachable parent was accepted");
        let message = refused
            .downcast_ref::<String>()
            .expect("a formatted message");
        assert!(message.contains("cannot get to"), "{message}");
        fs::set_permissions(&locked.0, fs::Permissions::from_mode(0o755)).expect("chmod");
        give_to(&parent, user);
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
