//! The FUSE requests, answered from the model under one lock.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request,
    TimeOrNow, WriteFlags,
};

use crate::model::{Node, Res, State};

/// Zero: the kernel asks again each time, so it never serves a name or size the model
/// has since changed (by a cut, for one).
const TTL: Duration = Duration::ZERO;

/// Files bypass the page cache: every read and write reaches the model, so after a cut
/// reads fail too, and nothing is written back behind the model's back.
const FILE_OPEN: FopenFlags = FopenFlags::FOPEN_DIRECT_IO;

pub(crate) struct Fs {
    pub(crate) state: Arc<Mutex<State>>,
    pub(crate) epoch: u64,
}

fn errno(e: i32) -> Errno {
    Errno::from_i32(e)
}

impl Fs {
    /// The state, if this session may still use it: not after a cut, nor once a newer
    /// session has replaced this one.
    fn lock(&self) -> Result<MutexGuard<'_, State>, Errno> {
        let st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if st.powered && st.epoch == self.epoch {
            Ok(st)
        } else {
            Err(Errno::EIO)
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> Res<T>) -> Result<T, Errno> {
        let mut st = self.lock()?;
        f(&mut st).map_err(errno)
    }

    /// For requests that answer with a new entry: counts the kernel's reference.
    fn entry(&self, reply: ReplyEntry, f: impl FnOnce(&mut State) -> Res<u64>) {
        match self.with(|st| {
            let ino = f(st)?;
            st.add_lookup(ino);
            attr(st, ino)
        }) {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn empty(&self, reply: ReplyEmpty, f: impl FnOnce(&mut State) -> Res<()>) {
        match self.with(f) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }
}

fn kind(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}

fn attr(st: &State, ino: u64) -> Res<FileAttr> {
    let i = st.inode(ino)?;
    let nlink = match &i.node {
        Node::Dir(d) if i.links > 0 => 2 + st.subdirs(d),
        _ => i.links,
    };
    let size = i.size();
    Ok(FileAttr {
        ino: INodeNo(ino),
        size,
        blocks: size.div_ceil(512),
        atime: i.atime,
        mtime: i.mtime,
        ctime: i.ctime,
        crtime: i.ctime,
        kind: kind(i.mode),
        perm: (i.mode & 0o7777) as u16,
        nlink,
        uid: i.uid,
        gid: i.gid,
        rdev: i.rdev,
        blksize: 4096,
        flags: 0,
    })
}

fn time(t: TimeOrNow) -> SystemTime {
    match t {
        TimeOrNow::SpecificTime(t) => t,
        TimeOrNow::Now => SystemTime::now(),
    }
}

impl Filesystem for Fs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Lets programs mmap files despite direct I/O (Linux 6.6+); harmless when absent.
        let _ = config.add_capabilities(InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.entry(reply, |st| st.child(parent.0, name));
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        if let Ok(mut st) = self.lock() {
            st.forget(ino.0, nlookup);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.with(|st| attr(st, ino.0)) {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        match self.with(|st| {
            let ino = ino.0;
            if mode.is_some() || uid.is_some() || gid.is_some() {
                st.chmod_chown(ino, mode, uid, gid)?;
            }
            if let Some(size) = size {
                st.truncate(ino, size)?;
                let now = Some(SystemTime::now());
                st.set_times(ino, None, now)?;
            }
            if atime.is_some() || mtime.is_some() {
                st.set_times(ino, atime.map(time), mtime.map(time))?;
            }
            attr(st, ino)
        }) {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.with(|st| match &st.inode(ino.0)?.node {
            Node::Symlink(t) => Ok(t.clone()),
            _ => Err(libc::EINVAL),
        }) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        self.entry(reply, |st| {
            let (node, ty) = match mode & libc::S_IFMT {
                0 | libc::S_IFREG => (State::new_file(), libc::S_IFREG),
                t @ (libc::S_IFIFO | libc::S_IFSOCK | libc::S_IFCHR | libc::S_IFBLK) => {
                    (Node::Special, t)
                }
                _ => return Err(libc::EINVAL),
            };
            let mode = ty | (mode & 0o7777);
            st.create_node(parent.0, name, node, mode, rdev, (req.uid(), req.gid()))
        });
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        self.entry(reply, |st| {
            let mode = libc::S_IFDIR | (mode & 0o7777);
            let node = State::new_dir(parent.0);
            st.create_node(parent.0, name, node, mode, 0, (req.uid(), req.gid()))
        });
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.empty(reply, |st| st.unlink(parent.0, name));
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.empty(reply, |st| st.rmdir(parent.0, name));
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        self.entry(reply, |st| {
            let node = Node::Symlink(target.as_os_str().as_bytes().to_vec());
            let mode = libc::S_IFLNK | 0o777;
            st.create_node(parent.0, link_name, node, mode, 0, (req.uid(), req.gid()))
        });
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        self.empty(reply, |st| {
            st.rename(parent.0, name, newparent.0, newname, flags.bits())
        });
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        self.entry(reply, |st| {
            st.link(ino.0, newparent.0, newname)?;
            Ok(ino.0)
        });
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match self.with(|st| st.open(ino.0, flags.0)) {
            Ok(fh) => reply.opened(FileHandle(fh), FILE_OPEN),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.with(|st| st.read(ino.0, offset, size)) {
            Ok(d) => reply.data(&d),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.with(|st| st.write(ino.0, fh.0, offset, data, flags.0)) {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Not a sync: close(2) makes nothing durable.
        self.empty(reply, |_| Ok(()));
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.empty(reply, |st| {
            st.release(fh.0);
            Ok(())
        });
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.empty(reply, |st| st.sync_file(ino.0));
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.with(|st| st.open_dir(ino.0)) {
            Ok(()) => reply.opened(FileHandle(0), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let entries = self.with(|st| {
            let Node::Dir(d) = &st.inode(ino.0)?.node else {
                return Err(libc::ENOTDIR);
            };
            let mut v: Vec<(u64, FileType, OsString)> = vec![
                (ino.0, FileType::Directory, ".".into()),
                (d.parent, FileType::Directory, "..".into()),
            ];
            for (name, child) in &d.cur {
                let mode = st.inode(*child).map(|i| i.mode).unwrap_or(libc::S_IFREG);
                v.push((*child, kind(mode), name.clone()));
            }
            Ok(v)
        });
        match entries {
            Ok(v) => {
                // An entry's offset is where the next readdir resumes.
                for (n, (child, ty, name)) in v.into_iter().enumerate().skip(offset as usize) {
                    if reply.add(INodeNo(child), n as u64 + 1, ty, &name) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(e),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.empty(reply, |st| {
            st.close(ino.0);
            Ok(())
        });
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.empty(reply, |st| {
            st.sync_dir(ino.0);
            st.stats.dir_syncs += 1;
            Ok(())
        });
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.lock() {
            // 4 TiB, all free.
            Ok(_) => reply.statfs(1 << 30, 1 << 30, 1 << 30, 1 << 24, 1 << 24, 4096, 255, 4096),
            Err(e) => reply.error(e),
        }
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // Only asked without `default_permissions`; the kernel checks modes otherwise.
        self.empty(reply, |st| st.inode(ino.0).map(|_| ()));
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        match self.with(|st| {
            let mode = libc::S_IFREG | (mode & 0o7777);
            let ino = st.create_node(
                parent.0,
                name,
                State::new_file(),
                mode,
                0,
                (req.uid(), req.gid()),
            )?;
            let fh = st.open(ino, flags)?;
            st.add_lookup(ino);
            Ok((attr(st, ino)?, fh))
        }) {
            Ok((a, fh)) => reply.created(&TTL, &a, Generation(0), FileHandle(fh), FILE_OPEN),
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        self.empty(reply, |st| st.fallocate(ino.0, offset, length, mode));
    }
}
