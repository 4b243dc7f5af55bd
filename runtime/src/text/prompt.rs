//! Prompt text → `prompt_embeds`: tokenize at the sequence length, run the text encoder, and
//! remember the result per text, so one process never encodes the same prompt twice.

use std::collections::BTreeMap;

use crate::engine::Engine;
use crate::error::{Result, RuntimeError};
use crate::session::{Model, SessionOptions};
use crate::tensor::Tensor;
use crate::text::tokenizer::{Encoded, PromptTokenizer};

/// The engine's tokenizer and text encoder, with a cache of encoded prompts.
pub struct PromptEncoder {
    tokenizer: PromptTokenizer,
    model: Model,
    /// Wan's pipelines (umT5): whitespace-cleaned prompts, embeddings zeroed past the tokens.
    wan: bool,
    cache: BTreeMap<(String, usize), (Vec<i64>, Tensor)>,
}

impl PromptEncoder {
    /// Loads the tokenizer and text encoder of `engine` (exported by `v2l-export pipeline` from
    /// a model directory with `tokenizer/` and `text_encoder/`).
    pub fn load(engine: &Engine, opts: &SessionOptions) -> Result<PromptEncoder> {
        let e = engine
            .manifest
            .text_encoder
            .as_ref()
            .ok_or_else(|| engine.missing("text encoder", "text-encoder"))?;
        let dir = engine.dir.join(&e.tokenizer);
        if e.tokenizer.is_empty() || !dir.is_dir() {
            return Err(RuntimeError::Invalid {
                what: engine.dir.display().to_string(),
                message: "has a text encoder but no tokenizer; export the pipeline directory (its tokenizer/ is copied), or pass --prompt-embeds".into(),
            });
        }
        Ok(PromptEncoder {
            tokenizer: PromptTokenizer::from_dir(&dir)?,
            model: Model::load(
                &engine.dir.join(&e.file),
                &engine.text_encoder_options(opts),
            )?,
            cache: BTreeMap::new(),
            wan: e.model_type == "umt5",
        })
    }

    pub fn tokenizer(&self) -> &PromptTokenizer {
        &self.tokenizer
    }

    /// `[1, len, D]` embeddings of `text` and its `[len]` ids; the second call with the same
    /// text and length is a lookup. `on_truncate` hears of a prompt longer than `len`.
    pub fn encode(
        &mut self,
        text: &str,
        len: usize,
        on_truncate: &mut dyn FnMut(usize),
    ) -> Result<(Vec<i64>, Tensor)> {
        let key = (text.to_string(), len);
        if let Some(hit) = self.cache.get(&key) {
            return Ok(hit.clone());
        }
        // `WanPipeline._get_t5_prompt_embeds` runs `prompt_clean` first: whitespace runs become
        // one space, ends stripped (and, not done here, `ftfy` and HTML unescaping).
        let cleaned;
        let text = if self.wan {
            cleaned = text.split_whitespace().collect::<Vec<_>>().join(" ");
            cleaned.as_str()
        } else {
            text
        };
        let Encoded {
            ids,
            truncated_from,
        } = self.tokenizer.encode(text, len)?;
        if let Some(n) = truncated_from {
            on_truncate(n);
        }
        let ids_t = Tensor::i64(vec![1, ids.len()], ids.clone());
        let feed = encoder_feed(&self.model, ids_t, None);
        let mut embeds = self
            .model
            .run(&feed)?
            .remove("prompt_embeds")
            .ok_or_else(|| RuntimeError::Invalid {
                what: "text encoder".into(),
                message: "the graph has no `prompt_embeds` output".into(),
            })?;
        if self.wan {
            // Wan keeps the first `mask.sum()` rows and pads with zeros.
            let tokens = ids.iter().take_while(|&&i| i != 0).count();
            if let crate::tensor::Data::F32(v) = &mut embeds.data {
                let d = embeds.shape.last().copied().unwrap_or(1).max(1);
                v.iter_mut().skip(tokens * d).for_each(|x| *x = 0.0);
            }
        }
        self.cache.insert(key, (ids.clone(), embeds.clone()));
        Ok((ids, embeds))
    }

    /// Prompts encoded so far (distinct text and length).
    pub fn cached(&self) -> usize {
        self.cache.len()
    }
}

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
    feed.insert("input_ids".to_string(), ids);
    feed
}
