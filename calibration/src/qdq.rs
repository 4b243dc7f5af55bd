//! Q/DQ placement for the DiT's linears, as TensorRT's explicit quantisation expects:
//!
//! ```text
//! x ─ QuantizeLinear(s_x, 0) ─ DequantizeLinear(s_x, 0) ─┐
//! W ─ QuantizeLinear(s_W, 0, axis 0) ─ DequantizeLinear ─ Gemm(transB=1) ─ y
//! ```
//!
//! Activations per tensor (`s_x` from calibration), weights per output channel
//! (`s_W[o] = max_i |W[o][i]| / 127`, as [`v2l_graphs::quant`] computes it), symmetric int8
//! with zero points 0; in ONNX Runtime's CPU form the same codes as uint8 with zero points 128
//! ([`QdqForm::zero_point`]). The f32 weight stays the initializer the `QuantizeLinear` reads: the
//! LoRA base, and what a fused LoRA replaces (with its channel scales recomputed).

use std::collections::HashMap;
use std::path::Path;

use v2l_graphs::dtype::DType;
use v2l_graphs::passes::PassError;
use v2l_graphs::proto::{self, ModelProto};

pub use v2l_contracts::io::QdqNames;

/// The Gemm reading each of `weights` directly as its `B` (`transB=1`), by weight.
fn gemms(
    graph: &proto::GraphProto,
    weights: &[String],
) -> Result<HashMap<String, usize>, PassError> {
    let mut found = HashMap::new();
    for (i, n) in graph.node.iter().enumerate() {
        let Some(w) = n.input.get(1).filter(|b| weights.contains(b)) else {
            continue;
        };
        let trans_b = n.attribute.iter().any(|a| a.name == "transB" && a.i == 1);
        if n.op_type != "Gemm"
            || !n.domain.is_empty()
            || !trans_b
            || found.insert(w.clone(), i).is_some()
        {
            return Err(PassError::NotGemm(w.clone()));
        }
    }
    if let Some(w) = weights.iter().find(|w| !found.contains_key(*w)) {
        return Err(PassError::NotGemm(w.clone()));
    }
    Ok(found)
}

/// Adds the tensor entering each linear of `weights` (the Gemm's `A`) as a graph output, so
/// a runtime can observe it. Returns (weight, observed tensor) pairs.
pub fn observe_linear_inputs(
    model: &mut ModelProto,
    weights: &[String],
) -> Result<Vec<(String, String)>, PassError> {
    let graph = model.graph.get_or_insert_with(Default::default);
    let by_weight = gemms(graph, weights)?;
    let mut pairs = Vec::with_capacity(weights.len());
    for w in weights {
        let x = by_weight
            .get(w)
            .and_then(|&i| graph.node.get(i))
            .and_then(|n| n.input.first())
            .cloned()
            .ok_or_else(|| PassError::NotGemm(w.clone()))?;
        if !graph.output.iter().any(|o| o.name == x) {
            graph
                .output
                .push(proto::ValueInfoProto::of_type(&x, DType::F32));
        }
        pairs.push((w.clone(), x));
    }
    Ok(pairs)
}

/// How the quantised product is written, per backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QdqForm {
    /// `DQ(x), DQ(W) → Gemm(transB=1)`: TensorRT's explicit quantisation reads it, and the LoRA
    /// target stays the direct input of the weight's `QuantizeLinear`.
    Gemm,
    /// `DQ(x), DQ(Q(Wᵀ, axis 1)) → MatMul (→ Add bias)`: what ONNX Runtime's CPU provider fuses
    /// into `MatMulIntegerToFloat` (with its `MatMulAddFusion` off, which would otherwise turn
    /// MatMul + Add back into a Gemm first). One 2,756×3,072×3,072 product here: 0.029 s
    /// against 0.25 s for the Gemm form, which ORT runs dequantised in f32.
    MatMul,
    /// The MatMul form with int8 zero points 0 (s8 weights): ONNX Runtime's u8·s8 kernel,
    /// for engines that run only on VNNI CPUs (`v2l-compile --int8-gemm u8s8`).
    MatMulS8,
}

impl QdqForm {
    /// The type and value of every zero point (activations and weights alike; the quantised
    /// values are the same symmetric ±127 codes either way):
    /// - `Gemm` (TensorRT): int8, 0, as its explicit quantisation requires;
    /// - `MatMul` (ONNX Runtime's CPU provider): uint8, 128. ONNX Runtime turns int8 Q/DQ
    ///   activations into uint8 on x86 and would pair them with int8 weights in its u8·s8
    ///   kernel, which saturates int16 pair sums on CPUs without VNNI; uint8 weights take its
    ///   u8·u8 kernel, exact on every x86-64 CPU (`v2l_runtime::cpu`, docs/precision.md).
    pub fn zero_point(self) -> (DType, u8) {
        match self {
            QdqForm::Gemm | QdqForm::MatMulS8 => (DType::I8, 0),
            QdqForm::MatMul => (DType::U8, 128),
        }
    }
}

/// Places Q/DQ on every linear of `weights` (f32 initializers of the model at `source`),
/// with the activation scale `input_scale(weight)`, in `form`. Returns the number of linears.
pub fn insert_qdq(
    model: &mut ModelProto,
    source: &Path,
    weights: &[String],
    input_scale: &dyn Fn(&str) -> f32,
    form: QdqForm,
) -> Result<usize, PassError> {
    let graph = model.graph.get_or_insert_with(Default::default);
    let by_weight = gemms(graph, weights)?;
    let mut channel_scales: HashMap<String, Vec<f32>> = HashMap::new();
    v2l_graphs::for_each_initializer(source, weights, &mut |name, dtype, dims, bytes| {
        let bad = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidData, m);
        let (&[out, inp], Some(w), DType::F32) =
            (dims, v2l_graphs::dtype::f32_values(&bytes, dtype), dtype)
        else {
            return Err(bad(format!(
                "`{name}`: Q/DQ takes a 2-D f32 weight, found {dtype}{dims:?} (export with `--weight-dtype f32`)"
            )));
        };
        let s = v2l_graphs::quant::int8_scales_per_output(&w, out as usize, inp as usize)
            .ok_or_else(|| bad(format!("`{name}`: not finite")))?;
        channel_scales.insert(name.to_string(), s);
        Ok(())
    })
    .map_err(|e| PassError::Io {
        path: source.to_path_buf(),
        source: e,
    })?;
    let at: HashMap<usize, &String> = by_weight.iter().map(|(w, &i)| (i, w)).collect();
    let mut nodes = Vec::with_capacity(graph.node.len() + 4 * weights.len());
    let mut inits = Vec::with_capacity(4 * weights.len());
    for (i, mut n) in std::mem::take(&mut graph.node).into_iter().enumerate() {
        let Some(&w) = at.get(&i) else {
            nodes.push(n);
            continue;
        };
        let names = QdqNames::of(w);
        let scales = channel_scales.get(w).cloned().unwrap_or_default();
        let x = n.input.first().cloned().unwrap_or_default();
        inits.push(tensor(
            &names.input_scale,
            DType::F32,
            vec![],
            &input_scale(w).to_le_bytes(),
        ));
        let (zp_type, zp) = form.zero_point();
        inits.push(tensor(&names.input_zero_point, zp_type, vec![], &[zp]));
        inits.push(tensor(
            &names.weight_scale,
            DType::F32,
            vec![scales.len() as i64],
            &scales
                .iter()
                .flat_map(|s| s.to_le_bytes())
                .collect::<Vec<u8>>(),
        ));
        inits.push(tensor(
            &names.weight_zero_point,
            zp_type,
            vec![scales.len() as i64],
            &vec![zp; scales.len()],
        ));
        let (xq, xdq, wq, wdq) = (
            format!("{w}.input_q"),
            format!("{w}.input_dq"),
            format!("{w}.q"),
            format!("{w}.dq"),
        );
        let scale = [names.input_scale.clone(), names.input_zero_point.clone()];
        let wscale = [names.weight_scale.clone(), names.weight_zero_point.clone()];
        nodes.push(node(
            "QuantizeLinear",
            &xq,
            [&x, &scale[0], &scale[1]],
            None,
        ));
        nodes.push(node(
            "DequantizeLinear",
            &xdq,
            [&xq, &scale[0], &scale[1]],
            None,
        ));
        match form {
            QdqForm::Gemm => {
                nodes.push(node(
                    "QuantizeLinear",
                    &wq,
                    [w, &wscale[0], &wscale[1]],
                    Some(0),
                ));
                nodes.push(node(
                    "DequantizeLinear",
                    &wdq,
                    [&wq, &wscale[0], &wscale[1]],
                    Some(0),
                ));
                if let Some(a) = n.input.get_mut(0) {
                    *a = xdq;
                }
                if let Some(b) = n.input.get_mut(1) {
                    *b = wdq;
                }
                nodes.push(n);
            }
            QdqForm::MatMul | QdqForm::MatMulS8 => {
                let wt = format!("{w}.t");
                nodes.push(proto::NodeProto {
                    input: vec![w.clone()],
                    output: vec![wt.clone()],
                    name: format!("{wt}/Transpose"),
                    op_type: "Transpose".into(),
                    attribute: vec![proto::AttributeProto {
                        name: "perm".into(),
                        r#type: proto::attribute_type::INTS,
                        ints: vec![1, 0],
                        ..Default::default()
                    }],
                    ..Default::default()
                });
                nodes.push(node(
                    "QuantizeLinear",
                    &wq,
                    [&wt, &wscale[0], &wscale[1]],
                    Some(1),
                ));
                nodes.push(node(
                    "DequantizeLinear",
                    &wdq,
                    [&wq, &wscale[0], &wscale[1]],
                    Some(1),
                ));
                let y = n.output.first().cloned().unwrap_or_default();
                let bias = n.input.get(2).filter(|b| !b.is_empty()).cloned();
                let product = if bias.is_some() {
                    format!("{y}.mm")
                } else {
                    y.clone()
                };
                nodes.push(proto::NodeProto {
                    input: vec![xdq, wdq],
                    output: vec![product.clone()],
                    name: format!("{}/MatMul", n.name),
                    op_type: "MatMul".into(),
                    ..Default::default()
                });
                if let Some(b) = bias {
                    nodes.push(proto::NodeProto {
                        input: vec![product, b],
                        output: vec![y],
                        name: format!("{}/Add", n.name),
                        op_type: "Add".into(),
                        ..Default::default()
                    });
                }
            }
        }
    }
    graph.node = nodes;
    graph.initializer.extend(inits);
    Ok(by_weight.len())
}

fn tensor(name: &str, dtype: DType, dims: Vec<i64>, bytes: &[u8]) -> proto::TensorProto {
    proto::TensorProto {
        name: name.into(),
        dims,
        data_type: dtype.onnx_code(),
        raw_data: bytes.to_vec(),
        ..Default::default()
    }
}

fn node(op: &str, out: &str, inputs: [&String; 3], axis: Option<i64>) -> proto::NodeProto {
    proto::NodeProto {
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![out.into()],
        name: format!("{out}/{op}"),
        op_type: op.into(),
        attribute: axis
            .map(|a| proto::AttributeProto {
                name: "axis".into(),
                r#type: proto::attribute_type::INT,
                i: a,
                ..Default::default()
            })
            .into_iter()
            .collect(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use v2l_graphs::{save, ExternalData, Graph, TensorData};

    fn model(dir: &Path) -> std::path::PathBuf {
        let mut g = Graph::new("t");
        let x = g.input("x", DType::F32, vec!["n".into(), 3.into()]);
        let w: Vec<f32> = vec![1.0, -2.0, 0.5, 0.25, 0.0, -0.125];
        let w = g.initializer(
            "lin.weight",
            DType::F32,
            vec![2, 3],
            TensorData::Owned(bytemuck::cast_slice(&w).to_vec()),
        );
        let y = g.linear(&x, &w, None, 2);
        g.output(&y, "y", DType::F32, vec!["n".into(), 2.into()]);
        let p = dir.join("m.onnx");
        save(&g, &p, ExternalData::Auto).unwrap();
        p
    }

    #[test]
    fn each_linear_gets_activation_and_per_channel_weight_qdq() {
        let d = tempfile::tempdir().unwrap();
        let src = model(d.path());
        let mut m = v2l_graphs::read_model(&src).unwrap();
        let w = vec!["lin.weight".to_string()];
        let n = insert_qdq(&mut m, &src, &w, &|_| 0.5, QdqForm::Gemm).unwrap();
        assert_eq!(n, 1);
        let g = m.graph.as_ref().unwrap();
        let ops: Vec<&str> = g.node.iter().map(|n| n.op_type.as_str()).collect();
        let gemm = ops.iter().position(|o| *o == "Gemm").unwrap();
        assert_eq!(
            ops[gemm - 4..gemm],
            [
                "QuantizeLinear",
                "DequantizeLinear",
                "QuantizeLinear",
                "DequantizeLinear"
            ]
        );
        let gemm = &g.node[gemm];
        assert_eq!(gemm.input[..2], ["lin.weight.input_dq", "lin.weight.dq"]);
        let names = QdqNames::of("lin.weight");
        let init = |n: &str| g.initializer.iter().find(|t| t.name == n).unwrap();
        // Channel scales: max |row| / 127; the weight itself is still the f32 initializer.
        let ws: Vec<f32> = bytemuck::pod_collect_to_vec(&init(&names.weight_scale).raw_data);
        assert_eq!(ws, [2.0 / 127.0, 0.25 / 127.0]);
        assert_eq!(init(&names.input_scale).raw_data, 0.5f32.to_le_bytes());
        assert_eq!(
            init(&names.input_zero_point).data_type,
            DType::I8.onnx_code()
        );
        assert!(g.initializer.iter().any(|t| t.name == "lin.weight"));
    }

    /// The CPU form: the weight transposed, quantised along its output axis (now 1), into a
    /// MatMul whose output keeps the Gemm's name.
    #[test]
    fn the_matmul_form_transposes_the_weight_and_keeps_the_output_name() {
        let d = tempfile::tempdir().unwrap();
        let src = model(d.path());
        let mut m = v2l_graphs::read_model(&src).unwrap();
        let gemm_out = {
            let g = m.graph.as_ref().unwrap();
            g.node.iter().find(|n| n.op_type == "Gemm").unwrap().output[0].clone()
        };
        let w = vec!["lin.weight".to_string()];
        insert_qdq(&mut m, &src, &w, &|_| 0.5, QdqForm::MatMul).unwrap();
        let g = m.graph.as_ref().unwrap();
        let ops: Vec<&str> = g.node.iter().map(|n| n.op_type.as_str()).collect();
        assert!(!ops.contains(&"Gemm"), "{ops:?}");
        let t = g.node.iter().find(|n| n.op_type == "Transpose").unwrap();
        assert_eq!(t.input, ["lin.weight"]);
        let q = g
            .node
            .iter()
            .find(|n| n.op_type == "QuantizeLinear" && n.input[0] == t.output[0])
            .unwrap();
        assert_eq!(q.attribute[0].i, 1);
        let mm = g.node.iter().find(|n| n.op_type == "MatMul").unwrap();
        assert_eq!(mm.output[0], gemm_out);
    }

    #[test]
    fn observed_inputs_become_outputs_and_unknown_weights_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let src = model(d.path());
        let mut m = v2l_graphs::read_model(&src).unwrap();
        let pairs = observe_linear_inputs(&mut m, &["lin.weight".into()]).unwrap();
        let g = m.graph.as_ref().unwrap();
        assert!(g.output.iter().any(|o| o.name == pairs[0].1));
        let e = observe_linear_inputs(&mut m, &["nope.weight".into()]).unwrap_err();
        assert!(e.to_string().contains("nope.weight"), "{e}");
    }
}
