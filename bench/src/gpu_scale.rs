//! `v2l-bench gpu --scale`: the real-size cases beside PyTorch on the same GPU, one row each as
//! it ends: the 5B-width DiT (CogVideoX-5B's widths, 2 blocks, random weights, batch 2) and the
//! real CogVideoX VAE decode. Each side runs in its own process on the same checkpoint and
//! inputs: `v2l-run stage` on a `cuda` engine, and `gpu_scale/torch_gpu.py` (diffusers, eager,
//! SDPA; TF32 off). PyTorch fp32 is the reference every output is compared with.
//!
//! Not yet run on a GPU (written 2026-11-26 on a machine without one; the DiT rows of the first
//! H100 run, in docs/status.md, were measured by hand with a script of the same shape).

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Serialize;

use crate::scale::{last_json, run_measured, sibling};
use crate::Failure;

const TORCH_SCRIPT: &str = include_str!("gpu_scale/torch_gpu.py");

/// Where and how to run the cases.
pub struct Settings {
    /// Scratch directory (checkpoints, engines, outputs).
    pub dir: PathBuf,
    /// Both sides on the CPU (`--provider cpu`): v2l's `cpu` engines, PyTorch on the CPU. A
    /// check of the check where there is no GPU; its timings are the CPU's.
    pub on_cpu: bool,
    /// Python with torch (CUDA) and diffusers.
    pub torch_python: PathBuf,
    pub repeat: usize,
    pub json: bool,
    /// Trace v2l's stage (`v2l-run stage --profile`) and report its longest operators.
    pub profile: bool,
    /// Also run v2l's side under each of the stage's [`variants`], a row each.
    pub sweep: bool,
    /// When to stop starting cases and variants.
    pub budget: Budget,
}

/// `--budget-min`: when the check stops starting cases.
#[derive(Clone, Copy, Debug)]
pub struct Budget {
    until: Option<(std::time::Instant, f64)>,
}

impl Budget {
    /// `minutes` from now; `None`: no limit.
    pub fn new(minutes: Option<f64>) -> Budget {
        Budget {
            until: minutes.map(|m| {
                let secs = (m.max(0.0) * 60.0).min(1e9);
                (
                    std::time::Instant::now() + std::time::Duration::from_secs_f64(secs),
                    m,
                )
            }),
        }
    }

    /// Why a case may not start now; `None` while time is left.
    pub fn spent(&self) -> Option<String> {
        let (until, minutes) = self.until?;
        (std::time::Instant::now() >= until)
            .then(|| format!("not started: the {minutes}-minute budget (--budget-min) was spent"))
    }
}

/// One way of running v2l's side of a case: CUDA provider settings (`V2L_CUDA_OPTIONS`) and
/// the VAE's tiling.
#[derive(Clone, Debug, PartialEq)]
pub struct Variant {
    /// What the row says (`default`, or the settings).
    pub name: &'static str,
    pub cuda_options: &'static str,
    /// `--vae-tiling`: `off` as PyTorch decodes, or `on`.
    pub vae_tiling: &'static str,
    /// `v2l-compile` flags of an engine of its own (empty: the case's engine).
    pub compile_flags: &'static [&'static str],
    /// Runs before the timed ones, left out of the median: a CUDA graph's first run of a set
    /// of shapes is plain and its second captures (ONNX Runtime runs it once more inside).
    pub warmup_runs: usize,
    /// More `v2l-run stage` flags.
    pub stage_flags: &'static [&'static str],
}

const DEFAULT: Variant = Variant {
    name: "default",
    cuda_options: "",
    vae_tiling: "off",
    compile_flags: &[],
    warmup_runs: 0,
    stage_flags: &[],
};

/// Each session's runs captured as CUDA graphs and replayed, through bound buffers.
const CUDA_GRAPH: Variant = Variant {
    name: "cuda-graph",
    cuda_options: "enable_cuda_graph=1",
    vae_tiling: "off",
    compile_flags: &[],
    warmup_runs: 2,
    stage_flags: &[],
};

/// A LoRA case's second row, run with its default whatever `--sweep` says: the LoRA merged
/// into the DiT's weights on the GPU (`bound` on a cuda engine), so each call runs the bare
/// DiT, where the default (`unfused`) adds a low-rank branch per layer.
const LORA_MERGED: Variant = Variant {
    name: "lora-merged",
    cuda_options: "",
    vae_tiling: "off",
    compile_flags: &[],
    warmup_runs: 0,
    stage_flags: &["--lora-strategy", "bound"],
};

/// What `--sweep` tries beside the default, per stage and precision. For the DiT, the attention
/// kernels `MultiHeadAttention` may be held to besides its default (flash, for fp16 and for a
/// bf16 engine's attention, which runs in fp16): the memory-efficient one (`sdpa_kernel=2`)
/// and cuDNN's flash attention with the memory-efficient one behind it (`sdpa_kernel=10`: ONNX
/// Runtime tries cuDNN first, and a bit set without a fused kernel it can run falls to the
/// unfused one, a (batch, heads, tokens, tokens) scratch tensor); fp32 has the memory-efficient
/// one only. Below fp32 also the GELUs in the engine's type (`--low-gelu`) and, at bf16, the
/// attention kept in bf16 (`--bf16-attention`: the memory-efficient kernel, the only one ONNX
/// Runtime has for bf16) and the GELUs in f32 (`--f32-gelu`, where bf16 engines compute them
/// in fp16). Each row reports the kernel that ran (`attention_kernel`). For the
/// VAE, cuDNN's convolution bias fused into its plan (`fuse_conv_bias`), search and workspace,
/// ONNX Runtime's channels-last layout
/// (`prefer_nhwc`: cuDNN's NHWC kernels, with transposes where its layout pass inserts them),
/// and the tiled decode that `--vae-tiling auto` chose at 480×720 before GPU engines decoded it
/// whole. For both, each session's runs captured as CUDA graphs (`cuda-graph`: timed after two
/// warm-up runs, the plain one and the capture).
pub fn variants(stage: &str, precision: &str) -> Vec<Variant> {
    let mut out = vec![DEFAULT];
    match stage {
        "dit" => {
            let kernels: &[(&'static str, &'static str)] = match precision {
                "fp32" => &[("mem-efficient", "sdpa_kernel=2")],
                // cuDNN's first: its fused attention is the kernel most likely to beat the
                // flash attention both v2l's default and PyTorch's SDPA run on Hopper, and a
                // lease's budget may stop the variants after one.
                _ => &[
                    ("cudnn-flash", "sdpa_kernel=10"),
                    ("mem-efficient", "sdpa_kernel=2"),
                ],
            };
            for &(name, cuda_options) in kernels {
                out.push(Variant {
                    name,
                    cuda_options,
                    vae_tiling: "off",
                    compile_flags: &[],
                    warmup_runs: 0,
                    stage_flags: &[],
                });
            }
            out.push(CUDA_GRAPH);
            // The GELUs in the engine's type, on an engine of its own (fp16/bf16 only): the
            // casts around an f32 (fp16 engines) or fp16 (bf16 engines) GELU against ONNX
            // Runtime's per-operation rounding in the engine's type.
            if precision != "fp32" {
                out.push(Variant {
                    name: "low-gelu",
                    cuda_options: "",
                    vae_tiling: "off",
                    compile_flags: &["--low-gelu"],
                    warmup_runs: 0,
                    stage_flags: &[],
                });
            }
            if precision == "bf16" {
                out.push(Variant {
                    name: "bf16-attention",
                    cuda_options: "",
                    vae_tiling: "off",
                    compile_flags: &["--bf16-attention"],
                    warmup_runs: 0,
                    stage_flags: &[],
                });
                out.push(Variant {
                    name: "f32-gelu",
                    cuda_options: "",
                    vae_tiling: "off",
                    compile_flags: &["--f32-gelu"],
                    warmup_runs: 0,
                    stage_flags: &[],
                });
            }
        }
        _ => {
            // A convolution's bias in cuDNN's plan rather than added after it.
            out.push(Variant {
                name: "fuse-conv-bias",
                cuda_options: "fuse_conv_bias=1",
                vae_tiling: "off",
                compile_flags: &[],
                warmup_runs: 0,
                stage_flags: &[],
            });
            out.push(Variant {
                name: "conv-heuristic",
                cuda_options: "cudnn_conv_algo_search=HEURISTIC",
                vae_tiling: "off",
                compile_flags: &[],
                warmup_runs: 0,
                stage_flags: &[],
            });
            out.push(Variant {
                name: "conv-small-workspace",
                cuda_options: "cudnn_conv_use_max_workspace=0",
                vae_tiling: "off",
                compile_flags: &[],
                warmup_runs: 0,
                stage_flags: &[],
            });
            out.push(Variant {
                name: "nhwc",
                cuda_options: "prefer_nhwc=1",
                vae_tiling: "off",
                compile_flags: &[],
                warmup_runs: 0,
                stage_flags: &[],
            });
            out.push(CUDA_GRAPH);
            out.push(Variant {
                name: "tiled",
                cuda_options: "",
                vae_tiling: "on",
                compile_flags: &[],
                warmup_runs: 0,
                stage_flags: &[],
            });
            // The GroupNorms as exported (statistics and apply), on an engine of their own.
            out.push(Variant {
                name: "exported-group-norm",
                cuda_options: "",
                vae_tiling: "off",
                compile_flags: &["--exported-group-norm"],
                warmup_runs: 0,
                stage_flags: &[],
            });
            // Below fp32, the decoder's spatial norms applied folded in f32 (where the default
            // applies them on the normalized rows in the engine's type).
            if precision != "fp32" {
                out.push(Variant {
                    name: "folded-norms",
                    cuda_options: "",
                    vae_tiling: "off",
                    compile_flags: &["--folded-norms"],
                    warmup_runs: 0,
                    stage_flags: &[],
                });
            }
        }
    }
    out
}

/// One real-size case of `--scale`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ScaleCase {
    /// `dit` or `vae-decode`.
    pub stage: &'static str,
    /// v2l's engine precision; PyTorch runs fp32 (TF32 off: the reference) and bf16.
    pub precision: &'static str,
    /// Pixel frames, height, width.
    pub size: [usize; 3],
    /// DiT tokens (text included), or latent frames for the VAE.
    pub what: String,
    /// A LoRA of this rank on every linear of the DiT's blocks, on both sides: PyTorch's
    /// unmerged, as PEFT runs it; v2l's by the engine's strategy (`unfused` on GPU engines),
    /// as generation applies it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora_rank: Option<usize>,
}

impl ScaleCase {
    /// `STAGE PRECISION FRAMESxHxW[ loraR]`, what `--scale-only` matches.
    pub fn label(&self) -> String {
        let [f, h, w] = self.size;
        let lora = self
            .lora_rank
            .map(|r| format!(" lora{r}"))
            .unwrap_or_default();
        format!("{} {} {f}x{h}x{w}{lora}", self.stage, self.precision)
    }

    /// The case at another pixel size (`--scale-size`).
    pub fn at(self, size: [usize; 3]) -> ScaleCase {
        let [f, h, w] = size;
        let what = match self.stage {
            "dit" => {
                let tokens = ((f - 1) / 4 + 1) * (h / 16) * (w / 16) + TEXT_TOKENS;
                let lora = self
                    .lora_rank
                    .map(|r| format!(", a rank-{r} LoRA"))
                    .unwrap_or_default();
                format!("{tokens} tokens, batch 2, 2 blocks{lora}")
            }
            _ => format!("{} latent frames at {}x{}", (f - 1) / 4 + 1, h / 8, w / 8),
        };
        ScaleCase { size, what, ..self }
    }
}

/// CogVideoX-5B's prompt length, every `--scale` DiT case's text tokens.
const TEXT_TOKENS: usize = 226;

/// The rank of the `--scale` LoRA cases: what GPU engines pad factors to by default.
const LORA_RANK: usize = 64;

/// `--scale`: the 5B-width DiT (2 blocks, batch 2) at 5,626 tokens (13x480x720) and 17,776
/// (49x480x720) in bf16, fp16 and fp32, and in bf16 with a rank-64 LoRA on every block linear
/// (what a request runs); the real VAE decode of 5 latent frames at 60x90 (17x480x720) in fp32
/// and bf16.
pub fn scale_cases() -> Vec<ScaleCase> {
    let case = |stage, precision, size, lora_rank| {
        ScaleCase {
            stage,
            precision,
            size,
            what: String::new(),
            lora_rank,
        }
        .at(size)
    };
    let mut out = Vec::new();
    for size in [[13, 480, 720], [49, 480, 720]] {
        for precision in ["bf16", "fp16", "fp32"] {
            out.push(case("dit", precision, size, None));
        }
        out.push(case("dit", "bf16", size, Some(LORA_RANK)));
    }
    for precision in ["fp32", "bf16"] {
        out.push(case("vae-decode", precision, [17, 480, 720], None));
    }
    out
}

/// One real-size row.
#[derive(Serialize, Default, Clone)]
struct Row {
    stage: &'static str,
    precision: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    lora_rank: Option<usize>,
    /// How v2l's side ran ([`Variant::name`]).
    variant: &'static str,
    size: [usize; 3],
    v2l_ms: Option<f64>,
    /// The first of v2l's runs in its process, cold (cuDNN's convolution search per shape,
    /// CUDA's lazy module loading): what a first request of the size waits.
    v2l_first_ms: Option<f64>,
    v2l_peak_gpu_mb: Option<f64>,
    /// The shared arenas v2l's sessions took (`cuda:0`), or why each kept its own: what its
    /// peak memory was measured with.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    shared_arenas: Vec<String>,
    v2l_rel_l2_vs_torch_fp32: Option<f64>,
    torch_same_ms: Option<f64>,
    torch_same_peak_gpu_mb: Option<f64>,
    /// PyTorch's version and the GPU it ran on, as it reports them.
    #[serde(skip_serializing_if = "Option::is_none")]
    torch: Option<String>,
    /// v2l's time over PyTorch's at the same precision.
    ratio: Option<f64>,
    error: Option<String>,
    /// PyTorch's run at the row's precision failed: v2l's side still ran, against PyTorch's
    /// fp32 reference.
    #[serde(skip_serializing_if = "Option::is_none")]
    torch_error: Option<String>,
    /// Why it did not run (`--budget-min` spent).
    #[serde(skip_serializing_if = "Option::is_none")]
    skipped: Option<String>,
    /// The DiT's attention kernels as ONNX Runtime reports them
    /// (`ORT_ENABLE_ATTENTION_KERNEL_DEBUG_INFO=1`): `fp16 FLASH_ATTENTION`, …
    #[serde(skip_serializing_if = "Vec::is_empty")]
    attention_kernel: Vec<String>,
    /// With `--profile`: v2l's longest operators, `op (provider) ms`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    v2l_top_ops: Vec<String>,
    /// Graphs ONNX Runtime would not capture as CUDA graphs (built again without), each with
    /// its reason: a `cuda-graph` row with any timed plain runs of those.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    not_captured: Vec<String>,
}

/// Runs every case; how many rows failed, and how many were not started within the budget.
pub fn run(b: &Settings, cases: &[ScaleCase]) -> Result<(usize, usize), Failure> {
    let dir = b.dir.clone();
    std::fs::create_dir_all(&dir).map_err(|e| Failure::new(format!("{}: {e}", dir.display())))?;
    let script = dir.join("torch_gpu.py");
    std::fs::write(&script, TORCH_SCRIPT)
        .map_err(|e| Failure::new(format!("{}: {e}", script.display())))?;
    if !b.json {
        println!(
            "{:<12} {:<5} {:<20} {:<11} {:>10} {:>10} {:>10} {:>7} {:>12} {:>12} {:>10}  status",
            "stage",
            "prec",
            "variant",
            "size",
            "v2l ms",
            "first ms",
            "torch ms",
            "ratio",
            "v2l GPU MB",
            "torch GPU MB",
            "rel L2"
        );
    }
    let (mut failed, mut not_started) = (0, 0);
    // PyTorch fp32 first in each group: it writes the reference.
    let mut order: Vec<&ScaleCase> = cases.iter().collect();
    order.sort_by_key(|c| (c.stage, c.size, c.lora_rank, c.precision != "fp32"));
    let mut swept = Vec::new();
    for c in order {
        let mut row = Row {
            stage: c.stage,
            precision: c.precision,
            lora_rank: c.lora_rank,
            variant: DEFAULT.name,
            size: c.size,
            ..Default::default()
        };
        if let Some(why) = b.budget.spent() {
            row.skipped = Some(why);
            not_started += 1;
            print_row(&row, b.json);
            continue;
        }
        let prepared = match prepare_case(b, &script, &dir, c, &mut row) {
            Ok(p) => p,
            Err(e) => {
                row.error = Some(e.message);
                failed += 1;
                print_row(&row, b.json);
                continue;
            }
        };
        // PyTorch's figures, which every row of the case shares.
        let template = row.clone();
        if let Err(e) = run_v2l(b, c, &prepared, &DEFAULT, &mut row) {
            row.error = Some(e.message);
        }
        if row.error.is_some() || row.torch_error.is_some() {
            failed += 1;
        }
        print_row(&row, b.json);
        // On a GPU, a LoRA case's LoRA merged into the weights too (a CPU engine below fp32
        // has no `bound`).
        if c.lora_rank.is_some() && !b.on_cpu {
            let (f, n) = variant_row(b, c, &prepared, &LORA_MERGED, &template);
            (failed, not_started) = (failed + f, not_started + n);
        }
        swept.push((c, template, prepared));
    }
    // Every case's default row comes first, then the variants, case by case: a budget that
    // runs out stops the variants, not the cases.
    for (c, row, prepared) in swept {
        if !b.sweep || b.on_cpu {
            break;
        }
        for v in variants(c.stage, c.precision).into_iter().skip(1) {
            let (f, n) = variant_row(b, c, &prepared, &v, &row);
            (failed, not_started) = (failed + f, not_started + n);
        }
    }
    Ok((failed, not_started))
}

/// One row of case `c` under variant `v` (PyTorch's figures from `template`), printed; whether
/// it failed and whether it was not started (the budget spent), as counts.
fn variant_row(
    b: &Settings,
    c: &ScaleCase,
    prepared: &Prepared,
    v: &Variant,
    template: &Row,
) -> (usize, usize) {
    let mut row = Row {
        variant: v.name,
        ..template.clone()
    };
    let counts = if let Some(why) = b.budget.spent() {
        row.skipped = Some(why);
        (0, 1)
    } else if let Err(e) = run_v2l(b, c, prepared, v, &mut row) {
        row.error = Some(e.message);
        (1, 0)
    } else {
        (0, 0)
    };
    print_row(&row, b.json);
    counts
}

/// What a case's v2l runs share: its directory, engine and PyTorch fp32 reference.
struct Prepared {
    case: PathBuf,
    engine: PathBuf,
    reference: PathBuf,
    /// The case's LoRA file, both sides apply.
    lora: Option<PathBuf>,
}

fn case_dir(dir: &Path, c: &ScaleCase) -> PathBuf {
    dir.join(format!(
        "{}-{}x{}x{}",
        c.stage, c.size[0], c.size[1], c.size[2]
    ))
}

fn py(b: &Settings, script: &Path) -> Command {
    let mut cmd = Command::new(&b.torch_python);
    cmd.arg(script);
    cmd
}

/// The case's checkpoint, PyTorch's runs (its fp32 reference, its time at the case's
/// precision into `row`) and v2l's engine.
fn prepare_case(
    b: &Settings,
    script: &Path,
    dir: &Path,
    c: &ScaleCase,
    row: &mut Row,
) -> Result<Prepared, Failure> {
    let case = case_dir(dir, c);
    let (component, made) = match c.stage {
        "dit" => ("transformer", case.join("transformer/config.json")),
        _ => ("vae", case.join("vae/config.json")),
    };
    if !made.is_file() {
        let make = if c.stage == "dit" {
            "make-dit"
        } else {
            "make-vae"
        };
        run_measured(py(b, script).arg(make).arg(&case).args([
            "--frames",
            &c.size[0].to_string(),
            "--height",
            &c.size[1].to_string(),
            "--width",
            &c.size[2].to_string(),
        ]))?;
    }
    let lora = match c.lora_rank {
        Some(rank) => {
            let file = case.join(format!("lora{rank}.safetensors"));
            if !file.is_file() {
                run_measured(
                    py(b, script)
                        .arg("make-lora")
                        .arg(&case)
                        .args(["--rank", &rank.to_string(), "-o"])
                        .arg(&file),
                )?;
            }
            Some(file)
        }
        None => None,
    };
    let reference = case.join(match &lora {
        Some(l) => format!(
            "torch_fp32_{}",
            l.file_name().unwrap_or_default().to_string_lossy()
        ),
        None => "torch_fp32.safetensors".into(),
    });
    if !reference.is_file() {
        torch_run(b, script, &case, c, "fp32", &reference, lora.as_deref())?;
    }
    // A failure here loses PyTorch's time, not the case: v2l's side still runs and is
    // compared with the fp32 reference.
    match torch_run(
        b,
        script,
        &case,
        c,
        c.precision,
        &reference,
        lora.as_deref(),
    ) {
        Ok(t) => {
            row.torch_same_ms = t["torch_ms"].as_f64();
            row.torch_same_peak_gpu_mb = t["peak_gpu_mb"].as_f64();
            row.torch = t["torch"].as_str().map(String::from);
        }
        Err(e) => row.torch_error = Some(e.message),
    }
    // v2l: export once, an engine per precision.
    let export = case.join("v2l-export");
    if !export.join("manifest.json").is_file() {
        let what = if c.stage == "dit" { "dit" } else { "vae" };
        run_measured(
            Command::new(sibling("v2l-export")?)
                .arg(what)
                .arg(case.join(component))
                .arg("-o")
                .arg(&export),
        )?;
    }
    let backend = b.backend();
    let engine = case.join(format!("v2l-{backend}-{}", c.precision));
    if !engine.join("bundle.json").is_file() {
        run_measured(
            Command::new(sibling("v2l-compile")?)
                .arg(&export)
                .arg("-o")
                .arg(&engine)
                .args(["--backend", backend, "--precision", c.precision]),
        )?;
    }
    Ok(Prepared {
        case,
        engine,
        reference,
        lora,
    })
}

impl Settings {
    /// The engines' `--backend`.
    fn backend(&self) -> &'static str {
        if self.on_cpu {
            "cpu"
        } else {
            "cuda"
        }
    }
}

/// v2l's stage on the case's engine under variant `v`, its figures into `row`.
fn run_v2l(
    b: &Settings,
    c: &ScaleCase,
    p: &Prepared,
    v: &Variant,
    row: &mut Row,
) -> Result<(), Failure> {
    let Prepared {
        case,
        engine,
        reference,
        lora,
    } = p;
    let tag = c.lora_rank.map(|r| format!("-lora{r}")).unwrap_or_default();
    let out = case.join(format!("v2l-{}{tag}-{}.safetensors", c.precision, v.name));
    let engine = match v.compile_flags {
        [] => engine.clone(),
        flags => {
            let own = case.join(format!("v2l-{}-{}-{}", b.backend(), c.precision, v.name));
            if !own.join("bundle.json").is_file() {
                run_measured(
                    Command::new(sibling("v2l-compile")?)
                        .arg(case.join("v2l-export"))
                        .arg("-o")
                        .arg(&own)
                        .args(["--backend", b.backend(), "--precision", c.precision])
                        .args(flags),
                )?;
            }
            own
        }
    };
    let mut cmd = Command::new(sibling("v2l-run")?);
    if !v.cuda_options.is_empty() {
        // Over the settings this check was started with (later keys win).
        let all = match std::env::var("V2L_CUDA_OPTIONS") {
            Ok(outer) if !outer.trim().is_empty() => format!("{outer},{}", v.cuda_options),
            _ => v.cuda_options.to_string(),
        };
        cmd.env("V2L_CUDA_OPTIONS", all);
    }
    cmd.arg("--engine")
        .arg(&engine)
        .arg("stage")
        .arg(c.stage)
        .arg("--inputs")
        .arg(case.join("inputs.safetensors"))
        .arg("-o")
        .arg(&out)
        .args([
            "--json",
            "--repeat",
            &(b.repeat.max(3) + v.warmup_runs).to_string(),
        ])
        // PyTorch decodes whole (diffusers' default): the same computation on both sides,
        // whatever `auto` picks (a variant may ask for tiles).
        .args(["--vae-tiling", v.vae_tiling]);
    if let Some(l) = lora {
        cmd.arg("--lora").arg(l).args(v.stage_flags);
    }
    if c.stage == "dit" {
        // ONNX Runtime's CUDA MultiHeadAttention prints the kernel it picked, a line per node
        // and call (a few per timed run, beside a call of tens of milliseconds).
        cmd.env("ORT_ENABLE_ATTENTION_KERNEL_DEBUG_INFO", "1");
    }
    if b.profile {
        let traces = case.join(format!("profile-{}{tag}-{}", c.precision, v.name));
        let _ = std::fs::remove_dir_all(&traces);
        cmd.arg("--profile").arg(traces);
    }
    let (r, peak) = with_gpu_peak(|| run_measured(&mut cmd));
    let stdout = r?.stdout;
    row.attention_kernel = attention_kernels(&stdout);
    let j = last_json(&stdout)?;
    if let Some(ops) = j["profile"]["ops"].as_array() {
        row.v2l_top_ops = ops
            .iter()
            .take(6)
            .map(|o| {
                format!(
                    "{} ({}) {:.1} ms",
                    o["op"].as_str().unwrap_or("?"),
                    o["provider"].as_str().unwrap_or("?"),
                    o["ms"].as_f64().unwrap_or(0.0)
                )
            })
            .collect();
    }
    row.v2l_ms = match v.warmup_runs {
        0 => j["run_ms"].as_f64(),
        // The median of the runs after the warm-up ones.
        skip => j["runs_ms"].as_array().and_then(|runs| {
            let timed: Vec<f64> = runs.iter().skip(skip).filter_map(|r| r.as_f64()).collect();
            (!timed.is_empty()).then(|| crate::pipeline::stats(timed).0)
        }),
    };
    row.v2l_first_ms = j["runs_ms"].get(0).and_then(|v| v.as_f64());
    // A `cuda-graph` row whose graph ONNX Runtime would not capture timed plain runs: it says so.
    row.not_captured = strings(&j["uncaptured_graphs"]);
    row.v2l_peak_gpu_mb = peak;
    row.shared_arenas = strings(&j["shared_arenas"]);
    let read = |p: &Path| -> Result<v2l_runtime::Tensor, Failure> {
        v2l_runtime::read_safetensors(p)
            .map_err(Failure::from)?
            .remove("sample")
            .ok_or_else(|| Failure::new(format!("{}: no `sample`", p.display())))
    };
    row.v2l_rel_l2_vs_torch_fp32 = Some(read(&out)?.rel_l2(&read(reference)?));
    if let (Some(v), Some(t)) = (row.v2l_ms, row.torch_same_ms) {
        row.ratio = Some(v / t);
    }
    Ok(())
}

/// PyTorch's run of case `c` at `dtype` (fp32 writes `reference`; the others are compared
/// with it), with `lora` on the DiT if given.
fn torch_run(
    b: &Settings,
    script: &Path,
    case: &Path,
    c: &ScaleCase,
    dtype: &str,
    reference: &Path,
    lora: Option<&Path>,
) -> Result<serde_json::Value, Failure> {
    let mut cmd = py(b, script);
    cmd.arg("run")
        .arg(case)
        .args(["--stage", c.stage, "--dtype", dtype, "-n"])
        .arg(b.repeat.max(3).to_string())
        .arg("--reference")
        .arg(reference);
    if let Some(l) = lora {
        cmd.arg("--lora").arg(l);
    }
    if b.on_cpu {
        cmd.args(["--device", "cpu"]);
    }
    last_json(&run_measured(&mut cmd)?.stdout)
}

/// A JSON array's strings (none where it is not an array).
fn strings(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// `f`'s result and the most GPU memory any process used while it ran, polled from
/// `nvidia-smi` every 50 ms (what ONNX Runtime's arena holds, not only live tensors).
fn with_gpu_peak<T>(f: impl FnOnce() -> T) -> (T, Option<f64>) {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let stop = Arc::new(AtomicBool::new(false));
    let poll = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut peak: Option<f64> = None;
            while !stop.load(Ordering::Relaxed) {
                let used = Command::new("nvidia-smi")
                    .args([
                        "--query-compute-apps=used_memory",
                        "--format=csv,noheader,nounits",
                    ])
                    .output()
                    .ok()
                    .map(|o| {
                        String::from_utf8_lossy(&o.stdout)
                            .lines()
                            .filter_map(|l| l.trim().parse::<f64>().ok())
                            .sum::<f64>()
                    });
                if let Some(u) = used {
                    peak = Some(peak.map_or(u, |p: f64| p.max(u)));
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            peak
        })
    };
    let r = f();
    stop.store(true, Ordering::Relaxed);
    (r, poll.join().ok().flatten())
}

/// The distinct `DataType=… SdpaKernel=…` pairs of ONNX Runtime's attention debug lines
/// (`Operator=MultiHeadAttention Node=… DataType=fp16 SdpaKernel=FLASH_ATTENTION`, in colour),
/// as `fp16 FLASH_ATTENTION`.
pub fn attention_kernels(stdout: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for line in stdout.lines().filter(|l| l.contains("SdpaKernel=")) {
        let field = |key: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(key))
                .map(|v| v.split('\u{1b}').next().unwrap_or(v).to_string())
        };
        let kernel = field("SdpaKernel=").unwrap_or_default();
        let k = match field("DataType=") {
            Some(t) => format!("{t} {kernel}"),
            None => kernel,
        };
        if !out.contains(&k) {
            out.push(k);
        }
    }
    out
}

fn print_row(r: &Row, json: bool) {
    if json {
        println!("{}", serde_json::to_string(r).unwrap_or_default());
        return;
    }
    let f = |v: Option<f64>, p: usize| v.map(|x| format!("{x:.p$}")).unwrap_or_else(|| "-".into());
    println!(
        "{:<12} {:<5} {:<20} {:<11} {:>10} {:>10} {:>10} {:>7} {:>12} {:>12} {:>10}  {}",
        match r.lora_rank {
            Some(k) => format!("{}+lora{k}", r.stage),
            None => r.stage.to_string(),
        },
        r.precision,
        r.variant,
        format!("{}x{}x{}", r.size[0], r.size[1], r.size[2]),
        f(r.v2l_ms, 1),
        f(r.v2l_first_ms, 1),
        f(r.torch_same_ms, 1),
        f(r.ratio, 2),
        f(r.v2l_peak_gpu_mb, 0),
        f(r.torch_same_peak_gpu_mb, 0),
        r.v2l_rel_l2_vs_torch_fp32
            .map(|x| format!("{x:.2e}"))
            .unwrap_or_else(|| "-".into()),
        match (&r.skipped, &r.error) {
            (Some(why), _) => why.clone(),
            (_, Some(e)) => format!("FAILED: {e}"),
            _ => match &r.torch_error {
                Some(e) => format!("PyTorch FAILED (v2l ran): {e}"),
                None => "ok".into(),
            },
        }
    );
    if !r.attention_kernel.is_empty() {
        println!("    attention kernel: {}", r.attention_kernel.join(", "));
    }
    if !r.v2l_top_ops.is_empty() {
        println!("    v2l's longest operators: {}", r.v2l_top_ops.join(", "));
    }
    for g in &r.not_captured {
        println!("    not captured (ran without CUDA graphs): {g}");
    }
}
