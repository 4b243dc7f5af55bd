//! `v2l-bench serve`: the real `v2l-serve` on loopback, driven over HTTP.
//!
//! 1. LoRA resolution, sequentially, `repeat` times each: a base job; a cache miss (a reference
//!    clip at a LoRA weight not seen before: VAE encode + hypernetwork); a cache hit with the
//!    LoRA already resident; a hit that switches between two cached LoRAs. Server-side stage
//!    timings (`lora`, `lora_switch`, `total`) and client latency, medians with min..max.
//! 2. The baseline for the switch: the `bound` strategy's `set_lora` between the same kind of
//!    predicted LoRAs, in this process, on the same engine.
//! 3. Load: `clients` threads for `seconds`, each submitting jobs with one of three LoRAs
//!    (base, reference clip, stored LoRA by id) and downloading the video: throughput, p50/p99
//!    latency, errors.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use v2l_contracts::io::files as files_io;

use v2l_runtime::engine::Engine;
use v2l_runtime::lora::strategy::Strategy;
use v2l_runtime::lora::AppliedLora;
use v2l_runtime::pipeline::Pipeline;
use v2l_runtime::video::Frames;
use v2l_serve::client::{Client, Form};

use crate::pipeline::{stats, time};
use crate::Failure;

/// `v2l-bench serve`'s options (its clap arguments).
#[derive(clap::Args)]
pub struct ServeBench {
    /// Engine bundle or export directory with a hypernetwork (the tiny one is the intent)
    #[arg(long)]
    pub engine: PathBuf,
    /// Concurrent clients of the load phase
    #[arg(long, default_value_t = 8)]
    pub clients: usize,
    /// Length of the load phase
    #[arg(long, default_value_t = 20.0)]
    pub seconds: f64,
    /// Denoising steps per job
    #[arg(long, default_value_t = 4)]
    pub steps: usize,
    /// Server pipelines (`v2l-serve --workers`)
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// ONNX Runtime threads per pipeline (0: one per core)
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Sequential jobs per LoRA-resolution row (medians are reported)
    #[arg(long, default_value_t = 5)]
    pub repeat: usize,
    /// `v2l-serve --lora-strategy`: fused, bound or unfused (default: the engine's)
    #[arg(long)]
    pub lora_strategy: Option<String>,
    /// One JSON object instead of tables (the global `--json`).
    /// `v2l-serve --batch`: jobs that may share DiT calls (above 1 implies `unfused`)
    #[arg(long, default_value_t = 1)]
    pub batch: u32,
    #[arg(skip)]
    pub json: bool,
}

/// `v2l-serve` as a child process, stopped with SIGTERM when dropped.
struct Served {
    child: Child,
    base: String,
}

impl Served {
    fn start(b: &ServeBench, state: &Path) -> Result<Served, Failure> {
        let exe = std::env::current_exe()
            .map_err(|e| Failure::new(format!("cannot find v2l-serve: {e}")))?
            .with_file_name("v2l-serve");
        let mut child = Command::new(&exe)
            .arg("--engine")
            .arg(&b.engine)
            .arg("--state-dir")
            .arg(state)
            .args([
                "--addr",
                "127.0.0.1:0",
                "--queue",
                &(4 * b.clients.max(1)).to_string(),
            ])
            .args([
                "--workers",
                &b.workers.to_string(),
                "--threads",
                &b.threads.to_string(),
                "--batch",
                &b.batch.to_string(),
            ])
            .args(
                b.lora_strategy
                    .iter()
                    .flat_map(|s| ["--lora-strategy".to_string(), s.clone()]),
            )
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| {
                Failure::new(format!(
                    "{}: {e} (build it: cargo build --release)",
                    exe.display()
                ))
            })?;
        let stderr = child
            .stderr
            .take()
            .ok_or_else(|| Failure::new("no stderr from v2l-serve"))?;
        let mut lines = BufReader::new(stderr).lines();
        let base = loop {
            match lines.next() {
                Some(Ok(line)) => {
                    if let Some(rest) = line.split("listening on ").nth(1) {
                        break rest.split(' ').next().unwrap_or_default().to_string();
                    }
                    if line.starts_with("error") {
                        return Err(Failure::new(format!("v2l-serve: {line}")));
                    }
                }
                _ => return Err(Failure::new("v2l-serve exited before listening")),
            }
        };
        // Keep draining its stderr so it never blocks on a full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        Ok(Served { child, base })
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

/// Deterministic RGB8 frames.
fn synthetic(frames: usize, height: usize, width: usize, seed: u64) -> Frames {
    let noise = v2l_contracts::noise::gaussian(frames * height * width * 3, seed);
    Frames {
        frames,
        height,
        width,
        rgb: noise
            .iter()
            .map(|x| (x * 40.0 + 128.0).clamp(0.0, 255.0) as u8)
            .collect(),
    }
}

/// Prompt embeddings `[1, L, D]` of the engine's sizes (for engines without a text encoder).
fn random_embeddings(engine: &Engine) -> v2l_runtime::Tensor {
    let dim = engine
        .manifest
        .dit
        .as_ref()
        .map(|d| d.text_embed_dim)
        .unwrap_or(4096);
    let len = engine.text_sequence_length().unwrap_or(226);
    v2l_runtime::tensor::gaussian_noise(vec![1, len, dim], 3)
}

fn job_ms(job: &serde_json::Value, stage: &str) -> f64 {
    job["timings"][stage].as_f64().unwrap_or(f64::NAN)
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

pub fn bench_serve(b: &ServeBench) -> Result<(), Failure> {
    let engine = Engine::open(&b.engine)?;
    let (frames, height, width) = match engine.default_size() {
        (Some(f), Some(h), Some(w)) => (f, h, w),
        _ => return Err(Failure::new("the engine's configs give no sample size")),
    };
    if engine.manifest.hypernet.is_none() {
        return Err(Failure::new(
            "the engine has no hypernetwork; the bench needs reference clips",
        ));
    }
    let tmp = tempfile::tempdir().map_err(|e| Failure::new(e.to_string()))?;
    // Media as clients send it: a PNG first frame and an mp4 reference clip.
    let image_path = tmp.path().join("first.png");
    v2l_runtime::video::write_contact_sheet(&image_path, &synthetic(1, height, width, 1), 1)?;
    let clip = synthetic(frames, height, width, 2);
    let clip_path = tmp.path().join("reference.mp4");
    v2l_runtime::video::write_mp4(&clip_path, &clip, 8)?;
    let read =
        |p: &Path| std::fs::read(p).map_err(|e| Failure::new(format!("{}: {e}", p.display())));
    let (image, reference) = (read(&image_path)?, read(&clip_path)?);
    let prompt = |f: Form| -> Result<Form, Failure> {
        if engine.manifest.text_encoder.is_some() {
            return Ok(f.text("prompt", "a bench prompt"));
        }
        let e = random_embeddings(&engine);
        let p = tmp.path().join("embeds.safetensors");
        let m = std::collections::BTreeMap::from([
            (files_io::PROMPT_EMBEDS.to_string(), e.clone()),
            (files_io::NEGATIVE_PROMPT_EMBEDS.to_string(), e),
        ]);
        v2l_runtime::write_safetensors(&p, &m)?;
        Ok(f.file("prompt_embeds", read(&p)?))
    };
    let base_form = prompt(
        Form::new()
            .file("image", image.clone())
            .text("steps", b.steps)
            .text("seed", 1),
    )?;

    let served = Served::start(b, &tmp.path().join("state"))?;
    let client = Client::new(&served.base, None);
    let timeout = Duration::from_secs(600);
    let run = |form: &Form| -> Result<(serde_json::Value, f64), Failure> {
        let t = Instant::now();
        let (job, _) = client
            .generate(form, timeout)
            .map_err(|e| Failure::new(e.to_string()))?;
        Ok((job, t.elapsed().as_secs_f64() * 1e3))
    };
    let with_reference = |weight: f32| {
        base_form
            .clone()
            .file("reference", reference.clone())
            .text("lora_scale", weight)
    };
    // Two cached LoRAs to switch between.
    let (a, _) = run(&with_reference(1.0))?;
    let (bj, _) = run(&with_reference(0.5))?;
    let ids = [a["lora_id"].clone(), bj["lora_id"].clone()]
        .map(|v| v.as_str().unwrap_or_default().to_string());

    let repeat = b.repeat.max(1);
    let mut rows: Vec<(&str, Vec<serde_json::Value>, Vec<f64>)> = vec![
        ("base (no LoRA)", vec![], vec![]),
        ("miss (predict)", vec![], vec![]),
        ("hit, resident", vec![], vec![]),
        ("hit, switch", vec![], vec![]),
    ];
    for k in 0..repeat {
        // A weight not seen before is a new cache key: VAE encode + hypernetwork.
        let fresh = 0.9 - 1e-3 * (k + 1) as f32;
        let forms = [
            base_form.clone(),
            with_reference(fresh),
            with_reference(fresh),
            base_form.clone().text("lora_id", &ids[k % 2]),
        ];
        for (row, form) in rows.iter_mut().zip(forms) {
            let (job, ms) = run(&form)?;
            row.1.push(job);
            row.2.push(ms);
        }
    }

    // The `bound` strategy's switch on the same engine, in this process.
    let bound_switch = {
        let opts = engine.session_options(b.threads);
        let mut p = Pipeline::load_with_strategy(engine.clone(), &opts, Strategy::Bound)?;
        let loras: Vec<AppliedLora> = [1.0f32, 0.5]
            .iter()
            .map(|w| {
                p.predict(&clip, *w).map(|pred| AppliedLora {
                    lora: pred.lora.into(),
                    source: "bench".into(),
                    multiplier: 1.0,
                })
            })
            .collect::<Result<_, _>>()?;
        // As in the server, a generation runs between switches (the weights are not hot).
        let embeds = random_embeddings(&engine);
        let req = v2l_runtime::pipeline::RequestParts {
            image: Some(synthetic(1, height, width, 1)),
            image_embeds: None,
            prompt_embeds: embeds.clone(),
            negative_prompt_embeds: embeds,
            frames,
            steps: b.steps,
            guidance: 6.0,
            noise: engine.seeded_noise(frames, height, width, 1)?,
            lora: v2l_runtime::pipeline::RequestLora::Resident,
            sampler: None,
            inpaint_noise: None,
            seed: None,
            cache: None,
        }
        .check(&engine)?;
        let mut v = Vec::new();
        for i in 0..repeat.max(2) {
            let (r, ms) = time(|| p.set_lora(Some(&loras[i % 2])));
            r?;
            v.push(ms);
            p.generate(&req, &mut |_, _| true)?;
        }
        stats(v)
    };

    // Load: clients × seconds.
    let deadline = Instant::now() + Duration::from_secs_f64(b.seconds);
    let forms = [
        base_form.clone(),
        with_reference(1.0),
        base_form.clone().text("lora_id", &ids[1]),
    ];
    let started = Instant::now();
    let per_client: Vec<(Vec<f64>, usize)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..b.clients.max(1))
            .map(|c| {
                let (forms, base) = (&forms, &served.base);
                s.spawn(move || {
                    let client = Client::new(base, None);
                    let (mut lat, mut errors) = (Vec::new(), 0);
                    let mut i = c;
                    while Instant::now() < deadline {
                        let t = Instant::now();
                        match client.generate(&forms[i % 3], timeout) {
                            Ok(_) => lat.push(t.elapsed().as_secs_f64() * 1e3),
                            Err(_) => errors += 1,
                        }
                        i += 1;
                    }
                    (lat, errors)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_default())
            .collect()
    });
    let wall = started.elapsed().as_secs_f64();
    let mut lat: Vec<f64> = per_client.iter().flat_map(|(l, _)| l.clone()).collect();
    let errors: usize = per_client.iter().map(|(_, e)| e).sum();
    let jobs = lat.len();
    let (p50, p99) = (percentile(&mut lat, 0.5), percentile(&mut lat, 0.99));
    drop(served);

    let med = |jobs: &[serde_json::Value], stage: &str| {
        stats(jobs.iter().map(|j| job_ms(j, stage)).collect())
    };
    if b.json {
        let rows_json: serde_json::Map<String, serde_json::Value> = rows
            .iter()
            .map(|(name, jobs, client)| {
                (name.to_string(), serde_json::json!({
                    "lora_ms": med(jobs, "lora").0, "lora_switch_ms": med(jobs, "lora_switch").0,
                    "pipeline_total_ms": med(jobs, "total").0, "job_ms": med(jobs, "job").0,
                    "client_ms": stats(client.clone()).0,
                }))
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({
                "size": {"frames": frames, "height": height, "width": width, "steps": b.steps},
                "repeat": repeat, "workers": b.workers, "resolution": rows_json,
                "bound_switch_ms": bound_switch.0,
                "load": {"batch": b.batch, "clients": b.clients, "seconds": wall, "jobs": jobs, "errors": errors,
                         "jobs_per_s": jobs as f64 / wall, "p50_ms": p50, "p99_ms": p99},
            })
        );
        return Ok(());
    }
    println!(
        "v2l-serve on loopback: {frames} frames {width}x{height}, {} steps, {} worker(s), LoRA strategy {}; medians of {repeat} (min..max), ms",
        b.steps,
        b.workers,
        b.lora_strategy.as_deref().unwrap_or("the engine's")
    );
    println!("  request           lora resolve            lora switch             pipeline total          worker job              client latency");
    for (name, jobs, client) in &rows {
        let cols = [
            med(jobs, "lora"),
            med(jobs, "lora_switch"),
            med(jobs, "total"),
            med(jobs, "job"),
            stats(client.clone()),
        ];
        print!("  {name:<16}");
        for (m, lo, hi) in cols {
            print!(" {m:>8.3} ({lo:.3}..{hi:.3})");
        }
        println!();
    }
    println!(
        "  bound strategy switch (in process, a generation between switches): {:.3} ms ({:.3}..{:.3})",
        bound_switch.0, bound_switch.1, bound_switch.2
    );
    println!(
        "load (--batch {}): {} clients for {wall:.1} s: {jobs} jobs, {:.2} jobs/s, p50 {p50:.1} ms, p99 {p99:.1} ms, {errors} errors",
        b.batch,
        b.clients,
        jobs as f64 / wall
    );
    Ok(())
}
