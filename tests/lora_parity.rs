//! LoRA algebra against the upstream fixtures: LiLoRA from predicted rows, fused weights, the
//! DiT with a fused LoRA (Video2LoRA and a PEFT file), and bitwise format conversions.

use v2l_export::{cogvideox_dit, Checkpoint, LinearInfo};
use v2l_graphs::{save, ExternalData};
use v2l_runtime::lora::apply::fused_weights;
use v2l_runtime::lora::format::{self, LoraFormat};
use v2l_runtime::lora::lilora::LiLora;
use v2l_runtime::{Model, SessionOptions, Tensor};
use v2l_tests::*;

/// Exports the tiny DiT to `dir/dit.onnx`, returning its LoRA targets.
fn export_dit(dir: &std::path::Path) -> Vec<LinearInfo> {
    let ck = Checkpoint::open_dir(&tiny().join("transformer")).unwrap();
    let ex = cogvideox_dit::export(&ck, &Default::default()).unwrap();
    save(&ex.graph, &dir.join("dit.onnx"), ExternalData::Auto).unwrap();
    ex.linears
}

fn video2lora(targets: &[LinearInfo]) -> format::Lora {
    let lilora = LiLora::load(&tiny().join("lilora.safetensors"), targets).unwrap();
    let e2e = load("e2e_io.safetensors");
    let rows = &e2e["hyper_weights"];
    lilora
        .to_lora(
            rows.as_f32("hyper_weights").unwrap(),
            rows.shape[2],
            1.0,
            1.0,
        )
        .unwrap()
}

fn run_dit(model: &std::path::Path, weights: Vec<(String, Tensor)>) -> Tensor {
    let mut m = Model::load_with_weights(model, &SessionOptions::default(), weights).unwrap();
    let io = load("dit_io.safetensors");
    let inputs = pick(
        &io,
        &[
            "hidden_states",
            "encoder_hidden_states",
            "timestep",
            "rope_cos",
            "rope_sin",
        ],
    );
    m.run(&inputs).unwrap().remove("sample").unwrap()
}

#[test]
fn lilora_fused_weights_match_upstream() {
    let dir = tempfile::tempdir().unwrap();
    let targets = export_dit(dir.path());
    let lora = video2lora(&targets);
    assert_eq!(lora.layers.len(), 21);
    let fused = fused_weights(
        &dir.path().join("dit.onnx"),
        &targets,
        &lora,
        1.0,
        std::path::Path::new("video2lora"),
        &Default::default(),
    )
    .unwrap();
    let want = load("fused_linear_weights.safetensors");
    assert_eq!(fused.len(), want.len());
    let mut worst = 0f64;
    for (name, t) in &fused {
        let err = t.rel_l2(&want[name]);
        worst = worst.max(err);
        assert!(err <= 1e-5, "{name}: relative L2 {err:.3e} > 1e-5");
    }
    eprintln!("fused weights: worst relative L2 error over 21 layers {worst:.3e} (bound 1e-5)");
}

#[test]
fn dit_with_video2lora_matches_upstream() {
    let dir = tempfile::tempdir().unwrap();
    let targets = export_dit(dir.path());
    let model = dir.path().join("dit.onnx");
    let fused = fused_weights(
        &model,
        &targets,
        &video2lora(&targets),
        1.0,
        std::path::Path::new("video2lora"),
        &Default::default(),
    )
    .unwrap();
    let io = load("dit_io.safetensors");
    assert_close(
        "dit output_with_lilora",
        &run_dit(&model, fused),
        &io["output_with_lilora"],
        F32_REL_L2,
    );
}

#[test]
fn dit_with_peft_lora_matches_upstream() {
    let dir = tempfile::tempdir().unwrap();
    let targets = export_dit(dir.path());
    let model = dir.path().join("dit.onnx");
    let path = tiny().join("peft_lora/pytorch_lora_weights.safetensors");
    let lora = format::read(&path, None).unwrap();
    assert_eq!(lora.format, LoraFormat::Diffusers);
    assert_eq!(lora.layers.len(), 8);
    assert!(lora
        .layers
        .iter()
        .all(|l| l.rank() == 4 && l.scale(1.0) == 2.0));
    let fused = fused_weights(&model, &targets, &lora, 1.0, &path, &Default::default()).unwrap();
    let want = load("peft_lora_io.safetensors");
    assert_close(
        "dit output_with_peft_lora",
        &run_dit(&model, fused),
        &want["output_with_peft_lora"],
        F32_REL_L2,
    );
}

#[test]
fn conversions_keep_every_factor_bitwise() {
    let dir = tempfile::tempdir().unwrap();
    let original = format::read(
        &tiny().join("peft_lora/pytorch_lora_weights.safetensors"),
        None,
    )
    .unwrap();
    let mut current = original.clone();
    for f in [
        LoraFormat::Kohya,
        LoraFormat::ComfyUi,
        LoraFormat::Diffusers,
    ] {
        let p = dir.path().join(format!("{}.safetensors", f.name()));
        format::write(&p, &current, f).unwrap();
        current = format::read(&p, None).unwrap();
        assert_eq!(current.format, f);
    }
    assert_eq!(current.layers, original.layers);
}

#[test]
fn mismatched_loras_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let targets = export_dit(dir.path());
    let model = dir.path().join("dit.onnx");
    let mut lora = format::read(
        &tiny().join("peft_lora/pytorch_lora_weights.safetensors"),
        None,
    )
    .unwrap();

    // Names from another model.
    let mut other = lora.clone();
    for l in &mut other.layers {
        l.module = format!("blocks.{}", l.module);
    }
    let err = fused_weights(
        &model,
        &targets,
        &other,
        1.0,
        std::path::Path::new("other.safetensors"),
        &Default::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("other.safetensors")
            && err.contains("8 of 8 LoRA layers match no linear layer"),
        "{err}"
    );

    // A factor shape that disagrees with the base weight.
    lora.layers[0].a = format::Factor::from_f32([4, 16], &[0.0; 64]);
    let err = fused_weights(
        &model,
        &targets,
        &lora,
        1.0,
        std::path::Path::new("bad.safetensors"),
        &Default::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("but the model's weight is [32, 32]"), "{err}");

    // Hypernet rows that disagree with the LiLoRA layers.
    let lilora = LiLora::load(&tiny().join("lilora.safetensors"), &targets).unwrap();
    let err = lilora
        .to_lora(&vec![0.0; 20 * 150], 150, 1.0, 1.0)
        .unwrap_err()
        .to_string();
    assert!(err.contains("21 layers"), "{err}");

    // LiLoRA for a model with other layers.
    let err = LiLora::load(&tiny().join("lilora.safetensors"), &targets[..20])
        .unwrap_err()
        .to_string();
    assert!(err.contains("match no layer"), "{err}");
}

/// X → Y → X on the DiT's real weights gives X's weights bitwise, in f32, f16 and bf16, with
/// X = the predicted Video2LoRA LoRA (all 21 layers) and Y = the PEFT LoRA (8 layers).
#[test]
fn switching_loras_is_exact_in_every_dtype() {
    use v2l_runtime::lora::switch::{Buffer, SwitchableWeights};
    let dir = tempfile::tempdir().unwrap();
    let targets = export_dit(dir.path());
    let x = video2lora(&targets);
    let y = format::read(
        &tiny().join("peft_lora/pytorch_lora_weights.safetensors"),
        None,
    )
    .unwrap();
    let fused = load("fused_linear_weights.safetensors");
    let ck = Checkpoint::open_dir(&tiny().join("transformer")).unwrap();
    let src = std::path::Path::new("x");
    for dtype in ["f32", "f16", "bf16"] {
        let weights = targets
            .iter()
            .map(|t| {
                let w = ck.get(&format!("{}.weight", t.name)).unwrap().to_f32();
                let buf = match dtype {
                    "f32" => Buffer::F32(w),
                    "f16" => Buffer::F16(w.iter().map(|v| half::f16::from_f32(*v)).collect()),
                    _ => Buffer::BF16(w.iter().map(|v| half::bf16::from_f32(*v)).collect()),
                };
                (t.clone(), buf)
            })
            .collect();
        let mut sw = SwitchableWeights::new(weights);
        let base: Vec<Buffer> = targets
            .iter()
            .map(|t| sw.live(&t.name).unwrap().clone())
            .collect();
        assert_eq!(sw.apply(Some((&x, 1.0, src))).unwrap().len(), 21);
        let after_x: Vec<Buffer> = targets
            .iter()
            .map(|t| sw.live(&t.name).unwrap().clone())
            .collect();
        if dtype == "f32" {
            for t in &targets {
                let Buffer::F32(v) = sw.live(&t.name).unwrap() else {
                    unreachable!()
                };
                let want = &fused[&format!("{}.weight", t.name)];
                assert!(Tensor::f32(want.shape.clone(), v.clone()).rel_l2(want) <= 1e-5);
            }
        }
        sw.apply(Some((&y, 1.0, src))).unwrap();
        sw.apply(Some((&x, 1.0, src))).unwrap();
        let again: Vec<Buffer> = targets
            .iter()
            .map(|t| sw.live(&t.name).unwrap().clone())
            .collect();
        assert!(after_x == again, "{dtype}: X -> Y -> X is not bitwise");
        // Clearing restores the base bitwise; a bad LoRA leaves the live weights untouched.
        sw.apply(None).unwrap();
        let cleared: Vec<Buffer> = targets
            .iter()
            .map(|t| sw.live(&t.name).unwrap().clone())
            .collect();
        assert!(
            cleared == base,
            "{dtype}: clearing did not restore the base"
        );
        let mut nan = y.clone();
        nan.layers[3].a = format::Factor::from_f32(nan.layers[3].a.shape, &vec![f32::NAN; 4 * 32]);
        sw.apply(Some((&x, 1.0, src))).unwrap();
        assert!(sw.apply(Some((&nan, 1.0, src))).is_err());
        let still: Vec<Buffer> = targets
            .iter()
            .map(|t| sw.live(&t.name).unwrap().clone())
            .collect();
        assert!(still == after_x, "{dtype}: a refused LoRA changed weights");
    }
}
