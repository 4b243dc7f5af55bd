//! `v2l-export`: checkpoint readers and one ONNX exporter per architecture.
//!
//! Data flows `Checkpoint` (memory-mapped safetensors + `config.json`) → [`Scope`] (a prefix
//! into the checkpoint, like candle's `VarBuilder`) → an architecture file that builds a
//! [`v2l_graphs::Graph`] whose initializers keep their checkpoint names.
//!
//! | file | architecture |
//! |---|---|
//! | [`cogvideox_dit`] | `CogVideoXTransformer3DModel` |
//! | [`cogvideox_vae`] | `AutoencoderKLCogVideoX` encoder and decoder |
//! | [`t5_encoder`] | transformers `T5EncoderModel` (the prompt encoder) |
//! | [`video2lora_hypernet`] | Video2LoRA hypernetwork `VideoHyperDream` (reference latents → LiLoRA rows) |
//! | [`lofa`] | LoFA two-stage hypernetwork (prompt + base weights → hidden states → LoRA factors) |
//! | [`prompt2effect`] | Prompt2Effect `HyperNet` (effect prompt + base weights → LoRA factors) |

// Checkpoints and graphs come from users: no unwrap, expect or unchecked indexing outside
// tests.
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)
)]

pub mod checkpoint;
pub mod clip_vision;
pub mod cogvideox_dit;
pub mod cogvideox_vae;
pub mod dit;
pub mod dit_graph;
pub mod error;
mod layers;
pub mod lofa;
pub mod manifest;
pub mod pipeline;
pub mod prompt2effect;
pub mod scope;
pub mod synthetic;
pub mod t5_encoder;
pub mod vae;
pub mod video2lora_hypernet;
pub mod wan_dit;
pub mod wan_vae;

pub use checkpoint::{Checkpoint, TensorRef};
pub use error::{ExportError, Result};
pub use layers::sdpa_graph;
pub use manifest::Manifest;
pub use scope::{LinearInfo, Scope};
