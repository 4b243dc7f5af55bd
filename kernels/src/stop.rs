//! Where a stop from the runtime reaches the kernels. ONNX Runtime's terminate flag is checked
//! between nodes only, and one of these nodes can run for tens of seconds at a real size on a
//! CPU (the attention over 17,776 tokens, an int8 feed-forward product): each skips its
//! remaining work items once the runtime's flag is set, and fails.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

static SOURCE: OnceLock<fn() -> Option<Arc<AtomicBool>>> = OnceLock::new();

/// Gives the kernels the calling thread's stop flag (the runtime's interrupt, for the runs it
/// may stop). The first source given stays.
pub fn set_source(source: fn() -> Option<Arc<AtomicBool>>) {
    let _ = SOURCE.set(source);
}

/// The stop flag of the thread a kernel is called on (ONNX Runtime runs a node's `compute` on
/// the thread that called `Run`; its work items go to the pool, which sees this copy).
pub(crate) fn flag() -> Option<Arc<AtomicBool>> {
    SOURCE.get().and_then(|source| source())
}

/// An error for operator `op` where `flag` was set during its work (some items skipped).
pub(crate) fn check(flag: &Option<Arc<AtomicBool>>, op: &str) -> ort::Result<()> {
    match flag {
        Some(f) if f.load(Ordering::SeqCst) => Err(ort::Error::new(format!("{op}: stopped"))),
        _ => Ok(()),
    }
}
