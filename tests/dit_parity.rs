//! The exported CogVideoX DiT computes what diffusers computes (fixture `dit_io`).

use v2l_export::{cogvideox_dit, Checkpoint};
use v2l_graphs::{save, ExternalData};
use v2l_runtime::{Model, SessionOptions};
use v2l_tests::*;

#[test]
fn dit_matches_diffusers() {
    let ck = Checkpoint::open_dir(&tiny().join("transformer")).unwrap();
    let ex = cogvideox_dit::export(&ck, &Default::default()).unwrap();
    assert!(ex.unused_keys.is_empty(), "unused: {:?}", ex.unused_keys);

    // All 21 nn.Linear weights are initializers under their checkpoint names, in LiLoRA order.
    let order: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tiny().join("variant.json")).unwrap()).unwrap();
    let expected: Vec<String> = order["lilora_layer_order"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().trim_start_matches("lora_unet__").to_string())
        .collect();
    let got: Vec<String> = ex.linears.iter().map(|l| l.name.replace('.', "_")).collect();
    assert_eq!(got, expected);
    for l in &ex.linears {
        let name = format!("{}.weight", l.name);
        assert!(ex.graph.initializers().iter().any(|i| i.name == name), "{name} is not an initializer");
    }

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dit.onnx");
    save(&ex.graph, &path, ExternalData::Auto).unwrap();
    let mut model = Model::load(&path, &SessionOptions::default()).unwrap();
    let io = load("dit_io.safetensors");
    let inputs = pick(&io, &["hidden_states", "encoder_hidden_states", "timestep", "rope_cos", "rope_sin"]);
    let out = model.run(&inputs).unwrap();
    assert_close("dit sample", &out["sample"], &io["output"], F32_REL_L2);
}
