//! `v2l-bench scale`: a CogVideoX-5B-shaped DiT (the real config, generated weights) at real
//! sample sizes, run as users run it, side by side with PyTorch + diffusers.
//!
//! Each measurement is a separate process, so its peak RSS is its own: `v2l-run stage dit`
//! (session build included) for v2l, `scale/torch_baseline.py` for PyTorch, on the same
//! checkpoint and the same inputs. The two outputs are compared (relative L2), so a speed-up
//! that changed the numbers shows.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use v2l_export::{cogvideox_dit, synthetic};
use v2l_graphs::DType;
use v2l_runtime::lora::strategy::Strategy;
use v2l_runtime::{read_safetensors, write_safetensors};

use crate::Failure;

/// The PyTorch side, written beside the checkpoint when `--torch-python` is given.
const TORCH_SCRIPT: &str = include_str!("scale/torch_baseline.py");

/// What `v2l-bench scale` measures.
pub struct ScaleBench {
    pub layers: usize,
    pub precision: String,
    /// `v2l-compile --attention` (its default when `None`).
    pub attention: Option<String>,
    /// `v2l-compile --int8-linears` (its default when `None`).
    pub int8_linears: Option<String>,
    pub calibration_samples: Option<u32>,
    /// (pixel frames, height, width) per case.
    pub cases: Vec<(usize, usize, usize)>,
    pub torch_python: Option<PathBuf>,
    pub threads: usize,
    pub repeat: usize,
    pub dir: PathBuf,
    pub json: bool,
    /// VAE decode cases (pixel frames, height, width); needs `torch_python` to generate the
    /// real-width VAE checkpoint.
    pub vae_cases: Vec<(usize, usize, usize)>,
    /// LoRA strategies whose switch is timed besides the engine's default (and, below fp32 on
    /// one block, the other that keeps low-precision weights).
    pub lora_strategies: Vec<Strategy>,
}

/// One process run: wall time, peak RSS, and its stdout.
pub struct ProcRun {
    pub wall_s: f64,
    pub peak_rss_mb: f64,
    pub stdout: String,
}

fn fail(what: impl std::fmt::Display) -> Failure {
    Failure::new(what)
}

/// Runs `cmd` to completion: its wall time, and its peak RSS as it reports it (`peak_rss_mb` in
/// its last JSON line), else from the kernel (`wait4`, an upper bound: see below).
pub fn run_measured(cmd: &mut Command) -> Result<ProcRun, Failure> {
    let (run, failed) = run_process(cmd)?;
    match failed {
        None => Ok(run),
        Some(how) => Err(fail(format!("{cmd:?} {how}; its stderr is above"))),
    }
}

/// [`run_measured`] that also returns a failed run (with how it failed: "exited with 1",
/// "was killed by signal 9", ...), whose peak is the kernel's.
pub fn run_process(cmd: &mut Command) -> Result<(ProcRun, Option<String>), Failure> {
    let shown = format!("{cmd:?}");
    let t = Instant::now();
    let out_file = tempfile::NamedTempFile::new().map_err(|e| fail(format!("temp file: {e}")))?;
    let stdout = out_file
        .reopen()
        .map_err(|e| fail(format!("temp file: {e}")))?;
    let child = cmd
        .stdout(stdout)
        .spawn()
        .map_err(|e| fail(format!("cannot start {shown}: {e}")))?;
    let mut status = 0i32;
    // SAFETY: rusage is plain data the kernel fills; the pid is our own child's.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = child.id() as libc::pid_t;
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    let wall_s = t.elapsed().as_secs_f64();
    if r != pid {
        return Err(fail(format!("waiting for {shown} failed")));
    }
    let text = std::fs::read_to_string(out_file.path()).unwrap_or_default();
    let failed = if libc::WIFSIGNALED(status) {
        Some(format!("was killed by signal {}", libc::WTERMSIG(status)))
    } else if libc::WEXITSTATUS(status) != 0 {
        Some(format!("exited with {}", libc::WEXITSTATUS(status)))
    } else {
        None
    };
    // The child's own report where it gives one (`v2l-run --json`, the PyTorch script): Linux
    // carries this bench's peak across fork and exec into the child's `ru_maxrss`, which
    // over-states a small child by the bench's own size (1.08 GB against 0.54 GB measured for
    // an int8 block's step, 2026-11-24).
    let reported = text
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .and_then(|j| j["peak_rss_mb"].as_f64())
        .filter(|&mb| mb > 0.0);
    let run = ProcRun {
        wall_s,
        peak_rss_mb: reported.unwrap_or(usage.ru_maxrss as f64 * 1024.0 / 1e6),
        stdout: text,
    };
    Ok((run, failed))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

pub fn last_json(stdout: &str) -> Result<serde_json::Value, Failure> {
    stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .ok_or_else(|| fail(format!("no JSON line in the output:\n{stdout}")))
}

/// The CogVideoX-5B I2V config (32 input channels) with `layers` blocks.
pub fn cogvideox_5b_config(layers: usize) -> Result<serde_json::Value, Failure> {
    let mut c: serde_json::Value = serde_json::from_str(include_str!(
        "../../tests/fixtures/fullscale_linear_shapes.json"
    ))
    .map_err(|e| fail(format!("embedded shapes: {e}")))?;
    let mut config = c["cogvideox-fun-5b-inp"]["config"].take();
    config["num_layers"] = layers.into();
    config["in_channels"] = 32.into();
    config["_class_name"] = cogvideox_dit::CLASS_NAME.into();
    // Which generator made the cached checkpoint (2: norm scales near 1, `Scales::Trained`);
    // diffusers ignores `_` keys.
    config["_v2l_synthetic"] = 2.into();
    Ok(config)
}

pub fn sibling(name: &str) -> Result<PathBuf, Failure> {
    let exe = std::env::current_exe().map_err(|e| fail(format!("current exe: {e}")))?;
    let p = exe.with_file_name(name);
    if !p.is_file() {
        return Err(fail(format!("{} not found", p.display()))
            .with_hint("build every binary: cargo build --release"));
    }
    Ok(p)
}

/// Generates (or reuses) the checkpoint, exports and compiles it.
pub fn prepare(b: &ScaleBench, log: &dyn Fn(&str)) -> Result<(PathBuf, PathBuf, f64), Failure> {
    let config = cogvideox_5b_config(b.layers)?;
    let ck = b.dir.join(format!("transformer-{}l", b.layers));
    let same = std::fs::read_to_string(ck.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .is_some_and(|c| c == config);
    // Deep models are generated and exported with bf16 weights, as `v2l-bench export` makes
    // them (42 blocks: 11 GB instead of 22 GB per copy); such an export compiles below fp32.
    let dtype = if b.layers > 1 {
        DType::BF16
    } else {
        DType::F32
    };
    if !same {
        log(&format!(
            "generating {} ({dtype}, {} blocks)",
            ck.display(),
            b.layers
        ));
        let _ = std::fs::remove_dir_all(&ck);
        let cfg: cogvideox_dit::DitConfig =
            serde_json::from_value(config.clone()).map_err(|e| fail(format!("config: {e}")))?;
        let layout = cogvideox_dit::checkpoint_layout(&cfg);
        synthetic::write_checkpoint_as(
            &ck,
            &config,
            &layout,
            dtype,
            1,
            synthetic::Scales::Trained,
            &mut |_, _| {},
        )?;
    }
    let export = b.dir.join("export");
    let engine = b.dir.join("engine");
    for d in [&export, &engine] {
        let _ = std::fs::remove_dir_all(d);
    }
    log("exporting and compiling");
    let status = |c: &mut Command| -> Result<(), Failure> {
        let ok = c.status().map(|s| s.success()).unwrap_or(false);
        if ok {
            Ok(())
        } else {
            Err(fail(format!("{c:?} failed")))
        }
    };
    status(
        Command::new(sibling("v2l-export")?)
            .args(["dit", "--weight-dtype", dtype.name()])
            .arg(&ck)
            .arg("-o")
            .arg(&export)
            .stdout(std::process::Stdio::null()),
    )?;
    let t = Instant::now();
    status(
        Command::new(sibling("v2l-compile")?)
            .arg(&export)
            .arg("-o")
            .arg(&engine)
            .args(["--backend", "cpu", "--precision", &b.precision])
            .args(
                b.attention
                    .iter()
                    .flat_map(|a| ["--attention".to_string(), a.clone()]),
            )
            .args(
                b.int8_linears
                    .iter()
                    .flat_map(|a| ["--int8-linears".to_string(), a.clone()]),
            )
            .args(
                b.calibration_samples
                    .map(|n| vec!["--calibration-samples".to_string(), n.to_string()])
                    .unwrap_or_default(),
            )
            .stdout(std::process::Stdio::null()),
    )?;
    Ok((ck, engine, t.elapsed().as_secs_f64()))
}

pub fn bench_scale(b: &ScaleBench) -> Result<(), Failure> {
    let quiet = b.json;
    let log = |m: &str| {
        if !quiet {
            eprintln!("scale: {m}");
        }
    };
    std::fs::create_dir_all(&b.dir).map_err(|e| fail(format!("{}: {e}", b.dir.display())))?;
    // Figures from different machines must not be compared by mistake: the CPU and the ISA
    // features that pick ONNX Runtime's kernels go beside every table.
    let cpu = crate::common::cpu_facts();
    if !b.json {
        println!("{}", crate::common::cpu_line(&cpu, b.threads));
    }
    let (ck, engine, compile_s) = prepare(b, &log)?;
    let config = cogvideox_5b_config(b.layers)?;
    let script = b.dir.join("torch_baseline.py");
    if b.torch_python.is_some() {
        std::fs::write(&script, TORCH_SCRIPT)
            .map_err(|e| fail(format!("{}: {e}", script.display())))?;
    }
    // The engine's own LoRA strategy (`bound` for f32, `unfused` for int8); below fp32 also
    // `fused` (re-quantising from the f32 base), the other way the precision issue names.
    let strategy = v2l_runtime::engine::Engine::open(&engine)?
        .bundle
        .map(|b| b.lora_strategy)
        .unwrap_or_default();
    log(&format!(
        "LoRA switch ({} strategy, rank 64 on every targeted layer)",
        strategy.name()
    ));
    // `unfused` switches laid out per guidance sample, and with the other LoRA's laid-out
    // inputs kept, by strategy.
    let (mut kept, mut per_sample) = (serde_json::Map::new(), serde_json::Map::new());
    let (mut fresh, mut packed) = (serde_json::Map::new(), serde_json::Map::new());
    let mut note_kept = |s: Strategy, sw: &Switch| {
        let variants = [
            (
                sw.fresh_ms,
                &mut fresh,
                "to ranks 64 and 32 in turn: new inputs every switch",
            ),
            (
                sw.packed_ms,
                &mut packed,
                "the same, made in one buffer as a GPU session takes them (here left on the host)",
            ),
            (
                sw.per_sample_ms,
                &mut per_sample,
                "laid out once per guidance sample, as before 2026-11-28",
            ),
            (
                sw.kept_ms,
                &mut kept,
                "back to a LoRA whose inputs were kept",
            ),
        ];
        for (ms, into, what) in variants {
            let Some(ms) = ms else { continue };
            if !b.json {
                println!("LoRA switch: {ms:.3} ms ({} strategy, {what})", s.name());
            }
            into.insert(s.name().to_string(), serde_json::json!(ms));
        }
    };
    let sw = bench_switch(&engine, strategy, b.threads, b.repeat.max(3), 64)?;
    let (switch_ms, bound_mb) = (sw.ms, sw.heap_mb);
    if !b.json {
        println!(
            "LoRA switch: {switch_ms:.1} ms ({} strategy, rank 64, all targeted layers); the loaded DiT runner adds {bound_mb:.0} MB of heap",
            strategy.name()
        );
    }
    note_kept(strategy, &sw);
    // Below fp32, the other strategy that keeps low-precision weights (`fused` re-rounds or
    // re-quantises from the f32 base; `unfused` keeps an f32 branch). One block only:
    // re-quantising a whole deep model per switch takes minutes.
    let other = match strategy {
        Strategy::Fused => Strategy::Unfused,
        _ => Strategy::Fused,
    };
    let other_switch_ms = if b.precision != "fp32" && b.layers == 1 {
        let sw = bench_switch(&engine, other, b.threads, b.repeat.max(3), 64)?;
        if !b.json {
            println!("LoRA switch: {:.1} ms ({} strategy)", sw.ms, other.name());
        }
        note_kept(other, &sw);
        Some(sw.ms)
    } else {
        None
    };
    let mut asked = serde_json::Map::new();
    let timed = |s: Strategy| s == strategy || (other_switch_ms.is_some() && s == other);
    for &s in b.lora_strategies.iter().filter(|&&s| !timed(s)) {
        let sw = bench_switch(&engine, s, b.threads, b.repeat.max(3), 64)?;
        if !b.json {
            println!("LoRA switch: {:.1} ms ({} strategy)", sw.ms, s.name());
        }
        note_kept(s, &sw);
        asked.insert(s.name().to_string(), serde_json::json!(sw.ms));
    }
    let mut rows = Vec::new();
    for &(frames, h, w) in &b.cases {
        if frames == 0 || (frames - 1) % 4 != 0 || h % 16 != 0 || w % 16 != 0 {
            return Err(fail(format!(
                "case {frames}x{h}x{w}: frames must be 1 + 4k, height and width multiples of 16"
            )));
        }
        let case = b.dir.join(format!("dit-{frames}x{h}x{w}"));
        std::fs::create_dir_all(&case).map_err(|e| fail(format!("{}: {e}", case.display())))?;
        let inputs = case.join("inputs.safetensors");
        let feed = v2l_compile::accuracy::dit_sample_inputs(&config, frames, h, w, 226)?;
        let tokens = 226 + feed[3].1.shape[0];
        write_safetensors(&inputs, &feed.into_iter().collect())?;
        let out = case.join("v2l.safetensors");
        // One process running the step `repeat` times: `ms` is the median step (as a
        // generation's steps run), `first_ms` the cold first step; then a one-step process for
        // the whole-process time and peak RSS of `v2l-run stage dit` as a user runs it once.
        let stage = |repeat: usize| {
            let mut c = Command::new(sibling("v2l-run")?);
            c.arg("--engine")
                .arg(&engine)
                .args([
                    "--threads",
                    &b.threads.to_string(),
                    "stage",
                    "dit",
                    "--json",
                ])
                .args(["--repeat", &repeat.to_string(), "--inputs"])
                .arg(&inputs)
                .arg("-o")
                .arg(&out);
            Ok::<_, Failure>(c)
        };
        log(&format!(
            "{frames}x{h}x{w} ({tokens} tokens): v2l, {} steps in one process",
            b.repeat.max(1)
        ));
        let steps = last_json(&run_measured(&mut stage(b.repeat.max(1))?)?.stdout)?;
        log(&format!(
            "{frames}x{h}x{w}: v2l, one step as a whole process"
        ));
        // `repeat` one-step processes: the median wall time, the largest peak RSS.
        let mut onces = Vec::new();
        for _ in 0..b.repeat.max(1) {
            onces.push(run_measured(&mut stage(1)?)?);
        }
        let process_runs_s: Vec<f64> = onces.iter().map(|o| o.wall_s).collect();
        let process_s = median(process_runs_s.clone());
        let peak_rss_mb = onces.iter().map(|o| o.peak_rss_mb).fold(0.0, f64::max);
        let Some(once) = onces.pop() else {
            return Err(fail("no process ran"));
        };
        let j = last_json(&once.stdout)?;
        let mut row = serde_json::json!({
            "layers": b.layers, "precision": b.precision, "attention": j["attention"], "int8_gemm": j["int8_gemm"],
            "calibration_samples": b.calibration_samples, "frames": frames, "height": h,
            "width": w, "tokens": tokens, "ms": steps["run_ms"], "runs_ms": steps["runs_ms"],
            "first_ms": j["run_ms"], "process_s": process_s, "process_runs_s": process_runs_s,
            "peak_rss_mb": peak_rss_mb,
            "load_s": j["load_ms"].as_f64().map(|v| v / 1e3), "lora_switch_ms": switch_ms,
            "bound_heap_mb": bound_mb, "lora_strategy": strategy.name(),
            "lora_switch_other": other_switch_ms.map(|ms| serde_json::json!({"strategy": other.name(), "ms": ms})),
            "lora_switch_asked": asked, "lora_switch_kept_ms": kept,
            "lora_switch_per_sample_ms": per_sample, "lora_switch_fresh_ms": fresh,
            "lora_switch_packed_ms": packed,
            "torch_ms": null, "torch_peak_rss_mb": null, "rel_l2_vs_torch": null,
        });
        if let Some(py) = &b.torch_python {
            // The same module in diffusers, in `dtype`: (median ms, runs, peak RSS MB, output).
            let torch = |dtype: &str, out: &std::path::Path| {
                log(&format!("{frames}x{h}x{w}: PyTorch {dtype}"));
                let r = run_measured(
                    Command::new(py)
                        .arg(&script)
                        .arg("dit")
                        .arg(&ck)
                        .arg(&inputs)
                        .arg(out)
                        .args(["--threads", &b.threads.to_string()])
                        .args(["--repeat", &b.repeat.max(1).to_string()])
                        .args(["--dtype", dtype]),
                )?;
                let j = last_json(&r.stdout)?;
                let sample = read_safetensors(out)?.remove("sample");
                Ok::<_, Failure>((j["ms"].clone(), j["runs_ms"].clone(), r.peak_rss_mb, sample))
            };
            let (ms, runs, rss, t) = torch("fp32", &case.join("torch.safetensors"))?;
            row["torch_ms"] = ms;
            row["torch_runs_ms"] = runs;
            row["torch_peak_rss_mb"] = rss.into();
            let a = read_safetensors(&out)?;
            if let (Some(a), Some(t)) = (a.get("sample"), &t) {
                row["rel_l2_vs_torch"] = a.rel_l2(t).into();
            }
            // Below fp32 the speed to beat is PyTorch in bf16, what users run.
            if b.precision != "fp32" {
                let (ms, runs, rss, bf) = torch("bf16", &case.join("torch_bf16.safetensors"))?;
                row["torch_bf16_ms"] = ms;
                row["torch_bf16_runs_ms"] = runs;
                row["torch_bf16_peak_rss_mb"] = rss.into();
                if let (Some(a), Some(t)) = (&bf, &t) {
                    row["torch_bf16_rel_l2_vs_torch"] = a.rel_l2(t).into();
                }
                // How close v2l's low-precision output is to PyTorch's bf16 one.
                if let (Some(a), Some(t)) = (read_safetensors(&out)?.get("sample"), &bf) {
                    row["rel_l2_vs_torch_bf16"] = a.rel_l2(t).into();
                }
            }
        }
        if !b.json {
            print_row(&row);
        }
        rows.push(row);
    }
    let vae = bench_vae(b, &script, &log)?;
    if b.json {
        println!(
            "{}",
            serde_json::json!({"cpu": cpu, "dit": rows, "vae": vae, "compile_s": compile_s, "threads": b.threads})
        );
    }
    Ok(())
}

/// VAE decode at real widths: a random CogVideoX VAE (diffusers' default config, made by the
/// PyTorch side), v2l and diffusers each in their own process on the same latents, tiled as
/// `--vae-tiling auto` decides (diffusers' `enable_tiling()` when v2l tiles).
fn bench_vae(
    b: &ScaleBench,
    script: &std::path::Path,
    log: &dyn Fn(&str),
) -> Result<Vec<serde_json::Value>, Failure> {
    let Some(py) = &b.torch_python else {
        if !b.vae_cases.is_empty() {
            log("VAE: skipped (its real-width checkpoint is generated by --torch-python)");
        }
        return Ok(Vec::new());
    };
    if b.vae_cases.is_empty() {
        return Ok(Vec::new());
    }
    let ck = b.dir.join("vae-real");
    if !ck.join("config.json").is_file() {
        log("generating a real-width CogVideoX VAE (diffusers default config)");
        run_measured(Command::new(py).arg(script).arg("make-vae").arg(&ck))?;
    }
    let (export, engine) = (b.dir.join("vae-export"), b.dir.join("vae-engine"));
    for d in [&export, &engine] {
        let _ = std::fs::remove_dir_all(d);
    }
    let quiet = |c: &mut Command| -> Result<(), Failure> {
        let ok = c
            .stdout(std::process::Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        ok.then_some(())
            .ok_or_else(|| fail(format!("{c:?} failed")))
    };
    quiet(
        Command::new(sibling("v2l-export")?)
            .arg("vae")
            .arg(&ck)
            .arg("-o")
            .arg(&export),
    )?;
    quiet(
        Command::new(sibling("v2l-compile")?)
            .arg(&export)
            .arg("-o")
            .arg(&engine),
    )?;
    let config: serde_json::Value = std::fs::read_to_string(ck.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    let tile = v2l_runtime::vae::Tiling::for_config(&config);
    let mut rows = Vec::new();
    for &(frames, h, w) in &b.vae_cases {
        if frames == 0 || (frames - 1) % 4 != 0 || h % 8 != 0 || w % 8 != 0 {
            return Err(fail(format!(
                "VAE case {frames}x{h}x{w}: frames 1 + 4k, sizes multiples of 8"
            )));
        }
        let (lf, lh, lw) = v2l_contracts::LatentGrid::of_video(frames, h, w).dims();
        let tiled = tile.applies(v2l_runtime::vae::TilingMode::Auto, h, w);
        let case = b.dir.join(format!("vae-{frames}x{h}x{w}"));
        std::fs::create_dir_all(&case).map_err(|e| fail(format!("{}: {e}", case.display())))?;
        let inputs = case.join("inputs.safetensors");
        let latents = v2l_runtime::tensor::gaussian_noise(vec![1, 16, lf, lh, lw], 5);
        write_safetensors(
            &inputs,
            &[("latents".to_string(), latents)].into_iter().collect(),
        )?;
        let out = case.join("v2l.safetensors");
        log(&format!(
            "VAE decode {lf}x{lh}x{lw} latents -> {frames}x{h}x{w} (tiled: {tiled}): v2l"
        ));
        let r = run_measured(
            Command::new(sibling("v2l-run")?)
                .arg("--engine")
                .arg(&engine)
                .args([
                    "--threads",
                    &b.threads.to_string(),
                    "stage",
                    "vae-decode",
                    "--json",
                ])
                .args(["--vae-tiling", "auto", "--inputs"])
                .arg(&inputs)
                .arg("-o")
                .arg(&out),
        )?;
        let j = last_json(&r.stdout)?;
        let mut row = serde_json::json!({
            "frames": frames, "height": h, "width": w, "latent_frames": lf, "tiling": tiled,
            "ms": j["run_ms"], "process_s": r.wall_s, "peak_rss_mb": r.peak_rss_mb,
            "torch_ms": null, "torch_peak_rss_mb": null, "rel_l2_vs_torch": null,
        });
        log(&format!("VAE decode {frames}x{h}x{w}: PyTorch"));
        let tout = case.join("torch.safetensors");
        let mut cmd = Command::new(py);
        cmd.arg(script)
            .arg("vae-decode")
            .arg(&ck)
            .arg(&inputs)
            .arg(&tout);
        cmd.args(["--threads", &b.threads.to_string()]);
        if tiled {
            cmd.arg("--tiling");
        }
        let t = run_measured(&mut cmd)?;
        row["torch_ms"] = last_json(&t.stdout)?["ms"].clone();
        row["torch_peak_rss_mb"] = t.peak_rss_mb.into();
        if let (Some(a), Some(t)) = (
            read_safetensors(&out)?.get("sample"),
            read_safetensors(&tout)?.get("sample"),
        ) {
            row["rel_l2_vs_torch"] = a.rel_l2(t).into();
        }
        if !b.json {
            let f = |k: &str| {
                row[k]
                    .as_f64()
                    .map(|v| format!("{v:.1}"))
                    .unwrap_or("-".into())
            };
            println!(
                "VAE decode {frames}x{h}x{w} (tiled: {tiled}): v2l {} ms, peak {} MB | torch {} ms, peak {} MB | rel L2 {}",
                f("ms"), f("peak_rss_mb"), f("torch_ms"), f("torch_peak_rss_mb"),
                row["rel_l2_vs_torch"].as_f64().map(|v| format!("{v:.2e}")).unwrap_or("-".into())
            );
        }
        rows.push(row);
    }
    Ok(rows)
}

/// A `/proc/self/status` field in MB.
fn status_mb(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with(field))?.to_string();
            line.split_whitespace().nth(1)?.parse::<f64>().ok()
        })
        .map(|kb| kb * 1024.0 / 1e6)
        .unwrap_or(f64::NAN)
}

/// Loads the DiT with a LoRA `strategy` and times switching to a rank-`rank` LoRA on every
/// targeted layer. Returns (median switch ms, anonymous resident MB the loaded runner added:
/// heap, not the page cache of the memory-mapped base weights).
fn bench_switch(
    engine: &std::path::Path,
    strategy: Strategy,
    threads: usize,
    repeat: usize,
    rank: usize,
) -> Result<Switch, Failure> {
    use v2l_runtime::engine::Engine;
    use v2l_runtime::lora::strategy::DitRunner;
    let dir = Engine::open(engine)?;
    let opts = dir.session_options(threads);
    let before = status_mb("RssAnon:");
    let mut runner = DitRunner::load(&dir, &opts, strategy)?;
    let added = status_mb("RssAnon:") - before;
    // Two LoRAs of the same rank: a switch is from one to the other, as a server serving
    // different effects makes it (the first LoRA after none lays the factor inputs out);
    // `unfused` also times a third of half the rank.
    let lora = |rank, seed| crate::common::generated_lora(&dir, rank, seed);
    let mut loras = vec![lora(rank, 0)?, lora(rank, 1)?];
    if strategy == Strategy::Unfused {
        loras.push(lora(rank / 2, 2)?);
    }
    runner.set_lora(&dir, Some(&loras[1]))?;
    // Median ms of `repeat` switches, the i-th to the LoRAs `slots(i)` names (one: the whole
    // batch's); back to the second after.
    let timed = |runner: &mut DitRunner, slots: &dyn Fn(usize) -> Vec<usize>| {
        let mut times = Vec::new();
        for i in 0..repeat.max(1) {
            let slots: Vec<_> = slots(i).into_iter().map(|k| loras.get(k)).collect();
            let t = Instant::now();
            match slots[..] {
                [one] => runner.set_lora(&dir, one)?,
                _ => runner.set_sample_loras(&dir, &slots)?,
            }
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        runner.set_lora(&dir, Some(&loras[1]))?;
        Ok::<_, Failure>(median(times))
    };
    let ms = timed(&mut runner, &|i| vec![i % 2])?;
    let (mut fresh_ms, mut per_sample_ms, mut kept_ms) = (None, None, None);
    let mut packed_ms = None;
    if strategy == Strategy::Unfused {
        // To ranks 64 and 32 in turn: a CPU engine pads no rank, so each switch makes new
        // inputs of another shape, as a GPU engine's session takes every switch.
        fresh_ms = Some(timed(&mut runner, &|i| vec![2 - i % 2])?);
        // The same switches as a GPU session makes them: every input in one buffer, which
        // there moves to the device in one copy (here it stays on the host).
        let packs = v2l_runtime::SessionOptions {
            pack_fixed_inputs: true,
            ..opts.clone()
        };
        let mut packing = DitRunner::load(&dir, &packs, strategy)?;
        packing.set_lora(&dir, Some(&loras[1]))?;
        packed_ms = Some(timed(&mut packing, &|i| vec![2 - i % 2])?);
        drop(packing);
        // Laid out one slot per guidance sample (two), as a request's switch was before
        // 2026-11-28: the baseline of `ms`, one slot per request.
        per_sample_ms = Some(timed(&mut runner, &|i| vec![i % 2; 2])?);
        // With the other LoRA's inputs kept (`--factor-cache-mb`): every switch a hit.
        runner.set_factor_cache(u64::MAX);
        runner.set_lora(&dir, Some(&loras[0]))?;
        runner.set_lora(&dir, Some(&loras[1]))?;
        kept_ms = Some(timed(&mut runner, &|i| vec![i % 2])?);
    }
    Ok(Switch {
        ms,
        fresh_ms,
        packed_ms,
        per_sample_ms,
        kept_ms,
        heap_mb: added,
    })
}

/// A LoRA switch's median time; `unfused` also to inputs of a new shape (one by one and in
/// one buffer), laid out per guidance sample, and with the LoRAs' laid-out inputs kept.
struct Switch {
    ms: f64,
    fresh_ms: Option<f64>,
    packed_ms: Option<f64>,
    per_sample_ms: Option<f64>,
    kept_ms: Option<f64>,
    heap_mb: f64,
}

fn print_row(r: &serde_json::Value) {
    let f = |k: &str| {
        r[k].as_f64()
            .map(|v| format!("{v:.1}"))
            .unwrap_or("-".into())
    };
    let ratio = match (r["ms"].as_f64(), r["torch_ms"].as_f64()) {
        (Some(a), Some(b)) => format!("{:.2}x", b / a),
        _ => "-".into(),
    };
    println!(
        "DiT {}L {} {}x{}x{} ({} tokens): v2l step {} ms, process {} s, peak {} MB | torch {} ms, peak {} MB | speed-up {ratio}, rel L2 {}",
        r["layers"], r["precision"].as_str().unwrap_or(""), r["frames"], r["height"], r["width"], r["tokens"],
        f("ms"), f("process_s"), f("peak_rss_mb"), f("torch_ms"), f("torch_peak_rss_mb"),
        r["rel_l2_vs_torch"].as_f64().map(|v| format!("{v:.2e}")).unwrap_or("-".into()),
    );
    if r["torch_bf16_ms"].is_number() {
        println!(
            "    torch bf16 {} ms, peak {} MB, rel L2 vs torch fp32 {}; v2l vs torch bf16 {}",
            f("torch_bf16_ms"),
            f("torch_bf16_peak_rss_mb"),
            r["torch_bf16_rel_l2_vs_torch"]
                .as_f64()
                .map(|v| format!("{v:.2e}"))
                .unwrap_or("-".into()),
            r["rel_l2_vs_torch_bf16"]
                .as_f64()
                .map(|v| format!("{v:.2e}"))
                .unwrap_or("-".into()),
        );
    }
}
