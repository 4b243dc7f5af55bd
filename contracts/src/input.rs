//! Input files as v2l reads them: regular files only. A device (`/dev/zero`), a pipe or a
//! directory given where a file belongs is refused at once instead of read until memory runs
//! out; a regular file is read to the length it had when opened.

use std::io::Read;
use std::path::Path;

/// The bytes of the regular file `path`.
pub fn read_regular(path: &Path) -> std::io::Result<Vec<u8>> {
    let file = std::fs::File::open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file (a device, a pipe or a directory): give a file",
        ));
    }
    let len = meta.len();
    let mut bytes = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    file.take(len).read_to_end(&mut bytes)?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_and_directories_are_refused_files_are_read() {
        let e = read_regular(Path::new("/dev/zero")).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
        assert!(read_regular(Path::new("/")).is_err());
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        std::fs::write(&p, b"abc").unwrap();
        assert_eq!(read_regular(&p).unwrap(), b"abc");
    }
}
