//! What several integration tests share: the tiny fixture model, exported and compiled.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use v2l_runtime::tensor::Tensor;
use v2l_runtime::video::Frames;

pub fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/cogvideox-tiny")
}

/// Exports the tiny pipeline (with the hypernetwork) and compiles it; returns the engine dir.
pub fn engine(dir: &Path) -> PathBuf {
    engine_with(dir, &[])
}

/// [`engine`] with more `v2l-compile` flags (e.g. `--precision int8`).
pub fn engine_with(dir: &Path, compile: &[&str]) -> PathBuf {
    engine_of(&tiny(), dir, compile)
}

/// The embedded default model: trained on the demo's effects (`training/`).
pub fn effects_model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/cogvideox-effects")
}

/// `v2l-export pipeline` of the CogVideoX pipeline directory `t` with its Video2LoRA
/// hypernetwork and LiLoRA, into `ex`; returns `ex`.
pub fn export_of(t: &Path, ex: &Path) -> PathBuf {
    let o = Command::new(env!("CARGO_BIN_EXE_v2l-export"))
        .args(["pipeline", t.to_str().unwrap(), "--hypernet"])
        .arg(t.join("hypernetwork.safetensors"))
        .arg("--lilora")
        .arg(t.join("lilora.safetensors"))
        .arg("-o")
        .arg(ex)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    ex.to_path_buf()
}

/// Exports the CogVideoX pipeline directory `t` (with its Video2LoRA hypernetwork) and compiles
/// it with `compile`; returns the engine dir.
pub fn engine_of(t: &Path, dir: &Path, compile: &[&str]) -> PathBuf {
    let ex = export_of(t, &dir.join("export"));
    let eng = dir.join("engine");
    let o = Command::new(env!("CARGO_BIN_EXE_v2l-compile"))
        .arg(&ex)
        .arg("-o")
        .arg(&eng)
        .args(compile)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    eng
}

/// A Wan2.1 pipeline directory at `dst` made of the tiny Wan fixture's parts, each
/// `(fixture folder, pipeline folder)` (e.g. `("transformer_i2v", "transformer")`), with the
/// fixture's `model_index.json`.
pub fn wan_model_dir(dst: &Path, parts: &[(&str, &str)]) -> PathBuf {
    let wan = tiny().join("../wan-tiny");
    for (from, to) in parts {
        std::fs::create_dir_all(dst.join(to)).unwrap();
        for f in std::fs::read_dir(wan.join(from)).unwrap() {
            let f = f.unwrap().path();
            std::fs::copy(&f, dst.join(to).join(f.file_name().unwrap())).unwrap();
        }
    }
    std::fs::copy(wan.join("model_index.json"), dst.join("model_index.json")).unwrap();
    dst.to_path_buf()
}

/// The tiny Wan pipeline made of `parts` (as [`wan_model_dir`] takes them) under `dir`,
/// exported and compiled at fp32; returns the engine dir.
pub fn wan_engine(dir: &Path, parts: &[(&str, &str)]) -> PathBuf {
    wan_engine_with(dir, parts, &[])
}

/// [`wan_engine`] with more `v2l-compile` flags (e.g. `--precision int8`).
pub fn wan_engine_with(dir: &Path, parts: &[(&str, &str)], compile: &[&str]) -> PathBuf {
    let model = wan_model_dir(&dir.join("model"), parts);
    let (export, eng) = (dir.join("export"), dir.join("engine"));
    for mut cmd in [
        Command::new(env!("CARGO_BIN_EXE_v2l-export")),
        Command::new(env!("CARGO_BIN_EXE_v2l-compile")),
    ] {
        match cmd.get_program().to_string_lossy().ends_with("v2l-export") {
            true => cmd.arg("pipeline").arg(&model).arg("-o").arg(&export),
            false => cmd.arg(&export).arg("-o").arg(&eng).args(compile),
        };
        let o = cmd.output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    eng
}

/// Mean absolute error between two float tensors of one size (frames against upstream's).
pub fn mae(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (a.as_f32("a").unwrap(), b.as_f32("b").unwrap());
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).abs())
        .sum::<f64>()
        / a.len() as f64
}

/// A fixture's uint8 frames (`[F, H, W, 3]`, or one image `[H, W, 3]`) as the runtime takes them.
pub fn frames_of(t: &Tensor) -> Frames {
    Frames::from_u8_tensor(t).expect("a fixture's uint8 frames")
}

/// The workspace root (for `.v2l/`, set-up's installs).
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The tiny CogVideoX fixture's request (`e2e_io`: first frame, prompts, noise; 17 frames at
/// guidance 6), two steps, with the pipeline's own LoRA. The demo model's fixture
/// (`cogvideox-effects/e2e_io`) has the same tensors: its tests change steps and guidance.
pub fn cogvideox_request(
    io: &std::collections::BTreeMap<String, Tensor>,
) -> v2l_runtime::pipeline::RequestParts {
    v2l_runtime::pipeline::RequestParts {
        image: Some(frames_of(&io["first_frame_u8"])),
        image_embeds: None,
        prompt_embeds: io["prompt_embeds"].clone(),
        negative_prompt_embeds: io["negative_prompt_embeds"].clone(),
        frames: 17,
        steps: 2,
        guidance: 6.0,
        noise: io["initial_noise"].clone(),
        lora: v2l_runtime::pipeline::RequestLora::Resident,
        sampler: None,
        inpaint_noise: None,
        seed: None,
        cache: None,
    }
}

/// The tiny Wan fixture's text-to-video request (`wan-tiny/e2e_io`: 9 frames at guidance 5).
pub fn wan_t2v_request(
    io: &std::collections::BTreeMap<String, Tensor>,
    steps: usize,
) -> v2l_runtime::pipeline::RequestParts {
    v2l_runtime::pipeline::RequestParts {
        image: None,
        image_embeds: None,
        prompt_embeds: io["t2v_prompt_embeds"].clone(),
        negative_prompt_embeds: io["t2v_negative_prompt_embeds"].clone(),
        frames: 9,
        steps,
        guidance: 5.0,
        noise: io["t2v_noise"].clone(),
        lora: v2l_runtime::pipeline::RequestLora::Resident,
        sampler: None,
        inpaint_noise: None,
        seed: None,
        cache: None,
    }
}

/// The parity tests' bounds, named for what they bound and why they are what they are.
pub mod tolerance {
    /// A graph or stage in float32 against upstream's output (relative L2): the project's bound.
    pub const F32_REL_L2: f64 = 1e-4;
    /// Latents after several denoising steps against upstream's (relative L2): each step's
    /// 1e-6-level graph differences are carried and amplified by the following steps.
    pub const STEPS_REL_L2: f64 = 1e-3;
    /// Decoded frames against upstream's (mean absolute error on [0, 1] values): under one
    /// 8-bit level (1/255 = 3.9e-3), so the written video is the same to within rounding.
    pub const FRAMES_MAE: f64 = 2e-3;
    /// A reference clip decoded by ffmpeg against upstream's OpenCV decode and PIL resize
    /// (relative L2 of what it encodes to): the two YUV → RGB conversions differ slightly.
    pub const DECODE_REL_L2: f64 = 5e-3;
    /// Below this relative L2 a LoRA, or a switch between two, had no effect.
    pub const EFFECT_REL_L2: f64 = 1e-3;
    /// One float32 computation done two ways (a LoRA fused or as a branch, a batch or each
    /// request alone, a format converted and back): only the order of summation differs.
    pub const SAME_F32_REL_L2: f64 = 1e-5;
    /// The same float32 arithmetic, up to rounding (an exact rewrite).
    pub const ROUNDING_F32_REL_L2: f64 = 1e-6;
    /// Low-precision DiT engines against PyTorch float32 (relative L2 of the output), with and
    /// without a LoRA: what each format's weights and accumulation allow (docs/precision.md).
    pub const FP16_REL_L2: f64 = 5e-3;
    pub const BF16_REL_L2: f64 = 2e-2;
    pub const INT8_REL_L2: f64 = 1e-2;
    pub const INT4_REL_L2: f64 = 5e-2;
    /// Frames of an int8 engine against the fp32 engine's (mean absolute error on [0, 1]).
    pub const INT8_FRAMES_MAE: f64 = 2e-2;
}

/// `v2l-run --engine ENGINE stage STAGE --json --inputs INPUTS -o OUT`, with the environment
/// variable `var` set to `fp32` when `force_fp32` (removed otherwise): its JSON line and its
/// output `name`.
pub fn run_stage(
    engine: &Path,
    stage: &str,
    (inputs, out): (&Path, &Path),
    name: &str,
    (var, force_fp32): (&str, bool),
) -> (serde_json::Value, Tensor) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_v2l-run"));
    c.arg("--engine")
        .arg(engine)
        .args(["stage", stage, "--json", "--inputs"])
        .arg(inputs)
        .arg("-o")
        .arg(out);
    if force_fp32 {
        c.env(var, "fp32");
    } else {
        c.env_remove(var);
    }
    let o = c.output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    let json = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    (
        json,
        v2l_runtime::read_safetensors(out).unwrap()[name].clone(),
    )
}

/// Whether this CPU has AVX512-BF16, read here rather than from the runtime under test.
pub fn cpu_has_avx512_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    return std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bf16");
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// A request's parts checked against the pipeline's engine, as every front end checks them
/// (`RequestParts::check`); the tests change parts between runs and check again.
pub trait CheckOn {
    fn on(&self, p: &v2l_runtime::pipeline::Pipeline) -> v2l_runtime::pipeline::Request;
}

impl CheckOn for v2l_runtime::pipeline::RequestParts {
    fn on(&self, p: &v2l_runtime::pipeline::Pipeline) -> v2l_runtime::pipeline::Request {
        self.clone()
            .check(p.engine())
            .unwrap_or_else(|e| panic!("the request is refused: {e}"))
    }
}

/// Ends the whole test process, naming `what`, unless dropped within `limit`: a deadlock fails
/// the run instead of hanging it (the harness has no time limit of its own).
pub struct Watchdog(std::sync::mpsc::Sender<()>);

pub fn watchdog(what: &'static str, limit: std::time::Duration) -> Watchdog {
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
            eprintln!("{what}: still running after {limit:?}; a deadlock? the process ends");
            std::process::abort();
        }
    });
    Watchdog(tx)
}
