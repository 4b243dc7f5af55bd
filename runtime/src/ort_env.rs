//! Finding and loading the ONNX Runtime shared library.
//!
//! `ort` is built with `load-dynamic`, so nothing is linked at build time and no binary is
//! downloaded by a build script; the library is found at run time, in this order:
//! 1. `ORT_DYLIB_PATH` (a file, or a directory holding `libonnxruntime.so*`);
//! 2. the project-local install made by `scripts/setup.sh`: `.v2l/onnxruntime/` under the current
//!    directory or any ancestor, or beside the executable's ancestors; on a machine with an
//!    NVIDIA GPU, `.v2l/onnxruntime-gpu/` (`scripts/setup.sh --gpu`) before it, in each place;
//! 3. an installed `onnxruntime` Python package (`python3 -c 'import onnxruntime'` location,
//!    `onnxruntime/capi/libonnxruntime.so.*`).
//!
//! A miss is [`RuntimeError::OrtMissing`] listing where it looked, with a hint saying how to fix it.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::error::{Result, RuntimeError};

static INIT: OnceLock<std::result::Result<(PathBuf, ort::environment::Environment), String>> =
    OnceLock::new();

/// Loads ONNX Runtime once per process and returns its environment; later calls return the
/// first outcome.
pub fn init() -> Result<&'static ort::environment::Environment> {
    let r = INIT.get_or_init(|| {
        let mut searched = Vec::new();
        let Some(path) = find_library(&mut searched) else {
            return Err(format!("missing\u{0}{}", searched.join(", ")));
        };
        match ort::init_from(&path) {
            Ok(b) => match b.with_name("v2l").build() {
                Ok(env) => Ok((path, env)),
                Err(e) => Err(format!("load\u{0}{}\u{0}{e}", path.display())),
            },
            Err(e) => Err(format!("load\u{0}{}\u{0}{e}", path.display())),
        }
    });
    match r {
        Ok((_, env)) => Ok(env),
        Err(e) => {
            let parts: Vec<&str> = e.split('\u{0}').collect();
            if parts.first() == Some(&"missing") {
                Err(RuntimeError::OrtMissing {
                    searched: parts.get(1).unwrap_or(&"").to_string(),
                })
            } else {
                Err(RuntimeError::OrtLoad {
                    path: PathBuf::from(parts.get(1).unwrap_or(&"")),
                    message: parts.get(2).unwrap_or(&"").to_string(),
                })
            }
        }
    }
}

/// The first `libonnxruntime.so*` (or `.dylib`) in `dir`, preferring the versioned file.
fn library_in(dir: &Path) -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let n = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            (n.starts_with("libonnxruntime.so")
                || n.starts_with("libonnxruntime.") && n.ends_with(".dylib"))
                && !n.contains("providers")
        })
        .collect();
    found.sort();
    found.pop()
}

fn find_library(searched: &mut Vec<String>) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH") {
        let p = PathBuf::from(p);
        searched.push(format!("ORT_DYLIB_PATH={}", p.display()));
        if p.is_file() {
            return Some(p);
        }
        if let Some(l) = library_in(&p) {
            return Some(l);
        }
        // An explicit choice that does not exist is an error, never a silent fallback to
        // another library.
        return None;
    }
    let installs = installs(gpu_present());
    for r in &search_roots() {
        for install in installs {
            let d = r.join(install);
            if d.is_dir() {
                if let Some(l) = library_in(&d) {
                    return Some(l);
                }
            }
        }
    }
    searched.push(format!(
        "{} in the current directory, its ancestors and the executable's",
        installs.join(" and ")
    ));
    searched.push("the `onnxruntime` Python package".into());
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import os, onnxruntime; print(os.path.dirname(onnxruntime.__file__))",
        ])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    let dir = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if dir.is_empty() {
        return None;
    }
    library_in(&Path::new(&dir).join("capi"))
}

/// Whether this machine has an NVIDIA GPU the driver exposes.
pub fn gpu_present() -> bool {
    Path::new("/dev/nvidiactl").exists() || Path::new("/dev/nvidia0").exists()
}

/// The project-local installs tried in each place, in order: the GPU build first on a machine
/// with a GPU. The GPU build runs CPU sessions too, but elsewhere the CPU wheel's library stays
/// the one every CPU figure was measured with.
fn installs(gpu: bool) -> &'static [&'static str] {
    if gpu {
        &[".v2l/onnxruntime-gpu", ".v2l/onnxruntime"]
    } else {
        &[".v2l/onnxruntime"]
    }
}

/// Where project-local installs (`.v2l/…`) are looked for, in order: the current directory
/// and its ancestors, the executable's ancestors, and this crate's source tree's.
pub(crate) fn search_roots() -> Vec<PathBuf> {
    let mut roots: Vec<PathBuf> = Vec::new();
    if let Ok(cwd) = std::env::current_dir() {
        roots.extend(cwd.ancestors().map(Path::to_path_buf));
    }
    if let Ok(exe) = std::env::current_exe() {
        roots.extend(exe.ancestors().skip(1).map(Path::to_path_buf));
    }
    if let Some(dir) = option_env!("CARGO_MANIFEST_DIR") {
        roots.extend(Path::new(dir).ancestors().map(Path::to_path_buf));
    }
    roots
}

/// The library path ONNX Runtime was loaded from, once [`init`] succeeded.
pub fn library_path() -> Option<&'static Path> {
    INIT.get()
        .and_then(|r| r.as_ref().ok())
        .map(|(p, _)| p.as_path())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gpu_machine_prefers_the_gpu_build() {
        assert_eq!(installs(true), [".v2l/onnxruntime-gpu", ".v2l/onnxruntime"]);
        assert_eq!(installs(false), [".v2l/onnxruntime"]);
    }
}
