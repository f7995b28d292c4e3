//! Evaluation during training: the validation loss (token-weighted, as HF Trainer's
//! eval_loss), the best checkpoint and early stopping, and the greedy previews printed
//! at the end of a run.

use anyhow::Result;

use super::state::TrainerState;
use crate::encode::{Encoded, Encoder};
use crate::generate::{
    GenerationRequest, SamplingConfig, completion_text, generate_batch, stop_ids,
};
use crate::model::Llama;
use crate::prompt::PromptBuilder;
use crate::tokenizer::ModelTokenizer;

/// Token-weighted mean answer-token loss over a set (no gradients), label-smoothed
/// by `label_smoothing` as the training loss is (HF Trainer's eval_loss is too).
pub fn evaluate_loss(
    model: &Llama,
    examples: &[Encoded],
    batch_size: usize,
    label_smoothing: f64,
) -> f64 {
    let examples: Vec<&Encoded> = examples.iter().collect();
    crate::loss::mean_loss(model, &examples, batch_size, label_smoothing)
}

/// `evaluate_loss` split across data-parallel ranks: each rank scores every
/// world-th example, and the loss sums and token counts are summed across ranks.
pub fn sharded_eval_loss(
    model: &Llama,
    examples: &[Encoded],
    batch_size: usize,
    label_smoothing: f64,
    group: &crate::distributed::Distributed,
) -> Result<f64> {
    let mine: Vec<&Encoded> = examples
        .iter()
        .skip(group.rank())
        .step_by(group.world())
        .collect();
    let (total, tokens) = crate::loss::loss_sums(model, &mine, batch_size, label_smoothing);
    let sums = tch::Tensor::from_slice(&[total, tokens as f64]);
    group.allreduce_sum(&[&sums])?;
    Ok(sums.double_value(&[0]) / sums.double_value(&[1]).max(1.0))
}

/// Records an evaluation: the best metric and its step, and the count of
/// evaluations without improvement. Returns whether early stopping ends the run.
pub fn record_evaluation(
    state: &mut TrainerState,
    eval_loss: f64,
    patience: Option<usize>,
) -> bool {
    if state.best_metric.is_none_or(|best| eval_loss < best) {
        state.best_metric = Some(eval_loss);
        state.best_step = Some(state.global_step);
        state.evals_without_improvement = 0;
    } else {
        state.evals_without_improvement += 1;
    }
    patience.is_some_and(|patience| state.evals_without_improvement >= patience)
}

/// Greedy explanations of the first `count` proverbs.
pub fn previews(
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
    let stops = stop_ids(
        encoder.end_id(),
        tokenizer,
        model,
        model.config.generation_config.as_ref(),
    );
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
