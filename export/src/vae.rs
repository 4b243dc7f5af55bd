//! The VAE of whichever architecture a checkpoint holds, by its `config.json` `_class_name`:
//! callers (`v2l-export vae`, the pipeline export) need no per-architecture code. Both VAEs
//! share one graph contract (per-batch graphs with `cache_in.*` → `cache_out.*`); the manifest
//! entry says how the runtime cuts a clip into batches and normalises latents.

use v2l_graphs::Graph;

use crate::checkpoint::Checkpoint;
use crate::error::{ExportError, Result};
use crate::manifest::VaeEntry;
use crate::{cogvideox_vae, wan_vae};

/// The two graphs of an exported VAE and their manifest entry.
pub struct ExportedVae {
    pub encoder: Graph,
    pub decoder: Graph,
    pub class_name: &'static str,
    pub unused_keys: Vec<String>,
    entry: VaeEntry,
}

impl ExportedVae {
    /// The manifest entry for the graphs written to `encoder` and `decoder`.
    pub fn manifest_entry(&self, encoder: &str, decoder: &str) -> VaeEntry {
        VaeEntry {
            encoder: encoder.into(),
            decoder: decoder.into(),
            ..self.entry.clone()
        }
    }

    /// Causal-conv caches of the encoder and the decoder.
    pub fn cache_counts(&self) -> (usize, usize) {
        (
            self.entry.encoder_caches.len(),
            self.entry.decoder_caches.len(),
        )
    }
}

/// Exports `AutoencoderKLCogVideoX` or `AutoencoderKLWan`.
pub fn export(ckpt: &Checkpoint) -> Result<ExportedVae> {
    export_for(ckpt, None)
}

/// [`export`] for the pipeline that decodes with it: VideoX-Fun's inpaint pipeline runs the
/// CogVideoX VAE with its own decode loop ([`cogvideox_vae::DecodeLoop::Fun`]).
pub fn export_for(
    ckpt: &Checkpoint,
    kind: Option<v2l_contracts::PipelineKind>,
) -> Result<ExportedVae> {
    let raw = ckpt.raw_config()?.clone();
    let class = raw
        .get("_class_name")
        .and_then(|v| v.as_str())
        .unwrap_or_default()
        .to_string();
    match class.as_str() {
        cogvideox_vae::CLASS_NAME => {
            let decode = match kind {
                Some(v2l_contracts::PipelineKind::CogvideoxFunInpaint) => {
                    cogvideox_vae::DecodeLoop::Fun
                }
                _ => cogvideox_vae::DecodeLoop::Diffusers,
            };
            let ex = cogvideox_vae::export_for(ckpt, decode)?;
            let entry = ex.manifest_entry("", "", raw);
            Ok(ExportedVae {
                encoder: ex.encoder,
                decoder: ex.decoder,
                class_name: cogvideox_vae::CLASS_NAME,
                unused_keys: ex.unused_keys,
                entry,
            })
        }
        wan_vae::CLASS_NAME => {
            let ex = wan_vae::export(ckpt)?;
            let entry = ex.manifest_entry("", "", raw);
            Ok(ExportedVae {
                encoder: ex.encoder,
                decoder: ex.decoder,
                class_name: wan_vae::CLASS_NAME,
                unused_keys: ex.unused_keys,
                entry,
            })
        }
        other => Err(ExportError::Unsupported {
            path: ckpt.dir().join("config.json"),
            what: format!(
                "VAE class `{other}` (supported: {}, {})",
                cogvideox_vae::CLASS_NAME,
                wan_vae::CLASS_NAME
            ),
        }),
    }
}
