//! `scripts/setup.sh --gpu`, checked as far as a machine without a GPU allows (the test
//! command's set-up runs it): the onnxruntime-gpu library and the CUDA 13 libraries its CUDA
//! provider needs are unpacked where v2l looks for them, every library the provider names is
//! among them (or is the driver's), and each loads from there and is then found by its name,
//! as the provider will look it up. Loading the provider itself needs the driver
//! (`libcuda.so.1`), which only a GPU machine has.

use std::path::Path;
use std::process::Command;

use v2l_runtime::cuda_libs;

/// The `NEEDED` entries of an ELF shared library, as `readelf -d` prints them.
fn needed(lib: &Path) -> Vec<String> {
    let o = Command::new("readelf")
        .arg("-d")
        .arg(lib)
        .output()
        .expect("readelf (binutils) runs");
    assert!(o.status.success(), "readelf -d {}", lib.display());
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter(|l| l.contains("(NEEDED)"))
        .filter_map(|l| Some(l.split_once('[')?.1.trim_end_matches(']').to_string()))
        .collect()
}

#[test]
fn gpu_set_up_puts_every_cuda_library_where_v2l_looks() {
    let dir = cuda_libs::find_dir().expect(
        ".v2l/cuda is missing: `bash scripts/setup.sh --gpu` (scripts/setup-tests.sh runs it)",
    );
    for name in cuda_libs::LIBRARIES {
        assert!(
            dir.join(name).is_file(),
            "{name} is not in {}",
            dir.display()
        );
    }
    let ort_gpu = dir.parent().unwrap().join("onnxruntime-gpu");
    let provider = ort_gpu.join("libonnxruntime_providers_cuda.so");
    assert!(provider.is_file(), "{}", provider.display());
    assert!(
        std::fs::read_dir(&ort_gpu)
            .unwrap()
            .filter_map(|e| e.ok())
            .any(|e| e
                .file_name()
                .to_string_lossy()
                .starts_with("libonnxruntime.so.")),
        "no libonnxruntime.so.* in {}",
        ort_gpu.display()
    );
    // Every CUDA library the provider links is one v2l loads; the driver's is the machine's.
    let cuda_deps: Vec<String> = needed(&provider)
        .into_iter()
        .filter(|n| n.starts_with("libcu") || n.starts_with("libnvrtc"))
        .collect();
    assert!(cuda_deps.len() >= 4, "{cuda_deps:?}");
    for n in &cuda_deps {
        assert!(
            n == "libcuda.so.1" || cuda_libs::LIBRARIES.contains(&n.as_str()),
            "the CUDA provider links {n}, which v2l does not load"
        );
    }
    // cuDNN's parts sit beside it, where its own search path finds them.
    for part in needed(&dir.join("libcudnn_adv.so.9")) {
        if part.starts_with("libcudnn") {
            assert!(dir.join(&part).is_file(), "{part}");
        }
    }
    let loaded = cuda_libs::preload()
        .expect("the CUDA libraries load")
        .unwrap();
    assert_eq!(loaded, dir.as_path());
    for name in cuda_libs::LIBRARIES {
        assert!(
            cuda_libs::loads_by_name(name),
            "{name} is not found by name once loaded"
        );
    }
}
