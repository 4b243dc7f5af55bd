//! `v2l-bench`: benchmarks that print numbers (never pass/fail tests).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use v2l_contracts::io::text as text_io;

use clap::{Parser, Subcommand};
use v2l_bench::fuse::{bench_fuse, FuseBench};
use v2l_cli::{bytes, main_with, Failure};
use v2l_export::{cogvideox_dit, synthetic, Checkpoint};
use v2l_graphs::{DType, ExternalData};

/// Benchmarks of v2l's own work, printed as a table (or one JSON object with --json).
///
///   export   generate a CogVideoX-5B-shaped checkpoint (bf16, the real layer shapes of
///            CogVideoX-Fun-5B-InP) and time its export to ONNX with external data,
///            reporting peak memory: the export must not hold a copy of the model.
///   scale    a CogVideoX-5B-shaped DiT (real config, generated weights, --layers blocks) at
///            real sample sizes: DiT step time, whole-process time and peak RSS of
///            `v2l-run stage dit`; with --torch-python, diffusers on the same checkpoint and
///            inputs in the same run, the speed-up and the relative L2 between the outputs.
///   fuse     time the LoRA fuse kernel (W' = W + s·B·A, rank 1) on the CogVideoX-5B layer
///            shapes in f32, f16 and bf16, one block and the full model, against memcpy.
///   pipeline latency per stage and per LoRA strategy of an engine, at its sample size.
///
/// Examples:
///   v2l-bench fuse --json
///   v2l-bench scale --torch-python ~/venv/bin/python --repeat 3
///   v2l-bench pipeline --engine engine/ --repeat 5
#[derive(Parser)]
#[command(version, verbatim_doc_comment)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Print one JSON object on stdout instead of a table
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Latency per pipeline stage and per LoRA strategy for an engine, at its default sample size
    ///
    /// Example:
    ///   v2l-bench pipeline --engine engine/ --repeat 5 --json
    #[command(verbatim_doc_comment)]
    Pipeline {
        /// Engine bundle (from `v2l-compile`) or export directory (from `v2l-export`)
        #[arg(long)]
        engine: PathBuf,
        /// Runs per measurement (medians are reported)
        #[arg(long, default_value_t = 5)]
        repeat: usize,
        /// Denoising steps of the whole-run measurement
        #[arg(long, default_value_t = 50)]
        steps: usize,
        /// ONNX Runtime intra-op threads (0: one per core)
        #[arg(long, default_value_t = 0)]
        threads: usize,
    },
    /// Serving: `v2l-serve` on loopback driven over HTTP. LoRA cache miss vs hit vs switch
    /// (against the `bound` strategy's switch), then N clients for T seconds: throughput,
    /// p50/p99 latency, errors
    ///
    /// Example:
    ///   v2l-bench serve --engine engine/ --clients 8 --seconds 20 --repeat 5
    #[command(verbatim_doc_comment)]
    Serve(v2l_bench::serve::ServeBench),
    /// The GPU check (CUDA, TensorRT if present; first run on an H100 on 2026-11-26, TensorRT
    /// never): compile the fixture
    /// and demo engines at fp32/fp16/bf16, parity against the CPU engine at each precision's
    /// bound, DiT step, LoRA switch (factors as inputs, fused, merged on the GPU), a batched
    /// four-LoRA step
    ///
    /// Examples:
    ///   v2l-bench gpu --dry-run
    ///   v2l-bench gpu --json > gpu-check.json
    #[command(verbatim_doc_comment)]
    Gpu(v2l_bench::gpu::GpuBench),
    /// The DiT's attention at 5B shapes: ONNX Runtime's f32 MultiHeadAttention against v2l's
    /// ai.v2l.Attention (bf16 on AVX512-BF16), in ms and GFLOP/s beside this CPU's bf16/int8
    /// peaks and f32 GEMM rate
    ///
    /// Example:
    ///   v2l-bench attention --tokens 1378,5626 --repeat 3 --json
    #[command(verbatim_doc_comment)]
    Attention(v2l_bench::attention::AttentionBench),
    /// An int8 engine's linear at the DiT's shapes: ONNX Runtime's DynamicQuantizeMatMul
    /// against v2l's ai.v2l.QMatMul (vpdpbusd, AVX512-VNNI), the same quantised graph before
    /// and after the pass v2l-compile applies, in ms and GOP/s beside this CPU's int8 peak
    ///
    /// Example:
    ///   v2l-bench int8-gemm --rows 11252 --repeat 3 --json
    #[command(verbatim_doc_comment)]
    Int8Gemm(v2l_bench::int8_gemm::Int8GemmBench),
    /// The VAE decoder's 3×3×3 convolutions at a decode's sizes: ONNX Runtime's f32 Conv
    /// against v2l's ai.v2l.Conv (bf16 on AVX512-BF16), in ms and GFLOP/s, with the
    /// relative L2 between them
    ///
    /// Example:
    ///   v2l-bench conv --repeat 3 --json
    #[command(verbatim_doc_comment)]
    Conv(v2l_bench::conv::ConvBench),
    /// Step caching at 5B width: a DiT call that First Block Cache skips (head and output
    /// only), one that runs every block, and the DiT whole; the per-block time, and the DiT
    /// time of a 42-block model for shares of skipped calls
    ///
    /// Example:
    ///   v2l-bench cache --layers 3 --precision int8 --size 9,256,384 --repeat 3
    #[command(verbatim_doc_comment)]
    Cache(v2l_bench::cache::CacheBench),
    /// LoRA factors as DiT inputs at 5B width: two requests with different rank-64 LoRAs in
    /// one call (`unfused`) against one call per LoRA (`fused`), the LoRA branches' share of
    /// the step, and the switch cost of each
    ///
    /// Example:
    ///   v2l-bench lora-batch --repeat 3 --json
    #[command(verbatim_doc_comment)]
    LoraBatch(v2l_bench::lora_batch::LoraBatchBench),
    /// The whole CogVideoX-5B-I2V job at real size, as a user runs it: generates (or reuses
    /// from its cache) a full pipeline directory with generated weights, then runs
    /// `v2l-export pipeline`, `v2l-compile`, `v2l-lora predict` and `v2l-run --prompt
    /// --reference --image` as separate processes, with every stage's wall time and own peak
    /// RSS, and diffusers' CogVideoXImageToVideoPipeline (bf16, the same LoRA file) beside it.
    /// `--model cogvideox-fun-5b-inp` runs Video2LoRA's released backbone (CogVideoX-Fun-InP)
    /// instead, beside VideoX-Fun's own CogVideoXFunInpaintPipeline (--videox-fun).
    /// Needs ~50 GB of disk and 24 GB of RAM; about 40 minutes on 2 cores the first time
    ///
    /// Example:
    ///   v2l-bench e2e --model cogvideox-5b-i2v --torch-python ~/venv/bin/python --json
    ///   v2l-bench e2e --model cogvideox-fun-5b-inp --torch-python ~/venv/bin/python \
    ///       --videox-fun ~/src/Video2LoRA
    #[command(verbatim_doc_comment)]
    E2e(v2l_bench::e2e::E2eBench),
    /// Export a full-size CogVideoX-5B DiT or T5-XXL text encoder (generated bf16 weights) and
    /// report time and peak memory; the T5 is then run once on 226 tokens as its own process
    ///
    /// Example:
    ///   v2l-bench export --layers 42 --dir /scratch/v2l-bench
    ///   v2l-bench export --model t5-xxl
    ///   v2l-bench export --model wan-1.3b --keep
    #[command(verbatim_doc_comment)]
    Export {
        /// Transformer blocks to generate (42 is CogVideoX-5B; the T5-XXL has its 24, Wan 1.3B its 30)
        #[arg(long, default_value_t = 42)]
        layers: usize,
        /// What to generate and export
        #[arg(long, value_enum, default_value = "cogvideox")]
        model: ExportModel,
        /// Scratch directory for the generated checkpoint and the export (needs ~2x11 GB at 42 blocks)
        #[arg(long, default_value = "target/v2l-bench-export")]
        dir: PathBuf,
        /// Keep the generated files instead of deleting them at the end
        #[arg(long)]
        keep: bool,
    },
    /// CogVideoX-5B-shaped DiT at real sizes, against PyTorch + diffusers
    ///
    /// Example (the two cases of the scale issue, PyTorch alongside):
    ///   v2l-bench scale --torch-python ~/venv/bin/python
    ///   v2l-bench scale --frames 49 --height 480 --width 720 --json
    #[command(verbatim_doc_comment)]
    Scale {
        /// Transformer blocks (CogVideoX-5B has 42); more than one are generated and exported with
        /// bf16 weights (as `v2l-bench export` makes them), which compile below fp32 (int8)
        #[arg(long, default_value_t = 1)]
        layers: usize,
        /// Engine precision (as `v2l-compile --precision`)
        #[arg(long, default_value = "fp32")]
        precision: String,
        /// The DiT's attention kernel (as `v2l-compile --attention`: ort, bf16 or int8; default:
        /// bf16 below fp32)
        #[arg(long)]
        attention: Option<String>,
        /// The int8 engine's linears (as `v2l-compile --int8-linears`: v2l or ort; default: v2l)
        #[arg(long, value_name = "OP")]
        int8_linears: Option<String>,
        /// Static int8: calibrate on N generated samples (`v2l-compile --calibration-samples`)
        #[arg(long, value_name = "N")]
        calibration_samples: Option<u32>,
        /// Pixel frames (1 + 4k); with --height and --width replaces the default sweep
        /// (9x256x384 and 13x480x720)
        #[arg(long, requires_all = ["height", "width"])]
        frames: Option<usize>,
        #[arg(long, requires_all = ["frames", "width"])]
        height: Option<usize>,
        #[arg(long, requires_all = ["frames", "height"])]
        width: Option<usize>,
        /// Python with torch and diffusers: run the same module there too
        #[arg(long)]
        torch_python: Option<PathBuf>,
        /// Threads for both v2l (ONNX Runtime intra-op) and PyTorch
        #[arg(long, default_value_t = 2)]
        threads: usize,
        /// Processes per measurement (medians are reported)
        #[arg(long, default_value_t = 1)]
        repeat: usize,
        /// Scratch directory (the generated checkpoint is kept there and reused)
        #[arg(long, default_value = "target/v2l-bench-scale")]
        dir: PathBuf,
        /// VAE decode case as FRAMESxHEIGHTxWIDTH in pixels (repeatable; default 9x240x360,
        /// 3 latent frames of 30x45); needs --torch-python to generate the real-width VAE
        #[arg(long = "vae", value_name = "FxHxW")]
        vae_cases: Vec<String>,
        /// Skip the VAE measurements
        #[arg(long)]
        no_vae: bool,
        /// Also time the LoRA switch of this strategy (repeatable: fused, bound, unfused),
        /// beside the engine's default: `--lora-strategy unfused` on an fp32 and a bf16 engine
        /// compares the factors' host work in f32 and in the engine's type
        #[arg(long = "lora-strategy", value_name = "STRATEGY", value_parser = parse_strategy)]
        lora_strategies: Vec<v2l_runtime::lora::strategy::Strategy>,
    },
    /// The effect hypernetworks at real size (generated weights): Prompt2Effect (paper size,
    /// 1.54 B) over Wan2.1-I2V-14B's 400 attention layers, or LoFA's two stages (199 M + 214 M)
    /// over Wan2.1-T2V-1.3B's 240; seconds per layer, the whole model at that rate beside the
    /// paper's A100 figure, and peak memory
    ///
    /// Examples:
    ///   v2l-bench hypernet --model lofa --layers 240 --chunk 16
    ///   v2l-bench hypernet --model prompt2effect --layers 4 --chunk 1
    #[command(verbatim_doc_comment)]
    Hypernet {
        #[arg(long, value_enum)]
        model: v2l_bench::hypernet::HypernetModel,
        /// Layers to run; the rest of the model's layers are extrapolated at the measured rate
        #[arg(long, default_value_t = 16)]
        layers: usize,
        /// Layers per call (as `v2l-lora predict --effect-chunk`)
        #[arg(long, default_value_t = 16)]
        chunk: usize,
        /// ONNX Runtime intra-op threads (0: one per core)
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// Scratch directory for the generated checkpoints and graphs (Prompt2Effect: ~13 GB)
        #[arg(long, default_value = "target/v2l-bench-hypernet")]
        dir: PathBuf,
        /// Keep the generated files
        #[arg(long)]
        keep: bool,
    },
    /// Video2LoRA's LiLoRA expansion (predicted rows → LoRA factors, on the host for every
    /// predicted LoRA) on CogVideoX-Fun-5B-InP's 341 linears, generated auxiliaries
    ///
    /// Example:
    ///   v2l-bench lilora --down-dim 200 --up-dim 100 --repeat 5
    #[command(verbatim_doc_comment)]
    Lilora {
        /// Rows of each `down_aux` (upstream's --lora_down_dim: 200 in Python, 100 in its script)
        #[arg(long, default_value_t = 200)]
        down_dim: usize,
        /// Columns of each `up_aux` (upstream's --lora_up_dim: 100 in Python, 50 in its script)
        #[arg(long, default_value_t = 100)]
        up_dim: usize,
        /// LoRA rank (upstream's --lora_rank)
        #[arg(long, default_value_t = 1)]
        rank: usize,
        /// Timed expansions; the median is reported
        #[arg(long, default_value_t = 5)]
        repeat: usize,
    },
    /// Time the LoRA fuse kernel against this machine's memcpy bandwidth
    ///
    /// Example:
    ///   v2l-bench fuse --threads 2 --json
    #[command(verbatim_doc_comment)]
    Fuse {
        /// Whose real layer shapes: cogvideox (CogVideoX-Fun-5B-InP) or wan-i2v-14b
        #[arg(long, value_enum, default_value = "cogvideox")]
        model: FuseModelArg,
        /// Threads for the fuse and the memcpy (0: all cores)
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// Timed passes per measurement (after one warm-up pass); medians are reported
        #[arg(long, default_value_t = 5)]
        repeat: usize,
        /// Cap on base + target weight memory in GiB (the full model is streamed through it)
        #[arg(long, default_value_t = 8.0)]
        max_mem_gib: f64,
        /// memcpy buffer size in MiB
        #[arg(long, default_value_t = 1024)]
        memcpy_mib: usize,
        /// Skip the in-place path (time only fuse_from, the LoRA-switching path)
        #[arg(long)]
        no_in_place: bool,
        /// Storage types to time, in this order
        #[arg(long, value_delimiter = ',', default_value = "f32,f16,bf16")]
        dtype: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    main_with(|| match cli.command {
        Command::Export {
            layers,
            model,
            dir,
            keep,
        } => bench_export(layers, model, &dir, keep, cli.json),
        Command::Hypernet {
            model,
            layers,
            chunk,
            threads,
            dir,
            keep,
        } => v2l_bench::hypernet::bench_hypernet(&v2l_bench::hypernet::HypernetBench {
            model,
            layers,
            chunk,
            threads,
            dir: &dir,
            keep,
            json: cli.json,
        }),
        Command::Lilora {
            down_dim,
            up_dim,
            rank,
            repeat,
        } => v2l_bench::lilora::bench_lilora(&v2l_bench::lilora::LiLoraBench {
            down_dim,
            up_dim,
            rank,
            repeat,
            json: cli.json,
        }),
        Command::Pipeline {
            engine,
            repeat,
            steps,
            threads,
        } => v2l_bench::pipeline::bench_pipeline(&engine, repeat, steps, threads, cli.json),
        Command::Scale {
            layers,
            precision,
            attention,
            int8_linears,
            calibration_samples,
            frames,
            height,
            width,
            torch_python,
            threads,
            repeat,
            dir,
            vae_cases,
            no_vae,
            lora_strategies,
        } => {
            let parse = |s: &String| -> Result<(usize, usize, usize), Failure> {
                let v: Vec<usize> = s.split('x').filter_map(|p| p.parse().ok()).collect();
                match v.as_slice() {
                    [f, h, w] => Ok((*f, *h, *w)),
                    _ => Err(Failure::new(format!(
                        "--vae {s}: expected FRAMESxHEIGHTxWIDTH, e.g. 9x240x360"
                    ))),
                }
            };
            let vae_cases = if no_vae {
                Vec::new()
            } else if vae_cases.is_empty() {
                vec![(9, 240, 360)]
            } else {
                vae_cases.iter().map(parse).collect::<Result<_, _>>()?
            };
            let cases = match (frames, height, width) {
                (Some(f), Some(h), Some(w)) => vec![(f, h, w)],
                _ => vec![(9, 256, 384), (13, 480, 720)],
            };
            v2l_bench::scale::bench_scale(&v2l_bench::scale::ScaleBench {
                layers,
                precision,
                attention,
                int8_linears,
                calibration_samples,
                cases,
                torch_python,
                threads,
                repeat,
                dir,
                json: cli.json,
                vae_cases,
                lora_strategies,
            })
        }
        Command::Conv(mut b) => {
            b.json = cli.json;
            v2l_bench::conv::bench_conv(&b)
        }
        Command::Int8Gemm(mut b) => {
            b.json = cli.json;
            v2l_bench::int8_gemm::bench_int8_gemm(&b)
        }
        Command::Attention(mut b) => {
            b.json = cli.json;
            v2l_bench::attention::bench_attention(&b)
        }
        Command::Cache(mut b) => {
            b.json = cli.json;
            v2l_bench::cache::bench_cache(&b)
        }
        Command::LoraBatch(mut b) => {
            b.json = cli.json;
            v2l_bench::lora_batch::bench_lora_batch(&b)
        }
        Command::E2e(mut b) => {
            b.json = cli.json;
            v2l_bench::e2e::bench_e2e(&b)
        }
        Command::Gpu(mut b) => {
            b.json = cli.json;
            v2l_bench::gpu::bench_gpu(&b)
        }
        Command::Serve(mut b) => {
            b.json = cli.json;
            v2l_bench::serve::bench_serve(&b)
        }
        Command::Fuse {
            model,
            threads,
            repeat,
            max_mem_gib,
            memcpy_mib,
            no_in_place,
            dtype,
        } => bench_fuse(&FuseBench {
            model: match model {
                FuseModelArg::Cogvideox => v2l_bench::fuse::FuseModel::CogVideoX5b,
                FuseModelArg::WanI2v14b => v2l_bench::fuse::FuseModel::WanI2v14b,
            },
            threads,
            repeat,
            max_mem_gib,
            memcpy_mib,
            in_place: !no_in_place,
            dtypes: dtype,
            json: cli.json,
        }),
    })
}

/// A `/proc/self/status` field in kB.
fn status_kb(field: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Samples anonymous RSS (heap: what a copy of the model would occupy) every 20 ms.
struct AnonPeak {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl AnonPeak {
    fn start() -> AnonPeak {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(0));
        let (s, p) = (stop.clone(), peak.clone());
        let handle = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if let Some(kb) = status_kb("RssAnon:") {
                    p.fetch_max(kb, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        AnonPeak {
            stop,
            peak,
            handle: Some(handle),
        }
    }

    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        self.peak.load(Ordering::Relaxed) * 1024
    }
}

fn fullscale_config(layers: usize) -> Result<serde_json::Value, Failure> {
    // The CogVideoX-Fun-5B-InP config, as listed with the real layer shapes in the fixtures.
    let mut c: serde_json::Value = serde_json::from_str(include_str!(
        "../../tests/fixtures/fullscale_linear_shapes.json"
    ))
    .map_err(|e| Failure::new(format!("embedded shapes: {e}")))?;
    let mut config = c["cogvideox-fun-5b-inp"]["config"].take();
    config["num_layers"] = layers.into();
    config["_class_name"] = cogvideox_dit::CLASS_NAME.into();
    Ok(config)
}

#[derive(Clone, Copy, PartialEq, clap::ValueEnum)]
enum FuseModelArg {
    Cogvideox,
    #[value(name = "wan-i2v-14b")]
    WanI2v14b,
}

#[derive(Clone, Copy, PartialEq, clap::ValueEnum)]
enum ExportModel {
    Cogvideox,
    T5Xxl,
    /// Wan2.1-T2V-1.3B's DiT (its 30 blocks)
    #[value(name = "wan-1.3b")]
    Wan13b,
}

/// `(config, tensors of the checkpoint it describes, where to generate it)`.
type SyntheticLayout = (
    serde_json::Value,
    Vec<(String, Vec<usize>)>,
    std::path::PathBuf,
);

/// A model's config with the tensor layout its exporter reads, for a generated checkpoint.
fn synthetic_layout<C: serde::de::DeserializeOwned>(
    config: serde_json::Value,
    layout: fn(&C) -> Vec<(String, Vec<usize>)>,
    ck_dir: std::path::PathBuf,
) -> Result<SyntheticLayout, Failure> {
    let cfg: C =
        serde_json::from_value(config.clone()).map_err(|e| Failure::new(format!("config: {e}")))?;
    Ok((config, layout(&cfg), ck_dir))
}

fn bench_export(
    layers: usize,
    model: ExportModel,
    dir: &std::path::Path,
    keep: bool,
    json: bool,
) -> Result<(), Failure> {
    use v2l_export::t5_encoder;
    let (config, layout, ck_dir) = match model {
        ExportModel::Cogvideox => synthetic_layout(
            fullscale_config(layers)?,
            cogvideox_dit::checkpoint_layout,
            dir.join("transformer"),
        )?,
        ExportModel::T5Xxl => synthetic_layout(
            t5_encoder::t5_xxl_config(),
            t5_encoder::checkpoint_layout,
            dir.join("text_encoder"),
        )?,
        ExportModel::Wan13b => synthetic_layout(
            v2l_export::wan_dit::wan_t2v_1_3b_config(),
            v2l_export::wan_dit::checkpoint_layout,
            dir.join("transformer"),
        )?,
    };
    let out_dir = dir.join("export");
    let params: usize = layout
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();

    let t0 = Instant::now();
    let mut last = Instant::now();
    // Norm scales near 1, as trained models have them: the exported T5 is also what int8
    // engines measure their prompt encoder's accuracy on (`v2l-compile`).
    synthetic::write_checkpoint_as(
        &ck_dir,
        &config,
        &layout,
        DType::BF16,
        1,
        synthetic::Scales::Trained,
        &mut |done, total| {
            if !json && last.elapsed() > Duration::from_secs(2) {
                eprint!(
                    "\rgenerating checkpoint: {:>3}% of {}",
                    done * 100 / total.max(1),
                    bytes(total)
                );
                last = Instant::now();
            }
        },
    )?;
    let gen_s = t0.elapsed().as_secs_f64();
    if !json {
        eprintln!(
            "\rgenerated {} ({params} parameters, bf16) in {gen_s:.1} s",
            ck_dir.display()
        );
    }

    // Reset the kernel's peak-RSS counter so VmHWM covers the export alone.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let sampler = AnonPeak::start();
    let t1 = Instant::now();
    let ck = Checkpoint::open_dir(&ck_dir)?;
    let (graph, file) = match model {
        ExportModel::Cogvideox => {
            let opts = cogvideox_dit::DitOptions {
                weight_dtype: Some(DType::BF16),
            };
            (cogvideox_dit::export(&ck, &opts)?.graph, "dit.onnx")
        }
        ExportModel::T5Xxl => (
            t5_encoder::export(&ck, Some(DType::BF16))?.graph,
            "text_encoder.onnx",
        ),
        ExportModel::Wan13b => (
            v2l_export::wan_dit::export(&ck, Some(DType::BF16))?.graph,
            "dit.onnx",
        ),
    };
    let build_s = t1.elapsed().as_secs_f64();
    std::fs::create_dir_all(&out_dir)
        .map_err(|e| Failure::new(format!("{}: {e}", out_dir.display())))?;
    let written = v2l_graphs::save(&graph, &out_dir.join(file), ExternalData::Always)?;
    drop(graph);
    let export_s = t1.elapsed().as_secs_f64();
    let anon_peak = sampler.finish();
    let hwm = status_kb("VmHWM:").unwrap_or(0) * 1024;
    let data_len = written
        .data
        .as_ref()
        .and_then(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .unwrap_or(0);

    let run = match model {
        ExportModel::T5Xxl => Some(run_t5(&ck, &out_dir, json)?),
        ExportModel::Cogvideox | ExportModel::Wan13b => None,
    };
    if json {
        println!(
            "{}",
            serde_json::json!({
                "model": match model { ExportModel::T5Xxl => "t5-xxl", ExportModel::Wan13b => "wan-1.3b", ExportModel::Cogvideox => "cogvideox" },
                "t5_run": run,
                "layers": match model { ExportModel::T5Xxl => 24, ExportModel::Wan13b => 30, ExportModel::Cogvideox => layers },
                "params": params, "weight_dtype": "bf16",
                "generate_s": gen_s, "graph_build_s": build_s, "export_s": export_s,
                "weight_bytes": written.weight_bytes, "external_data_bytes": data_len,
                "export_gbps": written.weight_bytes as f64 / export_s / 1e9,
                "peak_rss_mb": hwm as f64 / 1e6, "peak_anon_rss_mb": anon_peak as f64 / 1e6,
            })
        );
    } else {
        match model {
            ExportModel::Cogvideox => println!("CogVideoX-5B-shaped DiT export ({layers} blocks, {params} parameters, bf16 weights, external data)"),
            ExportModel::T5Xxl => println!("T5-XXL-shaped encoder export (24 blocks, {params} parameters, bf16 weights, external data)"),
            ExportModel::Wan13b => println!("Wan2.1-T2V-1.3B-shaped DiT export (30 blocks, {params} parameters, bf16 weights, external data)"),
        }
        println!("  graph build        {build_s:>8.2} s");
        println!(
            "  export total       {export_s:>8.2} s   ({:.2} GB/s of weights written)",
            written.weight_bytes as f64 / export_s / 1e9
        );
        println!("  weights written    {:>10}", bytes(written.weight_bytes));
        println!("  peak RSS           {:>10}   (includes file-backed pages of the memory-mapped checkpoint)", bytes(hwm));
        println!(
            "  peak anonymous RSS {:>10}   (heap: a copy of the model would show here)",
            bytes(anon_peak)
        );
    }
    if let Some(r) = &run {
        println!(
            "  one encode, 226 tokens, as its own process: {:.1} s wall, {:.2} GB peak RSS (bf16 weights widened per use)",
            r["process_s"].as_f64().unwrap_or(0.0),
            r["peak_rss_mb"].as_f64().unwrap_or(0.0) / 1e3
        );
    }
    if !keep {
        let _ = std::fs::remove_dir_all(dir);
    }
    Ok(())
}

/// Registers the exported T5 in `out`'s manifest and runs `v2l-run stage text-encoder` on one
/// 226-token prompt as its own process: wall time, peak RSS, session build and run time.
fn run_t5(
    ck: &Checkpoint,
    out: &std::path::Path,
    json: bool,
) -> Result<serde_json::Value, Failure> {
    use v2l_bench::scale::{last_json, run_measured, sibling};
    let mut m = v2l_export::Manifest::read_or_default(out)?;
    m.text_encoder = Some(v2l_export::manifest::TextEncoderEntry {
        file: "text_encoder.onnx".into(),
        model_type: "t5".into(),
        d_model: 4096,
        vocab_size: 32128,
        tokenizer: String::new(),
        weight_dtype: DType::BF16,
        config: ck.raw_config()?.clone(),
    });
    m.write(out)?;
    let ids: Vec<i64> = (0..226).map(|i| (i * 7919 % 32000) as i64).collect();
    let inputs = out.join("ids.safetensors");
    let t = std::collections::BTreeMap::from([(
        text_io::INPUT_IDS.to_string(),
        v2l_runtime::Tensor::i64(vec![1, 226], ids),
    )]);
    v2l_runtime::write_safetensors(&inputs, &t)?;
    if !json {
        eprintln!("running the encoder once (226 tokens)");
    }
    let r = run_measured(
        std::process::Command::new(sibling("v2l-run")?)
            .arg("--engine")
            .arg(out)
            .args([
                "--threads",
                "2",
                "stage",
                "text-encoder",
                "--json",
                "--inputs",
            ])
            .arg(&inputs)
            .arg("-o")
            // Beside the export: v2l-run writes nothing into an engine or export directory.
            .arg(out.with_file_name("embeds.safetensors")),
    )?;
    let j = last_json(&r.stdout)?;
    Ok(serde_json::json!({
        "tokens": 226, "process_s": r.wall_s, "peak_rss_mb": r.peak_rss_mb,
        "load_ms": j["load_ms"], "run_ms": j["run_ms"],
    }))
}

/// A `--lora-strategy` value.
fn parse_strategy(s: &str) -> Result<v2l_runtime::lora::strategy::Strategy, String> {
    v2l_runtime::lora::strategy::Strategy::parse(s)
        .ok_or_else(|| format!("`{s}`: expected fused, bound or unfused"))
}
