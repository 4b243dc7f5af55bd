//! No silent CPU fallback, checked on every machine: every node of every graph in a compiled
//! `cuda` engine (the DiT at fp32, fp16 and bf16 with its LoRA variants, the VAE, the
//! hypernetwork, the text encoders; CogVideoX, CogVideoX-Fun-InP and Wan) has a kernel in ONNX
//! Runtime's CUDA provider for its operator, opset and element types, read off the provider's
//! registration table kept in `graphs/data/` (`v2l_graphs::placement`).

use std::path::Path;

use crate::common;
use crate::valid_graphs::{compile, export_pipeline_of, export_wan_i2v, onnx_files};
use v2l_graphs::placement::{cuda_placement, KernelTable};

/// Checks every graph of every engine; prints each graph's node count and the shape arithmetic
/// ONNX Runtime keeps on the CPU on purpose.
fn assert_all_on_cuda(export: &Path, dir: &Path, what: &str) {
    let mut problems = Vec::new();
    for precision in ["fp32", "fp16", "bf16"] {
        let engine = dir.join(format!("{what}-cuda-{precision}"));
        let graphs = compile(export, &engine, "cuda", precision, &[]);
        assert!(!graphs.is_empty(), "{what} {precision}: no graphs");
        for g in graphs {
            let model = v2l_graphs::read_model(&g).unwrap();
            let p = cuda_placement(&model, KernelTable::ort_cuda());
            eprintln!(
                "{what} cuda {precision} {}: {} nodes, {} without a CUDA kernel, {} shape nodes on the CPU by design",
                g.file_name().unwrap().to_string_lossy(),
                p.nodes,
                p.no_kernel.len(),
                p.cpu_shape_nodes.len()
            );
            assert!(p.nodes > 0);
            // The DiT's RoPE runs as one CUDA kernel (`passes::fuse_rope`).
            let name = g.file_name().unwrap().to_string_lossy().into_owned();
            if name.starts_with("dit") && name.ends_with(".onnx") {
                let graph = model.graph.as_ref().unwrap();
                let fused = graph.node.iter().filter(|n| n.op_type == "RotaryEmbedding");
                assert!(
                    fused.count() > 0,
                    "{what} {precision} {name}: RoPE not fused"
                );
            }
            for n in p.no_kernel {
                problems.push(format!(
                    "{what} {precision} {}: {n}",
                    g.file_name().unwrap().to_string_lossy()
                ));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "nodes that would fall back to the CPU:\n{}",
        problems.join("\n")
    );
}

#[test]
fn cogvideox_cuda_engines_have_every_kernel() {
    let d = tempfile::tempdir().unwrap();
    let export = d.path().join("export");
    let tiny = common::tiny();
    export_pipeline_of(&tiny, &export, 5);
    assert_all_on_cuda(&export, d.path(), "cogvideox");
}

#[test]
fn fun_inpaint_cuda_engines_have_every_kernel() {
    let d = tempfile::tempdir().unwrap();
    let export = d.path().join("export");
    let fun = common::tiny().join("../cogvideox-fun-inp-tiny");
    export_pipeline_of(&fun, &export, 4);
    assert_all_on_cuda(&export, d.path(), "fun-inp");
}

#[test]
fn wan_cuda_engines_have_every_kernel() {
    let d = tempfile::tempdir().unwrap();
    let export = export_wan_i2v(d.path());
    assert_eq!(onnx_files(&export).len(), 5);
    assert_all_on_cuda(&export, d.path(), "wan");
}

/// `--cuda-option` records the CUDA provider's kernel choices in bundle.json, checked at
/// parse time: an unknown key or value is an `error:` naming it (exit 2), and a cpu engine
/// takes none.
#[test]
fn cuda_provider_settings_are_recorded_and_checked() {
    let d = tempfile::tempdir().unwrap();
    let export = d.path().join("export");
    export_pipeline_of(&common::tiny(), &export, 5);
    let engine = d.path().join("cuda");
    compile(
        &export,
        &engine,
        "cuda",
        "fp32",
        &[
            "--cuda-option",
            "cudnn_conv_algo_search=HEURISTIC",
            "--cuda-option",
            "sdpa_kernel=8",
        ],
    );
    let bundle: serde_json::Value =
        serde_json::from_slice(&std::fs::read(engine.join("bundle.json")).unwrap()).unwrap();
    assert_eq!(
        bundle["cuda_options"],
        serde_json::json!({"cudnn_conv_algo_search": "HEURISTIC", "sdpa_kernel": "8"})
    );
    let v2l_compile = |backend: &str, option: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_v2l-compile"))
            .arg(&export)
            .arg("-o")
            .arg(d.path().join(format!("refused-{backend}")))
            .args([
                "--backend",
                backend,
                "--precision",
                "fp32",
                "--cuda-option",
                option,
            ])
            .output()
            .unwrap()
    };
    for (option, says) in [
        (
            "cudnn_conv_algo_search=FAST",
            "EXHAUSTIVE or HEURISTIC or DEFAULT",
        ),
        ("use_tf32=1", "--tf32"),
        ("gpu_mem_limit=1", "known: cudnn_conv_algo_search"),
    ] {
        let o = v2l_compile("cuda", option);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{option}: {err}");
        assert!(
            err.starts_with("error:") && err.contains(says),
            "{option}: {err}"
        );
    }
    let o = v2l_compile("cpu", "prefer_nhwc=1");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("cuda and tensorrt engines"),
        "{err}"
    );
    assert!(!d.path().join("refused-cpu").join("bundle.json").exists());
}
