//! Data parallelism's gradient sums, overlapped with the backward pass as DDP overlaps
//! its bucketed all-reduce: the trained tensors are summed across ranks in a fixed
//! order of groups (each decoder layer's from the top layer down, then the rest: final
//! norm, lm_head and embedding, with the step's loss). A layer's group starts as soon
//! as the window's last backward pass is done with it (gradient checkpointing walks the
//! layers from the top, `super::step::micro_step_with`), so its sum travels while the
//! layers below are still computing; whatever has not started when the backward pass
//! ends starts then. Every rank starts the same groups in the same order, which is
//! what the backends require.

use anyhow::Result;
use tch::{Kind, Tensor};

use super::optim::AdamW;
use super::step::Stages;
use crate::distributed::{Distributed, Pending};
use crate::model::Llama;

/// Groups whose sums may be under way at once. Each holds a flat copy of its
/// gradients (a 7B full fine-tune's layer: ~400 MB in bf16), so starting one more
/// first finishes the oldest: memory stays bounded while the sums of the next few
/// layers still overlap the backward pass (under NCCL finishing one only makes the
/// compute stream wait for it; the host goes on).
const MAX_IN_FLIGHT: usize = 4;

pub struct RankSums<'a> {
    group: &'a Distributed,
    /// The optimizer's tensors (indices) of each decoder layer.
    layers: Vec<Vec<usize>>,
    /// The others (final norm, lm_head, embedding).
    rest: Vec<usize>,
    /// Layers 0..unstarted have not started their sums yet.
    unstarted: usize,
    in_flight: Vec<Pending>,
}

impl<'a> RankSums<'a> {
    pub fn new(group: &'a Distributed, optimizer: &AdamW, model: &Llama) -> RankSums<'a> {
        let stages = Stages::new(optimizer, model);
        let mut rest = stages.top;
        rest.extend(stages.embed);
        Self::with_groups(group, stages.layers, rest)
    }

    fn with_groups(
        group: &'a Distributed,
        layers: Vec<Vec<usize>>,
        rest: Vec<usize>,
    ) -> RankSums<'a> {
        RankSums {
            group,
            unstarted: layers.len(),
            layers,
            rest,
            in_flight: Vec::new(),
        }
    }

    /// The window's last backward pass is done with decoder `layer` (and every layer
    /// above it): their sums start.
    pub fn layer_done(&mut self, optimizer: &AdamW, layer: usize) -> Result<()> {
        while self.unstarted > layer {
            self.unstarted -= 1;
            let indices = self.layers[self.unstarted].clone();
            self.start(optimizer, &indices, None)?;
        }
        Ok(())
    }

    /// After the backward pass: starts what has not started (the remaining layers,
    /// then the rest with `local_loss`), waits for all of it, and returns the loss
    /// summed over the ranks. The gradients then hold the sums.
    pub fn finish(mut self, optimizer: &AdamW, local_loss: f64) -> Result<f64> {
        self.layer_done(optimizer, 0)?;
        let rest = self.rest.clone();
        let loss = Tensor::from_slice(&[local_loss]);
        self.start(optimizer, &rest, Some(&loss))?;
        for pending in self.in_flight.drain(..) {
            pending.finish()?;
        }
        Ok(loss.double_value(&[0]))
    }

    fn start(&mut self, optimizer: &AdamW, indices: &[usize], loss: Option<&Tensor>) -> Result<()> {
        // A rank whose micro-batches all had a non-finite loss ran no backward pass, so
        // before its first step it has no gradients yet: give them zeros (a backward
        // pass of 0 x sum), so every rank sends the same tensors.
        for &index in indices {
            let param = &optimizer.params[index].param;
            if !param.grad().defined() {
                (param.sum(Kind::Float) * 0.0).backward();
            }
        }
        let grads: Vec<Tensor> = indices
            .iter()
            .map(|&index| optimizer.params[index].param.grad())
            .collect();
        let mut tensors: Vec<&Tensor> = grads.iter().collect();
        tensors.extend(loss);
        if !tensors.is_empty() {
            if self.in_flight.len() == MAX_IN_FLIGHT {
                self.in_flight.remove(0).finish()?;
            }
            self.in_flight.push(self.group.start_sum(&tensors)?);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distributed::on_two_gloo_ranks;
    use tch::Device;

    /// Two ranks (threads) with six "layers" of one tensor each and one other tensor:
    /// the sums start layer by layer as the backward pass reports them, in the fixed
    /// order, at most MAX_IN_FLIGHT at a time, and end as the element-wise sums with
    /// the summed loss.
    #[test]
    fn layers_start_their_sums_as_they_complete() {
        let ranks = on_two_gloo_ranks(|rank, group| {
            let params: Vec<(String, Tensor, bool)> = (0..7)
                .map(|i| {
                    let t = Tensor::zeros([3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
                    (format!("p{i}"), t, false)
                })
                .collect();
            let optimizer = AdamW::new(params, 0.0);
            // Gradients: (rank + 1) x (index + 1).
            for (i, p) in optimizer.params.iter().enumerate() {
                (p.param.sum(Kind::Float) * ((rank + 1) * (i + 1)) as f64).backward();
            }
            let layers = (0..6).map(|i| vec![i]).collect();
            let mut sums = RankSums::with_groups(&group, layers, vec![6]);
            sums.layer_done(&optimizer, 5).unwrap();
            assert_eq!(sums.in_flight.len(), 1, "the top layer started alone");
            // Reporting layer 3 starts layer 4 too, in order.
            sums.layer_done(&optimizer, 3).unwrap();
            assert_eq!(sums.in_flight.len(), 3);
            sums.layer_done(&optimizer, 0).unwrap();
            assert_eq!(sums.in_flight.len(), MAX_IN_FLIGHT);
            let loss = sums.finish(&optimizer, rank as f64 + 0.5).unwrap();
            let grads: Vec<Vec<f32>> = optimizer
                .params
                .iter()
                .map(|p| Vec::<f32>::try_from(p.param.grad()).unwrap())
                .collect();
            (loss, grads)
        });
        for (loss, grads) in ranks {
            assert_eq!(loss, 2.0);
            for (i, grad) in grads.iter().enumerate() {
                // (1 + 2) x (i + 1) on both ranks.
                assert_eq!(grad, &vec![3.0 * (i + 1) as f32; 3], "tensor {i}");
            }
        }
    }
}
