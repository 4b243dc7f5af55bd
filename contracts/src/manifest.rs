//! `manifest.json` of an export directory: which graphs it holds and what they need.
//!
//! Each `v2l-export` subcommand adds its component to the manifest in the output directory,
//! so `dit`, `vae` and `hypernet` can be exported one at a time into one directory. The
//! runtime reads it to find graphs, LoRA targets and the VAE's batching contract.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::frame_batch::{CacheSpec, FrameSchedule};
use crate::LinearInfo;

/// Why a manifest could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// Results of reading and writing manifests.
pub type Result<T> = std::result::Result<T, ManifestError>;

pub const FILE_NAME: &str = "manifest.json";
/// Bumped when a field changes meaning; readers refuse other versions.
pub const FORMAT_VERSION: u32 = 1;

/// `manifest.json`: the graphs of an export directory and what the runtime needs to drive them.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    /// The pipeline the export deploys, written by `v2l-export pipeline` (older manifests and
    /// single-part exports: derived by [`Manifest::pipeline_kind`] with the same rule).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipeline: Option<crate::PipelineKind>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dit: Option<DitEntry>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vae: Option<VaeEntry>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hypernet: Option<HypernetEntry>,
    /// The Prompt2Effect hypernetwork (effect prompt + base weights → LoRA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt2effect: Option<Prompt2EffectEntry>,
    /// The LoFA hypernetwork's two stages (prompt + base weights → LoRA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lofa: Option<LofaEntry>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text_encoder: Option<TextEncoderEntry>,
    /// The I2V image encoder (Wan: CLIP vision).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_encoder: Option<ImageEncoderEntry>,
    /// The diffusers `scheduler_config.json`, copied into the directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduler: Option<String>,
}

/// The exported prompt encoder: `input_ids [B, L]` int64 → `prompt_embeds [B, L, d_model]`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TextEncoderEntry {
    pub file: String,
    /// transformers `model_type` (`t5`).
    pub model_type: String,
    pub d_model: usize,
    pub vocab_size: usize,
    /// The tokenizer's files, copied from the model's `tokenizer/` into this subdirectory
    /// (empty: none exported).
    #[serde(default)]
    pub tokenizer: String,
    /// Storage type of the weights in the graph (it computes in f32).
    #[serde(default = "f32_name")]
    pub weight_dtype: crate::dtype::DType,
    /// The `config.json` the graph was built from, verbatim.
    pub config: serde_json::Value,
}

/// The exported image encoder: `pixel_values [B, 3, S, S]` (the CLIP image processor's
/// output) → `image_embeds [B, tokens, hidden_size]`, the penultimate layer's hidden states.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ImageEncoderEntry {
    pub file: String,
    /// transformers `model_type` (`clip_vision_model`).
    pub model_type: String,
    pub hidden_size: usize,
    pub image_size: usize,
    #[serde(default = "f32_name")]
    pub weight_dtype: crate::dtype::DType,
    /// The `CLIPImageProcessor` `preprocessor_config.json` copied from the pipeline's
    /// `image_processor/` (empty: CLIP's defaults at `image_size`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub preprocessor: String,
    /// The `config.json` the graph was built from, verbatim.
    pub config: serde_json::Value,
}

fn f32_name() -> crate::dtype::DType {
    crate::dtype::DType::F32
}

/// The exported Video2LoRA hypernetwork and the LiLoRA auxiliaries that turn its rows into LoRAs.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HypernetEntry {
    pub file: String,
    pub dims: HypernetDims,
    /// The LiLoRA auxiliaries, copied into the export directory.
    pub lilora: String,
    /// LiLoRA `a` (rows of `down_aux`) and `b` (columns of `up_aux`): D = (a + b) · r.
    pub lilora_a: usize,
    pub lilora_b: usize,
    /// Module paths of the DiT layers the rows map to, in row order.
    pub layers: Vec<String>,
}

/// The exported Prompt2Effect hypernetwork: `text [1, T, E]`, `base_weight [N, D, D]`,
/// `layer_index [N]`, `module_index [N]` → `lora_A [N, r, D]`, `lora_B [N, D, r]` (scale 1).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Prompt2EffectEntry {
    pub file: String,
    /// E: the width of the prompt embeddings it reads.
    pub text_dim: usize,
    /// D: the side of the square weights it adapts.
    pub weight_dim: usize,
    pub rank: usize,
    /// d: its width (sizes the activations of a chunk of layers).
    pub hidden_dim: usize,
    /// Rows of its layer-embedding table (upstream clamps the block index to it).
    pub max_layers: usize,
    /// Module types in id order (id = position + 1; 0 is unknown), in the reproduction's
    /// naming (`self_attn.q`, `cross_attn.k`, …).
    pub module_types: Vec<String>,
}

/// The exported LoFA stages: stage 1 `text [1, T, C]`, `base_weight [N, n, n]`,
/// `depth_index [N]`, `type_index [N]` → `hidden [N, tokens, D]`; stage 2 the same and
/// `prior` (stage 1's hidden states) → `lora_A [N, r, n]`, `lora_B [N, n, r]` (alpha folded in,
/// scale 1), `alpha [N]`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LofaEntry {
    pub stage1: String,
    pub stage2: String,
    /// C: the width of the prompt embeddings it reads.
    pub text_dim: usize,
    /// n: the side of the square weights it adapts.
    pub weight_dim: usize,
    pub rank: usize,
    /// D and the tokens per layer (size the activations of a chunk of layers).
    pub d_model: usize,
    pub tokens: usize,
    /// Rows of the depth table (the block index is clamped to it).
    pub num_depth: usize,
    /// Layer types in id order (id = position, from 0), in the Wan repo's naming; the authors'
    /// `VALID_LAYERS`.
    pub module_types: Vec<String>,
}

/// The exported VAE: two per-frame-batch graphs and the loop contract between them.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VaeEntry {
    pub encoder: String,
    pub decoder: String,
    pub class_name: String,
    pub scaling_factor: f64,
    pub latent_channels: usize,
    pub in_channels: usize,
    /// Frames per encoder batch (diffusers' `num_sample_frames_batch_size`).
    pub encoder_frame_batch: usize,
    /// Latent frames per decoder batch (diffusers' `num_latent_frames_batch_size`).
    pub decoder_frame_batch: usize,
    pub encoder_caches: Vec<CacheSpec>,
    pub decoder_caches: Vec<CacheSpec>,
    /// How a clip is cut into those batches (CogVideoX: remainder first; Wan: first frame alone).
    #[serde(default)]
    pub frame_schedule: FrameSchedule,
    /// The decoder's own schedule where it differs from the encoder's (VideoX-Fun's CogVideoX
    /// VAE: [`FrameSchedule::FirstThenBatches`]); `None`: `frame_schedule`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decoder_schedule: Option<FrameSchedule>,
    /// Video frames per latent frame (`1 + (f - 1)·t` frames for `f` latents, Wan's rule).
    #[serde(default = "four")]
    pub temporal_compression: usize,
    /// Per-channel latent statistics (Wan's `latents_mean`/`latents_std`): the pipelines
    /// normalise latents as `(z - mean) / std` instead of multiplying by `scaling_factor`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub latents_mean: Vec<f64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub latents_std: Vec<f64>,
    /// The `config.json` the graphs were built from, verbatim.
    pub config: serde_json::Value,
}

fn four() -> usize {
    4
}

impl VaeEntry {
    /// The encoder's `(start, end)` frame batches for a clip of `frames` frames.
    pub fn encoder_batches(
        &self,
        frames: usize,
    ) -> std::result::Result<Vec<(usize, usize)>, String> {
        self.frame_schedule
            .batches(frames, self.encoder_frame_batch)
    }

    /// The decoder's `(start, end)` latent-frame batches for `latent_frames` latents.
    pub fn decoder_batches(
        &self,
        latent_frames: usize,
    ) -> std::result::Result<Vec<(usize, usize)>, String> {
        self.decoder_schedule()
            .batches(latent_frames, self.decoder_frame_batch)
    }

    /// How the decoder cuts latents into batches.
    pub fn decoder_schedule(&self) -> FrameSchedule {
        self.decoder_schedule.unwrap_or(self.frame_schedule)
    }

    /// Frames the decoder returns for `latent_frames` latents.
    pub fn decoded_frames(&self, latent_frames: usize) -> usize {
        match self.decoder_schedule() {
            FrameSchedule::RemainderFirst => crate::frame_batch::decoded_frames(
                latent_frames,
                self.decoder_frame_batch,
                self.temporal_compression.max(1).ilog2() as usize,
            ),
            FrameSchedule::FirstAlone | FrameSchedule::FirstThenBatches => match latent_frames {
                0 => 0,
                n => 1 + (n - 1) * self.temporal_compression,
            },
        }
    }
}

/// The exported transformer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DitEntry {
    pub file: String,
    pub class_name: String,
    /// Storage type of the weights in the graph (the graph computes in f32).
    pub weight_dtype: crate::dtype::DType,
    pub patch_size: usize,
    pub attention_head_dim: usize,
    pub in_channels: usize,
    pub out_channels: usize,
    pub text_embed_dim: usize,
    /// The `config.json` the graph was built from, verbatim.
    pub config: serde_json::Value,
    /// Every `nn.Linear` in module order: initializer `<name>.weight` of shape `[out, in]`.
    pub lora_targets: Vec<LinearInfo>,
}

/// An integer of a model's config (`sample_frames`, `max_text_seq_length`), if it holds one:
/// the one reader of configs' sizes.
pub fn config_usize(config: &serde_json::Value, key: &str) -> Option<usize> {
    config.get(key)?.as_u64().map(|v| v as usize)
}

impl DitEntry {
    /// The DiT's family, or an error naming a class this v2l does not run (an export from a
    /// newer v2l, or an edited manifest): never a guess.
    pub fn family(&self) -> std::result::Result<crate::Family, String> {
        crate::Family::of_dit_class(&self.class_name).ok_or_else(|| {
            let known: Vec<&str> = crate::Family::ALL.iter().map(|f| f.dit_class()).collect();
            format!(
                "`dit.class_name` is `{}`, a transformer this v2l does not run (it runs {})",
                self.class_name,
                known.join(", ")
            )
        })
    }
}

impl Manifest {
    /// Reads `dir/manifest.json`, or an empty manifest if there is none.
    pub fn read_or_default(dir: &Path) -> Result<Manifest> {
        let path = dir.join(FILE_NAME);
        if !path.exists() {
            return Ok(Manifest {
                format_version: FORMAT_VERSION,
                ..Default::default()
            });
        }
        Self::read(dir)
    }

    /// Reads `dir/manifest.json`, checking its format version.
    pub fn read(dir: &Path) -> Result<Manifest> {
        let path = dir.join(FILE_NAME);
        let text =
            crate::input::read_text(&path, crate::input::InputKind::Record).map_err(|source| {
                ManifestError::Io {
                    path: path.clone(),
                    source,
                }
            })?;
        Self::parse(&text, &path)
    }

    /// Parses `manifest.json` text (`path` names it in errors), checking its format version.
    /// Untrusted input: fuzzed (`fuzz/fuzz_targets/manifest.rs`).
    pub fn parse(text: &str, path: &Path) -> Result<Manifest> {
        let path = path.to_path_buf();
        let m: Manifest = serde_json::from_str(text).map_err(|e| ManifestError::Invalid {
            path: path.clone(),
            message: e.to_string(),
        })?;
        if m.format_version != FORMAT_VERSION {
            return Err(ManifestError::Invalid {
                path,
                message: format!(
                    "format version {} (this v2l reads {FORMAT_VERSION}); export again",
                    m.format_version
                ),
            });
        }
        if let Some((field, name)) = m
            .parts()
            .into_iter()
            .find(|(_, name)| !crate::input::is_part_name(name))
        {
            return Err(ManifestError::Invalid {
                path,
                message: format!(
                    "`{field}` names `{name}`, not a file inside the export directory"
                ),
            });
        }
        Ok(m)
    }

    /// The pipeline this export deploys: the recorded kind, checked against the DiT's input
    /// channels and the VAE's latent channels (the DiT's output channels when there is no
    /// VAE), or, for a manifest that records none, the kind those channels imply.
    pub fn pipeline_kind(&self) -> std::result::Result<crate::PipelineKind, String> {
        let dit = self.dit.as_ref().ok_or_else(|| {
            "holds no DiT; export it with `v2l-export dit` or `pipeline`".to_string()
        })?;
        let family = dit.family()?;
        let latent = self
            .vae
            .as_ref()
            .map_or(dit.out_channels, |v| v.latent_channels);
        let derived = crate::PipelineKind::detect(family, dit.in_channels, latent)?;
        match self.pipeline {
            Some(k) if k != derived => Err(format!(
                "`pipeline` is `{k}`, but the DiT's {} input channels next to {latent} latent channels make it `{derived}`",
                dit.in_channels
            )),
            _ => Ok(derived),
        }
    }

    /// Every path this manifest names, with the field naming it: graphs, side files, the
    /// tokenizer's directory. All are inside the export directory ([`Manifest::parse`] checks
    /// it), and a compiled engine lists each in its bundle's hashed files.
    pub fn parts(&self) -> Vec<(&'static str, &str)> {
        let mut v: Vec<(&'static str, &str)> = Vec::new();
        if let Some(d) = &self.dit {
            v.push(("dit.file", &d.file));
        }
        if let Some(e) = &self.vae {
            v.push(("vae.encoder", &e.encoder));
            v.push(("vae.decoder", &e.decoder));
        }
        if let Some(t) = &self.text_encoder {
            v.push(("text_encoder.file", &t.file));
            if !t.tokenizer.is_empty() {
                v.push(("text_encoder.tokenizer", &t.tokenizer));
            }
        }
        if let Some(i) = &self.image_encoder {
            v.push(("image_encoder.file", &i.file));
            if !i.preprocessor.is_empty() {
                v.push(("image_encoder.preprocessor", &i.preprocessor));
            }
        }
        if let Some(p) = &self.prompt2effect {
            v.push(("prompt2effect.file", &p.file));
        }
        if let Some(l) = &self.lofa {
            v.push(("lofa.stage1", &l.stage1));
            v.push(("lofa.stage2", &l.stage2));
        }
        if let Some(h) = &self.hypernet {
            v.push(("hypernet.file", &h.file));
            v.push(("hypernet.lilora", &h.lilora));
        }
        if let Some(s) = &self.scheduler {
            v.push(("scheduler", s));
        }
        v
    }

    /// Writes `dir/manifest.json` atomically (`tempfile`'s persist: no half-written manifest).
    pub fn write(&self, dir: &Path) -> Result<()> {
        let path = dir.join(FILE_NAME);
        let io = |source| ManifestError::Io {
            path: path.clone(),
            source,
        };
        let text = serde_json::to_string_pretty(self).map_err(|e| ManifestError::Invalid {
            path: path.clone(),
            message: e.to_string(),
        })?;
        crate::atomic::write_atomic(&path, (text + "\n").as_bytes()).map_err(io)?;
        Ok(())
    }
}

/// The sizes of an exported hypernetwork.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HypernetDims {
    /// C: channels of the reference latents.
    pub feature_dim: usize,
    /// D: length of one predicted row, `(a + b) · r`.
    pub weight_dim: usize,
    /// N: number of predicted rows (LiLoRA layers).
    pub num_layers: usize,
    /// Attention heads of every decoder block (head size D / heads).
    pub heads: usize,
    /// Decoder blocks.
    pub blocks: usize,
    /// Refinement iterations unrolled in the graph.
    pub iterations: usize,
    /// L: context tokens (T·H·W of the reference latents) when the checkpoint carries a learned
    /// position table for them (`context_pos_emb [1, L, D]`, not upstream: upstream's context is
    /// a bag of latent vectors without positions, blind to the direction of a motion). `None` =
    /// upstream exactly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_len: Option<usize>,
    /// The context encoder's sizes when the checkpoint has one (`context_encoder.*`, not
    /// upstream): a 3D conv stack that sees the motion between frames, whose rows are added to
    /// the decoder's. `None` = upstream exactly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_encoder: Option<ContextEncoderDims>,
}

/// The sizes of v2l's context encoder (training/video2lora.py `_ContextEncoder`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ContextEncoderDims {
    /// Channels of the 3×3×3 convolutions.
    pub hidden: usize,
    /// (T, H, W) of the reference latents it was trained for: its readout weighs every voxel.
    pub grid: [usize; 3],
}
