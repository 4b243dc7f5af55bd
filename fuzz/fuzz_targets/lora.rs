//! Any bytes as a LoRA file in every format v2l reads (diffusers/PEFT, kohya/musubi, ComfyUI),
//! with and without the model's module names: an error or a LoRA whose factors fit, never a
//! panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

/// The tiny CogVideoX's linear layers (as kohya names resolve against them).
fn modules() -> Vec<String> {
    let mut m = vec![
        "patch_embed.text_proj".to_string(),
        "time_embedding.linear_1".into(),
        "time_embedding.linear_2".into(),
        "norm_out.linear".into(),
        "proj_out".into(),
    ];
    for b in 0..2 {
        for l in [
            "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "norm1.linear",
            "norm2.linear", "ff.net.0.proj", "ff.net.2",
        ] {
            m.push(format!("transformer_blocks.{b}.{l}"));
        }
    }
    m
}

fuzz_target!(|data: &[u8]| {
    let path = std::path::Path::new("fuzz.safetensors");
    let modules = modules();
    for names in [None, Some(modules.as_slice())] {
        if let Ok(lora) = v2l_runtime::lora::format::parse(data, path, names) {
            for l in &lora.layers {
                // Factor bytes agree with their shapes (what the fuse kernel relies on).
                let size = |f: &v2l_runtime::lora::format::Factor| f.dtype.size() * f.shape[0] * f.shape[1];
                assert_eq!(l.b.shape[1], l.rank());
                assert_eq!(l.a.bytes.len(), size(&l.a));
                assert_eq!(l.b.bytes.len(), size(&l.b));
            }
        }
    }
});
