//! LoFA, the two-stage hypernetwork of the authors' code (`GAP-LAB-CUHK-SZ/LoFA`): stage 1
//! (`hyper_modulator_mask.TransformerV2.forward_features`) and stage 2
//! (`hyper_modulator_transformer.TransformerV2_stage2`) as two ONNX graphs.
//!
//! Per target layer (the layers are a batch; they never mix), with `W [n, n]` as stored:
//!
//! ```text
//! Wn   = W / √(mean over the output rows of W² + 1e-6)          # per input column (the code's
//!                                                                 #  mean(dim=(1, 2)) on [N,1,n,n])
//! x    = RMSNorm(Conv2d_P(Wn))  + pos.row[r] + pos.col[c]         # (n/P)² patch tokens, width D
//!      + depth_embed[depth] + type_embed[type]                    # patch tokens only
//! x    = [cls_token; x]                                           # 1 + (n/P)² tokens
//! text = text_proj(text)                                          # [1, T, D], shared by all rows
//! block i:  x += γ₁·SA(LN x);  x += γ₂·MLP(LN x);  x += γ₃·CA(LN x, text);  x += γ₄·MLP(LN x)
//!   stage 2, after the blocks in `cross_attn_idxs`:  x += γ₁·CA(x, prior);  x += γ₂·MLP(LN x)
//! hidden = LayerNorm(x)                                           # stage 1's output (its prior)
//! h = mean over tokens (CLS included);  A = head_A(h) [r, n];  B = head_B(h) [n, r]
//! alpha = softplus(head_alpha(h));  ΔW = alpha·scale·B·A
//! ```
//!
//! Attention has a per-head LayerNorm on q and k (one `[dh]` affine shared by the heads, eps
//! 1e-5), packed `qkv` (self) and `kv` (cross) projections, all linears biased, exact GELU;
//! block norms eps 1e-6, the final one 1e-5; RMSNorm eps is f32's machine epsilon (torch's
//! `eps=None` in f32; the authors run bf16, whose epsilon is 2⁻⁷).
//!
//! Graph contracts (N layers and T text tokens dynamic):
//! - `lofa_stage1.onnx`: `text [1, T, C]`, `base_weight [N, n, n]`, `depth_index [N]`,
//!   `type_index [N]` (int64) → `hidden [N, 1 + (n/P)², D]`;
//! - `lofa_stage2.onnx`: the same inputs and `prior [N, 1 + (n/P)², D]` (stage 1's hidden
//!   states; the authors store them in fp16 between the stages, which the runtime reproduces)
//!   → `lora_A [N, r, n]`, `lora_B [N, n, r]` with alpha folded in (`lora_B = alpha·B`: applied
//!   at scale 1 it is ΔW at `lora_scale` 1), and `alpha [N]`.
//!
//! Each stage is a checkpoint directory: `config.json` (the constructor's keyword arguments, as
//! the authors' yaml has them) and `model.safetensors` (its state_dict, upstream key names).

use serde::Deserialize;
use v2l_contracts::io::effect as effect_io;
use v2l_graphs::{Attr, DType, Dim, Graph, Value};

use crate::checkpoint::Checkpoint;
use crate::error::{ExportError, Result};
use crate::layers::{sdpa, weight_hypernet_inputs};
use crate::scope::Scope;

/// Recorded as `v2l.architecture` in the written models.
pub const ARCHITECTURE: &str = "LoFA";

/// The constructor arguments the graphs depend on (`config/recon/stage1.yaml`,
/// `config/diff/stage2.yaml` and the constructors' defaults).
#[derive(Clone, Debug, Deserialize, serde::Serialize, PartialEq)]
pub struct LofaConfig {
    /// C: the text embeddings' width (umT5-XXL: 4096).
    pub context_dim: usize,
    /// n: the side of the square weights (Wan2.1-1.3B: 1536).
    #[serde(default = "default_in_dim")]
    pub in_dim: usize,
    pub patch_size: usize,
    pub d_model: usize,
    pub n_heads: usize,
    pub n_blocks: usize,
    #[serde(default = "default_mlp_ratio")]
    pub mlp_ratio: f64,
    pub lora_rank: usize,
    pub num_depth: usize,
    pub num_type: usize,
    /// Stage 2: the blocks followed by a cross-residual block over stage 1's hidden states.
    #[serde(default)]
    pub cross_attn_idxs: Option<Vec<usize>>,
    #[serde(default = "yes")]
    pub qk_norm: bool,
    #[serde(default = "yes")]
    pub use_cls: bool,
    #[serde(default)]
    pub decode_cls: bool,
}

fn default_in_dim() -> usize {
    1536
}
fn default_mlp_ratio() -> f64 {
    4.0
}
fn yes() -> bool {
    true
}

impl LofaConfig {
    /// Tokens per layer: the patches, and the CLS token.
    pub fn tokens(&self) -> usize {
        let g = self.in_dim / self.patch_size.max(1);
        g * g + usize::from(self.use_cls)
    }

    fn mlp_hidden(&self) -> usize {
        (self.d_model as f64 * self.mlp_ratio) as usize
    }
}

/// Which of the two graphs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    One,
    Two,
}

/// One exported stage.
pub struct LofaExport {
    pub graph: Graph,
    pub config: LofaConfig,
    pub stage: Stage,
    /// Checkpoint tensors the graph does not read: stage 1's heads (its response map, unused
    /// at inference) and anything unexpected.
    pub unused_keys: Vec<String>,
}

/// The layer types in id order: the authors' `VALID_LAYERS` (`wan_lofa_pipeline.py`) in the Wan
/// repo's module names.
pub const VALID_LAYERS: [&str; 8] = [
    "self_attn.q",
    "self_attn.k",
    "self_attn.v",
    "self_attn.o",
    "cross_attn.q",
    "cross_attn.k",
    "cross_attn.v",
    "cross_attn.o",
];

/// Stage 2's cross-residual blocks (`cross_attn_idxs`, default `[3, 7]`).
const DEFAULT_CROSS: [usize; 2] = [3, 7];

/// Both stages, checked to belong together (the same widths, weights and tables).
pub fn export_pair(stage1: &Checkpoint, stage2: &Checkpoint) -> Result<(LofaExport, LofaExport)> {
    let (one, two) = (export(stage1, Stage::One)?, export(stage2, Stage::Two)?);
    let (a, b) = (&one.config, &two.config);
    let key = |c: &LofaConfig| {
        (
            c.context_dim,
            c.in_dim,
            c.patch_size,
            c.d_model,
            c.num_depth,
            c.num_type,
        )
    };
    if key(a) != key(b) {
        return Err(ExportError::Config {
            path: stage2.dir().join("config.json"),
            message: format!(
                "stage 2 does not fit stage 1: (context_dim, in_dim, patch_size, d_model, num_depth, num_type) {:?} against {:?}",
                key(b),
                key(a)
            ),
        });
    }
    if b.num_type > VALID_LAYERS.len() {
        return Err(ExportError::Config {
            path: stage2.dir().join("config.json"),
            message: format!(
                "num_type {}: the authors' pipeline has {} layer types",
                b.num_type,
                VALID_LAYERS.len()
            ),
        });
    }
    Ok((one, two))
}

/// Builds `stage`'s graph from its checkpoint directory (module docs).
pub fn export(ckpt: &Checkpoint, stage: Stage) -> Result<LofaExport> {
    let raw = ckpt.raw_config()?;
    let cfg: LofaConfig = serde_json::from_value(raw.clone()).map_err(|e| ExportError::Config {
        path: ckpt.dir().join("config.json"),
        message: format!("not a LoFA stage config: {e}"),
    })?;
    check(ckpt, &cfg)?;
    let (d, n, r) = (cfg.d_model, cfg.in_dim, cfg.lora_rank);
    let mut g = Graph::new(match stage {
        Stage::One => "lofa_stage1",
        Stage::Two => "lofa_stage2",
    });
    let vb = Scope::new(ckpt);
    let (text, w, depth, kind) = weight_hypernet_inputs(
        &mut g,
        cfg.context_dim,
        n,
        [effect_io::DEPTH_INDEX, effect_io::TYPE_INDEX],
    );
    let tokens_dims = || {
        vec![
            "layers".into(),
            Dim::Fixed(cfg.tokens() as i64),
            Dim::Fixed(d as i64),
        ]
    };
    let prior = (stage == Stage::Two).then(|| g.input(effect_io::PRIOR, DType::F32, tokens_dims()));

    let mut x = tokens(&mut g, &vb, &cfg, &w, &depth, &kind)?;
    let text = vb.linear(&mut g, &text, "text_proj", cfg.context_dim, d, true)?;
    let cross: Vec<usize> = cfg
        .cross_attn_idxs
        .clone()
        .unwrap_or(DEFAULT_CROSS.to_vec());
    for i in 0..cfg.n_blocks {
        x = block(&mut g, &vb.pp("blocks").pp(i), &cfg, &x, &text)?;
        if let (Some(p), true) = (&prior, cross.contains(&i)) {
            x = cross_residual(&mut g, &vb.pp("cross_attn_blocks").pp(i), &cfg, &x, p)?;
        }
    }
    let hidden = vb.layer_norm(&mut g, &x, "norm", d, 1e-5, true)?;
    match stage {
        Stage::One => g.output(&hidden, effect_io::HIDDEN, DType::F32, tokens_dims()),
        Stage::Two => {
            let h = g.scoped("pool", |g| {
                g.op(
                    "ReduceMean",
                    &[&hidden],
                    vec![("axes", Attr::Ints(vec![1])), ("keepdims", Attr::Int(0))],
                )
            });
            let a = vb.linear(&mut g, &h, "head_A", d, r * n, true)?;
            let b = vb.linear(&mut g, &h, "head_B", d, n * r, true)?;
            let al = vb.linear(&mut g, &h, "head_alpha", d, 1, true)?;
            let (lora_a, lora_b, alpha) = g.scoped("heads", |g| {
                let a = g.reshape_to(&a, &[0, r as i64, n as i64]);
                let b = g.reshape_to(&b, &[0, n as i64, r as i64]);
                let alpha = softplus(g, &al);
                let scale = g.unsqueeze(&alpha, &[2]);
                let b = g.mul(&b, &scale);
                let alpha = g.reshape_to(&alpha, &[-1]);
                (a, b, alpha)
            });
            let layers = || -> Dim { "layers".into() };
            let (rd, nd) = (Dim::Fixed(r as i64), Dim::Fixed(n as i64));
            g.output(
                &lora_a,
                effect_io::LORA_A,
                DType::F32,
                vec![layers(), rd.clone(), nd.clone()],
            );
            g.output(
                &lora_b,
                effect_io::LORA_B,
                DType::F32,
                vec![layers(), nd, rd],
            );
            g.output(&alpha, effect_io::ALPHA, DType::F32, vec![layers()]);
        }
    }
    g.metadata("v2l.architecture", ARCHITECTURE);
    g.metadata(
        "v2l.lofa.config",
        &serde_json::to_string(&cfg).unwrap_or_default(),
    );
    Ok(LofaExport {
        graph: g,
        config: cfg,
        stage,
        unused_keys: ckpt.unused_keys(),
    })
}

fn check(ckpt: &Checkpoint, cfg: &LofaConfig) -> Result<()> {
    let bad = |message: String| ExportError::Config {
        path: ckpt.dir().join("config.json"),
        message,
    };
    if cfg.n_heads == 0 || cfg.d_model % cfg.n_heads != 0 {
        return Err(bad(format!(
            "d_model {} is not a multiple of n_heads {}",
            cfg.d_model, cfg.n_heads
        )));
    }
    if cfg.patch_size == 0 || cfg.in_dim % cfg.patch_size != 0 {
        return Err(bad(format!(
            "in_dim {} is not a multiple of patch_size {}",
            cfg.in_dim, cfg.patch_size
        )));
    }
    if !cfg.use_cls || cfg.decode_cls || !cfg.qk_norm {
        return Err(bad(
            "only the released form is exported: use_cls true, decode_cls false, qk_norm true"
                .into(),
        ));
    }
    Ok(())
}

/// The per-layer tokens: normalised weight → patches → RMSNorm → positions and layer meta →
/// CLS first.
fn tokens(
    g: &mut Graph,
    vb: &Scope,
    cfg: &LofaConfig,
    w: &Value,
    depth: &Value,
    kind: &Value,
) -> Result<Value> {
    let (d, p) = (cfg.d_model, cfg.patch_size);
    let grid = cfg.in_dim / p;
    let pe = vb.pp("patch_embed");
    let conv_w = pe.weight(g, "proj.weight", &[d, 1, p, p])?;
    let conv_b = pe.weight(g, "proj.bias", &[d])?;
    let x = g.scoped("patch_embed", |g| {
        // `_rms_norm_matrix` on [N, 1, n, n]: mean over dims (1, 2), the channel and the rows.
        let sq = g.mul(w, w);
        let ms = g.op(
            "ReduceMean",
            &[&sq],
            vec![("axes", Attr::Ints(vec![1])), ("keepdims", Attr::Int(1))],
        );
        let eps = g.scalar(1e-6);
        let ms = g.add(&ms, &eps);
        let rms = g.op("Sqrt", &[&ms], vec![]);
        let wn = g.div(w, &rms);
        let wn = g.unsqueeze(&wn, &[1]);
        let p = p as i64;
        let y = g.op(
            "Conv",
            &[&wn, &conv_w, &conv_b],
            vec![
                ("kernel_shape", Attr::Ints(vec![p, p])),
                ("strides", Attr::Ints(vec![p, p])),
            ],
        );
        let y = g.reshape_to(&y, &[0, d as i64, (grid * grid) as i64]);
        g.transpose(&y, &[0, 2, 1])
    });
    let x = pe.rms_norm(g, &x, "norm", d, f32::EPSILON)?;
    let row = vb.weight(g, "pos.row", &[1, grid, 1, d])?;
    let col = vb.weight(g, "pos.col", &[1, 1, grid, d])?;
    let de = vb.weight(g, "depth_embed.weight", &[cfg.num_depth, d])?;
    let te = vb.weight(g, "type_embed.weight", &[cfg.num_type, d])?;
    let cls = vb.weight(g, "cls_token", &[1, 1, d])?;
    Ok(g.scoped("tokens", |g| {
        let pos = g.add(&row, &col);
        let pos = g.reshape_to(&pos, &[1, (grid * grid) as i64, d as i64]);
        let x = g.add(&x, &pos);
        let de = g.op("Gather", &[&de, depth], vec![]);
        let te = g.op("Gather", &[&te, kind], vec![]);
        let meta = g.add(&de, &te);
        let meta = g.unsqueeze(&meta, &[1]);
        let x = g.add(&x, &meta);
        let lead = g.shape_range(&x, 0, 1);
        let tail = g.const_i64(&[1, d as i64]);
        let shape = g.concat(&[&lead, &tail], 0);
        let cls = g.op("Expand", &[&cls, &shape], vec![]);
        g.concat(&[&cls, &x], 1)
    }))
}

/// `ConditionalBlock` (eval path): self-attention, MLP, cross-attention to the text, MLP,
/// each pre-LayerNorm (eps 1e-6) and LayerScaled.
fn block(g: &mut Graph, vb: &Scope, cfg: &LofaConfig, x: &Value, text: &Value) -> Result<Value> {
    let d = cfg.d_model;
    let n = vb.layer_norm(g, x, "norm1", d, 1e-6, true)?;
    let a = attention(g, &vb.pp("self_attn"), cfg, &n, None)?;
    let x = scaled_residual(g, vb, "ls1", x, &a, d)?;
    let n = vb.layer_norm(g, &x, "norm2", d, 1e-6, true)?;
    let m = mlp(g, &vb.pp("mlp_sa"), cfg, &n)?;
    let x = scaled_residual(g, vb, "ls2", &x, &m, d)?;
    let n = vb.layer_norm(g, &x, "norm3", d, 1e-6, true)?;
    let a = attention(g, &vb.pp("cross_attn"), cfg, &n, Some(text))?;
    let x = scaled_residual(g, vb, "ls3", &x, &a, d)?;
    let n = vb.layer_norm(g, &x, "norm4", d, 1e-6, true)?;
    let m = mlp(g, &vb.pp("mlp_ca"), cfg, &n)?;
    scaled_residual(g, vb, "ls4", &x, &m, d)
}

/// `CrossResidualBlock` (stage 2): `x += γ₁·CA(x, prior)` without a pre-norm on x, then
/// `x += γ₂·MLP(LN x)`.
fn cross_residual(
    g: &mut Graph,
    vb: &Scope,
    cfg: &LofaConfig,
    x: &Value,
    prior: &Value,
) -> Result<Value> {
    let d = cfg.d_model;
    let a = attention(g, &vb.pp("cross_attn"), cfg, x, Some(prior))?;
    let x = scaled_residual(g, vb, "ls1", x, &a, d)?;
    let n = vb.layer_norm(g, &x, "norm2", d, 1e-6, true)?;
    let m = mlp(g, &vb.pp("mlp"), cfg, &n)?;
    scaled_residual(g, vb, "ls2", &x, &m, d)
}

/// `x + γ·y` with the LayerScale `γ` named `name` (`{name}.gamma`).
fn scaled_residual(
    g: &mut Graph,
    vb: &Scope,
    name: &str,
    x: &Value,
    y: &Value,
    d: usize,
) -> Result<Value> {
    let gamma = vb.pp(name).weight(g, "gamma", &[d])?;
    Ok(g.scoped(vb.prefix(), |g| {
        let s = g.mul(y, &gamma);
        g.add(x, &s)
    }))
}

/// `Mlp`: `fc2(GELU(fc1 x))`, exact GELU.
fn mlp(g: &mut Graph, vb: &Scope, cfg: &LofaConfig, x: &Value) -> Result<Value> {
    let (d, h) = (cfg.d_model, cfg.mlp_hidden());
    let y = vb.linear(g, x, "fc1", d, h, true)?;
    let y = g.scoped(&format!("{}.gelu", vb.prefix()), |g| g.gelu_erf(&y));
    vb.linear(g, &y, "fc2", h, d, true)
}

/// `Attention` (`ctx` None: packed `qkv`) or `CrossAttention` (`q` from x, packed `kv` from
/// `ctx`), with the per-head q/k LayerNorm (eps 1e-5) and `proj`.
fn attention(
    g: &mut Graph,
    vb: &Scope,
    cfg: &LofaConfig,
    x: &Value,
    ctx: Option<&Value>,
) -> Result<Value> {
    let d = cfg.d_model;
    let (h, dh) = (cfg.n_heads as i64, (d / cfg.n_heads) as i64);
    let (q, k, v) = match ctx {
        None => {
            let qkv = vb.linear(g, x, "qkv", d, 3 * d, true)?;
            let [q, k, v] = g.scoped(vb.prefix(), |g| g.chunk::<3>(&qkv, d as i64, -1));
            (q, k, v)
        }
        Some(c) => {
            let q = vb.linear(g, x, "q", d, d, true)?;
            let kv = vb.linear(g, c, "kv", d, 2 * d, true)?;
            let [k, v] = g.scoped(vb.prefix(), |g| g.chunk::<2>(&kv, d as i64, -1));
            (q, k, v)
        }
    };
    let heads =
        |g: &mut Graph, t: &Value| g.scoped(vb.prefix(), |g| g.reshape_to(t, &[0, 0, h, dh]));
    let (q, k, v) = (heads(g, &q), heads(g, &k), heads(g, &v));
    let q = vb.layer_norm(g, &q, "q_norm", dh as usize, 1e-5, true)?;
    let k = vb.layer_norm(g, &k, "k_norm", dh as usize, 1e-5, true)?;
    let o = g.scoped(vb.prefix(), |g| sdpa(g, &q, &k, &v, dh, d));
    vb.linear(g, &o, "proj", d, d, true)
}

/// torch's `softplus` (beta 1, threshold 20): `x` above 20, `ln(1 + eˣ)` below.
fn softplus(g: &mut Graph, x: &Value) -> Value {
    let sp = g.op("Softplus", &[x], vec![]);
    let t = g.scalar(20.0);
    let big = g.op("Greater", &[x, &t], vec![]);
    g.op("Where", &[&big, x, &sp], vec![])
}

/// The released preview's configuration of `stage` (`config/recon/stage1.yaml`,
/// `config/diff/stage2.yaml`): Wan2.1-T2V-1.3B's 1536×1536 weights in 96×96 patches, width 768,
/// 12 heads, 8 blocks, rank 32, umT5-XXL text (4096), 30 depths, 8 types.
pub fn released_config(stage: Stage) -> serde_json::Value {
    let mut c = serde_json::json!({
        "context_dim": 4096, "in_dim": 1536, "input_size": 1536, "patch_size": 96,
        "d_model": 768, "n_heads": 12, "n_blocks": 8, "mlp_ratio": 4.0, "lora_rank": 32,
        "num_depth": 30, "num_type": 8, "qk_norm": true, "use_cls": true, "decode_cls": false,
    });
    if let (Stage::Two, Some(o)) = (stage, c.as_object_mut()) {
        o.insert("cross_attn_idxs".into(), serde_json::json!(DEFAULT_CROSS));
    }
    c
}

/// Every tensor of a checkpoint of `stage` with this configuration, in upstream names (stage 1
/// has its response-map heads too).
pub fn checkpoint_layout(c: &LofaConfig, stage: Stage) -> Vec<(String, Vec<usize>)> {
    let (d, n, r, p) = (c.d_model, c.in_dim, c.lora_rank, c.patch_size);
    let (g, dh, hm) = (n / p.max(1), d / c.n_heads.max(1), c.mlp_hidden());
    let mut t: Vec<(String, Vec<usize>)> = vec![
        ("cls_token".into(), vec![1, 1, d]),
        ("patch_embed.proj.weight".into(), vec![d, 1, p, p]),
        ("patch_embed.proj.bias".into(), vec![d]),
        ("patch_embed.norm.weight".into(), vec![d]),
        ("pos.row".into(), vec![1, g, 1, d]),
        ("pos.col".into(), vec![1, 1, g, d]),
        ("depth_embed.weight".into(), vec![c.num_depth, d]),
        ("type_embed.weight".into(), vec![c.num_type, d]),
        ("text_proj.weight".into(), vec![d, c.context_dim]),
        ("text_proj.bias".into(), vec![d]),
        ("norm.weight".into(), vec![d]),
        ("norm.bias".into(), vec![d]),
        ("head_A.weight".into(), vec![r * n, d]),
        ("head_A.bias".into(), vec![r * n]),
        ("head_B.weight".into(), vec![n * r, d]),
        ("head_B.bias".into(), vec![n * r]),
    ];
    let attention = |t: &mut Vec<(String, Vec<usize>)>, at: &str, packed: &[(&str, usize)]| {
        for (name, width) in packed {
            t.push((format!("{at}.{name}.weight"), vec![*width, d]));
            t.push((format!("{at}.{name}.bias"), vec![*width]));
        }
        for norm in ["q_norm", "k_norm"] {
            t.push((format!("{at}.{norm}.weight"), vec![dh]));
            t.push((format!("{at}.{norm}.bias"), vec![dh]));
        }
        t.push((format!("{at}.proj.weight"), vec![d, d]));
        t.push((format!("{at}.proj.bias"), vec![d]));
    };
    let mlp = |t: &mut Vec<(String, Vec<usize>)>, at: &str| {
        t.push((format!("{at}.fc1.weight"), vec![hm, d]));
        t.push((format!("{at}.fc1.bias"), vec![hm]));
        t.push((format!("{at}.fc2.weight"), vec![d, hm]));
        t.push((format!("{at}.fc2.bias"), vec![d]));
    };
    for i in 0..c.n_blocks {
        let b = format!("blocks.{i}");
        for k in 1..=4 {
            t.push((format!("{b}.norm{k}.weight"), vec![d]));
            t.push((format!("{b}.norm{k}.bias"), vec![d]));
            t.push((format!("{b}.ls{k}.gamma"), vec![d]));
        }
        attention(&mut t, &format!("{b}.self_attn"), &[("qkv", 3 * d)]);
        attention(
            &mut t,
            &format!("{b}.cross_attn"),
            &[("q", d), ("kv", 2 * d)],
        );
        mlp(&mut t, &format!("{b}.mlp_sa"));
        mlp(&mut t, &format!("{b}.mlp_ca"));
    }
    if stage == Stage::Two {
        for j in c.cross_attn_idxs.clone().unwrap_or(DEFAULT_CROSS.to_vec()) {
            let b = format!("cross_attn_blocks.{j}");
            attention(
                &mut t,
                &format!("{b}.cross_attn"),
                &[("q", d), ("kv", 2 * d)],
            );
            for k in 1..=2 {
                t.push((format!("{b}.ls{k}.gamma"), vec![d]));
            }
            t.push((format!("{b}.norm2.weight"), vec![d]));
            t.push((format!("{b}.norm2.bias"), vec![d]));
            mlp(&mut t, &format!("{b}.mlp"));
        }
        t.push(("head_alpha.weight".into(), vec![1, d]));
        t.push(("head_alpha.bias".into(), vec![1]));
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(stage: &str) -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/wan-tiny/lofa")
            .join(stage)
    }

    #[test]
    fn layout_is_the_fixture_checkpoints_and_the_released_counts() {
        for (dir, stage) in [("stage1", Stage::One), ("stage2", Stage::Two)] {
            let ck = Checkpoint::open_dir(&fixture(dir)).unwrap();
            let cfg: LofaConfig = serde_json::from_value(ck.raw_config().unwrap().clone()).unwrap();
            let layout = checkpoint_layout(&cfg, stage);
            assert_eq!(layout.len(), ck.keys().len(), "{dir}");
            for (name, shape) in &layout {
                assert!(ck.tensor(name, shape).is_ok(), "{dir}: {name} {shape:?}");
            }
        }
        // Counted by instantiating the authors' modules at the released configuration.
        for (stage, want) in [(Stage::One, 199_312_384usize), (Stage::Two, 213_489_409)] {
            let cfg: LofaConfig = serde_json::from_value(released_config(stage)).unwrap();
            let n: usize = checkpoint_layout(&cfg, stage)
                .iter()
                .map(|(_, s)| s.iter().product::<usize>())
                .sum();
            assert_eq!(n, want, "{stage:?}");
        }
    }
}
