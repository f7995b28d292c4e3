//! The training configuration: defaults as the seed's train.py and HF Trainer have
//! them, a TOML file (`--config`, same keys as the flags with underscores; HF's
//! TrainingArguments / LoraConfig names where amthal's differ, such as learning_rate
//! or gradient_accumulation_steps, are accepted too), then command-line flags on top. The effective configuration is printed and saved.

use std::path::{Path, PathBuf};

use anyhow::Result;
use serde::{Deserialize, Serialize};

use super::lr_schedule::Schedule;
use super::moments::OptimKind;
use crate::bail_input;
use crate::data::{ReadOptions, TextEncoding};
use crate::device::Precision;
use crate::error::bad_input;
use crate::model::quantized::{QuantKind, Quantization};
use crate::prompt::PromptFormat;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum EvalStrategy {
    Epoch,
    Steps,
    No,
}

/// When checkpoints are written (HF's save_strategy). Whatever the strategy, the last
/// step is saved (the published final model comes from it), and so is a stop by early
/// stopping. Decided in `cadence.rs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SaveStrategy {
    /// At every evaluation (each epoch's end when there is none): amthal's default.
    Auto,
    /// Every --save-steps steps, and at every evaluation that improves the best eval
    /// loss (the best model is published at the end, so it must be on disk).
    Steps,
    /// At each epoch's end, and at every evaluation that improves the best eval loss.
    Epoch,
    /// Only at evaluations that improve the best eval loss (needs an --eval-strategy).
    Best,
    /// No checkpoints while training; the last step writes the model alone (no
    /// optimizer state), as HF's trainer.save_model after a run with save_strategy no.
    No,
}

/// Where the logs also go (HF's report_to); OUT/log.jsonl and the loss plots are
/// always written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ReportTo {
    None,
    /// A TensorBoard event file under OUT/runs/ (`tensorboard.rs`).
    Tensorboard,
    /// Every integration built: TensorBoard (HF's "all": every one installed).
    All,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DataOrder {
    Grouped,
    Shuffled,
    File,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    pub model: Option<String>,
    pub data_dir: PathBuf,
    pub output_dir: PathBuf,
    pub lora: bool,
    /// Continue training this PEFT adapter instead of a new one (PEFT's
    /// `from_pretrained(..., is_trainable=True)`, axolotl's lora_model_dir): its r,
    /// alpha, targets, dropout and DoRA decide, not the --lora-* settings.
    #[serde(alias = "lora_model_dir")]
    pub adapter_dir: Option<PathBuf>,
    pub lora_r: i64,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    #[serde(alias = "target_modules")]
    pub lora_targets: Vec<String>,
    #[serde(alias = "use_rslora")]
    pub rslora: bool,
    /// DoRA (PEFT's use_dora): a trainable magnitude per output row beside A and B.
    pub use_dora: bool,
    /// How the adapter starts (PEFT's init_lora_weights: true, gaussian, pissa, pissa_niter_K, olora).
    pub init_lora_weights: crate::model::lora_init::LoraInit,
    #[serde(alias = "learning_rate")]
    pub lr: f64,
    #[serde(alias = "num_train_epochs")]
    pub epochs: f64,
    #[serde(alias = "bsz")]
    #[serde(alias = "per_device_train_batch_size")]
    pub batch_size: usize,
    #[serde(alias = "gradient_accumulation_steps")]
    pub grad_accum: usize,
    #[serde(alias = "max_length")]
    #[serde(alias = "max_seq_length")]
    pub cutoff_len: usize,
    pub precision: Precision,
    pub device: String,
    pub gradient_checkpointing: bool,
    pub seed: u64,
    pub warmup_ratio: f64,
    /// transformers 5's warmup_steps: >= 1 a number of steps, below 1 a share of the
    /// run (its replacement for warmup_ratio); None: `warmup_ratio` decides.
    pub warmup_steps: Option<f64>,
    #[serde(alias = "lr_scheduler_type")]
    pub lr_scheduler: Schedule,
    pub weight_decay: f64,
    /// AdamW's betas and epsilon (HF's adam_beta1, adam_beta2, adam_epsilon).
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_epsilon: f64,
    pub max_grad_norm: f64,
    /// HF's label_smoothing_factor: 0 (plain cross-entropy) to below 1; the training
    /// and evaluation losses are smoothed (`batch::Answers::label_smoothing`).
    pub label_smoothing_factor: f64,
    /// Train on the prompt's tokens too, not only the answer's (axolotl's
    /// train_on_inputs; TRL's completion_only_loss = false). Off: answer-only labels.
    pub train_on_inputs: bool,
    /// Seeds the data order instead of `seed` (HF's data_seed); None: `seed`.
    pub data_seed: Option<u64>,
    /// Evaluate before the first step, logged only (HF's eval_on_start).
    pub eval_on_start: bool,
    /// Log the first step too when `logging_steps` > 1 (HF's logging_first_step).
    pub logging_first_step: bool,
    pub eval_strategy: EvalStrategy,
    pub eval_steps: usize,
    /// Rows per evaluation batch (HF's per_device_eval_batch_size); None: twice
    /// `batch_size` (no gradients are kept, so twice the rows fit).
    #[serde(alias = "per_device_eval_batch_size")]
    pub eval_batch_size: Option<usize>,
    /// OUT holds the best checkpoint's model at the end (true, amthal's default) or the
    /// last one's (false: HF's default load_best_model_at_end = False). OUT/final/ is
    /// the last one's either way.
    pub load_best_model_at_end: bool,
    /// What "best" means (HF's metric_for_best_model): only the validation loss,
    /// `eval_loss` (or `loss`, which HF reads as the same), lower is better.
    pub metric_for_best_model: String,
    pub logging_steps: usize,
    pub report_to: ReportTo,
    pub save_strategy: SaveStrategy,
    /// With `save_strategy = steps`: every this many optimizer steps (HF's default 500).
    pub save_steps: usize,
    pub save_total_limit: Option<usize>,
    pub max_steps: Option<usize>,
    pub early_stopping_patience: Option<usize>,
    pub prompt_format: PromptFormat,
    /// grouped (shuffled, then grouped by length like HF's group_by_length), shuffled, or file order.
    pub data_order: DataOrder,
    pub previews: usize,
    /// Text encoding of the data files (auto: a byte-order mark decides, else UTF-8).
    pub encoding: TextEncoding,
    /// Train on the valid rows and report the invalid ones instead of refusing the file.
    pub skip_invalid_rows: bool,
    /// f16 only: the initial dynamic loss scale (torch.amp.GradScaler's init_scale).
    pub loss_scale_init: f64,
    /// The optimizer: AdamW's state layouts adamw (f32), adamw-bf16, adamw-8bit, or
    /// adafactor.
    pub optim: OptimKind,
    /// Checkpoints hold the model and the trainer state but no optimizer state
    /// (HF's save_only_model): smaller and faster, resumable only with fresh moments.
    pub save_only_model: bool,
    /// Checkpoints written on another thread from host copies (`checkpoints.rs`).
    pub async_checkpoint: bool,
    /// Update each tensor inside the backward pass and free its gradient (see
    /// `step.rs`); runs the backward pass layer by layer, so it implies
    /// gradient checkpointing.
    pub optim_in_backward: bool,
    /// Keep AdamW's state in host memory and copy it to the GPU tensor by tensor for
    /// each update (`offload.rs`; DeepSpeed's offload_optimizer). Same results.
    pub offload_optimizer: bool,
    /// Padding-free micro-batches (see `batch.rs`); the default, as they give the
    /// padded batches' losses and gradients (on the CPU their dropout masks too) with
    /// no position spent on padding (`--no-packing` pads).
    pub packing: bool,
    /// Record each micro-batch's forward and backward pass as a CUDA graph per length
    /// bucket and replay it (`graphed_step.rs`); implies packing.
    pub cuda_graphs: bool,
    /// `--quantize`: the frozen base projections in 4- or 8-bit storage (LoRA only).
    pub quantize: Option<QuantKind>,
    /// `--double-quant`: 4-bit block absmaxes in 8 bits.
    pub double_quant: bool,
    /// `--zero 1`: data-parallel ranks shard AdamW's state (ZeRO stage 1); 0: each
    /// rank keeps all of it.
    pub zero: u8,
    /// Data-parallel ranks the run trains on (set from WORLD_SIZE, not a flag; 1 alone).
    /// `grad_accum` counts per rank: a step's window is grad_accum x world_size
    /// micro-batches, and that product is what a resume must keep.
    pub world_size: usize,
    /// `--dist-backend`: auto (NCCL on CUDA, Gloo on the CPU), gloo or nccl.
    pub dist_backend: crate::distributed::DistBackend,
    /// NEFTune: uniform noise on the input embeddings while training (HF Trainer's
    /// neftune_noise_alpha; `step::Draws` says how it is drawn). None: off.
    pub neftune_noise_alpha: Option<f64>,
    /// The schedule's own settings (HF's lr_scheduler_kwargs: num_cycles, min_lr,
    /// min_lr_rate, lr_end, power, timescale). Last: TOML writes tables after values.
    pub lr_scheduler_kwargs: super::lr_schedule::SchedulerKwargs,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            model: None,
            data_dir: PathBuf::from("data"),
            output_dir: PathBuf::from("outputs"),
            lora: false,
            lora_r: 16,
            lora_alpha: 32.0,
            lora_dropout: 0.05,
            lora_targets: crate::model::llama::PROJECTIONS
                .iter()
                .map(|s| s.to_string())
                .collect(),
            rslora: false,
            use_dora: false,
            init_lora_weights: Default::default(),
            lr: 2e-5,
            epochs: 3.0,
            batch_size: 2,
            grad_accum: 8,
            cutoff_len: 1024,
            precision: Precision::Auto,
            device: "auto".into(),
            gradient_checkpointing: false,
            seed: 42,
            warmup_ratio: 0.0,
            warmup_steps: None,
            lr_scheduler: Schedule::Linear,
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            max_grad_norm: 1.0,
            label_smoothing_factor: 0.0,
            train_on_inputs: false,
            adapter_dir: None,
            data_seed: None,
            eval_on_start: false,
            logging_first_step: false,
            eval_strategy: EvalStrategy::Epoch,
            eval_steps: 50,
            eval_batch_size: None,
            load_best_model_at_end: true,
            metric_for_best_model: "eval_loss".into(),
            logging_steps: 1,
            report_to: ReportTo::None,
            save_strategy: SaveStrategy::Auto,
            save_steps: 500,
            save_total_limit: None,
            max_steps: None,
            early_stopping_patience: None,
            prompt_format: PromptFormat::Auto,
            data_order: DataOrder::Grouped,
            previews: 3,
            encoding: TextEncoding::Auto,
            skip_invalid_rows: false,
            loss_scale_init: super::loss_scale::INIT_SCALE,
            optim: OptimKind::AdamW,
            save_only_model: false,
            async_checkpoint: false,
            optim_in_backward: false,
            offload_optimizer: false,
            packing: true,
            cuda_graphs: false,
            quantize: None,
            double_quant: false,
            zero: 0,
            world_size: 1,
            dist_backend: crate::distributed::DistBackend::Auto,
            neftune_noise_alpha: None,
            lr_scheduler_kwargs: Default::default(),
        }
    }
}

impl TrainConfig {
    /// `--adapter-dir`: the adapter's own LoRA settings replace the --lora-* ones (as
    /// PEFT's is_trainable=True keeps the adapter's config), so the checks, the memory
    /// estimate and the saved training_config.toml all see the adapter that trains;
    /// --lora-* flags that differ are named. Refused: what amthal would save otherwise
    /// than it read (per-module patterns, a target regex, chosen layers) and MiCA
    /// adapters (PEFT trains their A only).
    pub fn adopt_adapter_settings(&mut self, dir: &Path) -> Result<()> {
        let (adapter, _, patterns) = crate::model::lora::read_adapter_config(dir)?;
        let path = dir.join(crate::model::lora::ADAPTER_CONFIG);
        let raw: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)
            .map_err(|e| bad_input(format!("{}: invalid JSON: {e}", path.display())))?;
        let regex_targets = raw["target_modules"]
            .as_str()
            .is_some_and(|t| t != "all-linear");
        let chosen_layers = raw["layers_to_transform"]
            .as_array()
            .is_some_and(|layers| !layers.is_empty())
            || raw["layers_to_transform"].is_number();
        let saved_modules = !crate::model::lora::saved_modules(dir)?.is_empty()
            || raw["modules_to_save"]
                .as_array()
                .is_some_and(|modules| !modules.is_empty());
        let mica = raw["init_lora_weights"]
            .as_str()
            .is_some_and(|init| init.eq_ignore_ascii_case("mica"));
        let refusal = if !patterns.is_empty() {
            Some("rank_pattern / alpha_pattern (amthal saves one r and alpha for every module)")
        } else if regex_targets {
            Some("a target_modules regular expression (amthal saves a list of projections)")
        } else if chosen_layers {
            Some("layers_to_transform (amthal saves adapters for every layer)")
        } else if saved_modules {
            Some("modules_to_save (training full copies of embed_tokens / lm_head is not built)")
        } else if mica {
            Some("MiCA's init_lora_weights (PEFT trains its A only)")
        } else {
            None
        };
        if let Some(what) = refusal {
            bail_input!(
                "{}: continuing an adapter with {what} is not built",
                path.display()
            );
        }
        let defaults = TrainConfig::default();
        let sorted = |targets: &[String]| {
            let mut targets = targets.to_vec();
            targets.sort();
            targets
        };
        let differing = [
            (
                "--lora-r",
                self.lora_r != defaults.lora_r && self.lora_r != adapter.r,
            ),
            (
                "--lora-alpha",
                self.lora_alpha != defaults.lora_alpha && self.lora_alpha != adapter.alpha,
            ),
            (
                "--lora-dropout",
                self.lora_dropout != defaults.lora_dropout && self.lora_dropout != adapter.dropout,
            ),
            (
                "--lora-targets",
                self.lora_targets != defaults.lora_targets
                    && sorted(&self.lora_targets) != sorted(&adapter.targets),
            ),
            ("--rslora", self.rslora && !adapter.rslora),
            ("--use-dora", self.use_dora && !adapter.use_dora),
        ];
        for (flag, differs) in differing {
            if differs {
                eprintln!(
                    "note: {flag} is not used: the adapter in {} keeps its own settings",
                    dir.display()
                );
            }
        }
        self.lora_r = adapter.r;
        self.lora_alpha = adapter.alpha;
        self.lora_dropout = adapter.dropout;
        self.lora_targets = adapter.targets;
        self.rslora = adapter.rslora;
        self.use_dora = adapter.use_dora;
        Ok(())
    }

    /// Reads a TOML file of the same keys (unknown keys are an error naming them).
    pub fn from_toml(path: &Path) -> Result<TrainConfig> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| bad_input(format!("{}: cannot read: {e}", path.display())))?;
        toml::from_str(&text).map_err(|e| bad_input(format!("{}: {e}", path.display())))
    }

    pub fn validate(&self) -> Result<()> {
        if self.batch_size == 0 || self.grad_accum == 0 {
            bail_input!("--batch-size and --grad-accum must be at least 1");
        }
        if self.lr <= 0.0 || !self.lr.is_finite() {
            bail_input!("--lr must be positive");
        }
        if !(0.0..1.0).contains(&self.warmup_ratio) {
            bail_input!("--warmup-ratio must be in [0, 1)");
        }
        if let Some(steps) = self.warmup_steps {
            if !(steps.is_finite() && steps >= 0.0) {
                bail_input!(
                    "--warmup-steps must be a number of steps (>= 1) or a share of the run (below 1), not {steps}"
                );
            }
            if steps > 0.0 && self.warmup_ratio > 0.0 {
                bail_input!(
                    "--warmup-steps {steps} and --warmup-ratio {}: both set the warmup (transformers 5 \
                     replaced warmup_ratio by a warmup_steps below 1); give one",
                    self.warmup_ratio
                );
            }
        }
        if self.eval_strategy == EvalStrategy::Steps && self.eval_steps == 0 {
            bail_input!("--eval-strategy steps needs --eval-steps > 0");
        }
        self.lr_scheduler_kwargs
            .check(self.lr_scheduler, self.lr)
            .map_err(bad_input)?;
        for (name, beta) in [
            ("--adam-beta1", self.adam_beta1),
            ("--adam-beta2", self.adam_beta2),
        ] {
            if !(0.0..1.0).contains(&beta) {
                bail_input!("{name} must be in [0, 1), not {beta}");
            }
        }
        if !(0.0..1.0).contains(&self.label_smoothing_factor) {
            bail_input!(
                "--label-smoothing-factor must be in [0, 1) (0 is plain cross-entropy; HF's \
                 examples use 0.1), not {}",
                self.label_smoothing_factor
            );
        }
        if !(self.adam_epsilon.is_finite() && self.adam_epsilon > 0.0) {
            bail_input!(
                "--adam-epsilon must be a positive number, not {}",
                self.adam_epsilon
            );
        }
        if self.eval_batch_size == Some(0) {
            bail_input!("--eval-batch-size must be at least 1");
        }
        if !matches!(self.metric_for_best_model.as_str(), "eval_loss" | "loss") {
            bail_input!(
                "--metric-for-best-model {}: amthal evaluates the validation loss only \
                 (eval_loss, lower is better); the other metrics come from `amthal score` \
                 after generation",
                self.metric_for_best_model
            );
        }
        if self.save_strategy == SaveStrategy::Steps && self.save_steps == 0 {
            bail_input!("--save-strategy steps needs --save-steps > 0");
        }
        if self.lr_scheduler.follows_evaluations() && self.eval_strategy == EvalStrategy::No {
            bail_input!(
                "--lr-scheduler {} sets the rate from the eval loss, and --eval-strategy no \
                 evaluates never: give --eval-strategy epoch or steps",
                clap::ValueEnum::to_possible_value(&self.lr_scheduler)
                    .map(|v| v.get_name().to_string())
                    .unwrap_or_default()
            );
        }
        if self.eval_on_start && self.eval_strategy == EvalStrategy::No {
            bail_input!(
                "--eval-on-start evaluates on the validation split, which --eval-strategy no \
                 does not read: give --eval-strategy epoch or steps"
            );
        }
        if self.save_strategy == SaveStrategy::Best && self.eval_strategy == EvalStrategy::No {
            bail_input!(
                "--save-strategy best saves when an evaluation improves the best eval loss, \
                 and --eval-strategy no evaluates never: give --eval-strategy epoch or steps"
            );
        }
        if !(self.loss_scale_init.is_finite() && self.loss_scale_init > 0.0) {
            bail_input!("--loss-scale-init must be a positive number");
        }
        if self.epochs <= 0.0 && self.max_steps.is_none() {
            bail_input!("--epochs must be positive (or give --max-steps)");
        }
        if let Some(alpha) = self.neftune_noise_alpha
            && !(alpha.is_finite() && alpha > 0.0)
        {
            bail_input!(
                "--neftune-noise-alpha must be a positive number (HF's examples use 5), not {alpha}"
            );
        }
        if self.cuda_graphs {
            self.validate_cuda_graphs()?;
        }
        if self.optim == OptimKind::Adafactor && self.offload_optimizer {
            bail_input!(
                "--offload-optimizer moves AdamW's moments to host memory; adafactor's state \
                 is a row and a column per matrix (megabytes for a 7B) and stays beside the \
                 weights: leave out --offload-optimizer"
            );
        }
        if self.adapter_dir.is_some() {
            if !self.lora {
                bail_input!("--adapter-dir continues training a LoRA adapter: add --lora");
            }
            if self.init_lora_weights != crate::model::lora_init::LoraInit::Default {
                bail_input!(
                    "--adapter-dir continues an adapter that is already trained; \
                     --init-lora-weights {} starts a new one: leave out one of them",
                    self.init_lora_weights
                );
            }
        }
        let init = self.init_lora_weights;
        if self.init_lora_weights != crate::model::lora_init::LoraInit::Default && !self.lora {
            bail_input!("--init-lora-weights {init} starts a LoRA adapter: add --lora");
        }
        if self.init_lora_weights.changes_the_base() {
            if self.use_dora {
                bail_input!(
                    "--init-lora-weights {init} with --use-dora is not built (the magnitudes \
                     would start from the residual weights); leave out one of them"
                );
            }
            if self.quantize.is_some() {
                bail_input!(
                    "--init-lora-weights {init} changes the base weights, which a quantized base \
                     cannot hold: leave out --quantize"
                );
            }
        }
        if self.use_dora && !self.lora {
            bail_input!("--use-dora trains a DoRA adapter: add --lora");
        }
        if let Some(quantization) = self.quantization()?
            && !self.lora
        {
            bail_input!(
                "--quantize {} keeps the base weights frozen in {}: it trains a LoRA adapter \
                 (add --lora), not a full fine-tune",
                quantization.kind,
                quantization.kind
            );
        }
        Ok(())
    }

    /// What `--cuda-graphs` cannot record (see `graphed_step.rs`).
    fn validate_cuda_graphs(&self) -> Result<()> {
        if self.lora && self.lora_dropout > 0.0 && self.gradient_checkpointing {
            bail_input!(
                "--cuda-graphs with --gradient-checkpointing records the recomputed layers too, \
                 and inside a recording they cannot be reseeded to draw the forward pass's \
                 dropout masks again: add --lora-dropout 0, or leave out \
                 --gradient-checkpointing"
            );
        }
        if self.optim_in_backward {
            bail_input!(
                "--cuda-graphs records the forward and backward pass of a micro-batch, while \
                 --optim-in-backward updates tensors in the middle of the backward pass: choose one"
            );
        }
        if self.optim == OptimKind::Adafactor {
            bail_input!(
                "--cuda-graphs records AdamW's update, whose per-step numbers it reads from \
                 device scalars; adafactor's update takes its numbers from the host and has \
                 no recorded form: leave out one of them"
            );
        }
        if self.neftune_noise_alpha.is_some() {
            bail_input!(
                "--neftune-noise-alpha with --cuda-graphs: a recorded pass cannot reseed the \
                 generator per micro-batch, which keeps the noise reproducible on resume; leave \
                 out one of them"
            );
        }
        Ok(())
    }

    /// Rows per evaluation batch.
    pub fn eval_rows(&self) -> usize {
        self.eval_batch_size.unwrap_or(self.batch_size * 2)
    }

    /// Micro-batches per optimizer step over all ranks.
    pub fn global_accumulation(&self) -> usize {
        self.grad_accum * self.world_size.max(1)
    }

    /// What a data-parallel worker cannot do yet (checked before joining the group).
    pub fn validate_distributed(&self) -> Result<()> {
        if self.zero > 1 {
            bail_input!(
                "--zero {}: only stage 1 (optimizer state sharded) is built; 2 would also shard \
                 the gradients and 3 the weights",
                self.zero
            );
        }
        if self.optim_in_backward && self.zero > 0 {
            bail_input!(
                "--optim-in-backward with --zero {}: the sharded update (each rank updates the \
                 tensors it owns, then broadcasts them) runs after the backward pass; choose one",
                self.zero
            );
        }
        Ok(())
    }

    /// Whether checkpoints carry the optimizer state: not with --save-only-model, nor
    /// with --save-strategy no (whose one checkpoint is the final model).
    pub fn checkpoints_hold_optimizer(&self) -> bool {
        !self.save_only_model && self.save_strategy != SaveStrategy::No
    }

    /// The base model's storage (`--quantize`, `--double-quant`).
    pub fn quantization(&self) -> Result<Option<Quantization>> {
        Quantization::from_settings(self.quantize, self.double_quant)
    }

    /// How the data files are read.
    pub fn read_options(&self) -> ReadOptions {
        ReadOptions {
            encoding: self.encoding,
            skip_invalid_rows: self.skip_invalid_rows,
        }
    }

    /// As TOML, for OUT/training_config.toml and the start-up printout.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("the config serializes")
    }
}
