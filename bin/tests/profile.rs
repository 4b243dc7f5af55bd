//! `v2l-run stage --profile DIR`: ONNX Runtime's per-node traces of the stage's sessions, and
//! where the time went by operator and provider, the GPU check's way to find a slow stage.

use std::collections::BTreeMap;
use std::process::Command;

use v2l_runtime::{read_safetensors, write_safetensors, Tensor};

use crate::common;

#[test]
fn a_profiled_stage_says_where_its_time_went() {
    let d = tempfile::tempdir().unwrap();
    let engine = common::engine(d.path());
    let io = read_safetensors(&common::tiny().join("vae_io.safetensors")).unwrap();
    let latents = d.path().join("latents.safetensors");
    let feed: BTreeMap<String, Tensor> =
        BTreeMap::from([("latents".into(), io["latents"].clone())]);
    write_safetensors(&latents, &feed).unwrap();
    let prof = d.path().join("prof");
    let stage = || {
        Command::new(env!("CARGO_BIN_EXE_v2l-run"))
            .arg("--engine")
            .arg(&engine)
            .args(["stage", "vae-decode", "--json", "--repeat", "2", "--inputs"])
            .arg(&latents)
            .arg("-o")
            .arg(d.path().join("decoded.safetensors"))
            .arg("--profile")
            .arg(&prof)
            .output()
            .unwrap()
    };
    let o = stage();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let p = &j["profile"];
    // Two decodes of 5 latent frames, each a few frame batches: every run was traced.
    let runs = p["runs"].as_u64().unwrap();
    assert!(runs >= 2 && runs % 2 == 0, "{p}");
    let ops = p["ops"].as_array().unwrap();
    let conv = ops.iter().find(|o| o["op"] == "Conv").unwrap();
    assert_eq!(conv["provider"], "CPU");
    assert!(conv["calls"].as_u64().unwrap() > 0 && conv["ms"].as_f64().unwrap() > 0.0);
    let node_ms = p["node_ms"].as_f64().unwrap();
    assert!(
        node_ms > 0.0 && node_ms <= p["run_ms"].as_f64().unwrap() * 1.01,
        "{p}"
    );
    assert!(err.contains("profile:") && err.contains("Conv"), "{err}");
    let traces = std::fs::read_dir(&prof).unwrap().count();
    assert_eq!(traces, p["files"].as_array().unwrap().len());
    assert!(traces >= 1);

    // A second run into the same directory would mix its traces with the first's.
    let o = stage();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("holds traces already"), "{err}");
}
