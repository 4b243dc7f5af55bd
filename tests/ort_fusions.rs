//! ONNX Runtime's own fusions take every GELU and RMS norm the exporters write: in the graphs
//! no `v2l-compile` pass rewrites (the text and image encoders, the hypernetworks) each exact
//! GELU becomes one `Gelu`, each tanh GELU one `FastGelu` and each RMS norm one
//! `SimplifiedLayerNormalization`, as they do in torch's spelling (`Div(x, √2)`, `Pow(x, 3)`,
//! `Pow(x, 2)`), where `x·(1/√2)`, `x·x·x` and `x·x` left five to eight nodes a norm or GELU.

use std::path::Path;

use v2l_export::{clip_vision, lofa, prompt2effect, t5_encoder, video2lora_hypernet, Checkpoint};
use v2l_graphs::{save, ExternalData, Graph};
use v2l_runtime::{Model, SessionOptions};
use v2l_tests::*;

/// The operators of `graph` as exported, and as ONNX Runtime's CPU provider optimises it.
fn ops(graph: &Graph, dir: &Path, name: &str) -> (Vec<String>, Vec<String>) {
    let path = dir.join(format!("{name}.onnx"));
    save(graph, &path, ExternalData::Auto).unwrap();
    let op_types = |p: &Path| -> Vec<String> {
        let m = v2l_graphs::read_model(p).unwrap();
        m.graph
            .unwrap()
            .node
            .into_iter()
            .map(|n| n.op_type)
            .collect()
    };
    let optimized = dir.join(format!("{name}.optimized.onnx"));
    let opts = SessionOptions {
        optimized_graph: Some(optimized.clone()),
        ..Default::default()
    };
    drop(Model::load(&path, &opts).unwrap());
    (op_types(&path), op_types(&optimized))
}

#[test]
fn onnx_runtime_fuses_every_gelu_and_rms_norm() {
    let d = tempfile::tempdir().unwrap();
    let wan = fixtures().join("wan-tiny");
    let open = |p: &Path| Checkpoint::open_dir(p).unwrap();
    let hypernet = Checkpoint::open_file(&tiny().join("hypernetwork.safetensors")).unwrap();
    let graphs = [
        // T5's RMS norms and tanh GELUs.
        (
            "t5",
            t5_encoder::export(&open(&tiny().join("text_encoder")), None)
                .unwrap()
                .graph,
        ),
        (
            "umt5",
            t5_encoder::export(&open(&wan.join("text_encoder")), None)
                .unwrap()
                .graph,
        ),
        // Exact GELUs.
        (
            "clip",
            clip_vision::export(&open(&wan.join("image_encoder")), None)
                .unwrap()
                .graph,
        ),
        (
            "video2lora",
            video2lora_hypernet::export(&hypernet, &Default::default())
                .unwrap()
                .graph,
        ),
        (
            "prompt2effect",
            prompt2effect::export(&open(&wan.join("prompt2effect")))
                .unwrap()
                .graph,
        ),
        (
            "lofa",
            lofa::export(&open(&wan.join("lofa/stage1")), lofa::Stage::One)
                .unwrap()
                .graph,
        ),
    ];
    for (name, graph) in graphs {
        let (exported, ops) = ops(&graph, d.path(), name);
        let unfused = ["Erf", "Tanh", "Pow"];
        assert!(
            exported.iter().any(|op| unfused.contains(&op.as_str())),
            "{name}: nothing to fuse was exported"
        );
        let left: Vec<&String> = ops
            .iter()
            .filter(|op| unfused.contains(&op.as_str()))
            .collect();
        assert!(left.is_empty(), "{name}: {left:?} left unfused in {ops:?}");
        let fused = ["Gelu", "FastGelu", "SimplifiedLayerNormalization"];
        assert!(
            ops.iter().any(|op| fused.contains(&op.as_str())),
            "{name}: {ops:?}"
        );
    }
}
