//! The fields of a generation request and the error a bad value gives: one contract for the
//! CLI, the C ABI and the server, each of which names a [`Field`] its own way (`--frames`,
//! `params.frames`, the form field `frames`).

use std::fmt;

/// A request field, whatever a front end calls it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Field {
    Frames,
    Height,
    Width,
    /// Height × width together (the pixel limit).
    Size,
    Steps,
    Guidance,
    LoraScale,
    Threads,
    Iterations,
    MaxSequenceLength,
    Fps,
    /// The first frame (the C ABI's `first_frame`).
    Image,
    Scheduler,
    /// The initial noise (or a Fun-InP model's augmentation noise) given instead of a seed.
    Noise,
    Prompt,
    NegativePrompt,
    /// A LoRA file's multiplier.
    LoraWeights,
    PromptEmbeds,
    NegativePromptEmbeds,
    /// Wan I2V: the first frame's CLIP image tokens.
    ImageEmbeds,
    /// Step caching (`first-block:THRESHOLD`).
    Cache,
}

impl Field {
    /// The name in the server's forms and the C ABI's `V2lGenerateParams`: `frames`,
    /// `lora_scale`, `height/width` for the pixel limit.
    pub fn name(self) -> &'static str {
        match self {
            Field::Frames => "frames",
            Field::Height => "height",
            Field::Width => "width",
            Field::Size => "height/width",
            Field::Steps => "steps",
            Field::Guidance => "guidance",
            Field::LoraScale => "lora_scale",
            Field::Threads => "threads",
            Field::Iterations => "iterations",
            Field::MaxSequenceLength => "max_sequence_length",
            Field::Fps => "fps",
            Field::Image => "image",
            Field::Scheduler => "scheduler",
            Field::Noise => "noise",
            Field::Prompt => "prompt",
            Field::NegativePrompt => "negative_prompt",
            Field::LoraWeights => "lora_weights",
            Field::PromptEmbeds => "prompt_embeds",
            Field::NegativePromptEmbeds => "negative_prompt_embeds",
            Field::ImageEmbeds => "image_embeds",
            Field::Cache => "cache",
        }
    }

    /// The command-line flag: `--frames`, `--lora-scale`, `--height/--width`.
    pub fn flag(self) -> String {
        match self {
            Field::Size => "--height/--width".into(),
            // Both prompt tensors come from the one `--prompt-embeds` file.
            Field::NegativePromptEmbeds => "--prompt-embeds (`negative_prompt_embeds`)".into(),
            f => format!("--{}", f.name().replace('_', "-")),
        }
    }

    /// The environment variable that raises this field's limit for the CLI and the C ABI.
    pub fn limit_env(self) -> Option<&'static str> {
        match self {
            Field::Frames => Some("V2L_MAX_FRAMES"),
            Field::Size => Some("V2L_MAX_PIXELS"),
            Field::Steps => Some("V2L_MAX_STEPS"),
            Field::Threads => Some("V2L_MAX_THREADS"),
            Field::Iterations => Some("V2L_MAX_ITERATIONS"),
            _ => None,
        }
    }
}

/// A bad request value: the field at fault and what is wrong with it, in words that do not
/// depend on the front end. `over_limit` marks a value above a limit the operator can raise;
/// each front end says how (an environment variable, a server flag).
#[derive(Clone, Debug, PartialEq)]
pub struct RequestError {
    pub field: Field,
    pub message: String,
    pub over_limit: bool,
}

impl RequestError {
    pub fn new(field: Field, message: impl Into<String>) -> RequestError {
        RequestError {
            field,
            message: message.into(),
            over_limit: false,
        }
    }

    /// The message with how the CLI and the C ABI raise the limit, when it is one.
    pub fn message_with_env_hint(&self) -> String {
        match (self.over_limit, self.field.limit_env()) {
            (true, Some(var)) => format!("{} (raise it with {var})", self.message),
            _ => self.message.clone(),
        }
    }
}

impl fmt::Display for RequestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field.name(), self.message_with_env_hint())
    }
}

impl std::error::Error for RequestError {}

/// Step caching: which DiT calls may reuse the previous call's work. Off unless asked for.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum StepCache {
    /// diffusers' First Block Cache (`FirstBlockCacheConfig`): every call runs the first
    /// transformer block; the other blocks run only when the first block's residual moved by
    /// more than `threshold` (mean absolute change over the mean absolute value of the last
    /// residual that ran them). Otherwise their last residual is added again.
    FirstBlock { threshold: f64 },
}

impl StepCache {
    /// Written as `first-block:THRESHOLD` (the CLI's `--cache`, the C ABI's and the server's
    /// `cache`).
    pub fn describe(self) -> String {
        match self {
            StepCache::FirstBlock { threshold } => format!("first-block:{threshold}"),
        }
    }
}

impl std::str::FromStr for StepCache {
    type Err = RequestError;
    fn from_str(s: &str) -> Result<StepCache, RequestError> {
        let bad = |m: String| RequestError::new(Field::Cache, m);
        let Some(t) = s.strip_prefix("first-block:") else {
            return Err(bad(format!(
                "unknown step cache `{s}`; the one method is `first-block:THRESHOLD` (e.g. first-block:0.1)"
            )));
        };
        match t.parse::<f64>() {
            Ok(threshold) if threshold.is_finite() && threshold >= 0.0 => {
                Ok(StepCache::FirstBlock { threshold })
            }
            _ => Err(bad(format!(
                "the first-block threshold must be a number >= 0, got `{t}`"
            ))),
        }
    }
}

#[cfg(test)]
mod step_cache_tests {
    use super::*;

    #[test]
    fn first_block_thresholds_parse_and_bad_ones_name_the_field() {
        let c: StepCache = "first-block:0.1".parse().unwrap();
        assert_eq!(c, StepCache::FirstBlock { threshold: 0.1 });
        assert_eq!(c.describe(), "first-block:0.1");
        for bad in [
            "first-block:",
            "first-block:-1",
            "first-block:nan",
            "teacache:0.1",
            "",
        ] {
            let e = bad.parse::<StepCache>().unwrap_err();
            assert_eq!(e.field, Field::Cache, "{bad}");
        }
    }
}
