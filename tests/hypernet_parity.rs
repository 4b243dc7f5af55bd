//! The exported Video2LoRA hypernetwork computes what the authors' `VideoHyperDream` computes
//! (fixture `e2e_io`: `reference_latents` → `hyper_weights`, 4 refinement iterations).

use std::collections::BTreeMap;
use std::path::Path;

use v2l_export::video2lora_hypernet::{self, HypernetOptions};
use v2l_export::Checkpoint;
use v2l_graphs::{save, ExternalData};
use v2l_runtime::{Model, SessionOptions, Tensor};
use v2l_tests::*;

fn hypernet_path() -> std::path::PathBuf {
    tiny().join("hypernetwork.safetensors")
}

/// Exports the fixture hypernetwork with `iterations` and loads it in ONNX Runtime.
fn export_and_load(dir: &Path, iterations: usize) -> Model {
    let ck = Checkpoint::open_file(&hypernet_path()).unwrap();
    let ex = video2lora_hypernet::export(&ck, &HypernetOptions { iterations }).unwrap();
    assert_eq!(
        (
            ex.dims.feature_dim,
            ex.dims.weight_dim,
            ex.dims.num_layers,
            ex.dims.heads,
            ex.dims.blocks,
            ex.dims.iterations
        ),
        (16, 150, 21, 2, 4, iterations)
    );
    // The top-level copy of the sinusoid table upstream never reads is skipped on purpose.
    assert!(ex.unused_keys.is_empty(), "unused: {:?}", ex.unused_keys);
    load_graph(&ex.graph, &dir.join(format!("hypernet_k{iterations}.onnx")))
}

/// Writes an exported graph to `path` and loads it in ONNX Runtime.
fn load_graph(graph: &v2l_graphs::Graph, path: &Path) -> Model {
    save(graph, path, ExternalData::Auto).unwrap();
    Model::load(path, &SessionOptions::default()).unwrap()
}

fn latents(shape: Vec<usize>, seed: u64) -> BTreeMap<String, Tensor> {
    let n = shape.iter().product();
    BTreeMap::from([(
        "reference_latents".to_string(),
        Tensor::f32(shape, noise(n, seed)),
    )])
}

#[test]
fn hypernet_matches_upstream() {
    let dir = tempfile::tempdir().unwrap();
    let mut model = export_and_load(dir.path(), 4);
    let io = load("e2e_io.safetensors");
    let out = model.run(&pick(&io, &["reference_latents"])).unwrap();
    assert_close(
        "hyper_weights",
        &out["hyper_weights"],
        &io["hyper_weights"],
        F32_REL_L2,
    );
}

/// Batch, frame count and latent size are not baked in.
#[test]
fn hypernet_runs_on_another_input_size() {
    let dir = tempfile::tempdir().unwrap();
    let mut model = export_and_load(dir.path(), 4);
    let out = model.run(&latents(vec![2, 16, 3, 6, 10], 5)).unwrap();
    let w = &out["hyper_weights"];
    assert_eq!(w.shape, vec![2, 21, 150]);
    assert_finite("hyper_weights", w);
    // The two batch entries saw different videos, so their rows differ.
    let v = w.as_f32("hyper_weights").unwrap();
    let (a, b) = v.split_at(21 * 150);
    assert!(v2l_runtime::tensor::rel_l2(a, b) > 1e-3);
}

/// Fewer refinements export and run, and the refinement count matters.
#[test]
fn hypernet_with_fewer_iterations() {
    let dir = tempfile::tempdir().unwrap();
    let io = load("e2e_io.safetensors");
    let inputs = pick(&io, &["reference_latents"]);
    let mut outs = Vec::new();
    for k in [1, 2] {
        let mut model = export_and_load(dir.path(), k);
        let out = model.run(&inputs).unwrap();
        let w = out["hyper_weights"].clone();
        assert_eq!(w.shape, vec![1, 21, 150], "k = {k}");
        assert_finite(&format!("hyper_weights (k = {k})"), &w);
        outs.push(w);
    }
    let k1_vs_k4 = outs[0].rel_l2(&io["hyper_weights"]);
    let k2_vs_k4 = outs[1].rel_l2(&io["hyper_weights"]);
    eprintln!("relative L2 to the k = 4 output: k = 1 {k1_vs_k4:.3e}, k = 2 {k2_vs_k4:.3e}");
    assert!(k1_vs_k4 > 1e-3, "k = 1 gives the k = 4 output");
    assert!(
        outs[0].rel_l2(&outs[1]) > 1e-3,
        "k = 1 gives the k = 2 output"
    );
}

/// A checkpoint without `feature_proj.weight` is refused with the file and the key named.
#[test]
fn hypernet_checkpoint_without_feature_proj_is_an_error() {
    let bytes = std::fs::read(hypernet_path()).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let missing = "img_weight_generator.feature_proj.weight";
    let kept: Vec<(String, safetensors::tensor::TensorView)> = st
        .tensors()
        .into_iter()
        .filter(|(k, _)| k != missing)
        .collect();
    assert_eq!(kept.len() + 1, st.len());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("no_feature_proj.safetensors");
    safetensors::serialize_to_file(kept, &None, &path).unwrap();

    let ck = Checkpoint::open_file(&path).unwrap();
    let err = video2lora_hypernet::export(&ck, &Default::default())
        .err()
        .unwrap()
        .to_string();
    eprintln!("{err}");
    assert!(
        err.contains("no_feature_proj.safetensors") && err.contains(missing),
        "{err}"
    );
}

/// No dimension of the fixture is baked in: another feature width, row width (1 head of 96),
/// row count and depth export and run.
#[test]
fn hypernet_of_another_shape_exports_and_runs() {
    let dir = tempfile::tempdir().unwrap();
    let dims = video2lora_hypernet::HypernetDims {
        feature_dim: 8,
        weight_dim: 96,
        num_layers: 5,
        heads: 1,
        blocks: 2,
        iterations: 3,
        context_len: None,
        context_encoder: None,
    };
    let ck_dir = dir.path().join("hyper");
    v2l_export::synthetic::write_checkpoint(
        &ck_dir,
        &serde_json::json!({}),
        &video2lora_hypernet::checkpoint_layout(&dims),
        v2l_graphs::DType::F32,
        11,
        &mut |_, _| {},
    )
    .unwrap();
    let ck = Checkpoint::open_file(&ck_dir.join("diffusion_pytorch_model.safetensors")).unwrap();
    let ex = video2lora_hypernet::export(&ck, &HypernetOptions { iterations: 3 }).unwrap();
    assert_eq!(ex.dims, dims);
    let path = dir.path().join("hypernet.onnx");
    save(&ex.graph, &path, ExternalData::Auto).unwrap();
    let mut model = Model::load(&path, &SessionOptions::default()).unwrap();
    let out = model.run(&latents(vec![1, 8, 2, 4, 6], 9)).unwrap();
    assert_eq!(out["hyper_weights"].shape, vec![1, 5, 96]);
    assert_finite("hyper_weights", &out["hyper_weights"]);
}

/// v2l's extensions: a checkpoint with a learned table of context positions
/// (`context_pos_emb`) and a context encoder (`context_encoder.*`; fixture made from
/// training/video2lora.py by tests/fixtures/gen/hypernet_context.py) exports with the table
/// added to the context and the encoder's rows added to the decoder's.
#[test]
fn hypernet_with_context_extensions_matches_pytorch() {
    let fx = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/hypernet-context");
    let ck = Checkpoint::open_file(&fx.join("hypernetwork.safetensors")).unwrap();
    let ex = video2lora_hypernet::export(&ck, &HypernetOptions { iterations: 3 }).unwrap();
    assert_eq!(ex.dims.context_len, Some(32));
    assert_eq!(
        ex.dims.context_encoder,
        Some(video2lora_hypernet::ContextEncoderDims {
            hidden: 8,
            grid: [2, 4, 4],
        })
    );
    assert!(ex.unused_keys.is_empty(), "unused: {:?}", ex.unused_keys);
    let dir = tempfile::tempdir().unwrap();
    let mut model = load_graph(&ex.graph, &dir.path().join("hypernet.onnx"));
    let io = v2l_runtime::read_safetensors(&fx.join("io.safetensors")).unwrap();
    let out = model.run(&pick(&io, &["reference_latents"])).unwrap();
    assert_close(
        "hyper_weights",
        &out["hyper_weights"],
        &io["hyper_weights"],
        F32_REL_L2,
    );
    // The table and the encoder each make a difference to the same model without them.
    for other in ["hyper_weights_no_table", "hyper_weights_no_encoder"] {
        let without = out["hyper_weights"].rel_l2(&io[other]);
        assert!(without > 0.1, "{other}: {without}");
    }
}
