//! What several integration tests share: the tiny fixture model, exported and compiled.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

pub fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/cogvideox-tiny")
}

/// Exports the tiny pipeline (with the hypernetwork) and compiles it; returns the engine dir.
pub fn engine(dir: &Path) -> PathBuf {
    engine_with(dir, &[])
}

/// [`engine`] with more `v2l-compile` flags (e.g. `--precision int8`).
pub fn engine_with(dir: &Path, compile: &[&str]) -> PathBuf {
    let t = tiny();
    let ex = dir.join("export");
    let eng = dir.join("engine");
    let o = Command::new(env!("CARGO_BIN_EXE_v2l-export"))
        .args(["pipeline", t.to_str().unwrap(), "--hypernet"])
        .arg(t.join("hypernetwork.safetensors"))
        .arg("--lilora")
        .arg(t.join("lilora.safetensors"))
        .arg("-o")
        .arg(&ex)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = Command::new(env!("CARGO_BIN_EXE_v2l-compile"))
        .arg(&ex)
        .arg("-o")
        .arg(&eng)
        .args(compile)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    eng
}
