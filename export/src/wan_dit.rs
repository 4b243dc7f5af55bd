//! Wan2.1 diffusion transformer (`WanTransformer3DModel`, T2V and I2V) as an ONNX graph.
//!
//! Mirrors diffusers 0.42.1 `models/transformers/transformer_wan.py`: a Conv3d patch embedding,
//! the time/text(/image) condition embedder, `WanTransformerBlock`s (scale-shift-table
//! modulation, self-attention with RMS norms across heads and 3-D RoPE, cross-attention to the
//! text, plus I2V's `add_k_proj`/`add_v_proj` attention to the image tokens, GELU-tanh
//! feed-forward), the output norm and projection, and unpatchify.
//!
//! Graph contract: inputs `hidden_states [B, Cin, F, H, W]` (Wan's channels-first latents),
//! `timestep` float `[B]` (UniPC's whole numbers and Euler's fractions alike),
//! `encoder_hidden_states [B, L, text_dim]`, for I2V `encoder_hidden_states_image
//! [B, Limg, image_dim]` (the CLIP vision tokens), and `rope_cos`/`rope_sin [F·(H/2)·(W/2),
//! Dhead]` (`v2l_runtime::rope::wan_rope`, dynamic sizes as for CogVideoX); output
//! `sample [B, Cout, F, H, W]`. Text and image tokens come as separate inputs: diffusers splits
//! them out of one tensor by assuming 512 text tokens, which the pipeline always pads to.
//!
//! ```text
//! v2l-export dit path/to/Wan2.1-T2V-1.3B-Diffusers/transformer -o out/
//! ```

use v2l_contracts::io::dit as dit_io;
use v2l_graphs::passes::KEEP_IN_FP32;
use v2l_graphs::{DType, Dim, Graph, Value};

use crate::checkpoint::Checkpoint;
use crate::dit_graph::record_cache_cuts;
use crate::error::{ExportError, Result};
use crate::layers::{apply_rope, modulate, rotate_pairs, sdpa, sinusoid, video_dims};
use crate::scope::{LinearInfo, Scope};

pub const CLASS_NAME: &str = v2l_contracts::Family::Wan.dit_class();

/// diffusers' `WanTransformer3DModel._keep_in_fp32_modules`, plus `norm_out` (an
/// `FP32LayerNorm` without parameters, so absent from that list but computed in f32): what a
/// bf16/fp16 engine keeps in f32 (`v2l_graphs::passes::lower_precision`), but for the `rope`
/// scope of a bf16 cuda engine, which computes in fp16 before its fp16 attention
/// (`Lowering::half_attention`).
const KEEP_IN_FP32_MODULES: &[&str] = &[
    "rope",
    "time_embedder",
    "scale_shift_table",
    "norm1",
    "norm2",
    "norm3",
    "norm_out",
];

pub use v2l_contracts::family::WanDitConfig;

/// The exported Wan DiT and what a LoRA can target in it.
pub type WanDitExport = crate::dit_graph::DitGraph<WanDitConfig>;

/// Builds the Wan DiT graph from a diffusers transformer checkpoint; `weight_dtype` stores the
/// weights as f16/bf16 with a Cast each (`None`: f32).
pub fn export(ckpt: &Checkpoint, weight_dtype: Option<DType>) -> Result<WanDitExport> {
    let cfg: WanDitConfig = ckpt.config(CLASS_NAME)?;
    let raw_config: serde_json::Value = ckpt.config(CLASS_NAME)?;
    check_supported(ckpt, &cfg)?;
    let mut g = Graph::new("wan_dit");
    let mut vb = Scope::new(ckpt);
    vb.weight_dtype = weight_dtype;
    let (d, dh) = (cfg.inner_dim(), cfg.attention_head_dim as i64);
    let hidden = g.input(
        dit_io::HIDDEN_STATES,
        DType::F32,
        video_dims(cfg.in_channels),
    );
    let timestep = g.input(dit_io::TIMESTEP, DType::F32, vec!["batch".into()]);
    let text = g.input(
        dit_io::ENCODER_HIDDEN_STATES,
        DType::F32,
        vec![
            "batch".into(),
            "text_len".into(),
            Dim::Fixed(cfg.text_dim as i64),
        ],
    );
    let image = cfg.image_dim.map(|image_dim| {
        g.input(
            dit_io::ENCODER_HIDDEN_STATES_IMAGE,
            DType::F32,
            vec![
                "batch".into(),
                "image_len".into(),
                Dim::Fixed(image_dim as i64),
            ],
        )
    });
    let rope_dims = || vec!["video_tokens".into(), Dim::Fixed(dh)];
    let rope_cos = g.input(dit_io::ROPE_COS, DType::F32, rope_dims());
    let rope_sin = g.input(dit_io::ROPE_SIN, DType::F32, rope_dims());

    let x = patch_embedding(&mut g, &vb, &cfg, &hidden)?;
    let cond = condition_embedder(
        &mut g,
        &vb.pp("condition_embedder"),
        &cfg,
        &timestep,
        &text,
        image.as_ref(),
    )?;
    let rope = g.scoped("rope", |g| {
        // [S, Dh] → [S, 1, Dh]: broadcast over the heads of `[B, S, heads, Dh]`.
        let cos = g.unsqueeze(&rope_cos, &[1]);
        let sin = g.unsqueeze(&rope_sin, &[1]);
        let rotate = rotate_pairs(g, dh);
        (cos, sin, rotate)
    });
    let block_input = x.clone();
    let mut first_output = None;
    let mut x = x;
    for i in 0..cfg.num_layers {
        x = block(&mut g, &vb.pp("blocks").pp(i), &cfg, &x, &cond, &rope)?;
        first_output.get_or_insert_with(|| x.clone());
    }
    if let Some(first) = &first_output {
        record_cache_cuts(&mut g, &block_input, first, &x);
    }
    // Output: (table + temb) → shift, scale; norm_out(x)·(1 + scale) + shift; proj_out.
    let table = vb.weight(&mut g, "scale_shift_table", &[1, 2, d])?;
    let nx = vb.layer_norm(&mut g, &x, "norm_out", d, cfg.eps, false)?;
    let x = g.scoped("norm_out", |g| {
        // `temb.unsqueeze(1)`, spelt as a `Reshape` whose shape shows the rank: what
        // `passes::fold_modulation` needs to fold this norm's modulation on the GPU.
        let t = g.reshape_to(&cond.temb, &[0, 1, d as i64]);
        let m = g.add(&table, &t);
        let [shift, scale] = g.chunk::<2>(&m, 1, 1);
        modulate(g, &nx, &scale, &shift)
    });
    let (pt, ph, pw) = cfg.patch();
    let c = cfg.out_channels();
    let x = vb.linear(&mut g, &x, "proj_out", d, c * pt * ph * pw, true)?;
    let sample = g.scoped("unpatchify", |g| unpatchify(g, &x, &hidden, &cfg));
    g.output(&sample, dit_io::SAMPLE, DType::F32, video_dims(c));
    g.metadata("v2l.architecture", CLASS_NAME);
    g.metadata(KEEP_IN_FP32, &KEEP_IN_FP32_MODULES.join(","));
    let linears = module_order(vb.linears());
    Ok(WanDitExport {
        graph: g,
        config: cfg,
        raw_config,
        linears,
        unused_keys: ckpt.unused_keys(),
    })
}

fn check_supported(ckpt: &Checkpoint, cfg: &WanDitConfig) -> Result<()> {
    let unsupported = |what: String| {
        Err(ExportError::Unsupported {
            path: ckpt.dir().join("config.json"),
            what,
        })
    };
    if cfg.patch_size.len() != 3 {
        return unsupported(format!(
            "patch_size {:?} (3 values expected)",
            cfg.patch_size
        ));
    }
    if cfg.qk_norm.as_deref() != Some("rms_norm_across_heads") {
        return unsupported(format!("qk_norm {:?}", cfg.qk_norm));
    }
    if cfg.pos_embed_seq_len.is_some() {
        return unsupported("the FLF2V image position embedding (`pos_embed_seq_len`)".into());
    }
    if cfg.image_dim.is_some() != cfg.added_kv_proj_dim.is_some() {
        return unsupported("`image_dim` without `added_kv_proj_dim` (or the reverse)".into());
    }
    if cfg.attention_head_dim % 2 != 0 || cfg.freq_dim % 2 != 0 {
        return unsupported("an odd head or frequency dimension".into());
    }
    Ok(())
}

/// Conv3d with kernel = stride = patch as one matrix product over patches:
/// `[B,C,F,H,W] → [B,C,f,pt,h,ph,w,pw] → [B,f,h,w,C,pt,ph,pw] → [B, f·h·w, C·pt·ph·pw] · Wᵀ + b`
/// (tokens in diffusers' `flatten(2).transpose(1, 2)` order).
fn patch_embedding(g: &mut Graph, vb: &Scope, cfg: &WanDitConfig, hidden: &Value) -> Result<Value> {
    let (d, c) = (cfg.inner_dim(), cfg.in_channels);
    let (pt, ph, pw) = cfg.patch();
    let s = vb.pp("patch_embedding");
    let w = s.weight(g, "weight", &[d, c, pt, ph, pw])?;
    let b = s.weight(g, "bias", &[d])?;
    Ok(g.scoped(s.prefix(), |g| {
        let (pt, ph, pw) = (pt as i64, ph as i64, pw as i64);
        let k = c as i64 * pt * ph * pw;
        let bc = g.shape_range(hidden, 0, 2);
        let fhw = g.shape_range(hidden, 2, 5);
        let p = g.const_i64(&[pt, ph, pw]);
        let n = g.div(&fhw, &p);
        let (f, h, w_) = (
            g.slice(&n, 0, 0, 1),
            g.slice(&n, 0, 1, 2),
            g.slice(&n, 0, 2, 3),
        );
        let (cpt, cph, cpw) = (g.const_i64(&[pt]), g.const_i64(&[ph]), g.const_i64(&[pw]));
        let shape = g.concat(&[&bc, &f, &cpt, &h, &cph, &w_, &cpw], 0);
        let x = g.reshape(hidden, &shape);
        let x = g.transpose(&x, &[0, 2, 4, 6, 1, 3, 5, 7]);
        let x = g.reshape_to(&x, &[0, -1, k]);
        let w2 = g.reshape_to(&w, &[d as i64, k]);
        g.linear(&x, &w2, Some(&b), d as i64)
    }))
}

/// What the condition embedder gives every block.
struct Conditions {
    /// `[B, D]` time embedding (the output norm's modulation).
    temb: Value,
    /// `[B, 6, D]` per-block modulation (before each block's own table).
    timestep_proj: Value,
    /// `[B, L, D]` text tokens.
    text: Value,
    /// `[B, Limg, D]` image tokens (I2V).
    image: Option<Value>,
}

/// `WanTimeTextImageEmbedding`.
fn condition_embedder(
    g: &mut Graph,
    vb: &Scope,
    cfg: &WanDitConfig,
    timestep: &Value,
    text: &Value,
    image: Option<&Value>,
) -> Result<Conditions> {
    let d = cfg.inner_dim();
    let f = cfg.freq_dim;
    let emb = g.scoped("time_proj", |g| sinusoid(g, timestep, f, true, 0));
    let te = vb.pp("time_embedder");
    let h = te.linear(g, &emb, "linear_1", f, d, true)?;
    let h = g.scoped(te.prefix(), |g| g.silu(&h));
    let temb = te.linear(g, &h, "linear_2", d, d, true)?;
    // `time_embedder(t).type_as(encoder_hidden_states)`: an f32 module, rounded once after.
    let (temb, act) = g.scoped(vb.prefix(), |g| {
        let temb = g.cast(&temb, DType::F32);
        let act = g.silu(&temb);
        (temb, act)
    });
    let proj = vb.linear(g, &act, "time_proj", d, 6 * d, true)?;
    let timestep_proj = g.scoped(vb.prefix(), |g| g.reshape_to(&proj, &[0, 6, d as i64]));
    let tx = vb.pp("text_embedder");
    let t = tx.linear(g, text, "linear_1", cfg.text_dim, d, true)?;
    let t = g.scoped(tx.prefix(), |g| g.gelu_tanh(&t));
    let text = tx.linear(g, &t, "linear_2", d, d, true)?;
    let image = match (image, cfg.image_dim) {
        (Some(img), Some(image_dim)) => {
            // WanImageEmbedding: LayerNorm, FeedForward(mult 1, exact GELU), LayerNorm.
            let ie = vb.pp("image_embedder");
            // The pipelines pass the image tokens in the model's type; `norm1` is kept f32,
            // so the rounding is explicit (a `Cast` a bf16/fp16 lowering retargets).
            let img = g.scoped(vb.prefix(), |g| g.cast(img, DType::F32));
            let x = ie.layer_norm(g, &img, "norm1", image_dim, 1e-5, true)?;
            let ff = ie.pp("ff").pp("net");
            let x = ff
                .pp("0")
                .linear(g, &x, "proj", image_dim, image_dim, true)?;
            let x = g.scoped(&format!("{}.0.gelu", ff.prefix()), |g| g.gelu_erf(&x));
            let x = ff.linear(g, &x, "2", image_dim, d, true)?;
            Some(ie.layer_norm(g, &x, "norm2", d, 1e-5, true)?)
        }
        _ => None,
    };
    Ok(Conditions {
        temb,
        timestep_proj,
        text,
        image,
    })
}

/// `WanTransformerBlock`.
fn block(
    g: &mut Graph,
    vb: &Scope,
    cfg: &WanDitConfig,
    x: &Value,
    cond: &Conditions,
    rope: &(Value, Value, Value),
) -> Result<Value> {
    let d = cfg.inner_dim();
    // What diffusers computes in f32 (the table, modulation and gated residuals) is scoped
    // `scale_shift_table`, a module it keeps in f32 (`KEEP_IN_FP32`); each `.type_as(x)`
    // after it is an f32 `Cast` in the block's scope, which a bf16/fp16 lowering rounds.
    let f32_scope = format!("{}.scale_shift_table", vb.prefix());
    let type_as = |g: &mut Graph, x: &Value| g.scoped(vb.prefix(), |g| g.cast(x, DType::F32));
    let table = vb.weight(g, "scale_shift_table", &[1, 6, d])?;
    let [shift, scale, gate, c_shift, c_scale, c_gate] = g.scoped(&f32_scope, |g| {
        let m = g.add(&table, &cond.timestep_proj);
        g.chunk::<6>(&m, 1, 1)
    });
    // 1. Self-attention, gated.
    let n = vb.layer_norm(g, x, "norm1", d, cfg.eps, false)?;
    let n = g.scoped(&f32_scope, |g| modulate(g, &n, &scale, &shift));
    let n = type_as(g, &n);
    let a = attention(g, &vb.pp("attn1"), cfg, &n, &n, Some(rope), None)?;
    let x = g.scoped(&f32_scope, |g| {
        let ga = g.mul(&a, &gate);
        g.add(x, &ga)
    });
    let x = type_as(g, &x);
    // 2. Cross-attention to the text (and the image), ungated, in the model's type.
    let n = match cfg.cross_attn_norm {
        true => {
            let n = vb.layer_norm(g, &x, "norm2", d, cfg.eps, true)?;
            type_as(g, &n)
        }
        false => x.clone(),
    };
    let a = attention(
        g,
        &vb.pp("attn2"),
        cfg,
        &n,
        &cond.text,
        None,
        cond.image.as_ref(),
    )?;
    let x = g.scoped(vb.prefix(), |g| g.add(&x, &a));
    // 3. Feed-forward, gated.
    let n = vb.layer_norm(g, &x, "norm3", d, cfg.eps, false)?;
    let n = g.scoped(&f32_scope, |g| modulate(g, &n, &c_scale, &c_shift));
    let n = type_as(g, &n);
    let ff = vb.pp("ffn").pp("net");
    let h = ff.pp("0").linear(g, &n, "proj", d, cfg.ffn_dim, true)?;
    let h = g.scoped(&format!("{}.0.gelu", ff.prefix()), |g| g.gelu_tanh(&h));
    let h = ff.linear(g, &h, "2", cfg.ffn_dim, d, true)?;
    let x = g.scoped(&f32_scope, |g| {
        let gh = g.mul(&h, &c_gate);
        g.add(&x, &gh)
    });
    Ok(type_as(g, &x))
}

/// `WanAttention` with `WanAttnProcessor`: q from `x`, k/v from `ctx`, RMS norms across heads,
/// RoPE (self-attention), and for I2V a second attention of the same queries over the image
/// tokens (`add_k_proj`/`add_v_proj`, `norm_added_k`) added before `to_out`.
fn attention(
    g: &mut Graph,
    vb: &Scope,
    cfg: &WanDitConfig,
    x: &Value,
    ctx: &Value,
    rope: Option<&(Value, Value, Value)>,
    image: Option<&Value>,
) -> Result<Value> {
    let d = cfg.inner_dim();
    let (h, dh) = (
        cfg.num_attention_heads as i64,
        cfg.attention_head_dim as i64,
    );
    let q = vb.linear(g, x, "to_q", d, d, true)?;
    let k = vb.linear(g, ctx, "to_k", d, d, true)?;
    let v = vb.linear(g, ctx, "to_v", d, d, true)?;
    let q = vb.rms_norm(g, &q, "norm_q", d, cfg.eps)?;
    let k = vb.rms_norm(g, &k, "norm_k", d, cfg.eps)?;
    let heads = |g: &mut Graph, t: &Value| g.reshape_to(t, &[0, 0, h, dh]);
    let (q, k, v) = g.scoped(vb.prefix(), |g| {
        let (q, k, v) = (heads(g, &q), heads(g, &k), heads(g, &v));
        match rope {
            // Scoped `rope`: kept f32 in bf16/fp16 engines (fp16 before a bf16 cuda
            // engine's fp16 attention), as for CogVideoX.
            Some((cos, sin, rot)) => g.scoped("rope", |g| {
                (
                    apply_rope(g, &q, cos, sin, rot),
                    apply_rope(g, &k, cos, sin, rot),
                    v,
                )
            }),
            None => (q, k, v),
        }
    });
    let mut o = g.scoped(vb.prefix(), |g| sdpa(g, &q, &k, &v, dh, d));
    if let (Some(img), Some(kv_dim)) = (image, cfg.added_kv_proj_dim) {
        let ki = vb.linear(g, img, "add_k_proj", kv_dim, d, true)?;
        let vi = vb.linear(g, img, "add_v_proj", kv_dim, d, true)?;
        let ki = vb.rms_norm(g, &ki, "norm_added_k", d, cfg.eps)?;
        o = g.scoped(vb.prefix(), |g| {
            let (ki, vi) = (heads(g, &ki), heads(g, &vi));
            let oi = sdpa(g, &q, &ki, &vi, dh, d);
            g.add(&o, &oi)
        });
    }
    vb.pp("to_out").linear(g, &o, "0", d, d, true)
}

/// `[B, f·h·w, pt·ph·pw·C] → [B, C, f·pt, h·ph, w·pw]` (diffusers' reshape, permute
/// `(0, 7, 1, 4, 2, 5, 3, 6)` and flattens).
fn unpatchify(g: &mut Graph, x: &Value, hidden: &Value, cfg: &WanDitConfig) -> Value {
    let (pt, ph, pw) = cfg.patch();
    let (pt, ph, pw) = (pt as i64, ph as i64, pw as i64);
    let c = cfg.out_channels() as i64;
    let b = g.shape_range(hidden, 0, 1);
    let fhw = g.shape_range(hidden, 2, 5);
    let p = g.const_i64(&[pt, ph, pw]);
    let n = g.div(&fhw, &p);
    let tail = g.const_i64(&[pt, ph, pw, c]);
    let s = g.concat(&[&b, &n, &tail], 0);
    let y = g.reshape(x, &s);
    let y = g.transpose(&y, &[0, 7, 1, 4, 2, 5, 3, 6]);
    let cc = g.const_i64(&[c]);
    let s = g.concat(&[&b, &cc, &fhw], 0);
    g.reshape(&y, &s)
}

/// The linears in `named_modules()` order: each attention's `to_out.0` comes before its
/// `add_k_proj`/`add_v_proj` (the graph needs those first).
fn module_order(mut linears: Vec<LinearInfo>) -> Vec<LinearInfo> {
    let rank = |name: &str| -> u8 {
        match name.rsplit_once(".attn2.").map(|(_, leaf)| leaf) {
            Some("add_k_proj") => 1,
            Some("add_v_proj") => 2,
            _ => 0,
        }
    };
    // Stable: within one attention, to_out.0 (rank 0) moves ahead of the added projections.
    let mut out: Vec<LinearInfo> = Vec::with_capacity(linears.len());
    let mut pending: Vec<LinearInfo> = Vec::new();
    for l in linears.drain(..) {
        match rank(&l.name) {
            0 => {
                let flush = l.name.ends_with(".attn2.to_out.0");
                out.push(l);
                if flush {
                    out.append(&mut pending);
                }
            }
            _ => pending.push(l),
        }
    }
    out.append(&mut pending);
    out
}

/// Wan2.1-T2V-1.3B's `config.json` (diffusers `Wan-AI/Wan2.1-T2V-1.3B-Diffusers`): 30 blocks of
/// width 1536 (12 heads of 128), feed-forward 8960, umT5-XXL text width 4096.
pub fn wan_t2v_1_3b_config() -> serde_json::Value {
    serde_json::json!({
        "_class_name": CLASS_NAME, "patch_size": [1, 2, 2], "num_attention_heads": 12,
        "attention_head_dim": 128, "in_channels": 16, "out_channels": 16, "text_dim": 4096,
        "freq_dim": 256, "ffn_dim": 8960, "num_layers": 30, "cross_attn_norm": true,
        "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "image_dim": null,
        "added_kv_proj_dim": null, "rope_max_seq_len": 1024
    })
}

/// Every tensor the exporter reads for `cfg`, with its shape, in module order: for generated
/// full-size checkpoints (`v2l-bench`), checked key for key against the fixture checkpoint and,
/// for Wan2.1-I2V-14B, against the real linear shapes.
pub fn checkpoint_layout(cfg: &WanDitConfig) -> Vec<(String, Vec<usize>)> {
    let (d, f) = (cfg.inner_dim(), cfg.freq_dim);
    let (pt, ph, pw) = cfg.patch();
    let mut out: Vec<(String, Vec<usize>)> = Vec::new();
    let mut push = |name: String, shape: Vec<usize>| out.push((name, shape));
    let linear = |push: &mut dyn FnMut(String, Vec<usize>), name: &str, inp: usize, o: usize| {
        push(format!("{name}.weight"), vec![o, inp]);
        push(format!("{name}.bias"), vec![o]);
    };
    push(
        "patch_embedding.weight".into(),
        vec![d, cfg.in_channels, pt, ph, pw],
    );
    push("patch_embedding.bias".into(), vec![d]);
    let ce = "condition_embedder";
    linear(&mut push, &format!("{ce}.time_embedder.linear_1"), f, d);
    linear(&mut push, &format!("{ce}.time_embedder.linear_2"), d, d);
    linear(&mut push, &format!("{ce}.time_proj"), d, 6 * d);
    linear(
        &mut push,
        &format!("{ce}.text_embedder.linear_1"),
        cfg.text_dim,
        d,
    );
    linear(&mut push, &format!("{ce}.text_embedder.linear_2"), d, d);
    if let Some(i) = cfg.image_dim {
        let ie = format!("{ce}.image_embedder");
        push(format!("{ie}.norm1.weight"), vec![i]);
        push(format!("{ie}.norm1.bias"), vec![i]);
        linear(&mut push, &format!("{ie}.ff.net.0.proj"), i, i);
        linear(&mut push, &format!("{ie}.ff.net.2"), i, d);
        push(format!("{ie}.norm2.weight"), vec![d]);
        push(format!("{ie}.norm2.bias"), vec![d]);
    }
    for b in 0..cfg.num_layers {
        let blk = format!("blocks.{b}");
        for attn in ["attn1", "attn2"] {
            for q in ["to_q", "to_k", "to_v", "to_out.0"] {
                linear(&mut push, &format!("{blk}.{attn}.{q}"), d, d);
            }
            push(format!("{blk}.{attn}.norm_q.weight"), vec![d]);
            push(format!("{blk}.{attn}.norm_k.weight"), vec![d]);
        }
        if let Some(kv) = cfg.added_kv_proj_dim {
            linear(&mut push, &format!("{blk}.attn2.add_k_proj"), kv, d);
            linear(&mut push, &format!("{blk}.attn2.add_v_proj"), kv, d);
            push(format!("{blk}.attn2.norm_added_k.weight"), vec![d]);
        }
        if cfg.cross_attn_norm {
            push(format!("{blk}.norm2.weight"), vec![d]);
            push(format!("{blk}.norm2.bias"), vec![d]);
        }
        linear(&mut push, &format!("{blk}.ffn.net.0.proj"), d, cfg.ffn_dim);
        linear(&mut push, &format!("{blk}.ffn.net.2"), cfg.ffn_dim, d);
        push(format!("{blk}.scale_shift_table"), vec![1, 6, d]);
    }
    linear(&mut push, "proj_out", d, cfg.out_channels() * pt * ph * pw);
    push("scale_shift_table".into(), vec![1, 2, d]);
    out
}

impl WanDitExport {
    /// The manifest entry for this export written to `file` with weights stored as `weight_dtype`.
    pub fn manifest_entry(&self, file: &str, weight_dtype: DType) -> crate::manifest::DitEntry {
        crate::manifest::DitEntry {
            file: file.into(),
            class_name: CLASS_NAME.into(),
            weight_dtype,
            patch_size: self.config.patch().1,
            attention_head_dim: self.config.attention_head_dim,
            in_channels: self.config.in_channels,
            out_channels: self.config.out_channels(),
            text_embed_dim: self.config.text_dim,
            config: self.raw_config.clone(),
            lora_targets: self.linears.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn fixture(p: &str) -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures")
            .join(p)
    }

    #[test]
    fn layout_matches_the_fixture_checkpoints() {
        for dir in ["wan-tiny/transformer", "wan-tiny/transformer_i2v"] {
            let ck = Checkpoint::open_dir(&fixture(dir)).unwrap();
            let cfg: WanDitConfig = ck.config(CLASS_NAME).unwrap();
            let mut layout = checkpoint_layout(&cfg);
            layout.sort();
            assert_eq!(layout, ck.layout(), "{dir}");
        }
    }

    /// Wan2.1-I2V-14B: the 488 linears (names, `[out, in]`, in module order) and the parameter
    /// count in `fullscale_linear_shapes.json`.
    #[test]
    fn the_14b_layout_has_the_real_shapes() {
        let text = std::fs::read_to_string(fixture("fullscale_linear_shapes.json")).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let wan = &v["wan2.1-i2v-14b"];
        let cfg: WanDitConfig = serde_json::from_value(wan["config"].clone()).unwrap();
        let layout = checkpoint_layout(&cfg);
        let total: u64 = layout
            .iter()
            .map(|(_, s)| s.iter().product::<usize>() as u64)
            .sum();
        assert_eq!(total, wan["total_params"].as_u64().unwrap());
        let linears: Vec<(String, Vec<usize>)> = layout
            .iter()
            .filter(|(n, s)| n.ends_with(".weight") && s.len() == 2)
            .map(|(n, s)| (n.trim_end_matches(".weight").to_string(), s.clone()))
            .collect();
        let want: Vec<(String, Vec<usize>)> = wan["linear"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                let shape = e[1]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_u64().unwrap() as usize);
                (e[0].as_str().unwrap().to_string(), shape.collect())
            })
            .collect();
        assert_eq!(linears.len(), 488);
        assert_eq!(linears, want);
    }
}
