//! Real scale: a CogVideoX-5B-width graph (hidden 3072, 48 heads, the real layer shapes of
//! CogVideoX-Fun-5B-InP from `fixtures/fullscale_linear_shapes.json`, two blocks, generated bf16
//! weights) exports with external data and loads in ONNX Runtime.

use v2l_export::{cogvideox_dit, Checkpoint};
use v2l_graphs::{save, DType, ExternalData};
use v2l_runtime::{Model, SessionOptions};
use v2l_tests::*;

#[test]
fn cogvideox_5b_width_exports_and_loads() {
    let shapes: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("fullscale_linear_shapes.json")).unwrap(),
    )
    .unwrap();
    let model = &shapes["cogvideox-fun-5b-inp"];
    let mut config = model["config"].clone();
    config["num_layers"] = 2.into();

    let dir = tempfile::tempdir().unwrap();
    let ck_dir = dir.path().join("transformer");
    synthetic_dit(&ck_dir, config, DType::BF16);
    let ck = Checkpoint::open_dir(&ck_dir).unwrap();
    let ex = cogvideox_dit::export(&ck, &Default::default()).unwrap();
    assert!(ex.unused_keys.is_empty());

    // Every linear the graph has is a real layer of the 5B model with the real shape, and every
    // real layer outside blocks 2..41 is in the graph.
    let real: Vec<(String, Vec<usize>)> = model["linear"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l[0].as_str().unwrap().to_string(),
                serde_json::from_value(l[1].clone()).unwrap(),
            )
        })
        .filter(|(n, _)| {
            !n.starts_with("transformer_blocks.")
                || n.starts_with("transformer_blocks.0.")
                || n.starts_with("transformer_blocks.1.")
        })
        .collect();
    let ours: Vec<(String, Vec<usize>)> = ex
        .linears
        .iter()
        .map(|l| (l.name.clone(), vec![l.out_features, l.in_features]))
        .collect();
    assert_eq!(ours, real);

    // f32 weights of two blocks exceed 64 MiB: the writer must switch to external data.
    let path = dir.path().join("dit.onnx");
    let written = save(&ex.graph, &path, ExternalData::Auto).unwrap();
    assert!(
        written.data.is_some(),
        "expected external data for {} bytes",
        written.weight_bytes
    );
    assert!(
        std::fs::metadata(&path).unwrap().len() < 1 << 20,
        "weights leaked into the protobuf"
    );

    let mut m = Model::load(&path, &SessionOptions::default()).unwrap();
    // A small sample (1 latent frame of 4x4, 3 text tokens) keeps the run cheap.
    let out = m.run(&dit_inputs(1, 1, 33, 4, 4, 3, 4096, 2, 64)).unwrap();
    assert_eq!(out["sample"].shape, vec![1, 1, 16, 4, 4]);
    assert_finite("sample", &out["sample"]);
}
