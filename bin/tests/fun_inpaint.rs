//! Video2LoRA's released pipeline end to end: a CogVideoX-Fun-InP model folder made by the
//! authors' own classes (fixture `cogvideox-fun-inp-tiny`, VideoX-Fun's
//! `CogVideoXFunInpaintPipeline` with `DDIM_Origin`), exported, compiled and run, without and
//! with the reference clip's LiLoRA.

use std::collections::BTreeMap;
use std::path::PathBuf;

use v2l_runtime::engine::Engine;
use v2l_runtime::pipeline::{InpaintNoise, Pipeline, PipelineKind, Request, RequestLora};
use v2l_runtime::{read_safetensors, SessionOptions, Tensor};

use crate::common::{self, frames_of};

pub fn fun() -> PathBuf {
    common::tiny().join("../cogvideox-fun-inp-tiny")
}

/// Mean absolute error.
fn mae(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (a.as_f32("a").unwrap(), b.as_f32("b").unwrap());
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).abs())
        .sum::<f64>()
        / a.len() as f64
}

/// The fixture's request as `predict_i2v.py` runs it: 17 frames at 64×96, 4 steps, CFG 6,
/// upstream's initial and augmentation noise.
fn request(io: &BTreeMap<String, Tensor>) -> Request {
    Request {
        image: Some(frames_of(&io["first_frame_u8"])),
        image_embeds: None,
        prompt_embeds: io["prompt_embeds"].clone(),
        negative_prompt_embeds: io["negative_prompt_embeds"].clone(),
        frames: 17,
        steps: 4,
        guidance: 6.0,
        noise: io["initial_noise"].clone(),
        lora: RequestLora::Base,
        sampler: None,
        inpaint_noise: Some(InpaintNoise::Given(io["inpaint_noise"].clone())),
    }
}

fn check_steps(tag: &str, got: &[Tensor], io: &BTreeMap<String, Tensor>) {
    assert_eq!(got.len(), 4);
    for (i, l) in got.iter().enumerate() {
        let err = l.rel_l2(&io[&format!("{tag}_latents_step{i}")]);
        eprintln!("{tag} latents step {i}: relative L2 {err:.3e} (bound 1e-3)");
        assert!(err <= 1e-3, "{tag} step {i}: {err:.3e}");
    }
}

#[test]
fn fun_inpaint_pipeline_matches_the_authors_code() {
    let d = tempfile::tempdir().unwrap();
    let eng = common::engine_of(&fun(), d.path(), &[]);
    let engine = Engine::open(&eng).unwrap();
    assert_eq!(
        engine.pipeline_kind().unwrap(),
        PipelineKind::CogvideoxFunInpaint
    );
    let io = read_safetensors(&fun().join("e2e_io.safetensors")).unwrap();
    let mut p = Pipeline::load(engine, &SessionOptions::default()).unwrap();

    let mut req = request(&io);
    let base = p.generate(&req, &mut |_, _| true).unwrap();
    check_steps("base", &base.latents_steps, &io);
    let m = mae(&base.frames, &io["base_frames_fhwc"]);
    eprintln!("base frames: mean absolute error {m:.3e} (bound 2e-3)");
    assert!(m <= 2e-3);

    let lora_weight = 1.0;
    req.lora = RequestLora::Reference(frames_of(&io["reference_u8"]), lora_weight);
    let lora = p.generate(&req, &mut |_, _| true).unwrap();
    for (name, got) in [
        ("reference_latents", lora.reference_latents.as_ref()),
        ("hyper_weights", lora.hyper_weights.as_ref()),
    ] {
        let err = got.unwrap().rel_l2(&io[name]);
        eprintln!("{name}: relative L2 {err:.3e} (bound 1e-4)");
        assert!(err <= 1e-4);
    }
    check_steps("lilora", &lora.latents_steps, &io);
    let m = mae(&lora.frames, &io["lilora_frames_fhwc"]);
    eprintln!("lilora frames: mean absolute error {m:.3e} (bound 2e-3)");
    assert!(m <= 2e-3);

    // The reference at its source size (48×80): the pipeline resizes it as upstream does.
    req.lora = RequestLora::Reference(frames_of(&io["reference_u8_decoded"]), lora_weight);
    let src = p.generate(&req, &mut |_, _| true).unwrap();
    let err = src
        .reference_latents
        .as_ref()
        .unwrap()
        .rel_l2(&io["reference_latents"]);
    eprintln!("reference_latents from the source-size clip: relative L2 {err:.3e} (bound 5e-3)");
    assert!(err <= 5e-3);
    for (i, l) in src.latents_steps.iter().enumerate() {
        let err = l.rel_l2(&io[&format!("lilora_latents_step{i}")]);
        eprintln!(
            "lilora latents step {i} from the source-size clip: relative L2 {err:.3e} (bound 5e-3)"
        );
        assert!(err <= 5e-3);
    }
}
