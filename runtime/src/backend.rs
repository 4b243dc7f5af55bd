//! Execution backends: ONNX Runtime's CPU provider (runs here), CUDA (first run on an H100 on
//! 2026-11-26, `docs/benchmarks.md`) and TensorRT (built and unit-tested for its option
//! plumbing; **not yet run**: TensorRT cannot be installed from PyPI).
//!
//! Two traps this module exists for:
//! - ORT's TensorRT engine cache key ignores initializer values, so a cached engine silently
//!   keeps old weights. v2l keys the cache directory by the hash of the weights the engine was
//!   built from ([`BackendOptions::trt_cache_prefix`]).
//! - ORT falls back to the CPU quietly when a provider fails to register. v2l registers GPU
//!   providers with `error_on_failure`, so a missing CUDA/TensorRT library is an error.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use v2l_contracts::bundle::{Backend, Precision};

/// How the DiT's quantised linears are stored, for the integer precisions; int8 as `scheme`
/// says (u8 codes for `u8u8`, s8 for `u8s8`).
pub fn weight_quant(
    p: Precision,
    scheme: crate::bundle::Int8Scheme,
) -> Option<v2l_graphs::passes::WeightQuant> {
    use crate::bundle::Int8Scheme;
    use v2l_graphs::passes::WeightQuant;
    match p {
        Precision::Int8 => Some(match scheme {
            Int8Scheme::U8U8 => WeightQuant::Int8U8,
            Int8Scheme::U8S8 => WeightQuant::Int8,
        }),
        Precision::Int4 => Some(WeightQuant::Int4),
        _ => None,
    }
}

/// Whether the loaded ONNX Runtime library was built with this backend's provider (the
/// CPU wheel has neither CUDA nor TensorRT; `onnxruntime-gpu` has both). Built in is not
/// usable: registration still needs the GPU and its libraries.
pub fn built_into_onnxruntime(backend: Backend) -> crate::Result<bool> {
    use ort::ep::ExecutionProvider;
    crate::ort_env::init()?;
    let available = match backend {
        Backend::Cpu => return Ok(true),
        Backend::Cuda => ort::ep::CUDA::is_available(),
        Backend::TensorRt => ort::ep::TensorRT::is_available(),
    };
    available.map_err(|e| crate::RuntimeError::Invalid {
        what: "ONNX Runtime".into(),
        message: format!("cannot list its execution providers: {e}"),
    })
}

/// Backend settings of a session.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BackendOptions {
    pub backend: Backend,
    pub device_id: i32,
    /// TensorRT engine cache directory (one subdirectory per weight hash).
    pub trt_cache_dir: Option<PathBuf>,
    /// Hash of the weights the session is built from (base weights, or base + LoRA).
    pub weight_hash: String,
    /// TensorRT optimisation profile: each dynamic input's smallest, typical and largest shape
    /// (the unfused DiT: the batch axis and the LoRA factors at the engine's `--max-rank`).
    #[serde(default)]
    pub trt_profile: Vec<TrtProfile>,
    /// Let the CUDA provider run fp32 convolutions and matrix products in TF32 (the engine's
    /// `bundle.json` `tf32`). Off: fp32 means fp32.
    #[serde(default)]
    pub tf32: bool,
    /// CUDA provider settings ([`check_cuda_option`]): the engine's `bundle.json`
    /// `cuda_options`, then `V2L_CUDA_OPTIONS` ([`cuda_options_from_env`]) over them.
    #[serde(default)]
    pub cuda: std::collections::BTreeMap<String, String>,
}

/// The CUDA provider settings v2l passes through, with the values each takes. They choose
/// kernels, not numbers' meaning, except `sdpa_kernel` (which attention kernels
/// `MultiHeadAttention` may pick: a bit set of flash 1, memory-efficient 2, TensorRT fused 4,
/// cuDNN flash 8, math 16, …; 0 lets ONNX Runtime choose). `use_tf32` has its own switch
/// (`--tf32`) and `device_id` is the session's. `enable_cuda_graph=1` captures each session's
/// runs as CUDA graphs, one per set of input shapes, and turns on the bound runs that need
/// ([`crate::SessionOptions::bound_runs`]). `fuse_conv_bias=1` adds a convolution's bias in
/// cuDNN's plan, where it is otherwise a `cudnnAddTensor` after it (never tried by ONNX
/// Runtime's own tests on bf16 5-D tensors, which a bf16 engine's VAE has).
const CUDA_OPTIONS: [(&str, &[&str]); 9] = [
    (
        "cudnn_conv_algo_search",
        &["EXHAUSTIVE", "HEURISTIC", "DEFAULT"],
    ),
    ("cudnn_conv_use_max_workspace", &["0", "1"]),
    ("cudnn_conv1d_pad_to_nc1d", &["0", "1"]),
    ("prefer_nhwc", &["0", "1"]),
    ("enable_skip_layer_norm_strict_mode", &["0", "1"]),
    (
        "arena_extend_strategy",
        &["kNextPowerOfTwo", "kSameAsRequested"],
    ),
    ("sdpa_kernel", &[]),
    ("enable_cuda_graph", &["0", "1"]),
    ("fuse_conv_bias", &["0", "1"]),
];

/// Whether `key=value` is a CUDA provider setting v2l passes through; the reason when not.
pub fn check_cuda_option(key: &str, value: &str) -> std::result::Result<(), String> {
    let Some((_, values)) = CUDA_OPTIONS.iter().find(|(k, _)| *k == key) else {
        let known: Vec<&str> = CUDA_OPTIONS.iter().map(|(k, _)| *k).collect();
        let hint = match key {
            "use_tf32" => " (TF32 is `v2l-compile --tf32`)",
            _ => "",
        };
        return Err(format!(
            "`{key}` is not a CUDA provider setting v2l passes on{hint}; known: {}",
            known.join(", ")
        ));
    };
    let ok = if values.is_empty() {
        value.parse::<u32>().is_ok_and(|v| v < 1 << 10)
    } else {
        values.contains(&value)
    };
    if ok {
        Ok(())
    } else if values.is_empty() {
        Err(format!("`{key}` takes a bit set below 1024, not `{value}`"))
    } else {
        Err(format!(
            "`{key}` takes {}, not `{value}`",
            values.join(" or ")
        ))
    }
}

/// `KEY=VALUE[,KEY=VALUE…]`, each checked by [`check_cuda_option`].
pub fn parse_cuda_options(
    text: &str,
) -> std::result::Result<std::collections::BTreeMap<String, String>, String> {
    let mut out = std::collections::BTreeMap::new();
    for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (k, v) = item
            .split_once('=')
            .ok_or_else(|| format!("`{item}` is not KEY=VALUE"))?;
        let (k, v) = (k.trim(), v.trim());
        check_cuda_option(k, v)?;
        out.insert(k.to_string(), v.to_string());
    }
    Ok(out)
}

/// `V2L_CUDA_OPTIONS` (`KEY=VALUE,…`): CUDA provider settings for this process over each
/// engine's own, so the GPU check can try kernel choices without recompiling.
pub fn cuda_options_from_env() -> crate::Result<std::collections::BTreeMap<String, String>> {
    match std::env::var("V2L_CUDA_OPTIONS") {
        Ok(text) => parse_cuda_options(&text).map_err(|message| crate::RuntimeError::Invalid {
            what: "V2L_CUDA_OPTIONS".into(),
            message,
        }),
        Err(_) => Ok(Default::default()),
    }
}

/// One input's shapes in a TensorRT optimisation profile.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TrtProfile {
    pub input: String,
    pub min: Vec<usize>,
    pub opt: Vec<usize>,
    pub max: Vec<usize>,
}

/// ORT's profile option value: `name:2x16x64,other:1` (one of min, opt, max).
fn profile_shapes(profile: &[TrtProfile], pick: fn(&TrtProfile) -> &[usize]) -> String {
    profile
        .iter()
        .map(|p| {
            let dims: Vec<String> = pick(p).iter().map(|d| d.to_string()).collect();
            format!("{}:{}", p.input, dims.join("x"))
        })
        .collect::<Vec<_>>()
        .join(",")
}

impl BackendOptions {
    /// The engine-cache prefix for these weights: ORT's own key covers the graph, not the
    /// initializer values, so the weight hash must be part of the key.
    pub fn trt_cache_prefix(&self) -> String {
        format!("v2l_{}", self.weight_hash)
    }

    /// TensorRT provider options, as ORT option keys (kept as data so they can be tested here).
    ///
    /// fp32 engines (TensorRT 11 builds strongly typed networks: precision lives in the graph's
    /// types); weight-stripped engines cached per weight hash, which ORT refits at load from
    /// the ONNX file's own (identical) weights — a small cache, never a LoRA switch: LoRA
    /// factors are inputs (`unfused`), so a switch changes input buffers, not the engine. With
    /// a profile, the dynamic inputs' shape ranges.
    pub fn tensorrt_options(&self) -> Vec<(String, String)> {
        let mut o = vec![
            ("device_id".to_string(), self.device_id.to_string()),
            ("trt_engine_cache_enable".into(), "1".into()),
            ("trt_engine_cache_prefix".into(), self.trt_cache_prefix()),
            ("trt_weight_stripped_engine_enable".into(), "1".into()),
            ("trt_layer_norm_fp32_fallback".into(), "1".into()),
        ];
        if let Some(dir) = &self.trt_cache_dir {
            let d = dir.join(&self.weight_hash).display().to_string();
            o.push(("trt_engine_cache_path".into(), d.clone()));
            o.push(("trt_timing_cache_enable".into(), "1".into()));
            o.push(("trt_timing_cache_path".into(), dir.display().to_string()));
        }
        if !self.trt_profile.is_empty() {
            let p = &self.trt_profile;
            o.push((
                "trt_profile_min_shapes".into(),
                profile_shapes(p, |x| &x.min),
            ));
            o.push((
                "trt_profile_opt_shapes".into(),
                profile_shapes(p, |x| &x.opt),
            ));
            o.push((
                "trt_profile_max_shapes".into(),
                profile_shapes(p, |x| &x.max),
            ));
        }
        o
    }

    /// These options with `V2L_CUDA_OPTIONS` over a GPU engine's own CUDA settings: what this
    /// process's sessions run with.
    pub fn for_this_process(&self) -> crate::Result<BackendOptions> {
        let mut o = self.clone();
        if o.backend != Backend::Cpu {
            o.cuda.extend(cuda_options_from_env()?);
        }
        Ok(o)
    }

    /// Whether the CUDA provider captures CUDA graphs (`enable_cuda_graph=1`): a cuda
    /// engine's sessions then run through bound buffers.
    pub fn cuda_graph(&self) -> bool {
        self.backend == Backend::Cuda
            && self.cuda.get("enable_cuda_graph").is_some_and(|v| v == "1")
    }

    /// CUDA provider options. ONNX Runtime's CUDA provider runs fp32 convolutions and
    /// matrix products in TF32 unless `use_tf32` is 0: on the H100 that put the tiny fixture's
    /// fp32 frames 3.2e-3 from the CPU engine and the real VAE decode 2.1e-2 from PyTorch fp32.
    pub fn cuda_options(&self) -> Vec<(String, String)> {
        let mut o = vec![
            ("device_id".to_string(), self.device_id.to_string()),
            ("use_tf32".into(), u8::from(self.tf32).to_string()),
        ];
        // A TensorRT engine's CUDA provider takes the nodes TensorRT does not: it cannot
        // capture the run whole, and ONNX Runtime refuses the session if asked to.
        o.extend(
            self.cuda
                .iter()
                .filter(|(k, _)| self.backend == Backend::Cuda || *k != "enable_cuda_graph")
                .map(|(k, v)| (k.clone(), v.clone())),
        );
        o
    }

    /// The providers to register, in priority order (TensorRT falls back to CUDA for
    /// unsupported nodes, never silently to the CPU for the whole model).
    pub(crate) fn dispatch(&self) -> Vec<ort::ep::ExecutionProviderDispatch> {
        use ort::ep::ArbitrarilyConfigurableExecutionProvider;
        let cuda = || {
            self.cuda_options()
                .into_iter()
                .fold(ort::ep::CUDA::default(), |ep, (k, v)| {
                    ep.with_arbitrary_config(k, v)
                })
                .build()
                .error_on_failure()
        };
        match self.backend {
            // ORT's CPU arena keeps freed blocks for reuse, so later steps touch no fresh pages
            // (the kernel zeroing new pages was ~20 % of a step here). Without feed-forward
            // chunking it cost memory (5B block, 5,626 tokens: 2.8 GB against 1.9 GB); with it,
            // the same 2.2 GB and 2–3 s faster per step (docs/history/benchmarks-2026-11-22-to-26.md). The
            // session turns off ORT's memory pattern, which pre-plans one block per run.
            Backend::Cpu => vec![ort::ep::CPU::default().with_arena_allocator(true).build()],
            Backend::Cuda => vec![cuda()],
            Backend::TensorRt => vec![
                self.tensorrt_options()
                    .into_iter()
                    .fold(ort::ep::TensorRT::default(), |ep, (k, v)| {
                        ep.with_arbitrary_config(k, v)
                    })
                    .build()
                    .error_on_failure(),
                cuda(),
            ],
        }
    }
}

/// BLAKE3 of a sequence of byte strings, each length-prefixed (so `["ab","c"]` and
/// `["a","bc"]` differ), as 64 lowercase hex digits.
pub fn content_hash(parts: &[&[u8]]) -> String {
    let mut h = PartsHasher::default();
    for p in parts {
        h.part(p);
    }
    h.finish()
}

/// Streams parts into a [`content_hash`] without holding them all: one weight at a time.
#[derive(Default)]
pub struct PartsHasher(blake3::Hasher);

impl PartsHasher {
    pub fn part(&mut self, bytes: &[u8]) {
        self.0.update(&(bytes.len() as u64).to_le_bytes());
        self.0.update(bytes);
    }

    pub fn finish(&self) -> String {
        self.0.finalize().to_hex().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trt_cache_is_keyed_by_the_weights() {
        let a = BackendOptions {
            backend: Backend::TensorRt,
            trt_cache_dir: Some("/cache".into()),
            weight_hash: content_hash(&[&[1, 2, 3]]),
            ..Default::default()
        };
        let mut b = a.clone();
        b.weight_hash = content_hash(&[&[1, 2, 4]]);
        assert_ne!(a.trt_cache_prefix(), b.trt_cache_prefix());
        let get = |o: &BackendOptions, k: &str| {
            o.tensorrt_options()
                .into_iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v)
        };
        assert_ne!(
            get(&a, "trt_engine_cache_path"),
            get(&b, "trt_engine_cache_path")
        );
        assert_eq!(
            get(&a, "trt_weight_stripped_engine_enable").as_deref(),
            Some("1")
        );
        assert_eq!(get(&a, "trt_engine_cache_enable").as_deref(), Some("1"));
        assert!(get(&a, "trt_engine_cache_path")
            .unwrap()
            .starts_with("/cache/"));
    }

    #[test]
    fn a_profile_becomes_ors_three_shape_options() {
        let o = BackendOptions {
            backend: Backend::TensorRt,
            trt_profile: vec![
                TrtProfile {
                    input: "a.lora_A".into(),
                    min: vec![1, 64, 32],
                    opt: vec![2, 64, 32],
                    max: vec![8, 64, 32],
                },
                TrtProfile {
                    input: "timestep".into(),
                    min: vec![1],
                    opt: vec![2],
                    max: vec![8],
                },
            ],
            ..Default::default()
        };
        let get = |k: &str| {
            o.tensorrt_options()
                .into_iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v)
        };
        assert_eq!(
            get("trt_profile_min_shapes").as_deref(),
            Some("a.lora_A:1x64x32,timestep:1")
        );
        assert_eq!(
            get("trt_profile_opt_shapes").as_deref(),
            Some("a.lora_A:2x64x32,timestep:2")
        );
        assert_eq!(
            get("trt_profile_max_shapes").as_deref(),
            Some("a.lora_A:8x64x32,timestep:8")
        );
        assert!(BackendOptions::default()
            .tensorrt_options()
            .iter()
            .all(|(k, _)| !k.starts_with("trt_profile")));
    }

    #[test]
    fn gpu_backends_register_loudly() {
        let o = BackendOptions {
            backend: Backend::TensorRt,
            ..Default::default()
        };
        assert_eq!(o.dispatch().len(), 2);
        assert_eq!(
            BackendOptions::default().dispatch().len(),
            1,
            "CPU: one provider"
        );
    }

    #[test]
    fn fp32_means_fp32_unless_tf32_is_asked_for() {
        let get = |o: &BackendOptions| {
            o.cuda_options()
                .into_iter()
                .find(|(k, _)| k == "use_tf32")
                .map(|(_, v)| v)
        };
        let off = BackendOptions {
            backend: Backend::Cuda,
            ..Default::default()
        };
        assert_eq!(get(&off).as_deref(), Some("0"), "TF32 off by default");
        let on = BackendOptions {
            tf32: true,
            ..off.clone()
        };
        assert_eq!(get(&on).as_deref(), Some("1"));
        // TensorRT engines fall back to the CUDA provider, with the same setting.
        let trt = BackendOptions {
            backend: Backend::TensorRt,
            ..off
        };
        assert_eq!(get(&trt).as_deref(), Some("0"));
    }

    #[test]
    fn cuda_settings_are_checked_and_passed_on() {
        let o = parse_cuda_options("cudnn_conv_algo_search=HEURISTIC, prefer_nhwc=1,sdpa_kernel=8")
            .unwrap();
        let cuda = BackendOptions {
            backend: Backend::Cuda,
            cuda: o,
            ..Default::default()
        };
        let got = cuda.cuda_options();
        for kv in [
            ("cudnn_conv_algo_search", "HEURISTIC"),
            ("prefer_nhwc", "1"),
            ("sdpa_kernel", "8"),
            ("use_tf32", "0"),
        ] {
            assert!(
                got.iter().any(|(k, v)| (k.as_str(), v.as_str()) == kv),
                "{kv:?} in {got:?}"
            );
        }
        for (bad, says) in [
            (
                "cudnn_conv_algo_search=FAST",
                "EXHAUSTIVE or HEURISTIC or DEFAULT",
            ),
            ("use_tf32=1", "--tf32"),
            ("enable_cuda_graph=yes", "0 or 1"),
            ("sdpa_kernel=-1", "bit set"),
            ("prefer_nhwc", "KEY=VALUE"),
        ] {
            let e = parse_cuda_options(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn content_hash_sees_every_byte_and_boundary() {
        let x = content_hash(&[b"abcdefghij"]);
        assert_eq!(x, content_hash(&[b"abcdefghij"]));
        assert_ne!(x, content_hash(&[b"abcdefghik"]));
        assert_ne!(content_hash(&[b"ab", b"c"]), content_hash(&[b"a", b"bc"]));
        assert_eq!(x.len(), 64);
    }
}
