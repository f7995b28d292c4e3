//! Where embedding metrics find their encoder (a BERT folder with tokenizer.json) and
//! the tokenizer settings they share: special tokens and the truncation length.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use tch::{Device, Kind, Tensor};
use tokenizers::{Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

use crate::bail_input;
use crate::error::bad_input;
use crate::model_source::cache_dir;
use crate::tokenizer::{read_tokenizer_config, read_tokenizer_json};

/// Short names of well-known encoders and their Hub ids.
const HUB_ALIASES: [(&str, &str); 3] = [
    (
        "bert-base-multilingual-cased",
        "google-bert/bert-base-multilingual-cased",
    ),
    ("bert-base-uncased", "google-bert/bert-base-uncased"),
    ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"),
];

/// Where an encoder was found, or why it is not available.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Located {
    Folder(PathBuf),
    /// Not found anywhere (the caller skips the metric or fails, with this reason).
    Unavailable(String),
}

/// `locate_encoder` without the reason: `None` when the encoder is not available.
pub fn resolve_encoder_folder(spec: &str) -> Result<Option<PathBuf>> {
    Ok(match locate_encoder(spec)? {
        Located::Folder(folder) => Some(folder),
        Located::Unavailable(_) => None,
    })
}

/// Finds an encoder folder for `spec`:
/// - a local folder: found if it has config.json (or modules.json), else an error;
/// - a name in amthal's cache (`<cache>/models/<last path component of spec>`), as
///   scripts/setup unpacks all-MiniLM-L6-v2: found;
/// - a Hub id ("org/name", or a known short name such as "bert-base-multilingual-cased")
///   complete in the Hugging Face cache: found; not cached, it is fetched through
///   `crate::hub::resolve` unless HF_HUB_OFFLINE is set, and a failure there (offline,
///   gated, no safetensors, no such repo) is `Unavailable` with the Hub's reason;
/// - otherwise `Unavailable`: the caller decides whether to skip the metric or fail.
///
/// A folder that exists but lacks config.json/modules.json is an error.
pub fn locate_encoder(spec: &str) -> Result<Located> {
    let path = Path::new(spec);
    if path.is_dir() {
        return check_folder(path).map(Located::Folder);
    }
    if path.exists() {
        bail_input!("{spec}: not a folder (an encoder is an HF model folder)");
    }
    let last = spec
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or(spec);
    if !last.is_empty() && last != "." && last != ".." {
        let cached = cache_dir().join("models").join(last);
        if cached.is_dir() {
            return check_folder(&cached).map(Located::Folder);
        }
    }
    let hub_id = if spec.contains('/') {
        Some(spec.to_string())
    } else {
        HUB_ALIASES
            .iter()
            .find(|(short, _)| *short == spec)
            .map(|(_, id)| id.to_string())
    };
    let not_found = || {
        Located::Unavailable(format!(
            "{spec} is not a folder, not in amthal's cache ({}) and not a Hub id",
            cache_dir().join("models").display()
        ))
    };
    let Some(hub_id) = hub_id else {
        return Ok(not_found());
    };
    if !looks_like_hub_id(&hub_id) {
        return Ok(not_found());
    }
    if let Some(snapshot) = cached_hub_snapshot(&hub_id) {
        return Ok(Located::Folder(snapshot));
    }
    // Not cached: crate::hub fetches it unless HF_HUB_OFFLINE is set; any failure
    // (offline, unreachable, no safetensors) means "not available here".
    match crate::hub::resolve(&hub_id) {
        Ok(folder) => check_folder(&folder).map(Located::Folder),
        Err(error) => Ok(Located::Unavailable(format!(
            "{hub_id} is not in the Hugging Face cache and could not be fetched: {error:#}"
        ))),
    }
}

fn looks_like_hub_id(spec: &str) -> bool {
    let parts: Vec<&str> = spec.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && !p.starts_with('.')
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
}

/// The snapshot of `hub_id` in the HF cache, if complete; never touches the network.
fn cached_hub_snapshot(hub_id: &str) -> Option<PathBuf> {
    let cache = hf_hub::Cache::new(crate::hub::hub_cache_dir());
    let repo = cache.repo(hf_hub::Repo::new(
        hub_id.to_string(),
        hf_hub::RepoType::Model,
    ));
    let config = repo.get("config.json")?;
    repo.get("tokenizer.json")?;
    repo.get("model.safetensors")?;
    config.parent().map(Path::to_path_buf)
}

fn check_folder(dir: &Path) -> Result<PathBuf> {
    if dir.join("config.json").is_file() || dir.join("modules.json").is_file() {
        Ok(dir.to_path_buf())
    } else {
        bail_input!(
            "{}: no config.json or modules.json, so not an encoder model folder",
            dir.display()
        )
    }
}

pub(crate) fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text)
        .map_err(|e| bad_input(format!("{}: invalid JSON: {e}", path.display())))
}

/// A BERT tokenizer with the settings transformers applies from tokenizer_config.json.
pub struct EncoderTokenizer {
    pub tokenizer: Tokenizer,
    pub cls_id: u32,
    pub sep_id: u32,
    pub pad_id: u32,
    /// tokenizer_config.json's model_max_length, if it has one.
    pub model_max_length: Option<usize>,
}

impl EncoderTokenizer {
    /// Reads tokenizer.json and tokenizer_config.json of `dir`.
    pub fn from_folder(dir: &Path) -> Result<EncoderTokenizer> {
        let path = dir.join("tokenizer.json");
        let mut tokenizer = read_tokenizer_json(dir)?;
        tokenizer.with_padding(None);
        let config = read_tokenizer_config(dir)?;
        let token = |key: &str, default: &str| -> Result<u32> {
            let text = match config.get(key) {
                Some(serde_json::Value::String(s)) => s.clone(),
                Some(serde_json::Value::Object(o)) => o
                    .get("content")
                    .and_then(|c| c.as_str())
                    .unwrap_or(default)
                    .to_string(),
                _ => default.to_string(),
            };
            tokenizer.token_to_id(&text).ok_or_else(|| {
                bad_input(format!(
                    "{}: {key} {text:?} is not in the vocabulary",
                    path.display()
                ))
            })
        };
        let cls_id = token("cls_token", "[CLS]")?;
        let sep_id = token("sep_token", "[SEP]")?;
        let pad_id = token("pad_token", "[PAD]")?;
        let model_max_length = config
            .get("model_max_length")
            .and_then(|v| v.as_u64())
            .map(|v| v as usize);
        Ok(EncoderTokenizer {
            tokenizer,
            cls_id,
            sep_id,
            pad_id,
            model_max_length,
        })
    }

    /// Truncate encodings (special tokens included) to `max_length` tokens from the right.
    pub fn set_max_length(&mut self, max_length: usize) -> Result<()> {
        self.tokenizer
            .with_truncation(Some(TruncationParams {
                max_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
                direction: TruncationDirection::Right,
            }))
            .map_err(|e| anyhow::anyhow!("setting truncation: {e}"))?;
        Ok(())
    }

    /// Ids of `text` with [CLS] ... [SEP], truncated as set.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .tokenizer
            .encode_fast(text, true)
            .map_err(|e| anyhow::anyhow!("tokenizing failed: {e}"))?;
        Ok(encoding.get_ids().to_vec())
    }
}

/// Right-pads id lists into `[B, T]` int64 ids (with `pad_id`) and a 0/1 int64 mask.
pub fn pad_batch(rows: &[&[u32]], pad_id: u32, device: Device) -> (Tensor, Tensor) {
    let width = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(rows.len() * width);
    let mut mask = Vec::with_capacity(rows.len() * width);
    for row in rows {
        for position in 0..width {
            ids.push(row.get(position).map_or(pad_id, |&id| id) as i64);
            mask.push(i64::from(position < row.len()));
        }
    }
    let shape = [rows.len() as i64, width as i64];
    (
        Tensor::from_slice(&ids).view(shape).to_device(device),
        Tensor::from_slice(&mask)
            .view(shape)
            .to_kind(Kind::Int64)
            .to_device(device),
    )
}
