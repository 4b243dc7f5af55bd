//! Graph passes over a written model: small patches, each one idea.
//!
//! [`fuse_attention`] and [`fuse_gelu`] (`passes/attention.rs`, `passes/gelu.rs`) are the backend
//! rewrites `v2l-compile` applies for ONNX Runtime. The other two serve the LoRA strategies that avoid rebuilding a session per LoRA:
//! - [`bind_weights_as_inputs`]: the LoRA-targetable weights become graph inputs, so a runtime
//!   passes (fused) weights per request; the base stays in the main graph's weight file.
//! - [`add_lora_branches`]: every `Gemm` consuming a targeted weight gets a parallel low-rank
//!   branch `y += s·(x·Aᵀ)·Bᵀ` whose `A [r, in]`, `B [out, r]` and `s [1]` are graph inputs, so
//!   weights stay untouched and the LoRA is just data.

use std::collections::HashMap;

mod attention;
mod chunk;
mod conv;
mod data_file;
mod gelu;
mod opset;
mod precision;
mod qmatmul;
mod quantize;
mod schedule;
pub use attention::{fuse_attention, v2l_attention, MS_DOMAIN, V2L_ATTENTION, V2L_DOMAIN};
pub use chunk::{chunk_feed_forward, FF_CHUNKS};
pub use conv::{conv_geometry, v2l_conv, V2L_CONV};
pub use gelu::fuse_gelu;
pub use opset::upgrade_opset;
pub use precision::{
    keep_in_fp32_modules, keeps_f32, lower_precision, Lowered, Lowering, WeightFile,
    GROUP_NORM_SCOPE, KEEP_IN_FP32,
};
pub use qmatmul::{v2l_qmatmul, V2L_QMATMUL};
pub use quantize::{quantize_linears, use_quantized_weights, QuantScheme, Quantized, WeightQuant};
pub use schedule::carried_outputs_first;

/// The initializer behind a node input: the input itself, or for weights stored as f16/bf16
/// (`v2l-export --weight-dtype`) the initializer a `Cast` widens to f32. Maps each such Cast's
/// output to (the Cast's node index, the initializer).
fn cast_initializers(graph: &proto::GraphProto) -> HashMap<&str, (usize, &str)> {
    let inits: std::collections::HashSet<&str> =
        graph.initializer.iter().map(|t| t.name.as_str()).collect();
    graph
        .node
        .iter()
        .enumerate()
        .filter(|(_, n)| n.op_type == "Cast" && n.domain.is_empty())
        .filter_map(|(i, n)| {
            let src = n.input.first()?;
            let out = n.output.first()?;
            inits
                .contains(src.as_str())
                .then_some((out.as_str(), (i, src.as_str())))
        })
        .collect()
}

/// An integer attribute of a node.
fn attr_i(n: &proto::NodeProto, name: &str) -> Option<i64> {
    n.attribute.iter().find(|a| a.name == name).map(|a| a.i)
}

/// An integer-list attribute of a node.
fn attr_ints<'a>(n: &'a proto::NodeProto, name: &str) -> Option<&'a [i64]> {
    n.attribute
        .iter()
        .find(|a| a.name == name)
        .map(|a| a.ints.as_slice())
}

/// What a fusion matches on: initializers by name, the node producing each tensor and the
/// nodes reading it.
struct Index<'g> {
    inits: HashMap<&'g str, &'g proto::TensorProto>,
    producer: HashMap<&'g str, usize>,
    consumers: HashMap<&'g str, Vec<usize>>,
}

impl<'g> Index<'g> {
    fn new(graph: &'g proto::GraphProto) -> Index<'g> {
        let mut ix = Index {
            inits: graph
                .initializer
                .iter()
                .map(|t| (t.name.as_str(), t))
                .collect(),
            producer: HashMap::new(),
            consumers: HashMap::new(),
        };
        for (i, n) in graph.node.iter().enumerate() {
            for o in &n.output {
                ix.producer.insert(o.as_str(), i);
            }
            for x in &n.input {
                ix.consumers.entry(x.as_str()).or_default().push(i);
            }
        }
        ix
    }
}

/// An integer attribute for a new node.
fn int_attr(name: &str, i: i64) -> proto::AttributeProto {
    proto::AttributeProto {
        name: name.into(),
        r#type: proto::attribute_type::INT,
        i,
        ..Default::default()
    }
}

/// A new default-domain node with one output.
fn node(
    op: &str,
    name: String,
    input: &[&str],
    output: &str,
    attribute: Vec<proto::AttributeProto>,
) -> proto::NodeProto {
    proto::NodeProto {
        input: input.iter().map(|s| s.to_string()).collect(),
        output: vec![output.into()],
        name,
        op_type: op.into(),
        attribute,
        ..Default::default()
    }
}

/// The end of every fusion: node `i` of `replace` takes the place of node `i`, the `removed`
/// ones disappear, initializers nothing reads any more are dropped and the contrib domain is
/// declared.
fn splice(
    model: &mut ModelProto,
    removed: &std::collections::HashSet<usize>,
    mut replace: HashMap<usize, Vec<proto::NodeProto>>,
) {
    let Some(graph) = model.graph.as_mut() else {
        return;
    };
    let old = std::mem::take(&mut graph.node);
    for (i, n) in old.into_iter().enumerate() {
        if let Some(new) = replace.remove(&i) {
            graph.node.extend(new);
        } else if !removed.contains(&i) {
            graph.node.push(n);
        }
    }
    drop_unused_initializers(graph);
    import_ms_domain(model);
}

/// The value of a scalar f32 initializer (fusions read their constants with it).
fn scalar_f32(t: &proto::TensorProto) -> Option<f32> {
    if t.data_type != DType::F32.onnx_code() || t.dims.iter().product::<i64>() != 1 {
        return None;
    }
    match (t.raw_data.as_slice(), t.float_data.first()) {
        ([a, b, c, d], _) => Some(f32::from_le_bytes([*a, *b, *c, *d])),
        (_, Some(v)) => Some(*v),
        _ => None,
    }
}

/// Removes initializers no node reads and that are not graph inputs (left behind by fusions).
/// Reads inside subgraphs (a `Scan` body reading outer-scope weights) count.
fn drop_unused_initializers(graph: &mut proto::GraphProto) {
    fn reads(g: &proto::GraphProto, used: &mut std::collections::HashSet<String>) {
        for n in &g.node {
            used.extend(n.input.iter().cloned());
            for sub in n.attribute.iter().filter_map(|a| a.g.as_deref()) {
                reads(sub, used);
            }
        }
    }
    let mut used: std::collections::HashSet<String> =
        graph.input.iter().map(|i| i.name.clone()).collect();
    reads(graph, &mut used);
    graph.initializer.retain(|t| used.contains(&t.name));
}

/// Declares ONNX Runtime's contrib domain once a pass has emitted one of its ops.
fn import_ms_domain(model: &mut ModelProto) {
    import_domain(model, MS_DOMAIN)
}

/// Declares operator domain `domain` (version 1) once a pass has emitted one of its ops.
fn import_domain(model: &mut ModelProto, domain: &str) {
    if !model.opset_import.iter().any(|o| o.domain == domain) {
        model.opset_import.push(proto::OperatorSetIdProto {
            domain: domain.into(),
            version: 1,
        });
    }
}

use crate::builder::{attr_proto, Attr};
use crate::dtype::DType;
use crate::proto::{self, ModelProto};

/// A 1-D int64 initializer (shapes).
pub(crate) fn i64_tensor(name: String, values: &[i64]) -> proto::TensorProto {
    proto::TensorProto {
        dims: vec![values.len() as i64],
        data_type: DType::I64.onnx_code(),
        name,
        raw_data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ..Default::default()
    }
}

fn io(name: &str, dtype: DType, dims: Vec<Result<i64, String>>) -> proto::ValueInfoProto {
    use proto::tensor_shape_proto::{dimension::Value as D, Dimension};
    proto::ValueInfoProto {
        name: name.into(),
        r#type: Some(proto::TypeProto {
            value: Some(proto::type_proto::Value::TensorType(
                proto::type_proto::Tensor {
                    elem_type: dtype.onnx_code(),
                    shape: Some(proto::TensorShapeProto {
                        dim: dims
                            .into_iter()
                            .map(|d| Dimension {
                                value: Some(match d {
                                    Ok(v) => D::DimValue(v),
                                    Err(s) => D::DimParam(s),
                                }),
                            })
                            .collect(),
                    }),
                },
            )),
        }),
        doc_string: String::new(),
    }
}

/// Errors name the weight that is not where the pass expects it.
#[derive(Debug, thiserror::Error)]
pub enum PassError {
    #[error("no initializer `{0}` in the model")]
    MissingInitializer(String),
    #[error("`{0}` is not consumed by a Gemm as its B input (was the model exported by v2l?)")]
    NotGemm(String),
    #[error("{0}")]
    Unsupported(String),
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// Turns the named initializers into required graph inputs (the initializers are removed).
///
/// Why removed, not kept as defaults: ONNX Runtime would load the defaults into memory beside
/// the weights the runtime binds, one more copy of every targeted weight. The base values stay
/// in the main graph's weight file, which the runtime memory-maps.
pub fn bind_weights_as_inputs(model: &mut ModelProto, names: &[String]) -> Result<(), PassError> {
    let graph = model.graph.get_or_insert_with(Default::default);
    let inits: HashMap<&str, &proto::TensorProto> = graph
        .initializer
        .iter()
        .map(|t| (t.name.as_str(), t))
        .collect();
    let mut new_inputs = Vec::new();
    for n in names {
        let t = inits
            .get(n.as_str())
            .ok_or_else(|| PassError::MissingInitializer(n.clone()))?;
        let dtype = DType::from_onnx_code(t.data_type).unwrap_or(DType::F32);
        new_inputs.push(io(n, dtype, t.dims.iter().map(|&d| Ok(d)).collect()));
    }
    graph.input.extend(new_inputs);
    let bound: std::collections::HashSet<&String> = names.iter().collect();
    graph.initializer.retain(|t| !bound.contains(&t.name));
    Ok(())
}

/// Input names of the branch added for weight `name` (`<module>.weight`).
pub fn lora_input_names(weight: &str) -> [String; 3] {
    let module = weight.strip_suffix(".weight").unwrap_or(weight);
    [
        format!("{module}.lora_A"),
        format!("{module}.lora_B"),
        format!("{module}.lora_scale"),
    ]
}

/// Adds an unfused LoRA branch to every Gemm whose B input is one of `weights`.
pub fn add_lora_branches(model: &mut ModelProto, weights: &[String]) -> Result<(), PassError> {
    let graph = model.graph.get_or_insert_with(Default::default);
    let shapes: HashMap<String, Vec<i64>> = graph
        .initializer
        .iter()
        .map(|t| (t.name.clone(), t.dims.clone()))
        .collect();
    let mut nodes = Vec::with_capacity(graph.node.len() + 4 * weights.len());
    let mut found: HashMap<&str, bool> = weights.iter().map(|w| (w.as_str(), false)).collect();
    let node = |op: &str,
                name: String,
                inputs: Vec<String>,
                output: String,
                attrs: Vec<proto::AttributeProto>| proto::NodeProto {
        input: inputs,
        output: vec![output],
        name,
        op_type: op.into(),
        attribute: attrs,
        ..Default::default()
    };
    let via_cast: HashMap<String, String> = cast_initializers(graph)
        .into_iter()
        .map(|(out, (_, w))| (out.to_string(), w.to_string()))
        .collect();
    for mut n in std::mem::take(&mut graph.node) {
        let target = (n.op_type == "Gemm")
            .then(|| n.input.get(1).cloned())
            .flatten()
            .map(|b| via_cast.get(&b).cloned().unwrap_or(b))
            .filter(|w| found.contains_key(w.as_str()));
        let (Some(w), Some(x), Some(y)) =
            (target, n.input.first().cloned(), n.output.first().cloned())
        else {
            nodes.push(n);
            continue;
        };
        found.insert(
            weights
                .iter()
                .find(|x| **x == w)
                .map(|x| x.as_str())
                .unwrap_or(""),
            true,
        );
        let [a, b, s] = lora_input_names(&w);
        let dims = shapes.get(&w).cloned().unwrap_or_default();
        let (out, inp) = (
            dims.first().copied().unwrap_or(0),
            dims.get(1).copied().unwrap_or(0),
        );
        let base = format!("{y}/base");
        if let Some(o) = n.output.first_mut() {
            o.clone_from(&base);
        }
        let p = n.name.clone();
        nodes.push(n);
        // Factors per sample: A [Bf, r, in], B [Bf, out, r], scale [Bf, 1, 1], with Bf 1 (one
        // LoRA for the whole batch) or the DiT's batch (one per sample). The 2-D activations
        // [rows, in] become [Bf, rows / Bf, in]: rows are sample-major, so each sample's
        // tokens meet its own factors.
        let t = |name: &str| format!("{p}/lora_{name}:0");
        let x_tail = format!("{p}/lora_x_tail");
        let y_shape = format!("{p}/lora_y_shape");
        graph
            .initializer
            .push(i64_tensor(x_tail.clone(), &[-1, inp]));
        graph
            .initializer
            .push(i64_tensor(y_shape.clone(), &[-1, out]));
        let perm = || vec![attr_proto("perm", Attr::Ints(vec![0, 2, 1]))];
        let steps: [(&str, Vec<String>, &str, Vec<proto::AttributeProto>); 9] = [
            (
                "Shape",
                vec![a.clone()],
                "samples",
                vec![int_attr("start", 0), int_attr("end", 1)],
            ),
            (
                "Concat",
                vec![t("samples"), x_tail],
                "x_shape",
                vec![int_attr("axis", 0)],
            ),
            ("Reshape", vec![x, t("x_shape")], "x", vec![]),
            ("Transpose", vec![a.clone()], "a_t", perm()),
            ("MatMul", vec![t("x"), t("a_t")], "down", vec![]),
            ("Transpose", vec![b.clone()], "b_t", perm()),
            ("MatMul", vec![t("down"), t("b_t")], "up", vec![]),
            ("Mul", vec![t("up"), s.clone()], "scaled", vec![]),
            ("Reshape", vec![t("scaled"), y_shape], "flat", vec![]),
        ];
        for (op, inputs, out_name, attrs) in steps {
            nodes.push(node(
                op,
                format!("{p}/lora_{out_name}"),
                inputs,
                t(out_name),
                attrs,
            ));
        }
        nodes.push(node(
            "Add",
            format!("{p}/lora_add"),
            vec![base, t("flat")],
            y,
            vec![],
        ));
        let module = w.strip_suffix(".weight").unwrap_or(&w).to_string();
        let samples = || Err("lora_samples".to_string());
        let rank = || Err(format!("{module}.rank"));
        graph
            .input
            .push(io(&a, DType::F32, vec![samples(), rank(), Ok(inp)]));
        graph
            .input
            .push(io(&b, DType::F32, vec![samples(), Ok(out), rank()]));
        graph
            .input
            .push(io(&s, DType::F32, vec![samples(), Ok(1), Ok(1)]));
    }
    graph.node = nodes;
    if let Some((w, _)) = found.iter().find(|(_, f)| !**f) {
        return Err(PassError::NotGemm(w.to_string()));
    }
    Ok(())
}
