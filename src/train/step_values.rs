//! The numbers every parameter's AdamW update in one optimizer step shares (learning
//! rate, bias corrections, weight decay), as host scalars or as device scalars that a
//! recorded CUDA graph reads (`graphed_step.rs`).

use tch::{Kind, Tensor};

/// What every parameter's update in one optimizer step shares.
pub struct StepConstants {
    /// The step's number, from 1.
    pub number: i64,
    pub lr: f64,
    /// lr / (1 - beta1^t)
    pub step_size: f64,
    /// sqrt(1 - beta2^t)
    pub bias_correction2_sqrt: f64,
}

impl StepConstants {
    /// The update's denominator sqrt(v) / bc2 + eps, pre-scaled by -1 / step_size so
    /// one addcdiv applies it: (its scale, its shift). Both the host step and the
    /// device scalars of a recorded step take them from here, so they are the same
    /// numbers. `step_size` must not be 0.
    pub(super) fn denominator(&self, eps: f64) -> (f64, f64) {
        let scale = -1.0 / self.step_size;
        (scale / self.bias_correction2_sqrt, eps * scale)
    }
}

/// The per-step numbers of the update as 0-dim f32 tensors on the weights' device, for
/// an optimizer step recorded as a CUDA graph (`graphed_step.rs`): the graph reads
/// them, and each step fills in its values before the replay. They hold exactly what
/// the host-side update passes as scalars (the f64 value rounded to f32), so the two
/// updates are bit-identical. The fused bf16 update (`fused_kahan_update`) reads its
/// numbers from here in every step, recorded or not.
pub struct DeviceStepValues {
    /// 1 - lr x weight decay
    pub(super) decay: Tensor,
    /// -1 / step_size / sqrt(1 - beta2^t): the denominator's scale
    pub(super) denom_scale: Tensor,
    /// -eps / step_size: the denominator's shift
    pub(super) denom_shift: Tensor,
    /// The learning rate and the step's number (the fused kernel's inputs).
    pub(super) lr: Tensor,
    pub(super) number: Tensor,
    /// -lr x weight decay (the fused bf16 update's decoupled weight decay)
    pub(super) neg_lr_decay: Tensor,
}

impl DeviceStepValues {
    pub fn new(device: tch::Device) -> DeviceStepValues {
        let scalar = || Tensor::zeros([], (Kind::Float, device));
        DeviceStepValues {
            decay: scalar(),
            denom_scale: scalar(),
            denom_shift: scalar(),
            lr: scalar(),
            number: scalar(),
            neg_lr_decay: scalar(),
        }
    }

    /// This step's values. At lr 0 (`step.step_size` 0: an update that moves only the
    /// moments) the denominator is +inf, so the op-by-op update adds m / inf = 0 to
    /// the weights (the eager step at lr 0 goes this way when the fused bf16 update
    /// cannot run; a recorded step is never made at lr 0).
    pub fn fill(&mut self, step: &StepConstants, eps: f64, weight_decay: f64) {
        let (scale, shift) = if step.step_size == 0.0 {
            (0.0, f64::INFINITY)
        } else {
            step.denominator(eps)
        };
        let _ = self.decay.fill_(1.0 - step.lr * weight_decay);
        let _ = self.denom_scale.fill_(scale);
        let _ = self.denom_shift.fill_(shift);
        let _ = self.lr.fill_(step.lr);
        let _ = self.number.fill_(step.number as f64);
        let _ = self.neg_lr_decay.fill_(-step.lr * weight_decay);
    }

    pub(super) fn shallow_clone(&self) -> DeviceStepValues {
        DeviceStepValues {
            decay: self.decay.shallow_clone(),
            denom_scale: self.denom_scale.shallow_clone(),
            denom_shift: self.denom_shift.shallow_clone(),
            lr: self.lr.shallow_clone(),
            number: self.number.shallow_clone(),
            neg_lr_decay: self.neg_lr_decay.shallow_clone(),
        }
    }
}

/// Where an update's per-step numbers come from.
#[derive(Clone, Copy)]
pub enum StepValues<'a> {
    /// Host scalars (the eager step).
    Host(&'a StepConstants),
    /// Device scalars a recorded graph reads.
    Device(&'a DeviceStepValues),
}
