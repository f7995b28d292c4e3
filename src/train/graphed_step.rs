//! `--cuda-graphs`: each micro-batch's forward and backward pass recorded once as a
//! CUDA graph and replayed with one launch (torch.compile's "reduce-overhead" mode
//! does the same with torch.cuda.graph).
//!
//! Why: on an H200 a LoRA step of the 7B shape issues ~10,000 small kernels, and the
//! GPU waits for the host that launches them (measured: ~400 ms of host time against
//! ~15 ms of math). A replayed graph launches them all at once.
//!
//! What a graph needs, and how the step gives it:
//! - **Fixed shapes.** A packed micro-batch is laid out at a width rounded up to a
//!   multiple of `BUCKET_TOKENS` (`batch::FixedWidthLayout`); one graph per width.
//!   Everything else that varies is a value in a tensor: token ids, per-document
//!   positions, each position's document (the attention mask is built from it on the
//!   device, `document_mask`), each position's target (cross-entropy over the whole
//!   width, ignoring the untrained ones), and the step's loss scale.
//! - **No host work inside.** The recorded body is `step::forward_backward` without
//!   reading the loss: the window's loss sums stay on the device and are read once per
//!   optimizer step. Nor does it reseed: the generator is seeded from the micro-batch's
//!   position before each replay, and a recorded graph's dropout kernels draw from the
//!   seed the generator holds at replay (libtorch registers the default CUDA generator
//!   with every graph), so LoRA dropout masks are a function of the position, as in the
//!   eager step (each layer's masks are not reseeded per layer, though, so gradient
//!   checkpointing, whose recomputed layers must draw the forward's masks again, needs
//!   `--lora-dropout 0`).
//! - **Data parallelism.** The backward passes are inside the graphs, so a rank's
//!   gradient sums start after its window rather than layer by layer during it
//!   (`rank_sums.rs`); the masks' seeds follow the global micro-batch position, so
//!   results do not depend on the world size.
//! - **Tensors that stay put.** The inputs are copied into the same tensors before
//!   every replay; the gradients are added into the same `.grad` tensors, so the
//!   optimizer zeroes them in place instead of dropping them (`AdamW::keep_grads`).
//!   Recording runs the body once eagerly first (warm-up); it does so at scale 0, so
//!   it adds zeros to the gradients.
//! - **Memory.** Every width's graph records into one shared pool: they are never
//!   replayed at once and keep nothing across replays but their loss outputs, so the
//!   pool holds what the widest graph needs.
//!
//! The update after the window (clipping and AdamW over every trained tensor: ~20
//! small kernels per tensor, half of a 7B full fine-tune's step) is recorded too, once:
//! clipping computes its coefficient on the device (`AdamW::clip_grad_norm_on_device`)
//! and the per-step numbers (learning rate, bias corrections) are device scalars
//! filled in before each replay (`DeviceStepValues`), so one graph serves every step.
//! Recording runs the body once for real first: that run is the step's update. Not
//! recorded (the eager update runs): `--fp16` (its scaler decides on the host whether
//! to step), `--offload-optimizer` (host copies), `--zero 1` (owners broadcast their
//! tensors), and a step at learning rate 0.
//!
//! On the CPU the same fixed-width body runs without a graph (what the tests compare
//! with the packed eager step). If recording fails on a GPU, the message is printed
//! once and training goes on without graphs.

use std::collections::BTreeMap;

use anyhow::{Result, anyhow};
use tch::{Device, Kind, Reduction, Tensor};

use super::loss_scale::LossScaler;
use super::offload::StatePlacement;
use super::optim::{AdamW, DeviceStepValues};
use super::rank_sums::RankSums;
use super::step::{
    MicroBatch, StepOutcome, StepSettings, apply_update, dropout_seed, forward_backward,
};
use crate::batch::{FixedWidthLayout, bucket_width};
use crate::cuda::graph::{CudaGraph, GraphPool};
use crate::distributed::Distributed;
use crate::encode::{Encoded, IGNORE_INDEX};
use crate::model::Llama;
use crate::model::llama::{LayerContext, document_mask};
use crate::profile;

/// Widths are multiples of this many tokens: fewer graphs to record (each costs about
/// two eager micro-batches once) against padding computed for nothing (on a GPU bound
/// by launches, nearly free).
pub const BUCKET_TOKENS: usize = 128;

/// The tensors a recorded graph reads at one width. Each micro-batch's values are
/// copied into them before a replay; their storage never moves.
struct FixedInputs {
    /// [4, W] int64: token ids, positions, documents, targets (one host-to-device copy).
    table: Tensor,
    input_ids: Tensor,
    positions: Tensor,
    documents: Tensor,
    targets: Tensor,
    /// [] f32: the loss scale x 1 / the window's answer tokens.
    scale: Tensor,
    /// `Answers::label_smoothing`, fixed for the run (a constant of the recording).
    label_smoothing: f64,
}

impl FixedInputs {
    fn new(width: usize, device: Device, label_smoothing: f64) -> FixedInputs {
        let width = width as i64;
        let table = Tensor::zeros([4, width], (Kind::Int64, device));
        FixedInputs {
            input_ids: table.get(0).view([1, width]),
            positions: table.get(1).view([1, width]),
            documents: table.get(2),
            targets: table.get(3),
            table,
            scale: Tensor::zeros([], (Kind::Float, device)),
            label_smoothing,
        }
    }

    fn fill(&mut self, layout: &FixedWidthLayout, scale: f64) {
        let values: Vec<i64> = [
            &layout.input_ids,
            &layout.positions,
            &layout.documents,
            &layout.targets,
        ]
        .into_iter()
        .flatten()
        .copied()
        .collect();
        self.table.copy_(&Tensor::from_slice(&values).view([4, -1]));
        let _ = self.scale.fill_(scale);
    }
}

impl MicroBatch for FixedInputs {
    fn input_ids(&self) -> &Tensor {
        &self.input_ids
    }

    fn layer_context(&self, model: &Llama) -> LayerContext {
        let mut context = model.context(&self.input_ids, &self.positions, None, None);
        context.mask = Some(document_mask(&self.documents, model.kind));
        context
    }

    fn loss_sum(&self, model: &Llama, normed: &Tensor) -> Tensor {
        let hidden_size = normed.size()[2];
        model
            .logits(&normed.reshape([-1, hidden_size]))
            .to_kind(Kind::Float)
            .cross_entropy_loss::<Tensor>(
                &self.targets,
                None,
                Reduction::Sum,
                IGNORE_INDEX,
                self.label_smoothing,
            )
    }

    /// The recorded width (NEFTune, the only reader, is refused with --cuda-graphs).
    fn padded_length(&self) -> i64 {
        self.input_ids.size()[1]
    }
}

/// The recorded work: forward and backward of the micro-batch in `inputs`, gradients
/// scaled by `inputs.scale`; returns the loss sum.
fn body(model: &Llama, inputs: &FixedInputs, flags: (bool, bool)) -> Result<Tensor> {
    forward_backward(
        model,
        inputs,
        None,
        flags,
        &|sum| sum * &inputs.scale,
        &mut |_| true,
        &mut |_| Ok(()),
    )
}

/// One width's inputs and, on a GPU, its recorded graph and the loss it writes.
struct Bucket {
    inputs: FixedInputs,
    recorded: Option<(CudaGraph, Tensor)>,
}

/// train_summary.json's account of `--cuda-graphs`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GraphsSummary {
    /// The widths micro-batches were laid out at.
    pub widths: Vec<usize>,
    /// Those with a recorded graph (none on the CPU).
    pub recorded_widths: Vec<usize>,
    /// Why recording failed, if it did (the rest of the run went without graphs).
    pub failure: Option<String>,
    /// Whether the update (clip + AdamW) was recorded.
    pub update_recorded: bool,
    /// Why recording the update failed, if it did.
    pub update_failure: Option<String>,
}

/// The recorded micro-steps of a run, one per width.
pub struct GraphedSteps {
    device: Device,
    /// (gradient checkpointing, full fine-tune)
    flags: (bool, bool),
    /// `--label-smoothing-factor`, recorded into every micro-batch's loss.
    label_smoothing: f64,
    pool: Option<GraphPool>,
    buckets: BTreeMap<usize, Bucket>,
    /// Why recording failed, if it did: training then goes on without graphs.
    failure: Option<String>,
    /// The recorded update (clip + AdamW) and the gradient norm it writes.
    update: Option<(CudaGraph, Tensor)>,
    /// The per-step numbers the recorded update reads.
    step_values: Option<DeviceStepValues>,
    /// Why recording the update failed, if it did (the eager update runs instead).
    update_failure: Option<String>,
}

impl GraphedSteps {
    pub fn new(
        device: Device,
        checkpointing: bool,
        full: bool,
        label_smoothing: f64,
    ) -> GraphedSteps {
        GraphedSteps {
            device,
            label_smoothing,
            flags: (checkpointing, full),
            pool: None,
            buckets: BTreeMap::new(),
            failure: None,
            update: None,
            step_values: None,
            update_failure: None,
        }
    }

    /// The shared memory pool, made on first use.
    fn pool(&mut self) -> Result<GraphPool, String> {
        match self.pool {
            Some(pool) => Ok(pool),
            None => {
                let pool = GraphPool::new()?;
                self.pool = Some(pool);
                Ok(pool)
            }
        }
    }

    /// False once a recording failed (the train loop then uses the eager step).
    pub fn usable(&self) -> bool {
        self.failure.is_none()
    }

    /// What was recorded, for train_summary.json.
    pub fn summary(&self) -> GraphsSummary {
        GraphsSummary {
            recorded_widths: self
                .buckets
                .iter()
                .filter(|(_, bucket)| bucket.recorded.is_some())
                .map(|(&width, _)| width)
                .collect(),
            widths: self.buckets.keys().copied().collect(),
            failure: self.failure.clone(),
            update_recorded: self.update.is_some(),
            update_failure: self.update_failure.clone(),
        }
    }

    /// Forward and backward pass of the micro-batch `rows`, gradients scaled by `scale`
    /// and added into `.grad`; its loss sum is added to `loss_total` on the device.
    /// `dropout_seed`: what the generator is seeded with before the pass.
    fn micro_step(
        &mut self,
        model: &Llama,
        rows: &[&Encoded],
        (scale, dropout_seed): (f64, i64),
        loss_total: &mut Tensor,
    ) -> Result<()> {
        let tokens = rows.iter().map(|r| r.input_ids.len()).sum();
        let width = bucket_width(tokens, BUCKET_TOKENS);
        let layout = FixedWidthLayout::new(rows, width);
        let (device, flags, label_smoothing) = (self.device, self.flags, self.label_smoothing);
        let to_record = device.is_cuda()
            && self.failure.is_none()
            && self
                .buckets
                .get(&width)
                .is_none_or(|bucket| bucket.recorded.is_none());
        let pool = to_record.then(|| self.pool());
        let bucket = self.buckets.entry(width).or_insert_with(|| Bucket {
            inputs: FixedInputs::new(width, device, label_smoothing),
            recorded: None,
        });
        if let Some(pool) = pool {
            // The warm-up run before recording adds its gradients too: zeros at scale 0.
            bucket.inputs.fill(&layout, 0.0);
            let inputs = &bucket.inputs;
            let recorded = pool.and_then(|pool| {
                CudaGraph::capture_in(Some(pool), || {
                    body(model, inputs, flags).map_err(|e| e.to_string())
                })
            });
            match recorded {
                Ok((graph, Ok(loss))) => bucket.recorded = Some((graph, loss)),
                Ok((_, Err(why))) | Err(why) => {
                    eprintln!(
                        "warning: --cuda-graphs: recording the step at width {width} failed; \
                         training goes on without graphs: {why}"
                    );
                    self.failure = Some(why);
                }
            }
        }
        bucket.inputs.fill(&layout, scale);
        tch::manual_seed(dropout_seed);
        let loss = match &bucket.recorded {
            Some((graph, loss)) => {
                graph
                    .replay()
                    .map_err(|why| anyhow!("replaying the recorded step: {why}"))?;
                loss.shallow_clone()
            }
            None => body(model, &bucket.inputs, flags)?,
        };
        // Enqueued after the replay and before the next one rewrites `loss`.
        *loss_total += loss;
        Ok(())
    }

    /// The update after the window (clip to `max_grad_norm`, AdamW at `lr`) from the
    /// recorded graph, recording it on first use; returns the gradients' norm before
    /// clipping, or `None` when this step needs the eager update (see the module
    /// notes; the optimizer is then untouched).
    fn recorded_update(
        &mut self,
        optimizer: &mut AdamW,
        max_grad_norm: f64,
        lr: f64,
    ) -> Result<Option<f64>> {
        let recordable = self.update_failure.is_none()
            && optimizer.placement == StatePlacement::WithWeights
            && optimizer.owners.is_none()
            && lr > 0.0;
        if !recordable {
            return Ok(None);
        }
        let device = self.device;
        let pool = if device.is_cuda() {
            match self.pool() {
                Ok(pool) => Some(pool),
                Err(why) => {
                    self.update_failure = Some(why);
                    return Ok(None);
                }
            }
        } else {
            None
        };
        let constants = optimizer.begin_step(lr);
        let values = self
            .step_values
            .get_or_insert_with(|| DeviceStepValues::new(device));
        values.fill(&constants, optimizer.eps, optimizer.weight_decay);
        let Some(pool) = pool else {
            // The CPU: the same body, without a graph (what the tests run).
            let norm = optimizer.clip_grad_norm_on_device(max_grad_norm);
            optimizer.update_all_from_device(values);
            optimizer.zero_grad();
            return Ok(Some(norm.map_or(0.0, |n| n.double_value(&[]))));
        };
        if let Some((graph, norm)) = &self.update {
            graph
                .replay()
                .map_err(|why| anyhow!("replaying the recorded update: {why}"))?;
            let norm = norm.double_value(&[]);
            optimizer.zero_grad();
            return Ok(Some(norm));
        }
        // The first run inside the recording (its warm-up) is this step's update.
        let values = self.step_values.as_ref().expect("filled above");
        let mut warm_up_norm: Option<Tensor> = None;
        let mut runs = 0;
        let recorded = CudaGraph::capture_in(Some(pool), || {
            let norm = optimizer
                .clip_grad_norm_on_device(max_grad_norm)
                .unwrap_or_else(|| Tensor::zeros([], (Kind::Float, device)));
            optimizer.update_all_from_device(values);
            if runs == 0 {
                warm_up_norm = Some(norm.copy());
            }
            runs += 1;
            norm
        });
        let Some(norm) = warm_up_norm else {
            // The update stopped part-way: the weights cannot be trusted.
            anyhow::bail!(
                "the optimizer step failed part-way ({}); resume from the last checkpoint",
                recorded.err().unwrap_or_default()
            );
        };
        match recorded {
            Ok((graph, recorded_norm)) => self.update = Some((graph, recorded_norm)),
            Err(why) => {
                eprintln!(
                    "warning: --cuda-graphs: recording the optimizer step failed; it runs \
                     eagerly from now on: {why}"
                );
                self.update_failure = Some(why);
            }
        }
        let norm = norm.double_value(&[]);
        optimizer.zero_grad();
        Ok(Some(norm))
    }
}

/// One optimizer step whose micro-batches (`micro_rows`, the rows of each) run as
/// recorded graphs, then the recorded update (or the eager one, `step::apply_update`).
/// `group`: data parallelism, as in `step::optimizer_step` (this rank's micro-batches;
/// the gradients are summed across ranks after the window, not overlapped with it: the
/// backward passes are inside the graphs).
pub fn optimizer_step_graphed(
    model: &Llama,
    optimizer: &mut AdamW,
    graphs: &mut GraphedSteps,
    micro_rows: &[Vec<&Encoded>],
    settings: &StepSettings,
    scaler: Option<&mut LossScaler>,
    group: Option<&Distributed>,
) -> Result<StepOutcome> {
    profile::start();
    let loss_scale = scaler.as_ref().map_or(1.0, |s| s.scale);
    // A rank without a micro-batch in a short last window runs one at weight 0.
    let weight = settings.weight();
    let mut total = Tensor::zeros([], (Kind::Float, model.device));
    for (index, rows) in micro_rows.iter().enumerate() {
        let seed = dropout_seed(settings.seed, settings.micro_position(index), 0);
        let scale = loss_scale * settings.token_scale * weight;
        graphs.micro_step(model, rows, (scale, seed), &mut total)?;
    }
    profile::mark("forward + backward (graphs)");
    // The step's one read of the loss.
    let mut value = total.double_value(&[]) * weight;
    if let Some(group) = group {
        // Each rank's gradients carry 1 / the whole window's answer tokens already.
        value = RankSums::new(group, optimizer, model).finish(optimizer, value)?;
        profile::mark("all-reduce");
    }
    let mut outcome = StepOutcome::default();
    if value.is_finite() {
        outcome.loss_sum = value;
    } else {
        // The backward passes ran anyway (a graph cannot skip them): the step is not
        // taken, as in the eager step, and with f16 the scaler halves its scale.
        outcome.nonfinite_loss = Some(value);
        if scaler.is_none() {
            optimizer.zero_grad();
            return Ok(outcome);
        }
    }
    if scaler.is_none()
        && let Some(norm) =
            graphs.recorded_update(optimizer, settings.max_grad_norm, settings.lr)?
    {
        outcome.grad_norm = Some(norm);
        profile::mark("clip + optimizer (graph)");
        return Ok(outcome);
    }
    apply_update(optimizer, outcome, settings, scaler, loss_scale, group)
}
