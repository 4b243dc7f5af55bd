//! The one error type of the sampling math; the runtime turns it into its own error.

use std::path::PathBuf;

/// A scheduler config that cannot be read or used, or a request the math cannot serve.
#[derive(Debug, thiserror::Error)]
pub enum SamplingError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A config file that is not what its reader expects.
    #[error("{path}: {message}")]
    BadFile { path: PathBuf, message: String },
    /// A value the math cannot take (steps, sizes), named.
    #[error("{what}: {message}")]
    Invalid { what: String, message: String },
    /// A state the code should never reach.
    #[error("internal error in {what}: {message}")]
    Internal { what: String, message: String },
}

impl SamplingError {
    pub fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        SamplingError::Io {
            path: path.into(),
            source,
        }
    }
}

pub type Result<T> = std::result::Result<T, SamplingError>;
