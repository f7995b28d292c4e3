//! What a checkpoint records besides weights and optimizer moments: where in the data
//! the run is, the best metric so far, and the log history (HF's trainer_state.json
//! shape, with amthal's resume position added).

use serde::{Deserialize, Serialize};

/// One line of OUT/log.jsonl.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogEntry {
    pub step: i64,
    pub epoch: f64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub loss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub learning_rate: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub grad_norm: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub tokens_per_second: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub eval_loss: Option<f64>,
    /// Seconds since this process started training, and input tokens trained so far
    /// (lets benchmarks measure a rate after warm-up steps).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub elapsed_seconds: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub input_tokens: Option<i64>,
    /// f16 only: the loss scale after this step, and whether an inf/NaN gradient made
    /// the step skip the optimizer (see `loss_scale`).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub loss_scale: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub step_skipped: Option<bool>,
    /// `--cuda-graphs`: graphs this process has recorded so far (a benchmark measures
    /// its rate over the steps after the last one).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub cuda_graphs_recorded: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct TrainerState {
    /// Optimizer steps done.
    pub global_step: i64,
    /// The epoch the next step belongs to, and how many accumulation windows of it are done.
    pub epoch: usize,
    pub windows_done_in_epoch: usize,
    /// Micro-batches done over the whole run (seeds dropout for the next one).
    pub micro_steps: u64,
    pub max_steps: i64,
    pub best_metric: Option<f64>,
    pub best_model_checkpoint: Option<String>,
    pub best_step: Option<i64>,
    /// Evaluations since the best one (early stopping).
    pub evals_without_improvement: usize,
    /// Trained tokens so far (answer tokens counted by the loss, and all input tokens).
    pub trained_tokens: i64,
    pub input_tokens: i64,
    pub log_history: Vec<LogEntry>,
    /// The f16 loss scaler, carried across a resume (None in bf16/f32).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scaler: Option<super::loss_scale::LossScaler>,
    /// reduce_lr_on_plateau's scheduler (its rate and counters), carried across a
    /// resume (None with the other schedules, which are functions of the step).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plateau: Option<super::plateau::Plateau>,
    /// greedy's scheduler (GreedyLR: its rate and counters), carried across a resume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub greedy: Option<super::greedy_lr::GreedyLr>,
}
