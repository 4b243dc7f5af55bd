//! Video generation: CogVideoX image-to-video with an optional Video2LoRA reference clip
//! (`pipeline/cogvideox.rs`; diffusers' I2V, or VideoX-Fun's inpaint pipeline that Video2LoRA's
//! release trains on, conditioned by `pipeline/fun_inpaint.rs`), and Wan2.1 text- and
//! image-to-video (`pipeline/wan.rs`). The engine's [`PipelineKind`] picks the steps; callers
//! build the same [`Request`] for all, and all run the one denoise loop (`pipeline/denoise.rs`).
//!
//! A request runs in named steps: check it against the model, apply its LoRA for this request
//! only, condition on the first frame (VAE encode), denoise, decode. Classifier-free guidance
//! runs the negative and positive prompt as one DiT batch of 2 when `guidance > 1` and the
//! positive prompt alone otherwise, as diffusers does.
//!
//! With a reference clip the hypernetwork predicts a LoRA (see [`crate::predict`]) that is fused
//! into the DiT's weights before the loop: the same LoRA serves both guidance branches, so
//! fusing is exact.

use std::time::Instant;
use v2l_contracts::io::files as files_io;
use v2l_contracts::io::vae as vae_io;

use crate::engine::Engine;
use crate::error::{Result, RuntimeError};
use crate::flow::FlowScheduler;
use crate::lora::format::Lora;
use crate::lora::strategy::{DitRunner, Strategy};
use crate::lora::AppliedLora;
use crate::predict::Predictor;
use crate::request::{Field, RequestError};
use crate::scheduler::SchedulerConfig;
use crate::session::SessionOptions;
use crate::stages::Timings;
use crate::tensor::Tensor;
use crate::vae::Vae;
use crate::video::Frames;
use v2l_contracts::Family;
pub use v2l_contracts::{PipelineKind, Sampler};

mod cogvideox;
mod denoise;
mod fun_inpaint;
mod inputs;
mod wan;

pub use inputs::{
    check_first_frame, check_sampler, Built, Inputs, LoraInput, MediaInput, NoiseInput,
    PromptEncoders, PromptInput,
};

/// One generation request.
#[derive(Clone)]
pub struct Request {
    /// First frame, RGB8 at the output size (image-to-video); `None` for text-to-video (Wan
    /// T2V), where the size comes from `noise`.
    pub image: Option<Frames>,
    /// Wan I2V: the first frame's CLIP image tokens `[1, tokens, image_dim]`.
    pub image_embeds: Option<Tensor>,
    /// `[1, L, D]` each.
    pub prompt_embeds: Tensor,
    pub negative_prompt_embeds: Tensor,
    /// Pixel frames to generate (1 + 4k for CogVideoX).
    pub frames: usize,
    pub steps: usize,
    pub guidance: f32,
    /// CogVideoX `[1, latent_frames, 16, h, w]`, Wan `[1, 16, latent_frames, h, w]`; see
    /// [`Engine::seeded_noise`] for seeded noise of the engine's layout.
    pub noise: Tensor,
    /// Which LoRA the DiT runs with for this request.
    pub lora: RequestLora,
    /// The CogVideoX sampler (`None`: the pipeline kind's default, [`Sampler::default_for`]).
    /// Wan engines take none.
    pub sampler: Option<Sampler>,
    /// CogVideoX-Fun-InP: the conditioning clip's augmentation noise `[1, 3, F, H, W]` as
    /// upstream adds it (scaled, zero where the pixel is -1), for parity with an upstream run
    /// (`--noise FILE`'s `inpaint_noise`); `None`: drawn from `seed`. Other kinds ignore it.
    pub inpaint_noise: Option<Tensor>,
    /// Seeds what the pipeline draws beyond the initial `noise`: Fun-InP's augmentation noise
    /// (unless given) and the `dpm` sampler's step noise. Front ends pass the request's seed.
    pub seed: Option<u64>,
    /// Step caching for this request (`None`: every DiT call runs every block). The first
    /// cached request cuts the pipeline's DiT into head, blocks and output sessions for good
    /// ([`crate::step_cache`]).
    pub cache: Option<crate::step_cache::StepCache>,
}

/// The LoRA a request runs with. Whatever it is, it holds for that request only: afterwards the
/// DiT is back to the pipeline's own LoRA ([`Pipeline::set_lora`], or the base weights).
#[derive(Clone, Debug, Default)]
pub enum RequestLora {
    /// The pipeline's own LoRA, set with [`Pipeline::set_lora`] (the base weights if none).
    #[default]
    Resident,
    /// The base weights, whatever the pipeline holds.
    Base,
    /// A reference clip's LoRA, predicted by the Video2LoRA hypernetwork, with upstream's
    /// LoRA weight (used as multiplier and alpha).
    Reference(Frames, f32),
    /// LoRAs (files or predicted), each with its multiplier; several are merged exactly by rank
    /// concatenation ([`crate::lora::merge`]).
    Loras(Vec<AppliedLora>),
}

/// What a run produced, with the intermediates `--dump` writes.
pub struct Generation {
    /// `[1, F, H, W, 3]` in [0, 1].
    pub frames: Tensor,
    pub latents_steps: Vec<Tensor>,
    pub reference_latents: Option<Tensor>,
    pub hyper_weights: Option<Tensor>,
    pub lora: Option<Lora>,
    /// Stage name → milliseconds (and each stage's peak RSS when
    /// [`Pipeline::set_stage_memory`] asked for it).
    pub timings: Timings,
    /// DiT calls made (one per denoising step).
    pub dit_calls: usize,
    /// With step caching ([`Request::cache`]): each DiT call's decision; empty without.
    pub cache_calls: Vec<crate::step_cache::CacheCall>,
}

impl Generation {
    /// DiT calls whose blocks after the first were skipped by the step cache.
    pub fn cache_skips(&self) -> usize {
        self.cache_calls.iter().filter(|c| !c.ran_blocks).count()
    }
}

/// A loaded pipeline: VAE, DiT (rebuilt with fused weights when a LoRA is applied), scheduler.
pub struct Pipeline {
    dir: Engine,
    /// What the engine deploys (checked at load).
    kind: PipelineKind,
    vae: Vae,
    dit: DitRunner,
    family: Box<dyn FamilySteps>,
    /// The Video2LoRA hypernetwork with its LiLoRA (about 1 GB at 5B width), loaded by the first
    /// request with a reference clip, or by [`Pipeline::load_predictor`]: a run without a
    /// reference never reads it.
    predictor: PredictorSlot,
    /// The session settings, for loading the predictor later.
    opts: SessionOptions,
    /// The LoRA set by [`Pipeline::set_lora`] (`None`: base weights); a request's own LoRA
    /// ([`RequestLora`]) replaces it for that request only.
    applied: Option<AppliedLora>,
    /// Whether requests measure each stage's peak RSS ([`crate::stages`]).
    stage_memory: bool,
}

impl Pipeline {
    /// Loads with the engine's default LoRA strategy (`fused` for a plain export directory).
    pub fn load(dir: Engine, opts: &SessionOptions) -> Result<Pipeline> {
        let strategy = dir
            .bundle
            .as_ref()
            .map(|b| b.lora_strategy)
            .unwrap_or_default();
        Self::load_with_strategy(dir, opts, strategy)
    }

    pub fn load_with_strategy(
        dir: Engine,
        opts: &SessionOptions,
        strategy: Strategy,
    ) -> Result<Pipeline> {
        let sched = dir.manifest.scheduler.clone().ok_or_else(|| RuntimeError::Engine {
            dir: dir.dir.clone(),
            message: "holds no scheduler config; export the whole pipeline with `v2l-export pipeline`".into(),
        })?;
        let kind = dir.pipeline_kind()?;
        let family: Box<dyn FamilySteps> = match (kind.family(), dir.wan_config()?) {
            (Family::Wan, Some(config)) => {
                let encoder = match config.image_dim {
                    Some(_) => wan::ImageEncoder::load(&dir, opts)?,
                    None => None,
                };
                Box::new(wan::Wan {
                    sampler: FlowScheduler::from_file(&dir.dir.join(sched))?,
                    config,
                    encoder,
                })
            }
            (Family::Wan, None) => {
                return Err(RuntimeError::Engine {
                    dir: dir.dir.clone(),
                    message: "a Wan engine without its DiT config".into(),
                })
            }
            (Family::CogVideoX, _) => Box::new(cogvideox::CogVideoX {
                scheduler: SchedulerConfig::from_file(&dir.dir.join(sched))?,
                kind,
                add_noise: dit_entry(&dir)?
                    .config
                    .get("add_noise_in_inpaint_model")
                    .and_then(|v| v.as_bool())
                    .unwrap_or(false),
            }),
        };
        let vae = Vae::load(&dir, opts)?;
        let dit = DitRunner::load(&dir, opts, strategy)?;
        Ok(Pipeline {
            dir,
            kind,
            vae,
            dit,
            family,
            predictor: PredictorSlot::NotLoaded,
            opts: opts.clone(),
            applied: None,
            stage_memory: false,
        })
    }

    /// Loads the Video2LoRA hypernetwork and its LiLoRA now rather than at the first request
    /// with a reference clip (a server does, so no request waits for it). Without a
    /// hypernetwork in the engine, nothing happens.
    pub fn load_predictor(&mut self) -> Result<()> {
        match self.dir.manifest.hypernet {
            Some(_) => self.predictor.get(&self.dir, &self.opts).map(|_| ()),
            None => Ok(()),
        }
    }

    pub fn engine(&self) -> &Engine {
        &self.dir
    }

    /// Applies `lora` to the DiT by the pipeline's strategy, or restores the base for `None`.
    /// This LoRA then stays until the next `set_lora`: it is the pipeline's own state, which
    /// every request with [`RequestLora::Resident`] runs with.
    pub fn set_lora(&mut self, lora: Option<&AppliedLora>) -> Result<()> {
        self.dit.set_lora(&self.dir, lora)?;
        self.applied = lora.cloned();
        Ok(())
    }

    /// Measure each stage's own peak RSS in [`Generation::timings`]. It resets the process's
    /// high-water mark between stages ([`crate::stages`]), so it is off unless asked for.
    pub fn set_stage_memory(&mut self, on: bool) {
        self.stage_memory = on;
    }

    /// Sample the VAE posterior (mean + σ·ε, ε from `seed`) instead of taking its mode, for the
    /// first frame and reference clips, as the stock pipeline and upstream Video2LoRA do.
    pub fn set_posterior_sampling(&mut self, seed: Option<u64>) {
        self.vae.posterior_seed = seed;
    }

    /// When the VAE tiles frames (default `auto`: real resolutions, not small test sizes).
    pub fn set_vae_tiling(&mut self, mode: crate::vae::TilingMode) {
        self.vae.tiling = mode;
    }

    pub fn strategy(&self) -> Strategy {
        self.dit.strategy
    }

    /// Predicts the reference clip's LoRA.
    pub fn predict(
        &mut self,
        clip: &Frames,
        lora_weight: f32,
    ) -> Result<crate::predict::Prediction> {
        let p = self.predictor.get(&self.dir, &self.opts)?;
        p.predict(&mut self.vae, clip, lora_weight)
    }

    /// Runs one request; `progress(step, steps)` is called after each denoising step and
    /// returns `false` to cancel the run ([`RuntimeError::Cancelled`]).
    ///
    /// The request's LoRA ([`RequestLora`]) is request-scoped: it is applied for this run only,
    /// and the DiT goes back to the pipeline's own LoRA ([`Pipeline::set_lora`], or the base)
    /// afterwards, whether the run succeeded, failed or was cancelled. Nothing lingers into the
    /// next request.
    pub fn generate(
        &mut self,
        req: &Request,
        progress: &mut dyn FnMut(usize, usize) -> bool,
    ) -> Result<Generation> {
        let Begun {
            t_all,
            shape,
            mut timings,
            prediction,
            switched,
        } = self.begin(req)?;
        let result = self.run_request(req, &shape, &mut timings, progress);
        if switched {
            // Restore before reporting anything: a failed restore must not go unnoticed.
            let t = Instant::now();
            self.dit.set_lora(&self.dir, self.applied.as_ref())?;
            timings.insert("lora_restore".into(), ms(t));
        }
        let (frames, d) = result?;
        timings.insert("total".into(), ms(t_all));
        Ok(generation(frames, d, prediction, timings))
    }

    /// Steps 0 and 1, with the request's clock and timings started.
    fn begin(&mut self, req: &Request) -> Result<Begun> {
        let t_all = Instant::now();
        let shape = self.check_request(req)?;
        let mut timings = Timings::with_memory(self.stage_memory);
        let size = (shape.height * VAE_SPATIAL, shape.width * VAE_SPATIAL);
        let (prediction, switched) = self.apply_request_lora(&req.lora, size, &mut timings)?;
        Ok(Begun {
            t_all,
            shape,
            timings,
            prediction,
            switched,
        })
    }

    /// Step 0: the request's sizes against the model, before any work.
    fn check_request(&self, req: &Request) -> Result<LatentShape> {
        let dit = dit_entry(&self.dir)?;
        let invalid =
            |field: Field, message: String| RuntimeError::from(RequestError::new(field, message));
        let wan = self.family.channels_first();
        // The builder's rules (`Inputs::build`), for requests built by hand too.
        inputs::check_sampler(self.kind, req.sampler)?;
        inputs::check_first_frame(self.kind, req.image.is_some())?;
        let (h, w) = match &req.image {
            Some(image) if image.frames != 1 => {
                return Err(invalid(
                    Field::Image,
                    format!("{} frames; the first frame is one frame", image.frames),
                ))
            }
            Some(image) => (image.height, image.width),
            None => match req.noise.shape[..] {
                [1, _, _, h, w] => (h * VAE_SPATIAL, w * VAE_SPATIAL),
                _ => {
                    return Err(invalid(
                        Field::Noise,
                        format!(
                            "shape {:?}; expected [1, C, latent_frames, h, w]",
                            req.noise.shape
                        ),
                    ))
                }
            },
        };
        let m = VAE_SPATIAL * dit.patch_size;
        if h % m != 0 || w % m != 0 || req.frames == 0 || (req.frames - 1) % VAE_TEMPORAL != 0 {
            return Err(invalid(
                Field::Size,
                format!(
                    "{w}x{h} with {} frames: height and width must be multiples of {m}, frames 1 + 4k",
                    req.frames
                ),
            ));
        }
        let shape = LatentShape {
            frames: (req.frames - 1) / VAE_TEMPORAL + 1,
            // The DiT predicts the noisy latents: its output channels are theirs.
            channels: dit.out_channels,
            height: h / VAE_SPATIAL,
            width: w / VAE_SPATIAL,
            channels_first: wan,
        };
        if req.noise.shape != shape.dims() {
            return Err(invalid(
                Field::Noise,
                format!("shape {:?}; expected {:?}", req.noise.shape, shape.dims()),
            ));
        }
        let prompts = [
            (Field::PromptEmbeds, &req.prompt_embeds),
            (Field::NegativePromptEmbeds, &req.negative_prompt_embeds),
        ];
        for (field, t) in prompts {
            if !matches!(t.shape[..], [1, _, d] if d == dit.text_embed_dim) {
                return Err(invalid(
                    field,
                    format!(
                        "shape {:?}; expected [1, L, {}]",
                        t.shape, dit.text_embed_dim
                    ),
                ));
            }
        }
        if let Some((d, encodes)) = self.family.image_tokens() {
            match &req.image_embeds {
                Some(e) if matches!(e.shape[..], [1, l, w] if l > 0 && w == d) => {}
                Some(e) => {
                    return Err(invalid(
                        Field::ImageEmbeds,
                        format!("shape {:?}; expected [1, tokens, {d}]", e.shape),
                    ))
                }
                // The engine's CLIP encoder computes them from the first frame.
                None if encodes => {}
                None => {
                    return Err(invalid(
                        Field::ImageEmbeds,
                        format!("missing: an I2V Wan engine needs the first frame's CLIP tokens [1, tokens, {d}]"),
                    ))
                }
            }
        }
        for (field, t) in prompts {
            // Attention over the text grows with its length: bounded like prompt text.
            let max = crate::request::MAX_SEQUENCE_LENGTH;
            if let Some(&l) = t.shape.get(1).filter(|&&l| l > max) {
                return Err(invalid(field, format!("{l} tokens; at most {max}")));
            }
            let name = field.name();
            crate::error::check_finite(|| name.to_string(), t.as_f32(name)?)?;
        }
        if let Some(e) = &req.image_embeds {
            crate::error::check_finite(
                || files_io::IMAGE_EMBEDS.into(),
                e.as_f32(files_io::IMAGE_EMBEDS)?,
            )?;
        }
        if req.prompt_embeds.shape != req.negative_prompt_embeds.shape {
            return Err(invalid(
                Field::NegativePromptEmbeds,
                "must have the shape of prompt_embeds".into(),
            ));
        }
        Ok(shape)
    }

    /// Step 1: the request's LoRA onto the DiT. Returns the prediction (for a reference clip)
    /// and whether the DiT was switched away from the pipeline's own LoRA (to restore after).
    fn apply_request_lora(
        &mut self,
        choice: &RequestLora,
        size: (usize, usize),
        timings: &mut Timings,
    ) -> Result<(Option<crate::predict::Prediction>, bool)> {
        match choice {
            RequestLora::Resident => return Ok((None, false)),
            RequestLora::Base if self.applied.is_none() => return Ok((None, false)),
            _ => {}
        }
        let (prediction, lora) = self.request_lora(choice, size, timings)?;
        let t = Instant::now();
        self.dit.set_lora(&self.dir, lora.as_ref())?;
        timings.insert("lora_fuse".into(), ms(t));
        Ok((prediction, true))
    }

    /// The LoRA a request runs with (`None`: the base weights), predicted first for a
    /// reference clip, merged first for several files. `size` is the generation's
    /// `(height, width)`: VideoX-Fun's pipeline resizes the reference clip to it (PIL bicubic).
    fn request_lora(
        &mut self,
        choice: &RequestLora,
        (height, width): (usize, usize),
        timings: &mut Timings,
    ) -> Result<(Option<crate::predict::Prediction>, Option<AppliedLora>)> {
        Ok(match choice {
            RequestLora::Resident => (None, self.applied.clone()),
            RequestLora::Base => (None, None),
            RequestLora::Reference(clip, weight) => {
                let predictor = self.predictor.get(&self.dir, &self.opts)?;
                let vae = &mut self.vae;
                let resized;
                let fun = self.kind == PipelineKind::CogvideoxFunInpaint;
                let clip = match fun && (clip.height, clip.width) != (height, width) {
                    true => {
                        resized = clip.resized_like_pil(height, width)?;
                        &resized
                    }
                    false => clip,
                };
                let p = predictor.predict_timed(vae, clip, *weight, timings)?;
                let applied = AppliedLora {
                    lora: p.lora.clone().into(),
                    source: "reference".into(),
                    multiplier: 1.0,
                };
                (Some(p), Some(applied))
            }
            RequestLora::Loras(list) => match list.as_slice() {
                [] => (None, None),
                [one] => (None, Some(one.clone())),
                several => {
                    let parts: Vec<_> = several.iter().map(|l| (&*l.lora, l.multiplier)).collect();
                    let source = several
                        .iter()
                        .map(|l| l.source.display().to_string())
                        .collect::<Vec<_>>()
                        .join(" + ");
                    let merged = AppliedLora {
                        lora: crate::lora::merge::merge(&parts)?.into(),
                        source: source.into(),
                        multiplier: 1.0,
                    };
                    (None, Some(merged))
                }
            },
        })
    }

    /// Runs `requests` together: every denoising step is one DiT call over all of them (each
    /// request's guidance batch in turn), each request with its own LoRA ([`RequestLora`],
    /// none included), noise, prompt and first frame. They must share their size, frame count
    /// and step count. Requests with different LoRAs need the `unfused` strategy, whose
    /// factors are DiT inputs per sample; each request's video is its solo run's
    /// (`tests/batched_loras.rs`). Afterwards the DiT holds the pipeline's own LoRA again.
    pub fn generate_batch(
        &mut self,
        requests: &[Request],
        progress: &mut dyn FnMut(usize, usize) -> bool,
    ) -> Result<Vec<Generation>> {
        let t_all = Instant::now();
        let invalid = |i: usize, message: String| RuntimeError::Invalid {
            what: format!("request {} of the batch", i + 1),
            message,
        };
        let mut shapes = Vec::with_capacity(requests.len());
        for (i, r) in requests.iter().enumerate() {
            let shape = self
                .check_request(r)
                .map_err(|e| invalid(i, e.to_string()))?;
            if r.cache.is_some() && requests.len() > 1 {
                return Err(invalid(
                    i,
                    "step caching decides per DiT call, so a cached request runs alone, not in a batch".into(),
                ));
            }
            if let Some((first, r0)) = shapes.first().zip(requests.first()) {
                let first: &LatentShape = first;
                if shape.dims() != first.dims() || r.steps != r0.steps {
                    return Err(invalid(
                        i,
                        format!(
                            "latents {:?} over {} steps; the batch's first request has {:?} over {}: only requests of one size and step count share DiT calls",
                            shape.dims(),
                            r.steps,
                            first.dims(),
                            r0.steps
                        ),
                    ));
                }
            }
            shapes.push(shape);
        }
        let mut timings: Vec<Timings> = requests
            .iter()
            .map(|_| Timings::with_memory(self.stage_memory))
            .collect();
        let mut predictions = Vec::with_capacity(requests.len());
        let mut loras = Vec::with_capacity(requests.len());
        for ((r, t), shape) in requests.iter().zip(&mut timings).zip(&shapes) {
            let size = (shape.height * VAE_SPATIAL, shape.width * VAE_SPATIAL);
            let (p, l) = self.request_lora(&r.lora, size, t)?;
            predictions.push(p);
            loras.push(l);
        }
        let t = Instant::now();
        let samples: Vec<Option<&AppliedLora>> = requests
            .iter()
            .zip(&loras)
            .flat_map(|(r, l)| {
                std::iter::repeat_n(l.as_ref(), denoise::Guidance(r.guidance).batch())
            })
            .collect();
        let same = loras.windows(2).all(|w| match w {
            [a, b] => same_lora(a.as_ref(), b.as_ref()),
            _ => true,
        });
        let set = match (same, loras.first()) {
            (true, Some(one)) => self.dit.set_lora(&self.dir, one.as_ref()),
            _ => self.dit.set_sample_loras(&self.dir, &samples),
        };
        let cut = match requests.iter().any(|r| r.cache.is_some()) {
            true => self.dit.cut_for_caching(&self.dir),
            false => Ok(()),
        };
        let result = set.and_then(|()| cut).and_then(|()| {
            let switch = ms(t);
            let mut lanes = Vec::with_capacity(requests.len());
            for ((r, shape), tm) in requests.iter().zip(&shapes).zip(&mut timings) {
                tm.insert("lora_fuse".into(), switch);
                let parts = Parts {
                    vae: &mut self.vae,
                    entry: dit_entry(&self.dir)?,
                };
                lanes.push(self.family.lane(parts, r, shape, tm)?);
            }
            denoise::run(&mut self.dit, lanes, progress)
        });
        // Back to the pipeline's own LoRA before reporting anything.
        let t = Instant::now();
        self.dit.set_lora(&self.dir, self.applied.as_ref())?;
        let restore = ms(t);
        let (done, dit_ms) = result?;
        let mut out = Vec::with_capacity(requests.len());
        for (((d, shape), mut tm), p) in done.into_iter().zip(&shapes).zip(timings).zip(predictions)
        {
            tm.insert("lora_restore".into(), restore);
            tm.steps(dit_ms.clone());
            let frames = self.decode(&d.latents, shape, &mut tm)?;
            tm.insert("total".into(), ms(t_all));
            out.push(generation(frames, d, p, tm));
        }
        Ok(out)
    }

    /// Steps 2 to 4 with the DiT as it is: encode the first frame, denoise, decode.
    fn run_request(
        &mut self,
        req: &Request,
        shape: &LatentShape,
        timings: &mut Timings,
        progress: &mut dyn FnMut(usize, usize) -> bool,
    ) -> Result<(Tensor, denoise::Denoised)> {
        let d = self.denoise_request(req, shape, timings, false, progress)?;
        let frames = self.decode(&d.latents, shape, timings)?;
        Ok((frames, d))
    }

    /// Steps 2 and 3: encode the first frame, denoise; `one_shot` releases the VAE encoder
    /// between the two.
    fn denoise_request(
        &mut self,
        req: &Request,
        shape: &LatentShape,
        timings: &mut Timings,
        one_shot: bool,
        progress: &mut dyn FnMut(usize, usize) -> bool,
    ) -> Result<denoise::Denoised> {
        let parts = Parts {
            vae: &mut self.vae,
            entry: dit_entry(&self.dir)?,
        };
        let lane = self.family.lane(parts, req, shape, timings)?;
        if req.cache.is_some() {
            let t = Instant::now();
            self.dit.cut_for_caching(&self.dir)?;
            timings.insert("dit_cut".into(), ms(t));
        }
        if one_shot {
            let t = Instant::now();
            self.vae.release_encoder();
            crate::session::release_freed_memory();
            // A stage of its own, so the first step's peak starts without the encoder.
            timings.insert("vae_encoder_release".into(), ms(t));
        }
        let mut on_step = |i: usize, n: usize| {
            timings.end_step();
            progress(i, n)
        };
        let (mut done, dit_ms) = denoise::run(&mut self.dit, vec![lane], &mut on_step)?;
        timings.steps(dit_ms);
        done.pop().ok_or_else(|| RuntimeError::Internal {
            what: "denoise".into(),
            message: "no result".into(),
        })
    }

    /// Step 4: latents → frames `[1, F, H, W, 3]` in [0, 1].
    fn decode(
        &mut self,
        latents: &[f32],
        shape: &LatentShape,
        timings: &mut Timings,
    ) -> Result<Tensor> {
        decode_with(&*self.family, &mut self.vae, latents, shape, timings)
    }

    /// Runs one request, releasing each part once the request is done with it: the
    /// hypernetwork after its prediction, the VAE encoder before the DiT runs, the DiT before
    /// the VAE decodes. For one-shot
    /// callers (`v2l-run`): at CogVideoX-5B size the int8 DiT (~6 GB with its activations
    /// gone) and the decoder's working memory (5.9 GB tiled at 256×384) are then never
    /// resident together. The pipeline is consumed; a request fails as
    /// [`Pipeline::generate`]'s would.
    pub fn generate_once(
        mut self,
        req: &Request,
        progress: &mut dyn FnMut(usize, usize) -> bool,
    ) -> Result<Generation> {
        let mut b = self.begin(req)?;
        let (shape, timings) = (b.shape, &mut b.timings);
        self.predictor = PredictorSlot::Released;
        crate::session::release_freed_memory();
        let d = self.denoise_request(req, &shape, timings, true, progress)?;
        // Moved out and dropped here, not at the end of the function as the rest of `self` is.
        let t = Instant::now();
        drop(self.dit);
        crate::session::release_freed_memory();
        // A stage of its own, so the decode's peak starts without the DiT.
        timings.insert("dit_release".into(), ms(t));
        let frames = decode_with(&*self.family, &mut self.vae, &d.latents, &shape, timings)?;
        timings.insert("total".into(), ms(b.t_all));
        Ok(generation(frames, d, b.prediction, b.timings))
    }
}

/// Where the pipeline's Video2LoRA predictor is.
enum PredictorSlot {
    NotLoaded,
    Loaded(Predictor),
    /// Dropped by [`Pipeline::generate_once`] after its prediction.
    Released,
}

impl PredictorSlot {
    /// The predictor, loaded from `dir` on first use; an error naming the engine when it has
    /// none.
    fn get(&mut self, dir: &Engine, opts: &SessionOptions) -> Result<&mut Predictor> {
        if dir.manifest.hypernet.is_none() {
            return Err(no_hypernet(dir));
        }
        if let PredictorSlot::NotLoaded = self {
            *self = PredictorSlot::Loaded(Predictor::load(dir, opts)?);
        }
        match self {
            PredictorSlot::Loaded(p) => Ok(p),
            _ => Err(RuntimeError::Internal {
                what: "pipeline".into(),
                message: "the hypernetwork was released by a one-shot run".into(),
            }),
        }
    }
}

/// A request after steps 0 and 1 ([`Pipeline::begin`]).
struct Begun {
    t_all: Instant,
    shape: LatentShape,
    timings: Timings,
    prediction: Option<crate::predict::Prediction>,
    /// Whether the DiT left the pipeline's own LoRA (to restore after).
    switched: bool,
}

/// Step 4 for `family`: latents → frames `[1, F, H, W, 3]` in [0, 1].
fn decode_with(
    family: &dyn FamilySteps,
    vae: &mut Vae,
    latents: &[f32],
    shape: &LatentShape,
    timings: &mut Timings,
) -> Result<Tensor> {
    let t = Instant::now();
    let video = family.decode(vae, latents, shape)?;
    timings.insert("vae_decode".into(), ms(t));
    to_frames(&video)
}

/// What a run produced, with the prediction's intermediates when there was one.
fn generation(
    frames: Tensor,
    denoised: denoise::Denoised,
    prediction: Option<crate::predict::Prediction>,
    timings: Timings,
) -> Generation {
    let (reference_latents, hyper_weights, lora) = match prediction {
        Some(p) => (
            Some(p.reference_latents),
            Some(p.hyper_weights),
            Some(p.lora),
        ),
        None => (None, None, None),
    };
    Generation {
        frames,
        latents_steps: denoised.steps,
        dit_calls: denoised.dit_calls,
        cache_calls: denoised.cache,
        reference_latents,
        hyper_weights,
        lora,
        timings,
    }
}

/// What differs between the families when a request runs, behind one trait: each
/// conditions on the first frame, runs the one denoise loop (`pipeline/denoise.rs`) with its
/// sampler, and decodes its latent layout. CogVideoX in `pipeline/cogvideox.rs`, Wan in
/// `pipeline/wan.rs`.
trait FamilySteps: Send {
    /// Whether latents are channels first (Wan) or frames first (CogVideoX).
    fn channels_first(&self) -> bool;
    /// Wan I2V: the width of the CLIP image tokens, and whether the engine encodes them itself.
    fn image_tokens(&self) -> Option<(usize, bool)> {
        None
    }
    /// Step 2 and the request's share of step 3: condition on the first frame, and everything
    /// its lane of the denoise loop needs (sampler, DiT inputs, initial latents).
    fn lane(
        &mut self,
        parts: Parts<'_>,
        req: &Request,
        shape: &LatentShape,
        timings: &mut Timings,
    ) -> Result<denoise::Lane>;
    /// Step 4: the final latents → the video `[1, 3, F, H, W]` in [-1, 1].
    fn decode(&self, vae: &mut Vae, latents: &[f32], shape: &LatentShape) -> Result<Tensor>;
}

/// Whether two requests' LoRAs are the same one at the same multiplier (or both none).
fn same_lora(a: Option<&AppliedLora>, b: Option<&AppliedLora>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => {
            std::sync::Arc::ptr_eq(&a.lora, &b.lora)
                && a.multiplier.to_bits() == b.multiplier.to_bits()
        }
        _ => false,
    }
}

/// The engine's DiT entry.
fn dit_entry(dir: &Engine) -> Result<&v2l_contracts::manifest::DitEntry> {
    dir.manifest
        .dit
        .as_ref()
        .ok_or_else(|| RuntimeError::Engine {
            dir: dir.dir.clone(),
            message: "holds no DiT".into(),
        })
}

/// The pipeline's models a family's conditioning runs.
struct Parts<'a> {
    vae: &'a mut Vae,
    entry: &'a v2l_contracts::manifest::DitEntry,
}

/// The VAE's `[1, 3, F, H, W]` in [-1, 1] → frames `[1, F, H, W, 3]` as
/// `(x / 2 + 0.5).clamp(0, 1)` (diffusers' `postprocess_video`).
fn to_frames(video: &Tensor) -> Result<Tensor> {
    let [_, 3, fo, ho, wo] = video.shape[..] else {
        return Err(RuntimeError::Invalid {
            what: "VAE decoder".into(),
            message: format!("output shape {:?}; expected [1, 3, F, H, W]", video.shape),
        });
    };
    let decoded = video.as_f32(vae_io::SAMPLE)?;
    crate::error::check_finite(|| "VAE decode (the frames)".into(), decoded)?;
    let frames = crate::layout::planes_to_interleaved(decoded, fo * ho * wo, |x| {
        (x / 2.0 + 0.5).clamp(0.0, 1.0)
    })?;
    Ok(Tensor::f32(vec![1, fo, ho, wo, 3], frames))
}

/// VAE strides of CogVideoX: 8 pixels per latent, 4 frames per latent frame (after the first).
const VAE_SPATIAL: usize = 8;
const VAE_TEMPORAL: usize = 4;

/// Latent video sizes of a request: CogVideoX `[1, frames, channels, height, width]`, Wan
/// channels first.
struct LatentShape {
    frames: usize,
    channels: usize,
    height: usize,
    width: usize,
    channels_first: bool,
}

impl LatentShape {
    fn dims(&self) -> [usize; 5] {
        match self.channels_first {
            true => [1, self.channels, self.frames, self.height, self.width],
            false => [1, self.frames, self.channels, self.height, self.width],
        }
    }
}

fn no_hypernet(dir: &Engine) -> RuntimeError {
    RuntimeError::Engine {
        dir: dir.dir.clone(),
        message:
            "holds no hypernetwork; export with `v2l-export pipeline ... --hypernet F --lilora F`"
                .into(),
    }
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

fn config_usize(cfg: &serde_json::Value, key: &str) -> Option<usize> {
    cfg.get(key).and_then(|v| v.as_u64()).map(|v| v as usize)
}

pub use crate::tensor::gaussian_noise;
