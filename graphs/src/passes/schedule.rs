//! Carried outputs first: every frame-batch cache a VAE graph outputs (`cache_out.*`, the last
//! frames of a causal conv's padded input) is made an input of the conv that reads the same
//! padded tensor, so ONNX Runtime computes it before that conv instead of after the whole
//! decoder.
//!
//! Why: ONNX Runtime's default execution order is a reverse depth-first walk from the graph's
//! leaves, and a cache output is a leaf (nothing in the graph reads it). Its walk starts at
//! the last leaf, `sample`, so every cache slice ran after the final conv — and each held its
//! padded input, the largest tensor of its block, alive until then. On CogVideoX's real-width
//! decoder (9 frames at 128×192) that was 1.7 of the 2.2 GB of live activations at the peak.
//! ONNX Runtime's priority-based order avoids it, but its C API cannot select that order.
//!
//! The dependency is exact: the conv's bias becomes `bias + 0·Size(cache)`, and `Size` (an
//! element count, never infinite or NaN) only reads the cache's shape.

use std::collections::{BinaryHeap, HashMap, HashSet};

/// The name part of the nodes that tie a conv to a cache output.
pub(crate) const AFTER_CACHE: &str = "/after_cache/";

use super::edit::{node, Index};
use crate::dtype::DType;
use crate::proto::{self, ModelProto, NodeProto};

/// The name of the scalar zero initializer the dependencies multiply by.
const ZERO: &str = "v2l.schedule.zero";

/// Makes every graph output that nothing reads, taken from a tensor a biased `Conv` also reads,
/// an input of that conv's bias. Returns how many outputs were tied.
pub fn carried_outputs_first(model: &mut ModelProto) -> usize {
    let Some(graph) = model.graph.as_mut() else {
        return 0;
    };
    let ix = Index::new(graph);
    let nodes = &graph.node;
    // `name` is written by this node, seen through Identity renames.
    let source = |name: &str| -> Option<usize> {
        let mut i = *ix.producer.get(name)?;
        while let Some(n) = nodes.get(i).filter(|n| n.op_type == "Identity") {
            i = *ix.producer.get(n.input.first()?.as_str())?;
        }
        Some(i)
    };
    let mut ties: Vec<(usize, String)> = Vec::new();
    let mut tied_convs = HashSet::new();
    for out in &graph.output {
        if ix.consumers.contains_key(out.name.as_str()) {
            continue;
        }
        let Some(src) = source(&out.name) else {
            continue;
        };
        let Some(read) = nodes.get(src).and_then(|n| n.input.first()) else {
            continue;
        };
        let conv = ix.consumers.get(read.as_str()).and_then(|cs| {
            cs.iter().copied().find(|&c| {
                c != src
                    && nodes.get(c).is_some_and(|n| {
                        n.op_type == "Conv" && n.domain.is_empty() && n.input.len() == 3
                    })
            })
        });
        if let Some(c) = conv.filter(|c| tied_convs.insert(*c)) {
            ties.push((c, out.name.clone()));
        }
    }
    if ties.is_empty() {
        return 0;
    }
    let count = ties.len();
    let mut added: HashMap<usize, Vec<NodeProto>> = HashMap::new();
    for (c, out) in ties {
        let Some(conv) = graph.node.get_mut(c) else {
            continue;
        };
        let base = if conv.name.is_empty() {
            out.clone()
        } else {
            conv.name.clone()
        };
        let Some(bias) = conv.input.get_mut(2) else {
            continue;
        };
        let t = |s: &str| format!("{base}{AFTER_CACHE}{s}");
        let deps = vec![
            node("Size", t("Size"), &[&out], &t("n"), vec![]),
            node(
                "Cast",
                t("Cast"),
                &[&t("n")],
                &t("n_f32"),
                vec![super::edit::int_attr("to", DType::F32.onnx_code() as i64)],
            ),
            node("Mul", t("Mul"), &[&t("n_f32"), ZERO], &t("zero"), vec![]),
            node(
                "Add",
                t("Add"),
                &[bias.as_str(), &t("zero")],
                &t("bias"),
                vec![],
            ),
        ];
        *bias = t("bias");
        added.insert(c, deps);
    }
    graph.initializer.push(proto::TensorProto {
        dims: vec![],
        data_type: DType::F32.onnx_code(),
        name: ZERO.into(),
        raw_data: 0f32.to_le_bytes().to_vec(),
        ..Default::default()
    });
    // The new nodes go before their conv; the cache outputs they read may come later in the
    // file (the renaming Identity nodes are written last), so the graph is re-sorted.
    let old = std::mem::take(&mut graph.node);
    let mut with_deps = Vec::with_capacity(old.len() + 4 * count);
    for (i, n) in old.into_iter().enumerate() {
        with_deps.extend(added.remove(&i).unwrap_or_default());
        with_deps.push(n);
    }
    let known: HashSet<String> = graph
        .input
        .iter()
        .map(|v| v.name.clone())
        .chain(graph.initializer.iter().map(|t| t.name.clone()))
        .collect();
    graph.node = stable_topological(with_deps, &known);
    count
}

/// `nodes` in an order where every input is written before it is read, keeping the given order
/// wherever it already is one (Kahn's algorithm, lowest original position first). Inputs that
/// no node writes (graph inputs, initializers, outer-scope names, `""`) are ready from the start.
fn stable_topological(nodes: Vec<NodeProto>, known: &HashSet<String>) -> Vec<NodeProto> {
    let producer: HashMap<&str, usize> = nodes
        .iter()
        .enumerate()
        .flat_map(|(i, n)| n.output.iter().map(move |o| (o.as_str(), i)))
        .collect();
    let mut waiting = vec![0usize; nodes.len()];
    let mut readers: Vec<Vec<usize>> = vec![Vec::new(); nodes.len()];
    for (i, n) in nodes.iter().enumerate() {
        let deps: HashSet<usize> = n
            .input
            .iter()
            .filter(|x| !known.contains(x.as_str()))
            .filter_map(|x| producer.get(x.as_str()).copied())
            .filter(|&p| p != i)
            .collect();
        if let Some(w) = waiting.get_mut(i) {
            *w = deps.len();
        }
        for p in deps {
            if let Some(r) = readers.get_mut(p) {
                r.push(i);
            }
        }
    }
    let mut ready: BinaryHeap<std::cmp::Reverse<usize>> = waiting
        .iter()
        .enumerate()
        .filter(|(_, &w)| w == 0)
        .map(|(i, _)| std::cmp::Reverse(i))
        .collect();
    let mut order = Vec::with_capacity(nodes.len());
    while let Some(std::cmp::Reverse(i)) = ready.pop() {
        order.push(i);
        for &r in readers.get(i).map(Vec::as_slice).unwrap_or_default() {
            if let Some(w) = waiting.get_mut(r) {
                *w -= 1;
                if *w == 0 {
                    ready.push(std::cmp::Reverse(r));
                }
            }
        }
    }
    let mut slots: Vec<Option<NodeProto>> = nodes.into_iter().map(Some).collect();
    let mut sorted: Vec<NodeProto> = order
        .iter()
        .filter_map(|&i| slots.get_mut(i).and_then(Option::take))
        .collect();
    // A cycle cannot come from this pass; keep any leftover nodes rather than drop them.
    sorted.extend(slots.into_iter().flatten());
    sorted
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builder::{Attr, Graph};
    use crate::{save, ExternalData};

    fn model_of(g: &Graph) -> ModelProto {
        let d = tempfile::tempdir().expect("a temporary directory");
        let p = d.path().join("m.onnx");
        save(g, &p, ExternalData::Never).expect("written");
        crate::read_model(&p).expect("read back")
    }

    /// A causal conv as the VAE export writes it: the cache output is the padded input's tail.
    fn causal() -> ModelProto {
        let mut g = Graph::new("causal");
        let x = g.input(
            "x",
            DType::F32,
            vec![1.into(), 2.into(), 3.into(), 4.into(), 4.into()],
        );
        let w = g.const_f32(&[0.1; 2 * 2 * 27], &[2, 2, 3, 3, 3]);
        let b = g.const_f32(&[0.5, -0.5], &[2]);
        let x0 = g.slice(&x, 2, 0, 1);
        let padded = g.concat(&[&x0, &x0, &x], 2);
        let cache = g.slice(&padded, 2, -2, i64::MAX);
        let y = g.op(
            "Conv",
            &[&padded, &w, &b],
            vec![
                ("kernel_shape", Attr::Ints(vec![3, 3, 3])),
                ("pads", Attr::Ints(vec![0, 1, 1, 0, 1, 1])),
            ],
        );
        g.output(&y, "y", DType::F32, vec![]);
        g.output(&cache, "cache_out.conv", DType::F32, vec![]);
        model_of(&g)
    }

    #[test]
    fn the_cache_becomes_an_input_of_its_conv_and_the_graph_stays_sorted() {
        let mut m = causal();
        assert_eq!(carried_outputs_first(&mut m), 1);
        let g = m.graph.as_ref().expect("graph");
        let pos = |op: &str| g.node.iter().position(|n| n.op_type == op).expect(op);
        let conv = g.node.get(pos("Conv")).expect("conv");
        assert!(
            conv.input[2].ends_with("/after_cache/bias"),
            "{:?}",
            conv.input
        );
        assert!(pos("Size") < pos("Conv"));
        // Every input is written before it is read.
        let mut seen: HashSet<&str> = g.input.iter().map(|v| v.name.as_str()).collect();
        seen.extend(g.initializer.iter().map(|t| t.name.as_str()));
        for n in &g.node {
            for i in &n.input {
                assert!(
                    i.is_empty() || seen.contains(i.as_str()),
                    "{} reads {i} early",
                    n.name
                );
            }
            seen.extend(n.output.iter().map(String::as_str));
        }
        // Twice is the same as once: the cache is already read.
        assert_eq!(carried_outputs_first(&mut m), 0);
    }

    #[test]
    fn graphs_without_carried_outputs_are_left_alone() {
        let mut g = Graph::new("plain");
        let x = g.input("x", DType::F32, vec![2.into()]);
        let y = g.op("Relu", &[&x], vec![]);
        g.output(&y, "y", DType::F32, vec![]);
        let mut m = model_of(&g);
        let before = m.clone();
        assert_eq!(carried_outputs_first(&mut m), 0);
        assert_eq!(m, before);
    }
}
