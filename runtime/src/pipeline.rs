//! CogVideoX image-to-video generation with an optional Video2LoRA reference clip.
//!
//! Mirrors diffusers 0.42.1 `CogVideoXImageToVideoPipeline` (CogVideoX 1.0 layout): the first
//! frame in [-1, 1] is VAE-encoded (posterior mode by default; a seeded sample as an option) and
//! scaled, padded with zero latents to the clip's latent frames and concatenated to the noisy
//! latents on the channel axis; the DiT runs the negative and positive prompts as one batch of 2
//! (classifier-free guidance); the DDIM scheduler steps; the VAE decodes in frame batches; frames
//! come out as `(x / 2 + 0.5).clamp(0, 1)`.
//!
//! With a reference clip the hypernetwork predicts a LoRA (see [`crate::predict`]) that is fused
//! into the DiT's weights before the loop: with batch 1 the same LoRA serves both guidance
//! branches, so fusing is exact.

use std::collections::BTreeMap;
use std::time::Instant;

use crate::error::{Result, RuntimeError};
use crate::lora::format::Lora;
use crate::lora::strategy::{DitRunner, Strategy};
use crate::predict::Predictor;
use crate::rope::cogvideox_rope;
use crate::scheduler::{DdimScheduler, SchedulerConfig};
use crate::session::SessionOptions;
use crate::stage::{AppliedLora, ExportDir};
use crate::tensor::Tensor;
use crate::vae::Vae;
use crate::video::Frames;

/// One generation request.
pub struct Request {
    /// First frame, RGB8 at the output size.
    pub image: Frames,
    /// `[1, L, D]` each.
    pub prompt_embeds: Tensor,
    pub negative_prompt_embeds: Tensor,
    /// Pixel frames to generate (1 + 4k for CogVideoX).
    pub frames: usize,
    pub steps: usize,
    pub guidance: f32,
    /// `[1, latent_frames, 16, h, w]`; see [`gaussian_noise`] for seeded noise.
    pub noise: Tensor,
    /// Reference clip for a Video2LoRA LoRA, and upstream's LoRA weight.
    pub reference: Option<(Frames, f32)>,
}

/// What a run produced, with the intermediates `--dump` writes.
pub struct Generation {
    /// `[1, F, H, W, 3]` in [0, 1].
    pub frames: Tensor,
    pub latents_steps: Vec<Tensor>,
    pub reference_latents: Option<Tensor>,
    pub hyper_weights: Option<Tensor>,
    pub lora: Option<Lora>,
    /// Stage name → milliseconds.
    pub timings: BTreeMap<String, f64>,
}

/// A loaded pipeline: VAE, DiT (rebuilt with fused weights when a LoRA is applied), scheduler.
pub struct Pipeline {
    dir: ExportDir,
    vae: Vae,
    dit: DitRunner,
    scheduler: SchedulerConfig,
    predictor: Option<Predictor>,
}

impl Pipeline {
    /// Loads with the engine's default LoRA strategy (`fused` for a plain export directory).
    pub fn load(dir: ExportDir, opts: &SessionOptions) -> Result<Pipeline> {
        let strategy = match dir.bundle.as_ref() {
            None => Strategy::default(),
            Some(b) => Strategy::parse(&b.lora_strategy).ok_or_else(|| RuntimeError::BadFile {
                path: dir.dir.join(crate::bundle::FILE_NAME),
                message: format!(
                    "LoRA strategy `{}` is not one this v2l runs (fused, bound, unfused); compile the engine again",
                    b.lora_strategy
                ),
            })?,
        };
        Self::load_with_strategy(dir, opts, strategy)
    }

    pub fn load_with_strategy(
        dir: ExportDir,
        opts: &SessionOptions,
        strategy: Strategy,
    ) -> Result<Pipeline> {
        let sched = dir.manifest.scheduler.clone().ok_or_else(|| RuntimeError::Invalid {
            what: dir.dir.display().to_string(),
            message: "holds no scheduler config; export the whole pipeline with `v2l-export pipeline`".into(),
        })?;
        let scheduler = SchedulerConfig::from_file(&dir.dir.join(sched))?;
        let vae = Vae::load(&dir, opts)?;
        let dit = DitRunner::load(&dir, opts, strategy)?;
        let predictor = match dir.manifest.hypernet {
            Some(_) => Some(Predictor::load(&dir, opts)?),
            None => None,
        };
        Ok(Pipeline {
            dir,
            vae,
            dit,
            scheduler,
            predictor,
        })
    }

    pub fn export_dir(&self) -> &ExportDir {
        &self.dir
    }

    /// Applies `lora` to the DiT by the pipeline's strategy, or restores the base for `None`.
    pub fn set_lora(&mut self, lora: Option<&AppliedLora>) -> Result<()> {
        self.dit.set_lora(&self.dir, lora)
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
        let p = self.predictor.as_mut().ok_or_else(|| RuntimeError::Invalid {
            what: self.dir.dir.display().to_string(),
            message: "holds no hypernetwork; export with `v2l-export pipeline ... --hypernet F --lilora F`".into(),
        })?;
        p.predict(&mut self.vae, clip, lora_weight)
    }

    /// Runs one request; `progress(step, steps)` is called after each denoising step and
    /// returns `false` to cancel the run ([`RuntimeError::Cancelled`]).
    pub fn generate(
        &mut self,
        req: &Request,
        progress: &mut dyn FnMut(usize, usize) -> bool,
    ) -> Result<Generation> {
        let mut timings = BTreeMap::new();
        let t_all = Instant::now();
        let dit = self
            .dir
            .manifest
            .dit
            .clone()
            .ok_or_else(|| RuntimeError::Invalid {
                what: self.dir.dir.display().to_string(),
                message: "holds no DiT".into(),
            })?;
        let (h, w) = (req.image.height, req.image.width);
        let (sp, tc) = (8usize, 4usize);
        if h % (sp * dit.patch_size) != 0
            || w % (sp * dit.patch_size) != 0
            || req.frames == 0
            || (req.frames - 1) % tc != 0
        {
            return Err(RuntimeError::Invalid {
                what: "request".into(),
                message: format!(
                    "{}x{} with {} frames: height and width must be multiples of {}, frames 1 + 4k",
                    w,
                    h,
                    req.frames,
                    sp * dit.patch_size
                ),
            });
        }
        let (lf, lh, lw) = ((req.frames - 1) / tc + 1, h / sp, w / sp);
        let c = dit.in_channels / 2;
        if req.noise.shape != [1, lf, c, lh, lw] {
            return Err(RuntimeError::Invalid {
                what: "noise".into(),
                message: format!(
                    "shape {:?}; expected {:?}",
                    req.noise.shape,
                    [1, lf, c, lh, lw]
                ),
            });
        }
        for (name, t) in [
            ("prompt_embeds", &req.prompt_embeds),
            ("negative_prompt_embeds", &req.negative_prompt_embeds),
        ] {
            if t.shape.len() != 3 || t.shape[0] != 1 || t.shape[2] != dit.text_embed_dim {
                return Err(RuntimeError::Invalid {
                    what: name.into(),
                    message: format!(
                        "shape {:?}; expected [1, L, {}]",
                        t.shape, dit.text_embed_dim
                    ),
                });
            }
        }
        if req.prompt_embeds.shape != req.negative_prompt_embeds.shape {
            return Err(RuntimeError::Invalid {
                what: "negative_prompt_embeds".into(),
                message: "must have the shape of prompt_embeds".into(),
            });
        }

        // Reference clip -> LoRA fused into the DiT.
        let (mut reference_latents, mut hyper_weights, mut lora) = (None, None, None);
        if let Some((clip, weight)) = &req.reference {
            let t = Instant::now();
            let p = self.predict(clip, *weight)?;
            timings.insert("predict_lora".into(), ms(t));
            let t = Instant::now();
            let applied = AppliedLora {
                lora: p.lora.clone(),
                source: "reference".into(),
                multiplier: 1.0,
            };
            self.set_lora(Some(&applied))?;
            timings.insert("lora_fuse".into(), ms(t));
            reference_latents = Some(p.reference_latents);
            hyper_weights = Some(p.hyper_weights);
            lora = Some(p.lora);
        }

        // First frame -> image latents [1, lf, C, lh, lw] (frame 0, zeros after).
        let t = Instant::now();
        let image = req.image.to_unit_video();
        let image = Tensor::f32(
            image.shape.clone(),
            image
                .as_f32("image")?
                .iter()
                .map(|v| v * 2.0 - 1.0)
                .collect(),
        );
        let mean = self.vae.latent(&image)?;
        timings.insert("vae_encode".into(), ms(t));
        let sf = self.vae.entry.scaling_factor as f32;
        let frame = lh * lw;
        let mut image_latents = vec![0f32; lf * c * frame];
        for (ch, chunk) in mean
            .as_f32("posterior_mean")?
            .chunks_exact(frame)
            .take(c)
            .enumerate()
        {
            for (o, v) in image_latents[ch * frame..(ch + 1) * frame]
                .iter_mut()
                .zip(chunk)
            {
                *o = v * sf;
            }
        }

        let mut sched = DdimScheduler::new(&self.scheduler)?;
        sched.set_timesteps(req.steps)?;
        let (rope_cos, rope_sin) = cogvideox_rope(
            dit.attention_head_dim,
            lf,
            lh,
            lw,
            dit.patch_size,
            config_usize(&dit.config, "sample_height").unwrap_or(lh),
            config_usize(&dit.config, "sample_width").unwrap_or(lw),
        );
        let seq = rope_cos.len() / dit.attention_head_dim;
        let mut inputs = BTreeMap::new();
        inputs.insert(
            "rope_cos".to_string(),
            Tensor::f32(vec![seq, dit.attention_head_dim], rope_cos),
        );
        inputs.insert(
            "rope_sin".to_string(),
            Tensor::f32(vec![seq, dit.attention_head_dim], rope_sin),
        );
        let text = Tensor::concat(
            &[
                req.negative_prompt_embeds.clone(),
                req.prompt_embeds.clone(),
            ],
            0,
        )?;
        inputs.insert("encoder_hidden_states".to_string(), text);

        let mut latents: Vec<f32> = req
            .noise
            .as_f32("noise")?
            .iter()
            .map(|v| v * sched.init_noise_sigma())
            .collect();
        let mut latents_steps = Vec::with_capacity(req.steps);
        let timesteps = sched.timesteps().to_vec();
        let mut dit_ms = Vec::with_capacity(timesteps.len());
        for (i, &t) in timesteps.iter().enumerate() {
            // [latents | image latents] on channels, for each of the 2 guidance branches.
            let mut hs = Vec::with_capacity(2 * lf * 2 * c * frame);
            for _ in 0..2 {
                for f in 0..lf {
                    hs.extend_from_slice(&latents[f * c * frame..(f + 1) * c * frame]);
                    hs.extend_from_slice(&image_latents[f * c * frame..(f + 1) * c * frame]);
                }
            }
            inputs.insert(
                "hidden_states".to_string(),
                Tensor::f32(vec![2, lf, 2 * c, lh, lw], hs),
            );
            inputs.insert("timestep".to_string(), Tensor::i64(vec![2], vec![t, t]));
            let ts = Instant::now();
            let out = self.dit.run(&inputs)?;
            dit_ms.push(ms(ts));
            let pred = out.get("sample").ok_or_else(|| RuntimeError::Invalid {
                what: "DiT".into(),
                message: "no `sample` output".into(),
            })?;
            let pred = pred.as_f32("sample")?;
            let n = latents.len();
            let guided: Vec<f32> = (0..n)
                .map(|k| pred[k] + req.guidance * (pred[n + k] - pred[k]))
                .collect();
            latents = sched.step(&guided, t, &latents);
            latents_steps.push(Tensor::f32(req.noise.shape.clone(), latents.clone()));
            if !progress(i + 1, timesteps.len()) {
                return Err(RuntimeError::Cancelled);
            }
        }
        dit_ms.sort_by(|a, b| a.total_cmp(b));
        if let Some(m) = dit_ms.get(dit_ms.len() / 2) {
            timings.insert("dit_step".into(), *m);
        }

        // Decode: [1, lf, C, h, w] -> [1, C, lf, h, w] / scaling factor -> VAE -> frames.
        let t = Instant::now();
        let mut z = vec![0f32; latents.len()];
        for f in 0..lf {
            for ch in 0..c {
                let src = &latents[(f * c + ch) * frame..(f * c + ch + 1) * frame];
                for (o, v) in z[(ch * lf + f) * frame..(ch * lf + f + 1) * frame]
                    .iter_mut()
                    .zip(src)
                {
                    *o = v / sf;
                }
            }
        }
        let video = self.vae.decode(&Tensor::f32(vec![1, c, lf, lh, lw], z))?;
        timings.insert("vae_decode".into(), ms(t));
        let (fo, ho, wo) = (video.shape[2], video.shape[3], video.shape[4]);
        let v = video.as_f32("sample")?;
        let mut frames = vec![0f32; fo * ho * wo * 3];
        for ch in 0..3 {
            for p in 0..fo * ho * wo {
                frames[p * 3 + ch] = (v[ch * fo * ho * wo + p] / 2.0 + 0.5).clamp(0.0, 1.0);
            }
        }
        timings.insert("total".into(), ms(t_all));
        Ok(Generation {
            frames: Tensor::f32(vec![1, fo, ho, wo, 3], frames),
            latents_steps,
            reference_latents,
            hyper_weights,
            lora,
            timings,
        })
    }
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

fn config_usize(cfg: &serde_json::Value, key: &str) -> Option<usize> {
    cfg.get(key).and_then(|v| v.as_u64()).map(|v| v as usize)
}

pub use crate::tensor::gaussian_noise;
