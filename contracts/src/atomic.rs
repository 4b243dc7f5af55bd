//! Files that appear whole or not at all: written to a temporary sibling (`tempfile`), then
//! renamed over the destination. Every writer of v2l's outputs goes through here.
//!
//! A temporary sibling is deleted when dropped, which a process killed by a signal never
//! does: Ctrl-C in a 5B export would leave a hidden weight file of many GB. So every one in
//! flight is listed, and a front end that exits on a signal removes them first
//! ([`remove_partial_outputs`]).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

use tempfile::NamedTempFile;

/// The temporary files and directories in flight: written, not yet renamed into place.
static PENDING: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn pending() -> MutexGuard<'static, Vec<PathBuf>> {
    PENDING.lock().unwrap_or_else(PoisonError::into_inner)
}

fn unlist(list: &mut Vec<PathBuf>, path: &Path) {
    if let Some(i) = list.iter().position(|p| p == path) {
        list.swap_remove(i);
    }
}

/// Removes every temporary output in flight, for a process about to exit on a signal, and
/// returns how many it removed. The list stays locked: no output is renamed into place
/// after this (a writer doing so waits until the process exits).
pub fn remove_partial_outputs() -> usize {
    let list = pending();
    let mut placeholders = Vec::new();
    let removed = list
        .iter()
        .filter(|p| remove_partial(p, &mut placeholders))
        .count();
    // Last, just before the process ends: until now they kept the work still running from
    // making the directories again by their names.
    for p in placeholders {
        let _ = std::fs::remove_file(p);
    }
    std::mem::forget(list);
    removed
}

/// Removes `path`. A directory is first renamed aside and an empty file put in its place
/// (pushed to `placeholders`, for the caller to remove last): the work still filling it, on
/// another thread until the process ends, would otherwise make it again by its name (a
/// `create_dir_all` of a path inside it) while it is removed.
fn remove_partial(path: &Path, placeholders: &mut Vec<PathBuf>) -> bool {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => {
            let mut aside = path.as_os_str().to_owned();
            aside.push(".removing");
            let aside = PathBuf::from(aside);
            let gone = if std::fs::rename(path, &aside).is_ok() {
                let held = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(path);
                if held.is_ok() {
                    placeholders.push(path.to_path_buf());
                }
                aside
            } else {
                path.to_path_buf()
            };
            // A file created in it by an open directory handle meanwhile: try again.
            (0..3).any(|_| std::fs::remove_dir_all(&gone).is_ok() || !gone.exists())
        }
        Ok(_) => std::fs::remove_file(path).is_ok(),
        Err(_) => false,
    }
}

/// A temporary path (a directory being staged) listed for [`remove_partial_outputs`] until
/// dropped or [`Listing::settle`]d: for writers with their own staging, as [`build_dir`]
/// lists its own.
#[derive(Debug)]
pub struct Listing(Option<PathBuf>);

/// Lists `path` for [`remove_partial_outputs`] while the returned guard lives.
pub fn list_partial(path: &Path) -> Listing {
    pending().push(path.to_path_buf());
    Listing(Some(path.to_path_buf()))
}

impl Listing {
    /// Runs `publish` (the renames that put the listed path's work in place) under the list's
    /// lock, the path unlisted first: a signal's removal comes wholly before (and `publish`
    /// never runs: the process ends) or wholly after it, never while a rename is half done.
    /// `publish` must not create or persist a temporary output of its own (the lock is held).
    pub fn settle<R>(mut self, publish: impl FnOnce() -> R) -> R {
        let mut list = pending();
        if let Some(p) = self.0.take() {
            unlist(&mut list, &p);
        }
        publish()
    }
}

impl Drop for Listing {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            unlist(&mut pending(), &p);
        }
    }
}

/// A temporary sibling of an output ([`temp_sibling`]): deleted when dropped unless
/// [`Partial::persist`]ed, and listed for [`remove_partial_outputs`] meanwhile.
#[derive(Debug)]
pub struct Partial {
    // Dropped in this order: the file deleted, then unlisted.
    file: NamedTempFile,
    listing: Listing,
}

impl Partial {
    /// Where it is being written.
    pub fn path(&self) -> &Path {
        self.file.path()
    }

    pub fn as_file(&self) -> &std::fs::File {
        self.file.as_file()
    }

    /// A second handle on the file (for a buffered writer).
    pub fn reopen(&self) -> std::io::Result<std::fs::File> {
        self.file.reopen()
    }

    /// Renames it over `path`. On failure it is deleted.
    pub fn persist(self, path: &Path) -> std::io::Result<()> {
        let Partial { file, listing } = self;
        listing.settle(|| file.persist(path).map(drop).map_err(|e| e.error))
    }
}

impl Write for Partial {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.file.as_file().write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.as_file().flush()
    }
}

/// A temporary file beside `path` ending in `suffix` (ffmpeg picks a container from it),
/// readable like a normally created file (`tempfile` makes them owner-only). It is deleted
/// when dropped unless persisted with [`Partial::persist`].
pub fn temp_sibling(path: &Path, suffix: &str) -> std::io::Result<Partial> {
    // Created and listed under the list's lock: no signal comes between the two.
    let mut list = pending();
    let file = tempfile::Builder::new()
        .prefix(".v2l-")
        .suffix(suffix)
        .tempfile_in(parent_of(path))?;
    list.push(file.path().to_path_buf());
    drop(list);
    let listing = Listing(Some(file.path().to_path_buf()));
    let tmp = Partial { file, listing };
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
    // Created and listed under the list's lock, as in `temp_sibling`.
    let mut list = pending();
    let tmp = tempfile::Builder::new()
        .prefix(".v2l-")
        .suffix(".partial")
        .tempdir_in(parent_of(out))
        .map_err(|e| io(out, e))?;
    list.push(tmp.path().to_path_buf());
    drop(list);
    // Unlisted however `fill` ends, a panic included (the `TempDir` removes itself).
    let listed = Listing(Some(tmp.path().to_path_buf()));
    set_mode(tmp.path(), 0o755).map_err(|e| io(tmp.path(), e))?;
    let value = fill(tmp.path())?;
    let built = tmp.keep();
    listed
        .settle(|| std::fs::rename(&built, out))
        .map_err(|e| {
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
    tmp.persist(path)
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

    fn listed(p: &Path) -> bool {
        pending().iter().any(|q| q == p)
    }

    /// A temporary output is listed for a signal's removal while it is written, and only then:
    /// persisted, dropped, or a directory built or failed.
    #[test]
    fn outputs_in_flight_are_listed_until_renamed_or_dropped() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("a.bin");
        let mut t = temp_sibling(&out, ".tmp").unwrap();
        let at = t.path().to_path_buf();
        assert!(listed(&at));
        t.write_all(b"x").unwrap();
        t.persist(&out).unwrap();
        assert!(!listed(&at) && !at.exists());
        assert_eq!(std::fs::read(&out).unwrap(), b"x");

        let t = temp_sibling(&out, ".tmp").unwrap();
        let at = t.path().to_path_buf();
        drop(t);
        assert!(!listed(&at) && !at.exists());

        let io = |_: &Path, e: std::io::Error| e.to_string();
        for fails in [false, true] {
            let mut inside = None;
            let _ = build_dir(&d.path().join(format!("e{fails}")), io, |tmp| {
                inside = Some((tmp.to_path_buf(), listed(tmp)));
                if fails {
                    return Err("stopped".to_string());
                }
                Ok(())
            });
            let (tmp, was_listed) = inside.unwrap();
            assert!(was_listed, "{fails}");
            assert!(!listed(&tmp) && !tmp.exists(), "{fails}");
        }
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
