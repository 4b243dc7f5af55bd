//! Why a compile failed: the runtime's errors (reading the export, building sessions for the
//! accuracy record and calibration) and the compile layer's own (a graph pass that finds a
//! graph it does not expect, a graph that cannot be written). The runtime never produces the
//! latter, so they live here rather than in `RuntimeError`.

use v2l_runtime::error::{ErrorKind, RuntimeError};

#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    /// Reading the export, or running a model for the accuracy record or calibration.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// A compile option that cannot work (`what` names it: a flag, a field).
    #[error("{what}: {message}")]
    Invalid { what: String, message: String },
    /// A file of the export that is not what it should be.
    #[error("{}: {message}", path.display())]
    BadFile {
        path: std::path::PathBuf,
        message: String,
    },
    /// Writing the engine's record or hashing its parts.
    #[error(transparent)]
    Bundle(#[from] v2l_runtime::bundle::BundleError),
    /// A graph could not be written into the engine.
    #[error("{path}: {source}")]
    GraphWrite {
        path: std::path::PathBuf,
        #[source]
        source: v2l_graphs::WriteError,
    },
    /// A graph is not what a compile pass expects (not an export of this v2l).
    #[error("{path}: {source}")]
    GraphPass {
        path: std::path::PathBuf,
        #[source]
        source: v2l_graphs::passes::PassError,
    },
}

impl CompileError {
    /// The kind of fault, as the runtime classifies its own (exit codes, hints).
    pub fn kind(&self) -> ErrorKind {
        match self {
            CompileError::Runtime(e) => e.kind(),
            CompileError::Invalid { .. } => ErrorKind::BadInput,
            CompileError::BadFile { .. } | CompileError::Bundle(_) => ErrorKind::BadFile,
            CompileError::GraphWrite { .. } => ErrorKind::Runtime,
            CompileError::GraphPass { .. } => ErrorKind::BadFile,
        }
    }

    /// A fix to suggest, where the runtime knows one.
    pub fn hint(&self) -> Option<String> {
        match self {
            CompileError::Runtime(e) => e.hint(),
            _ => None,
        }
    }
}

/// Results of the compile layer.
pub type Result<T> = std::result::Result<T, CompileError>;
