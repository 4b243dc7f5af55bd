//! Three ways to get a LoRA into the DiT, behind one type.
//!
//! | strategy | how | switch cost | step cost |
//! |---|---|---|---|
//! | `fused` | a new ORT session whose initializers are `W + s·B·A` | a session build | base |
//! | `bound` | one session of `dit_bound.onnx`; targeted weights are inputs, passed by reference from the one live copy on every run (the base stays memory-mapped in the weight file) | a fuse of touched layers | weights not constant-folded/prepacked |
//! | `unfused` | one session of `dit_unfused.onnx`; a branch `s·(x·Aᵀ)·Bᵀ` per layer, factors as inputs | copying the factors | one low-rank branch per layer |
//!
//! On an int8 engine `unfused` (the default) keeps the LoRA as an f32 branch beside the int8
//! weights and `fused` re-quantises the fused weights from the f32 base; `bound`, which feeds f32
//! weights, is refused.
//!
//! `bench pipeline` measures them; README says which backend uses which by default and why.

use std::collections::BTreeMap;
use std::path::PathBuf;

use v2l_contracts::LinearInfo;

use super::factors::{plan_factors, FactorCacheStats, FactorInputs, Ranks};
use super::switch::{BaseWeights, Buffer, SwitchableWeights};
use crate::engine::Engine;
use crate::error::{Result, RuntimeError};
use crate::lora::AppliedLora;
use crate::session::{Model, SessionOptions};
use crate::step_cache::{DitModel, FirstBlockState};
use crate::tensor::Tensor;

pub use v2l_contracts::bundle::Strategy;

/// The DiT with a LoRA applied by one of the strategies.
pub struct DitRunner {
    pub strategy: Strategy,
    model: DitModel,
    /// `fused`, and `bound` on a GPU: the LoRA in the session's weights now (to build them
    /// again, cut).
    fused: Option<AppliedLora>,
    opts: SessionOptions,
    targets: Vec<LinearInfo>,
    /// `bound`: base and live weights.
    weights: Option<SwitchableWeights>,
    /// `unfused`: the LoRA of each slot, a group of consecutive samples of the DiT batch (one
    /// entry: every sample's).
    slots: Vec<Option<AppliedLora>>,
    /// `unfused`: what the factor inputs hold, and those kept for other LoRAs.
    factors: FactorInputs,
    /// `unfused`: the rank the factor inputs take.
    ranks: Ranks,
    /// `unfused` on an fp16 engine: the largest factor its branches take (fp16's largest
    /// finite value; they compute in fp16, as PEFT's on an fp16 model).
    factor_limit: Option<f32>,
    /// `bound` on a GPU engine: the session that makes the targeted weights on the device
    /// (`lora_merge.onnx`). Declared after `model`, whose inputs it allocated: dropped after.
    merge: Option<DeviceMerge>,
}

/// `bound` on a GPU engine: each targeted weight made on the device as `W + s·B·A` by one GEMM
/// from the base (held by this session) and a LoRA's factors, written into the buffers the DiT
/// reads by reference. A switch moves the factors (a few MB) up and rewrites the weights in
/// place; a step runs the bare DiT, with no low-rank branch.
struct DeviceMerge {
    model: Model,
    /// The weights' element type, which the factors are given in.
    dtype: v2l_graphs::DType,
    /// The last merge failed after taking the DiT's weights (their buffers, half written, are
    /// gone): why, until a merge succeeds. The DiT refuses to run meanwhile.
    failed: Option<String>,
}

impl DeviceMerge {
    fn load(engine: &Engine, opts: &SessionOptions) -> Result<Option<DeviceMerge>> {
        let graph = v2l_contracts::bundle::VariantGraph::LoraMerge;
        let Some(file) = engine.dit_variant(graph) else {
            return Ok(None);
        };
        use crate::backend::Precision;
        let dtype = match engine.precision() {
            Precision::Fp32 => v2l_graphs::DType::F32,
            Precision::Bf16 => v2l_graphs::DType::BF16,
            Precision::Fp16 => v2l_graphs::DType::F16,
            p => {
                return Err(RuntimeError::Engine {
                    dir: engine.dir.clone(),
                    message: format!("a {} engine has no LoRA merge graph", p.name()),
                })
            }
        };
        let model = Model::load_for_handoff(&engine.dir.join(file), opts)?;
        Ok(Some(DeviceMerge {
            model,
            dtype,
            failed: None,
        }))
    }

    /// Makes `dit`'s targeted weights with `lora` merged (the base where it is `None` or has
    /// no layer: zero factors add exact zeros), in the buffers `dit` held. Everything a switch
    /// can refuse is checked before any buffer is touched.
    fn merge_into(
        &mut self,
        dit: &mut DitModel,
        targets: &[LinearInfo],
        lora: Option<&AppliedLora>,
        limit: Option<f32>,
    ) -> Result<()> {
        let inputs = merge_inputs(targets, lora, limit, self.dtype)?;
        let names: Vec<String> = targets
            .iter()
            .map(|t| format!("{}.weight", t.name))
            .collect();
        let reuse = dit.take_fixed(&names);
        let done = self
            .model
            .run_on_device(&inputs, reuse)
            .and_then(|merged| dit.set_fixed_values(merged));
        self.failed = done.as_ref().err().map(|e| e.to_string());
        done
    }

    /// An error while the DiT has no weights (a failed merge), naming why.
    fn check_weights(&self) -> Result<()> {
        match &self.failed {
            None => Ok(()),
            Some(why) => Err(RuntimeError::Invalid {
                what: "DiT weights".into(),
                message: format!(
                    "the LoRA merge on the device failed ({why}), leaving the DiT without its weights; set a LoRA (or none) again"
                ),
            }),
        }
    }
}

/// The inputs of `lora_merge.onnx` for `lora` (`None`: the base) on `targets`, in the weights'
/// type `dtype` (f32, bf16 or f16, rounded to nearest): per target `<module>.lora_A [rank, in]`
/// and `<module>.lora_B [out, rank]` with the LoRA's scale folded into B (rank 1 of zeros
/// where the LoRA has no layer). `limit`: the largest magnitude a factor may take (an fp16
/// engine's range), refused by name beyond it.
pub fn merge_inputs(
    targets: &[LinearInfo],
    lora: Option<&AppliedLora>,
    limit: Option<f32>,
    dtype: v2l_graphs::DType,
) -> Result<BTreeMap<String, Tensor>> {
    let plan = plan_factors(targets, &[lora], Ranks::default(), limit, 0)?;
    let mut inputs = BTreeMap::new();
    for (t, f) in targets.iter().zip(&plan) {
        let [a, b, _] = v2l_graphs::passes::lora_input_names(&format!("{}.weight", t.name));
        let [sa, sb, _] = f.shapes(t);
        let (mut fa, mut fb, mut scale) = (
            vec![0f32; sa.iter().product()],
            vec![0f32; sb.iter().product()],
            [0f32],
        );
        f.fill(t, 0, &mut fa);
        f.fill(t, 1, &mut fb);
        f.fill(t, 2, &mut scale);
        let [scale] = scale;
        fb.iter_mut().for_each(|v| *v *= scale);
        if let Some(v) = limit.and_then(|l| fb.iter().find(|v| v.abs() > l)) {
            return Err(RuntimeError::LoraLayer {
                layer: t.name.clone(),
                message: format!(
                    "a factor scaled to {v} is beyond this fp16 engine's range (±{}): use a bf16 or fp32 engine",
                    limit.unwrap_or_default()
                ),
            });
        }
        // One slot: `[1, rank, in]` and `[1, out, rank]` are the graph's `[rank, in]` and
        // `[out, rank]`.
        let (r, n_in, n_out) = (f.rank, t.in_features, t.out_features);
        if let Some(l) = limit {
            check_merged_range(&t.name, &fa, &fb, (r, n_in), l)?;
        }
        inputs.insert(a, Tensor::floats(vec![r, n_in], fa, dtype));
        inputs.insert(b, Tensor::floats(vec![n_out, r], fb, dtype));
    }
    Ok(inputs)
}

/// Refuses a LoRA whose product `B·A` could take a merged fp16 weight past `limit`: each
/// row's `Σₖ |Bᵢₖ|·maxⱼ |Aₖⱼ|` bounds every entry of that row of `B·A`, and half the range is
/// left to the base weight (trained weights stay within ±10). The merge runs on the device,
/// where an overflow would be an infinite weight and every later frame NaN.
fn check_merged_range(
    layer: &str,
    a: &[f32],
    b: &[f32],
    (rank, n_in): (usize, usize),
    limit: f32,
) -> Result<()> {
    if rank == 0 || n_in == 0 {
        return Ok(());
    }
    let a_max: Vec<f32> = (a.chunks(n_in))
        .map(|row| row.iter().fold(0f32, |m, v| m.max(v.abs())))
        .collect();
    let worst = (b.chunks(rank))
        .map(|row| {
            row.iter()
                .zip(&a_max)
                .map(|(b, a)| b.abs() * a)
                .sum::<f32>()
        })
        .fold(0f32, f32::max);
    if worst > limit / 2.0 {
        return Err(RuntimeError::LoraLayer {
            layer: layer.to_string(),
            message: format!(
                "merged into its fp16 weight, the LoRA could reach {worst:.3e} (|B|·max|A| by row), beyond half this fp16 engine's range (±{limit}; the other half is the base weight's): use a bf16 or fp32 engine"
            ),
        });
    }
    Ok(())
}

fn variant(engine: &Engine, strategy: Strategy) -> Result<PathBuf> {
    let graph = v2l_contracts::bundle::VariantGraph::Strategy(strategy);
    engine.dit_variant(graph)
        .map(|f| engine.dir.join(f))
        .ok_or_else(|| RuntimeError::Engine {
            dir: engine.dir.clone(),
            message: format!("the `{}` LoRA strategy needs an engine bundle with its DiT variant; run `v2l-compile` on the export", strategy.name()),
        })
}

impl DitRunner {
    pub fn load(engine: &Engine, opts: &SessionOptions, strategy: Strategy) -> Result<DitRunner> {
        let targets = engine.dit_targets()?.to_vec();
        let mut weights = None;
        let mut merge = match strategy {
            Strategy::Bound => DeviceMerge::load(engine, opts)?,
            _ => None,
        };
        match strategy {
            Strategy::Bound if merge.is_some() => {}
            Strategy::Bound if engine.precision() != crate::backend::Precision::Fp32 => {
                return Err(RuntimeError::Engine {
                    dir: engine.dir.clone(),
                    message: format!(
                        "the `bound` LoRA strategy feeds f32 weights; this {} engine uses `unfused` or `fused`",
                        engine.precision().name()
                    ),
                })
            }
            Strategy::Bound => {
                let e = engine
                    .manifest
                    .dit
                    .as_ref()
                    .ok_or_else(|| RuntimeError::Internal {
                        what: "engine".into(),
                        message: "no DiT".into(),
                    })?;
                let sw =
                    SwitchableWeights::from_base(mapped_base(&engine.dir.join(&e.file), &targets)?);
                weights = Some(sw);
            }
            Strategy::Fused | Strategy::Unfused => {}
        }
        let mut model = dit_load(engine, opts, strategy, None)?.load(false)?;
        let mut factors = FactorInputs::default();
        let ranks = factor_ranks(engine.bundle.as_ref().and_then(|b| b.max_rank), opts);
        if strategy == Strategy::Unfused {
            factors.lay_out(&mut model, &targets, &[None], (ranks, None), opts.threads)?;
        }
        let factor_limit = (engine.precision() == crate::backend::Precision::Fp16)
            .then(|| half::f16::MAX.to_f32());
        if let Some(m) = &mut merge {
            m.merge_into(&mut model, &targets, None, factor_limit)?;
        }
        Ok(DitRunner {
            strategy,
            model,
            fused: None,
            opts: opts.clone(),
            targets,
            weights,
            slots: vec![None],
            factors,
            ranks,
            factor_limit,
            merge,
        })
    }

    /// Applies `lora` (or the base weights for `None`). Everything is validated first: a
    /// refused LoRA leaves the previous one in place.
    pub fn set_lora(&mut self, engine: &Engine, lora: Option<&AppliedLora>) -> Result<()> {
        match self.strategy {
            Strategy::Fused => {
                let cut = self.model.is_cut();
                self.model = dit_load(engine, &self.opts, Strategy::Fused, lora)?.load(cut)?;
                self.fused = lora.cloned();
            }
            // A GPU engine merges on the device; the session reads the result by reference.
            Strategy::Bound if self.weights.is_none() => {
                let m = self.merge.as_mut().ok_or_else(|| RuntimeError::Internal {
                    what: "bound".into(),
                    message: "neither live weights nor a merge session".into(),
                })?;
                m.merge_into(&mut self.model, &self.targets, lora, self.factor_limit)?;
                self.fused = lora.cloned();
            }
            // The session reads the live weights by reference on every run, so rewriting them
            // is the whole switch.
            Strategy::Bound => {
                if let Some(sw) = self.weights.as_mut() {
                    sw.apply(lora.map(|l| (&*l.lora, l.multiplier, l.source.as_path())))?;
                }
            }
            Strategy::Unfused => self.set_sample_loras(engine, &[lora])?,
        }
        Ok(())
    }

    /// `unfused`: keep up to `bytes` of laid-out factor inputs for LoRAs switched away from
    /// (where the session reads them: the device's memory on a GPU), so that switching back to
    /// one moves no factor ([`crate::lora::factors`]). 0 (the default) keeps none. Other
    /// strategies have no factor inputs to keep.
    pub fn set_factor_cache(&mut self, bytes: u64) {
        self.factors.set_budget(bytes);
    }

    /// How the kept factor inputs have served.
    pub fn factor_cache_stats(&self) -> FactorCacheStats {
        self.factors.stats()
    }

    /// `unfused` only: one LoRA (or none) per group of consecutive samples of the DiT batch,
    /// which splits evenly into `samples.len()` groups (one per sample, or one per request
    /// with its guidance samples): the DiT then runs requests with different LoRAs in one
    /// call. A single entry applies to the whole batch (what [`DitRunner::set_lora`] sets).
    ///
    /// Each entry is one slot of factors, applied to its group's rows as one matrix: a
    /// request with guidance lays out, checks, keeps and (on a GPU) moves up its factors once,
    /// not once per sample, and given one entry per request its branch multiplies the same
    /// matrices alone or in a batch, so its output does not depend on its company (bitwise,
    /// on the CPU; `tests/batched_loras.rs`).
    pub fn set_sample_loras(
        &mut self,
        _engine: &Engine,
        samples: &[Option<&AppliedLora>],
    ) -> Result<()> {
        if self.strategy != Strategy::Unfused {
            return Err(RuntimeError::Invalid {
                what: "LoRA strategy".into(),
                message: format!(
                    "requests with different LoRAs share a DiT call only with the `unfused` strategy; this pipeline uses `{}`",
                    self.strategy.name()
                ),
            });
        }
        if samples.is_empty() {
            return Err(RuntimeError::Invalid {
                what: "LoRAs per sample".into(),
                message: "none given: give one entry (none for the base) per group of samples"
                    .into(),
            });
        }
        let owned: Vec<Option<AppliedLora>> = samples.iter().map(|l| l.cloned()).collect();
        // Validated now: a refused LoRA leaves the previous one in place.
        self.lay_out(&owned)?;
        self.slots = owned;
        Ok(())
    }

    /// Sets the factor inputs, one slot per entry of `slots`.
    fn lay_out(&mut self, slots: &[Option<AppliedLora>]) -> Result<()> {
        let slots: Vec<Option<&AppliedLora>> = slots.iter().map(|l| l.as_ref()).collect();
        let bounds = (self.ranks, self.factor_limit);
        let threads = self.opts.threads;
        self.factors
            .lay_out(&mut self.model, &self.targets, &slots, bounds, threads)
    }

    /// Runs the DiT from now on as three sessions (head, blocks, output) so that step caching
    /// can skip the blocks ([`DitRunner::run_cached`]); the LoRA in place stays. Done once: a
    /// DiT already cut is kept.
    pub fn cut_for_caching(&mut self, engine: &Engine) -> Result<()> {
        if self.model.is_cut() {
            return Ok(());
        }
        let plan = dit_load(engine, &self.opts, self.strategy, self.fused.as_ref())?;
        // Read (and refused) before anything is released: a graph without cut points.
        let graph = crate::step_cache::cut_names(&plan.path)?;
        // The whole DiT goes first, so its weights are not held twice. Should the cut fail,
        // the whole DiT is built again and the error returned.
        self.model = DitModel::Released;
        let failure = match DitModel::load_cut(&plan.path, graph, &plan.opts, plan.weights) {
            Ok(m) => {
                self.model = m;
                None
            }
            Err(e) => {
                let whole = dit_load(engine, &self.opts, self.strategy, self.fused.as_ref())?;
                self.model = whole.load(false)?;
                Some(e)
            }
        };
        if self.strategy == Strategy::Unfused {
            self.factors.forget_session();
            let slots = self.slots.clone();
            self.lay_out(&slots)?;
        }
        if let Some(m) = &mut self.merge {
            m.merge_into(
                &mut self.model,
                &self.targets,
                self.fused.as_ref(),
                self.factor_limit,
            )?;
        }
        failure.map_or(Ok(()), Err)
    }

    /// Inputs that stay the same for a request's every step (text, image tokens, RoPE tables):
    /// set once, passed by reference, on a GPU kept on the device. Inputs given to
    /// [`DitRunner::run`] under the same names take precedence.
    pub fn set_constant_inputs(&mut self, inputs: BTreeMap<String, Tensor>) -> Result<()> {
        let takes = self.model.input_names();
        self.model.set_fixed_inputs(
            inputs
                .into_iter()
                .filter(|(name, _)| takes.contains(name))
                .collect(),
        )
    }

    pub fn run(&mut self, inputs: &BTreeMap<String, Tensor>) -> Result<BTreeMap<String, Tensor>> {
        self.run_core(inputs, None)
    }

    /// [`DitRunner::run`] under First Block Cache (after [`DitRunner::cut_for_caching`]):
    /// the blocks after the first run only when `state` says so.
    pub fn run_cached(
        &mut self,
        inputs: &BTreeMap<String, Tensor>,
        state: &mut FirstBlockState,
    ) -> Result<BTreeMap<String, Tensor>> {
        self.run_core(inputs, Some(state))
    }

    fn run_core(
        &mut self,
        inputs: &BTreeMap<String, Tensor>,
        state: Option<&mut FirstBlockState>,
    ) -> Result<BTreeMap<String, Tensor>> {
        if let Some(m) = &self.merge {
            m.check_weights()?;
        }
        if self.strategy == Strategy::Unfused {
            let batch = inputs
                .get(v2l_contracts::io::dit::HIDDEN_STATES)
                .and_then(|h| h.shape.first().copied())
                .unwrap_or(1);
            // Each slot takes an equal group of the batch's samples.
            if !batch.is_multiple_of(self.slots.len()) {
                return Err(RuntimeError::Graph {
                    graph: "DiT batch".into(),
                    message: format!(
                        "{batch} samples do not split into the {} groups LoRAs were set for",
                        self.slots.len()
                    ),
                });
            }
        }
        let Some(sw) = &self.weights else {
            return match state {
                Some(state) => self.model.run_cached(inputs, &[], state),
                None => self.model.run_with(inputs, &[]),
            };
        };
        let names: Vec<String> = self
            .targets
            .iter()
            .map(|t| format!("{}.weight", t.name))
            .collect();
        let shapes: Vec<[usize; 2]> = self
            .targets
            .iter()
            .map(|t| [t.out_features, t.in_features])
            .collect();
        let mut bound = Vec::with_capacity(names.len());
        for ((t, name), shape) in self.targets.iter().zip(&names).zip(&shapes) {
            let Some(Buffer::F32(v)) = sw.live(&t.name) else {
                return Err(RuntimeError::Graph {
                    graph: name.clone(),
                    message: "bound weights need f32".into(),
                });
            };
            bound.push((name.as_str(), &shape[..], v.as_slice()));
        }
        match state {
            Some(state) => self.model.run_cached(inputs, &bound, state),
            None => self.model.run_with(inputs, &bound),
        }
    }
}

/// The base of every targeted weight, memory-mapped from the DiT's external weight file when it
/// has one (f32 only: the `bound` graph takes f32 weights), so `bound` holds one copy in memory:
/// the live weights.
fn mapped_base(
    model: &std::path::Path,
    targets: &[LinearInfo],
) -> Result<Vec<(LinearInfo, BaseWeights)>> {
    use v2l_graphs::InitializerData;
    let names: Vec<String> = targets
        .iter()
        .map(|t| format!("{}.weight", t.name))
        .collect();
    let io = |path: &std::path::Path| {
        let path = path.to_path_buf();
        move |source| RuntimeError::Io { path, source }
    };
    let infos = v2l_graphs::locate_initializers(model, &names).map_err(io(model))?;
    let mut maps: BTreeMap<PathBuf, std::sync::Arc<memmap2::Mmap>> = BTreeMap::new();
    let mut out = Vec::with_capacity(infos.len());
    for (t, info) in targets.iter().zip(infos) {
        let bad = |message: String| RuntimeError::BadFile {
            path: model.to_path_buf(),
            message,
        };
        if info.dtype != v2l_graphs::DType::F32 {
            return Err(RuntimeError::Graph {
                graph: info.name,
                message: format!("bound weights need f32, found {}", info.dtype),
            });
        }
        let want = t.out_features * t.in_features * 4;
        let base = match info.data {
            InitializerData::Inline(bytes) => {
                if bytes.len() != want {
                    return Err(bad(format!(
                        "`{}` holds {} bytes, expected {want}",
                        info.name,
                        bytes.len()
                    )));
                }
                BaseWeights::Owned(
                    Buffer::from_le_bytes(info.dtype, &bytes).unwrap_or(Buffer::F32(Vec::new())),
                )
            }
            InitializerData::External { file, offset, len } => {
                let map = match maps.get(&file) {
                    Some(m) => m.clone(),
                    None => {
                        let f = std::fs::File::open(&file).map_err(io(&file))?;
                        let m = std::sync::Arc::new(
                            v2l_kernels::memory::map_weights(&f).map_err(io(&file))?,
                        );
                        maps.insert(file.clone(), m.clone());
                        m
                    }
                };
                if len != want {
                    return Err(bad(format!(
                        "`{}` holds {len} bytes, expected {want}",
                        info.name
                    )));
                }
                BaseWeights::mapped(map, offset as usize, len, info.dtype).ok_or_else(|| {
                    bad(format!(
                        "`{}`: external data out of range or misaligned",
                        info.name
                    ))
                })?
            }
        };
        out.push((t.clone(), base));
    }
    Ok(out)
}

/// What a DiT session is built from: the graph, its options, and weights given in place of the
/// graph file's (a fused LoRA).
struct DitLoad {
    path: PathBuf,
    opts: SessionOptions,
    weights: Vec<(String, Tensor)>,
}

impl DitLoad {
    fn load(self, cut: bool) -> Result<DitModel> {
        DitModel::load(&self.path, &self.opts, self.weights, cut)
    }
}

/// The DiT session `strategy` runs, with `lora` fused for `fused` (other strategies apply
/// their LoRA after the session is built).
/// The rank of `engine`'s `unfused` factor inputs in sessions made with `opts`: at most the
/// engine's `--max-rank`, padded to it where a session needs one shape (TensorRT; a cuda
/// session capturing CUDA graphs; a CPU engine compiled with `--max-rank`), else each layout's
/// own largest rank (a plain cuda session: any shape costs nothing there).
fn factor_ranks(max: Option<usize>, opts: &SessionOptions) -> Ranks {
    use crate::backend::Backend;
    let pad = match opts.backend.backend {
        Backend::Cuda => opts.runs_bound(),
        Backend::Cpu | Backend::TensorRt => true,
    };
    Ranks { max, pad }
}

fn dit_load(
    engine: &Engine,
    opts: &SessionOptions,
    strategy: Strategy,
    lora: Option<&AppliedLora>,
) -> Result<DitLoad> {
    Ok(match (strategy, lora) {
        (Strategy::Fused, Some(l)) => fused_load(engine, opts, l)?,
        (Strategy::Fused, None) => DitLoad {
            path: engine.dit_path()?,
            opts: engine.dit_options(opts),
            weights: Vec::new(),
        },
        (Strategy::Bound, _) => DitLoad {
            path: variant(engine, Strategy::Bound)?,
            // A GPU engine's `bound` graph is its precision's graph, weights aside.
            opts: match engine.dit_variant(v2l_contracts::bundle::VariantGraph::LoraMerge) {
                Some(_) => engine.dit_options(opts),
                None => opts.clone(),
            },
            weights: Vec::new(),
        },
        (Strategy::Unfused, _) => DitLoad {
            path: variant(engine, Strategy::Unfused)?,
            opts: engine.dit_options(opts),
            weights: Vec::new(),
        },
    })
}

/// Loads `engine`'s DiT with `lora` fused into its weights (an ORT session built with the fused
/// initializers in place of the base ones): the `fused` strategy, and `stage dit --lora`.
pub fn fused_dit(engine: &Engine, opts: &SessionOptions, lora: &AppliedLora) -> Result<Model> {
    let plan = fused_load(engine, opts, lora)?;
    Model::load_with_weights(&plan.path, &plan.opts, plan.weights)
}

fn fused_load(engine: &Engine, opts: &SessionOptions, lora: &AppliedLora) -> Result<DitLoad> {
    let e = engine
        .manifest
        .dit
        .as_ref()
        .ok_or_else(|| engine.missing("DiT", "dit"))?;
    // The f32 base is the export's graph in every engine; a low-precision engine's graph takes
    // the fused weights rounded or re-quantised to the type it stores them in.
    let base = engine.dir.join(&e.file);
    let stored = engine
        .bundle
        .as_ref()
        .map(crate::bundle::stored)
        .unwrap_or_default();
    let weights = crate::lora::apply::fused_weights(
        &base,
        &e.lora_targets,
        &lora.lora,
        lora.multiplier,
        &lora.source,
        &stored,
    )?;
    let path = engine.dit_path()?;
    let mut opts = opts.clone();
    // A static int8 engine's weights reach `Transpose`/`QuantizeLinear`, which ONNX Runtime's
    // optimisers fold from the model file's weights, ignoring the fused ones given to the
    // session (ORT 1.31; disabling ConstantFolding, TransposeOptimizer and the Q/DQ
    // transformers by name was not enough): that session runs unoptimised (slower steps, exact
    // LoRA). `unfused`, the default on these engines, is unaffected.
    let qdq = engine
        .bundle
        .as_ref()
        .is_some_and(|b| b.calibration.is_some());
    opts.unoptimized |= qdq;
    if opts.backend.backend == crate::backend::Backend::TensorRt {
        // TensorRT's engine cache key ignores weight values: key this session's engine by
        // its fused weights, or a cached engine of another LoRA (or the base) would be reused.
        let mut h = crate::backend::PartsHasher::default();
        h.part(opts.backend.weight_hash.as_bytes());
        for (name, t) in &weights {
            h.part(name.as_bytes());
            h.part(t.data.le_bytes());
        }
        opts.backend.weight_hash = h.finish();
    }
    let mut session = engine.dit_options(&opts);
    session.qdq_matmul &= !qdq;
    Ok(DitLoad {
        path,
        opts: session,
        weights,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Backend;

    /// An fp16 engine's merge refuses a LoRA whose `B·A` could pass half of fp16's range, by
    /// its layer, and takes one just inside; without a limit (bf16, fp32) both pass.
    #[test]
    fn an_fp16_merge_refuses_a_product_past_its_range() {
        use crate::lora::format::{Factor, Lora, LoraFormat, LoraLayer};
        let target = v2l_contracts::LinearInfo {
            name: "blocks.0.to_q".into(),
            out_features: 3,
            in_features: 2,
        };
        // Rank 2, alpha 2 (scale 1): row 0 of B·A is bounded by 100·150 + 80·10 = 15,800
        // (and reaches it), twice that past half of ±65,504.
        let lora = |b0: f32| {
            let layer = LoraLayer {
                module: "blocks.0.to_q".into(),
                a: Factor::from_f32([2, 2], &[150.0, -3.0, 10.0, 1.0]),
                b: Factor::from_f32([3, 2], &[b0, 80.0, 1.0, 0.0, 0.0, 1.0]),
                alpha: 2.0,
            };
            AppliedLora {
                lora: std::sync::Arc::new(Lora {
                    format: LoraFormat::Diffusers,
                    layers: vec![layer],
                }),
                source: "l.safetensors".into(),
                multiplier: 1.0,
            }
        };
        let fp16 = Some(half::f16::MAX.to_f32());
        let targets = [target];
        let (inside, past) = (lora(100.0), lora(300.0));
        assert!(merge_inputs(&targets, Some(&inside), fp16, v2l_graphs::DType::F16).is_ok());
        let e = merge_inputs(&targets, Some(&past), fp16, v2l_graphs::DType::F16).unwrap_err();
        let e = e.to_string();
        assert!(
            e.contains("blocks.0.to_q") && e.contains("could reach 4.580e4"),
            "{e}"
        );
        assert!(merge_inputs(&targets, Some(&past), None, v2l_graphs::DType::BF16).is_ok());
    }

    /// A plain cuda session takes each layout's own rank (at most the engine's); sessions that
    /// need one shape pad to it; the cap holds either way.
    #[test]
    fn factor_inputs_are_padded_only_where_a_session_needs_one_shape() {
        let opts = |backend, bound_runs| {
            let mut o = SessionOptions {
                bound_runs,
                ..Default::default()
            };
            o.backend.backend = backend;
            o
        };
        let cases = [
            (Backend::Cuda, false, false),
            (Backend::Cuda, true, true),
            (Backend::TensorRt, false, true),
            (Backend::Cpu, false, true),
        ];
        for (backend, bound, pad) in cases {
            let r = factor_ranks(Some(64), &opts(backend, bound));
            assert_eq!(
                r,
                Ranks { max: Some(64), pad },
                "{backend:?}, bound {bound}"
            );
        }
        // CUDA graphs from the engine's own options: its sessions run bound, so they pad too.
        let mut from_bundle = opts(Backend::Cuda, false);
        (from_bundle.backend.cuda).insert("enable_cuda_graph".into(), "1".into());
        assert!(factor_ranks(Some(64), &from_bundle).pad);
        let plain = factor_ranks(Some(64), &opts(Backend::Cuda, false));
        let graphs = factor_ranks(Some(64), &opts(Backend::Cuda, true));
        assert_eq!((plain.of(1), graphs.of(1)), (Ok(1), Ok(64)));
        assert_eq!((plain.of(65), graphs.of(65)), (Err(65), Err(65)));
        // An engine without a largest rank (a CPU engine by default): each layout's own.
        assert_eq!(
            factor_ranks(None, &opts(Backend::Cpu, false)).of(80),
            Ok(80)
        );
    }
}
