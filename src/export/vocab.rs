//! The tokenizer as GGUF `tokenizer.*` metadata, as llama.cpp's converter writes it:
//! - byte-level BPE (GPT-2 style, e.g. SmolLM2): `tokenizer.ggml.model = gpt2`, the
//!   tokens, their types, the merges and `tokenizer.ggml.pre` (the pre-tokenizer's name
//!   in llama.cpp: gpt-2, llama-bpe or smollm, recognised from tokenizer.json);
//! - sentencepiece-style BPE with byte fallback (Llama 2, ALLaM): `model = llama`, the
//!   tokens, scores (minus the rank of the merge that makes a token, so llama.cpp's
//!   highest-score-first merging follows the BPE ranks), types (BYTE for `<0xNN>`), and
//!   the merges too (transformers' GGUF loader prefers them).
//!
//! Token types: 1 normal, 2 unknown, 3 control (special added tokens), 4 user-defined
//! (other added tokens), 5 unused (padding up to the embedding rows), 6 byte.
//! A model read from a GGUF file keeps its own `tokenizer.*` keys verbatim instead.

use std::collections::HashMap;

use anyhow::{Context, Result};
use serde_json::Value as Json;

use crate::bail_input;
use crate::gguf::Value;
use crate::tokenizer::ModelTokenizer;

/// `tokenizer.*` key/values for `tokenizer`, padded to `vocab_size` tokens.
pub fn tokenizer_metadata(
    tokenizer: &ModelTokenizer,
    vocab_size: usize,
) -> Result<Vec<(String, Value)>> {
    let json: Json = serde_json::from_str(
        &tokenizer
            .tokenizer
            .to_string(false)
            .map_err(|e| anyhow::anyhow!("serializing the tokenizer: {e}"))?,
    )
    .context("the tokenizer's JSON")?;
    let model = &json["model"];
    if model["type"] != "BPE" {
        bail_input!(
            "export: tokenizer model {} is not supported (BPE, byte-level or sentencepiece-style)",
            model["type"]
        );
    }
    let byte_level = mentions(&json["pre_tokenizer"], "ByteLevel");
    let vocab = tokenizer.tokenizer.get_vocab(true);
    // Exactly one entry per embedding row, as llama.cpp requires.
    let mut tokens: Vec<Option<String>> = vec![None; vocab_size];
    for (text, &id) in &vocab {
        if let Some(slot) = tokens.get_mut(id as usize) {
            *slot = Some(text.clone());
        } else {
            bail_input!(
                "export: token {text:?} has id {id}, beyond the {vocab_size} embedding rows"
            );
        }
    }
    let merges = merges(model)?;
    // The rank of the merge that produces each token (sentencepiece scores).
    let mut rank_of: HashMap<String, usize> = HashMap::new();
    for (rank, (left, right)) in merges.iter().enumerate() {
        rank_of.entry(format!("{left}{right}")).or_insert(rank);
    }
    let added: HashMap<String, bool> = json["added_tokens"]
        .as_array()
        .map(|tokens| {
            tokens
                .iter()
                .filter_map(|t| Some((t["content"].as_str()?.to_string(), t["special"].as_bool()?)))
                .collect()
        })
        .unwrap_or_default();
    let unk = tokenizer.unk.as_ref().map(|t| t.id as usize);
    let mut texts = Vec::with_capacity(tokens.len());
    let mut types = Vec::with_capacity(tokens.len());
    let mut scores = Vec::with_capacity(tokens.len());
    for (id, token) in tokens.iter().enumerate() {
        let (text, kind) = match token {
            None => (format!("[PAD{id}]"), 5),
            Some(text) => {
                let kind = match added.get(text) {
                    Some(true) => 3,
                    Some(false) => 4,
                    None if Some(id) == unk => 2,
                    None if !byte_level && is_byte_token(text) => 6,
                    None => 1,
                };
                (text.clone(), kind)
            }
        };
        scores.push(Value::F32(
            rank_of.get(&text).map_or(0.0, |&rank| -(rank as f32) - 1.0),
        ));
        texts.push(Value::String(text));
        types.push(Value::I32(kind));
    }
    let mut out = vec![
        (
            "tokenizer.ggml.model".to_string(),
            Value::String(if byte_level { "gpt2" } else { "llama" }.into()),
        ),
        ("tokenizer.ggml.tokens".to_string(), Value::Array(texts)),
        ("tokenizer.ggml.token_type".to_string(), Value::Array(types)),
        (
            "tokenizer.ggml.merges".to_string(),
            Value::Array(
                merges
                    .iter()
                    .map(|(l, r)| Value::String(format!("{l} {r}")))
                    .collect(),
            ),
        ),
    ];
    if byte_level {
        let Some(pre) = pre_tokenizer_name(&json["pre_tokenizer"]) else {
            bail_input!(
                "export: this byte-level tokenizer splits text with a pattern amthal cannot name \
                 for llama.cpp (it knows GPT-2's, Llama 3's and SmolLM's); a wrong name would \
                 tokenize differently: {}",
                json["pre_tokenizer"]
            );
        };
        out.push(("tokenizer.ggml.pre".to_string(), Value::String(pre.into())));
    } else {
        out.push(("tokenizer.ggml.scores".to_string(), Value::Array(scores)));
    }
    for (key, token) in [
        ("bos_token_id", &tokenizer.bos),
        ("eos_token_id", &tokenizer.eos),
        ("unknown_token_id", &tokenizer.unk),
        ("padding_token_id", &tokenizer.pad),
    ] {
        if let Some(token) = token {
            out.push((format!("tokenizer.ggml.{key}"), Value::U32(token.id)));
        }
    }
    let (add_bos, add_eos) = added_specials(tokenizer)?;
    out.push((
        "tokenizer.ggml.add_bos_token".to_string(),
        Value::Bool(add_bos),
    ));
    out.push((
        "tokenizer.ggml.add_eos_token".to_string(),
        Value::Bool(add_eos),
    ));
    if let Some(template) = &tokenizer.chat_template {
        out.push((
            "tokenizer.chat_template".to_string(),
            Value::String(template.clone()),
        ));
    }
    Ok(out)
}

/// The BPE merges, whichever way tokenizer.json spells them ("a b" or ["a", "b"]).
fn merges(model: &Json) -> Result<Vec<(String, String)>> {
    let Some(list) = model["merges"].as_array() else {
        return Ok(Vec::new());
    };
    list.iter()
        .map(|merge| match merge {
            Json::String(pair) => pair
                .split_once(' ')
                .map(|(l, r)| (l.to_string(), r.to_string()))
                .ok_or_else(|| anyhow::anyhow!("merge {pair:?} has no space")),
            Json::Array(pair) if pair.len() == 2 => Ok((
                pair[0].as_str().unwrap_or_default().to_string(),
                pair[1].as_str().unwrap_or_default().to_string(),
            )),
            other => Err(anyhow::anyhow!("unreadable merge {other}")),
        })
        .collect()
}

/// Whether the BOS / EOS token is added when encoding with special tokens (what the
/// tokenizer's post-processor does).
fn added_specials(tokenizer: &ModelTokenizer) -> Result<(bool, bool)> {
    let ids = tokenizer.encode("a", true)?;
    let plain = tokenizer.encode("a", false)?;
    let bos = tokenizer
        .bos
        .as_ref()
        .is_some_and(|b| ids.first() == Some(&b.id) && plain.first() != Some(&b.id));
    let eos = tokenizer
        .eos
        .as_ref()
        .is_some_and(|e| ids.last() == Some(&e.id) && plain.last() != Some(&e.id));
    Ok((bos, eos))
}

/// `<0xNN>`: a sentencepiece byte-fallback token.
fn is_byte_token(text: &str) -> bool {
    text.len() == 6
        && text.starts_with("<0x")
        && text.ends_with('>')
        && u8::from_str_radix(&text[3..5], 16).is_ok()
}

/// Whether a JSON value (a pre-tokenizer, possibly a Sequence) contains `kind`.
fn mentions(value: &Json, kind: &str) -> bool {
    match value {
        Json::Object(map) => {
            map.get("type").and_then(Json::as_str) == Some(kind)
                || map.values().any(|v| mentions(v, kind))
        }
        Json::Array(items) => items.iter().any(|v| mentions(v, kind)),
        _ => false,
    }
}

/// llama.cpp's name for a byte-level pre-tokenizer (`tokenizer.ggml.pre`): its regex
/// set must match the one the merges were learned with. None for one not recognised.
fn pre_tokenizer_name(pre: &Json) -> Option<&'static str> {
    let text = pre.to_string();
    let splits = mentions(pre, "Split");
    if text.contains(r#"\\p{N}{1,3}"#) {
        Some("llama-bpe")
    } else if splits {
        None
    } else if mentions(pre, "Digits") {
        // Digits split one by one, then GPT-2's regex (SmolLM's tokenizer).
        Some("smollm")
    } else if pre["type"] == "ByteLevel" && pre["use_regex"] != false {
        Some("gpt-2")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_tokens_and_pre_tokenizer_names() {
        assert!(is_byte_token("<0x0A>") && is_byte_token("<0xFF>"));
        assert!(!is_byte_token("<0xZZ>") && !is_byte_token("<s>"));
        let smollm = serde_json::json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            {"type": "ByteLevel", "add_prefix_space": false, "use_regex": true}]});
        assert_eq!(pre_tokenizer_name(&smollm), Some("smollm"));
        let gpt2 = serde_json::json!({"type": "ByteLevel", "use_regex": true});
        assert_eq!(pre_tokenizer_name(&gpt2), Some("gpt-2"));
        let llama3 = serde_json::json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": "(?i:'s|'t)|\\p{N}{1,3}"}},
            {"type": "ByteLevel", "use_regex": false}]});
        assert_eq!(pre_tokenizer_name(&llama3), Some("llama-bpe"));
        let qwen2 = serde_json::json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": "(?i:'s|'t)|\\p{N}"}},
            {"type": "ByteLevel", "use_regex": false}]});
        assert_eq!(pre_tokenizer_name(&qwen2), None);
    }
}
