//! Keeps a session build from holding a model's weight file resident beside its packed copy.
//!
//! ONNX Runtime memory-maps a graph's external weights and, on the CPU, prepacks each int8 or
//! f32 matrix into MLAS's own layout (anonymous memory). The mapped file pages stay in the
//! process until the whole session is built, so at its peak the process holds every weight
//! twice: the 42-block int8 CogVideoX DiT reached 9.1 GB (4.5 GB of mapped file + 4.5 GB
//! packed), where the running session needs 6.2 GB.
//!
//! [`Pager`] runs beside the build and, every [`PERIOD`], asks the kernel to reclaim the pages
//! of the weight files it maps (`madvise(MADV_PAGEOUT)` on those mappings, found in
//! `/proc/self/maps`). The advice is only a reclaim hint: clean file pages leave the process
//! and a later read faults them back in from the file, so nothing the build still needs is
//! lost, only re-read. Weights no kernel packs (biases, norms, the weights of ops without
//! prepacking) come back on first use.
//!
//! Linux only; elsewhere it does nothing.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// How often mapped weight pages are handed back during a build: at ~1 GB/s of prepacking,
/// a window of ~100 MB.
pub const PERIOD: Duration = Duration::from_millis(100);

/// A running pager; stops (and drops the pages one last time) when dropped.
pub struct Pager {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Pager {
    /// Starts paging out the mappings of `files` (the weight files of the graph being built).
    /// `None` when there is nothing to do: no files, not Linux, or no thread could start.
    pub fn start(files: Vec<PathBuf>) -> Option<Pager> {
        if files.is_empty() || !cfg!(target_os = "linux") {
            return None;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("v2l-pager".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    page_out(&files);
                    std::thread::park_timeout(PERIOD);
                }
                page_out(&files);
            })
            .ok()?;
        Some(Pager {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Pager {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

/// The address ranges at which this process maps any of `files`, from `/proc/self/maps` lines
/// `start-end perms offset dev inode path`.
fn mapped_ranges(maps: &str, files: &[PathBuf]) -> Vec<(usize, usize)> {
    maps.lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let range = f.next()?;
            let path = f.nth(4)?;
            if !files.iter().any(|p| p.as_os_str() == path) {
                return None;
            }
            let (a, b) = range.split_once('-')?;
            Some((
                usize::from_str_radix(a, 16).ok()?,
                usize::from_str_radix(b, 16).ok()?,
            ))
        })
        .collect()
}

#[cfg(target_os = "linux")]
fn page_out(files: &[PathBuf]) {
    let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else {
        return;
    };
    for (start, end) in mapped_ranges(&maps, files) {
        // A whole mapping of this process, as the kernel listed it.
        v2l_kernels::memory::page_out(start, end);
    }
}

#[cfg(not(target_os = "linux"))]
fn page_out(_files: &[PathBuf]) {}

/// Hands the heap's free pages back to the kernel. ONNX Runtime frees a stage's activations,
/// but glibc keeps large freed blocks in its arenas, so a finished stage's working memory
/// would stay resident under the next stage's (measured at CogVideoX-5B size: the reference
/// clip's VAE encode left ~2 GB behind through the VAE decode).
pub fn release_freed_memory() {
    v2l_kernels::memory::release_freed_memory();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_mappings_of_the_named_files_only() {
        let maps = "\
7f00a000-7f00c000 r--p 00000000 fd:01 123 /e/dit_int8.onnx.data
7f00c000-7f00d000 r--p 00002000 fd:01 123 /e/dit_int8.onnx.data
7f100000-7f200000 rw-p 00000000 00:00 0
7f300000-7f301000 r-xp 00000000 fd:01 9 /usr/lib/libonnxruntime.so
";
        let files = vec![PathBuf::from("/e/dit_int8.onnx.data")];
        assert_eq!(
            mapped_ranges(maps, &files),
            [(0x7f00a000, 0x7f00c000), (0x7f00c000, 0x7f00d000)]
        );
        assert!(mapped_ranges(maps, &[PathBuf::from("/e/other.data")]).is_empty());
    }

    #[test]
    fn paged_out_mappings_read_back_the_same_bytes() {
        use std::io::Write;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("w.data");
        let bytes: Vec<u8> = (0..1 << 20).map(|i| (i * 31 % 251) as u8).collect();
        std::fs::File::create(&p)
            .unwrap()
            .write_all(&bytes)
            .unwrap();
        let p = p.canonicalize().unwrap();
        let file = std::fs::File::open(&p).unwrap();
        let map = v2l_kernels::memory::map_weights(&file).unwrap();
        assert_eq!(&map[..], &bytes[..]);
        let pager = Pager::start(vec![p.clone()]).unwrap();
        std::thread::sleep(PERIOD * 2);
        drop(pager);
        assert_eq!(&map[..], &bytes[..]);
    }
}
