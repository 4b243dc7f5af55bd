//! `v2l-compile`: turn an export directory into an engine bundle for a backend and precision.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, ValueEnum};
use v2l_cli::{main_with, Failure};
use v2l_runtime::backend::{Backend, Precision};
use v2l_runtime::bundle::{Attention, Int8Scheme};

/// Compile exported graphs into an engine bundle.
///
/// The bundle holds the graphs, the pipeline manifest, the LoRA target table (initializer,
/// shape, dtype), a hash of the base weights and of every file. `v2l-run --engine` checks them
/// all on load (files over 256 MiB by 64 sampled blocks, so a 20 GB engine loads without
/// reading 20 GB) and refuses a modified or mismatched part.
///
/// The DiT is rewritten for the backend: on cpu/cuda attention becomes ONNX Runtime's fused
/// MultiHeadAttention and GELU its FastGelu, on cuda the RoPE its RotaryEmbedding and each
/// AdaLN modulation its layer norm's scale and bias; tensorrt keeps the plain pattern its
/// builder fuses.
///
/// Backends: `cpu` (ONNX Runtime, runs here); `cuda` and `tensorrt` go through ONNX Runtime's
/// execution providers on a machine with onnxruntime-gpu (cuda first run on an H100 on
/// 2026-11-26; tensorrt not yet run: TensorRT cannot be installed from PyPI).
///
/// Precision (the DiT; the hypernetwork stays fp32, the VAE too on cpu, while cuda/tensorrt
/// run it in bf16/fp16 with its GroupNorms in fp32):
///   fp32   every backend.
///   bf16, fp16
///          weights and activations in the type, softmax, RoPE, the timestep sinusoid, GELU
///          and LoRA branches kept fp32, layer-norm statistics fp32. cuda/tensorrt get the
///          typed graph (TensorRT builds it strongly typed); cpu, which has no bf16 MatMul,
///          an emulated one: low-precision weights in memory, fp32 compute per op, every
///          output rounded to the type (a fidelity check and half the weight memory, not a
///          speed-up).
///   int8   cpu: the token-wise linears (attention, feed-forward, text projection) as int8
///          weights with one scale per output channel (DynamicQuantizeMatMul, activations
///          quantised on the fly). With --calibration/--calibration-samples (any backend):
///          static int8, Q/DQ with calibrated activation scales, the form TensorRT builds.
///   int4   cpu: the same linears as 4-bit blocks of 32 (MatMulNBits).
/// Conditioning-path layers and the output projection stay fp32 below fp32. The fp32 weights
/// stay in the bundle as the base LoRAs are fused from. Every compile below fp32 measures the
/// DiT against fp32 on generated inputs and records it in bundle.json (--report prints it).
///
/// Examples:
///   v2l-export pipeline models/CogVideoX-5b-I2V -o export/
///   v2l-compile export/ -o engine/ --backend cpu
///   v2l-compile export/ -o engine-int8/ --precision int8
///   v2l-compile export/ -o engine-trt/ --backend tensorrt --precision bf16
///   v2l-compile export/ -o engine-trt8/ --backend tensorrt --precision int8 --calibration-samples 16
#[derive(Parser)]
#[command(version, verbatim_doc_comment)]
struct Cli {
    /// Export directory (from `v2l-export`), or a model file inside one
    input: PathBuf,
    /// Output engine directory (created; if it exists it must be empty)
    #[arg(short, long)]
    output: PathBuf,
    /// Numeric precision of the engine's DiT (see above)
    #[arg(long, value_enum, default_value = "fp32")]
    precision: PrecisionArg,
    /// Static int8: a directory of DiT input files (`*.safetensors` with hidden_states,
    /// encoder_hidden_states, timestep, rope_cos, rope_sin) to calibrate activation ranges on
    #[arg(long, value_name = "DIR", conflicts_with = "calibration_samples")]
    calibration: Option<PathBuf>,
    /// Largest rank of a LoRA on the `unfused` DiT (a higher one is refused); sessions that need
    /// one factor shape (tensorrt, cuda with CUDA graphs, cpu when given) pad every LoRA to it.
    /// Default: on `cuda`/`tensorrt` the hypernetwork's rank or 64; on `cpu` none (each LoRA
    /// keeps its own rank)
    #[arg(long, value_name = "R", value_parser = clap::value_parser!(u32).range(1..=4096))]
    max_rank: Option<u32>,
    /// Static int8 on N generated samples (seeded Gaussian latents at timesteps 999..0)
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=4096))]
    calibration_samples: Option<u32>,
    /// How ranges become scales: `minmax` (the default: a LoRA shifts activation ranges, and
    /// clipping at a percentile of the base model's hurt LoRA outputs most), or
    /// `percentile[:P]` (|x| at the P-th percentile, default 99.99)
    #[arg(long, value_name = "METHOD", default_value = "minmax")]
    calibration_method: String,
    #[arg(long, value_enum, default_value = "cpu")]
    backend: BackendArg,
    /// The DiT's attention kernel. Default: `bf16` for cpu engines below fp32 (v2l's own
    /// operator: bf16 products on AVX512-BF16 CPUs, f32 on others, and with V2L_ATTENTION=fp32),
    /// `ort` otherwise (ONNX Runtime's f32 MultiHeadAttention; TensorRT's own fusion). `int8`
    /// (cpu engines below fp32): q·kᵀ in int8 with smoothed K on AVX512-VNNI CPUs, p·v in
    /// bf16; the bf16 kernel where VNNI is missing
    #[arg(long, value_enum)]
    attention: Option<AttentionArg>,
    /// The VAE's convolutions. Default: `bf16` for cpu engines below fp32 (v2l's own operator,
    /// bf16 products with f32 sums on AVX512-BF16 CPUs, about twice ONNX Runtime's f32 rate;
    /// graphs written beside the export's, which CPUs without AVX512-BF16, and V2L_CONV=fp32,
    /// load instead), `ort` otherwise (ONNX Runtime's exact f32 Conv)
    #[arg(long, value_enum)]
    vae_conv: Option<VaeConvArg>,
    /// int8 cpu engines: how ONNX Runtime multiplies. `auto` (default): `u8s8` where this CPU
    /// has VNNI (AVX512-VNNI, AVX-VNNI, AMX), `u8u8` elsewhere. `u8u8`: weights stored u8,
    /// exact on every x86-64 CPU, for engines copied to other machines. `u8s8`: weights stored
    /// s8, ~2x faster GEMMs on VNNI CPUs, but saturating on CPUs without VNNI, where such an
    /// engine is refused (so is compiling it)
    #[arg(long, value_enum, value_name = "SCHEME")]
    int8_gemm: Option<Int8GemmArg>,
    /// int8 cpu engines with s8 weights (`u8s8`): which operator runs the DiT's linears.
    /// `v2l` (default): v2l's own `vpdpbusd` kernel (the same products and the same output as
    /// ONNX Runtime's, about 1.7x its speed); `ort`: ONNX Runtime's DynamicQuantizeMatMul.
    /// It goes with v2l's attention: `--attention ort` engines, and CPUs without AVX512-BF16
    /// (which load the `.ort` twin graphs), run ONNX Runtime's operators either way
    #[arg(long, value_enum, value_name = "OP", default_value = "v2l")]
    int8_linears: Int8LinearsArg,
    /// cuda/tensorrt engines: let ONNX Runtime's CUDA provider run fp32 convolutions and matrix
    /// products in TF32 (10-bit mantissa products: faster, about 1e-3 relative error). Off by
    /// default, so an fp32 engine computes in fp32, as PyTorch does with TF32 off; recorded in
    /// bundle.json (`"tf32": true`)
    #[arg(long)]
    tf32: bool,
    /// cuda/tensorrt engines: a CUDA provider setting recorded in bundle.json, repeatable:
    /// `cudnn_conv_algo_search=EXHAUSTIVE|HEURISTIC|DEFAULT`, `cudnn_conv_use_max_workspace=0|1`,
    /// `prefer_nhwc=0|1`, `sdpa_kernel=BITS` (attention kernels: flash 1, memory-efficient 2,
    /// cuDNN flash 8, math 16; keep 1 or 2 in the set: where none of the chosen kernels can
    /// run, ONNX Runtime falls to its unfused one, whose scores take batch·heads·tokens² memory,
    /// 60 GB at 17,776 tokens), `arena_extend_strategy`, `cudnn_conv1d_pad_to_nc1d`,
    /// `enable_skip_layer_norm_strict_mode`, `fuse_conv_bias=0|1` (a convolution's bias added
    /// in cuDNN's plan), `enable_cuda_graph=0|1` (cuda engines: each
    /// session's runs captured as CUDA graphs, one per set of input shapes, and replayed from
    /// buffers bound once; not yet run on a GPU). `V2L_CUDA_OPTIONS=KEY=VALUE,...` overrides
    /// them at run time
    #[arg(long = "cuda-option", value_name = "KEY=VALUE", value_parser = cuda_option)]
    cuda_options: Vec<(String, String)>,
    /// cuda engines: keep the exported RoPE (four elementwise passes per q and k) instead of
    /// ONNX Runtime's one RotaryEmbedding kernel; to measure one against the other
    #[arg(long)]
    unfused_rope: bool,
    /// cuda engines: keep the VAE's GroupNorms as exported (the activation reduced, centred,
    /// squared and reduced again, the centred copy scaled) instead of one LayerNormalization
    /// per GroupNorm (over the fp16/bf16 activation below fp32) and the centring folded into
    /// the shift; to measure one against the other
    #[arg(long)]
    exported_group_norm: bool,
    /// cuda engines at fp16/bf16: apply the VAE decoder's spatial norms (above the latents'
    /// size) folded in f32, as fp32 engines do (one rounding, 38 bytes an element), instead of
    /// to LayerNormalization's normalized rows in the engine's type (three roundings, as
    /// PyTorch's bf16 spatial norm; 18 bytes an element); to measure one against the other
    #[arg(long)]
    folded_norms: bool,
    /// cuda engines at fp16/bf16: the DiT's GELUs in the engine's type, on ONNX Runtime's
    /// fp16/bf16 FastGelu (which rounds after each step of its formula; torch rounds once),
    /// instead of in f32 between two casts; to measure its speed and distance against them
    #[arg(long)]
    low_gelu: bool,
    /// cuda engines at bf16: keep the DiT's attention (MultiHeadAttention) in bf16 instead
    /// of fp16, where ONNX Runtime's CUDA provider runs only its memory-efficient kernel (its
    /// flash and cuDNN attention take fp16); to measure one against the other
    #[arg(long)]
    bf16_attention: bool,
    /// cuda engines at bf16: keep the DiT's GELUs in f32 between two casts of the
    /// feed-forward's 4x-wide activation instead of in fp16 (the exact cast of the input,
    /// ONNX Runtime's fp16 FastGelu, one rounding to bf16); to measure one against the other
    #[arg(long)]
    f32_gelu: bool,
    /// Print the accuracy report as one JSON line too (it is always recorded in bundle.json:
    /// below fp32, each changed stage's relative L2 against fp32 on generated inputs)
    #[arg(long)]
    report: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum Int8LinearsArg {
    V2l,
    Ort,
}

#[derive(Clone, Copy, ValueEnum)]
enum Int8GemmArg {
    Auto,
    U8u8,
    U8s8,
}

#[derive(Clone, Copy, ValueEnum)]
enum PrecisionArg {
    Fp32,
    Fp16,
    Bf16,
    Int8,
    Int4,
}

#[derive(Clone, Copy, ValueEnum)]
enum AttentionArg {
    Ort,
    Bf16,
    Int8,
}

#[derive(Clone, Copy, ValueEnum)]
enum VaeConvArg {
    Ort,
    Bf16,
}

#[derive(Clone, Copy, ValueEnum)]
enum BackendArg {
    Cpu,
    Cuda,
    Tensorrt,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    main_with(|| {
        let precision = match cli.precision {
            PrecisionArg::Fp32 => Precision::Fp32,
            PrecisionArg::Fp16 => Precision::Fp16,
            PrecisionArg::Bf16 => Precision::Bf16,
            PrecisionArg::Int8 => Precision::Int8,
            PrecisionArg::Int4 => Precision::Int4,
        };
        let backend = match cli.backend {
            BackendArg::Cpu => Backend::Cpu,
            BackendArg::Cuda => Backend::Cuda,
            BackendArg::Tensorrt => Backend::TensorRt,
        };
        use v2l_compile::calibrate::{Calibration, Samples};
        let samples = match (&cli.calibration, cli.calibration_samples) {
            (Some(dir), _) => Some(Samples::Dir(dir.clone())),
            (None, Some(n)) => Some(Samples::Generated(n as usize)),
            (None, None) => None,
        };
        let calibration = match samples {
            Some(samples) => Some(Calibration {
                samples,
                method: v2l_calibration::Method::parse(&cli.calibration_method).ok_or_else(
                    || {
                        Failure::usage(format!(
                            "--calibration-method {}: expected `minmax` or `percentile[:P]` with 0 < P <= 100",
                            cli.calibration_method
                        ))
                    },
                )?,
            }),
            None => None,
        };
        let b = v2l_compile::compile_with(
            &cli.input,
            &cli.output,
            backend,
            precision,
            &v2l_compile::Options {
                calibration: calibration.as_ref(),
                max_rank: cli.max_rank.map(|r| r as usize),
                attention: cli.attention.map(|a| match a {
                    AttentionArg::Ort => Attention::Ort,
                    AttentionArg::Bf16 => Attention::Bf16,
                    AttentionArg::Int8 => Attention::Int8,
                }),
                int8_scheme: cli.int8_gemm.and_then(|s| match s {
                    Int8GemmArg::Auto => None,
                    Int8GemmArg::U8u8 => Some(Int8Scheme::U8U8),
                    Int8GemmArg::U8s8 => Some(Int8Scheme::U8S8),
                }),
                vae_bf16: cli.vae_conv.map(|v| matches!(v, VaeConvArg::Bf16)),
                ort_int8_linears: matches!(cli.int8_linears, Int8LinearsArg::Ort),
                tf32: cli.tf32,
                cuda_options: &cli.cuda_options,
                unfused_rope: cli.unfused_rope,
                exported_group_norm: cli.exported_group_norm,
                folded_norms: cli.folded_norms,
                low_gelu: cli.low_gelu,
                bf16_attention: cli.bf16_attention,
                f32_gelu: cli.f32_gelu,
            },
        )
        .map_err(Failure::from)?;
        println!(
            "wrote {} ({} {}, {} files, {} LoRA targets, base weights {})",
            cli.output.display(),
            b.backend.name(),
            b.precision.name(),
            b.files.len(),
            b.lora_targets.len(),
            b.weight_hash
        );
        if let Some(c) = &b.calibration {
            println!(
                "calibrated: {} linears, {} on {} samples ({})",
                c.input_scales.len(),
                c.method,
                c.samples,
                c.source
            );
        }
        for a in &b.accuracy {
            let psnr = a
                .psnr_db
                .map(|p| format!(", PSNR {p:.1} dB"))
                .unwrap_or_default();
            println!(
                "accuracy: {} {:.2e} relative L2{psnr} against fp32 ({})",
                a.stage, a.rel_l2, a.inputs
            );
        }
        if cli.report {
            let report = serde_json::json!({
                "precision": b.precision.name(),
                "backend": b.backend.name(),
                "accuracy": b.accuracy,
                "calibration": b.calibration,
                "stored_weights": v2l_runtime::bundle::stored(&b)
                    .into_iter()
                    .map(|(k, v)| (k, v.name()))
                    .collect::<std::collections::BTreeMap<_, _>>(),
            });
            println!("{report}");
        }
        Ok(())
    })
}

/// One `--cuda-option KEY=VALUE`, checked as the runtime will take it.
fn cuda_option(text: &str) -> Result<(String, String), String> {
    let parsed = v2l_runtime::backend::parse_cuda_options(text)?;
    match parsed.into_iter().next() {
        Some(kv) if !text.contains(',') => Ok(kv),
        _ => Err("one KEY=VALUE per --cuda-option".into()),
    }
}
