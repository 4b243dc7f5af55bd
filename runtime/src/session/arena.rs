//! One device arena for a process's sessions.
//!
//! ONNX Runtime gives each session an arena of its own, kept at its largest run's size for as
//! long as the session lives: on a GPU the VAE encoder's, the decoder's, the DiT's and the
//! hypernetwork's side by side, and a VAE graph's second session (for its later frame batches,
//! [`crate::vae`]) another decoder-sized one. An allocator registered with the environment
//! (`CreateAndRegisterAllocatorV2`) and taken by sessions built with
//! `session.use_env_allocators` is one arena for all of them: what one session's run freed
//! serves the next one's. ONNX Runtime's CUDA arena is stream-aware: a chunk freed on one
//! run's stream is handed to another stream only once that run has ended (its streams
//! synchronised), so sessions running at once (a server's workers) never share a live chunk.

use std::collections::BTreeMap;
use std::ffi::{c_char, CStr};
use std::sync::Mutex;

use ort::session::Session;
use ort::AsPointer;

use super::values::check;

/// A registration's device (`None`: the CPU) and outcome.
type Registered = (Option<i32>, Result<(), String>);

/// The arenas registered in this process.
static REGISTERED: Mutex<Vec<Registered>> = Mutex::new(Vec::new());

/// Registers the shared arena of `device` (`None`: host memory) with ONNX Runtime's
/// environment, once per process; later calls return the first call's outcome (so the first
/// GPU session's `arena_extend_strategy`, `kNextPowerOfTwo` or `kSameAsRequested`, is the
/// arena's).
pub(super) fn register(device: Option<i32>, extend: Option<&str>) -> Result<(), String> {
    let mut seen = REGISTERED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some((_, outcome)) = seen.iter().find(|(d, _)| *d == device) {
        return outcome.clone();
    }
    let outcome = register_now(device, extend).map_err(|e| e.to_string());
    seen.push((device, outcome.clone()));
    outcome
}

fn register_now(device: Option<i32>, extend: Option<&str>) -> crate::Result<()> {
    let env = crate::ort_env::init()?;
    let fail = |e: ort::Error| crate::RuntimeError::Ort {
        context: "the shared arena".into(),
        message: e.to_string(),
    };
    let info = memory_info(device, ort::memory::AllocatorType::Arena).map_err(fail)?;
    // ONNX Runtime's `OrtArenaCfg` keys; an absent key keeps its default.
    let strategy = match extend {
        Some("kSameAsRequested") => Some(1usize),
        Some(_) => Some(0),
        None => None,
    };
    let keys: Vec<&CStr> = strategy.iter().map(|_| c"arena_extend_strategy").collect();
    let key_ptrs: Vec<*const c_char> = keys.iter().map(|k| k.as_ptr()).collect();
    let values: Vec<usize> = strategy.into_iter().collect();
    let mut cfg = std::ptr::null_mut();
    // SAFETY: `key_ptrs` and `values` have the same length; ONNX Runtime copies them.
    check(unsafe {
        (ort::api().CreateArenaCfgV2)(key_ptrs.as_ptr(), values.as_ptr(), values.len(), &mut cfg)
    })
    .map_err(fail)?;
    let provider = match device {
        Some(_) => c"CUDAExecutionProvider",
        None => c"CPUExecutionProvider",
    };
    // SAFETY: every pointer is live for the call; ONNX Runtime copies the arena settings, so
    // `cfg` is released right after.
    let status = unsafe {
        let s = (ort::api().CreateAndRegisterAllocatorV2)(
            env.ptr().cast_mut(),
            provider.as_ptr(),
            info.ptr(),
            cfg,
            std::ptr::null(),
            std::ptr::null(),
            0,
        );
        (ort::api().ReleaseArenaCfg)(cfg);
        s
    };
    check(status).map_err(fail)
}

/// Each shared arena this process registered or was refused: `cuda:0`, `cpu`, or either
/// followed by ` refused: <ONNX Runtime's reason>`.
pub(super) fn registered() -> Vec<String> {
    REGISTERED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .iter()
        .map(|(device, outcome)| {
            let at = device.map_or("cpu".to_string(), |id| format!("cuda:{id}"));
            match outcome {
                Ok(()) => at,
                Err(e) => format!("{at} refused: {e}"),
            }
        })
        .collect()
}

/// Where a session's working memory lives: the GPU `device`'s, or the host's.
pub(super) fn memory_info(
    device: Option<i32>,
    kind: ort::memory::AllocatorType,
) -> ort::Result<ort::memory::MemoryInfo<'static>> {
    use ort::memory::{AllocationDevice, MemoryInfo, MemoryType};
    match device {
        Some(id) => MemoryInfo::new(AllocationDevice::CUDA, id, kind, MemoryType::Default),
        None => MemoryInfo::new(AllocationDevice::CPU, 0, kind, MemoryType::Default),
    }
}

/// ONNX Runtime's statistics of the arena `session` allocates its working memory from on
/// `device` (`NumAllocs`, `InUse`, `MaxInUse`, `TotalAllocated`, … in bytes or counts): the
/// shared one for a session built with it.
pub(super) fn stats(session: &Session, device: Option<i32>) -> ort::Result<BTreeMap<String, u64>> {
    let info = memory_info(device, ort::memory::AllocatorType::Device)?;
    let alloc = ort::memory::Allocator::new(session, info)?;
    let mut kvps = std::ptr::null_mut();
    // SAFETY: a live allocator; ONNX Runtime returns pairs this function releases.
    check(unsafe { (ort::api().AllocatorGetStats)(alloc.ptr(), &mut kvps) })?;
    if kvps.is_null() {
        return Ok(BTreeMap::new());
    }
    let mut keys = std::ptr::null();
    let mut values = std::ptr::null();
    let mut n = 0usize;
    let mut out = BTreeMap::new();
    // SAFETY: `kvps` is live until released below; ONNX Runtime owns `keys` and `values`, `n`
    // entries each, every one a NUL-terminated string.
    unsafe {
        (ort::api().GetKeyValuePairs)(kvps, &mut keys, &mut values, &mut n);
        if !keys.is_null() && !values.is_null() {
            for i in 0..n {
                let k = CStr::from_ptr(*keys.add(i)).to_string_lossy().into_owned();
                let v = CStr::from_ptr(*values.add(i)).to_string_lossy();
                if let Ok(v) = v.trim().parse::<u64>() {
                    out.insert(k, v);
                }
            }
        }
        (ort::api().ReleaseKeyValuePairs)(kvps);
    }
    Ok(out)
}
