//! A backup file is born private (0600) under a temporary name in its directory, fsynced, then
//! renamed into place and its directory fsynced: a reader never finds a partial file under the
//! final name, and a rename that returned survives a power cut.

use std::{
    fs::File,
    io::{self, Write},
    path::Path,
};

/// Writes `path` through `fill`, atomically (see the module docs). A file already at `path` is
/// replaced only once the new one is complete.
pub fn write_atomically(
    path: &Path,
    fill: impl FnOnce(&mut io::BufWriter<&File>) -> io::Result<()>,
) -> io::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not a file name"))?;
    // tempfile creates the file 0600.
    let temp = tempfile::Builder::new()
        .prefix(&format!(".{}.", name.to_string_lossy()))
        .suffix(".partial")
        .tempfile_in(dir)?;
    {
        let mut out = io::BufWriter::new(temp.as_file());
        fill(&mut out)?;
        out.flush()?;
    }
    temp.as_file().sync_all()?;
    temp.persist(path).map_err(|e| e.error)?;
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_is_private_and_a_failed_write_leaves_nothing() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.backup");
        write_atomically(&path, |out| out.write_all(b"one")).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"one");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let failed = write_atomically(&path, |out| {
            out.write_all(b"two, cut short")?;
            Err(io::Error::other("the stream broke"))
        });
        assert!(failed.is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"one", "the old file stays");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "no partial file is left behind");
    }
}
