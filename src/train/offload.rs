//! `--offload-optimizer`: AdamW's state (moments, master weights, Kahan compensation)
//! kept in host memory instead of on the GPU, as DeepSpeed's ZeRO-Offload
//! (`offload_optimizer: {device: cpu}`) and FSDP's CPU offload keep it. Each tensor's
//! update copies its state to the GPU a chunk at a time (`AdamW::update_chunk`),
//! updates it there with the same kernels, and copies it back; so the results are
//! bit-identical to state kept on the GPU, and the GPU holds one chunk's state at a
//! time. The cost is the traffic: the state crosses the bus twice per optimizer step
//! (for `adamw-8bit` with bf16 weights, 4 bytes per parameter each way).
//!
//! Why: a full 7B fine-tune's optimizer state is 27 GB with 8-bit moments and Kahan
//! compensation, 81 GB with f32 AdamW; only the weights, one stage's gradients and the
//! activations then stay on the card.
//!
//! Host state is pinned (page-locked) when the weights are on CUDA, so copies run at
//! the bus's speed and the copy back does not stall the host; whoever reads it on the
//! host (a checkpoint) waits for the device first (`wait_for_copies`).

use tch::{Device, Tensor};

/// Where the optimizer keeps its per-parameter state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StatePlacement {
    /// Beside the weights (the default).
    #[default]
    WithWeights,
    /// In host memory, copied to the weights' device for each update.
    Host,
}

/// `tensor` moved to host memory for weights on `device`: pinned when `device` is CUDA
/// (falling back to ordinary memory, with a warning, if pinning fails).
pub fn to_host(tensor: Tensor, device: Device) -> Tensor {
    let on_host = tensor.to_device(Device::Cpu);
    if !device.is_cuda() || on_host.numel() == 0 {
        return on_host;
    }
    let pinned = crate::torch_ops::ops()
        .ok_or_else(|| "the ops library is not loaded".to_string())
        .and_then(|ops| ops.pin_memory(&on_host));
    match pinned {
        Ok(pinned) => pinned,
        Err(error) => {
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| {
                tracing::warn!(
                    "could not pin optimizer state in host memory ({error}); copies will be slower"
                );
            });
            on_host
        }
    }
}

/// A copy of host `state` on `device` to update there. Always a fresh tensor, also on
/// the CPU (where the "device" is the host itself), so the update never writes the host
/// state except through `write_back`: the CPU tests exercise the same path as CUDA.
pub fn to_device(state: &Tensor, device: Device) -> Tensor {
    if device == Device::Cpu {
        state.copy()
    } else {
        // From pinned memory the copy is asynchronous and ordered before the kernels
        // that read it.
        state.to_device_(device, state.kind(), true, false)
    }
}

/// Writes `updated` (on the weights' device) back into host `state`. From CUDA the
/// copy is not waited for (ordered on the stream, so a later update of the same state
/// reads it after it lands); `wait_for_copies` before reading host state.
pub fn write_back(state: &mut Tensor, updated: &Tensor) {
    if updated.device().is_cuda()
        && let Some(ops) = crate::torch_ops::ops()
        && ops.copy_async(state, updated).is_ok()
    {
        return;
    }
    state.copy_(updated);
}

/// Waits until every copy back to host memory issued for weights on `device` has landed.
pub fn wait_for_copies(device: Device) {
    if let Device::Cuda(index) = device {
        crate::cuda::synchronize(index);
    }
}
