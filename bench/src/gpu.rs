//! `v2l-bench gpu`: everything a first GPU user needs to check, in one command (no GPU runs on
//! this project's machines, so none of the GPU steps has run yet).
//!
//! For the tiny fixture and the demo model, on CUDA and (when ONNX Runtime has it) TensorRT, at
//! fp32, fp16 and bf16: compile the engine, check its frames against the CPU fp32 engine within
//! the precision's bound, time a DiT step, time a LoRA switch with factors as inputs (`unfused`)
//! against `fused` (an engine build per LoRA), and time one batched step of four requests with
//! different LoRAs. One table, or `--json`.
//!
//! `--dry-run` prints the plan and exits 0; without it, a machine without a GPU gets an error
//! saying so, exit code 1, and nothing is written. The plan, its parity bounds and the checks
//! before anything runs are unit-tested here on the CPU.

use std::path::{Path, PathBuf};

use serde::Serialize;
use v2l_runtime::backend::{Backend, Precision};

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
    #[arg(skip)]
    pub json: bool,
}

/// One model × backend × precision of the plan.
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
}

/// The models it checks: the tiny fixture (random weights) and the embedded demo model.
pub const MODELS: [&str; 2] = ["tests/fixtures/cogvideox-tiny", "models/cogvideox-effects"];

/// Frames' relative L2 bound against the CPU fp32 engine: fp32 allows TF32 and kernel order
/// (1e-3); fp16 and bf16 the bounds their CPU-emulated engines meet (docs/precision.md).
pub fn parity_bound(p: Precision) -> f64 {
    match p {
        Precision::Fp32 => 1e-3,
        Precision::Fp16 => 2e-2,
        _ => 6e-2,
    }
}

/// The plan: every model on every backend at fp32, fp16 and bf16. TensorRT only when ONNX
/// Runtime was built with it.
pub fn plan(tensorrt: bool) -> Vec<Case> {
    let backends: &[Backend] = if tensorrt {
        &[Backend::Cuda, Backend::TensorRt]
    } else {
        &[Backend::Cuda]
    };
    let mut out = Vec::new();
    for model in MODELS {
        for &b in backends {
            for p in [Precision::Fp32, Precision::Fp16, Precision::Bf16] {
                out.push(Case {
                    model,
                    backend: b.name(),
                    precision: p.name(),
                    parity_bound: parity_bound(p),
                    compile: vec![
                        "--backend".into(),
                        b.name().into(),
                        "--precision".into(),
                        p.name().into(),
                    ],
                    measures: vec![
                        "parity against CPU fp32 (2 steps, fixed noise)",
                        "DiT step (batch 2)",
                        "LoRA switch: unfused (factors as inputs) vs fused (engine build)",
                        "batched step: 4 requests, 4 LoRAs, one DiT call",
                    ],
                });
            }
        }
    }
    out
}

/// Why this machine cannot run the plan, or `None` when it has a GPU ONNX Runtime can use.
pub fn no_gpu_reason() -> Option<String> {
    let nvidia = Path::new("/dev/nvidia0").exists()
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
            "the ONNX Runtime library in use has no CUDA provider: install `onnxruntime-gpu` and \
             point ORT_DYLIB_PATH at its libonnxruntime.so"
                .into(),
        ),
        Err(e) => Some(e.to_string()),
    }
}

pub fn bench_gpu(b: &GpuBench) -> Result<(), Failure> {
    let tensorrt = v2l_runtime::backend::built_into_onnxruntime(Backend::TensorRt).unwrap_or(false);
    let cases = plan(tensorrt || b.dry_run);
    if b.dry_run {
        print_plan(&cases, b.json);
        return Ok(());
    }
    if let Some(why) = no_gpu_reason() {
        return Err(Failure::new(format!("cannot run the GPU check: {why}"))
            .with_hint("`v2l-bench gpu --dry-run` prints what it would run"));
    }
    run_on_gpu(b, &cases)
}

fn print_plan(cases: &[Case], json: bool) {
    if json {
        let v = serde_json::json!({"dry_run": true, "cases": cases});
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return;
    }
    println!(
        "v2l-bench gpu --dry-run: {} cases (nothing is run or written)",
        cases.len()
    );
    println!(
        "{:<34} {:<9} {:<9} {:>12}  compile",
        "model", "backend", "precision", "parity bound"
    );
    for c in cases {
        println!(
            "{:<34} {:<9} {:<9} {:>12.0e}  v2l-compile <export> {}",
            c.model,
            c.backend,
            c.precision,
            c.parity_bound,
            c.compile.join(" ")
        );
    }
    if let Some(c) = cases.first() {
        println!("each case measures:");
        for m in &c.measures {
            println!("  - {m}");
        }
    }
}

/// One case's figures.
#[derive(Serialize)]
struct Figures {
    case: Case,
    frames_rel_l2: f64,
    within_bound: bool,
    dit_step_ms: f64,
    switch_unfused_ms: f64,
    switch_fused_ms: f64,
    batched_step_ms: f64,
}

/// Not yet run: no GPU has been available to this project.
fn run_on_gpu(b: &GpuBench, cases: &[Case]) -> Result<(), Failure> {
    use v2l_runtime::engine::Engine;
    use v2l_runtime::lora::strategy::Strategy;
    use v2l_runtime::pipeline::{Pipeline, Request, RequestLora};
    std::fs::create_dir_all(&b.dir)
        .map_err(|e| Failure::new(format!("{}: {e}", b.dir.display())))?;
    let mut rows = Vec::new();
    for c in cases {
        let model = Path::new(c.model);
        let exported = b.dir.join(format!("{}-export", model_name(c.model)));
        if !exported.exists() {
            export(model, &exported)?;
        }
        let cpu = b.dir.join(format!("{}-cpu", model_name(c.model)));
        if !cpu.exists() {
            compile(&exported, &cpu, &[])?;
        }
        let gpu = b.dir.join(format!(
            "{}-{}-{}",
            model_name(c.model),
            c.backend,
            c.precision
        ));
        if !gpu.exists() {
            compile(&exported, &gpu, &c.compile)?;
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
        let mut gpu_p = open(&gpu, Some(Strategy::Unfused))?;
        let req: Request = request(gpu_p.engine())?;
        let a = cpu_p
            .generate(&req, &mut |_, _| true)
            .map_err(Failure::from)?;
        let g = gpu_p
            .generate(&req, &mut |_, _| true)
            .map_err(Failure::from)?;
        let rel = a.frames.rel_l2(&g.frames);
        let loras = predicted_loras(&mut gpu_p, &req, 4)?;
        let (_, dit_step_ms) = crate::pipeline::time(|| gpu_p.generate(&req, &mut |_, _| true));
        let switch = |p: &mut Pipeline| -> Result<f64, Failure> {
            let mut t = Vec::new();
            for i in 0..b.repeat.max(1) {
                let (r, ms) = crate::pipeline::time(|| p.set_lora(Some(&loras[i % loras.len()])));
                r.map_err(Failure::from)?;
                t.push(ms);
            }
            Ok(crate::pipeline::stats(t).0)
        };
        let switch_unfused_ms = switch(&mut gpu_p)?;
        let mut fused = open(&gpu, Some(Strategy::Fused))?;
        let switch_fused_ms = switch(&mut fused)?;
        let batch: Vec<Request> = loras
            .iter()
            .map(|l| Request {
                lora: RequestLora::Loras(vec![l.clone()]),
                ..req.clone()
            })
            .collect();
        let (r, batched_step_ms) =
            crate::pipeline::time(|| gpu_p.generate_batch(&batch, &mut |_, _| true));
        r.map_err(Failure::from)?;
        rows.push(Figures {
            case: c.clone(),
            frames_rel_l2: rel,
            within_bound: rel <= c.parity_bound,
            dit_step_ms: dit_step_ms / req.steps as f64,
            switch_unfused_ms,
            switch_fused_ms,
            batched_step_ms: batched_step_ms / req.steps as f64,
        });
    }
    if b.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&rows).unwrap_or_default()
        );
    } else {
        println!(
            "{:<28} {:<9} {:<6} {:>10} {:>5} {:>9} {:>11} {:>10} {:>10}",
            "model",
            "backend",
            "prec",
            "rel L2",
            "ok",
            "step ms",
            "unfused ms",
            "fused ms",
            "batch4 ms"
        );
        for r in &rows {
            println!(
                "{:<28} {:<9} {:<6} {:>10.2e} {:>5} {:>9.1} {:>11.2} {:>10.1} {:>10.1}",
                model_name(r.case.model),
                r.case.backend,
                r.case.precision,
                r.frames_rel_l2,
                if r.within_bound { "yes" } else { "NO" },
                r.dit_step_ms,
                r.switch_unfused_ms,
                r.switch_fused_ms,
                r.batched_step_ms
            );
        }
    }
    if rows.iter().any(|r| !r.within_bound) {
        return Err(Failure::new(
            "a GPU engine is outside its parity bound (see the table)",
        ));
    }
    Ok(())
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

/// `v2l-export pipeline` of a model directory with its Video2LoRA hypernetwork.
fn export(model: &Path, out: &Path) -> Result<(), Failure> {
    let o = tool("v2l-export")?
        .arg("pipeline")
        .arg(model)
        .arg("--hypernet")
        .arg(model.join("hypernetwork.safetensors"))
        .arg("--lilora")
        .arg(model.join("lilora.safetensors"))
        .arg("-o")
        .arg(out)
        .output();
    succeeded(o, "v2l-export")
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
    use v2l_runtime::pipeline::{gaussian_noise, Request, RequestLora};
    let (Some(frames), Some(height), Some(width)) = e.default_size() else {
        return Err(Failure::new("the engine has no default size"));
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
    Ok(Request {
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
        seed: None,
        cache: None,
    })
}

/// `n` LoRAs predicted by the engine's hypernetwork from seeded clips.
fn predicted_loras(
    p: &mut v2l_runtime::pipeline::Pipeline,
    req: &v2l_runtime::pipeline::Request,
    n: usize,
) -> Result<Vec<v2l_runtime::lora::AppliedLora>, Failure> {
    let first = req
        .image
        .as_ref()
        .ok_or_else(|| Failure::new("no first frame"))?;
    let mut out = Vec::with_capacity(n);
    for seed in 0..n as u64 {
        let rgb = v2l_runtime::pipeline::gaussian_noise(
            vec![req.frames * first.height * first.width * 3],
            10 + seed,
        )
        .as_f32("clip")
        .map_err(Failure::from)?
        .iter()
        .map(|x| (x * 40.0 + 128.0).clamp(0.0, 255.0) as u8)
        .collect();
        let clip = v2l_runtime::video::Frames {
            frames: req.frames,
            height: first.height,
            width: first.width,
            rgb,
        };
        out.push(v2l_runtime::lora::AppliedLora {
            lora: p.predict(&clip, 1.0).map_err(Failure::from)?.lora.into(),
            source: format!("clip{seed}").into(),
            multiplier: 1.0,
        });
    }
    Ok(out)
}

fn model_name(m: &str) -> &str {
    m.rsplit('/').next().unwrap_or(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plan_covers_every_model_backend_and_precision() {
        let p = plan(true);
        assert_eq!(p.len(), 2 * 2 * 3);
        assert!(p
            .iter()
            .any(|c| c.backend == "tensorrt" && c.precision == "bf16"));
        assert_eq!(plan(false).len(), 2 * 3, "no TensorRT: CUDA only");
        for c in &p {
            assert_eq!(
                c.compile[..2],
                ["--backend".to_string(), c.backend.to_string()]
            );
            assert!(c.parity_bound > 0.0 && c.parity_bound < 0.1);
        }
        assert!(parity_bound(Precision::Fp32) < parity_bound(Precision::Fp16));
    }
}
