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
//!
//! Where things are: this file sets a run up and holds the loop; `step.rs` is one
//! optimizer step (forward, loss, backward, update); `evaluation.rs`,
//! `checkpoints.rs` and `logging.rs` are what happens between steps.

pub mod adafactor;
pub mod cadence;
pub mod checkpoints;
pub mod code_map;
pub mod compensation;
pub mod config;
pub mod data_order;
pub mod device_fit;
pub mod disk_fit;
pub mod evaluation;
pub mod graphed_step;
pub mod greedy_lr;
pub mod logging;
pub mod loss_scale;
pub mod lr_schedule;
pub mod memory_estimate;
pub mod moments;
pub mod offload;
pub mod optim;
pub mod plateau;
pub mod plot;
mod rank_sums;
pub mod state;
pub mod step;
pub mod step_values;
pub mod tensorboard;
pub mod trainables;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use tch::{Device, Kind};

use crate::atomic::write_file;
use crate::bail_input;
use crate::batch::Batch;
use crate::data::{Dataset, Split, read_split};
use crate::device::{kind_name, parse_device, resolve_precision};
use crate::distributed::{Distributed, WorkerPlace};
use crate::encode::{Encoded, Encoder};
use crate::model::lora::{LoraConfig, attach_new};
use crate::model::{Llama, LoadOptions, load_llama};
use crate::model_source::ModelSource;
use crate::prompt::PromptBuilder;
use crate::tokenizer::ModelTokenizer;
pub use checkpoints::find_checkpoint;
use checkpoints::{checkpoints, publish_models, save_checkpoint};
use config::{EvalStrategy, ReportTo, TrainConfig};
pub use evaluation::evaluate_loss;
use graphed_step::{GraphedSteps, optimizer_step_graphed};
use lr_schedule::learning_rate;
use optim::AdamW;
use state::{LogEntry, TrainerState};
pub use step::micro_step;
use step::{StepSettings, optimizer_step};
use trainables::{Mode, restore_trained, trainable_tensors, unfreeze_all};

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
    /// The longest the loop waited for a checkpoint: all of its writing, or with
    /// `--async-checkpoint` the host copies (and any wait for the previous write).
    pub slowest_checkpoint_seconds: f64,
    /// `--async-checkpoint`: the longest a checkpoint's background write took.
    pub slowest_checkpoint_write_seconds: Option<f64>,
    /// What the disk check (`disk_fit.rs`) took one checkpoint to be, from the model's
    /// shapes before loading: model files and optimizer state, in bytes.
    pub checkpoint_bytes_estimated: (u64, u64),
    /// Rows left out under --skip-invalid-rows, per split.
    pub skipped_rows: SkippedRows,
    /// Data parallelism: the ranks and the c10d backend (None for a plain run).
    pub data_parallel: Option<DataParallelSummary>,
    /// `--cuda-graphs`: what was recorded (None without the flag).
    pub cuda_graphs: Option<graphed_step::GraphsSummary>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct DataParallelSummary {
    pub world_size: usize,
    /// "gloo" or "nccl".
    pub backend: String,
}

/// The rows `--skip-invalid-rows` left out of each split.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SkippedRows {
    pub train: Vec<crate::data::InvalidRow>,
    pub validation: Vec<crate::data::InvalidRow>,
}

/// How many optimizer steps a run takes, and how its learning rate warms up.
struct Schedule {
    micro_per_epoch: usize,
    windows_per_epoch: usize,
    total_steps: i64,
    warmup: i64,
}

impl Schedule {
    fn new(config: &TrainConfig, examples: usize) -> Schedule {
        let micro_per_epoch = examples.div_ceil(config.batch_size);
        let windows_per_epoch = micro_per_epoch.div_ceil(config.global_accumulation());
        let total_steps = match config.max_steps {
            Some(steps) => steps as i64,
            None => (config.epochs * windows_per_epoch as f64).ceil() as i64,
        };
        let asked =
            lr_schedule::warmup_steps(config.warmup_steps, config.warmup_ratio, total_steps);
        let warmup = if config.lr_scheduler.warms_up() {
            asked
        } else {
            if asked > 0 {
                tracing::warn!(
                    "--lr-scheduler constant has no warmup, as in transformers: the {asked} \
                     warmup steps asked are ignored (constant_with_warmup warms up)"
                );
            }
            0
        };
        Schedule {
            micro_per_epoch,
            windows_per_epoch,
            total_steps,
            warmup,
        }
    }
}

/// Everything a running job works with.
struct Run<'a> {
    config: &'a TrainConfig,
    model: Llama,
    mode: Mode,
    optimizer: AdamW,
    tokenizer: &'a ModelTokenizer,
    base_name: String,
    device: Device,
    train_examples: Vec<Encoded>,
    eval_examples: Vec<Encoded>,
    schedule: Schedule,
    state: TrainerState,
    progress: indicatif::ProgressBar,
    started: Instant,
    tokens_at_start: i64,
    /// Loss and answer tokens since the last logged step.
    interval: (f64, i64),
    last_checkpoint_step: Option<i64>,
    slowest_checkpoint_seconds: f64,
    /// One checkpoint's size, for the room check before each save (`disk_fit.rs`).
    checkpoint_plan: disk_fit::CheckpointPlan,
    /// `--async-checkpoint`: the checkpoint being written on another thread.
    checkpoint_writer: Option<checkpoints::BackgroundSave>,
    /// `--async-checkpoint`: the longest a background write took.
    slowest_checkpoint_write_seconds: Option<f64>,
    /// `--report-to tensorboard` (rank 0): the event file the logs also go to.
    tensorboard: Option<tensorboard::EventWriter>,
    /// Data parallelism (`crate::distributed`): this worker's group; None alone.
    group: Option<Distributed>,
    /// `--cuda-graphs`: the recorded micro-steps.
    graphs: Option<GraphedSteps>,
}

/// What the loop does after a step.
#[derive(PartialEq)]
enum Next {
    Continue,
    EndOfEpoch,
    Stop,
}

/// Runs a training job. `resume`: "latest" or a checkpoint name/path.
pub fn train(config: &TrainConfig, resume: Option<&str>) -> Result<TrainSummary> {
    config.validate()?;
    // A worker of a data-parallel run (torchrun's variables): every optimizer step's
    // window holds grad_accum micro-batches per rank (`TrainConfig::world_size`).
    let place = WorkerPlace::from_env()?;
    let mut device: Device = parse_device(&config.device)?;
    // Data parallel on GPUs: each worker on its node's LOCAL_RANK-th card, unless the
    // command named a card itself.
    if let (Some(place), Device::Cuda(_)) = (&place, device)
        && !config.device.starts_with("cuda:")
    {
        device = Device::Cuda(place.local_rank);
    }
    let group = match place {
        Some(place) => {
            config.validate_distributed()?;
            let backend = config.dist_backend.resolve(device)?;
            Some(Distributed::join(
                place,
                backend,
                device,
                distributed_timeout_seconds(),
            )?)
        }
        None => None,
    };
    let with_world = TrainConfig {
        world_size: group.as_ref().map_or(1, Distributed::world),
        ..config.clone()
    };
    let config = &with_world;
    if group.is_none() && config.zero > 0 {
        eprintln!(
            "note: --zero {} shards across data-parallel ranks; a single process keeps all its state",
            config.zero
        );
    }
    if config.cuda_graphs && !device.is_cuda() {
        eprintln!(
            "note: --cuda-graphs records the step on a GPU; on the CPU the same fixed-width \
             micro-batches run without a graph"
        );
    }
    if config.offload_optimizer && !device.is_cuda() {
        eprintln!(
            "note: --offload-optimizer keeps the optimizer state in host memory, where it already is \
             on the CPU: it only adds a copy per update here"
        );
    }
    let main_rank = group.as_ref().is_none_or(|g| g.rank() == 0);
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
    let kind = resolve_precision(config.precision, device);
    let tokenizer = source.tokenizer()?;
    let prompts = PromptBuilder::new(config.prompt_format, &tokenizer)?;
    let encoder = Encoder::new(&tokenizer, &prompts)?;
    let (train_examples, train_stats) =
        encoder.encode_all(&train_set.examples, Some(config.cutoff_len))?;
    let trained_as_configured = |examples: Vec<Encoded>| -> Vec<Encoded> {
        if config.train_on_inputs {
            examples
                .into_iter()
                .map(Encoded::with_prompt_trained)
                .collect()
        } else {
            examples
        }
    };
    let train_examples = trained_as_configured(train_examples);
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
            (trained_as_configured(e), Some(s.to_string()))
        }
        None => (Vec::new(), None),
    };

    // Before loading anything: the shapes say whether the card and the disk suffice.
    let (model_config, _) = crate::model::load::open_model(&source)?;
    device_fit::check_fits_the_device(config, &model_config, device, kind)?;
    let schedule = Schedule::new(config, train_examples.len());
    let checkpoint_plan = plan_checkpoints(config, &model_config, kind, &schedule)?;
    if main_rank {
        disk_fit::check_checkpoints_fit_the_disk(&checkpoint_plan, out)?;
    }
    // A resume with other settings fails here, before a model loads (minutes for a 7B)
    // or a PiSSA run reads its initial factors from the checkpoint.
    if let Some(dir) = &resume_dir {
        let saved = TrainConfig::from_toml(&dir.join("training_config.toml"))?;
        checkpoints::check_resumable(&saved, config)?;
    }
    let (model, mode) = load_for_training(config, &source, device, kind, resume_dir.as_deref())?;
    let mut optimizer = AdamW::sharded(
        trainable_tensors(&model, &mode),
        config.weight_decay,
        config.optim,
        group
            .as_ref()
            .filter(|_| config.zero == 1)
            .map(|g| (g.rank(), g.world())),
        if config.offload_optimizer {
            offload::StatePlacement::Host
        } else {
            offload::StatePlacement::WithWeights
        },
    );
    (optimizer.beta1, optimizer.beta2, optimizer.eps) =
        (config.adam_beta1, config.adam_beta2, config.adam_epsilon);
    // Recorded graphs add into the same gradient tensors at every replay.
    optimizer.keep_grads = config.cuda_graphs;
    let mut state = match &resume_dir {
        Some(dir) => checkpoints::restore(dir, config, &model, &mode, &mut optimizer, device)?,
        None => TrainerState::default(),
    };
    state.max_steps = schedule.total_steps;
    // reduce_lr_on_plateau's rate is state; a resumed run keeps its own.
    if config.lr_scheduler == lr_schedule::Schedule::ReduceLrOnPlateau && state.plateau.is_none() {
        state.plateau = Some(plateau::Plateau::new(config.lr));
    }
    if config.lr_scheduler == lr_schedule::Schedule::Greedy && state.greedy.is_none() {
        state.greedy = Some(greedy_lr::GreedyLr::new(config.lr));
    }
    // f16 needs dynamic loss scaling (GradScaler); a resumed run keeps its scaler.
    if kind == Kind::Half && state.loss_scaler.is_none() {
        state.loss_scaler = Some(loss_scale::LossScaler::new(config.loss_scale_init));
    }

    // Only rank 0 writes (and prints); every rank computes the same steps.
    if main_rank {
        std::fs::create_dir_all(out).map_err(|e| {
            crate::error::bad_input(format!("{}: cannot create: {e}", out.display()))
        })?;
        write_file(
            &out.join("training_config.toml"),
            config.to_toml().as_bytes(),
        )?;
    }
    if main_rank {
        print_start(
            config,
            &group,
            &source,
            kind,
            device,
            &mode,
            &train_stats,
            eval_stats,
            &schedule,
        );
    }
    let graphs = config.cuda_graphs.then(|| {
        GraphedSteps::new(
            device,
            config.gradient_checkpointing,
            matches!(mode, Mode::Full),
            config.label_smoothing_factor,
        )
    });
    let tensorboard = match config.report_to {
        ReportTo::Tensorboard | ReportTo::All if main_rank => {
            let writer = tensorboard::EventWriter::create(out)?;
            eprintln!("TensorBoard: {}", writer.path().display());
            Some(writer)
        }
        _ => None,
    };
    let mut run = Run {
        tensorboard,
        config,
        progress: if main_rank {
            logging::progress_bar(schedule.total_steps, state.global_step)
        } else {
            indicatif::ProgressBar::hidden()
        },
        tokens_at_start: state.input_tokens,
        last_checkpoint_step: resume_dir.as_ref().map(|_| state.global_step),
        model,
        mode,
        optimizer,
        tokenizer: &tokenizer,
        base_name: source.display(),
        device,
        train_examples,
        eval_examples,
        schedule,
        state,
        started: Instant::now(),
        interval: (0.0, 0),
        slowest_checkpoint_seconds: 0.0,
        checkpoint_plan,
        checkpoint_writer: None,
        slowest_checkpoint_write_seconds: None,
        group,
        graphs,
    };
    crate::profile::enable_from_env(device);
    let trained = run.train_loop();
    // A checkpoint still being written is completed even when the loop failed (a NaN
    // loss names the last good checkpoint: it may be that one).
    let written = run.wait_for_checkpoint_writer();
    trained?;
    written?;
    if let Some(table) = crate::profile::report() {
        eprintln!("{table}");
    }
    run.finish(
        &prompts,
        &encoder,
        validation_set.as_ref().unwrap_or(&train_set),
        SkippedRows {
            train: train_set.skipped.clone(),
            validation: validation_set
                .as_ref()
                .map(|set| set.skipped.clone())
                .unwrap_or_default(),
        },
    )
}

/// The size of this run's checkpoints (from the model's shapes, before loading) and
/// how many it writes.
fn plan_checkpoints(
    config: &TrainConfig,
    model_config: &crate::model::config::LlamaConfig,
    kind: Kind,
    schedule: &Schedule,
) -> Result<disk_fit::CheckpointPlan> {
    let setup = device_fit::setup_of(config, model_config, kind)?;
    let (model_bytes, optimizer_bytes) =
        memory_estimate::checkpoint_bytes(&setup, !config.checkpoints_hold_optimizer());
    // A PiSSA / OLoRA adapter is saved converted, at twice its rank (`lora_init`).
    let model_bytes = if config.lora && config.init_lora_weights.changes_the_base() {
        2 * model_bytes
    } else {
        model_bytes
    };
    Ok(disk_fit::CheckpointPlan {
        model_bytes,
        optimizer_bytes,
        saves: cadence::planned_saves(config, schedule.total_steps, schedule.windows_per_epoch),
        limit: config.save_total_limit,
        keeps_best: config.eval_strategy != EvalStrategy::No && config.load_best_model_at_end,
    })
}

/// How long a rank waits for the others in a collective (or the rendezvous) before
/// giving up: AMTHAL_DIST_TIMEOUT seconds, default 1800 (rank 0 may be writing a full
/// fine-tune's checkpoint while the others wait at the next step's all-reduce).
fn distributed_timeout_seconds() -> u32 {
    std::env::var("AMTHAL_DIST_TIMEOUT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1800)
}

/// The start-up printout (rank 0).
#[allow(clippy::too_many_arguments)]
fn print_start(
    config: &TrainConfig,
    group: &Option<Distributed>,
    source: &ModelSource,
    kind: Kind,
    device: Device,
    mode: &Mode,
    train_stats: &impl std::fmt::Display,
    eval_stats: Option<String>,
    schedule: &Schedule,
) {
    eprintln!("effective configuration:\n{}", config.to_toml());
    if let Some(group) = &group {
        eprintln!(
            "data parallel: {} rank(s) over {:?}, {} micro-batches of {} per rank and step",
            group.world(),
            group.backend(),
            config.grad_accum,
            config.batch_size
        );
    }
    eprintln!(
        "model {} ({} on {device:?}), {} training; train: {train_stats}; {}",
        source.display(),
        kind_name(kind),
        describe_mode(mode),
        eval_stats.map_or("no evaluation".into(), |s| format!("validation: {s}"))
    );
    eprintln!(
        "{} optimizer steps ({} per epoch: {} micro-batches of {} x {} accumulation), warmup {}",
        schedule.total_steps,
        schedule.windows_per_epoch,
        schedule.micro_per_epoch,
        config.batch_size,
        config.global_accumulation(),
        schedule.warmup
    );
    if device.is_cuda() && !config.cuda_graphs && config.optim != moments::OptimKind::Adafactor {
        eprintln!(
            "tip: on a GPU --cuda-graphs replays each step's recorded kernels instead of \
             launching them one by one (a 7B LoRA step 5.8x faster on an H200; README \
             \"--cuda-graphs\")"
        );
    }
}

/// Loads the model and makes it trainable: a fresh LoRA adapter, or every weight. A
/// resumed PiSSA / OLoRA run takes its initial factors from the checkpoint in
/// `resume_dir` (`lora::attach_resumed_residual`).
fn load_for_training(
    config: &TrainConfig,
    source: &ModelSource,
    device: Device,
    kind: Kind,
    resume_dir: Option<&std::path::Path>,
) -> Result<(Llama, Mode)> {
    let options = LoadOptions {
        device,
        kind,
        quantize: config.quantization()?,
    };
    let mut model =
        load_llama(source, options).with_context(|| format!("loading {}", source.display()))?;
    tch::manual_seed(config.seed as i64);
    if !config.lora {
        unfreeze_all(&model);
        return Ok((model, Mode::Full));
    }
    if let Some(dir) = config.adapter_dir.as_ref().filter(|_| resume_dir.is_none()) {
        // (A resumed run attaches a fresh adapter of the same settings below, which
        // the checkpoint then overwrites.)
        let lora = crate::model::lora::load_adapter(&mut model, dir)
            .with_context(|| format!("loading adapter {}", dir.display()))?;
        return Ok((model, Mode::Lora(lora)));
    }
    let lora = LoraConfig {
        r: config.lora_r,
        alpha: config.lora_alpha,
        dropout: config.lora_dropout,
        targets: config.lora_targets.clone(),
        rslora: config.rslora,
        use_dora: config.use_dora,
        init: config.init_lora_weights,
    };
    match resume_dir {
        Some(dir) if lora.init.changes_the_base() => {
            crate::model::lora::attach_resumed_residual(&mut model, &lora, dir)?
        }
        _ => attach_new(&mut model, &lora)?,
    }
    Ok((model, Mode::Lora(lora)))
}

fn describe_mode(mode: &Mode) -> String {
    match mode {
        Mode::Lora(l) => format!(
            "{} r={} alpha={} on {}",
            if l.use_dora { "DoRA" } else { "LoRA" },
            l.r,
            l.alpha,
            l.targets.join(",")
        ),
        Mode::Full => "full".to_string(),
    }
}

impl Run<'_> {
    /// Whether this process writes the logs, checkpoints and models (rank 0, or alone).
    fn is_main(&self) -> bool {
        self.group.as_ref().is_none_or(|g| g.rank() == 0)
    }

    /// After a log entry was added: OUT/log.jsonl rewritten (rank 0) and the entry sent
    /// to TensorBoard (`--report-to`, rank 0 only holds a writer).
    fn publish_log(&mut self) -> Result<()> {
        if self.is_main() {
            logging::write_log(&self.config.output_dir, &self.state.log_history)?;
        }
        if let (Some(writer), Some(entry)) = (&mut self.tensorboard, self.state.log_history.last())
        {
            writer.log(entry)?;
        }
        Ok(())
    }

    /// The validation loss of the model as it is now (split across ranks when
    /// data-parallel).
    fn eval_loss(&self) -> Result<f64> {
        let config = self.config;
        match &self.group {
            None => Ok(evaluate_loss(
                &self.model,
                &self.eval_examples,
                config.eval_rows(),
                config.label_smoothing_factor,
            )),
            Some(group) => evaluation::sharded_eval_loss(
                &self.model,
                &self.eval_examples,
                config.eval_rows(),
                config.label_smoothing_factor,
                group,
            ),
        }
    }

    /// `--eval-on-start` (HF's eval_on_start): the validation loss before the run's
    /// first step, logged at the step it starts from. As in HF it only logs: the best
    /// checkpoint, early stopping and reduce_lr_on_plateau never see it.
    fn evaluate_on_start(&mut self) -> Result<()> {
        let eval_loss = self.eval_loss()?;
        let step = self.state.global_step;
        let epoch = self.state.epoch as f64
            + self.state.windows_done_in_epoch as f64 / self.schedule.windows_per_epoch as f64;
        self.state
            .log_history
            .push(logging::eval_entry(step, epoch, eval_loss));
        self.publish_log()?;
        self.progress
            .println(format!("step {step} (start): eval_loss {eval_loss:.6}"));
        Ok(())
    }

    /// Epochs of accumulation windows until the last step or early stopping.
    fn train_loop(&mut self) -> Result<()> {
        if self.config.eval_on_start {
            self.evaluate_on_start()?;
        }
        let lengths: Vec<usize> = self
            .train_examples
            .iter()
            .map(|e| e.input_ids.len())
            .collect();
        while self.state.global_step < self.schedule.total_steps {
            let batches = data_order::epoch_batches(
                &lengths,
                self.config.batch_size,
                self.config.data_seed.unwrap_or(self.config.seed),
                self.state.epoch,
                self.config.data_order,
            );
            let windows: Vec<&[Vec<usize>]> =
                batches.chunks(self.config.global_accumulation()).collect();
            while self.state.windows_done_in_epoch < windows.len() {
                if self.state.global_step >= self.schedule.total_steps {
                    return Ok(());
                }
                let window = windows[self.state.windows_done_in_epoch];
                self.train_step(window)?;
                self.state.windows_done_in_epoch += 1;
                match self.after_step(windows.len())? {
                    Next::Continue => {}
                    Next::EndOfEpoch => break,
                    Next::Stop => return Ok(()),
                }
            }
        }
        Ok(())
    }

    /// One optimizer step over a window of micro-batches (rows of the train set). In a
    /// data-parallel run the window is the whole step's, and this rank trains every
    /// world-th micro-batch of it.
    fn train_step(&mut self, window: &[Vec<usize>]) -> Result<()> {
        let config = self.config;
        let (rank, world) = self
            .group
            .as_ref()
            .map_or((0, 1), |g| (g.rank(), g.world()));
        let state = &mut self.state;
        let rows = |micro: &Vec<usize>| -> Vec<&Encoded> {
            micro.iter().map(|&i| &self.train_examples[i]).collect()
        };
        let mine: Vec<&Vec<usize>> = window.iter().skip(rank).step_by(world).collect();
        // A short last window can leave a rank without a micro-batch: it runs the
        // window's first one with weight 0, so it still has gradients to sum.
        let padding_only = mine.is_empty();
        let mine = if padding_only { vec![&window[0]] } else { mine };
        let window_tokens: i64 = window
            .iter()
            .flat_map(rows)
            .map(|e| e.trained_tokens() as i64)
            .sum();
        let lr = match (&state.plateau, &state.greedy) {
            (Some(plateau), _) => plateau.lr,
            (None, Some(greedy)) => greedy.lr,
            (None, None) => learning_rate(
                config.lr_scheduler,
                &config.lr_scheduler_kwargs,
                config.lr,
                state.global_step,
                self.schedule.warmup,
                self.schedule.total_steps,
            ),
        };
        let settings = StepSettings {
            seed: config.seed,
            first_micro: state.micro_steps,
            checkpointing: config.gradient_checkpointing,
            full: matches!(self.mode, Mode::Full),
            in_backward: config.optim_in_backward,
            max_grad_norm: config.max_grad_norm,
            lr,
            token_scale: 1.0 / window_tokens.max(1) as f64,
            micro_offset: rank as u64,
            micro_stride: world as u64,
            padding_only,
            neftune_noise_alpha: config.neftune_noise_alpha,
        };
        let outcome = match self.graphs.as_mut().filter(|g| g.usable()) {
            Some(graphs) => optimizer_step_graphed(
                &self.model,
                &mut self.optimizer,
                graphs,
                &mine.iter().map(|micro| rows(micro)).collect::<Vec<_>>(),
                &settings,
                state.loss_scaler.as_mut(),
                self.group.as_ref(),
            )?,
            None => {
                let batches: Vec<Batch> = mine
                    .iter()
                    .map(|micro| {
                        Batch::build(&rows(micro), self.device, config.packing)
                            .with_label_smoothing(config.label_smoothing_factor)
                    })
                    .collect();
                optimizer_step(
                    &self.model,
                    &mut self.optimizer,
                    &batches,
                    &settings,
                    state.loss_scaler.as_mut(),
                    self.group.as_ref(),
                )?
            }
        };
        if let Some(value) = outcome.nonfinite_loss
            && state.loss_scaler.is_none()
        {
            self.progress.abandon();
            anyhow::bail!(
                "the loss became {value} at step {}; stopping. The last good checkpoint is {}",
                state.global_step + 1,
                self.last_checkpoint_step
                    .map(|s| config
                        .output_dir
                        .join(format!("checkpoint-{s}"))
                        .display()
                        .to_string())
                    .unwrap_or_else(|| "none (no checkpoint was saved yet)".into())
            );
        }
        if outcome.grad_norm.is_none() {
            self.progress.println(format!(
                "step {}: inf/NaN gradients in f16, step skipped; loss scale now {}",
                state.global_step + 1,
                state.loss_scaler.map_or(1.0, |s| s.scale)
            ));
        }
        state.micro_steps += window.len() as u64;
        state.input_tokens += window
            .iter()
            .flat_map(rows)
            .map(|e| e.input_ids.len() as i64)
            .sum::<i64>();
        state.global_step += 1;
        state.trained_tokens += window_tokens;
        self.interval.0 += outcome.loss_sum;
        self.interval.1 += window_tokens;
        self.report_step(
            outcome.loss_sum / window_tokens.max(1) as f64,
            lr,
            outcome.grad_norm,
        )
    }

    /// The progress line, and a log line every `logging_steps`.
    fn report_step(&mut self, step_loss: f64, lr: f64, grad_norm: Option<f64>) -> Result<()> {
        let state = &mut self.state;
        let epoch = state.epoch as f64
            + state.windows_done_in_epoch as f64 / self.schedule.windows_per_epoch as f64;
        let elapsed = self.started.elapsed().as_secs_f64();
        let tokens_per_second =
            (state.input_tokens - self.tokens_at_start) as f64 / elapsed.max(1e-9);
        self.progress.set_position(state.global_step as u64);
        self.progress.set_message(format!(
            "epoch {epoch:.2} loss {step_loss:.4} lr {lr:.2e} {tokens_per_second:.0} tok/s, {}",
            crate::memory::MemoryReport::now(self.device).short()
        ));
        if (state.global_step as usize).is_multiple_of(self.config.logging_steps.max(1))
            || state.global_step == self.schedule.total_steps
            || (self.config.logging_first_step && state.global_step == 1)
        {
            let (loss, tokens) = std::mem::take(&mut self.interval);
            state.log_history.push(LogEntry {
                step: state.global_step,
                epoch,
                loss: Some(loss / tokens.max(1) as f64),
                learning_rate: Some(lr),
                grad_norm,
                tokens_per_second: Some(tokens_per_second),
                eval_loss: None,
                elapsed_seconds: Some(elapsed),
                input_tokens: Some(state.input_tokens),
                loss_scale: state.loss_scaler.map(|s| s.scale),
                step_skipped: state.loss_scaler.map(|_| grad_norm.is_none()),
                cuda_graphs_recorded: self
                    .graphs
                    .as_ref()
                    .map(|graphs| graphs.summary().recorded_widths.len()),
            });
            self.publish_log()?;
        }
        Ok(())
    }

    /// Evaluation, early stopping and checkpointing after a step.
    fn after_step(&mut self, windows_in_epoch: usize) -> Result<Next> {
        let config = self.config;
        let step = self.state.global_step;
        let epoch_end = self.state.windows_done_in_epoch == windows_in_epoch;
        let last_step = step == self.schedule.total_steps;
        let place = cadence::StepPlace {
            step,
            epoch_end,
            last_step,
        };
        let evaluate_now = cadence::evaluation_due(config, place);
        let mut stop_early = false;
        let mut new_best = false;
        if evaluate_now {
            let eval_loss = self.eval_loss()?;
            let epoch = self.state.epoch as f64
                + self.state.windows_done_in_epoch as f64 / windows_in_epoch as f64;
            self.state
                .log_history
                .push(logging::eval_entry(step, epoch, eval_loss));
            self.publish_log()?;
            self.progress
                .println(format!("step {step}: eval_loss {eval_loss:.6}"));
            // As HF Trainer: ReduceLROnPlateau steps with eval_loss after each evaluation.
            if let Some(plateau) = self.state.plateau.as_mut() {
                let before = plateau.lr;
                plateau.step(eval_loss, &config.lr_scheduler_kwargs);
                if plateau.lr < before {
                    self.progress.println(format!(
                        "step {step}: no eval_loss improvement, learning rate {before:e} -> {:e}",
                        plateau.lr
                    ));
                }
            }
            // GreedyLR too (HF Trainer steps both kinds with the eval metric).
            if let Some(greedy) = self.state.greedy.as_mut() {
                let before = greedy.lr;
                greedy.step(eval_loss, &config.lr_scheduler_kwargs);
                if greedy.lr != before {
                    self.progress.println(format!(
                        "step {step}: greedy learning rate {before:e} -> {:e}",
                        greedy.lr
                    ));
                }
            }
            stop_early = evaluation::record_evaluation(
                &mut self.state,
                eval_loss,
                config.early_stopping_patience,
            );
            new_best = self.state.best_step == Some(step);
            if stop_early {
                self.progress.println(format!(
                    "early stopping: no improvement in {} evaluation(s)",
                    self.state.evals_without_improvement
                ));
            }
        }
        let save_now = cadence::save_due(
            config,
            place,
            cadence::EvaluationOutcome {
                evaluated: evaluate_now,
                new_best,
                stopping_early: stop_early,
            },
        );
        if epoch_end {
            // The checkpoint records where the next step starts.
            self.state.epoch += 1;
            self.state.windows_done_in_epoch = 0;
        }
        if save_now {
            self.save()?;
        }
        Ok(if stop_early {
            Next::Stop
        } else if epoch_end {
            Next::EndOfEpoch
        } else {
            Next::Continue
        })
    }

    /// What a rank other than 0 reports (it writes nothing).
    fn worker_summary(&self, skipped_rows: SkippedRows) -> TrainSummary {
        let seconds = self.started.elapsed().as_secs_f64();
        let memory = crate::memory::MemoryReport::now(self.device);
        TrainSummary {
            output_dir: self.config.output_dir.clone(),
            steps: self.state.global_step,
            best_eval_loss: self.state.best_metric,
            best_step: self.state.best_step,
            final_eval_loss: None,
            seconds,
            tokens_per_second: (self.state.input_tokens - self.tokens_at_start) as f64
                / seconds.max(1e-9),
            peak_rss_bytes: memory.peak_rss_bytes,
            gpu_memory: memory.gpu,
            previews: Vec::new(),
            slowest_checkpoint_seconds: 0.0,
            slowest_checkpoint_write_seconds: None,
            checkpoint_bytes_estimated: (
                self.checkpoint_plan.model_bytes,
                self.checkpoint_plan.optimizer_bytes,
            ),
            skipped_rows,
            data_parallel: self.data_parallel_summary(),
            cuda_graphs: self.graphs.as_ref().map(GraphedSteps::summary),
        }
    }

    fn data_parallel_summary(&self) -> Option<DataParallelSummary> {
        self.group.as_ref().map(|group| DataParallelSummary {
            world_size: group.world(),
            backend: format!("{:?}", group.backend()).to_lowercase(),
        })
    }

    /// A checkpoint: rank 0 (or the only process) writes it. Under ZeRO-1 every rank
    /// first writes its shard of the optimizer state beside it, and rank 0 moves the
    /// shards into the checkpoint before publishing it.
    fn save(&mut self) -> Result<()> {
        let saving = Instant::now();
        let step = self.state.global_step;
        // As HF, the best checkpoint is named once it exists: a best evaluation that
        // is not saved (--save-strategy no) leaves the final model to be published.
        if self.state.best_step == Some(step) {
            self.state.best_model_checkpoint = Some(format!("checkpoint-{step}"));
        }
        // One checkpoint in flight at a time; its error (a full disk) ends the run here.
        self.wait_for_checkpoint_writer()?;
        if self.is_main() {
            disk_fit::check_room_for_checkpoint(
                &self.checkpoint_plan,
                &self.config.output_dir,
                step,
                self.last_checkpoint_step,
            )?;
        }
        let shards = match (&self.group, &self.optimizer.owners) {
            (Some(group), Some(_)) if self.config.checkpoints_hold_optimizer() => {
                let dir = self
                    .config
                    .output_dir
                    .join(format!(".optimizer-shards-{step}"));
                checkpoints::write_optimizer_shard(
                    &dir,
                    &self.optimizer,
                    group.rank(),
                    group.world(),
                )?;
                group.barrier()?;
                Some(dir)
            }
            _ => None,
        };
        if self.is_main() {
            let source = checkpoints::CheckpointSource {
                model: &self.model,
                mode: &self.mode,
                tokenizer: self.tokenizer,
                base: &self.base_name,
                optimizer: &self.optimizer,
                state: &self.state,
                config: self.config,
                optimizer_shards: shards.as_deref(),
            };
            // The host copies need room for one checkpoint; without it, write at once.
            let room = device_fit::host_available_bytes()
                .is_none_or(|available| available > self.checkpoint_plan.bytes_each() * 11 / 10);
            if self.config.async_checkpoint && !room {
                eprintln!(
                    "note: --async-checkpoint needs ~{:.1} GB of host memory for its copies; \
                     too little is available, so checkpoint-{step} is written at once",
                    self.checkpoint_plan.bytes_each() as f64 / 1e9
                );
            }
            if self.config.async_checkpoint && room {
                let out = &self.config.output_dir;
                self.checkpoint_writer =
                    Some(checkpoints::start_checkpoint_in_background(out, &source)?);
            } else {
                save_checkpoint(&self.config.output_dir, &source)?;
            }
        }
        self.last_checkpoint_step = Some(self.state.global_step);
        let seconds = saving.elapsed().as_secs_f64();
        tracing::info!(
            "checkpoint-{} {} in {seconds:.2}s",
            self.state.global_step,
            if self.checkpoint_writer.is_some() {
                "copied for the background writer"
            } else {
                "written"
            }
        );
        self.slowest_checkpoint_seconds = self.slowest_checkpoint_seconds.max(seconds);
        Ok(())
    }

    /// Waits for the checkpoint being written in the background (`--async-checkpoint`),
    /// if any.
    fn wait_for_checkpoint_writer(&mut self) -> Result<()> {
        if let Some(writer) = self.checkpoint_writer.take() {
            let seconds = writer.wait()?;
            let slowest = self.slowest_checkpoint_write_seconds.get_or_insert(0.0);
            *slowest = slowest.max(seconds);
        }
        Ok(())
    }

    /// The last checkpoint, the published models, the plots, previews and summary.
    fn finish(
        mut self,
        prompts: &PromptBuilder,
        encoder: &Encoder,
        preview_set: &Dataset,
        skipped_rows: SkippedRows,
    ) -> Result<TrainSummary> {
        self.progress.finish_and_clear();
        if self.last_checkpoint_step != Some(self.state.global_step) {
            self.save()?;
        }
        self.wait_for_checkpoint_writer()?;
        if !self.is_main() {
            return Ok(self.worker_summary(skipped_rows));
        }
        let out = &self.config.output_dir;
        let state = &self.state;
        let seconds = self.started.elapsed().as_secs_f64();
        let final_eval = state
            .log_history
            .iter()
            .rev()
            .find_map(|e| e.eval_loss.filter(|_| e.step == state.global_step));
        let best_dir = publish_models(out, state, self.config.load_best_model_at_end)?;
        if let Err(error) = plot::write_loss_plots(out, &state.log_history) {
            tracing::warn!("could not draw the loss curves: {error:#}");
        }

        // Previews with the model OUT holds (the best one by default), as the seed prints them.
        restore_trained(&self.model, &self.mode, &best_dir)?;
        let previews = evaluation::previews(
            &self.model,
            self.tokenizer,
            prompts,
            encoder,
            &preview_set.examples,
            self.config.previews,
        )?;
        let memory = crate::memory::MemoryReport::now(self.device);
        let summary = TrainSummary {
            output_dir: out.clone(),
            steps: state.global_step,
            best_eval_loss: state.best_metric,
            best_step: state.best_step,
            final_eval_loss: final_eval,
            seconds,
            tokens_per_second: (state.input_tokens - self.tokens_at_start) as f64
                / seconds.max(1e-9),
            peak_rss_bytes: memory.peak_rss_bytes,
            gpu_memory: memory.gpu,
            previews,
            slowest_checkpoint_seconds: self.slowest_checkpoint_seconds,
            slowest_checkpoint_write_seconds: self.slowest_checkpoint_write_seconds,
            checkpoint_bytes_estimated: (
                self.checkpoint_plan.model_bytes,
                self.checkpoint_plan.optimizer_bytes,
            ),
            skipped_rows,
            data_parallel: self.data_parallel_summary(),
            cuda_graphs: self.graphs.as_ref().map(GraphedSteps::summary),
        };
        write_file(
            &out.join("train_summary.json"),
            serde_json::to_string_pretty(&summary)?.as_bytes(),
        )?;
        Ok(summary)
    }
}
