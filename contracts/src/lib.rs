//! `v2l-contracts`: what the exporter, the runtime and the C ABI agree on, in one small crate
//! with no graph or ONNX Runtime code, so `runtime` (and `libv2l.so`) need not link the exporter.
//!
//! | module | contract |
//! |---|---|
//! | [`atomic`] | outputs written whole or not at all (`tempfile` + rename) |
//! | [`bundle`] | `bundle.json`: an engine's backend, precision, LoRA strategy and targets, every part's hash; its check on load |
//! | [`Family`] | the model families, told apart by `_class_name` in one place |
//! | [`input`] | input files read as regular files only (never `/dev/zero` until memory runs out) |
//! | [`io`] | graph input and output names, as constants |
//! | [`manifest`] | `manifest.json` of an export directory: graphs, LoRA targets, VAE batching, hypernetwork sizes |
//! | [`request`] | request fields and the error a bad value gives, named by each front end its own way |
//! | [`noise`] | the one seeded generator: `--seed`'s noise, generated weights, test data |
//! | [`LinearInfo`] | one LoRA-targetable linear layer (module path and shape) |
//! | [`frame_batch`] | diffusers' VAE frame batches, causal-conv cache shapes, frames a decode returns |
//! | [`safetensors_problem`] | a safetensors parse error in words a user can act on |

// Input reaches this crate: no unwrap, expect or unchecked indexing outside tests (modules
// that index provably in-bounds buffers in hot loops say so and allow it locally).
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)
)]

pub mod atomic;
pub mod bundle;
pub mod family;
pub mod frame_batch;
pub mod input;
pub mod io;
pub mod manifest;
pub mod noise;
pub mod request;

pub use family::{Family, PipelineKind, Sampler};
pub use manifest::{Manifest, ManifestError};

/// One `nn.Linear` of a model that a LoRA can target: the weight is `<name>.weight`, `[out, in]`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LinearInfo {
    /// Module path (`transformer_blocks.0.attn1.to_q`); the weight is `<name>.weight`.
    pub name: String,
    pub out_features: usize,
    pub in_features: usize,
}

/// A safetensors parse error in words a user can act on (not the crate's variant names).
pub fn safetensors_problem(e: &safetensors::SafeTensorError) -> String {
    use safetensors::SafeTensorError as E;
    let what = match e {
        E::HeaderTooLarge | E::HeaderTooSmall | E::InvalidHeaderLength | E::InvalidHeaderStart => {
            "its header length is impossible (is it a safetensors file at all?)".to_string()
        }
        E::InvalidHeader | E::InvalidHeaderDeserialization | E::JsonError(_) => {
            "its JSON header cannot be read".to_string()
        }
        E::MetadataIncompleteBuffer => {
            "the file is shorter than its header says (truncated?)".to_string()
        }
        E::InvalidOffset(name) => {
            format!("tensor `{name}` has data offsets outside the file (truncated or corrupt)")
        }
        E::TensorInvalidInfo | E::InvalidTensorView(..) | E::ValidationOverflow => {
            "a tensor's shape does not match its data".to_string()
        }
        other => other.to_string(),
    };
    format!("not a valid safetensors file: {what}")
}
