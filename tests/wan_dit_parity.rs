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

/// The tiny Wan DiT `dir` exported to `out/dit.onnx`, and the fixture's feed for `variant`.
fn export(
    variant: &str,
    dir: &str,
    out: &std::path::Path,
) -> (wan_dit::WanDitExport, BTreeMap<String, Tensor>) {
    let ck = Checkpoint::open_dir(&fixtures().join("wan-tiny").join(dir)).unwrap();
    let ex = wan_dit::export(&ck, None).unwrap();
    assert!(ex.unused_keys.is_empty(), "unused: {:?}", ex.unused_keys);
    save(&ex.graph, &out.join("dit.onnx"), ExternalData::Auto).unwrap();
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
    (ex, feed)
}

fn check(variant: &str, dir: &str) {
    let d = tempfile::tempdir().unwrap();
    let (ex, feed) = export(variant, dir, d.path());
    let mut m = Model::load(&d.path().join("dit.onnx"), &SessionOptions::default()).unwrap();
    let io = read_safetensors(&fixtures().join("wan-tiny/dit_io.safetensors")).unwrap();
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

/// Wan's RoPE fused for CUDA (`v2l_graphs::passes::fuse_rope`; run on the CPU provider): T2V
/// and I2V still compute what diffusers computes.
#[test]
fn wan_dit_with_fused_rope_matches_diffusers() {
    let io = read_safetensors(&fixtures().join("wan-tiny/dit_io.safetensors")).unwrap();
    for (variant, dir) in [("t2v", "transformer"), ("i2v", "transformer_i2v")] {
        let d = tempfile::tempdir().unwrap();
        let (ex, feed) = export(variant, dir, d.path());
        let want = &io[&format!("{variant}_sample")];
        let q_and_k = 2 * ex.config.num_layers;
        assert_rope_fuses(
            &d.path().join("dit.onnx"),
            &feed,
            q_and_k,
            want,
            SAMPLE_REL_L2,
        );
    }
}

/// On CUDA engines Wan's AdaLN modulation is folded into its norms
/// (`v2l_graphs::passes::fold_modulation`; run here on the CPU provider): T2V and I2V still
/// compute what diffusers computes, and with a timestep per sample what the exported form does.
#[test]
fn wan_dit_with_the_modulation_folded_into_its_norms_matches_diffusers() {
    let io = read_safetensors(&fixtures().join("wan-tiny/dit_io.safetensors")).unwrap();
    for (variant, dir) in [("t2v", "transformer"), ("i2v", "transformer_i2v")] {
        let d = tempfile::tempdir().unwrap();
        let (ex, mut feed) = export(variant, dir, d.path());
        let before = v2l_graphs::read_model(&d.path().join("dit.onnx")).unwrap();
        let mut m = before.clone();
        // norm1 and norm3 of each block (norm2, before the cross-attention, has no
        // modulation) and the output norm.
        let want = 2 * ex.config.num_layers + 1;
        assert_eq!(
            v2l_graphs::passes::fold_modulation(&mut m),
            want,
            "{variant}"
        );
        assert_eq!(v2l_graphs::passes::fold_modulation(&mut m), 0, "{variant}");
        let folded = m.graph.as_ref().unwrap().node.iter().filter(|n| {
            n.op_type == "LayerNormalization"
                && n.input.get(1).is_some_and(|g| g.ends_with(".scale"))
        });
        assert_eq!(folded.count(), want, "{variant}");
        let run =
            |m: &v2l_graphs::proto::ModelProto, name: &str, feed: &BTreeMap<String, Tensor>| {
                sample_of(&d.path().join(name), m, feed)
            };
        assert_close(
            &format!("{variant} modulation-folded sample"),
            &run(&m, "folded.onnx", &feed),
            &io[&format!("{variant}_sample")],
            SAMPLE_REL_L2,
        );
        two_timesteps(&mut feed);
        assert_close(
            &format!("{variant} folded against exported, a timestep per sample"),
            &run(&m, "folded_two.onnx", &feed),
            &run(&before, "exported_two.onnx", &feed),
            1e-6,
        );
    }
}

#[test]
fn wan_t2v_dit_matches_diffusers() {
    check("t2v", "transformer");
}

#[test]
fn wan_i2v_dit_matches_diffusers() {
    check("i2v", "transformer_i2v");
}

/// Lowered to bf16 (the CPU's emulated form, as `v2l-compile --precision bf16` builds it), the
/// Wan DiT computes what diffusers computes with the model loaded in bf16
/// (`torch_dtype=torch.bfloat16`, fixture `wan-tiny/dit_bf16_io` from `gen/wan_dit_bf16.py`):
/// `_keep_in_fp32_modules` (time embedder, scale-shift tables, the norms) in f32 with its
/// roundings where diffusers rounds. Two bf16 computations of one model differ by their
/// kernels' roundings: diffusers' own bf16 output moves 4.8e-3 (T2V) when only its attention
/// kernel changes (`sdpa_kernel(SDPBackend.MATH)` against the default). v2l's emulated bf16 is
/// within 8e-3 of diffusers' bf16, and nearer than a graph that keeps none of those modules.
fn check_bf16(variant: &str, dir: &str) {
    use v2l_graphs::passes::{lower_precision, Lowering, WeightFile, KEEP_IN_FP32};
    let d = tempfile::tempdir().unwrap();
    let (_, feed) = export(variant, dir, d.path());
    let bf16 = read_safetensors(&fixtures().join("wan-tiny/dit_bf16_io.safetensors")).unwrap();
    let want = &bf16[&format!("{variant}_sample_bf16")];
    let lowered = |keep: bool, fold: bool| {
        let src = d.path().join("dit.onnx");
        let mut m = v2l_graphs::read_model(&src).unwrap();
        if !keep {
            m.metadata_props.retain(|e| e.key != KEEP_IN_FP32);
        }
        let folds = match fold {
            true => v2l_graphs::passes::fold_modulation(&mut m),
            false => 0,
        };
        assert_eq!(folds > 0, fold);
        let how = Lowering {
            dtype: v2l_graphs::DType::BF16,
            emulate: true,
            low_caches: false,
            low_factors: false,
            low_gelu: false,
            half_attention: false,
            half_gelu: false,
        };
        let data = d.path().join(format!("bf16_{keep}_{fold}.bin"));
        lower_precision(&mut m, &src, WeightFile::Write(&data), how).unwrap();
        // The lowering keeps each folded norm whole (an f32 island, as diffusers computes it).
        let still_folded = m.graph.as_ref().unwrap().node.iter().filter(|n| {
            n.op_type == "LayerNormalization"
                && n.input.get(1).is_some_and(|g| g.ends_with(".scale"))
        });
        assert_eq!(still_folded.count(), folds);
        let path = d.path().join(format!("bf16_{keep}_{fold}.onnx"));
        v2l_graphs::write_model(&path, &m).unwrap();
        let opts = SessionOptions {
            keep_weight_casts: true,
            ..Default::default()
        };
        let mut m = Model::load(&path, &opts).unwrap();
        m.run(&feed).unwrap().remove("sample").unwrap()
    };
    let (kept, all_low) = (lowered(true, false), lowered(false, false));
    // As a CUDA engine lowers it: the modulation folded into the f32 norms first.
    let folded = lowered(true, true);
    let (e_kept, e_all) = (kept.rel_l2(want), all_low.rel_l2(want));
    eprintln!(
        "{variant} bf16 vs diffusers bf16: kept f32 modules {e_kept:.3e}, none kept {e_all:.3e}, \
         modulation folded {:.3e} (from unfolded {:.3e})",
        folded.rel_l2(want),
        folded.rel_l2(&kept)
    );
    assert_close(&format!("{variant} bf16 sample"), &kept, want, 8e-3);
    assert_close(
        &format!("{variant} bf16 sample, folded"),
        &folded,
        want,
        8e-3,
    );
    assert!(
        e_kept < e_all,
        "{variant}: keeping diffusers' f32 modules does not bring v2l nearer"
    );
}

#[test]
fn wan_t2v_dit_in_bf16_matches_diffusers_in_bf16() {
    check_bf16("t2v", "transformer");
}

#[test]
fn wan_i2v_dit_in_bf16_matches_diffusers_in_bf16() {
    check_bf16("i2v", "transformer_i2v");
}
