//! Engine bundles: what `v2l-compile` writes and `v2l-run --engine` loads.
//!
//! A bundle is a directory: the export's graphs and manifest (pipeline parts: scheduler config,
//! VAE scaling and frame batching, hypernetwork dimensions, LiLoRA auxiliaries) plus
//! `bundle.json`, which records the backend and precision, the LoRA target table (initializer,
//! shape, dtype), a hash of the base weights the targets start from, and the size and hash of
//! every file. Loading re-checks all of it (big files by sampled blocks, see [`file_hash`]) and
//! refuses a mismatched or modified part.
//!
//! Precision: fp32, or int8 on the CPU backend (`dit_int8.onnx`, the DiT's token-wise linears as
//! `DynamicQuantizeMatMul` over int8 weights; the f32 graph stays as the LoRA base). Below fp32
//! the bundle records each changed stage's accuracy against fp32 (`crate::accuracy`).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use v2l_contracts::Manifest;

use crate::backend::{Backend, PartsHasher, Precision};
use crate::error::{Result, RuntimeError};
use crate::lora::strategy::Strategy;

pub const FILE_NAME: &str = "bundle.json";
/// 2: BLAKE3 hashes; backend rewrites (attention fusion) in the bundle's DiT graphs.
pub const FORMAT_VERSION: u32 = 2;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BundleFile {
    pub name: String,
    pub bytes: u64,
    pub hash: String,
}

/// One weight a LoRA can be fused into.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoraTarget {
    pub initializer: String,
    pub shape: [usize; 2],
    pub dtype: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Bundle {
    pub format_version: u32,
    pub backend: Backend,
    pub precision: Precision,
    /// How a LoRA reaches the weights on this backend (see README: LoRA strategies).
    pub lora_strategy: String,
    /// Hash of the DiT's LoRA-targetable base weights (keys engine caches; checks LoRA bases).
    pub weight_hash: String,
    pub lora_targets: Vec<LoraTarget>,
    pub files: Vec<BundleFile>,
    /// DiT graph variants for the LoRA strategies that keep one session: `bound` (targeted
    /// weights are also inputs) and `unfused` (a low-rank branch per targeted layer).
    #[serde(default)]
    pub dit_variants: std::collections::BTreeMap<String, String>,
    pub producer: String,
    /// Below fp32: each changed stage's relative L2 against the fp32 graph, measured at compile
    /// time on generated inputs (`crate::accuracy`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub accuracy: Vec<crate::accuracy::StageAccuracy>,
    /// Static int8: how the activation ranges were calibrated, and the scales.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibration: Option<crate::calibrate::CalibrationRecord>,
    /// BLAKE3 of this record with this field empty: an edit to `bundle.json` itself (strategy,
    /// weight hash, target table) is caught like an edit to any other part.
    #[serde(default)]
    pub bundle_hash: String,
}

impl Bundle {
    /// The LoRA-targetable weights this engine stores other than as f32 (f16, bf16, int8,
    /// int4), and how: what a LoRA fused into them is converted to.
    pub fn stored(&self) -> std::collections::BTreeMap<String, crate::lora::apply::Stored> {
        use crate::lora::apply::Stored;
        self.lora_targets
            .iter()
            .filter_map(|t| {
                let s = Stored::parse(&t.dtype)?;
                (s != Stored::Float(v2l_graphs::DType::F32)).then(|| (t.initializer.clone(), s))
            })
            .collect()
    }

    fn self_hash(&self) -> Result<String> {
        let mut b = self.clone();
        b.bundle_hash.clear();
        let text = serde_json::to_string(&b).map_err(|e| RuntimeError::Invalid {
            what: FILE_NAME.into(),
            message: e.to_string(),
        })?;
        Ok(blake3::hash(text.as_bytes()).to_hex().to_string())
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RuntimeError + '_ {
    move |source| RuntimeError::Io {
        path: path.into(),
        source,
    }
}

/// Files up to this size are hashed whole on every load; bigger ones (multi-GB weights) by
/// [`SAMPLES`] blocks spread over the file, so loading a 20 GB engine does not read 20 GB.
const FULL_HASH_MAX: u64 = 256 << 20;
const SAMPLES: u64 = 64;
const SAMPLE_BYTES: u64 = 1 << 20;

/// BLAKE3 of a file: all of it up to [`FULL_HASH_MAX`], else its length and [`SAMPLES`] evenly
/// spaced blocks (first and last included). A sampled hash catches a swapped, truncated or
/// re-exported weight file; it can miss an edit that touches no sampled block.
fn file_hash(path: &Path) -> std::io::Result<(u64, String)> {
    file_hash_with(path, FULL_HASH_MAX, SAMPLES, SAMPLE_BYTES)
}

fn file_hash_with(
    path: &Path,
    full_max: u64,
    samples: u64,
    sample_bytes: u64,
) -> std::io::Result<(u64, String)> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    let mut h = blake3::Hasher::new();
    if len <= full_max.max(sample_bytes * samples) {
        let n = std::io::copy(&mut f, &mut h)?;
        return Ok((n, h.finalize().to_hex().to_string()));
    }
    h.update(&len.to_le_bytes());
    let mut block = vec![0u8; sample_bytes as usize];
    let stride = (len - sample_bytes) / (samples - 1).max(1);
    for i in 0..samples {
        let at = if i + 1 == samples {
            len - sample_bytes
        } else {
            i * stride
        };
        f.seek(SeekFrom::Start(at))?;
        f.read_exact(&mut block)?;
        h.update(&block);
    }
    Ok((len, format!("sampled:{}", h.finalize().to_hex())))
}

/// Size and hash of `dir/name`, streamed (never the whole file in memory).
fn file_entry(dir: &Path, name: &str) -> Result<BundleFile> {
    let path = dir.join(name);
    let (bytes, hash) = file_hash(&path).map_err(io(&path))?;
    Ok(BundleFile {
        name: name.into(),
        bytes,
        hash,
    })
}

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
        v2l_graphs::write_model(path, &m).map_err(|source| RuntimeError::GraphWrite {
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

/// Files an export directory's manifest refers to (graphs, their external data, side files).
fn manifest_files(dir: &Path, m: &Manifest) -> Vec<String> {
    let mut names = vec![v2l_contracts::manifest::FILE_NAME.to_string()];
    let mut graph = |f: &str| {
        names.push(f.to_string());
        let data = format!("{f}.data");
        if dir.join(&data).exists() {
            names.push(data);
        }
    };
    if let Some(d) = &m.dit {
        graph(&d.file);
    }
    if let Some(v) = &m.vae {
        graph(&v.encoder);
        graph(&v.decoder);
    }
    if let Some(t) = &m.text_encoder {
        graph(&t.file);
    }
    if let Some(i) = &m.image_encoder {
        graph(&i.file);
    }
    if let Some(p) = &m.prompt2effect {
        graph(&p.file);
    }
    if let Some(l) = &m.lofa {
        graph(&l.stage1);
        graph(&l.stage2);
    }
    if let Some(h) = &m.hypernet {
        graph(&h.file);
        names.push(h.lilora.clone());
    }
    if let Some(s) = &m.scheduler {
        names.push(s.clone());
    }
    // The tokenizer's files, in their subdirectory.
    if let Some(t) = m.text_encoder.as_ref().filter(|t| !t.tokenizer.is_empty()) {
        if let Ok(entries) = std::fs::read_dir(dir.join(&t.tokenizer)) {
            let mut files: Vec<String> = entries
                .filter_map(|e| e.ok())
                .filter(|e| e.path().is_file())
                .map(|e| format!("{}/{}", t.tokenizer, e.file_name().to_string_lossy()))
                .collect();
            files.sort();
            names.extend(files);
        }
    }
    names
}

/// Compiles the export directory `src` (or the directory of a model file inside one) into an
/// engine bundle at `out`, written under a temporary name and renamed when complete.
pub fn compile(src: &Path, out: &Path, backend: Backend, precision: Precision) -> Result<Bundle> {
    compile_with(src, out, backend, precision, None)
}

/// [`compile`], and for int8 with a calibration: static int8 through Q/DQ
/// (`crate::calibrate`), the form TensorRT builds (and ONNX Runtime's CPU provider runs).
pub fn compile_with(
    src: &Path,
    out: &Path,
    backend: Backend,
    precision: Precision,
    calibration: Option<&crate::calibrate::Calibration>,
) -> Result<Bundle> {
    check_precision(backend, precision, calibration.is_some())?;
    let dir = if src.is_file() {
        src.parent().unwrap_or(Path::new(".")).to_path_buf()
    } else {
        src.to_path_buf()
    };
    let manifest = Manifest::read(&dir).map_err(|e| RuntimeError::BadFile {
        path: dir.clone(),
        message: format!("{e} (v2l-compile takes a directory written by v2l-export)"),
    })?;
    crate::limits::check_new_output_dir(out)?;
    let (weight_hash, lora_targets) = match &manifest.dit {
        Some(d) => {
            let names: Vec<String> = d
                .lora_targets
                .iter()
                .map(|t| format!("{}.weight", t.name))
                .collect();
            let model = dir.join(&d.file);
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
                        dtype: dtype.to_string(),
                    });
                }
                Ok(())
            })
            .map_err(io(&model))?;
            if let Some(t) = targets
                .iter()
                .find(|t| t.dtype != v2l_graphs::DType::F32.name())
            {
                if precision == Precision::Fp32 {
                    return Err(RuntimeError::Invalid {
                        what: dir.display().to_string(),
                        message: format!(
                            "stores its DiT weights as {} (`{}`); an fp32 engine takes an export with f32 weights (`v2l-export dit --weight-dtype f32`), or compile this one with --precision int8",
                            t.dtype, t.initializer
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
                t.dtype = match (precision, precision.weight_quant()) {
                    (_, Some(_)) if calibration.is_some() && quantises(&t.initializer) => {
                        crate::lora::apply::Stored::Qdq.name()
                    }
                    (_, Some(q)) if quantises(&t.initializer) => q.name(),
                    (Precision::Fp16, _) => v2l_graphs::DType::F16.name(),
                    (Precision::Bf16, _) => v2l_graphs::DType::BF16.name(),
                    _ => continue,
                }
                .into();
            }
            (hash.finish(), targets)
        }
        None => (PartsHasher::default().finish(), Vec::new()),
    };
    v2l_contracts::atomic::build_dir(out, RuntimeError::io, |tmp| {
        let names = manifest_files(&dir, &manifest);
        for f in &names {
            let (from, to) = (dir.join(f), tmp.join(f));
            if let Some(parent) = to.parent() {
                std::fs::create_dir_all(parent).map_err(io(parent))?;
            }
            // A hard link is instant for 20 GB models; copy across file systems. Rewritten
            // graphs replace their link (write to a temporary name, rename), so the export
            // itself is never modified.
            if std::fs::hard_link(&from, &to).is_err() {
                std::fs::copy(&from, &to).map_err(io(&from))?;
            }
        }
        if runs_on_ort(backend) {
            if let Some(v) = &manifest.vae {
                for f in [&v.encoder, &v.decoder] {
                    carried_outputs_first(&tmp.join(f))?;
                }
            }
        }
        let mut dit_variants = std::collections::BTreeMap::new();
        let mut calibration_record = None;
        // A typed fp16/bf16 graph's CPU form, written for the accuracy checks only.
        let mut emulated: Option<PathBuf> = None;
        let mut accuracy = Vec::new();
        let mut variant_files = Vec::new();
        if let Some(d) = &manifest.dit {
            let names: Vec<String> = d
                .lora_targets
                .iter()
                .map(|t| format!("{}.weight", t.name))
                .collect();
            let src = tmp.join(&d.file);
            let pass_err = |source| RuntimeError::GraphPass {
                path: src.clone(),
                source,
            };
            let write = |p: &Path, model: &v2l_graphs::proto::ModelProto| {
                v2l_graphs::write_model(p, model).map_err(|source| RuntimeError::GraphWrite {
                    path: p.into(),
                    source,
                })
            };
            let mut base = v2l_graphs::read_model(&src).map_err(io(&src))?;
            if fuses_attention(backend) {
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
                if attention + v2l_graphs::passes::fuse_gelu(&mut base) > 0 {
                    write(&src, &ff_chunked(backend, &base))?;
                }
            }
            // Below fp32, the DiT's graph for the precision (`dit_<precision>.onnx`) and its
            // weight file, shared with the LoRA-branch variant; the f32 weights stay in the
            // bundle as the base LoRAs are fused from (memory-mapped, never loaded whole).
            let low_weights = match precision {
                Precision::Fp32 => None,
                _ => {
                    let file = format!("dit_{}.onnx", precision.name());
                    let data = format!("{file}.data");
                    let mut model = base.clone();
                    let weights = match calibration {
                        Some(how) => {
                            let record = calibrate_dit(d, &base, &src, tmp, &lora_targets, how)?;
                            let weights = LowWeights::Qdq {
                                weights: record.input_scales.keys().cloned().collect(),
                                scales: record.input_scales.clone(),
                                form: qdq_form(backend),
                            };
                            weights.reuse(&mut model, &src).map_err(pass_err)?;
                            calibration_record = Some(record);
                            weights
                        }
                        None => lower_dit(
                            &mut model,
                            &src,
                            &tmp.join(&data),
                            precision,
                            backend,
                            &lora_targets,
                        )
                        .map_err(pass_err)?,
                    };
                    match &weights {
                        LowWeights::Quantized { .. } => {
                            write(&tmp.join(&file), &ff_chunked(backend, &model))?
                        }
                        _ => write(&tmp.join(&file), &model)?,
                    }
                    // Accuracy is measured on the CPU: a typed fp16/bf16 graph (GPU backends)
                    // through its emulated form, which is only written for this.
                    emulated = match &weights {
                        LowWeights::Float(how, tensors) if !how.emulate => {
                            let p = tmp.join(format!("dit_{}_emulated.onnx", precision.name()));
                            let mut m = base.clone();
                            let how = v2l_graphs::passes::Lowering {
                                emulate: true,
                                ..*how
                            };
                            let reuse = v2l_graphs::passes::WeightFile::Reuse(tensors);
                            v2l_graphs::passes::lower_precision(&mut m, &src, reuse, how)
                                .map_err(pass_err)?;
                            write(&p, &m)?;
                            Some(p)
                        }
                        _ => None,
                    };
                    let measured = crate::accuracy::dit_accuracy(
                        d,
                        &src,
                        emulated.as_deref().unwrap_or(&tmp.join(&file)),
                        &crate::session::SessionOptions {
                            keep_weight_casts: true,
                            qdq_matmul: calibration.is_some(),
                            ..Default::default()
                        },
                    );
                    accuracy.push(measured?);
                    variant_files.push(file.clone());
                    // Q/DQ graphs keep the export's f32 weights: no weight file of their own.
                    if tmp.join(&data).exists() {
                        variant_files.push(data);
                    }
                    dit_variants.insert(precision.name().to_string(), file);
                    Some(weights)
                }
            };
            for (variant, file) in [("bound", "dit_bound.onnx"), ("unfused", "dit_unfused.onnx")] {
                let mut model = base.clone();
                match (variant, &low_weights) {
                    // `bound` feeds f32 weights by reference; a low-precision engine has none.
                    ("bound", Some(_)) => continue,
                    ("bound", None) => {
                        v2l_graphs::passes::bind_weights_as_inputs(&mut model, &names)
                            .map_err(pass_err)?
                    }
                    (_, low) => {
                        v2l_graphs::passes::add_lora_branches(&mut model, &names)
                            .map_err(pass_err)?;
                        if let Some(low) = low {
                            low.reuse(&mut model, &src).map_err(pass_err)?;
                        }
                    }
                }
                match &low_weights {
                    None | Some(LowWeights::Quantized { .. }) => {
                        write(&tmp.join(file), &ff_chunked(backend, &model))?
                    }
                    Some(_) => write(&tmp.join(file), &model)?,
                }
                variant_files.push(file.to_string());
                dit_variants.insert(variant.to_string(), file.to_string());
            }
            if backend == Backend::TensorRt {
                check_tensorrt_graphs(tmp, &d.file, &dit_variants, precision, &lora_targets)?;
            }
        }
        // Below fp32, a short generation against fp32 when the export is a whole pipeline.
        if precision != Precision::Fp32 && manifest.vae.is_some() && manifest.scheduler.is_some() {
            let mut variants = dit_variants.clone();
            if let Some(p) = emulated.as_ref().and_then(|p| p.file_name()) {
                variants.insert(
                    precision.name().to_string(),
                    p.to_string_lossy().into_owned(),
                );
            }
            let engine = |bundle| crate::engine::Engine {
                dir: tmp.to_path_buf(),
                manifest: manifest.clone(),
                bundle,
            };
            let low = Bundle {
                format_version: FORMAT_VERSION,
                backend: Backend::Cpu,
                precision,
                lora_strategy: Strategy::Fused.name().into(),
                weight_hash: weight_hash.clone(),
                lora_targets: lora_targets.clone(),
                files: Vec::new(),
                dit_variants: variants,
                producer: String::new(),
                accuracy: Vec::new(),
                calibration: calibration_record.clone(),
                bundle_hash: String::new(),
            };
            accuracy.push(crate::accuracy::generation_accuracy(
                engine(None),
                engine(Some(low)),
            )?);
        }
        if let Some(p) = &emulated {
            std::fs::remove_file(p).map_err(io(p))?;
        }
        let files = names
            .iter()
            .chain(&variant_files)
            .map(|f| file_entry(tmp, f))
            .collect::<Result<Vec<_>>>()?;
        let bundle = Bundle {
            format_version: FORMAT_VERSION,
            backend,
            precision,
            lora_strategy: default_strategy(backend, precision).into(),
            weight_hash,
            lora_targets,
            files,
            dit_variants,
            producer: format!("v2l {}", env!("CARGO_PKG_VERSION")),
            accuracy,
            calibration: calibration_record,
            bundle_hash: String::new(),
        };
        let bundle = Bundle {
            bundle_hash: bundle.self_hash()?,
            ..bundle
        };
        let text = serde_json::to_string_pretty(&bundle).map_err(|e| RuntimeError::Invalid {
            what: FILE_NAME.into(),
            message: e.to_string(),
        })?;
        let p = tmp.join(FILE_NAME);
        std::fs::write(&p, text + "\n").map_err(io(&p))?;
        Ok(bundle)
    })
}

/// What a CPU can check of the DiT graphs a TensorRT engine is built from
/// (`v2l_graphs::check`): standard ops, LoRA targets read directly by their Gemm, stored in the
/// type the target table gives (f32 for integer engines' f32 graphs, and where the `bound`
/// variant takes them as inputs), consistent types.
fn check_tensorrt_graphs(
    dir: &Path,
    export_file: &str,
    variants: &std::collections::BTreeMap<String, String>,
    precision: Precision,
    targets: &[LoraTarget],
) -> Result<()> {
    use v2l_graphs::DType;
    let stored = |t: &LoraTarget| DType::parse(&t.dtype).filter(|d| d.is_float());
    let fp32 = (precision == Precision::Fp32).then_some(("fp32", export_file));
    for (variant, file) in variants
        .iter()
        .map(|(v, f)| (v.as_str(), f.as_str()))
        .chain(fp32)
    {
        let path = dir.join(file);
        let model = v2l_graphs::read_model(&path).map_err(io(&path))?;
        let targets: Vec<(String, DType)> = targets
            .iter()
            .map(|t| {
                let d = match variant {
                    "bound" => DType::F32,
                    _ => stored(t).unwrap_or(DType::F32),
                };
                (t.initializer.clone(), d)
            })
            .collect();
        let problems = v2l_graphs::check::tensorrt_problems(&model, &targets);
        if !problems.is_empty() {
            return Err(RuntimeError::Invalid {
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
        how: v2l_graphs::passes::WeightQuant,
        weights: Vec<String>,
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
            LowWeights::Quantized {
                how,
                weights,
                tensors,
            } => use_quantized_weights(model, weights, tensors, *how),
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
fn qdq_form(backend: Backend) -> v2l_calibration::QdqForm {
    match backend {
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
        .filter(|t| t.dtype == crate::lora::apply::Stored::Qdq.name())
        .map(|t| t.initializer.clone())
        .collect();
    let mut observed = base.clone();
    let pairs =
        v2l_calibration::observe_linear_inputs(&mut observed, &weights).map_err(|source| {
            RuntimeError::GraphPass {
                path: src.into(),
                source,
            }
        })?;
    // Beside the export's graph, so its external weights resolve; removed when done.
    let path = dir.join("dit_calibrating.onnx");
    v2l_graphs::write_model(&path, &observed).map_err(|source| RuntimeError::GraphWrite {
        path: path.clone(),
        source,
    })?;
    let record = crate::calibrate::input_scales(&dit.config, &path, &pairs, how);
    std::fs::remove_file(&path).map_err(io(&path))?;
    record
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
) -> std::result::Result<LowWeights, v2l_graphs::passes::PassError> {
    use v2l_graphs::{passes, DType};
    let dtype = match precision {
        Precision::Int8 | Precision::Int4 => {
            let how = precision
                .weight_quant()
                .ok_or_else(|| passes::PassError::Unsupported(precision.name().into()))?;
            let weights: Vec<String> = targets
                .iter()
                .filter(|t| t.dtype == how.name())
                .map(|t| t.initializer.clone())
                .collect();
            let q = passes::quantize_linears(model, src, &weights, data, how)?;
            return Ok(LowWeights::Quantized {
                how,
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
    };
    let l = passes::lower_precision(model, src, passes::WeightFile::Write(data), how)?;
    Ok(LowWeights::Float(how, l.tensors))
}

/// The LoRA strategy a backend uses by default (README: "LoRA strategies").
///
/// CPU: `bound`. Measured on the tiny model (`v2l-bench pipeline`): switching costs a fuse of the
/// touched layers (~0.8 ms) instead of a session build (~36 ms for `fused`), and DiT steps ran
/// no slower than with fused initializers (ORT does not prepack initializers supplied from
/// outside the model either). `unfused` switches fastest but pays a branch per layer each step.
///
/// int8: `unfused`: the LoRA is an f32 low-rank branch beside the int8 weights, exact in the
/// LoRA and switched by copying its factors; `fused` (re-quantising `W + s·B·A` from the f32
/// base) is the other choice, measured in README "Precision".
pub fn default_strategy(backend: Backend, precision: Precision) -> &'static str {
    match (backend, precision) {
        (_, Precision::Int8 | Precision::Int4) => "unfused",
        (_, Precision::Fp16 | Precision::Bf16) => "fused",
        // Same mechanism on CUDA; not yet measured on a GPU.
        (Backend::Cpu | Backend::Cuda, _) => "bound",
        // One engine per LoRA, its cache keyed by the hash of its fused weights (refitting a
        // weight-stripped engine in place is not written yet; not run on a GPU).
        (Backend::TensorRt, _) => "fused",
    }
}

/// Whether an int8/int4 engine quantises the DiT weight `name`: the token-wise linears
/// (attention projections, feed-forward, text projection) are; kept f32 are the layers on the
/// conditioning path, which run on one row per sample and whose error scales every token (time
/// embedding, the adaptive norms' `norm*.linear`), and the output projection `proj_out`, whose
/// error reaches the prediction with no residual to dilute it. On the tiny fixture DiT, int8
/// everywhere is 1.1e-2 from f32 (`proj_out` alone 1.0e-2); token-wise only, 3.1e-3. The kept
/// layers are ~12 % of a CogVideoX-5B block's weights and a negligible share of its FLOPs.
pub fn quantises(name: &str) -> bool {
    let module = name.strip_suffix(".weight").unwrap_or(name);
    let mut parts = module.rsplit('.');
    let (last, parent) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let conditioning =
        module.starts_with("time_embedding.") || (last == "linear" && parent.starts_with("norm"));
    !(conditioning || module == "proj_out")
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
    Err(RuntimeError::Invalid {
        what: format!("--precision {}", precision.name()),
        message: why.into(),
    })
}

/// Reads and checks `dir/bundle.json`: format version, then every file's size and hash.
/// `Ok(None)` for a plain export directory (no bundle).
pub fn verify(dir: &Path) -> Result<Option<Bundle>> {
    let path = dir.join(FILE_NAME);
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).map_err(io(&path))?;
    let bundle = Bundle::parse(&text, &path)?;
    let bad = |m: String| RuntimeError::BadFile {
        path: path.clone(),
        message: m,
    };
    for f in &bundle.files {
        let p: PathBuf = dir.join(&f.name);
        let got =
            file_entry(dir, &f.name).map_err(|_| bad(format!("part `{}` is missing", f.name)))?;
        if got.bytes != f.bytes || got.hash != f.hash {
            return Err(RuntimeError::BadFile {
                path: p,
                message: "does not match the engine bundle it belongs to (modified or from another model); compile again".into(),
            });
        }
    }
    Ok(Some(bundle))
}

impl Bundle {
    /// Parses `bundle.json` text (`path` names it in errors): format version, fields, its own
    /// hash, and part names that stay inside the engine directory. Untrusted input: fuzzed
    /// (`fuzz/fuzz_targets/bundle_json.rs`).
    pub fn parse(text: &str, path: &Path) -> Result<Bundle> {
        let bad = |m: String| RuntimeError::BadFile {
            path: path.into(),
            message: m,
        };
        let version: serde_json::Value =
            serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        let v = version
            .get("format_version")
            .and_then(|v| v.as_u64())
            .unwrap_or(0);
        if v != FORMAT_VERSION as u64 {
            return Err(bad(format!(
                "bundle format version {v}; this v2l reads {FORMAT_VERSION}: compile the engine again"
            )));
        }
        let bundle: Bundle = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        if bundle.self_hash()? != bundle.bundle_hash {
            return Err(bad(
                "was edited after `v2l-compile` wrote it (its recorded hash does not match); compile the engine again".into(),
            ));
        }
        for f in &bundle.files {
            let p = Path::new(&f.name);
            let plain = p
                .components()
                .all(|c| matches!(c, std::path::Component::Normal(_)));
            if f.name.is_empty() || !plain {
                return Err(bad(format!(
                    "part `{}` is not a file name inside the engine directory",
                    f.name
                )));
            }
        }
        Ok(bundle)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int8_quantises_token_wise_linears_only() {
        for (name, int8) in [
            ("transformer_blocks.3.attn1.to_q.weight", true),
            ("transformer_blocks.3.attn1.to_out.0.weight", true),
            ("transformer_blocks.3.ff.net.0.proj.weight", true),
            ("transformer_blocks.3.ff.net.2.weight", true),
            ("patch_embed.text_proj.weight", true),
            ("time_embedding.linear_1.weight", false),
            ("transformer_blocks.3.norm1.linear.weight", false),
            ("transformer_blocks.3.norm2.linear.weight", false),
            ("norm_out.linear.weight", false),
            ("proj_out.weight", false),
        ] {
            assert_eq!(quantises(name), int8, "{name}");
        }
    }

    /// The record's own hash survives a write and a read: floats round-trip exactly (serde_json's
    /// default float parser can be off by one ulp; 0.0025133703820537446 was).
    #[test]
    fn a_written_record_parses_back_with_its_hash() {
        let mut b = Bundle {
            format_version: FORMAT_VERSION,
            backend: Backend::Cpu,
            precision: Precision::Bf16,
            lora_strategy: "fused".into(),
            weight_hash: "h".into(),
            lora_targets: vec![],
            files: vec![],
            dit_variants: Default::default(),
            producer: "v2l test".into(),
            accuracy: vec![crate::accuracy::StageAccuracy {
                stage: "dit".into(),
                rel_l2: 0.0025133703820537446,
                inputs: "x".into(),
                psnr_db: Some(41.25),
            }],
            calibration: None,
            bundle_hash: String::new(),
        };
        b.bundle_hash = b.self_hash().unwrap();
        let text = serde_json::to_string_pretty(&b).unwrap();
        assert_eq!(Bundle::parse(&text, Path::new("bundle.json")).unwrap(), b);
    }

    #[test]
    fn big_files_are_hashed_by_samples_that_see_swaps_and_truncation() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("w.data");
        let bytes: Vec<u8> = (0..100_000u32).flat_map(|v| v.to_le_bytes()).collect();
        std::fs::write(&p, &bytes).unwrap();
        let hash = |p: &Path| file_hash_with(p, 1000, 8, 64).unwrap();
        let (n, h) = hash(&p);
        assert_eq!(n, bytes.len() as u64);
        assert!(h.starts_with("sampled:"), "{h}");
        // The first and last blocks are sampled; a truncated file changes the length.
        for (at, len) in [
            (0, bytes.len()),
            (bytes.len() - 1, bytes.len()),
            (0, bytes.len() - 4),
        ] {
            let mut b = bytes[..len].to_vec();
            b[at.min(len - 1)] ^= 1;
            std::fs::write(&p, &b).unwrap();
            assert_ne!(hash(&p).1, h, "change at {at}, length {len}");
        }
        // Small files are hashed whole: any byte counts.
        let (_, small) = file_hash_with(&p, u64::MAX, 8, 64).unwrap();
        assert!(!small.starts_with("sampled:"));
    }
}
