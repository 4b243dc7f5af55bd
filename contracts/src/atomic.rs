//! Files that appear whole or not at all: written to a temporary sibling (`tempfile`), then
//! renamed over the destination. Every writer of v2l's outputs goes through here.

use std::io::Write;
use std::path::Path;

use tempfile::NamedTempFile;

/// A temporary file beside `path` ending in `suffix` (ffmpeg picks a container from it),
/// readable like a normally created file (`tempfile` makes them owner-only). It is deleted
/// when dropped unless persisted with [`NamedTempFile::persist`].
pub fn temp_sibling(path: &Path, suffix: &str) -> std::io::Result<NamedTempFile> {
    let tmp = tempfile::Builder::new()
        .prefix(".v2l-")
        .suffix(suffix)
        .tempfile_in(parent_of(path))?;
    set_mode(tmp.path(), 0o644)?;
    Ok(tmp)
}

/// Builds the directory `out` whole: `fill` writes into a temporary sibling, which becomes
/// `out` (a missing or empty directory) by one rename when `fill` succeeds, and is removed on
/// any failure, so `out` never holds a half-built engine or checkpoint. `io` names I/O errors.
pub fn build_dir<T, E>(
    out: &Path,
    io: impl Fn(&Path, std::io::Error) -> E,
    fill: impl FnOnce(&Path) -> Result<T, E>,
) -> Result<T, E> {
    let tmp = tempfile::Builder::new()
        .prefix(".v2l-")
        .suffix(".partial")
        .tempdir_in(parent_of(out))
        .map_err(|e| io(out, e))?;
    set_mode(tmp.path(), 0o755).map_err(|e| io(tmp.path(), e))?;
    let value = fill(tmp.path())?;
    let built = tmp.keep();
    std::fs::rename(&built, out).map_err(|e| {
        let _ = std::fs::remove_dir_all(&built);
        io(out, e)
    })?;
    Ok(value)
}

/// The directory `path` is in (`.` for a bare file name).
fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// Permissions like a normally created file or directory (`tempfile` makes them owner-only).
fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    }
    #[cfg(not(unix))]
    let _ = (path, mode);
    Ok(())
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

    #[test]
    fn directories_appear_whole_or_not_at_all() {
        let d = tempfile::tempdir().unwrap();
        let io = |_: &Path, e: std::io::Error| e.to_string();
        let out = d.path().join("engine");
        let n = build_dir(&out, io, |tmp| {
            std::fs::write(tmp.join("a"), b"1").map_err(|e| e.to_string())?;
            Ok(7)
        })
        .unwrap();
        assert_eq!(n, 7);
        assert_eq!(std::fs::read(out.join("a")).unwrap(), b"1");
        // A failure half-way leaves neither the output nor the temporary directory.
        let bad = d.path().join("bad");
        let e = build_dir(&bad, io, |tmp| -> Result<(), String> {
            std::fs::write(tmp.join("a"), b"1").map_err(|e| e.to_string())?;
            Err("stopped".into())
        });
        assert_eq!(e, Err("stopped".to_string()));
        let names: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["engine"], "{names:?}");
    }
}
