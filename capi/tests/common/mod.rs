//! Test helpers: the tiny CogVideoX engine built with the library crates (what
//! `v2l-export pipeline ... --hypernet --lilora` then `v2l-compile` do), its inputs, and
//! safe-ish wrappers around the C ABI.

#![allow(dead_code)]

use std::ffi::{c_void, CStr, CString};
use std::path::{Path, PathBuf};
use std::ptr::null_mut;

use v2l::*;
use v2l_export::{Checkpoint, Manifest};
use v2l_graphs::{DType, ExternalData};
use v2l_runtime::backend::{Backend, Precision};
use v2l_runtime::video::Frames;
use v2l_runtime::{read_safetensors, Tensor};

pub fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/cogvideox-tiny")
}

/// Exports the tiny pipeline with the hypernetwork into `dir/export` and compiles it into the
/// engine bundle `dir/engine`, which it returns.
pub fn build_engine(dir: &Path) -> PathBuf {
    build_engine_of(&tiny(), dir)
}

/// [`build_engine`] for the model folder `t` (with its hypernetwork and LiLoRA files).
pub fn build_engine_of(t: &Path, dir: &Path) -> PathBuf {
    let t = t.to_path_buf();
    let ex = dir.join("export");
    // As `v2l-export pipeline` does it (the same library call, the runtime's part checks).
    let out = v2l_export::pipeline::Output {
        output: &ex,
        external_data: ExternalData::Auto,
        shown_as: None,
        say: &|_| {},
        warn: &|_| {},
        checks: &v2l_tools::ExportChecks,
    };
    v2l_export::pipeline::pipeline(
        &t,
        Some(&t.join("hypernetwork.safetensors")),
        Some(&t.join("lilora.safetensors")),
        4,
        v2l_graphs::DType::F32,
        &out,
    )
    .unwrap();

    let eng = dir.join("engine");
    v2l_compile::compile(&ex, &eng, Backend::Cpu, Precision::Fp32).unwrap();
    eng
}

/// The fixture's generation inputs (e2e_io.safetensors).
pub struct Inputs {
    pub first_frame: Frames,
    pub reference: Frames,
    pub prompt: Tensor,
    pub negative: Tensor,
}

fn frames_of(t: &Tensor) -> Frames {
    Frames::from_u8_tensor(t).expect("a fixture's uint8 frames")
}

pub fn inputs() -> Inputs {
    let io = read_safetensors(&tiny().join("e2e_io.safetensors")).unwrap();
    Inputs {
        first_frame: frames_of(&io["first_frame_u8"]),
        reference: frames_of(&io["reference_u8"]),
        prompt: io["prompt_embeds"].clone(),
        negative: io["negative_prompt_embeds"].clone(),
    }
}

pub fn c(s: &str) -> CString {
    CString::new(s).unwrap()
}

pub fn cpath(p: &Path) -> CString {
    CString::new(p.to_str().unwrap()).unwrap()
}

pub fn last_error() -> String {
    unsafe { CStr::from_ptr(v2l_last_error()) }
        .to_string_lossy()
        .into_owned()
}

/// Panics with the thread's error message unless `s` is OK.
#[track_caller]
pub fn ok(s: V2lStatus) {
    assert_eq!(s, V2lStatus::Ok, "{}", last_error());
}

/// Asserts `s` is `want` and the error message contains `needle`.
#[track_caller]
pub fn fails(s: V2lStatus, want: V2lStatus, needle: &str) {
    let msg = last_error();
    assert_eq!(s, want, "message: {msg}");
    assert!(msg.contains(needle), "expected `{needle}` in `{msg}`");
}

pub fn open(engine: &Path) -> *mut V2lEngine {
    let mut e = std::ptr::null_mut();
    ok(unsafe { v2l_engine_open(cpath(engine).as_ptr(), std::ptr::null(), &mut e) });
    assert!(!e.is_null());
    e
}

pub fn generator(e: *const V2lEngine) -> *mut V2lGenerator {
    let mut g = std::ptr::null_mut();
    ok(unsafe { v2l_generator_new(e, &mut g) });
    g
}

/// Parameters borrowing `inp`'s buffers.
pub fn params(inp: &Inputs, frames: u32, steps: u32, seed: u64) -> V2lGenerateParams {
    V2lGenerateParams {
        frames,
        height: inp.first_frame.height as u32,
        width: inp.first_frame.width as u32,
        steps,
        guidance: 6.0,
        seed,
        first_frame: inp.first_frame.rgb.as_ptr(),
        first_frame_len: inp.first_frame.rgb.len(),
        prompt_embeds: inp.prompt.as_f32("p").unwrap().as_ptr(),
        negative_prompt_embeds: inp.negative.as_f32("n").unwrap().as_ptr(),
        embed_len: inp.prompt.shape[1] as u32,
        embed_dim: inp.prompt.shape[2] as u32,
        noise: std::ptr::null(),
        noise_len: 0,
        prompt: std::ptr::null(),
        negative_prompt: std::ptr::null(),
        max_sequence_length: 0,
        image_embeds: std::ptr::null(),
        image_embed_len: 0,
        image_embed_dim: 0,
        scheduler: std::ptr::null(),
        inpaint_noise: std::ptr::null(),
        inpaint_noise_len: 0,
        cache: std::ptr::null(),
    }
}

pub fn wan() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/wan-tiny")
}

/// A Wan2.1 export (the DiT in `transformer`, the Wan VAE, UniPC) compiled into the engine
/// bundle `dir/engine`, which it returns.
pub fn build_wan_engine(dir: &Path, transformer: &str) -> PathBuf {
    let ex = dir.join("export");
    std::fs::create_dir_all(&ex).unwrap();
    let ck = Checkpoint::open_dir(&wan().join(transformer)).unwrap();
    let dit = v2l_export::dit::export(&ck, DType::F32).unwrap();
    v2l_graphs::save(&dit.graph, &ex.join("dit.onnx"), ExternalData::Auto).unwrap();
    let ck = Checkpoint::open_dir(&wan().join("vae")).unwrap();
    let vae = v2l_export::vae::export(&ck).unwrap();
    v2l_graphs::save(&vae.encoder, &ex.join("e.onnx"), ExternalData::Auto).unwrap();
    v2l_graphs::save(&vae.decoder, &ex.join("d.onnx"), ExternalData::Auto).unwrap();
    std::fs::copy(
        wan().join("scheduler_unipc/scheduler_config.json"),
        ex.join("scheduler_config.json"),
    )
    .unwrap();
    Manifest {
        format_version: v2l_export::manifest::FORMAT_VERSION,
        dit: Some(dit.manifest_entry("dit.onnx")),
        vae: Some(vae.manifest_entry("e.onnx", "d.onnx")),
        scheduler: Some("scheduler_config.json".into()),
        ..Default::default()
    }
    .write(&ex)
    .unwrap();
    let eng = dir.join("engine");
    v2l_compile::compile(&ex, &eng, Backend::Cpu, Precision::Fp32).unwrap();
    eng
}

/// Generates through the C ABI (with an optional progress callback); the status and frames.
pub fn generate_with(
    g: *mut V2lGenerator,
    p: &V2lGenerateParams,
    progress: V2lProgressFn,
    user: *mut c_void,
) -> (V2lStatus, Vec<u8>) {
    let mut n = 0usize;
    ok(unsafe { v2l_generator_output_size(g, p, &mut n, null_mut()) });
    let mut out = vec![0u8; n];
    let s = unsafe { v2l_generator_generate(g, p, progress, user, out.as_mut_ptr(), out.len()) };
    (s, out)
}

pub fn generate(g: *mut V2lGenerator, p: &V2lGenerateParams) -> Vec<u8> {
    let (s, out) = generate_with(g, p, None, std::ptr::null_mut());
    ok(s);
    out
}

/// Predicts the reference clip's LoRA (first `frames` frames) through the C ABI.
pub fn predict(
    g: *mut V2lGenerator,
    reference: &Frames,
    frames: usize,
    weight: f32,
) -> *mut V2lLora {
    let n = frames * reference.height * reference.width * 3;
    let mut l = std::ptr::null_mut();
    ok(unsafe {
        v2l_generator_predict_lora(
            g,
            reference.rgb.as_ptr(),
            n,
            frames as u32,
            reference.height as u32,
            reference.width as u32,
            weight,
            &mut l,
        )
    });
    l
}

/// The same generation through the Rust API: `lora` is `(reference frames, weight)` for a
/// predicted LoRA, or a LoRA file with its multiplier.
pub enum RustLora<'a> {
    None,
    Reference(&'a Frames, f32),
    File(&'a Path, f32),
}

pub fn rust_generate(
    engine: &Path,
    inp: &Inputs,
    frames: usize,
    steps: usize,
    seed: u64,
    lora: RustLora,
) -> Vec<u8> {
    use v2l_runtime::engine::Engine;
    use v2l_runtime::lora::AppliedLora;
    use v2l_runtime::pipeline::{gaussian_noise, Pipeline, RequestLora, RequestParts};
    let dir = Engine::open(engine).unwrap();
    let dit = dir.manifest.dit.clone().unwrap();
    let mut p = Pipeline::load(dir, &Default::default()).unwrap();
    let (h, w) = (inp.first_frame.height, inp.first_frame.width);
    let mut request_lora = RequestLora::Resident;
    match lora {
        RustLora::None => {}
        RustLora::Reference(clip, weight) => {
            request_lora = RequestLora::Reference(clip.clone(), weight)
        }
        RustLora::File(path, multiplier) => {
            let modules: Vec<String> = dit.lora_targets.iter().map(|t| t.name.clone()).collect();
            let lora = v2l_runtime::lora::format::read(path, Some(&modules)).unwrap();
            p.set_lora(Some(&AppliedLora {
                lora: lora.into(),
                source: path.into(),
                multiplier,
            }))
            .unwrap();
        }
    }
    let req = RequestParts {
        image: Some(inp.first_frame.clone()),
        image_embeds: None,
        prompt_embeds: inp.prompt.clone(),
        negative_prompt_embeds: inp.negative.clone(),
        frames,
        steps,
        guidance: 6.0,
        noise: gaussian_noise(
            vec![1, (frames - 1) / 4 + 1, dit.in_channels / 2, h / 8, w / 8],
            seed,
        ),
        lora: request_lora,
        sampler: None,
        inpaint_noise: None,
        seed: None,
        cache: None,
    }
    .check(p.engine())
    .unwrap();
    let gen = p.generate(&req, &mut |_, _| true).unwrap();
    v2l_runtime::video::to_rgb8(&gen.frames).unwrap().rgb
}

/// Truncates a clip to its first `n` frames.
pub fn first_frames(f: &Frames, n: usize) -> Frames {
    let mut f = f.clone();
    f.truncate(n);
    f
}

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The directory holding the libv2l.so cargo built for this test run.
pub fn lib_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    for d in [deps, deps.parent().unwrap()] {
        if d.join("libv2l.so").is_file() {
            return d.to_path_buf();
        }
    }
    panic!("no libv2l.so beside {} or in its parent", exe.display());
}
