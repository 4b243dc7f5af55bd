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
        "pipeline", "export", "scale", "fuse", "serve", "hypernet", "e2e",
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
    assert_eq!(cases.len(), 12, "{plan}");
    assert!(cases
        .iter()
        .any(|c| c["backend"] == "tensorrt" && c["precision"] == "fp16"));
    assert!(!scratch.exists(), "a dry run wrote {}", scratch.display());

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
