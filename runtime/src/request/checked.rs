//! A generation request checked against its engine. [`RequestParts`] is what a caller fills
//! in; [`RequestParts::check`] is the only way to a [`Request`], and the pipeline runs a
//! `Request` without checking it again: it only compares the [`RequestFacts`] the request was
//! checked against with its own engine's (equal for every bundle of one export, so one request
//! can run on an fp32 and a bf16 engine alike).

use std::ops::Deref;
use std::path::PathBuf;

use v2l_contracts::io::files as files_io;
use v2l_contracts::latent::{SPACE_STRIDE, TIME_STRIDE};
use v2l_contracts::request::{Field, RequestError};
use v2l_contracts::{Family, PipelineKind, Sampler};

use super::settings::{finite, MAX_SEQUENCE_LENGTH};
use crate::engine::Engine;
use crate::error::{Result, RuntimeError};
use crate::lora::AppliedLora;
use crate::predict::check_reference_weight;
use crate::tensor::Tensor;
use crate::video::Frames;

/// One generation request's contents, unchecked. Front ends with files and text use
/// [`super::Inputs::build`]; callers holding tensors fill this in and call
/// [`RequestParts::check`].
#[derive(Clone)]
pub struct RequestParts {
    /// First frame, RGB8 at the output size (image-to-video); `None` for text-to-video (Wan
    /// T2V), where the size comes from `noise`.
    pub image: Option<Frames>,
    /// Wan I2V: the first frame's CLIP image tokens `[1, tokens, image_dim]`.
    pub image_embeds: Option<Tensor>,
    /// `[1, L, D]` each.
    pub prompt_embeds: Tensor,
    pub negative_prompt_embeds: Tensor,
    /// Pixel frames to generate (1 + 4k).
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
/// DiT is back to the pipeline's own LoRA ([`crate::pipeline::Pipeline::set_lora`], or the
/// base weights).
#[derive(Clone, Debug, Default)]
pub enum RequestLora {
    /// The pipeline's own LoRA (the base weights if none).
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

/// A request checked against one engine: read its contents through [`Deref`]; change them
/// with [`Request::into_parts`] and check again.
#[derive(Clone)]
pub struct Request {
    parts: RequestParts,
    shape: LatentShape,
    /// What the checks read of the engine, so a pipeline whose engine differs refuses it.
    facts: RequestFacts,
    /// The engine it was checked against, to name it.
    engine: PathBuf,
}

/// What [`RequestParts::check`] reads of an engine: two engines with equal facts accept the
/// same requests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestFacts {
    kind: PipelineKind,
    patch_size: usize,
    out_channels: usize,
    text_embed_dim: usize,
    /// Wan I2V: the CLIP tokens' width, and whether the engine encodes them itself.
    image_tokens: Option<(usize, bool)>,
    train_timesteps: usize,
}

impl RequestFacts {
    /// The facts of `engine` (reads its scheduler config once).
    pub fn of(engine: &Engine) -> Result<RequestFacts> {
        let dit = engine.dit_entry()?;
        let image_dim = engine.wan_config()?.and_then(|c| c.image_dim);
        Ok(RequestFacts {
            kind: engine.pipeline_kind()?,
            patch_size: dit.patch_size,
            out_channels: dit.out_channels,
            text_embed_dim: dit.text_embed_dim,
            image_tokens: image_dim.map(|d| (d, engine.manifest.image_encoder.is_some())),
            train_timesteps: engine.train_timesteps()?,
        })
    }
}

impl Deref for Request {
    type Target = RequestParts;
    fn deref(&self) -> &RequestParts {
        &self.parts
    }
}

impl Request {
    /// The unchecked contents back, to change and check again.
    pub fn into_parts(self) -> RequestParts {
        self.parts
    }

    /// The latent grid the request denoises.
    pub(crate) fn shape(&self) -> &LatentShape {
        &self.shape
    }

    /// The directory of the engine the request was checked against.
    pub fn engine_dir(&self) -> &std::path::Path {
        &self.engine
    }

    /// The engine facts the request was checked against.
    pub fn facts(&self) -> &RequestFacts {
        &self.facts
    }
}

impl RequestParts {
    /// Checks everything a run depends on against `engine`, once, before any work: the
    /// sampler and first-frame rules, steps against the scheduler, guidance, the size rule,
    /// the noise's shape, the prompt and image embeddings' shapes and values, the reference's
    /// LoRA weight.
    pub fn check(self, engine: &Engine) -> Result<Request> {
        let facts = RequestFacts::of(engine)?;
        let kind = facts.kind;
        let invalid =
            |field: Field, message: String| RuntimeError::from(RequestError::new(field, message));
        check_sampler(kind, self.sampler)?;
        check_first_frame(kind, self.image.is_some())?;
        if self.steps == 0 {
            return Err(invalid(Field::Steps, "0: at least 1".into()));
        }
        let max = facts.train_timesteps;
        if self.steps > max {
            return Err(invalid(
                Field::Steps,
                super::settings::over_schedule(self.steps, max),
            ));
        }
        finite(Field::Guidance, self.guidance)?;
        if let RequestLora::Reference(_, w) = &self.lora {
            check_reference_weight(*w)?;
        }
        let (h, w) = match &self.image {
            Some(image) if image.frames != 1 => {
                return Err(invalid(
                    Field::Image,
                    format!("{} frames; the first frame is one frame", image.frames),
                ))
            }
            Some(image) => (image.height, image.width),
            None => match self.noise.shape[..] {
                [1, _, _, h, w] => (h * SPACE_STRIDE, w * SPACE_STRIDE),
                _ => {
                    return Err(invalid(
                        Field::Noise,
                        format!(
                            "shape {:?}; expected [1, C, latent_frames, h, w]",
                            self.noise.shape
                        ),
                    ))
                }
            },
        };
        let m = SPACE_STRIDE * facts.patch_size;
        let frames = self.frames;
        if h % m != 0 || w % m != 0 || frames == 0 || (frames - 1) % TIME_STRIDE != 0 {
            return Err(invalid(
                Field::Size,
                format!("{w}x{h} with {frames} frames: height and width must be multiples of {m}, frames 1 + 4k"),
            ));
        }
        let grid = v2l_contracts::LatentGrid::of_video(frames, h, w);
        let shape = LatentShape {
            frames: grid.frames,
            // The DiT predicts the noisy latents: its output channels are theirs.
            channels: facts.out_channels,
            height: grid.height,
            width: grid.width,
            channels_first: kind.family() == Family::Wan,
        };
        if self.noise.shape != shape.dims() {
            return Err(invalid(
                Field::Noise,
                format!("shape {:?}; expected {:?}", self.noise.shape, shape.dims()),
            ));
        }
        let prompts = [
            (Field::PromptEmbeds, &self.prompt_embeds),
            (Field::NegativePromptEmbeds, &self.negative_prompt_embeds),
        ];
        for (field, t) in prompts {
            if !matches!(t.shape[..], [1, _, d] if d == facts.text_embed_dim) {
                return Err(invalid(
                    field,
                    format!(
                        "shape {:?}; expected [1, L, {}]",
                        t.shape, facts.text_embed_dim
                    ),
                ));
            }
        }
        self.check_image_embeds(facts.image_tokens)?;
        for (field, t) in prompts {
            // Attention over the text grows with its length: bounded like prompt text.
            let max = MAX_SEQUENCE_LENGTH;
            if let Some(&l) = t.shape.get(1).filter(|&&l| l > max) {
                return Err(invalid(field, format!("{l} tokens; at most {max}")));
            }
            let name = field.name();
            crate::error::check_finite(|| name.to_string(), t.as_f32(name)?)?;
        }
        if self.prompt_embeds.shape != self.negative_prompt_embeds.shape {
            return Err(invalid(
                Field::NegativePromptEmbeds,
                "must have the shape of prompt_embeds".into(),
            ));
        }
        Ok(Request {
            parts: self,
            shape,
            facts,
            engine: engine.dir.clone(),
        })
    }

    /// Wan I2V takes the first frame's CLIP tokens, given or computed by the engine's image
    /// encoder; other engines ignore them.
    fn check_image_embeds(&self, image_tokens: Option<(usize, bool)>) -> Result<()> {
        let invalid =
            |message: String| RuntimeError::from(RequestError::new(Field::ImageEmbeds, message));
        if let Some((d, encodes)) = image_tokens {
            match &self.image_embeds {
                Some(e) if matches!(e.shape[..], [1, l, w] if l > 0 && w == d) => {}
                Some(e) => {
                    return Err(invalid(format!("shape {:?}; expected [1, tokens, {d}]", e.shape)))
                }
                // The engine's CLIP encoder computes them from the first frame.
                None if encodes => {}
                None => {
                    return Err(invalid(format!(
                        "missing: an I2V Wan engine needs the first frame's CLIP tokens [1, tokens, {d}]"
                    )))
                }
            }
        }
        if let Some(e) = &self.image_embeds {
            crate::error::check_finite(
                || files_io::IMAGE_EMBEDS.into(),
                e.as_f32(files_io::IMAGE_EMBEDS)?,
            )?;
        }
        Ok(())
    }
}

/// Text-to-video engines (Wan T2V) take no first frame; every other one needs it. The one
/// rule, for the builder and for a server checking a form before it queues the job.
pub fn check_first_frame(kind: PipelineKind, given: bool) -> std::result::Result<(), RequestError> {
    match (kind.takes_image(), given) {
        (false, true) => Err(RequestError::new(
            Field::Image,
            format!("this engine is text-to-video ({kind}): it takes no first frame"),
        )),
        (true, false) => Err(RequestError::new(
            Field::Image,
            format!("required: this engine is image-to-video ({kind}); give the first frame"),
        )),
        _ => Ok(()),
    }
}

/// Wan engines sample with their flow scheduler; a CogVideoX sampler is refused there.
pub fn check_sampler(
    kind: PipelineKind,
    sampler: Option<Sampler>,
) -> std::result::Result<(), RequestError> {
    match (kind.family(), sampler) {
        (v2l_contracts::Family::Wan, Some(s)) => Err(RequestError::new(
            Field::Scheduler,
            format!("`{s}`: this is a Wan engine ({kind}); it samples with its flow scheduler"),
        )),
        _ => Ok(()),
    }
}

/// Latent video sizes of a request: CogVideoX `[1, frames, channels, height, width]`, Wan
/// channels first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct LatentShape {
    pub(crate) frames: usize,
    pub(crate) channels: usize,
    pub(crate) height: usize,
    pub(crate) width: usize,
    pub(crate) channels_first: bool,
}

impl LatentShape {
    pub(crate) fn dims(&self) -> [usize; 5] {
        match self.channels_first {
            true => [1, self.channels, self.frames, self.height, self.width],
            false => [1, self.frames, self.channels, self.height, self.width],
        }
    }

    /// The video's height and width in pixels.
    pub(crate) fn pixels(&self) -> (usize, usize) {
        (self.height * SPACE_STRIDE, self.width * SPACE_STRIDE)
    }
}
