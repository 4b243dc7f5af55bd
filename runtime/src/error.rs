//! The runtime's error type: each variant names the input at fault and, where there is an
//! obvious fix, carries a hint for the command-line front ends to print.

use std::path::PathBuf;

/// Everything that can go wrong loading or running an engine, each naming its input.
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
    /// An engine (or export directory) that cannot do what was asked: a component it lacks,
    /// a record that does not fit the request. Names the directory.
    #[error("{dir}: {message}")]
    Engine { dir: PathBuf, message: String },
    /// A LoRA layer that cannot be applied to this model's weights: names the layer.
    #[error("{layer}: {message}")]
    LoraLayer { layer: String, message: String },
    /// A broken invariant inside v2l (a call out of order): not the input's fault.
    #[error("internal error in {what}: {message}")]
    Internal { what: String, message: String },
    /// An engine graph that lacks an output v2l reads: a graph from another export or tool.
    #[error("{graph}: the graph has no `{output}` output")]
    MissingOutput { graph: String, output: String },
    #[error("{what}: {message}")]
    Invalid { what: String, message: String },
    /// An engine graph whose inputs, outputs or placement are not what v2l expects of it: a
    /// graph from another export or tool, or a run the graph cannot take.
    #[error("{graph}: {message}")]
    Graph { graph: String, message: String },
    /// A reference clip Video2LoRA cannot predict an effect from (too short, another grid).
    #[error("{clip}: {message}")]
    Reference { clip: String, message: String },
    /// ffmpeg or ffprobe could not be run.
    #[error("{tool}: {message}")]
    Tool { tool: String, message: String },
    /// Tensors of shapes or types an operation cannot take.
    #[error("{what}: {message}")]
    Tensor { what: String, message: String },
    /// A picture larger than the decoder is allowed to open (`UntrustedMedia::max_pixels`).
    #[error(
        "{path}: declares a {size} picture, more than the {max_pixels} pixels allowed; not decoded"
    )]
    MediaTooLarge {
        path: PathBuf,
        size: String,
        max_pixels: usize,
    },
    /// A stage's output went NaN or infinite: stopped there instead of writing a black video.
    #[error("{stage}: {count} of {total} values are NaN or infinite; stopped rather than write a broken video (an input too large for the model? guidance, a LoRA or its scale, prompt embeddings)")]
    NonFinite {
        stage: String,
        count: usize,
        total: usize,
    },
    /// A bad request value, its field typed (front ends name it their own way).
    #[error("{0}")]
    Request(#[from] v2l_contracts::request::RequestError),
    /// An export directory's `manifest.json` is missing, unreadable or of another version.
    #[error(transparent)]
    Manifest(#[from] v2l_contracts::ManifestError),
    /// The fuse kernel refused a LoRA's factors or a weight (NaN/inf values, sizes, dtypes).
    #[error("{what}: {source}")]
    Fuse {
        what: String,
        #[source]
        source: crate::lora::fuse::FuseError,
    },
    #[error("cancelled")]
    Cancelled,
    #[error(transparent)]
    Lora(#[from] crate::lora::format::LoraError),
    #[error(transparent)]
    LiLora(#[from] crate::lora::lilora::LiLoraError),
}

/// What kind of fault an error is: the one classification behind both the command-line exit
/// codes and the C ABI's status codes (`capi`), so the same fault never maps two ways.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// A bad value or request: size, shape, NaN, limit, a component the engine lacks.
    BadInput,
    /// A file that is missing, unreadable or malformed (engine parts included).
    BadFile,
    /// A LoRA that does not fit the model, or whose factors cannot be fused.
    Lora,
    /// The ONNX Runtime library is missing or cannot be loaded.
    OrtUnavailable,
    /// ONNX Runtime failed while building a session or running a model.
    Runtime,
    /// The caller cancelled the run.
    Cancelled,
}

impl ErrorKind {
    /// The exit code of a `v2l-*` command that fails this way (2 is clap's usage error).
    pub fn exit_code(self) -> u8 {
        match self {
            ErrorKind::BadInput | ErrorKind::BadFile | ErrorKind::Lora => 1,
            ErrorKind::OrtUnavailable => 3,
            ErrorKind::Runtime => 4,
            ErrorKind::Cancelled => 5,
        }
    }
}

impl From<v2l_sampling::SamplingError> for RuntimeError {
    fn from(e: v2l_sampling::SamplingError) -> Self {
        use v2l_sampling::SamplingError as S;
        match e {
            S::Io { path, source } => RuntimeError::Io { path, source },
            S::BadFile { path, message } => RuntimeError::BadFile { path, message },
            S::Invalid { what, message } => RuntimeError::Invalid { what, message },
            S::Internal { what, message } => RuntimeError::Internal { what, message },
        }
    }
}

impl RuntimeError {
    /// `graph` gave no output `output`.
    pub fn missing_output(graph: &str, output: &str) -> Self {
        RuntimeError::MissingOutput {
            graph: graph.into(),
            output: output.into(),
        }
    }

    /// An I/O failure on `path`.
    pub fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        RuntimeError::Io {
            path: path.into(),
            source,
        }
    }

    /// The kind of fault (see [`ErrorKind`]).
    pub fn kind(&self) -> ErrorKind {
        use crate::lora::{format::LoraError, lilora::LiLoraError};
        match self {
            RuntimeError::OrtMissing { .. } | RuntimeError::OrtLoad { .. } => {
                ErrorKind::OrtUnavailable
            }
            RuntimeError::Ort { .. } => ErrorKind::Runtime,
            RuntimeError::Io { .. }
            | RuntimeError::BadFile { .. }
            | RuntimeError::MissingTensor { .. }
            | RuntimeError::MediaTooLarge { .. }
            | RuntimeError::MissingOutput { .. }
            | RuntimeError::Manifest(_)
            | RuntimeError::Lora(LoraError::Io { .. })
            | RuntimeError::LiLora(LiLoraError::Io { .. }) => ErrorKind::BadFile,
            RuntimeError::Invalid { .. }
            | RuntimeError::Graph { .. }
            | RuntimeError::Reference { .. }
            | RuntimeError::Tool { .. }
            | RuntimeError::Tensor { .. }
            | RuntimeError::Request(_)
            | RuntimeError::Engine { .. }
            | RuntimeError::NonFinite { .. } => ErrorKind::BadInput,
            RuntimeError::Cancelled => ErrorKind::Cancelled,
            RuntimeError::Internal { .. } => ErrorKind::Runtime,
            RuntimeError::Lora(_)
            | RuntimeError::LiLora(_)
            | RuntimeError::Fuse { .. }
            | RuntimeError::LoraLayer { .. } => ErrorKind::Lora,
        }
    }

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

/// Results of the runtime.
pub type Result<T> = std::result::Result<T, RuntimeError>;
/// `values` (what `stage` produced) when all finite, else [`RuntimeError::NonFinite`] naming
/// the stage: every stage output is checked before it is used or written.
pub fn check_finite(stage: impl FnOnce() -> String, values: &[f32]) -> Result<()> {
    let count = values.iter().filter(|v| !v.is_finite()).count();
    match count {
        0 => Ok(()),
        _ => Err(RuntimeError::NonFinite {
            stage: stage(),
            count,
            total: values.len(),
        }),
    }
}

/// A bundle record problem is the runtime's `Io` or `BadFile`, naming the same path.
impl From<v2l_contracts::bundle::BundleError> for RuntimeError {
    fn from(e: v2l_contracts::bundle::BundleError) -> Self {
        use v2l_contracts::bundle::BundleError;
        match e {
            BundleError::Io { path, source } => RuntimeError::Io { path, source },
            BundleError::BadFile { path, message } => RuntimeError::BadFile { path, message },
        }
    }
}
