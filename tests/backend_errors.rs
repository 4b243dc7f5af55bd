//! A GPU backend whose provider the ONNX Runtime library lacks is a clear error, never a silent
//! CPU run. The premise is about the library, not the machine: set-up installs the CPU wheel,
//! which has neither provider. Against `onnxruntime-gpu` (a provider built in), that backend's
//! case is skipped with a message; the GPU paths are checked by `scripts/gpu-check.sh`.
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
        if v2l_runtime::backend::built_into_onnxruntime(backend).unwrap() {
            eprintln!(
                "{}: this ONNX Runtime has the provider; the missing-provider error is not tested here",
                backend.name()
            );
            continue;
        }
        let opts = SessionOptions {
            backend: BackendOptions {
                backend,
                ..Default::default()
            },
            ..Default::default()
        };
        let err = Model::load(&path, &opts)
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
