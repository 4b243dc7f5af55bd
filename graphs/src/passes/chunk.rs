//! Feed-forward chunking: each transformer block's feed-forward runs over its tokens in
//! [`FF_CHUNKS`] slices inside one `Scan`, so the 4×-wide hidden activation exists one slice at
//! a time (diffusers' `enable_forward_chunking` does the same in PyTorch).
//!
//! Why: at CogVideoX-5B width the feed-forward's `[B·S, 4·D]` projection and its GELU are the
//! largest tensors of a block step — 2 × 575 MB at 5,626 tokens, batch 2 — and fresh memory is
//! expensive here: the kernel zeroes every page on first touch (`clear_page`, a third of a
//! one-step process's CPU time). Measured on one 5B-width block (ORT 1.31, 2 threads), int8
//! at 5,626 tokens: first step 7.6 → 5.5 s, peak 2.81 → 1.83 GB with ORT's CPU arena on; fp32:
//! 17.8 → 15.3 s, 13.4 s warm (2026-11-23; docs/history/benchmarks-2026-11-22-to-26.md).
//!
//! The feed-forward is found by module name: every node under `<block>.ff.` (CogVideoX) or
//! `<block>.ffn.` (Wan), LoRA branches and quantised linears included. It becomes the `Scan`
//! body unchanged when it is token-wise: one activation input `[B, S, D]`, one output, only
//! ops that treat rows independently, shapes read from its own input. Each sample's tokens
//! are zero-padded to a multiple of the chunk count and sliced alike (a slice holds the same
//! token range of every sample, so per-sample LoRA factors still meet their rows), scanned and
//! put back, so the output is bitwise the unchunked one for f32 linears; a dynamically quantised
//! int8 linear quantises each slice with its own range (within 1e-6 here).
//!
//! Weights stay main-graph initializers read from the body's outer scope: ONNX Runtime
//! prepacks each once, and fused-LoRA sessions replace them by name as before.

use std::collections::{BTreeMap, HashMap, HashSet};

use super::edit::{i64_tensor, int_attr, node};
use crate::dtype::DType;
use crate::proto::{self, attribute_type, GraphProto, ModelProto, NodeProto};

/// Slices per feed-forward: 4 measured best of 2/4/8 at 1,378 and 5,626 tokens (fewer leave
/// most of the memory; more add slicing overhead for nothing).
pub const FF_CHUNKS: i64 = 4;

/// Ops that treat the rows of a `[tokens, width]` activation independently (given constant
/// or shape-derived second operands, which [`token_wise`] checks).
const ROW_OPS: &[&str] = &[
    "Gemm",
    "MatMul",
    "DynamicQuantizeMatMul",
    "QMatMul",
    "MatMulNBits",
    "MatMulIntegerToFloat",
    "FastGelu",
    "Gelu",
    "BiasGelu",
    "Add",
    "Mul",
    "Sub",
    "Div",
    "Tanh",
    "Pow",
    "Erf",
    "Cast",
    "Flatten",
    "Reshape",
    "Shape",
    "Concat",
];

/// The feed-forward module a node belongs to (`transformer_blocks.3.ff`), from its scoped name.
fn ff_module(node: &str) -> Option<&str> {
    let module = node.split('/').next()?;
    let mut end = 0;
    for part in module.split('.') {
        let next = end + part.len();
        if part == "ff" || part == "ffn" {
            return module.get(..next);
        }
        end = next + 1;
    }
    None
}

/// One feed-forward found in the graph: its nodes (graph order), its single activation input
/// and output, and the node writing the output.
struct Region {
    module: String,
    nodes: Vec<usize>,
    input: String,
    output: String,
    writer: usize,
}

fn proto_ints(name: &str, v: &[i64]) -> proto::AttributeProto {
    proto::AttributeProto {
        name: name.into(),
        r#type: attribute_type::INTS,
        ints: v.to_vec(),
        ..Default::default()
    }
}

/// Whether `region` can run slice by slice: row-wise ops only, and every `Concat` joins shape
/// vectors (never activations).
fn token_wise(graph: &GraphProto, region: &[usize], outer: &HashSet<&str>) -> bool {
    let produced_by: HashMap<&str, &NodeProto> = region
        .iter()
        .filter_map(|&i| graph.node.get(i))
        .flat_map(|n| n.output.iter().map(move |o| (o.as_str(), n)))
        .collect();
    region.iter().filter_map(|&i| graph.node.get(i)).all(|n| {
        // A Transpose may only reorder what comes from outside (a LoRA branch's factors).
        let op_ok = ROW_OPS.contains(&n.op_type.as_str())
            || (n.op_type == "Transpose" && n.input.iter().all(|x| outer.contains(x.as_str())));
        let concat_ok = n.op_type != "Concat"
            || n.input.iter().all(|x| {
                outer.contains(x.as_str())
                    || produced_by
                        .get(x.as_str())
                        .is_some_and(|p| p.op_type == "Shape" || p.op_type == "Concat")
            });
        op_ok && concat_ok
    })
}

fn find_regions(graph: &GraphProto) -> Vec<Region> {
    // Names visible everywhere: initializers and graph inputs.
    let outer: HashSet<&str> = graph
        .initializer
        .iter()
        .map(|t| t.name.as_str())
        .chain(graph.input.iter().map(|i| i.name.as_str()))
        .chain(std::iter::once(""))
        .collect();
    let graph_outputs: HashSet<&str> = graph.output.iter().map(|o| o.name.as_str()).collect();
    let mut modules: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, n) in graph.node.iter().enumerate() {
        if let Some(m) = ff_module(&n.name) {
            modules.entry(m).or_default().push(i);
        }
    }
    let mut regions = Vec::new();
    for (module, nodes) in modules {
        let inside: HashSet<&str> = nodes
            .iter()
            .filter_map(|&i| graph.node.get(i))
            .flat_map(|n| n.output.iter().map(String::as_str))
            .collect();
        let inputs: HashSet<&str> = nodes
            .iter()
            .filter_map(|&i| graph.node.get(i))
            .flat_map(|n| n.input.iter().map(String::as_str))
            .filter(|x| !inside.contains(x) && !outer.contains(x))
            .collect();
        let members: HashSet<usize> = nodes.iter().copied().collect();
        let read_outside: HashSet<&str> = graph
            .node
            .iter()
            .enumerate()
            .filter(|(i, _)| !members.contains(i))
            .flat_map(|(_, n)| n.input.iter().map(String::as_str))
            .chain(graph_outputs.iter().copied())
            .filter(|x| inside.contains(x))
            .collect();
        let (Some(&input), Some(&output), 1, 1) = (
            inputs.iter().next(),
            read_outside.iter().next(),
            inputs.len(),
            read_outside.len(),
        ) else {
            continue;
        };
        let writer = nodes.iter().copied().find(|&i| {
            graph
                .node
                .get(i)
                .is_some_and(|n| n.output.iter().any(|o| o == output))
        });
        let Some(writer) = writer else { continue };
        if graph_outputs.contains(output) || !token_wise(graph, &nodes, &outer) {
            continue;
        }
        regions.push(Region {
            module: module.to_string(),
            nodes,
            input: input.to_string(),
            output: output.to_string(),
            writer,
        });
    }
    regions
}

/// The nodes that replace `r`: pad each sample's tokens to a multiple of `chunks`, `Scan` the
/// feed-forward over the slices (`[B, tokens / chunks, D]` each), and undo the slicing and
/// padding.
fn scanned(
    graph: &GraphProto,
    r: &Region,
    chunks: i64,
) -> (Vec<NodeProto>, Vec<proto::TensorProto>) {
    let p = format!("{}/chunked", r.module);
    let n = |s: &str| format!("{p}/{s}");
    let (x, y) = (r.input.as_str(), r.output.as_str());
    let consts = vec![
        i64_tensor(n("k"), &[chunks]),
        i64_tensor(n("zeros4"), &[0, 0, 0, 0]),
        i64_tensor(n("zero"), &[0]),
        i64_tensor(n("one"), &[1]),
        i64_tensor(n("m1"), &[-1]),
    ];
    let shape = |name: &str, of: &str, start: i64, end: Option<i64>| {
        let mut a = vec![int_attr("start", start)];
        a.extend(end.map(|e| int_attr("end", e)));
        node("Shape", n(name), &[of], &n(name), a)
    };
    // The body: the region's nodes, reading `x_chunk` and writing `y_chunk`.
    let (body_in, body_out) = (n("x_chunk"), n("y_chunk"));
    let rename = |s: &String| {
        if s == x {
            body_in.clone()
        } else if s == y {
            body_out.clone()
        } else {
            s.clone()
        }
    };
    let body_nodes: Vec<NodeProto> = r
        .nodes
        .iter()
        .filter_map(|&i| graph.node.get(i))
        .map(|nd| NodeProto {
            input: nd.input.iter().map(rename).collect(),
            output: nd.output.iter().map(rename).collect(),
            ..nd.clone()
        })
        .collect();
    let body = GraphProto {
        node: body_nodes,
        name: n("body"),
        // [batch, rows, width]: the rank lets ONNX Runtime run the body where the region's
        // input comes from outside the graph (a DiT cut for step caching).
        input: vec![proto::ValueInfoProto::of_rank(&body_in, DType::F32, 3)],
        output: vec![proto::ValueInfoProto::of_rank(&body_out, DType::F32, 3)],
        ..Default::default()
    };
    let mut scan = node(
        "Scan",
        n("Scan"),
        &[&n("x_slices")],
        &n("y_slices"),
        vec![int_attr("num_scan_inputs", 1)],
    );
    scan.attribute.push(proto::AttributeProto {
        name: "body".into(),
        r#type: attribute_type::GRAPH,
        g: Some(Box::new(body)),
        ..Default::default()
    });
    // A node writing the wrapper's own tensor `out` (named as its output).
    let step =
        |op: &str, out: &str, inputs: &[&str], attrs| node(op, n(out), inputs, &n(out), attrs);
    let concat =
        |out: &str, inputs: &[&str]| step("Concat", out, inputs, vec![int_attr("axis", 0)]);
    let (k, zero) = (n("k"), n("zero"));
    let perm = || vec![proto_ints("perm", &[1, 0, 2, 3])];
    let nodes = vec![
        // Each sample's tokens are padded to a multiple of k and sliced alike, so a slice
        // holds `tokens / k` rows of every sample, sample-major: a LoRA branch with factors
        // per sample finds each row's sample as in the unchunked graph.
        shape("batch", x, 0, Some(1)),
        shape("tokens", x, 1, Some(2)),
        shape("width", x, 2, None),
        step("Neg", "neg_tokens", &[&n("tokens")], vec![]),
        step(
            "Mod",
            "pad",
            &[&n("neg_tokens"), &k],
            vec![int_attr("fmod", 0)],
        ),
        concat("pads", &[&n("zeros4"), &n("pad"), &zero]),
        step("Pad", "padded", &[x, &n("pads")], vec![]),
        concat("split_shape", &[&n("batch"), &k, &n("m1"), &n("width")]),
        step(
            "Reshape",
            "split",
            &[&n("padded"), &n("split_shape")],
            vec![],
        ),
        step("Transpose", "x_slices", &[&n("split")], perm()),
        scan,
        step("Transpose", "y_split", &[&n("y_slices")], perm()),
        shape("out_width", &n("y_slices"), 3, None),
        concat("padded_shape", &[&n("batch"), &n("m1"), &n("out_width")]),
        step(
            "Reshape",
            "y_padded",
            &[&n("y_split"), &n("padded_shape")],
            vec![],
        ),
        node(
            "Slice",
            n("Slice"),
            &[&n("y_padded"), &zero, &n("tokens"), &n("one")],
            y,
            vec![],
        ),
    ];
    (nodes, consts)
}

/// Chunks every token-wise feed-forward of `model` into `chunks` slices; returns how many.
/// Run it last: later passes do not look inside the `Scan` bodies.
pub fn chunk_feed_forward(model: &mut ModelProto, chunks: i64) -> usize {
    let Some(graph) = model.graph.as_mut() else {
        return 0;
    };
    if chunks < 2 {
        return 0;
    }
    let regions = find_regions(graph);
    let mut removed = HashSet::new();
    let mut replace = HashMap::new();
    let mut consts = Vec::new();
    for r in &regions {
        let (nodes, c) = scanned(graph, r, chunks);
        consts.extend(c);
        // The replacement goes where the output was written: the input is produced before
        // the region's first node, and the output is read only after its writer.
        removed.extend(r.nodes.iter().copied().filter(|&i| i != r.writer));
        replace.insert(r.writer, nodes);
    }
    graph.initializer.extend(consts);
    let count = replace.len();
    if count > 0 {
        super::edit::splice(model, &removed, replace);
    }
    count
}
