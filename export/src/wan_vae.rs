//! Wan2.1's causal 3-D VAE (`AutoencoderKLWan`) as two ONNX graphs: encoder and decoder.
//!
//! Mirrors diffusers 0.42.1 `models/autoencoders/autoencoder_kl_wan.py` (the Wan2.1 path,
//! `is_residual: false`): `WanCausalConv3d` (zero padding in time, in front), `WanRMS_norm`
//! (L2-normalise over channels, times √C and `gamma`), residual blocks, single-head spatial
//! attention per frame in the mid blocks, and `WanResample` (space by 2 with a per-frame Conv2d,
//! time by 2 with a `(3,1,1)` causal conv).
//!
//! diffusers runs this VAE as a loop: the encoder sees the first frame alone, then 4 frames at a
//! time; the decoder one latent frame at a time; each causal conv carries the last 2 frames of
//! its input to the next call (`feat_cache`). Every op but the caches is per frame or per
//! pixel, so one graph per chunk with the caches as inputs and outputs reproduces the loop
//! exactly, with memory bounded by one chunk. The graph contract is the CogVideoX VAE's
//! (`cache_in.*` → `cache_out.*`, `first_batch`), with the batches cut by
//! [`FrameSchedule::FirstAlone`].
//!
//! What `first_batch` changes, as diffusers' cache states do:
//! * causal convs: the cache is ignored (zero padding, diffusers' `None` cache);
//! * temporal upsamplers (`upsample3d`): the first chunk skips the time conv (1 frame stays 1)
//!   and leaves a zero cache (diffusers' `"Rep"` state: the next chunk pads with zeros);
//! * temporal downsamplers (`downsample3d`): the first chunk passes through (1 frame), later
//!   chunks prepend the cached last frame and run the stride-2 time conv.
//!
//! Where a chunk's output length depends on `first_batch`, both candidates are computed and
//! the graph slices one out ([`select_first`]); the wasted work is one small chunk.

use serde::{Deserialize, Serialize};
use v2l_contracts::frame_batch::FrameSchedule;
use v2l_contracts::io::vae as vae_io;
use v2l_graphs::{Attr, DType, Dim, Graph, Value};

use crate::checkpoint::Checkpoint;
use crate::cogvideox_vae::{conv1x1, per_frame_conv2d, repeat, CacheSpec, Causal, SpatialScale};
use crate::error::{ExportError, Result};
use crate::scope::Scope;

/// The `_class_name` this exporter accepts in `config.json`.
pub const CLASS_NAME: &str = v2l_contracts::Family::Wan.vae_class();

/// Frames per encoder chunk after the first (`_encode` slices `1 + 4(i-1) : 1 + 4i`).
pub const ENCODER_FRAME_BATCH: usize = 4;

/// Latent frames per decoder chunk (`_decode` runs one at a time).
pub const DECODER_FRAME_BATCH: usize = 1;

/// `CACHE_T`: frames each causal conv keeps from its input.
const CACHE_T: usize = 2;

/// `F.normalize`'s `eps`.
const NORMALIZE_EPS: f32 = 1e-12;

/// The `config.json` fields the graphs depend on; missing fields take diffusers' defaults.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default)]
pub struct WanVaeConfig {
    pub base_dim: usize,
    pub decoder_base_dim: Option<usize>,
    pub z_dim: usize,
    pub dim_mult: Vec<usize>,
    pub num_res_blocks: usize,
    pub attn_scales: Vec<f64>,
    pub temperal_downsample: Vec<bool>,
    pub latents_mean: Vec<f64>,
    pub latents_std: Vec<f64>,
    pub is_residual: bool,
    pub in_channels: usize,
    pub out_channels: usize,
    pub patch_size: Option<usize>,
    pub scale_factor_temporal: Option<usize>,
    pub scale_factor_spatial: Option<usize>,
}

impl Default for WanVaeConfig {
    fn default() -> Self {
        WanVaeConfig {
            base_dim: 96,
            decoder_base_dim: None,
            z_dim: 16,
            dim_mult: vec![1, 2, 4, 4],
            num_res_blocks: 2,
            attn_scales: Vec::new(),
            temperal_downsample: vec![false, true, true],
            latents_mean: vec![
                -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134,
                -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
            ],
            latents_std: vec![
                2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526,
                2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
            ],
            is_residual: false,
            in_channels: 3,
            out_channels: 3,
            patch_size: None,
            scale_factor_temporal: Some(4),
            scale_factor_spatial: Some(8),
        }
    }
}

impl WanVaeConfig {
    /// Stages with a resampler: every `dim_mult` entry but the last.
    fn resampling_stages(&self) -> usize {
        self.dim_mult.len().saturating_sub(1)
    }

    /// Whether stage `i` of the encoder also halves time.
    fn time_down(&self, i: usize) -> bool {
        self.temperal_downsample.get(i).copied().unwrap_or(false)
    }

    /// Whether stage `i` of the decoder also doubles time (`temperal_downsample` reversed).
    fn time_up(&self, i: usize) -> bool {
        self.temperal_downsample
            .iter()
            .rev()
            .nth(i)
            .copied()
            .unwrap_or(false)
    }

    /// Video frames per latent frame: 2 per temporal downsampler.
    pub fn temporal_compression(&self) -> usize {
        1 << (0..self.resampling_stages())
            .filter(|&i| self.time_down(i))
            .count()
    }
}

/// Both graphs, their cache contracts, and what the checkpoint held that they do not use.
pub struct WanVaeExport {
    pub encoder: Graph,
    pub decoder: Graph,
    pub config: WanVaeConfig,
    pub encoder_caches: Vec<CacheSpec>,
    pub decoder_caches: Vec<CacheSpec>,
    pub unused_keys: Vec<String>,
}

/// Builds the encoder and decoder graphs from a diffusers Wan `vae` directory.
pub fn export(ckpt: &Checkpoint) -> Result<WanVaeExport> {
    let cfg: WanVaeConfig = ckpt.config(CLASS_NAME)?;
    check_supported(ckpt, &cfg)?;
    let (encoder, encoder_caches) = encoder(ckpt, &cfg)?;
    let (decoder, decoder_caches) = decoder(ckpt, &cfg)?;
    Ok(WanVaeExport {
        encoder,
        decoder,
        unused_keys: ckpt.unused_keys(),
        config: cfg,
        encoder_caches,
        decoder_caches,
    })
}

impl WanVaeExport {
    /// The manifest entry for these graphs written as `encoder` and `decoder`.
    pub fn manifest_entry(
        &self,
        encoder: &str,
        decoder: &str,
        raw_config: serde_json::Value,
    ) -> crate::manifest::VaeEntry {
        crate::manifest::VaeEntry {
            encoder: encoder.into(),
            decoder: decoder.into(),
            class_name: CLASS_NAME.into(),
            scaling_factor: 1.0,
            latent_channels: self.config.z_dim,
            in_channels: self.config.in_channels,
            encoder_frame_batch: ENCODER_FRAME_BATCH,
            decoder_frame_batch: DECODER_FRAME_BATCH,
            encoder_caches: self.encoder_caches.clone(),
            decoder_caches: self.decoder_caches.clone(),
            frame_schedule: FrameSchedule::FirstAlone,
            decoder_schedule: None,
            temporal_compression: self.config.temporal_compression(),
            latents_mean: self.config.latents_mean.clone(),
            latents_std: self.config.latents_std.clone(),
            config: raw_config,
        }
    }
}

fn check_supported(ckpt: &Checkpoint, cfg: &WanVaeConfig) -> Result<()> {
    let path = ckpt.dir().join("config.json");
    let unsupported = |what: &str| {
        Err(ExportError::Unsupported {
            path: path.clone(),
            what: what.into(),
        })
    };
    if cfg.is_residual {
        return unsupported("`is_residual: true` (the Wan2.2 VAE)");
    }
    if cfg.patch_size.is_some() {
        return unsupported("`patch_size` (the Wan2.2 VAE)");
    }
    if !cfg.attn_scales.is_empty() {
        return unsupported("non-empty `attn_scales` (Wan2.1 ships [])");
    }
    let bad = |message: String| {
        Err(ExportError::Config {
            path: path.clone(),
            message,
        })
    };
    if cfg.dim_mult.is_empty() || cfg.base_dim == 0 || cfg.z_dim == 0 {
        return bad("`dim_mult`, `base_dim` and `z_dim` must be non-empty / non-zero".into());
    }
    if cfg.latents_mean.len() != cfg.z_dim || cfg.latents_std.len() != cfg.z_dim {
        return bad(format!(
            "`latents_mean` ({}) and `latents_std` ({}) must have `z_dim` ({}) entries",
            cfg.latents_mean.len(),
            cfg.latents_std.len(),
            cfg.z_dim
        ));
    }
    if cfg.latents_std.contains(&0.0) {
        return bad("`latents_std` has a zero".into());
    }
    let dec = cfg.decoder_base_dim.unwrap_or(cfg.base_dim);
    if cfg.dim_mult.iter().any(|m| (m * dec) % 2 != 0) {
        return bad("decoder widths must be even (upsamplers halve the channels)".into());
    }
    Ok(())
}

// ---- building blocks ------------------------------------------------------------------------

/// Per-graph state: the causal-conv caches (with the `first_batch` switch) and that switch as
/// an int64 `[1]` for the shape arithmetic of [`select_first`].
struct Wan {
    cx: Causal,
    first_i: Value,
}

impl Wan {
    fn new(g: &mut Graph, hw: (&'static str, &'static str)) -> Wan {
        let cx = Causal::new(g, hw);
        let first_i = g.cast(&cx.first, DType::I64);
        Wan { cx, first_i }
    }

    /// Declares the cache input for the conv at `vb` and returns it, zero on the first chunk.
    fn cache(
        &mut self,
        g: &mut Graph,
        vb: &Scope,
        channels: usize,
        frames: usize,
        scale: SpatialScale,
    ) -> (CacheSpec, Value) {
        let spec = CacheSpec {
            name: format!("cache_in.{}", vb.prefix()),
            channels,
            frames,
            spatial_divisor: scale,
        };
        let dims = self.cx.cache_dims(&spec);
        let cache = g.input(&spec.name, DType::F32, dims);
        let zero = g.scalar(0.0);
        let cache = g.op("Where", &[&self.cx.first, &zero, &cache], vec![]);
        (spec, cache)
    }

    fn push(&mut self, spec: CacheSpec, out: Value) {
        self.cx.caches.push(spec);
        self.cx.cache_outs.push(out);
    }
}

/// `first_batch ? a : b` for `a`, `b` whose frame counts differ: both are concatenated on the
/// time axis and the graph slices `[0, Ta)` or `[Ta, Ta + Tb)`.
fn select_first(g: &mut Graph, first_i: &Value, a: &Value, b: &Value) -> Value {
    let both = g.concat(&[a, b], 2);
    let ta = g.shape_range(a, 2, 3);
    let tb = g.shape_range(b, 2, 3);
    let one = g.const_i64(&[1]);
    let not_first = g.sub(&one, first_i);
    let start = g.mul(&ta, &not_first);
    let tail = g.mul(&tb, &not_first);
    let end = g.add(&ta, &tail);
    g.slice_dyn(&both, 2, &start, &end)
}

/// `WanCausalConv3d(cin, cout, 3, padding=1)` at `vb`: the cached 2 frames (zeros on the first
/// chunk) in front in time, zeros around in space.
fn causal_conv(
    g: &mut Graph,
    w: &mut Wan,
    vb: &Scope,
    x: &Value,
    cin: usize,
    cout: usize,
    scale: SpatialScale,
) -> Result<Value> {
    let weight = vb.weight(g, "weight", &[cout, cin, 3, 3, 3])?;
    let bias = vb.weight(g, "bias", &[cout])?;
    let (spec, cache) = w.cache(g, vb, cin, CACHE_T, scale);
    let (y, out) = g.scoped(vb.prefix(), |g| {
        let padded = g.concat(&[&cache, x], 2);
        let out = g.slice(&padded, 2, -(CACHE_T as i64), i64::MAX);
        let y = g.op(
            "Conv",
            &[&padded, &weight, &bias],
            vec![
                ("kernel_shape", Attr::Ints(vec![3, 3, 3])),
                ("pads", Attr::Ints(vec![0, 1, 1, 0, 1, 1])),
            ],
        );
        (y, out)
    });
    w.push(spec, out);
    Ok(y)
}

/// `WanRMS_norm(c)` at `vb` on `[B, C, T, H, W]`: `x / max(‖x‖₂ over C, eps) · √C · gamma`
/// (diffusers' order of operations; `gamma` is `[C,1,1,1]`, or `[C,1,1]` with `images`).
fn rms_norm(g: &mut Graph, vb: &Scope, x: &Value, c: usize, images: bool) -> Result<Value> {
    let gamma = if images {
        let v = vb.weight(g, "gamma", &[c, 1, 1])?;
        g.reshape_to(&v, &[c as i64, 1, 1, 1])
    } else {
        vb.weight(g, "gamma", &[c, 1, 1, 1])?
    };
    // `rms`: f32 below f32, as torch's norm accumulates (and CUDA has no bf16 ReduceL2).
    Ok(g.scoped(vb.prefix(), |g| {
        g.scoped("rms", |g| {
            let norm = g.op(
                "ReduceL2",
                &[x],
                vec![("axes", Attr::Ints(vec![1])), ("keepdims", Attr::Int(1))],
            );
            let eps = g.scalar(NORMALIZE_EPS);
            let norm = g.op("Max", &[&norm, &eps], vec![]);
            let y = g.div(x, &norm);
            let scale = g.scalar((c as f32).sqrt());
            let y = g.mul(&y, &scale);
            g.mul(&y, &gamma)
        })
    }))
}

/// `WanResidualBlock(cin, cout)` at `vb`.
fn residual(
    g: &mut Graph,
    w: &mut Wan,
    vb: &Scope,
    x: &Value,
    cin: usize,
    cout: usize,
    scale: SpatialScale,
) -> Result<Value> {
    let h = if cin != cout {
        conv1x1(g, &vb.pp("conv_shortcut"), x, cin, cout)?
    } else {
        x.clone()
    };
    let y = rms_norm(g, &vb.pp("norm1"), x, cin, false)?;
    let y = g.silu(&y);
    let y = causal_conv(g, w, &vb.pp("conv1"), &y, cin, cout, scale)?;
    let y = rms_norm(g, &vb.pp("norm2"), &y, cout, false)?;
    let y = g.silu(&y);
    let y = causal_conv(g, w, &vb.pp("conv2"), &y, cout, cout, scale)?;
    Ok(g.add(&y, &h))
}

/// `WanAttentionBlock(c)` at `vb`: one-head attention over the pixels of each frame.
fn attention(g: &mut Graph, vb: &Scope, x: &Value, c: usize) -> Result<Value> {
    let ci = c as i64;
    let y = rms_norm(g, &vb.pp("norm"), x, c, true)?;
    let w_qkv = vb.pp("to_qkv").weight(g, "weight", &[3 * c, c, 1, 1])?;
    let b_qkv = vb.pp("to_qkv").weight(g, "bias", &[3 * c])?;
    let w_proj = vb.pp("proj").weight(g, "weight", &[c, c, 1, 1])?;
    let b_proj = vb.pp("proj").weight(g, "bias", &[c])?;
    Ok(g.scoped(vb.prefix(), |g| {
        // [B, C, T, H, W] → pixels [B, T, H, W, C]; the 1×1 convs are per-pixel linears.
        let pixels = g.transpose(&y, &[0, 2, 3, 4, 1]);
        let frame_shape = g.shape(&pixels);
        let tokens = g.reshape_to(&pixels, &[0, 0, -1, ci]);
        let linear = |g: &mut Graph, t: &Value, w: &Value, b: &Value, n: i64| {
            let w = g.reshape_to(w, &[n, ci]);
            let wt = g.transpose(&w, &[1, 0]);
            let y = g.matmul(t, &wt);
            g.add(&y, b)
        };
        let qkv = linear(g, &tokens, &w_qkv, &b_qkv, 3 * ci);
        // One sequence per frame: [B·T, H·W, 1 head, C].
        let hw = g.shape_range(&tokens, 2, 3);
        let head = g.const_i64(&[-1]);
        let tail = g.const_i64(&[1, ci]);
        let seq = g.concat(&[&head, &hw, &tail], 0);
        let [q, k, v] = g.chunk::<3>(&qkv, ci, -1);
        let (q, k, v) = (
            g.reshape(&q, &seq),
            g.reshape(&k, &seq),
            g.reshape(&v, &seq),
        );
        let o = crate::layers::sdpa(g, &q, &k, &v, ci, c);
        let o = linear(g, &o, &w_proj, &b_proj, ci);
        let o = g.reshape(&o, &frame_shape);
        let o = g.transpose(&o, &[0, 4, 1, 2, 3]);
        g.add(&o, x)
    }))
}

/// `WanMidBlock(c)` at `vb`: resnet, attention, resnet.
fn mid_block(
    g: &mut Graph,
    w: &mut Wan,
    vb: &Scope,
    x: &Value,
    c: usize,
    scale: SpatialScale,
) -> Result<Value> {
    let x = residual(g, w, &vb.pp("resnets").pp(0), x, c, c, scale)?;
    let x = attention(g, &vb.pp("attentions").pp(0), &x, c)?;
    residual(g, w, &vb.pp("resnets").pp(1), &x, c, c, scale)
}

/// `WanResample(c, "downsample2d" | "downsample3d")` at `vb`, on `x` at `scale`: a zero pad
/// (right, bottom) and a stride-2 3×3 Conv2d per frame; with `time`, then the stride-2
/// `(3,1,1)` time conv over the cached last frame and this chunk (not on the first chunk).
fn downsample(
    g: &mut Graph,
    w: &mut Wan,
    vb: &Scope,
    x: &Value,
    c: usize,
    time: bool,
    scale: SpatialScale,
) -> Result<Value> {
    let rw = vb.pp("resample").pp(1).weight(g, "weight", &[c, c, 3, 3])?;
    let rb = vb.pp("resample").pp(1).weight(g, "bias", &[c])?;
    let x = g.scoped(vb.prefix(), |g| {
        per_frame_conv2d(g, x, &rw, &rb, 2, [0, 0, 1, 1])
    });
    if !time {
        return Ok(x);
    }
    let tv = vb.pp("time_conv");
    let tw = tv.weight(g, "weight", &[c, c, 3, 1, 1])?;
    let tb = tv.weight(g, "bias", &[c])?;
    let (spec, cache) = w.cache(g, &tv, c, 1, scale.halved());
    let first_i = w.first_i.clone();
    let (y, out) = g.scoped(tv.prefix(), |g| {
        let out = g.slice(&x, 2, -1, i64::MAX);
        // Two zero filler frames keep the conv's input ≥ its kernel on the 1-frame first
        // chunk; the outputs they touch are sliced off (a chunk of T frames yields ⌊T/2⌋).
        // They are the conv's own trailing pad, not a `Pad` node: ONNX Runtime's CUDA `Pad`
        // has no bf16 kernel, which kept a bf16 GPU engine's whole encoder in f32.
        let joined = g.concat(&[&cache, &x], 2);
        let y = g.op(
            "Conv",
            &[&joined, &tw, &tb],
            vec![
                ("kernel_shape", Attr::Ints(vec![3, 1, 1])),
                ("strides", Attr::Ints(vec![2, 1, 1])),
                ("pads", Attr::Ints(vec![0, 0, 0, 2, 0, 0])),
            ],
        );
        let t = g.shape_range(&x, 2, 3);
        let two = g.const_i64(&[2]);
        let half = g.div(&t, &two);
        let zero = g.const_i64(&[0]);
        let y = g.slice_dyn(&y, 2, &zero, &half);
        (select_first(g, &first_i, &x, &y), out)
    });
    w.push(spec, out);
    Ok(y)
}

/// `WanResample(c, "upsample2d" | "upsample3d")` at `vb`, on `x` at `scale`: with `time`, first
/// the `(3,1,1)` causal time conv to `2c` channels, interleaved into 2 frames per frame (not on
/// the first chunk, which also leaves a zero cache); then nearest 2× and a 3×3 Conv2d to `c/2`.
fn upsample(
    g: &mut Graph,
    w: &mut Wan,
    vb: &Scope,
    x: &Value,
    c: usize,
    time: bool,
    scale: SpatialScale,
) -> Result<Value> {
    let x = if time {
        let tv = vb.pp("time_conv");
        let tw = tv.weight(g, "weight", &[2 * c, c, 3, 1, 1])?;
        let tb = tv.weight(g, "bias", &[2 * c])?;
        let (spec, cache) = w.cache(g, &tv, c, CACHE_T, scale);
        let (first, first_i) = (w.cx.first.clone(), w.first_i.clone());
        let (y, out) = g.scoped(tv.prefix(), |g| {
            let padded = g.concat(&[&cache, x], 2);
            let last = g.slice(&padded, 2, -(CACHE_T as i64), i64::MAX);
            let zero = g.scalar(0.0);
            let out = g.op("Where", &[&first, &zero, &last], vec![]);
            let y = g.op(
                "Conv",
                &[&padded, &tw, &tb],
                vec![("kernel_shape", Attr::Ints(vec![3, 1, 1]))],
            );
            // [B, 2C, T, h, w] → [B, 2, C, T, h, w] → [B, C, T, 2, h, w] → [B, C, 2T, h, w].
            let b = g.shape_range(x, 0, 1);
            let rest = g.shape_range(x, 1, 5);
            let two = g.const_i64(&[2]);
            let s6 = g.concat(&[&b, &two, &rest], 0);
            let y = g.reshape(&y, &s6);
            let y = g.transpose(&y, &[0, 2, 3, 1, 4, 5]);
            let bc = g.shape_range(x, 0, 2);
            let minus1 = g.const_i64(&[-1]);
            let hw = g.shape_range(x, 3, 5);
            let s5 = g.concat(&[&bc, &minus1, &hw], 0);
            let y = g.reshape(&y, &s5);
            (select_first(g, &first_i, x, &y), out)
        });
        w.push(spec, out);
        y
    } else {
        x.clone()
    };
    let rv = vb.pp("resample").pp(1);
    let rw = rv.weight(g, "weight", &[c / 2, c, 3, 3])?;
    let rb = rv.weight(g, "bias", &[c / 2])?;
    Ok(g.scoped(vb.prefix(), |g| {
        let up = repeat(g, &x, 1, 2);
        per_frame_conv2d(g, &up, &rw, &rb, 1, [1, 1, 1, 1])
    }))
}

fn record_metadata(g: &mut Graph, part: &str, caches: &[CacheSpec]) {
    g.metadata("v2l.architecture", CLASS_NAME);
    g.metadata("v2l.vae.part", part);
    // Serialising plain structs of strings and integers cannot fail.
    if let Ok(json) = serde_json::to_string(caches) {
        g.metadata("v2l.vae.caches", &json);
    }
}

fn latent_dims(z: usize) -> Vec<Dim> {
    vec![
        "batch".into(),
        Dim::Fixed(z as i64),
        "latent_frames".into(),
        "latent_height".into(),
        "latent_width".into(),
    ]
}

// ---- encoder and decoder --------------------------------------------------------------------

/// `WanEncoder3d` on one chunk, `quant_conv`, then the posterior's mean and clamped logvar.
fn encoder(ckpt: &Checkpoint, cfg: &WanVaeConfig) -> Result<(Graph, Vec<CacheSpec>)> {
    let mut g = Graph::new("wan_vae_encoder");
    let vb = Scope::new(ckpt).pp("encoder");
    let video = g.input(
        vae_io::VIDEO,
        DType::F32,
        crate::layers::video_dims(cfg.in_channels),
    );
    let mut w = Wan::new(&mut g, ("height", "width"));
    let dims: Vec<usize> = std::iter::once(1)
        .chain(cfg.dim_mult.iter().copied())
        .map(|m| m * cfg.base_dim)
        .collect();
    let mut scale = SpatialScale::ONE;
    let mut cout = cfg.base_dim;
    let mut x = causal_conv(
        &mut g,
        &mut w,
        &vb.pp("conv_in"),
        &video,
        cfg.in_channels,
        cout,
        scale,
    )?;
    let blocks = vb.pp("down_blocks");
    let mut idx = 0;
    for (i, pair) in dims.windows(2).enumerate() {
        let &[mut cin, out] = pair else { continue };
        cout = out;
        for _ in 0..cfg.num_res_blocks {
            x = residual(&mut g, &mut w, &blocks.pp(idx), &x, cin, cout, scale)?;
            idx += 1;
            cin = cout;
        }
        if i < cfg.resampling_stages() {
            let time = cfg.time_down(i);
            x = downsample(&mut g, &mut w, &blocks.pp(idx), &x, cout, time, scale)?;
            scale = scale.halved();
            idx += 1;
        }
    }
    x = mid_block(&mut g, &mut w, &vb.pp("mid_block"), &x, cout, scale)?;
    let x = rms_norm(&mut g, &vb.pp("norm_out"), &x, cout, false)?;
    let x = g.silu(&x);
    let z2 = 2 * cfg.z_dim;
    let x = causal_conv(&mut g, &mut w, &vb.pp("conv_out"), &x, cout, z2, scale)?;
    let x = conv1x1(&mut g, &Scope::new(ckpt).pp("quant_conv"), &x, z2, z2)?;
    let l = cfg.z_dim as i64;
    let (mean, logvar) = g.scoped("posterior", |g| {
        let mean = g.slice(&x, 1, 0, l);
        let logvar = g.slice(&x, 1, l, 2 * l);
        let lo = g.scalar(-30.0);
        let hi = g.scalar(20.0);
        (mean, g.op("Clip", &[&logvar, &lo, &hi], vec![]))
    });
    g.output(
        &mean,
        vae_io::POSTERIOR_MEAN,
        DType::F32,
        latent_dims(cfg.z_dim),
    );
    g.output(
        &logvar,
        vae_io::POSTERIOR_LOGVAR,
        DType::F32,
        latent_dims(cfg.z_dim),
    );
    w.cx.declare_outputs(&mut g);
    record_metadata(&mut g, "encoder", &w.cx.caches);
    Ok((g, w.cx.caches))
}

/// `post_quant_conv` and `WanDecoder3d` on one latent frame chunk, clamped to [-1, 1].
fn decoder(ckpt: &Checkpoint, cfg: &WanVaeConfig) -> Result<(Graph, Vec<CacheSpec>)> {
    let mut g = Graph::new("wan_vae_decoder");
    let vb = Scope::new(ckpt).pp("decoder");
    let z = cfg.z_dim;
    let latents = g.input(vae_io::LATENTS, DType::F32, latent_dims(z));
    let mut w = Wan::new(&mut g, ("latent_height", "latent_width"));
    let base = cfg.decoder_base_dim.unwrap_or(cfg.base_dim);
    let last_mult = cfg.dim_mult.last().copied().unwrap_or(1);
    let dims: Vec<usize> = std::iter::once(last_mult)
        .chain(cfg.dim_mult.iter().rev().copied())
        .map(|m| m * base)
        .collect();
    let mut scale = SpatialScale::ONE;
    let mut cout = last_mult * base;
    let x = conv1x1(
        &mut g,
        &Scope::new(ckpt).pp("post_quant_conv"),
        &latents,
        z,
        z,
    )?;
    let mut x = causal_conv(&mut g, &mut w, &vb.pp("conv_in"), &x, z, cout, scale)?;
    x = mid_block(&mut g, &mut w, &vb.pp("mid_block"), &x, cout, scale)?;
    let stages = cfg.resampling_stages();
    for (i, pair) in dims.windows(2).enumerate() {
        let &[cin, out] = pair else { continue };
        let blk = vb.pp("up_blocks").pp(i);
        // After the first stage the input is an upsampler's output, which halves channels.
        let mut cin = if i > 0 { cin / 2 } else { cin };
        cout = out;
        for j in 0..=cfg.num_res_blocks {
            x = residual(
                &mut g,
                &mut w,
                &blk.pp("resnets").pp(j),
                &x,
                cin,
                cout,
                scale,
            )?;
            cin = cout;
        }
        if i < stages {
            let time = cfg.time_up(i);
            let up = blk.pp("upsamplers").pp(0);
            x = upsample(&mut g, &mut w, &up, &x, cout, time, scale)?;
            scale = scale.doubled();
        }
    }
    let x = rms_norm(&mut g, &vb.pp("norm_out"), &x, cout, false)?;
    let x = g.silu(&x);
    let out = cfg.out_channels;
    let x = causal_conv(&mut g, &mut w, &vb.pp("conv_out"), &x, cout, out, scale)?;
    let x = g.scoped("clamp", |g| {
        let lo = g.scalar(-1.0);
        let hi = g.scalar(1.0);
        g.op("Clip", &[&x, &lo, &hi], vec![])
    });
    g.output(
        &x,
        vae_io::SAMPLE,
        DType::F32,
        crate::layers::video_dims(out),
    );
    w.cx.declare_outputs(&mut g);
    record_metadata(&mut g, "decoder", &w.cx.caches);
    Ok((g, w.cx.caches))
}
