//! The exported Wan2.1 DiT computes what diffusers' `WanTransformer3DModel` computes (fixture
//! `wan-tiny/dit_io`, made by `tests/fixtures/gen/wan_dit.py`): T2V, and I2V with its image
//! embedder and `add_k_proj`/`add_v_proj` attention to the image tokens.

use std::collections::BTreeMap;

use v2l_export::{wan_dit, Checkpoint};
use v2l_graphs::{save, ExternalData};
use v2l_runtime::{read_safetensors, Model, SessionOptions, Tensor};
use v2l_tests::*;

/// The bound for a component in float32.
const SAMPLE_REL_L2: f64 = 1e-5;

fn check(variant: &str, dir: &str) {
    let ck = Checkpoint::open_dir(&fixtures().join("wan-tiny").join(dir)).unwrap();
    let ex = wan_dit::export(&ck, None).unwrap();
    assert!(ex.unused_keys.is_empty(), "unused: {:?}", ex.unused_keys);
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("dit.onnx");
    save(&ex.graph, &path, ExternalData::Auto).unwrap();
    let mut m = Model::load(&path, &SessionOptions::default()).unwrap();
    let io = read_safetensors(&fixtures().join("wan-tiny/dit_io.safetensors")).unwrap();
    let mut feed: BTreeMap<String, Tensor> = BTreeMap::new();
    for name in [
        "hidden_states",
        "timestep",
        "encoder_hidden_states",
        "encoder_hidden_states_image",
        "rope_cos",
        "rope_sin",
    ] {
        if let Some(t) = io.get(&format!("{variant}_{name}")) {
            feed.insert(name.to_string(), t.clone());
        }
    }
    // The runtime's RoPE tables are diffusers' (`model.rope`), bitwise.
    let (cos, sin) = v2l_runtime::rope::wan_rope(12, 3, 4, 6, (1, 2, 2), 32).unwrap();
    assert_eq!(
        cos,
        io[&format!("{variant}_rope_cos")].as_f32("cos").unwrap()
    );
    assert_eq!(
        sin,
        io[&format!("{variant}_rope_sin")].as_f32("sin").unwrap()
    );
    let out = m.run(&feed).unwrap().remove("sample").unwrap();
    assert_close(
        &format!("{variant} sample"),
        &out,
        &io[&format!("{variant}_sample")],
        SAMPLE_REL_L2,
    );
    // LoRA targets in `named_modules()` order; I2V's added projections after `to_out.0`.
    let names: Vec<&str> = ex.linears.iter().map(|l| l.name.as_str()).collect();
    let attn2: Vec<&str> = names
        .iter()
        .filter(|n| n.starts_with("blocks.0.attn2."))
        .copied()
        .collect();
    let mut want = vec![
        "blocks.0.attn2.to_q",
        "blocks.0.attn2.to_k",
        "blocks.0.attn2.to_v",
        "blocks.0.attn2.to_out.0",
    ];
    if variant == "i2v" {
        want.extend(["blocks.0.attn2.add_k_proj", "blocks.0.attn2.add_v_proj"]);
    }
    assert_eq!(attn2, want);
    assert_eq!(
        names.first(),
        Some(&"condition_embedder.time_embedder.linear_1")
    );
    assert_eq!(names.last(), Some(&"proj_out"));
}

#[test]
fn wan_t2v_dit_matches_diffusers() {
    check("t2v", "transformer");
}

#[test]
fn wan_i2v_dit_matches_diffusers() {
    check("i2v", "transformer_i2v");
}
