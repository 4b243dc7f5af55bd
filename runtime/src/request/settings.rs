//! A request's settings: what a front end received ([`Settings`]) and what it became once
//! checked against the engine's defaults and the limits ([`Checked`]).

use crate::engine::Engine;
use crate::limits::Limits;

pub use v2l_contracts::request::{Field, RequestError};

/// A generation request's settings as a front end received them (`None`: the engine's
/// default, where it has one).
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    pub frames: Option<usize>,
    pub height: Option<usize>,
    pub width: Option<usize>,
    pub steps: usize,
    pub guidance: f32,
    pub lora_scale: f32,
    /// Tokens prompt text is encoded to (`None`: the DiT's `max_text_seq_length`).
    pub max_sequence_length: Option<usize>,
}

/// diffusers' CogVideoX defaults, the one place every front end reads them from.
pub const DEFAULT_STEPS: usize = 50;
pub const DEFAULT_GUIDANCE: f32 = 6.0;
pub const DEFAULT_LORA_SCALE: f32 = 1.0;

impl Default for Settings {
    /// diffusers' CogVideoX defaults: 50 steps at guidance 6, LoRA scale 1.
    fn default() -> Self {
        Settings {
            frames: None,
            height: None,
            width: None,
            steps: DEFAULT_STEPS,
            guidance: DEFAULT_GUIDANCE,
            lora_scale: DEFAULT_LORA_SCALE,
            max_sequence_length: None,
        }
    }
}

/// [`Settings`] after [`Settings::check`]: every value within bounds, defaults applied.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Checked {
    frames: usize,
    height: usize,
    width: usize,
    steps: usize,
    guidance: f32,
    lora_scale: f32,
    /// `None` when the engine gives no text length and none was asked for (only prompt text
    /// needs one: [`Checked::sequence_length`]).
    max_sequence_length: Option<usize>,
}

/// Longest prompt, in tokens, any front end encodes.
pub const MAX_SEQUENCE_LENGTH: usize = 4096;

/// What an engine contributes to checking a request (plain data, so a server can keep it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EngineDefaults {
    /// The size a request gets when it names none (the DiT's `sample_frames`, the VAE's
    /// `sample_height`/`sample_width`).
    pub frames: Option<usize>,
    pub height: Option<usize>,
    pub width: Option<usize>,
    /// Height and width are multiples of this ([`frame_multiple`]).
    pub multiple: usize,
    /// Tokens prompt text is encoded to by default.
    pub text_sequence_length: Option<usize>,
    /// The only size the DiT runs at (a learned positional table: [`Engine::fixed_size`]).
    pub fixed_size: Option<(usize, usize, usize)>,
    /// Steps the scheduler can take (its `num_train_timesteps`); `None` where the engine has
    /// no readable scheduler (it then fails when generating, with the scheduler's own error).
    pub scheduler_steps: Option<usize>,
}

impl EngineDefaults {
    pub fn of(engine: &Engine) -> EngineDefaults {
        let (frames, height, width) = engine.default_size();
        EngineDefaults {
            frames,
            height,
            width,
            multiple: frame_multiple(engine),
            text_sequence_length: engine.text_sequence_length(),
            fixed_size: engine.fixed_size(),
            scheduler_steps: engine.train_timesteps().ok(),
        }
    }
}

impl Settings {
    /// Checks the settings against `engine` and `limits`, in one fixed order: steps (the
    /// limit, then the scheduler's), guidance, LoRA scale, height / width then frames (given or the engine's default), then the
    /// prompt length.
    pub fn check(&self, engine: &Engine, limits: &Limits) -> Result<Checked, RequestError> {
        self.check_with(&EngineDefaults::of(engine), limits)
    }

    /// What can be checked before an engine is opened, in [`Settings::check`]'s order: steps,
    /// guidance, LoRA scale, and the size limits when height, width and frames are all given
    /// (the multiple the engine's patch size sets comes with the engine).
    pub fn check_alone(&self, limits: &Limits) -> Result<(), RequestError> {
        limits.check_steps(self.steps)?;
        finite(Field::Guidance, self.guidance)?;
        finite(Field::LoraScale, self.lora_scale)?;
        if let (Some(f), Some(h), Some(w)) = (self.frames, self.height, self.width) {
            limits.check_video(f, h, w, 1)?;
        }
        Ok(())
    }

    /// [`Settings::check`] with the engine's defaults already read.
    pub fn check_with(
        &self,
        engine: &EngineDefaults,
        limits: &Limits,
    ) -> Result<Checked, RequestError> {
        self.check_alone(limits)?;
        if let Some(max) = engine.scheduler_steps.filter(|&m| self.steps > m) {
            // Refused before anything loads (it used to fail in `set_timesteps`, after).
            return Err(RequestError::new(
                Field::Steps,
                over_schedule(self.steps, max),
            ));
        }
        let (df, dh, dw) = (engine.frames, engine.height, engine.width);
        let need = |field: Field, given: Option<usize>, default: Option<usize>| {
            given
                .or(default)
                .ok_or_else(|| RequestError::new(field, "required (the engine has no default)"))
        };
        let frames = need(Field::Frames, self.frames, df)?;
        let height = need(Field::Height, self.height, dh)?;
        let width = need(Field::Width, self.width, dw)?;
        limits.check_video(frames, height, width, engine.multiple)?;
        if let Some((f, h, w)) = engine.fixed_size {
            // Refused here, with the request, instead of inside ONNX Runtime mid-job.
            let why = format!("this model's DiT has a learned positional table for {f} frames at {w}x{h} and generates at that size only");
            if (height, width) != (h, w) {
                let field = if height != h {
                    Field::Height
                } else {
                    Field::Width
                };
                return Err(RequestError::new(field, format!("{width}x{height}: {why}")));
            }
            if frames != f {
                return Err(RequestError::new(Field::Frames, format!("{frames}: {why}")));
            }
        }
        let max_sequence_length = match self.max_sequence_length {
            Some(l) => Some(check_sequence_length(l)?),
            None => engine.text_sequence_length,
        };
        Ok(Checked {
            frames,
            height,
            width,
            steps: self.steps,
            guidance: self.guidance,
            lora_scale: self.lora_scale,
            max_sequence_length,
        })
    }
}

/// Why `steps` above the scheduler's training schedule are refused (before anything loads: it
/// used to fail in `set_timesteps`, after).
pub(super) fn over_schedule(steps: usize, max: usize) -> String {
    format!("{steps}: the scheduler takes at most {max} (its num_train_timesteps)")
}

impl Checked {
    pub fn frames(&self) -> usize {
        self.frames
    }
    pub fn height(&self) -> usize {
        self.height
    }
    pub fn width(&self) -> usize {
        self.width
    }
    pub fn steps(&self) -> usize {
        self.steps
    }
    pub fn guidance(&self) -> f32 {
        self.guidance
    }
    /// Upstream's LoRA weight for a LoRA predicted from a reference clip.
    pub fn lora_scale(&self) -> f32 {
        self.lora_scale
    }
    /// The prompt length asked for, or the engine's.
    pub fn max_sequence_length(&self) -> Option<usize> {
        self.max_sequence_length
    }

    /// The tokens to encode prompt text to.
    pub fn sequence_length(&self) -> Result<usize, RequestError> {
        self.max_sequence_length.ok_or_else(|| {
            RequestError::new(
                Field::MaxSequenceLength,
                "required (the engine has no DiT to take it from)",
            )
        })
    }

    /// The initial latent noise of this request's size from `seed` (v2l's one generator):
    /// the same seed gives the same video from every front end.
    pub fn seeded_noise(&self, engine: &Engine, seed: u64) -> crate::Result<crate::Tensor> {
        engine.seeded_noise(self.frames, self.height, self.width, seed)
    }
}

/// The one frame-size rule: height and width are multiples of the VAE's spatial stride (8)
/// times the DiT's patch size (16 for CogVideoX and Wan).
pub fn frame_multiple(engine: &Engine) -> usize {
    let patch = engine
        .manifest
        .dit
        .as_ref()
        .map_or(2, |d| d.patch_size.max(1));
    v2l_contracts::latent::SPACE_STRIDE * patch
}

pub use crate::limits::{bounded, MAX_SCALE};

/// `v` when finite and within ±[`MAX_SCALE`]: NaN or ±inf in a guidance or scale would
/// silently spoil every frame, and so would 3e38, which is finite but overflows.
pub fn finite(field: Field, v: f32) -> Result<f32, RequestError> {
    bounded(v).map_err(|m| RequestError::new(field, m))
}

/// A prompt length in `1..=MAX_SEQUENCE_LENGTH`.
pub fn check_sequence_length(len: usize) -> Result<usize, RequestError> {
    match (1..=MAX_SEQUENCE_LENGTH).contains(&len) {
        true => Ok(len),
        false => Err(RequestError::new(
            Field::MaxSequenceLength,
            format!("{len}: must be 1 to {MAX_SEQUENCE_LENGTH}"),
        )),
    }
}

/// Frames per second of a written mp4, `1..=240`.
pub fn check_fps(fps: u32) -> Result<u32, RequestError> {
    match (1..=240).contains(&fps) {
        true => Ok(fps),
        false => Err(RequestError::new(
            Field::Fps,
            format!("{fps}: must be 1 to 240"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_have_one_name_per_front_end() {
        assert_eq!(Field::LoraScale.name(), "lora_scale");
        assert_eq!(Field::LoraScale.flag(), "--lora-scale");
        assert_eq!(Field::Size.flag(), "--height/--width");
        assert_eq!(Field::MaxSequenceLength.flag(), "--max-sequence-length");
        let e = RequestError {
            over_limit: true,
            ..RequestError::new(Field::Frames, "300 is over the limit of 257")
        };
        assert_eq!(
            e.to_string(),
            "frames: 300 is over the limit of 257 (raise it with V2L_MAX_FRAMES)"
        );
        assert_eq!(
            finite(Field::Guidance, f32::NAN).unwrap_err().message,
            "NaN is not a finite number"
        );
        assert_eq!(
            finite(Field::Guidance, 3e38).unwrap_err().message,
            "3e38 is outside ±1e4"
        );
        assert_eq!(finite(Field::Guidance, -1e4).unwrap(), -1e4);
        use crate::predict::check_reference_weight;
        assert_eq!(check_reference_weight(-1000.0).unwrap(), -1000.0);
        for w in [1000.5, 1001.0, 1e4, f32::NAN] {
            let e = check_reference_weight(w).unwrap_err();
            assert_eq!(e.field, Field::LoraScale, "{w}");
        }
        assert!(check_sequence_length(0).is_err() && check_sequence_length(4097).is_err());
        assert!(check_fps(0).is_err() && check_fps(240).is_ok());
    }
}
