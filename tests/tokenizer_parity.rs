//! Tokenizers rebuilt from GGUF metadata give transformers' ids, id for id
//! (goldens from scripts/golden/make_golden.py).

mod common;

use amthal::gguf::GgufFile;
use amthal::tokenizer::ModelTokenizer;
use common::*;

fn check_strings(tokenizer: &ModelTokenizer, cases: &[serde_json::Value]) {
    for case in cases {
        let text = case["text"].as_str().unwrap();
        assert_eq!(
            tokenizer.encode(text, true).unwrap(),
            ids(&case["with_specials"]),
            "with special tokens: {text:?}"
        );
        assert_eq!(
            tokenizer.encode(text, false).unwrap(),
            ids(&case["without_specials"]),
            "without special tokens: {text:?}"
        );
    }
}

#[test]
fn smollm2_gguf_header_facts() {
    let gguf = GgufFile::open(&smollm2()).unwrap();
    assert_eq!(gguf.version, 3);
    assert_eq!(gguf.get_str("general.architecture"), Some("llama"));
    assert_eq!(gguf.get_str("tokenizer.ggml.model"), Some("gpt2"));
    assert_eq!(gguf.get_str("tokenizer.ggml.pre"), Some("smollm"));
    assert_eq!(
        gguf.get_strings("tokenizer.ggml.tokens")
            .unwrap()
            .unwrap()
            .len(),
        49152
    );
    assert_eq!(
        gguf.get_strings("tokenizer.ggml.merges")
            .unwrap()
            .unwrap()
            .len(),
        48900
    );
    assert_eq!(gguf.tensors.len(), 272);
    let count = |t: u32| gguf.tensors.iter().filter(|x| x.ggml_type == t).count();
    assert_eq!(
        (count(3), count(0), count(8)),
        (210, 61, 1),
        "Q4_1, F32, Q8_0 tensors"
    );
    assert_eq!(gguf.data_offset % 32, 0);
}

#[test]
fn smollm2_special_tokens_and_edge_strings_match_transformers() {
    let golden = golden("smollm2_tokenize.json");
    let tokenizer = ModelTokenizer::from_gguf(&GgufFile::open(&smollm2()).unwrap()).unwrap();
    assert_eq!(
        tokenizer.eos.as_ref().map(|t| t.id as u64),
        golden["eos_id"].as_u64()
    );
    assert_eq!(
        tokenizer.bos.as_ref().map(|t| t.id as u64),
        golden["bos_id"].as_u64()
    );
    assert_eq!(tokenizer.eos.as_ref().unwrap().text, "<|im_end|>");
    check_strings(&tokenizer, golden["edge_strings"].as_array().unwrap());
}

#[test]
fn tiny_sentencepiece_gguf_matches_transformers() {
    let golden = golden("tiny_spm_tokenize.json");
    let tokenizer =
        ModelTokenizer::from_gguf(&GgufFile::open(&fixture("tiny-spm.gguf")).unwrap()).unwrap();
    let cases = golden["cases"].as_array().unwrap();
    check_strings(&tokenizer, cases);
    for case in cases {
        let ids = ids(&case["without_specials"]);
        assert_eq!(
            tokenizer.decode(&ids).unwrap(),
            case["decoded"].as_str().unwrap(),
            "decode of {:?}",
            case["text"]
        );
    }
}

#[test]
fn unsupported_gguf_tokenizer_is_a_clear_error() {
    let dir = temp_dir("not-gguf");
    let path = write(&dir, "x.gguf", b"GGML\x03\x00\x00\x00");
    let error = GgufFile::open(&path).unwrap_err();
    assert!(
        format!("{error:#}").contains("not a GGUF file"),
        "{error:#}"
    );
    assert_eq!(amthal::error::exit_code(&error), 2);
}
