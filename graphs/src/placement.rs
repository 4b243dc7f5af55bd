//! Where ONNX Runtime's CUDA provider would put each node of a graph, decided here on any
//! machine from its kernel registrations kept as data.
//!
//! A node without a CUDA kernel for its operator, opset and element types runs on the CPU with a
//! copy on each side, and ONNX Runtime says nothing. [`cuda_placement`] finds every such node
//! before a GPU ever sees the graph: `v2l-compile` refuses to build a `cuda` engine with one, and
//! a GPU session refuses to load one.
//!
//! The data (`graphs/data/`, each file says where it came from):
//! - ONNX Runtime's `docs/OperatorKernels.md` (its 1.25 line: 1.31.1's own was out of reach), its CUDA section: for each
//!   operator and domain, the opset ranges it is registered for and the element types each
//!   input's type constraint accepts there;
//! - each ai.onnx operator's schema versions (from the `onnx` package): ONNX Runtime picks a
//!   kernel by the node's schema version, the largest at or below the model's opset, and takes
//!   a registration `[a, b]` when `a` equals it or `a < it <= b` (an open-ended `a+` only when
//!   `a` equals it: `kernel_registry.cc`).
//!
//! ONNX Runtime also places some nodes on the CPU on purpose: the integer shape arithmetic fed
//! by `Shape`, whose CUDA kernel writes its output to host memory (`GetCpuPreferredNodes`). Those
//! are cheap and expected; [`Placement::cpu_shape_nodes`] lists the nodes v2l expects there, and
//! a graph with a `Shape` or `Size` node cannot run with ONNX Runtime's CPU fallback refused.

use std::collections::{HashMap, HashSet};
use std::sync::OnceLock;

use crate::dtype::DType;
use crate::proto::{GraphProto, ModelProto, NodeProto};

/// ONNX Runtime's CUDA kernel registrations (`docs/OperatorKernels.md`; its header says which version).
const CUDA_KERNELS: &str = include_str!("../data/ort-cuda-kernels.md");
/// Schema versions of the ai.onnx operators (onnx 1.23.2).
const SINCE_VERSIONS: &str = include_str!("../data/onnx-1.23.2-since-versions.txt");

/// One registration: an opset range and, per input and output, the element types accepted.
#[derive(Clone, Debug)]
struct Registration {
    since: i64,
    /// `None`: open-ended (`a+`).
    until: Option<i64>,
    /// Per input index, the types accepted (union over the signature variants); empty: any.
    inputs: Vec<HashSet<String>>,
    outputs: Vec<HashSet<String>>,
}

/// A provider's kernel registrations: (domain, op) → registrations.
#[derive(Debug, Default)]
pub struct KernelTable {
    ops: HashMap<(String, String), Vec<Registration>>,
}

impl KernelTable {
    /// ONNX Runtime's CUDA provider (the data file says which version).
    pub fn ort_cuda() -> &'static KernelTable {
        static T: OnceLock<KernelTable> = OnceLock::new();
        T.get_or_init(|| KernelTable::parse(CUDA_KERNELS))
    }

    /// Reads the table format of `OperatorKernels.md`: a `|**Operator Domain:** *d*||||` row
    /// opens a domain; `|Op|signature|versions|types|` opens an operator, and `|||versions|types|`
    /// rows add registrations of the same signature.
    pub fn parse(text: &str) -> KernelTable {
        let mut t = KernelTable::default();
        let mut domain = String::new();
        let mut op = String::new();
        let mut signature: Vec<Signature> = Vec::new();
        for line in text.lines() {
            let cells: Vec<&str> = line.split('|').collect();
            let (Some(&name), Some(&params), Some(&versions), Some(&types), true) = (
                cells.get(1),
                cells.get(2),
                cells.get(3),
                cells.get(4),
                cells.len() >= 6 && line.starts_with('|'),
            ) else {
                continue;
            };
            if let Some(d) = name.strip_prefix("**Operator Domain:** *") {
                domain = d.trim_end_matches('*').to_string();
                continue;
            }
            if name.starts_with("Op Name") || name.starts_with("---") {
                continue;
            }
            if !name.is_empty() {
                op = name.to_string();
                signature = parse_signature(params);
            }
            let Some((since, until)) = parse_versions(versions) else {
                continue;
            };
            let constraints = parse_types(types);
            let accepted = |names: &[String]| -> HashSet<String> {
                names
                    .iter()
                    .flat_map(|n| match constraints.get(n) {
                        Some(ts) => ts.clone(),
                        // A literal type in place of a constraint name (`tensor(int64)`).
                        None if n.starts_with("tensor(") => vec![n.clone()],
                        None => Vec::new(),
                    })
                    .collect()
            };
            let slots = |pick: fn(&Signature) -> &Vec<Vec<String>>| {
                let n = signature.iter().map(|s| pick(s).len()).max().unwrap_or(0);
                (0..n)
                    .map(|i| {
                        let names: Vec<String> = signature
                            .iter()
                            .filter_map(|s| pick(s).get(i))
                            .flatten()
                            .cloned()
                            .collect();
                        accepted(&names)
                    })
                    .collect::<Vec<_>>()
            };
            let r = Registration {
                since,
                until,
                inputs: slots(|s| &s.0),
                outputs: slots(|s| &s.1),
            };
            t.ops
                .entry((domain.clone(), op.clone()))
                .or_default()
                .push(r);
        }
        t
    }

    /// Whether the table holds this operator at all (any opset, any type).
    pub fn knows(&self, domain: &str, op: &str) -> bool {
        self.ops
            .contains_key(&(canonical_domain(domain).to_string(), op.to_string()))
    }
}

/// One alternative signature of an operator: the type constraint names of each input, then of
/// each output (`Vec` per slot: a variadic slot may name several).
type Signature = (Vec<Vec<String>>, Vec<Vec<String>>);

/// `*in* X:**T**<br> *in* W:**T**<br> *out* Y:**T**`, possibly several variants joined by
/// `<br><br>or<br><br>`: per variant, the constraint names of each input and output.
fn parse_signature(params: &str) -> Vec<Signature> {
    params
        .split("<br><br>or<br><br>")
        .map(|variant| {
            let mut ins = Vec::new();
            let mut outs = Vec::new();
            for part in variant.split("<br>") {
                let part = part.trim();
                let (list, rest) = if let Some(r) = part.strip_prefix("*in* ") {
                    (&mut ins, r)
                } else if let Some(r) = part.strip_prefix("*out* ") {
                    (&mut outs, r)
                } else {
                    continue;
                };
                let constraint = rest
                    .split_once(':')
                    .map(|(_, c)| c.trim_matches('*').to_string())
                    .unwrap_or_default();
                list.push(vec![constraint]);
            }
            (ins, outs)
        })
        .collect()
}

/// `13+`, `13` or `[7, 12]`.
fn parse_versions(v: &str) -> Option<(i64, Option<i64>)> {
    let v = v.trim();
    if let Some(open) = v.strip_suffix('+') {
        return Some((open.parse().ok()?, None));
    }
    if let Some(range) = v.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
        let (a, b) = range.split_once(',')?;
        return Some((a.trim().parse().ok()?, Some(b.trim().parse().ok()?)));
    }
    let one: i64 = v.parse().ok()?;
    Some((one, Some(one)))
}

/// `**T** = tensor(float), tensor(float16)<br/> **T1** = tensor(int64)`.
fn parse_types(t: &str) -> HashMap<String, Vec<String>> {
    t.split("<br/>")
        .filter_map(|c| {
            let (name, list) = c.split_once('=')?;
            Some((
                name.trim().trim_matches('*').to_string(),
                list.split(',').map(|x| x.trim().to_string()).collect(),
            ))
        })
        .collect()
}

fn canonical_domain(d: &str) -> &str {
    if d.is_empty() {
        "ai.onnx"
    } else {
        d
    }
}

/// ONNX's name of an element type, as the table spells it.
fn tensor_type(d: DType) -> &'static str {
    match d {
        DType::F32 => "tensor(float)",
        DType::F16 => "tensor(float16)",
        DType::BF16 => "tensor(bfloat16)",
        DType::F64 => "tensor(double)",
        DType::I64 => "tensor(int64)",
        DType::I32 => "tensor(int32)",
        DType::U8 => "tensor(uint8)",
        DType::I8 => "tensor(int8)",
        DType::Bool => "tensor(bool)",
    }
}

/// The schema version of `op` a model at `opset` uses: the largest at or below it.
pub(crate) fn schema_version(op: &str, opset: i64) -> Option<i64> {
    static V: OnceLock<HashMap<&'static str, Vec<i64>>> = OnceLock::new();
    let table = V.get_or_init(|| {
        SINCE_VERSIONS
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let mut it = l.split_whitespace();
                let name = it.next()?;
                Some((name, it.filter_map(|v| v.parse().ok()).collect()))
            })
            .collect()
    });
    table.get(op)?.iter().copied().filter(|&v| v <= opset).max()
}

/// [`Placement::no_kernel`]'s entries counted by operator, most first: `ai.onnx.Flatten ×39,
/// ai.onnx.Sin ×1` (the first entry alone rarely says what a whole graph lacks).
pub fn count_by_operator(no_kernel: &[String]) -> String {
    let mut counts: Vec<(&str, usize)> = Vec::new();
    for entry in no_kernel {
        // `name` (domain.Op): why
        let op = entry
            .split_once("` (")
            .and_then(|(_, rest)| rest.split_once("):"))
            .map_or("?", |(op, _)| op);
        match counts.iter_mut().find(|(o, _)| *o == op) {
            Some((_, n)) => *n += 1,
            None => counts.push((op, 1)),
        }
    }
    counts.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let parts: Vec<String> = counts.iter().map(|(op, n)| format!("{op} ×{n}")).collect();
    parts.join(", ")
}

/// Where the CUDA provider would put a graph's nodes.
#[derive(Debug, Default)]
pub struct Placement {
    /// Nodes without a CUDA kernel, each as `name (domain.Op-version): why`.
    pub no_kernel: Vec<String>,
    /// Shape arithmetic ONNX Runtime keeps on the CPU on purpose (names).
    pub cpu_shape_nodes: Vec<String>,
    /// The graph has `Shape`/`Size` nodes, so ONNX Runtime will place some nodes on the CPU
    /// and a session with CPU fallback refused would not build.
    pub needs_cpu_fallback: bool,
    /// Nodes checked.
    pub nodes: usize,
    /// Some node that TF32 would change computes in f32 (or in a type v2l cannot tell): a
    /// convolution, matrix product or attention ([`TF32_OPS`]), or a subgraph. Where none
    /// does, the CUDA provider's `use_tf32` rounds no operand (it may change which cuDNN engine
    /// runs a bf16/fp16 convolution, and so its order of accumulation).
    pub tf32_matters: bool,
}

/// The CUDA provider's operators whose f32 arithmetic `use_tf32` puts on TF32 tensor cores
/// (cuDNN convolutions, cuBLAS products). ONNX Runtime's cuDNN-9 convolution also deselects
/// tensor-core engines for every element type when `use_tf32` is 0 (`nn/conv.cc`,
/// `CreateCudnnFeExecutionPlan`, read in its 1.25 source), bf16 and fp16 included.
pub const TF32_OPS: [&str; 9] = [
    "Conv",
    "ConvTranspose",
    "MatMul",
    "Gemm",
    "FusedMatMul",
    "Einsum",
    "MultiHeadAttention",
    "Attention",
    "GemmFastGelu",
];

/// Checks every node of `model` against `table`.
pub fn cuda_placement(model: &ModelProto, table: &KernelTable) -> Placement {
    let mut p = Placement::default();
    let Some(graph) = model.graph.as_ref() else {
        return p;
    };
    let opset = |domain: &str| -> i64 {
        model
            .opset_import
            .iter()
            .find(|o| canonical_domain(&o.domain) == canonical_domain(domain))
            .map(|o| o.version)
            .unwrap_or(1)
    };
    let types = crate::check::infer_types(graph);
    p.cpu_shape_nodes = cpu_preferred(graph, &types);
    // Shape arithmetic goes to the CPU whether or not the CUDA provider has a kernel for it
    // (an int64 `ReduceProd` has none): it needs none.
    let on_cpu: HashSet<&str> = p.cpu_shape_nodes.iter().map(String::as_str).collect();
    for n in &graph.node {
        p.nodes += 1;
        if on_cpu.contains(n.name.as_str()) {
            continue;
        }
        if let Err(why) = has_kernel(n, opset(&n.domain), &types, table) {
            p.no_kernel.push(format!(
                "`{}` ({}.{}): {why}",
                n.name,
                canonical_domain(&n.domain),
                n.op_type
            ));
        }
    }
    p.needs_cpu_fallback = graph
        .node
        .iter()
        .any(|n| n.domain.is_empty() && matches!(n.op_type.as_str(), "Shape" | "Size"));
    p.tf32_matters = graph.node.iter().any(|n| {
        let subgraph = n.attribute.iter().any(|a| a.g.is_some());
        let f32_math = TF32_OPS.contains(&n.op_type.as_str())
            && n.input
                .first()
                .is_none_or(|x| types.get(x.as_str()).is_none_or(|&t| t == DType::F32));
        subgraph || f32_math
    });
    p
}

fn has_kernel(
    n: &NodeProto,
    opset: i64,
    types: &HashMap<&str, DType>,
    table: &KernelTable,
) -> Result<(), String> {
    let domain = canonical_domain(&n.domain);
    let Some(regs) = table.ops.get(&(domain.to_string(), n.op_type.clone())) else {
        return Err("no CUDA kernel for this operator".into());
    };
    let version = match domain {
        "ai.onnx" => schema_version(&n.op_type, opset).unwrap_or(opset),
        _ => opset.min(regs.iter().map(|r| r.since).max().unwrap_or(1)),
    };
    let matching: Vec<&Registration> = regs
        .iter()
        .filter(|r| {
            r.since == version || (r.since < version && r.until.is_some_and(|u| u >= version))
        })
        .collect();
    if matching.is_empty() {
        let known: Vec<String> = regs
            .iter()
            .map(|r| match r.until {
                None => format!("{}+", r.since),
                Some(u) if u == r.since => u.to_string(),
                Some(u) => format!("[{}, {u}]", r.since),
            })
            .collect();
        return Err(format!(
            "no CUDA kernel for its schema version {version} (registered: {})",
            known.join(", ")
        ));
    }
    let slot_ok = |accepted: &HashSet<String>, name: &str| -> Option<&'static str> {
        let t = tensor_type(*types.get(name)?);
        (!accepted.is_empty() && !accepted.contains(t)).then_some(t)
    };
    let mut last = String::new();
    for r in matching {
        let bad_in = n.input.iter().enumerate().find_map(|(i, x)| {
            (!x.is_empty())
                .then(|| r.inputs.get(i).and_then(|a| slot_ok(a, x)))
                .flatten()
                .map(|t| format!("input {i} `{x}` is {t}"))
        });
        let bad_out = n.output.iter().enumerate().find_map(|(i, x)| {
            (!x.is_empty())
                .then(|| r.outputs.get(i).and_then(|a| slot_ok(a, x)))
                .flatten()
                .map(|t| format!("output {i} `{x}` is {t}"))
        });
        match bad_in.or(bad_out) {
            None => return Ok(()),
            Some(why) => last = why,
        }
    }
    Err(format!("no CUDA kernel where {last}"))
}

/// ONNX Runtime's `GetCpuPreferredNodes`, as far as v2l's graphs need it: starting from the
/// host-memory outputs of `Shape` and `Size`, a node whose inputs are all such outputs, small
/// initializers (≤ 100 elements) or graph inputs, and none of them fp16/bf16, goes to the CPU,
/// and its outputs join the host tensors. (ONNX Runtime also keeps an input its CUDA kernel reads
/// from host memory, such as `Reshape`'s shape, where it is: such a reader stays on the GPU.)
fn cpu_preferred(graph: &GraphProto, types: &HashMap<&str, DType>) -> Vec<String> {
    let small: HashSet<&str> = graph
        .initializer
        .iter()
        .filter(|t| t.dims.iter().product::<i64>() <= 100)
        .map(|t| t.name.as_str())
        .collect();
    let inputs: HashSet<&str> = graph.input.iter().map(|i| i.name.as_str()).collect();
    let mut host: HashSet<&str> = HashSet::new();
    let mut out = Vec::new();
    for n in &graph.node {
        if n.domain.is_empty() && matches!(n.op_type.as_str(), "Shape" | "Size") {
            host.extend(n.output.iter().map(String::as_str));
            continue;
        }
        let fed_by_host = n.input.iter().any(|x| host.contains(x.as_str()));
        let all_host = n.input.iter().filter(|x| !x.is_empty()).all(|x| {
            let x = x.as_str();
            let low = matches!(types.get(x), Some(DType::F16 | DType::BF16));
            !low && (host.contains(x) || small.contains(x) || inputs.contains(x))
        });
        if fed_by_host && all_host && !reads_host_input(n) {
            host.extend(n.output.iter().map(String::as_str));
            out.push(n.name.clone());
        }
    }
    out
}

/// Ops whose CUDA kernel reads some inputs from host memory (shapes, axes): fed by shape
/// arithmetic they stay on the GPU.
fn reads_host_input(n: &NodeProto) -> bool {
    n.domain.is_empty()
        && matches!(
            n.op_type.as_str(),
            "Reshape" | "Expand" | "Tile" | "ConstantOfShape" | "Slice" | "Resize" | "Upsample"
        )
}

#[cfg(test)]
mod tests {
    #[test]
    fn missing_kernels_are_counted_by_operator() {
        let entries = [
            "`a/Flatten_1` (ai.onnx.Flatten): no CUDA kernel for its schema version 23".to_string(),
            "`t/Sin` (ai.onnx.Sin): no CUDA kernel for its schema version 22".to_string(),
            "`b/Flatten_2` (ai.onnx.Flatten): no CUDA kernel for its schema version 23".to_string(),
        ];
        assert_eq!(
            count_by_operator(&entries),
            "ai.onnx.Flatten ×2, ai.onnx.Sin ×1"
        );
        assert_eq!(count_by_operator(&[]), "");
    }

    use super::*;
    use crate::{Attr, Graph, TensorData};

    use crate::saved_model as model;

    #[test]
    fn the_table_reads_as_onnx_runtime_registers() {
        let t = KernelTable::ort_cuda();
        assert!(t.ops.len() > 200, "{} operators", t.ops.len());
        let conv = &t.ops[&("ai.onnx".to_string(), "Conv".to_string())];
        // Conv: bf16 only from opset 22 on.
        let r22 = conv.iter().find(|r| r.since == 22).unwrap();
        assert!(r22.inputs[0].contains("tensor(bfloat16)"));
        let r11 = conv.iter().find(|r| r.since == 11).unwrap();
        assert_eq!(r11.until, Some(21));
        assert!(!r11.inputs[0].contains("tensor(bfloat16)"));
        assert!(r11.inputs[0].contains("tensor(float)"));
        assert!(t.knows("com.microsoft", "MultiHeadAttention"));
        assert!(!t.knows("ai.v2l", "Attention"));
        assert_eq!(parse_versions("[7, 12]"), Some((7, Some(12))));
        assert_eq!(parse_versions("13"), Some((13, Some(13))));
        assert_eq!(parse_versions("14+"), Some((14, None)));
        assert_eq!(schema_version("Reshape", 17), Some(14));
        assert_eq!(schema_version("Conv", 17), Some(11));
    }

    #[test]
    fn nodes_without_a_cuda_kernel_are_named() {
        let mut g = Graph::new("t");
        let x = g.input(
            "x",
            DType::BF16,
            vec![1.into(), 2.into(), 4.into(), 4.into()],
        );
        let w = g.initializer(
            "w",
            DType::BF16,
            vec![2, 2, 1, 1],
            TensorData::Owned(vec![0; 8]),
        );
        let y = g.op("Conv", &[&x, &w], vec![]);
        let s = g.shape(&y);
        let z = g.reshape(&y, &s);
        g.output(
            &z,
            "y",
            DType::BF16,
            vec![1.into(), 2.into(), 4.into(), 4.into()],
        );
        let p = cuda_placement(&model(&g), KernelTable::ort_cuda());
        assert_eq!(p.no_kernel.len(), 1, "{:?}", p.no_kernel);
        assert!(
            p.no_kernel[0].contains("ai.onnx.Conv") && p.no_kernel[0].contains("bfloat16"),
            "{:?}",
            p.no_kernel
        );
        assert!(p.needs_cpu_fallback);

        // The same in f32 has every kernel.
        let mut g = Graph::new("t");
        let x = g.input(
            "x",
            DType::F32,
            vec![1.into(), 2.into(), 4.into(), 4.into()],
        );
        let w = g.initializer(
            "w",
            DType::F32,
            vec![2, 2, 1, 1],
            TensorData::Owned(vec![0; 16]),
        );
        let y = g.op("Conv", &[&x, &w], vec![]);
        g.output(
            &y,
            "y",
            DType::F32,
            vec![1.into(), 2.into(), 4.into(), 4.into()],
        );
        let p = cuda_placement(&model(&g), KernelTable::ort_cuda());
        assert!(p.no_kernel.is_empty(), "{:?}", p.no_kernel);
        assert!(!p.needs_cpu_fallback);
    }

    #[test]
    fn shape_arithmetic_is_expected_on_the_cpu() {
        let mut g = Graph::new("t");
        let x = g.input("x", DType::F32, vec!["n".into(), 6.into()]);
        let n = g.shape_range(&x, 0, 1);
        let two = g.const_i64(&[2]);
        let three = g.const_i64(&[3]);
        let all = g.shape(&x);
        let count = g.op("ReduceProd", &[&all], vec![("keepdims", Attr::Int(1))]);
        let shape = g.concat(&[&n, &two, &three], 0);
        g.output(&count, "count", DType::I64, vec![1.into()]);
        let y = g.reshape(&x, &shape);
        g.output(&y, "y", DType::F32, vec!["n".into(), 2.into(), 3.into()]);
        let p = cuda_placement(&model(&g), KernelTable::ort_cuda());
        assert!(p.no_kernel.is_empty(), "{:?}", p.no_kernel);
        // The ReduceProd (no int64 CUDA kernel, and it needs none), the Concat and the
        // output's Identity; not the Reshape, which reads its shape from host memory.
        assert_eq!(p.cpu_shape_nodes.len(), 3, "{:?}", p.cpu_shape_nodes);
        assert!(p.cpu_shape_nodes.iter().all(|n| !n.starts_with("Reshape")));
        assert!(p.needs_cpu_fallback);
    }

    #[test]
    fn tf32_matters_only_where_a_product_computes_in_f32() {
        // A bf16 product, and its f32 output cast and added: TF32 changes nothing.
        let product = |ty: DType| {
            let mut g = Graph::new("t");
            let x = g.input("x", ty, vec!["n".into(), 4.into()]);
            let w = g.input("w", ty, vec![4.into(), 4.into()]);
            let y = g.matmul(&x, &w);
            let y = g.cast(&y, DType::F32);
            let y = g.add(&y, &y);
            g.output(&y, "y", DType::F32, vec!["n".into(), 4.into()]);
            cuda_placement(&model(&g), KernelTable::ort_cuda()).tf32_matters
        };
        assert!(!product(DType::BF16));
        assert!(!product(DType::F16));
        assert!(product(DType::F32));
        // A product whose input's type is not known counts as f32.
        let mut g = Graph::new("t");
        let x = g.input("x", DType::BF16, vec![4.into(), 4.into()]);
        let u = g.op("SomeUnknownOp", &[], vec![]);
        let y = g.matmul(&u, &x);
        g.output(&y, "y", DType::BF16, vec![4.into(), 4.into()]);
        assert!(cuda_placement(&model(&g), KernelTable::ort_cuda()).tf32_matters);
    }
}
