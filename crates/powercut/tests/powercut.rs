//! Mounts the kit for real (needs root and /dev/fuse: a test that cannot mount fails).

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, ErrorKind, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use powercut::{Options, PowerCutFs};

/// Field order matters: the mount goes before its directory.
struct Fixture {
    fs: PowerCutFs,
    _dir: tempfile::TempDir,
}

impl Fixture {
    fn new(options: Options) -> Fixture {
        Fixture::with_seed(None, options)
    }

    fn with_seed(seed: Option<&Path>, options: Options) -> Fixture {
        let dir = tempfile::tempdir().expect("temporary directory");
        // Other users (nobody, postgres) must be able to reach the mount point.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
        let mnt = dir.path().join("mnt");
        fs::create_dir(&mnt).expect("mount point");
        let fs = PowerCutFs::mount(&mnt, seed, options)
            .unwrap_or_else(|e| panic!("cannot mount the power-cut file system: {e}"));
        Fixture { fs, _dir: dir }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.fs.mountpoint().join(rel)
    }

    fn sync_dir(&self, rel: &str) {
        File::open(self.path(rel))
            .expect("open dir")
            .sync_all()
            .expect("fsync dir");
    }
}

fn no_entry_drops() -> Options {
    Options {
        drop_unsynced_entries: false,
        ..Options::default()
    }
}

fn is_eio<T: std::fmt::Debug>(r: std::io::Result<T>) -> bool {
    match r {
        Err(e) => e.raw_os_error() == Some(libc::EIO),
        Ok(v) => panic!("expected EIO, got {v:?}"),
    }
}

#[test]
fn synced_data_survives_and_unsynced_data_is_lost() {
    let mut fx = Fixture::new(Options::default());
    let p = fx.path("f");
    let mut f = File::create(&p).unwrap();
    fx.sync_dir("");
    f.write_all(b"durable").unwrap();
    f.sync_all().unwrap();
    f.write_all(b" and then lost, growing the file").unwrap();
    assert_eq!(fs::metadata(&p).unwrap().len(), 39);
    drop(f);

    let report = fx.fs.cut(None);
    assert_eq!(report.files_with_dropped_writes, 1);
    assert_eq!(report.bytes_dropped, 32);
    assert_eq!(report.entries_dropped, 0);
    assert!(report.torn.is_none());
    fx.fs.power_on().unwrap();

    assert_eq!(fs::read(&p).unwrap(), b"durable");
    assert_eq!(fs::metadata(&p).unwrap().len(), 7);
    let s = fx.fs.stats();
    assert_eq!(
        (s.file_syncs, s.dir_syncs, s.writes, s.bytes_written),
        (1, 1, 2, 39)
    );
}

#[test]
fn truncation_and_overwrites_are_undone_too() {
    let mut fx = Fixture::new(Options::default());
    let p = fx.path("f");
    let data: Vec<u8> = (0..20_000u32).map(|i| i as u8).collect();
    let mut f = File::create(&p).unwrap();
    f.write_all(&data).unwrap();
    f.sync_data().unwrap();
    fx.sync_dir("");
    f.set_len(100).unwrap();
    f.seek(SeekFrom::Start(0)).unwrap();
    f.write_all(b"XXXX").unwrap();
    drop(f);
    fx.fs.cut(None);
    fx.fs.power_on().unwrap();
    assert_eq!(fs::read(&p).unwrap(), data);
}

#[test]
fn fdatasync_counts_as_fsync_and_dsync_writes_are_durable() {
    let mut fx = Fixture::new(no_entry_drops());
    let mut a = File::create(fx.path("a")).unwrap();
    a.write_all(b"datasynced").unwrap();
    a.sync_data().unwrap();
    a.write_all(b"-lost").unwrap();
    let mut b = OpenOptions::new()
        .create(true)
        .write(true)
        .custom_flags(libc::O_DSYNC)
        .open(fx.path("b"))
        .unwrap();
    b.write_all(b"dsync write").unwrap();
    let mut c = OpenOptions::new()
        .create(true)
        .write(true)
        .custom_flags(libc::O_SYNC)
        .open(fx.path("c"))
        .unwrap();
    c.write_all(b"osync write").unwrap();
    drop((a, b, c));
    fx.fs.cut(None);
    fx.fs.power_on().unwrap();
    assert_eq!(fs::read(fx.path("a")).unwrap(), b"datasynced");
    assert_eq!(fs::read(fx.path("b")).unwrap(), b"dsync write");
    assert_eq!(fs::read(fx.path("c")).unwrap(), b"osync write");
}

#[test]
fn unsynced_directory_entries_are_dropped() {
    let mut fx = Fixture::new(Options::default());
    // Created, written and fsynced, and so was its directory: kept.
    let mut f = File::create(fx.path("kept")).unwrap();
    f.write_all(b"kept data").unwrap();
    f.sync_all().unwrap();
    fs::create_dir(fx.path("d")).unwrap();
    fs::write(fx.path("d/old"), b"old content").unwrap();
    File::open(fx.path("d/old")).unwrap().sync_all().unwrap();
    fs::write(fx.path("victim"), b"victim content").unwrap();
    File::open(fx.path("victim")).unwrap().sync_all().unwrap();
    fx.sync_dir("d");
    fx.sync_dir("");
    // The same without the directory fsync: gone.
    let mut f = File::create(fx.path("lost")).unwrap();
    f.write_all(b"x").unwrap();
    f.sync_all().unwrap();
    drop(f);

    // Not followed by a directory fsync: undone.
    fs::rename(fx.path("d/old"), fx.path("d/new")).unwrap();
    fs::remove_file(fx.path("victim")).unwrap();
    fs::create_dir(fx.path("newdir")).unwrap();

    let report = fx.fs.cut(None);
    // d: -old +new; root: -victim +lost +newdir.
    assert_eq!(report.entries_dropped, 5, "{report:?}");
    fx.fs.power_on().unwrap();
    assert_eq!(fs::read(fx.path("kept")).unwrap(), b"kept data");
    assert_eq!(
        fs::metadata(fx.path("lost")).unwrap_err().kind(),
        ErrorKind::NotFound
    );
    assert_eq!(fs::read(fx.path("d/old")).unwrap(), b"old content");
    assert!(!fx.path("d/new").exists());
    assert_eq!(fs::read(fx.path("victim")).unwrap(), b"victim content");
    assert!(!fx.path("newdir").exists());
    let mut names: Vec<_> = fs::read_dir(fx.path(""))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["d", "kept", "victim"]);
    // And it is writable again, with the same rules.
    fs::write(fx.path("d/again"), b"1").unwrap();
    assert_eq!(fs::read(fx.path("d/again")).unwrap(), b"1");
}

#[test]
fn synced_rename_over_a_file_and_hard_links_survive() {
    let mut fx = Fixture::new(Options::default());
    for (name, data) in [("a", "A"), ("b", "B")] {
        let mut f = File::create(fx.path(name)).unwrap();
        f.write_all(data.as_bytes()).unwrap();
        f.sync_all().unwrap();
    }
    fx.sync_dir("");
    fs::rename(fx.path("a"), fx.path("b")).unwrap();
    fs::hard_link(fx.path("b"), fx.path("link")).unwrap();
    fx.sync_dir("");
    assert_eq!(fs::metadata(fx.path("b")).unwrap().nlink(), 2);
    fx.fs.cut(None);
    fx.fs.power_on().unwrap();
    assert!(!fx.path("a").exists());
    assert_eq!(fs::read(fx.path("b")).unwrap(), b"A");
    assert_eq!(fs::read(fx.path("link")).unwrap(), b"A");
    let (b, link) = (
        fs::metadata(fx.path("b")).unwrap(),
        fs::metadata(fx.path("link")).unwrap(),
    );
    assert_eq!((b.ino(), b.nlink()), (link.ino(), 2));
}

#[test]
fn unlinked_open_file_stays_readable_until_closed() {
    let fx = Fixture::new(Options::default());
    fs::write(fx.path("f"), b"still here").unwrap();
    let mut f = File::open(fx.path("f")).unwrap();
    fs::remove_file(fx.path("f")).unwrap();
    fx.sync_dir("");
    assert!(!fx.path("f").exists());
    let mut s = String::new();
    f.read_to_string(&mut s).unwrap();
    assert_eq!(s, "still here");
}

#[test]
fn without_entry_drops_a_created_file_survives_with_its_synced_data() {
    let mut fx = Fixture::new(no_entry_drops());
    let mut f = File::create(fx.path("f")).unwrap();
    f.write_all(b"synced").unwrap();
    f.sync_all().unwrap();
    f.write_all(b" unsynced").unwrap();
    fs::write(fx.path("never-synced"), b"data").unwrap();
    fs::create_dir(fx.path("d")).unwrap();
    drop(f);
    let report = fx.fs.cut(None);
    assert_eq!(report.entries_dropped, 0);
    fx.fs.power_on().unwrap();
    assert_eq!(fs::read(fx.path("f")).unwrap(), b"synced");
    assert_eq!(fs::read(fx.path("never-synced")).unwrap(), b"");
    assert!(fx.path("d").is_dir());
}

/// Runs: a synced file, then one unsynced 64 KiB write at offset 1000; cuts with `seed`.
fn torn_run(seed: u64) -> (powercut::CutReport, Vec<u8>) {
    let mut fx = Fixture::new(Options::default());
    let p = fx.path("wal");
    let mut f = File::create(&p).unwrap();
    f.write_all(&[b'a'; 3000]).unwrap();
    f.sync_all().unwrap();
    fx.sync_dir("");
    f.seek(SeekFrom::Start(1000)).unwrap();
    f.write_all(&[b'b'; 65536]).unwrap();
    drop(f);
    let report = fx.fs.cut(Some(seed));
    fx.fs.power_on().unwrap();
    (report, fs::read(&p).unwrap())
}

#[test]
fn tearing_keeps_a_deterministic_prefix_of_the_last_write() {
    let mut saw_partial = false;
    for seed in 0..4 {
        let (report, data) = torn_run(seed);
        let torn = report.torn.clone().expect("a torn write");
        assert_eq!(
            (torn.path.as_str(), torn.offset, torn.len),
            ("/wal", 1000, 65536)
        );
        assert!(torn.kept < torn.len);
        assert!(
            torn.kept == 0 || (1000 + torn.kept).is_multiple_of(512),
            "{torn:?}"
        );
        let end = (1000 + torn.kept as usize).max(3000);
        assert_eq!(data.len(), end);
        assert!(data[..1000].iter().all(|&b| b == b'a'));
        assert!(
            data[1000..1000 + torn.kept as usize]
                .iter()
                .all(|&b| b == b'b')
        );
        assert!(data[1000 + torn.kept as usize..].iter().all(|&b| b == b'a'));
        saw_partial |= torn.kept > 0;
        let (again, data_again) = torn_run(seed);
        assert_eq!(
            again.torn.expect("torn again").kept,
            torn.kept,
            "same seed, same tear"
        );
        assert_eq!(data_again, data);
    }
    assert!(saw_partial, "some seed keeps part of the write");
}

#[test]
fn after_a_cut_everything_fails_and_power_on_serves_the_durable_image() {
    let mut fx = Fixture::new(Options::default());
    fs::create_dir(fx.path("d")).unwrap();
    let mut f = File::create(fx.path("d/f")).unwrap();
    f.write_all(b"synced").unwrap();
    f.sync_all().unwrap();
    fx.sync_dir("d");
    fx.sync_dir("");
    let mut reader = File::open(fx.path("d/f")).unwrap();

    fx.fs.cut(None);
    assert!(is_eio(f.write_all(b"more")));
    assert!(is_eio(f.sync_all()));
    let mut buf = [0; 6];
    assert!(is_eio(reader.read(&mut buf)));
    assert!(is_eio(fs::read(fx.path("d/f"))));
    assert!(is_eio(fs::metadata(fx.path("d/f"))));
    assert!(is_eio(fs::write(fx.path("d/new"), b"x")));
    assert!(is_eio(fs::read_dir(fx.path("d"))));
    drop((f, reader));

    fx.fs.power_on().unwrap();
    assert_eq!(fs::read(fx.path("d/f")).unwrap(), b"synced");
    fs::write(fx.path("d/new"), b"writable").unwrap();
    assert_eq!(fs::read(fx.path("d/new")).unwrap(), b"writable");
}

#[test]
fn power_on_with_files_still_open_does_not_hang() {
    let mut fx = Fixture::new(Options::default());
    let f = File::create(fx.path("held")).unwrap();
    fx.fs.cut(None);
    // The mount is busy: power_on detaches it and aborts the old connection.
    fx.fs.power_on().unwrap();
    assert!(!fx.path("held").exists());
    drop(f);
    fs::write(fx.path("x"), b"1").unwrap();
}

#[test]
fn the_seed_is_copied_in_and_durable() {
    let seed = tempfile::tempdir().unwrap();
    let s = seed.path();
    fs::create_dir_all(s.join("sub/deeper")).unwrap();
    fs::write(s.join("sub/deeper/file"), b"seeded").unwrap();
    fs::set_permissions(s.join("sub/deeper/file"), fs::Permissions::from_mode(0o640)).unwrap();
    std::os::unix::fs::chown(s.join("sub/deeper/file"), Some(65534), Some(65534)).unwrap();
    std::os::unix::fs::symlink("deeper/file", s.join("sub/link")).unwrap();
    fs::hard_link(s.join("sub/deeper/file"), s.join("hard")).unwrap();

    let mut fx = Fixture::with_seed(Some(s), Options::default());
    fx.fs.cut(None);
    fx.fs.power_on().unwrap();
    assert_eq!(fs::read(fx.path("sub/deeper/file")).unwrap(), b"seeded");
    assert_eq!(fs::read(fx.path("sub/link")).unwrap(), b"seeded");
    assert_eq!(
        fs::read_link(fx.path("sub/link")).unwrap(),
        Path::new("deeper/file")
    );
    let m = fs::metadata(fx.path("sub/deeper/file")).unwrap();
    assert_eq!(
        (m.mode() & 0o7777, m.uid(), m.gid(), m.nlink()),
        (0o640, 65534, 65534, 2)
    );
    assert_eq!(m.ino(), fs::metadata(fx.path("hard")).unwrap().ino());

    let out = tempfile::tempdir().unwrap();
    fx.fs.save_durable_image(out.path()).unwrap();
    assert_eq!(
        fs::read(out.path().join("sub/deeper/file")).unwrap(),
        b"seeded"
    );
    assert_eq!(fs::read(out.path().join("hard")).unwrap(), b"seeded");
    let m = fs::metadata(out.path().join("sub/deeper/file")).unwrap();
    assert_eq!((m.mode() & 0o7777, m.uid(), m.nlink()), (0o640, 65534, 2));
}

#[test]
fn files_created_by_another_user_belong_to_it() {
    let fx = Fixture::new(Options::default());
    let d = fx.path("d");
    fs::create_dir(&d).unwrap();
    std::os::unix::fs::chown(&d, Some(65534), Some(65534)).unwrap();
    let out = Command::new("runuser")
        .args([
            "-u",
            "nobody",
            "--",
            "sh",
            "-c",
            "echo hi > file && mkdir sub && ls -ln",
        ])
        .current_dir(&d)
        .output()
        .expect("run runuser");
    assert!(
        out.status.success(),
        "runuser: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for name in ["file", "sub"] {
        let m = fs::metadata(d.join(name)).unwrap();
        assert_eq!((m.uid(), m.gid()), (65534, 65534), "{name}");
    }
    assert_eq!(fs::read(d.join("file")).unwrap(), b"hi\n");
    // default_permissions: the kernel enforces modes for other users.
    fs::write(fx.path("root-only"), b"secret").unwrap();
    fs::set_permissions(fx.path("root-only"), fs::Permissions::from_mode(0o600)).unwrap();
    let out = Command::new("runuser")
        .args(["-u", "nobody", "--", "cat"])
        .arg(fx.path("root-only"))
        .output()
        .unwrap();
    assert!(!out.status.success(), "nobody read a 0600 root file");
}

const SLED_CHILD: &str = "POWERCUT_SLED_CHILD";

/// Not a test of its own: the sled process of `sled_flush_versus_fsync`, which runs this
/// binary again. Opens sled at `$POWERCUT_SLED_CHILD`, inserts, flushes, optionally
/// fsyncs, says READY, then waits to be killed.
#[test]
fn sled_child_process() {
    let Ok(dir) = std::env::var(SLED_CHILD) else {
        return;
    };
    let dir = PathBuf::from(dir);
    let fsync = std::env::var("POWERCUT_SLED_FSYNC").is_ok();
    let db = sled::open(&dir).expect("sled open");
    db.insert(b"key", b"value").expect("insert");
    db.flush().expect("flush");
    if fsync {
        File::open(dir.join("db")).unwrap().sync_all().unwrap();
        File::open(&dir).unwrap().sync_all().unwrap();
    }
    println!("READY");
    std::io::stdout().flush().unwrap();
    std::thread::sleep(Duration::from_secs(600));
}

/// Runs the sled child on a fresh mount, cuts, kills it, powers on; returns what sled
/// reads back (or its error).
fn sled_run(fsync: bool, options: Options) -> Result<Option<Vec<u8>>, String> {
    let mut fx = Fixture::new(options);
    // An existing, durable directory: what a deployed service starts from.
    let dir = fx.path("sled");
    fs::create_dir(&dir).unwrap();
    fx.sync_dir("");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "sled_child_process",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(SLED_CHILD, &dir)
        .envs(fsync.then_some(("POWERCUT_SLED_FSYNC", "1")))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let ready = BufReader::new(stdout)
        .lines()
        .any(|l| l.is_ok_and(|l| l.ends_with("READY")));
    let report = fx.fs.cut(None);
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(ready, "the sled child did not get ready");
    fx.fs.power_on().unwrap();
    println!(
        "sled with fsync={fsync}: {report:?}, stats {:?}",
        fx.fs.stats()
    );
    let db = sled::open(&dir).map_err(|e| e.to_string())?;
    let got = db
        .get(b"key")
        .map_err(|e| e.to_string())?
        .map(|v| v.to_vec());
    drop(db);
    Ok(got)
}

#[test]
fn sled_flush_versus_fsync() {
    // sled 0.34's flush ends in sync_file_range, which syncs nothing on this file system
    // (nor, durably, on a real one); its background flusher does fsync, every 500 ms.
    let flushed = sled_run(false, Options::default());
    println!("sled insert + flush, then a power cut: {flushed:?}");
    let flushed = sled_run(false, no_entry_drops());
    println!("the same, directory entries durable at once: {flushed:?}");
    let synced = sled_run(true, Options::default());
    assert_eq!(
        synced,
        Ok(Some(b"value".to_vec())),
        "insert + flush + fsync(db) + fsync(dir)"
    );
}
