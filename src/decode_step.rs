//! The decode step of continuous batching (one token for every slot), run eagerly or
//! replayed from a CUDA graph.
//!
//! Why a graph: a batch-1 decode step of a 7B issues ~1,000 small kernels. Eagerly,
//! the host spends longer launching them than the GPU spends reading the weights, so
//! decoding runs far below the memory-bandwidth limit. Recorded once as a CUDA graph
//! (`cuda::graph`), the step is one launch per token.
//!
//! What makes the step recordable: its inputs (token ids and positions, [slots, 1])
//! live in static device buffers that each step overwrites before the replay; the KV
//! cache is preallocated for the whole run (`KvCache::slots`) and written in place at
//! each row's own position; attention reads the whole cache under a mask built on the
//! device from the positions, so no shape changes between steps. One graph per run
//! (slots x capacity are fixed for it).
//!
//! On the CPU there are no graphs; `DecodeMode::Graph` then re-runs the same step over
//! the same static buffers, which is what the CPU tests check against the eager path
//! (a step that kept a tensor from its first run instead of reading the buffers would
//! give different tokens there).

use anyhow::{Result, anyhow};
use tch::{Device, Kind, Tensor};

use crate::cuda::graph::CudaGraph;
use crate::model::{KvCache, Llama};

/// How the decode step runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DecodeMode {
    /// New input tensors and a fresh launch of every kernel at each step.
    Eager,
    /// Static input buffers; on CUDA the step is captured once as a CUDA graph and
    /// replayed (falling back to eager, with a warning, if capture fails).
    #[default]
    Graph,
}

/// The decode step for one run of continuous batching.
pub struct DecodeStep {
    mode: DecodeMode,
    /// Static buffers, [slots, 1] int64, on the model's device (Graph mode).
    ids: Option<Tensor>,
    positions: Option<Tensor>,
    /// The recorded step and its output (f32 logits [slots, vocab], rewritten by each replay).
    graph: Option<(CudaGraph, Tensor)>,
}

/// Logits (f32, [slots, vocab]) of one token per slot at its own position.
fn step(model: &Llama, ids: &Tensor, positions: &Tensor, cache: &mut KvCache) -> Tensor {
    let hidden = model.decode_slots(ids, positions, cache);
    model.logits(&hidden.select(1, 0)).to_kind(Kind::Float)
}

impl DecodeStep {
    pub fn new(mode: DecodeMode) -> DecodeStep {
        DecodeStep {
            mode,
            ids: None,
            positions: None,
            graph: None,
        }
    }

    /// Whether the step is being replayed from a CUDA graph.
    pub fn is_graphed(&self) -> bool {
        self.graph.is_some()
    }

    /// Whether the next `run` on `device` records the graph (the first step on CUDA,
    /// which costs a capture besides the step).
    pub fn records_next(&self, device: Device) -> bool {
        self.mode == DecodeMode::Graph && self.graph.is_none() && matches!(device, Device::Cuda(_))
    }

    /// Logits for `ids` at `positions` (one per slot), writing the cache.
    pub fn run(
        &mut self,
        model: &Llama,
        cache: &mut KvCache,
        ids: &[i64],
        positions: &[i64],
    ) -> Result<Tensor> {
        let shape = [ids.len() as i64, 1];
        let host_ids = Tensor::from_slice(ids).view(shape);
        let host_positions = Tensor::from_slice(positions).view(shape);
        if self.mode == DecodeMode::Eager {
            return Ok(step(
                model,
                &host_ids.to_device(model.device),
                &host_positions.to_device(model.device),
                cache,
            ));
        }
        let device = model.device;
        let mut ids_buffer = self
            .ids
            .get_or_insert_with(|| Tensor::zeros(shape, (Kind::Int64, device)))
            .shallow_clone();
        let mut positions_buffer = self
            .positions
            .get_or_insert_with(|| Tensor::zeros(shape, (Kind::Int64, device)))
            .shallow_clone();
        anyhow::ensure!(
            ids_buffer.size() == shape,
            "the decode step was set up for {:?} slots, not {:?}",
            ids_buffer.size(),
            shape
        );
        ids_buffer.copy_(&host_ids);
        positions_buffer.copy_(&host_positions);
        if let Some((graph, logits)) = &self.graph {
            graph
                .replay()
                .map_err(|e| anyhow!("replaying the decode graph: {e}"))?;
            return Ok(logits.shallow_clone());
        }
        if matches!(device, Device::Cuda(_)) {
            match CudaGraph::capture(|| step(model, &ids_buffer, &positions_buffer, cache)) {
                Ok((graph, logits)) => {
                    graph
                        .replay()
                        .map_err(|e| anyhow!("replaying the decode graph: {e}"))?;
                    self.graph = Some((graph, logits.shallow_clone()));
                    return Ok(logits);
                }
                Err(message) => {
                    tracing::warn!(
                        "the decode step could not be captured as a CUDA graph ({message}); decoding eagerly"
                    );
                    self.mode = DecodeMode::Eager;
                }
            }
        }
        // CPU (or a failed capture): the same step over the static buffers.
        Ok(step(model, &ids_buffer, &positions_buffer, cache))
    }
}
