//! An int8 CPU engine's linears moved onto v2l's operator `ai.v2l.QMatMul`
//! (`v2l_runtime::qgemm`): the same dynamic int8 linear as `com.microsoft.DynamicQuantizeMatMul`,
//! with a faster `vpdpbusd` kernel than ONNX Runtime's.

use std::collections::HashSet;

use super::edit::{MS_DOMAIN, V2L_DOMAIN};
use crate::dtype::DType;
use crate::proto::{ModelProto, NodeProto};

/// The operator's name in the `ai.v2l` domain.
pub const V2L_QMATMUL: &str = "QMatMul";

/// Whether `ai.v2l.QMatMul` runs this node: a `DynamicQuantizeMatMul` whose weights are an s8
/// initializer with no zero point (the `u8s8` scheme; `u8u8` weights keep ONNX Runtime's).
fn runs_on_v2l(n: &NodeProto, s8_inits: &HashSet<&str>) -> bool {
    n.op_type == "DynamicQuantizeMatMul"
        && n.domain == MS_DOMAIN
        && (3..=5).contains(&n.input.len())
        && n.input
            .get(1)
            .is_some_and(|b| s8_inits.contains(b.as_str()))
        && n.input.get(3).is_none_or(String::is_empty)
}

/// Moves every such node onto `ai.v2l.QMatMul(x, B, scale[, bias])`; returns how many.
pub fn v2l_qmatmul(model: &mut ModelProto) -> usize {
    let Some(graph) = model.graph.as_mut() else {
        return 0;
    };
    let s8: HashSet<String> = graph
        .initializer
        .iter()
        .filter(|t| t.data_type == DType::I8.onnx_code())
        .map(|t| t.name.clone())
        .collect();
    let s8: HashSet<&str> = s8.iter().map(String::as_str).collect();
    let mut moved = 0;
    for n in graph.node.iter_mut() {
        if runs_on_v2l(n, &s8) {
            let bias = n.input.get(4).filter(|b| !b.is_empty()).cloned();
            n.input.truncate(3);
            n.input.extend(bias);
            n.op_type = V2L_QMATMUL.into();
            n.domain = V2L_DOMAIN.into();
            n.name = format!(
                "{}/{V2L_QMATMUL}",
                n.name.trim_end_matches("/DynamicQuantizeMatMul")
            );
            moved += 1;
        }
    }
    if moved > 0 {
        super::edit::import_domain(model, V2L_DOMAIN);
    }
    moved
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{GraphProto, TensorProto};

    fn dqmm(name: &str, inputs: &[&str]) -> NodeProto {
        NodeProto {
            name: format!("{name}/DynamicQuantizeMatMul"),
            op_type: "DynamicQuantizeMatMul".into(),
            domain: MS_DOMAIN.into(),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![format!("{name}_y")],
            ..Default::default()
        }
    }

    fn init(name: &str, dt: DType) -> TensorProto {
        TensorProto {
            name: name.into(),
            data_type: dt.onnx_code(),
            dims: vec![4, 4],
            ..Default::default()
        }
    }

    /// s8 weights without a zero point move (bias kept, the empty zero point dropped); u8
    /// weights with their zero point 128, and weights that are not initializers, stay.
    #[test]
    fn only_s8_dynamic_linears_move() {
        let mut m = ModelProto {
            graph: Some(GraphProto {
                node: vec![
                    dqmm("a", &["x", "wa", "sa", "", "ba"]),
                    dqmm("b", &["x", "wb", "sb"]),
                    dqmm("c", &["x", "wc", "sc", "zc", "bc"]),
                    dqmm("d", &["x", "computed", "sd"]),
                ],
                initializer: vec![
                    init("wa", DType::I8),
                    init("wb", DType::I8),
                    init("wc", DType::U8),
                ],
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(v2l_qmatmul(&mut m), 2);
        let g = m.graph.as_ref().unwrap();
        assert_eq!(g.node[0].op_type, V2L_QMATMUL);
        assert_eq!(g.node[0].domain, V2L_DOMAIN);
        assert_eq!(g.node[0].input, ["x", "wa", "sa", "ba"]);
        assert_eq!(g.node[0].name, "a/QMatMul");
        assert_eq!(g.node[1].input, ["x", "wb", "sb"]);
        assert_eq!(g.node[2].op_type, "DynamicQuantizeMatMul");
        assert_eq!(g.node[3].op_type, "DynamicQuantizeMatMul");
        assert!(m.opset_import.iter().any(|o| o.domain == V2L_DOMAIN));
    }
}
