//! Attention fusion: the exported `MatMul → Mul → Softmax → MatMul` becomes ONNX Runtime's
//! `com.microsoft.MultiHeadAttention`, whose CPU and CUDA kernels never materialise the
//! `[B, heads, S, S]` score matrix (flash-style tiling). At CogVideoX-5B width and 13 frames of
//! 480×720 the plain form needs ~24 GB for scores and probabilities; the fused one ~1 GB.
//!
//! The exporter keeps the plain, portable form (TensorRT's parser fuses it by itself); this
//! pass is what `v2l-compile` applies for ONNX Runtime backends. It matches exactly what
//! `v2l-export` emits for an attention block:
//!
//! ```text
//! q, k, v [B,S,H,Dh] ─ Transpose(q,0213), Transpose(k,0231), Transpose(v,0213)
//!   ─ MatMul(q,kᵀ) ─ Mul(scale) ─ Softmax(-1) ─ MatMul(·,v) ─ Transpose(0213) ─ Reshape([0,0,D])
//! ```
//!
//! and rewrites it as `Reshape([0,0,D])` (free) of each of q, k, v feeding
//! `MultiHeadAttention(q, k, v)`: no transposes left. All three go in as `[B,S,D]`: ONNX
//! Runtime 1.31's CPU kernel takes its flash path only then (key and value given as BNSH select
//! the unfused path, which allocates `B·heads·S²` probabilities: 12 GB at 5,626 tokens).

use std::collections::{HashMap, HashSet};

use super::edit::{attr_i, attr_ints, i64_values as i64s};
use super::edit::{PassError, MS_DOMAIN, V2L_DOMAIN};
use crate::builder::Attr;
use crate::proto::{ModelProto, NodeProto};

/// One matched attention: node indices and the tensors the fused node needs.
struct Match {
    remove: [usize; 8],
    reshape: usize,
    q: String,
    k: String,
    v: String,
    scale: f32,
    shape: String,
}

/// Rewrites every attention of the pattern above; returns how many were fused.
///
/// `num_heads` is the model's head count (the exported graph's shapes are dynamic, so it
/// comes from the checkpoint config). A pattern whose `Reshape` target is not a multiple of
/// `num_heads` is left alone.
pub fn fuse_attention(model: &mut ModelProto, num_heads: i64) -> usize {
    let Some(graph) = model.graph.as_mut() else {
        return 0;
    };
    let ix = super::edit::Index::new(graph);
    let (inits, producer, consumers) = (&ix.inits, &ix.producer, &ix.consumers);
    let nodes = &graph.node;
    let op = |i: usize, t: &str| {
        nodes
            .get(i)
            .filter(|n| n.op_type == t && n.domain.is_empty())
    };
    let from = |name: &str, t: &str| {
        producer
            .get(name)
            .copied()
            .and_then(|i| op(i, t).map(|n| (i, n)))
    };
    let only_use = |name: &str, t: &str| match consumers.get(name).map(Vec::as_slice) {
        Some([i]) => op(*i, t).map(|n| (*i, n)),
        _ => None,
    };
    let mut found = Vec::new();
    for (si, s) in nodes.iter().enumerate() {
        if op(si, "Softmax").is_none() || attr_i(s, "axis") != Some(-1) {
            continue;
        }
        let m = (|| {
            let (mi, mul) = from(s.input.first()?, "Mul")?;
            only_use(mul.output.first()?, "Softmax")?;
            // Mul(scores, scale) with the scale a scalar initializer.
            let (scores, scale_init) = match (
                inits.get(mul.input.get(1)?.as_str()),
                inits.get(mul.input.first()?.as_str()),
            ) {
                (Some(t), _) => (mul.input.first()?, t),
                (None, Some(t)) => (mul.input.get(1)?, t),
                _ => return None,
            };
            let scale = super::edit::scalar_f32(scale_init)?;
            let (qi, qk) = from(scores, "MatMul")?;
            only_use(qk.output.first()?, "Mul")?;
            // Each of q, kᵀ, v is a Transpose (read only here) of a `[B,S,H,Dh]` tensor.
            let head_major = |name: &str, perm: &[i64]| {
                let (i, t) = from(name, "Transpose")?;
                only_use(t.output.first()?, "MatMul")?;
                (attr_ints(t, "perm") == Some(perm)).then(|| (i, t.input.first().cloned()))
            };
            let (tq, q) = head_major(qk.input.first()?, &[0, 2, 1, 3])?;
            let (tk, k) = head_major(qk.input.get(1)?, &[0, 2, 3, 1])?;
            let (pi, pv) = only_use(s.output.first()?, "MatMul")?;
            if pv.input.first() != s.output.first() {
                return None;
            }
            let (tv, v) = head_major(pv.input.get(1)?, &[0, 2, 1, 3])?;
            let (oi, ot) = only_use(pv.output.first()?, "Transpose")?;
            if attr_ints(ot, "perm") != Some(&[0, 2, 1, 3]) {
                return None;
            }
            let (ri, r) = only_use(ot.output.first()?, "Reshape")?;
            let shape = r.input.get(1)?;
            let target = i64s(inits.get(shape.as_str())?);
            if !matches!(target.as_slice(), [0, 0, d] if *d > 0 && d % num_heads == 0) {
                return None;
            }
            Some(Match {
                remove: [tq, tk, tv, qi, mi, si, pi, oi],
                reshape: ri,
                q: q?,
                k: k?,
                v: v?,
                scale,
                shape: shape.clone(),
            })
        })();
        found.extend(m);
    }
    if found.is_empty() {
        return 0;
    }
    let count = found.len();
    let mut removed: HashSet<usize> = HashSet::new();
    let mut replace: HashMap<usize, Vec<NodeProto>> = HashMap::new();
    for m in found {
        removed.extend(m.remove);
        let Some(r) = graph.node.get(m.reshape) else {
            continue;
        };
        // Named after the Reshape it replaces: unique even where one module scope holds two
        // attentions (Wan I2V's `attn2` attends to the text and to the image tokens).
        let base = r.name.clone();
        let node =
            |op: &str, name: String, input: Vec<String>, output: String, attribute| NodeProto {
                input,
                output: vec![output],
                name,
                op_type: op.into(),
                attribute,
                ..Default::default()
            };
        // [B,S,H,Dh] -> [B,S,D] for each of q, k, v (no data movement).
        let mut new = Vec::with_capacity(4);
        let mut bsd = Vec::with_capacity(3);
        for (t, x) in [("query", m.q), ("key", m.k), ("value", m.v)] {
            let out = format!("{base}/mha_{t}:0");
            new.push(node(
                "Reshape",
                format!("{base}/mha_{t}_reshape"),
                vec![x, m.shape.clone()],
                out.clone(),
                vec![],
            ));
            bsd.push(out);
        }
        let mut mha = node(
            "MultiHeadAttention",
            format!("{base}/MultiHeadAttention"),
            bsd,
            r.output.first().cloned().unwrap_or_default(),
            vec![
                crate::builder::attr_proto("num_heads", Attr::Int(num_heads)),
                crate::builder::attr_proto("scale", Attr::Float(m.scale)),
            ],
        );
        mha.domain = MS_DOMAIN.into();
        new.push(mha);
        replace.insert(m.reshape, new);
    }
    // The scale constants are now attributes and get dropped.
    super::edit::splice(model, &removed, replace);
    count
}

/// ONNX's own `Attention` (opset 23) for every fused `MultiHeadAttention(q, k, v)`: the same
/// `[B,S,D]` inputs, `q_num_heads` = `kv_num_heads` = its heads, its scale; the graph moves to
/// opset 23 ([`super::opset::upgrade_opset`]). Why: read in ONNX Runtime's source near 1.31, its CUDA
/// `Attention` runs flash attention on bf16 itself (flash for any 16-bit type, then
/// memory-efficient, then unfused), where its `MultiHeadAttention` gives bf16 the
/// memory-efficient kernel only, which is why a bf16 cuda engine casts its attention to fp16
/// ([`super::precision::Lowering::half_attention`]). Not used by `v2l-compile` yet: at opset 23 a DiT's
/// `Flatten`s (schema 23) and its timestep embedding's `Sin` and `Cos` (schema 22) have no
/// CUDA kernel in ONNX Runtime 1.31.1's table (`crate::placement`), so those must be rewritten
/// first. Returns how many moved; a graph whose other operators cannot move to opset 23 is
/// refused, unchanged.
pub fn onnx_attention(model: &mut ModelProto) -> Result<usize, PassError> {
    // Checks every node before it changes any: a refused model is left as it was.
    super::opset::upgrade_opset(model, 23)?;
    let Some(graph) = model.graph.as_mut() else {
        return Ok(0);
    };
    let mut moved = 0;
    for n in graph.node.iter_mut() {
        if n.op_type != "MultiHeadAttention" || n.domain != MS_DOMAIN || n.input.len() != 3 {
            continue;
        }
        let heads = attr_i(n, "num_heads").ok_or_else(|| {
            PassError::Unsupported(format!("{}: MultiHeadAttention without num_heads", n.name))
        })?;
        let scale = n.attribute.iter().find(|a| a.name == "scale").cloned();
        let base = n.name.trim_end_matches("/MultiHeadAttention").to_string();
        n.op_type = "Attention".into();
        n.domain = String::new();
        n.name = format!("{base}/Attention");
        n.attribute = vec![
            crate::builder::attr_proto("q_num_heads", Attr::Int(heads)),
            crate::builder::attr_proto("kv_num_heads", Attr::Int(heads)),
        ];
        n.attribute.extend(scale);
        moved += 1;
    }
    Ok(moved)
}

/// v2l's own attention operator (the runtime's `attention` module): its op name in
/// [`V2L_DOMAIN`].
pub const V2L_ATTENTION: &str = "Attention";

/// Moves every fused `MultiHeadAttention(q, k, v)` onto v2l's `ai.v2l.Attention`, which takes
/// the same inputs and attributes (`num_heads`, `scale`) and runs bf16 products on CPUs with
/// AVX512-BF16. Returns how many moved. Only for CPU graphs below fp32: a custom operator
/// exists only where the v2l runtime registers it.
pub fn v2l_attention(model: &mut ModelProto, int8_scores: bool) -> usize {
    let Some(graph) = model.graph.as_mut() else {
        return 0;
    };
    let mut moved = 0;
    for n in graph.node.iter_mut() {
        if n.op_type == "MultiHeadAttention" && n.domain == MS_DOMAIN && n.input.len() == 3 {
            let base = n.name.trim_end_matches("/MultiHeadAttention").to_string();
            n.op_type = V2L_ATTENTION.into();
            n.domain = V2L_DOMAIN.into();
            n.name = format!("{base}/{V2L_ATTENTION}");
            n.attribute
                .retain(|a| a.name == "num_heads" || a.name == "scale");
            if int8_scores {
                // Read by the operator: q·kᵀ in int8 where the CPU has AVX512-VNNI.
                n.attribute.push(crate::builder::attr_proto(
                    "scores",
                    crate::builder::Attr::Str("int8".into()),
                ));
            }
            moved += 1;
        }
    }
    if moved > 0 {
        super::edit::import_domain(model, V2L_DOMAIN);
    }
    moved
}
