//! `v2l-calibration`: static int8 for the DiT's linears, the way TensorRT's explicit
//! quantisation reads it.
//!
//! Two steps, both independent of how the model is run (the runtime drives them):
//! 1. [`ranges`]: observe the activations entering each quantised linear over calibration
//!    samples and turn them into per-tensor scales (min/max, or a percentile of |x| that
//!    ignores rare outliers);
//! 2. [`qdq`]: place `QuantizeLinear → DequantizeLinear` pairs on those activations (per-tensor,
//!    symmetric, zero point 0) and on the weights (per output channel), in front of each `Gemm`,
//!    so TensorRT fuses them into int8 GEMMs and ONNX Runtime's CPU provider into its
//!    `QLinearMatMul`/`MatMulInteger` kernels. Weights stay f32 initializers in the graph (the
//!    LoRA base; the backend quantises them with the recorded per-channel scales).

#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)
)]

pub mod qdq;
pub mod ranges;

pub use qdq::{insert_qdq, observe_linear_inputs, QdqForm, QdqNames};
pub use ranges::{Method, Ranges};
