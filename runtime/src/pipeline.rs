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
use v2l_contracts::io::vae as vae_io;

use crate::engine::Engine;
use crate::error::{Result, RuntimeError};
use crate::flow::FlowScheduler;
use crate::lora::format::Lora;
use crate::lora::strategy::{DitRunner, Strategy};
use crate::lora::AppliedLora;
use crate::predict::Predictor;
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
mod family;
mod fun_inpaint;
mod progress;
mod wan;

pub use progress::Progress;

use crate::request::LatentShape;
/// The request contract's types, where the pipeline takes them ([`crate::request`]).
pub use crate::request::{
    Built, Inputs, LoraInput, MediaInput, NoiseInput, PromptEncoders, PromptInput, Request,
    RequestLora, RequestParts,
};
use crate::stages::ms_since as ms;
use family::{FamilySteps, Parts};

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
    engine: Engine,
    /// What requests are checked against ([`RequestParts::check`]).
    facts: crate::request::RequestFacts,
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
    pub fn load(engine: Engine, opts: &SessionOptions) -> Result<Pipeline> {
        let strategy = engine
            .bundle
            .as_ref()
            .map(|b| b.lora_strategy)
            .unwrap_or_default();
        Self::load_with_strategy(engine, opts, strategy)
    }

    pub fn load_with_strategy(
        engine: Engine,
        opts: &SessionOptions,
        strategy: Strategy,
    ) -> Result<Pipeline> {
        let sched = engine.manifest.scheduler.clone().ok_or_else(|| RuntimeError::Engine {
            dir: engine.dir.clone(),
            message: "holds no scheduler config; export the whole pipeline with `v2l-export pipeline`".into(),
        })?;
        let kind = engine.pipeline_kind()?;
        let family: Box<dyn FamilySteps> = match (kind.family(), engine.wan_config()?) {
            (Family::Wan, Some(config)) => {
                let encoder = match config.image_dim {
                    Some(_) => wan::ImageEncoder::load(&engine, opts)?,
                    None => None,
                };
                Box::new(wan::Wan {
                    sampler: FlowScheduler::from_file(&engine.dir.join(sched))?,
                    config,
                    encoder,
                })
            }
            (Family::Wan, None) => {
                return Err(RuntimeError::Engine {
                    dir: engine.dir.clone(),
                    message: "a Wan engine without its DiT config".into(),
                })
            }
            (Family::CogVideoX, _) => Box::new(cogvideox::CogVideoX {
                scheduler: SchedulerConfig::from_file(&engine.dir.join(sched))?,
                kind,
                add_noise: engine
                    .dit_entry()?
                    .config
                    .get("add_noise_in_inpaint_model")
                    .and_then(|v| v.as_bool())
                    .unwrap_or(false),
            }),
        };
        let vae = Vae::load(&engine, opts)?;
        let dit = DitRunner::load(&engine, opts, strategy)?;
        Ok(Pipeline {
            facts: crate::request::RequestFacts::of(&engine)?,
            engine,
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
        match self.engine.manifest.hypernet {
            Some(_) => self.predictor.get(&self.engine, &self.opts).map(|_| ()),
            None => Ok(()),
        }
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Applies `lora` to the DiT by the pipeline's strategy, or restores the base for `None`.
    /// This LoRA then stays until the next `set_lora`: it is the pipeline's own state, which
    /// every request with [`RequestLora::Resident`] runs with.
    pub fn set_lora(&mut self, lora: Option<&AppliedLora>) -> Result<()> {
        self.dit.set_lora(&self.engine, lora)?;
        self.applied = lora.cloned();
        Ok(())
    }

    /// `unfused`: keep up to `bytes` of laid-out factor inputs for LoRAs switched away from,
    /// so a switch back moves no factor ([`DitRunner::set_factor_cache`]).
    pub fn set_factor_cache(&mut self, bytes: u64) {
        self.dit.set_factor_cache(bytes);
    }

    /// How the kept factor inputs have served.
    pub fn factor_cache_stats(&self) -> crate::lora::factors::FactorCacheStats {
        self.dit.factor_cache_stats()
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
        let p = self.predictor.get(&self.engine, &self.opts)?;
        p.predict(&mut self.vae, clip, lora_weight)
    }

    /// Runs one request; `progress` hears of each denoising step and each frame batch of the
    /// decode, and may cancel the run there ([`Progress`], [`RuntimeError::Cancelled`]).
    ///
    /// The request's LoRA ([`RequestLora`]) is request-scoped: it is applied for this run only,
    /// and the DiT goes back to the pipeline's own LoRA ([`Pipeline::set_lora`], or the base)
    /// afterwards, whether the run succeeded, failed or was cancelled. Nothing lingers into the
    /// next request.
    pub fn generate(&mut self, req: &Request, progress: &mut dyn Progress) -> Result<Generation> {
        let Begun {
            t_all,
            shape,
            mut timings,
            prediction,
            switched,
        } = self.begin(req, progress)?;
        let result = self.run_request(req, &shape, &mut timings, progress);
        if switched {
            // Restore before reporting anything: a failed restore must not go unnoticed.
            let t = Instant::now();
            self.dit.set_lora(&self.engine, self.applied.as_ref())?;
            timings.insert("lora_restore".into(), ms(t));
        }
        let (frames, d) = result?;
        timings.insert("total".into(), ms(t_all));
        Ok(generation(frames, d, prediction, timings))
    }

    /// Steps 0 and 1, with the request's clock and timings started.
    fn begin(&mut self, req: &Request, progress: &mut dyn Progress) -> Result<Begun> {
        let t_all = Instant::now();
        let shape = self.accept(req)?;
        let mut timings = Timings::with_memory(self.stage_memory);
        let size = shape.pixels();
        let (prediction, switched) =
            self.apply_request_lora(&req.lora, size, &mut timings, &mut |done, of| {
                progress.reference(done, of)
            })?;
        Ok(Begun {
            t_all,
            shape,
            timings,
            prediction,
            switched,
        })
    }

    /// Step 0: the request's latent shape, once it is known to have been checked against an
    /// engine with this pipeline's facts ([`RequestParts::check`] checked the rest).
    fn accept(&self, req: &Request) -> Result<LatentShape> {
        match *req.facts() == self.facts {
            true => Ok(*req.shape()),
            false => Err(RuntimeError::Invalid {
                what: "request".into(),
                message: format!(
                    "checked against the engine {}, whose DiT or scheduler differs from this pipeline's ({}): check it against this one",
                    req.engine_dir().display(),
                    self.engine.dir.display()
                ),
            }),
        }
    }

    /// Step 1: the request's LoRA onto the DiT. Returns the prediction (for a reference clip)
    /// and whether the DiT was switched away from the pipeline's own LoRA (to restore after).
    fn apply_request_lora(
        &mut self,
        choice: &RequestLora,
        size: (usize, usize),
        timings: &mut Timings,
        go_on: &mut dyn FnMut(usize, usize) -> bool,
    ) -> Result<(Option<crate::predict::Prediction>, bool)> {
        match choice {
            RequestLora::Resident => return Ok((None, false)),
            RequestLora::Base if self.applied.is_none() => return Ok((None, false)),
            _ => {}
        }
        let (prediction, lora) = self.request_lora(choice, size, timings, go_on)?;
        let t = Instant::now();
        self.dit.set_lora(&self.engine, lora.as_ref())?;
        timings.insert("lora_fuse".into(), ms(t));
        Ok((prediction, true))
    }

    /// The LoRA a request runs with (`None`: the base weights), predicted first for a
    /// reference clip (its encode reporting to `go_on`), merged first for several files.
    /// `size` is the generation's `(height, width)`: VideoX-Fun's pipeline resizes the
    /// reference clip to it (PIL bicubic).
    fn request_lora(
        &mut self,
        choice: &RequestLora,
        (height, width): (usize, usize),
        timings: &mut Timings,
        go_on: &mut dyn FnMut(usize, usize) -> bool,
    ) -> Result<(Option<crate::predict::Prediction>, Option<AppliedLora>)> {
        Ok(match choice {
            RequestLora::Resident => (None, self.applied.clone()),
            RequestLora::Base => (None, None),
            RequestLora::Reference(clip, weight) => {
                let predictor = self.predictor.get(&self.engine, &self.opts)?;
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
                let p = predictor.predict_timed(vae, clip, *weight, timings, go_on)?;
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
    /// factors are DiT inputs per request; each request's video is its solo run's
    /// (`tests/batched_loras.rs`). Afterwards the DiT holds the pipeline's own LoRA again.
    pub fn generate_batch(
        &mut self,
        requests: &[Request],
        progress: &mut dyn Progress,
    ) -> Result<Vec<Generation>> {
        let t_all = Instant::now();
        let invalid = |i: usize, message: String| RuntimeError::Invalid {
            what: format!("request {} of the batch", i + 1),
            message,
        };
        let mut shapes = Vec::with_capacity(requests.len());
        for (i, r) in requests.iter().enumerate() {
            let shape = self.accept(r).map_err(|e| invalid(i, e.to_string()))?;
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
            let (p, l) = self.request_lora(&r.lora, shape.pixels(), t, &mut |done, of| {
                progress.reference(done, of)
            })?;
            predictions.push(p);
            loras.push(l);
        }
        let t = Instant::now();
        // One entry per request where each runs as many guidance samples (its samples are
        // consecutive in the batch): each request's LoRA branch then multiplies its own rows
        // as one matrix, as when it runs alone. Else one entry per sample.
        let per_request: Vec<usize> = requests
            .iter()
            .map(|r| denoise::Guidance(r.guidance).batch())
            .collect();
        let uniform = per_request.windows(2).all(|w| w[0] == w[1]);
        let samples: Vec<Option<&AppliedLora>> = loras
            .iter()
            .zip(&per_request)
            .flat_map(|(l, &n)| std::iter::repeat_n(l.as_ref(), if uniform { 1 } else { n }))
            .collect();
        let same = loras.windows(2).all(|w| match w {
            [a, b] => AppliedLora::same(a.as_ref(), b.as_ref()),
            _ => true,
        });
        let set = match (same, loras.first()) {
            (true, Some(one)) => self.dit.set_lora(&self.engine, one.as_ref()),
            _ => self.dit.set_sample_loras(&self.engine, &samples),
        };
        let cut = match requests.iter().any(|r| r.cache.is_some()) {
            true => self.dit.cut_for_caching(&self.engine),
            false => Ok(()),
        };
        let result = set.and_then(|()| cut).and_then(|()| {
            let switch = ms(t);
            let mut lanes = Vec::with_capacity(requests.len());
            for ((r, shape), tm) in requests.iter().zip(&shapes).zip(&mut timings) {
                tm.insert("lora_fuse".into(), switch);
                let parts = Parts {
                    vae: &mut self.vae,
                    entry: self.engine.dit_entry()?,
                };
                lanes.push(self.family.lane(parts, r, shape, tm)?);
            }
            denoise::run(&mut self.dit, lanes, &mut |i, n| progress.step(i, n))
        });
        // Back to the pipeline's own LoRA before reporting anything.
        let t = Instant::now();
        self.dit.set_lora(&self.engine, self.applied.as_ref())?;
        let restore = ms(t);
        let (done, dit_ms) = result?;
        let mut out = Vec::with_capacity(requests.len());
        let n = requests.len();
        for (k, (((d, shape), mut tm), p)) in done
            .into_iter()
            .zip(&shapes)
            .zip(timings)
            .zip(predictions)
            .enumerate()
        {
            tm.insert("lora_restore".into(), restore);
            tm.steps(dit_ms.clone());
            // The requests share their size: each decodes as many batches.
            let frames = self.decode(&d.latents, shape, &mut tm, &mut |done, of| {
                progress.decode(k * of + done, n * of)
            })?;
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
        progress: &mut dyn Progress,
    ) -> Result<(Tensor, denoise::Denoised)> {
        let d = self.denoise_request(req, shape, timings, false, progress)?;
        let frames = self.decode(&d.latents, shape, timings, &mut |done, of| {
            progress.decode(done, of)
        })?;
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
        progress: &mut dyn Progress,
    ) -> Result<denoise::Denoised> {
        let parts = Parts {
            vae: &mut self.vae,
            entry: self.engine.dit_entry()?,
        };
        let lane = self.family.lane(parts, req, shape, timings)?;
        if req.cache.is_some() {
            let t = Instant::now();
            self.dit.cut_for_caching(&self.engine)?;
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
            progress.step(i, n)
        };
        let (mut done, dit_ms) = denoise::run(&mut self.dit, vec![lane], &mut on_step)?;
        timings.steps(dit_ms);
        done.pop().ok_or_else(|| RuntimeError::Internal {
            what: "denoise".into(),
            message: "no result".into(),
        })
    }

    /// Step 4: latents → frames `[1, F, H, W, 3]` in [0, 1]; `go_on` as [`Progress::decode`].
    fn decode(
        &mut self,
        latents: &[f32],
        shape: &LatentShape,
        timings: &mut Timings,
        go_on: &mut dyn FnMut(usize, usize) -> bool,
    ) -> Result<Tensor> {
        decode_with(&*self.family, &mut self.vae, latents, shape, timings, go_on)
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
        progress: &mut dyn Progress,
    ) -> Result<Generation> {
        let mut b = self.begin(req, progress)?;
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
        let frames = decode_with(
            &*self.family,
            &mut self.vae,
            &d.latents,
            &shape,
            timings,
            &mut |done, of| progress.decode(done, of),
        )?;
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
    fn get(&mut self, engine: &Engine, opts: &SessionOptions) -> Result<&mut Predictor> {
        if engine.manifest.hypernet.is_none() {
            return Err(no_hypernet(engine));
        }
        if let PredictorSlot::NotLoaded = self {
            *self = PredictorSlot::Loaded(Predictor::load(engine, opts)?);
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

/// Step 4 for `family`: latents → frames `[1, F, H, W, 3]` in [0, 1]; `go_on` as
/// [`Progress::decode`].
fn decode_with(
    family: &dyn FamilySteps,
    vae: &mut Vae,
    latents: &[f32],
    shape: &LatentShape,
    timings: &mut Timings,
    go_on: &mut dyn FnMut(usize, usize) -> bool,
) -> Result<Tensor> {
    let t = Instant::now();
    let video = family.decode(vae, latents, shape, go_on)?;
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

/// The VAE's `[1, 3, F, H, W]` in [-1, 1] → frames `[1, F, H, W, 3]` as
/// `(x / 2 + 0.5).clamp(0, 1)` (diffusers' `postprocess_video`).
fn to_frames(video: &Tensor) -> Result<Tensor> {
    let [_, 3, fo, ho, wo] = video.shape[..] else {
        return Err(RuntimeError::Graph {
            graph: "VAE decoder".into(),
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

fn no_hypernet(engine: &Engine) -> RuntimeError {
    RuntimeError::Engine {
        dir: engine.dir.clone(),
        message:
            "holds no hypernetwork; export with `v2l-export pipeline ... --hypernet F --lilora F`"
                .into(),
    }
}

pub use crate::tensor::gaussian_noise;
