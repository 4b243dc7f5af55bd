//! The real binaries, run in temporary directories: outputs, manifests, and bad input.

use crate::common::tolerance::{
    F32_REL_L2, FRAMES_MAE, INT8_FRAMES_MAE, ROUNDING_F32_REL_L2, SAME_F32_REL_L2,
};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::common;

fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/cogvideox-tiny")
}

fn run(bin: &str, args: &[&str]) -> Output {
    let exe = match bin {
        "v2l-export" => env!("CARGO_BIN_EXE_v2l-export"),
        "v2l-run" => env!("CARGO_BIN_EXE_v2l-run"),
        "v2l-lora" => env!("CARGO_BIN_EXE_v2l-lora"),
        "v2l-compile" => env!("CARGO_BIN_EXE_v2l-compile"),
        "v2l-serve" => env!("CARGO_BIN_EXE_v2l-serve"),
        _ => unreachable!(),
    };
    Command::new(exe).args(args).output().expect("binary runs")
}

/// `v2l-run --engine <engine> stage dit --inputs <inputs> -o <out> [extra...]`.
/// `run`, which must succeed: its stderr is the failure message.
fn run_ok(bin: &str, args: &[&str]) -> Output {
    let o = run(bin, args);
    assert!(
        o.status.success(),
        "{bin} {}: {}",
        args.join(" "),
        stderr(&o)
    );
    o
}

fn stage_dit(engine: &str, inputs: &str, out: &str, extra: &[&str]) -> Output {
    let mut args = vec![
        "--engine", engine, "stage", "dit", "--inputs", inputs, "-o", out,
    ];
    args.extend_from_slice(extra);
    run("v2l-run", &args)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A bad input: exit code 1, one `error:` line naming `needle`, no panic or backtrace.
fn assert_clean_failure(o: &Output, needle: &str) {
    assert_clean_failure_with(o, 1, needle)
}

/// A failure with exit code `code`, one `error:` line naming `needle`, no panic or backtrace.
fn assert_clean_failure_with(o: &Output, code: i32, needle: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(code), "stderr: {err}");
    assert_eq!(
        err.lines().filter(|l| l.starts_with("error:")).count(),
        1,
        "{err}"
    );
    assert!(err.contains(needle), "expected `{needle}` in: {err}");
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "{err}"
    );
}

/// `v2l-export dit` of the tiny transformer into `out`.
fn export_tiny_dit(out: &Path) {
    run_ok(
        "v2l-export",
        &[
            "dit",
            tiny().join("transformer").to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ],
    );
}

/// Copies the tiny transformer checkpoint so a test can break it.
fn copy_transformer(dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for f in ["config.json", "diffusion_pytorch_model.safetensors"] {
        std::fs::copy(tiny().join("transformer").join(f), dst.join(f)).unwrap();
    }
}

#[test]
fn export_dit_writes_graph_and_manifest() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("out");
    export_tiny_dit(&out);
    assert!(out.join("dit.onnx").is_file());
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    insta::assert_snapshot!(
        "dit_manifest",
        serde_json::to_string_pretty(&manifest["dit"]["lora_targets"]).unwrap()
    );
    assert_eq!(manifest["dit"]["file"], "dit.onnx");

    let result = d.path().join("sample.safetensors");
    let io = tiny().join("dit_io.safetensors");
    let o = stage_dit(
        out.to_str().unwrap(),
        io.to_str().unwrap(),
        result.to_str().unwrap(),
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "sample [2, 5, 16, 8, 8]\n"
    );
    assert!(result.is_file());

    // --compare with --max-error: within the bound passes, above it is a clean failure.
    let (engine, inputs, res) = (
        out.to_str().unwrap(),
        io.to_str().unwrap(),
        result.to_str().unwrap(),
    );
    let compare = ["--compare", inputs, "--compare-name", "sample=output"];
    let o = stage_dit(
        engine,
        inputs,
        res,
        &[&compare[..], &["--max-error", "1e-4"]].concat(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let o = stage_dit(
        engine,
        inputs,
        res,
        &[&compare[..], &["--max-error", "1e-30"]].concat(),
    );
    assert_clean_failure(&o, "above --max-error");
}

/// Every binary's and subcommand's `--help` teaches by example, and is a snapshot: a change to
/// the command-line interface shows up in review.
#[test]
fn every_help_has_an_example_and_is_stable() {
    let commands: [(&str, &[&str]); 5] = [
        (
            "v2l-export",
            &[
                "dit",
                "vae",
                "hypernet",
                "pipeline",
                "text-encoder",
                "image-encoder",
                "prompt2effect",
                "lofa",
            ],
        ),
        ("v2l-compile", &[]),
        ("v2l-run", &["stage", "measure"]),
        (
            "v2l-lora",
            &["inspect", "convert", "merge", "predict", "fuse"],
        ),
        ("v2l-serve", &[]),
    ];
    for (bin, subs) in commands {
        for sub in std::iter::once(None).chain(subs.iter().map(Some)) {
            let mut args: Vec<&str> = sub.into_iter().copied().collect();
            args.push("--help");
            let o = run(bin, &args);
            assert!(o.status.success(), "{bin} {args:?}");
            let text = String::from_utf8_lossy(&o.stdout);
            assert!(
                text.contains("Example"),
                "{bin} {args:?} has no example:\n{text}"
            );
            let name = match sub {
                None => format!("{}_help", bin.replace('-', "_")),
                Some(s) => format!("{}_{s}_help", bin.replace('-', "_")),
            };
            insta::assert_snapshot!(name, text);
        }
    }
}

#[test]
fn measure_labels_clips_and_names_bad_ones() {
    use v2l_runtime::tensor::{Data, Tensor};
    let d = tempfile::tempdir().unwrap();
    // A clip of training/effects.py as a `reference_u8` file, and its first frame alone.
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/effects");
    let clips = v2l_runtime::read_safetensors(&fixture.join("clips.safetensors")).unwrap();
    let clip = clips["rotate_cw"].clone();
    let write = |name: &str, t: Tensor| {
        let path = d.path().join(name);
        let tensors = std::collections::BTreeMap::from([("reference_u8".to_string(), t)]);
        v2l_runtime::write_safetensors(&path, &tensors).unwrap();
        path.to_str().unwrap().to_string()
    };
    let Data::U8(rgb) = &clip.data else { panic!() };
    let one = Tensor {
        shape: vec![1, 64, 64, 3],
        data: Data::U8(rgb[..64 * 64 * 3].to_vec()),
    };
    let (rot, one) = (
        write("rot.safetensors", clip),
        write("one.safetensors", one),
    );

    let o = run_ok("v2l-run", &["measure", "--json", &rot]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["label"], "rotate_cw", "{v}");
    assert!(v["motion"]["rotation_deg"].as_f64().unwrap() > 80.0, "{v}");
    assert_eq!(v["scores"].as_object().unwrap().len(), 8, "{v}");
    // Text: one line per clip, an mp4 read at its own size.
    let mp4 = tiny().join("reference.mp4");
    let o = run_ok("v2l-run", &["measure", &rot, mp4.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert_eq!(text.lines().count(), 2, "{text}");
    assert!(
        text.starts_with(&format!("{rot}: rotate_cw (confidence ")),
        "{text}"
    );

    // Bad clips: one error naming the file, exit code 1, no engine needed.
    assert_clean_failure(
        &run("v2l-run", &["measure", "/nonexistent/a.mp4"]),
        "/nonexistent/a.mp4",
    );
    let notes = d.path().join("notes.mp4");
    std::fs::write(&notes, "not a video").unwrap();
    let o = run("v2l-run", &["measure", notes.to_str().unwrap()]);
    assert_clean_failure(&o, "notes.mp4: not a video");
    let o = run("v2l-run", &["measure", &rot, &one]);
    assert_clean_failure(
        &o,
        &format!("{one}: 1 frame(s); measuring an effect needs at least 2"),
    );
}

#[test]
fn bad_checkpoints_fail_cleanly_without_output() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("out");
    let out_s = out.to_str().unwrap();

    // Missing directory.
    let o = run(
        "v2l-export",
        &["dit", "/nonexistent/transformer", "-o", out_s],
    );
    assert_clean_failure(&o, "/nonexistent/transformer/config.json");

    // Wrong `_class_name` (a VAE given as the transformer).
    let o = run(
        "v2l-export",
        &["dit", tiny().join("vae").to_str().unwrap(), "-o", out_s],
    );
    assert_clean_failure(&o, "`AutoencoderKLCogVideoX`");

    // Truncated weights file.
    let ck = d.path().join("truncated");
    copy_transformer(&ck);
    let w = ck.join("diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&w).unwrap();
    std::fs::write(&w, &bytes[..bytes.len() / 2]).unwrap();
    let o = run("v2l-export", &["dit", ck.to_str().unwrap(), "-o", out_s]);
    assert_clean_failure(
        &o,
        "diffusion_pytorch_model.safetensors: not a valid safetensors file: the file's length is not what its header describes (truncated, or bytes appended)",
    );

    // A config that disagrees with the weights' shapes.
    let ck = d.path().join("shape");
    copy_transformer(&ck);
    let cfg = std::fs::read_to_string(ck.join("config.json")).unwrap();
    std::fs::write(
        ck.join("config.json"),
        cfg.replace("\"text_embed_dim\": 32", "\"text_embed_dim\": 48"),
    )
    .unwrap();
    let o = run("v2l-export", &["dit", ck.to_str().unwrap(), "-o", out_s]);
    assert_clean_failure(
        &o,
        "tensor `patch_embed.text_proj.weight` has shape [32, 32], but the config implies [32, 48]",
    );

    // A missing key.
    let ck = d.path().join("missing");
    copy_transformer(&ck);
    let w = ck.join("diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&w).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let kept: Vec<(String, safetensors::tensor::TensorView)> = st
        .tensors()
        .into_iter()
        .filter(|(k, _)| k != "proj_out.bias")
        .collect();
    safetensors::serialize_to_file(kept, &None, &w).unwrap();
    let o = run("v2l-export", &["dit", ck.to_str().unwrap(), "-o", out_s]);
    assert_clean_failure(&o, "missing tensor `proj_out.bias`");

    // Nothing was written by any of the failures.
    assert!(!out.join("dit.onnx").exists());
}

#[test]
fn bad_run_inputs_fail_cleanly_without_output() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("out");
    export_tiny_dit(&out);
    let engine = out.to_str().unwrap();
    let result = d.path().join("r.safetensors");
    let r = result.to_str().unwrap();

    let o = stage_dit("/nonexistent", "x", r, &[]);
    assert_clean_failure(&o, "/nonexistent");

    let vae_io = tiny().join("vae_io.safetensors");
    let o = stage_dit(engine, vae_io.to_str().unwrap(), r, &[]);
    assert_clean_failure(&o, "missing tensor `hidden_states`");

    let dit_io = tiny().join("dit_io.safetensors");
    let o = stage_dit(
        engine,
        dit_io.to_str().unwrap(),
        "/nonexistent/dir/x.safetensors",
        &[],
    );
    assert_clean_failure(&o, "/nonexistent/dir/x.safetensors");
    assert!(!result.exists());
}

/// dit + vae + hypernet exported into one directory; `v2l-lora predict` from the fixture's
/// reference frames reproduces upstream's reference latents and hypernetwork rows, and the
/// predicted LoRA fused into the DiT gives upstream's `output_with_lilora`.
#[test]
fn predict_matches_upstream_video2lora() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("e");
    let o_s = out.to_str().unwrap();
    let t = tiny();
    let p = |f: &str| t.join(f).to_str().unwrap().to_string();
    for args in [
        vec!["dit".to_string(), p("transformer"), "-o".into(), o_s.into()],
        vec!["vae".to_string(), p("vae"), "-o".into(), o_s.into()],
        vec![
            "hypernet".to_string(),
            p("hypernetwork.safetensors"),
            "--lilora".into(),
            p("lilora.safetensors"),
            "--dit".into(),
            p("transformer"),
            "-o".into(),
            o_s.into(),
        ],
    ] {
        let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        run_ok("v2l-export", &args);
    }
    let lora = d.path().join("pred.safetensors");
    let dump = d.path().join("dump.safetensors");
    run_ok(
        "v2l-lora",
        &[
            "predict",
            "--engine",
            o_s,
            "--reference",
            &p("e2e_io.safetensors"),
            "-o",
            lora.to_str().unwrap(),
            "--dump",
            dump.to_str().unwrap(),
        ],
    );
    let got = v2l_runtime::read_safetensors(&dump).unwrap();
    let want = v2l_runtime::read_safetensors(&t.join("e2e_io.safetensors")).unwrap();
    for name in ["reference_latents", "hyper_weights"] {
        let err = got[name].rel_l2(&want[name]);
        eprintln!("{name}: relative L2 error {err:.3e}");
        assert!(err <= F32_REL_L2, "{name}: {err:.3e}");
    }
    let result = d.path().join("o.safetensors");
    let o = stage_dit(
        o_s,
        &p("dit_io.safetensors"),
        result.to_str().unwrap(),
        &["--lora", lora.to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let got = v2l_runtime::read_safetensors(&result).unwrap();
    let want = v2l_runtime::read_safetensors(&t.join("dit_io.safetensors")).unwrap();
    let err = got["sample"].rel_l2(&want["output_with_lilora"]);
    eprintln!("dit with predicted LoRA: relative L2 error {err:.3e}");
    assert!(err <= F32_REL_L2);

    // A video that cannot be decoded, and one with no frames: clear errors, no LoRA file.
    let junk = d.path().join("junk.mp4");
    std::fs::write(&junk, b"not a video").unwrap();
    let bad = d.path().join("bad.safetensors");
    let o = run(
        "v2l-lora",
        &[
            "predict",
            "--engine",
            o_s,
            "--reference",
            junk.to_str().unwrap(),
            "-o",
            bad.to_str().unwrap(),
        ],
    );
    assert_clean_failure(&o, "cannot decode video");
    let empty = d.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let o = run(
        "v2l-lora",
        &[
            "predict",
            "--engine",
            o_s,
            "--reference",
            empty.to_str().unwrap(),
            "-o",
            bad.to_str().unwrap(),
        ],
    );
    assert_clean_failure(&o, "no frames");
    assert!(!bad.exists());
}

/// `v2l-lora fuse` writes a diffusers checkpoint whose export reproduces PyTorch's output with
/// the PEFT LoRA active; `convert` through kohya and ComfyUI keeps the file usable; a LoRA for
/// another model is refused without writing anything.
#[test]
fn lora_fuse_and_convert_through_the_cli() {
    let d = tempfile::tempdir().unwrap();
    let t = tiny();
    let p = |f: &str| t.join(f).to_str().unwrap().to_string();
    let peft = p("peft_lora/pytorch_lora_weights.safetensors");
    let kohya = d.path().join("k.safetensors");
    let comfy = d.path().join("c.safetensors");
    for (i, o, f) in [
        (peft.as_str(), &kohya, "kohya"),
        (kohya.to_str().unwrap(), &comfy, "comfyui"),
    ] {
        run_ok(
            "v2l-lora",
            &["convert", i, "-o", o.to_str().unwrap(), "--format", f],
        );
    }
    let fused = d.path().join("fused");
    run_ok(
        "v2l-lora",
        &[
            "fuse",
            "--base",
            &p("transformer"),
            "--lora",
            comfy.to_str().unwrap(),
            "-o",
            fused.to_str().unwrap(),
        ],
    );
    let out = d.path().join("out");
    run_ok(
        "v2l-export",
        &["dit", fused.to_str().unwrap(), "-o", out.to_str().unwrap()],
    );
    let res = d.path().join("r.safetensors");
    let r = stage_dit(
        out.to_str().unwrap(),
        &p("dit_io.safetensors"),
        res.to_str().unwrap(),
        &[],
    );
    assert!(r.status.success(), "{}", stderr(&r));
    let got = v2l_runtime::read_safetensors(&res).unwrap();
    let want = v2l_runtime::read_safetensors(&t.join("peft_lora_io.safetensors")).unwrap();
    let err = got["sample"].rel_l2(&want["output_with_peft_lora"]);
    eprintln!("fused checkpoint vs PEFT: relative L2 {err:.3e}");
    assert!(err <= F32_REL_L2);

    // The LiLoRA auxiliaries are not a LoRA; a LoRA for other modules matches nothing.
    let bad = d.path().join("bad");
    let r = run(
        "v2l-lora",
        &[
            "fuse",
            "--base",
            &p("transformer"),
            "--lora",
            &p("lilora.safetensors"),
            "-o",
            bad.to_str().unwrap(),
        ],
    );
    assert_clean_failure(&r, "no LoRA tensors in a known format");
    let r = run(
        "v2l-lora",
        &[
            "fuse",
            "--base",
            &p("vae"),
            "--lora",
            comfy.to_str().unwrap(),
            "-o",
            bad.to_str().unwrap(),
        ],
    );
    assert_clean_failure(&r, "match no linear layer of the model");
    assert!(!bad.exists());
}

/// The PEFT fixture LoRA rewritten with other `lora_adapter_metadata` (None: no metadata).
fn peft_with_metadata(dst: &Path, metadata: Option<&str>) {
    let src = tiny().join("peft_lora/pytorch_lora_weights.safetensors");
    let bytes = std::fs::read(src).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let meta = metadata.map(|m| {
        std::collections::HashMap::from([("lora_adapter_metadata".to_string(), m.to_string())])
    });
    safetensors::serialize_to_file(st.tensors(), &meta, dst).unwrap();
}

/// Issue 15's bad inputs to `v2l-lora` and `v2l-export`: each one clear error before any work,
/// nothing written.
#[test]
fn bad_numbers_sizes_and_metadata_are_refused_before_work() {
    let d = tempfile::tempdir().unwrap();
    let t = tiny();
    let ts = |p: PathBuf| p.to_str().unwrap().to_string();
    let (peft, out) = (
        ts(t.join("peft_lora/pytorch_lora_weights.safetensors")),
        ts(d.path().join("out.safetensors")),
    );
    let transformer = ts(t.join("transformer"));
    let fused = ts(d.path().join("fused"));
    for scale in ["inf", "NaN"] {
        let o = run(
            "v2l-lora",
            &[
                "fuse",
                "--base",
                &transformer,
                "--lora",
                &peft,
                "--scale",
                scale,
                "-o",
                &fused,
            ],
        );
        assert_clean_failure(&o, "--scale");
    }
    assert!(!Path::new(&fused).exists());

    // A missing engine is not reached: the size and the weight are checked first.
    let engine = ts(d.path().join("no-engine"));
    let reference = ts(t.join("reference.mp4"));
    for (extra, needle) in [
        (&["--height", "0", "--width", "64"][..], "--height: 0"),
        (&["--height", "50", "--width", "64"][..], "--height: 50"),
        (&["--lora-weight", "NaN"][..], "--lora-scale"),
        (&["--lora-scale", "inf"][..], "--lora-scale"),
    ] {
        let mut args = vec![
            "predict",
            "--engine",
            &engine,
            "--reference",
            &reference,
            "-o",
            &out,
        ];
        args.extend_from_slice(extra);
        assert_clean_failure(&run("v2l-lora", &args), needle);
    }
    assert!(!Path::new(&out).exists());

    // Converting a file onto itself would destroy it.
    let copy = d.path().join("copy.safetensors");
    std::fs::copy(&peft, &copy).unwrap();
    let before = std::fs::read(&copy).unwrap();
    let o = run(
        "v2l-lora",
        &[
            "convert",
            &ts(copy.clone()),
            "-o",
            &ts(copy.clone()),
            "--format",
            "kohya",
        ],
    );
    assert_clean_failure(&o, "the output is the input file");
    assert_eq!(std::fs::read(&copy).unwrap(), before);

    // Metadata that cannot be read is an error, never a silent alpha = rank.
    for (meta, needle) in [
        ("{not json", "not valid JSON"),
        (
            r#"{"transformer.lora_alpha": "lots"}"#,
            "lora_alpha is \"lots\"",
        ),
        (
            r#"{"lora_alpha": 8, "alpha_pattern": {"x": null}}"#,
            "alpha_pattern `x`",
        ),
    ] {
        let f = d.path().join("meta.safetensors");
        peft_with_metadata(&f, Some(meta));
        assert_clean_failure(&run("v2l-lora", &["inspect", &ts(f)]), needle);
    }

    // An unrolled hypernetwork with 100000 iterations would run until the OOM killer.
    let ex = d.path().join("ex");
    let o = run(
        "v2l-export",
        &[
            "pipeline",
            &ts(t.clone()),
            "--hypernet",
            &ts(t.join("hypernetwork.safetensors")),
            "--lilora",
            &ts(t.join("lilora.safetensors")),
            "--iterations",
            "100000",
            "-o",
            &ts(ex.clone()),
        ],
    );
    assert_clean_failure(&o, "V2L_MAX_ITERATIONS");
    assert!(!ex.exists());
}

/// Issue 15's bad `v2l-run` inputs: refused from the command line alone, before the engine is
/// opened (the engine path here does not even exist), with the flag named.
#[test]
fn v2l_run_checks_its_flags_before_opening_the_engine() {
    let d = tempfile::tempdir().unwrap();
    let t = tiny();
    let image = t.join("first_frame.png");
    let out = d.path().join("a.mp4");
    let (image, out_s) = (image.to_str().unwrap(), out.to_str().unwrap());
    let base = [
        "--engine",
        "/nonexistent-engine",
        "--image",
        image,
        "--prompt-embeds",
        "p.safetensors",
        "--seed",
        "1",
    ];
    let cases: &[(&[&str], &str)] = &[
        (
            &[
                "--frames", "9", "--height", "0", "--width", "64", "-o", out_s,
            ],
            "--height: 0",
        ),
        (
            &[
                "--frames", "9", "--height", "100000", "--width", "64", "-o", out_s,
            ],
            "V2L_MAX_PIXELS",
        ),
        (
            &[
                "--frames", "1000001", "--height", "64", "--width", "64", "-o", out_s,
            ],
            "V2L_MAX_FRAMES",
        ),
        (&["--threads", "100000", "-o", out_s], "V2L_MAX_THREADS"),
        (&["--steps", "0", "-o", out_s], "--steps"),
        (&["--guidance", "NaN", "-o", out_s], "--guidance: NaN"),
        (&["--guidance", "inf", "-o", out_s], "--guidance: inf"),
        (&["--lora-scale", "NaN", "-o", out_s], "--lora-scale: NaN"),
        (&["--fps", "0", "-o", out_s], "--fps: 0"),
        (&["-o", "/dev/null"], "needs a .mp4 extension"),
        (
            &["-o", "/nonexistent-dir/a.mp4"],
            "output directory does not exist",
        ),
        (
            &["--dump", "/nonexistent-dir/d.safetensors", "-o", out_s],
            "output directory does not exist",
        ),
        // A negative guidance parses (as `--guidance=-1` always did); the missing engine is next.
        (&["--guidance", "-1", "-o", out_s], "/nonexistent-engine"),
    ];
    for (extra, needle) in cases {
        let mut args = base.to_vec();
        args.extend_from_slice(extra);
        assert_clean_failure(&run("v2l-run", &args), needle);
    }
    // Values clap parses are usage errors (exit 2), named by their flag.
    for (value, needle) in [
        ("teacache:0.1", "the one method is `first-block:THRESHOLD`"),
        ("first-block:-1", "threshold must be a number >= 0"),
    ] {
        let mut args = base.to_vec();
        args.extend_from_slice(&["--cache", value, "-o", out_s]);
        let o = run("v2l-run", &args);
        assert_clean_failure_with(&o, 2, needle);
        assert!(stderr(&o).contains("--cache"), "{}", stderr(&o));
    }
    assert!(!out.exists());

    // A missing required argument is a usage error: exit code 2, like clap's own. (--image is
    // checked once the engine is open: text-to-video engines take none.)
    let o = run("v2l-run", &["--engine", "/nonexistent-engine", "-o", out_s]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("give --prompt"), "{}", stderr(&o));

    // ORT_DYLIB_PATH that does not exist is an error, not a silent fallback.
    let ex = d.path().join("ex");
    run_ok(
        "v2l-export",
        &[
            "dit",
            t.join("transformer").to_str().unwrap(),
            "-o",
            ex.to_str().unwrap(),
        ],
    );
    let o = Command::new(env!("CARGO_BIN_EXE_v2l-run"))
        .env("ORT_DYLIB_PATH", "/nonexistent/libonnxruntime.so")
        .args(["--engine", ex.to_str().unwrap(), "stage", "dit"])
        .args([
            "--inputs",
            t.join("dit_io.safetensors").to_str().unwrap(),
            "-o",
        ])
        .arg(d.path().join("o.safetensors"))
        .output()
        .unwrap();
    // Exit 3: ONNX Runtime is missing (an environment fault, not a bad input).
    assert_clean_failure_with(&o, 3, "ORT_DYLIB_PATH=/nonexistent/libonnxruntime.so");
}

/// `bundle.json` is verified like every other part: editing its strategy or weight hash makes
/// the engine refuse to load; a TensorRT bundle records what actually runs (`fused`).
#[test]
fn edited_bundle_json_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let t = tiny();
    let ex = d.path().join("ex");
    run_ok(
        "v2l-export",
        &[
            "dit",
            t.join("transformer").to_str().unwrap(),
            "-o",
            ex.to_str().unwrap(),
        ],
    );
    let compile = |backend: &str, out: &Path| {
        Command::new(env!("CARGO_BIN_EXE_v2l-compile"))
            .arg(&ex)
            .arg("-o")
            .arg(out)
            .args(["--backend", backend])
            .output()
            .unwrap()
    };
    let trt = d.path().join("trt");
    assert!(compile("tensorrt", &trt).status.success());
    let b: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(trt.join("bundle.json")).unwrap()).unwrap();
    assert_eq!(
        b["lora_strategy"], "unfused",
        "GPU engines take LoRA factors as inputs"
    );

    let eng = d.path().join("eng");
    assert!(compile("cpu", &eng).status.success());
    let inputs = t.join("dit_io.safetensors");
    let out = d.path().join("o.safetensors");
    let stage = |eng: &Path| {
        stage_dit(
            eng.to_str().unwrap(),
            inputs.to_str().unwrap(),
            out.to_str().unwrap(),
            &[],
        )
    };
    assert!(stage(&eng).status.success());
    let text = std::fs::read_to_string(eng.join("bundle.json")).unwrap();
    for (from, to) in [
        ("\"bound\"", "\"fused\""),
        ("\"weight_hash\": \"", "\"weight_hash\": \"0"),
    ] {
        assert!(text.contains(from), "{from}");
        std::fs::write(eng.join("bundle.json"), text.replacen(from, to, 1)).unwrap();
        assert_clean_failure(&stage(&eng), "was edited after `v2l-compile` wrote it");
    }
}

/// A failed `v2l-export pipeline` leaves nothing behind (parts are staged and moved in only
/// when all succeeded), and a bad scheduler config is refused at export, not at generation.
#[test]
fn failed_pipeline_export_leaves_nothing() {
    let d = tempfile::tempdir().unwrap();
    let t = tiny();
    let model = d.path().join("model");
    for part in ["transformer", "vae", "scheduler"] {
        std::fs::create_dir_all(model.join(part)).unwrap();
        for e in std::fs::read_dir(t.join(part)).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), model.join(part).join(e.file_name())).unwrap();
        }
    }
    let sched = model.join("scheduler/scheduler_config.json");
    let good = std::fs::read_to_string(&sched).unwrap();
    let re = good
        .lines()
        .map(|l| {
            if l.contains("num_train_timesteps") {
                "  \"num_train_timesteps\": -3,"
            } else {
                l
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(&sched, re).unwrap();
    let out = d.path().join("out");
    let m = model.to_str().unwrap();
    let o = run("v2l-export", &["pipeline", m, "-o", out.to_str().unwrap()]);
    assert_clean_failure(&o, "num_train_timesteps");
    assert!(!out.exists());

    // The hypernetwork fails after the DiT and VAE were written: still nothing in `out`.
    std::fs::write(&sched, good).unwrap();
    let o = run(
        "v2l-export",
        &[
            "pipeline",
            m,
            "--hypernet",
            t.join("hypernetwork.safetensors").to_str().unwrap(),
            "--lilora",
            t.join("transformer/config.json").to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ],
    );
    assert_clean_failure(&o, "config.json");
    assert!(!out.exists(), "a failed export left {out:?}");
    let leftovers: Vec<_> = std::fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        leftovers.len(),
        1,
        "staging directories left: {leftovers:?}"
    );
    assert!(!stderr(&o).contains(".v2l-export-"), "{}", stderr(&o));
}

/// A truncated or foreign safetensors file is described in words, not the parser's variant
/// names (`MetadataIncompleteBuffer`, `HeaderTooLarge`).
#[test]
fn broken_safetensors_are_described_in_words() {
    let d = tempfile::tempdir().unwrap();
    let t = tiny();
    let bytes = std::fs::read(t.join("peft_lora/pytorch_lora_weights.safetensors")).unwrap();
    let cut = d.path().join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let o = run("v2l-lora", &["inspect", cut.to_str().unwrap()]);
    assert_clean_failure(
        &o,
        "length is not what its header describes (truncated, or bytes appended)",
    );
    let cfg = t.join("transformer/config.json");
    let o = run("v2l-lora", &["inspect", cfg.to_str().unwrap()]);
    assert_clean_failure(&o, "is it a safetensors file at all?");
    assert!(!stderr(&o).contains("HeaderTooLarge"), "{}", stderr(&o));
}

/// `stage` inputs are checked against the model before any session is built: dtypes, ranks,
/// sizes that agree with the DiT, finite floats, timesteps in the scheduler's range; and an
/// output path the stage cannot write is refused before the run.
#[test]
fn bad_stage_inputs_are_refused_before_work() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("e");
    export_tiny_dit(&out);
    let engine = out.to_str().unwrap();
    let good = v2l_runtime::read_safetensors(&tiny().join("dit_io.safetensors")).unwrap();
    let result = d.path().join("r.safetensors");
    let r = result.to_str().unwrap();
    type Edit = fn(&mut std::collections::BTreeMap<String, v2l_runtime::Tensor>);
    let cases: [(Edit, &str); 6] = [
        (
            |m| {
                m.insert(
                    "timestep".into(),
                    v2l_runtime::Tensor::i64(vec![2], vec![1_000_000_000_000, 3]),
                );
            },
            "`timestep` holds 1000000000000; timesteps are 0 to 999",
        ),
        (
            |m| {
                m.insert(
                    "timestep".into(),
                    v2l_runtime::Tensor::f32(vec![2], vec![1.0, 3.0]),
                );
            },
            "`timestep` must be int64",
        ),
        (
            |m| {
                let t = m.get_mut("hidden_states").unwrap();
                if let v2l_runtime::tensor::Data::F32(v) = &mut t.data {
                    v[17] = f32::NAN;
                }
            },
            "`hidden_states` holds NaN at element 17",
        ),
        (
            |m| {
                m.insert(
                    "rope_cos".into(),
                    v2l_runtime::Tensor::f32(vec![79, 16], vec![0.0; 79 * 16]),
                );
            },
            "`rope_cos` has shape [79, 16]; 5 frames of 8x8 latents in patches of 2 need [80, 16]",
        ),
        (
            |m| {
                m.insert(
                    "encoder_hidden_states".into(),
                    v2l_runtime::Tensor::f32(vec![2, 8, 31], vec![0.0; 2 * 8 * 31]),
                );
            },
            "expected [2, L, 32]",
        ),
        (
            |m| {
                m.insert(
                    "hidden_states".into(),
                    v2l_runtime::Tensor::f32(vec![2, 5, 32, 8], vec![0.0; 2560]),
                );
            },
            "`hidden_states` has shape [2, 5, 32, 8]; expected [B, F, C, H, W]",
        ),
    ];
    for (edit, needle) in cases {
        let mut m = good.clone();
        edit(&mut m);
        let inputs = d.path().join("in.safetensors");
        v2l_runtime::write_safetensors(&inputs, &m).unwrap();
        let o = stage_dit(engine, inputs.to_str().unwrap(), r, &[]);
        assert_clean_failure(&o, needle);
        assert!(!result.exists());
    }
    // An output the stage cannot write: refused before the DiT runs.
    let dit_io = tiny().join("dit_io.safetensors");
    let no_ext = d.path().join("r");
    let o = stage_dit(
        engine,
        dit_io.to_str().unwrap(),
        no_ext.to_str().unwrap(),
        &[],
    );
    assert_clean_failure(&o, "needs a .safetensors extension");
    assert!(!no_ext.exists());

    // An engine goes into a new or an empty directory, never over other files.
    let full = d.path().join("full");
    std::fs::create_dir(&full).unwrap();
    std::fs::write(full.join("keep.txt"), "mine").unwrap();
    let o = run("v2l-compile", &[engine, "-o", full.to_str().unwrap()]);
    assert_clean_failure(&o, "exists and is not empty");
    assert_eq!(std::fs::read_dir(&full).unwrap().count(), 1);
    let empty = d.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    run_ok("v2l-compile", &[engine, "-o", empty.to_str().unwrap()]);
    assert!(empty.join("bundle.json").is_file());

    // Precisions not built for a backend are refused by name, leaving nothing behind.
    for (precision, backend, extra, why) in [
        (
            "int8",
            "tensorrt",
            "",
            "give --calibration <dir> or --calibration-samples",
        ),
        (
            "int4",
            "cuda",
            "",
            "int4 engines are built for the CPU backend",
        ),
        (
            "fp16",
            "cpu",
            "--calibration-samples=4",
            "a calibration is for int8",
        ),
    ] {
        let out = d.path().join(format!("{precision}-{backend}"));
        let mut args = vec![
            engine,
            "-o",
            out.to_str().unwrap(),
            "--precision",
            precision,
            "--backend",
            backend,
        ];
        args.extend([extra].into_iter().filter(|a| !a.is_empty()));
        let o = run("v2l-compile", &args);
        assert_clean_failure(&o, why);
        assert!(stderr(&o).contains(&format!("--precision {precision}")));
        assert!(!out.exists());
    }
    // A calibration directory with no samples is named.
    let no_samples = d.path().join("no-samples");
    std::fs::create_dir(&no_samples).unwrap();
    let out = d.path().join("static-int8");
    let o = run(
        "v2l-compile",
        &[
            engine,
            "-o",
            out.to_str().unwrap(),
            "--precision",
            "int8",
            "--calibration",
            no_samples.to_str().unwrap(),
        ],
    );
    assert_clean_failure(&o, "holds no .safetensors calibration samples");
    assert!(stderr(&o).contains("no-samples"));
    assert!(!out.exists());
}

/// A reference clip too short to carry motion is refused before any session is built; one of
/// another aspect ratio is resized as diffusers does, with a warning that says so.
#[test]
fn short_and_squashed_reference_clips() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("e");
    run_ok(
        "v2l-export",
        &[
            "pipeline",
            tiny().to_str().unwrap(),
            "--hypernet",
            tiny().join("hypernetwork.safetensors").to_str().unwrap(),
            "--lilora",
            tiny().join("lilora.safetensors").to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ],
    );
    let engine = out.to_str().unwrap();
    let lora = d.path().join("l.safetensors");
    let reference = tiny().join("reference.mp4");
    let predict = |clip: &Path, extra: &[&str]| {
        let mut args = vec![
            "predict",
            "--engine",
            engine,
            "--reference",
            clip.to_str().unwrap(),
            "-o",
            lora.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        run("v2l-lora", &args)
    };
    for n in ["1", "4"] {
        let o = predict(&reference, &["--frames", n]);
        assert_clean_failure(&o, "needs at least 5 (two latent frames)");
        assert!(!lora.exists());
    }
    // v2l-run checks the same before loading the pipeline.
    let o = run(
        "v2l-run",
        &[
            "--engine",
            engine,
            "--image",
            tiny().join("first_frame.png").to_str().unwrap(),
            "--prompt-embeds",
            tiny().join("e2e_io.safetensors").to_str().unwrap(),
            "--reference",
            tiny().join("first_frame.png").to_str().unwrap(),
            "--seed",
            "1",
            "--steps",
            "1",
            "-o",
            d.path().join("v.mp4").to_str().unwrap(),
        ],
    );
    assert_clean_failure(&o, "first_frame.png: the reference clip has 1 frame;");

    // A 4:3 clip for a 1:1 generation: predicted (as diffusers would), with a warning.
    let wide = d.path().join("wide.mp4");
    let ff = Command::new("ffmpeg")
        .args([
            "-v",
            "error",
            "-f",
            "lavfi",
            "-i",
            "testsrc=size=640x480:rate=8",
        ])
        .args(["-frames:v", "9", "-pix_fmt", "yuv420p"])
        .arg(&wide)
        .output()
        .expect("ffmpeg runs");
    assert!(ff.status.success(), "{}", stderr(&ff));
    let o = predict(&wide, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("warning:")
            && err.contains("640x480 (aspect 1.33) is resized to 64x64 (aspect 1.00)"),
        "{err}"
    );
    // The fixture's own clip has the generation's aspect: no warning.
    let o = predict(&reference, &[]);
    assert!(
        o.status.success() && !stderr(&o).contains("warning"),
        "{}",
        stderr(&o)
    );

    // `v2l-run --lora`: files checked against the DiT before the pipeline loads; weights must
    // match the files one to one; a LoRA and a reference clip are exclusive.
    let peft = tiny().join("peft_lora/pytorch_lora_weights.safetensors");
    let peft = peft.to_str().unwrap();
    let video = d.path().join("l.mp4");
    let generate = |extra: &[&str]| {
        let image = tiny().join("first_frame.png");
        let prompts = tiny().join("e2e_io.safetensors");
        let mut args = vec![
            "--engine",
            engine,
            "--image",
            image.to_str().unwrap(),
            "--prompt-embeds",
            prompts.to_str().unwrap(),
            "--seed",
            "1",
            "--steps",
            "1",
            "-o",
            video.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        run("v2l-run", &args)
    };
    let o = generate(&["--lora", peft, "--lora", peft, "--lora-weights", "1"]);
    assert_clean_failure_with(&o, 2, "--lora-weights has 1 values for 2 --lora files");
    let lilora = tiny().join("lilora.safetensors");
    let o = generate(&["--lora", lilora.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let o = generate(&["--lora", peft, "--reference", reference.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(!video.exists());
    let o = generate(&[
        "--lora",
        peft,
        "--lora",
        peft,
        "--lora-weights",
        "0.25,0.25",
    ]);
    assert!(o.status.success() && video.is_file(), "{}", stderr(&o));
}

/// Wan2.1's parts through the CLI: the DiT, the umT5 text encoder and the CLIP image encoder
/// exported into one directory; `stage dit --lora` with a PEFT LoRA gives diffusers' output
/// (RoPE tables computed by v2l); a Wan pipeline directory is recognised and refused with what
/// to do instead.
#[test]
fn wan_parts_export_and_run_through_the_cli() {
    let wan = tiny().join("../wan-tiny");
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("wan");
    let out_s = out.to_str().unwrap();
    for (cmd, part) in [
        ("dit", "transformer"),
        ("text-encoder", "text_encoder"),
        ("image-encoder", "image_encoder"),
    ] {
        let o = run(
            "v2l-export",
            &[cmd, wan.join(part).to_str().unwrap(), "-o", out_s],
        );
        assert!(o.status.success(), "{cmd}: {}", stderr(&o));
    }
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(m["dit"]["class_name"], "WanTransformer3DModel");
    assert_eq!(m["text_encoder"]["model_type"], "umt5");
    assert_eq!(m["image_encoder"]["model_type"], "clip_vision_model");

    let inp = wan_t2v_dit_inputs(&d.path().join("in.safetensors"));
    let res = d.path().join("out.safetensors");
    let o = run_ok(
        "v2l-run",
        &[
            "--engine",
            out_s,
            "stage",
            "dit",
            "--inputs",
            inp.to_str().unwrap(),
            "-o",
            res.to_str().unwrap(),
            "--lora",
            wan.join("lora/pytorch_lora_weights.safetensors")
                .to_str()
                .unwrap(),
            "--compare",
            wan.join("lora_io.safetensors").to_str().unwrap(),
        ],
    );
    let text = String::from_utf8_lossy(&o.stdout);
    let err: f64 = text
        .lines()
        .find_map(|l| l.split("relative L2 error ").nth(1))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no comparison in {text}"));
    assert!(err < SAME_F32_REL_L2, "{text}");
}

/// A Wan2.1 pipeline directory through the CLI, as a user runs it: `v2l-export pipeline`
/// recognises it (DiT, Wan VAE, umT5, UniPC; for I2V the CLIP encoder and image processor), and
/// `v2l-run` generates T2V (no --image) and I2V (--image) videos whose frames are diffusers'
/// (`wan-tiny/e2e_io`); a first frame given to the T2V engine is refused by name.
#[test]
fn wan_pipelines_export_and_generate_through_the_cli() {
    let wan = tiny().join("../wan-tiny");
    let io = v2l_runtime::read_safetensors(&wan.join("e2e_io.safetensors")).unwrap();
    let d = tempfile::tempdir().unwrap();
    for (variant, transformer) in [("t2v", "transformer"), ("i2v", "transformer_i2v")] {
        let model = d.path().join(format!("{variant}-model"));
        let mut parts = vec![
            (transformer, "transformer"),
            ("vae", "vae"),
            ("scheduler_unipc", "scheduler"),
            ("text_encoder", "text_encoder"),
        ];
        if variant == "i2v" {
            parts.extend([
                ("image_encoder", "image_encoder"),
                ("image_processor", "image_processor"),
            ]);
        }
        common::wan_model_dir(&model, &parts);
        let engine = d.path().join(variant);
        run_ok(
            "v2l-export",
            &[
                "pipeline",
                model.to_str().unwrap(),
                "-o",
                engine.to_str().unwrap(),
            ],
        );
        let get = |n: &str| io[&format!("{variant}_{n}")].clone();
        let mut inputs = std::collections::BTreeMap::new();
        inputs.insert("prompt_embeds".to_string(), get("prompt_embeds"));
        inputs.insert(
            "negative_prompt_embeds".to_string(),
            get("negative_prompt_embeds"),
        );
        inputs.insert("initial_noise".to_string(), get("noise"));
        let inp = d.path().join(format!("{variant}-in.safetensors"));
        v2l_runtime::write_safetensors(&inp, &inputs).unwrap();
        let video = d.path().join(format!("{variant}.mp4"));
        let dump = d.path().join(format!("{variant}-dump.safetensors"));
        let mut args = vec![
            "--engine",
            engine.to_str().unwrap(),
            "--prompt-embeds",
            inp.to_str().unwrap(),
            "--noise",
            inp.to_str().unwrap(),
            "--frames",
            "9",
            "--height",
            "32",
            "--width",
            "48",
            "--steps",
            "3",
            "--guidance",
            "5",
            "-o",
            video.to_str().unwrap(),
            "--dump",
            dump.to_str().unwrap(),
        ];
        let first = wan.join("first_frame.png");
        if variant == "i2v" {
            // An image-to-video engine without its first frame: a usage error naming --image.
            assert_clean_failure_with(&run("v2l-run", &args), 2, "--image: required");
            // The CLIP tokens come from the engine's image encoder and processor.
            args.extend(["--image", first.to_str().unwrap()]);
        }
        let o = run("v2l-run", &args);
        assert!(o.status.success(), "{variant}: {}", stderr(&o));
        assert!(video.is_file());
        let got = v2l_runtime::read_safetensors(&dump).unwrap();
        let (a, b) = (
            got["frames"].as_f32("frames").unwrap(),
            io[&format!("{variant}_frames")].as_f32("want").unwrap(),
        );
        assert_eq!(a.len(), b.len());
        let mae = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs() as f64)
            .sum::<f64>()
            / a.len() as f64;
        assert!(mae <= FRAMES_MAE, "{variant} frames MAE {mae}");

        if variant == "t2v" {
            // The same engine compiled to int8, generating with a Wan LoRA unfused beside
            // the int8 weights: within int8's distance of diffusers' fp32 frames.
            let bundle = d.path().join("t2v-int8");
            run_ok(
                "v2l-compile",
                &[
                    engine.to_str().unwrap(),
                    "-o",
                    bundle.to_str().unwrap(),
                    "--precision",
                    "int8",
                ],
            );
            let lora = wan.join("lora/pytorch_lora_weights.safetensors");
            let mut with_bundle = args.clone();
            with_bundle[1] = bundle.to_str().unwrap();
            let o = run("v2l-run", &with_bundle);
            assert!(o.status.success(), "int8: {}", stderr(&o));
            let got = v2l_runtime::read_safetensors(&dump).unwrap();
            let a = got["frames"].as_f32("frames").unwrap();
            let mae = a
                .iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs() as f64)
                .sum::<f64>()
                / a.len() as f64;
            assert!(mae < INT8_FRAMES_MAE, "int8 frames MAE {mae}");
            with_bundle.extend([
                "--lora",
                lora.to_str().unwrap(),
                "--lora-strategy",
                "unfused",
            ]);
            let o = run("v2l-run", &with_bundle);
            assert!(o.status.success(), "int8 + LoRA: {}", stderr(&o));

            args.extend(["--image", first.to_str().unwrap()]);
            let o = run("v2l-run", &args);
            assert_clean_failure_with(&o, 2, "text-to-video");
        }
    }
}

/// `s·B·A` of the rank columns `cols` of one layer, `[out, in]`, in f64.
fn lora_update(l: &v2l_runtime::lora::format::LoraLayer, cols: std::ops::Range<usize>) -> Vec<f64> {
    let (a, b, r) = (l.a.to_f32(), l.b.to_f32(), l.rank());
    let (out, inp) = (l.b.shape[0], l.a.shape[1]);
    let s = l.scale(1.0) as f64;
    (0..out * inp)
        .map(|k| {
            let (o, i) = (k / inp, k % inp);
            s * cols
                .clone()
                .map(|j| b[o * r + j] as f64 * a[j * inp + i] as f64)
                .sum::<f64>()
        })
        .collect()
}

fn norm(v: &[f64]) -> f64 {
    v.iter().map(|x| x * x).sum::<f64>().sqrt()
}

/// `v2l-lora merge` is the weighted sum of the updates (rank concatenation), per layer; with
/// `--equalize-norms` every LoRA's part of a layer has the target norm; `inspect --compare`
/// reports a LoRA against itself as fully overlapping. Bad calls fail cleanly.
#[test]
fn loras_merge_equalize_and_compare_through_the_cli() {
    use v2l_runtime::lora::format::read;
    let wan = tiny().join("../wan-tiny");
    let a = wan.join("lora/pytorch_lora_weights.safetensors");
    let b = wan.join("prompt2effect/lora_prompt0.safetensors");
    let (a_s, b_s) = (a.to_str().unwrap(), b.to_str().unwrap());
    let d = tempfile::tempdir().unwrap();
    let merged = d.path().join("merged.safetensors");
    let m_s = merged.to_str().unwrap();
    run_ok(
        "v2l-lora",
        &["merge", a_s, b_s, "--weights", "0.6,-0.4", "-o", m_s],
    );
    let (la, lb, lm) = (
        read(&a, None).unwrap(),
        read(&b, None).unwrap(),
        read(&merged, None).unwrap(),
    );
    let find = |l: &v2l_runtime::lora::format::Lora, m: &str| {
        l.layers.iter().find(|x| x.module == m).cloned()
    };
    let mut both = 0;
    for l in &lm.layers {
        let full = |x: &Option<v2l_runtime::lora::format::LoraLayer>, w: f64| {
            x.as_ref()
                .map(|x| lora_update(x, 0..x.rank()).iter().map(|v| v * w).collect())
        };
        let parts: Vec<Vec<f64>> = [
            full(&find(&la, &l.module), 0.6),
            full(&find(&lb, &l.module), -0.4),
        ]
        .into_iter()
        .flatten()
        .collect();
        both += usize::from(parts.len() == 2);
        let want: Vec<f64> = (0..parts[0].len())
            .map(|k| parts.iter().map(|p| p[k]).sum())
            .collect();
        let got = lora_update(l, 0..l.rank());
        let diff: Vec<f64> = got.iter().zip(&want).map(|(g, w)| g - w).collect();
        assert!(
            norm(&diff) <= ROUNDING_F32_REL_L2 * norm(&want),
            "{}",
            l.module
        );
    }
    assert_eq!(
        lm.layers.len(),
        la.layers.len(),
        "b's layers are a subset of a's"
    );
    assert_eq!(both, lb.layers.len());

    // Equalised to norm 0.5: each LoRA's columns of each layer carry an update of norm 0.5.
    let eq = d.path().join("eq.safetensors");
    let o = run_ok(
        "v2l-lora",
        &[
            "merge",
            a_s,
            b_s,
            "--weights",
            "2,1",
            "--equalize-norms",
            "--norm-target",
            "0.5",
            "-o",
            eq.to_str().unwrap(),
        ],
    );
    assert!(String::from_utf8_lossy(&o.stdout).contains("norm → factor"));
    for l in &read(&eq, None).unwrap().layers {
        let ra = find(&la, &l.module).map_or(0, |x| x.rank());
        for cols in [0..ra, ra..l.rank()].into_iter().filter(|c| !c.is_empty()) {
            let n = norm(&lora_update(l, cols)) * l.rank() as f64 / l.alpha as f64;
            assert!((n - 0.5).abs() < SAME_F32_REL_L2, "{}: {n}", l.module);
        }
    }

    // inspect --compare: a against itself overlaps fully; against b somewhere in [0, 1].
    let o = run_ok("v2l-lora", &["inspect", a_s, a_s, "--compare", "--json"]);
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["shared_layers"], 20);
    for l in j["layers"].as_array().unwrap() {
        assert!((l["overlap"].as_f64().unwrap() - 1.0).abs() < 1e-9, "{l}");
        assert!((l["cosine"].as_f64().unwrap() - 1.0).abs() < 1e-9, "{l}");
    }
    let o = run_ok("v2l-lora", &["inspect", a_s, b_s, "--compare"]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("shared layers: 16  only in a: 4  only in b: 0"),
        "{text}"
    );

    // Bad calls.
    let o = run(
        "v2l-lora",
        &["merge", a_s, b_s, "--weights", "1", "-o", m_s],
    );
    assert_clean_failure_with(&o, 2, "--weights has 1 values for 2 LoRA files");
    let o = run(
        "v2l-lora",
        &["merge", a_s, b_s, "--weights", "1,nan", "-o", m_s],
    );
    assert_clean_failure(&o, "--weights");
    let o = run("v2l-lora", &["merge", a_s, m_s, "-o", m_s]);
    assert_clean_failure(&o, "the output is an input file");
    let o = run("v2l-lora", &["inspect", a_s, "--compare"]);
    assert_clean_failure_with(&o, 2, "--compare takes two LoRA files, not 1");
}

/// `wan-tiny/dit_io`'s T2V DiT inputs written to `path` (for `v2l-run stage dit`).
fn wan_t2v_dit_inputs(path: &Path) -> PathBuf {
    let wan = tiny().join("../wan-tiny");
    let io = v2l_runtime::read_safetensors(&wan.join("dit_io.safetensors")).unwrap();
    let inputs: std::collections::BTreeMap<String, v2l_runtime::Tensor> =
        ["hidden_states", "timestep", "encoder_hidden_states"]
            .iter()
            .map(|n| (n.to_string(), io[&format!("t2v_{n}")].clone()))
            .collect();
    v2l_runtime::write_safetensors(path, &inputs).unwrap();
    path.to_path_buf()
}

/// The index of a tiny Wan DiT attention projection in the hypernetwork fixtures' layer order
/// (per block: attn1 q, k, v, out, then attn2's).
fn fixture_layer(module: &str) -> usize {
    const LEAVES: [&str; 8] = [
        "attn1.to_q",
        "attn1.to_k",
        "attn1.to_v",
        "attn1.to_out.0",
        "attn2.to_q",
        "attn2.to_k",
        "attn2.to_v",
        "attn2.to_out.0",
    ];
    let (block, leaf) = module
        .strip_prefix("blocks.")
        .unwrap()
        .split_once('.')
        .unwrap();
    block.parse::<usize>().unwrap() * 8 + LEAVES.iter().position(|n| *n == leaf).unwrap()
}

/// The tiny Wan T2V pipeline (with the umT5-shaped tokenizer) exported by `v2l-export pipeline`
/// into `<dir>/engine`.
fn export_wan_t2v_with_tokenizer(dir: &Path) -> PathBuf {
    let model = dir.join("model");
    common::wan_model_dir(
        &model,
        &[
            ("transformer", "transformer"),
            ("vae", "vae"),
            ("scheduler_unipc", "scheduler"),
            ("text_encoder", "text_encoder"),
            ("tokenizer", "tokenizer"),
        ],
    );
    let engine = dir.join("engine");
    run_ok(
        "v2l-export",
        &[
            "pipeline",
            model.to_str().unwrap(),
            "-o",
            engine.to_str().unwrap(),
        ],
    );
    engine
}

/// Prompt2Effect through the CLI on the tiny Wan T2V pipeline: `v2l-export prompt2effect`
/// adds the hypernetwork to the export; `v2l-lora predict --effect-embeds` streams the DiT's 16
/// attention weights through it in chunks and writes the reproduction's LoRA (fixture
/// `wan-tiny/prompt2effect_io`); the DiT with it gives the reproduction's output; two effects
/// blend exactly; `--effect TEXT` runs the engine's umT5 and generates with `v2l-run --effect`,
/// bitwise the video of the same LoRA given as a file. Bad calls fail cleanly.
#[test]
fn prompt2effect_predicts_blends_and_generates_through_the_cli() {
    use v2l_runtime::lora::format::read;
    let wan = tiny().join("../wan-tiny");
    let io = v2l_runtime::read_safetensors(&wan.join("prompt2effect_io.safetensors")).unwrap();
    let d = tempfile::tempdir().unwrap();
    let engine = export_wan_t2v_with_tokenizer(d.path());
    let e = engine.to_str().unwrap();
    // Before the hypernetwork is exported: a clean error saying how to add it.
    let lora0 = d.path().join("p0.safetensors");
    let o = run(
        "v2l-lora",
        &[
            "predict",
            "--engine",
            e,
            "--effect",
            "x",
            "-o",
            lora0.to_str().unwrap(),
        ],
    );
    assert_clean_failure(&o, "v2l-export prompt2effect");
    run_ok(
        "v2l-export",
        &[
            "prompt2effect",
            wan.join("prompt2effect").to_str().unwrap(),
            "-o",
            e,
        ],
    );

    // The fixture's two prompts' embeddings, as files.
    let text = io["text"].as_f32("text").unwrap();
    let embeds: Vec<std::path::PathBuf> = (0..2)
        .map(|p| {
            let n = 512 * 32;
            let t = v2l_runtime::Tensor::f32(vec![1, 512, 32], text[p * n..(p + 1) * n].to_vec());
            let path = d.path().join(format!("effect{p}.safetensors"));
            let m = std::collections::BTreeMap::from([("prompt_embeds".to_string(), t)]);
            v2l_runtime::write_safetensors(&path, &m).unwrap();
            path
        })
        .collect();
    let (e0, e1) = (embeds[0].to_str().unwrap(), embeds[1].to_str().unwrap());
    let l0 = lora0.to_str().unwrap();
    run_ok(
        "v2l-lora",
        &[
            "predict",
            "--engine",
            e,
            "--effect-embeds",
            e0,
            "--effect-chunk",
            "5",
            "-o",
            l0,
        ],
    );
    let (got, want) = (
        read(&lora0, None).unwrap(),
        read(&wan.join("prompt2effect/lora_prompt0.safetensors"), None).unwrap(),
    );
    assert_eq!(got.layers.len(), 16);
    for w in &want.layers {
        let g = got.layers.iter().find(|l| l.module == w.module).unwrap();
        for (x, y, f) in [(&g.a, &w.a, "lora_A"), (&g.b, &w.b, "lora_B")] {
            let err = v2l_runtime::tensor::rel_l2(&x.to_f32(), &y.to_f32());
            assert!(err < SAME_F32_REL_L2, "{} {f}: {err}", w.module);
        }
        assert_eq!(g.scale(1.0), 1.0);
    }

    // Compiled into an engine bundle, the hypernetwork comes along and predicts the same LoRA.
    let bundle = d.path().join("bundle");
    run_ok("v2l-compile", &[e, "-o", bundle.to_str().unwrap()]);
    let from_bundle = d.path().join("p0-bundle.safetensors");
    run_ok(
        "v2l-lora",
        &[
            "predict",
            "--engine",
            bundle.to_str().unwrap(),
            "--effect-embeds",
            e0,
            "-o",
            from_bundle.to_str().unwrap(),
        ],
    );
    assert_eq!(read(&from_bundle, None).unwrap(), got, "bundle vs export");

    // The DiT with the predicted LoRA gives the reproduction's output.
    let inp = wan_t2v_dit_inputs(&d.path().join("in.safetensors"));
    let res = d.path().join("out.safetensors");
    let o = stage_dit(
        e,
        inp.to_str().unwrap(),
        res.to_str().unwrap(),
        &["--lora", l0],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let out = v2l_runtime::read_safetensors(&res).unwrap();
    let err = out["sample"].rel_l2(&io["dit_sample_with_lora"]);
    // The same DiT with the reproduction's own factors: what the DiT alone contributes.
    let upstream = wan.join("prompt2effect/lora_prompt0.safetensors");
    let o = stage_dit(
        e,
        inp.to_str().unwrap(),
        res.to_str().unwrap(),
        &["--lora", upstream.to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let base =
        v2l_runtime::read_safetensors(&res).unwrap()["sample"].rel_l2(&io["dit_sample_with_lora"]);
    eprintln!("DiT with the predicted LoRA: {err:.3e}; with the upstream factors: {base:.3e}");
    // The factors are within 7e-7 (above); this LoRA moves the tiny DiT's output by 125 %, and
    // the DiT amplifies the factors' f32 rounding ~20×: the end-to-end f32 bound, 1e-4.
    assert!(
        base < SAME_F32_REL_L2 && err < F32_REL_L2,
        "DiT with the effect LoRA: {err}"
    );

    // Two effects at 0.5 each: ΔW = 0.5·ΔW₀ + 0.5·ΔW₁, the reproduction's updates.
    let blend = d.path().join("blend.safetensors");
    run_ok(
        "v2l-lora",
        &[
            "predict",
            "--engine",
            e,
            "--effect-embeds",
            e0,
            "--effect-embeds",
            e1,
            "--effect-weights",
            "0.5,0.5",
            "-o",
            blend.to_str().unwrap(),
        ],
    );
    let delta = io["delta_weight"].as_f32("delta").unwrap();
    for l in &read(&blend, None).unwrap().layers {
        assert_eq!(l.rank(), 8);
        let i = fixture_layer(&l.module);
        let one = 24 * 24;
        let want: Vec<f32> = (0..one)
            .map(|k| 0.5 * delta[i * one + k] + 0.5 * delta[16 * one + i * one + k])
            .collect();
        let got = lora_update(l, 0..l.rank());
        let got: Vec<f32> = got.iter().map(|&v| v as f32).collect();
        let err = v2l_runtime::tensor::rel_l2(&got, &want);
        assert!(err < SAME_F32_REL_L2, "{}: {err}", l.module);
    }

    // From text: the engine's tokenizer and umT5, then generation with the effect.
    let fox = d.path().join("fox.safetensors");
    run_ok(
        "v2l-lora",
        &[
            "predict",
            "--engine",
            e,
            "--effect",
            "a fox made of gold",
            "-o",
            fox.to_str().unwrap(),
        ],
    );
    let e2e = v2l_runtime::read_safetensors(&wan.join("e2e_io.safetensors")).unwrap();
    let gen_in = d.path().join("gen.safetensors");
    let m: std::collections::BTreeMap<String, v2l_runtime::Tensor> = [
        ("prompt_embeds", "t2v_prompt_embeds"),
        ("negative_prompt_embeds", "t2v_negative_prompt_embeds"),
        ("initial_noise", "t2v_noise"),
    ]
    .iter()
    .map(|(k, f)| (k.to_string(), e2e[*f].clone()))
    .collect();
    v2l_runtime::write_safetensors(&gen_in, &m).unwrap();
    let generate = |extra: &[&str], name: &str| {
        let dump = d.path().join(format!("{name}.safetensors"));
        let video = d.path().join(format!("{name}.mp4"));
        let mut args = vec![
            "--engine",
            e,
            "--prompt-embeds",
            gen_in.to_str().unwrap(),
            "--noise",
            gen_in.to_str().unwrap(),
            "--frames",
            "9",
            "--height",
            "32",
            "--width",
            "48",
            "--steps",
            "2",
            "--guidance",
            "5",
            "-o",
            video.to_str().unwrap(),
            "--dump",
            dump.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let o = run("v2l-run", &args);
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        v2l_runtime::read_safetensors(&dump)
            .unwrap()
            .remove("frames")
            .unwrap()
    };
    let by_effect = generate(&["--effect", "a fox made of gold"], "by-effect");
    let by_file = generate(&["--lora", fox.to_str().unwrap()], "by-file");
    let plain = generate(&[], "plain");
    assert_eq!(
        by_effect, by_file,
        "--effect and its LoRA file give one video"
    );
    assert_ne!(by_effect, plain, "the effect changes the video");

    // Bad calls.
    let o = run(
        "v2l-lora",
        &[
            "predict",
            "--engine",
            e,
            "--effect",
            "a",
            "--effect",
            "b",
            "--effect-weights",
            "1",
            "-o",
            l0,
        ],
    );
    assert_clean_failure_with(&o, 2, "--effect-weights has 1 values for 2 effects");
    let narrow = d.path().join("narrow.safetensors");
    let t = v2l_runtime::Tensor::f32(vec![1, 3, 16], vec![0.5; 48]);
    v2l_runtime::write_safetensors(
        &narrow,
        &std::collections::BTreeMap::from([("prompt_embeds".to_string(), t)]),
    )
    .unwrap();
    let o = run(
        "v2l-lora",
        &[
            "predict",
            "--engine",
            e,
            "--effect-embeds",
            narrow.to_str().unwrap(),
            "-o",
            l0,
        ],
    );
    assert_clean_failure(&o, "[1, tokens, 32]");
}

/// LoFA through the CLI on the tiny Wan T2V pipeline: `v2l-export lofa` adds both stages;
/// `v2l-lora predict --lofa-embeds` (stage 1, the fp16 round trip, stage 2, streamed in chunks)
/// writes ΔW = alpha·B·A of the authors' modules (fixture `wan-tiny/lofa_io`), with and
/// without the round trip; `--lofa TEXT` runs from the prompt.
#[test]
fn lofa_predicts_through_the_cli() {
    use v2l_runtime::lora::format::read;
    let wan = tiny().join("../wan-tiny");
    let io = v2l_runtime::read_safetensors(&wan.join("lofa_io.safetensors")).unwrap();
    let d = tempfile::tempdir().unwrap();
    let engine = export_wan_t2v_with_tokenizer(d.path());
    let e = engine.to_str().unwrap();
    let (s1, s2) = (wan.join("lofa/stage1"), wan.join("lofa/stage2"));
    run_ok(
        "v2l-export",
        &["lofa", s1.to_str().unwrap(), s2.to_str().unwrap(), "-o", e],
    );
    let text = d.path().join("p0.safetensors");
    let m = std::collections::BTreeMap::from([(
        "prompt_embeds".to_string(),
        io["p0.text_emb"].clone(),
    )]);
    v2l_runtime::write_safetensors(&text, &m).unwrap();
    for (extra, want) in [
        (None, "p0.delta_W"),
        (Some("--no-fp16-prior"), "p0.nort.delta_W"),
    ] {
        let out = d.path().join("lofa.safetensors");
        let mut args = vec![
            "predict",
            "--engine",
            e,
            "--effect-embeds",
            text.to_str().unwrap(),
            "--hypernet",
            "lofa",
            "--effect-chunk",
            "3",
            "-o",
            out.to_str().unwrap(),
        ];
        args.extend(extra);
        run_ok("v2l-lora", &args);
        let lora = read(&out, None).unwrap();
        assert_eq!(lora.layers.len(), 16);
        // Over the stack of 16 updates (the fixture's tensor): with the round trip, an element
        // of stage 1 on an fp16 rounding boundary may round the other way than upstream's, so
        // one layer alone can be 1e-5 off; the stack is 4e-6.
        let delta = io[want].as_f32("dW").unwrap();
        let one = 24 * 24;
        let mut got = vec![0f32; 16 * one];
        for l in &lora.layers {
            let i = fixture_layer(&l.module);
            for (g, v) in got[i * one..(i + 1) * one]
                .iter_mut()
                .zip(lora_update(l, 0..l.rank()))
            {
                *g = v as f32;
            }
        }
        let err = v2l_runtime::tensor::rel_l2(&got, delta);
        assert!(err < SAME_F32_REL_L2, "{want}: {err}");
    }
    let out = d.path().join("wave.safetensors");
    run_ok(
        "v2l-lora",
        &[
            "predict",
            "--engine",
            e,
            "--lofa",
            "a person waving",
            "-o",
            out.to_str().unwrap(),
        ],
    );
    assert_eq!(read(&out, None).unwrap().layers.len(), 16);

    // LoFA's response map: fuse only |ΔW| > τ·|W|. τ 0 is the full fuse; the paper's τ 0.02
    // keeps most of the effect with part of the entries (measured, printed).
    let inp = wan_t2v_dit_inputs(&d.path().join("dit_in.safetensors"));
    let base = wan.join("transformer");
    let sample = |tau: Option<&str>, name: &str| {
        let fused = d.path().join(format!("fused-{name}"));
        let mut args = vec![
            "fuse",
            "--base",
            base.to_str().unwrap(),
            "--lora",
            out.to_str().unwrap(),
            "-o",
            fused.to_str().unwrap(),
        ];
        if let Some(t) = tau {
            args.extend(["--response-tau", t]);
        }
        let o = run_ok("v2l-lora", &args);
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        let exported = d.path().join(format!("export-{name}"));
        run_ok(
            "v2l-export",
            &[
                "dit",
                fused.to_str().unwrap(),
                "-o",
                exported.to_str().unwrap(),
            ],
        );
        let res = d.path().join(format!("out-{name}.safetensors"));
        let o = stage_dit(
            exported.to_str().unwrap(),
            inp.to_str().unwrap(),
            res.to_str().unwrap(),
            &[],
        );
        assert!(o.status.success(), "{}", stderr(&o));
        let s = v2l_runtime::read_safetensors(&res)
            .unwrap()
            .remove("sample")
            .unwrap();
        (s, text)
    };
    let (full, _) = sample(None, "full");
    let (zero, _) = sample(Some("0"), "tau0");
    let (masked, text) = sample(Some("0.02"), "tau002");
    let dit_io = v2l_runtime::read_safetensors(&wan.join("dit_io.safetensors")).unwrap();
    let plain = &dit_io["t2v_sample"];
    let effect = full.rel_l2(plain);
    assert!(
        zero.rel_l2(&full) < ROUNDING_F32_REL_L2,
        "τ 0 is the full fuse"
    );
    let kept = masked.rel_l2(&full);
    eprintln!(
        "response map τ 0.02: {} ; output vs full fuse {kept:.3e}, full effect {effect:.3e}",
        text.trim()
    );
    assert!(kept < effect, "the masked fuse keeps part of the effect");
    let o = run(
        "v2l-lora",
        &[
            "fuse",
            "--base",
            base.to_str().unwrap(),
            "--lora",
            out.to_str().unwrap(),
            "--response-tau",
            "-1",
            "-o",
            d.path().join("x").to_str().unwrap(),
        ],
    );
    assert_clean_failure_with(&o, 2, "--response-tau");
}
