//! Wan2.1 text-to-video and image-to-video, as diffusers 0.42.1 `WanPipeline` and
//! `WanImageToVideoPipeline` run them (Wan2.1: one transformer, no `expand_timesteps`):
//!
//! * latents are channels-first `[1, z, lf, h, w]`, drawn once (flow samplers start at σ = 1);
//! * I2V conditions every step on `[mask | (E(first frame, zeros…) − mean) / std]`: a 4-channel
//!   mask with the first latent frame set, and the VAE posterior mode of the first frame followed
//!   by `frames − 1` black frames, normalised per channel; the CLIP image tokens go to the DiT's
//!   `encoder_hidden_states_image`;
//! * guidance runs the positive and the negative prompt when `guidance > 1`
//!   (`noise_uncond + g·(noise_cond − noise_uncond)`), else the positive one alone; here both
//!   go as one batch of 2 (per-sample ops: the same numbers as diffusers' two calls);
//! * the DiT's timestep is the sampler's, as a float; RoPE tables come from
//!   [`crate::rope::wan_rope`];
//! * latents decode as `z / (1 / std) + mean`, frames as `(x / 2 + 0.5).clamp(0, 1)`.
//!
//! One upstream quirk to know: diffusers' I2V attention separates the image tokens from the
//! text tokens by assuming 512 text tokens (`encoder_hidden_states.shape[1] - 512`); the
//! exported DiT takes them as separate inputs. The two agree for the 512-token prompts the
//! pipelines encode (`max_sequence_length` 512), which the fixtures use.

use std::collections::BTreeMap;
use std::time::Instant;
use v2l_contracts::io::image as image_io;
use v2l_contracts::request::{Field, RequestError};

use v2l_contracts::family::WanDitConfig;

use crate::engine::Engine;
use crate::error::{Result, RuntimeError};
use crate::flow::FlowScheduler;
use crate::tensor::Tensor;
use crate::vae::Vae;
use crate::video::Frames;

use v2l_contracts::io::dit as io;

use super::denoise::{Guidance, Lane, Sampling};
use super::family::{FamilySteps, Parts};
use crate::request::{LatentShape, Request};
use crate::stages::ms_since as ms;

/// Wan's steps: a flow sampler over channels-first latents; I2V conditions on a mask and the
/// first frame's latent, and on its CLIP tokens (given, or from the engine's image encoder).
pub(super) struct Wan {
    pub(super) sampler: FlowScheduler,
    pub(super) config: WanDitConfig,
    pub(super) encoder: Option<ImageEncoder>,
}

impl FamilySteps for Wan {
    fn lane(
        &mut self,
        parts: Parts<'_>,
        req: &Request,
        shape: &LatentShape,
        timings: &mut crate::stages::Timings,
    ) -> Result<Lane> {
        let t = Instant::now();
        let (condition, embeds) = match &req.image {
            Some(image) => {
                let c = condition(parts.vae, image, req.frames, shape)?;
                timings.insert("vae_encode".into(), ms(t));
                let embeds = match (&req.image_embeds, &mut self.encoder) {
                    (Some(e), _) => Some(e.clone()),
                    (None, Some(enc)) => {
                        let t = Instant::now();
                        let e = enc.encode(image)?;
                        timings.insert("image_encode".into(), ms(t));
                        Some(e)
                    }
                    (None, None) => None,
                };
                (Some(c), embeds)
            }
            None => (None, None),
        };
        lane(
            &self.config,
            self.sampler.clone(),
            req,
            shape,
            condition,
            embeds.as_ref(),
        )
    }

    fn decode(
        &self,
        vae: &mut Vae,
        latents: &[f32],
        shape: &LatentShape,
        go_on: &mut dyn FnMut(usize, usize) -> bool,
    ) -> Result<Tensor> {
        decode(vae, latents, shape, go_on)
    }
}

/// Wan I2V's first-frame encoder: `CLIPImageProcessor` then the CLIP vision graph
/// (`WanImageToVideoPipeline.encode_image`: the penultimate layer's hidden states).
pub(super) struct ImageEncoder {
    preprocess: crate::image_preprocess::ClipPreprocess,
    model: crate::session::Model,
}

impl ImageEncoder {
    /// The engine's image encoder, when it has one.
    pub(super) fn load(
        engine: &Engine,
        opts: &crate::session::SessionOptions,
    ) -> Result<Option<ImageEncoder>> {
        let Some(e) = engine.manifest.image_encoder.as_ref() else {
            return Ok(None);
        };
        let preprocess = match e.preprocessor.as_str() {
            "" => crate::image_preprocess::ClipPreprocess::for_image_size(e.image_size),
            p => crate::image_preprocess::ClipPreprocess::from_file(&engine.dir.join(p))?,
        };
        let model = crate::session::Model::load(&engine.dir.join(&e.file), opts)?;
        Ok(Some(ImageEncoder { preprocess, model }))
    }

    /// The first frame's CLIP tokens `[1, tokens, hidden]`. diffusers preprocesses the image as
    /// the user gave it; here it is the first frame at the output size (the same image when
    /// the first frame already has that size).
    pub(super) fn encode(&mut self, image: &Frames) -> Result<Tensor> {
        let pixels = self
            .preprocess
            .apply(&image.rgb, image.height, image.width)?;
        let feed = BTreeMap::from([(image_io::PIXEL_VALUES.to_string(), pixels)]);
        self.model
            .run(&feed)?
            .remove(image_io::IMAGE_EMBEDS)
            .ok_or_else(|| RuntimeError::missing_output("image encoder", image_io::IMAGE_EMBEDS))
    }
}

/// Wan's per-channel latent statistics, as the pipelines hold them in f32: `mean` and
/// `1 / std` (diffusers' `latents_std` variable is the reciprocal).
struct LatentStats {
    mean: Vec<f32>,
    inv_std: Vec<f32>,
}

impl LatentStats {
    fn of(vae: &Vae, channels: usize) -> Result<LatentStats> {
        let e = &vae.entry;
        if e.latents_mean.len() != channels || e.latents_std.len() != channels {
            return Err(RuntimeError::Graph {
                graph: "VAE".into(),
                message: format!(
                    "`latents_mean`/`latents_std` have {}/{} entries; the Wan pipeline needs {channels} (export the VAE again)",
                    e.latents_mean.len(),
                    e.latents_std.len()
                ),
            });
        }
        Ok(LatentStats {
            mean: e.latents_mean.iter().map(|&m| m as f32).collect(),
            inv_std: e.latents_std.iter().map(|&s| 1.0 / s as f32).collect(),
        })
    }

    /// Applies `f(x, mean, inv_std)` to every value of channels-first `x` (`plane` values per
    /// channel).
    fn map(&self, x: &[f32], plane: usize, f: impl Fn(f32, f32, f32) -> f32) -> Vec<f32> {
        let mut out = Vec::with_capacity(x.len());
        for (ch, (&m, &s)) in x
            .chunks(plane.max(1))
            .zip(self.mean.iter().zip(&self.inv_std))
        {
            out.extend(ch.iter().map(|&v| f(v, m, s)));
        }
        out
    }
}

/// I2V step 2: the DiT's conditioning channels `[1, 4 + z, lf, h, w]`.
fn condition(vae: &mut Vae, image: &Frames, frames: usize, shape: &LatentShape) -> Result<Tensor> {
    let unit = image.to_unit_video()?;
    let (h, w) = (image.height, image.width);
    // [1, 3, 1, H, W] in [-1, 1], then `frames - 1` zero frames after it, per channel.
    let first = unit.as_f32("image")?;
    let mut video = Vec::with_capacity(3 * frames * h * w);
    for plane in first.chunks(h * w) {
        video.extend(plane.iter().map(|v| v * 2.0 - 1.0));
        video.resize(video.len() + (frames - 1) * h * w, 0.0);
    }
    let (mean, _) = vae.encode(&Tensor::f32(vec![1, 3, frames, h, w], video))?;
    let want = shape.dims();
    if mean.shape != want {
        return Err(RuntimeError::Graph {
            graph: "VAE encoder".into(),
            message: format!(
                "the conditioning video's latent has shape {:?}; expected {want:?}",
                mean.shape
            ),
        });
    }
    let plane = shape.frames * shape.height * shape.width;
    let stats = LatentStats::of(vae, shape.channels)?;
    let latent = stats.map(mean.as_f32("posterior_mean")?, plane, |v, m, s| (v - m) * s);
    // The mask: 4 channels (the VAE's frames per latent frame), 1 on latent frame 0.
    let frame = shape.height * shape.width;
    let mut cond = Vec::with_capacity((4 + shape.channels) * plane);
    for _ in 0..4 {
        cond.extend(std::iter::repeat_n(1.0f32, frame));
        cond.extend(std::iter::repeat_n(0.0f32, plane - frame));
    }
    cond.extend(latent);
    Ok(Tensor::f32(
        vec![
            1,
            4 + shape.channels,
            shape.frames,
            shape.height,
            shape.width,
        ],
        cond,
    ))
}

/// Step 3: the request's lane of the flow loop ([`super::denoise::run`]): its sampler (a copy
/// of the pipeline's, so requests in one batch step independently), RoPE tables, text, image
/// tokens and condition.
fn lane(
    w: &WanDitConfig,
    mut sched: FlowScheduler,
    req: &Request,
    shape: &LatentShape,
    condition: Option<Tensor>,
    image_embeds: Option<&Tensor>,
) -> Result<Lane> {
    let (lf, lh, lw) = (shape.frames, shape.height, shape.width);
    sched.set_timesteps(req.steps)?;
    let head = w.attention_head_dim;
    let (cos, sin) = crate::rope::wan_rope(head, lf, lh, lw, w.patch(), w.rope_max_seq_len)?;
    let rows = cos.len() / head.max(1);
    let guidance = Guidance(req.guidance);
    let mut inputs = BTreeMap::new();
    inputs.insert(io::ROPE_COS.to_string(), Tensor::f32(vec![rows, head], cos));
    inputs.insert(io::ROPE_SIN.to_string(), Tensor::f32(vec![rows, head], sin));
    inputs.insert(io::ENCODER_HIDDEN_STATES.to_string(), guidance.text(req)?);
    if w.image_dim.is_some() {
        let embeds = image_embeds.ok_or_else(|| {
            RequestError::new(
                Field::ImageEmbeds,
                "an I2V Wan DiT needs the first frame's CLIP image tokens",
            )
        })?;
        inputs.insert(
            io::ENCODER_HIDDEN_STATES_IMAGE.to_string(),
            guidance.repeat(embeds)?,
        );
    }
    let cond = match condition {
        Some(c) => c.as_f32("condition")?.to_vec(),
        None => Vec::new(),
    };
    let latents = req.noise.as_f32("noise")?.to_vec();
    let n = latents.len();
    let in_channels = shape.channels + cond.len() / (n / shape.channels.max(1)).max(1);
    let flow = Flow {
        timesteps: sched.timesteps(),
        sched,
        cond,
        dims: [in_channels, lf, lh, lw],
    };
    Ok(Lane {
        sampling: Box::new(flow),
        inputs,
        guidance,
        latents,
        shape: req.noise.shape.clone(),
        cache: req.cache,
    })
}

/// Wan's part of a denoise step: `[latents | condition]` channels first, float timesteps.
struct Flow {
    sched: FlowScheduler,
    timesteps: Vec<f32>,
    /// I2V: mask and first-frame latents, appended to the latents on the channel axis.
    cond: Vec<f32>,
    /// `[in_channels, lf, h, w]` of one sample of `hidden_states`.
    dims: [usize; 4],
}

impl Sampling for Flow {
    fn steps(&self) -> usize {
        self.timesteps.len()
    }

    fn dit_inputs(&self, latents: &[f32], i: usize, batch: usize) -> Result<(Tensor, Tensor)> {
        let t = *self
            .timesteps
            .get(i)
            .ok_or_else(|| RuntimeError::Internal {
                what: "scheduler".into(),
                message: format!("no timestep {i}"),
            })?;
        // Channels-first with batch 1: the channel concat [latents | condition] is an append.
        let one: Vec<f32> = latents.iter().chain(&self.cond).copied().collect();
        let [c, f, h, w] = self.dims;
        Ok((
            Tensor::f32(vec![batch, c, f, h, w], one.repeat(batch)),
            Tensor::f32(vec![batch], vec![t; batch]),
        ))
    }

    fn step(&mut self, prediction: &[f32], _i: usize, latents: &[f32]) -> Result<Vec<f32>> {
        Ok(self.sched.step(prediction, latents)?)
    }

    /// `WanPipeline` runs `cache_context("cond")` then `cache_context("uncond")`.
    fn calls_per_branch(&self) -> bool {
        true
    }
}

/// Step 4: latents `[z, lf, h, w]` → `z / (1 / std) + mean` → VAE → `[1, 3, F, H, W]`.
fn decode(
    vae: &mut Vae,
    latents: &[f32],
    shape: &LatentShape,
    go_on: &mut dyn FnMut(usize, usize) -> bool,
) -> Result<Tensor> {
    let stats = LatentStats::of(vae, shape.channels)?;
    let plane = shape.frames * shape.height * shape.width;
    let z = stats.map(latents, plane, |v, m, s| v / s + m);
    vae.decode_reporting(&Tensor::f32(shape.dims().to_vec(), z), go_on)
}
