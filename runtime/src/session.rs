//! One ONNX model loaded in ONNX Runtime, run on host tensors.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ort::session::Session;
use ort::value::{DynValue, TensorRef};

use crate::error::{Result, RuntimeError};
use crate::tensor::{Data, FloatsMut, Tensor};

mod arena;
mod bound;
mod handoff;
mod inputs;
mod interrupt;
mod packed;
mod pager;
mod values;
pub use handoff::DeviceValues;
pub use inputs::Carry;
pub use interrupt::{interrupted, interruptible, Interrupt};
use packed::Held;
pub use packed::Packed;
pub use pager::release_freed_memory;
use values::{from_ort, into_ort, ort_element_type, ort_err, view};

/// The graphs this process was asked to capture as CUDA graphs and built without (ONNX
/// Runtime refused the capture), each with the reason.
static UNCAPTURED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// The shared arenas this process registered ([`SessionOptions::shared_arena`]): `cuda:0`,
/// or `cuda:0 refused: …` where ONNX Runtime would not, and each session kept its own.
pub fn shared_arenas() -> Vec<String> {
    arena::registered()
}

/// [`UNCAPTURED`] so far: what the GPU check reports beside a CUDA-graph pass.
pub fn uncaptured_graphs() -> Vec<String> {
    UNCAPTURED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone()
}

/// Session settings that matter for speed and reproducibility.
#[derive(Clone, Debug, Default)]
pub struct SessionOptions {
    /// Intra-op threads (0: ONNX Runtime's default, one per core).
    pub threads: usize,
    /// CPU (default), CUDA or TensorRT.
    pub backend: crate::backend::BackendOptions,
    /// Leave the Casts of f16/bf16-stored weights to run per use instead of folding them into
    /// f32 copies at session build: one f32 weight in memory at a time instead of the whole model
    /// (how `v2l-compile` runs a deep bf16-stored DiT for its accuracy check).
    pub keep_weight_casts: bool,
    /// A static int8 (Q/DQ) graph in its MatMul form: ONNX Runtime's `MatMulAddFusion` would
    /// turn each MatMul + bias Add into a Gemm before its Q/DQ fusion sees them, and the Gemm
    /// runs dequantised in f32 (the compile layer's Q/DQ form).
    pub qdq_matmul: bool,
    /// No graph optimisation at all: for sessions given replacement weights that ONNX
    /// Runtime's optimisers would otherwise fold from the model file's own (a fused LoRA on a
    /// static int8 engine's Q/DQ weights).
    pub unoptimized: bool,
    /// Keep a loop's carried outputs (the VAE's frame-batch caches) in memory the session
    /// allocates, so they never leave the device between batches. On for GPU backends; on the
    /// CPU only to test that path ([`Model::run_carrying`]).
    pub carry_in_session_memory: bool,
    /// Run a loop's first batch in a session of its own and the rest in another (the VAE's,
    /// whose first frame batch has other shapes than the rest): ONNX Runtime's CUDA
    /// convolution keeps one cuDNN plan per node and builds it again whenever its input's
    /// shape changes, twice a clip in one session. On for GPU backends without bound runs (a
    /// replayed CUDA graph builds nothing); on the CPU only to test that path
    /// ([`crate::vae::Vae`]).
    pub first_batch_session: bool,
    /// Write ONNX Runtime's per-node trace of every session into this directory
    /// (`<graph>.v2l<n>_<time>.json`, finished when the session is dropped): which operators, on
    /// which provider, take the time. On CUDA a node's time is its kernels' only with
    /// `CUDA_LAUNCH_BLOCKING=1` (launches are asynchronous otherwise).
    pub profile: Option<PathBuf>,
    /// Run through buffers bound once per set of input shapes, as CUDA graphs need (the
    /// engine's `enable_cuda_graph`, which turns this on): each set's inputs are copied into
    /// its own buffers and its outputs read from its own. On the CPU only to test that path.
    pub bound_runs: bool,
    /// Take working memory from one arena shared by the process's sessions ([`arena`]) instead
    /// of one per session, which keeps its largest run's size for its life. On for cuda
    /// engines without CUDA graphs (a captured graph goes on writing where it was captured,
    /// which a shared arena may since have handed to another session); on the CPU only to
    /// test that path.
    pub shared_arena: bool,
    /// Write the graph as ONNX Runtime optimised it for this session's provider to this file
    /// (weights inline: for small graphs): which of its fusions took.
    pub optimized_graph: Option<PathBuf>,
    /// Take the fixed inputs made together (a LoRA switch's factor inputs,
    /// [`Model::set_fixed_packed`]) as one buffer moved at once, each input a view into it.
    /// On for GPU backends without bound runs; on the CPU only to test that path.
    pub pack_fixed_inputs: bool,
}

impl SessionOptions {
    /// Whether sessions made with these options run through bound buffers: asked for
    /// ([`SessionOptions::bound_runs`]), or a cuda engine capturing CUDA graphs (its
    /// `bundle.json` or `V2L_CUDA_OPTIONS`; an unreadable variable is the session build's
    /// error, not this one's).
    pub fn runs_bound(&self) -> bool {
        self.bound_runs || (self.backend.for_this_process()).is_ok_and(|b| b.cuda_graph())
    }
}

/// An ONNX model ready to run on the CPU backend.
pub struct Model {
    path: PathBuf,
    session: Session,
    inputs: Vec<String>,
    outputs: Vec<String>,
    /// Inputs converted once and passed by reference on every run (bound weights, LoRA factors,
    /// a request's constants): on a GPU backend they live on the device.
    fixed: std::collections::HashMap<String, Held>,
    /// The CUDA device of a GPU backend, where fixed inputs are placed; `None` on the CPU.
    device: Option<i32>,
    /// Where carried outputs are allocated ([`SessionOptions::carry_in_session_memory`]): the
    /// GPU's memory on a GPU backend; `None`: ONNX Runtime returns them in host memory.
    carry_alloc: Option<ort::memory::Allocator>,
    /// Profiling is on ([`SessionOptions::profile`]): the trace is finished on drop.
    profiling: bool,
    /// The buffers of bound runs ([`SessionOptions::bound_runs`]).
    bound: Option<Box<bound::Bound>>,
    /// The session's working memory comes from the process's shared arena
    /// ([`SessionOptions::shared_arena`]).
    shares_arena: bool,
    /// Fixed inputs made together come as one buffer ([`SessionOptions::pack_fixed_inputs`]).
    packs_fixed: bool,
}

impl Drop for Model {
    fn drop(&mut self) {
        if self.profiling {
            if let Err(e) = self.session.end_profiling() {
                eprintln!("{}: the profile was not written: {e}", self.path.display());
            }
        }
    }
}

/// The optimisers that would widen low-precision weights into f32 copies at session build (a
/// `;`-separated list). `FuseFp16InitializerToFp32NodeTransformer` also reads an f16 weight
/// from the model file even when the session was given a replacement (ORT 1.31): with it on,
/// a LoRA fused into an fp16 engine was silently ignored.
const KEEP_WEIGHT_CASTS: &str = "ConstantFolding;FuseFp16InitializerToFp32NodeTransformer";

impl Model {
    /// Loads `path` (external data files are resolved beside it).
    pub fn load(path: &Path, opts: &SessionOptions) -> Result<Model> {
        Self::load_with_weights(path, opts, Vec::new())
    }

    /// Loads `path` with some initializers replaced (fused LoRA weights): ONNX Runtime builds
    /// the session, constant folding included, from the replacements.
    pub fn load_with_weights(
        path: &Path,
        opts: &SessionOptions,
        weights: Vec<(String, Tensor)>,
    ) -> Result<Model> {
        check_model_file(path)?;
        Self::build(GraphSource::File(path), opts, weights, true)
    }

    /// [`Model::load_with_weights`] for a graph held in memory (`bytes`, an ONNX model) whose
    /// external data lives beside `beside`, the model file it was made from (a part of a cut
    /// DiT): errors name `beside` and `part`.
    pub fn load_bytes_with_weights(
        bytes: &[u8],
        beside: &Path,
        part: &str,
        opts: &SessionOptions,
        weights: Vec<(String, Tensor)>,
    ) -> Result<Model> {
        Self::build(
            GraphSource::Bytes {
                bytes,
                beside,
                part,
            },
            opts,
            weights,
            true,
        )
    }

    /// Builds the session; with `graphs` false, without CUDA graphs whatever the settings (the
    /// second try for a graph ONNX Runtime will not capture).
    fn build(
        source: GraphSource<'_>,
        opts: &SessionOptions,
        weights: Vec<(String, Tensor)>,
        graphs: bool,
    ) -> Result<Model> {
        let env = crate::ort_env::init()?;
        let path = source.path();
        let ctx = match source {
            GraphSource::File(p) => p.display().to_string(),
            GraphSource::Bytes { beside, part, .. } => format!("{} ({part})", beside.display()),
        };
        let mut b = Session::builder(env).map_err(ort_err(&ctx))?;
        if let GraphSource::Bytes { beside, .. } = source {
            // External data is found relative to this folder (ONNX Runtime refuses any path
            // that leaves it, links included).
            let dir = beside.parent().unwrap_or(Path::new("."));
            b = b
                .with_config_entry(
                    "session.model_external_initializers_file_folder_path",
                    dir.to_string_lossy(),
                )
                .map_err(|e| RuntimeError::Ort {
                    context: ctx.clone(),
                    message: e.to_string(),
                })?;
        }
        if opts.threads > 0 {
            b = b
                .with_intra_threads(opts.threads)
                .map_err(|e| RuntimeError::Ort {
                    context: ctx.clone(),
                    message: e.to_string(),
                })?;
        }
        // ORT's memory pattern plans one buffer for all of a run's activations; with the arena
        // that kept every block's peak alive at once (5B block, 5,626 tokens: 4.1 GB against
        // 2.8 GB without the pattern, same speed).
        b = b
            .with_memory_pattern(false)
            .map_err(|e| RuntimeError::Ort {
                context: ctx.clone(),
                message: e.to_string(),
            })?;
        // Prepacking (MLAS's own layout of every Gemm/Conv weight) on the intra-op threads:
        // a 5B-width block's 600 MB of f32 weights built in 0.65–0.70 s instead of 0.96–1.31 s
        // here (ORT 1.31, 2 threads).
        b = b
            .with_config_entry("session.prepack.enable_parallel", "1")
            .map_err(|e| RuntimeError::Ort {
                context: ctx.clone(),
                message: e.to_string(),
            })?;
        if let Some(dir) = &opts.profile {
            b = b
                .with_profiling(profile_prefix(dir, path))
                .map_err(|e| RuntimeError::Ort {
                    context: format!("{ctx}: profiling into {}", dir.display()),
                    message: e.to_string(),
                })?;
        }
        if let Some(file) = &opts.optimized_graph {
            b = b
                .with_optimized_model_path(file)
                .map_err(|e| RuntimeError::Ort {
                    context: format!("{ctx}: writing the optimised graph to {}", file.display()),
                    message: e.to_string(),
                })?;
        }
        if opts.unoptimized {
            b = b
                .with_optimization_level(ort::session::builder::GraphOptimizationLevel::Disable)
                .map_err(|e| RuntimeError::Ort {
                    context: ctx.clone(),
                    message: e.to_string(),
                })?;
        }
        let mut disabled: Vec<&str> = Vec::new();
        if opts.keep_weight_casts {
            disabled.push(KEEP_WEIGHT_CASTS);
        }
        if opts.qdq_matmul {
            disabled.push("MatMulAddFusion");
        }
        if !disabled.is_empty() {
            b = b
                .with_disabled_optimizers(disabled.join(";"))
                .map_err(|e| RuntimeError::Ort {
                    context: ctx.clone(),
                    message: e.to_string(),
                })?;
        }
        // Low-precision CPU engines call our attention and conv operators; registering them costs nothing
        // for graphs that do not.
        b = v2l_kernels::operators()
            .and_then(|d| Ok(b.with_operators(d)?))
            .map_err(ort_err(format!("{ctx}: the ai.v2l operators")))?;
        let gpu = opts.backend.backend != crate::backend::Backend::Cpu;
        let mut backend = opts.backend.for_this_process()?;
        if !graphs {
            backend.cuda.remove("enable_cuda_graph");
        }
        if gpu {
            // The CUDA 13 libraries of `scripts/setup.sh --gpu`, before the provider
            // looks them up by name.
            crate::cuda_libs::preload()?;
            let tf32_matters;
            (b, tf32_matters) = gpu_placement(b, source, &ctx)?;
            // TF32 rounds no operand of a graph without f32 convolutions and products (a
            // lowered VAE's; only the cuDNN engine its bf16/fp16 convolutions run on, and so
            // their order of accumulation, may change), while `use_tf32=0` keeps cuDNN's
            // convolutions off tensor cores in every type: such a session runs with it on.
            backend.tf32 |= !tf32_matters;
        }
        let eps = backend.dispatch();
        let bound_runs = opts.bound_runs || backend.cuda_graph();
        // ONNX Runtime refuses to capture a graph with control flow, a compute node on the CPU
        // or a copy between devices, at session build. A graph without replacement weights is
        // then built again without CUDA graphs; one with them (a fused LoRA) is not, as that
        // would hold every weight twice: its error says how to turn graphs off.
        let graph_capture = backend.cuda_graph();
        let retry = graph_capture && weights.is_empty();
        if !eps.is_empty() {
            let backend = opts.backend.backend.name();
            b = b.with_execution_providers(eps).map_err(|e| RuntimeError::Ort {
                context: format!("{ctx}: {backend} execution provider"),
                message: if gpu {
                    format!("{e} (needs the onnxruntime-gpu library with its CUDA/TensorRT dependencies on this machine)")
                } else {
                    e.to_string()
                },
            })?;
        }
        // After the providers: a CPU-only ONNX Runtime has refused a GPU engine by then.
        let shares_arena = match opts.backend.backend {
            crate::backend::Backend::Cuda => !backend.cuda_graph(),
            crate::backend::Backend::Cpu => opts.shared_arena,
            // TensorRT has not run: its engines keep ONNX Runtime's arrangement.
            crate::backend::Backend::TensorRt => false,
        } && share_arena(&opts.backend, &backend);
        if shares_arena {
            b = b.with_env_allocators().map_err(|e| RuntimeError::Ort {
                context: format!("{ctx}: the shared arena"),
                message: e.to_string(),
            })?;
        }
        for (name, t) in weights {
            let v = into_ort(t).map_err(ort_err(format!("{ctx}: weight `{name}`")))?;
            b = b
                .with_initializer(&name, v)
                .map_err(|e| RuntimeError::Ort {
                    context: format!("{ctx}: weight `{name}`"),
                    message: e.to_string(),
                })?;
        }
        // On the CPU, the weight files' mapped pages go back to the kernel as the build packs
        // them (`pager`): a large graph is not held twice at the build's peak.
        let pager = match opts.backend.backend {
            crate::backend::Backend::Cpu => pager::Pager::start(large_weight_files(path)),
            _ => None,
        };
        let session = match commit(b, source) {
            Ok(s) => s,
            Err(e) if retry && e.to_string().contains("graph capture") => {
                drop(pager);
                let why = values::plain(&e.to_string());
                eprintln!("{ctx}: runs without CUDA graphs: {why}");
                let mut seen = UNCAPTURED
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                // Bounded: a server builds sessions for as long as it runs.
                if seen.len() < 256 {
                    seen.push(format!("{ctx}: {why}"));
                }
                drop(seen);
                return Self::build(source, opts, Vec::new(), false);
            }
            Err(e) if graph_capture && e.to_string().contains("graph capture") => {
                return Err(RuntimeError::Ort {
                    context: ctx,
                    message: format!(
                        "{} (V2L_CUDA_OPTIONS=enable_cuda_graph=0 runs it without CUDA graphs)",
                        values::plain(&e.to_string())
                    ),
                });
            }
            Err(e) => return Err(ort_err(&ctx)(e)),
        };
        drop(pager);
        let inputs = session
            .inputs()
            .iter()
            .map(|o| o.name().to_string())
            .collect();
        let outputs = session
            .outputs()
            .iter()
            .map(|o| o.name().to_string())
            .collect();
        let device = (opts.backend.backend != crate::backend::Backend::Cpu)
            .then_some(opts.backend.device_id);
        let carry_alloc = match device {
            Some(_) => Some(
                arena::memory_info(device, ort::memory::AllocatorType::Device)
                    .and_then(|info| ort::memory::Allocator::new(&session, info))
                    .map_err(ort_err(format!("{ctx}: device allocator")))?,
            ),
            None if opts.carry_in_session_memory => Some(
                ort::memory::Allocator::new(&session, ort::memory::MemoryInfo::default())
                    .map_err(ort_err(format!("{ctx}: allocator")))?,
            ),
            None => None,
        };
        let bound = match bound_runs {
            false => None,
            true => Some(Box::new(
                bound::Bound::new(&session, device)
                    .map_err(ort_err(format!("{ctx}: buffers of bound runs")))?,
            )),
        };
        Ok(Model {
            path: path.into(),
            session,
            inputs,
            outputs,
            fixed: Default::default(),
            device,
            carry_alloc,
            profiling: opts.profile.is_some(),
            packs_fixed: opts.pack_fixed_inputs || (device.is_some() && bound.is_none()),
            bound,
            shares_arena,
        })
    }

    /// Whether this session's working memory comes from the process's shared arena.
    pub fn shares_arena(&self) -> bool {
        self.shares_arena
    }

    /// ONNX Runtime's statistics of the arena this session's working memory comes from
    /// (`NumAllocs`, `InUse`, `MaxInUse`, `TotalAllocated`, …): the process's shared one where
    /// [`Model::shares_arena`].
    pub fn arena_stats(&self) -> Result<BTreeMap<String, u64>> {
        arena::stats(&self.session, self.device).map_err(ort_err(self.path.display().to_string()))
    }

    pub fn input_names(&self) -> &[String] {
        &self.inputs
    }

    pub fn output_names(&self) -> &[String] {
        &self.outputs
    }

    /// Sets inputs that stay the same across runs: converted once and passed by reference on
    /// every run; on a GPU backend copied to the device once, so no run copies them from the
    /// host again (what ORT's IoBinding is for; a device-resident value given to `run` binds
    /// the same way). With bound runs they stay on the host, copied into each set's buffers
    /// when changed. Not yet run on a GPU.
    pub fn set_fixed_inputs(&mut self, inputs: Vec<(String, Tensor)>) -> Result<()> {
        let ctx = self.path.display().to_string();
        for (name, t) in inputs {
            let err = || ort_err(format!("{ctx}: input `{name}`"));
            // The replaced value goes first, so a large input is not held twice.
            self.fixed.remove(&name);
            if let Some(b) = &mut self.bound {
                b.fixed_changed(&name);
            }
            let v = into_ort(self.as_declared(&name, t)).map_err(err())?;
            // Bound runs copy a fixed host value into each set's own buffer when it changes:
            // it stays on the host until then, not on the device twice over. (One already on
            // the device, `set_fixed_values`, every set binds by reference.)
            let v = match self.device.filter(|_| self.bound.is_none()) {
                None => v,
                Some(id) => v
                    .downcast::<ort::value::DynTensorValueType>()
                    .and_then(|t| t.to(ort::memory::AllocationDevice::CUDA, id))
                    .map(|t| t.into_dyn())
                    .map_err(err())?,
            };
            self.fixed.insert(name, Held::Own(v));
        }
        Ok(())
    }

    /// Whether fixed inputs made together should come as one [`Packed`] buffer
    /// ([`Model::set_fixed_packed`]) rather than one by one.
    pub fn packs_fixed(&self) -> bool {
        self.packs_fixed
    }

    /// Sets the fixed inputs `packed` holds: its buffer moved where the session reads (to the
    /// device in one copy and one wait), each input a view into it, passed by reference on
    /// every run. The buffer lives as long as any of its inputs is held (here, or kept after
    /// [`Model::take_fixed`]). Not yet run on a GPU.
    pub fn set_fixed_packed(&mut self, packed: Packed) -> Result<()> {
        let values = self.place_packed(packed)?;
        self.set_fixed_values(values);
        Ok(())
    }

    /// `packed`'s buffer where this session reads, as values to set ([`Model::set_fixed_values`]).
    /// Should the one copy to the device fail (it has not run on a GPU yet), the inputs move
    /// one by one, as before, and the process says so once.
    pub fn place_packed(&self, packed: Packed) -> Result<DeviceValues> {
        let ctx = format!("{}: fixed inputs moved as one buffer", self.path.display());
        let host = packed.into_host().map_err(ort_err(&ctx))?;
        let to_device = |id: i32, v: &DynValue| {
            v.view()
                .downcast::<ort::value::DynTensorValueType>()
                .and_then(|t| t.to(ort::memory::AllocationDevice::CUDA, id))
                .map(|t| t.into_dyn())
        };
        let held = match self.device.map(|id| (id, host.moved(|v| to_device(id, v)))) {
            None => host.views(),
            Some((_, Ok(on_device))) => on_device.views(),
            Some((id, Err(e))) => {
                static SAID: std::sync::Once = std::sync::Once::new();
                SAID.call_once(|| {
                    eprintln!(
                        "v2l: {ctx}: the copy of {} inputs failed ({}); they move one by one",
                        host.len(),
                        values::plain(&e.to_string())
                    )
                });
                // Each from a host value of its own: `to` never returns on a view (`owned`).
                host.owned().and_then(|values| {
                    values
                        .into_iter()
                        .map(|(name, v)| Ok((name, Held::Own(to_device(id, &v)?))))
                        .collect()
                })
            }
        }
        .map_err(ort_err(&ctx))?;
        Ok(DeviceValues(held.into_iter().collect()))
    }

    /// The data of the fixed float input `name` when it is held on the CPU with exactly
    /// `shape`, in its declared type: for rewriting in place (a LoRA switch to factors of the
    /// same shape writes into the buffers ONNX Runtime already reads, with no allocation and no
    /// second copy).
    pub fn fixed_mut(&mut self, name: &str, shape: &[usize]) -> Option<FloatsMut<'_>> {
        // On a GPU only where bound runs keep fixed inputs on the host.
        if self.device.is_some() && self.bound.is_none() {
            return None;
        }
        if let Some(b) = &mut self.bound {
            b.fixed_changed(name);
        }
        floats_mut(self.fixed.get_mut(name)?.own_mut()?, shape)
    }

    /// [`Model::fixed_mut`] for every input `wanted` names, at once: disjoint buffers, to be
    /// written by several threads. Inputs not held on the CPU with the wanted shape are left out.
    pub fn fixed_mut_many<'a>(
        &'a mut self,
        wanted: &std::collections::HashMap<&str, &[usize]>,
    ) -> Vec<(&'a str, FloatsMut<'a>)> {
        if self.device.is_some() && self.bound.is_none() {
            return Vec::new();
        }
        if let Some(b) = &mut self.bound {
            for name in wanted.keys().filter(|n| self.fixed.contains_key(**n)) {
                b.fixed_changed(name);
            }
        }
        self.fixed
            .iter_mut()
            .filter_map(|(name, v)| {
                let shape = wanted.get(name.as_str())?;
                Some((name.as_str(), floats_mut(v.own_mut()?, shape)?))
            })
            .collect()
    }

    /// Moves the fixed inputs among `names` that bound runs would copy from the host into each
    /// set's buffers to the device instead, where every set binds them by reference: values
    /// kept across LoRA switches ([`crate::lora::factors`]) then never cross the bus again.
    /// Nothing to do on the CPU, or without bound runs (fixed inputs go to the device when
    /// set). Not yet run on a GPU.
    pub fn fixed_to_device(&mut self, names: &[String]) -> Result<()> {
        let (Some(id), Some(b)) = (self.device, &mut self.bound) else {
            return Ok(());
        };
        for name in names {
            // A view into a packed buffer stays where the buffer is (and `to` never returns
            // on a view: `packed::Placed::owned`).
            let Some(v @ Held::Own(_)) = self.fixed.get(name) else {
                continue;
            };
            let on_device = v
                .view()
                .downcast::<ort::value::DynTensorValueType>()
                .map_err(ort_err(format!("{}: input `{name}`", self.path.display())))?;
            if b.reads_on_host(name) || !on_device.memory_info().is_cpu_accessible() {
                continue;
            }
            let moved = on_device
                .to(ort::memory::AllocationDevice::CUDA, id)
                .map_err(ort_err(format!("{}: input `{name}`", self.path.display())))?
                .into_dyn();
            b.fixed_changed(name);
            self.fixed.insert(name.clone(), Held::Own(moved));
        }
        Ok(())
    }

    /// Runs the model. Every graph input must be given (here or as a fixed input); all outputs
    /// are returned. Inputs are passed to ONNX Runtime by reference, not copied.
    pub fn run(&mut self, inputs: &BTreeMap<String, Tensor>) -> Result<BTreeMap<String, Tensor>> {
        self.run_with(inputs, &[])
    }

    /// [`Model::run`] with more f32 inputs borrowed for this call only, as `(name, shape, data)`:
    /// how the `bound` LoRA strategy passes its live weights without a second copy.
    pub fn run_with(
        &mut self,
        inputs: &BTreeMap<String, Tensor>,
        borrowed: &[(&str, &[usize], &[f32])],
    ) -> Result<BTreeMap<String, Tensor>> {
        let mut none = Carry::default();
        self.run_core(inputs, borrowed, &mut none, &[], None)
    }

    /// Runs one step of a loop whose outputs feed its next step (a VAE's frame-batch caches):
    /// each `(input, output)` of `links` reads the value `carry` holds (or `inputs` when it
    /// holds none yet), and afterwards `carry` holds that output — kept as ONNX Runtime wrote
    /// it, never copied out and back. Returns only the `fetch` outputs; with `carry_on` false
    /// (the last step) the linked outputs are not even returned.
    pub fn run_carrying(
        &mut self,
        inputs: &BTreeMap<String, Tensor>,
        carry: &mut Carry,
        links: &[(String, String)],
        fetch: &[&str],
        carry_on: bool,
    ) -> Result<BTreeMap<String, Tensor>> {
        let links = if carry_on { links } else { &[] };
        let mut wanted: Vec<&str> = fetch.to_vec();
        wanted.extend(links.iter().map(|(_, o)| o.as_str()));
        self.run_core(inputs, &[], carry, links, Some(&wanted))
    }

    /// Whether this session runs through bound buffers ([`SessionOptions::bound_runs`], or the
    /// engine's CUDA graphs).
    pub fn bound_runs(&self) -> bool {
        self.bound.is_some()
    }

    /// A loop's first carried values, allocated where its later ones will be
    /// ([`SessionOptions::carry_in_session_memory`]) and left unwritten: for inputs the graph
    /// reads only after a switch has discarded them (the VAE's `cache_in.*` on the first
    /// batch, behind `first_batch`'s `Where`). On a GPU this spares copying a first batch of
    /// host zeros to the device (1.4 GB at CogVideoX's 480×720). With bound runs nothing is
    /// allocated: the bound buffers are left as they are. `None` where carried values live on
    /// the host: the caller feeds its own.
    pub fn unwritten_carry(&self, shapes: &[(String, Vec<usize>)]) -> Result<Option<Carry>> {
        let mut carry = Carry::default();
        if self.bound.is_some() {
            for (name, shape) in shapes {
                let dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
                carry
                    .unwritten
                    .insert(name.clone(), (self.input_type(name)?, dims));
            }
            return Ok(Some(carry));
        }
        let Some(alloc) = &self.carry_alloc else {
            return Ok(None);
        };
        let ctx = self.path.display().to_string();
        for (name, shape) in shapes {
            let dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
            let v = ort::value::DynTensor::new(alloc, self.input_type(name)?, dims)
                .map_err(ort_err(format!("{ctx}: input `{name}`")))?;
            carry.values.insert(name.clone(), v.into_dyn());
        }
        Ok(Some(carry))
    }

    /// Zeros for the inputs `shapes`, each in its declared element type: a loop's first
    /// carried values where they live on the host (a GPU engine's lowered VAE declares its
    /// caches in the engine's precision).
    pub fn zero_inputs(
        &self,
        shapes: Vec<(String, Vec<usize>)>,
    ) -> Result<BTreeMap<String, Tensor>> {
        use ort::value::TensorElementType as E;
        shapes
            .into_iter()
            .map(|(name, shape)| {
                let n = shape.iter().product();
                let data = match self.input_type(&name)? {
                    E::Float32 => Data::F32(vec![0.0; n]),
                    E::Float16 => Data::F16(vec![half::f16::ZERO; n]),
                    E::Bfloat16 => Data::BF16(vec![half::bf16::ZERO; n]),
                    other => {
                        return Err(RuntimeError::Graph {
                            graph: self.path.display().to_string(),
                            message: format!("carried input `{name}` is {other:?}, not a float"),
                        })
                    }
                };
                Ok((name, Tensor { shape, data }))
            })
            .collect()
    }

    /// `t` in the float type the graph declares for input `name` (an f32 tensor for a bf16 or
    /// f16 input rounded to nearest, as [`Tensor::floats`]); anything else as it is.
    fn as_declared(&self, name: &str, t: Tensor) -> Tensor {
        let want = self.declared_float(name);
        if want == v2l_graphs::DType::F32 {
            return t;
        }
        match t.data {
            Data::F32(v) => Tensor::floats(t.shape, v, want),
            data => Tensor {
                shape: t.shape,
                data,
            },
        }
    }

    /// The float type the graph declares for input `name` (bf16, f16, else f32): what
    /// [`Model::set_fixed_inputs`] rounds a value to, so a caller can make it so at once.
    pub fn declared_float(&self, name: &str) -> v2l_graphs::DType {
        use ort::value::TensorElementType as E;
        match self.input_type(name) {
            Ok(E::Bfloat16) => v2l_graphs::DType::BF16,
            Ok(E::Float16) => v2l_graphs::DType::F16,
            _ => v2l_graphs::DType::F32,
        }
    }

    /// The element type the graph declares for input `name`.
    fn input_type(&self, name: &str) -> Result<ort::value::TensorElementType> {
        self.session
            .inputs()
            .iter()
            .find(|i| i.name() == name)
            .and_then(|i| i.dtype().tensor_type())
            .ok_or_else(|| RuntimeError::Graph {
                graph: self.path.display().to_string(),
                message: format!("has no tensor input `{name}` to carry"),
            })
    }

    fn run_core(
        &mut self,
        inputs: &BTreeMap<String, Tensor>,
        borrowed: &[(&str, &[usize], &[f32])],
        carry: &mut Carry,
        links: &[(String, String)],
        wanted: Option<&[&str]>,
    ) -> Result<BTreeMap<String, Tensor>> {
        use inputs::Source;
        let ctx = self.path.display().to_string();
        let sources = inputs::sources(
            &self.inputs,
            &self.fixed,
            inputs,
            borrowed,
            &carry.values,
            carry,
        )
        .map_err(|name| RuntimeError::Graph {
            graph: ctx.clone(),
            message: format!("input `{name}` was not given"),
        })?;
        if let Some(bound) = self.bound.as_mut() {
            let linked: Vec<&str> = links.iter().map(|(_, o)| o.as_str()).collect();
            let fetch: Vec<String> = match wanted {
                Some(names) => names.iter().map(|n| n.to_string()).collect(),
                None => self.outputs.clone(),
            }
            .into_iter()
            .filter(|n| !linked.contains(&n.as_str()))
            .collect();
            let result = bound.run(
                &mut self.session,
                &ctx,
                sources,
                &fetch,
                links,
                &mut carry.bound,
            )?;
            carry.unwritten.clear();
            return Ok(result);
        }
        let mut values: Vec<(String, ort::session::SessionInputValue<'_>)> =
            Vec::with_capacity(sources.len());
        for (name, source) in sources {
            let value = match source {
                Source::Carried(v) => v.into(),
                Source::Fixed(v) => (&**v).into(),
                Source::Host(t) => view(t)
                    .map_err(ort_err(format!("{ctx}: input `{name}`")))?
                    .into(),
                Source::Borrowed(shape, data) => {
                    let s: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
                    TensorRef::from_array_view((s, data))
                        .map_err(ort_err(format!("{ctx}: input `{name}`")))?
                        .into_dyn()
                        .into()
                }
                // Only bound runs leave carried values in their buffers or unwritten.
                Source::Output(..) | Source::Unwritten(..) => {
                    return Err(RuntimeError::Graph {
                        graph: ctx,
                        message: format!("input `{name}` was carried by a bound run"),
                    })
                }
            };
            values.push((name, value));
        }
        let options = match wanted {
            Some(names) => {
                let mut select = ort::session::OutputSelector::no_default();
                for n in names {
                    select = select.with(*n);
                }
                // Carried outputs written straight into memory of the session's device: on a
                // GPU the caches stay there from batch to batch (ONNX Runtime would otherwise
                // return each output in host memory and copy it back for the next batch).
                if let Some(alloc) = &self.carry_alloc {
                    for (input, output) in links {
                        let (ty, shape) = match carry.values.get(input) {
                            Some(v) => (
                                v.dtype().tensor_type(),
                                v.dtype().tensor_shape().map(|s| s.to_vec()),
                            ),
                            None => match inputs.get(input) {
                                Some(t) => (
                                    ort_element_type(t),
                                    Some(t.shape.iter().map(|&d| d as i64).collect()),
                                ),
                                None => (None, None),
                            },
                        };
                        if let (Some(ty), Some(shape)) = (ty, shape) {
                            let v = ort::value::DynTensor::new(alloc, ty, shape)
                                .map_err(ort_err(format!("{ctx}: output `{output}`")))?;
                            select = select.preallocate(output.as_str(), v);
                        }
                    }
                }
                Some(
                    ort::session::RunOptions::new()
                        .map_err(ort_err(&ctx))?
                        .with_outputs(select),
                )
            }
            None => None,
        };
        // Run options on every run, so an interrupt can reach it.
        let plain;
        let flight;
        let mut outs = match &options {
            Some(o) => {
                flight = interrupt::InFlight::start(ort::AsPointer::ptr(o))?;
                self.session.run_with_options(values, o)
            }
            None => {
                plain = ort::session::RunOptions::new().map_err(ort_err(&ctx))?;
                flight = interrupt::InFlight::start(ort::AsPointer::ptr(&plain))?;
                self.session.run_with_options(values, &plain)
            }
        }
        .map_err(|e| flight.outcome(ort_err(&ctx)(e)))?;
        let mut next = BTreeMap::new();
        for (input, output) in links {
            let v =
                (outs.remove(output)).ok_or_else(|| RuntimeError::missing_output(&ctx, output))?;
            next.insert(input.clone(), v);
        }
        let mut result = BTreeMap::new();
        for (name, v) in outs.iter() {
            result.insert(
                name.to_string(),
                from_ort(&v).map_err(ort_err(format!("{ctx}: output `{name}`")))?,
            );
        }
        drop(outs);
        carry.values = next;
        Ok(result)
    }
}

/// A profile file prefix in `dir` no other session of this process shares: ONNX Runtime adds
/// only the time to the second, so two sessions built in one second would write one file.
fn profile_prefix(dir: &Path, graph: &Path) -> PathBuf {
    static SESSIONS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = SESSIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let stem = graph
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "graph".into());
    dir.join(format!("{stem}.v2l{n}"))
}

/// A GPU session keeps every node on the GPU provider. ONNX Runtime itself refuses a CPU node
/// (`session.disable_cpu_ep_fallback`) where it can: in a graph without `Shape`/`Size`, whose
/// shape arithmetic it keeps on the CPU on purpose. In every graph, a node that v2l's copy of
/// ONNX Runtime's CUDA kernel table ([`v2l_graphs::placement`]) has no kernel for is an error
/// naming it, before the session is built. `V2L_ALLOW_CPU_FALLBACK=1` lets such a graph load
/// (for a newer ONNX Runtime whose table has kernels v2l's copy lacks). Also returns whether
/// TF32 would change any value of the graph ([`v2l_graphs::placement::Placement::tf32_matters`]).
fn gpu_placement(
    b: ort::session::builder::SessionBuilder,
    source: GraphSource<'_>,
    ctx: &str,
) -> Result<(ort::session::builder::SessionBuilder, bool)> {
    use prost::Message;
    use v2l_graphs::placement::{cuda_placement, KernelTable};
    let model = match source {
        GraphSource::File(p) => v2l_graphs::read_model(p).map_err(|e| RuntimeError::io(p, e))?,
        GraphSource::Bytes { bytes, .. } => {
            v2l_graphs::proto::ModelProto::decode(bytes).map_err(|e| RuntimeError::Ort {
                context: ctx.into(),
                message: e.to_string(),
            })?
        }
    };
    let placement = cuda_placement(&model, KernelTable::ort_cuda());
    let allowed = std::env::var("V2L_ALLOW_CPU_FALLBACK").is_ok_and(|v| v == "1");
    if !placement.no_kernel.is_empty() && !allowed {
        let n = placement.no_kernel.len();
        let shown: Vec<&str> = placement
            .no_kernel
            .iter()
            .take(5)
            .map(String::as_str)
            .collect();
        return Err(RuntimeError::Graph {
            graph: ctx.into(),
            message: format!(
                "{n} node(s) have no kernel in ONNX Runtime's CUDA provider and would run on the CPU: {}{} (V2L_ALLOW_CPU_FALLBACK=1 loads it anyway)",
                shown.join("; "),
                if n > shown.len() { "; …" } else { "" }
            ),
        });
    }
    if placement.needs_cpu_fallback || allowed {
        return Ok((b, placement.tf32_matters));
    }
    let b = b
        .with_config_entry("session.disable_cpu_ep_fallback", "1")
        .map_err(|e| RuntimeError::Ort {
            context: ctx.into(),
            message: e.to_string(),
        })?;
    Ok((b, placement.tf32_matters))
}

/// Registers the process's shared arena for the sessions of `opts` (once); `false`, with a
/// note, where ONNX Runtime refuses it, and without one under `V2L_SHARED_ARENA=0` (to compare
/// on a GPU): those sessions keep arenas of their own.
fn share_arena(
    opts: &crate::backend::BackendOptions,
    this: &crate::backend::BackendOptions,
) -> bool {
    if std::env::var("V2L_SHARED_ARENA").is_ok_and(|v| v == "0") {
        return false;
    }
    let device = (opts.backend != crate::backend::Backend::Cpu).then_some(opts.device_id);
    let extend = this.cuda.get("arena_extend_strategy").map(String::as_str);
    match arena::register(device, extend) {
        Ok(()) => true,
        Err(e) => {
            static SAID: std::sync::Once = std::sync::Once::new();
            SAID.call_once(|| eprintln!("note: each session keeps an arena of its own: {e}"));
            false
        }
    }
}

/// Handing values from one session to another on the device ([`DeviceValues`]).
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
            // Only a value of its own can be written again (a view shares its buffer).
            let v = match reuse.0.remove(&name) {
                Some(Held::Own(v)) if same(&v) => v,
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
        let flight = interrupt::InFlight::start(ort::AsPointer::ptr(&options))?;
        let mut outs = self
            .session
            .run_with_options(values, &options)
            .map_err(|e| flight.outcome(ort_err(&ctx)(e)))?;
        let mut made = BTreeMap::new();
        for name in outputs {
            let v = outs
                .remove(name.as_str())
                .ok_or_else(|| RuntimeError::missing_output(&ctx, &name))?;
            made.insert(name, Held::Own(v));
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

/// The data of a float tensor value in its own type, when its shape is `shape` and it lives in
/// host memory.
fn floats_mut<'a>(v: &'a mut DynValue, shape: &[usize]) -> Option<FloatsMut<'a>> {
    let same = |have: &[i64]| {
        have.len() == shape.len()
            && have
                .iter()
                .zip(shape)
                .all(|(&a, &b)| usize::try_from(a) == Ok(b))
    };
    use ort::value::TensorElementType as E;
    match v.dtype().tensor_type()? {
        E::Float32 => {
            let (have, d) = v.try_extract_tensor_mut::<f32>().ok()?;
            same(have).then_some(FloatsMut::F32(d))
        }
        E::Bfloat16 => {
            let (have, d) = v.try_extract_tensor_mut::<half::bf16>().ok()?;
            same(have).then_some(FloatsMut::BF16(d))
        }
        E::Float16 => {
            let (have, d) = v.try_extract_tensor_mut::<half::f16>().ok()?;
            same(have).then_some(FloatsMut::F16(d))
        }
        _ => None,
    }
}

/// ONNX Runtime opens the graph itself: a FIFO or a device in its place would block or stream
/// forever, so what it is gets checked first (a compiled engine's parts are also hashed through
/// the same opener).
fn check_model_file(path: &Path) -> Result<()> {
    v2l_contracts::input::open_regular(path)
        .map(drop)
        .map_err(|source| RuntimeError::Io {
            path: path.into(),
            source: match source.kind() {
                std::io::ErrorKind::NotFound => {
                    std::io::Error::new(std::io::ErrorKind::NotFound, "no such model file")
                }
                _ => source,
            },
        })
}

/// Where a session's graph comes from.
#[derive(Clone, Copy)]
enum GraphSource<'a> {
    File(&'a Path),
    /// An ONNX model in memory, its external data beside the model file `beside`.
    Bytes {
        bytes: &'a [u8],
        beside: &'a Path,
        part: &'a str,
    },
}

impl GraphSource<'_> {
    /// The model file: the graph's own, or the one its external data sits beside.
    fn path(&self) -> &Path {
        match self {
            GraphSource::File(p) => p,
            GraphSource::Bytes { beside, .. } => beside,
        }
    }
}

/// Whether a session of this process has been built with the `ai.v2l` domain.
///
/// ONNX Runtime enters a custom operator domain in ONNX's process-wide domain map when a session
/// is built, by a check then an insert with no lock: two first builds at once on different threads
/// can both insert, and one fails ("the domain is already exist"; 15 rounds of 300 in
/// `tests/session_race.rs`). So builds wait on each other until one has succeeded; after that the
/// domain is in the map and builds run in parallel.
static DOMAIN_ENTERED: std::sync::Mutex<bool> = std::sync::Mutex::new(false);

/// Builds the session, one at a time until the `ai.v2l` domain is in ONNX's map.
fn commit(
    mut b: ort::session::builder::SessionBuilder,
    graph: GraphSource,
) -> ort::Result<Session> {
    let commit_once = |b: &mut ort::session::builder::SessionBuilder| match graph {
        GraphSource::File(path) => b.commit_from_file(path),
        GraphSource::Bytes { bytes, .. } => b.commit_from_memory(bytes),
    };
    // The flag is a plain bool, so a poisoned lock still holds a valid value.
    let mut entered = DOMAIN_ENTERED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if *entered {
        drop(entered);
        return commit_once(&mut b);
    }
    let session = commit_once(&mut b)?;
    *entered = true;
    Ok(session)
}

/// Weight files of the graph at `path` worth paging during its build: those of
/// [`PAGED_BYTES`] or more, as the kernel names them in `/proc/self/maps` (canonical paths).
fn large_weight_files(path: &Path) -> Vec<PathBuf> {
    v2l_graphs::external_data_files(path)
        .unwrap_or_default()
        .into_iter()
        .filter(|f| std::fs::metadata(f).is_ok_and(|m| m.len() >= PAGED_BYTES))
        .filter_map(|f| f.canonicalize().ok())
        .collect()
}

/// Below this, a weight file is not worth a pager thread.
const PAGED_BYTES: u64 = 256 << 20;
