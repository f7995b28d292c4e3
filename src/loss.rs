//! Answer-token cross-entropy: the prediction at position t is scored against the
//! label at t + 1, only where that label is not -100, and logits are computed only at
//! those positions (the lm_head is the biggest matmul of a small model).

use tch::{Kind, Reduction, Tensor};

use crate::batch::{Answers, Batch};
use crate::encode::Encoded;
use crate::encode::IGNORE_INDEX;
use crate::model::Llama;

/// Per-token losses of a batch, and which row each token belongs to.
pub struct TokenLosses {
    /// [N] f32 negative log-likelihoods.
    pub nll: Tensor,
    /// [N] int64 row index of each token.
    pub rows: Tensor,
}

impl TokenLosses {
    /// Sum over all tokens (a scalar that carries gradients in training).
    pub fn sum(&self) -> Tensor {
        self.nll.sum(Kind::Float)
    }

    pub fn count(&self) -> i64 {
        self.nll.size()[0]
    }

    /// (sum, count) per row of a batch of `batch_size` rows.
    pub fn per_row(&self, batch_size: i64) -> Vec<(f64, i64)> {
        let zeros = Tensor::zeros([batch_size], (Kind::Double, self.nll.device()));
        let sums = zeros.index_add(0, &self.rows, &self.nll.detach().to_kind(Kind::Double));
        let counts = Tensor::zeros([batch_size], (Kind::Int64, self.nll.device())).index_add(
            0,
            &self.rows,
            &self.rows.ones_like(),
        );
        let sums: Vec<f64> =
            Vec::<f64>::try_from(sums.to_device(tch::Device::Cpu)).expect("f64 sums");
        let counts: Vec<i64> =
            Vec::<i64>::try_from(counts.to_device(tch::Device::Cpu)).expect("i64 counts");
        sums.into_iter().zip(counts).collect()
    }
}

/// Runs the model on a batch and returns the answer tokens' losses.
///
/// Batches are right-padded, so plain causal attention is exact for every real token
/// (a real token only sees earlier positions, all real); no mask is passed, which lets
/// libtorch use its flash-attention kernel instead of materialising [B, H, T, T]
/// scores. Pad positions compute garbage that no loss reads.
/// A packed batch runs attention per document (see `Batch::packed`).
pub fn answer_token_losses(model: &Llama, batch: &Batch, train: bool) -> TokenLosses {
    let context = batch_context(model, batch);
    let hidden = model.forward_hidden_in(&batch.input_ids, &context, None, train);
    losses_from_hidden(model, &hidden, &batch.answers)
}

/// What every layer shares for a right-padded or packed training batch: no mask
/// (right padding needs none), the documents' spans when packed.
pub fn batch_context(model: &Llama, batch: &Batch) -> crate::model::llama::LayerContext {
    let context = model.context(&batch.input_ids, &batch.positions, None, None);
    match &batch.packing {
        None => context,
        Some(packing) => context.with_packing(
            packing.segments.clone(),
            packing.padded_layout.as_ref().map(|l| l.shallow_clone()),
        ),
    }
}

/// The answer tokens' losses from final hidden states [B, T, H], at the positions
/// the batch lists (found on the host, so no `nonzero` sync on the device).
pub fn losses_from_hidden(model: &Llama, hidden: &Tensor, answers: &Answers) -> TokenLosses {
    let hidden_size = hidden.size()[2];
    let chosen = hidden
        .reshape([-1, hidden_size])
        .index_select(0, &answers.positions);
    let logits = model.logits(&chosen).to_kind(Kind::Float);
    let nll = logits.cross_entropy_loss::<Tensor>(
        &answers.targets,
        None,
        Reduction::None,
        IGNORE_INDEX,
        answers.label_smoothing,
    );
    TokenLosses {
        nll,
        rows: answers.rows.shallow_clone(),
    }
}

/// (loss sum, answer tokens) of every example, in the given order. Examples are
/// batched by length (less padding) without gradients. `label_smoothing`: 0 for the
/// plain cross-entropy (`amthal loss`, perplexity), else as `Answers::label_smoothing`
/// (a training run's eval_loss, as HF Trainer's).
pub fn per_example_losses(
    model: &Llama,
    examples: &[&Encoded],
    batch_size: usize,
    label_smoothing: f64,
) -> Vec<(f64, i64)> {
    let mut order: Vec<usize> = (0..examples.len()).collect();
    order.sort_by_key(|&i| examples[i].input_ids.len());
    let mut results = vec![(0.0, 0); examples.len()];
    tch::no_grad(|| {
        for chunk in order.chunks(batch_size.max(1)) {
            let rows: Vec<&Encoded> = chunk.iter().map(|&i| examples[i]).collect();
            let batch =
                Batch::from_encoded(&rows, model.device).with_label_smoothing(label_smoothing);
            let losses = answer_token_losses(model, &batch, false);
            for (&slot, result) in chunk.iter().zip(losses.per_row(chunk.len() as i64)) {
                results[slot] = result;
            }
        }
    });
    results
}

/// Token-weighted mean answer-token loss over a set.
pub fn mean_loss(
    model: &Llama,
    examples: &[&Encoded],
    batch_size: usize,
    label_smoothing: f64,
) -> f64 {
    let (total, tokens) = loss_sums(model, examples, batch_size, label_smoothing);
    total / tokens.max(1) as f64
}

/// (loss sum, answer tokens) over a set.
pub fn loss_sums(
    model: &Llama,
    examples: &[&Encoded],
    batch_size: usize,
    label_smoothing: f64,
) -> (f64, i64) {
    let results = per_example_losses(model, examples, batch_size, label_smoothing);
    (
        results.iter().map(|(s, _)| s).sum(),
        results.iter().map(|(_, c)| c).sum(),
    )
}
