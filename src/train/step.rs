//! One optimizer step: forward, answer-token loss and backward over the window's
//! micro-batches (gradient accumulation), then the AdamW update (unscale for f16,
//! clip, step). This is the part of training that should read like nanoGPT's loop;
//! everything around it (evaluation, checkpoints, logs) lives in its own module.
//!
//! Two ways to place the update:
//! - **after the backward pass** (HF Trainer's way, the default): every trainable
//!   tensor's gradient accumulates in `.grad` over the window, then one update. The
//!   gradients of the whole model are in memory at once.
//! - **inside the backward pass** (`--optim-in-backward`, as torch's "optimizer step in
//!   backward" recipe and LOMO): the backward pass runs one stage at a time (loss and
//!   final norm, each decoder layer from the top, the embedding), each stage over all
//!   the window's micro-batches, and a tensor is updated, and its gradient freed, as
//!   soon as no later stage adds to it. Only one layer's gradients exist at a time.
//!   Clipping by the global norm needs that norm before the first update, so a step
//!   that clips (or unscales f16 gradients) runs the backward pass twice: once to
//!   measure, once to update (LOMO's two passes). `--max-grad-norm 0` (bf16 or f32)
//!   skips the measuring pass. Under data parallelism each stage's gradients are
//!   summed across ranks (one collective per stage, travelling while the next stage
//!   computes) before its tensors are updated, in each pass: a clipped step sends the
//!   gradients twice.
//!
//! `--cuda-graphs` (`graphed_step.rs`) records `forward_backward` (the micro-batch's
//! forward and backward pass, written to issue device work only) and the update as
//! CUDA graphs and replays them.

use std::collections::HashMap;

use anyhow::Result;
use tch::{Kind, Tensor};

use super::loss_scale::LossScaler;
use super::optim::{AdamW, StepConstants};
use super::rank_sums::RankSums;
use crate::batch::Batch;
use crate::distributed::{Distributed, Pending};
use crate::loss::{batch_context, losses_from_hidden};
use crate::model::Llama;
use crate::model::linear::PaddedLayout;
use crate::model::llama::LayerContext;
use crate::profile;

/// How one optimizer step runs.
#[derive(Debug, Clone, Copy)]
pub struct StepSettings {
    pub seed: u64,
    /// Micro-batches trained before this window (dropout seeds derive from it).
    pub first_micro: u64,
    pub checkpointing: bool,
    /// Full fine-tune (the embedding is trained) rather than LoRA.
    pub full: bool,
    pub in_backward: bool,
    /// 0: no clipping.
    pub max_grad_norm: f64,
    pub lr: f64,
    /// 1 / the window's answer tokens: the loss is a token-weighted mean over the
    /// whole window, as HF Trainer's `num_items_in_batch` makes it.
    pub token_scale: f64,
    /// Data parallelism: this rank's micro-batches are the window's `offset`,
    /// `offset + stride`, ... (rank, world size); 0 and 1 in a single process. Dropout
    /// seeds follow the global position, so results do not depend on the world size.
    pub micro_offset: u64,
    pub micro_stride: u64,
    /// Data parallelism: the window had no micro-batch for this rank, which runs one
    /// anyway with weight 0 so that every rank holds a gradient for the sum.
    pub padding_only: bool,
    /// `--neftune-noise-alpha`: noise added to the input embeddings (`Draws`).
    pub neftune_noise_alpha: Option<f64>,
}

impl StepSettings {
    /// The global position of this rank's `index`-th micro-batch in the run.
    pub(super) fn micro_position(&self, index: usize) -> u64 {
        self.first_micro + self.micro_offset + index as u64 * self.micro_stride
    }

    /// What this rank's micro-batches count for: 0 in a padding-only window.
    pub(super) fn weight(&self) -> f64 {
        if self.padding_only { 0.0 } else { 1.0 }
    }

    /// What this rank's `index`-th micro-batch draws at random.
    pub(super) fn draws(&self, index: usize) -> Draws {
        Draws {
            seed: self.seed,
            micro: self.micro_position(index),
            neftune_noise_alpha: self.neftune_noise_alpha,
        }
    }
}

/// What a micro-batch's forward pass draws at random, each from the run's seed and the
/// micro-batch's place in the run (so a resumed run, a checkpointed recomputation and
/// every world size draw the same): LoRA dropout's masks, reseeded per decoder layer,
/// and NEFTune's noise on the input embeddings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Draws {
    pub seed: u64,
    /// The micro-batch's global position in the run.
    pub micro: u64,
    /// NEFTune (Jain et al. 2023, HF Trainer's `neftune_noise_alpha`): the embeddings
    /// get uniform noise in [-a, a], a = alpha / sqrt(L x hidden), L the length of the
    /// micro-batch's padded rows (its longest example: what HF's hook sees as
    /// `output.size(1)` with the seed's collator, packed or not here). Training only.
    pub neftune_noise_alpha: Option<f64>,
}

impl Draws {
    /// Dropout only (no NEFTune).
    pub fn new(seed: u64, micro: u64) -> Draws {
        Draws {
            seed,
            micro,
            neftune_noise_alpha: None,
        }
    }

    /// Reseeds the generator for decoder layer `layer`'s dropout masks.
    fn reseed_layer(&self, layer: usize) {
        tch::manual_seed(dropout_seed(self.seed, self.micro, layer));
    }
}

/// NEFTune's noise is seeded as dropout is, from the run's seed changed by this salt:
/// its stream is then apart from this run's dropout streams (barring a collision of
/// the 47-bit seeds), which a layer number of its own would not guarantee.
const NEFTUNE_SALT: u64 = 0x004E_4546_5455_4E45; // "NEFTUNE"

/// NEFTune's bound for a micro-batch: alpha / sqrt(L x hidden).
pub fn neftune_bound(alpha: f64, padded_length: i64, hidden_size: i64) -> f64 {
    alpha / ((padded_length * hidden_size) as f64).sqrt()
}

/// `embed_for_training` for a batch (what the tests read NEFTune's noise from).
pub fn training_embeddings(model: &Llama, batch: &Batch, draws: Option<Draws>) -> Tensor {
    embed_for_training(model, batch, draws)
}

/// The micro-batch's input embeddings for training: with NEFTune, plus its uniform
/// noise (drawn in the embeddings' dtype, as HF's hook draws it). The noise is a
/// constant of the graph: the embedding's gradient is the same with it or without.
fn embed_for_training(model: &Llama, batch: &dyn MicroBatch, draws: Option<Draws>) -> Tensor {
    let embedded = model.embed(batch.input_ids());
    let Some((draws, alpha)) = draws.and_then(|d| d.neftune_noise_alpha.map(|a| (d, a))) else {
        return embedded;
    };
    let bound = neftune_bound(
        alpha,
        batch.padded_length(),
        *embedded.size().last().expect("embeddings [B, T, hidden]"),
    );
    tch::manual_seed(dropout_seed(draws.seed ^ NEFTUNE_SALT, draws.micro, 0));
    let noise = tch::no_grad(|| match batch.padded_layout() {
        // A packed row on the CPU draws the padded batch's noise and keeps its tokens'
        // rows, as `LoraDropout::Padded` draws dropout: packing changes no draw.
        Some(layout) => {
            let [rows, longest] = layout.shape;
            let hidden = *embedded.size().last().expect("embeddings [B, T, hidden]");
            let all = Tensor::zeros(
                [rows * longest, hidden],
                (embedded.kind(), embedded.device()),
            )
            .uniform_(-bound, bound);
            layout.tokens_of(all).view(embedded.size().as_slice())
        }
        None => embedded.zeros_like().uniform_(-bound, bound),
    });
    embedded + noise
}

/// What a step did.
#[derive(Debug, Clone, Default)]
pub struct StepOutcome {
    /// Sum of the micro-batches' finite losses (over answer tokens).
    pub loss_sum: f64,
    /// A micro-batch's loss that was inf or NaN (the step is then not taken).
    pub nonfinite_loss: Option<f64>,
    /// The gradients' global norm before clipping; `None` when the update was skipped.
    pub grad_norm: Option<f64>,
}

/// Dropout seed for a micro-batch and layer: a pure function of the position.
pub(super) fn dropout_seed(seed: u64, micro_step: u64, layer: usize) -> i64 {
    (seed
        .wrapping_mul(1_000_003)
        .wrapping_add(micro_step.wrapping_mul(1009))
        .wrapping_add(layer as u64)
        & 0x7FFF_FFFF_FFFF) as i64
}

/// Forward, backward and update for one window of micro-batches.
/// `group`: data parallelism (the gradients are summed across ranks before the
/// update, or, inside the backward pass, before each stage's updates).
pub fn optimizer_step(
    model: &Llama,
    optimizer: &mut AdamW,
    batches: &[Batch],
    settings: &StepSettings,
    scaler: Option<&mut LossScaler>,
    group: Option<&Distributed>,
) -> Result<StepOutcome> {
    profile::start();
    if settings.in_backward {
        let outcome = step_in_backward(model, optimizer, batches, settings, scaler, group);
        profile::mark("forward + backward + update (in-backward)");
        outcome
    } else {
        step_after_backward(model, optimizer, batches, settings, scaler, group)
    }
}

fn step_after_backward(
    model: &Llama,
    optimizer: &mut AdamW,
    batches: &[Batch],
    settings: &StepSettings,
    scaler: Option<&mut LossScaler>,
    group: Option<&Distributed>,
) -> Result<StepOutcome> {
    let loss_scale = scaler.as_ref().map_or(1.0, |s| s.scale);
    let weight = settings.weight();
    let mut outcome = StepOutcome::default();
    // Data parallelism: each layer's gradients start their sum across ranks as soon as
    // the window's last backward pass is done with them (`rank_sums`).
    let mut sums = group.map(|group| RankSums::new(group, optimizer, model));
    for (index, batch) in batches.iter().enumerate() {
        let draws = settings.draws(index);
        let last = index + 1 == batches.len();
        let mut layer_done = |layer: usize| match (&mut sums, last) {
            (Some(sums), true) => sums.layer_done(optimizer, layer),
            _ => Ok(()),
        };
        let value = micro_step_with(
            model,
            batch,
            loss_scale * settings.token_scale * weight,
            draws,
            (settings.checkpointing, settings.full),
            &mut layer_done,
        )? * weight;
        if value.is_finite() {
            outcome.loss_sum += value;
        } else {
            outcome.nonfinite_loss = Some(value);
            // Every rank must reach the sum below, so only a single process stops here.
            if scaler.is_none() && group.is_none() {
                return Ok(outcome);
            }
        }
    }
    if let Some(sums) = sums {
        // Each rank's gradients are already scaled by 1 / the whole window's answer
        // tokens, so the sums are the single-process gradients.
        let local_loss = outcome.nonfinite_loss.unwrap_or(outcome.loss_sum);
        let total = sums.finish(optimizer, local_loss)?;
        if total.is_finite() {
            outcome.loss_sum = total;
        } else {
            outcome.nonfinite_loss = Some(total);
        }
        profile::mark("all-reduce");
        if outcome.nonfinite_loss.is_some() && scaler.is_none() {
            optimizer.zero_grad();
            return Ok(outcome);
        }
    }
    apply_update(optimizer, outcome, settings, scaler, loss_scale, group)
}

/// The update after the window's gradients are in `.grad`: for f16, unscale and skip
/// the step (halving the scale) on inf/NaN gradients; clip; AdamW; ZeRO-1's broadcast;
/// then clear the gradients. `loss_scale`: the scale the gradients carry.
pub(super) fn apply_update(
    optimizer: &mut AdamW,
    mut outcome: StepOutcome,
    settings: &StepSettings,
    scaler: Option<&mut LossScaler>,
    loss_scale: f64,
    group: Option<&Distributed>,
) -> Result<StepOutcome> {
    let apply = match scaler {
        Some(scaler) => {
            let finite = optimizer.unscale_grads(1.0 / loss_scale);
            scaler.update(outcome.nonfinite_loss.is_some() || !finite)
        }
        None => true,
    };
    if apply {
        outcome.grad_norm = Some(optimizer.clip_grad_norm(settings.max_grad_norm));
        profile::mark("clip");
        optimizer.step(settings.lr);
        // ZeRO-1: each rank updated the tensors it owns; the others take them from it.
        if let (Some(group), Some(owners)) = (group, &optimizer.owners) {
            let params: Vec<&Tensor> = optimizer.params.iter().map(|p| &p.param).collect();
            group.broadcast_from_owners(&params, owners)?;
            profile::mark("broadcast");
        }
    }
    optimizer.zero_grad();
    profile::mark("optimizer");
    Ok(outcome)
}

/// Forward + backward of one micro-batch, gradients (into `.grad`) scaled by `scale`
/// (1 / the optimizer step's answer tokens). Returns the unscaled loss sum; a
/// non-finite loss is returned without a backward pass.
pub fn micro_step(
    model: &Llama,
    batch: &Batch,
    scale: f64,
    draws: Draws,
    checkpointing: bool,
    full: bool,
) -> Result<f64> {
    micro_step_with(
        model,
        batch,
        scale,
        draws,
        (checkpointing, full),
        &mut |_| Ok(()),
    )
}

/// `micro_step`, calling `layer_done(layer)` as the checkpointed backward pass finishes
/// each decoder layer (from the top; never without gradient checkpointing, where the
/// backward pass is one call).
fn micro_step_with(
    model: &Llama,
    batch: &Batch,
    scale: f64,
    draws: Draws,
    flags: (bool, bool),
    layer_done: &mut dyn FnMut(usize) -> Result<()>,
) -> Result<f64> {
    let checkpointing = flags.0;
    let mut value = f64::NAN;
    // The loss is read before the backward pass: a non-finite one skips it.
    let mut proceed = |sum: &Tensor| {
        profile::mark(if checkpointing {
            "forward (checkpointed)"
        } else {
            "forward"
        });
        value = sum.double_value(&[]);
        value.is_finite()
    };
    // The sum's value is read in `proceed`.
    let _sum = forward_backward(
        model,
        batch,
        Some(draws),
        flags,
        &|sum| sum * scale,
        &mut proceed,
        layer_done,
    )?;
    profile::mark(if checkpointing {
        "backward (recomputing layers)"
    } else {
        "backward"
    });
    Ok(value)
}

/// What a micro-batch gives the step: its tokens, what every decoder layer shares, and
/// the loss summed over its trained positions. A `Batch` (the eager step) is one, and
/// so are the fixed-width inputs a recorded CUDA graph reads (`graphed_step.rs`).
pub(super) trait MicroBatch {
    fn input_ids(&self) -> &Tensor;
    fn layer_context(&self, model: &Llama) -> LayerContext;
    /// The loss summed over the trained positions, from the final norm's output.
    fn loss_sum(&self, model: &Llama, normed: &Tensor) -> Tensor;
    /// The length of the micro-batch's rows padded as HF's collator pads them (its
    /// longest example), which NEFTune's noise scale reads.
    fn padded_length(&self) -> i64;
    /// A packed row on the CPU: where its tokens sit in the padded batch
    /// (`LoraDropout::Padded`), in whose shape NEFTune draws its noise too.
    fn padded_layout(&self) -> Option<&PaddedLayout> {
        None
    }
}

impl MicroBatch for Batch {
    fn input_ids(&self) -> &Tensor {
        &self.input_ids
    }

    fn layer_context(&self, model: &Llama) -> LayerContext {
        batch_context(model, self)
    }

    fn loss_sum(&self, model: &Llama, normed: &Tensor) -> Tensor {
        losses_from_hidden(model, normed, &self.answers).sum()
    }

    fn padded_layout(&self) -> Option<&PaddedLayout> {
        self.packing.as_ref()?.padded_layout.as_ref()
    }

    fn padded_length(&self) -> i64 {
        match &self.packing {
            Some(packing) => packing
                .segments
                .iter()
                .map(|&(_, length)| length)
                .max()
                .unwrap_or(0),
            None => self.input_ids.size()[1],
        }
    }
}

/// Forward and backward pass of one micro-batch, gradients added into `.grad`; returns
/// the loss sum (a device scalar). Issues device work only, apart from what the
/// callers' closures do, so a CUDA graph can record it:
/// - `draws`: what the pass draws at random (`Draws`): dropout reseeded per layer (so
///   the checkpointed recomputation draws the forward's masks), NEFTune's noise; `None`
///   when nothing is random (a graph cannot reseed).
/// - `objective(sum)`: what the backward pass starts from (the sum times the step's
///   scale).
/// - `proceed(sum)`: sees the loss sum before the backward pass and says whether to
///   run it.
/// - `layer_done(layer)`: the checkpointed backward pass is done with a decoder layer.
pub(super) fn forward_backward(
    model: &Llama,
    batch: &dyn MicroBatch,
    draws: Option<Draws>,
    (checkpointing, full): (bool, bool),
    objective: &dyn Fn(&Tensor) -> Tensor,
    proceed: &mut dyn FnMut(&Tensor) -> bool,
    layer_done: &mut dyn FnMut(usize) -> Result<()>,
) -> Result<Tensor> {
    let reseed = |layer: usize| {
        if let Some(draws) = draws {
            draws.reseed_layer(layer);
        }
    };
    if !checkpointing {
        // Reseeded per layer as the checkpointed pass below and the in-backward step
        // are, so every route draws the same dropout masks: gradient checkpointing
        // trades memory for time and changes nothing else.
        let context = batch.layer_context(model);
        let mut hidden = embed_for_training(model, batch, draws);
        for layer in 0..model.layers.len() {
            reseed(layer);
            hidden = model.layer_forward(layer, &hidden, &context, None, true);
        }
        let normed = model.final_norm(&hidden);
        let sum = batch.loss_sum(model, &normed);
        if proceed(&sum) {
            objective(&sum).backward();
        }
        return Ok(sum.detach());
    }
    // Gradient checkpointing per decoder layer: a forward pass without a graph keeps
    // only each layer's input; the backward pass recomputes one layer at a time (with
    // the same dropout seed) and pushes the gradient through it.
    let kept = forward_keeping_layer_inputs(model, batch, draws);
    let top = kept.top.detach().set_requires_grad(true);
    let sum = batch.loss_sum(model, &model.final_norm(&top));
    if !proceed(&sum) {
        return Ok(sum.detach());
    }
    objective(&sum).backward();
    let mut grad = top.grad();
    for layer in (0..model.layers.len()).rev() {
        let input = kept.inputs[layer].detach().set_requires_grad(true);
        reseed(layer);
        let output = model.layer_forward(layer, &input, &kept.context, None, true);
        (output * &grad).sum(Kind::Float).backward();
        grad = input.grad();
        layer_done(layer)?;
    }
    if full {
        (model.embed(batch.input_ids()) * &grad)
            .sum(Kind::Float)
            .backward();
    }
    Ok(sum.detach())
}

/// What a forward pass without a graph keeps of one micro-batch: every decoder
/// layer's input and the last layer's output (gradient checkpointing).
struct KeptForward {
    context: LayerContext,
    inputs: Vec<Tensor>,
    top: Tensor,
}

/// `draws` as `forward_backward`'s.
fn forward_keeping_layer_inputs(
    model: &Llama,
    batch: &dyn MicroBatch,
    draws: Option<Draws>,
) -> KeptForward {
    let context = batch.layer_context(model);
    let mut inputs = Vec::with_capacity(model.layers.len());
    let mut hidden = tch::no_grad(|| embed_for_training(model, batch, draws));
    for layer in 0..model.layers.len() {
        inputs.push(hidden.shallow_clone());
        if let Some(draws) = draws {
            draws.reseed_layer(layer);
        }
        hidden = tch::no_grad(|| model.layer_forward(layer, &hidden, &context, None, true));
    }
    KeptForward {
        context,
        inputs,
        top: hidden,
    }
}

/// The optimizer's tensors by the stage of the backward pass that completes their
/// gradient.
pub(super) struct Stages {
    /// Final norm and lm_head (full fine-tune).
    pub top: Vec<usize>,
    /// Each decoder layer's weights, norms or adapters.
    pub layers: Vec<Vec<usize>>,
    /// The input embedding (full fine-tune), completed at the bottom.
    pub embed: Option<usize>,
    /// A tied lm_head: the embedding also gets a gradient at the top.
    embed_at_top: bool,
}

impl Stages {
    pub fn new(optimizer: &AdamW, model: &Llama) -> Stages {
        let mut stages = Stages {
            top: Vec::new(),
            layers: vec![Vec::new(); model.layers.len()],
            embed: None,
            embed_at_top: false,
        };
        for (index, p) in optimizer.params.iter().enumerate() {
            if p.name == "model.embed_tokens.weight" {
                stages.embed = Some(index);
            } else if let Some(layer) = layer_of(&p.name).filter(|&l| l < model.layers.len()) {
                stages.layers[layer].push(index);
            } else {
                stages.top.push(index);
            }
        }
        stages.embed_at_top = stages.embed.is_some() && model.lm_head.is_none();
        stages
    }
}

/// The decoder layer a tensor name belongs to ("...layers.12.mlp..." -> 12).
fn layer_of(name: &str) -> Option<usize> {
    let rest = &name[name.find("layers.")? + "layers.".len()..];
    rest.split('.').next()?.parse().ok()
}

/// Gradients summed over the window's micro-batches, in f32, until handed out.
#[derive(Default)]
struct GradientSums {
    sums: HashMap<usize, Tensor>,
    /// Data parallelism: the stage handed out last, whose sum across ranks travels
    /// while the next stage computes (DDP's overlap of the all-reduce with the backward
    /// pass). The next `hand_out` completes it; `finish` completes the last one.
    in_flight: Option<(Vec<(usize, Tensor)>, Pending)>,
}

impl GradientSums {
    fn add(&mut self, indices: &[usize], grads: &[Tensor]) {
        for (&index, grad) in indices.iter().zip(grads) {
            if !grad.defined() {
                continue;
            }
            let grad = grad.to_kind(Kind::Float);
            match self.sums.get_mut(&index) {
                Some(sum) => *sum += grad,
                None => {
                    self.sums.insert(index, grad);
                }
            }
        }
    }

    /// Hands each tensor's sum to `complete`. Under data parallelism the stage's sums
    /// are first summed across ranks, in one collective (every rank hands out the same
    /// stages in the same order; a tensor without a gradient on this rank takes part
    /// with zeros, so the ranks' lists always match), which is started here and
    /// completed at the next stage's `hand_out` or at `finish`: a stage's tensors are
    /// updated one stage later (no stage below reads a stage's weights), and two
    /// stages' gradients exist at a time instead of one.
    fn hand_out(
        &mut self,
        indices: &[usize],
        params: &[Tensor],
        group: Option<&Distributed>,
        complete: &mut dyn FnMut(usize, Tensor),
    ) -> Result<()> {
        let Some(group) = group else {
            for index in indices {
                if let Some(sum) = self.sums.remove(index) {
                    complete(*index, sum);
                }
            }
            return Ok(());
        };
        let sums: Vec<(usize, Tensor)> = indices
            .iter()
            .map(|&index| {
                let sum = self.sums.remove(&index).unwrap_or_else(|| {
                    Tensor::zeros(params[index].size(), (Kind::Float, params[index].device()))
                });
                (index, sum)
            })
            .collect();
        if sums.is_empty() {
            return Ok(());
        }
        let pending = group.start_sum(&sums.iter().map(|(_, sum)| sum).collect::<Vec<_>>())?;
        let previous = self.in_flight.replace((sums, pending));
        complete_stage(previous, complete)
    }

    /// Completes the stage whose sum across ranks is still under way, if any.
    fn finish(&mut self, complete: &mut dyn FnMut(usize, Tensor)) -> Result<()> {
        complete_stage(self.in_flight.take(), complete)
    }
}

/// Waits for a stage's sum across ranks, then hands its tensors to `complete`.
fn complete_stage(
    stage: Option<(Vec<(usize, Tensor)>, Pending)>,
    complete: &mut dyn FnMut(usize, Tensor),
) -> Result<()> {
    if let Some((sums, pending)) = stage {
        pending.finish()?;
        for (index, sum) in sums {
            complete(index, sum);
        }
    }
    Ok(())
}

/// A window whose forward pass has run, ready for its backward pass by stage.
struct KeptWindow<'a> {
    model: &'a Llama,
    kept: Vec<KeptForward>,
    batches: &'a [Batch],
    settings: &'a StepSettings,
    /// Loss scale x 1 / the window's answer tokens.
    scale: f64,
    stages: Stages,
    /// The optimizer's tensors, by optimizer index.
    params: Vec<Tensor>,
    /// Data parallelism: each stage's gradients and the window's loss are summed
    /// across ranks.
    group: Option<&'a Distributed>,
}

/// A window's loss sum (over every rank's micro-batches under data parallelism), and
/// the value that is not finite, if any: in a single process the first such
/// micro-batch loss (`sum` then adds the finite ones), across ranks the total (`sum`
/// is then 0).
struct WindowLoss {
    sum: f64,
    nonfinite: Option<f64>,
}

impl WindowLoss {
    /// One process's micro-batch losses: the sum of the finite ones, the first
    /// non-finite one.
    fn of(losses: &[f64]) -> WindowLoss {
        WindowLoss {
            sum: losses.iter().filter(|l| l.is_finite()).sum(),
            nonfinite: losses.iter().copied().find(|l| !l.is_finite()),
        }
    }
}

/// Runs the window's backward pass stage by stage (loss and final norm, each layer
/// from the top, the embedding), each stage over every micro-batch, and hands each
/// trainable tensor's gradient, summed over the window, to `complete` as soon as no
/// later stage adds to it. Returns the window's loss; when it is not finite it returns
/// before handing out anything (under data parallelism, when the sum over every rank
/// is not, so all ranks stop together).
fn backward_by_stage(
    window: &KeptWindow,
    complete: &mut dyn FnMut(usize, Tensor),
) -> Result<WindowLoss> {
    let KeptWindow {
        model,
        kept,
        batches,
        settings,
        scale,
        stages,
        params,
        group,
    } = window;
    let group = *group;
    let scale = *scale;
    let with_params = |first: Tensor, indices: &[usize]| -> Vec<Tensor> {
        std::iter::once(first)
            .chain(indices.iter().map(|&i| params[i].shallow_clone()))
            .collect()
    };
    let mut sums = GradientSums::default();

    // The loss, the final norm and lm_head, for every micro-batch before any update.
    let mut top_indices = stages.top.clone();
    if stages.embed_at_top {
        top_indices.extend(stages.embed);
    }
    let mut losses = Vec::with_capacity(kept.len());
    let mut hidden_grads = Vec::with_capacity(kept.len());
    for (forward, batch) in kept.iter().zip(batches.iter()) {
        let top = forward.top.detach().set_requires_grad(true);
        let sum = losses_from_hidden(model, &model.final_norm(&top), &batch.answers).sum();
        losses.push(sum.double_value(&[]));
        if !losses.last().is_some_and(|l| l.is_finite()) {
            if group.is_none() {
                return Ok(WindowLoss::of(&losses));
            }
            // Every rank must reach the loss's sum below, which this loss makes
            // non-finite: nothing is handed out, so the placeholder is never read.
            hidden_grads.push(Tensor::new());
            continue;
        }
        let grads = Tensor::run_backward(
            &[sum * scale],
            &with_params(top, &top_indices),
            false,
            false,
        );
        sums.add(&top_indices, &grads[1..]);
        hidden_grads.push(grads[0].shallow_clone());
    }
    let loss = match group {
        None => WindowLoss::of(&losses),
        Some(group) => {
            // A padding-only window (a rank without a micro-batch of its own) counts 0;
            // a non-finite loss stays non-finite (0 x inf is NaN), so the skipped
            // backward passes above always end the step on every rank. (That
            // micro-batch is another rank's too, so it would stop the step anyway.)
            let local: f64 = losses.iter().sum::<f64>() * settings.weight();
            let total = Tensor::from_slice(&[local]);
            group.allreduce_sum(&[&total])?;
            let total = total.double_value(&[0]);
            if !total.is_finite() {
                return Ok(WindowLoss {
                    sum: 0.0,
                    nonfinite: Some(total),
                });
            }
            WindowLoss {
                sum: total,
                nonfinite: None,
            }
        }
    };
    sums.hand_out(&stages.top, params, group, complete)?;

    // Each decoder layer, recomputed from its kept input with the forward's dropout.
    let embed: Vec<usize> = stages.embed.into_iter().collect();
    for layer in (0..model.layers.len()).rev() {
        let indices = &stages.layers[layer];
        let input_grad_needed = layer > 0 || !embed.is_empty();
        if indices.is_empty() && !input_grad_needed {
            continue;
        }
        for (micro, forward) in kept.iter().enumerate() {
            let input = forward.inputs[layer]
                .detach()
                .set_requires_grad(input_grad_needed);
            settings.draws(micro).reseed_layer(layer);
            let output = model.layer_forward(layer, &input, &forward.context, None, true);
            let objective = (output * &hidden_grads[micro]).sum(Kind::Float);
            let wrt: Vec<Tensor> = if input_grad_needed {
                with_params(input, indices)
            } else {
                indices.iter().map(|&i| params[i].shallow_clone()).collect()
            };
            let grads = Tensor::run_backward(&[objective], &wrt, false, false);
            if input_grad_needed {
                sums.add(indices, &grads[1..]);
                hidden_grads[micro] = grads[0].shallow_clone();
            } else {
                sums.add(indices, &grads);
            }
        }
        sums.hand_out(indices, params, group, complete)?;
    }

    // The input embedding (full fine-tune).
    if let Some(&index) = embed.first() {
        for (batch, grad) in batches.iter().zip(hidden_grads.iter()) {
            let objective = (model.embed(&batch.input_ids) * grad).sum(Kind::Float);
            let grads =
                Tensor::run_backward(&[objective], &[params[index].shallow_clone()], false, false);
            sums.add(&embed, &grads);
        }
        sums.hand_out(&embed, params, group, complete)?;
    }
    sums.finish(complete)?;
    Ok(loss)
}

fn step_in_backward(
    model: &Llama,
    optimizer: &mut AdamW,
    batches: &[Batch],
    settings: &StepSettings,
    scaler: Option<&mut LossScaler>,
    group: Option<&Distributed>,
) -> Result<StepOutcome> {
    let kept: Vec<KeptForward> = batches
        .iter()
        .enumerate()
        .map(|(micro, batch)| {
            forward_keeping_layer_inputs(model, batch, Some(settings.draws(micro)))
        })
        .collect();
    let loss_scale = scaler.as_ref().map_or(1.0, |s| s.scale);
    // A rank without a micro-batch of its own in this window runs one at weight 0.
    let weight = settings.weight();
    let window = KeptWindow {
        model,
        kept,
        batches,
        settings,
        scale: loss_scale * settings.token_scale * weight,
        stages: Stages::new(optimizer, model),
        params: optimizer
            .params
            .iter()
            .map(|p| p.param.shallow_clone())
            .collect(),
        group,
    };
    let device = model.device;

    // The measuring pass: the global norm (and, in f16, whether every gradient is
    // finite) must be known before the first tensor is updated.
    let mut factor = 1.0 / loss_scale;
    let mut measured_norm = None;
    if settings.max_grad_norm > 0.0 || scaler.is_some() {
        let mut squares = Tensor::zeros([], (Kind::Float, device));
        let unscale = factor;
        let WindowLoss {
            sum: loss_sum,
            nonfinite: nonfinite_loss,
        } = backward_by_stage(&window, &mut |_, grad| {
            squares += (grad * unscale).square().sum(Kind::Float)
        })?;
        let norm = squares.sqrt().double_value(&[]);
        let apply = match scaler {
            Some(scaler) => scaler.update(nonfinite_loss.is_some() || !norm.is_finite()),
            None => nonfinite_loss.is_none(),
        };
        if !apply {
            return Ok(StepOutcome {
                loss_sum,
                nonfinite_loss,
                grad_norm: None,
            });
        }
        if settings.max_grad_norm > 0.0 {
            let coefficient = settings.max_grad_norm / (norm + 1e-6);
            if coefficient < 1.0 {
                factor *= coefficient;
            }
        }
        measured_norm = Some(norm);
    }

    // The updating pass: each tensor is updated as its gradient completes, and the
    // gradient is dropped right after.
    let mut constants: Option<StepConstants> = None;
    let mut squares = Tensor::zeros([], (Kind::Float, device));
    let WindowLoss {
        sum: loss_sum,
        nonfinite: nonfinite_loss,
    } = backward_by_stage(&window, &mut |index, mut grad| {
        if factor != 1.0 {
            grad *= factor;
        }
        if measured_norm.is_none() {
            squares += grad.square().sum(Kind::Float);
        }
        let constants = constants.get_or_insert_with(|| optimizer.begin_step(settings.lr));
        optimizer.update(index, &grad, constants);
    })?;
    let grad_norm = match (nonfinite_loss, measured_norm) {
        (Some(_), _) => None,
        (None, Some(norm)) => Some(norm),
        (None, None) => Some(squares.sqrt().double_value(&[])),
    };
    Ok(StepOutcome {
        loss_sum,
        nonfinite_loss,
        grad_norm,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_numbers_come_from_hf_and_peft_names() {
        assert_eq!(layer_of("model.layers.12.mlp.up_proj.weight"), Some(12));
        assert_eq!(
            layer_of("base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight"),
            Some(3)
        );
        assert_eq!(layer_of("model.norm.weight"), None);
        assert_eq!(layer_of("lm_head.weight"), None);
    }
}
