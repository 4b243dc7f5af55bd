//! Reference video → LoRA: the Video2LoRA prediction path.
//!
//! Frames in [0, 1] (upstream Video2LoRA's range, not the [-1, 1] of generation) → VAE posterior
//! mode × scaling factor = `reference_latents` → hypernetwork → `hyper_weights [1, N, D]` →
//! LiLoRA → a standard LoRA whose layers are the DiT's linears.

use std::path::Path;
use v2l_contracts::io::hypernet as hypernet_io;

use v2l_contracts::io::vae as vae_io;
use v2l_contracts::request::{Field, RequestError};
use v2l_contracts::LinearInfo;

use crate::engine::Engine;
use crate::error::{Result, RuntimeError};
use crate::lora::format::Lora;
use crate::lora::lilora::LiLora;
use crate::session::{Model, SessionOptions};
use crate::stages::Timings;
use crate::tensor::Tensor;
use crate::vae::Vae;
use crate::video::Frames;

/// The fewest frames a reference clip may have: 5 frames are two latent frames, the least
/// that carries motion (1 to 4 frames encode to a single latent frame: a still picture).
pub const MIN_REFERENCE_FRAMES: usize = 5;

/// Checks a reference clip before any work: enough frames to carry an effect. `source` names
/// it in the error (a path, or "reference frames").
pub fn check_reference(frames: &Frames, source: &str) -> Result<()> {
    if frames.frames < MIN_REFERENCE_FRAMES {
        return Err(RuntimeError::Reference {
            clip: source.into(),
            message: format!(
                "the reference clip has {} frame{}; Video2LoRA predicts an effect from motion and needs at least {MIN_REFERENCE_FRAMES} (two latent frames)",
                frames.frames,
                if frames.frames == 1 { "" } else { "s" }
            ),
        });
    }
    Ok(())
}

/// Upstream's LoRA weight for a LoRA predicted from a reference clip: it becomes both the
/// multiplier and the alpha, so the LoRA v2l writes and caches holds alpha = weight², which
/// must stay within the ±1e6 every LoRA value is held to (`lora::format::MAX_VALUE`): |weight|
/// up to 1,000. Checked with the request, before any work (a server answered 500 after the
/// prediction ran).
pub fn check_reference_weight(w: f32) -> std::result::Result<f32, RequestError> {
    let w = crate::limits::bounded(w).map_err(|m| RequestError::new(Field::LoraScale, m))?;
    let max = crate::lora::format::MAX_VALUE.sqrt();
    match w.abs() <= max {
        true => Ok(w),
        false => Err(RequestError::new(
            Field::LoraScale,
            format!(
                "{w}: a LoRA predicted from a reference takes it as multiplier and alpha (alpha = {:e}); at most ±{max} so alpha stays within ±{:e}",
                w * w,
                crate::lora::format::MAX_VALUE
            ),
        )),
    }
}

/// Refuses reference latents `[B, C, T, H, W]` whose grid differs from the one the
/// hypernetwork's extensions were trained for: a table of `context_len` = T·H·W positions, a
/// context encoder of grid (T, H, W). Upstream's hypernetwork (both `None`) takes any grid.
fn check_reference_grid(
    context_len: Option<usize>,
    context_grid: Option<[usize; 3]>,
    shape: &[usize],
) -> Result<()> {
    let &[_, _, t, h, w] = shape else {
        return Ok(()); // the graph's own input check names the rank
    };
    let refuse = |trained: String| RuntimeError::Reference {
        clip: "reference clip".into(),
        message: format!(
            "its latents are {t}×{h}×{w} (T×H×W), but this hypernetwork's {trained}: give the \
             reference the frame count and size the model was trained with"
        ),
    };
    if let Some(want) = context_len.filter(|&l| l != t * h * w) {
        return Err(refuse(format!(
            "context positions were trained for {want} = T·H·W tokens"
        )));
    }
    if let Some([wt, wh, ww]) = context_grid.filter(|&g| g != [t, h, w]) {
        return Err(refuse(format!(
            "context encoder was trained for {wt}×{wh}×{ww}"
        )));
    }
    Ok(())
}

/// What a prediction computed, intermediates included (for `--dump` and parity checks).
pub struct Prediction {
    pub reference_latents: Tensor,
    pub hyper_weights: Tensor,
    pub lora: Lora,
}

/// The hypernetwork and LiLoRA auxiliaries of an export directory.
pub struct Predictor {
    hypernet: Model,
    lilora: LiLora,
    /// Latent tokens the hypernetwork's context positions were trained for (None: upstream, any).
    context_len: Option<usize>,
    /// Latent grid (T, H, W) its context encoder was trained for (None: upstream, any).
    context_grid: Option<[usize; 3]>,
}

impl Predictor {
    pub fn load(engine: &Engine, opts: &SessionOptions) -> Result<Predictor> {
        let e = engine
            .manifest
            .hypernet
            .as_ref()
            .ok_or_else(|| RuntimeError::Engine {
                dir: engine.dir.clone(),
                message: format!(
                    "holds no hypernetwork; export one with `v2l-export hypernet ... -o {}`",
                    engine.dir.display()
                ),
            })?;
        let targets: Vec<LinearInfo> = match &engine.manifest.dit {
            Some(d) => d.lora_targets.clone(),
            None => {
                return Err(RuntimeError::Engine {
                    dir: engine.dir.clone(),
                    message: "holds no DiT; the LiLoRA layers are checked against it: run `v2l-export dit` too".into(),
                })
            }
        };
        let lilora = LiLora::load(&engine.dir.join(&e.lilora), &targets)?;
        if lilora.layers.len() != e.dims.num_layers {
            return Err(RuntimeError::Engine {
                dir: engine.dir.clone(),
                message: format!(
                    "the hypernetwork predicts {} rows but the LiLoRA file has {} layers",
                    e.dims.num_layers,
                    lilora.layers.len()
                ),
            });
        }
        Ok(Predictor {
            hypernet: Model::load(&engine.dir.join(&e.file), opts)?,
            lilora,
            context_len: e.dims.context_len,
            context_grid: e.dims.context_encoder.map(|c| c.grid),
        })
    }

    /// `reference_latents [B, C, T, H, W]` → `hyper_weights [B, N, D]`.
    pub fn hyper_weights(&mut self, reference_latents: &Tensor) -> Result<Tensor> {
        check_reference_grid(
            self.context_len,
            self.context_grid,
            &reference_latents.shape,
        )?;
        let inputs = std::collections::BTreeMap::from([(
            hypernet_io::REFERENCE_LATENTS.to_string(),
            reference_latents.clone(),
        )]);
        self.hypernet
            .run(&inputs)?
            .remove(hypernet_io::HYPER_WEIGHTS)
            .ok_or_else(|| RuntimeError::missing_output("hypernetwork", hypernet_io::HYPER_WEIGHTS))
    }

    /// Predicts a LoRA from RGB frames. `lora_weight` is upstream's LoRA weight, passed as both
    /// multiplier and alpha, so the fuse scale is `lora_weight²`.
    pub fn predict(
        &mut self,
        vae: &mut Vae,
        frames: &Frames,
        lora_weight: f32,
    ) -> Result<Prediction> {
        self.predict_timed(
            vae,
            frames,
            lora_weight,
            &mut Timings::default(),
            &mut |_, _| true,
        )
    }

    /// [`Predictor::predict`], recording its two stages: `reference_encode` (the VAE) and
    /// `hypernetwork` (the rows and the LoRA they make); the encode reports each frame batch
    /// to `go_on` as [`Vae::encode_reporting`] does.
    pub fn predict_timed(
        &mut self,
        vae: &mut Vae,
        frames: &Frames,
        lora_weight: f32,
        timings: &mut Timings,
        go_on: &mut dyn FnMut(usize, usize) -> bool,
    ) -> Result<Prediction> {
        check_reference(frames, "reference clip")?;
        check_reference_weight(lora_weight)?;
        let t = std::time::Instant::now();
        let mean = vae.latent_reporting(&frames.to_unit_video()?, go_on)?;
        let sf = vae.entry.scaling_factor as f32;
        let latents = Tensor::f32(
            mean.shape.clone(),
            mean.as_f32(vae_io::POSTERIOR_MEAN)?
                .iter()
                .map(|v| v * sf)
                .collect(),
        );
        timings.insert("reference_encode".into(), t.elapsed().as_secs_f64() * 1e3);
        let t = std::time::Instant::now();
        let hw = self.hyper_weights(&latents)?;
        let width = hw.shape.last().copied().unwrap_or(0);
        let rows = hw.as_f32(hypernet_io::HYPER_WEIGHTS)?;
        let rows = rows
            .get(..self.lilora.layers.len() * width)
            .ok_or_else(|| RuntimeError::Graph {
                graph: "hypernetwork graph".into(),
                message: format!(
                    "`hyper_weights` has shape {:?}; expected {} rows",
                    hw.shape,
                    self.lilora.layers.len()
                ),
            })?;
        crate::error::check_finite(|| "hypernetwork (the predicted LoRA rows)".into(), rows)?;
        let lora = self.lilora.to_lora(rows, width, lora_weight, lora_weight)?;
        crate::lora::format::check_values(Path::new("predicted LoRA"), &lora.layers)?;
        timings.insert("hypernetwork".into(), t.elapsed().as_secs_f64() * 1e3);
        Ok(Prediction {
            reference_latents: latents,
            hyper_weights: hw,
            lora,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::check_reference_grid;

    #[test]
    fn a_reference_of_another_grid_is_refused_by_name() {
        let shape = [1, 16, 5, 8, 8];
        assert!(check_reference_grid(None, None, &[1, 16, 3, 4, 4]).is_ok());
        assert!(check_reference_grid(Some(320), Some([5, 8, 8]), &shape).is_ok());
        let err = check_reference_grid(Some(192), None, &shape)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("reference clip") && err.contains("192 = T·H·W"),
            "{err}"
        );
        // Same token count, other grid: only the encoder's check can tell.
        let err = check_reference_grid(Some(320), Some([5, 4, 16]), &shape)
            .unwrap_err()
            .to_string();
        assert!(err.contains("5×8×8") && err.contains("5×4×16"), "{err}");
    }
}
