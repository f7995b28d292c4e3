//! What a run reports while it trains: the progress bar and OUT/log.jsonl (one JSON
//! object per logged step or evaluation, as HF Trainer's log_history).

use std::path::Path;

use anyhow::Result;

use super::state::LogEntry;
use crate::atomic::write_file;

/// The progress bar over optimizer steps, starting at `done`.
pub fn progress_bar(total_steps: i64, done: i64) -> indicatif::ProgressBar {
    let progress = indicatif::ProgressBar::new(total_steps as u64).with_position(done as u64);
    progress.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} step {pos}/{len} {msg} ETA {eta}")
            .expect("valid template"),
    );
    progress
}

/// A log line for an evaluation.
pub fn eval_entry(step: i64, epoch: f64, eval_loss: f64) -> LogEntry {
    LogEntry {
        step,
        epoch,
        loss: None,
        learning_rate: None,
        grad_norm: None,
        tokens_per_second: None,
        eval_loss: Some(eval_loss),
        elapsed_seconds: None,
        input_tokens: None,
        loss_scale: None,
        step_skipped: None,
        cuda_graphs_recorded: None,
    }
}

/// Rewrites OUT/log.jsonl (atomically) with the whole history.
pub fn write_log(out: &Path, log: &[LogEntry]) -> Result<()> {
    let mut text = String::new();
    for entry in log {
        text.push_str(&serde_json::to_string(entry)?);
        text.push('\n');
    }
    write_file(&out.join("log.jsonl"), text.as_bytes())
}
