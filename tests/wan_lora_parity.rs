//! A Wan LoRA through v2l's fuse kernel gives what diffusers computes with the LoRA loaded
//! (fixture `wan-tiny/lora` + `lora_io`, made by `tests/fixtures/gen/wan_lora.py`: PEFT rank 4,
//! alpha 8, attention and feed-forward linears), and the same LoRA shared under the Wan
//! repo's module names (ComfyUI `diffusion_model.blocks.0.self_attn.q`, kohya
//! `lora_unet_blocks_0_self_attn_q`) fuses to the same weights, bitwise.

use std::collections::BTreeMap;
use std::sync::Arc;

use v2l_export::manifest::Manifest;
use v2l_export::{dit, Checkpoint};
use v2l_graphs::{save, DType, ExternalData};
use v2l_runtime::engine::Engine;
use v2l_runtime::lora::format::{self, LoraFormat};
use v2l_runtime::lora::{names, strategy, AppliedLora};
use v2l_runtime::{read_safetensors, SessionOptions, Tensor};
use v2l_tests::*;

const SAMPLE_REL_L2: f64 = 1e-5;

#[test]
fn a_wan_lora_fuses_to_diffusers_output_under_every_naming() {
    let wan = fixtures().join("wan-tiny");
    let d = tempfile::tempdir().unwrap();
    let ck = Checkpoint::open_dir(&wan.join("transformer")).unwrap();
    let ex = dit::export(&ck, DType::F32).unwrap();
    save(&ex.graph, &d.path().join("dit.onnx"), ExternalData::Auto).unwrap();
    let mut manifest = Manifest::read_or_default(d.path()).unwrap();
    manifest.dit = Some(ex.manifest_entry("dit.onnx"));
    manifest.write(d.path()).unwrap();
    let engine = Engine::open(d.path()).unwrap();
    let modules: Vec<String> = engine
        .dit_targets()
        .unwrap()
        .iter()
        .map(|t| t.name.clone())
        .collect();

    let io = read_safetensors(&wan.join("dit_io.safetensors")).unwrap();
    let feed: BTreeMap<String, Tensor> = [
        "hidden_states",
        "timestep",
        "encoder_hidden_states",
        "rope_cos",
        "rope_sin",
    ]
    .iter()
    .map(|n| (n.to_string(), io[&format!("t2v_{n}")].clone()))
    .collect();
    let opts = SessionOptions::default();
    let run = |lora: format::Lora| -> Tensor {
        let applied = AppliedLora {
            lora: Arc::new(lora),
            source: "test".into(),
            multiplier: 1.0,
        };
        let mut m = strategy::fused_dit(&engine, &opts, &applied).unwrap();
        m.run(&feed).unwrap().remove("sample").unwrap()
    };

    let peft = format::read(
        &wan.join("lora/pytorch_lora_weights.safetensors"),
        Some(&modules),
    )
    .unwrap();
    assert_eq!(peft.layers.len(), 20);
    assert!(
        peft.layers.iter().all(|l| l.alpha == 8.0),
        "alpha from the adapter metadata"
    );
    let want = &read_safetensors(&wan.join("lora_io.safetensors")).unwrap()["sample"];
    let fused = run(peft.clone());
    assert_close("sample with the LoRA", &fused, want, SAMPLE_REL_L2);

    // The same factors under the Wan repo's names, in the formats those LoRAs are shared in.
    let mut original = peft.clone();
    for l in &mut original.layers {
        l.module = names::wan_original(&l.module).unwrap();
    }
    for f in [LoraFormat::ComfyUi, LoraFormat::Kohya] {
        let p = d.path().join(format!("original_{}.safetensors", f.name()));
        format::write(&p, &original, f).unwrap();
        // Foreign files carry no v2l metadata.
        let bytes = std::fs::read(&p).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        safetensors::serialize_to_file(st.tensors(), &None, &p).unwrap();
        let read = format::read(&p, Some(&modules)).unwrap();
        assert_eq!(read.layers, peft.layers, "{f:?}");
        assert_eq!(run(read), fused, "{f:?}: another naming, another result");
    }

    // The same through the `dit` stage (`v2l-run stage dit --lora`), with the RoPE tables left
    // out (computed by `rope::wan_rope`) and int64 timesteps (UniPC's) taken as floats.
    let mut inputs: BTreeMap<String, Tensor> = ["hidden_states", "encoder_hidden_states"]
        .iter()
        .map(|n| (n.to_string(), io[&format!("t2v_{n}")].clone()))
        .collect();
    inputs.insert("timestep".into(), Tensor::i64(vec![2], vec![999, 412]));
    let src = std::path::Path::new("inputs.safetensors");
    v2l_tools::stage::check_inputs(&engine, v2l_tools::stage::Stage::Dit, &inputs, src).unwrap();
    let applied = AppliedLora {
        lora: Arc::new(peft.clone()),
        source: "test".into(),
        multiplier: 1.0,
    };
    let stage = |lora: Option<&AppliedLora>, inputs: &BTreeMap<String, Tensor>| {
        v2l_tools::stage::run_stage(
            &engine,
            v2l_tools::stage::Stage::Dit,
            inputs,
            &opts,
            lora.map(|l| (l, None)),
            Default::default(),
            1,
        )
        .unwrap()
        .outputs
        .remove("sample")
        .unwrap()
    };
    let mut float_t = inputs.clone();
    float_t.insert("timestep".into(), Tensor::f32(vec![2], vec![999.0, 412.0]));
    assert_eq!(
        stage(Some(&applied), &inputs),
        stage(Some(&applied), &float_t)
    );
    // At the fixture's own timesteps, the stage is the fused model above, bitwise.
    let mut fixture_t = inputs.clone();
    fixture_t.insert("timestep".into(), io["t2v_timestep"].clone());
    assert_eq!(stage(Some(&applied), &fixture_t), fused);
    // A bad size is refused by name before any session.
    let mut bad = inputs.clone();
    bad.insert("hidden_states".into(), Tensor::zeros(vec![2, 5, 3, 4, 6]));
    let e = v2l_tools::stage::check_inputs(&engine, v2l_tools::stage::Stage::Dit, &bad, src)
        .unwrap_err();
    assert!(e.to_string().contains("hidden_states"), "{e}");
}
