//! Element types shared by checkpoints, ONNX tensors and engine weights.

use half::{bf16, f16};

pub use v2l_contracts::dtype::DType;

// Tensor bytes are little-endian (safetensors, ONNX); v2l reinterprets them in place.
const _: () = assert!(
    cfg!(target_endian = "little"),
    "v2l reads little-endian tensor bytes as host floats"
);

/// Float values of little-endian `bytes` stored as `dtype` (f32, f16 or bf16), widened to f32
/// (exactly); `None` for another dtype or a length that is not a whole number of elements.
/// One copy, through `bytemuck` and `half`'s slice conversions (vectorised where the CPU can).
pub fn f32_values(bytes: &[u8], dtype: DType) -> Option<Vec<f32>> {
    let mut out = vec![0f32; bytes.len() / dtype.size().max(1)];
    f32_values_into(bytes, dtype, &mut out)?;
    Some(out)
}

/// [`f32_values`] into `out`, which must hold exactly as many values: how a buffer that is
/// already allocated (an ONNX Runtime input rewritten in place) is filled without a copy.
pub fn f32_values_into(bytes: &[u8], dtype: DType, out: &mut [f32]) -> Option<()> {
    use half::slice::HalfFloatSliceExt;
    if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16)
        || bytes.len() != out.len().checked_mul(dtype.size())?
    {
        return None;
    }
    // Aligned bytes convert as slices (vectorised where the CPU can); others element-wise.
    match dtype {
        DType::F32 => match bytemuck::try_cast_slice::<u8, f32>(bytes) {
            Ok(v) => out.copy_from_slice(v),
            Err(_) => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                    *o = <[u8; 4]>::try_from(c).map_or(0.0, f32::from_le_bytes);
                }
            }
        },
        DType::F16 => match bytemuck::try_cast_slice::<u8, f16>(bytes) {
            Ok(v) => v.convert_to_f32_slice(out),
            Err(_) => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = <[u8; 2]>::try_from(c).map_or(0.0, |b| f16::from_le_bytes(b).to_f32());
                }
            }
        },
        _ => match bytemuck::try_cast_slice::<u8, bf16>(bytes) {
            Ok(v) => v.convert_to_f32_slice(out),
            Err(_) => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = <[u8; 2]>::try_from(c).map_or(0.0, |b| bf16::from_le_bytes(b).to_f32());
                }
            }
        },
    }
    Some(())
}

/// The little-endian bytes of `values` (no copy).
pub fn le_bytes<T: bytemuck::Pod>(values: &[T]) -> &[u8] {
    bytemuck::cast_slice(values)
}

/// Converts little-endian float bytes from `src` to `dst`, appending to `out`.
///
/// Upcasts are exact; downcasts round to nearest even once (the `half` crate's rule,
/// which is also PyTorch's). Returns `None` for a pair that is not float → float.
pub fn convert_floats(bytes: &[u8], src: DType, dst: DType, out: &mut Vec<u8>) -> Option<()> {
    if src == dst {
        out.extend_from_slice(bytes);
        return Some(());
    }
    let n = bytes.len() / src.size();
    out.reserve(n * dst.size());
    for chunk in bytes.chunks_exact(src.size()) {
        let v = match src {
            DType::F32 => f32::from_le_bytes(chunk.try_into().ok()?) as f64,
            DType::F16 => f16::from_le_bytes(chunk.try_into().ok()?).to_f64(),
            DType::BF16 => bf16::from_le_bytes(chunk.try_into().ok()?).to_f64(),
            DType::F64 => f64::from_le_bytes(chunk.try_into().ok()?),
            _ => return None,
        };
        match dst {
            DType::F32 => out.extend_from_slice(&(v as f32).to_le_bytes()),
            // Round through f32 first for an f32 source so the rounding happens once.
            DType::F16 => out.extend_from_slice(&f16::from_f32(v as f32).to_le_bytes()),
            DType::BF16 => out.extend_from_slice(&bf16::from_f32(v as f32).to_le_bytes()),
            DType::F64 => out.extend_from_slice(&v.to_le_bytes()),
            _ => return None,
        }
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f32_values_widen_every_float_type_exactly() {
        let v = [1.5f32, -0.25, 3.0e-3, 65504.0];
        assert_eq!(f32_values(le_bytes(&v), DType::F32).unwrap(), v);
        let h: Vec<f16> = v.iter().map(|&x| f16::from_f32(x)).collect();
        let want: Vec<f32> = h.iter().map(|x| x.to_f32()).collect();
        assert_eq!(f32_values(le_bytes(&h), DType::F16).unwrap(), want);
        let b: Vec<bf16> = v.iter().map(|&x| bf16::from_f32(x)).collect();
        let want: Vec<f32> = b.iter().map(|x| x.to_f32()).collect();
        assert_eq!(f32_values(le_bytes(&b), DType::BF16).unwrap(), want);
        // Unaligned input and ragged lengths.
        let mut raw = vec![0u8];
        raw.extend_from_slice(le_bytes(&v));
        assert_eq!(f32_values(&raw[1..], DType::F32).unwrap(), v);
        assert!(f32_values(&raw[..5], DType::F32).is_none());
        assert!(f32_values(&raw[1..], DType::I64).is_none());
    }

    #[test]
    fn onnx_codes_round_trip() {
        for d in [
            DType::F32,
            DType::F16,
            DType::BF16,
            DType::I64,
            DType::U8,
            DType::I8,
        ] {
            assert_eq!(DType::from_onnx_code(d.onnx_code()), Some(d));
        }
    }

    #[test]
    fn bf16_upcast_is_exact_and_downcast_rounds_once() {
        let x = 1.0f32 + 2f32.powi(-9); // between two bf16 values: ties to even -> 1.0
        let mut b = Vec::new();
        convert_floats(&x.to_le_bytes(), DType::F32, DType::BF16, &mut b).unwrap();
        let mut back = Vec::new();
        convert_floats(&b, DType::BF16, DType::F32, &mut back).unwrap();
        assert_eq!(f32::from_le_bytes(back[..4].try_into().unwrap()), 1.0);
    }
}
