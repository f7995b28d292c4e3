//! Updating bf16 weights without an f32 master copy (`--optim adamw-bf16` and
//! `adamw-8bit`): what rounding the updated value to bf16 loses is kept in a bf16
//! buffer and added back at the next update (Kahan summation), so updates far below
//! bf16's resolution still accumulate. 2 bytes per parameter.
//!
//! Cheaper layouts were measured and trained worse on the quality check's first form
//! (SmolLM2, 50 full fine-tune steps at batch 1 on the sample data, eval loss against
//! f32 AdamW, whose own noise was 1-1.5 %; this buffer: -0.4 %):
//! stochastic rounding of the weights, no buffer at all: +9.7 %; stochastic rounding
//! of the seven projections only, this buffer for norms and embeddings (which would
//! have kept a 7B's buffer to ~1 GB): +7.1 % (adamw 0.5343, this buffer 0.5320, that
//! mix 0.5722 on the sample data); an int8 per weight counting 1/256ths of its bf16
//! spacing (a 24-bit weight): +5.5 % rounded to nearest, +7.7 % rounded
//! stochastically. The 1 % bar wins over the memory.

use std::collections::BTreeMap;

use tch::{Kind, Tensor};

use super::moments::OptimKind;

/// The bf16 residual of every weight of one tensor.
pub struct Compensation(Tensor);

impl Compensation {
    /// The compensation a bf16 weight gets under `kind` (none for f32 weights or
    /// `adamw`, which keeps an f32 master instead).
    pub fn for_weight(kind: OptimKind, weight: &Tensor) -> Option<Compensation> {
        (weight.kind() == Kind::BFloat16 && kind != OptimKind::AdamW)
            .then(|| Compensation(weight.zeros_like()))
    }

    /// Writes `target` (the updated f32 values) into the bf16 `weight`, adding what
    /// earlier roundings lost and keeping what this one loses.
    pub fn round_into(&mut self, target: &Tensor, weight: &mut Tensor) {
        let exact = target + self.0.to_kind(Kind::Float);
        let rounded = exact.to_kind(Kind::BFloat16);
        self.0.copy_(&(&exact - rounded.to_kind(Kind::Float)));
        weight.copy_(&rounded);
    }

    /// Values `start..start + length` of the flattened buffer, as a view.
    pub fn chunk(&self, start: i64, length: i64) -> Compensation {
        Compensation(self.0.view([-1]).narrow(0, start, length))
    }

    /// The buffer replaced by `f(buffer)` (a device copy of host state, `offload.rs`).
    pub fn map_tensor(&self, f: impl Fn(&Tensor) -> Tensor) -> Compensation {
        Compensation(f(&self.0))
    }

    /// The buffer itself, to write an updated copy back into.
    pub fn tensor_mut(&mut self) -> &mut Tensor {
        &mut self.0
    }

    /// The buffer, read-only.
    pub fn tensor(&self) -> &Tensor {
        &self.0
    }

    pub fn state(&self, name: &str, into: &mut BTreeMap<String, Tensor>) {
        into.insert(format!("compensation.{name}"), self.0.shallow_clone());
    }

    pub fn restore(&mut self, name: &str, from: &BTreeMap<String, Tensor>) -> anyhow::Result<()> {
        let key = format!("compensation.{name}");
        let saved = from
            .get(&key)
            .ok_or_else(|| anyhow::anyhow!("optimizer state has no {key}"))?;
        tch::no_grad(|| self.0.copy_(saved));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Many updates each a tenth of a bf16 ulp: plain rounding loses every one of
    /// them, the compensation keeps them.
    #[test]
    fn tiny_updates_accumulate() {
        let start = 0.1f32;
        let count = 300;
        let step = 0.1 * 2f32.powi(-11); // a tenth of the ulp of values in [2^-4, 2^-3)
        let mut weight = Tensor::from_slice(&[start; 16]).to_kind(Kind::BFloat16);
        let initial = weight.to_kind(Kind::Float).double_value(&[0]);
        let mut compensation = Compensation::for_weight(OptimKind::AdamWBf16, &weight).unwrap();
        for _ in 0..count {
            let target = weight.to_kind(Kind::Float) + step as f64;
            compensation.round_into(&target, &mut weight);
        }
        let reached = weight.to_kind(Kind::Float).double_value(&[0]);
        let expected = initial + count as f64 * step as f64;
        assert!(
            (reached - expected).abs() <= 2f64.powi(-11),
            "{reached} vs {expected}"
        );
        // Without compensation the weight would not have moved at all.
        let plain = (Tensor::from_slice(&[initial as f32]) + step as f64).to_kind(Kind::BFloat16);
        assert_eq!(plain.to_kind(Kind::Float).double_value(&[0]), initial);
        assert!(Compensation::for_weight(OptimKind::AdamW, &weight).is_none());
        let f32_weight = Tensor::zeros([4], (Kind::Float, tch::Device::Cpu));
        assert!(Compensation::for_weight(OptimKind::AdamW8bit, &f32_weight).is_none());
    }
}
