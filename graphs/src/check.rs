//! Checks a CPU can make on a graph meant for TensorRT, which cannot run here: what its parser
//! and refitter rely on, read off the graph itself.
//!
//! - standard ONNX ops only (TensorRT's parser knows no `com.microsoft` contrib op);
//! - every LoRA target read directly as the `B` of a `Gemm`/`MatMul` (a refit replaces that
//!   tensor; a `Cast` or `Transpose` in between would be folded into the engine and the refit
//!   would miss it), or in a static int8 graph by the `QuantizeLinear` of its Q/DQ pair;
//! - consistent types: the inputs of every op that needs one type have one type (a strongly
//!   typed network takes the graph's types as the precision), and the targets are stored in
//!   the type the engine's precision says.

use std::collections::HashMap;

use crate::dtype::DType;
use crate::proto::{self, ModelProto};

/// Ops whose float inputs must share one type (ONNX type constraint `T`), and how many of
/// their inputs that covers (`usize::MAX`: all).
const SAME_TYPE: &[(&str, usize)] = &[
    ("Add", 2),
    ("Sub", 2),
    ("Mul", 2),
    ("Div", 2),
    ("Gemm", 3),
    ("MatMul", 2),
    ("LayerNormalization", 3),
    ("Concat", usize::MAX),
    ("Max", usize::MAX),
    ("Min", usize::MAX),
    ("Sum", usize::MAX),
];

/// Every problem found, each naming the node or tensor; empty when the graph passes.
/// `lora_targets` are the weights a LoRA replaces, each with the type it must be stored in.
pub fn tensorrt_problems(model: &ModelProto, lora_targets: &[(String, DType)]) -> Vec<String> {
    let mut problems = Vec::new();
    let Some(graph) = model.graph.as_ref() else {
        return vec!["the model has no graph".into()];
    };
    for n in &graph.node {
        if !(n.domain.is_empty() || n.domain == "ai.onnx") {
            problems.push(format!(
                "node `{}` is {}.{}, not a standard ONNX op",
                n.name, n.domain, n.op_type
            ));
        }
    }
    let types = infer_types(graph);
    for (w, stored) in lora_targets {
        let readers: Vec<&proto::NodeProto> = graph
            .node
            .iter()
            .filter(|n| n.input.iter().any(|x| x == w))
            .collect();
        let direct = readers.iter().all(|n| {
            let gemm_b = matches!(n.op_type.as_str(), "Gemm" | "MatMul")
                && n.input.get(1) == Some(w)
                && n.input.first() != Some(w);
            let quantized = n.op_type == "QuantizeLinear" && n.input.first() == Some(w);
            n.domain.is_empty() && (gemm_b || quantized)
        });
        if readers.is_empty() || !direct {
            let ops: Vec<&str> = readers.iter().map(|n| n.op_type.as_str()).collect();
            problems.push(format!(
                "LoRA target `{w}` is not read directly as the B of a Gemm/MatMul (read by {ops:?})"
            ));
        }
        match types.get(w.as_str()) {
            Some(t) if t == stored => {}
            Some(t) => problems.push(format!(
                "LoRA target `{w}` is {t}, the engine's precision stores {stored}"
            )),
            None => problems.push(format!("LoRA target `{w}` is not in the graph")),
        }
    }
    for n in &graph.node {
        let Some(&(_, count)) = SAME_TYPE.iter().find(|(op, _)| *op == n.op_type) else {
            continue;
        };
        let float: Vec<(&str, DType)> = n
            .input
            .iter()
            .take(count)
            .filter(|x| !x.is_empty())
            .filter_map(|x| Some((x.as_str(), *types.get(x.as_str())?)))
            .filter(|(_, t)| t.is_float())
            .collect();
        if let Some((x, t)) = float
            .iter()
            .find(|(_, t)| Some(t) != float.first().map(|f| &f.1))
        {
            let first = float.first().map(|f| f.1).unwrap_or(*t);
            problems.push(format!(
                "node `{}` ({}) mixes {first} and {t} (input `{x}`)",
                n.name, n.op_type
            ));
        }
    }
    problems
}

/// Element types of the graph's tensors: declared for inputs and initializers, propagated for
/// node outputs (`Cast` gives its `to`, `Shape` int64, others the type of their first float
/// input). Enough for the ops v2l emits; an unknown op's output takes its first input's type.
pub(crate) fn infer_types(graph: &proto::GraphProto) -> HashMap<&str, DType> {
    let mut types: HashMap<&str, DType> = HashMap::new();
    for i in &graph.input {
        if let Some(proto::type_proto::Value::TensorType(t)) =
            i.r#type.as_ref().and_then(|t| t.value.as_ref())
        {
            if let Some(d) = DType::from_onnx_code(t.elem_type) {
                types.insert(i.name.as_str(), d);
            }
        }
    }
    for t in &graph.initializer {
        if let Some(d) = DType::from_onnx_code(t.data_type) {
            types.insert(t.name.as_str(), d);
        }
    }
    for n in &graph.node {
        let first_float = n
            .input
            .iter()
            .filter_map(|x| types.get(x.as_str()).copied())
            .find(|d| d.is_float());
        let first = n.input.first().and_then(|x| types.get(x.as_str()).copied());
        let out = match n.op_type.as_str() {
            "Cast" => n
                .attribute
                .iter()
                .find(|a| a.name == "to")
                .and_then(|a| DType::from_onnx_code(a.i as i32)),
            "Shape" | "Size" => Some(DType::I64),
            // The zero point's type, uint8 without one.
            "QuantizeLinear" => Some(
                n.input
                    .get(2)
                    .and_then(|z| types.get(z.as_str()).copied())
                    .unwrap_or(DType::U8),
            ),
            "Equal" | "Less" | "Greater" | "LessOrEqual" | "GreaterOrEqual" | "Not" | "And"
            | "Or" | "Xor" | "IsNaN" | "IsInf" => Some(DType::Bool),
            _ => first_float.or(first),
        };
        if let Some(d) = out {
            for (k, o) in n.output.iter().enumerate() {
                // LayerNormalization's mean and inverse deviation are f32 (stash_type 1).
                let d = match n.op_type.as_str() {
                    "LayerNormalization" if k > 0 => DType::F32,
                    // (y uint8, y_scale f32, y_zero_point uint8)
                    "DynamicQuantizeLinear" if k == 1 => DType::F32,
                    "DynamicQuantizeLinear" => DType::U8,
                    _ => d,
                };
                types.insert(o.as_str(), d);
            }
        }
    }
    types
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Graph, TensorData};

    fn model(via_cast: bool, weight: DType) -> ModelProto {
        let mut g = Graph::new("t");
        let x = g.input("x", DType::F32, vec![2.into(), 2.into()]);
        let w = g.initializer(
            "lin.weight",
            weight,
            vec![2, 2],
            TensorData::Owned(vec![0; 4 * weight.size()]),
        );
        let w = if via_cast { g.cast(&w, DType::F32) } else { w };
        let y = g.matmul(&x, &w);
        g.output(&y, "y", DType::F32, vec![2.into(), 2.into()]);
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("m.onnx");
        crate::save(&g, &p, crate::ExternalData::Auto).unwrap();
        crate::read_model(&p).unwrap()
    }

    #[test]
    fn a_direct_f32_target_passes() {
        let m = model(false, DType::F32);
        assert_eq!(
            tensorrt_problems(&m, &[("lin.weight".into(), DType::F32)]),
            Vec::<String>::new()
        );
    }

    #[test]
    fn casts_contrib_ops_mixed_types_and_wrong_storage_are_named() {
        // A Cast between weight and MatMul: the refit would miss it.
        let m = model(true, DType::BF16);
        let p = tensorrt_problems(&m, &[("lin.weight".into(), DType::BF16)]);
        assert!(p.iter().any(|p| p.contains("not read directly")), "{p:?}");
        // An f32 input against a bf16 weight: mixed types, and the wrong storage.
        let m = model(false, DType::BF16);
        let p = tensorrt_problems(&m, &[("lin.weight".into(), DType::F32)]);
        assert!(p.iter().any(|p| p.contains("mixes f32 and bf16")), "{p:?}");
        assert!(p.iter().any(|p| p.contains("is bf16")), "{p:?}");
        let mut m = model(false, DType::F32);
        let g = m.graph.as_mut().unwrap();
        g.node[0].domain = "com.microsoft".into();
        let p = tensorrt_problems(&m, &[]);
        assert!(
            p.iter().any(|p| p.contains("not a standard ONNX op")),
            "{p:?}"
        );
    }
}
