//! Runs through buffers bound once per shape of the inputs (ONNX Runtime's IoBinding), as the
//! CUDA provider's graph capture needs (`enable_cuda_graph`): a captured CUDA graph replays
//! its kernels on the addresses it was captured with and reads no feeds, so every run of one
//! set of input shapes must find its inputs in the same buffers and leaves its outputs in the
//! same buffers. Each set gets its own buffers and graph id (`gpu_graph_id`); its first run
//! is plain (its outputs' shapes are learnt from it), ONNX Runtime captures on the second and
//! replays from then on. A fixed input whose value already lives where the set's buffer would
//! (the weights a LoRA merge writes on the device) is bound by reference instead: one value for
//! every set, rewritten in place between runs, never copied; where it moves, the set takes a
//! new graph id. On the CPU provider the same buffers run without a graph: that is how this
//! path is tested where there is no GPU.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use ort::memory::Allocator;
use ort::session::{IoBinding, RunOptions, Session};
use ort::value::{DynTensor, DynTensorValueType, TensorElementType};

use super::inputs::Source;
use super::packed::Held;
use super::values::{check, from_ort, ort_element_type, ort_err, view};
use crate::error::{Result, RuntimeError};
use crate::tensor::Tensor;

/// Inputs whose values, not only their shapes, decide the shapes a run computes: the VAE's
/// `first_batch` (its first frame batch yields fewer frames in time, Wan's one where later
/// ones yield four). Their values are part of a set's key, so no graph captured on one is
/// replayed for the other.
const SHAPING_INPUTS: [&str; 1] = ["first_batch"];

/// At most this many CUDA graphs captured per session: ONNX Runtime keeps each for the
/// session's life, and a set takes a new id whenever an input it reads by reference moves (a
/// LoRA switch does), so a long-lived server would grow without end. Beyond it, runs go plain.
const MAX_GRAPHS: i32 = 64;

/// At most this many sets of buffers per session; the oldest goes first. A set's graph id is
/// never reused: ONNX Runtime would replay the graph captured on the dropped set's buffers.
const MAX_SETS: usize = 8;

/// The bound buffers of one session. Fields drop in order: the buffers before the allocator,
/// the allocator before the session it was made from.
pub(super) struct Bound {
    sets: Vec<Set>,
    /// Identity sessions that copy into and out of the buffers, one per element type.
    copiers: Vec<Copier>,
    /// The CUDA device, `None` on the CPU provider (no graph to capture).
    device: Option<i32>,
    /// Inputs the session reads from host memory (a CPU node's, or a CUDA kernel's host-side
    /// input): their buffers are on the host, or ONNX Runtime would bind a copy made once.
    host_inputs: Vec<String>,
    next_id: i32,
    /// Whether [`MAX_GRAPHS`] was reached and said.
    said_spent: bool,
    /// Each fixed input's generation, bumped whenever it is set or rewritten: a set copies a
    /// fixed input into its buffer again only when it has changed.
    generation: HashMap<String, u64>,
    tick: u64,
    /// Where the buffers live: the device's memory (the host's on the CPU provider), from a
    /// session of its own. Not the run's session: a captured graph goes on writing the
    /// intermediates it was captured with, which its session's arena may hand out again.
    alloc: Allocator,
    _alloc_session: Option<Session>,
}

/// The buffers, binding and graph of one set of input shapes.
struct Set {
    /// What selects the set.
    key: Vec<KeyPart>,
    /// The CUDA graph annotation: 1, 2, … (0 is ONNX Runtime's own, -1 runs without a graph).
    id: i32,
    binding: IoBinding,
    inputs: BTreeMap<String, DynTensor>,
    /// Fixed inputs' generations as last copied into `inputs` or bound by reference.
    copied: HashMap<String, u64>,
    /// Fixed inputs bound by reference (no buffer of the set's own): where their data was.
    referenced: HashMap<String, usize>,
    /// The packed buffers that inputs bound as views point into, kept while bound.
    kept: HashMap<String, Arc<ort::value::DynValue>>,
    /// An input is bound at another address than the graph captured on this set's id read:
    /// the set takes a new id before its next run.
    moved: bool,
    /// Output buffers: `None` until the set's first run has given their shapes.
    outputs: Option<BTreeMap<String, DynTensor>>,
    /// For dropping the least recently used set.
    last_used: u64,
}

/// One input's part of a set's key: name, element type, shape, and for
/// [`SHAPING_INPUTS`] the value.
type KeyPart = (String, TensorElementType, Vec<i64>, Option<Vec<u32>>);

impl Bound {
    /// Bound runs of `session`, on the CUDA `device` or the CPU.
    pub(super) fn new(session: &Session, device: Option<i32>) -> ort::Result<Bound> {
        let (alloc, alloc_session) = match device {
            None => (Allocator::default(), None),
            Some(_) => {
                let own = identity_session(TensorElementType::Float32, device)?;
                let info = super::arena::memory_info(device, ort::memory::AllocatorType::Device)?;
                (Allocator::new(&own, info)?, Some(own))
            }
        };
        Ok(Bound {
            sets: Vec::new(),
            copiers: Vec::new(),
            device,
            host_inputs: inputs_on_host(session)?,
            next_id: 1,
            said_spent: false,
            generation: HashMap::new(),
            tick: 0,
            alloc,
            _alloc_session: alloc_session,
        })
    }

    /// Whether the session reads input `name` from host memory.
    pub(super) fn reads_on_host(&self, name: &str) -> bool {
        self.host_inputs.iter().any(|h| h == name)
    }

    /// Marks the fixed input `name` as changed (set again, or written in place).
    pub(super) fn fixed_changed(&mut self, name: &str) {
        self.tick += 1;
        self.generation.insert(name.to_string(), self.tick);
    }

    /// One bound run: copies each input from its source into the buffers of the set its
    /// shapes select, runs, and returns the `fetch` outputs on the host. Afterwards `carry`
    /// names, for each `(input, output)` of `links`, the output buffer that holds the input's
    /// next value.
    pub(super) fn run(
        &mut self,
        session: &mut Session,
        ctx: &str,
        sources: Vec<(String, Source<'_>)>,
        fetch: &[String],
        links: &[(String, String)],
        carry: &mut BTreeMap<String, (i32, String)>,
    ) -> Result<BTreeMap<String, Tensor>> {
        let mut key = Vec::with_capacity(sources.len());
        for (name, source) in &sources {
            let (ty, shape) = self
                .source_type(source)
                .ok_or_else(|| RuntimeError::Graph {
                    graph: ctx.to_string(),
                    message: format!("input `{name}` is not a tensor"),
                })?;
            // A replayed graph runs none of its kernels' host code, so what a kernel reads on
            // the host is read once, at the capture: on a device every host-read input's value
            // selects the set, as the shaping ones do everywhere.
            let keyed = SHAPING_INPUTS.contains(&name.as_str())
                || self.device.is_some() && self.reads_on_host(name);
            let value = match source {
                Source::Host(t) if keyed => Some(bits(t)),
                _ => None,
            };
            key.push((name.clone(), ty, shape, value));
        }
        let at = match self.sets.iter().position(|s| s.key == key) {
            Some(at) => at,
            None => {
                let by_reference: Vec<&str> = sources
                    .iter()
                    .filter(|(name, source)| self.referable(name, source))
                    .map(|(name, _)| name.as_str())
                    .collect();
                self.add_set(session, ctx, key, &by_reference)?
            }
        };
        self.tick += 1;
        set_at(&mut self.sets, at).map_err(ort_err(ctx))?.last_used = self.tick;
        for (name, source) in &sources {
            self.fill(at, name, source)
                .map_err(ort_err(format!("{ctx}: input `{name}`")))?;
        }

        let set = set_at(&mut self.sets, at).map_err(ort_err(ctx))?;
        if std::mem::take(&mut set.moved) {
            set.id = self.next_id;
            self.next_id += 1;
        }
        let first = set.outputs.is_none();
        let mut options = RunOptions::new().map_err(ort_err(ctx))?;
        if self.device.is_some() {
            let spent = set.id > MAX_GRAPHS;
            if spent && !std::mem::replace(&mut self.said_spent, true) {
                eprintln!(
                    "v2l: {ctx}: {MAX_GRAPHS} CUDA graphs captured (ONNX Runtime keeps each \
                     for the session's life); later input sets run without one"
                );
            }
            let id = if first || spent { -1 } else { set.id };
            options
                .set("gpu_graph_id", id.to_string())
                .map_err(ort_err(ctx))?;
        }
        let flight = super::interrupt::InFlight::start(ort::AsPointer::ptr(&options))?;
        let outs = match session.run_binding_with_options(&set.binding, &options) {
            Ok(outs) => outs,
            Err(e) => {
                // ONNX Runtime ends a CUDA graph capture even when the run failed (a stop cut
                // it short): the set captures again under a new graph id next time, never
                // replaying that partial graph.
                set.moved = true;
                return Err(flight.outcome(ort_err(ctx)(e)));
            }
        };
        if first {
            // This run's outputs, allocated by ONNX Runtime, are copied once into the set's
            // own buffers, bound from now on.
            let mut buffers = BTreeMap::new();
            for (name, v) in outs.iter() {
                let buffer = v
                    .downcast::<DynTensorValueType>()
                    .and_then(|v| {
                        let ty = *v.data_type();
                        let mut b = DynTensor::new(&self.alloc, ty, v.shape().to_vec())?;
                        copier(&mut self.copiers, ty, self.device)?.copy(&v, &mut b)?;
                        Ok(b)
                    })
                    .map_err(ort_err(format!("{ctx}: output `{name}`")))?;
                buffers.insert(name.to_string(), buffer);
            }
            drop(outs);
            for (name, buffer) in buffers.iter_mut() {
                set.binding
                    .bind_output(name.as_str(), buffer)
                    .map_err(ort_err(format!("{ctx}: output `{name}`")))?;
            }
            set.outputs = Some(buffers);
        } else {
            drop(outs);
        }

        let set = set_at(&mut self.sets, at).map_err(ort_err(ctx))?;
        let id = set.id;
        let mut result = BTreeMap::new();
        for name in fetch {
            let buffer = set
                .outputs
                .as_ref()
                .and_then(|o| o.get(name))
                .ok_or_else(|| RuntimeError::missing_output(ctx, name))?;
            let t = to_host(&mut self.copiers, self.device, buffer)
                .map_err(ort_err(format!("{ctx}: output `{name}`")))?;
            result.insert(name.clone(), t);
        }
        carry.clear();
        for (input, output) in links {
            carry.insert(input.clone(), (id, output.clone()));
        }
        Ok(result)
    }

    fn source_type(&self, source: &Source<'_>) -> Option<(TensorElementType, Vec<i64>)> {
        let dims = |s: &[usize]| s.iter().map(|&d| d as i64).collect::<Vec<_>>();
        let tensor = |v: &ort::value::DynValue| {
            Some((v.dtype().tensor_type()?, v.dtype().tensor_shape()?.to_vec()))
        };
        match source {
            Source::Host(t) => Some((ort_element_type(t)?, dims(&t.shape))),
            Source::Unwritten(ty, shape) => Some((*ty, shape.clone())),
            Source::Fixed(v) => tensor(v),
            Source::Carried(v) => tensor(v),
            Source::Borrowed(shape, _) => Some((TensorElementType::Float32, dims(shape))),
            Source::Output(id, name) => {
                let set = self.sets.iter().find(|s| s.id == *id)?;
                let b = set.outputs.as_ref()?.get(name)?;
                Some((*b.data_type(), b.shape().to_vec()))
            }
        }
    }

    /// Whether input `name` from `source` is bound by reference, not copied: a fixed value
    /// already where the set's buffer would be (the device's memory, or the host's for an
    /// input read there), such as the weights a LoRA merge wrote on the device. Every set then
    /// reads that one value, and a rewrite in place is seen by every set with no copy.
    fn referable(&self, name: &str, source: &Source<'_>) -> bool {
        let Source::Fixed(v) = source else {
            return false;
        };
        let Ok(t) = v.view().downcast::<DynTensorValueType>() else {
            return false;
        };
        let info = t.memory_info();
        match self.device {
            Some(id) if !self.reads_on_host(name) => {
                info.allocation_device() == ort::memory::AllocationDevice::CUDA
                    && info.device_id() == id
            }
            _ => info.is_cpu_accessible(),
        }
    }

    /// A new set for `key`: a buffer per input but those bound by reference (`by_reference`),
    /// bound; outputs to the device until the first run gives their shapes. Drops the least
    /// recently used set beyond [`MAX_SETS`].
    fn add_set(
        &mut self,
        session: &Session,
        ctx: &str,
        key: Vec<KeyPart>,
        by_reference: &[&str],
    ) -> Result<usize> {
        if self.sets.len() >= MAX_SETS {
            let oldest = self
                .sets
                .iter()
                .enumerate()
                .min_by_key(|(_, s)| s.last_used);
            if let Some((oldest, _)) = oldest {
                self.sets.remove(oldest);
            }
        }
        let mut binding = session.create_binding().map_err(ort_err(ctx))?;
        let mut inputs = BTreeMap::new();
        for (name, ty, shape, _) in key.iter().filter(|k| !by_reference.contains(&k.0.as_str())) {
            let buffer = self
                .buffer(name, *ty, shape)
                .map_err(ort_err(format!("{ctx}: input `{name}`")))?;
            binding
                .bind_input(name.as_str(), &buffer)
                .map_err(ort_err(format!("{ctx}: input `{name}`")))?;
            inputs.insert(name.clone(), buffer);
        }
        for output in session.outputs() {
            binding
                .bind_output_to_device(output.name(), self.alloc.memory_info())
                .map_err(ort_err(format!("{ctx}: output `{}`", output.name())))?;
        }
        let id = self.next_id;
        self.next_id += 1;
        self.sets.push(Set {
            key,
            id,
            binding,
            inputs,
            copied: HashMap::new(),
            referenced: HashMap::new(),
            kept: HashMap::new(),
            moved: false,
            outputs: None,
            last_used: 0,
        });
        Ok(self.sets.len() - 1)
    }

    /// A buffer of the set's own for input `name`: on the host for an input read there, else
    /// where the buffers live.
    fn buffer(&self, name: &str, ty: TensorElementType, shape: &[i64]) -> ort::Result<DynTensor> {
        match self.reads_on_host(name) {
            true => DynTensor::new(&Allocator::default(), ty, shape.to_vec()),
            false => DynTensor::new(&self.alloc, ty, shape.to_vec()),
        }
    }

    /// Binds the fixed value `v` as input `name` of set `at` by reference, unless it is bound
    /// already at its generation. A set whose graph read the input elsewhere captures anew.
    fn bind_reference(&mut self, at: usize, name: &str, v: &Held) -> ort::Result<()> {
        let generation = self.generation.get(name).copied().unwrap_or(0);
        let set = set_at(&mut self.sets, at)?;
        let address = v.view().downcast::<DynTensorValueType>()?.data_ptr() as usize;
        if set.copied.get(name) == Some(&generation) && set.referenced.get(name) == Some(&address) {
            return Ok(());
        }
        match v {
            // A value that owns its data: ort's binding holds it.
            Held::Own(value) => {
                set.binding.bind_input(name, value)?;
                set.kept.remove(name);
            }
            // A view: ort's `bind_input` would copy it (through its identity sessions, under a
            // lock it takes again: it never returns, ort 2.0.0-rc.15). Bound as it is; the set
            // keeps the buffer it points into.
            Held::Part { view, buffer } => {
                bind_raw(&mut set.binding, name, view)?;
                set.kept.insert(name.to_string(), buffer.clone());
            }
        }
        // A buffer of its own (an earlier source of another kind) goes.
        set.inputs.remove(name);
        let before = set.referenced.insert(name.to_string(), address);
        if set.outputs.is_some() && before != Some(address) {
            set.moved = true;
        }
        set.copied.insert(name.to_string(), generation);
        Ok(())
    }

    /// Copies input `name` of set `at` from `source` where its buffer does not hold it yet.
    fn fill(&mut self, at: usize, name: &str, source: &Source<'_>) -> ort::Result<()> {
        if let (Source::Fixed(v), true) = (source, self.referable(name, source)) {
            return self.bind_reference(at, name, v);
        }
        let generation = self.generation.get(name).copied().unwrap_or(0);
        let (ty, shape) = self
            .sets
            .get(at)
            .and_then(|s| s.key.iter().find(|k| k.0 == name))
            .map(|k| (k.1, k.2.clone()))
            .ok_or_else(|| missing(name))?;
        // Bound by reference until now: a buffer of its own from here on.
        if set_at(&mut self.sets, at)?.referenced.contains_key(name) {
            let buffer = self.buffer(name, ty, &shape)?;
            let set = set_at(&mut self.sets, at)?;
            set.binding.bind_input(name, &buffer)?;
            set.inputs.insert(name.to_string(), buffer);
            set.referenced.remove(name);
            set.kept.remove(name);
            set.copied.remove(name);
            set.moved |= set.outputs.is_some();
        }
        let c = copier(&mut self.copiers, ty, self.device)?;
        if let Source::Output(id, output) = source {
            let from = self
                .sets
                .iter()
                .position(|s| s.id == *id)
                .ok_or_else(|| missing(name))?;
            let (src, dst) = if from == at {
                let Set {
                    inputs,
                    outputs,
                    copied,
                    ..
                } = set_at(&mut self.sets, at)?;
                copied.remove(name);
                (outputs.as_ref(), inputs.get_mut(name))
            } else {
                // Two sets at once: one read, one written.
                let (low, high) = self.sets.split_at_mut(from.max(at));
                let (src, dst) = match from < at {
                    true => (low.get(from), high.first_mut()),
                    false => (high.first(), low.get_mut(at)),
                };
                let (Some(src), Some(dst)) = (src, dst) else {
                    return Err(missing(name));
                };
                dst.copied.remove(name);
                (src.outputs.as_ref(), dst.inputs.get_mut(name))
            };
            return match (src.and_then(|o| o.get(output)), dst) {
                (Some(src), Some(dst)) => c.copy(src, dst),
                _ => Err(missing(name)),
            };
        }
        let set = set_at(&mut self.sets, at)?;
        let dst = set.inputs.get_mut(name).ok_or_else(|| missing(name))?;
        if !matches!(source, Source::Fixed(_)) {
            // Written from elsewhere this run: a fixed value of the same name is copied again.
            set.copied.remove(name);
        }
        match source {
            Source::Host(t) => c.copy(&*view(t)?, dst),
            Source::Carried(v) => c.copy(v, dst),
            Source::Borrowed(shape, data) => {
                let s: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
                let v = ort::value::TensorRef::from_array_view((s, *data))?;
                c.copy(&*v.into_dyn(), dst)
            }
            Source::Fixed(v) => {
                if set.copied.get(name) == Some(&generation) {
                    return Ok(());
                }
                c.copy(&***v, dst)?;
                set.copied.insert(name.to_string(), generation);
                // A changed value read on the host: a graph captured with the old one would
                // go on reading it (see the key).
                if self.device.is_some() && self.host_inputs.iter().any(|h| h == name) {
                    set.moved |= set.outputs.is_some();
                }
                Ok(())
            }
            Source::Unwritten(..) | Source::Output(..) => Ok(()),
        }
    }
}

/// An `Identity` session over one element type on the buffers' provider: copies a value
/// (host or device) into a bound buffer, and a buffer out to the host.
struct Copier {
    ty: TensorElementType,
    session: Session,
    binding: IoBinding,
}

impl Copier {
    /// Copies `src` into `dst` (same type and shape), waiting for it.
    fn copy<T: ort::value::ValueTypeMarker + ?Sized>(
        &mut self,
        src: &ort::value::Value<T>,
        dst: &mut DynTensor,
    ) -> ort::Result<()> {
        // ort's `bind_input` copies a value that borrows its data (ort 2.0.0-rc.15 through
        // its own identity sessions, under a lock it may already hold): the value is bound
        // as it is instead, and unbound (`clear`) before this returns, before `src` can go.
        let result = bind_raw(&mut self.binding, "x", src)
            .and_then(|()| self.binding.bind_output("y", dst))
            .and_then(|()| self.session.run_binding(&self.binding).map(drop));
        // On every path: ONNX Runtime records a name before a bind can fail.
        self.binding.clear();
        result
    }
}

/// Binds `value` as input `name` as it is, where ort's `bind_input` would copy a value that
/// borrows its data. ONNX Runtime keeps its own reference to the value (not to the data it
/// borrows) until the input is bound again or cleared; the caller keeps the data alive.
fn bind_raw<T: ort::value::ValueTypeMarker + ?Sized>(
    binding: &mut IoBinding,
    name: &str,
    value: &ort::value::Value<T>,
) -> ort::Result<()> {
    use ort::AsPointer;
    let name =
        std::ffi::CString::new(name).map_err(|_| ort::Error::new("an input name with a NUL"))?;
    // SAFETY: both pointers are live for the call; ONNX Runtime copies the name and takes its
    // own reference to the value.
    check(unsafe { (ort::api().BindInput)(binding.ptr_mut(), name.as_ptr(), value.ptr()) })
}

/// Set `at` of `sets` (a place just found or made).
fn set_at(sets: &mut [Set], at: usize) -> ort::Result<&mut Set> {
    sets.get_mut(at)
        .ok_or_else(|| ort::Error::new("no such set of bound buffers"))
}

/// The inputs `session` wants in host memory (ONNX Runtime's `SessionGetMemoryInfoForInputs`).
fn inputs_on_host(session: &Session) -> ort::Result<Vec<String>> {
    use ort::AsPointer;
    let inputs = session.inputs();
    let mut infos = vec![std::ptr::null(); inputs.len()];
    // SAFETY: `infos` has one slot per input; ONNX Runtime fills each with a pointer it owns.
    let status = unsafe {
        (ort::api().SessionGetMemoryInfoForInputs)(session.ptr(), infos.as_mut_ptr(), infos.len())
    };
    check(status)?;
    let mut out = Vec::new();
    for (input, info) in inputs.iter().zip(infos) {
        if info.is_null() {
            continue;
        }
        let mut ty = ort::sys::OrtMemoryInfoDeviceType::OrtMemoryInfoDeviceType_CPU;
        // SAFETY: a non-null memory info of the live session.
        unsafe { (ort::api().MemoryInfoGetDeviceType)(info, &mut ty) };
        if ty == ort::sys::OrtMemoryInfoDeviceType::OrtMemoryInfoDeviceType_CPU {
            out.push(input.name().to_string());
        }
    }
    Ok(out)
}

/// The copier of `ty`, built on first use.
fn copier(
    copiers: &mut Vec<Copier>,
    ty: TensorElementType,
    device: Option<i32>,
) -> ort::Result<&mut Copier> {
    let at = match copiers.iter().position(|c| c.ty == ty) {
        Some(at) => at,
        None => {
            let session = identity_session(ty, device)?;
            let binding = session.create_binding()?;
            copiers.push(Copier {
                ty,
                session,
                binding,
            });
            copiers.len() - 1
        }
    };
    copiers
        .get_mut(at)
        .ok_or_else(|| ort::Error::new("no copier"))
}

/// A small tensor's values as bits, for a key.
fn bits(t: &Tensor) -> Vec<u32> {
    use crate::tensor::Data;
    match &t.data {
        Data::F32(v) => v.iter().map(|x| x.to_bits()).collect(),
        Data::I64(v) => v
            .iter()
            .flat_map(|x| [*x as u32, (*x >> 32) as u32])
            .collect(),
        Data::U8(v) => v.iter().map(|&x| u32::from(x)).collect(),
        Data::I8(v) => v.iter().map(|&x| x as u8 as u32).collect(),
        Data::F16(v) => v.iter().map(|x| u32::from(x.to_bits())).collect(),
        Data::BF16(v) => v.iter().map(|x| u32::from(x.to_bits())).collect(),
    }
}

fn missing(name: &str) -> ort::Error {
    ort::Error::new(format!("no bound buffer for `{name}`"))
}

/// `buffer` on the host: read in place where the host can, else copied out by the copier of
/// its type (a plain run returns its output in host memory).
fn to_host(
    copiers: &mut Vec<Copier>,
    device: Option<i32>,
    buffer: &DynTensor,
) -> ort::Result<Tensor> {
    if buffer.memory_info().is_cpu_accessible() {
        return from_ort(&buffer.view().into_dyn());
    }
    let c = copier(copiers, *buffer.data_type(), device)?;
    let outs = c.session.run(vec![(
        "x".to_string(),
        ort::session::SessionInputValue::from(buffer.view().into_dyn()),
    )])?;
    let y = outs
        .get("y")
        .ok_or_else(|| ort::Error::new("the copy returned nothing"))?;
    from_ort(&y.view())
}

/// A session of one `Identity` over `ty` tensors of any shape, on the CUDA provider of
/// `device` (or the CPU's).
fn identity_session(ty: TensorElementType, device: Option<i32>) -> ort::Result<Session> {
    use prost::Message;
    use v2l_graphs::proto;
    let io = |name: &str| proto::ValueInfoProto {
        name: name.into(),
        r#type: Some(proto::TypeProto {
            value: Some(proto::type_proto::Value::TensorType(
                proto::type_proto::Tensor {
                    elem_type: onnx_code(ty),
                    shape: None,
                },
            )),
        }),
        doc_string: String::new(),
    };
    let model = proto::ModelProto {
        ir_version: 8,
        opset_import: vec![proto::OperatorSetIdProto {
            domain: String::new(),
            version: 21,
        }],
        producer_name: "v2l".into(),
        graph: Some(proto::GraphProto {
            node: vec![proto::NodeProto {
                op_type: "Identity".into(),
                input: vec!["x".into()],
                output: vec!["y".into()],
                ..Default::default()
            }],
            name: "to_host".into(),
            input: vec![io("x")],
            output: vec![io("y")],
            ..Default::default()
        }),
        ..Default::default()
    };
    let env = crate::ort_env::init().map_err(|e| ort::Error::new(e.to_string()))?;
    let mut b = Session::builder(env)?;
    if let Some(id) = device {
        b = b.with_execution_providers([ort::ep::CUDA::default()
            .with_device_id(id)
            .build()
            .error_on_failure()])?;
    }
    b.commit_from_memory(&model.encode_to_vec())
}

/// ONNX's element type code.
fn onnx_code(ty: TensorElementType) -> i32 {
    use TensorElementType as E;
    match ty {
        E::Float32 => 1,
        E::Uint8 => 2,
        E::Int8 => 3,
        E::Int32 => 6,
        E::Int64 => 7,
        E::Bool => 9,
        E::Float16 => 10,
        E::Bfloat16 => 16,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use crate::session::{Model, SessionOptions};
    use crate::tensor::{Data, FloatsMut, Tensor};

    /// `y = x + c` over any length, run bound on the CPU provider.
    fn sum(dir: &std::path::Path) -> Model {
        use v2l_graphs::{DType, Graph};
        let mut g = Graph::new("sum");
        let x = g.input("x", DType::F32, vec!["n".into()]);
        let c = g.input("c", DType::F32, vec!["n".into()]);
        let y = g.add(&x, &c);
        g.output(&y, "y", DType::F32, vec!["n".into()]);
        let path = dir.join("sum.onnx");
        v2l_graphs::save(&g, &path, v2l_graphs::ExternalData::Never).unwrap();
        let opts = SessionOptions {
            bound_runs: true,
            ..Default::default()
        };
        Model::load(&path, &opts).unwrap()
    }

    fn y(m: &mut Model, given: &[(&str, [f32; 2])]) -> Vec<f32> {
        let mut inputs =
            BTreeMap::from([("x".to_string(), Tensor::f32(vec![2], vec![10.0, 20.0]))]);
        for (name, v) in given {
            inputs.insert(name.to_string(), Tensor::f32(vec![2], v.to_vec()));
        }
        match m.run(&inputs).unwrap().remove("y").unwrap().data {
            Data::F32(v) => v,
            other => panic!("{other:?}"),
        }
    }

    /// The one set's id, whether it holds a buffer of its own for `c`, and where `c` is bound
    /// by reference.
    fn set(m: &Model) -> (i32, bool, Option<usize>) {
        let b = m.bound.as_ref().unwrap();
        assert_eq!(b.sets.len(), 1);
        let s = &b.sets[0];
        (
            s.id,
            s.inputs.contains_key("c"),
            s.referenced.get("c").copied(),
        )
    }

    #[test]
    fn fixed_values_where_the_buffers_are_are_bound_by_reference() {
        let d = tempfile::tempdir().unwrap();
        let mut m = sum(d.path());
        m.set_fixed_inputs(vec![("c".into(), Tensor::f32(vec![2], vec![1.0, 2.0]))])
            .unwrap();
        assert_eq!(y(&mut m, &[]), [11.0, 22.0]);
        let (id, own, at) = set(&m);
        assert!(
            !own && at.is_some(),
            "`c` was copied into a buffer of the set's own"
        );
        // Rewritten in place: seen by the set, at the same address, with the same graph.
        match m.fixed_mut("c", &[2]) {
            Some(FloatsMut::F32(c)) => c.copy_from_slice(&[3.0, 4.0]),
            _ => panic!("no f32 `c` to rewrite"),
        }
        assert_eq!(y(&mut m, &[]), [13.0, 24.0]);
        assert_eq!(set(&m), (id, false, at));
        // A run's own `c` takes a buffer of the set's own; the fixed one comes back after.
        assert_eq!(y(&mut m, &[("c", [100.0, 100.0])]), [110.0, 120.0]);
        let (moved, own, _) = set(&m);
        assert!(
            own && moved != id,
            "a graph captured on `c`'s address would be replayed"
        );
        assert_eq!(y(&mut m, &[]), [13.0, 24.0]);
        let (back, own, at) = set(&m);
        assert!(!own && at.is_some() && back != moved);
        // A new value elsewhere: bound there, under a new graph id.
        m.set_fixed_inputs(vec![("c".into(), Tensor::f32(vec![2], vec![5.0, 6.0]))])
            .unwrap();
        assert_eq!(y(&mut m, &[]), [15.0, 26.0]);
        let (id, own, new_at) = set(&m);
        assert!(!own && new_at.is_some());
        assert_eq!(id != back, new_at != at, "a new id exactly when `c` moved");
    }
}
