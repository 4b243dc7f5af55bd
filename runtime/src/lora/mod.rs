//! LoRA algebra: standard LoRA files, Video2LoRA's LiLoRA, and fusing factors into weights.
//!
//! | file | what |
//! |---|---|
//! | [`format`] | diffusers/PEFT, kohya/musubi and ComfyUI LoRA files, read and written |
//! | [`lilora`] | Video2LoRA's LiLoRA auxiliaries: hypernetwork rows → standard LoRA factors |
//! | [`names`] | module names LoRAs are shared under that are not diffusers' (Wan's original names) |
//! | [`merge`] | several LoRAs with weights as one, exactly (rank concatenation) |
//! | [`response`] | LoFA's response map `|ΔW/W| > τ` and a fuse restricted to it |
//! | [`apply`] | matching a LoRA to a model's layers and fusing it from the base weights |
//! | [`switch`] | base + live weights: switching LoRAs rewrites the union of touched layers from the base |
//! | [`factors`] | the `unfused` graph's factor inputs, laid out and kept for LoRAs used before |
//! | [`strategy`] | fused / bound / unfused: three ways to apply a LoRA to the DiT, one API |
//! | [`fuse`] | the fuse kernel `W' = W + s·B·A`, f32/f16/bf16, streaming, multi-threaded |

pub mod apply;
pub mod factors;
pub mod format;
pub use v2l_kernels::fuse;
pub mod lilora;
pub mod merge;
pub mod names;
pub mod response;
pub mod strategy;
pub mod switch;

/// A LoRA to fuse into the DiT's weights for a run: the file it came from and its multiplier.
/// The factors are shared (`Arc`): a server's LoRA cache hands the same LoRA to many requests
/// without copying it.
#[derive(Clone, Debug)]
pub struct AppliedLora {
    pub lora: std::sync::Arc<format::Lora>,
    pub source: std::path::PathBuf,
    pub multiplier: f32,
}

impl AppliedLora {
    /// The same factors (one `Arc`) at the same multiplier; two `None`s are the same.
    pub fn same(a: Option<&AppliedLora>, b: Option<&AppliedLora>) -> bool {
        match (a, b) {
            (None, None) => true,
            (Some(a), Some(b)) => {
                std::sync::Arc::ptr_eq(&a.lora, &b.lora)
                    && a.multiplier.to_bits() == b.multiplier.to_bits()
            }
            _ => false,
        }
    }
}
