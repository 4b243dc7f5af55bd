//! GroupNorm's mean square on the GPU: `ReduceSumSquare` over each row divided by the row's
//! length, instead of squaring the centred activation into a tensor of its own and averaging it.
//!
//! The exporter computes a GroupNorm's variance in two levels (`v2l_export`'s `group_stats`: the
//! mean of each row of `H·W` elements, then the mean of the rows), which keeps the CPU's
//! sequential f32 sums within 1e-6 of PyTorch. On the GPU every reduction is a tree, and the
//! separate square costs an f32 tensor the size of the activation, written and read again: 8 of
//! the 56 bytes an element a bf16 VAE's norm (and SiLU) moves, at 480×720 about 85 GB over a
//! decode. Matched in a `group_norm` scope only, on the exported form:
//!
//! ```text
//! xg = Reshape(x, Concat([0, G, -1], hw))   d = Sub(xg, mean)
//! Mul(d, d) → ReduceMean(axes=[3])          ⇒   ReduceSumSquare(d, axes=[3]) / Cast(hw)
//! ```
//!
//! The new nodes keep the scope, so they stay f32 below f32. `hw` is the row length the
//! exporter already computed for the reshape (shape arithmetic, on the CPU in ONNX Runtime).

use std::collections::HashSet;

use super::edit::{attr_ints, int_attr, node, Index};
use super::precision::GROUP_NORM_SCOPE;
use crate::dtype::DType;
use crate::proto::{ModelProto, NodeProto};

/// Rewrites the mean square of every GroupNorm of the exported form; returns how many.
pub fn group_norm_square_sums(model: &mut ModelProto) -> usize {
    let Some(graph) = model.graph.as_mut() else {
        return 0;
    };
    let ix = Index::new(graph);
    let outputs: HashSet<&str> = graph.output.iter().map(|o| o.name.as_str()).collect();
    let reads = |name: &str| {
        ix.consumers.get(name).map_or(0, Vec::len) + usize::from(outputs.contains(name))
    };
    let nodes = &graph.node;
    let made = |name: &str, op: &str| -> Option<&NodeProto> {
        let n = nodes.get(*ix.producer.get(name)?)?;
        (n.op_type == op && n.domain.is_empty()).then_some(n)
    };
    let mut replaced: Vec<(usize, usize, Vec<NodeProto>)> = Vec::new();
    for (ri, mean_sq) in nodes.iter().enumerate() {
        let Some((scope, tail)) = mean_sq.name.rsplit_once('/') else {
            continue;
        };
        let in_scope = scope.rsplit('.').next() == Some(GROUP_NORM_SCOPE);
        let rows_last = attr_ints(mean_sq, "axes") == Some(&[3][..]);
        if mean_sq.op_type != "ReduceMean" || !mean_sq.domain.is_empty() || !in_scope || !rows_last
        {
            continue;
        }
        let m = (|| {
            let squared = mean_sq.input.first()?;
            let mi = *ix.producer.get(squared.as_str())?;
            let mul = nodes
                .get(mi)
                .filter(|n| n.op_type == "Mul" && n.domain.is_empty())?;
            let (d, d_again) = (mul.input.first()?, mul.input.get(1)?);
            if d != d_again || reads(squared) != 1 {
                return None;
            }
            let xg = made(d, "Sub")?.input.first()?;
            let shape = made(xg, "Reshape")?.input.get(1)?;
            let concat = made(shape, "Concat")?;
            let hw = concat.input.get(1).filter(|_| concat.input.len() == 2)?;
            let name = |what: &str| format!("{scope}/{what}_{tail}");
            let (sum, count) = (name("SquareSum"), name("RowCount"));
            let keepdims = mean_sq.attribute.iter().filter(|a| a.name == "keepdims");
            let new = vec![
                node(
                    "ReduceSumSquare",
                    sum.clone(),
                    &[d],
                    &format!("{sum}:0"),
                    std::iter::once(axes_attr())
                        .chain(keepdims.cloned())
                        .collect(),
                ),
                node(
                    "Cast",
                    count.clone(),
                    &[hw],
                    &format!("{count}:0"),
                    vec![int_attr("to", i64::from(DType::F32.onnx_code()))],
                ),
                node(
                    "Div",
                    name("MeanSquare"),
                    &[&format!("{sum}:0"), &format!("{count}:0")],
                    mean_sq.output.first()?,
                    vec![],
                ),
            ];
            Some((mi, ri, new))
        })();
        replaced.extend(m);
    }
    let n = replaced.len();
    let removed: HashSet<usize> = replaced.iter().map(|(mi, _, _)| *mi).collect();
    let mut at: std::collections::HashMap<usize, Vec<NodeProto>> =
        replaced.into_iter().map(|(_, ri, new)| (ri, new)).collect();
    let old = std::mem::take(&mut graph.node);
    for (i, n) in old.into_iter().enumerate() {
        match at.remove(&i) {
            Some(new) => graph.node.extend(new),
            None if removed.contains(&i) => {}
            None => graph.node.push(n),
        }
    }
    n
}

/// `axes = [3]`: the rows' last axis, as the replaced `ReduceMean` had it.
fn axes_attr() -> crate::proto::AttributeProto {
    crate::builder::attr_proto("axes", crate::builder::Attr::Ints(vec![3]))
}
