//! Hub ids ("ALLaM-AI/ALLaM-7B-Instruct-preview") resolved through `hf-hub` into the
//! Hugging Face cache that Python shares: $HF_HUB_CACHE, else $HF_HOME/hub, else
//! ~/.cache/huggingface/hub. The token comes from $HF_TOKEN or the cache's token file
//! (`huggingface-cli login`) and is never printed. With HF_HUB_OFFLINE=1 only the
//! cache is read. Only safetensors weights are fetched; a repo with only pickle
//! weights is refused.

use std::path::{Path, PathBuf};

use anyhow::Result;
use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo, RepoType};

use crate::bail_input;
use crate::error::bad_input;

/// Files of a model repo amthal needs besides the weights (those present are fetched).
const MODEL_FILES: [&str; 6] = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
];

/// sentence-transformers' files: the pipeline (modules.json), its settings, and each
/// module folder's config ("1_Pooling/config.json"), so a Hub sentence-transformers
/// model is computed as its modules say, not as a bare encoder.
fn is_sentence_transformers_file(name: &str) -> bool {
    let module_config = name.split_once('/').is_some_and(|(dir, file)| {
        file == "config.json"
            && dir
                .split_once('_')
                .is_some_and(|(n, _)| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()))
    });
    module_config
        || matches!(
            name,
            "modules.json" | "sentence_bert_config.json" | "config_sentence_transformers.json"
        )
}

pub fn hub_cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("HF_HUB_CACHE") {
        return PathBuf::from(dir);
    }
    if let Some(home) = std::env::var_os("HF_HOME") {
        return PathBuf::from(home).join("hub");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    home.join(".cache").join("huggingface").join("hub")
}

fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
        .unwrap_or(false)
}

/// The local snapshot folder of a Hub model, downloading what is missing unless offline.
pub fn resolve(repo_id: &str) -> Result<PathBuf> {
    let cache = Cache::new(hub_cache_dir());
    let repo = Repo::new(repo_id.to_string(), RepoType::Model);
    if offline() {
        return cached_snapshot(&cache, &repo).ok_or_else(|| {
            bad_input(format!(
                "--model {repo_id}: not complete in the Hugging Face cache {} and HF_HUB_OFFLINE is set \
                 (needs config.json, tokenizer.json and safetensors weights)",
                cache.path().display()
            ))
        });
    }
    let token = std::env::var("HF_TOKEN")
        .ok()
        .filter(|t| !t.is_empty())
        .or_else(|| cache.token());
    let api = ApiBuilder::from_cache(cache.clone())
        .with_token(token)
        .with_progress(true)
        .build()
        .map_err(|e| anyhow::anyhow!("setting up the Hub client: {e}"))?;
    let remote = api.repo(repo.clone());
    let info = match remote.info() {
        Ok(info) => info,
        Err(error) => {
            // Offline machines and transient failures still work from a complete cache.
            if let Some(snapshot) = cached_snapshot(&cache, &repo) {
                tracing::warn!(
                    "--model {repo_id}: the Hub is unreachable ({error}); using the cached copy"
                );
                return Ok(snapshot);
            }
            return Err(describe_hub_error(repo_id, &error.to_string()));
        }
    };
    let available: Vec<String> = info.siblings.iter().map(|s| s.rfilename.clone()).collect();
    let mut wanted: Vec<String> = MODEL_FILES
        .iter()
        .filter(|f| available.iter().any(|a| a == *f))
        .map(|f| f.to_string())
        .collect();
    wanted.extend(
        available
            .iter()
            .filter(|a| is_sentence_transformers_file(a))
            .cloned(),
    );
    if available
        .iter()
        .any(|a| a == "model.safetensors.index.json")
    {
        let index = remote
            .get("model.safetensors.index.json")
            .map_err(|e| describe_hub_error(repo_id, &e.to_string()))?;
        wanted.extend(shards_of(&index)?);
    } else if available.iter().any(|a| a == "model.safetensors") {
        wanted.push("model.safetensors".to_string());
    } else {
        bail_input!(
            "--model {repo_id}: the repo has no safetensors weights (amthal never loads pickle .bin files)"
        );
    }
    let mut snapshot = None;
    for file in &wanted {
        let path = remote
            .get(file)
            .map_err(|e| describe_hub_error(repo_id, &e.to_string()))?;
        snapshot = path.parent().map(Path::to_path_buf);
    }
    snapshot.ok_or_else(|| bad_input(format!("--model {repo_id}: nothing to download")))
}

/// A cached snapshot holding config, tokenizer and every weight file, if there is one.
fn cached_snapshot(cache: &Cache, repo: &Repo) -> Option<PathBuf> {
    let cached = cache.repo(repo.clone());
    let config = cached.get("config.json")?;
    cached.get("tokenizer.json")?;
    let snapshot = config.parent()?.to_path_buf();
    let weights_complete = match cached.get("model.safetensors.index.json") {
        Some(index) => shards_of(&index)
            .ok()?
            .iter()
            .all(|s| cached.get(s).is_some()),
        None => cached.get("model.safetensors").is_some(),
    };
    weights_complete.then_some(snapshot)
}

fn shards_of(index: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index)?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| bad_input(format!("{}: invalid JSON: {e}", index.display())))?;
    let mut shards: Vec<String> = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .map(|m| {
            m.values()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    shards.sort();
    shards.dedup();
    Ok(shards)
}

/// A Hub failure in words a user can act on (the token itself never appears).
fn describe_hub_error(repo_id: &str, error: &str) -> anyhow::Error {
    let hint = if error.contains("401") || error.contains("403") {
        "the model is gated or private: accept its licence on the Hub and set HF_TOKEN"
    } else if error.contains("404") {
        "no such model on the Hub (check the id)"
    } else {
        "the Hub could not be reached; with the files already in the cache, set HF_HUB_OFFLINE=1"
    };
    bad_input(format!("--model {repo_id}: {hint} ({error})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentence_transformers_files_are_recognised() {
        for name in [
            "modules.json",
            "sentence_bert_config.json",
            "1_Pooling/config.json",
            "2_Dense/config.json",
        ] {
            assert!(is_sentence_transformers_file(name), "{name}");
        }
        for name in [
            "config.json",
            "pytorch_model.bin",
            "onnx/config.json",
            "1_Pooling/model.bin",
            "_x/config.json",
        ] {
            assert!(!is_sentence_transformers_file(name), "{name}");
        }
    }
}
