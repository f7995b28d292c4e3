//! What a run trains, and how it is saved and restored: a LoRA adapter (PEFT folder)
//! or every weight of the model (HF folder).

use std::path::Path;

use anyhow::Result;
use tch::Tensor;

use crate::model::Llama;
use crate::model::checkpoint::{MAX_SHARD_BYTES, save_tokenizer_files, write_hf_files};
use crate::model::lora::{LoraConfig, named_adapter_tensors, save_adapter};
use crate::model::safetensors_source::SafetensorsSource;
use crate::tokenizer::ModelTokenizer;

#[derive(Debug, Clone)]
pub enum Mode {
    Lora(LoraConfig),
    Full,
}

/// (name, tensor, weight decay applies). HF Trainer exempts biases and norm weights.
pub fn trainable_tensors(model: &Llama, mode: &Mode) -> Vec<(String, Tensor, bool)> {
    match mode {
        Mode::Lora(_) => named_adapter_tensors(model)
            .into_iter()
            .map(|(name, t)| (name, t.shallow_clone(), true))
            .collect(),
        Mode::Full => model
            .named_tensors()
            .into_iter()
            .map(|(name, t)| {
                let decay = !(name.ends_with(".bias") || name.contains("norm"));
                (name, t.shallow_clone(), decay)
            })
            .collect(),
    }
}

/// Marks every base tensor trainable (full fine-tune).
pub fn unfreeze_all(model: &Llama) {
    for (_, tensor) in model.named_tensors() {
        let _ = tensor.set_requires_grad(true);
    }
}

/// Writes the trained model into `dir`: adapter + tokenizer files, or an HF folder's.
/// `dir` is a checkpoint's temp folder, renamed once everything in it is written.
pub fn save_trained(
    model: &Llama,
    mode: &Mode,
    tokenizer: &ModelTokenizer,
    base: &str,
    dir: &Path,
) -> Result<()> {
    match mode {
        Mode::Lora(config) => {
            save_adapter(model, config, base, dir)?;
            save_tokenizer_files(tokenizer, dir)
        }
        Mode::Full => write_hf_files(model, tokenizer, dir, MAX_SHARD_BYTES),
    }
}

/// Loads trained tensors saved by `save_trained` back into the model, in place. A
/// PiSSA / OLoRA adapter was saved converted (`lora_init`): A and B are its first r
/// rows and columns.
pub fn restore_trained(model: &Llama, mode: &Mode, dir: &Path) -> Result<()> {
    let converted_rank = match mode {
        Mode::Lora(config) if config.init.changes_the_base() => Some(config.r),
        _ => None,
    };
    let source = match mode {
        Mode::Lora(_) => {
            SafetensorsSource::open_files(&[dir.join(crate::model::lora::ADAPTER_WEIGHTS)])?
        }
        Mode::Full => SafetensorsSource::open_folder(dir)?,
    };
    tch::no_grad(|| -> Result<()> {
        for (name, mut tensor, _) in trainable_tensors(model, mode) {
            let saved = source
                .load(&name, tensor.kind(), tensor.device())?
                .ok_or_else(|| {
                    crate::error::bad_input(format!("{}: checkpoint has no {name}", dir.display()))
                })?;
            let saved = match converted_rank {
                Some(r) if name.ends_with("lora_A.weight") => saved.narrow(0, 0, r),
                Some(r) if name.ends_with("lora_B.weight") => saved.narrow(1, 0, r),
                _ => saved,
            };
            tensor.copy_(&saved);
        }
        Ok(())
    })
}

/// The files `save_trained` writes, to copy a checkpoint's model into OUT.
pub fn model_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<_> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().unwrap_or_default().to_string_lossy();
            p.is_file()
                // Optimizer state: one file, or ZeRO-1's optimizer-R-of-W shards.
                && !name.starts_with("optimizer")
                && !matches!(name.as_ref(), "trainer_state.json" | "training_config.toml")
        })
        .collect();
    files.sort();
    files
}
