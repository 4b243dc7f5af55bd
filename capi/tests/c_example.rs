//! examples/c/generate.c compiled with the system C compiler against libv2l.so (and libv2l.a):
//! its frames equal the Rust API's bitwise, and under valgrind it has no memory errors and leaks
//! nothing.

#![allow(clippy::unwrap_used)]

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

/// Compiles the example into `dir` with warnings as errors, against libv2l.so (with an rpath)
/// or, with `static_lib`, against libv2l.a and the system libraries Rust's std needs.
fn compile(dir: &Path, static_lib: bool) -> PathBuf {
    let exe = dir.join(if static_lib {
        "generate-static"
    } else {
        "generate"
    });
    let lib = lib_dir();
    let mut cc = Command::new(std::env::var("CC").unwrap_or_else(|_| "cc".into()));
    cc.args([
        "-std=c99",
        "-g",
        "-O1",
        "-Wall",
        "-Wextra",
        "-pedantic",
        "-Werror",
    ])
    .arg("-I")
    .arg(workspace().join("capi/include"))
    .arg(workspace().join("examples/c/generate.c"));
    if static_lib {
        cc.arg(lib.join("libv2l.a")).args([
            "-lgcc_s",
            "-lutil",
            "-lrt",
            "-lpthread",
            "-lm",
            "-ldl",
            "-lc",
        ]);
    } else {
        cc.arg("-L")
            .arg(&lib)
            .arg("-lv2l")
            .arg(format!("-Wl,-rpath,{}", lib.display()));
    }
    let out = cc
        .arg("-o")
        .arg(&exe)
        .output()
        .expect("cannot run the C compiler `cc`");
    assert!(
        out.status.success(),
        "cc failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    exe
}

fn write<T: Copy>(path: &Path, v: &[T]) {
    let bytes =
        unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) };
    std::fs::write(path, bytes).unwrap();
}

/// Writes the example's inputs for a request, and the frames the Rust API makes for it.
fn prepare(dir: &Path, engine: &Path, frames: usize, steps: usize, ref_frames: usize) -> PathBuf {
    let data = dir.join(format!("data-{frames}-{steps}"));
    std::fs::create_dir_all(&data).unwrap();
    let inp = inputs();
    let seed = 2024;
    let (l, d) = (inp.prompt.shape[1], inp.prompt.shape[2]);
    std::fs::write(
        data.join("params.txt"),
        format!("{frames} 64 64 {steps} {seed} 6.0 {l} {d} {ref_frames}\n"),
    )
    .unwrap();
    write(&data.join("first_frame.rgb"), &inp.first_frame.rgb);
    write(
        &data.join("prompt_embeds.f32"),
        inp.prompt.as_f32("p").unwrap(),
    );
    write(
        &data.join("negative_prompt_embeds.f32"),
        inp.negative.as_f32("n").unwrap(),
    );
    let reference = first_frames(&inp.reference, ref_frames);
    write(&data.join("reference.rgb"), &reference.rgb);
    let base = rust_generate(engine, &inp, frames, steps, seed, RustLora::None);
    write(&data.join("expected_base.rgb"), &base);
    let lora = rust_generate(
        engine,
        &inp,
        frames,
        steps,
        seed,
        RustLora::Reference(&reference, 1.0),
    );
    write(&data.join("expected_lora.rgb"), &lora);
    data
}

#[test]
fn c_example_frames_equal_the_rust_api_bitwise() {
    let d = tempfile::tempdir().unwrap();
    let engine = build_engine(d.path());
    let data = prepare(d.path(), &engine, 17, 4, 17);
    for static_lib in [false, true] {
        let exe = compile(d.path(), static_lib);
        let out = Command::new(&exe)
            .arg(&engine)
            .arg(&data)
            .current_dir(workspace())
            // cargo's LD_LIBRARY_PATH would win over the rpath and may hold an older libv2l.so.
            .env_remove("LD_LIBRARY_PATH")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        eprintln!(
            "{}:\n{stdout}{}",
            exe.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "the C example failed");
        assert!(
            stdout.contains("expected_base.rgb: equal, 208896 bytes"),
            "{stdout}"
        );
        assert!(
            stdout.contains("expected_lora.rgb: equal, 208896 bytes"),
            "{stdout}"
        );
        assert!(stdout.contains("step 4/4"));
        assert!(
            stdout.contains("V2L_STATUS_BUFFER_SIZE")
                && stdout.contains("V2L_STATUS_INVALID_HANDLE")
        );
    }
}

/// Valgrind memcheck on the example (5 frames, 2 steps): no errors, nothing definitely,
/// indirectly or possibly lost. ONNX Runtime's process-lifetime allocations (its environment,
/// the loaded library) are "still reachable", which is not an error. examples/c/valgrind.supp
/// suppresses errors outside v2l (a glibc loader false positive while dlopen expands
/// libonnxruntime's `$ORIGIN` RUNPATH, a self-copy memcpy inside ONNX Runtime, and an exit-time
/// race between ONNX Runtime's worker threads and its static teardown); no leak is suppressed.
#[test]
fn c_example_is_clean_under_valgrind() {
    if std::env::var_os("V2L_SKIP_VALGRIND").is_some() {
        eprintln!("V2L_SKIP_VALGRIND is set: skipped");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let engine = build_engine(d.path());
    let exe = compile(d.path(), false);
    let data = prepare(d.path(), &engine, 5, 2, 5);
    let log = d.path().join("valgrind.log");
    let out = Command::new("valgrind")
        .args([
            "--tool=memcheck",
            "--leak-check=full",
            "--show-leak-kinds=definite,indirect,possible",
            "--errors-for-leak-kinds=definite,indirect",
            "--error-exitcode=99",
            "--num-callers=40",
        ])
        .arg(format!(
            "--suppressions={}",
            workspace().join("examples/c/valgrind.supp").display()
        ))
        .arg(format!("--log-file={}", log.display()))
        .arg(&exe)
        .arg(&engine)
        .arg(&data)
        // valgrind's virtual CPU has no AVX-512, so ONNX Runtime runs other kernels there: a
        // few bytes may differ by 1 (the bitwise check is the native test above).
        .arg("1")
        .current_dir(workspace())
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .expect("cannot run valgrind (apt-get install valgrind, or set V2L_SKIP_VALGRIND=1)");
    let report = std::fs::read_to_string(&log).unwrap_or_default();
    let stdout = String::from_utf8_lossy(&out.stdout);
    // Keep the full report for reading after the run.
    let kept = Path::new(env!("CARGO_TARGET_TMPDIR")).join("c_example.valgrind.log");
    let _ = std::fs::write(&kept, &report);
    let summary: Vec<&str> = report
        .lines()
        .filter(|l| {
            [
                "ERROR SUMMARY",
                "definitely lost",
                "indirectly lost",
                "possibly lost",
                "still reachable",
                "in use at exit",
            ]
            .iter()
            .any(|k| l.contains(k))
        })
        .collect();
    eprintln!(
        "{stdout}valgrind (full log: {}):\n{}",
        kept.display(),
        summary.join("\n")
    );
    assert!(
        out.status.success(),
        "exit {:?}\n{}\n{report}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(report.contains("ERROR SUMMARY: 0 errors"), "{report}");
    assert!(
        report.contains("definitely lost: 0 bytes")
            || report.contains("All heap blocks were freed"),
        "{report}"
    );
    assert!(
        report.contains("indirectly lost: 0 bytes")
            || report.contains("All heap blocks were freed"),
        "{report}"
    );
    assert!(
        report.contains("possibly lost: 0 bytes") || report.contains("All heap blocks were freed"),
        "{report}"
    );
    assert!(
        stdout.contains("ok: frames within 1 of the expected ones"),
        "{stdout}"
    );
}
