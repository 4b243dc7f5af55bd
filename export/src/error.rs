//! The one error type of `v2l-export`: every variant names the file (and key) at fault.

use std::path::PathBuf;

/// Why a checkpoint cannot be exported, naming the file or tensor at fault.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Safetensors { path: PathBuf, message: String },
    #[error(transparent)]
    Manifest(#[from] v2l_contracts::ManifestError),
    #[error("{path}: missing tensor `{key}`")]
    MissingKey { path: PathBuf, key: String },
    #[error("{path}: tensor `{key}` has shape {found:?}, but the config implies {expected:?}")]
    Shape {
        path: PathBuf,
        key: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("{path}: tensor `{key}` has dtype {dtype}; expected f32, f16 or bf16")]
    DType {
        path: PathBuf,
        key: String,
        dtype: String,
    },
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error("{path}: `_class_name` is `{found}`, expected `{expected}`")]
    UnknownClass {
        path: PathBuf,
        found: String,
        expected: String,
    },
    #[error("{path}: {what} is not supported yet")]
    Unsupported { path: PathBuf, what: String },
    #[error(transparent)]
    Write(#[from] v2l_graphs::WriteError),
    /// A part of an export directory that cannot be written or is refused by its check.
    #[error("{0}")]
    Part(String),
}

/// Results of the exporters.
pub type Result<T> = std::result::Result<T, ExportError>;
