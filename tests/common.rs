//! Shared helpers of the integration tests: fixture paths, tolerances, export-and-load.
//!
//! The fixtures under `tests/fixtures/cogvideox-tiny` were produced by the upstream PyTorch
//! code (diffusers 0.42.1, the Video2LoRA authors' code); see `tests/fixtures/README.md`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use v2l_runtime::Tensor;

/// Relative L2 bound for float32 parity with PyTorch.
pub const F32_REL_L2: f64 = 1e-4;

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

pub fn tiny() -> PathBuf {
    fixtures().join("cogvideox-tiny")
}

pub fn load(name: &str) -> BTreeMap<String, Tensor> {
    v2l_runtime::read_safetensors(&tiny().join(name)).expect("fixture file")
}

/// Asserts `got` matches `want` within `tol` relative L2, printing the measured error.
pub fn assert_close(what: &str, got: &Tensor, want: &Tensor, tol: f64) {
    assert_eq!(got.shape, want.shape, "{what}: shape");
    let err = got.rel_l2(want);
    eprintln!("{what}: relative L2 error {err:.3e} (bound {tol:.0e})");
    assert!(err <= tol, "{what}: relative L2 error {err:.3e} > {tol:.0e}");
}

/// Picks the named tensors out of a fixture map.
pub fn pick(m: &BTreeMap<String, Tensor>, names: &[&str]) -> BTreeMap<String, Tensor> {
    names.iter().map(|n| (n.to_string(), m[*n].clone())).collect()
}
