//! A job's validated parameters, as the form checked them and the store keeps them: typed from
//! the form to the worker, stored as a versioned record.

use serde::{Deserialize, Serialize};

/// What a job does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// First frame (+ LoRA) → video.
    Video,
    /// Reference clip → predicted LoRA.
    Lora,
}

impl Kind {
    /// Its name in the job database (as serde writes it).
    pub(crate) fn name(self) -> &'static str {
        match self {
            Kind::Video => "video",
            Kind::Lora => "lora",
        }
    }

    /// The kind the database names; anything else was written as a video job.
    pub(crate) fn parse(name: &str) -> Kind {
        if name == Kind::Lora.name() {
            Kind::Lora
        } else {
            Kind::Video
        }
    }
}

/// Which LoRA a video job runs with.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum LoraChoice {
    /// The base weights.
    None,
    /// A stored LoRA (uploaded or predicted earlier) at multiplier `scale`.
    Stored { id: String, scale: f32 },
    /// A reference clip's LoRA, predicted on a cache miss from the job's decoded clip.
    Reference { id: String, weight: f32 },
}

/// A video job's checked parameters (stored with the job).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VideoParams {
    pub frames: usize,
    pub height: usize,
    pub width: usize,
    pub steps: usize,
    pub guidance: f32,
    pub seed: u64,
    pub fps: u32,
    /// Prompt text; `None` when the job carries prompt embeddings.
    pub prompt: Option<String>,
    pub negative_prompt: String,
    pub max_sequence_length: usize,
    pub lora: LoraChoice,
    /// A CogVideoX engine's sampler (`None`: the engine's default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduler: Option<v2l_runtime::pipeline::Sampler>,
    /// Step caching as the form gave it, checked (`first-block:THRESHOLD`; `None`: off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<String>,
}

#[cfg(test)]
impl VideoParams {
    /// A valid job: 17 frames of 64×64, 2 steps, a prompt, no LoRA.
    pub fn sample() -> VideoParams {
        VideoParams {
            frames: 17,
            height: 64,
            width: 64,
            steps: 2,
            guidance: 6.0,
            seed: 0,
            fps: 8,
            prompt: Some("a red car".into()),
            negative_prompt: String::new(),
            max_sequence_length: 16,
            lora: LoraChoice::None,
            scheduler: None,
            cache: None,
        }
    }
}

/// A LoRA job's checked parameters: predict `id` from the job's decoded reference clip.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoraParams {
    pub id: String,
    pub weight: f32,
}

/// A job's validated request: the form's parameters for its kind. Stored as a versioned record
/// ([`PARAMS_VERSION`]) and read back typed by the worker, with no untyped step between.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum JobParams {
    Video(VideoParams),
    Lora(LoraParams),
}

impl JobParams {
    pub fn kind(&self) -> Kind {
        match self {
            JobParams::Video(_) => Kind::Video,
            JobParams::Lora(_) => Kind::Lora,
        }
    }
}

/// The version of the stored parameter record. Records written before it was versioned read as
/// version 0, which has the same fields; a newer version is refused, naming the job.
pub const PARAMS_VERSION: u32 = 1;

/// The parameter record as the database stores it.
#[derive(Serialize, Deserialize)]
struct StoredParams<T> {
    #[serde(default)]
    version: u32,
    #[serde(flatten)]
    params: T,
}

impl JobParams {
    pub(crate) fn to_record(&self) -> serde_json::Result<String> {
        match self {
            JobParams::Video(p) => serde_json::to_string(&StoredParams {
                version: PARAMS_VERSION,
                params: p,
            }),
            JobParams::Lora(p) => serde_json::to_string(&StoredParams {
                version: PARAMS_VERSION,
                params: p,
            }),
        }
    }

    /// The parameters of a job of `kind` from their record, or what is wrong with it.
    pub(crate) fn from_record(kind: Kind, text: &str) -> Result<JobParams, String> {
        fn read<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, String> {
            let r: StoredParams<T> = serde_json::from_str(text).map_err(|e| e.to_string())?;
            match r.version {
                0 | PARAMS_VERSION => Ok(r.params),
                v => Err(format!(
                    "stored as version {v} by a newer server; this one reads up to {PARAMS_VERSION}"
                )),
            }
        }
        Ok(match kind {
            Kind::Video => JobParams::Video(read(text)?),
            Kind::Lora => JobParams::Lora(read(text)?),
        })
    }
}
