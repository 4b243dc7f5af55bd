//! Input files as v2l reads them: regular files only, and only as much of them as their format
//! describes.
//!
//! - What a path is gets checked before it is opened: opening a FIFO blocks until a writer
//!   comes, so a pipe named where a file belongs would hang the reader. The file is then opened
//!   non-blocking and checked again, in case it was swapped in between.
//! - A device (`/dev/zero`), a pipe or a directory is refused at once.
//! - A safetensors file is read as far as its header says ([`read_safetensors`]), never by its
//!   size alone: a 50 GB sparse file whose first 8 bytes are not a header costs 8 bytes of
//!   reading, and a file whose header describes more than its kind's limit ([`InputKind`],
//!   each raised by its own environment variable) is refused before anything is allocated.

use std::fs::File;
use std::io::{Error, ErrorKind, Read};
use std::path::Path;

/// safetensors' own largest header (the format's `MAX_HEADER_SIZE`).
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// What an input file is, for its size limit: each kind has its own, raised by its own
/// environment variable (the CLI and the C ABI read them; the server bounds uploads with
/// `--max-upload-mb` before anything is stored).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InputKind {
    /// A LoRA file (`--lora`, `v2l-lora`, `v2l_engine_load_lora`).
    Lora,
    /// A safetensors file of tensors: `--noise`, `--prompt-embeds`, `v2l-run stage` inputs,
    /// a clip stored as `reference_u8`, calibration samples.
    Tensors,
    /// A video or picture decoded by ffmpeg (`--reference`, `--image`, uploads).
    Media,
    /// A still picture decoded by ffmpeg, known by its extension (`--image first.png`, each
    /// PNG of a directory clip): its decoder holds the whole file, so the bound is lower.
    Image,
    /// A record or config read whole as text: `bundle.json`, `manifest.json`, scheduler,
    /// tokenizer and model configs, a prompts file, a token file.
    Record,
}

impl InputKind {
    /// The environment variable that raises (or lowers) this kind's limit, in bytes.
    pub const fn env(self) -> &'static str {
        match self {
            InputKind::Lora => "V2L_MAX_LORA_BYTES",
            InputKind::Tensors => "V2L_MAX_TENSOR_BYTES",
            InputKind::Media => "V2L_MAX_MEDIA_BYTES",
            InputKind::Image => "V2L_MAX_IMAGE_BYTES",
            InputKind::Record => "V2L_MAX_RECORD_BYTES",
        }
    }

    /// The default limit: above any file of a CogVideoX-5B or Wan job of this kind (a rank-256
    /// fp32 LoRA of every linear layer of the 5B DiT is about 6 GB; a 49-frame 480×720 job's
    /// noise and embeddings are tens of MB; a minute of 4K H.264 is about 1 GB; T5's
    /// `tokenizer.json` is 2.4 MB; a 4K PNG is tens of MB).
    pub const fn default_limit(self) -> u64 {
        match self {
            InputKind::Lora => 16 << 30,
            InputKind::Tensors => 4 << 30,
            InputKind::Media => 4 << 30,
            InputKind::Image => 256 << 20,
            InputKind::Record => 256 << 20,
        }
    }

    /// What the kind is called in messages.
    pub const fn noun(self) -> &'static str {
        match self {
            InputKind::Lora => "LoRA file",
            InputKind::Tensors => "tensor file",
            InputKind::Media => "media file",
            InputKind::Image => "picture",
            InputKind::Record => "record or config file",
        }
    }

    /// This kind's limit: its variable when set to a number of bytes, else the default.
    pub fn limit(self) -> u64 {
        std::env::var(self.env())
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(self.default_limit())
    }

    /// The error for a file of `bytes` over `limit`, naming the variable that raises it.
    pub fn too_large(self, bytes: u64, limit: u64) -> Error {
        invalid(
            ErrorKind::InvalidData,
            format!(
                "{bytes} bytes, more than the {limit}-byte limit for a {} (set {} to raise it)",
                self.noun(),
                self.env()
            ),
        )
    }

    /// Refuses a file of `bytes` over this kind's limit.
    pub fn check_size(self, bytes: u64) -> std::io::Result<()> {
        let limit = self.limit();
        if bytes > limit {
            return Err(self.too_large(bytes, limit));
        }
        Ok(())
    }
}

/// Whether `name`, a path an engine record names, stays inside the engine directory by its
/// spelling: relative, non-empty, every component a plain name (no `..`, `.`, root or
/// prefix). The one rule every engine record's paths go through (`bundle`, `manifest`); that
/// the file is not a link out of the directory is checked where it is opened.
pub fn is_part_name(name: &str) -> bool {
    !name.is_empty()
        && Path::new(name)
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)))
}

/// Where `p` is or will be: its canonical form (links resolved); for a path that does not exist
/// yet, its nearest existing ancestor's canonical form joined with the rest. `None` when no
/// ancestor exists or the rest is not plain names. Used to keep outputs off inputs and off the
/// engine in use, whether or not they exist yet.
pub fn resolved(p: &Path) -> Option<std::path::PathBuf> {
    if let Ok(c) = std::fs::canonicalize(p) {
        return Some(c);
    }
    let p = if p.is_relative() {
        std::env::current_dir().ok()?.join(p)
    } else {
        p.to_path_buf()
    };
    let mut rest = Vec::new();
    let mut at = p.as_path();
    loop {
        if let Ok(c) = std::fs::canonicalize(at) {
            let mut out = c;
            for name in rest.iter().rev() {
                out.push(name);
            }
            return Some(out);
        }
        match at.components().next_back()? {
            std::path::Component::Normal(name) => rest.push(name.to_os_string()),
            _ => return None,
        }
        at = at.parent()?;
    }
}

fn invalid(kind: ErrorKind, message: String) -> Error {
    Error::new(kind, message)
}

/// Opens `path` if it is a regular file (symlinks followed), with its length.
pub fn open_regular(path: &Path) -> std::io::Result<(File, u64)> {
    let not_regular = || {
        invalid(
            ErrorKind::InvalidInput,
            "not a regular file (a device, a pipe or a directory): give a file".into(),
        )
    };
    if !std::fs::metadata(path)?.is_file() {
        return Err(not_regular());
    }
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NONBLOCK);
    }
    let file = options.open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(not_regular());
    }
    Ok((file, meta.len()))
}

/// The bytes of the regular file `path`, if it holds at most `kind`'s limit.
pub fn read_regular(path: &Path, kind: InputKind) -> std::io::Result<Vec<u8>> {
    let (file, len) = open_regular(path)?;
    kind.check_size(len)?;
    read_exactly(file, len)
}

/// The text of the regular file `path` (UTF-8), if it holds at most `kind`'s limit.
pub fn read_text(path: &Path, kind: InputKind) -> std::io::Result<String> {
    String::from_utf8(read_regular(path, kind)?)
        .map_err(|_| invalid(ErrorKind::InvalidData, "is not UTF-8 text".into()))
}

/// The first `n` bytes of `file`, into a buffer reserved without aborting on failure; an
/// error if fewer come (the file shrank since its length was read).
fn read_exactly(file: impl Read, n: u64) -> std::io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    reserve(&mut bytes, n)?;
    read_into(file, n, &mut bytes)?;
    Ok(bytes)
}

/// Appends exactly `n` bytes of `file` to `bytes` (see [`read_exactly`]).
fn read_into(file: impl Read, n: u64, bytes: &mut Vec<u8>) -> std::io::Result<()> {
    let got = file.take(n).read_to_end(bytes)? as u64;
    if got != n {
        return Err(invalid(
            ErrorKind::UnexpectedEof,
            format!("ended after {got} of {n} bytes (did it change while it was read?)"),
        ));
    }
    Ok(())
}

/// Reserves `n` more bytes in `bytes`, an error (never an abort) when they do not fit.
fn reserve(bytes: &mut Vec<u8>, n: u64) -> std::io::Result<()> {
    let no_room = || {
        invalid(
            ErrorKind::OutOfMemory,
            format!("{n} bytes do not fit in memory"),
        )
    };
    let size = usize::try_from(n).map_err(|_| no_room())?;
    bytes.try_reserve_exact(size).map_err(|_| no_room())
}

/// The bytes of the safetensors file `path` that its parser needs: the whole file when its
/// header describes exactly the file (`8 + header + data` bytes); otherwise only the length
/// and header, enough for the parser to name what is wrong (too short, a header too large
/// or not JSON, data that does not match the file). Memory is bounded by what the header
/// says, and by `kind`'s limit.
pub fn read_safetensors(path: &Path, kind: InputKind) -> std::io::Result<Vec<u8>> {
    let (file, len) = open_regular(path)?;
    safetensors_prefix(file, len, kind, kind.limit())
}

/// The tensor names a safetensors file's header lists, read from its header alone (at most 8 +
/// `MAX_HEADER_BYTES` bytes): `None` where the header cannot be read, which the full reader
/// then reports. A caller that needs a tensor checks for it here, before the data (which may be
/// gigabytes) is read. A header that describes the whole file over `kind`'s limit is that
/// limit's error, as [`read_safetensors`] gives it.
pub fn safetensors_names(path: &Path, kind: InputKind) -> std::io::Result<Option<Vec<String>>> {
    let (file, len) = open_regular(path)?;
    safetensors_header_names(file, len, kind, kind.limit())
}

/// [`safetensors_names`] on an open `file` of `len` bytes, with `limit` for `kind`'s (fuzzed:
/// `fuzz/fuzz_targets/input.rs`): at most 8 + the header is read.
pub fn safetensors_header_names(
    mut file: impl Read,
    len: u64,
    kind: InputKind,
    limit: u64,
) -> std::io::Result<Option<Vec<String>>> {
    if len < 8 {
        return Ok(None);
    }
    let mut prefix = [0u8; 8];
    file.read_exact(&mut prefix)?;
    let n = u64::from_le_bytes(prefix);
    if n > MAX_HEADER_BYTES || n > len - 8 {
        return Ok(None);
    }
    let head = read_exactly(&mut file, n)?;
    if let Some(whole) = data_extent(&head).and_then(|e| (8 + n).checked_add(e)) {
        if whole == len && whole > limit {
            return Err(kind.too_large(whole, limit));
        }
    }
    let Ok(serde_json::Value::Object(map)) = serde_json::from_slice(&head) else {
        return Ok(None);
    };
    Ok(Some(
        map.keys()
            .filter(|k| k.as_str() != "__metadata__")
            .cloned()
            .collect(),
    ))
}

/// [`read_safetensors`] on an open `file` of `len` bytes, with `limit` for `kind`'s: the one
/// place the format bounds the read (fuzzed: `fuzz/fuzz_targets/input.rs`). Returns a prefix
/// of the file, at most 8 + the header when the header does not describe the whole file.
pub fn safetensors_prefix(
    mut file: impl Read,
    len: u64,
    kind: InputKind,
    limit: u64,
) -> std::io::Result<Vec<u8>> {
    if len < 8 {
        return read_exactly(file, len);
    }
    let mut prefix = [0u8; 8];
    file.read_exact(&mut prefix)?;
    let n = u64::from_le_bytes(prefix);
    if n > MAX_HEADER_BYTES || n > len - 8 {
        // The parser refuses this length from the 8 bytes alone.
        return Ok(prefix.to_vec());
    }
    let mut head = prefix.to_vec();
    head.extend(read_exactly(&mut file, n)?);
    let Some(extent) = data_extent(head.get(8..).unwrap_or_default()) else {
        // Not a header the parser takes: it says why from these bytes.
        return Ok(head);
    };
    let whole = (8 + n).checked_add(extent);
    let Some(whole) = whole.filter(|w| *w == len) else {
        // The parser reports the mismatch from the header.
        return Ok(head);
    };
    if whole > limit {
        return Err(kind.too_large(whole, limit));
    }
    reserve(&mut head, extent)?;
    read_into(file, extent, &mut head)?;
    Ok(head)
}

/// The data extent a safetensors header describes: the largest `data_offsets` end, `None`
/// when the header is not a JSON object of such entries.
fn data_extent(header: &[u8]) -> Option<u64> {
    let v: serde_json::Value = serde_json::from_slice(header).ok()?;
    let mut end = 0u64;
    for (name, entry) in v.as_object()? {
        if name == "__metadata__" {
            continue;
        }
        let offsets = entry.get("data_offsets")?.as_array()?;
        end = end.max(offsets.get(1)?.as_u64()?);
    }
    Some(end)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A safetensors file of one f32 tensor `[n]`, header first.
    fn safetensors(n: usize) -> Vec<u8> {
        let header = format!(
            r#"{{"t":{{"dtype":"F32","shape":[{n}],"data_offsets":[0,{}]}}}}"#,
            4 * n
        );
        let mut b = (header.len() as u64).to_le_bytes().to_vec();
        b.extend(header.as_bytes());
        b.extend(vec![0u8; 4 * n]);
        b
    }

    /// Found by `fuzz/fuzz_targets/input.rs`: a file that ends before the length it had when
    /// opened (it shrank while read) is an error, never a short header or a short whole.
    #[test]
    fn a_file_that_shrinks_while_read_is_an_error() {
        let good = safetensors(3);
        for cut in [12, good.len() - 1] {
            let e = safetensors_prefix(
                &good[..cut],
                good.len() as u64,
                InputKind::Tensors,
                u64::MAX,
            )
            .unwrap_err();
            assert_eq!(e.kind(), ErrorKind::UnexpectedEof, "{e}");
        }
        let whole = safetensors_prefix(&good[..], good.len() as u64, InputKind::Tensors, u64::MAX);
        assert_eq!(whole.unwrap(), good);
    }

    #[test]
    fn paths_resolve_whether_or_not_they_exist() {
        let d = tempfile::tempdir().unwrap();
        let real = std::fs::canonicalize(d.path()).unwrap();
        std::fs::create_dir(d.path().join("a")).unwrap();
        std::os::unix::fs::symlink(d.path().join("a"), d.path().join("l")).unwrap();
        assert_eq!(resolved(&d.path().join("l")), Some(real.join("a")));
        assert_eq!(
            resolved(&d.path().join("l/new/deeper")),
            Some(real.join("a/new/deeper"))
        );
        assert_eq!(resolved(&d.path().join("missing/../x")), None);
    }

    #[test]
    fn devices_and_directories_are_refused_files_are_read() {
        let e = read_regular(Path::new("/dev/zero"), InputKind::Tensors).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
        assert!(read_regular(Path::new("/"), InputKind::Lora).is_err());
        assert!(read_safetensors(Path::new("/dev/zero"), InputKind::Lora).is_err());
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        std::fs::write(&p, b"abc").unwrap();
        assert_eq!(read_regular(&p, InputKind::Media).unwrap(), b"abc");
        assert_eq!(read_text(&p, InputKind::Record).unwrap(), "abc");
        std::fs::write(&p, [0xffu8, 0xfe]).unwrap();
        assert_eq!(
            read_text(&p, InputKind::Record).unwrap_err().kind(),
            ErrorKind::InvalidData
        );
    }

    /// A FIFO is refused before it is opened: opening it would block with no writer.
    #[cfg(unix)]
    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("p.safetensors");
        let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        for r in [
            read_regular(&p, InputKind::Media),
            read_safetensors(&p, InputKind::Lora),
        ] {
            assert_eq!(r.unwrap_err().kind(), ErrorKind::InvalidInput);
        }
    }

    /// A huge sparse file is read only as far as its header: 8 bytes when those are not a
    /// header, and refused before allocation when the header describes more than the limit.
    #[test]
    fn sparse_files_are_read_as_far_as_their_header() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("s.safetensors");
        let f = File::create(&p).unwrap();
        f.set_len(50 << 30).unwrap();
        drop(f);
        // All zeros: a header length of 0, then no JSON: the parser sees the header only.
        let got = read_safetensors(&p, InputKind::Tensors).unwrap();
        assert_eq!(got.len(), 8);
        // A header describing the whole 50 GB: refused by the limit, nothing read.
        let extent = (50u64 << 30) - 8 - 128;
        let header =
            format!(r#"{{"t":{{"dtype":"U8","shape":[{extent}],"data_offsets":[0,{extent}]}}}}"#);
        assert!(header.len() <= 128);
        let header = format!("{header:<128}");
        let mut start = 128u64.to_le_bytes().to_vec();
        start.extend(header.as_bytes());
        {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
            f.write_all(&start).unwrap();
        }
        let (f, len) = open_regular(&p).unwrap();
        let e = safetensors_prefix(f, len, InputKind::Lora, 1 << 30).unwrap_err();
        assert!(e.to_string().contains("V2L_MAX_LORA_BYTES"), "{e}");
        assert!(e.to_string().contains("limit for a LoRA file"), "{e}");
        assert!(read_regular(&p, InputKind::Tensors).is_err());
    }

    #[test]
    fn well_formed_files_are_read_whole_and_others_as_far_as_their_header() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("t.safetensors");
        let good = safetensors(5);
        std::fs::write(&p, &good).unwrap();
        assert_eq!(read_safetensors(&p, InputKind::Tensors).unwrap(), good);
        // Trailing bytes, or data cut short: the header only, for the parser to refuse.
        let head = good.len() - 20;
        for bad in [
            [good.clone(), vec![1, 2]].concat(),
            good[..good.len() - 4].to_vec(),
        ] {
            std::fs::write(&p, &bad).unwrap();
            assert_eq!(
                read_safetensors(&p, InputKind::Tensors).unwrap(),
                good[..head]
            );
        }
        // Too short for a length, a length past the file: what there is, at most 8 bytes.
        std::fs::write(&p, [1u8, 2, 3]).unwrap();
        assert_eq!(read_safetensors(&p, InputKind::Tensors).unwrap(), [1, 2, 3]);
        std::fs::write(&p, 1000u64.to_le_bytes()).unwrap();
        assert_eq!(read_safetensors(&p, InputKind::Tensors).unwrap().len(), 8);
    }

    /// The names a header lists, read without the data: a sparse 50 GB file that lists one
    /// tensor costs its header; one over its kind's limit is that limit's error; a file that is
    /// no safetensors gives `None` (the full reader says why).
    #[test]
    fn names_come_from_the_header_alone() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("s.safetensors");
        let header =
            br#"{"__metadata__":{"a":"b"},"x":{"dtype":"U8","shape":[3],"data_offsets":[0,3]}}"#;
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header);
        bytes.extend_from_slice(&[1, 2, 3]);
        std::fs::write(&p, &bytes).expect("write");
        let names = safetensors_names(&p, InputKind::Tensors).expect("reads");
        assert_eq!(names, Some(vec!["x".to_string()]));
        // The same header on a 50 GB sparse file: its data is not what the header says, and
        // the names still come from the header alone.
        std::fs::File::options()
            .write(true)
            .open(&p)
            .and_then(|f| f.set_len(50 << 30))
            .expect("sparse");
        assert_eq!(
            safetensors_names(&p, InputKind::Tensors).expect("reads"),
            Some(vec!["x".to_string()])
        );
        std::fs::write(&p, b"not a safetensors file").expect("write");
        assert_eq!(
            safetensors_names(&p, InputKind::Tensors).expect("reads"),
            None
        );
        // A header that describes a file over the limit: the limit's error.
        let big = 5u64 << 30;
        let header =
            format!(r#"{{"x":{{"dtype":"U8","shape":[{big}],"data_offsets":[0,{big}]}}}}"#);
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        std::fs::write(&p, &bytes).expect("write");
        std::fs::File::options()
            .write(true)
            .open(&p)
            .and_then(|f| f.set_len(8 + header.len() as u64 + big))
            .expect("sparse");
        let e = safetensors_names(&p, InputKind::Tensors).expect_err("over the limit");
        assert!(e.to_string().contains("V2L_MAX_TENSOR_BYTES"), "{e}");
    }
}
