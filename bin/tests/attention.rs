//! v2l's attention operator in an int8 engine, as `v2l-run` runs it: bf16 where this CPU has
//! AVX512-BF16, and, where it has not (forced here by `V2L_ATTENTION=fp32`), the engine's twin
//! graphs on ONNX Runtime's f32 attention, bitwise what an engine compiled with
//! `--attention ort` computes. `v2l-run --json` says which ran.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use v2l_runtime::attention::Kernel;
use v2l_runtime::{read_safetensors, write_safetensors, Tensor};

use crate::common::{engine_with, tiny};

/// `v2l-run stage dit` on `engine`: (its JSON line, its output `sample`).
fn stage_dit(
    engine: &Path,
    inputs: &Path,
    out: &Path,
    force_fp32: bool,
) -> (serde_json::Value, Tensor) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_v2l-run"));
    c.arg("--engine")
        .arg(engine)
        .args(["stage", "dit", "--json", "--inputs"])
        .arg(inputs)
        .arg("-o")
        .arg(out);
    if force_fp32 {
        c.env("V2L_ATTENTION", "fp32");
    } else {
        c.env_remove("V2L_ATTENTION");
    }
    let o = c.output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    let json = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    (json, read_safetensors(out).unwrap()["sample"].clone())
}

#[test]
fn int8_attention_is_bf16_here_and_falls_back_to_ort_by_name() {
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

    let io = read_safetensors(&tiny().join("dit_io.safetensors")).unwrap();
    let inputs: BTreeMap<String, Tensor> = io
        .into_iter()
        .filter(|(k, _)| !k.starts_with("output"))
        .collect();
    let inp = d.path().join("in.safetensors");
    write_safetensors(&inp, &inputs).unwrap();
    let out = |n: &str| d.path().join(format!("{n}.safetensors"));

    let (j_ort, y_ort) = stage_dit(&ort, &inp, &out("ort"), false);
    assert_eq!(j_ort["attention"], "ort");
    let (j_fb, y_fb) = stage_dit(&ours, &inp, &out("fallback"), true);
    assert_eq!(j_fb["attention"], "ort (fallback: V2L_ATTENTION=fp32)");
    assert_eq!(
        y_fb, y_ort,
        "the fallback must run exactly the --attention ort graphs"
    );
    let (j, y) = stage_dit(&ours, &inp, &out("ours"), false);
    if Kernel::detect() == Kernel::Bf16 {
        assert_eq!(j["attention"], "bf16 (AVX512-BF16)");
        let e = y.rel_l2(&y_ort);
        eprintln!("int8 DiT, bf16 attention against f32 attention: rel L2 {e:.2e}");
        assert!(e > 1e-7 && e < 1e-2, "{e:.2e}");
    } else {
        eprintln!("no AVX512-BF16 here: only the fallback ran");
        assert!(
            j["attention"]
                .as_str()
                .unwrap()
                .starts_with("ort (fallback"),
            "{j}"
        );
        assert_eq!(y, y_ort);
    }
}
