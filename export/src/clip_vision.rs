//! `CLIPVisionModel` (transformers), the image encoder of diffusers' Wan I2V pipelines, as the
//! pipeline runs it: `pixel_values [B, 3, S, S]` (already resized, cropped and normalised by
//! the CLIP image processor) → `image_embeds [B, 1 + (S/p)², D]`, the **penultimate** layer's
//! hidden states (`output_hidden_states=True`, `hidden_states[-2]`): the last layer and
//! `post_layernorm` are not part of the graph.
//!
//! Per layer (pre-norm): `x + out_proj(attention(layer_norm1(x)))`, then
//! `x + fc2(act(fc1(layer_norm2(x))))`; attention scaled by `1/√head_dim`, with biases; `act` is
//! exact GELU (`gelu`, open-CLIP ViT-H as Wan ships it) or `quick_gelu` (OpenAI CLIP).
//! Embeddings: a stride-p patch convolution (no bias), the class token first, learned positions,
//! then `pre_layrnorm`. Checkpoints saved with or without the `vision_model.` prefix both read.

use serde::Deserialize;
use v2l_contracts::io::image as image_io;
use v2l_graphs::{DType, Dim, Graph, Value};

use crate::checkpoint::Checkpoint;
use crate::error::{ExportError, Result};
use crate::scope::Scope;

/// The transformers `model_type` this exporter reads.
pub const MODEL_TYPE: &str = "clip_vision_model";

/// The `config.json` fields the graph depends on.
#[derive(Clone, Debug, Deserialize)]
pub struct ClipVisionConfig {
    pub model_type: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub image_size: usize,
    pub patch_size: usize,
    #[serde(default = "default_channels")]
    pub num_channels: usize,
    pub hidden_act: String,
    pub layer_norm_eps: f32,
}

fn default_channels() -> usize {
    3
}

/// The exported CLIP vision graph and the config it was built from.
pub struct ClipVisionExport {
    pub graph: Graph,
    pub config: ClipVisionConfig,
    pub unused_keys: Vec<String>,
}

/// Builds the image-encoder graph from a transformers CLIP vision checkpoint directory.
pub fn export(ckpt: &Checkpoint, weight_dtype: Option<DType>) -> Result<ClipVisionExport> {
    let path = ckpt.dir().join("config.json");
    let cfg: ClipVisionConfig =
        serde_json::from_value(ckpt.raw_config()?.clone()).map_err(|e| ExportError::Config {
            path: path.clone(),
            message: e.to_string(),
        })?;
    if cfg.model_type != MODEL_TYPE {
        return Err(ExportError::UnknownClass {
            path,
            found: cfg.model_type.clone(),
            expected: MODEL_TYPE.into(),
        });
    }
    let unsupported = |what: String| {
        Err(ExportError::Unsupported {
            path: path.clone(),
            what,
        })
    };
    if !matches!(cfg.hidden_act.as_str(), "gelu" | "quick_gelu") {
        return unsupported(format!("hidden_act `{}`", cfg.hidden_act));
    }
    if cfg.num_hidden_layers < 2 || cfg.patch_size == 0 || cfg.image_size % cfg.patch_size != 0 {
        return unsupported(
            "fewer than 2 layers, or an image size that is not a whole number of patches".into(),
        );
    }
    let mut g = Graph::new("clip_vision");
    let mut vb = Scope::new(ckpt);
    vb.weight_dtype = weight_dtype;
    if vb.has("vision_model.pre_layrnorm.weight") {
        vb = vb.pp("vision_model");
    }
    let (d, s, p, c) = (
        cfg.hidden_size,
        cfg.image_size as i64,
        cfg.patch_size,
        cfg.num_channels,
    );
    let pixels = g.input(
        image_io::PIXEL_VALUES,
        DType::F32,
        vec![
            "batch".into(),
            Dim::Fixed(c as i64),
            Dim::Fixed(s),
            Dim::Fixed(s),
        ],
    );
    let x = embeddings(&mut g, &vb.pp("embeddings"), &cfg, &pixels)?;
    let mut x = vb.layer_norm(&mut g, &x, "pre_layrnorm", d, cfg.layer_norm_eps, true)?;
    // hidden_states[-2]: every layer but the last.
    for i in 0..cfg.num_hidden_layers - 1 {
        x = layer(&mut g, &vb.pp("encoder.layers").pp(i), &cfg, &x)?;
    }
    let tokens = (s as usize / p).pow(2) + 1;
    g.output(
        &x,
        image_io::IMAGE_EMBEDS,
        DType::F32,
        vec![
            "batch".into(),
            Dim::Fixed(tokens as i64),
            Dim::Fixed(d as i64),
        ],
    );
    g.metadata("v2l.architecture", "CLIPVisionModel");
    Ok(ClipVisionExport {
        graph: g,
        config: cfg,
        unused_keys: ckpt.unused_keys(),
    })
}

/// Patches (a stride-p convolution as one matrix product), the class token, positions.
fn embeddings(g: &mut Graph, vb: &Scope, cfg: &ClipVisionConfig, pixels: &Value) -> Result<Value> {
    let (d, p, c) = (cfg.hidden_size, cfg.patch_size, cfg.num_channels);
    let n = (cfg.image_size / p).pow(2);
    let w = vb
        .pp("patch_embedding")
        .weight(g, "weight", &[d, c, p, p])?;
    let cls = vb.weight(g, "class_embedding", &[d])?;
    let pos = vb
        .pp("position_embedding")
        .weight(g, "weight", &[n + 1, d])?;
    Ok(g.scoped(vb.prefix(), |g| {
        let (p, c, d, hp) = (
            p as i64,
            c as i64,
            d as i64,
            (cfg.image_size / cfg.patch_size) as i64,
        );
        // [B,C,S,S] → [B,C,h,p,w,p] → [B,h,w,C,p,p] → [B, h·w, C·p·p] · Wᵀ
        let x = g.reshape_to(pixels, &[0, c, hp, p, hp, p]);
        let x = g.transpose(&x, &[0, 2, 4, 1, 3, 5]);
        let x = g.reshape_to(&x, &[0, hp * hp, c * p * p]);
        let w2 = g.reshape_to(&w, &[d, c * p * p]);
        let patches = g.linear(&x, &w2, None, d);
        // The class token, broadcast over the batch: [B, 1, D] = 0·patches[:, :1] + cls.
        let first = g.slice(&patches, 1, 0, 1);
        let zero = g.scalar(0.0);
        let z = g.mul(&first, &zero);
        let cls = g.reshape_to(&cls, &[1, 1, d]);
        let cls = g.add(&z, &cls);
        let x = g.concat(&[&cls, &patches], 1);
        let pos = g.unsqueeze(&pos, &[0]);
        g.add(&x, &pos)
    }))
}

/// One `CLIPEncoderLayer`.
fn layer(g: &mut Graph, vb: &Scope, cfg: &ClipVisionConfig, x: &Value) -> Result<Value> {
    let (d, eps) = (cfg.hidden_size, cfg.layer_norm_eps);
    let (h, dh) = (
        cfg.num_attention_heads as i64,
        (d / cfg.num_attention_heads) as i64,
    );
    let n = vb.layer_norm(g, x, "layer_norm1", d, eps, true)?;
    let at = vb.pp("self_attn");
    let q = at.linear(g, &n, "q_proj", d, d, true)?;
    let k = at.linear(g, &n, "k_proj", d, d, true)?;
    let v = at.linear(g, &n, "v_proj", d, d, true)?;
    let o = g.scoped(at.prefix(), |g| {
        let heads = |g: &mut Graph, t: &Value| g.reshape_to(t, &[0, 0, h, dh]);
        let (q, k, v) = (heads(g, &q), heads(g, &k), heads(g, &v));
        crate::layers::sdpa(g, &q, &k, &v, dh, d)
    });
    let o = at.linear(g, &o, "out_proj", d, d, true)?;
    let x = g.add(x, &o);
    let n = vb.layer_norm(g, &x, "layer_norm2", d, eps, true)?;
    let mlp = vb.pp("mlp");
    let m = mlp.linear(g, &n, "fc1", d, cfg.intermediate_size, true)?;
    let m = g.scoped(mlp.prefix(), |g| match cfg.hidden_act.as_str() {
        "quick_gelu" => {
            let k = g.scalar(1.702);
            let km = g.mul(&m, &k);
            let s = g.op("Sigmoid", &[&km], vec![]);
            g.mul(&m, &s)
        }
        _ => g.gelu_erf(&m),
    });
    let m = mlp.linear(g, &m, "fc2", cfg.intermediate_size, d, true)?;
    Ok(g.add(&x, &m))
}
