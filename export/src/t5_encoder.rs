//! `T5EncoderModel` (transformers; T5 v1.1 as CogVideoX uses it) and `UMT5EncoderModel` (umT5,
//! Wan's text encoder): `input_ids [B, L]` int64 → `prompt_embeds [B, L, d_model]`. Names mirror
//! the checkpoint (`encoder.block.{i}.layer.{0,1}…`).
//!
//! What the graph computes, as transformers does it:
//! - token embedding `shared` (or `encoder.embed_tokens`), no scaling;
//! - per block: `x + o(attention(rms_norm(x)))`, then `x + wo(gelu_new(wi_0(h)) · wi_1(h))` with
//!   `h = rms_norm(x)`; `final_layer_norm` at the end;
//! - attention without `1/√d` scaling, plus a relative-position bias indexed by the
//!   bidirectional log-bucket of `key − query`: T5 has one table
//!   (`block.0.layer.0.SelfAttention.relative_attention_bias`, `[buckets, heads]`) shared by every
//!   layer; umT5 has one per layer (`block.{i}.layer.0.SelfAttention.relative_attention_bias`);
//! - T5: no attention mask (diffusers' CogVideoX pipelines call the encoder without one, so
//!   padding tokens take part); umT5: an `attention_mask [B, L]` input (1: token, 0: padding), as
//!   diffusers' Wan pipelines pass it: padded keys get the lowest f32 added to their scores;
//! - RMS norm `w · x / √(mean(x²) + ε)` with no mean subtraction and no bias.

use serde::Deserialize;
use v2l_contracts::io::text as text_io;
use v2l_graphs::{DType, Dim, Graph, Value};

use crate::checkpoint::Checkpoint;
use crate::error::{ExportError, Result};
use crate::scope::Scope;

/// The transformers `model_type` of T5 v1.1 (CogVideoX's text encoder).
pub const MODEL_TYPE: &str = "t5";
/// The transformers `model_type` of umT5 (Wan's text encoder).
pub const UMT5_MODEL_TYPE: &str = "umt5";

/// The `config.json` fields the graph depends on.
#[derive(Clone, Debug, Deserialize)]
pub struct T5Config {
    pub model_type: String,
    pub d_model: usize,
    pub d_kv: usize,
    pub d_ff: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub relative_attention_num_buckets: usize,
    #[serde(default = "default_max_distance")]
    pub relative_attention_max_distance: usize,
    pub layer_norm_epsilon: f32,
    pub feed_forward_proj: String,
    pub vocab_size: usize,
}

fn default_max_distance() -> usize {
    128
}

/// The exported T5 encoder graph and the config it was built from.
pub struct T5Export {
    pub graph: Graph,
    pub config: T5Config,
    pub unused_keys: Vec<String>,
}

/// Builds the encoder graph from a transformers T5 checkpoint directory. `weight_dtype`
/// stores the weights as f16/bf16 with a Cast each (the graph computes in f32 either way;
/// a T5-XXL encoder is 19 GB in f32, 9.5 GB in bf16); `None` stores f32.
pub fn export(ckpt: &Checkpoint, weight_dtype: Option<DType>) -> Result<T5Export> {
    let path = ckpt.dir().join("config.json");
    let raw: serde_json::Value = ckpt.raw_config()?.clone();
    let cfg: T5Config = serde_json::from_value(raw).map_err(|e| ExportError::Config {
        path: path.clone(),
        message: e.to_string(),
    })?;
    let umt5 = match cfg.model_type.as_str() {
        MODEL_TYPE => false,
        UMT5_MODEL_TYPE => true,
        other => {
            return Err(ExportError::UnknownClass {
                path,
                found: other.into(),
                expected: format!("{MODEL_TYPE} or {UMT5_MODEL_TYPE}"),
            })
        }
    };
    if cfg.feed_forward_proj != "gated-gelu" {
        return Err(ExportError::Unsupported {
            path,
            what: format!(
                "feed_forward_proj `{}` (T5 v1.1's `gated-gelu` is supported)",
                cfg.feed_forward_proj
            ),
        });
    }
    let mut g = Graph::new(if umt5 { "umt5_encoder" } else { "t5_encoder" });
    let mut vb = Scope::new(ckpt);
    vb.weight_dtype = weight_dtype;
    let ids = g.input(
        text_io::INPUT_IDS,
        DType::I64,
        vec!["batch".into(), "tokens".into()],
    );
    let (d, inner) = (cfg.d_model, cfg.num_heads * cfg.d_kv);
    let table = if vb.has("shared.weight") {
        "shared.weight"
    } else {
        "encoder.embed_tokens.weight"
    };
    let emb = vb.weight(&mut g, table, &[cfg.vocab_size, d])?;
    let mut x = g.op("Gather", &[&emb, &ids], vec![]);
    let enc = vb.pp("encoder");
    // umT5: `[B, 1, 1, L]`, the lowest f32 where the key is padding, 0 elsewhere.
    let mask = match umt5 {
        false => None,
        true => {
            let m = g.input(
                "attention_mask",
                DType::I64,
                vec!["batch".into(), "tokens".into()],
            );
            Some(g.scoped("attention_mask", |g| key_mask_bias(g, &m)))
        }
    };
    let buckets = g.scoped("relative_position", |g| bucket_index(g, &cfg, &ids));
    let mut shared_bias = None;
    for i in 0..cfg.num_layers {
        let blk = enc.pp("block").pp(i);
        let attn = blk.pp("layer").pp(0);
        // T5: layer 0's table serves every layer; umT5: each layer has its own.
        let bias = match (&shared_bias, umt5) {
            (Some(b), false) => Clone::clone(b),
            _ => {
                let b = position_bias(&mut g, &attn.pp("SelfAttention"), &cfg, &buckets)?;
                let b = match &mask {
                    Some(m) => g.scoped(attn.prefix(), |g| g.add(&b, m)),
                    None => b,
                };
                shared_bias = Some(b.clone());
                b
            }
        };
        let h = rms_norm(&mut g, &attn, "layer_norm", &x, &cfg)?;
        let a = attention(&mut g, &attn.pp("SelfAttention"), &cfg, &h, &bias, inner)?;
        x = g.add(&x, &a);
        let ff = blk.pp("layer").pp(1);
        let h = rms_norm(&mut g, &ff, "layer_norm", &x, &cfg)?;
        let dense = ff.pp("DenseReluDense");
        let gate = dense.linear(&mut g, &h, "wi_0", d, cfg.d_ff, false)?;
        let gate = g.scoped(dense.prefix(), |g| g.gelu_tanh(&gate));
        let lin = dense.linear(&mut g, &h, "wi_1", d, cfg.d_ff, false)?;
        let h = g.mul(&gate, &lin);
        let h = dense.linear(&mut g, &h, "wo", cfg.d_ff, d, false)?;
        x = g.add(&x, &h);
    }
    let x = rms_norm(&mut g, &enc, "final_layer_norm", &x, &cfg)?;
    g.output(
        &x,
        text_io::PROMPT_EMBEDS,
        DType::F32,
        vec!["batch".into(), "tokens".into(), Dim::Fixed(d as i64)],
    );
    g.metadata(
        "v2l.architecture",
        if umt5 {
            "UMT5EncoderModel"
        } else {
            "T5EncoderModel"
        },
    );
    Ok(T5Export {
        graph: g,
        config: cfg,
        unused_keys: ckpt.unused_keys(),
    })
}

/// `T5LayerNorm`: `w · x / √(mean(x²) + ε)` over the last axis.
fn rms_norm(g: &mut Graph, vb: &Scope, name: &str, x: &Value, cfg: &T5Config) -> Result<Value> {
    vb.rms_norm(g, x, name, cfg.d_model, cfg.layer_norm_epsilon)
}

/// Self-attention with the shared relative-position bias `[1, heads, L, L]`, no scaling.
fn attention(
    g: &mut Graph,
    vb: &Scope,
    cfg: &T5Config,
    x: &Value,
    bias: &Value,
    inner: usize,
) -> Result<Value> {
    let d = cfg.d_model;
    let q = vb.linear(g, x, "q", d, inner, false)?;
    let k = vb.linear(g, x, "k", d, inner, false)?;
    let v = vb.linear(g, x, "v", d, inner, false)?;
    let (h, dk) = (cfg.num_heads as i64, cfg.d_kv as i64);
    let o = g.scoped(vb.prefix(), |g| {
        let heads = |g: &mut Graph, t: &Value, perm: &[i64]| {
            let t = g.reshape_to(t, &[0, 0, h, dk]);
            g.transpose(&t, perm)
        };
        let q = heads(g, &q, &[0, 2, 1, 3]);
        let kt = heads(g, &k, &[0, 2, 3, 1]);
        let v = heads(g, &v, &[0, 2, 1, 3]);
        let scores = g.matmul(&q, &kt);
        let scores = g.add(&scores, bias);
        let p = g.softmax(&scores, -1);
        let o = g.matmul(&p, &v);
        let o = g.transpose(&o, &[0, 2, 1, 3]);
        g.reshape_to(&o, &[0, 0, inner as i64])
    });
    vb.linear(g, &o, "o", inner, d, false)
}

/// The bucket of each relative position `key − query` in `[−max_distance, max_distance]`
/// (beyond that the bucket is the last one either way), computed with transformers' f32
/// arithmetic (`T5Attention._relative_position_bucket`, bidirectional): half the buckets per
/// direction, exact up to `max_exact`, log-spaced to `max_distance` after.
pub fn relative_buckets(num_buckets: usize, max_distance: usize) -> Vec<i64> {
    let half = (num_buckets / 2) as i64;
    let max_exact = half / 2;
    let m = max_distance as i64;
    let log_range = ((max_distance as f64) / (max_exact as f64)).ln() as f32;
    (-m..=m)
        .map(|rel| {
            let base = if rel > 0 { half } else { 0 };
            let n = rel.abs();
            if n < max_exact {
                return base + n;
            }
            let scaled = (n as f32 / max_exact as f32).ln() / log_range * (half - max_exact) as f32;
            base + (max_exact + scaled as i64).min(half - 1)
        })
        .collect()
}

/// Every tensor of a transformers T5 encoder checkpoint for `cfg`: names and shapes (what
/// `v2l-bench export --model t5-xxl` generates).
pub fn checkpoint_layout(cfg: &T5Config) -> Vec<(String, Vec<usize>)> {
    let (d, inner, ff) = (cfg.d_model, cfg.num_heads * cfg.d_kv, cfg.d_ff);
    let mut out = vec![("shared.weight".to_string(), vec![cfg.vocab_size, d])];
    for i in 0..cfg.num_layers {
        let a = format!("encoder.block.{i}.layer.0");
        for (n, shape) in [
            ("q", vec![inner, d]),
            ("k", vec![inner, d]),
            ("v", vec![inner, d]),
            ("o", vec![d, inner]),
        ] {
            out.push((format!("{a}.SelfAttention.{n}.weight"), shape));
        }
        if i == 0 {
            out.push((
                format!("{a}.SelfAttention.relative_attention_bias.weight"),
                vec![cfg.relative_attention_num_buckets, cfg.num_heads],
            ));
        }
        out.push((format!("{a}.layer_norm.weight"), vec![d]));
        let f = format!("encoder.block.{i}.layer.1");
        out.push((format!("{f}.DenseReluDense.wi_0.weight"), vec![ff, d]));
        out.push((format!("{f}.DenseReluDense.wi_1.weight"), vec![ff, d]));
        out.push((format!("{f}.DenseReluDense.wo.weight"), vec![d, ff]));
        out.push((format!("{f}.layer_norm.weight"), vec![d]));
    }
    out.push(("encoder.final_layer_norm.weight".into(), vec![d]));
    out
}

/// T5 v1.1 XXL's encoder config (CogVideoX's text encoder, `google/t5-v1_1-xxl`).
pub fn t5_xxl_config() -> serde_json::Value {
    serde_json::json!({
        "architectures": ["T5EncoderModel"], "model_type": "t5", "d_model": 4096, "d_kv": 64,
        "d_ff": 10240, "num_layers": 24, "num_heads": 64, "relative_attention_num_buckets": 32,
        "relative_attention_max_distance": 128, "layer_norm_epsilon": 1e-6,
        "feed_forward_proj": "gated-gelu", "vocab_size": 32128, "dense_act_fn": "gelu_new",
        "is_gated_act": true
    })
}

/// `[L, L]`: the table row (bucket) of every (query, key) pair.
fn bucket_index(g: &mut Graph, cfg: &T5Config, ids: &Value) -> Value {
    let buckets = relative_buckets(
        cfg.relative_attention_num_buckets,
        cfg.relative_attention_max_distance,
    );
    let m = cfg.relative_attention_max_distance as i64;
    let lut = g.initializer(
        "relative_position.buckets",
        DType::I64,
        vec![buckets.len() as i64],
        v2l_graphs::TensorData::Owned(buckets.iter().flat_map(|b| b.to_le_bytes()).collect()),
    );
    // positions 0..L; rel[q][k] = k − q, clipped to ±max_distance, shifted to index the table.
    let len = g.shape_range(ids, 1, 2);
    let zero = g.const_i64(&[0]);
    let one = g.const_i64(&[1]);
    let to_scalar = |g: &mut Graph, v: &Value| g.op("Squeeze", &[v], vec![]);
    let (z, l, o) = (to_scalar(g, &zero), to_scalar(g, &len), to_scalar(g, &one));
    let pos = g.op("Range", &[&z, &l, &o], vec![]);
    let q = g.unsqueeze(&pos, &[1]);
    let k = g.unsqueeze(&pos, &[0]);
    let rel = g.sub(&k, &q);
    let lo = g.const_i64(&[-m]);
    let hi = g.const_i64(&[m]);
    let lo = to_scalar(g, &lo);
    let hi = to_scalar(g, &hi);
    let rel = g.op("Clip", &[&rel, &lo, &hi], vec![]);
    let idx = g.sub(&rel, &lo);
    g.op("Gather", &[&lut, &idx], vec![])
}

/// `[1, heads, L, L]`: an attention layer's bias table gathered at every pair's bucket.
fn position_bias(g: &mut Graph, attn: &Scope, cfg: &T5Config, buckets: &Value) -> Result<Value> {
    let table = attn.pp("relative_attention_bias").weight(
        g,
        "weight",
        &[cfg.relative_attention_num_buckets, cfg.num_heads],
    )?;
    Ok(g.scoped(attn.prefix(), |g| {
        let bias = g.op("Gather", &[&table, buckets], vec![]); // [L, L, heads]
        let bias = g.transpose(&bias, &[2, 0, 1]);
        g.unsqueeze(&bias, &[0])
    }))
}

/// `[B, 1, 1, L]` from an `attention_mask [B, L]` (1: token): `(1 − mask) · f32::MIN`, what
/// transformers adds to the scores of padded keys.
fn key_mask_bias(g: &mut Graph, mask: &Value) -> Value {
    let m = g.cast(mask, DType::F32);
    let one = g.const_f32(&[1.0], &[1]);
    let lowest = g.const_f32(&[f32::MIN], &[1]);
    let off = g.sub(&one, &m);
    let bias = g.mul(&off, &lowest);
    g.unsqueeze(&bias, &[1, 2])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Buckets transformers computes (transformers 5.23, torch 2.15, f32) for 32 buckets and
    /// max distance 128, at the log-spaced boundaries: |k − q| = 11 → 8, 12 → 9, 16 → 10,
    /// 45 → 12, 91 → 15; positive offsets add 16.
    #[test]
    fn the_xxl_layout_has_the_encoders_parameter_count() {
        let cfg: T5Config = serde_json::from_value(t5_xxl_config()).unwrap();
        let n: usize = checkpoint_layout(&cfg)
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum();
        // T5 v1.1 XXL's encoder with its embedding: 4.76 B parameters.
        assert_eq!(n, 4_762_310_656);
    }

    #[test]
    fn buckets_match_transformers_at_the_boundaries() {
        let b = relative_buckets(32, 128);
        let at = |rel: i64| b[(rel + 128) as usize];
        assert_eq!(b.len(), 257);
        for (n, want) in [
            (0, 0),
            (7, 7),
            (8, 8),
            (11, 8),
            (12, 9),
            (16, 10),
            (32, 12),
            (45, 12),
            (64, 14),
            (91, 15),
            (128, 15),
        ] {
            assert_eq!(at(-n), want, "-{n}");
            if n > 0 {
                assert_eq!(at(n), want + 16, "+{n}");
            }
        }
    }
}
