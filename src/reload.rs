//! Files the service re-reads while it serves: the callers file, the TLS certificate, key and client
//! CA, the client secret. Each is a [`FileBacked`] value: read, parsed and checked as a whole, then
//! swapped in at once, so a half-valid set of files changes nothing and the previous value stays in
//! force.
//!
//! Two things make the server re-read them (`server::reload` drives both): SIGHUP, at once, and a
//! [`Poller`] that compares the files' content with what is in force every few seconds. Content, not
//! modification times: Kubernetes updates a mounted Secret by pointing a `..data` symlink at a new
//! directory, which leaves the named path itself untouched. A change that does not load is reported
//! only once it has held still for one poll (a writer may be half-way through), and then once.

use std::{
    fmt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use arc_swap::ArcSwap;
use sha2::{Digest, Sha256};

/// The SHA-256 of a set of files' content as read now (a file that cannot be read counts by its
/// error's kind), to tell whether they changed without keeping their bytes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint([u8; 32]);

/// Shows nothing of the hash: the files may hold secrets.
impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Fingerprint(..)")
    }
}

/// One file as read: its bytes, or why it could not be read.
pub type Read = std::io::Result<Vec<u8>>;

/// Reads `files` (through symlinks): each one's content or error, and their fingerprint.
fn read_files(files: &[PathBuf]) -> (Vec<Read>, Fingerprint) {
    let mut hash = Sha256::new();
    let mut reads = Vec::with_capacity(files.len());
    for path in files {
        let read = std::fs::read(path);
        match &read {
            Ok(bytes) => {
                hash.update([0]);
                hash.update((bytes.len() as u64).to_le_bytes());
                hash.update(bytes);
            }
            Err(e) => {
                hash.update([1]);
                hash.update(format!("{:?}", e.kind()).as_bytes());
            }
        }
        reads.push(read);
    }
    (reads, Fingerprint(hash.finalize().into()))
}

/// The bytes of one file as read, or the error naming it: "cannot read `what` `path`: why".
pub fn content<'a>(read: &'a Read, what: &str, path: &Path) -> Result<&'a [u8], String> {
    read.as_deref()
        .map_err(|e| format!("cannot read {what} {}: {e}", path.display()))
}

/// Turns the files as read (in the order given) into the value, or says why it cannot be used.
/// The reason must name files and settings, never quote their content.
pub type Parse<T> = Box<dyn Fn(&[Read]) -> Result<T, String> + Send + Sync>;

/// What a set of files says, parsed; swapped whole when the files change.
pub struct FileBacked<T> {
    what: &'static str,
    files: Vec<PathBuf>,
    parse: Parse<T>,
    /// The log line's details once a new value is in force (and anything to record then).
    announce: fn(&T) -> String,
    current: ArcSwap<T>,
    /// The content `current` was parsed from.
    loaded: Mutex<Fingerprint>,
}

impl<T> fmt::Debug for FileBacked<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileBacked")
            .field("what", &self.what)
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl<T: Send + Sync + 'static> FileBacked<T> {
    /// Reads and parses `files` for the first time; `what` names them in log lines (e.g. "the
    /// callers file").
    pub fn load(
        what: &'static str,
        files: Vec<PathBuf>,
        parse: Parse<T>,
        announce: fn(&T) -> String,
    ) -> Result<Self, String> {
        let (reads, fingerprint) = read_files(&files);
        let value = parse(&reads)?;
        Ok(Self {
            what,
            files,
            parse,
            announce,
            current: ArcSwap::from_pointee(value),
            loaded: Mutex::new(fingerprint),
        })
    }

    /// The value in force.
    pub fn current(&self) -> Arc<T> {
        self.current.load_full()
    }

    /// A cheap look at the value in force, for hot paths.
    pub fn peek(&self) -> arc_swap::Guard<Arc<T>> {
        self.current.load()
    }

    /// The files, in the order `parse` gets their content.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// Re-reads the files. Content unchanged since the last load: `Ok(None)`, nothing parsed.
    /// Otherwise the new value, now in force; or why it cannot be used (the previous one stays).
    pub fn reload(&self) -> Result<Option<Arc<T>>, String> {
        // Held while reading, so that two reloads cannot swap in what they read in reverse order.
        let mut loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        let (reads, fingerprint) = read_files(&self.files);
        if *loaded == fingerprint {
            return Ok(None);
        }
        let value = Arc::new((self.parse)(&reads)?);
        self.current.store(value.clone());
        *loaded = fingerprint;
        Ok(Some(value))
    }

    /// Reloads even when the content is unchanged (SIGHUP: the operator asked).
    fn reload_always(&self) -> Result<Arc<T>, String> {
        let mut loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        let (reads, fingerprint) = read_files(&self.files);
        let value = Arc::new((self.parse)(&reads)?);
        self.current.store(value.clone());
        *loaded = fingerprint;
        Ok(value)
    }
}

/// What the server's reloader drives: something read from files that can be read again.
pub trait Reloadable: Send + Sync {
    /// Names it in log lines ("the callers file").
    fn what(&self) -> &'static str;
    /// The fingerprint of its files as they are now.
    fn fingerprint(&self) -> Fingerprint;
    /// The fingerprint of the content in force.
    fn loaded(&self) -> Fingerprint;
    /// Reads and swaps in its files (even if unchanged): the details for the log line, or why
    /// they cannot be used (the previous value then stays in force).
    fn reload(&self) -> Result<String, String>;
}

impl<T: Send + Sync + 'static> Reloadable for FileBacked<T> {
    fn what(&self) -> &'static str {
        self.what
    }

    fn fingerprint(&self) -> Fingerprint {
        read_files(&self.files).1
    }

    fn loaded(&self) -> Fingerprint {
        *self.loaded.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn reload(&self) -> Result<String, String> {
        self.reload_always().map(|value| (self.announce)(&value))
    }
}

/// What happened to one reloadable in a round of reloading, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// New content is in force; the details for the log line.
    Reloaded { what: &'static str, details: String },
    /// The content cannot be used; the previous value stays.
    Refused { what: &'static str, reason: String },
}

impl Outcome {
    /// The one log line for it.
    pub fn log(&self) {
        match self {
            Self::Reloaded { what, details } => {
                tracing::info!("{what} reloaded: {details}");
            }
            Self::Refused { what, reason } => {
                tracing::error!(
                    error = %reason,
                    "{what} not reloaded; the previous one stays in force"
                );
            }
        }
    }
}

/// Reloads `item` now (SIGHUP).
pub fn reload_now(item: &dyn Reloadable) -> Outcome {
    match item.reload() {
        Ok(details) => Outcome::Reloaded {
            what: item.what(),
            details,
        },
        Err(reason) => Outcome::Refused {
            what: item.what(),
            reason,
        },
    }
}

/// Watches reloadables' files between SIGHUPs: [`Poller::poll`] reloads what changed.
pub struct Poller {
    items: Vec<Watched>,
}

struct Watched {
    item: Arc<dyn Reloadable>,
    /// Content that failed to load and was reported: not tried again until it changes.
    reported: Option<Fingerprint>,
    /// Content that failed to load at the previous poll, not reported yet: a writer may not have
    /// finished. Reported if it is still the same at the next poll.
    settling: Option<Fingerprint>,
}

impl Poller {
    pub fn new(items: Vec<Arc<dyn Reloadable>>) -> Self {
        Self {
            items: items
                .into_iter()
                .map(|item| Watched {
                    item,
                    reported: None,
                    settling: None,
                })
                .collect(),
        }
    }

    /// Whether there is anything to watch.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Every reloadable, for SIGHUP.
    pub fn items(&self) -> impl Iterator<Item = &Arc<dyn Reloadable>> {
        self.items.iter().map(|w| &w.item)
    }

    /// Looks at every file once; reloads what changed. Returns what is worth a log line: each new
    /// value in force, and each failure once its content has held still for a poll.
    pub fn poll(&mut self) -> Vec<Outcome> {
        let mut outcomes = Vec::new();
        for watched in &mut self.items {
            let now = watched.item.fingerprint();
            if now == watched.item.loaded() || Some(now) == watched.reported {
                watched.settling = None;
                continue;
            }
            match reload_now(&*watched.item) {
                reloaded @ Outcome::Reloaded { .. } => {
                    watched.reported = None;
                    watched.settling = None;
                    outcomes.push(reloaded);
                }
                refused @ Outcome::Refused { .. } => {
                    if watched.settling == Some(now) {
                        watched.reported = Some(now);
                        watched.settling = None;
                        outcomes.push(refused);
                    } else {
                        watched.settling = Some(now);
                    }
                }
            }
        }
        outcomes
    }

    /// Forgets what was reported (after SIGHUP has logged every outcome afresh).
    pub fn reset(&mut self) {
        for watched in &mut self.items {
            watched.reported =
                Some(watched.item.fingerprint()).filter(|f| *f != watched.item.loaded());
            watched.settling = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn numbers(path: &Path) -> FileBacked<u32> {
        FileBacked::load(
            "the number",
            vec![path.to_owned()],
            Box::new(|reads| {
                let bytes = reads[0]
                    .as_deref()
                    .map_err(|e| format!("cannot read: {e}"))?;
                std::str::from_utf8(bytes)
                    .ok()
                    .and_then(|s| s.trim().parse().ok())
                    .ok_or_else(|| "not a number".to_owned())
            }),
            |n| format!("now {n}"),
        )
        .unwrap()
    }

    #[test]
    fn a_reload_swaps_only_a_value_that_parses() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n");
        std::fs::write(&path, "1").unwrap();
        let n = numbers(&path);
        assert_eq!(n.reload(), Ok(None), "unchanged: nothing parsed");
        std::fs::write(&path, "2").unwrap();
        assert_eq!(*n.reload().unwrap().unwrap(), 2);
        std::fs::write(&path, "two").unwrap();
        assert_eq!(n.reload(), Err("not a number".into()));
        assert_eq!(*n.current(), 2, "the previous value stays");
        std::fs::remove_file(&path).unwrap();
        assert!(n.reload().unwrap_err().contains("cannot read"));
        assert_eq!(*n.current(), 2);
    }

    /// Kubernetes' atomic writer: files are symlinks through `..data`, which is swapped to a new
    /// directory; the named path and its own times never change.
    #[cfg(unix)]
    #[test]
    fn the_poller_sees_a_symlink_swap_two_levels_up() {
        use std::os::unix::fs::symlink;
        let dir = tempfile::tempdir().unwrap();
        let generation = |name: &str, value: &str| {
            let g = dir.path().join(name);
            std::fs::create_dir(&g).unwrap();
            std::fs::write(g.join("n"), value).unwrap();
            let tmp = dir.path().join("..data_tmp");
            symlink(name, &tmp).unwrap();
            std::fs::rename(&tmp, dir.path().join("..data")).unwrap();
        };
        generation("..gen1", "1");
        let path = dir.path().join("n");
        symlink("..data/n", &path).unwrap();
        let n = Arc::new(numbers(&path));
        let mut poller = Poller::new(vec![n.clone()]);
        assert_eq!(poller.poll(), vec![]);
        let before = std::fs::symlink_metadata(&path)
            .unwrap()
            .modified()
            .unwrap();

        generation("..gen2", "2");
        assert_eq!(
            std::fs::symlink_metadata(&path)
                .unwrap()
                .modified()
                .unwrap(),
            before
        );
        assert_eq!(
            poller.poll(),
            vec![Outcome::Reloaded {
                what: "the number",
                details: "now 2".into()
            }]
        );
        assert_eq!(*n.current(), 2);
        assert_eq!(poller.poll(), vec![], "reported once");
    }

    #[test]
    fn a_broken_change_is_reported_once_after_it_holds_still() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n");
        std::fs::write(&path, "1").unwrap();
        let n = Arc::new(numbers(&path));
        let mut poller = Poller::new(vec![n.clone()]);

        // Half-way through a write: not reported while it may still change.
        std::fs::write(&path, "x").unwrap();
        assert_eq!(poller.poll(), vec![]);
        std::fs::write(&path, "xy").unwrap();
        assert_eq!(poller.poll(), vec![]);
        // It held still for a poll: reported, once.
        let refused = Outcome::Refused {
            what: "the number",
            reason: "not a number".into(),
        };
        assert_eq!(poller.poll(), vec![refused.clone()]);
        assert_eq!(poller.poll(), vec![]);
        assert_eq!(poller.poll(), vec![]);
        assert_eq!(*n.current(), 1, "the previous value stays");

        // Another broken content is another report; a good one loads at once.
        std::fs::write(&path, "z").unwrap();
        assert_eq!(poller.poll(), vec![]);
        assert_eq!(poller.poll(), vec![refused]);
        std::fs::write(&path, "3").unwrap();
        assert_eq!(
            poller.poll(),
            vec![Outcome::Reloaded {
                what: "the number",
                details: "now 3".into()
            }]
        );
        // Back to a content reported before: reported again (it failed, then was fixed).
        std::fs::write(&path, "z").unwrap();
        assert_eq!(poller.poll(), vec![]);
        assert_eq!(poller.poll().len(), 1);
    }
}
