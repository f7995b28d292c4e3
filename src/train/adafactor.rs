//! `--optim adafactor`: transformers' `Adafactor` (Shazeer and Stern 2018, fairseq's
//! form) with the settings HF Trainer gives it for `optim="adafactor"`: the schedule's
//! learning rate (`relative_step=False`, `scale_parameter=False`, no warmup_init), no
//! first moment (`beta1=None`), `eps=(1e-30, 1e-3)`, `clip_threshold=1`,
//! `decay_rate=-0.8`, and Trainer's weight decay on the decayed group. Per step t:
//!
//! ```text
//! beta2t = 1 - t^-0.8
//! u = g^2 + 1e-30
//! matrix: row = beta2t row + (1 - beta2t) mean_last(u);  col = beta2t col + (1 - beta2t) mean_rows(u)
//!         u = g / sqrt(row / mean(row) x col)          (the factored estimate of E[g^2])
//! vector: v = beta2t v + (1 - beta2t) u;  u = g / sqrt(v)
//! u = lr u / max(1, rms(u))
//! w = w - lr wd w - u
//! ```
//!
//! Its state for a 7B is a few megabytes (a row and a column vector per matrix), where
//! AdamW keeps 8 bytes per parameter: a full fine-tune's optimizer memory is the bf16
//! weights' Kahan compensation alone (2 bytes per parameter, `compensation.rs`; HF
//! rounds each update into the bf16 weight and loses what rounding drops). In f32 the
//! steps equal transformers' within f32 rounding (`tests/golden/adafactor.safetensors`,
//! from `scripts/golden/make_adafactor_golden.py`).
//!
//! What transformers' class offers beyond Trainer's settings (its own relative step
//! sizes, parameter scaling, a first moment through `optim_args`) is not built. The
//! step count is the optimizer's, shared by every tensor; transformers counts per
//! tensor, which is the same while every trained tensor gets a gradient at every step
//! (always, in amthal's training).
//!
//! A matrix is updated a block of rows at a time (about `optim::UPDATE_CHUNK` values,
//! as AdamW's chunks), so the f32 temporaries stay under a gigabyte where a 7B's
//! embedding whole would take ~10 GB. The update needs whole-tensor statistics (the
//! column means, the mean of the row means, the update's RMS), so it passes over the
//! blocks three times: the new squared-gradient means, the update's sum of squares,
//! then the update itself (computed again rather than kept). The column means are
//! then sums over blocks divided by the row count, which rounds slightly differently
//! from torch's `mean` over the whole dimension (within the golden test's 1e-6).

use tch::{Kind, Tensor};

use super::moments::Moment;
use super::optim::{ParamState, StepConstants};

/// transformers' defaults that Trainer keeps.
const EPS_SQUARED: f64 = 1e-30;
const DECAY_RATE: f64 = -0.8;
const CLIP_THRESHOLD: f64 = 1.0;

/// One Adafactor step of parameter `p` with gradient `grad` (any float dtype) at the
/// step's learning rate; `weight_decay` applies when the parameter is in the decayed
/// group; a matrix goes by blocks of about `chunk` values.
pub fn update(
    p: &mut ParamState,
    grad: &Tensor,
    step: &StepConstants,
    weight_decay: f64,
    chunk: i64,
) {
    let beta2t = 1.0 - (step.number as f64).powf(DECAY_RATE);
    let decay = if p.weight_decay { weight_decay } else { 0.0 };
    tch::no_grad(|| match &mut p.exp_avg_sq {
        Moment::Factored { row, col } if grad.dim() == 2 => {
            let blocks = RowBlocks::new(grad.size(), chunk);
            let (row_factor, col_factor) = factored_second_moment(row, col, grad, &blocks, beta2t);
            let scaled = |rows: (i64, i64)| {
                let (start, count) = rows;
                row_factor.narrow(0, start, count).unsqueeze(-1)
                    * &col_factor
                    * grad.narrow(0, start, count).to_kind(Kind::Float)
            };
            let sum_of_squares = blocks
                .iter()
                .map(|rows| scaled(rows).square().sum(Kind::Float))
                .reduce(|a, b| a + b)
                .expect("a matrix has a row");
            let factor = step_factor(&sum_of_squares, grad.numel(), step.lr);
            let columns = grad.size()[1];
            for (start, count) in blocks.iter() {
                let update = scaled((start, count)) * &factor;
                apply(
                    p,
                    &update,
                    start * columns,
                    count * columns,
                    step.lr * decay,
                );
            }
        }
        Moment::Factored { row, col } => {
            // More than two dimensions (no Llama tensor has them): whole.
            let grad = grad.to_kind(Kind::Float);
            let squared = grad.square() + EPS_SQUARED;
            blend(row, &squared.mean_dim(-1, false, Kind::Float), beta2t);
            blend(col, &squared.mean_dim(-2, false, Kind::Float), beta2t);
            drop(squared);
            let row_factor = (&*row / row.mean_dim(-1, true, Kind::Float))
                .rsqrt()
                .unsqueeze(-1);
            let update = row_factor * col.unsqueeze(-2).rsqrt() * &grad;
            let update =
                &update * step_factor(&update.square().sum(Kind::Float), grad.numel(), step.lr);
            apply(p, &update, 0, grad.numel() as i64, step.lr * decay);
        }
        Moment::F32(second) => {
            let grad = grad.to_kind(Kind::Float);
            blend(second, &(grad.square() + EPS_SQUARED), beta2t);
            let update = second.rsqrt() * &grad;
            let update =
                &update * step_factor(&update.square().sum(Kind::Float), grad.numel(), step.lr);
            apply(p, &update, 0, grad.numel() as i64, step.lr * decay);
        }
        _ => unreachable!("Adafactor keeps a factored or an f32 second moment"),
    })
}

/// A matrix's rows in blocks of about `chunk` values: (first row, row count).
struct RowBlocks {
    rows: i64,
    per_block: i64,
}

impl RowBlocks {
    fn new(shape: Vec<i64>, chunk: i64) -> RowBlocks {
        RowBlocks {
            rows: shape[0],
            per_block: (chunk / shape[1].max(1)).max(1),
        }
    }

    fn iter(&self) -> impl Iterator<Item = (i64, i64)> + '_ {
        (0..self.rows)
            .step_by(self.per_block as usize)
            .map(|start| (start, self.per_block.min(self.rows - start)))
    }
}

/// Takes this step's g^2 + eps into the factored second moment of a matrix, block by
/// block; returns the update's factors rsqrt(row / mean(row)) [rows] and rsqrt(col)
/// [columns] (fairseq's `_approx_sq_grad`, unbroadcast).
fn factored_second_moment(
    row: &mut Tensor,
    col: &mut Tensor,
    grad: &Tensor,
    blocks: &RowBlocks,
    beta2t: f64,
) -> (Tensor, Tensor) {
    let row_means = Tensor::empty_like(row);
    let mut column_sums = Tensor::zeros_like(col);
    for (start, count) in blocks.iter() {
        let squared = grad.narrow(0, start, count).to_kind(Kind::Float).square() + EPS_SQUARED;
        row_means
            .narrow(0, start, count)
            .copy_(&squared.mean_dim(-1, false, Kind::Float));
        let _ = column_sums.g_add_(&squared.sum_dim_intlist(0, false, Kind::Float));
    }
    blend(row, &row_means, beta2t);
    blend(col, &(column_sums / blocks.rows as f64), beta2t);
    let row_factor = (&*row / row.mean(Kind::Float)).rsqrt();
    (row_factor, col.rsqrt())
}

/// lr / max(1, rms(update) / clip_threshold) as a 0-dim tensor on the update's device
/// (no host read), from the update's sum of squares and element count.
fn step_factor(sum_of_squares: &Tensor, numel: usize, lr: f64) -> Tensor {
    let rms = (sum_of_squares / numel as f64).sqrt();
    (rms / CLIP_THRESHOLD).clamp_min(1.0).reciprocal() * lr
}

/// Applies `update` (f32) to values `start..start + length` of the flattened
/// parameter: w = w - lr wd w - update, through the Kahan compensation for bf16
/// weights; `decay`: lr x wd (0 outside the decayed group).
fn apply(p: &mut ParamState, update: &Tensor, start: i64, length: i64, decay: f64) {
    let mut weight = p.param.view([-1]).narrow(0, start, length);
    let mut target = match weight.kind() {
        Kind::Float => weight.shallow_clone(),
        _ => weight.to_kind(Kind::Float),
    };
    if decay != 0.0 {
        let decayed = &target * -decay;
        let _ = target.g_add_(&decayed);
    }
    let _ = target.g_sub_(&update.view([-1]));
    if weight.data_ptr() == target.data_ptr() {
        return;
    }
    match &mut p.compensation {
        Some(compensation) => compensation
            .chunk(start, length)
            .round_into(&target, &mut weight),
        None => weight.copy_(&target.to_kind(weight.kind())),
    }
}

/// `average = beta2t average + (1 - beta2t) value`, in place (transformers'
/// `mul_(beta2t).add_(value, alpha=1 - beta2t)`).
fn blend(average: &mut Tensor, value: &Tensor, beta2t: f64) {
    let _ = average.g_mul_scalar_(beta2t);
    let _ = average.g_add_(&(value * (1.0 - beta2t)));
}
