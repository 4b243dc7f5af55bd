//! The GPU memory query asks the engine's device, not whichever the thread has current, and
//! leaves the thread's device as it found it. Checked against a stand-in CUDA runtime (three
//! functions in C, loaded globally as ONNX Runtime's provider loads the real one), in a process
//! of its own so no other test sees it.

use std::process::Command;

const FAKE_CUDART: &str = r#"
static int current = 0;
static int calls_set = 0;
int cudaGetDevice(int *d) { *d = current; return 0; }
int cudaSetDevice(int d) { if (d < 0 || d > 3) return 101; current = d; calls_set++; return 0; }
int cudaMemGetInfo(unsigned long *free_, unsigned long *total) {
    *total = (unsigned long)(current + 1) << 30; *free_ = *total / 2; return 0;
}
int fake_current(void) { return current; }
int fake_calls_set(void) { return calls_set; }
"#;

#[test]
fn the_memory_of_the_engines_device_is_asked_and_the_current_device_kept() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("fake_cudart.c");
    let lib = dir.path().join("libfake_cudart.so");
    std::fs::write(&src, FAKE_CUDART).unwrap();
    let o = Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(&lib)
        .arg(&src)
        .output()
        .expect("a C compiler (cc)");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // Before the runtime is loaded: no answer, no guess.
    assert_eq!(v2l_runtime::cuda_libs::device_total_memory(0), None);

    let path = std::ffi::CString::new(lib.to_str().unwrap()).unwrap();
    // SAFETY: a library of plain C functions, kept loaded for the process's life.
    let handle = unsafe { libc::dlopen(path.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    assert!(!handle.is_null());
    let sym = |name: &std::ffi::CStr| -> unsafe extern "C" fn() -> i32 {
        // SAFETY: both names are `int f(void)` in the library above.
        unsafe { std::mem::transmute(libc::dlsym(handle, name.as_ptr())) }
    };
    let (current, calls_set) = (sym(c"fake_current"), sym(c"fake_calls_set"));

    let gib = 1u64 << 30;
    assert_eq!(v2l_runtime::cuda_libs::device_total_memory(0), Some(gib));
    // The current device's own memory is asked without switching.
    assert_eq!(unsafe { calls_set() }, 0);
    // Device 2's memory while the thread has device 0 current: asked of device 2, and device 0
    // is current again after.
    assert_eq!(
        v2l_runtime::cuda_libs::device_total_memory(2),
        Some(3 * gib)
    );
    assert_eq!(unsafe { current() }, 0);
    assert_eq!(unsafe { calls_set() }, 2);
    // A device the runtime refuses: no answer, and the current device untouched.
    assert_eq!(v2l_runtime::cuda_libs::device_total_memory(7), None);
    assert_eq!(unsafe { current() }, 0);
}
