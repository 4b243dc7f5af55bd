//! Video2LoRA's released pipeline end to end: a CogVideoX-Fun-InP model folder made by the
//! authors' own classes (fixture `cogvideox-fun-inp-tiny`, VideoX-Fun's
//! `CogVideoXFunInpaintPipeline` with `DDIM_Origin`), exported, compiled and run, without and
//! with the reference clip's LiLoRA. Variant B (`cogvideox-fun-inp-tiny-b`, the same script at
//! other shapes) has an even latent frame count, a fractional RoPE crop region, a portrait
//! reference and `lora_weight` 0.7.

use crate::common::tolerance::{DECODE_REL_L2, F32_REL_L2, FRAMES_MAE, STEPS_REL_L2};
use crate::common::CheckOn;
use std::collections::BTreeMap;
use std::path::PathBuf;

use v2l_runtime::engine::Engine;
use v2l_runtime::pipeline::{Pipeline, PipelineKind, RequestLora, RequestParts};
use v2l_runtime::{read_safetensors, SessionOptions, Tensor};

use crate::common::{self, frames_of, mae};

pub fn fun() -> PathBuf {
    common::tiny().join("../cogvideox-fun-inp-tiny")
}

/// The variant's generation settings (`variant.json`): frames and `lora_weight`.
fn variant(dir: &std::path::Path) -> (usize, f32) {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("variant.json")).unwrap()).unwrap();
    (
        v["frames"].as_u64().unwrap() as usize,
        v["lora_weight"].as_f64().unwrap() as f32,
    )
}

/// The fixture's request as `predict_i2v.py` runs it: `frames` frames at the first frame's
/// size, 4 steps, CFG 6, upstream's initial and augmentation noise.
fn request(io: &BTreeMap<String, Tensor>, frames: usize) -> RequestParts {
    RequestParts {
        image: Some(frames_of(&io["first_frame_u8"])),
        image_embeds: None,
        prompt_embeds: io["prompt_embeds"].clone(),
        negative_prompt_embeds: io["negative_prompt_embeds"].clone(),
        frames,
        steps: 4,
        guidance: 6.0,
        noise: io["initial_noise"].clone(),
        lora: RequestLora::Base,
        sampler: None,
        inpaint_noise: Some(io["inpaint_noise"].clone()),
        seed: None,
        cache: None,
    }
}

fn check_steps(tag: &str, got: &[Tensor], io: &BTreeMap<String, Tensor>) {
    assert_eq!(got.len(), 4);
    for (i, l) in got.iter().enumerate() {
        let err = l.rel_l2(&io[&format!("{tag}_latents_step{i}")]);
        eprintln!("{tag} latents step {i}: relative L2 {err:.3e} (bound {STEPS_REL_L2:e})");
        assert!(err <= STEPS_REL_L2, "{tag} step {i}: {err:.3e}");
    }
}

#[test]
fn fun_inpaint_pipeline_matches_the_authors_code() {
    let d = tempfile::tempdir().unwrap();
    let (eng, io) = library_matches(&fun(), d.path());
    v2l_run_runs_the_fun_request(&eng, d.path(), &io);
}

/// Variant B: 13 frames (4 latent frames: the Fun VAE's last decode batch is one frame), an
/// 80×64 portrait video whose RoPE crop region is fractional, a 72×40 reference, weight 0.7.
#[test]
fn fun_inpaint_variant_b_matches_the_authors_code() {
    let d = tempfile::tempdir().unwrap();
    library_matches(&fun().join("../cogvideox-fun-inp-tiny-b"), d.path());
}

/// Exports and compiles the fixture `dir`, then checks every step, the frames and the
/// prediction against upstream, without and with the reference (resized and at its source
/// size). Returns the engine and the fixture's tensors.
fn library_matches(
    dir: &std::path::Path,
    tmp: &std::path::Path,
) -> (PathBuf, BTreeMap<String, Tensor>) {
    let (frames, lora_weight) = variant(dir);
    let eng = common::engine_of(dir, tmp, &[]);
    let engine = Engine::open(&eng).unwrap();
    assert_eq!(
        engine.pipeline_kind().unwrap(),
        PipelineKind::CogvideoxFunInpaint
    );
    let io = read_safetensors(&dir.join("e2e_io.safetensors")).unwrap();
    let mut p = Pipeline::load(engine, &SessionOptions::default()).unwrap();

    let mut req = request(&io, frames);
    let base = p.generate(&req.on(&p), &mut |_, _| true).unwrap();
    check_steps("base", &base.latents_steps, &io);
    let m = mae(&base.frames, &io["base_frames_fhwc"]);
    eprintln!("base frames: mean absolute error {m:.3e} (bound {FRAMES_MAE:e})");
    assert!(m <= FRAMES_MAE);

    req.lora = RequestLora::Reference(frames_of(&io["reference_u8"]), lora_weight);
    let lora = p.generate(&req.on(&p), &mut |_, _| true).unwrap();
    for (name, got) in [
        ("reference_latents", lora.reference_latents.as_ref()),
        ("hyper_weights", lora.hyper_weights.as_ref()),
    ] {
        let err = got.unwrap().rel_l2(&io[name]);
        eprintln!("{name}: relative L2 {err:.3e} (bound {F32_REL_L2:e})");
        assert!(err <= F32_REL_L2);
    }
    check_steps("lilora", &lora.latents_steps, &io);
    let m = mae(&lora.frames, &io["lilora_frames_fhwc"]);
    eprintln!("lilora frames: mean absolute error {m:.3e} (bound {FRAMES_MAE:e})");
    assert!(m <= FRAMES_MAE);

    // The reference at its source size (48×80): the pipeline resizes it as upstream does.
    req.lora = RequestLora::Reference(frames_of(&io["reference_u8_decoded"]), lora_weight);
    let src = p.generate(&req.on(&p), &mut |_, _| true).unwrap();
    let err = src
        .reference_latents
        .as_ref()
        .unwrap()
        .rel_l2(&io["reference_latents"]);
    eprintln!("reference_latents from the source-size clip: relative L2 {err:.3e} (bound {DECODE_REL_L2:e})");
    assert!(err <= DECODE_REL_L2);
    for (i, l) in src.latents_steps.iter().enumerate() {
        let err = l.rel_l2(&io[&format!("lilora_latents_step{i}")]);
        eprintln!(
            "lilora latents step {i} from the source-size clip: relative L2 {err:.3e} (bound {DECODE_REL_L2:e})"
        );
        assert!(err <= DECODE_REL_L2);
    }
    (eng, io)
}

/// `v2l-run` with upstream's noise (`initial_noise` + `inpaint_noise`), the prompt embeddings
/// and the reference clip: the same numbers as the library, an mp4 of F frames of H×W; with
/// `--seed` the augmentation noise is v2l's, and the same seed gives the same video.
fn v2l_run_runs_the_fun_request(
    eng: &std::path::Path,
    dir: &std::path::Path,
    io: &BTreeMap<String, Tensor>,
) {
    use std::process::Command;
    let pick = |names: &[&str], file: &str| {
        let m: BTreeMap<String, Tensor> = names
            .iter()
            .map(|n| (n.to_string(), io[*n].clone()))
            .collect();
        let p = dir.join(file);
        v2l_runtime::write_safetensors(&p, &m).unwrap();
        p
    };
    let noise = pick(&["initial_noise", "inpaint_noise"], "noise.safetensors");
    let prompts = pick(
        &["prompt_embeds", "negative_prompt_embeds"],
        "prompts.safetensors",
    );
    let mut source = BTreeMap::new();
    source.insert(
        "reference_u8".to_string(),
        io["reference_u8_decoded"].clone(),
    );
    let reference = dir.join("reference_source.safetensors");
    v2l_runtime::write_safetensors(&reference, &source).unwrap();
    let run = |extra: &[&str], out: &str| {
        let o = Command::new(env!("CARGO_BIN_EXE_v2l-run"))
            .arg("--engine")
            .arg(eng)
            .arg("--image")
            .arg(fun().join("first_frame.png"))
            .arg("--prompt-embeds")
            .arg(&prompts)
            .args([
                "--steps", "4", "--frames", "17", "--height", "64", "--width", "96",
            ])
            .args(["--quiet", "--json"])
            .arg("-o")
            .arg(dir.join(out))
            .arg("--dump")
            .arg(dir.join(out).with_extension("safetensors"))
            .args(extra)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let stdout = String::from_utf8_lossy(&o.stdout).to_string();
        let json: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
        let dump = read_safetensors(&dir.join(out).with_extension("safetensors")).unwrap();
        (dump, json)
    };
    let with_noise = |more: &[&str]| -> Vec<String> {
        ["--noise", noise.to_str().unwrap()]
            .iter()
            .chain(more)
            .map(|s| s.to_string())
            .collect()
    };
    let args = with_noise(&[
        "--reference",
        reference.to_str().unwrap(),
        "--lora-scale",
        "1",
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (dump, json) = run(&args, "fun.mp4");
    assert_eq!(json["pipeline"], "cogvideox-fun-inpaint");
    assert_eq!(json["scheduler"], "ddim");
    for i in 0..4 {
        let err = dump[&format!("latents_step{i}")].rel_l2(&io[&format!("lilora_latents_step{i}")]);
        eprintln!(
            "v2l-run lilora latents step {i}: relative L2 {err:.3e} (bound {STEPS_REL_L2:e})"
        );
        assert!(err <= STEPS_REL_L2);
    }
    let err = dump["reference_latents"].rel_l2(&io["reference_latents"]);
    eprintln!("v2l-run reference_latents from the 48×80 clip: relative L2 {err:.3e} (bound {DECODE_REL_L2:e})");
    assert!(err <= DECODE_REL_L2);
    let m = mae(&dump["frames"], &io["lilora_frames_fhwc"]);
    eprintln!("v2l-run lilora frames: mean absolute error {m:.3e} (bound {FRAMES_MAE:e})");
    assert!(m <= FRAMES_MAE);
    let mp4 = v2l_runtime::video::read_frames(&dir.join("fun.mp4"), 64, 96).unwrap();
    assert_eq!(mp4.frames, 17);
    assert_eq!(
        v2l_runtime::video::source_size(&dir.join("fun.mp4")),
        Some((64, 96))
    );

    // The mp4 reference, decoded by ffmpeg at 48×80 and resized like PIL, predicts close to
    // upstream's OpenCV-decoded clip (the two YUV → RGB conversions differ slightly).
    let mp4_ref = fun().join("reference.mp4");
    let args = with_noise(&["--reference", mp4_ref.to_str().unwrap()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (dump, _) = run(&args, "mp4ref.mp4");
    let err = dump["reference_latents"].rel_l2(&io["reference_latents"]);
    eprintln!("v2l-run reference_latents from reference.mp4: relative L2 {err:.3e}");
    assert!(err <= DECODE_REL_L2);

    // --seed: v2l's own initial and augmentation noise, reproducibly; `cogvideox-ddim` is
    // another sampler.
    let (a, _) = run(&["--seed", "7"], "a.mp4");
    let (b, _) = run(&["--seed", "7"], "b.mp4");
    assert!(a["frames"] == b["frames"], "same seed, different frames");
    let (c, json) = run(&["--seed", "7", "--scheduler", "cogvideox-ddim"], "c.mp4");
    assert_eq!(json["scheduler"], "cogvideox-ddim");
    assert!(c["latents_step0"] != a["latents_step0"]);
    // dpm draws its step noise from the seed: reproducible, and another sampler.
    let (e, json) = run(&["--seed", "7", "--scheduler", "dpm"], "e.mp4");
    let (f, _) = run(&["--seed", "7", "--scheduler", "dpm"], "f.mp4");
    assert_eq!(json["scheduler"], "dpm");
    assert!(
        e["frames"] == f["frames"],
        "dpm: same seed, different frames"
    );
    assert!(e["latents_step1"] != a["latents_step1"]);
}
