//! The CUDA 13 libraries ONNX Runtime's GPU providers load, found without `LD_LIBRARY_PATH`.
//!
//! `onnxruntime-gpu` 1.31.1's `libonnxruntime_providers_cuda.so` names `libcudart.so.13`,
//! `libcublas.so.13`, `libcublasLt.so.13` and `libcurand.so.10` as dependencies but carries no
//! search path, and loads cuFFT and cuDNN by name later; the loader finds none of them in a
//! project-local install. `scripts/setup.sh --gpu` unpacks them from NVIDIA's PyPI wheels into
//! one folder, `.v2l/cuda/`, and before the first GPU session v2l loads each one from there by
//! its full path, in dependency order and globally visible: the provider's own lookups by name
//! then find the copies already loaded. `libcuda.so.1` is the driver's and never shipped.
//! Without `.v2l/cuda/` nothing is preloaded and the system's loader path decides, as before.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::error::{Result, RuntimeError};
pub use crate::ort_env::gpu_present;

/// The folder `scripts/setup.sh --gpu` fills, under the project root.
pub const DIR: &str = ".v2l/cuda";

/// What the CUDA provider needs beyond the driver, in the order they are loaded (each after
/// the ones it depends on; `libnvrtc.so.13` loads its builtins by name, so they come first).
/// cuDNN's own parts (`libcudnn_graph.so.9`, the engines) are found beside `libcudnn.so.9`
/// through its `$ORIGIN` search path.
pub const LIBRARIES: &[&str] = &[
    "libcudart.so.13",
    "libcublasLt.so.13",
    "libcublas.so.13",
    "libcurand.so.10",
    "libcufft.so.12",
    "libnvrtc-builtins.so.13.0",
    "libnvrtc.so.13",
    "libcudnn.so.9",
];

/// `.v2l/cuda` beside the loaded ONNX Runtime library's folder (`.v2l/onnxruntime-gpu`), or
/// under the current directory, its ancestors or the executable's.
pub fn find_dir() -> Option<PathBuf> {
    let beside = crate::ort_env::library_path()
        .and_then(Path::parent)
        .and_then(Path::parent)
        .map(|p| p.join("cuda"));
    beside
        .into_iter()
        .chain(
            crate::ort_env::search_roots()
                .into_iter()
                .map(|r| r.join(DIR)),
        )
        .find(|d| LIBRARIES.first().is_some_and(|l| d.join(l).is_file()))
}

static PRELOADED: OnceLock<std::result::Result<Option<PathBuf>, (PathBuf, String)>> =
    OnceLock::new();

/// Loads [`LIBRARIES`] from [`find_dir`] once per process; `Ok(None)` when there is no such
/// folder. A library that is missing from the folder or fails to load is an error naming it.
pub fn preload() -> Result<Option<&'static Path>> {
    let r = PRELOADED.get_or_init(|| match find_dir() {
        None => Ok(None),
        Some(dir) => load_all(&dir).map(|()| Some(dir)),
    });
    match r {
        Ok(dir) => Ok(dir.as_deref()),
        Err((path, message)) => Err(RuntimeError::Io {
            path: path.clone(),
            source: std::io::Error::other(format!(
                "cannot load this CUDA library ({message}); run `bash scripts/setup.sh --gpu` again"
            )),
        }),
    }
}

fn load_all(dir: &Path) -> std::result::Result<(), (PathBuf, String)> {
    for name in LIBRARIES {
        let path = dir.join(name);
        if !path.is_file() {
            return Err((path, "missing".into()));
        }
        load_global(&path).map_err(|m| (path.clone(), m))?;
    }
    Ok(())
}

/// `dlopen(path, RTLD_NOW | RTLD_GLOBAL)`; the handle is kept for the process's life.
fn load_global(path: &Path) -> std::result::Result<(), String> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|e| e.to_string())?;
    // SAFETY: `c` is a valid NUL-terminated path; the library's initialisers are NVIDIA's
    // and run once. The handle is never closed, so nothing it exports is unmapped.
    let handle = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    if handle.is_null() {
        // SAFETY: dlerror returns null or a NUL-terminated message owned by libc.
        let e = unsafe { libc::dlerror() };
        let msg = if e.is_null() {
            "dlopen failed".to_string()
        } else {
            // SAFETY: non-null, NUL-terminated, read before any other dl* call.
            unsafe { std::ffi::CStr::from_ptr(e) }
                .to_string_lossy()
                .into_owned()
        };
        return Err(msg);
    }
    Ok(())
}

/// Whether a library of this soname is loadable by name right now (already loaded, or on the
/// loader's path): how the TensorRT cases learn whether `libnvinfer.so.10` is there.
pub fn loads_by_name(soname: &str) -> bool {
    let Ok(c) = std::ffi::CString::new(soname) else {
        return false;
    };
    // SAFETY: valid C string; a library that loads stays loaded (harmless: it is only ever
    // asked for libraries v2l would load next anyway).
    let handle = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_LAZY | libc::RTLD_GLOBAL) };
    !handle.is_null()
}

/// CUDA device `device`'s total memory in bytes, from the CUDA runtime ONNX Runtime's provider
/// has loaded (`cudaMemGetInfo` with that device made current, then the thread's own put
/// back); `None` where no CUDA runtime is loaded or it reports no such device.
pub fn device_total_memory(device: i32) -> Option<u64> {
    type MemGetInfo = unsafe extern "C" fn(*mut usize, *mut usize) -> i32;
    type GetDevice = unsafe extern "C" fn(*mut i32) -> i32;
    type SetDevice = unsafe extern "C" fn(i32) -> i32;
    let find = |name: &std::ffi::CStr| {
        // SAFETY: a NUL-terminated name looked up in the libraries already loaded.
        let sym = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) };
        (!sym.is_null()).then_some(sym)
    };
    let (mem, get, set) = (
        find(c"cudaMemGetInfo")?,
        find(c"cudaGetDevice")?,
        find(c"cudaSetDevice")?,
    );
    // SAFETY: the CUDA runtime's signatures (`cudaError_t` results, 0 is success); each
    // writes only through the pointers it is given.
    unsafe {
        let mem: MemGetInfo = std::mem::transmute::<*mut libc::c_void, MemGetInfo>(mem);
        let get: GetDevice = std::mem::transmute::<*mut libc::c_void, GetDevice>(get);
        let set: SetDevice = std::mem::transmute::<*mut libc::c_void, SetDevice>(set);
        let mut current = 0i32;
        if get(&mut current) != 0 {
            return None;
        }
        // The thread's device is ONNX Runtime's concern too: switched only for the query.
        if current != device && set(device) != 0 {
            return None;
        }
        let (mut free, mut total) = (0usize, 0usize);
        let rc = mem(&mut free, &mut total);
        if current != device {
            set(current);
        }
        (rc == 0 && total > 0).then_some(total as u64)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn device_memory_is_known_only_with_a_cuda_device() {
        // Without a GPU (this project's CI), no CUDA runtime is loaded or it finds no device.
        assert!(super::device_total_memory(0).is_none() || super::gpu_present());
    }
}
