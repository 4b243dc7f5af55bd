//! The Video2LoRA hypernetwork (`VideoHyperDream`) as an ONNX graph.
//!
//! Mirrors the Video2LoRA authors' weight generator (`img_weight_generator` in their
//! checkpoints), itself derived from HyperDreamBooth's `WeightDecoder` / `ImgWeightGenerator`
//! (LyCORIS `modules/hypernet/generater.py`, `modules/attention.py`), with the video latents
//! of the backbone's VAE as the features. `/work/shared/specs/video2lora.md` pins the
//! computation down:
//!
//! ```text
//! ctx = feature_proj(f.view(B, C, T·H·W).transpose(1, 2))          # [B, L, D]
//! w   = zeros(B, N, D)
//! pos = pos_emb_proj(block_pos_emb[:, :N])                          # [1, N, D]
//! repeat k times:                                                    # `sample_iters`
//!     h = w + pos
//!     for blk in decoder_model.decoder_model:                       # pre-LayerNorm blocks
//!         h = h + attn1(norm1(h)); h = h + attn2(norm2(h), ctx); h = h + ff(norm3(h))
//!     w = w + delta_proj(h)                                         # LayerNorm, Linear
//! ```
//!
//! Everything is read from checkpoint shapes: C and D from `feature_proj.weight [D, C]`,
//! N (the number of LiLoRA layers) from `decoder_model.block_pos_emb [1, 2N, D]`, the number
//! of decoder blocks from the `decoder_model.decoder_model.{i}.` prefixes, the heads by the
//! upstream rule ([`upstream_heads`]). Only the refinement count k is an export option.
//!
//! The K iterations are unrolled; all of them share the same initializers (each checkpoint
//! tensor is added once, under its checkpoint name). Two iteration-invariant terms are computed
//! once rather than per iteration, which is exact: the positional term `pos` and the
//! cross-attention keys/values of every block (they depend only on the context and on shared
//! weights).
//!
//! The top-level `img_weight_generator.block_pos_emb` buffer is a copy upstream registers but
//! never reads (only `decoder_model.block_pos_emb` is used). The exporter skips it on purpose:
//! if present it is shape-checked (`[1, 2N, D]`, as upstream's strict `load_state_dict` would)
//! and marked as read, but it is not put in the graph. So [`HypernetExport::unused_keys`] is
//! empty for an upstream checkpoint, and anything it lists is a tensor the exporter did not
//! expect (and that a CLI warning should show).
//!
//! v2l's two extensions, each present only when the checkpoint has its tensors (upstream's
//! context is a bag of latent vectors, blind to the direction of a motion; training/README.md,
//! "Motion run"):
//! - `context_pos_emb [1, L, D]`, a learned table added to the context (L = T·H·W);
//! - `context_encoder.*`, a 3D conv stack with a readout over the whole latent volume whose rows
//!   are added to the decoder's (`ContextEncoder`). Both fix the reference's latent grid, which
//!   [`HypernetDims`] records and the runtime checks.
//!
//! Graph contract: input `reference_latents [B, C, T, H, W]` (the VAE latents, already
//! multiplied by the VAE scaling factor; B, T, H, W dynamic); output `hyper_weights [B, N, D]`,
//! row i being LiLoRA layer i's `[down_w | up_w]`.
//!
//! ```text
//! v2l-export hypernet hypernetwork.safetensors --lilora lilora.safetensors --dit transformer/ -o out/
//! ```

use std::collections::BTreeSet;
use v2l_contracts::io::hypernet as hypernet_io;

use v2l_graphs::{Attr, DType, Dim, Graph, Value};

use crate::checkpoint::Checkpoint;
use crate::error::{ExportError, Result};
use crate::scope::Scope;

/// The module the hypernetwork's keys live under in upstream checkpoints.
pub const PREFIX: &str = "img_weight_generator";
/// Recorded as `v2l.architecture` in the written model.
pub const ARCHITECTURE: &str = "VideoHyperDream";
/// `nn.LayerNorm`'s default, used by every norm of the hypernetwork.
const LN_EPS: f32 = 1e-5;

/// Export choices that are not in the checkpoint.
#[derive(Clone, Debug)]
pub struct HypernetOptions {
    /// Refinement iterations (upstream `sample_iters`, the paper's k); at least 1.
    pub iterations: usize,
}

impl Default for HypernetOptions {
    fn default() -> Self {
        HypernetOptions { iterations: 4 }
    }
}

pub use v2l_contracts::manifest::{ContextEncoderDims, HypernetDims};

/// The exported graph and what it was built from.
pub struct HypernetExport {
    pub graph: Graph,
    pub dims: HypernetDims,
    /// Checkpoint tensors the exporter did not expect (empty for an upstream checkpoint; the
    /// top-level `block_pos_emb` copy is skipped on purpose, see the module docs).
    pub unused_keys: Vec<String>,
}

/// Upstream's head count for width `weight_dim`: start at 1, double while the width divides
/// evenly and heads stay wider than 64, then halve. 0 means upstream cannot build the model.
pub fn upstream_heads(weight_dim: usize) -> usize {
    let mut heads = 1;
    while weight_dim % heads == 0 && weight_dim / heads > 64 {
        heads *= 2;
    }
    heads / 2
}

fn key(name: &str) -> String {
    format!("{PREFIX}.{name}")
}

fn malformed(ckpt: &Checkpoint, key: &str, message: String) -> ExportError {
    ExportError::Config {
        path: ckpt.path_of(key).to_path_buf(),
        message: format!("tensor `{key}` {message}"),
    }
}

/// Reads C, D, N and the block count from checkpoint shapes (no tensor data is read).
pub fn infer_dims(ckpt: &Checkpoint, iterations: usize) -> Result<HypernetDims> {
    let fp = key("feature_proj.weight");
    let t = ckpt.get(&fp)?;
    let [weight_dim, feature_dim] = t.shape[..] else {
        return Err(malformed(
            ckpt,
            &fp,
            format!(
                "has shape {:?}; expected [weight_dim, feature_dim]",
                t.shape
            ),
        ));
    };

    let pe = key("decoder_model.block_pos_emb");
    let t = ckpt.get(&pe)?;
    let rows = match t.shape[..] {
        [1, rows, d] if d == weight_dim && rows >= 2 && rows % 2 == 0 => rows,
        _ => {
            return Err(malformed(
                ckpt,
                &pe,
                format!(
                    "has shape {:?}; expected [1, 2·num_layers, {weight_dim}] (the sinusoid \
                     table of twice the number of LiLoRA layers)",
                    t.shape
                ),
            ))
        }
    };

    let blocks_prefix = key("decoder_model.decoder_model.");
    let found: BTreeSet<usize> = ckpt
        .keys()
        .into_iter()
        .filter_map(|k| k.strip_prefix(&blocks_prefix))
        .filter_map(|rest| rest.split('.').next()?.parse().ok())
        .collect();
    if found.is_empty() {
        let k = format!("{blocks_prefix}0.norm1.weight");
        return Err(ExportError::MissingKey {
            path: ckpt.path_of(&k).to_path_buf(),
            key: k,
        });
    }
    let blocks = found.len();
    if found.iter().copied().ne(0..blocks) {
        return Err(ExportError::Config {
            path: ckpt.path_of(&fp).to_path_buf(),
            message: format!(
                "decoder blocks `{blocks_prefix}{{i}}` are not numbered 0..{blocks}: found {found:?}"
            ),
        });
    }

    let heads = upstream_heads(weight_dim);
    if heads == 0 {
        return Err(ExportError::Unsupported {
            path: ckpt.path_of(&fp).to_path_buf(),
            what: format!(
                "weight_dim {weight_dim} (≤ 64: upstream's head rule gives 0 attention heads \
                 and the reference model cannot be built)"
            ),
        });
    }
    let cp = key("context_pos_emb");
    let context_len = if ckpt.contains(&cp) {
        match ckpt.get(&cp)?.shape[..] {
            [1, l, d] if d == weight_dim && l > 0 => Some(l),
            ref shape => {
                return Err(malformed(
                    ckpt,
                    &cp,
                    format!("has shape {shape:?}; expected [1, T·H·W, {weight_dim}]"),
                ))
            }
        }
    } else {
        None
    };
    let context_encoder = infer_context_encoder(ckpt, feature_dim)?;
    Ok(HypernetDims {
        feature_dim,
        weight_dim,
        num_layers: rows / 2,
        heads,
        blocks,
        iterations,
        context_len,
        context_encoder,
    })
}

/// The context encoder's sizes from `context_encoder.conv_in.weight [hidden, C, 3, 3, 3]` and
/// `readout.weight [2·hidden, C, T, H, W]` (its kernel is the grid); `None` when the checkpoint
/// has none (upstream). The other tensors are shape-checked when the graph reads them.
fn infer_context_encoder(ckpt: &Checkpoint, c: usize) -> Result<Option<ContextEncoderDims>> {
    let conv_in = key("context_encoder.conv_in.weight");
    if !ckpt.contains(&conv_in) {
        return Ok(None);
    }
    let hidden = match ckpt.get(&conv_in)?.shape[..] {
        [h, ci, 3, 3, 3] if ci == c && h > 0 => h,
        ref shape => {
            return Err(malformed(
                ckpt,
                &conv_in,
                format!("has shape {shape:?}; expected [hidden, {c}, 3, 3, 3]"),
            ))
        }
    };
    let readout = key("context_encoder.readout.weight");
    let grid = match ckpt.get(&readout)?.shape[..] {
        [r, ci, t, h, w] if r == 2 * hidden && ci == c && t * h * w > 0 => [t, h, w],
        ref shape => {
            return Err(malformed(
                ckpt,
                &readout,
                format!(
                    "has shape {shape:?}; expected [{}, {c}, T, H, W]",
                    2 * hidden
                ),
            ))
        }
    };
    Ok(Some(ContextEncoderDims { hidden, grid }))
}

/// Builds the hypernetwork graph from a checkpoint with upstream key names.
pub fn export(ckpt: &Checkpoint, opts: &HypernetOptions) -> Result<HypernetExport> {
    if opts.iterations == 0 {
        return Err(ExportError::Config {
            path: ckpt.path_of(&key("feature_proj.weight")).to_path_buf(),
            message: "hypernetwork iterations must be at least 1 (0 would output the zero \
                      initial weights)"
                .into(),
        });
    }
    let dims = infer_dims(ckpt, opts.iterations)?;
    let (c, d, n) = (dims.feature_dim, dims.weight_dim, dims.num_layers);
    let mut g = Graph::new("video2lora_hypernet");
    let vb = Scope::new(ckpt).pp(PREFIX);

    let latents = g.input(
        hypernet_io::REFERENCE_LATENTS,
        DType::F32,
        crate::layers::video_dims(c),
    );

    // Every weight is added once here; the unrolled iterations below only refer to them.
    let feature_proj = Linear::load(&vb, &mut g, "feature_proj", c, d, false)?;
    let decoder = WeightDecoder::load(&vb.pp("decoder_model"), &mut g, &dims)?;
    // Upstream's unused copy of the table: checked and consumed, not part of the graph.
    let unused_copy = key("block_pos_emb");
    if ckpt.contains(&unused_copy) {
        ckpt.tensor(&unused_copy, &[1, 2 * n, d])?;
    }

    // 1-2. Tokens [B, L = T·H·W, C] (no positional encoding upstream), projected to the context;
    // plus the learned table of context positions when the checkpoint has one (v2l's extension).
    let tokens = g.scoped("tokens", |g| {
        let x = g.reshape_to(&latents, &[0, c as i64, -1]);
        g.transpose(&x, &[0, 2, 1])
    });
    let mut context = feature_proj.apply(&mut g, &tokens);
    if let Some(l) = dims.context_len {
        let table = vb.weight(&mut g, "context_pos_emb", &[1, l, d])?;
        context = g.scoped("context_positions", |g| g.add(&context, &table));
    }

    // 3. Weight tokens start at zeros [B, N, D].
    let mut w = g.scoped("initial_weights", |g| {
        let batch = g.shape_range(&latents, 0, 1);
        let nd = g.const_i64(&[n as i64, d as i64]);
        let shape = g.concat(&[&batch, &nd], 0);
        let zero = g.scalar(0.0);
        g.op("Expand", &[&zero, &shape], vec![])
    });

    // 4. Iteration-invariant terms, then k refinements sharing all weights.
    let fixed = decoder.invariants(&mut g, &context, n);
    for k in 0..dims.iterations {
        w = g.scoped(&format!("iter{k}"), |g| decoder.forward(g, &fixed, &w));
    }
    // 5. Plus the context encoder's rows when the checkpoint has one (v2l's extension).
    if let Some(enc) = dims.context_encoder {
        let encoder = ContextEncoder::load(&vb.pp("context_encoder"), &mut g, &dims, enc)?;
        let rows = encoder.apply(&mut g, &latents);
        w = g.scoped("context_encoder_rows", |g| g.add(&w, &rows));
    }

    g.output(
        &w,
        hypernet_io::HYPER_WEIGHTS,
        DType::F32,
        vec!["batch".into(), Dim::Fixed(n as i64), Dim::Fixed(d as i64)],
    );
    g.metadata("v2l.architecture", ARCHITECTURE);
    g.metadata(
        "v2l.hypernet.dims",
        &serde_json::to_string(&dims).unwrap_or_default(),
    );
    let unused_keys = ckpt.unused_keys();
    Ok(HypernetExport {
        graph: g,
        dims,
        unused_keys,
    })
}

/// v2l's context encoder (training/video2lora.py `_ContextEncoder`), not upstream:
///
/// ```text
/// h = conv_out(gelu(conv_mid(gelu(conv_in(f)))))     # 3×3×3 pad 1, 3×3×3 pad 1, 1×1×1
/// z = gelu(readout(h).flatten(1))                    # readout's kernel is the whole grid
/// rows = row_proj(z).view(B, N, D)                   # added to the decoder's rows
/// ```
struct ContextEncoder {
    name: String,
    convs: [(Value, Value, [i64; 3], i64); 4],
    row_proj: Linear,
    rows: usize,
    dim: usize,
}

impl ContextEncoder {
    fn load(
        vb: &Scope,
        g: &mut Graph,
        dims: &HypernetDims,
        enc: ContextEncoderDims,
    ) -> Result<ContextEncoder> {
        let (c, d, n, h) = (
            dims.feature_dim,
            dims.weight_dim,
            dims.num_layers,
            enc.hidden,
        );
        let [t, gh, gw] = enc.grid;
        let mut conv = |name: &str, out: usize, inp: usize, k: [usize; 3], pad: i64| {
            let s = vb.pp(name);
            let w = s.weight(g, "weight", &[out, inp, k[0], k[1], k[2]])?;
            let b = s.weight(g, "bias", &[out])?;
            Ok::<_, ExportError>((w, b, k.map(|x| x as i64), pad))
        };
        let convs = [
            conv("conv_in", h, c, [3, 3, 3], 1)?,
            conv("conv_mid", h, h, [3, 3, 3], 1)?,
            conv("conv_out", c, h, [1, 1, 1], 0)?,
            conv("readout", 2 * h, c, [t, gh, gw], 0)?,
        ];
        Ok(ContextEncoder {
            name: vb.prefix().to_string(),
            convs,
            row_proj: Linear::load(vb, g, "row_proj", 2 * h, n * d, true)?,
            rows: n,
            dim: d,
        })
    }

    /// `latents [B, C, T, H, W]` → rows `[B, N, D]`.
    fn apply(&self, g: &mut Graph, latents: &Value) -> Value {
        let z = g.scoped(&self.name, |g| {
            let mut x = latents.clone();
            for (i, (w, b, k, pad)) in self.convs.iter().enumerate() {
                x = g.op(
                    "Conv",
                    &[&x, w, b],
                    vec![
                        ("kernel_shape", Attr::Ints(k.to_vec())),
                        ("pads", Attr::Ints(vec![*pad; 6])),
                    ],
                );
                // GELU after conv_in, conv_mid and the readout; conv_out is linear.
                if i != 2 {
                    x = g.gelu_erf(&x);
                }
            }
            g.reshape_to(&x, &[0, -1])
        });
        let rows = self.row_proj.apply(g, &z);
        g.scoped(&self.name, |g| {
            g.reshape_to(&rows, &[0, self.rows as i64, self.dim as i64])
        })
    }
}

/// An `nn.Linear` whose initializers were added once and can be applied many times.
struct Linear {
    name: String,
    weight: Value,
    bias: Option<Value>,
    out: usize,
}

impl Linear {
    fn load(
        vb: &Scope,
        g: &mut Graph,
        name: &str,
        inp: usize,
        out: usize,
        bias: bool,
    ) -> Result<Linear> {
        let s = vb.pp(name);
        let weight = s.weight(g, "weight", &[out, inp])?;
        let bias = if bias {
            Some(s.weight(g, "bias", &[out])?)
        } else {
            None
        };
        Ok(Linear {
            name: s.prefix().to_string(),
            weight,
            bias,
            out,
        })
    }

    fn apply(&self, g: &mut Graph, x: &Value) -> Value {
        g.scoped(&self.name, |g| {
            g.linear(x, &self.weight, self.bias.as_ref(), self.out as i64)
        })
    }
}

/// An affine `nn.LayerNorm(D)` (eps 1e-5).
struct LayerNorm {
    name: String,
    weight: Value,
    bias: Value,
}

impl LayerNorm {
    fn load(vb: &Scope, g: &mut Graph, name: &str, dim: usize) -> Result<LayerNorm> {
        let s = vb.pp(name);
        Ok(LayerNorm {
            weight: s.weight(g, "weight", &[dim])?,
            bias: s.weight(g, "bias", &[dim])?,
            name: s.prefix().to_string(),
        })
    }

    fn apply(&self, g: &mut Graph, x: &Value) -> Value {
        g.scoped(&self.name, |g| {
            g.layer_norm(x, &self.weight, &self.bias, LN_EPS)
        })
    }
}

/// LyCORIS `Attention` (no self_cross, no double attention): q, k, v without bias, `out` with.
struct Attention {
    name: String,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    heads: usize,
    dim: usize,
}

/// Keys (already transposed, `[B, h, dh, S]`) and values (`[B, h, S, dh]`) of one attention.
struct KeyValues {
    kt: Value,
    v: Value,
}

impl Attention {
    fn load(vb: &Scope, g: &mut Graph, name: &str, dims: &HypernetDims) -> Result<Attention> {
        let s = vb.pp(name);
        let d = dims.weight_dim;
        Ok(Attention {
            q: Linear::load(&s, g, "q", d, d, false)?,
            k: Linear::load(&s, g, "k", d, d, false)?,
            v: Linear::load(&s, g, "v", d, d, false)?,
            out: Linear::load(&s, g, "out", d, d, true)?,
            heads: dims.heads,
            dim: d,
            name: s.prefix().to_string(),
        })
    }

    /// `[B, S, D] -> [B, heads, S, D/heads]`.
    fn split_heads(&self, g: &mut Graph, x: &Value) -> Value {
        let (h, dh) = (self.heads as i64, (self.dim / self.heads) as i64);
        let x = g.reshape_to(x, &[0, 0, h, dh]);
        g.transpose(&x, &[0, 2, 1, 3])
    }

    fn key_values(&self, g: &mut Graph, ctx: &Value) -> KeyValues {
        let k = self.k.apply(g, ctx);
        let v = self.v.apply(g, ctx);
        g.scoped(&self.name, |g| {
            let k = self.split_heads(g, &k);
            KeyValues {
                kt: g.transpose(&k, &[0, 1, 3, 2]),
                v: self.split_heads(g, &v),
            }
        })
    }

    /// `out(softmax(q kᵀ / √dh) v)` per head, queries from `x [B, N, D]`.
    fn forward(&self, g: &mut Graph, x: &Value, kv: &KeyValues) -> Value {
        let q = self.q.apply(g, x);
        let o = g.scoped(&self.name, |g| {
            let q = self.split_heads(g, &q);
            let scores = g.matmul(&q, &kv.kt);
            let dh = (self.dim / self.heads) as f32;
            let scale = g.scalar(1.0 / dh.sqrt());
            let scores = g.mul(&scores, &scale);
            let p = g.softmax(&scores, -1);
            let o = g.matmul(&p, &kv.v);
            let o = g.transpose(&o, &[0, 2, 1, 3]);
            g.reshape_to(&o, &[0, 0, self.dim as i64])
        });
        self.out.apply(g, &o)
    }
}

/// LyCORIS `TransformerBlock(gated_ff=False)`: pre-LayerNorm self-attention, cross-attention
/// on the context, and `FeedForward` (Linear D→4D, exact GELU, Linear 4D→D).
struct Block {
    name: String,
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff_in: Linear,
    ff_out: Linear,
}

impl Block {
    fn load(vb: &Scope, g: &mut Graph, dims: &HypernetDims) -> Result<Block> {
        let d = dims.weight_dim;
        let ff = vb.pp("ff").pp("net");
        Ok(Block {
            norm1: LayerNorm::load(vb, g, "norm1", d)?,
            attn1: Attention::load(vb, g, "attn1", dims)?,
            norm2: LayerNorm::load(vb, g, "norm2", d)?,
            attn2: Attention::load(vb, g, "attn2", dims)?,
            norm3: LayerNorm::load(vb, g, "norm3", d)?,
            ff_in: Linear::load(&ff.pp("0"), g, "0", d, 4 * d, true)?,
            ff_out: Linear::load(&ff, g, "1", 4 * d, d, true)?,
            name: vb.prefix().to_string(),
        })
    }

    fn forward(&self, g: &mut Graph, h: &Value, cross_kv: &KeyValues) -> Value {
        let x = self.norm1.apply(g, h);
        let self_kv = self.attn1.key_values(g, &x);
        let a = self.attn1.forward(g, &x, &self_kv);
        let h = g.scoped(&self.name, |g| g.add(&a, h));

        let x = self.norm2.apply(g, &h);
        let a = self.attn2.forward(g, &x, cross_kv);
        let h = g.scoped(&self.name, |g| g.add(&a, &h));

        let x = self.norm3.apply(g, &h);
        let f = self.ff_in.apply(g, &x);
        let f = g.scoped(&self.ff_in.name, |g| g.gelu_erf(&f));
        let f = self.ff_out.apply(g, &f);
        g.scoped(&self.name, |g| g.add(&f, &h))
    }
}

/// `WeightDecoder`: positional term, decoder blocks, `delta_proj`.
struct WeightDecoder {
    name: String,
    block_pos_emb: Value,
    pos_emb_proj: Linear,
    blocks: Vec<Block>,
    delta_norm: LayerNorm,
    delta_out: Linear,
}

/// What every iteration shares: `pos_emb_proj(block_pos_emb[:, :N])` and the cross-attention
/// keys/values of each block.
struct Invariants {
    pos: Value,
    cross_kv: Vec<KeyValues>,
}

impl WeightDecoder {
    fn load(vb: &Scope, g: &mut Graph, dims: &HypernetDims) -> Result<WeightDecoder> {
        let d = dims.weight_dim;
        let block_pos_emb = vb.weight(g, "block_pos_emb", &[1, 2 * dims.num_layers, d])?;
        let pos_emb_proj = Linear::load(vb, g, "pos_emb_proj", d, d, false)?;
        let blocks = (0..dims.blocks)
            .map(|i| Block::load(&vb.pp("decoder_model").pp(i), g, dims))
            .collect::<Result<Vec<_>>>()?;
        let delta = vb.pp("delta_proj");
        Ok(WeightDecoder {
            delta_norm: LayerNorm::load(&delta, g, "0", d)?,
            delta_out: Linear::load(&delta, g, "1", d, d, false)?,
            name: vb.prefix().to_string(),
            block_pos_emb,
            pos_emb_proj,
            blocks,
        })
    }

    fn invariants(&self, g: &mut Graph, context: &Value, n: usize) -> Invariants {
        let table = g.scoped(&self.name, |g| g.slice(&self.block_pos_emb, 1, 0, n as i64));
        let pos = self.pos_emb_proj.apply(g, &table);
        let cross_kv = self
            .blocks
            .iter()
            .map(|b| b.attn2.key_values(g, context))
            .collect();
        Invariants { pos, cross_kv }
    }

    /// One refinement: `w + delta_proj(blocks(w + pos))`.
    fn forward(&self, g: &mut Graph, fixed: &Invariants, w: &Value) -> Value {
        let mut h = g.scoped(&self.name, |g| g.add(w, &fixed.pos));
        for (block, kv) in self.blocks.iter().zip(&fixed.cross_kv) {
            h = block.forward(g, &h, kv);
        }
        let x = self.delta_norm.apply(g, &h);
        let delta = self.delta_out.apply(g, &x);
        g.scoped(&self.name, |g| g.add(w, &delta))
    }
}

/// Every tensor of an upstream checkpoint for `dims`, with its shape, in module order
/// (including the unused top-level `block_pos_emb`).
///
/// For synthetic checkpoints; a unit test checks it against the fixture key for key.
pub fn checkpoint_layout(dims: &HypernetDims) -> Vec<(String, Vec<usize>)> {
    let (c, d, n) = (dims.feature_dim, dims.weight_dim, dims.num_layers);
    let mut out = vec![
        (key("block_pos_emb"), vec![1, 2 * n, d]),
        (key("feature_proj.weight"), vec![d, c]),
        (key("decoder_model.block_pos_emb"), vec![1, 2 * n, d]),
        (key("decoder_model.pos_emb_proj.weight"), vec![d, d]),
    ];
    for i in 0..dims.blocks {
        let b = key(&format!("decoder_model.decoder_model.{i}"));
        for norm in ["norm1", "norm2", "norm3"] {
            out.push((format!("{b}.{norm}.weight"), vec![d]));
            out.push((format!("{b}.{norm}.bias"), vec![d]));
        }
        for attn in ["attn1", "attn2"] {
            for p in ["q", "k", "v"] {
                out.push((format!("{b}.{attn}.{p}.weight"), vec![d, d]));
            }
            out.push((format!("{b}.{attn}.out.weight"), vec![d, d]));
            out.push((format!("{b}.{attn}.out.bias"), vec![d]));
        }
        out.push((format!("{b}.ff.net.0.0.weight"), vec![4 * d, d]));
        out.push((format!("{b}.ff.net.0.0.bias"), vec![4 * d]));
        out.push((format!("{b}.ff.net.1.weight"), vec![d, 4 * d]));
        out.push((format!("{b}.ff.net.1.bias"), vec![d]));
    }
    out.push((key("decoder_model.delta_proj.0.weight"), vec![d]));
    out.push((key("decoder_model.delta_proj.0.bias"), vec![d]));
    out.push((key("decoder_model.delta_proj.1.weight"), vec![d, d]));
    if let Some(l) = dims.context_len {
        out.push((key("context_pos_emb"), vec![1, l, d]));
    }
    if let Some(e) = dims.context_encoder {
        let (h, [t, gh, gw]) = (e.hidden, e.grid);
        for (name, shape) in [
            ("conv_in", vec![h, c, 3, 3, 3]),
            ("conv_mid", vec![h, h, 3, 3, 3]),
            ("conv_out", vec![c, h, 1, 1, 1]),
            ("readout", vec![2 * h, c, t, gh, gw]),
            ("row_proj", vec![n * d, 2 * h]),
        ] {
            let bias: Vec<usize> = shape.iter().take(1).copied().collect();
            out.push((key(&format!("context_encoder.{name}.weight")), shape));
            out.push((key(&format!("context_encoder.{name}.bias")), bias));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/cogvideox-tiny/hypernetwork.safetensors")
    }

    /// Writes a synthetic upstream-layout checkpoint and returns its path.
    fn synthetic(dir: &std::path::Path, dims: &HypernetDims) -> std::path::PathBuf {
        let layout = checkpoint_layout(dims);
        crate::synthetic::write_checkpoint(
            dir,
            &serde_json::json!({}),
            &layout,
            DType::F32,
            3,
            &mut |_, _| {},
        )
        .unwrap();
        dir.join("diffusion_pytorch_model.safetensors")
    }

    #[test]
    fn heads_follow_the_upstream_rule() {
        assert_eq!(upstream_heads(150), 2);
        assert_eq!(upstream_heads(96), 1);
        assert_eq!(upstream_heads(128), 1);
        assert_eq!(upstream_heads(256), 2);
        assert_eq!(upstream_heads(600), 8);
        assert_eq!(upstream_heads(64), 0);
        assert_eq!(upstream_heads(16), 0);
    }

    #[test]
    fn fixture_dims_and_layout() {
        let ck = Checkpoint::open_file(&fixture()).unwrap();
        let dims = infer_dims(&ck, 4).unwrap();
        assert_eq!(
            dims,
            HypernetDims {
                feature_dim: 16,
                weight_dim: 150,
                num_layers: 21,
                heads: 2,
                blocks: 4,
                iterations: 4,
                context_len: None,
                context_encoder: None,
            }
        );
        let mut layout = checkpoint_layout(&dims);
        layout.sort();
        assert_eq!(layout, ck.layout());
    }

    /// The buffer is the standard sinusoid table the spec describes (the graph uses the
    /// checkpoint's copy; this only confirms the fixture is what we think it is).
    #[test]
    fn fixture_block_pos_emb_is_the_sinusoid_table() {
        let ck = Checkpoint::open_file(&fixture()).unwrap();
        let t = ck.get(&key("decoder_model.block_pos_emb")).unwrap();
        let (rows, d) = (t.shape[1], t.shape[2]);
        let got = t.to_f32();
        for p in 0..rows {
            for j in 0..d {
                let angle = p as f64 / 10000f64.powf(2.0 * (j / 2) as f64 / d as f64);
                let want = if j % 2 == 0 { angle.sin() } else { angle.cos() };
                assert!((got[p * d + j] as f64 - want).abs() < 1e-6, "({p}, {j})");
            }
        }
    }

    #[test]
    fn iterations_share_initializers() {
        let ck = Checkpoint::open_file(&fixture()).unwrap();
        let ex = export(&ck, &HypernetOptions { iterations: 4 }).unwrap();
        let names: Vec<&str> = ex
            .graph
            .initializers()
            .iter()
            .map(|i| i.name.as_str())
            .collect();
        let unique: BTreeSet<&str> = names.iter().copied().collect();
        assert_eq!(unique.len(), names.len(), "an initializer was added twice");
        let from_ckpt = names.iter().filter(|n| ck.contains(n)).count();
        // Every checkpoint tensor but the unused top-level copy of the table is in the graph.
        assert_eq!(from_ckpt, ck.keys().len() - 1);
        assert!(!names.contains(&key("block_pos_emb").as_str()));
        assert!(ex.unused_keys.is_empty(), "unused: {:?}", ex.unused_keys);
        let one = export(
            &Checkpoint::open_file(&fixture()).unwrap(),
            &HypernetOptions { iterations: 1 },
        )
        .unwrap();
        assert!(one.graph.node_count() < ex.graph.node_count());
    }

    #[test]
    fn another_shape_is_inferred() {
        let d = tempfile::tempdir().unwrap();
        let dims = HypernetDims {
            feature_dim: 8,
            weight_dim: 96,
            num_layers: 5,
            heads: 1,
            blocks: 2,
            iterations: 3,
            context_len: None,
            context_encoder: None,
        };
        let ck = Checkpoint::open_file(&synthetic(d.path(), &dims)).unwrap();
        let ex = export(&ck, &HypernetOptions { iterations: 3 }).unwrap();
        assert_eq!(ex.dims, dims);

        // With a table of context positions (v2l's extension) it is read, used and recorded.
        let d2 = tempfile::tempdir().unwrap();
        let with_table = HypernetDims {
            context_len: Some(20),
            ..dims
        };
        let ck = Checkpoint::open_file(&synthetic(d2.path(), &with_table)).unwrap();
        let ex2 = export(&ck, &HypernetOptions { iterations: 3 }).unwrap();
        assert_eq!(ex2.dims, with_table);
        assert!(ex2.unused_keys.is_empty(), "{:?}", ex2.unused_keys);
        assert!(ex2.graph.node_count() > ex.graph.node_count());

        // So is a context encoder, whose grid comes from the readout's kernel.
        let d3 = tempfile::tempdir().unwrap();
        let with_encoder = HypernetDims {
            context_encoder: Some(ContextEncoderDims {
                hidden: 6,
                grid: [2, 3, 4],
            }),
            ..dims
        };
        let ck = Checkpoint::open_file(&synthetic(d3.path(), &with_encoder)).unwrap();
        let ex3 = export(&ck, &HypernetOptions { iterations: 3 }).unwrap();
        assert_eq!(ex3.dims, with_encoder);
        assert!(ex3.unused_keys.is_empty(), "{:?}", ex3.unused_keys);
    }

    #[test]
    fn narrow_weights_and_zero_iterations_are_errors() {
        let d = tempfile::tempdir().unwrap();
        let dims = HypernetDims {
            feature_dim: 4,
            weight_dim: 64,
            num_layers: 3,
            heads: 0,
            blocks: 1,
            iterations: 1,
            context_len: None,
            context_encoder: None,
        };
        let path = synthetic(d.path(), &dims);
        let ck = Checkpoint::open_file(&path).unwrap();
        let err = export(&ck, &Default::default()).err().unwrap().to_string();
        assert!(
            err.contains("diffusion_pytorch_model.safetensors")
                && err.contains("weight_dim 64")
                && err.contains("not supported"),
            "{err}"
        );
        let ck = Checkpoint::open_file(&fixture()).unwrap();
        let err = export(&ck, &HypernetOptions { iterations: 0 })
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("at least 1"), "{err}");
    }
}
