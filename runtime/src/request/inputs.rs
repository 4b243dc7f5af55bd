//! The one request builder: every front end (the CLI, the C ABI, the server, Python through
//! the C ABI) hands over [`Inputs`] as it received them, plus settings already checked by
//! [`super::Settings::check`], and [`Inputs::build`] returns the [`super::Request`] the
//! pipeline runs. What depends on the engine is decided here and only here: whether it takes a
//! first frame (text-to-video), whether a sampler may be chosen, which LoRA files fit its DiT,
//! the noise's shape. A bad input is a [`RequestError`] naming its [`Field`], which each front
//! end words its own way (`--image`, `params.first_frame`, the form field `image`).

use std::path::PathBuf;
use std::time::Instant;

use v2l_contracts::io::files as files_io;
use v2l_contracts::request::{Field, RequestError};
use v2l_contracts::{PipelineKind, Sampler};

use super::checked::{check_first_frame, check_sampler, Request, RequestLora, RequestParts};
use super::settings::Checked;
use crate::engine::Engine;
use crate::error::Result;
use crate::lora::AppliedLora;
use crate::session::SessionOptions;
use crate::tensor::Tensor;
use crate::video::Frames;

/// The prompt: text for the engine's text encoder, or embeddings `[1, L, D]` computed elsewhere.
pub enum PromptInput {
    Text { prompt: String, negative: String },
    Embeds { prompt: Tensor, negative: Tensor },
}

/// A picture or clip: a file (read at the request's size), or frames already decoded there.
pub enum MediaInput {
    /// An image, a video (the first frame: its first frame alone), or a `reference_u8`
    /// safetensors file. Needs the runtime's `video` feature.
    File(PathBuf),
    Frames(Frames),
}

/// The LoRA the request runs with.
pub enum LoraInput {
    /// The pipeline's own ([`crate::pipeline::Pipeline::set_lora`], or the base weights).
    Resident,
    /// The base weights.
    Base,
    /// A reference clip, whose LoRA the Video2LoRA hypernetwork predicts at the request's
    /// `lora_scale` (upstream's LoRA weight).
    Reference(MediaInput),
    /// LoRA files with their multipliers, read and matched against the DiT here.
    Files(Vec<(PathBuf, f32)>),
    /// LoRAs the front end already holds (a server's cache, predicted effects).
    Applied(Vec<AppliedLora>),
}

/// The initial latent noise.
pub enum NoiseInput {
    /// Drawn from the seed, as is everything else the pipeline draws: the same seed gives the
    /// same video from every front end.
    Seed(u64),
    /// Given: the initial noise of the engine's layout and, for CogVideoX-Fun-InP, optionally
    /// its augmentation noise `[1, 3, F, H, W]`; `seed` seeds what else is drawn.
    Given {
        noise: Tensor,
        inpaint_noise: Option<Tensor>,
        seed: Option<u64>,
    },
}

/// One request's inputs, as a front end received them.
pub struct Inputs {
    pub prompt: PromptInput,
    /// The first frame; `None` for a text-to-video engine.
    pub image: Option<MediaInput>,
    /// Wan I2V: the first frame's CLIP image tokens `[1, tokens, dim]`, when given instead of
    /// computed by the engine's image encoder.
    pub image_embeds: Option<Tensor>,
    pub lora: LoraInput,
    pub noise: NoiseInput,
    /// `None`: the pipeline kind's default.
    pub sampler: Option<Sampler>,
    /// Step caching (`None`: off).
    pub cache: Option<crate::step_cache::StepCache>,
}

/// The engine's prompt encoder, loaded when a request first brings text and kept for the next
/// (a server or a C ABI generator); [`PromptEncoders::release`] frees it (the CLI, before the
/// DiT loads).
#[derive(Default)]
pub struct PromptEncoders {
    #[cfg(feature = "text")]
    encoder: Option<crate::text::prompt::PromptEncoder>,
}

impl PromptEncoders {
    /// Frees the encoder (10 GB for a T5-XXL) and returns the memory to the system.
    pub fn release(&mut self) {
        #[cfg(feature = "text")]
        {
            self.encoder = None;
        }
        crate::session::release_freed_memory();
    }

    /// `[1, len, D]` embeddings of `text`; `warn` hears of a prompt longer than `len`.
    fn encode(
        &mut self,
        engine: &Engine,
        opts: &SessionOptions,
        field: Field,
        text: &str,
        len: usize,
        warnings: &mut Vec<(Field, String)>,
    ) -> Result<Tensor> {
        #[cfg(feature = "text")]
        {
            let enc = match &mut self.encoder {
                Some(enc) => enc,
                slot => slot.insert(crate::text::prompt::PromptEncoder::load(engine, opts)?),
            };
            let mut warn = |n: usize| {
                warnings.push((field, format!("{n} tokens; truncated to {len}")));
            };
            Ok(enc.encode(text, len, &mut warn)?.1)
        }
        #[cfg(not(feature = "text"))]
        {
            let _ = (engine, opts, text, len, warnings);
            Err(RequestError::new(
                field,
                "this build has no text encoder (the runtime's `text` feature): give embeddings",
            )
            .into())
        }
    }
}

/// A built request, with what building it noticed.
pub struct Built {
    pub request: Request,
    /// Prompt text longer than the checked length, truncated (a warning, not an error).
    pub warnings: Vec<(Field, String)>,
    /// Milliseconds spent encoding prompt text (`None`: embeddings were given, or cached).
    pub text_encode_ms: Option<f64>,
}

impl Inputs {
    /// Checks the inputs against `engine` and `checked` (the request's settings), reads what is
    /// still a file, encodes prompt text, and returns the request. The order is fixed, cheap
    /// first: first-frame and sampler rules, noise, the first frame, reference and LoRA files,
    /// then prompt text through the encoder.
    pub fn build(
        self,
        engine: &Engine,
        opts: &SessionOptions,
        checked: &Checked,
        prompts: &mut PromptEncoders,
    ) -> Result<Built> {
        let kind = engine.pipeline_kind()?;
        check_first_frame(kind, self.image.is_some())?;
        check_sampler(kind, self.sampler)?;
        let (noise, inpaint_noise, seed) = self.noise.resolve(engine, checked)?;
        let (h, w) = (checked.height(), checked.width());
        let image = match self.image {
            None => None,
            Some(m) => Some(m.first_frame(h, w)?),
        };
        let lora = match self.lora {
            LoraInput::Resident => RequestLora::Resident,
            LoraInput::Base => RequestLora::Base,
            LoraInput::Reference(m) => {
                let (clip, source) = m.reference(kind, h, w)?;
                crate::predict::check_reference(&clip, &source)?;
                RequestLora::Reference(clip, checked.lora_scale())
            }
            LoraInput::Files(files) => RequestLora::Loras(read_loras(engine, &files)?),
            LoraInput::Applied(loras) => RequestLora::Loras(loras),
        };
        // Prompt text last: encoding it is the expensive step (a T5-XXL), and every file above
        // is checked before it.
        let mut warnings = Vec::new();
        let mut text_encode_ms = None;
        let (prompt_embeds, negative_prompt_embeds) = match self.prompt {
            PromptInput::Embeds { prompt, negative } => (prompt, negative),
            PromptInput::Text { prompt, negative } => {
                let t = Instant::now();
                let len = checked.sequence_length()?;
                let mut encode = |field, text: &str| {
                    prompts.encode(engine, opts, field, text, len, &mut warnings)
                };
                let p = encode(Field::Prompt, &prompt)?;
                let n = encode(Field::NegativePrompt, &negative)?;
                text_encode_ms = Some(t.elapsed().as_secs_f64() * 1e3);
                (p, n)
            }
        };
        let parts = RequestParts {
            image: image.map(|i| i.frames_first()),
            image_embeds: self.image_embeds,
            prompt_embeds,
            negative_prompt_embeds,
            frames: checked.frames(),
            steps: checked.steps(),
            guidance: checked.guidance(),
            noise,
            lora,
            sampler: self.sampler,
            inpaint_noise,
            seed,
            cache: self.cache,
        };
        let request: Request = parts.check(engine)?;
        Ok(Built {
            request,
            warnings,
            text_encode_ms,
        })
    }
}

impl NoiseInput {
    /// The initial noise (checked against the request's latent shape), the augmentation
    /// noise if given, and the seed.
    fn resolve(
        self,
        engine: &Engine,
        c: &Checked,
    ) -> Result<(Tensor, Option<Tensor>, Option<u64>)> {
        match self {
            NoiseInput::Seed(seed) => Ok((c.seeded_noise(engine, seed)?, None, Some(seed))),
            NoiseInput::Given {
                noise,
                inpaint_noise,
                seed,
            } => {
                let (frames, height, width) = (c.frames(), c.height(), c.width());
                let want = engine.noise_shape(frames, height, width)?;
                if noise.shape != want {
                    return Err(RequestError::new(
                        Field::Noise,
                        format!(
                            "`{}` has shape {:?}; {} frames of {}x{} need {want:?}",
                            files_io::INITIAL_NOISE,
                            noise.shape,
                            frames,
                            width,
                            height
                        ),
                    )
                    .into());
                }
                if let Some(t) = &inpaint_noise {
                    let want = [1, 3, frames, height, width];
                    if t.shape != want {
                        return Err(RequestError::new(
                            Field::Noise,
                            format!(
                                "`{}` has shape {:?}; expected {want:?}",
                                files_io::INPAINT_NOISE,
                                t.shape
                            ),
                        )
                        .into());
                    }
                }
                Ok((noise, inpaint_noise, seed))
            }
        }
    }
}

impl MediaInput {
    /// The first frame at `h × w` (a video's first frame alone).
    fn first_frame(self, h: usize, w: usize) -> Result<Frames> {
        match self {
            MediaInput::Frames(f) => Ok(f),
            #[cfg(feature = "video")]
            MediaInput::File(p) => crate::video::read_frames_at_most(&p, h, w, 1),
            #[cfg(not(feature = "video"))]
            MediaInput::File(p) => Err(no_video(&p, h, w)),
        }
    }

    /// The reference clip as the engine's pipeline prepares it, and how to name it.
    fn reference(self, kind: PipelineKind, h: usize, w: usize) -> Result<(Frames, String)> {
        match self {
            MediaInput::Frames(f) => Ok((f, "the reference clip".into())),
            #[cfg(feature = "video")]
            MediaInput::File(p) => Ok((
                crate::video::read_reference(&p, kind, h, w)?,
                p.display().to_string(),
            )),
            #[cfg(not(feature = "video"))]
            MediaInput::File(p) => {
                let _ = kind;
                Err(no_video(&p, h, w))
            }
        }
    }
}

#[cfg(not(feature = "video"))]
fn no_video(p: &std::path::Path, _h: usize, _w: usize) -> crate::error::RuntimeError {
    crate::error::RuntimeError::BadFile {
        path: p.into(),
        message: "this build reads no media files (the runtime's `video` feature)".into(),
    }
}

/// LoRA files with their multipliers, read and matched against the engine's DiT (module names
/// and shapes) before any session is built.
fn read_loras(engine: &Engine, files: &[(PathBuf, f32)]) -> Result<Vec<AppliedLora>> {
    let targets = engine.dit_targets()?;
    let modules: Vec<String> = targets.iter().map(|t| t.name.clone()).collect();
    files
        .iter()
        .map(|(path, multiplier)| {
            let multiplier = crate::limits::bounded(*multiplier)
                .map_err(|m| RequestError::new(Field::LoraWeights, m))?;
            let lora = crate::lora::format::read(path, Some(&modules))?;
            crate::lora::apply::match_targets(&lora, targets, path)?;
            Ok(AppliedLora {
                lora: lora.into(),
                source: path.clone(),
                multiplier,
            })
        })
        .collect()
}
