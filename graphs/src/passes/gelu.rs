//! GELU fusion: the exported tanh-approximated GELU (nine elementwise nodes, each writing a
//! tensor the size of the feed-forward activation) becomes one `com.microsoft.FastGelu`, the
//! same formula in one pass over memory. At CogVideoX-5B width the nine nodes cost ~0.6 s of a
//! 5 s block step at 1,378 tokens (first-touch of eight 135 MB intermediates); the fused op ~30 ms.
//!
//! Matches what `Graph::gelu_tanh` emits, `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`, and
//! the `x·x·x` cube it wrote before 2026-11-28:
//!
//! ```text
//! Pow(x,3) → Mul(·,c) → Add(x,·) → Mul(·,k) → Tanh → Add(·,1) ─┐
//! Mul(x,0.5) ────────────────────────────────────────────────── Mul → y
//! ```
//!
//! Graphs no pass rewrites (the T5 and umT5 text encoders) get the same `FastGelu` from ONNX
//! Runtime's own `FastGeluFusion`, which matches the `Pow` spelling (torch's) and not `x·x·x`.

use std::collections::{HashMap, HashSet};

use super::edit::MS_DOMAIN;
use crate::proto::{self, ModelProto, NodeProto};

fn scalar(inits: &HashMap<&str, &proto::TensorProto>, name: &str) -> Option<f32> {
    super::edit::scalar_f32(inits.get(name)?)
}

/// Rewrites every tanh-GELU of the exported form; returns how many were fused.
pub fn fuse_gelu(model: &mut ModelProto) -> usize {
    let Some(graph) = model.graph.as_mut() else {
        return 0;
    };
    let ix = super::edit::Index::new(graph);
    let (inits, producer) = (&ix.inits, &ix.producer);
    let reads = |name: &str| ix.consumers.get(name).map_or(0, Vec::len);
    let nodes = &graph.node;
    let near = |v: Option<f32>, want: f32| v.is_some_and(|v| (v - want).abs() <= 1e-6 * want.abs());
    // The producer of `name` if it is a default-domain `op` whose output nothing else reads.
    let inner = |name: &str, op: &str| -> Option<(usize, &NodeProto)> {
        let i = *producer.get(name)?;
        let n = nodes.get(i)?;
        (n.op_type == op && n.domain.is_empty() && reads(name) == 1).then_some((i, n))
    };
    // Splits a binary node's inputs into (the non-constant one, the scalar constant).
    let with_const = |n: &NodeProto| -> Option<(String, Option<f32>)> {
        let (a, b) = (n.input.first()?, n.input.get(1)?);
        match (scalar(inits, a), scalar(inits, b)) {
            (None, c @ Some(_)) => Some((a.clone(), c)),
            (c @ Some(_), None) => Some((b.clone(), c)),
            _ => None,
        }
    };
    let k = (2.0f64 / std::f64::consts::PI).sqrt() as f32;
    let mut fused: Vec<(usize, Vec<usize>, String, String)> = Vec::new();
    for (yi, y) in nodes.iter().enumerate() {
        if y.op_type != "Mul" || !y.domain.is_empty() || y.input.len() != 2 {
            continue;
        }
        let m = (|| {
            // One side is x·0.5, the other 1 + tanh(...).
            let (in0, in1) = (y.input.first()?, y.input.get(1)?);
            let (hi, h, ti, t1) = match (inner(in0, "Mul"), inner(in1, "Add")) {
                (Some(h), Some(t)) => (h.0, h.1, t.0, t.1),
                _ => match (inner(in1, "Mul"), inner(in0, "Add")) {
                    (Some(h), Some(t)) => (h.0, h.1, t.0, t.1),
                    _ => return None,
                },
            };
            let (x, half) = with_const(h)?;
            let (tanh_out, one) = with_const(t1)?;
            if !near(half, 0.5) || !near(one, 1.0) {
                return None;
            }
            let (tni, tn) = inner(&tanh_out, "Tanh")?;
            let (ki, km) = inner(tn.input.first()?, "Mul")?;
            let (sum, kc) = with_const(km)?;
            if !near(kc, k) {
                return None;
            }
            // The operand of binary `n` beside `x`.
            let beside_x = |n: &NodeProto| match (n.input.first(), n.input.get(1)) {
                (Some(a), Some(b)) if *a == x => Some(b.clone()),
                (Some(a), Some(b)) if *b == x => Some(a.clone()),
                _ => None,
            };
            let (ai, add) = inner(&sum, "Add")?;
            let cx3 = beside_x(add)?;
            let (ci, cm) = inner(&cx3, "Mul")?;
            let (x3, c) = with_const(cm)?;
            if !near(c, 0.044715) {
                return None;
            }
            let mut gone = vec![hi, ti, tni, ki, ai, ci];
            // `Pow(x, 3)` as exported, or `x·x·x` as graphs exported before 2026-11-28 wrote it.
            if let Some((pi, pow)) = inner(&x3, "Pow") {
                let three = pow.input.get(1).and_then(|e| scalar(inits, e));
                if pow.input.first() != Some(&x) || !near(three, 3.0) {
                    return None;
                }
                gone.push(pi);
            } else {
                let (x3i, x3n) = inner(&x3, "Mul")?;
                let x2 = beside_x(x3n)?;
                let (x2i, x2n) = inner(&x2, "Mul")?;
                if x2n.input.iter().any(|i| *i != x) {
                    return None;
                }
                gone.extend([x3i, x2i]);
            }
            Some((yi, gone, x, y.output.first()?.clone()))
        })();
        fused.extend(m);
    }
    if fused.is_empty() {
        return 0;
    }
    let count = fused.len();
    let removed: HashSet<usize> = fused.iter().flat_map(|f| f.1.iter().copied()).collect();
    let mut replace: HashMap<usize, Vec<NodeProto>> = HashMap::new();
    for (yi, _, x, out) in fused {
        let name = graph
            .node
            .get(yi)
            .map(|n| n.name.as_str())
            .unwrap_or("gelu");
        let base = name.rsplit_once('/').map(|(p, _)| p).unwrap_or(name);
        replace.insert(
            yi,
            vec![NodeProto {
                input: vec![x],
                output: vec![out],
                name: format!("{base}/FastGelu"),
                op_type: "FastGelu".into(),
                domain: MS_DOMAIN.into(),
                ..Default::default()
            }],
        );
    }
    super::edit::splice(model, &removed, replace);
    count
}

/// Moves the bias of the linear feeding each `FastGelu` into the `FastGelu` (its second
/// input): `Gemm(x, W, b) → Reshape → FastGelu` becomes `Gemm(x, W) → Reshape → FastGelu(·, b)`,
/// the same sum. ONNX Runtime's CUDA `Gemm` adds a bias by first writing it across the whole
/// output (a rank-1 product) and then accumulating onto it (`beta` 1): a write and a read of
/// the feed-forward's widest activation that `FastGelu` does in its one pass. Below f32 the
/// bias is added in the GELU's type (f32 in fp16 engines, fp16 in bf16 ones:
/// `Lowering::half_gelu`) instead of being rounded into the product's type. Returns how many
/// moved.
///
/// Matched only where the sum is the same by construction: a plain `Gemm` (`alpha`, `beta` 1)
/// with a 1-D bias of its output width, read by one `Reshape` whose target keeps that width
/// last (a constant, or a `Concat` ending in one), read by one single-input `FastGelu`.
pub fn fuse_gelu_bias(model: &mut ModelProto) -> usize {
    let Some(graph) = model.graph.as_mut() else {
        return 0;
    };
    let ix = super::edit::Index::new(graph);
    let via_cast = super::edit::cast_initializers(graph);
    let nodes = &graph.node;
    let only_reader = |name: &str| -> Option<usize> {
        match ix.consumers.get(name).map(Vec::as_slice) {
            Some([i]) => Some(*i),
            _ => None,
        }
    };
    // The width a Reshape's target ends in, where it is a constant.
    let last_width = |shape: &str| -> Option<i64> {
        if let Some(t) = ix.inits.get(shape) {
            return super::edit::i64_values(t).last().copied();
        }
        let c = nodes.get(*ix.producer.get(shape)?)?;
        if c.op_type != "Concat" || !c.domain.is_empty() {
            return None;
        }
        super::edit::i64_values(ix.inits.get(c.input.last()?.as_str())?)
            .last()
            .copied()
    };
    let unit = |n: &NodeProto, attr: &str| {
        n.attribute
            .iter()
            .find(|a| a.name == attr)
            .is_none_or(|a| a.f == 1.0)
    };
    // (gemm index, gelu index, bias tensor)
    let mut moved: Vec<(usize, usize, String)> = Vec::new();
    for (gi, gelu) in nodes.iter().enumerate() {
        if gelu.op_type != "FastGelu" || gelu.domain != MS_DOMAIN || gelu.input.len() != 1 {
            continue;
        }
        let m = (|| {
            let r = nodes.get(*ix.producer.get(gelu.input.first()?.as_str())?)?;
            if r.op_type != "Reshape" || !r.domain.is_empty() {
                return None;
            }
            only_reader(r.output.first()?)?;
            let mi = *ix.producer.get(r.input.first()?.as_str())?;
            let g = nodes.get(mi)?;
            if g.op_type != "Gemm" || !g.domain.is_empty() || !unit(g, "alpha") || !unit(g, "beta")
            {
                return None;
            }
            only_reader(g.output.first()?)?;
            let bias = g.input.get(2)?;
            let init = match via_cast.get(bias.as_str()) {
                Some((_, w)) => *w,
                None => bias.as_str(),
            };
            let width = match ix.inits.get(init)?.dims.as_slice() {
                [n] => *n,
                _ => return None,
            };
            (last_width(r.input.get(1)?)? == width).then(|| (mi, gi, bias.clone()))
        })();
        moved.extend(m);
    }
    let count = moved.len();
    for (mi, gi, bias) in moved {
        if let Some(g) = graph.node.get_mut(mi) {
            g.input.truncate(2);
        }
        if let Some(f) = graph.node.get_mut(gi) {
            f.input.push(bias);
        }
    }
    count
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::saved_model as model;
    use crate::{DType, Graph};

    fn ops(m: &ModelProto) -> Vec<&str> {
        let g = m.graph.as_ref().unwrap();
        g.node.iter().map(|n| n.op_type.as_str()).collect()
    }

    /// `gelu_tanh` of one input, its cube as the builder writes it (`Pow`) or as it wrote it
    /// before (`x·x·x`).
    fn gelu(pow: bool) -> ModelProto {
        let mut g = Graph::new("t");
        let x = g.input("x", DType::F32, vec!["n".into(), 8.into()]);
        let y = match pow {
            true => g.gelu_tanh(&x),
            false => {
                let c = g.scalar(0.044715);
                let k = g.scalar((2.0f64 / std::f64::consts::PI).sqrt() as f32);
                let (half, one) = (g.scalar(0.5), g.scalar(1.0));
                let x2 = g.mul(&x, &x);
                let x3 = g.mul(&x2, &x);
                let cx3 = g.mul(&x3, &c);
                let inner = g.add(&x, &cx3);
                let inner = g.mul(&inner, &k);
                let t = g.op("Tanh", &[&inner], vec![]);
                let t1 = g.add(&t, &one);
                let hx = g.mul(&x, &half);
                g.mul(&hx, &t1)
            }
        };
        g.output(&y, "y", DType::F32, vec!["n".into(), 8.into()]);
        model(&g)
    }

    #[test]
    fn fuses_either_spelling_of_the_cube() {
        for pow in [true, false] {
            let mut m = gelu(pow);
            assert_eq!(ops(&m).contains(&"Pow"), pow);
            assert_eq!(fuse_gelu(&mut m), 1, "pow {pow}");
            // The builder names the output through an `Identity`.
            let left: Vec<_> = ops(&m).into_iter().filter(|&o| o != "Identity").collect();
            assert_eq!(left, ["FastGelu"], "pow {pow}");
            let g = m.graph.as_ref().unwrap();
            let fast = g.node.iter().find(|n| n.op_type == "FastGelu").unwrap();
            assert_eq!(fast.input, ["x"]);
        }
    }

    #[test]
    fn leaves_a_power_other_than_the_cube() {
        let mut m = gelu(true);
        let g = m.graph.as_mut().unwrap();
        let pow = g.node.iter().find(|n| n.op_type == "Pow").unwrap();
        let e = pow.input[1].clone();
        let t = g.initializer.iter_mut().find(|t| t.name == e).unwrap();
        t.raw_data = 2.0f32.to_le_bytes().to_vec();
        t.float_data.clear();
        assert_eq!(fuse_gelu(&mut m), 0);
    }
}
