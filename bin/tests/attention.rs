//! v2l's attention operator in an int8 engine, as `v2l-run` runs it: bf16 where this CPU has
//! AVX512-BF16, and, where it has not (or where `V2L_ATTENTION=fp32` forces it, which drives
//! that path on any CPU), the engine's twin graphs on ONNX Runtime's f32 attention, bitwise
//! what an engine compiled with `--attention ort` computes. `v2l-run --json` says which ran,
//! and why: the test reads the CPU's features itself to know which reason to expect.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use v2l_runtime::attention::Kernel;
use v2l_runtime::{read_safetensors, write_safetensors, Tensor};

use crate::common::{cpu_has_avx512_bf16, engine_with, run_stage, tiny};

/// `v2l-run stage dit` on `engine`: (its JSON line, its output `sample`).
fn stage_dit(
    engine: &Path,
    inputs: &Path,
    out: &Path,
    force_fp32: bool,
) -> (serde_json::Value, Tensor) {
    run_stage(
        engine,
        "dit",
        (inputs, out),
        "sample",
        ("V2L_ATTENTION", force_fp32),
    )
}

/// The fixture's DiT inputs (its outputs left out), written to `dir/in.safetensors`.
fn dit_inputs(dir: &Path) -> std::path::PathBuf {
    let io = read_safetensors(&tiny().join("dit_io.safetensors")).unwrap();
    let inputs: BTreeMap<String, Tensor> = io
        .into_iter()
        .filter(|(k, _)| !k.starts_with("output"))
        .collect();
    let inp = dir.join("in.safetensors");
    write_safetensors(&inp, &inputs).unwrap();
    inp
}

#[test]
fn int8_attention_follows_the_cpu_and_falls_back_to_ort_by_name() {
    let d = tempfile::tempdir().unwrap();
    let ours = engine_with(&d.path().join("v2l"), &["--precision", "int8"]);
    let ort = engine_with(
        &d.path().join("ort"),
        &["--precision", "int8", "--attention", "ort"],
    );
    let bundle = |e: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(e.join("bundle.json")).unwrap()).unwrap()
    };
    let (b_ours, b_ort) = (bundle(&ours), bundle(&ort));
    assert_eq!(b_ours["attention"], "bf16");
    assert!(b_ort.get("attention").is_none(), "{b_ort}");
    for v in ["int8.ort", "unfused.ort"] {
        assert!(b_ours["dit_variants"].get(v).is_some(), "{v}: {b_ours}");
    }
    let graph = std::fs::read(ours.join("dit_int8.onnx")).unwrap();
    let twin = std::fs::read(ours.join("dit_int8_ort.onnx")).unwrap();
    let has = |g: &[u8], s: &str| g.windows(s.len()).any(|w| w == s.as_bytes());
    assert!(has(&graph, "ai.v2l") && !has(&twin, "ai.v2l") && has(&twin, "MultiHeadAttention"));
    // s8 weights (the compile's scheme where this CPU has VNNI): the linears are v2l's too, and
    // the twin keeps ONNX Runtime's.
    let v2l_linears = b_ours["v2l_int8_gemm"] == true;
    assert_eq!(v2l_linears, b_ours["int8_scheme"] == "u8s8", "{b_ours}");
    assert_eq!(has(&graph, "QMatMul"), v2l_linears);
    assert!(!has(&twin, "QMatMul") && has(&twin, "DynamicQuantizeMatMul"));

    let inp = dit_inputs(d.path());
    let out = |n: &str| d.path().join(format!("{n}.safetensors"));

    let (j_ort, y_ort) = stage_dit(&ort, &inp, &out("ort"), false);
    assert_eq!(j_ort["attention"], "ort");
    // No CUDA graphs asked for, none refused.
    assert_eq!(j_ort["uncaptured_graphs"], serde_json::json!([]), "{j_ort}");
    let bf16_cpu = cpu_has_avx512_bf16();
    let (j_fb, y_fb) = stage_dit(&ours, &inp, &out("fallback"), true);
    let why = if bf16_cpu {
        "V2L_ATTENTION=fp32"
    } else {
        "this CPU has no AVX512-BF16"
    };
    assert_eq!(j_fb["attention"], format!("ort (fallback: {why})"));
    assert!(j_ort["int8_gemm"].is_null(), "{j_ort}");
    if v2l_linears {
        assert_eq!(j_fb["int8_gemm"], format!("ort (fallback: {why})"));
    }
    assert_eq!(
        y_fb, y_ort,
        "the fallback must run exactly the --attention ort graphs"
    );
    let (j, y) = stage_dit(&ours, &inp, &out("ours"), false);
    assert_eq!(Kernel::detect() == Kernel::Bf16, bf16_cpu);
    // `--json` names the machine: its CPU model and the ISA flags read from it.
    let isa: Vec<&str> = j["machine"]["isa"]
        .as_array()
        .expect("machine.isa")
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert_eq!(isa.contains(&"avx512_bf16"), bf16_cpu, "{j}");
    assert!(
        !j["machine"]["cpu"].as_str().unwrap_or("").is_empty(),
        "{j}"
    );
    if bf16_cpu {
        assert_eq!(j["attention"], "bf16 (AVX512-BF16)");
        if v2l_linears {
            assert_eq!(j["int8_gemm"], "v2l (AVX512-VNNI)");
        }
        let e = y.rel_l2(&y_ort);
        eprintln!("int8 DiT, bf16 attention against f32 attention: rel L2 {e:.2e}");
        assert!(e > 1e-7 && e < 1e-2, "{e:.2e}");
    } else {
        eprintln!("no AVX512-BF16 here: only the fallback ran");
        assert_eq!(
            j["attention"],
            "ort (fallback: this CPU has no AVX512-BF16)"
        );
        assert_eq!(y, y_ort);
    }
}

/// Whether this CPU has AVX512-VNNI and AVX512-BF16, read here rather than from the runtime.
fn cpu_has_int8_attention() -> bool {
    #[cfg(target_arch = "x86_64")]
    return cpu_has_avx512_bf16() && std::arch::is_x86_feature_detected!("avx512vnni");
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// `v2l-compile --attention int8`: the bundle says `int8`, the operator carries
/// `scores = "int8"`, and `v2l-run` runs the int8 kernel where this CPU has AVX512-VNNI and
/// AVX512-BF16 (within 1e-2 of the same engine on ONNX Runtime's f32 attention, and not equal
/// to the bf16 kernel's output), the bf16 kernel with BF16 alone, the ORT twins with neither;
/// `--json` names which ran. An fp32 engine refuses `--attention int8`.
#[test]
fn int8_scores_attention_runs_where_the_cpu_has_vnni_and_says_so() {
    let d = tempfile::tempdir().unwrap();
    let int8 = engine_with(
        &d.path().join("i8"),
        &["--precision", "int8", "--attention", "int8"],
    );
    let bf16 = engine_with(&d.path().join("bf"), &["--precision", "int8"]);
    let b: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(int8.join("bundle.json")).unwrap()).unwrap();
    assert_eq!(b["attention"], "int8");
    let graph = std::fs::read(int8.join("dit_int8.onnx")).unwrap();
    assert!(
        graph.windows(6).any(|w| w == b"scores"),
        "no `scores` attribute"
    );

    let inp = dit_inputs(d.path());
    let out = |n: &str| d.path().join(format!("{n}.safetensors"));
    let (j, y) = stage_dit(&int8, &inp, &out("int8"), false);
    let (_, y_ort) = stage_dit(&int8, &inp, &out("ort"), true);
    let (_, y_bf16) = stage_dit(&bf16, &inp, &out("bf16"), false);
    match (cpu_has_int8_attention(), cpu_has_avx512_bf16()) {
        (true, _) => {
            assert_eq!(j["attention"], "int8 (AVX512-VNNI and AVX512-BF16)");
            let e = y.rel_l2(&y_ort);
            eprintln!("int8 DiT, int8 attention against f32 attention: rel L2 {e:.2e}");
            assert!(e > 1e-7 && e < 1e-2, "{e:.2e}");
            assert_ne!(
                y, y_bf16,
                "the int8 kernel ran the bf16 kernel's arithmetic"
            );
        }
        (false, true) => {
            assert_eq!(j["attention"], "bf16 (AVX512-BF16)");
            assert_eq!(y, y_bf16);
        }
        (false, false) => {
            assert_eq!(
                j["attention"],
                "ort (fallback: this CPU has no AVX512-BF16)"
            );
            assert_eq!(y, y_ort);
        }
    }
    let o = Command::new(env!("CARGO_BIN_EXE_v2l-compile"))
        .arg(d.path().join("i8").join("export"))
        .args(["-o"])
        .arg(d.path().join("fp32"))
        .args(["--attention", "int8"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("--attention int8") && err.contains("below fp32"),
        "{err}"
    );
}
