//! What a text-encoder graph is fed, with or without the tokenizer.

use std::collections::BTreeMap;
use v2l_contracts::io::text as text_io;

use crate::tensor::Tensor;

/// The feed of a text-encoder graph: `input_ids`, and for graphs that take one (umT5) an
/// `attention_mask` — the given one, or 1 for every token that is not padding (id 0, `<pad>`
/// in T5 and umT5 vocabularies), as the tokenizer's mask is.
pub fn encoder_feed(
    model: &crate::session::Model,
    ids: Tensor,
    mask: Option<Tensor>,
) -> BTreeMap<String, Tensor> {
    let mut feed = BTreeMap::new();
    if model.input_names().iter().any(|n| n == "attention_mask") {
        let mask = mask.unwrap_or_else(|| {
            let m = match &ids.data {
                crate::tensor::Data::I64(v) => v.iter().map(|&i| i64::from(i != 0)).collect(),
                _ => vec![1; ids.numel()],
            };
            Tensor::i64(ids.shape.clone(), m)
        });
        feed.insert("attention_mask".to_string(), mask);
    }
    feed.insert(text_io::INPUT_IDS.to_string(), ids);
    feed
}
