//! The LoRA strategies' graph passes: targeted weights as inputs, low-rank branches as inputs.

use std::collections::HashMap;

use super::edit::*;
use crate::builder::{attr_proto, Attr};
use crate::dtype::DType;
use crate::proto::{self, ModelProto};

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

/// Splits the targeted weights `names` out of `model` for a GPU engine's `bound` strategy, which
/// makes them on the device: they become required inputs of `model` (as
/// [`bind_weights_as_inputs`]) and the returned graph computes each one from its initializer
/// (renamed `<name>.base`, its data where it was) and a LoRA's factors,
/// `<name> = <module>.lora_B · <module>.lora_A + <name>.base`, one `Gemm` per weight in the
/// weight's own type (`A [rank, in]`, `B [out, rank]`, the LoRA's scale folded into B). A GPU
/// GEMM sums in f32 and rounds each merged weight once, as a fuse on the host does.
pub fn lora_merge_graph(model: &mut ModelProto, names: &[String]) -> Result<ModelProto, PassError> {
    let graph = model.graph.get_or_insert_with(Default::default);
    let mut merge = proto::GraphProto {
        name: "lora_merge".into(),
        ..Default::default()
    };
    for (k, name) in names.iter().enumerate() {
        let mut base = graph
            .initializer
            .iter()
            .find(|t| &t.name == name)
            .cloned()
            .ok_or_else(|| PassError::MissingInitializer(name.clone()))?;
        let [out, inp] = base.dims[..] else {
            return Err(PassError::Unsupported(format!(
                "`{name}` has shape {:?}; a LoRA merges into a 2-D weight",
                base.dims
            )));
        };
        // `[out, in]` as a `Linear` holds it: read only as a `Gemm`'s B, transposed.
        let readers: Vec<&proto::NodeProto> = graph
            .node
            .iter()
            .filter(|n| n.input.iter().any(|i| i == name))
            .collect();
        let linear = |n: &&proto::NodeProto| {
            n.op_type == "Gemm"
                && n.input.get(1) == Some(name)
                && attr_i(n, "transB") == Some(1)
                && attr_i(n, "transA").unwrap_or(0) == 0
        };
        if readers.is_empty() || !readers.iter().all(linear) {
            return Err(PassError::Unsupported(format!(
                "`{name}` is read other than as a linear layer's weight (a Gemm's B, transposed)"
            )));
        }
        let dtype = DType::from_onnx_code(base.data_type).unwrap_or(DType::F32);
        let [a, b, _] = lora_input_names(name);
        let rank = || Err(format!("rank_{k}"));
        merge.input.push(io(&a, dtype, vec![rank(), Ok(inp)]));
        merge.input.push(io(&b, dtype, vec![Ok(out), rank()]));
        merge.output.push(io(name, dtype, vec![Ok(out), Ok(inp)]));
        base.name = format!("{name}.base");
        merge.node.push(proto::NodeProto {
            input: vec![b, a, base.name.clone()],
            output: vec![name.clone()],
            name: format!("{name}/merge"),
            op_type: "Gemm".into(),
            ..Default::default()
        });
        merge.initializer.push(base);
    }
    bind_weights_as_inputs(model, names)?;
    Ok(ModelProto {
        ir_version: model.ir_version,
        producer_name: model.producer_name.clone(),
        opset_import: model
            .opset_import
            .iter()
            .filter(|o| o.domain.is_empty() || o.domain == "ai.onnx")
            .cloned()
            .collect(),
        graph: Some(merge),
        ..Default::default()
    })
}

/// The name of a branch's scale node ends in this: the one node of a branch a lowering to
/// bf16/fp16 keeps in f32 (`passes/precision.rs`).
pub const LORA_SCALE_NODE: &str = "/lora_scaled";
const SCALED: &str = "scaled";

/// Input names of the branch added for weight `name` (`<module>.weight`).
pub fn lora_input_names(weight: &str) -> [String; 3] {
    let module = weight.strip_suffix(".weight").unwrap_or(weight);
    [
        format!("{module}.lora_A"),
        format!("{module}.lora_B"),
        format!("{module}.lora_scale"),
    ]
}

/// Whether `input` is a LoRA factor input of [`add_lora_branches`] or [`lora_merge_graph`]
/// (`<module>.lora_A` or `<module>.lora_B`).
pub fn is_factor(input: &str) -> bool {
    input.ends_with(".lora_A") || input.ends_with(".lora_B")
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
        // Factors per group of samples: A [Bf, r, in], B [Bf, out, r], scale [Bf, 1, 1], with
        // Bf any divisor of the DiT's batch: 1 (one LoRA for the whole batch), one per request
        // (its guidance samples together) or one per sample. The 2-D activations [rows, in]
        // become [Bf, rows / Bf, in]: rows are sample-major, so each group's tokens meet its
        // own factors.
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
            // The scale on the rank-wide product, not the output-wide one: the same sum for a
            // fraction of the traffic.
            ("Mul", vec![t("down"), s.clone()], SCALED, vec![]),
            ("Transpose", vec![b.clone()], "b_t", perm()),
            ("MatMul", vec![t("scaled"), t("b_t")], "up", vec![]),
            ("Reshape", vec![t("up"), y_shape], "flat", vec![]),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builder::TensorData;
    use crate::saved_model as model;
    use crate::{Attr, Graph};

    /// `x [n, 3] → y [n, 2]` through a `Linear` weight `l.weight [2, 3]` (`trans_b`: as torch
    /// exports it, else stored `[3, 2]` and read untransposed).
    fn linear(trans_b: bool) -> Graph {
        let mut g = Graph::new("t");
        let x = g.input("x", DType::F32, vec!["n".into(), 3.into()]);
        let dims = if trans_b { vec![2, 3] } else { vec![3, 2] };
        let bytes = (0..6).flat_map(|v| (v as f32).to_le_bytes()).collect();
        let w = g.initializer("l.weight", DType::F32, dims, TensorData::Owned(bytes));
        let y = g.op(
            "Gemm",
            &[&x, &w],
            vec![("transB", Attr::Int(trans_b as i64))],
        );
        g.output(&y, "y", DType::F32, vec!["n".into(), 2.into()]);
        g
    }

    #[test]
    fn a_merge_graph_makes_each_weight_from_its_base_and_factors() {
        let mut m = model(&linear(true));
        let merge = lora_merge_graph(&mut m, &["l.weight".to_string()]).unwrap();
        // The DiT side takes the weight as an input, holding no copy.
        let g = m.graph.as_ref().unwrap();
        assert!(g.initializer.is_empty());
        assert!(g.input.iter().any(|i| i.name == "l.weight"));
        // The merge side: `l.weight = l.lora_B · l.lora_A + l.weight.base`.
        let g = merge.graph.as_ref().unwrap();
        assert_eq!(g.initializer.len(), 1);
        assert_eq!(g.initializer[0].name, "l.weight.base");
        assert_eq!(g.initializer[0].dims, [2, 3]);
        let n = &g.node[..];
        assert_eq!(n.len(), 1);
        assert_eq!(n[0].op_type, "Gemm");
        assert_eq!(n[0].input, ["l.lora_B", "l.lora_A", "l.weight.base"]);
        assert_eq!(n[0].output, ["l.weight"]);
        assert!(
            n[0].attribute.is_empty(),
            "alpha, beta 1; nothing transposed"
        );
        let names: Vec<&str> = g.input.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(names, ["l.lora_A", "l.lora_B"]);
    }

    #[test]
    fn a_weight_read_untransposed_is_not_merged_as_out_by_in() {
        let mut m = model(&linear(false));
        let err = lora_merge_graph(&mut m, &["l.weight".to_string()]).unwrap_err();
        assert!(err.to_string().contains("a Gemm's B, transposed"), "{err}");
        let err = lora_merge_graph(&mut m, &["nope.weight".to_string()]).unwrap_err();
        assert!(err.to_string().contains("nope.weight"), "{err}");
    }
}
