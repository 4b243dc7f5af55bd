//! Files that appear whole or not at all: written to a temporary sibling (`tempfile`), then
//! renamed over the destination. Every writer of v2l's outputs goes through here.

use std::io::Write;
use std::path::Path;

use tempfile::NamedTempFile;

/// A temporary file beside `path` ending in `suffix` (ffmpeg picks a container from it),
/// readable like a normally created file (`tempfile` makes them owner-only). It is deleted
/// when dropped unless persisted with [`NamedTempFile::persist`].
pub fn temp_sibling(path: &Path, suffix: &str) -> std::io::Result<NamedTempFile> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let tmp = tempfile::Builder::new()
        .prefix(".v2l-")
        .suffix(suffix)
        .tempfile_in(dir)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644))?;
    }
    Ok(tmp)
}

/// Writes `bytes` to `path` atomically: a failure leaves no file and never a half-written one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut tmp = temp_sibling(path, ".tmp")?;
    tmp.write_all(bytes)?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_whole_files_and_leaves_nothing_on_failure() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&p).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o644);
        }
        // A directory in the way: an error, and no temporary file left behind.
        let dir = d.path().join("sub");
        std::fs::create_dir(&dir).unwrap();
        assert!(write_atomic(&dir, b"x").is_err());
        let left: Vec<_> = std::fs::read_dir(d.path()).unwrap().collect();
        assert_eq!(left.len(), 2, "{left:?}");
    }
}
