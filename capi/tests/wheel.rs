//! The Python wheel (`scripts/build-wheel.sh`): built from this checkout's libv2l, installed with
//! pip into a fresh venv (offline, from setup's wheelhouse `.v2l/wheels`), with no checkout on
//! `sys.path`, no `V2L_LIBRARY` and no ffmpeg on `PATH`. A 10-line script generates a video that
//! equals the C ABI's frames bitwise and writes an mp4 through imageio-ffmpeg's bundled binary.

#![allow(clippy::unwrap_used)]

use crate::common::*;

use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use v2l::*;

pub const PROMPT: &str = "A red car drives through a snowy forest at dusk.";

fn check(o: &Output, what: &str) {
    assert!(
        o.status.success(),
        "{what}: {}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Builds the wheel around the test build's libv2l into `dir`; returns its path.
pub fn build_wheel(dir: &Path) -> PathBuf {
    let o = Command::new("bash")
        .arg(workspace().join("scripts/build-wheel.sh"))
        .arg("--lib")
        .arg(lib_dir().join("libv2l.so"))
        .arg("--out")
        .arg(dir)
        .output()
        .unwrap();
    check(&o, "build-wheel.sh");
    let wheels: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "whl"))
        .collect();
    assert_eq!(wheels.len(), 1, "{wheels:?}");
    wheels[0].clone()
}

/// A fresh venv at `dir` with `wheel` installed by pip, dependencies from `.v2l/wheels` only.
/// `inherit` is a venv whose packages the new one also sees (a `.pth` line): Ray, for the Ray
/// Serve test, without copying it.
pub fn venv_with(dir: &Path, wheel: &Path, inherit: Option<&Path>) -> PathBuf {
    let o = Command::new("python3")
        .args(["-m", "venv"])
        .arg(dir)
        .output()
        .unwrap();
    check(&o, "python3 -m venv");
    let python = dir.join("bin/python");
    if let Some(parent) = inherit {
        let site = |py: &Path| {
            let o = Command::new(py)
                .args([
                    "-c",
                    "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                ])
                .output()
                .unwrap();
            PathBuf::from(String::from_utf8_lossy(&o.stdout).trim())
        };
        let parent_site = site(&parent.join("bin/python"));
        std::fs::write(
            site(&python).join("inherit.pth"),
            format!("{}\n", parent_site.display()),
        )
        .unwrap();
    }
    let o = Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-index",
            "--find-links",
        ])
        .arg(workspace().join(".v2l/wheels"))
        .arg(wheel)
        .output()
        .unwrap();
    check(&o, "pip install <wheel>");
    python
}

/// The C ABI's frames for the wheel script's request (one thread: ONNX Runtime's sums are
/// bitwise reproducible at a given thread count), with the LoRA at `lora` if any.
pub fn c_abi_frames(engine: &Path, lora: Option<&Path>) -> Vec<u8> {
    let inp = inputs();
    let mut e = std::ptr::null_mut();
    let one = V2lEngineOptions {
        threads: 1,
        device: 0,
    };
    ok(unsafe { v2l_engine_open(cpath(engine).as_ptr(), &one, &mut e) });
    let g = generator(e);
    let prompt = CString::new(PROMPT).unwrap();
    let mut p = params(&inp, 17, 2, 5);
    p.prompt_embeds = std::ptr::null();
    p.negative_prompt_embeds = std::ptr::null();
    p.prompt = prompt.as_ptr();
    if let Some(file) = lora {
        let mut l = std::ptr::null_mut();
        ok(unsafe { v2l_engine_load_lora(e, cpath(file).as_ptr(), &mut l) });
        ok(unsafe { v2l_generator_set_lora(g, l, 1.0) });
        ok(unsafe { v2l_lora_free(l) });
    }
    let frames = generate(g, &p);
    ok(unsafe { v2l_generator_free(g) });
    ok(unsafe { v2l_engine_free(e) });
    frames
}

const SCRIPT: &str = r#"
import os, sys, v2l, v2l.media
engine_dir, first_frame, prompt, out = sys.argv[1:5]
engine = v2l.Engine(engine_dir, threads=1)
generator = v2l.Generator(engine)
video = generator.generate(open(first_frame, "rb").read(), height=64, width=64, frames=17,
                           prompt=prompt, steps=2, seed=5)
v2l.media.write_mp4(video, os.path.join(out, "video.mp4"))
open(os.path.join(out, "video.rgb"), "wb").write(video.rgb)
print(v2l.library()._name, os.environ["ORT_DYLIB_PATH"], os.environ["V2L_FFMPEG"], sep="\n")
# Inputs that are not what they claim, through ctypes: a 50 GB sparse file and a FIFO as a
# LoRA, a FIFO as a reference clip. Each is a V2lError at once; the process lives on.
sparse, pipe = os.path.join(out, "sparse.safetensors"), os.path.join(out, "pipe.safetensors")
with open(sparse, "wb") as f:
    f.truncate(50 << 30)
os.mkfifo(pipe)
clip = os.path.join(out, "pipe.mp4")
os.mkfifo(clip)
for name, call in [("sparse", lambda: engine.load_lora(sparse)),
                   ("fifo", lambda: engine.load_lora(pipe)),
                   ("fifo-clip", lambda: generator.predict_lora_from_video(clip, 64, 64))]:
    try:
        call()
        print("accepted", name)
    except v2l.V2lError as e:
        print("refused", name, e.status)
# Kept factor inputs: a byte count, else ValueError before the C call.
generator.set_factor_cache(1 << 28)
try:
    generator.set_factor_cache(-1)
    print("accepted", "negative-budget")
except ValueError:
    print("refused", "negative-budget", "ValueError")
# Ctrl-C during the decode of 25 frames at 256x256 (the first frame 4x larger, nearest): a
# KeyboardInterrupt within the node in flight, not after the decode; the generator goes on.
import _thread, threading, time
small = open(first_frame, "rb").read()
big = bytes(small[((y // 4) * 64 + x // 4) * 3 + c]
            for y in range(256) for x in range(256) for c in range(3))
asked = []
def ctrl_c_in_the_decode(step, steps):
    if step == steps:
        def later():
            time.sleep(0.3)
            asked.append(time.monotonic())
            _thread.interrupt_main()
        threading.Thread(target=later, daemon=True).start()
try:
    generator.generate(big, height=256, width=256, frames=25, prompt=prompt, steps=2, seed=5,
                       progress=ctrl_c_in_the_decode)
    print("ctrl-c", "missed")
except KeyboardInterrupt:
    print("ctrl-c", "stopped", f"{time.monotonic() - asked[0]:.3f}")
again = generator.generate(small, height=64, width=64, frames=17, prompt=prompt, steps=2, seed=5)
print("after-ctrl-c", "same" if again.rgb == video.rgb else "differs")
# An exception from the call itself (ctypes raises before C, say) reaches the caller as
# itself, not as an IndexError from the helper thread's empty result.
lib = v2l.library()
real = lib.v2l_generator_generate
def broken(*args):
    raise OSError("the call failed")
lib.v2l_generator_generate = broken
try:
    generator.generate(small, height=64, width=64, frames=17, prompt=prompt, steps=2, seed=5)
    print("call-error", "missed")
except OSError as e:
    print("call-error", "raised", e)
finally:
    lib.v2l_generator_generate = real
print("alive")
"#;

#[test]
fn the_wheel_installs_into_a_fresh_venv_and_generates_the_c_abi_frames() {
    let tmp = tempfile::tempdir().unwrap();
    let wheel = build_wheel(&tmp.path().join("dist"));
    let name = wheel.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        name.starts_with("v2l-") && name.contains("-py3-none-manylinux_"),
        "{name}"
    );
    let venv = tmp.path().join("venv");
    let python = venv_with(&venv, &wheel, None);

    // auditwheel: a manylinux tag, and nothing to graft (libv2l opens ONNX Runtime at run time).
    let o = Command::new(workspace().join(".v2l/build/bin/auditwheel"))
        .arg("show")
        .arg(&wheel)
        .output()
        .unwrap();
    check(&o, "auditwheel show");
    let shown = String::from_utf8_lossy(&o.stdout).replace('\n', " ");
    assert!(
        shown.contains("consistent with the following platform tag: \"manylinux_"),
        "{shown}"
    );
    assert!(
        !shown.contains("external shared libraries are required"),
        "{shown}"
    );

    let engine = build_engine(tmp.path());
    let frame = tmp.path().join("first.rgb");
    std::fs::write(&frame, &inputs().first_frame.rgb).unwrap();
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    // Only the venv on PATH: no ffmpeg, no python3; no checkout on sys.path.
    let o = Command::new(&python)
        .args(["-c", SCRIPT])
        .arg(&engine)
        .arg(&frame)
        .arg(PROMPT)
        .arg(&out)
        .env_clear()
        .env("PATH", venv.join("bin"))
        .env("HOME", tmp.path())
        .current_dir(tmp.path())
        .output()
        .unwrap();
    check(&o, "the wheel script");
    let printed = String::from_utf8_lossy(&o.stdout);
    let lines: Vec<&str> = printed.lines().collect();
    let site = venv.join("lib");
    for (line, what) in lines.iter().zip(["libv2l", "onnxruntime", "ffmpeg"]) {
        assert!(
            line.starts_with(&*site.to_string_lossy()),
            "{what} not from the venv: {printed}"
        );
    }
    assert!(lines[2].contains("imageio_ffmpeg"), "{printed}");
    let refused: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| l.starts_with("refused ") || l.starts_with("accepted "))
        .collect();
    assert_eq!(refused.len(), 4, "{printed}");
    assert!(
        refused.iter().all(|l| l.starts_with("refused ")),
        "{printed}"
    );
    assert_eq!(lines.last(), Some(&"alive"), "{printed}");
    // Ctrl-C in the decode: raised within the node in flight (before 2026-11-29, only after the
    // whole decode, seconds on one thread), and the generator gives the same frames after.
    let stopped = lines
        .iter()
        .find_map(|l| l.strip_prefix("ctrl-c stopped "))
        .unwrap_or_else(|| panic!("no KeyboardInterrupt: {printed}"));
    let after: f64 = stopped.parse().unwrap();
    eprintln!("Ctrl-C in the decode: KeyboardInterrupt {after} s after");
    assert!(after < 0.5, "KeyboardInterrupt {after} s after Ctrl-C");
    assert!(lines.contains(&"after-ctrl-c same"), "{printed}");
    assert!(
        lines.contains(&"call-error raised the call failed"),
        "{printed}"
    );

    assert!(
        std::fs::read(out.join("video.rgb")).unwrap() == c_abi_frames(&engine, None),
        "the wheel's frames differ from the C ABI's"
    );
    // The mp4 is whole: the system ffmpeg decodes its 17 frames.
    let o = Command::new("ffmpeg")
        .args(["-v", "error", "-i"])
        .arg(out.join("video.mp4"))
        .args(["-f", "rawvideo", "-pix_fmt", "rgb24", "-"])
        .output()
        .unwrap();
    check(&o, "ffmpeg decoding the wheel's mp4");
    assert_eq!(o.stdout.len(), 17 * 64 * 64 * 3);
}
