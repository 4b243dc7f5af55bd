//! The prompt tokenizer gives transformers' ids (fixture `prompts.json`: ten awkward prompts —
//! unicode, whitespace, special-token text, empty, over-long — with the ids transformers 5.23's
//! `T5Tokenizer` gives), and diffusers' padded and truncated ids at 8 and 226 tokens (`text_io`).

use v2l_runtime::tensor::Data;
use v2l_runtime::text::tokenizer::PromptTokenizer;
use v2l_tests::*;

fn prompts() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(tiny().join("prompts.json")).unwrap()).unwrap()
}

#[test]
fn ids_equal_transformers_on_every_fixture_prompt() {
    let tok = PromptTokenizer::from_dir(&tiny().join("tokenizer")).unwrap();
    let p = prompts();
    let texts = p["prompts"].as_array().unwrap();
    let want = p["transformers_ids"].as_array().unwrap();
    assert_eq!(texts.len(), 10);
    for (text, want) in texts.iter().zip(want) {
        let text = text.as_str().unwrap();
        let want: Vec<i64> = want
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect();
        assert_eq!(tok.ids(text).unwrap(), want, "{text:?}");
    }
}

#[test]
fn padded_and_truncated_ids_equal_diffusers_at_both_lengths() {
    let tok = PromptTokenizer::from_dir(&tiny().join("tokenizer")).unwrap();
    let p = prompts();
    let io = load("text_io.safetensors");
    for (len, name) in [(8usize, "input_ids_short"), (226, "input_ids_full")] {
        let Data::I64(want) = &io[name].data else {
            panic!("{name} is int64")
        };
        for (i, text) in p["prompts"].as_array().unwrap().iter().enumerate() {
            let e = tok.encode(text.as_str().unwrap(), len).unwrap();
            assert_eq!(e.ids, want[i * len..(i + 1) * len], "{name} row {i}");
            let full = tok.ids(text.as_str().unwrap()).unwrap().len();
            assert_eq!(
                e.truncated_from,
                (full > len).then_some(full),
                "{name} row {i}"
            );
        }
    }
}

/// A missing or corrupt `spiece.model` and a tokenizer that is not T5's are errors naming the
/// file.
#[test]
fn bad_tokenizer_directories_are_named() {
    let d = tempfile::tempdir().unwrap();
    let src = tiny().join("tokenizer");
    let copy = |name: &str| {
        let dir = d.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        for f in ["spiece.model", "tokenizer_config.json"] {
            std::fs::copy(src.join(f), dir.join(f)).unwrap();
        }
        dir
    };
    let err = |dir: &std::path::Path| PromptTokenizer::from_dir(dir).err().unwrap().to_string();

    let missing = copy("missing");
    std::fs::remove_file(missing.join("spiece.model")).unwrap();
    assert!(err(&missing).contains("spiece.model"), "{}", err(&missing));

    let corrupt = copy("corrupt");
    std::fs::write(
        corrupt.join("spiece.model"),
        b"\xff\xfe not a protobuf at all",
    )
    .unwrap();
    let e = err(&corrupt);
    assert!(
        e.contains("spiece.model") && e.contains("SentencePiece"),
        "{e}"
    );

    let other = copy("other");
    std::fs::write(
        other.join("tokenizer_config.json"),
        r#"{"tokenizer_class": "LlamaTokenizer"}"#,
    )
    .unwrap();
    let e = err(&other);
    assert!(
        e.contains("LlamaTokenizer") && e.contains("tokenizer_config.json"),
        "{e}"
    );
}

/// A `tokenizer.json` is read as it is: the one transformers 5.23 saves for the fixture
/// tokenizer (`save_pretrained`, `tokenizer_json/`) gives the same ids as `spiece.model`.
#[test]
fn a_tokenizer_json_gives_the_same_ids() {
    let from_json = PromptTokenizer::from_dir(&tiny().join("tokenizer_json")).unwrap();
    let from_spiece = PromptTokenizer::from_dir(&tiny().join("tokenizer")).unwrap();
    for text in prompts()["prompts"].as_array().unwrap() {
        let text = text.as_str().unwrap();
        assert_eq!(
            from_json.ids(text).unwrap(),
            from_spiece.ids(text).unwrap(),
            "{text:?}"
        );
    }
}
