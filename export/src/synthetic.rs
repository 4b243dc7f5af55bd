//! Synthetic checkpoints: real layer shapes, generated weights.
//!
//! Full-scale checks (a CogVideoX-5B-width export, the 42-block export benchmark) need
//! checkpoints of the real size that cannot be downloaded here. This writes a diffusers-style
//! directory (`config.json`, safetensors shards, an index) streaming tensor by tensor, so
//! generating an 11 GB checkpoint needs only one tensor in memory at a time.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use half::{bf16, f16};
use v2l_graphs::DType;

use crate::error::{ExportError, Result};

/// Largest shard written (bytes of tensor data), as diffusers' default `max_shard_size` order.
pub const SHARD_BYTES: usize = 5 << 30;

/// Deterministic values of scale ~1/√fan_in (v2l's seeded generator; the numbers only need to
/// be finite and well-scaled for shape, loading and speed checks).
/// `offset` shifts the values (norm scales around 1).
fn fill(n: usize, fan_in: usize, seed: u64, dtype: DType, offset: Option<f32>, out: &mut Vec<u8>) {
    let mut rng = v2l_contracts::noise::SplitMix64::new(seed);
    let scale = 1.0 / (fan_in.max(1) as f32).sqrt();
    out.clear();
    out.reserve(n * dtype.size());
    for _ in 0..n {
        let v = rng.symmetric() * scale + offset.unwrap_or(0.0);
        match dtype {
            DType::BF16 => out.extend_from_slice(&bf16::from_f32(v).to_le_bytes()),
            DType::F16 => out.extend_from_slice(&f16::from_f32(v).to_le_bytes()),
            _ => out.extend_from_slice(&v.to_le_bytes()),
        }
    }
}

fn st_dtype(d: DType) -> &'static str {
    match d {
        DType::BF16 => "BF16",
        DType::F16 => "F16",
        _ => "F32",
    }
}

/// Writes `config` and generated tensors of `layout` to `dir` as a (sharded) diffusers checkpoint.
/// `progress` is called with (bytes written, total bytes).
pub fn write_checkpoint(
    dir: &Path,
    config: &serde_json::Value,
    layout: &[(String, Vec<usize>)],
    dtype: DType,
    seed: u64,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<()> {
    write_checkpoint_as(dir, config, layout, dtype, seed, Scales::FanIn, progress)
}

/// How generated values are scaled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scales {
    /// Every tensor ~U(-1, 1)/√fan_in (norm weights included, so they are ~0.02 at 5B width).
    FanIn,
    /// As a trained model has them where it matters for accuracy measurements: 1-D
    /// `*.weight` tensors (LayerNorm/RMSNorm scales) are 1 ± 0.1, everything else as `FanIn`.
    /// With norm scales near zero the attention and feed-forward barely reach a block's
    /// output, so a quantised block looks as accurate as an f32 one.
    Trained,
}

/// [`write_checkpoint`] with a choice of [`Scales`].
pub fn write_checkpoint_as(
    dir: &Path,
    config: &serde_json::Value,
    layout: &[(String, Vec<usize>)],
    dtype: DType,
    seed: u64,
    scales: Scales,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<()> {
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| ExportError::Io {
            path: p.clone(),
            source,
        }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let sizes: Vec<usize> = layout
        .iter()
        .map(|(_, s)| s.iter().product::<usize>() * dtype.size())
        .collect();
    let total: u64 = sizes.iter().map(|&s| s as u64).sum();
    // Group tensors into shards in order.
    let mut shards: Vec<Vec<usize>> = vec![Vec::new()];
    let mut acc = 0;
    for (i, &s) in sizes.iter().enumerate() {
        if acc + s > SHARD_BYTES && !shards.last().map_or(true, |v| v.is_empty()) {
            shards.push(Vec::new());
            acc = 0;
        }
        acc += s;
        if let Some(last) = shards.last_mut() {
            last.push(i);
        }
    }
    let n = shards.len();
    let mut weight_map = BTreeMap::new();
    let mut done = 0u64;
    let mut buf = Vec::new();
    for (k, shard) in shards.iter().enumerate() {
        let name = if n == 1 {
            "diffusion_pytorch_model.safetensors".to_string()
        } else {
            format!("diffusion_pytorch_model-{:05}-of-{n:05}.safetensors", k + 1)
        };
        let path = dir.join(&name);
        let mut header = serde_json::Map::new();
        let mut off = 0usize;
        for &i in shard {
            let (Some((key, shape)), Some(&size)) = (layout.get(i), sizes.get(i)) else {
                continue;
            };
            header.insert(
                key.clone(),
                serde_json::json!({"dtype": st_dtype(dtype), "shape": shape, "data_offsets": [off, off + size]}),
            );
            off += size;
            weight_map.insert(key.clone(), name.clone());
        }
        let mut h = serde_json::Value::Object(header).to_string().into_bytes();
        while h.len() % 8 != 0 {
            h.push(b' ');
        }
        let mut f = BufWriter::with_capacity(8 << 20, File::create(&path).map_err(io(&path))?);
        f.write_all(&(h.len() as u64).to_le_bytes())
            .map_err(io(&path))?;
        f.write_all(&h).map_err(io(&path))?;
        for &i in shard {
            let Some((key, shape)) = layout.get(i) else {
                continue;
            };
            let fan_in = match shape.as_slice() {
                [] => 1,
                [n] => *n,
                [_, rest @ ..] => rest.iter().product(),
            };
            let norm_scale =
                scales == Scales::Trained && shape.len() == 1 && key.ends_with(".weight");
            fill(
                shape.iter().product(),
                if norm_scale { 100 } else { fan_in },
                seed ^ (i as u64 + 1),
                dtype,
                norm_scale.then_some(1.0),
                &mut buf,
            );
            f.write_all(&buf).map_err(io(&path))?;
            done += buf.len() as u64;
            progress(done, total);
        }
        f.flush().map_err(io(&path))?;
    }
    if n > 1 {
        let index =
            serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        let p = dir.join("diffusion_pytorch_model.safetensors.index.json");
        std::fs::write(&p, index.to_string()).map_err(io(&p))?;
    }
    let p = dir.join("config.json");
    std::fs::write(&p, serde_json::to_string_pretty(config).unwrap_or_default()).map_err(io(&p))?;
    Ok(())
}
