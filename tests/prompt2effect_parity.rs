//! The exported Prompt2Effect hypernetwork computes what the public reproduction's `HyperNet`
//! computes (fixture `wan-tiny/prompt2effect_io`, made by `tests/fixtures/gen/prompt2effect.py`
//! from `LukeLIN-web/Prompt2Effect`'s `hypernet.py`): LoRA factors for the tiny Wan DiT's 16
//! square attention weights, per prompt, and in chunks of layers (rows never mix).

use std::collections::BTreeMap;

use v2l_export::{prompt2effect, Checkpoint};
use v2l_graphs::{save, ExternalData};
use v2l_runtime::{read_safetensors, Model, SessionOptions, Tensor};
use v2l_tests::*;

/// The bound for factors against the upstream module (f32).
const FACTOR_REL_L2: f64 = 1e-5;

/// Rows `[from, to)` of the leading axis of `t` (after dropping `lead` leading axes at
/// index `at`).
fn rows(t: &Tensor, at: &[usize], from: usize, to: usize) -> Tensor {
    let v = t.as_f32("t").unwrap();
    let mut shape = t.shape[at.len()..].to_vec();
    let inner: usize = shape[1..].iter().product();
    let mut offset = 0;
    let mut stride: usize = t.shape.iter().product();
    for (axis, &i) in at.iter().enumerate() {
        stride /= t.shape[axis];
        offset += i * stride;
    }
    shape[0] = to - from;
    let start = offset + from * inner;
    Tensor::f32(shape, v[start..start + (to - from) * inner].to_vec())
}

#[test]
fn prompt2effect_matches_the_reproduction() {
    let ck = Checkpoint::open_dir(&fixtures().join("wan-tiny/prompt2effect")).unwrap();
    let ex = prompt2effect::export(&ck).unwrap();
    assert!(ex.unused_keys.is_empty(), "{:?}", ex.unused_keys);
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("p2e.onnx");
    save(&ex.graph, &path, ExternalData::Auto).unwrap();
    let mut m = Model::load(&path, &SessionOptions::default()).unwrap();
    let io = read_safetensors(&fixtures().join("wan-tiny/prompt2effect_io.safetensors")).unwrap();
    // The positional table is upstream's, to f32 rounding.
    let pe = prompt2effect::positions(24, 40);
    let want = io["sin_pos"].as_f32("sin_pos").unwrap();
    assert!(v2l_runtime::tensor::rel_l2(&pe, want) < 1e-6);
    let n = 16;
    for p in 0..2 {
        // All 16 layers at once, then in chunks of 5 (the runtime streams chunks).
        for chunk in [n, 5] {
            let mut a = Vec::new();
            let mut b = Vec::new();
            for from in (0..n).step_by(chunk) {
                let to = (from + chunk).min(n);
                let mut feed = BTreeMap::new();
                feed.insert("text".to_string(), rows(&io["text"], &[], p, p + 1));
                feed.insert(
                    "base_weight".to_string(),
                    rows(&io["base_weight"], &[], from, to),
                );
                for k in ["layer_index", "module_index"] {
                    let v2l_runtime::tensor::Data::I64(v) = &io[k].data else {
                        panic!("{k} is not int64")
                    };
                    feed.insert(
                        k.to_string(),
                        Tensor::i64(vec![to - from], v[from..to].to_vec()),
                    );
                }
                let mut out = m.run(&feed).unwrap();
                a.extend_from_slice(out.remove("lora_A").unwrap().as_f32("a").unwrap());
                b.extend_from_slice(out.remove("lora_B").unwrap().as_f32("b").unwrap());
            }
            let what = |f: &str| format!("prompt {p}, chunks of {chunk}: {f}");
            assert_close(
                &what("lora_A"),
                &Tensor::f32(vec![n, 4, 24], a),
                &rows(&io["lora_A"], &[p], 0, n),
                FACTOR_REL_L2,
            );
            assert_close(
                &what("lora_B"),
                &Tensor::f32(vec![n, 24, 4], b),
                &rows(&io["lora_B"], &[p], 0, n),
                FACTOR_REL_L2,
            );
        }
    }
}
