//! The one denoise loop both families run.
//!
//! The loop owns what CogVideoX and Wan share: classifier-free guidance as one DiT batch, the
//! check of the DiT's output, the guidance combine, the latents after every step, the DiT's
//! time per call and cancellation. A family ([`Sampling`]) says only what differs: how the
//! DiT's `hidden_states` and `timestep` are built from the latents, and how its scheduler steps.
//!
//! diffusers guides only when `guidance > 1`; otherwise the positive prompt runs alone. So does
//! v2l: the DiT then runs at batch 1, half the work of a guided step.

use std::collections::BTreeMap;
use std::time::Instant;

use v2l_contracts::io::dit as io;

use crate::error::{Result, RuntimeError};
use crate::lora::strategy::DitRunner;
use crate::tensor::Tensor;

use super::{ms, Request};

/// What a family contributes to each step of the loop.
pub(super) trait Sampling {
    /// How many steps the sampler's schedule has.
    fn steps(&self) -> usize;
    /// The DiT's `hidden_states` and `timestep` at step `i`, for `batch` copies of `latents`.
    fn dit_inputs(&self, latents: &[f32], i: usize, batch: usize) -> Result<(Tensor, Tensor)>;
    /// The scheduler's step `i` from the (guided) prediction.
    fn step(&mut self, prediction: &[f32], i: usize, latents: &[f32]) -> Result<Vec<f32>>;
}

/// Classifier-free guidance at scale `g`: a batch of 2 (negative, positive) when `g > 1`.
#[derive(Clone, Copy)]
pub(super) struct Guidance(pub(super) f32);

impl Guidance {
    pub(super) fn guided(self) -> bool {
        self.0 > 1.0
    }

    /// The DiT's batch: both prompts when guided, the positive one alone otherwise.
    pub(super) fn batch(self) -> usize {
        if self.guided() {
            2
        } else {
            1
        }
    }

    /// `encoder_hidden_states`: `[negative | positive]` when guided, else the positive prompt.
    pub(super) fn text(self, req: &Request) -> Result<Tensor> {
        match self.guided() {
            true => Tensor::concat(
                &[
                    req.negative_prompt_embeds.clone(),
                    req.prompt_embeds.clone(),
                ],
                0,
            ),
            false => Ok(req.prompt_embeds.clone()),
        }
    }

    /// A per-sample input (batch 1) repeated to the guidance batch.
    pub(super) fn repeat(self, t: &Tensor) -> Result<Tensor> {
        match self.guided() {
            true => Tensor::concat(&[t.clone(), t.clone()], 0),
            false => Ok(t.clone()),
        }
    }

    /// The DiT's `sample` for the guidance batch → one prediction of `n` values:
    /// `uncond + g·(cond − uncond)` when guided, else the only sample.
    pub(super) fn combine(self, sample: &[f32], n: usize) -> Result<Vec<f32>> {
        let want = self.batch() * n;
        if sample.len() != want {
            return Err(RuntimeError::Invalid {
                what: "DiT".into(),
                message: format!("`sample` has {} values; expected {want}", sample.len()),
            });
        }
        let (uncond, cond) = sample.split_at(n);
        Ok(match self.guided() {
            true => uncond
                .iter()
                .zip(cond)
                .map(|(u, c)| u + self.0 * (c - u))
                .collect(),
            false => uncond.to_vec(),
        })
    }
}

/// Runs the loop from `latents` (already scaled to the sampler's initial sigma). `inputs`
/// holds what does not change between steps (RoPE tables, text, image tokens). Returns the
/// final latents, the latents after every step (shaped like `req.noise`) and each DiT call's
/// milliseconds. `progress(step, steps)` returning `false` cancels.
pub(super) fn run(
    dit: &mut DitRunner,
    mut inputs: BTreeMap<String, Tensor>,
    family: &mut dyn Sampling,
    req: &Request,
    mut latents: Vec<f32>,
    progress: &mut dyn FnMut(usize, usize) -> bool,
) -> Result<(Vec<f32>, Vec<Tensor>, Vec<f64>)> {
    let guidance = Guidance(req.guidance);
    let steps = family.steps();
    let n = latents.len();
    let mut latents_steps = Vec::with_capacity(steps);
    let mut dit_ms = Vec::with_capacity(steps);
    for i in 0..steps {
        let (hidden, timestep) = family.dit_inputs(&latents, i, guidance.batch())?;
        inputs.insert(io::HIDDEN_STATES.to_string(), hidden);
        inputs.insert(io::TIMESTEP.to_string(), timestep);
        let t = Instant::now();
        let out = dit.run(&inputs)?;
        dit_ms.push(ms(t));
        let sample = out.get(io::SAMPLE).ok_or_else(|| RuntimeError::Invalid {
            what: "DiT".into(),
            message: format!("no `{}` output", io::SAMPLE),
        })?;
        let prediction = guidance.combine(sample.as_f32(io::SAMPLE)?, n)?;
        latents = family.step(&prediction, i, &latents)?;
        crate::error::check_finite(
            || format!("denoising step {} of {steps} (the latents)", i + 1),
            &latents,
        )?;
        latents_steps.push(Tensor::f32(req.noise.shape.clone(), latents.clone()));
        if !progress(i + 1, steps) {
            return Err(RuntimeError::Cancelled);
        }
    }
    Ok((latents, latents_steps, dit_ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guidance_batches_both_prompts_only_above_one() {
        assert_eq!(Guidance(6.0).batch(), 2);
        assert_eq!(Guidance(1.0).batch(), 1);
        assert_eq!(Guidance(0.5).batch(), 1);
        // [uncond | cond] → u + g (c − u).
        let got = Guidance(3.0).combine(&[1.0, 2.0, 2.0, 4.0], 2).unwrap();
        assert_eq!(got, [4.0, 8.0]);
        assert_eq!(Guidance(1.0).combine(&[5.0, 6.0], 2).unwrap(), [5.0, 6.0]);
        // A DiT that returns the wrong batch is an error, not a silent half.
        assert!(Guidance(1.0).combine(&[1.0; 4], 2).is_err());
        assert!(Guidance(2.0).combine(&[1.0; 2], 2).is_err());
    }
}
