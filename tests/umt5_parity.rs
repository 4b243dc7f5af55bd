//! The exported umT5 prompt encoder (Wan's text encoder) computes what transformers'
//! `UMT5EncoderModel` computes (fixture `wan-tiny/umt5_io`, made by
//! `tests/fixtures/gen/umt5_tiny.py`): a relative-position bias table in every layer, and the
//! attention mask diffusers' Wan pipelines pass (padded keys take no part).

use std::collections::BTreeMap;

use v2l_export::{t5_encoder, Checkpoint};
use v2l_graphs::{save, ExternalData};
use v2l_runtime::{read_safetensors, Model, SessionOptions, Tensor};
use v2l_tests::*;

/// The bound for prompt embeddings (float32), as for T5.
const EMBEDS_REL_L2: f64 = 1e-5;

fn wan_tiny() -> std::path::PathBuf {
    fixtures().join("wan-tiny")
}

#[test]
fn umt5_embeddings_match_transformers_with_and_without_padding() {
    let ck = Checkpoint::open_dir(&wan_tiny().join("text_encoder")).unwrap();
    let ex = t5_encoder::export(&ck, None).unwrap();
    assert_eq!(ex.config.model_type, "umt5");
    assert!(ex.unused_keys.is_empty(), "unused: {:?}", ex.unused_keys);
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("text_encoder.onnx");
    save(&ex.graph, &path, ExternalData::Auto).unwrap();
    let mut m = Model::load(&path, &SessionOptions::default()).unwrap();
    assert_eq!(m.input_names(), ["input_ids", "attention_mask"]);

    let io = read_safetensors(&wan_tiny().join("umt5_io.safetensors")).unwrap();
    let mut run = |mask: &Tensor| {
        let feed = BTreeMap::from([
            ("input_ids".to_string(), io["input_ids"].clone()),
            ("attention_mask".to_string(), mask.clone()),
        ]);
        m.run(&feed).unwrap().remove("prompt_embeds").unwrap()
    };
    // With the tokenizer's mask (the second prompt padded after 7 tokens), as Wan runs it.
    let masked = run(&io["attention_mask"]);
    assert_close(
        "prompt_embeds_masked",
        &masked,
        &io["prompt_embeds_masked"],
        EMBEDS_REL_L2,
    );
    // All ones is transformers without a mask.
    let ones = Tensor::i64(
        io["input_ids"].shape.clone(),
        vec![1; io["input_ids"].numel()],
    );
    assert_close(
        "prompt_embeds",
        &run(&ones),
        &io["prompt_embeds"],
        EMBEDS_REL_L2,
    );
}

/// T5 v1.1 (CogVideoX) keeps its graph: one shared bias table, no mask input.
#[test]
fn t5_graphs_take_no_mask() {
    let ck = Checkpoint::open_dir(&tiny().join("text_encoder")).unwrap();
    let ex = t5_encoder::export(&ck, None).unwrap();
    let inputs: Vec<&str> = ex.graph.inputs().iter().map(|i| i.name.as_str()).collect();
    assert_eq!(inputs, ["input_ids"]);
}
