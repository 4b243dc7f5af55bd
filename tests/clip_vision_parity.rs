//! The exported CLIP image encoder computes what transformers' `CLIPVisionModel` gives Wan's
//! I2V pipeline: the penultimate layer's hidden states (fixture `wan-tiny/clip_io`, made by
//! `tests/fixtures/gen/clip_vision.py`).

use std::collections::BTreeMap;

use v2l_export::{clip_vision, Checkpoint};
use v2l_graphs::{save, ExternalData};
use v2l_runtime::{read_safetensors, Model, SessionOptions};
use v2l_tests::*;

const EMBEDS_REL_L2: f64 = 1e-5;

#[test]
fn clip_image_embeddings_match_transformers() {
    let wan = fixtures().join("wan-tiny");
    let ck = Checkpoint::open_dir(&wan.join("image_encoder")).unwrap();
    let ex = clip_vision::export(&ck, None).unwrap();
    // The last layer and post_layernorm are not used: Wan takes hidden_states[-2].
    assert!(
        ex.unused_keys
            .iter()
            .all(|k| k.starts_with("encoder.layers.2.") || k.starts_with("post_layernorm.")),
        "{:?}",
        ex.unused_keys
    );
    assert_eq!(ex.unused_keys.len(), 18);
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("image_encoder.onnx");
    save(&ex.graph, &path, ExternalData::Auto).unwrap();
    let mut m = Model::load(&path, &SessionOptions::default()).unwrap();
    let io = read_safetensors(&wan.join("clip_io.safetensors")).unwrap();
    let feed = BTreeMap::from([("pixel_values".to_string(), io["pixel_values"].clone())]);
    let got = m.run(&feed).unwrap().remove("image_embeds").unwrap();
    assert_close("image_embeds", &got, &io["image_embeds"], EMBEDS_REL_L2);
}
