//! LoRA handle calls.

use crate::args::null;
use crate::error::guard;
use crate::handles::{lookup, unregister, V2lLora};
use crate::types::V2lStatus;

/// Writes the number of layers `lora` changes to `*out_layers`.
///
/// # Safety
/// `lora` is a live LoRA handle; `out_layers` points to writable storage for a `size_t`.
#[no_mangle]
pub unsafe extern "C" fn v2l_lora_layer_count(
    lora: *const V2lLora,
    out_layers: *mut usize,
) -> V2lStatus {
    guard("v2l_lora_layer_count", || {
        let l = lookup(lora, "lora")?;
        if out_layers.is_null() {
            return Err(null("out_layers"));
        }
        *out_layers = l.lora.layers.len();
        Ok(())
    })
}

/// Frees a LoRA (NULL: no-op). Generators it is applied to keep their fused weights.
///
/// # Safety
/// `lora` is NULL or a pointer returned by a v2l function that makes LoRAs.
#[no_mangle]
pub unsafe extern "C" fn v2l_lora_free(lora: *mut V2lLora) -> V2lStatus {
    guard("v2l_lora_free", || {
        drop(unregister(lora, "lora")?);
        Ok(())
    })
}
