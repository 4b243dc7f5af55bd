//! Building engine bundles: what `v2l-compile` does to an export directory.
//!
//! [`compile_with`] runs named steps in order: check the precision against the backend, read
//! the export's manifest and hash the DiT's LoRA targets, copy or link every part into a
//! staging directory, rewrite the graphs for the backend (attention fusion, feed-forward
//! chunking, VAE cache ties), lower the DiT's precision (and calibrate static int8), check
//! TensorRT graphs, measure the accuracy below fp32, then write `bundle.json` and rename the
//! staging directory into place. The record itself, and its verification on load, belong to
//! the runtime (`v2l_runtime::bundle`).

use std::path::{Path, PathBuf};

use crate::error::{CompileError, Result};
use v2l_contracts::bundle::{DitVariant, DitVariants, VaeGraphs, VariantGraph};
use v2l_contracts::dtype::Stored;
use v2l_contracts::manifest::DitEntry;
use v2l_contracts::Manifest;
use v2l_graphs::passes::WeightQuant;
use v2l_graphs::proto::ModelProto;
use v2l_runtime::backend::{Backend, PartsHasher, Precision};
use v2l_runtime::bundle::{
    file_entry, io, Attention, Bundle, Int8Scheme, LoraTarget, FILE_NAME, FORMAT_VERSION,
};
use v2l_runtime::error::RuntimeError;
use v2l_runtime::lora::strategy::Strategy;

/// Whether the backend's runtime gets `com.microsoft.MultiHeadAttention` (ONNX Runtime CPU and
/// CUDA kernels that never materialise the score matrix). TensorRT keeps the plain
/// `MatMul → Softmax → MatMul` pattern, which its builder fuses into its own attention kernel.
pub fn fuses_attention(backend: Backend) -> bool {
    runs_on_ort(backend)
}

/// Whether ONNX Runtime's own CPU/CUDA kernels run the graphs (not TensorRT's builder).
fn runs_on_ort(backend: Backend) -> bool {
    matches!(backend, Backend::Cpu | Backend::Cuda)
}

/// Ties a VAE graph's frame-batch cache outputs to the convs that read the same tensors
/// (`passes::carried_outputs_first`): ONNX Runtime's default order otherwise computes them,
/// and keeps every padded conv input alive, until the end of the decoder. Rewrites `path` (a
/// link to the export's file is replaced, never written through).
fn carried_outputs_first(path: &Path) -> Result<()> {
    let mut m = v2l_graphs::read_model(path).map_err(io(path))?;
    if v2l_graphs::passes::carried_outputs_first(&mut m) > 0 {
        v2l_graphs::write_model(path, &m).map_err(|source| CompileError::GraphWrite {
            path: path.into(),
            source,
        })?;
    }
    Ok(())
}

/// The graph as the backend runs it best: on the CPU each feed-forward runs in token slices
/// (`passes::chunk_feed_forward`), for f32 and integer-quantised linears (not the fp16/bf16
/// or Q/DQ forms, which were not measured). Applied to written copies only: the other passes
/// read `Gemm`s that a chunked graph hides in `Scan` bodies.
fn ff_chunked(
    backend: Backend,
    model: &v2l_graphs::proto::ModelProto,
) -> std::borrow::Cow<'_, v2l_graphs::proto::ModelProto> {
    if backend != Backend::Cpu {
        return std::borrow::Cow::Borrowed(model);
    }
    let mut m = model.clone();
    v2l_graphs::passes::chunk_feed_forward(&mut m, v2l_graphs::passes::FF_CHUNKS);
    std::borrow::Cow::Owned(m)
}

/// Files an export directory's manifest refers to ([`Manifest::parts`]): graphs with their
/// external data, side files, and the files of a part that is a directory (the tokenizer).
fn manifest_files(dir: &Path, m: &Manifest) -> Vec<String> {
    let mut names = vec![v2l_contracts::manifest::FILE_NAME.to_string()];
    for (_, part) in m.parts() {
        let p = dir.join(part);
        if p.is_dir() {
            if let Ok(entries) = std::fs::read_dir(&p) {
                let mut files: Vec<String> = entries
                    .filter_map(|e| e.ok())
                    .filter(|e| e.path().is_file())
                    .map(|e| format!("{part}/{}", e.file_name().to_string_lossy()))
                    .collect();
                files.sort();
                names.extend(files);
            }
            continue;
        }
        names.push(part.to_string());
        let data = format!("{part}.data");
        if dir.join(&data).exists() {
            names.push(data);
        }
    }
    names
}

/// Compiles the export directory `src` (or the directory of a model file inside one) into an
/// engine bundle at `out`, written under a temporary name and renamed when complete.
pub fn compile(src: &Path, out: &Path, backend: Backend, precision: Precision) -> Result<Bundle> {
    compile_with(src, out, backend, precision, &Options::default())
}

/// What [`compile_with`] takes beyond the backend and precision; every field has a default.
#[derive(Clone, Copy, Debug, Default)]
pub struct Options<'a> {
    /// int8 only: calibrate activation ranges for static int8 (Q/DQ).
    pub calibration: Option<&'a crate::calibrate::Calibration>,
    /// The largest rank of an `unfused` LoRA, padded to where a session needs one shape
    /// ([`lora_max_rank`] when `None`).
    pub max_rank: Option<usize>,
    /// The DiT's attention kernel ([`default_attention`] when `None`).
    pub attention: Option<Attention>,
    /// int8 CPU engines: how the integer GEMMs stay exact. `None`: this CPU's native scheme
    /// ([`Isa::native_int8_scheme`](v2l_runtime::cpu::Isa::native_int8_scheme): s8 weights
    /// where VNNI makes them exact, u8 elsewhere); [`Int8Scheme::U8U8`] runs on every CPU.
    pub int8_scheme: Option<Int8Scheme>,
    /// Whether the VAE's convolutions get v2l's bf16 operator ([`default_vae_bf16`] when
    /// `None`): graphs written beside the export's, which CPUs without AVX512-BF16 load.
    pub vae_bf16: Option<bool>,
    /// int8 CPU engines with s8 weights: keep ONNX Runtime's `DynamicQuantizeMatMul` instead
    /// of v2l's `ai.v2l.QMatMul` (the default, with v2l's attention).
    pub ort_int8_linears: bool,
    /// CUDA/TensorRT engines: let fp32 convolutions and matrix products run in TF32
    /// (recorded in the bundle; off by default, so fp32 means fp32).
    pub tf32: bool,
    /// CUDA/TensorRT engines: CUDA provider settings recorded in the bundle
    /// ([`v2l_runtime::backend::check_cuda_option`] says which).
    pub cuda_options: &'a [(String, String)],
    /// CUDA engines: keep the exported RoPE instead of one `RotaryEmbedding` kernel (to
    /// measure one against the other).
    pub unfused_rope: bool,
    /// CUDA engines below fp32: keep the exported GroupNorm statistics in the lowered VAE
    /// instead of `passes::group_norm_row_stats` (to measure one against the other).
    pub exported_group_norm: bool,
    /// CUDA engines below fp32: the lowered decoder's applies over upsampled spatial maps
    /// folded in f32, as fp32 engines have them, instead of on the rows' normalized output in
    /// the engine's type ([`v2l_graphs::passes::GroupNormApply`]; to measure one against the
    /// other).
    pub folded_norms: bool,
    /// CUDA engines below fp32: the DiT's GELUs in the engine's type
    /// ([`v2l_graphs::passes::Lowering::low_gelu`]; to measure against the f32 ones).
    pub low_gelu: bool,
    /// CUDA engines at bf16: keep the DiT's attention in bf16 instead of fp16
    /// ([`v2l_graphs::passes::Lowering::half_attention`]; to measure one against the other).
    pub bf16_attention: bool,
    /// CUDA engines at bf16: keep the DiT's GELUs in f32 instead of fp16
    /// ([`v2l_graphs::passes::Lowering::half_gelu`]; to measure one against the other).
    pub f32_gelu: bool,
}

/// v2l's bf16 attention for CPU engines below fp32 (their step is otherwise ~40 % f32
/// attention); ONNX Runtime's own everywhere else, so fp32 engines stay exact.
pub fn default_attention(backend: Backend, precision: Precision) -> Attention {
    match (backend, precision) {
        (Backend::Cpu, Precision::Fp32) | (Backend::Cuda | Backend::TensorRt, _) => Attention::Ort,
        (Backend::Cpu, _) => Attention::Bf16,
    }
}

/// v2l's bf16 convolution in the VAE for CPU engines below fp32 (ONNX Runtime's f32 `Conv`
/// is two thirds of a decode, at half the rate of bf16); exact f32 graphs everywhere else.
pub fn default_vae_bf16(backend: Backend, precision: Precision) -> bool {
    backend == Backend::Cpu && precision != Precision::Fp32
}

/// [`compile`], and for int8 with a calibration: static int8 through Q/DQ
/// (`crate::calibrate`), the form TensorRT builds (and ONNX Runtime's CPU provider runs).
///
/// The steps, in order; each is one function below.
pub fn compile_with(
    src: &Path,
    out: &Path,
    backend: Backend,
    precision: Precision,
    opts: &Options<'_>,
) -> Result<Bundle> {
    check_precision(backend, precision, opts.calibration.is_some())?;
    let attention = opts
        .attention
        .unwrap_or_else(|| default_attention(backend, precision));
    if attention != Attention::Ort && default_attention(backend, precision) != Attention::Bf16 {
        return Err(CompileError::Invalid {
            what: format!("--attention {}", attention.name()),
            message: format!(
                "v2l's attention operator is for cpu engines below fp32 (this is {} {}); fp32 engines keep ONNX Runtime's exact attention",
                backend.name(),
                precision.name()
            ),
        });
    }
    let int8_cpu = backend == Backend::Cpu && precision == Precision::Int8;
    let int8_scheme = match opts.int8_scheme {
        Some(s) => s,
        None if int8_cpu => v2l_runtime::cpu::Isa::detect().native_int8_scheme(),
        None => Int8Scheme::U8U8,
    };
    if int8_scheme != Int8Scheme::U8U8 && !int8_cpu {
        return Err(CompileError::Invalid {
            what: format!("--int8-gemm {}", int8_scheme.name()),
            message: "the int8 GEMM scheme is for cpu int8 engines".into(),
        });
    }
    let mut job = Job::open(src, backend, precision, opts.calibration)?;
    // An unknown transformer class or a channel count no pipeline has is refused before any work.
    if job.manifest.dit.is_some() {
        job.manifest
            .pipeline_kind()
            .map_err(|message| CompileError::BadFile {
                path: job.dir.join(v2l_contracts::manifest::FILE_NAME),
                message,
            })?;
    }
    job.max_rank = lora_max_rank(backend, opts.max_rank, &job.manifest);
    job.attention = attention;
    job.ort_int8_linears = opts.ort_int8_linears;
    if opts.tf32 && backend == Backend::Cpu {
        return Err(CompileError::Invalid {
            what: "--tf32".into(),
            message: "TF32 is a CUDA setting; cpu engines compute fp32 in fp32".into(),
        });
    }
    job.tf32 = opts.tf32;
    if opts.unfused_rope && backend != Backend::Cuda {
        return Err(CompileError::Invalid {
            what: "--unfused-rope".into(),
            message: "only cuda engines fuse the RoPE".into(),
        });
    }
    job.unfused_rope = opts.unfused_rope;
    // Flags that choose between two forms of a cuda engine's graphs.
    let cuda_low =
        backend == Backend::Cuda && matches!(precision, Precision::Fp16 | Precision::Bf16);
    let cuda_float = cuda_low || (backend == Backend::Cuda && precision == Precision::Fp32);
    for (on, flag, why, allowed) in [
        (
            opts.exported_group_norm,
            "--exported-group-norm",
            "at fp32, fp16 or bf16 rewrite the VAE's GroupNorms",
            cuda_float,
        ),
        (
            opts.low_gelu,
            "--low-gelu",
            "at fp16 or bf16 have a GELU to lower",
            cuda_low,
        ),
        (
            opts.folded_norms,
            "--folded-norms",
            "at fp16 or bf16 lower their VAE's GroupNorms",
            cuda_low,
        ),
    ] {
        if on && !allowed {
            return Err(CompileError::Invalid {
                what: flag.into(),
                message: format!("only cuda engines {why}"),
            });
        }
    }
    let cuda_bf16 = backend == Backend::Cuda && precision == Precision::Bf16;
    for (on, flag, what) in [
        (opts.bf16_attention, "--bf16-attention", "attention"),
        (opts.f32_gelu, "--f32-gelu", "GELUs"),
    ] {
        if on && !cuda_bf16 {
            return Err(CompileError::Invalid {
                what: flag.into(),
                message: format!("only cuda engines at bf16 run their {what} in fp16"),
            });
        }
    }
    if opts.folded_norms && opts.exported_group_norm {
        return Err(CompileError::Invalid {
            what: "--folded-norms".into(),
            message: "--exported-group-norm keeps the GroupNorms --folded-norms rewrites".into(),
        });
    }
    if opts.f32_gelu && opts.low_gelu {
        return Err(CompileError::Invalid {
            what: "--f32-gelu".into(),
            message: "--low-gelu and --f32-gelu ask for two types of one GELU".into(),
        });
    }
    job.exported_group_norm = opts.exported_group_norm;
    job.folded_norms = opts.folded_norms;
    job.low_gelu = opts.low_gelu;
    job.half_attention = backend == Backend::Cuda && !opts.bf16_attention;
    job.half_gelu = backend == Backend::Cuda && !opts.f32_gelu;
    if !opts.cuda_options.is_empty() && backend == Backend::Cpu {
        return Err(CompileError::Invalid {
            what: "--cuda-option".into(),
            message: "CUDA provider settings are for cuda and tensorrt engines".into(),
        });
    }
    for (k, v) in opts.cuda_options {
        v2l_runtime::backend::check_cuda_option(k, v).map_err(|message| CompileError::Invalid {
            what: format!("--cuda-option {k}={v}"),
            message,
        })?;
        if k == "enable_cuda_graph" && v == "1" && backend != Backend::Cuda {
            return Err(CompileError::Invalid {
                what: format!("--cuda-option {k}={v}"),
                message: "CUDA graphs are for cuda engines: a tensorrt engine's CUDA provider runs only the nodes TensorRT does not take, so no run can be captured whole".into(),
            });
        }
    }
    job.cuda_options = opts.cuda_options.iter().cloned().collect();
    job.vae_bf16 = opts
        .vae_bf16
        .unwrap_or_else(|| default_vae_bf16(backend, precision));
    if job.vae_bf16 && !default_vae_bf16(backend, precision) {
        return Err(CompileError::Invalid {
            what: "--vae-conv bf16".into(),
            message: format!(
                "v2l's bf16 convolution is for cpu engines below fp32 (this is {} {}); fp32 engines keep ONNX Runtime's exact Conv",
                backend.name(),
                precision.name()
            ),
        });
    }
    job.int8_scheme = int8_scheme;
    // The compile measures the engine it builds, so it runs only where that engine is exact.
    if let Some(message) = v2l_runtime::cpu::check_int8_scheme(
        precision,
        backend,
        job.recorded_int8_scheme(),
        &v2l_runtime::cpu::Isa::detect(),
    )
    .err()
    {
        return Err(CompileError::Invalid {
            what: format!("--int8-gemm {}", int8_scheme.name()),
            message: format!("{message} (v2l-compile measures the engine it builds, here)"),
        });
    }
    v2l_runtime::limits::check_new_output_dir(out)?;
    let (weight_hash, targets) = job.lora_targets()?;
    v2l_contracts::atomic::build_dir(
        out,
        |p, e| CompileError::from(RuntimeError::io(p, e)),
        |tmp| {
            let parts = job.link_parts(tmp)?;
            job.tie_vae_caches(tmp)?;
            let mut dit = DitBuild::default();
            dit.vae_bf16 = job.vae_bf16_graphs(tmp, &mut dit.files)?;
            job.vae_lowered_graphs(tmp, &mut dit)?;
            if let Some(d) = &job.manifest.dit {
                job.build_dit(d, tmp, &targets, &mut dit)?;
            }
            job.measure_vae(tmp, &mut dit)?;
            job.measure_generation(tmp, &weight_hash, &targets, &mut dit)?;
            job.check_cuda_placement(tmp)?;
            job.write_record(tmp, parts, weight_hash, targets, dit)
        },
    )
}

/// One compile: the export it reads and what it builds.
struct Job<'a> {
    /// The export directory.
    dir: PathBuf,
    manifest: Manifest,
    backend: Backend,
    precision: Precision,
    calibration: Option<&'a crate::calibrate::Calibration>,
    /// The rank LoRA factors are padded to on this engine ([`lora_max_rank`]).
    max_rank: Option<usize>,
    attention: Attention,
    int8_scheme: Int8Scheme,
    /// The VAE gets graphs on v2l's bf16 convolution.
    vae_bf16: bool,
    /// s8 dynamic int8 linears stay on ONNX Runtime's operator.
    ort_int8_linears: bool,
    /// fp32 products may run in TF32 on the GPU.
    tf32: bool,
    cuda_options: std::collections::BTreeMap<String, String>,
    /// Keep the exported RoPE on a CUDA engine.
    unfused_rope: bool,
    /// Keep the exported GroupNorm statistics in a GPU engine's lowered VAE.
    exported_group_norm: bool,
    /// The lowered decoder's spatial norms applied folded, in f32.
    folded_norms: bool,
    /// The DiT's GELUs in the engine's type (CUDA engines below fp32).
    low_gelu: bool,
    /// The DiT's attention in fp16 (CUDA engines at bf16).
    half_attention: bool,
    /// The DiT's GELUs in fp16 (CUDA engines at bf16).
    half_gelu: bool,
}

/// What the DiT steps add to the bundle.
#[derive(Default)]
struct DitBuild {
    /// Variant (`bound`, `unfused`, the precision, their attention twins) → graph file.
    variants: DitVariants,
    /// Files the variants wrote (graphs and weight files), for the record's hashes.
    files: Vec<String>,
    accuracy: Vec<crate::accuracy::StageAccuracy>,
    calibration: Option<crate::calibrate::CalibrationRecord>,
    /// A typed fp16/bf16 graph's CPU form, written for the accuracy checks only.
    emulated: Option<PathBuf>,
    /// The VAE's graphs on v2l's bf16 convolution, when written.
    vae_bf16: Option<VaeGraphs>,
    /// GPU engines below fp32: the VAE's graphs in the engine's precision, and their CPU
    /// forms, written for the accuracy checks only.
    vae_lowered: Option<VaeGraphs>,
    vae_emulated: Option<VaeGraphs>,
    /// Whether the DiT's graphs call `ai.v2l.QMatMul`.
    v2l_int8_gemm: bool,
}

impl<'a> Job<'a> {
    /// Step 1: the export directory `src` (or the directory of a model file inside one) and
    /// its manifest.
    fn open(
        src: &Path,
        backend: Backend,
        precision: Precision,
        calibration: Option<&'a crate::calibrate::Calibration>,
    ) -> Result<Job<'a>> {
        let dir = if src.is_file() {
            src.parent().unwrap_or(Path::new(".")).to_path_buf()
        } else {
            src.to_path_buf()
        };
        let manifest = Manifest::read(&dir).map_err(|e| CompileError::BadFile {
            path: dir.clone(),
            message: format!("{e} (v2l-compile takes a directory written by v2l-export)"),
        })?;
        Ok(Job {
            dir,
            manifest,
            backend,
            precision,
            calibration,
            max_rank: None,
            attention: Attention::Ort,
            vae_bf16: false,
            int8_scheme: Int8Scheme::U8U8,
            ort_int8_linears: false,
            tf32: false,
            cuda_options: Default::default(),
            unfused_rope: false,
            exported_group_norm: false,
            folded_norms: false,
            low_gelu: false,
            half_attention: false,
            half_gelu: false,
        })
    }

    /// The int8 scheme this engine's record will carry: int8 CPU engines only.
    fn recorded_int8_scheme(&self) -> Option<Int8Scheme> {
        (self.precision == Precision::Int8 && self.backend == Backend::Cpu)
            .then_some(self.int8_scheme)
    }

    /// Step 2: the hash of the DiT's LoRA-targetable base weights and the target table: each
    /// target's shape, and how this engine stores it.
    fn lora_targets(&self) -> Result<(String, Vec<LoraTarget>)> {
        let Some(d) = &self.manifest.dit else {
            return Ok((PartsHasher::default().finish(), Vec::new()));
        };
        let names = target_names(d);
        let model = self.dir.join(&d.file);
        // What the model keeps in f32 below f32 (Wan's `_keep_in_fp32_modules`): those
        // targets stay f32 in fp16/bf16 engines, as the lowering leaves them.
        let keep = v2l_graphs::passes::keep_in_fp32_modules(
            &v2l_graphs::read_model(&model).map_err(io(&model))?,
        );
        let mut hash = PartsHasher::default();
        let mut targets = Vec::with_capacity(names.len());
        let mut shapes = d.lora_targets.iter();
        v2l_graphs::for_each_initializer(&model, &names, &mut |name, dtype, _, bytes| {
            hash.part(&bytes);
            if let Some(t) = shapes.next() {
                targets.push(LoraTarget {
                    initializer: name.to_string(),
                    shape: [t.out_features, t.in_features],
                    dtype: Stored::Float(dtype),
                });
            }
            Ok(())
        })
        .map_err(io(&model))?;
        if let Some(t) = targets
            .iter()
            .find(|t| t.dtype != Stored::Float(v2l_graphs::DType::F32))
        {
            if self.precision == Precision::Fp32 {
                return Err(CompileError::Invalid {
                    what: self.dir.display().to_string(),
                    message: format!(
                        "stores its DiT weights as {} (`{}`); an fp32 engine takes an export with f32 weights (`v2l-export dit --weight-dtype f32`), or compile this one with --precision int8",
                        t.dtype.name(), t.initializer
                    ),
                });
            }
        }
        // How the engine stores each target: int8/int4 for the token-wise linears of an
        // integer engine, every linear outside `keep` in the low type of an fp16/bf16 one.
        for t in targets.iter_mut() {
            let module = t
                .initializer
                .strip_suffix(".weight")
                .unwrap_or(&t.initializer);
            if v2l_graphs::passes::keeps_f32(&keep, module) {
                continue;
            }
            t.dtype = match (
                self.precision,
                v2l_runtime::backend::weight_quant(self.precision, self.int8_scheme),
            ) {
                (_, Some(_)) if self.calibration.is_some() => {
                    if quantised_as(&t.initializer, WeightQuant::Int8) != Some(WeightQuant::Int8) {
                        continue;
                    }
                    Stored::Qdq
                }
                (_, Some(q)) => match quantised_as(&t.initializer, q) {
                    Some(q) => Stored::Quantized(q),
                    None => continue,
                },
                (Precision::Fp16, _) => Stored::Float(v2l_graphs::DType::F16),
                (Precision::Bf16, _) => Stored::Float(v2l_graphs::DType::BF16),
                _ => continue,
            };
        }
        Ok((hash.finish(), targets))
    }

    /// Step 3: every part of the export into the staging directory `tmp`. A hard link is
    /// instant for 20 GB models; copy across file systems. Rewritten graphs replace their link
    /// (write to a temporary name, rename), so the export itself is never modified. Returns
    /// the parts' names.
    fn link_parts(&self, tmp: &Path) -> Result<Vec<String>> {
        let names = manifest_files(&self.dir, &self.manifest);
        for f in &names {
            let (from, to) = (self.dir.join(f), tmp.join(f));
            if let Some(parent) = to.parent() {
                std::fs::create_dir_all(parent).map_err(io(parent))?;
            }
            if std::fs::hard_link(&from, &to).is_err() {
                std::fs::copy(&from, &to).map_err(io(&from))?;
            }
        }
        Ok(names)
    }

    /// Step 4: on ONNX Runtime's kernels, the VAE graphs' cache outputs tied to their convs
    /// ([`carried_outputs_first`]).
    fn tie_vae_caches(&self, tmp: &Path) -> Result<()> {
        if let (true, Some(v)) = (runs_on_ort(self.backend), &self.manifest.vae) {
            for f in [&v.encoder, &v.decoder] {
                carried_outputs_first(&tmp.join(f))?;
            }
        }
        Ok(())
    }

    /// Step 4b: the VAE's graphs on v2l's bf16 convolution (`v2l_graphs::passes::v2l_conv`),
    /// written beside the export's as `<graph>_bf16.onnx` and sharing their weight files;
    /// `None` when not asked for, or when no convolution moved. Their names join `files`.
    fn vae_bf16_graphs(&self, tmp: &Path, files: &mut Vec<String>) -> Result<Option<VaeGraphs>> {
        let Some(v) = self.manifest.vae.as_ref().filter(|_| self.vae_bf16) else {
            return Ok(None);
        };
        // Both graphs are read and moved before either is written: no twin without the other.
        let mut moved = Vec::new();
        for f in [&v.encoder, &v.decoder] {
            let src = tmp.join(f);
            let mut m = v2l_graphs::read_model(&src).map_err(io(&src))?;
            if v2l_graphs::passes::v2l_conv(&mut m) == 0 {
                return Ok(None);
            }
            let name = match f.strip_suffix(".onnx") {
                Some(stem) => format!("{stem}_bf16.onnx"),
                None => format!("{f}_bf16.onnx"),
            };
            moved.push((name, m));
        }
        for (name, m) in &moved {
            write_graph(&tmp.join(name), m)?;
        }
        let names: Vec<String> = moved.into_iter().map(|(n, _)| n).collect();
        files.extend(names.iter().cloned());
        let [encoder, decoder] =
            <[String; 2]>::try_from(names).map_err(|_| CompileError::Invalid {
                what: "VAE".into(),
                message: "expected an encoder and a decoder".into(),
            })?;
        Ok(Some(VaeGraphs { encoder, decoder }))
    }

    /// Step 4c (GPU engines at fp16/bf16): the VAE's graphs in the engine's precision, typed
    /// for the GPU (`<graph>_<precision>.onnx`, one weight file each), bf16 moved to opset 22,
    /// where CUDA's `Conv` takes bf16; and their CPU forms (emulated, at the export's opset,
    /// sharing the weight files), for the accuracy checks only.
    fn vae_lowered_graphs(&self, tmp: &Path, dit: &mut DitBuild) -> Result<()> {
        use v2l_graphs::passes::{lower_precision, upgrade_opset, Lowering, WeightFile};
        let dtype = match self.precision {
            Precision::Fp16 => v2l_graphs::DType::F16,
            Precision::Bf16 => v2l_graphs::DType::BF16,
            Precision::Fp32 => return self.vae_cuda_f32_graphs(tmp, dit),
            _ => return Ok(()),
        };
        let Some(v) = self
            .manifest
            .vae
            .as_ref()
            .filter(|_| self.backend != Backend::Cpu)
        else {
            return Ok(());
        };
        let p = self.precision.name();
        let (mut typed, mut emulated) = (Vec::new(), Vec::new());
        for f in [&v.encoder, &v.decoder] {
            let src = tmp.join(f);
            let pass_err = |source| CompileError::GraphPass {
                path: src.clone(),
                source,
            };
            let stem = f.strip_suffix(".onnx").unwrap_or(f);
            let (name, cpu_name) = (
                format!("{stem}_{p}.onnx"),
                format!("{stem}_{p}_emulated.onnx"),
            );
            let data = format!("{name}.data");
            let mut base = v2l_graphs::read_model(&src).map_err(io(&src))?;
            let mut m = base.clone();
            // On CUDA, each GroupNorm's row statistics from one LayerNormalization over the
            // low-type activation. Not on TensorRT: its parser takes a LayerNormalization's
            // first output only, so each would split the engine. Not in the CPU form: ONNX
            // Runtime's CPU kernel sums E[x²] − E[x]² in one f32 pass, which cancels (the
            // CUDA kernel's Welford sums and the exported two-pass ones agree to ~1e-7, far
            // inside bf16's rounding). The lowering reads weights from its source file: the
            // rewritten graph, with the pass's constants, is written for it beside the export's
            // (sharing its weight file) and removed after.
            let rewritten = match self.exported_group_norm || self.backend != Backend::Cuda {
                true => 0,
                false => v2l_graphs::passes::group_norm_row_stats(
                    &mut m,
                    match self.folded_norms {
                        true => v2l_graphs::passes::GroupNormApply::Folded,
                        false => v2l_graphs::passes::GroupNormApply::OnRows,
                    },
                ),
            };
            let typed_src = match rewritten {
                0 => src.clone(),
                _ => {
                    let p = tmp.join(format!("{stem}.row_stats.onnx"));
                    write_graph(&p, &m)?;
                    p
                }
            };
            let done_with = |p: &Path| match p == tmp.join(f) {
                true => Ok(()),
                false => std::fs::remove_file(p).map_err(io(p)),
            };
            // The CPU form stays at the export's opset: ONNX Runtime's CPU provider lacks some
            // opset-21 schemas (`Size`), and its convolutions are f32 anyway.
            if dtype == v2l_graphs::DType::BF16 {
                upgrade_opset(&mut m, 22).map_err(pass_err)?;
            }
            let how = Lowering {
                dtype,
                emulate: false,
                low_caches: true,
                low_factors: false,
                low_gelu: false,
                half_attention: false,
                half_gelu: false,
            };
            let lowered =
                lower_precision(&mut m, &typed_src, WeightFile::Write(&tmp.join(&data)), how)
                    .map_err(pass_err)?;
            done_with(&typed_src)?;
            // A node without a CUDA kernel in the low type at the new opset (none in today's
            // exports; a `Pad`, say, has no bf16 kernel in the provider's table) keeps this
            // graph in f32 rather than split it between the GPU and the CPU.
            if self.backend == Backend::Cuda {
                use v2l_graphs::placement::{cuda_placement, KernelTable};
                let placed = cuda_placement(&m, KernelTable::ort_cuda());
                if let Some(first) = placed.no_kernel.first() {
                    eprintln!(
                        "note: {f} stays f32 on {p}: {} node(s) would have no CUDA kernel in {p}, first {first}",
                        placed.no_kernel.len()
                    );
                    let d = tmp.join(&data);
                    std::fs::remove_file(&d).map_err(io(&d))?;
                    typed.push(f.clone());
                    emulated.push(f.clone());
                    continue;
                }
            }
            write_graph(&tmp.join(&name), &m)?;
            let how = Lowering {
                emulate: true,
                ..how
            };
            lower_precision(&mut base, &src, WeightFile::Reuse(&lowered.tensors), how)
                .map_err(pass_err)?;
            write_graph(&tmp.join(&cpu_name), &base)?;
            dit.files.extend([name.clone(), data]);
            typed.push(name);
            emulated.push(cpu_name);
        }
        if typed == [v.encoder.clone(), v.decoder.clone()] {
            return Ok(());
        }
        let pair = |mut names: Vec<String>| {
            let decoder = names.pop().unwrap_or_default();
            let encoder = names.pop().unwrap_or_default();
            VaeGraphs { encoder, decoder }
        };
        dit.vae_lowered = Some(pair(typed));
        dit.vae_emulated = Some(pair(emulated));
        Ok(())
    }

    /// Step 4c at fp32 on cuda: the VAE's graphs with their GroupNorms rewritten as on the lower
    /// precisions (`<graph>_cuda.onnx`, reading the export's weights): each row's statistics
    /// from one `LayerNormalization`, the centring folded into the shift, so no centred copy
    /// nor its square is written (12 of the 48 bytes an element an f32 norm path moved, by
    /// count). Exact but for the order of f32 sums (`tests/vae_parity.rs`: 3.4e-7 and 6.6e-7 of
    /// the export's on the tiny fixture); the compile records no accuracy for them, as their
    /// statistics are the CUDA kernel's (the CPU's sums `E[x²] − E[x]²` in one pass).
    /// `--exported-group-norm` keeps the export's; graphs without a GroupNorm (Wan's) stay.
    fn vae_cuda_f32_graphs(&self, tmp: &Path, dit: &mut DitBuild) -> Result<()> {
        let Some(v) = self.manifest.vae.as_ref() else {
            return Ok(());
        };
        if self.backend != Backend::Cuda || self.exported_group_norm {
            return Ok(());
        }
        let mut runs = Vec::new();
        for f in [&v.encoder, &v.decoder] {
            let src = tmp.join(f);
            let mut m = v2l_graphs::read_model(&src).map_err(io(&src))?;
            let folded = v2l_graphs::passes::GroupNormApply::Folded;
            if v2l_graphs::passes::group_norm_row_stats(&mut m, folded) == 0 {
                runs.push(f.clone());
                continue;
            }
            let name = format!("{}_cuda.onnx", f.strip_suffix(".onnx").unwrap_or(f));
            write_graph(&tmp.join(&name), &m)?;
            dit.files.push(name.clone());
            runs.push(name);
        }
        if runs == [v.encoder.clone(), v.decoder.clone()] {
            return Ok(());
        }
        let [encoder, decoder] =
            <[String; 2]>::try_from(runs).map_err(|_| CompileError::Invalid {
                what: "VAE".into(),
                message: "expected an encoder and a decoder".into(),
            })?;
        dit.vae_lowered = Some(VaeGraphs { encoder, decoder });
        Ok(())
    }

    /// Step 6a: the VAE's bf16 graphs (or a GPU engine's lowered graphs, through their CPU
    /// forms) against the export's f32 ones (`accuracy::vae_accuracy`).
    fn measure_vae(&self, tmp: &Path, dit: &mut DitBuild) -> Result<()> {
        let Some(vae) = &self.manifest.vae else {
            return Ok(());
        };
        if let Some(graphs) = &dit.vae_bf16 {
            let records = crate::accuracy::vae_accuracy(tmp, vae, graphs)?;
            dit.accuracy.extend(records);
        }
        if let Some(graphs) = &dit.vae_emulated {
            let records = crate::accuracy::lowered_vae_accuracy(tmp, vae, graphs, self.precision)?;
            dit.accuracy.extend(records);
        }
        Ok(())
    }

    /// Step 5: the DiT's graphs: rewritten for the backend, lowered to the precision (with its
    /// accuracy against fp32), the LoRA variants, and TensorRT's checks.
    fn build_dit(
        &self,
        d: &DitEntry,
        tmp: &Path,
        targets: &[LoraTarget],
        out: &mut DitBuild,
    ) -> Result<()> {
        let src = tmp.join(&d.file);
        let base = self.rewrite_for_backend(d, &src)?;
        let low = self.lower_dit_precision(d, &base, &src, tmp, targets, out)?;
        self.lora_variants(d, &base, &src, tmp, low.as_ref(), out)?;
        if self.backend == Backend::TensorRt {
            check_tensorrt_graphs(tmp, &d.file, &out.variants, self.precision, targets)?;
        }
        Ok(())
    }

    /// Step 5a: attention, GELU (and on CUDA the RoPE) fused into ONNX Runtime's contrib ops,
    /// the feed-forward chunked on the CPU; the graph at `src` is rewritten when anything changed. Returns the
    /// graph the other DiT steps start from.
    fn rewrite_for_backend(&self, d: &DitEntry, src: &Path) -> Result<ModelProto> {
        let mut base = v2l_graphs::read_model(src).map_err(io(src))?;
        if fuses_attention(self.backend) {
            let heads = d
                .config
                .get("num_attention_heads")
                .and_then(|v| v.as_i64())
                .unwrap_or(0);
            let attention = if heads > 0 {
                v2l_graphs::passes::fuse_attention(&mut base, heads)
            } else {
                0
            };
            // RoPE in one kernel on the GPU (CPU engines keep the exported form: the fused op
            // is not measured against it there).
            let rope = match self.backend {
                Backend::Cuda if !self.unfused_rope => {
                    v2l_graphs::passes::fuse_rope(&mut base, src)
                }
                _ => 0,
            };
            let gelu = v2l_graphs::passes::fuse_gelu(&mut base);
            // The feed-forward's bias into its GELU on the GPU (CPU engines keep the exported
            // `Gemm` bias: their feed-forward chunking matches that form).
            let gelu_bias = match self.backend {
                Backend::Cuda => v2l_graphs::passes::fuse_gelu_bias(&mut base),
                _ => 0,
            };
            // The AdaLN modulation into its norms' scale and bias on the GPU.
            let modulation = match self.backend {
                Backend::Cuda => v2l_graphs::passes::fold_modulation(&mut base),
                _ => 0,
            };
            if attention + rope + gelu + gelu_bias + modulation > 0 {
                write_graph(src, &ff_chunked(self.backend, &base))?;
            }
        }
        Ok(base)
    }

    /// Step 5b: below fp32, the DiT's graph for the precision (`dit_<precision>.onnx`) and its
    /// weight file, shared with the LoRA-branch variant, and its accuracy against fp32. The
    /// f32 weights stay in the bundle as the base LoRAs are fused from (memory-mapped, never
    /// loaded whole). `None` at fp32.
    fn lower_dit_precision(
        &self,
        d: &DitEntry,
        base: &ModelProto,
        src: &Path,
        tmp: &Path,
        targets: &[LoraTarget],
        out: &mut DitBuild,
    ) -> Result<Option<LowWeights>> {
        if self.precision == Precision::Fp32 {
            return Ok(None);
        }
        let pass_err = |source| CompileError::GraphPass {
            path: src.into(),
            source,
        };
        let file = format!("dit_{}.onnx", self.precision.name());
        let data = format!("{file}.data");
        let mut model = base.clone();
        let weights = match self.calibration {
            Some(how) => {
                let record = calibrate_dit(d, base, src, tmp, targets, how)?;
                let weights = LowWeights::Qdq {
                    weights: record.input_scales.keys().cloned().collect(),
                    scales: record.input_scales.clone(),
                    form: qdq_form(self.backend, self.int8_scheme),
                };
                weights.reuse(&mut model, src).map_err(pass_err)?;
                out.calibration = Some(record);
                weights
            }
            None => lower_dit(
                &mut model,
                src,
                &tmp.join(&data),
                self.precision,
                self.backend,
                targets,
                HalfOps {
                    low_gelu: self.low_gelu,
                    half_attention: self.half_attention,
                    half_gelu: self.half_gelu,
                },
            )
            .map_err(pass_err)?,
        };
        let chunked = matches!(weights, LowWeights::Quantized { .. });
        let graph = VariantGraph::Precision(self.precision);
        self.write_dit_graph(tmp, graph, &file, &model, chunked, out)?;
        // Accuracy is measured on the CPU: a typed fp16/bf16 graph (GPU backends) through its
        // emulated form, which is only written for this.
        out.emulated = match &weights {
            LowWeights::Float(how, tensors) if !how.emulate => {
                let p = tmp.join(format!("dit_{}_emulated.onnx", self.precision.name()));
                let mut m = base.clone();
                let how = v2l_graphs::passes::Lowering {
                    emulate: true,
                    ..*how
                };
                let reuse = v2l_graphs::passes::WeightFile::Reuse(tensors);
                v2l_graphs::passes::lower_precision(&mut m, src, reuse, how).map_err(pass_err)?;
                write_graph(&p, &m)?;
                Some(p)
            }
            _ => None,
        };
        let measured = crate::accuracy::dit_accuracy(
            d,
            src,
            out.emulated.as_deref().unwrap_or(&tmp.join(&file)),
            &v2l_runtime::session::SessionOptions {
                keep_weight_casts: true,
                qdq_matmul: self.calibration.is_some(),
                ..Default::default()
            },
        );
        out.accuracy.push(measured?);
        out.files.push(file.clone());
        // Q/DQ graphs keep the export's f32 weights: no weight file of their own.
        if tmp.join(&data).exists() {
            out.files.push(data);
        }
        out.variants.insert(
            DitVariant::of(VariantGraph::Precision(self.precision)),
            file,
        );
        Ok(Some(weights))
    }

    /// Writes the DiT graph `file` of variant `variant` (its feed-forward chunked when
    /// `chunked`). With v2l's attention (`Options::attention`) the graph calls
    /// `ai.v2l.Attention` (and its s8 dynamic int8 linears `ai.v2l.QMatMul`), and its twin on
    /// ONNX Runtime's attention and linears is written beside it as variant `<variant>.ort`,
    /// which CPUs without AVX512-BF16 load instead (the weights are shared: external data, or
    /// small).
    fn write_dit_graph(
        &self,
        tmp: &Path,
        graph: VariantGraph,
        file: &str,
        model: &ModelProto,
        chunked: bool,
        out: &mut DitBuild,
    ) -> Result<()> {
        let write = |p: &Path, m: &ModelProto| {
            if chunked {
                write_graph(p, &ff_chunked(self.backend, m))
            } else {
                write_graph(p, m)
            }
        };
        if self.attention == Attention::Ort {
            return write(&tmp.join(file), model);
        }
        let twin = file.replace(".onnx", "_ort.onnx");
        write(&tmp.join(&twin), model)?;
        out.files.push(twin.clone());
        out.variants.insert(DitVariant::of(graph).twin(), twin);
        let mut ours = model.clone();
        v2l_graphs::passes::v2l_attention(&mut ours, self.attention == Attention::Int8);
        // Dynamic int8 linears with s8 weights (`u8s8`) go onto v2l's VNNI GEMM with it.
        if !self.ort_int8_linears && v2l_graphs::passes::v2l_qmatmul(&mut ours) > 0 {
            out.v2l_int8_gemm = true;
        }
        write(&tmp.join(file), &ours)
    }

    /// Step 5c: the graphs of the LoRA strategies that keep one session: `bound` (targeted
    /// weights as inputs: f32 engines, and cuda engines at fp16/bf16, whose weights are made on
    /// the device by `lora_merge.onnx`) and `unfused` (a low-rank branch per target, over the
    /// precision's weights).
    fn lora_variants(
        &self,
        d: &DitEntry,
        base: &ModelProto,
        src: &Path,
        tmp: &Path,
        low: Option<&LowWeights>,
        out: &mut DitBuild,
    ) -> Result<()> {
        let names = target_names(d);
        let pass_err = |source| CompileError::GraphPass {
            path: src.into(),
            source,
        };
        for (strategy, file) in [
            (Strategy::Bound, "dit_bound.onnx"),
            (Strategy::Unfused, "dit_unfused.onnx"),
        ] {
            let mut model = base.clone();
            let on_device = self.backend == Backend::Cuda;
            match (strategy, low) {
                // A cuda engine merges a LoRA into its weights on the device, in their type.
                (Strategy::Bound, None | Some(LowWeights::Float(..))) if on_device => {
                    if let Some(low) = low {
                        low.reuse(&mut model, src).map_err(pass_err)?;
                    }
                    let merge = v2l_graphs::passes::lora_merge_graph(&mut model, &names)
                        .map_err(pass_err)?;
                    let file = "lora_merge.onnx";
                    write_graph(&tmp.join(file), &merge)?;
                    out.files.push(file.to_string());
                    out.variants
                        .insert(DitVariant::of(VariantGraph::LoraMerge), file);
                }
                // Elsewhere `bound` feeds f32 weights from the host by reference; a
                // low-precision engine has none.
                (Strategy::Bound, Some(_)) => continue,
                (Strategy::Bound, None) => {
                    v2l_graphs::passes::bind_weights_as_inputs(&mut model, &names)
                        .map_err(pass_err)?
                }
                (_, low) => {
                    v2l_graphs::passes::add_lora_branches(&mut model, &names).map_err(pass_err)?;
                    if let Some(low) = low {
                        low.reuse(&mut model, src).map_err(pass_err)?;
                    }
                }
            }
            let chunked = matches!(low, None | Some(LowWeights::Quantized { .. }));
            let graph = VariantGraph::Strategy(strategy);
            self.write_dit_graph(tmp, graph, file, &model, chunked, out)?;
            out.files.push(file.to_string());
            out.variants.insert(DitVariant::of(graph), file);
        }
        Ok(())
    }

    /// Step 6: below fp32, a short generation against fp32 when the export is a whole
    /// pipeline; then the emulated graph, written only for measuring, goes.
    fn measure_generation(
        &self,
        tmp: &Path,
        weight_hash: &str,
        targets: &[LoraTarget],
        dit: &mut DitBuild,
    ) -> Result<()> {
        let m = &self.manifest;
        if self.precision != Precision::Fp32
            && m.vae.is_some()
            && m.scheduler.is_some()
            && m.dit.as_ref().is_some_and(|d| sample_is_short(&d.config))
        {
            let mut variants = dit.variants.clone();
            if let Some(p) = dit.emulated.as_ref().and_then(|p| p.file_name()) {
                variants.insert(
                    DitVariant::of(VariantGraph::Precision(self.precision)),
                    p.to_string_lossy(),
                );
            }
            let engine = |bundle| v2l_runtime::engine::Engine {
                dir: tmp.to_path_buf(),
                manifest: m.clone(),
                bundle,
            };
            let low = Bundle {
                format_version: FORMAT_VERSION,
                backend: Backend::Cpu,
                precision: self.precision,
                lora_strategy: Strategy::Fused,
                weight_hash: weight_hash.into(),
                lora_targets: targets.to_vec(),
                files: Vec::new(),
                dit_variants: variants,
                max_rank: None,
                attention: self.attention,
                producer: String::new(),
                accuracy: Vec::new(),
                int8_scheme: self.recorded_int8_scheme(),
                v2l_int8_gemm: dit.v2l_int8_gemm,
                calibration: dit.calibration.clone(),
                pipeline: None,
                vae_bf16: dit.vae_bf16.clone(),
                vae_lowered: dit.vae_emulated.clone(),
                tf32: false,
                cuda_options: Default::default(),
                rope_max_tokens: None,
                bundle_hash: String::new(),
            };
            dit.accuracy.push(crate::accuracy::generation_accuracy(
                engine(None),
                engine(Some(low)),
            )?);
        }
        if let Some(p) = dit.emulated.take() {
            std::fs::remove_file(&p).map_err(io(&p))?;
        }
        if let Some(g) = dit.vae_emulated.take() {
            // A part kept f32 names the export's own graph, which stays.
            let own = m
                .vae
                .as_ref()
                .map(|v| [v.encoder.clone(), v.decoder.clone()]);
            for f in [g.encoder, g.decoder] {
                if own.as_ref().is_some_and(|o| o.contains(&f)) {
                    continue;
                }
                let p = tmp.join(f);
                std::fs::remove_file(&p).map_err(io(&p))?;
            }
        }
        Ok(())
    }

    /// Step 7 (cuda engines): every node of every graph has a kernel in ONNX Runtime's CUDA
    /// provider ([`v2l_graphs::placement`]): a node without one would run on the CPU with a
    /// copy on each side, so such an engine is refused, naming the nodes. With CUDA graphs
    /// (`enable_cuda_graph=1`) no graph may branch or loop: ONNX Runtime cannot capture
    /// control flow and would refuse the session at load.
    fn check_cuda_placement(&self, tmp: &Path) -> Result<()> {
        use v2l_graphs::placement::{cuda_placement, KernelTable};
        if self.backend != Backend::Cuda {
            return Ok(());
        }
        let mut graphs: Vec<PathBuf> = std::fs::read_dir(tmp)
            .map_err(io(tmp))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "onnx"))
            .collect();
        graphs.sort();
        for g in graphs {
            let model = v2l_graphs::read_model(&g).map_err(io(&g))?;
            let captured = self
                .cuda_options
                .get("enable_cuda_graph")
                .is_some_and(|v| v == "1");
            let flow = model.graph.iter().flat_map(|g| &g.node).find(|n| {
                matches!(n.op_type.as_str(), "If" | "Loop" | "Scan") && n.domain.is_empty()
            });
            if let (true, Some(n)) = (captured, flow) {
                return Err(CompileError::Invalid {
                    what: "--cuda-option enable_cuda_graph=1".into(),
                    message: format!(
                        "{} has a `{}` node ({}): ONNX Runtime cannot capture control flow in a CUDA graph",
                        g.file_name().unwrap_or_default().to_string_lossy(),
                        n.op_type,
                        n.name
                    ),
                });
            }
            let p = cuda_placement(&model, KernelTable::ort_cuda());
            if let Some(first) = p.no_kernel.first() {
                return Err(CompileError::Invalid {
                    what: g.file_name().unwrap_or_default().to_string_lossy().into_owned(),
                    message: format!(
                        "{} node(s) have no kernel in ONNX Runtime's CUDA provider and would run on the CPU ({}), first {first}",
                        p.no_kernel.len(),
                        v2l_graphs::placement::count_by_operator(&p.no_kernel)
                    ),
                });
            }
        }
        Ok(())
    }

    /// Step 8: `bundle.json`: every file's size and hash, the target table, the variants and
    /// the accuracy, and the record's own hash.
    fn write_record(
        &self,
        tmp: &Path,
        parts: Vec<String>,
        weight_hash: String,
        lora_targets: Vec<LoraTarget>,
        dit: DitBuild,
    ) -> Result<Bundle> {
        let files = parts
            .iter()
            .chain(&dit.files)
            .map(|f| file_entry(tmp, f).map_err(CompileError::from))
            .collect::<Result<Vec<_>>>()?;
        let bundle = Bundle {
            format_version: FORMAT_VERSION,
            backend: self.backend,
            precision: self.precision,
            lora_strategy: default_strategy(self.backend, self.precision),
            weight_hash,
            lora_targets,
            files,
            dit_variants: dit.variants,
            max_rank: self.max_rank,
            attention: self.attention,
            producer: format!("v2l {}", env!("CARGO_PKG_VERSION")),
            accuracy: dit.accuracy,
            int8_scheme: self.recorded_int8_scheme(),
            v2l_int8_gemm: dit.v2l_int8_gemm,
            calibration: dit.calibration,
            // A DiT-less export has none; a DiT of no known kind was refused before the build.
            pipeline: self.manifest.pipeline_kind().ok(),
            vae_bf16: dit.vae_bf16,
            vae_lowered: dit.vae_lowered,
            tf32: self.tf32,
            cuda_options: self.cuda_options.clone(),
            rope_max_tokens: None,
            bundle_hash: String::new(),
        };
        let bundle = Bundle {
            bundle_hash: bundle.self_hash()?,
            ..bundle
        };
        let text = serde_json::to_string_pretty(&bundle).map_err(|e| CompileError::Invalid {
            what: FILE_NAME.into(),
            message: e.to_string(),
        })?;
        let p = tmp.join(FILE_NAME);
        std::fs::write(&p, text + "\n").map_err(io(&p))?;
        Ok(bundle)
    }
}

/// Latent pixels (frames × height × width) up to which the compile runs its short generation.
/// A DiT with a learned positional table is sampled at its own size, 49 frames at 480×720
/// (CogVideoX-5B-I2V 1.0): 8 DiT calls there and a 49-frame decode for each of fp32 and the
/// precision would take hours, so such a compile records the DiT's one-call accuracy only.
const GENERATION_SAMPLE_MAX_LATENTS: usize = 4 * 32 * 32;

/// Whether the compile-time sample of a DiT config is small enough for the short generation.
fn sample_is_short(cfg: &serde_json::Value) -> bool {
    let ([frames, h, w], _) = crate::accuracy::sample_size(cfg);
    let (lf, lh, lw) = v2l_contracts::LatentGrid::of_video(frames, h, w).dims();
    lf.saturating_mul(lh).saturating_mul(lw) <= GENERATION_SAMPLE_MAX_LATENTS
}

/// The initializer names of the DiT's LoRA targets (`<module>.weight`).
fn target_names(d: &DitEntry) -> Vec<String> {
    d.lora_targets
        .iter()
        .map(|t| format!("{}.weight", t.name))
        .collect()
}

/// Writes a rewritten graph (to a temporary name, then renamed).
fn write_graph(p: &Path, model: &ModelProto) -> Result<()> {
    v2l_graphs::write_model(p, model).map_err(|source| CompileError::GraphWrite {
        path: p.into(),
        source,
    })
}

/// What a CPU can check of the DiT graphs a TensorRT engine is built from
/// (`v2l_graphs::check`): standard ops, LoRA targets read directly by their Gemm, stored in the
/// type the target table gives (f32 for integer engines' f32 graphs, and where the `bound`
/// variant takes them as inputs), consistent types.
fn check_tensorrt_graphs(
    dir: &Path,
    export_file: &str,
    variants: &DitVariants,
    precision: Precision,
    targets: &[LoraTarget],
) -> Result<()> {
    use v2l_graphs::DType;
    let stored = |t: &LoraTarget| match t.dtype {
        Stored::Float(d) => Some(d),
        _ => None,
    };
    let fp32 = (precision == Precision::Fp32).then_some((None, export_file));
    for (variant, file) in variants.iter().map(|(v, f)| (Some(v.graph), f)).chain(fp32) {
        let path = dir.join(file);
        let model = v2l_graphs::read_model(&path).map_err(io(&path))?;
        let targets: Vec<(String, DType)> = targets
            .iter()
            .map(|t| {
                let d = match variant {
                    Some(VariantGraph::Strategy(Strategy::Bound)) => DType::F32,
                    _ => stored(t).unwrap_or(DType::F32),
                };
                (t.initializer.clone(), d)
            })
            .collect();
        let problems = v2l_graphs::check::tensorrt_problems(&model, &targets);
        if !problems.is_empty() {
            return Err(CompileError::Invalid {
                what: path.display().to_string(),
                message: format!(
                    "not buildable by TensorRT as v2l needs it: {}",
                    problems.join("; ")
                ),
            });
        }
    }
    Ok(())
}

/// The weights a below-fp32 DiT graph was written with, so the engine's second graph (its
/// LoRA-branch variant) points at the same file.
enum LowWeights {
    Quantized {
        weights: Vec<(String, WeightQuant)>,
        tensors: Vec<v2l_graphs::proto::TensorProto>,
    },
    Float(
        v2l_graphs::passes::Lowering,
        Vec<v2l_graphs::proto::TensorProto>,
    ),
    /// Static int8: Q/DQ around the linears, activation scales by weight.
    Qdq {
        weights: Vec<String>,
        scales: std::collections::BTreeMap<String, f32>,
        form: v2l_calibration::QdqForm,
    },
}

impl LowWeights {
    fn reuse(
        &self,
        model: &mut v2l_graphs::proto::ModelProto,
        src: &Path,
    ) -> std::result::Result<(), v2l_graphs::passes::PassError> {
        use v2l_graphs::passes::{lower_precision, use_quantized_weights, WeightFile};
        match self {
            LowWeights::Quantized { weights, tensors } => {
                use_quantized_weights(model, weights, tensors)
            }
            LowWeights::Float(how, tensors) => {
                lower_precision(model, src, WeightFile::Reuse(tensors), *how).map(|_| ())
            }
            LowWeights::Qdq {
                weights,
                scales,
                form,
            } => {
                let scale = |w: &str| scales.get(w).copied().unwrap_or(1.0);
                v2l_calibration::insert_qdq(model, src, weights, &scale, *form).map(|_| ())
            }
        }
    }
}

/// The Q/DQ form a backend builds fast: ONNX Runtime's CPU provider fuses the MatMul form into
/// int8 kernels; TensorRT and CUDA get the Gemm form (`v2l_calibration::QdqForm`).
fn qdq_form(backend: Backend, scheme: Int8Scheme) -> v2l_calibration::QdqForm {
    match backend {
        Backend::Cpu if scheme == Int8Scheme::U8S8 => v2l_calibration::QdqForm::MatMulS8,
        Backend::Cpu => v2l_calibration::QdqForm::MatMul,
        Backend::Cuda | Backend::TensorRt => v2l_calibration::QdqForm::Gemm,
    }
}

/// Calibrates the activation scales of the linears the target table marks `qdq`: runs the fp32
/// graph `base` (read from `src`), with those linears' inputs as extra outputs, over the
/// calibration samples (`crate::calibrate`).
fn calibrate_dit(
    dit: &v2l_contracts::manifest::DitEntry,
    base: &v2l_graphs::proto::ModelProto,
    src: &Path,
    dir: &Path,
    targets: &[LoraTarget],
    how: &crate::calibrate::Calibration,
) -> Result<crate::calibrate::CalibrationRecord> {
    let weights: Vec<String> = targets
        .iter()
        .filter(|t| t.dtype == Stored::Qdq)
        .map(|t| t.initializer.clone())
        .collect();
    let mut observed = base.clone();
    let pairs =
        v2l_calibration::observe_linear_inputs(&mut observed, &weights).map_err(|source| {
            CompileError::GraphPass {
                path: src.into(),
                source,
            }
        })?;
    // Beside the export's graph, so its external weights resolve; removed when done.
    let path = dir.join("dit_calibrating.onnx");
    v2l_graphs::write_model(&path, &observed).map_err(|source| CompileError::GraphWrite {
        path: path.clone(),
        source,
    })?;
    let record = crate::calibrate::input_scales(&dit.config, &path, &pairs, how);
    std::fs::remove_file(&path).map_err(io(&path))?;
    record
}

/// Where a bf16/fp16 DiT computes some ops in another type than the engine's
/// ([`v2l_graphs::passes::Lowering`]).
struct HalfOps {
    low_gelu: bool,
    half_attention: bool,
    half_gelu: bool,
}

/// Rewrites the DiT `model` (read from `src`) for `precision`, writing its new weights to
/// `data`: int8/int4 quantise the targets the table marks so ([`quantises`]); fp16/bf16
/// lower the whole graph, typed for GPU backends and emulated for the CPU
/// (`v2l_graphs::passes::lower_precision`).
fn lower_dit(
    model: &mut v2l_graphs::proto::ModelProto,
    src: &Path,
    data: &Path,
    precision: Precision,
    backend: Backend,
    targets: &[LoraTarget],
    ops: HalfOps,
) -> std::result::Result<LowWeights, v2l_graphs::passes::PassError> {
    use v2l_graphs::{passes, DType};
    let dtype = match precision {
        Precision::Int8 | Precision::Int4 => {
            let weights: Vec<(String, WeightQuant)> = targets
                .iter()
                .filter_map(|t| match t.dtype {
                    Stored::Quantized(q) => Some((t.initializer.clone(), q)),
                    _ => None,
                })
                .collect();
            let q = passes::quantize_linears(model, src, &weights, data)?;
            return Ok(LowWeights::Quantized {
                weights,
                tensors: q.tensors,
            });
        }
        Precision::Fp16 => DType::F16,
        Precision::Bf16 => DType::BF16,
        Precision::Fp32 => {
            return Err(passes::PassError::Unsupported(
                "an fp32 graph is not lowered".into(),
            ))
        }
    };
    let how = passes::Lowering {
        dtype,
        emulate: backend == Backend::Cpu,
        low_caches: false,
        low_factors: true,
        low_gelu: ops.low_gelu,
        half_attention: ops.half_attention,
        half_gelu: ops.half_gelu,
    };
    let l = passes::lower_precision(model, src, passes::WeightFile::Write(data), how)?;
    Ok(LowWeights::Float(how, l.tensors))
}

/// The largest rank of an `unfused` LoRA, which sessions needing one factor shape pad every
/// LoRA to (TensorRT builds its profile for it; a CUDA graph is captured per shape; a plain
/// cuda session takes each LoRA's own rank, `v2l_runtime`'s `Ranks`): `--max-rank` when given;
/// on GPU backends otherwise the engine's hypernetwork rank (Prompt2Effect, LoFA) or 64; on the
/// CPU none (each LoRA keeps its own rank, no work on padding).
pub fn lora_max_rank(backend: Backend, flag: Option<usize>, manifest: &Manifest) -> Option<usize> {
    if flag.is_some() {
        return flag;
    }
    match backend {
        Backend::Cpu => None,
        Backend::Cuda | Backend::TensorRt => Some(
            manifest
                .prompt2effect
                .as_ref()
                .map(|p| p.rank)
                .or(manifest.lofa.as_ref().map(|l| l.rank))
                .unwrap_or(64),
        ),
    }
}

/// The LoRA strategy a backend uses by default (docs/usage.md, "LoRA strategies").
///
/// CPU: `bound`. Measured on the tiny model (`v2l-bench pipeline`): switching costs a fuse of the
/// touched layers (~0.8 ms) instead of a session build (~36 ms for `fused`), and DiT steps ran
/// no slower than with fused initializers (ORT does not prepack initializers supplied from
/// outside the model either). `unfused` switches fastest but pays a branch per layer each step.
///
/// int8: `unfused`: the LoRA is an f32 low-rank branch beside the int8 weights, exact in the
/// LoRA and switched by copying its factors; `fused` (re-quantising `W + s·B·A` from the f32
/// base) is the other choice, measured in docs/precision.md.
///
/// CUDA and TensorRT: `unfused`. A switch is a change of input buffers (no session, no engine
/// build, no refit), the factors are a few MB instead of the ~9 GB of targeted weights `bound`
/// would copy to the device every step, and requests with different LoRAs can share a DiT call.
/// ONNX Runtime's TensorRT provider cannot refit a live engine with new weights (its weight-
/// stripped engines refit only identical weights, at session creation), so `fused` there costs
/// a full engine build per LoRA: kept for a LoRA that stays for long. Not yet run on a GPU.
pub fn default_strategy(backend: Backend, precision: Precision) -> Strategy {
    match (backend, precision) {
        (Backend::Cuda | Backend::TensorRt, _) => Strategy::Unfused,
        (_, Precision::Int8 | Precision::Int4) => Strategy::Unfused,
        (_, Precision::Fp16 | Precision::Bf16) => Strategy::Fused,
        (Backend::Cpu, _) => Strategy::Bound,
    }
}

/// How an int8/int4 engine (`how`: its token-wise format) stores the DiT weight `name`, or
/// `None` to keep it f32:
/// - the token-wise linears (attention projections, feed-forward, text projection): `how`;
/// - the adaptive norms' `norm*.linear`: 8-bit block-wise with f32 activations
///   ([`WeightQuant::Int8Block`]). They run on one row per sample and their error scales every
///   token, so per-tensor activation quantisation is out, but their weights are 14 % of a
///   CogVideoX-5B block's parameters and 40 % of an int8 engine's bytes if kept f32 (3.2 GB of
///   the 42-block DiT); block-wise 8-bit codes hold them in 0.9 GB;
/// - kept f32: the time embedding (small) and the output projection `proj_out`, whose error
///   reaches the prediction with no residual to dilute it. On the tiny fixture DiT, int8
///   everywhere is 1.1e-2 from f32 (`proj_out` alone 1.0e-2); token-wise only, 3.1e-3.
pub fn quantised_as(name: &str, how: WeightQuant) -> Option<WeightQuant> {
    let module = name.strip_suffix(".weight").unwrap_or(name);
    let mut parts = module.rsplit('.');
    let (last, parent) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if last == "linear" && parent.starts_with("norm") {
        Some(WeightQuant::Int8Block)
    } else if module.starts_with("time_embedding.") || module == "proj_out" {
        None
    } else {
        Some(how)
    }
}

/// The precisions `v2l-compile` builds, per backend; the others are refused with the reason.
fn check_precision(backend: Backend, precision: Precision, calibrated: bool) -> Result<()> {
    let why = match (precision, backend, calibrated) {
        (_, _, true) if precision != Precision::Int8 => "a calibration is for int8 (static activation ranges); fp16/bf16/int4 take none",
        (Precision::Fp32 | Precision::Fp16 | Precision::Bf16, _, _)
        | (Precision::Int8, _, true)
        | (Precision::Int8 | Precision::Int4, Backend::Cpu, _) => return Ok(()),
        (Precision::Int8, _, false) => "int8 on cuda/tensorrt is static int8: give --calibration <dir> or --calibration-samples <n> (Q/DQ with calibrated activation ranges); dynamic int8 (DynamicQuantizeMatMul) is the cpu backend's",
        (Precision::Int4, _, _) => "int4 engines are built for the CPU backend (ONNX Runtime's MatMulNBits)",
    };
    Err(CompileError::Invalid {
        what: format!("--precision {}", precision.name()),
        message: why.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learned_position_tables_sample_at_their_own_size() {
        // CogVideoX-5B-I2V 1.0's table: 49 frames at 480×720, too large for the generation.
        let i2v = serde_json::json!({"use_learned_positional_embeddings": true,
            "sample_frames": 49, "sample_height": 60, "sample_width": 90, "max_text_seq_length": 226});
        assert_eq!(crate::accuracy::sample_size(&i2v), ([49, 480, 720], 226));
        assert!(!sample_is_short(&i2v));
        // The embedded model's: 17 frames at 64×64. Without a table: 9 frames, capped at 128 px.
        let demo = serde_json::json!({"use_learned_positional_embeddings": true,
            "sample_frames": 17, "sample_height": 8, "sample_width": 8, "max_text_seq_length": 8});
        assert_eq!(crate::accuracy::sample_size(&demo), ([17, 64, 64], 8));
        assert!(sample_is_short(&demo));
        let rope = serde_json::json!({"sample_frames": 49, "sample_height": 60, "sample_width": 90,
            "max_text_seq_length": 226});
        assert_eq!(crate::accuracy::sample_size(&rope), ([9, 128, 128], 226));
        assert!(sample_is_short(&rope));
    }

    #[test]
    fn integer_engines_quantise_token_wise_linears_and_block_quantise_norms() {
        let (q, b) = (Some(WeightQuant::Int4), Some(WeightQuant::Int8Block));
        for (name, how) in [
            ("transformer_blocks.3.attn1.to_q.weight", q),
            ("transformer_blocks.3.attn1.to_out.0.weight", q),
            ("transformer_blocks.3.ff.net.0.proj.weight", q),
            ("transformer_blocks.3.ff.net.2.weight", q),
            ("patch_embed.text_proj.weight", q),
            ("time_embedding.linear_1.weight", None),
            ("transformer_blocks.3.norm1.linear.weight", b),
            ("transformer_blocks.3.norm2.linear.weight", b),
            ("norm_out.linear.weight", b),
            ("proj_out.weight", None),
        ] {
            assert_eq!(quantised_as(name, WeightQuant::Int4), how, "{name}");
        }
    }
}
