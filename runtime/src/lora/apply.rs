//! Applying a LoRA to a model's weights: match layers to targets, fuse from the base weights.

use std::collections::BTreeMap;
use std::path::Path;

use v2l_contracts::LinearInfo;

use super::format::{Lora, LoraError, LoraLayer};
use super::fuse::{fuse_from, Weights, WeightsMut};
use crate::error::{Result, RuntimeError};
use crate::tensor::{Data, Tensor};
use v2l_graphs::passes::QuantScheme;
use v2l_graphs::DType;

pub use v2l_contracts::dtype::Stored;

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
/// one layer at a time from the f32 base weights in the ONNX model at `model`, named as the
/// engine's initializers and stored as the engine stores them (`stored`, absent = f32): f32
/// `<module>.weight`; f16/bf16 rounded once from the f32 fuse; int8 re-quantised as an int8
/// engine's own weights are (`<module>.weight.int8` `[in, out]` and `<module>.weight.scale`
/// `[out]`, `v2l_graphs::quant`). From the same base, the same LoRA gives the same bits.
pub fn fused_weights(
    model: &Path,
    targets: &[LinearInfo],
    lora: &Lora,
    multiplier: f32,
    source: &Path,
    stored: &BTreeMap<String, Stored>,
) -> Result<Vec<(String, Tensor)>> {
    let pairs = match_targets(lora, targets, source)?;
    let names: Vec<String> = pairs
        .iter()
        .map(|(t, _)| format!("{}.weight", t.name))
        .collect();
    let mut out = Vec::with_capacity(pairs.len());
    let mut layers = pairs.into_iter();
    let mut failed = None;
    let read = v2l_graphs::for_each_initializer(model, &names, &mut |name, dtype, _, bytes| {
        let Some((t, l)) = layers.next() else {
            return Ok(());
        };
        let to = stored
            .get(name)
            .copied()
            .unwrap_or(Stored::Float(DType::F32));
        match fuse_layer(name, dtype, &bytes, t, l, multiplier, to) {
            Ok(tensors) => out.extend(tensors),
            Err(e) => {
                failed.get_or_insert(e);
            }
        }
        Ok(())
    });
    read.map_err(|source| RuntimeError::Io {
        path: model.into(),
        source,
    })?;
    match failed {
        Some(e) => Err(e),
        None => Ok(out),
    }
}

/// One layer of [`fused_weights`].
fn fuse_layer(
    name: &str,
    dtype: v2l_graphs::DType,
    bytes: &[u8],
    t: &LinearInfo,
    l: &LoraLayer,
    multiplier: f32,
    to: Stored,
) -> Result<Vec<(String, Tensor)>> {
    // f16/bf16-stored bases (`v2l-export --weight-dtype`) are widened exactly; the fuse is f32.
    let w = v2l_graphs::dtype::f32_values(bytes, dtype).ok_or_else(|| RuntimeError::LoraLayer {
        layer: name.into(),
        message: format!("stored as {dtype}; a LoRA fuses into f32, f16 or bf16 weights"),
    })?;
    let mut fused = vec![0f32; w.len()];
    let plan = l.fuse_plan(multiplier);
    let (o, i) = (t.out_features, t.in_features);
    fuse_from(
        Weights::F32(&w),
        WeightsMut::F32(&mut fused),
        o,
        i,
        &plan.factors(),
        0,
    )
    .map_err(|e| RuntimeError::Fuse {
        what: name.into(),
        source: e,
    })?;
    let tensor = |data| {
        vec![(
            name.to_string(),
            Tensor {
                shape: vec![o, i],
                data,
            },
        )]
    };
    Ok(match to {
        Stored::Float(DType::F16) => tensor(Data::F16(
            fused.iter().map(|&x| half::f16::from_f32(x)).collect(),
        )),
        Stored::Float(DType::BF16) => tensor(Data::BF16(
            fused.iter().map(|&x| half::bf16::from_f32(x)).collect(),
        )),
        Stored::Float(_) => vec![(name.to_string(), Tensor::f32(vec![o, i], fused))],
        Stored::Qdq => {
            let scales =
                v2l_graphs::quant::int8_scales_per_output(&fused, o, i).ok_or_else(|| {
                    RuntimeError::LoraLayer {
                        layer: name.into(),
                        message: "the fused weight is not finite".into(),
                    }
                })?;
            vec![
                (
                    v2l_contracts::io::QdqNames::of(name).weight_scale,
                    Tensor::f32(vec![o], scales),
                ),
                (name.to_string(), Tensor::f32(vec![o, i], fused)),
            ]
        }
        Stored::Quantized(q) => {
            let tensors = q
                .quantize(&fused, o, i)
                .ok_or_else(|| RuntimeError::LoraLayer {
                    layer: name.into(),
                    message: "the fused weight is not finite".into(),
                })?;
            q.names(name)
                .into_iter()
                .zip(tensors)
                .map(|(n, (dtype, dims, bytes))| {
                    let shape = dims.iter().map(|&d| d as usize).collect();
                    let data = match dtype {
                        DType::I8 => Data::I8(bytemuck::cast_slice(&bytes).to_vec()),
                        DType::U8 => Data::U8(bytes),
                        _ => Data::F32(bytemuck::pod_collect_to_vec(&bytes)),
                    };
                    (n, Tensor { shape, data })
                })
                .collect()
        }
    })
}
