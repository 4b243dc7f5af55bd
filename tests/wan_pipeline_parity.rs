//! Wan2.1 end to end: the runtime's `WanPipeline` (T2V) and `WanImageToVideoPipeline` (I2V)
//! loops on exported tiny components give diffusers' latents after every step and its frames
//! (fixture `wan-tiny/e2e_io`, made by `tests/fixtures/gen/wan_pipeline.py`: 9 frames at 32×48,
//! 3 UniPC steps, guidance 5).

use std::path::Path;

use v2l_export::{dit, vae, Checkpoint, Manifest};
use v2l_graphs::{save, DType, ExternalData};
use v2l_runtime::engine::Engine;
use v2l_runtime::pipeline::{Pipeline, RequestLora, RequestParts};
use v2l_runtime::{read_safetensors, SessionOptions, Tensor};
use v2l_tests::*;

/// The Wan issue's bounds: components in f32, and frames end to end.
const LATENTS_REL_L2: f64 = 1e-5;
const FRAMES_MAE: f64 = 2e-3;

fn wan() -> std::path::PathBuf {
    fixtures().join("wan-tiny")
}

/// An export directory with the Wan DiT in `transformer`, the Wan VAE and the UniPC sampler,
/// and with `clip` the CLIP image encoder and its image processor.
fn export_engine(dir: &Path, transformer: &str, clip: bool) -> Engine {
    let ck = Checkpoint::open_dir(&wan().join(transformer)).unwrap();
    let d = dit::export(&ck, DType::F32).unwrap();
    save(&d.graph, &dir.join("dit.onnx"), ExternalData::Auto).unwrap();
    let ck = Checkpoint::open_dir(&wan().join("vae")).unwrap();
    let v = vae::export(&ck).unwrap();
    save(&v.encoder, &dir.join("e.onnx"), ExternalData::Auto).unwrap();
    save(&v.decoder, &dir.join("d.onnx"), ExternalData::Auto).unwrap();
    std::fs::copy(
        wan().join("scheduler_unipc/scheduler_config.json"),
        dir.join("scheduler_config.json"),
    )
    .unwrap();
    let image_encoder = clip.then(|| {
        let ck = Checkpoint::open_dir(&wan().join("image_encoder")).unwrap();
        let ex = v2l_export::clip_vision::export(&ck, None).unwrap();
        save(&ex.graph, &dir.join("clip.onnx"), ExternalData::Auto).unwrap();
        std::fs::copy(
            wan().join("image_processor/preprocessor_config.json"),
            dir.join("preprocessor_config.json"),
        )
        .unwrap();
        v2l_export::manifest::ImageEncoderEntry {
            file: "clip.onnx".into(),
            model_type: ex.config.model_type.clone(),
            hidden_size: ex.config.hidden_size,
            image_size: ex.config.image_size,
            weight_dtype: v2l_graphs::DType::F32,
            preprocessor: "preprocessor_config.json".into(),
            config: ck.raw_config().unwrap().clone(),
        }
    });
    Manifest {
        format_version: v2l_export::manifest::FORMAT_VERSION,
        dit: Some(d.manifest_entry("dit.onnx")),
        vae: Some(v.manifest_entry("e.onnx", "d.onnx")),
        image_encoder,
        scheduler: Some("scheduler_config.json".into()),
        ..Default::default()
    }
    .write(dir)
    .unwrap();
    Engine::open(dir).unwrap()
}

/// The PNG diffusers read, at its own size (ffmpeg decodes it; nothing is resampled).
fn first_frame() -> v2l_runtime::video::Frames {
    v2l_runtime::video::read_frames(&wan().join("first_frame.png"), 32, 48).unwrap()
}

fn mae(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (a.as_f32("a").unwrap(), b.as_f32("b").unwrap());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() as f64)
        .sum::<f64>()
        / a.len() as f64
}

/// Runs the fixture's request; with `clip`, the I2V image tokens come from the engine's CLIP
/// encoder (the first frame through `CLIPImageProcessor`) instead of the request.
fn check(variant: &str, transformer: &str, clip: bool) {
    let d = tempfile::tempdir().unwrap();
    let engine = export_engine(d.path(), transformer, clip);
    let io = read_safetensors(&wan().join("e2e_io.safetensors")).unwrap();
    let get = |n: &str| io[&format!("{variant}_{n}")].clone();
    // Seeded noise has the layout the loop takes.
    assert_eq!(
        engine.seeded_noise(9, 32, 48, 0).unwrap().shape,
        get("noise").shape
    );
    let mut p = Pipeline::load(engine, &SessionOptions::default()).unwrap();
    let i2v = variant == "i2v";
    let req = RequestParts {
        image: i2v.then(first_frame),
        image_embeds: (i2v && !clip).then(|| get("image_embeds")),
        prompt_embeds: get("prompt_embeds"),
        negative_prompt_embeds: get("negative_prompt_embeds"),
        frames: 9,
        steps: 3,
        guidance: 5.0,
        noise: get("noise"),
        lora: RequestLora::Base,
        sampler: None,
        inpaint_noise: None,
        seed: None,
        cache: None,
    }
    .check(p.engine())
    .unwrap();
    let g = p.generate(&req, &mut |_, _| true).unwrap();
    for (i, lat) in g.latents_steps.iter().enumerate() {
        assert_close(
            &format!("{variant} latents after step {i}"),
            lat,
            &get(&format!("latents_step{i}")),
            LATENTS_REL_L2,
        );
    }
    let want = get("frames");
    assert_eq!(g.frames.shape, want.shape);
    let err = mae(&g.frames, &want);
    eprintln!("{variant} frames: MAE {err:.3e} (bound {FRAMES_MAE:.0e})");
    assert!(err <= FRAMES_MAE, "{variant} frames: MAE {err:.3e}");
}

#[test]
fn wan_t2v_matches_diffusers_end_to_end() {
    check("t2v", "transformer", false);
}

#[test]
fn wan_i2v_matches_diffusers_end_to_end() {
    check("i2v", "transformer_i2v", false);
}

/// The whole I2V path: first frame → CLIPImageProcessor (bit-exact) → CLIP encoder → DiT.
#[test]
fn wan_i2v_with_its_clip_encoder_matches_diffusers_end_to_end() {
    check("i2v", "transformer_i2v", true);
}

/// The request must fit the engine: no first frame for T2V, 1 + 4k frames, the CLIP tokens for
/// an I2V engine without an image encoder.
#[test]
fn wan_requests_that_do_not_fit_the_engine_are_refused_by_name() {
    let d = tempfile::tempdir().unwrap();
    let engine = export_engine(d.path(), "transformer", false);
    let io = read_safetensors(&wan().join("e2e_io.safetensors")).unwrap();
    let p = Pipeline::load(engine, &SessionOptions::default()).unwrap();
    let mut req = RequestParts {
        image: Some(first_frame()),
        image_embeds: None,
        prompt_embeds: io["t2v_prompt_embeds"].clone(),
        negative_prompt_embeds: io["t2v_negative_prompt_embeds"].clone(),
        frames: 9,
        steps: 1,
        guidance: 5.0,
        noise: io["t2v_noise"].clone(),
        lora: RequestLora::Base,
        sampler: None,
        inpaint_noise: None,
        seed: None,
        cache: None,
    };
    // Refused when the request is checked, before anything runs.
    let refused =
        |req: &RequestParts, p: &Pipeline| req.clone().check(p.engine()).err().unwrap().to_string();
    let err = refused(&req, &p);
    assert!(
        err.contains("image") && err.contains("text-to-video"),
        "{err}"
    );
    req.image = None;
    req.frames = 8;
    let err = refused(&req, &p);
    assert!(err.contains("1 + 4k"), "{err}");

    let d = tempfile::tempdir().unwrap();
    let engine = export_engine(d.path(), "transformer_i2v", false);
    let p = Pipeline::load(engine, &SessionOptions::default()).unwrap();
    req.frames = 9;
    req.image = Some(first_frame());
    req.noise = io["i2v_noise"].clone();
    let err = refused(&req, &p);
    assert!(err.contains("image_embeds"), "{err}");
}
