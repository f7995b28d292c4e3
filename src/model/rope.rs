//! Rotary position embeddings (rotate-half, as transformers' Llama), with the
//! scaling variants of transformers' `modeling_rope_utils`: default, linear, dynamic
//! (NTK), llama3 and yarn. Frequencies are computed in f32 like PyTorch does.

use std::f64::consts::PI;

use tch::{Device, Kind, Tensor};

use super::config::{LlamaConfig, RopeScaling};

/// Inverse frequencies plus the factor transformers multiplies cos/sin by.
pub struct Rope {
    inv_freq: Tensor,
    attention_scaling: f64,
    dynamic: Option<DynamicNtk>,
    /// `rotate_half` as a [head_dim, head_dim] matrix (on the model's device, in its
    /// compute dtype after `with_matrices_in`).
    rotate_half: Tensor,
    /// The [head_dim, head_dim] identity, for `rotary_matrices`.
    identity: Tensor,
}

struct DynamicNtk {
    factor: f64,
    base: f64,
    dim: i64,
    max_position_embeddings: i64,
}

fn default_inv_freq(base: f64, dim: i64) -> Tensor {
    let exponents = Tensor::arange_start_step(0, dim, 2, (Kind::Int64, Device::Cpu))
        .to_kind(Kind::Float)
        / dim as f64;
    // base ** (2i/d), then 1/x, in f32 as PyTorch computes it.
    let base = Tensor::from(base as f32);
    base.pow(&exponents).reciprocal()
}

/// llama.cpp's `rope_freqs.weight` for llama3 rope scaling (what its converter writes):
/// the factor each frequency is divided by. None for other rope types.
pub fn llama3_frequency_factors(config: &LlamaConfig) -> Option<Vec<f32>> {
    if !matches!(config.rope_scaling, RopeScaling::Llama3 { .. }) {
        return None;
    }
    let scaled = Rope::new(config, Device::Cpu).inv_freq;
    let factors = default_inv_freq(config.rope_theta, config.head_dim as i64) / scaled;
    Vec::<f32>::try_from(&factors).ok()
}

impl Rope {
    pub fn new(config: &LlamaConfig, device: Device) -> Rope {
        let dim = config.head_dim as i64;
        let base = config.rope_theta;
        let mut attention_scaling = 1.0;
        let mut dynamic = None;
        let inv_freq = match &config.rope_scaling {
            RopeScaling::Default => default_inv_freq(base, dim),
            RopeScaling::Linear { factor } => default_inv_freq(base, dim) / *factor,
            RopeScaling::Dynamic { factor } => {
                dynamic = Some(DynamicNtk {
                    factor: *factor,
                    base,
                    dim,
                    max_position_embeddings: config.max_position_embeddings as i64,
                });
                default_inv_freq(base, dim)
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let inv_freq = default_inv_freq(base, dim);
                let low_freq_wavelen = original_max_position_embeddings / low_freq_factor;
                let high_freq_wavelen = original_max_position_embeddings / high_freq_factor;
                let wavelen = inv_freq.reciprocal() * (2.0 * PI);
                let scaled =
                    inv_freq.where_self(&wavelen.le(low_freq_wavelen), &(&inv_freq / *factor));
                let smooth = (wavelen.reciprocal() * *original_max_position_embeddings
                    - *low_freq_factor)
                    / (high_freq_factor - low_freq_factor);
                let smoothed =
                    (smooth.ones_like() - &smooth) * &scaled / *factor + &smooth * &scaled;
                let medium = wavelen
                    .ge(high_freq_wavelen)
                    .logical_and(&wavelen.le(low_freq_wavelen));
                smoothed.where_self(&medium, &scaled)
            }
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                attention_factor,
                beta_fast,
                beta_slow,
                mscale,
                mscale_all_dim,
                truncate,
            } => {
                let get_mscale = |scale: f64, m: f64| {
                    if scale <= 1.0 {
                        1.0
                    } else {
                        0.1 * m * scale.ln() + 1.0
                    }
                };
                attention_scaling = match (attention_factor, mscale, mscale_all_dim) {
                    (Some(a), _, _) => *a,
                    (None, Some(m), Some(all)) if *m != 0.0 && *all != 0.0 => {
                        get_mscale(*factor, *m) / get_mscale(*factor, *all)
                    }
                    _ => get_mscale(*factor, 1.0),
                };
                let correction_dim = |rotations: f64| {
                    (dim as f64 * (original_max_position_embeddings / (rotations * 2.0 * PI)).ln())
                        / (2.0 * base.ln())
                };
                let (mut low, mut high) = (correction_dim(*beta_fast), correction_dim(*beta_slow));
                if *truncate {
                    low = low.floor();
                    high = high.ceil();
                }
                let (low, mut high) = (low.max(0.0), high.min(dim as f64 - 1.0));
                if low == high {
                    high += 0.001;
                }
                let ramp = ((Tensor::arange(dim / 2, (Kind::Float, Device::Cpu)) - low)
                    / (high - low))
                    .clamp(0.0, 1.0);
                let extrapolation_factor = ramp.ones_like() - ramp;
                let pos_freqs = Tensor::from(base as f32).pow(
                    &(Tensor::arange_start_step(0, dim, 2, (Kind::Int64, Device::Cpu))
                        .to_kind(Kind::Float)
                        / dim as f64),
                );
                let extrapolation = pos_freqs.reciprocal();
                let interpolation = (&pos_freqs * *factor).reciprocal();
                &interpolation * (extrapolation_factor.ones_like() - &extrapolation_factor)
                    + &extrapolation * &extrapolation_factor
            }
        };
        Rope {
            inv_freq: inv_freq.to_device(device),
            attention_scaling,
            dynamic,
            rotate_half: rotate_half_matrix(dim).to_device(device),
            identity: Tensor::eye(dim, (Kind::Float, device)),
        }
    }

    /// `apply_rotary`'s rotation as one matrix per position, for decode steps
    /// (`Llama::decode_folds`): x @ M = x * cos + rotate_half(x) * sin with
    /// M = I diag(cos) + R diag(sin), [.., D, D] for cos and sin [.., D] and `rotation`
    /// R (`rotation(kind)`). Every entry is a cos, a +-sin or a zero, so each output
    /// sums two products in the matmul's accumulator and rounds once, where
    /// `apply_rotary` rounds after each product and after their sum (f32: the same
    /// within an ulp or two; bf16: one rounding in three). Built once per step (two
    /// kernels); then each layer rotates q and k with one batched
    /// matmul instead of four kernels.
    pub fn rotary_matrices(&self, cos: &Tensor, sin: &Tensor, rotation: &Tensor) -> Tensor {
        let identity = self.identity.to_kind(cos.kind());
        (identity * cos.unsqueeze(-2)).addcmul(rotation, &sin.unsqueeze(-2))
    }

    /// The same with its constant matrices stored in `kind` (the model's compute
    /// dtype), so that no forward pass or decode step casts them again.
    pub fn with_matrices_in(mut self, kind: Kind) -> Rope {
        self.rotate_half = self.rotate_half.to_kind(kind);
        self.identity = self.identity.to_kind(kind);
        self
    }

    /// `rotate_half` as a matrix in `kind`, for `apply_rotary`.
    pub fn rotation(&self, kind: Kind) -> Tensor {
        self.rotate_half.to_kind(kind)
    }

    /// cos and sin for positions [B, T], shaped [B, T, head_dim], in `kind`.
    pub fn cos_sin(&self, positions: &Tensor, kind: Kind) -> (Tensor, Tensor) {
        let inv_freq = match &self.dynamic {
            Some(ntk) => {
                // transformers recomputes the base when the sequence outgrows max_position_embeddings.
                let seq_len =
                    (positions.max().int64_value(&[]) + 1).max(ntk.max_position_embeddings);
                let base = ntk.base
                    * ((ntk.factor * seq_len as f64 / ntk.max_position_embeddings as f64)
                        - (ntk.factor - 1.0))
                        .powf(ntk.dim as f64 / (ntk.dim as f64 - 2.0));
                default_inv_freq(base, ntk.dim).to_device(positions.device())
            }
            None => self.inv_freq.shallow_clone(),
        };
        let freqs = positions.to_kind(Kind::Float).unsqueeze(-1) * inv_freq.view([1, 1, -1]);
        let emb = Tensor::cat(&[&freqs, &freqs], -1);
        let cos = emb.cos() * self.attention_scaling;
        let sin = emb.sin() * self.attention_scaling;
        (cos.to_kind(kind), sin.to_kind(kind))
    }
}

/// R with x @ R = transformers' `rotate_half(x)` = cat(-x2, x1) for x = cat(x1, x2):
/// -1 at (j + D/2, j) and 1 at (j, j + D/2).
pub fn rotate_half_matrix(dim: i64) -> Tensor {
    let half = dim / 2;
    let mut values = vec![0f32; (dim * dim) as usize];
    for j in 0..half {
        values[((j + half) * dim + j) as usize] = -1.0;
        values[(j * dim + j + half) as usize] = 1.0;
    }
    Tensor::from_slice(&values).view([dim, dim])
}

/// Rotates q or k [B, T, H, D] by cos/sin [B, T, D] (transformers' `x * cos +
/// rotate_half(x) * sin`). `rotation` is `Rope::rotation`: `rotate_half` as one matmul
/// gives exactly the same values (each output is one input times +-1; the other
/// terms are exact zeros) in one kernel forward and one backward, where slicing,
/// negating and concatenating take two forward and about six backward (zero-filled
/// slice gradients and their sums). A training step is bound by kernel launches on the
/// GPU, and q and k of every layer pass here.
pub fn apply_rotary(x: &Tensor, cos: &Tensor, sin: &Tensor, rotation: &Tensor) -> Tensor {
    let (cos, sin) = (cos.unsqueeze(2), sin.unsqueeze(2));
    x * cos + x.matmul(rotation) * sin
}

#[cfg(test)]
mod tests {
    use super::*;

    /// transformers' formula, with rotate_half by slices.
    fn by_slices(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
        let half = x.size()[3] / 2;
        let rotated = Tensor::cat(&[&x.narrow(3, half, half).neg(), &x.narrow(3, 0, half)], 3);
        x * cos.unsqueeze(2) + rotated * sin.unsqueeze(2)
    }

    /// The matmul form gives bit-identical values and input gradients to the slices,
    /// in f32 and bf16.
    #[test]
    fn rotation_by_matmul_equals_rotate_half() {
        let (batch, steps, heads, dim) = (2i64, 5, 3, 8);
        let wave =
            |n: i64, phase: f64| (Tensor::arange(n, (Kind::Float, Device::Cpu)) * phase).sin();
        for kind in [Kind::Float, Kind::BFloat16] {
            let mut x = wave(batch * steps * heads * dim, 0.37)
                .view([batch, steps, heads, dim])
                .to_kind(kind)
                .set_requires_grad(true);
            let angles = wave(batch * steps * dim, 0.11).view([batch, steps, dim]) * 3.0;
            let (cos, sin) = (angles.cos().to_kind(kind), angles.sin().to_kind(kind));
            let upstream = wave(batch * steps * heads * dim, 0.23)
                .view([batch, steps, heads, dim])
                .to_kind(kind);
            let mut run = |matmul: bool| {
                x.zero_grad();
                let y = if matmul {
                    apply_rotary(&x, &cos, &sin, &rotate_half_matrix(dim).to_kind(kind))
                } else {
                    by_slices(&x, &cos, &sin)
                };
                (&y * &upstream).sum(Kind::Float).backward();
                (y.detach(), x.grad().copy())
            };
            let (y_slices, grad_slices) = run(false);
            let (y_matmul, grad_matmul) = run(true);
            assert!(y_matmul.equal(&y_slices), "{kind:?}: values");
            assert!(grad_matmul.equal(&grad_slices), "{kind:?}: gradients");
            assert!(
                !y_matmul.equal(&(&x * cos.unsqueeze(2))),
                "{kind:?}: sin matters"
            );
        }
    }
}
