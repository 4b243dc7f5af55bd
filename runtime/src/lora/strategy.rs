//! Three ways to get a LoRA into the DiT, behind one type.
//!
//! | strategy | how | switch cost | step cost |
//! |---|---|---|---|
//! | `fused` | a new ORT session whose initializers are `W + s·B·A` | a session build | base |
//! | `bound` | one session of `dit_bound.onnx`; targeted weights are inputs, fused weights bound once per LoRA | a fuse of touched layers | weights not constant-folded/prepacked |
//! | `unfused` | one session of `dit_unfused.onnx`; a branch `s·(x·Aᵀ)·Bᵀ` per layer, factors as inputs | copying the factors | one low-rank branch per layer |
//!
//! `bench pipeline` measures them; README says which backend uses which by default and why.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use v2l_export::LinearInfo;

use super::apply::match_targets;
use super::switch::{Buffer, SwitchableWeights};
use crate::error::{Result, RuntimeError};
use crate::session::{Model, SessionOptions};
use crate::stage::{AppliedLora, ExportDir};
use crate::tensor::Tensor;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    #[default]
    Fused,
    Bound,
    Unfused,
}

impl Strategy {
    pub fn name(self) -> &'static str {
        match self {
            Strategy::Fused => "fused",
            Strategy::Bound => "bound",
            Strategy::Unfused => "unfused",
        }
    }

    pub fn parse(s: &str) -> Option<Strategy> {
        [Strategy::Fused, Strategy::Bound, Strategy::Unfused]
            .into_iter()
            .find(|x| x.name() == s)
    }
}

/// The DiT with a LoRA applied by one of the strategies.
pub struct DitRunner {
    pub strategy: Strategy,
    model: Model,
    opts: SessionOptions,
    targets: Vec<LinearInfo>,
    /// `bound`: base and live weights.
    weights: Option<SwitchableWeights>,
}

fn variant(dir: &ExportDir, name: &str) -> Result<PathBuf> {
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
    pub fn load(dir: &ExportDir, opts: &SessionOptions, strategy: Strategy) -> Result<DitRunner> {
        let targets = dir.dit_targets()?.to_vec();
        let mut weights = None;
        let model = match strategy {
            Strategy::Fused => dir.dit(opts)?,
            Strategy::Bound => {
                let mut m = Model::load(&variant(dir, "bound")?, opts)?;
                let e = dir
                    .manifest
                    .dit
                    .as_ref()
                    .ok_or_else(|| RuntimeError::Invalid {
                        what: "engine".into(),
                        message: "no DiT".into(),
                    })?;
                let names: Vec<String> = targets
                    .iter()
                    .map(|t| format!("{}.weight", t.name))
                    .collect();
                let path = dir.dir.join(&e.file);
                let base = v2l_graphs::read_initializers(&path, &names).map_err(|source| {
                    RuntimeError::Io {
                        path: path.clone(),
                        source,
                    }
                })?;
                let mut bufs = Vec::with_capacity(base.len());
                for (t, (name, dtype, _, bytes)) in targets.iter().zip(base) {
                    if dtype != v2l_graphs::DType::F32 {
                        return Err(RuntimeError::Invalid {
                            what: name,
                            message: format!("bound weights need f32, found {dtype}"),
                        });
                    }
                    bufs.push((
                        t.clone(),
                        Buffer::F32(
                            bytes
                                .chunks_exact(4)
                                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                                .collect(),
                        ),
                    ));
                }
                let sw = SwitchableWeights::new(bufs);
                m.set_fixed_inputs(targets.iter().map(|t| live_tensor(&sw, t)).collect())?;
                weights = Some(sw);
                m
            }
            Strategy::Unfused => {
                let mut m = Model::load(&variant(dir, "unfused")?, opts)?;
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
    pub fn set_lora(&mut self, dir: &ExportDir, lora: Option<&AppliedLora>) -> Result<()> {
        match self.strategy {
            Strategy::Fused => {
                self.model = match lora {
                    Some(l) => dir.dit_with_lora(&self.opts, l)?,
                    None => dir.dit(&self.opts)?,
                };
            }
            Strategy::Bound => {
                let sw = self.weights.as_mut().ok_or_else(|| RuntimeError::Invalid {
                    what: "bound".into(),
                    message: "no weights".into(),
                })?;
                let changed =
                    sw.apply(lora.map(|l| (&l.lora, l.multiplier, l.source.as_path())))?;
                let by_name: BTreeMap<&str, &LinearInfo> =
                    self.targets.iter().map(|t| (t.name.as_str(), t)).collect();
                let sw = &*sw;
                let fixed = changed
                    .iter()
                    .filter_map(|n| by_name.get(n.as_str()))
                    .map(|t| live_tensor(sw, t))
                    .collect();
                self.model.set_fixed_inputs(fixed)?;
            }
            Strategy::Unfused => {
                let mut fixed: BTreeMap<String, Tensor> =
                    self.targets.iter().flat_map(zero_factors).collect();
                if let Some(l) = lora {
                    for (t, layer) in match_targets(&l.lora, &self.targets, &l.source)? {
                        let (a, b) = (layer.a.to_f32(), layer.b.to_f32());
                        if a.iter().chain(&b).any(|v| !v.is_finite()) {
                            return Err(RuntimeError::Invalid {
                                what: l.source.display().to_string(),
                                message: format!("layer `{}` holds NaN or Inf", layer.module),
                            });
                        }
                        let [na, nb, ns] =
                            v2l_graphs::passes::lora_input_names(&format!("{}.weight", t.name));
                        let r = layer.rank();
                        fixed.insert(na, Tensor::f32(vec![r, t.in_features], a));
                        fixed.insert(nb, Tensor::f32(vec![t.out_features, r], b));
                        fixed.insert(ns, Tensor::f32(vec![1], vec![layer.scale(l.multiplier)]));
                    }
                }
                self.model.set_fixed_inputs(fixed.into_iter().collect())?;
            }
        }
        Ok(())
    }

    pub fn run(&mut self, inputs: &BTreeMap<String, Tensor>) -> Result<BTreeMap<String, Tensor>> {
        self.model.run(inputs)
    }
}

fn live_tensor(sw: &SwitchableWeights, t: &LinearInfo) -> (String, Tensor) {
    let v = match sw.live(&t.name) {
        Some(Buffer::F32(v)) => v.clone(),
        _ => Vec::new(),
    };
    (
        format!("{}.weight", t.name),
        Tensor::f32(vec![t.out_features, t.in_features], v),
    )
}
