//! The engine bundle record, `bundle.json`: what `v2l-compile` writes and every loader checks.
//!
//! A bundle is a directory: the export's graphs and manifest plus `bundle.json`, which records
//! the backend and precision, the LoRA strategy, the LoRA target table (initializer, shape,
//! how it is stored), a hash of the base weights the targets start from, and the size and hash
//! of every file. [`verify`] re-checks all of it on load (big files by sampled blocks, see
//! `file_hash`) and refuses a mismatched or modified part, or an engine whose record is gone.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a bundle record cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    BadFile { path: PathBuf, message: String },
}

type Result<T> = std::result::Result<T, BundleError>;

/// Where a model runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    #[default]
    Cpu,
    Cuda,
    TensorRt,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Cpu => "cpu",
            Backend::Cuda => "cuda",
            Backend::TensorRt => "tensorrt",
        }
    }
}

/// A VAE's encoder and decoder graph files.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VaeGraphs {
    pub encoder: String,
    pub decoder: String,
}

/// Which kernel the DiT graphs' attention runs on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Attention {
    /// ONNX Runtime's own: `com.microsoft.MultiHeadAttention` (f32) on ONNX Runtime backends,
    /// the plain pattern TensorRT fuses.
    #[default]
    Ort,
    /// v2l's `ai.v2l.Attention` (CPU engines below fp32): bf16 products on AVX512-BF16, f32 on
    /// CPUs without it.
    Bf16,
    /// v2l's `ai.v2l.Attention` asked for int8 scores (`v2l-compile --attention int8`): q·kᵀ in
    /// int8 on AVX512-VNNI, p·v in bf16; the bf16 kernel on CPUs with AVX512-BF16 but no VNNI,
    /// ONNX Runtime's on CPUs with neither.
    Int8,
}

impl Attention {
    pub fn name(self) -> &'static str {
        match self {
            Attention::Ort => "ort",
            Attention::Bf16 => "bf16",
            Attention::Int8 => "int8",
        }
    }

    fn is_ort(&self) -> bool {
        *self == Attention::Ort
    }
}

/// Numeric precision of an engine.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    Fp32,
    Fp16,
    Bf16,
    Int8,
    Int4,
}

impl Precision {
    pub fn name(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Fp16 => "fp16",
            Precision::Bf16 => "bf16",
            Precision::Int8 => "int8",
            Precision::Int4 => "int4",
        }
    }
}

/// How a LoRA reaches the DiT's weights (docs/usage.md, "LoRA strategies").
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    #[default]
    Fused,
    Bound,
    Unfused,
}

impl Strategy {
    pub fn name(self) -> &'static str {
        match self {
            Strategy::Fused => "fused",
            Strategy::Bound => "bound",
            Strategy::Unfused => "unfused",
        }
    }

    pub fn parse(s: &str) -> Option<Strategy> {
        [Strategy::Fused, Strategy::Bound, Strategy::Unfused]
            .into_iter()
            .find(|x| x.name() == s)
    }
}

pub const FILE_NAME: &str = "bundle.json";

/// Files `v2l-compile` writes and `v2l-export` never does: their presence marks a compiled
/// engine, which must have its [`FILE_NAME`].
pub const COMPILED_ONLY: [&str; 2] = ["dit_bound.onnx", "dit_unfused.onnx"];
/// 2: BLAKE3 hashes; backend rewrites (attention fusion) in the bundle's DiT graphs.
/// 3: `dit_unfused.onnx` takes LoRA factors per sample (`A [samples, r, in]`, `B [samples, out,
/// r]`, `scale [samples, 1, 1]`); `max_rank`. A version-2 engine's 2-D factors would be refused
/// by ONNX Runtime at the first run, so it is refused at open instead.
pub const FORMAT_VERSION: u32 = 3;

/// One file of a bundle: its name inside the engine directory, size and hash.
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
    /// How the engine stores it (`f32`, `bf16`, `u8`, `qdq`, …).
    pub dtype: crate::dtype::Stored,
}

/// `bundle.json`: what an engine was compiled as, and the hashes that prove its parts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Bundle {
    pub format_version: u32,
    pub backend: Backend,
    pub precision: Precision,
    /// How a LoRA reaches the weights on this backend (docs/usage.md, "LoRA strategies").
    pub lora_strategy: Strategy,
    /// Hash of the DiT's LoRA-targetable base weights (keys engine caches; checks LoRA bases).
    pub weight_hash: String,
    pub lora_targets: Vec<LoraTarget>,
    pub files: Vec<BundleFile>,
    /// DiT graph variants for the LoRA strategies that keep one session: `bound` (targeted
    /// weights are also inputs) and `unfused` (a low-rank branch per targeted layer).
    #[serde(default)]
    pub dit_variants: DitVariants,
    /// `unfused`: the largest rank of a LoRA (`v2l-compile --max-rank`), which sessions needing
    /// one factor shape (TensorRT, CUDA graphs) pad every LoRA to; `None` on the CPU, where
    /// factors keep their own rank.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_rank: Option<usize>,
    /// The DiT's attention kernel (`v2l-compile --attention`).
    #[serde(default, skip_serializing_if = "Attention::is_ort")]
    pub attention: Attention,
    pub producer: String,
    /// Below fp32: each changed stage's relative L2 against the fp32 graph, measured at compile
    /// time on generated inputs (the compile layer's `accuracy`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub accuracy: Vec<StageAccuracy>,
    /// int8 CPU engines: how their integer GEMMs stay exact (`None` before the field existed:
    /// s8 weights, as [`Int8Scheme::U8S8`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub int8_scheme: Option<Int8Scheme>,
    /// int8 CPU engines with s8 weights: the DiT's dynamic int8 linears call v2l's
    /// `ai.v2l.QMatMul` (AVX512-VNNI) instead of ONNX Runtime's `DynamicQuantizeMatMul`;
    /// the `.ort` twins keep ONNX Runtime's.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub v2l_int8_gemm: bool,
    /// The pipeline the engine deploys ([`crate::PipelineKind`], from its manifest); `None`
    /// for engines compiled before it was recorded (and DiT-less bundles).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipeline: Option<crate::PipelineKind>,
    /// Static int8: how the activation ranges were calibrated, and the scales.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibration: Option<CalibrationRecord>,
    /// The VAE's graphs on v2l's bf16 convolution (`v2l-compile --vae-conv bf16`, the default
    /// for CPU engines below fp32); CPUs without AVX512-BF16 load the manifest's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vae_bf16: Option<VaeGraphs>,
    /// GPU engines below fp32: the VAE's graphs in the engine's precision (`<graph>_fp16.onnx`,
    /// `<graph>_bf16.onnx`, bf16 at opset 22 for CUDA's bf16 `Conv`), run instead of the
    /// manifest's f32 ones; cuda engines at fp32: the manifest's with their GroupNorms
    /// rewritten (`<graph>_cuda.onnx`, since 2026-11-27).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vae_lowered: Option<VaeGraphs>,
    /// CUDA engines: fp32 convolutions and matrix products may run in TF32 (`v2l-compile
    /// --tf32`). Off by default, so an fp32 engine computes in fp32, as PyTorch does with TF32
    /// off; ONNX Runtime's CUDA provider would otherwise use TF32 on its own.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tf32: bool,
    /// CUDA engines: the CUDA provider's kernel choices (`v2l-compile --cuda-option`, e.g.
    /// `cudnn_conv_algo_search=HEURISTIC`); ONNX Runtime's defaults for the keys not set.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub cuda_options: BTreeMap<String, String>,
    /// Written by `v2l-compile` before 2026-11-27 for CUDA engines with a fused RoPE, as a
    /// limit of 65,535 tokens a DiT call, read from an ONNX Runtime kernel older than the ones
    /// v2l loads (its `RotaryEmbedding` takes more since 1.18). Neither written nor read now:
    /// kept so that those engines' records still hash as they were written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_max_tokens: Option<usize>,
    /// BLAKE3 of this record with this field empty: an edit to `bundle.json` itself (strategy,
    /// weight hash, target table) is caught like an edit to any other part.
    #[serde(default)]
    pub bundle_hash: String,
}

impl Bundle {
    /// BLAKE3 of this record with `bundle_hash` empty: what `bundle_hash` must hold.
    pub fn self_hash(&self) -> Result<String> {
        let mut b = self.clone();
        b.bundle_hash.clear();
        let text = serde_json::to_string(&b).map_err(|e| BundleError::BadFile {
            path: FILE_NAME.into(),
            message: e.to_string(),
        })?;
        Ok(blake3::hash(text.as_bytes()).to_hex().to_string())
    }
}

/// The error of an I/O failure on `path`.
pub fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BundleError + '_ {
    move |source| BundleError::Io {
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
    // A part that is a device or a FIFO is refused before it is opened (`/dev/zero` would be
    // hashed forever, a FIFO's open would block), and a regular one is read to the length it
    // had when opened.
    let (f, len) = crate::input::open_regular(path)?;
    Ok((len, hash_open(f, len, full_max, samples, sample_bytes)?))
}

/// The hash of an open file of `len` bytes, reading at most `len` of them (see [`file_hash`]).
fn hash_open(
    mut f: std::fs::File,
    len: u64,
    full_max: u64,
    samples: u64,
    sample_bytes: u64,
) -> std::io::Result<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut h = blake3::Hasher::new();
    if len <= full_max.max(sample_bytes * samples) {
        let n = std::io::copy(&mut (&mut f).take(len), &mut h)?;
        if n != len {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("shrank from {len} to {n} bytes while it was read"),
            ));
        }
        return Ok(h.finalize().to_hex().to_string());
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
    Ok(format!("sampled:{}", h.finalize().to_hex()))
}

/// Size and hash of `dir/name`, streamed (never the whole file in memory).
pub fn file_entry(dir: &Path, name: &str) -> Result<BundleFile> {
    let path = dir.join(name);
    let (bytes, hash) = file_hash(&path).map_err(io(&path))?;
    Ok(BundleFile {
        name: name.into(),
        bytes,
        hash,
    })
}

/// What a part whose size or hash differs from its record is told.
const PART_MISMATCH: &str = "does not match the engine bundle it belongs to (modified or from another model); compile again";

/// Reads and checks `dir/bundle.json`: format version, then every file's size and hash.
/// `Ok(None)` for a plain export directory (no bundle).
pub fn verify(dir: &Path) -> Result<Option<Bundle>> {
    let path = dir.join(FILE_NAME);
    if !path.exists() {
        // Files only `v2l-compile` writes: a compiled engine must keep its record, or every
        // hash check would be silently off.
        if let Some(f) = COMPILED_ONLY.iter().find(|f| dir.join(f).exists()) {
            return Err(BundleError::BadFile {
                path,
                message: format!(
                    "is missing, but the directory is a compiled engine (it holds {f}); without its record no part can be checked: compile the engine again"
                ),
            });
        }
        return Ok(None);
    }
    let text =
        crate::input::read_text(&path, crate::input::InputKind::Record).map_err(io(&path))?;
    let bundle = Bundle::parse(&text, &path)?;
    let bad = |m: String| BundleError::BadFile {
        path: path.clone(),
        message: m,
    };
    let root = std::fs::canonicalize(dir).map_err(io(dir))?;
    for f in &bundle.files {
        let p: PathBuf = dir.join(&f.name);
        // A part that is a link out of the engine directory is refused, whatever it holds.
        if let Ok(real) = std::fs::canonicalize(&p) {
            if !real.starts_with(&root) {
                return Err(bad(format!(
                    "part `{}` leads outside the engine directory (to {})",
                    f.name,
                    real.display()
                )));
            }
        }
        let mismatch = || BundleError::BadFile {
            path: p.clone(),
            message: PART_MISMATCH.into(),
        };
        // The record's size bounds the hash: a part of another length is refused from its
        // metadata, before a byte of it is read.
        let (file, len) = crate::input::open_regular(&p).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => bad(format!("part `{}` is missing", f.name)),
            _ => bad(format!("part `{}`: {source}", f.name)),
        })?;
        if len != f.bytes {
            return Err(mismatch());
        }
        let hash = hash_open(file, len, FULL_HASH_MAX, SAMPLES, SAMPLE_BYTES)
            .map_err(|source| bad(format!("part `{}`: {source}", f.name)))?;
        if hash != f.hash {
            return Err(mismatch());
        }
    }
    Ok(Some(bundle))
}

impl Bundle {
    /// Parses `bundle.json` text (`path` names it in errors): format version, fields, its own
    /// hash, and part names that stay inside the engine directory. Untrusted input: fuzzed
    /// (`fuzz/fuzz_targets/bundle_json.rs`).
    pub fn parse(text: &str, path: &Path) -> Result<Bundle> {
        let bad = |m: String| BundleError::BadFile {
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
            if !crate::input::is_part_name(&f.name) {
                return Err(bad(format!(
                    "part `{}` is not a file name inside the engine directory",
                    f.name
                )));
            }
        }
        // A graph variant is loaded by name: it must be one of the hashed parts.
        for (variant, name) in bundle.dit_variants.iter() {
            if !bundle.files.iter().any(|f| f.name == name) {
                return Err(bad(format!(
                    "DiT variant `{variant}` names `{name}`, which is not one of the engine's hashed parts"
                )));
            }
        }
        Ok(bundle)
    }

    /// Checks that every path of the engine's manifest (`parts`, [`crate::Manifest::parts`])
    /// is one of this bundle's hashed files (a directory: holds one, and nothing that is not
    /// one), so nothing an engine loads escapes the hash check.
    pub fn check_parts_listed(&self, parts: &[(&str, &str)], path: &Path) -> Result<()> {
        for (field, name) in parts {
            let dir = format!("{name}/");
            let listed = self
                .files
                .iter()
                .any(|f| f.name == *name || f.name.starts_with(&dir));
            if !listed {
                return Err(BundleError::BadFile {
                    path: path.into(),
                    message: format!(
                        "the manifest's `{field}` names `{name}`, which is not one of the engine's hashed parts; compile the engine again"
                    ),
                });
            }
            // A directory part (the tokenizer's) holds hashed files only: a reader that looks
            // for an optional file there (`tokenizer.json`) must not find one that escaped the
            // hash check.
            let on_disk = path.parent().map(|engine| engine.join(name));
            if let Some(Ok(entries)) = on_disk.filter(|d| d.is_dir()).map(std::fs::read_dir) {
                for entry in entries.flatten() {
                    let file = format!("{dir}{}", entry.file_name().to_string_lossy());
                    if !self.files.iter().any(|f| f.name == file) {
                        return Err(BundleError::BadFile {
                            path: path.into(),
                            message: format!(
                                "`{file}` is in the part directory `{name}` but is not one of the engine's hashed parts; remove it, or compile the engine again"
                            ),
                        });
                    }
                }
            }
        }
        Ok(())
    }
}

/// One stage's distance from fp32.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StageAccuracy {
    pub stage: String,
    /// Relative L2 of this engine's output against the fp32 graph's on the same inputs.
    pub rel_l2: f64,
    /// For generated frames: PSNR (dB, peak 1) against the fp32 engine's frames.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub psnr_db: Option<f64>,
    /// What it ran on, in words (sizes, seed).
    pub inputs: String,
    /// The CPU it was measured on: the same engine takes other kernels on another CPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine: Option<Machine>,
}

/// A CPU, as recorded beside a figure: its model name and the ISA flags that choose kernels
/// (`/proc/cpuinfo` names: `avx2`, `avx512_vnni`, `avx512_bf16`, `amx_int8`, ...).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Machine {
    pub cpu: String,
    pub isa: Vec<String>,
}

/// How an int8 CPU engine keeps its integer products exact on every x86-64 CPU
/// (docs/precision.md, "int8 on every CPU").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Int8Scheme {
    /// Weights symmetric per output channel over the full ±127 range, stored as u8 with zero
    /// point 128; activations u8. ONNX Runtime multiplies them with its u8·u8 kernel (int32
    /// pair sums) on every CPU, never with its u8·s8 one, which saturates int16 pair sums on
    /// CPUs without VNNI (`v2l_runtime::cpu`).
    #[serde(rename = "u8u8")]
    U8U8,
    /// The same codes stored as s8 (zero point 0): ONNX Runtime's u8·s8 kernel, 2.3× faster
    /// than u8·u8 on AVX512-VNNI, exact only where that kernel sums in int32 (AVX512-VNNI,
    /// AVX-VNNI, AMX). `v2l-compile --int8-gemm u8s8`; the runtime refuses such an engine on
    /// any other CPU. An int8 CPU engine without this field (compiled before it) is this.
    #[serde(rename = "u8s8")]
    U8S8,
}

impl Int8Scheme {
    pub fn name(self) -> &'static str {
        match self {
            Int8Scheme::U8U8 => "u8u8",
            Int8Scheme::U8S8 => "u8s8",
        }
    }
}

/// What `bundle.json` records of a calibration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CalibrationRecord {
    pub method: String,
    pub samples: usize,
    /// The samples' directory, or `generated`.
    pub source: String,
    /// Activation scale of each quantised linear, by weight (headroom included).
    pub input_scales: BTreeMap<String, f32>,
    /// The factor the calibrated range of an attention output projection's input (`to_out`)
    /// was widened by: a LoRA on `to_v` moves that range directly, and clipping it was most of
    /// a LoRA's static-int8 error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_output_headroom: Option<f32>,
}

// DiT variants: the graphs an engine bundle holds beside the export's: one per precision
// below fp32 (`int8`), one per LoRA strategy that keeps a single session (`bound`,
// `unfused`), and, where the engine calls v2l's attention operator, each one's twin on ONNX
// Runtime's attention (`unfused.ort`) for CPUs without the kernel. Stored by those names.

/// What a variant graph computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum VariantGraph {
    /// The DiT at this precision (below fp32), LoRAs fused into its weights.
    Precision(Precision),
    /// The graph a LoRA strategy runs: `bound` (targeted weights are inputs) or `unfused` (a
    /// low-rank branch per targeted layer).
    Strategy(Strategy),
    /// A GPU engine's `bound` weights made on its device: each targeted weight plus a LoRA's
    /// low-rank product, `W + B·A`, from factors given as inputs (`lora_merge.onnx`).
    LoraMerge,
}

/// One variant: its graph, on v2l's attention operator or (`ort_twin`) on ONNX Runtime's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DitVariant {
    pub graph: VariantGraph,
    pub ort_twin: bool,
}

impl DitVariant {
    pub fn of(graph: VariantGraph) -> DitVariant {
        DitVariant {
            graph,
            ort_twin: false,
        }
    }

    /// This variant's twin on ONNX Runtime's attention.
    pub fn twin(self) -> DitVariant {
        DitVariant {
            ort_twin: true,
            ..self
        }
    }
}

impl fmt::Display for DitVariant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self.graph {
            VariantGraph::Precision(p) => p.name(),
            VariantGraph::Strategy(s) => s.name(),
            VariantGraph::LoraMerge => "lora_merge",
        };
        match self.ort_twin {
            true => write!(f, "{name}.ort"),
            false => f.write_str(name),
        }
    }
}

impl FromStr for DitVariant {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<DitVariant, String> {
        let (name, ort_twin) = match s.strip_suffix(".ort") {
            Some(n) => (n, true),
            None => (s, false),
        };
        let graph = match name {
            "bound" => VariantGraph::Strategy(Strategy::Bound),
            "unfused" => VariantGraph::Strategy(Strategy::Unfused),
            "lora_merge" => VariantGraph::LoraMerge,
            "fp16" => VariantGraph::Precision(Precision::Fp16),
            "bf16" => VariantGraph::Precision(Precision::Bf16),
            "int8" => VariantGraph::Precision(Precision::Int8),
            "int4" => VariantGraph::Precision(Precision::Int4),
            _ => {
                return Err(format!(
                    "unknown DiT variant `{s}`: expected a precision below fp32 (fp16, bf16, int8, int4) a strategy (bound, unfused) or lora_merge, optionally with `.ort`"
                ))
            }
        };
        Ok(DitVariant { graph, ort_twin })
    }
}

impl Serialize for DitVariant {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for DitVariant {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<DitVariant, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The bundle's variant graphs: variant → file name (one of the bundle's hashed parts).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DitVariants(BTreeMap<DitVariant, String>);

impl DitVariants {
    pub fn insert(&mut self, variant: DitVariant, file: impl Into<String>) {
        self.0.insert(variant, file.into());
    }

    /// The file of `variant`.
    pub fn get(&self, variant: DitVariant) -> Option<&str> {
        self.0.get(&variant).map(String::as_str)
    }

    /// The file of `graph` on v2l's attention (`ort_twin` false) or ONNX Runtime's.
    pub fn file(&self, graph: VariantGraph, ort_twin: bool) -> Option<&str> {
        self.get(DitVariant { graph, ort_twin })
    }

    /// Whether the bundle holds `graph` (on either attention).
    pub fn has(&self, graph: VariantGraph) -> bool {
        self.0.keys().any(|v| v.graph == graph)
    }

    /// Whether the bundle holds ONNX Runtime attention twins.
    pub fn has_ort_twins(&self) -> bool {
        self.0.keys().any(|v| v.ort_twin)
    }

    pub fn iter(&self) -> impl Iterator<Item = (DitVariant, &str)> {
        self.0.iter().map(|(v, f)| (*v, f.as_str()))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod variant_tests {
    use super::*;

    #[test]
    fn variants_are_stored_by_their_names() {
        for name in [
            "int8",
            "bf16",
            "unfused",
            "bound",
            "unfused.ort",
            "int8.ort",
        ] {
            let v: DitVariant = name.parse().expect("a known variant");
            assert_eq!(v.to_string(), name);
        }
        for bad in ["fused", "fp32", "unfused.trt", "", "../x.onnx"] {
            assert!(bad.parse::<DitVariant>().is_err(), "{bad}");
        }
        let mut vs = DitVariants::default();
        let unfused = VariantGraph::Strategy(Strategy::Unfused);
        vs.insert(DitVariant::of(unfused), "dit_unfused.onnx");
        vs.insert(DitVariant::of(unfused).twin(), "dit_unfused_ort.onnx");
        let json = serde_json::to_string(&vs).expect("serialises");
        assert_eq!(
            json,
            r#"{"unfused":"dit_unfused.onnx","unfused.ort":"dit_unfused_ort.onnx"}"#
        );
        let back: DitVariants = serde_json::from_str(&json).expect("parses");
        assert_eq!(back, vs);
        assert_eq!(back.file(unfused, true), Some("dit_unfused_ort.onnx"));
        assert!(back.has_ort_twins() && back.has(unfused));
        let err = serde_json::from_str::<DitVariants>(r#"{"fast":"x.onnx"}"#).unwrap_err();
        assert!(
            err.to_string().contains("unknown DiT variant `fast`"),
            "{err}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The record's own hash survives a write and a read: floats round-trip exactly (serde_json's
    /// default float parser can be off by one ulp; 0.0025133703820537446 was).
    #[test]
    fn a_written_record_parses_back_with_its_hash() {
        let mut b = Bundle {
            format_version: FORMAT_VERSION,
            backend: Backend::Cpu,
            precision: Precision::Bf16,
            lora_strategy: Strategy::Fused,
            weight_hash: "h".into(),
            lora_targets: vec![],
            files: vec![],
            dit_variants: Default::default(),
            max_rank: None,
            attention: Attention::Bf16,
            producer: "v2l test".into(),
            accuracy: vec![StageAccuracy {
                stage: "dit".into(),
                rel_l2: 0.0025133703820537446,
                inputs: "x".into(),
                psnr_db: Some(41.25),
                machine: Some(Machine {
                    cpu: "AMD EPYC".into(),
                    isa: vec!["avx2".into(), "avx512_vnni".into()],
                }),
            }],
            int8_scheme: Some(Int8Scheme::U8U8),
            v2l_int8_gemm: false,
            calibration: None,
            pipeline: None,
            vae_bf16: None,
            vae_lowered: None,
            tf32: false,
            cuda_options: BTreeMap::new(),
            rope_max_tokens: None,
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
