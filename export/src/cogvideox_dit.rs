//! CogVideoX diffusion transformer (`CogVideoXTransformer3DModel`) as an ONNX graph.
//!
//! Mirrors diffusers 0.42.1 `models/transformers/cogvideox_transformer_3d.py`: patch embedding
//! with text projection, sinusoidal timestep embedding, `CogVideoXBlock`s (LayerNormZero
//! modulation, joint text+video attention with QK LayerNorm and RoPE on the video tokens,
//! GELU-tanh feed-forward), final norm, AdaLayerNorm, projection and unpatchify.
//!
//! Graph contract (its names in `v2l_contracts::io::dit`): inputs `hidden_states [B,F,Cin,H,W]`, `encoder_hidden_states
//! [B,L,Dtext]`, `timestep` int64 `[B]`, `rope_cos`/`rope_sin [F·(H/p)·(W/p), Dhead]`; output
//! `sample [B,F,Cout,H,W]`. RoPE tables are inputs because they depend on the sample size,
//! which stays dynamic; the runtime builds them as the diffusers pipeline does.
//!
//! ```text
//! v2l-export dit path/to/transformer -o out/   # writes out/dit.onnx
//! ```

use serde::Deserialize;
use v2l_contracts::io::dit as dit_io;
use v2l_graphs::{DType, Dim, Graph, Value};

use crate::checkpoint::Checkpoint;
use crate::dit_graph::record_cache_cuts;
use crate::error::{ExportError, Result};
use crate::scope::Scope;

pub const CLASS_NAME: &str = v2l_contracts::Family::CogVideoX.dit_class();

/// The `config.json` fields the graph depends on; a missing field takes diffusers' default
/// (`CogVideoXTransformer3DModel.__init__`, see [`Default`]).
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct DitConfig {
    pub num_attention_heads: usize,
    pub attention_head_dim: usize,
    pub in_channels: usize,
    pub out_channels: Option<usize>,
    pub flip_sin_to_cos: bool,
    pub freq_shift: i64,
    pub time_embed_dim: usize,
    pub ofs_embed_dim: Option<usize>,
    pub text_embed_dim: usize,
    pub num_layers: usize,
    pub attention_bias: bool,
    pub patch_size: usize,
    pub patch_size_t: Option<usize>,
    pub activation_fn: String,
    pub timestep_activation_fn: String,
    pub norm_elementwise_affine: bool,
    pub norm_eps: f32,
    pub use_rotary_positional_embeddings: bool,
    pub use_learned_positional_embeddings: bool,
    pub patch_bias: bool,
    pub sample_frames: usize,
    pub sample_height: usize,
    pub sample_width: usize,
    pub max_text_seq_length: usize,
    pub temporal_compression_ratio: usize,
}

impl Default for DitConfig {
    fn default() -> Self {
        DitConfig {
            num_attention_heads: 30,
            attention_head_dim: 64,
            in_channels: 16,
            out_channels: None,
            flip_sin_to_cos: true,
            freq_shift: 0,
            time_embed_dim: 512,
            ofs_embed_dim: None,
            text_embed_dim: 4096,
            num_layers: 30,
            attention_bias: true,
            patch_size: 2,
            patch_size_t: None,
            activation_fn: "gelu-approximate".into(),
            timestep_activation_fn: "silu".into(),
            norm_elementwise_affine: true,
            norm_eps: 1e-5,
            use_rotary_positional_embeddings: false,
            use_learned_positional_embeddings: false,
            patch_bias: true,
            sample_frames: 49,
            sample_height: 60,
            sample_width: 90,
            max_text_seq_length: 226,
            temporal_compression_ratio: 4,
        }
    }
}

impl DitConfig {
    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }
    pub fn out_channels(&self) -> usize {
        self.out_channels.unwrap_or(self.in_channels)
    }
}

/// Export choices that are not in the checkpoint.
#[derive(Clone, Debug, Default)]
pub struct DitOptions {
    /// Storage type of the weights (`None`: f32). The graph computes in f32 either way.
    pub weight_dtype: Option<DType>,
}

/// The exported CogVideoX DiT and what a LoRA can target in it.
pub type DitExport = crate::dit_graph::DitGraph<DitConfig>;

/// Builds the DiT graph from a diffusers transformer checkpoint.
pub fn export(ckpt: &Checkpoint, opts: &DitOptions) -> Result<DitExport> {
    let cfg: DitConfig = ckpt.config(CLASS_NAME)?;
    let raw_config: serde_json::Value = ckpt.config(CLASS_NAME)?;
    check_supported(ckpt, &cfg)?;
    let mut g = Graph::new("cogvideox_dit");
    let mut vb = Scope::new(ckpt);
    vb.weight_dtype = opts.weight_dtype;

    let dh = cfg.attention_head_dim as i64;
    let hidden = g.input(
        dit_io::HIDDEN_STATES,
        DType::F32,
        vec![
            "batch".into(),
            "frames".into(),
            Dim::Fixed(cfg.in_channels as i64),
            "height".into(),
            "width".into(),
        ],
    );
    let text = g.input(
        dit_io::ENCODER_HIDDEN_STATES,
        DType::F32,
        vec![
            "batch".into(),
            "text_len".into(),
            Dim::Fixed(cfg.text_embed_dim as i64),
        ],
    );
    let timestep = g.input(dit_io::TIMESTEP, DType::I64, vec!["batch".into()]);
    let rope_cos = g.input(
        dit_io::ROPE_COS,
        DType::F32,
        vec!["video_tokens".into(), Dim::Fixed(dh)],
    );
    let rope_sin = g.input(
        dit_io::ROPE_SIN,
        DType::F32,
        vec!["video_tokens".into(), Dim::Fixed(dh)],
    );

    // Modules are visited in `named_modules()` order so `linears` comes out in LiLoRA order.
    let tokens = patch_embed(&mut g, &vb.pp("patch_embed"), &cfg, &text, &hidden)?;
    let temb = time_embedding(&mut g, &vb, &cfg, &timestep)?;
    let text_len = g.shape_range(&text, 1, 2);
    let rope = g.scoped("rope", |g| {
        Rope::new(g, &text_len, &rope_cos, &rope_sin, dh)
    });

    let (mut enc, mut x) = split_text(&mut g, &tokens, &text_len);
    let temb_act = g.silu(&temb);
    let block_input = x.clone();
    let mut first_output = None;
    for i in 0..cfg.num_layers {
        let blk = vb.pp("transformer_blocks").pp(i);
        (x, enc) = block(&mut g, &blk, &cfg, &x, &enc, &temb_act, &rope, &text_len)?;
        first_output.get_or_insert_with(|| x.clone());
    }
    if let Some(first) = &first_output {
        record_cache_cuts(&mut g, &block_input, first, &x);
    }

    let x = vb.layer_norm(
        &mut g,
        &x,
        "norm_final",
        cfg.inner_dim(),
        cfg.norm_eps,
        cfg.norm_elementwise_affine,
    )?;
    let x = ada_layer_norm(&mut g, &vb.pp("norm_out"), &cfg, &x, &temb_act)?;
    let p = cfg.patch_size;
    let x = vb.linear(
        &mut g,
        &x,
        "proj_out",
        cfg.inner_dim(),
        p * p * cfg.out_channels(),
        true,
    )?;
    let sample = g.scoped("unpatchify", |g| {
        unpatchify(g, &x, &hidden, p as i64, cfg.out_channels() as i64)
    });
    g.output(
        &sample,
        dit_io::SAMPLE,
        DType::F32,
        vec![
            "batch".into(),
            "frames".into(),
            Dim::Fixed(cfg.out_channels() as i64),
            "height".into(),
            "width".into(),
        ],
    );
    g.metadata("v2l.architecture", CLASS_NAME);
    let linears = vb.linears();
    let unused_keys = ckpt.unused_keys();
    Ok(DitExport {
        graph: g,
        config: cfg,
        raw_config,
        linears,
        unused_keys,
    })
}

fn check_supported(ckpt: &Checkpoint, cfg: &DitConfig) -> Result<()> {
    let path = ckpt.dir().join("config.json");
    let unsupported = |what: &str| {
        Err(ExportError::Unsupported {
            path: path.clone(),
            what: what.into(),
        })
    };
    if cfg.patch_size_t.is_some() {
        return unsupported("CogVideoX 1.5 temporal patching (`patch_size_t`)");
    }
    if cfg.ofs_embed_dim.is_some() {
        return unsupported("the `ofs` embedding of CogVideoX 1.5 I2V (`ofs_embed_dim`)");
    }
    if !cfg.use_rotary_positional_embeddings {
        return unsupported("sin-cos positional embeddings without RoPE (`use_rotary_positional_embeddings: false`)");
    }
    if cfg.activation_fn != "gelu-approximate" {
        return unsupported(&format!("activation_fn `{}`", cfg.activation_fn));
    }
    if cfg.timestep_activation_fn != "silu" {
        return unsupported(&format!(
            "timestep_activation_fn `{}`",
            cfg.timestep_activation_fn
        ));
    }
    if cfg.inner_dim() % 2 != 0 || cfg.attention_head_dim % 2 != 0 {
        return unsupported("an odd inner or head dimension");
    }
    Ok(())
}

/// `CogVideoXPatchEmbed`: text projection, per-frame patch convolution, `[text; video]` tokens.
fn patch_embed(
    g: &mut Graph,
    vb: &Scope,
    cfg: &DitConfig,
    text: &Value,
    hidden: &Value,
) -> Result<Value> {
    let d = cfg.inner_dim();
    let p = cfg.patch_size;
    let w = vb
        .pp("proj")
        .weight(g, "weight", &[d, cfg.in_channels, p, p])?;
    let b = if cfg.patch_bias {
        Some(vb.pp("proj").weight(g, "bias", &[d])?)
    } else {
        None
    };
    let t = vb.linear(g, text, "text_proj", cfg.text_embed_dim, d, true)?;
    let tokens = g.scoped(vb.prefix(), |g| {
        // The stride-p convolution as one matrix product over patches:
        // [B,F,C,H,W] -> [B,F,C,h,p,w,p] -> [B,F,h,w,C,p,p] -> [B,F·h·w,C·p·p] -> ·Wᵀ + b.
        // Same sums as diffusers' Conv2d; at CogVideoX-5B width and 5,626 tokens it saves ORT's
        // NCHWc reorders and a [B·F,D,h·w] output transpose (~0.4 s of a 25 s block step).
        let p = p as i64;
        let (c, d) = (cfg.in_channels as i64, d as i64);
        let bfc = g.shape_range(hidden, 0, 3);
        let hw = g.shape_range(hidden, 3, 5);
        let pp = g.const_i64(&[p]);
        let hw_p = g.div(&hw, &pp);
        let (h_p, w_p) = (g.slice(&hw_p, 0, 0, 1), g.slice(&hw_p, 0, 1, 2));
        let s = g.concat(&[&bfc, &h_p, &pp, &w_p, &pp], 0);
        let x = g.reshape(hidden, &s);
        let x = g.transpose(&x, &[0, 1, 3, 5, 2, 4, 6]);
        let x = g.reshape_to(&x, &[0, -1, c * p * p]);
        let w2 = g.reshape_to(&w, &[d, c * p * p]);
        let y = g.linear(&x, &w2, b.as_ref(), d);
        g.concat(&[&t, &y], 1)
    });
    if cfg.use_learned_positional_embeddings {
        // CogVideoX-5B-I2V 1.0: a learned table for the default sample size only (as diffusers).
        let ph = cfg.sample_height / p;
        let pw = cfg.sample_width / p;
        let pf = (cfg.sample_frames - 1) / cfg.temporal_compression_ratio + 1;
        let n = cfg.max_text_seq_length + ph * pw * pf;
        let pos = vb.weight(g, "pos_embedding", &[1, n, d])?;
        return Ok(g.add(&tokens, &pos));
    }
    Ok(tokens)
}

/// `Timesteps` (sinusoidal, diffusers' `get_timestep_embedding`) then `TimestepEmbedding`.
fn time_embedding(g: &mut Graph, vb: &Scope, cfg: &DitConfig, timestep: &Value) -> Result<Value> {
    let dim = cfg.inner_dim();
    let emb = g.scoped("time_proj", |g| {
        let t = g.cast(timestep, DType::F32);
        crate::layers::sinusoid(g, &t, dim, cfg.flip_sin_to_cos, cfg.freq_shift)
    });
    let te = vb.pp("time_embedding");
    let h = te.linear(g, &emb, "linear_1", dim, cfg.time_embed_dim, true)?;
    let h = g.silu(&h);
    te.linear(
        g,
        &h,
        "linear_2",
        cfg.time_embed_dim,
        cfg.time_embed_dim,
        true,
    )
}

/// RoPE tables extended over the text tokens with cos = 1, sin = 0, so one multiply-add
/// rotates the video tokens and leaves the text tokens exactly as they were.
struct Rope {
    cos: Value,
    sin: Value,
    /// `[Dh, Dh]` matrix with `x·R = stack(-x_odd, x_even)` interleaved: exact (one ±1 per column).
    rotate: Value,
}

impl Rope {
    fn new(g: &mut Graph, text_len: &Value, cos: &Value, sin: &Value, dh: i64) -> Rope {
        let width = g.const_i64(&[dh]);
        let shape = g.concat(&[text_len, &width], 0);
        let one = g.scalar(1.0);
        let zero = g.scalar(0.0);
        let ones = g.op("Expand", &[&one, &shape], vec![]);
        let zeros = g.op("Expand", &[&zero, &shape], vec![]);
        // [S, Dh] -> [S, 1, Dh]: broadcast over the heads of `[B, S, heads, Dh]`.
        let cos = g.concat(&[&ones, cos], 0);
        let cos = g.unsqueeze(&cos, &[1]);
        let sin = g.concat(&[&zeros, sin], 0);
        let sin = g.unsqueeze(&sin, &[1]);
        let rotate = crate::layers::rotate_pairs(g, dh);
        Rope { cos, sin, rotate }
    }

    /// `x·cos + rotate(x)·sin` for `x [B,S,H,Dh]`.
    fn apply(&self, g: &mut Graph, x: &Value) -> Value {
        crate::layers::apply_rope(g, x, &self.cos, &self.sin, &self.rotate)
    }
}

/// `CogVideoXLayerNormZero`: returns (norm x, norm enc, gate, enc gate), gates `[B,1,D]`.
fn layer_norm_zero(
    g: &mut Graph,
    vb: &Scope,
    cfg: &DitConfig,
    x: &Value,
    enc: &Value,
    temb_act: &Value,
) -> Result<(Value, Value, Value, Value)> {
    let d = cfg.inner_dim();
    let m = vb.linear(g, temb_act, "linear", cfg.time_embed_dim, 6 * d, true)?;
    let nx = vb.layer_norm(g, x, "norm", d, cfg.norm_eps, cfg.norm_elementwise_affine)?;
    let ne = vb.layer_norm(g, enc, "norm", d, cfg.norm_eps, cfg.norm_elementwise_affine)?;
    Ok(g.scoped(vb.prefix(), |g| {
        let m = g.unsqueeze(&m, &[1]);
        let [shift, scale, gate, enc_shift, enc_scale, enc_gate] = g.chunk::<6>(&m, d as i64, 2);
        let nx = modulate(g, &nx, &scale, &shift);
        let ne = modulate(g, &ne, &enc_scale, &enc_shift);
        (nx, ne, gate, enc_gate)
    }))
}

use crate::layers::modulate;

#[allow(clippy::too_many_arguments)]
fn block(
    g: &mut Graph,
    vb: &Scope,
    cfg: &DitConfig,
    x: &Value,
    enc: &Value,
    temb_act: &Value,
    rope: &Rope,
    text_len: &Value,
) -> Result<(Value, Value)> {
    let (nx, ne, gate, enc_gate) = layer_norm_zero(g, &vb.pp("norm1"), cfg, x, enc, temb_act)?;
    let (ax, ae) = attention(g, &vb.pp("attn1"), cfg, &nx, &ne, rope, text_len)?;
    let x = gated_residual(g, x, &gate, &ax);
    let enc = gated_residual(g, enc, &enc_gate, &ae);

    let (nx, ne, gate, enc_gate) = layer_norm_zero(g, &vb.pp("norm2"), cfg, &x, &enc, temb_act)?;
    let h = g.concat(&[&ne, &nx], 1);
    let ff = vb.pp("ff").pp("net");
    let d = cfg.inner_dim();
    let h = ff.pp("0").linear(g, &h, "proj", d, 4 * d, true)?;
    let h = g.scoped(&format!("{}.0.gelu", ff.prefix()), |g| g.gelu_tanh(&h));
    let h = ff.linear(g, &h, "2", 4 * d, d, true)?;
    let (he, hx) = split_text(g, &h, text_len);
    let x = gated_residual(g, &x, &gate, &hx);
    let enc = gated_residual(g, &enc, &enc_gate, &he);
    Ok((x, enc))
}

fn gated_residual(g: &mut Graph, x: &Value, gate: &Value, h: &Value) -> Value {
    let gh = g.mul(gate, h);
    g.add(x, &gh)
}

/// Splits `[B, L+N, D]` into (text `[B,L,D]`, video `[B,N,D]`).
fn split_text(g: &mut Graph, x: &Value, text_len: &Value) -> (Value, Value) {
    let zero = g.const_i64(&[0]);
    let end = g.const_i64(&[i64::MAX]);
    (
        g.slice_dyn(x, 1, &zero, text_len),
        g.slice_dyn(x, 1, text_len, &end),
    )
}

/// Joint attention (`CogVideoXAttnProcessor2_0`): returns (video out, text out).
fn attention(
    g: &mut Graph,
    vb: &Scope,
    cfg: &DitConfig,
    x: &Value,
    enc: &Value,
    rope: &Rope,
    text_len: &Value,
) -> Result<(Value, Value)> {
    let d = cfg.inner_dim();
    let (h, dh) = (
        cfg.num_attention_heads as i64,
        cfg.attention_head_dim as i64,
    );
    let s = g.concat(&[enc, x], 1);
    let bias = cfg.attention_bias;
    let q = vb.linear(g, &s, "to_q", d, d, bias)?;
    let k = vb.linear(g, &s, "to_k", d, d, bias)?;
    let v = vb.linear(g, &s, "to_v", d, d, bias)?;
    // Per-head tensors stay `[B, S, heads, Dh]` (a free reshape of the projections) through
    // the QK norms and RoPE, which act on the last axis; only the plain attention below moves
    // heads forward, so a fused attention kernel (`v2l-compile`) needs no transposes at all.
    let heads = |g: &mut Graph, t: &Value| g.reshape_to(t, &[0, 0, h, dh]);
    let (q, k, v) = g.scoped(vb.prefix(), |g| (heads(g, &q), heads(g, &k), heads(g, &v)));
    let q = vb.layer_norm(g, &q, "norm_q", dh as usize, 1e-6, true)?;
    let k = vb.layer_norm(g, &k, "norm_k", dh as usize, 1e-6, true)?;
    let o = g.scoped(vb.prefix(), |g| {
        // Scoped `rope`: kept f32 in bf16/fp16 engines, fp16 before a bf16 cuda engine's fp16
        // attention (`v2l_graphs::passes::lower_precision`).
        let (q, k) = g.scoped("rope", |g| (rope.apply(g, &q), rope.apply(g, &k)));
        crate::layers::sdpa(g, &q, &k, &v, dh, d)
    });
    let o = vb.pp("to_out").linear(g, &o, "0", d, d, true)?;
    let (oe, ox) = g.scoped(vb.prefix(), |g| split_text(g, &o, text_len));
    Ok((ox, oe))
}

/// `AdaLayerNorm(chunk_dim=1)`: `norm(x)·(1 + scale) + shift` with `shift, scale = linear(silu(temb))`.
fn ada_layer_norm(
    g: &mut Graph,
    vb: &Scope,
    cfg: &DitConfig,
    x: &Value,
    temb_act: &Value,
) -> Result<Value> {
    let d = cfg.inner_dim();
    let m = vb.linear(g, temb_act, "linear", cfg.time_embed_dim, 2 * d, true)?;
    let nx = vb.layer_norm(g, x, "norm", d, cfg.norm_eps, cfg.norm_elementwise_affine)?;
    Ok(g.scoped(vb.prefix(), |g| {
        let m = g.unsqueeze(&m, &[1]);
        let [shift, scale] = g.chunk::<2>(&m, d as i64, 2);
        modulate(g, &nx, &scale, &shift)
    }))
}

/// `[B, F·h·w, p·p·C] -> [B, F, C, h·p, w·p]`.
fn unpatchify(g: &mut Graph, x: &Value, hidden: &Value, p: i64, c: i64) -> Value {
    let bf = g.shape_range(hidden, 0, 2);
    let hw = g.shape_range(hidden, 3, 5);
    let pp = g.const_i64(&[p]);
    let hw_p = g.div(&hw, &pp);
    let tail = g.const_i64(&[c, p, p]);
    let s = g.concat(&[&bf, &hw_p, &tail], 0);
    let y = g.reshape(x, &s);
    let y = g.transpose(&y, &[0, 1, 4, 2, 5, 3, 6]);
    let cc = g.const_i64(&[c]);
    let s = g.concat(&[&bf, &cc, &hw], 0);
    g.reshape(&y, &s)
}

impl DitExport {
    /// The manifest entry for this export written to `file` with weights stored as `weight_dtype`.
    pub fn manifest_entry(&self, file: &str, weight_dtype: DType) -> crate::manifest::DitEntry {
        crate::manifest::DitEntry {
            file: file.into(),
            class_name: CLASS_NAME.into(),
            weight_dtype,
            patch_size: self.config.patch_size,
            attention_head_dim: self.config.attention_head_dim,
            in_channels: self.config.in_channels,
            out_channels: self.config.out_channels(),
            text_embed_dim: self.config.text_embed_dim,
            config: self.raw_config.clone(),
            lora_targets: self.linears.clone(),
        }
    }
}

/// Every tensor the exporter reads for `cfg`, with its shape, in module order.
///
/// Used to generate full-scale test and benchmark checkpoints; a unit test checks it against the
/// fixture checkpoint key for key, so it cannot drift from [`export`].
pub fn checkpoint_layout(cfg: &DitConfig) -> Vec<(String, Vec<usize>)> {
    let d = cfg.inner_dim();
    let (p, te, dh) = (cfg.patch_size, cfg.time_embed_dim, cfg.attention_head_dim);
    let mut out: Vec<(String, Vec<usize>)> = Vec::new();
    let linear =
        |out: &mut Vec<(String, Vec<usize>)>, name: String, i: usize, o: usize, bias: bool| {
            out.push((format!("{name}.weight"), vec![o, i]));
            if bias {
                out.push((format!("{name}.bias"), vec![o]));
            }
        };
    let norm = |out: &mut Vec<(String, Vec<usize>)>, name: String, n: usize| {
        if cfg.norm_elementwise_affine || name.ends_with("norm_q") || name.ends_with("norm_k") {
            out.push((format!("{name}.weight"), vec![n]));
            out.push((format!("{name}.bias"), vec![n]));
        }
    };
    out.push((
        "patch_embed.proj.weight".into(),
        vec![d, cfg.in_channels, p, p],
    ));
    if cfg.patch_bias {
        out.push(("patch_embed.proj.bias".into(), vec![d]));
    }
    linear(
        &mut out,
        "patch_embed.text_proj".into(),
        cfg.text_embed_dim,
        d,
        true,
    );
    linear(&mut out, "time_embedding.linear_1".into(), d, te, true);
    linear(&mut out, "time_embedding.linear_2".into(), te, te, true);
    for b in 0..cfg.num_layers {
        let blk = format!("transformer_blocks.{b}");
        for (n, parts) in [("norm1", true), ("norm2", false)] {
            linear(&mut out, format!("{blk}.{n}.linear"), te, 6 * d, true);
            norm(&mut out, format!("{blk}.{n}.norm"), d);
            if parts {
                norm(&mut out, format!("{blk}.attn1.norm_q"), dh);
                norm(&mut out, format!("{blk}.attn1.norm_k"), dh);
                for q in ["to_q", "to_k", "to_v"] {
                    linear(
                        &mut out,
                        format!("{blk}.attn1.{q}"),
                        d,
                        d,
                        cfg.attention_bias,
                    );
                }
                linear(&mut out, format!("{blk}.attn1.to_out.0"), d, d, true);
            }
        }
        linear(&mut out, format!("{blk}.ff.net.0.proj"), d, 4 * d, true);
        linear(&mut out, format!("{blk}.ff.net.2"), 4 * d, d, true);
    }
    norm(&mut out, "norm_final".into(), d);
    linear(&mut out, "norm_out.linear".into(), te, 2 * d, true);
    norm(&mut out, "norm_out.norm".into(), d);
    linear(
        &mut out,
        "proj_out".into(),
        d,
        p * p * cfg.out_channels(),
        true,
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_dir() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/cogvideox-tiny/transformer")
    }

    #[test]
    fn layout_matches_the_fixture_checkpoint() {
        let ck = Checkpoint::open_dir(&tiny_dir()).unwrap();
        let cfg: DitConfig = ck.config(CLASS_NAME).unwrap();
        let mut layout = checkpoint_layout(&cfg);
        layout.sort();
        assert_eq!(layout, ck.layout());
    }

    #[test]
    fn unsupported_variants_are_named() {
        let d = tempfile::tempdir().unwrap();
        for f in ["config.json", "diffusion_pytorch_model.safetensors"] {
            std::fs::copy(tiny_dir().join(f), d.path().join(f)).unwrap();
        }
        let text = std::fs::read_to_string(d.path().join("config.json")).unwrap();
        std::fs::write(
            d.path().join("config.json"),
            text.replace("\"patch_size_t\": null", "\"patch_size_t\": 2"),
        )
        .unwrap();
        let ck = Checkpoint::open_dir(d.path()).unwrap();
        let err = export(&ck, &Default::default()).err().unwrap().to_string();
        assert!(
            err.contains("config.json") && err.contains("patch_size_t"),
            "{err}"
        );
    }
}
