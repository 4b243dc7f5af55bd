//! A graph moved to a newer ai.onnx opset, for kernels only the newer schemas have: ONNX
//! Runtime's CUDA `Conv` takes bf16 from schema 22 (v2l writes opset 17), ONNX's own
//! `Attention` exists from 23, and a kernel is chosen by the node's schema version, which the
//! model's opset fixes.
//!
//! Only what v2l's graphs use is moved, each by a rule: the reductions whose `axes` became an
//! input at 18, and the operators whose newer schemas only accept more types. Any other
//! operator whose schema changed on the way is an error, never a silent change of meaning.

use super::edit::{i64_tensor, PassError};
use crate::placement::schema_version;
use crate::proto::{self, ModelProto};

/// Reductions that read `axes` from an attribute up to opset 17 and from an input from 18.
const AXES_BECAME_INPUT: [&str; 8] = [
    "ReduceMean",
    "ReduceProd",
    "ReduceMax",
    "ReduceMin",
    "ReduceL1",
    "ReduceL2",
    "ReduceLogSum",
    "ReduceSumSquare",
];

/// Operators whose schemas from 18 to 23 only add element types (or attributes and inputs
/// whose defaults keep the old meaning: `Cast`'s `saturate` concerns float8 only, `Pad`'s
/// `axes` input is optional, `Split`'s `num_outputs` is an alternative to the `split` input).
/// Every schema change at 23 is one of these adding 4-bit float types; `Sin`, `Cos` and
/// `Round` changed at 22 only to take bf16.
const SAME_MEANING: [&str; 20] = [
    "Cast",
    "Cos",
    "Sin",
    "Round",
    "Constant",
    "ConstantOfShape",
    "Conv",
    "ConvTranspose",
    "Equal",
    "Flatten",
    "Identity",
    "Pad",
    "Reshape",
    "Shape",
    "Size",
    "Split",
    "Squeeze",
    "Transpose",
    "Unsqueeze",
    "AveragePool",
];

/// Moves `model`'s ai.onnx opset up to `to` (at most 23, the schemas the rules above were
/// read from). Returns how many nodes changed form; a model already at `to` or above is left
/// as it is.
pub fn upgrade_opset(model: &mut ModelProto, to: i64) -> Result<usize, PassError> {
    if to > 23 {
        return Err(PassError::Unsupported(format!(
            "opset {to}: the upgrade rules stop at 23"
        )));
    }
    let Some(from) = model
        .opset_import
        .iter()
        .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
        .map(|o| o.version)
    else {
        return Err(PassError::Unsupported(
            "the model imports no ai.onnx opset".into(),
        ));
    };
    if from >= to {
        return Ok(0);
    }
    let graph = model
        .graph
        .as_mut()
        .ok_or_else(|| PassError::Unsupported("the model has no graph".into()))?;
    let moves = |n: &proto::NodeProto| {
        (n.domain.is_empty() || n.domain == "ai.onnx")
            && schema_version(&n.op_type, from) != schema_version(&n.op_type, to)
    };
    // Every node checked before any changes: a refused model is left as it was.
    for n in graph.node.iter().filter(|n| moves(n)) {
        let op = n.op_type.as_str();
        if AXES_BECAME_INPUT.contains(&op) {
            if n.input.len() != 1 {
                return Err(PassError::Unsupported(format!(
                    "{}: {op} with {} inputs",
                    n.name,
                    n.input.len()
                )));
            }
        } else if !SAME_MEANING.contains(&op) {
            return Err(PassError::Unsupported(format!(
                "{}: no rule moves `{op}` from opset {from} to {to}",
                n.name
            )));
        }
    }
    let mut changed = 0;
    let mut axes_inputs = Vec::new();
    for n in graph.node.iter_mut() {
        if !moves(n) || !AXES_BECAME_INPUT.contains(&n.op_type.as_str()) {
            continue;
        }
        // Without `axes` it reduces every axis, in both forms.
        if let Some(i) = n.attribute.iter().position(|a| a.name == "axes") {
            let axes = n.attribute.remove(i).ints;
            let name = format!("{}/axes", n.name);
            n.input.push(name.clone());
            axes_inputs.push(i64_tensor(name, &axes));
            changed += 1;
        }
    }
    graph.initializer.extend(axes_inputs);
    if to >= 21 && from < 21 {
        changed += sizes_as_shape_products(graph) + drop_identities(graph);
    }
    for o in model.opset_import.iter_mut() {
        if o.domain.is_empty() || o.domain == "ai.onnx" {
            o.version = to;
        }
    }
    Ok(changed)
}

/// `Size(x)` as `ReduceProd(Shape(x))`: ONNX Runtime registers `Size` up to schema 13 on
/// CUDA (and for no bf16 on the CPU); `Shape` and the integer product it keeps on the CPU.
fn sizes_as_shape_products(graph: &mut proto::GraphProto) -> usize {
    let mut n_changed = 0;
    let mut nodes = Vec::with_capacity(graph.node.len());
    for n in std::mem::take(&mut graph.node) {
        if n.op_type != "Size" || !(n.domain.is_empty() || n.domain == "ai.onnx") {
            nodes.push(n);
            continue;
        }
        let shape = format!("{}.shape", n.name);
        nodes.extend(size_as_shape_product(&n, shape));
        n_changed += 1;
    }
    graph.node = nodes;
    n_changed
}

/// The `Shape` and `ReduceProd` (keepdims 0) that compute `Size` node `n`'s output exactly,
/// through the value `shape`.
pub(super) fn size_as_shape_product(n: &proto::NodeProto, shape: String) -> [proto::NodeProto; 2] {
    [
        proto::NodeProto {
            input: n.input.clone(),
            output: vec![shape.clone()],
            name: format!("{}/Shape", n.name),
            op_type: "Shape".into(),
            ..Default::default()
        },
        proto::NodeProto {
            input: vec![shape],
            output: n.output.clone(),
            name: format!("{}/ReduceProd", n.name),
            op_type: "ReduceProd".into(),
            attribute: vec![crate::builder::attr_proto(
                "keepdims",
                crate::builder::Attr::Int(0),
            )],
            ..Default::default()
        },
    ]
}

/// `Identity` nodes gone (ONNX Runtime registers it up to schema 19 on CUDA): readers read
/// its input instead; one naming a graph output renames its input's producer instead. One
/// that passes a graph input straight to an output stays.
fn drop_identities(graph: &mut proto::GraphProto) -> usize {
    use std::collections::HashSet;
    let outputs: HashSet<String> = graph.output.iter().map(|o| o.name.clone()).collect();
    let inputs: HashSet<String> = graph
        .input
        .iter()
        .map(|i| i.name.clone())
        .chain(graph.initializer.iter().map(|t| t.name.clone()))
        .collect();
    let rename = |graph: &mut proto::GraphProto, from: &str, to: &str| {
        for n in graph.node.iter_mut() {
            for v in n.input.iter_mut().chain(n.output.iter_mut()) {
                if v == from {
                    *v = to.to_string();
                }
            }
        }
    };
    let mut dropped = 0;
    let mut i = 0;
    while let Some(n) = graph.node.get(i) {
        let identity = n.op_type == "Identity" && (n.domain.is_empty() || n.domain == "ai.onnx");
        let (Some(x), Some(y), true) = (
            n.input.first().cloned(),
            n.output.first().cloned(),
            identity,
        ) else {
            i += 1;
            continue;
        };
        let (from, to) = if !outputs.contains(&y) {
            (y, x)
        } else if !inputs.contains(&x) && !outputs.contains(&x) {
            (x, y)
        } else {
            i += 1;
            continue;
        };
        graph.node.remove(i);
        rename(graph, &from, &to);
        dropped += 1;
    }
    dropped
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Attr, DType, Graph};

    fn model(op: &str, attrs: Vec<(&str, Attr)>) -> ModelProto {
        let mut g = Graph::new("t");
        let x = g.input("x", DType::F32, vec![2.into(), 3.into(), 4.into()]);
        let y = g.op(op, &[&x], attrs);
        g.output(&y, "y", DType::F32, vec![]);
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("m.onnx");
        crate::save(&g, &p, crate::ExternalData::Auto).unwrap();
        crate::read_model(&p).unwrap()
    }

    #[test]
    fn reduction_axes_become_an_input_and_other_schemas_are_refused() {
        let mut m = model(
            "ReduceMean",
            vec![("axes", Attr::Ints(vec![2])), ("keepdims", Attr::Int(1))],
        );
        // The axes, and the Identity naming the output (none has a CUDA kernel at 21).
        assert_eq!(upgrade_opset(&mut m, 22).unwrap(), 2);
        assert_eq!(m.opset_import[0].version, 22);
        let g = m.graph.as_ref().unwrap();
        assert_eq!(g.node.len(), 1);
        let n = &g.node[0];
        assert_eq!(n.output, ["y"]);
        assert!(n.attribute.iter().all(|a| a.name != "axes"));
        assert_eq!(n.input.len(), 2);
        let axes = g.initializer.iter().find(|t| t.name == n.input[1]).unwrap();
        assert_eq!(axes.raw_data, 2i64.to_le_bytes());
        // Again: already there.
        assert_eq!(upgrade_opset(&mut m, 22).unwrap(), 0);

        // Same meaning: the type only.
        let mut m = model("Transpose", vec![("perm", Attr::Ints(vec![0, 2, 1]))]);
        assert_eq!(upgrade_opset(&mut m, 22).unwrap(), 1);
        assert_eq!(m.opset_import[0].version, 22);

        // Size: the product of the shape.
        let mut m = model("Size", vec![]);
        upgrade_opset(&mut m, 22).unwrap();
        let ops: Vec<&str> = m
            .graph
            .as_ref()
            .unwrap()
            .node
            .iter()
            .map(|n| n.op_type.as_str())
            .collect();
        assert_eq!(ops, ["Shape", "ReduceProd"]);

        // No rule: refused, the model untouched.
        let mut m = model("Resize", vec![]);
        let e = upgrade_opset(&mut m, 22).unwrap_err().to_string();
        assert!(e.contains("no rule moves `Resize`"), "{e}");
        assert_eq!(m.opset_import[0].version, 17);
        assert!(upgrade_opset(&mut m, 24).is_err());

        // To 23: a schema that changed there (Transpose's 23 adds 4-bit floats) moves too.
        let mut m = model("Transpose", vec![("perm", Attr::Ints(vec![0, 2, 1]))]);
        assert_eq!(upgrade_opset(&mut m, 23).unwrap(), 1);
        assert_eq!(m.opset_import[0].version, 23);
    }
}
