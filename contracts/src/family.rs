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
    pub fn dit_class(self) -> &'static str {
        match self {
            Family::CogVideoX => "CogVideoXTransformer3DModel",
            Family::Wan => "WanTransformer3DModel",
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
}
