//! The exported CogVideoX DiT computes what diffusers computes (fixture `dit_io`).

use std::collections::BTreeMap;

use v2l_export::{cogvideox_dit, Checkpoint};
use v2l_graphs::{save, ExternalData};
use v2l_runtime::{Model, SessionOptions, Tensor};
use v2l_tests::*;

/// The DiT's inputs of fixture `dit_io`.
fn dit_feed(
    io: &std::collections::BTreeMap<String, Tensor>,
) -> std::collections::BTreeMap<String, Tensor> {
    const INPUTS: [&str; 5] = [
        "hidden_states",
        "encoder_hidden_states",
        "timestep",
        "rope_cos",
        "rope_sin",
    ];
    pick(io, &INPUTS)
}

/// Rank-2 LoRA factors (scale 0.8) for every linear of `ex` into `feed`, seeded from `seed`;
/// the weights they target.
fn rank2_lora(
    ex: &cogvideox_dit::DitExport,
    feed: &mut BTreeMap<String, Tensor>,
    seed: u64,
) -> Vec<String> {
    for (i, l) in ex.linears.iter().enumerate() {
        let [a, b, sc] = v2l_graphs::passes::lora_input_names(&format!("{}.weight", l.name));
        let factor = |shape: Vec<usize>, seed: u64| {
            let t = v2l_runtime::tensor::gaussian_noise(shape.clone(), seed);
            let v = t.as_f32("f").unwrap().iter().map(|x| x * 0.05).collect();
            Tensor::f32(shape, v)
        };
        let k = seed + 2 * i as u64;
        feed.insert(a, factor(vec![1, 2, l.in_features], k));
        feed.insert(b, factor(vec![1, l.out_features, 2], k + 1));
        feed.insert(sc, Tensor::f32(vec![1, 1, 1], vec![0.8]));
    }
    ex.linears
        .iter()
        .map(|l| format!("{}.weight", l.name))
        .collect()
}

/// The tiny fixture's DiT exported to `dir/dit.onnx`.
/// Writes `m` to `path` and runs it once on `feed` (CPU provider).
fn run_written(
    m: &v2l_graphs::proto::ModelProto,
    path: &std::path::Path,
    feed: &std::collections::BTreeMap<String, Tensor>,
) -> std::collections::BTreeMap<String, Tensor> {
    v2l_graphs::write_model(path, m).unwrap();
    Model::load(path, &SessionOptions::default())
        .unwrap()
        .run(feed)
        .unwrap()
}

fn export_tiny(dir: &std::path::Path) -> (cogvideox_dit::DitExport, std::path::PathBuf) {
    let ck = Checkpoint::open_dir(&tiny().join("transformer")).unwrap();
    let ex = cogvideox_dit::export(&ck, &Default::default()).unwrap();
    let path = dir.join("dit.onnx");
    save(&ex.graph, &path, ExternalData::Auto).unwrap();
    (ex, path)
}

#[test]
fn dit_matches_diffusers() {
    let ck = Checkpoint::open_dir(&tiny().join("transformer")).unwrap();
    let ex = cogvideox_dit::export(&ck, &Default::default()).unwrap();
    assert!(ex.unused_keys.is_empty(), "unused: {:?}", ex.unused_keys);

    // All 21 nn.Linear weights are initializers under their checkpoint names, in LiLoRA order.
    let order: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tiny().join("variant.json")).unwrap())
            .unwrap();
    let expected: Vec<String> = order["lilora_layer_order"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            v.as_str()
                .unwrap()
                .trim_start_matches("lora_unet__")
                .to_string()
        })
        .collect();
    let got: Vec<String> = ex
        .linears
        .iter()
        .map(|l| l.name.replace('.', "_"))
        .collect();
    assert_eq!(got, expected);
    for l in &ex.linears {
        let name = format!("{}.weight", l.name);
        assert!(
            ex.graph.initializers().iter().any(|i| i.name == name),
            "{name} is not an initializer"
        );
    }

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dit.onnx");
    save(&ex.graph, &path, ExternalData::Auto).unwrap();
    let mut model = Model::load(&path, &SessionOptions::default()).unwrap();
    let io = load("dit_io.safetensors");
    let inputs = dit_feed(&io);
    let out = model.run(&inputs).unwrap();
    assert_close("dit sample", &out["sample"], &io["output"], F32_REL_L2);
}

/// No dimension of the fixture is baked in: another depth, width, head size, channel count,
/// frame count and aspect ratio export and run.
#[test]
fn dit_of_another_shape_exports_and_runs() {
    let dir = tempfile::tempdir().unwrap();
    let ck_dir = dir.path().join("transformer");
    let config = serde_json::json!({
        "num_attention_heads": 3, "attention_head_dim": 8, "in_channels": 16, "out_channels": 8,
        "time_embed_dim": 20, "text_embed_dim": 24, "num_layers": 3, "patch_size": 2,
        "use_rotary_positional_embeddings": true, "max_text_seq_length": 5,
    });
    synthetic_dit(&ck_dir, config, v2l_graphs::DType::F32);
    let ck = Checkpoint::open_dir(&ck_dir).unwrap();
    let ex = cogvideox_dit::export(&ck, &Default::default()).unwrap();
    assert_eq!(ex.linears.len(), 3 + 3 * 8 + 2);
    let path = dir.path().join("dit.onnx");
    save(&ex.graph, &path, ExternalData::Auto).unwrap();
    let mut model = Model::load(&path, &SessionOptions::default()).unwrap();
    // 3 latent frames, 6x10 latents (non-square), 5 text tokens, batch 1.
    let inputs = dit_inputs(1, 3, 16, 6, 10, 5, 24, 2, 8);
    let out = model.run(&inputs).unwrap();
    assert_eq!(out["sample"].shape, vec![1, 3, 8, 6, 10]);
    assert_finite("sample", &out["sample"]);

    // Feed-forward chunking: 50 token rows are padded to 52 for 4 slices and cut back.
    let mut m = v2l_graphs::read_model(&path).unwrap();
    assert_eq!(
        v2l_graphs::passes::chunk_feed_forward(&mut m, 4),
        3,
        "one per block"
    );
    let chunked = dir.path().join("dit_chunked.onnx");
    v2l_graphs::write_model(&chunked, &m).unwrap();
    let c = Model::load(&chunked, &SessionOptions::default())
        .unwrap()
        .run(&inputs)
        .unwrap();
    assert_close("chunked sample", &c["sample"], &out["sample"], 1e-6);
}

/// The graph `v2l-compile` gives ONNX Runtime: attention as `com.microsoft.MultiHeadAttention`
/// (no score matrix) and GELU as `com.microsoft.FastGelu`, still what diffusers computes.
#[test]
fn dit_with_fused_attention_and_gelu_matches_diffusers() {
    let dir = tempfile::tempdir().unwrap();
    let (ex, path) = export_tiny(dir.path());
    let mut m = v2l_graphs::read_model(&path).unwrap();
    let heads = ex.config.num_attention_heads as i64;
    assert_eq!(
        v2l_graphs::passes::fuse_attention(&mut m, heads),
        2,
        "one per block"
    );
    assert_eq!(v2l_graphs::passes::fuse_gelu(&mut m), 2, "one per block");
    let ops: Vec<&str> = m
        .graph
        .as_ref()
        .unwrap()
        .node
        .iter()
        .map(|n| n.op_type.as_str())
        .collect();
    assert!(
        !ops.contains(&"Softmax") && !ops.contains(&"Tanh"),
        "{ops:?}"
    );
    // A second pass finds nothing left to fuse.
    assert_eq!(v2l_graphs::passes::fuse_attention(&mut m, heads), 0);
    assert_eq!(v2l_graphs::passes::fuse_gelu(&mut m), 0);
    // What v2l-compile writes for the CPU: each feed-forward in token slices inside a Scan,
    // LoRA branches included (the `unfused` variant).
    let mut unfused = m.clone();
    let targets: Vec<String> = ex
        .linears
        .iter()
        .map(|l| format!("{}.weight", l.name))
        .collect();
    v2l_graphs::passes::add_lora_branches(&mut unfused, &targets).unwrap();
    let whole = unfused.clone();
    assert_eq!(v2l_graphs::passes::chunk_feed_forward(&mut unfused, 4), 2);
    // Chunked, the branches still meet each sample's own factors: a batch of 2 with a
    // different LoRA per sample gives the unchunked graph's output.
    let io = load("dit_io.safetensors");
    let mut feed = dit_feed(&io);
    assert_eq!(feed["hidden_states"].shape[0], 2, "the fixture's batch");
    for (i, l) in ex.linears.iter().enumerate() {
        let [a, b, sc] = v2l_graphs::passes::lora_input_names(&format!("{}.weight", l.name));
        let r = 3;
        let small = |n: usize, seed: u64| {
            let t = v2l_runtime::tensor::gaussian_noise(vec![n], seed);
            t.as_f32("f")
                .unwrap()
                .iter()
                .map(|x| x * 0.05)
                .collect::<Vec<f32>>()
        };
        let seed = 100 + 3 * i as u64;
        feed.insert(
            a,
            Tensor::f32(
                vec![2, r, l.in_features],
                small(2 * r * l.in_features, seed),
            ),
        );
        feed.insert(
            b,
            Tensor::f32(
                vec![2, l.out_features, r],
                small(2 * r * l.out_features, seed + 1),
            ),
        );
        feed.insert(sc, Tensor::f32(vec![2, 1, 1], vec![1.0, 0.5]));
    }
    let run = |m, name| run_written(m, &dir.path().join(name), &feed);
    let (a, b) = (
        run(&whole, "unfused.onnx"),
        run(&unfused, "unfused_chunked.onnx"),
    );
    assert_close(
        "chunked per-sample LoRA branches",
        &b["sample"],
        &a["sample"],
        1e-6,
    );
    assert_eq!(
        v2l_graphs::passes::chunk_feed_forward(&mut m, 4),
        2,
        "one per block"
    );
    let scans = m
        .graph
        .as_ref()
        .unwrap()
        .node
        .iter()
        .filter(|n| n.op_type == "Scan");
    assert_eq!(scans.count(), 2);
    assert_eq!(
        v2l_graphs::passes::chunk_feed_forward(&mut m, 4),
        0,
        "nothing left"
    );
    let fused = dir.path().join("dit_fused.onnx");
    v2l_graphs::write_model(&fused, &m).unwrap();

    let inputs = dit_feed(&io);
    let out = Model::load(&fused, &SessionOptions::default())
        .unwrap()
        .run(&inputs)
        .unwrap();
    assert_close("fused dit sample", &out["sample"], &io["output"], 1e-5);
}

/// Each fused `MultiHeadAttention` as ONNX's own `Attention` (`passes::onnx_attention`: opset
/// 23, `[B,S,D]` inputs with the heads as attributes), run here in f32 on the CPU provider,
/// which has the same operator: the same attention, still what diffusers computes.
#[test]
fn dit_on_onnx_attention_matches_diffusers() {
    let dir = tempfile::tempdir().unwrap();
    let (ex, path) = export_tiny(dir.path());
    let mut mha = v2l_graphs::read_model(&path).unwrap();
    let heads = ex.config.num_attention_heads as i64;
    assert_eq!(v2l_graphs::passes::fuse_attention(&mut mha, heads), 2);
    let mut onnx = mha.clone();
    assert_eq!(v2l_graphs::passes::onnx_attention(&mut onnx).unwrap(), 2);
    let ai_onnx = |m: &v2l_graphs::proto::ModelProto| {
        m.opset_import
            .iter()
            .find(|o| o.domain.is_empty())
            .map(|o| o.version)
    };
    assert_eq!(ai_onnx(&onnx), Some(23));
    let nodes = &onnx.graph.as_ref().unwrap().node;
    assert!(nodes.iter().all(|n| n.op_type != "MultiHeadAttention"));
    let attention: Vec<_> = nodes.iter().filter(|n| n.op_type == "Attention").collect();
    assert_eq!(attention.len(), 2);
    for n in attention {
        assert!(n.domain.is_empty(), "{}", n.domain);
        let int = |k: &str| n.attribute.iter().find(|a| a.name == k).map(|a| a.i);
        assert_eq!(
            (int("q_num_heads"), int("kv_num_heads")),
            (Some(heads), Some(heads))
        );
    }
    let io = load("dit_io.safetensors");
    let feed = dit_feed(&io);
    let run = |m, name| run_written(m, &dir.path().join(name), &feed);
    let (a, b) = (run(&mha, "mha.onnx"), run(&onnx, "onnx_attention.onnx"));
    let (a, b) = (&a["sample"], &b["sample"]);
    assert_close("ONNX Attention against MultiHeadAttention", b, a, 1e-6);
    assert_close(
        "ONNX Attention against diffusers",
        b,
        &io["output"],
        F32_REL_L2,
    );
}

/// The graph `v2l-compile` gives ONNX Runtime's CUDA provider: each RoPE one
/// `com.microsoft.RotaryEmbedding` (run here on the CPU provider, which has the same op), still
/// what diffusers computes and within 1e-6 of the exported form.
#[test]
fn dit_with_fused_rope_matches_diffusers() {
    let dir = tempfile::tempdir().unwrap();
    let (ex, path) = export_tiny(dir.path());
    let io = load("dit_io.safetensors");
    let feed = dit_feed(&io);
    let q_and_k = 2 * ex.config.num_layers;
    assert_rope_fuses(&path, &feed, q_and_k, &io["output"], F32_REL_L2);
}

/// On CUDA engines the feed-forward's bias moves from its `Gemm` into the `FastGelu` after it
/// (`passes::fuse_gelu_bias`): the same sum, run here on the CPU provider, with and without
/// LoRA branches added afterwards (as `v2l-compile` orders the passes).
#[test]
fn dit_with_the_gelu_bias_fused_matches_diffusers() {
    let dir = tempfile::tempdir().unwrap();
    let (ex, path) = export_tiny(dir.path());
    let mut m = v2l_graphs::read_model(&path).unwrap();
    assert_eq!(v2l_graphs::passes::fuse_gelu(&mut m), 2, "one per block");
    let before = m.clone();
    assert_eq!(
        v2l_graphs::passes::fuse_gelu_bias(&mut m),
        2,
        "one per block"
    );
    assert_eq!(
        v2l_graphs::passes::fuse_gelu_bias(&mut m),
        0,
        "nothing left"
    );
    let nodes = &m.graph.as_ref().unwrap().node;
    for g in nodes.iter().filter(|n| n.op_type == "FastGelu") {
        let bias = g.input.get(1).expect("FastGelu takes the bias");
        assert!(bias.ends_with("ff.net.0.proj.bias"), "{bias}");
        assert!(
            nodes
                .iter()
                .all(|n| n.op_type != "Gemm" || !n.input.contains(bias)),
            "{bias} is still a Gemm's"
        );
    }
    let io = load("dit_io.safetensors");
    let run = |m: &v2l_graphs::proto::ModelProto, name: &str, feed: &BTreeMap<String, Tensor>| {
        sample_of(&dir.path().join(name), m, feed)
    };
    let feed = dit_feed(&io);
    let fused = run(&m, "bias_fused.onnx", &feed);
    assert_close("bias-fused dit sample", &fused, &io["output"], 1e-5);
    assert_close(
        "bias-fused against the exported bias",
        &fused,
        &run(&before, "bias_in_gemm.onnx", &feed),
        1e-6,
    );
    // LoRA branches over the fused form: the branch adds onto the bias-free product.
    let mut feed = feed;
    let targets = rank2_lora(&ex, &mut feed, 300);
    let (mut with, mut without) = (m, before);
    v2l_graphs::passes::add_lora_branches(&mut with, &targets).unwrap();
    v2l_graphs::passes::add_lora_branches(&mut without, &targets).unwrap();
    assert_close(
        "bias-fused with LoRA branches",
        &run(&with, "bias_fused_lora.onnx", &feed),
        &run(&without, "bias_in_gemm_lora.onnx", &feed),
        1e-6,
    );
}

/// On CUDA engines each AdaLN modulation, `LayerNorm(x)·(1 + scale) + shift`, is folded into
/// its `LayerNormalization`'s scale and bias (`passes::fold_modulation`, `[batch, 1, hidden]`
/// vectors broadcast over the tokens): the same sums, run here on the CPU provider, before and
/// after the other CUDA rewrites and with LoRA branches added afterwards.
#[test]
fn dit_with_the_modulation_folded_into_its_norms_matches_diffusers() {
    let dir = tempfile::tempdir().unwrap();
    let (ex, path) = export_tiny(dir.path());
    let before = v2l_graphs::read_model(&path).unwrap();
    let mut m = before.clone();
    // Text and video of norm1 and norm2 in each of 2 blocks, and the output norm.
    assert_eq!(v2l_graphs::passes::fold_modulation(&mut m), 9);
    assert_eq!(
        v2l_graphs::passes::fold_modulation(&mut m),
        0,
        "nothing left"
    );
    let nodes = &m.graph.as_ref().unwrap().node;
    let norms: Vec<_> = nodes
        .iter()
        .filter(|n| n.op_type == "LayerNormalization")
        .collect();
    // Every norm reads its scale and bias; the folded ones read computed ones.
    let folded = norms
        .iter()
        .filter(|n| n.input.get(1).is_some_and(|g| g.ends_with(".scale")))
        .count();
    assert_eq!(folded, 9, "{norms:?}");
    let io = load("dit_io.safetensors");
    let run = |m: &v2l_graphs::proto::ModelProto, name: &str, feed: &BTreeMap<String, Tensor>| {
        sample_of(&dir.path().join(name), m, feed)
    };
    let feed = dit_feed(&io);
    let folded = run(&m, "folded.onnx", &feed);
    assert_close("modulation-folded dit sample", &folded, &io["output"], 1e-5);
    // The fixture's two samples share a timestep; with two, each sample's modulation must
    // reach its own rows.
    let mut feed = feed;
    two_timesteps(&mut feed);
    assert_close(
        "modulation folded against the exported form, a timestep per sample",
        &run(&m, "folded_two.onnx", &feed),
        &run(&before, "exported_two.onnx", &feed),
        1e-6,
    );
    // After the other CUDA rewrites (as `v2l-compile` orders them), and with LoRA branches.
    let mut cuda = before.clone();
    let heads = ex.config.num_attention_heads as i64;
    assert_eq!(v2l_graphs::passes::fuse_attention(&mut cuda, heads), 2);
    assert_eq!(v2l_graphs::passes::fuse_gelu(&mut cuda), 2);
    assert_eq!(v2l_graphs::passes::fuse_gelu_bias(&mut cuda), 2);
    let mut cuda_folded = cuda.clone();
    assert_eq!(v2l_graphs::passes::fold_modulation(&mut cuda_folded), 9);
    let targets = rank2_lora(&ex, &mut feed, 500);
    v2l_graphs::passes::add_lora_branches(&mut cuda, &targets).unwrap();
    v2l_graphs::passes::add_lora_branches(&mut cuda_folded, &targets).unwrap();
    assert_close(
        "modulation folded, cuda rewrites, LoRA branches",
        &run(&cuda_folded, "cuda_folded_lora.onnx", &feed),
        &run(&cuda, "cuda_lora.onnx", &feed),
        1e-6,
    );
}
