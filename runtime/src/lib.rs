//! `v2l-runtime`: runs exported graphs.
//!
//! [`ort_env`] finds and loads ONNX Runtime, [`session::Model`] runs one graph on host
//! [`tensor::Tensor`]s, [`stage`] runs one pipeline component on a safetensors file of inputs
//! (the way a user checks an export against PyTorch), [`vae::Vae`] drives the VAE's
//! frame-batch loop with its causal-conv cache (and tiles frames, [`vae::Tiling`]), and
//! [`limits`] checks a request's sizes and numbers before any work starts.
//!
//! Module map, in the order data flows: [`engine::Engine`] (an opened, checked engine: what the
//! engine is) → [`session`] / [`backend`] (ONNX Runtime sessions on the engine's backend) →
//! [`lora`] (what a LoRA is: files, LiLoRA, merge, the fuse kernel, switching, strategies) →
//! [`pipeline`] (what a request is, and running it; [`layout`] for its tensor layouts) and
//! [`stage`] (one component at a time). [`limits`] and [`error`] serve all of them.
//!
//! [`pipeline::Pipeline`] generates in named steps (check the request, apply a reference clip's
//! LoRA for that request only, encode the first frame, denoise, decode); [`predict`] turns a
//! reference clip into a LoRA; [`lora`] reads, converts, fuses and switches LoRAs; [`bundle`]
//! compiles and verifies engines; [`measure`] tells which effect a clip shows, from its pixels.
//! What the runtime shares with the exporter (the manifest, LoRA targets, frame-batch rules)
//! comes from `v2l-contracts`: the runtime does not link the exporter.

// Input reaches this crate: no unwrap, expect or unchecked indexing outside tests (modules
// that index provably in-bounds buffers in hot loops say so and allow it locally).
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)
)]

pub mod backend;
pub mod bundle;
pub mod effect;
pub mod engine;
pub mod error;
pub mod flow;
pub mod image_preprocess;
pub mod layout;
pub mod limits;
pub mod lora;
pub mod measure;
pub mod ort_env;
pub mod pipeline;
pub mod predict;
pub mod rope;
pub mod scheduler;
pub mod session;
pub mod stage;
pub mod tensor;
pub mod text;
pub mod vae;
pub mod video;

pub use error::{Result, RuntimeError};
pub use session::{Model, SessionOptions};
pub use tensor::{read_safetensors, rel_l2, write_safetensors, Tensor};
