//! `amthal train`: supervised fine-tuning with answer-only loss, LoRA or full, the
//! semantics users know from HF Trainer (AdamW, warmup + decay, clipping, gradient
//! accumulation normalised by the step's answer-token count, eval every epoch or N
//! steps, best checkpoint by eval loss, early stopping), and exact resume.
//!
//! Exact resume: everything random is derived from the seed and a position, never
//! from a generator's running state: the data order from (seed, epoch), dropout from
//! (seed, micro-batch number), LoRA initialisation from the seed. A checkpoint holds
//! the trained tensors, AdamW's moments (and f32 master weights), and the position;
//! resuming from it replays the same computation, bit for bit on CPU in f32.

pub mod config;
pub mod data_order;
pub mod loss_scale;
pub mod memory_estimate;
pub mod moments;
pub mod optim;
pub mod plot;
pub mod state;
pub mod trainables;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use tch::{Device, Kind, Tensor};

use crate::atomic::{write_dir_with, write_file};
use crate::bail_input;
use crate::batch::Batch;
use crate::data::{Split, read_split};
use crate::device::{kind_name, parse_device, resolve_precision};
use crate::encode::{Encoded, Encoder};
use crate::error::bad_input;
use crate::generate::{
    GenerationRequest, SamplingConfig, completion_text, generate_batch, stop_ids,
};
use crate::loss::{answer_token_losses, losses_from_hidden};
use crate::model::lora::{LoraConfig, attach_new};
use crate::model::{Llama, LoadOptions, load_llama};
use crate::model_source::ModelSource;
use crate::prompt::PromptBuilder;
use crate::tokenizer::ModelTokenizer;
use config::{EvalStrategy, TrainConfig};
use optim::{AdamW, learning_rate};
use state::{LogEntry, TrainerState};
use trainables::{Mode, restore_trained, save_trained, trainable_tensors, unfreeze_all};

/// What a finished run reports.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TrainSummary {
    pub output_dir: PathBuf,
    pub steps: i64,
    pub best_eval_loss: Option<f64>,
    pub best_step: Option<i64>,
    pub final_eval_loss: Option<f64>,
    pub seconds: f64,
    pub tokens_per_second: f64,
    pub peak_rss_bytes: u64,
    /// libtorch's caching-allocator peaks on the training device (None on CPU).
    pub gpu_memory: Option<crate::cuda::GpuMemory>,
    pub previews: Vec<(String, String)>,
    /// Rows left out under --skip-invalid-rows, per split.
    pub skipped_rows: SkippedRows,
}

/// The rows `--skip-invalid-rows` left out of each split.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SkippedRows {
    pub train: Vec<crate::data::InvalidRow>,
    pub validation: Vec<crate::data::InvalidRow>,
}

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
fn checkpoints(output_dir: &Path) -> Vec<(i64, PathBuf)> {
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

/// Token-weighted mean answer-token loss over a set (no gradients).
pub fn evaluate_loss(model: &Llama, examples: &[Encoded], batch_size: usize) -> f64 {
    crate::loss::mean_loss(model, &examples.iter().collect::<Vec<_>>(), batch_size)
}

/// Dropout seed for a micro-batch and layer: a pure function of the position.
fn dropout_seed(seed: u64, micro_step: u64, layer: usize) -> i64 {
    (seed
        .wrapping_mul(1_000_003)
        .wrapping_add(micro_step.wrapping_mul(1009))
        .wrapping_add(layer as u64)
        & 0x7FFF_FFFF_FFFF) as i64
}

/// Forward + backward of one micro-batch, gradients scaled by `scale` (1 / the
/// optimizer step's answer tokens). Returns the unscaled loss sum.
pub fn micro_step(
    model: &Llama,
    batch: &Batch,
    scale: f64,
    seeds: (u64, u64),
    checkpointing: bool,
    full: bool,
) -> Result<f64> {
    let (seed, micro) = seeds;
    if !checkpointing {
        tch::manual_seed(dropout_seed(seed, micro, 0));
        let losses = answer_token_losses(model, batch, true);
        let sum = losses.sum();
        let value = sum.double_value(&[]);
        if value.is_finite() {
            (sum * scale).backward();
        }
        return Ok(value);
    }
    // Gradient checkpointing per decoder layer: a forward pass without a graph keeps
    // only each layer's input; the backward pass recomputes one layer at a time (with
    // the same dropout seed) and pushes the gradient through it.
    // Right padding: causal attention without a mask is exact (see answer_token_losses).
    let context = model.context(&batch.input_ids, &batch.positions, None, None);
    let mut inputs = Vec::with_capacity(model.layers.len());
    let mut hidden = tch::no_grad(|| model.embed(&batch.input_ids));
    for layer in 0..model.layers.len() {
        inputs.push(hidden.shallow_clone());
        tch::manual_seed(dropout_seed(seed, micro, layer));
        hidden = tch::no_grad(|| model.layer_forward(layer, &hidden, &context, None, true));
    }
    let top = hidden.detach().set_requires_grad(true);
    let losses = losses_from_hidden(model, &model.final_norm(&top), &batch.labels);
    let sum = losses.sum();
    let value = sum.double_value(&[]);
    if !value.is_finite() {
        return Ok(value);
    }
    (sum * scale).backward();
    let mut grad = top.grad();
    for layer in (0..model.layers.len()).rev() {
        let input = inputs[layer].detach().set_requires_grad(true);
        tch::manual_seed(dropout_seed(seed, micro, layer));
        let output = model.layer_forward(layer, &input, &context, None, true);
        (output * &grad).sum(Kind::Float).backward();
        grad = input.grad();
    }
    if full {
        (model.embed(&batch.input_ids) * &grad)
            .sum(Kind::Float)
            .backward();
    }
    Ok(value)
}

/// Runs a training job. `resume`: "latest" or a checkpoint name/path.
pub fn train(config: &TrainConfig, resume: Option<&str>) -> Result<TrainSummary> {
    config.validate()?;
    let out = &config.output_dir;
    let train_set = read_split(&config.data_dir, Split::Train, config.read_options())?;
    let validation_set = match config.eval_strategy {
        EvalStrategy::No => None,
        _ => Some(read_split(
            &config.data_dir,
            Split::Validation,
            config.read_options(),
        )?),
    };
    let skipped_rows = SkippedRows {
        train: train_set.skipped.clone(),
        validation: validation_set
            .as_ref()
            .map(|set| set.skipped.clone())
            .unwrap_or_default(),
    };
    let resume_dir = match resume {
        Some(which) => Some(find_checkpoint(out, which)?),
        None => None,
    };
    if resume_dir.is_none() && !checkpoints(out).is_empty() {
        bail_input!(
            "{} already holds checkpoints; pass --resume to continue that run, or choose another --output-dir",
            out.display()
        );
    }

    let source = ModelSource::resolve(config.model.as_deref())?;
    let device: Device = parse_device(&config.device)?;
    let kind = resolve_precision(config.precision, device);
    let tokenizer = source.tokenizer()?;
    let prompts = PromptBuilder::new(config.prompt_format, &tokenizer)?;
    let encoder = Encoder::new(&tokenizer, &prompts)?;
    let (train_examples, train_stats) =
        encoder.encode_all(&train_set.examples, Some(config.cutoff_len))?;
    if train_examples.is_empty() {
        bail_input!(
            "{}: no example fits --cutoff-len {}",
            train_set.path.display(),
            config.cutoff_len
        );
    }
    let (eval_examples, eval_stats) = match &validation_set {
        Some(set) => {
            let (e, s) = encoder.encode_all(&set.examples, Some(config.cutoff_len))?;
            (e, Some(s))
        }
        None => (Vec::new(), None),
    };

    check_fits_the_device(config, &source, device, kind)?;
    let mut model = load_llama(&source, LoadOptions { device, kind })
        .with_context(|| format!("loading {}", source.display()))?;
    tch::manual_seed(config.seed as i64);
    let mode = if config.lora {
        let lora = LoraConfig {
            r: config.lora_r,
            alpha: config.lora_alpha,
            dropout: config.lora_dropout,
            targets: config.lora_targets.clone(),
            rslora: config.rslora,
        };
        attach_new(&mut model, &lora)?;
        Mode::Lora(lora)
    } else {
        unfreeze_all(&model);
        Mode::Full
    };
    let mut optimizer = AdamW::with_kind(
        trainable_tensors(&model, &mode),
        config.weight_decay,
        config.optim,
    );
    let base_name = source.display();

    let lengths: Vec<usize> = train_examples.iter().map(|e| e.input_ids.len()).collect();
    let micro_per_epoch = train_examples.len().div_ceil(config.batch_size);
    let windows_per_epoch = micro_per_epoch.div_ceil(config.grad_accum);
    let total_steps = match config.max_steps {
        Some(steps) => steps as i64,
        None => (config.epochs * windows_per_epoch as f64).ceil() as i64,
    };
    let warmup = (config.warmup_ratio * total_steps as f64).ceil() as i64;

    let mut state = TrainerState {
        max_steps: total_steps,
        ..TrainerState::default()
    };
    if let Some(dir) = &resume_dir {
        let text = std::fs::read_to_string(dir.join("trainer_state.json"))?;
        state = serde_json::from_str(&text)
            .map_err(|e| bad_input(format!("{}: {e}", dir.display())))?;
        let saved = TrainConfig::from_toml(&dir.join("training_config.toml"))?;
        check_resumable(&saved, config)?;
        restore_trained(&model, &mode, dir)?;
        let optimizer_file = dir.join("optimizer.safetensors");
        if optimizer_file.is_file() {
            let tensors: BTreeMap<String, Tensor> = Tensor::read_safetensors(optimizer_file)?
                .into_iter()
                .map(|(k, v)| (k, v.to_device(device)))
                .collect();
            optimizer.load_state(&tensors, state.global_step)?;
        } else {
            // A --save-only-model checkpoint: the weights and the position are restored,
            // AdamW starts with fresh moments (so the run is no longer bit-exact).
            tracing::warn!(
                "{} has no optimizer state (--save-only-model): resuming with fresh AdamW moments",
                dir.display()
            );
        }
        eprintln!(
            "resuming from {} (step {})",
            dir.display(),
            state.global_step
        );
    }

    // f16 needs dynamic loss scaling (GradScaler); a resumed run keeps its scaler.
    if kind == Kind::Half && state.loss_scaler.is_none() {
        state.loss_scaler = Some(loss_scale::LossScaler::new(config.loss_scale_init));
    }
    std::fs::create_dir_all(out)
        .map_err(|e| bad_input(format!("{}: cannot create: {e}", out.display())))?;
    write_file(
        &out.join("training_config.toml"),
        config.to_toml().as_bytes(),
    )?;
    eprintln!("effective configuration:\n{}", config.to_toml());
    eprintln!(
        "model {} ({} on {device:?}), {} training; train: {train_stats}; {}",
        source.display(),
        kind_name(kind),
        match &mode {
            Mode::Lora(l) => format!(
                "LoRA r={} alpha={} on {}",
                l.r,
                l.alpha,
                l.targets.join(",")
            ),
            Mode::Full => "full".to_string(),
        },
        match &eval_stats {
            Some(s) => format!("validation: {s}"),
            None => "no evaluation".into(),
        }
    );
    eprintln!(
        "{} optimizer steps ({} per epoch: {} micro-batches of {} x {} accumulation), warmup {warmup}",
        total_steps, windows_per_epoch, micro_per_epoch, config.batch_size, config.grad_accum
    );

    let progress =
        indicatif::ProgressBar::new(total_steps as u64).with_position(state.global_step as u64);
    progress.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} step {pos}/{len} {msg} ETA {eta}")
            .expect("valid template"),
    );
    let started = Instant::now();
    let tokens_at_start = state.input_tokens;
    let (mut interval_loss, mut interval_tokens) = (0.0f64, 0i64);
    let mut last_checkpoint_step = resume_dir.as_ref().map(|_| state.global_step);
    let mut stop_early = false;
    let full = matches!(mode, Mode::Full);

    'epochs: while state.global_step < total_steps {
        let batches = data_order::epoch_batches(
            &lengths,
            config.batch_size,
            config.seed,
            state.epoch,
            config.data_order,
        );
        let windows: Vec<&[Vec<usize>]> = batches.chunks(config.grad_accum).collect();
        while state.windows_done_in_epoch < windows.len() {
            if state.global_step >= total_steps {
                break 'epochs;
            }
            let window = windows[state.windows_done_in_epoch];
            let window_tokens: i64 = window
                .iter()
                .flatten()
                .map(|&i| train_examples[i].trained_tokens() as i64)
                .sum();
            let mut window_loss = 0.0;
            let loss_scale = state.loss_scaler.map_or(1.0, |s| s.scale);
            let mut nonfinite_loss = false;
            for micro in window {
                let rows: Vec<&Encoded> = micro.iter().map(|&i| &train_examples[i]).collect();
                let batch = Batch::from_encoded(&rows, device);
                tracing::debug!("micro-batch {:?}: {:?}", micro, batch.input_ids.size());
                let value = micro_step(
                    &model,
                    &batch,
                    loss_scale / window_tokens.max(1) as f64,
                    (config.seed, state.micro_steps),
                    config.gradient_checkpointing,
                    full,
                )?;
                if !value.is_finite() && state.loss_scaler.is_some() {
                    // f16 overflow in the forward pass: GradScaler skips such a step.
                    nonfinite_loss = true;
                } else if !value.is_finite() {
                    progress.abandon();
                    anyhow::bail!(
                        "the loss became {value} at step {}; stopping. The last good checkpoint is {}",
                        state.global_step + 1,
                        last_checkpoint_step
                            .map(|s| out.join(format!("checkpoint-{s}")).display().to_string())
                            .unwrap_or_else(|| "none (no checkpoint was saved yet)".into())
                    );
                }
                if value.is_finite() {
                    window_loss += value;
                }
                state.micro_steps += 1;
                state.input_tokens += rows.iter().map(|r| r.input_ids.len() as i64).sum::<i64>();
            }
            tracing::info!(
                "step {}: forward/backward done at {:.2}s",
                state.global_step + 1,
                started.elapsed().as_secs_f64()
            );
            // f16: unscale, and skip the step (halving the scale) on inf/NaN gradients.
            let apply_step = match &mut state.loss_scaler {
                Some(scaler) => {
                    let finite = optimizer.unscale_grads(1.0 / loss_scale);
                    scaler.update(nonfinite_loss || !finite)
                }
                None => true,
            };
            let lr = learning_rate(
                config.lr_scheduler,
                config.lr,
                state.global_step,
                warmup,
                total_steps,
            );
            let grad_norm = if apply_step {
                let norm = optimizer.clip_grad_norm(config.max_grad_norm);
                optimizer.step(lr);
                Some(norm)
            } else {
                progress.println(format!(
                    "step {}: inf/NaN gradients in f16, step skipped; loss scale now {}",
                    state.global_step + 1,
                    state.loss_scaler.map_or(1.0, |s| s.scale)
                ));
                None
            };
            optimizer.zero_grad();
            state.global_step += 1;
            state.windows_done_in_epoch += 1;
            state.trained_tokens += window_tokens;
            interval_loss += window_loss;
            interval_tokens += window_tokens;
            let epoch_position =
                state.epoch as f64 + state.windows_done_in_epoch as f64 / windows.len() as f64;
            let elapsed = started.elapsed().as_secs_f64();
            let tokens_per_second =
                (state.input_tokens - tokens_at_start) as f64 / elapsed.max(1e-9);
            let step_loss = window_loss / window_tokens.max(1) as f64;
            progress.set_position(state.global_step as u64);
            progress.set_message(format!(
                "epoch {epoch_position:.2} loss {step_loss:.4} lr {lr:.2e} {tokens_per_second:.0} tok/s, {}",
                crate::memory::MemoryReport::now(device).short()
            ));
            if (state.global_step as usize).is_multiple_of(config.logging_steps.max(1))
                || state.global_step == total_steps
            {
                state.log_history.push(LogEntry {
                    step: state.global_step,
                    epoch: epoch_position,
                    loss: Some(interval_loss / interval_tokens.max(1) as f64),
                    learning_rate: Some(lr),
                    grad_norm,
                    tokens_per_second: Some(tokens_per_second),
                    eval_loss: None,
                    elapsed_seconds: Some(elapsed),
                    input_tokens: Some(state.input_tokens),
                    loss_scale: state.loss_scaler.map(|s| s.scale),
                    step_skipped: state.loss_scaler.map(|_| !apply_step),
                });
                (interval_loss, interval_tokens) = (0.0, 0);
                write_log(out, &state.log_history)?;
            }
            let epoch_end = state.windows_done_in_epoch == windows.len();
            let last_step = state.global_step == total_steps;
            let evaluate_now = match config.eval_strategy {
                EvalStrategy::Epoch => epoch_end || last_step,
                EvalStrategy::Steps => {
                    (state.global_step as usize).is_multiple_of(config.eval_steps) || last_step
                }
                EvalStrategy::No => false,
            };
            let mut save_now = evaluate_now
                || (config.eval_strategy == EvalStrategy::No && (epoch_end || last_step));
            if evaluate_now {
                let eval_loss = evaluate_loss(&model, &eval_examples, config.batch_size * 2);
                state.log_history.push(LogEntry {
                    step: state.global_step,
                    epoch: epoch_position,
                    loss: None,
                    learning_rate: None,
                    grad_norm: None,
                    tokens_per_second: None,
                    eval_loss: Some(eval_loss),
                    elapsed_seconds: None,
                    input_tokens: None,
                    loss_scale: None,
                    step_skipped: None,
                });
                write_log(out, &state.log_history)?;
                progress.println(format!(
                    "step {}: eval_loss {eval_loss:.6}",
                    state.global_step
                ));
                if state.best_metric.is_none_or(|best| eval_loss < best) {
                    state.best_metric = Some(eval_loss);
                    state.best_step = Some(state.global_step);
                    state.best_model_checkpoint = Some(format!("checkpoint-{}", state.global_step));
                    state.evals_without_improvement = 0;
                } else {
                    state.evals_without_improvement += 1;
                }
                if let Some(patience) = config.early_stopping_patience
                    && state.evals_without_improvement >= patience
                {
                    progress.println(format!(
                        "early stopping: no improvement in {patience} evaluation(s)"
                    ));
                    stop_early = true;
                    save_now = true;
                }
            }
            if epoch_end {
                // The checkpoint records where the next step starts.
                state.epoch += 1;
                state.windows_done_in_epoch = 0;
            }
            if save_now {
                tracing::info!(
                    "saving checkpoint-{} at {:.2}s",
                    state.global_step,
                    started.elapsed().as_secs_f64()
                );
                save_checkpoint(
                    out, &model, &mode, &tokenizer, &base_name, &optimizer, &state, config,
                )?;
                last_checkpoint_step = Some(state.global_step);
            }
            if stop_early {
                break 'epochs;
            }
            if epoch_end {
                continue 'epochs;
            }
        }
    }
    progress.finish_and_clear();
    tracing::info!(
        "training loop done at {:.2}s",
        started.elapsed().as_secs_f64()
    );
    if last_checkpoint_step != Some(state.global_step) {
        save_checkpoint(
            out, &model, &mode, &tokenizer, &base_name, &optimizer, &state, config,
        )?;
    }
    let seconds = started.elapsed().as_secs_f64();
    let final_dir = out.join(format!("checkpoint-{}", state.global_step));
    let final_eval = state
        .log_history
        .iter()
        .rev()
        .find_map(|e| e.eval_loss.filter(|_| e.step == state.global_step));

    // OUT/final: the last model; OUT itself: the best one by eval loss (or the last).
    copy_model_files(&final_dir, &out.join("final"))?;
    let best_dir = state
        .best_model_checkpoint
        .as_ref()
        .map(|name| out.join(name))
        .filter(|d| d.is_dir())
        .unwrap_or_else(|| final_dir.clone());
    for file in trainables::model_files(&best_dir) {
        let bytes = std::fs::read(&file)?;
        write_file(&out.join(file.file_name().expect("a file name")), &bytes)?;
    }
    write_file(
        &out.join("trainer_state.json"),
        serde_json::to_string_pretty(&state)?.as_bytes(),
    )?;
    if let Err(error) = plot::write_loss_plots(out, &state.log_history) {
        tracing::warn!("could not draw the loss curves: {error:#}");
    }

    // Previews with the best model, as the seed prints them.
    restore_trained(&model, &mode, &best_dir)?;
    let previews = previews(
        &model,
        &tokenizer,
        &prompts,
        &encoder,
        validation_set
            .as_ref()
            .map(|s| &s.examples[..])
            .unwrap_or(&train_set.examples[..]),
        config.previews,
    )?;
    let memory = crate::memory::MemoryReport::now(device);
    let summary = TrainSummary {
        output_dir: out.clone(),
        steps: state.global_step,
        best_eval_loss: state.best_metric,
        best_step: state.best_step,
        final_eval_loss: final_eval,
        seconds,
        tokens_per_second: (state.input_tokens - tokens_at_start) as f64 / seconds.max(1e-9),
        peak_rss_bytes: memory.peak_rss_bytes,
        gpu_memory: memory.gpu,
        previews,
        skipped_rows,
    };
    write_file(
        &out.join("train_summary.json"),
        serde_json::to_string_pretty(&summary)?.as_bytes(),
    )?;
    Ok(summary)
}

/// On CUDA, refuses a setup whose estimated memory exceeds the device's free memory,
/// before loading anything, naming the estimate and the first flag that would fit.
fn check_fits_the_device(
    config: &TrainConfig,
    source: &ModelSource,
    device: Device,
    kind: Kind,
) -> Result<()> {
    use memory_estimate::{Setup, estimate};
    use moments::OptimKind;
    let Device::Cuda(index) = device else {
        return Ok(());
    };
    let Some(free) = crate::cuda::devices()
        .get(index)
        .map(|d| d.free_bytes)
        .filter(|&f| f > 0)
    else {
        return Ok(());
    };
    let (model_config, _) = crate::model::load::open_model(source)?;
    let setup = Setup {
        config: &model_config,
        kind,
        lora: config
            .lora
            .then_some((config.lora_r, config.lora_targets.as_slice())),
        optim: config.optim,
        batch_size: config.batch_size,
        tokens_per_row: config.cutoff_len,
        gradient_checkpointing: config.gradient_checkpointing,
    };
    let needed = estimate(&setup);
    eprintln!(
        "estimated GPU memory: {} of {:.1} GB free on cuda:{index}",
        needed.describe(),
        free as f64 / 1e9
    );
    if needed.total() <= free as u64 {
        return Ok(());
    }
    let alternatives = [
        (
            "--optim adamw-bf16",
            Setup {
                optim: OptimKind::AdamWBf16,
                ..setup.clone()
            },
        ),
        (
            "--optim adamw-8bit",
            Setup {
                optim: OptimKind::AdamW8bit,
                ..setup.clone()
            },
        ),
        (
            "--optim adamw-8bit --gradient-checkpointing",
            Setup {
                optim: OptimKind::AdamW8bit,
                gradient_checkpointing: true,
                ..setup.clone()
            },
        ),
        (
            "--lora --gradient-checkpointing",
            Setup {
                lora: Some((config.lora_r, config.lora_targets.as_slice())),
                gradient_checkpointing: true,
                ..setup.clone()
            },
        ),
    ];
    let hint = alternatives
        .iter()
        .find(|(_, alternative)| estimate(alternative).total() <= free as u64)
        .map_or(
            "a smaller --batch-size or --cutoff-len".to_string(),
            |(flags, alternative)| format!("{flags} ({})", estimate(alternative).describe()),
        );
    bail_input!(
        "this setup needs {} but cuda:{index} has {:.1} GB free; what would fit: {hint}",
        needed.describe(),
        free as f64 / 1e9
    )
}

/// A resumed run must use the settings that decide the computation.
fn check_resumable(saved: &TrainConfig, now: &TrainConfig) -> Result<()> {
    let fields: [(&str, String, String); 12] = [
        ("lora", saved.lora.to_string(), now.lora.to_string()),
        ("lora_r", saved.lora_r.to_string(), now.lora_r.to_string()),
        (
            "batch_size",
            saved.batch_size.to_string(),
            now.batch_size.to_string(),
        ),
        (
            "grad_accum",
            saved.grad_accum.to_string(),
            now.grad_accum.to_string(),
        ),
        ("seed", saved.seed.to_string(), now.seed.to_string()),
        (
            "cutoff_len",
            saved.cutoff_len.to_string(),
            now.cutoff_len.to_string(),
        ),
        ("lr", saved.lr.to_string(), now.lr.to_string()),
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

fn write_log(out: &Path, log: &[LogEntry]) -> Result<()> {
    let mut text = String::new();
    for entry in log {
        text.push_str(&serde_json::to_string(entry)?);
        text.push('\n');
    }
    write_file(&out.join("log.jsonl"), text.as_bytes())
}

#[allow(clippy::too_many_arguments)]
fn save_checkpoint(
    out: &Path,
    model: &Llama,
    mode: &Mode,
    tokenizer: &ModelTokenizer,
    base: &str,
    optimizer: &AdamW,
    state: &TrainerState,
    config: &TrainConfig,
) -> Result<()> {
    let dir = out.join(format!("checkpoint-{}", state.global_step));
    write_dir_with(&dir, |tmp| {
        save_trained(model, mode, tokenizer, base, &tmp.join("model"))?;
        for file in trainables::model_files(&tmp.join("model")) {
            std::fs::rename(&file, tmp.join(file.file_name().expect("a file name")))?;
        }
        std::fs::remove_dir_all(tmp.join("model"))?;
        if !config.save_only_model {
            let tensors: Vec<(String, crate::model::tensor_io::TensorBytes)> = optimizer
                .state_tensors()
                .iter()
                .map(|(name, t)| {
                    (
                        name.clone(),
                        crate::model::tensor_io::TensorBytes::from_tensor(t),
                    )
                })
                .collect();
            crate::model::tensor_io::write_safetensors(
                &tmp.join("optimizer.safetensors"),
                &tensors,
            )?;
        }
        write_file(
            &tmp.join("training_config.toml"),
            config.to_toml().as_bytes(),
        )?;
        write_file(
            &tmp.join("trainer_state.json"),
            serde_json::to_string_pretty(state)?.as_bytes(),
        )
    })?;
    // save_total_limit: never the best, never this one.
    prune_checkpoints(
        out,
        config.save_total_limit,
        state.best_step,
        state.global_step,
    )
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
            std::fs::copy(&file, tmp.join(file.file_name().expect("a file name")))?;
        }
        Ok(())
    })
}

/// Greedy explanations of the first `count` proverbs.
fn previews(
    model: &Llama,
    tokenizer: &ModelTokenizer,
    prompts: &PromptBuilder,
    encoder: &Encoder,
    examples: &[crate::data::Example],
    count: usize,
) -> Result<Vec<(String, String)>> {
    let chosen = &examples[..count.min(examples.len())];
    let requests = chosen
        .iter()
        .enumerate()
        .map(|(i, e)| {
            Ok(GenerationRequest {
                prompt_ids: encoder.prompt_ids(&e.proverb)?,
                row_number: i as u64,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let stops = stop_ids(encoder.end_id(), tokenizer, model, None);
    let config = SamplingConfig {
        max_new_tokens: 128,
        ..SamplingConfig::default()
    };
    let generations = generate_batch(model, &requests, &stops, &config)?;
    chosen
        .iter()
        .zip(generations)
        .map(|(e, g)| {
            Ok((
                e.proverb.clone(),
                completion_text(tokenizer, prompts, &g.tokens)?,
            ))
        })
        .collect()
}
