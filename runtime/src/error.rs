//! The runtime's error type: each variant names the input at fault and, where there is an
//! obvious fix, carries a hint for the command-line front ends to print.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("ONNX Runtime library not found (looked in: {searched})")]
    OrtMissing { searched: String },
    #[error("cannot load ONNX Runtime from {path}: {message}")]
    OrtLoad { path: PathBuf, message: String },
    #[error("{context}: {message}")]
    Ort { context: String, message: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    BadFile { path: PathBuf, message: String },
    #[error("{path}: missing tensor `{name}`")]
    MissingTensor { path: PathBuf, name: String },
    #[error("{what}: {message}")]
    Invalid { what: String, message: String },
    #[error("cancelled")]
    Cancelled,
    #[error(transparent)]
    Lora(#[from] crate::lora::format::LoraError),
    #[error(transparent)]
    LiLora(#[from] crate::lora::lilora::LiLoraError),
}

impl RuntimeError {
    /// A one-line suggestion for the user, where one is known.
    pub fn hint(&self) -> Option<String> {
        match self {
            RuntimeError::OrtMissing { .. } | RuntimeError::OrtLoad { .. } => Some(
                "run `bash scripts/setup.sh` (installs the library from the `onnxruntime` PyPI wheel into .v2l/), \
                 or set ORT_DYLIB_PATH to a libonnxruntime.so of version >= 1.24"
                    .into(),
            ),
            _ => None,
        }
    }
}

pub type Result<T> = std::result::Result<T, RuntimeError>;
