use std::process::{Command, Output};

fn bench(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_v2l-bench"))
        .args(args)
        .output()
        .expect("v2l-bench runs")
}

/// `v2l-bench --help` and each subcommand's teach by example, and are snapshots: a change to
/// the command-line interface shows up in review.
#[test]
fn every_help_has_an_example_and_is_stable() {
    let subs = [
        "pipeline", "export", "scale", "fuse", "serve", "hypernet", "e2e", "lilora",
    ];
    for sub in std::iter::once(None).chain(subs.iter().map(Some)) {
        let mut args: Vec<&str> = sub.into_iter().copied().collect();
        args.push("--help");
        let o = bench(&args);
        assert!(o.status.success(), "v2l-bench {args:?}");
        let text = String::from_utf8_lossy(&o.stdout);
        assert!(
            text.contains("Example"),
            "v2l-bench {args:?} has no example:\n{text}"
        );
        let name = match sub {
            None => "v2l_bench_help".to_string(),
            Some(s) => format!("v2l_bench_{s}_help"),
        };
        insta::assert_snapshot!(name, text);
    }
}

/// The GPU check's CPU side: `--dry-run` prints the plan and exits 0, writing nothing. A real
/// run on a machine that cannot run it is refused with the reason this machine gives
/// (`no_gpu_reason`: no NVIDIA device, or an ONNX Runtime without CUDA), exit code 1, nothing
/// written; on a machine that can, the run gets past that check and stops at the first thing
/// it does, creating its scratch directory (here under a regular file, so it cannot).
#[test]
fn the_gpu_check_plans_anywhere_and_runs_only_where_a_gpu_can() {
    let d = tempfile::tempdir().unwrap();
    let scratch = d.path().join("gpu");
    let o = bench(&[
        "gpu",
        "--dry-run",
        "--json",
        "--dir",
        scratch.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let plan: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let cases = plan["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 24, "{plan}");
    for model in ["cogvideox-fun-inp-tiny", "wan-tiny-i2v"] {
        assert!(cases.iter().any(|c| c["model"] == model), "{model}");
    }
    // TensorRT is listed, and where libnvinfer.so.10 does not load, skipped with the reason.
    for c in cases.iter().filter(|c| c["backend"] == "tensorrt") {
        if v2l_bench::gpu::tensorrt_here().is_err() {
            assert!(
                c["skipped"].as_str().unwrap().starts_with("skipped: "),
                "{c}"
            );
        }
    }
    assert!(plan["scale"].as_array().unwrap().is_empty());
    assert!(!scratch.exists(), "a dry run wrote {}", scratch.display());
    let o = bench(&["gpu", "--dry-run", "--scale"]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success());
    assert!(
        text.contains("10 real-size cases")
            && text.contains("49x480x720  17776 tokens")
            && text.contains("17776 tokens, batch 2, 2 blocks, a rank-64 LoRA"),
        "{text}"
    );
    assert!(!text.contains("--sweep"), "{text}");
    let o = bench(&["gpu", "--dry-run", "--scale", "--sweep"]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success());
    assert!(
        text.contains("cudnn-flash          V2L_CUDA_OPTIONS=sdpa_kernel=10")
            && text.contains(
                "bf16-attention       an engine of its own: v2l-compile --bf16-attention (bf16)"
            )
            && text.contains("tiled                --vae-tiling on"),
        "{text}"
    );
    // --scale-only picks real-size cases by `STAGE PRECISION FRAMESxHxW`; none is an error.
    let o = bench(&[
        "gpu",
        "--dry-run",
        "--json",
        "--scale",
        "--scale-only",
        "dit bf16 49x",
    ]);
    assert!(o.status.success(), "{o:?}");
    let plan: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let picked = plan["scale"].as_array().unwrap();
    // The case without a LoRA and the one with (`dit bf16 49x480x720 lora64`).
    assert_eq!(picked.len(), 2, "{plan}");
    assert_eq!(picked[0]["size"], serde_json::json!([49, 480, 720]));
    assert!(picked[0].get("lora_rank").is_none(), "{plan}");
    assert_eq!(picked[1]["lora_rank"], 64, "{plan}");
    // --scale-size puts every case at one size (the DiT's two sizes become one case each);
    // a size the VAE and the DiT's patches do not divide is refused.
    let o = bench(&[
        "gpu",
        "--dry-run",
        "--json",
        "--scale",
        "--scale-size",
        "9x64x96",
    ]);
    assert!(o.status.success(), "{o:?}");
    let plan: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let cases = plan["scale"].as_array().unwrap();
    assert_eq!(cases.len(), 6, "{plan}");
    assert!(cases
        .iter()
        .all(|c| c["size"] == serde_json::json!([9, 64, 96])));
    assert_eq!(cases[0]["what"], "298 tokens, batch 2, 2 blocks", "{plan}");
    for bad in ["8x64x96", "9x60x96", "9x64", "nine"] {
        let o = bench(&["gpu", "--dry-run", "--scale", "--scale-size", bad]);
        assert_eq!(o.status.code(), Some(2), "{bad}: {o:?}");
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("--scale-size"),
            "{bad}: {o:?}"
        );
    }
    let o = bench(&[
        "gpu",
        "--dry-run",
        "--scale",
        "--scale-only",
        "vae-decode fp8",
    ]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("matches no real-size case"));
    // --sweep varies the real-size cases: without --scale it is refused.
    let o = bench(&["gpu", "--dry-run", "--sweep"]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");

    let file = d.path().join("a-file");
    std::fs::write(&file, b"").unwrap();
    let unwritable = file.join("gpu");
    let o = bench(&["gpu", "--dir", unwritable.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    match v2l_bench::gpu::no_gpu_reason() {
        Some(why) => {
            assert!(err.contains("cannot run the GPU check"), "{err}");
            assert!(err.contains(&why), "expected {why:?} in: {err}");
        }
        None => assert!(err.contains(unwritable.to_str().unwrap()), "{err}"),
    }
    assert_eq!(
        std::fs::read(&file).unwrap(),
        b"",
        "the run wrote into {}",
        file.display()
    );
}

/// The check itself, run end to end on ONNX Runtime's CPU provider (`--provider cpu`): on the
/// tiny Wan I2V pipeline it exports, compiles the CPU reference and the case's engine, compares
/// frames and times steps, printing a row per case as it ends; a case that cannot run (here
/// TensorRT) is a row with its reason, and the rest still run. `--profile` adds each graph's
/// time by operator and provider.
#[test]
fn the_gpu_check_runs_its_plan_on_the_cpu_provider() {
    let d = tempfile::tempdir().unwrap();
    let scratch = d.path().join("gpu");
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let o = Command::new(env!("CARGO_BIN_EXE_v2l-bench"))
        .current_dir(&root)
        .args([
            "gpu",
            "--provider",
            "cpu",
            "--only",
            "wan",
            "--repeat",
            "1",
            "--profile",
            "--json",
            "--dir",
        ])
        .arg(&scratch)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let rows: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 6, "{out}");
    for r in &rows {
        match r["backend"].as_str().unwrap() {
            "tensorrt" => assert!(r["skipped"].is_string(), "{r}"),
            _ => {
                assert_eq!(r["within_bound"], true, "{r}");
                assert!(r["dit_step_ms"].as_f64().unwrap() > 0.0, "{r}");
                // The stages beside the DiT, this engine against the CPU fp32 engine (Wan has
                // no Video2LoRA, so no prediction).
                let stages: Vec<&str> = r["stages"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|s| {
                        assert!(s["engine_ms"].as_f64().unwrap() > 0.0, "{s}");
                        assert!(s["cpu_engine_ms"].as_f64().unwrap() > 0.0, "{s}");
                        s["stage"].as_str().unwrap()
                    })
                    .collect();
                assert_eq!(stages, ["vae_encode", "vae_decode"], "{r}");
                // The first generation on each engine, cold, and its stages.
                let first = r["first_generation_ms"].as_array().unwrap();
                assert!(first.iter().all(|v| v.as_f64().unwrap() > 0.0), "{r}");
                let cold: Vec<&str> = r["first_stages"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|s| s["stage"].as_str().unwrap())
                    .collect();
                assert_eq!(cold, ["vae_encode", "vae_decode"], "{r}");
                // The same generation through bound buffers (CUDA graphs on a GPU): within the
                // case's bound (`within_bound` above), with its own step and stages.
                assert!(r.get("graph_error").is_none(), "{r}");
                assert!(r["graph_frames_rel_l2"].as_f64().is_some(), "{r}");
                assert!(r["graph_dit_step_ms"].as_f64().unwrap() > 0.0, "{r}");
                assert_eq!(r["graph_stages"].as_array().unwrap().len(), 2, "{r}");
                // --profile: each graph of the traced generation, by operator and provider.
                let graphs = r["profile"].as_array().unwrap();
                let decoder = graphs
                    .iter()
                    .find(|g| g[0] == "vae_decoder")
                    .unwrap_or_else(|| panic!("no vae_decoder trace: {r}"));
                let ops = decoder[1]["ops"].as_array().unwrap();
                assert!(
                    ops.iter()
                        .any(|o| o["op"] == "Conv" && o["provider"] == "CPU"),
                    "{decoder}"
                );
                assert!(
                    graphs.len() >= 3,
                    "dit, VAE decoder and encoder at least: {r}"
                );
            }
        }
    }
}

/// `--budget-min`: once the time is spent no case starts; each gets a row saying so and the
/// check exits 1 (here every case, the budget being a picosecond's worth). A budget that is
/// not a positive number of minutes is a usage error (2) before anything runs.
#[test]
fn the_gpu_check_starts_no_case_after_its_budget() {
    let d = tempfile::tempdir().unwrap();
    let scratch = d.path().join("gpu");
    let run = |budget: &str| {
        Command::new(env!("CARGO_BIN_EXE_v2l-bench"))
            .args(["gpu", "--provider", "cpu", "--only", "wan", "--json"])
            .arg(format!("--budget-min={budget}"))
            .arg("--dir")
            .arg(&scratch)
            .output()
            .unwrap()
    };
    let o = run("1e-12");
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let rows: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 6);
    for r in rows.iter().filter(|r| r["backend"] == "cuda") {
        let why = r["skipped"].as_str().unwrap();
        assert!(why.contains("--budget-min"), "{r}");
        assert!(
            r.get("error").is_none() && r.get("frames_rel_l2").is_none(),
            "{r}"
        );
    }
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("3 row(s) not started"), "{err}");
    // Every run says what it measured on: the GPU, ONNX Runtime's library and the CPU.
    assert!(
        err.contains("v2l-bench gpu: GPU none (--provider cpu); ONNX Runtime /")
            && err.contains("; CPU: "),
        "{err}"
    );
    assert!(!scratch.join("wan-tiny-i2v-export").exists());
    for bad in ["0", "-1", "NaN", "inf"] {
        let o = run(bad);
        assert_eq!(o.status.code(), Some(2), "{bad}: {o:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("--budget-min"), "{bad}: {err}");
    }
}
