//! `v2l-bench e2e`: the whole CogVideoX-5B-I2V job at real size, as a user runs it.
//!
//! It writes (or reuses, cached by config outside the repository) a complete diffusers pipeline
//! directory with the real configs and generated weights (42-block transformer in bf16,
//! sharded; T5 v1.1 XXL in bf16, sharded; the VAE at real widths; a tokenizer; a Video2LoRA
//! hypernetwork and its LiLoRA at the widths upstream instantiates for CogVideoX-5B), then runs
//! the user's commands as separate processes, each with its own wall time and peak RSS:
//! `v2l-export pipeline`, `v2l-compile`, `v2l-lora predict` and `v2l-run` (with
//! `--stage-memory`, so every stage inside the run has its own peak). Beside it, diffusers'
//! `CogVideoXImageToVideoPipeline` in bf16 on the same directory, with the LoRA file.

use std::path::{Path, PathBuf};
use std::process::Command;
use v2l_contracts::io::files as files_io;

use v2l_export::{cogvideox_dit, synthetic, t5_encoder, video2lora_hypernet};
use v2l_graphs::DType;
use v2l_runtime::read_safetensors;

use crate::scale::{cogvideox_5b_config, run_measured, run_process, sibling, ProcRun};
use crate::Failure;

/// The diffusers side, written beside the cached pipeline.
const DIFFUSERS_SCRIPT: &str = include_str!("e2e/diffusers_e2e.py");
/// VideoX-Fun's side for `cogvideox-fun-5b-inp`.
const VIDEOX_FUN_SCRIPT: &str = include_str!("e2e/videox_fun_e2e.py");
/// The stage timer both baselines import.
const STAGES_SCRIPT: &str = include_str!("e2e/stages.py");
/// The real-width VAE is made by diffusers itself (`make-vae`).
const TORCH_SCRIPT: &str = include_str!("scale/torch_baseline.py");
/// The prompt both sides encode.
const PROMPT: &str = "a red ball rolls across a wooden table while the camera pans slowly left";
/// Which generator made a cached directory; bump when what it writes changes.
const GENERATOR: u32 = 1;

/// `v2l-bench e2e`'s options.
#[derive(clap::Args, Clone, Debug)]
pub struct E2eBench {
    /// The pipeline to generate and run
    #[arg(long, value_enum, default_value = "cogvideox-5b-i2v")]
    pub model: E2eModel,
    /// Cache directory for the generated pipeline, its export and engines (~50 GB at
    /// CogVideoX-5B size; default `$XDG_CACHE_HOME/v2l/e2e` or `~/.cache/v2l/e2e`). Parts
    /// already there for the same config are reused
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Python with torch + diffusers: makes the real-width VAE (required) and runs diffusers'
    /// pipeline beside v2l
    #[arg(long)]
    pub torch_python: PathBuf,
    /// `v2l-compile --precision` of the engine v2l runs
    #[arg(long, default_value = "int8")]
    pub precision: String,
    #[arg(long, default_value_t = 9)]
    pub frames: usize,
    #[arg(long, default_value_t = 256)]
    pub height: usize,
    #[arg(long, default_value_t = 384)]
    pub width: usize,
    #[arg(long, default_value_t = 2)]
    pub steps: usize,
    #[arg(long, default_value_t = 6.0)]
    pub guidance: f32,
    /// Threads of every process (ONNX Runtime's and torch's)
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Skip the diffusers (or VideoX-Fun) run
    #[arg(long)]
    pub no_diffusers: bool,
    /// `cogvideox-fun-5b-inp`: a work tree of BerserkerVV/Video2LoRA or aigc-apps/VideoX-Fun
    /// whose `videox_fun` package runs the authors' `CogVideoXFunInpaintPipeline` beside v2l
    #[arg(long)]
    pub videox_fun: Option<PathBuf>,
    /// Reuse the export and the engine an earlier run left in the cache (their stages are
    /// then missing from the report): re-measure the run alone
    #[arg(long)]
    pub reuse_engine: bool,
    #[arg(skip)]
    pub json: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum E2eModel {
    /// CogVideoX-5B-I2V (42 blocks, 48 × 64, 32 input channels) with T5 v1.1 XXL
    #[value(name = "cogvideox-5b-i2v")]
    Cogvideox5bI2v,
    /// CogVideoX-Fun-V1.1-5b-InP, Video2LoRA's released backbone (the same 42 blocks, 33 input
    /// channels, augmentation noise on), with T5 v1.1 XXL; beside it VideoX-Fun's own pipeline
    #[value(name = "cogvideox-fun-5b-inp")]
    CogvideoxFun5bInp,
}

impl E2eModel {
    fn name(self) -> &'static str {
        match self {
            E2eModel::Cogvideox5bI2v => "cogvideox-5b-i2v",
            E2eModel::CogvideoxFun5bInp => "cogvideox-fun-5b-inp",
        }
    }

    /// The transformer's `config.json`: Fun-InP's published config (in `fullscale_linear_shapes`)
    /// as it is, or with diffusers I2V's 32 input channels.
    fn dit_config(self) -> Result<serde_json::Value, Failure> {
        let mut c = cogvideox_5b_config(42)?;
        if self == E2eModel::CogvideoxFun5bInp {
            c["in_channels"] = 33.into();
            c["add_noise_in_inpaint_model"] = true.into();
        }
        Ok(c)
    }
}

fn fail(what: impl std::fmt::Display) -> Failure {
    Failure::new(what)
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Failure + '_ {
    move |e| fail(format!("{}: {e}", path.display()))
}

/// Video2LoRA at CogVideoX-5B: a = 100, b = 50, r = 1 (row width 150), 4 decoder blocks over
/// the DiT's 341 linears, 16 latent channels in.
fn hypernet_dims(linears: usize) -> video2lora_hypernet::HypernetDims {
    video2lora_hypernet::HypernetDims {
        feature_dim: 16,
        weight_dim: 150,
        num_layers: linears,
        heads: video2lora_hypernet::upstream_heads(150),
        blocks: 4,
        iterations: 4,
        context_len: None,
        context_encoder: None,
    }
}
const LILORA_A: usize = 100;
const LILORA_B: usize = 50;

/// CogVideoX-5B-I2V's scheduler, as its `scheduler_config.json` ships.
fn scheduler_config() -> serde_json::Value {
    serde_json::json!({
        "_class_name": "CogVideoXDDIMScheduler", "_diffusers_version": "0.42.1",
        "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
        "clip_sample": false, "clip_sample_range": 1.0, "num_train_timesteps": 1000,
        "prediction_type": "v_prediction", "rescale_betas_zero_snr": true,
        "sample_max_value": 1.0, "set_alpha_to_one": true, "snr_shift_scale": 1.0,
        "steps_offset": 0, "timestep_spacing": "trailing", "trained_betas": null
    })
}

fn model_index() -> serde_json::Value {
    use v2l_contracts::Family;
    serde_json::json!({
        "_class_name": "CogVideoXImageToVideoPipeline", "_diffusers_version": "0.42.1",
        "scheduler": ["diffusers", "CogVideoXDDIMScheduler"],
        "text_encoder": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "T5Tokenizer"],
        "transformer": ["diffusers", Family::CogVideoX.dit_class()],
        "vae": ["diffusers", Family::CogVideoX.vae_class()]
    })
}

/// The tokenizer: the embedded demo model's SentencePiece T5 tokenizer (the real
/// `google/t5-v1_1-xxl` one cannot be downloaded here); its ids fit the XXL's vocabulary.
const TOKENIZER: [(&str, &[u8]); 3] = [
    (
        "spiece.model",
        include_bytes!("../../models/cogvideox-effects/tokenizer/spiece.model"),
    ),
    (
        "tokenizer_config.json",
        include_bytes!("../../models/cogvideox-effects/tokenizer/tokenizer_config.json"),
    ),
    (
        "special_tokens_map.json",
        include_bytes!("../../models/cogvideox-effects/tokenizer/special_tokens_map.json"),
    ),
];

/// The DiT's `nn.Linear`s (2-D `.weight` tensors) with (out, in), in checkpoint order.
fn linears(layout: &[(String, Vec<usize>)]) -> Vec<(String, usize, usize)> {
    layout
        .iter()
        .filter_map(|(n, s)| match (n.strip_suffix(".weight"), s.as_slice()) {
            (Some(m), [o, i]) => Some((m.to_string(), *o, *i)),
            _ => None,
        })
        .collect()
}

/// Everything the cached pipeline depends on; its hash names the cache entry.
fn spec(model: E2eModel) -> Result<serde_json::Value, Failure> {
    Ok(serde_json::json!({
        "generator": GENERATOR,
        "transformer": model.dit_config()?,
        "text_encoder": t5_encoder::t5_xxl_config(),
        "vae": {"diffusers_default": true, "scaling_factor": 0.7},
        "hypernet": {"a": LILORA_A, "b": LILORA_B, "blocks": 4, "feature_dim": 16},
    }))
}

fn cache_root(given: &Option<PathBuf>) -> Result<PathBuf, Failure> {
    if let Some(d) = given {
        return Ok(d.clone());
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .ok_or_else(|| {
            fail("no cache directory: give --dir (neither XDG_CACHE_HOME nor HOME is set)")
        })?;
    Ok(base.join("v2l").join("e2e"))
}

/// Runs `part` unless `dir/.done` records it finished; writes the marker after.
fn cached(
    dir: &Path,
    what: &str,
    log: &dyn Fn(&str),
    part: impl FnOnce(&Path) -> Result<(), Failure>,
) -> Result<(), Failure> {
    let done = dir.join(".done");
    if done.is_file() {
        log(&format!("{what}: cached in {}", dir.display()));
        return Ok(());
    }
    log(&format!("{what}: generating {}", dir.display()));
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    part(dir)?;
    std::fs::write(&done, "").map_err(io(&done))
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<(), Failure> {
    let text = serde_json::to_string_pretty(v).map_err(|e| fail(e.to_string()))?;
    std::fs::write(path, text).map_err(io(path))
}

/// A checkpoint written as one named safetensors file (the hypernetwork, the LiLoRA).
fn write_single(
    file: &Path,
    layout: &[(String, Vec<usize>)],
    dtype: DType,
    seed: u64,
) -> Result<(), Failure> {
    let parent = file.parent().unwrap_or(Path::new("."));
    let tmp = tempfile::tempdir_in(parent).map_err(io(parent))?;
    synthetic::write_checkpoint_as(
        tmp.path(),
        &serde_json::json!({}),
        layout,
        dtype,
        seed,
        synthetic::Scales::Trained,
        &mut |_, _| {},
    )?;
    let from = tmp.path().join("diffusion_pytorch_model.safetensors");
    std::fs::rename(&from, file).map_err(io(file))
}

/// transformers names its shards `model-…`; the generator writes diffusers' names.
fn rename_to_transformers(dir: &Path) -> Result<(), Failure> {
    let index = dir.join("diffusion_pytorch_model.safetensors.index.json");
    let text = std::fs::read_to_string(&index).map_err(io(&index))?;
    let renamed = text.replace("diffusion_pytorch_model", "model");
    for e in std::fs::read_dir(dir).map_err(io(dir))?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(rest) = name.strip_prefix("diffusion_pytorch_model") {
            let to = dir.join(format!("model{rest}"));
            std::fs::rename(e.path(), &to).map_err(io(&to))?;
        }
    }
    let to = dir.join("model.safetensors.index.json");
    std::fs::write(&to, renamed).map_err(io(&to))
}

fn generate(model: &Path, kind: E2eModel, py: &Path, log: &dyn Fn(&str)) -> Result<(), Failure> {
    let progress = |what: &'static str| {
        let mut last = std::time::Instant::now();
        move |done: u64, total: u64| {
            if last.elapsed().as_secs() >= 5 {
                eprintln!(
                    "{what}: {}% of {}",
                    done * 100 / total.max(1),
                    crate::bytes(total)
                );
                last = std::time::Instant::now();
            }
        }
    };
    let dit_config = kind.dit_config()?;
    let cfg: cogvideox_dit::DitConfig =
        serde_json::from_value(dit_config.clone()).map_err(|e| fail(format!("config: {e}")))?;
    let dit_layout = cogvideox_dit::checkpoint_layout(&cfg);
    cached(
        &model.join("transformer"),
        "transformer (42 blocks, bf16)",
        log,
        |d| {
            Ok(synthetic::write_checkpoint_as(
                d,
                &dit_config,
                &dit_layout,
                DType::BF16,
                1,
                synthetic::Scales::Trained,
                &mut progress("transformer"),
            )?)
        },
    )?;
    cached(
        &model.join("text_encoder"),
        "T5 v1.1 XXL (bf16)",
        log,
        |d| {
            let config = t5_encoder::t5_xxl_config();
            let c: t5_encoder::T5Config =
                serde_json::from_value(config.clone()).map_err(|e| fail(format!("config: {e}")))?;
            synthetic::write_checkpoint_as(
                d,
                &config,
                &t5_encoder::checkpoint_layout(&c),
                DType::BF16,
                2,
                synthetic::Scales::Trained,
                &mut progress("text encoder"),
            )?;
            rename_to_transformers(d)
        },
    )?;
    cached(
        &model.join("vae"),
        "VAE (real widths, diffusers)",
        log,
        |d| {
            let script = d.join("make_vae.py");
            std::fs::write(&script, TORCH_SCRIPT).map_err(io(&script))?;
            run_measured(Command::new(py).arg(&script).arg("make-vae").arg(d))?;
            std::fs::remove_file(&script).map_err(io(&script))?;
            // CogVideoX-5B's VAE ships scaling_factor 0.7 (diffusers' default is 2B's 1.15258426).
            let path = d.join("config.json");
            let text = std::fs::read_to_string(&path).map_err(io(&path))?;
            let mut c: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| fail(format!("{}: {e}", path.display())))?;
            c["scaling_factor"] = 0.7.into();
            write_json(&path, &c)
        },
    )?;
    cached(
        &model.join("video2lora"),
        "Video2LoRA hypernetwork + LiLoRA",
        log,
        |d| {
            let lin = linears(&dit_layout);
            let dims = hypernet_dims(lin.len());
            write_single(
                &d.join("hypernetwork.safetensors"),
                &video2lora_hypernet::checkpoint_layout(&dims),
                DType::F32,
                3,
            )?;
            let lilora: Vec<(String, Vec<usize>)> = lin
                .iter()
                .flat_map(|(m, o, i)| {
                    let name = v2l_runtime::lora::lilora::upstream_name(m);
                    [
                        (format!("{name}.down_aux"), vec![LILORA_A, *i]),
                        (format!("{name}.up_aux"), vec![*o, LILORA_B]),
                    ]
                })
                .collect();
            write_single(&d.join("lilora.safetensors"), &lilora, DType::F32, 4)
        },
    )?;
    let tok = model.join("tokenizer");
    std::fs::create_dir_all(&tok).map_err(io(&tok))?;
    for (name, bytes) in TOKENIZER {
        std::fs::write(tok.join(name), bytes).map_err(io(&tok.join(name)))?;
    }
    let sched = model.join("scheduler");
    std::fs::create_dir_all(&sched).map_err(io(&sched))?;
    write_json(&sched.join("scheduler_config.json"), &scheduler_config())?;
    write_json(&model.join("model_index.json"), &model_index())
}

/// The reference clip and first frame: ffmpeg's moving test pattern at the generation size.
fn inputs(dir: &Path, b: &E2eBench) -> Result<(PathBuf, PathBuf), Failure> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let (reference, image) = (dir.join("reference.mp4"), dir.join("first_frame.png"));
    let size = format!("testsrc2=size={}x{}:rate=8", b.width, b.height);
    for (out, frames) in [(&reference, b.frames), (&image, 1)] {
        let ok = Command::new("ffmpeg")
            .args(["-v", "error", "-y", "-f", "lavfi", "-i", &size, "-frames:v"])
            .arg(frames.to_string())
            .args(["-pix_fmt", if frames > 1 { "yuv420p" } else { "rgb24" }])
            .arg(out)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            return Err(fail(format!("ffmpeg could not write {}", out.display())));
        }
    }
    Ok((reference, image))
}

fn stage(wall_s: f64, peak_rss_mb: f64) -> serde_json::Value {
    serde_json::json!({"wall_s": wall_s, "peak_rss_mb": peak_rss_mb})
}

fn of_run(r: &ProcRun) -> serde_json::Value {
    stage(r.wall_s, r.peak_rss_mb)
}

/// `v2l-run --json --stage-memory`'s stages, under the names.
fn run_stages(j: &serde_json::Value, out: &mut serde_json::Map<String, serde_json::Value>) {
    let names = [
        ("text_encode", "text_encode"),
        ("load", "load"),
        ("reference_encode", "reference_encode"),
        ("hypernetwork", "hypernetwork"),
        ("lora_fuse", "lora_apply"),
        ("vae_encode", "first_frame_encode"),
        ("dit_release", "dit_release"),
        ("vae_decode", "vae_decode"),
    ];
    for (from, to) in names {
        if let (Some(ms), Some(mb)) = (
            j["stages_ms"][from].as_f64(),
            j["stage_peak_rss_mb"][from].as_f64(),
        ) {
            out.insert(to.into(), stage(ms / 1e3, mb));
        }
    }
    let steps = j["dit_steps_ms"].as_array().cloned().unwrap_or_default();
    for (i, ms) in steps.iter().enumerate() {
        let mb = j["dit_steps_peak_rss_mb"][i].as_f64().unwrap_or(f64::NAN);
        out.insert(
            format!("dit_step_{}", i + 1),
            stage(ms.as_f64().unwrap_or(f64::NAN) / 1e3, mb),
        );
    }
}

fn frames_of(path: &Path) -> Result<Vec<f32>, Failure> {
    let t = read_safetensors(path)?
        .remove("frames")
        .ok_or_else(|| fail(format!("{}: no `frames`", path.display())))?;
    Ok(t.as_f32("frames")?.to_vec())
}

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let (mut d, mut n) = (0.0f64, 0.0f64);
    for (x, y) in a.iter().zip(b) {
        d += ((x - y) as f64).powi(2);
        n += (*y as f64).powi(2);
    }
    (d / n.max(f64::MIN_POSITIVE)).sqrt()
}

pub fn bench_e2e(b: &E2eBench) -> Result<(), Failure> {
    let t0 = std::time::Instant::now();
    let log = |m: &str| eprintln!("e2e [{:>5.0} s]: {m}", t0.elapsed().as_secs_f64());
    let fun = b.model == E2eModel::CogvideoxFun5bInp;
    if fun && b.videox_fun.is_none() && !b.no_diffusers {
        return Err(
            fail("--model cogvideox-fun-5b-inp runs VideoX-Fun's pipeline beside v2l").with_hint(
                "give --videox-fun <work tree of BerserkerVV/Video2LoRA>, or --no-diffusers",
            ),
        );
    }
    let spec = spec(b.model)?;
    let key = blake3::hash(spec.to_string().as_bytes()).to_hex();
    let base = cache_root(&b.dir)?.join(format!("{}-{}", b.model.name(), &key[..12]));
    let model = base.join("pipeline");
    std::fs::create_dir_all(&model).map_err(io(&model))?;
    write_json(&base.join("spec.json"), &spec)?;
    generate(&model, b.model, &b.torch_python, &log)?;
    let (reference, image) = inputs(&base.join("inputs"), b)?;
    let threads = b.threads.to_string();
    let mut stages = serde_json::Map::new();

    let export = base.join("export");
    let engine = base.join(format!("engine-{}", b.precision));
    let v2l = |name: &str| -> Result<Command, Failure> { Ok(Command::new(sibling(name)?)) };
    if b.reuse_engine && engine.join("bundle.json").is_file() {
        log(&format!("reusing {}", engine.display()));
    } else {
        build_engine(b, &model, &export, &engine, &mut stages, &log)?;
    }
    let out = base.join("out");
    std::fs::create_dir_all(&out).map_err(io(&out))?;
    let lora = out.join("lora.safetensors");
    let size = [
        "--frames".to_string(),
        b.frames.to_string(),
        "--height".into(),
        b.height.to_string(),
        "--width".into(),
        b.width.to_string(),
    ];
    log("v2l-lora predict (the LoRA file diffusers loads)");
    let r = run_measured(
        v2l("v2l-lora")?
            .args(["predict", "--engine"])
            .arg(&engine)
            .arg("--reference")
            .arg(&reference)
            .args(&size)
            .arg("-o")
            .arg(&lora),
    )?;
    stages.insert("lora_predict".into(), of_run(&r));

    // One initial noise for every run, diffusers' included, so the frames compare.
    let noise = out.join("initial_noise.safetensors");
    let t = v2l_runtime::engine::Engine::open(&engine)?
        .seeded_noise(b.frames, b.height, b.width, 42)?;
    v2l_runtime::write_safetensors(
        &noise,
        &std::collections::BTreeMap::from([(files_io::INITIAL_NOISE.to_string(), t)]),
    )?;
    let run = |with_lora: bool| -> Result<(ProcRun, serde_json::Value), Failure> {
        let tag = if with_lora { "lora" } else { "base" };
        let mut c = v2l("v2l-run")?;
        c.arg("--engine")
            .arg(&engine)
            .args(["--prompt", PROMPT, "--image"])
            .arg(&image)
            .args(&size)
            .args(["--steps", &b.steps.to_string()])
            .args(["--guidance", &b.guidance.to_string()])
            .arg("--noise")
            .arg(&noise)
            // Fun-InP's augmentation noise (the file holds the initial noise alone).
            .args(["--seed", "42"])
            .args(["--threads", &threads, "--quiet", "--json"])
            .arg("--stage-memory")
            .arg("--dump")
            .arg(out.join(format!("dump_{tag}.safetensors")))
            .arg("-o")
            .arg(out.join(format!("{tag}.mp4")));
        if with_lora {
            c.arg("--reference").arg(&reference);
        }
        log(&format!("v2l-run ({tag})"));
        let r = run_measured(&mut c)?;
        let j = crate::scale::last_json(&r.stdout)?;
        Ok((r, j))
    };
    let (with, with_json) = run(true)?;
    run_stages(&with_json, &mut stages);
    stages.insert("whole_process".into(), of_run(&with));
    let (without, _) = run(false)?;
    stages.insert("whole_process_without_lora".into(), of_run(&without));
    let with_frames = frames_of(&out.join("dump_lora.safetensors"))?;
    let base_frames = frames_of(&out.join("dump_base.safetensors"))?;
    let finite = with_frames.iter().all(|v| v.is_finite());
    let effect = rel_l2(&with_frames, &base_frames);

    let side = Baseline {
        b,
        base: &base,
        model: &model,
        lora: &lora,
        image: &image,
        noise: &noise,
    };
    let diffusers = match (b.no_diffusers, &b.videox_fun) {
        (true, _) => serde_json::json!({"skipped": "--no-diffusers"}),
        (false, Some(repo)) if fun => videox_fun_side(&side, repo, &with_frames, &log)?,
        _ => diffusers_side(&side, &with_frames, &log)?,
    };
    let report = serde_json::json!({
        "model": b.model.name(),
        "v2l_dit_steps_s": with_json["dit_steps_ms"].as_array().map(|v| {
            v.iter().map(|ms| ms.as_f64().unwrap_or(f64::NAN) / 1e3).collect::<Vec<_>>()
        }),
        "cpu": crate::common::cpu_facts(),
        "threads": b.threads,
        "config": {"frames": b.frames, "height": b.height, "width": b.width, "steps": b.steps,
                   "guidance": b.guidance, "precision": b.precision, "prompt": PROMPT},
        "cache": base,
        "stages": stages,
        "run_peak_rss_mb": with.peak_rss_mb,
        "lora_effect_rel_l2": effect,
        "lora_output_finite": finite,
        "attention": with_json["attention"],
        "diffusers": diffusers,
    });
    if b.json {
        println!("{report}");
    } else {
        print_table(&report);
    }
    Ok(())
}

/// `v2l-export pipeline` then `v2l-compile`, each measured as its own process.
fn build_engine(
    b: &E2eBench,
    model: &Path,
    export: &Path,
    engine: &Path,
    stages: &mut serde_json::Map<String, serde_json::Value>,
    log: &dyn Fn(&str),
) -> Result<(), Failure> {
    for d in [export, engine] {
        let _ = std::fs::remove_dir_all(d);
    }
    log("v2l-export pipeline");
    let r = run_measured(
        Command::new(sibling("v2l-export")?)
            .arg("pipeline")
            .arg(model)
            .arg("--hypernet")
            .arg(model.join("video2lora/hypernetwork.safetensors"))
            .arg("--lilora")
            .arg(model.join("video2lora/lilora.safetensors"))
            .args(["--weight-dtype", "bf16", "-o"])
            .arg(export),
    )?;
    stages.insert("export".into(), of_run(&r));
    log(&format!("v2l-compile --precision {}", b.precision));
    let r = run_measured(
        Command::new(sibling("v2l-compile")?)
            .arg(export)
            .arg("-o")
            .arg(engine)
            .args(["--backend", "cpu", "--precision", &b.precision]),
    )?;
    stages.insert("compile".into(), of_run(&r));
    Ok(())
}

/// What both baselines (diffusers', VideoX-Fun's) run on: the generated pipeline, the LoRA
/// file v2l predicted, the first frame and v2l's initial noise.
struct Baseline<'a> {
    b: &'a E2eBench,
    base: &'a Path,
    model: &'a Path,
    lora: &'a Path,
    image: &'a Path,
    noise: &'a Path,
}

impl Baseline<'_> {
    /// `python <script> MODEL LORA IMAGE FRAMES_OUT --prompt … --threads …`, with the script
    /// and the stage timer it imports written beside the cached pipeline.
    fn command(&self, name: &str, script: &str, frames: &Path) -> Result<Command, Failure> {
        for (file, text) in [(name, script), ("stages.py", STAGES_SCRIPT)] {
            let p = self.base.join(file);
            std::fs::write(&p, text).map_err(io(&p))?;
        }
        let b = self.b;
        let mut c = Command::new(&b.torch_python);
        c.arg(self.base.join(name))
            .arg(self.model)
            .arg(self.lora)
            .arg(self.image)
            .arg(frames)
            .args(["--prompt", PROMPT])
            .arg("--noise")
            .arg(self.noise)
            .args(["--frames", &b.frames.to_string()])
            .args(["--height", &b.height.to_string()])
            .args(["--width", &b.width.to_string()])
            .args(["--steps", &b.steps.to_string()])
            .args(["--guidance", &b.guidance.to_string()])
            .args(["--threads", &b.threads.to_string()]);
        Ok(c)
    }

    /// Runs `c`: its wall time and peak, and (when it finished) its stages, the `extra` fields
    /// of its JSON line and its frames against v2l's as `rel_l2_v2l_vs_<vs>`. The flag says
    /// whether it finished (else the entry says how it failed, out of memory).
    fn measure(
        c: &mut Command,
        frames: &Path,
        v2l_frames: &[f32],
        extra: &[&str],
        vs: &str,
    ) -> Result<(serde_json::Value, bool), Failure> {
        let (r, failed) = run_process(c)?;
        let mut entry = serde_json::json!({"wall_s": r.wall_s, "peak_rss_mb": r.peak_rss_mb});
        if let Some(how) = failed {
            entry["failed"] =
                format!("{how} (the peak is the kernel's figure for the process)").into();
            return Ok((entry, false));
        }
        let j = crate::scale::last_json(&r.stdout)?;
        for key in std::iter::once("stages").chain(extra.iter().copied()) {
            entry[key] = j[key].clone();
        }
        entry[format!("rel_l2_v2l_vs_{vs}")] = rel_l2(v2l_frames, &frames_of(frames)?).into();
        Ok((entry, true))
    }
}

/// diffusers stock; if that fails (out of memory), staged: the T5 dropped before the
/// transformer loads.
fn diffusers_side(
    side: &Baseline,
    v2l_frames: &[f32],
    log: &dyn Fn(&str),
) -> Result<serde_json::Value, Failure> {
    let mut report = serde_json::Map::new();
    for staged in [false, true] {
        let tag = if staged { "staged" } else { "stock" };
        let frames = side
            .base
            .join("out")
            .join(format!("diffusers_{tag}.safetensors"));
        let mut c = side.command("diffusers_e2e.py", DIFFUSERS_SCRIPT, &frames)?;
        if staged {
            c.arg("--staged");
        }
        log(&format!("diffusers ({tag})"));
        let (entry, done) = Baseline::measure(&mut c, &frames, v2l_frames, &[], "diffusers")?;
        report.insert(tag.into(), entry);
        if done {
            break;
        }
    }
    Ok(report.into())
}

/// VideoX-Fun's `CogVideoXFunInpaintPipeline` in bf16 (the T5 dropped before the transformer
/// loads), with the same initial noise and LoRA; its augmentation noise is torch's, so the
/// frames are compared loosely.
fn videox_fun_side(
    side: &Baseline,
    repo: &Path,
    v2l_frames: &[f32],
    log: &dyn Fn(&str),
) -> Result<serde_json::Value, Failure> {
    let frames = side.base.join("out").join("videox_fun.safetensors");
    let mut c = side.command("videox_fun_e2e.py", VIDEOX_FUN_SCRIPT, &frames)?;
    c.arg("--videox-fun").arg(repo);
    log("VideoX-Fun (CogVideoXFunInpaintPipeline, bf16)");
    let extra = ["dit_steps_s"];
    let (entry, _) = Baseline::measure(&mut c, &frames, v2l_frames, &extra, "videox_fun")?;
    Ok(serde_json::json!({ "videox_fun": entry }))
}

fn print_table(r: &serde_json::Value) {
    println!(
        "{}",
        crate::common::cpu_line(&r["cpu"], r["threads"].as_u64().unwrap_or(0) as usize)
    );
    println!("{:<22} {:>10} {:>14}", "stage", "wall s", "peak RSS MB");
    if let Some(stages) = r["stages"].as_object() {
        for (name, s) in stages {
            println!(
                "{name:<22} {:>10.2} {:>14.0}",
                s["wall_s"].as_f64().unwrap_or(f64::NAN),
                s["peak_rss_mb"].as_f64().unwrap_or(f64::NAN)
            );
        }
    }
    println!(
        "LoRA effect on the frames (rel L2 with vs without): {:.3e}",
        r["lora_effect_rel_l2"].as_f64().unwrap_or(f64::NAN)
    );
    println!("v2l DiT steps (s): {}", r["v2l_dit_steps_s"]);
    println!("diffusers: {}", r["diffusers"]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_5b_dit_has_341_linears_and_video2lora_rows_of_150() {
        let config = cogvideox_5b_config(42).unwrap_or_else(|e| panic!("{}", e.message));
        let cfg: cogvideox_dit::DitConfig = serde_json::from_value(config).unwrap();
        let lin = linears(&cogvideox_dit::checkpoint_layout(&cfg));
        // 42 blocks × 8, the text projection, two time-embedding layers, norm_out, proj_out.
        assert_eq!(lin.len(), 341);
        assert!(lin
            .iter()
            .any(|(m, o, i)| m == "transformer_blocks.41.ff.net.2" && *o == 3072 && *i == 12288));
        let dims = hypernet_dims(lin.len());
        assert_eq!((dims.weight_dim, dims.heads), (LILORA_A + LILORA_B, 2));
    }

    #[test]
    fn rel_l2_is_zero_for_equal_and_one_against_zero() {
        let a = [1.0f32, -2.0, 3.0];
        assert_eq!(rel_l2(&a, &a), 0.0);
        assert!((rel_l2(&[0.0; 3], &a) - 1.0).abs() < 1e-12);
    }
}
