//! `v2l-lora fuse`: a diffusers checkpoint with a LoRA fused into its weights, written as a new
//! checkpoint. It reads checkpoints (the exporter's reader) and fuses with the runtime's kernel,
//! so it lives here, above both, and the runtime does not link the exporter.

use std::path::Path;

use v2l_contracts::LinearInfo;
use v2l_runtime::lora::apply::match_targets;
use v2l_runtime::lora::format::Lora;
use v2l_runtime::lora::fuse::{fuse_in_place, FuseError};
use v2l_runtime::lora::switch::Buffer;
use v2l_runtime::{Result, RuntimeError};

/// The linear layers of a diffusers checkpoint: every 2-D `<module>.weight` tensor.
pub fn checkpoint_linears(ck: &v2l_export::Checkpoint) -> Vec<LinearInfo> {
    ck.keys()
        .into_iter()
        .filter_map(|k| {
            let module = k.strip_suffix(".weight")?;
            let t = ck.get(k).ok()?;
            match t.shape.as_slice() {
                [o, i] => Some(LinearInfo {
                    name: module.to_string(),
                    out_features: *o,
                    in_features: *i,
                }),
                _ => None,
            }
        })
        .collect()
}

/// Writes a copy of the diffusers checkpoint `base` with `lora` fused into its weights to `out`
/// (same file names and shards; weights keep their dtype, fused in f32 and rounded once).
/// With `response_tau`, only the entries of LoFA's response map `|ΔW| > τ·|W|` change
/// ([`v2l_runtime::lora::response`]). Returns the layers fused and the entries changed of
/// those layers' entries. The directory appears complete or not at all: it is written under a
/// temporary name first.
pub fn fuse_checkpoint(
    base: &Path,
    lora: &Lora,
    multiplier: f32,
    response_tau: Option<f32>,
    source: &Path,
    out: &Path,
) -> Result<(usize, usize, usize)> {
    use v2l_graphs::DType;
    let ck = v2l_export::Checkpoint::open_dir(base).map_err(|e| RuntimeError::BadFile {
        path: base.into(),
        message: e.to_string(),
    })?;
    let targets = checkpoint_linears(&ck);
    let pairs = match_targets(lora, &targets, source)?;
    v2l_runtime::limits::check_new_output_dir(out)?;
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| RuntimeError::Io {
            path: p.clone(),
            source,
        }
    };
    v2l_contracts::atomic::build_dir(out, RuntimeError::io, |tmp| {
        let mut fused: std::collections::HashMap<String, Vec<u8>> =
            std::collections::HashMap::new();
        let (mut touched, mut entries) = (0, 0);
        for (t, l) in &pairs {
            let key = format!("{}.weight", t.name);
            let w = ck.get(&key).map_err(|e| RuntimeError::BadFile {
                path: base.into(),
                message: e.to_string(),
            })?;
            let bytes = w.data.stored_bytes();
            let plan = l.fuse_plan(multiplier);
            let (o, i) = (t.out_features, t.in_features);
            let fail = |e: FuseError| RuntimeError::Fuse {
                what: key.clone(),
                source: e,
            };
            let cannot = || RuntimeError::Invalid {
                what: key.clone(),
                message: format!("cannot fuse into a {} weight", w.dtype),
            };
            entries += o * i;
            let bytes = match response_tau {
                None => {
                    let mut buf = Buffer::from_le_bytes(w.dtype, bytes).ok_or_else(cannot)?;
                    fuse_in_place(buf.view_mut(), o, i, &plan.factors(), 0).map_err(fail)?;
                    touched += o * i;
                    buf.to_le_bytes()
                }
                Some(tau) => {
                    let mut v = v2l_graphs::dtype::f32_values(bytes, w.dtype).ok_or_else(cannot)?;
                    touched +=
                        v2l_runtime::lora::response::fuse_masked(&mut v, l, multiplier, tau)?;
                    let mut out = Vec::with_capacity(bytes.len());
                    v2l_graphs::dtype::convert_floats(
                        v2l_graphs::dtype::le_bytes(&v),
                        DType::F32,
                        w.dtype,
                        &mut out,
                    )
                    .ok_or_else(cannot)?;
                    out
                }
            };
            // A fused weight that overflowed its type (a scale too large for f16's ±65504)
            // is an error naming the layer, never a checkpoint of infinities.
            let values = v2l_graphs::dtype::f32_values(&bytes, w.dtype).ok_or_else(cannot)?;
            v2l_runtime::error::check_finite(|| format!("fused weight `{key}`"), &values)?;
            fused.insert(key, bytes);
        }
        for (file, keys) in ck.files() {
            let fname = file
                .file_name()
                .map(|n| n.to_os_string())
                .unwrap_or_default();
            let tensors = keys
                .iter()
                .map(|k| {
                    ck.get(k).map_err(|e| RuntimeError::BadFile {
                        path: file.clone(),
                        message: e.to_string(),
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            let mut views = Vec::with_capacity(keys.len());
            for t in &tensors {
                let data: &[u8] = match fused.get(&t.key) {
                    Some(b) => b,
                    None => t.data.stored_bytes(),
                };
                let dt = match t.dtype {
                    DType::F16 => safetensors::Dtype::F16,
                    DType::BF16 => safetensors::Dtype::BF16,
                    DType::F64 => safetensors::Dtype::F64,
                    DType::I64 => safetensors::Dtype::I64,
                    _ => safetensors::Dtype::F32,
                };
                let view = safetensors::tensor::TensorView::new(dt, t.shape.clone(), data)
                    .map_err(|e| RuntimeError::Invalid {
                        what: t.key.clone(),
                        message: e.to_string(),
                    })?;
                views.push((t.key.clone(), view));
            }
            let dst = tmp.join(&fname);
            safetensors::serialize_to_file(views, &None, &dst).map_err(|e| {
                RuntimeError::Invalid {
                    what: dst.display().to_string(),
                    message: e.to_string(),
                }
            })?;
        }
        for extra in [
            "config.json",
            "diffusion_pytorch_model.safetensors.index.json",
        ] {
            let src = base.join(extra);
            if src.exists() {
                std::fs::copy(&src, tmp.join(extra)).map_err(io(&src))?;
            }
        }
        Ok((pairs.len(), touched, entries))
    })
}
