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
pub mod dtype;
pub mod family;
pub mod frame_batch;
pub mod input;
pub mod io;
pub mod latent;
pub mod manifest;
pub mod noise;
pub mod request;

pub use family::{Family, PipelineKind, Sampler};
pub use latent::LatentGrid;
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
            "the file's length is not what its header describes (truncated, or bytes appended)"
                .to_string()
        }
        E::InvalidOffset(name) => {
            // safetensors requires the tensors' byte ranges to tile the data in order.
            format!(
                "tensor `{name}`'s data offsets do not start where the previous tensor's end (overlapping, gapped or reversed ranges: corrupt)"
            )
        }
        E::TensorInvalidInfo | E::InvalidTensorView(..) | E::ValidationOverflow => {
            "a tensor's shape does not match its data".to_string()
        }
        other => other.to_string(),
    };
    format!("not a valid safetensors file: {what}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A safetensors file of two f32 tensors with the given byte ranges.
    fn two_tensors(a: [usize; 2], b: [usize; 2], data: usize) -> Vec<u8> {
        let header = format!(
            r#"{{"a":{{"dtype":"F32","shape":[{}],"data_offsets":[{},{}]}},"b":{{"dtype":"F32","shape":[{}],"data_offsets":[{},{}]}}}}"#,
            (a[1] - a[0]) / 4,
            a[0],
            a[1],
            (b[1] - b[0]) / 4,
            b[0],
            b[1]
        );
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend(header.as_bytes());
        bytes.extend(vec![0u8; data]);
        bytes
    }

    fn problem(bytes: &[u8]) -> String {
        match safetensors::SafeTensors::deserialize(bytes) {
            Ok(_) => "read".into(),
            Err(e) => safetensors_problem(&e),
        }
    }

    #[test]
    fn safetensors_problems_are_worded_for_what_they_are() {
        assert_eq!(problem(&two_tensors([0, 8], [8, 16], 16)), "read");
        // Overlapping ranges are not "outside the file".
        let p = problem(&two_tensors([0, 8], [4, 12], 12));
        assert!(p.contains("overlapping"), "{p}");
        let p = problem(&two_tensors([0, 8], [8, 16], 20));
        assert!(p.contains("bytes appended"), "{p}");
        let p = problem(&two_tensors([0, 8], [8, 16], 12));
        assert!(p.contains("truncated"), "{p}");
    }
}
