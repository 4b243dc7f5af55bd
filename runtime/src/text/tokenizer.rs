//! Prompt tokenization as diffusers' CogVideoX pipelines do it: T5's tokenizer, padded to
//! `max_sequence_length`, truncated, `</s>` appended.
//!
//! The tokenizer is Hugging Face's `tokenizers` crate, configured the way transformers 5
//! configures `T5Tokenizer` from a `spiece.model` (CogVideoX ships no `tokenizer.json`):
//! the unigram pieces and scores, SentencePiece's precompiled normaliser (its `nmt_nfkc`
//! character map), whitespace split then Metaspace (`▁`, prepended to every word), `$A </s>`,
//! and the special tokens (`<pad>`, `</s>`, `<unk>`, 100 `<extra_id_*>`) matched in the raw text
//! before normalisation. A `tokenizer.json`, where a model ships one, is read as it is.

use std::path::Path;
use v2l_contracts::request::{Field, RequestError};

use crate::error::{Result, RuntimeError};
use crate::text::spiece::{PieceType, SpModel};

/// A loaded prompt tokenizer.
pub struct PromptTokenizer {
    inner: tokenizers::Tokenizer,
    pad_id: i64,
    eos_id: i64,
}

/// Token ids of one prompt at a fixed length.
#[derive(Clone, Debug, PartialEq)]
pub struct Encoded {
    pub ids: Vec<i64>,
    /// The untruncated length, when the prompt was longer than the limit.
    pub truncated_from: Option<usize>,
    /// Ids before the padding (the tokenizer's `attention_mask.sum()`).
    pub tokens: usize,
}

impl PromptTokenizer {
    /// From a tokenizer directory: its `tokenizer.json` if there is one, else `spiece.model` with
    /// `tokenizer_config.json` (which must name a T5 tokenizer).
    pub fn from_dir(dir: &Path) -> Result<PromptTokenizer> {
        let json = dir.join("tokenizer.json");
        let inner = if json.is_file() {
            tokenizers::Tokenizer::from_file(&json).map_err(|e| RuntimeError::BadFile {
                path: json.clone(),
                message: format!("not a tokenizers file ({e})"),
            })?
        } else {
            let config = read_config(&dir.join("tokenizer_config.json"))?;
            let model = SpModel::read(&dir.join("spiece.model"))?;
            let text = t5_tokenizer_json(&model, &config).to_string();
            text.parse::<tokenizers::Tokenizer>()
                .map_err(|e| RuntimeError::BadFile {
                    path: dir.join("spiece.model"),
                    message: format!("cannot build a tokenizer from it ({e})"),
                })?
        };
        let id = |t: &str, default: i64| inner.token_to_id(t).map_or(default, i64::from);
        Ok(PromptTokenizer {
            pad_id: id("<pad>", 0),
            eos_id: id("</s>", 1),
            inner,
        })
    }

    /// The ids of `text` as transformers gives them with `add_special_tokens` (ending in
    /// `</s>`), neither padded nor truncated.
    pub fn ids(&self, text: &str) -> Result<Vec<i64>> {
        let e = self
            .inner
            .encode(text, true)
            .map_err(|e| RequestError::new(Field::Prompt, format!("cannot tokenize: {e}")))?;
        Ok(e.get_ids().iter().map(|&i| i64::from(i)).collect())
    }

    /// `text` at exactly `len` tokens: truncated to `len − 1` tokens plus `</s>`, or padded
    /// with `<pad>` (diffusers' `padding="max_length", truncation=True`).
    pub fn encode(&self, text: &str, len: usize) -> Result<Encoded> {
        let mut ids = self.ids(text)?;
        let mut truncated_from = None;
        if ids.len() > len {
            truncated_from = Some(ids.len());
            ids.truncate(len.saturating_sub(1));
            if len > 0 {
                ids.push(self.eos_id);
            }
        }
        let tokens = ids.len();
        ids.resize(len, self.pad_id);
        Ok(Encoded {
            ids,
            truncated_from,
            tokens,
        })
    }
}

/// What `tokenizer_config.json` says that the tokenizer depends on.
struct TokenizerConfig {
    extra_ids: usize,
    /// transformers' `legacy`: `▁` before every word (true) or only the first (false).
    legacy: bool,
}

fn read_config(path: &Path) -> Result<TokenizerConfig> {
    let bad = |m: String| RuntimeError::BadFile {
        path: path.into(),
        message: m,
    };
    let text = v2l_contracts::input::read_text(path, v2l_contracts::input::InputKind::Record)
        .map_err(|source| RuntimeError::Io {
            path: path.into(),
            source,
        })?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let class = v
        .get("tokenizer_class")
        .and_then(|c| c.as_str())
        .unwrap_or("");
    if !matches!(class, "T5Tokenizer" | "T5TokenizerFast") {
        return Err(bad(format!(
            "names tokenizer `{class}`; v2l reads T5's (T5Tokenizer) from spiece.model, or any tokenizer from a tokenizer.json"
        )));
    }
    Ok(TokenizerConfig {
        extra_ids: v.get("extra_ids").and_then(|e| e.as_u64()).unwrap_or(100) as usize,
        legacy: v.get("legacy").and_then(|l| l.as_bool()).unwrap_or(true),
    })
}

/// The `tokenizer.json` transformers builds for T5 from `model` (see the module docs).
fn t5_tokenizer_json(model: &SpModel, config: &TokenizerConfig) -> serde_json::Value {
    use serde_json::json;
    let n = model.pieces.len();
    let mut vocab: Vec<serde_json::Value> =
        model.pieces.iter().map(|(p, s, _)| json!([p, s])).collect();
    let mut added: Vec<serde_json::Value> = Vec::new();
    let special = |id: usize, content: &str| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false,
               "rstrip": false, "normalized": false, "special": true})
    };
    for (id, (p, _, t)) in model.pieces.iter().enumerate() {
        if matches!(t, PieceType::Control | PieceType::Unknown) {
            added.push(special(id, p));
        }
    }
    // `<extra_id_0>` is the last id.
    for k in 0..config.extra_ids {
        let name = format!("<extra_id_{}>", config.extra_ids - 1 - k);
        vocab.push(json!([name, 0.0]));
        added.push(special(n + k, &name));
    }
    let prepend = if config.legacy { "always" } else { "first" };
    let metaspace = json!({"type": "Metaspace", "replacement": "\u{2581}", "prepend_scheme": prepend, "split": true});
    let normalizer = if model.charsmap.is_empty() {
        serde_json::Value::Null
    } else {
        json!({"type": "Precompiled", "precompiled_charsmap": base64(&model.charsmap)})
    };
    let eos = model.pieces.iter().position(|p| p.0 == "</s>").unwrap_or(1);
    let seq = |id: &str| json!({"Sequence": {"id": id, "type_id": 0}});
    let eos_tok = json!({"SpecialToken": {"id": "</s>", "type_id": 0}});
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [{"type": "WhitespaceSplit"}, metaspace]},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [seq("A"), eos_tok],
            "pair": [seq("A"), eos_tok, seq("B"), eos_tok],
            "special_tokens": {"</s>": {"id": "</s>", "ids": [eos], "tokens": ["</s>"]}}
        },
        "decoder": metaspace,
        "model": {"type": "Unigram", "unk_id": model.unk_id(), "vocab": vocab, "byte_fallback": false}
    })
}

/// Standard base64 with padding (how `tokenizer.json` carries the charsmap).
fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk.first().copied().unwrap_or(0),
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let v = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                let c = A
                    .get(((v >> (18 - 6 * i)) & 63) as usize)
                    .copied()
                    .unwrap_or(b'=');
                out.push(char::from(c));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_matches_the_standard_alphabet_and_padding() {
        assert_eq!(super::base64(b""), "");
        assert_eq!(super::base64(b"f"), "Zg==");
        assert_eq!(super::base64(b"fo"), "Zm8=");
        assert_eq!(super::base64(b"foo"), "Zm9v");
        assert_eq!(super::base64(&[0xff, 0xfe, 0x00, 0x01]), "//4AAQ==");
    }
}
