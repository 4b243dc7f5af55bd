//! The model families v2l runs, told apart by a checkpoint's `_class_name` in one place.

use serde::{Deserialize, Serialize};

/// A DiT family: which exporter builds it and which sampler the runtime drives it with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// `CogVideoXTransformer3DModel`: DDIM, `[B, F, C, H, W]` latents.
    CogVideoX,
    /// `WanTransformer3DModel` (Wan2.1): flow sampler, `[B, C, F, H, W]` latents.
    Wan,
}

impl Family {
    /// Every family, for messages that list them.
    pub const ALL: [Family; 2] = [Family::CogVideoX, Family::Wan];

    /// The diffusers transformer class of this family.
    pub const fn dit_class(self) -> &'static str {
        match self {
            Family::CogVideoX => "CogVideoXTransformer3DModel",
            Family::Wan => "WanTransformer3DModel",
        }
    }

    /// The diffusers VAE class of this family.
    pub const fn vae_class(self) -> &'static str {
        match self {
            Family::CogVideoX => "AutoencoderKLCogVideoX",
            Family::Wan => "AutoencoderKLWan",
        }
    }

    /// The family of a diffusers transformer class; `None` for a class v2l does not run.
    pub fn of_dit_class(class: &str) -> Option<Family> {
        Family::ALL.into_iter().find(|f| f.dit_class() == class)
    }

    /// The family of a transformer `config.json` (its `_class_name`).
    pub fn of_dit_config(config: &serde_json::Value) -> Option<Family> {
        config
            .get("_class_name")
            .and_then(|v| v.as_str())
            .and_then(Family::of_dit_class)
    }
}

/// What a pipeline feeds its DiT and how it samples: one value per deployable pipeline, stored
/// in the manifest and the bundle so no stage guesses it from channel counts again.
///
/// Why a type: the DiT's input channels say which conditioning it was trained on, and the
/// conditioning, the sampler default and the VAE's decode batching all follow from it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PipelineKind {
    /// diffusers' `CogVideoXImageToVideoPipeline`: `[noisy C | first-frame latents C]`.
    CogvideoxI2v,
    /// VideoX-Fun's `CogVideoXFunInpaintPipeline` (the Video2LoRA release's backbone,
    /// CogVideoX-Fun-V1.1-InP): `[noisy C | mask 1 | masked-video latents C]`.
    CogvideoxFunInpaint,
    /// Wan2.1 text-to-video: the noisy latents alone.
    WanT2v,
    /// Wan2.1 image-to-video: `[noisy C | mask 4 | first-frame video latents C]` and CLIP tokens.
    WanI2v,
}

impl PipelineKind {
    pub const ALL: [PipelineKind; 4] = [
        PipelineKind::CogvideoxI2v,
        PipelineKind::CogvideoxFunInpaint,
        PipelineKind::WanT2v,
        PipelineKind::WanI2v,
    ];

    /// The name in manifests, bundles and messages (`cogvideox-fun-inpaint`).
    pub fn name(self) -> &'static str {
        match self {
            PipelineKind::CogvideoxI2v => "cogvideox-i2v",
            PipelineKind::CogvideoxFunInpaint => "cogvideox-fun-inpaint",
            PipelineKind::WanT2v => "wan-t2v",
            PipelineKind::WanI2v => "wan-i2v",
        }
    }

    pub fn family(self) -> Family {
        match self {
            PipelineKind::CogvideoxI2v | PipelineKind::CogvideoxFunInpaint => Family::CogVideoX,
            PipelineKind::WanT2v | PipelineKind::WanI2v => Family::Wan,
        }
    }

    /// Whether a request must give a first frame (every kind but text-to-video).
    pub fn takes_image(self) -> bool {
        self != PipelineKind::WanT2v
    }

    /// Channels the DiT reads after the `latent` noisy channels.
    pub fn conditioning_channels(self, latent: usize) -> usize {
        match self {
            PipelineKind::CogvideoxI2v => latent,
            PipelineKind::CogvideoxFunInpaint => latent + 1,
            PipelineKind::WanT2v => 0,
            PipelineKind::WanI2v => latent + 4,
        }
    }

    /// The kind a DiT of `family` with `in_channels` inputs implies next to a VAE of `latent`
    /// channels, as upstream decides it (VideoX-Fun's `predict_i2v.py` picks the inpaint
    /// pipeline when the transformer's `in_channels` differs from the VAE's
    /// `latent_channels`). Any other count is an error naming it.
    pub fn detect(
        family: Family,
        in_channels: usize,
        latent: usize,
    ) -> Result<PipelineKind, String> {
        let kinds = PipelineKind::ALL
            .into_iter()
            .filter(|k| k.family() == family);
        let mut expected = Vec::new();
        for kind in kinds {
            let want = latent + kind.conditioning_channels(latent);
            if want == in_channels {
                return Ok(kind);
            }
            expected.push(format!("{want} ({})", kind.name()));
        }
        Err(format!(
            "a {} transformer with in_channels = {in_channels} next to a VAE of {latent} latent channels is no pipeline v2l runs (expected {})",
            family.dit_class(),
            expected.join(" or ")
        ))
    }
}

impl std::fmt::Display for PipelineKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The sampler a CogVideoX-family request runs (`--scheduler`). Wan pipelines use their own
/// flow sampler and take none of these.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Sampler {
    /// diffusers' plain `DDIMScheduler` on the model's scheduler config (VideoX-Fun's
    /// `DDIM_Origin`, what Video2LoRA's `run_predict_i2v.sh` runs). It ignores `snr_shift_scale`.
    Ddim,
    /// diffusers' `CogVideoXDDIMScheduler` (the stock CogVideoX pipelines' sampler).
    CogvideoxDdim,
    /// diffusers' `CogVideoXDPMScheduler`, what CogVideoX's authors recommend for 5B: a
    /// second-order DPM-Solver++ step on the same schedule, which draws fresh noise every step
    /// (from the request's seed in v2l).
    Dpm,
}

impl Sampler {
    pub const ALL: [Sampler; 3] = [Sampler::Ddim, Sampler::CogvideoxDdim, Sampler::Dpm];

    pub fn name(self) -> &'static str {
        match self {
            Sampler::Ddim => "ddim",
            Sampler::CogvideoxDdim => "cogvideox-ddim",
            Sampler::Dpm => "dpm",
        }
    }

    /// The default of each kind, as its upstream pipeline script sets it; `None` for Wan.
    pub fn default_for(kind: PipelineKind) -> Option<Sampler> {
        match kind {
            PipelineKind::CogvideoxI2v => Some(Sampler::CogvideoxDdim),
            PipelineKind::CogvideoxFunInpaint => Some(Sampler::Ddim),
            PipelineKind::WanT2v | PipelineKind::WanI2v => None,
        }
    }
}

impl std::str::FromStr for Sampler {
    type Err = String;
    fn from_str(s: &str) -> Result<Sampler, String> {
        Sampler::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Sampler::ALL.iter().map(|k| k.name()).collect();
                format!("unknown scheduler `{s}` (one of: {})", names.join(", "))
            })
    }
}

impl std::fmt::Display for Sampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The `config.json` fields the graph depends on (defaults: `WanTransformer3DModel.__init__`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct WanDitConfig {
    pub patch_size: Vec<usize>,
    pub num_attention_heads: usize,
    pub attention_head_dim: usize,
    pub in_channels: usize,
    pub out_channels: Option<usize>,
    pub text_dim: usize,
    pub freq_dim: usize,
    pub ffn_dim: usize,
    pub num_layers: usize,
    pub cross_attn_norm: bool,
    pub qk_norm: Option<String>,
    pub eps: f32,
    pub image_dim: Option<usize>,
    pub added_kv_proj_dim: Option<usize>,
    pub rope_max_seq_len: usize,
    pub pos_embed_seq_len: Option<usize>,
}

impl Default for WanDitConfig {
    fn default() -> Self {
        WanDitConfig {
            patch_size: vec![1, 2, 2],
            num_attention_heads: 40,
            attention_head_dim: 128,
            in_channels: 16,
            out_channels: None,
            text_dim: 4096,
            freq_dim: 256,
            ffn_dim: 13824,
            num_layers: 40,
            cross_attn_norm: true,
            qk_norm: Some("rms_norm_across_heads".into()),
            eps: 1e-6,
            image_dim: None,
            added_kv_proj_dim: None,
            rope_max_seq_len: 1024,
            pos_embed_seq_len: None,
        }
    }
}

impl WanDitConfig {
    /// From a transformer `config.json` (missing fields: diffusers' defaults).
    pub fn from_config(config: &serde_json::Value) -> Result<WanDitConfig, serde_json::Error> {
        WanDitConfig::deserialize(config)
    }

    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }
    pub fn out_channels(&self) -> usize {
        self.out_channels.unwrap_or(self.in_channels)
    }
    /// `(p_t, p_h, p_w)`.
    pub fn patch(&self) -> (usize, usize, usize) {
        match self.patch_size[..] {
            [t, h, w] => (t, h, w),
            _ => (1, 2, 2),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_names_round_trip_and_unknown_classes_are_none() {
        for f in Family::ALL {
            assert_eq!(Family::of_dit_class(f.dit_class()), Some(f));
        }
        assert_eq!(Family::of_dit_class("UNet2DConditionModel"), None);
        let cfg = serde_json::json!({"_class_name": "WanTransformer3DModel"});
        assert_eq!(Family::of_dit_config(&cfg), Some(Family::Wan));
        assert_eq!(Family::of_dit_config(&serde_json::json!({})), None);
    }

    #[test]
    fn pipeline_kinds_follow_upstream_channel_rules() {
        let d = PipelineKind::detect;
        assert_eq!(d(Family::CogVideoX, 32, 16), Ok(PipelineKind::CogvideoxI2v));
        assert_eq!(
            d(Family::CogVideoX, 33, 16),
            Ok(PipelineKind::CogvideoxFunInpaint)
        );
        assert_eq!(d(Family::Wan, 16, 16), Ok(PipelineKind::WanT2v));
        assert_eq!(d(Family::Wan, 36, 16), Ok(PipelineKind::WanI2v));
        let e = d(Family::CogVideoX, 16, 16).unwrap_err();
        assert!(
            e.contains("in_channels = 16") && e.contains("33 (cogvideox-fun-inpaint)"),
            "{e}"
        );
        for k in PipelineKind::ALL {
            let json = serde_json::to_string(&k).unwrap();
            assert_eq!(json, format!("\"{}\"", k.name()));
        }
        assert_eq!(
            "dpm-x".parse::<Sampler>().unwrap_err(),
            "unknown scheduler `dpm-x` (one of: ddim, cogvideox-ddim, dpm)"
        );
        assert_eq!("ddim".parse::<Sampler>(), Ok(Sampler::Ddim));
    }
}
