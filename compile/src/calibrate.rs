//! Calibrated (static) int8: runs the fp32 DiT over calibration samples to collect the ranges
//! of the activations entering its quantised linears (`v2l_calibration`), for the Q/DQ graph
//! `v2l-compile --precision int8 --calibration …` writes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use v2l_contracts::io::dit as dit_io;

use v2l_calibration::{Method, Ranges};

use crate::error::{CompileError, Result};
use v2l_runtime::error::RuntimeError;
use v2l_runtime::session::{Model, SessionOptions};
use v2l_runtime::tensor::Tensor;

/// Where calibration samples come from.
#[derive(Clone, Debug, PartialEq)]
pub enum Samples {
    /// `*.safetensors` files of DiT inputs (what `v2l-run stage dit --inputs` reads), in name
    /// order.
    Dir(PathBuf),
    /// `n` generated from the model's config: seeded Gaussian latents and prompt at timesteps
    /// spread from 999 to 0, at the compile-time sample size. Not a denoising trajectory: real
    /// latents mid-generation are closer to data than Gaussian noise.
    Generated(usize),
}

/// How to calibrate.
#[derive(Clone, Debug, PartialEq)]
pub struct Calibration {
    pub samples: Samples,
    pub method: Method,
}

pub use v2l_runtime::bundle::CalibrationRecord;

const INPUTS: [&str; 5] = [
    dit_io::HIDDEN_STATES,
    dit_io::ENCODER_HIDDEN_STATES,
    dit_io::TIMESTEP,
    dit_io::ROPE_COS,
    dit_io::ROPE_SIN,
];

/// The samples, as DiT input maps.
fn samples(cfg: &serde_json::Value, from: &Samples) -> Result<Vec<BTreeMap<String, Tensor>>> {
    match from {
        Samples::Generated(n) => {
            let (size, text) = crate::accuracy::sample_size(cfg);
            (0..*n)
                .map(|k| {
                    let t = 999 - (999 * k / n.saturating_sub(1).max(1)) as i64;
                    // Seeds apart from the accuracy check's (1, 2): that stays out of sample.
                    let feed =
                        crate::accuracy::dit_inputs_at(cfg, size, text, 100 + 2 * k as u64, t)?;
                    Ok(feed.into_iter().collect())
                })
                .collect()
        }
        Samples::Dir(dir) => {
            let bad = |m: String| CompileError::BadFile {
                path: dir.clone(),
                message: m,
            };
            let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
                .map_err(|source| RuntimeError::Io {
                    path: dir.clone(),
                    source,
                })?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
                .collect();
            files.sort();
            if files.is_empty() {
                return Err(bad(
                    "holds no .safetensors calibration samples (DiT inputs: hidden_states, encoder_hidden_states, timestep, rope_cos, rope_sin)".into(),
                ));
            }
            files
                .iter()
                .map(|f| {
                    let t = v2l_runtime::tensor::read_safetensors(f)?;
                    if let Some(missing) = INPUTS.iter().find(|k| !t.contains_key(**k)) {
                        return Err(CompileError::BadFile {
                            path: f.clone(),
                            message: format!("calibration sample has no `{missing}`"),
                        });
                    }
                    Ok(t.into_iter()
                        .filter(|(k, _)| INPUTS.contains(&k.as_str()))
                        .collect())
                })
                .collect()
        }
    }
}

/// How much wider than calibrated the activation range of each attention output projection
/// (`…attn*.to_out.0`, both families' diffusers names) is kept. Its input is the attention's
/// output, whose range follows the values `to_v` makes, so a LoRA on `to_v` moves it past
/// the base model's calibrated range and it clips. Measured on the tiny fixture with its PEFT
/// LoRA (`bin/tests/e2e.rs`, static int8, DiT vs PyTorch fp32, base / LoRA unfused / fused):
/// 4.29e-3 / 1.47e-2 / 1.71e-2 as calibrated; ×2 here 4.47e-3 / 4.90e-3 / 6.06e-3. ×2 on every
/// linear gave 7.60e-3 / 8.24e-3 / 9.77e-3 (a lost bit everywhere), ×2 on the feed-forward's
/// second linear alone made nothing better (6.31e-3 / 1.56e-2 / 1.78e-2).
pub const ATTENTION_OUTPUT_HEADROOM: f32 = 2.0;

/// Whether the linear of weight `weight` reads an attention output (its `to_out` projection).
fn reads_attention_output(weight: &str) -> bool {
    weight.contains(".to_out.")
}

/// Runs the observing DiT graph `observed` (the fp32 graph with the linears' inputs as extra
/// outputs, `v2l_calibration::observe_linear_inputs`) over the samples and returns the
/// activation scale of each linear, by weight.
pub fn input_scales(
    cfg: &serde_json::Value,
    observed: &Path,
    pairs: &[(String, String)],
    how: &Calibration,
) -> Result<CalibrationRecord> {
    let feeds = samples(cfg, &how.samples)?;
    let mut model = Model::load(observed, &SessionOptions::default())?;
    let mut ranges = Ranges::default();
    for feed in &feeds {
        let out = model.run(feed)?;
        for (_, x) in pairs {
            let t = out.get(x).ok_or_else(|| CompileError::Invalid {
                what: observed.display().to_string(),
                message: format!("the observing graph has no output `{x}`"),
            })?;
            ranges.observe(x, t.as_f32(x)?);
        }
    }
    Ok(CalibrationRecord {
        method: how.method.name(),
        samples: feeds.len(),
        source: match &how.samples {
            Samples::Dir(d) => d.display().to_string(),
            Samples::Generated(_) => "generated".into(),
        },
        input_scales: pairs
            .iter()
            .map(|(w, x)| {
                let widen = if reads_attention_output(w) {
                    ATTENTION_OUTPUT_HEADROOM
                } else {
                    1.0
                };
                (w.clone(), ranges.scale(x, how.method) * widen)
            })
            .collect(),
        attention_output_headroom: Some(ATTENTION_OUTPUT_HEADROOM),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attention_output_projections_are_found_by_their_diffusers_names() {
        for w in [
            "transformer_blocks.3.attn1.to_out.0.weight", // CogVideoX
            "blocks.0.attn1.to_out.0.weight",             // Wan, self-attention
            "blocks.0.attn2.to_out.0.weight",             // Wan, cross-attention
        ] {
            assert!(reads_attention_output(w), "{w}");
        }
        for w in [
            "transformer_blocks.3.attn1.to_v.weight",
            "transformer_blocks.3.ff.net.2.weight",
            "proj_out.weight",
        ] {
            assert!(!reads_attention_output(w), "{w}");
        }
    }
}
