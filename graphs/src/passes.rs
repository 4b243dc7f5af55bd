//! Graph passes over a written model: small patches, each one idea.
//!
//! [`fuse_attention`] and [`fuse_gelu`] (`passes/attention.rs`, `passes/gelu.rs`) are the backend
//! rewrites `v2l-compile` applies for ONNX Runtime; [`fuse_rope`] (`passes/rope.rs`),
//! [`fold_modulation`] (`passes/modulation.rs`) and [`group_norm_row_stats`]
//! (`passes/group_norm.rs`) the ones for its CUDA provider. The other two serve the LoRA strategies that avoid rebuilding a session per LoRA:
//! - [`bind_weights_as_inputs`]: the LoRA-targetable weights become graph inputs, so a runtime
//!   passes (fused) weights per request; the base stays in the main graph's weight file.
//! - [`add_lora_branches`]: every `Gemm` consuming a targeted weight gets a parallel low-rank
//!   branch `y += s·(x·Aᵀ)·Bᵀ` whose `A [r, in]`, `B [out, r]` and `s [1]` are graph inputs, so
//!   weights stay untouched and the LoRA is just data.

mod attention;
mod chunk;
mod conv;
mod data_file;
mod edit;
mod gelu;
mod group_norm;
mod lora;
mod modulation;
mod opset;
mod precision;
mod qmatmul;
mod quantize;
mod rope;
mod schedule;
pub use attention::{fuse_attention, onnx_attention, v2l_attention, V2L_ATTENTION};
pub use chunk::{chunk_feed_forward, FF_CHUNKS};
pub use conv::{conv_geometry, v2l_conv, V2L_CONV};
pub use gelu::{fuse_gelu, fuse_gelu_bias};
pub use group_norm::{group_norm_row_stats, GroupNormApply};
pub use modulation::fold_modulation;
pub use opset::upgrade_opset;
pub use precision::{
    keep_in_fp32_modules, keeps_f32, lower_precision, Lowered, Lowering, WeightFile,
    GROUP_NORM_SCOPE, KEEP_IN_FP32,
};
pub use qmatmul::{v2l_qmatmul, V2L_QMATMUL};
pub use quantize::{quantize_linears, use_quantized_weights, QuantScheme, Quantized, WeightQuant};
pub use rope::fuse_rope;
pub use schedule::carried_outputs_first;

pub use edit::{PassError, MS_DOMAIN, V2L_DOMAIN};
pub use lora::{
    add_lora_branches, bind_weights_as_inputs, is_factor, lora_input_names, lora_merge_graph,
};
