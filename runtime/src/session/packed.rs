//! Fixed inputs made together and moved to the device as one buffer.
//!
//! A LoRA switch on a GPU engine's `unfused` DiT sets three inputs per targeted layer (A, B
//! and the scale): over a thousand at CogVideoX-5B width with every linear targeted, as
//! Video2LoRA's LiLoRA does. Moved one by one, each costs a run of ONNX Runtime's copy session
//! and a wait for the device. Written into one host buffer ([`Packed`]) and moved at once, the
//! switch waits once, and each input is a view into the device buffer ([`Held::Part`]), which
//! lives as long as any of its views.

use std::sync::Arc;

use ort::value::{DynValue, DynValueRefMut, Tensor as OrtTensor, TensorRefMut};
use v2l_graphs::DType;

use crate::tensor::FloatsMut;

/// Where each input starts: CUDA's allocations, and the kernels' widest loads, are aligned to
/// this many bytes.
const ALIGN: usize = 256;

/// A fixed input as a session holds it.
pub enum Held {
    /// A value of its own.
    Own(DynValue),
    /// A view into a buffer moved with other inputs at once. Fields drop in order: the view
    /// before the buffer it points into.
    Part {
        view: DynValueRefMut<'static>,
        buffer: Arc<DynValue>,
    },
}

impl Held {
    /// The value itself when it is one of its own (a view is not rewritten in place: the
    /// buffer it shares may be on the device, or kept for a LoRA switched away from).
    pub(super) fn own_mut(&mut self) -> Option<&mut DynValue> {
        match self {
            Held::Own(v) => Some(v),
            Held::Part { .. } => None,
        }
    }
}

impl std::ops::Deref for Held {
    type Target = DynValue;

    fn deref(&self) -> &DynValue {
        match self {
            Held::Own(v) => v,
            Held::Part { view, .. } => view,
        }
    }
}

/// One input laid out in a [`Packed`] buffer.
#[derive(Clone)]
struct Entry {
    name: String,
    dtype: DType,
    shape: Vec<usize>,
    /// Byte offset in the buffer, a multiple of [`ALIGN`].
    at: usize,
    bytes: usize,
}

/// Float inputs laid out in one host buffer, to be written in place ([`Packed::floats_mut`])
/// and handed to a session at once ([`super::Model::set_fixed_packed`]).
pub struct Packed {
    entries: Vec<Entry>,
    /// 8-byte words, so every entry (at a multiple of [`ALIGN`] bytes) is aligned for its type.
    words: Vec<u64>,
}

impl Packed {
    /// Lays out `inputs` (name, the type the graph declares, shape) one after another; every
    /// element starts at zero. A type other than f16 and bf16 is laid out as f32.
    pub fn new(inputs: impl IntoIterator<Item = (String, DType, Vec<usize>)>) -> Packed {
        let mut at = 0;
        let entries: Vec<Entry> = inputs
            .into_iter()
            .map(|(name, dtype, shape)| {
                let dtype = match dtype {
                    DType::F16 | DType::BF16 => dtype,
                    _ => DType::F32,
                };
                let bytes = shape.iter().product::<usize>() * dtype.size();
                let e = Entry {
                    name,
                    dtype,
                    shape,
                    at,
                    bytes,
                };
                at += bytes.div_ceil(ALIGN) * ALIGN;
                e
            })
            .collect();
        Packed {
            entries,
            words: vec![0; at / 8],
        }
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Every input's elements, by name, in the order given to [`Packed::new`]: disjoint, to be
    /// written by several threads.
    pub fn floats_mut(&mut self) -> Vec<(&str, FloatsMut<'_>)> {
        let mut rest: &mut [u8] = bytemuck::cast_slice_mut(&mut self.words);
        let mut done = 0;
        let mut out = Vec::with_capacity(self.entries.len());
        for e in &self.entries {
            let (_, tail) = std::mem::take(&mut rest).split_at_mut(e.at - done);
            let (mine, tail) = tail.split_at_mut(e.bytes);
            rest = tail;
            done = e.at + e.bytes;
            // Aligned (each entry starts at a multiple of ALIGN from an 8-aligned start) and
            // a whole number of elements long, so the casts cannot fail.
            let floats = match e.dtype {
                DType::F16 => FloatsMut::F16(bytemuck::cast_slice_mut(mine)),
                DType::BF16 => FloatsMut::BF16(bytemuck::cast_slice_mut(mine)),
                _ => FloatsMut::F32(bytemuck::cast_slice_mut(mine)),
            };
            out.push((e.name.as_str(), floats));
        }
        out
    }

    /// The buffer as an ONNX Runtime value in host memory (its words move in, uncopied).
    pub(super) fn into_host(self) -> ort::Result<Placed> {
        let words = self.words.len();
        let host = OrtTensor::from_array((vec![words as i64], self.words))?.into_dyn();
        Ok(Placed {
            buffer: Arc::new(host),
            entries: self.entries,
        })
    }
}

/// A [`Packed`] buffer as an ONNX Runtime value, in host or device memory.
pub(super) struct Placed {
    buffer: Arc<DynValue>,
    entries: Vec<Entry>,
}

impl Placed {
    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }

    /// The buffer copied by `to` (to the device: one copy for every input).
    pub(super) fn moved(
        &self,
        to: impl FnOnce(&DynValue) -> ort::Result<DynValue>,
    ) -> ort::Result<Placed> {
        Ok(Placed {
            buffer: Arc::new(to(&self.buffer)?),
            entries: self.entries.clone(),
        })
    }

    /// Each input as a host value of its own, copied out of a host buffer. ort's `Tensor::to`
    /// cannot move a view (2.0.0-rc.15 copies a value that borrows its data through its own
    /// identity sessions, under a lock it already holds: it never returns), so inputs moved
    /// one by one are made from these.
    pub(super) fn owned(&self) -> ort::Result<Vec<(String, DynValue)>> {
        let (_, words) = self.buffer.try_extract_tensor::<u64>()?;
        let bytes: &[u8] = bytemuck::cast_slice(words);
        self.entries
            .iter()
            .map(|e| {
                let raw = bytes
                    .get(e.at..e.at + e.bytes)
                    .ok_or_else(|| ort::Error::new("a packed input past its buffer's end"))?;
                let shape: Vec<i64> = e.shape.iter().map(|&d| d as i64).collect();
                let value = match e.dtype {
                    DType::F16 => {
                        let v: Vec<half::f16> = bytemuck::pod_collect_to_vec(raw);
                        OrtTensor::from_array((shape, v))?.into_dyn()
                    }
                    DType::BF16 => {
                        let v: Vec<half::bf16> = bytemuck::pod_collect_to_vec(raw);
                        OrtTensor::from_array((shape, v))?.into_dyn()
                    }
                    _ => {
                        let v: Vec<f32> = bytemuck::pod_collect_to_vec(raw);
                        OrtTensor::from_array((shape, v))?.into_dyn()
                    }
                };
                Ok((e.name.clone(), value))
            })
            .collect()
    }

    /// A view into the buffer per input, each holding the buffer.
    pub(super) fn views(self) -> ort::Result<Vec<(String, Held)>> {
        let tensor = self
            .buffer
            .view()
            .downcast::<ort::value::DynTensorValueType>()?;
        let info = tensor.memory_info().to_owned();
        let base = tensor.data_ptr().cast::<u8>().cast_mut();
        drop(tensor);
        self.entries
            .into_iter()
            .map(|e| {
                let shape = ort::value::Shape::from(e.shape.as_slice());
                // SAFETY: `base + at` starts `bytes` bytes of the buffer (laid out by `new`),
                // which the view's `buffer` keeps alive for as long as the view, and the
                // element type and shape describe exactly those bytes.
                let view = unsafe {
                    let p = base.add(e.at).cast();
                    match e.dtype {
                        DType::F16 => {
                            TensorRefMut::<half::f16>::from_raw(info.clone(), p, shape)?.into_dyn()
                        }
                        DType::BF16 => {
                            TensorRefMut::<half::bf16>::from_raw(info.clone(), p, shape)?.into_dyn()
                        }
                        _ => TensorRefMut::<f32>::from_raw(info.clone(), p, shape)?.into_dyn(),
                    }
                };
                let held = Held::Part {
                    view,
                    buffer: self.buffer.clone(),
                };
                Ok((e.name, held))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs_start_aligned_and_are_written_where_their_views_read() {
        crate::ort_env::init().unwrap();
        let mut p = Packed::new([
            ("a".to_string(), DType::F32, vec![3]),
            ("b".to_string(), DType::BF16, vec![2, 5]),
            ("c".to_string(), DType::F16, vec![0]),
            ("d".to_string(), DType::F32, vec![1, 1]),
        ]);
        let starts: Vec<usize> = p.entries.iter().map(|e| e.at).collect();
        assert_eq!(starts, [0, 256, 512, 512]);
        let mut scratch = Vec::new();
        for (i, (_, dst)) in p.floats_mut().into_iter().enumerate() {
            dst.write_with(&mut scratch, |d| {
                d.iter_mut()
                    .enumerate()
                    .for_each(|(j, v)| *v = (10 * i + j) as f32)
            });
        }
        let host = p.into_host().unwrap();
        // Moved (here: copied on the host) as one buffer: the views read the copy.
        let copy = |v: &DynValue| {
            let (_, words) = v.try_extract_tensor::<u64>()?;
            Ok(OrtTensor::from_array((vec![words.len() as i64], words.to_vec()))?.into_dyn())
        };
        let moved = host.moved(copy).unwrap();
        // Owned copies, as inputs moved one by one are made: the same values, and ort's `to`
        // returns on them (on a view it never did).
        let owned = moved.owned().unwrap();
        let names: Vec<&str> = owned.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["a", "b", "c", "d"]);
        let b = owned[1].1.try_extract_tensor::<half::bf16>().unwrap();
        assert_eq!(b.0.to_vec(), [2, 5]);
        assert_eq!(b.1[9].to_f32(), 19.0);
        let a = owned[0]
            .1
            .view()
            .downcast::<ort::value::DynTensorValueType>()
            .unwrap()
            .to(ort::memory::AllocationDevice::CPU, 0)
            .unwrap();
        assert_eq!(a.try_extract_tensor::<f32>().unwrap().1, [0.0, 1.0, 2.0]);
        let held = moved.views().unwrap();
        let names: Vec<&str> = held.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["a", "b", "c", "d"]);
        let a = held[0].1.try_extract_tensor::<f32>().unwrap();
        assert_eq!((a.0.to_vec(), a.1.to_vec()), (vec![3], vec![0.0, 1.0, 2.0]));
        let b = held[1].1.try_extract_tensor::<half::bf16>().unwrap();
        assert_eq!(b.0.to_vec(), [2, 5]);
        let b: Vec<f32> = b.1.iter().map(|v| v.to_f32()).collect();
        assert_eq!(b, (10..20).map(|v| v as f32).collect::<Vec<_>>());
        assert_eq!(held[3].1.try_extract_tensor::<f32>().unwrap().1, [30.0]);
        // The views keep the buffer: dropping all but one leaves it readable.
        let last = held.into_iter().nth(3).unwrap().1;
        assert_eq!(last.try_extract_tensor::<f32>().unwrap().1, [30.0]);
    }
}
