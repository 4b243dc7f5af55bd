//! The operating system's memory calls the runtime makes around ONNX Runtime's sessions:
//! mapping weight files read-only, paging a mapped range out, and returning the heap's free
//! pages. The `unsafe` they need lives here, each call with its reason.

use std::fs::File;

/// A read-only map of a weight file that no one writes while it is mapped: bundle files are
/// written once and verified on load, and v2l never writes to a weight file it has mapped.
pub fn map_weights(file: &File) -> std::io::Result<memmap2::Mmap> {
    // SAFETY: see above; the map is read-only, so a concurrent writer (against v2l's own
    // rules) would change the bytes seen, never memory safety of this process's heap.
    unsafe { memmap2::Mmap::map(file) }
}

/// Asks the kernel to reclaim the pages of `start..end`, a whole file-backed mapping of this
/// process as `/proc/self/maps` lists it. Clean file pages are dropped and faulted back in
/// from the file on the next read, so no mapping's contents change; a range unmapped
/// meanwhile makes the call fail with ENOMEM, and nothing happens.
#[cfg(target_os = "linux")]
pub fn page_out(start: usize, end: usize) {
    // SAFETY: as above: MADV_PAGEOUT only reclaims, and an address that is no longer
    // mapped is an error return, not a fault.
    unsafe {
        libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_PAGEOUT);
    }
}

/// Hands the heap's free pages back to the kernel (glibc keeps large freed blocks in its
/// arenas); a no-op elsewhere.
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory of glibc's own arenas; it takes no pointer.
    unsafe {
        libc::malloc_trim(0);
    }
}
