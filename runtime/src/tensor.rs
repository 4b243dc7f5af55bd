//! Host tensors and safetensors files: how stage inputs and outputs travel.

use std::collections::BTreeMap;
use std::path::Path;

use crate::error::{Result, RuntimeError};

/// The element data of a host tensor.
#[derive(Clone, Debug, PartialEq)]
pub enum Data {
    F32(Vec<f32>),
    I64(Vec<i64>),
    U8(Vec<u8>),
    /// Quantised weights handed to an int8 engine.
    I8(Vec<i8>),
    /// Fused weights handed to an fp16 or bf16 engine.
    F16(Vec<half::f16>),
    BF16(Vec<half::bf16>),
}

impl Data {
    /// The elements' little-endian bytes (hashing, files).
    pub fn le_bytes(&self) -> &[u8] {
        use v2l_graphs::dtype::le_bytes;
        match self {
            Data::F32(v) => le_bytes(v),
            Data::I64(v) => le_bytes(v),
            Data::U8(v) => v,
            Data::I8(v) => le_bytes(v),
            Data::F16(v) => le_bytes(v),
            Data::BF16(v) => le_bytes(v),
        }
    }
}

/// The elements of a float tensor held elsewhere (an ONNX Runtime value), written in place.
pub enum FloatsMut<'a> {
    F32(&'a mut [f32]),
    F16(&'a mut [half::f16]),
    BF16(&'a mut [half::bf16]),
}

impl FloatsMut<'_> {
    /// Writes the values `write` makes: straight into f32 elements, else through `scratch`
    /// and rounded to nearest, as [`Tensor::floats`].
    pub fn write_with(self, scratch: &mut Vec<f32>, write: impl FnOnce(&mut [f32])) {
        use half::slice::HalfFloatSliceExt;
        let n = match &self {
            FloatsMut::F32(_) => 0,
            FloatsMut::F16(d) => d.len(),
            FloatsMut::BF16(d) => d.len(),
        };
        scratch.clear();
        scratch.resize(n, 0.0);
        match self {
            FloatsMut::F32(d) => write(d),
            // The slice conversions use the CPU's F16C where it has one (a scalar f16 rounding
            // is several times slower).
            FloatsMut::F16(d) => {
                write(scratch);
                d.convert_from_f32_slice(scratch);
            }
            FloatsMut::BF16(d) => {
                write(scratch);
                d.convert_from_f32_slice(scratch);
            }
        }
    }
}

/// A dense row-major host tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Data,
}

impl Tensor {
    pub fn f32(shape: Vec<usize>, v: Vec<f32>) -> Tensor {
        debug_assert_eq!(shape.iter().product::<usize>(), v.len());
        Tensor {
            shape,
            data: Data::F32(v),
        }
    }

    pub fn i64(shape: Vec<usize>, v: Vec<i64>) -> Tensor {
        Tensor {
            shape,
            data: Data::I64(v),
        }
    }

    pub fn zeros(shape: Vec<usize>) -> Tensor {
        let n = shape.iter().product();
        Tensor::f32(shape, vec![0.0; n])
    }

    /// `v` as a float tensor of `dtype` (f32, bf16 or f16; another type: f32), rounded to
    /// nearest (ties to even, as ONNX Runtime's `Cast` rounds).
    pub fn floats(shape: Vec<usize>, v: Vec<f32>, dtype: v2l_graphs::DType) -> Tensor {
        use half::slice::HalfFloatSliceExt;
        let data = match dtype {
            v2l_graphs::DType::BF16 => {
                let mut low = vec![half::bf16::ZERO; v.len()];
                low.convert_from_f32_slice(&v);
                Data::BF16(low)
            }
            v2l_graphs::DType::F16 => {
                let mut low = vec![half::f16::ZERO; v.len()];
                low.convert_from_f32_slice(&v);
                Data::F16(low)
            }
            _ => Data::F32(v),
        };
        Tensor { shape, data }
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// A float tensor of `dtype` (f32, bf16 or f16; another type: f32) whose values `fill`
    /// writes as f32, rounded to nearest as [`Tensor::floats`]. A low type's f32 values go
    /// through `scratch`, which a caller making many reuses.
    pub fn floats_with(
        shape: Vec<usize>,
        dtype: v2l_graphs::DType,
        scratch: &mut Vec<f32>,
        fill: impl FnOnce(&mut [f32]),
    ) -> Tensor {
        let n = shape.iter().product();
        let data = match dtype {
            v2l_graphs::DType::BF16 => Data::BF16(vec![half::bf16::ZERO; n]),
            v2l_graphs::DType::F16 => Data::F16(vec![half::f16::ZERO; n]),
            _ => Data::F32(vec![0.0; n]),
        };
        let mut t = Tensor { shape, data };
        let dst = match &mut t.data {
            Data::BF16(d) => FloatsMut::BF16(d),
            Data::F16(d) => FloatsMut::F16(d),
            Data::F32(d) => FloatsMut::F32(d),
            _ => return t,
        };
        dst.write_with(scratch, fill);
        t
    }

    /// The f32 values, or an error naming `what` if the tensor holds another type.
    pub fn as_f32(&self, what: &str) -> Result<&[f32]> {
        match &self.data {
            Data::F32(v) => Ok(v),
            _ => Err(RuntimeError::Tensor {
                what: what.into(),
                message: "expected a float32 tensor".into(),
            }),
        }
    }

    /// Relative L2 distance `‖self − other‖ / ‖other‖` (both f32, same size).
    pub fn rel_l2(&self, other: &Tensor) -> f64 {
        match (&self.data, &other.data) {
            (Data::F32(a), Data::F32(b)) if a.len() == b.len() => rel_l2(a, b),
            _ => f64::INFINITY,
        }
    }
}

impl Tensor {
    /// `self[.., start..end, ..]` along `axis` (f32 tensors); an error for an axis or range
    /// outside the shape.
    pub fn slice_axis(&self, axis: usize, start: usize, end: usize) -> Result<Tensor> {
        let v = self.as_f32("slice")?;
        let n = match self.shape.get(axis) {
            Some(&n) if start <= end && end <= n => n,
            _ => {
                return Err(RuntimeError::Tensor {
                    what: "slice".into(),
                    message: format!(
                        "{start}..{end} on axis {axis} of a tensor of shape {:?}",
                        self.shape
                    ),
                })
            }
        };
        let (outer, inner) = self.around(axis);
        let mut out = Vec::with_capacity(outer * (end - start) * inner);
        for chunk in v.chunks_exact((n * inner).max(1)).take(outer) {
            out.extend_from_slice(chunk.get(start * inner..end * inner).unwrap_or(&[]));
        }
        let mut shape = self.shape.clone();
        if let Some(d) = shape.get_mut(axis) {
            *d = end - start;
        }
        Ok(Tensor::f32(shape, out))
    }

    /// Concatenates f32 tensors along `axis`; an error unless every other dimension agrees.
    pub fn concat(parts: &[Tensor], axis: usize) -> Result<Tensor> {
        let bad = |message: String| RuntimeError::Tensor {
            what: "concat".into(),
            message,
        };
        let first = parts.first().ok_or_else(|| bad("no tensors".into()))?;
        if axis >= first.shape.len() {
            return Err(bad(format!("axis {axis} of shape {:?}", first.shape)));
        }
        let others = |s: &[usize]| {
            let mut s = s.to_vec();
            s.remove(axis);
            s
        };
        for p in parts {
            if p.shape.len() != first.shape.len() || others(&p.shape) != others(&first.shape) {
                return Err(bad(format!(
                    "shapes {:?} and {:?} differ off axis {axis}",
                    first.shape, p.shape
                )));
            }
        }
        let (outer, inner) = first.around(axis);
        let len = |p: &Tensor| p.shape.get(axis).copied().unwrap_or(0);
        let total: usize = parts.iter().map(len).sum();
        let mut out = Vec::with_capacity(outer * total * inner);
        let values: Vec<&[f32]> = parts
            .iter()
            .map(|p| p.as_f32("concat"))
            .collect::<Result<_>>()?;
        for o in 0..outer {
            for (p, v) in parts.iter().zip(&values) {
                let block = len(p) * inner;
                out.extend_from_slice(v.get(o * block..(o + 1) * block).unwrap_or(&[]));
            }
        }
        let mut shape = first.shape.clone();
        if let Some(d) = shape.get_mut(axis) {
            *d = total;
        }
        Ok(Tensor::f32(shape, out))
    }

    /// Elements before and after `axis` (which the caller has checked is in range).
    fn around(&self, axis: usize) -> (usize, usize) {
        let (before, from) = self.shape.split_at(axis.min(self.shape.len()));
        let after = from.get(1..).unwrap_or(&[]);
        (before.iter().product(), after.iter().product())
    }
}

#[cfg(test)]
mod layout_tests {
    use super::*;

    #[test]
    fn slice_and_concat_check_their_arguments() {
        let t = Tensor::f32(vec![2, 3, 2], (0..12).map(|i| i as f32).collect());
        let s = t.slice_axis(1, 1, 3).unwrap();
        assert_eq!(s.shape, [2, 2, 2]);
        assert_eq!(s.as_f32("s").unwrap(), [2., 3., 4., 5., 8., 9., 10., 11.]);
        assert!(t.slice_axis(3, 0, 1).is_err() && t.slice_axis(1, 2, 4).is_err());
        assert!(t.slice_axis(1, 2, 1).is_err());
        let c = Tensor::concat(&[s.clone(), t.clone()], 1).unwrap();
        assert_eq!(c.shape, [2, 5, 2]);
        assert_eq!(&c.as_f32("c").unwrap()[..6], [2., 3., 4., 5., 0., 1.]);
        let other = Tensor::f32(vec![3, 3, 2], vec![0.0; 18]);
        assert!(Tensor::concat(&[t.clone(), other], 1).is_err());
        assert!(Tensor::concat(&[t], 3).is_err());
        assert!(Tensor::concat(&[], 0).is_err());
    }
}

/// `‖a − b‖ / ‖b‖` in f64.
pub fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let (mut num, mut den) = (0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        let d = *x as f64 - *y as f64;
        num += d * d;
        den += (*y as f64) * (*y as f64);
    }
    (num / den.max(f64::MIN_POSITIVE)).sqrt()
}

/// Reads every tensor of a safetensors file (f16/bf16/f64 are widened or narrowed to f32).
pub fn read_safetensors(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    let bytes =
        v2l_contracts::input::read_safetensors(path, v2l_contracts::input::InputKind::Tensors)
            .map_err(|source| RuntimeError::Io {
                path: path.into(),
                source,
            })?;
    parse_safetensors(&bytes, path)
}

/// [`read_safetensors`] of a file that must hold every tensor of `required`: a missing one is
/// refused from the header alone, before the data is read (a 2 GB file whose header lists the
/// wrong tensors costs a few bytes, not 4 GB).
pub fn read_safetensors_with(path: &Path, required: &[&str]) -> Result<BTreeMap<String, Tensor>> {
    let kind = v2l_contracts::input::InputKind::Tensors;
    let names =
        v2l_contracts::input::safetensors_names(path, kind).map_err(|source| RuntimeError::Io {
            path: path.into(),
            source,
        })?;
    if let Some(names) = names {
        if let Some(missing) = required.iter().find(|r| !names.iter().any(|n| n == *r)) {
            return Err(RuntimeError::MissingTensor {
                path: path.into(),
                name: (*missing).into(),
            });
        }
    }
    read_safetensors(path)
}

/// [`read_safetensors`] on bytes already in memory; `path` names them in errors. Untrusted
/// input: fuzzed (`fuzz/fuzz_targets/safetensors.rs`).
pub fn parse_safetensors(bytes: &[u8], path: &Path) -> Result<BTreeMap<String, Tensor>> {
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| RuntimeError::BadFile {
        path: path.into(),
        message: v2l_contracts::safetensors_problem(&e),
    })?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let b = view.data();
        let shape = view.shape().to_vec();
        use v2l_graphs::dtype::f32_values;
        use v2l_graphs::DType;
        // safetensors has checked that every tensor's bytes are whole elements of its shape.
        let data = match view.dtype() {
            safetensors::Dtype::F32 => Data::F32(f32_values(b, DType::F32).unwrap_or_default()),
            safetensors::Dtype::F16 => Data::F32(f32_values(b, DType::F16).unwrap_or_default()),
            safetensors::Dtype::BF16 => Data::F32(f32_values(b, DType::BF16).unwrap_or_default()),
            safetensors::Dtype::F64 => Data::F32(
                bytemuck::pod_collect_to_vec::<u8, f64>(b)
                    .into_iter()
                    .map(|x| x as f32)
                    .collect(),
            ),
            safetensors::Dtype::I64 => Data::I64(bytemuck::pod_collect_to_vec(b)),
            safetensors::Dtype::U8 => Data::U8(b.to_vec()),
            safetensors::Dtype::I8 => Data::I8(bytemuck::pod_collect_to_vec(b)),
            other => {
                return Err(RuntimeError::BadFile {
                    path: path.into(),
                    message: format!("tensor `{name}` has unsupported dtype {other:?}"),
                })
            }
        };
        out.insert(name, Tensor { shape, data });
    }
    Ok(out)
}

/// Writes tensors to `path` atomically (a temporary file renamed into place).
pub fn write_safetensors(path: &Path, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
    let bytes: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(k, t)| {
            let dt = match &t.data {
                Data::F32(_) => safetensors::Dtype::F32,
                Data::I64(_) => safetensors::Dtype::I64,
                Data::U8(_) => safetensors::Dtype::U8,
                Data::I8(_) => safetensors::Dtype::I8,
                Data::F16(_) => safetensors::Dtype::F16,
                Data::BF16(_) => safetensors::Dtype::BF16,
            };
            (k.clone(), dt, t.shape.clone(), t.data.le_bytes().to_vec())
        })
        .collect();
    let views = bytes
        .iter()
        .map(|(k, dt, s, b)| {
            safetensors::tensor::TensorView::new(*dt, s.clone(), b)
                .map(|v| (k.clone(), v))
                .map_err(|e| RuntimeError::Tensor {
                    what: k.clone(),
                    message: e.to_string(),
                })
        })
        .collect::<Result<Vec<_>>>()?;
    let blob = safetensors::serialize(views, &None).map_err(|e| RuntimeError::Tensor {
        what: path.display().to_string(),
        message: e.to_string(),
    })?;
    write_atomic(path, &blob)
}

/// Writes `bytes` to a temporary sibling of `path`, then renames it into place (`tempfile`'s
/// persist): a failure at any point leaves no file behind, and never a half-written `path`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    v2l_contracts::atomic::write_atomic(path, bytes).map_err(|source| RuntimeError::Io {
        path: path.into(),
        source,
    })
}

/// Standard normal noise of `shape` from `seed` (`v2l_contracts::noise`): the same seed gives
/// the same noise on every machine. It is not PyTorch's generator; pass `--noise` to reuse
/// torch noise.
pub fn gaussian_noise(shape: Vec<usize>, seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    Tensor::f32(shape, v2l_contracts::noise::gaussian(n, seed))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Made in place as [`Tensor::floats`] converts: the same elements in each type, one
    /// scratch serving tensors of several sizes.
    #[test]
    fn floats_with_rounds_as_floats_does() {
        use v2l_graphs::DType;
        let mut scratch = Vec::new();
        for n in [5usize, 1000, 3] {
            let v: Vec<f32> = (0..n)
                .map(|i| (i as f32 * 0.37).sin() * 1e3 + 0.1)
                .collect();
            for dtype in [DType::F32, DType::BF16, DType::F16] {
                let made =
                    Tensor::floats_with(vec![n], dtype, &mut scratch, |d| d.copy_from_slice(&v));
                let want = Tensor::floats(vec![n], v.clone(), dtype);
                assert_eq!(made.shape, want.shape);
                assert!(made.data == want.data, "{dtype} at {n}");
            }
        }
    }
}
