//! How far an engine below fp32 is from its fp32 graphs: `v2l-compile` measures it on inputs
//! generated from the model's own config and records it in `bundle.json` (`accuracy`).
//!
//! Only the stages the precision changes are run: an int8 engine quantises the DiT alone, and
//! on the CPU runs its VAE's convolutions in bf16 ([`vae_accuracy`]); the hypernetwork is fp32
//! by construction.

use std::collections::BTreeMap;
use std::path::Path;
use v2l_contracts::io::dit as dit_io;

use v2l_contracts::manifest::DitEntry;

use crate::error::{CompileError, Result};
use v2l_runtime::session::{Model, SessionOptions};
use v2l_runtime::tensor::{gaussian_noise, Tensor};

pub use v2l_runtime::bundle::StageAccuracy;

/// DiT inputs at a pixel size, as a guided step runs them: batch 2, `text` prompt tokens,
/// Gaussian latents and prompt (seeded), timestep 999, the RoPE tables of that size.
pub fn dit_sample_inputs(
    cfg: &serde_json::Value,
    frames: usize,
    height: usize,
    width: usize,
    text: usize,
) -> Result<Vec<(String, Tensor)>> {
    dit_inputs_at(cfg, [frames, height, width], text, 1, 999)
}

/// Whether a DiT config (`config.json`, verbatim) is Wan's.
fn is_wan(cfg: &serde_json::Value) -> bool {
    v2l_contracts::Family::of_dit_config(cfg) == Some(v2l_contracts::Family::Wan)
}

/// CLIP image tokens the Wan I2V samples carry (ViT-H/14 at 224 px: 16² patches + CLS).
const WAN_IMAGE_TOKENS: usize = 257;

/// [`dit_sample_inputs`] with latents and prompt from `seed` and `seed + 1`, at `timestep`.
/// The inputs are the ones the config's architecture takes (CogVideoX or Wan).
pub fn dit_inputs_at(
    cfg: &serde_json::Value,
    [frames, height, width]: [usize; 3],
    text: usize,
    seed: u64,
    timestep: i64,
) -> Result<Vec<(String, Tensor)>> {
    let get = |k: &str| cfg.get(k).and_then(|v| v.as_u64()).unwrap_or(0) as usize;
    if is_wan(cfg) {
        return wan_inputs_at(cfg, [frames, height, width], text, seed, timestep);
    }
    let (p, dh, cin, dim) = (
        get("patch_size"),
        get("attention_head_dim"),
        get("in_channels"),
        get("text_embed_dim"),
    );
    let (lf, lh, lw) = v2l_contracts::LatentGrid::of_video(frames, height, width).dims();
    let (cos, sin) = v2l_runtime::rope::cogvideox_rope(
        dh,
        lf,
        lh,
        lw,
        p,
        get("sample_height"),
        get("sample_width"),
    )
    .map_err(v2l_runtime::RuntimeError::from)?;
    let s = lf * (lh / p.max(1)) * (lw / p.max(1));
    Ok(vec![
        (
            dit_io::HIDDEN_STATES.into(),
            gaussian_noise(vec![2, lf, cin, lh, lw], seed),
        ),
        (
            dit_io::ENCODER_HIDDEN_STATES.into(),
            gaussian_noise(vec![2, text, dim], seed + 1),
        ),
        (
            dit_io::TIMESTEP.into(),
            Tensor::i64(vec![2], vec![timestep, timestep]),
        ),
        (dit_io::ROPE_COS.into(), Tensor::f32(vec![s, dh], cos)),
        (dit_io::ROPE_SIN.into(), Tensor::f32(vec![s, dh], sin)),
    ])
}

/// Wan's DiT inputs: channels-first latents, float timesteps, Wan's RoPE tables, and for I2V
/// seeded CLIP image tokens.
fn wan_inputs_at(
    cfg: &serde_json::Value,
    [frames, height, width]: [usize; 3],
    text: usize,
    seed: u64,
    timestep: i64,
) -> Result<Vec<(String, Tensor)>> {
    let get = |k: &str, default: usize| {
        cfg.get(k)
            .and_then(|v| v.as_u64())
            .map_or(default, |v| v as usize)
    };
    let w = v2l_contracts::family::WanDitConfig::from_config(cfg).map_err(|e| {
        CompileError::Invalid {
            what: "DiT config".into(),
            message: e.to_string(),
        }
    })?;
    let dh = w.attention_head_dim;
    let (lf, lh, lw) = v2l_contracts::LatentGrid::of_video(frames, height, width).dims();
    let (cos, sin) = v2l_runtime::rope::wan_rope(dh, lf, lh, lw, w.patch(), w.rope_max_seq_len)
        .map_err(v2l_runtime::RuntimeError::from)?;
    let rows = cos.len() / dh.max(1);
    let t = timestep as f32;
    let mut inputs = vec![
        (
            dit_io::HIDDEN_STATES.into(),
            gaussian_noise(vec![2, get("in_channels", 16), lf, lh, lw], seed),
        ),
        (
            dit_io::ENCODER_HIDDEN_STATES.into(),
            gaussian_noise(vec![2, text, get("text_dim", 4096)], seed + 1),
        ),
        (dit_io::TIMESTEP.into(), Tensor::f32(vec![2], vec![t, t])),
        (dit_io::ROPE_COS.into(), Tensor::f32(vec![rows, dh], cos)),
        (dit_io::ROPE_SIN.into(), Tensor::f32(vec![rows, dh], sin)),
    ];
    if let Some(d) = w.image_dim {
        inputs.push((
            dit_io::ENCODER_HIDDEN_STATES_IMAGE.into(),
            gaussian_noise(vec![2, WAN_IMAGE_TOKENS, d], seed + 2),
        ));
    }
    Ok(inputs)
}

/// The size compile-time samples run at: 9 frames at the model's sample size capped at
/// 128×128 px (Wan, which records none: 128×128), its full prompt length (Wan: 512). A DiT with
/// a learned positional table (`use_learned_positional_embeddings`: CogVideoX-5B-I2V 1.0, the
/// embedded demo model) takes only the size the table was made for, so it runs at that one.
pub fn sample_size(cfg: &serde_json::Value) -> ([usize; 3], usize) {
    let get = |k: &str| cfg.get(k).and_then(|v| v.as_u64()).unwrap_or(0) as usize;
    if is_wan(cfg) {
        return ([9, 128, 128], 512);
    }
    let text = get("max_text_seq_length").max(1);
    let learned = cfg
        .get("use_learned_positional_embeddings")
        .and_then(|v| v.as_bool())
        == Some(true);
    if learned {
        let frames = get("sample_frames").max(1);
        return (
            [
                frames,
                get("sample_height").saturating_mul(8),
                get("sample_width").saturating_mul(8),
            ],
            text,
        );
    }
    (
        [
            9,
            (get("sample_height") * 8).clamp(16, 128),
            (get("sample_width") * 8).clamp(16, 128),
        ],
        text,
    )
}

/// The DiT graph at `low` against the fp32 graph at `fp32` on generated inputs at
/// [`sample_size`].
pub fn dit_accuracy(
    dit: &DitEntry,
    fp32: &Path,
    low: &Path,
    opts: &SessionOptions,
) -> Result<StageAccuracy> {
    let cfg = &dit.config;
    let ([frames, h, w], text) = sample_size(cfg);
    let inputs: BTreeMap<String, Tensor> = dit_sample_inputs(cfg, frames, h, w, text)?
        .into_iter()
        .collect();
    let run = |path: &Path| -> Result<Tensor> {
        let mut m = Model::load(path, opts)?;
        let mut out = m.run(&inputs)?;
        out.remove(dit_io::SAMPLE)
            .ok_or_else(|| CompileError::Invalid {
                what: path.display().to_string(),
                message: "the DiT graph has no `sample` output".into(),
            })
    };
    let (want, got) = (run(fp32)?, run(low)?);
    Ok(StageAccuracy {
        stage: "dit".into(),
        rel_l2: got.rel_l2(&want),
        psnr_db: None,
        inputs: format!("batch 2, {frames} frames {h}x{w} px, {text} prompt tokens, seeded Gaussian latents and prompt, timestep 999"),
        machine: Some(v2l_runtime::cpu::this().clone()),
    })
}

/// The VAE's graphs on v2l's bf16 convolution (`bf16`) against the export's f32 graphs, as
/// this CPU runs them: a seeded clip of `1 + 2·t` frames at 64×64 px encoded (posterior mean),
/// and the f32 graphs' latents decoded.
pub fn vae_accuracy(
    dir: &Path,
    vae: &v2l_contracts::manifest::VaeEntry,
    bf16: &v2l_contracts::bundle::VaeGraphs,
) -> Result<Vec<StageAccuracy>> {
    let exported = v2l_contracts::bundle::VaeGraphs {
        encoder: vae.encoder.clone(),
        decoder: vae.decoder.clone(),
    };
    let kernel = v2l_runtime::conv::Kernel::detect();
    // What this CPU will run (`Engine::vae_graphs`): the bf16 twins only where their bf16
    // kernel runs; elsewhere the export's f32 graphs, exact by construction.
    let runs = match kernel {
        v2l_runtime::conv::Kernel::Bf16 => bf16,
        _ => &exported,
    };
    let note = format!("ai.v2l.Conv kernel {} ({})", kernel.name(), kernel.reason());
    vae_against(dir, vae, &exported, runs, &note)
}

/// A GPU engine's VAE graphs in its precision, through their CPU forms (`emulated`: each node
/// reads its low-precision inputs widened and rounds its output, as a GPU kernel with f32
/// accumulation does), against the export's f32 graphs.
pub fn lowered_vae_accuracy(
    dir: &Path,
    vae: &v2l_contracts::manifest::VaeEntry,
    emulated: &v2l_contracts::bundle::VaeGraphs,
    precision: v2l_contracts::bundle::Precision,
) -> Result<Vec<StageAccuracy>> {
    let exported = v2l_contracts::bundle::VaeGraphs {
        encoder: vae.encoder.clone(),
        decoder: vae.decoder.clone(),
    };
    let note = format!("the {} graphs' CPU form", precision.name());
    vae_against(dir, vae, &exported, emulated, &note)
}

/// `runs` against `exported` on a seeded clip: its encode, and its decode of the exported
/// encoder's latents.
fn vae_against(
    dir: &Path,
    vae: &v2l_contracts::manifest::VaeEntry,
    exported: &v2l_contracts::bundle::VaeGraphs,
    runs: &v2l_contracts::bundle::VaeGraphs,
    note: &str,
) -> Result<Vec<StageAccuracy>> {
    use v2l_runtime::vae::Vae;
    let opts = SessionOptions::default();
    let mut want = Vae::load_graphs(dir, vae.clone(), exported, &opts)?;
    let mut got = Vae::load_graphs(dir, vae.clone(), runs, &opts)?;
    let frames = 1 + 2 * vae.temporal_compression;
    let clip = gaussian_noise(vec![1, vae.in_channels, frames, 64, 64], 11);
    let (latents, _) = want.encode(&clip)?;
    let (got_latents, _) = got.encode(&clip)?;
    let (decoded, got_decoded) = (want.decode(&latents)?, got.decode(&latents)?);
    let record = |stage: &str, got: &Tensor, want: &Tensor, what: &str| StageAccuracy {
        stage: stage.into(),
        rel_l2: got.rel_l2(want),
        psnr_db: None,
        inputs: format!("{what}; {note}"),
        machine: Some(v2l_runtime::cpu::this().clone()),
    };
    Ok(vec![
        record(
            "vae_encode",
            &got_latents,
            &latents,
            &format!("seeded Gaussian clip, {frames} frames 64x64 px, posterior mean"),
        ),
        record(
            "vae_decode",
            &got_decoded,
            &decoded,
            &format!("the fp32 encoder's latents {:?}", latents.shape),
        ),
    ])
}

/// PSNR in dB of frames in [0, 1] against reference frames (peak 1); infinite when equal.
pub fn psnr(frames: &[f32], reference: &[f32]) -> f64 {
    let n = frames.len().min(reference.len()).max(1);
    let mse = frames
        .iter()
        .zip(reference)
        .map(|(a, b)| (f64::from(*a) - f64::from(*b)).powi(2))
        .sum::<f64>()
        / n as f64;
    if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (1.0 / mse).log10()
    }
}

/// Steps of the short generation [`generation_accuracy`] runs.
const STEPS: usize = 4;

/// A short generation (the compile-time sample size, [`STEPS`] steps at guidance 6, a seeded
/// gradient as first frame, seeded prompt embeddings) run by the pipeline in `dir` with the fp32
/// DiT (`fp32`, an engine without a bundle: the export's graphs) and with the engine below fp32
/// (`low`): the frames' PSNR and relative L2. Both on the CPU, each with its own VAE graphs
/// (the engine's bf16 convolutions where it has them), the same scheduler.
pub fn generation_accuracy(
    fp32: v2l_runtime::engine::Engine,
    low: v2l_runtime::engine::Engine,
) -> Result<StageAccuracy> {
    use v2l_runtime::lora::strategy::Strategy;
    use v2l_runtime::pipeline::{Pipeline, RequestLora, RequestParts};
    let cfg = fp32
        .manifest
        .dit
        .as_ref()
        .map(|d| d.config.clone())
        .unwrap_or_default();
    let get = |k: &str| cfg.get(k).and_then(|v| v.as_u64()).unwrap_or(0) as usize;
    let ([frames, h, w], text) = sample_size(&cfg);
    let wan = is_wan(&cfg);
    let t2v = fp32.text_to_video();
    let noise = fp32.seeded_noise(frames, h, w, 8)?;
    let text_dim = get(if wan { "text_dim" } else { "text_embed_dim" });
    let image_embeds = cfg
        .get("image_dim")
        .and_then(|v| v.as_u64())
        .filter(|_| wan)
        .map(|d| gaussian_noise(vec![1, WAN_IMAGE_TOKENS, d as usize], 9));
    let rgb: Vec<u8> = (0..h * w)
        .flat_map(|i| {
            let (y, x) = (i / w.max(1), i % w.max(1));
            [(255 * x / w.max(1)) as u8, (255 * y / h.max(1)) as u8, 128]
        })
        .collect();
    let prompt = gaussian_noise(vec![1, text, text_dim], 7);
    let parts = RequestParts {
        image_embeds,
        image: (!t2v).then_some(v2l_runtime::video::Frames {
            frames: 1,
            height: h,
            width: w,
            rgb,
        }),
        negative_prompt_embeds: Tensor::zeros(prompt.shape.clone()),
        prompt_embeds: prompt,
        frames,
        steps: STEPS,
        guidance: 6.0,
        noise,
        lora: RequestLora::Base,
        sampler: None,
        inpaint_noise: None,
        // Fun-InP's augmentation noise, seeded like the rest of this sample.
        seed: Some(8),
        cache: None,
    };
    let opts = SessionOptions {
        keep_weight_casts: true,
        ..Default::default()
    };
    let run = |e: v2l_runtime::engine::Engine| -> Result<Tensor> {
        let req = parts.clone().check(&e)?;
        let mut p = Pipeline::load_with_strategy(e, &opts, Strategy::Fused)?;
        Ok(p.generate(&req, &mut |_, _| true)?.frames)
    };
    let (want, got) = (run(fp32)?, run(low)?);
    let (a, b) = (got.as_f32("frames")?, want.as_f32("frames")?);
    Ok(StageAccuracy {
        stage: "frames".into(),
        rel_l2: got.rel_l2(&want),
        // Identical frames are recorded as 999 dB (JSON has no infinity).
        psnr_db: Some(psnr(a, b).min(999.0)),
        inputs: format!("{frames} frames {h}x{w} px, {STEPS} steps at guidance 6, seeded {}prompt and noise; the engine's VAE", if t2v { "" } else { "first frame, " }),
        machine: Some(v2l_runtime::cpu::this().clone()),
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn psnr_of_a_known_error() {
        // MSE 0.01 -> 20 dB.
        let a = [0.5f32; 4];
        let b = [0.6f32, 0.4, 0.6, 0.4];
        assert!((super::psnr(&a, &b) - 20.0).abs() < 1e-4);
        assert_eq!(super::psnr(&a, &a), f64::INFINITY);
    }
}
