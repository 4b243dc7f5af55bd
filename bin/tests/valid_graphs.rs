//! Every graph v2l writes is valid ONNX: `onnx.checker.check_model(full_check=True)` on the
//! whole tiny pipeline export (DiT, VAE encoder and decoder, T5 text encoder, hypernetwork) and on the engines
//! compiled from it for each backend (with their rewrites and LoRA-strategy variants), for int8
//! (DynamicQuantizeMatMul over int8 weights, or Q/DQ when calibrated), int4 (MatMulNBits) and for fp16/bf16 (typed graphs for TensorRT,
//! emulated ones for the CPU; the checker's type inference sees every Cast and island).
//!
//! The checker is the `onnx` Python package that `scripts/setup-tests.sh` installs into `.v2l/py`;
//! only this test uses Python.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn python() -> PathBuf {
    let p = root().join(".v2l/py/bin/python");
    assert!(
        p.is_file(),
        "{} is missing: run `bash scripts/setup-tests.sh` (it installs the onnx checker)",
        p.display()
    );
    p
}

pub(crate) fn run(exe: &str, args: &[&std::ffi::OsStr]) {
    let o = Command::new(exe).args(args).output().expect("binary runs");
    assert!(
        o.status.success(),
        "{exe} {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

pub(crate) fn onnx_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "onnx"))
        .collect();
    v.sort();
    v
}

/// `v2l-compile export -o engine --backend B --precision P [extra…]`; the engine's graphs.
pub(crate) fn compile(
    export: &Path,
    engine: &Path,
    backend: &str,
    precision: &str,
    extra: &[&str],
) -> Vec<PathBuf> {
    let args: Vec<&std::ffi::OsStr> = [
        export.as_os_str(),
        "-o".as_ref(),
        engine.as_os_str(),
        "--backend".as_ref(),
        backend.as_ref(),
        "--precision".as_ref(),
        precision.as_ref(),
    ]
    .into_iter()
    .chain(extra.iter().map(|a| a.as_ref()))
    .collect();
    run(env!("CARGO_BIN_EXE_v2l-compile"), &args);
    onnx_files(engine)
}

/// Runs `onnx.checker.check_model(full_check=True)` on every model; each must pass.
fn assert_all_valid(models: &[PathBuf]) {
    let o = Command::new(python())
        .arg(root().join("bin/tests/onnx_checker.py"))
        .args(models)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    eprintln!("{out}{}", String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "invalid graphs:\n{out}");
    assert_eq!(
        out.lines().filter(|l| l.starts_with("ok ")).count(),
        models.len()
    );
}

/// `v2l-export pipeline model --hypernet … --lilora … -o export`: its five graphs (DiT, VAE
/// encoder and decoder, text encoder, hypernetwork).
fn export_pipeline(model: &Path, export: &Path) -> Vec<PathBuf> {
    export_pipeline_of(model, export, 5)
}

/// The tiny Wan2.1 I2V pipeline (DiT with image attention, VAE, umT5, CLIP) assembled under
/// `dir` from the fixture's parts and exported with `v2l-export pipeline`; the export dir.
pub(crate) fn export_wan_i2v(dir: &Path) -> PathBuf {
    let model = dir.join("model");
    common::wan_model_dir(
        &model,
        &[
            ("transformer_i2v", "transformer"),
            ("vae", "vae"),
            ("scheduler_unipc", "scheduler"),
            ("text_encoder", "text_encoder"),
            ("image_encoder", "image_encoder"),
        ],
    );
    let export = dir.join("export");
    run(
        env!("CARGO_BIN_EXE_v2l-export"),
        &[
            "pipeline".as_ref(),
            model.as_os_str(),
            "-o".as_ref(),
            export.as_os_str(),
        ],
    );
    export
}

/// [`export_pipeline`] for a model folder that yields `graphs` graphs.
pub(crate) fn export_pipeline_of(model: &Path, export: &Path, graphs: usize) -> Vec<PathBuf> {
    run(
        env!("CARGO_BIN_EXE_v2l-export"),
        &[
            "pipeline".as_ref(),
            model.as_os_str(),
            "--hypernet".as_ref(),
            model.join("hypernetwork.safetensors").as_os_str(),
            "--lilora".as_ref(),
            model.join("lilora.safetensors").as_os_str(),
            "-o".as_ref(),
            export.as_os_str(),
        ],
    );
    let models = onnx_files(export);
    assert_eq!(
        models.len(),
        graphs,
        "dit, vae encoder/decoder, text encoder (if any), hypernet: {models:?}"
    );
    models
}

#[test]
fn every_written_graph_passes_the_onnx_checker() {
    let tiny = root().join("tests/fixtures/cogvideox-tiny");
    let d = tempfile::tempdir().unwrap();
    let export = d.path().join("export");
    let mut models = export_pipeline(&tiny, &export);
    let static_int8: &[&str] = &["--calibration-samples", "2"];
    for (backend, precision, extra) in [
        ("cpu", "fp32", &[][..]),
        ("cuda", "fp32", &[]),
        ("tensorrt", "fp32", &[]),
        ("cpu", "int8", &[]),
        ("cpu", "int8", static_int8),
        ("tensorrt", "int8", static_int8),
        ("cpu", "int4", &[]),
        ("cpu", "bf16", &[]),
        ("cpu", "fp16", &[]),
        ("tensorrt", "bf16", &[]),
        ("tensorrt", "fp16", &[]),
        ("cuda", "bf16", &[]),
        ("cuda", "fp16", &[]),
    ] {
        let engine = d
            .path()
            .join(format!("engine-{backend}-{precision}-{}", extra.len()));
        let files = compile(&export, &engine, backend, precision, extra);
        // fp32: 5 graphs + the bound and unfused DiT; below fp32: 5 graphs + the DiT of the
        // precision and the unfused one (static int8 too: Q/DQ graphs); on the CPU below fp32
        // those two call v2l's attention and have their twins on ONNX Runtime's, and the VAE's
        // encoder and decoder have their twins on v2l's bf16 convolution. GPU engines below
        // fp32 have the VAE's graphs in their precision, cuda engines at fp32 the VAE's with
        // their GroupNorms rewritten. cuda engines also have the LoRA merge graph, and below
        // fp32 the `bound` DiT it feeds.
        let twins = match (backend, precision) {
            ("cpu", "fp32") => 0,
            ("cpu", _) => 4,
            ("cuda", "fp32") => 3,
            ("cuda", _) => 4,
            (_, "fp16" | "bf16") => 2,
            _ => 0,
        };
        assert_eq!(files.len(), 7 + twins, "{backend} {precision}: {files:?}");
        models.extend(files);
    }
    assert_all_valid(&models);
}

/// The embedded default model differs from the tiny fixture where the graphs do: its
/// hypernetwork carries v2l's context encoder (3-D convs, a whole-volume readout) and its DiT has
/// patch size 1 with CogVideoX's stored 3-D position table. Its export and CPU engine.
#[test]
fn embedded_model_graphs_pass_the_onnx_checker() {
    let d = tempfile::tempdir().unwrap();
    let export = d.path().join("export");
    let mut models = export_pipeline(&root().join("models/cogvideox-effects"), &export);
    models.extend(compile(
        &export,
        &d.path().join("engine"),
        "cpu",
        "fp32",
        &[],
    ));
    assert_all_valid(&models);
}

/// Video2LoRA's released backbone (CogVideoX-Fun-InP: the 33-channel DiT, the VAE decoder built
/// for VideoX-Fun's decode loop; no text encoder in the fixture), exported and compiled for the
/// CPU in fp32 and int8 (whose compile-time accuracy sample runs the Fun-InP pipeline).
#[test]
fn fun_inpaint_graphs_pass_the_onnx_checker() {
    let d = tempfile::tempdir().unwrap();
    let export = d.path().join("export");
    let fun = root().join("tests/fixtures/cogvideox-fun-inp-tiny");
    let mut models = export_pipeline_of(&fun, &export, 4);
    for precision in ["fp32", "int8"] {
        let engine = d.path().join(format!("engine-{precision}"));
        models.extend(compile(&export, &engine, "cpu", precision, &[]));
    }
    assert_all_valid(&models);
}

/// The same for Wan2.1 I2V (the DiT with its image attention, the Wan VAE, umT5, the CLIP
/// encoder), exported as a pipeline directory and compiled for the CPU and TensorRT.
#[test]
fn wan_graphs_pass_the_onnx_checker() {
    let d = tempfile::tempdir().unwrap();
    let export = export_wan_i2v(d.path());
    let mut models = onnx_files(&export);
    assert_eq!(
        models.len(),
        5,
        "dit, vae encoder/decoder, umT5, CLIP: {models:?}"
    );
    for (backend, precision) in [("cpu", "fp32"), ("tensorrt", "bf16"), ("cpu", "int8")] {
        let engine = d.path().join(format!("engine-{backend}-{precision}"));
        models.extend(compile(&export, &engine, backend, precision, &[]));
        if precision == "bf16" {
            // diffusers keeps Wan's `time_embedder` f32 (`_keep_in_fp32_modules`): so does the
            // engine, and a LoRA fuses into those two linears in f32.
            let bundle: serde_json::Value =
                serde_json::from_slice(&std::fs::read(engine.join("bundle.json")).unwrap())
                    .unwrap();
            for t in bundle["lora_targets"].as_array().unwrap() {
                let name = t["initializer"].as_str().unwrap();
                let want = match name.contains(".time_embedder.") {
                    true => "f32",
                    false => "bf16",
                };
                assert_eq!(t["dtype"], want, "{name}");
            }
        }
    }
    assert_all_valid(&models);
}
