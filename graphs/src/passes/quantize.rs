//! Quantised linear layers: `Gemm(x, W, b, transB=1)` becomes one of ONNX Runtime's contrib ops
//! ([`WeightQuant`]):
//! - int8: `com.microsoft.DynamicQuantizeMatMul(x, W.int8, W.scale, ∅, b)`, weights symmetric
//!   int8 with one scale per output channel, the activation quantised per tensor on the fly;
//! - int4: `com.microsoft.MatMulNBits(x, W.int4, W.int4_scale, ∅, ∅, b)`, weight-only 4-bit in
//!   blocks of 32 along the input axis ([`crate::quant`]), accuracy level 4 (the kernel
//!   quantises activations to int8 per block for its VNNI/AMX path: the fastest here);
//! - 8-bit blocks: `com.microsoft.MatMulNBits` with `bits=8`, accuracy level 4: what an
//!   integer engine stores its adaptive-norm linears as (one row per sample; 1.125 bytes a
//!   weight, so the 42-block CogVideoX-5B DiT's 0.79 B of them take 0.89 GB instead of 3.2 GB).
//!
//! int8 is the CPU's fast path. Measured on one CogVideoX-5B
//! block at 1,378 tokens (ORT 1.31, 2 threads, this machine's AVX-512 VNNI/AMX CPU): 0.8 s a
//! step against 2.9 s in f32 and 3.1 s for `MatMulNBits` 8-bit (accuracy level 4), at rel L2
//! 2.3e-3 against PyTorch f32 — see docs/precision.md.
//!
//! The f32 weights are read one layer at a time from the model's own weight file and the int8
//! ones appended to a new external-data file, so quantising a 22 GB DiT never holds it whole.
//! The pass leaves the f32 initializers' entries out of the rewritten graph; the f32 weight file
//! itself is untouched (an int8 engine keeps it as the base LoRAs are fused from).

use std::collections::HashMap;
use std::path::Path;

use super::data_file::DataFile;
use super::edit::MS_DOMAIN;
use super::edit::{attr_i, import_ms_domain, PassError};
use crate::dtype::DType;
use crate::proto::{self, ModelProto};

/// `accuracy_level` of the 8-bit block-wise linears: 4, activations quantised to int8 per
/// block. Level 0 (f32 activations) made ONNX Runtime widen the whole weight on every call:
/// the 42-block step went from 6.4–8.1 s to 8.8–9.4 s (docs/precision.md). The op itself
/// adds ~5e-3 relative error at level 4 against ~1e-7 at level 0 (one 2×32×192 product,
/// ORT 1.31, the same on AVX-512 VNNI and AVX2-only CPUs).
const ACCURACY_8BIT: i64 = 4;

/// One tensor of a quantised weight: (type, dims, little-endian bytes).
pub type QuantTensor = (DType, Vec<i64>, Vec<u8>);

pub use v2l_contracts::dtype::WeightQuant;

/// What a [`WeightQuant`] scheme writes into a graph: its weights' tensors and zero point.
pub trait QuantScheme {
    /// The zero point's initializer, for the schemes that have one: `[out]` u8, all 128. It
    /// is the same for every weight of a shape, so a LoRA fused at run time leaves it as is.
    fn zero_point(self, weight: &str, out: usize) -> Option<(String, QuantTensor)>;

    /// Quantises one `[out, inp]` weight: the two tensors [`WeightQuant::names`] names, as
    /// (dtype, dims, bytes), or `None` when the values are not `out × inp` finite floats.
    fn quantize(self, w: &[f32], out: usize, inp: usize) -> Option<[QuantTensor; 2]>;
}

impl QuantScheme for WeightQuant {
    fn zero_point(self, weight: &str, out: usize) -> Option<(String, QuantTensor)> {
        (self == WeightQuant::Int8U8).then(|| {
            (
                format!("{weight}.zero_point"),
                (DType::U8, vec![out as i64], vec![128u8; out]),
            )
        })
    }

    fn quantize(self, w: &[f32], out: usize, inp: usize) -> Option<[QuantTensor; 2]> {
        let (o, i) = (out as i64, inp as i64);
        match self {
            WeightQuant::Int8 => {
                let mut q = vec![0i8; w.len()];
                let mut scale = vec![0f32; out];
                crate::quant::quantize_int8_per_output(w, out, inp, &mut q, &mut scale)?;
                Some([
                    (DType::I8, vec![i, o], bytemuck::cast_slice(&q).to_vec()),
                    (DType::F32, vec![o], bytemuck::cast_slice(&scale).to_vec()),
                ])
            }
            WeightQuant::Int8U8 => {
                let [(_, dims, codes), scale] = WeightQuant::Int8.quantize(w, out, inp)?;
                // q + 128 for q in -127..=127: flipping the sign bit of the two's complement.
                let codes = codes.into_iter().map(|b| b ^ 0x80).collect();
                Some([(DType::U8, dims, codes), scale])
            }
            WeightQuant::Int4 | WeightQuant::Int8Block => {
                let bits = self.bits();
                let (codes, scales) = crate::quant::quantize_blockwise(w, out, inp, bits)?;
                let blocks = inp.div_ceil(crate::quant::BLOCK) as i64;
                let blob = (crate::quant::BLOCK * bits as usize / 8) as i64;
                Some([
                    (DType::U8, vec![o, blocks, blob], codes),
                    (
                        DType::F32,
                        vec![o * blocks],
                        bytemuck::cast_slice(&scales).to_vec(),
                    ),
                ])
            }
        }
    }
}

/// The graph side of a scheme: its `MatMulNBits` level and the node it writes.
trait SchemeNode {
    fn accuracy_level(self) -> i64;
    fn node(self, weight: &str, x: String, bias: String, out: i64, inp: i64) -> proto::NodeProto;
}

impl SchemeNode for WeightQuant {
    /// `MatMulNBits`' `accuracy_level`: 4 (activations int8 per block, the VNNI/AMX path) for
    /// the token-wise int4 linears; [`ACCURACY_8BIT`] for the conditioning linears, whose
    /// one-row input is not worth quantising.
    fn accuracy_level(self) -> i64 {
        match self {
            WeightQuant::Int4 => 4,
            WeightQuant::Int8 | WeightQuant::Int8U8 | WeightQuant::Int8Block => ACCURACY_8BIT,
        }
    }

    /// The node that replaces `Gemm(x, W, bias, transB=1)` for a `[out, inp]` weight.
    fn node(self, weight: &str, x: String, bias: String, out: i64, inp: i64) -> proto::NodeProto {
        use crate::builder::{attr_proto, Attr};
        let [q, s] = self.names(weight);
        let (op, input, attribute) = match self {
            WeightQuant::Int8 => (
                "DynamicQuantizeMatMul",
                vec![x, q, s, String::new(), bias],
                vec![],
            ),
            WeightQuant::Int8U8 => (
                "DynamicQuantizeMatMul",
                vec![x, q, s, format!("{weight}.zero_point"), bias],
                vec![],
            ),
            WeightQuant::Int4 | WeightQuant::Int8Block => (
                "MatMulNBits",
                vec![x, q, s, String::new(), String::new(), bias],
                vec![
                    attr_proto("K", Attr::Int(inp)),
                    attr_proto("N", Attr::Int(out)),
                    attr_proto("bits", Attr::Int(i64::from(self.bits()))),
                    attr_proto("block_size", Attr::Int(crate::quant::BLOCK as i64)),
                    attr_proto("accuracy_level", Attr::Int(self.accuracy_level())),
                ],
            ),
        };
        proto::NodeProto {
            input,
            op_type: op.into(),
            domain: MS_DOMAIN.into(),
            attribute,
            ..Default::default()
        }
    }
}

/// What [`quantize_linears_int8`] did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Quantized {
    /// Linear layers rewritten.
    pub layers: usize,
    /// Bytes of f32 weights replaced and of int8 weights + scales written.
    pub f32_bytes: u64,
    pub int8_bytes: u64,
    /// The initializer entries of the int8 weights and scales, pointing into the data file.
    pub tensors: Vec<proto::TensorProto>,
}

/// Which Gemm node consumes each of `weights`, checked: `transB=1`, no `transA`, unit
/// `alpha`/`beta`, a bias absent or `[out]`, and every weight found exactly once.
fn gemms_of(
    graph: &proto::GraphProto,
    weights: &[String],
) -> Result<HashMap<usize, (String, Option<usize>)>, PassError> {
    let dims: HashMap<&str, &[i64]> = graph
        .initializer
        .iter()
        .map(|t| (t.name.as_str(), t.dims.as_slice()))
        .collect();
    let casts = super::edit::cast_initializers(graph);
    // The initializer behind an input, and the Cast in between (f16/bf16-stored weights).
    let source = |name: &str| -> Option<(String, Option<usize>)> {
        match casts.get(name) {
            Some((i, w)) => Some((w.to_string(), Some(*i))),
            None => dims.contains_key(name).then(|| (name.to_string(), None)),
        }
    };
    let mut found: HashMap<&str, (usize, Option<usize>)> = HashMap::new();
    for (i, n) in graph.node.iter().enumerate() {
        if n.op_type != "Gemm" || !n.domain.is_empty() {
            continue;
        }
        let Some((w, cast)) = n.input.get(1).and_then(|b| source(b)) else {
            continue;
        };
        let Some(w) = weights.iter().find(|x| **x == w) else {
            continue;
        };
        let plain = attr_i(n, "transB") == Some(1)
            && attr_i(n, "transA").unwrap_or(0) == 0
            && ["alpha", "beta"].iter().all(|a| {
                n.attribute
                    .iter()
                    .find(|x| x.name == *a)
                    .is_none_or(|x| x.f == 1.0)
            });
        let out = dims.get(w.as_str()).and_then(|d| d.first());
        let bias_ok = match n.input.get(2).filter(|b| !b.is_empty()) {
            None => true,
            Some(b) => source(b)
                .and_then(|(b, _)| dims.get(b.as_str()))
                .is_some_and(|d| d.len() == 1 && d.first() == out),
        };
        // The Cast must feed this Gemm alone, since it goes with the f32 weight.
        let cast_alone = cast.is_none_or(|_| {
            graph
                .node
                .iter()
                .filter(|m| m.input.iter().any(|x| Some(x) == n.input.get(1)))
                .count()
                == 1
        });
        if !plain || !bias_ok || !cast_alone || found.insert(w, (i, cast)).is_some() {
            return Err(PassError::NotGemm(w.clone()));
        }
    }
    if let Some(w) = weights.iter().find(|w| !found.contains_key(w.as_str())) {
        return Err(if dims.contains_key(w.as_str()) {
            PassError::NotGemm(w.clone())
        } else {
            PassError::MissingInitializer(w.clone())
        });
    }
    Ok(found
        .into_iter()
        .map(|(w, (i, cast))| (i, (w.to_string(), cast)))
        .collect())
}

/// Rewrites every `Gemm` whose B input is one of `weights` (f32 initializers of the model read
/// from `source`, the model file `model` was read from, each with how it is stored) into that
/// op, writing the quantised weights to `data` (a file beside the model that will be written;
/// it is referenced by file name). Every named weight must be consumed by such a Gemm
/// ([`gemms_of`]).
pub fn quantize_linears(
    model: &mut ModelProto,
    source: &Path,
    weights: &[(String, WeightQuant)],
    data: &Path,
) -> Result<Quantized, PassError> {
    let names: Vec<String> = weights.iter().map(|(w, _)| w.clone()).collect();
    gemms_of(model.graph.get_or_insert_with(Default::default), &names)?;
    let done = write_quantized_weights(source, weights, data)?;
    use_quantized_weights(model, weights, &done.tensors)?;
    Ok(done)
}

/// Quantises the named f32 weights of the model at `source` into the external-data file `data`
/// (written whole under a temporary name), returning the tensor entries that point into it.
fn write_quantized_weights(
    source: &Path,
    weights: &[(String, WeightQuant)],
    data: &Path,
) -> Result<Quantized, PassError> {
    let mut file = DataFile::create(data)?;
    let mut done = Quantized::default();
    let how_of: HashMap<&str, WeightQuant> =
        weights.iter().map(|(w, q)| (w.as_str(), *q)).collect();
    let names: Vec<String> = weights.iter().map(|(w, _)| w.clone()).collect();
    crate::write::for_each_initializer(source, &names, &mut |name, dtype, d, bytes| {
        let bad = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidData, m);
        let how = *how_of
            .get(name)
            .ok_or_else(|| bad(format!("`{name}`: not a weight to quantise")))?;
        let (&[out, inp], Some(w)) = (d, crate::dtype::f32_values(&bytes, dtype)) else {
            return Err(bad(format!(
                "`{name}`: quantisation takes a 2-D f32/f16/bf16 weight, found {dtype}{d:?}"
            )));
        };
        let (out, inp) = (out as usize, inp as usize);
        let tensors = how
            .quantize(&w, out, inp)
            .ok_or_else(|| bad(format!("`{name}`: not finite, or not {out}×{inp} values")))?;
        let zero_point = how.zero_point(name, out);
        let named = how.names(name).into_iter().zip(tensors).chain(zero_point);
        for (tensor_name, (dtype, dims, bytes)) in named {
            done.int8_bytes += bytes.len() as u64;
            file.append(tensor_name, dtype, dims, &bytes)?;
        }
        done.layers += 1;
        done.f32_bytes += bytes.len() as u64;
        Ok(())
    })
    .map_err(|e| PassError::Io {
        path: source.to_path_buf(),
        source: e,
    })?;
    done.tensors = file.finish()?;
    Ok(done)
}

/// Points the Gemms reading `weights` at quantised weights already written (`tensors`, from
/// [`quantize_linears`] on the same weights): how a second graph of the same engine (the
/// LoRA-branch variant) shares one weight file.
pub fn use_quantized_weights(
    model: &mut ModelProto,
    weights: &[(String, WeightQuant)],
    tensors: &[proto::TensorProto],
) -> Result<(), PassError> {
    let graph = model.graph.get_or_insert_with(Default::default);
    let how_of: HashMap<&str, WeightQuant> =
        weights.iter().map(|(w, q)| (w.as_str(), *q)).collect();
    let names: Vec<String> = weights.iter().map(|(w, _)| w.clone()).collect();
    let by_node = gemms_of(graph, &names)?;
    let dims: HashMap<&str, [i64; 2]> = graph
        .initializer
        .iter()
        .filter_map(|t| match t.dims.as_slice() {
            &[o, i] => Some((t.name.as_str(), [o, i])),
            _ => None,
        })
        .collect();
    let have: std::collections::HashSet<&str> = tensors.iter().map(|t| t.name.as_str()).collect();
    for (w, how) in weights {
        let zero_point = how.zero_point(w, 0).map(|(n, _)| n);
        if let Some(missing) = how
            .names(w)
            .iter()
            .chain(zero_point.as_ref())
            .find(|n| !have.contains(n.as_str()))
        {
            return Err(PassError::MissingInitializer(missing.clone()));
        }
    }
    let casts: std::collections::HashSet<usize> =
        by_node.values().filter_map(|(_, c)| *c).collect();
    for (i, n) in graph.node.iter_mut().enumerate() {
        let Some((w, _)) = by_node.get(&i) else {
            continue;
        };
        let x = n.input.first().cloned().unwrap_or_default();
        let bias = n.input.get(2).cloned().unwrap_or_default();
        let [out, inp] = dims.get(w.as_str()).copied().unwrap_or([0, 0]);
        let Some(how) = how_of.get(w.as_str()) else {
            continue;
        };
        let new = how.node(w, x, bias, out, inp);
        n.op_type = new.op_type;
        n.domain = new.domain;
        n.input = new.input;
        n.attribute = new.attribute;
    }
    // The Casts that widened f16/bf16 weights go with them.
    let mut i = 0;
    graph.node.retain(|_| {
        i += 1;
        !casts.contains(&(i - 1))
    });
    let replaced: std::collections::HashSet<&String> = names.iter().collect();
    graph.initializer.retain(|t| !replaced.contains(&t.name));
    graph.initializer.extend(tensors.iter().cloned());
    import_ms_domain(model);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{save, ExternalData, Graph, TensorData};

    fn model(dir: &Path) -> std::path::PathBuf {
        let mut g = Graph::new("t");
        let x = g.input("x", DType::F32, vec!["n".into(), 3.into()]);
        let w: Vec<f32> = (0..6).map(|v| v as f32 - 2.5).collect();
        let w = g.initializer(
            "lin.weight",
            DType::F32,
            vec![2, 3],
            TensorData::Owned(bytemuck::cast_slice(&w).to_vec()),
        );
        let b = g.initializer(
            "lin.bias",
            DType::F32,
            vec![2],
            TensorData::Owned(bytemuck::cast_slice(&[0.5f32, -0.5]).to_vec()),
        );
        let y = g.linear(&x, &w, Some(&b), 2);
        g.output(&y, "y", DType::F32, vec!["n".into(), 2.into()]);
        let p = dir.join("m.onnx");
        save(&g, &p, ExternalData::Always).unwrap();
        p
    }

    /// [`model`] written to a temporary directory and read back: (dir, file, model).
    fn read_back() -> (tempfile::TempDir, std::path::PathBuf, ModelProto) {
        let d = tempfile::tempdir().unwrap();
        let src = model(d.path());
        let m = crate::read_model(&src).unwrap();
        (d, src, m)
    }

    /// [`model`] with `lin.weight` quantised `how` into `data_name`: (dir, data file, model,
    /// what the pass did).
    fn quantized(
        how: WeightQuant,
        data_name: &str,
    ) -> (tempfile::TempDir, std::path::PathBuf, ModelProto, Quantized) {
        let (d, src, mut m) = read_back();
        let data = d.path().join(data_name);
        let q = quantize_linears(&mut m, &src, &[("lin.weight".into(), how)], &data).unwrap();
        (d, data, m, q)
    }

    #[test]
    fn gemm_becomes_matmul_nbits_with_int4_blocks() {
        let (_d, data, m, q) = quantized(WeightQuant::Int4, "q4.data");
        assert_eq!(q.layers, 1);
        let g = m.graph.as_ref().unwrap();
        let n = g.node.iter().find(|n| n.op_type == "MatMulNBits").unwrap();
        assert_eq!(n.domain, MS_DOMAIN);
        assert_eq!(n.input[1..3], WeightQuant::Int4.names("lin.weight"));
        assert_eq!(n.input[5], "lin.bias");
        let attr = |k: &str| n.attribute.iter().find(|a| a.name == k).unwrap().i;
        assert_eq!(
            (attr("K"), attr("N"), attr("bits"), attr("block_size")),
            (3, 2, 4, 32)
        );
        // [out, blocks, 16] codes and [out·blocks] scales, in the new file.
        let dims: Vec<_> = q.tensors.iter().map(|t| t.dims.clone()).collect();
        assert_eq!(dims, [vec![2, 1, 16], vec![2]]);
        assert!(data.is_file());
    }

    #[test]
    fn gemm_becomes_matmul_nbits_with_8_bit_blocks_and_f32_activations() {
        let (_d, _data, m, q) = quantized(WeightQuant::Int8Block, "q8b.data");
        let g = m.graph.as_ref().unwrap();
        let n = g.node.iter().find(|n| n.op_type == "MatMulNBits").unwrap();
        assert_eq!(n.input[1..3], WeightQuant::Int8Block.names("lin.weight"));
        let attr = |k: &str| n.attribute.iter().find(|a| a.name == k).unwrap().i;
        assert_eq!(
            (attr("bits"), attr("block_size"), attr("accuracy_level")),
            (8, 32, ACCURACY_8BIT)
        );
        // [out, blocks, 32] codes and [out·blocks] scales.
        let dims: Vec<_> = q.tensors.iter().map(|t| t.dims.clone()).collect();
        assert_eq!(dims, [vec![2, 1, 32], vec![2]]);
    }

    #[test]
    fn gemm_becomes_dynamic_quantize_matmul_with_int8_weights_in_a_new_file() {
        let (d, _data, m, q) = quantized(WeightQuant::Int8, "m_int8.onnx.data");
        assert_eq!(q.layers, 1);
        assert_eq!(q.f32_bytes, 24);
        let g = m.graph.as_ref().unwrap();
        let n = g
            .node
            .iter()
            .find(|n| n.op_type == "DynamicQuantizeMatMul")
            .unwrap();
        assert_eq!(n.domain, MS_DOMAIN);
        assert_eq!(
            n.input[1..],
            ["lin.weight.int8", "lin.weight.scale", "", "lin.bias"]
        );
        assert!(!g.node.iter().any(|n| n.op_type == "Gemm"));
        assert!(!g.initializer.iter().any(|t| t.name == "lin.weight"));
        assert!(m.opset_import.iter().any(|o| o.domain == MS_DOMAIN));
        // The int8 weight is [in, out] and dequantises to the f32 weight within half a step.
        let p = d.path().join("m_int8.onnx");
        crate::write_model(&p, &m).unwrap();
        let names = WeightQuant::Int8.names("lin.weight").to_vec();
        let got = crate::read_initializers(&p, &names).unwrap();
        assert_eq!((got[0].1, got[0].2.as_slice()), (DType::I8, &[3i64, 2][..]));
        let qv: Vec<i8> = bytemuck::cast_slice(&got[0].3).to_vec();
        let sv: Vec<f32> = bytemuck::pod_collect_to_vec(&got[1].3);
        let back = crate::quant::dequantize_int8_per_output(&qv, &sv, 2, 3);
        for (i, (a, b)) in back.iter().zip((0..6).map(|v| v as f32 - 2.5)).enumerate() {
            assert!((a - b).abs() <= 0.5 * sv[i / 3], "{i}: {a} vs {b}");
        }
    }

    /// The int8 engines' scheme: the same codes as `Int8`, stored u8 `q + 128` with a u8 zero
    /// point of 128 per output channel, so ONNX Runtime runs its u8·u8 kernel (exact on every
    /// x86-64 CPU; `v2l_runtime::cpu`).
    #[test]
    fn int8_u8_weights_are_the_int8_codes_plus_128_with_zero_point_128() {
        let (d, _data, m, q) = quantized(WeightQuant::Int8U8, "m_int8.onnx.data");
        assert_eq!(q.layers, 1);
        let g = m.graph.as_ref().unwrap();
        let n = g
            .node
            .iter()
            .find(|n| n.op_type == "DynamicQuantizeMatMul")
            .unwrap();
        assert_eq!(
            n.input[1..],
            [
                "lin.weight.u8",
                "lin.weight.scale",
                "lin.weight.zero_point",
                "lin.bias"
            ]
        );
        let p = d.path().join("m_int8.onnx");
        crate::write_model(&p, &m).unwrap();
        let names = [
            "lin.weight.u8".to_string(),
            "lin.weight.scale".into(),
            "lin.weight.zero_point".into(),
        ];
        let got = crate::read_initializers(&p, &names).unwrap();
        assert_eq!((got[0].1, got[0].2.as_slice()), (DType::U8, &[3i64, 2][..]));
        assert_eq!((got[2].1, got[2].2.as_slice()), (DType::U8, &[2i64][..]));
        assert_eq!(got[2].3, [128, 128]);
        let w: Vec<f32> = (0..6).map(|v| v as f32 - 2.5).collect();
        let [(_, _, s8), _] = WeightQuant::Int8.quantize(&w, 2, 3).unwrap();
        let from_u8: Vec<i16> = got[0].3.iter().map(|&b| i16::from(b) - 128).collect();
        let from_s8: Vec<i16> = s8.iter().map(|&b| i16::from(b as i8)).collect();
        assert_eq!(from_u8, from_s8);
        assert!(got[0].3.iter().all(|&b| b >= 1), "codes stay in 1..=255");
        assert_eq!(WeightQuant::parse("u8"), Some(WeightQuant::Int8U8));
    }

    #[test]
    fn bf16_stored_weights_are_quantised_through_their_cast() {
        let d = tempfile::tempdir().unwrap();
        let mut g = Graph::new("t");
        let x = g.input("x", DType::F32, vec!["n".into(), 3.into()]);
        let w: Vec<half::bf16> = (0..6)
            .map(|v| half::bf16::from_f32(v as f32 - 2.5))
            .collect();
        let w = g.initializer(
            "lin.weight",
            DType::BF16,
            vec![2, 3],
            TensorData::Owned(bytemuck::cast_slice(&w).to_vec()),
        );
        let w32 = g.cast(&w, DType::F32);
        let y = g.linear(&x, &w32, None, 2);
        g.output(&y, "y", DType::F32, vec!["n".into(), 2.into()]);
        let src = d.path().join("m.onnx");
        save(&g, &src, ExternalData::Always).unwrap();
        let mut m = crate::read_model(&src).unwrap();
        let q = quantize_linears(
            &mut m,
            &src,
            &[("lin.weight".into(), WeightQuant::Int8)],
            &d.path().join("q.data"),
        )
        .unwrap();
        assert_eq!(q.layers, 1);
        let g = m.graph.unwrap();
        assert!(!g
            .node
            .iter()
            .any(|n| n.op_type == "Cast" || n.op_type == "Gemm"));
        let n = g
            .node
            .iter()
            .find(|n| n.op_type == "DynamicQuantizeMatMul")
            .unwrap();
        assert_eq!(n.input[1..3], ["lin.weight.int8", "lin.weight.scale"]);
    }

    #[test]
    fn a_weight_no_gemm_reads_is_refused_before_anything_is_written() {
        let (d, src, mut m) = read_back();
        let data = d.path().join("q.data");
        let e = quantize_linears(
            &mut m,
            &src,
            &[("lin.bias".into(), WeightQuant::Int8)],
            &data,
        )
        .unwrap_err();
        assert!(
            matches!(e, PassError::NotGemm(ref w) if w == "lin.bias"),
            "{e}"
        );
        let e = quantize_linears(
            &mut m,
            &src,
            &[("nope.weight".into(), WeightQuant::Int8)],
            &data,
        )
        .unwrap_err();
        assert!(matches!(e, PassError::MissingInitializer(_)), "{e}");
        assert!(!data.exists());
    }
}
