//! How far an engine below fp32 is from its fp32 graphs: `v2l-compile` measures it on inputs
//! generated from the model's own config and records it in `bundle.json` (`accuracy`).
//!
//! Only the stages the precision changes are run: an int8 engine quantises the DiT alone, so
//! the VAE and hypernetwork are fp32 by construction and recorded as such.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use v2l_contracts::manifest::DitEntry;

use crate::error::Result;
use crate::session::{Model, SessionOptions};
use crate::tensor::{gaussian_noise, Tensor};

/// One stage's distance from fp32.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StageAccuracy {
    pub stage: String,
    /// Relative L2 of this engine's output against the fp32 graph's on the same inputs.
    pub rel_l2: f64,
    /// What it ran on, in words (sizes, seed).
    pub inputs: String,
}

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

/// [`dit_sample_inputs`] with latents and prompt from `seed` and `seed + 1`, at `timestep`.
pub fn dit_inputs_at(
    cfg: &serde_json::Value,
    [frames, height, width]: [usize; 3],
    text: usize,
    seed: u64,
    timestep: i64,
) -> Result<Vec<(String, Tensor)>> {
    let get = |k: &str| cfg.get(k).and_then(|v| v.as_u64()).unwrap_or(0) as usize;
    let (p, dh, cin, dim) = (
        get("patch_size"),
        get("attention_head_dim"),
        get("in_channels"),
        get("text_embed_dim"),
    );
    let (lf, lh, lw) = ((frames.max(1) - 1) / 4 + 1, height / 8, width / 8);
    let (cos, sin) =
        crate::rope::cogvideox_rope(dh, lf, lh, lw, p, get("sample_height"), get("sample_width"))?;
    let s = lf * (lh / p.max(1)) * (lw / p.max(1));
    Ok(vec![
        (
            "hidden_states".into(),
            gaussian_noise(vec![2, lf, cin, lh, lw], seed),
        ),
        (
            "encoder_hidden_states".into(),
            gaussian_noise(vec![2, text, dim], seed + 1),
        ),
        (
            "timestep".into(),
            Tensor::i64(vec![2], vec![timestep, timestep]),
        ),
        ("rope_cos".into(), Tensor::f32(vec![s, dh], cos)),
        ("rope_sin".into(), Tensor::f32(vec![s, dh], sin)),
    ])
}

/// The size compile-time samples run at: 9 frames at the model's sample size capped at
/// 128×128 px, its full prompt length.
pub fn sample_size(cfg: &serde_json::Value) -> ([usize; 3], usize) {
    let get = |k: &str| cfg.get(k).and_then(|v| v.as_u64()).unwrap_or(0) as usize;
    (
        [
            9,
            (get("sample_height") * 8).clamp(16, 128),
            (get("sample_width") * 8).clamp(16, 128),
        ],
        get("max_text_seq_length").max(1),
    )
}

/// The DiT graph at `low` against the fp32 graph at `fp32` on generated inputs: 9 frames at the
/// model's sample size capped at 128×128 px, its full prompt length.
pub fn dit_accuracy(
    dit: &DitEntry,
    fp32: &Path,
    low: &Path,
    opts: &SessionOptions,
) -> Result<StageAccuracy> {
    let cfg = &dit.config;
    let ([_, h, w], text) = sample_size(cfg);
    let inputs: BTreeMap<String, Tensor> =
        dit_sample_inputs(cfg, 9, h, w, text)?.into_iter().collect();
    let run = |path: &Path| -> Result<Tensor> {
        let mut m = Model::load(path, opts)?;
        let mut out = m.run(&inputs)?;
        out.remove("sample")
            .ok_or_else(|| crate::RuntimeError::Invalid {
                what: path.display().to_string(),
                message: "the DiT graph has no `sample` output".into(),
            })
    };
    let (want, got) = (run(fp32)?, run(low)?);
    Ok(StageAccuracy {
        stage: "dit".into(),
        rel_l2: got.rel_l2(&want),
        inputs: format!("batch 2, 9 frames {h}x{w} px, {text} prompt tokens, seeded Gaussian latents and prompt, timestep 999"),
    })
}
