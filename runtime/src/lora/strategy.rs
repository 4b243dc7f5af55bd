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

use super::apply::match_targets;
use super::switch::{BaseWeights, Buffer, SwitchableWeights};
use crate::engine::Engine;
use crate::error::{Result, RuntimeError};
use crate::lora::AppliedLora;
use crate::session::{Model, SessionOptions};
use crate::tensor::Tensor;

pub use v2l_contracts::bundle::Strategy;

/// The DiT with a LoRA applied by one of the strategies.
pub struct DitRunner {
    pub strategy: Strategy,
    model: Model,
    opts: SessionOptions,
    targets: Vec<LinearInfo>,
    /// `bound`: base and live weights.
    weights: Option<SwitchableWeights>,
}

fn variant(dir: &Engine, name: &str) -> Result<PathBuf> {
    dir.bundle
        .as_ref()
        .and_then(|b| b.dit_variants.get(name))
        .map(|f| dir.dir.join(f))
        .ok_or_else(|| RuntimeError::Invalid {
            what: dir.dir.display().to_string(),
            message: format!("the `{name}` LoRA strategy needs an engine bundle with its DiT variant; run `v2l-compile` on the export"),
        })
}

fn zero_factors(t: &LinearInfo) -> [(String, Tensor); 3] {
    let [a, b, s] = v2l_graphs::passes::lora_input_names(&format!("{}.weight", t.name));
    [
        (a, Tensor::zeros(vec![1, t.in_features])),
        (b, Tensor::zeros(vec![t.out_features, 1])),
        (s, Tensor::zeros(vec![1])),
    ]
}

impl DitRunner {
    pub fn load(dir: &Engine, opts: &SessionOptions, strategy: Strategy) -> Result<DitRunner> {
        let targets = dir.dit_targets()?.to_vec();
        let mut weights = None;
        let model = match strategy {
            Strategy::Fused => dir.dit(opts)?,
            Strategy::Bound if dir.precision() != crate::backend::Precision::Fp32 => {
                return Err(RuntimeError::Invalid {
                    what: dir.dir.display().to_string(),
                    message: format!(
                        "the `bound` LoRA strategy feeds f32 weights; this {} engine uses `unfused` or `fused`",
                        dir.precision().name()
                    ),
                })
            }
            Strategy::Bound => {
                let e = dir
                    .manifest
                    .dit
                    .as_ref()
                    .ok_or_else(|| RuntimeError::Invalid {
                        what: "engine".into(),
                        message: "no DiT".into(),
                    })?;
                let sw =
                    SwitchableWeights::from_base(mapped_base(&dir.dir.join(&e.file), &targets)?);
                weights = Some(sw);
                Model::load(&variant(dir, "bound")?, opts)?
            }
            Strategy::Unfused => {
                let mut m = Model::load(&variant(dir, "unfused")?, &dir.dit_options(opts))?;
                m.set_fixed_inputs(targets.iter().flat_map(zero_factors).collect())?;
                m
            }
        };
        Ok(DitRunner {
            strategy,
            model,
            opts: opts.clone(),
            targets,
            weights,
        })
    }

    /// Applies `lora` (or the base weights for `None`). Everything is validated first: a
    /// refused LoRA leaves the previous one in place.
    pub fn set_lora(&mut self, dir: &Engine, lora: Option<&AppliedLora>) -> Result<()> {
        match self.strategy {
            Strategy::Fused => {
                self.model = match lora {
                    Some(l) => fused_dit(dir, &self.opts, l)?,
                    None => dir.dit(&self.opts)?,
                };
            }
            Strategy::Bound => {
                let sw = self.weights.as_mut().ok_or_else(|| RuntimeError::Invalid {
                    what: "bound".into(),
                    message: "no weights".into(),
                })?;
                // The session reads the live weights by reference on every run, so
                // rewriting them is the whole switch.
                sw.apply(lora.map(|l| (&*l.lora, l.multiplier, l.source.as_path())))?;
            }
            Strategy::Unfused => {
                let mut fixed: BTreeMap<String, Tensor> =
                    self.targets.iter().flat_map(zero_factors).collect();
                if let Some(l) = lora {
                    for (t, layer) in match_targets(&l.lora, &self.targets, &l.source)? {
                        let fp = layer.fuse_plan(l.multiplier);
                        fp.check_finite(&layer.module)
                            .map_err(|e| RuntimeError::Fuse {
                                what: l.source.display().to_string(),
                                source: e,
                            })?;
                        let [na, nb, ns] =
                            v2l_graphs::passes::lora_input_names(&format!("{}.weight", t.name));
                        let r = fp.rank;
                        fixed.insert(na, Tensor::f32(vec![r, t.in_features], fp.a));
                        fixed.insert(nb, Tensor::f32(vec![t.out_features, r], fp.b));
                        fixed.insert(ns, Tensor::f32(vec![1], vec![fp.scale]));
                    }
                }
                self.model.set_fixed_inputs(fixed.into_iter().collect())?;
            }
        }
        Ok(())
    }

    pub fn run(&mut self, inputs: &BTreeMap<String, Tensor>) -> Result<BTreeMap<String, Tensor>> {
        let Some(sw) = &self.weights else {
            return self.model.run(inputs);
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
                return Err(RuntimeError::Invalid {
                    what: name.clone(),
                    message: "bound weights need f32".into(),
                });
            };
            bound.push((name.as_str(), &shape[..], v.as_slice()));
        }
        self.model.run_with(inputs, &bound)
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
            return Err(RuntimeError::Invalid {
                what: info.name,
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
                        // SAFETY: bundle files are written once and verified on load; v2l never
                        // writes to a weight file it has mapped.
                        let m = std::sync::Arc::new(
                            unsafe { memmap2::Mmap::map(&f) }.map_err(io(&file))?,
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

/// Loads `engine`'s DiT with `lora` fused into its weights (an ORT session built with the fused
/// initializers in place of the base ones): the `fused` strategy, and `stage dit --lora`.
pub fn fused_dit(engine: &Engine, opts: &SessionOptions, lora: &AppliedLora) -> Result<Model> {
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
    Model::load_with_weights(&path, &session, weights)
}
