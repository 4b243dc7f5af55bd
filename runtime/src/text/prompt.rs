//! Prompt text → `prompt_embeds`: tokenize at the sequence length, run the text encoder, and
//! remember recent results ([`EmbedCache`], bounded in bytes), so a server does not encode a
//! popular prompt twice nor grow without bound on distinct ones.

use std::collections::HashMap;
use v2l_contracts::io::text as text_io;

use super::feed::encoder_feed;
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
    cache: EmbedCache,
}

/// Longest prompt text accepted, in bytes. The encoder keeps at most its sequence length in
/// tokens (226 for CogVideoX, ~1 KB of text) and truncates the rest, so this is generous; it
/// bounds the tokenizer's memory, which grows with the text (5 MB of text took 1 GB).
pub const MAX_PROMPT_BYTES: usize = 16 << 10;

/// `text` when at most [`MAX_PROMPT_BYTES`] long, else an error naming `what`.
pub fn check_prompt_len<'a>(what: &str, text: &'a str) -> Result<&'a str> {
    match text.len() <= MAX_PROMPT_BYTES {
        true => Ok(text),
        false => Err(RuntimeError::Invalid {
            what: what.into(),
            message: format!(
                "{} bytes of text; at most {MAX_PROMPT_BYTES} (the text encoder reads a few hundred tokens and truncates the rest)",
                text.len()
            ),
        }),
    }
}

/// Encoded prompts by (text, length), least recently used evicted first once the entries
/// pass a byte budget.
pub struct EmbedCache {
    entries: HashMap<(String, usize), (Vec<i64>, Tensor, u64)>,
    bytes: usize,
    budget: usize,
    clock: u64,
}

/// The prompt cache's default budget, 64 MiB: about 17 CogVideoX-5B prompts (226 × 4096
/// floats, 3.7 MB each), thousands of the tiny models'.
pub const CACHE_BYTES: usize = 64 << 20;

impl EmbedCache {
    pub fn new(budget: usize) -> EmbedCache {
        EmbedCache {
            entries: HashMap::new(),
            bytes: 0,
            budget,
            clock: 0,
        }
    }

    fn size(key: &(String, usize), ids: &[i64], t: &Tensor) -> usize {
        key.0.len() + ids.len() * 8 + t.numel() * 4 + 64
    }

    /// The entry for `key`, marked as just used.
    pub fn get(&mut self, key: &(String, usize)) -> Option<(Vec<i64>, Tensor)> {
        self.clock += 1;
        let clock = self.clock;
        self.entries.get_mut(key).map(|(ids, t, used)| {
            *used = clock;
            (ids.clone(), t.clone())
        })
    }

    /// Stores an entry, evicting the least recently used until the cache fits its budget (an
    /// entry larger than the whole budget is not kept).
    pub fn insert(&mut self, key: (String, usize), ids: Vec<i64>, t: Tensor) {
        let size = Self::size(&key, &ids, &t);
        if size > self.budget {
            return;
        }
        while self.bytes + size > self.budget {
            let Some(oldest) = self
                .entries
                .iter()
                .min_by_key(|(_, (_, _, used))| *used)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            if let Some((i, e, _)) = self.entries.remove(&oldest) {
                self.bytes -= Self::size(&oldest, &i, &e);
            }
        }
        self.clock += 1;
        self.bytes += size;
        if let Some((i, e, _)) = self.entries.insert(key.clone(), (ids, t, self.clock)) {
            self.bytes -= Self::size(&key, &i, &e);
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
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
            return Err(RuntimeError::Engine {
                dir: engine.dir.clone(),
                message: "has a text encoder but no tokenizer; export the pipeline directory (its tokenizer/ is copied), or pass --prompt-embeds".into(),
            });
        }
        Ok(PromptEncoder {
            tokenizer: PromptTokenizer::from_dir(&dir)?,
            model: Model::load(
                &engine.dir.join(&e.file),
                &engine.text_encoder_options(opts),
            )?,
            cache: EmbedCache::new(CACHE_BYTES),
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
        check_prompt_len("prompt", text)?;
        let key = (text.to_string(), len);
        if let Some(hit) = self.cache.get(&key) {
            return Ok(hit);
        }
        let cleaned;
        let text = if self.wan {
            cleaned = prompt_clean(text);
            cleaned.as_str()
        } else {
            text
        };
        let Encoded {
            ids,
            truncated_from,
            tokens,
        } = self.tokenizer.encode(text, len)?;
        if let Some(n) = truncated_from {
            on_truncate(n);
        }
        let ids_t = Tensor::i64(vec![1, ids.len()], ids.clone());
        // The tokenizer's mask: 1 for the prompt's tokens (a literal `<pad>` in the text too).
        let mask = (0..ids.len()).map(|i| i64::from(i < tokens)).collect();
        let mask = Tensor::i64(vec![1, ids.len()], mask);
        let feed = encoder_feed(&self.model, ids_t, Some(mask));
        let mut embeds = self
            .model
            .run(&feed)?
            .remove(text_io::PROMPT_EMBEDS)
            .ok_or_else(|| RuntimeError::missing_output("text encoder", text_io::PROMPT_EMBEDS))?;
        if self.wan {
            // Wan keeps the first `mask.sum()` rows and pads with zeros.
            if let crate::tensor::Data::F32(v) = &mut embeds.data {
                let d = embeds.shape.last().copied().unwrap_or(1).max(1);
                v.iter_mut().skip(tokens * d).for_each(|x| *x = 0.0);
            }
        }
        self.cache.insert(key, ids.clone(), embeds.clone());
        Ok((ids, embeds))
    }

    /// Prompts encoded so far (distinct text and length).
    pub fn cached(&self) -> usize {
        self.cache.len()
    }
}

/// diffusers' `prompt_clean` for the Wan pipelines, without `ftfy` (which diffusers applies
/// only when that package is installed; it is not a dependency of diffusers): HTML entities
/// unescaped twice, each run of whitespace (Python's `\s`, which includes the separators
/// U+001C–U+001F) made one space, the ends stripped.
pub fn prompt_clean(text: &str) -> String {
    let text = html_unescape(&html_unescape(text));
    let space = |c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c);
    text.split(space)
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Python's `html.unescape` for the entities prompts carry: `&amp; &lt; &gt; &quot; &apos;
/// &nbsp;` and numeric references (`&#39;`, `&#x27;`). Other named entities stay as written.
fn html_unescape(text: &str) -> String {
    const NAMED: &[(&str, char)] = &[
        ("amp", '&'),
        ("lt", '<'),
        ("gt", '>'),
        ("quot", '"'),
        ("apos", '\''),
        ("nbsp", '\u{a0}'),
    ];
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('&') {
        out.push_str(&rest[..at]);
        let tail = &rest[at + 1..];
        let body = tail.split(';').next().unwrap_or("");
        let closed = tail.len() > body.len();
        let numeric = body.strip_prefix('#').and_then(|n| {
            match n.strip_prefix('x').or_else(|| n.strip_prefix('X')) {
                Some(hex) => u32::from_str_radix(hex, 16).ok(),
                None => n.parse::<u32>().ok(),
            }
        });
        let c = match numeric {
            Some(n) => char::from_u32(n).filter(|c| *c != '\0'),
            None => NAMED.iter().find(|(k, _)| *k == body).map(|(_, c)| *c),
        };
        match c {
            Some(c) if closed => {
                out.push(c);
                rest = &tail[body.len() + 1..];
            }
            _ => {
                out.push('&');
                rest = tail;
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_keeps_the_recently_used_within_its_budget() {
        let t = |n: usize| Tensor::f32(vec![1, n], vec![0.0; n]);
        // Keys of one length, so every entry has one size.
        let key = |s: &str| (format!("{s:>5}"), 8);
        let one = EmbedCache::size(&key("a"), &[0; 8], &t(100));
        let mut c = EmbedCache::new(3 * one);
        for k in ["a", "b", "c"] {
            c.insert(key(k), vec![0; 8], t(100));
        }
        assert_eq!(c.len(), 3);
        assert!(c.get(&key("a")).is_some()); // "b" is now the least recently used
        c.insert(key("d"), vec![0; 8], t(100));
        assert_eq!(c.len(), 3);
        assert!(c.get(&key("b")).is_none() && c.get(&key("a")).is_some());
        assert!(c.bytes() <= 3 * one);
        // 10,000 distinct prompts stay within the budget.
        for i in 0..10_000 {
            c.insert(key(&i.to_string()), vec![0; 8], t(100));
        }
        assert!(c.bytes() <= 3 * one && c.len() == 3);
        // An entry larger than the budget is not kept.
        c.insert(key("huge"), vec![0; 8], t(10_000));
        assert!(c.get(&key("huge")).is_none());
        assert!(check_prompt_len("prompt", &"x".repeat(MAX_PROMPT_BYTES + 1)).is_err());
        assert!(check_prompt_len("prompt", "a red car").is_ok());
    }

    #[test]
    fn prompt_clean_unescapes_and_collapses_whitespace_as_python_does() {
        assert_eq!(
            prompt_clean("  Tom &amp;amp; Jerry &lt;3\t\n&#39;x&#x27; &bogus; & a\u{1f}b  "),
            "Tom & Jerry <3 'x' &bogus; & a b"
        );
        assert_eq!(prompt_clean("a\u{a0}b\u{3000}c\u{200b}d"), "a b c\u{200b}d");
        assert_eq!(prompt_clean(" \t "), "");
    }
}
