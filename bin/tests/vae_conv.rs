//! The VAE on v2l's bf16 convolution in an int8 engine, as `v2l-run` runs it: bf16 where this
//! CPU has AVX512-BF16; where it has not (or where `V2L_CONV=fp32` forces it, which drives that
//! path on any CPU), the export's f32 graphs, bitwise what an engine compiled with
//! `--vae-conv ort` computes. Both against diffusers' VAE (fixture `vae_io`): the f32 graphs
//! within f32's 1e-4, the bf16 ones no further from diffusers' fp32 VAE than diffusers' own
//! VAE loaded in bf16 is (`fixtures/vae_bf16.json`, `gen/vae_bf16.py`). `v2l-run --json` says
//! which ran, and why.

use std::collections::BTreeMap;
use std::path::Path;

use v2l_runtime::{read_safetensors, write_safetensors, Tensor};

use crate::common::{cpu_has_avx512_bf16, engine_with, run_stage, tiny};

/// `v2l-run stage STAGE` on `engine` with `inputs`: (its JSON line, its output `name`).
fn stage(
    engine: &Path,
    stage: &str,
    inputs: &Path,
    out: &Path,
    name: &str,
    force_fp32: bool,
) -> (serde_json::Value, Tensor) {
    run_stage(engine, stage, (inputs, out), name, ("V2L_CONV", force_fp32))
}

/// How far diffusers' VAE loaded in bf16 is from its fp32 result on fixture `folder`'s `vae_io`
/// (`encode_posterior_mean`, `decode`): the bound for v2l's bf16 graphs.
fn diffusers_bf16(folder: &str, what: &str) -> f64 {
    let p = tiny().join("../vae_bf16.json");
    let j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
    j[folder][what].as_f64().unwrap()
}

#[test]
fn the_vae_runs_bf16_convolutions_where_the_cpu_has_them_and_the_export_graphs_elsewhere() {
    let d = tempfile::tempdir().unwrap();
    let ours = engine_with(&d.path().join("v2l"), &["--precision", "int8"]);
    let ort = engine_with(
        &d.path().join("ort"),
        &["--precision", "int8", "--vae-conv", "ort"],
    );
    let bundle = |e: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(e.join("bundle.json")).unwrap()).unwrap()
    };
    let (b_ours, b_ort) = (bundle(&ours), bundle(&ort));
    assert!(b_ort.get("vae_bf16").is_none(), "{b_ort}");
    let has = |g: &[u8], s: &str| g.windows(s.len()).any(|w| w == s.as_bytes());
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ours.join("manifest.json")).unwrap())
            .unwrap();
    for part in ["encoder", "decoder"] {
        let twin = b_ours["vae_bf16"][part].as_str().expect("vae_bf16 graphs");
        let export = manifest["vae"][part].as_str().unwrap();
        assert!(has(&std::fs::read(ours.join(twin)).unwrap(), "ai.v2l"));
        assert!(!has(&std::fs::read(ours.join(export)).unwrap(), "ai.v2l"));
        // The twin is hashed with the engine's other files.
        let files = b_ours["files"].as_array().unwrap();
        assert!(files.iter().any(|f| f["name"] == twin), "{twin}");
    }
    // The compile measured the bf16 graphs against the f32 ones on this CPU.
    let bf16_cpu = cpu_has_avx512_bf16();
    for s in ["vae_encode", "vae_decode"] {
        let a = b_ours["accuracy"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["stage"] == s)
            .unwrap_or_else(|| panic!("no {s} accuracy: {b_ours}"));
        let e = a["rel_l2"].as_f64().unwrap();
        assert!(e < 1e-2, "{s}: {e:e}");
        assert_eq!(e > 0.0, bf16_cpu, "{s}: {e:e}");
    }

    let io = read_safetensors(&tiny().join("vae_io.safetensors")).unwrap();
    let write = |name: &str| {
        let p = d.path().join(format!("{name}.in.safetensors"));
        write_safetensors(&p, &BTreeMap::from([(name.to_string(), io[name].clone())])).unwrap();
        p
    };
    let why = if bf16_cpu {
        "V2L_CONV=fp32"
    } else {
        "this CPU has no AVX512-BF16"
    };
    for (st, input, output, diffusers, bound) in [
        (
            "vae-encode",
            "video",
            "posterior_mean",
            "posterior_mean",
            diffusers_bf16("cogvideox-tiny", "encode_posterior_mean"),
        ),
        (
            "vae-decode",
            "latents",
            "sample",
            "decoded",
            diffusers_bf16("cogvideox-tiny", "decode"),
        ),
    ] {
        let inp = write(input);
        let out = |n: &str| d.path().join(format!("{st}-{n}.safetensors"));
        let (j_ort, y_ort) = stage(&ort, st, &inp, &out("ort"), output, false);
        assert_eq!(j_ort["vae_conv"], "ort");
        let (j_fb, y_fb) = stage(&ours, st, &inp, &out("fallback"), output, true);
        assert_eq!(j_fb["vae_conv"], format!("ort (fallback: {why})"));
        assert_eq!(
            y_fb, y_ort,
            "{st}: the fallback must run the export's graphs"
        );
        let f32_err = y_ort.rel_l2(&io[diffusers]);
        assert!(
            f32_err < 1e-4,
            "{st}: f32 graphs {f32_err:e} from diffusers"
        );
        let (j, y) = stage(&ours, st, &inp, &out("ours"), output, false);
        if bf16_cpu {
            assert_eq!(j["vae_conv"], "bf16 (AVX512-BF16)");
            let e = y.rel_l2(&io[diffusers]);
            eprintln!(
                "{st}: bf16 convolutions {e:.2e} from diffusers' f32 VAE (its bf16: {bound:.2e})"
            );
            assert!(
                e > 1e-6 && e < bound,
                "{st}: {e:e}, diffusers' bf16 {bound:e}"
            );
        } else {
            assert_eq!(j["vae_conv"], j_fb["vae_conv"]);
            assert_eq!(y, y_ort);
        }
    }
}

/// Wan's VAE (causal 3×3×3 convs padded by their caches, as CogVideoX's) on the same path: an
/// int8 Wan engine gets the bf16 graphs and decodes diffusers' fixture latents no further from
/// diffusers' fp32 VAE than diffusers' bf16 VAE is, and its forced fallback within f32's.
#[test]
fn a_wan_engine_gets_the_bf16_vae_too() {
    let d = tempfile::tempdir().unwrap();
    let eng = crate::common::wan_engine_with(
        d.path(),
        &[
            ("transformer", "transformer"),
            ("vae", "vae"),
            ("scheduler_unipc", "scheduler"),
        ],
        &["--precision", "int8"],
    );
    let b: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(eng.join("bundle.json")).unwrap()).unwrap();
    assert!(b["vae_bf16"]["decoder"].is_string(), "{b}");
    let io = read_safetensors(&tiny().join("../wan-tiny/vae_io.safetensors")).unwrap();
    let inp = d.path().join("latents.safetensors");
    write_safetensors(
        &inp,
        &BTreeMap::from([("latents".to_string(), io["latents"].clone())]),
    )
    .unwrap();
    let out = |n: &str| d.path().join(format!("{n}.safetensors"));
    let (_, y_fb) = stage(&eng, "vae-decode", &inp, &out("fallback"), "sample", true);
    let e = y_fb.rel_l2(&io["sample"]);
    assert!(e < 1e-4, "the f32 graphs: {e:e} from diffusers");
    let (j, y) = stage(&eng, "vae-decode", &inp, &out("ours"), "sample", false);
    if cpu_has_avx512_bf16() {
        assert_eq!(j["vae_conv"], "bf16 (AVX512-BF16)");
        let e = y.rel_l2(&io["sample"]);
        let bound = diffusers_bf16("wan-tiny", "decode");
        eprintln!("Wan vae-decode: bf16 convolutions {e:.2e} from diffusers' f32 VAE (its bf16: {bound:.2e})");
        assert!(e > 1e-6 && e < bound, "{e:e}, diffusers' bf16 {bound:e}");
    } else {
        assert_eq!(y, y_fb);
    }
}
