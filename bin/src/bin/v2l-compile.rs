//! `v2l-compile`: turn an export directory into an engine bundle for a backend and precision.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, ValueEnum};
use v2l_cli::{main_with, Failure};
use v2l_runtime::backend::{Backend, Precision};

/// Compile exported graphs into an engine bundle.
///
/// The bundle holds the graphs, the pipeline manifest, the LoRA target table (initializer,
/// shape, dtype), a hash of the base weights and of every file. `v2l-run --engine` checks them
/// all on load (files over 256 MiB by 64 sampled blocks, so a 20 GB engine loads without
/// reading 20 GB) and refuses a modified or mismatched part.
///
/// The DiT is rewritten for the backend: on cpu/cuda attention becomes ONNX Runtime's fused
/// MultiHeadAttention and GELU its FastGelu; tensorrt keeps the plain pattern its builder fuses.
///
/// Backends: `cpu` (ONNX Runtime, runs here); `cuda` and `tensorrt` go through ONNX Runtime's
/// execution providers on a machine with onnxruntime-gpu (not yet run on a GPU).
///
/// Precision: `fp32`, or on cpu `int8`: the DiT's token-wise linears (attention projections,
/// feed-forward, text projection) as int8 weights with one scale per output channel, run by
/// ONNX Runtime's DynamicQuantizeMatMul (activations quantised per tensor on the fly); the
/// conditioning-path layers, the output projection, the VAE and the hypernetwork stay fp32.
/// The fp32 weights stay in the bundle as the base LoRAs are fused from; a LoRA runs as an fp32
/// low-rank branch beside the int8 weights (exact in the LoRA, switched by copying factors).
/// fp16/bf16 are not built yet.
///
/// Examples:
///   v2l-export pipeline models/CogVideoX-5b-I2V -o export/
///   v2l-compile export/ -o engine/ --backend cpu
///   v2l-compile export/ -o engine-int8/ --precision int8
#[derive(Parser)]
#[command(version, verbatim_doc_comment)]
struct Cli {
    /// Export directory (from `v2l-export`), or a model file inside one
    input: PathBuf,
    /// Output engine directory (created; if it exists it must be empty)
    #[arg(short, long)]
    output: PathBuf,
    /// Numeric precision of the engine (int8: cpu backend; fp16/bf16: not built yet)
    #[arg(long, value_enum, default_value = "fp32")]
    precision: PrecisionArg,
    #[arg(long, value_enum, default_value = "cpu")]
    backend: BackendArg,
    /// Print the accuracy report as one JSON line too (it is always recorded in bundle.json:
    /// below fp32, each changed stage's relative L2 against fp32 on generated inputs)
    #[arg(long)]
    report: bool,
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
        let b = v2l_runtime::bundle::compile(&cli.input, &cli.output, backend, precision)
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
        for a in &b.accuracy {
            println!(
                "accuracy: {} {:.2e} relative L2 against fp32 ({})",
                a.stage, a.rel_l2, a.inputs
            );
        }
        if cli.report {
            let report = serde_json::json!({
                "precision": b.precision.name(),
                "backend": b.backend.name(),
                "accuracy": b.accuracy,
                "stored_weights": b
                    .stored()
                    .into_iter()
                    .map(|(k, v)| (k, v.name()))
                    .collect::<std::collections::BTreeMap<_, _>>(),
            });
            println!("{report}");
        }
        Ok(())
    })
}
