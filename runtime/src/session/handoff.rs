//! Values one session writes where it runs and another reads as fixed inputs, never through the
//! host ([`super::Model::run_on_device`], [`super::Model::set_fixed_values`]): a GPU engine's
//! `bound` LoRA strategy makes the DiT's targeted weights on the device (`lora_merge.onnx`) and
//! hands them to the DiT's session this way.

use std::collections::BTreeMap;

use ort::AsPointer;

use super::packed::Held;
use super::values::check;

/// Tensors left in memory of a session's device (on the CPU provider, the session's), by name:
/// values of their own, or views into a buffer moved with others ([`super::packed`]).
#[derive(Default)]
pub struct DeviceValues(pub(super) BTreeMap<String, Held>);

impl DeviceValues {
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(String::as_str)
    }

    /// The values' data in bytes.
    pub fn bytes(&self) -> u64 {
        use ort::value::TensorElementType as E;
        self.0
            .values()
            .filter_map(|v| {
                let ty = v.dtype().tensor_type()?;
                let size = match ty {
                    E::Float64 | E::Int64 | E::Uint64 => 8,
                    E::Float32 | E::Int32 | E::Uint32 => 4,
                    E::Float16 | E::Bfloat16 | E::Int16 | E::Uint16 => 2,
                    _ => 1,
                };
                let elements: i64 = v.dtype().tensor_shape()?.iter().product();
                Some(u64::try_from(elements).unwrap_or(0) * size)
            })
            .sum()
    }

    /// Where the value `name`'s data starts, to tell whether a buffer was written in place.
    pub fn data_ptr(&self, name: &str) -> Option<*const std::ffi::c_void> {
        let v = self.0.get(name)?;
        let mut p = std::ptr::null_mut();
        // SAFETY: a live tensor value; ONNX Runtime writes its data pointer into `p`.
        let status = unsafe { (ort::api().GetTensorMutableData)(v.ptr().cast_mut(), &mut p) };
        check(status).ok()?;
        Some(p.cast_const())
    }

    /// Splits off the values named in `takes`.
    pub(crate) fn split_off(&mut self, takes: &std::collections::HashSet<String>) -> DeviceValues {
        let names: Vec<String> = self
            .0
            .keys()
            .filter(|n| takes.contains(*n))
            .cloned()
            .collect();
        DeviceValues(
            names
                .into_iter()
                .filter_map(|n| self.0.remove_entry(&n))
                .collect(),
        )
    }

    /// Adds `other`'s values.
    pub(crate) fn extend(&mut self, other: DeviceValues) {
        self.0.extend(other.0);
    }
}
