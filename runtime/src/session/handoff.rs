//! Values one session writes where it runs and another reads as fixed inputs, never through the
//! host: a GPU engine's `bound` LoRA strategy makes the DiT's targeted weights on the device
//! (`lora_merge.onnx`) and hands them to the DiT's session this way.

use std::collections::BTreeMap;
use std::path::Path;

use ort::value::DynValue;
use ort::AsPointer;

use super::values::{ort_err, view};
use super::{check_model_file, GraphSource, Model, SessionOptions};
use crate::error::{Result, RuntimeError};
use crate::tensor::Tensor;

/// Tensors left in memory of a session's device (on the CPU provider, the session's), by name.
#[derive(Default)]
pub struct DeviceValues(BTreeMap<String, DynValue>);

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

    /// Where the value `name`'s data starts, to tell whether a buffer was written in place.
    pub fn data_ptr(&self, name: &str) -> Option<*const std::ffi::c_void> {
        let v = self.0.get(name)?;
        let mut p = std::ptr::null_mut();
        // SAFETY: a live tensor value; ONNX Runtime writes its data pointer into `p`.
        let status = unsafe { (ort::api().GetTensorMutableData)(v.ptr().cast_mut(), &mut p) };
        super::bound::check(status).ok()?;
        Some(p.cast_const())
    }
}

impl Model {
    /// Loads `path` for [`Model::run_on_device`]: never with CUDA graphs or bound runs (its
    /// outputs are handed on, not read back from its own buffers), its outputs allocated in
    /// memory of its device.
    pub fn load_for_handoff(path: &Path, opts: &SessionOptions) -> Result<Model> {
        check_model_file(path)?;
        let opts = SessionOptions {
            bound_runs: false,
            carry_in_session_memory: true,
            ..opts.clone()
        };
        Self::build(GraphSource::File(path), &opts, Vec::new(), false)
    }

    /// Runs on host `inputs` with every output written into memory of the session's device
    /// and left there: into `reuse`'s value of its name where that has the output's type and
    /// shape (no allocation: a buffer another session reads is rewritten in place), else into
    /// a new one. Values of `reuse` no output takes are freed first.
    pub fn run_on_device(
        &mut self,
        inputs: &BTreeMap<String, Tensor>,
        mut reuse: DeviceValues,
    ) -> Result<DeviceValues> {
        let ctx = self.path.display().to_string();
        let internal = |message: &str| RuntimeError::Internal {
            what: ctx.clone(),
            message: message.into(),
        };
        let alloc = match (&self.carry_alloc, &self.bound) {
            (Some(a), None) => a,
            _ => {
                return Err(internal(
                    "not loaded to hand values on (Model::load_for_handoff)",
                ))
            }
        };
        let mut select = ort::session::OutputSelector::no_default();
        let mut outputs = Vec::new();
        for o in self.session.outputs() {
            let name = o.name().to_string();
            let ty = o.dtype().tensor_type();
            let shape: Option<Vec<i64>> = o.dtype().tensor_shape().map(|s| s.to_vec());
            let (Some(ty), Some(shape)) = (ty, shape.filter(|s| s.iter().all(|&d| d >= 0))) else {
                return Err(internal(&format!(
                    "output `{name}` has no fixed tensor shape to allocate"
                )));
            };
            let same = |v: &DynValue| {
                v.dtype().tensor_type() == Some(ty)
                    && v.dtype().tensor_shape().map(|s| s.to_vec()).as_ref() == Some(&shape)
            };
            let v = match reuse.0.remove(&name) {
                Some(v) if same(&v) => v,
                _ => ort::value::DynTensor::new(alloc, ty, shape)
                    .map_err(ort_err(format!("{ctx}: output `{name}`")))?
                    .into_dyn(),
            };
            select = select.with(name.as_str()).preallocate(name.as_str(), v);
            outputs.push(name);
        }
        drop(reuse);
        let mut values: Vec<(String, ort::session::SessionInputValue<'_>)> = Vec::new();
        for name in &self.inputs {
            let t = inputs.get(name).ok_or_else(|| RuntimeError::Graph {
                graph: ctx.clone(),
                message: format!("input `{name}` was not given"),
            })?;
            let v = view(t).map_err(ort_err(format!("{ctx}: input `{name}`")))?;
            values.push((name.clone(), v.into()));
        }
        let options = ort::session::RunOptions::new()
            .map_err(ort_err(&ctx))?
            .with_outputs(select);
        let mut outs = self
            .session
            .run_with_options(values, &options)
            .map_err(ort_err(&ctx))?;
        let mut made = BTreeMap::new();
        for name in outputs {
            let v = outs
                .remove(name.as_str())
                .ok_or_else(|| RuntimeError::missing_output(&ctx, &name))?;
            made.insert(name, v);
        }
        Ok(DeviceValues(made))
    }

    /// Hands out the fixed inputs among `names` this session holds (to be written again in
    /// place by [`Model::run_on_device`]); runs need them set again first.
    pub fn take_fixed<'a>(&mut self, names: impl IntoIterator<Item = &'a str>) -> DeviceValues {
        let mut taken = BTreeMap::new();
        for name in names {
            if let Some(v) = self.fixed.remove(name) {
                if let Some(b) = &mut self.bound {
                    b.fixed_changed(name);
                }
                taken.insert(name.to_string(), v);
            }
        }
        DeviceValues(taken)
    }

    /// Sets fixed inputs from values a session left on the device: passed by reference on
    /// every run, never copied through the host.
    pub fn set_fixed_values(&mut self, values: DeviceValues) {
        for (name, v) in values.0 {
            if let Some(b) = &mut self.bound {
                b.fixed_changed(&name);
            }
            self.fixed.insert(name, v);
        }
    }
}

impl DeviceValues {
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
