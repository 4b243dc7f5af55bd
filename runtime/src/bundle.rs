//! Engine bundles as the runtime loads them: the record and its checks are the contract
//! (`v2l_contracts::bundle`); what the runtime adds is how a target's storage type maps to
//! its fuse kernel.

pub use v2l_contracts::bundle::{
    file_entry, io, verify, Attention, Backend, Bundle, BundleError, BundleFile, CalibrationRecord,
    Int8Scheme, LoraTarget, Machine, Precision, StageAccuracy, Strategy, FILE_NAME, FORMAT_VERSION,
};

use crate::lora::apply::Stored;

/// The LoRA-targetable weights `bundle` stores other than as f32 (f16, bf16, int8, int4, Q/DQ),
/// and how: what a LoRA fused into them is converted to.
pub fn stored(bundle: &Bundle) -> std::collections::BTreeMap<String, Stored> {
    bundle
        .lora_targets
        .iter()
        .filter(|t| t.dtype != Stored::Float(v2l_graphs::DType::F32))
        .map(|t| (t.initializer.clone(), t.dtype))
        .collect()
}
