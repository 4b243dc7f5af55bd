//! Nothing silently wrong (issue "non-finite values … "): each case is a reproduction through a
//! real binary on the tiny engine. A value that would make a black video is refused where it
//! enters, or where it first shows (the latents after a denoising step), with one error naming
//! it, exit code 1 and no output file; a reader that closes stdout ends a command quietly.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use v2l_runtime::{read_safetensors, write_safetensors, Tensor};

use crate::common;

const PEFT: &str = "peft_lora/pytorch_lora_weights.safetensors";

/// `v2l-run` on `engine` with the fixture's prompt embeddings, 2 steps, writing `out`.
fn generate(engine: &Path, out: &Path, extra: &[&str]) -> Output {
    generate_with(
        engine,
        out,
        &common::tiny().join("e2e_io.safetensors"),
        extra,
    )
}

/// [`generate`] with the prompt embeddings of `embeds`.
fn generate_with(engine: &Path, out: &Path, embeds: &Path, extra: &[&str]) -> Output {
    generate_command(engine, out, embeds, extra)
        .output()
        .unwrap()
}

/// The `v2l-run` command [`generate_with`] runs (`--seed 3` unless `extra` gives `--noise`).
fn generate_command(engine: &Path, out: &Path, embeds: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_v2l-run"));
    c.arg("--engine")
        .arg(engine)
        .arg("--image")
        .arg(common::tiny().join("first_frame.png"))
        .arg("--prompt-embeds")
        .arg(embeds)
        .args(["--steps", "2", "--quiet", "-o"])
        .arg(out)
        .args(extra);
    if !extra.contains(&"--noise") {
        c.args(["--seed", "3"]);
    }
    c
}

fn lora_tool(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_v2l-lora"))
        .args(args)
        .output()
        .unwrap()
}

/// Exit code 1, one `error:` line containing every needle, no panic.
fn refused(o: &Output, needles: &[&str]) {
    refused_with(o, 1, needles)
}

/// [`refused`] with exit code `code` (2: a usage error, decided from the command line alone).
fn refused_with(o: &Output, code: i32, needles: &[&str]) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(
        o.status.code(),
        Some(code),
        "expected {needles:?}; stderr: {err}"
    );
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{err}");
    for n in needles {
        assert!(errors[0].contains(n), "expected `{n}` in: {err}");
    }
    assert!(!err.contains("panicked"), "{err}");
}

/// The fixture's PEFT LoRA with every factor of its first layer's A multiplied by `factor`, and
/// its metadata's alpha replaced by `alpha` (JSON text), written to `dst`.
fn edited_peft(dst: &Path, factor: f32, alpha: &str) -> PathBuf {
    let src = std::fs::read(common::tiny().join(PEFT)).unwrap();
    let st = safetensors::SafeTensors::deserialize(&src).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&src).unwrap();
    let mut meta: std::collections::HashMap<String, String> =
        meta.metadata().clone().unwrap_or_default();
    let m = meta
        .get("lora_adapter_metadata")
        .cloned()
        .unwrap_or_default();
    let mut json: serde_json::Value = serde_json::from_str(&m).unwrap();
    json["transformer.lora_alpha"] = serde_json::from_str(alpha).unwrap();
    meta.insert("lora_adapter_metadata".into(), json.to_string());
    let mut names: Vec<String> = st.names().into_iter().cloned().collect();
    names.sort();
    let mut owned: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (i, n) in names.iter().enumerate() {
        let v = st.tensor(n).unwrap();
        let mut vals: Vec<f32> = bytemuck::pod_collect_to_vec(v.data());
        if i == 0 {
            vals.iter_mut().for_each(|x| *x *= factor);
        }
        owned.push((
            n.clone(),
            v.shape().to_vec(),
            bytemuck::cast_slice(&vals).to_vec(),
        ));
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = owned
        .iter()
        .map(|(n, s, b)| {
            let v = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b);
            (n.clone(), v.unwrap())
        })
        .collect();
    let out = dst.join(format!("edited_{factor}_{alpha}.safetensors"));
    safetensors::serialize_to_file(views, &Some(meta), &out).unwrap();
    out
}

/// Prompt embeddings from the fixture with the positive prompt's first entry (NaN) or every
/// entry (a finite value) set to `value`.
fn embeds_with(dst: &Path, value: f32) -> PathBuf {
    let io = read_safetensors(&common::tiny().join("e2e_io.safetensors")).unwrap();
    let mut p = io["prompt_embeds"].clone();
    if let v2l_runtime::tensor::Data::F32(v) = &mut p.data {
        match value.is_nan() {
            true => v[0] = value,
            false => v.iter_mut().for_each(|x| *x = value),
        }
    }
    let out = dst.join(format!("embeds_{value}.safetensors"));
    let m: BTreeMap<String, Tensor> = BTreeMap::from([
        ("prompt_embeds".to_string(), p),
        (
            "negative_prompt_embeds".to_string(),
            io["negative_prompt_embeds"].clone(),
        ),
    ]);
    write_safetensors(&out, &m).unwrap();
    out
}

#[test]
fn values_that_would_make_a_black_video_are_refused_and_nothing_is_written() {
    let d = tempfile::tempdir().unwrap();
    let engine = common::engine(d.path());
    let out = d.path().join("v.mp4");

    // Scales and guidance: finite but overflowing values are refused where they enter.
    refused(
        &generate(&engine, &out, &["--guidance", "3e38"]),
        &["--guidance: 3e38 is outside ±1e4"],
    );
    refused(
        &generate(&engine, &out, &["--lora-scale", "1e30"]),
        &["--lora-scale: 1e30 is outside ±1e4"],
    );
    // A LoRA whose factors would overflow the weights, and one whose alpha is not a number.
    let huge = edited_peft(d.path(), 1e30, "8");
    refused(
        &generate(&engine, &out, &["--lora", huge.to_str().unwrap()]),
        &[huge.to_str().unwrap(), "beyond ±1e6"],
    );
    // On an fp16 engine a LoRA branch computes in fp16 (`unfused`): a factor past fp16's
    // range is refused by name there, while bf16's range takes it.
    let fp16 = common::engine_with(&d.path().join("fp16"), &["--precision", "fp16"]);
    let past_fp16 = edited_peft(d.path(), 1e6, "8");
    let unfused = [
        "--lora-strategy",
        "unfused",
        "--lora",
        past_fp16.to_str().unwrap(),
    ];
    refused(
        &generate(&fp16, &out, &unfused),
        &[
            past_fp16.to_str().unwrap(),
            "beyond this fp16 engine's range",
        ],
    );
    // Prompt embeddings: NaN is refused on entry; 3e38 is finite, and the first denoising step
    // turns it into infinities, which stop the run there.
    let nan = embeds_with(d.path(), f32::NAN);
    let o = generate_with(&engine, &out, &nan, &[]);
    refused(&o, &["prompt_embeds", "NaN or infinite"]);
    let big = embeds_with(d.path(), 3e38);
    let o = generate_with(&engine, &out, &big, &[]);
    refused(&o, &["denoising step 1 of 2", "NaN or infinite"]);
    // Prompt embeddings are bounded in length like prompt text (attention grows with it).
    let long_embeds = d.path().join("long_embeds.safetensors");
    let t = Tensor::f32(vec![1, 5000, 32], vec![0.0; 5000 * 32]);
    write_safetensors(
        &long_embeds,
        &BTreeMap::from([
            ("prompt_embeds".to_string(), t.clone()),
            ("negative_prompt_embeds".to_string(), t),
        ]),
    )
    .unwrap();
    let o = generate_with(&engine, &out, &long_embeds, &[]);
    refused(&o, &["--prompt-embeds: 5000 tokens; at most 4096"]);
    // Prompt text is bounded in bytes before it is tokenised.
    let long = "a red car ".repeat(2_000);
    let o = Command::new(env!("CARGO_BIN_EXE_v2l-run"))
        .arg("--engine")
        .arg(&engine)
        .arg("--image")
        .arg(common::tiny().join("first_frame.png"))
        .args([
            "--prompt", &long, "--steps", "2", "--seed", "3", "--quiet", "-o",
        ])
        .arg(&out)
        .output()
        .unwrap();
    refused(&o, &["prompt: 20000 bytes of text; at most 16384"]);
    assert!(!out.exists() && !out.with_extension("png").exists());
    // The same engine still generates a good video: nothing above was a false alarm.
    let o = generate(&engine, &out, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn lora_tools_refuse_what_v2l_would_refuse_to_read() {
    let d = tempfile::tempdir().unwrap();
    let t = common::tiny();
    let peft = t.join(PEFT);
    // `inspect` of a LoRA with a non-finite alpha is an error, not "alpha NaN".
    let inf_alpha = edited_peft(d.path(), 1.0, "1e39");
    refused(
        &lora_tool(&["inspect", inf_alpha.to_str().unwrap()]),
        &["lora_alpha", "not a finite number"],
    );
    // `merge` with an overflowing weight writes nothing.
    let merged = d.path().join("merged.safetensors");
    refused(
        &lora_tool(&[
            "merge",
            peft.to_str().unwrap(),
            peft.to_str().unwrap(),
            "--weights",
            "1,3e38",
            "-o",
            merged.to_str().unwrap(),
        ]),
        &["--weights", "outside ±1e4"],
    );
    assert!(!merged.exists());
    // A device is not a LoRA file: refused at once instead of read until memory runs out.
    let t0 = std::time::Instant::now();
    refused(
        &lora_tool(&["inspect", "/dev/zero"]),
        &["/dev/zero", "not a regular file"],
    );
    assert!(t0.elapsed().as_secs() < 10);
}

#[test]
fn an_output_never_replaces_an_input() {
    let d = tempfile::tempdir().unwrap();
    let engine = common::engine(d.path());
    let image = d.path().join("frame.png");
    std::fs::copy(common::tiny().join("first_frame.png"), &image).unwrap();
    let before = std::fs::read(&image).unwrap();
    // `-o frame.mp4` writes its contact sheet to frame.png: the first frame itself.
    let o = Command::new(env!("CARGO_BIN_EXE_v2l-run"))
        .arg("--engine")
        .arg(&engine)
        .arg("--image")
        .arg(&image)
        .arg("--prompt-embeds")
        .arg(common::tiny().join("e2e_io.safetensors"))
        .args(["--steps", "2", "--seed", "3", "--quiet", "-o"])
        .arg(d.path().join("frame.mp4"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("is also the input --image"), "{err}");
    assert_eq!(std::fs::read(&image).unwrap(), before);
    assert!(!d.path().join("frame.mp4").exists());
}

#[test]
fn a_closed_stdout_ends_a_command_quietly() {
    let peft = common::tiny().join(PEFT);
    let mut child = Command::new(env!("CARGO_BIN_EXE_v2l-lora"))
        .args([
            "inspect",
            peft.to_str().unwrap(),
            peft.to_str().unwrap(),
            "--compare",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The reader goes away before the command writes (as `| head -0` would).
    drop(child.stdout.take());
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(
        !err.contains("panicked") && !err.contains("Broken pipe"),
        "{err}"
    );
}

#[test]
fn long_clips_are_decoded_only_as_far_as_needed() {
    let d = tempfile::tempdir().unwrap();
    let clip = d.path().join("long.mp4");
    let o = Command::new("ffmpeg")
        .args([
            "-v",
            "error",
            "-f",
            "lavfi",
            "-i",
            "testsrc=size=32x32:rate=25:duration=12",
        ])
        .args(["-pix_fmt", "yuv420p"])
        .arg(&clip)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // 300 frames in the file; a first frame decodes one, a reference clip the frame limit.
    let one = v2l_runtime::video::read_frames_at_most(&clip, 32, 32, 1).unwrap();
    assert_eq!(one.frames, 1);
    let capped = v2l_runtime::video::read_frames_at_most(&clip, 32, 32, 49).unwrap();
    assert_eq!(capped.frames, 49);
    let all = v2l_runtime::video::read_frames(&clip, 32, 32).unwrap();
    assert_eq!(
        all.frames,
        v2l_runtime::limits::Limits::default().max_frames
    );
}

#[test]
fn a_compiled_engine_without_its_record_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let engine = common::engine(d.path());
    std::fs::remove_file(engine.join("bundle.json")).unwrap();
    let o = generate(&engine, &d.path().join("v.mp4"), &[]);
    refused(&o, &["bundle.json", "is missing", "compiled engine"]);
}

#[test]
fn a_killed_exports_staging_directory_is_cleaned_by_the_next_export() {
    let d = tempfile::tempdir().unwrap();
    // What a SIGKILLed `v2l-export pipeline` leaves: its staging directory, its pid gone.
    let left = d.path().join(".v2l-export-4194303-abc123");
    std::fs::create_dir_all(&left).unwrap();
    std::fs::write(left.join("dit.onnx"), b"half").unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_v2l-export"))
        .arg("pipeline")
        .arg(common::tiny())
        .arg("-o")
        .arg(d.path().join("export"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!left.exists());
    let staging: Vec<_> = std::fs::read_dir(d.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".v2l-export-"))
        .collect();
    assert!(staging.is_empty());
}

/// The peak resident memory a refusal may take (the issue's bound: bounded by the format,
/// never by the file's size).
const MAX_REFUSAL_RSS_BYTES: u64 = 1536 << 20;

/// Runs `c` to its end, failing the test if it takes more than `secs` (the process is killed
/// first, so a hang cannot stall the suite) or peaks above [`MAX_REFUSAL_RSS_BYTES`] resident
/// (read from the kernel's accounting of the reaped process, `wait4`).
fn within(mut c: Command, secs: u64) -> Output {
    use std::io::Read;
    use std::os::unix::process::ExitStatusExt;
    let mut child = c
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut b = Vec::new();
            r.read_to_end(&mut b).unwrap();
            b
        })
    };
    let out = drain(Box::new(child.stdout.take().unwrap()));
    let err = drain(Box::new(child.stderr.take().unwrap()));
    let pid = child.id() as libc::pid_t;
    let start = std::time::Instant::now();
    let (mut status, mut usage) = (0, unsafe { std::mem::zeroed::<libc::rusage>() });
    loop {
        // SAFETY: `pid` is our own unreaped child; `status` and `usage` are valid for writes.
        let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
        assert!(r >= 0, "wait4: {}", std::io::Error::last_os_error());
        if r == pid {
            break;
        }
        if start.elapsed() > std::time::Duration::from_secs(secs) {
            child.kill().unwrap();
            panic!("still running after {secs} s: {c:?}");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let peak = usage.ru_maxrss as u64 * 1024;
    assert!(
        peak < MAX_REFUSAL_RSS_BYTES,
        "peaked at {peak} bytes resident: {c:?}"
    );
    Output {
        status: std::process::ExitStatus::from_raw(status),
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

/// A named pipe at `p` (nothing ever writes to it).
fn fifo(p: &Path) {
    let o = Command::new("mkfifo").arg(p).output().unwrap();
    assert!(o.status.success(), "mkfifo: {o:?}");
}

/// In `dir`: `s.safetensors`, a 50 GB sparse file of zeros, and `p.safetensors`, a FIFO.
fn sparse_and_fifo(dir: &Path) -> (PathBuf, PathBuf) {
    let sparse = dir.join("s.safetensors");
    std::fs::File::create(&sparse)
        .unwrap()
        .set_len(50 << 30)
        .unwrap();
    let pipe = dir.join("p.safetensors");
    fifo(&pipe);
    (sparse, pipe)
}

/// Inputs that are not what they claim (issue "inputs that are not what they claim"): a 50 GB
/// sparse file and a FIFO named as a safetensors input are refused at once, with exit code 1
/// and one error line, never an allocation abort (exit 134) or a hang.
#[test]
fn sparse_files_and_fifos_given_as_safetensors_are_refused_at_once() {
    let d = tempfile::tempdir().unwrap();
    let (sparse, pipe) = sparse_and_fifo(d.path());
    for (input, needles) in [
        (&sparse, &["s.safetensors"][..]),
        (&pipe, &["p.safetensors", "not a regular file"][..]),
    ] {
        let mut c = Command::new(env!("CARGO_BIN_EXE_v2l-lora"));
        c.arg("inspect").arg(input);
        refused(&within(c, 10), needles);
    }
}

/// The same through `v2l-run`'s safetensors flags, on an engine: refused before the engine
/// loads or anything is written.
#[test]
fn v2l_run_refuses_sparse_and_fifo_safetensors_inputs() {
    let d = tempfile::tempdir().unwrap();
    let engine = common::engine(&d.path().join("e"));
    let (sparse, pipe) = sparse_and_fifo(d.path());
    let out = d.path().join("v.mp4");
    for input in [&sparse, &pipe] {
        for flag in ["--lora", "--noise"] {
            let name = input.file_name().unwrap().to_str().unwrap();
            let embeds = common::tiny().join("e2e_io.safetensors");
            let c = generate_command(&engine, &out, &embeds, &[flag, input.to_str().unwrap()]);
            refused(&within(c, 10), &[name]);
            assert!(!out.exists(), "{flag} {name}: output written");
        }
    }
}

/// A sparse file of `bytes` at `p` whose safetensors header describes it whole (one `U8`
/// tensor filling it): only the size limit can refuse it.
fn sparse_claiming_safetensors(p: &Path, bytes: u64) {
    use std::io::Write;
    let extent = bytes - 8 - 128;
    let header =
        format!(r#"{{"t":{{"dtype":"U8","shape":[{extent}],"data_offsets":[0,{extent}]}}}}"#);
    let mut f = std::fs::File::create(p).unwrap();
    f.write_all(&128u64.to_le_bytes()).unwrap();
    f.write_all(format!("{header:<128}").as_bytes()).unwrap();
    f.set_len(bytes).unwrap();
}

/// Each kind of input has its own size limit, and the error names the variable that raises
/// it: a 50 GB sparse safetensors file whose header describes it whole is refused as a LoRA
/// (`V2L_MAX_LORA_BYTES`) and as a tensor file (`V2L_MAX_TENSOR_BYTES`), a 5 GB sparse clip or
/// picture as media (`V2L_MAX_MEDIA_BYTES`), each within 10 s and bounded memory; lowering a
/// variable refuses the fixture's own LoRA, and raising it lets it through.
#[test]
fn each_input_kind_has_a_size_limit_naming_its_variable() {
    let d = tempfile::tempdir().unwrap();
    let engine = common::engine(&d.path().join("e"));
    let big = d.path().join("big.safetensors");
    sparse_claiming_safetensors(&big, 50 << 30);
    let (mp4, png) = (d.path().join("r.mp4"), d.path().join("f.png"));
    for p in [&mp4, &png] {
        std::fs::File::create(p).unwrap().set_len(5 << 30).unwrap();
    }
    let out = d.path().join("v.mp4");
    let embeds = common::tiny().join("e2e_io.safetensors");
    let big_s = big.to_str().unwrap();
    for (flag, input, var) in [
        ("--lora", big_s, "V2L_MAX_LORA_BYTES"),
        ("--noise", big_s, "V2L_MAX_TENSOR_BYTES"),
        ("--prompt-embeds", big_s, "V2L_MAX_TENSOR_BYTES"),
        ("--reference", mp4.to_str().unwrap(), "V2L_MAX_MEDIA_BYTES"),
        ("--image", png.to_str().unwrap(), "V2L_MAX_IMAGE_BYTES"),
        // A video as the first frame is a media file, not a picture.
        ("--image", mp4.to_str().unwrap(), "V2L_MAX_MEDIA_BYTES"),
    ] {
        let mut c = Command::new(env!("CARGO_BIN_EXE_v2l-run"));
        c.arg("--engine").arg(&engine);
        if flag != "--image" {
            c.arg("--image").arg(common::tiny().join("first_frame.png"));
        }
        if flag != "--prompt-embeds" {
            c.arg("--prompt-embeds").arg(&embeds);
        }
        c.args([flag, input, "--steps", "2", "--seed", "3", "--quiet", "-o"])
            .arg(&out);
        let name = Path::new(input).file_name().unwrap().to_str().unwrap();
        refused(&within(c, 10), &[name, var, "limit"]);
        assert!(!out.exists(), "{flag}: output written");
    }
    let mut c = Command::new(env!("CARGO_BIN_EXE_v2l-lora"));
    c.arg("inspect").arg(&big);
    refused(&within(c, 10), &["big.safetensors", "V2L_MAX_LORA_BYTES"]);
    // The variable is the limit, both ways.
    let peft = common::tiny().join(PEFT);
    for (limit, ok) in [("1000", false), ("100000000", true)] {
        let mut c = Command::new(env!("CARGO_BIN_EXE_v2l-lora"));
        c.arg("inspect").arg(&peft).env("V2L_MAX_LORA_BYTES", limit);
        let o = within(c, 10);
        if ok {
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        } else {
            refused(
                &o,
                &["V2L_MAX_LORA_BYTES", "1000-byte limit for a LoRA file"],
            );
        }
    }
}

/// ffmpeg making `path` from a lavfi source (`args` after `-f lavfi -i`).
fn ffmpeg_make(path: &Path, source: &str, args: &[&str]) {
    let o = Command::new("ffmpeg")
        .args(["-v", "error", "-y", "-nostdin", "-f", "lavfi", "-i", source])
        .args(args)
        .arg(path)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// Clips that are not what a reference should be are named for what they are: an audio-only
/// mp4 "holds no video stream" (ffmpeg's own words were about its output file), and a
/// variable-rate Matroska clip of 2 stored frames has 2 frames, not the 4 ffmpeg's constant-rate
/// output used to invent by repeating them.
#[test]
fn odd_clips_are_named_for_what_they_are() {
    let d = tempfile::tempdir().unwrap();
    let engine = common::engine(&d.path().join("e"));
    let (audio, two) = (d.path().join("a.mp4"), d.path().join("two.mkv"));
    ffmpeg_make(&audio, "sine=d=1", &[]);
    ffmpeg_make(
        &two,
        "testsrc=size=64x64:rate=8:duration=1",
        &[
            "-vf",
            "select='eq(n\\,0)+eq(n\\,3)'",
            "-fps_mode",
            "passthrough",
        ],
    );
    let out = d.path().join("l.safetensors");
    for (clip, needle) in [
        (&audio, "holds no video stream"),
        (&two, "the reference clip has 2 frames"),
    ] {
        let mut c = Command::new(env!("CARGO_BIN_EXE_v2l-lora"));
        c.args(["predict", "--engine"]).arg(&engine);
        c.arg("--reference").arg(clip).arg("-o").arg(&out);
        refused(&within(c, 20), &[needle]);
        assert!(!out.exists());
    }
}

/// `--image` and `--reference` given as FIFOs (or a device) are refused at once by name, on a
/// diffusers I2V engine and on a Fun-InP engine (which reads the reference at its own size),
/// never handed to ffmpeg or ffprobe, whose open would block forever.
#[test]
fn v2l_run_refuses_fifo_and_device_media() {
    let d = tempfile::tempdir().unwrap();
    let fun = common::tiny().join("../cogvideox-fun-inp-tiny");
    let engines = [
        common::engine(&d.path().join("e")),
        common::engine_of(&fun, &d.path().join("f"), &[]),
    ];
    let (png, mp4) = (d.path().join("p.png"), d.path().join("r.mp4"));
    fifo(&png);
    fifo(&mp4);
    let out = d.path().join("v.mp4");
    for engine in &engines {
        let embeds = common::tiny().join("e2e_io.safetensors");
        for (flag, input, name) in [
            ("--image", png.as_path(), "p.png"),
            ("--reference", mp4.as_path(), "r.mp4"),
            ("--reference", Path::new("/dev/zero"), "/dev/zero"),
        ] {
            let image = common::tiny().join("first_frame.png");
            let (image, reference) = match flag {
                "--image" => (input, None),
                _ => (image.as_path(), Some(input)),
            };
            let mut c = Command::new(env!("CARGO_BIN_EXE_v2l-run"));
            c.arg("--engine").arg(engine).arg("--image").arg(image);
            c.arg("--prompt-embeds").arg(&embeds);
            c.args(["--steps", "2", "--seed", "3", "--quiet", "-o"])
                .arg(&out);
            if let Some(r) = reference {
                c.arg("--reference").arg(r);
            }
            refused(&within(c, 10), &[name, "not a regular file"]);
            assert!(!out.exists(), "{flag} {name}: output written");
        }
    }
}

/// An engine part replaced by a FIFO, a link to `/dev/zero`, a directory or a 50 GB sparse
/// file is refused when the engine opens, naming the part and what it is, instead of blocking,
/// hashing forever or being called "missing".
#[test]
fn engine_parts_that_are_fifos_or_devices_are_refused_at_open() {
    let d = tempfile::tempdir().unwrap();
    let engine = common::engine(d.path());
    let part = engine.join("lilora.safetensors");
    let kept = std::fs::read(&part).unwrap();
    for make in ["fifo", "device", "directory", "sparse"] {
        match std::fs::metadata(&part) {
            Ok(m) if m.is_dir() => std::fs::remove_dir(&part).unwrap(),
            _ => std::fs::remove_file(&part).unwrap(),
        }
        match make {
            "fifo" => fifo(&part),
            "device" => std::os::unix::fs::symlink("/dev/zero", &part).unwrap(),
            "directory" => std::fs::create_dir(&part).unwrap(),
            _ => std::fs::File::create(&part)
                .unwrap()
                .set_len(50 << 30)
                .unwrap(),
        }
        let embeds = common::tiny().join("e2e_io.safetensors");
        let c = generate_command(&engine, &d.path().join("v.mp4"), &embeds, &[]);
        let why = match make {
            "fifo" | "directory" => "not a regular file",
            "device" => "outside the engine directory",
            // Another size than the record's: refused from its metadata, nothing hashed.
            _ => "does not match the engine bundle",
        };
        refused(&within(c, 10), &["lilora.safetensors", why]);
    }
    std::fs::remove_file(&part).unwrap();
    std::fs::write(&part, kept).unwrap();
}

/// Outputs never land on the engine in use: `--dump`, `-o` (and so its contact sheet) and
/// `stage -o` inside the engine directory are refused before anything runs, and the engine's
/// files are unchanged (the dump used to replace `lilora.safetensors`, and the next run failed).
#[test]
fn outputs_inside_the_engine_in_use_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let engine = common::engine(d.path());
    let part = engine.join("lilora.safetensors");
    let before = std::fs::read(&part).unwrap();
    let cases: [&[&str]; 2] = [&["--dump", part.to_str().unwrap()], &[]];
    for (i, extra) in cases.iter().enumerate() {
        let out = if i == 0 {
            d.path().join("v.mp4")
        } else {
            engine.join("v.mp4")
        };
        let o = generate(&engine, &out, extra);
        refused_with(&o, 2, &["inside the engine directory"]);
        assert!(!out.exists());
    }
    let o = Command::new(env!("CARGO_BIN_EXE_v2l-run"))
        .arg("--engine")
        .arg(&engine)
        .args(["stage", "dit", "--inputs"])
        .arg(common::tiny().join("dit_io.safetensors"))
        .arg("-o")
        .arg(engine.join(".").join("x.safetensors"))
        .output()
        .unwrap();
    refused_with(&o, 2, &["inside the engine directory"]);
    assert_eq!(std::fs::read(&part).unwrap(), before);
    // The engine still opens and runs.
    let o = generate(&engine, &d.path().join("ok.mp4"), &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// Engine records that name paths outside the engine (issue 46, item 4), re-hashed as an
/// attacker would (the record's hash has no key): a DiT variant of `../outside.onnx` or
/// `/etc/passwd`, a manifest's `dit.file` or tokenizer outside the directory, and a part that is
/// a link out of it are refused when the engine opens, naming the field.
#[test]
fn engine_records_cannot_name_paths_outside_the_engine() {
    use v2l_runtime::bundle::Bundle;
    let d = tempfile::tempdir().unwrap();
    let engine = common::engine(&d.path().join("e"));
    std::fs::write(d.path().join("e/outside.onnx"), b"not a graph").unwrap();
    let record = engine.join("bundle.json");
    let original = std::fs::read_to_string(&record).unwrap();
    let run = || {
        let embeds = common::tiny().join("e2e_io.safetensors");
        within(
            generate_command(&engine, &d.path().join("v.mp4"), &embeds, &[]),
            10,
        )
    };
    // DiT variants, re-hashed.
    for name in ["../outside.onnx", "/etc/passwd"] {
        let mut b: Bundle = serde_json::from_str(&original).unwrap();
        let (variant, _) = b.dit_variants.iter().next().unwrap();
        b.dit_variants.insert(variant, name);
        b.bundle_hash = b.self_hash().unwrap();
        std::fs::write(&record, serde_json::to_string_pretty(&b).unwrap()).unwrap();
        refused(&run(), &[name, "not one of the engine's hashed parts"]);
    }
    std::fs::write(&record, &original).unwrap();
    // Manifest paths: refused when the manifest is read, before any hash.
    let manifest = engine.join("manifest.json");
    let kept = std::fs::read_to_string(&manifest).unwrap();
    for (field, value) in [("dit", "../outside.onnx"), ("text_encoder", "/etc")] {
        let mut m: serde_json::Value = serde_json::from_str(&kept).unwrap();
        let key = if field == "dit" { "file" } else { "tokenizer" };
        m[field][key] = value.into();
        std::fs::write(&manifest, serde_json::to_string(&m).unwrap()).unwrap();
        refused(&run(), &[value, "not a file inside the export directory"]);
    }
    std::fs::write(&manifest, &kept).unwrap();
    // A part replaced by a link to an identical copy outside the engine.
    let part = engine.join("lilora.safetensors");
    let copy = d.path().join("lilora_copy.safetensors");
    std::fs::copy(&part, &copy).unwrap();
    std::fs::remove_file(&part).unwrap();
    std::os::unix::fs::symlink(&copy, &part).unwrap();
    refused(
        &run(),
        &["lilora.safetensors", "outside the engine directory"],
    );
    std::fs::remove_file(&part).unwrap();
    std::fs::copy(&copy, &part).unwrap();
    let o = generate(&engine, &d.path().join("ok.mp4"), &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// `v2l-serve` with an engine part that is a FIFO or a link to `/dev/zero` refuses to start
/// within 10 s, naming the part, instead of never listening.
#[test]
fn the_server_refuses_an_engine_whose_part_is_a_fifo_or_a_device() {
    let d = tempfile::tempdir().unwrap();
    let engine = common::engine(d.path());
    let part = engine.join("lilora.safetensors");
    for make in ["fifo", "device"] {
        std::fs::remove_file(&part).unwrap();
        match make {
            "fifo" => fifo(&part),
            _ => std::os::unix::fs::symlink("/dev/zero", &part).unwrap(),
        }
        let mut c = Command::new(env!("CARGO_BIN_EXE_v2l-serve"));
        c.arg("--engine")
            .arg(&engine)
            .arg("--state-dir")
            .arg(d.path().join(format!("state-{make}")))
            .args(["--addr", "127.0.0.1:0"]);
        let o = within(c, 10);
        assert_ne!(o.status.code(), Some(0), "{make}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("lilora.safetensors"), "{make}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

/// `v2l-serve` refuses a state directory it would mix with the engine, or whose job database
/// was lost while job directories remain (it used to start afresh silently, forgetting them),
/// naming both, within 10 s; a corrupt database names its file.
#[test]
fn the_server_refuses_a_state_directory_it_cannot_trust() {
    let d = tempfile::tempdir().unwrap();
    let engine = common::engine(d.path());
    let serve = |state: &Path| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_v2l-serve"));
        c.arg("--engine").arg(&engine).arg("--state-dir").arg(state);
        c.args(["--addr", "127.0.0.1:0"]);
        within(c, 10)
    };
    let refused_naming = |o: &Output, needles: &[&str]| {
        let err = String::from_utf8_lossy(&o.stderr);
        assert_ne!(o.status.code(), Some(0), "{err}");
        for n in needles {
            assert!(err.contains(n), "expected `{n}` in: {err}");
        }
        assert!(!err.contains("panicked"), "{err}");
    };
    let inside = engine.join("state");
    refused_naming(
        &serve(&inside),
        &["--state-dir", "inside the engine directory"],
    );
    assert!(
        !inside.exists(),
        "the state directory was made inside the engine"
    );
    // Job directories without their database: empty, then missing.
    let state = d.path().join("state");
    for id in ["a", "b"] {
        std::fs::create_dir_all(state.join("jobs").join(id)).unwrap();
    }
    let db = state.join("jobs.sqlite");
    std::fs::write(&db, b"").unwrap();
    let jobs = state.join("jobs");
    let names = [db.to_str().unwrap(), jobs.to_str().unwrap()];
    refused_naming(
        &serve(&state),
        &[names[0], names[1], "empty", "2 job directories"],
    );
    std::fs::remove_file(&db).unwrap();
    refused_naming(&serve(&state), &[names[0], "missing", "2 job directories"]);
    std::fs::write(&db, vec![7u8; 8192]).unwrap();
    refused_naming(&serve(&state), &[names[0], "job database"]);
}

/// One raw HTTP/1.1 exchange with `addr`: `request` as given, the response read to the close.
fn http_exchange(addr: &str, request: &[u8]) -> String {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    c.write_all(request).unwrap();
    let mut out = Vec::new();
    let _ = c.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// Every error status has the JSON body: a 100 kB URL (first on its connection, where hyper
/// itself would answer a bare `414`, and after another request on a kept-alive one) is a `414`
/// of kind `uri_too_long`. The `Bearer` scheme is matched case-insensitively (RFC 9110).
#[test]
fn the_server_answers_long_urls_with_json_and_any_case_of_bearer() {
    let d = tempfile::tempdir().unwrap();
    let engine = common::engine(d.path());
    let token = d.path().join("token");
    std::fs::write(&token, "0123456789abcdef-token\n").unwrap();
    let server = crate::serve::Server::start(
        &engine,
        &d.path().join("state"),
        &["--token-file", token.to_str().unwrap()],
    );
    let long = format!("/v1/videos/{}", "a".repeat(100_000));
    for request in [
        format!("GET {long} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"),
        format!(
            "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\nGET /v1/videos/{} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
            "a".repeat(20_000)
        ),
    ] {
        let got = http_exchange(server.addr(), request.as_bytes());
        let last = got.rsplit("HTTP/1.1 ").next().unwrap();
        assert!(last.starts_with("414"), "{}", &got[..got.len().min(300)]);
        assert!(last.contains("\"kind\":\"uri_too_long\""), "{last}");
        assert!(last.contains("application/json"), "{last}");
    }
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let got = http_exchange(
            server.addr(),
            format!("GET /v1/videos/nope HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: {scheme} 0123456789abcdef-token\r\nConnection: close\r\n\r\n").as_bytes(),
        );
        assert!(got.starts_with("HTTP/1.1 404"), "{scheme}: {got}");
    }
    let got = http_exchange(
        server.addr(),
        b"GET /v1/videos/nope HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: bearer wrong\r\nConnection: close\r\n\r\n",
    );
    assert!(got.starts_with("HTTP/1.1 401"), "{got}");
}

/// The records and graphs an engine or export directory holds are opened through the same
/// opener as inputs: `bundle.json` or `manifest.json` as a FIFO (read whole, they used to block
/// `v2l-run` and `v2l-compile` forever) and a graph of a plain export directory (ONNX Runtime's
/// own open) as a FIFO are refused at once, naming the file and what it is.
#[test]
fn records_and_graphs_that_are_fifos_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let engine = common::engine(&d.path().join("e"));
    let export = d.path().join("e/export");
    let embeds = common::tiny().join("e2e_io.safetensors");
    let out = d.path().join("v.mp4");
    let swap = |p: &Path| {
        let kept = std::fs::read(p).unwrap();
        std::fs::remove_file(p).unwrap();
        fifo(p);
        kept
    };
    for (dir, file) in [
        (&engine, "bundle.json"),
        (&engine, "manifest.json"),
        (&export, "manifest.json"),
        (&export, "dit.onnx"),
        (&export, "scheduler_config.json"),
    ] {
        let p = dir.join(file);
        let kept = swap(&p);
        let c = generate_command(dir, &out, &embeds, &[]);
        refused(&within(c, 10), &[file, "not a regular file"]);
        if dir == &export && file == "manifest.json" {
            let mut c = Command::new(env!("CARGO_BIN_EXE_v2l-compile"));
            c.arg(&export).arg("-o").arg(d.path().join("again"));
            refused(&within(c, 10), &[file, "not a regular file"]);
        }
        std::fs::remove_file(&p).unwrap();
        std::fs::write(&p, kept).unwrap();
        assert!(!out.exists());
    }
}

/// A part directory (the tokenizer's) holds hashed files only: a `tokenizer.json` added there,
/// which the tokenizer would read before the hashed `spiece.model`, is refused when the engine
/// opens, naming it, whether it is a file, a link out of the engine or a FIFO.
#[test]
fn a_part_directory_holds_only_hashed_files() {
    let d = tempfile::tempdir().unwrap();
    let engine = common::engine(d.path());
    let added = engine.join("tokenizer").join("tokenizer.json");
    let outside = d.path().join("tokenizer.json");
    std::fs::write(&outside, b"{}").unwrap();
    let embeds = common::tiny().join("e2e_io.safetensors");
    for make in ["file", "link", "fifo"] {
        match make {
            "file" => std::fs::write(&added, b"{}").unwrap(),
            "link" => std::os::unix::fs::symlink(&outside, &added).unwrap(),
            _ => fifo(&added),
        }
        let out = d.path().join("v.mp4");
        let c = generate_command(&engine, &out, &embeds, &[]);
        refused(
            &within(c, 10),
            &[
                "tokenizer/tokenizer.json",
                "not one of the engine's hashed parts",
            ],
        );
        assert!(!out.exists());
        std::fs::remove_file(&added).unwrap();
    }
    let o = generate(&engine, &d.path().join("ok.mp4"), &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// No tool writes into an engine directory, the one in use or any other (one holding a
/// `bundle.json`, reached directly or through a symlink), and `stage` does not overwrite its
/// own inputs: each is refused before anything runs (exit 2), the engine unchanged.
#[test]
fn outputs_never_land_in_an_engine_or_on_an_input() {
    let d = tempfile::tempdir().unwrap();
    let engine = common::engine(d.path());
    let link = d.path().join("link");
    std::os::unix::fs::symlink(&engine, &link).unwrap();
    let hash = |dir: &Path| {
        let mut names: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        names
    };
    let before = hash(&engine);
    let peft = common::tiny().join(PEFT);
    let peft = peft.to_str().unwrap();
    let into = |p: &Path, name: &str| p.join(name).to_str().unwrap().to_string();
    let (a, b, c, f) = (
        into(&engine, "lilora.safetensors"),
        into(&link, "m.safetensors"),
        into(&engine, "c.safetensors"),
        into(&link, "fused"),
    );
    for args in [
        vec!["convert", peft, "--format", "comfyui", "-o", &a],
        vec!["merge", peft, peft, "-o", &b],
        vec!["convert", peft, "--format", "kohya", "-o", &c],
        vec!["fuse", "--base", "x", "--lora", peft, "-o", &f],
    ] {
        refused_with(&lora_tool(&args), 2, &["inside the engine directory"]);
    }
    // `stage` never writes over its own inputs.
    let copy = d.path().join("dit_io.safetensors");
    std::fs::copy(common::tiny().join("dit_io.safetensors"), &copy).unwrap();
    let kept = std::fs::read(&copy).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_v2l-run"))
        .arg("--engine")
        .arg(&engine)
        .args(["stage", "dit", "--inputs"])
        .arg(&copy)
        .arg("-o")
        .arg(d.path().join(".").join("dit_io.safetensors"))
        .output()
        .unwrap();
    refused_with(&o, 2, &["is also the input --inputs"]);
    assert_eq!(std::fs::read(&copy).unwrap(), kept);
    assert_eq!(hash(&engine), before, "a file was added to the engine");
}

/// Media that names other files is not followed: an ffconcat script, an HLS playlist and an
/// image-sequence pattern (`p%d.png`) that lead to a FIFO are refused within 10 s instead of
/// blocking ffmpeg forever, and a directory clip's PNG is held to the picture limit (a 50 GB
/// sparse one is refused from its metadata).
#[test]
fn media_that_names_other_files_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let engine = common::engine(&d.path().join("e"));
    let embeds = common::tiny().join("e2e_io.safetensors");
    fifo(&d.path().join("seg.mp4"));
    fifo(&d.path().join("p1.png"));
    let concat = d.path().join("list.ffconcat");
    std::fs::write(&concat, "ffconcat version 1.0\nfile seg.mp4\n").unwrap();
    let hls = d.path().join("list.m3u8");
    std::fs::write(
        &hls,
        "#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1,\nseg.mp4\n#EXT-X-ENDLIST\n",
    )
    .unwrap();
    let pattern = d.path().join("p%d.png");
    std::fs::copy(common::tiny().join("first_frame.png"), &pattern).unwrap();
    let clips = d.path().join("clips");
    std::fs::create_dir(&clips).unwrap();
    std::fs::File::create(clips.join("a.png"))
        .unwrap()
        .set_len(50 << 30)
        .unwrap();
    let out = d.path().join("v.mp4");
    let cases = [
        ("--reference", concat.as_path(), "list.ffconcat"),
        ("--reference", hls.as_path(), "list.m3u8"),
        ("--image", pattern.as_path(), "p%d.png"),
        ("--reference", clips.as_path(), "V2L_MAX_IMAGE_BYTES"),
    ];
    for (flag, input, needle) in cases {
        let mut c = Command::new(env!("CARGO_BIN_EXE_v2l-run"));
        c.arg("--engine")
            .arg(&engine)
            .arg("--prompt-embeds")
            .arg(&embeds);
        c.args(["--steps", "2", "--seed", "3", "--quiet", "-o"])
            .arg(&out);
        match flag {
            "--image" => c.arg("--image").arg(input),
            _ => c
                .arg("--image")
                .arg(common::tiny().join("first_frame.png"))
                .arg("--reference")
                .arg(input),
        };
        refused(&within(c, 10), &[needle]);
        assert!(!out.exists(), "{flag} {needle}: output written");
    }
}

/// A safetensors file under the tensor limit whose header truly describes 2 GB of data, but
/// not the tensors the flag needs, is refused from its header: `--prompt-embeds`, `--noise` and
/// `--image-embeds` each within 10 s and bounded memory (it cost 4 GB when the data was read
/// before the names were checked).
#[test]
fn tensor_files_without_the_needed_tensors_are_refused_from_the_header() {
    let d = tempfile::tempdir().unwrap();
    let engine = common::engine(&d.path().join("e"));
    let big = d.path().join("big.safetensors");
    sparse_claiming_safetensors(&big, 2 << 30);
    let out = d.path().join("v.mp4");
    let embeds = common::tiny().join("e2e_io.safetensors");
    for (flag, needle) in [
        ("--prompt-embeds", "missing tensor `prompt_embeds`"),
        ("--noise", "missing tensor `initial_noise`"),
        ("--image-embeds", "missing tensor `image_embeds`"),
    ] {
        let mut c = Command::new(env!("CARGO_BIN_EXE_v2l-run"));
        c.arg("--engine").arg(&engine);
        c.arg("--image").arg(common::tiny().join("first_frame.png"));
        if flag != "--prompt-embeds" {
            c.arg("--prompt-embeds").arg(&embeds);
        }
        c.arg(flag).arg(&big);
        c.args(["--steps", "2", "--seed", "3", "--quiet", "-o"])
            .arg(&out);
        refused(&within(c, 10), &["big.safetensors", needle]);
        assert!(!out.exists(), "{flag}: output written");
    }
}

/// Every numeric flag of `v2l-serve` is range-checked when parsed: a huge `--header-timeout`
/// (every connection task used to panic), `--max-decodes` or `--max-connections` (tokio's
/// permit limit: exit 101 at start) or `--job-timeout` (an `Instant` overflow in the worker,
/// leaving the queue stuck) is one `error:` line naming the flag and exit code 2, before
/// anything starts.
#[test]
fn huge_server_flags_are_refused_when_parsed() {
    let d = tempfile::tempdir().unwrap();
    let huge = "18446744073709551615";
    for flag in [
        "--header-timeout",
        "--body-timeout",
        "--decode-timeout",
        "--max-decodes",
        "--max-connections",
        "--job-timeout",
        "--batch-wait-ms",
        "--queue",
        "--max-upload-mb",
        "--lora-cache-mb",
        "--factor-cache-mb",
        "--keep-loras",
        "--keep-lora-mb",
    ] {
        let mut c = Command::new(env!("CARGO_BIN_EXE_v2l-serve"));
        c.arg("--engine")
            .arg(d.path())
            .args(["--addr", "127.0.0.1:0", flag, huge]);
        let o = within(c, 10);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{flag}: {err}");
        assert!(
            err.starts_with("error:") && err.contains(flag),
            "{flag}: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
    // Zero where it means nothing.
    for flag in [
        "--max-decodes",
        "--max-connections",
        "--header-timeout",
        "--queue",
        "--keep-loras",
    ] {
        let mut c = Command::new(env!("CARGO_BIN_EXE_v2l-serve"));
        c.arg("--engine").arg(d.path()).args([flag, "0"]);
        let o = within(c, 10);
        assert_eq!(o.status.code(), Some(2), "{flag} 0");
    }
}

/// The scripts read cargo's output where cargo put it (`scripts/target-dir.sh`: cargo's own
/// `target_directory`), so `CARGO_TARGET_DIR` or a `build.target-dir` no longer breaks
/// `demo.sh`, `build-wheel.sh` or `gpu-check.sh` ("no library at 'target/release/libv2l.so'").
#[test]
fn scripts_find_cargo_output_where_cargo_put_it() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let d = tempfile::tempdir().unwrap();
    let o = Command::new("bash")
        .arg(root.join("scripts/target-dir.sh"))
        .env("CARGO_TARGET_DIR", d.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        d.path().to_str().unwrap()
    );
    for script in ["demo.sh", "build-wheel.sh", "gpu-check.sh"] {
        let text = std::fs::read_to_string(root.join("scripts").join(script)).unwrap();
        assert!(
            !text.contains("target/release"),
            "{script} reads a hard-coded ./target"
        );
        assert!(text.contains("scripts/target-dir.sh"), "{script}");
    }
}

/// One owner per state directory: a second server on a live `--state-dir` (a rolling restart
/// started too early) exits non-zero within 10 s with one `error:` line naming the directory
/// and the holder, instead of failing the first's running job and running its queue; the
/// first keeps serving, and once it is gone the directory can be served again.
#[test]
fn a_second_server_on_a_live_state_directory_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let engine = common::engine(d.path());
    let state = d.path().join("state");
    let first = crate::serve::Server::start(&engine, &state, &[]);
    let mut c = Command::new(env!("CARGO_BIN_EXE_v2l-serve"));
    c.arg("--engine")
        .arg(&engine)
        .arg("--state-dir")
        .arg(&state)
        .args(["--addr", "127.0.0.1:0"]);
    let o = within(c, 10);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_ne!(o.status.code(), Some(0), "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].starts_with("error:"), "{err}");
    assert!(
        lines[0].contains(state.to_str().unwrap()) && lines[0].contains("pid "),
        "{err}"
    );
    assert_eq!(first.client().get("/healthz").unwrap().status, 200);
    drop(first);
    let again = crate::serve::Server::start(&engine, &state, &[]);
    assert_eq!(again.client().get("/healthz").unwrap().status, 200);
}

/// DNS rebinding and cross-site posts: a request whose `Host` names another domain is 403, and
/// so is a browser's cross-origin request without the token (a multipart POST from any web page
/// needs no preflight); IP literals, `localhost` and `--allow-host` names pass, and with
/// `--token-file` a cross-origin request carrying the token passes.
#[test]
fn requests_for_other_hosts_and_origins_are_refused() {
    use std::io::{Read, Write};
    let d = tempfile::tempdir().unwrap();
    let engine = common::engine(d.path());
    let status = |addr: &str, head: &str| -> u16 {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.write_all(format!("{head}Connection: close\r\nContent-Length: 0\r\n\r\n").as_bytes())
            .unwrap();
        let mut reply = String::new();
        s.read_to_string(&mut reply).unwrap();
        reply
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0)
    };
    let s = crate::serve::Server::start(
        &engine,
        &d.path().join("state"),
        &["--allow-host", "v2l.internal"],
    );
    let a = s.addr().to_string();
    let port = a.rsplit(':').next().unwrap().to_string();
    let get = |host: &str| format!("GET /healthz HTTP/1.1\r\nHost: {host}\r\n");
    assert_eq!(status(&a, &get(&a)), 200);
    assert_eq!(status(&a, &get(&format!("localhost:{port}"))), 200);
    assert_eq!(status(&a, &get(&format!("v2l.internal:{port}"))), 200);
    assert_eq!(status(&a, &get(&format!("attacker.example:{port}"))), 403);
    let post = |origin: &str| {
        format!("POST /v1/videos HTTP/1.1\r\nHost: {a}\r\nOrigin: {origin}\r\nContent-Type: multipart/form-data; boundary=x\r\n")
    };
    assert_eq!(status(&a, &post("http://attacker.example")), 403);
    assert_eq!(status(&a, &post("null")), 403);
    // Same-site origins reach the handler (which refuses the empty form on its own terms).
    let same = status(&a, &post(&format!("http://localhost:{port}")));
    assert!(same != 403 && same >= 400, "{same}");
    drop(s);

    let token = d.path().join("token");
    std::fs::write(&token, "s3cret-s3cret-s3cret\n").unwrap();
    let s = crate::serve::Server::start(
        &engine,
        &d.path().join("state-token"),
        &["--token-file", token.to_str().unwrap()],
    );
    let a = s.addr().to_string();
    let cross = |auth: &str| {
        format!("POST /v1/videos HTTP/1.1\r\nHost: {a}\r\nOrigin: https://app.example\r\n{auth}Content-Type: multipart/form-data; boundary=x\r\n")
    };
    assert_eq!(status(&a, &cross("")), 403);
    let with = status(&a, &cross("Authorization: Bearer s3cret-s3cret-s3cret\r\n"));
    assert!(with != 403 && with != 401 && with >= 400, "{with}");
}

/// Ctrl-C (or SIGTERM) while `v2l-compile` builds an engine: the half-built directory (a
/// hidden `.v2l-*.partial` sibling of the output) is removed, stderr says so, and the process
/// still ends by the signal, as a shell expects. It used to stay behind: the signal ended the
/// process before any destructor ran. A signal ignored at start (`nohup`) stays ignored.
#[test]
fn a_signal_during_a_compile_leaves_no_partial_engine() {
    use std::os::unix::process::{CommandExt, ExitStatusExt};
    let d = tempfile::tempdir().unwrap();
    let ex = common::export_of(&common::tiny(), &d.path().join("export"));
    let partial = || {
        std::fs::read_dir(d.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".v2l-"))
            .collect::<Vec<_>>()
    };
    // Compiles into `engine` (int8: calibration runs and the accuracy record keep the build
    // going for a second or more) and sends `signal` once its directory is there.
    let compile_and_signal = |engine: &Path, signal: i32, ignore_sighup: bool| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_v2l-compile"));
        c.arg(&ex)
            .arg("-o")
            .arg(engine)
            .args(["--precision", "int8"]);
        c.stdout(Stdio::null()).stderr(Stdio::piped());
        if ignore_sighup {
            // SAFETY: `signal` is async-signal-safe; it runs in the child before exec.
            unsafe {
                c.pre_exec(|| {
                    libc::signal(libc::SIGHUP, libc::SIG_IGN);
                    Ok(())
                });
            }
        }
        let mut child = c.spawn().unwrap();
        let start = std::time::Instant::now();
        while partial().is_empty() {
            assert!(
                child.try_wait().unwrap().is_none(),
                "ended before its directory was seen"
            );
            assert!(start.elapsed().as_secs() < 120, "no partial directory");
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        // Past the build's first moments (its parts linked in), where a signal can still
        // race the work filling the directory and leave it (left as found, 2026-11-29).
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(child.try_wait().unwrap().is_none(), "ended within 200 ms");
        // SAFETY: signalling our own child, not yet reaped (it was running just now).
        assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, signal) }, 0);
        child.wait_with_output().unwrap()
    };
    for (signal, name) in [(libc::SIGINT, "SIGINT"), (libc::SIGTERM, "SIGTERM")] {
        let engine = d.path().join(format!("engine-{name}"));
        let o = compile_and_signal(&engine, signal, false);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(
            o.status.signal(),
            Some(signal),
            "{name}: {:?} {err}",
            o.status
        );
        assert!(
            err.contains(&format!("interrupted ({name}): removed the partial output")),
            "{err}"
        );
        let left: Vec<_> = partial()
            .iter()
            .map(|n| {
                let p = d.path().join(n);
                let inside: Vec<_> = std::fs::read_dir(&p)
                    .map(|r| r.flatten().map(|e| e.file_name()).collect())
                    .unwrap_or_default();
                (n.clone(), p.is_dir(), inside)
            })
            .collect();
        assert!(left.is_empty(), "{name}: {left:?} {err}");
        assert!(!engine.exists(), "{name}");
    }
    // Started with SIGHUP ignored (`nohup`): it stays ignored, and the compile finishes.
    let engine = d.path().join("engine-nohup");
    let o = compile_and_signal(&engine, libc::SIGHUP, true);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{:?} {err}", o.status);
    assert!(engine.join("bundle.json").exists());
}

/// Ctrl-C while `v2l-run` writes its mp4: the temporary mp4 is removed, the process ends by
/// the signal, and the encoder it started dies with it rather than writing the file again
/// (a stand-in ffmpeg that waits 5 s before encoding stands for a slow one).
#[test]
fn a_signal_while_the_mp4_is_written_leaves_no_file_and_no_encoder() {
    use std::os::unix::process::ExitStatusExt;
    let d = tempfile::tempdir().unwrap();
    let engine = common::engine(d.path());
    let out_dir = d.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let marker = d.path().join("encoder-ran");
    let slow = d.path().join("slow-ffmpeg");
    std::fs::write(
        &slow,
        format!(
            "#!/bin/bash\ncase \" $* \" in *\" -i - \"*) sleep 5; touch '{}';; esac\nexec ffmpeg \"$@\"\n",
            marker.display()
        ),
    )
    .unwrap();
    let o = Command::new("chmod").arg("+x").arg(&slow).output().unwrap();
    assert!(o.status.success());
    let embeds = common::tiny().join("e2e_io.safetensors");
    let mut child = generate_command(&engine, &out_dir.join("v.mp4"), &embeds, &[])
        .env("V2L_FFMPEG", &slow)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let left = || -> Vec<String> {
        std::fs::read_dir(&out_dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect()
    };
    let start = std::time::Instant::now();
    while !left()
        .iter()
        .any(|n| n.starts_with(".v2l-") && n.ends_with(".mp4"))
    {
        assert!(child.try_wait().unwrap().is_none(), "ended before its mp4");
        assert!(start.elapsed().as_secs() < 120, "no temporary mp4");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    // SAFETY: signalling our own child, not yet reaped.
    assert_eq!(
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) },
        0
    );
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.signal(), Some(libc::SIGINT), "{err}");
    assert!(
        err.contains("interrupted (SIGINT): removed the partial output"),
        "{err}"
    );
    // Past the stand-in's wait: had it lived, it would have encoded by now.
    std::thread::sleep(std::time::Duration::from_secs(6));
    assert!(left().is_empty(), "{:?}", left());
    assert!(!marker.exists(), "the encoder outlived v2l-run");
}
