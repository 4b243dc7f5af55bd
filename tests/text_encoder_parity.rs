//! The exported T5 prompt encoder computes what transformers' `T5EncoderModel` computes, run as
//! diffusers' CogVideoX pipelines run it (fixture `text_io`: ten awkward prompts tokenized at 8
//! and at 226 tokens → `prompt_embeds`, no attention mask).

use std::collections::BTreeMap;
use std::path::Path;

use v2l_export::{t5_encoder, Checkpoint};
use v2l_graphs::{save, ExternalData};
use v2l_runtime::{Model, SessionOptions, Tensor};
use v2l_tests::*;

/// The bound for prompt embeddings (float32).
const EMBEDS_REL_L2: f64 = 1e-5;

fn export_and_load(checkpoint: &Path, dir: &Path) -> Model {
    let ck = Checkpoint::open_dir(checkpoint).unwrap();
    let ex = t5_encoder::export(&ck, None).unwrap();
    assert_eq!((ex.config.d_model, ex.config.num_layers), (32, 2));
    assert!(ex.unused_keys.is_empty(), "unused: {:?}", ex.unused_keys);
    let path = dir.join("text_encoder.onnx");
    save(&ex.graph, &path, ExternalData::Auto).unwrap();
    Model::load(&path, &SessionOptions::default()).unwrap()
}

fn encode(m: &mut Model, ids: &Tensor) -> Tensor {
    let feed = BTreeMap::from([("input_ids".to_string(), ids.clone())]);
    m.run(&feed).unwrap().remove("prompt_embeds").unwrap()
}

#[test]
fn prompt_embeddings_match_transformers_at_both_lengths() {
    let d = tempfile::tempdir().unwrap();
    let mut m = export_and_load(&tiny().join("text_encoder"), d.path());
    let io = load("text_io.safetensors");
    for len in ["short", "full"] {
        let got = encode(&mut m, &io[&format!("input_ids_{len}")]);
        let want = &io[&format!("prompt_embeds_{len}")];
        assert_close(&format!("prompt_embeds_{len}"), &got, want, EMBEDS_REL_L2);
    }
}

/// A sharded checkpoint (transformers' `model.safetensors.index.json`) exports the same graph:
/// the same embeddings, bitwise.
#[test]
fn a_sharded_checkpoint_gives_the_same_embeddings() {
    let d = tempfile::tempdir().unwrap();
    let src = tiny().join("text_encoder");
    let sharded = d.path().join("sharded");
    std::fs::create_dir(&sharded).unwrap();
    std::fs::copy(src.join("config.json"), sharded.join("config.json")).unwrap();
    let all = v2l_runtime::read_safetensors(&src.join("model.safetensors")).unwrap();
    let (mut a, mut b) = (BTreeMap::new(), BTreeMap::new());
    let mut map = serde_json::Map::new();
    for (i, (k, v)) in all.into_iter().enumerate() {
        let file = if i % 2 == 0 {
            "model-00001-of-00002.safetensors"
        } else {
            "model-00002-of-00002.safetensors"
        };
        map.insert(k.clone(), file.into());
        if i % 2 == 0 {
            a.insert(k, v)
        } else {
            b.insert(k, v)
        };
    }
    v2l_runtime::tensor::write_safetensors(&sharded.join("model-00001-of-00002.safetensors"), &a)
        .unwrap();
    v2l_runtime::tensor::write_safetensors(&sharded.join("model-00002-of-00002.safetensors"), &b)
        .unwrap();
    std::fs::write(
        sharded.join("model.safetensors.index.json"),
        serde_json::json!({"metadata": {}, "weight_map": map}).to_string(),
    )
    .unwrap();
    let (one, two) = (d.path().join("one"), d.path().join("two"));
    std::fs::create_dir_all(&one).unwrap();
    std::fs::create_dir_all(&two).unwrap();
    let ids = &load("text_io.safetensors")["input_ids_short"];
    let want = encode(&mut export_and_load(&src, &one), ids);
    let got = encode(&mut export_and_load(&sharded, &two), ids);
    assert!(got == want, "sharded export differs");
}

/// Token ids outside the vocabulary are one clear error before any session is built.
#[test]
fn out_of_vocabulary_ids_are_refused_by_name() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("export");
    std::fs::create_dir_all(&out).unwrap();
    let ck = Checkpoint::open_dir(&tiny().join("text_encoder")).unwrap();
    let ex = t5_encoder::export(&ck, None).unwrap();
    save(
        &ex.graph,
        &out.join("text_encoder.onnx"),
        ExternalData::Auto,
    )
    .unwrap();
    let mut manifest = v2l_export::Manifest::read_or_default(&out).unwrap();
    manifest.text_encoder = Some(v2l_export::manifest::TextEncoderEntry {
        file: "text_encoder.onnx".into(),
        model_type: "t5".into(),
        d_model: 32,
        vocab_size: ex.config.vocab_size,
        tokenizer: String::new(),
        weight_dtype: v2l_graphs::DType::F32,
        config: ck.raw_config().unwrap().clone(),
    });
    manifest.write(&out).unwrap();
    let engine = v2l_runtime::engine::Engine::open(&out).unwrap();
    let stage = v2l_tools::stage::Stage::TextEncoder;
    for (ids, why) in [
        (vec![3, 500], "holds 500 at element 1"),
        (vec![-1, 3], "holds -1 at element 0"),
    ] {
        let inputs = BTreeMap::from([("input_ids".to_string(), Tensor::i64(vec![1, 2], ids))]);
        let e =
            v2l_tools::stage::check_inputs(&engine, stage, &inputs, Path::new("ids.safetensors"))
                .unwrap_err()
                .to_string();
        assert!(e.contains("input_ids") && e.contains(why), "{e}");
    }
}
