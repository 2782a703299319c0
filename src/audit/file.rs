//! `--audit-file`: the audit trail as JSON lines in a file of its own, written here rather than
//! through the log formatter (a line costs a fraction of a formatted event, and the trail is not
//! mixed into stderr).
//!
//! - The file is created `0600` and opened for appending. Before each write the path is checked
//!   against the open file: a file renamed away (log rotation) or a directory removed is noticed
//!   at the next write, which then opens the path again. SIGHUP reopens it at once.
//! - A write that fails is cut back to where it began, so the file holds whole lines only.
//! - With `--audit-required`, unwritten lines are kept and written first once the file can be
//!   written again, and until then every call that would be audited is refused with
//!   `UNAVAILABLE` ([`refusing`]): nothing is served that the trail does not hold. Without it,
//!   the service keeps serving and counts the lines it lost (`credential_audit_events_lost`),
//!   with a warning at most once a minute.
//! - Each aggregated flush ends with `fdatasync`; single events (operator actions) are written at
//!   once and reach the disk with the next flush.

use std::{
    fs::{File, OpenOptions},
    io::{self, Write},
    os::unix::fs::{MetadataExt, OpenOptionsExt},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use arc_swap::ArcSwapOption;
use serde::Serialize;

/// Unwritten lines kept under `--audit-required` at most; beyond, the oldest are lost (and counted).
const MAX_PENDING_BYTES: usize = 64 << 20;

/// How often a lost-lines warning is logged at most.
const WARN_EVERY: Duration = Duration::from_secs(60);

static SINK: ArcSwapOption<Sink> = ArcSwapOption::const_empty();

/// Set while `--audit-required` refuses calls; read on every call.
static REFUSING: AtomicBool = AtomicBool::new(false);

/// Whether audited calls are refused right now, because the audit file cannot be written and
/// `--audit-required` is set.
pub fn refusing() -> bool {
    REFUSING.load(Ordering::Relaxed)
}

/// The audit file's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileConfig {
    /// Where the lines go.
    pub path: PathBuf,
    /// Refuse audited calls while the file cannot be written.
    pub required: bool,
}

/// The installed audit file; removing it (on drop) sends the audit trail back to the logs.
#[must_use = "the audit file is written only while this is held"]
pub struct Installed(Arc<Sink>);

impl Drop for Installed {
    fn drop(&mut self) {
        let current = SINK.load();
        if current.as_ref().is_some_and(|s| Arc::ptr_eq(s, &self.0)) {
            SINK.store(None);
            REFUSING.store(false, Ordering::Relaxed);
            crate::metrics::set_audit_writable(true);
        }
    }
}

/// Opens the audit file and sends the audit trail there from now on. Fails if it cannot be
/// opened (a start with an audit file that cannot be written is a configuration error) or if
/// this process already writes one.
pub fn install(config: &FileConfig) -> io::Result<Installed> {
    let file = open(&config.path)?;
    let meta = file.metadata()?;
    let identity = identity(&meta);
    if meta.mode() & 0o077 != 0 {
        tracing::warn!(
            path = %config.path.display(),
            "the audit file is readable by others than its owner; it names callers and accounts"
        );
    }
    let sink = Arc::new(Sink {
        path: config.path.clone(),
        required: config.required,
        state: Mutex::new(State {
            file: Some(file),
            identity,
            pending: Vec::new(),
            pending_lines: 0,
            failing: false,
            lost_since_warning: 0,
            last_warning: None,
            unsynced: false,
        }),
    });
    let previous = SINK.compare_and_swap(&None::<Arc<Sink>>, Some(sink.clone()));
    if previous.is_some() {
        return Err(io::Error::other(
            "this process already writes an audit file",
        ));
    }
    // A file-size limit (`ulimit -f`) must fail a write, not end the process: SIGXFSZ's
    // default action. Tokio keeps a handler installed for the life of the process.
    #[cfg(unix)]
    if let Err(e) =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::from_raw(libc::SIGXFSZ))
    {
        tracing::warn!(error = %e, "cannot catch SIGXFSZ; a file-size limit would end the process");
    }
    crate::metrics::set_audit_writable(true);
    Ok(Installed(sink))
}

/// Whether an audit file is installed (the trail goes there, not to the logs).
pub(super) fn installed() -> bool {
    SINK.load().is_some()
}

/// Writes one event at once; `false` when no audit file is installed.
pub(super) fn write_event(line: &Line<'_>) -> bool {
    let Some(sink) = SINK.load_full() else {
        return false;
    };
    let mut buf = Vec::with_capacity(256);
    line.append_to(&mut buf);
    sink.write(buf, 1, false);
    true
}

/// Writes a flush's lines (`lines` of them in `buf`) and syncs them; `false` when no audit file
/// is installed.
pub(super) fn write_batch(buf: Vec<u8>, lines: u64) -> bool {
    let Some(sink) = SINK.load_full() else {
        return false;
    };
    sink.write(buf, lines, true);
    true
}

/// Writes what `--audit-required` kept back, if anything: the flusher calls it often while calls
/// are refused, so that they are served again soon after the file can be written.
pub(super) fn retry() {
    if let Some(sink) = SINK.load_full() {
        sink.write(Vec::new(), 0, true);
    }
}

/// Opens the audit file's path again (SIGHUP: log rotation).
pub fn reopen() {
    let Some(sink) = SINK.load_full() else {
        return;
    };
    let mut state = sink.state.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(file) = &state.file
        && let Err(e) = file.sync_data()
    {
        tracing::warn!(path = %sink.path.display(), error = %e, "syncing the audit file before reopening it failed");
    }
    match open(&sink.path) {
        Ok(file) => {
            state.identity = file.metadata().ok().and_then(|m| identity(&m));
            state.file = Some(file);
            tracing::info!(path = %sink.path.display(), "SIGHUP: audit file reopened");
        }
        Err(e) => {
            // The next write tries again, and fails (refuses or loses) as it must.
            state.file = None;
            tracing::error!(path = %sink.path.display(), error = %e, "SIGHUP: cannot reopen the audit file");
        }
    }
}

fn open(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)
}

fn identity(meta: &std::fs::Metadata) -> Option<(u64, u64)> {
    Some((meta.dev(), meta.ino()))
}

struct Sink {
    path: PathBuf,
    required: bool,
    state: Mutex<State>,
}

struct State {
    file: Option<File>,
    identity: Option<(u64, u64)>,
    /// `--audit-required`: lines not yet written, oldest first.
    pending: Vec<u8>,
    pending_lines: u64,
    /// The last write failed (refusing, or losing lines).
    failing: bool,
    lost_since_warning: u64,
    last_warning: Option<Instant>,
    /// Lines written since the last `fdatasync`.
    unsynced: bool,
}

impl Sink {
    fn write(&self, buf: Vec<u8>, lines: u64, sync: bool) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let state = &mut *state;
        let (buf, lines) = if state.pending.is_empty() {
            (buf, lines)
        } else {
            let mut all = std::mem::take(&mut state.pending);
            all.extend_from_slice(&buf);
            (all, std::mem::take(&mut state.pending_lines) + lines)
        };
        // An empty write proves nothing about a full disk: the flag changes only with lines.
        if buf.is_empty() && !(sync && state.unsynced) {
            return;
        }
        let written = self.write_out(state, &buf).and_then(|()| {
            if sync && let Some(file) = &state.file {
                file.sync_data()?;
                state.unsynced = false;
            }
            Ok(())
        });
        match written {
            Ok(()) => {
                if state.failing {
                    state.failing = false;
                    REFUSING.store(false, Ordering::Relaxed);
                    crate::metrics::set_audit_writable(true);
                    tracing::warn!(path = %self.path.display(), "the audit file can be written again");
                }
            }
            Err(e) => self.failed(state, buf, lines, &e),
        }
    }

    fn write_out(&self, state: &mut State, buf: &[u8]) -> io::Result<()> {
        // The path still names the open file? Rotation or a removed directory says no.
        let current = std::fs::metadata(&self.path)
            .ok()
            .and_then(|m| identity(&m));
        if state.file.is_none() || current != state.identity {
            if let Some(file) = &state.file {
                let _ = file.sync_data(); // the lines before the rotation, in the old file
            }
            state.file = None;
            let file = open(&self.path)?;
            state.identity = identity(&file.metadata()?);
            state.file = Some(file);
        }
        let Some(file) = &mut state.file else {
            return Err(io::Error::other("audit file not open"));
        };
        if buf.is_empty() {
            return Ok(());
        }
        let start = file.metadata()?.len();
        if let Err(e) = file.write_all(buf) {
            // Whole lines only: what part of this write landed is taken back.
            let _ = file.set_len(start);
            return Err(e);
        }
        state.unsynced = true;
        Ok(())
    }

    fn failed(&self, state: &mut State, mut buf: Vec<u8>, lines: u64, error: &io::Error) {
        let first = !state.failing;
        state.failing = true;
        crate::metrics::set_audit_writable(false);
        if self.required {
            REFUSING.store(true, Ordering::Relaxed);
            let mut lost = 0;
            if buf.len() > MAX_PENDING_BYTES {
                // Keep the newest whole lines that fit.
                let cut = buf.len() - MAX_PENDING_BYTES;
                let cut = buf[cut..]
                    .iter()
                    .position(|&b| b == b'\n')
                    .map_or(buf.len(), |i| cut + i + 1);
                lost = buf[..cut].iter().filter(|&&b| b == b'\n').count() as u64;
                buf.drain(..cut);
            }
            state.pending = buf;
            state.pending_lines = lines - lost;
            if lost > 0 {
                crate::metrics::record_audit_lost(lost);
            }
            if first {
                tracing::error!(
                    path = %self.path.display(),
                    error = %error,
                    "the audit file cannot be written; calls are refused with UNAVAILABLE until it can (--audit-required)"
                );
            }
            return;
        }
        crate::metrics::record_audit_lost(lines);
        state.lost_since_warning += lines;
        let due = state
            .last_warning
            .is_none_or(|at| at.elapsed() >= WARN_EVERY);
        if due {
            tracing::warn!(
                path = %self.path.display(),
                error = %error,
                lost = state.lost_since_warning,
                "the audit file cannot be written; audit events are lost (counted in credential_audit_events_lost)"
            );
            state.lost_since_warning = 0;
            state.last_warning = Some(Instant::now());
        }
    }
}

/// One audit line. Single events have no `count`, `first`, `last`, `peer` or `reason`.
#[derive(Serialize)]
pub(super) struct Line<'a> {
    pub time: &'a str,
    pub event: &'static str,
    pub caller: &'a str,
    pub method: &'a str,
    pub account: &'a str,
    pub outcome: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer: Option<&'a str>,
    /// Why a refusal was refused, when the check says (a JWT's "expired", say).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'a str>,
}

impl Line<'_> {
    pub(super) fn append_to(&self, buf: &mut Vec<u8>) {
        // Serialising plain strings and numbers into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *buf, self);
        buf.push(b'\n');
    }
}

/// RFC 3339 with milliseconds, as the log lines write times.
pub(super) fn timestamp(at: SystemTime) -> String {
    let mut text = String::new();
    timestamp_into(&mut text, at);
    text
}

/// [`timestamp`] into a buffer a flush reuses for each of its lines.
pub(super) fn timestamp_into(text: &mut String, at: SystemTime) {
    use std::fmt::Write;
    text.clear();
    // Writing into a String cannot fail.
    let _ = write!(text, "{}", humantime::format_rfc3339_millis(at));
}
