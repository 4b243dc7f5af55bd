//! A GPU backend whose provider the ONNX Runtime library lacks is a clear error, never a silent
//! CPU run. The premise is about the library, not the machine: set-up installs the CPU wheel,
//! which has neither provider. Against `onnxruntime-gpu` (a provider built in), the session
//! builds, or fails naming the provider (no GPU or CUDA libraries); the GPU paths themselves
//! are checked by `scripts/gpu-check.sh`.
//! (The CUDA/TensorRT paths themselves have not run on a GPU; see README.)

use v2l_export::{cogvideox_dit, Checkpoint};
use v2l_graphs::{save, ExternalData};
use v2l_runtime::backend::{Backend, BackendOptions};
use v2l_runtime::{Model, SessionOptions};
use v2l_tests::*;

#[test]
fn missing_gpu_provider_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let ck = Checkpoint::open_dir(&tiny().join("transformer")).unwrap();
    let ex = cogvideox_dit::export(&ck, &Default::default()).unwrap();
    let path = dir.path().join("dit.onnx");
    save(&ex.graph, &path, ExternalData::Auto).unwrap();
    for backend in [Backend::Cuda, Backend::TensorRt] {
        let opts = SessionOptions {
            backend: BackendOptions {
                backend,
                ..Default::default()
            },
            ..Default::default()
        };
        let loaded = Model::load(&path, &opts);
        if v2l_runtime::backend::built_into_onnxruntime(backend).unwrap() {
            // `onnxruntime-gpu`: the session builds on a GPU machine; without a GPU (or its
            // libraries) the error still names the provider rather than running on the CPU.
            if let Err(e) = loaded {
                let err = e.to_string();
                assert!(
                    err.contains(&format!("{} execution provider", backend.name())),
                    "{err}"
                );
            }
            continue;
        }
        let err = loaded
            .err()
            .expect("a CPU-only ONNX Runtime cannot register a GPU provider")
            .to_string();
        eprintln!("{}: {err}", backend.name());
        assert!(
            err.contains(&format!("{} execution provider", backend.name()))
                && err.contains("onnxruntime-gpu"),
            "{err}"
        );
    }
}
