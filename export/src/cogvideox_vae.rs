//! CogVideoX 3D VAE (`AutoencoderKLCogVideoX`) as two ONNX graphs: encoder and decoder.
//!
//! Mirrors diffusers 0.42.1 `models/autoencoders/autoencoder_kl_cogvideox.py` (with
//! `CogVideoXDownsample3D` / `CogVideoXUpsample3D` from `downsampling.py` / `upsampling.py`):
//! causal 3D convolutions, GroupNorm resnets, time+space down/upsampling, and in the decoder
//! the SpatialNorm3D conditioning on the latents. The VAE has no attention.
//!
//! diffusers never runs the VAE over a whole clip: `_encode` / `_decode` loop over frame
//! batches ([`frame_batches`]; 8 video frames, 2 latent frames, the first batch also takes the
//! remainder) and thread a cache of the last frames of every causal convolution's input from one
//! batch to the next. GroupNorm statistics and the odd/even frame rules see only the current
//! batch, so the batching is part of the numerics and must be reproduced. Each graph here is
//! ONE batch of that loop; the runtime owns the loop.
//!
//! Graph contract (per batch):
//!
//! | graph | inputs | outputs |
//! |---|---|---|
//! | encoder | `video [B,Cin,T,H,W]`, `first_batch [1]`, `cache_in.*` | `posterior_mean`, `posterior_logvar [B,L,T',H/s,W/s]`, `cache_out.*` |
//! | decoder | `latents [B,L,T',h,w]`, `first_batch [1]`, `cache_in.*` | `sample [B,Cout,T,h·s,w·s]`, `cache_out.*` |
//!
//! * `first_batch` is 1.0 for the first batch of a clip, 0.0 afterwards. With 1.0 each causal
//!   conv pads time by replicating the first frame of its input (diffusers with no cache) and
//!   the `cache_in.*` values are ignored: any values of the declared shape, NaN included (each
//!   is read only through a `Where` on `first_batch`; v2l feeds zeros on the CPU and leaves a
//!   GPU's unwritten); with 0.0 it pads with `cache_in.*`.
//! * `cache_in.<module>` (one per causal conv with a temporal kernel > 1, e.g.
//!   `cache_in.encoder.down_blocks.0.resnets.0.conv1`) is `[B, C, k_t-1, H·num/den, W·num/den]`
//!   as listed in [`CacheSpec`]; after a batch, feed each `cache_out.<module>` back as
//!   `cache_in.<module>` of the next batch.
//! * The decoder's `latents` are the raw VAE latents: the caller has already divided by
//!   `scaling_factor` (recorded in the metadata) as the pipelines do.
//! * `posterior_logvar` is clamped to [-30, 20] as `DiagonalGaussianDistribution` does; the
//!   caller concatenates the batches on the time axis.
//!
//! Sizes B, T, H, W are dynamic. The frame-count rules that depend on parity (Downsample3D
//! keeps frame 0 apart when T is odd, Upsample3D gives 2T-1 frames for odd T, SpatialNorm3D
//! maps latent frame 0 to output frame 0 alone) are computed in the graph from `T mod 2`.
//!
//! ```text
//! v2l-export vae path/to/vae -o out/   # writes out/vae_encoder.onnx, out/vae_decoder.onnx
//! ```

use serde::{Deserialize, Serialize};
use v2l_contracts::io::vae as vae_io;
use v2l_graphs::passes::GROUP_NORM_SCOPE;
use v2l_graphs::{Attr, DType, Dim, Graph, Value};

use crate::checkpoint::Checkpoint;
use crate::error::{ExportError, Result};
use crate::scope::Scope;

/// The `_class_name` this exporter accepts in `config.json`.
pub const CLASS_NAME: &str = v2l_contracts::Family::CogVideoX.vae_class();

/// `AutoencoderKLCogVideoX.num_sample_frames_batch_size`: video frames per encoder batch
/// (an attribute set in `__init__`, not a config field).
pub const SAMPLE_FRAMES_BATCH_SIZE: usize = 8;

/// `AutoencoderKLCogVideoX.num_latent_frames_batch_size`: latent frames per decoder batch
/// (an attribute set in `__init__`, not a config field).
pub const LATENT_FRAMES_BATCH_SIZE: usize = 2;

/// Kernel size of every `CogVideoXCausalConv3d` with a cache (hard-coded 3 in diffusers).
const KERNEL: usize = 3;

/// `eps` of the GroupNorms diffusers hard-codes (encoder `norm_out`, every SpatialNorm3D).
const FIXED_EPS: f32 = 1e-6;

/// The `config.json` fields the graphs depend on; a missing field takes diffusers' default
/// (`AutoencoderKLCogVideoX.__init__`, see [`Default`]).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default)]
pub struct VaeConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<usize>,
    pub latent_channels: usize,
    pub layers_per_block: usize,
    pub act_fn: String,
    pub norm_eps: f32,
    pub norm_num_groups: usize,
    pub temporal_compression_ratio: f64,
    pub scaling_factor: f64,
    pub shift_factor: Option<f64>,
    pub invert_scale_latents: bool,
    pub use_quant_conv: bool,
    pub use_post_quant_conv: bool,
}

impl Default for VaeConfig {
    fn default() -> Self {
        VaeConfig {
            in_channels: 3,
            out_channels: 3,
            down_block_types: vec!["CogVideoXDownBlock3D".into(); 4],
            up_block_types: vec!["CogVideoXUpBlock3D".into(); 4],
            block_out_channels: vec![128, 256, 256, 512],
            latent_channels: 16,
            layers_per_block: 3,
            act_fn: "silu".into(),
            norm_eps: 1e-6,
            norm_num_groups: 32,
            temporal_compression_ratio: 4.0,
            scaling_factor: 1.152_584_26,
            shift_factor: None,
            invert_scale_latents: false,
            use_quant_conv: false,
            use_post_quant_conv: false,
        }
    }
}

impl VaeConfig {
    /// `temporal_compress_level = int(np.log2(temporal_compression_ratio))`: how many of the
    /// first down/up blocks also resample time.
    pub fn temporal_compress_level(&self) -> usize {
        self.temporal_compression_ratio.log2().trunc().max(0.0) as usize
    }

    /// Spatial factor between video and latents (one 2× resampler per block but the last).
    pub fn spatial_compression(&self) -> usize {
        1 << self.block_out_channels.len().saturating_sub(1)
    }
}

pub use v2l_contracts::frame_batch::{frame_batches, CacheSpec, SpatialScale};

/// The symbolic dim name of `base` at `scale` (`height/4`, `latent_width*2`).
fn scale_dim(scale: SpatialScale, base: &str) -> Dim {
    let mut s = base.to_string();
    if scale.num != 1 {
        s = format!("{s}*{}", scale.num);
    }
    if scale.den != 1 {
        s = format!("{s}/{}", scale.den);
    }
    Dim::Named(s)
}

/// Both graphs, their cache contracts, and what the checkpoint held that they do not use.
pub struct VaeExport {
    pub encoder: Graph,
    pub decoder: Graph,
    pub config: VaeConfig,
    /// The decode loop the decoder graph was built for.
    pub decode: DecodeLoop,
    /// Encoder caches in graph-input order (spatial scale relative to `video`).
    pub encoder_caches: Vec<CacheSpec>,
    /// Decoder caches in graph-input order (spatial scale relative to `latents`).
    pub decoder_caches: Vec<CacheSpec>,
    /// Checkpoint tensors neither graph uses.
    pub unused_keys: Vec<String>,
}

/// Which decode loop the decoder graph serves: the temporal upsamplers' frame rule differs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DecodeLoop {
    /// diffusers' `_decode`: batches of 2 latent frames, the first also taking the remainder;
    /// an odd batch keeps its first frame single in every upsampler.
    #[default]
    Diffusers,
    /// VideoX-Fun's `_decode` (`auto_split_process = False`): latent frame 0 alone
    /// (`_set_first_frame`: upsampled in space only), then batches of 2 whose every frame is
    /// doubled in time (`_set_rest_frame`), a short last batch included.
    Fun,
}

/// Builds the encoder and decoder graphs from a diffusers `vae` directory.
pub fn export(ckpt: &Checkpoint) -> Result<VaeExport> {
    export_for(ckpt, DecodeLoop::Diffusers)
}

/// [`export`] with the decoder built for `decode`'s loop.
pub fn export_for(ckpt: &Checkpoint, decode: DecodeLoop) -> Result<VaeExport> {
    let cfg: VaeConfig = ckpt.config(CLASS_NAME)?;
    check_supported(ckpt, &cfg)?;
    let (encoder, encoder_caches) = encoder(ckpt, &cfg)?;
    let (decoder, decoder_caches) = decoder(ckpt, &cfg, decode)?;
    let unused_keys = ckpt.unused_keys();
    Ok(VaeExport {
        encoder,
        decoder,
        config: cfg,
        decode,
        encoder_caches,
        decoder_caches,
        unused_keys,
    })
}

fn check_supported(ckpt: &Checkpoint, cfg: &VaeConfig) -> Result<()> {
    let path = ckpt.dir().join("config.json");
    let unsupported = |what: String| {
        Err(ExportError::Unsupported {
            path: path.clone(),
            what,
        })
    };
    let bad = |message: String| {
        Err(ExportError::Config {
            path: path.clone(),
            message,
        })
    };
    if cfg.use_quant_conv {
        return unsupported("`use_quant_conv: true`".into());
    }
    if cfg.use_post_quant_conv {
        return unsupported("`use_post_quant_conv: true`".into());
    }
    if cfg.act_fn != "silu" && cfg.act_fn != "swish" {
        return unsupported(format!("act_fn `{}`", cfg.act_fn));
    }
    if let Some(t) = cfg
        .down_block_types
        .iter()
        .find(|t| *t != "CogVideoXDownBlock3D")
    {
        return unsupported(format!("down block type `{t}`"));
    }
    if let Some(t) = cfg
        .up_block_types
        .iter()
        .find(|t| *t != "CogVideoXUpBlock3D")
    {
        return unsupported(format!("up block type `{t}`"));
    }
    let n = cfg.block_out_channels.len();
    if n == 0 || cfg.down_block_types.len() != n || cfg.up_block_types.len() != n {
        return bad(format!(
            "block_out_channels ({n}), down_block_types ({}) and up_block_types ({}) must have the same non-zero length",
            cfg.down_block_types.len(),
            cfg.up_block_types.len()
        ));
    }
    if cfg.layers_per_block == 0 {
        return unsupported("`layers_per_block: 0`".into());
    }
    if !(cfg.temporal_compression_ratio >= 1.0 && cfg.temporal_compression_ratio.is_finite()) {
        return bad(format!(
            "temporal_compression_ratio {} must be ≥ 1",
            cfg.temporal_compression_ratio
        ));
    }
    let g = cfg.norm_num_groups;
    if g == 0 || cfg.block_out_channels.iter().any(|c| c % g != 0) {
        return bad(format!(
            "norm_num_groups {g} must divide every block_out_channels entry {:?}",
            cfg.block_out_channels
        ));
    }
    Ok(())
}

// ---- causal convolution and its cache -------------------------------------------------------

/// Per-graph state of the causal convolutions: the `first_batch` switch and the caches seen.
pub(crate) struct Causal {
    /// `first_batch > 0.5` as a bool `[1]`.
    pub(crate) first: Value,
    /// Symbolic names of the main input's height and width (for the cache dims).
    hw: (&'static str, &'static str),
    pub(crate) caches: Vec<CacheSpec>,
    pub(crate) cache_outs: Vec<Value>,
}

impl Causal {
    pub(crate) fn new(g: &mut Graph, hw: (&'static str, &'static str)) -> Causal {
        let flag = g.input("first_batch", DType::F32, vec![Dim::Fixed(1)]);
        let half = g.scalar(0.5);
        let first = g.op("Greater", &[&flag, &half], vec![]);
        Causal {
            first,
            hw,
            caches: Vec::new(),
            cache_outs: Vec::new(),
        }
    }

    pub(crate) fn cache_dims(&self, spec: &CacheSpec) -> Vec<Dim> {
        vec![
            "batch".into(),
            Dim::Fixed(spec.channels as i64),
            Dim::Fixed(spec.frames as i64),
            scale_dim(spec.spatial_divisor, self.hw.0),
            scale_dim(spec.spatial_divisor, self.hw.1),
        ]
    }

    /// Declares `cache_out.*` for every cache, in input order.
    pub(crate) fn declare_outputs(&self, g: &mut Graph) {
        for (spec, v) in self.caches.iter().zip(&self.cache_outs) {
            let dims = self.cache_dims(spec);
            g.output(v, &spec.output_name(), DType::F32, dims);
        }
    }
}

/// `CogVideoXCausalConv3d(cin, cout, kernel_size=3)` (pad_mode "first") at module `vb`, on `x`
/// whose spatial size is `scale` of the main input. Time is padded in front with the cache
/// (or the first frame twice on the first batch), space with zeros inside the Conv.
fn causal_conv(
    g: &mut Graph,
    cx: &mut Causal,
    vb: &Scope,
    x: &Value,
    cin: usize,
    cout: usize,
    scale: SpatialScale,
) -> Result<Value> {
    let k = KERNEL;
    let w = vb.pp("conv").weight(g, "weight", &[cout, cin, k, k, k])?;
    let b = vb.pp("conv").weight(g, "bias", &[cout])?;
    let spec = CacheSpec {
        name: format!("cache_in.{}", vb.prefix()),
        channels: cin,
        frames: k - 1,
        spatial_divisor: scale,
    };
    let dims = cx.cache_dims(&spec);
    let cache = g.input(&spec.name, DType::F32, dims);
    let (y, cache_out) = g.scoped(vb.prefix(), |g| {
        let x0 = g.slice(x, 2, 0, 1);
        let copies = vec![&x0; k - 1];
        let replicated = if k == 2 {
            x0.clone()
        } else {
            g.concat(&copies, 2)
        };
        let pad = g.op("Where", &[&cx.first, &replicated, &cache], vec![]);
        let padded = g.concat(&[&pad, x], 2);
        let cache_out = g.slice(&padded, 2, -(k as i64 - 1), i64::MAX);
        let p = (k as i64 - 1) / 2;
        let y = g.op(
            "Conv",
            &[&padded, &w, &b],
            vec![
                ("kernel_shape", Attr::Ints(vec![k as i64; 3])),
                ("pads", Attr::Ints(vec![0, p, p, 0, p, p])),
            ],
        );
        (y, cache_out)
    });
    cx.caches.push(spec);
    cx.cache_outs.push(cache_out);
    Ok(y)
}

/// A 1×1×1 `Conv3d(cin, cout)` whose `weight`/`bias` live at `vb` (conv_shortcut, and the
/// kernel-1 causal convs of SpatialNorm3D, which neither pad nor read their cache).
pub(crate) fn conv1x1(
    g: &mut Graph,
    vb: &Scope,
    x: &Value,
    cin: usize,
    cout: usize,
) -> Result<Value> {
    let w = vb.weight(g, "weight", &[cout, cin, 1, 1, 1])?;
    let b = vb.weight(g, "bias", &[cout])?;
    Ok(g.scoped(vb.prefix(), |g| {
        g.op(
            "Conv",
            &[x, &w, &b],
            vec![("kernel_shape", Attr::Ints(vec![1, 1, 1]))],
        )
    }))
}

/// `nn.Conv2d(k=3)` applied to every frame (`[B,C,T,H,W] -> [B·T,C,H,W]`, as diffusers does),
/// with `pads` in ONNX order `[top, left, bottom, right]`.
pub(crate) fn per_frame_conv2d(
    g: &mut Graph,
    x: &Value,
    w: &Value,
    b: &Value,
    stride: i64,
    pads: [i64; 4],
) -> Value {
    let xt = g.transpose(x, &[0, 2, 1, 3, 4]);
    let bt = g.shape_range(&xt, 0, 2);
    let chw = g.shape_range(&xt, 2, 5);
    let minus1 = g.const_i64(&[-1]);
    let s = g.concat(&[&minus1, &chw], 0);
    let frames = g.reshape(&xt, &s);
    let y = g.op(
        "Conv",
        &[&frames, w, b],
        vec![
            ("kernel_shape", Attr::Ints(vec![3, 3])),
            ("strides", Attr::Ints(vec![stride, stride])),
            ("pads", Attr::Ints(pads.to_vec())),
        ],
    );
    let chw = g.shape_range(&y, 1, 4);
    let s = g.concat(&[&bt, &chw], 0);
    let y = g.reshape(&y, &s);
    g.transpose(&y, &[0, 2, 1, 3, 4])
}

// ---- normalisation --------------------------------------------------------------------------

/// GroupNorm's statistics of `x [B,C,T,H,W]` over (C/G, T, H, W) of each batch row, in f32:
/// the centred `x - mean` (shaped like `x`) and `1/√(var + eps)` per channel `[B,C,1,1,1]`
/// (biased variance, two passes), for the caller to scale and shift in one pass.
///
/// Each statistic is a mean of per-row means over `[B, G, C/G·T, H·W]`: a group holds millions
/// of elements at real resolutions, and one flat f32 reduction (ReduceMean, or ORT's
/// `InstanceNormalization`, which was 5 % faster) put the real-width decoder 9.3e-5 away from
/// PyTorch; two levels bring it to 9.0e-7 (PyTorch fp32 is itself 6.9e-7 from fp64). The
/// squares go through `ReduceMean` too: `ReduceSumSquare` saves writing them out but doubled
/// the decoder's distance from PyTorch (1.6e-6 against 8.5e-7 at 9×128×192).
fn group_stats(
    g: &mut Graph,
    x: &Value,
    channels: usize,
    groups: usize,
    eps: f32,
) -> (Value, Value) {
    let shape = g.shape(x);
    let hw = g.shape_range(x, 3, 5);
    let hw = g.op("ReduceProd", &[&hw], vec![("keepdims", Attr::Int(1))]);
    let head = g.const_i64(&[0, groups as i64, -1]);
    let s4 = g.concat(&[&head, &hw], 0);
    let xg = g.reshape(x, &s4);
    let rows = g.op(
        "ReduceMean",
        &[&xg],
        vec![("axes", Attr::Ints(vec![3])), ("keepdims", Attr::Int(1))],
    );
    let mean_of_rows = |g: &mut Graph, rows: &Value| {
        g.op(
            "ReduceMean",
            &[rows],
            vec![("axes", Attr::Ints(vec![2])), ("keepdims", Attr::Int(1))],
        )
    };
    let mean = mean_of_rows(g, &rows);
    let d = g.sub(&xg, &mean);
    let d2 = g.mul(&d, &d);
    let sq_rows = g.op(
        "ReduceMean",
        &[&d2],
        vec![("axes", Attr::Ints(vec![3])), ("keepdims", Attr::Int(1))],
    );
    let var = mean_of_rows(g, &sq_rows);
    let e = g.scalar(eps);
    let ve = g.add(&var, &e);
    let sd = g.op("Sqrt", &[&ve], vec![]);
    let inv = g.op("Reciprocal", &[&sd], vec![]);
    // [B, G, 1, 1] → [B, G, C/G, 1] → [B, C, 1, 1, 1]
    let per = g.const_i64(&[1, 1, (channels / groups) as i64, 1]);
    let inv = g.op("Expand", &[&inv, &per], vec![]);
    let c5 = g.const_i64(&[0, channels as i64, 1, 1, 1]);
    let inv = g.reshape(&inv, &c5);
    (g.reshape(&d, &shape), inv)
}

/// `nn.GroupNorm(groups, channels, eps, affine=True)` at `vb` on `[B,C,T,H,W]`
/// ([`group_stats`]): `(x - mean)·(γ/σ) + β`, two passes over the tensor.
fn group_norm(
    g: &mut Graph,
    vb: &Scope,
    x: &Value,
    channels: usize,
    groups: usize,
    eps: f32,
) -> Result<Value> {
    let gamma = vb.weight(g, "weight", &[channels])?;
    let beta = vb.weight(g, "bias", &[channels])?;
    Ok(g.scoped(vb.prefix(), |g| {
        g.scoped(GROUP_NORM_SCOPE, |g| {
            let (d, inv) = group_stats(g, x, channels, groups, eps);
            let c = channels as i64;
            let gm = g.reshape_to(&gamma, &[c, 1, 1, 1]);
            let bt = g.reshape_to(&beta, &[c, 1, 1, 1]);
            let scale = g.mul(&inv, &gm);
            let y = g.mul(&d, &scale);
            g.add(&y, &bt)
        })
    }))
}

/// Nearest-neighbour upscaling by integer factors: every frame `rt` times, every pixel `rs×rs`
/// (what `F.interpolate(mode="nearest")` does for these exact ratios).
pub(crate) fn repeat(g: &mut Graph, x: &Value, rt: i64, rs: i64) -> Value {
    if rt == 1 && rs == 1 {
        return x.clone();
    }
    let u = g.unsqueeze(x, &[3, 5, 7]);
    let e = g.const_i64(&[1, 1, 1, rt, 1, rs, 1, rs]);
    let u = g.op("Expand", &[&u, &e], vec![]);
    let s = g.shape(x);
    let m = g.const_i64(&[1, 1, rt, rs, rs]);
    let s = g.mul(&s, &m);
    g.reshape(&u, &s)
}

/// The latents `zq` of the decoder batch with the static time/space ratios of the current
/// stage, for `CogVideoXSpatialNorm3D`.
struct Zq<'a> {
    zq: &'a Value,
    channels: usize,
    /// Frame ratio between this stage and the latents (2^time-upsamplers so far).
    rt: i64,
    /// Spatial ratio (2^upsamplers so far).
    rs: i64,
}

/// `CogVideoXSpatialNorm3D(f_channels, zq_channels, groups)` at `vb`:
/// `GroupNorm(f) · conv_y(zq↑) + conv_b(zq↑)`.
///
/// diffusers resizes zq to f's size (frame 0 alone when f has an odd count > 1). With f having
/// `Tf = rt·(n-1)+1` frames (odd) or `rt·n` (even), both cases are exactly the LAST `Tf` frames
/// of zq repeated `rt` times. conv_y/conv_b are 1×1×1, so they run on the small zq before the
/// repeat.
fn spatial_norm(
    g: &mut Graph,
    vb: &Scope,
    f: &Value,
    f_channels: usize,
    z: &Zq,
    groups: usize,
) -> Result<Value> {
    let y = conv1x1(g, &vb.pp("conv_y").pp("conv"), z.zq, z.channels, f_channels)?;
    let b = conv1x1(g, &vb.pp("conv_b").pp("conv"), z.zq, z.channels, f_channels)?;
    let nvb = vb.pp("norm_layer");
    let gamma = nvb.weight(g, "weight", &[f_channels])?;
    let beta = nvb.weight(g, "bias", &[f_channels])?;
    let (d, inv) = g.scoped(nvb.prefix(), |g| {
        g.scoped(GROUP_NORM_SCOPE, |g| {
            group_stats(g, f, f_channels, groups, FIXED_EPS)
        })
    });
    Ok(g.scoped(vb.prefix(), |g| {
        g.scoped(GROUP_NORM_SCOPE, |g| {
            // Time first, at the latents' small spatial size: repeat each latent frame `rt` times
            // and keep the last frames (diffusers' odd-frame rule: the first frame stays single).
            let mut y = repeat(g, &y, z.rt, 1);
            let mut b = repeat(g, &b, z.rt, 1);
            if z.rt > 1 {
                let tf = g.shape_range(f, 2, 3);
                let start = g.op("Neg", &[&tf], vec![]);
                let end = g.const_i64(&[i64::MAX]);
                y = g.slice_dyn(&y, 2, &start, &end);
                b = g.slice_dyn(&b, 2, &start, &end);
            }
            // GroupNorm's affine folded into the maps, all at the latents' size:
            // ((x-μ)/σ·γ + β)·y + b = (x-μ)·(γ/σ·y) + (β·y + b).
            let c = f_channels as i64;
            let gm = g.reshape_to(&gamma, &[c, 1, 1, 1]);
            let bt = g.reshape_to(&beta, &[c, 1, 1, 1]);
            let gs = g.mul(&inv, &gm);
            let scale = g.mul(&y, &gs);
            let by = g.mul(&y, &bt);
            let shift = g.add(&by, &b);
            if z.rs == 1 {
                let o = g.mul(&d, &scale);
                return g.add(&o, &shift);
            }
            // Space by broadcasting, never materialising the upsampled maps: view the centred
            // `[B,C,T,H,W]` as `[B,C,T,h,rs,w,rs]` and the maps as `[B,C,T,h,1,w,1]`. Nearest
            // upsampling by an integer factor is exactly this replication (same values, bitwise).
            let shape = g.shape(&d);
            let bct = g.shape_range(&d, 0, 3);
            let hw = g.shape_range(&d, 3, 5);
            let r = g.const_i64(&[z.rs]);
            let small = g.div(&hw, &r);
            let (h, w) = (g.slice(&small, 0, 0, 1), g.slice(&small, 0, 1, 2));
            let s7 = g.concat(&[&bct, &h, &r, &w, &r], 0);
            let d7 = g.reshape(&d, &s7);
            let scale7 = g.unsqueeze(&scale, &[4, 6]);
            let shift7 = g.unsqueeze(&shift, &[4, 6]);
            let o = g.mul(&d7, &scale7);
            let o = g.add(&o, &shift7);
            g.reshape(&o, &shape)
        })
    }))
}

/// The norm a resnet uses: plain GroupNorm (encoder) or SpatialNorm3D on the latents (decoder).
enum Norm<'a> {
    Group,
    Spatial(Zq<'a>),
}

fn norm(
    g: &mut Graph,
    vb: &Scope,
    x: &Value,
    channels: usize,
    kind: &Norm,
    cfg: &VaeConfig,
) -> Result<Value> {
    match kind {
        Norm::Group => group_norm(g, vb, x, channels, cfg.norm_num_groups, cfg.norm_eps),
        Norm::Spatial(z) => spatial_norm(g, vb, x, channels, z, cfg.norm_num_groups),
    }
}

// ---- blocks ---------------------------------------------------------------------------------

/// `CogVideoXResnetBlock3D(cin, cout, temb_channels=0)` at `vb`.
#[allow(clippy::too_many_arguments)]
fn resnet(
    g: &mut Graph,
    cx: &mut Causal,
    vb: &Scope,
    cfg: &VaeConfig,
    x: &Value,
    cin: usize,
    cout: usize,
    kind: &Norm,
    scale: SpatialScale,
) -> Result<Value> {
    let h = norm(g, &vb.pp("norm1"), x, cin, kind, cfg)?;
    let h = g.scoped(vb.prefix(), |g| g.silu(&h));
    let h = causal_conv(g, cx, &vb.pp("conv1"), &h, cin, cout, scale)?;
    let h = norm(g, &vb.pp("norm2"), &h, cout, kind, cfg)?;
    let h = g.scoped(vb.prefix(), |g| g.silu(&h));
    let h = causal_conv(g, cx, &vb.pp("conv2"), &h, cout, cout, scale)?;
    let skip = if cin != cout {
        conv1x1(g, &vb.pp("conv_shortcut"), x, cin, cout)?
    } else {
        x.clone()
    };
    Ok(g.scoped(vb.prefix(), |g| g.add(&h, &skip)))
}

/// `T mod 2` of `x [B,C,T,H,W]` as an int64 `[1]`.
fn frames_odd(g: &mut Graph, x: &Value) -> Value {
    let t = g.shape_range(x, 2, 3);
    let two = g.const_i64(&[2]);
    g.op("Mod", &[&t, &two], vec![])
}

/// `CogVideoXDownsample3D` at `vb`: with `compress_time`, average consecutive frame pairs
/// (odd T keeps frame 0 alone: T → (T+1)/2); then zero-pad right/bottom by one and a
/// stride-2 3×3 Conv2d per frame.
fn downsample(
    g: &mut Graph,
    vb: &Scope,
    x: &Value,
    c: usize,
    compress_time: bool,
) -> Result<Value> {
    let w = vb.pp("conv").weight(g, "weight", &[c, c, 3, 3])?;
    let b = vb.pp("conv").weight(g, "bias", &[c])?;
    Ok(g.scoped(vb.prefix(), |g| {
        let x = if compress_time {
            // [x0, x] dropped to an even count: odd T starts at x0,x0 (whose mean is x0 exactly),
            // even T starts at x0,x1. Then pairs (0,1),(2,3),... are averaged.
            let odd = frames_odd(g, x);
            let one = g.const_i64(&[1]);
            let start = g.sub(&one, &odd);
            let end = g.const_i64(&[i64::MAX]);
            let x0 = g.slice(x, 2, 0, 1);
            let y = g.concat(&[&x0, x], 2);
            let y = g.slice_dyn(&y, 2, &start, &end);
            let axes = g.const_i64(&[2]);
            let step = g.const_i64(&[2]);
            let zero = g.const_i64(&[0]);
            let a = g.op("Slice", &[&y, &zero, &end, &axes, &step], vec![]);
            let bb = g.op("Slice", &[&y, &one, &end, &axes, &step], vec![]);
            let s = g.add(&a, &bb);
            let half = g.scalar(0.5);
            g.mul(&s, &half)
        } else {
            x.clone()
        };
        per_frame_conv2d(g, &x, &w, &b, 2, [0, 0, 1, 1])
    }))
}

/// `CogVideoXUpsample3D` at `vb`: nearest 2× in space, and with `compress_time` 2× in time
/// except that frame 0 of an odd count stays single (T → 2T-1, T=1 → 1); then a 3×3 Conv2d
/// (padding 1) per frame. Doubling everything and dropping the first frame when T is odd
/// gives exactly diffusers' split into first frame and rest.
/// `single_first` is how many leading frames of the doubled clip to drop (1 keeps frame 0
/// single): `T mod 2` for diffusers' loop; for VideoX-Fun's, 1 in the first batch (latent frame
/// 0 alone) and 0 after.
fn upsample(
    g: &mut Graph,
    vb: &Scope,
    x: &Value,
    c: usize,
    compress_time: bool,
    fun_first: Option<&Value>,
) -> Result<Value> {
    let w = vb.pp("conv").weight(g, "weight", &[c, c, 3, 3])?;
    let b = vb.pp("conv").weight(g, "bias", &[c])?;
    Ok(g.scoped(vb.prefix(), |g| {
        let x = if compress_time {
            let odd = match fun_first {
                Some(first) => g.cast(first, DType::I64),
                None => frames_odd(g, x),
            };
            let y = repeat(g, x, 2, 2);
            let end = g.const_i64(&[i64::MAX]);
            g.slice_dyn(&y, 2, &odd, &end)
        } else {
            repeat(g, x, 1, 2)
        };
        per_frame_conv2d(g, &x, &w, &b, 1, [1, 1, 1, 1])
    }))
}

fn record_metadata(g: &mut Graph, cfg: &VaeConfig, part: &str, caches: &[CacheSpec]) {
    g.metadata("v2l.architecture", CLASS_NAME);
    g.metadata("v2l.vae.part", part);
    g.metadata("scaling_factor", &cfg.scaling_factor.to_string());
    if let Some(s) = cfg.shift_factor {
        g.metadata("shift_factor", &s.to_string());
    }
    g.metadata(
        "invert_scale_latents",
        &cfg.invert_scale_latents.to_string(),
    );
    g.metadata(
        "temporal_compression_ratio",
        &(1usize << cfg.temporal_compress_level()).to_string(),
    );
    g.metadata(
        "spatial_compression_ratio",
        &cfg.spatial_compression().to_string(),
    );
    // Serialising plain structs of strings and integers cannot fail.
    if let Ok(json) = serde_json::to_string(caches) {
        g.metadata("v2l.vae.caches", &json);
    }
}

// ---- encoder --------------------------------------------------------------------------------

/// The first and last of the block widths (the config must list at least one block).
fn ends(ckpt: &Checkpoint, ch: &[usize]) -> Result<(usize, usize)> {
    match (ch.first(), ch.last()) {
        (Some(&f), Some(&l)) => Ok((f, l)),
        _ => Err(ExportError::Config {
            path: ckpt.dir().join("config.json"),
            message: "block_out_channels is empty".into(),
        }),
    }
}

/// `CogVideoXEncoder3D` on one frame batch, then the posterior's mean and clamped logvar.
fn encoder(ckpt: &Checkpoint, cfg: &VaeConfig) -> Result<(Graph, Vec<CacheSpec>)> {
    let mut g = Graph::new("cogvideox_vae_encoder");
    let vb = Scope::new(ckpt).pp("encoder");
    let video = g.input(
        vae_io::VIDEO,
        DType::F32,
        crate::layers::video_dims(cfg.in_channels),
    );
    let mut cx = Causal::new(&mut g, ("height", "width"));
    let ch = &cfg.block_out_channels;
    let n = ch.len();
    let (first, last) = ends(ckpt, ch)?;
    let level = cfg.temporal_compress_level();
    let mut scale = SpatialScale::ONE;

    let mut x = causal_conv(
        &mut g,
        &mut cx,
        &vb.pp("conv_in"),
        &video,
        cfg.in_channels,
        first,
        scale,
    )?;
    let mut cin = first;
    for (i, &cout) in ch.iter().enumerate() {
        let blk = vb.pp("down_blocks").pp(i);
        for j in 0..cfg.layers_per_block {
            let c = if j == 0 { cin } else { cout };
            x = resnet(
                &mut g,
                &mut cx,
                &blk.pp("resnets").pp(j),
                cfg,
                &x,
                c,
                cout,
                &Norm::Group,
                scale,
            )?;
        }
        if i + 1 != n {
            x = downsample(&mut g, &blk.pp("downsamplers").pp(0), &x, cout, i < level)?;
            scale = scale.halved();
        }
        cin = cout;
    }
    let c = last;
    let mid = vb.pp("mid_block").pp("resnets");
    for j in 0..2 {
        x = resnet(
            &mut g,
            &mut cx,
            &mid.pp(j),
            cfg,
            &x,
            c,
            c,
            &Norm::Group,
            scale,
        )?;
    }
    let x = group_norm(
        &mut g,
        &vb.pp("norm_out"),
        &x,
        c,
        cfg.norm_num_groups,
        FIXED_EPS,
    )?;
    let x = g.scoped("encoder.conv_act", |g| g.silu(&x));
    let l = cfg.latent_channels;
    let x = causal_conv(&mut g, &mut cx, &vb.pp("conv_out"), &x, c, 2 * l, scale)?;

    let (mean, logvar) = g.scoped("posterior", |g| {
        let mean = g.slice(&x, 1, 0, l as i64);
        let logvar = g.slice(&x, 1, l as i64, 2 * l as i64);
        let lo = g.scalar(-30.0);
        let hi = g.scalar(20.0);
        let logvar = g.op("Clip", &[&logvar, &lo, &hi], vec![]);
        (mean, logvar)
    });
    let latent_dims = || -> Vec<Dim> {
        vec![
            "batch".into(),
            Dim::Fixed(l as i64),
            "latent_frames".into(),
            "latent_height".into(),
            "latent_width".into(),
        ]
    };
    g.output(&mean, vae_io::POSTERIOR_MEAN, DType::F32, latent_dims());
    g.output(&logvar, vae_io::POSTERIOR_LOGVAR, DType::F32, latent_dims());
    cx.declare_outputs(&mut g);
    record_metadata(&mut g, cfg, "encoder", &cx.caches);
    g.metadata(
        "num_sample_frames_batch_size",
        &SAMPLE_FRAMES_BATCH_SIZE.to_string(),
    );
    Ok((g, cx.caches))
}

// ---- decoder --------------------------------------------------------------------------------

/// `CogVideoXDecoder3D` on one latent batch (the latents also condition every SpatialNorm3D).
fn decoder(
    ckpt: &Checkpoint,
    cfg: &VaeConfig,
    decode: DecodeLoop,
) -> Result<(Graph, Vec<CacheSpec>)> {
    let mut g = Graph::new("cogvideox_vae_decoder");
    let vb = Scope::new(ckpt).pp("decoder");
    let l = cfg.latent_channels;
    let z = g.input(
        vae_io::LATENTS,
        DType::F32,
        vec![
            "batch".into(),
            Dim::Fixed(l as i64),
            "latent_frames".into(),
            "latent_height".into(),
            "latent_width".into(),
        ],
    );
    let mut cx = Causal::new(&mut g, ("latent_height", "latent_width"));
    let ch: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
    let n = ch.len();
    let (first, last) = ends(ckpt, &ch)?;
    let level = cfg.temporal_compress_level();
    let mut scale = SpatialScale::ONE;
    let (mut rt, mut rs) = (1i64, 1i64);
    let zq = |rt, rs| {
        Norm::Spatial(Zq {
            zq: &z,
            channels: l,
            rt,
            rs,
        })
    };

    let mut x = causal_conv(&mut g, &mut cx, &vb.pp("conv_in"), &z, l, first, scale)?;
    let mid = vb.pp("mid_block").pp("resnets");
    for j in 0..2 {
        x = resnet(
            &mut g,
            &mut cx,
            &mid.pp(j),
            cfg,
            &x,
            first,
            first,
            &zq(rt, rs),
            scale,
        )?;
    }
    let mut cin = first;
    for (i, &cout) in ch.iter().enumerate() {
        let blk = vb.pp("up_blocks").pp(i);
        for j in 0..cfg.layers_per_block + 1 {
            let c = if j == 0 { cin } else { cout };
            x = resnet(
                &mut g,
                &mut cx,
                &blk.pp("resnets").pp(j),
                cfg,
                &x,
                c,
                cout,
                &zq(rt, rs),
                scale,
            )?;
        }
        if i + 1 != n {
            let compress_time = i < level;
            let fun_first = (decode == DecodeLoop::Fun).then(|| cx.first.clone());
            x = upsample(
                &mut g,
                &blk.pp("upsamplers").pp(0),
                &x,
                cout,
                compress_time,
                fun_first.as_ref(),
            )?;
            scale = scale.doubled();
            rs *= 2;
            if compress_time {
                rt *= 2;
            }
        }
        cin = cout;
    }
    let c = last;
    let x = norm(&mut g, &vb.pp("norm_out"), &x, c, &zq(rt, rs), cfg)?;
    let x = g.scoped("decoder.conv_act", |g| g.silu(&x));
    let x = causal_conv(
        &mut g,
        &mut cx,
        &vb.pp("conv_out"),
        &x,
        c,
        cfg.out_channels,
        scale,
    )?;
    g.output(
        &x,
        vae_io::SAMPLE,
        DType::F32,
        crate::layers::video_dims(cfg.out_channels),
    );
    cx.declare_outputs(&mut g);
    record_metadata(&mut g, cfg, "decoder", &cx.caches);
    if decode == DecodeLoop::Fun {
        g.metadata("v2l.vae.decode_loop", "videox-fun");
    }
    g.metadata(
        "num_latent_frames_batch_size",
        &LATENT_FRAMES_BATCH_SIZE.to_string(),
    );
    Ok((g, cx.caches))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_batches_match_diffusers() {
        assert_eq!(frame_batches(17, 8), vec![(0, 9), (9, 17)]);
        assert_eq!(frame_batches(5, 2), vec![(0, 3), (3, 5)]);
        assert_eq!(
            frame_batches(49, 8),
            vec![(0, 9), (9, 17), (17, 25), (25, 33), (33, 41), (41, 49)]
        );
        assert_eq!(
            frame_batches(13, 2),
            vec![(0, 3), (3, 5), (5, 7), (7, 9), (9, 11), (11, 13)]
        );
        assert_eq!(frame_batches(1, 8), vec![(0, 1)]);
        assert_eq!(frame_batches(5, 8), vec![(0, 5)]);
        assert_eq!(frame_batches(16, 8), vec![(0, 8), (8, 16)]);
        assert!(frame_batches(0, 8).is_empty());
    }

    #[test]
    fn spatial_scale_floors_like_chained_downsamples() {
        let s = SpatialScale::ONE.halved().halved().halved();
        assert_eq!(s.apply(64), 8);
        assert_eq!(s.apply(60), 7); // 60 -> 30 -> 15 -> 7
        assert_eq!(SpatialScale::ONE.doubled().apply(8), 16);
    }
}

impl VaeExport {
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
            scaling_factor: self.config.scaling_factor,
            latent_channels: self.config.latent_channels,
            in_channels: self.config.in_channels,
            encoder_frame_batch: SAMPLE_FRAMES_BATCH_SIZE,
            decoder_frame_batch: LATENT_FRAMES_BATCH_SIZE,
            encoder_caches: self.encoder_caches.clone(),
            decoder_caches: self.decoder_caches.clone(),
            frame_schedule: v2l_contracts::frame_batch::FrameSchedule::RemainderFirst,
            decoder_schedule: match self.decode {
                DecodeLoop::Diffusers => None,
                DecodeLoop::Fun => {
                    Some(v2l_contracts::frame_batch::FrameSchedule::FirstThenBatches)
                }
            },
            temporal_compression: 1 << self.config.temporal_compress_level(),
            latents_mean: Vec::new(),
            latents_std: Vec::new(),
            config: raw_config,
        }
    }
}
