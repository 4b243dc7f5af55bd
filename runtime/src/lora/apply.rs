//! Applying a LoRA to a model's weights: match layers to targets, fuse from the base weights.

use std::path::Path;

use v2l_contracts::LinearInfo;

use super::format::{Lora, LoraError, LoraLayer};
use super::fuse::{fuse_from, Weights, WeightsMut};
use crate::error::{Result, RuntimeError};
use crate::tensor::Tensor;

/// Pairs every LoRA layer with the model's linear layer of the same module path, checking shapes.
/// A layer that matches nothing is an error (a LoRA for another model must not half-apply).
pub fn match_targets<'a>(
    lora: &'a Lora,
    targets: &'a [LinearInfo],
    source: &Path,
) -> std::result::Result<Vec<(&'a LinearInfo, &'a LoraLayer)>, LoraError> {
    let by_name: std::collections::HashMap<&str, &LinearInfo> =
        targets.iter().map(|t| (t.name.as_str(), t)).collect();
    let unmatched: Vec<&LoraLayer> = lora
        .layers
        .iter()
        .filter(|l| !by_name.contains_key(l.module.as_str()))
        .collect();
    if let Some(first) = unmatched.first() {
        return Err(LoraError::Unmatched {
            path: source.into(),
            count: unmatched.len(),
            total: lora.layers.len(),
            first: first.module.clone(),
        });
    }
    lora.layers
        .iter()
        .filter_map(|l| by_name.get(l.module.as_str()).map(|&t| (t, l)))
        .map(|(t, l)| {
            if l.b.shape[0] != t.out_features || l.a.shape[1] != t.in_features {
                return Err(LoraError::TargetShape {
                    path: source.into(),
                    module: l.module.clone(),
                    out: l.b.shape[0],
                    inp: l.a.shape[1],
                    w_out: t.out_features,
                    w_in: t.in_features,
                });
            }
            Ok((t, l))
        })
        .collect()
}

/// The fused weights `W + s·B·A` (s = multiplier·alpha/r) of every layer `lora` touches, read
/// from the base weights in the ONNX model at `model`, named as its initializers.
pub fn fused_weights(
    model: &Path,
    targets: &[LinearInfo],
    lora: &Lora,
    multiplier: f32,
    source: &Path,
) -> Result<Vec<(String, Tensor)>> {
    let pairs = match_targets(lora, targets, source)?;
    let names: Vec<String> = pairs
        .iter()
        .map(|(t, _)| format!("{}.weight", t.name))
        .collect();
    let base = v2l_graphs::read_initializers(model, &names).map_err(|source| RuntimeError::Io {
        path: model.into(),
        source,
    })?;
    let mut out = Vec::with_capacity(pairs.len());
    for ((t, l), (name, dtype, _, bytes)) in pairs.into_iter().zip(base) {
        if dtype != v2l_graphs::DType::F32 {
            return Err(RuntimeError::Invalid {
                what: model.display().to_string(),
                message: format!("`{name}` is stored as {dtype}; fusing into f16/bf16 engine weights needs an engine bundle (not yet)"),
            });
        }
        let w: Vec<f32> = bytemuck::pod_collect_to_vec(&bytes);
        let mut fused = vec![0f32; w.len()];
        let plan = l.fuse_plan(multiplier);
        fuse_from(
            Weights::F32(&w),
            WeightsMut::F32(&mut fused),
            t.out_features,
            t.in_features,
            &plan.factors(),
            0,
        )
        .map_err(|e| RuntimeError::Fuse {
            what: name.clone(),
            source: e,
        })?;
        out.push((
            name,
            Tensor::f32(vec![t.out_features, t.in_features], fused),
        ));
    }
    Ok(out)
}
