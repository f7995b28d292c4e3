//! Updating bf16 weights without an f32 master copy: what rounding the updated value
//! to bf16 loses is kept and added back at the next update (Kahan summation), so
//! updates far below bf16's resolution still accumulate. Two ways to keep it:
//! - `Bf16`: a bf16 buffer of the residual (`--optim adamw-bf16`, and small tensors
//!   under `adamw-8bit`): 2 bytes per parameter.
//! - `Ulp8`: an int8 per parameter counting 1/256ths of the weight's bf16 spacing (ulp)
//!   (`--optim adamw-8bit`, tensors of 4096 values or more): 1 byte per parameter.
//!   Together with the weight this is a 24-bit number, bf16 plus 8 more bits; it is
//!   what keeps the 8-bit optimizer at 5 bytes per parameter. The count is rounded
//!   stochastically (seeded by step and tensor, so resumes are exact): rounded to
//!   nearest, residuals under 1/512 ulp were always lost and the check below measured
//!   +5.5 %. Stochastic rounding of the weights themselves (no buffer at all) was
//!   measured first and trained clearly worse (SmolLM2, 50 full fine-tune steps:
//!   eval loss +9.7 % over f32 AdamW).

use std::collections::BTreeMap;

use tch::{Kind, Tensor};

use super::moments::OptimKind;

/// Tensors below this size keep a bf16 residual (as bitsandbytes keeps their moments
/// in f32): norms, whose weights sit near 1 where 1/256 of an ulp is coarse.
const SMALL_TENSOR: i64 = 4096;

pub enum Compensation {
    Bf16(Tensor),
    Ulp8(Tensor),
}

impl Compensation {
    /// The compensation a bf16 weight gets under `kind` (none for f32 weights or
    /// `adamw`, which keeps an f32 master instead).
    pub fn for_weight(kind: OptimKind, weight: &Tensor) -> Option<Compensation> {
        if weight.kind() != Kind::BFloat16 {
            return None;
        }
        match kind {
            OptimKind::AdamW => None,
            OptimKind::AdamW8bit if weight.numel() as i64 >= SMALL_TENSOR => Some(
                Compensation::Ulp8(Tensor::zeros(weight.size(), (Kind::Int8, weight.device()))),
            ),
            _ => Some(Compensation::Bf16(weight.zeros_like())),
        }
    }

    /// Writes `target` (the updated f32 values, computed from the current weight) into
    /// the bf16 `weight`, adding what earlier roundings lost and keeping what this one
    /// loses. `seed` makes the int8 layout's stochastic rounding of its count
    /// reproducible (the optimizer derives it from the step and the tensor).
    pub fn round_into(&mut self, target: &Tensor, weight: &mut Tensor, seed: i64) {
        match self {
            Compensation::Bf16(residual) => {
                let exact = target + residual.to_kind(Kind::Float);
                let rounded = exact.to_kind(Kind::BFloat16);
                residual.copy_(&(&exact - rounded.to_kind(Kind::Float)));
                weight.copy_(&rounded);
            }
            Compensation::Ulp8(counts) => {
                let spacing = bf16_spacing(&weight.to_kind(Kind::Float)) / 256.0;
                let exact = target + counts.to_kind(Kind::Float) * spacing;
                let rounded = exact.to_kind(Kind::BFloat16);
                let rounded32 = rounded.to_kind(Kind::Float);
                let residual = (&exact - &rounded32) / (bf16_spacing(&rounded32) / 256.0);
                // Rounded stochastically (floor of residual + U[0, 1)): a residual below
                // 1/256 of an ulp is kept in expectation instead of always lost.
                tch::manual_seed(seed);
                let noise = residual.rand_like();
                let count = (residual + noise).floor().clamp(-127.0, 127.0);
                counts.copy_(&count.to_kind(Kind::Int8));
                weight.copy_(&rounded);
            }
        }
    }

    /// The checkpoint key: the two layouts are not interchangeable.
    fn key(&self, name: &str) -> String {
        match self {
            Compensation::Bf16(_) => format!("compensation.{name}"),
            Compensation::Ulp8(_) => format!("compensation_ulp8.{name}"),
        }
    }

    fn tensor(&mut self) -> &mut Tensor {
        match self {
            Compensation::Bf16(t) | Compensation::Ulp8(t) => t,
        }
    }

    pub fn state(&self, name: &str, into: &mut BTreeMap<String, Tensor>) {
        let tensor = match self {
            Compensation::Bf16(t) | Compensation::Ulp8(t) => t,
        };
        into.insert(self.key(name), tensor.shallow_clone());
    }

    pub fn restore(&mut self, name: &str, from: &BTreeMap<String, Tensor>) -> anyhow::Result<()> {
        let key = self.key(name);
        let saved = from
            .get(&key)
            .ok_or_else(|| anyhow::anyhow!("optimizer state has no {key}"))?;
        tch::no_grad(|| self.tensor().copy_(saved));
        Ok(())
    }
}

/// The distance from each bf16 value to the next one away from zero (its ulp): the
/// power of two of its exponent times 2^-7. Zero and subnormals get the smallest
/// normal f32's, which leaves their residual at 0.
fn bf16_spacing(values: &Tensor) -> Tensor {
    // 0x7F800000: the f32 exponent bits; masking keeps 2^exponent.
    values
        .contiguous()
        .view_dtype(Kind::Int)
        .bitwise_and(0x7F80_0000i64)
        .view_dtype(Kind::Float)
        .clamp_min(f32::MIN_POSITIVE as f64)
        * 2f64.powi(-7)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn bf16(values: &[f32]) -> Tensor {
        Tensor::from_slice(values).to_kind(Kind::BFloat16)
    }

    #[test]
    fn spacing_is_the_bf16_ulp() {
        let spacing = bf16_spacing(&Tensor::from_slice(&[1.0f32, 1.5, -3.0, 0.0]));
        let values = Vec::<f32>::try_from(&spacing).unwrap();
        assert_eq!(values[..3], [2f32.powi(-7), 2f32.powi(-7), 2f32.powi(-6)]);
        assert!(values[3] > 0.0 && values[3] < 1e-37);
    }

    /// Many updates each a tenth of a bf16 ulp: plain rounding loses all of them, both
    /// compensations keep them (the int8 one to 1/256 of an ulp).
    #[test]
    fn tiny_updates_accumulate_with_either_compensation() {
        let start = 0.1f32;
        let count = 300;
        let step = 0.1 * 2f32.powi(-11); // a tenth of the ulp of values in [2^-4, 2^-3)
        let large = vec![start; SMALL_TENSOR as usize];
        for kind in [OptimKind::AdamWBf16, OptimKind::AdamW8bit] {
            let mut weight = bf16(&large);
            let mut compensation = Compensation::for_weight(kind, &weight).unwrap();
            for i in 0..count {
                let target = weight.to_kind(Kind::Float) + step as f64;
                compensation.round_into(&target, &mut weight, i);
            }
            let reached = weight.to_kind(Kind::Float).double_value(&[0]);
            let expected = (start as f64) + count as f64 * step as f64;
            let ulp = 2f64.powi(-11);
            assert!(
                (reached - expected).abs() <= ulp,
                "{kind:?}: {reached} vs {expected}"
            );
            // Without compensation the weight would not have moved at all.
            let plain = (bf16(&[start]).to_kind(Kind::Float) + step as f64).to_kind(Kind::BFloat16);
            assert_eq!(
                plain.to_kind(Kind::Float).double_value(&[0]),
                bf16(&[start]).to_kind(Kind::Float).double_value(&[0])
            );
        }
        let small = bf16(&[1.0; 10]);
        assert!(matches!(
            Compensation::for_weight(OptimKind::AdamW8bit, &small),
            Some(Compensation::Bf16(_))
        ));
        assert!(Compensation::for_weight(OptimKind::AdamW, &small).is_none());
        let f32_weight = Tensor::zeros([10], (Kind::Float, Device::Cpu));
        assert!(Compensation::for_weight(OptimKind::AdamWBf16, &f32_weight).is_none());
    }
}
