//! Power cuts for tests: a FUSE file system that keeps everything not yet made durable in
//! memory only, and on command throws it away.
//!
//! A SIGKILL test cannot prove that a program fsyncs before it acknowledges: the page cache
//! survives the kill. Mounted at a directory, this kit serves an in-memory tree in which
//! every file has a *current* content (what reads see) and a *durable* content (what a
//! disk would hold after losing power), and every directory has current and durable
//! entries.
//!
//! What it models:
//! - `fsync` and `fdatasync` of a file make its content and size durable. A write to a file
//!   opened with `O_SYNC` / `O_DSYNC` (or `pwritev2` with `RWF_DSYNC`) is durable at once,
//!   that write only. Nothing else is: not `close`, not `sync_file_range`, not time.
//! - `fsync` of a directory makes its entries durable. Entries created, renamed or removed
//!   since (create, mkdir, mknod, symlink, link, rename, unlink, rmdir) are undone by a cut
//!   when [`Options::drop_unsynced_entries`] is set (POSIX's rule, as LazyFS models it);
//!   otherwise they are durable at once. An unlinked file whose unlink is not durable comes
//!   back with its durable content.
//! - [`PowerCutFs::cut`] optionally tears the last unsynced write of the whole file system:
//!   a prefix of it, ending at a 512-byte boundary of the file, reaches the disk.
//!
//! What it does not model: attributes (mode, owner, times) are durable at once; within a
//! file there is no reordering other than losing every unsynced write (and the torn last
//! one); a rename whose two directories are synced separately may restore a directory
//! under one of its two names only; no extended attributes, no `RENAME_WHITEOUT`,
//! no punching holes. Files are served with direct I/O (no page cache), so after a cut
//! even reads fail.
//!
//! How a test uses it:
//! 1. [`PowerCutFs::mount`] at an empty directory (as root), optionally seeded with a copy
//!    of a directory tree.
//! 2. Start the program under test with its data directory on the mount, and have it do
//!    work: acknowledged writes are what the test checks later.
//! 3. [`PowerCutFs::cut`]: from then on every request fails with `EIO`.
//! 4. SIGKILL the program and reap it (every process that used the mount).
//! 5. [`PowerCutFs::power_on`]: a fresh mount serving the durable image.
//! 6. Restart the program on it and check that every acknowledged write is there.
//!
//! [`PowerCutFs::save_durable_image`] copies the durable image out for a post-mortem.
//!
//! Mounting needs root (it calls mount(2) directly; no fusermount, no libfuse). To end a
//! busy mount without hanging, the kit mounts the fuse control file system at
//! /sys/fs/fuse/connections if it is not there yet. A test process that dies without
//! dropping the kit leaves a dead mount behind (`umount -l` it).

mod fuse;
mod model;

use std::ffi::CString;
use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use fuser::{BackgroundSession, Config, Session, SessionACL};

use crate::model::{SnapshotKind, State};

/// How the kit behaves; see the crate documentation.
#[derive(Debug, Clone)]
pub struct Options {
    /// Directory entries (create, mkdir, rename, unlink, rmdir, link, symlink) made since the last
    /// fsync of their directory are lost on a cut too. When false, they are durable at once.
    pub drop_unsynced_entries: bool,
    /// Let other users (the `postgres` system user) use the mount: mount with allow_other.
    pub allow_other: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            drop_unsynced_entries: true,
            allow_other: true,
        }
    }
}

/// What a cut threw away.
#[derive(Debug, Clone, Default)]
pub struct CutReport {
    pub files_with_dropped_writes: usize,
    /// Bytes written since each file's last sync (overwrites counted each time).
    pub bytes_dropped: u64,
    /// Directory entries added or removed since their directory's last sync.
    pub entries_dropped: usize,
    pub torn: Option<TornWrite>,
}

/// The write a cut kept partially.
#[derive(Debug, Clone)]
pub struct TornWrite {
    /// Best known path, relative to the mount, for messages.
    pub path: String,
    pub offset: u64,
    pub len: u64,
    /// Bytes of it that reached the disk, from its start.
    pub kept: u64,
}

/// Counters since mount.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stats {
    pub file_syncs: u64,
    pub dir_syncs: u64,
    pub writes: u64,
    pub bytes_written: u64,
}

/// A mounted power-cut file system; dropping it unmounts.
pub struct PowerCutFs {
    mountpoint: PathBuf,
    state: Arc<Mutex<State>>,
    allow_other: bool,
    session: Option<Mounted>,
}

struct Mounted {
    session: BackgroundSession,
    /// The connection's name under /sys/fs/fuse/connections, to abort it when the mount
    /// is busy and only a lazy unmount is possible.
    connection: Option<u64>,
}

const FUSECTL: &str = "/sys/fs/fuse/connections";

impl PowerCutFs {
    /// Mounts the kit at `mountpoint` (an existing empty dir). The file system starts empty, or
    /// with a copy of `seed` (files, dirs, symlinks, modes, owners), taken as already durable.
    pub fn mount(
        mountpoint: &Path,
        seed: Option<&Path>,
        options: Options,
    ) -> io::Result<PowerCutFs> {
        let mountpoint = mountpoint.canonicalize().map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("mount point {}: {e}", mountpoint.display()),
            )
        })?;
        let mut state = State::new(options.drop_unsynced_entries);
        if let Some(seed) = seed {
            state.load_seed(seed)?;
        }
        let mut fs = PowerCutFs {
            mountpoint,
            state: Arc::new(Mutex::new(state)),
            allow_other: options.allow_other,
            session: None,
        };
        fs.start()?;
        Ok(fs)
    }

    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// The power cut: from this call on, every operation on the mount fails with EIO (reads too),
    /// and everything not durable is discarded. With `tear: Some(seed)`, the last write not yet
    /// synced (over the whole file system) is instead kept partially: a prefix of it whose length is
    /// drawn from `seed` (0..len, at 512-byte granularity is fine) is applied on top of the
    /// durable content. Returns what was dropped.
    ///
    /// The torn write is picked among the files the cut leaves: a write to a file whose
    /// directory entry the cut removes has nothing to tear.
    pub fn cut(&self, tear: Option<u64>) -> CutReport {
        self.lock().cut(tear)
    }

    /// Arms a cut in the middle of the `n`th write from now (1: the next), so that the power goes
    /// while the program writes rather than between its writes; with `tear`, that write is the one
    /// partly kept. The receiver gets the cut's report; a [`cut`](Self::cut) before then replaces
    /// it (the receiver then gets nothing).
    pub fn cut_at_write(&self, n: u64, tear: Option<u64>) -> std::sync::mpsc::Receiver<CutReport> {
        let (done, report) = std::sync::mpsc::channel();
        self.lock().armed = Some(model::Armed {
            writes_left: n.max(1),
            tear,
            done,
        });
        report
    }

    /// Makes everything written so far durable, as `sync(1)` would, or a quiet system whose file
    /// system committed its journal. For set-up that is not under test (a database created before
    /// the experiment starts), so that a cut tests only what comes after.
    pub fn settle(&self) {
        self.lock().settle();
    }

    /// Power back on, after the caller has killed (and reaped) every process that used the mount:
    /// unmounts and mounts again (fresh kernel caches), serving the durable image, writable again.
    /// Without a cut before, this is a clean remount: unsynced data stays unsynced.
    pub fn power_on(&mut self) -> io::Result<()> {
        self.unmount();
        self.lock().reset_kernel_refs();
        self.start()
    }

    /// Counters since mount: fsync calls on files, fsyncs of directories, writes, bytes written.
    pub fn stats(&self) -> Stats {
        self.lock().stats
    }

    /// Writes the current durable image into `dir` (for a post-mortem of a failing seed).
    pub fn save_durable_image(&self, dir: &Path) -> io::Result<()> {
        // Copied under the lock, written without it: `dir` may be on this very mount.
        let snapshot = self.lock().durable_snapshot();
        let ctx =
            |e: io::Error, p: &Path| io::Error::new(e.kind(), format!("{}: {e}", p.display()));
        std::fs::create_dir_all(dir).map_err(|e| ctx(e, dir))?;
        let mut dirs = Vec::new();
        for e in &snapshot {
            let path = dir.join(&e.path);
            match &e.kind {
                SnapshotKind::Dir => {
                    if !e.path.as_os_str().is_empty() {
                        std::fs::create_dir(&path).map_err(|err| ctx(err, &path))?;
                    }
                    // Modes last: a read-only directory would refuse its children.
                    dirs.push((path.clone(), e.mode));
                }
                SnapshotKind::File(content) => {
                    let mut data = content.read(0, content.len() as usize);
                    data.truncate(content.len() as usize);
                    std::fs::write(&path, &data).map_err(|err| ctx(err, &path))?;
                    let f = OpenOptions::new().write(true).open(&path)?;
                    let _ = f.set_modified(e.mtime);
                    std::fs::set_permissions(&path, PermissionsExt::from_mode(e.mode & 0o7777))
                        .map_err(|err| ctx(err, &path))?;
                }
                SnapshotKind::Symlink(target) => {
                    std::os::unix::fs::symlink(target, &path).map_err(|err| ctx(err, &path))?;
                }
                SnapshotKind::HardLink(first) => {
                    std::fs::hard_link(dir.join(first), &path).map_err(|err| ctx(err, &path))?;
                    continue;
                }
                SnapshotKind::Special => {
                    let c = cstring(&path)?;
                    // SAFETY: `c` is a valid NUL-terminated path.
                    let r = unsafe { libc::mknod(c.as_ptr(), e.mode, e.rdev as libc::dev_t) };
                    if r != 0 {
                        return Err(ctx(io::Error::last_os_error(), &path));
                    }
                }
            }
            // Owners as recorded; only root may give files away, so this is best effort.
            let _ = std::os::unix::fs::lchown(&path, Some(e.uid), Some(e.gid));
        }
        for (path, mode) in dirs.into_iter().rev() {
            std::fs::set_permissions(&path, PermissionsExt::from_mode(mode & 0o7777))
                .map_err(|err| ctx(err, &path))?;
        }
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Mounts a new FUSE session serving the state.
    fn start(&mut self) -> io::Result<()> {
        let (epoch, root_mode) = {
            let mut st = self.lock();
            st.epoch += 1;
            st.powered = true;
            (
                st.epoch,
                st.inode(model::ROOT)
                    .map(|i| i.mode)
                    .unwrap_or(libc::S_IFDIR | 0o755),
            )
        };
        let fs = fuse::Fs {
            state: self.state.clone(),
            epoch,
        };
        let dev = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open("/dev/fuse")
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("opening /dev/fuse (powercut needs the fuse module and root): {e}"),
                )
            })?;
        let fd = OwnedFd::from(dev);
        let mut opts = format!(
            "fd={},rootmode={:o},user_id=0,group_id=0,default_permissions",
            fd.as_raw_fd(),
            root_mode & (libc::S_IFMT | 0o7777),
        );
        if self.allow_other {
            opts.push_str(",allow_other");
        }
        let source = c"powercut";
        let fstype = c"fuse.powercut";
        let target = cstring(&self.mountpoint)?;
        let data = CString::new(opts.clone()).map_err(io::Error::other)?;
        // SAFETY: all pointers are valid NUL-terminated strings that outlive the call.
        let r = unsafe {
            libc::mount(
                source.as_ptr(),
                target.as_ptr(),
                fstype.as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV,
                data.as_ptr().cast(),
            )
        };
        if r != 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                e.kind(),
                format!(
                    "mount(2) of FUSE at {} with {opts:?} (powercut needs root, or \
                     CAP_SYS_ADMIN, and /dev/fuse): {e}",
                    self.mountpoint.display()
                ),
            ));
        }
        let acl = if self.allow_other {
            SessionACL::All
        } else {
            SessionACL::Owner
        };
        let session = match Session::from_fd(fs, fd, acl, session_config()).and_then(Session::spawn)
        {
            Ok(s) => s,
            Err(e) => {
                lazy_unmount(&target);
                return Err(io::Error::new(
                    e.kind(),
                    format!(
                        "starting the FUSE session at {}: {e}",
                        self.mountpoint.display()
                    ),
                ));
            }
        };
        // The connection's id is the mount's device number, in the kernel's encoding.
        let connection = std::fs::metadata(&self.mountpoint).ok().map(|m| {
            let dev = m.dev();
            (u64::from(libc::major(dev)) << 20) | u64::from(libc::minor(dev))
        });
        ensure_fusectl();
        self.session = Some(Mounted {
            session,
            connection,
        });
        Ok(())
    }

    /// Unmounts, lazily and aborting the connection if the mount is busy. Never blocks
    /// for long: a session thread that does not end in time is left behind.
    fn unmount(&mut self) {
        let Some(m) = self.session.take() else { return };
        let Ok(target) = cstring(&self.mountpoint) else {
            return;
        };
        // SAFETY: `target` is a valid NUL-terminated path.
        let r = unsafe { libc::umount2(target.as_ptr(), 0) };
        if r != 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EBUSY) {
            // Still mounted, so the connection id is still ours: abort it to fail the
            // requests of whoever holds it, and end our session thread.
            if let Some(id) = m.connection {
                let _ = std::fs::write(format!("{FUSECTL}/{id}/abort"), "1");
            }
            lazy_unmount(&target);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while !m.session.guard.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        if m.session.guard.is_finished() {
            let _ = m.session.join();
        }
    }
}

impl Drop for PowerCutFs {
    fn drop(&mut self) {
        self.unmount();
    }
}

/// Several threads read requests, so that one process's round trip overlaps another's;
/// the model itself is behind one lock.
fn session_config() -> Config {
    let mut config = Config::default();
    config.n_threads = Some(4);
    config
}

const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<PowerCutFs>();
};

fn lazy_unmount(target: &CString) {
    // SAFETY: `target` is a valid NUL-terminated path.
    unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
}

fn cstring(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(io::Error::other)
}

/// The fuse control file system lets a busy mount's connection be aborted.
fn ensure_fusectl() {
    if Path::new(FUSECTL)
        .read_dir()
        .is_ok_and(|mut d| d.next().is_some())
    {
        return;
    }
    // SAFETY: constant NUL-terminated strings.
    unsafe {
        libc::mount(
            c"fusectl".as_ptr(),
            c"/sys/fs/fuse/connections".as_ptr(),
            c"fusectl".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
}
