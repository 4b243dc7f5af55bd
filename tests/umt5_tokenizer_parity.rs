//! The prompt tokenizer on a umT5-shaped tokenizer directory (Wan's `tokenizer/`): fixture
//! `wan-tiny/tokenizer/` is a tiny SentencePiece unigram with byte fallback (`<0x00>`..`<0xFF>`
//! at ids 4..259), umT5's special ids (`<pad>` 0, `</s>` 1, `<s>` 2, `<unk>` 3) and 100
//! `<extra_id_*>`, shipped as `tokenizer.json` (model `byte_fallback: true`, `unk_id: 3`) +
//! `spiece.model` + `tokenizer_config.json` + `special_tokens_map.json`.
//! `wan-tiny/umt5_tokenizer_io.json` holds 14 awkward prompts (accents, CJK, emoji, NFKC forms,
//! special-token text, whitespace runs, empty, over-long), the text diffusers' Wan pipelines
//! tokenize after `prompt_clean`'s whitespace step, and transformers 5.23's ids for diffusers'
//! call (`padding="max_length", max_length=24, truncation=True`). Made by
//! `tests/fixtures/gen/umt5_tokenizer.py`.
//!
//! transformers 5.23 gives two answers for such a directory:
//! * `PreTrainedTokenizerFast` reads `tokenizer.json` as it is (as transformers 4.x's
//!   `T5TokenizerFast` did): unknown characters become their UTF-8 byte tokens (`json_*`).
//! * `T5TokenizerFast` (the class Wan's `model_index.json` names) keeps only the vocabulary
//!   and rebuilds `Unigram(vocab, unk_id=2, byte_fallback=False)`: each run of unknown
//!   characters becomes one id 2, which is `<s>` in umT5's layout (`input_ids`, `ids_unpadded`).
//!
//! v2l reads `tokenizer.json` as it is, so it gives the first exactly, and the second exactly
//! up to unknown characters.

use v2l_runtime::text::tokenizer::PromptTokenizer;
use v2l_tests::*;

const LEN: usize = 24;

fn dir() -> std::path::PathBuf {
    fixtures().join("wan-tiny").join("tokenizer")
}

fn io() -> serde_json::Value {
    let path = fixtures().join("wan-tiny").join("umt5_tokenizer_io.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<i64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|i| i.as_i64().unwrap())
        .collect()
}

/// `(lo, hi)`: the ids of `<0x00>` and `<0xFF>`.
fn byte_ids(io: &serde_json::Value) -> (i64, i64) {
    let r = ids(&io["byte_token_ids"]);
    (r[0], r[1])
}

/// transformers' attention mask: 1 for the `tokens` (≤ `LEN`) that are not padding. Not "id
/// ≠ 0": a prompt holding the text `<pad>` has a real id 0 with mask 1 (the `Tom &amp; …` row).
fn mask(tokens: usize) -> Vec<i64> {
    (0..LEN).map(|k| i64::from(k < tokens)).collect()
}

#[test]
fn the_fixture_is_umt5_shaped_with_byte_fallback() {
    let io = io();
    assert_eq!(io["max_length"], LEN);
    assert_eq!(io["prompts"].as_array().unwrap().len(), 14);
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir().join("tokenizer.json")).unwrap())
            .unwrap();
    assert_eq!(json["model"]["type"], "Unigram");
    assert_eq!(json["model"]["byte_fallback"], true);
    assert_eq!(json["model"]["unk_id"], 3);
    let vocab = json["model"]["vocab"].as_array().unwrap();
    assert_eq!(vocab.len() as u64, io["vocab_size"].as_u64().unwrap());
    let (lo, hi) = byte_ids(&io);
    assert_eq!((lo, hi), (4, 259));
    assert_eq!(vocab[lo as usize][0], "<0x00>");
    assert_eq!(vocab[hi as usize][0], "<0xFF>");
    for (i, piece) in ["<pad>", "</s>", "<s>", "<unk>"].iter().enumerate() {
        assert_eq!(vocab[i][0], *piece);
    }
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir().join("tokenizer_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["tokenizer_class"], "T5Tokenizer");
    assert_eq!(config["legacy"], true);
}

/// Every prompt's 24 ids, mask and untruncated ids equal transformers' reading the
/// `tokenizer.json` as it is, and byte fallback is exercised (some prompts' ids hold `<0x..>`
/// byte tokens, one of them truncated).
#[test]
fn ids_equal_transformers_reading_the_tokenizer_json() {
    let tok = PromptTokenizer::from_dir(&dir()).unwrap();
    let io = io();
    let (lo, hi) = byte_ids(&io);
    let mut with_bytes = 0;
    let mut truncated_with_bytes = 0;
    for p in io["prompts"].as_array().unwrap() {
        let text = p["cleaned"].as_str().unwrap();
        let full = tok.ids(text).unwrap();
        assert_eq!(full, ids(&p["json_ids_unpadded"]), "{text:?}");
        let e = tok.encode(text, LEN).unwrap();
        assert_eq!(e.ids, ids(&p["json_input_ids"]), "{text:?}");
        assert_eq!(
            mask(full.len().min(LEN)),
            ids(&p["json_attention_mask"]),
            "{text:?}"
        );
        assert_eq!(
            e.truncated_from,
            (full.len() > LEN).then_some(full.len()),
            "{text:?}"
        );
        if full.iter().any(|&i| (lo..=hi).contains(&i)) {
            with_bytes += 1;
            if e.truncated_from.is_some() {
                truncated_with_bytes += 1;
            }
        }
    }
    assert!(with_bytes >= 4, "byte fallback in {with_bytes} prompts");
    assert!(truncated_with_bytes >= 1);
}

/// Against `T5TokenizerFast` (what diffusers' Wan pipelines run under transformers 5.23): the
/// same ids wherever every character is in the vocabulary; elsewhere the same once each run of
/// byte tokens is read as the one id 2 that class gives a run of unknown characters.
#[test]
fn ids_equal_t5_tokenizer_fast_up_to_unknown_characters() {
    let tok = PromptTokenizer::from_dir(&dir()).unwrap();
    let io = io();
    let (lo, hi) = byte_ids(&io);
    let unk = io["t5tokenizer_unk_id"].as_i64().unwrap();
    let is_byte = |i: i64| (lo..=hi).contains(&i);
    let mut exact = 0;
    for p in io["prompts"].as_array().unwrap() {
        let text = p["cleaned"].as_str().unwrap();
        let full = tok.ids(text).unwrap();
        let mut collapsed: Vec<i64> = Vec::new();
        for (k, &i) in full.iter().enumerate() {
            if !is_byte(i) {
                collapsed.push(i);
            } else if k == 0 || !is_byte(full[k - 1]) {
                collapsed.push(unk);
            }
        }
        assert_eq!(collapsed, ids(&p["ids_unpadded"]), "{text:?}");
        if !full.iter().any(|&i| is_byte(i)) {
            exact += 1;
            let e = tok.encode(text, LEN).unwrap();
            assert_eq!(e.ids, ids(&p["input_ids"]), "{text:?}");
            assert_eq!(
                mask(full.len().min(LEN)),
                ids(&p["attention_mask"]),
                "{text:?}"
            );
        }
    }
    assert!(exact >= 8, "{exact} prompts without unknown characters");
}

/// Byte fallback as SentencePiece does it (`spiece.model`'s own ids plus `</s>`), for the
/// prompts without special-token text (which SentencePiece does not know).
#[test]
fn byte_fallback_ids_equal_sentencepiece() {
    let tok = PromptTokenizer::from_dir(&dir()).unwrap();
    let mut compared = 0;
    for p in io()["prompts"].as_array().unwrap() {
        let text = p["cleaned"].as_str().unwrap();
        if text.contains('<') {
            continue;
        }
        compared += 1;
        assert_eq!(tok.ids(text).unwrap(), ids(&p["sp_ids"]), "{text:?}");
    }
    assert!(compared >= 10);
}

/// The same `tokenizer.json` with `byte_fallback: false` (as transformers' slow→fast
/// conversion writes it) gives `<unk>` (3) for unknown characters: the flag is read.
#[test]
fn without_byte_fallback_unknown_characters_are_unk() {
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir().join("tokenizer.json")).unwrap())
            .unwrap();
    json["model"]["byte_fallback"] = false.into();
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("tokenizer.json"), json.to_string()).unwrap();
    let tok = PromptTokenizer::from_dir(d.path()).unwrap();
    let mut with_unk = 0;
    for p in io()["prompts"].as_array().unwrap() {
        let text = p["cleaned"].as_str().unwrap();
        let got = tok.ids(text).unwrap();
        assert_eq!(got, ids(&p["nofallback_ids_unpadded"]), "{text:?}");
        with_unk += usize::from(got.contains(&3));
    }
    assert!(with_unk >= 4);
}

/// v2l's `prompt_clean` gives diffusers' text (HTML unescaped twice, Python's whitespace
/// collapsed; diffusers without `ftfy`, which it applies only when installed).
#[test]
fn prompt_clean_equals_diffusers() {
    for p in io()["prompts"].as_array().unwrap() {
        let prompt = p["prompt"].as_str().unwrap();
        let want = p["diffusers_clean"].as_str().unwrap();
        assert_eq!(
            v2l_runtime::text::prompt::prompt_clean(prompt),
            want,
            "{prompt:?}"
        );
    }
}
