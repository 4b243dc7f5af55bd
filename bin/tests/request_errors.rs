//! The same bad value gives the same error from every front end: `v2l-run`, the C ABI
//! (`libv2l`) and `v2l-serve` all build requests with `v2l_runtime::request`, and each names
//! the field its own way (`--frames`, `params.frames`, the form field `frames`). For each row
//! of the table the three messages must be equal once the field's name is taken off (and the
//! way to raise a limit, which is an environment variable for the CLI and the C ABI and a flag
//! for the server).

#![allow(clippy::unwrap_used)]

use std::ffi::CString;
use std::path::Path;
use std::process::Command;
use std::ptr::{null, null_mut};

use v2l::*;
use v2l_serve::client::Form;

use crate::common;
use crate::serve::Server;

/// One bad value: the field's C ABI / form name, its CLI flag, the value as text.
struct Case {
    field: &'static str,
    flag: &'static str,
    value: &'static str,
}

const CASES: &[Case] = &[
    case("frames", "--frames", "0"),
    case("frames", "--frames", "48"),
    case("frames", "--frames", "301"),
    case("height", "--height", "0"),
    case("height", "--height", "100"),
    case("width", "--width", "72"),
    case("steps", "--steps", "0"),
    case("steps", "--steps", "5000"),
    case("guidance", "--guidance", "NaN"),
    case("guidance", "--guidance", "inf"),
    case("guidance", "--guidance", "3e38"),
    case("max_sequence_length", "--max-sequence-length", "5000"),
    case("height/width", "--height", "99984"),
];

const fn case(field: &'static str, flag: &'static str, value: &'static str) -> Case {
    Case { field, flag, value }
}

/// A valid request: 17 frames of 64×64, 2 steps.
const GOOD: [(&str, &str); 5] = [
    ("frames", "17"),
    ("height", "64"),
    ("width", "64"),
    ("steps", "2"),
    ("guidance", "6"),
];

/// The settings with `c`'s value in place of the valid one.
fn settings(c: &Case) -> Vec<(&'static str, &'static str)> {
    let target = match c.field {
        "height/width" => "height",
        f => f,
    };
    let mut v: Vec<_> = GOOD.iter().copied().filter(|(k, _)| *k != target).collect();
    v.push((target, c.value));
    v
}

/// The message without the way to raise a limit, which each front end says its own way.
fn core(message: &str) -> String {
    message
        .split(" (raise it with ")
        .next()
        .unwrap()
        .split(" (the server's ")
        .next()
        .unwrap()
        .to_string()
}

fn cli(engine: &Path, dir: &Path, c: &Case) -> String {
    let t = common::tiny();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_v2l-run"));
    cmd.arg("--engine")
        .arg(engine)
        .arg("--image")
        .arg(t.join("first_frame.png"))
        .args(["--prompt", "a red car", "--seed", "1", "-o"])
        .arg(dir.join("out.mp4"));
    for (k, v) in settings(c) {
        cmd.arg(format!("--{}", k.replace('_', "-"))).arg(v);
    }
    let out = cmd.output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", c.value);
    let err = String::from_utf8_lossy(&out.stderr);
    let line = err.lines().find(|l| l.starts_with("error: ")).unwrap();
    let prefix = format!(
        "error: {}: ",
        match c.field {
            "height/width" => "--height/--width",
            _ => c.flag,
        }
    );
    assert!(line.starts_with(&prefix), "{line}");
    assert!(!dir.join("out.mp4").exists());
    core(&line[prefix.len()..])
}

/// The C ABI form of [`GOOD`]: 17 frames of 64×64, 2 steps, no inputs beyond the seed.
fn good_params() -> V2lGenerateParams {
    V2lGenerateParams {
        frames: 17,
        height: 64,
        width: 64,
        steps: 2,
        guidance: 6.0,
        seed: 1,
        first_frame: null(),
        first_frame_len: 0,
        prompt_embeds: null(),
        negative_prompt_embeds: null(),
        embed_len: 0,
        embed_dim: 0,
        noise: null(),
        noise_len: 0,
        prompt: null(),
        negative_prompt: null(),
        max_sequence_length: 0,
        image_embeds: null(),
        image_embed_len: 0,
        image_embed_dim: 0,
        scheduler: std::ptr::null(),
        inpaint_noise: std::ptr::null(),
        inpaint_noise_len: 0,
        cache: std::ptr::null(),
    }
}

fn c_abi(generator: *const V2lGenerator, c: &Case) -> String {
    let mut p = good_params();
    for (k, v) in settings(c) {
        match k {
            "frames" => p.frames = v.parse().unwrap(),
            "height" => p.height = v.parse().unwrap(),
            "width" => p.width = v.parse().unwrap(),
            "steps" => p.steps = v.parse().unwrap(),
            "guidance" => p.guidance = v.parse().unwrap(),
            "max_sequence_length" => p.max_sequence_length = v.parse().unwrap(),
            _ => unreachable!("{k}"),
        }
    }
    let mut bytes = 0usize;
    let status = unsafe { v2l_generator_output_size(generator, &p, &mut bytes, null_mut()) };
    assert_eq!(status, V2lStatus::InvalidArgument, "{}", c.value);
    let msg = unsafe { std::ffi::CStr::from_ptr(v2l_last_error()) }
        .to_string_lossy()
        .into_owned();
    let field = match c.field {
        "height/width" => "params.height/params.width".to_string(),
        f => format!("params.{f}"),
    };
    let prefix = format!("v2l_generator_output_size: {field}: ");
    assert!(msg.starts_with(&prefix), "{msg}");
    core(&msg[prefix.len()..])
}

fn server(s: &Server, c: &Case) -> String {
    let mut form = Form::new()
        .file(
            "image",
            std::fs::read(common::tiny().join("first_frame.png")).unwrap(),
        )
        .text("prompt", "a red car");
    for (k, v) in settings(c) {
        form = form.text(k, v);
    }
    let reply = s.client().post("/v1/videos", &form).unwrap();
    assert_eq!(reply.status, 400, "{}", c.value);
    let e = reply.json()["error"].clone();
    assert_eq!(e["field"], c.field, "{e}");
    core(e["message"].as_str().unwrap())
}

#[test]
fn the_same_bad_value_gives_the_same_error_everywhere() {
    let d = tempfile::tempdir().unwrap();
    let engine = common::engine(d.path());
    // The server at the limits the CLI and the C ABI default to, so limit messages agree.
    let s = Server::start(
        &engine,
        &d.path().join("state"),
        &[
            "--max-frames",
            "257",
            "--max-pixels",
            "2073600",
            "--max-steps",
            "1000",
        ],
    );
    let path = CString::new(engine.display().to_string()).unwrap();
    let mut e = null_mut();
    assert_eq!(
        unsafe { v2l_engine_open(path.as_ptr(), null(), &mut e) },
        V2lStatus::Ok
    );
    let mut g = null_mut();
    assert_eq!(unsafe { v2l_generator_new(e, &mut g) }, V2lStatus::Ok);
    let mut table = String::new();
    for c in CASES {
        let (a, b, sv) = (cli(&engine, d.path(), c), c_abi(g, c), server(&s, c));
        assert_eq!(a, b, "{} = {}: CLI vs C ABI", c.field, c.value);
        assert_eq!(a, sv, "{} = {}: CLI vs server", c.field, c.value);
        table.push_str(&format!("{} = {}: {a}\n", c.field, c.value));
    }
    eprintln!("{table}");
    // Prompt text over the byte bound: the server refuses the field before queueing a job.
    let form = Form::new()
        .file(
            "image",
            std::fs::read(common::tiny().join("first_frame.png")).unwrap(),
        )
        .text("prompt", "a red car ".repeat(2_000));
    let reply = s.client().post("/v1/videos", &form).unwrap();
    assert_eq!(reply.status, 400);
    let err = reply.json()["error"].clone();
    assert_eq!(err["field"], "prompt", "{err}");
    assert!(
        err["message"]
            .as_str()
            .unwrap()
            .starts_with("20000 bytes of text; at most 16384"),
        "{err}"
    );
    // A LoRA whose layer exists but whose shapes do not fit is refused when uploaded, as the
    // CLI and the C ABI refuse it when loaded, instead of stored for every later job to fail.
    use v2l_runtime::lora::format::{self, Factor, Lora, LoraFormat, LoraLayer};
    let bad = Lora {
        format: LoraFormat::Diffusers,
        layers: vec![LoraLayer {
            module: "transformer_blocks.0.attn1.to_q".into(),
            a: Factor::from_f32([4, 7], &[0.1; 28]),
            b: Factor::from_f32([32, 4], &[0.1; 128]),
            alpha: 4.0,
        }],
    };
    let file = d.path().join("misfit.safetensors");
    format::write(&file, &bad, LoraFormat::Diffusers).unwrap();
    let reply = s
        .client()
        .post(
            "/v1/loras",
            &Form::new().file("lora", std::fs::read(&file).unwrap()),
        )
        .unwrap();
    assert_eq!(
        reply.status,
        400,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    assert_eq!(reply.json()["error"]["field"], "lora");
    // A reference LoRA's weight becomes its alpha squared: above 1,000 that passes the ±1e6
    // every LoRA value is held to, so it is refused with the request (it used to answer 500
    // `prediction_failed` from /v1/loras, and fail the job after a 202 from /v1/videos).
    let clip = std::fs::read(common::tiny().join("reference.mp4")).unwrap();
    for (path, form) in [
        (
            "/v1/loras",
            Form::new()
                .file("reference", clip.clone())
                .text("lora_scale", "1001"),
        ),
        (
            "/v1/videos",
            Form::new()
                .file(
                    "image",
                    std::fs::read(common::tiny().join("first_frame.png")).unwrap(),
                )
                .text("prompt", "a red car")
                .file("reference", clip.clone())
                .text("lora_scale", "5000"),
        ),
    ] {
        let reply = s.client().post(path, &form).unwrap();
        assert_eq!(
            reply.status,
            400,
            "{path}: {}",
            String::from_utf8_lossy(&reply.body)
        );
        let err = reply.json()["error"].clone();
        assert_eq!(err["field"], "lora_scale", "{path}: {err}");
        assert!(err["message"].as_str().unwrap().contains("alpha"), "{err}");
    }
    // What a client sent is echoed in errors, but not 100 KB of it.
    let form = Form::new()
        .file(
            "image",
            std::fs::read(common::tiny().join("first_frame.png")).unwrap(),
        )
        .text("prompt", "a red car")
        .text("lora_id", "x".repeat(100_000));
    let reply = s.client().post("/v1/videos", &form).unwrap();
    assert_eq!(reply.status, 404);
    assert!(reply.body.len() < 2_000, "{} bytes", reply.body.len());
    assert_eq!(unsafe { v2l_generator_free(g) }, V2lStatus::Ok);
    assert_eq!(unsafe { v2l_engine_free(e) }, V2lStatus::Ok);
}

/// `v2l-serve --threads` has the limit `v2l-run --threads` and the C ABI's `options.threads`
/// have, with the same message, before anything is loaded.
#[test]
fn the_server_refuses_thread_counts_the_cli_refuses() {
    let d = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_v2l-serve"))
        .args([
            "--engine",
            "/nonexistent-engine",
            "--threads",
            "1000",
            "--state-dir",
        ])
        .arg(d.path().join("state"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains("--threads: 1000 is over the limit of 256 (raise it with V2L_MAX_THREADS)"),
        "{err}"
    );
    assert!(!d.path().join("state").exists());
}

/// A DiT with a learned positional table (the demo model: 17 frames at 64x64) generates at
/// that size only: another frame count or size is refused with the request, naming the field,
/// by the CLI and by the server (400 before a job exists), where it used to fail inside ONNX
/// Runtime ("broadcast … 200 by 328", the engine's path in the job's message).
#[test]
fn a_learned_positional_table_fixes_the_size() {
    let d = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let demo = root.join("models/cogvideox-effects");
    let engine = common::engine_of(&demo, d.path(), &[]);
    let image = demo.join("examples");
    let first = std::fs::read_dir(&image)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "png"))
        .expect("an example first frame");
    let s = Server::start(&engine, &d.path().join("state"), &[]);
    for (field, frames, size) in [("frames", 9, 64), ("height", 17, 128)] {
        let form = Form::new()
            .file("image", std::fs::read(&first).unwrap())
            .text("prompt", "a red car")
            .text("frames", frames)
            .text("height", size)
            .text("width", size)
            .text("steps", 1);
        let reply = s.client().post("/v1/videos", &form).unwrap();
        assert_eq!(
            reply.status,
            400,
            "{}",
            String::from_utf8_lossy(&reply.body)
        );
        let err = reply.json()["error"].clone();
        assert_eq!(err["field"], field, "{err}");
        assert!(
            err["message"]
                .as_str()
                .unwrap()
                .contains("learned positional table for 17 frames at 64x64"),
            "{err}"
        );
        let o = Command::new(env!("CARGO_BIN_EXE_v2l-run"))
            .arg("--engine")
            .arg(&engine)
            .arg("--image")
            .arg(&first)
            .args(["--prompt", "a red car", "--steps", "1", "--seed", "1"])
            .args(["--frames", &frames.to_string()])
            .args(["--height", &size.to_string(), "--width", &size.to_string()])
            .arg("-o")
            .arg(d.path().join(format!("{field}.mp4")))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{err}");
        assert!(err.contains("learned positional table"), "{err}");
        assert!(!d.path().join(format!("{field}.mp4")).exists());
    }
}

/// A step count above the scheduler's training steps (its `num_train_timesteps`, here an
/// engine compiled with 20) is refused by the request check itself, before anything loads or
/// runs, with the same message from the CLI, the C ABI and the server (the CLI and the C ABI
/// used to fail later, inside the scheduler).
#[test]
fn steps_beyond_the_schedulers_training_steps_are_refused_everywhere() {
    let d = tempfile::tempdir().unwrap();
    let export = common::export_of(&common::tiny(), &d.path().join("export"));
    let config = export.join("scheduler_config.json");
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(text.contains("\"num_train_timesteps\": 1000"), "{text}");
    std::fs::write(
        &config,
        text.replace(
            "\"num_train_timesteps\": 1000",
            "\"num_train_timesteps\": 20",
        ),
    )
    .unwrap();
    let engine = d.path().join("engine");
    let o = Command::new(env!("CARGO_BIN_EXE_v2l-compile"))
        .arg(&export)
        .arg("-o")
        .arg(&engine)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s = Server::start(&engine, &d.path().join("state"), &[]);
    let path = CString::new(engine.display().to_string()).unwrap();
    let mut e = null_mut();
    assert_eq!(
        unsafe { v2l_engine_open(path.as_ptr(), null(), &mut e) },
        V2lStatus::Ok
    );
    let mut g = null_mut();
    assert_eq!(unsafe { v2l_generator_new(e, &mut g) }, V2lStatus::Ok);
    let c = case("steps", "--steps", "21");
    let t = std::time::Instant::now();
    let a = cli(&engine, d.path(), &c);
    assert!(
        t.elapsed().as_secs_f64() < 2.0,
        "refused before loading: {:?}",
        t.elapsed()
    );
    let (b, sv) = (c_abi(g, &c), server(&s, &c));
    assert_eq!(
        a,
        "21: the scheduler takes at most 20 (its num_train_timesteps)"
    );
    assert_eq!(a, b, "CLI vs C ABI");
    assert_eq!(a, sv, "CLI vs server");
    // The scheduler's own count passes the check.
    let mut p = V2lGenerateParams {
        steps: 20,
        ..good_params()
    };
    let mut bytes = 0usize;
    let status = unsafe { v2l_generator_output_size(g, &p, &mut bytes, null_mut()) };
    assert_eq!(status, V2lStatus::Ok);
    assert!(bytes > 0);
    p.steps = 21;
    let status = unsafe { v2l_generator_output_size(g, &p, &mut bytes, null_mut()) };
    assert_eq!(status, V2lStatus::InvalidArgument);
    assert_eq!(unsafe { v2l_generator_free(g) }, V2lStatus::Ok);
    assert_eq!(unsafe { v2l_engine_free(e) }, V2lStatus::Ok);
}
