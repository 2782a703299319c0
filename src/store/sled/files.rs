//! What sled 0.34 leaves to chance in a power cut, made durable here.
//!
//! - **The log.** `Db::flush` ends in `sync_file_range(2)`, which writes pages but commits no
//!   metadata (a grown file's size included) and flushes no device cache: its manual page promises
//!   nothing after a crash. [`Syncer::sync`] follows every flush with `fdatasync` of the `db` file.
//! - **Directory entries.** Neither sled nor anything else fsynced a directory, so a cut soon after
//!   a store was created could drop `db`, `conf` or the whole data directory. Every directory this
//!   module creates is fsynced into its parent, and [`Syncer`] fsyncs the data directory (and
//!   `blobs/`) whenever sled has created, renamed or removed a file there (snapshots, blobs).
//! - **`conf`.** sled writes it once, in place, and never syncs it; a torn `conf` makes the whole
//!   store unreadable (sled#1533). Its content is a function of settings this service never
//!   changes, so [`prepare`] writes it atomically before sled opens, and replaces one whose checksum
//!   fails (only an interrupted first write leaves that).
//!
//! Measured with the power-cut kit (`crates/powercut`, `tests/it/power_cut.rs`): see the README's
//! "Durability" section.

use std::{
    collections::BTreeSet,
    ffi::OsString,
    fs::{self, File},
    io::{self, Write},
    path::{Path, PathBuf},
};

/// sled's segment size, the one setting `conf` records that sled lets us choose; its default.
pub(super) const SEGMENT_SIZE: usize = 512 * 1024;

/// `conf` as sled 0.34 writes it for this service's settings, checksum included.
fn conf_bytes() -> Vec<u8> {
    let mut bytes =
        format!("segment_size: {SEGMENT_SIZE}\nuse_compression: false\nversion: 0.34\n")
            .into_bytes();
    let crc = crc32fast::hash(&bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());
    bytes
}

/// Whether `conf`'s trailing checksum matches its content, as sled checks it.
fn conf_is_whole(bytes: &[u8]) -> bool {
    // sled itself takes a file of 8 bytes or fewer as absent and writes it anew.
    if bytes.len() <= 8 {
        return false;
    }
    let (content, crc) = bytes.split_at(bytes.len() - 4);
    crc32fast::hash(content).to_le_bytes() == crc
}

/// Gets `dir` ready for sled: creates it (mode 0700, each new directory fsynced into its parent)
/// and writes `conf` durably if it is missing or torn. Returns whether `conf` was repaired.
pub(super) fn prepare(dir: &Path) -> io::Result<bool> {
    create_dir_durably(dir)?;
    let conf = dir.join("conf");
    let repaired = match fs::read(&conf) {
        Ok(bytes) if conf_is_whole(&bytes) => return Ok(false),
        Ok(_) => true,
        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
        Err(e) => return Err(e),
    };
    write_atomically(&conf, &conf_bytes())?;
    Ok(repaired)
}

/// Writes `path` so that a cut leaves either its old content or all of the new: a temporary file,
/// fsynced, renamed over it, and the directory fsynced.
pub(super) fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = parent(path);
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    {
        let mut options = fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    sync_dir(dir)
}

/// Creates `dir` and any missing parents (mode 0700), fsyncing each new entry into its parent,
/// and tightens an existing `dir` to 0700.
pub fn create_dir_durably(dir: &Path) -> io::Result<()> {
    let mut missing = Vec::new();
    let mut probe = dir;
    while !probe.as_os_str().is_empty() && !probe.exists() {
        missing.push(probe);
        probe = parent(probe);
    }
    for new in missing.into_iter().rev() {
        create_private_dir(new)?;
        sync_dir(parent(new))?;
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        // An existing directory keeps its mode unless we tighten it.
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

#[cfg(unix)]
fn create_private_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        // Another process made it meanwhile: what matters is that it exists, durably.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        other => other,
    }
}

#[cfg(not(unix))]
fn create_private_dir(dir: &Path) -> io::Result<()> {
    fs::create_dir(dir)
}

/// The directory holding `path`; `.` for a bare name.
fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// fsync of a directory: makes the entries created, renamed or removed in it durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Makes what sled flushed durable: `fdatasync` of its log, and fsync of its directories whenever
/// their entries changed. Owned by the flusher thread, so it needs no lock.
pub(super) struct Syncer {
    dir: PathBuf,
    db: File,
    /// The entries of the data directory and of `blobs/` as last fsynced.
    synced: BTreeSet<OsString>,
}

impl Syncer {
    /// Right after sled opened `dir`: syncs everything it may have created (its `db` file, `conf`,
    /// `blobs/`, the data directory and its parent, which holds the key file), so nothing a later
    /// write relies on is still only in the page cache.
    pub(super) fn open(dir: &Path) -> io::Result<Self> {
        let db = File::open(dir.join("db"))?;
        db.sync_all()?;
        File::open(dir.join("conf"))?.sync_all()?;
        let mut syncer = Self {
            dir: dir.to_owned(),
            db,
            synced: BTreeSet::new(),
        };
        syncer.sync_entries()?;
        sync_dir(parent(dir))?;
        Ok(syncer)
    }

    /// After sled's flush: makes everything it wrote durable before any waiter is answered.
    pub(super) fn sync(&mut self) -> io::Result<()> {
        self.db.sync_data()?;
        if self.listing()? != self.synced {
            self.sync_entries()?;
        }
        Ok(())
    }

    /// fsyncs new blob files, then `blobs/` and the data directory, and remembers their entries.
    fn sync_entries(&mut self) -> io::Result<()> {
        let listing = self.listing()?;
        let blobs = self.dir.join("blobs");
        for name in listing.difference(&self.synced) {
            let path = self.dir.join(name);
            // Blobs are written once and never synced by sled; snapshots sled syncs itself.
            if path.parent() == Some(blobs.as_path()) {
                File::open(&path)?.sync_all()?;
            }
        }
        if blobs.is_dir() {
            sync_dir(&blobs)?;
        }
        sync_dir(&self.dir)?;
        self.synced = listing;
        Ok(())
    }

    /// The names in the data directory and, as `blobs/NAME`, in `blobs/`.
    fn listing(&self) -> io::Result<BTreeSet<OsString>> {
        let mut names = BTreeSet::new();
        for entry in fs::read_dir(&self.dir)? {
            names.insert(entry?.file_name());
        }
        match fs::read_dir(self.dir.join("blobs")) {
            Ok(entries) => {
                for entry in entries {
                    let mut name = OsString::from("blobs/");
                    name.push(entry?.file_name());
                    names.insert(name);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        Ok(names)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `conf` is sled's format: if sled's own bytes differed, sled would refuse or rewrite ours.
    #[test]
    fn conf_is_what_sled_itself_writes() {
        let dir = tempfile::tempdir().unwrap();
        drop(
            sled::Config::new()
                .path(dir.path())
                .segment_size(SEGMENT_SIZE)
                .open()
                .unwrap(),
        );
        assert_eq!(fs::read(dir.path().join("conf")).unwrap(), conf_bytes());
    }

    #[test]
    fn a_torn_conf_is_replaced_and_a_whole_one_kept() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("conf");
        assert!(
            !prepare(dir.path()).unwrap(),
            "a missing conf is written, not repaired"
        );
        assert_eq!(fs::read(&conf).unwrap(), conf_bytes());

        let whole = conf_bytes();
        fs::write(&conf, &whole[..whole.len() - 7]).unwrap();
        assert!(prepare(dir.path()).unwrap(), "a torn conf is repaired");
        assert_eq!(fs::read(&conf).unwrap(), whole);
        drop(sled::Config::new().path(dir.path()).open().unwrap());

        // A whole conf with other settings is sled's to judge, not ours to overwrite.
        let mut other = b"segment_size: 1024\nuse_compression: false\nversion: 0.34\n".to_vec();
        let crc = crc32fast::hash(&other);
        other.extend_from_slice(&crc.to_le_bytes());
        fs::write(&conf, &other).unwrap();
        assert!(!prepare(dir.path()).unwrap());
        assert_eq!(fs::read(&conf).unwrap(), other);
    }

    #[test]
    fn missing_parents_are_created_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("a/b/data");
        create_dir_durably(&data).unwrap();
        for p in [dir.path().join("a"), dir.path().join("a/b"), data] {
            assert_eq!(
                fs::metadata(&p).unwrap().permissions().mode() & 0o777,
                0o700
            );
        }
    }
}
