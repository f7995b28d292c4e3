//! Full-model checkpoints as HF folders that `AutoModelForCausalLM.from_pretrained`
//! loads: config.json, model.safetensors (sharded at 5 GB with
//! model.safetensors.index.json), generation_config.json, and the tokenizer files
//! (tokenizer.json, tokenizer_config.json with the chat template,
//! special_tokens_map.json). The folder is built beside the target and renamed into
//! place, so a crash never leaves a half-written checkpoint.

use std::path::Path;

use anyhow::Result;
use serde_json::json;
use tch::Kind;

use super::llama::Llama;
use super::tensor_io::{WritableTensor, write_safetensors};
use crate::atomic::{write_dir_with, write_file};
use crate::tokenizer::ModelTokenizer;

/// transformers' default max_shard_size.
pub const MAX_SHARD_BYTES: usize = 5_000_000_000;

fn dtype_name(kind: Kind) -> &'static str {
    match kind {
        Kind::BFloat16 => "bfloat16",
        Kind::Half => "float16",
        _ => "float32",
    }
}

/// Saves the model's weights (adapters must be merged first) and tokenizer to `dir`.
pub fn save_hf_folder(model: &Llama, tokenizer: &ModelTokenizer, dir: &Path) -> Result<()> {
    save_hf_folder_sharded(model, tokenizer, dir, MAX_SHARD_BYTES)
}

/// As `save_hf_folder`, with a chosen shard size (tests use a small one).
pub fn save_hf_folder_sharded(
    model: &Llama,
    tokenizer: &ModelTokenizer,
    dir: &Path,
    max_shard_bytes: usize,
) -> Result<()> {
    write_dir_with(dir, |tmp| {
        write_hf_files(model, tokenizer, tmp, max_shard_bytes)
    })
}

/// The files of an HF folder, written into the existing folder `dir` (a checkpoint's
/// temp folder, or `save_hf_folder_sharded`'s).
pub fn write_hf_files(
    model: &Llama,
    tokenizer: &ModelTokenizer,
    dir: &Path,
    max_shard_bytes: usize,
) -> Result<()> {
    let mut config = model.config.to_hf_json();
    config["torch_dtype"] = json!(dtype_name(model.kind));
    write_file(
        &dir.join("config.json"),
        serde_json::to_string_pretty(&config)?.as_bytes(),
    )?;
    write_weights(model, dir, max_shard_bytes)?;
    // The source folder's generation_config.json, as HF's save_pretrained keeps
    // model.generation_config; the stop ids from config.json where it has none.
    let mut generation = model
        .config
        .generation_config
        .clone()
        .unwrap_or_else(|| json!({}));
    let ids = [
        ("bos_token_id", json!(model.config.bos_token_ids.first())),
        (
            "eos_token_id",
            match model.config.eos_token_ids.as_slice() {
                [one] => json!(one),
                many => json!(many),
            },
        ),
        ("pad_token_id", json!(model.config.pad_token_id)),
    ];
    for (key, value) in ids {
        if generation.get(key).is_none_or(serde_json::Value::is_null) {
            generation[key] = value;
        }
    }
    write_file(
        &dir.join("generation_config.json"),
        serde_json::to_string_pretty(&generation)?.as_bytes(),
    )?;
    save_tokenizer_files(tokenizer, dir)
}

fn write_weights(model: &Llama, dir: &Path, max_shard_bytes: usize) -> Result<()> {
    let mut shards: Vec<Vec<(String, WritableTensor)>> = vec![Vec::new()];
    let mut shard_bytes = 0usize;
    let mut total = 0usize;
    for (name, tensor) in model.named_tensors() {
        let bytes = WritableTensor::new(tensor);
        let size = bytes.byte_len();
        if shard_bytes > 0 && shard_bytes + size > max_shard_bytes {
            shards.push(Vec::new());
            shard_bytes = 0;
        }
        shard_bytes += size;
        total += size;
        shards.last_mut().expect("one shard").push((name, bytes));
    }
    if shards.len() == 1 {
        return write_safetensors(&dir.join("model.safetensors"), &shards[0]);
    }
    let count = shards.len();
    let mut weight_map = serde_json::Map::new();
    for (index, shard) in shards.iter().enumerate() {
        let file = format!("model-{:05}-of-{count:05}.safetensors", index + 1);
        for (name, _) in shard {
            weight_map.insert(name.clone(), json!(file));
        }
        write_safetensors(&dir.join(&file), shard)?;
    }
    let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    write_file(
        &dir.join("model.safetensors.index.json"),
        serde_json::to_string_pretty(&index)?.as_bytes(),
    )
}

/// tokenizer.json, tokenizer_config.json (with the chat template, as transformers v4
/// reads it; v5 reads it there too) and special_tokens_map.json.
pub fn save_tokenizer_files(tokenizer: &ModelTokenizer, dir: &Path) -> Result<()> {
    let json = tokenizer
        .tokenizer
        .to_string(false)
        .map_err(|e| anyhow::anyhow!("serializing the tokenizer: {e}"))?;
    write_file(&dir.join("tokenizer.json"), json.as_bytes())?;
    let mut special = serde_json::Map::new();
    for (name, text) in tokenizer.special_token_texts() {
        special.insert(name.to_string(), json!(text));
    }
    let mut config = special.clone();
    config.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
    config.insert("clean_up_tokenization_spaces".into(), json!(false));
    if let Some(template) = &tokenizer.chat_template {
        config.insert("chat_template".into(), json!(template));
    }
    write_file(
        &dir.join("tokenizer_config.json"),
        serde_json::to_string_pretty(&config)?.as_bytes(),
    )?;
    write_file(
        &dir.join("special_tokens_map.json"),
        serde_json::to_string_pretty(&special)?.as_bytes(),
    )
}
