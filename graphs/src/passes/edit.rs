//! Graph-editing helpers the passes share: attributes, nodes, initializers, domains.

use std::collections::HashMap;

use crate::dtype::DType;
use crate::proto::{self, ModelProto};

/// ONNX Runtime's contrib-op domain.
pub const MS_DOMAIN: &str = "com.microsoft";

/// v2l's own operators' domain (the kernels crate registers it).
pub const V2L_DOMAIN: &str = "ai.v2l";

/// The initializer behind a node input: the input itself, or for weights stored as f16/bf16
/// (`v2l-export --weight-dtype`) the initializer a `Cast` widens to f32. Maps each such Cast's
/// output to (the Cast's node index, the initializer).
pub(super) fn cast_initializers(graph: &proto::GraphProto) -> HashMap<&str, (usize, &str)> {
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
pub(super) fn attr_i(n: &proto::NodeProto, name: &str) -> Option<i64> {
    n.attribute.iter().find(|a| a.name == name).map(|a| a.i)
}

/// An integer-list attribute of a node.
pub(super) fn attr_ints<'a>(n: &'a proto::NodeProto, name: &str) -> Option<&'a [i64]> {
    n.attribute
        .iter()
        .find(|a| a.name == name)
        .map(|a| a.ints.as_slice())
}

/// What a fusion matches on: initializers by name, the node producing each tensor and the
/// nodes reading it.
pub(super) struct Index<'g> {
    pub(super) inits: HashMap<&'g str, &'g proto::TensorProto>,
    pub(super) producer: HashMap<&'g str, usize>,
    pub(super) consumers: HashMap<&'g str, Vec<usize>>,
}

impl<'g> Index<'g> {
    pub(super) fn new(graph: &'g proto::GraphProto) -> Index<'g> {
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
pub(super) fn int_attr(name: &str, i: i64) -> proto::AttributeProto {
    proto::AttributeProto {
        name: name.into(),
        r#type: proto::attribute_type::INT,
        i,
        ..Default::default()
    }
}

/// A new default-domain node with one output.
pub(super) fn node(
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
pub(super) fn splice(
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
pub(super) fn scalar_f32(t: &proto::TensorProto) -> Option<f32> {
    if t.data_type != DType::F32.onnx_code() || t.dims.iter().product::<i64>() != 1 {
        return None;
    }
    match (t.raw_data.as_slice(), t.float_data.first()) {
        ([a, b, c, d], _) => Some(f32::from_le_bytes([*a, *b, *c, *d])),
        (_, Some(v)) => Some(*v),
        _ => None,
    }
}

/// The values of an int64 initializer (shapes, axes), raw or listed.
pub(super) fn i64_values(t: &proto::TensorProto) -> Vec<i64> {
    if !t.int64_data.is_empty() {
        return t.int64_data.clone();
    }
    t.raw_data
        .chunks_exact(8)
        .filter_map(|c| c.try_into().ok().map(i64::from_le_bytes))
        .collect()
}

/// Removes initializers no node reads and that are not graph inputs (left behind by fusions).
/// Reads inside subgraphs (a `Scan` body reading outer-scope weights) count.
pub(super) fn drop_unused_initializers(graph: &mut proto::GraphProto) {
    pub(super) fn reads(g: &proto::GraphProto, used: &mut std::collections::HashSet<String>) {
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
pub(super) fn import_ms_domain(model: &mut ModelProto) {
    import_domain(model, MS_DOMAIN)
}

/// Declares operator domain `domain` (version 1) once a pass has emitted one of its ops.
pub(super) fn import_domain(model: &mut ModelProto, domain: &str) {
    if !model.opset_import.iter().any(|o| o.domain == domain) {
        model.opset_import.push(proto::OperatorSetIdProto {
            domain: domain.into(),
            version: 1,
        });
    }
}

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

pub(super) fn io(
    name: &str,
    dtype: DType,
    dims: Vec<Result<i64, String>>,
) -> proto::ValueInfoProto {
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
