//! Dynamic loss scaling for f16 training (the seed's `--fp16`), as
//! `torch.amp.GradScaler` does it with its defaults: the loss is multiplied by the
//! scale (initially 65536) before the backward pass so small f16 gradients do not
//! flush to zero; the gradients are divided by it before clipping and the step; a step
//! whose gradients hold an inf or NaN is skipped and the scale halved; after 2000
//! clean steps in a row the scale doubles. bf16 and f32 need none of this (bf16 has
//! f32's exponent range), so the scaler is only used with f16.

use serde::{Deserialize, Serialize};

/// torch.amp.GradScaler's defaults.
pub const INIT_SCALE: f64 = 65536.0;
pub const GROWTH_FACTOR: f64 = 2.0;
pub const BACKOFF_FACTOR: f64 = 0.5;
pub const GROWTH_INTERVAL: u32 = 2000;

/// The scaler's state; saved in trainer_state.json so a resumed run continues it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossScaler {
    pub scale: f64,
    /// Clean steps since the last change of scale.
    pub growth_tracker: u32,
    #[serde(default = "default_interval")]
    pub growth_interval: u32,
}

fn default_interval() -> u32 {
    GROWTH_INTERVAL
}

impl LossScaler {
    pub fn new(init_scale: f64) -> LossScaler {
        LossScaler {
            scale: init_scale,
            growth_tracker: 0,
            growth_interval: GROWTH_INTERVAL,
        }
    }

    /// After a step's gradients were unscaled: whether to apply the optimizer step,
    /// and the scale for the next one (GradScaler.update).
    pub fn update(&mut self, found_inf: bool) -> bool {
        if found_inf {
            self.scale *= BACKOFF_FACTOR;
            self.growth_tracker = 0;
            return false;
        }
        self.growth_tracker += 1;
        if self.growth_tracker == self.growth_interval {
            self.scale *= GROWTH_FACTOR;
            self.growth_tracker = 0;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn halves_and_skips_on_overflow_and_doubles_after_the_interval() {
        let mut scaler = LossScaler::new(INIT_SCALE);
        assert!(!scaler.update(true));
        assert_eq!(scaler.scale, 32768.0);
        for _ in 0..GROWTH_INTERVAL - 1 {
            assert!(scaler.update(false));
        }
        assert_eq!(scaler.scale, 32768.0);
        assert!(scaler.update(false));
        assert_eq!((scaler.scale, scaler.growth_tracker), (65536.0, 0));
        // An overflow resets the count of clean steps.
        for _ in 0..10 {
            scaler.update(false);
        }
        scaler.update(true);
        assert_eq!((scaler.scale, scaler.growth_tracker), (32768.0, 0));
    }
}
