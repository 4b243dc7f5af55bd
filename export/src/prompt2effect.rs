//! The Prompt2Effect hypernetwork (`HyperNet`, "version ve" of the public reproduction
//! `LukeLIN-web/Prompt2Effect`, `hypernet.py`) as an ONNX graph: an effect prompt's text
//! embeddings and a batch of square base weights → standard LoRA factors for those layers.
//!
//! `/work/shared/specs/prompt2effect.md` describes the method; where the reproduction's code
//! differs, the code is followed (it is what a checkpoint computes):
//!
//! ```text
//! ctx  = LayerNorm(text_proj.proj(text))                        # [1, T, d], once per prompt
//! cols = col_enc(Wᵀ) + pe + cond     rows = row_enc(W) + pe + cond  # [N, D, d] each
//! cond = cond_proj([layer_emb[l] ‖ module_emb[m]])              # layer first
//! kv   = [cols; rows]                                           # [N, 2D, d]
//! x    = compressor(latents, kv)                                # cross block, [N, n, d]
//! for k: x = proc_cross.k(proc_self.k(x), ctx)
//! y    = decompressor(kv, x)                                    # the weight tokens attend back
//! lora_A = head_A(y[:, :D])ᵀ  [N, r, D]     lora_B = head_B(y[:, D:])  [N, D, r]
//! ```
//!
//! Blocks are pre-norm on the query only (`q + MHA(LN q, c, c)`, then `+ FF(LN ·)`), MHA is
//! `nn.MultiheadAttention` (packed in-projection with bias), FF is 4× with erf GELU, LayerNorm
//! eps 1e-5. Rows of the batch (layers) never mix; the latents are shared by every row.
//! Applied as `y += (x·A)·B` at scale 1: the output is the PEFT orientation with alpha = rank.
//!
//! Graph contract: inputs `text [1, T, E]`, `base_weight [N, D, D]` (the `nn.Linear` weights
//! as stored, `[out, in]`), `layer_index [N]` and `module_index [N]` (int64; upstream clamps
//! the layer index to its table, which the runtime does before feeding it); outputs
//! `lora_A [N, r, D]`, `lora_B [N, D, r]`. N and T are dynamic: the runtime streams a model's
//! layers through it in chunks.
//!
//! The checkpoint is a directory with `config.json` (the reproduction's `HyperConfig` fields)
//! and `model.safetensors` (its `state_dict`, upstream key names).
//!
//! ```text
//! v2l-export prompt2effect checkpoints/p2e/ -o out/
//! ```

use serde::Deserialize;
use v2l_contracts::io::effect as effect_io;
use v2l_graphs::{DType, Dim, Graph, Value};

use crate::checkpoint::Checkpoint;
use crate::error::{ExportError, Result};
use crate::layers::{sdpa, weight_hypernet_inputs};
use crate::scope::Scope;

/// Recorded as `v2l.architecture` in the written model.
pub const ARCHITECTURE: &str = "Prompt2EffectHyperNet";
/// `nn.LayerNorm`'s default, every norm of the network.
const LN_EPS: f32 = 1e-5;

/// The reproduction's `HyperConfig` fields the graph depends on.
#[derive(Clone, Debug, Deserialize, serde::Serialize, PartialEq)]
pub struct Prompt2EffectConfig {
    pub text_dim: usize,
    /// D: the side of the square weights it adapts.
    pub weight_dim: usize,
    pub hidden_dim: usize,
    pub n_heads: usize,
    /// Processor (self, cross) block pairs.
    pub n_layer: usize,
    pub rank: usize,
    pub num_latents: usize,
    /// Module types in id order (ids from 1; 0 is "unknown"). Upstream's `module_specs`
    /// is a dict whose key order gives the ids.
    #[serde(deserialize_with = "spec_names")]
    pub module_specs: Vec<String>,
    pub max_layers: usize,
    pub layer_embed_dim: usize,
    pub module_embed_dim: usize,
    #[serde(default = "yes")]
    pub include_emb: bool,
    #[serde(default = "yes")]
    pub use_sin_pos: bool,
}

fn yes() -> bool {
    true
}

/// `module_specs` as upstream writes it (a dict, key order = ids) or as a list of names.
fn spec_names<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Specs {
        Names(Vec<String>),
        Dict(serde_json::Map<String, serde_json::Value>),
    }
    Ok(match Specs::deserialize(d)? {
        Specs::Names(n) => n,
        Specs::Dict(m) => m.keys().cloned().collect(),
    })
}

impl Prompt2EffectConfig {
    /// The module-type id of `name` (`self_attn.q`, …): its position in `module_specs` + 1,
    /// or 0 (unknown), as upstream's `module_to_idx.get(name, 0)`.
    pub fn module_id(&self, name: &str) -> Option<i64> {
        self.module_specs
            .iter()
            .position(|m| m == name)
            .map(|i| i as i64 + 1)
    }
}

/// The exported graph and its configuration.
pub struct Prompt2EffectExport {
    pub graph: Graph,
    pub config: Prompt2EffectConfig,
    /// Checkpoint tensors the graph does not read (empty for an upstream checkpoint).
    pub unused_keys: Vec<String>,
}

/// Builds the graph from a checkpoint directory (module docs).
pub fn export(ckpt: &Checkpoint) -> Result<Prompt2EffectExport> {
    let raw = ckpt.raw_config()?;
    let cfg: Prompt2EffectConfig =
        serde_json::from_value(raw.clone()).map_err(|e| ExportError::Config {
            path: ckpt.dir().join("config.json"),
            message: format!("not a Prompt2Effect HyperConfig: {e}"),
        })?;
    check(ckpt, &cfg)?;
    let (d, dd, r) = (cfg.hidden_dim, cfg.weight_dim, cfg.rank);
    let mut g = Graph::new("prompt2effect");
    let vb = Scope::new(ckpt);
    let (text, w, layer_index, module_index) = weight_hypernet_inputs(
        &mut g,
        cfg.text_dim,
        dd,
        [effect_io::LAYER_INDEX, effect_io::MODULE_INDEX],
    );

    let tp = vb.pp("text_proj");
    let ctx = tp.linear(&mut g, &text, "proj", cfg.text_dim, d, true)?;
    let ctx = tp.layer_norm(&mut g, &ctx, "ln", d, LN_EPS, true)?;

    let wt = g.scoped("col_enc", |g| g.transpose(&w, &[0, 2, 1]));
    let mut cols = vb.linear(&mut g, &wt, "col_enc", dd, d, true)?;
    let mut rows = vb.linear(&mut g, &w, "row_enc", dd, d, true)?;
    if cfg.use_sin_pos {
        let pe = positions(dd, d);
        let pe = g.const_f32(&pe, &[dd as i64, d as i64]);
        cols = g.scoped("pos", |g| g.add(&cols, &pe));
        rows = g.scoped("pos", |g| g.add(&rows, &pe));
    }
    if cfg.include_emb {
        let le = vb.weight(
            &mut g,
            "layer_emb.weight",
            &[cfg.max_layers, cfg.layer_embed_dim],
        )?;
        let me = vb.weight(
            &mut g,
            "module_emb.weight",
            &[cfg.module_specs.len() + 1, cfg.module_embed_dim],
        )?;
        let e = g.scoped("cond", |g| {
            let l = g.op("Gather", &[&le, &layer_index], vec![]);
            let m = g.op("Gather", &[&me, &module_index], vec![]);
            g.concat(&[&l, &m], -1)
        });
        let width = cfg.layer_embed_dim + cfg.module_embed_dim;
        let cond = vb.linear(&mut g, &e, "cond_proj", width, d, true)?;
        (cols, rows) = g.scoped("cond", |g| {
            let c = g.unsqueeze(&cond, &[1]);
            (g.add(&cols, &c), g.add(&rows, &c))
        });
    }
    let kv = g.scoped("kv", |g| g.concat(&[&cols, &rows], 1));

    let latents = vb.weight(&mut g, "latents", &[cfg.num_latents, d])?;
    let latents = g.scoped("latents", |g| g.unsqueeze(&latents, &[0]));
    let mut x = block(&mut g, &vb.pp("compressor"), &cfg, &latents, Some(&kv))?;
    for k in 0..cfg.n_layer {
        x = block(&mut g, &vb.pp("proc_self").pp(k), &cfg, &x, None)?;
        x = block(&mut g, &vb.pp("proc_cross").pp(k), &cfg, &x, Some(&ctx))?;
    }
    let y = block(&mut g, &vb.pp("decompressor"), &cfg, &kv, Some(&x))?;
    let [ya, yb] = g.scoped("heads", |g| g.chunk::<2>(&y, dd as i64, 1));
    let a = vb.linear(&mut g, &ya, "head_A", d, r, true)?;
    let lora_a = g.scoped("head_A", |g| g.transpose(&a, &[0, 2, 1]));
    let lora_b = vb.linear(&mut g, &yb, "head_B", d, r, true)?;
    let (layers, side) = ("layers".into(), Dim::Fixed(dd as i64));
    g.output(
        &lora_a,
        effect_io::LORA_A,
        DType::F32,
        vec![layers, Dim::Fixed(r as i64), side.clone()],
    );
    g.output(
        &lora_b,
        effect_io::LORA_B,
        DType::F32,
        vec!["layers".into(), side, Dim::Fixed(r as i64)],
    );
    g.metadata("v2l.architecture", ARCHITECTURE);
    g.metadata(
        "v2l.prompt2effect.config",
        &serde_json::to_string(&cfg).unwrap_or_default(),
    );
    Ok(Prompt2EffectExport {
        graph: g,
        config: cfg,
        unused_keys: ckpt.unused_keys(),
    })
}

fn check(ckpt: &Checkpoint, cfg: &Prompt2EffectConfig) -> Result<()> {
    let bad = |message: String| ExportError::Config {
        path: ckpt.dir().join("config.json"),
        message,
    };
    if cfg.n_heads == 0 || cfg.hidden_dim % cfg.n_heads != 0 {
        return Err(bad(format!(
            "hidden_dim {} is not a multiple of n_heads {}",
            cfg.hidden_dim, cfg.n_heads
        )));
    }
    if [cfg.text_dim, cfg.weight_dim, cfg.rank, cfg.num_latents].contains(&0) {
        return Err(bad(
            "text_dim, weight_dim, rank and num_latents must be positive".into(),
        ));
    }
    if cfg.include_emb && cfg.max_layers == 0 {
        return Err(bad("max_layers must be positive".into()));
    }
    Ok(())
}

/// Upstream's `sinusoidal_positions(L, d)` in f32: interleaved `sin, cos` pairs, column `i`
/// at frequency `exp(−ln(10000)·2⌊i/2⌋/d)`.
pub fn positions(len: usize, d: usize) -> Vec<f32> {
    let ln = 10000f32.ln();
    let freq: Vec<f32> = (0..d)
        .map(|i| (-(ln * ((i / 2) * 2) as f32 / d as f32)).exp())
        .collect();
    (0..len)
        .flat_map(|p| {
            freq.iter().enumerate().map(move |(i, f)| {
                let a = p as f32 * f;
                if i % 2 == 0 {
                    a.sin()
                } else {
                    a.cos()
                }
            })
        })
        .collect()
}

/// `SelfAttnBlock` (`ctx` None) or `CrossAttnBlock`: `x = q + MHA(LN1 q, c, c)`,
/// `x + FF(LN2 x)`; only the query side is normalised.
fn block(
    g: &mut Graph,
    vb: &Scope,
    cfg: &Prompt2EffectConfig,
    q: &Value,
    ctx: Option<&Value>,
) -> Result<Value> {
    let d = cfg.hidden_dim;
    let h = vb.layer_norm(g, q, "ln1", d, LN_EPS, true)?;
    let a = mha(g, &vb.pp("attn"), cfg, &h, ctx.unwrap_or(&h))?;
    let x = g.scoped(vb.prefix(), |g| g.add(q, &a));
    let h = vb.layer_norm(g, &x, "ln2", d, LN_EPS, true)?;
    let ff = vb.pp("ff");
    let h = ff.linear(g, &h, "fc1", d, 4 * d, true)?;
    let h = g.scoped(&format!("{}.gelu", ff.prefix()), |g| g.gelu_erf(&h));
    let h = ff.linear(g, &h, "fc2", 4 * d, d, true)?;
    Ok(g.scoped(vb.prefix(), |g| g.add(&x, &h)))
}

/// `nn.MultiheadAttention(d, heads, batch_first=True)`: the packed `in_proj_weight [3d, d]`
/// split into q, k, v; `softmax(QKᵀ/√dh)·V` per head; `out_proj`.
fn mha(
    g: &mut Graph,
    vb: &Scope,
    cfg: &Prompt2EffectConfig,
    x: &Value,
    ctx: &Value,
) -> Result<Value> {
    let d = cfg.hidden_dim;
    let (h, dh) = (cfg.n_heads as i64, (d / cfg.n_heads) as i64);
    let w = vb.weight(g, "in_proj_weight", &[3 * d, d])?;
    let b = vb.weight(g, "in_proj_bias", &[3 * d])?;
    let o = g.scoped(vb.prefix(), |g| {
        let [wq, wk, wv] = g.chunk::<3>(&w, d as i64, 0);
        let [bq, bk, bv] = g.chunk::<3>(&b, d as i64, 0);
        let proj = |g: &mut Graph, t: &Value, w: &Value, b: &Value| {
            let y = g.linear(t, w, Some(b), d as i64);
            g.reshape_to(&y, &[0, 0, h, dh])
        };
        let (q, k, v) = (
            proj(g, x, &wq, &bq),
            proj(g, ctx, &wk, &bk),
            proj(g, ctx, &wv, &bv),
        );
        sdpa(g, &q, &k, &v, dh, d)
    });
    vb.linear(g, &o, "out_proj", d, d, true)
}

/// The paper-size network over Wan2.1-I2V-14B's 5120×5120 attention weights: d 2048, 32
/// heads, 14 block pairs, 256 latents, rank 128, umT5-XXL text (4096), the reproduction's
/// 8 module types and 40 layer rows, 32-wide layer/module embeddings.
pub fn paper_config() -> serde_json::Value {
    let types = [
        "cross_attn.k",
        "cross_attn.o",
        "cross_attn.q",
        "cross_attn.v",
        "self_attn.k",
        "self_attn.o",
        "self_attn.q",
        "self_attn.v",
    ];
    serde_json::json!({
        "text_dim": 4096, "weight_dim": 5120, "hidden_dim": 2048, "n_heads": 32, "n_layer": 14,
        "rank": 128, "num_latents": 256, "module_specs": types, "max_layers": 40,
        "layer_embed_dim": 32, "module_embed_dim": 32,
    })
}

/// Every tensor of a checkpoint with this configuration, in upstream names.
pub fn checkpoint_layout(c: &Prompt2EffectConfig) -> Vec<(String, Vec<usize>)> {
    let (d, dd, r) = (c.hidden_dim, c.weight_dim, c.rank);
    let mut t: Vec<(String, Vec<usize>)> = vec![
        ("text_proj.proj.weight".into(), vec![d, c.text_dim]),
        ("text_proj.proj.bias".into(), vec![d]),
        ("text_proj.ln.weight".into(), vec![d]),
        ("text_proj.ln.bias".into(), vec![d]),
        ("col_enc.weight".into(), vec![d, dd]),
        ("col_enc.bias".into(), vec![d]),
        ("row_enc.weight".into(), vec![d, dd]),
        ("row_enc.bias".into(), vec![d]),
        ("latents".into(), vec![c.num_latents, d]),
        ("head_A.weight".into(), vec![r, d]),
        ("head_A.bias".into(), vec![r]),
        ("head_B.weight".into(), vec![r, d]),
        ("head_B.bias".into(), vec![r]),
    ];
    if c.include_emb {
        t.extend([
            (
                "layer_emb.weight".into(),
                vec![c.max_layers, c.layer_embed_dim],
            ),
            (
                "module_emb.weight".into(),
                vec![c.module_specs.len() + 1, c.module_embed_dim],
            ),
            (
                "cond_proj.weight".into(),
                vec![d, c.layer_embed_dim + c.module_embed_dim],
            ),
            ("cond_proj.bias".into(), vec![d]),
        ]);
    }
    let blocks = ["compressor".to_string(), "decompressor".to_string()]
        .into_iter()
        .chain((0..c.n_layer).flat_map(|k| [format!("proc_self.{k}"), format!("proc_cross.{k}")]));
    for b in blocks {
        for (name, shape) in [
            ("ln1.weight", vec![d]),
            ("ln1.bias", vec![d]),
            ("ln2.weight", vec![d]),
            ("ln2.bias", vec![d]),
            ("attn.in_proj_weight", vec![3 * d, d]),
            ("attn.in_proj_bias", vec![3 * d]),
            ("attn.out_proj.weight", vec![d, d]),
            ("attn.out_proj.bias", vec![d]),
            ("ff.fc1.weight", vec![4 * d, d]),
            ("ff.fc1.bias", vec![4 * d]),
            ("ff.fc2.weight", vec![d, 4 * d]),
            ("ff.fc2.bias", vec![d]),
        ] {
            t.push((format!("{b}.{name}"), shape));
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/wan-tiny/prompt2effect")
    }

    #[test]
    fn config_reads_upstream_module_specs_in_order() {
        let ck = Checkpoint::open_dir(&fixture()).unwrap();
        let ex = export(&ck).unwrap();
        assert!(ex.unused_keys.is_empty(), "{:?}", ex.unused_keys);
        let c = &ex.config;
        assert_eq!(c.module_id("cross_attn.k"), Some(1));
        assert_eq!(c.module_id("self_attn.v"), Some(8));
        assert_eq!(c.module_id("cross_attn.k_img"), None);
        assert_eq!((c.weight_dim, c.rank, c.hidden_dim), (24, 4, 40));
    }

    #[test]
    fn layout_is_the_fixture_checkpoint_and_the_paper_size_counts() {
        let ck = Checkpoint::open_dir(&fixture()).unwrap();
        let cfg: Prompt2EffectConfig =
            serde_json::from_value(ck.raw_config().unwrap().clone()).unwrap();
        let mut layout = checkpoint_layout(&cfg);
        layout.sort();
        let keys = ck.keys();
        assert_eq!(layout.len(), keys.len());
        for (name, shape) in &layout {
            assert!(ck.tensor(name, shape).is_ok(), "{name} {shape:?}");
        }
        // The reproduction's flags (d 2048, 14 blocks, D 5120, text 4096, r 128, n 256, 40
        // layers, 9 module ids) make 1.541 B parameters (counted by instantiating upstream).
        let paper: Prompt2EffectConfig = serde_json::from_value(paper_config()).unwrap();
        let n: usize = checkpoint_layout(&paper)
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum();
        assert_eq!(n / 1_000_000, 1541, "{n}");
    }
}
