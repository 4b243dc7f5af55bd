//! `v2l-runtime`: the lean runtime. It loads engine bundles and serves requests; it does not
//! build bundles, calibrate or measure (`v2l-compile`, `v2l-tools` do), and links neither the
//! exporter nor the compile layer (`scripts/check-layers.sh` checks it).
//!
//! Module map, in the order data flows:
//!
//! | module | what it owns |
//! |---|---|
//! | [`engine`] | an opened, checked engine: manifest, [`bundle`] record, family |
//! | [`ort_env`], [`session`], [`backend`] | ONNX Runtime: finding it, sessions on host tensors, CPU/CUDA/TensorRT providers |
//! | [`lora`] | LoRA files and formats, LiLoRA, exact merges, switching strategies (the fuse kernels are `v2l-kernels`') |
//! | [`predict`], [`effect`] | LoRAs from a reference clip (Video2LoRA) or an effect prompt (Prompt2Effect, LoFA) |
//! | [`pipeline`] | a request, and running it: one denoise loop for CogVideoX and Wan |
//! | [`step_cache`] | diffusers' First Block Cache: the DiT cut into head, blocks and output, and when to skip the blocks |
//! | [`scheduler`], [`flow`], [`rope`] | DDIM and the flow samplers; RoPE tables |
//! | [`vae`] | the VAE's frame-batch loop with its causal-conv cache, and tiling |
//! | [`text`] | prompt text (the `text` feature): tokenizer and text encoder |
//! | [`video`], [`image_preprocess`], [`layout`] | frames in and out (ffmpeg), image preprocessing, tensor layouts |
//! | [`request`], [`limits`] | the one request builder every front end uses: defaults, limits, the frame-size rule, typed fields |
//! | [`error`], [`tensor`] | typed errors, host tensors and safetensors files |
//!
//! The CPU kernels (attention, the VAE convolution, the int8 GEMM, the LoRA fuse, CPU
//! detection) are the `v2l-kernels` crate below this one, re-exported under their old names.
//!
//! What the runtime shares with the exporter (the manifest, families, graph I/O names, LoRA
//! targets, frame-batch rules) comes from `v2l-contracts`.

// Input reaches this crate: no unwrap, expect or unchecked indexing outside tests (modules
// that index provably in-bounds buffers in hot loops say so and allow it locally).
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)
)]

pub mod backend;
pub mod bundle;
pub mod cuda_libs;
pub mod effect;
pub mod engine;
pub mod error;
pub mod image_preprocess;
pub mod layout;
pub mod limits;
pub mod lora;
pub mod ort_env;
pub mod pipeline;
pub mod predict;
pub mod request;
pub mod session;
pub mod stages;
pub mod step_cache;
pub mod tensor;
pub mod text;
pub mod vae;
pub mod video;

/// The sampling math (schedulers, RoPE tables), from its own crate.
pub use v2l_sampling::{flow, rope, scheduler};

/// The CPU kernels, from `v2l-kernels`, where the runtime has always named them.
pub use v2l_kernels::{attention, conv, cpu, qgemm};

pub use error::{Result, RuntimeError};
pub use session::{Model, SessionOptions};
pub use tensor::{read_safetensors, rel_l2, write_safetensors, Tensor};
pub use v2l_contracts::Family;
