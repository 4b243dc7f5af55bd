//! `v2l-bench gpu`: everything a GPU user needs to check, in one command, run first on an H100
//! on 2026-11-26 (`docs/status.md`).
//!
//! For the tiny CogVideoX fixture, the CogVideoX-Fun-InP fixture, the tiny Wan I2V pipeline and
//! the demo model, on CUDA and (where `libnvinfer.so.10` loads) TensorRT, at fp32, fp16 and
//! bf16: compile the engine, check its frames against the CPU fp32 engine within the
//! precision's bound, time a DiT step, and, for models with a Video2LoRA hypernetwork, time a
//! LoRA switch with factors as inputs (`unfused`) against `fused` (an engine build per LoRA)
//! and one batched step of four requests with different LoRAs. Each row is printed as its case
//! ends; a case that fails gets its error in its row and the others still run.
//!
//! `--scale` adds the real-size cases beside PyTorch on the same GPU (`scale_cases`).
//!
//! `--dry-run` prints the plan and exits 0; without it, a machine without a GPU gets an error
//! saying so, exit code 1, and nothing is written. `--provider cpu` runs the whole plan on ONNX
//! Runtime's CPU provider instead: how the check itself is tested on machines without a GPU.

use std::path::{Path, PathBuf};

use serde::Serialize;
use v2l_runtime::backend::{Backend, Precision};

use crate::gpu_scale::{scale_cases, ScaleCase};
use crate::Failure;

/// What `v2l-bench gpu` was asked.
#[derive(clap::Args, Clone, Debug)]
pub struct GpuBench {
    /// Print the plan and exit without running anything
    #[arg(long)]
    pub dry_run: bool,
    /// Scratch directory for the engines it compiles
    #[arg(long, default_value = "target/v2l-bench-gpu")]
    pub dir: PathBuf,
    /// Runs per timing (medians are reported)
    #[arg(long, default_value_t = 5)]
    pub repeat: usize,
    /// Add the real-size cases: the 5B-width DiT (2 blocks, batch 2, 5,626 and 17,776 tokens)
    /// and the real VAE decode (5 latent frames at 60x90), beside PyTorch on the same GPU
    #[arg(long)]
    pub scale: bool,
    /// Python with torch (CUDA) and diffusers, for the PyTorch side of `--scale`
    #[arg(long, value_name = "PY", default_value = "python3")]
    pub torch_python: PathBuf,
    /// Only the cases whose model name contains this (e.g. `tiny`, `fun`, `wan`, `effects`)
    #[arg(long, value_name = "TEXT")]
    pub only: Option<String>,
    /// After each case's figures, one more generation with ONNX Runtime's per-node traces:
    /// where each graph's time goes, by operator and provider (traces under --dir). Run it with
    /// CUDA_LAUNCH_BLOCKING=1 so a node's time is its kernels' (its timings are then not the
    /// fast path's: profile in a run of its own)
    #[arg(long)]
    pub profile: bool,
    /// With --scale: also run v2l's side of each real-size case under other kernel choices, a
    /// row each (the DiT held to each attention kernel: flash, memory-efficient, cuDNN flash,
    /// and below fp32 with its GELUs in the engine's type;
    /// the VAE with cuDNN's heuristic convolution search, a small workspace, channels-last
    /// (prefer_nhwc), tiled, and below fp32 with its GroupNorm statistics as exported; both
    /// with CUDA graphs, timed after the plain run and the capture)
    #[arg(long, requires = "scale")]
    pub sweep: bool,
    /// With --scale: only the real-size cases whose `STAGE PRECISION FRAMESxHxW` contains this
    /// (e.g. `vae-decode bf16`, `dit bf16 49x`): one GPU session measures what matters first
    #[arg(long, value_name = "TEXT", requires = "scale")]
    pub scale_only: Option<String>,
    /// With --scale: every real-size case at this size instead (`FRAMESxHEIGHTxWIDTH`, frames
    /// 1 + 4k, sides multiples of 16), e.g. `9x64x96` with `--provider cpu` to check the
    /// PyTorch and v2l sides end to end where there is no GPU
    #[arg(long, value_name = "FxHxW", requires = "scale", value_parser = parse_scale_size)]
    pub scale_size: Option<[usize; 3]>,
    /// Start no case (or real-size variant) after this many minutes, for a GPU lent for a
    /// fixed time: the rest get a row saying they were not started, and the check exits
    /// non-zero. Cases run in plan order, the real sizes last
    #[arg(long, value_name = "MIN")]
    pub budget_min: Option<f64>,
    /// Run every case on this ONNX Runtime provider: `cpu` checks the check itself on a machine
    /// without a GPU (frames against the CPU fp32 engine, timings of the CPU; with --scale, v2l's
    /// CPU engines beside PyTorch on the CPU)
    #[arg(long, value_enum, default_value = "gpu")]
    pub provider: ProviderArg,
    #[arg(skip)]
    pub json: bool,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq)]
pub enum ProviderArg {
    Gpu,
    Cpu,
}

/// One model x backend x precision of the plan.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Case {
    pub model: &'static str,
    pub backend: &'static str,
    pub precision: &'static str,
    /// Frames' relative L2 against the CPU fp32 engine must stay below this.
    pub parity_bound: f64,
    /// The `v2l-compile` flags that build it.
    pub compile: Vec<String>,
    /// What is measured once it is built.
    pub measures: Vec<&'static str>,
    /// Why it will not run here (TensorRT without its library).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
}

/// One model of the plan: where it comes from and whether it has a Video2LoRA hypernetwork.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Model {
    pub name: &'static str,
    /// A model directory of the repository, or Wan's fixture parts (assembled at run time).
    pub source: &'static str,
    pub hypernet: bool,
}

/// The models it checks: the tiny fixtures (random weights) and the embedded demo model.
pub const MODELS: [Model; 4] = [
    Model {
        name: "cogvideox-tiny",
        source: "tests/fixtures/cogvideox-tiny",
        hypernet: true,
    },
    Model {
        name: "cogvideox-fun-inp-tiny",
        source: "tests/fixtures/cogvideox-fun-inp-tiny",
        hypernet: true,
    },
    Model {
        name: "wan-tiny-i2v",
        source: "tests/fixtures/wan-tiny",
        hypernet: false,
    },
    Model {
        name: "cogvideox-effects",
        source: "models/cogvideox-effects",
        hypernet: true,
    },
];

/// Frames' relative L2 bound against the CPU fp32 engine: fp32 is fp32 on the GPU too (TF32 is
/// off unless an engine asks for it), so only kernel order differs (1e-3); fp16 and bf16 the
/// bounds their CPU-emulated engines meet (docs/precision.md).
pub fn parity_bound(p: Precision) -> f64 {
    match p {
        Precision::Fp32 => 1e-3,
        Precision::Fp16 => 2e-2,
        _ => 6e-2,
    }
}

/// Whether TensorRT can run here: ONNX Runtime 1.31.1's TensorRT provider needs TensorRT 10
/// (`libnvinfer.so.10`) for CUDA 13, which no PyPI wheel installs without NVIDIA's own index.
pub fn tensorrt_here() -> Result<(), String> {
    const LIB: &str = "libnvinfer.so.10";
    match v2l_runtime::backend::built_into_onnxruntime(Backend::TensorRt) {
        Ok(false) => Err("this ONNX Runtime library has no TensorRT provider".into()),
        Err(e) => Err(e.to_string()),
        Ok(true) if v2l_runtime::cuda_libs::loads_by_name(LIB) => Ok(()),
        Ok(true) => Err(format!(
            "{LIB} does not load (TensorRT 10 is not on this machine's loader path)"
        )),
    }
}

/// The plan: every model on CUDA and TensorRT at fp32, fp16 and bf16; the TensorRT cases
/// carry `tensorrt`'s reason when they cannot run.
pub fn plan(tensorrt: Result<(), String>) -> Vec<Case> {
    let mut out = Vec::new();
    for model in MODELS {
        for b in [Backend::Cuda, Backend::TensorRt] {
            for p in [Precision::Fp32, Precision::Fp16, Precision::Bf16] {
                let mut measures = vec![
                    "parity against CPU fp32 (2 steps, fixed noise)",
                    "DiT step (batch 2)",
                ];
                if b == Backend::Cuda {
                    measures.push("the same with CUDA graphs: parity, DiT step, stages");
                }
                if model.hypernet {
                    measures
                        .push("LoRA switch: unfused (factors as inputs) vs fused (engine build)");
                    measures.push("batched step: 4 requests, 4 LoRAs, one DiT call");
                }
                out.push(Case {
                    model: model.name,
                    backend: b.name(),
                    precision: p.name(),
                    parity_bound: parity_bound(p),
                    compile: vec![
                        "--backend".into(),
                        b.name().into(),
                        "--precision".into(),
                        p.name().into(),
                    ],
                    measures,
                    skipped: match (&tensorrt, b) {
                        (Err(why), Backend::TensorRt) => Some(format!("skipped: {why}")),
                        _ => None,
                    },
                });
            }
        }
    }
    out
}

/// What every figure of this run was measured on: the GPU (`nvidia-smi`: name, memory, driver),
/// the ONNX Runtime library and the CPU, so a figure can be compared only with one of its card.
fn machine_line(on_cpu: bool) -> String {
    let gpu = match on_cpu {
        true => "none (--provider cpu)".to_string(),
        false => std::process::Command::new("nvidia-smi")
            .args([
                "--query-gpu=name,memory.total,driver_version",
                "--format=csv,noheader",
            ])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .trim()
                    .replace('\n', "; ")
            })
            .unwrap_or_else(|| "? (nvidia-smi did not answer)".into()),
    };
    let ort = match v2l_runtime::ort_env::init() {
        Ok(_) => v2l_runtime::ort_env::library_path()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "?".into()),
        Err(e) => format!("not loaded ({e})"),
    };
    let cpu = crate::common::cpu_facts();
    let cores = cpu["cores"].as_u64().unwrap_or(1) as usize;
    format!(
        "GPU {gpu}; ONNX Runtime {ort}; {}",
        crate::common::cpu_line(&cpu, cores)
    )
}

/// Why this machine cannot run the plan, or `None` when it has a GPU ONNX Runtime can use.
pub fn no_gpu_reason() -> Option<String> {
    let nvidia = v2l_runtime::cuda_libs::gpu_present()
        || std::process::Command::new("nvidia-smi")
            .arg("-L")
            .output()
            .is_ok_and(|o| o.status.success() && !o.stdout.is_empty());
    if !nvidia {
        return Some("no NVIDIA GPU found (no /dev/nvidia0, `nvidia-smi -L` lists none)".into());
    }
    match v2l_runtime::backend::built_into_onnxruntime(Backend::Cuda) {
        Ok(true) => None,
        Ok(false) => Some(
            "the ONNX Runtime library in use has no CUDA provider: run `bash scripts/setup.sh --gpu` \
             (or point ORT_DYLIB_PATH at onnxruntime-gpu's libonnxruntime.so)"
                .into(),
        ),
        Err(e) => Some(e.to_string()),
    }
}

pub fn bench_gpu(b: &GpuBench) -> Result<(), Failure> {
    if let Some(m) = b.budget_min.filter(|m| !(m.is_finite() && *m > 0.0)) {
        return Err(Failure::usage(format!(
            "--budget-min {m}: a number of minutes above 0"
        )));
    }
    let budget = crate::gpu_scale::Budget::new(b.budget_min);
    let on_cpu = b.provider == ProviderArg::Cpu;
    let tensorrt = if on_cpu {
        Err("--provider cpu".to_string())
    } else {
        tensorrt_here()
    };
    let cases: Vec<Case> = plan(tensorrt)
        .into_iter()
        .filter(|c| b.only.as_ref().is_none_or(|o| c.model.contains(o.as_str())))
        .collect();
    let scale: Vec<ScaleCase> = match b.scale {
        true => scale_cases()
            .into_iter()
            .map(|c| match b.scale_size {
                Some(size) => c.at(size),
                None => c,
            })
            // At one --scale-size the DiT's two sizes are one case.
            .scan(std::collections::HashSet::new(), |seen, c| {
                Some(seen.insert(c.label()).then_some(c))
            })
            .flatten()
            .filter(|c| (b.scale_only.as_deref()).is_none_or(|o| c.label().contains(o)))
            .collect(),
        false => Vec::new(),
    };
    if scale.is_empty() && b.scale {
        return Err(Failure::usage(format!(
            "--scale-only {:?} matches no real-size case",
            b.scale_only.as_deref().unwrap_or_default()
        ))
        .with_hint("`v2l-bench gpu --dry-run --scale` lists them"));
    }
    if b.dry_run {
        print_plan(&cases, &scale, b.sweep, b.json, on_cpu);
        return Ok(());
    }
    if !on_cpu {
        if let Some(why) = no_gpu_reason() {
            return Err(Failure::new(format!("cannot run the GPU check: {why}"))
                .with_hint("`v2l-bench gpu --dry-run` prints what it would run"));
        }
    }
    if b.profile && !on_cpu && std::env::var("CUDA_LAUNCH_BLOCKING").as_deref() != Ok("1") {
        eprintln!(
            "v2l-bench gpu: --profile without CUDA_LAUNCH_BLOCKING=1: node times are launch times, \
             not kernel times"
        );
    }
    eprintln!("v2l-bench gpu: {}", machine_line(on_cpu));
    if let Ok(o) = std::env::var("V2L_CUDA_OPTIONS") {
        eprintln!("v2l-bench gpu: CUDA provider settings from V2L_CUDA_OPTIONS: {o}");
    }
    let (mut failed, mut not_started) = run_cases(b, &cases, budget)?;
    if b.scale {
        let (f, n) = crate::gpu_scale::run(
            &crate::gpu_scale::Settings {
                dir: b.dir.join("scale"),
                on_cpu,
                torch_python: b.torch_python.clone(),
                repeat: b.repeat,
                json: b.json,
                profile: b.profile,
                sweep: b.sweep,
                budget,
            },
            &scale,
        )?;
        failed += f;
        not_started += n;
    }
    match (failed, not_started) {
        (0, 0) => Ok(()),
        (0, n) => Err(Failure::new(format!(
            "{n} row(s) not started: the --budget-min time was spent (every row that ran passed)"
        ))),
        (f, 0) => Err(Failure::new(format!(
            "{f} GPU case(s) failed or missed their bound (see their rows)"
        ))),
        (f, n) => Err(Failure::new(format!(
            "{f} GPU case(s) failed or missed their bound (see their rows); {n} row(s) not \
             started: the --budget-min time was spent"
        ))),
    }
}

fn print_plan(cases: &[Case], scale: &[ScaleCase], sweep: bool, json: bool, on_cpu: bool) {
    if json {
        let v = serde_json::json!({"dry_run": true, "cases": cases, "scale": scale});
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return;
    }
    println!(
        "v2l-bench gpu --dry-run: {} cases{} (nothing is run or written)",
        cases.len(),
        if scale.is_empty() {
            String::new()
        } else {
            format!(" and {} real-size cases", scale.len())
        }
    );
    println!(
        "{:<24} {:<9} {:<9} {:>12}  compile",
        "model", "backend", "precision", "parity bound"
    );
    for c in cases {
        println!(
            "{:<24} {:<9} {:<9} {:>12.0e}  {}",
            c.model,
            c.backend,
            c.precision,
            c.parity_bound,
            match &c.skipped {
                Some(why) => why.clone(),
                None => format!("v2l-compile <export> {}", c.compile.join(" ")),
            }
        );
    }
    let mut shown: Vec<&str> = Vec::new();
    println!("each case measures:");
    for m in cases.iter().flat_map(|c| c.measures.iter()) {
        if !shown.contains(m) {
            shown.push(m);
            println!("  - {m}");
        }
    }
    println!("  (LoRA cases only for models with a Video2LoRA hypernetwork; Wan's has none)");
    if !scale.is_empty() {
        let sides = match on_cpu {
            true => "v2l cpu beside PyTorch on the CPU (--provider cpu: a check of the check)",
            false => "v2l cuda beside PyTorch on the same GPU",
        };
        println!("real size (--scale), {sides} (fp32 with TF32 off as the reference, bf16 as the baseline):");
        for s in scale {
            println!(
                "  {:<10} {:<5} {}x{}x{}  {}",
                s.stage, s.precision, s.size[0], s.size[1], s.size[2], s.what
            );
        }
        println!("  each: median ms, peak GPU memory, relative L2 against PyTorch fp32");
        if sweep {
            println!(
                "  --sweep: v2l's side again, a row each, under (fp32 DiTs: memory-efficient only)"
            );
            for stage in ["dit", "vae-decode"] {
                for v in crate::gpu_scale::variants(stage, "bf16").iter().skip(1) {
                    let how = match (v.cuda_options, v.vae_tiling, v.compile_flags) {
                        ("", _, [_, ..]) => format!(
                            "an engine of its own: v2l-compile {} ({})",
                            v.compile_flags.join(" "),
                            ["fp16", "bf16"]
                                .into_iter()
                                .filter(|p| crate::gpu_scale::variants(stage, p).contains(v))
                                .collect::<Vec<_>>()
                                .join("/")
                        ),
                        ("", tiling, _) => format!("--vae-tiling {tiling}"),
                        (o, _, _) => format!("V2L_CUDA_OPTIONS={o}"),
                    };
                    println!("    {stage:<10} {:<20} {how}", v.name);
                }
            }
        }
    }
}

/// One case's figures; `error` instead where it failed.
#[derive(Serialize, Default)]
struct Figures {
    model: String,
    backend: String,
    precision: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    frames_rel_l2: Option<f64>,
    within_bound: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    dit_step_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    switch_unfused_ms: Option<f64>,
    /// `unfused` back to a LoRA whose laid-out inputs were kept (`--factor-cache-mb`).
    #[serde(skip_serializing_if = "Option::is_none")]
    switch_unfused_kept_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    switch_fused_ms: Option<f64>,
    /// `bound` on a cuda engine: the LoRA merged into the DiT's weights on the device.
    #[serde(skip_serializing_if = "Option::is_none")]
    switch_bound_ms: Option<f64>,
    /// A DiT step of that engine with the LoRA merged (the bare DiT's work).
    #[serde(skip_serializing_if = "Option::is_none")]
    bound_step_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    batched_step_ms: Option<f64>,
    /// The stages beside the DiT, warm medians on this engine and on the CPU fp32 engine in the
    /// same process: `vae_encode` (the first frame), `vae_decode`, `predict_lora` (Video2LoRA).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    stages: Vec<StageFigure>,
    /// The first generation on each engine, cold: cuDNN's convolution search for each new shape
    /// and ONNX Runtime's arena growth (and, in the first case of the process only, CUDA's lazy
    /// loading of kernels): what the first request of a size waits. Whole milliseconds on this
    /// engine and on the CPU fp32 engine, then its stages.
    #[serde(skip_serializing_if = "Option::is_none")]
    first_generation_ms: Option<(f64, f64)>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    first_stages: Vec<StageFigure>,
    /// cuda cases: the same generation with each session's runs captured as CUDA graphs
    /// (bound runs; on `--provider cpu` the bound runs alone): its frames against the CPU fp32
    /// engine's, its DiT step and its stages, warm (after the plain run and the capture).
    #[serde(skip_serializing_if = "Option::is_none")]
    graph_frames_rel_l2: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    graph_dit_step_ms: Option<f64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    graph_stages: Vec<StageFigure>,
    #[serde(skip_serializing_if = "Option::is_none")]
    graph_error: Option<String>,
    /// The case's graphs ONNX Runtime would not capture (built again without CUDA graphs),
    /// each with its reason.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    graph_not_captured: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    skipped: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    /// `--profile`: each graph's traced generation, by operator and provider.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    profile: Vec<(String, v2l_tools::profile::Profile)>,
}

/// One stage's warm median on the case's engine and on the CPU fp32 engine.
#[derive(Serialize, Clone, Debug, PartialEq)]
struct StageFigure {
    stage: &'static str,
    engine_ms: f64,
    cpu_engine_ms: f64,
}

/// `engine` and `cpu` stage times (each a run's `Timings::ms`) side by side, medians per stage.
fn stage_figures(
    engine: &[std::collections::BTreeMap<String, f64>],
    cpu: &[std::collections::BTreeMap<String, f64>],
) -> Vec<StageFigure> {
    let median = |runs: &[std::collections::BTreeMap<String, f64>], k: &str| {
        let v: Vec<f64> = runs.iter().filter_map(|t| t.get(k).copied()).collect();
        (!v.is_empty()).then(|| crate::pipeline::stats(v).0)
    };
    ["vae_encode", "vae_decode", "predict_lora"]
        .into_iter()
        .filter_map(|k| {
            Some(StageFigure {
                stage: k,
                engine_ms: median(engine, k)?,
                cpu_engine_ms: median(cpu, k)?,
            })
        })
        .collect()
}

fn cell(v: Option<f64>, prec: usize) -> String {
    v.map(|x| format!("{x:.prec$}"))
        .unwrap_or_else(|| "-".into())
}

/// Prints one row as soon as its case ends (one JSON line each with `--json`).
fn print_row(f: &Figures, json: bool) {
    if json {
        println!("{}", serde_json::to_string(f).unwrap_or_default());
        return;
    }
    let status = match (&f.skipped, &f.error) {
        (Some(why), _) => why.clone(),
        (_, Some(e)) => format!("FAILED: {e}"),
        _ if f.within_bound => "ok".into(),
        _ => "OUTSIDE BOUND".into(),
    };
    println!(
        "{:<24} {:<9} {:<5} {:>9} {:>9} {:>11} {:>10} {:>10} {:>9}  {status}",
        f.model,
        f.backend,
        f.precision,
        f.frames_rel_l2
            .map(|x| format!("{x:.2e}"))
            .unwrap_or_else(|| "-".into()),
        cell(f.dit_step_ms, 1),
        cell(f.switch_unfused_ms, 2),
        cell(f.switch_fused_ms, 1),
        cell(f.batched_step_ms, 1),
        cell(f.switch_bound_ms, 2),
    );
    // `stage engine / cpu, …`
    let cells = |stages: &[StageFigure]| {
        let c: Vec<String> = stages
            .iter()
            .map(|s| format!("{} {:.1} / {:.1}", s.stage, s.engine_ms, s.cpu_engine_ms))
            .collect();
        c.join(", ")
    };
    if !f.stages.is_empty() {
        println!(
            "    stages, warm median ms (this engine / the CPU fp32 engine): {}",
            cells(&f.stages)
        );
    }
    if let Some(ms) = f.switch_unfused_kept_ms {
        println!("    unfused LoRA switch back to a LoRA whose inputs were kept: {ms:.2} ms");
    }
    if let Some((gpu, cpu)) = f.first_generation_ms {
        println!(
            "    first generation, cold ms (this engine / the CPU fp32 engine): {gpu:.1} / {cpu:.1}; {}",
            cells(&f.first_stages)
        );
    }
    if let Some(e) = &f.graph_error {
        println!("    CUDA graphs: FAILED: {e}");
    } else if let Some(rel) = f.graph_frames_rel_l2 {
        println!(
            "    CUDA graphs: rel L2 {rel:.2e}, step {} ms; stages, warm median ms (this engine / the CPU fp32 engine): {}",
            cell(f.graph_dit_step_ms, 1),
            cells(&f.graph_stages)
        );
        for g in &f.graph_not_captured {
            println!("      not captured: {g}");
        }
    }
    for (graph, p) in &f.profile {
        let top: Vec<String> = p
            .ops
            .iter()
            .take(4)
            .map(|o| {
                let share = 100.0 * o.ms / p.node_ms.max(f64::MIN_POSITIVE);
                format!("{} {share:.0}% ({})", o.op, o.provider)
            })
            .collect();
        println!(
            "    profile {graph}: {} run(s), {:.1} ms, {:.1} in nodes: {}",
            p.runs,
            p.run_ms,
            p.node_ms,
            top.join(", ")
        );
    }
}

/// Runs every case, printing each row as it ends; how many failed or missed their bound, and
/// how many were not started within `budget`.
fn run_cases(
    b: &GpuBench,
    cases: &[Case],
    budget: crate::gpu_scale::Budget,
) -> Result<(usize, usize), Failure> {
    std::fs::create_dir_all(&b.dir)
        .map_err(|e| Failure::new(format!("{}: {e}", b.dir.display())))?;
    if !b.json {
        println!(
            "{:<24} {:<9} {:<5} {:>9} {:>9} {:>11} {:>10} {:>10} {:>9}  status",
            "model",
            "backend",
            "prec",
            "rel L2",
            "step ms",
            "unfused ms",
            "fused ms",
            "batch4 ms",
            "bound ms"
        );
    }
    let (mut failed, mut not_started) = (0, 0);
    // The CPU fp32 engine's stage times, measured once per model.
    let mut cpu_stages = std::collections::HashMap::new();
    for c in cases {
        let mut f = Figures {
            model: c.model.into(),
            backend: c.backend.into(),
            precision: c.precision.into(),
            skipped: c.skipped.clone(),
            ..Default::default()
        };
        if let Some(why) = budget.spent().filter(|_| c.skipped.is_none()) {
            f.skipped = Some(why);
            not_started += 1;
        } else if c.skipped.is_none() {
            if let Err(e) = run_case(b, c, &mut f, &mut cpu_stages) {
                f.error = Some(e.message);
            }
            if f.error.is_some() || !f.within_bound {
                failed += 1;
            }
        }
        print_row(&f, b.json);
    }
    Ok((failed, not_started))
}

/// The model directory of `model`: Wan's is assembled from its fixture's parts.
fn model_dir(b: &GpuBench, model: &Model) -> Result<PathBuf, Failure> {
    if model.hypernet {
        return Ok(PathBuf::from(model.source));
    }
    let dst = b.dir.join(format!("{}-model", model.name));
    if dst.join("model_index.json").is_file() {
        return Ok(dst);
    }
    let src = Path::new(model.source);
    let copy = |from: &Path, to: &Path| -> std::io::Result<()> {
        std::fs::create_dir_all(to)?;
        for e in std::fs::read_dir(from)? {
            let p = e?.path();
            if p.is_file() {
                std::fs::copy(&p, to.join(p.file_name().unwrap_or_default()))?;
            }
        }
        Ok(())
    };
    for (from, to) in [
        ("transformer_i2v", "transformer"),
        ("vae", "vae"),
        ("scheduler_unipc", "scheduler"),
        ("text_encoder", "text_encoder"),
        ("image_encoder", "image_encoder"),
    ] {
        copy(&src.join(from), &dst.join(to))
            .map_err(|e| Failure::new(format!("{}: {e}", src.join(from).display())))?;
    }
    std::fs::copy(src.join("model_index.json"), dst.join("model_index.json"))
        .map_err(|e| Failure::new(format!("{}: {e}", src.display())))?;
    Ok(dst)
}

/// Each stage time of a generation (a run's `Timings::ms`).
type StageTimes = Vec<std::collections::BTreeMap<String, f64>>;

fn run_case(
    b: &GpuBench,
    c: &Case,
    f: &mut Figures,
    cpu_stages: &mut std::collections::HashMap<&'static str, StageTimes>,
) -> Result<(), Failure> {
    use v2l_runtime::engine::Engine;
    use v2l_runtime::lora::strategy::Strategy;
    use v2l_runtime::pipeline::{Pipeline, Request, RequestLora, RequestParts};
    let model = MODELS
        .iter()
        .find(|m| m.name == c.model)
        .ok_or_else(|| Failure::new(format!("unknown model {}", c.model)))?;
    let src = model_dir(b, model)?;
    let exported = b.dir.join(format!("{}-export", model.name));
    if !exported.join("manifest.json").exists() {
        export(&src, &exported, model.hypernet)?;
    }
    let cpu = b.dir.join(format!("{}-cpu", model.name));
    if !cpu.join("bundle.json").exists() {
        compile(&exported, &cpu, &[])?;
    }
    let on_cpu = b.provider == ProviderArg::Cpu;
    let gpu = b.dir.join(format!(
        "{}-{}-{}{}",
        model.name,
        c.backend,
        c.precision,
        if on_cpu { "-as-cpu" } else { "" }
    ));
    if !gpu.join("bundle.json").exists() {
        let mut flags = c.compile.clone();
        if on_cpu {
            flags[1] = "cpu".into();
        }
        compile(&exported, &gpu, &flags)?;
    }
    let open = |dir: &Path, s: Option<Strategy>| -> Result<Pipeline, Failure> {
        let e = Engine::open(dir).map_err(Failure::from)?;
        let opts = e.session_options(0);
        match s {
            Some(s) => Pipeline::load_with_strategy(e, &opts, s),
            None => Pipeline::load(e, &opts),
        }
        .map_err(Failure::from)
    };
    let mut cpu_p = open(&cpu, None)?;
    let lora_strategy = model.hypernet.then_some(Strategy::Unfused);
    let mut gpu_p = open(&gpu, lora_strategy)?;
    let req: Request = request(gpu_p.engine())?;
    let (a, cpu_first_ms) = crate::pipeline::time(|| cpu_p.generate(&req, &mut |_, _| true));
    let a = a.map_err(Failure::from)?;
    // The CPU engine's stage times, warm (the parity run above was its first), once per model.
    if !cpu_stages.contains_key(model.name) {
        let mut times = Vec::new();
        for _ in 0..b.repeat.max(1) {
            let g = cpu_p
                .generate(&req, &mut |_, _| true)
                .map_err(Failure::from)?;
            times.push(g.timings.ms);
        }
        if model.hypernet {
            predict_times(&mut cpu_p, &req, b.repeat, &mut times)?;
        }
        cpu_stages.insert(model.name, times);
    }
    drop(cpu_p);
    let (g, first_ms) = crate::pipeline::time(|| gpu_p.generate(&req, &mut |_, _| true));
    let g = g.map_err(Failure::from)?;
    f.first_generation_ms = Some((first_ms, cpu_first_ms));
    f.first_stages = stage_figures(
        std::slice::from_ref(&g.timings.ms),
        std::slice::from_ref(&a.timings.ms),
    );
    let rel = a.frames.rel_l2(&g.frames);
    f.frames_rel_l2 = Some(rel);
    f.within_bound = rel <= c.parity_bound;
    let mut steps = Vec::new();
    let mut stages = Vec::new();
    for _ in 0..b.repeat.max(1) {
        let (r, ms) = crate::pipeline::time(|| gpu_p.generate(&req, &mut |_, _| true));
        stages.push(r.map_err(Failure::from)?.timings.ms);
        steps.push(ms / req.steps as f64);
    }
    f.dit_step_ms = Some(crate::pipeline::stats(steps).0);
    if model.hypernet {
        predict_times(&mut gpu_p, &req, b.repeat, &mut stages)?;
    }
    f.stages = stage_figures(&stages, &cpu_stages[model.name]);
    if c.backend == "cuda" {
        let cpu_times = &cpu_stages[model.name];
        if let Err(e) = graph_pass(
            b,
            &gpu,
            lora_strategy,
            &req,
            (&a.frames, c.parity_bound),
            cpu_times,
            f,
        ) {
            f.graph_error = Some(e.message);
        }
    }
    if b.profile {
        f.profile = profile_case(&gpu, lora_strategy, &req)?;
    }
    if !model.hypernet {
        return Ok(());
    }
    let loras = predicted_loras(&mut gpu_p, &req, 4)?;
    let switch = |p: &mut Pipeline| -> Result<f64, Failure> {
        let mut t = Vec::new();
        for i in 0..b.repeat.max(1) {
            let (r, ms) = crate::pipeline::time(|| p.set_lora(Some(&loras[i % loras.len()])));
            r.map_err(Failure::from)?;
            t.push(ms);
        }
        Ok(crate::pipeline::stats(t).0)
    };
    f.switch_unfused_ms = Some(switch(&mut gpu_p)?);
    // The same switches with every LoRA's laid-out inputs kept: after a round that lays each
    // out, a switch hands kept inputs (on the device) to the session.
    gpu_p.set_factor_cache(u64::MAX);
    for l in &loras {
        gpu_p.set_lora(Some(l)).map_err(Failure::from)?;
    }
    f.switch_unfused_kept_ms = Some(switch(&mut gpu_p)?);
    gpu_p.set_factor_cache(0);
    let batch: Vec<Request> = loras
        .iter()
        .map(|l| {
            let parts = RequestParts {
                lora: RequestLora::Loras(vec![l.clone()]),
                ..RequestParts::clone(&req)
            };
            parts.check(gpu_p.engine())
        })
        .collect::<Result<_, _>>()?;
    let (r, batched_ms) = crate::pipeline::time(|| gpu_p.generate_batch(&batch, &mut |_, _| true));
    r.map_err(Failure::from)?;
    f.batched_step_ms = Some(batched_ms / req.steps as f64);
    drop(gpu_p);
    let mut fused = open(&gpu, Some(Strategy::Fused))?;
    f.switch_fused_ms = Some(switch(&mut fused)?);
    drop(fused);
    // A cuda engine's `bound`: the switch merges on the device; a step runs the bare DiT.
    let merges = Engine::open(&gpu)
        .map_err(Failure::from)?
        .dit_variant(v2l_contracts::bundle::VariantGraph::LoraMerge)
        .is_some();
    if merges {
        let mut bound = open(&gpu, Some(Strategy::Bound))?;
        f.switch_bound_ms = Some(switch(&mut bound)?);
        let mut steps = Vec::new();
        for _ in 0..b.repeat.max(1) {
            let (r, ms) = crate::pipeline::time(|| bound.generate(&req, &mut |_, _| true));
            r.map_err(Failure::from)?;
            steps.push(ms / req.steps as f64);
        }
        f.bound_step_ms = Some(crate::pipeline::stats(steps).0);
    }
    Ok(())
}

/// The case's generation on engine `dir` again with each session's runs captured as CUDA
/// graphs and replayed (`enable_cuda_graph=1`, through bound buffers; on the CPU provider the
/// bound buffers alone): two generations and a LoRA prediction to warm up (each set of
/// shapes runs plain once, then is captured), then warm medians. Its frames must stay within
/// the case's bound of the CPU fp32 engine's.
fn graph_pass(
    b: &GpuBench,
    dir: &Path,
    strategy: Option<v2l_runtime::lora::strategy::Strategy>,
    req: &v2l_runtime::pipeline::Request,
    (cpu_frames, bound): (&v2l_runtime::Tensor, f64),
    cpu_stages: &StageTimes,
    f: &mut Figures,
) -> Result<(), Failure> {
    use v2l_runtime::pipeline::Pipeline;
    let e = v2l_runtime::engine::Engine::open(dir).map_err(Failure::from)?;
    let hypernet = e.manifest.hypernet.is_some();
    let before = v2l_runtime::session::uncaptured_graphs().len();
    let mut opts = e.session_options(0);
    opts.bound_runs = true;
    opts.backend
        .cuda
        .insert("enable_cuda_graph".into(), "1".into());
    let mut p = match strategy {
        Some(s) => Pipeline::load_with_strategy(e, &opts, s),
        None => Pipeline::load(e, &opts),
    }
    .map_err(Failure::from)?;
    for _ in 0..2 {
        p.generate(req, &mut |_, _| true).map_err(Failure::from)?;
    }
    let (mut steps, mut stages, mut frames) = (Vec::new(), Vec::new(), None);
    for _ in 0..b.repeat.max(1) {
        let (r, ms) = crate::pipeline::time(|| p.generate(req, &mut |_, _| true));
        let g = r.map_err(Failure::from)?;
        stages.push(g.timings.ms);
        steps.push(ms / req.steps as f64);
        frames = Some(g.frames);
    }
    if hypernet {
        p.predict(&clip(req, 0)?, 1.0).map_err(Failure::from)?;
        predict_times(&mut p, req, b.repeat, &mut stages)?;
    }
    f.graph_not_captured = v2l_runtime::session::uncaptured_graphs()
        .into_iter()
        .skip(before)
        .collect();
    let rel = frames.map(|g| cpu_frames.rel_l2(&g));
    f.within_bound &= rel.is_some_and(|r| r <= bound);
    f.graph_frames_rel_l2 = rel;
    f.graph_dit_step_ms = Some(crate::pipeline::stats(steps).0);
    f.graph_stages = stage_figures(&stages, cpu_stages);
    Ok(())
}

/// One generation of `req` on engine `dir` with every session traced into a fresh
/// `<dir>/profile`: each graph's time by operator and provider.
fn profile_case(
    dir: &Path,
    strategy: Option<v2l_runtime::lora::strategy::Strategy>,
    req: &v2l_runtime::pipeline::Request,
) -> Result<Vec<(String, v2l_tools::profile::Profile)>, Failure> {
    use v2l_runtime::pipeline::Pipeline;
    let traces = dir.join("profile");
    let _ = std::fs::remove_dir_all(&traces);
    std::fs::create_dir_all(&traces)
        .map_err(|e| Failure::new(format!("{}: {e}", traces.display())))?;
    let e = v2l_runtime::engine::Engine::open(dir).map_err(Failure::from)?;
    let mut opts = e.session_options(0);
    opts.profile = Some(traces.clone());
    let mut p = match strategy {
        Some(s) => Pipeline::load_with_strategy(e, &opts, s),
        None => Pipeline::load(e, &opts),
    }
    .map_err(Failure::from)?;
    p.generate(req, &mut |_, _| true).map_err(Failure::from)?;
    // The traces are finished as the sessions drop.
    drop(p);
    v2l_tools::profile::by_graph(&traces).map_err(Failure::new)
}

/// A sibling binary of this one (`v2l-export`, `v2l-compile`).
fn tool(name: &str) -> Result<std::process::Command, Failure> {
    let exe = std::env::current_exe().map_err(|e| Failure::new(format!("own path: {e}")))?;
    Ok(std::process::Command::new(exe.with_file_name(name)))
}

fn succeeded(o: std::io::Result<std::process::Output>, what: &str) -> Result<(), Failure> {
    let o = o.map_err(|e| Failure::new(format!("{what}: {e}")))?;
    if !o.status.success() {
        return Err(Failure::new(format!(
            "{what} failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )));
    }
    Ok(())
}

/// `v2l-export pipeline` of a model directory, with its Video2LoRA hypernetwork where it has one.
fn export(model: &Path, out: &Path, hypernet: bool) -> Result<(), Failure> {
    let mut cmd = tool("v2l-export")?;
    cmd.arg("pipeline").arg(model);
    if hypernet {
        cmd.arg("--hypernet")
            .arg(model.join("hypernetwork.safetensors"))
            .arg("--lilora")
            .arg(model.join("lilora.safetensors"));
    }
    succeeded(cmd.arg("-o").arg(out).output(), "v2l-export")
}

fn compile(export: &Path, out: &Path, flags: &[String]) -> Result<(), Failure> {
    let o = tool("v2l-compile")?
        .arg(export)
        .arg("-o")
        .arg(out)
        .args(flags)
        .output();
    succeeded(o, "v2l-compile")
}

/// A seeded request at the engine's default size, two steps at guidance 6.
fn request(e: &v2l_runtime::engine::Engine) -> Result<v2l_runtime::pipeline::Request, Failure> {
    use v2l_runtime::pipeline::{gaussian_noise, RequestLora, RequestParts};
    // Wan's configs name no sample size: the tiny fixture's own (9 frames at 32x48).
    let (frames, height, width) = match e.default_size() {
        (Some(f), Some(h), Some(w)) => (f, h, w),
        _ => (9, 32, 48),
    };
    let d = e
        .manifest
        .dit
        .as_ref()
        .ok_or_else(|| Failure::new("no DiT"))?;
    let len = e.text_sequence_length().unwrap_or(226);
    let rgb = gaussian_noise(vec![height * width * 3], 2)
        .as_f32("rgb")
        .map_err(Failure::from)?
        .iter()
        .map(|x| (x * 40.0 + 128.0).clamp(0.0, 255.0) as u8)
        .collect();
    let parts = RequestParts {
        image: Some(v2l_runtime::video::Frames {
            frames: 1,
            height,
            width,
            rgb,
        }),
        image_embeds: None,
        prompt_embeds: gaussian_noise(vec![1, len, d.text_embed_dim], 3),
        negative_prompt_embeds: gaussian_noise(vec![1, len, d.text_embed_dim], 4),
        frames,
        steps: 2,
        guidance: 6.0,
        noise: e
            .seeded_noise(frames, height, width, 5)
            .map_err(Failure::from)?,
        lora: RequestLora::Resident,
        sampler: None,
        inpaint_noise: None,
        // Fun-InP noises its conditioning clip from the request's seed.
        seed: Some(5),
        cache: None,
    };
    Ok(parts.check(e)?)
}

/// `n` LoRAs predicted by the engine's hypernetwork from seeded clips.
/// A seeded reference clip of the request's size.
fn clip(
    req: &v2l_runtime::pipeline::Request,
    seed: u64,
) -> Result<v2l_runtime::video::Frames, Failure> {
    let first = req
        .image
        .as_ref()
        .ok_or_else(|| Failure::new("no first frame"))?;
    let rgb = v2l_runtime::pipeline::gaussian_noise(
        vec![req.frames * first.height * first.width * 3],
        10 + seed,
    )
    .as_f32("clip")
    .map_err(Failure::from)?
    .iter()
    .map(|x| (x * 40.0 + 128.0).clamp(0.0, 255.0) as u8)
    .collect();
    Ok(v2l_runtime::video::Frames {
        frames: req.frames,
        height: first.height,
        width: first.width,
        rgb,
    })
}

/// Video2LoRA's prediction from a reference clip (VAE encode and hypernetwork), timed warm:
/// one untimed run, then `repeat` runs, each pushed as a `predict_lora` time.
fn predict_times(
    p: &mut v2l_runtime::pipeline::Pipeline,
    req: &v2l_runtime::pipeline::Request,
    repeat: usize,
    times: &mut Vec<std::collections::BTreeMap<String, f64>>,
) -> Result<(), Failure> {
    let c = clip(req, 0)?;
    p.predict(&c, 1.0).map_err(Failure::from)?;
    for _ in 0..repeat.max(1) {
        let (r, ms) = crate::pipeline::time(|| p.predict(&c, 1.0));
        r.map_err(Failure::from)?;
        times.push([("predict_lora".to_string(), ms)].into());
    }
    Ok(())
}

fn predicted_loras(
    p: &mut v2l_runtime::pipeline::Pipeline,
    req: &v2l_runtime::pipeline::Request,
    n: usize,
) -> Result<Vec<v2l_runtime::lora::AppliedLora>, Failure> {
    let mut out = Vec::with_capacity(n);
    for seed in 0..n as u64 {
        let clip = clip(req, seed)?;
        out.push(v2l_runtime::lora::AppliedLora {
            lora: p.predict(&clip, 1.0).map_err(Failure::from)?.lora.into(),
            source: format!("clip{seed}").into(),
            multiplier: 1.0,
        });
    }
    Ok(out)
}

/// `--scale-size`: `FRAMESxHEIGHTxWIDTH` with frames 1 + 4k (the VAE's temporal compression)
/// and sides multiples of 16 (the VAE's 8 times the DiT's patch of 2).
fn parse_scale_size(s: &str) -> Result<[usize; 3], String> {
    let bad = || format!("{s:?}: want FRAMESxHEIGHTxWIDTH, e.g. 9x64x96");
    let parts: Vec<usize> = s
        .split('x')
        .map(|p| p.trim().parse::<usize>().map_err(|_| bad()))
        .collect::<Result<_, _>>()?;
    let [f, h, w] = <[usize; 3]>::try_from(parts).map_err(|_| bad())?;
    if f == 0 || (f - 1) % 4 != 0 {
        return Err(format!("{s:?}: frames must be 1 + 4k (1, 5, 9, …, 49)"));
    }
    if h == 0 || w == 0 || h % 16 != 0 || w % 16 != 0 || h > 2048 || w > 2048 {
        return Err(format!(
            "{s:?}: height and width must be multiples of 16 up to 2048"
        ));
    }
    Ok([f, h, w])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plan_covers_every_model_backend_and_precision() {
        let p = plan(Ok(()));
        assert_eq!(p.len(), MODELS.len() * 2 * 3);
        assert!(p.iter().all(|c| c.skipped.is_none()));
        for m in [
            "cogvideox-tiny",
            "cogvideox-fun-inp-tiny",
            "wan-tiny-i2v",
            "cogvideox-effects",
        ] {
            assert_eq!(p.iter().filter(|c| c.model == m).count(), 6, "{m}");
        }
        for c in &p {
            assert_eq!(
                c.compile[..2],
                ["--backend".to_string(), c.backend.to_string()]
            );
            assert!(c.parity_bound > 0.0 && c.parity_bound < 0.1);
            let lora = c.measures.iter().any(|m| m.contains("LoRA"));
            assert_eq!(lora, c.model != "wan-tiny-i2v", "{c:?}");
        }
        assert!(parity_bound(Precision::Fp32) < parity_bound(Precision::Fp16));
    }

    #[test]
    fn tensorrt_without_its_library_is_skipped_with_the_reason() {
        let p = plan(Err("libnvinfer.so.10 does not load".into()));
        for c in &p {
            match c.backend {
                "tensorrt" => assert!(
                    c.skipped
                        .as_deref()
                        .is_some_and(|s| s.contains("libnvinfer.so.10")),
                    "{c:?}"
                ),
                _ => assert!(c.skipped.is_none(), "{c:?}"),
            }
        }
        // On this machine (the CPU library, or a GPU one without TensorRT 10) it cannot run.
        if !v2l_runtime::cuda_libs::loads_by_name("libnvinfer.so.10") {
            assert!(tensorrt_here().is_err());
        }
    }

    #[test]
    fn stages_are_compared_only_where_both_engines_ran_them() {
        let run = |pairs: &[(&str, f64)]| -> std::collections::BTreeMap<String, f64> {
            pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
        };
        let engine = [
            run(&[("vae_decode", 3.0), ("dit", 9.0)]),
            run(&[("vae_decode", 1.0)]),
            run(&[("vae_decode", 2.0), ("predict_lora", 4.0)]),
        ];
        let cpu = [run(&[("vae_decode", 10.0), ("vae_encode", 5.0)])];
        let f = stage_figures(&engine, &cpu);
        assert_eq!(
            f,
            [StageFigure {
                stage: "vae_decode",
                engine_ms: 2.0,
                cpu_engine_ms: 10.0
            }]
        );
    }

    #[test]
    fn every_sweep_variant_is_a_setting_v2l_takes() {
        for stage in ["dit", "vae-decode"] {
            let v = crate::gpu_scale::variants(stage, "bf16");
            assert_eq!(v[0].name, "default");
            assert!(v.len() > 2, "{stage}");
            // CUDA graphs, timed after the plain run and the capture.
            assert!(v
                .iter()
                .any(|v| v.cuda_options == "enable_cuda_graph=1" && v.warmup_runs == 2));
            assert!(v.iter().filter(|v| v.warmup_runs > 0).count() == 1);
            // The flash kernels take no fp32: fp32 DiTs are not held to them. Every bit set
            // keeps a fused kernel the precision has behind the one tried first
            // (memory-efficient, 2), so none falls to the unfused attention.
            let fp32 = crate::gpu_scale::variants(stage, "fp32");
            for v in fp32.iter().chain(&v) {
                if let Some(bits) = v.cuda_options.strip_prefix("sdpa_kernel=") {
                    let bits: u32 = bits.parse().unwrap();
                    assert_eq!(bits & 2, 2, "{stage} {}", v.name);
                }
            }
            assert!(fp32
                .iter()
                .all(|v| !v.cuda_options.contains("sdpa") || v.cuda_options == "sdpa_kernel=2"));
            // An engine of its own only where the compile takes its flag (at fp32 only
            // `--exported-group-norm`; bin/tests/gpu_placement.rs checks the flags).
            assert!(
                fp32.iter().all(|v| v
                    .compile_flags
                    .iter()
                    .all(|f| *f == "--exported-group-norm")),
                "{stage}"
            );
            for v in v.into_iter().chain(fp32) {
                v2l_runtime::backend::parse_cuda_options(v.cuda_options).unwrap();
                assert!(v2l_runtime::vae::TilingMode::parse(v.vae_tiling).is_some());
                assert!(v.compile_flags.iter().all(|f| [
                    "--exported-group-norm",
                    "--folded-norms",
                    "--low-gelu",
                    "--bf16-attention",
                    "--f32-gelu"
                ]
                .contains(f)));
            }
        }
        // Only bf16 engines take `--bf16-attention` and `--f32-gelu`.
        for p in ["fp16", "fp32"] {
            for v in crate::gpu_scale::variants("dit", p) {
                let bf16_only = ["--bf16-attention", "--f32-gelu"];
                assert!(v.compile_flags.iter().all(|f| !bf16_only.contains(f)));
            }
        }
    }

    #[test]
    fn the_attention_kernel_is_read_off_onnx_runtimes_debug_lines() {
        let out = "\u{1b}[36mAttentionKernelOptions: FLASH_ATTENTION=1 EFFICIENT_ATTENTION=1\u{1b}[0m
\u{1b}[36mOperator=MultiHeadAttention Node=transformer_blocks.0.attn1/MultiHeadAttention DataType=fp16 SdpaKernel=FLASH_ATTENTION\u{1b}[0m
\u{1b}[36mOperator=MultiHeadAttention Node=transformer_blocks.1.attn1/MultiHeadAttention DataType=fp16 SdpaKernel=FLASH_ATTENTION\u{1b}[0m
Operator=MultiHeadAttention Node=x DataType=bf16 SdpaKernel=EFFICIENT_ATTENTION
{\"run_ms\": 1.0}";
        assert_eq!(
            crate::gpu_scale::attention_kernels(out),
            ["fp16 FLASH_ATTENTION", "bf16 EFFICIENT_ATTENTION"]
        );
        assert!(crate::gpu_scale::attention_kernels("{}").is_empty());
    }

    #[test]
    fn scale_has_the_real_sizes() {
        let s = scale_cases();
        let dit: Vec<_> = s.iter().filter(|c| c.stage == "dit").collect();
        assert!(dit
            .iter()
            .any(|c| c.size == [49, 480, 720] && c.precision == "bf16"));
        assert!(dit
            .iter()
            .any(|c| c.size == [13, 480, 720] && c.what.starts_with("5626")));
        assert!(s
            .iter()
            .any(|c| c.stage == "vae-decode" && c.precision == "fp32" && c.size == [17, 480, 720]));
    }
}
