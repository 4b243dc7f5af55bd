//! A GPU backend on a machine without its libraries is a clear error, never a silent CPU run.
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
