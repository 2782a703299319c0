//! The in-memory file system: every inode holds a current and a durable state, and a cut
//! replaces the first with the second.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::{CutReport, Stats, TornWrite};

pub(crate) const ROOT: u64 = 1;
const PAGE: usize = 4096;
/// Tears happen at sector boundaries of the file, as on a disk.
const SECTOR: u64 = 512;

/// File data as copy-on-write pages, so that making a 16 MB file durable costs a few
/// thousand reference-count increments rather than a copy. `None` pages read as zeros.
/// Invariant: bytes at or past `len` in an allocated page are zero.
#[derive(Clone, Default)]
pub(crate) struct Content {
    pages: Vec<Option<Arc<[u8; PAGE]>>>,
    len: u64,
}

impl Content {
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    pub(crate) fn read(&self, offset: u64, size: usize) -> Vec<u8> {
        if offset >= self.len {
            return Vec::new();
        }
        let end = self.len.min(offset.saturating_add(size as u64));
        let mut out = Vec::with_capacity((end - offset) as usize);
        let mut pos = offset;
        while pos < end {
            let idx = (pos / PAGE as u64) as usize;
            let in_page = (pos % PAGE as u64) as usize;
            let n = (PAGE - in_page).min((end - pos) as usize);
            match self.pages.get(idx).and_then(Option::as_ref) {
                Some(page) => out.extend_from_slice(&page[in_page..in_page + n]),
                None => out.resize(out.len() + n, 0),
            }
            pos += n as u64;
        }
        out
    }

    pub(crate) fn write(&mut self, offset: u64, data: &[u8]) {
        let mut pos = offset;
        let mut rest = data;
        while !rest.is_empty() {
            let idx = (pos / PAGE as u64) as usize;
            let in_page = (pos % PAGE as u64) as usize;
            let n = (PAGE - in_page).min(rest.len());
            if self.pages.len() <= idx {
                self.pages.resize(idx + 1, None);
            }
            let page = self.pages[idx].get_or_insert_with(|| Arc::new([0; PAGE]));
            Arc::make_mut(page)[in_page..in_page + n].copy_from_slice(&rest[..n]);
            rest = &rest[n..];
            pos += n as u64;
        }
        self.len = self.len.max(offset + data.len() as u64);
    }

    pub(crate) fn set_len(&mut self, len: u64) {
        if len < self.len {
            let keep = len.div_ceil(PAGE as u64) as usize;
            self.pages.truncate(keep);
            let tail = (len % PAGE as u64) as usize;
            if tail != 0
                && let Some(Some(page)) = self.pages.last_mut()
            {
                Arc::make_mut(page)[tail..].fill(0);
            }
        }
        self.len = len;
    }
}

/// The last write to a file since its last sync, kept for tearing.
pub(crate) struct PendingWrite {
    seq: u64,
    offset: u64,
    data: Vec<u8>,
}

pub(crate) struct FileData {
    pub(crate) cur: Content,
    durable: Content,
    dirty: bool,
    unsynced_bytes: u64,
    last_write: Option<PendingWrite>,
}

impl FileData {
    fn new(content: Content, durable: bool) -> FileData {
        FileData {
            durable: if durable {
                content.clone()
            } else {
                Content::default()
            },
            dirty: !durable,
            cur: content,
            unsynced_bytes: 0,
            last_write: None,
        }
    }
}

pub(crate) struct DirData {
    pub(crate) cur: BTreeMap<OsString, u64>,
    durable: BTreeMap<OsString, u64>,
    pub(crate) parent: u64,
}

pub(crate) enum Node {
    File(FileData),
    Dir(DirData),
    Symlink(Vec<u8>),
    /// FIFOs, sockets and device nodes: the kernel serves them, we only keep the entry.
    Special,
}

pub(crate) struct Inode {
    pub(crate) node: Node,
    /// Full `st_mode`, type bits included.
    pub(crate) mode: u32,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pub(crate) rdev: u32,
    pub(crate) atime: SystemTime,
    pub(crate) mtime: SystemTime,
    pub(crate) ctime: SystemTime,
    /// Current directory entries naming this inode.
    pub(crate) links: u32,
    /// Durable directory entries naming this inode: it must outlive its unlink until then.
    durable_links: u32,
    /// Kernel references (FUSE lookup count).
    lookups: u64,
    /// Open files and directories.
    opens: u32,
}

impl Inode {
    fn new(node: Node, mode: u32, uid: u32, gid: u32) -> Inode {
        let now = SystemTime::now();
        Inode {
            node,
            mode,
            uid,
            gid,
            rdev: 0,
            atime: now,
            mtime: now,
            ctime: now,
            links: 0,
            durable_links: 0,
            lookups: 0,
            opens: 0,
        }
    }

    pub(crate) fn size(&self) -> u64 {
        match &self.node {
            Node::File(f) => f.cur.len(),
            Node::Dir(_) => 4096,
            Node::Symlink(t) => t.len() as u64,
            Node::Special => 0,
        }
    }
}

pub(crate) struct Handle {
    pub(crate) ino: u64,
    append: bool,
    sync: bool,
}

pub(crate) type Res<T> = Result<T, i32>;

pub(crate) struct State {
    pub(crate) inodes: HashMap<u64, Inode>,
    next_ino: u64,
    pub(crate) handles: HashMap<u64, Handle>,
    next_fh: u64,
    /// False from a cut until power on: every request then fails.
    pub(crate) powered: bool,
    /// Which FUSE session may use the state: requests of an older one fail.
    pub(crate) epoch: u64,
    drop_unsynced_entries: bool,
    write_seq: u64,
    pub(crate) stats: Stats,
    /// A cut waiting for a write (see `PowerCutFs::cut_at_write`).
    pub(crate) armed: Option<Armed>,
}

/// A cut that happens in the middle of the `writes_left`th write from now.
pub(crate) struct Armed {
    pub(crate) writes_left: u64,
    pub(crate) tear: Option<u64>,
    pub(crate) done: std::sync::mpsc::Sender<CutReport>,
}

fn is_sync(flags: i32) -> bool {
    flags & (libc::O_SYNC | libc::O_DSYNC) != 0
}

impl State {
    pub(crate) fn new(drop_unsynced_entries: bool) -> State {
        let mut root = Inode::new(
            Node::Dir(DirData {
                cur: BTreeMap::new(),
                durable: BTreeMap::new(),
                parent: ROOT,
            }),
            libc::S_IFDIR | 0o755,
            0,
            0,
        );
        root.links = 1;
        root.durable_links = 1;
        State {
            inodes: HashMap::from([(ROOT, root)]),
            next_ino: ROOT + 1,
            handles: HashMap::new(),
            next_fh: 1,
            powered: false,
            epoch: 0,
            drop_unsynced_entries,
            write_seq: 0,
            stats: Stats::default(),
            armed: None,
        }
    }

    pub(crate) fn inode(&self, ino: u64) -> Res<&Inode> {
        self.inodes.get(&ino).ok_or(libc::ENOENT)
    }

    fn inode_mut(&mut self, ino: u64) -> Res<&mut Inode> {
        self.inodes.get_mut(&ino).ok_or(libc::ENOENT)
    }

    fn dir(&self, ino: u64) -> Res<&DirData> {
        match &self.inode(ino)?.node {
            Node::Dir(d) => Ok(d),
            _ => Err(libc::ENOTDIR),
        }
    }

    fn dir_mut(&mut self, ino: u64) -> Res<&mut DirData> {
        match &mut self.inode_mut(ino)?.node {
            Node::Dir(d) => Ok(d),
            _ => Err(libc::ENOTDIR),
        }
    }

    fn file_mut(&mut self, ino: u64) -> Res<&mut FileData> {
        match &mut self.inode_mut(ino)?.node {
            Node::File(f) => Ok(f),
            Node::Dir(_) => Err(libc::EISDIR),
            _ => Err(libc::EINVAL),
        }
    }

    pub(crate) fn child(&self, parent: u64, name: &OsStr) -> Res<u64> {
        let dir = self.dir(parent)?;
        if name == "." {
            return Ok(parent);
        }
        if name == ".." {
            return Ok(dir.parent);
        }
        dir.cur.get(name).copied().ok_or(libc::ENOENT)
    }

    pub(crate) fn add_lookup(&mut self, ino: u64) {
        if let Some(i) = self.inodes.get_mut(&ino) {
            i.lookups += 1;
        }
    }

    pub(crate) fn forget(&mut self, ino: u64, n: u64) {
        if let Some(i) = self.inodes.get_mut(&ino) {
            i.lookups = i.lookups.saturating_sub(n);
            self.maybe_free(ino);
        }
    }

    fn alloc(&mut self, inode: Inode) -> u64 {
        let ino = self.next_ino;
        self.next_ino += 1;
        self.inodes.insert(ino, inode);
        ino
    }

    /// Owner and set-group-ID inheritance for a new inode in `parent`.
    fn new_owner(&self, parent: u64, uid: u32, gid: u32, is_dir: bool) -> Res<(u32, u32, u32)> {
        let p = self.inode(parent)?;
        if p.mode & libc::S_ISGID != 0 {
            Ok((uid, p.gid, if is_dir { libc::S_ISGID } else { 0 }))
        } else {
            Ok((uid, gid, 0))
        }
    }

    /// Creates an inode named `name` in `parent`.
    pub(crate) fn create_node(
        &mut self,
        parent: u64,
        name: &OsStr,
        node: Node,
        mode: u32,
        rdev: u32,
        (uid, gid): (u32, u32),
    ) -> Res<u64> {
        let is_dir = matches!(node, Node::Dir(_));
        if self.dir(parent)?.cur.contains_key(name) {
            return Err(libc::EEXIST);
        }
        if name.len() > 255 {
            return Err(libc::ENAMETOOLONG);
        }
        let (uid, gid, sgid) = self.new_owner(parent, uid, gid, is_dir)?;
        let mut inode = Inode::new(node, mode | sgid, uid, gid);
        inode.rdev = rdev;
        let ino = self.alloc(inode);
        self.add_entry(parent, name, ino)?;
        Ok(ino)
    }

    pub(crate) fn new_dir(parent: u64) -> Node {
        Node::Dir(DirData {
            cur: BTreeMap::new(),
            durable: BTreeMap::new(),
            parent,
        })
    }

    pub(crate) fn new_file() -> Node {
        Node::File(FileData::new(Content::default(), false))
    }

    fn add_entry(&mut self, parent: u64, name: &OsStr, ino: u64) -> Res<()> {
        let now = SystemTime::now();
        let dir = self.dir_mut(parent)?;
        dir.cur.insert(name.to_owned(), ino);
        let p = self.inode_mut(parent)?;
        p.mtime = now;
        p.ctime = now;
        let i = self.inode_mut(ino)?;
        i.links += 1;
        i.ctime = now;
        if let Node::Dir(d) = &mut i.node {
            d.parent = parent;
        }
        self.entries_changed(parent);
        Ok(())
    }

    fn remove_entry(&mut self, parent: u64, name: &OsStr) -> Res<u64> {
        let now = SystemTime::now();
        let ino = self.dir_mut(parent)?.cur.remove(name).ok_or(libc::ENOENT)?;
        let p = self.inode_mut(parent)?;
        p.mtime = now;
        p.ctime = now;
        if let Some(i) = self.inodes.get_mut(&ino) {
            i.links = i.links.saturating_sub(1);
            i.ctime = now;
        }
        self.entries_changed(parent);
        Ok(ino)
    }

    /// Without `drop_unsynced_entries`, every entry change is durable at once.
    fn entries_changed(&mut self, dir: u64) {
        if !self.drop_unsynced_entries {
            self.sync_dir(dir);
        }
    }

    /// Makes a directory's current entries durable.
    pub(crate) fn sync_dir(&mut self, dir: u64) {
        let Ok(d) = self.dir_mut(dir) else { return };
        let new = d.cur.clone();
        let old = std::mem::replace(&mut d.durable, new.clone());
        let mut dropped = Vec::new();
        for (name, ino) in &old {
            if new.get(name) != Some(ino)
                && let Some(i) = self.inodes.get_mut(ino)
            {
                i.durable_links = i.durable_links.saturating_sub(1);
                dropped.push(*ino);
            }
        }
        for (name, ino) in &new {
            if old.get(name) != Some(ino)
                && let Some(i) = self.inodes.get_mut(ino)
            {
                i.durable_links += 1;
            }
        }
        for ino in dropped {
            self.maybe_free(ino);
        }
    }

    /// Forgets inodes nothing can reach any more, now or after a cut.
    fn maybe_free(&mut self, ino: u64) {
        let mut work = vec![ino];
        while let Some(ino) = work.pop() {
            let Some(i) = self.inodes.get(&ino) else {
                continue;
            };
            if ino == ROOT || i.links > 0 || i.durable_links > 0 || i.opens > 0 || i.lookups > 0 {
                continue;
            }
            if let Some(Inode {
                node: Node::Dir(d), ..
            }) = self.inodes.remove(&ino)
            {
                for child in d.durable.values() {
                    if let Some(c) = self.inodes.get_mut(child) {
                        c.durable_links = c.durable_links.saturating_sub(1);
                        work.push(*child);
                    }
                }
                for child in d.cur.values() {
                    if let Some(c) = self.inodes.get_mut(child) {
                        c.links = c.links.saturating_sub(1);
                        work.push(*child);
                    }
                }
            }
        }
    }

    pub(crate) fn unlink(&mut self, parent: u64, name: &OsStr) -> Res<()> {
        let ino = self.child(parent, name)?;
        if matches!(self.inode(ino)?.node, Node::Dir(_)) {
            return Err(libc::EISDIR);
        }
        self.remove_entry(parent, name)?;
        self.maybe_free(ino);
        Ok(())
    }

    pub(crate) fn rmdir(&mut self, parent: u64, name: &OsStr) -> Res<()> {
        if name == "." {
            return Err(libc::EINVAL);
        }
        let ino = self.child(parent, name)?;
        if !self.dir(ino)?.cur.is_empty() {
            return Err(libc::ENOTEMPTY);
        }
        self.remove_entry(parent, name)?;
        self.maybe_free(ino);
        Ok(())
    }

    pub(crate) fn link(&mut self, ino: u64, parent: u64, name: &OsStr) -> Res<()> {
        if matches!(self.inode(ino)?.node, Node::Dir(_)) {
            return Err(libc::EPERM);
        }
        if self.dir(parent)?.cur.contains_key(name) {
            return Err(libc::EEXIST);
        }
        self.add_entry(parent, name, ino)
    }

    pub(crate) fn rename(
        &mut self,
        parent: u64,
        name: &OsStr,
        new_parent: u64,
        new_name: &OsStr,
        flags: u32,
    ) -> Res<()> {
        let src = self.child(parent, name)?;
        let dst = self.dir(new_parent)?.cur.get(new_name).copied();
        if flags & libc::RENAME_EXCHANGE != 0 {
            let dst = dst.ok_or(libc::ENOENT)?;
            self.dir_mut(parent)?.cur.insert(name.to_owned(), dst);
            self.dir_mut(new_parent)?
                .cur
                .insert(new_name.to_owned(), src);
            for (ino, p) in [(dst, parent), (src, new_parent)] {
                if let Node::Dir(d) = &mut self.inode_mut(ino)?.node {
                    d.parent = p;
                }
            }
            self.entries_changed(parent);
            self.entries_changed(new_parent);
            return Ok(());
        }
        if flags & !libc::RENAME_NOREPLACE != 0 {
            return Err(libc::EINVAL);
        }
        let src_is_dir = matches!(self.inode(src)?.node, Node::Dir(_));
        if let Some(dst) = dst {
            if flags & libc::RENAME_NOREPLACE != 0 {
                return Err(libc::EEXIST);
            }
            if dst == src {
                return Ok(());
            }
            match (&self.inode(dst)?.node, src_is_dir) {
                (Node::Dir(d), true) if !d.cur.is_empty() => return Err(libc::ENOTEMPTY),
                (Node::Dir(_), true) => {}
                (Node::Dir(_), false) => return Err(libc::EISDIR),
                (_, true) => return Err(libc::ENOTDIR),
                (_, false) => {}
            }
            self.remove_entry(new_parent, new_name)?;
        }
        self.remove_entry(parent, name)?;
        self.add_entry(new_parent, new_name, src)?;
        if let Some(dst) = dst {
            self.maybe_free(dst);
        }
        Ok(())
    }

    pub(crate) fn open(&mut self, ino: u64, flags: i32) -> Res<u64> {
        let inode = self.inode_mut(ino)?;
        if let Node::File(f) = &mut inode.node
            && flags & libc::O_TRUNC != 0
            && flags & libc::O_ACCMODE != libc::O_RDONLY
            && f.cur.len() != 0
        {
            f.cur.set_len(0);
            f.dirty = true;
            inode.mtime = SystemTime::now();
            inode.ctime = inode.mtime;
        }
        inode.opens += 1;
        let fh = self.next_fh;
        self.next_fh += 1;
        self.handles.insert(
            fh,
            Handle {
                ino,
                append: flags & libc::O_APPEND != 0,
                sync: is_sync(flags),
            },
        );
        Ok(fh)
    }

    pub(crate) fn release(&mut self, fh: u64) {
        if let Some(h) = self.handles.remove(&fh) {
            self.close(h.ino);
        }
    }

    pub(crate) fn open_dir(&mut self, ino: u64) -> Res<()> {
        self.dir(ino)?;
        self.inode_mut(ino)?.opens += 1;
        Ok(())
    }

    pub(crate) fn close(&mut self, ino: u64) {
        if let Some(i) = self.inodes.get_mut(&ino) {
            i.opens = i.opens.saturating_sub(1);
            self.maybe_free(ino);
        }
    }

    pub(crate) fn read(&mut self, ino: u64, offset: u64, size: u32) -> Res<Vec<u8>> {
        match &self.inode(ino)?.node {
            Node::File(f) => Ok(f.cur.read(offset, size as usize)),
            Node::Dir(_) => Err(libc::EISDIR),
            _ => Err(libc::EINVAL),
        }
    }

    pub(crate) fn write(
        &mut self,
        ino: u64,
        fh: u64,
        offset: u64,
        data: &[u8],
        flags: i32,
    ) -> Res<()> {
        let (append, sync) = match self.handles.get(&fh) {
            Some(h) => (h.append, h.sync || is_sync(flags)),
            None => (flags & libc::O_APPEND != 0, is_sync(flags)),
        };
        self.write_seq += 1;
        let seq = self.write_seq;
        self.stats.writes += 1;
        self.stats.bytes_written += data.len() as u64;
        let now = SystemTime::now();
        let inode = self.inode_mut(ino)?;
        inode.mtime = now;
        inode.ctime = now;
        let Node::File(f) = &mut inode.node else {
            return Err(libc::EINVAL);
        };
        let offset = if append { f.cur.len() } else { offset };
        f.cur.write(offset, data);
        if sync {
            // O_SYNC / O_DSYNC: this write, and only it, reaches the disk now.
            f.durable.write(offset, data);
        } else {
            f.dirty = true;
            f.unsynced_bytes += data.len() as u64;
            let mut buf = f.last_write.take().map(|w| w.data).unwrap_or_default();
            buf.clear();
            buf.extend_from_slice(data);
            f.last_write = Some(PendingWrite {
                seq,
                offset,
                data: buf,
            });
        }
        if let Some(armed) = &mut self.armed {
            armed.writes_left -= 1;
            if armed.writes_left == 0 {
                // The power goes while this write is on its way: a tear keeps part of it, and the
                // writer hears nothing but EIO.
                let Armed { tear, done, .. } = self.armed.take().expect("armed");
                let _ = done.send(self.cut(tear));
                return Err(libc::EIO);
            }
        }
        Ok(())
    }

    pub(crate) fn truncate(&mut self, ino: u64, size: u64) -> Res<()> {
        let f = self.file_mut(ino)?;
        if f.cur.len() != size {
            f.cur.set_len(size);
            f.dirty = true;
        }
        Ok(())
    }

    pub(crate) fn fallocate(&mut self, ino: u64, offset: u64, length: u64, mode: i32) -> Res<()> {
        let f = self.file_mut(ino)?;
        match mode {
            0 => {
                let end = offset.checked_add(length).ok_or(libc::EFBIG)?;
                if end > f.cur.len() {
                    f.cur.set_len(end);
                    f.dirty = true;
                }
                Ok(())
            }
            libc::FALLOC_FL_KEEP_SIZE => Ok(()),
            _ => Err(libc::EOPNOTSUPP),
        }
    }

    /// Everything becomes durable, as `sync(1)` makes it (see `PowerCutFs::settle`).
    pub(crate) fn settle(&mut self) {
        let inos: Vec<u64> = self.inodes.keys().copied().collect();
        for ino in inos {
            match self.inodes.get_mut(&ino).map(|i| &mut i.node) {
                Some(Node::File(f)) => {
                    f.durable = f.cur.clone();
                    f.dirty = false;
                    f.unsynced_bytes = 0;
                    f.last_write = None;
                }
                Some(Node::Dir(_)) => self.sync_dir(ino),
                _ => {}
            }
        }
    }

    /// fsync and fdatasync of a file: its current content becomes durable.
    pub(crate) fn sync_file(&mut self, ino: u64) -> Res<()> {
        match &mut self.inode_mut(ino)?.node {
            Node::File(f) => {
                f.durable = f.cur.clone();
                f.dirty = false;
                f.unsynced_bytes = 0;
                f.last_write = None;
                self.stats.file_syncs += 1;
            }
            Node::Dir(_) => {
                self.sync_dir(ino);
                self.stats.dir_syncs += 1;
            }
            _ => {}
        }
        Ok(())
    }

    /// The power cut. See `PowerCutFs::cut`.
    pub(crate) fn cut(&mut self, tear: Option<u64>) -> CutReport {
        self.powered = false;
        self.armed = None;
        let mut report = CutReport::default();
        for inode in self.inodes.values_mut() {
            match &mut inode.node {
                Node::File(f) if f.dirty => {
                    report.files_with_dropped_writes += 1;
                    report.bytes_dropped += f.unsynced_bytes;
                }
                Node::Dir(d) if self.drop_unsynced_entries && d.cur != d.durable => {
                    let gone = d.cur.iter().filter(|&(n, i)| d.durable.get(n) != Some(i));
                    let back = d.durable.iter().filter(|&(n, i)| d.cur.get(n) != Some(i));
                    report.entries_dropped += gone.count() + back.count();
                    d.cur = d.durable.clone();
                }
                _ => {}
            }
        }
        let paths = self.rebuild_tree();

        let torn = tear.and_then(|seed| {
            let (ino, w) = self
                .inodes
                .iter()
                .filter_map(|(ino, i)| match &i.node {
                    Node::File(FileData {
                        last_write: Some(w),
                        ..
                    }) => Some((*ino, w)),
                    _ => None,
                })
                .max_by_key(|(_, w)| w.seq)?;
            let kept = torn_len(w.offset, w.data.len() as u64, seed);
            Some((ino, w.offset, w.data.len() as u64, kept))
        });
        if let Some((ino, offset, len, kept)) = torn {
            if let Some(Inode {
                node: Node::File(f),
                ..
            }) = self.inodes.get_mut(&ino)
                && let Some(w) = &f.last_write
            {
                f.durable.write(offset, &w.data[..kept as usize]);
            }
            report.torn = Some(TornWrite {
                path: paths
                    .get(&ino)
                    .cloned()
                    .unwrap_or_else(|| format!("<inode {ino}>")),
                offset,
                len,
                kept,
            });
        }
        for inode in self.inodes.values_mut() {
            if let Node::File(f) = &mut inode.node {
                f.cur = f.durable.clone();
                f.dirty = false;
                f.unsynced_bytes = 0;
                f.last_write = None;
            }
        }
        report
    }

    /// After a cut: drops every handle and kernel reference, keeps what the root reaches
    /// through the directories' entries, and recounts links. Returns each inode's path.
    fn rebuild_tree(&mut self) -> HashMap<u64, String> {
        self.handles.clear();
        let mut paths = HashMap::from([(ROOT, String::new())]);
        let mut seen = HashSet::from([ROOT]);
        let mut queue = VecDeque::from([ROOT]);
        let mut links: HashMap<u64, u32> = HashMap::from([(ROOT, 1)]);
        while let Some(dir) = queue.pop_front() {
            let Some(Inode {
                node: Node::Dir(d), ..
            }) = self.inodes.get(&dir)
            else {
                continue;
            };
            let base = paths[&dir].clone();
            let mut keep = BTreeMap::new();
            for (name, ino) in &d.cur {
                let Some(child) = self.inodes.get(ino) else {
                    continue;
                };
                let is_dir = matches!(child.node, Node::Dir(_));
                // Entries restored from two directories' durable states can name one
                // directory twice; a real file system's journal never shows that.
                if is_dir && !seen.insert(*ino) {
                    continue;
                }
                seen.insert(*ino);
                keep.insert(name.clone(), *ino);
                *links.entry(*ino).or_default() += 1;
                paths
                    .entry(*ino)
                    .or_insert_with(|| format!("{base}/{}", name.to_string_lossy()));
                if is_dir {
                    queue.push_back(*ino);
                }
            }
            let mut children = Vec::new();
            if let Some(Inode {
                node: Node::Dir(d), ..
            }) = self.inodes.get_mut(&dir)
            {
                d.cur = keep;
                d.durable = d.cur.clone();
                children.extend(d.cur.values().copied());
            }
            for c in children {
                if let Some(Inode {
                    node: Node::Dir(cd),
                    ..
                }) = self.inodes.get_mut(&c)
                {
                    cd.parent = dir;
                }
            }
        }
        self.inodes.retain(|ino, _| seen.contains(ino));
        for (ino, inode) in &mut self.inodes {
            let n = links.get(ino).copied().unwrap_or(0);
            inode.links = n;
            inode.durable_links = n;
            inode.lookups = 0;
            inode.opens = 0;
        }
        paths
    }

    /// Before a new FUSE session: the old kernel's references and handles are gone.
    pub(crate) fn reset_kernel_refs(&mut self) {
        self.handles.clear();
        let inos: Vec<u64> = self.inodes.keys().copied().collect();
        for ino in &inos {
            if let Some(i) = self.inodes.get_mut(ino) {
                i.lookups = 0;
                i.opens = 0;
            }
        }
        for ino in inos {
            self.maybe_free(ino);
        }
    }

    pub(crate) fn set_times(
        &mut self,
        ino: u64,
        atime: Option<SystemTime>,
        mtime: Option<SystemTime>,
    ) -> Res<()> {
        let i = self.inode_mut(ino)?;
        if let Some(t) = atime {
            i.atime = t;
        }
        if let Some(t) = mtime {
            i.mtime = t;
        }
        Ok(())
    }

    pub(crate) fn chmod_chown(
        &mut self,
        ino: u64,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
    ) -> Res<()> {
        let i = self.inode_mut(ino)?;
        if let Some(m) = mode {
            i.mode = (i.mode & libc::S_IFMT) | (m & 0o7777);
        }
        if let Some(u) = uid {
            i.uid = u;
        }
        if let Some(g) = gid {
            i.gid = g;
        }
        i.ctime = SystemTime::now();
        Ok(())
    }

    /// Number of subdirectories, for a directory's link count.
    pub(crate) fn subdirs(&self, d: &DirData) -> u32 {
        d.cur
            .values()
            .filter(|i| matches!(self.inodes.get(i).map(|i| &i.node), Some(Node::Dir(_))))
            .count() as u32
    }

    /// Copies `seed` into the (empty) tree; everything in it is durable.
    pub(crate) fn load_seed(&mut self, seed: &Path) -> io::Result<()> {
        let meta = std::fs::metadata(seed)?;
        if !meta.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("seed {} is not a directory", seed.display()),
            ));
        }
        set_meta(self.inodes.get_mut(&ROOT).expect("root exists"), &meta);
        let mut hard_links = HashMap::new();
        self.load_dir(seed, ROOT, &mut hard_links)?;
        let dirs: Vec<u64> = self.inodes.keys().copied().collect();
        for d in dirs {
            self.sync_dir(d);
        }
        Ok(())
    }

    fn load_dir(
        &mut self,
        src: &Path,
        dir: u64,
        hard_links: &mut HashMap<(u64, u64), u64>,
    ) -> io::Result<()> {
        let ctx =
            |e: io::Error, p: &Path| io::Error::new(e.kind(), format!("seed {}: {e}", p.display()));
        for entry in std::fs::read_dir(src).map_err(|e| ctx(e, src))? {
            let entry = entry.map_err(|e| ctx(e, src))?;
            let path = entry.path();
            let meta = std::fs::symlink_metadata(&path).map_err(|e| ctx(e, &path))?;
            let name = entry.file_name();
            let key = (meta.dev(), meta.ino());
            if !meta.is_dir()
                && meta.nlink() > 1
                && let Some(&ino) = hard_links.get(&key)
            {
                self.add_entry(dir, &name, ino)
                    .map_err(io::Error::from_raw_os_error)?;
                continue;
            }
            let ft = meta.file_type();
            let node = if ft.is_dir() {
                State::new_dir(dir)
            } else if ft.is_file() {
                let data = std::fs::read(&path).map_err(|e| ctx(e, &path))?;
                let mut c = Content::default();
                c.write(0, &data);
                Node::File(FileData::new(c, true))
            } else if ft.is_symlink() {
                let target = std::fs::read_link(&path).map_err(|e| ctx(e, &path))?;
                Node::Symlink(target.as_os_str().as_bytes().to_vec())
            } else if ft.is_fifo() || ft.is_socket() || ft.is_block_device() || ft.is_char_device()
            {
                Node::Special
            } else {
                continue;
            };
            let mut inode = Inode::new(node, meta.mode(), meta.uid(), meta.gid());
            inode.rdev = meta.rdev() as u32;
            set_meta(&mut inode, &meta);
            let ino = self.alloc(inode);
            self.add_entry(dir, &name, ino)
                .map_err(io::Error::from_raw_os_error)?;
            if ft.is_dir() {
                self.load_dir(&path, ino, hard_links)?;
            } else if meta.nlink() > 1 {
                hard_links.insert(key, ino);
            }
        }
        Ok(())
    }

    /// A copy of the durable tree, taken under the lock and written out without it.
    pub(crate) fn durable_snapshot(&self) -> Vec<SnapshotEntry> {
        let mut out = Vec::new();
        let mut first_path: HashMap<u64, PathBuf> = HashMap::new();
        let mut seen_dirs = HashSet::from([ROOT]);
        let mut queue = VecDeque::from([(ROOT, PathBuf::new())]);
        if let Some(root) = self.inodes.get(&ROOT) {
            out.push(SnapshotEntry::new(PathBuf::new(), root, SnapshotKind::Dir));
        }
        while let Some((dir, path)) = queue.pop_front() {
            let Some(Inode {
                node: Node::Dir(d), ..
            }) = self.inodes.get(&dir)
            else {
                continue;
            };
            for (name, ino) in &d.durable {
                let Some(i) = self.inodes.get(ino) else {
                    continue;
                };
                let p = path.join(name);
                let kind = match &i.node {
                    Node::Dir(_) => {
                        if !seen_dirs.insert(*ino) {
                            continue;
                        }
                        queue.push_back((*ino, p.clone()));
                        SnapshotKind::Dir
                    }
                    _ if first_path.contains_key(ino) => {
                        SnapshotKind::HardLink(first_path[ino].clone())
                    }
                    Node::File(f) => SnapshotKind::File(f.durable.clone()),
                    Node::Symlink(t) => SnapshotKind::Symlink(OsStr::from_bytes(t).into()),
                    Node::Special => SnapshotKind::Special,
                };
                first_path.entry(*ino).or_insert_with(|| p.clone());
                out.push(SnapshotEntry::new(p, i, kind));
            }
        }
        out
    }
}

pub(crate) enum SnapshotKind {
    Dir,
    File(Content),
    Symlink(PathBuf),
    HardLink(PathBuf),
    Special,
}

pub(crate) struct SnapshotEntry {
    pub(crate) path: PathBuf,
    pub(crate) kind: SnapshotKind,
    pub(crate) mode: u32,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pub(crate) rdev: u32,
    pub(crate) mtime: SystemTime,
}

impl SnapshotEntry {
    fn new(path: PathBuf, i: &Inode, kind: SnapshotKind) -> SnapshotEntry {
        SnapshotEntry {
            path,
            kind,
            mode: i.mode,
            uid: i.uid,
            gid: i.gid,
            rdev: i.rdev,
            mtime: i.mtime,
        }
    }
}

fn set_meta(inode: &mut Inode, meta: &std::fs::Metadata) {
    let t = |s: i64, ns: i64| {
        if s >= 0 {
            UNIX_EPOCH + Duration::new(s as u64, ns as u32)
        } else {
            UNIX_EPOCH
        }
    };
    inode.mode = meta.mode();
    inode.uid = meta.uid();
    inode.gid = meta.gid();
    inode.atime = t(meta.atime(), meta.atime_nsec());
    inode.mtime = t(meta.mtime(), meta.mtime_nsec());
    inode.ctime = t(meta.ctime(), meta.ctime_nsec());
}

/// How much of a torn write of `len` bytes at `offset` reaches the disk: 0, or up to one of
/// the sector boundaries inside it, drawn from `seed`. Always less than `len`.
pub(crate) fn torn_len(offset: u64, len: u64, seed: u64) -> u64 {
    let end = offset + len;
    let first = (offset / SECTOR + 1) * SECTOR;
    let inner = if first < end {
        (end - 1 - first) / SECTOR + 1
    } else {
        0
    };
    let r = splitmix64(seed) % (inner + 1);
    if r == 0 {
        0
    } else {
        first - offset + (r - 1) * SECTOR
    }
}

fn splitmix64(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_cow_and_truncate() {
        let mut c = Content::default();
        c.write(4090, b"0123456789");
        let snap = c.clone();
        c.write(4090, b"abcdefghij");
        assert_eq!(snap.read(4090, 10), b"0123456789");
        assert_eq!(c.read(4090, 10), b"abcdefghij");
        c.set_len(4092);
        c.set_len(4100);
        assert_eq!(c.read(4090, 10), b"ab\0\0\0\0\0\0\0\0");
        assert_eq!(c.read(0, 3), b"\0\0\0");
    }

    #[test]
    fn torn_len_is_a_sector_boundary_inside_the_write() {
        for seed in 0..200 {
            let k = torn_len(100, 5000, seed);
            assert!(k < 5000);
            assert!(k == 0 || (100 + k).is_multiple_of(SECTOR), "{k}");
        }
        assert_eq!(torn_len(0, 512, 7), 0);
    }
}
