//! Where a model comes from: a GGUF file, an HF model folder, or a Hub id (resolved
//! to its snapshot folder in the Hugging Face cache, see `hub`).
//! `--model` accepts any of them; without it, commands use the embedded default,
//! SmolLM2-135M-Instruct (GGUF) fetched by scripts/setup.

use std::path::{Path, PathBuf};

use anyhow::Result;

use crate::bail_input;
use crate::gguf::GgufFile;
use crate::tokenizer::ModelTokenizer;

/// File name of the default model inside the cache's models/ folder.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// A resolved model location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    Gguf(PathBuf),
    HfFolder(PathBuf),
}

/// The cache scripts/setup fills: $AMTHAL_CACHE, else ~/.cache/amthal.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("AMTHAL_CACHE") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    home.join(".cache").join("amthal")
}

/// The embedded default model's path (it may not exist before scripts/setup ran).
pub fn default_model_path() -> PathBuf {
    cache_dir().join("models").join(DEFAULT_MODEL_FILE)
}

impl ModelSource {
    /// Resolves `--model`; `None` means the embedded default.
    pub fn resolve(spec: Option<&str>) -> Result<ModelSource> {
        let Some(spec) = spec else {
            let path = default_model_path();
            if !path.is_file() {
                bail_input!(
                    "the default model {} is not there; run scripts/setup to fetch it, or pass --model",
                    path.display()
                );
            }
            return Ok(ModelSource::Gguf(path));
        };
        let path = Path::new(spec);
        if path.is_file() {
            return Ok(ModelSource::Gguf(path.to_path_buf()));
        }
        if path.is_dir() {
            if path.join("config.json").is_file() || path.join("tokenizer.json").is_file() {
                return Ok(ModelSource::HfFolder(path.to_path_buf()));
            }
            let ggufs: Vec<PathBuf> = std::fs::read_dir(path)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "gguf"))
                .collect();
            if let [only] = ggufs.as_slice() {
                return Ok(ModelSource::Gguf(only.clone()));
            }
            bail_input!(
                "{}: not a model folder (no config.json or tokenizer.json, and not exactly one .gguf file)",
                path.display()
            );
        }
        if looks_like_hub_id(spec) {
            return Ok(ModelSource::HfFolder(crate::hub::resolve(spec)?));
        }
        bail_input!("--model {spec}: no such file or folder")
    }

    /// Loads the tokenizer (and chat template) of this model.
    pub fn tokenizer(&self) -> Result<ModelTokenizer> {
        match self {
            ModelSource::Gguf(path) => ModelTokenizer::from_gguf(&GgufFile::open(path)?),
            ModelSource::HfFolder(dir) => ModelTokenizer::from_hf_folder(dir),
        }
    }

    pub fn display(&self) -> String {
        match self {
            ModelSource::Gguf(p) | ModelSource::HfFolder(p) => p.display().to_string(),
        }
    }
}

/// "org/name" with no path-looking parts.
fn looks_like_hub_id(spec: &str) -> bool {
    let parts: Vec<&str> = spec.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
        && !spec.starts_with('.')
}
