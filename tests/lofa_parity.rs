//! The exported LoFA stages compute what the authors' modules compute (fixture
//! `wan-tiny/lofa_io`, made by `tests/fixtures/gen/lofa.py` from `GAP-LAB-CUHK-SZ/LoFA`): stage 1's
//! hidden states, and stage 2's factors and alpha from them, with the authors' fp16 round trip
//! between the stages and without it, for the tiny Wan DiT's 16 attention weights.

use std::collections::BTreeMap;

use v2l_export::lofa::{export, Stage};
use v2l_export::Checkpoint;
use v2l_graphs::{save, ExternalData};
use v2l_runtime::{read_safetensors, Model, SessionOptions, Tensor};
use v2l_tests::*;

/// The bound for factors and fused weights against the upstream modules (f32).
const REL_L2: f64 = 1e-5;

fn load(stage: Stage, dir: &str, tmp: &std::path::Path) -> Model {
    let ck = Checkpoint::open_dir(&fixtures().join("wan-tiny/lofa").join(dir)).unwrap();
    let ex = export(&ck, stage).unwrap();
    // Stage 1's heads (its response map) are not part of inference.
    let unused: Vec<&String> = ex
        .unused_keys
        .iter()
        .filter(|k| !k.starts_with("head_"))
        .collect();
    assert!(unused.is_empty(), "{unused:?}");
    let path = tmp.join(format!("{dir}.onnx"));
    save(&ex.graph, &path, ExternalData::Auto).unwrap();
    Model::load(&path, &SessionOptions::default()).unwrap()
}

/// `[N, out, in]` updates `lora_B·lora_A` of N layers.
fn updates(a: &[f32], b: &[f32], n: usize, r: usize, side: usize) -> Vec<f32> {
    let mut d = vec![0f32; n * side * side];
    for l in 0..n {
        for o in 0..side {
            for i in 0..side {
                d[(l * side + o) * side + i] = (0..r)
                    .map(|k| b[(l * side + o) * r + k] * a[(l * r + k) * side + i])
                    .sum();
            }
        }
    }
    d
}

#[test]
fn lofa_stages_match_the_authors_modules() {
    let d = tempfile::tempdir().unwrap();
    let (mut s1, mut s2) = (
        load(Stage::One, "stage1", d.path()),
        load(Stage::Two, "stage2", d.path()),
    );
    let io = read_safetensors(&fixtures().join("wan-tiny/lofa_io.safetensors")).unwrap();
    let w = io["W"].as_f32("W").unwrap();
    for p in 0..2 {
        let key = |k: &str| format!("p{p}.{k}");
        let mut feed = BTreeMap::from([
            ("text".to_string(), io[&key("text_emb")].clone()),
            ("base_weight".to_string(), io["W"].clone()),
            ("depth_index".to_string(), io["depth_id"].clone()),
            ("type_index".to_string(), io["type_id"].clone()),
        ]);
        let hidden = s1.run(&feed).unwrap().remove("hidden").unwrap();
        assert_close(
            &key("stage1 hidden"),
            &hidden,
            &io[&key("stage1_hidden")],
            REL_L2,
        );
        // The authors' fp16 round trip between the stages (`.half()` then back).
        let h = hidden.as_f32("hidden").unwrap();
        let rounded: Vec<f32> = h.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect();
        for (prior, tag) in [(rounded, ""), (h.to_vec(), "nort.")] {
            feed.insert(
                "prior".to_string(),
                Tensor::f32(hidden.shape.clone(), prior),
            );
            let out = s2.run(&feed).unwrap();
            let want = |k: &str| io[&key(&format!("{tag}{k}"))].clone();
            assert_close(
                &key(&format!("{tag}lora_A")),
                &out["lora_A"],
                &want("A"),
                REL_L2,
            );
            assert_close(
                &key(&format!("{tag}alpha")),
                &Tensor::f32(vec![16, 1], out["alpha"].as_f32("a").unwrap().to_vec()),
                &want("alpha"),
                REL_L2,
            );
            let (a, b) = (
                out["lora_A"].as_f32("a").unwrap(),
                out["lora_B"].as_f32("b").unwrap(),
            );
            // Fused weights W + ΔW, ΔW = alpha·B·A (alpha folded into lora_B).
            let dw = updates(a, b, 16, 4, 24);
            let fused: Vec<f32> = w.iter().zip(&dw).map(|(x, y)| x + y).collect();
            let want_dw = want("delta_W");
            let want_fused: Vec<f32> = w
                .iter()
                .zip(want_dw.as_f32("dw").unwrap())
                .map(|(x, y)| x + y)
                .collect();
            let shape = vec![16, 24, 24];
            assert_close(
                &key(&format!("{tag}ΔW")),
                &Tensor::f32(shape.clone(), dw),
                &want_dw,
                REL_L2,
            );
            assert_close(
                &key(&format!("{tag}fused")),
                &Tensor::f32(shape, fused),
                &Tensor::f32(vec![16, 24, 24], want_fused),
                REL_L2,
            );
        }
    }
}
