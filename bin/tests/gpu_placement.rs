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
        let (mut low_ropes, mut low_vaes) = (0, 0);
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
            // The RoPE runs as one CUDA kernel (`passes::fuse_rope`), q and k of each of the
            // fixtures' two blocks.
            let name = g.file_name().unwrap().to_string_lossy().into_owned();
            if name.starts_with("dit") && name.ends_with(".onnx") {
                let graph = model.graph.as_ref().unwrap();
                let fused = graph.node.iter().filter(|n| n.op_type == "RotaryEmbedding");
                assert_eq!(fused.count(), 4, "{what} {precision} {name}");
                // The AdaLN modulation is its norms' scale and bias
                // (`passes::fold_modulation`): CogVideoX's text and video of norm1 and norm2
                // per block and the output norm; Wan's norm1 and norm3 per block and the
                // output norm.
                let folded = graph.node.iter().filter(|n| {
                    n.op_type == "LayerNormalization"
                        && n.input.get(1).is_some_and(|g| g.ends_with(".scale"))
                });
                let want = if what == "wan" { 5 } else { 9 };
                assert_eq!(folded.count(), want, "{what} {precision} {name}");
                // Below fp32 it reads q and k widened to f32, as diffusers' RoPE computes; at
                // bf16 cast exactly to fp16, where the attention runs
                // (`Lowering::half_attention`).
                let rope_type = if precision == "bf16" { 10 } else { 1 };
                if name.contains(&format!("_{precision}")) && precision != "fp32" {
                    let producer =
                        |v: &str| graph.node.iter().find(|n| n.output.iter().any(|o| o == v));
                    for rope in graph.node.iter().filter(|n| n.op_type == "RotaryEmbedding") {
                        let flat = producer(&rope.input[0]).unwrap();
                        assert_eq!(flat.op_type, "Reshape", "{name}: {}", rope.name);
                        let cast = producer(&flat.input[0]).unwrap();
                        let to = cast.attribute.iter().find(|a| a.name == "to").map(|a| a.i);
                        assert_eq!(
                            (cast.op_type.as_str(), to),
                            ("Cast", Some(rope_type)),
                            "{name}: {} reads {}",
                            rope.name,
                            cast.name
                        );
                        low_ropes += 1;
                    }
                }
            }
            if name.starts_with("dit") && name.ends_with(".onnx") {
                let graph = model.graph.as_ref().unwrap();
                let producer =
                    |v: &str| graph.node.iter().find(|n| n.output.iter().any(|o| o == v));
                // The feed-forward's bias is added by its GELU (`passes::fuse_gelu_bias`).
                let gelus: Vec<_> = graph
                    .node
                    .iter()
                    .filter(|n| n.op_type == "FastGelu")
                    .collect();
                assert!(!gelus.is_empty(), "{what} {precision} {name}");
                for g in gelus {
                    assert_eq!(g.input.len(), 2, "{name}: {} takes no bias", g.name);
                }
                // Below fp32 a LoRA branch runs in the engine's type but for its scale: its
                // products and its sum read nothing widened to f32.
                if name == "dit_unfused.onnx" && precision != "fp32" {
                    let branch = graph.node.iter().filter(|n| {
                        n.name.contains("/lora_") && matches!(n.op_type.as_str(), "MatMul" | "Add")
                    });
                    let mut checked = 0;
                    for n in branch {
                        for i in &n.input {
                            let to_f32 = producer(i).is_some_and(|c| {
                                c.op_type == "Cast"
                                    && c.attribute.iter().any(|a| a.name == "to" && a.i == 1)
                            });
                            assert!(!to_f32, "{name}: {} reads {i} widened to f32", n.name);
                        }
                        checked += 1;
                    }
                    assert!(checked > 0, "{what} {precision}: no LoRA branch");
                }
            }
            // TF32 changes no value of a lowered VAE graph (its convolutions compute in the
            // low type), so its session runs with `use_tf32=1`, which cuDNN's convolutions
            // need for tensor cores in any type; an f32 VAE graph's values it does change.
            if name.starts_with("vae_") && name.ends_with(".onnx") {
                let lowered = name.ends_with(&format!("_{precision}.onnx")) && precision != "fp32";
                assert_eq!(p.tf32_matters, !lowered, "{what} {precision} {name}");
            }
            // A lowered VAE graph carries its caches in the engine's precision, both sides.
            if name.starts_with("vae_") && name.ends_with(&format!("_{precision}.onnx")) {
                let graph = model.graph.as_ref().unwrap();
                let ty = |vs: &[v2l_graphs::proto::ValueInfoProto], n: &str| {
                    let v = vs.iter().find(|v| v.name == n)?;
                    match v.r#type.as_ref()?.value.as_ref()? {
                        v2l_graphs::proto::type_proto::Value::TensorType(t) => Some(t.elem_type),
                    }
                };
                let low = match precision {
                    "fp16" => v2l_graphs::DType::F16,
                    _ => v2l_graphs::DType::BF16,
                };
                let caches: Vec<&str> = graph
                    .input
                    .iter()
                    .filter_map(|i| i.name.strip_prefix("cache_in."))
                    .collect();
                assert!(!caches.is_empty(), "{what} {name}");
                for m in caches {
                    let (i, o) = (format!("cache_in.{m}"), format!("cache_out.{m}"));
                    assert_eq!(ty(&graph.input, &i), Some(low.onnx_code()), "{name}: {i}");
                    assert_eq!(ty(&graph.output, &o), Some(low.onnx_code()), "{name}: {o}");
                }
                low_vaes += 1;
            }
            // Every RMS norm (Wan's q/k norms, T5's and umT5's) is one that ONNX Runtime's
            // `SimplifiedLayerNormFusion` makes a single `SimplifiedLayerNormalization` kernel.
            let rms = fusable_rms_norms(model.graph.as_ref().unwrap(), &name);
            if name.starts_with("text_encoder") || (what == "wan" && name.starts_with("dit")) {
                assert!(rms > 0, "{what} {precision} {name}: no RMS norm");
            }
            for n in p.no_kernel {
                problems.push(format!(
                    "{what} {precision} {}: {n}",
                    g.file_name().unwrap().to_string_lossy()
                ));
            }
        }
        if precision != "fp32" {
            assert!(
                low_ropes > 0,
                "{what} {precision}: no lowered DiT graph was checked"
            );
        }
        // Both VAE graphs, Wan's encoder too (its time downsampling pads in its conv: a `Pad`
        // node would have no bf16 CUDA kernel and keep the whole graph in f32).
        if precision != "fp32" {
            assert_eq!(
                low_vaes, 2,
                "{what} {precision}: lowered VAE graphs checked"
            );
        }
    }
    assert!(
        problems.is_empty(),
        "nodes that would fall back to the CPU:\n{}",
        problems.join("\n")
    );
}

/// Checks each RMS norm of `graph` (the `Pow` of an `.rms/` scope) against the pattern ONNX
/// Runtime's `SimplifiedLayerNormFusion` (`onnxruntime/core/optimizer/layer_norm_fusion.cc`)
/// fuses on its CUDA provider, node by node as it matches: `Pow(x, 2)` (float exponent) →
/// `ReduceMean` over the last axis → `Add` of a float ε → `Sqrt` → `Div(x, ·)` → `Mul` by a
/// 1-D weight, each feeding only the next; below fp32, `x` is a `Cast` read by the `Pow` and
/// the `Div` alone and a `Cast` sits between the `Div` and the `Mul` (the fused kernel then
/// reads and writes the engine's type). An RMS norm squared as `x · x` is never fused, and is
/// refused here. Returns how many were checked.
fn fusable_rms_norms(graph: &v2l_graphs::proto::GraphProto, name: &str) -> usize {
    use v2l_graphs::proto::NodeProto;
    let consumers = |v: &str| -> Vec<&NodeProto> {
        graph
            .node
            .iter()
            .filter(|n| n.input.iter().any(|i| i == v))
            .collect()
    };
    let edges = |v: &str| -> usize {
        graph
            .node
            .iter()
            .map(|n| n.input.iter().filter(|i| *i == v).count())
            .sum()
    };
    let producer = |v: &str| graph.node.iter().find(|n| n.output.iter().any(|o| o == v));
    let init = |v: &str| graph.initializer.iter().find(|t| t.name == v);
    let only_child = |n: &NodeProto, op: &str| -> NodeProto {
        let out = &n.output[0];
        let c = consumers(out);
        assert!(
            c.len() == 1 && edges(out) == 1 && c[0].op_type == op,
            "{name}: {} feeds {:?}, not one {op}",
            n.name,
            c.iter().map(|c| &c.op_type).collect::<Vec<_>>()
        );
        c[0].clone()
    };
    let mut checked = 0;
    for n in graph.node.iter().filter(|n| n.name.contains(".rms/")) {
        assert!(
            !(n.op_type == "Mul" && n.input.len() == 2 && n.input[0] == n.input[1]),
            "{name}: {} squares as x * x, which ONNX Runtime does not fuse",
            n.name
        );
        if n.op_type != "Pow" {
            continue;
        }
        let two = init(&n.input[1]).unwrap_or_else(|| panic!("{name}: {}: exponent", n.name));
        assert_eq!(two.data_type, 1, "{name}: {}: a float exponent", n.name);
        let mean = only_child(n, "ReduceMean");
        let axes: Vec<i64> = match mean.attribute.iter().find(|a| a.name == "axes") {
            Some(a) => a.ints.clone(),
            // From opset 18, an input.
            None => {
                let t = init(&mean.input[1]).unwrap();
                match t.raw_data.is_empty() {
                    true => t.int64_data.clone(),
                    false => t
                        .raw_data
                        .chunks(8)
                        .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
                        .collect(),
                }
            }
        };
        assert_eq!(axes, vec![-1], "{name}: {}", mean.name);
        let add = only_child(&mean, "Add");
        let eps = add.input.iter().find_map(|i| init(i));
        assert_eq!(eps.map(|t| t.data_type), Some(1), "{name}: {}: ε", add.name);
        let sqrt = only_child(&add, "Sqrt");
        let div = only_child(&sqrt, "Div");
        assert_eq!(
            div.input[0], n.input[0],
            "{name}: {} divides another x",
            div.name
        );
        let x = &n.input[0];
        let lowered = producer(x).is_some_and(|p| p.op_type == "Cast");
        let mul = match lowered {
            true => {
                assert_eq!(
                    edges(x),
                    2,
                    "{name}: the widened x of {} is read elsewhere",
                    n.name
                );
                let cast = only_child(&div, "Cast");
                only_child(&cast, "Mul")
            }
            false => only_child(&div, "Mul"),
        };
        let weight = mul.input.iter().find_map(|i| init(i));
        assert_eq!(
            weight.map(|w| w.dims.len()),
            Some(1),
            "{name}: {}: weight",
            mul.name
        );
        checked += 1;
    }
    checked
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
            "--cuda-option",
            "enable_cuda_graph=1",
        ],
    );
    let bundle: serde_json::Value =
        serde_json::from_slice(&std::fs::read(engine.join("bundle.json")).unwrap()).unwrap();
    assert_eq!(
        bundle["cuda_options"],
        serde_json::json!({"cudnn_conv_algo_search": "HEURISTIC", "sdpa_kernel": "8", "enable_cuda_graph": "1"})
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
    // A TensorRT engine's CUDA provider runs only what TensorRT leaves: nothing to capture.
    let o = v2l_compile("tensorrt", "enable_cuda_graph=1");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("enable_cuda_graph") && err.contains("cuda engines"),
        "{err}"
    );
    assert!(!d
        .path()
        .join("refused-tensorrt")
        .join("bundle.json")
        .exists());
    let o = v2l_compile("cpu", "prefer_nhwc=1");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("cuda and tensorrt engines"),
        "{err}"
    );
    assert!(!d.path().join("refused-cpu").join("bundle.json").exists());
}

/// A CUDA engine whose RoPE is one kernel takes sizes above 65,535 tokens a DiT call (a limit
/// v2l once recorded, from an ONNX Runtime kernel older than 1.18) and records no limit;
/// `--unfused-rope` keeps the exported RoPE, and only cuda engines take it.
#[test]
fn cuda_engines_with_a_fused_rope_take_sizes_above_65535_tokens() {
    use v2l_runtime::engine::Engine;
    use v2l_runtime::pipeline::RequestParts;
    let d = tempfile::tempdir().unwrap();
    let export = d.path().join("export");
    export_pipeline_of(&common::tiny(), &export, 5);
    let fused = d.path().join("cuda");
    compile(&export, &fused, "cuda", "fp32", &[]);
    let unfused = d.path().join("cuda-unfused-rope");
    compile(&export, &unfused, "cuda", "fp32", &["--unfused-rope"]);
    let io = v2l_runtime::read_safetensors(&common::tiny().join("e2e_io.safetensors")).unwrap();
    let small = common::cogvideox_request(&io);
    // 257 frames at 512x512: 65 latent frames of 32x32 patches, 66,560 video tokens.
    let c = small.noise.shape[2];
    let big = RequestParts {
        image: Some(v2l_runtime::video::Frames {
            frames: 1,
            height: 512,
            width: 512,
            rgb: vec![128; 512 * 512 * 3],
        }),
        frames: 257,
        noise: v2l_runtime::Tensor::zeros(vec![1, 65, c, 64, 64]),
        ..small.clone()
    };
    let record = |dir: &Path| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(dir.join("bundle.json")).unwrap()).unwrap()
    };
    for dir in [&fused, &unfused] {
        assert!(
            record(dir).get("rope_max_tokens").is_none(),
            "{}",
            dir.display()
        );
        let e = Engine::open(dir).unwrap();
        small.clone().check(&e).unwrap();
        big.clone().check(&e).unwrap();
    }
    let fused_ropes = onnx_files(&fused)
        .iter()
        .filter(|g| g.to_string_lossy().contains("dit"))
        .flat_map(|g| v2l_graphs::read_model(g).unwrap().graph.unwrap().node)
        .filter(|n| n.op_type == "RotaryEmbedding")
        .count();
    assert!(fused_ropes > 0);
    for g in onnx_files(&unfused)
        .iter()
        .filter(|g| g.to_string_lossy().contains("dit"))
    {
        let m = v2l_graphs::read_model(g).unwrap();
        let ops = m.graph.unwrap().node;
        assert!(
            !ops.iter().any(|n| n.op_type == "RotaryEmbedding"),
            "{}",
            g.display()
        );
    }
    // Only a cuda engine fuses its RoPE: the flag elsewhere is an error naming it.
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_v2l-compile"))
        .arg(&export)
        .arg("-o")
        .arg(d.path().join("cpu-unfused"))
        .args(["--backend", "cpu", "--unfused-rope"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--unfused-rope"));
}

/// `--exported-group-norm` keeps a cuda engine's VAE's GroupNorms as exported (no
/// LayerNormalization, the square of the centred activation back), for measuring one form
/// against the other on a GPU: at bf16 in its lowered graphs, at fp32 as the export's graphs
/// (the rewritten ones are `<graph>_cuda.onnx`, and the engine runs them). Other engines (whose
/// VAE has no row statistics) refuse it, naming the flag.
#[test]
fn exported_group_norm_keeps_the_exported_statistics() {
    let d = tempfile::tempdir().unwrap();
    let export = d.path().join("export");
    export_pipeline_of(&common::tiny(), &export, 5);
    let layer_norms = |file: &Path| {
        let m = v2l_graphs::read_model(file).unwrap();
        let g = m.graph.unwrap();
        g.node
            .iter()
            .filter(|n| n.op_type == "LayerNormalization")
            .count()
    };
    for (precision, decoder) in [
        ("bf16", "vae_decoder_bf16.onnx"),
        ("fp32", "vae_decoder_cuda.onnx"),
    ] {
        let rewritten = d.path().join(format!("rewritten-{precision}"));
        let kept = d.path().join(format!("kept-{precision}"));
        compile(&export, &rewritten, "cuda", precision, &[]);
        compile(
            &export,
            &kept,
            "cuda",
            precision,
            &["--exported-group-norm"],
        );
        assert!(layer_norms(&rewritten.join(decoder)) > 0, "{precision}");
        let runs = v2l_runtime::engine::Engine::open(&rewritten).unwrap();
        let entry = runs.manifest.vae.clone().unwrap();
        assert_eq!(runs.vae_graphs(&entry).decoder, decoder, "{precision}");
        match precision {
            "fp32" => {
                assert!(!kept.join(decoder).exists());
                let kept = v2l_runtime::engine::Engine::open(&kept).unwrap();
                assert_eq!(kept.vae_graphs(&entry).decoder, entry.decoder);
                // The engine loads the rewritten graphs from its own directory (the export's
                // weights under them) and decodes what the export's do, here on the CPU
                // provider: the same f32 sums in another order.
                let io = v2l_runtime::read_safetensors(&common::tiny().join("vae_io.safetensors"))
                    .unwrap();
                let opts = v2l_runtime::SessionOptions::default();
                let decode = |e: &v2l_runtime::engine::Engine| {
                    let mut vae = v2l_runtime::vae::Vae::load(e, &opts).unwrap();
                    vae.decode(&io["latents"]).unwrap()
                };
                let err = decode(&runs).rel_l2(&decode(&kept));
                assert!(err > 0.0 && err < 1e-5, "{err:e}");
            }
            _ => assert_eq!(layer_norms(&kept.join(decoder)), 0, "{precision}"),
        }
    }
    // TensorRT's parser takes a LayerNormalization's first output only: its engines keep the
    // exported statistics.
    let trt = d.path().join("tensorrt");
    compile(&export, &trt, "tensorrt", "bf16", &[]);
    assert_eq!(layer_norms(&trt.join("vae_decoder_bf16.onnx")), 0);
    refused_on(
        &export,
        d.path(),
        "--exported-group-norm",
        &[("cpu", "bf16"), ("cpu", "fp32"), ("tensorrt", "fp32")],
    );
    // The folded applies are a choice of the lowered cuda graphs only.
    refused_on(
        &export,
        d.path(),
        "--folded-norms",
        &[("cpu", "bf16"), ("cuda", "fp32"), ("tensorrt", "bf16")],
    );
}

/// A bf16 cuda engine's DiT GELUs run in fp16 (the exact cast of the feed-forward's bf16
/// activation, ONNX Runtime's fp16 `FastGelu`); `--f32-gelu` keeps them in f32 between two
/// casts, `--low-gelu` puts them in the engine's type (its bf16 `FastGelu`): each a CUDA
/// kernel, for measuring one against the other on a GPU. Other engines refuse the flags, and
/// the two together are refused.
#[test]
fn the_dits_gelus_compute_in_fp16_f32_or_the_engines_type() {
    let d = tempfile::tempdir().unwrap();
    let export = d.path().join("export");
    export_pipeline_of(&common::tiny(), &export, 5);
    // Per FastGelu of the lowered DiT: the type its input was cast to (past reshapes), 0 where
    // it reads what the feed-forward's Gemm wrote.
    let gelus = |engine: &Path| -> Vec<i64> {
        let m = v2l_graphs::read_model(&engine.join("dit_bf16.onnx")).unwrap();
        let g = m.graph.unwrap();
        let producer = |v: &str| g.node.iter().find(|n| n.output.iter().any(|o| o == v));
        g.node
            .iter()
            .filter(|n| n.op_type == "FastGelu")
            .map(|n| {
                let mut p = producer(&n.input[0]).unwrap();
                while p.op_type == "Reshape" {
                    p = producer(&p.input[0]).unwrap();
                }
                match p.op_type.as_str() {
                    "Cast" => p.attribute.iter().find(|a| a.name == "to").unwrap().i,
                    _ => 0,
                }
            })
            .collect()
    };
    let mut all = Vec::new();
    let mut rel = Vec::new();
    for (flag, want) in [("", 10), ("--f32-gelu", 1), ("--low-gelu", 0)] {
        let engine = d.path().join(format!("gelu{flag}"));
        let flags: Vec<&str> = [flag].into_iter().filter(|f| !f.is_empty()).collect();
        all.extend(compile(&export, &engine, "cuda", "bf16", &flags));
        let got = gelus(&engine);
        assert!(
            !got.is_empty() && got.iter().all(|&t| t == want),
            "{flag}: {got:?}"
        );
        rel.push(dit_rel_l2(&engine));
    }
    // The fp16 GELU's record stays at the f32 island's (the CPU form rounds its input and
    // output to fp16 and computes in f32; the kernel's own fp16 steps are not in it).
    let (half, island) = (rel[0], rel[1]);
    eprintln!("DiT against fp32: fp16 GELU {half:.3e}, f32 GELU {island:.3e}");
    assert!(
        half < 1e-2 && (half - island).abs() < 0.1 * island,
        "{rel:?}"
    );
    for g in all {
        let p = cuda_placement(
            &v2l_graphs::read_model(&g).unwrap(),
            KernelTable::ort_cuda(),
        );
        assert!(p.no_kernel.is_empty(), "{}: {:?}", g.display(), p.no_kernel);
    }
    refused_but_on_cuda_below_fp32(&export, d.path(), "--low-gelu");
    refused_but_on_cuda_bf16(&export, d.path(), "--f32-gelu");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_v2l-compile"))
        .arg(&export)
        .arg("-o")
        .arg(d.path().join("both"))
        .args([
            "--backend",
            "cuda",
            "--precision",
            "bf16",
            "--f32-gelu",
            "--low-gelu",
        ])
        .output()
        .unwrap();
    assert_ne!(o.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&o.stderr).contains("two types of one GELU"));
}

/// The DiT's distance from fp32 the compile recorded in `engine`'s bundle.json (its CPU form on
/// generated inputs).
fn dit_rel_l2(engine: &Path) -> f64 {
    let b: serde_json::Value =
        serde_json::from_slice(&std::fs::read(engine.join("bundle.json")).unwrap()).unwrap();
    b["accuracy"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["stage"] == "dit")
        .and_then(|r| r["rel_l2"].as_f64())
        .unwrap()
}

/// A compile flag for cuda engines at fp16/bf16 only: fp32 cuda, bf16 cpu and bf16 tensorrt
/// engines refuse it, naming it.
fn refused_but_on_cuda_below_fp32(export: &Path, dir: &Path, flag: &str) {
    refused_on(
        export,
        dir,
        flag,
        &[("cuda", "fp32"), ("cpu", "bf16"), ("tensorrt", "bf16")],
    );
}

/// A compile flag for cuda engines at bf16 only: fp16 and fp32 cuda engines refuse it too.
fn refused_but_on_cuda_bf16(export: &Path, dir: &Path, flag: &str) {
    refused_on(
        export,
        dir,
        flag,
        &[
            ("cuda", "fp16"),
            ("cuda", "fp32"),
            ("cpu", "bf16"),
            ("tensorrt", "bf16"),
        ],
    );
}

/// Each of `engines` (backend, precision) refuses `flag`, naming it.
fn refused_on(export: &Path, dir: &Path, flag: &str, engines: &[(&str, &str)]) {
    for &(backend, precision) in engines {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_v2l-compile"))
            .arg(export)
            .arg("-o")
            .arg(dir.join(format!("refused{flag}-{backend}-{precision}")))
            .args(["--backend", backend, "--precision", precision])
            .arg(flag)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_ne!(o.status.code(), Some(0), "{flag}: {backend} {precision}");
        assert!(err.contains(flag), "{flag}: {backend} {precision}: {err}");
    }
}

/// A bf16 cuda engine's attention runs in fp16 (ONNX Runtime's CUDA `MultiHeadAttention` has
/// its flash and cuDNN kernels for fp16 only), and so does its RoPE: q and k are cast exactly
/// from the norms' bf16 to fp16, v too, the output back to bf16; and the DiT stays as near
/// fp32 as with bf16 attention (the compile's CPU form of each, on the same generated inputs).
/// `--bf16-attention` keeps it bf16; other engines refuse the flag.
#[test]
fn bf16_cuda_engines_attend_in_fp16() {
    let d = tempfile::tempdir().unwrap();
    let export = d.path().join("export");
    export_pipeline_of(&common::tiny(), &export, 5);
    // Per MultiHeadAttention: for each of q, k and v, the Cast it comes through (past
    // reshapes) as (type written, type read), and the type its output is cast to.
    type Casts = ([Option<(i64, i64)>; 3], Option<i64>);
    let attention = |engine: &Path, file: &str| -> Vec<Casts> {
        let m = v2l_graphs::read_model(&engine.join(file)).unwrap();
        let g = m.graph.unwrap();
        let producer = |v: &str| g.node.iter().find(|n| n.output.iter().any(|o| o == v));
        let to = |n: &v2l_graphs::proto::NodeProto| {
            n.attribute.iter().find(|a| a.name == "to").map(|a| a.i)
        };
        // Past reshapes and the RoPE.
        let past_reshapes = |v: &str| {
            let mut n = producer(v).unwrap();
            while matches!(n.op_type.as_str(), "Reshape" | "RotaryEmbedding") {
                n = producer(&n.input[0]).unwrap();
            }
            n
        };
        // What a node writes: a Cast its `to`, the RoPE's scope f32 (kept bf16 attention),
        // anything else (a Gemm, a LayerNormalization) the engine's bf16.
        let written = |n: &v2l_graphs::proto::NodeProto| match n.op_type.as_str() {
            "Cast" => to(n).unwrap(),
            _ if n.name.contains(".rope/") => 1,
            _ => 16,
        };
        let cast_before = |v: &str| {
            let c = past_reshapes(v);
            let read = |c: &v2l_graphs::proto::NodeProto| written(producer(&c.input[0]).unwrap());
            (c.op_type == "Cast").then(|| (written(c), read(c)))
        };
        g.node
            .iter()
            .filter(|n| n.op_type == "MultiHeadAttention")
            .map(|n| {
                let after = g
                    .node
                    .iter()
                    .find(|c| c.op_type == "Cast" && c.input[0] == n.output[0])
                    .and_then(to);
                let qkv = [0, 1, 2].map(|i| cast_before(&n.input[i]));
                (qkv, after)
            })
            .collect()
    };
    let (half, bf16) = (d.path().join("half"), d.path().join("bf16"));
    let graphs = compile(&export, &half, "cuda", "bf16", &[]);
    compile(&export, &bf16, "cuda", "bf16", &["--bf16-attention"]);
    const F32: i64 = 1;
    const F16: i64 = 10;
    const BF16: i64 = 16;
    for file in ["dit_bf16.onnx", "dit_unfused.onnx"] {
        let got = attention(&half, file);
        assert!(!got.is_empty(), "{file}");
        for a in got {
            // q and k: the norm's bf16 output cast exactly, then the RoPE in fp16.
            let want = [Some((F16, BF16)), Some((F16, BF16)), Some((F16, BF16))];
            assert_eq!(a, (want, Some(BF16)), "{file}");
        }
        // Kept bf16: q and k cast from f32 to bf16, v read as its Gemm wrote it, no cast after.
        for a in attention(&bf16, file) {
            let want = [Some((BF16, F32)), Some((BF16, F32)), None];
            assert_eq!(a, (want, None), "{file}");
        }
    }
    for g in graphs {
        let p = cuda_placement(
            &v2l_graphs::read_model(&g).unwrap(),
            KernelTable::ort_cuda(),
        );
        assert!(p.no_kernel.is_empty(), "{}: {:?}", g.display(), p.no_kernel);
    }
    let (h, b) = (dit_rel_l2(&half), dit_rel_l2(&bf16));
    eprintln!("DiT against fp32: fp16 attention {h:.3e}, bf16 attention {b:.3e}");
    assert!(
        h < 1e-2 && (h - b).abs() < 0.1 * b,
        "fp16 {h:.3e}, bf16 {b:.3e}"
    );
    refused_but_on_cuda_bf16(&export, d.path(), "--bf16-attention");
}
