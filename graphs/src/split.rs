//! Cutting a model into consecutive parts at named values.
//!
//! Step caching runs a DiT's first block on every call but its other blocks only when the first
//! block's output moved enough: the DiT must run as separate graphs (head, blocks, output).
//! [`split`] makes them from any compiled DiT graph, whatever its precision or LoRA strategy:
//! part `k` computes what the `k`-th cut needs and has not been computed before; a value one
//! part computes and a later part reads leaves the one as an output and enters the other as
//! an input. Initializers go with the nodes that read them, their data untouched (external data
//! keeps its location, so the parts read the original weight files).

use std::collections::{BTreeSet, HashMap, HashSet};

use crate::proto::{GraphProto, ModelProto, NodeProto, ValueInfoProto};

/// Why a model cannot be cut where asked.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SplitError {
    #[error("the model has no graph")]
    NoGraph,
    #[error("no node computes the cut value `{0}`")]
    NotComputed(String),
    #[error("the type of `{0}`, which crosses a cut, is unknown")]
    UnknownType(String),
    #[error("the graph output `{0}` is computed before the last cut")]
    EarlyOutput(String),
}

/// Cuts `model` into `cuts.len() + 1` parts. Part `k < cuts.len()` outputs the values of
/// `cuts[k]`, in order, then the values later parts read from it; the last part outputs the
/// model's outputs. Nodes the outputs do not need are left out.
pub fn split(model: &ModelProto, cuts: &[Vec<String>]) -> Result<Vec<ModelProto>, SplitError> {
    let graph = model.graph.as_ref().ok_or(SplitError::NoGraph)?;
    // What each node reads: its inputs, and the outer values its subgraphs (Scan, Loop, If)
    // name without defining them.
    let node_reads: Vec<Vec<String>> = graph.node.iter().map(reads_of).collect();
    let producer: HashMap<&str, usize> = graph
        .node
        .iter()
        .enumerate()
        .flat_map(|(i, n)| n.output.iter().map(move |o| (o.as_str(), i)))
        .collect();
    // Which part each node belongs to: the first whose targets need it.
    let mut part_of: Vec<Option<usize>> = vec![None; graph.node.len()];
    let outputs: Vec<String> = graph.output.iter().map(|o| o.name.clone()).collect();
    let targets: Vec<&[String]> = cuts
        .iter()
        .map(Vec::as_slice)
        .chain([outputs.as_slice()])
        .collect();
    for (k, wanted) in targets.iter().enumerate() {
        let mut stack: Vec<usize> = Vec::new();
        for name in wanted.iter() {
            match producer.get(name.as_str()) {
                Some(&i) => stack.push(i),
                None if k == cuts.len() => {} // a graph output that is an input or initializer
                None => return Err(SplitError::NotComputed(name.clone())),
            }
        }
        while let Some(i) = stack.pop() {
            let (Some(slot), Some(node)) = (part_of.get_mut(i), graph.node.get(i)) else {
                continue;
            };
            if slot.is_some() {
                continue;
            }
            *slot = Some(k);
            let reads = node_reads.get(i).unwrap_or(&node.input);
            stack.extend(reads.iter().filter_map(|x| producer.get(x.as_str())));
        }
    }
    for name in &outputs {
        if let Some(&i) = producer.get(name.as_str()) {
            if part_of.get(i).copied().flatten() != Some(cuts.len()) {
                return Err(SplitError::EarlyOutput(name.clone()));
            }
        }
    }

    let types = crate::check::infer_types(graph);
    let graph_inputs: HashMap<&str, &ValueInfoProto> =
        graph.input.iter().map(|i| (i.name.as_str(), i)).collect();
    let initializers: HashSet<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
    let value_info = |name: &str| -> Result<ValueInfoProto, SplitError> {
        match graph_inputs.get(name) {
            Some(v) => Ok((*v).clone()),
            None => types
                .get(name)
                .map(|&d| ValueInfoProto::of_type(name, d))
                .ok_or_else(|| SplitError::UnknownType(name.to_string())),
        }
    };
    // What each part reads from outside itself (graph inputs or earlier parts), in node order.
    let parts = targets.len();
    let mut reads: Vec<Vec<String>> = vec![Vec::new(); parts];
    for (k, reads) in reads.iter_mut().enumerate() {
        let mut seen = HashSet::new();
        let own: HashSet<&str> = nodes_of(graph, &part_of, k)
            .flat_map(|(_, n)| n.output.iter().map(String::as_str))
            .collect();
        for (i, _) in nodes_of(graph, &part_of, k) {
            for input in node_reads.get(i).into_iter().flatten() {
                let name = input.as_str();
                if name.is_empty() || own.contains(name) || initializers.contains(name) {
                    continue;
                }
                if seen.insert(name) {
                    reads.push(name.to_string());
                }
            }
        }
    }
    let made_in = |name: &str| {
        producer
            .get(name)
            .and_then(|&i| part_of.get(i).copied().flatten())
    };
    let mut out = Vec::with_capacity(parts);
    for (k, (wanted, own_reads)) in targets.iter().zip(&reads).enumerate() {
        let mut names: Vec<String> = wanted.to_vec();
        let mut listed: BTreeSet<String> = names.iter().cloned().collect();
        for later in reads.iter().skip(k + 1) {
            for name in later {
                if made_in(name) == Some(k) && listed.insert(name.clone()) {
                    names.push(name.clone());
                }
            }
        }
        let used: HashSet<&str> = nodes_of(graph, &part_of, k)
            .flat_map(|(i, _)| node_reads.get(i).into_iter().flatten())
            .map(String::as_str)
            .collect();
        let nodes: Vec<NodeProto> = nodes_of(graph, &part_of, k)
            .map(|(_, n)| n.clone())
            .collect();
        let part = GraphProto {
            name: format!("{}.part{k}", graph.name),
            initializer: graph
                .initializer
                .iter()
                .filter(|t| used.contains(t.name.as_str()))
                .cloned()
                .collect(),
            input: own_reads
                .iter()
                .map(|n| value_info(n))
                .collect::<Result<_, _>>()?,
            output: match k == cuts.len() {
                true => graph.output.clone(),
                false => names
                    .iter()
                    .map(|n| value_info(n))
                    .collect::<Result<_, _>>()?,
            },
            node: nodes,
            doc_string: String::new(),
            value_info: Vec::new(),
        };
        out.push(ModelProto {
            graph: Some(part),
            ..model.clone_without_graph()
        });
    }
    Ok(out)
}

/// Part `k`'s nodes with their indices, in graph order.
fn nodes_of<'g>(
    graph: &'g GraphProto,
    part_of: &'g [Option<usize>],
    k: usize,
) -> impl Iterator<Item = (usize, &'g NodeProto)> + 'g {
    graph
        .node
        .iter()
        .enumerate()
        .zip(part_of)
        .filter(move |(_, p)| **p == Some(k))
        .map(|(n, _)| n)
}

/// The values `node` reads from its graph: its inputs, then the names its subgraphs use but
/// do not define (ONNX's outer-scope references).
fn reads_of(node: &NodeProto) -> Vec<String> {
    let mut reads = node.input.clone();
    for g in node.attribute.iter().filter_map(|a| a.g.as_deref()) {
        outer_names(g, &mut reads);
    }
    reads
}

fn outer_names(g: &GraphProto, out: &mut Vec<String>) {
    let mut defined: HashSet<&str> = g
        .input
        .iter()
        .map(|i| i.name.as_str())
        .chain(g.initializer.iter().map(|t| t.name.as_str()))
        .collect();
    for n in &g.node {
        for name in reads_of(n) {
            if !name.is_empty() && !defined.contains(name.as_str()) && !out.contains(&name) {
                out.push(name);
            }
        }
        defined.extend(n.output.iter().map(String::as_str));
    }
}

impl ModelProto {
    /// Everything but the graph (opsets, producer, metadata).
    fn clone_without_graph(&self) -> ModelProto {
        ModelProto {
            ir_version: self.ir_version,
            opset_import: self.opset_import.clone(),
            producer_name: self.producer_name.clone(),
            producer_version: self.producer_version.clone(),
            domain: self.domain.clone(),
            model_version: self.model_version,
            doc_string: self.doc_string.clone(),
            graph: None,
            metadata_props: self.metadata_props.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DType, Graph, TensorData};

    /// y = ((x·w + b) · 2) + x: cut after the first Add and after the Mul.
    fn model() -> (ModelProto, [String; 2]) {
        let mut g = Graph::new("t");
        let x = g.input("x", DType::F32, vec![2.into(), 2.into()]);
        let f32s = |v: &[f32]| TensorData::Owned(v.iter().flat_map(|x| x.to_le_bytes()).collect());
        let w = g.initializer("w", DType::F32, vec![2, 2], f32s(&[1.0, 2.0, 3.0, 4.0]));
        let b = g.initializer("b", DType::F32, vec![2], f32s(&[0.5, -0.5]));
        let xw = g.matmul(&x, &w);
        let h = g.add(&xw, &b);
        let two = g.scalar(2.0);
        let m = g.mul(&h, &two);
        let y = g.add(&m, &x);
        g.output(&y, "y", DType::F32, vec![2.into(), 2.into()]);
        let cuts = [h.name().to_string(), m.name().to_string()];
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("m.onnx");
        crate::save(&g, &p, crate::ExternalData::Never).unwrap();
        (crate::read_model(&p).unwrap(), cuts)
    }

    #[test]
    fn parts_pass_values_forward_and_take_their_own_weights() {
        let (m, [h, mul]) = model();
        let parts = split(&m, &[vec![h.clone()], vec![mul.clone()]]).unwrap();
        assert_eq!(parts.len(), 3);
        let g: Vec<&GraphProto> = parts.iter().map(|p| p.graph.as_ref().unwrap()).collect();
        let names = |v: &[ValueInfoProto]| v.iter().map(|i| i.name.clone()).collect::<Vec<_>>();
        // Head: x·w + b. `x`, a graph input, is read by each part that needs it.
        assert_eq!(names(&g[0].input), ["x"]);
        assert_eq!(names(&g[0].output), [h.clone()]);
        let inits = |g: &GraphProto| {
            g.initializer
                .iter()
                .map(|t| t.name.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(inits(g[0]), ["w", "b"]);
        // Middle: h · 2 (its constant goes with it).
        assert_eq!(names(&g[1].input), [h.clone()]);
        assert_eq!(names(&g[1].output), [mul.clone()]);
        // Tail: + x, from the graph input.
        assert_eq!(names(&g[2].input), [mul, "x".to_string()]);
        assert_eq!(names(&g[2].output), ["y"]);
        assert!(inits(g[2]).is_empty());
        let nodes: usize = g.iter().map(|g| g.node.len()).sum();
        assert_eq!(nodes, m.graph.as_ref().unwrap().node.len());
    }

    #[test]
    fn values_a_subgraph_reads_from_outside_cross_the_cut() {
        let (mut m, [h, _]) = model();
        let g = m.graph.as_mut().unwrap();
        // A node whose body reads `w` (an initializer) and `h` (computed in the head) without
        // declaring them, as a chunked feed-forward's Scan body does.
        let body = GraphProto {
            node: vec![NodeProto {
                input: vec![h.clone(), "w".into()],
                output: vec!["inner".into()],
                op_type: "MatMul".into(),
                ..Default::default()
            }],
            output: vec![ValueInfoProto::of_type("inner", DType::F32)],
            ..Default::default()
        };
        g.node.push(NodeProto {
            output: vec!["z".into()],
            op_type: "If".into(),
            input: vec!["cond".into()],
            attribute: vec![crate::proto::AttributeProto {
                name: "then_branch".into(),
                g: Some(Box::new(body)),
                ..Default::default()
            }],
            ..Default::default()
        });
        g.output.push(ValueInfoProto::of_type("z", DType::F32));
        g.input.push(ValueInfoProto::of_type("cond", DType::Bool));
        let parts = split(&m, &[vec![h.clone()]]).unwrap();
        let tail = parts[1].graph.as_ref().unwrap();
        let inputs: Vec<&str> = tail.input.iter().map(|i| i.name.as_str()).collect();
        assert!(inputs.contains(&h.as_str()), "{inputs:?}");
        assert!(tail.initializer.iter().any(|t| t.name == "w"));
    }

    #[test]
    fn a_value_no_node_computes_is_named() {
        let (m, _) = model();
        let err = split(&m, &[vec!["nowhere".into()]]).unwrap_err();
        assert_eq!(err, SplitError::NotComputed("nowhere".into()));
    }
}
