//! The `unfused` graph's LoRA factor inputs: laid out from the samples' LoRAs, and kept for
//! LoRAs used before.
//!
//! Laying factors out costs a pass over every factor of every targeted layer, once per slot
//! (a request's samples share one): at CogVideoX-5B width with rank 64 about half a gigabyte
//! of writes per switch, and on a GPU as much again to move them up. A server switching among
//! a few effects (or to a request's LoRA and back to its resident one) lays the same factors
//! out again and again. With a budget ([`FactorInputs::set_budget`]), the inputs of the LoRAs
//! switched away from are kept where the session reads them (the device's memory on a GPU):
//! switching back hands the kept values to the session, with no pass over the factors and
//! nothing copied.

use std::collections::BTreeMap;

use v2l_contracts::LinearInfo;

use super::apply::match_targets;
use super::format::LoraLayer;
use crate::error::{Result, RuntimeError};
use crate::lora::AppliedLora;
use crate::session::DeviceValues;
use crate::step_cache::DitModel;
use crate::tensor::Tensor;

/// One sample's layer on one target of the unfused graph, with its fuse scale; `None`: that
/// sample has no LoRA there (its branch adds exact zeros).
type SampleLayer<'a> = Option<(&'a LoraLayer, f32)>;

/// A target's factor inputs for the unfused graph, one slot per group of samples (the graph
/// splits the batch evenly): `A [slots, rank, in]`, `B [slots, out, rank]`,
/// `scale [slots, 1, 1]`. A slot without a LoRA, and the rows and columns beyond a LoRA's own
/// rank, are zeros: they add exact zeros to the base output.
pub(super) struct TargetFactors<'a> {
    pub(super) rank: usize,
    samples: Vec<SampleLayer<'a>>,
}

impl TargetFactors<'_> {
    pub(super) fn shapes(&self, t: &LinearInfo) -> [Vec<usize>; 3] {
        let n = self.samples.len();
        [
            vec![n, self.rank, t.in_features],
            vec![n, t.out_features, self.rank],
            vec![n, 1, 1],
        ]
    }

    /// Writes input `which` (0: A, 1: B, 2: scale) into `dst`, laid out as [`Self::shapes`].
    /// Every element is written (zeros included), so `dst` may hold an earlier LoRA.
    pub(super) fn fill(&self, t: &LinearInfo, which: usize, dst: &mut [f32]) {
        let (rr, n_in, n_out) = (self.rank, t.in_features, t.out_features);
        let slot = match which {
            0 => rr * n_in,
            1 => n_out * rr,
            _ => 1,
        };
        for (sample, dst) in self.samples.iter().zip(dst.chunks_exact_mut(slot.max(1))) {
            dst.fill(0.0);
            let Some((layer, scale)) = sample else {
                continue;
            };
            let r = layer.rank();
            let size = layer.a.dtype.size();
            // Shapes were matched to the target and ranks to the slot by `plan_factors`.
            let _ = match which {
                0 => dst.get_mut(..r * n_in).and_then(|d| {
                    v2l_graphs::dtype::f32_values_into(&layer.a.bytes, layer.a.dtype, d)
                }),
                1 => dst
                    .chunks_exact_mut(rr.max(1))
                    .zip(layer.b.bytes.chunks_exact((r * size).max(1)))
                    .try_for_each(|(row, src)| {
                        v2l_graphs::dtype::f32_values_into(src, layer.b.dtype, row.get_mut(..r)?)
                    }),
                _ => dst.first_mut().map(|d| *d = *scale),
            };
        }
    }
}

/// Refuses `l`'s `layers` with a non-finite factor, or one beyond `limit` (an fp16 engine's
/// range), naming the first such layer; checked on up to `threads` threads (0: one per core),
/// as the factors are a gigabyte at 5B width.
fn check_layers(
    l: &AppliedLora,
    layers: &[&LoraLayer],
    limit: Option<f32>,
    threads: usize,
) -> Result<()> {
    let check = |layer: &LoraLayer| -> Result<()> {
        for f in [&layer.a, &layer.b] {
            super::fuse::check_factor_bytes(&layer.module, &f.bytes, f.dtype, limit).map_err(
                |e| match e {
                    super::fuse::FuseError::BeyondLimit { value, limit, .. } => {
                        RuntimeError::LoraLayer {
                            layer: layer.module.clone(),
                            message: format!(
                                "{}: a factor of {value} is beyond this fp16 engine's range (±{limit}; its LoRA branches compute in fp16): use a bf16 or fp32 engine",
                                l.source.display()
                            ),
                        }
                    }
                    e => RuntimeError::Fuse {
                        what: l.source.display().to_string(),
                        source: e,
                    },
                },
            )?;
        }
        Ok(())
    };
    let threads = super::fuse::resolve_threads(threads).clamp(1, layers.len().max(1));
    let per = layers.len().div_ceil(threads).max(1);
    // Each share stops at its first refusal; the earliest share's is reported.
    let refusals: Vec<Result<()>> = std::thread::scope(|s| {
        let handles: Vec<_> = layers
            .chunks(per)
            .map(|share| s.spawn(move || share.iter().try_for_each(|layer| check(layer))))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(RuntimeError::Internal {
                        what: "LoRA factor check".into(),
                        message: "a checking thread panicked".into(),
                    })
                })
            })
            .collect()
    });
    refusals.into_iter().collect()
}

/// The rank of a layout's factor inputs: the largest its LoRAs have on a target, at most
/// `max` (an engine's `--max-rank`); with `pad`, `max` always, for a session that needs one
/// shape (TensorRT's profile; a CUDA graph, captured per set of input shapes). Without it a
/// rank-1 Video2LoRA LoRA takes rank-1 inputs on a GPU too, not 64 ranks of mostly zeros to
/// write, move and multiply.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ranks {
    pub max: Option<usize>,
    pub pad: bool,
}

impl Ranks {
    /// The rank of inputs for LoRAs whose largest rank is `most`, or `most` again as the refused
    /// rank when it is over `max`.
    pub(super) fn of(self, most: usize) -> std::result::Result<usize, usize> {
        match self.max {
            Some(r) if most > r => Err(most),
            Some(r) if self.pad => Ok(r),
            _ => Ok(most),
        }
    }
}

/// Which layer of which sample's LoRA each target of the unfused graph takes, and the rank its
/// factor inputs take ([`Ranks`]). Everything a switch can refuse is checked here, before any
/// input is written: unmatched layers, non-finite factors, ranks over the engine's largest.
pub(super) fn plan_factors<'a>(
    targets: &'a [LinearInfo],
    samples: &[Option<&'a AppliedLora>],
    ranks: Ranks,
    limit: Option<f32>,
    threads: usize,
) -> Result<Vec<TargetFactors<'a>>> {
    let mut by_sample: Vec<BTreeMap<&str, (&'a LoraLayer, f32)>> = Vec::new();
    for (k, lora) in samples.iter().enumerate() {
        // A LoRA repeated over slots (requests of a batch with one LoRA) is checked once.
        let before = samples.iter().zip(&by_sample).take(k);
        if let Some((_, same)) = before
            .into_iter()
            .find(|(l, _)| AppliedLora::same(**l, *lora))
        {
            let same = same.clone();
            by_sample.push(same);
            continue;
        }
        let mut by_target = BTreeMap::new();
        if let Some(l) = lora {
            let matched = match_targets(&l.lora, targets, &l.source)?;
            let layers: Vec<&LoraLayer> = matched.iter().map(|(_, layer)| *layer).collect();
            check_layers(l, &layers, limit, threads)?;
            for (t, layer) in matched {
                // Matched by name: the layer's module is the target's.
                debug_assert_eq!(t.name, layer.module);
                by_target.insert(layer.module.as_str(), (layer, layer.scale(l.multiplier)));
            }
        }
        by_sample.push(by_target);
    }
    targets
        .iter()
        .map(|t| {
            let layers: Vec<SampleLayer> = by_sample
                .iter()
                .map(|p| p.get(t.name.as_str()).copied())
                .collect();
            let most = layers
                .iter()
                .flatten()
                .map(|(l, _)| l.rank())
                .max()
                .unwrap_or(1)
                .max(1);
            let rank = ranks.of(most).map_err(|most| RuntimeError::LoraLayer {
                layer: t.name.clone(),
                message: format!(
                    "the LoRA has rank {most} here; this engine takes at most {} (v2l-compile --max-rank)",
                    ranks.max.unwrap_or(most)
                ),
            })?;
            Ok(TargetFactors {
                rank,
                samples: layers,
            })
        })
        .collect()
}

/// Writes the factor inputs `plan` describes into `model`. Inputs already held with the same
/// shape (the usual switch between LoRAs of one rank) are rewritten in place, no allocation,
/// on up to `threads` threads (0: one per core): a pass over a gigabyte at 5B width is bound by
/// memory bandwidth, which one core does not saturate on a server.
fn write_planned(
    model: &mut DitModel,
    targets: &[LinearInfo],
    plan: &[TargetFactors<'_>],
    threads: usize,
) -> Result<()> {
    /// One factor input: its target, which of A, B, scale, its name and shape.
    struct Input<'p, 'l> {
        target: &'p LinearInfo,
        factors: &'p TargetFactors<'l>,
        which: usize,
        name: String,
        shape: Vec<usize>,
    }
    let mut inputs = Vec::new();
    for (t, f) in targets.iter().zip(plan) {
        let names = v2l_graphs::passes::lora_input_names(&format!("{}.weight", t.name));
        for (which, (name, shape)) in names.into_iter().zip(f.shapes(t)).enumerate() {
            inputs.push(Input {
                target: t,
                factors: f,
                which,
                name,
                shape,
            });
        }
    }
    let wanted: std::collections::HashMap<&str, &[usize]> = inputs
        .iter()
        .map(|i| (i.name.as_str(), i.shape.as_slice()))
        .collect();
    // A session that takes inputs made together as one buffer (a GPU's, which then moves
    // them in one copy) has the fresh ones written straight into it, beside those rewritten
    // in place. Their declared types first: the buffers below borrow the model.
    let packs = model.packs_fixed();
    let declared: Vec<v2l_graphs::DType> = match packs {
        true => inputs
            .iter()
            .map(|i| model.declared_float(&i.name))
            .collect(),
        false => Vec::new(),
    };
    let mut held: std::collections::HashMap<&str, crate::tensor::FloatsMut<'_>> =
        model.fixed_mut_many(&wanted).into_iter().collect();
    // Each thread takes a share of the elements, largest inputs first.
    let mut in_place: Vec<(&Input, crate::tensor::FloatsMut<'_>)> = Vec::new();
    let mut fresh = Vec::new();
    let mut fresh_types = Vec::new();
    for (k, i) in inputs.iter().enumerate() {
        match held.remove(i.name.as_str()) {
            Some(dst) => in_place.push((i, dst)),
            None => {
                fresh.push(i);
                fresh_types.extend(declared.get(k).copied());
            }
        }
    }
    let mut packed = (packs && !fresh.is_empty()).then(|| {
        crate::session::Packed::new(
            fresh
                .iter()
                .zip(&fresh_types)
                .map(|(i, &dtype)| (i.name.clone(), dtype, i.shape.clone())),
        )
    });
    if let Some(p) = packed.as_mut() {
        for (i, (_, dst)) in fresh.drain(..).zip(p.floats_mut()) {
            in_place.push((i, dst));
        }
    }
    in_place.sort_by_key(|(i, _)| std::cmp::Reverse(i.shape.iter().product::<usize>()));
    let workers = super::fuse::resolve_threads(threads).max(1);
    let mut shares: Vec<(usize, Vec<_>)> = (0..workers.min(in_place.len().max(1)))
        .map(|_| (0, Vec::new()))
        .collect();
    for (i, dst) in in_place {
        if let Some(least) = shares.iter_mut().min_by_key(|(load, _)| *load) {
            least.0 += i.shape.iter().product::<usize>();
            least.1.push((i, dst));
        }
    }
    std::thread::scope(|s| {
        for (_, share) in shares {
            s.spawn(move || {
                let mut scratch = Vec::new();
                for (i, dst) in share {
                    dst.write_with(&mut scratch, |d| i.factors.fill(i.target, i.which, d));
                }
            });
        }
    });
    drop(held);
    if let Some(p) = packed {
        return model.set_fixed_packed(p);
    }
    // Inputs not held in place (the first layout, a new rank): made in the type the graph
    // declares, on the session's threads, `workers` at a time (at 5B width they are
    // gigabytes), then handed to the session.
    let dtypes: Vec<v2l_graphs::DType> = fresh
        .iter()
        .map(|i| model.declared_float(&i.name))
        .collect();
    // A low type's values pass through f32 scratch, one per thread, reused across groups.
    let mut scratches: Vec<Vec<f32>> = vec![Vec::new(); workers];
    for (group, dtypes) in fresh.chunks(workers).zip(dtypes.chunks(workers)) {
        let made: Vec<(String, Tensor)> = std::thread::scope(|s| {
            let handles: Vec<_> = group
                .iter()
                .zip(dtypes)
                .zip(scratches.iter_mut())
                .map(|((i, &dtype), scratch)| {
                    s.spawn(move || {
                        let t = Tensor::floats_with(i.shape.clone(), dtype, scratch, |d| {
                            i.factors.fill(i.target, i.which, d)
                        });
                        (i.name.clone(), t)
                    })
                })
                .collect();
            handles.into_iter().filter_map(|h| h.join().ok()).collect()
        });
        if made.len() != group.len() {
            return Err(RuntimeError::Internal {
                what: "LoRA factor layout".into(),
                message: "a filling thread panicked".into(),
            });
        }
        model.set_fixed_inputs(made)?;
    }
    Ok(())
}

/// The factor inputs of every target (`A`, `B` and scale of each).
fn input_names(targets: &[LinearInfo]) -> Vec<String> {
    targets
        .iter()
        .flat_map(|t| v2l_graphs::passes::lora_input_names(&format!("{}.weight", t.name)))
        .collect()
}

/// One LoRA (or none) per slot of the DiT batch.
type Layout = Vec<Option<AppliedLora>>;

fn same_layout(a: &[Option<AppliedLora>], b: &[Option<&AppliedLora>]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(a, b)| AppliedLora::same(a.as_ref(), *b))
}

/// Factor inputs laid out for a layout other than the session's current one.
struct Kept {
    /// Held so the LoRAs' identities (`Arc` addresses) cannot be reused by others meanwhile.
    layout: Layout,
    values: DeviceValues,
    bytes: u64,
}

/// How the kept factor inputs have served (for benchmarks, tests and a server's metrics).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FactorCacheStats {
    /// Layouts kept, and their bytes (where the session reads them: device memory on a GPU).
    pub entries: usize,
    pub bytes: u64,
    /// Switches served from kept inputs, and switches that laid factors out.
    pub hits: u64,
    pub misses: u64,
}

/// The session's factor inputs: which layout they hold now, and those kept for others.
#[derive(Default)]
pub(super) struct FactorInputs {
    /// The layout the session's inputs hold; `None` when unknown (a new session, or a write
    /// that failed part-way).
    holds: Option<Layout>,
    /// Oldest first.
    kept: Vec<Kept>,
    /// Bytes the kept layouts may take (0: none kept, every switch lays factors out in place).
    budget: u64,
    hits: u64,
    misses: u64,
}

impl FactorInputs {
    /// Keeps up to `bytes` of laid-out factor inputs for layouts switched away from; the
    /// least recently used go first. 0 drops every kept layout.
    pub(super) fn set_budget(&mut self, bytes: u64) {
        self.budget = bytes;
        self.trim();
    }

    pub(super) fn stats(&self) -> FactorCacheStats {
        FactorCacheStats {
            entries: self.kept.len(),
            bytes: self.kept.iter().map(|k| k.bytes).sum(),
            hits: self.hits,
            misses: self.misses,
        }
    }

    /// The session was built again: its factor inputs hold nothing yet (kept layouts stay:
    /// their values belong to no session).
    pub(super) fn forget_session(&mut self) {
        self.holds = None;
    }

    /// Sets `model`'s factor inputs for `samples` (one LoRA or none per slot):
    /// nothing to do when they hold that layout already, kept values handed over when it was
    /// kept, else laid out (in place where nothing is to be kept, on `threads` threads).
    /// `bounds`: the inputs' [`Ranks`] and an fp16 engine's factor limit. A refused LoRA leaves
    /// the inputs as they were.
    pub(super) fn lay_out(
        &mut self,
        model: &mut DitModel,
        targets: &[LinearInfo],
        samples: &[Option<&AppliedLora>],
        (ranks, limit): (Ranks, Option<f32>),
        threads: usize,
    ) -> Result<()> {
        if self
            .holds
            .as_deref()
            .is_some_and(|h| same_layout(h, samples))
        {
            return Ok(());
        }
        let names = input_names(targets);
        if let Some(at) = self
            .kept
            .iter()
            .position(|k| same_layout(&k.layout, samples))
        {
            let kept = self.kept.remove(at);
            let current = model.take_fixed(&names);
            self.keep(current);
            self.holds = None;
            model.set_fixed_values(kept.values)?;
            self.holds = Some(kept.layout);
            self.hits += 1;
            return Ok(());
        }
        // Everything a switch can refuse is checked before the inputs are touched.
        let plan = plan_factors(targets, samples, ranks, limit, threads)?;
        if self.budget > 0 {
            let current = model.take_fixed(&names);
            // The values an eviction frees are written over in place: no allocation.
            if let Some(free) = self.keep(current) {
                model.set_fixed_values(free)?;
            }
        }
        self.holds = None;
        write_planned(model, targets, &plan, threads)?;
        if self.budget > 0 {
            // Kept where the session reads them, so a switch back moves nothing.
            model.fixed_to_device(&names)?;
        }
        self.holds = Some(samples.iter().map(|l| l.cloned()).collect());
        self.misses += 1;
        Ok(())
    }

    /// Keeps `values`, the inputs of the layout held until now, within the budget; returns
    /// values that no longer fit (evicted, or these), to be written over.
    fn keep(&mut self, values: DeviceValues) -> Option<DeviceValues> {
        if values.is_empty() {
            return None;
        }
        let Some(layout) = self.holds.take() else {
            return Some(values);
        };
        let bytes = values.bytes();
        self.kept.push(Kept {
            layout,
            values,
            bytes,
        });
        self.trim()
    }

    /// Drops the oldest kept layouts beyond the budget; returns the values of the last one
    /// dropped.
    fn trim(&mut self) -> Option<DeviceValues> {
        let mut freed = None;
        while self.kept.iter().map(|k| k.bytes).sum::<u64>() > self.budget && !self.kept.is_empty()
        {
            freed = Some(self.kept.remove(0).values);
        }
        freed
    }
}
