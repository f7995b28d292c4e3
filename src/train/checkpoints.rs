//! Checkpoints: OUT/checkpoint-N folders written atomically (model files, optimizer
//! state unless --save-only-model, the effective configuration, trainer_state.json),
//! found again for --resume, restored exactly, pruned by --save-total-limit, and the
//! best and final models published at the end of a run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use tch::{Device, Tensor};

use super::config::TrainConfig;
use super::optim::AdamW;
use super::state::TrainerState;
use super::trainables::{self, Mode, restore_trained, save_trained};
use crate::atomic::{link_or_copy, write_dir_with, write_file};
use crate::bail_input;
use crate::error::bad_input;
use crate::model::Llama;
use crate::tokenizer::ModelTokenizer;

/// Where to resume from: the latest checkpoint in the output dir, or a named one.
pub fn find_checkpoint(output_dir: &Path, which: &str) -> Result<PathBuf> {
    if which != "latest" {
        let named = Path::new(which);
        let dir = if named.is_absolute() || named.exists() {
            named.to_path_buf()
        } else {
            output_dir.join(which)
        };
        if !dir.join("trainer_state.json").is_file() {
            bail_input!(
                "--resume {which}: {} is not a checkpoint (no trainer_state.json)",
                dir.display()
            );
        }
        return Ok(dir);
    }
    checkpoints(output_dir)
        .into_iter()
        .last()
        .map(|(_, dir)| dir)
        .ok_or_else(|| {
            bad_input(format!(
                "--resume: no checkpoint-N folder in {}",
                output_dir.display()
            ))
        })
}

/// OUT/checkpoint-N folders, oldest first.
pub fn checkpoints(output_dir: &Path) -> Vec<(i64, PathBuf)> {
    let mut found: Vec<(i64, PathBuf)> = std::fs::read_dir(output_dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    let step = name.strip_prefix("checkpoint-")?.parse::<i64>().ok()?;
                    e.path()
                        .join("trainer_state.json")
                        .is_file()
                        .then(|| (step, e.path()))
                })
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found
}

/// Restores a checkpoint into the model and optimizer; returns its trainer state.
pub fn restore(
    dir: &Path,
    config: &TrainConfig,
    model: &Llama,
    mode: &Mode,
    optimizer: &mut AdamW,
    device: Device,
) -> Result<TrainerState> {
    let text = std::fs::read_to_string(dir.join("trainer_state.json"))?;
    let state: TrainerState =
        serde_json::from_str(&text).map_err(|e| bad_input(format!("{}: {e}", dir.display())))?;
    let saved = TrainConfig::from_toml(&dir.join("training_config.toml"))?;
    check_resumable(&saved, config)?;
    restore_trained(model, mode, dir)?;
    let optimizer_files = optimizer_state_files(dir)?;
    if !optimizer_files.is_empty() {
        // One file, or ZeRO-1's shards (any world size reads them all and keeps what it
        // owns now).
        let mut tensors: BTreeMap<String, Tensor> = BTreeMap::new();
        for file in optimizer_files {
            tensors.extend(
                Tensor::read_safetensors(&file)
                    .with_context(|| file.display().to_string())?
                    .into_iter()
                    .map(|(k, v)| (k, v.to_device(device))),
            );
        }
        optimizer.load_state(&tensors, state.global_step)?;
    } else {
        // A --save-only-model checkpoint: the weights and the position are restored,
        // the optimizer starts with fresh state (so the run is no longer bit-exact).
        tracing::warn!(
            "{} has no optimizer state (--save-only-model, or --save-strategy no): resuming \
             with a fresh optimizer state",
            dir.display()
        );
    }
    eprintln!(
        "resuming from {} (step {})",
        dir.display(),
        state.global_step
    );
    Ok(state)
}

/// A resumed run must use the settings that decide the computation.
pub fn check_resumable(saved: &TrainConfig, now: &TrainConfig) -> Result<()> {
    let warmup = |c: &TrainConfig| format!("steps {:?}, ratio {}", c.warmup_steps, c.warmup_ratio);
    let adam = |c: &TrainConfig| format!("{} {} {}", c.adam_beta1, c.adam_beta2, c.adam_epsilon);
    let fields: [(&str, String, String); 23] = [
        ("lora", saved.lora.to_string(), now.lora.to_string()),
        (
            "use_dora",
            saved.use_dora.to_string(),
            now.use_dora.to_string(),
        ),
        ("lora_r", saved.lora_r.to_string(), now.lora_r.to_string()),
        (
            "adapter_dir",
            format!("{:?}", saved.adapter_dir),
            format!("{:?}", now.adapter_dir),
        ),
        (
            "batch_size",
            saved.batch_size.to_string(),
            now.batch_size.to_string(),
        ),
        (
            // Over all data-parallel ranks: 2 ranks x 4 resume as 1 process x 8.
            "grad_accum x world size",
            saved.global_accumulation().to_string(),
            now.global_accumulation().to_string(),
        ),
        ("seed", saved.seed.to_string(), now.seed.to_string()),
        (
            "data_seed",
            format!("{:?}", saved.data_seed),
            format!("{:?}", now.data_seed),
        ),
        (
            "cutoff_len",
            saved.cutoff_len.to_string(),
            now.cutoff_len.to_string(),
        ),
        ("lr", saved.lr.to_string(), now.lr.to_string()),
        (
            "lr_scheduler",
            format!("{:?} {:?}", saved.lr_scheduler, saved.lr_scheduler_kwargs),
            format!("{:?} {:?}", now.lr_scheduler, now.lr_scheduler_kwargs),
        ),
        ("warmup", warmup(saved), warmup(now)),
        ("adam betas and epsilon", adam(saved), adam(now)),
        (
            "init_lora_weights",
            saved.init_lora_weights.to_string(),
            now.init_lora_weights.to_string(),
        ),
        (
            "train_on_inputs",
            saved.train_on_inputs.to_string(),
            now.train_on_inputs.to_string(),
        ),
        (
            // The objective: a resumed run's losses and best checkpoint compare with
            // the saved ones only under the same smoothing.
            "label_smoothing_factor",
            saved.label_smoothing_factor.to_string(),
            now.label_smoothing_factor.to_string(),
        ),
        (
            "neftune_noise_alpha",
            format!("{:?}", saved.neftune_noise_alpha),
            format!("{:?}", now.neftune_noise_alpha),
        ),
        (
            "data_dir",
            saved.data_dir.display().to_string(),
            now.data_dir.display().to_string(),
        ),
        (
            "prompt_format",
            format!("{:?}", saved.prompt_format),
            format!("{:?}", now.prompt_format),
        ),
        (
            "encoding",
            format!("{:?}", saved.encoding),
            format!("{:?}", now.encoding),
        ),
        (
            "skip_invalid_rows",
            saved.skip_invalid_rows.to_string(),
            now.skip_invalid_rows.to_string(),
        ),
        (
            "optim",
            format!("{:?}", saved.optim),
            format!("{:?}", now.optim),
        ),
        (
            "quantize",
            format!("{:?} {}", saved.quantize, saved.double_quant),
            format!("{:?} {}", now.quantize, now.double_quant),
        ),
    ];
    for (name, before, after) in fields {
        if before != after {
            bail_input!(
                "--resume: the checkpoint was trained with {name} = {before}, this run has {after}"
            );
        }
    }
    Ok(())
}

/// The optimizer state of a checkpoint: `optimizer.safetensors`, or ZeRO-1's
/// `optimizer-R-of-W.safetensors` shards, all W of them (empty without optimizer state).
fn optimizer_state_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("optimizer.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let mut shards: Vec<(usize, usize, PathBuf)> = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if let Some((rank, world)) = name
            .strip_prefix("optimizer-")
            .and_then(|n| n.strip_suffix(".safetensors"))
            .and_then(|n| n.split_once("-of-"))
            .and_then(|(r, w)| Some((r.parse().ok()?, w.parse().ok()?)))
        {
            shards.push((rank, world, path));
        }
    }
    shards.sort();
    let world = shards.first().map_or(0, |s| s.1);
    let complete = shards.len() == world
        && shards
            .iter()
            .enumerate()
            .all(|(i, (rank, w, _))| *rank == i && *w == world);
    if !shards.is_empty() && !complete {
        bail_input!(
            "{}: the optimizer shards are incomplete ({} file(s); each of optimizer-R-of-W.safetensors for R < W is needed)",
            dir.display(),
            shards.len()
        );
    }
    Ok(shards.into_iter().map(|(_, _, path)| path).collect())
}

/// ZeRO-1: this rank's part of the optimizer state, into `dir` (created if needed) as
/// `optimizer-RANK-of-WORLD.safetensors`, through a temp name.
pub fn write_optimizer_shard(
    dir: &Path,
    optimizer: &AdamW,
    rank: usize,
    world: usize,
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| dir.display().to_string())?;
    let file = dir.join(format!("optimizer-{rank}-of-{world}.safetensors"));
    let temp = crate::atomic::temp_path_for(&file);
    write_optimizer_state(&temp, optimizer)?;
    std::fs::rename(&temp, &file)?;
    Ok(())
}

/// The optimizer's state tensors (this rank's, under ZeRO-1) as one safetensors file.
fn write_optimizer_state(path: &Path, optimizer: &AdamW) -> Result<()> {
    let tensors: Vec<(String, crate::model::tensor_io::WritableTensor)> = optimizer
        .state_tensors()
        .iter()
        .map(|(name, t)| {
            (
                name.clone(),
                crate::model::tensor_io::WritableTensor::new(t),
            )
        })
        .collect();
    crate::model::tensor_io::write_safetensors(path, &tensors)
}

/// Everything a checkpoint is written from.
pub struct CheckpointSource<'a> {
    pub model: &'a Llama,
    pub mode: &'a Mode,
    pub tokenizer: &'a ModelTokenizer,
    /// The base model's name, for the adapter's config.
    pub base: &'a str,
    pub optimizer: &'a AdamW,
    pub state: &'a TrainerState,
    pub config: &'a TrainConfig,
    /// ZeRO-1: the folder where every rank wrote its shard of the optimizer state.
    pub optimizer_shards: Option<&'a Path>,
}

fn checkpoint_dir(out: &Path, step: i64) -> PathBuf {
    out.join(format!("checkpoint-{step}"))
}

/// Writes a checkpoint's files into the folder `tmp`: the model (adapter or HF
/// folder), the optimizer state unless --save-only-model, the configuration and the
/// trainer state.
fn fill_checkpoint(tmp: &Path, source: &CheckpointSource) -> Result<()> {
    let config = source.config;
    save_trained(
        source.model,
        source.mode,
        source.tokenizer,
        source.base,
        tmp,
    )?;
    if let Some(shards) = source.optimizer_shards {
        // ZeRO-1: every rank's shard of the optimizer state, written beside (a stale
        // file of a crashed save is left out: only this world size's names move).
        let suffix = format!("-of-{}.safetensors", config.world_size);
        for entry in std::fs::read_dir(shards)? {
            let path = entry?.path();
            let name = path.file_name().expect("a file name").to_owned();
            if name.to_string_lossy().ends_with(&suffix) {
                std::fs::rename(&path, tmp.join(name))?;
            }
        }
        std::fs::remove_dir_all(shards)?;
    } else if config.checkpoints_hold_optimizer() {
        write_optimizer_state(&tmp.join("optimizer.safetensors"), source.optimizer)?;
    }
    write_file(
        &tmp.join("training_config.toml"),
        config.to_toml().as_bytes(),
    )?;
    write_file(
        &tmp.join("trainer_state.json"),
        serde_json::to_string_pretty(source.state)?.as_bytes(),
    )
}

/// Writes OUT/checkpoint-STEP (through a temp folder renamed when complete), then
/// prunes by --save-total-limit (keeping the best one when it is what OUT will hold,
/// with --load-best-model-at-end, the default; without, as HF, the oldest go).
pub fn save_checkpoint(out: &Path, source: &CheckpointSource) -> Result<()> {
    let state = source.state;
    write_dir_with(&checkpoint_dir(out, state.global_step), |tmp| {
        fill_checkpoint(tmp, source)
    })?;
    // save_total_limit: never the best, never this one.
    prune_checkpoints(
        out,
        source.config.save_total_limit,
        state
            .best_step
            .filter(|_| source.config.load_best_model_at_end),
        state.global_step,
    )
}

/// A checkpoint being written on another thread (`--async-checkpoint`).
pub struct BackgroundSave {
    step: i64,
    writer: std::thread::JoinHandle<Result<f64>>,
}

impl BackgroundSave {
    /// Waits until the checkpoint is in place; returns the seconds the writer took.
    pub fn wait(self) -> Result<f64> {
        let step = self.step;
        self.writer
            .join()
            .map_err(|_| anyhow::anyhow!("the writer of checkpoint-{step} panicked"))?
            .with_context(|| format!("writing checkpoint-{step} in the background"))
    }
}

/// `--async-checkpoint`: `save_checkpoint` in two halves. Now, on the training
/// thread: the small files, and host copies of every tensor (the only wait: a device
/// to host copy on a GPU, a memory copy on the CPU). Then, on a writer thread while
/// training goes on: the safetensors files, the rename that makes the checkpoint
/// exist, and pruning. Until that rename the checkpoint is a temp folder that
/// `--resume` does not see, so a crash meanwhile leaves the previous checkpoint as the
/// latest, as with a synchronous save. One save is in flight at a time: the caller
/// waits for the last before starting the next, and before the run ends.
pub fn start_checkpoint_in_background(
    out: &Path,
    source: &CheckpointSource,
) -> Result<BackgroundSave> {
    let step = source.state.global_step;
    let dir = checkpoint_dir(out, step);
    let (((), files), temp) = crate::atomic::fill_temp_dir(&dir, |tmp| {
        crate::model::tensor_io::deferring(|| fill_checkpoint(tmp, source))
    })?;
    let out = out.to_path_buf();
    let best = (source.state.best_step).filter(|_| source.config.load_best_model_at_end);
    let limit = source.config.save_total_limit;
    let writer = std::thread::Builder::new()
        .name(format!("checkpoint-{step} writer"))
        .spawn(move || {
            let started = std::time::Instant::now();
            let written = files
                .iter()
                .try_for_each(|file| file.write())
                .and_then(|()| crate::atomic::publish_dir(&temp, &dir));
            if let Err(error) = written {
                let _ = std::fs::remove_dir_all(&temp);
                return Err(error);
            }
            prune_checkpoints(&out, limit, best, step)?;
            Ok(started.elapsed().as_secs_f64())
        })?;
    Ok(BackgroundSave { step, writer })
}

/// Keeps at most `limit` checkpoints, never deleting the best or the latest.
fn prune_checkpoints(
    out: &Path,
    limit: Option<usize>,
    best: Option<i64>,
    latest: i64,
) -> Result<()> {
    let Some(limit) = limit else {
        return Ok(());
    };
    let all = checkpoints(out);
    let mut excess = all.len().saturating_sub(limit.max(1));
    for (step, dir) in all {
        if excess == 0 {
            break;
        }
        if Some(step) == best || step == latest {
            continue;
        }
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        excess -= 1;
    }
    Ok(())
}

fn copy_model_files(from: &Path, to: &Path) -> Result<()> {
    write_dir_with(to, |tmp| {
        for file in trainables::model_files(from) {
            link_or_copy(&file, &tmp.join(file.file_name().expect("a file name")))?;
        }
        Ok(())
    })
}

/// At the end of a run: OUT/final holds the last model, OUT itself the best one by
/// eval loss (the last one without evaluations, or when `best_in_out` is false: HF's
/// load_best_model_at_end), and OUT/trainer_state.json the whole history. Returns the
/// folder of the model OUT holds.
pub fn publish_models(out: &Path, state: &TrainerState, best_in_out: bool) -> Result<PathBuf> {
    let final_dir = out.join(format!("checkpoint-{}", state.global_step));
    copy_model_files(&final_dir, &out.join("final"))?;
    let best_dir = state
        .best_model_checkpoint
        .as_ref()
        .filter(|_| best_in_out)
        .map(|name| out.join(name))
        .filter(|d| d.is_dir())
        .unwrap_or(final_dir);
    for file in trainables::model_files(&best_dir) {
        link_or_copy(&file, &out.join(file.file_name().expect("a file name")))?;
    }
    write_file(
        &out.join("trainer_state.json"),
        serde_json::to_string_pretty(state)?.as_bytes(),
    )?;
    Ok(best_dir)
}
