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
use crate::step_cache::{CacheCall, FirstBlockState, StepCache};
use crate::tensor::Tensor;

use crate::request::Request;
use crate::stages::ms_since as ms;

/// What a family contributes to each step of the loop.
pub(super) trait Sampling {
    /// How many steps the sampler's schedule has.
    fn steps(&self) -> usize;
    /// The DiT's `hidden_states` and `timestep` at step `i`, for `batch` copies of `latents`.
    fn dit_inputs(&self, latents: &[f32], i: usize, batch: usize) -> Result<(Tensor, Tensor)>;
    /// The scheduler's step `i` from the (guided) prediction.
    fn step(&mut self, prediction: &[f32], i: usize, latents: &[f32]) -> Result<Vec<f32>>;
    /// Whether the upstream pipeline calls the DiT once per guidance branch, each call in its
    /// own cache context (Wan), so step caching decides per branch; else one call decides for
    /// the guided batch (CogVideoX).
    fn calls_per_branch(&self) -> bool {
        false
    }
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
            return Err(RuntimeError::Graph {
                graph: "DiT".into(),
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

/// One request's share of the loop: its sampler, its DiT inputs that do not change between
/// steps, its guidance and its latents (already scaled to the sampler's initial sigma).
pub(super) struct Lane {
    pub(super) sampling: Box<dyn Sampling>,
    /// Per-sample inputs (text, image tokens) at the lane's guidance batch, and the inputs all
    /// samples share (RoPE tables).
    pub(super) inputs: BTreeMap<String, Tensor>,
    pub(super) guidance: Guidance,
    pub(super) latents: Vec<f32>,
    /// The shape the latents are reported in (the request's noise).
    pub(super) shape: Vec<usize>,
    /// The request's step cache (a cached lane runs alone).
    pub(super) cache: Option<StepCache>,
}

/// A lane's outcome: the final latents and the latents after every step.
pub(super) struct Denoised {
    pub(super) latents: Vec<f32>,
    pub(super) steps: Vec<Tensor>,
    pub(super) dit_calls: usize,
    /// Each DiT call's step-cache decision (empty without the cache).
    pub(super) cache: Vec<CacheCall>,
}

/// DiT inputs with a batch axis besides `hidden_states` and `timestep`: one slice per sample.
const PER_SAMPLE: [&str; 2] = [io::ENCODER_HIDDEN_STATES, io::ENCODER_HIDDEN_STATES_IMAGE];

/// Batch-axis concatenation of any element type (one lane: the tensor itself, untouched).
fn stack(parts: Vec<Tensor>) -> Result<Tensor> {
    use crate::tensor::Data;
    let bad = |message: String| RuntimeError::Graph {
        graph: "DiT batch".into(),
        message,
    };
    let mut parts = parts.into_iter();
    let mut out = parts.next().ok_or_else(|| bad("no requests".into()))?;
    for p in parts {
        if p.shape.get(1..) != out.shape.get(1..) {
            return Err(bad(format!(
                "requests of shapes {:?} and {:?} cannot share a DiT call",
                out.shape, p.shape
            )));
        }
        match (&mut out.data, p.data) {
            (Data::F32(o), Data::F32(v)) => o.extend(v),
            (Data::I64(o), Data::I64(v)) => o.extend(v),
            _ => return Err(bad("element types differ".into())),
        }
        if let (Some(n), Some(m)) = (out.shape.first_mut(), p.shape.first()) {
            *n += m;
        }
    }
    Ok(out)
}

/// The DiT inputs every step shares: per-sample inputs stacked in lane order, shared inputs
/// taken once (they must agree: requests of one size have the same RoPE tables).
fn fixed_inputs(lanes: &mut [Lane]) -> Result<BTreeMap<String, Tensor>> {
    let Some(first) = lanes.first() else {
        return Ok(BTreeMap::new());
    };
    let names: Vec<String> = first.inputs.keys().cloned().collect();
    let mut out = BTreeMap::new();
    for name in names {
        let parts: Vec<Tensor> = lanes
            .iter_mut()
            .map(|l| {
                l.inputs.remove(&name).ok_or_else(|| RuntimeError::Graph {
                    graph: "DiT batch".into(),
                    message: format!("a request lacks the DiT input `{name}` another has"),
                })
            })
            .collect::<Result<_>>()?;
        let t = if PER_SAMPLE.contains(&name.as_str()) {
            stack(parts)?
        } else {
            let mut parts = parts.into_iter();
            let one = parts.next().ok_or_else(|| RuntimeError::Internal {
                what: "DiT batch".into(),
                message: "no requests".into(),
            })?;
            if parts.any(|p| p != one) {
                return Err(RuntimeError::Graph {
                    graph: "DiT batch".into(),
                    message: format!(
                        "requests differ in `{name}`: only requests of one size share a DiT call"
                    ),
                });
            }
            one
        };
        out.insert(name, t);
    }
    Ok(out)
}

/// Runs the loop for `lanes`, all at once: every step is one DiT call over every lane's
/// guidance batch, in lane order; each lane then combines and steps its own slice. One lane is
/// a single request, exactly as before batching. Returns each lane's outcome and each DiT
/// call's milliseconds. `progress(step, steps)` returning `false` cancels.
pub(super) fn run(
    dit: &mut DitRunner,
    mut lanes: Vec<Lane>,
    progress: &mut dyn FnMut(usize, usize) -> bool,
) -> Result<(Vec<Denoised>, Vec<f64>)> {
    let steps = lanes.first().map(|l| l.sampling.steps()).unwrap_or(0);
    if lanes.iter().any(|l| l.sampling.steps() != steps) {
        return Err(RuntimeError::Graph {
            graph: "DiT batch".into(),
            message: "requests with different step counts cannot share DiT calls".into(),
        });
    }
    let mut cache = match lanes.iter().find(|l| l.cache.is_some()) {
        Some(_) if lanes.len() > 1 => {
            return Err(RuntimeError::Graph {
                graph: "DiT batch".into(),
                message: "a request with step caching runs alone, not in a batch".into(),
            })
        }
        Some(l) => {
            let branches = if l.sampling.calls_per_branch() {
                l.guidance.batch()
            } else {
                1
            };
            l.cache.map(|StepCache::FirstBlock { threshold }| {
                FirstBlockState::per_branch(threshold, branches)
            })
        }
        None => None,
    };
    dit.set_constant_inputs(fixed_inputs(&mut lanes)?)?;
    let mut inputs = BTreeMap::new();
    let mut done: Vec<Vec<Tensor>> = lanes.iter().map(|_| Vec::with_capacity(steps)).collect();
    let mut dit_ms = Vec::with_capacity(steps);
    let several = lanes.len() > 1;
    for i in 0..steps {
        let mut hidden = Vec::with_capacity(lanes.len());
        let mut timestep = Vec::with_capacity(lanes.len());
        for l in &lanes {
            let (h, t) = l.sampling.dit_inputs(&l.latents, i, l.guidance.batch())?;
            hidden.push(h);
            timestep.push(t);
        }
        inputs.insert(io::HIDDEN_STATES.to_string(), stack(hidden)?);
        inputs.insert(io::TIMESTEP.to_string(), stack(timestep)?);
        let t = Instant::now();
        let out = match &mut cache {
            Some(state) => dit.run_cached(&inputs, state)?,
            None => dit.run(&inputs)?,
        };
        dit_ms.push(ms(t));
        let sample =
            (out.get(io::SAMPLE)).ok_or_else(|| RuntimeError::missing_output("DiT", io::SAMPLE))?;
        let sample = sample.as_f32(io::SAMPLE)?;
        let mut at = 0;
        for (k, (l, trail)) in lanes.iter_mut().zip(&mut done).enumerate() {
            let n = l.latents.len();
            let take = l.guidance.batch() * n;
            let part = sample.get(at..at + take).unwrap_or(&[]);
            at += take;
            let prediction = l.guidance.combine(part, n)?;
            l.latents = l.sampling.step(&prediction, i, &l.latents)?;
            crate::error::check_finite(
                || match several {
                    true => format!(
                        "request {} of the batch, denoising step {} of {steps} (the latents)",
                        k + 1,
                        i + 1
                    ),
                    false => format!("denoising step {} of {steps} (the latents)", i + 1),
                },
                &l.latents,
            )?;
            trail.push(Tensor::f32(l.shape.clone(), l.latents.clone()));
        }
        if at != sample.len() {
            return Err(RuntimeError::Graph {
                graph: "DiT".into(),
                message: format!("`sample` has {} values; expected {at}", sample.len()),
            });
        }
        if !progress(i + 1, steps) {
            return Err(RuntimeError::Cancelled);
        }
    }
    Ok((
        lanes
            .into_iter()
            .zip(done)
            .map(|(l, steps)| Denoised {
                latents: l.latents,
                dit_calls: steps.len(),
                steps,
                cache: cache.as_ref().map(|c| c.calls.clone()).unwrap_or_default(),
            })
            .collect(),
        dit_ms,
    ))
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
