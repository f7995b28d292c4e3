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
        }
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

/// Rotates q or k [B, H, T, D] by cos/sin [B, T, D].
pub fn apply_rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let half = x.size()[3] / 2;
    let x1 = x.narrow(3, 0, half);
    let x2 = x.narrow(3, half, half);
    let rotated = Tensor::cat(&[&x2.neg(), &x1], 3);
    x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)
}
