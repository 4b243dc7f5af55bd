//! Host tensors as ONNX Runtime values and back, and ONNX Runtime's errors as ours.

use ort::value::{DynValue, DynValueRef, Tensor as OrtTensor, TensorRef, ValueType};

use crate::error::RuntimeError;
use crate::tensor::{Data, Tensor};

pub(super) fn ort_err(context: impl std::fmt::Display) -> impl FnOnce(ort::Error) -> RuntimeError {
    let context = context.to_string();
    move |e| RuntimeError::Ort {
        context,
        message: plain(&e.to_string()),
    }
}

/// ONNX Runtime's message without terminal colour codes, on one line.
pub(super) fn plain(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut chars = message.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI sequence: ESC [ parameters final-byte.
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(if c == '\n' || c == '\r' { ' ' } else { c });
    }
    out.trim().to_string()
}

/// ONNX Runtime's element type of a host tensor.
pub(super) fn ort_element_type(t: &Tensor) -> Option<ort::value::TensorElementType> {
    use ort::value::TensorElementType as E;
    Some(match &t.data {
        Data::F32(_) => E::Float32,
        Data::F16(_) => E::Float16,
        Data::BF16(_) => E::Bfloat16,
        Data::I64(_) => E::Int64,
        _ => return None,
    })
}

/// `t` as an ONNX Runtime value borrowing its data.
pub(super) fn view(t: &Tensor) -> ort::Result<DynValueRef<'_>> {
    let s: Vec<i64> = t.shape.iter().map(|&d| d as i64).collect();
    Ok(match &t.data {
        Data::F32(v) => TensorRef::from_array_view((s, v.as_slice()))?.into_dyn(),
        Data::I64(v) => TensorRef::from_array_view((s, v.as_slice()))?.into_dyn(),
        Data::U8(v) => TensorRef::from_array_view((s, v.as_slice()))?.into_dyn(),
        Data::I8(v) => TensorRef::from_array_view((s, v.as_slice()))?.into_dyn(),
        Data::F16(v) => TensorRef::from_array_view((s, v.as_slice()))?.into_dyn(),
        Data::BF16(v) => TensorRef::from_array_view((s, v.as_slice()))?.into_dyn(),
    })
}

/// An ONNX Runtime value of `t`: its buffer moves into the value without a copy.
pub(super) fn into_ort(t: Tensor) -> ort::Result<DynValue> {
    let shape: Vec<i64> = t.shape.iter().map(|&d| d as i64).collect();
    Ok(match t.data {
        Data::F32(v) => OrtTensor::from_array((shape, v))?.into_dyn(),
        Data::I64(v) => OrtTensor::from_array((shape, v))?.into_dyn(),
        Data::U8(v) => OrtTensor::from_array((shape, v))?.into_dyn(),
        Data::I8(v) => OrtTensor::from_array((shape, v))?.into_dyn(),
        Data::F16(v) => OrtTensor::from_array((shape, v))?.into_dyn(),
        Data::BF16(v) => OrtTensor::from_array((shape, v))?.into_dyn(),
    })
}

pub(super) fn from_ort(v: &ort::value::DynValueRef<'_>) -> ort::Result<Tensor> {
    let is_i64 = matches!(
        v.dtype(),
        ValueType::Tensor {
            ty: ort::value::TensorElementType::Int64,
            ..
        }
    );
    if is_i64 {
        let (shape, data) = v.try_extract_tensor::<i64>()?;
        Ok(Tensor {
            shape: shape.iter().map(|&d| d as usize).collect(),
            data: Data::I64(data.to_vec()),
        })
    } else {
        let (shape, data) = v.try_extract_tensor::<f32>()?;
        Ok(Tensor {
            shape: shape.iter().map(|&d| d as usize).collect(),
            data: Data::F32(data.to_vec()),
        })
    }
}

#[cfg(test)]
mod message_tests {
    #[test]
    fn colour_codes_and_newlines_are_removed() {
        assert_eq!(
            super::plain("\u{1b}[1;31m2026 [E:onnxruntime] bad\u{1b}[m\nshape {2,3}\n"),
            "2026 [E:onnxruntime] bad shape {2,3}"
        );
    }
}

/// An ONNX Runtime status as a result.
pub(super) fn check(status: ort::sys::OrtStatusPtr) -> ort::Result<()> {
    let Some(ptr) = std::ptr::NonNull::new(status.0) else {
        return Ok(());
    };
    // SAFETY: a non-null status from the API, released once here.
    let message = unsafe {
        let raw = (ort::api().GetErrorMessage)(ptr.as_ptr());
        let m = std::ffi::CStr::from_ptr(raw).to_string_lossy().into_owned();
        (ort::api().ReleaseStatus)(ptr.as_ptr());
        m
    };
    Err(ort::Error::new(message))
}
