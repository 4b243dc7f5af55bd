//! CogVideoX image-to-video, as diffusers 0.42.1 `CogVideoXImageToVideoPipeline` runs it: the
//! first frame's latent padded with zero latent frames and concatenated to the noisy latents
//! on the channel axis, `[B, F, C, H, W]` layout, DDIM with int64 timesteps, RoPE tables from
//! [`crate::rope::cogvideox_rope`], latents decoded as `z / scaling_factor`.
//!
//! VideoX-Fun's inpaint pipeline (CogVideoX-Fun-InP, what Video2LoRA's release trains on) is
//! the same loop with its own conditioning (`pipeline/fun_inpaint.rs`), numpy RoPE grids
//! ([`crate::rope::cogvideox_fun_rope`]) and plain DDIM by default; its VAE decode loop is in
//! the exported decoder and the manifest's decoder schedule.

use std::collections::BTreeMap;
use std::time::Instant;
use v2l_contracts::request::{Field, RequestError};

use v2l_contracts::io::dit as io;
use v2l_contracts::manifest::DitEntry;

use crate::error::{Result, RuntimeError};
use crate::rope::{cogvideox_fun_rope, cogvideox_rope};
use crate::scheduler::{DdimScheduler, Sampler, SchedulerConfig};
use crate::tensor::Tensor;
use crate::vae::Vae;
use crate::video::Frames;
use v2l_contracts::PipelineKind;

use super::denoise::{Guidance, Lane, Sampling};
use super::family::{FamilySteps, Parts};
use crate::request::{LatentShape, Request};
use crate::stages::ms_since as ms;
use v2l_contracts::manifest::config_usize;

/// CogVideoX's steps: DDIM over frames-first latents, conditioned on the first frame's latent
/// (diffusers' I2V) or on VideoX-Fun's inpaint latents.
pub(super) struct CogVideoX {
    pub(super) scheduler: SchedulerConfig,
    /// `CogvideoxI2v` or `CogvideoxFunInpaint`.
    pub(super) kind: PipelineKind,
    /// The Fun transformer's `add_noise_in_inpaint_model`.
    pub(super) add_noise: bool,
}

impl FamilySteps for CogVideoX {
    fn lane(
        &mut self,
        parts: Parts<'_>,
        req: &Request,
        shape: &LatentShape,
        timings: &mut crate::stages::Timings,
    ) -> Result<Lane> {
        let t = Instant::now();
        let image = req.image.as_ref().ok_or_else(|| {
            RequestError::new(
                Field::Image,
                "CogVideoX image-to-video needs the first frame",
            )
        })?;
        let (cond, cond_channels) = match self.kind {
            PipelineKind::CogvideoxFunInpaint => (
                super::fun_inpaint::inpaint_latents(
                    parts.vae,
                    image,
                    req.frames,
                    self.add_noise,
                    req.inpaint_noise.as_ref(),
                    req.seed,
                    shape,
                )?,
                shape.channels + 1,
            ),
            _ => (encode_image(parts.vae, image, shape)?, shape.channels),
        };
        timings.insert("vae_encode".into(), ms(t));
        let sampler = req
            .sampler
            .or(Sampler::default_for(self.kind))
            .unwrap_or(Sampler::CogvideoxDdim);
        let rope = match self.kind {
            PipelineKind::CogvideoxFunInpaint => cogvideox_fun_rope,
            _ => cogvideox_rope,
        };
        let cond = Conditioning {
            latents: cond,
            channels: cond_channels,
        };
        lane(
            parts.entry,
            &self.scheduler,
            sampler,
            rope,
            req,
            shape,
            cond,
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

/// Step 2: the first frame in [-1, 1] → VAE latent × scaling factor as latent frame 0 of
/// `[lf, C, h, w]`, zeros after (diffusers' I2V padding).
fn encode_image(vae: &mut Vae, image: &Frames, shape: &LatentShape) -> Result<Vec<f32>> {
    let unit = image.to_unit_video()?;
    let signed: Vec<f32> = unit
        .as_f32("image")?
        .iter()
        .map(|v| v * 2.0 - 1.0)
        .collect();
    let mean = vae.latent(&Tensor::f32(unit.shape.clone(), signed))?;
    let sf = vae.entry.scaling_factor as f32;
    let frame = shape.height * shape.width;
    let first = mean
        .as_f32("posterior_mean")?
        .get(..shape.channels * frame)
        .ok_or_else(|| RuntimeError::Graph {
            graph: "VAE encoder".into(),
            message: format!(
                "the first frame's latent has {:?} values; expected {} channels of {frame}",
                mean.shape, shape.channels
            ),
        })?;
    let mut image_latents = vec![0f32; shape.frames * shape.channels * frame];
    for (o, v) in image_latents.iter_mut().zip(first) {
        *o = v * sf;
    }
    Ok(image_latents)
}

/// Step 3: the request's lane of the DDIM loop ([`denoise::run`]): its scheduler, RoPE tables,
/// text and initial latents.
/// The latents concatenated after the noisy ones on the channel axis, frames first.
struct Conditioning {
    latents: Vec<f32>,
    channels: usize,
}

/// A RoPE table builder ([`cogvideox_rope`] or [`cogvideox_fun_rope`]).
type RopeFn = fn(
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
) -> v2l_sampling::Result<(Vec<f32>, Vec<f32>)>;

fn lane(
    entry: &DitEntry,
    cfg: &SchedulerConfig,
    sampler: Sampler,
    rope: RopeFn,
    req: &Request,
    shape: &LatentShape,
    cond: Conditioning,
) -> Result<Lane> {
    let (lf, lh, lw) = (shape.frames, shape.height, shape.width);
    let head = entry.attention_head_dim;
    let mut sched = DdimScheduler::with_sampler(cfg, sampler)?;
    sched.set_timesteps(req.steps)?;
    let (rope_cos, rope_sin) = rope(
        head,
        lf,
        lh,
        lw,
        entry.patch_size,
        config_usize(&entry.config, "sample_height").unwrap_or(lh),
        config_usize(&entry.config, "sample_width").unwrap_or(lw),
    )?;
    let rows = rope_cos.len() / head.max(1);
    let guidance = Guidance(req.guidance);
    let mut inputs = BTreeMap::new();
    inputs.insert(
        io::ROPE_COS.to_string(),
        Tensor::f32(vec![rows, head], rope_cos),
    );
    inputs.insert(
        io::ROPE_SIN.to_string(),
        Tensor::f32(vec![rows, head], rope_sin),
    );
    inputs.insert(io::ENCODER_HIDDEN_STATES.to_string(), guidance.text(req)?);
    let sigma = sched.init_noise_sigma();
    let latents: Vec<f32> = req
        .noise
        .as_f32("noise")?
        .iter()
        .map(|v| v * sigma)
        .collect();
    if sampler == Sampler::Dpm && req.seed.is_none() {
        return Err(RequestError::new(
            Field::Scheduler,
            "`dpm` draws fresh noise every step: give the request a seed",
        )
        .into());
    }
    let ddim = Ddim {
        timesteps: sched.timesteps().to_vec(),
        sched,
        old_x0: None,
        seed: req.seed.unwrap_or(0),
        image_latents: cond.latents,
        cond_channels: cond.channels,
        dims: [shape.frames, shape.channels, shape.height, shape.width],
    };
    Ok(Lane {
        sampling: Box::new(ddim),
        inputs,
        guidance,
        latents,
        shape: req.noise.shape.clone(),
        cache: req.cache,
    })
}

/// CogVideoX's part of a denoise step: `[latents | image latents]` per frame, int64 timesteps.
struct Ddim {
    sched: DdimScheduler,
    timesteps: Vec<i64>,
    image_latents: Vec<f32>,
    /// Channels of `image_latents` per frame.
    cond_channels: usize,
    /// `dpm`: the previous step's x̂₀.
    old_x0: Option<Vec<f32>>,
    /// `dpm`: the request's seed, for its step noise.
    seed: u64,
    /// Latent frames, channels, height, width.
    dims: [usize; 4],
}

impl Ddim {
    fn timestep(&self, i: usize) -> Result<i64> {
        self.timesteps
            .get(i)
            .copied()
            .ok_or_else(|| RuntimeError::Internal {
                what: "scheduler".into(),
                message: format!("no timestep {i}"),
            })
    }
}

impl Sampling for Ddim {
    fn steps(&self) -> usize {
        self.timesteps.len()
    }

    fn dit_inputs(&self, latents: &[f32], i: usize, batch: usize) -> Result<(Tensor, Tensor)> {
        let t = self.timestep(i)?;
        let [frames, channels, height, width] = self.dims;
        let cc = self.cond_channels;
        let hs = crate::layout::guidance_batch(
            latents,
            &self.image_latents,
            frames,
            [channels, cc],
            height * width,
            batch,
        )?;
        Ok((
            Tensor::f32(vec![batch, frames, channels + cc, height, width], hs),
            Tensor::i64(vec![batch], vec![t; batch]),
        ))
    }

    fn step(&mut self, prediction: &[f32], i: usize, latents: &[f32]) -> Result<Vec<f32>> {
        let t = self.timestep(i)?;
        if self.sched.sampler() != Sampler::Dpm {
            return Ok(self.sched.step(prediction, t, latents)?);
        }
        // As diffusers' CogVideoX pipelines call it: the previous timestep as `timestep_back`.
        let back = match i {
            0 => None,
            _ => Some(self.timestep(i - 1)?),
        };
        let n = latents.len();
        let seed = self.seed;
        let mut noise = |k: usize| v2l_contracts::noise::gaussian(n, dpm_noise_seed(seed, i, k));
        let s = self.sched.step_dpm(
            prediction,
            t,
            back,
            latents,
            self.old_x0.as_deref(),
            &mut noise,
        )?;
        self.old_x0 = Some(s.pred_original);
        Ok(s.prev_sample)
    }
}

/// The seed of draw `k` of step `i` of the `dpm` sampler's noise for a request seeded `seed`:
/// a stream of its own, apart from the initial and the augmentation noise.
fn dpm_noise_seed(seed: u64, i: usize, k: usize) -> u64 {
    const DPM_STREAM: u64 = 0x4450_4D2B_2B32_4D21; // "DPM++2M!"
    (seed ^ DPM_STREAM).wrapping_add(((2 * i + k) as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// Step 4: latents `[1, lf, C, h, w]` → `[1, C, lf, h, w]` / scaling factor → VAE.
fn decode(
    vae: &mut Vae,
    latents: &[f32],
    shape: &LatentShape,
    go_on: &mut dyn FnMut(usize, usize) -> bool,
) -> Result<Tensor> {
    let (lf, c) = (shape.frames, shape.channels);
    let frame = shape.height * shape.width;
    let sf = vae.entry.scaling_factor as f32;
    let z = crate::layout::swap_leading(latents, lf, c, frame, |v| v / sf)?;
    vae.decode_reporting(
        &Tensor::f32(vec![1, c, lf, shape.height, shape.width], z),
        go_on,
    )
}
