//! Any bytes as a safetensors tensor file (`--inputs`, `--prompt-embeds`, `--noise`, clips as
//! `reference_u8`): an error or tensors whose data matches their shapes, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(tensors) = v2l_runtime::tensor::parse_safetensors(data, "fuzz.safetensors".as_ref()) {
        for t in tensors.values() {
            let len = match &t.data {
                v2l_runtime::tensor::Data::F32(v) => v.len(),
                v2l_runtime::tensor::Data::I64(v) => v.len(),
                v2l_runtime::tensor::Data::U8(v) => v.len(),
            };
            assert_eq!(len, t.numel(), "shape and data disagree");
        }
    }
});
